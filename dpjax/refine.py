"""Final all-in-focus refinement with the layer weights frozen (a non-blind deconvolution).

After the MPI fit, the alphas say which layer, hence which pair of blur kernels, each
pixel is seen through. With them frozen, the rendering of both views (METHOD.md,
"Rendering the two views") is linear in the colours:

  B_v = sum_l Vis~_vl . (k_vl * (a_l c_l)),   Vis~_vl = prod_{j>l} (1 - k_vj * a_j),

so the sharp image can be refined at full resolution by a classical regularised
deconvolution whose operator is the MPI's own occlusion-aware, spatially varying blur.

The unknown is one latent image x per pixel, shared by every layer (c_l = x), not the
L per-layer colours. Reasons: the composite all-in-focus image is then x itself (the
transmittances sum to one), so the image prior acts directly on the output; there
are C x H x W unknowns for 2 C H W observations, a well-posed deconvolution, where
the L C H W per-layer colours are unconstrained wherever a layer is transparent and
the composite mixes them with the (often spread) transmittances of a short fit. The
cost is a model error behind occluders: a blurred layer's light from behind a nearer
layer is that nearer layer's colour in this model. `RefineConfig.unknown = "layers"`
keeps the per-layer colours instead. It runs by default (15 iterations;
`RefineConfig.iters = 0` turns it off). What has been measured of it (on the six
Pixel 4 scenes at full resolution +0.17 dB over the fit's image and ahead of a Wiener
filter at the same map, better on every scene; its settings and their choice):
experiments/results/pixel4.md, "All-in-focus refinement".

Objective (intensities scaled by n = 0.5 / mean(I), as in `dpjax.losses`):

  E(x) = 1/2 sum_v mean_{C,H,W} (n (A_v x - I_v))^2
         + weight * sum_{C,H',W'} phi(n grad x) / (C H W),
  phi(g) = (|g|^2 + eps^2)^(p/2) - eps^p,

with |g| the isotropic magnitude of forward differences: p = 1 is a smoothed total
variation, p < 1 a smoothed hyper-Laplacian (Krishnan & Fergus 2009) prior. It is
minimised by L-BFGS (optax.lbfgs with its zoom line search; scaled so that the step
of 1 is accepted at once on almost every iteration: one objective-and-gradient
evaluation per iteration) in one compiled `while_loop`, starting from the fit's
composite.

Boundary: the fit pads the MPI by edge replication, which is wrong near the frame's
border (the scene outside the frame is not a copy of the border pixels). With
`boundary = "free"` the unknown image extends by the kernel radius r beyond the
frame on every side ([C, H + 2r, W + 2r]) and the data term covers only the frame,
so the content outside is estimated, not assumed; the alphas outside stay edge-padded.
`boundary = "edge"` keeps the fit's padding (the operator is then exactly
`mpi.render`'s with c_l = x).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dpjax import conv, mpi


@dataclasses.dataclass(frozen=True, kw_only=True)
class RefineConfig:
    """The final refinement of the all-in-focus image (module docstring).

    Attributes:
      iters: L-BFGS iterations; 0 turns the refinement off (the fit's composite is
        the output, exactly as without this stage).
      weight: prior weight (against the data term as written in the module docstring).
      power: p of the prior phi; 1 = smoothed total variation, < 1 hyper-Laplacian.
      eps: smoothing of the gradient magnitude in phi, in normalised intensity units
        (the image scaled to mean 0.5).
      unknown: "image", one latent image shared by the layers (output = it);
        "hidden", that image where a layer is visible and a second, hidden image
        behind nearer layers (c_l = V_l x + (1 - V_l) b; output x); or "layers", the
        per-layer colours (output = their composite).
      boundary: "free" (unknown content beyond the frame) or "edge" (the fit's edge
        replication).
      robust: gamma of a Charbonnier data term gamma^2 (sqrt(1 + r^2 / gamma^2) - 1)
        on the normalised residual r (quadratic below gamma, linear above: model
        errors at seams and occlusions pull less); 0 = least squares.
      nonneg: weight of a quadratic penalty on negative (normalised) intensities of
        the image, part of the prior term; 0 = none.
      anchor: weight of (1/2) mean (n (image - fit's composite))^2, part of the prior
        term: keeps the image near the fit's where the data leaves it free; 0 = none.
      sharpen: power p applied to the fitted transmittances before the operator is
        built, T_l^p / sum_m T_m^p (the weighting of `mpi.defocus_sharpened`); 1 keeps
        the fit's alphas. A short fit leaves each pixel's weights spread over many
        layers, which blurs it with a mixture of kernels; sharpening blurs it with its
        heaviest layers' kernels instead.
      memory: L-BFGS history length.
      bilateral: apply the post-processing bilateral filter (PostConfig) after the
        refinement too; False skips it when the refinement runs (its prior replaces
        the filter's denoising). Without refinement PostConfig alone decides.
    """

    # The defaults below were chosen on three shared scenes' 3x4 crops and checked on
    # the other three: experiments/results/pixel4.md, "All-in-focus refinement".
    iters: int = 15
    weight: float = 3e-3
    power: float = 1.0
    eps: float = 1e-2
    unknown: Literal["image", "hidden", "layers"] = "image"
    boundary: Literal["free", "edge"] = "free"
    robust: float = 0.02
    nonneg: float = 100.0
    anchor: float = 0.1
    sharpen: float = 4.0
    memory: int = 10
    bilateral: bool = False

    def __post_init__(self):
        if self.iters < 0:
            raise ValueError(f"refine iters must be >= 0, got {self.iters}")
        if not self.weight >= 0 or not self.eps > 0 or not 0 < self.power <= 2:
            raise ValueError("refine needs weight >= 0, eps > 0 and 0 < power <= 2")
        if self.unknown not in ("image", "hidden", "layers"):
            raise ValueError(f"unknown refine unknown {self.unknown!r}; use 'image', 'hidden' "
                             "or 'layers'")
        if self.boundary not in ("free", "edge"):
            raise ValueError(f"unknown refine boundary {self.boundary!r}; use 'free' or 'edge'")
        if not self.robust >= 0 or not self.nonneg >= 0 or not self.anchor >= 0:
            raise ValueError("refine robust, nonneg and anchor must be >= 0")
        if not self.sharpen >= 1:
            raise ValueError(f"refine sharpen must be >= 1, got {self.sharpen}")
        if self.memory < 1:
            raise ValueError("refine memory must be >= 1")


class Problem(NamedTuple):
    """The fixed parts of the linear model, computed once from the frozen alphas.

    Attributes:
      alpha: [L, Hp, Wp] alphas edge-padded by the kernel radius r (Hp = H + 2r).
      trans: [L, Hp, Wp] their transmittances T_l (the composite's weights).
      visibility: [V, L, H, W] blurred visibility Vis~_vl of every layer in each view.
      observation: [V, C, H, W] the views.
      norm: scalar n = 0.5 / mean(observation).
      reference: [C, H, W] the fit's composite (the anchor's target).
    """

    alpha: jax.Array
    trans: jax.Array
    visibility: jax.Array
    observation: jax.Array
    norm: jax.Array
    reference: jax.Array


class RefineResult(NamedTuple):
    """Output of `refine_all_in_focus` (host values).

    Attributes:
      all_in_focus: [C, H, W] refined image (planar, same scale as the views).
      objective_start, objective_end: E at the fit's composite and at the result.
      data_end, prior_end: the two terms of E at the result.
      iterations: L-BFGS iterations run.
      evaluations: objective-and-gradient evaluations of the line searches (an
        iteration costs about its share of these; ~1 when the scaling is right).
    """

    all_in_focus: np.ndarray
    objective_start: float
    objective_end: float
    data_end: float
    prior_end: float
    iterations: int
    evaluations: int


def unknown_images(cfg: RefineConfig, num_layers: int) -> int:
    """How many C-channel images the refinement's unknown holds (0: it does not run)."""
    if cfg.iters == 0:
        return 0
    return {"image": 1, "hidden": 2, "layers": num_layers}[cfg.unknown]


def sharpen_alphas(alpha: jax.Array, power: float) -> jax.Array:
    """Alphas [L, H, W] whose transmittances are T_l^p / sum_m T_m^p of the given ones.

    Computed relative to each pixel's largest transmittance (finite for any power);
    alpha_l = T'_l / sum_{m <= l} T'_m, back to front, gives exactly these T'_l.
    """
    if power == 1:
        return alpha
    logt = jnp.log(jnp.maximum(mpi.transmittance(alpha), 0.0))
    w = jnp.exp(power * (logt - jnp.max(logt, axis=0, keepdims=True)))  # max weight 1
    trans = w / jnp.sum(w, axis=0)
    below = jnp.cumsum(trans, axis=0)  # sum_{m <= l}; >= T_l, and layer 0's is T_0
    # Hazard: where every layer up to l has weight 0 the alpha is 0/0; any value gives
    # the same transmittances there, and layer 0 stays opaque.
    out = jnp.where(below > 0, trans / jnp.where(below > 0, below, 1.0), 0.0)
    return out.at[0].set(1.0)


def prepare(alpha: jax.Array, observation: jax.Array, lk: mpi.LayerKernels,
            reference: jax.Array | None = None) -> Problem:
    """The frozen operator's fixed parts.

    Args:
      alpha: [L, H, W] the alphas to freeze (layer 0 opaque; `mpi.alphas`, optionally
        `sharpen_alphas`).
      observation: [V, C, H, W] views.
      lk: the layer kernels of the fit at this resolution.
      reference: [C, H, W] the fit's composite (default zeros: no anchor target).
    """
    if reference is None:
        reference = jnp.zeros(observation.shape[1:], observation.dtype)
    padded = conv.pad_edges(alpha, lk.geom.radius)
    return Problem(alpha=padded, trans=mpi.transmittance(padded),
                   visibility=mpi.blurred_visibility(alpha, lk), observation=observation,
                   norm=0.5 / jnp.mean(observation), reference=reference)


def _layer_signals(x: jax.Array, problem: Problem, radius: int, cfg: RefineConfig
                   ) -> jax.Array:
    """[L, C, Hp, Wp] padded premultiplied colours a_l c_l of the unknown."""
    if cfg.boundary == "edge":
        x = conv.pad_edges(x, radius)
    alpha = problem.alpha[:, None]
    if cfg.unknown == "image":  # x: [C, Hp, Wp], c_l = x
        return alpha * x[None]
    if cfg.unknown == "hidden":  # x: [2, C, Hp, Wp], c_l = V_l x_0 + (1 - V_l) x_1
        trans = problem.trans[:, None]
        return trans * x[0][None] + (alpha - trans) * x[1][None]
    return alpha * x  # x: [L, C, Hp, Wp]


def render_linear(x: jax.Array, problem: Problem, lk: mpi.LayerKernels,
                  cfg: RefineConfig) -> jax.Array:
    """The views A x rendered from the unknown with the alphas frozen (linear in x).

    Args:
      x: the unknown: "image" [C, H', W'], "hidden" [2, C, H', W'] (visible, hidden),
        "layers" [L, C, H', W'], where H' = H + 2r for the "free" boundary and H for
        "edge" (r = lk.geom.radius).
      problem: from `prepare`.
      lk: layer kernels.
      cfg: fixes the unknown's kind and boundary.

    Returns:
      [V, C, H, W].
    """
    signals = _layer_signals(x, problem, lk.geom.radius, cfg)  # [L, C, Hp, Wp]

    # One layer at a time (as the fit's loss): no all-layers FFT products are held.
    def step(views, xs):
        sig, lk_l, vis = xs  # [C, Hp, Wp], one layer's kernels, [V, H, W]
        blurred = mpi.blur_padded_layers(sig[None], lk_l)[:, 0]  # [V, C, H, W]
        return views + blurred * vis[:, None], None

    obs = problem.observation
    dtype = mpi.loop_dtype(lk, signals, problem.visibility)
    views, _ = jax.lax.scan(step, jnp.zeros(obs.shape, dtype),
                            (signals, mpi.layer_kernel_slices(lk),
                             jnp.moveaxis(problem.visibility, 1, 0)))
    return views  # [V, C, H, W]


def adjoint(problem: Problem, lk: mpi.LayerKernels, cfg: RefineConfig, like: jax.Array):
    """The adjoint A^T of `render_linear` as a function [V, C, H, W] -> like's shape.

    jax.linear_transpose of the forward operator: the tests check it against the
    dot-product identity <A x, y> = <x, A^T y>.
    """
    transpose = jax.linear_transpose(
        lambda x: render_linear(x, problem, lk, cfg), jax.ShapeDtypeStruct(like.shape, like.dtype))
    return lambda y: transpose(y)[0]


def _image(x: jax.Array, problem: Problem, radius: int, cfg: RefineConfig) -> jax.Array:
    """The all-in-focus image [C, H', W'] of the unknown over its whole extent."""
    if cfg.unknown == "image":
        return x
    if cfg.unknown == "hidden":
        return x[0]
    trans = problem.trans
    if cfg.boundary == "edge":
        trans = trans[:, radius:trans.shape[1] - radius, radius:trans.shape[2] - radius]
    return mpi.all_in_focus(x, trans)


def composite(x: jax.Array, problem: Problem, radius: int, cfg: RefineConfig) -> jax.Array:
    """The all-in-focus image [C, H, W] of the unknown (cropped to the frame)."""
    image = _image(x, problem, radius, cfg)
    if cfg.boundary == "free":
        h, w = problem.observation.shape[-2:]
        image = image[..., radius:radius + h, radius:radius + w]
    return image


def _prior(image: jax.Array, cfg: RefineConfig) -> jax.Array:
    """sum of phi(grad image) over [..., H', W'] (isotropic forward differences).

    Hazard guarded: eps > 0 keeps phi and its gradient finite where the gradient is 0.
    """
    gx = image[..., :-1, 1:] - image[..., :-1, :-1]
    gy = image[..., 1:, :-1] - image[..., :-1, :-1]
    mag2 = gx * gx + gy * gy + cfg.eps**2
    return jnp.sum(mag2 ** (0.5 * cfg.power) - cfg.eps**cfg.power)


def objective_terms(x: jax.Array, problem: Problem, lk: mpi.LayerKernels,
                    cfg: RefineConfig) -> tuple[jax.Array, jax.Array]:
    """(data, prior) terms of E(x) (module docstring); E is their sum.

    The prior applies to the output image over the unknown's whole extent (for
    "layers" the composite: the colours of hidden layers are left to the data term),
    and with unknown = "hidden" to the hidden image too.
    """
    n = problem.norm
    resid = n * (render_linear(x, problem, lk, cfg) - problem.observation)
    sq = resid * resid
    if cfg.robust > 0:  # gamma^2 (sqrt(1 + r^2 / gamma^2) - 1): r^2 / 2 for small r
        # written as r^2 / (1 + sqrt(1 + r^2 / gamma^2)) (times 2, for the 0.5 below):
        # the difference form cancels to zero in float32 for r << gamma.
        sq = 2.0 * sq / (1.0 + jnp.sqrt(1.0 + sq / cfg.robust**2))
    data = 0.5 * jnp.sum(jnp.mean(sq, axis=(1, 2, 3)))
    image = _image(x, problem, lk.geom.radius, cfg)
    # The hidden image is an image too: it gets the same prior.
    regular = x if cfg.unknown == "hidden" else image
    num_px = problem.observation[0].size  # C H W
    prior = cfg.weight * _prior(n * regular, cfg) / num_px
    if cfg.nonneg > 0:  # intensities are non-negative: a quadratic penalty below 0
        neg = jnp.minimum(n * regular, 0.0)
        prior = prior + 0.5 * cfg.nonneg * jnp.sum(neg * neg) / num_px
    if cfg.anchor > 0:  # stay near the fit's composite where the data does not object
        frame = composite(x, problem, lk.geom.radius, cfg)
        prior = prior + 0.5 * cfg.anchor * jnp.mean((n * (frame - problem.reference)) ** 2)
    return data, prior


def initial_unknown(color: jax.Array, trans: jax.Array, radius: int, cfg: RefineConfig
                    ) -> jax.Array:
    """The unknown at the fit's solution (both images of "hidden" at the composite).

    Args:
      color: [L, C, H, W] fitted colours.
      trans: [L, H, W] the fit's transmittances (the image starts at the fit's
        composite even when the operator's weights are sharpened).
    """
    if cfg.unknown == "layers":
        x = color
    else:
        x = mpi.all_in_focus(color, trans)
        if cfg.unknown == "hidden":
            x = jnp.stack([x, x])
    if cfg.boundary == "free":
        x = conv.pad_edges(x, radius)
    return x


def _all_finite(tree) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(v)) for v in jax.tree_util.tree_leaves(tree)]))


