"""Blur kernels from a target capture: non-parametric per-tile DP kernels by least squares.

A user without a calibration lab photographs a flat textured target (a printed or
displayed noise pattern, posters on a wall) twice with the same framing: blurred
(the DP left/right views at the working aperture, target out of focus) and sharp
(small aperture, or in focus). Per tile t and view v the blurred view is modelled as

    B_v(p) = g_{v,t} (k_{v,t} * S)(p) + o_{v,t,c},   k >= 0, sum(k) = 1,

S the sharp frame after a global alignment (shift plus per-channel affine intensity
fit). The kernel is the least-squares solution with a smoothness prior:

    min_h  1/(2 E_t) sum_c || P_m (h * S_c - B_{v,c}) ||^2 + lambda/2 || grad h ||^2,
    h >= 0,

P_m keeping the tile's valid pixels (mask m) and subtracting their mean per channel
(which eliminates the offset o exactly), grad h the forward differences of h with
zeros outside the K x K window, and k = h / sum(h), g = sum(h). Notes on the choices:
- Intensity domain: white sensor noise makes this the maximum-likelihood fit. (A
  gradient-domain fit converges faster but weights low frequencies by |w|^2, leaving
  broad, flat kernel components nearly unconstrained: tested, it parks a positive
  pedestal over the window.)
- Per-tile gain (default): the blurred and sharp frames differ by vignetting (stronger
  at the wide aperture, different between the two DP views), which a kernel
  constrained to sum 1 could only absorb by changing its shape. Estimating h >= 0 with
  a free sum and normalising afterwards keeps the problem convex and makes
  non-negativity and unit sum exact. `per_tile_gain=False` instead projects onto the
  simplex {h >= 0, sum h = 1} and trusts the global gain of the alignment.
- E_t = ||P_m S_t||^2, the sharp tile's variance energy, makes `smooth_weight`
  dimensionless: the data term is 0 for a perfect fit and 1/2 for h = 0.
- Colour: one kernel shared by all channels, every channel contributing equations
  (the least-squares estimate of a channel-independent kernel; colour edges that vanish
  in a grey image still count). dpjax renders all channels with one kernel bank.
- Masks drop outputs whose K x K sharp support leaves the frame, and, per channel,
  any output touching a clipped value (in a blurred view, or within the support in
  the sharp frame).
- On real captures least squares also parks a few per cent of mass in isolated specks
  far from the kernel, mostly on the window's edge (they grow with K, so they absorb
  model errors: tone curve, vignetting within a tile, the sharp frame's own blur).
  `prune_threshold` refits each kernel on its connected core; on the Canon plane this
  did not lower the held-out fit (it raised it by ~0.01 dB).

Solver: FISTA (Beck & Teboulle 2009) with the gradient-based adaptive restart of
O'Donoghue & Candes (2015), step 1/L with L from a power iteration on each tile's
Hessian; all tiles and both views at once (vmap) in one
`lax.while_loop`. Convolutions are real FFTs per tile (the same "valid" tiled
convolution as dpjax.conv, so the kernels are in the orientation dpjax renders with).

Alignment and kernel offset: a global translation of the sharp frame and a common
translation of all kernels are indistinguishable. `align_sharp` finds the integer
shift maximising the correlation of the sharp frame with the mean of the blurred views
(the full-aperture image) and a sub-pixel refinement; by default only the integer part
is applied and the kernels absorb the rest, which avoids resampling the sharp frame.

Axis glossary: V views (0 left, 1 right), T tiles row-major in a (rows, cols) grid of
square tiles centred in the frame, K odd kernel side, H, W, C image.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from dpjax import io as io_lib
from dpjax.conv import good_fft_size

__all__ = [
    "Alignment",
    "KernelFit",
    "KernelFitConfig",
    "align_sharp",
    "crop_kernels",
    "estimate_tile_kernels",
    "grid_origin",
    "kernel_montage",
    "kernel_stats",
    "project_simplex",
    "select_smooth_weight",
    "shift_image",
    "write_target_calibration",
]

METHOD_NAME = "target_least_squares"


# ----------------------------------------------------------------------------------------
# Small numpy helpers


def _gaussian_lowpass(image: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur of the two leading axes (FFT, 'reflect' padding of 3 sigma).

    Args:
      image: [H, W] or [H, W, C].
    """
    x = np.asarray(image, np.float64)
    if sigma <= 0:
        return x
    pad = int(math.ceil(3 * sigma))
    widths = [(pad, pad), (pad, pad)] + [(0, 0)] * (x.ndim - 2)
    xp = np.pad(x, widths, mode="reflect")
    fy = np.fft.fftfreq(xp.shape[0])[:, None]
    fx = np.fft.rfftfreq(xp.shape[1])[None, :]
    transfer = np.exp(-2 * (np.pi * sigma) ** 2 * (fy * fy + fx * fx))
    if x.ndim == 3:
        transfer = transfer[..., None]
    out = np.fft.irfft2(np.fft.rfft2(xp, axes=(0, 1)) * transfer, s=xp.shape[:2], axes=(0, 1))
    return out[pad:pad + x.shape[0], pad:pad + x.shape[1]]


