"""dpjax.fit_batch: same-size scenes solved by one vmapped chunk match separate fits.

Tiny problem: 2x2 tiles of 32x40 px, 11-px kernels cut to their support (mass cut
0.2), 4 layers, 2 pyramid levels of 8 steps in chunks of 4. Every solve here shares
those shapes and static settings, so the module compiles the batched chunk once per
level (and `fit`'s likewise).
"""

import jax
import numpy as np
import pytest

import dpjax
from dpjax import kernels, losses, mpi, pipeline, solver


@pytest.fixture(scope="module")
def bank():
    pairs = [dpjax.parametric_dp_kernels(radius=r, ramp=0.4, smooth_sigma=0.5, size=11)
             for r in (3.0, 3.5, 4.0, 4.5)]
    return dpjax.KernelBank.create(np.stack(pairs, axis=1), rows=2, cols=2, tile_h=32,
                                   tile_w=40)


@pytest.fixture(scope="module")
def views(bank):
    """Two scenes [2, 64, 80, 1] with different depth ranges."""
    a = dpjax.make_scene(np.random.default_rng(0), bank, num_layers=3, scale_range=(0.2, 1.2),
                         slope=2.0)
    b = dpjax.make_scene(np.random.default_rng(1), bank, num_layers=3, scale_range=(0.1, 0.6),
                         slope=2.0)
    return [a.views, b.views]


def _cfg(**over):
    base = {"mpi.num_layers": 4, "mpi.scale_min": 0.1, "mpi.scale_max": 1.3,
            "solver.pyramid_levels": 2, "solver.coarse_iters": 8, "solver.num_iters": 8,
            "solver.chunk_size": 4, "solver.kernel_mass_cut": 0.2}
    return dpjax.Config().replace(**{**base, **over})


@pytest.fixture(scope="module")
def solved(bank, views):
    """fit_batch and two fits; scene 1's narrower range has a smaller kernel radius than
    scene 0's, so in the batch its convolutions are padded to scene 0's radius."""
    cfgs = [_cfg(), _cfg(**{"mpi.scale_min": 0.05, "mpi.scale_max": 0.7})]
    before = solver._run_chunk_batch._cache_size()
    batch = dpjax.fit_batch(views, bank, cfgs)
    compiles = solver._run_chunk_batch._cache_size() - before
    singles = [dpjax.fit(v, bank, c) for v, c in zip(views, cfgs)]
    return cfgs, batch, singles, compiles


def _rel(a, b):
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def _mean_rel(a, b):
    return float(np.mean(np.abs(a - b)) / np.mean(np.abs(b)))


def test_matches_separate_fits(solved, bank, views):
    """Kernels cut to their support (the mass cut of `_cfg`, which this bank's window
    feels): each scene of the batch keeps its own cut kernels, zero-padded to the batch's
    window, and its refinement its own geometry, so the batch gives what separate fits
    give."""
    cfgs, batch, singles, _ = solved
    radii = [solver._kernel_radius(solver._scene(v, bank, c), 1) for v, c in zip(views, cfgs)]
    whole = [kernels.rescaled_radius(bank.kernel_size, c.mpi.scale_max) for c in cfgs]
    assert radii[1] < radii[0] and all(r < w for r, w in zip(radii, whole))
    assert len(batch) == 2
    for cfg, b, s in zip(cfgs, batch, singles):
        assert b.level_iterations == s.level_iterations == (8, 8)
        np.testing.assert_array_equal(b.scales, cfg.mpi.scales())
        assert b.all_in_focus.shape == s.all_in_focus.shape == (64, 80, 1)
        assert _rel(b.loss_history, s.loss_history) < 1e-4  # measured <= 3e-6
        assert abs(b.terms["total"] - s.terms["total"]) < 1e-4 * s.terms["total"]
        # Float rounding (vmap, the wider padding's FFT size) is all that differs, but
        # Adam's first steps are sign-like for near-zero gradients and amplify it at a
        # few pixels: measured mean differences <= 1e-5, maxima <= 4e-3 (about 1% of
        # the pixels above 1e-4); `fit` itself padded to the larger radius differs
        # from `fit` by as much.
        assert _mean_rel(b.all_in_focus, s.all_in_focus) < 1e-4
        assert _mean_rel(b.defocus, s.defocus) < 1e-4
        assert _rel(b.all_in_focus, s.all_in_focus) < 2e-2
        assert _rel(b.defocus, s.defocus) < 2e-2
        assert set(b.timings) == set(s.timings)
        # The refinement (on by default) solves each scene's own problem: its objective,
        # whose unknown extends by the scene's own kernel radius, matches `fit`'s (with the
        # batch's wider padding it differed by 4% on scene 1).
        assert b.refine["iterations"] == s.refine["iterations"] == cfg.refine.iters > 0
        for key in ("objective_start", "objective_end"):
            assert abs(b.refine[key] - s.refine[key]) < 1e-4 * s.refine[key], key


