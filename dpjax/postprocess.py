"""Post-processing of the outputs (METHOD.md, "Optimisation and outputs").

The paper smooths the MPI's all-in-focus image with a bilateral filter (sigma_s = 3
px, sigma_v = 0.05 on intensities scaled to mean 0.5): the per-pixel MPI colours
carry optimisation noise that the filter removes without blurring edges.

Textureless regions carry no blur cue, so their defocus is whatever the priors left
there. `fill_defocus` (opt-in; the auto preset's choice, `dpjax.presets.defocus_fill`)
replaces the defocus of the less textured pixels by an edge-aware average of the more
textured ones: a normalised convolution (Knutsson & Westin 1993) with the domain
transform's recursive filter (Gastal & Oliveira 2011), guided by the all-in-focus image.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp

from dpjax import baselines, mpi

# Defocus fill defaults (PostConfig; experiments/results/pixel4.md, "Filling
# textureless regions").
FILL_SIGMA_SPATIAL = 0.125  # of the frame's shorter side
FILL_SIGMA_VALUE = 0.1  # display-encoded intensity
FILL_QUANTILE = 50.0  # the less textured half of the pixels takes the fill
_FILL_ITERATIONS = 3
_FILL_WINDOW = 7  # texture window (px)
_FILL_GAMMA = 2.2  # the guide's display encoding
_FILL_MAX_PIXELS = 2_000_000  # the filter runs on a grid of at most this many pixels


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
      fill, fill_sigma_spatial, fill_sigma_value, fill_quantile: `fill_defocus` of the
        defocus map (off by default, the paper's map; on in the auto preset).
    """

    bilateral: bool = True
    sigma_spatial: float = 3.0
    sigma_value: float = 0.05
    defocus: str = "mean"
    fill: bool = False
    fill_sigma_spatial: float = FILL_SIGMA_SPATIAL
    fill_sigma_value: float = FILL_SIGMA_VALUE
    fill_quantile: float = FILL_QUANTILE

    def __post_init__(self):
        mpi.defocus_estimator_fn(self.defocus)  # an unknown name fails here, not after a solve
        if not 0 < self.fill_sigma_spatial <= 1:
            raise ValueError("post.fill_sigma_spatial is a fraction of the frame's shorter "
                             f"side in (0, 1]; got {self.fill_sigma_spatial}")
        if not self.fill_sigma_value > 0:
            raise ValueError(f"post.fill_sigma_value must be positive; got "
                             f"{self.fill_sigma_value}")
        if not 0 <= self.fill_quantile < 100:
            raise ValueError(f"post.fill_quantile must be in [0, 100); got {self.fill_quantile}")


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


def _recursive_smooth(x: jax.Array, decay: jax.Array) -> jax.Array:
    """One causal and one anti-causal pass of y_j = (1 - a_j) x_j + a_j y_(j-1) along
    axis 1.

    A sequential `lax.scan` over the L positions (each step works on all N rows): on
    the CPU it ran 3x faster than `lax.associative_scan` at a Pixel 4 frame's size and
    compiled 5x faster (benchmarks/bench_fill.py).

    Args:
      x: [N, L, K] signals; decay: [N, L - 1] a between neighbours j - 1 and j, in [0, 1).
    """
    xs = jnp.moveaxis(x, 1, 0)  # [L, N, K]
    a = jnp.moveaxis(decay, 1, 0)[..., None]  # [L - 1, N, 1]

    def step(prev, inputs):
        xj, aj = inputs
        y = (1 - aj) * xj + aj * prev
        return y, y

    _, rest = jax.lax.scan(step, xs[0], (xs[1:], a))
    y = jnp.concatenate([xs[:1], rest], axis=0)
    _, rest = jax.lax.scan(step, y[-1], (y[:-1], a), reverse=True)
    return jnp.moveaxis(jnp.concatenate([rest, y[-1:]], axis=0), 0, 1)


def domain_transform(x: jax.Array, guide: jax.Array, *, sigma_spatial: float,
                     sigma_value: float, iterations: int = _FILL_ITERATIONS) -> jax.Array:
    """Edge-aware smoothing of `x` guided by `guide` (the domain transform's recursive
    filter, Gastal & Oliveira 2011): horizontal and vertical passes whose decay between
    neighbours falls with the guide's change between them.

    Args:
      x: [H, W, K] signals; guide: [H, W, C] in display units (about 0-1).
      sigma_spatial: the filter's spatial standard deviation (px).
      sigma_value: the guide difference that counts as one sigma_spatial of distance.

    Returns:
      [H, W, K] float32.
    """
    ratio = sigma_spatial / sigma_value
    dx = 1 + ratio * jnp.sum(jnp.abs(jnp.diff(guide, axis=1)), axis=-1)  # [H, W - 1]
    dy = 1 + ratio * jnp.sum(jnp.abs(jnp.diff(guide, axis=0)), axis=-1)  # [H - 1, W]
    y = x.astype(jnp.float32)
    for i in range(iterations):
        sigma_i = sigma_spatial * 3**0.5 * 2 ** (iterations - i - 1) / (4**iterations - 1) ** 0.5
        k = 2**0.5 / sigma_i
        y = _recursive_smooth(y, jnp.exp(-k * dx))
        y = jnp.swapaxes(_recursive_smooth(jnp.swapaxes(y, 0, 1), jnp.exp(-k * dy.T)), 0, 1)
    return y