def shift_image(image: np.ndarray, dy: float, dx: float) -> np.ndarray:
    """out[y, x] = image[y + dy, x + dx] for real (dy, dx): Fourier shift, 'reflect' padded.

    Exact for integers away from the border; sub-pixel shifts are band-limited
    interpolation (no blur, slight ringing at sharp edges).

    Args:
      image: [H, W] or [H, W, C].
    """
    x = np.asarray(image, np.float64)
    pad = int(math.ceil(max(abs(dy), abs(dx)))) + 8
    widths = [(pad, pad), (pad, pad)] + [(0, 0)] * (x.ndim - 2)
    xp = np.pad(x, widths, mode="reflect")
    fy = np.fft.fftfreq(xp.shape[0])[:, None]
    fx = np.fft.rfftfreq(xp.shape[1])[None, :]
    phase = np.exp(2j * np.pi * (fy * dy + fx * dx))
    if x.ndim == 3:
        phase = phase[..., None]
    out = np.fft.irfft2(np.fft.rfft2(xp, axes=(0, 1)) * phase, s=xp.shape[:2], axes=(0, 1))
    return out[pad:pad + x.shape[0], pad:pad + x.shape[1]]


def _as_hwc(name: str, image) -> np.ndarray:
    x = np.asarray(image, np.float64)
    if x.ndim == 2:
        x = x[..., None]
    if x.ndim != 3:
        raise ValueError(f"{name} must be [H, W] or [H, W, C], got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{name} contains NaN or Inf")
    return x


# ----------------------------------------------------------------------------------------
# Alignment


class Alignment(NamedTuple):
    """Global alignment of the sharp frame to the blurred one.

    shift: (dy, dx) floats, integer search plus a parabolic sub-pixel refinement; the
      aligned sharp frame is sharp[y + dy, x + dx] (the sharp frame's content sits
      (dy, dx) below/right of the blurred frame's).
    integer_shift: (dy, dx) the best integer shift.
    gain, offset: [C] per-channel affine fit blurred ~ gain * shifted sharp + offset,
      on Gaussian low-passed images (see `align_sharp`).
    correlation: normalised cross-correlation of the grey images at integer_shift.
    at_search_edge: True when the best integer shift lies on the search border (the
      true shift may be larger than max_shift).
    """

    shift: tuple[float, float]
    integer_shift: tuple[int, int]
    gain: np.ndarray
    offset: np.ndarray
    correlation: float
    at_search_edge: bool


def align_sharp(sharp, blurred, *, max_shift: int = 8, lowpass_sigma: float = 2.0,
                gain_sigma: float = 8.0) -> Alignment:
    """Global shift and affine intensity fit of a sharp frame to a blurred one.

    The shift maximises the normalised cross-correlation of the grey (channel-mean)
    images, both low-passed by `lowpass_sigma` (which makes the correlation surface
    smooth and the blur difference between the frames matter less), over
    [-max_shift, max_shift]^2 on the central region; a parabola through the best
    score and its neighbours refines each axis to sub-pixel.

    The affine fit is per channel, on images low-passed by `gain_sigma`: regressing
    a blurred image on a sharp one underestimates the gain (the sharp frame has
    detail the blurred one lacks), a bias that shrinks as the low-pass grows wider
    than the blur. `estimate_tile_kernels` re-estimates the gain per tile by default.

    Args:
      sharp: [H, W, C] (or [H, W]) sharp frame, linear.
      blurred: same shape, the blurred frame (e.g. the mean of the two DP views).
      max_shift: search radius in pixels (>= 0).
      lowpass_sigma: Gaussian sigma (px) for the shift search (0: none).
      gain_sigma: Gaussian sigma (px) for the gain/offset fit (0: none).

    Returns:
      Alignment.
    """
    s = _as_hwc("sharp", sharp)
    b = _as_hwc("blurred", blurred)
    if s.shape != b.shape:
        raise ValueError(f"sharp {s.shape} and blurred {b.shape} frames differ in shape")
    m = int(max_shift)
    if m < 0:
        raise ValueError(f"max_shift must be >= 0, got {max_shift}")
    height, width, _ = s.shape
    h, w = height - 2 * m, width - 2 * m
    if h < 8 or w < 8:
        raise ValueError(f"frame {height}x{width} too small for max_shift={m}")

    sg = _gaussian_lowpass(s.mean(-1), lowpass_sigma)
    bg = _gaussian_lowpass(b.mean(-1), lowpass_sigma)
    region = bg[m:m + h, m:m + w]
    region = region - region.mean()
    rn = np.sqrt((region * region).sum())
    ncc = np.full((2 * m + 1, 2 * m + 1), -np.inf)
    for dy in range(-m, m + 1):
        for dx in range(-m, m + 1):
            win = sg[m + dy:m + dy + h, m + dx:m + dx + w]
            win = win - win.mean()
            wn = np.sqrt((win * win).sum())
            if wn > 0 and rn > 0:
                ncc[dy + m, dx + m] = (win * region).sum() / (wn * rn)
    if not np.isfinite(ncc).any():
        raise ValueError("sharp or blurred frame has no texture: cannot align")
    best = ncc.max()
    # Ties go to the shift nearest (0, 0).
    cand = np.argwhere(ncc >= best - 1e-12) - m
    iy, ix = min((tuple(c) for c in cand), key=lambda c: (c[0] ** 2 + c[1] ** 2, c))
    iy, ix = int(iy), int(ix)

    def refine(lo: float, mid: float, hi: float) -> float:
        curv = lo - 2 * mid + hi
        if not (np.isfinite(lo) and np.isfinite(hi)) or curv >= 0:
            return 0.0
        return float(np.clip(0.5 * (lo - hi) / curv, -0.5, 0.5))

    at_edge = m > 0 and (abs(iy) == m or abs(ix) == m)
    fy = fx = 0.0
    if m > 0 and not at_edge:
        c = (iy + m, ix + m)
        fy = refine(ncc[c[0] - 1, c[1]], ncc[c], ncc[c[0] + 1, c[1]])
        fx = refine(ncc[c[0], c[1] - 1], ncc[c], ncc[c[0], c[1] + 1])

    sl = _gaussian_lowpass(s, gain_sigma)[m + iy:m + iy + h, m + ix:m + ix + w]
    bl = _gaussian_lowpass(b, gain_sigma)[m:m + h, m:m + w]
    gain = np.empty(s.shape[2])
    offset = np.empty(s.shape[2])
    for ch in range(s.shape[2]):
        x, y = sl[..., ch].ravel(), bl[..., ch].ravel()
        xc = x - x.mean()
        var = (xc * xc).mean()
        gain[ch] = (xc * (y - y.mean())).mean() / var if var > 0 else 1.0
        offset[ch] = y.mean() - gain[ch] * x.mean()
    return Alignment(shift=(iy + fy, ix + fx), integer_shift=(iy, ix), gain=gain,
                     offset=offset, correlation=float(best), at_search_edge=bool(at_edge))


