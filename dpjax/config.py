"""Frozen configuration dataclasses, one per concern, composed by `Config`.

All fields are plain Python values, so configs are hashable (safe as static jit
arguments) and serialise to JSON next to every output.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import numpy as np

from dpjax.losses import LossWeights
from dpjax.postprocess import PostConfig
from dpjax.refine import RefineConfig


@dataclasses.dataclass(frozen=True, kw_only=True)
class MpiConfig:
    """Depth discretisation: L layers with scales linspace(scale_max, scale_min, L).

    Layer 0 (the back) gets scale_max. Scales are signed defocus scales of the
    calibrated kernel (1 reproduces the calibration; negative: other side of focus).
    """

    num_layers: int = 12
    scale_min: float = 0.1
    scale_max: float = 1.6

    def __post_init__(self):
        if self.num_layers < 2:
            raise ValueError("num_layers must be at least 2")
        if not self.scale_max > self.scale_min:
            raise ValueError(f"scale_max ({self.scale_max}) must exceed scale_min "
                             f"({self.scale_min})")

    def scales(self) -> np.ndarray:
        """[L] float32 layer scales, back to front."""
        return np.linspace(self.scale_max, self.scale_min, self.num_layers).astype(np.float32)


@dataclasses.dataclass(frozen=True, kw_only=True)
class SolverConfig:
    """Optimiser and schedule.

    Attributes:
      optimizer: "adam" (the paper's) or "lbfgs" (optax.lbfgs with its zoom line
        search, each pyramid level's first step scaled by the coarser level's
        curvature; the apps' default for linear input, LINEAR_INPUT_OPTIMIZER). The
        learning rates below are Adam's; L-BFGS chooses its own step lengths.
      lbfgs_memory: L-BFGS history length m (pairs of parameter-sized arrays kept:
        2m MPI-sized buffers of memory, `dpjax.batch.estimate_solve_memory`). 5 (optax's
        default is 10): on three Pixel 4 crops the same scores as 10 (PSNR within
        0.03 dB, AIWE(1) within 0.0006) with half the history.
      num_iters: iteration budget at the finest level.
      coarse_iters: iteration budget at each coarser pyramid level.
      level_iters: optional per-level budgets, coarsest first (overrides num_iters
        and coarse_iters; its length must equal pyramid_levels).
      pyramid_levels: 1 = single scale; n = solve at 1/2^(n-1) resolution first.
      lr_start, lr_end: Adam learning rate, decaying log-linearly over each level.
      refine_lr: optional (start, end) Adam learning rates for the levels after the
        first (a fresh Adam state takes steps of about the learning rate in every
        logit, which would undo much of an upsampled coarse solution).
      chunk_size: iterations per compiled chunk between progress reports.
      rel_tol: stop a level when the mean loss of a chunk improves on the previous
        chunk's by less than this fraction (0 disables the rule).
      conv_method: "fft" or "direct" spatially varying convolution.
      round_fft: round tile FFT sizes up to products of 2, 3 and 5.
      seed: seeds the optional initial noise (the solve is deterministic).
      init_noise: std of Gaussian noise added to the initial logits.
      colour_levels: how many of the finest pyramid levels solve every channel of a
        colour observation; the coarser levels solve its channel mean (one shared
        intensity per layer), which costs what a grey solve costs, and the colours
        start at the first colour level from that intensity times the observation's
        local chroma (`solver.expand_channels`). A count >= pyramid_levels solves
        colour throughout (the behaviour before this option). No effect on
        one-channel observations.
      kernel_mass_cut: the layer kernels are cut to the smallest centred window that
        holds all but this fraction of every reference kernel's mass, rescaled with
        the layer (and renormalised), so the transforms' size, hence a step's time and
        memory, follow the kernels' support rather than their calibration window.
        0 keeps the whole window. 0.015 is about what the published code drops by
        cutting its layer kernels to the calibration's 61 px (up to 1.7% of a Pixel 4
        kernel at the paper's widest scale, 1.6; `docs/implementation.md`, "Kernel
        window").
    """

    optimizer: Literal["adam", "lbfgs"] = "adam"
    lbfgs_memory: int = 5
    num_iters: int = 1000
    coarse_iters: int = 300
    level_iters: tuple[int, ...] | None = None
    pyramid_levels: int = 1
    lr_start: float = 0.3
    lr_end: float = 0.1
    refine_lr: tuple[float, float] | None = (0.05, 0.02)
    chunk_size: int = 50
    rel_tol: float = 0.0
    conv_method: Literal["fft", "direct"] = "fft"
    round_fft: bool = True
    seed: int = 0
    init_noise: float = 0.0
    colour_levels: int = 1
    kernel_mass_cut: float = 0.015

    def __post_init__(self):
        if self.optimizer not in ("adam", "lbfgs"):
            raise ValueError(f"unknown optimizer {self.optimizer!r}; use 'adam' or 'lbfgs'")
        if self.lbfgs_memory < 1:
            raise ValueError(f"lbfgs_memory must be >= 1, got {self.lbfgs_memory}")
        if self.conv_method not in ("fft", "direct"):
            raise ValueError(f"unknown conv_method {self.conv_method!r}")
        if self.num_iters < 1 or self.chunk_size < 1 or self.pyramid_levels < 1:
            raise ValueError("num_iters, chunk_size and pyramid_levels must be >= 1")
        if self.coarse_iters < 0:
            raise ValueError("coarse_iters must be >= 0")
        if self.colour_levels < 1:
            raise ValueError(f"colour_levels must be >= 1 (the finest level solves every "
                             f"channel), got {self.colour_levels}")
        if not 0 <= self.kernel_mass_cut < 1:
            raise ValueError(f"kernel_mass_cut must be in [0, 1), got {self.kernel_mass_cut}")
        if isinstance(self.refine_lr, list):  # from JSON
            object.__setattr__(self, "refine_lr", tuple(self.refine_lr))
        if self.refine_lr is not None and len(self.refine_lr) != 2:
            raise ValueError("refine_lr must be (start, end)")
        if self.level_iters is not None:
            if isinstance(self.level_iters, list):  # from JSON
                object.__setattr__(self, "level_iters", tuple(self.level_iters))
            if len(self.level_iters) != self.pyramid_levels or min(self.level_iters) < 0:
                raise ValueError(f"level_iters {self.level_iters} must hold "
                                 f"{self.pyramid_levels} non-negative budgets, coarsest first")

    def budget(self, level: int) -> int:
        """Iterations at pyramid level `level` (0 = finest)."""
        if self.level_iters is not None:
            return self.level_iters[self.pyramid_levels - 1 - level]
        return self.num_iters if level == 0 else self.coarse_iters


# The apps' schedules (`schedule`): per optimizer, the budgets of each quality, coarsest
# level first.
# Adam, the optimizer until 2026-12-06 (its schedules as they were then): "fast" was
# chosen among schedules on Pixel 4 crops (BENCHMARKS.md, "Choosing the schedule");
# "best", for accelerators, takes 4x the half-resolution steps and 3x the full-resolution
# ones, ~3x the time (on the six shared 3x4 crops: +0.13 dB PSNR, AIWE(1) 0.051 vs 0.063,
# but 1 - |rho_s| 0.465 vs 0.433; experiments/results/pixel4.md, "--quality=best").
ADAM_LEVEL_ITERS = {"fast": (200, 120, 20), "best": (200, 480, 60)}
# L-BFGS (the apps' default for linear input, LINEAR_INPUT_OPTIMIZER): in the same
# number of steps it reaches a lower objective than Adam (on the six Pixel 4 crops 13-35%
# lower), each step costing ~1.15x Adam's. Its "fast" budgets were half of Adam's,
# 100/60/10: on the six shared 3x4 crops, against Adam's fast schedule, PSNR +0.06 dB,
# SSIM +0.004, AIWE(1) 0.0488 vs 0.0560, 1 - |rho_s| 0.483 vs 0.472, in 62% of the time;
# since 2026-12-07 6 full-resolution steps instead of 10: PSNR -0.012 dB on the six crops'
# mean (chosen on 001/005/008 among 100/40/10, 100/60/6 and 60/40/10, checked on
# 011/013/016), AIWE(1) and 1 - |rho_s| within 0.005, 9% less time a crop (full frames:
# BENCHMARKS.md). Its "best" is Adam's fast budgets: PSNR +0.10 dB, AIWE(1) 0.0424,
# 1 - |rho_s| 0.459, in ~1.15x Adam's fast time (BENCHMARKS.md, "L-BFGS for the fit").
LBFGS_LEVEL_ITERS = {"fast": (100, 60, 6), "best": (200, 120, 20)}
QUALITY_LEVEL_ITERS = {"lbfgs": LBFGS_LEVEL_ITERS, "adam": ADAM_LEVEL_ITERS}
# Adam is the library's default and the apps' for display-referred input (8-bit, JPEG,
# sRGB exports): on the Canon R6 Mark II's 8-bit exports L-BFGS ranks depth worse
# (1 - |rho_s| 0.319 vs 0.274 on the six scenes, plane +1.04 vs +1.05 dB;
# experiments/results/own_camera.md, "Image priors in the input's encoding").
DEFAULT_OPTIMIZER = "adam"
# The apps' optimizer for linear input (raw, 16-bit, float files) when none is asked
# for (`presets.linear_input_solver`, resolved per scene by `dpjax.scene.configure`): on
# the Pixel 4's raw pairs L-BFGS is as good or better in a little over half of Adam's
# time, with lab and with self-calibrated kernels (BENCHMARKS.md, "L-BFGS for linear
# input" and "Each level's first L-BFGS step").
LINEAR_INPUT_OPTIMIZER = "lbfgs"
# The default optimizer's budgets.
FAST_LEVEL_ITERS = QUALITY_LEVEL_ITERS[DEFAULT_OPTIMIZER]["fast"]
BEST_LEVEL_ITERS = QUALITY_LEVEL_ITERS[DEFAULT_OPTIMIZER]["best"]
QUALITIES = ("fast", "best")


def schedule(*, quality: str | None = None, pyramid_levels: int | None = None,
             level_iters=None, num_iters: int | None = None,
             optimizer: str | None = None) -> SolverConfig:
    """The solver schedule of the apps and the runner: the one place its defaults live.

    Every app flag means the same thing through this function:
      - nothing given: the default optimizer's fast schedule (FAST_LEVEL_ITERS, 3 levels);
      - `quality`: "fast" (the same) or "best" (BEST_LEVEL_ITERS, for accelerators), of
        the optimizer's own budgets (QUALITY_LEVEL_ITERS);
      - `level_iters`: every level's budget, coarsest first (`pyramid_levels`, when also
        given, must equal its length);
      - `num_iters`: the finest level's budget; the coarser levels keep the quality's
        schedule's (or, for a level count other than 3 without `level_iters`,
        SolverConfig's `coarse_iters`);
      - `pyramid_levels` alone, other than 3: SolverConfig's single-level budgets
        (`num_iters` 1000 at the finest level, `coarse_iters` 300 at the others);
      - `optimizer`: "lbfgs" or "adam"; default `DEFAULT_OPTIMIZER`.

    Raises:
      ValueError: an unknown quality; `level_iters` together with `num_iters` (both set
        the finest level) or with `quality` (both set every level); `quality` with a
        level count other than 3; a length that disagrees with `pyramid_levels`, or
        invalid budgets.
    """
    optimizer = optimizer or DEFAULT_OPTIMIZER
    if optimizer not in QUALITY_LEVEL_ITERS:
        raise ValueError(f"unknown optimizer {optimizer!r}; use "
                         f"{' or '.join(map(repr, QUALITY_LEVEL_ITERS))}")
    solver = _schedule_budgets(QUALITY_LEVEL_ITERS[optimizer], quality=quality,
                               pyramid_levels=pyramid_levels, level_iters=level_iters,
                               num_iters=num_iters)
    return dataclasses.replace(solver, optimizer=optimizer)


def _schedule_budgets(budgets: dict[str, tuple[int, ...]], *, quality, pyramid_levels,
                      level_iters, num_iters) -> SolverConfig:
    """`schedule`'s level count and budgets, from one optimizer's `budgets`."""
    if quality is not None and quality not in QUALITIES:
        raise ValueError(f"quality must be one of {', '.join(QUALITIES)}, got {quality!r}")
    if level_iters is not None and num_iters is not None:
        raise ValueError("give either level_iters (every level) or num_iters (the finest "
                         "level), not both")
    if level_iters is not None and quality is not None:
        raise ValueError("give either level_iters or quality (both set every level's "
                         "budget), not both")
    base = budgets[quality or "fast"]
    if quality is not None and pyramid_levels is not None and pyramid_levels != len(base):
        raise ValueError(f"quality {quality} is a {len(base)}-level schedule, "
                         f"pyramid_levels is {pyramid_levels}")
    if level_iters is not None:
        level_iters = tuple(int(v) for v in level_iters)
        if pyramid_levels is not None and pyramid_levels != len(level_iters):
            raise ValueError(f"level_iters {','.join(map(str, level_iters))} has "
                             f"{len(level_iters)} levels, pyramid_levels is {pyramid_levels}")
        return SolverConfig(pyramid_levels=len(level_iters), level_iters=level_iters)
    levels = len(base) if pyramid_levels is None else int(pyramid_levels)
    if levels == len(base):
        its = base if num_iters is None else base[:-1] + (num_iters,)
        return SolverConfig(pyramid_levels=levels, level_iters=tuple(int(v) for v in its))
    if num_iters is None:
        return SolverConfig(pyramid_levels=levels)
    return SolverConfig(pyramid_levels=levels, num_iters=int(num_iters))


def paper_solver(num_iters: int = 10_000) -> SolverConfig:
    """The paper's schedule: single-scale Adam, lr 0.3 -> 0.1 log-linearly."""
    return SolverConfig(pyramid_levels=1, num_iters=num_iters)