@functools.partial(jax.jit, static_argnames=("cfg",), donate_argnums=(0,))
def _run(x0: jax.Array, problem: Problem, lk: mpi.LayerKernels, *, cfg: RefineConfig):
    """cfg.iters L-BFGS steps from x0 in one compiled while_loop.

    Returns:
      (x, objective at x0, data and prior at x, iterations run, line-search
      evaluations, finite flag). A non-finite value, gradient or iterate stops the
      loop at the last good iterate.
    """

    # L-BFGS minimises E times the number of observed values per view (C H W): E is a
    # mean, so its Hessian is O(1 / CHW) per unknown, while L-BFGS's first step (a
    # unit-norm gradient step) and the line search's initial step of 1 assume O(1).
    # At E's scale the first step is ~CHW times too short and its curvature pair is
    # lost in float32 rounding: the zoom line search then spends 1.5-4 evaluations per
    # iteration lengthening steps (a backtracking search, which never lengthens one,
    # stalls), against ~1 at this scale (benchmarks/bench_refine.py).
    size = problem.observation[0].size

    def value_fn(x):
        data, prior = objective_terms(x, problem, lk, cfg)
        return size * (data + prior)

    opt = optax.lbfgs(memory_size=cfg.memory)
    value_and_grad = optax.value_and_grad_from_state(value_fn)

    def cond(carry):
        _, _, it, _, ok = carry
        return (it < cfg.iters) & ok

    def body(carry):
        x, state, it, evals, _ = carry
        value, grad = value_and_grad(x, state=state)
        updates, new_state = opt.update(grad, state, x, value=value, grad=grad,
                                        value_fn=value_fn)
        new_x = optax.apply_updates(x, updates)
        ok = jnp.isfinite(value) & _all_finite(grad) & _all_finite(new_x)
        evals = evals + optax.tree_utils.tree_get(new_state, "num_linesearch_steps")
        x, state = jax.tree_util.tree_map(lambda a, b: jnp.where(ok, a, b),
                                          (new_x, new_state), (x, state))
        return x, state, it + jnp.where(ok, 1, 0), evals, ok

    start = value_fn(x0)
    state0 = opt.init(x0)
    x, _, iters, evals, ok = jax.lax.while_loop(
        cond, body, (x0, state0, jnp.int32(0), jnp.int32(0), jnp.isfinite(start)))
    start = start / size
    data, prior = objective_terms(x, problem, lk, cfg)
    ok = ok & jnp.isfinite(data + prior) & jnp.all(jnp.isfinite(x))
    return x, start, data, prior, iters, evals, ok


