"""Reproduces the Pixel 4 table of Xin et al. (ICCV 2021) with dpjax and baselines.

  python experiments/reproduce_table.py --output_dir=out/pixel4_auto
  python experiments/reproduce_table.py --preset=paper --methods=dpjax,wiener \
      --output_dir=out/pixel4_paper
  python experiments/reproduce_table.py --scenes=001 --crop=1x2 --level_iters=20,5,2  # quick
  python experiments/reproduce_table.py --methods=input,dpanet \
      --dpanet_checkpoint=dpanet_runs/w8 --output_dir=out/pixel4_auto

For each method and scene it writes OUTPUT_DIR/<method>/<scene>/ in the standard
layout (all_in_focus.{tif,png}, defocus_map.{tif,png} when the method estimates
defocus, result.json with config, timings, metrics), then OUTPUT_DIR/table.md and
OUTPUT_DIR/table.csv: one row per method and scene plus each method's mean, with the
paper's columns (defocus AIWE(1), AIWE(2), 1 - |rho_s|; all-in-focus PSNR, SSIM, MAE)
and the wall time per scene. A complete scene folder is reused, not recomputed,
unless --overwrite.

Methods:
  dpjax      the MPI solver (dpjax.pipeline.solve_scene) with the chosen preset.
  input      the mean of the two views, no deblurring; no defocus map.
  wiener     joint Wiener deconvolution of both views with the calibrated kernels at
             dpjax's defocus map and layer scales (from OUTPUT_DIR/dpjax/<scene>/,
             so dpjax runs first); it estimates no defocus of its own.
  dp_stereo  calibrated kernel-symmetry search (Punnappurath et al., ICCP 2020) over
             25 scales spanning the preset's range; its all-in-focus image is the
             Wiener deconvolution at its own defocus map (a fully classical pipeline).
  dpanet     the learned DPANet baseline (dpjax.dpanet) from --dpanet_checkpoint (a
             ckpt_<step>.npz or a training output folder, whose latest checkpoint is
             used; default experiments/checkpoints/dpanet_w8/). It deblurs the views in
             overlapping tiles (--dpanet_tile, --dpanet_overlap; dpanet.deblur_tiled)
             and writes the all-in-focus image only: no defocus map, so its defocus
             columns stay empty. DPANet was trained on scenes 001, 005, 008 (the
             checkpoint folder's run_config.json says which): their rows are not
             held-out results, and the log and result.json say so.

With --dpanet_init the dpjax method starts the MPI from DPANet's all-in-focus image
(dpjax.pipeline.init_from_all_in_focus: every layer's colour is that image, alphas as
usual) instead of the mean of the views; the DPANet pass is part of its wall time.
Keep such runs in their own --output_dir: a dpjax result solved with the other
setting is refused rather than reused or overwritten (unless --overwrite).

With --search_init (the default with --preset=auto; --nosearch_init turns it off) the
dpjax method starts each layer's weights near the calibrated kernel-symmetry search's
defocus map (dpjax.pipeline.init_from_defocus; the same search the auto preset's range
estimate runs, done once per scene) instead of the paper's uniform start, which puts
every pixel at the middle of the layer range; --preset=paper keeps the paper's start
unless --search_init is given. Colours start as usual (or from DPANet with
--dpanet_init). The same reuse rule as --dpanet_init applies, and a result whose start
used other settings (an earlier version of the start: result.json's "search_init") is
refused too.

--defocus_estimator (default: `sharpened` with --preset=auto, the paper's `mean` with
paper) chooses how dpjax reads its defocus map off the solved layers
(dpjax.mpi.estimate_defocus); results read with another estimator are not reused.

Presets: `auto` (default) estimates each scene's layer range from the DP pair
(dpjax.presets.auto_config) with one set of prior weights, and starts from the search
map (--search_init above); `paper` uses the paper's per-scene ranges and weights
(dpjax.presets.paper_config) and the paper's uniform start. Both share the solver
schedule given by --pyramid_levels / --level_iters / --num_iters.

Wall time per scene: the method's own time (for dpjax with the auto preset this
includes the range estimation); loading the scene and scoring are excluded. JAX
compilation is included, so a method's first scene is the slowest.
"""

from __future__ import annotations

import csv
import dataclasses
import io as _stdio
import json
import math
import platform
import re
import sys
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
from absl import app, flags, logging

import dpjax
from dpjax import baselines, batch, dpanet, io, outputs, pipeline, presets
from dpjax import config as config_lib

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA_DIR = ROOT.parent / "shared" / "data" / "pixel4"
DEFAULT_DPANET_CHECKPOINT = ROOT / "experiments" / "checkpoints" / "dpanet_w8"

METHODS = ("dpjax", "input", "wiener", "dp_stereo", "dpanet")
DEFAULT_METHODS = ("dpjax", "input", "wiener", "dp_stereo")
# Methods that read another method's output run after it.
_ORDER = {"dpjax": 0, "input": 1, "dp_stereo": 2, "wiener": 3, "dpanet": 4}
DEFAULT_LEVEL_ITERS = config_lib.FAST_LEVEL_ITERS
STEREO_CANDIDATES = 25

