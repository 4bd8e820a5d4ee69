import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dpjax
from dpjax import conv, metrics, mpi, postprocess, refine
from dpjax.kernels import layer_kernel_radius, rescaled_radius, support_radius

NUM_LAYERS = 6
SCALES = np.linspace(1.5, 0.1, NUM_LAYERS).astype(np.float32)


@pytest.fixture(scope="module")
def scene(tiny_bank):
    rng = np.random.default_rng(3)
    return dpjax.make_scene(rng, tiny_bank, num_layers=3, scale_range=(0.2, 1.4), slope=2.0)


@pytest.fixture(scope="module")
def layer_kernels(tiny_bank):
    radius = rescaled_radius(tiny_bank.kernel_size, float(np.max(np.abs(SCALES))))
    geom = conv.ConvGeometry.create(tiny_bank.grid, radius)
    return mpi.prepare_layer_kernels(tiny_bank, jnp.asarray(SCALES), geom)


def _random_problem(scene, lk, seed=0):
    rng = np.random.default_rng(seed)
    h, w = scene.views.shape[1:3]
    logits = jnp.asarray(rng.normal(0.0, 2.0, (NUM_LAYERS - 1, h, w)), jnp.float32)
    alpha = mpi.alphas(mpi.MpiParams(jnp.zeros((NUM_LAYERS, 1, h, w)), logits))
    obs = jnp.asarray(np.transpose(scene.views, (0, 3, 1, 2)))
    return refine.prepare(alpha, obs, lk), alpha, rng


def _unknown_shape(problem, lk, cfg):
    num_c, h, w = problem.observation.shape[1:]
    if cfg.boundary == "free":
        h, w = h + 2 * lk.geom.radius, w + 2 * lk.geom.radius
    lead = {"image": (), "hidden": (2,), "layers": (NUM_LAYERS,)}[cfg.unknown]
    return lead + (num_c, h, w)


def test_operator_is_the_mpi_rendering(scene, layer_kernels):
    # With the fit's edge padding and c_l = x, A x is exactly mpi's occlusion-aware render.
    problem, alpha, rng = _random_problem(scene, layer_kernels)
    x = jnp.asarray(rng.uniform(size=problem.observation.shape[1:]), jnp.float32)
    cfg = refine.RefineConfig(iters=1, boundary="edge")
    ours = refine.render_linear(x, problem, layer_kernels, cfg)
    ref = mpi.render_views(jnp.broadcast_to(x, (NUM_LAYERS,) + x.shape), alpha, layer_kernels)
    np.testing.assert_allclose(np.asarray(ours), np.asarray(ref), rtol=1e-6, atol=1e-6)
    # Per-layer colours through the same operator: the general rendering.
    colors = jnp.asarray(rng.uniform(size=(NUM_LAYERS,) + x.shape), jnp.float32)
    cfg = refine.RefineConfig(iters=1, boundary="edge", unknown="layers")
    np.testing.assert_allclose(np.asarray(refine.render_linear(colors, problem, layer_kernels,
                                                                cfg)),
                               np.asarray(mpi.render_views(colors, alpha, layer_kernels)),
                               rtol=1e-6, atol=1e-6)


def test_free_boundary_equals_edge_for_an_edge_padded_image(scene, layer_kernels):
    problem, _, rng = _random_problem(scene, layer_kernels)
    x = jnp.asarray(rng.uniform(size=problem.observation.shape[1:]), jnp.float32)
    edge = refine.render_linear(x, problem, layer_kernels,
                                refine.RefineConfig(boundary="edge"))
    free = refine.render_linear(conv.pad_edges(x, layer_kernels.geom.radius), problem,
                                layer_kernels, refine.RefineConfig(boundary="free"))
    np.testing.assert_allclose(np.asarray(free), np.asarray(edge), rtol=1e-6, atol=1e-6)


