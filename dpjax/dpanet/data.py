"""Training pairs for DPANet: synthetic DP patches from dpjax's forward model, real crops.

A library: pure functions of a numpy Generator, no flags, no printing. Every batch is a
`PairBatch(left, right, target)` of float32 numpy arrays [N, h, w, C] with h = w = the
patch size (a multiple of 16, as `dpanet.apply` requires), intensities in [0, 1].

Synthetic source (`synthetic_batch`), one patch at a time:
1. a random layered scene (`synthetic.random_layers`: 1/f^slope textures with hard
   edges, soft-edged occluders) of `num_layers` layers with distinct signed defocus
   scales, back layer largest; the front layer's scale may be negative (in front of
   the focal plane: kernels rotated 180 degrees);
2. a reference kernel pair, with probability `calibrated_fraction` a random tile's pair
   of the calibrated Pixel 4 kernels (re-centred so that the sharp target stays
   registered with the views, see `prepare_calibrated_kernels`), otherwise a parametric
   half-aperture pair (`kernels.parametric_dp_kernels`) with random radius, ramp and
   smoothing;
3. both views rendered by `synthetic.render_layers` (the occlusion-aware MPI model) with
   a 1x1 tile grid, the target being `synthetic.composite_ground_truth`'s all-in-focus
   image; the scene is rendered `kernel_radius` px larger on every side and cropped, so
   the blur at the patch border sees real scene content rather than edge padding;
4. a random exposure (both views and the target), a small random gain of the right view
   (residual vignetting mismatch), heteroscedastic noise (`synthetic.add_noise`, random
   shot and read levels) on the views only, and clipping to [0, 1] (saturation).

Fixed shapes, one compilation: `render_layers` compiles once per kernel geometry, which
depends on max|s|. So the reference pair is first resampled to the largest |s| of the
patch, g, into a fixed [K, K] grid (K = 2 kernel_radius + 1), and the layers are
rendered with s / g (max |s / g| = 1, hence always radius kernel_radius). This composes
two area resamplings (at g, then at s / g <= 1), which smooths the smaller kernels by
at most one extra pixel box; the largest kernel is exact. If g times the reference
pair's support radius would exceed kernel_radius, all scales of the patch are shrunk to
fit. Rendering compiles once per number of layers.

Real source (`load_real_pairs`, `real_batch`): crops of the shared Pixel 4 scenes that
have a ground-truth all-in-focus image. The ground truth is not pixel-registered with
the views (data README: 0-3 px) and has another intensity scale, so it is aligned to the
mean of the two views exactly as the metrics align an estimate (`metrics.align_image`:
global integer shift search over +-max_shift px, then one affine intensity fit) and the
views are cropped to the same central region. Split (fixed, so that evaluation stays
honest): train on scenes 001, 005, 008; scenes 011, 013, 016 are held out for
evaluation and `load_real_pairs` refuses them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from dpjax import io, metrics, synthetic
from dpjax.kernels import KernelBank, parametric_dp_kernels, recenter_kernel_pairs, rescale_kernels

__all__ = [
    "HELD_OUT_SCENES",
    "TRAIN_SCENES",
    "PairBatch",
    "RealPairs",
    "SyntheticConfig",
    "gradient_energy",
    "load_real_pairs",
    "prepare_calibrated_kernels",
    "real_batch",
    "synthetic_batch",
    "synthetic_pair",
    "training_batch",
]

# The default split of the shared Pixel 4 scenes (data/pixel4/README.md).
TRAIN_SCENES = ("001", "005", "008")
HELD_OUT_SCENES = ("011", "013", "016")

MULTIPLE = 16  # patch sides must be multiples of this (dpanet.apply)


class PairBatch(NamedTuple):
    """A batch of DP pairs with sharp targets, each [N, h, w, C] float32 in [0, 1]."""

    left: np.ndarray
    right: np.ndarray
    target: np.ndarray


@dataclasses.dataclass(frozen=True, kw_only=True)
class SyntheticConfig:
    """Distribution of the synthetic patches. Ranges are (low, high) pairs.

    Attributes:
      channels: image channels C (1: Pixel green channel).
      num_layers: inclusive range of the number of layers L per patch.
      back_scale: range of the back layer's defocus scale (drawn uniformly).
      front_scale: range of the front layer's scale (negative: in front of focus); it
        is kept at least `min_scale_span` below the back layer's.
      min_scale_span: least difference between the back and front scales.
      texture_slope: range of the 1/f^slope exponent of the layer textures.
      calibrated_fraction: probability of a calibrated Pixel 4 kernel pair (when
        calibrated kernels are given) rather than a parametric one.
      radius: range of the parametric aperture radius (px at scale 1). The Pixel 4
        kernels hold 99% of their energy within 13-29 px (median 17).
      ramp: range of the parametric intensity ramp.
      smooth_sigma: range of the parametric Gaussian smoothing (px).
      base_kernel_size: odd side of the reference pairs (calibrated kernels are
        cropped to it after re-centring, parametric ones drawn at it).
      kernel_radius: half side of the rendered kernels and the scene margin (px).
      exposure: log-uniform range of the exposure factor applied to the scene.
      view_gain: the right view is multiplied by 1 + U(-view_gain, view_gain).
      shot, read: log-uniform ranges of `synthetic.add_noise`'s levels.
    """

    channels: int = 1
    num_layers: tuple[int, int] = (2, 5)
    back_scale: tuple[float, float] = (0.4, 1.7)
    front_scale: tuple[float, float] = (-0.5, 0.6)
    min_scale_span: float = 0.2
    texture_slope: tuple[float, float] = (1.0, 2.0)
    calibrated_fraction: float = 0.5
    radius: tuple[float, float] = (2.0, 20.0)
    ramp: tuple[float, float] = (0.0, 1.0)
    smooth_sigma: tuple[float, float] = (0.3, 1.2)
    base_kernel_size: int = 51
    kernel_radius: int = 40
    exposure: tuple[float, float] = (0.3, 1.0)
    view_gain: float = 0.02
    shot: tuple[float, float] = (1e-5, 1e-3)
    read: tuple[float, float] = (5e-4, 5e-3)

    def __post_init__(self):
        for name in ("num_layers", "back_scale", "front_scale", "texture_slope", "radius",
                     "ramp", "smooth_sigma", "exposure", "shot", "read"):
            lo, hi = getattr(self, name)
            if lo > hi:
                raise ValueError(f"{name}: low {lo} > high {hi}")
            object.__setattr__(self, name, (lo, hi))
        if self.channels < 1 or self.num_layers[0] < 1:
            raise ValueError("channels and num_layers must be >= 1")
        if self.base_kernel_size % 2 == 0 or self.base_kernel_size < 3:
            raise ValueError(f"base_kernel_size must be odd and >= 3, got {self.base_kernel_size}")
        if self.kernel_radius < 1:
            raise ValueError(f"kernel_radius must be >= 1, got {self.kernel_radius}")
        if not 0.0 <= self.calibrated_fraction <= 1.0:
            raise ValueError("calibrated_fraction must be in [0, 1]")
        if self.radius[0] <= 0 or self.exposure[0] <= 0 or self.shot[0] <= 0 or self.read[0] <= 0:
            raise ValueError("radius, exposure, shot and read ranges must be positive")
        if self.back_scale[0] <= 0 or self.min_scale_span <= 0:
            raise ValueError("back_scale and min_scale_span must be positive")
        if self.radius[1] + 3 * self.smooth_sigma[1] + 1 > (self.base_kernel_size - 1) // 2:
            raise ValueError("parametric kernels of the largest radius do not fit "
                             f"base_kernel_size={self.base_kernel_size}")


# ----------------------------------------------------------------------------- kernels


def prepare_calibrated_kernels(kernels: np.ndarray, size: int = 51) -> np.ndarray:
    """Re-centred calibrated kernel pairs, cropped to size x size and renormalised.

    Re-centring (`kernels.recenter_kernel_pairs`) puts each tile's combined (L+R)/2
    centroid at the origin, so the rendered views stay registered with the sharp target
    (the raw Pixel 4 kernels are off-centre by up to 6 px). The crop keeps the kernels'
    support (99% of the energy lies within 29 px for every Pixel 4 tile, within 17 px
    for half of them) and bounds the rendered kernel size.

    Args:
      kernels: [2, T, K, K] calibrated kernels (left, right), K >= size.

    Returns:
      [2, T, size, size] float32, each kernel summing to 1.
    """
    kernels = np.asarray(kernels, np.float32)
    if kernels.ndim != 4 or kernels.shape[0] != 2 or kernels.shape[2] != kernels.shape[3]:
        raise ValueError(f"kernels must be [2, T, K, K], got {kernels.shape}")
    k = kernels.shape[-1]
    if size % 2 == 0 or size > k:
        raise ValueError(f"crop size must be odd and <= {k}, got {size}")
    centred = recenter_kernel_pairs(kernels)
    o = (k - size) // 2
    crop = centred[..., o:o + size, o:o + size]
    return (crop / crop.sum(axis=(-2, -1), keepdims=True)).astype(np.float32)


def _support_radius(pair: np.ndarray, mass: float = 0.99) -> float:
    """Radius (px) of the centred disc holding `mass` of each kernel's sum (the larger).

    The calibrated kernels have faint tails out to their border; bounding the scaled
    kernel by its 99% radius lets their tails (<= 1%) be cut by the render grid
    rather than shrinking every scale of the patch.
    """
    k = pair.shape[-1]
    c = np.arange(k) - (k - 1) / 2
    r = np.sqrt(c[:, None] ** 2 + c[None, :] ** 2).ravel()
    order = np.argsort(r, kind="stable")
    radii = []
    for kernel in pair.reshape(pair.shape[0], -1):
        cum = np.cumsum(kernel[order]) / kernel.sum()
        radii.append(r[order][min(int(np.searchsorted(cum, mass)), r.size - 1)])
    return float(max(radii)) + 0.5


_rescale_jit = jax.jit(rescale_kernels, static_argnames=("out_size",))


def _log_uniform(rng: np.random.Generator, lo_hi: tuple[float, float]) -> float:
    lo, hi = lo_hi
    return float(np.exp(rng.uniform(np.log(lo), np.log(hi))))


# --------------------------------------------------------------------------- synthetic


def _check_patch(patch: int) -> None:
    if patch < MULTIPLE or patch % MULTIPLE:
        raise ValueError(f"patch must be a positive multiple of {MULTIPLE}, got {patch}")


def synthetic_pair(rng: np.random.Generator, patch: int, config: SyntheticConfig,
                   calibrated: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic patch (module docstring, "Synthetic source").

    Args:
      rng: consumed deterministically.
      patch: side h = w of the patch, a multiple of 16.
      config: the distribution.
      calibrated: [2, T, k, k] kernels from `prepare_calibrated_kernels` (k =
        config.base_kernel_size), or None for parametric kernels only.

    Returns:
      (views [2, h, w, C], target [h, w, C]), float32 in [0, 1].
    """
    _check_patch(patch)
    cfg = config
    if calibrated is not None and calibrated.shape[-1] != cfg.base_kernel_size:
        raise ValueError(f"calibrated kernels are {calibrated.shape[-1]} px, expected "
                         f"base_kernel_size={cfg.base_kernel_size}")
    m = cfg.kernel_radius
    size = patch + 2 * m  # scene with a margin of one kernel radius on every side

    num_layers = int(rng.integers(cfg.num_layers[0], cfg.num_layers[1] + 1))
    back = rng.uniform(*cfg.back_scale)
    front = min(rng.uniform(*cfg.front_scale), back - cfg.min_scale_span)
    colors, alphas, scales = synthetic.random_layers(
        rng, height=size, width=size, num_layers=num_layers, channels=cfg.channels,
        scale_range=(front, back), slope=rng.uniform(*cfg.texture_slope))

    if calibrated is not None and rng.random() < cfg.calibrated_fraction:
        pair = calibrated[:, int(rng.integers(calibrated.shape[1]))]  # [2, k, k]
    else:
        pair = parametric_dp_kernels(radius=rng.uniform(*cfg.radius),
                                     ramp=rng.uniform(*cfg.ramp),
                                     smooth_sigma=rng.uniform(*cfg.smooth_sigma),
                                     size=cfg.base_kernel_size)

    # Shrink the scales if the largest kernel would not fit the fixed render grid.
    g = float(np.max(np.abs(scales)))
    fit = m / (g * _support_radius(pair))
    if fit < 1.0:
        scales = (scales * fit).astype(np.float32)
        g = float(np.max(np.abs(scales)))
    big = _rescale_jit(jnp.asarray(pair), jnp.asarray([g], jnp.float32), out_size=2 * m + 1)[0]
    bank = KernelBank.create(np.asarray(big)[:, None], rows=1, cols=1, tile_h=size)
    unit = np.clip(scales / np.float32(g), -1.0, 1.0).astype(np.float32)  # max |unit| = 1

    views = synthetic.render_layers(colors, alphas, unit, bank)  # [2, S, S, C]
    target, _ = synthetic.composite_ground_truth(colors, alphas, scales)  # [S, S, C]
    crop = (slice(m, m + patch), slice(m, m + patch))
    views, target = views[:, crop[0], crop[1]], target[crop]

    exposure = _log_uniform(rng, cfg.exposure)
    gain = 1.0 + rng.uniform(-cfg.view_gain, cfg.view_gain)
    views = views * np.array([exposure, exposure * gain], np.float32)[:, None, None, None]
    views = synthetic.add_noise(rng, views, shot=_log_uniform(rng, cfg.shot),
                                read=_log_uniform(rng, cfg.read))
    return (np.clip(views, 0.0, 1.0).astype(np.float32),
            np.clip(target * exposure, 0.0, 1.0).astype(np.float32))