def test_compiles_once_per_level(solved, bank, views):
    *_, compiles = solved
    assert compiles == 2  # the coarse level and the finer one (refine learning rate)
    before = solver._run_chunk_batch._cache_size()
    # Other budgets and layer ranges reuse the compiled chunks.
    # (The batch's largest |scale| stays 1.3: it sets the static convolution geometry.)
    budgets = {"solver.coarse_iters": 4, "solver.num_iters": 5}
    cfgs = [_cfg(**budgets, **{"mpi.scale_min": 0.3}), _cfg(**budgets, **{"mpi.scale_max": 0.9})]
    res = dpjax.fit_batch(np.stack(views), bank, cfgs)
    assert [r.level_iterations for r in res] == [(4, 5), (4, 5)]
    assert solver._run_chunk_batch._cache_size() == before


def test_lbfgs_batch_matches_separate_fits(bank, views, first_step_scales):
    # L-BFGS (--optimizer=lbfgs): each scene's line search runs in the batch as alone,
    # and each starts the finer level from its own curvature.
    cfg = _cfg(**{"solver.optimizer": "lbfgs", "solver.lbfgs_memory": 3, "refine.iters": 0})
    seen = first_step_scales("_run_chunk_batch")
    batch = dpjax.fit_batch(views, bank, cfg)
    scales = [scale for _, scale in seen]
    assert len(scales) == 2 and scales[1].shape == (2,)
    assert np.all(np.isnan(scales[0])) and np.all(scales[1] > 0)
    assert scales[1][0] != scales[1][1]
    singles = [dpjax.fit(v, bank, cfg) for v in views]
    for b, s in zip(batch, singles):
        assert b.level_iterations == s.level_iterations == (8, 8)
        assert s.loss_history[-1] < 0.5 * s.loss_history[0]
        assert _rel(b.loss_history, s.loss_history) < 1e-3
        assert _mean_rel(b.defocus, s.defocus) < 1e-3


def test_stopping_rule_is_per_scene(bank, views):
    # At the coarse level a low-contrast copy of scene 0 improves by ~22% in its second
    # chunk, scene 0 itself by 36% and 33% in its second and third: with rel_tol=0.3
    # the copy stops after 8 steps (and stops updating) while scene 0 goes on, exactly
    # as in two separate fits.
    faint = 0.5 + 0.1 * (views[0] - 0.5)
    cfg = _cfg(**{"solver.coarse_iters": 16, "solver.num_iters": 4, "solver.rel_tol": 0.3})
    batch = dpjax.fit_batch([views[0], faint], bank, cfg)
    singles = [dpjax.fit(v, bank, cfg) for v in (views[0], faint)]
    assert [r.level_iterations for r in batch] == [(16, 4), (8, 4)]
    for b, s in zip(batch, singles):
        assert b.level_iterations == s.level_iterations
        assert b.loss_history.shape == s.loss_history.shape
        assert _rel(b.loss_history, s.loss_history) < 1e-4
        assert _mean_rel(b.defocus, s.defocus) < 1e-4


