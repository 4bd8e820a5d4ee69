"""Classical dual-pixel baselines for the Pixel 4 table (experiments/reproduce_table.py).

Two non-learned, non-iterative methods that use the same calibrated kernels as the
solver, so that a comparison isolates the MPI optimisation:

- `dp_stereo_defocus`: defocus from the kernel-symmetry search of Punnappurath et al.
  (ICCP 2020), calibrated-kernel variant. If a patch sits at signed scale s*, then
  L = I * k_L(s*) and R = I * k_R(s*), so L * k_R(s*) = R * k_L(s*) (convolution
  commutes). For every candidate scale s we measure the windowed mismatch
  |L * k_R(s) - R * k_L(s)|^2 and keep, per pixel, the candidate with the least
  mismatch, refined between candidates by a parabola.
- `wiener_deconvolve`: given a defocus map (e.g. the solver's), Wiener-deconvolve
  both views jointly at each layer's kernels, X = sum_v conj(K_v) Y_v /
  (sum_v |K_v|^2 + NSR), and pick per pixel the layer (linearly interpolated
  between the two nearest scales) matching the defocus estimate.

Inputs are `[V, H, W, C]` views and a `KernelBank` (axis glossary in `dpjax.kernels`).
Functions are host-callable wrappers around jitted per-scale kernels (one compile per
problem size: the scale is a traced argument); they return numpy arrays.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from dpjax import conv
from dpjax.kernels import KernelBank, rescale_kernels, rescaled_radius

__all__ = [
    "STEREO_WINDOW", "WIENER_NSR", "DpStereoResult", "box_filter", "dp_stereo_cost",
    "dp_stereo_defocus", "wiener_deconvolve",
]

# Noise-to-signal ratio of the Wiener filter, relative to the DC gain of the joint
# system (sum_v |K_v(0)|^2 = 2 for kernels summing to 1). 3e-2 keeps the gain of the
# inverse filter below ~7 at any frequency; measured on synthetic scenes with the
# package's default sensor noise (shot 1e-4, read 2e-3), where values from 3e-3 to
# 3e-2 all beat the blurry input (tests/test_reproduce.py).
WIENER_NSR = 3e-2

# Side of the square window over which the symmetry mismatch is averaged (pixels at
# full resolution); about the calibration's kernel size, so a window sees a whole blur.
STEREO_WINDOW = 31

# Guards the normalised mismatch against division by a textureless window's zero
# gradient energy (intensities are roughly in [0, 1]).
_GRAD_EPS = 1e-8


def box_filter(x: jax.Array, size: int) -> jax.Array:
    """Mean over a size x size window of the last two axes, edge-replicated borders.

    Summed-area table in float32 on values of order one: the error is ~1e-6 relative,
    far below what the cost comparisons here resolve.
    """
    if size < 1 or size % 2 == 0:
        raise ValueError(f"box filter size must be odd and positive, got {size}")
    r = size // 2
    xp = conv.pad_edges(x, r)
    c = jnp.cumsum(jnp.cumsum(xp, axis=-2), axis=-1)
    c = jnp.pad(c, [(0, 0)] * (x.ndim - 2) + [(1, 0), (1, 0)])
    h, w = x.shape[-2:]
    s = (c[..., size:size + h, size:size + w] - c[..., :h, size:size + w]
         - c[..., size:size + h, :w] + c[..., :h, :w])
    return s / (size * size)


def _grey(views) -> np.ndarray:
    """[V, H, W, C] -> [V, H, W] float32 (channel mean), validated."""
    v = np.asarray(views, np.float32)
    if v.ndim != 4 or v.shape[0] != 2:
        raise ValueError(f"views must be [2, H, W, C] (left, right); got {v.shape}")
    if not np.all(np.isfinite(v)):
        raise ValueError("views contain NaN or Inf")
    return v.mean(axis=-1)


def _check_grid(shape: tuple[int, int], bank: KernelBank) -> None:
    if tuple(shape) != bank.grid.image_shape:
        raise ValueError(f"views are {shape[0]}x{shape[1]} but the kernel grid covers "
                         f"{bank.grid.image_shape[0]}x{bank.grid.image_shape[1]}")


def _as_scales(scales) -> np.ndarray:
    s = np.asarray(scales, np.float32).reshape(-1)
    if s.size < 1 or not np.all(np.isfinite(s)):
        raise ValueError(f"scales must be a non-empty finite list, got {scales!r}")
    return s


# ----------------------------------------------------------------------------------------
# DP stereo: kernel-symmetry search


class DpStereoResult(NamedTuple):
    """defocus: [H, W] signed scale per pixel; confidence: [H, W] in [0, 1]
    (1 - min cost / median cost over candidates: 0 where no candidate stands out);
    texture: [H, W] windowed gradient energy of the views."""

    defocus: np.ndarray
    confidence: np.ndarray
    texture: np.ndarray


def grad_energy(x: jax.Array) -> jax.Array:
    """|d/dx|^2 + |d/dy|^2 by forward differences (zero at the far edges)."""
    gx = jnp.diff(x, axis=-1, append=x[..., -1:])
    gy = jnp.diff(x, axis=-2, append=x[..., -1:, :])
    return gx * gx + gy * gy


@functools.partial(jax.jit, static_argnames=("geom", "window", "out_size"))
def _stereo_cost_one(grey, kernels, scale, *, geom, window, out_size):
    """Normalised symmetry mismatch at one candidate scale: [H, W].

    The raw mismatch |L*k_R(s) - R*k_L(s)|^2 shrinks for every pixel as |s| grows
    (both sides get blurrier), which biases a plain argmin towards large blur. For a
    residual disparity d between the two re-blurred views the mismatch is about
    d^2 |grad|^2, so dividing by the windowed gradient energy of the re-blurred views
    makes the cost depend on d (the scale error) rather than on how blurry the pair
    has become.
    """
    k = rescale_kernels(kernels, scale[None], out_size)[0]  # [V, T, K', K']
    pair = conv.convolve(grey, jnp.stack([k[1], k[0]]), geom)  # [L*k_R, R*k_L]
    # A common pre-blur keeps the identity L*k_R = R*k_L but stops sensor noise from
    # inflating the gradient energy near s = 0, where the kernels are near-deltas
    # and nothing else smooths the noise (which would bias the argmin towards s = 0).
    pair = box_filter(box_filter(pair, 3), 3)
    diff = pair[0] - pair[1]
    num = box_filter(diff * diff, window)
    den = box_filter(0.5 * (grad_energy(pair[0]) + grad_energy(pair[1])), window)
    return num / (den + _GRAD_EPS)


def dp_stereo_cost(views, bank: KernelBank, scales, *, window: int = STEREO_WINDOW,
                   conv_method: str = "fft") -> np.ndarray:
    """Cost volume of the kernel-symmetry search.

    Args:
      views: [2, H, W, C] left/right views (channels averaged).
      bank: kernels covering H x W.
      scales: [S] candidate signed scales.
      window: odd side of the averaging window in pixels.

    Returns:
      [S, H, W] float32 normalised mismatch (lower = more consistent).
    """
    grey = _grey(views)
    _check_grid(grey.shape[1:], bank)
    s = _as_scales(scales)
    radius = rescaled_radius(bank.kernel_size, float(np.max(np.abs(s))))
    geom = conv.ConvGeometry.create(bank.grid, radius, conv_method)
    g = jnp.asarray(grey)
    costs = [np.asarray(_stereo_cost_one(g, bank.kernels, jnp.float32(v), geom=geom,
                                         window=window, out_size=2 * radius + 1))
             for v in s]
    return np.stack(costs)


def _parabolic_argmin(cost: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Per-pixel minimiser of cost [S, H, W] sampled at sorted x [S], refined by a
    parabola through the best sample and its neighbours (non-uniform spacing allowed),
    clamped to the neighbours' interval; the ends are kept as sampled."""
    s = cost.shape[0]
    i = np.argmin(cost, axis=0)
    if s < 3:
        return x[i].astype(np.float32)
    j = np.clip(i, 1, s - 2)
    y0, y1, y2 = (np.take_along_axis(cost, (j + o)[None], 0)[0] for o in (-1, 0, 1))
    x0, x1, x2 = x[j - 1], x[j], x[j + 1]
    # Vertex of the parabola through (x0, y0), (x1, y1), (x2, y2).
    d01, d12 = (y1 - y0) / (x1 - x0), (y2 - y1) / (x2 - x1)
    curv = (d12 - d01) / (x2 - x0)  # half the second derivative
    with np.errstate(divide="ignore", invalid="ignore"):
        vertex = 0.5 * (x0 + x1) - d01 / (2 * curv)
    refined = np.where(curv > 0, np.clip(vertex, x0, x2), x[i])
    interior = (i > 0) & (i < s - 1)
    return np.where(interior, refined, x[i]).astype(np.float32)


