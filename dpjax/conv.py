"""Spatially varying convolution: every tile of the image has its own kernel.

The padded input (image plus the kernel half-width r on each side) is cut into
overlapping tiles of (tile + 2r) pixels. Convolving a tile with its kernel in
"valid" mode gives exactly that tile of the output, so stitching the valid parts
reproduces the spatially varying blur of METHOD.md.

Two interchangeable paths:
- "fft": each tile is Fourier transformed once (real FFT, size rounded up to a
  product of small primes) and multiplied by the spectra of all kernels that apply
  to it; the circular wrap-around only touches the discarded border (the FFT size
  is at least tile + 2r).
- "direct": lax.conv per tile, the reference for tests and benchmarks.

All arrays here are planar: spatial axes last, so FFTs run over contiguous memory.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp

from dpjax.kernels import TileGrid

ConvMethod = Literal["fft", "direct"]


def good_fft_size(n: int) -> int:
    """Smallest m >= n whose prime factors are 2, 3 and 5 (fast FFT sizes)."""
    m = n
    while True:
        k = m
        for p in (2, 3, 5):
            while k % p == 0:
                k //= p
        if k == 1:
            return m
        m += 1


@dataclasses.dataclass(frozen=True, kw_only=True)
class ConvGeometry:
    """Static description of one tiled convolution.

    Attributes:
      grid: the tile grid.
      radius: kernel half-width r (kernels are (2r+1) x (2r+1)).
      fft_shape: FFT size per tile (>= tile + 2r along each axis).
      method: "fft" or "direct".
    """

    grid: TileGrid
    radius: int
    fft_shape: tuple[int, int]
    method: ConvMethod = "fft"

    @classmethod
    def create(cls, grid: TileGrid, radius: int, method: ConvMethod = "fft",
               round_fft: bool = True) -> ConvGeometry:
        if method not in ("fft", "direct"):
            raise ValueError(f"unknown convolution method {method!r}; use 'fft' or 'direct'")
        n_h, n_w = grid.tile_h + 2 * radius, grid.tile_w + 2 * radius
        if round_fft:
            n_h, n_w = good_fft_size(n_h), good_fft_size(n_w)
        return cls(grid=grid, radius=radius, fft_shape=(n_h, n_w), method=method)

    @classmethod
    def shared(cls, grid: TileGrid, radius: int, method: ConvMethod = "fft",
               round_fft: bool = True) -> ConvGeometry:
        """The geometry every kernel of half-width <= `radius` with the same FFT size
        can share: `create`'s, with the radius widened to the largest the FFT holds.

        Kernels zero-padded to the wider window blur exactly as before (the transforms
        are the same size; only the discarded border sees more of the image), while
        scenes whose radii differ but round to one FFT size get equal shapes and so
        reuse one compiled solver. The direct method, whose cost grows with the
        window, and an unrounded FFT keep the radius as given.
        """
        geom = cls.create(grid, radius, method, round_fft)
        if method != "fft" or not round_fft:
            return geom
        fh, fw = geom.fft_shape
        wide = min((fh - grid.tile_h) // 2, (fw - grid.tile_w) // 2)
        return dataclasses.replace(geom, radius=wide)

    @property
    def padded_tile(self) -> tuple[int, int]:
        return (self.grid.tile_h + 2 * self.radius, self.grid.tile_w + 2 * self.radius)


def pad_edges(x: jax.Array, radius: int) -> jax.Array:
    """Edge-replication padding of the last two axes by `radius`."""
    pad = [(0, 0)] * (x.ndim - 2) + [(radius, radius), (radius, radius)]
    return jnp.pad(x, pad, mode="edge")


def extract_tiles(x_padded: jax.Array, geom: ConvGeometry) -> jax.Array:
    """Overlapping tiles of a padded image.

    Args:
      x_padded: [..., H + 2r, W + 2r].
      geom: geometry.

    Returns:
      [..., T, tile_h + 2r, tile_w + 2r], tiles in row-major order.
    """
    g = geom.grid
    n_h, n_w = geom.padded_tile
    # Static slices rather than a gather: their gradient is a sum of pads, whereas a
    # gather's is a scatter-add, which is slow on CPU.
    strips = jnp.stack([x_padded[..., i * g.tile_h:i * g.tile_h + n_h, :]
                        for i in range(g.rows)], axis=-3)  # [..., R, n_h, Wp]
    tiles = jnp.stack([strips[..., j * g.tile_w:j * g.tile_w + n_w]
                       for j in range(g.cols)], axis=-3)  # [..., R, C, n_h, n_w]
    return tiles.reshape(x_padded.shape[:-2] + (g.num_tiles, n_h, n_w))


def stitch_tiles(tiles: jax.Array, grid: TileGrid) -> jax.Array:
    """Inverse of a non-overlapping tiling: [..., T, th, tw] -> [..., H, W]."""
    lead = tiles.shape[:-3]
    x = tiles.reshape(lead + (grid.rows, grid.cols, grid.tile_h, grid.tile_w))
    x = jnp.moveaxis(x, -3, -2)  # [..., rows, th, cols, tw]
    return x.reshape(lead + grid.image_shape)


def kernel_spectra(kernels: jax.Array, geom: ConvGeometry) -> jax.Array:
    """Real FFTs of kernels zero-padded to the tile FFT size.

    Args:
      kernels: [..., T, K, K] with K = 2r + 1.

    Returns:
      [..., T, Fh, Fw // 2 + 1] complex spectra.
    """
    return jnp.fft.rfft2(kernels, s=geom.fft_shape, axes=(-2, -1))


def tile_spectra(x_padded: jax.Array, geom: ConvGeometry) -> jax.Array:
    """Real FFTs of the overlapping tiles: [..., Hp, Wp] -> [..., T, Fh, Fw//2+1]."""
    return jnp.fft.rfft2(extract_tiles(x_padded, geom), s=geom.fft_shape, axes=(-2, -1))


def apply_spectra(x_spec: jax.Array, k_spec: jax.Array, geom: ConvGeometry) -> jax.Array:
    """Multiplies tile spectra by kernel spectra and returns the stitched valid output.

    Args:
      x_spec: [..., T, Fh, Fw'] tile spectra.
      k_spec: kernel spectra broadcastable against x_spec.

    Returns:
      [..., H, W] blurred image.
    """
    r, g = geom.radius, geom.grid
    fh, fw = geom.fft_shape
    # irfft2 split into its two 1-D passes with the valid rows cropped in between:
    # the second pass then transforms tile_h rows instead of Fh, and neither the full
    # Fh x Fw real tiles nor their gradients are ever materialised.
    z = jnp.fft.ifft(x_spec * k_spec, n=fh, axis=-2)[..., 2 * r:2 * r + g.tile_h, :]
    y = jnp.fft.irfft(z, n=fw, axis=-1)[..., 2 * r:2 * r + g.tile_w]  # valid part
    return stitch_tiles(y, g)


def convolve_tiles_direct(x_padded: jax.Array, kernels: jax.Array,
                          geom: ConvGeometry) -> jax.Array:
    """Direct spatially varying convolution (lax.conv per tile, "valid" mode).

    Args:
      x_padded: [B, H + 2r, W + 2r] signals.
      kernels: [B, T, K, K] one kernel set per signal.

    Returns:
      [B, H, W].
    """
    tiles = extract_tiles(x_padded, geom)  # [B, T, n_h, n_w]

    def one(sig_tiles, sig_kernels):
        # Tiles act as feature groups; flipping turns lax's correlation into convolution.
        rhs = sig_kernels[:, None, ::-1, ::-1]  # [T, 1, K, K]
        out = jax.lax.conv_general_dilated(
            sig_tiles[None], rhs, window_strides=(1, 1), padding="VALID",
            feature_group_count=sig_tiles.shape[0],
            precision=jax.lax.Precision.HIGHEST)
        return out[0]  # [T, th, tw]

    return stitch_tiles(jax.vmap(one)(tiles, kernels), geom.grid)


def convolve(x: jax.Array, kernels: jax.Array, geom: ConvGeometry) -> jax.Array:
    """Spatially varying convolution of unpadded signals, edge-padded, same size out.

    Args:
      x: [B, H, W] signals.
      kernels: [B, T, K, K] the per-tile kernels of each signal.

    Returns:
      [B, H, W].
    """
    xp = pad_edges(x, geom.radius)
    if geom.method == "direct":
        return convolve_tiles_direct(xp, kernels, geom)
    return apply_spectra(tile_spectra(xp, geom), kernel_spectra(kernels, geom), geom)
