"""Tests for dpjax.target_calib: kernels from a blurred/sharp target pair."""

import json
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

import dpjax
from dpjax import conv
from dpjax import io as io_lib
from dpjax import kernels as kl
from dpjax import target_calib as tc

ROOT = Path(__file__).resolve().parents[1]
PIXEL4_CALIB = ROOT.parent / "shared" / "data" / "pixel4" / "calibration"

GRID, TILE, K_FIT = (2, 3), 64, 21
MARGIN = 24
SHIFT = (2, -3)  # the sharp frame's content sits 2 px lower and 3 px left
GAIN, OFFSET = 0.8, 0.05  # sharp = GAIN * texture + OFFSET
NOISE = 1e-3


def noise_texture(rng, height, width, channels=1):
    """1/f noise (amplitude ~ 1/|f|): the spectrum of a printed noise target."""
    fy = np.fft.fftfreq(height)[:, None]
    fx = np.fft.rfftfreq(width)[None, :]
    f = np.hypot(fy, fx)
    f[0, 0] = 1.0
    amp = 1.0 / f
    amp[0, 0] = 0.0
    out = []
    for _ in range(channels):
        t = np.fft.irfft2(amp * np.exp(2j * np.pi * rng.uniform(size=amp.shape)),
                          s=(height, width))
        out.append(0.5 + 0.15 * t / t.std())
    return np.clip(np.stack(out, -1), 0.01, 0.98)


def true_kernels():
    """[2, 6, 17, 17]: six Pixel 4 calibration tiles at scale 1/4, each pair re-centred.

    Re-centring makes the mean of the pair centred, so the alignment target (the
    full-aperture image) is not displaced and the kernels are defined unambiguously.
    Falls back to parametric pairs of different radii when the data is absent.
    """
    if (PIXEL4_CALIB / "blur_kernels_left.npy").is_file():
        k = np.stack([np.load(PIXEL4_CALIB / f"blur_kernels_{v}.npy")
                      for v in ("left", "right")])[:, [0, 3, 7, 40, 44, 47]]
        out = 2 * kl.rescaled_radius(61, 0.25) + 1
        k = np.asarray(kl.rescale_kernels(jnp.asarray(k), jnp.asarray([0.25]), out)[0])
    else:
        k = np.stack([dpjax.parametric_dp_kernels(radius=r, ramp=0.5, smooth_sigma=0.7,
                                                  size=17) for r in (4, 5, 6, 5, 4.5, 6.5)],
                     axis=1)
    return kl.recenter_kernel_pairs(k)


def render(texture, kernels):
    """Blur the frame region of `texture` ([H + 2M, W + 2M, C]) through per-tile kernels.

    Uses dpjax.conv (the renderer of the solver) with the true surroundings as padding,
    so every output pixel is exact. Returns [2, H, W, C].
    """
    r = kernels.shape[-1] // 2
    grid = kl.TileGrid(rows=GRID[0], cols=GRID[1], tile_h=TILE, tile_w=TILE)
    geom = conv.ConvGeometry.create(grid, r)
    h, w = grid.image_shape
    xp = texture[MARGIN - r:MARGIN + h + r, MARGIN - r:MARGIN + w + r]
    xp = jnp.asarray(np.moveaxis(xp, -1, 0), jnp.float32)
    spec = conv.tile_spectra(xp, geom)
    views = [conv.apply_spectra(spec, conv.kernel_spectra(jnp.asarray(kernels[v]), geom)[None],
                                geom) for v in range(2)]
    return np.moveaxis(np.asarray(views, np.float64), 1, -1)


def pad_to(kernels, size):
    p = (size - kernels.shape[-1]) // 2
    return np.pad(kernels, ((0, 0), (0, 0), (p, p), (p, p)))


@pytest.fixture(scope="module")
def scene():
    rng = np.random.default_rng(0)
    h, w = GRID[0] * TILE, GRID[1] * TILE
    texture = noise_texture(rng, h + 2 * MARGIN, w + 2 * MARGIN)
    kernels = true_kernels()
    blurred = render(texture, kernels) + rng.normal(0, NOISE, (2, h, w, 1))
    dy, dx = SHIFT
    sharp = GAIN * texture[MARGIN - dy:MARGIN - dy + h, MARGIN - dx:MARGIN - dx + w] + OFFSET
    return {"texture": texture, "kernels": kernels, "blurred": blurred, "sharp": sharp}