def synthetic_batch(rng: np.random.Generator, n: int, patch: int, config: SyntheticConfig,
                    calibrated: np.ndarray | None = None) -> PairBatch:
    """n synthetic patches (`synthetic_pair`) as a PairBatch of [n, patch, patch, C]."""
    pairs = [synthetic_pair(rng, patch, config, calibrated) for _ in range(n)]
    return _stack(pairs, patch, config.channels)


def _stack(pairs: Sequence[tuple[np.ndarray, np.ndarray]], patch: int, channels: int) -> PairBatch:
    if not pairs:
        empty = np.zeros((0, patch, patch, channels), np.float32)
        return PairBatch(empty, empty.copy(), empty.copy())
    views = np.stack([v for v, _ in pairs])  # [N, 2, h, w, C]
    return PairBatch(views[:, 0], views[:, 1], np.stack([t for _, t in pairs]))


# -------------------------------------------------------------------------------- real


class RealPairs(NamedTuple):
    """Aligned Pixel 4 training scenes.

    Attributes:
      views: per scene [2, H', W', 1] preprocessed views (io.load_pixel4_scene), cropped
        by max_shift px on every side.
      targets: per scene [H', W', 1] ground truth aligned to the mean of the views (shift
        and affine intensity fit; same intensity scale as the views), clipped to [0, 1].
      scene_ids: the scenes, e.g. ("001", "005", "008").
      shifts: per scene (dy, dx) found by `metrics.align_image`.
    """

    views: tuple[np.ndarray, ...]
    targets: tuple[np.ndarray, ...]
    scene_ids: tuple[str, ...]
    shifts: tuple[tuple[int, int], ...]