COLUMNS = (  # (key in metrics, CSV header, Markdown header, format)
    ("aiwe1", "aiwe1", "AIWE(1) ↓", "{:.4f}"),
    ("aiwe2", "aiwe2", "AIWE(2) ↓", "{:.4f}"),
    ("spearman", "one_minus_abs_rho_s", "1−\\|ρs\\| ↓", "{:.4f}"),
    ("psnr", "psnr", "PSNR ↑", "{:.2f}"),
    ("ssim", "ssim", "SSIM ↑", "{:.3f}"),
    ("mae", "mae", "MAE ↓", "{:.4f}"),
)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Options:
    """Everything a run needs (the absl flags, or a test's arguments)."""

    data_dir: Path = DEFAULT_DATA_DIR
    calib_dir: Path | None = None  # default data_dir/calibration
    scenes: tuple[str, ...] | None = None  # default: every scene in data_dir
    methods: tuple[str, ...] = DEFAULT_METHODS
    preset: str = "auto"
    range_probe: bool = False
    defocus_estimator: str | None = None  # None: the preset's (presets.defocus_estimator)
    search_init: bool | None = None  # None: the preset's choice (presets.uses_search_init)
    num_iters: int | None = None
    pyramid_levels: int = 3
    level_iters: tuple[int, ...] | None = None
    crop: str = "full"
    recenter_kernels: bool = True
    output_dir: Path = Path("out/pixel4")
    overwrite: bool = False
    quiet: bool = False
    dpanet_checkpoint: Path | None = None  # default DEFAULT_DPANET_CHECKPOINT
    dpanet_init: bool = False
    dpanet_tile: int = dpanet.DEFAULT_TILE
    dpanet_overlap: int = dpanet.DEFAULT_OVERLAP


# ----------------------------------------------------------------------------------------
# Inputs


def discover_scenes(data_dir: Path) -> tuple[str, ...]:
    """Scene ids NNN with an NNN_left.png in data_dir, sorted."""
    ids = sorted(m.group(1) for p in Path(data_dir).glob("*_left.png")
                 if (m := re.fullmatch(r"(\w+)_left\.png", p.name)))
    if not ids:
        raise io.MissingFileError(f"no scenes (NNN_left.png) found in {data_dir}")
    return tuple(ids)


def parse_crop(crop: str, grid: tuple[int, int]) -> tuple[int, int, int, int] | None:
    """'full' -> None; 'RxC' -> (row0, col0, R, C), the central R x C block of tiles."""
    if crop == "full":
        return None
    m = re.fullmatch(r"(\d+)x(\d+)", crop)
    if not m:
        raise ValueError(f"--crop must be 'full' or 'RxC' (kernel tiles), got {crop!r}")
    r, c = int(m.group(1)), int(m.group(2))
    if not (1 <= r <= grid[0] and 1 <= c <= grid[1]):
        raise ValueError(f"--crop={crop} does not fit the {grid[0]}x{grid[1]} kernel grid")
    return (grid[0] - r) // 2, (grid[1] - c) // 2, r, c


def check_inputs(opts: Options, scenes: tuple[str, ...]) -> None:
    """Fail before any solve when a scene, its ground truth or the calibration is missing."""
    calib_dir = Path(opts.calib_dir or Path(opts.data_dir) / "calibration")
    for name in (io.KERNELS_LEFT, io.KERNELS_RIGHT):
        if not (calib_dir / name).is_file():
            raise io.MissingFileError(f"calibration file not found: {calib_dir / name} "
                                      "(set --data_dir or --calib_dir)")
    for sid in scenes:
        for path in (Path(opts.data_dir) / f"{sid}_left.png",
                     Path(opts.data_dir) / f"{sid}_right.png"):
            if not path.is_file():
                raise io.MissingFileError(f"scene {sid}: file not found: {path}")
        for sub in ("gt_all_in_focus_im", "gt_defocus_map"):
            path = Path(opts.data_dir) / sub / f"{sid}_gt.png"
            if not path.is_file():
                raise io.MissingFileError(
                    f"scene {sid}: ground truth not found: {path} (the table scores every "
                    "scene against its ground truth; drop the scene from --scenes)")


def load_bank(opts: Options) -> tuple[dpjax.KernelBank, tuple[int, int, int, int] | None]:
    """The (optionally re-centred, optionally cropped) kernel bank and the crop block."""
    calib = io.load_calibration_kernels(opts.calib_dir or Path(opts.data_dir) / "calibration")
    kernels = calib.kernels
    if opts.recenter_kernels:
        kernels = dpjax.recenter_kernel_pairs(kernels)
    block = parse_crop(opts.crop, calib.grid)
    rows, cols = calib.grid
    if block is not None:
        r0, c0, rows, cols = block
        grid_k = kernels.reshape(2, calib.grid[0], calib.grid[1], *kernels.shape[-2:])
        kernels = grid_k[:, r0:r0 + rows, c0:c0 + cols].reshape(2, rows * cols,
                                                                 *kernels.shape[-2:])
    bank = dpjax.KernelBank.create(kernels, rows=rows, cols=cols, tile_h=calib.tile_size)
    return bank, block