def test_hidden_image_equal_to_the_visible_one_is_the_shared_image(scene, layer_kernels):
    # c_l = V_l x + (1 - V_l) b with b = x is c_l = x.
    problem, _, rng = _random_problem(scene, layer_kernels)
    x = jnp.asarray(rng.uniform(size=problem.observation.shape[1:]), jnp.float32)
    x = conv.pad_edges(x, layer_kernels.geom.radius)
    one = refine.render_linear(x, problem, layer_kernels, refine.RefineConfig())
    two = refine.render_linear(jnp.stack([x, x]), problem, layer_kernels,
                               refine.RefineConfig(unknown="hidden"))
    np.testing.assert_allclose(np.asarray(two), np.asarray(one), rtol=1e-5, atol=1e-6)
    # A different hidden image changes the views only near occlusions, not the output.
    hidden = refine.render_linear(jnp.stack([x, 0.0 * x]), problem, layer_kernels,
                                  refine.RefineConfig(unknown="hidden"))
    assert float(jnp.max(jnp.abs(hidden - one))) > 1e-3
    out = refine.composite(jnp.stack([x, 0.0 * x]), problem, layer_kernels.geom.radius,
                           refine.RefineConfig(unknown="hidden"))
    r = layer_kernels.geom.radius
    np.testing.assert_array_equal(np.asarray(out), np.asarray(x[:, r:-r, r:-r]))


@pytest.mark.parametrize("unknown,boundary", [("image", "free"), ("image", "edge"),
                                              ("hidden", "free"), ("layers", "edge")])
def test_adjoint_dot_product(scene, layer_kernels, unknown, boundary):
    problem, _, rng = _random_problem(scene, layer_kernels, seed=1)
    cfg = refine.RefineConfig(unknown=unknown, boundary=boundary)
    x = jnp.asarray(rng.normal(size=_unknown_shape(problem, layer_kernels, cfg)), jnp.float32)
    y = jnp.asarray(rng.normal(size=problem.observation.shape), jnp.float32)
    ax = refine.render_linear(x, problem, layer_kernels, cfg)
    aty = refine.adjoint(problem, layer_kernels, cfg, x)(y)
    assert aty.shape == x.shape
    lhs = float(jnp.vdot(ax, y))
    rhs = float(jnp.vdot(x, aty))
    scale = float(jnp.linalg.norm(ax) * jnp.linalg.norm(y))
    assert abs(lhs - rhs) < 1e-5 * scale, (lhs, rhs)
    # And the data term's autodiff gradient is A^T applied to the scaled residual.
    cfg0 = refine.RefineConfig(unknown=unknown, boundary=boundary, weight=0.0, robust=0.0)
    grad = jax.grad(lambda z: refine.objective_terms(z, problem, layer_kernels, cfg0)[0])(x)
    n = problem.norm
    resid = ax - problem.observation
    expect = refine.adjoint(problem, layer_kernels, cfg, x)(
        n * n * resid / problem.observation[0].size)
    np.testing.assert_allclose(np.asarray(grad), np.asarray(expect), rtol=1e-4,
                               atol=1e-4 * float(jnp.max(jnp.abs(expect))))


def test_adjoint_matches_the_dense_transpose(tiny_bank):
    # A 1x1-tile problem small enough to build the matrix of A column by column.
    pairs = dpjax.parametric_dp_kernels(radius=2.0, ramp=0.4, smooth_sigma=0.5, size=7)
    bank = dpjax.KernelBank.create(np.asarray(pairs)[:, None], rows=1, cols=1, tile_h=8,
                                   tile_w=10)
    scales = jnp.asarray([1.2, 0.3], jnp.float32)
    geom = conv.ConvGeometry.create(bank.grid, rescaled_radius(bank.kernel_size, 1.2))
    lk = mpi.prepare_layer_kernels(bank, scales, geom)
    rng = np.random.default_rng(2)
    alpha = jnp.asarray(np.stack([np.ones((8, 10)), rng.uniform(size=(8, 10))]), jnp.float32)
    obs = jnp.asarray(rng.uniform(size=(2, 1, 8, 10)), jnp.float32)
    problem = refine.prepare(alpha, obs, lk)
    cfg = refine.RefineConfig(boundary="free")
    r = geom.radius
    shape = (1, 8 + 2 * r, 10 + 2 * r)
    matrix = jax.jacfwd(lambda z: refine.render_linear(z, problem, lk, cfg))(
        jnp.zeros(shape, jnp.float32)).reshape(2 * 80, -1)  # [V C H W, C Hp Wp]
    y = jnp.asarray(rng.normal(size=obs.shape), jnp.float32)
    aty = refine.adjoint(problem, lk, cfg, jnp.zeros(shape, jnp.float32))(y)
    np.testing.assert_allclose(np.asarray(aty).ravel(), np.asarray(matrix.T @ y.ravel()),
                               rtol=1e-5, atol=1e-6)
    # Pixels outside the frame farther than r from it do not exist; all others reach it.
    assert np.all(np.abs(np.asarray(matrix)).sum(axis=0) > 0)


