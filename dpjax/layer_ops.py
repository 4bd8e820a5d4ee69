"""Sums and products along a short axis (layers, views), with hand-written gradients.

XLA's CPU backend runs a reduction over a major axis of a pixel-sized array several
times slower than the same sum written as unrolled adds of its slices (measured on
[12, 1008, 1344] float32, 2-core CPU: 103 ms against 34 ms with the gradient), and the
automatic gradient of the unrolled form (a pad per slice) gives the time back. The
functions here unroll the forward pass over the axis, whose length is static and small
(the MPI's 8-32 layers, the two views), and write the backward pass as the few
elementwise passes it needs, so both directions run at memory bandwidth
(BENCHMARKS.md, "Layer loop"). They compute exactly what their `jnp` equivalents do
(tests/test_layer_ops.py compares values and gradients). Being `jax.custom_vjp`
functions, they support reverse mode only: no jax.jvp / jacfwd / linearize through the
loss (`mpi.visibility`, `mpi.all_in_focus` and the refinement's objective use them).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def _slices(x: jax.Array, axis: int) -> list[jax.Array]:
    return [jax.lax.index_in_dim(x, i, axis, keepdims=False) for i in range(x.shape[axis])]


def _unrolled_sum(x: jax.Array, axis: int) -> jax.Array:
    parts = _slices(x, axis)
    total = parts[0]
    for p in parts[1:]:
        total = total + p
    return total


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def sum_axis(x: jax.Array, axis: int) -> jax.Array:
    """jnp.sum(x, axis) for a short static axis (see the module docstring).

    Args:
      x: any shape; `axis` its (short) axis to sum.
      axis: static.

    Returns:
      x's shape without `axis`.
    """
    return _unrolled_sum(x, axis % x.ndim)


def _sum_fwd(x, axis):
    return _unrolled_sum(x, axis % x.ndim), x.shape


def _sum_bwd(axis, shape, g):
    axis = axis % len(shape)
    return (jnp.broadcast_to(jnp.expand_dims(g, axis), shape),)


sum_axis.defvjp(_sum_fwd, _sum_bwd)


def _exclusive_front_products(clear: jax.Array) -> jax.Array:
    """[..., L, H, W] -> P_l = prod_{j>l} clear_j, stacked on axis -3."""
    parts = _slices(clear, clear.ndim - 3)
    out = [jnp.ones_like(parts[0])]
    for j in range(len(parts) - 1, 0, -1):
        out.append(out[-1] * parts[j])
    return jnp.stack(out[::-1], axis=-3)


@jax.custom_vjp
def front_products(clear: jax.Array) -> jax.Array:
    """Exclusive product over the layers in front: P_l = prod_{j>l} clear_j.

    With clear = 1 - alpha this is the MPI's visibility (`mpi.visibility`).

    Args:
      clear: [..., L, H, W], layers back to front on axis -3.

    Returns:
      [..., L, H, W]; the front layer's product is 1.
    """
    return _exclusive_front_products(clear)


def _front_fwd(clear):
    prod = _exclusive_front_products(clear)
    return prod, (clear, prod)


def _front_bwd(res, g):
    # P_{l-1} = P_l clear_l, so d/d clear_j of sum_l g_l P_l is P_j times the cotangent
    # carried from the layers behind j: a_j = sum_{l<j} g_l prod_{l<i<j} clear_i, built
    # back to front as a_{j+1} = g_j + a_j clear_j (one pass, no division by clear).
    clear, prod = res
    axis = clear.ndim - 3
    c, p, gs = _slices(clear, axis), _slices(prod, axis), _slices(g, axis)
    carried = gs[0]
    grads = [jnp.zeros_like(c[0])]
    for j in range(1, len(c)):
        grads.append(carried * p[j])
        carried = gs[j] + carried * c[j]
    return (jnp.stack(grads, axis=axis),)


front_products.defvjp(_front_fwd, _front_bwd)
