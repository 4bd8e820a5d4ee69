"""Jointly fits the MPI to both dual-pixel views: defocus map and all-in-focus image.

`fit` is the entry point; `fit_batch` solves same-size captures together. Each
pyramid level has one compiled region that runs a chunk of optimiser steps on device
(`lax.scan`; vmapped over the scenes of a batch) and returns to the host only to
report progress. Observations and kernel spectra are arguments of that region,
never closure constants. A non-finite loss or gradient stops the updates inside the
chunk and is raised on the host as FloatingPointError.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dpjax import conv, losses, mpi, postprocess, refine
from dpjax.config import Config, SolverConfig
from dpjax.kernels import (
    KernelBank,
    downsample_bank,
    downsampled_kernel_size,
    layer_kernel_radius,
    rescaled_radius,
    support_radius,
)


class Progress(NamedTuple):
    """What the host learns after each chunk.

    `params` are the current MPI logits at this level's resolution (device arrays,
    with one channel at the levels that solve a colour observation's channel mean,
    `SolverConfig.colour_levels`;
    valid only during the callback: their buffers are donated to the next chunk; None
    in `fit_batch`'s reports). `elapsed_s` is the solver's own wall time: time spent
    inside callbacks is excluded. In a batch, `step` and `loss` are the scene's own
    (a scene stopped by its rel_tol rule keeps its last ones).
    """

    level: int  # 0 = finest
    num_levels: int
    step: int  # steps done at this level
    num_steps: int  # budget at this level
    loss: float
    elapsed_s: float
    params: mpi.MpiParams | None = None
    scales: np.ndarray | None = None
    block: int = 0  # the block being solved (`dpjax.blocks.fit_blocks`), 0-based
    num_blocks: int = 1


@dataclasses.dataclass(frozen=True)
class FitResult:
    """Output of `fit`, and per scene of `fit_batch` (host numpy arrays).

    Attributes:
      all_in_focus: [H, W, C] estimated sharp image, same scale as the input
        (bilateral-filtered when config.post.bilateral).
      all_in_focus_raw: [H, W, C] the MPI's composite (refined when config.refine.iters
        > 0, `dpjax.refine`) before post-processing.
      defocus: [H, W] signed defocus map (in layer-scale units), read off the layers by
        config.post.defocus (`dpjax.mpi.estimate_defocus`), its textureless regions
        filled when config.post.fill (`dpjax.postprocess.fill_defocus`).
      params: final MPI logits at full resolution (None after a block solve,
        `dpjax.blocks.fit_blocks`).
      scales: [L] layer scales.
      loss_history: [N] total loss at every step, all levels in order.
      level_iterations: steps run at each level, coarsest first.
      terms: final loss terms at full resolution (floats).
      timings: seconds for kernel preparation, compilation + solving per level, the
        refinement (refine_s, when it ran), total (in a batch: the whole batch's,
        shared by its scenes).
      refine: the all-in-focus refinement's record (objective at its start and end,
        its data and prior terms at the end, iterations, seconds), or None when it did
        not run (config.refine.iters == 0).
      blocks: a block solve's per-block records (`dpjax.blocks.fit_blocks`), else None.
    """

    all_in_focus: np.ndarray
    all_in_focus_raw: np.ndarray
    defocus: np.ndarray
    params: mpi.MpiParams | None
    scales: np.ndarray
    loss_history: np.ndarray
    level_iterations: tuple[int, ...]
    terms: dict[str, float]
    timings: dict[str, float]
    refine: dict[str, Any] | None = None
    blocks: list[dict[str, Any]] | None = None


class _StepConfig(NamedTuple):
    """The solver settings the compiled chunk depends on (its static argument).

    Budgets, tolerances and pyramid settings are left out so that changing them
    does not trigger a recompilation.
    """

    optimizer: str
    lr_start: float
    lr_end: float
    chunk_size: int
    lbfgs_memory: int

    @classmethod
    def of(cls, cfg: SolverConfig, refine: bool = False) -> _StepConfig:
        lr = cfg.refine_lr if (refine and cfg.refine_lr is not None) else (cfg.lr_start,
                                                                           cfg.lr_end)
        return cls(cfg.optimizer, float(lr[0]), float(lr[1]), cfg.chunk_size,
                   cfg.lbfgs_memory)


def _lr_schedule(cfg: _StepConfig, num_steps) -> optax.Schedule:
    """Log-linear decay lr_start -> lr_end over num_steps (paper: 0.3 -> 0.1)."""
    ratio = cfg.lr_end / cfg.lr_start

    def schedule(count):
        frac = count / jnp.maximum(num_steps - 1, 1)
        return cfg.lr_start * ratio ** jnp.minimum(frac, 1.0)

    return schedule


# Most L-BFGS iterations take the line search's first step. optax's default allows 20
# trials when that step fails, and late in a level (the objective nearly flat in float32)
# a run of such iterations made a half-resolution level of a Pixel 4 crop take 4.9x its
# usual time (125 s against 26 s); capped at 5 trials the same solve took its usual
# time and ended at a slightly lower objective (BENCHMARKS.md, "L-BFGS for the fit").
LBFGS_LINESEARCH_STEPS = 5


class _FirstStepState(NamedTuple):
    count: jax.Array  # int32 scalar: iterations taken at this level
    scale: jax.Array  # float32 scalar: the first step's inverse-Hessian scale; NaN: optax's


def _seeded_first_step() -> optax.GradientTransformationExtraArgs:
    """L-BFGS's first direction at a level, -scale * grad, when its state's scale is set.

    L-BFGS starts each pyramid level without history, and optax then scales the first
    direction by a capped reciprocal of the gradient norm: on a Pixel 4 frame 30-70x
    shorter than the curvature the level goes on to measure implies, so the line search
    spent 3 extra trials (each a loss and gradient at the level's resolution) doubling
    it to 8x. The previous level's curvature (`_next_level_scale`) gives the step's
    length instead.
    Placed after `optax.scale_by_lbfgs` in the chain; reads the raw gradient from the
    `grad` keyword the line search also needs.
    """

    def init(params):
        del params
        return _FirstStepState(jnp.zeros([], jnp.int32), jnp.full([], jnp.nan, jnp.float32))

    def update(updates, state, params=None, *, grad, **extra_args):
        del params, extra_args
        seeded = (state.count == 0) & jnp.isfinite(state.scale)
        updates = jax.tree_util.tree_map(
            lambda u, g: jnp.where(seeded, state.scale * g, u).astype(u.dtype), updates, grad)
        return updates, _FirstStepState(state.count + 1, state.scale)

    return optax.GradientTransformationExtraArgs(init, update)


# Where the L-BFGS chain (`_make_optimizer`) keeps scale_by_lbfgs's state and the seeded
# first step's (`_FirstStepState`).
_LBFGS_STATE, _SEED_STATE = 0, 1


def _with_first_scale(opt_state: tuple, scale: jax.Array) -> tuple:
    """The L-BFGS chain's state with the seeded first step's scale set."""
    seed = opt_state[_SEED_STATE]._replace(scale=scale)
    return opt_state[:_SEED_STATE] + (seed,) + opt_state[_SEED_STATE + 1:]


def _make_optimizer(cfg: _StepConfig, num_steps) -> optax.GradientTransformation:
    if cfg.optimizer == "adam":
        return optax.adam(_lr_schedule(cfg, num_steps))
    # optax.lbfgs's chain with the seeded first step after the preconditioner; its state
    # is (scale_by_lbfgs's, _FirstStepState, scale's, the line search's): the indices
    # _LBFGS_STATE and _SEED_STATE.
    return optax.chain(
        optax.scale_by_lbfgs(memory_size=cfg.lbfgs_memory),
        _seeded_first_step(),
        optax.scale(-1.0),
        optax.scale_by_zoom_linesearch(max_linesearch_steps=LBFGS_LINESEARCH_STEPS,
                                       initial_guess_strategy="one"))


def _next_level_scale(opt_state, pixel_ratio: float) -> jax.Array:
    """The first step's scale at the next level from one scene's L-BFGS state at this one.

    L-BFGS's own estimate of the inverse Hessian's scale, s.y / y.y, pooled over the
    pairs in its memory (sums of s_i.y_i over sums of y_i.y_i), times the ratio of the
    levels' pixel counts: the objective averages over pixels, so the curvature per
    parameter falls by that ratio (on a Pixel 4 frame the scale measured at the start of
    each level was 1.6-4x the previous level's final one for a ratio of 4). NaN (optax's
    own first step) when the memory holds no pair of positive curvature.
    """
    lbfgs = opt_state[_LBFGS_STATE]
    leaves = zip(jax.tree_util.tree_leaves(lbfgs.diff_params_memory),
                 jax.tree_util.tree_leaves(lbfgs.diff_updates_memory))
    sy = jnp.float32(0.0)
    yy = jnp.float32(0.0)
    for s, y in leaves:
        sy = sy + jnp.vdot(s, y)
        yy = yy + jnp.vdot(y, y)
    ok = (sy > 0) & (yy > 0)
    return jnp.where(ok, sy / jnp.where(ok, yy, 1.0) * pixel_ratio, jnp.nan).astype(jnp.float32)


def _all_finite(tree) -> jax.Array:
    leaves = jax.tree_util.tree_leaves(tree)
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def _total_loss(params, observation, lk, weights):
    return losses.loss_terms(params, observation, lk, weights).total


def _chunk(params: mpi.MpiParams, opt_state, step0: jax.Array, num_steps: jax.Array,
           stop_at: jax.Array, observation: jax.Array, lk: mpi.LayerKernels, *,
           cfg: _StepConfig, weights: losses.LossWeights):
    """Runs cfg.chunk_size optimiser steps of one scene (fewer once step0 + i reaches stop_at).

    Un-jitted: `_run_chunk` compiles it for one scene, `_run_chunk_batch` vmaps it over
    the scenes of a batch.

    Args:
      params: MPI logits (donated).
      opt_state: optimiser state (donated).
      step0: int32 scalar, steps already done at this level.
      num_steps: int32 scalar, the level's budget (it sets the learning-rate schedule).
      stop_at: int32 scalar <= num_steps, the step at which this scene stops: the
        budget, or in a batch the step at which its stopping rule fired.
      observation: [V, C, H, W].
      lk: prepared layer kernels.

    Returns:
      (params, opt_state, losses [chunk], bad_step) where bad_step is the first step
      whose loss or gradient was non-finite, or -1. Skipped steps have NaN losses.
    """
    opt = _make_optimizer(cfg, num_steps)
    value_fn = functools.partial(_total_loss, observation=observation, lk=lk, weights=weights)

    def step(carry, i):
        n = step0 + i

        def do_step(operand):
            params, state, bad_step = operand
            if cfg.optimizer == "adam":
                value, grad = jax.value_and_grad(value_fn)(params)
                updates, new_state = opt.update(grad, state, params)
            else:
                value, grad = optax.value_and_grad_from_state(value_fn)(params, state=state)
                updates, new_state = opt.update(grad, state, params, value=value, grad=grad,
                                                value_fn=value_fn)
            new_params = optax.apply_updates(params, updates)
            ok = jnp.isfinite(value) & _all_finite(grad) & _all_finite(new_params)

            def keep(new, old):
                # The last good iterate when something is non-finite; the host raises.
                return jax.tree_util.tree_map(lambda a, b: jnp.where(ok, a, b), new, old)

            params = keep(new_params, params)
            # The optimiser state is not kept: after a bad step the scene takes no more
            # steps and the host raises, so nothing reads it, and selecting between the
            # old and the new state would hold both (for L-BFGS 2 x (2m + 3) MPI-sized
            # buffers) where the update can otherwise reuse the old one's memory.
            state = new_state
            bad_step = jnp.where(ok, bad_step, n)
            return (params, state, bad_step), value.astype(jnp.float32)

        def skip(operand):
            return operand, jnp.float32(jnp.nan)

        def live(operand):
            # Per scene: under vmap this predicate is batched and the cond becomes a
            # select (every scene computes the step; stopped ones discard it).
            return jax.lax.cond((n < stop_at) & (operand[2] < 0), do_step, skip, operand)

        # Shared by all scenes of a batch, so it stays a branch under vmap: the unused
        # steps of a level's last, partial chunk cost nothing.
        return jax.lax.cond(n < num_steps, live, skip, carry)

    carry0 = (params, opt_state, jnp.int32(-1))
    (params, opt_state, bad_step), values = jax.lax.scan(
        step, carry0, jnp.arange(cfg.chunk_size, dtype=jnp.int32))
    return params, opt_state, values, bad_step


def _chunk_batch(params: mpi.MpiParams, opt_state, step0: jax.Array, num_steps: jax.Array,
                 stop_at: jax.Array, observation: jax.Array, lk: mpi.LayerKernels, *,
                 cfg: _StepConfig, weights: losses.LossWeights):
    """`_chunk` vmapped over the scenes of a batch.

    Args:
      params, opt_state: as `_chunk`'s with a leading scene axis B on every leaf.
      step0, num_steps: int32 scalars shared by the batch.
      stop_at: [B] int32.
      observation: [B, V, C, H, W].
      lk: layer kernels with a leading B axis on every array (one static geometry).

    Returns:
      (params, opt_state, losses [B, chunk], bad_step [B]).
    """
    body = functools.partial(_chunk, cfg=cfg, weights=weights)
    return jax.vmap(body, in_axes=(0, 0, None, None, 0, 0, 0))(
        params, opt_state, step0, num_steps, stop_at, observation, lk)


_STATIC = ("cfg", "weights")
_run_chunk = jax.jit(_chunk, static_argnames=_STATIC, donate_argnums=(0, 1))
_run_chunk_batch = jax.jit(_chunk_batch, static_argnames=_STATIC, donate_argnums=(0, 1))


@functools.partial(jax.jit, static_argnames=("geom", "own_radius"))
def _prepare(kernels: jax.Array, scales: jax.Array, geom: conv.ConvGeometry,
             own_radius: int):
    bank = KernelBank(kernels=kernels, grid=geom.grid)
    return mpi.prepare_layer_kernels(bank, scales, geom, own_radius=own_radius)


@functools.partial(jax.jit, static_argnames=("weights",))
def _final_terms(params, observation, lk, weights):
    return losses.loss_terms(params, observation, lk, weights)


def downsample_image(x: jax.Array, factor: int) -> jax.Array:
    """Area downsampling of the last two axes by an integer factor."""
    if factor == 1:
        return x
    h, w = x.shape[-2:]
    if h % factor or w % factor:
        raise ValueError(f"image {h}x{w} is not divisible by the pyramid factor {factor}")
    y = x.reshape(x.shape[:-2] + (h // factor, factor, w // factor, factor))
    return y.mean(axis=(-3, -1))


def upsample_params(params: mpi.MpiParams, shape: tuple[int, int]) -> mpi.MpiParams:
    """Bilinear upsampling of the MPI logits to the next pyramid level."""

    def up(x):
        return jax.image.resize(x, x.shape[:-2] + shape, method="linear")

    return mpi.MpiParams(color_logits=up(params.color_logits), alpha_logits=up(params.alpha_logits))


_CHROMA_EPS = 1e-3  # keeps the chroma of near-black pixels near neutral


def grey_params(params: mpi.MpiParams) -> mpi.MpiParams:
    """The MPI with each layer's colours replaced by their mean intensity.

    Works on one scene's logits ([L, C, H, W] colours) and on a batch's ([B, L, C, H, W]).
    """
    mean = jnp.mean(jax.nn.sigmoid(params.color_logits), axis=-3, keepdims=True)
    return params._replace(color_logits=jax.scipy.special.logit(mean))


def expand_channels(params: mpi.MpiParams, observation: jax.Array) -> mpi.MpiParams:
    """One-channel MPI logits turned into the observation's C channels.

    Each layer keeps its intensity and takes the colour of the views around each pixel:
    c_lk = c_l * m_k / mean_k(m_k) with m the mean of the views (the blurred image's
    chroma, which the colour levels then sharpen), clipped into (0, 1).

    Args:
      params: colours [L, 1, H, W] (or [B, L, 1, H, W]).
      observation: [V, C, H, W] (or [B, V, C, H, W]) at the same resolution.
    """
    m = jnp.mean(observation, axis=-4)  # [(B,) C, H, W]
    chroma = (m + _CHROMA_EPS) / (jnp.mean(m, axis=-3, keepdims=True) + _CHROMA_EPS)
    color = jax.nn.sigmoid(params.color_logits) * chroma[..., None, :, :, :]
    color = jnp.clip(color, 1e-3, 1.0 - 1e-3)
    return params._replace(color_logits=jax.scipy.special.logit(color))


def match_channels(params: mpi.MpiParams, observation: jax.Array) -> mpi.MpiParams:
    """`params` with the observation's channel count (grey_params / expand_channels)."""
    have, want = params.color_logits.shape[-3], observation.shape[-3]
    if have == want:
        return params
    if want == 1:
        return grey_params(params)
    if have == 1:
        return expand_channels(params, observation)
    raise ValueError(f"init has {have} channels, the observation {want}")


def _kernel_radius(s: _Scene, factor: int) -> int:
    """Half-width of the layer kernels at the pyramid level with this factor.

    The scene's support window (full resolution, `_Scene.support`) shrunk to the level
    as `downsample_bank` shrinks the kernels: it holds the same mass of them.
    """
    lvl_size = downsampled_kernel_size(s.bank.kernel_size, factor)
    lvl_support = rescaled_radius(2 * s.support + 1, 1.0 / factor)
    return layer_kernel_radius(lvl_size, s.max_abs, lvl_support)


def _level_problem(s: _Scene, factor: int, at_least: int = 0, exact: bool = False):
    """Observation and prepared layer kernels of the pyramid level with this factor.

    Args:
      s: the scene.
      at_least: size the convolution for at least this kernel half-width (a batch's
        widest scene's), not only for the scene's own.
      exact: use that half-width as it is. By default it is widened to the largest
        with the same FFT size (`conv.ConvGeometry.shared`), so that scenes whose
        layer ranges differ a little share one compiled solver. Zero-padded kernels
        and a wider edge padding give the same blur, and the data term's bias factor
        keeps this scene's own kernel window (`own_radius`), so only float rounding
        changes.

    Returns:
      (observation [V, C, H/f, W/f], LayerKernels).
    """
    lvl_bank = downsample_bank(s.bank, factor)
    lvl_obs = downsample_image(s.planar, factor)
    own = _kernel_radius(s, factor)
    scfg = s.config.solver
    make = conv.ConvGeometry.create if exact else conv.ConvGeometry.shared
    geom = make(lvl_bank.grid, max(own, at_least), scfg.conv_method, scfg.round_fft)
    lk = _prepare(lvl_bank.kernels, s.scales, geom, own)
    jax.block_until_ready(lk.kernels)
    return lvl_obs, lk


def _refine_needs_own(s: _Scene, lk: mpi.LayerKernels) -> bool:
    """Whether the refinement must not use the fit's kernels `lk` (a widened window).

    The refinement's unknown extends by the geometry's radius beyond the frame
    (boundary "free"), so it is not indifferent to a widened window: it gets the
    scene's own radius and solves the same problem whatever geometry the fit shared.
    """
    return s.config.refine.iters > 0 and _kernel_radius(s, 1) != lk.geom.radius


def _refine_kernels(s: _Scene, lk: mpi.LayerKernels) -> mpi.LayerKernels | None:
    """The refinement's kernels (the scene's own window) where they differ from `lk`."""
    return _level_problem(s, 1, exact=True)[1] if _refine_needs_own(s, lk) else None


def validate_observation(observation, bank: KernelBank) -> np.ndarray:
    """Checks shape, finiteness and the match with the kernel grid.

    Args:
      observation: [2, H, W, C] left and right views.

    Returns:
      float32 numpy array [2, H, W, C].
    """
    obs = np.asarray(observation, dtype=np.float32)
    if obs.ndim != 4 or obs.shape[0] != 2:
        raise ValueError(f"observation must be [2, H, W, C] (left, right); got {obs.shape}")
    if not np.all(np.isfinite(obs)):
        raise ValueError("observation contains NaN or Inf values")
    if obs.shape[1:3] != bank.grid.image_shape:
        raise ValueError(
            f"observation is {obs.shape[1]}x{obs.shape[2]} but the kernel grid "
            f"({bank.grid.rows}x{bank.grid.cols} tiles of {bank.grid.tile_h}x{bank.grid.tile_w}) "
            f"covers {bank.grid.image_shape[0]}x{bank.grid.image_shape[1]}")
    if obs.max() <= 0:
        raise ValueError("observation is all zeros")
    return obs


_DEFAULT_CONFIG = Config()


class BatchFloatingPointError(FloatingPointError):
    """A scene of `fit_batch` diverged; `scenes` holds the indices of those that did."""

    def __init__(self, message: str, scenes: tuple[int, ...]):
        super().__init__(message)
        self.scenes = scenes


class _Scene(NamedTuple):
    """One validated capture, as the level loop needs it."""

    planar: jax.Array  # [V, C, H, W]
    bank: KernelBank
    scales: jax.Array  # [L]
    max_abs: float  # max |scales|
    config: Config
    support: int  # the reference kernels' support radius (kernels.support_radius)


def _scene(observation, bank: KernelBank, config: Config,
           kernel_support: int | None = None) -> _Scene:
    obs = validate_observation(observation, bank)
    scales = config.mpi.scales()
    if kernel_support is None:
        kernel_support = support_radius(bank.kernels, config.solver.kernel_mass_cut)
    if not 0 <= kernel_support <= (bank.kernel_size - 1) // 2:
        raise ValueError(f"kernel_support {kernel_support} must be in "
                         f"[0, {(bank.kernel_size - 1) // 2}] for {bank.kernel_size}-px kernels")
    return _Scene(planar=jnp.asarray(np.transpose(obs, (0, 3, 1, 2))), bank=bank,
                  scales=jnp.asarray(scales), max_abs=float(np.max(np.abs(scales))),
                  config=config, support=int(kernel_support))


def batch_key(config: Config):
    """What scenes solved together by `fit_batch` must share (hashable).

    The layer count, the loss weights (static arguments of the compiled chunk) and
    the whole solver configuration (schedule, budgets, stopping rule, seed). The
    layer range and the post-processing may differ per scene.
    """
    return (config.mpi.num_layers, config.loss, config.solver)


def fit(observation, bank: KernelBank, config: Config = _DEFAULT_CONFIG, *,
        callback: Callable[[Progress], None] | None = None,
        init: mpi.MpiParams | None = None, init_is_solution: bool = True,
        kernel_support: int | None = None) -> FitResult:
    """Estimates the defocus map and the all-in-focus image of one DP capture.

    Args:
      observation: [2, H, W, C] left and right views, linear, roughly in [0, 1].
      bank: calibrated kernels whose tile grid covers exactly H x W.
      config: the resolved configuration.
      callback: called on the host after every chunk with a Progress; returning
        True stops the solve there (e.g. a wall-time budget), keeping the result.
      init: optional initial MPI logits at the coarsest level's resolution.
      init_is_solution: True (default) when `init` is an earlier solve's result, so
        its first level already refines (SolverConfig.refine_lr); False when it is
        only a better starting image (e.g. a network's all-in-focus estimate with the
        usual initial alphas), so the first level runs the normal schedule.
      kernel_support: the support radius that sizes the layer kernels
        (`kernels.support_radius` at config.solver.kernel_mass_cut); default `bank`'s
        own. The blocks of one frame pass the frame's (`dpjax.blocks.fit_blocks`), so
        that they share one compiled geometry and cut their overlapping tiles' kernels
        alike.

    Returns:
      FitResult.

    Raises:
      ValueError: on malformed input.
      FloatingPointError: when the loss or a gradient becomes non-finite.
    """
    t_start = time.perf_counter()
    scene = _scene(observation, bank, config, kernel_support)
    report = None if callback is None else (lambda progress: callback(progress[0]))
    return _solve([scene], batched=False, report=report, init=init, t_start=t_start,
                  refine_first=init is not None and init_is_solution)[0]


def finish_fit(observation, bank: KernelBank, config: Config,
               params: mpi.MpiParams) -> FitResult:
    """The outputs `fit` gives for these full-resolution logits, without solving again.

    Runs only `fit`'s last stage: the all-in-focus refinement (config.refine), the
    post-processing and the defocus map. For trying refinement settings on one fit
    (benchmarks/time_to_quality.py, experiments/refine_sweep.py): finishing a
    `config.refine.iters == 0` fit's params with config gives what `fit` with config
    would have given from the same MPI.

    Args:
      observation: [2, H, W, C] the views of the fit.
      bank: its kernels.
      config: its configuration, with the refinement settings to use.
      params: its MPI logits at full resolution ([L, C, H, W] colours, C or 1
        channels).

    Returns:
      FitResult with an empty loss history, no level iterations, and timings of
      this stage (total_s, refine_s when the refinement ran).

    Raises:
      ValueError: malformed input, or params not at the observation's resolution.
      FloatingPointError: the refinement or the outputs became non-finite.
    """
    t_start = time.perf_counter()
    s = _scene(observation, bank, config)
    if params.color_logits.shape[-2:] != s.planar.shape[-2:]:
        raise ValueError(f"params are {params.color_logits.shape[-2:]}, the observation "
                         f"{s.planar.shape[-2:]}: finish_fit needs full-resolution params")
    lvl_obs, lk = _level_problem(s, 1, exact=True)  # no fit to share: the scene's own
    p, aif, raw, dmap, terms, ref = _outputs(match_channels(params, lvl_obs), lvl_obs, lk, s,
                                             "")
    timings = {"total_s": time.perf_counter() - t_start}
    if ref is not None:
        timings["refine_s"] = ref["seconds"]
    return FitResult(all_in_focus=aif, all_in_focus_raw=raw, defocus=dmap, params=p,
                     scales=np.asarray(s.scales), loss_history=np.zeros((0,), np.float32),
                     level_iterations=(), terms=terms, timings=timings, refine=ref)


def fit_batch(observations, banks: KernelBank | Sequence[KernelBank],
              configs: Config | Sequence[Config], *,
              callback: Callable[[tuple[Progress, ...]], bool | None] | None = None,
              inits: Sequence[mpi.MpiParams | None] | None = None) -> list[FitResult]:
    """Solves B same-size captures together: one compiled chunk vmapped over the scenes.

    Each scene gets what `fit` would give it (up to float rounding): its own
    parameters, optimiser state, observation and layer kernels (its own layer range),
    the same iteration budgets, and its own stopping rule (rel_tol): a scene whose
    rule fires stops updating while the others go on, and a level ends when every
    scene has stopped or the budget is spent. The convolution geometry is static, so
    all scenes use the one sized for the largest |scale| of the batch.

    Every scene costs compute until its level ends, and the batch needs about B times
    a single solve's memory. On CPU it is slower than B `fit` calls (README, "Batch
    solving"); it can only pay where one scene leaves an accelerator underused. It
    compiles once per level for all layer ranges whose largest |scale| gives the same
    kernel radius.

    Args:
      observations: [B, 2, H, W, C] array, or a sequence of B [2, H, W, C] views.
      banks: one KernelBank for every scene, or B banks sharing the tile grid and the
        kernel size.
      configs: one Config, or B configs with equal `batch_key` (they may differ in
        the layer range and the post-processing).
      callback: called on the host after every chunk with one Progress per scene
        (`params` is None: the stacked logits are donated to the next chunk);
        returning True stops every scene there, keeping the results.
      inits: optional B initial MPI logits at the coarsest level's resolution (or None
        for the usual start of that scene), as `fit(..., init=...,
        init_is_solution=False)` takes them (e.g. `pipeline.init_from_defocus`).

    Returns:
      B FitResults in the order of the observations.

    Raises:
      ValueError: on malformed input or configs that cannot share a batch.
      BatchFloatingPointError (a FloatingPointError): when a scene's loss or gradient
        becomes non-finite; its `scenes` names the diverged scene indices. Solve the
        scenes one by one to keep the others' results.
    """
    t_start = time.perf_counter()
    obs_list = list(observations)
    n = len(obs_list)
    if n == 0:
        raise ValueError("fit_batch needs at least one observation")
    bank_list = [banks] * n if isinstance(banks, KernelBank) else list(banks)
    cfg_list = [configs] * n if isinstance(configs, Config) else list(configs)
    if len(bank_list) != n or len(cfg_list) != n:
        raise ValueError(f"{n} observations need 1 or {n} banks and configs; got "
                         f"{len(bank_list)} banks and {len(cfg_list)} configs")
    for i, (b, c) in enumerate(zip(bank_list, cfg_list)):
        if b.grid != bank_list[0].grid or b.kernel_size != bank_list[0].kernel_size:
            raise ValueError(f"scene {i}: kernel bank grid or kernel size differs from scene "
                             f"0's; fit_batch needs one tile geometry")
        if batch_key(c) != batch_key(cfg_list[0]):
            raise ValueError(f"scene {i}: config differs from scene 0's in the layer count, "
                             f"loss weights or solver settings; solve such scenes apart")
    scenes = []
    for i, (o, b, c) in enumerate(zip(obs_list, bank_list, cfg_list)):
        try:
            scenes.append(_scene(o, b, c))
        except ValueError as e:
            raise ValueError(f"scene {i}: {e}") from e
        if scenes[-1].planar.shape != scenes[0].planar.shape:
            raise ValueError(f"scene {i}: views {np.shape(o)} differ from scene 0's in shape")
    if inits is not None:
        inits = list(inits)
        if len(inits) != n:
            raise ValueError(f"{n} observations need {n} inits (None for the usual start); "
                             f"got {len(inits)}")
        if all(p is None for p in inits):
            inits = None
    return _solve(scenes, batched=True, report=callback, init=inits, t_start=t_start)


def _batch_start(inits: Sequence[mpi.MpiParams | None], observations: jax.Array,
                 num_layers: int, scfg: SolverConfig) -> mpi.MpiParams:
    """The stacked coarsest-level logits of a batch [B, ...] from per-scene inits (None:
    the usual start) and the level's observations [B, V, C, H, W]."""
    out = []
    for i, (p, o) in enumerate(zip(inits, observations)):
        if p is None:
            out.append(_initial_params(o, num_layers, scfg))
            continue
        p = match_channels(p, o)
        color = (num_layers, *o.shape[1:])  # mpi.init_params: [L, C, H, W], [L - 1, H, W]
        alpha = (num_layers - 1, *o.shape[2:])
        if np.shape(p.color_logits) != color or np.shape(p.alpha_logits) != alpha:
            raise ValueError(f"scene {i}: init logits {np.shape(p.color_logits)} / "
                             f"{np.shape(p.alpha_logits)} must be the coarsest level's "
                             f"{color} / {alpha}")
        out.append(p)
    return _stack(out)


def _initial_params(observation: jax.Array, num_layers: int,
                    scfg: SolverConfig) -> mpi.MpiParams:
    """The coarsest level's logits for one scene [V, C, H, W], with optional noise."""
    params = mpi.init_params(observation, num_layers)
    if scfg.init_noise > 0:
        k1, k2 = jax.random.split(jax.random.PRNGKey(scfg.seed))
        params = mpi.MpiParams(
            params.color_logits + scfg.init_noise * jax.random.normal(
                k1, params.color_logits.shape),
            params.alpha_logits + scfg.init_noise * jax.random.normal(
                k2, params.alpha_logits.shape))
    return params


def _stack(trees):
    return jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *trees)


