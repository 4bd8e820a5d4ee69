"""Scores the defocus fill (`dpjax.postprocess.fill_defocus`) on finished solves.

  python experiments/defocus_fill.py --pixel=auto=out/pixel_auto,lab=out/pixel_lab \
      --canon=auto=out/canon_auto --quantiles=30,50,70 \
      --output=experiments/results/defocus_fill.json \
      --figure=experiments/results/defocus_fill.png --figure_scenes=011,013

The fill is a post-step on two outputs every solve writes (defocus_map.tif, the map
read off the layers, and all_in_focus.tif, the image it is guided by), so a folder
solved without it scores exactly as a solve with it would: each setting is applied to
the saved map and scored against the ground truth. Pixel 4 folders (`--pixel`,
run_solver.py or reproduce_table.py output; ground truth from `--pixel_data`) give
AIWE(1) and 1 - |rho_s| as the runner scores them (`dpjax.pipeline.score`); Canon depth
folders (`--canon`) give 1 - |rho_s| and AIWE(1) in dioptres against inverse depth
(experiments/own_camera.py). Rows: the map as solved, then the fill at
`dpjax.PostConfig`'s settings with each of `--quantiles`.

Writes one JSON file and, with --figure, the image, the map before and after and the
ground truth side by side for --figure_scenes (Pixel 4, the first --pixel folder).
With --write_filled, the folders that let reproduce_table.py score the Wiener baseline
at either map:

  python experiments/defocus_fill.py --pixel=lab=out/pixel_lab --write_filled=out/fill
  python experiments/reproduce_table.py --crop=full --methods=wiener,input \
      --output_dir=out/fill/lab/filled      # and .../as_solved
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import tifffile
from absl import app, flags

from dpjax import figures, outputs, pipeline, postprocess, scene
from dpjax_apps.flags import parse_named

sys.path.insert(0, str(Path(__file__).resolve().parent))
import own_camera  # noqa: E402

FLAGS = flags.FLAGS
ROOT = Path(__file__).resolve().parents[1]
flags.DEFINE_list("pixel", [], "NAME=DIR,...: Pixel 4 solve folders (scenes with ground "
                  "truth in --pixel_data).")
flags.DEFINE_list("canon", [], "NAME=DIR,...: Canon casual/orbbec solve folders.")
flags.DEFINE_string("pixel_data", str(ROOT.parent / "shared" / "data" / "pixel4"),
                    "Pixel 4 dataset folder (gt_defocus_map/).")
flags.DEFINE_string("canon_data", str(own_camera.DEFAULT_CANON), "Canon dataset folder.")
flags.DEFINE_list("quantiles", [str(postprocess.FILL_QUANTILE)], "Fill quantiles to score.")
flags.DEFINE_string("output", None, "JSON file to write.")
flags.DEFINE_string("figure", None, "PNG of maps before and after the fill (optional).")
flags.DEFINE_list("figure_scenes", [], "Pixel 4 scenes of the figure.")
flags.DEFINE_string("write_filled", None, "Also write every --pixel folder's scenes as "
                    "DIR/NAME/{as_solved,filled}/mpi/SCENE result folders (the map as solved "
                    "and filled at PostConfig's settings), so that reproduce_table.py "
                    "--methods=wiener --output_dir=DIR/NAME/filled scores Wiener at the "
                    "filled map.")


def solved(folder: Path) -> list[tuple[str, Path, dict[str, Any]]]:
    """(scene, its folder, result.json) of every complete solve under `folder`, refusing
    maps that were filled already."""
    out = []
    for rj in sorted(folder.rglob(outputs.RESULT_JSON)):
        d = rj.parent
        if not outputs.is_complete(d) or not (d / outputs.DEFOCUS_TIFF).is_file():
            continue
        result = json.loads(rj.read_text())
        if ((result.get("config") or {}).get("post") or {}).get("fill"):
            raise app.UsageError(f"{d}: its map was filled during the solve; give folders "
                                 "solved with --nodefocus_fill")
        out.append((d.name, d, result))
    if not out:
        raise app.UsageError(f"no complete solve with a defocus map under {folder}")
    return out


def _image(d: Path) -> np.ndarray:
    aif = tifffile.imread(d / outputs.AIF_TIFF).astype(np.float32)
    return aif[..., None] if aif.ndim == 2 else aif


def _label(q: float) -> str:
    return f"fill q{q:g}"


def _maps(d: Path, image: np.ndarray, quantiles: list[float]) -> dict[str, np.ndarray]:
    """{"as solved": map, "fill qN": filled map, ...} of one solve folder, guided by its
    all-in-focus `image` (`_image`)."""
    raw = tifffile.imread(d / outputs.DEFOCUS_TIFF).astype(np.float32)
    out = {"as solved": raw}
    for q in quantiles:
        post = postprocess.PostConfig(fill=True, fill_quantile=q)
        out[_label(q)] = np.asarray(postprocess.filled_defocus(raw, image, post))
    return out


def pixel_gt(result: dict[str, Any], name: str, shape: tuple[int, int]) -> np.ndarray:
    """The scene's defocus ground truth, cropped as the solve cropped its views (the
    runner's own `scene.load_ground_truth`)."""
    info = dict(result.get("preprocessing") or {})
    _, gt = scene.load_ground_truth(Path(FLAGS.pixel_data), name, shape, info)
    if gt is None:
        raise app.UsageError(f"scene {name}: no usable defocus ground truth under "
                             f"{FLAGS.pixel_data} ({'; '.join(info.get('warnings', []))})")
    return gt


