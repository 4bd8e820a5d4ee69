"""Fit one dual-pixel kernel set from a camera's own photos (no calibration lab).

  python experiments/calibrate_kernels.py --input_dir=IN --output_dir=CAL [--scenes=a,b]
  python run_solver.py --input_dir=IN --calib_dir=CAL ...

Every DP pair in --input_dir (`dpjax.io.discover_pairs`: NAME_left/NAME_right,
NAME_L/NAME_R, ...; else, until discover_pairs learns it, one pair per subfolder holding
l.png and r.png, the layout of the Canon R6 II samples) or the --scenes among them is
loaded, linearised, and `dpjax.selfcal.fit_kernel_model` fits one kernel model to all of
them. The pairs must be one frame size and, where their EXIF says, one camera model,
f-number and focal length: one kernel set is for one camera, lens and aperture.
CAL/blur_kernels_{left,right}.npy and CAL/kernels_meta.json are then written in the
format of `dpjax.io.load_calibration_kernels`, for the full frame (tiles of
`selfcal.choose_tile_size`, or --tile_size), with the fitted parameters, the fit's
costs and quality, and the pairs used in the metadata.

Linearisation (--linearize): "auto" reads 8-bit files as sRGB-encoded exports and
decodes them (x = ((v + 0.055) / 1.055)^2.4 for v > 0.04045, else v / 12.92), and
16-bit files as linear; "srgb" and "none" force one. Pixel pairs (NAME_left.png) get
the Pixel 4 preprocessing of `io.load_pixel_pair`, with the vignetting correction
when --white_dir (default: INPUT/calibration when it holds the white sheets) has
white_sheet_{left,right}.png.

Exit status 0 when a calibration was written; 1 with a one-line error otherwise,
including a fit that fell back (too little defocus or texture, kernels that do not
explain the pairs, undetermined orientation), unless --write_fallback, which then
writes today's default parametric kernels and marks them as a fallback.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
from absl import app, flags, logging

from dpjax import io, selfcal

FLAGS = flags.FLAGS
flags.DEFINE_string("input_dir", None, "Folder of DP pairs of one camera setting.")
flags.DEFINE_string("output_dir", None, "Calibration folder to write.")
flags.DEFINE_list("scenes", None, "Pair names to use (default: all found).")
flags.DEFINE_enum("linearize", "auto", ["auto", "srgb", "none"],
                  "Decode sRGB exports: auto = 8-bit files only.")
flags.DEFINE_float("black_level", None, "Black level of the raw values (default: the "
                   "format's; required for PGM).")
flags.DEFINE_string("white_dir", None, "Folder with white_sheet_{left,right}.png for Pixel "
                    "vignetting correction (default INPUT/calibration when present).")
flags.DEFINE_integer("tile_size", None, "Tile side of the written kernels (default: the "
                     "largest common divisor of the frame's sides up to 192).")
flags.DEFINE_integer("max_side", selfcal.SelfCalConfig.max_side,
                     "Fit resolution: downsample until the longer side is at most this.")
flags.DEFINE_integer("windows_per_pair", selfcal.SelfCalConfig.windows_per_pair,
                     "Textured windows used per pair.")
flags.DEFINE_bool("write_fallback", False, "Write the default parametric kernels when the "
                  "fit is rejected (marked in kernels_meta.json) instead of failing.")


class CalibrationError(Exception):
    """A problem with the inputs or the fit: reported as one line, exit status 1."""


def srgb_to_linear(v: np.ndarray) -> np.ndarray:
    """sRGB-encoded values in [0, 1] -> linear (IEC 61966-2-1)."""
    v = np.asarray(v, np.float64)
    return np.where(v > 0.04045, ((v + 0.055) / 1.055) ** 2.4, v / 12.92)


def find_pairs(input_dir: Path) -> list[io.ScenePair]:
    """io.discover_pairs, else one "canon" pair per subfolder with l.png and r.png."""
    pairs = [p for p in io.discover_pairs(input_dir) if p.left or p.right]
    if pairs:
        return pairs
    nested = []
    for sub in sorted(p for p in input_dir.iterdir() if p.is_dir()):
        left, right = sub / "l.png", sub / "r.png"
        if left.is_file() or right.is_file():
            nested.append(io.ScenePair(name=sub.name, left=left if left.is_file() else None,
                                       right=right if right.is_file() else None,
                                       format="canon"))
    return nested


def load_linear(pair: io.ScenePair, *, linearize: str, white: tuple | None) -> np.ndarray:
    """[2, H, W, C] float32 linear views of one pair."""
    if pair.left is None or pair.right is None:
        missing = "right" if pair.right is None else "left"
        raise CalibrationError(f"{pair.name}: {missing} view not found")
    if pair.format == "pixel":
        return io.load_pair(pair, black_level=FLAGS.black_level, expect_16bit=True,
                            white_left=white[0] if white else None,
                            white_right=white[1] if white else None)
    raws, depths = zip(*(io.read_image(p) for p in (pair.left, pair.right)))
    io.validate_pair(raws[0], raws[1], names=(str(pair.left), str(pair.right)))
    decode = linearize == "srgb" or (linearize == "auto" and depths[0] == 8)
    if not decode:
        return io.load_pair(pair, black_level=FLAGS.black_level, expect_16bit=False)
    if depths[0] is None:
        raise CalibrationError(f"{pair.left}: floating-point data cannot be sRGB-decoded")
    scale = float(2 ** depths[0] - 1)
    views = np.stack([srgb_to_linear(r / scale) for r in raws]).astype(np.float32)
    return views if views.ndim == 4 else views[..., None]


def _white_sheets(input_dir: Path) -> tuple | None:
    folder = Path(FLAGS.white_dir) if FLAGS.white_dir else input_dir / "calibration"
    sheets = (folder / io.WHITE_LEFT, folder / io.WHITE_RIGHT)
    if all(p.is_file() for p in sheets):
        return sheets
    if FLAGS.white_dir:
        raise CalibrationError(f"--white_dir {folder}: white_sheet_left/right.png not found")
    return None


def calibrate(input_dir: Path, output_dir: Path) -> selfcal.SelfCalResult:
    if not input_dir.is_dir():
        raise CalibrationError(f"input folder not found: {input_dir}")
    pairs = find_pairs(input_dir)
    if FLAGS.scenes:
        known = {p.name: p for p in pairs}
        unknown = [s for s in FLAGS.scenes if s not in known]
        if unknown:
            raise CalibrationError(f"--scenes {','.join(unknown)} not found in {input_dir} "
                                   f"(found: {', '.join(sorted(known)) or 'none'})")
        pairs = [known[s] for s in FLAGS.scenes]
    if not pairs:
        raise CalibrationError(f"no DP pairs found in {input_dir}")
    white = _white_sheets(input_dir) if any(p.format == "pixel" for p in pairs) else None
    names = [p.name for p in pairs]
    settings = [io.read_camera_settings(p.left) if p.left else {} for p in pairs]
    selfcal.check_same_camera(settings, names)
    t0 = time.perf_counter()
    views = [load_linear(p, linearize=FLAGS.linearize, white=white) for p in pairs]
    logging.info("loaded %d pairs (%dx%d) in %.1f s: %s", len(views), views[0].shape[1],
                 views[0].shape[2], time.perf_counter() - t0, ", ".join(names))
    cfg = selfcal.SelfCalConfig(max_side=FLAGS.max_side, windows_per_pair=FLAGS.windows_per_pair)
    res = selfcal.fit_kernel_model(views, cfg, names=names)
    logging.info("fit in %.1f s: cost %.4g (null %.4g, gain %.3f), orientation margin %.2f, "
                 "%d of %d windows informative, blur radius p10/p50/p90 %s px",
                 res.seconds, res.cost, res.null_cost, res.gain, res.angle_margin,
                 res.num_informative, res.num_windows,
                 "/".join(f"{v:.2f}" for v in res.blur_radius_px))
    logging.info("fitted model: %s", res.fitted_model.to_dict())
    if res.fallback:
        if not FLAGS.write_fallback:
            raise CalibrationError(f"self-calibration rejected: {res.note}; nothing written "
                                   "(--write_fallback writes the default kernels)")
        logging.warning("self-calibration rejected (%s): writing the default kernels", res.note)
    shared = {k: v for k, v in settings[0].items() if all(s.get(k) == v for s in settings)}
    _, h, w, _ = views[0].shape
    calib = selfcal.save_self_calibration(
        output_dir, res, height=h, width=w, tile_size=FLAGS.tile_size,
        sources=[str(p.left.parent if p.left.name == "l.png" else p.left) for p in pairs],
        settings=shared)
    logging.info("wrote %s: %dx%d tiles of %d px, %d px kernels, radius %.1f px at scale 1",
                 output_dir, calib.grid[0], calib.grid[1], calib.tile_size,
                 calib.kernels.shape[-1], res.model.radius)
    return res


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not FLAGS.input_dir or not FLAGS.output_dir:
        raise app.UsageError("--input_dir and --output_dir are required")
    try:
        calibrate(Path(FLAGS.input_dir), Path(FLAGS.output_dir))
    except (CalibrationError, ValueError, OSError, FloatingPointError) as e:
        # ValueError covers io.InputError and the library's input checks.
        logging.error("%s", str(e).splitlines()[0] if str(e) else type(e).__name__)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(app.run(main))
