"""The Pixel 4 table of Xin et al. (ICCV 2021), reproduced with dpjax and baselines.

The library behind experiments/reproduce_table.py (its app: flags -> `Options` ->
`run`). `run(opts, log)` reports through `log(level, message)` (stdlib logging levels),
never to a terminal.

For each method and scene with ground truth in data_dir it writes
OUTPUT_DIR/<method>/<scene>/ in the standard layout (all_in_focus.{tif,png},
defocus_map.{tif,png} when the method estimates defocus, result.json with the settings'
fingerprint, timings and metrics), then OUTPUT_DIR/table.md and OUTPUT_DIR/table.csv:
one row per method and scene plus each method's mean, with the paper's columns (defocus
AIWE(1), AIWE(2), 1 - |rho_s|; all-in-focus PSNR, SSIM, MAE) and the wall time per scene.

Methods (`METHODS`, run in the order their inputs require):
  mpi        the MPI solver (dpjax.fit) with the chosen preset, as run_solver.py's
             --method=mpi.
  input      the mean of the two views, no deblurring; no defocus map.
  dp_stereo  calibrated kernel-symmetry search (Punnappurath et al., ICCP 2020) over
             25 scales spanning the preset's range (never --range_probe's); its
             all-in-focus image is the Wiener deconvolution at its own defocus map.
  wiener     joint Wiener deconvolution of both views with the calibrated kernels at
             the mpi method's defocus map and layer scales (OUTPUT_DIR/mpi/<scene>/,
             so mpi runs first); it estimates no defocus of its own.
  dpanet     the learned DPANet baseline (dpjax.dpanet) from --dpanet_checkpoint,
             deblurred in overlapping tiles; no defocus map. DPANet was trained on
             scenes 001, 005, 008 (its run_config.json says which): their rows are not
             held-out results, and the log and result.json say so.

Reuse: a complete result is kept when its fingerprint (dpjax.runner.make_fingerprint:
method, input files, crop, kernels, resolved configuration, preset, solver code, and the
results it reads) matches this run's; otherwise it is solved again and the log says why
("settings changed: ..."). --overwrite solves everything again.

The shared flags (dpjax_apps.flags) mean what they mean in run_solver.py: --num_iters is
the finest level's budget (dpjax.config.schedule; not together with --level_iters),
--preset=auto estimates each scene's layer range from the pair, starts from the
symmetry search's map (--search_init) and reads the map sharpened; --preset=paper uses
the paper's per-scene ranges, weights and uniform start. With --dpanet_init the mpi
method starts its layer colours from DPANet's all-in-focus image.

Wall time per scene: the method's own time (for mpi with the auto preset it includes the
range estimate and the search start); loading and scoring are excluded; JAX compilation
is included, so a method's first scene is the slowest.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import io as _stdio
import json
import logging
import math
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import jax
import numpy as np

import dpjax
from dpjax import baselines, dpanet, io, outputs, pipeline, presets, runner, scene
from dpjax import config as config_lib

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA_DIR = ROOT.parent / "shared" / "data" / "pixel4"
STEREO_CANDIDATES = 25
GT_DIRS = ("gt_all_in_focus_im", "gt_defocus_map")

Log = Callable[[int, str], None]  # (logging level, message)


def _silent(level: int, message: str) -> None:
    del level, message


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
    """Everything a run needs (the absl flags, or a test's arguments).

    The schedule and preset fields mean what the shared flags of the same names mean
    (`base_config`); crop: (R, C) central kernel tiles, None the full frame.
    """

    data_dir: Path = DEFAULT_DATA_DIR
    calib_dir: Path | None = None  # default data_dir/calibration
    scenes: tuple[str, ...] | None = None  # default: every scene with ground truth
    methods: tuple[str, ...] = ("mpi", "input", "wiener", "dp_stereo")
    preset: str = "auto"
    range_probe: bool = False
    prior_encoding: str = scene.PRIOR_INPUT  # scene.SceneOptions.prior_encoding
    defocus_estimator: str | None = None
    defocus_fill: bool | None = None
    search_init: bool | None = None
    quality: str | None = None
    optimizer: str | None = None
    pyramid_levels: int | None = None
    level_iters: tuple[int, ...] | None = None
    num_iters: int | None = None
    num_layers: int | None = None
    refine_iters: int | None = None
    kernel_mass_cut: float | None = None
    crop: tuple[int, int] | None = None
    recenter_kernels: bool = True
    output_dir: Path = Path("out/pixel4")
    overwrite: bool = False
    quiet: bool = False
    dpanet_checkpoint: Path | None = None  # default runner.DEFAULT_DPANET_CHECKPOINT
    dpanet_init: bool = False
    dpanet_tile: int = dpanet.DEFAULT_TILE
    dpanet_overlap: int = dpanet.DEFAULT_OVERLAP

    def _settings(self) -> dict[str, Any]:
        return dict(
            preset=self.preset, quality=self.quality, pyramid_levels=self.pyramid_levels,
            level_iters=self.level_iters, num_iters=self.num_iters,
            num_layers=self.num_layers, search_init=self.search_init,
            defocus_estimator=self.defocus_estimator, defocus_fill=self.defocus_fill,
            refine_iters=self.refine_iters,
            kernel_mass_cut=self.kernel_mass_cut, optimizer=self.optimizer)

    def base_config(self) -> dpjax.Config:
        """The resolved base configuration (ValueError for invalid settings)."""
        return presets.base_config(**self._settings())

    def linear_solver(self) -> config_lib.SolverConfig | None:
        """The solver for linear input where it differs (`presets.linear_input_solver`)."""
        return presets.linear_input_solver(**self._settings())


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

    def settings(self, opts: Options) -> dict[str, Any]:
        return {"checkpoint": str(self.checkpoint), "step": self.step,
                "model_config": self.config.to_dict(), "tile": opts.dpanet_tile,
                "overlap": opts.dpanet_overlap, "train_scenes": self.train_scenes}

    def info(self, opts: Options, sid: str) -> dict[str, Any]:
        return {**self.settings(opts), "trained_on_scene": (
            None if self.train_scenes is None else sid in self.train_scenes)}

    def deblur(self, opts: Options, views: np.ndarray) -> np.ndarray:
        """[H, W, 1] DPANet estimate in the views' scale (tiled, on the default device)."""
        return dpanet.deblur_tiled(self.params, self.config, views, tile=opts.dpanet_tile,
                                   overlap=opts.dpanet_overlap)


def load_dpanet(opts: Options, log: Log = _silent) -> DpanetModel:
    """The DPANet of --dpanet_checkpoint, or a clear error saying how to get one."""
    try:
        dpanet.inference.check_tiling(opts.dpanet_tile, opts.dpanet_overlap)
    except ValueError as e:
        raise ValueError(f"--dpanet_tile/--dpanet_overlap: {e}") from e
    path = Path(opts.dpanet_checkpoint or runner.DEFAULT_DPANET_CHECKPOINT)
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
            log(logging.WARNING, f"{run_config}: no data.train_scenes; training scenes unknown")
    return DpanetModel(ckpt.params, ckpt.config, ckpt.npz, ckpt.step, train_scenes)


# ----------------------------------------------------------------------------------------
# The run and its scenes


@dataclasses.dataclass(frozen=True)
class Run:
    """What every scene of a run shares, checked before any work (`prepare_run`)."""

    opts: Options
    methods: tuple[str, ...]  # in run order
    base: dpjax.Config
    source: scene.KernelSource
    scene_opts: scene.SceneOptions
    pairs: dict[str, io.ScenePair]  # the table's scenes, in order
    model: DpanetModel | None
    log: Log = _silent

    def result_dir(self, method: str, sid: str) -> Path:
        return Path(self.opts.output_dir) / method / sid


class Scene:
    """One scene's inputs, loaded and configured on first use and shared by its methods."""

    def __init__(self, run: Run, pair: io.ScenePair):
        self.run, self.pair, self.name = run, pair, pair.name

    @functools.cached_property
    def loaded(self) -> tuple[np.ndarray, dpjax.KernelBank, np.ndarray, np.ndarray, dict]:
        """(views [2, H, W, 1], bank, gt all-in-focus [H, W], gt defocus [H, W], info)."""
        return load_scene(self.run, self.pair)

    @functools.cached_property
    def search(self) -> tuple[presets.SearchMap, float]:
        """The kernel-symmetry search over the grid as developed (the search start's) and
        its seconds: run once per scene."""
        views, bank, *_ = self.loaded
        t0 = time.perf_counter()
        found = presets.search_defocus(views, bank)
        return found, time.perf_counter() - t0

    @functools.cached_property
    def range_search(self) -> tuple[presets.SearchMap, float]:
        """The auto range's search (`presets.range_search`; the start's search when it
        covers the same grid) and its seconds: shared by mpi and dp_stereo."""
        views, bank, *_ = self.loaded
        start = self.search[0] if self.run.base.init.search else None
        t0 = time.perf_counter()
        found = presets.range_search(views, bank, blur_p90=self.run.source.blur_p90,
                                     search=start)
        return found, self.search[1] if found is start else time.perf_counter() - t0

    @functools.cached_property
    def mpi_config(self) -> tuple[dpjax.Config, dict, Any, dict | None, float]:
        """(cfg, preset record, init, init record, seconds) of the mpi method."""
        views, bank, *_, loaded_info = self.loaded
        run = self.run
        auto = run.opts.preset == "auto"
        timings: dict[str, float] = {}
        cfg, info, init, init_info = scene.configure(
            self.name, views, bank, run.scene_opts, timings,
            input_encoding=loaded_info["input"]["encoding"],
            search=self.search if run.base.init.search else None,
            range_search=self.range_search if auto else None, blur_p90=run.source.blur_p90)
        seconds = timings["preset_s"] + timings.get("search_init_s", 0.0)
        return cfg, info, init, init_info, seconds

    @functools.cached_property
    def stereo_config(self) -> tuple[dpjax.Config, dict, float]:
        """(cfg, preset record, seconds) of dp_stereo: the preset's range without the
        probe, from the mpi method's range search."""
        views, bank, *_ = self.loaded
        search = self.range_search if self.run.opts.preset == "auto" else None
        cfg, info = presets.resolve(self.run.opts.preset, self.name, views, bank,
                                    self.run.base, search=search[0] if search else None)
        return cfg, info, info["seconds"] + (search[1] if search else 0.0)


def _check_scenes(opts: Options, log: Log) -> dict[str, io.ScenePair]:
    """The table's scenes: the pairs in data_dir with both ground truths (all of
    --scenes, which must have them)."""
    data = Path(opts.data_dir)
    pairs = {p.name: p for p in io.discover_pairs(data)}
    if opts.scenes:
        for sid in opts.scenes:
            if sid not in pairs:
                raise io.MissingFileError(f"scene {sid}: no {sid}_left.png / _right.png "
                                          f"pair in {data}")
            for sub in GT_DIRS:
                path = data / sub / f"{sid}_gt.png"
                if not path.is_file():
                    raise io.MissingFileError(
                        f"scene {sid}: ground truth not found: {path} (the table scores "
                        "every scene against its ground truth; drop the scene from --scenes)")
        names = list(dict.fromkeys(opts.scenes))
    else:
        names = [n for n in pairs
                 if all((data / sub / f"{n}_gt.png").is_file() for sub in GT_DIRS)]
        for n in sorted(set(pairs) - set(names)):
            log(logging.WARNING, f"scene {n} has no ground truth in {data}: not part of the "
                "table")
        if not names:
            raise io.MissingFileError(
                f"no scene in {data} has ground truth ({', '.join(GT_DIRS)}/NNN_gt.png): "
                "the table scores every scene against it")
    for n in names:
        if pairs[n].left is None or pairs[n].right is None:
            raise io.MissingFileError(f"scene {n}: one of its two views is missing in {data}")
    return {n: pairs[n] for n in names}


def prepare_run(opts: Options, log: Log = _silent) -> Run:
    """Checks the options, scenes, calibration and model before any work.

    Raises:
      ValueError, FileNotFoundError, scene.SetupError: with a message naming the fix.
    """
    methods = run_order(opts.methods)
    base = opts.base_config()
    pairs = _check_scenes(opts, log)
    if opts.preset == "paper":
        for sid in pairs:
            presets.paper_config(sid)  # unknown scene ids fail before any work
    for m in methods:
        for src in METHODS[m].reads:
            if src not in methods:
                for sid in pairs:  # fail before any work, not after the first scenes
                    _read_result(Path(opts.output_dir), src, sid, reader=m)
    calib = Path(opts.calib_dir or Path(opts.data_dir) / "calibration")
    source = scene.kernel_source(scene.KernelOptions(calib_dir=calib,
                                                     recenter=opts.recenter_kernels),
                                 2 ** (base.solver.pyramid_levels - 1), opts.crop)
    model = None
    if "dpanet" in methods or (opts.dpanet_init and "mpi" in methods):
        model = load_dpanet(opts, log)
        log(logging.INFO, f"DPANet {model.checkpoint} (step {model.step}, width "
                          f"{model.config.width}), trained on {model.trained_on()}")
        for sid in sorted(set(pairs) & set(model.train_scenes or ())):
            log(logging.WARNING, f"scene {sid} was used to train DPANet: its dpanet"
                f"{' and mpi' if opts.dpanet_init else ''} results are not held-out results")
    scene_opts = scene.SceneOptions(base=base, preset=opts.preset, range_probe=opts.range_probe,
                                    prior_encoding=opts.prior_encoding,
                                    linear_solver=opts.linear_solver(),
                                    crop_tiles=opts.crop, input_dir=Path(opts.data_dir))
    return Run(opts=opts, methods=methods, base=base, source=source, scene_opts=scene_opts,
               pairs=pairs, model=model, log=log)


def load_scene(run: Run, pair: io.ScenePair):
    """(views [2, H, W, 1], bank, gt all-in-focus [H, W], gt defocus [H, W], info) of one
    scene, cropped to the run's kernel tiles (dpjax.scene, as run_solver.py loads it)."""
    views, info = scene.load_views(pair, run.source, run.scene_opts)
    bank = scene.make_bank(run.source, info)
    gt_aif, gt_def = scene.load_ground_truth(run.opts.data_dir, pair.name, views.shape[1:3],
                                             info)
    if gt_aif is None or gt_def is None:
        raise ValueError(f"scene {pair.name}: ground truth unusable: "
                         f"{'; '.join(info.get('warnings', [])) or 'not found'}")
    if not np.any(gt_def > 0):
        raise ValueError(f"scene {pair.name}: the ground-truth defocus map has no valid "
                         "pixel in this crop")
    return views, bank, gt_aif, gt_def, info


# ----------------------------------------------------------------------------------------
# Methods


class Output(NamedTuple):
    """What a method made of one scene: images, result.json fields, its wall time."""

    all_in_focus: np.ndarray  # [H, W, 1]
    defocus: np.ndarray | None  # [H, W]
    fields: dict[str, Any]
    wall_s: float


def _read_result(out_root: Path, method: str, sid: str, *, reader: str) -> dict[str, Any]:
    d = out_root / method / sid
    if not outputs.is_complete(d):
        raise FileNotFoundError(f"{reader} reads the {method} method's result, but {d} holds "
                                f"no complete one; include {method} in --methods (it runs "
                                "first)")
    return json.loads((d / outputs.RESULT_JSON).read_text())


def run_mpi(sc: Scene) -> Output:
    run, opts = sc.run, sc.run.opts
    views, bank, *_ = sc.loaded
    cfg, preset_info, init, init_info, start_s = sc.mpi_config
    fields: dict[str, Any] = {"preset": preset_info}
    if opts.dpanet_init:
        t0 = time.perf_counter()
        aif = run.model.deblur(opts, views)
        if cfg.init.search:  # the search start's weights, DPANet's colours
            init, record = pipeline.init_from_search(aif, sc.search[0], cfg)
            init_info = {**init_info, **record}
        else:
            init = pipeline.init_from_all_in_focus(aif, cfg.mpi.num_layers,
                                                   cfg.solver.pyramid_levels)
        seconds = time.perf_counter() - t0
        start_s += seconds
        fields["dpanet_init"] = {**run.model.info(opts, sc.name), "seconds": seconds}
    if init_info is not None:
        fields["search_init"] = init_info

    def progress(p: dpjax.Progress):
        if not opts.quiet:
            run.log(logging.INFO, f"  mpi {sc.name}: level {p.num_levels - p.level}/"
                    f"{p.num_levels} step {p.step}/{p.num_steps} loss {p.loss:.5g} "
                    f"({p.elapsed_s:.0f}s)")

    t0 = time.perf_counter()
    res = dpjax.fit(views, bank, cfg, callback=progress, init=init, init_is_solution=False)
    solve_s = time.perf_counter() - t0
    fields.update(config=config_lib.to_dict(cfg), iterations=list(res.level_iterations),
                  loss_terms=res.terms, final_loss=(float(res.loss_history[-1])
                                                    if res.loss_history.size else None),
                  timings={**res.timings, "solve_s": solve_s, "start_s": start_s})
    return Output(res.all_in_focus, res.defocus, fields, solve_s + start_s)


def run_input(sc: Scene) -> Output:
    views, *_ = sc.loaded
    t0 = time.perf_counter()
    aif = views.mean(axis=0)
    return Output(aif, None, {}, time.perf_counter() - t0)


def run_wiener(sc: Scene) -> Output:
    import tifffile

    views, bank, *_ = sc.loaded
    src = _read_result(Path(sc.run.opts.output_dir), "mpi", sc.name, reader="wiener")
    defocus_path = sc.run.result_dir("mpi", sc.name) / outputs.DEFOCUS_TIFF
    scales = config_lib.from_dict(src["config"]).mpi.scales()
    defocus = tifffile.imread(defocus_path)
    t0 = time.perf_counter()
    aif = baselines.wiener_deconvolve(views, bank, defocus, scales)
    return Output(aif, None, {"preset": src.get("preset"), "defocus_source": str(defocus_path),
                              "scales": scales, "nsr": baselines.WIENER_NSR},
                  time.perf_counter() - t0)


def run_dp_stereo(sc: Scene) -> Output:
    views, bank, *_ = sc.loaded
    cfg, preset_info, start_s = sc.stereo_config
    t0 = time.perf_counter()
    cands = np.linspace(cfg.mpi.scale_min, cfg.mpi.scale_max, STEREO_CANDIDATES)
    est = baselines.dp_stereo_defocus(views, bank, cands)
    t_stereo = time.perf_counter() - t0
    aif = baselines.wiener_deconvolve(views, bank, est.defocus, cfg.mpi.scales())
    t_wiener = time.perf_counter() - t0 - t_stereo
    return Output(aif, est.defocus, {
        "preset": preset_info, "candidates": cands, "window": baselines.STEREO_WINDOW,
        "wiener_scales": cfg.mpi.scales(), "nsr": baselines.WIENER_NSR,
        "timings": {"start_s": start_s, "stereo_s": t_stereo, "wiener_s": t_wiener}},
        start_s + t_stereo + t_wiener)


def run_dpanet(sc: Scene) -> Output:
    views, *_ = sc.loaded
    t0 = time.perf_counter()
    aif = sc.run.model.deblur(sc.run.opts, views)
    return Output(aif, None, {"dpanet": sc.run.model.info(sc.run.opts, sc.name)},
                  time.perf_counter() - t0)


def _settings_mpi(run: Run) -> dict[str, Any]:
    out = {"config": config_lib.to_dict(run.base), "preset": run.opts.preset,
           "range_probe": run.opts.range_probe, "prior_encoding": run.opts.prior_encoding,
           "linear_solver": runner.solver_record(run.scene_opts.linear_solver),
           "kernels": runner.kernel_record(run.source)}
    if run.opts.dpanet_init:  # one value: a change reads "dpanet_init ... -> null"
        out["dpanet_init"] = json.dumps(run.model.settings(run.opts), sort_keys=True)
    return out


def _settings_stereo(run: Run) -> dict[str, Any]:
    return {"config": {"mpi": config_lib.to_dict(run.base)["mpi"]}, "preset": run.opts.preset,
            "candidates": STEREO_CANDIDATES, "kernels": runner.kernel_record(run.source)}


@dataclasses.dataclass(frozen=True, kw_only=True)
class Method:
    """One table method.

    run: makes one scene's Output. defocus: whether it estimates a defocus map (scored).
    reads: methods whose results it reads (they run first; their fingerprints are part
    of its own). settings: what else its result depends on, for its fingerprint.
    """

    run: Callable[[Scene], Output]
    defocus: bool
    reads: tuple[str, ...] = ()
    settings: Callable[[Run], dict[str, Any]] = lambda run: {}


METHODS: dict[str, Method] = {
    "mpi": Method(run=run_mpi, defocus=True, settings=_settings_mpi),
    "input": Method(run=run_input, defocus=False),
    "dp_stereo": Method(run=run_dp_stereo, defocus=True, settings=_settings_stereo),
    "wiener": Method(run=run_wiener, defocus=False, reads=("mpi",),
                     settings=lambda run: {"kernels": runner.kernel_record(run.source)}),
    "dpanet": Method(run=run_dpanet, defocus=False,
                     settings=lambda run: {"dpanet": run.model.settings(run.opts)}),
}


def run_order(methods, registry: dict[str, Method] | None = None) -> tuple[str, ...]:
    """The chosen methods, each after the methods it reads (else in registry order).

    Raises:
      ValueError: an unknown method, or a cycle in `reads`.
    """
    registry = METHODS if registry is None else registry
    unknown = [m for m in methods if m not in registry]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; choose from {', '.join(registry)}")
    chosen = set(methods)
    order: list[str] = []

    def visit(m: str, path: tuple[str, ...]) -> None:
        if m in path:
            raise ValueError(f"methods read each other: {' -> '.join(path + (m,))}")
        if m in order:
            return
        for src in registry[m].reads:
            if src in chosen:
                visit(src, path + (m,))
        order.append(m)

    for m in registry:
        if m in chosen:
            visit(m, ())
    return tuple(order)


def fingerprint(run: Run, method: str, pair: io.ScenePair) -> dict[str, Any]:
    """The settings fingerprint of one method's result (dpjax.runner.make_fingerprint)."""
    m = METHODS[method]
    parts = m.settings(run)
    if m.reads:
        parts["reads"] = {
            src: (_read_result(Path(run.opts.output_dir), src, pair.name, reader=method)
                  .get("fingerprint") or {}).get("digest") for src in m.reads}
    pre = {"black_level": None, "allow_8bit": False,
           "crop_tiles": None if run.opts.crop is None else list(run.opts.crop)}
    return runner.make_fingerprint(method, pair, pre, **parts)


def _needs_solve(run: Run, method: str, sid: str, fp: dict[str, Any]) -> bool:
    """False when a complete result with the same fingerprint is there (kept)."""
    d = run.result_dir(method, sid)
    if not outputs.is_complete(d):
        return True
    if run.opts.overwrite:
        run.log(logging.INFO, f"{method}/{sid}: --overwrite: solving again")
        return True
    try:
        previous = json.loads((d / outputs.RESULT_JSON).read_text())
    except (OSError, ValueError):
        return True
    why = runner.fingerprint_changes(previous.get("fingerprint"), fp)
    if why is None:
        run.log(logging.INFO, f"{method}/{sid}: complete result with the same settings kept "
                "(--overwrite to redo)")
        return False
    run.log(logging.WARNING, f"{method}/{sid}: solving again, {why}")
    return True


def _write(sc: Scene, method: str, out: Output, fp: dict[str, Any]) -> dict[str, Any]:
    run = sc.run
    *_, gt_aif, gt_def, info = sc.loaded
    m = pipeline.score(out.all_in_focus, out.defocus if METHODS[method].defocus else None,
                       gt_all_in_focus=gt_aif, gt_defocus=gt_def)
    unavailable = m.pop("unavailable", None)
    timings = {**out.fields.get("timings", {}), "wall_s": out.wall_s}
    result = {"scene": sc.name, "method": method, "preset": None, "crop": _crop_text(run.opts),
              "recenter_kernels": run.opts.recenter_kernels, "data_dir": str(run.opts.data_dir),
              "preprocessing": info, "kernels": run.source.info, "fingerprint": fp,
              "jax_version": jax.__version__, "device": str(jax.devices()[0]),
              **out.fields, "timings": timings, "wall_s": out.wall_s,
              "metrics": {**{k: None for k, *_ in COLUMNS}, **m}}
    if unavailable:
        result["metrics_unavailable"] = unavailable
    outputs.write_result(run.result_dir(method, sc.name), all_in_focus=out.all_in_focus,
                         defocus=out.defocus, result=result)
    return result


# ----------------------------------------------------------------------------------------
# Table


def _crop_text(opts: Options) -> str:
    return "full" if opts.crop is None else f"{opts.crop[0]}x{opts.crop[1]}"


def _fmt(fmt: str, v) -> str:
    return "" if v is None or (isinstance(v, float) and not math.isfinite(v)) else fmt.format(v)


def collect_rows(opts: Options, methods, scenes, log: Log = _silent) -> list[dict[str, Any]]:
    """One row per (method, scene) with a complete result, then each method's mean."""
    rows = []
    for method in methods:
        per = []
        for sid in scenes:
            d = Path(opts.output_dir) / method / sid
            if not outputs.is_complete(d):
                log(logging.WARNING, f"no complete result in {d}; left out of the table")
                continue
            r = json.loads((d / outputs.RESULT_JSON).read_text())
            m = r.get("metrics", {})
            per.append({"method": method, "preset": opts.preset, "scene": sid,
                        **{k: m.get(k) for k, *_ in COLUMNS},
                        "wall_s": r.get("wall_s", r.get("timings", {}).get("wall_s"))})
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
        sid = "**mean**" if r["scene"] == "mean" else r["scene"]
        cells = [_fmt(f, r[k]) for k, _, _, f in COLUMNS] + [_fmt("{:.0f}", r["wall_s"])]
        lines.append(f"| {name} | {sid} | " + " | ".join(cells) + " |")
    outputs.atomic_write_bytes(out / "table.md", ("\n".join(lines) + "\n").encode())


def _solver_text(s: config_lib.SolverConfig) -> str:
    budgets = (f"level_iters={','.join(map(str, s.level_iters))}" if s.level_iters else
               f"num_iters={s.num_iters}, coarse_iters={s.coarse_iters}")
    return f"{s.optimizer}, pyramid_levels={s.pyramid_levels}, {budgets}"


def _schedule_text(run: Run) -> str:
    """The run's solver, and the one for linear input where it differs."""
    lin = run.scene_opts.linear_solver
    return _solver_text(run.base.solver) + (
        "" if lin is None else f" ({_solver_text(lin)} for linear input)")


def _header(run: Run) -> str:
    opts, cfg = run.opts, run.base
    header = (f"Pixel 4 table: preset {opts.preset}, crop {_crop_text(opts)}, "
              f"{_schedule_text(run)}, num_layers={cfg.mpi.num_layers}, "
              f"recenter_kernels={opts.recenter_kernels}, "
              f"search_init={cfg.init.search}, defocus={cfg.post.defocus}, "
              f"fill={cfg.post.fill}; "
              f"{platform.node()} ({jax.devices()[0].platform}). Defocus metrics on the "
              "8-bit ground truth in [0, 1] units; image metrics after ±6 px alignment and "
              "affine intensity fit.")
    if run.model is not None:
        header += (f" DPANet: {run.model.checkpoint} (step {run.model.step}, width "
                   f"{run.model.config.width}), trained on {run.model.trained_on()}"
                   f"{'; mpi initialised from it (--dpanet_init)' if opts.dpanet_init else ''}.")
    return header


# ----------------------------------------------------------------------------------------
# Driver


def run(opts: Options, log: Log = _silent) -> list[dict[str, Any]]:
    """Runs every method on every scene (keeping results with the same fingerprint) and
    writes the tables. Returns the table rows."""
    r = prepare_run(opts, log)
    out = Path(opts.output_dir)
    runner.check_output_dir(out)
    lock = runner.OutputLock(out)
    lock.acquire()
    try:
        log(logging.INFO, f"methods {r.methods}, scenes {tuple(r.pairs)}, preset {opts.preset}, "
                          f"crop {_crop_text(opts)}, solver {_schedule_text(r)}")
        for pair in r.pairs.values():
            sc = Scene(r, pair)
            for method in r.methods:
                fp = fingerprint(r, method, pair)
                if not _needs_solve(r, method, pair.name, fp):
                    continue
                t0 = time.perf_counter()
                result = _write(sc, method, METHODS[method].run(sc), fp)
                scores = "  ".join(f"{k} {v:.4g}" for k, v in result["metrics"].items()
                                   if isinstance(v, float))
                log(logging.INFO, f"{method}/{pair.name} done in "
                                  f"{time.perf_counter() - t0:.0f}s: {scores}")
        rows = collect_rows(opts, r.methods, tuple(r.pairs), log)
        write_tables(opts, rows, _header(r))
    finally:
        lock.release()
    log(logging.INFO, f"wrote {out / 'table.md'} and {out / 'table.csv'}")
    return rows
