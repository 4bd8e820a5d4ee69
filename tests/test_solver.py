import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import dpjax
from dpjax import metrics, solver


@pytest.fixture(scope="module")
def scene(tiny_bank):
    rng = np.random.default_rng(0)
    return dpjax.make_scene(rng, tiny_bank, num_layers=3, scale_range=(0.2, 1.4), slope=2.0)


def _cfg(**over):
    base = {"mpi.num_layers": 8, "mpi.scale_min": 0.0, "mpi.scale_max": 1.6,
            "solver.num_iters": 150, "solver.chunk_size": 50}
    base.update(over)
    return dpjax.Config().replace(**base)


@pytest.fixture(scope="module")
def adam_fit(scene, tiny_bank):
    return dpjax.fit(scene.views, tiny_bank, _cfg())


def test_recovers_synthetic_scene(scene, adam_fit):
    conf = np.ones_like(scene.defocus)
    # Defocus: the ordering of depths is recovered (1 - |rho_s| near 0 is perfect).
    assert metrics.spearman_loss(adam_fit.defocus, scene.defocus, conf) < 0.2
    # Measured 0.18 (150 steps); a constant map scores 0.41.
    err = metrics.aiwe1(adam_fit.defocus, scene.defocus, conf)
    assert err < 0.25
    assert err < 0.6 * metrics.aiwe1(np.zeros_like(scene.defocus), scene.defocus, conf)
    # All-in-focus: clearly sharper than the blurry input.
    est = metrics.image_metrics(adam_fit.all_in_focus, scene.all_in_focus, max_shift=2)
    inp = metrics.image_metrics(scene.views.mean(0), scene.all_in_focus, max_shift=2)
    assert est["psnr"] > inp["psnr"] + 0.8  # measured +1.2 dB
    assert est["ssim"] > inp["ssim"]
    assert adam_fit.all_in_focus.shape == scene.all_in_focus.shape
    assert adam_fit.defocus.shape == scene.defocus.shape


def test_loss_decreases_and_is_recorded(adam_fit):
    h = adam_fit.loss_history
    assert h.shape == (150,)
    assert np.all(np.isfinite(h))
    assert h[-10:].mean() < 0.5 * h[0]
    assert set(adam_fit.terms) == {"data", "aux", "image_tv", "alpha_tv", "entropy", "total"}


def test_deterministic(scene, tiny_bank):
    cfg = _cfg(**{"solver.num_iters": 20, "solver.chunk_size": 10})
    a = dpjax.fit(scene.views, tiny_bank, cfg)
    b = dpjax.fit(scene.views, tiny_bank, cfg)
    np.testing.assert_array_equal(a.all_in_focus, b.all_in_focus)
    np.testing.assert_array_equal(a.loss_history, b.loss_history)


def test_solve_compiles_once(scene, tiny_bank):
    # A layer count no other test uses, so the compiled chunk is new.
    cfg = _cfg(**{"mpi.num_layers": 5, "solver.num_iters": 40, "solver.chunk_size": 10})
    before = solver._run_chunk._cache_size()
    res = dpjax.fit(scene.views, tiny_bank, cfg)
    assert res.loss_history.shape == (40,)  # four chunks ran...
    assert solver._run_chunk._cache_size() == before + 1  # ...from one compilation
    dpjax.fit(scene.views, tiny_bank, cfg.replace(**{"solver.num_iters": 30}))
    assert solver._run_chunk._cache_size() == before + 1  # a new budget reuses it


def test_lbfgs_reduces_loss(scene, tiny_bank):
    cfg = _cfg(**{"solver.optimizer": "lbfgs", "solver.num_iters": 30, "solver.chunk_size": 10})
    res = dpjax.fit(scene.views, tiny_bank, cfg)
    assert np.all(np.isfinite(res.loss_history))
    assert res.loss_history[-1] < 0.5 * res.loss_history[0]


_CURVATURE = 4.0  # the isotropic quadratic's Hessian is _CURVATURE * I


def _quadratic():
    """f(x) = c/2 |x - t|^2 over a two-leaf tree, its minimiser t and a start x0."""
    target = {"a": jnp.arange(6.0).reshape(2, 3), "b": jnp.linspace(-1.0, 1.0, 4)}

    def f(x):
        return 0.5 * _CURVATURE * sum(jnp.sum((x[k] - target[k]) ** 2) for k in x)

    return f, target, jax.tree_util.tree_map(jnp.zeros_like, target)


