"""Layers DPANet needs that plain JAX lacks: cost volume, modulated deformable conv.

Layout is NHWC throughout (N batch, H, W image, C channels); conv weights are HWIO
([kh, kw, Cin, Cout]). Everything here is pure and un-jitted.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

_DIMENSION_NUMBERS = ("NHWC", "HWIO", "NHWC")


def conv2d(x: jax.Array, w: jax.Array, b: jax.Array | None = None, *, stride: int = 1,
           padding: str | tuple[tuple[int, int], tuple[int, int]] = "SAME") -> jax.Array:
    """Cross-correlation (the deep-learning "conv") with an optional bias.

    Args:
      x: [N, H, W, Cin] input.
      w: [kh, kw, Cin, Cout] weights.
      b: [Cout] bias or None.
      stride: the same stride in y and x.
      padding: "SAME", "VALID" or explicit ((top, bottom), (left, right)). With "SAME"
        an even kernel (the decoder's 2x2 conv) pads one pixel at the bottom/right.

    Returns:
      [N, H', W', Cout].
    """
    y = lax.conv_general_dilated(x, w, (stride, stride), padding,
                                 dimension_numbers=_DIMENSION_NUMBERS)
    return y if b is None else y + b


def leaky_relu(x: jax.Array) -> jax.Array:
    """Leaky ReLU with the paper's slope 0.1."""
    return jax.nn.leaky_relu(x, negative_slope=0.1)


def upsample2(x: jax.Array) -> jax.Array:
    """Bilinear x2 upsampling with half-pixel centres (PyTorch align_corners=False).

    Args:
      x: [N, H, W, C].

    Returns:
      [N, 2H, 2W, C].
    """
    n, h, w, c = x.shape
    return jax.image.resize(x, (n, 2 * h, 2 * w, c), method="bilinear")


def max_pool2(x: jax.Array) -> jax.Array:
    """2x2 max-pool with stride 2.

    Args:
      x: [N, H, W, C] with H and W even.

    Returns:
      [N, H/2, W/2, C].
    """
    n, h, w, c = x.shape
    if h % 2 or w % 2:
        raise ValueError(f"max_pool2 needs even H and W, got {h}x{w}")
    return x.reshape(n, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


def correlation(f1: jax.Array, f2: jax.Array, max_disp: int) -> jax.Array:
    """FlowNet-style cost volume between two feature maps.

    out[n, y, x, (dy + D) * (2D + 1) + (dx + D)] = mean_c f1[n, y, x, c] * f2[n, y + dy, x + dx, c]
    for dy, dx in [-D, D], with f2 zero outside the image (D = max_disp).

    The (2D+1)^2 displacements run as a `lax.map` over one rematerialised body (a
    dynamic slice of the padded f2, a multiply and a channel mean): it compiles once
    instead of (2D+1)^2 times, and under autodiff keeps no per-displacement slices
    (the body is wrapped in jax.checkpoint), so memory stays O(f1) per displacement.

    Args:
      f1, f2: [N, H, W, C] features (left, right).
      max_disp: D, the largest displacement in pixels along y and x.

    Returns:
      [N, H, W, (2D+1)^2], displacement index dy-major (row-major over (dy, dx)).
    """
    if f1.shape != f2.shape:
        raise ValueError(f"correlation needs equal shapes, got {f1.shape} and {f2.shape}")
    d = int(max_disp)
    side = 2 * d + 1
    n, h, w, c = f1.shape
    f2p = jnp.pad(f2, ((0, 0), (d, d), (d, d), (0, 0)))  # [N, H+2D, W+2D, C]

    @jax.checkpoint
    def one_displacement(k):
        # Displacement (dy, dx) = (k // side - D, k % side - D) starts at (dy + D, dx + D).
        shifted = lax.dynamic_slice(f2p, (0, k // side, k % side, 0), (n, h, w, c))
        return jnp.mean(f1 * shifted, axis=-1)  # [N, H, W]

    planes = lax.map(one_displacement, jnp.arange(side * side))  # [(2D+1)^2, N, H, W]
    return jnp.moveaxis(planes, 0, -1)


def _gather_pixels(x: jax.Array, index: jax.Array) -> jax.Array:
    """x: [N, H*W, C], index: [N, ...] flat pixel indices -> [N, ..., C]."""
    return jax.vmap(lambda img, i: img[i])(x, index)


def modulated_deform_conv(x: jax.Array, offsets: jax.Array, mask: jax.Array,
                          weight: jax.Array, bias: jax.Array | None = None) -> jax.Array:
    """3x3 modulated deformable convolution (DCNv2; Zhu et al. 2019), stride 1, pad 1.

    out[n, y, x] = sum_k mask[n, y, x, k] * X(y + ky - 1 + dy_k, x + kx - 1 + dx_k) @ W[ky, kx]
    with taps k = 3 ky + kx (row-major), (dy_k, dx_k) = offsets[n, y, x, 2k : 2k+2], and X
    the bilinear interpolation of x, zero outside the image (each of the four corners
    contributes only where it lies inside). Gradients flow to x, offsets, mask and
    weights; the corner choice (floor) is piecewise constant.

    Implemented as a gather of the nine bilinearly sampled taps, [N, H, W, 9, Cin],
    followed by one einsum with the [9, Cin, Cout] weights.

    Args:
      x: [N, H, W, Cin] input features.
      offsets: [N, H, W, 18] per-tap (dy, dx) in pixels.
      mask: [N, H, W, 9] per-tap modulation, normally in [0, 1].
      weight: [3, 3, Cin, Cout].
      bias: [Cout] or None.

    Returns:
      [N, H, W, Cout].
    """
    n, h, w, cin = x.shape
    if weight.shape[:3] != (3, 3, cin):
        raise ValueError(f"weight must be [3, 3, {cin}, Cout], got {weight.shape}")
    if offsets.shape != (n, h, w, 18) or mask.shape != (n, h, w, 9):
        raise ValueError(f"offsets/mask must be [{n}, {h}, {w}, 18]/[..., 9], "
                         f"got {offsets.shape} and {mask.shape}")
    tap_y, tap_x = jnp.meshgrid(jnp.arange(3) - 1, jnp.arange(3) - 1, indexing="ij")
    base_y = jnp.arange(h)[:, None, None] + tap_y.reshape(9)  # [H, 1, 9]
    base_x = jnp.arange(w)[None, :, None] + tap_x.reshape(9)  # [1, W, 9]
    py = base_y + offsets[..., 0::2]  # [N, H, W, 9]
    px = base_x + offsets[..., 1::2]
    y0 = jnp.floor(py)
    x0 = jnp.floor(px)
    ty = py - y0
    tx = px - x0
    flat = x.reshape(n, h * w, cin)
    sampled = jnp.zeros((n, h, w, 9, cin), x.dtype)
    for cy, wy in ((y0, 1.0 - ty), (y0 + 1.0, ty)):
        for cx, wx in ((x0, 1.0 - tx), (x0 + 1.0, tx)):
            inside = (cy >= 0) & (cy <= h - 1) & (cx >= 0) & (cx <= w - 1)
            index = (jnp.clip(cy, 0, h - 1).astype(jnp.int32) * w
                     + jnp.clip(cx, 0, w - 1).astype(jnp.int32))  # [N, H, W, 9]
            corner_weight = jnp.where(inside, wy * wx * mask, 0.0)  # [N, H, W, 9]
            sampled = sampled + corner_weight[..., None] * _gather_pixels(flat, index)
    out = jnp.einsum("nhwkc,kco->nhwo", sampled, weight.reshape(9, cin, -1))
    return out if bias is None else out + bias
