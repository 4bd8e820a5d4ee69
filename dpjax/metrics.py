"""Evaluation metrics for defocus maps and all-in-focus images (host-side numpy).

This module is the evaluation protocol of METHOD.md ("Evaluation"); published tables
are reproduced with exactly what is written here. Everything runs in float64 numpy
on the host; nothing here imports JAX (pass `np.asarray(x)` of device arrays).

Defocus maps (`defocus_metrics`), after Garg et al. (ICCV 2019) and the evaluation
code released with it (google-research `dual_pixels/eval/get_metrics.py`), which
Xin et al. (ICCV 2021) use. Let p be the prediction, g the ground truth and w >= 0
the confidence, all [H, W]. Only pixels with w > 0 take part in any computation, so
values at zero-confidence pixels never change a score.

- AIWE(1) = sum w |g - (a p + b)| / sum w, with (a, b) from 5 iterations of IRLS:
  iteration 1 is the weighted least-squares fit (IRLS weight 1), and each later
  iteration refits with weights w / max(|r|, eps), eps = 1e-3, where r are the
  residuals of the previous fit. The error uses the residuals of the 5th fit.
- AIWE(2) = sqrt(sum w r^2 / sum w) with (a, b) the weighted least-squares fit
  (minimising sum w r^2).
- Spearman loss = 1 - |rho_s|. Ordinal ranks (ties broken by pixel order, a stable
  argsort of a stable argsort) of p and of g are taken over the pixels with w > 0,
  and rho_s is the w-weighted Pearson correlation of the ranks. Because ordinal
  ranks are not antisymmetric under ties, |rho_s| is computed as the original code
  does: max(rho(rank(p), rank(g)), rho(rank(-p), rank(g))), so that a negated copy
  of g scores exactly 0. Without ties this equals |rho(rank(p), rank(g))|. Caveat of
  ordinal ranks (kept for comparability): tied predictions are ordered by raster
  position. Only a wholly constant p (or g), whose ranks would be raster order
  alone, is special-cased to rho_s = 0, a loss of 1.
- `defocus_metrics(pred, gt)` uses w = (gt > 0) and the 8-bit gt values divided by
  255, so AIWE(1) and AIWE(2) are in units of the ground truth's full range (as in
  the paper's tables). The metrics are invariant to affine changes of p, not of gt.

  Differences from the released TensorFlow code, all immaterial for binary
  confidence: ranks are taken over confident pixels only (the released code ranks
  all pixels and then weights them, so zero-confidence values shift the ranks);
  float64 instead of float32; no 1e-5 ridge term in the least-squares solves.

All-in-focus images (`image_metrics`): the ground truth is divided by its maximum,
then `align_image` searches every integer translation (dy, dx) in
[-max_shift, max_shift]^2 (default 6). For each, the estimate sampled at
est[y + dy, x + dx] is compared with gt[y, x] on the fixed central region
gt[m:H-m, m:W-m] (m = max_shift, the region valid for every shift, so all shifts are
scored on the same pixels): one least-squares affine fit gt ~ a est + b shared by
all channels (a single global gain and offset: the ground truth differs from the
input by exposure scale and black level, not by per-channel colour), scored by its
MSE. The best shift's fitted estimate (not clipped) and gt region are then scored
with PSNR, SSIM and MAE at data range 1. A shift (dy, dx) means the estimate's
content sits (dy, dx) pixels down/right of the ground truth's.

SSIM is Wang et al. (2004) with an 11-tap Gaussian window (sigma 1.5, truncated at
3.5 sigma), population covariances, K1 = 0.01, K2 = 0.03, 'reflect' (half-sample
symmetric) borders, and the mean taken after cropping 5 pixels from every border;
for [H, W, C] the mean over channels. This matches
`skimage.metrics.structural_similarity(x, y, data_range=..., gaussian_weights=True,
sigma=1.5, use_sample_covariance=False[, channel_axis=-1])`.
"""

from __future__ import annotations

import numpy as np

# IRLS constants of AIWE(1) (Garg et al. 2019).
_IRLS_ITERS = 5
_IRLS_EPS = 1e-3