def _scene_id(scene: int | str) -> str:
    s = str(int(scene)) if isinstance(scene, (int, np.integer)) else str(scene)
    return s.zfill(3) if s.isdigit() else s


def load_real_pairs(data_dir: str | Path, train_scenes: Sequence[int | str] = TRAIN_SCENES, *,
                    held_out: Sequence[int | str] = HELD_OUT_SCENES,
                    max_shift: int = 6) -> RealPairs:
    """Load and align the Pixel 4 training scenes (module docstring, "Real source").

    Default split: train on 001, 005, 008; 011, 013, 016 are held out for evaluation.

    Args:
      data_dir: the Pixel 4 folder (data/pixel4/README.md layout).
      train_scenes: scene ids to load; each needs gt_all_in_focus_im/NNN_gt.png.
      held_out: scene ids reserved for evaluation; asking for one raises ValueError
        before anything is read.
      max_shift: translation search radius of the alignment (px).

    Returns:
      RealPairs.
    """
    ids = tuple(_scene_id(s) for s in train_scenes)
    banned = sorted(set(ids) & {_scene_id(s) for s in held_out})
    if banned:
        raise ValueError(f"held-out scene(s) {', '.join(banned)} may not be used for training "
                         f"(held out for evaluation: {', '.join(map(_scene_id, held_out))})")
    if not ids:
        raise ValueError("train_scenes is empty")
    views_out, targets, shifts = [], [], []
    m = int(max_shift)
    for sid in ids:
        scene = io.load_pixel4_scene(data_dir, sid, require_gt=True)
        views = scene.views  # [2, H, W, 1], joint max 1
        mean = views.mean(axis=0)[..., 0]  # [H, W]
        # align_image fits a * gt[shifted] + b to mean / max(mean) on the central region.
        aligned, _, shift = metrics.align_image(scene.gt_all_in_focus, mean, max_shift=m)
        h, w = aligned.shape
        target = np.clip(aligned * mean.max(), 0.0, 1.0).astype(np.float32)[..., None]
        views_out.append(np.ascontiguousarray(views[:, m:m + h, m:m + w]))
        targets.append(target)
        shifts.append(shift)
    return RealPairs(tuple(views_out), tuple(targets), ids, tuple(shifts))


