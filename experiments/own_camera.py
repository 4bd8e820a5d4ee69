"""Scores dpjax on a camera it was never calibrated for: the Canon R6 Mark II captures.

  # solve the six depth scenes with each kernel source (run_solver.py), then:
  python experiments/own_camera.py --results=auto=out/canon_auto,parametric=out/canon_param \
      --pixel_results=auto=out/pixel_auto \
      --pixel_reference=experiments/results/pixel4_full.csv:auto_sharpened \
      --flat_results=auto=out/canon_flat_auto --output=experiments/results/own_camera.json

Depth scenes (`casual/orbbec/NNN/{l,r,d}.png`): with focus at 1 m the signed defocus is
affine in inverse depth (data README), so each defocus map is scored against 1/depth on
the pixels with a depth measurement: 1 - |rho_s| (rank order; `dpjax.metrics.
spearman_loss`) and AIWE(1) in dioptres (the error of the best affine fit defocus ->
1/depth, `dpjax.metrics.aiwe1`); and 1 - |rho_s| on the more and the less textured
half of the pixels, split as the defocus fill splits them (`texture_split_scores`). The
`dp_stereo` baseline (calibrated kernel-symmetry search, `dpjax.baselines.
dp_stereo_defocus`) is run here, with the same kernels as a `--stereo` item's kernels
(default: today's parametric model; an auto run's self_calibration folder gives it the
self-calibrated ones).

Plane (`flat/001/1500/{f4,f20}`): the f/4 result's all-in-focus image against the mean
of the f/20 views (sharp reference, linearised) after the metrics' shift search and
affine intensity fit, next to the blurry input's score, in linear light and again in the
input's display values (all three images through its encoding, clipped to [0, 1]); and
the mean colour of the written all_in_focus.png against the input's (8-bit levels per
channel); and the spread (std) of its defocus map, which for a plane should be one
value.

Writes one JSON file with every number and prints a Markdown table.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
from absl import app, flags, logging

from dpjax import baselines, encoding, io, metrics, outputs, postprocess, scene
from dpjax_apps.flags import parse_named

FLAGS = flags.FLAGS
ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CANON = ROOT.parent / "shared" / "data" / "canon_r6ii"


def _crop(arr: np.ndarray, result: dict[str, Any]) -> np.ndarray:
    """The part of a full-frame array the solve kept (result.json preprocessing.crop)."""
    crop = (result.get("preprocessing") or {}).get("crop")
    if crop is None:
        return arr
    y0, x0, h, w = crop
    return arr[y0:y0 + h, x0:x0 + w]


def inverse_depth(depth_png: Path) -> tuple[np.ndarray, np.ndarray]:
    """(1/depth in dioptres [H, W], valid [H, W]) from a uint16 millimetre depth map."""
    d, _ = io.read_image(depth_png)
    d = np.asarray(d, np.float64)
    valid = d > 0
    return np.where(valid, 1000.0 / np.where(valid, d, 1.0), 0.0), valid


def depth_scores(defocus: np.ndarray, inv: np.ndarray, valid: np.ndarray) -> dict[str, float]:
    return {"one_minus_abs_rho_s": metrics.spearman_loss(defocus, inv, valid),
            "aiwe1_dioptres": metrics.aiwe1(defocus, inv, valid),
            "valid_fraction": float(valid.mean())}


def texture_split_scores(defocus: np.ndarray, image: np.ndarray, inv: np.ndarray,
                         valid: np.ndarray) -> dict[str, float]:
    """1 - |rho_s| on the more and the less textured half of the pixels, as the defocus
    fill splits them (`dpjax.postprocess.fill_defocus`'s kept mask from the run's own
    all-in-focus image): where the photo's texture decides the map and where the priors
    (or the fill) do. defocus, inv, valid: [H, W]; image: [H, W] or [H, W, C] linear."""
    image = image[..., None] if image.ndim == 2 else image
    _, kept = postprocess.fill_defocus(np.asarray(defocus, np.float32),
                                       np.asarray(image, np.float32))
    kept = np.asarray(kept)
    return {"one_minus_abs_rho_s_textured": metrics.spearman_loss(defocus, inv, valid & kept),
            "one_minus_abs_rho_s_untextured": metrics.spearman_loss(defocus, inv,
                                                                     valid & ~kept)}


def score_depth_results(folder: Path, canon: Path) -> dict[str, dict[str, float]]:
    """Scores every scene of a run_solver output folder of the casual/orbbec scenes."""
    out = {}
    for rj in sorted(folder.rglob(outputs.RESULT_JSON)):
        d = rj.parent
        result = json.loads(rj.read_text())
        name = d.relative_to(folder).as_posix()
        depth = canon / "casual" / "orbbec" / Path(name).name / "d.png"
        if not depth.is_file() or not outputs.is_complete(d):
            continue
        import tifffile

        defocus = tifffile.imread(d / outputs.DEFOCUS_TIFF)
        inv, valid = inverse_depth(depth)
        inv, valid = _crop(inv, result), _crop(valid, result)
        image = tifffile.imread(d / outputs.AIF_TIFF)  # every run writes it
        out[name] = {**depth_scores(defocus, inv, valid),
                     **texture_split_scores(defocus, image, inv, valid),
                     "wall_s": (result.get("timings") or {}).get("wall_s"),
                     "kernels": (result.get("kernels") or {}).get("model")}
    return out


def dp_stereo_scores(canon: Path, source: scene.KernelSource, base) -> dict[str, dict]:
    """The dp_stereo baseline with `source`'s kernels on every casual scene."""
    out = {}
    opts = scene.SceneOptions(base=base, preset="none")
    for sdir in sorted((canon / "casual" / "orbbec").iterdir()):
        if not (sdir / "l.png").is_file():
            continue
        pair = io.ScenePair(name=sdir.name, left=sdir / "l.png", right=sdir / "r.png",
                            format="canon")
        views, info = scene.load_views(pair, source, opts)
        bank = scene.make_bank(source, info)
        cands = np.linspace(-2.0, 2.5, 37)
        est = baselines.dp_stereo_defocus(views, bank, cands)
        inv, valid = inverse_depth(sdir / "d.png")
        inv, valid = _crop(inv, {"preprocessing": info}), _crop(valid, {"preprocessing": info})
        out[sdir.name] = depth_scores(np.asarray(est.defocus), inv, valid)
    return out


