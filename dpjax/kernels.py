"""Dual-pixel blur kernels: the kernel bank, defocus rescaling and a parametric model.

Axis glossary (shared by the whole package): V views (0 left, 1 right), L layers
back to front, T kernel tiles in row-major order of a (rows, cols) grid, K odd
kernel side, H, W image height and width, C channels.

A calibrated kernel describes the blur of one view at one reference defocus. The
blur at another signed defocus scale s is the same kernel spatially scaled by |s|
and rotated by 180 degrees when s < 0 (METHOD.md, "Kernels at other defocus
levels"). We resample by exact area integration of the kernel taken as a
piecewise-constant function: output pixel p receives the integral of k(x / |s|)
over its unit box. Shrinking is therefore anti-aliased (it is box filtering), the
result is renormalised to the kernel's original sum, and s = 1 is the identity.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

# Scales are clamped away from zero so that a layer exactly at the focal plane
# still gets a (delta) kernel with a non-zero sum to renormalise by.
_MIN_ABS_SCALE = 1e-3


@dataclasses.dataclass(frozen=True, kw_only=True)
class TileGrid:
    """Geometry of the spatially varying kernels: a rows x cols grid of tiles.

    The image covered is exactly (rows * tile_h) x (cols * tile_w) pixels.
    """

    rows: int
    cols: int
    tile_h: int
    tile_w: int

    @property
    def num_tiles(self) -> int:
        return self.rows * self.cols

    @property
    def image_shape(self) -> tuple[int, int]:
        return (self.rows * self.tile_h, self.cols * self.tile_w)

    def downsampled(self, factor: int) -> TileGrid:
        if self.tile_h % factor or self.tile_w % factor:
            raise ValueError(
                    f"tile size {self.tile_h}x{self.tile_w} is not divisible by the pyramid "
                    f"factor {factor}; use fewer pyramid levels")
        return TileGrid(rows=self.rows, cols=self.cols, tile_h=self.tile_h // factor,
                                        tile_w=self.tile_w // factor)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KernelBank:
    """Per-view, per-tile kernels at the reference defocus (s = 1).

    Attributes:
        kernels: [V, T, K, K] float, each kernel summing to 1.
        grid: the tile grid (static metadata, not traced).
    """

    kernels: jax.Array
    grid: TileGrid = dataclasses.field(metadata={"static": True})

    @property
    def kernel_size(self) -> int:
        return int(self.kernels.shape[-1])

    @classmethod
    def create(cls, kernels, *, rows: int, cols: int, tile_h: int, tile_w: int | None = None):
        """Validates and wraps `kernels` [V, T, K, K] for a rows x cols tile grid."""
        kernels = np.asarray(kernels, dtype=np.float32)
        tile_w = tile_h if tile_w is None else tile_w
        if kernels.ndim != 4 or kernels.shape[0] != 2:
            raise ValueError(f"kernels must be [2, T, K, K] (left, right); got {kernels.shape}")
        if kernels.shape[1] != rows * cols:
            raise ValueError(
                    f"{kernels.shape[1]} kernels per view do not fill a {rows}x{cols} tile grid")
        if kernels.shape[2] != kernels.shape[3] or kernels.shape[2] % 2 == 0:
            raise ValueError(f"kernels must be square with an odd side; got {kernels.shape[2:]}")
        if not np.all(np.isfinite(kernels)):
            raise ValueError("kernels contain NaN or Inf")
        sums = kernels.sum(axis=(2, 3))
        if np.any(sums <= 0):
            raise ValueError("every kernel must have a positive sum")
        kernels = kernels / sums[..., None, None]
        grid = TileGrid(rows=rows, cols=cols, tile_h=tile_h, tile_w=tile_w)
        return cls(kernels=jnp.asarray(kernels), grid=grid)


def rescaled_radius(kernel_size: int, max_abs_scale: float) -> int:
    """Half-width of a kernel of side `kernel_size` scaled by up to `max_abs_scale`.

    The input support [-(r + 1/2), r + 1/2] maps to |s| times that; an output pixel
    is needed when its unit box intersects the scaled support.
    """
    r = (kernel_size - 1) // 2
    return max(0, math.ceil(max_abs_scale * (r + 0.5) - 0.5 - 1e-9))


def support_radius(kernels, mass_cut: float) -> int:
    """Half-width of the smallest centred square window holding all but `mass_cut` of
    every kernel's mass (host-side, on concrete arrays).

    Args:
      kernels: [..., K, K] non-negative kernels, K odd.
      mass_cut: the largest fraction of any kernel's sum allowed outside; 0 keeps the
        whole K x K window.

    Returns:
      r in [0, (K - 1) // 2].
    """
    side = kernels.shape[-1]
    r_full = (side - 1) // 2
    if mass_cut <= 0:
        return r_full
    k = np.asarray(kernels, np.float64).reshape((-1, side, side))
    total = k.sum(axis=(-2, -1))
    for r in range(r_full):
        inside = k[:, r_full - r:r_full + r + 1, r_full - r:r_full + r + 1].sum(axis=(-2, -1))
        if np.all(inside >= (1.0 - mass_cut) * total):
            return r
    return r_full


def layer_kernel_radius(kernel_size: int, max_abs_scale: float, support: int | None = None
                        ) -> int:
    """Half-width of the layer kernels of a solve (`SolverConfig.kernel_mass_cut`).

    The whole rescaled window (`rescaled_radius`), or, with `support` (the reference
    kernels' `support_radius`), the rescaled support window when it is smaller; the
    layer kernels are then cropped to it (`rescale_kernel`). The window is set by the
    widest layer, which loses at most the support's mass cut; narrower layers lose
    less, usually nothing.
    """
    r = rescaled_radius(kernel_size, max_abs_scale)
    if support is not None:
        r = min(r, rescaled_radius(2 * support + 1, max_abs_scale))
    return r


def _area_resample_matrix(scale: jax.Array, in_size: int, out_size: int) -> jax.Array:
    """[out_size, in_size] weights: overlap of output boxes with scaled input boxes.

    Input pixel q (centred index) covers [|s|(q - 1/2), |s|(q + 1/2)] after scaling;
    output pixel p covers [p - 1/2, p + 1/2]. The weight is the overlap length.
    """
    s = jnp.maximum(jnp.abs(scale), _MIN_ABS_SCALE)
    q = jnp.arange(in_size, dtype=jnp.float32) - (in_size - 1) / 2
    p = jnp.arange(out_size, dtype=jnp.float32) - (out_size - 1) / 2
    lo = jnp.maximum(p[:, None] - 0.5, s * (q[None, :] - 0.5))
    hi = jnp.minimum(p[:, None] + 0.5, s * (q[None, :] + 0.5))
    return jnp.maximum(hi - lo, 0.0)


def rescale_kernel(kernel: jax.Array, scale: jax.Array, out_size: int) -> jax.Array:
    """Kernel at signed defocus `scale`, resampled to an out_size x out_size grid.

    Args:
        kernel: [K, K] reference kernel (s = 1).
        scale: scalar signed defocus scale.
        out_size: odd output side. When it is smaller than the scaled support (see
            rescaled_radius) the kernel is cropped to its centred window, then
            renormalised.

    Returns:
        [out_size, out_size] kernel with the same sum as `kernel`.
    """
    w = _area_resample_matrix(scale, kernel.shape[-1], out_size)  # [K', K]
    scaled = w @ kernel @ w.T
    scaled = jnp.where(scale < 0, scaled[::-1, ::-1], scaled)
    # Renormalise: area resampling multiplies the sum by s^2.
    return scaled * (jnp.sum(kernel) / jnp.sum(scaled))


def rescale_kernels(kernels: jax.Array, scales: jax.Array, out_size: int) -> jax.Array:
    """Rescales a stack of kernels to every scale.

    Args:
        kernels: [..., K, K] reference kernels.
        scales: [S] signed defocus scales.
        out_size: odd output side.

    Returns:
        [S, ..., out_size, out_size].
    """
    lead = kernels.shape[:-2]
    flat = kernels.reshape((-1,) + kernels.shape[-2:])
    per_scale = jax.vmap(
            lambda s: jax.vmap(lambda k: rescale_kernel(k, s, out_size))(flat))(scales)
    return per_scale.reshape((scales.shape[0],) + lead + (out_size, out_size))


def downsampled_kernel_size(kernel_size: int, factor: int) -> int:
    """Side of `kernel_size` kernels in `downsample_bank`'s bank for this factor."""
    return 2 * rescaled_radius(kernel_size, 1.0 / factor) + 1


def downsample_bank(bank: KernelBank, factor: int) -> KernelBank:
    """The kernel bank of an image area-downsampled by `factor` (pyramid level).

    Downsampling the image by f shrinks every blur by f: the kernels are rescaled by
    1/f (anti-aliased) and the tiles shrink by f.
    """
    if factor == 1:
        return bank
    out_size = downsampled_kernel_size(bank.kernel_size, factor)
    small = rescale_kernels(bank.kernels, jnp.asarray([1.0 / factor], jnp.float32), out_size)[0]
    return KernelBank(kernels=small, grid=bank.grid.downsampled(factor))


def recenter_kernel_pairs(kernels: np.ndarray) -> np.ndarray:
    """Shifts each tile's kernel pair so that their mean kernel is centred.

    The Pixel 4 calibration kernels are not centred (data README): an MPI fitted with
    them is displaced from the input by a depth-dependent amount. Shifting both views'
    kernels of a tile by the centroid of (k_L + k_R) / 2 keeps the sharp image
    registered with the input while preserving the left/right disparity.

    Args:
        kernels: [2, T, K, K] numpy kernels.

    Returns:
        [2, T, K, K] kernels, each with its original sum, shifted by a sub-pixel
        translation (Fourier shift, negative lobes clipped and renormalised).
    """
    kernels = np.asarray(kernels, dtype=np.float64)
    k = kernels.shape[-1]
    coords = np.arange(k) - (k - 1) / 2
    mean = kernels.mean(axis=0)  # [T, K, K]
    mass = mean.sum(axis=(1, 2))
    cy = (mean.sum(axis=2) * coords).sum(axis=1) / mass
    cx = (mean.sum(axis=1) * coords).sum(axis=1) / mass
    fy = np.fft.fftfreq(k)[:, None]
    fx = np.fft.fftfreq(k)[None, :]
    out = np.empty_like(kernels)
    for t in range(kernels.shape[1]):
        phase = np.exp(2j * np.pi * (fy * cy[t] + fx * cx[t]))
        for v in range(2):
            shifted = np.real(np.fft.ifft2(np.fft.fft2(kernels[v, t]) * phase))
            shifted = np.maximum(shifted, 0.0)
            out[v, t] = shifted * kernels[v, t].sum() / shifted.sum()
    return out.astype(np.float32)


def parametric_dp_kernels(*, radius: float, size: int | None = None, ramp: float = 0.5,
                                                    smooth_sigma: float = 0.0, supersample: int = 8) -> np.ndarray:
    """A parametric dual-pixel kernel pair: half-aperture discs with an intensity ramp.

    Each view sees one half of the aperture: the left view the half disc x <= 0 and
    the right view its mirror image. Real DP kernels are brighter towards the outer
    edge of the half aperture; `ramp` sets that linear falloff (intensity
    1 + ramp * |x| / radius). Anti-aliased by supersampling, optionally smoothed by a
    Gaussian of `smooth_sigma` px, normalised to sum 1.

    Args:
        radius: aperture radius in pixels at the reference defocus.
        size: odd kernel side (default: just large enough).
        ramp: strength of the linear intensity ramp (>= 0).
        smooth_sigma: Gaussian smoothing in pixels (0: none).
        supersample: sub-samples per pixel and axis for anti-aliasing.

    Returns:
        [2, size, size] float32 numpy array (left, right).
    """
    if radius <= 0:
        raise ValueError("radius must be positive")
    if ramp < 0:
        raise ValueError("ramp must be non-negative")
    if size is None:
        size = 2 * math.ceil(radius + 3 * smooth_sigma) + 3
    if size % 2 == 0:
        raise ValueError("kernel size must be odd")
    half = (size - 1) / 2
    n = size * supersample
    sub = (np.arange(n) + 0.5) / supersample - 0.5 - half
    y, x = np.meshgrid(sub, sub, indexing="ij")
    inside = (x * x + y * y <= radius * radius) & (x <= 0)
    hi = np.where(inside, 1.0 + ramp * np.abs(x) / radius, 0.0)
    left = hi.reshape(size, supersample, size, supersample).mean(axis=(1, 3))
    if smooth_sigma > 0:
        left = _gaussian_blur(left, smooth_sigma)
    left /= left.sum()
    right = left[:, ::-1]
    return np.stack([left, right]).astype(np.float32)


def _gaussian_blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur with zero padding (same size)."""
    r = math.ceil(3 * sigma)
    t = np.arange(-r, r + 1)
    g = np.exp(-0.5 * (t / sigma) ** 2)
    g /= g.sum()
    out = np.apply_along_axis(lambda row: np.convolve(row, g, mode="same"), 1, image)
    return np.apply_along_axis(lambda col: np.convolve(col, g, mode="same"), 0, out)


def parametric_bank(*, rows: int, cols: int, tile_h: int, tile_w: int | None = None,
                                        radius: float, ramp: float = 0.5, smooth_sigma: float = 0.5,
                                        size: int | None = None) -> KernelBank:
    """A kernel bank with the same parametric DP pair in every tile."""
    pair = parametric_dp_kernels(radius=radius, ramp=ramp, smooth_sigma=smooth_sigma, size=size)
    kernels = np.repeat(pair[:, None], rows * cols, axis=1)
    return KernelBank.create(kernels, rows=rows, cols=cols, tile_h=tile_h, tile_w=tile_w)
