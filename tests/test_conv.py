import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpjax import conv, kernels
from dpjax.kernels import TileGrid


def _numpy_varying_conv(x, kern, grid, r):
    """Independent reference: per output pixel, its tile's kernel, edge padding."""
    xp = np.pad(x, r, mode="edge")
    h, w = x.shape
    out = np.zeros((h, w))
    k = kern.shape[-1]
    for t in range(grid.num_tiles):
        ty, tx = divmod(t, grid.cols)
        kf = kern[t][::-1, ::-1]  # convolution = correlation with the flipped kernel
        for i in range(ty * grid.tile_h, (ty + 1) * grid.tile_h):
            for j in range(tx * grid.tile_w, (tx + 1) * grid.tile_w):
                out[i, j] = np.sum(xp[i:i + k, j:j + k] * kf)
    return out


def test_good_fft_size():
    assert conv.good_fft_size(228) == 240
    assert conv.good_fft_size(64) == 64
    assert conv.good_fft_size(97) == 100


@pytest.mark.parametrize("method", ["fft", "direct"])
def test_varying_conv_matches_numpy(method):
    rng = np.random.default_rng(0)
    grid = TileGrid(rows=2, cols=3, tile_h=10, tile_w=12)
    r = 3
    x = rng.random(grid.image_shape)
    kern = rng.random((grid.num_tiles, 2 * r + 1, 2 * r + 1))
    geom = conv.ConvGeometry.create(grid, r, method)
    ours = np.asarray(conv.convolve(jnp.asarray(x[None], jnp.float32),
                                    jnp.asarray(kern[None], jnp.float32), geom))[0]
    ref = _numpy_varying_conv(x, kern, grid, r)
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


@pytest.mark.parametrize("scales", [(1.5, 1.0, 0.4), (0.8, -0.3, -1.2)])
def test_fft_matches_direct_all_layers_both_views(tiny_bank, scales):
    """Tiled FFT == direct convolution for both views at several (signed) scales."""
    from dpjax import mpi
    rng = np.random.default_rng(1)
    scales = jnp.asarray(scales, jnp.float32)
    radius = kernels.rescaled_radius(tiny_bank.kernel_size, float(jnp.max(jnp.abs(scales))))
    h, w = tiny_bank.grid.image_shape
    signals = jnp.asarray(rng.random((3, 2, h, w)), jnp.float32)  # [L, S, H, W]
    outs = {}
    for method in ("fft", "direct"):
        geom = conv.ConvGeometry.create(tiny_bank.grid, radius, method)
        lk = mpi.prepare_layer_kernels(tiny_bank, scales, geom)
        outs[method] = np.asarray(mpi.blur_layers(signals, lk))
    assert outs["fft"].shape == (2, 3, 2, h, w)
    rel = np.abs(outs["fft"] - outs["direct"]).max() / np.abs(outs["direct"]).max()
    assert rel <= 1e-5
    # The two views really differ (DP kernels are mirror images).
    assert np.abs(outs["fft"][0] - outs["fft"][1]).max() > 1e-2


def test_unrounded_fft_size_also_exact():
    rng = np.random.default_rng(2)
    grid = TileGrid(rows=1, cols=2, tile_h=13, tile_w=11)
    x = jnp.asarray(rng.random((1,) + grid.image_shape), jnp.float32)
    k = jnp.asarray(rng.random((1, 2, 5, 5)), jnp.float32)
    a = conv.convolve(x, k, conv.ConvGeometry.create(grid, 2, "fft", round_fft=False))
    b = conv.convolve(x, k, conv.ConvGeometry.create(grid, 2, "direct"))
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)


def test_shared_geometry_widens_to_the_fft_and_blurs_the_same():
    """`ConvGeometry.shared`: the widest radius the same FFT holds; kernels zero-padded
    to it blur exactly as the narrower window does; radii that round to one FFT size
    share one geometry (and so one compiled solver)."""
    grid = TileGrid(rows=2, cols=2, tile_h=40, tile_w=40)
    for r in range(1, 12):
        geom = conv.ConvGeometry.create(grid, r)
        shared = conv.ConvGeometry.shared(grid, r)
        assert shared.fft_shape == geom.fft_shape and shared.radius >= r
        wider = conv.ConvGeometry.create(grid, shared.radius + 1)
        assert wider.fft_shape != geom.fft_shape  # it is the widest
    # 40 + 2r: 46 and 48 both round to 48, so radii 3 and 4 share; 42 rounds to 45.
    assert conv.ConvGeometry.shared(grid, 3) == conv.ConvGeometry.shared(grid, 4)
    assert conv.ConvGeometry.shared(grid, 3).radius == 4
    assert conv.ConvGeometry.shared(grid, 1).radius == 2
    for method, round_fft in (("direct", True), ("fft", False)):
        assert conv.ConvGeometry.shared(grid, 1, method, round_fft).radius == 1
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.random((1,) + grid.image_shape), jnp.float32)
    k = rng.random((1, grid.num_tiles, 3, 3))
    shared = conv.ConvGeometry.shared(grid, 1)  # radius 2
    pad = shared.radius - 1
    k_wide = np.pad(k, [(0, 0), (0, 0), (pad, pad), (pad, pad)])
    a = conv.convolve(x, jnp.asarray(k, jnp.float32), conv.ConvGeometry.create(grid, 1))
    b = conv.convolve(x, jnp.asarray(k_wide, jnp.float32), shared)
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-6)


def test_unknown_method_rejected():
    with pytest.raises(ValueError, match="unknown convolution method"):
        conv.ConvGeometry.create(TileGrid(rows=1, cols=1, tile_h=4, tile_w=4), 1, "spectral")


def test_conv_is_differentiable():
    grid = TileGrid(rows=1, cols=2, tile_h=8, tile_w=8)
    geom = conv.ConvGeometry.create(grid, 2, "fft")
    k = jnp.ones((1, 2, 5, 5)) / 25.0

    def f(x):
        return jnp.sum(conv.convolve(x, k, geom) ** 2)

    g = jax.grad(f)(jnp.ones((1, 8, 16)))
    assert np.all(np.isfinite(np.asarray(g)))