def flat_scores(folder: Path, canon: Path) -> dict[str, Any]:
    """The plane's all-in-focus image against the f/20 reference; colours of the PNG."""
    import tifffile
    from PIL import Image

    rj = next(folder.rglob(outputs.RESULT_JSON))
    result = json.loads(rj.read_text())
    d = rj.parent
    enc = io.parse_encoding((result["preprocessing"].get("input") or {}).get("encoding",
                                                                                "srgb"))
    sharp = io.load_pair_with_info(io.ScenePair("f20", canon / "flat/001/1500/f20/l.png",
                                                canon / "flat/001/1500/f20/r.png", "canon"),
                                   encoding=str(enc)).views.mean(axis=0)
    blurred = io.load_pair_with_info(io.ScenePair("f4", canon / "flat/001/1500/f4/l.png",
                                                  canon / "flat/001/1500/f4/r.png", "canon"),
                                     encoding=str(enc)).views.mean(axis=0)
    sharp, blurred = _crop(sharp, result), _crop(blurred, result)
    aif = tifffile.imread(d / outputs.AIF_TIFF)
    est = metrics.image_metrics(aif, sharp)
    inp = metrics.image_metrics(blurred, sharp)
    # The same in the input's display values (what a viewer of the export sees).
    def shown(x):
        return encoding.from_linear(np.clip(x, 0.0, 1.0), enc)

    est_d = metrics.image_metrics(shown(aif), shown(sharp))
    inp_d = metrics.image_metrics(shown(blurred), shown(sharp))
    png = np.asarray(Image.open(d / outputs.AIF_PNG).convert("RGB"), np.float64)
    src = [np.asarray(Image.open(canon / f"flat/001/1500/f4/{s}.png").convert("RGB"),
                      np.float64) for s in ("l", "r")]
    src_mean = _crop((src[0] + src[1]) / 2, result)
    return {"psnr": est["psnr"], "ssim": est["ssim"], "input_psnr": inp["psnr"],
            "input_ssim": inp["ssim"], "gain_db": est["psnr"] - inp["psnr"],
            "display_psnr": est_d["psnr"], "display_input_psnr": inp_d["psnr"],
            "display_gain_db": est_d["psnr"] - inp_d["psnr"],
            # the plane's defocus should be one value: its spread over the frame
            "defocus_std": float(np.std(tifffile.imread(d / outputs.DEFOCUS_TIFF))),
            "png_mean_rgb": png.mean(axis=(0, 1)).tolist(),
            "input_mean_rgb": src_mean.mean(axis=(0, 1)).tolist(),
            "png_mean_shift_levels": (png.mean(axis=(0, 1))
                                      - src_mean.mean(axis=(0, 1))).tolist(),
            "wall_s": (result.get("timings") or {}).get("wall_s")}


