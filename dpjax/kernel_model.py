"""A parametric model of a camera's dual-pixel blur kernels, for photos without a lab.

`dpjax.kernels.parametric_dp_kernels` draws one hard half disc per view. Real DP
kernels (the Pixel 4 calibration, data/pixel4/README.md) differ from that in ways a
handful of numbers can describe, and `DpKernelModel` holds those numbers:

- orientation: the split between the two photodiodes may be left/right or
  top/bottom (or anything between) in the exported image: `angle_deg`;
- a soft split: each view sees most of one half of the aperture but some of the
  other (`softness`), brighter towards its outer edge (`ramp`), all of it blurred by
  the lens's own point spread (`smooth`);
- asymmetry: the two views need not be mirror images (`softness_asym`,
  `ramp_asym`);
- variation across the frame: towards the frame's edge the chief ray is oblique,
  so the photodiodes' split moves across the aperture (`split`, `split_gradient`)
  and blurs (`softness_edge`: the views overlap more, so their offset shrinks at a
  given blur; measured on a Canon R6 Mark II plane, where it halves towards the
  left and right edges, roughly in proportion to |p|, while the kernels keep their
  size, experiments/results/own_camera.md).

The kernels, in kernel coordinates (x = column, y = row, pixels, origin at the
kernel centre), of a tile whose centre sits at normalised frame position
(px, py) in [-1, 1]^2 (-1 = left/top edge, +1 = right/bottom edge):

    u = (x cos(theta) + y sin(theta)) / r                   position along the split axis
    p = px cos(theta) + py sin(theta)                        the tile along the same axis
    c = split + split_gradient * p                           the crossover, in radii
    e = exp(softness_edge * |p|^softness_edge_power)         its widening off-centre
    w_L(u) = sigmoid((c - u) / tau_L) * exp(-ramp_L * u)     left view: the u < c side
    w_R(u) = sigmoid((u - c) / tau_R) * exp(+ramp_R * u)     right view: the u > c side
    k_v = normalise(G_sigma * (disc_r * w_v)),  sigma = smooth * r

with tau_L,R = e * softness * exp(+-softness_asym / 2) and ramp_L,R = ramp +- ramp_asym / 2.
softness = 0 gives hard half discs. Everything but r is in units of the radius, so
the shape does not depend on r.

Gauge. Only (defocus scale) x (radius) reaches the data: a kernel of radius r at
scale s looks like one of radius 2r at scale s/2. `radius` fixes the unit: it is
the aperture radius in pixels, at the resolution of the images the kernels are
for, at scale 1. A calibration fitted from photos (`dpjax.selfcal`) sets it to the
90th percentile of the blur radius it saw and records that blur in this unit
(`io.CalibratedKernels.blur_p90`, ~1); the auto preset's range search scales its
candidate grid by it (`dpjax.presets.search_scales`), so its candidates are the same
pixels of blur whatever the unit (experiments/results/own_camera.md, "The kernels'
unit"). The unit still matters where layer kernels are rescaled from one rendered
reference (a reference only a few pixels wide loses shape). One calibration folder
must be used with one unit (the auto preset estimates each scene's range in it).

Orientation and sign. At theta = 0 the left view sees the left (x < c) part of the
aperture, as in `parametric_dp_kernels`; theta = 90 deg is the transpose (the left
view sees the top). theta + 180 deg is the same kernel family with every defocus
sign flipped and split_gradient negated (a scale s < 0 rotates kernels by 180 deg),
which no DP pair can tell apart, so fitted angles are reported in (-90, 90].
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from dpjax.kernels import KernelBank, TileGrid

__all__ = [
    "LEGACY_EDGE_POWER",
    "LEGACY_MODEL",
    "DpKernelModel",
    "model_bank",
    "normalise_angle",
    "render_kernel_pairs",
    "render_kernels_jnp",
    "tile_positions",
]

# Softness below this is a hard split (the sigmoid is then a step to float precision;
# supersampling anti-aliases it).
_MIN_SOFTNESS = 1e-3
# The softening profile's exponent of models saved before `softness_edge_power` existed.
LEGACY_EDGE_POWER = 2.0
_MIN_SMOOTH = 1e-3


@dataclasses.dataclass(frozen=True, kw_only=True)
class DpKernelModel:
    """Parameters of the DP kernel model (module docstring for the formulas).

    Attributes:
      radius: aperture radius in pixels at defocus scale 1 (the gauge).
      angle_deg: orientation of the split axis; 0 = left/right, 90 = top/bottom.
      split: crossover position at the frame centre, in radii (0 = the middle).
      split_gradient: change of the crossover per unit normalised frame position
        along the split axis (vignetting moves the split towards the frame edge).
      softness: width of the crossover in radii (0 = hard half discs).
      softness_asym: log ratio tau_L / tau_R.
      softness_edge: the crossover's width grows by
        exp(softness_edge * |p|^softness_edge_power) at normalised position p along
        the split axis (0: the same everywhere).
      softness_edge_power: the exponent of that profile, not fitted: 1 since
        2026-12-07 (the Canon target kernels' offset falls like |p|); models written
        before the field existed used 2, which `from_dict` supplies for them.
      ramp: exponential brightening towards each view's outer edge (per radius).
      ramp_asym: ramp_L - ramp_R.
      smooth: Gaussian blur sigma of the kernel, in radii.
    """

    radius: float = 8.0
    angle_deg: float = 0.0
    split: float = 0.0
    split_gradient: float = 0.0
    softness: float = 0.1
    softness_asym: float = 0.0
    softness_edge: float = 0.0
    softness_edge_power: float = 1.0
    ramp: float = 0.4
    ramp_asym: float = 0.0
    smooth: float = 0.06

    def __post_init__(self):
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"DpKernelModel.{f.name} must be a finite number, got {v!r}")
        if self.radius <= 0:
            raise ValueError(f"radius must be positive, got {self.radius}")
        if self.softness < 0 or self.smooth < 0:
            raise ValueError(f"softness and smooth must be >= 0, got {self.softness}, "
                             f"{self.smooth}")
        if self.softness_edge_power <= 0:
            raise ValueError(f"softness_edge_power must be positive, got "
                             f"{self.softness_edge_power}")
        if abs(self.split) >= 1:
            raise ValueError(f"split must lie inside the aperture (|split| < 1), got {self.split}")

    def replace(self, **changes) -> DpKernelModel:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, float]:
        return {f.name: float(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, d: dict) -> DpKernelModel:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown DpKernelModel parameters: {sorted(unknown)}")
        values = {k: float(v) for k, v in d.items()}
        if "softness_edge" in values:  # written before the power was recorded: p^2
            values.setdefault("softness_edge_power", LEGACY_EDGE_POWER)
        return cls(**values)

    def default_size(self) -> int:
        """Odd kernel side holding the disc and 3 sigma of smoothing."""
        return 2 * math.ceil(self.radius * (1.0 + 3.0 * self.smooth) + 0.5) + 1


# The model closest to run_solver.py's kernels without a calibration,
# parametric_dp_kernels(radius=8, ramp=0.5, smooth_sigma=0.7): hard half discs, the
# linear ramp 1 + 0.5 |u| replaced by exp(ln(1.5) |u|) (equal at the centre and the
# edge), 0.7 px of smoothing. Self-calibration falls back to it.
LEGACY_MODEL = DpKernelModel(radius=8.0, softness=0.0, ramp=math.log(1.5), smooth=0.7 / 8.0)


def normalise_angle(angle_deg: float, split_gradient: float = 0.0) -> tuple[float, float]:
    """(angle, split_gradient) with the angle in (-90, 90] (module docstring, "sign").

    Moving the angle by 180 deg negates split_gradient; the defocus sign flips too,
    which the caller must apply to any scales it holds.
    """
    a = (angle_deg + 90.0) % 360.0 - 90.0  # [-90, 270)
    if a > 90.0:
        return a - 180.0, -split_gradient
    if a == -90.0:
        return 90.0, -split_gradient
    return a, split_gradient


def tile_positions(rows: int, cols: int) -> np.ndarray:
    """Normalised centres (px, py) in (-1, 1) of a rows x cols tile grid.

    Returns:
      [T, 2] float32, row-major, x first.
    """
    py = (np.arange(rows) + 0.5) / rows * 2.0 - 1.0
    px = (np.arange(cols) + 0.5) / cols * 2.0 - 1.0
    gy, gx = np.meshgrid(py, px, indexing="ij")
    return np.stack([gx.ravel(), gy.ravel()], axis=-1).astype(np.float32)


def _gaussian_matrix(sigma: jax.Array, size: int) -> jax.Array:
    """[size, size] 'same' zero-padded convolution matrix of a normalised Gaussian."""
    sigma = jnp.maximum(sigma, _MIN_SMOOTH)
    d = jnp.arange(-(size - 1), size, dtype=jnp.float32)
    g = jnp.exp(-0.5 * (d / sigma) ** 2)
    g = g / jnp.sum(g)
    i = jnp.arange(size)
    return g[i[:, None] - i[None, :] + size - 1]


def render_kernels_jnp(params: dict, positions: jax.Array, *, radius: float, size: int,
                       supersample: int = 4) -> jax.Array:
    """The model's kernel pairs at the given frame positions (differentiable in params).

    Args:
      params: mapping with scalar entries angle_deg, split, split_gradient, softness,
        softness_asym, softness_edge, softness_edge_power, ramp, ramp_asym, smooth
        (DpKernelModel's shape fields).
      positions: [T, 2] normalised frame positions (px, py) of the tile centres.
      radius: aperture radius in pixels (the disc's edge is not differentiated).
      size: odd kernel side.
      supersample: sub-samples per pixel and axis (anti-aliases the disc's edge).

    Returns:
      [2, T, size, size] float32, each kernel non-negative with sum 1.
    """
    n = size * supersample
    half = (size - 1) / 2
    sub = (jnp.arange(n, dtype=jnp.float32) + 0.5) / supersample - 0.5 - half
    y, x = jnp.meshgrid(sub, sub, indexing="ij")
    disc = (x * x + y * y <= radius * radius).astype(jnp.float32)  # [n, n]
    theta = jnp.deg2rad(jnp.asarray(params["angle_deg"], jnp.float32))
    cos, sin = jnp.cos(theta), jnp.sin(theta)
    u = (x * cos + y * sin) / radius  # [n, n]
    pos = jnp.asarray(positions, jnp.float32)
    along = pos[:, 0] * cos + pos[:, 1] * sin  # [T] tile positions along the split axis
    c = params["split"] + params["split_gradient"] * along  # [T]
    soft = jnp.maximum(params["softness"], _MIN_SOFTNESS)
    profile = jnp.abs(along) ** params["softness_edge_power"]  # [T]
    soft = soft * jnp.exp(params["softness_edge"] * profile)[:, None, None]  # [T, 1, 1]
    tau_l = soft * jnp.exp(0.5 * params["softness_asym"])
    tau_r = soft * jnp.exp(-0.5 * params["softness_asym"])
    ramp_l = params["ramp"] + 0.5 * params["ramp_asym"]
    ramp_r = params["ramp"] - 0.5 * params["ramp_asym"]
    d = c[:, None, None] - u[None]  # [T, n, n]
    w_l = jax.nn.sigmoid(d / tau_l) * jnp.exp(-ramp_l * u)[None]
    w_r = jax.nn.sigmoid(-d / tau_r) * jnp.exp(ramp_r * u)[None]
    k = jnp.stack([w_l, w_r]) * disc  # [2, T, n, n]
    k = k.reshape(2, -1, size, supersample, size, supersample).mean(axis=(3, 5))
    g = _gaussian_matrix(params["smooth"] * radius, size)
    k = jnp.einsum("ij,vtjk,lk->vtil", g, k, g)
    k = jnp.maximum(k, 0.0)
    return k / jnp.sum(k, axis=(-2, -1), keepdims=True)


# Host rendering compiles once per (T, size, supersample); radius and shape are traced.
_render_jit = jax.jit(render_kernels_jnp, static_argnames=("size", "supersample"))


def _shape_params(model: DpKernelModel) -> dict:
    return {k: jnp.float32(v) for k, v in model.to_dict().items() if k != "radius"}


def render_kernel_pairs(model: DpKernelModel, *, rows: int, cols: int, size: int | None = None,
                        supersample: int = 8) -> np.ndarray:
    """Per-tile kernel pairs of `model` for a rows x cols tile grid over the frame.

    Args:
      model: the kernel model (its radius in pixels of the target images).
      rows, cols: the tile grid (tile centres at their normalised frame positions).
      size: odd kernel side (default model.default_size()).
      supersample: sub-samples per pixel and axis.

    Returns:
      [2, T, K, K] float32 numpy (left, right), T = rows * cols in row-major order,
      each kernel non-negative and summing to 1.
    """
    size = model.default_size() if size is None else int(size)
    if size < 1 or size % 2 == 0:
        raise ValueError(f"kernel size must be odd and positive, got {size}")
    if rows < 1 or cols < 1:
        raise ValueError(f"tile grid must be at least 1x1, got {rows}x{cols}")
    # Rendered in chunks of tiles (all of one size: one compilation), so that the
    # supersampled temporaries stay bounded on grids of thousands of tiles.
    pos = np.asarray(tile_positions(rows, cols), np.float32)
    n = len(pos)
    chunk = max(1, min(n, _RENDER_CHUNK_SAMPLES // (size * supersample) ** 2))
    padded = np.concatenate([pos, np.repeat(pos[-1:], -n % chunk, axis=0)])
    params, radius = _shape_params(model), jnp.float32(model.radius)
    parts = [np.asarray(_render_jit(params, padded[i:i + chunk], radius=radius, size=size,
                                    supersample=supersample), np.float64)
             for i in range(0, len(padded), chunk)]
    k = np.concatenate(parts, axis=1)[:, :n]
    return (k / k.sum(axis=(-2, -1), keepdims=True)).astype(np.float32)


# Supersampled kernel samples rendered at once (per view; ~128 MB per float32 temporary).
_RENDER_CHUNK_SAMPLES = 2 ** 25


def model_bank(model: DpKernelModel, grid: TileGrid, *, size: int | None = None) -> KernelBank:
    """A KernelBank of `model` rendered for `grid` (radius in pixels of that grid)."""
    k = render_kernel_pairs(model, rows=grid.rows, cols=grid.cols, size=size)
    return KernelBank.create(k, rows=grid.rows, cols=grid.cols, tile_h=grid.tile_h,
                             tile_w=grid.tile_w)