def _lbfgs_steps(opt, state, x, f, n):
    for _ in range(n):
        value, grad = optax.value_and_grad_from_state(f)(x, state=state)
        updates, state = opt.update(grad, state, x, value=value, grad=grad, value_fn=f)
        x = optax.apply_updates(x, updates)
    return x, state


def test_lbfgs_unseeded_matches_optax():
    # Without a scale the solver's chain is optax.lbfgs with the same line search.
    f, _, x0 = _quadratic()
    ours = solver._make_optimizer(solver._StepConfig("lbfgs", 0.0, 0.0, 1, 5), 10)
    ref = optax.lbfgs(memory_size=5, linesearch=optax.scale_by_zoom_linesearch(
        max_linesearch_steps=solver.LBFGS_LINESEARCH_STEPS, initial_guess_strategy="one"))
    x_ours, _ = _lbfgs_steps(ours, ours.init(x0), x0, f, 3)
    x_ref, _ = _lbfgs_steps(ref, ref.init(x0), x0, f, 3)
    for k in x0:
        np.testing.assert_allclose(x_ours[k], x_ref[k], rtol=1e-6)


def test_lbfgs_seeded_first_step():
    # With the inverse Hessian's scale the first step lands on an isotropic quadratic's
    # minimum, taken at the line search's first trial.
    f, target, x0 = _quadratic()
    opt = solver._make_optimizer(solver._StepConfig("lbfgs", 0.0, 0.0, 1, 5), 10)
    state = opt.init(x0)
    state = solver._with_first_scale(state, jnp.float32(1.0 / _CURVATURE))
    x1, state = _lbfgs_steps(opt, state, x0, f, 1)
    for k in x0:
        np.testing.assert_allclose(x1[k], target[k], rtol=1e-5, atol=1e-6)
    assert int(optax.tree_utils.tree_get(state, "num_linesearch_steps")) == 1
    # optax's own first step (length 1 here) stops far short of it.
    x1, _ = _lbfgs_steps(opt, opt.init(x0), x0, f, 1)
    dist = np.sqrt(sum(float(jnp.sum((x1[k] - target[k]) ** 2)) for k in x0))
    assert dist > 5.0


def test_next_level_scale_is_lbfgs_curvature_times_pixel_ratio():
    f, _, x0 = _quadratic()
    opt = solver._make_optimizer(solver._StepConfig("lbfgs", 0.0, 0.0, 1, 5), 10)
    state = opt.init(x0)
    assert np.isnan(solver._next_level_scale(state, 4.0))  # no history yet
    x0 = {"a": x0["a"] + 1.0, "b": x0["b"] - 2.0}
    _, state = _lbfgs_steps(opt, opt.init(x0), x0, f, 2)
    np.testing.assert_allclose(solver._next_level_scale(state, 4.0), 4.0 / _CURVATURE,
                               rtol=1e-4)


def test_lbfgs_levels_start_from_the_coarser_curvature(scene, tiny_bank, first_step_scales):
    seen = first_step_scales("_run_chunk")
    cfg = _cfg(**{"solver.optimizer": "lbfgs", "solver.pyramid_levels": 2,
                  "solver.coarse_iters": 8, "solver.num_iters": 4, "solver.chunk_size": 4})
    res = dpjax.fit(scene.views, tiny_bank, cfg)
    assert res.level_iterations == (8, 4)
    (coarse_shape, coarse), (fine_shape, fine) = seen
    assert fine_shape == scene.defocus.shape and coarse_shape != fine_shape
    assert np.isnan(coarse)  # the first level: optax's own first step
    assert np.isfinite(fine) and fine > 0


def test_coarse_to_fine(scene, tiny_bank):
    cfg = _cfg(**{"solver.pyramid_levels": 2, "solver.coarse_iters": 20, "solver.num_iters": 10,
                  "solver.chunk_size": 10})
    res = dpjax.fit(scene.views, tiny_bank, cfg)
    assert res.level_iterations == (20, 10)
    assert res.all_in_focus.shape == scene.all_in_focus.shape


def test_stopping_rule(scene, tiny_bank):
    cfg = _cfg(**{"solver.num_iters": 400, "solver.chunk_size": 20, "solver.rel_tol": 0.05})
    res = dpjax.fit(scene.views, tiny_bank, cfg)
    assert res.level_iterations[0] < 400


