"""Where in the picture is the all-in-focus image's error? (issue "A sharper all-in-focus
image", a diagnostic.)

  python experiments/reproduce_table.py --crop=3x4 --methods=mpi,input,wiener \
      --output_dir=out/crops
  python experiments/error_by_gradient.py --results=out/crops \
      --output=experiments/results/error_by_gradient_crops.json

For each scene of a `reproduce_table.py` output folder, each method's image is aligned
to the ground truth as the scores do it (`metrics.align_image`), and its squared error
is split by the ground truth's gradient magnitude: the flattest half of the pixels,
the next 40% and the steepest 10%. Reports each part's share of the error and the
ratio of each method's mean squared error to the Wiener filter's there.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import tifffile
from absl import app, flags

from dpjax import io, metrics, outputs, reproduce

FLAGS = flags.FLAGS
PARTS = (("flat_50", 0.0, 0.5), ("middle_40", 0.5, 0.9), ("steep_10", 0.9, 1.0))


def _grey(img: np.ndarray) -> np.ndarray:
    return img.mean(axis=-1) if img.ndim == 3 else img


def scene_errors(results: Path, data: Path, sid: str, methods: list[str]) -> dict:
    gt, _ = io.read_image(data / "gt_all_in_focus_im" / f"{sid}_gt.png")
    gt = _grey(gt.astype(np.float64))
    sq, region = {}, None
    for m in methods:
        folder = results / m / sid
        img = _grey(tifffile.imread(folder / "all_in_focus.tif").astype(np.float64))
        y0, x0, h, w = json.loads((folder / "result.json").read_text())["preprocessing"]["crop"]
        aligned, region, _ = metrics.align_image(img, gt[y0:y0 + h, x0:x0 + w])
        sq[m] = (aligned - region) ** 2
    gy, gx = np.gradient(region)
    mag = np.hypot(gy, gx)
    edges = np.quantile(mag, [lo for _, lo, _ in PARTS[1:]])
    part = np.searchsorted(edges, mag, side="right")  # 0, 1, 2
    out = {}
    for m in methods:
        total = sq[m].sum()
        out[m] = {name: {"share": float(sq[m][part == i].sum() / total),
                         "mse_vs_wiener": float(sq[m][part == i].mean()
                                                / sq["wiener"][part == i].mean())}
                  for i, (name, _, _) in enumerate(PARTS)}
        out[m]["psnr"] = float(-10 * np.log10(sq[m].mean()))
    return out


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    results = Path(FLAGS.results)
    scenes = sorted(p.name for p in (results / "wiener").iterdir() if p.is_dir())
    if not scenes:
        raise app.UsageError(f"no scenes under {results / 'wiener'}")
    report = {sid: scene_errors(results, Path(FLAGS.data_dir), sid, FLAGS.methods)
              for sid in scenes}
    for sid, r in report.items():
        print(sid, " | ".join(
            f"{m} " + " ".join(f"{n} {r[m][n]['share']:.2f}/{r[m][n]['mse_vs_wiener']:.2f}"
                               for n, _, _ in PARTS) for m in FLAGS.methods))
    if FLAGS.output:
        outputs.write_json(Path(FLAGS.output), report)
    return 0


if __name__ == "__main__":
    flags.DEFINE_string("results", None, "A reproduce_table.py --output_dir.", required=True)
    flags.DEFINE_string("data_dir", str(reproduce.DEFAULT_DATA_DIR), "The Pixel 4 folder.")
    flags.DEFINE_list("methods", ["input", "wiener", "mpi"], "Methods to split (wiener needed).")
    flags.DEFINE_string("output", "", "JSON file for every number.")
    sys.exit(app.run(main))
