"""How good are self-calibrated DP kernels? (dpjax.selfcal on the shared data sets)

  python experiments/selfcal_eval.py --dataset=pixel4 --output=out/selfcal/pixel4.json
  python experiments/selfcal_eval.py --dataset=canon --output=out/selfcal/canon.json

For every scene, and for all scenes jointly, `selfcal.fit_kernel_model` fits the kernel
model (parameters, quality and wall time recorded). Then:

- pixel4 (/work/shared/data/pixel4 layout, `io.load_pixel4_scene` with the vignetting
  correction): distance to the lab calibration (re-centred with
  `recenter_kernel_pairs`): the mean per-kernel L1 over the 6 x 8 tiles after matching
  the gauge (the fitted model rendered at the radius, 8-20 px in 0.5 px steps, and
  sign that fit the calibration best); the same for the default parametric kernels
  (best radius) as a reference;
- both: the kernel-symmetry search map (`presets.search_defocus`) computed with each
  kernel set, scored against the ground truth with 1 - |Spearman rho| on valid pixels
  (Pixel 4: the GT defocus map; Canon: inverse depth from d.png, 0 = invalid), for the
  scene's own fit, the joint fit, the lab calibration (Pixel 4), today's default
  `parametric_dp_kernels(radius=8)` and the fitted radius with the default shape.

Canon views are 8-bit sRGB exports, decoded to linear light here.
"""

from __future__ import annotations

import resource
import sys
import time
from pathlib import Path

import numpy as np
from absl import app, flags, logging

import dpjax
from dpjax import io, metrics, outputs, presets, selfcal
from dpjax.kernel_model import LEGACY_MODEL, render_kernel_pairs

FLAGS = flags.FLAGS
flags.DEFINE_enum("dataset", "pixel4", ["pixel4", "canon"], "Which shared data set.")
flags.DEFINE_string("data_dir", None, "Data folder (default: the shared copy).")
flags.DEFINE_list("scenes", None, "Scene ids (default: all present).")
flags.DEFINE_string("output", None, "JSON output.")

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def srgb_to_linear(v: np.ndarray) -> np.ndarray:
    v = np.asarray(v, np.float64)
    return np.where(v > 0.04045, ((v + 0.055) / 1.055) ** 2.4, v / 12.92)


