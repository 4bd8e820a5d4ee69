"""Flags shared by run_solver.py and experiments/reproduce_table.py, defined once.

Importing this module defines nothing; an app calls `define_common(...)` (and its own
flags) before `app.run`. Nothing here imports dpjax at import time: run_solver.py must
call jax.distributed.initialize before anything initialises the XLA backend.
"""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

from absl import app, flags, logging

FLAGS = flags.FLAGS

# Defaults spelled out here because flags are defined before dpjax may be imported;
# tests/test_dpanet_eval.py checks that they equal the library's
# (dpjax.dpanet.DEFAULT_TILE, ...).
DPANET_TILE = 256
DPANET_OVERLAP = 32
# --compilation_cache_dir's two words (dpjax.batch.default_compilation_cache_dir).
CACHE_AUTO = "auto"
CACHE_OFF = "off"


def define_common(*, output_dir: str, presets: tuple[str, ...] = ("auto", "paper", "none"),
                  ) -> None:
    """Defines the flags both apps share (each with the same meaning in both)."""
    d = flags
    d.DEFINE_string("output_dir", output_dir, "Where results are written.")
    d.DEFINE_string("calib_dir", None, "Calibrated kernels (blur_kernels_{left,right}.npy, "
                    "optional kernels_meta.json and white_sheet_{left,right}.png for Pixel "
                    "vignetting).")
    d.DEFINE_bool("recenter_kernels", True, "Re-centre each tile's kernel pair, calibrated "
                  "or self-calibrated, so that the all-in-focus image stays registered "
                  "with the input (dpjax.recenter_kernel_pairs).")
    d.DEFINE_list("scenes", None, "Only these scene names (comma-separated).")
    d.DEFINE_bool("overwrite", False, "Solve again even when a complete result was made "
                  "with the same settings (results of other settings are always redone).")
    d.DEFINE_bool("quiet", False, "Only warnings, failures and the final line.")
    d.DEFINE_string("compilation_cache_dir", CACHE_AUTO, "Persistent JAX compilation "
                    "cache folder (created if missing): later runs with the same shapes "
                    f"reuse the compiled solver. '{CACHE_AUTO}' (default): "
                    "JAX_COMPILATION_CACHE_DIR if set, else $DPJAX_CACHE_DIR, else "
                    "$XDG_CACHE_HOME/dpjax/jax (~/.cache/dpjax/jax), its least recently "
                    "used entries evicted beyond dpjax.batch.COMPILATION_CACHE_MAX_BYTES; "
                    f"'{CACHE_OFF}': none.")
    d.DEFINE_enum("preset", "auto", list(presets), "Per-scene configuration: auto (layer "
                  "range estimated from each pair), paper (Xin et al.'s per-scene Pixel 4 "
                  "settings)" + (", none (the base configuration)" if "none" in presets
                                 else "") + ".")
    d.DEFINE_bool("range_probe", False, "--preset=auto: refine each scene's searched layer "
                  "range with a short coarse-level solve (dpjax.presets.probe_scale_range; "
                  "about +20% solve time).")
    d.DEFINE_bool("search_init", None, "Start the layer weights near the kernel-symmetry "
                  "search's defocus map (dpjax.config.InitConfig) instead of the paper's "
                  "uniform start. Default: on with --preset=auto, off otherwise.")
    d.DEFINE_enum("defocus_estimator", None, ["mean", "sharpened"], "How the defocus map "
                  "is read off the solved layers: mean (the paper's) or sharpened "
                  "(dpjax.mpi.defocus_sharpened). Default: sharpened with --preset=auto, "
                  "mean otherwise.")
    d.DEFINE_bool("defocus_fill", None, "Fill the defocus map's less textured half "
                  "(no blur cue there) with an edge-aware average of the more textured "
                  "pixels (dpjax.postprocess.fill_defocus). Default: on with --preset=auto, "
                  "off otherwise.")
    d.DEFINE_string("input_encoding", "auto", "How the views' values are encoded: auto "
                    "(8-bit files and JPEG are sRGB, 16-bit and float files linear; "
                    "dpjax.encoding.auto_encoding), linear, srgb or gamma:G. Encoded input "
                    "is linearised before the blur model sees it; the all-in-focus PNG is "
                    "written back in the same encoding.")
    d.DEFINE_string("prior_encoding", "input", "The curve the MPI fit's priors see the "
                    "layer intensities through (the data terms stay linear): input "
                    "(default: each file's own encoding, --input_encoding's; linear for "
                    "raw and linear files), linear (the paper's), srgb or gamma:G "
                    "(dpjax.scene.SceneOptions.prior_encoding).")
    d.DEFINE_enum("quality", None, ["fast", "best"], "Solver schedule: fast (the default) or "
                  "best (~3x the steps with Adam, 2x with L-BFGS: for accelerators; not "
                  "with --level_iters); the budgets: dpjax.config.QUALITY_LEVEL_ITERS.")
    d.DEFINE_enum("optimizer", None, ["lbfgs", "adam"], "The MPI fit's optimiser for "
                  "every scene (default: lbfgs for linear input, raw, 16-bit and float "
                  "files, where it is as good in a little over half the time; adam, the "
                  "paper's, for display-referred input, 8-bit, JPEG and sRGB, where lbfgs "
                  "ranks depth worse; and adam with --preset=paper; "
                  "dpjax.presets.linear_input_solver).")
    d.DEFINE_integer("pyramid_levels", None, "Coarse-to-fine levels (default: 3, the fast "
                     "schedule; dpjax.config.schedule).")
    d.DEFINE_list("level_iters", None, "Iterations of every pyramid level, coarsest first "
                  "(default: the optimizer's fast schedule, dpjax.config.QUALITY_LEVEL_ITERS).")
    d.DEFINE_integer("num_iters", None, "Iterations at the finest level; the coarser "
                     "levels keep the schedule's (not with --level_iters).")
    d.DEFINE_integer("num_layers", None, "MPI layers (default: dpjax.Config's, 12).")
    d.DEFINE_integer("colour_levels", None, "Colour input: how many of the finest pyramid "
                     "levels solve every channel; the coarser ones solve the channel mean, "
                     "at the cost of a grey solve (default: dpjax.SolverConfig's, 1; the "
                     "pyramid level count or more: colour at every level).")
    d.DEFINE_float("kernel_mass_cut", None, "Cut the layer kernels to the window holding "
                   "all but this fraction of every calibrated kernel's mass (default: "
                   "dpjax.SolverConfig's, 0.015; 0 keeps the whole calibration window).")
    d.DEFINE_integer("refine_iters", None, "L-BFGS iterations of the all-in-focus "
                     "refinement with the layer weights frozen (dpjax.refine; default: "
                     "dpjax.RefineConfig's; 0 turns it off).")
    d.DEFINE_string("crop", None, "RxC: solve only the central R x C block of the "
                    "calibration's kernel tiles (needs --calib_dir); default: the whole "
                    "frame.")
    d.DEFINE_string("dpanet_checkpoint", None, "DPANet: a ckpt_<step>.npz or a training "
                    "output folder (its latest checkpoint); default "
                    "experiments/checkpoints/dpanet_w8/.")
    d.DEFINE_integer("dpanet_tile", DPANET_TILE, "DPANet: inference tile side in px (a "
                     "multiple of 16); memory grows with its square.")
    d.DEFINE_integer("dpanet_overlap", DPANET_OVERLAP, "DPANet: least tile overlap in px (a "
                     "multiple of 16, below the tile side).")


