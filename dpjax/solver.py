"""Jointly fits the MPI to both dual-pixel views: defocus map and all-in-focus image.

`fit` is the entry point. Each pyramid level has one compiled region that runs a
chunk of optimiser steps on device (`lax.scan`) and returns to the host only to
report progress. Observations and kernel spectra are arguments of that region,
never closure constants. A non-finite loss or gradient stops the updates inside the
chunk and is raised on the host as FloatingPointError.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dpjax import conv, losses, mpi, postprocess
from dpjax.config import Config, SolverConfig
from dpjax.kernels import KernelBank, downsample_bank, rescaled_radius


class Progress(NamedTuple):
    """What the host learns after each chunk.

    `params` are the current MPI logits at this level's resolution (device arrays,
    valid only during the callback: their buffers are donated to the next chunk). `elapsed_s` is the
    solver's own wall time: time spent inside callbacks is excluded.
    """

    level: int  # 0 = finest
    num_levels: int
    step: int  # steps done at this level
    num_steps: int  # budget at this level
    loss: float
    elapsed_s: float
    params: mpi.MpiParams | None = None
    scales: np.ndarray | None = None


@dataclasses.dataclass(frozen=True)
class FitResult:
    """Output of `fit` (host numpy arrays).

    Attributes:
      all_in_focus: [H, W, C] estimated sharp image, same scale as the input
        (bilateral-filtered when config.post.bilateral).
      all_in_focus_raw: [H, W, C] the MPI's composite before post-processing.
      defocus: [H, W] signed defocus map (in layer-scale units).
      params: final MPI logits at full resolution.
      scales: [L] layer scales.
      loss_history: [N] total loss at every step, all levels in order.
      level_iterations: steps run at each level, coarsest first.
      terms: final loss terms at full resolution (floats).
      timings: seconds for kernel preparation, compilation + solving per level, total.
    """

    all_in_focus: np.ndarray
    all_in_focus_raw: np.ndarray
    defocus: np.ndarray
    params: mpi.MpiParams
    scales: np.ndarray
    loss_history: np.ndarray
    level_iterations: tuple[int, ...]
    terms: dict[str, float]
    timings: dict[str, float]


class _StepConfig(NamedTuple):
    """The solver settings the compiled chunk depends on (its static argument).

    Budgets, tolerances and pyramid settings are left out so that changing them
    does not trigger a recompilation.
    """

    optimizer: str
    lr_start: float
    lr_end: float
    chunk_size: int

    @classmethod
    def of(cls, cfg: SolverConfig, refine: bool = False) -> "_StepConfig":
        lr = cfg.refine_lr if (refine and cfg.refine_lr is not None) else (cfg.lr_start,
                                                                           cfg.lr_end)
        return cls(cfg.optimizer, float(lr[0]), float(lr[1]), cfg.chunk_size)


def _lr_schedule(cfg: _StepConfig, num_steps) -> optax.Schedule:
    """Log-linear decay lr_start -> lr_end over num_steps (paper: 0.3 -> 0.1)."""
    ratio = cfg.lr_end / cfg.lr_start

    def schedule(count):
        frac = count / jnp.maximum(num_steps - 1, 1)
        return cfg.lr_start * ratio ** jnp.minimum(frac, 1.0)

    return schedule


def _make_optimizer(cfg: _StepConfig, num_steps) -> optax.GradientTransformation:
    if cfg.optimizer == "adam":
        return optax.adam(_lr_schedule(cfg, num_steps))
    return optax.lbfgs()


def _all_finite(tree) -> jax.Array:
    leaves = jax.tree_util.tree_leaves(tree)
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def _total_loss(params, observation, lk, weights):
    return losses.loss_terms(params, observation, lk, weights).total


@functools.partial(jax.jit, static_argnames=("cfg", "weights"), donate_argnums=(0, 1))
def _run_chunk(params: mpi.MpiParams, opt_state, step0: jax.Array, num_steps: jax.Array,
               observation: jax.Array, lk: mpi.LayerKernels, *, cfg: _StepConfig,
               weights: losses.LossWeights):
    """Runs cfg.chunk_size optimiser steps (fewer once step0 + i reaches num_steps).

    Args:
      params: MPI logits (donated).
      opt_state: optimiser state (donated).
      step0: int32 scalar, steps already done at this level.
      num_steps: int32 scalar, the level's budget.
      observation: [V, C, H, W].
      lk: prepared layer kernels.

    Returns:
      (params, opt_state, losses [chunk], bad_step) where bad_step is the first step
      whose loss or gradient was non-finite, or -1.
    """
    opt = _make_optimizer(cfg, num_steps)
    value_fn = functools.partial(_total_loss, observation=observation, lk=lk, weights=weights)

    def step(carry, i):
        params, state, bad_step = carry
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
            # Keep the last good iterate when something is non-finite; the host raises.
            keep = lambda new, old: jax.tree_util.tree_map(  # noqa: E731
                lambda a, b: jnp.where(ok, a, b), new, old)
            params = keep(new_params, params)
            state = keep(new_state, state)
            bad_step = jnp.where(ok, bad_step, n)
            return (params, state, bad_step), value.astype(jnp.float32)

        def skip(operand):
            return operand, jnp.float32(jnp.nan)

        active = (n < num_steps) & (bad_step < 0)
        return jax.lax.cond(active, do_step, skip, (params, state, bad_step))

    carry0 = (params, opt_state, jnp.int32(-1))
    (params, opt_state, bad_step), values = jax.lax.scan(
        step, carry0, jnp.arange(cfg.chunk_size, dtype=jnp.int32))
    return params, opt_state, values, bad_step


@functools.partial(jax.jit, static_argnames=("geom",))
def _prepare(kernels: jax.Array, scales: jax.Array, geom: conv.ConvGeometry):
    bank = KernelBank(kernels=kernels, grid=geom.grid)
    return mpi.prepare_layer_kernels(bank, scales, geom)


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


def _level_problem(planar: jax.Array, bank: KernelBank, scales: jax.Array, max_abs: float,
                   factor: int, scfg: SolverConfig):
    """Observation and prepared layer kernels of the pyramid level with this factor."""
    lvl_bank = downsample_bank(bank, factor)
    lvl_obs = downsample_image(planar, factor)
    radius = rescaled_radius(lvl_bank.kernel_size, max_abs)
    geom = conv.ConvGeometry.create(lvl_bank.grid, radius, scfg.conv_method, scfg.round_fft)
    lk = _prepare(lvl_bank.kernels, scales, geom)
    jax.block_until_ready(lk.kernels)
    return lvl_obs, lk


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


def fit(observation, bank: KernelBank, config: Config = Config(), *,
        callback: Callable[[Progress], None] | None = None,
        init: mpi.MpiParams | None = None) -> FitResult:
    """Estimates the defocus map and the all-in-focus image of one DP capture.

    Args:
      observation: [2, H, W, C] left and right views, linear, roughly in [0, 1].
      bank: calibrated kernels whose tile grid covers exactly H x W.
      config: the resolved configuration.
      callback: called on the host after every chunk with a Progress; returning
        True stops the solve there (e.g. a wall-time budget), keeping the result.
      init: optional initial MPI logits at the coarsest level's resolution.

    Returns:
      FitResult.

    Raises:
      ValueError: on malformed input.
      FloatingPointError: when the loss or a gradient becomes non-finite.
    """
    t_start = time.perf_counter()
    obs = validate_observation(observation, bank)
    scfg = config.solver
    scales = jnp.asarray(config.mpi.scales())
    max_abs = float(np.max(np.abs(config.mpi.scales())))
    planar = jnp.asarray(np.transpose(obs, (0, 3, 1, 2)))  # [V, C, H, W]
    levels = scfg.pyramid_levels
    history: list[np.ndarray] = []
    level_iters: list[int] = []
    timings: dict[str, float] = {}
    params = init
    key = jax.random.PRNGKey(scfg.seed)
    solved_before = init is not None
    callback_s = 0.0  # time spent in the callback, excluded from reported timings
    stopped = False  # the callback asked to stop

    for level in reversed(range(levels)):  # coarsest first
        if stopped:
            break
        factor = 2**level
        t0 = time.perf_counter()
        lvl_obs, lk = _level_problem(planar, bank, scales, max_abs, factor, scfg)
        timings[f"prepare_level{level}_s"] = time.perf_counter() - t0

        if params is None:
            params = mpi.init_params(lvl_obs, config.mpi.num_layers)
            if scfg.init_noise > 0:
                k1, k2 = jax.random.split(key)
                params = mpi.MpiParams(
                    params.color_logits + scfg.init_noise * jax.random.normal(
                        k1, params.color_logits.shape),
                    params.alpha_logits + scfg.init_noise * jax.random.normal(
                        k2, params.alpha_logits.shape))
        elif params.color_logits.shape[-2:] != lvl_obs.shape[-2:]:
            params = upsample_params(params, lvl_obs.shape[-2:])
        if params.color_logits.shape[1] != lvl_obs.shape[1]:
            raise ValueError("init has a different channel count from the observation")
        params = jax.tree_util.tree_map(lambda x: jnp.array(x, jnp.float32), params)

        budget = scfg.budget(level)
        step_cfg = _StepConfig.of(scfg, refine=solved_before)
        t0 = time.perf_counter()
        done = 0
        if budget > 0:
            solved_before = True
            # Fresh buffers: some optimiser states alias the parameters, which donation forbids.
            opt_state = jax.tree_util.tree_map(
                jnp.copy, _make_optimizer(step_cfg, budget).init(params))
            prev_mean = None
            while done < budget:
                params, opt_state, values, bad = _run_chunk(
                    params, opt_state, jnp.int32(done), jnp.int32(budget), lvl_obs, lk,
                    cfg=step_cfg, weights=config.loss)
                values = np.asarray(values)
                bad = int(bad)
                ran = min(scfg.chunk_size, budget - done)
                if bad >= 0:
                    raise FloatingPointError(
                        f"non-finite loss or gradient at iteration {bad} of pyramid level "
                        f"{level} (factor {factor}); last finite losses: "
                        f"{values[np.isfinite(values)][-3:].tolist()}. Check the input "
                        f"for extreme values or lower the learning rate.")
                history.append(values[:ran])
                done += ran
                if callback is not None:
                    t_cb = time.perf_counter()
                    stop = callback(Progress(level=level, num_levels=levels, step=done, num_steps=budget,
                                      loss=float(values[ran - 1]),
                                      elapsed_s=t_cb - t_start - callback_s, params=params,
                                      scales=np.asarray(scales)))
                    callback_s += time.perf_counter() - t_cb
                    if stop is True:
                        stopped = True
                        break
                cur_mean = float(np.mean(values[:ran]))
                if scfg.rel_tol > 0 and prev_mean is not None:
                    if (prev_mean - cur_mean) < scfg.rel_tol * abs(prev_mean):
                        break
                prev_mean = cur_mean
        level_iters.append(done)
        timings[f"solve_level{level}_s"] = time.perf_counter() - t0

    if params.color_logits.shape[-2:] != planar.shape[-2:]:
        # Stopped early at a coarse level: continue the result at full resolution.
        params = upsample_params(params, planar.shape[-2:])
        lvl_obs, lk = _level_problem(planar, bank, scales, max_abs, 1, scfg)
    terms = _final_terms(params, lvl_obs, lk, config.loss)
    color = mpi.colors(params)
    trans = mpi.transmittance(mpi.alphas(params))
    raw = jnp.transpose(mpi.all_in_focus(color, trans), (1, 2, 0))
    aif = raw
    if config.post.bilateral:
        aif = postprocess.bilateral_filter(raw, sigma_spatial=config.post.sigma_spatial,
                                           sigma_value=config.post.sigma_value)
    aif, raw = np.asarray(aif), np.asarray(raw)
    dmap = np.asarray(mpi.defocus_map(trans, scales))
    if not (np.all(np.isfinite(aif)) and np.all(np.isfinite(dmap))):
        raise FloatingPointError("the solve produced non-finite outputs")
    timings["total_s"] = time.perf_counter() - t_start - callback_s
    return FitResult(
        all_in_focus=aif, all_in_focus_raw=raw, defocus=dmap, params=params, scales=np.asarray(scales),
        loss_history=np.concatenate(history) if history else np.zeros((0,), np.float32),
        level_iterations=tuple(level_iters),
        terms={k: float(v) for k, v in terms._asdict().items()}, timings=timings)
