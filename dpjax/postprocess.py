"""Post-processing of the all-in-focus estimate (METHOD.md, "Optimisation and outputs").

The paper smooths the MPI's all-in-focus image with a bilateral filter (sigma_s = 3
px, sigma_v = 0.05 on intensities scaled to mean 0.5): the per-pixel MPI colours
carry optimisation noise that the filter removes without blurring edges.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from dpjax import mpi


@dataclasses.dataclass(frozen=True, kw_only=True)
class PostConfig:
    """How the outputs are read off the solved MPI.

    Attributes:
      bilateral, sigma_spatial, sigma_value: bilateral filtering of the all-in-focus
        image (on by default, as in the paper).
      defocus: the defocus map's estimator (`dpjax.mpi.DEFOCUS_ESTIMATORS`): "mean",
        the paper's sum_l T_l s_l, or "sharpened", the same with the transmittances
        raised to the 8th power (`dpjax.mpi.defocus_sharpened`), which keeps weakly
        textured regions at their peak layer instead of the middle of the range.
    """

    bilateral: bool = True
    sigma_spatial: float = 3.0
    sigma_value: float = 0.05
    defocus: str = "mean"

    def __post_init__(self):
        mpi.defocus_estimator_fn(self.defocus)  # an unknown name fails here, not after a solve


@functools.partial(jax.jit, static_argnames=("sigma_spatial", "sigma_value"))
def bilateral_filter(image: jax.Array, *, sigma_spatial: float, sigma_value: float) -> jax.Array:
    """Edge-preserving smoothing, window radius 3 sigma_s + 1, edge-replicated borders.

    Intensities are scaled to mean 0.5 before comparing values (so sigma_value is
    relative to the image's brightness) and scaled back afterwards.

    Args:
      image: [H, W, C] linear image; the range weight uses the channel mean.

    Returns:
      [H, W, C] filtered image.
    """
    scale = 0.5 / jnp.maximum(jnp.mean(image), 1e-12)
    x = image * scale
    guide = jnp.mean(x, axis=-1)
    r = int(3 * sigma_spatial + 1)
    h, w = guide.shape
    xp = jnp.pad(x, ((r, r), (r, r), (0, 0)), mode="edge")
    gp = jnp.pad(guide, r, mode="edge")
    offsets = jnp.asarray([(dy, dx) for dy in range(-r, r + 1) for dx in range(-r, r + 1)])

    def accumulate(carry, off):
        num, den = carry
        dy, dx = off[0], off[1]
        shifted = jax.lax.dynamic_slice(xp, (r + dy, r + dx, 0), x.shape)
        g_shift = jax.lax.dynamic_slice(gp, (r + dy, r + dx), (h, w))
        wgt = jnp.exp(-0.5 * (dy * dy + dx * dx) / sigma_spatial**2
                      - 0.5 * (g_shift - guide) ** 2 / sigma_value**2)
        return (num + wgt[..., None] * shifted, den + wgt), None

    init = (jnp.zeros_like(x), jnp.zeros_like(guide))
    (num, den), _ = jax.lax.scan(accumulate, init, offsets)
    return num / den[..., None] / scale
