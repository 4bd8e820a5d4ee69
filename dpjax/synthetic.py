"""Synthetic dual-pixel scenes with known ground truth, rendered by dpjax's own model.

Used by the demo, the tests and DPANet's training data. A scene is a stack of
fronto-parallel textured layers (back to front) with soft-edged occluding shapes,
each at its own signed defocus scale, rendered through a kernel bank with the
occlusion-aware MPI model of `dpjax.mpi`, plus a shot/read noise model.
"""

from __future__ import annotations

import itertools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from dpjax import conv, mpi
from dpjax.kernels import KernelBank, rescaled_radius


class SyntheticScene(NamedTuple):
    """A synthetic scene and its rendering (numpy).

    Attributes:
      colors: [L, H, W, C] layer textures in [0, 1].
      alphas: [L, H, W] layer alphas (layer 0 opaque).
      scales: [L] signed defocus scale of each layer.
      views: [2, H, W, C] rendered left and right views (noisy).
      all_in_focus: [H, W, C] ground-truth sharp image.
      defocus: [H, W] ground-truth signed defocus (transmittance-weighted scale).
    """

    colors: np.ndarray
    alphas: np.ndarray
    scales: np.ndarray
    views: np.ndarray
    all_in_focus: np.ndarray
    defocus: np.ndarray


def natural_texture(rng: np.random.Generator, height: int, width: int, channels: int = 1,
                    *, slope: float = 1.0, contrast: float = 0.35) -> np.ndarray:
    """A texture with a natural-image-like 1/f^slope amplitude spectrum plus edges.

    Returns:
      [H, W, C] float32 in [0, 1].
    """
    fy = np.fft.fftfreq(height)[:, None]
    fx = np.fft.rfftfreq(width)[None, :]
    f = np.sqrt(fx * fx + fy * fy)
    f[0, 0] = 1.0
    amp = f ** (-slope)
    amp[0, 0] = 0.0
    out = np.empty((height, width, channels), np.float32)
    base = None
    for c in range(channels):
        phase = rng.uniform(0, 2 * np.pi, size=amp.shape)
        tex = np.fft.irfft2(amp * np.exp(1j * phase), s=(height, width))
        tex = (tex - tex.mean()) / (tex.std() + 1e-12)
        # Colour channels share structure (natural images are strongly correlated).
        base = tex if base is None else 0.7 * base + 0.3 * tex
        out[..., c] = base
    # A few hard-edged stripes and blocks give the solver strong DP disparity cues.
    yy, xx = np.mgrid[0:height, 0:width]
    for _ in range(rng.integers(2, 5)):
        theta = rng.uniform(0, np.pi)
        period = rng.uniform(6, 30)
        stripe = np.sign(np.sin((xx * np.cos(theta) + yy * np.sin(theta)) * 2 * np.pi / period))
        region = np.zeros((height, width), bool)
        cy, cx = rng.uniform(0, height), rng.uniform(0, width)
        ry, rx = rng.uniform(0.1, 0.3) * height, rng.uniform(0.1, 0.3) * width
        region[(np.abs(yy - cy) < ry) & (np.abs(xx - cx) < rx)] = True
        out[region] = out[region] * 0.4 + 1.2 * stripe[region][:, None]
    out = 0.5 + contrast * out / (np.abs(out).max() + 1e-12)
    mean_level = rng.uniform(0.3, 0.7)
    out = out - out.mean() + mean_level
    return np.clip(out, 0.02, 0.98).astype(np.float32)