@dataclasses.dataclass(frozen=True, kw_only=True)
class InitConfig:
    """How the layer weights start (`dpjax.pipeline.init_from_search`).

    Attributes:
      search: start near the kernel-symmetry search's defocus map (the search the auto
        preset's range estimate runs) instead of the paper's uniform start.
      spread_layers: width of each pixel's Gaussian over the layers, in layer spacings.
      weight: share of that Gaussian where the search is sure (the rest is 1/L).
      fill_sigma_px: smoothing of the search map in full-resolution px, which also
        fills the pixels the search was not sure of. The start needs only the coarse
        layout: on the six Pixel 4 scenes' 3x4 crops 48 px kept the AIWE gains of 16 px
        and lost less rank order (mean 1-|rho_s| 0.474 vs 0.489), the search's
        medium-scale errors being what the short schedule keeps
        (experiments/results/pixel4.md).
      weight_by_confidence: scale the lean by the local fraction of confident search
        pixels (so that the start stays uniform far from any).
    """

    search: bool = False
    spread_layers: float = 1.5
    weight: float = 0.5
    fill_sigma_px: float = 48.0
    weight_by_confidence: bool = True

    def __post_init__(self):
        if not 0.0 <= self.weight <= 1.0 or self.spread_layers <= 0 or self.fill_sigma_px <= 0:
            raise ValueError("init needs 0 <= weight <= 1, spread_layers > 0 and "
                             "fill_sigma_px > 0")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config:
    """Everything a solve needs besides the data."""

    mpi: MpiConfig = MpiConfig()
    loss: LossWeights = LossWeights()
    solver: SolverConfig = SolverConfig()
    post: PostConfig = PostConfig()
    init: InitConfig = InitConfig()
    refine: RefineConfig = RefineConfig()

    def replace(self, **sections: Any) -> Config:
        """Returns a copy with whole sections or dotted fields replaced.

        Example: cfg.replace(**{"solver.num_iters": 100, "mpi.num_layers": 8}).
        """
        updates: dict[str, dict[str, Any]] = {}
        direct: dict[str, Any] = {}
        for key, value in sections.items():
            if "." in key:
                section, field = key.split(".", 1)
                updates.setdefault(section, {})[field] = value
            else:
                direct[key] = value
        cfg = dataclasses.replace(self, **direct)
        for section, fields in updates.items():
            if not hasattr(cfg, section):
                raise ValueError(f"unknown config section {section!r}")
            cfg = dataclasses.replace(cfg, **{
                section: dataclasses.replace(getattr(cfg, section), **fields)})
        return cfg


def to_dict(cfg: Config) -> dict[str, Any]:
    """The resolved configuration as a JSON-ready dict."""
    return dataclasses.asdict(cfg)


def from_dict(d: dict[str, Any]) -> Config:
    """Inverse of to_dict; unknown keys raise TypeError.

    A dict written before an option existed reads as solved without it: no "refine"
    section as refinement off, a solver section without "colour_levels" as colour at
    every level, one without "kernel_mass_cut" as uncut kernels, a loss section
    without "noise_power" as the unweighted data terms.
    """
    refine = RefineConfig(**d["refine"]) if "refine" in d else RefineConfig(iters=0)
    solver = dict(d.get("solver", {}))
    if solver and "colour_levels" not in solver:
        solver["colour_levels"] = solver.get("pyramid_levels", SolverConfig.pyramid_levels)
    if solver:
        solver.setdefault("kernel_mass_cut", 0.0)
    loss = dict(d.get("loss", {}))
    if loss:
        loss.setdefault("noise_power", 0.0)
    return Config(mpi=MpiConfig(**d.get("mpi", {})), loss=LossWeights(**loss),
                  solver=SolverConfig(**solver), post=PostConfig(**d.get("post", {})),
                  init=InitConfig(**d.get("init", {})), refine=refine)
