import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpjax import layer_ops


def _plain_front_products(clear):
    """Reference: exclusive reverse cumulative product with jnp.cumprod."""
    prod = jnp.cumprod(jnp.flip(clear, axis=-3), axis=-3)
    ones = jnp.ones_like(prod[..., :1, :, :])
    return jnp.flip(jnp.concatenate([ones, prod[..., :-1, :, :]], axis=-3), axis=-3)


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