def pixel_scores(folder: Path) -> dict[str, dict[str, Any]]:
    """The metrics run_solver.py recorded for each Pixel 4 scene (ground truth beside the
    pairs), its wall time and the kernels it was solved with."""
    out = {}
    for rj in sorted(folder.rglob(outputs.RESULT_JSON)):
        result = json.loads(rj.read_text())
        m = result.get("metrics")
        if not m:
            continue
        out[rj.parent.relative_to(folder).as_posix()] = {
            **{k: m[k] for k in ("aiwe1", "aiwe2", "spearman", "psnr", "ssim") if k in m},
            "input_psnr": (result.get("input_metrics") or {}).get("psnr"),
            "wall_s": (result.get("timings") or {}).get("wall_s"),
            "crop": (result.get("preprocessing") or {}).get("crop")}
    return out


def pixel_reference(csv_path: Path, preset: str) -> dict[str, dict[str, float]]:
    """Per-scene rows of an earlier calibrated run (experiments/results/pixel4_full.csv)."""
    import csv

    out = {}
    with open(csv_path) as f:
        for row in csv.DictReader(f):
            if row["method"] == "dpjax" and row["preset"] == preset and row["scene"] != "mean":
                out[row["scene"]] = {"aiwe1": float(row["aiwe1"]),
                                     "aiwe2": float(row["aiwe2"]),
                                     "spearman": float(row["one_minus_abs_rho_s"]),
                                     "psnr": float(row["psnr"]), "ssim": float(row["ssim"]),
                                     "wall_s": float(row["wall_s"])}
    return out