def dp_stereo_defocus(views, bank: KernelBank, scales, *, window: int = STEREO_WINDOW,
                      conv_method: str = "fft") -> DpStereoResult:
    """Defocus by the calibrated kernel-symmetry search (Punnappurath et al. 2020).

    Args:
      views: [2, H, W, C] left/right views.
      bank: kernels covering H x W.
      scales: [S] candidate signed scales (any order; a fine grid over the expected
        range, e.g. 25 values).
      window: odd side of the mismatch-averaging window.

    Returns:
      DpStereoResult with the per-pixel argmin scale (parabola-refined).
    """
    s = _as_scales(scales)
    order = np.argsort(s)
    cost = dp_stereo_cost(views, bank, s[order], window=window, conv_method=conv_method)
    defocus = _parabolic_argmin(cost, s[order].astype(np.float64))
    cmin = cost.min(axis=0)
    cmed = np.median(cost, axis=0)
    confidence = np.clip(1.0 - cmin / np.maximum(cmed, 1e-12), 0.0, 1.0).astype(np.float32)
    grey = _grey(views)
    texture = np.asarray(box_filter(grad_energy(jnp.asarray(grey.mean(axis=0))), window))
    return DpStereoResult(defocus=defocus, confidence=confidence, texture=texture)


# ----------------------------------------------------------------------------------------
# Wiener deconvolution at a given defocus map


