"""dpjax command line: the demo (no flags), or batch solving of a folder of DP pairs.

  python run_solver.py                      # demo -> ./dpjax_out/demo/
  python run_solver.py --input_dir=IN --output_dir=OUT [--calib_dir=CAL] [--preset=auto]
      [--num_iters=N] [--scenes=a,b] [--overwrite] [--batch_size=B] [--memory_budget_gb=G]
      [--coordinator_address=HOST:PORT --num_processes=N --process_id=K]
  python run_solver.py --input_dir=IN --output_dir=OUT --method=dpanet [--dpanet_checkpoint=C]

The demo renders a synthetic scene with known ground truth (textured layers with
occlusions, 256x320 px, 2x2 kernel tiles) through the parametric kernels stored in
calib_data/parametric_2x2, solves it, and writes all_in_focus.{tif,png},
defocus_map.{tif,png} and result.json (metrics of the estimate and of the input).

Batch mode (see README.md, "Batch solving") finds the DP pairs in --input_dir
(`dpjax.io.discover_pairs`: NNN_left/right.png Pixel, *_L/_R.png Canon, PGM and TIFF
pairs) and writes OUT/<scene>/ in the standard layout, OUT/summary.json and an
OUT/index.html gallery. Complete scenes are skipped unless --overwrite; a bad scene
is one line in the log and the summary, never the end of the batch; the exit status
is 1 when any scene failed, 2 when the batch could not start.

--method=dpanet deblurs each pair with a trained DPANet instead of the MPI solver
(README.md, "DPANet (learned baseline)"): the checkpoint is --dpanet_checkpoint (a
ckpt_<step>.npz or a training output folder; default experiments/checkpoints/dpanet_w8/),
inference runs in overlapping tiles (--dpanet_tile, --dpanet_overlap) and each scene
gets all_in_focus.{tif,png} and result.json, no defocus map. The views are loaded as
for the solver (with --calib_dir, Pixel frames get the same vignetting correction and
central crop, so the two methods' outputs align) but are not cropped to a kernel
grid. The solver flags (presets, schedule, kernel model) do not apply.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import sys
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from absl import app, flags, logging

FLAGS = flags.FLAGS

# dpjax is imported lazily (`_load_dpjax`): importing it initialises the XLA backend
# (dpjax.losses builds a jnp constant at import time), and jax.distributed.initialize
# must run before that happens.
dpjax = batch = io = outputs = pipeline = None


def _load_dpjax() -> None:
    global dpjax, batch, io, outputs, pipeline
    if dpjax is None:
        import dpjax as dpjax_
        from dpjax import batch as batch_
        from dpjax import io as io_
        from dpjax import outputs as outputs_
        from dpjax import pipeline as pipeline_
        dpjax, batch, io, outputs, pipeline = dpjax_, batch_, io_, outputs_, pipeline_


ROOT = Path(__file__).resolve().parent
DEMO_CALIB = ROOT / "calib_data" / "parametric_2x2"
# dpjax.dpanet.DEFAULT_TILE / DEFAULT_OVERLAP, spelled out because the flags are defined
# before dpjax may be imported (tests/test_dpanet_eval.py checks they agree).
DPANET_TILE = 256
DPANET_OVERLAP = 32

SUMMARY_JSON = "summary.json"
INDEX_HTML = "index.html"

# Flags that only make sense with --input_dir.
_BATCH_FLAGS = (
    "calib_dir", "preset", "range_probe", "search_init", "defocus_estimator", "scenes",
    "overwrite", "batch_size",
    "memory_budget_gb", "pyramid_levels", "level_iters", "num_layers", "black_level", "allow_8bit",
    "recenter_kernels", "grid", "tile_size", "kernel_radius", "kernel_ramp", "kernel_smooth",
    "kernel_size", "coordinator_address", "num_processes", "process_id", "distributed",
    "distributed_timeout_s", "thumb_size", "method", "dpanet_checkpoint", "dpanet_tile",
    "dpanet_overlap")
DEFAULT_DPANET_CHECKPOINT = ROOT / "experiments" / "checkpoints" / "dpanet_w8"


def _define_flags() -> None:
    """Flags are defined only when run as a program, so tests can import this module."""
    d = flags
    d.DEFINE_string("output_dir", "dpjax_out", "Where results are written.")
    d.DEFINE_integer("num_iters", None, "Iterations at the finest level (default: the "
                     "demo's / batch schedule's).")
    d.DEFINE_integer("seed", 0, "Seed of the demo scene.")
    d.DEFINE_bool("quiet", False, "No progress bars: only warnings, failures and the final "
                  "summary (for log files).")
    d.DEFINE_string("compilation_cache_dir", None, "Persistent JAX compilation cache "
                    "folder (created if missing): later runs with the same shapes reuse the "
                    "compiled solver instead of compiling it again. Default: none "
                    "(JAX_COMPILATION_CACHE_DIR in the environment also works).")
    # Batch mode.
    d.DEFINE_string("input_dir", None, "Folder of DP pairs to solve (batch mode; without it "
                    "the demo runs).")
    d.DEFINE_string("calib_dir", None, "Calibrated kernels (blur_kernels_{left,right}.npy, "
                    "optional kernels_meta.json and white_sheet_{left,right}.png for Pixel "
                    "vignetting). Without it the parametric kernel model is used.")
    d.DEFINE_enum("preset", "auto", ["auto", "paper", "none"], "Per-scene configuration: "
                  "auto (layer range estimated from each pair), paper (Xin et al.'s per-scene "
                  "Pixel 4 settings), none (the base configuration).")
    d.DEFINE_bool("range_probe", False, "--preset=auto: refine each scene's searched layer "
                  "range with a short coarse-level solve (dpjax.presets.probe_scale_range; "
                  "about +20% solve time).")
    d.DEFINE_bool("search_init", None, "Start each layer's weights near the calibrated "
                  "kernel-symmetry search's defocus map (dpjax.pipeline.init_from_defocus; "
                  "with --preset=auto the range estimate's own search) instead of the paper's "
                  "uniform start. Default: on with --preset=auto, off with paper and none "
                  "(--nosearch_init / --search_init override). Needs --method=mpi.")
    d.DEFINE_enum("defocus_estimator", None, ["mean", "sharpened"], "How the defocus map "
                  "is read off the solved layers: mean (the paper's sum of transmittance x "
                  "scale) or sharpened (transmittances raised to the 8th power; "
                  "dpjax.mpi.defocus_sharpened). Default: sharpened with --preset=auto, mean "
                  "with paper and none.")
    d.DEFINE_list("scenes", None, "Only these scene names (comma-separated).")
    d.DEFINE_bool("overwrite", False, "Re-solve scenes whose outputs are complete.")
    d.DEFINE_enum("method", "mpi", ["mpi", "dpanet"], "mpi: the dpjax MPI solver (defocus "
                  "map and all-in-focus image); dpanet: a trained DPANet (all-in-focus only).")
    d.DEFINE_string("dpanet_checkpoint", None, "--method=dpanet: a ckpt_<step>.npz or a "
                    "training output folder (latest checkpoint); default "
                    "experiments/checkpoints/dpanet_w8/.")
    d.DEFINE_integer("dpanet_tile", DPANET_TILE, "--method=dpanet: tile side in px (a "
                     "multiple of 16); memory grows with its square.")
    d.DEFINE_integer("dpanet_overlap", DPANET_OVERLAP, "--method=dpanet: least tile overlap "
                     "in px (a multiple of 16, below the tile side).")
    d.DEFINE_integer("batch_size", 1, "Solve up to this many same-size scenes together on "
                     "one device: one compiled solve vmapped over them (dpjax.fit_batch; "
                     "README, 'Batch solving').")
    d.DEFINE_float("memory_budget_gb", None, "Refuse scenes whose estimated peak memory "
                   "exceeds this (default: the device's memory; on CPU the host RAM divided "
                   "by the number of local devices).")
    d.DEFINE_integer("pyramid_levels", 3, "Coarse-to-fine levels (tiles must divide by "
                     "2^(levels-1)).")
    d.DEFINE_list("level_iters", None, "Iterations per pyramid level, coarsest first "
                  "(default dpjax.config.FAST_LEVEL_ITERS, 200,120,20, for 3 levels; --num_iters "
                  "sets the last).")
    d.DEFINE_integer("num_layers", None, "MPI layers (default: dpjax.Config's, 12).")
    d.DEFINE_float("black_level", None, "Black level of the raw views (default: Pixel 1024, "
                   "PNG/TIFF 0; required for PGM).")
    d.DEFINE_bool("allow_8bit", False, "Accept 8-bit views (default: 16-bit expected).")
    d.DEFINE_bool("recenter_kernels", True, "Re-centre each tile's calibrated kernel pair "
                  "(dpjax.recenter_kernel_pairs).")
    d.DEFINE_string("grid", None, "Parametric model: kernel tile grid RxC (default: tiles "
                    "of about 256 px).")
    d.DEFINE_integer("tile_size", None, "Parametric model: tile side in px; the image must "
                     "then match the grid (Pixel pairs are centre-cropped to it). Default: "
                     "the largest tiles that fit, centre-cropping a few pixels.")
    d.DEFINE_float("kernel_radius", 8.0, "Parametric model: aperture radius in px at "
                   "scale 1.")
    d.DEFINE_float("kernel_ramp", 0.5, "Parametric model: intensity ramp of the half disc.")
    d.DEFINE_float("kernel_smooth", 0.7, "Parametric model: Gaussian smoothing in px.")
    d.DEFINE_integer("kernel_size", None, "Parametric model: odd kernel side (default: "
                     "just large enough).")
    d.DEFINE_integer("thumb_size", 256, "Longest side of the gallery thumbnails.")
    # Multi-host.
    d.DEFINE_string("coordinator_address", None, "HOST:PORT of process 0 for "
                    "jax.distributed.initialize (multi-host).")
    d.DEFINE_integer("num_processes", None, "Number of processes (multi-host).")
    d.DEFINE_integer("process_id", None, "This process's index (multi-host).")
    d.DEFINE_enum("distributed", "auto", ["auto", "on", "off"], "jax.distributed: on = "
                  "always initialize (missing flags auto-detected by JAX: SLURM, Open MPI, "
                  "Cloud TPU, ...); auto = when the flags above or a known cluster "
                  "environment are present; off = never.")
    d.DEFINE_integer("distributed_timeout_s", 300, "Seconds to wait for all processes.")


# ----------------------------------------------------------------------------------------
# Demo


def demo_config(num_iters: int | None) -> dpjax.Config:
    """One configuration for the demo: 12 layers, coarse-to-fine Adam."""
    cfg = dpjax.Config(
        mpi=dpjax.MpiConfig(num_layers=12, scale_min=0.0, scale_max=1.6),
        solver=dpjax.SolverConfig(num_iters=250, coarse_iters=250, pyramid_levels=2,
                                  chunk_size=50))
    if num_iters is not None:
        cfg = cfg.replace(**{"solver.num_iters": num_iters})
    return cfg


def run_demo() -> int:
    _load_dpjax()
    kernels = np.stack([np.load(DEMO_CALIB / "blur_kernels_left.npy"),
                        np.load(DEMO_CALIB / "blur_kernels_right.npy")])
    bank = dpjax.KernelBank.create(kernels, rows=2, cols=2, tile_h=128, tile_w=160)
    rng = np.random.default_rng(FLAGS.seed)
    scene = dpjax.make_scene(rng, bank, num_layers=4, scale_range=(0.15, 1.45), slope=2.0)
    cfg = demo_config(FLAGS.num_iters)
    out_dir = Path(FLAGS.output_dir) / "demo"

    def progress(p: dpjax.Progress):
        if not FLAGS.quiet:
            logging.info("level %d/%d  step %d/%d  loss %.4g  %.1fs", p.num_levels - p.level,
                         p.num_levels, p.step, p.num_steps, p.loss, p.elapsed_s)

    t0 = time.perf_counter()
    res, result = pipeline.solve_scene(
        scene.views, bank, cfg, out_dir, gt_all_in_focus=scene.all_in_focus,
        gt_defocus=scene.defocus, defocus_confidence=np.ones_like(scene.defocus),
        extra={"scene": "demo", "seed": FLAGS.seed, "scene_scales": scene.scales.tolist(),
               "kernels": str(DEMO_CALIB.relative_to(ROOT))}, callback=progress)
    m, i = result["metrics"], result["input_metrics"]
    from dpjax import figures  # imported here: dpjax loads lazily (_load_dpjax)
    figure = figures.write_figure(
        out_dir / "figure.png", views=scene.views, all_in_focus=np.asarray(res.all_in_focus),
        defocus=np.asarray(res.defocus), gt_all_in_focus=scene.all_in_focus,
        gt_defocus=scene.defocus, title="dpjax demo: a synthetic dual-pixel photo (dpjax sees "
        "only its two views; the truth is shown to compare)",
        notes=[*figures.score_notes(m, i), "", "Flat, textureless areas carry no blur",
               "cue: their defocus is a guess.", "",
               "files: *.tif (float32), *.png, result.json"])
    print(f"demo: {time.perf_counter() - t0:.0f}s  PSNR {i['psnr']:.2f} -> {m['psnr']:.2f} dB  "
          f"SSIM {i['ssim']:.3f} -> {m['ssim']:.3f}  defocus AIWE(1) {m['aiwe1']:.4f}  "
          f"1-|rho_s| {m['spearman']:.4f}  -> {out_dir}/  (look at {figure})")
    return 0


# ----------------------------------------------------------------------------------------
# Batch options and set-up


@dataclasses.dataclass(frozen=True, kw_only=True)
class BatchOptions:
    """Everything a batch run needs (the flags, or a test's arguments)."""

    input_dir: Path
    output_dir: Path
    calib_dir: Path | None = None
    preset: str = "auto"
    range_probe: bool = False
    search_init: bool | None = None  # None: the preset's choice (presets.uses_search_init)
    defocus_estimator: str | None = None  # None: the preset's (presets.defocus_estimator)
    num_iters: int | None = None
    level_iters: tuple[int, ...] | None = None
    pyramid_levels: int = 3
    num_layers: int | None = None
    scenes: tuple[str, ...] | None = None
    overwrite: bool = False
    batch_size: int = 1
    memory_budget_gb: float | None = None
    black_level: float | None = None
    allow_8bit: bool = False
    recenter_kernels: bool = True
    grid: tuple[int, int] | None = None
    tile_size: int | None = None
    kernel_radius: float = 8.0
    kernel_ramp: float = 0.5
    kernel_smooth: float = 0.7
    kernel_size: int | None = None
    thumb_size: int = 256
    quiet: bool = False
    method: str = "mpi"  # or "dpanet"
    dpanet_checkpoint: Path | None = None  # default DEFAULT_DPANET_CHECKPOINT
    dpanet_tile: int = DPANET_TILE
    dpanet_overlap: int = DPANET_OVERLAP


class SetupError(Exception):
    """The batch cannot start (no input, unreadable calibration, bad flag values)."""


class SceneFailure(Exception):
    """A scene that cannot be solved; `kind` names the category in the summary."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


def parse_grid(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    try:
        rows, cols = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise SetupError(f"--grid must be RxC (e.g. 2x3), got {text!r}") from None
    if rows < 1 or cols < 1:
        raise SetupError(f"--grid must have at least one row and column, got {text!r}")
    return rows, cols


def base_config(opts: BatchOptions) -> dpjax.Config:
    """The configuration every scene starts from (the preset then adjusts it)."""
    _load_dpjax()
    levels = opts.pyramid_levels
    solver: dict[str, Any] = {"pyramid_levels": levels}
    level_iters = opts.level_iters
    # Default: the fast coarse-to-fine schedule (--num_iters sets its last level).
    fast = dpjax.config.FAST_LEVEL_ITERS
    if level_iters is None and levels == len(fast):
        level_iters = fast
    if level_iters is not None:
        level_iters = tuple(level_iters)
        if opts.num_iters is not None:
            level_iters = level_iters[:-1] + (opts.num_iters,)
        solver["level_iters"] = level_iters
    elif opts.num_iters is not None:
        solver["num_iters"] = opts.num_iters
    try:
        cfg = dpjax.Config(solver=dpjax.SolverConfig(**solver))
        if opts.num_layers is not None:
            cfg = cfg.replace(**{"mpi.num_layers": opts.num_layers})
        if opts.defocus_estimator is not None:
            cfg = cfg.replace(**{"post.defocus": opts.defocus_estimator})
    except ValueError as e:
        raise SetupError(f"invalid solver settings: {e}") from e
    return cfg


@dataclasses.dataclass(frozen=True)
class KernelSource:
    """Calibrated kernels ([2, T, K, K] numpy and their grid) or the parametric model."""

    kernels: np.ndarray  # [2, T, K, K] (parametric: [2, 1, K, K], repeated per tile)
    grid: tuple[int, int] | None  # None: chosen per image (parametric)
    tile_size: int | None  # None: chosen per image (parametric)
    info: dict[str, Any]
    white_sheets: tuple[Path, Path] | None = None

    @property
    def kernel_size(self) -> int:
        return int(self.kernels.shape[-1])

    @property
    def fixed_shape(self) -> tuple[int, int] | None:
        if self.grid is None or self.tile_size is None:
            return None
        return self.grid[0] * self.tile_size, self.grid[1] * self.tile_size


def kernel_source(opts: BatchOptions, pyramid_factor: int) -> KernelSource:
    """Loads the calibration once, or sets up the parametric model."""
    if opts.calib_dir is not None:
        try:
            calib = io.load_calibration_kernels(opts.calib_dir)
        except (ValueError, OSError) as e:
            raise SetupError(f"calibration {opts.calib_dir}: {e}") from e
        kernels = calib.kernels
        if opts.recenter_kernels:
            kernels = dpjax.recenter_kernel_pairs(kernels)
        whites = (Path(opts.calib_dir) / io.WHITE_LEFT, Path(opts.calib_dir) / io.WHITE_RIGHT)
        have = [p.is_file() for p in whites]
        if any(have) and not all(have):
            logging.warning("calibration %s has only one white sheet: Pixel pairs are not "
                            "corrected for vignetting", opts.calib_dir)
        source = KernelSource(
            kernels=kernels, grid=calib.grid, tile_size=calib.tile_size,
            white_sheets=whites if all(have) else None,
            info={"model": "calibrated", "calib_dir": str(opts.calib_dir),
                  "grid": list(calib.grid), "tile_size": calib.tile_size,
                  "kernel_size": int(kernels.shape[-1]), "recentered": opts.recenter_kernels,
                  "vignetting_white_sheets": all(have)})
    else:
        try:
            pair = dpjax.parametric_dp_kernels(radius=opts.kernel_radius, ramp=opts.kernel_ramp,
                                               smooth_sigma=opts.kernel_smooth,
                                               size=opts.kernel_size)
        except ValueError as e:
            raise SetupError(f"parametric kernel model: {e}") from e
        source = KernelSource(
            kernels=pair[:, None], grid=opts.grid, tile_size=opts.tile_size,
            info={"model": "parametric", "radius": opts.kernel_radius, "ramp": opts.kernel_ramp,
                  "smooth_sigma": opts.kernel_smooth, "kernel_size": int(pair.shape[-1]),
                  "grid": None if opts.grid is None else list(opts.grid),
                  "tile_size": opts.tile_size})
        if opts.tile_size is not None and opts.grid is None:
            raise SetupError("--tile_size needs --grid (RxC)")
    if source.tile_size is not None and source.tile_size % pyramid_factor:
        raise SetupError(f"kernel tiles of {source.tile_size} px do not divide by the pyramid "
                         f"factor {pyramid_factor}; use fewer --pyramid_levels")
    return source


def load_presets():
    """dpjax.presets, or None (with a warning) when that module is not available."""
    try:
        from dpjax import presets
    except ImportError as e:
        logging.warning("dpjax.presets is not available (%s): scenes use the base "
                        "configuration", e)
        return None
    return presets


def memory_budget_bytes(opts: BatchOptions, devices: Sequence[Any]) -> float | None:
    """--memory_budget_gb, else the device's memory limit, else host RAM / devices."""
    if opts.memory_budget_gb is not None:
        return opts.memory_budget_gb * 1e9
    try:
        stats = devices[0].memory_stats()
    except Exception:  # noqa: BLE001 - not every backend implements memory_stats
        stats = None
    if stats and stats.get("bytes_limit"):
        return float(stats["bytes_limit"])
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None
    return float(ram) / max(1, len(devices))


# ----------------------------------------------------------------------------------------
# One scene


@dataclasses.dataclass
class Context:
    """Shared, read-only state of a batch run (plus the progress display)."""

    opts: BatchOptions
    source: KernelSource
    base: dpjax.Config
    presets: Any
    budget: float | None
    display: Display
    process_index: int = 0
    dpanet: Any = None  # --method=dpanet: dpjax.dpanet.LoadedCheckpoint



def load_views(ctx: Context, pair: io.ScenePair) -> tuple[np.ndarray, dict[str, Any]]:
    """Views [2, H, W, C] cropped to a kernel grid, and what was done to them."""
    opts, src = ctx.opts, ctx.source
    fixed = src.fixed_shape
    whites = {}
    pre = io.Pixel4Preprocess(crop_hw=fixed)  # Pixel: the calibration's central crop
    if pair.format == "pixel" and src.white_sheets is not None:
        whites = {"white_left": src.white_sheets[0], "white_right": src.white_sheets[1]}
    views = io.load_pair(pair, black_level=opts.black_level, expect_16bit=not opts.allow_8bit,
                         pixel_preprocess=pre, **whites)
    info: dict[str, Any] = {"loaded_shape": list(views.shape), "vignetting": bool(whites)}
    h, w = views.shape[1:3]
    if fixed is not None:
        if h < fixed[0] or w < fixed[1]:
            raise io.InputError(f"{pair.left}: image {h}x{w} is smaller than the kernel grid "
                                f"({src.grid[0]}x{src.grid[1]} tiles of {src.tile_size} px "
                                f"= {fixed[0]}x{fixed[1]})")
        try:
            io.check_kernels_match_image(
                io.CalibratedKernels(src.kernels, src.grid, src.tile_size), h, w)
        except ValueError as e:
            raise SceneFailure("calibration", f"{pair.left}: {e}") from e
        info["crop"] = None
    elif opts.method == "dpanet":  # no kernel grid to fit: the whole frame
        info["crop"] = None
    else:
        factor = 2 ** (ctx.base.solver.pyramid_levels - 1)
        grid = src.grid or batch.auto_grid(h, w)
        min_tile = -(-src.kernel_size // factor) * factor
        try:
            tg, (y0, x0) = batch.fit_tiles(h, w, grid, factor, min_tile)
        except ValueError as e:
            raise io.InputError(f"{pair.left}: {e}") from e
        ch, cw = tg.image_shape
        if (ch, cw) != (h, w):
            views = views[:, y0:y0 + ch, x0:x0 + cw]
            views = views / views.max() if views.max() > 0 else views
        info["crop"] = [y0, x0, ch, cw]
        info["tile_grid"] = [tg.rows, tg.cols, tg.tile_h, tg.tile_w]
    return np.ascontiguousarray(views, np.float32), info


def make_bank(ctx: Context, views: np.ndarray, info: dict[str, Any]) -> dpjax.KernelBank:
    """The kernel bank covering the views (call inside the scene's device context)."""
    src = ctx.source
    if src.fixed_shape is not None:
        rows, cols = src.grid
        kernels = src.kernels
        if kernels.shape[1] == 1:
            kernels = np.repeat(kernels, rows * cols, axis=1)
        return dpjax.KernelBank.create(kernels, rows=rows, cols=cols, tile_h=src.tile_size)
    rows, cols, th, tw = info["tile_grid"]
    kernels = np.repeat(src.kernels[:, :1], rows * cols, axis=1)
    return dpjax.KernelBank.create(kernels, rows=rows, cols=cols, tile_h=th, tile_w=tw)


def load_ground_truth(ctx: Context, name: str, shape: tuple[int, int],
                      info: dict[str, Any]) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Optional Pixel-4-layout ground truth (IN/gt_*/NAME_gt.png), cropped like the views."""
    out = []
    for sub in ("gt_all_in_focus_im", "gt_defocus_map"):
        path = Path(ctx.opts.input_dir) / sub / f"{name}_gt.png"
        if not path.is_file():
            out.append(None)
            continue
        try:
            arr, _ = io.read_image(path)
        except io.InputError as e:
            info.setdefault("warnings", []).append(f"ground truth ignored: {e}")
            out.append(None)
            continue
        arr = arr.astype(np.float32)
        crop = info.get("crop")
        if crop is not None and arr.shape[:2] == tuple(info["loaded_shape"][1:3]):
            y0, x0, ch, cw = crop
            arr = arr[y0:y0 + ch, x0:x0 + cw]
        if arr.shape[:2] != shape:
            info.setdefault("warnings", []).append(
                f"ground truth {path} is {arr.shape[0]}x{arr.shape[1]}, the views are "
                f"{shape[0]}x{shape[1]}: not scored")
            out.append(None)
            continue
        out.append(arr)
    return out[0], out[1]


def scene_config(ctx: Context, name: str, views: np.ndarray, bank: dpjax.KernelBank,
                 search=None) -> tuple[dpjax.Config, dict[str, Any]]:
    """The preset's configuration for one scene, and how it was chosen.

    search: the scene's dpjax.presets.SearchMap when already run (--search_init), reused
    by the auto preset's range estimate.
    """
    t0 = time.perf_counter()
    preset = ctx.opts.preset
    info: dict[str, Any] = {"name": preset}
    if preset == "none" or ctx.presets is None:
        cfg = ctx.base
        if preset != "none":
            info["note"] = "dpjax.presets unavailable: base configuration"
    elif preset == "paper":
        try:
            cfg = ctx.presets.paper_config(name, ctx.base)
        except ValueError as e:
            raise SceneFailure("config", str(e)) from e
    else:
        est = ctx.presets.estimate_auto_range(views, bank, ctx.base, probe=ctx.opts.range_probe,
                                              search=search)
        cfg = ctx.presets.auto_config_from_estimate(est, ctx.base)
        info["range_estimate"] = est._asdict()
    info["scale_range"] = [cfg.mpi.scale_min, cfg.mpi.scale_max]
    info["seconds"] = time.perf_counter() - t0
    return cfg, info


def _write_thumb(path: Path, display: np.ndarray, size: int) -> None:
    if display.ndim == 3 and display.shape[-1] == 1:
        display = display[..., 0]
    outputs.write_png(path, batch.thumbnail(display, size))


def ensure_thumbnails(out_dir: Path, size: int) -> None:
    """Gallery thumbnails of a complete scene from its PNGs, where missing."""
    from PIL import Image

    for key, full in (("all_in_focus", outputs.AIF_PNG), ("defocus", outputs.DEFOCUS_PNG)):
        thumb, src = out_dir / batch.THUMBS[key], out_dir / full
        if thumb.is_file() or not src.is_file():
            continue
        try:
            with Image.open(src) as im:
                a = np.asarray(im.convert("L" if im.mode in ("L", "I;16", "I") else "RGB"))
        except OSError:
            continue
        _write_thumb(thumb, a, size)


def skipped_record(name: str, out_dir: Path) -> dict[str, Any]:
    """The record of a complete scene, with the numbers of its result.json."""
    rec: dict[str, Any] = {"scene": name, "status": "skipped",
                           "reason": "outputs complete (use --overwrite to redo)"}
    try:
        result = json.loads((out_dir / outputs.RESULT_JSON).read_text())
    except (OSError, ValueError):
        return rec
    for key in ("metrics", "input_metrics", "final_loss", "iterations", "format"):
        if key in result:
            rec[key] = result[key]
    if "preset" in result and isinstance(result["preset"], dict):
        rec["scale_range"] = result["preset"].get("scale_range")
    wall = (result.get("timings") or {}).get("wall_s")
    if wall is not None:
        rec["timings"] = {"previous_solve_s": wall}
    return rec


@dataclasses.dataclass
class PreparedScene:
    """A scene loaded, configured and checked, ready to solve alone or in a batch.

    `rec` and `timings` are the scene's summary record and timings, filled in as it goes.
    """

    name: str
    views: np.ndarray  # [2, H, W, C]
    info: dict[str, Any]  # preprocessing
    bank: Any  # dpjax.KernelBank
    cfg: Any  # dpjax.Config
    gt_aif: np.ndarray | None
    gt_def: np.ndarray | None
    extra: dict[str, Any]  # result.json fields
    memory: Any  # dpjax.batch.MemoryEstimate
    rec: dict[str, Any]
    timings: dict[str, float]
    t_start: float
    init: Any = None  # dpjax.mpi.MpiParams (--search_init) or None


def _scene_record(ctx: Context, name: str, pair: io.ScenePair, device,
                  group: int) -> dict[str, Any]:
    rec: dict[str, Any] = {"scene": name, "format": pair.format,
                           "inputs": [str(p) if p else None for p in (pair.left, pair.right)],
                           "process": ctx.process_index, "device": str(device)}
    if ctx.opts.batch_size > 1:
        rec["group"] = group
    return rec


def _scene_eta(ctx: Context) -> batch.SceneEta:
    solver = ctx.base.solver
    return batch.SceneEta(tuple(solver.budget(lv) for lv in reversed(range(solver.pyramid_levels))))


def _record_failure(rec: dict[str, Any], e: Exception) -> None:
    kind = _failure_kind(e)
    rec.update(status="failed", error=kind, reason=f"{kind}: {e}")
    if kind == "error":
        rec["traceback"] = traceback.format_exc(limit=6)


def prepare_scene(ctx: Context, name: str, pair: io.ScenePair, device, rec: dict[str, Any],
                  timings: dict[str, float], t_start: float) -> PreparedScene:
    """Loads the views, makes the kernel bank and configuration, checks the memory
    estimate and reads the ground truth; raises for a bad scene."""
    import jax

    t0 = time.perf_counter()
    views, info = load_views(ctx, pair)
    timings["load_s"] = time.perf_counter() - t0
    rec["shape"] = list(views.shape)
    search_s, search = 0.0, None
    with jax.default_device(device):
        bank = make_bank(ctx, views, info)
        if ctx.opts.search_init:
            if ctx.presets is None:
                raise SceneFailure("config", "--search_init needs dpjax.presets")
            t0 = time.perf_counter()
            search = ctx.presets.search_defocus(views, bank)
            search_s = time.perf_counter() - t0
        cfg, preset_info = scene_config(ctx, name, views, bank, search)
    timings["preset_s"] = preset_info["seconds"]
    init, search_info = None, None
    if search is not None:
        t0 = time.perf_counter()
        init, search_info = pipeline.init_from_search(views.mean(axis=0), search, cfg)
        timings["search_init_s"] = search_s + time.perf_counter() - t0
        search_info.update(search_s=search_s, seconds=timings["search_init_s"])
    rec["scale_range"] = preset_info["scale_range"]
    est = batch.estimate_solve_memory(
        height=views.shape[1], width=views.shape[2], channels=views.shape[3],
        num_layers=cfg.mpi.num_layers, grid=bank.grid, kernel_size=bank.kernel_size,
        max_abs_scale=float(np.max(np.abs(cfg.mpi.scales()))),
        conv_method=cfg.solver.conv_method, round_fft=cfg.solver.round_fft)
    rec["memory_estimate_gb"] = round(est.gb, 3)
    refusal = batch.memory_refusal(est, ctx.budget)
    if refusal is not None:
        raise SceneFailure("memory", refusal)
    gt_aif, gt_def = load_ground_truth(ctx, name, views.shape[1:3], info)
    extra = {"scene": name, "format": pair.format, "inputs": rec["inputs"],
             "preprocessing": info, "kernels": ctx.source.info, "preset": preset_info,
             "memory_estimate_gb": rec["memory_estimate_gb"],
             "assigned_device": str(device), "process": ctx.process_index}
    if search_info is not None:
        extra["search_init"] = search_info
    return PreparedScene(name=name, views=views, info=info, bank=bank, cfg=cfg, gt_aif=gt_aif,
                         gt_def=gt_def, extra=extra, memory=est, rec=rec, timings=timings,
                         t_start=t_start, init=init)


def _record_done(ctx: Context, prep: PreparedScene, res, result: dict[str, Any]) -> None:
    """Thumbnails of a solved and written scene, and its summary record."""
    out_dir = Path(ctx.opts.output_dir) / prep.name
    size = ctx.opts.thumb_size
    t0 = time.perf_counter()
    _write_thumb(out_dir / batch.THUMBS["input"], outputs.to_display(prep.views.mean(axis=0)),
                 size)
    _write_thumb(out_dir / batch.THUMBS["all_in_focus"], outputs.to_display(res.all_in_focus),
                 size)
    _write_thumb(out_dir / batch.THUMBS["defocus"], outputs.defocus_png(res.defocus), size)
    prep.timings["thumbnails_s"] = time.perf_counter() - t0
    rec = prep.rec
    rec.update(status="done", iterations=result["iterations"],
               final_loss=result["final_loss"], solver_timings=result["timings"])
    for key in ("metrics", "input_metrics", "batch"):
        if key in result:
            rec[key] = result[key]
    if prep.info.get("warnings"):
        rec["warnings"] = prep.info["warnings"]
        for w in prep.info["warnings"]:
            ctx.display.log(logging.WARNING, "%s: %s", prep.name, w)


def _close_record(prep_or_rec, timings: dict[str, float], t_start: float) -> dict[str, Any]:
    rec = prep_or_rec.rec if isinstance(prep_or_rec, PreparedScene) else prep_or_rec
    if "batch_solve_s" in timings:  # its own steps and its share of the batch (for the ETA)
        timings["total_s"] = sum(v for k, v in timings.items() if k != "batch_solve_s")
    else:
        timings["total_s"] = time.perf_counter() - t_start
    rec["timings"] = timings
    return rec


def _solve_alone(ctx: Context, prep: PreparedScene, device,
                 extra: dict[str, Any] | None = None) -> None:
    """Solves a prepared scene with dpjax.fit and writes it; raises for a bad scene."""
    import jax

    eta = _scene_eta(ctx)
    seen_devices: set[str] = set()

    def progress(p: dpjax.Progress):
        eta.update(level=p.level, step=p.step, num_steps=p.num_steps, loss=p.loss,
                   elapsed_s=p.elapsed_s)
        if p.params is not None and not seen_devices:
            seen_devices.update(str(d) for d in p.params.color_logits.devices())
        ctx.display.scene(prep.name, eta)

    out_dir = Path(ctx.opts.output_dir) / prep.name
    with jax.default_device(device):
        t0 = time.perf_counter()
        res, result = pipeline.solve_scene(
            prep.views, prep.bank, prep.cfg, out_dir, gt_all_in_focus=prep.gt_aif,
            gt_defocus=prep.gt_def, extra={**prep.extra, **(extra or {})}, callback=progress,
            init=prep.init)
        prep.timings["solve_s"] = time.perf_counter() - t0
    _record_done(ctx, prep, res, result)
    if seen_devices:
        prep.rec["device"] = ",".join(sorted(seen_devices))


def solve_one(ctx: Context, name: str, pair: io.ScenePair, device, group: int) -> dict[str, Any]:
    """Loads, configures, checks and solves one scene; never raises for a bad scene."""
    if ctx.opts.method == "dpanet":
        return deblur_one(ctx, name, pair, device, group)
    rec = _scene_record(ctx, name, pair, device, group)
    timings: dict[str, float] = {}
    t_start = time.perf_counter()
    try:
        _solve_alone(ctx, prepare_scene(ctx, name, pair, device, rec, timings, t_start), device)
    except KeyboardInterrupt:
        raise
    except Exception as e:  # noqa: BLE001 - a bad scene must not end the batch
        _record_failure(rec, e)
    return _close_record(rec, timings, t_start)


def _split_batches(ctx: Context, preps: Sequence[PreparedScene]) -> list[list[PreparedScene]]:
    """Prepared scenes in batches that dpjax.fit_batch can solve together.

    Same shapes, kernel geometry and `dpjax.solver.batch_key` (the paper preset's
    per-scene loss weights split a group), and a summed memory estimate (one overhead,
    every scene's arrays) within the budget. Order is kept within each batch.
    """
    by_key: dict[Any, list[PreparedScene]] = {}
    for p in preps:
        key = (p.views.shape, p.bank.grid, p.bank.kernel_size, dpjax.solver.batch_key(p.cfg))
        by_key.setdefault(key, []).append(p)
    batches: list[list[PreparedScene]] = []
    for same in by_key.values():
        current: list[PreparedScene] = []
        need = 0.0
        for p in same:
            overhead = p.memory.parts.get("overhead", 0.0)
            arrays = p.memory.total - overhead
            if current and ctx.budget is not None and need + arrays > ctx.budget:
                batches.append(current)
                current = []
            if not current:
                need = overhead  # each scene alone fits (prepare_scene checked it)
            current.append(p)
            need += arrays
        batches.append(current)
    return batches


def _solve_batch(ctx: Context, preps: list[PreparedScene], device) -> None:
    """Solves prepared scenes with dpjax.fit_batch and writes each one as solve_one would
    (result.json gains "batch"); when the batched solve fails (a scene diverges, out of
    memory), solves them one by one so that only a bad scene fails."""
    import jax

    names = [p.name for p in preps]
    etas = [_scene_eta(ctx) for _ in preps]

    def progress(reports: tuple[dpjax.Progress, ...]):
        for p, prep, eta in zip(reports, preps, etas):
            eta.update(level=p.level, step=p.step, num_steps=p.num_steps, loss=p.loss,
                       elapsed_s=p.elapsed_s)
            ctx.display.scene(prep.name, eta)

    t0 = time.perf_counter()
    try:
        with jax.default_device(device):
            results = dpjax.fit_batch([p.views for p in preps], [p.bank for p in preps],
                                      [p.cfg for p in preps], callback=progress,
                                      inits=[p.init for p in preps])
    except KeyboardInterrupt:
        raise
    except Exception as e:  # noqa: BLE001 - fall back to scene by scene
        ctx.display.log(logging.WARNING, "batch %s failed (%s: %s): solving its scenes one "
                        "by one", ",".join(names), type(e).__name__, e)
        for prep in preps:
            try:
                _solve_alone(ctx, prep, device, extra={"batch_fallback": f"{e}"})
            except KeyboardInterrupt:
                raise
            except Exception as e1:  # noqa: BLE001 - a bad scene must not end the batch
                _record_failure(prep.rec, e1)
        return
    solve_s = time.perf_counter() - t0
    for i, (prep, res) in enumerate(zip(preps, results)):
        prep.timings["solve_s"] = solve_s / len(preps)  # this scene's share
        prep.timings["batch_solve_s"] = solve_s
        info = {"size": len(preps), "index": i, "scenes": names}
        try:
            result = pipeline.write_scene(
                res, prep.views, prep.cfg, Path(ctx.opts.output_dir) / prep.name,
                wall_s=solve_s, gt_all_in_focus=prep.gt_aif, gt_defocus=prep.gt_def,
                extra={**prep.extra, "batch": info})
            _record_done(ctx, prep, res, result)
            prep.rec["device"] = result["device"]
        except KeyboardInterrupt:
            raise
        except Exception as e:  # noqa: BLE001 - a bad scene must not end the batch
            _record_failure(prep.rec, e)


def solve_group(ctx: Context, names: Sequence[str], pairs: dict[str, io.ScenePair], device,
                group: int) -> list[dict[str, Any]]:
    """--batch_size > 1: solves a group of same-size scenes together (dpjax.fit_batch).

    Each scene is loaded, configured and checked alone, so a bad one fails alone; the
    others are solved in batches (`_split_batches`), a scene left alone with dpjax.fit.
    Never raises for a bad scene; returns the records in the order of `names`.
    """
    recs: dict[str, dict[str, Any]] = {}
    ready: list[PreparedScene] = []
    for name in names:
        rec = _scene_record(ctx, name, pairs[name], device, group)
        recs[name] = rec
        timings: dict[str, float] = {}
        t_start = time.perf_counter()
        try:
            ready.append(prepare_scene(ctx, name, pairs[name], device, rec, timings, t_start))
        except KeyboardInterrupt:
            raise
        except Exception as e:  # noqa: BLE001 - a bad scene must not end the batch
            _record_failure(rec, e)
            _close_record(rec, timings, t_start)
    for preps in _split_batches(ctx, ready):
        if len(preps) == 1:
            try:
                _solve_alone(ctx, preps[0], device)
            except KeyboardInterrupt:
                raise
            except Exception as e:  # noqa: BLE001 - a bad scene must not end the batch
                _record_failure(preps[0].rec, e)
        else:
            _solve_batch(ctx, preps, device)
        for p in preps:
            _close_record(p, p.timings, p.t_start)
    return [recs[n] for n in names]


def load_dpanet(opts: BatchOptions) -> dpanet.LoadedCheckpoint:  # noqa: F821 - lazy import
    """The DPANet of --dpanet_checkpoint; SetupError with a clear message otherwise."""
    from dpjax import dpanet

    path = Path(opts.dpanet_checkpoint or DEFAULT_DPANET_CHECKPOINT)
    if opts.dpanet_checkpoint is None and not path.exists():
        raise SetupError(
            f"--method=dpanet needs a trained checkpoint and the default {path} does not "
            "exist: train one (README, 'DPANet (learned baseline)': experiments/"
            "train_dpanet.py --output_dir=DIR) and pass --dpanet_checkpoint=DIR")
    try:
        dpanet.inference.check_tiling(opts.dpanet_tile, opts.dpanet_overlap)
        return dpanet.load_checkpoint(path)
    except ValueError as e:  # CheckpointError included
        raise SetupError(f"--method=dpanet: {e}") from e


def _other_method(out_dir: Path, method: str) -> str | None:
    """The method of a complete result in out_dir when it is not `method` (MPI: "mpi")."""
    if not outputs.is_complete(out_dir):
        return None
    try:
        found = json.loads((out_dir / outputs.RESULT_JSON).read_text()).get("method", "mpi")
    except (OSError, ValueError, AttributeError):
        return None
    return None if found == method else str(found)


def deblur_one(ctx: Context, name: str, pair: io.ScenePair, device, group: int) -> dict[str, Any]:
    """--method=dpanet: loads and deblurs one scene; never raises for a bad scene."""
    import jax

    from dpjax import dpanet

    opts, model = ctx.opts, ctx.dpanet
    out_dir = Path(opts.output_dir) / name
    rec: dict[str, Any] = {"scene": name, "format": pair.format, "method": "dpanet",
                           "inputs": [str(p) if p else None for p in (pair.left, pair.right)],
                           "process": ctx.process_index, "device": str(device)}
    if opts.batch_size > 1:
        rec["group"] = group
    timings: dict[str, float] = {}
    t_start = time.perf_counter()
    try:
        t0 = time.perf_counter()
        views, info = load_views(ctx, pair)
        timings["load_s"] = time.perf_counter() - t0
        rec["shape"] = list(views.shape)
        if views.shape[-1] != model.config.channels:
            raise SceneFailure("input", f"{pair.left}: {views.shape[-1]}-channel views, the "
                               f"DPANet checkpoint takes {model.config.channels}")
        gt_aif, _ = load_ground_truth(ctx, name, views.shape[1:3], info)
        t0 = time.perf_counter()
        with jax.default_device(device):
            params = jax.device_put(model.params, device)
            aif = dpanet.deblur_tiled(params, model.config, views, tile=opts.dpanet_tile,
                                      overlap=opts.dpanet_overlap)
        timings["deblur_s"] = time.perf_counter() - t0
        result: dict[str, Any] = {
            "scene": name, "method": "dpanet", "format": pair.format, "inputs": rec["inputs"],
            "preprocessing": info,
            "dpanet": {"checkpoint": str(model.npz), "step": model.step,
                       "model_config": model.config.to_dict(), "tile": opts.dpanet_tile,
                       "overlap": opts.dpanet_overlap},
            "timings": {"wall_s": timings["deblur_s"]}, "jax_version": jax.__version__,
            "device": str(device), "process": ctx.process_index}
        if gt_aif is not None:
            m = pipeline.score(aif, None, gt_all_in_focus=gt_aif)
            inp = pipeline.score(views.mean(axis=0), None, gt_all_in_focus=gt_aif)
            result["metrics"] = {k: m[k] for k in ("psnr", "ssim", "mae")}
            result["input_metrics"] = {k: inp[k] for k in ("psnr", "ssim", "mae")}
            rec["metrics"], rec["input_metrics"] = result["metrics"], result["input_metrics"]
        outputs.write_result(out_dir, all_in_focus=aif, defocus=None, result=result)
        t0 = time.perf_counter()
        _write_thumb(out_dir / batch.THUMBS["input"], outputs.to_display(views.mean(axis=0)),
                     opts.thumb_size)
        _write_thumb(out_dir / batch.THUMBS["all_in_focus"], outputs.to_display(aif),
                     opts.thumb_size)
        timings["thumbnails_s"] = time.perf_counter() - t0
        rec["status"] = "done"
        for w in info.get("warnings", []):
            rec.setdefault("warnings", []).append(w)
            ctx.display.log(logging.WARNING, "%s: %s", name, w)
    except KeyboardInterrupt:
        raise
    except Exception as e:  # noqa: BLE001 - a bad scene must not end the batch
        kind = _failure_kind(e)
        rec.update(status="failed", error=kind, reason=f"{kind}: {e}")
        if kind == "error":
            rec["traceback"] = traceback.format_exc(limit=6)
    timings["total_s"] = time.perf_counter() - t_start
    rec["timings"] = timings
    return rec


def _failure_kind(e: BaseException) -> str:
    if isinstance(e, SceneFailure):
        return e.kind
    if isinstance(e, io.InputError):
        return "input"
    if isinstance(e, FloatingPointError):
        return "solver diverged"
    if isinstance(e, (ValueError, MemoryError)):
        return "invalid" if isinstance(e, ValueError) else "memory"
    return "error"


# ----------------------------------------------------------------------------------------
# Progress display


class Display:
    """Progress bars on stderr (rewritten in place on a terminal, else logged lines)."""

    def __init__(self, quiet: bool, total: int, workers: int, stream=None):
        self.quiet = quiet
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.batch = batch.BatchEta(total=total, workers=workers)
        self.active: dict[str, str] = {}
        self.lock = threading.RLock()
        self._drawn = False

    def _clear(self):
        if self._drawn:
            self.stream.write("\r\033[K")
            self.stream.flush()
            self._drawn = False

    def _draw(self):
        if self.quiet or not self.tty:
            return
        cols = shutil.get_terminal_size((160, 24)).columns - 1
        line = " | ".join(list(self.active.values()) + [batch.format_batch_progress(self.batch)])
        self.stream.write("\r\033[K" + line[-cols:])  # the overall bar (last) stays visible
        self.stream.flush()
        self._drawn = True

    def scene(self, name: str, eta: batch.SceneEta) -> None:
        if self.quiet:
            return
        with self.lock:
            self.active[name] = batch.format_scene_progress(name, eta)
            if self.tty:
                self._draw()
            else:
                logging.info("%s  %s", self.active[name], batch.format_batch_progress(self.batch))

    def log(self, level: int, fmt: str, *args) -> None:
        with self.lock:
            self._clear()
            logging.log(level, fmt, *args)
            self._draw()

    def finished(self, rec: dict[str, Any]) -> None:
        with self.lock:
            self.active.pop(rec["scene"], None)
            self.batch.record(rec["status"], (rec.get("timings") or {}).get("total_s"))
            status = rec["status"]
            if status == "failed":
                self.log(logging.ERROR, "%s: FAILED %s", rec["scene"], rec["reason"])
            elif status == "skipped":
                self.log(logging.INFO, "%s: skipped, %s", rec["scene"], rec["reason"])
            else:
                loss = rec.get("final_loss")
                self.log(logging.INFO, "%s: done in %s (loss %.5g)  %s", rec["scene"],
                         batch.format_duration(rec["timings"]["total_s"]),
                         float("nan") if loss is None else loss,
                         batch.format_batch_progress(self.batch))

    def close(self) -> None:
        with self.lock:
            self._clear()


# ----------------------------------------------------------------------------------------
# The batch


Gather = Callable[[Any], list[Any]]


def _scene_list_digest(names: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(names).encode()).hexdigest()[:16]


def _probe_key(pair: io.ScenePair):
    """(format, raw size) of a pair for grouping, or None when it cannot be read."""
    if pair.left is None or pair.right is None:
        return None
    try:
        return pair.format, io.read_image(pair.left)[0].shape
    except (io.InputError, OSError):
        return None


def write_reports(out_dir: Path, summary: dict[str, Any]) -> None:
    """summary.json and the index.html gallery (both atomic)."""
    outputs.write_json(out_dir / SUMMARY_JSON, summary)
    existing = {f"{r['scene']}/{t}" for r in summary["scenes"] for t in batch.THUMBS.values()
                if (out_dir / r["scene"] / t).is_file()}
    page = batch.gallery_html(summary, existing)
    outputs.atomic_write_bytes(out_dir / INDEX_HTML, page.encode("utf-8"))


def run_batch(opts: BatchOptions, *, devices: Sequence[Any] | None = None,
              process_index: int = 0, process_count: int = 1,
              gather: Gather | None = None) -> int:
    """Solves this process's share of the scenes in opts.input_dir; returns the exit status.

    Args:
      devices: local devices to spread scenes over (default jax.local_devices()).
      process_index, process_count: this process's place among the batch's processes.
      gather: with several processes, a collective that returns every process's
        value (in process order); called the same number of times by all processes.
    """
    import jax

    _load_dpjax()
    t_start = time.perf_counter()
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    out_root = Path(opts.output_dir)
    devices = list(devices) if devices is not None else jax.local_devices()
    try:
        pairs = {p.name: p for p in io.discover_pairs(opts.input_dir)}
        if not pairs:
            raise SetupError(f"no DP pairs found in {opts.input_dir} (expected NAME_left/"
                             "NAME_right .png/.pgm/.tif or NAME_L/NAME_R .png)")
        if opts.search_init and opts.method != "mpi":
            raise SetupError("--search_init needs --method=mpi (DPANet has no layers to "
                             "initialise)")
        if opts.method == "mpi":  # unset flags take the preset's choice
            from dpjax.presets import defocus_estimator, uses_search_init
            opts = dataclasses.replace(
                opts, search_init=uses_search_init(opts.preset, opts.search_init),
                defocus_estimator=defocus_estimator(opts.preset, opts.defocus_estimator))
        else:
            opts = dataclasses.replace(opts, search_init=False)
        base = base_config(opts)
        factor = 2 ** (base.solver.pyramid_levels - 1)
        source = kernel_source(opts, factor)
        if opts.batch_size < 1:
            raise SetupError("--batch_size must be >= 1")
        if opts.method not in ("mpi", "dpanet"):
            raise SetupError(f"--method must be mpi or dpanet, got {opts.method!r}")
        model = load_dpanet(opts) if opts.method == "dpanet" else None
    except (SetupError, io.InputError) as e:
        logging.error("batch cannot start: %s", e)
        return 2

    names = sorted(pairs)
    missing: list[str] = []
    if opts.scenes:
        missing = sorted(set(opts.scenes) - set(pairs))
        names = sorted(set(opts.scenes))
    if gather is not None:
        digests = gather(_scene_list_digest(names))
        if len(set(digests)) != 1:
            logging.error("the processes found different scene lists (is --input_dir the "
                          "same shared folder on every host?)")
            return 2
    share = batch.shard_scenes(names, process_index, process_count)
    if source.info["model"] == "parametric":
        logging.info("no --calib_dir: using the parametric DP kernel model (radius %.3g px, "
                     "ramp %.3g, smoothing %.3g px, %d px kernels); set --kernel_radius etc. "
                     "to match your camera", opts.kernel_radius, opts.kernel_ramp,
                     opts.kernel_smooth, source.kernel_size)
    presets = load_presets() if opts.preset != "none" or opts.search_init else None
    budget = memory_budget_bytes(opts, devices)
    display = Display(opts.quiet, total=len(share), workers=len(devices))
    ctx = Context(opts=opts, source=source, base=base, presets=presets, budget=budget,
                  display=display, process_index=process_index, dpanet=model)
    logging.info("process %d/%d: %d of %d scenes on %d device(s): %s", process_index + 1,
                 process_count, len(share), len(names), len(devices),
                 ", ".join(str(d) for d in devices))

    meta = {"input_dir": str(opts.input_dir), "output_dir": str(out_root), "method": opts.method,
            "kernels": source.info, "preset": opts.preset, "search_init": opts.search_init,
            "defocus_estimator": opts.defocus_estimator,
            "base_config": dpjax.config.to_dict(base), "process_count": process_count,
            "devices_per_process": len(devices), "batch_size": opts.batch_size,
            "memory_budget_gb": None if budget is None else round(budget / 1e9, 3),
            "started": started}
    share_path = out_root / (SUMMARY_JSON if process_count == 1 else
                             f"summary.process-{process_index}-of-{process_count}.json")
    records: dict[str, dict[str, Any]] = {}
    lock = threading.Lock()

    def save_share(state: str) -> dict[str, Any]:
        with lock:
            recs = list(records.values())
        extra = {"process_index": process_index} if process_count > 1 else {}
        summary = batch.summarize(recs, **meta, **extra, state=state,
                                  wall_s=time.perf_counter() - t_start)
        outputs.write_json(share_path, summary)
        return summary

    def finish(rec: dict[str, Any]) -> None:
        with lock:
            records[rec["scene"]] = rec
        display.finished(rec)
        save_share("running")

    out_root.mkdir(parents=True, exist_ok=True)
    todo: list[str] = []
    for name in share:
        if name in missing:
            finish({"scene": name, "status": "failed", "error": "input",
                    "reason": f"input: scene {name!r} (from --scenes) not found in "
                              f"{opts.input_dir}"})
        elif not opts.overwrite and (other := _other_method(out_root / name, opts.method)):
            finish({"scene": name, "status": "failed", "error": "output",
                    "reason": f"output: {out_root / name} holds a complete --method={other} "
                              "result; use another --output_dir (or --overwrite)"})
        elif not opts.overwrite and outputs.is_complete(out_root / name):
            ensure_thumbnails(out_root / name, opts.thumb_size)
            finish(skipped_record(name, out_root / name))
        else:
            todo.append(name)

    keys = ({n: _probe_key(pairs[n]) for n in todo} if opts.batch_size > 1 else {})
    groups = batch.group_by_shape(todo, keys, opts.batch_size)
    per_device: dict[int, list[tuple[int, list[str]]]] = {i: [] for i in range(len(devices))}
    slots = list(range(len(devices)))  # by position: a list may repeat a device
    for gi, (group, slot) in enumerate(batch.assign_round_robin(groups, slots)):
        per_device[slot].append((gi, group))

    def worker(dev_index: int) -> None:
        for gi, group in per_device[dev_index]:
            if len(group) > 1 and opts.method == "mpi":  # solved together (dpjax.fit_batch)
                for rec in solve_group(ctx, group, pairs, devices[dev_index], gi):
                    finish(rec)
                continue
            for name in group:
                finish(solve_one(ctx, name, pairs[name], devices[dev_index], gi))

    state = "complete"
    try:
        if len(devices) == 1:
            worker(0)
        else:
            threads = [threading.Thread(target=worker, args=(i,), daemon=True,
                                        name=f"dpjax-{devices[i]}") for i in per_device]
            for t in threads:
                t.start()
            for t in threads:
                while t.is_alive():
                    t.join(timeout=0.5)
    except KeyboardInterrupt:
        state = "interrupted"
        with lock:
            for name in share:
                records.setdefault(name, {"scene": name, "status": "not run",
                                          "reason": "interrupted before this scene finished"})
        display.log(logging.ERROR, "interrupted: completed scenes are kept; run again to resume")
    display.close()
    share_summary = save_share(state)

    if gather is not None:
        shares = gather(share_summary)
        summary = batch.merge_shares(shares, **meta, state=state,
                                     wall_s=time.perf_counter() - t_start)
    else:
        summary = share_summary
    if process_index == 0:
        write_reports(out_root, summary)
    c = summary["counts"]
    print(f"batch: {summary['num_scenes']} scenes: {c['done']} done, {c['skipped']} skipped, "
          f"{c['failed']} failed{', interrupted' if state == 'interrupted' else ''} -> "
          f"{out_root / SUMMARY_JSON}", flush=True)
    if state == "interrupted":
        return 130
    return summary["exit_status"]


# ----------------------------------------------------------------------------------------
# Multi-process set-up


def detect_cluster(environ=os.environ) -> str | None:
    """The multi-process environment `jax.distributed.initialize()` can read, if any.

    Mirrors the cheap checks of JAX's own detectors (jax._src.clusters): an explicit
    JAX_COORDINATOR_ADDRESS, a SLURM job step with several tasks, an Open MPI launch,
    a multi-host Cloud TPU slice. Detectors that need a network query (GCE metadata,
    Kubernetes API) are not tried: pass --distributed=on there. (Here rather than in
    dpjax.batch because it runs before dpjax may be imported.)
    """
    if environ.get("JAX_COORDINATOR_ADDRESS"):
        return "JAX_COORDINATOR_ADDRESS"
    if "SLURM_JOB_ID" in environ and int(environ.get("SLURM_NTASKS", "1") or 1) > 1:
        return "slurm"
    if "OMPI_MCA_orte_hnp_uri" in environ:
        return "open-mpi"
    hosts = environ.get("TPU_WORKER_HOSTNAMES") or environ.get("TPU_PROCESS_ADDRESSES")
    if hosts and "," in hosts:
        return "cloud-tpu"
    return None


def init_distributed() -> tuple[int, int, Gather | None]:
    """jax.distributed.initialize per the flags; returns (index, count, gather)."""
    import jax

    explicit = any(v is not None for v in (FLAGS.coordinator_address, FLAGS.num_processes,
                                           FLAGS.process_id))
    mode = FLAGS.distributed
    cluster = detect_cluster()
    if mode == "off" or (mode == "auto" and not explicit and cluster is None):
        return 0, 1, None
    if mode == "auto" and not explicit:
        logging.info("multi-process environment detected (%s): jax.distributed.initialize",
                     cluster)
    jax.distributed.initialize(coordinator_address=FLAGS.coordinator_address,
                               num_processes=FLAGS.num_processes, process_id=FLAGS.process_id,
                               initialization_timeout=FLAGS.distributed_timeout_s)
    index, count = jax.process_index(), jax.process_count()
    if count == 1:
        return 0, 1, None

    def gather(value: Any) -> list[Any]:
        from jax.experimental import multihost_utils

        _load_dpjax()
        data = np.frombuffer(json.dumps(outputs.to_json_compatible(value)).encode(), np.uint8)
        sizes = np.asarray(multihost_utils.process_allgather(np.int32(data.size))).reshape(-1)
        buf = np.zeros(int(sizes.max()), np.uint8)
        buf[:data.size] = data
        every = np.asarray(multihost_utils.process_allgather(buf)).reshape(len(sizes), -1)
        return [json.loads(bytes(every[i, :sizes[i]]).decode()) for i in range(len(sizes))]

    return index, count, gather


def batch_options_from_flags() -> BatchOptions:
    level_iters = None
    if FLAGS.level_iters:
        try:
            level_iters = tuple(int(v) for v in FLAGS.level_iters)
        except ValueError:
            raise app.UsageError(f"--level_iters must be integers, got {FLAGS.level_iters}")
    try:
        grid = parse_grid(FLAGS.grid)
    except SetupError as e:
        raise app.UsageError(str(e))
    return BatchOptions(
        input_dir=Path(FLAGS.input_dir), output_dir=Path(FLAGS.output_dir),
        calib_dir=Path(FLAGS.calib_dir) if FLAGS.calib_dir else None, preset=FLAGS.preset,
        range_probe=FLAGS.range_probe, search_init=FLAGS.search_init,
        defocus_estimator=FLAGS.defocus_estimator, num_iters=FLAGS.num_iters,
        level_iters=level_iters, pyramid_levels=FLAGS.pyramid_levels,
        num_layers=FLAGS.num_layers, scenes=tuple(FLAGS.scenes) if FLAGS.scenes else None,
        overwrite=FLAGS.overwrite, batch_size=FLAGS.batch_size,
        memory_budget_gb=FLAGS.memory_budget_gb, black_level=FLAGS.black_level,
        allow_8bit=FLAGS.allow_8bit, recenter_kernels=FLAGS.recenter_kernels, grid=grid,
        tile_size=FLAGS.tile_size, kernel_radius=FLAGS.kernel_radius,
        kernel_ramp=FLAGS.kernel_ramp, kernel_smooth=FLAGS.kernel_smooth,
        kernel_size=FLAGS.kernel_size, thumb_size=FLAGS.thumb_size, quiet=FLAGS.quiet,
        method=FLAGS.method,
        dpanet_checkpoint=Path(FLAGS.dpanet_checkpoint) if FLAGS.dpanet_checkpoint else None,
        dpanet_tile=FLAGS.dpanet_tile, dpanet_overlap=FLAGS.dpanet_overlap)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if FLAGS.quiet:
        logging.set_verbosity(logging.WARNING)
    if FLAGS.compilation_cache_dir:
        _load_dpjax()
        try:
            folder = batch.use_compilation_cache(FLAGS.compilation_cache_dir)
        except ValueError as e:
            raise app.UsageError(f"--compilation_cache_dir: {e}") from e
        logging.info("persistent compilation cache: %s", folder)
    if FLAGS.input_dir is None:
        given = [f"--{n}" for n in _BATCH_FLAGS if FLAGS[n].present]
        if given:
            raise app.UsageError(f"{', '.join(given)} need(s) --input_dir (batch mode)")
        return run_demo()
    opts = batch_options_from_flags()
    index, count, gather = init_distributed()  # before anything initialises the backend
    try:
        return run_batch(opts, process_index=index, process_count=count, gather=gather)
    finally:
        if gather is not None:
            import jax

            jax.distributed.shutdown()


if __name__ == "__main__":
    _define_flags()
    sys.exit(app.run(main))