def score_pixel(folder: Path, quantiles: list[float]) -> dict[str, dict[str, Any]]:
    rows: dict[str, dict[str, Any]] = {}
    for name, d, result in solved(folder):
        image = _image(d)
        gt = pixel_gt(result, name, image.shape[:2])
        for setting, dmap in _maps(d, image, quantiles).items():
            m = pipeline.score(image, dmap, gt_defocus=gt)
            rows.setdefault(setting, {})[name] = {"aiwe1": m["aiwe1"],
                                                  "spearman": m["spearman"]}
    return rows


def score_canon(folder: Path, quantiles: list[float]) -> dict[str, dict[str, Any]]:
    rows: dict[str, dict[str, Any]] = {}
    canon = Path(FLAGS.canon_data)
    for name, d, result in solved(folder):
        depth = canon / "casual" / "orbbec" / name / "d.png"
        if not depth.is_file():
            continue
        inv, valid = own_camera.inverse_depth(depth)
        inv, valid = own_camera._crop(inv, result), own_camera._crop(valid, result)
        for setting, dmap in _maps(d, _image(d), quantiles).items():
            rows.setdefault(setting, {})[name] = own_camera.depth_scores(dmap, inv, valid)
    return rows


def write_filled(folder: Path, root: Path) -> None:
    """`--write_filled` for one --pixel folder (module docstring)."""
    for name, d, result in solved(folder):
        image = _image(d)
        maps = _maps(d, image, [postprocess.FILL_QUANTILE])
        for label, dmap in (("as_solved", maps["as solved"]),
                            ("filled", maps[_label(postprocess.FILL_QUANTILE)])):
            cfg = dict(result["config"])
            cfg["post"] = {**cfg["post"], "fill": label == "filled"}
            record = {k: v for k, v in result.items() if k != "output_files"}
            outputs.write_result(root / label / "mpi" / name, all_in_focus=image,
                                 defocus=dmap, result={**record, "config": cfg,
                                                       "filled_from": str(d)})


def _means(rows: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    return {setting: {k: float(np.mean([s[k] for s in scenes.values()]))
                      for k in next(iter(scenes.values()))}
            for setting, scenes in rows.items()}


def write_figure(path: Path, folder: Path, names: list[str]) -> None:
    """Per scene: the all-in-focus image, the map as solved, filled, the ground truth."""
    from PIL import Image, ImageDraw

    tiles = []
    for name, d, result in solved(folder):
        if name not in names:
            continue
        image = _image(d)
        maps = _maps(d, image, [postprocess.FILL_QUANTILE])
        gt = pixel_gt(result, name, image.shape[:2])
        lo, hi = figures.defocus_range(*maps.values())
        aif = outputs.display_image(image)
        row = [figures._rgb(np.asarray(aif))]
        row += [figures._rgb(outputs.defocus_png(m, lo, hi)) for m in maps.values()]
        valid = gt > 0
        g = np.where(valid, gt, np.nan)
        row.append(figures._rgb(outputs.defocus_png(g, np.nanmin(g), np.nanmax(g))))
        widths = [t.shape[1] for t in row]
        tiles.append(np.concatenate(row, axis=1))
    if not tiles:
        raise app.UsageError(f"none of --figure_scenes {names} is under {folder}")
    wide = max(t.shape[1] for t in tiles)  # colour bars' labels differ in width
    grid = np.concatenate([np.pad(t, ((0, 0), (0, wide - t.shape[1]), (0, 0)),
                                  constant_values=255) for t in tiles], axis=0)
    head = np.full((100, grid.shape[1], 3), 255, np.uint8)
    im = Image.fromarray(np.concatenate([head, grid], axis=0))
    draw, font = ImageDraw.Draw(im), figures._font(80)
    for x, text in zip(np.cumsum([0, *widths[:-1]]), ("all-in-focus", "defocus as solved",
                                                        "filled (fill_defocus)",
                                                        "ground truth")):
        draw.text((int(x) + 10, 8), text, fill=(0, 0, 0), font=font)
    im.thumbnail((1800, 1800))
    im.save(path)


def main(argv):
    del argv
    quantiles = [float(q) for q in FLAGS.quantiles]
    pixel = parse_named(FLAGS.pixel, "pixel")
    canon = parse_named(FLAGS.canon, "canon")
    if not pixel and not canon:
        raise app.UsageError("give --pixel and/or --canon folders")
    report: dict[str, Any] = {"settings": {"sigma_spatial": postprocess.FILL_SIGMA_SPATIAL,
                                           "sigma_value": postprocess.FILL_SIGMA_VALUE,
                                           "quantiles": quantiles},
                              "pixel": {}, "canon": {}}
    for kind, runs, fn in (("pixel", pixel, score_pixel), ("canon", canon, score_canon)):
        for name, folder in runs.items():
            rows = fn(folder, quantiles)
            report[kind][name] = {"folder": str(folder), "scenes": rows, "mean": _means(rows)}
            for setting, mean in report[kind][name]["mean"].items():
                print(f"{kind} {name:10s} {setting:12s} "
                      + "  ".join(f"{k} {v:.4f}" for k, v in mean.items()))
    if FLAGS.output:
        Path(FLAGS.output).write_text(json.dumps(report, indent=1) + "\n")
    if FLAGS.write_filled:
        for name, folder in pixel.items():
            write_filled(folder, Path(FLAGS.write_filled) / name)
    if FLAGS.figure:
        if not pixel:
            raise app.UsageError("--figure needs a --pixel folder")
        write_figure(Path(FLAGS.figure), next(iter(pixel.values())), FLAGS.figure_scenes)
    return 0


if __name__ == "__main__":
    app.run(main)