def refine_all_in_focus(params: mpi.MpiParams, observation: jax.Array, lk: mpi.LayerKernels,
                        cfg: RefineConfig) -> RefineResult:
    """Refines the fit's all-in-focus image with its alphas frozen (module docstring).

    Args:
      params: the fitted MPI logits (colours [L, C, H, W], alphas [L - 1, H, W]).
      observation: [V, C, H, W] the views the fit used (full resolution).
      lk: the fit's layer kernels at this resolution.
      cfg: refinement settings; cfg.iters must be > 0.

    Returns:
      RefineResult.

    Raises:
      FloatingPointError: when the objective, its gradient or the image becomes
        non-finite.
    """
    if cfg.iters < 1:
        raise ValueError("refine_all_in_focus needs cfg.iters >= 1")
    alpha = mpi.alphas(params)
    color, trans = mpi.colors(params), mpi.transmittance(alpha)
    problem = prepare(sharpen_alphas(alpha, cfg.sharpen), observation, lk,
                      mpi.all_in_focus(color, trans))
    radius = lk.geom.radius
    x0 = initial_unknown(color, trans, radius, cfg)
    x, start, data, prior, iters, evals, ok = _run(x0, problem, lk, cfg=cfg)
    if not bool(ok):
        raise FloatingPointError(
            f"all-in-focus refinement: non-finite objective, gradient or image after "
            f"{int(iters)} of {cfg.iters} L-BFGS iterations (objective at the start "
            f"{float(start):.6g}); lower RefineConfig.weight or check the input")
    image = composite(x, problem, radius, cfg)
    return RefineResult(all_in_focus=np.asarray(image), objective_start=float(start),
                        objective_end=float(data + prior), data_end=float(data),
                        prior_end=float(prior), iterations=int(iters),
                        evaluations=int(evals))