@pytest.fixture(scope="module")
def fit(scene):
    cfg = tc.KernelFitConfig(kernel_size=K_FIT)
    return tc.estimate_tile_kernels(scene["blurred"], scene["sharp"], grid=GRID, tile=TILE,
                                    config=cfg)


def kernel_errors(estimate, truth):
    """Per-kernel L1 error and centroid error (px), on a common centred window."""
    size = max(estimate.shape[-1], truth.shape[-1])
    estimate, truth = pad_to(estimate, size), pad_to(truth, size)
    l1 = np.abs(estimate - truth).sum(axis=(-2, -1))
    se, st = tc.kernel_stats(estimate), tc.kernel_stats(truth)
    cerr = np.hypot(se["centroid_y"] - st["centroid_y"], se["centroid_x"] - st["centroid_x"])
    return l1, cerr


# ----------------------------------------------------------------------------------------
# Helpers


def test_project_simplex_kkt():
    rng = np.random.default_rng(1)
    for scale in (0.01, 1.0, 10.0):
        v = rng.normal(size=(5, 5)) * scale
        x = np.asarray(tc.project_simplex(jnp.asarray(v)), np.float64)
        assert x.min() >= 0 and abs(x.sum() - 1) < 1e-5
        # KKT: v - x is one constant theta on the support and v <= theta off it.
        theta = (v - x)[x > 0]
        assert np.ptp(theta) < 1e-5 * max(1.0, scale)
        assert np.all(v[x == 0] <= theta.mean() + 1e-5 * max(1.0, scale))
    inside = np.full((3, 3), 1 / 9)
    np.testing.assert_allclose(tc.project_simplex(jnp.asarray(inside)), inside, atol=1e-7)


def test_shift_image_integer_is_exact():
    rng = np.random.default_rng(2)
    img = rng.uniform(size=(40, 50, 2))
    out = tc.shift_image(img, 3, -2)
    np.testing.assert_allclose(out[5:30, 5:40], img[8:33, 3:38], atol=1e-9)


def test_kernel_stats_and_crop_keep_position():
    k = np.zeros((1, 1, 15, 15))
    k[0, 0, 7 + 2, 7 - 3] = 1.0  # a delta 2 px below and 3 px left of the centre
    st = tc.kernel_stats(k)
    assert (st["centroid_y"][0, 0], st["centroid_x"][0, 0]) == (2.0, -3.0)
    assert st["width"][0, 0] == 1 and st["radius"][0, 0] == 0.0
    cropped = tc.crop_kernels(k, mass=0.999)
    assert cropped.shape[-1] == 7  # the smallest centred window that holds (2, -3)
    st2 = tc.kernel_stats(cropped)
    assert (st2["centroid_y"][0, 0], st2["centroid_x"][0, 0]) == (2.0, -3.0)


# ----------------------------------------------------------------------------------------
# Alignment


def test_align_finds_integer_shift_and_gain(scene):
    al = tc.align_sharp(scene["sharp"], scene["blurred"].mean(0), max_shift=6)
    assert al.integer_shift == SHIFT
    assert np.hypot(al.shift[0] - SHIFT[0], al.shift[1] - SHIFT[1]) < 0.1
    # blurred ~ gain * sharp + offset inverts the synthetic 0.8 x + 0.05.
    assert abs(al.gain[0] - 1 / GAIN) < 0.05 / GAIN
    assert not al.at_search_edge and al.correlation > 0.9


def test_align_finds_subpixel_shift(scene):
    # out[y, x] = sharp[y - 0.4, x + 0.3]: content 0.4 px lower, 0.3 px further left.
    sharp = tc.shift_image(scene["sharp"], -0.4, 0.3)
    al = tc.align_sharp(sharp, scene["blurred"].mean(0), max_shift=6)
    assert np.hypot(al.shift[0] - 2.4, al.shift[1] + 3.3) < 0.1


def test_align_reports_search_edge(scene):
    al = tc.align_sharp(scene["sharp"], scene["blurred"].mean(0), max_shift=2)
    assert al.at_search_edge


# ----------------------------------------------------------------------------------------
# Kernel estimation