def fill_factor(h: int, w: int) -> int:
    """The fill's grid step on an h x w frame: 1 up to _FILL_MAX_PIXELS (2 MP), else the
    smallest integer that brings the grid under it (4 on a 24 MP frame), so that its
    memory stays bounded whatever the frame size. Its reach (an eighth of the shorter
    side) is then hundreds of grid steps; what the coarser grid loses is where the
    fill stops at an edge, within the step."""
    return max(1, math.ceil(math.sqrt(h * w / _FILL_MAX_PIXELS)))


def _block_mean(x: jax.Array, f: int) -> jax.Array:
    """[H, W, K] -> [ceil(H / f), ceil(W / f), K] means over f x f blocks (edge-padded)."""
    if f == 1:
        return x
    h, w = x.shape[:2]
    x = jnp.pad(x, ((0, -h % f), (0, -w % f), (0, 0)), mode="edge")
    return x.reshape(x.shape[0] // f, f, x.shape[1] // f, f, -1).mean(axis=(1, 3))


def _percentile(x: jax.Array, q: float) -> jax.Array:
    """The q-th percentile of [H, W] x over every 4th row and column: a threshold, not
    a statistic (sorting the whole Pixel 4 frame took 0.6 s on the CPU)."""
    return jnp.percentile(x[::4, ::4], q)


def fill_guide(image: jax.Array) -> jax.Array:
    """The fill's guide: [H, W, C] linear image -> display encoding in [0, 1] (scaled to
    its 99th percentile, gamma 1/2.2), so that sigma_value means the same on any
    exposure."""
    x = jnp.maximum(image.astype(jnp.float32), 0)
    top = jnp.maximum(_percentile(jnp.mean(x, axis=-1), 99.0), 1e-12)
    return jnp.clip(x / top, 0, 1) ** (1 / _FILL_GAMMA)


@functools.partial(jax.jit, static_argnames=("sigma_spatial", "sigma_value", "quantile"))
def fill_defocus(defocus: jax.Array, image: jax.Array, *,
                 sigma_spatial: float = FILL_SIGMA_SPATIAL,
                 sigma_value: float = FILL_SIGMA_VALUE,
                 quantile: float = FILL_QUANTILE) -> tuple[jax.Array, jax.Array]:
    """The defocus map with its less textured pixels filled from the more textured ones.

    The texture is the windowed gradient energy of the guide (`fill_guide`); the pixels
    at or below its `quantile` take the normalised, edge-aware average
    `domain_transform(D w) / domain_transform(w)` of the map over the pixels above it
    (w = 1 there, 0 elsewhere); the others keep their value. Frames over 2 MP are
    filtered on a coarser grid (`fill_factor`).

    Args:
      defocus: [H, W] defocus map.
      image: [H, W, C] linear all-in-focus image (any scale).
      sigma_spatial: fraction of min(H, W): the fill's reach.
      sigma_value: `domain_transform`'s, on the display-encoded guide.
      quantile: percentile of the texture at or below which a pixel is filled.

    Returns:
      ([H, W] float32 filled map, [H, W] bool the pixels that kept their value).
    """
    guide = fill_guide(image)
    texture = baselines.box_filter(baselines.grad_energy(jnp.mean(guide, axis=-1)),
                                   _FILL_WINDOW)
    # Below 1e-3 of the mean is no texture (flat or clipped areas, where the box
    # filter's rounding would otherwise break the ties at random).
    kept = texture > jnp.maximum(_percentile(texture, quantile), 1e-3 * jnp.mean(texture))
    w = kept.astype(jnp.float32)
    d = defocus.astype(jnp.float32)
    h, wd = d.shape
    f = fill_factor(h, wd)
    sums = domain_transform(_block_mean(jnp.stack([d * w, w], axis=-1), f),
                            _block_mean(guide, f),
                            sigma_spatial=sigma_spatial * min(h, wd) / f,
                            sigma_value=sigma_value)
    if f > 1:  # back to full resolution (block centres, half-pixel convention)
        sums = jax.image.resize(sums, (sums.shape[0] * f, sums.shape[1] * f, 2),
                                "linear")[:h, :wd]
    filled = sums[..., 0] / jnp.maximum(sums[..., 1], 1e-12)
    # A pixel no kept pixel reaches (sums[..., 1] underflows) keeps its own value.
    filled = jnp.where(sums[..., 1] > 1e-6, filled, d)
    return jnp.where(kept, d, filled), kept


def filled_defocus(defocus, image, post: PostConfig) -> jax.Array:
    """`fill_defocus` with `post`'s settings: [H, W] map, [H, W, C] linear image."""
    filled, _ = fill_defocus(jnp.asarray(defocus), jnp.asarray(image),
                             sigma_spatial=post.fill_sigma_spatial,
                             sigma_value=post.fill_sigma_value, quantile=post.fill_quantile)
    return filled