# ----------------------------------------------------------------------------------------
# Kernel estimation


@dataclasses.dataclass(frozen=True, kw_only=True)
class KernelFitConfig:
    """Options of `estimate_tile_kernels`.

    kernel_size: odd K of the estimated kernels; pick it generously (the fit reports
      the actual extent, and `crop_kernels` trims it before saving).
    smooth_weight: lambda, weight of the squared kernel gradient (dimensionless, see
      the module docstring).
    per_tile_gain: estimate a gain per tile and view (kernel sum free, then
      normalised); False projects onto the unit-sum simplex with the global gain.
    subpixel: also apply the sub-pixel part of the alignment shift to the sharp frame
      (Fourier shift); False leaves it to the kernels.
    max_shift: alignment search radius (px), when no alignment is given.
    saturation: values >= this (in any channel, in the inputs' units) count as clipped
      and are masked; None disables.
    max_iters, tol: FISTA stops per tile when ||y - x_new|| <= tol * ||x_new||.
    holdout_block: > 0 holds out a checkerboard of holdout_block-px squares: they are
      left out of the fit and the report's residuals and PSNRs are measured on them
      only (cross-validation, e.g. to choose smooth_weight). Use blocks much wider
      than the kernels, since neighbouring blurred pixels share sharp pixels.
    prune_threshold: > 0 refits each kernel on its core: the 8-connected region of
      values >= prune_threshold x its peak that holds the peak, grown by
      prune_dilate px; everything else is held at 0. This drops isolated specks that
      least squares places far from the kernel to absorb model errors.
    """

    kernel_size: int = 21
    smooth_weight: float = 1e-3
    per_tile_gain: bool = True
    subpixel: bool = False
    max_shift: int = 8
    saturation: float | None = 0.99
    max_iters: int = 3000
    tol: float = 1e-5
    holdout_block: int = 0
    prune_threshold: float = 0.0
    prune_dilate: int = 1


class KernelFit(NamedTuple):
    """Result of `estimate_tile_kernels`.

    kernels: [2, T, K, K] float32, each >= 0 and summing to 1.
    gain: [2, T] estimated per-tile gain (sum of the unnormalised kernel; 1 with
      per_tile_gain=False).
    residual_rms: [2, T] RMS of B - (a (k * S) + b) over the tile's valid pixels and
      channels (the held-out ones with holdout_block > 0), (a, b) a least-squares fit
      per tile, view and channel (linear units).
    residual_rel: [2, T] residual_rms / std of the blurred tile.
    identity_rms: [2, T] the same for the unblurred sharp frame (k = delta).
    psnr_reblur: [2] PSNR (data range 1) of the re-blurred sharp frame against each
      blurred view over all valid pixels, per-tile affine fit as above.
    psnr_identity: [2] the same for the unblurred sharp frame.
    valid_fraction: [T] fraction of each tile's pixel values (all channels) used.
    iterations: [2, T] FISTA iterations; converged: [2, T] bool.
    alignment: the Alignment used.
    grid: (rows, cols); tile: tile side; origin: (y0, x0) of the grid in the frame.
    """

    kernels: np.ndarray
    gain: np.ndarray
    residual_rms: np.ndarray
    residual_rel: np.ndarray
    identity_rms: np.ndarray
    psnr_reblur: np.ndarray
    psnr_identity: np.ndarray
    valid_fraction: np.ndarray
    iterations: np.ndarray
    converged: np.ndarray
    alignment: Alignment
    grid: tuple[int, int]
    tile: int
    origin: tuple[int, int]


def grid_origin(height: int, width: int, grid: tuple[int, int], tile: int) -> tuple[int, int]:
    """Top-left corner of a rows x cols grid of tile-px tiles centred in an H x W frame."""
    rows, cols = grid
    if rows < 1 or cols < 1 or tile < 1:
        raise ValueError(f"grid {rows}x{cols} and tile {tile} must be positive")
    if rows * tile > height or cols * tile > width:
        raise ValueError(f"a {rows}x{cols} grid of {tile}-px tiles ({rows * tile}x"
                         f"{cols * tile}) does not fit in the {height}x{width} frame")
    return (height - rows * tile) // 2, (width - cols * tile) // 2