def test_inits_match_separate_fits_with_init(bank, views, solved):
    # Scene 0 starts from a two-level defocus map (front left, back right), scene 1 from
    # the usual uniform start: each as `fit` with that start.
    cfg = _cfg()
    d = np.where(np.arange(80) < 40, 0.3, 1.1)[None].repeat(64, axis=0)
    init = pipeline.init_from_defocus(views[0].mean(axis=0), d, np.ones(d.shape, bool),
                                      cfg.mpi.scales(), cfg.solver.pyramid_levels,
                                      weight=1.0, fill_sigma_px=2.0)
    batch = dpjax.fit_batch(views, bank, cfg, inits=[init, None])
    singles = [dpjax.fit(views[0], bank, cfg, init=init, init_is_solution=False),
               dpjax.fit(views[1], bank, cfg)]
    for b, s in zip(batch, singles):
        assert b.level_iterations == s.level_iterations == (8, 8)
        assert _rel(b.loss_history, s.loss_history) < 1e-4
        assert _mean_rel(b.defocus, s.defocus) < 1e-4
    # The start mattered: scene 0 differs from its uniform-start solve in `solved`.
    uniform = solved[1][0]
    assert _mean_rel(batch[0].defocus, uniform.defocus) > 1e-2
    assert np.mean(batch[0].defocus[:, 40:]) > np.mean(batch[0].defocus[:, :40])


def test_inits_are_checked(bank, views):
    with pytest.raises(ValueError, match="2 observations need 2 inits"):
        dpjax.fit_batch(views, bank, _cfg(), inits=[None])
    full = mpi.init_params(np.moveaxis(views[0], -1, 1), 4)  # full size, not the coarsest
    with pytest.raises(ValueError, match="scene 1: init logits .* coarsest level"):
        dpjax.fit_batch(views, bank, _cfg(), inits=[None, full])


def test_divergence_names_the_scene(bank, views):
    # Finite but huge views overflow the squared error: the loss is infinite at step 0.
    huge = views[1] * np.float32(1e30)
    with pytest.raises(FloatingPointError, match="non-finite"):
        dpjax.fit(huge, bank, _cfg())
    with pytest.raises(solver.BatchFloatingPointError,
                       match=r"scene 1 of the batch diverged.*iteration 0") as info:
        dpjax.fit_batch([views[0], huge], bank, _cfg())
    assert info.value.scenes == (1,)
    assert isinstance(info.value, FloatingPointError)


def test_progress_per_scene_and_stop(bank, views):
    reports = []

    def callback(progress):
        reports.append(progress)
        return len(reports) == 3  # stop after the first chunk of the finer level

    res = dpjax.fit_batch(views, bank, _cfg(), callback=callback)
    assert [len(p) for p in reports] == [2, 2, 2]
    assert [(p[0].level, p[0].step) for p in reports] == [(1, 4), (1, 8), (0, 4)]
    assert all(p.params is None and np.isfinite(p.loss) for ps in reports for p in ps)
    assert [r.level_iterations for r in res] == [(8, 4), (8, 4)]


def test_rejects_what_cannot_share_a_batch(bank, views):
    with pytest.raises(ValueError, match="scene 1: config differs"):
        dpjax.fit_batch(views, bank, [_cfg(), _cfg(**{"mpi.num_layers": 5})])
    with pytest.raises(ValueError, match="scene 1: config differs"):
        dpjax.fit_batch(views, bank, [_cfg(), _cfg(**{"loss.entropy": 30.0})])
    other = dpjax.parametric_bank(rows=2, cols=2, tile_h=32, tile_w=40, radius=3.0, size=13)
    with pytest.raises(ValueError, match="scene 1: kernel bank"):
        dpjax.fit_batch(views, [bank, other], _cfg())
    with pytest.raises(ValueError, match="1 or 2 banks"):
        dpjax.fit_batch(views, [bank] * 3, _cfg())
    with pytest.raises(ValueError, match="scene 1: observation contains NaN"):
        dpjax.fit_batch([views[0], np.full_like(views[1], np.nan)], bank, _cfg())
    with pytest.raises(ValueError, match="at least one"):
        dpjax.fit_batch([], bank, _cfg())