def parse_rxc(text: str | None, flag: str) -> tuple[int, int] | None:
    """'RxC' -> (R, C); None stays None; anything else is a UsageError naming the flag."""
    if text is None or text == "full":
        return None
    try:
        r, c = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise app.UsageError(f"--{flag} must be RxC (e.g. 2x3), got {text!r}") from None
    if r < 1 or c < 1:
        raise app.UsageError(f"--{flag} must have at least one row and column, got {text!r}")
    return r, c


def parse_named(items: list[str] | None, flag: str) -> dict[str, Path]:
    """NAME=FOLDER list items as {name: folder}, in order (UsageError for a bad item)."""
    out = {}
    for item in items or []:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise app.UsageError(f"--{flag} takes NAME=FOLDER items, got {item!r}")
        out[name] = Path(path)
    return out


def level_iters() -> tuple[int, ...] | None:
    """--level_iters as integers (None when not given; UsageError otherwise)."""
    if not FLAGS.level_iters:
        return None
    try:
        return tuple(int(v) for v in FLAGS.level_iters)
    except ValueError:
        raise app.UsageError(f"--level_iters must be integers, got {FLAGS.level_iters}") from None


def base_configs():
    """(the resolved base configuration of the flags, the solver for linear input or
    None): `dpjax.presets.base_config` and `dpjax.presets.linear_input_solver`."""
    from dpjax import presets

    settings = dict(
        preset=FLAGS.preset, quality=FLAGS.quality, pyramid_levels=FLAGS.pyramid_levels,
        level_iters=level_iters(), num_iters=FLAGS.num_iters, num_layers=FLAGS.num_layers,
        search_init=FLAGS.search_init, defocus_estimator=FLAGS.defocus_estimator,
        defocus_fill=FLAGS.defocus_fill, refine_iters=FLAGS.refine_iters,
        colour_levels=FLAGS.colour_levels, kernel_mass_cut=FLAGS.kernel_mass_cut,
        optimizer=FLAGS.optimizer)
    try:
        return presets.base_config(**settings), presets.linear_input_solver(**settings)
    except ValueError as e:
        raise app.UsageError(f"invalid solver settings: {e}") from None