def random_shape_mask(rng: np.random.Generator, height: int, width: int, *,
                      coverage: tuple[float, float] = (0.15, 0.45),
                      softness: float = 0.7) -> np.ndarray:
    """A soft-edged occluder: a union of random ellipses and rectangles.

    Returns:
      [H, W] float32 alpha in [0, 1].
    """
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    dist = np.full((height, width), np.inf, np.float32)
    target = rng.uniform(*coverage)
    for _ in range(12):
        cy, cx = rng.uniform(0.1, 0.9) * height, rng.uniform(0.1, 0.9) * width
        ry = rng.uniform(0.08, 0.3) * height
        rx = rng.uniform(0.08, 0.3) * width
        if rng.random() < 0.5:  # ellipse: signed distance approximation in pixels
            d = (np.sqrt(((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2) - 1.0) * min(ry, rx)
        else:  # rectangle
            d = np.maximum(np.abs(yy - cy) - ry, np.abs(xx - cx) - rx)
        dist = np.minimum(dist, d)
        if np.mean(dist < 0) >= target:
            break
    # Logistic edge profile; clipping avoids overflow far from the shape.
    return (1.0 / (1.0 + np.exp(np.clip(dist / softness, -50, 50)))).astype(np.float32)


def random_layers(rng: np.random.Generator, *, height: int, width: int, num_layers: int = 4,
                  channels: int = 1, scale_range: tuple[float, float] = (0.1, 1.5),
                  slope: float = 1.5):
    """Random textured layers, occluders and distinct scales (back layer largest).

    Returns:
      (colors [L, H, W, C], alphas [L, H, W], scales [L] decreasing).
    """
    lo, hi = scale_range
    # Evenly spread scales with jitter so layers are distinguishable.
    edges = np.linspace(hi, lo, num_layers + 1)
    scales = np.array([rng.uniform(min(a, b), max(a, b)) for a, b in itertools.pairwise(edges)],
                      np.float32)
    colors = np.stack([natural_texture(rng, height, width, channels, slope=slope)
                       for _ in range(num_layers)])
    alphas = np.stack([np.ones((height, width), np.float32)] + [
        random_shape_mask(rng, height, width) for _ in range(num_layers - 1)])
    return colors, alphas, scales


def render_layers(colors: np.ndarray, alphas: np.ndarray, scales: np.ndarray,
                  bank: KernelBank, *, conv_method: str = "fft") -> np.ndarray:
    """Renders both DP views of an MPI given by layers (noise-free).

    Args:
      colors: [L, H, W, C], alphas: [L, H, W], scales: [L].
      bank: kernels whose grid covers H x W.

    Returns:
      [2, H, W, C] float32.
    """
    radius = rescaled_radius(bank.kernel_size, float(np.max(np.abs(scales))))
    geom = conv.ConvGeometry.create(bank.grid, radius, conv_method)
    views = _render_jit(bank.kernels, jnp.asarray(np.transpose(colors, (0, 3, 1, 2))),
                        jnp.asarray(alphas), jnp.asarray(scales, jnp.float32), geom)
    return np.transpose(np.asarray(views), (0, 2, 3, 1))


def _render_impl(kernels, colors, alphas, scales, geom):
    lk = mpi.prepare_layer_kernels(KernelBank(kernels=kernels, grid=geom.grid), scales, geom)
    return mpi.render_views(colors, alphas, lk)


_render_jit = jax.jit(_render_impl, static_argnames=("geom",))


def add_noise(rng: np.random.Generator, views: np.ndarray, *, shot: float = 1e-4,
              read: float = 2e-3) -> np.ndarray:
    """Heteroscedastic sensor noise: variance = shot * signal + read^2."""
    std = np.sqrt(np.maximum(views, 0) * shot + read**2)
    return np.clip(views + std * rng.standard_normal(views.shape), 0.0, None).astype(np.float32)


def composite_ground_truth(colors: np.ndarray, alphas: np.ndarray, scales: np.ndarray):
    """Sharp all-in-focus image [H, W, C] and defocus map [H, W] of a layered scene."""
    trans = np.asarray(mpi.transmittance(jnp.asarray(alphas)))
    aif = np.einsum("lhw,lhwc->hwc", trans, colors)
    dmap = np.einsum("lhw,l->hw", trans, scales)
    return aif.astype(np.float32), dmap.astype(np.float32)


def make_scene(rng: np.random.Generator, bank: KernelBank, *, num_layers: int = 4,
               channels: int = 1, scale_range: tuple[float, float] = (0.1, 1.5),
               shot: float = 1e-4, read: float = 2e-3, slope: float = 1.5) -> SyntheticScene:
    """A random layered scene covering the bank's grid, rendered with noise."""
    h, w = bank.grid.image_shape
    colors, alphas, scales = random_layers(rng, height=h, width=w, num_layers=num_layers,
                                           channels=channels, scale_range=scale_range,
                                           slope=slope)
    views = add_noise(rng, render_layers(colors, alphas, scales, bank), shot=shot, read=read)
    aif, dmap = composite_ground_truth(colors, alphas, scales)
    return SyntheticScene(colors=colors, alphas=alphas, scales=scales, views=views,
                          all_in_focus=aif, defocus=dmap)
