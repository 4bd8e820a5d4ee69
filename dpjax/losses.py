"""The objective of Xin et al. (2021): data terms and priors (METHOD.md, "Objective").

All functions take planar arrays: observation [V, C, H, W], colours [L, C, H, W],
alphas and transmittances [L, H, W].
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from dpjax import encoding, layer_ops, mpi
from dpjax.kernels import TileGrid


@dataclasses.dataclass(frozen=True, kw_only=True)
class LossWeights:
    """Weights and constants of the objective (defaults: the paper's, but noise_power).

    Attributes:
      data: bias-corrected data term weight.
      aux: auxiliary per-layer data term weight.
      image_tv: intensity smoothness weight (image and layers).
      alpha_tv: alpha smoothness weight at 12 layers (scaled by (L/12)^2); the
        paper used 1.5e4 for scenes 1-4 and 7.5e4 for the others.
      entropy: collision-entropy weight before division by log L (paper: 20 or 30).
      charbonnier_gamma: gamma of rho(e) = sqrt(e / gamma^2 + 1) - 1.
      noise_sigma: sigma of the data-term bias correction.
      edge_beta: beta of the edge-aware mask.
      noise_power: p of the data terms' per-pixel weight w = (m + floor)^-p, m the
        views' mean intensity at the pixel, floor = noise_floor times its frame mean,
        w normalised to mean 1 (`intensity_weight`): residuals count relative to the
        signal's noise (shot noise: variance ~ m, p = 1), not in absolute units, so dark
        texture is not drowned by bright. 0 (the paper's) = unweighted; the default 1
        (chosen from the noise model, then measured on both real data sets:
        experiments/results/own_camera.md, "Data terms relative to the noise").
      noise_floor: see noise_power.
      prior_encoding: the transfer function ("linear", "srgb" or "gamma:G",
        `dpjax.encoding`) through which the priors see the layer intensities: the
        intensity smoothness (term 3) and the edge mask that terms 3 and 4 share, with
        the normaliser taken from the observation encoded the same way; the data terms
        stay in linear light. "linear" is the paper's. A display-referred input's
        noise and quantisation steps are even in its own encoding, not in linear light,
        where the edge mask's fixed threshold misses the edges of dark texture (the
        alpha smoothness then runs across them); `dpjax.scene` sets the input's
        encoding by default (`SceneOptions.prior_encoding`; measured:
        experiments/results/own_camera.md, "Image priors in the input's encoding").
    """

    data: float = 2.5e4
    aux: float = 2.5e4
    image_tv: float = 30.0
    alpha_tv: float = 7.5e4
    entropy: float = 20.0
    charbonnier_gamma: float = 0.1
    noise_sigma: float = 5e-3
    edge_beta: float = 1.0 / 32.0
    noise_power: float = 1.0
    noise_floor: float = 0.05
    prior_encoding: str = "linear"

    def __post_init__(self):
        if not self.noise_power >= 0 or not self.noise_floor > 0:
            raise ValueError(f"noise_power must be >= 0 and noise_floor > 0, got "
                             f"{self.noise_power} and {self.noise_floor}")
        # The canonical text form, so that equal curves give equal (hashable) weights.
        object.__setattr__(self, "prior_encoding",
                           str(encoding.parse_encoding(self.prior_encoding)))


class LossTerms(NamedTuple):
    """Weighted loss terms (scalars) and their sum."""

    data: jax.Array
    aux: jax.Array
    image_tv: jax.Array
    alpha_tv: jax.Array
    entropy: jax.Array
    total: jax.Array


def charbonnier(e: jax.Array, gamma: float) -> jax.Array:
    """rho(e) = sqrt(e / gamma^2 + 1) - 1 on a squared error e.

    Hazard guarded: the bias-corrected error can be slightly negative; the sqrt
    argument is clamped at a small positive value so value and gradient stay finite.
    """
    return jnp.sqrt(jnp.maximum(e / gamma**2 + 1.0, 1e-6)) - 1.0


def sqrt_finite_grad(x: jax.Array, eps: float = 1e-10) -> jax.Array:
    """sqrt with a finite gradient at 0 (alphas and transmittances can underflow)."""
    return jnp.sqrt(jnp.maximum(x, eps))


# A numpy constant: importing dpjax must not initialise an XLA backend (multi-process
# runs call jax.distributed.initialize after import).
_BINOMIAL = np.array([1.0, 2.0, 1.0], np.float32) / 4.0


def _binomial_valid(x: jax.Array) -> jax.Array:
    b = _BINOMIAL
    x = b[0] * x[..., :-2, :] + b[1] * x[..., 1:-1, :] + b[2] * x[..., 2:, :]
    return b[0] * x[..., :-2] + b[1] * x[..., 1:-1] + b[2] * x[..., 2:]


@jax.custom_vjp
def binomial_blur_valid(x: jax.Array) -> jax.Array:
    """3x3 binomial filter G = [1 2 1]^T [1 2 1] / 16, 'valid' on the last two axes.

    [..., H, W] -> [..., H-2, W-2]. Its gradient is written out as the adjoint, the
    same symmetric filter over the zero-padded cotangent ('full' mode): the automatic
    one (a pad per shifted slice) took twice as long (BENCHMARKS.md, "Layer loop").
    """
    return _binomial_valid(x)


def _binomial_fwd(x):
    return _binomial_valid(x), None


def _binomial_bwd(_, g):
    pad = [(0, 0)] * (g.ndim - 2) + [(2, 2), (2, 2)]
    return (_binomial_valid(jnp.pad(g, pad)),)


binomial_blur_valid.defvjp(_binomial_fwd, _binomial_bwd)


def local_variance(x: jax.Array) -> jax.Array:
    """|G*(x^2) - (G*x)^2|: [..., H, W] -> [..., H-2, W-2]."""
    return jnp.abs(binomial_blur_valid(x * x) - binomial_blur_valid(x) ** 2)


def tv(x: jax.Array, gamma: float) -> jax.Array:
    """'Isotropic TV' as a Charbonnier of the local variance (METHOD.md, term 3)."""
    return charbonnier(local_variance(x), gamma)


def _crop1(x: jax.Array) -> jax.Array:
    """Drops one pixel on each border to match the valid 3x3 filter output."""
    return x[..., 1:-1, 1:-1]


def intensity_weight(observation: jax.Array, power: float, floor: float) -> jax.Array:
    """(m + floor mean(m))^-power normalised to mean 1: [V, C, H, W] -> [H, W], m the
    mean over views and channels (LossWeights.noise_power)."""
    m = jnp.mean(observation, axis=(0, 1))
    w = (m + floor * jnp.mean(m)) ** (-power)
    return w / jnp.mean(w)


def tile_map(values: jax.Array, grid: TileGrid) -> jax.Array:
    """Expands per-tile values [..., T] to a piecewise-constant map [..., H, W]."""
    lead = values.shape[:-1]
    v = values.reshape(lead + (grid.rows, 1, grid.cols, 1))
    v = jnp.broadcast_to(v, lead + (grid.rows, grid.tile_h, grid.cols, grid.tile_w))
    return v.reshape(lead + grid.image_shape)


_BLURRED = "blurred_layer"  # the one residual `_layer_loop`'s backward pass keeps


def _layer_loop(color: jax.Array, alpha: jax.Array, observation: jax.Array,
                lk: mpi.LayerKernels, beta: jax.Array, w: jax.Array, gamma: float,
                stop_gradient: Callable[[jax.Array], jax.Array]
                ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """`mpi.render` and the data terms' per-layer sums in one loop over the layers.

    Front to back, each layer's signals (a_l c_l, a_l, c_l) are blurred for both views
    and folded into running sums: the views B_v, the bias sum_l T~_vl beta_l and the
    auxiliary term's sum, with the visibility prod_{j>l} (1 - k_vj * a_j) carried. No
    FFT products for all layers at once are ever held and the pixelwise work runs on
    one layer's arrays at a time; under the gradient each layer's blurred signals are
    kept (the backward pass's residual). BENCHMARKS.md, "Layer loop": a full-frame
    step 1.2x faster inside the solver's loop (1.4x alone), in 44% of the temporaries.

    Args:
      color: [L, C, H, W] layer intensities.
      alpha: [L, H, W] alphas (layer 0 opaque).
      observation: [V, C, H, W].
      lk: layer kernels.
      beta: [L, T] per-layer, per-tile bias of a squared residual.
      w: [H, W] per-pixel weight of the residuals.
      gamma: Charbonnier gamma.
      stop_gradient: applied to the auxiliary term's weights T~_vl.

    Returns:
      views [V, C, H, W]; bias [V, H, W]; the auxiliary term's sum over views, layers,
      channels and pixels of sg(T~_vl) rho(w ((k_vl * c_l - I_v)^2 - beta_l)).
    """
    num_c = color.shape[1]
    signals = jnp.concatenate([alpha[:, None] * color, alpha[:, None], color], axis=1)
    per_layer = mpi.layer_kernel_slices(lk)  # leading axis L

    def step(carry, xs):
        vis, views, bias, aux = carry  # [V, H, W], [V, C, H, W], [V, H, W], scalar
        sig, lk_l, beta_l = xs
        blurred = mpi.blur_layers(sig[None], lk_l)[:, 0]  # [V, 2C+1, H, W]
        blurred = checkpoint_name(blurred, _BLURRED)
        b_alpha = blurred[:, num_c]
        b_trans = b_alpha * vis  # T~_vl
        beta_map = tile_map(beta_l, lk.geom.grid)  # [H, W]
        views = views + blurred[:, :num_c] * vis[:, None]
        bias = bias + b_trans * beta_map
        layer_err = w * ((blurred[:, num_c + 1:] - observation) ** 2 - beta_map)
        aux = aux + jnp.sum(stop_gradient(b_trans)[:, None] * charbonnier(layer_err, gamma))
        return (vis * (1.0 - b_alpha), views, bias, aux), None

    v, c = observation.shape[:2]
    hw = observation.shape[-2:]
    dtype = mpi.loop_dtype(lk, signals, observation, beta, w)
    zeros = jnp.zeros((v,) + hw, dtype)
    init = (jnp.ones_like(zeros), jnp.zeros((v, c) + hw, dtype), zeros, jnp.zeros((), dtype))
    # The backward pass keeps each layer's blurred signals (its FFTs are not redone) and
    # recomputes the cheap pixelwise rest from them.
    step = jax.checkpoint(step, policy=jax.checkpoint_policies.save_only_these_names(_BLURRED))
    (_, views, bias, aux), _ = jax.lax.scan(step, init, (signals, per_layer, beta),
                                            reverse=True)
    return views, bias, aux


def loss_terms(params: mpi.MpiParams, observation: jax.Array, lk: mpi.LayerKernels,
               weights: LossWeights, *,
               stop_gradient: Callable[[jax.Array], jax.Array] = jax.lax.stop_gradient
               ) -> LossTerms:
    """Evaluates the five weighted terms of the objective.

    Args:
      params: MPI logits (colours [L, C, H, W], alphas [L-1, H, W]).
      observation: [V, C, H, W] the two views.
      lk: layer kernels prepared for this resolution.
      weights: weights and constants.
      stop_gradient: the paper's sg(.) on the auxiliary-term weights, the layer-TV
        weights and the edge mask. Tests pass the identity to compare the gradient
        of the resulting smooth function with finite differences.

    Returns:
      LossTerms of scalars.
    """
    color = mpi.colors(params)
    alpha = mpi.alphas(params)
    data, aux = data_terms(color, alpha, observation, lk, weights, stop_gradient)
    # n, the intensity normaliser, of the values the priors see
    norm = 0.5 / jnp.mean(prior_values(observation, weights))
    image_tv, alpha_tv, entropy = prior_terms(color, alpha, norm, weights, stop_gradient)
    total = data + aux + image_tv + alpha_tv + entropy
    return LossTerms(data=data, aux=aux, image_tv=image_tv, alpha_tv=alpha_tv,
                     entropy=entropy, total=total)


def data_terms(color: jax.Array, alpha: jax.Array, observation: jax.Array,
               lk: mpi.LayerKernels, weights: LossWeights,
               stop_gradient: Callable[[jax.Array], jax.Array] = jax.lax.stop_gradient
               ) -> tuple[jax.Array, jax.Array]:
    """Terms 1 and 2 (weighted): the bias-corrected data term and the auxiliary term.

    Args:
      color: [L, C, H, W] layer intensities.
      alpha: [L, H, W] alphas (layer 0 opaque).
      observation: [V, C, H, W].
      lk: layer kernels.
      weights: weights and constants.
      stop_gradient: the sg(.) on the auxiliary term's weights.

    Returns:
      (data, aux) scalars.
    """
    g = weights.charbonnier_gamma
    mean_i = jnp.mean(observation)
    norm = 0.5 / mean_i
    beta = (mean_i / 0.5) * 2.0 * weights.noise_sigma**2 * lk.inverse_power  # [L, T]
    # Residuals relative to the noise level; 1 (the paper's terms) when noise_power is 0.
    w = (jnp.ones(observation.shape[-2:], observation.dtype) if weights.noise_power == 0
         else intensity_weight(observation, weights.noise_power, weights.noise_floor))
    views, bias, aux_sum = _layer_loop(color, alpha, observation, lk, beta, w, g,
                                       stop_gradient)
    # Term 1: bias-corrected data term.
    err = w * ((views - observation) ** 2 - bias[:, None])
    data = weights.data * norm * jnp.mean(charbonnier(err, g))
    # Term 2: each layer alone, blurred, should match where it is visible; the paper's
    # L times the mean over [V, L, C, H, W].
    aux = weights.aux * norm * aux_sum / observation.size
    return data, aux


def prior_values(intensity: jax.Array, weights: LossWeights) -> jax.Array:
    """Linear intensities as the image priors see them: through `weights.prior_encoding`
    (the identity for "linear"), clipped to [0, 1] otherwise; same shape."""
    return encoding.from_linear_differentiable(intensity, weights.prior_encoding, xp=jnp)


def prior_terms(color: jax.Array, alpha: jax.Array, norm: jax.Array, weights: LossWeights,
                stop_gradient: Callable[[jax.Array], jax.Array] = jax.lax.stop_gradient
                ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Terms 3-5 (weighted): intensity smoothness, alpha smoothness, collision entropy.

    Args:
      color: [L, C, H, W] layer intensities (linear).
      alpha: [L, H, W] alphas (layer 0 opaque).
      norm: the intensity normaliser 0.5 / mean(prior_values(observation)).
      weights: weights and constants.
      stop_gradient: the sg(.) on the layer-TV weights and the edge mask.

    Returns:
      (image_tv, alpha_tv, entropy) scalars.
    """
    g = weights.charbonnier_gamma
    num_layers = color.shape[0]
    trans = mpi.transmittance(alpha)  # [L, H, W]
    color = prior_values(color, weights)

    # Term 3: intensity smoothness, edge-aware with a mask from the image itself.
    aif = mpi.all_in_focus(color, trans)  # [C, H, W]
    var_img = local_variance(norm * aif)  # [C, H-2, W-2]
    tv_img = charbonnier(var_img, g)
    edge = 1.0 - jnp.exp(-var_img / (2.0 * weights.edge_beta**2))
    keep = stop_gradient(1.0 - jnp.mean(edge, axis=0))  # [H-2, W-2], 1 in flat areas
    img_term = jnp.mean(tv_img * keep) + jnp.mean(tv_img)
    tv_layers = tv(norm * color, g)  # [L, C, H-2, W-2]
    lw = num_layers * stop_gradient(_crop1(trans))[:, None]
    layer_term = jnp.mean(lw * tv_layers * keep) + jnp.mean(lw * tv_layers)
    image_tv = weights.image_tv * (img_term + layer_term)

    # Term 4: alpha smoothness on sqrt(alpha) and sqrt(T), edge-aware.
    sqrt_a = sqrt_finite_grad(alpha)
    sqrt_t = sqrt_finite_grad(trans)
    a_tv = jnp.mean((tv(sqrt_a, g) + tv(sqrt_t, g)) * keep)
    alpha_tv = weights.alpha_tv * (num_layers / 12.0) ** 2 * a_tv

    # Term 5: collision entropy pushes each pixel towards a single layer.
    entropy = weights.entropy / math.log(num_layers) * (
        jnp.mean(collision_entropy(sqrt_a[1:])) + jnp.mean(collision_entropy(sqrt_t)))
    return image_tv, alpha_tv, entropy


_ENTROPY_TINY = 1e-12  # floor of the weight sum and of sum_l p_l^2 (all-zero pixels)


@jax.custom_vjp
def collision_entropy(weights: jax.Array) -> jax.Array:
    """H(p) = -log sum_l p_l^2 with p proportional to `weights` along axis 0.

    The gradient is written by hand (one elementwise pass, `layer_ops`' reason):
    with S = sum_l w_l and q = sum_l w_l^2 / S^2, dH/dw_l = -2 (w_l - q S) / (q S^2).

    Args:
      weights: [L, H, W] non-negative.

    Returns:
      [H, W].
    """
    return _entropy_fwd(weights)[0]


def _entropy_fwd(weights):
    total = layer_ops.sum_axis(weights, 0)
    s = jnp.maximum(total, _ENTROPY_TINY)
    q = layer_ops.sum_axis(weights * weights, 0) / (s * s)
    return -jnp.log(jnp.maximum(q, _ENTROPY_TINY)), (weights, total, s, q)


def _entropy_bwd(res, g):
    weights, total, s, q = res
    # Hazards: the floors' branches have no gradient through the floored quantity.
    live = q > _ENTROPY_TINY
    scale = jnp.where(live, -2.0 * g / jnp.where(live, q * s * s, 1.0), 0.0)
    centre = jnp.where(total > _ENTROPY_TINY, q * s, 0.0)
    return (scale[None] * (weights - centre[None]),)


collision_entropy.defvjp(_entropy_fwd, _entropy_bwd)
