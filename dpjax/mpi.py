"""Multiplane-image (MPI) scene model and its occlusion-aware dual-pixel rendering.

Layers are ordered back to front (layer 0 at the back, always opaque). Arrays are
planar inside the solver: colours [L, C, H, W], alphas [L, H, W], observed views
[V, C, H, W]. Public results are converted to [H, W, C] at the API boundary.

Equations (METHOD.md, "Scene representation" and "Rendering the two views"):
  visibility   V_l = prod_{j>l} (1 - a_j)
  transmittance T_l = a_l V_l
  all-in-focus A = sum_l T_l c_l,   defocus D = sum_l T_l s_l (or `defocus_sharpened`)
  view v:  B_v = sum_l (k_vl * a_l c_l) prod_{j>l} (1 - k_vj * a_j)
           blurred transmittance T~_vl = (k_vl * a_l) prod_{j>l} (1 - k_vj * a_j)
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from dpjax import conv, layer_ops
from dpjax.kernels import KernelBank, rescale_kernels


class MpiParams(NamedTuple):
    """Optimised variables, as logits.

    Attributes:
      color_logits: [L, C, H, W] layer intensities before the sigmoid.
      alpha_logits: [L - 1, H, W] alphas of layers 1..L-1 (layer 0 is opaque).
    """

    color_logits: jax.Array
    alpha_logits: jax.Array


class Rendering(NamedTuple):
    """Rendered views and the per-layer quantities the losses need.

    Attributes:
      views: [V, C, H, W] blurred composite of each view.
      blurred_transmittance: [V, L, H, W] T~_vl.
      layer_views: [V, L, C, H, W] each layer's intensity alone, blurred (k_vl * c_l).
    """

    views: jax.Array
    blurred_transmittance: jax.Array
    layer_views: jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LayerKernels:
    """Kernels of every view, layer and tile, prepared once per solve.

    Attributes:
      kernels: [V, L, T, K, K] spatial kernels at the layer scales.
      spectra: [V, L, T, Fh, Fw//2+1] their tile-FFT spectra ("fft" method), or an
        empty array for the "direct" method.
      inverse_power: [L, T] mean over frequencies of C / (sum_v |k_vl(w)|^2 + C),
        the kernel-dependent factor of the data-term bias (METHOD.md, term 1).
      geom: static convolution geometry.
    """

    kernels: jax.Array
    spectra: jax.Array
    inverse_power: jax.Array
    geom: conv.ConvGeometry = dataclasses.field(metadata={"static": True})


# Bias-correction constant C of the data term (METHOD.md, term 1).
BIAS_FREQ_CONSTANT = 5e-3


def prepare_layer_kernels(bank: KernelBank, scales: jax.Array, geom: conv.ConvGeometry, *,
                          own_radius: int | None = None) -> LayerKernels:
    """Rescales the kernel bank to the layer scales and computes spectra once.

    Args:
      bank: reference kernels [V, T, K0, K0].
      scales: [L] signed layer scales, back to front.
      geom: geometry whose radius holds the layer kernels.
      own_radius: the layer kernels' own half-width (default geom.radius): they are
        rescaled into that window (cropped to it where the rescaled kernel is larger,
        `kernels.rescale_kernel`) and zero-padded to the geometry's, and the DFT grid
        of `inverse_power` is that window's. The mean over that grid depends on its
        size, not only on the kernel: a batch of scenes sized for the widest scene's
        radius passes each scene's own radius, so its blur and data term are unchanged.

    Returns:
      LayerKernels.
    """
    own = geom.radius if own_radius is None else own_radius
    if not 0 <= own <= geom.radius:
        raise ValueError(f"own_radius {own} must be in [0, {geom.radius}]")
    k = rescale_kernels(bank.kernels, scales, 2 * own + 1)  # [L, V, T, k, k]
    k = jnp.swapaxes(k, 0, 1)  # [V, L, T, k, k]
    power = jnp.sum(jnp.abs(jnp.fft.fft2(k)) ** 2, axis=0)  # [L, T, k, k]
    inverse_power = jnp.mean(BIAS_FREQ_CONSTANT / (power + BIAS_FREQ_CONSTANT), axis=(-2, -1))
    pad = geom.radius - own
    k = jnp.pad(k, [(0, 0)] * 3 + [(pad, pad)] * 2)  # centred in the geometry's window
    if geom.method == "fft":
        spectra = conv.kernel_spectra(k, geom)
    else:
        spectra = jnp.zeros((0,), jnp.complex64)
    return LayerKernels(kernels=k, spectra=spectra, inverse_power=inverse_power, geom=geom)


def layer_kernel_slices(lk: LayerKernels) -> LayerKernels:
    """The layer kernels stacked per layer, for a `lax.scan` over the layers.

    Returns:
      LayerKernels whose arrays lead with the layer axis: kernels [L, V, 1, T, K, K],
      spectra [L, V, 1, T, Fh, Fw'] (or [L, 0] for the direct method), inverse_power
      [L, 1, T]; slice l is layer l's own LayerKernels (one layer).
    """
    num_layers = lk.inverse_power.shape[0]
    spectra = (jnp.moveaxis(lk.spectra, 1, 0)[:, :, None] if lk.spectra.size
               else jnp.zeros((num_layers, 0), lk.spectra.dtype))
    return LayerKernels(kernels=jnp.moveaxis(lk.kernels, 1, 0)[:, :, None], spectra=spectra,
                        inverse_power=lk.inverse_power[:, None], geom=lk.geom)


def loop_dtype(lk: LayerKernels, *arrays: jax.Array) -> jnp.dtype:
    """The real dtype of a layer loop's running sums over `arrays` blurred by `lk`.

    A `lax.scan` carry keeps one dtype, so the loops (`render_views`,
    `blurred_visibility`, `losses.data_terms`, `refine.render_linear`) start their sums
    in the dtype that jnp's promotion gives the whole-array formula: float32 kernels
    with float64 parameters sum in float64, as `render` would.
    """
    kernel_arrays = [x for x in jax.tree_util.tree_leaves(lk) if x.size]
    return jnp.result_type(*(jnp.finfo(x.dtype).dtype for x in (*arrays, *kernel_arrays)))


def alphas(params: MpiParams) -> jax.Array:
    """[L, H, W] alphas with the back layer fixed opaque."""
    front = jax.nn.sigmoid(params.alpha_logits)
    back = jnp.ones((1,) + front.shape[1:], front.dtype)
    return jnp.concatenate([back, front], axis=0)


def colors(params: MpiParams) -> jax.Array:
    """[L, C, H, W] layer intensities in (0, 1)."""
    return jax.nn.sigmoid(params.color_logits)


def visibility(alpha: jax.Array) -> jax.Array:
    """V_l = prod_{j>l} (1 - alpha_j) along axis -3 (layers), back to front.

    Args:
      alpha: [..., L, H, W].

    Returns:
      [..., L, H, W]; the front layer has visibility 1.
    """
    return layer_ops.front_products(1.0 - alpha)


def transmittance(alpha: jax.Array) -> jax.Array:
    """T_l = alpha_l V_l; sums to one over layers when layer 0 is opaque."""
    return alpha * visibility(alpha)


def all_in_focus(color: jax.Array, trans: jax.Array) -> jax.Array:
    """A = sum_l T_l c_l: [L, C, H, W], [L, H, W] -> [C, H, W]."""
    return layer_ops.sum_axis(color * trans[:, None], 0)


def defocus_map(trans: jax.Array, scales: jax.Array) -> jax.Array:
    """D = sum_l T_l s_l: [L, H, W], [L] -> [H, W]."""
    return jnp.tensordot(scales, trans, axes=1)


SHARPEN_POWER = 8.0  # `defocus_sharpened`'s power (experiments/results/pixel4.md)


def defocus_sharpened(trans: jax.Array, scales: jax.Array, power: float = SHARPEN_POWER,
                      ) -> jax.Array:
    """D = sum_l T_l^p s_l / sum_l T_l^p: [L, H, W], [L] -> [H, W].

    The transmittance-weighted mean (`defocus_map`, p = 1) with the weights raised to
    a power, so that each pixel's heaviest layers dominate (p -> inf: the heaviest
    layer's scale). Where the transmittances are concentrated the two agree. Where
    they are spread (a short solve leaves weakly textured regions so: the entropy
    prior has had few steps to sharpen them), the plain mean is pulled towards the
    middle of the layer range by the spread, while the sharpened one stays near the
    peak the data made. Computed relative to each pixel's largest weight, so the
    result is finite for any power.
    """
    logt = jnp.log(jnp.maximum(trans, 0.0))  # -inf where a weight is exactly 0
    w = jnp.exp(power * (logt - jnp.max(logt, axis=0, keepdims=True)))  # max weight 1
    return jnp.tensordot(scales, w, axes=1) / jnp.sum(w, axis=0)


DEFOCUS_ESTIMATORS = {"mean": defocus_map, "sharpened": defocus_sharpened}


def defocus_estimator_fn(estimator: str):
    """DEFOCUS_ESTIMATORS[estimator], or a ValueError naming the choices."""
    if estimator not in DEFOCUS_ESTIMATORS:
        raise ValueError(f"unknown defocus estimator {estimator!r}; choose one of "
                         f"{sorted(DEFOCUS_ESTIMATORS)}")
    return DEFOCUS_ESTIMATORS[estimator]


def estimate_defocus(trans: jax.Array, scales: jax.Array, estimator: str = "mean"
                     ) -> jax.Array:
    """The defocus map by `estimator` (DEFOCUS_ESTIMATORS): [L, H, W], [L] -> [H, W]."""
    return defocus_estimator_fn(estimator)(trans, scales)


def blur_layers(signals: jax.Array, lk: LayerKernels) -> jax.Array:
    """Blurs every layer's signals with that layer's kernels, for both views.

    Args:
      signals: [L, S, H, W] S signals per layer (edge-padded internally).
      lk: prepared layer kernels.

    Returns:
      [V, L, S, H, W].
    """
    return blur_padded_layers(conv.pad_edges(signals, lk.geom.radius), lk)


def blur_padded_layers(padded: jax.Array, lk: LayerKernels) -> jax.Array:
    """`blur_layers` of signals already padded by the kernel radius r.

    Args:
      padded: [L, S, H + 2r, W + 2r].
      lk: prepared layer kernels.

    Returns:
      [V, L, S, H, W] (the valid part).
    """
    geom = lk.geom
    if geom.method == "fft":
        spec = conv.tile_spectra(padded, geom)  # [L, S, T, Fh, Fw'] computed once for both views
        # Broadcast the views' kernel spectra over the S signals of each layer.
        return conv.apply_spectra(spec[None], lk.spectra[:, :, None], geom)
    num_layers, num_signals = padded.shape[:2]

    def per_view(kernels):  # kernels: [L, T, K, K]
        k = jnp.repeat(kernels[:, None], num_signals, axis=1)
        flat_x = padded.reshape((num_layers * num_signals,) + padded.shape[2:])
        flat_k = k.reshape((num_layers * num_signals,) + k.shape[2:])
        out = conv.convolve_tiles_direct(flat_x, flat_k, geom)
        return out.reshape((num_layers, num_signals) + out.shape[1:])

    return jax.vmap(per_view)(lk.kernels)


def blurred_visibility(alpha: jax.Array, lk: LayerKernels) -> jax.Array:
    """Vis~_vl = prod_{j>l} (1 - k_vj * a_j), one layer at a time (front to back).

    Equal to `visibility(blur_layers(alpha[:, None], lk)[:, :, 0])` without holding
    every layer's FFT products at once.

    Args:
      alpha: [L, H, W] alphas.
      lk: prepared layer kernels.

    Returns:
      [V, L, H, W].
    """
    def step(vis, xs):  # vis: [V, H, W], the product over the layers in front
        a, lk_l = xs
        blurred = blur_layers(a[None, None], lk_l)[:, 0, 0]  # [V, H, W]  k_vl * a_l
        return vis * (1.0 - blurred), vis

    v = lk.kernels.shape[0]
    init = jnp.ones((v,) + alpha.shape[1:], loop_dtype(lk, alpha))
    _, vis = jax.lax.scan(step, init, (alpha, layer_kernel_slices(lk)), reverse=True)
    return jnp.moveaxis(vis, 0, 1)


def render(params: MpiParams, lk: LayerKernels) -> Rendering:
    """Occlusion-aware rendering of both dual-pixel views (METHOD.md), all layers at once.

    Holds every layer's blurred signals: for inspecting a solve and for tests. The loss
    computes the same views one layer at a time (`losses.data_terms`), as does
    `render_views`.
    """
    c = colors(params)  # [L, C, H, W]
    a = alphas(params)  # [L, H, W]
    num_c = c.shape[1]
    signals = jnp.concatenate([a[:, None] * c, a[:, None], c], axis=1)  # [L, 2C+1, H, W]
    blurred = blur_layers(signals, lk)  # [V, L, 2C+1, H, W]
    premult = blurred[:, :, :num_c]
    blurred_alpha = blurred[:, :, num_c]
    layer_views = blurred[:, :, num_c + 1:]
    vis = visibility(blurred_alpha)  # [V, L, H, W]
    views = layer_ops.sum_axis(premult * vis[:, :, None], 1)  # [V, C, H, W]
    return Rendering(views=views, blurred_transmittance=blurred_alpha * vis,
                     layer_views=layer_views)


def render_views(color: jax.Array, alpha: jax.Array, lk: LayerKernels) -> jax.Array:
    """Renders both views of an MPI given directly by colours and alphas.

    Used to synthesise observations with known ground truth. One layer at a time, front
    to back (as `losses.data_terms`), so a large frame never holds every layer's blurred
    signals at once; equal to `render(...).views` (tested).

    Args:
      color: [L, C, H, W] layer intensities.
      alpha: [L, H, W] alphas (layer 0 should be 1).

    Returns:
      [V, C, H, W].
    """
    num_c = color.shape[1]
    signals = jnp.concatenate([alpha[:, None] * color, alpha[:, None]], axis=1)

    def step(carry, xs):
        vis, views = carry  # [V, H, W], [V, C, H, W]
        sig, lk_l = xs
        blurred = blur_layers(sig[None], lk_l)[:, 0]  # [V, C + 1, H, W]
        views = views + blurred[:, :num_c] * vis[:, None]
        return (vis * (1.0 - blurred[:, num_c]), views), None

    v = lk.kernels.shape[0]
    dtype = loop_dtype(lk, color, alpha)
    init = (jnp.ones((v,) + color.shape[-2:], dtype), jnp.zeros((v,) + color.shape[1:], dtype))
    (_, views), _ = jax.lax.scan(step, init, (signals, layer_kernel_slices(lk)), reverse=True)
    return views


def init_params(observation: jax.Array, num_layers: int) -> MpiParams:
    """The paper's initialisation: c_l = mean input, alpha_l = 1 / (l + 1).

    With these alphas every layer starts with transmittance 1/L.

    Args:
      observation: [V, C, H, W] views.
      num_layers: L.
    """
    mean = jnp.mean(observation, axis=0)  # [C, H, W]
    mean = jnp.clip(mean, 1e-3, 1 - 1e-3)
    color_logits = jnp.broadcast_to(jax.scipy.special.logit(mean),
                                    (num_layers,) + mean.shape)
    layer = jnp.arange(1, num_layers, dtype=jnp.float32)
    alpha0 = 1.0 / (layer + 1.0)
    alpha_logits = jnp.broadcast_to(jax.scipy.special.logit(alpha0)[:, None, None],
                                    (num_layers - 1,) + mean.shape[1:])
    return MpiParams(color_logits=jnp.asarray(color_logits, jnp.float32),
                     alpha_logits=jnp.asarray(alpha_logits, jnp.float32))