def test_recovers_known_kernels(scene, fit):
    assert fit.kernels.shape == (2, GRID[0] * GRID[1], K_FIT, K_FIT)
    assert fit.alignment.integer_shift == SHIFT
    l1, cerr = kernel_errors(fit.kernels, scene["kernels"])
    # Noise-free this reaches L1 ~ 0.01; with noise 1e-3 (texture std 0.15) ~ 0.03.
    assert l1.max() < 0.08, l1
    assert cerr.max() < 0.05, cerr
    assert fit.converged.all()
    # The remaining global gain (alignment's fit on low-passed images is biased low)
    # is taken up per tile: 1 / 0.8 overall.
    np.testing.assert_allclose(fit.gain * fit.alignment.gain[0], 1 / GAIN, rtol=0.02)
    assert np.all(fit.psnr_reblur > fit.psnr_identity + 20)
    assert np.all(fit.residual_rms < 2 * NOISE)


def test_kernels_are_nonnegative_with_unit_sum(fit):
    assert fit.kernels.dtype == np.float32
    assert fit.kernels.min() >= 0.0
    np.testing.assert_allclose(fit.kernels.sum(axis=(-2, -1)), 1.0, atol=1e-6)


def test_unit_sum_mode_recovers_kernels(scene):
    # Projected onto the simplex with the alignment's gain: exact sums, slightly worse
    # kernels because that gain is biased (see test_recovers_known_kernels).
    al = tc.align_sharp(scene["sharp"], scene["blurred"].mean(0), max_shift=6)
    al = al._replace(gain=np.array([1 / GAIN]), offset=np.array([-OFFSET / GAIN]))
    cfg = tc.KernelFitConfig(kernel_size=K_FIT, per_tile_gain=False)
    fit = tc.estimate_tile_kernels(scene["blurred"], scene["sharp"], grid=GRID, tile=TILE,
                                   config=cfg, alignment=al)
    np.testing.assert_allclose(fit.gain, 1.0, atol=1e-5)  # the simplex fixes the sum
    assert fit.kernels.min() >= 0
    np.testing.assert_allclose(fit.kernels.sum(axis=(-2, -1)), 1.0, atol=1e-6)
    l1, _ = kernel_errors(fit.kernels, scene["kernels"])
    assert l1.max() < 0.08, l1


def test_mismatched_sizes_are_refused(scene):
    with pytest.raises(ValueError, match="differ in shape"):
        tc.estimate_tile_kernels(scene["blurred"], scene["sharp"][:-1], grid=GRID, tile=TILE)
    with pytest.raises(ValueError, match="differ in shape"):
        tc.align_sharp(scene["sharp"][:, :-2], scene["blurred"][0])
    with pytest.raises(ValueError, match="does not fit"):
        tc.estimate_tile_kernels(scene["blurred"], scene["sharp"], grid=(3, 3), tile=TILE)
    with pytest.raises(ValueError, match="odd"):
        tc.estimate_tile_kernels(scene["blurred"], scene["sharp"], grid=GRID, tile=TILE,
                                 config=tc.KernelFitConfig(kernel_size=20))


def test_fully_clipped_tile_is_refused(scene):
    blurred = scene["blurred"].copy()
    blurred[:, :TILE, :TILE] = 1.0  # tile 0 saturated in both views
    with pytest.raises(ValueError, match=r"tiles \[0\] have no usable pixel"):
        tc.estimate_tile_kernels(blurred, scene["sharp"], grid=GRID, tile=TILE,
                                 config=tc.KernelFitConfig(kernel_size=K_FIT, max_iters=1))


def test_write_calibration_round_trip(fit, tmp_path):
    saved = tc.write_target_calibration(tmp_path, fit, crop_mass=0.99,
                                        extra_meta={"note": "test"})
    assert saved.shape[-1] < K_FIT and saved.shape[-1] % 2 == 1
    calib = io_lib.load_calibration_kernels(tmp_path)
    assert calib.grid == GRID and calib.tile_size == TILE
    np.testing.assert_allclose(calib.kernels, saved, atol=1e-7)
    meta = json.loads((tmp_path / "kernels_meta.json").read_text())
    assert meta["method"] == tc.METHOD_NAME and meta["note"] == "test"
    assert meta["kernel_size_estimated"] == K_FIT
    assert len(meta["fit"]["residual_rms"]) == 2
    # Cropping keeps each kernel where it was.
    before, after = tc.kernel_stats(fit.kernels), tc.kernel_stats(saved)
    np.testing.assert_allclose(after["centroid_x"], before["centroid_x"], atol=0.05)
    with pytest.raises(ValueError, match="redefine"):
        tc.write_target_calibration(tmp_path, fit, extra_meta={"grid": [1, 1]})