@pytest.mark.parametrize("mass_cut", [0.0, 0.2])
def test_wider_padding_changes_only_rounding(bank, views, mass_cut):
    """A batch's common geometry (the widest scene's kernel radius) gives the same loss and
    gradient as the scene's own, smaller one, up to float rounding, with whole kernels
    and with kernels cut to their support (which must stay cut in the wider window)."""
    cfg = _cfg(**{"mpi.scale_min": 0.05, "mpi.scale_max": 0.7,
                  "solver.kernel_mass_cut": mass_cut})
    scene = solver._scene(views[1], bank, cfg)
    params = mpi.init_params(scene.planar, 4)
    keys = jax.random.split(jax.random.PRNGKey(0))
    params = mpi.MpiParams(*(x + 0.3 * jax.random.normal(k, x.shape)
                             for x, k in zip(params, keys)))
    value_and_grad = jax.jit(jax.value_and_grad(
        lambda p, obs, lk: losses.loss_terms(p, obs, lk, cfg.loss).total))
    obs, lk = solver._level_problem(scene, 1, exact=True)
    r0 = lk.geom.radius
    assert r0 == solver._kernel_radius(scene, 1)
    assert (r0 < kernels.rescaled_radius(bank.kernel_size, scene.max_abs)) == (mass_cut > 0)
    v0, g0 = value_and_grad(params, obs, lk)
    shared = solver._level_problem(scene, 1)[1].geom  # the default: widened, same FFT
    assert shared.radius >= r0 and shared.fft_shape == lk.geom.fft_shape
    for pad, exact in ((r0 + 3, True), (0, False)):
        obs, lk = solver._level_problem(scene, 1, pad, exact=exact)
        assert lk.geom.radius == (r0 + 3 if exact else shared.radius)
        v, g = value_and_grad(params, obs, lk)
        assert abs(float(v) - float(v0)) <= 1e-5 * abs(float(v0))
        for a, b in zip(jax.tree_util.tree_leaves(g), jax.tree_util.tree_leaves(g0)):
            assert _rel(np.asarray(a), np.asarray(b)) < 1e-5  # measured 2e-6


def test_nearby_layer_ranges_share_one_compiled_solver(bank, views, monkeypatch):
    """Two scenes whose layer kernels' radii differ but round to one FFT size solve and
    score with one compiled chunk (`conv.ConvGeometry.shared`): a batch of one camera's
    photos does not recompile the solver for every scene's layer range. The refinement,
    whose unknown extends by the radius beyond the frame, keeps each scene's own window
    (in `fit_batch` too: `test_cut_kernels_batch_matches_separate_fits`)."""
    from dpjax import refine
    cfgs = [_cfg(**{"mpi.scale_max": m, "solver.kernel_mass_cut": 0.0,
                    "refine.iters": 2}) for m in (0.6, 0.7)]
    scenes = [solver._scene(views[0], bank, c) for c in cfgs]
    own = [solver._kernel_radius(s, 1) for s in scenes]
    assert own[0] < own[1]  # the premise: different windows ...
    for factor in (1, 2):  # ... but one shared geometry at every level, wider than own[0]
        geoms = {solver._level_problem(s, factor)[1].geom for s in scenes}
        assert len(geoms) == 1
    assert solver._level_problem(scenes[0], 1)[1].geom.radius > own[0]
    seen = []
    real = refine.refine_all_in_focus

    def record(params, observation, lk, rcfg):
        seen.append(lk.geom.radius)
        return real(params, observation, lk, rcfg)

    monkeypatch.setattr(refine, "refine_all_in_focus", record)
    dpjax.fit(views[0], bank, cfgs[0])
    compiled = solver._run_chunk._cache_size(), solver._final_terms._cache_size()
    dpjax.fit(views[0], bank, cfgs[1])  # (only the refinement, in its own window, compiles)
    assert (solver._run_chunk._cache_size(), solver._final_terms._cache_size()) == compiled
    assert seen == own
