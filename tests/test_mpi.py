import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpjax import conv, mpi
from dpjax.kernels import KernelBank, TileGrid
from dpjax.postprocess import PostConfig


def _delta_bank(grid, k=5):
    d = np.zeros((2, grid.num_tiles, k, k), np.float32)
    d[:, :, k // 2, k // 2] = 1.0
    return KernelBank.create(d, rows=grid.rows, cols=grid.cols, tile_h=grid.tile_h,
                             tile_w=grid.tile_w)


def _random_params(rng, num_layers=4, c=2, h=16, w=24, spread=3.0):
    return mpi.MpiParams(
        color_logits=jnp.asarray(rng.normal(size=(num_layers, c, h, w)) * spread, jnp.float32),
        alpha_logits=jnp.asarray(rng.normal(size=(num_layers - 1, h, w)) * spread, jnp.float32))


def test_transmittance_sums_to_one_with_opaque_back():
    rng = np.random.default_rng(0)
    p = _random_params(rng)
    t = mpi.transmittance(mpi.alphas(p))
    np.testing.assert_allclose(np.asarray(t.sum(axis=0)), 1.0, atol=1e-5)
    assert np.all(np.asarray(t) >= 0)


def test_one_hot_alphas_select_a_layer():
    rng = np.random.default_rng(1)
    p = _random_params(rng)
    big = 30.0
    # Layer 2 opaque, layer 3 (front) transparent: only layer 2 is seen.
    alpha_logits = jnp.stack([jnp.full((16, 24), -big), jnp.full((16, 24), big),
                              jnp.full((16, 24), -big)])
    p = p._replace(alpha_logits=alpha_logits)
    t = mpi.transmittance(mpi.alphas(p))
    np.testing.assert_allclose(np.asarray(t[2]), 1.0, atol=1e-6)
    aif = mpi.all_in_focus(mpi.colors(p), t)
    np.testing.assert_allclose(np.asarray(aif), np.asarray(mpi.colors(p)[2]), atol=1e-6)
    d = mpi.defocus_map(t, jnp.asarray([1.5, 1.0, 0.5, 0.0]))
    np.testing.assert_allclose(np.asarray(d), 0.5, atol=1e-6)


def test_delta_kernel_renders_the_all_in_focus_image():
    rng = np.random.default_rng(2)
    grid = TileGrid(rows=2, cols=2, tile_h=8, tile_w=12)
    p = _random_params(rng)
    for method in ("fft", "direct"):
        geom = conv.ConvGeometry.create(grid, 2, method)
        lk = mpi.prepare_layer_kernels(_delta_bank(grid), jnp.asarray([1.0, 0.8, 0.6, 0.4]), geom)
        r = mpi.render(p, lk)
        aif = mpi.all_in_focus(mpi.colors(p), mpi.transmittance(mpi.alphas(p)))
        np.testing.assert_allclose(np.asarray(r.views[0]), np.asarray(aif), atol=1e-5)
        np.testing.assert_allclose(np.asarray(r.views[1]), np.asarray(aif), atol=1e-5)
        np.testing.assert_allclose(np.asarray(r.blurred_transmittance.sum(axis=1)), 1.0,
                                   atol=1e-5)


def test_uniform_scene_renders_uniform_views(tiny_bank):
    """Kernels sum to one and padding replicates edges: a constant MPI stays constant."""
    h, w = tiny_bank.grid.image_shape
    p = mpi.MpiParams(color_logits=jnp.full((3, 1, h, w), 0.3),
                      alpha_logits=jnp.full((2, h, w), -0.2))
    geom = conv.ConvGeometry.create(tiny_bank.grid, 9, "fft")
    lk = mpi.prepare_layer_kernels(tiny_bank, jnp.asarray([1.2, 0.7, -0.5]), geom)
    views = np.asarray(mpi.render(p, lk).views)
    np.testing.assert_allclose(views, float(jax.nn.sigmoid(0.3)), atol=1e-5)


def test_init_gives_equal_transmittance():
    obs = jnp.full((2, 1, 8, 8), 0.4)
    p = mpi.init_params(obs, 6)
    t = mpi.transmittance(mpi.alphas(p))
    np.testing.assert_allclose(np.asarray(t), 1.0 / 6, atol=1e-5)
    np.testing.assert_allclose(np.asarray(mpi.colors(p)), 0.4, atol=1e-5)


def test_sharpened_estimator_keeps_the_peak_where_the_mean_is_pulled_to_the_middle():
    scales = jnp.asarray(np.linspace(1.1, 0.0, 12), jnp.float32)  # back to front
    # A spread column: a uniform floor with a bump on layers 0-2 (peak at layer 1, 1.0),
    # as a short solve leaves a weakly textured region.
    t = np.full((12, 1, 1), 0.05, np.float32)
    t[:3, 0, 0] += [0.1, 0.2, 0.1]
    t /= t.sum(axis=0)
    mean = float(mpi.defocus_map(jnp.asarray(t), scales)[0, 0])
    sharp = float(mpi.defocus_sharpened(jnp.asarray(t), scales)[0, 0])
    assert mean < 0.75  # pulled towards the middle of the range (0.55)
    assert abs(sharp - 1.0) < 1e-3  # the bump is symmetric about layer 1 (scale 1.0)
    # Power 1 is the plain mean; one-hot columns (exact zeros elsewhere) give their layer.
    rng = np.random.default_rng(3)
    p = _random_params(rng, num_layers=12, spread=0.5)
    tr = mpi.transmittance(mpi.alphas(p))
    np.testing.assert_allclose(np.asarray(mpi.defocus_sharpened(tr, scales, 1.0)),
                               np.asarray(mpi.defocus_map(tr, scales)), atol=1e-5)
    k = rng.integers(0, 12, size=(6, 7))
    onehot = np.zeros((12, 6, 7), np.float32)
    np.put_along_axis(onehot, k[None], 1.0, axis=0)
    np.testing.assert_allclose(np.asarray(mpi.defocus_sharpened(jnp.asarray(onehot), scales)),
                               np.asarray(scales)[k], atol=1e-6)
    # Random transmittances: finite, within the layer range, under jit, and sharper.
    d = np.asarray(jax.jit(mpi.estimate_defocus, static_argnums=2)(tr, scales, "sharpened"))
    assert d.shape == (16, 24) and np.all(np.isfinite(d))
    assert d.min() >= -1e-6 and d.max() <= 1.1 + 1e-6
    mid = 0.55
    plain = np.asarray(mpi.defocus_map(tr, scales))
    assert np.mean(np.abs(d - mid)) > np.mean(np.abs(plain - mid))


def test_unknown_estimator_is_named():
    with pytest.raises(ValueError, match="unknown defocus estimator 'median'"):
        mpi.estimate_defocus(jnp.ones((2, 1, 1)) / 2, jnp.asarray([1.0, 0.0]), "median")
    with pytest.raises(ValueError, match="unknown defocus estimator 'median'"):
        PostConfig(defocus="median")


@pytest.mark.parametrize("method", ["fft", "direct"])
def test_render_views_one_layer_at_a_time_equals_render(tiny_bank, method):
    rng = np.random.default_rng(7)
    h, w = tiny_bank.grid.image_shape
    p = _random_params(rng, num_layers=3, c=2, h=h, w=w, spread=1.5)
    geom = conv.ConvGeometry.create(tiny_bank.grid, 6, method)
    lk = mpi.prepare_layer_kernels(tiny_bank, jnp.asarray([1.2, 0.4, -0.6]), geom)
    want = mpi.render(p, lk).views
    got = mpi.render_views(mpi.colors(p), mpi.alphas(p), lk)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["fft", "direct"])
