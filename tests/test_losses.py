import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpjax import conv, losses, mpi
from dpjax import encoding as denc
from dpjax.kernels import KernelBank


def _problem(dtype, tiny_bank, rng, channels=1):
    h, w = 16, 24
    pair = np.asarray(tiny_bank.kernels)[:, :4, 4:11, 4:11]
    bank = KernelBank.create(pair, rows=2, cols=2, tile_h=8, tile_w=12)
    scales = jnp.asarray([1.2, 0.6, -0.4], dtype)
    geom = conv.ConvGeometry.create(bank.grid, 5, "fft")
    lk = mpi.prepare_layer_kernels(KernelBank(kernels=bank.kernels.astype(dtype), grid=bank.grid),
                                   scales, geom)
    obs = jnp.asarray(rng.random((2, channels, h, w)) * 0.6 + 0.2, dtype)
    params = mpi.MpiParams(jnp.asarray(rng.normal(size=(3, channels, h, w)), dtype),
                           jnp.asarray(rng.normal(size=(2, h, w)), dtype))
    return params, obs, lk


def test_terms_are_finite_and_sum(tiny_bank):
    rng = np.random.default_rng(0)
    params, obs, lk = _problem(jnp.float32, tiny_bank, rng)
    t = jax.jit(losses.loss_terms, static_argnums=3)(params, obs, lk, losses.LossWeights())
    vals = {k: float(v) for k, v in t._asdict().items()}
    assert all(np.isfinite(v) for v in vals.values())
    np.testing.assert_allclose(
        vals["total"], sum(v for k, v in vals.items() if k != "total"), rtol=1e-5)
    assert vals["aux"] > 0 and vals["image_tv"] > 0 and vals["entropy"] > 0


@pytest.mark.parametrize("prior_encoding", ["linear", "srgb", "gamma:2.2"])
def test_gradient_matches_finite_differences_float64(tiny_bank, prior_encoding):
    rng = np.random.default_rng(1)
    with jax.enable_x64(True):
        params, obs, lk = _problem(jnp.float64, tiny_bank, rng)
        weights = losses.LossWeights(prior_encoding=prior_encoding)

        @jax.jit
        def f(p):
            # Without stop-gradients the objective is a plain smooth function, so its
            # gradient must match central differences.
            return losses.loss_terms(p, obs, lk, weights, stop_gradient=lambda x: x).total

        grad = jax.grad(f)(params)
        # Directional derivative along a random direction vs central differences.
        direction = jax.tree_util.tree_map(
            lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float64), params)
        analytic = sum(float(jnp.vdot(g, d)) for g, d in zip(grad, direction))
        eps = 1e-5
        plus = jax.tree_util.tree_map(lambda x, d: x + eps * d, params, direction)
        minus = jax.tree_util.tree_map(lambda x, d: x - eps * d, params, direction)
        numeric = (float(f(plus)) - float(f(minus))) / (2 * eps)
        assert analytic == pytest.approx(numeric, rel=1e-5)


@pytest.mark.parametrize("prior_encoding", ["linear", "srgb", "gamma:2.2"])
def test_extreme_logits_give_finite_gradients(tiny_bank, prior_encoding):
    rng = np.random.default_rng(2)
    params, obs, lk = _problem(jnp.float32, tiny_bank, rng)
    params = mpi.MpiParams(params.color_logits * 40.0, params.alpha_logits * 40.0)
    weights = losses.LossWeights(prior_encoding=prior_encoding)
    g = jax.jit(jax.grad(lambda p: losses.loss_terms(p, obs, lk, weights).total))(params)
    for leaf in g:
        assert np.all(np.isfinite(np.asarray(leaf)))


