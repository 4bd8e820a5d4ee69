"""Reproduces the Pixel 4 table of Xin et al. (ICCV 2021) with dpjax and baselines.

  python experiments/reproduce_table.py --output_dir=out/pixel4_auto
  python experiments/reproduce_table.py --preset=paper --methods=mpi,wiener \
      --output_dir=out/pixel4_paper
  python experiments/reproduce_table.py --scenes=001 --crop=1x2 --level_iters=20,5,2  # quick
  python experiments/reproduce_table.py --methods=input,dpanet \
      --dpanet_checkpoint=dpanet_runs/w8 --output_dir=out/pixel4_auto

Flags -> `dpjax.reproduce.Options` -> `dpjax.reproduce.run`: the methods, what each
writes to OUTPUT_DIR, when a result is reused and how wall time is counted are
described in `dpjax.reproduce`. The shared flags (dpjax_apps.flags) mean what they mean
in run_solver.py. Exit status 0, or 1 with a one-line error.
"""

import sys
from pathlib import Path

from absl import app, flags, logging

from dpjax import reproduce, scene
from dpjax_apps import flags as common

FLAGS = flags.FLAGS


common.define_common(output_dir="out/pixel4", presets=("auto", "paper"))
flags.DEFINE_string("data_dir", str(reproduce.DEFAULT_DATA_DIR), "Pixel 4 dataset folder (its "
                    "scenes with ground truth are the table's; calibration/ inside is the "
                    "default --calib_dir).")
flags.DEFINE_list("methods", list(reproduce.Options().methods),
                  f"Methods among {', '.join(reproduce.METHODS)}.")
flags.DEFINE_bool("dpanet_init", False, "Start the mpi method's layer colours from DPANet's "
                  "all-in-focus image instead of the mean of the views.")


def options_from_flags() -> reproduce.Options:
    """Options of the flags (UsageError for bad values)."""
    if FLAGS["input_encoding"].present:  # a shared flag this app has no use for
        raise app.UsageError("--input_encoding is not read here: the Pixel 4 raw views "
                             "are linear")
    opts = reproduce.Options(
        data_dir=Path(FLAGS.data_dir), calib_dir=common.path_or_none(FLAGS.calib_dir),
        scenes=(tuple(s.zfill(3) if s.isdigit() else s for s in FLAGS.scenes)
                if FLAGS.scenes else None),
        methods=tuple(FLAGS.methods), preset=FLAGS.preset, range_probe=FLAGS.range_probe,
        prior_encoding=common.prior_encoding(),
        defocus_estimator=FLAGS.defocus_estimator, defocus_fill=FLAGS.defocus_fill,
        search_init=FLAGS.search_init,
        quality=FLAGS.quality, optimizer=FLAGS.optimizer, pyramid_levels=FLAGS.pyramid_levels,
        level_iters=common.level_iters(),
        num_iters=FLAGS.num_iters, num_layers=FLAGS.num_layers,
        refine_iters=FLAGS.refine_iters, kernel_mass_cut=FLAGS.kernel_mass_cut,
        crop=common.parse_rxc(FLAGS.crop, "crop"),
        recenter_kernels=FLAGS.recenter_kernels,
        output_dir=Path(FLAGS.output_dir), overwrite=FLAGS.overwrite, quiet=FLAGS.quiet,
        dpanet_checkpoint=common.path_or_none(FLAGS.dpanet_checkpoint),
        dpanet_init=FLAGS.dpanet_init, dpanet_tile=FLAGS.dpanet_tile,
        dpanet_overlap=FLAGS.dpanet_overlap)
    try:
        opts.base_config()
    except ValueError as e:
        raise app.UsageError(f"invalid solver settings: {e}") from None
    return opts


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if FLAGS.quiet:
        logging.set_verbosity(logging.WARNING)
    opts = options_from_flags()
    common.use_compilation_cache()
    absl_logger = logging.get_absl_logger()  # a stdlib Logger: levels are logging.INFO etc.
    try:
        reproduce.run(opts, lambda level, msg: absl_logger.log(level, "%s", msg))
    except (ValueError, FileNotFoundError, scene.SetupError) as e:  # a clear message
        logging.error("%s", e)
        print(f"reproduce_table: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(app.run(main))