def _take(tree, i: int):
    return jax.tree_util.tree_map(lambda x: x[i], tree)


def _problems(scenes: Sequence[_Scene], factor: int, batched: bool):
    """The level's observation and layer kernels: one scene's, or stacked [B, ...]."""
    if not batched:
        return _level_problem(scenes[0], factor)
    widest = max(_kernel_radius(s, factor) for s in scenes)
    obs, lks = zip(*(_level_problem(s, factor, widest) for s in scenes))
    return jnp.stack(obs), _stack(lks)


def _solve(scenes: Sequence[_Scene], *, batched: bool,
           report: Callable[[tuple[Progress, ...]], bool | None] | None,
           init: mpi.MpiParams | Sequence[mpi.MpiParams | None] | None, t_start: float,
           refine_first: bool = False) -> list[FitResult]:
    """The coarse-to-fine level loop shared by `fit` (one scene, unbatched arrays) and
    `fit_batch` (arrays with a leading scene axis B; `init` then one entry per scene)."""
    num = len(scenes)
    config = scenes[0].config  # the batch_key fields are shared
    scfg = config.solver
    levels = scfg.pyramid_levels
    history: list[list[np.ndarray]] = [[] for _ in scenes]
    level_iters: list[list[int]] = [[] for _ in scenes]
    timings: dict[str, float] = {}
    params = init
    solved_before = refine_first
    callback_s = 0.0  # time spent in the callback, excluded from reported timings
    stopped = False  # the callback asked to stop
    run_chunk = _run_chunk_batch if batched else _run_chunk
    first_scale = None  # L-BFGS: the next level's first-step scale ([B] when batched)

    for level in reversed(range(levels)):  # coarsest first
        if stopped:
            break
        factor = 2**level
        t0 = time.perf_counter()
        lvl_obs, lk = _problems(scenes, factor, batched)
        if level >= scfg.colour_levels:  # this level solves the channel mean
            lvl_obs = jnp.mean(lvl_obs, axis=-3, keepdims=True)
        timings[f"prepare_level{level}_s"] = time.perf_counter() - t0

        if batched and isinstance(params, list):
            params = _batch_start(params, lvl_obs, config.mpi.num_layers, scfg)
        elif params is None:
            params = (_stack([_initial_params(o, config.mpi.num_layers, scfg) for o in lvl_obs])
                      if batched else _initial_params(lvl_obs, config.mpi.num_layers, scfg))
        elif params.color_logits.shape[-2:] != lvl_obs.shape[-2:]:
            params = upsample_params(params, lvl_obs.shape[-2:])
        params = match_channels(params, lvl_obs)
        params = jax.tree_util.tree_map(lambda x: jnp.array(x, jnp.float32), params)

        budget = scfg.budget(level)
        step_cfg = _StepConfig.of(scfg, refine=solved_before)
        t0 = time.perf_counter()
        done = 0
        stop = np.full(num, budget)  # per scene: the step at which it stops at this level
        if budget > 0:
            solved_before = True
            opt_init = _make_optimizer(step_cfg, budget).init
            # Fresh buffers: some optimiser states alias the parameters, which donation forbids.
            opt_state = jax.tree_util.tree_map(
                jnp.copy, (jax.vmap(opt_init) if batched else opt_init)(params))
            if step_cfg.optimizer == "lbfgs" and first_scale is not None:
                opt_state = _with_first_scale(opt_state, first_scale)
            prev_mean: list[float | None] = [None] * num
            last_loss = np.full(num, np.nan)
            while done < budget:
                stop_at = jnp.asarray(stop, jnp.int32) if batched else jnp.int32(stop[0])
                params, opt_state, values, bad = run_chunk(
                    params, opt_state, jnp.int32(done), jnp.int32(budget), stop_at, lvl_obs, lk,
                    cfg=step_cfg, weights=config.loss)
                values = np.asarray(values).reshape(num, -1)  # [B, chunk]
                bad = np.asarray(bad).reshape(num)
                ran = min(scfg.chunk_size, budget - done)
                if np.any(bad >= 0):
                    raise _divergence(bad, values, level, factor, batched)
                ran_each = np.clip(stop - done, 0, ran)  # steps each scene took in this chunk
                for i in range(num):
                    if ran_each[i]:
                        history[i].append(values[i, :ran_each[i]])
                        last_loss[i] = values[i, ran_each[i] - 1]
                done += ran
                if report is not None:
                    t_cb = time.perf_counter()
                    elapsed = t_cb - t_start - callback_s
                    stop_now = report(tuple(
                        Progress(level=level, num_levels=levels, step=int(min(done, stop[i])),
                                 num_steps=budget, loss=float(last_loss[i]), elapsed_s=elapsed,
                                 params=None if batched else params,
                                 scales=np.asarray(scenes[i].scales))
                        for i in range(num)))
                    callback_s += time.perf_counter() - t_cb
                    if stop_now is True:
                        stopped = True
                        break
                if scfg.rel_tol > 0:
                    for i in np.flatnonzero(ran_each):
                        cur_mean = float(np.mean(values[i, :ran_each[i]]))
                        prev = prev_mean[i]
                        if prev is not None and (prev - cur_mean) < scfg.rel_tol * abs(prev):
                            stop[i] = done
                        prev_mean[i] = cur_mean
                    if np.all(stop <= done):
                        break
        for i in range(num):
            level_iters[i].append(int(min(done, stop[i])))
        first_scale = None
        if budget > 0 and step_cfg.optimizer == "lbfgs" and level > 0:
            # The next level has 4x this one's pixels (the pyramid's factor is 2).
            scale_fn = functools.partial(_next_level_scale, pixel_ratio=4.0)
            first_scale = (jax.vmap(scale_fn) if batched else scale_fn)(opt_state)
        timings[f"solve_level{level}_s"] = time.perf_counter() - t0

    full_shape = scenes[0].planar.shape[-2:]
    if params.color_logits.shape[-2:] != full_shape:
        # Stopped early at a coarse level: continue the result at full resolution.
        params = upsample_params(params, full_shape)
        lvl_obs, lk = _problems(scenes, 1, batched)
    params = match_channels(params, lvl_obs)  # stopped at a level that solved the mean
    # The fit's kernels are padded to a shared (a batch's: the widest scene's) radius;
    # the refinement gets the scene's own (`_refine_kernels`). One scene: score with
    # the fit's kernels (shared shapes, shared compilation), then swap them for the
    # scene's own rather than hold both sets of kernels and spectra at once.
    outs = []
    for i, s in enumerate(scenes):
        if not batched:
            terms = None
            if _refine_needs_own(s, lk):
                terms = _final_terms(params, lvl_obs, lk, config.loss)
                del lk
                lk = _level_problem(s, 1, exact=True)[1]
            outs.append(_outputs(params, lvl_obs, lk, s, "", terms=terms))
            continue
        lk_i = _take(lk, i)
        outs.append(_outputs(_take(params, i), lvl_obs[i], lk_i, s, f"scene {i}: ",
                             _refine_kernels(s, lk_i)))
    refined = [out[-1] for out in outs if out[-1] is not None]
    if refined:
        timings["refine_s"] = sum(r["seconds"] for r in refined)
    timings["total_s"] = time.perf_counter() - t_start - callback_s
    return [FitResult(
        all_in_focus=aif, all_in_focus_raw=raw, defocus=dmap, params=p,
        scales=np.asarray(s.scales),
        loss_history=np.concatenate(h) if h else np.zeros((0,), np.float32),
        level_iterations=tuple(it), terms=terms, timings=dict(timings), refine=ref)
        for (p, aif, raw, dmap, terms, ref), s, h, it in zip(outs, scenes, history,
                                                             level_iters)]