def load_scene(opts: Options, sid: str, bank: dpjax.KernelBank, block, tile: int):
    """Views [2, H, W, 1] and ground truth of one scene, cropped to the bank's grid."""
    scene = io.load_pixel4_scene(opts.data_dir, sid, require_gt=True)
    views, gt_aif, gt_def = scene.views, scene.gt_all_in_focus, scene.gt_defocus
    if block is not None:
        r0, c0, rows, cols = block
        ys = slice(r0 * tile, (r0 + rows) * tile)
        xs = slice(c0 * tile, (c0 + cols) * tile)
        views, gt_aif, gt_def = views[:, ys, xs], gt_aif[ys, xs], gt_def[ys, xs]
        views = views / views.max()  # the pair is normalised to max 1, as uncropped
    if views.shape[1:3] != bank.grid.image_shape:
        raise ValueError(f"scene {sid}: views {views.shape[1:3]} do not match the kernel "
                         f"grid {bank.grid.image_shape}")
    if not np.any(gt_def > 0):
        raise ValueError(f"scene {sid}: the ground-truth defocus map has no valid pixel "
                         "in this crop")
    return np.ascontiguousarray(views), gt_aif, gt_def


# ----------------------------------------------------------------------------------------
# Configuration


def base_config(opts: Options) -> dpjax.Config:
    """The solver schedule shared by both presets."""
    level_iters = opts.level_iters
    if level_iters is None and opts.num_iters is None:
        level_iters = DEFAULT_LEVEL_ITERS if opts.pyramid_levels == 3 else None
    solver: dict[str, Any] = {"pyramid_levels": opts.pyramid_levels, "level_iters": level_iters}
    if opts.num_iters is not None:
        solver["num_iters"] = opts.num_iters
    cfg = dpjax.Config(solver=dpjax.SolverConfig(**solver))
    if opts.defocus_estimator is not None:
        cfg = cfg.replace(**{"post.defocus": opts.defocus_estimator})
    return cfg


def scene_config(opts: Options, sid: str, views, bank, base, *, probe: bool = False,
                 search: tuple[presets.SearchMap, float] | None = None,
                 ) -> tuple[dpjax.Config, dict]:
    """The preset's configuration for one scene and a JSON record of how it was chosen.

    probe: for the auto preset, refine the searched range with the coarse-level probe
    solve (--range_probe, dpjax's runs only: dp_stereo is a classical baseline and
    keeps the symmetry search's range).
    search: (the scene's symmetry search, its seconds) when already run
    (--search_init): the auto preset's range estimate reuses it and its estimate_s
    includes those seconds.
    """
    t0 = time.perf_counter()
    if opts.preset == "paper":
        cfg = presets.paper_config(sid, base)
        info: dict[str, Any] = {"name": "paper"}
    elif opts.preset == "auto":
        est = presets.estimate_auto_range(views, bank, base, probe=probe,
                                          search=search[0] if search else None)
        cfg = presets.auto_config_from_estimate(est, base)
        info = {"name": "auto", "range_estimate": est._asdict()}
        if search:
            t0 -= search[1]
    else:
        raise ValueError(f"unknown preset {opts.preset!r}; use 'auto' or 'paper'")
    info["estimate_s"] = time.perf_counter() - t0
    info["scale_range"] = [cfg.mpi.scale_min, cfg.mpi.scale_max]
    return cfg, info


# ----------------------------------------------------------------------------------------
# DPANet


@dataclasses.dataclass(frozen=True)
class DpanetModel:
    """A loaded checkpoint and what result.json records about it."""

    params: Any
    config: dpanet.DpanetConfig
    checkpoint: Path  # the .npz
    step: int
    train_scenes: tuple[str, ...] | None  # from the run's run_config.json, if present

    def trained_on(self) -> str:
        if self.train_scenes is None:
            return "unknown scenes (no run_config.json beside the checkpoint)"
        if not self.train_scenes:
            return "synthetic data only"
        return "scenes " + ", ".join(self.train_scenes)

    def info(self, opts: Options, sid: str) -> dict[str, Any]:
        return {"checkpoint": str(self.checkpoint), "step": self.step,
                "model_config": self.config.to_dict(), "tile": opts.dpanet_tile,
                "overlap": opts.dpanet_overlap, "train_scenes": self.train_scenes,
                "trained_on_scene": (None if self.train_scenes is None
                                     else sid in self.train_scenes)}


