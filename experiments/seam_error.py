"""Is the all-in-focus error larger along the kernel tiles' borders (seams), or along
the frame's edges?

  python experiments/seam_error.py --crop=3x4 \
      --runs=input=out/pixel4_3x4/input,wiener=out/pixel4_3x4/wiener,dpjax=out/pixel4_3x4/mpi \
      --output=experiments/results/seam_error_3x4.json
  python experiments/seam_error.py --crop=full --edges=frame --band=8 --far=64 \
      --runs=... --output=experiments/results/frame_edge_error_full.json

The kernels change abruptly at the borders of the calibration's tiles (168 px on the
Pixel 4), so a model error there would show as a band of larger error along them.
Each run is LABEL=FOLDER with <scene>/all_in_focus.tif as experiments/reproduce_table.py
writes it. Every image is aligned to the ground truth as the metrics align it
(`dpjax.metrics.align_image`); the squared error is then averaged over the pixels
within --band px of an inner tile border (in the image's own pixel grid, where its
seams are) and over those at least --far px from every border. Reported per scene and
run: 10 log10(near / far), in dB (> 0: more error along the seams). Content differs
between the two regions, so compare a solver's ratio with the input's on the same
scenes: a seam artefact raises it above the input's.

--edges=frame asks the same of the image's outer edges instead: the solver pads the
MPI by edge replication, which is wrong near the frame's border (the scene beyond it
is not a copy of the border pixels), so "near" is within --band px of the solved
image's edge and "far" at least --far px from it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import tifffile
from absl import app, flags, logging

from dpjax import metrics
from dpjax import reproduce as rt
from dpjax_apps.flags import parse_named, parse_rxc

FLAGS = flags.FLAGS
flags.DEFINE_list("scenes", None, "Scene ids (default: every scene with ground truth).")
flags.DEFINE_string("data_dir", str(rt.DEFAULT_DATA_DIR), "Pixel 4 dataset folder.")
flags.DEFINE_string("crop", "full", "The --crop the runs were made with.")
flags.DEFINE_list("runs", None, "LABEL=FOLDER pairs (FOLDER/<scene>/all_in_focus.tif).")
flags.DEFINE_integer("band", 6, "Pixels within this distance of an inner border are 'near'.")
flags.DEFINE_integer("far", 20, "Pixels at least this far from every inner border are 'far'.")
flags.DEFINE_enum("edges", "tiles", ["tiles", "frame"], "Which borders: the kernel tiles' inner "
                  "ones (seams) or the solved image's outer edges.")
flags.DEFINE_string("output", None, "JSON to write.")

MAX_SHIFT = 6  # the metrics' translation search


def border_distance(shape: tuple[int, int], offset: tuple[int, int], tile: tuple[int, int],
                    grid: tuple[int, int]) -> np.ndarray:
    """Distance of each pixel to the nearest inner tile border (inf where there is none).

    Args:
      shape: (h, w) of the region; offset: (y, x) of its first pixel in the tiled frame;
      tile: (tile_h, tile_w); grid: (rows, cols) of the tiling.

    Returns:
      [h, w] float distance in pixels (a border lies between pixels k*tile - 1 and k*tile;
      both are at distance 0).
    """
    def axis(n, off, t, count):
        p = np.arange(n, dtype=np.float64) + off
        borders = t * np.arange(1, count, dtype=np.float64)  # inner borders only
        if borders.size == 0:
            return np.full(n, np.inf)
        return np.min(np.minimum(np.abs(p[:, None] - borders[None]),
                                 np.abs(p[:, None] + 1 - borders[None])), axis=1)

    dy = axis(shape[0], offset[0], tile[0], grid[0])
    dx = axis(shape[1], offset[1], tile[1], grid[1])
    return np.minimum(dy[:, None], dx[None, :])


def edge_distance(shape: tuple[int, int], offset: tuple[int, int],
                  image_shape: tuple[int, int]) -> np.ndarray:
    """Distance of each pixel to the nearest outer edge of the image.

    Args:
      shape: (h, w) of the region; offset: (y, x) of its first pixel in the image;
      image_shape: (H, W) of the whole image.

    Returns:
      [h, w] float distance in pixels (the first and last row and column are at 0).
    """
    def axis(n, off, size):
        p = np.arange(n, dtype=np.float64) + off
        return np.minimum(p, size - 1 - p)

    dy = axis(shape[0], offset[0], image_shape[0])
    dx = axis(shape[1], offset[1], image_shape[1])
    return np.minimum(dy[:, None], dx[None, :])


def seam_ratio(estimate: np.ndarray, gt: np.ndarray, tile: tuple[int, int],
               grid: tuple[int, int], band: int, far: int, edges: str = "tiles"
               ) -> dict[str, float]:
    """10 log10 of the aligned squared error near the borders over far from them.

    Args:
      estimate: [H, W] or [H, W, 1] all-in-focus image on the tiled frame; gt: [H, W].
      edges: "tiles" (the inner tile borders) or "frame" (the image's outer edges).
    """
    est = np.asarray(estimate, np.float64).reshape(gt.shape)
    aligned, region, (dy, dx) = metrics.align_image(est, gt, max_shift=MAX_SHIFT)
    err = (aligned - region) ** 2
    offset = (MAX_SHIFT + dy, MAX_SHIFT + dx)
    if edges == "frame":
        d = edge_distance(err.shape, offset, gt.shape)
    else:
        d = border_distance(err.shape, offset, tile, grid)
    near, away = err[d < band], err[d >= far]
    if near.size == 0 or away.size == 0:
        raise ValueError(f"no pixel within {band} px of a border ({edges}; a single tile?) "
                         f"or none {far} px from every one")
    return {"near_mse": float(near.mean()), "far_mse": float(away.mean()),
            "ratio_db": float(10 * np.log10(near.mean() / away.mean()))}


def main(argv):
    del argv
    if not FLAGS.runs:
        raise app.UsageError("--runs=LABEL=FOLDER[,...] is required")
    runs = parse_named(FLAGS.runs, "runs")
    opts = rt.Options(data_dir=Path(FLAGS.data_dir), crop=parse_rxc(FLAGS.crop, "crop"),
                      scenes=tuple(FLAGS.scenes) if FLAGS.scenes else None,
                      methods=("input",), output_dir=Path("unused"))
    run = rt.prepare_run(opts)
    out: dict = {"crop": FLAGS.crop, "edges": FLAGS.edges, "band": FLAGS.band, "far": FLAGS.far,
                 "scenes": {}}
    for sid, pair in run.pairs.items():
        _, bank, gt, _, _ = rt.load_scene(run, pair)
        g = bank.grid
        row = {}
        for label, folder in runs.items():
            est = tifffile.imread(Path(folder) / sid / "all_in_focus.tif")
            row[label] = seam_ratio(est, np.asarray(gt, np.float64), (g.tile_h, g.tile_w),
                                    (g.rows, g.cols), FLAGS.band, FLAGS.far, FLAGS.edges)
        out["scenes"][sid] = row
        logging.info("%s: %s", sid, ", ".join(f"{k} {v['ratio_db']:+.2f} dB"
                                              for k, v in row.items()))
    out["mean_ratio_db"] = {label: float(np.mean([r[label]["ratio_db"]
                                                  for r in out["scenes"].values()]))
                            for label in runs}
    text = json.dumps(out, indent=2)
    print(text)
    if FLAGS.output:
        Path(FLAGS.output).write_text(text + "\n")


if __name__ == "__main__":
    app.run(main)