def project_simplex(h: jax.Array, support: jax.Array | None = None) -> jax.Array:
    """Euclidean projection of a [K, K] array onto {h >= 0, sum h = 1} (Duchi et al. 2008).

    support: optional [K, K] 0/1 mask; the projection is then onto the simplex of
    kernels that vanish outside it.
    """
    if support is not None:
        # Off-support entries sort last and never enter the threshold: they end at 0.
        h = jnp.where(support > 0, h, -1e30)
    v = h.reshape(-1)
    u = jnp.sort(v)[::-1]
    css = jnp.cumsum(u)
    j = jnp.arange(1, v.size + 1, dtype=v.dtype)
    rho = jnp.sum((u - (css - 1) / j) > 0)  # the condition holds on a prefix
    theta = (css[rho - 1] - 1) / rho.astype(v.dtype)
    return jnp.maximum(h - theta, 0.0)


def _blur_tile(h: jax.Array, s_spec: jax.Array, fft_n: int, tile: int) -> jax.Array:
    """'Valid' convolution of a padded sharp tile with h, via the tile's spectrum.

    Args:
      h: [K, K] kernel; s_spec: [C, N, N // 2 + 1] rfft2 of the [C, tile + 2r, tile + 2r]
        sharp patch zero-padded to N x N (N >= tile + 2r: wrap-around stays outside).

    Returns:
      [C, tile, tile].
    """
    k = h.shape[-1]
    hs = jnp.fft.rfft2(h, s=(fft_n, fft_n))
    full = jnp.fft.irfft2(hs[None] * s_spec, s=(fft_n, fft_n))
    return full[:, k - 1:k - 1 + tile, k - 1:k - 1 + tile]


def _objective(h, s_spec, blurred, mask, energy, smooth_weight, fft_n):
    """Least squares (offset eliminated) plus smoothness for one (view, tile); module doc.

    Args:
      h: [K, K]; s_spec: [C, N, N//2+1]; blurred: [C, tile, tile]; mask: [C, tile, tile]
      (0/1); energy: scalar E_t.
    """
    d = (_blur_tile(h, s_spec, fft_n, blurred.shape[-1]) - blurred) * mask
    # The best per-channel offset is the masked mean of the residual: subtract it.
    count = jnp.maximum(jnp.sum(mask, axis=(-2, -1), keepdims=True), 1.0)
    d = d - mask * (jnp.sum(d, axis=(-2, -1), keepdims=True) / count)
    data = 0.5 * jnp.sum(d * d) / energy
    # Zero outside the window (Dirichlet): the prior also pulls the kernel to 0 at the
    # window's edge, where a free boundary would leave edge pixels barely regularised.
    hp = jnp.pad(h, 1)
    gx = hp[:, 1:] - hp[:, :-1]
    gy = hp[1:, :] - hp[:-1, :]
    return data + 0.5 * smooth_weight * (jnp.sum(gx * gx) + jnp.sum(gy * gy))


class _SolveState(NamedTuple):
    x: jax.Array  # [V, T, K, K]
    y: jax.Array
    t: jax.Array  # [V, T]
    done: jax.Array  # [V, T] bool
    iters: jax.Array  # [V, T] int32
    it: jax.Array  # scalar int32


@partial(jax.jit, static_argnames=("fft_n", "simplex", "max_iters", "power_iters"))
def _fista(h0, support, s_spec, blurred, mask, energy, smooth_weight, tol, key, *, fft_n: int,
           simplex: bool, max_iters: int, power_iters: int = 30):
    """Projected FISTA with adaptive restart over all views and tiles.

    The step is 1 / L, L = 1.2 x the largest eigenvalue of each tile's (quadratic)
    objective Hessian, found by power iteration: a spectral bound over the whole FFT
    grid would be set by frequencies far below 1 / K that the kernel cannot express,
    and would shrink the step by orders of magnitude.

    Args:
      h0: [V, T, K, K] start; support: [V, T, K, K] 0/1, where h may be non-zero;
      s_spec: [T, C, N, N//2+1]; blurred: [V, T, C, tile, tile];
      mask: [T, C, tile, tile]; energy: [T]; key: PRNG key for the power iteration.

    Returns:
      (h [V, T, K, K], iterations [V, T], converged [V, T]).
    """
    grad_one = jax.grad(_objective)
    per_tile = jax.vmap(grad_one, in_axes=(0, 0, 0, 0, 0, None, None))
    per_view = jax.vmap(per_tile, in_axes=(0, None, 0, None, None, None, None))
    if simplex:
        def project(h):
            return jax.vmap(jax.vmap(project_simplex))(h, support)
    else:
        def project(h):
            return jnp.maximum(h, 0.0) * support

    def grad(h):
        return per_view(h, s_spec, blurred, mask, energy, smooth_weight, fft_n)

    # Hessian-vector products: the objective is quadratic, so H v = grad(v) - grad(0).
    g0 = grad(jnp.zeros_like(h0))

    def power_step(_, v):
        w = grad(v) - g0
        return w / jnp.sqrt(jnp.sum(w * w, axis=(-2, -1), keepdims=True))

    v = jax.random.uniform(key, h0.shape, h0.dtype)
    v = jax.lax.fori_loop(0, power_iters, power_step, v)
    top = jnp.sum(v * (grad(v) - g0), axis=(-2, -1))  # Rayleigh quotient, [V, T]
    step = (1.0 / (1.2 * top))[..., None, None]

    def body(st: _SolveState) -> _SolveState:
        g = grad(st.y)
        x_new = project(st.y - step * g)
        move = jnp.sqrt(jnp.sum((st.y - x_new) ** 2, axis=(-2, -1)))
        size = jnp.sqrt(jnp.sum(x_new ** 2, axis=(-2, -1)))
        converged = move <= tol * size
        t_new = 0.5 * (1.0 + jnp.sqrt(1.0 + 4.0 * st.t ** 2))
        # Restart the momentum when it points against the gradient-mapping step.
        restart = jnp.sum((st.y - x_new) * (x_new - st.x), axis=(-2, -1)) > 0
        beta = jnp.where(restart, 0.0, (st.t - 1.0) / t_new)
        y_new = x_new + beta[..., None, None] * (x_new - st.x)
        t_new = jnp.where(restart, 1.0, t_new)
        keep = st.done[..., None, None]
        return _SolveState(
            x=jnp.where(keep, st.x, x_new),
            y=jnp.where(keep, st.y, y_new),
            t=jnp.where(st.done, st.t, t_new),
            done=st.done | converged,
            iters=jnp.where(st.done, st.iters, st.it + 1),
            it=st.it + 1)

    def cond(st: _SolveState):
        return (st.it < max_iters) & ~jnp.all(st.done)

    batch = h0.shape[:2]
    st = _SolveState(x=h0, y=h0, t=jnp.ones(batch, h0.dtype), done=jnp.zeros(batch, bool),
                     iters=jnp.zeros(batch, jnp.int32), it=jnp.asarray(0, jnp.int32))
    st = jax.lax.while_loop(cond, body, st)
    return st.x, st.iters, st.done