def _divergence(bad: np.ndarray, values: np.ndarray, level: int, factor: int,
                batched: bool) -> FloatingPointError:
    """The error for non-finite steps: bad [B] first bad step or -1, values [B, chunk]."""
    which = tuple(int(i) for i in np.flatnonzero(bad >= 0))
    i = which[0]
    finite = values[i][np.isfinite(values[i])]
    msg = (f"non-finite loss or gradient at iteration {bad[i]} of pyramid level {level} "
           f"(factor {factor}); last finite losses: {finite[-3:].tolist()}. Check the input "
           f"for extreme values or lower the learning rate.")
    if not batched:
        return FloatingPointError(msg)
    names = ", ".join(str(j) for j in which)
    return BatchFloatingPointError(
        f"scene{'s' if len(which) > 1 else ''} {names} of the batch diverged; scene {i}: {msg}",
        which)


def _outputs(params: mpi.MpiParams, observation: jax.Array, lk: mpi.LayerKernels,
             scene: _Scene, prefix: str, refine_lk: mpi.LayerKernels | None = None,
             terms: losses.LossTerms | None = None):
    """(params, all-in-focus [H, W, C], raw [H, W, C], defocus [H, W], terms, refine record
    or None) of one scene at full resolution (observation [V, C, H, W]); refine_lk: the
    refinement's kernels when they differ from lk (a batch's); terms: the final loss
    terms when the caller scored them already (with other kernels than lk)."""
    cfg = scene.config
    if terms is None:
        terms = _final_terms(params, observation, lk, cfg.loss)
    color = mpi.colors(params)
    trans = mpi.transmittance(mpi.alphas(params))
    image = mpi.all_in_focus(color, trans)  # [C, H, W]
    record = None
    if cfg.refine.iters > 0:
        t0 = time.perf_counter()
        try:
            ref = refine.refine_all_in_focus(params, observation,
                                             lk if refine_lk is None else refine_lk, cfg.refine)
        except FloatingPointError as e:
            raise FloatingPointError(f"{prefix}{e}") from e
        image = jnp.asarray(ref.all_in_focus)
        record = {"objective_start": ref.objective_start, "objective_end": ref.objective_end,
                  "data_end": ref.data_end, "prior_end": ref.prior_end,
                  "iterations": ref.iterations, "evaluations": ref.evaluations,
                  "seconds": time.perf_counter() - t0}
    raw = jnp.transpose(image, (1, 2, 0))
    aif = raw
    if cfg.post.bilateral and (record is None or cfg.refine.bilateral):
        aif = postprocess.bilateral_filter(raw, sigma_spatial=cfg.post.sigma_spatial,
                                           sigma_value=cfg.post.sigma_value)
    dmap = mpi.estimate_defocus(trans, scene.scales, cfg.post.defocus)
    if cfg.post.fill:  # on the device, before the outputs go to the host
        dmap = postprocess.filled_defocus(dmap, aif, cfg.post)
    aif, raw, dmap = np.asarray(aif), np.asarray(raw), np.asarray(dmap)
    if not (np.all(np.isfinite(aif)) and np.all(np.isfinite(dmap))):
        raise FloatingPointError(f"{prefix}the solve produced non-finite outputs")
    return params, aif, raw, dmap, {k: float(v) for k, v in terms._asdict().items()}, record
