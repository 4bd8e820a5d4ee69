import jax.numpy as jnp
import numpy as np
import pytest

import dpjax
from dpjax import kernels


def _random_kernel(rng, k=15):
    x = rng.random((k, k)).astype(np.float32) ** 3
    return x / x.sum()


def test_rescale_identity_at_one():
    rng = np.random.default_rng(0)
    k = _random_kernel(rng)
    out = kernels.rescale_kernel(jnp.asarray(k), jnp.float32(1.0), 15)
    np.testing.assert_allclose(np.asarray(out), k, atol=1e-6)


@pytest.mark.parametrize("scale", [0.3, 0.5, 0.77, 1.0, 1.3, 1.6, -0.4, -1.2])
def test_rescale_preserves_sum(scale):
    rng = np.random.default_rng(1)
    k = _random_kernel(rng) * 0.8  # sum 0.8
    size = 2 * kernels.rescaled_radius(15, abs(scale)) + 1
    out = np.asarray(kernels.rescale_kernel(jnp.asarray(k), jnp.float32(scale), size))
    assert out.shape == (size, size)
    np.testing.assert_allclose(out.sum(), 0.8, rtol=1e-5)
    assert out.min() >= 0


@pytest.mark.parametrize("scale", [0.4, 1.0, 1.5])
def test_negative_scale_is_rotation(scale):
    rng = np.random.default_rng(2)
    k = jnp.asarray(_random_kernel(rng))
    size = 2 * kernels.rescaled_radius(15, scale) + 1
    pos = np.asarray(kernels.rescale_kernel(k, jnp.float32(scale), size))
    neg = np.asarray(kernels.rescale_kernel(k, jnp.float32(-scale), size))
    np.testing.assert_allclose(neg, np.rot90(pos, 2), atol=1e-7)


@pytest.mark.parametrize("scale", [1.6, -1.3])
def test_rescale_into_smaller_window_is_renormalised_centre_crop(scale):
    rng = np.random.default_rng(4)
    k = jnp.asarray(_random_kernel(rng) * 0.9)
    full = 2 * kernels.rescaled_radius(15, abs(scale)) + 1
    whole = np.asarray(kernels.rescale_kernel(k, jnp.float32(scale), full))
    lo = (full - 15) // 2
    centre = whole[lo:lo + 15, lo:lo + 15]
    cropped = np.asarray(kernels.rescale_kernel(k, jnp.float32(scale), 15))
    assert centre.sum() < 0.9 * 0.999  # the rim held mass: this is a real crop
    np.testing.assert_allclose(cropped, centre * (0.9 / centre.sum()), rtol=1e-4, atol=1e-7)


def test_support_radius_holds_all_but_the_cut_of_every_kernel():
    k = np.zeros((2, 3, 21, 21), np.float32)
    k[..., 8:13, 8:13] = 1.0  # 25 units within radius 2
    k[0, 1, 10, 17] = 0.5  # one kernel has 2% of its mass at radius 7
    assert kernels.support_radius(k, 0.0) == 10  # the whole window
    assert kernels.support_radius(k, 0.05) == 2
    assert kernels.support_radius(k, 0.01) == 7  # every kernel counts
    assert kernels.support_radius(k[:, ::2], 0.01) == 2


def test_layer_kernel_radius_follows_the_support():
    assert kernels.layer_kernel_radius(61, 1.5) == kernels.rescaled_radius(61, 1.5) == 46
    assert kernels.layer_kernel_radius(61, 1.5, 30) == 46  # the whole window: no cut
    assert kernels.layer_kernel_radius(61, 1.5, 20) == kernels.rescaled_radius(41, 1.5) == 31
    assert kernels.layer_kernel_radius(61, 0.5, 20) == kernels.rescaled_radius(41, 0.5)