@partial(jax.jit, static_argnames=("fft_n", "tile"))
def _reblur_all(h, s_spec, *, fft_n: int, tile: int):
    """[V, T, K, K] kernels, [T, C, N, N//2+1] spectra -> [V, T, C, tile, tile]."""
    one = jax.vmap(lambda k, s: _blur_tile(k, s, fft_n, tile))
    return jax.vmap(lambda kv: one(kv, s_spec))(h)



def _affine_residual(pred: np.ndarray, target: np.ndarray, mask: np.ndarray):
    """Per (view, tile, channel) least-squares affine fit of target on pred over mask.

    Args:
      pred, target: [V, T, C, th, tw]; mask: [T, C, th, tw] (0/1).

    Returns:
      (sum of squared residuals [V, T], squared deviations of target from its mean
      [V, T], count of residual values [T]).
    """
    m = mask[None]
    n = np.maximum(mask.sum(axis=(-2, -1)), 1)[None]  # [1, T, C]
    mp = (pred * m).sum(axis=(-2, -1)) / n
    mt = (target * m).sum(axis=(-2, -1)) / n
    pc = (pred - mp[..., None, None]) * m
    tc = (target - mt[..., None, None]) * m
    var_p = (pc * pc).sum(axis=(-2, -1))
    cov = (pc * tc).sum(axis=(-2, -1))
    a = np.where(var_p > 0, cov / np.where(var_p > 0, var_p, 1), 0.0)
    res = tc - a[..., None, None] * pc
    sse = (res * res).sum(axis=(-3, -2, -1))
    sst = (tc * tc).sum(axis=(-3, -2, -1))
    count = mask.sum(axis=(-3, -2, -1))
    return sse, sst, count


def _core_support(h: np.ndarray, threshold: float, dilate: int) -> np.ndarray:
    """[..., K, K] 0/1: the 8-connected region of h >= threshold x peak holding the peak,
    grown by `dilate` px (square)."""

    def grow(m: np.ndarray) -> np.ndarray:
        p = np.pad(m, [(0, 0)] * (m.ndim - 2) + [(1, 1), (1, 1)])
        k = m.shape[-1]
        return np.max([p[..., i:i + k, j:j + k] for i in range(3) for j in range(3)], axis=0)

    above = h >= threshold * h.max(axis=(-2, -1), keepdims=True)
    flat = h.reshape(h.shape[:-2] + (-1,))
    core = np.zeros(flat.shape, bool)
    np.put_along_axis(core, flat.argmax(-1)[..., None], True, -1)
    core = core.reshape(h.shape)
    while True:  # flood fill from the peak
        nxt = grow(core) & above
        if np.array_equal(nxt, core):
            break
        core = nxt
    for _ in range(dilate):
        core = grow(core)
    return core.astype(h.dtype)


def _initial_kernel(k: int) -> np.ndarray:
    """A centred Gaussian (sigma K/8) summing to 1: a neutral start."""
    t = np.arange(k) - (k - 1) / 2
    g = np.exp(-0.5 * (t / (k / 8.0)) ** 2)
    g2 = np.outer(g, g)
    return g2 / g2.sum()