def load_dpanet(opts: Options) -> DpanetModel:
    """The DPANet of --dpanet_checkpoint, or a clear error saying how to get one."""
    try:
        dpanet.inference.check_tiling(opts.dpanet_tile, opts.dpanet_overlap)
    except ValueError as e:
        raise ValueError(f"--dpanet_tile/--dpanet_overlap: {e}") from e
    path = Path(opts.dpanet_checkpoint or DEFAULT_DPANET_CHECKPOINT)
    if opts.dpanet_checkpoint is None and not path.exists():
        raise FileNotFoundError(
            f"DPANet needs a trained checkpoint and the default {path} does not exist. "
            "Train one (README, 'DPANet (learned baseline)'), e.g. python "
            "experiments/train_dpanet.py --output_dir=dpanet_runs/w8 --width=8, then pass "
            "--dpanet_checkpoint=dpanet_runs/w8 (a training folder or a ckpt_<step>.npz) "
            "or copy its latest ckpt_<step>.npz/.json and run_config.json there")
    try:
        ckpt = dpanet.load_checkpoint(path)
    except dpanet.CheckpointError as e:
        raise type(e)(f"--dpanet_checkpoint: {e}") from e
    if ckpt.config.channels != 1:
        raise ValueError(f"--dpanet_checkpoint: {ckpt.npz} takes {ckpt.config.channels}-"
                         "channel views; the Pixel 4 views have 1 channel")
    train_scenes = None
    run_config = ckpt.npz.parent / "run_config.json"
    if run_config.is_file():
        try:
            scenes = json.loads(run_config.read_text())["data"]["train_scenes"]
            train_scenes = tuple(str(x) for x in scenes)
        except (ValueError, KeyError, TypeError):
            logging.warning("%s: no data.train_scenes; training scenes unknown", run_config)
    return DpanetModel(ckpt.params, ckpt.config, ckpt.npz, ckpt.step, train_scenes)


def dpanet_all_in_focus(opts: Options, model: DpanetModel, views: np.ndarray) -> np.ndarray:
    """[H, W, 1] DPANet estimate in the views' scale (tiled, on the default device)."""
    return dpanet.deblur_tiled(model.params, model.config, views, tile=opts.dpanet_tile,
                               overlap=opts.dpanet_overlap)


def check_init_flags(opts: Options, scenes: tuple[str, ...]) -> None:
    """Refuse to reuse a complete dpjax result solved with another --dpanet_init or
    --search_init, another version of the search start (pipeline.search_init_settings)
    or another --defocus_estimator (result.json records them all)."""
    if opts.overwrite:
        return
    estimator = base_config(opts).post.defocus
    for sid in scenes:
        d = Path(opts.output_dir) / "dpjax" / sid
        if not outputs.is_complete(d):
            continue
        result = json.loads((d / outputs.RESULT_JSON).read_text())
        for flag, now in (("dpanet_init", opts.dpanet_init), ("search_init", opts.search_init)):
            was = bool(result.get(flag))
            if was != now:
                raise ValueError(
                    f"{d} holds a dpjax result solved {'with' if was else 'without'} "
                    f"--{flag}, this run is {'with' if now else 'without'} it; "
                    "use another --output_dir (or --overwrite to replace it)")
        was = ((result.get("config") or {}).get("post") or {}).get("defocus", "mean")
        if was != estimator:
            raise ValueError(
                f"{d} holds a dpjax result whose defocus map was read with the {was!r} "
                f"estimator, this run uses {estimator!r} (--defocus_estimator); use another "
                "--output_dir (or --overwrite to replace it)")
        if opts.search_init:
            record = result.get("search_init") or {}
            want = pipeline.search_init_settings()
            other = sorted(k for k in want if record.get(k) != want[k])
            if other:
                raise ValueError(
                    f"{d} holds a dpjax result whose search start used other settings "
                    f"({', '.join(f'{k}={record.get(k)}' for k in other)}) than this "
                    "version's; use another --output_dir (or --overwrite to replace it)")


# ----------------------------------------------------------------------------------------
# Methods


def _metrics(aif, defocus, gt_aif, gt_def) -> dict[str, Any]:
    m = pipeline.score(aif, defocus, gt_all_in_focus=gt_aif, gt_defocus=gt_def)
    out = {k: None for k, *_ in COLUMNS}
    out.update(m)
    return out


def _common(opts: Options, sid: str, method: str, preset_info: dict | None, *,
            environment: bool = True) -> dict[str, Any]:
    """result.json fields shared by every method (solve_scene adds the environment)."""
    out = {"scene": sid, "method": method, "preset": preset_info, "crop": opts.crop,
           "recenter_kernels": opts.recenter_kernels, "data_dir": str(opts.data_dir)}
    if environment:
        out.update(jax_version=jax.__version__, device=str(jax.devices()[0]))
    return out