def _mean(rows: dict[str, dict], key: str) -> float:
    return float(np.mean([r[key] for r in rows.values()]))


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    canon = Path(FLAGS.canon_dir)
    if (FLAGS.results or FLAGS.flat_results) and not (canon / "casual" / "orbbec").is_dir():
        logging.error("%s has no casual/orbbec scenes (set --canon_dir)", canon)
        return 2
    results = parse_named(FLAGS.results, "results")
    flats = parse_named(FLAGS.flat_results, "flat_results")
    report: dict[str, Any] = {"depth": {}, "flat": {}}
    for name, folder in results.items():
        report["depth"][name] = score_depth_results(folder, canon)
    from dpjax.config import Config

    for name, where in parse_named(FLAGS.stereo, "stereo").items():
        kopts = (scene.KernelOptions(kind="parametric") if str(where) == "parametric" else
                 scene.KernelOptions(calib_dir=where))
        source = scene.kernel_source(kopts, 1)
        report["depth"][f"dp_stereo_{name}"] = dp_stereo_scores(canon, source, Config())
    for name, folder in flats.items():
        report["flat"][name] = flat_scores(folder, canon)
    report["pixel4"] = {name: pixel_scores(folder)
                        for name, folder in parse_named(FLAGS.pixel_results,
                                                         "pixel_results").items()}
    if FLAGS.pixel_reference:
        path, _, preset = FLAGS.pixel_reference.partition(":")
        report["pixel4"][f"reference:{preset}"] = pixel_reference(ROOT / path, preset)
    lines = ["| method | scenes | mean 1-abs(rho_s) | mean AIWE(1) [D] | textured half | "
             "less textured half |", "|---|---:|---:|---:|---:|---:|"]
    for name, rows in report["depth"].items():
        if rows:
            split = [f"{_mean(rows, k):.3f}" if all(k in r for r in rows.values()) else "-"
                     for k in ("one_minus_abs_rho_s_textured",
                               "one_minus_abs_rho_s_untextured")]
            lines.append(f"| {name} | {len(rows)} | {_mean(rows, 'one_minus_abs_rho_s'):.3f} | "
                         f"{_mean(rows, 'aiwe1_dioptres'):.3f} | {' | '.join(split)} |")
    for name, f in report["flat"].items():
        lines.append(f"\nplane {name}: PSNR {f['input_psnr']:.2f} -> {f['psnr']:.2f} dB "
                     f"(+{f['gain_db']:.2f}), SSIM {f['input_ssim']:.3f} -> {f['ssim']:.3f}, "
                     f"display values {f['display_input_psnr']:.2f} -> "
                     f"{f['display_psnr']:.2f} dB (+{f['display_gain_db']:.2f}), defocus std "
                     f"{f['defocus_std']:.3f}, "
                     f"PNG mean shift {np.round(f['png_mean_shift_levels'], 2).tolist()}")
    if report["pixel4"]:
        lines += ["", "| Pixel 4 run | scenes | AIWE(1) | AIWE(2) | 1-abs(rho_s) | PSNR | SSIM | "
                  "wall s |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for name, rows in report["pixel4"].items():
            if rows:
                lines.append(f"| {name} | {len(rows)} | " + " | ".join(
                    f"{_mean(rows, k):.4g}" for k in ("aiwe1", "aiwe2", "spearman", "psnr",
                                                     "ssim", "wall_s")) + " |")
    text = "\n".join(lines)
    print(text)
    if FLAGS.output:
        outputs.write_json(Path(FLAGS.output), report)
    return 0


if __name__ == "__main__":
    flags.DEFINE_string("canon_dir", str(DEFAULT_CANON), "The Canon R6 Mark II data folder.")
    flags.DEFINE_list("results", None, "NAME=FOLDER run_solver output folders of the "
                      "casual/orbbec scenes to score against inverse depth.")
    flags.DEFINE_list("flat_results", None, "NAME=FOLDER run_solver output folders of the "
                      "flat/001/1500/f4 pair to score against the f/20 reference.")
    flags.DEFINE_list("stereo", ["parametric=parametric"], "NAME=KERNELS: also run and "
                      "score the dp_stereo baseline with these kernels (a calibration folder, "
                      "e.g. an auto run's self_calibration/512x768, or 'parametric' for the "
                      "parametric model's defaults); empty: no baseline.")
    flags.DEFINE_list("pixel_results", None, "NAME=FOLDER run_solver output folders of the "
                      "Pixel 4 scenes (scored by the run itself: ground truth beside the pairs).")
    flags.DEFINE_string("pixel_reference", None, "CSV:PRESET rows of an earlier calibrated "
                        "run to compare with, e.g. "
                        "experiments/results/pixel4_full.csv:auto_sharpened.")
    flags.DEFINE_string("output", None, "JSON file for every number.")
    sys.exit(app.run(main))