def test_prior_encoding_changes_the_image_prior_only(tiny_bank):
    """With an encoding the priors are the linear priors of the encoded layers (the
    intensity prior and the edge mask it shares with the alpha prior), normalised by the
    encoded observation; the data terms and the entropy are the same as without."""
    rng = np.random.default_rng(3)
    params, obs, lk = _problem(jnp.float32, tiny_bank, rng, channels=3)
    terms = jax.jit(losses.loss_terms, static_argnums=3)
    plain = terms(params, obs, lk, losses.LossWeights())
    for enc in ("srgb", "gamma:2.2"):
        weights = losses.LossWeights(prior_encoding=enc)
        got = terms(params, obs, lk, weights)
        for k in ("data", "aux", "entropy"):
            assert float(getattr(got, k)) == float(getattr(plain, k))
        color = denc.from_linear(np.asarray(mpi.colors(params)), enc)
        norm = 0.5 / np.mean(denc.from_linear(np.asarray(obs), enc))
        want = losses.prior_terms(jnp.asarray(color), mpi.alphas(params), norm,
                                  losses.LossWeights())
        np.testing.assert_allclose([float(got.image_tv), float(got.alpha_tv)],
                                   [float(want[0]), float(want[1])], rtol=1e-4)
        assert abs(float(got.image_tv) / float(plain.image_tv) - 1) > 1e-2
    # The text form is canonical (equal curves, equal static weights); bad text refused.
    assert losses.LossWeights(prior_encoding="SRGB") == losses.LossWeights(prior_encoding="srgb")
    with pytest.raises(ValueError, match="gamma"):
        losses.LossWeights(prior_encoding="gamma:0")


def test_collision_entropy_bounds():
    one_hot = jnp.asarray([[[1.0]], [[0.0]], [[0.0]]])
    uniform = jnp.ones((4, 1, 1))
    assert float(losses.collision_entropy(one_hot)[0, 0]) == pytest.approx(0.0, abs=1e-6)
    assert float(losses.collision_entropy(uniform)[0, 0]) == pytest.approx(np.log(4), rel=1e-6)


def test_local_variance_zero_on_constant():
    x = jnp.full((2, 9, 9), 0.7)
    np.testing.assert_allclose(np.asarray(losses.local_variance(x)), 0.0, atol=1e-7)


def test_intensity_weight():
    # Left half dark (0.05), right half bright (0.8): weights (m + f mean m)^-p, mean 1.
    obs = jnp.concatenate([jnp.full((2, 3, 4, 4), 0.05), jnp.full((2, 3, 4, 4), 0.8)], axis=-1)
    w = np.asarray(losses.intensity_weight(obs, 1.0, 0.05))
    assert w.shape == (4, 8) and w.mean() == pytest.approx(1.0, rel=1e-6)
    floor = 0.05 * (0.05 + 0.8) / 2
    assert w[0, 0] / w[0, -1] == pytest.approx((0.8 + floor) / (0.05 + floor), rel=1e-5)
    with pytest.raises(ValueError, match="noise_power"):
        losses.LossWeights(noise_power=-0.5)


def test_noise_power_weighs_the_data_terms_only(tiny_bank):
    rng = np.random.default_rng(1)
    params, obs, lk = _problem(jnp.float32, tiny_bank, rng)
    terms = jax.jit(losses.loss_terms, static_argnums=3)
    plain = terms(params, obs, lk, losses.LossWeights(noise_power=0.0))  # the paper's
    weighted = terms(params, obs, lk, losses.LossWeights(noise_power=1.0))
    # The priors do not see the weight; the data terms do.
    for k in ("image_tv", "alpha_tv", "entropy"):
        assert float(getattr(weighted, k)) == float(getattr(plain, k))
    assert abs(float(weighted.data) / float(plain.data) - 1) > 1e-3
    # On a uniform observation the weight is 1 everywhere: the paper's terms.
    flat = jnp.full_like(obs, 0.4)
    np.testing.assert_allclose(terms(params, flat, lk, losses.LossWeights(noise_power=1.0)),
                               terms(params, flat, lk, losses.LossWeights(noise_power=0.0)),
                               rtol=1e-5)