def test_non_finite_loss_is_raised(scene, tiny_bank):
    cfg = _cfg(**{"loss.data": float("nan"), "solver.num_iters": 5, "solver.chunk_size": 5})
    with pytest.raises(FloatingPointError, match="non-finite"):
        dpjax.fit(scene.views, tiny_bank, cfg)


def test_bad_observations_rejected(scene, tiny_bank):
    with pytest.raises(ValueError, match=r"\[2, H, W, C\]"):
        dpjax.fit(scene.views[0], tiny_bank)
    bad = scene.views.copy()
    bad[0, 3, 3, 0] = np.inf
    with pytest.raises(ValueError, match="NaN or Inf"):
        dpjax.fit(bad, tiny_bank)
    with pytest.raises(ValueError, match="kernel grid"):
        dpjax.fit(scene.views[:, :40], tiny_bank)


@pytest.fixture(scope="module")
def colour_scene(tiny_bank):
    rng = np.random.default_rng(3)
    return dpjax.make_scene(rng, tiny_bank, num_layers=3, channels=3, scale_range=(0.2, 1.4),
                            slope=2.0)


def test_expand_channels_keeps_intensity_and_takes_the_views_colour():
    rng = np.random.default_rng(0)
    grey = rng.uniform(0.2, 0.6, (4, 1, 6, 8)).astype(np.float32)
    params = dpjax.MpiParams(color_logits=np.log(grey / (1 - grey)),
                             alpha_logits=np.zeros((3, 6, 8), np.float32))
    tint = np.array([1.2, 1.0, 0.8], np.float32)[:, None, None]
    obs = np.broadcast_to(0.4 * tint, (2, 3, 6, 8))
    out = solver.expand_channels(params, obs)
    color = 1 / (1 + np.exp(-np.asarray(out.color_logits)))
    assert color.shape == (4, 3, 6, 8)
    np.testing.assert_allclose(color.mean(axis=1, keepdims=True), grey, rtol=1e-3)
    np.testing.assert_allclose(color / grey, np.broadcast_to(tint, color.shape), rtol=2e-3)
    back = solver.match_channels(out, obs[:, :1])  # to one channel: the mean intensity
    np.testing.assert_allclose(back.color_logits, params.color_logits, atol=2e-3)
    with pytest.raises(ValueError, match="3 channels, the observation 2"):
        solver.match_channels(out, obs[:, :2])


def test_colour_at_the_finest_levels_only(colour_scene, tiny_bank):
    """The coarse levels solve the channel mean (one channel in the progress reports)
    with colour_levels=1; the result is colour, and as good as a solve in colour
    throughout (colour_levels=2, whose coarse level reports 3 channels)."""
    over = {"solver.pyramid_levels": 2, "solver.level_iters": (60, 60),
            "solver.chunk_size": 30}
    solved = {}
    for colour_levels in (2, 1):
        channels = {}

        def report(p, channels=channels):
            channels.setdefault(p.level, p.params.color_logits.shape[-3])

        solved[colour_levels] = dpjax.fit(
            colour_scene.views, tiny_bank, _cfg(**over, **{"solver.colour_levels": colour_levels}),
            callback=report)
        assert channels == {1: 1 if colour_levels == 1 else 3, 0: 3}
    res, full = solved[1], solved[2]
    assert res.all_in_focus.shape == colour_scene.all_in_focus.shape
    assert res.params.color_logits.shape[1] == 3
    est = metrics.image_metrics(res.all_in_focus, colour_scene.all_in_focus, max_shift=2)
    ref = metrics.image_metrics(full.all_in_focus, colour_scene.all_in_focus, max_shift=2)
    inp = metrics.image_metrics(colour_scene.views.mean(0), colour_scene.all_in_focus,
                                max_shift=2)
    assert est["psnr"] > inp["psnr"] + 0.5
    assert est["psnr"] > ref["psnr"] - 0.3
    # Colours, not a grey image: the chroma follows the ground truth's.
    def chroma(x):
        return (x[..., 0] - x[..., 2]).ravel()

    assert np.corrcoef(chroma(res.all_in_focus), chroma(colour_scene.all_in_focus))[0, 1] > 0.8