@pytest.fixture(scope="module")
def fits(scene, tiny_bank):
    cfg = dpjax.Config().replace(**{"mpi.num_layers": 8, "mpi.scale_min": 0.0,
                                    "mpi.scale_max": 1.6, "solver.num_iters": 150,
                                    "solver.chunk_size": 50})
    off = dpjax.fit(scene.views, tiny_bank, cfg.replace(**{"refine.iters": 0}))
    on = dpjax.fit(scene.views, tiny_bank, cfg.replace(**{"refine.iters": 40}))
    return cfg, off, on


def test_refinement_off_is_the_plain_composite(fits):
    cfg, off, on = fits
    assert off.refine is None and "refine_s" not in off.timings
    # The output is the MPI composite and its bilateral filtering, computed as before.
    color = mpi.colors(off.params)
    trans = mpi.transmittance(mpi.alphas(off.params))
    raw = np.transpose(np.asarray(mpi.all_in_focus(color, trans)), (1, 2, 0))
    np.testing.assert_array_equal(off.all_in_focus_raw, raw)
    filtered = postprocess.bilateral_filter(jnp.asarray(raw), sigma_spatial=3.0,
                                            sigma_value=0.05)
    np.testing.assert_array_equal(off.all_in_focus, np.asarray(filtered))
    # The MPI fit itself does not depend on the refinement.
    np.testing.assert_array_equal(off.params.alpha_logits, on.params.alpha_logits)
    np.testing.assert_array_equal(off.defocus, on.defocus)
    np.testing.assert_array_equal(off.loss_history, on.loss_history)


def test_refinement_reduces_its_objective(fits, scene, tiny_bank):
    _, off, on = fits
    rec = on.refine
    assert rec["iterations"] == 40
    # The objective's scaling lets L-BFGS take its unit step on most iterations
    # (measured here: 57 evaluations, 67 without the scaling; on bigger frames 1.0 per
    # iteration against 1.5-19 without, benchmarks/bench_refine.py).
    assert 40 <= rec["evaluations"] <= 60
    assert rec["objective_end"] < 0.8 * rec["objective_start"]
    assert rec["objective_end"] == pytest.approx(rec["data_end"] + rec["prior_end"], rel=1e-6)
    assert on.timings["refine_s"] == rec["seconds"] > 0
    # The start is the fit's composite: E there equals a direct evaluation.
    cfg = refine.RefineConfig(iters=40)
    obs = jnp.asarray(np.transpose(scene.views, (0, 3, 1, 2)))
    radius = layer_kernel_radius(tiny_bank.kernel_size, 1.6, support_radius(
        tiny_bank.kernels, dpjax.SolverConfig().kernel_mass_cut))  # as the solver sizes it
    lk = mpi.prepare_layer_kernels(tiny_bank, jnp.asarray(dpjax.MpiConfig(
        num_layers=8, scale_min=0.0, scale_max=1.6).scales()),
        conv.ConvGeometry.create(tiny_bank.grid, radius))
    alpha, color = mpi.alphas(off.params), mpi.colors(off.params)
    trans = mpi.transmittance(alpha)
    problem = refine.prepare(refine.sharpen_alphas(alpha, cfg.sharpen), obs, lk,
                             mpi.all_in_focus(color, trans))
    x0 = refine.initial_unknown(color, trans, radius, cfg)
    start = sum(refine.objective_terms(x0, problem, lk, cfg))
    assert float(start) == pytest.approx(rec["objective_start"], rel=1e-4)