def estimate_tile_kernels(blurred_views, sharp, *, grid: tuple[int, int], tile: int,
                          config: KernelFitConfig = KernelFitConfig(),
                          alignment: Alignment | None = None) -> KernelFit:
    """Per-tile left/right blur kernels from a blurred DP pair and a sharp frame.

    Args:
      blurred_views: [2, H, W, C] (or [2, H, W]) left/right views, linear.
      sharp: [H, W, C] (or [H, W]) sharp frame of the same target, same framing, linear.
      grid: (rows, cols) tiles, centred in the frame (see `grid_origin`).
      tile: tile side in px.
      config: KernelFitConfig.
      alignment: a precomputed Alignment; default `align_sharp(sharp, mean of the views,
        max_shift=config.max_shift)`.

    Returns:
      KernelFit (kernels [2, T, K, K] and the fit report).

    Raises:
      ValueError: shapes differ, non-finite values, a grid that does not fit, an even
        or too small kernel size, or a tile with no usable pixel.
    """
    views = np.asarray(blurred_views, np.float64)
    if views.ndim == 3:
        views = views[..., None]
    if views.ndim != 4 or views.shape[0] != 2:
        raise ValueError(f"blurred_views must be [2, H, W, C], got shape {views.shape}")
    if not np.all(np.isfinite(views)):
        raise ValueError("blurred views contain NaN or Inf")
    sharp_img = _as_hwc("sharp", sharp)
    if sharp_img.shape != views.shape[1:]:
        raise ValueError(f"sharp frame {sharp_img.shape} and blurred views "
                         f"{views.shape[1:]} differ in shape (H, W, C)")
    k = int(config.kernel_size)
    if k < 3 or k % 2 != 1:
        raise ValueError(f"kernel_size must be odd and >= 3, got {k}")
    if config.smooth_weight < 0:
        raise ValueError(f"smooth_weight must be >= 0, got {config.smooth_weight}")
    r = k // 2
    height, width, channels = sharp_img.shape
    rows, cols = int(grid[0]), int(grid[1])
    y0, x0 = grid_origin(height, width, (rows, cols), int(tile))

    if alignment is None:
        alignment = align_sharp(sharp_img, views.mean(0), max_shift=config.max_shift)
    dy, dx = alignment.integer_shift
    shifted = sharp_img
    if config.subpixel:
        shifted = shift_image(sharp_img, alignment.shift[0] - dy, alignment.shift[1] - dx)
    shifted = shifted * alignment.gain + alignment.offset  # [H, W, C]

    # Valid outputs, per channel: the K x K support of sharp[y + dy, x + dx] inside the
    # frame, and no clipped value in a blurred view or within the support in the sharp
    # frame (a channel clipped in bright areas, e.g. blue sky, still leaves the others).
    yy = np.arange(height)[:, None] + dy
    xx = np.arange(width)[None, :] + dx
    inside = (yy - r >= 0) & (yy + r < height) & (xx - r >= 0) & (xx + r < width)
    valid = np.repeat(inside[..., None], channels, axis=-1)  # [H, W, C]
    if config.saturation is not None:
        valid &= ~(views >= config.saturation).any(axis=0)
        p = max(abs(dy), abs(dx))
        for ch in range(channels):
            clipped = (sharp_img[..., ch] >= config.saturation).astype(np.float64)
            near = io_lib.box_filter(clipped, k) > 0.5 / (k * k)  # dilated by r
            near = np.pad(near, p)[p + dy:p + dy + height, p + dx:p + dx + width]
            valid[..., ch] &= ~near  # outside the frame is already invalid

    pad = r + max(abs(dy), abs(dx))
    sp = np.pad(shifted, ((pad, pad), (pad, pad), (0, 0)), mode="edge")
    n_pad = tile + 2 * r
    fft_n = good_fft_size(n_pad)
    patches, blurred_t, masks = [], [], []
    for i in range(rows):
        for j in range(cols):
            ty, tx = y0 + i * tile, x0 + j * tile
            sy, sx = ty - r + dy + pad, tx - r + dx + pad
            patches.append(sp[sy:sy + n_pad, sx:sx + n_pad].transpose(2, 0, 1))
            blurred_t.append(views[:, ty:ty + tile, tx:tx + tile].transpose(0, 3, 1, 2))
            masks.append(valid[ty:ty + tile, tx:tx + tile].transpose(2, 0, 1))
    patches = np.stack(patches)  # [T, C, n_pad, n_pad]
    blurred_t = np.stack(blurred_t, axis=1)  # [V, T, C, tile, tile]
    mask = np.stack(masks).astype(np.float64)  # [T, C, tile, tile]
    valid_fraction = mask.mean(axis=(1, 2, 3))
    empty = np.flatnonzero(valid_fraction == 0)
    if empty.size:
        raise ValueError(f"tiles {empty.tolist()} have no usable pixel (clipped or outside "
                         "the aligned sharp frame)")
    report_mask = mask
    if config.holdout_block > 0:
        b = int(config.holdout_block)
        held = ((np.arange(height)[:, None] // b + np.arange(width)[None, :] // b) % 2 == 1)
        held_t = np.stack([held[y0 + i * tile:y0 + (i + 1) * tile,
                                x0 + j * tile:x0 + (j + 1) * tile]
                           for i in range(rows) for j in range(cols)])[:, None]
        report_mask = mask * held_t
        mask = mask * ~held_t
    # E_t: variance energy of the sharp frame over each tile's valid outputs (per channel).
    centre = patches[:, :, r:r + tile, r:r + tile]  # [T, C, tile, tile]
    count = np.maximum(mask.sum(axis=(2, 3), keepdims=True), 1)
    dev = (centre - (centre * mask).sum(axis=(2, 3), keepdims=True) / count) * mask
    energy = (dev * dev).sum(axis=(1, 2, 3))
    flat = np.flatnonzero(~(energy > 0))
    if flat.size:
        raise ValueError(f"tiles {flat.tolist()} have no texture in the sharp frame "
                         "where usable (unclipped) pixels remain")
    s_spec = np.fft.rfft2(patches, s=(fft_n, fft_n))  # [T, C, N, N//2+1]

    h0 = np.broadcast_to(_initial_kernel(k), (2, rows * cols, k, k))
    f32 = partial(jnp.asarray, dtype=jnp.float32)
    s_spec_j = jnp.asarray(s_spec.astype(np.complex64))
    solve = partial(_fista, s_spec=s_spec_j, blurred=f32(blurred_t), mask=f32(mask),
                    energy=f32(energy), smooth_weight=jnp.float32(config.smooth_weight),
                    tol=jnp.float32(config.tol), key=jax.random.PRNGKey(0), fft_n=fft_n,
                    simplex=not config.per_tile_gain, max_iters=int(config.max_iters))
    h, iters, done = solve(f32(h0), f32(np.ones_like(h0)))
    if config.prune_threshold > 0:
        support = _core_support(np.asarray(h), config.prune_threshold, config.prune_dilate)
        h_core = np.asarray(h) * support
        if not config.per_tile_gain:  # back onto the simplex before restarting
            h_core = h_core / np.maximum(h_core.sum(axis=(-2, -1), keepdims=True), 1e-30)
        h, iters2, done = solve(f32(h_core), f32(support))
        iters = iters + iters2
    h = np.asarray(h, np.float64)
    if not np.all(np.isfinite(h)):
        raise FloatingPointError("kernel estimation produced NaN or Inf")
    gain = h.sum(axis=(-2, -1))
    if np.any(gain <= 0):
        v, t = np.argwhere(gain <= 0)[0]
        raise ValueError(f"view {v} tile {t}: the estimated kernel is all zero (the "
                         "blurred tile does not correlate with the sharp one)")
    kernels = (h / gain[..., None, None]).astype(np.float32)
    kernels /= kernels.sum(axis=(-2, -1), keepdims=True)

    # Fit report: intensity-domain residuals with a per-(view, tile, channel) affine fit.
    pred = np.asarray(_reblur_all(jnp.asarray(kernels), s_spec_j, fft_n=fft_n, tile=tile),
                      np.float64)
    ident = np.broadcast_to(centre[None], pred.shape)
    sse, sst, count = _affine_residual(pred, blurred_t, report_mask)
    sse_id, _, _ = _affine_residual(ident, blurred_t, report_mask)
    residual_rms = np.sqrt(sse / count)
    psnr = 10 * np.log10(count.sum() / sse.sum(axis=1))
    psnr_id = 10 * np.log10(count.sum() / sse_id.sum(axis=1))
    return KernelFit(
        kernels=kernels, gain=gain.astype(np.float32), residual_rms=residual_rms,
        residual_rel=np.sqrt(sse / np.maximum(sst, 1e-30)),
        identity_rms=np.sqrt(sse_id / count), psnr_reblur=psnr, psnr_identity=psnr_id,
        valid_fraction=valid_fraction, iterations=np.asarray(iters),
        converged=np.asarray(done), alignment=alignment, grid=(rows, cols), tile=int(tile),
        origin=(y0, x0))


def select_smooth_weight(blurred_views, sharp, *, grid: tuple[int, int], tile: int,
                         config: KernelFitConfig = KernelFitConfig(),
                         candidates: tuple[float, ...] = (1e-4, 1e-3, 1e-2, 1e-1, 1.0),
                         holdout_block: int = 16, alignment: Alignment | None = None,
                         ) -> tuple[float, dict[float, float]]:
    """The smoothness weight that best predicts held-out pixels.

    The best weight depends on the noise and on the kernels' size (a given weight
    smooths a wide kernel less), so it is chosen by cross-validation: each candidate
    is fitted with a checkerboard of holdout_block-px squares held out
    (`KernelFitConfig.holdout_block`) and scored by the PSNR of the re-blurred sharp
    frame on them, averaged over the two views.

    Args: as `estimate_tile_kernels`, plus the candidate weights and the block size.

    Returns:
      (best weight, {weight: held-out PSNR in dB}).
    """
    if not candidates:
        raise ValueError("no candidate smooth weights")
    if alignment is None:
        views = np.asarray(blurred_views, np.float64)
        alignment = align_sharp(sharp, views.mean(0), max_shift=config.max_shift)
    scores = {}
    for weight in candidates:
        cfg = dataclasses.replace(config, smooth_weight=float(weight),
                                  holdout_block=int(holdout_block))
        fit = estimate_tile_kernels(blurred_views, sharp, grid=grid, tile=tile, config=cfg,
                                    alignment=alignment)
        scores[float(weight)] = float(np.mean(fit.psnr_reblur))
    best = max(scores, key=lambda w: (scores[w], -w))
    return best, scores


# ----------------------------------------------------------------------------------------
# Kernel statistics, cropping, display, writing


def kernel_stats(kernels, *, peak_fraction: float = 0.01, mass: float = 0.99) -> dict:
    """Position and extent of each kernel.

    Args:
      kernels: [..., K, K], non-negative, summing to 1.

    Returns:
      dict of [...] arrays: centroid_y, centroid_x (px from the window centre, +y down,
      +x right); width, height (px spanned by values >= peak_fraction * peak);
      radius (px, smallest disc about the centroid holding `mass` of the kernel);
      border_mass (mass on the outermost ring of the window: > ~1e-3 means K was too
      small and the kernel is truncated).
    """
    k = np.asarray(kernels, np.float64)
    side = k.shape[-1]
    c = np.arange(side) - (side - 1) / 2
    total = k.sum(axis=(-2, -1))
    cy = (k.sum(-1) * c).sum(-1) / total
    cx = (k.sum(-2) * c).sum(-1) / total
    above = k >= peak_fraction * k.max(axis=(-2, -1), keepdims=True)
    rows_any, cols_any = above.any(-1), above.any(-2)

    def span(a):
        idx = np.arange(side)
        lo = np.where(a, idx, side).min(-1)
        hi = np.where(a, idx, -1).max(-1)
        return hi - lo + 1

    dist = np.sqrt((c[:, None] - cy[..., None, None]) ** 2
                   + (c[None, :] - cx[..., None, None]) ** 2)
    flat_d = dist.reshape(dist.shape[:-2] + (-1,))
    flat_k = k.reshape(k.shape[:-2] + (-1,)) / total[..., None]
    order = np.argsort(flat_d, axis=-1)
    cum = np.cumsum(np.take_along_axis(flat_k, order, -1), -1)
    first = np.argmax(cum >= mass, axis=-1)
    radius = np.take_along_axis(np.take_along_axis(flat_d, order, -1), first[..., None],
                                -1)[..., 0]
    ring = np.ones((side, side), bool)
    ring[1:-1, 1:-1] = False
    return {"centroid_y": cy, "centroid_x": cx, "width": span(cols_any),
            "height": span(rows_any), "radius": radius,
            "border_mass": (k * ring).sum(axis=(-2, -1)) / total}


def crop_kernels(kernels, *, mass: float = 0.999) -> np.ndarray:
    """Crop a [2, T, K, K] bank to the smallest centred odd window keeping `mass` of every kernel.

    The window stays centred on the original centre pixel, so the kernels' positions
    (their offsets, the DP disparity) are unchanged; each is renormalised to sum 1.
    A small window keeps dpjax's rescaled kernels (side ~ |s| K) cheap.
    """
    k = np.asarray(kernels, np.float64)
    side = k.shape[-1]
    r_full = side // 2
    total = k.sum(axis=(-2, -1))
    for r in range(1, r_full + 1):
        inner = k[..., r_full - r:r_full + r + 1, r_full - r:r_full + r + 1]
        if np.all(inner.sum(axis=(-2, -1)) >= mass * total):
            break
    out = k[..., r_full - r:r_full + r + 1, r_full - r:r_full + r + 1]
    return (out / out.sum(axis=(-2, -1), keepdims=True)).astype(np.float32)


def kernel_montage(kernels, grid: tuple[int, int], *, zoom: int = 8) -> np.ndarray:
    """A picture of a [2, T, K, K] bank laid out as the tile grid.

    Each tile shows its left kernel then its right kernel, both on one colour scale
    (0 to the pair's peak), enlarged `zoom` times; a white dot marks each window's
    centre. Tiles are separated by 4-px grey gaps, the two views of a tile by 1 px.

    Returns:
      uint8 [H, W, 3] RGB.
    """
    from dpjax.outputs import colormap

    k = np.asarray(kernels, np.float64)
    rows, cols = grid
    side = k.shape[-1] * zoom
    gap, inner = 4, 1
    cell_w = 2 * side + inner
    out = np.full((rows * side + (rows + 1) * gap, cols * cell_w + (cols + 1) * gap, 3), 128,
                  np.uint8)
    mid = (k.shape[-1] // 2) * zoom + zoom // 2
    for t in range(rows * cols):
        i, j = divmod(t, cols)
        top, left = gap + i * (side + gap), gap + j * (cell_w + gap)
        peak = k[:, t].max()
        for v in range(2):
            img = colormap(np.kron(k[v, t], np.ones((zoom, zoom))), 0.0, peak)
            img[mid - 1:mid + 1, mid - 1:mid + 1] = 255
            x = left + v * (side + inner)
            out[top:top + side, x:x + side] = img
    return out


def write_target_calibration(calib_dir, fit: KernelFit, *, crop_mass: float = 0.999,
                             extra_meta: Mapping | None = None) -> np.ndarray:
    """Write a KernelFit as a dpjax calibration folder.

    blur_kernels_{left,right}.npy ([T, K', K'] float32, row-major tiles) and
    kernels_meta.json via io.save_calibration_kernels, with kernels cropped by
    `crop_kernels(mass=crop_mass)` (crop_mass >= 1 keeps K). kernels_meta.json holds
    grid and tile_size (what io.load_calibration_kernels reads) plus, additively:
    method, crop_origin / image_shape-independent grid placement, the fit options in
    extra_meta, the alignment, the kernel statistics and the fit report summary.

    Returns:
      the written kernels [2, T, K', K'].
    """
    kernels = fit.kernels if crop_mass >= 1 else crop_kernels(fit.kernels, mass=crop_mass)
    stats = kernel_stats(kernels)
    al = fit.alignment
    meta = {
        "method": METHOD_NAME,
        "estimated_from": "a textured plane shot blurred (DP views) and sharp; "
                          "per-tile least squares, see dpjax/target_calib.py",
        "grid_origin": list(fit.origin),
        "kernel_size_estimated": int(fit.kernels.shape[-1]),
        "kernel_size": int(kernels.shape[-1]),
        "crop_mass": crop_mass,
        "reference_defocus": "the target's: these kernels are scale s = 1",
        "alignment": {"shift": list(al.shift), "integer_shift": list(al.integer_shift),
                      "gain": al.gain, "offset": al.offset,
                      "correlation": al.correlation},
        "fit": {"gain": fit.gain, "residual_rms": fit.residual_rms,
                "residual_rel": fit.residual_rel, "identity_rms": fit.identity_rms,
                "psnr_reblur": fit.psnr_reblur, "psnr_identity": fit.psnr_identity,
                "valid_fraction": fit.valid_fraction, "iterations": fit.iterations,
                "converged": fit.converged},
        "kernel_stats": stats,
    }
    if extra_meta:
        meta.update(extra_meta)
    calib = io_lib.CalibratedKernels(kernels=kernels, grid=fit.grid, tile_size=fit.tile)
    io_lib.save_calibration_kernels(calib_dir, calib, extra_meta=meta)
    return kernels