def run_dpjax(opts, sid, views, bank, gt_aif, gt_def, cfg, preset_info, out_dir,
              model: DpanetModel | None = None,
              search: tuple[presets.SearchMap, float] | None = None) -> None:
    """search: (the symmetry search, its seconds) for --search_init."""
    def progress(p: dpjax.Progress):
        if not opts.quiet:
            logging.info("  dpjax %s: level %d/%d step %d/%d loss %.5g (%.0fs)", sid,
                         p.num_levels - p.level, p.num_levels, p.step, p.num_steps, p.loss,
                         p.elapsed_s)

    extra = _common(opts, sid, "dpjax", preset_info, environment=False)
    init, init_s, aif = None, 0.0, None
    if opts.dpanet_init:
        t0 = time.perf_counter()
        aif = dpanet_all_in_focus(opts, model, views)
        init = pipeline.init_from_all_in_focus(aif, cfg.mpi.num_layers,
                                               cfg.solver.pyramid_levels)
        init_s = time.perf_counter() - t0
        extra["dpanet_init"] = {**model.info(opts, sid), "seconds": init_s}
    if opts.search_init:
        sm, search_s = search
        t0 = time.perf_counter()
        init, record = pipeline.init_from_search(views.mean(axis=0) if aif is None else aif,
                                                 sm, cfg)
        seconds = time.perf_counter() - t0
        # The search's time counts here unless the auto preset's estimate (whose time
        # is already in its estimate_s) used it.
        if preset_info.get("name") != "auto":
            seconds += search_s
        init_s += seconds
        extra["search_init"] = {**record, "search_s": search_s, "seconds": seconds}
    pipeline.solve_scene(views, bank, cfg, out_dir, gt_all_in_focus=gt_aif, gt_defocus=gt_def,
                         extra=extra, callback=progress, init=init)
    # solve_scene scores only the estimate's keys; keep the table's keys uniform.
    result = json.loads((out_dir / outputs.RESULT_JSON).read_text())
    result["metrics"] = {**{k: None for k, *_ in COLUMNS}, **result["metrics"]}
    result["wall_s"] = (result["timings"]["wall_s"] + preset_info.get("estimate_s", 0.0)
                        + init_s)
    result.pop("output_files")
    _rewrite_result(out_dir, result)


def _rewrite_result(out_dir: Path, result: dict) -> None:
    """Rewrites result.json (the images are already complete)."""
    files = [f for f in outputs.RESULT_FILES if (out_dir / f).is_file() or
             f == outputs.RESULT_JSON]
    outputs.write_json(out_dir / outputs.RESULT_JSON, {**result, "output_files": files})


def run_input(opts, sid, views, gt_aif, gt_def, out_dir) -> None:
    t0 = time.perf_counter()
    aif = views.mean(axis=0)
    wall = time.perf_counter() - t0
    result = {**_common(opts, sid, "input", None), "timings": {"wall_s": wall}, "wall_s": wall,
              "metrics": _metrics(aif, None, gt_aif, gt_def)}
    outputs.write_result(out_dir, all_in_focus=aif, defocus=None, result=result)


def run_dpanet(opts, sid, views, gt_aif, gt_def, model: DpanetModel, out_dir) -> None:
    t0 = time.perf_counter()
    aif = dpanet_all_in_focus(opts, model, views)
    wall = time.perf_counter() - t0
    result = {**_common(opts, sid, "dpanet", None), "dpanet": model.info(opts, sid),
              "timings": {"wall_s": wall}, "wall_s": wall,
              "metrics": _metrics(aif, None, gt_aif, gt_def)}
    outputs.write_result(out_dir, all_in_focus=aif, defocus=None, result=result)


def _dpjax_layers(opts: Options, sid: str) -> tuple[np.ndarray, np.ndarray, dict]:
    """dpjax's defocus map and layer scales for this scene (it must have run)."""
    d = Path(opts.output_dir) / "dpjax" / sid
    if not outputs.is_complete(d):
        raise FileNotFoundError(
            f"wiener deconvolves at dpjax's defocus map, but {d} holds no complete dpjax "
            "result; include dpjax in --methods (it runs first)")
    import tifffile

    result = json.loads((d / outputs.RESULT_JSON).read_text())
    cfg = config_lib.from_dict(result["config"])
    return tifffile.imread(d / "defocus_map.tif"), cfg.mpi.scales(), result


def run_wiener(opts, sid, views, bank, gt_aif, gt_def, out_dir) -> None:
    defocus, scales, dp_result = _dpjax_layers(opts, sid)
    t0 = time.perf_counter()
    aif = baselines.wiener_deconvolve(views, bank, defocus, scales)
    wall = time.perf_counter() - t0
    result = {**_common(opts, sid, "wiener", dp_result.get("preset")),
              "defocus_source": str(Path(opts.output_dir) / "dpjax" / sid / "defocus_map.tif"),
              "scales": scales, "nsr": baselines.WIENER_NSR,
              "timings": {"wall_s": wall}, "wall_s": wall,
              "metrics": _metrics(aif, None, gt_aif, gt_def)}
    outputs.write_result(out_dir, all_in_focus=aif, defocus=None, result=result)