def _reference_data_terms(params, obs, lk, weights):
    """Terms 1 and 2 written over whole [V, L, ...] arrays from `mpi.render`, the way
    METHOD.md states them; loss_terms computes them one layer at a time."""
    g = weights.charbonnier_gamma
    num_layers = params.color_logits.shape[0]
    mean_i = jnp.mean(obs)
    norm = 0.5 / mean_i
    r = mpi.render(params, lk)
    beta = (mean_i / 0.5) * 2.0 * weights.noise_sigma**2 * losses.tile_map(
        lk.inverse_power, lk.geom.grid)  # [L, H, W]
    bt = r.blurred_transmittance  # [V, L, H, W]
    bias = jnp.sum(bt * beta[None], axis=1)
    w = (1.0 if weights.noise_power == 0 else
         losses.intensity_weight(obs, weights.noise_power, weights.noise_floor))
    err = w * ((r.views - obs) ** 2 - bias[:, None])
    data = weights.data * norm * jnp.mean(losses.charbonnier(err, g))
    layer_err = w * ((r.layer_views - obs[:, None]) ** 2 - beta[None, :, None])
    aux = weights.aux * norm * num_layers * jnp.mean(
        jax.lax.stop_gradient(bt)[:, :, None] * losses.charbonnier(layer_err, g))
    return data, aux


@pytest.mark.parametrize("method", ["fft", "direct"])
@pytest.mark.parametrize("noise_power", [0.0, 1.0])
@pytest.mark.parametrize("channels", [1, 3])
def test_layer_loop_matches_the_whole_array_formula(tiny_bank, method, noise_power, channels):
    rng = np.random.default_rng(5)
    with jax.enable_x64(True):
        params, obs, lk = _problem(jnp.float64, tiny_bank, rng, channels)
        if method == "direct":
            geom = conv.ConvGeometry.create(lk.geom.grid, lk.geom.radius, "direct")
            lk = mpi.LayerKernels(kernels=lk.kernels, spectra=jnp.zeros((0,), jnp.complex128),
                                  inverse_power=lk.inverse_power, geom=geom)
        weights = losses.LossWeights(noise_power=noise_power)
        terms = losses.loss_terms(params, obs, lk, weights)
        data, aux = _reference_data_terms(params, obs, lk, weights)
        assert float(terms.data) == pytest.approx(float(data), rel=1e-12)
        assert float(terms.aux) == pytest.approx(float(aux), rel=1e-12)

        def ref_total(p):
            t = losses.loss_terms(p, obs, lk, weights)
            return sum(_reference_data_terms(p, obs, lk, weights)) + (
                t.image_tv + t.alpha_tv + t.entropy)

        got = jax.grad(lambda p: losses.loss_terms(p, obs, lk, weights).total)(params)
        want = jax.grad(ref_total)(params)
        for a, b in zip(got, want):
            np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12 * float(jnp.max(jnp.abs(b))))


def test_mixed_precision_promotes_like_the_whole_array_formula(tiny_bank):
    # float32 observation and kernels, float64 parameters: the layer loop's running sums
    # take the promoted dtype (float64), as jnp's arithmetic on the whole arrays would.
    rng = np.random.default_rng(6)
    with jax.enable_x64(True):
        params, obs, lk = _problem(jnp.float32, tiny_bank, rng, channels=3)
        params = jax.tree_util.tree_map(lambda x: x.astype(jnp.float64), params)
        weights = losses.LossWeights()
        terms = losses.loss_terms(params, obs, lk, weights)
        data, aux = _reference_data_terms(params, obs, lk, weights)
        assert terms.data.dtype == jnp.float64 and terms.aux.dtype == jnp.float64
        assert float(terms.data) == pytest.approx(float(data), rel=1e-5)
        assert float(terms.aux) == pytest.approx(float(aux), rel=1e-5)


def _plain_entropy(w):
    p = w / jnp.maximum(jnp.sum(w, axis=0, keepdims=True), 1e-12)
    return -jnp.log(jnp.maximum(jnp.sum(p * p, axis=0), 1e-12))


