"""Fit one dual-pixel kernel set from a camera's own photos (no calibration lab).

  python experiments/calibrate_kernels.py --input_dir=IN --output_dir=CAL [--scenes=a,b]
  python run_solver.py --input_dir=IN --calib_dir=CAL ...

run_solver.py does the same by itself when no --calib_dir is given (--kernels=auto,
`dpjax.auto_kernels`, writing OUTPUT/self_calibration/); this script fits one kernel
set for a camera, lens and aperture from the pairs you choose, to reuse on later
photos. Every DP pair in --input_dir (`dpjax.io.scan_inputs`: NAME_left/NAME_right,
NAME_L/NAME_R, or l/r images in one folder per scene, at any depth) or the --scenes
among them is loaded as the solver loads it (`dpjax.scene.load_views`, the whole frame:
linearised per --input_encoding, Pixel pairs vignetting-corrected with the white
sheets of --white_dir, default INPUT/calibration when it has them), and
`dpjax.selfcal.fit_kernel_model` fits one kernel model to all of them. The pairs must be
one frame size and, where their EXIF says, one camera model, f-number and focal length.
CAL/blur_kernels_{left,right}.npy and CAL/kernels_meta.json are then written in the
format of `dpjax.io.load_calibration_kernels`, for the full frame (tiles of
`selfcal.choose_tile_size`, or --tile_size), with the fitted parameters, the fit's
costs and quality, and the pairs used in the metadata.

Exit status 0 when a calibration was written; 1 with a one-line error otherwise,
including a fit that fell back (too little defocus or texture, kernels that do not
explain the pairs, undetermined orientation), unless --write_fallback, which then
writes today's default parametric kernels and marks them as a fallback.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from absl import app, flags, logging

from dpjax import encoding, io, scene, selfcal
from dpjax.config import Config

FLAGS = flags.FLAGS
flags.DEFINE_string("input_dir", None, "Folder of DP pairs of one camera setting.")
flags.DEFINE_string("output_dir", None, "Calibration folder to write.")
flags.DEFINE_list("scenes", None, "Pair names to use (default: all found).")
flags.DEFINE_string("input_encoding", "auto", "How the views' values are encoded: auto "
                    "(8-bit files and JPEG sRGB, the rest linear), linear, srgb or gamma:G "
                    "(as run_solver.py's flag).")
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
flags.DEFINE_list("fit_params", list(selfcal.SelfCalConfig.fit_params),
                  "Kernel model parameters the fit estimates; the others keep their start "
                  "values (dpjax.selfcal.SelfCalConfig.fit_params; add smooth to fit the "
                  "kernels' own smoothing too).")
flags.DEFINE_bool("write_fallback", False, "Write the default parametric kernels when the "
                  "fit is rejected (marked in kernels_meta.json) instead of failing.")


class CalibrationError(Exception):
    """A problem with the inputs or the fit: reported as one line, exit status 1."""


def _loader(input_dir: Path) -> tuple[scene.KernelSource, scene.SceneOptions]:
    """How the pairs are loaded: the solver's loader, whole frames."""
    white = Path(FLAGS.white_dir) if FLAGS.white_dir else input_dir / "calibration"
    if not FLAGS.white_dir and not (white / io.WHITE_LEFT).is_file():
        white = None
    try:
        encoding.parse_encoding(FLAGS.input_encoding, allow_auto=True)
        source = scene.kernel_source(scene.KernelOptions(kind="parametric", white_dir=white),
                                     1)
    except (ValueError, scene.SetupError) as e:
        raise CalibrationError(str(e)) from None
    opts = scene.SceneOptions(base=Config(), preset="none", black_level=FLAGS.black_level,
                              allow_8bit=True, encoding=FLAGS.input_encoding,
                              whole_frame=True)
    return source, opts


def calibrate(input_dir: Path, output_dir: Path) -> selfcal.SelfCalResult:
    try:
        cfg = selfcal.SelfCalConfig(max_side=FLAGS.max_side,
                                    windows_per_pair=FLAGS.windows_per_pair,
                                    fit_params=tuple(FLAGS.fit_params))
    except ValueError as e:
        raise CalibrationError(str(e)) from e
    if not input_dir.is_dir():
        raise CalibrationError(f"input folder not found: {input_dir}")
    found = io.scan_inputs(input_dir)
    pairs = found.pairs
    if FLAGS.scenes:
        known = {p.name: p for p in pairs}
        unknown = [s for s in FLAGS.scenes if s not in known]
        if unknown:
            raise CalibrationError(f"--scenes {','.join(unknown)} not found in {input_dir} "
                                   f"(found: {', '.join(sorted(known)) or 'none'})")
        pairs = [known[s] for s in FLAGS.scenes]
    if not pairs:
        raise CalibrationError(f"no DP pairs found in {input_dir}")
    for p in pairs:
        if p.left is None or p.right is None:
            raise CalibrationError(f"{p.name}: {'right' if p.right is None else 'left'} view "
                                   "not found")
    source, opts = _loader(input_dir)
    names = [p.name for p in pairs]
    settings = [io.read_camera_settings(p.left) for p in pairs]
    selfcal.check_same_camera(settings, names)
    t0 = time.perf_counter()
    views = [scene.load_views(p, source, opts)[0] for p in pairs]
    logging.info("loaded %d pairs (%dx%d) in %.1f s: %s", len(views), views[0].shape[1],
                 views[0].shape[2], time.perf_counter() - t0, ", ".join(names))
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
    if FLAGS.tile_size is None and selfcal.choose_tile_size(h, w) < 32:
        raise CalibrationError(f"{h}x{w} px has no common tile size of at least 32 px: crop "
                               "the frames or give --tile_size")
    calib = selfcal.save_self_calibration(
        output_dir, res, height=h, width=w, tile_size=FLAGS.tile_size,
        sources=[str(p.left) for p in pairs], settings=shared,
        extra_meta={"fit_params": list(cfg.fit_params)})
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