def _area_reference(k, scale, out_size, sub=20):
    """Brute-force area integration: supersample the kernel as a box function."""
    kk = k.shape[0]
    fine = np.kron(k, np.ones((sub, sub))) / sub**2  # mass per fine cell
    # Fine cell centres in kernel pixel units, centred.
    c = (np.arange(kk * sub) + 0.5) / sub - kk / 2
    y = c * scale  # scaled positions of the mass
    idx = np.floor(y + out_size / 2).astype(int)  # output pixel containing each fine cell
    out = np.zeros((out_size, out_size))
    valid = (idx >= 0) & (idx < out_size)
    iy = idx[valid]
    f = fine[np.ix_(valid, valid)]
    np.add.at(out, (iy[:, None], iy[None, :]), f)
    return out / out.sum() * k.sum()


def test_shrink_by_two_matches_area_downsampling():
    rng = np.random.default_rng(3)
    # A smooth kernel, as real blur kernels are.
    y, x = np.mgrid[-7:8, -7:8]
    k = np.exp(-((x - 1.5) ** 2 + (y + 0.5) ** 2) / 12.0) * (1 + 0.3 * rng.random((15, 15)))
    k = (k / k.sum()).astype(np.float32)
    size = 2 * kernels.rescaled_radius(15, 0.5) + 1
    ours = np.asarray(kernels.rescale_kernel(jnp.asarray(k), jnp.float32(0.5), size))
    ref = _area_reference(k.astype(np.float64), 0.5, size)
    np.testing.assert_allclose(ours, ref, atol=2e-3 * ref.max())


def test_kernel_bank_validation():
    pair = dpjax.parametric_dp_kernels(radius=3.0)
    good = np.repeat(pair[:, None], 4, axis=1)
    bank = dpjax.KernelBank.create(good, rows=2, cols=2, tile_h=16)
    assert bank.grid.image_shape == (32, 32)
    with pytest.raises(ValueError, match="tile grid"):
        dpjax.KernelBank.create(good, rows=3, cols=2, tile_h=16)
    bad = good.copy()
    bad[0, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        dpjax.KernelBank.create(bad, rows=2, cols=2, tile_h=16)
    with pytest.raises(ValueError, match="odd"):
        dpjax.KernelBank.create(good[..., :-1, :-1], rows=2, cols=2, tile_h=16)


def test_parametric_pair_is_mirrored_half_aperture():
    left, right = dpjax.parametric_dp_kernels(radius=6.0, ramp=0.5)
    np.testing.assert_allclose(right, left[:, ::-1])
    np.testing.assert_allclose(left.sum(), 1.0, rtol=1e-6)
    k = left.shape[0]
    x = np.arange(k) - (k - 1) / 2
    cx = (left.sum(axis=0) * x).sum()
    assert cx < -1.5  # the left view's mass sits on the left half


def test_recenter_centres_mean_kernel():
    pair = dpjax.parametric_dp_kernels(radius=5.0, size=21)
    shifted = np.stack([np.roll(pair[v], (1, -2), axis=(0, 1)) for v in range(2)])[:, None]
    out = dpjax.recenter_kernel_pairs(shifted)
    mean = out.mean(axis=0)[0]
    x = np.arange(21) - 10
    assert abs((mean.sum(axis=0) * x).sum()) < 0.05
    assert abs((mean.sum(axis=1) * x).sum()) < 0.05
    np.testing.assert_allclose(out.sum(axis=(2, 3)), 1.0, rtol=1e-5)


def test_render_kernel_pairs_in_chunks_matches_one_pass(monkeypatch):
    """Large grids are rendered in chunks of tiles (bounded memory): same kernels."""
    from dpjax import kernel_model

    model = kernel_model.DpKernelModel(radius=4.0, split_gradient=0.3, angle_deg=20.0)
    whole = kernel_model.render_kernel_pairs(model, rows=3, cols=5)
    size = model.default_size()
    monkeypatch.setattr(kernel_model, "_RENDER_CHUNK_SAMPLES", 4 * (size * 8) ** 2)
    chunked = kernel_model.render_kernel_pairs(model, rows=3, cols=5)  # 4 chunks of 4
    assert chunked.shape == whole.shape == (2, 15, size, size)
    np.testing.assert_allclose(chunked, whole, atol=1e-7)