def run_dp_stereo(opts, sid, views, bank, gt_aif, gt_def, cfg, preset_info, out_dir) -> None:
    t0 = time.perf_counter()
    cands = np.linspace(cfg.mpi.scale_min, cfg.mpi.scale_max, STEREO_CANDIDATES)
    est = baselines.dp_stereo_defocus(views, bank, cands)
    t_stereo = time.perf_counter() - t0
    aif = baselines.wiener_deconvolve(views, bank, est.defocus, cfg.mpi.scales())
    wall = time.perf_counter() - t0 + preset_info.get("estimate_s", 0.0)
    result = {**_common(opts, sid, "dp_stereo", preset_info), "candidates": cands,
              "window": baselines.STEREO_WINDOW, "wiener_scales": cfg.mpi.scales(),
              "nsr": baselines.WIENER_NSR,
              "timings": {"stereo_s": t_stereo, "wiener_s": wall - t_stereo, "wall_s": wall},
              "wall_s": wall, "metrics": _metrics(aif, est.defocus, gt_aif, gt_def)}
    outputs.write_result(out_dir, all_in_focus=aif, defocus=est.defocus, result=result)


# ----------------------------------------------------------------------------------------
# Table


def _fmt(fmt: str, v) -> str:
    return "" if v is None or (isinstance(v, float) and not math.isfinite(v)) else fmt.format(v)


def collect_rows(opts: Options, methods, scenes) -> list[dict[str, Any]]:
    """One row per (method, scene) with a complete result, then each method's mean."""
    rows = []
    for method in methods:
        per = []
        for sid in scenes:
            d = Path(opts.output_dir) / method / sid
            if not outputs.is_complete(d):
                logging.warning("no complete result in %s; left out of the table", d)
                continue
            r = json.loads((d / outputs.RESULT_JSON).read_text())
            m = r.get("metrics", {})
            row = {"method": method, "preset": opts.preset, "scene": sid,
                   **{k: m.get(k) for k, *_ in COLUMNS},
                   "wall_s": r.get("wall_s", r.get("timings", {}).get("wall_s"))}
            per.append(row)
        rows += per
        if per:
            mean = {"method": method, "preset": opts.preset, "scene": "mean"}
            for key in [k for k, *_ in COLUMNS] + ["wall_s"]:
                vals = [r[key] for r in per if r[key] is not None]
                mean[key] = float(np.mean(vals)) if len(vals) == len(per) else None
            rows.append(mean)
    return rows


def write_tables(opts: Options, rows: list[dict[str, Any]], header: str) -> None:
    out = Path(opts.output_dir)
    buf = _stdio.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["method", "preset", "scene"] + [c for _, c, *_ in COLUMNS] + ["wall_s"])
    for r in rows:
        writer.writerow([r["method"], r["preset"], r["scene"]]
                        + [_fmt("{:.6g}", r[k]) for k, *_ in COLUMNS]
                        + [_fmt("{:.1f}", r["wall_s"])])
    outputs.atomic_write_bytes(out / "table.csv", buf.getvalue().encode())

    lines = [header, "",
             "| method | scene | " + " | ".join(h for _, _, h, _ in COLUMNS) + " | wall s |",
             "|---|---|" + "---:|" * (len(COLUMNS) + 1)]
    for r in rows:
        name = f"**{r['method']}**" if r["scene"] == "mean" else r["method"]
        scene = "**mean**" if r["scene"] == "mean" else r["scene"]
        cells = [_fmt(f, r[k]) for k, _, _, f in COLUMNS] + [_fmt("{:.0f}", r["wall_s"])]
        lines.append(f"| {name} | {scene} | " + " | ".join(cells) + " |")
    outputs.atomic_write_bytes(out / "table.md", ("\n".join(lines) + "\n").encode())


# ----------------------------------------------------------------------------------------
# Driver