def input_encoding() -> str:
    """--input_encoding, checked (UsageError with the reason)."""
    from dpjax import encoding

    try:
        encoding.parse_encoding(FLAGS.input_encoding, allow_auto=True)
    except ValueError as e:
        raise app.UsageError(f"--input_encoding: {e}") from None
    return FLAGS.input_encoding


def prior_encoding() -> str:
    """--prior_encoding, checked (UsageError with the reason)."""
    from dpjax import scene

    try:
        scene.check_prior_encoding(FLAGS.prior_encoding)
    except ValueError as e:
        raise app.UsageError(f"--{e}") from None
    return FLAGS.prior_encoding


def path_or_none(value: str | None) -> Path | None:
    return Path(value) if value else None


def use_compilation_cache() -> str | None:
    """Turns on --compilation_cache_dir; returns the folder in use, or None.

    A folder given by name that cannot be used is a UsageError; the default folder
    that cannot be used is a warning, and the run goes on without a cache.
    """
    named = explicit_compilation_cache_dir()
    if named is None and FLAGS.compilation_cache_dir != CACHE_AUTO:
        return None  # off
    from dpjax import batch

    if named is not None:
        try:
            return str(batch.use_compilation_cache(named))
        except ValueError as e:
            raise app.UsageError(f"--compilation_cache_dir: {e}") from None
    folder, why = batch.use_default_compilation_cache()
    if folder is None:
        logging.warning("no persistent compilation cache (%s); give "
                        "--compilation_cache_dir=DIR or --compilation_cache_dir=%s",
                        why, CACHE_OFF)
    return None if folder is None else str(folder)


def explicit_compilation_cache_dir() -> str | None:
    """--compilation_cache_dir when it names a folder (not auto or off), else None."""
    value = FLAGS.compilation_cache_dir
    return None if not value or value in (CACHE_AUTO, CACHE_OFF) else value


def handle_sigterm() -> None:
    """SIGTERM (what schedulers and containers send) is handled like Ctrl-C: the runner
    finishes writing, the summary says terminated, the exit status is 143."""
    def raise_terminated(signum: int, frame: Any) -> None:
        from dpjax.runner import Terminated

        raise Terminated()

    signal.signal(signal.SIGTERM, raise_terminated)
