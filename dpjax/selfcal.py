"""Self-calibration: a camera's dual-pixel kernels estimated from its own photos.

No lab, no target: the DP pairs themselves constrain the kernels. If a patch sits at
signed defocus scale s, then L = I * k_L(s) and R = I * k_R(s), hence

    L * k_R(s) = R * k_L(s)                         (cross-convolution identity)

for the true kernels and the true s, whatever the scene I is (the identity behind
`dpjax.baselines.dp_stereo_cost`). With the wrong kernels no scale satisfies it. We
fit the few parameters of `dpjax.kernel_model.DpKernelModel` by minimising, over the
model and one scale per window, the mean over textured windows of the normalised
cross-convolution residual

    c_w(model, s_w) = sum_window (a/mean(a) - b/mean(b))^2
                      / sum_window (|grad a/mean(a)|^2 + |grad b/mean(b)|^2) / 2
    a = P * L * k_R(s_w),  b = P * R * k_L(s_w)

(P a small common pre-blur against sensor noise, as in the search; dividing by the
window means absorbs left/right gain differences such as uncorrected vignetting;
the gradient-energy normaliser stops the cost from favouring large blur, see
`dpjax.baselines`). Steps (`fit_kernel_model`):

1. grey views, downsampled by the smallest integer factor bringing the larger side
   to <= max_side, divided by the pair's mean; windows of `window` px on a regular
   grid, kept when textured (windowed gradient energy above its 25th percentile)
   and unsaturated, up to `windows_per_pair` per pair spread evenly over the
   texture ranking (so blurred, weakly textured windows are kept too: they carry the
   shape of the kernel, in-focus windows do not);
2. orientation: for each of `angles_deg` the default shape is scored by a grid
   search of every window's scale (min over scales, mean over windows); the best
   angle starts the fit;
3. refinement: Adam on the model's shape parameters (`fit_params`) and every
   window's scale, jointly (gradients through the kernel renderer, the area
   rescaling of `dpjax.kernels` and the FFT convolution), on the `refine_windows`
   most confident informative windows (a clear minimum of the scale search, not at
   focus); windows are weighted 1 / (1 + cost / median cost), so that windows no
   single scale explains (occlusion edges, motion) count less; `rounds` times,
   each round starting from a fresh grid search of the scales;
4. gauge: the fit runs with a fixed radius (`ref_radius` px at the fit resolution);
   the result's radius is the 90th percentile of the informative windows' blur
   radius, in full-resolution pixels (`dpjax.kernel_model`, "Gauge");
5. quality: `gain` = 1 - cost / null cost (the same windows at s = 0, i.e. how much
   of the left/right mismatch the kernels explain), the orientation margin (cost at
   the orthogonal split / cost - 1) and the number of informative windows. Below the
   thresholds of SelfCalConfig the result falls back to `LEGACY_MODEL`, the
   kernels run_solver.py uses without a calibration (`fallback=True`, with the
   reason in `note`).

Not fitted by default: `smooth` (see SelfCalConfig.fit_params). `softness_edge` is
fitted and kept non-negative (projected after each step): the views' offset can only
shrink towards the frame's edge, never grow (vignetting narrows the aperture there).
Time: grid searches over 25 scales of every window dominate; `SelfCalResult.seconds`
records it.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dpjax import conv, io
from dpjax.kernel_model import (
    LEGACY_MODEL,
    DpKernelModel,
    normalise_angle,
    render_kernel_pairs,
    render_kernels_jnp,
    tile_positions,
)
from dpjax.kernels import rescale_kernel, rescale_kernels, rescaled_radius

__all__ = [
    "SelfCalConfig",
    "SelfCalResult",
    "blur_p90",
    "calibration_kernels",
    "check_same_camera",
    "choose_tile_size",
    "fit_kernel_model",
    "save_self_calibration",
]

_SHAPE = ("angle_deg", "split", "split_gradient", "softness", "softness_asym",
          "softness_edge", "ramp", "ramp_asym", "smooth")
# Shape parameter -> its unconstrained variable in the fit.
_Z_NAME = {"angle_deg": "angle", "split": "split", "split_gradient": "split_gradient",
           "softness": "softness", "softness_asym": "softness_asym",
           "softness_edge": "softness_edge", "ramp": "ramp",
           "ramp_asym": "ramp_asym", "smooth": "smooth"}
# Guards the cost's normaliser in flat windows (views are divided by their mean ~ 1).
_GRAD_EPS = 1e-6
# Largest kernel smoothing the fit allows (radii): the fit's kernels hold 3 sigma of it.
_MAX_SMOOTH = 0.2
# The common pre-blur P: two 3x3 boxes (a 5x5 triangle), radius 2.
_PREBLUR = np.outer([1, 2, 3, 2, 1], [1, 2, 3, 2, 1]).astype(np.float32) / 81.0


@dataclasses.dataclass(frozen=True, kw_only=True)
class SelfCalConfig:
    """Settings of `fit_kernel_model` (module docstring for the steps).

    Attributes:
      max_side: the fit's resolution: views are area-downsampled by the smallest
        integer factor bringing max(H, W) to at most this.
      window: window side in pixels at the fit resolution.
      windows_per_pair: windows kept per pair.
      ref_radius: kernel radius at scale 1 during the fit (px, fit resolution).
      max_scale, scale_step: the scale grid [-max_scale, max_scale]; max_scale x
        ref_radius is the largest blur radius the fit can see.
      fit_tiles: tiles along the frame's longer side of the grid on which the fit
        renders kernels (each window uses its tile's kernels; square-ish tiles).
      angles_deg: orientations tried in step 2 (the range 0-180 covers all of them).
      start: the shape the orientation search and the refinement start from.
      fit_params: the shape parameters the refinement fits; the others keep the
        start's values. `smooth` is not fitted by default: the residual favours
        smoother kernels whenever anything is imperfect (scale discretisation, noise,
        windows straddling two depths), so a fitted value runs to its bound (measured
        on synthetic scenes, where the true smoothing costs more than 0.2 radii).
        `softness_edge` is fitted (since 2026-12-06): fitted on the Canon plane it
        agrees with the value fitted to that plane's target kernels, and both cameras
        give 0.3-0.4; with it the Canon depth scenes rank better (0.378 -> 0.341) and
        the Pixel 4 full frames stay level (experiments/results/own_camera.md, "The
        split's softening towards the frame's edge, fitted by default"). Small frames
        identify it weakly: from two 192 x 288 synthetic pairs rendered with 0.4 the
        fit returns 0 (its lower bound). Its profile across the frame
        (`DpKernelModel.softness_edge_power`) is not fitted: the start's, |p| since
        2026-12-07 (own_camera.md, "How the Canon kernels change towards the frame's
        edge").
      refine_windows: windows the refinement uses (the informative ones, most
        confident first; a fixed count so that it compiles once).
      steps, rounds, learning_rate: the refinement (Adam, cosine-decayed rate).
      min_informative: fewest informative windows needed (else fallback).
      min_gain: least share of the null cost the fit must explain (else fallback).
      min_angle_margin: least relative cost increase at the orthogonal orientation.
    """

    max_side: int = 768
    window: int = 32
    windows_per_pair: int = 64
    ref_radius: float = 6.0
    max_scale: float = 3.0
    scale_step: float = 0.25
    fit_tiles: int = 6
    angles_deg: tuple[float, ...] = (0.0, 45.0, 90.0, 135.0)
    start: DpKernelModel = DpKernelModel(softness=0.3, ramp=0.0)
    fit_params: tuple[str, ...] = ("angle_deg", "split", "split_gradient", "softness",
                                   "softness_asym", "softness_edge", "ramp", "ramp_asym")
    refine_windows: int = 192
    steps: int = 50
    rounds: int = 2
    learning_rate: float = 0.08
    min_informative: int = 24
    min_gain: float = 0.15
    min_angle_margin: float = 0.05

    def __post_init__(self):
        unknown = sorted(set(self.fit_params) - set(_SHAPE))
        if unknown:
            raise ValueError(f"unknown fit_params {unknown}; choose from {', '.join(_SHAPE)}")

    def scales(self) -> np.ndarray:
        """The scale grid of the searches, symmetric about 0 (which it contains)."""
        n = int(round(self.max_scale / self.scale_step))
        return (np.arange(-n, n + 1) * self.scale_step).astype(np.float32)


class SelfCalResult(NamedTuple):
    """What `fit_kernel_model` found.

    model: the fitted model (radius in full-resolution pixels, the gauge), or
      `kernel_model.LEGACY_MODEL` (today's default parametric kernels) when
      `fallback`; fitted_model: the fit's model, also when it fell back.
    fallback, note: whether the fit was rejected, and why (None when accepted).
    cost: mean normalised residual of the used windows; null_cost: the same windows
      at s = 0; gain: 1 - cost / null_cost.
    angle_costs: orientation search, {angle: mean min cost}; angle_margin: relative
      cost increase of the fitted shape turned by 90 degrees.
    num_windows, num_informative: windows scored / used by the refinement.
    blur_radius_px: 10th, 50th and 90th percentile of |blur radius| of the
      informative windows, full-resolution pixels.
    pair_costs: per input pair, mean residual of its informative windows (NaN: none).
    factor: the fit's downsampling factor; seconds: wall time.
    """

    model: DpKernelModel
    fitted_model: DpKernelModel
    fallback: bool
    note: str | None
    cost: float
    null_cost: float
    gain: float
    angle_costs: dict
    angle_margin: float
    num_windows: int
    num_informative: int
    blur_radius_px: tuple[float, float, float]
    pair_costs: tuple[float, ...]
    factor: int
    seconds: float

    def summary(self) -> dict:
        """JSON-friendly summary (for kernels_meta.json and logs)."""
        return {
            "model": self.model.to_dict(),
            "fitted_model": self.fitted_model.to_dict(),
            "fallback": self.fallback, "note": self.note, "cost": self.cost,
            "null_cost": self.null_cost, "gain": self.gain,
            "angle_costs": {f"{a:g}": c for a, c in self.angle_costs.items()},
            "angle_margin": self.angle_margin, "num_windows": self.num_windows,
            "num_informative": self.num_informative,
            "blur_radius_px": list(self.blur_radius_px),
            "pair_costs": list(self.pair_costs), "factor": self.factor,
            "seconds": self.seconds,
        }


def choose_tile_size(height: int, width: int, target: int | None = None) -> int:
    """The largest common divisor of height and width that is at most `target` (and
    at least 32 when one exists), so that square tiles cover the frame exactly;
    multiples of 8 first, then of 4, so that the solver's pyramid (factor 4 by
    default, 8 with 4 levels) divides the tiles.

    target None: 192 px, or 1/24 of the longer side when that is more (the model
    varies slowly over the frame: a 24-MP frame needs no 3,750 tiles of kernels).

    Examples: 512 x 768 -> 128 (4 x 6 tiles), 1008 x 1344 -> 168 (6 x 8 tiles, the
    Pixel 4 calibration's grid), 4000 x 6000 -> 200 (20 x 30 tiles; not 125).
    """
    if target is None:
        target = max(192, max(int(height), int(width)) // 24)
    g = math.gcd(int(height), int(width))
    divisors = [d for d in range(1, g + 1) if g % d == 0 and d <= target]
    for m in (8, 4, 1):
        big = [d for d in divisors if d >= 32 and d % m == 0]
        if big:
            return max(big)
    return max(divisors)


# ----------------------------------------------------------------------------------------
# Windows


class _Windows(NamedTuple):
    """Host-side window data. patches: [N, 2, P, P] float32 grey (left, right);
    tile: [N] int32 fit-grid tile of each window; pair: [N] int32 source pair;
    texture: [N] float32."""

    patches: np.ndarray
    tile: np.ndarray
    pair: np.ndarray
    texture: np.ndarray


def _check_pairs(pairs: Sequence[np.ndarray], names: Sequence[str]) -> list[np.ndarray]:
    if len(pairs) == 0:
        raise ValueError("self-calibration needs at least one DP pair")
    if len(names) != len(pairs):
        raise ValueError(f"{len(names)} names for {len(pairs)} pairs")
    out = []
    for name, p in zip(names, pairs):
        p = np.asarray(p, np.float32)
        if p.ndim == 3:
            p = p[..., None]
        if p.ndim != 4 or p.shape[0] != 2:
            raise ValueError(f"{name}: views must be [2, H, W, C]; got {p.shape}")
        if not np.all(np.isfinite(p)):
            raise ValueError(f"{name}: views contain NaN or Inf")
        if out and p.shape != out[0].shape:
            raise ValueError(f"{name} is {p.shape[1]}x{p.shape[2]}x{p.shape[3]} but {names[0]} "
                             f"is {out[0].shape[1]}x{out[0].shape[2]}x{out[0].shape[3]}: one "
                             "kernel set needs pairs of one size")
        out.append(p)
    return out


def _fit_factor(height: int, width: int, max_side: int) -> int:
    return max(1, math.ceil(max(height, width) / max_side))


def _downsample(grey: np.ndarray, f: int) -> np.ndarray:
    """[V, H, W] -> [V, H // f, W // f] box average (the remainder cropped)."""
    if f == 1:
        return grey
    v, h, w = grey.shape
    h, w = h // f * f, w // f * f
    return grey[:, :h, :w].reshape(v, h // f, f, w // f, f).mean(axis=(2, 4))


def _margin(cfg: SelfCalConfig, k0: int) -> tuple[int, int]:
    """(kernel radius at max_scale, window margin): the margin holds the kernel, the
    pre-blur (2) and the forward difference (1)."""
    rk = rescaled_radius(k0, cfg.max_scale)
    return rk, rk + 4


def _fit_grid(height: int, width: int, long_tiles: int) -> tuple[int, int]:
    short = max(1, round(long_tiles * min(height, width) / max(height, width)))
    return (short, long_tiles) if width >= height else (long_tiles, short)


def _select_windows(pairs: list[np.ndarray], names: Sequence[str], cfg: SelfCalConfig, f: int,
                    margin: int) -> _Windows:
    w = cfg.window
    rows, cols = _fit_grid(pairs[0].shape[1], pairs[0].shape[2], cfg.fit_tiles)
    patches, tiles, pair_ids, textures = [], [], [], []
    for i, views in enumerate(pairs):
        sat_level = 0.98 * float(views.max())
        saturated = _downsample((views.max(axis=-1) >= sat_level).astype(np.float32), f)
        grey = _downsample(views.mean(axis=-1), f)  # [2, h, w]
        grey = grey / max(float(grey.mean()), 1e-12)
        _, h, wd = grey.shape
        if h < w + 2 * margin or wd < w + 2 * margin:
            raise ValueError(f"{names[i]}: {h}x{wd} px at the fit resolution is too small for "
                             f"{w}-px windows with a {margin}-px margin")
        mean = grey.mean(axis=0)
        gx = np.diff(mean, axis=1, append=mean[:, -1:])
        gy = np.diff(mean, axis=0, append=mean[-1:])
        energy = gx * gx + gy * gy
        ys = np.arange(margin, h - margin - w + 1, w)
        xs = np.arange(margin, wd - margin - w + 1, w)
        cand = []
        for y0 in ys:
            for x0 in xs:
                sat = saturated[:, y0:y0 + w, x0:x0 + w].max(axis=0).mean()
                cand.append((float(energy[y0:y0 + w, x0:x0 + w].mean()), sat, y0, x0))
        tex = np.array([c[0] for c in cand])
        ok = [c for c in cand if c[0] >= np.percentile(tex, 25) and c[1] <= 0.01 and c[0] > 0]
        ok.sort(key=lambda c: -c[0])
        n = min(cfg.windows_per_pair, len(ok))
        picks = [ok[j] for j in np.unique(np.round(np.linspace(0, len(ok) - 1, n)).astype(int))]
        for t, _, y0, x0 in picks:
            patches.append(grey[:, y0 - margin:y0 + w + margin, x0 - margin:x0 + w + margin])
            cy, cx = (y0 + w / 2) / h, (x0 + w / 2) / wd
            tiles.append(min(int(cy * rows), rows - 1) * cols + min(int(cx * cols), cols - 1))
            pair_ids.append(i)
            textures.append(t)
    if not patches:
        raise ValueError("no textured, unsaturated windows found in the pairs")
    return _Windows(np.stack(patches).astype(np.float32), np.asarray(tiles, np.int32),
                    np.asarray(pair_ids, np.int32), np.asarray(textures, np.float32))


# ----------------------------------------------------------------------------------------
# The cost (jitted)


class _Static(NamedTuple):
    """Static sizes of one fit (hashable)."""

    ref_radius: float
    k0: int  # reference kernel side
    ks: int  # kernel side at max_scale
    window: int
    margin: int
    fft: int
    edge_power: float  # the model's softness_edge_power (not fitted)
    supersample: int = 4  # of the fit's kernel rendering


def _params(z: dict) -> dict:
    """Unconstrained variables -> the model's shape parameters (bounded)."""
    return {
        "angle_deg": 10.0 * z["angle"],
        "split": 0.9 * jnp.tanh(z["split"]),
        "split_gradient": 2.0 * jnp.tanh(z["split_gradient"] / 2.0),
        "softness": 0.01 + jnp.exp(jnp.clip(z["softness"], -6.0, 1.5)),
        "softness_asym": 2.0 * jnp.tanh(z["softness_asym"] / 2.0),
        "softness_edge": 3.0 * jnp.tanh(z["softness_edge"] / 3.0),
        "ramp": 3.0 * jnp.tanh(z["ramp"] / 3.0),
        "ramp_asym": 2.0 * jnp.tanh(z["ramp_asym"] / 2.0),
        "smooth": 0.005 + jnp.exp(jnp.clip(z["smooth"], -6.0, math.log(_MAX_SMOOTH - 0.005))),
    }


def _unconstrained(model: DpKernelModel) -> dict:
    """Inverse of `_params` (values clipped into the bounded ranges)."""
    def atanh(x, b):
        return float(b * np.arctanh(np.clip(x / b, -0.999, 0.999)))
    return {
        "angle": model.angle_deg / 10.0,
        "split": atanh(model.split, 0.9),
        "split_gradient": 2.0 * np.arctanh(np.clip(model.split_gradient / 2.0, -0.999, 0.999)),
        "softness": float(np.log(max(model.softness - 0.01, 1e-3))),
        "softness_asym": 2.0 * np.arctanh(np.clip(model.softness_asym / 2.0, -0.999, 0.999)),
        "softness_edge": atanh(model.softness_edge, 3.0),
        "ramp": 3.0 * np.arctanh(np.clip(model.ramp / 3.0, -0.999, 0.999)),
        "ramp_asym": 2.0 * np.arctanh(np.clip(model.ramp_asym / 2.0, -0.999, 0.999)),
        "smooth": float(np.log(max(model.smooth - 0.005, 1e-3))),
    }


def _z_to_model(z: dict, radius: float, edge_power: float) -> DpKernelModel:
    p = {k: float(v) for k, v in _params({k: jnp.float32(v) for k, v in z.items()}).items()}
    angle, grad = normalise_angle(p["angle_deg"], p["split_gradient"])
    p.update(angle_deg=angle, split_gradient=grad)
    return DpKernelModel(radius=float(radius), softness_edge_power=float(edge_power), **p)


def _tile_kernels(z, positions, st: _Static):
    """[2, T, k0, k0] kernels of the fit grid at the reference radius."""
    return render_kernels_jnp({**_params(z), "softness_edge_power": st.edge_power}, positions,
                              radius=st.ref_radius, size=st.k0,
                              supersample=st.supersample)


def _window_costs(spec, kspec, st: _Static):
    """Normalised residual per window.

    Args:
      spec: [N, 2, F, F'] pre-blurred patch spectra (left, right).
      kspec: [N, 2, F, F'] kernel spectra (k_R, k_L: each view meets the other's
        kernel), kernels placed at the top-left corner.

    Returns:
      [N] costs.
    """
    o = st.margin + (st.ks - 1) // 2 + 2  # top-left kernel placement + pre-blur offset
    n = st.window
    # Inverse FFT in two passes, cropping the window's rows in between.
    rows = jnp.fft.ifft(spec * kspec, axis=-2)[..., o:o + n + 1, :]
    y = jnp.fft.irfft(rows, n=st.fft, axis=-1)[..., o:o + n + 1]  # [N, 2, n+1, n+1]
    y = y / jnp.mean(y[:, :, :n, :n], axis=(-2, -1), keepdims=True)
    diff = y[:, 0, :n, :n] - y[:, 1, :n, :n]
    gx = y[:, :, :n, 1:] - y[:, :, :n, :-1]
    gy = y[:, :, 1:, :n] - y[:, :, :-1, :n]
    energy = 0.5 * (jnp.sum(gx * gx, axis=(1, 2, 3)) + jnp.sum(gy * gy, axis=(1, 2, 3)))
    return jnp.sum(diff * diff, axis=(-2, -1)) / (energy + _GRAD_EPS * n * n)


def _swap_spectra(kernels, st: _Static):
    """[..., 2, ks, ks] (left, right) -> [..., 2, F, F'] spectra of (right, left)."""
    return jnp.fft.rfft2(jnp.flip(kernels, axis=-3), s=(st.fft, st.fft))


@functools.partial(jax.jit, static_argnames=("st",))
def _costs_at(z, scales, spec, tile, positions, *, st: _Static):
    """[N] costs with window w at scale scales[w]."""
    k = jnp.moveaxis(_tile_kernels(z, positions, st)[:, tile], 0, 1)  # [N, 2, k0, k0]
    ks = jax.vmap(lambda kk, s: jax.vmap(lambda k1: rescale_kernel(k1, s, st.ks))(kk))(k, scales)
    return _window_costs(spec, _swap_spectra(ks, st), st)


@functools.partial(jax.jit, static_argnames=("st",))
def _cost_grid(z, scales, spec, tile, positions, *, st: _Static):
    """[S, N] costs of every window at every scale of the grid."""
    k = _tile_kernels(z, positions, st)  # [2, T, k0, k0]

    def one(s):
        ks = jnp.moveaxis(rescale_kernels(k, s[None], st.ks)[0], 0, 1)  # [T, 2, ks, ks]
        return _window_costs(spec, _swap_spectra(ks, st)[tile], st)  # spectra per tile

    return jax.lax.map(one, scales)


def _objective(v, weights, spec, tile, positions, st: _Static):
    c = _costs_at(v["z"], v["s"], spec, tile, positions, st=st)
    return jnp.sum(weights * c) / jnp.sum(weights)


@functools.partial(jax.jit, static_argnames=("st", "steps", "lr", "max_scale", "fixed"))
def _refine(z, s, weights, spec, tile, positions, *, st, steps, lr, max_scale, fixed):
    """Adam on the model variables z (but those named in `fixed`) and the window
    scales s, jointly."""
    opt = optax.adam(optax.cosine_decay_schedule(lr, steps, alpha=0.1))
    v = {"z": z, "s": s}
    state = opt.init(v)
    grad_fn = jax.value_and_grad(_objective)

    def step(carry, _):
        v, state = carry
        loss, g = grad_fn(v, weights, spec, tile, positions, st)
        g = {"z": {k: jnp.zeros_like(x) if k in fixed else x for k, x in g["z"].items()},
             "s": g["s"]}
        # Window scales move in scale units; z in its own units (angle in tens of deg).
        upd, state = opt.update(g, state, v)
        v = optax.apply_updates(v, upd)
        z, edge = v["z"], _Z_NAME["softness_edge"]
        if edge not in fixed:  # >= 0, by projection (module docstring)
            z = {**z, edge: jnp.maximum(z[edge], 0.0)}
        v = {"z": z, "s": jnp.clip(v["s"], -max_scale, max_scale)}
        return (v, state), loss

    (v, _), losses = jax.lax.scan(step, (v, state), None, length=steps)
    return v["z"], v["s"], losses


# ----------------------------------------------------------------------------------------
# Fitting


def _parabolic_min(cost: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-column minimiser and minimum of cost [S, N] sampled at uniform x [S]."""
    i = np.argmin(cost, axis=0)
    n = np.arange(cost.shape[1])
    j = np.clip(i, 1, cost.shape[0] - 2)
    y0, y1, y2 = cost[j - 1, n], cost[j, n], cost[j + 1, n]
    curv = y0 - 2 * y1 + y2
    with np.errstate(divide="ignore", invalid="ignore"):
        off = np.where(curv > 0, 0.5 * (y0 - y2) / curv, 0.0)
    off = np.clip(off, -0.5, 0.5)
    interior = (i > 0) & (i < cost.shape[0] - 1)
    step = x[1] - x[0]
    xs = np.where(interior, x[j] + off * step, x[i])
    return xs.astype(np.float32), cost[i, n]


class _Search(NamedTuple):
    scale: np.ndarray  # [N] argmin scale (parabola-refined)
    cost: np.ndarray  # [N] min cost
    confidence: np.ndarray  # [N] 1 - min / median
    null: np.ndarray  # [N] cost at s = 0


def _search(z, cfg, st, data) -> _Search:
    grid = cfg.scales()
    c = np.asarray(_cost_grid(z, jnp.asarray(grid), *data, st=st))
    if not np.all(np.isfinite(c)):
        raise FloatingPointError("self-calibration cost is not finite")
    s, cmin = _parabolic_min(c, grid)
    conf = 1.0 - cmin / np.maximum(np.median(c, axis=0), 1e-12)
    return _Search(s, cmin, conf.astype(np.float32), c[len(grid) // 2])


def _informative(sr: _Search, cfg: SelfCalConfig) -> np.ndarray:
    """Windows whose scale search found a clear minimum away from focus and the ends."""
    away = np.abs(sr.scale) >= 0.5 * cfg.scale_step
    inside = np.abs(sr.scale) <= cfg.max_scale - cfg.scale_step
    return (sr.confidence > 0.3) & away & inside


def _weights(sr: _Search, cfg: SelfCalConfig) -> np.ndarray:
    """Robust weights: informative windows get 1 / (1 + cost / median cost) (Cauchy
    weights, fixed for a round: windows that no single scale explains, such as
    occlusion edges, count less), others 0."""
    use = _informative(sr, cfg)
    if not np.any(use):
        return np.zeros(use.shape, np.float32)
    med = max(float(np.median(sr.cost[use])), 1e-12)
    return np.where(use, 1.0 / (1.0 + sr.cost / med), 0.0).astype(np.float32)


def _subset(weights: np.ndarray, confidence: np.ndarray, n: int) -> np.ndarray:
    """Indices of n windows for the refinement: the used ones, most confident first,
    padded with unused ones (weight 0) so that every round has the same shapes."""
    order = np.lexsort((-confidence, -weights))
    return order[:n] if len(order) >= n else np.resize(order, n)


def fit_kernel_model(pairs: Sequence[np.ndarray], config: SelfCalConfig = SelfCalConfig(),
                     *, names: Sequence[str] | None = None) -> SelfCalResult:
    """Fits the DP kernel model to one or several DP pairs of one camera setting.

    Args:
      pairs: each [2, H, W, C] (or [2, H, W]) linear left/right views, all the same
        size (one kernel set needs one frame geometry); channels are averaged.
      config: the fit's settings.
      names: the pairs' names for error messages (default "pair 0", ...).

    Returns:
      SelfCalResult; its `model` has the radius in pixels of the input resolution.

    Raises:
      ValueError: no pairs, pairs of different sizes, malformed or tiny views.
    """
    t0 = time.perf_counter()
    cfg = config
    names = [f"pair {i}" for i in range(len(pairs))] if names is None else list(names)
    pairs = _check_pairs(pairs, names)
    _, h, w, _ = pairs[0].shape
    f = _fit_factor(h, w, cfg.max_side)
    k0 = 2 * math.ceil(cfg.ref_radius * (1.0 + 3.0 * _MAX_SMOOTH) + 0.5) + 1
    rk, margin = _margin(cfg, k0)
    win = _select_windows(pairs, names, cfg, f, margin)
    fft = conv.good_fft_size(win.patches.shape[-1])
    st = _Static(ref_radius=float(cfg.ref_radius), k0=k0, ks=2 * rk + 1, window=cfg.window,
                 margin=margin, fft=fft, edge_power=float(cfg.start.softness_edge_power))
    pre = jnp.fft.rfft2(jnp.asarray(_PREBLUR), s=(fft, fft))
    spec = jnp.fft.rfft2(jnp.asarray(win.patches), s=(fft, fft)) * pre
    positions = jnp.asarray(tile_positions(*_fit_grid(h, w, cfg.fit_tiles)))
    data = (spec, jnp.asarray(win.tile), positions)
    z = {k: jnp.float32(v) for k, v in _unconstrained(cfg.start).items()}

    # 2. Orientation.
    angle_costs = {}
    for a in cfg.angles_deg:
        angle_costs[float(a)] = float(np.mean(_search(dict(z, angle=jnp.float32(a / 10.0)),
                                                      cfg, st, data).cost))
    best = min(angle_costs, key=angle_costs.get)
    z["angle"] = jnp.float32(best / 10.0)

    # 3. Refinement rounds on a fixed-size subset of windows.
    fixed = tuple(_Z_NAME[p] for p in _SHAPE if p not in cfg.fit_params)
    n_ref = min(cfg.refine_windows, len(win.tile))
    for _ in range(cfg.rounds):
        sr = _search(z, cfg, st, data)
        weights = _weights(sr, cfg)
        if weights.sum() < 1:
            break
        idx = _subset(weights, sr.confidence, n_ref)
        sub = (spec[idx], data[1][idx], positions)
        z, _, _ = _refine(z, jnp.asarray(sr.scale[idx]), jnp.asarray(weights[idx]), *sub,
                          st=st, steps=cfg.steps, lr=cfg.learning_rate,
                          max_scale=cfg.max_scale, fixed=fixed)
        if not all(np.isfinite(float(v)) for v in z.values()):
            raise FloatingPointError("self-calibration diverged: non-finite model parameters")
        z = {k: jnp.float32(v) for k, v in z.items()}

    # 4-5. Final search, gauge and quality.
    sr = _search(z, cfg, st, data)
    use = _weights(sr, cfg) > 0
    n_inf = int(use.sum())
    nan = float("nan")
    cost = float(np.mean(sr.cost[use])) if n_inf else nan
    null_cost = float(np.mean(sr.null[use])) if n_inf else nan
    gain = 1.0 - cost / null_cost if n_inf and null_cost > 0 else nan
    orth = _search(dict(z, angle=z["angle"] + 9.0), cfg, st, data)
    angle_margin = float(np.mean(orth.cost[use])) / cost - 1.0 if n_inf else nan
    blur = np.abs(sr.scale[use]) * cfg.ref_radius * f
    pct = tuple(float(v) for v in np.percentile(blur, [10, 50, 90])) if n_inf else (nan,) * 3
    radius = float(np.clip(round(pct[2] * 10) / 10, 2.0, 64.0)) if n_inf else cfg.start.radius
    fitted = _z_to_model({k: float(v) for k, v in z.items()}, radius,
                         cfg.start.softness_edge_power)
    pair_costs = tuple(
        float(np.mean(sr.cost[use & (win.pair == i)])) if np.any(use & (win.pair == i))
        else nan for i in range(len(pairs)))

    note = None
    if n_inf < cfg.min_informative:
        note = (f"only {n_inf} informative windows (need {cfg.min_informative}): too little "
                "defocus or texture in the pairs")
    elif not gain >= cfg.min_gain:
        note = (f"the kernels explain {gain:.0%} of the left/right mismatch "
                f"(need {cfg.min_gain:.0%})")
    elif not angle_margin >= cfg.min_angle_margin:
        note = (f"orientation not determined (the orthogonal split costs only "
                f"{angle_margin:+.1%} more)")
    model = fitted if note is None else LEGACY_MODEL
    return SelfCalResult(
        model=model, fitted_model=fitted, fallback=note is not None, note=note, cost=cost,
        null_cost=null_cost, gain=gain, angle_costs=angle_costs, angle_margin=angle_margin,
        num_windows=len(win.tile), num_informative=n_inf, blur_radius_px=pct,
        pair_costs=pair_costs, factor=f, seconds=time.perf_counter() - t0)


# ----------------------------------------------------------------------------------------
# Writing a calibration folder


def check_same_camera(settings: Sequence[dict], names: Sequence[str]) -> None:
    """ValueError (one line) unless the pairs' EXIF settings agree where present.

    Args:
      settings: per pair, `io.read_camera_settings` of its left view.
      names: the pairs' names, for the message.

    Pairs without a key are not compared on it; focal lengths and f-numbers agree
    within 1%.
    """
    for key in ("make", "model", "f_number", "focal_length_mm"):
        seen = [(n, st[key]) for n, st in zip(names, settings) if key in st]
        for n, v in seen[1:]:
            n0, v0 = seen[0]
            same = v == v0 if isinstance(v, str) else abs(v - v0) <= 0.01 * abs(v0)
            if not same:
                raise ValueError(f"pairs {n0} and {n} differ in {key} ({v0} vs {v}): one "
                                 "kernel set is for one camera, lens, focal length and "
                                 "aperture; calibrate them separately")


def blur_p90(summary: dict) -> float | None:
    """The 90th-percentile blur radius the fit saw, in units of its model's radius
    (about 1 by the gauge, exactly so before the radius is rounded to 0.1 px), from a
    `SelfCalResult.summary()`; None when the fit fell back or saw no blur.

    What `io.CalibratedKernels.blur_p90` records for the auto preset's range search.
    """
    try:
        p90 = float(summary["blur_radius_px"][2]) / float(summary["model"]["radius"])
    except (KeyError, IndexError, TypeError, ValueError, ZeroDivisionError):
        return None
    return p90 if not summary.get("fallback") and math.isfinite(p90) and p90 > 0 else None


def calibration_kernels(model: DpKernelModel, *, height: int, width: int,
                        tile_size: int | None = None) -> io.CalibratedKernels:
    """The model rendered as a calibration for height x width images.

    Args:
      model: the kernel model, radius in pixels of these images.
      height, width: the image size the calibration covers exactly.
      tile_size: square tile side dividing both (default `choose_tile_size`).

    Returns:
      io.CalibratedKernels with [2, T, K, K] kernels, K = model.default_size().
    """
    tile = choose_tile_size(height, width) if tile_size is None else int(tile_size)
    if tile < 1 or height % tile or width % tile:
        raise ValueError(f"tile size {tile} does not divide the image {height}x{width}")
    rows, cols = height // tile, width // tile
    k = render_kernel_pairs(model, rows=rows, cols=cols)
    return io.CalibratedKernels(kernels=k, grid=(rows, cols), tile_size=tile)


def save_self_calibration(calib_dir, result: SelfCalResult, *, height: int, width: int,
                          tile_size: int | None = None, sources: Sequence[str] = (),
                          settings: dict | None = None,
                          extra_meta: dict | None = None) -> io.CalibratedKernels:
    """Writes `result.model` as a calibration folder that `io.load_calibration_kernels`
    (and run_solver.py --calib_dir) reads.

    kernels_meta.json gets, besides grid, tile size and "blur_p90" (`blur_p90`; absent
    when the fit fell back): "source": "dpjax.selfcal",
    "image_size", "model" (the parameters of the kernels written), "self_calibration"
    (`SelfCalResult.summary()`: fitted parameters, costs, quality, fallback), "sources"
    (the pairs used) and "camera" (their shared EXIF settings, when any), plus
    `extra_meta`.

    Returns:
      The calibration written.
    """
    calib = calibration_kernels(result.model, height=height, width=width, tile_size=tile_size)
    calib = calib._replace(blur_p90=blur_p90(result.summary()))
    meta = {"source": "dpjax.selfcal", "image_size": [int(height), int(width)],
            "model": result.model.to_dict(), "self_calibration": result.summary(),
            "sources": [str(s) for s in sources], "camera": dict(settings or {}),
            **(extra_meta or {})}
    io.save_calibration_kernels(calib_dir, calib, extra_meta=meta)
    return calib