def real_batch(rng: np.random.Generator, n: int, patch: int, real: RealPairs, *,
               flip: bool = True) -> PairBatch:
    """n random crops of the real scenes (scene and position uniform).

    With flip, each crop is flipped upside down with probability 1/2; DP disparity is
    horizontal, so a vertical flip keeps the left/right geometry (a horizontal one
    would not).

    Returns:
      PairBatch of [n, patch, patch, 1].
    """
    _check_patch(patch)
    pairs = []
    for _ in range(n):
        i = int(rng.integers(len(real.views)))
        views, target = real.views[i], real.targets[i]
        h, w = target.shape[:2]
        if h < patch or w < patch:
            raise ValueError(f"scene {real.scene_ids[i]} ({h}x{w}) is smaller than the patch")
        y, x = int(rng.integers(h - patch + 1)), int(rng.integers(w - patch + 1))
        v, t = views[:, y:y + patch, x:x + patch], target[y:y + patch, x:x + patch]
        if flip and rng.random() < 0.5:
            v, t = v[:, ::-1], t[::-1]
        pairs.append((v, t))
    return _stack(pairs, patch, 1)


def training_batch(rng: np.random.Generator, n: int, patch: int, config: SyntheticConfig, *,
                   calibrated: np.ndarray | None = None, real: RealPairs | None = None,
                   real_fraction: float = 0.0) -> PairBatch:
    """A mixed batch: Binomial(n, real_fraction) real crops first, then synthetic patches.

    Args:
      rng: consumed deterministically (a fresh Generator per step makes a resumed run
        see the same batches as an uninterrupted one).
      real: required when real_fraction > 0; its scenes are single-channel, so
        config.channels must be 1.
    """
    if n < 1:
        raise ValueError(f"batch size must be >= 1, got {n}")
    if not 0.0 <= real_fraction <= 1.0:
        raise ValueError(f"real_fraction must be in [0, 1], got {real_fraction}")
    n_real = 0
    if real_fraction > 0:
        if real is None:
            raise ValueError("real_fraction > 0 needs real pairs (load_real_pairs)")
        if config.channels != 1:
            raise ValueError("the real Pixel 4 pairs are single-channel; use channels=1")
        n_real = int(rng.binomial(n, real_fraction))
    parts = [real_batch(rng, n_real, patch, real)] if n_real else []
    if n - n_real:
        parts.append(synthetic_batch(rng, n - n_real, patch, config, calibrated))
    return PairBatch(*(np.concatenate(arrays) for arrays in zip(*parts)))


def gradient_energy(images: np.ndarray) -> float:
    """Mean squared finite difference along H and W of [..., H, W, C] images."""
    dy = np.diff(images, axis=-3)
    dx = np.diff(images, axis=-2)
    return float((np.mean(dy * dy) + np.mean(dx * dx)) / 2)