def test_kernel_montage_layout(fit):
    img = tc.kernel_montage(fit.kernels, GRID, zoom=2)
    side = K_FIT * 2
    assert img.dtype == np.uint8 and img.shape == (2 * side + 3 * 4, 3 * (2 * side + 1) + 4 * 4, 3)


# ----------------------------------------------------------------------------------------
# Command line


def _write_png(path, linear):
    """8-bit sRGB PNG of a linear [H, W, 1] image (grey stored as RGB)."""
    v = np.clip(linear, 0, 1)
    enc = np.where(v > 0.0031308, 1.055 * v ** (1 / 2.4) - 0.055, 12.92 * v)
    Image.fromarray(np.round(np.repeat(enc, 3, -1) * 255).astype(np.uint8)).save(path)


def _run_cli(*args):
    cmd = [sys.executable, str(ROOT / "experiments" / "calibrate_target.py"), *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)


def test_cli_end_to_end_and_bad_size(scene, tmp_path):
    blurred_dir, sharp_dir, out = tmp_path / "f4", tmp_path / "f20", tmp_path / "calib"
    blurred_dir.mkdir()
    sharp_dir.mkdir()
    for v, name in enumerate(("l.png", "r.png")):
        _write_png(blurred_dir / name, scene["blurred"][v])
        _write_png(sharp_dir / name, scene["sharp"])
    proc = _run_cli(f"--blurred_dir={blurred_dir}", f"--sharp_dir={sharp_dir}",
                    f"--output_dir={out}", "--grid=2x3", "--kernel_size=15",
                    "--smooth_candidates=1e-3,1e-1",
                    f"--montage={tmp_path / 'k.png'}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    calib = io_lib.load_calibration_kernels(out)
    assert calib.grid == GRID and calib.tile_size == TILE
    l1, _ = kernel_errors(calib.kernels, scene["kernels"])
    assert l1.mean() < 0.25, l1  # 8-bit quantisation of the inputs costs accuracy
    meta = json.loads((out / "kernels_meta.json").read_text())
    assert meta["input_encoding"] == ["srgb"]
    assert set(meta["smooth_weight_heldout_psnr"]) == {"0.001", "0.1"}
    assert meta["options"]["smooth_weight"] in (1e-3, 1e-1)
    assert (tmp_path / "k.png").is_file()

    Image.fromarray(np.zeros((10, 12, 3), np.uint8)).save(sharp_dir / "r.png")
    proc = _run_cli(f"--blurred_dir={blurred_dir}", f"--sharp_dir={sharp_dir}",
                    f"--output_dir={tmp_path / 'bad'}")
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert "differ in size" in lines[-1] and "10x12x3" in lines[-1]
    assert not (tmp_path / "bad").exists()


def test_core_support_drops_isolated_specks():
    k = np.zeros((9, 9))
    k[3:6, 3:6] = 1.0  # the kernel
    k[4, 6] = 0.05  # a faint tail touching it: kept
    k[0, 8] = 0.5  # an isolated speck: dropped
    support = tc._core_support(k[None], 0.02, 1)[0]
    assert support[4, 6] == 1 and support[0, 8] == 0
    # Grown by 1 px: the block becomes 5x5, the tail adds 3 pixels in column 7.
    assert support[2:7, 2:7].all() and support[3:6, 7].all() and support.sum() == 28


def test_pruned_fit_is_zero_outside_the_core(scene):
    cfg = tc.KernelFitConfig(kernel_size=K_FIT, prune_threshold=0.02)
    fit = tc.estimate_tile_kernels(scene["blurred"], scene["sharp"], grid=GRID, tile=TILE,
                                   config=cfg)
    assert fit.kernels.min() >= 0
    np.testing.assert_allclose(fit.kernels.sum(axis=(-2, -1)), 1.0, atol=1e-6)
    assert tc.kernel_stats(fit.kernels)["border_mass"].max() == 0.0
    l1, _ = kernel_errors(fit.kernels, scene["kernels"])
    assert l1.max() < 0.1, l1