# SSIM constants (Wang et al. 2004; scikit-image's Gaussian-window variant).
_SSIM_K1 = 0.01
_SSIM_K2 = 0.03
_SSIM_SIGMA = 1.5
_SSIM_TRUNCATE = 3.5
_SSIM_RADIUS = int(_SSIM_TRUNCATE * _SSIM_SIGMA + 0.5)  # 5, as scipy.ndimage
_SSIM_WIN = 2 * _SSIM_RADIUS + 1  # 11


# --------------------------------------------------------------------------- checks


def _as_finite(name: str, x, ndims: tuple[int, ...]) -> np.ndarray:
    """float64 copy of `x`; ValueError on a wrong ndim or a NaN/Inf value."""
    a = np.asarray(x, dtype=np.float64)
    if a.ndim not in ndims:
        want = " or ".join(f"{d}-D" for d in ndims)
        raise ValueError(f"{name} must be {want}, got shape {a.shape}")
    if a.size == 0:
        raise ValueError(f"{name} is empty (shape {a.shape})")
    if not np.all(np.isfinite(a)):
        n_bad = int(np.size(a) - np.count_nonzero(np.isfinite(a)))
        raise ValueError(f"{name} has {n_bad} NaN/Inf values")
    return a


def _same_shape(**arrays: np.ndarray) -> None:
    shapes = {k: v.shape for k, v in arrays.items()}
    if len(set(shapes.values())) != 1:
        desc = ", ".join(f"{k} {s}" for k, s in shapes.items())
        raise ValueError(f"shape mismatch: {desc}")


