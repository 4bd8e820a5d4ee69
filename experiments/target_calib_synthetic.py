"""How well does target calibration recover known kernels? (synthetic, Pixel 4 kernels)

  python experiments/target_calib_synthetic.py --block=6x8 --kernel_size=69 \
      --output=out/target_calib_synthetic.json

A 1/f noise target (grey) is blurred through the Pixel 4 calibration kernels (the
central --block of its 6x8 grid of 168-px tiles, 61x61 kernels, as they are: not
re-centred) with dpjax.conv, the solver's renderer, using the true surroundings as
padding; Gaussian noise (--noise) is added. The sharp frame is the same texture
shifted by --shift with gain --gain and offset --offset. dpjax.target_calib then
aligns and estimates the kernels, and each is compared with the truth moved by the
alignment's integer error (a global shift of the sharp frame and a common shift of
all kernels are the same thing, so the estimate is the truth moved by it).

Output JSON: alignment, per-kernel L1 error (mean / max over tiles per view),
centroid error (px), the fit report (PSNR, iterations) and the wall time.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging

from dpjax import conv, outputs
from dpjax import io as io_lib
from dpjax import kernels as kernels_lib
from dpjax import target_calib as tc

ROOT = Path(__file__).resolve().parents[1]
FLAGS = flags.FLAGS
flags.DEFINE_string("calib_dir", str(ROOT.parent / "shared" / "data" / "pixel4" / "calibration"),
                    "Pixel 4 calibration folder.")
flags.DEFINE_string("block", "6x8", "Central RxC block of the calibration's tiles to use.")
flags.DEFINE_integer("kernel_size", 69, "Estimated kernel side (>= 61 plus the alignment "
                     "error, so that the moved truth fits).")
flags.DEFINE_float("noise", 2e-3, "Noise std (texture std 0.15, mean 0.5).")
flags.DEFINE_list("shift", ["3", "-2"], "Shift dy,dx of the sharp frame's content.")
flags.DEFINE_float("gain", 0.8, "sharp = gain * texture + offset.")
flags.DEFINE_float("offset", 0.05, "See --gain.")
flags.DEFINE_float("smooth_weight", tc.KernelFitConfig.smooth_weight, "Smoothness weight.")
flags.DEFINE_float("tol", tc.KernelFitConfig.tol, "Solver tolerance.")
flags.DEFINE_integer("seed", 0, "Texture and noise seed.")
flags.DEFINE_string("output", "out/target_calib_synthetic.json", "JSON output.")


def noise_texture(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """[H, W, 1] 1/f noise, mean 0.5, std 0.15, clipped to [0.01, 0.98]."""
    fy = np.fft.fftfreq(height)[:, None]
    fx = np.fft.rfftfreq(width)[None, :]
    f = np.hypot(fy, fx)
    f[0, 0] = 1.0
    amp = 1.0 / f
    amp[0, 0] = 0.0
    t = np.fft.irfft2(amp * np.exp(2j * np.pi * rng.uniform(size=amp.shape)), s=(height, width))
    return np.clip(0.5 + 0.15 * t / t.std(), 0.01, 0.98)[..., None]


def move(kernels: np.ndarray, size: int, dy: int, dx: int) -> np.ndarray:
    """Kernels padded to size x size and moved by (dy, dx) px (down/right), no wrap."""
    p = (size - kernels.shape[-1]) // 2
    k = np.pad(kernels, ((0, 0), (0, 0), (p, p), (p, p)))
    out = np.zeros_like(k)
    ys, yd = (slice(0, size - dy), slice(dy, size)) if dy >= 0 else (
        slice(-dy, size), slice(0, size + dy))
    xs, xd = (slice(0, size - dx), slice(dx, size)) if dx >= 0 else (
        slice(-dx, size), slice(0, size + dx))
    out[..., yd, xd] = k[..., ys, xs]
    return out


def main(argv):
    del argv
    rows, cols = (int(v) for v in FLAGS.block.split("x"))
    calib = io_lib.load_calibration_kernels(FLAGS.calib_dir)
    full_rows, full_cols = calib.grid
    r0, c0 = (full_rows - rows) // 2, (full_cols - cols) // 2
    idx = [(r0 + i) * full_cols + c0 + j for i in range(rows) for j in range(cols)]
    truth = calib.kernels[:, idx]  # [2, T, 61, 61]
    tile = calib.tile_size
    r = truth.shape[-1] // 2
    sy, sx = (int(v) for v in FLAGS.shift)
    margin = r + max(abs(sy), abs(sx)) + 8
    rng = np.random.default_rng(FLAGS.seed)
    h, w = rows * tile, cols * tile
    texture = noise_texture(rng, h + 2 * margin, w + 2 * margin)

    grid = kernels_lib.TileGrid(rows=rows, cols=cols, tile_h=tile, tile_w=tile)
    geom = conv.ConvGeometry.create(grid, r)
    xp = jnp.asarray(texture[margin - r:margin + h + r, margin - r:margin + w + r, 0])
    spec = conv.tile_spectra(xp[None], geom)
    blurred = np.stack([np.asarray(conv.apply_spectra(
        spec, conv.kernel_spectra(jnp.asarray(truth[v]), geom), geom))[0] for v in range(2)])
    blurred = blurred[..., None] + rng.normal(0, FLAGS.noise, (2, h, w, 1))
    sharp = FLAGS.gain * texture[margin - sy:margin - sy + h, margin - sx:margin - sx + w] \
        + FLAGS.offset

    cfg = tc.KernelFitConfig(kernel_size=FLAGS.kernel_size, smooth_weight=FLAGS.smooth_weight,
                             tol=FLAGS.tol, saturation=None)
    t0 = time.time()
    fit = tc.estimate_tile_kernels(blurred, sharp, grid=(rows, cols), tile=tile, config=cfg)
    seconds = time.time() - t0
    ey, ex = fit.alignment.integer_shift[0] - sy, fit.alignment.integer_shift[1] - sx
    moved = move(truth, FLAGS.kernel_size, ey, ex)
    l1 = np.abs(fit.kernels - moved).sum(axis=(-2, -1))  # [2, T]
    st, se = tc.kernel_stats(moved), tc.kernel_stats(fit.kernels)
    cerr = np.hypot(st["centroid_y"] - se["centroid_y"], st["centroid_x"] - se["centroid_x"])
    result = {
        "block": [rows, cols], "tile": tile, "kernel_size": FLAGS.kernel_size,
        "noise": FLAGS.noise, "true_shift": [sy, sx],
        "alignment": {"shift": fit.alignment.shift, "integer_error": [ey, ex],
                      "gain": fit.alignment.gain},
        "l1": {"mean": l1.mean(axis=1), "max": l1.max(axis=1), "per_tile": l1},
        "centroid_error_px": {"mean": cerr.mean(axis=1), "max": cerr.max(axis=1)},
        "psnr_reblur": fit.psnr_reblur, "psnr_identity": fit.psnr_identity,
        "iterations": {"mean": float(fit.iterations.mean()), "max": int(fit.iterations.max())},
        "converged": bool(fit.converged.all()), "seconds": seconds,
    }
    outputs.write_json(FLAGS.output, result)
    logging.info("L1 mean %s max %s; centroid error max %s px; alignment error (%d, %d); "
                 "%.0f s", np.round(l1.mean(1), 4), np.round(l1.max(1), 4),
                 np.round(cerr.max(1), 3), ey, ex, seconds)
    return 0


if __name__ == "__main__":
    sys.exit(app.run(main))
