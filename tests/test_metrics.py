"""Tests for dpjax.metrics: invariants, robustness, and agreement with scikit-image."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dpjax import metrics

skmetrics = pytest.importorskip("skimage.metrics")

PIXEL4 = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "pixel4"


def _smooth(rng: np.random.Generator, shape: tuple[int, ...], passes: int = 4) -> np.ndarray:
    """Smooth random texture in [0, 1]: box-blurred noise (spatial axes 0 and 1)."""
    z = rng.random(shape)
    for _ in range(passes):
        z = (z + np.roll(z, 1, 0) + np.roll(z, -1, 0)) / 3
        z = (z + np.roll(z, 1, 1) + np.roll(z, -1, 1)) / 3
    return (z - z.min()) / (z.max() - z.min())


def _defocus_case(seed: int = 0, shape=(32, 40)):
    """Continuous gt, confidence in [0, 1] with ~25% zeros, and a noisy prediction."""
    rng = np.random.default_rng(seed)
    gt = _smooth(rng, shape) * 10 + 1
    conf = rng.random(shape)
    conf[rng.random(shape) < 0.25] = 0.0
    pred = 0.3 * gt - 2 + 0.05 * rng.standard_normal(shape)
    return pred, gt, conf


def _all_defocus(pred, gt, conf):
    return np.array(
        [metrics.aiwe1(pred, gt, conf), metrics.aiwe2(pred, gt, conf),
         metrics.spearman_loss(pred, gt, conf)]
    )


# ------------------------------------------------------------------ defocus metrics


@pytest.mark.parametrize("a, b", [(2.5, 3.0), (-0.7, 40.0), (1e-3, -5.0)])
def test_affine_copy_of_gt_scores_zero(a, b):
    _, gt, conf = _defocus_case()
    scores = _all_defocus(a * gt + b, gt, conf)
    np.testing.assert_allclose(scores, 0.0, atol=1e-9)


@pytest.mark.parametrize("a", [3.0, -3.0])
def test_affine_copy_of_tied_8bit_gt_scores_zero(a):
    # Heavy ties (8-bit values): a negated copy still scores 0 on Spearman.
    rng = np.random.default_rng(3)
    gt = np.round(_smooth(rng, (40, 48)) * 200 + 20)
    scores = metrics.defocus_metrics(a * gt + 7, gt)
    np.testing.assert_allclose(list(scores.values()), 0.0, atol=1e-9)


def test_zero_confidence_pixels_are_ignored():
    pred, gt, conf = _defocus_case(seed=1)
    ref = _all_defocus(pred, gt, conf)
    rng = np.random.default_rng(7)
    off = conf == 0
    pred2, gt2 = pred.copy(), gt.copy()
    pred2[off] = rng.standard_normal(off.sum()) * 1e8
    gt2[off] = -rng.random(off.sum()) * 1e9
    np.testing.assert_allclose(_all_defocus(pred2, gt2, conf), ref, rtol=1e-12, atol=0)


def test_confidence_weights_matter():
    pred, gt, conf = _defocus_case(seed=2)
    uniform = (conf > 0).astype(float)
    assert metrics.aiwe2(pred, gt, conf) != pytest.approx(metrics.aiwe2(pred, gt, uniform))


def test_aiwe1_is_robust_to_outliers():
    pred, gt, conf = _defocus_case(seed=4, shape=(40, 40))
    clean = _all_defocus(pred, gt, conf)
    rng = np.random.default_rng(5)
    bad = rng.random(pred.shape) < 0.01  # ~16 pixels moved by the whole pred range
    pred_out = pred.copy()
    pred_out[bad] += rng.choice([-1.0, 1.0], bad.sum()) * 3
    dirty = _all_defocus(pred_out, gt, conf)
    relative = (dirty - clean) / clean
    assert 0 < relative[0] < 0.3 * relative[1]
    # IRLS stays near the true line: close to the L1 error under the generating
    # map gt = (pred + 2) / 0.3, far below that of the least-squares line it starts
    # from (5 iterations from a pulled start are not fully converged).
    def l1(a, b):
        return float((conf * np.abs(a * pred_out + b - gt)).sum() / conf.sum())

    keep = conf > 0
    ls = np.polyfit(pred_out[keep], gt[keep], 1, w=np.sqrt(conf[keep]))
    assert dirty[0] <= 1.1 * l1(1 / 0.3, 2 / 0.3) < 1.1 * 0.75 * l1(*ls)


def _brute_force_l1(p, g, w):
    """Exact min over (a, b) of sum w |g - a p - b| / sum w.

    A weighted L1 line fit is a linear program whose optimum is attained at a
    vertex, i.e. a line through two of the data points; try them all.
    """
    best = np.inf
    for i, j in itertools.combinations(range(p.size), 2):
        if p[i] == p[j]:
            continue
        a = (g[j] - g[i]) / (p[j] - p[i])
        b = g[i] - a * p[i]
        best = min(best, float((w * np.abs(a * p + b - g)).sum() / w.sum()))
    return best


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_aiwe1_irls_is_close_to_exact_l1_fit(seed):
    rng = np.random.default_rng(seed)
    n = 40
    p = rng.random(n)
    g = 3 * p + 1 + 0.05 * rng.standard_normal(n)
    out = rng.choice(n, 4, replace=False)
    g[out] += rng.choice([-1.0, 1.0], 4) * 5
    w = rng.uniform(0.5, 1.5, n)
    exact = _brute_force_l1(p, g, w)
    irls = metrics.aiwe1(p.reshape(5, 8), g.reshape(5, 8), w.reshape(5, 8))
    # L1 error of the least-squares line (IRLS's starting point), for contrast.
    a, b = np.polyfit(p, g, 1, w=np.sqrt(w))
    ls_l1 = float((w * np.abs(a * p + b - g)).sum() / w.sum())
    assert exact - 1e-12 <= irls <= 1.02 * exact
    assert irls < ls_l1


def test_spearman_detects_rank_errors_and_constant_maps():
    pred, gt, conf = _defocus_case(seed=6)
    assert 0 < metrics.spearman_loss(pred, gt, conf) < 0.05
    # Monotone but non-affine: Spearman 0, the AIWEs not.
    assert metrics.spearman_loss(np.exp(gt), gt, conf) == pytest.approx(0.0, abs=1e-12)
    assert metrics.aiwe2(np.exp(gt), gt, conf) > 0.1
    assert metrics.spearman_loss(np.ones_like(gt), gt, conf) == 1.0
    shuffled = np.random.default_rng(0).permutation(gt.ravel()).reshape(gt.shape)
    assert metrics.spearman_loss(shuffled, gt, conf) > 0.7


def test_defocus_metrics_keys_and_confidence_from_gt():
    rng = np.random.default_rng(8)
    gt = np.round(_smooth(rng, (30, 36)) * 250).astype(np.uint8)
    gt[:5] = 0
    pred = gt + rng.standard_normal(gt.shape)
    out = metrics.defocus_metrics(pred, gt)
    assert set(out) == {"aiwe1", "aiwe2", "spearman"}
    conf = (gt > 0).astype(float)
    # The 8-bit ground truth is scored in units of its full range (divided by 255).
    assert out["aiwe2"] == pytest.approx(metrics.aiwe2(pred, gt / 255.0, conf))
    assert out["aiwe1"] == pytest.approx(metrics.aiwe1(pred, gt / 255.0, conf))


@pytest.mark.skipif(not PIXEL4.exists(), reason="shared Pixel 4 data not present")
def test_pixel4_defocus_gt_against_itself():
    gt = np.array(Image.open(PIXEL4 / "gt_defocus_map" / "001_gt.png"))
    assert gt.dtype == np.uint8 and gt.shape == (1008, 1344)
    gt = gt.astype(np.float64)
    same = metrics.defocus_metrics(gt, gt)
    np.testing.assert_allclose(list(same.values()), 0.0, atol=1e-9)
    noisy = gt + np.random.default_rng(0).normal(0, 10, gt.shape)
    worse = metrics.defocus_metrics(noisy, gt)
    assert all(v > 1e-3 for v in worse.values())


# -------------------------------------------------------------------- image metrics


def _skimage_ssim(x, y, data_range=1.0):
    return skmetrics.structural_similarity(
        x, y, data_range=data_range, gaussian_weights=True, sigma=1.5,
        use_sample_covariance=False, channel_axis=-1 if x.ndim == 3 else None,
    )


@pytest.mark.parametrize("shape", [(48, 64), (33, 50, 3), (11, 11)])
@pytest.mark.parametrize("kind", ["random", "smooth"])
def test_ssim_matches_skimage(shape, kind):
    rng = np.random.default_rng(sum(shape))
    x = rng.random(shape) if kind == "random" else _smooth(rng, shape)
    y = np.clip(0.9 * x + 0.05 + 0.08 * rng.standard_normal(shape), 0, 1)
    assert metrics.ssim(x, y) == pytest.approx(_skimage_ssim(x, y), abs=1e-6)
    assert metrics.ssim(x, x) == pytest.approx(1.0, abs=1e-12)


def test_ssim_data_range_matches_skimage():
    rng = np.random.default_rng(9)
    x = _smooth(rng, (40, 40)) * 255
    y = x + 10 * rng.standard_normal(x.shape)
    got = metrics.ssim(x, y, data_range=255.0)
    assert got == pytest.approx(_skimage_ssim(x, y, data_range=255.0), abs=1e-6)


def test_psnr_and_mae_match_references():
    rng = np.random.default_rng(10)
    x = rng.random((20, 30, 3))
    y = np.clip(x + 0.03 * rng.standard_normal(x.shape), 0, 1)
    ref = skmetrics.peak_signal_noise_ratio(x, y, data_range=1.0)
    assert metrics.psnr(x, y) == pytest.approx(ref, rel=1e-12)
    assert metrics.psnr(2 * x, 2 * y, data_range=2.0) == pytest.approx(ref, rel=1e-12)
    assert metrics.psnr(x, x) == float("inf")
    assert metrics.mae(x, y) == pytest.approx(np.mean(np.abs(x - y)), rel=1e-12)


@pytest.mark.parametrize("channels", [None, 3])
@pytest.mark.parametrize("shift", [(2, -3), (0, 0), (-6, 5)])
def test_align_image_recovers_shift_and_affine(channels, shift):
    rng = np.random.default_rng(11)
    shape = (72, 90) if channels is None else (72, 90, channels)
    gt = _smooth(rng, shape, passes=2)
    gt16 = 1000 + 40000 * gt  # a 16-bit-like scale: divided by its max internally
    estimate = 0.37 * np.roll(gt, shift, axis=(0, 1)) + 0.12
    aligned, region, got = metrics.align_image(estimate, gt16)
    assert got == shift
    m = 6
    assert region.shape == aligned.shape == (60, 78) + shape[2:]
    np.testing.assert_allclose(region, gt16[m:-m, m:-m] / gt16.max(), atol=1e-12)
    np.testing.assert_allclose(aligned, region, atol=1e-9)


def test_image_metrics_of_shifted_scaled_copy():
    rng = np.random.default_rng(12)
    gt = _smooth(rng, (64, 80), passes=2)
    estimate = 3.0 * np.roll(gt, (2, -3), axis=(0, 1)) - 0.4
    out = metrics.image_metrics(estimate, gt * 65535)
    assert out["shift"] == [2, -3]
    assert out["psnr"] > 60
    assert out["ssim"] == pytest.approx(1.0, abs=1e-6)
    assert out["mae"] < 1e-6
    # Beyond the search radius the alignment cannot succeed.
    far = metrics.image_metrics(np.roll(gt, (9, 0), axis=(0, 1)), gt)
    assert far["psnr"] < 40


@pytest.mark.skipif(not (PIXEL4 / "gt_all_in_focus_im").exists(), reason="no Pixel 4 data")
def test_pixel4_input_alignment_matches_readme():
    # README: scene 001's ground truth sits 0 rows, 2 columns off the views' crop.
    def load(name):
        return np.array(Image.open(PIXEL4 / name)).astype(np.float64)

    views = load("001_left.png") + load("001_right.png") - 2048
    top, left = (1512 - 1008) // 2, (2016 - 1344) // 2
    crop = views[top : top + 1008, left : left + 1344]
    out = metrics.image_metrics(crop, load("gt_all_in_focus_im/001_gt.png"))
    assert out["shift"] == [0, 2]
    assert 20 < out["psnr"] < 35


# ----------------------------------------------------------------------- bad input


def test_bad_defocus_input_raises():
    pred, gt, conf = _defocus_case()
    with pytest.raises(ValueError, match="shape mismatch"):
        metrics.aiwe1(pred[:-1], gt, conf)
    with pytest.raises(ValueError, match="shape mismatch"):
        metrics.defocus_metrics(pred, gt[:, :-1])
    nan_pred = pred.copy()
    nan_pred[3, 4] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        metrics.defocus_metrics(nan_pred, gt)
    inf_gt = gt.copy()
    inf_gt[0, 0] = np.inf
    with pytest.raises(ValueError, match="NaN/Inf"):
        metrics.spearman_loss(pred, inf_gt, conf)
    with pytest.raises(ValueError, match="2-D"):
        metrics.aiwe2(pred[..., None], gt[..., None], conf[..., None])
    with pytest.raises(ValueError, match=">= 0"):
        metrics.aiwe2(pred, gt, -conf)
    with pytest.raises(ValueError, match="confidence > 0"):
        metrics.aiwe1(pred, gt, np.zeros_like(conf))
    with pytest.raises(ValueError, match="no pixel > 0"):
        metrics.defocus_metrics(pred, np.zeros_like(gt))


def test_bad_image_input_raises():
    rng = np.random.default_rng(13)
    x = rng.random((32, 32))
    with pytest.raises(ValueError, match="shape mismatch"):
        metrics.ssim(x, x[:-1])
    with pytest.raises(ValueError, match="shape mismatch"):
        metrics.image_metrics(x, np.stack([x] * 3, -1))
    with pytest.raises(ValueError, match="2-D or 3-D"):
        metrics.psnr(x.ravel(), x.ravel())
    y = x.copy()
    y[1, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        metrics.image_metrics(y, x)
    with pytest.raises(ValueError, match="NaN"):
        metrics.mae(x, y)
    with pytest.raises(ValueError, match="H, W >= 11"):
        metrics.ssim(x[:10], x[:10])
    with pytest.raises(ValueError, match="too small"):
        metrics.align_image(x, x, max_shift=16)
    with pytest.raises(ValueError, match="max_shift"):
        metrics.align_image(x, x, max_shift=-1)
    with pytest.raises(ValueError, match="positive"):
        metrics.align_image(x, -x)