def _confident_pixels(pred, gt, confidence) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Validates a defocus triple; returns p, g, w restricted to w > 0, flattened."""
    p = _as_finite("pred", pred, (2,))
    g = _as_finite("gt", gt, (2,))
    w = _as_finite("confidence", confidence, (2,))
    _same_shape(pred=p, gt=g, confidence=w)
    if np.any(w < 0):
        raise ValueError("confidence must be >= 0")
    keep = w > 0
    if not np.any(keep):
        raise ValueError("no pixel has confidence > 0: the metrics are undefined")
    return p[keep], g[keep], w[keep]


# ------------------------------------------------------------------ defocus metrics


def _weighted_affine_fit(x: np.ndarray, y: np.ndarray, w: np.ndarray) -> tuple[float, float]:
    """(a, b) minimising sum w (y - a x - b)^2, for w > 0.

    Solved in centred form (a = cov_w(x, y) / var_w(x)) rather than with the raw
    normal equations, which lose precision when the mean of x dwarfs its spread.
    Hazard guarded: a constant x gives a = 0 and b = the weighted mean of y.
    """
    sw = w.sum()
    mx = (w * x).sum() / sw
    my = (w * y).sum() / sw
    if x.max() == x.min():
        return 0.0, float(my)
    dx = x - mx
    a = (w * dx * (y - my)).sum() / (w * dx * dx).sum()
    return float(a), float(my - a * mx)


def aiwe1(pred, gt, confidence) -> float:
    """Affine-invariant weighted mean absolute error, AIWE(1) (module docstring).

    Args:
      pred: [H, W] predicted defocus (any affine function of it scores the same).
      gt: [H, W] ground-truth defocus.
      confidence: [H, W] weights >= 0; pixels at 0 are ignored.

    Returns:
      sum w |gt - (a pred + b)| / sum w, (a, b) from 5 IRLS iterations (eps 1e-3).
    """
    p, g, w = _confident_pixels(pred, gt, confidence)
    irls = np.ones_like(w)  # iteration 1: plain weighted least squares
    for _ in range(_IRLS_ITERS):
        a, b = _weighted_affine_fit(p, g, w * irls)
        resid = np.abs(a * p + b - g)
        irls = 1.0 / np.maximum(resid, _IRLS_EPS)
    return float((w * resid).sum() / w.sum())


def aiwe2(pred, gt, confidence) -> float:
    """Affine-invariant weighted root mean squared error, AIWE(2).

    Args:
      pred: [H, W] predicted defocus.
      gt: [H, W] ground-truth defocus.
      confidence: [H, W] weights >= 0; pixels at 0 are ignored.

    Returns:
      sqrt(sum w r^2 / sum w), r = gt - (a pred + b) after the weighted
      least-squares fit of (a, b).
    """
    p, g, w = _confident_pixels(pred, gt, confidence)
    a, b = _weighted_affine_fit(p, g, w)
    return float(np.sqrt((w * (a * p + b - g) ** 2).sum() / w.sum()))


def _ordinal_rank(z: np.ndarray) -> np.ndarray:
    """0-based ranks, ties broken by position (stable argsort of a stable argsort)."""
    return np.argsort(np.argsort(z, kind="stable"), kind="stable").astype(np.float64)


def _weighted_pearson(x: np.ndarray, y: np.ndarray, w: np.ndarray) -> float:
    sw = w.sum()
    dx = x - (w * x).sum() / sw
    dy = y - (w * y).sum() / sw
    return float((w * dx * dy).sum() / np.sqrt((w * dx * dx).sum() * (w * dy * dy).sum()))


def spearman_loss(pred, gt, confidence) -> float:
    """1 - |weighted Spearman rank correlation| (module docstring for ties).

    Args:
      pred: [H, W] predicted defocus.
      gt: [H, W] ground-truth defocus.
      confidence: [H, W] weights >= 0; pixels at 0 are ignored (and not ranked).

    Returns:
      1 - max(rho(rank(pred), rank(gt)), rho(rank(-pred), rank(gt))), in [0, 2]
      (0 for any strictly monotone function of gt; 1 for a constant pred or gt).
    """
    p, g, w = _confident_pixels(pred, gt, confidence)
    if p.size < 2:
        raise ValueError("spearman_loss needs at least 2 pixels with confidence > 0")
    if p.max() == p.min() or g.max() == g.min():
        return 1.0  # a constant map has no ranking; raster order is not one
    rank_g = _ordinal_rank(g)
    rho = max(
        _weighted_pearson(_ordinal_rank(p), rank_g, w),
        _weighted_pearson(_ordinal_rank(-p), rank_g, w),
    )
    return 1.0 - rho


def defocus_metrics(pred, gt_defocus) -> dict[str, float]:
    """AIWE(1), AIWE(2) and Spearman loss against an 8-bit ground-truth defocus map.

    Args:
      pred: [H, W] predicted defocus (or any affine function of it).
      gt_defocus: [H, W] ground truth as stored (8-bit values; 0 = no ground truth).
        Confidence is (gt_defocus > 0); values are divided by 255 before scoring.

    Returns:
      {"aiwe1": float, "aiwe2": float, "spearman": float} (lower is better).
    """
    g = _as_finite("gt_defocus", gt_defocus, (2,))
    p = _as_finite("pred", pred, (2,))
    _same_shape(pred=p, gt_defocus=g)
    conf = (g > 0).astype(np.float64)
    if not np.any(conf):
        raise ValueError("gt_defocus has no pixel > 0: no ground truth to score against")
    g = g / 255.0  # 8-bit ground truth to [0, 1]
    return {
        "aiwe1": aiwe1(p, g, conf),
        "aiwe2": aiwe2(p, g, conf),
        "spearman": spearman_loss(p, g, conf),
    }


# -------------------------------------------------------------------- image metrics


def _image_pair(x, y, names=("x", "y")) -> tuple[np.ndarray, np.ndarray]:
    a = _as_finite(names[0], x, (2, 3))
    b = _as_finite(names[1], y, (2, 3))
    _same_shape(**{names[0]: a, names[1]: b})
    return a, b


def mae(x, y) -> float:
    """Mean absolute error.

    Args:
      x, y: [H, W] or [H, W, C] images of the same shape.
    """
    a, b = _image_pair(x, y)
    return float(np.mean(np.abs(a - b)))


def psnr(x, y, data_range: float = 1.0) -> float:
    """Peak signal-to-noise ratio 10 log10(data_range^2 / MSE) in dB; inf if equal.

    Args:
      x, y: [H, W] or [H, W, C] images of the same shape.
      data_range: the images' value range (1 for images in [0, 1]).
    """
    a, b = _image_pair(x, y)
    mse = float(np.mean((a - b) ** 2))
    if mse == 0.0:
        return float("inf")
    return float(10.0 * np.log10(data_range**2 / mse))


def _gaussian_taps() -> np.ndarray:
    """[11] normalised Gaussian taps, sigma 1.5, radius 5 (scipy.ndimage's kernel)."""
    t = np.arange(-_SSIM_RADIUS, _SSIM_RADIUS + 1, dtype=np.float64)
    taps = np.exp(-0.5 * (t / _SSIM_SIGMA) ** 2)
    return taps / taps.sum()


def _gaussian_blur(maps: np.ndarray) -> np.ndarray:
    """Separable Gaussian filter over the last two axes with 'reflect' borders.

    Args:
      maps: [..., H, W]. Borders extend half-sample symmetrically (d c b a | a b c d),
        numpy's 'symmetric' pad, which is scipy.ndimage's 'reflect' mode.
    """
    taps = _gaussian_taps()
    r = _SSIM_RADIUS
    out = maps
    for axis in (-2, -1):
        n = out.shape[axis]
        pad = [(0, 0)] * out.ndim
        pad[axis] = (r, r)
        padded = np.pad(out, pad, mode="symmetric")
        acc = np.zeros_like(out)
        for k, tap in enumerate(taps):
            acc += tap * np.take(padded, np.arange(k, k + n), axis=axis)
        out = acc
    return out


def ssim(x, y, data_range: float = 1.0) -> float:
    """Structural similarity (Wang et al. 2004), scikit-image's Gaussian variant.

    Args:
      x, y: [H, W] or [H, W, C] images of the same shape, H and W >= 11.
      data_range: the images' value range (1 for images in [0, 1]).

    Returns:
      Mean SSIM over the image less a 5-pixel border (and over channels).
    """
    a, b = _image_pair(x, y)
    if min(a.shape[:2]) < _SSIM_WIN:
        raise ValueError(f"ssim needs H, W >= {_SSIM_WIN}, got shape {a.shape}")
    if a.ndim == 2:
        a, b = a[None], b[None]
    else:
        a, b = np.moveaxis(a, -1, 0), np.moveaxis(b, -1, 0)  # [C, H, W]
    mu_a, mu_b, e_aa, e_bb, e_ab = _gaussian_blur(np.stack([a, b, a * a, b * b, a * b]))
    var_a = e_aa - mu_a * mu_a
    var_b = e_bb - mu_b * mu_b
    cov = e_ab - mu_a * mu_b
    c1 = (_SSIM_K1 * data_range) ** 2
    c2 = (_SSIM_K2 * data_range) ** 2
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / (
        (mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2)
    )  # [C, H, W]
    r = _SSIM_RADIUS
    return float(s[:, r:-r, r:-r].mean())


def _box_sums(table: np.ndarray, y0: np.ndarray, x0: np.ndarray, h: int, w: int) -> np.ndarray:
    """Sums of h x w boxes at top-left corners (y0, x0) from a zero-padded integral image."""
    return table[y0 + h, x0 + w] - table[y0, x0 + w] - table[y0 + h, x0] + table[y0, x0]


def _integral(img: np.ndarray) -> np.ndarray:
    """[H+1, W+1] summed-area table of an [H, W] image, with a leading zero row/column."""
    table = np.zeros((img.shape[0] + 1, img.shape[1] + 1))
    table[1:, 1:] = img.cumsum(0).cumsum(1)
    return table


def align_image(estimate, gt, max_shift: int = 6):
    """Translation search plus affine intensity fit of an estimate to the ground truth.

    The all-in-focus protocol of the module docstring: gt is divided by its maximum;
    every integer shift in [-max_shift, max_shift]^2 is scored by the MSE of a single
    least-squares fit gt ~ a est + b (shared by all channels) on the central region
    gt[m:H-m, m:W-m], m = max_shift; ties go to the shift nearest (0, 0).

    Args:
      estimate: [H, W] or [H, W, C] estimated sharp image (any intensity scale).
      gt: ground truth of the same shape, any positive scale (e.g. 16-bit values).
      max_shift: largest |dy|, |dx| searched, >= 0.

    Returns:
      aligned: [H-2m, W-2m(, C)] a * estimate[y+dy, x+dx] + b, not clipped.
      gt_region: [H-2m, W-2m(, C)] gt / max(gt) on the central region.
      shift: (dy, dx) ints; the estimate's content sits (dy, dx) below/right of gt's.
    """
    est, g = _image_pair(estimate, gt, names=("estimate", "gt"))
    m = int(max_shift)
    if m < 0:
        raise ValueError(f"max_shift must be >= 0, got {max_shift}")
    height, width = g.shape[:2]
    h, w = height - 2 * m, width - 2 * m
    if h < 1 or w < 1:
        raise ValueError(f"image {g.shape} too small for max_shift={m}")
    gmax = g.max()
    if gmax <= 0:
        raise ValueError("gt has no positive value: cannot divide it by its maximum")
    g = g / gmax
    grey = est.ndim == 2
    if grey:
        est, g = est[..., None], g[..., None]  # [H, W, C] from here on
    n = h * w * est.shape[2]

    region = g[m : m + h, m : m + w]  # [h, w, C], the same pixels for every shift
    g_mean = region.mean()
    g_var = ((region - g_mean) ** 2).mean()
    e = est - est.mean()  # centring keeps the E[e^2] - E[e]^2 variances accurate

    # Candidate shifts, nearest to (0, 0) first so that argmin breaks ties there.
    shifts = [(dy, dx) for dy in range(-m, m + 1) for dx in range(-m, m + 1)]
    shifts.sort(key=lambda s: (s[0] ** 2 + s[1] ** 2, s))
    dys = np.array([s[0] for s in shifts])
    dxs = np.array([s[1] for s in shifts])

    # Sums of e and e^2 over each shifted window in O(1) from integral images; the
    # cross term needs one dot product per shift.
    s_e = _box_sums(_integral(e.sum(-1)), m + dys, m + dxs, h, w)
    s_ee = _box_sums(_integral((e * e).sum(-1)), m + dys, m + dxs, h, w)
    s_eg = np.array(
        [
            np.einsum("ijc,ijc->", e[m + dy : m + dy + h, m + dx : m + dx + w], region)
            for dy, dx in shifts
        ]
    )
    mean_e = s_e / n
    var_e = s_ee / n - mean_e**2
    cov = s_eg / n - mean_e * g_mean
    with np.errstate(divide="ignore", invalid="ignore"):
        explained = np.where(var_e > 0, cov**2 / var_e, 0.0)
    mse = np.maximum(g_var - explained, 0.0)  # MSE of the best affine fit per shift
    best = int(np.argmin(mse))
    dy, dx = int(dys[best]), int(dxs[best])

    window = est[m + dy : m + dy + h, m + dx : m + dx + w]
    ones = np.ones(window.size)
    a, b = _weighted_affine_fit(window.ravel(), region.ravel(), ones)
    aligned = a * window + b
    if grey:
        aligned, region = aligned[..., 0], region[..., 0]
    return aligned, region, (dy, dx)


def image_metrics(estimate, gt, max_shift: int = 6) -> dict:
    """PSNR, SSIM and MAE of an all-in-focus estimate after `align_image`.

    Args:
      estimate: [H, W] or [H, W, C] estimated sharp image (any intensity scale).
      gt: ground truth of the same shape (any positive scale; divided by its max).
      max_shift: translation search radius in pixels.

    Returns:
      {"psnr": dB, "ssim": float, "mae": float, "shift": [dy, dx]}, data range 1.
    """
    aligned, region, (dy, dx) = align_image(estimate, gt, max_shift=max_shift)
    return {
        "psnr": psnr(aligned, region, data_range=1.0),
        "ssim": ssim(aligned, region, data_range=1.0),
        "mae": mae(aligned, region),
        "shift": [dy, dx],
    }
