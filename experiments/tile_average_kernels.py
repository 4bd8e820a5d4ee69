"""Average a calibration's per-tile kernels over neighbouring tiles (a diagnostic).

  python experiments/tile_average_kernels.py --calib_dir=out/target --output_dir=out/avg1 \
      --neighbourhood=1        # each tile: the mean of its 3x3 block of tiles
  python experiments/tile_average_kernels.py --calib_dir=out/target --output_dir=out/avg_all \
      --neighbourhood=all      # every tile: the mean of all tiles (one shape, no variation)

Separates what a per-tile calibration gains from its kernels' common shape and from
how they vary across the frame: solving the same photos with the calibration, its
tile averages and its global mean, the difference between the solves is the share of
the variation at each scale (experiments/results/own_camera.md, "What limits the
plane"). Each output tile is the unweighted mean of the input tiles within
`neighbourhood` rows and columns of it (clipped at the grid's edge), renormalised to
unit sum per view; the kernels are not re-centred (the solver re-centres each tile's
pair), so a tile's left-right offset is averaged as it is. The white sheets, if any,
are copied.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from absl import app, flags

from dpjax import io

FLAGS = flags.FLAGS


def _define_flags() -> None:
    """Defined when run as a script only (tests import this module beside others)."""
    flags.DEFINE_string("calib_dir", None, "Calibration folder (blur_kernels_{left,right}.npy).")
    flags.DEFINE_string("output_dir", None, "Calibration folder to write the averaged kernels "
                        "to.")
    flags.DEFINE_string("neighbourhood", "1", "Tiles averaged on each side of a tile (an "
                        "integer >= 0; 0 copies the kernels), or 'all' for one mean kernel "
                        "pair everywhere.")
    flags.mark_flags_as_required(["calib_dir", "output_dir"])


def tile_average(kernels: np.ndarray, grid: tuple[int, int], neighbourhood: int | None
                 ) -> np.ndarray:
    """Kernels [2, R*C, K, K] averaged over each tile's (2n+1)^2 block of tiles.

    neighbourhood None averages all tiles. Returns float32 [2, R*C, K, K], unit sum per
    kernel.
    """
    rows, cols = grid
    k = np.asarray(kernels, np.float64)
    if k.ndim != 4 or k.shape[0] != 2 or k.shape[1] != rows * cols:
        raise ValueError(f"kernels must be [2, {rows * cols}, K, K], got {k.shape}")
    if neighbourhood is not None and neighbourhood < 0:
        raise ValueError(f"neighbourhood must be >= 0, got {neighbourhood}")
    g = k.reshape(2, rows, cols, *k.shape[-2:])
    if neighbourhood is None:
        out = np.broadcast_to(g.mean(axis=(1, 2), keepdims=True), g.shape).copy()
    else:
        n = neighbourhood
        out = np.empty_like(g)
        for i in range(rows):
            for j in range(cols):
                block = g[:, max(0, i - n):i + n + 1, max(0, j - n):j + n + 1]
                out[:, i, j] = block.mean(axis=(1, 2))
    out /= out.sum(axis=(-2, -1), keepdims=True)
    return out.reshape(k.shape).astype(np.float32)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    text = FLAGS.neighbourhood.strip().lower()
    if text == "all":
        n = None
    else:
        try:
            n = int(text)
        except ValueError:
            raise app.UsageError(f"--neighbourhood must be an integer >= 0 or 'all', got "
                                 f"{FLAGS.neighbourhood!r}") from None
        if n < 0:
            raise app.UsageError(f"--neighbourhood must be >= 0, got {n}")
    src, out = Path(FLAGS.calib_dir), Path(FLAGS.output_dir)
    if out.resolve() == src.resolve():
        raise app.UsageError("--output_dir must differ from --calib_dir")
    calib = io.load_calibration_kernels(src)
    averaged = tile_average(calib.kernels, calib.grid, n)
    io.save_calibration_kernels(out, io.CalibratedKernels(kernels=averaged, grid=calib.grid,
                                                          tile_size=calib.tile_size,
                                                          blur_p90=calib.blur_p90),
                                extra_meta={"tile_average": {"source": str(src),
                                                             "neighbourhood": text}})
    io.copy_white_sheets(src, out)
    print(f"tile_average_kernels: {calib.grid[0]}x{calib.grid[1]} tiles, neighbourhood "
          f"{text} -> {out}")
    return 0


if __name__ == "__main__":
    _define_flags()
    app.run(main)