def test_collision_entropy_gradient_matches_the_plain_formula():
    rng = np.random.default_rng(2)
    with jax.enable_x64(True):
        w = jnp.asarray(rng.random((5, 4, 6)))
        w = w.at[:, 0, 0].set(0.0)  # an all-zero pixel: the floors' branch, gradient 0
        np.testing.assert_allclose(losses.collision_entropy(w), _plain_entropy(w), rtol=1e-12)
        weight = jnp.asarray(rng.normal(size=w.shape[1:]))
        got = jax.grad(lambda w: jnp.sum(losses.collision_entropy(w) * weight))(w)
        want = jax.grad(lambda w: jnp.sum(_plain_entropy(w) * weight))(w)
        assert np.all(np.isfinite(got))
        np.testing.assert_allclose(got[:, 1:], want[:, 1:], rtol=1e-10)
        np.testing.assert_allclose(got[:, 0, 1:], want[:, 0, 1:], rtol=1e-10)
        np.testing.assert_array_equal(got[:, 0, 0], 0.0)


def test_binomial_blur_gradient_is_its_adjoint():
    rng = np.random.default_rng(3)
    with jax.enable_x64(True):
        x = jnp.asarray(rng.normal(size=(2, 7, 9)))
        y = jnp.asarray(rng.normal(size=(2, 5, 7)))
        # Dot-product identity <G x, y> = <x, G^T y> with G^T from the custom gradient.
        _, pull = jax.vjp(losses.binomial_blur_valid, x)
        lhs = jnp.vdot(losses.binomial_blur_valid(x), y)
        assert float(lhs) == pytest.approx(float(jnp.vdot(x, pull(y)[0])), rel=1e-12)
        # And against the dense matrix of the filter built from unit impulses.
        basis = jnp.eye(7 * 9).reshape(63, 7, 9)
        dense = jax.vmap(losses.binomial_blur_valid)(basis).reshape(63, 35)  # [in, out]
        got = pull(y)[0].reshape(2, 63)
        np.testing.assert_allclose(got, y.reshape(2, 35) @ dense.T, rtol=1e-12, atol=1e-14)


def _reference_prior_terms(color, alpha, norm, weights):
    """Terms 3-5 over whole [L, ...] arrays, as METHOD.md states them."""
    g, sg = weights.charbonnier_gamma, jax.lax.stop_gradient
    num_layers = color.shape[0]
    trans = mpi.transmittance(alpha)
    aif = jnp.sum(color * trans[:, None], axis=0)
    var_img = losses.local_variance(norm * aif)
    tv_img = losses.charbonnier(var_img, g)
    keep = sg(1.0 - jnp.mean(1.0 - jnp.exp(-var_img / (2.0 * weights.edge_beta**2)), axis=0))
    tv_layers = losses.tv(norm * color, g)
    lw = num_layers * sg(trans[:, 1:-1, 1:-1])[:, None]
    image_tv = weights.image_tv * (jnp.mean(tv_img * keep) + jnp.mean(tv_img)
                                   + jnp.mean(lw * tv_layers * keep) + jnp.mean(lw * tv_layers))
    sqrt_a, sqrt_t = jnp.sqrt(jnp.maximum(alpha, 1e-10)), jnp.sqrt(jnp.maximum(trans, 1e-10))
    alpha_tv = weights.alpha_tv * (num_layers / 12.0) ** 2 * jnp.mean(
        (losses.tv(sqrt_a, g) + losses.tv(sqrt_t, g)) * keep)
    entropy = weights.entropy / np.log(num_layers) * (
        jnp.mean(_plain_entropy(sqrt_a[1:])) + jnp.mean(_plain_entropy(sqrt_t)))
    return image_tv, alpha_tv, entropy


def test_prior_terms_match_the_whole_array_formula(tiny_bank):
    rng = np.random.default_rng(6)
    with jax.enable_x64(True):
        params, obs, _ = _problem(jnp.float64, tiny_bank, rng)
        params = params._replace(color_logits=jnp.concatenate([params.color_logits] * 3, 1))
        weights = losses.LossWeights()
        norm = 0.5 / jnp.mean(obs)

        def both(p, fn):
            return fn(mpi.colors(p), mpi.alphas(p), norm, weights)

        got, want = both(params, losses.prior_terms), both(params, _reference_prior_terms)
        np.testing.assert_allclose(got, want, rtol=1e-12)
        grads = [jax.grad(lambda p, fn=fn: sum(both(p, fn)))(params)
                 for fn in (losses.prior_terms, _reference_prior_terms)]
        for a, b in zip(*grads):
            np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12 * float(jnp.max(jnp.abs(b))))