def test_blurred_visibility_one_layer_at_a_time(tiny_bank, method):
    rng = np.random.default_rng(8)
    h, w = tiny_bank.grid.image_shape
    alpha = mpi.alphas(_random_params(rng, num_layers=3, c=1, h=h, w=w, spread=1.5))
    geom = conv.ConvGeometry.create(tiny_bank.grid, 6, method)
    lk = mpi.prepare_layer_kernels(tiny_bank, jnp.asarray([1.2, 0.4, -0.6]), geom)
    want = mpi.visibility(mpi.blur_layers(alpha[:, None], lk)[:, :, 0])
    got = mpi.blurred_visibility(alpha, lk)
    assert got.shape == want.shape == (2, 3, h, w)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)


def test_layer_loops_promote_mixed_precision_like_whole_arrays(tiny_bank):
    # float32 kernels, float64 colours and alphas: `render_views` and `blurred_visibility`
    # start their running products and sums in the promoted dtype (`mpi.loop_dtype`), so
    # they return float64 and match the whole-array `render`, as jnp's arithmetic would.
    rng = np.random.default_rng(9)
    h, w = tiny_bank.grid.image_shape
    with jax.enable_x64(True):
        p = jax.tree_util.tree_map(lambda x: x.astype(jnp.float64),
                                   _random_params(rng, num_layers=3, c=2, h=h, w=w, spread=1.5))
        geom = conv.ConvGeometry.create(tiny_bank.grid, 6, "fft")
        lk = mpi.prepare_layer_kernels(tiny_bank, jnp.asarray([1.2, 0.4, -0.6], jnp.float32),
                                       geom)
        assert lk.kernels.dtype == jnp.float32 and lk.spectra.dtype == jnp.complex64
        color, alpha = mpi.colors(p), mpi.alphas(p)
        views = mpi.render_views(color, alpha, lk)
        vis = mpi.blurred_visibility(alpha, lk)
        assert views.dtype == jnp.float64 and vis.dtype == jnp.float64
        want = mpi.render(p, lk)
        np.testing.assert_allclose(np.asarray(views), np.asarray(want.views), rtol=1e-5,
                                   atol=1e-6)
        want_vis = mpi.visibility(mpi.blur_layers(alpha[:, None], lk)[:, :, 0])
        np.testing.assert_allclose(np.asarray(vis), np.asarray(want_vis), rtol=1e-5, atol=1e-6)