def _centred_spectra(kernels: jax.Array, fft_shape: tuple[int, int]) -> jax.Array:
    """rFFTs of [..., K, K] kernels with their centre moved to index (0, 0).

    A zero-phase placement: filtering a tile by these spectra neither shifts it nor
    needs a valid-part offset, so the deconvolved tile lines up with the observed one.
    """
    r = (kernels.shape[-1] - 1) // 2
    padded = jnp.zeros(kernels.shape[:-2] + tuple(fft_shape), kernels.dtype)
    padded = padded.at[..., :kernels.shape[-2], :kernels.shape[-1]].set(kernels)
    padded = jnp.roll(padded, (-r, -r), axis=(-2, -1))
    return jnp.fft.rfft2(padded, axes=(-2, -1))


@functools.partial(jax.jit, static_argnames=("geom", "out_size", "joint"))
def _wiener_one(planar, kernels, scale, nsr, *, geom, out_size, joint):
    """Wiener estimate [C, H, W] of the sharp image if every pixel sat at `scale`.

    planar: [V, C, H, W]. Each tile is filtered with a margin of geom.radius pixels of
    real neighbouring content (edge-replicated at the image border), so the circular
    wrap-around of the FFT only touches the discarded margin.
    """
    k = rescale_kernels(kernels, scale[None], out_size)[0]  # [V, T, K', K']
    kspec = _centred_spectra(k, geom.fft_shape)  # [V, T, F, F']
    y = conv.tile_spectra(conv.pad_edges(planar, geom.radius), geom)  # [V, C, T, F, F']
    ks = kspec[:, None]  # [V, 1, T, F, F']
    if joint:
        num = jnp.sum(jnp.conj(ks) * y, axis=0)
        den = jnp.sum(jnp.abs(ks) ** 2, axis=0) + nsr
    else:  # deconvolve the mean view with the mean kernel
        km = jnp.mean(ks, axis=0)
        num = jnp.conj(km) * jnp.mean(y, axis=0)
        den = jnp.abs(km) ** 2 + 0.5 * nsr
    x = jnp.fft.irfft2(num / den, s=geom.fft_shape, axes=(-2, -1))  # [C, T, F, F]
    g, r = geom.grid, geom.radius
    return conv.stitch_tiles(x[..., r:r + g.tile_h, r:r + g.tile_w], g)


