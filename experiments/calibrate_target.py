"""Dual-pixel blur kernels from a target capture (no calibration lab needed).

  python experiments/calibrate_target.py --blurred_dir=DIR --sharp_dir=DIR \
      --output_dir=CALIB [--grid=4x6] [--kernel_size=21] [--input_encoding=auto] \
      [--smooth_weight=auto] [--montage=kernels.png]

Shoot a flat textured target (a printed or displayed noise pattern, posters on a
wall) twice with the same framing: blurred at the working aperture with the target
out of focus, and sharp (small aperture, or in focus). --blurred_dir holds the DP
views l.png and r.png (or left.png / right.png); --sharp_dir holds the sharp shot's
views (their mean is the sharp frame) or is one image file. The images must all have
the same size.

Writes CALIB/blur_kernels_{left,right}.npy ([T, K, K] float32, row-major tiles) and
kernels_meta.json (grid, tile_size, and how the kernels were estimated, with the fit
report), the format dpjax.io.load_calibration_kernels reads; --montage writes a PNG of
the kernels per tile (left | right). The grid of --grid tiles of --tile_size px
(default: the largest that fits) is centred in the frame. The kernels describe the
blur at the target's defocus (scale s = 1); dpjax rescales them per layer.

The smoothness weight is chosen by cross-validation by default (held-out
checkerboard squares, one fit per candidate, then a final fit on all pixels), and
each kernel is refit on its connected core (--prune_threshold) so that specks least
squares parks far from the kernel do not widen the saved window.

Inputs: 8-bit files are sRGB-encoded display exports (e.g. Canon DPP) and are
linearised; 16-bit files are taken as linear (minus --black_level). Override with
--input_encoding. Exit status 0 on success, 1 with a one-line error on bad input.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

import numpy as np
from absl import app, flags, logging

from dpjax import encoding as encoding_lib
from dpjax import io as io_lib
from dpjax import outputs
from dpjax import target_calib as tc

FLAGS = flags.FLAGS
flags.DEFINE_string("blurred_dir", None, "Folder with the blurred DP views l.png and r.png.")
flags.DEFINE_string("sharp_dir", None, "Folder with the sharp shot's l.png and r.png (their "
                    "mean is used), or one sharp image file.")
flags.DEFINE_string("output_dir", None, "Calibration folder to write.")
flags.DEFINE_string("grid", "4x6", "Tile grid RxC (rows x cols), centred in the frame.")
flags.DEFINE_integer("tile_size", 0, "Tile side in px (0: the largest that fits).")
flags.DEFINE_integer("kernel_size", tc.KernelFitConfig.kernel_size,
                     "Odd side of the estimated kernels: pick it generously; the saved "
                     "kernels are cropped to their extent (--crop_mass).")
flags.DEFINE_string("smooth_weight", "auto",
                    "Weight of the kernel smoothness prior (dimensionless), or 'auto': the "
                    "--smooth_candidates value that best predicts held-out pixels "
                    "(dpjax.target_calib.select_smooth_weight).")
flags.DEFINE_list("smooth_candidates", ["1e-4", "1e-3", "1e-2", "1e-1", "1"],
                  "Candidate weights for --smooth_weight=auto.")
flags.DEFINE_integer("holdout_block", 16, "Held-out checkerboard square (px) for "
                     "--smooth_weight=auto.")
flags.DEFINE_string("input_encoding", "auto", "As run_solver.py's --input_encoding: auto "
                    "(8-bit files sRGB, 16-bit linear), linear, srgb or gamma:G.")
flags.DEFINE_float("black_level", 0.0, "Black level subtracted from linear inputs (file units).")
flags.DEFINE_integer("max_shift", tc.KernelFitConfig.max_shift,
                     "Alignment search radius in px (sharp vs blurred frame).")
flags.DEFINE_bool("per_tile_gain", tc.KernelFitConfig.per_tile_gain,
                  "Estimate a gain per tile and view (vignetting); else unit-sum kernels "
                  "with the global gain of the alignment.")
flags.DEFINE_bool("subpixel", tc.KernelFitConfig.subpixel,
                  "Resample the sharp frame by the sub-pixel part of the alignment (else "
                  "the kernels absorb it).")
flags.DEFINE_float("saturation", 0.99, "Linear values >= this (full scale 1) are treated "
                   "as clipped and masked; <= 0 disables.")
flags.DEFINE_float("crop_mass", 0.999, "Save the smallest centred window that keeps this "
                   "fraction of every kernel's mass (1: keep --kernel_size).")
flags.DEFINE_float("prune_threshold", 0.02, "Refit each kernel on its connected core of "
                   "values >= this x its peak (0: pure least squares). Drops isolated specks "
                   "that absorb model errors of real captures (library default: 0).")
flags.DEFINE_integer("max_iters", tc.KernelFitConfig.max_iters, "Solver iteration limit.")
flags.DEFINE_string("montage", None, "Optional PNG of the kernels per tile (left | right).")

_VIEW_NAMES = (("l.png", "r.png"), ("left.png", "right.png"))


class _BadInput(Exception):
    """A one-line error for the user."""


def _view_paths(folder: Path) -> tuple[Path, Path]:
    if not folder.is_dir():
        raise _BadInput(f"{folder}: not a folder")
    for left, right in _VIEW_NAMES:
        if (folder / left).is_file() and (folder / right).is_file():
            return folder / left, folder / right
    raise _BadInput(f"{folder}: expected l.png and r.png (or left.png and right.png)")


def _read_linear(path: Path, encoding: str, black_level: float) -> tuple[np.ndarray, str]:
    """One image as [H, W, C] float64 linear values, full scale 1."""
    samples, depth = io_lib.read_image(path)
    x = np.asarray(samples, np.float64)
    if x.ndim == 2:
        x = x[..., None]
    if depth is None:  # floating-point TIFF: taken as linear, as is
        return x, "linear"
    full = float(2**depth - 1)
    try:
        enc = (encoding_lib.auto_encoding(depth, raw_format=False) if encoding == "auto"
               else encoding_lib.parse_encoding(encoding))
    except ValueError as e:
        raise _BadInput(f"--input_encoding: {e}") from None
    if not enc.is_linear:
        return np.asarray(encoding_lib.to_linear(x / full, enc), np.float64), str(enc)
    encoding = str(enc)
    if black_level >= full:
        raise _BadInput(f"--black_level={black_level:g} is not below the full scale {full:g}")
    return np.maximum(x - black_level, 0.0) / (full - black_level), encoding


def _floats(name: str, values) -> list[float]:
    try:
        out = [float(v) for v in values]
    except ValueError:
        raise _BadInput(f"--{name} must be numbers (or 'auto'), got {values}") from None
    if not out or any(not v >= 0 for v in out):
        raise _BadInput(f"--{name} must be >= 0, got {values}")
    return out


def _parse_grid(text: str) -> tuple[int, int]:
    try:
        rows, cols = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise _BadInput(f"--grid must be RxC, e.g. 4x6; got {text!r}") from None
    if rows < 1 or cols < 1:
        raise _BadInput(f"--grid must be positive, got {text!r}")
    return rows, cols


def calibrate() -> dict:
    """Flags -> library -> calibration folder; returns a summary for the log."""
    for name in ("blurred_dir", "sharp_dir", "output_dir"):
        if not FLAGS[name].value:
            raise _BadInput(f"--{name} is required")
    grid = _parse_grid(FLAGS.grid)
    enc, black = FLAGS.input_encoding, FLAGS.black_level
    blurred_paths = _view_paths(Path(FLAGS.blurred_dir))
    sharp_src = Path(FLAGS.sharp_dir)
    sharp_paths = (sharp_src,) if sharp_src.is_file() else _view_paths(sharp_src)

    images, encodings = {}, set()
    for path in (*blurred_paths, *sharp_paths):
        images[path], used = _read_linear(path, enc, black)
        encodings.add(used)
    shapes = {str(p): a.shape for p, a in images.items()}
    if len(set(shapes.values())) > 1:
        raise _BadInput("images differ in size: " + ", ".join(
            f"{p} {h}x{w}x{c}" for p, (h, w, c) in shapes.items()))
    views = np.stack([images[p] for p in blurred_paths])  # [2, H, W, C]
    sharp = np.mean([images[p] for p in sharp_paths], axis=0)  # [H, W, C]
    height, width = sharp.shape[:2]
    tile = FLAGS.tile_size or min(height // grid[0], width // grid[1])
    if tile < 1:
        raise _BadInput(f"--grid={FLAGS.grid} is too fine for a {height}x{width} frame")

    cfg = tc.KernelFitConfig(
        kernel_size=FLAGS.kernel_size,
        per_tile_gain=FLAGS.per_tile_gain, subpixel=FLAGS.subpixel, max_shift=FLAGS.max_shift,
        saturation=FLAGS.saturation if FLAGS.saturation > 0 else None,
        max_iters=FLAGS.max_iters, prune_threshold=FLAGS.prune_threshold)
    t0 = time.time()
    alignment = tc.align_sharp(sharp, views.mean(0), max_shift=cfg.max_shift)
    if alignment.at_search_edge:
        raise _BadInput(f"the best alignment shift {alignment.integer_shift} is at the edge "
                        f"of the search (--max_shift={cfg.max_shift}); raise --max_shift or "
                        "check that both shots have the same framing")
    scores = None
    if FLAGS.smooth_weight == "auto":
        candidates = tuple(_floats("smooth_candidates", FLAGS.smooth_candidates))
        weight, scores = tc.select_smooth_weight(
            views, sharp, grid=grid, tile=tile, config=cfg, candidates=candidates,
            holdout_block=FLAGS.holdout_block, alignment=alignment)
        logging.info("held-out PSNR per smooth weight: %s -> %g",
                     {w: round(p, 3) for w, p in scores.items()}, weight)
    else:
        (weight,) = _floats("smooth_weight", [FLAGS.smooth_weight])
    cfg = dataclasses.replace(cfg, smooth_weight=weight)
    fit = tc.estimate_tile_kernels(views, sharp, grid=grid, tile=tile, config=cfg,
                                   alignment=alignment)
    seconds = time.time() - t0
    extra = {
        "source": {"blurred": [str(p) for p in blurred_paths],
                   "sharp": [str(p) for p in sharp_paths]},
        "image_shape": [height, width],
        "input_encoding": sorted(encodings),
        "options": cfg,
        "smooth_weight_heldout_psnr": scores,
        "seconds": seconds,
    }
    saved = tc.write_target_calibration(FLAGS.output_dir, fit, crop_mass=FLAGS.crop_mass,
                                        extra_meta=extra)
    if FLAGS.montage:
        outputs.write_png(FLAGS.montage, tc.kernel_montage(saved, grid))
    stats = tc.kernel_stats(saved)
    return {
        "grid": grid, "tile": tile, "kernel_size": saved.shape[-1], "seconds": seconds,
        "shift": alignment.shift, "psnr_reblur": fit.psnr_reblur,
        "psnr_identity": fit.psnr_identity,
        "unconverged": int((~fit.converged).sum()),
        "radius_max": float(stats["radius"].max()),
        "border_mass_max": float(tc.kernel_stats(fit.kernels)["border_mass"].max()),
    }


def main(argv):
    if len(argv) > 1:
        print(f"calibrate_target: error: unexpected arguments {argv[1:]}", file=sys.stderr)
        return 1
    try:
        s = calibrate()
    except (_BadInput, io_lib.InputError, ValueError) as e:
        print(f"calibrate_target: error: {e}", file=sys.stderr)
        return 1
    logging.info("wrote %s: %dx%d tiles of %d px, %d x %d kernels in %.1f s; alignment "
                 "shift (%.2f, %.2f); PSNR re-blurred %s dB vs unblurred %s dB",
                 FLAGS.output_dir, *s["grid"], s["tile"], s["kernel_size"], s["kernel_size"],
                 s["seconds"], *s["shift"], np.round(s["psnr_reblur"], 2),
                 np.round(s["psnr_identity"], 2))
    if s["unconverged"]:
        logging.warning("%d kernels did not converge in --max_iters", s["unconverged"])
    if s["border_mass_max"] > 1e-3:
        logging.warning("kernels reach the edge of the %d px window (border mass %.2g): "
                        "raise --kernel_size", FLAGS.kernel_size, s["border_mass_max"])
    return 0


if __name__ == "__main__":
    sys.exit(app.run(main))
