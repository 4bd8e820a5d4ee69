import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpjax import layer_ops, losses


def _plain_front_products(clear):
    """Reference: exclusive reverse cumulative product with jnp.cumprod."""
    prod = jnp.cumprod(jnp.flip(clear, axis=-3), axis=-3)
    ones = jnp.ones_like(prod[..., :1, :, :])
    return jnp.flip(jnp.concatenate([ones, prod[..., :-1, :, :]], axis=-3), axis=-3)


def _plain_entropy(w):
    p = w / jnp.maximum(jnp.sum(w, axis=0, keepdims=True), 1e-12)
    return -jnp.log(jnp.maximum(jnp.sum(p * p, axis=0), 1e-12))


@pytest.mark.parametrize("axis", [0, 1, -3])
def test_sum_axis_matches_jnp_sum_and_its_gradient(axis):
    rng = np.random.default_rng(0)
    with jax.enable_x64(True):
        x = jnp.asarray(rng.normal(size=(3, 5, 4, 6)))
        weight = jnp.asarray(rng.normal(size=np.delete(np.array(x.shape), axis % 4)))
        np.testing.assert_allclose(layer_ops.sum_axis(x, axis), jnp.sum(x, axis=axis),
                                   rtol=1e-12)
        got = jax.grad(lambda x: jnp.sum(jnp.sin(layer_ops.sum_axis(x, axis)) * weight))(x)
        want = jax.grad(lambda x: jnp.sum(jnp.sin(jnp.sum(x, axis=axis)) * weight))(x)
        np.testing.assert_allclose(got, want, rtol=1e-12)


def test_front_products_match_cumprod_and_its_gradient():
    rng = np.random.default_rng(1)
    with jax.enable_x64(True):
        clear = jnp.asarray(rng.random((2, 6, 5, 7)))
        clear = clear.at[0, 2].set(0.0)  # a fully opaque layer: no division by clear
        np.testing.assert_allclose(layer_ops.front_products(clear),
                                   _plain_front_products(clear), rtol=1e-12)
        np.testing.assert_allclose(layer_ops.front_products(clear)[:, -1], 1.0)
        weight = jnp.asarray(rng.normal(size=clear.shape))
        got = jax.grad(lambda c: jnp.sum(jnp.cos(layer_ops.front_products(c)) * weight))(clear)
        want = jax.grad(lambda c: jnp.sum(jnp.cos(_plain_front_products(c)) * weight))(clear)
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)


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