def _cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def load_scenes(data_dir: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{id: (views [2, H, W, C] linear, ground truth [H, W] with 0 = invalid)}; the
    ground truth grows with defocus (Pixel 4 GT map; Canon inverse depth)."""
    out = {}
    if FLAGS.dataset == "pixel4":
        ids = FLAGS.scenes or sorted(p.name[:3] for p in data_dir.glob("*_left.png"))
        for sid in ids:
            sc = io.load_pixel4_scene(data_dir, sid, require_gt=True)
            out[sid] = (sc.views, sc.gt_defocus)
        return out
    ids = FLAGS.scenes or sorted(p.name for p in data_dir.iterdir() if (p / "l.png").is_file())
    for sid in ids:
        views = np.stack([srgb_to_linear(io.read_image(data_dir / sid / f"{v}.png")[0] / 255.0)
                          for v in "lr"]).astype(np.float32)
        depth = io.read_image(data_dir / sid / "d.png")[0].astype(np.float64)
        out[sid] = (views, np.where(depth > 0, 1000.0 / np.maximum(depth, 1.0), 0.0))
    return out


def search_score(views, kernels, tile: int, gt) -> dict:
    """1 - |rho_s| of the symmetry search's map against gt (all valid pixels, and the
    search's confident ones) and the search's time."""
    rows, cols = views.shape[1] // tile, views.shape[2] // tile
    bank = dpjax.KernelBank.create(kernels, rows=rows, cols=cols, tile_h=tile)
    t0 = time.perf_counter()
    sm = presets.search_defocus(views, bank)
    dt = time.perf_counter() - t0
    f = sm.factor
    h, w = sm.defocus.shape
    g = gt[:h * f, :w * f].reshape(h, f, w, f)
    valid = np.all(g > 0, axis=(1, 3))
    g = g.mean(axis=(1, 3))
    return {"spearman": metrics.spearman_loss(sm.defocus, g, valid.astype(np.float64)),
            "spearman_confident": metrics.spearman_loss(
                sm.defocus, g, (valid & sm.confident).astype(np.float64)),
            "confident_fraction": float(sm.confident.mean()),
            "range_p5_p95": [float(v) for v in np.percentile(sm.defocus[sm.confident], [5, 95])]
            if sm.confident.any() else None,
            "search_s": dt}


def gauge_matched_l1(model, calib: np.ndarray, rows: int, cols: int) -> dict:
    """Mean per-kernel L1 to the re-centred calibration, best over radius and sign."""
    best = {"l1": np.inf}
    for r in np.arange(8.0, 20.01, 0.5):
        k = dpjax.recenter_kernel_pairs(render_kernel_pairs(
            model.replace(radius=float(r)), rows=rows, cols=cols, size=calib.shape[-1]))
        for flip in (False, True):
            kk = k[:, :, ::-1, ::-1] if flip else k
            l1 = float(np.abs(kk - calib).sum(axis=(2, 3)).mean())
            if l1 < best["l1"]:
                best = {"l1": l1, "radius": float(r), "sign_flipped": flip}
    return best


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    default = SHARED / ("pixel4" if FLAGS.dataset == "pixel4" else "canon_r6ii/casual/orbbec")
    data_dir = Path(FLAGS.data_dir) if FLAGS.data_dir else default
    scenes = load_scenes(data_dir)
    views0 = next(iter(scenes.values()))[0]
    h, w = views0.shape[1:3]
    tile = selfcal.choose_tile_size(h, w)
    calib = None
    if FLAGS.dataset == "pixel4":
        cal = io.load_calibration_kernels(data_dir / "calibration")
        calib = dpjax.recenter_kernel_pairs(cal.kernels)
        tile = cal.tile_size
    cfg = selfcal.SelfCalConfig()
    fits, cpu = {}, {}
    for sid, (views, _) in list(scenes.items()) + [("joint", (None, None))]:
        pairs = [v for v, _ in scenes.values()] if views is None else [views]
        c0 = _cpu_seconds()
        res = selfcal.fit_kernel_model(pairs, cfg, names=list(scenes) if views is None else [sid])
        cpu[sid] = _cpu_seconds() - c0
        fits[sid] = res
        logging.info("%s: fit %.1f s (%.1f s CPU), fallback %s, gain %.3f, params %s", sid,
                     res.seconds, cpu[sid], res.fallback, res.gain,
                     {k: round(v, 3) for k, v in res.fitted_model.to_dict().items()})
    report = {"dataset": FLAGS.dataset, "data_dir": str(data_dir), "config": str(cfg),
              "fits": {k: r.summary() for k, r in fits.items()}, "fit_cpu_s": cpu,
              "kernels": {}, "search": {}}
    if calib is not None:
        rows, cols = h // tile, w // tile
        for sid, res in fits.items():
            report["kernels"][sid] = gauge_matched_l1(res.fitted_model, calib, rows, cols)
        report["kernels"]["default_parametric"] = gauge_matched_l1(LEGACY_MODEL, calib, rows, cols)
        logging.info("L1 to the calibration: %s", report["kernels"])
    for sid, (views, gt) in scenes.items():
        sets = {"own_fit": fits[sid].fitted_model, "joint_fit": fits["joint"].fitted_model,
                "default_r8": LEGACY_MODEL,
                "default_shape_fitted_radius": LEGACY_MODEL.replace(
                    radius=fits["joint"].fitted_model.radius)}
        row = {}
        for name, model in sets.items():
            k = selfcal.calibration_kernels(model, height=h, width=w, tile_size=tile).kernels
            row[name] = search_score(views, k, tile, gt)
        if calib is not None:
            row["lab_calibration"] = search_score(views, calib, tile, gt)
        report["search"][sid] = row
        logging.info("%s search 1-|rho|: %s", sid,
                     {k: round(v["spearman"], 3) for k, v in row.items()})
    names = next(iter(report["search"].values())).keys()
    report["search_mean"] = {n: float(np.mean([r[n]["spearman"] for r in
                                               report["search"].values()])) for n in names}
    logging.info("mean search 1-|rho|: %s", report["search_mean"])
    if FLAGS.output:
        outputs.write_json(FLAGS.output, report)
    return 0


if __name__ == "__main__":
    sys.exit(app.run(main))