def run(opts: Options) -> list[dict[str, Any]]:
    """Runs every method on every scene (skipping complete ones) and writes the tables.

    Returns:
      The table rows.
    """
    unknown = [m for m in opts.methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; choose from {', '.join(METHODS)}")
    if opts.preset not in ("auto", "paper"):
        raise ValueError(f"unknown preset {opts.preset!r}; use 'auto' or 'paper'")
    methods = sorted(dict.fromkeys(opts.methods), key=_ORDER.__getitem__)
    opts = dataclasses.replace(opts, search_init=presets.uses_search_init(opts.preset,
                                                                          opts.search_init),
                               defocus_estimator=presets.defocus_estimator(
                                   opts.preset, opts.defocus_estimator))
    scenes = tuple(opts.scenes) if opts.scenes else discover_scenes(opts.data_dir)
    if opts.preset == "paper":
        for sid in scenes:
            presets.paper_config(sid)  # unknown scene ids fail before any work
    check_inputs(opts, scenes)
    if "wiener" in methods and "dpjax" not in methods:
        for sid in scenes:  # fail before any work, not after the first scenes
            _dpjax_layers(opts, sid)
    if "dpjax" in methods:
        check_init_flags(opts, scenes)
    model = None
    if "dpanet" in methods or (opts.dpanet_init and "dpjax" in methods):
        model = load_dpanet(opts)
        logging.info("DPANet %s (step %d, width %d), trained on %s", model.checkpoint,
                     model.step, model.config.width, model.trained_on())
        for sid in sorted(set(scenes) & set(model.train_scenes or ())):
            logging.warning("scene %s was used to train DPANet: its dpanet%s results are not "
                            "held-out results", sid, " and dpjax" if opts.dpanet_init else "")
    base = base_config(opts)
    bank, block = load_bank(opts)
    tile = bank.grid.tile_h
    out = Path(opts.output_dir)
    logging.info("methods %s, scenes %s, preset %s, crop %s, schedule %s", methods, scenes,
                 opts.preset, opts.crop, base.solver.level_iters or base.solver.num_iters)

    for sid in scenes:
        todo = [m for m in methods if opts.overwrite or not outputs.is_complete(out / m / sid)]
        for m in set(methods) - set(todo):
            logging.info("%s/%s: complete result found, kept (--overwrite to redo)", m, sid)
        if not todo:
            continue
        views, gt_aif, gt_def = load_scene(opts, sid, bank, block, tile)
        configs: dict[str, tuple[dpjax.Config, dict]] = {}
        search = None  # --search_init: one symmetry search, also the auto range's
        if opts.search_init and "dpjax" in todo:
            t0 = time.perf_counter()
            search = (presets.search_defocus(views, bank), time.perf_counter() - t0)
        searched = None  # dp_stereo, and dpjax without --range_probe, share one search
        for m in (m for m in ("dpjax", "dp_stereo") if m in todo):
            if m == "dpjax" and opts.range_probe:
                configs[m] = scene_config(opts, sid, views, bank, base, probe=True,
                                          search=search)
            else:
                searched = searched or scene_config(opts, sid, views, bank, base,
                                                    search=search)
                configs[m] = searched
            cfg, preset_info = configs[m]
            logging.info("scene %s: %s preset for %s, scales [%.2f, %.2f] (%.1fs)", sid,
                         opts.preset, m, cfg.mpi.scale_min, cfg.mpi.scale_max,
                         preset_info["estimate_s"])
        for m in todo:
            t0 = time.perf_counter()
            d = out / m / sid
            if m == "dpjax":
                run_dpjax(opts, sid, views, bank, gt_aif, gt_def, *configs[m], d, model,
                          search)
            elif m == "dpanet":
                run_dpanet(opts, sid, views, gt_aif, gt_def, model, d)
            elif m == "input":
                run_input(opts, sid, views, gt_aif, gt_def, d)
            elif m == "wiener":
                run_wiener(opts, sid, views, bank, gt_aif, gt_def, d)
            elif m == "dp_stereo":
                run_dp_stereo(opts, sid, views, bank, gt_aif, gt_def, *configs[m], d)
            r = json.loads((d / outputs.RESULT_JSON).read_text())["metrics"]
            logging.info("%s/%s done in %.0fs: %s", m, sid, time.perf_counter() - t0,
                         "  ".join(f"{k} {v:.4g}" for k, v in r.items()
                                   if isinstance(v, float)))

    rows = collect_rows(opts, methods, scenes)
    sched = (f"pyramid_levels={base.solver.pyramid_levels}, level_iters="
             f"{','.join(map(str, base.solver.level_iters))}" if base.solver.level_iters
             else f"pyramid_levels={base.solver.pyramid_levels}, num_iters="
                  f"{base.solver.num_iters}, coarse_iters={base.solver.coarse_iters}")
    header = (f"Pixel 4 table: preset {opts.preset}, crop {opts.crop}, {sched}, "
              f"recenter_kernels={opts.recenter_kernels}, search_init={opts.search_init}, "
              f"defocus={base.post.defocus}; "
              f"{platform.node()} "
              f"({jax.devices()[0].platform}). Defocus metrics on the 8-bit ground truth "
              "in [0, 1] units; image metrics after ±6 px alignment and affine intensity fit.")
    if model is not None:
        header += (f" DPANet: {model.checkpoint} (step {model.step}, width "
                   f"{model.config.width}), trained on {model.trained_on()}"
                   f"{'; dpjax initialised from it (--dpanet_init)' if opts.dpanet_init else ''}.")
    write_tables(opts, rows, header)
    logging.info("wrote %s and %s", out / "table.md", out / "table.csv")
    return rows


# ----------------------------------------------------------------------------------------
# Flags (defined only here, and only when run as a program: experiments/dpanet_init.py
# imports this module for its scene loading and defines its own flags)

FLAGS = flags.FLAGS


def define_flags() -> None:
    d = flags
    d.DEFINE_string("data_dir", str(DEFAULT_DATA_DIR), "Pixel 4 dataset folder.")
    d.DEFINE_string("calib_dir", None, "Calibration folder (default DATA_DIR/calibration).")
    d.DEFINE_list("scenes", None, "Scene ids (default: every NNN_left.png in data_dir).")
    d.DEFINE_list("methods", list(DEFAULT_METHODS), f"Methods among {', '.join(METHODS)}.")
    d.DEFINE_enum("preset", "auto", ["auto", "paper"],
                  "auto: layer range from the DP pair, one weight set; paper: per-scene "
                  "values of the paper's code.")
    d.DEFINE_enum("defocus_estimator", None, ["mean", "sharpened"], "dpjax: how the "
                  "defocus map is read off the solved layers, mean (the paper's) or "
                  "sharpened (dpjax.mpi.defocus_sharpened). Default: sharpened with "
                  "--preset=auto, mean with paper.")
    d.DEFINE_bool("range_probe", False, "auto preset: refine each scene's searched layer "
                  "range with a short coarse-level solve (dpjax.presets.probe_scale_range; "
                  "about +20% dpjax time; not used by dp_stereo).")
    d.DEFINE_bool("search_init", None, "dpjax: start each layer's weights near the kernel-"
                  "symmetry search's defocus map (dpjax.pipeline.init_from_defocus) instead "
                  "of the paper's uniform start. Default: on with --preset=auto (whose "
                  "range estimate runs the same search), off with --preset=paper.")
    d.DEFINE_integer("num_iters", None, "Iterations at the finest level (used when "
                     "--level_iters is not given).")
    d.DEFINE_integer("pyramid_levels", 3, "Coarse-to-fine levels (1 = single scale).")
    d.DEFINE_list("level_iters", None, "Per-level budgets, coarsest first (default "
                  f"{','.join(map(str, DEFAULT_LEVEL_ITERS))} with 3 levels and no "
                  "--num_iters).")
    d.DEFINE_string("crop", "full", "'full' or RxC: the central R x C block of kernel tiles.")
    d.DEFINE_bool("recenter_kernels", True, "Re-centre each tile's kernel pair (data README).")
    d.DEFINE_string("output_dir", "out/pixel4", "Where results and tables are written.")
    d.DEFINE_bool("overwrite", False, "Recompute scenes that already have a complete result.")
    d.DEFINE_bool("quiet", False, "Only log warnings.")
    d.DEFINE_string("compilation_cache_dir", None, "Persistent JAX compilation cache "
                    "folder (created if missing): later runs with the same shapes reuse the "
                    "compiled solver instead of compiling it again. Default: none "
                    "(JAX_COMPILATION_CACHE_DIR in the environment also works).")
    d.DEFINE_string("dpanet_checkpoint", None, "DPANet checkpoint for --methods=dpanet and "
                    "--dpanet_init: a ckpt_<step>.npz or a training output folder (its latest "
                    "checkpoint); default experiments/checkpoints/dpanet_w8/.")
    d.DEFINE_bool("dpanet_init", False, "Initialise the dpjax MPI from DPANet's all-in-focus "
                  "image (every layer's colour) instead of the mean of the views.")
    d.DEFINE_integer("dpanet_tile", dpanet.DEFAULT_TILE, "DPANet inference tile side in px "
                     "(a multiple of 16); memory grows with its square.")
    d.DEFINE_integer("dpanet_overlap", dpanet.DEFAULT_OVERLAP, "Least overlap of DPANet tiles "
                     "in px (a multiple of 16, below the tile side).")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if FLAGS.quiet:
        logging.set_verbosity(logging.WARNING)
    if FLAGS.compilation_cache_dir:
        try:
            batch.use_compilation_cache(FLAGS.compilation_cache_dir)
        except ValueError as e:
            raise app.UsageError(f"--compilation_cache_dir: {e}") from e
    try:
        level_iters = (tuple(int(v) for v in FLAGS.level_iters)
                       if FLAGS.level_iters else None)
    except ValueError as e:
        raise app.UsageError(f"--level_iters must be integers: {FLAGS.level_iters}") from e
    opts = Options(
        data_dir=Path(FLAGS.data_dir),
        calib_dir=Path(FLAGS.calib_dir) if FLAGS.calib_dir else None,
        scenes=(tuple(s.zfill(3) if s.isdigit() else s for s in FLAGS.scenes)
                if FLAGS.scenes else None),
        methods=tuple(FLAGS.methods), preset=FLAGS.preset, range_probe=FLAGS.range_probe,
        defocus_estimator=FLAGS.defocus_estimator,
        search_init=FLAGS.search_init,
        num_iters=FLAGS.num_iters,
        pyramid_levels=FLAGS.pyramid_levels, level_iters=level_iters, crop=FLAGS.crop,
        recenter_kernels=FLAGS.recenter_kernels, output_dir=Path(FLAGS.output_dir),
        overwrite=FLAGS.overwrite, quiet=FLAGS.quiet,
        dpanet_checkpoint=Path(FLAGS.dpanet_checkpoint) if FLAGS.dpanet_checkpoint else None,
        dpanet_init=FLAGS.dpanet_init, dpanet_tile=FLAGS.dpanet_tile,
        dpanet_overlap=FLAGS.dpanet_overlap)
    try:
        run(opts)
    except (ValueError, FileNotFoundError) as e:  # bad input: a clear message, no traceback
        logging.error("%s", e)
        print(f"reproduce_table: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    define_flags()
    sys.exit(app.run(main))