def _interp_weights(defocus: np.ndarray, s_sorted: np.ndarray) -> np.ndarray:
    """[S, H, W] linear-interpolation weights of each sorted scale for a defocus map
    (clamped to the ends): the two bracketing scales share the weight."""
    d = np.clip(defocus, s_sorted[0], s_sorted[-1])
    w = np.zeros((s_sorted.size,) + d.shape, np.float32)
    if s_sorted.size == 1:
        w[0] = 1.0
        return w
    j = np.clip(np.searchsorted(s_sorted, d, side="right") - 1, 0, s_sorted.size - 2)
    lo, hi = s_sorted[j], s_sorted[j + 1]
    t = np.where(hi > lo, (d - lo) / np.where(hi > lo, hi - lo, 1.0), 0.0)
    np.put_along_axis(w, j[None], (1.0 - t)[None].astype(np.float32), 0)
    np.put_along_axis(w, (j + 1)[None], t[None].astype(np.float32), 0)
    return w


def wiener_deconvolve(views, bank: KernelBank, defocus, scales, *, nsr: float = WIENER_NSR,
                      joint: bool = True, margin_factor: float = 2.0) -> np.ndarray:
    """Per-pixel Wiener deconvolution with the calibrated kernels at a defocus map.

    Args:
      views: [2, H, W, C] left/right views.
      bank: kernels covering H x W.
      defocus: [H, W] signed scale per pixel (e.g. the solver's defocus map).
      scales: [S] scales at which to deconvolve (e.g. the solver's layer scales);
        each pixel uses the two scales bracketing its defocus, linearly weighted.
      nsr: noise-to-signal ratio (see WIENER_NSR).
      joint: deconvolve both views jointly (True) or their mean with the mean kernel.
      margin_factor: tile margin in units of the largest kernel radius.

    Returns:
      [H, W, C] float32 deblurred image, same intensity scale as the views.
    """
    v = np.asarray(views, np.float32)
    _grey(v)  # validation
    _check_grid(v.shape[1:3], bank)
    d = np.asarray(defocus, np.float32)
    if d.shape != v.shape[1:3] or not np.all(np.isfinite(d)):
        raise ValueError(f"defocus must be a finite [H, W] = {v.shape[1:3]} map, got {d.shape}")
    if not nsr > 0:
        raise ValueError(f"nsr must be positive, got {nsr}")
    s = np.sort(_as_scales(scales))
    kr = rescaled_radius(bank.kernel_size, float(np.max(np.abs(s))))
    margin = max(1, int(np.ceil(margin_factor * kr)))
    geom = conv.ConvGeometry.create(bank.grid, margin, "fft")
    planar = jnp.asarray(np.transpose(v, (0, 3, 1, 2)))  # [V, C, H, W]
    weights = _interp_weights(d, s)
    out = np.zeros(v.shape[3:4] + v.shape[1:3], np.float32)  # [C, H, W]
    for i, scale in enumerate(s):
        if not np.any(weights[i]):
            continue
        est = _wiener_one(planar, bank.kernels, jnp.float32(scale), jnp.float32(nsr),
                          geom=geom, out_size=2 * kr + 1, joint=joint)
        out += weights[i][None] * np.asarray(est)
    return np.transpose(out, (1, 2, 0))