def test_finish_fit_gives_what_fit_gives(fits, scene, tiny_bank):
    cfg, off, on = fits
    done = dpjax.solver.finish_fit(scene.views, tiny_bank, cfg.replace(**{"refine.iters": 40}),
                                   off.params)
    np.testing.assert_allclose(done.all_in_focus, on.all_in_focus, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(done.defocus, on.defocus)
    assert done.refine["iterations"] == 40
    assert done.refine["objective_end"] == pytest.approx(on.refine["objective_end"], rel=1e-5)
    assert done.timings["refine_s"] == done.refine["seconds"] <= done.timings["total_s"]
    assert done.level_iterations == () and done.loss_history.size == 0
    # With the refinement off it is the fit's own output.
    same = dpjax.solver.finish_fit(scene.views, tiny_bank, cfg.replace(**{"refine.iters": 0}),
                                   off.params)
    np.testing.assert_array_equal(same.all_in_focus, off.all_in_focus)
    assert same.refine is None and "refine_s" not in same.timings
    coarse = mpi.MpiParams(off.params.color_logits[..., ::2, ::2],
                           off.params.alpha_logits[..., ::2, ::2])
    with pytest.raises(ValueError, match="full-resolution"):
        dpjax.solver.finish_fit(scene.views, tiny_bank, cfg, coarse)


def test_with_the_true_layers_the_refinement_deblurs(scene, tiny_bank):
    """With the scene's true alphas frozen (an oracle fit) the refinement is a non-blind,
    occlusion-aware deconvolution: starting from the blurry input as every layer's
    colour it must get much closer to the true all-in-focus image than the input is
    (measured: 15.65 -> 18.54 dB; a weight of 1e-4 gives 17.06, 1e-5 13.43: noise).
    (On the 150-step fit of `fits` its image is not better than the fit's: the
    alphas of so short a fit are too spread, experiments/results/pixel4.md,
    "All-in-focus refinement".)"""
    scales = jnp.asarray(scene.scales)
    radius = rescaled_radius(tiny_bank.kernel_size, float(np.max(np.abs(scene.scales))))
    lk = mpi.prepare_layer_kernels(tiny_bank, scales,
                                   conv.ConvGeometry.create(tiny_bank.grid, radius))
    obs = jnp.asarray(np.transpose(scene.views, (0, 3, 1, 2)))
    alpha = np.clip(scene.alphas[1:], 1e-4, 1 - 1e-4)
    blurry = np.clip(scene.views.mean(axis=0), 1e-3, 1 - 1e-3)  # [H, W, C]
    color_logits = jnp.broadcast_to(jnp.asarray(np.log(blurry / (1 - blurry)).transpose(2, 0, 1)),
                                    (len(scene.scales),) + obs.shape[1:])
    params = mpi.MpiParams(color_logits, jnp.asarray(np.log(alpha / (1 - alpha))))
    # The plain deconvolution: no pull towards the (blurry) start, no robust data
    # term, the true alphas as they are.
    plain = refine.RefineConfig(iters=60, weight=1e-3, anchor=0.0, robust=0.0, nonneg=0.0,
                                sharpen=1.0)
    ref = refine.refine_all_in_focus(params, obs, lk, plain)
    gt = scene.all_in_focus
    est = np.transpose(ref.all_in_focus, (1, 2, 0))
    m_in = metrics.image_metrics(scene.views.mean(axis=0), gt, max_shift=2)
    m_ref = metrics.image_metrics(est, gt, max_shift=2)
    assert ref.objective_end < ref.objective_start
    assert m_ref["psnr"] > m_in["psnr"] + 2.5, (m_ref["psnr"], m_in["psnr"])


def test_default_terms_robust_nonneg_anchor_sharpen(scene, layer_kernels):
    """The terms the defaults switch on, each against a direct evaluation."""
    problem, alpha, rng = _random_problem(scene, layer_kernels, seed=4)
    plain = refine.RefineConfig(boundary="edge", weight=0.0, robust=0.0, nonneg=0.0,
                                anchor=0.0)
    x = jnp.asarray(rng.uniform(0.1, 0.9, size=_unknown_shape(problem, layer_kernels, plain)),
                    jnp.float32)
    n = problem.norm
    resid = n * (refine.render_linear(x, problem, layer_kernels, plain) - problem.observation)
    data0, prior0 = refine.objective_terms(x, problem, layer_kernels, plain)
    assert float(prior0) == 0.0
    # Charbonnier: below the least-squares term, equal to it for small residuals.
    gamma = 0.02
    data_r, _ = refine.objective_terms(x, problem, layer_kernels,
                                       dataclasses.replace(plain, robust=gamma))
    r2 = resid * resid
    expect = 0.5 * jnp.sum(jnp.mean(2 * gamma**2 * (jnp.sqrt(1 + r2 / gamma**2) - 1),
                                    axis=(1, 2, 3)))
    assert float(data_r) == pytest.approx(float(expect), rel=1e-5)
    assert float(data_r) < float(data0)
    big = refine.RefineConfig(boundary="edge", weight=0.0, nonneg=0.0, anchor=0.0, robust=1e3)
    assert float(refine.objective_terms(x, problem, layer_kernels, big)[0]) == pytest.approx(
        float(data0), rel=1e-4)
    # Non-negativity: zero for a positive image, the quadratic penalty below 0.
    cfg_nn = dataclasses.replace(plain, nonneg=100.0)
    assert float(refine.objective_terms(x, problem, layer_kernels, cfg_nn)[1]) == 0.0
    neg = x.at[..., :3, :3].set(-0.2)
    _, prior_nn = refine.objective_terms(neg, problem, layer_kernels, cfg_nn)
    assert float(prior_nn) == pytest.approx(
        0.5 * 100.0 * 9 * float(n * 0.2) ** 2 / problem.observation[0].size, rel=1e-4)
    # Anchor: zero at the reference, the mean squared normalised distance elsewhere.
    anchored = problem._replace(reference=x)
    cfg_a = dataclasses.replace(plain, anchor=0.1)
    assert float(refine.objective_terms(x, anchored, layer_kernels, cfg_a)[1]) == 0.0
    _, prior_a = refine.objective_terms(x + 0.1, anchored, layer_kernels, cfg_a)
    assert float(prior_a) == pytest.approx(0.5 * 0.1 * float(n * 0.1) ** 2, rel=1e-4)
    # Sharpening keeps the transmittances a partition of one and makes each pixel's
    # heaviest layer heavier (power 1 leaves the alphas as they are).
    t0 = mpi.transmittance(alpha)
    t4 = mpi.transmittance(refine.sharpen_alphas(alpha, 4.0))
    np.testing.assert_allclose(np.asarray(t4.sum(axis=0)), 1.0, atol=1e-5)
    top = jnp.argmax(t0, axis=0)[None]
    assert np.all(np.asarray(jnp.take_along_axis(t4, top, 0))
                  >= np.asarray(jnp.take_along_axis(t0, top, 0)) - 1e-6)
    assert refine.sharpen_alphas(alpha, 1.0) is alpha


def test_non_finite_input_raises(scene, layer_kernels):
    problem, alpha, _ = _random_problem(scene, layer_kernels)
    h, w = scene.views.shape[1:3]
    params = mpi.MpiParams(jnp.full((NUM_LAYERS, 1, h, w), jnp.nan),
                           jnp.zeros((NUM_LAYERS - 1, h, w)))
    with pytest.raises(FloatingPointError, match="refinement"):
        refine.refine_all_in_focus(params, problem.observation, layer_kernels,
                                   refine.RefineConfig(iters=3))


def test_unknown_images():
    assert refine.unknown_images(refine.RefineConfig(iters=0), 12) == 0
    assert refine.unknown_images(refine.RefineConfig(), 12) == 1
    assert refine.unknown_images(refine.RefineConfig(unknown="hidden"), 12) == 2
    assert refine.unknown_images(refine.RefineConfig(unknown="layers"), 12) == 12


def test_config_validation_and_round_trip():
    with pytest.raises(ValueError):
        refine.RefineConfig(iters=-1)
    with pytest.raises(ValueError):
        refine.RefineConfig(unknown="pixels")
    with pytest.raises(ValueError):
        refine.RefineConfig(power=0.0)
    cfg = dpjax.Config().replace(**{"refine.iters": 7, "refine.weight": 1e-2})
    back = dpjax.config.from_dict(dpjax.config.to_dict(cfg))
    assert back == cfg
    # Configs written before the stage existed read as refinement off.
    old = dpjax.config.to_dict(cfg)
    old.pop("refine")
    assert dpjax.config.from_dict(old).refine.iters == 0


def test_operator_promotes_mixed_precision_like_whole_arrays(scene, layer_kernels):
    # float32 kernels, a float64 unknown and alphas: render_linear's running sums start in
    # the promoted dtype (`mpi.loop_dtype`) and it equals the whole-array rendering.
    with jax.enable_x64(True):
        problem, alpha, rng = _random_problem(scene, layer_kernels, seed=5)
        alpha = alpha.astype(jnp.float64)
        problem = refine.prepare(alpha, problem.observation.astype(jnp.float64),
                                 layer_kernels)
        x = jnp.asarray(rng.uniform(size=problem.observation.shape[1:]), jnp.float64)
        assert layer_kernels.spectra.dtype == jnp.complex64
        cfg = refine.RefineConfig(iters=1, boundary="edge")
        got = refine.render_linear(x, problem, layer_kernels, cfg)
        assert got.dtype == jnp.float64
        colors = jnp.broadcast_to(x, (NUM_LAYERS,) + x.shape)
        # render_views is checked against the whole-array render in test_mpi.py.
        want = mpi.render_views(colors, alpha, layer_kernels)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)
