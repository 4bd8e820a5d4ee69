"""dpjax.presets.resolve / resolve_base: the one place presets are applied."""

from __future__ import annotations

import json

import numpy as np
import pytest

import dpjax
from dpjax import baselines, presets
from dpjax import scene as scene_lib
from dpjax.config import Config, schedule


def test_resolve_base_applies_the_presets_start_and_estimator():
    auto = presets.resolve_base("auto", Config())
    assert auto.init.search and auto.post.defocus == "sharpened"
    for name in ("paper", "none"):
        cfg = presets.resolve_base(name, Config())
        assert not cfg.init.search and cfg.post.defocus == "mean"
    assert auto.post.fill
    cfg = presets.resolve_base("auto", Config(), search_init=False,
                               defocus_estimator_name="mean", fill=False)
    assert not cfg.init.search and cfg.post.defocus == "mean"  # explicit values win
    assert not cfg.post.fill
    assert not presets.resolve_base("paper", Config()).post.fill  # the paper's map
    assert presets.resolve_base("none", Config(), fill=True).post.fill
    assert not Config().post.fill  # the library keeps the paper's map
    with pytest.raises(ValueError, match="unknown preset"):
        presets.resolve_base("best", Config())


def test_resolve_paper_and_none():
    base = Config()
    cfg, info = presets.resolve("paper", "5", None, None, base)
    assert (cfg.mpi.scale_min, cfg.mpi.scale_max) == (0.1, 1.3)
    assert info["name"] == "paper" and info["scale_range"] == [0.1, 1.3]
    cfg, info = presets.resolve("none", "x", None, None, base)
    assert cfg == base
    with pytest.raises(ValueError, match="no paper settings"):
        presets.resolve("paper", "nope", None, None, base)


@pytest.mark.parametrize("probe", [False, True])
def test_auto_preset_records_its_range_estimate(probe):
    bank = dpjax.parametric_bank(rows=2, cols=2, tile_h=32, tile_w=40, radius=6.0)
    scene = dpjax.make_scene(np.random.default_rng(0), bank, num_layers=2,
                             scale_range=(0.3, 1.2))
    base = Config(solver=schedule(num_iters=20))
    cfg, info = presets.resolve("auto", "a", scene.views, bank, base, probe=probe)
    est = info["range_estimate"]
    assert info["scale_range"] == [est["s_min"], est["s_max"]]
    assert [cfg.mpi.scale_min, cfg.mpi.scale_max] == info["scale_range"]
    assert (est["probe_range"] is not None) == probe
    assert est["probe_iters"] == (presets.PROBE_ITERS if probe else 0)
    assert cfg.loss.alpha_tv == presets.AUTO_ALPHA_TV
    json.dumps(info)


@pytest.fixture(scope="module")
def bank():
    """2x2 tiles of 64x80 px, parametric DP pair of radius 8 px (base disparity ~7 px)."""
    return dpjax.parametric_bank(rows=2, cols=2, tile_h=64, tile_w=80, radius=8.0)


# ----------------------------------------------------------------------------- presets


def test_paper_scenes_table_complete():
    assert sorted(presets.PAPER_SCENES) == [f"{i:03d}" for i in range(1, 18)]
    for p in presets.PAPER_SCENES.values():
        assert set(p) == {"s_min", "s_max", "alpha_tv", "entropy"}
        assert p["s_max"] > p["s_min"]


def test_paper_config_lookup():
    base = dpjax.Config().replace(**{"solver.num_iters": 7})
    cfg = presets.paper_config("001", base)
    assert (cfg.mpi.scale_min, cfg.mpi.scale_max) == (0.5, 1.6)
    assert (cfg.loss.alpha_tv, cfg.loss.entropy) == (1.5e4, 20)
    assert cfg.solver.num_iters == 7  # the schedule is kept
    cfg5 = presets.paper_config(5, base)
    assert (cfg5.mpi.scale_min, cfg5.mpi.scale_max, cfg5.loss.entropy) == (0.1, 1.3, 30)
    assert presets.paper_config("16", base).mpi.scale_max == 1.5


def test_paper_config_unknown_scene_lists_known_ids():
    with pytest.raises(ValueError, match=r"no paper settings for scene '042'.*001.*017"):
        presets.paper_config("042")


def test_kernel_base_disparity_scales_with_radius():
    d8 = presets.kernel_base_disparity(dpjax.parametric_bank(rows=1, cols=1, tile_h=32,
                                                             radius=8.0))
    d4 = presets.kernel_base_disparity(dpjax.parametric_bank(rows=1, cols=1, tile_h=32,
                                                             radius=4.0))
    assert d8 == pytest.approx(2 * d4, rel=0.1)


@pytest.mark.parametrize("scale", [-0.6, 0.4, 1.0, 1.6])
def test_estimate_scale_range_recovers_single_layer(bank, scale):
    # Measured over seeds 0-2: the 5th and 90th percentiles of the confident pixels
    # sit within 0.07 of the true scale (0.12 at s = 1.6, seed 2); the returned range
    # (0.5 wide minimum) contains the true scale with >= 0.2 to spare.
    scene = dpjax.make_scene(np.random.default_rng(0), bank, num_layers=1,
                             scale_range=(scale, scale))
    est = presets.analyze_scale_range(scene.views, bank)
    assert not est.fallback
    assert est.factor == 2  # base disparity 7.3 px -> 3.6 px at half resolution
    assert est.s_min + 0.15 < scale < est.s_max - 0.15
    assert abs(est.p_lo - scale) < 0.1
    assert abs(0.5 * (est.s_min + est.s_max) - scale) < 0.2
    assert presets.estimate_scale_range(scene.views, bank) == (est.s_min, est.s_max)


def test_estimate_scale_range_brackets_two_layers(bank):
    # Two layers (a blurred background, a sharper occluder): measured over seeds 0-5,
    # the 5th / 90th percentiles fall within 0.04 of the front / back scales.
    scene = dpjax.make_scene(np.random.default_rng(0), bank, num_layers=2,
                             scale_range=(0.2, 1.4))
    back, front = scene.scales
    est = presets.analyze_scale_range(scene.views, bank)
    assert abs(est.p_lo - front) < 0.06 and abs(est.p_hi - back) < 0.06
    assert front - 0.2 < est.s_min < front and back - 0.06 < est.s_max < back + 0.06


def test_auto_config_uses_fixed_weights(bank):
    scene = dpjax.make_scene(np.random.default_rng(1), bank, num_layers=1,
                             scale_range=(0.8, 0.8))
    base = dpjax.Config().replace(**{"loss.alpha_tv": 1.0, "loss.entropy": 1.0,
                                     "solver.num_iters": 3})
    cfg = presets.auto_config(scene.views, bank, base)
    assert cfg.loss.alpha_tv == presets.AUTO_ALPHA_TV
    assert cfg.loss.entropy == presets.AUTO_ENTROPY
    assert cfg.solver.num_iters == 3
    assert cfg.mpi.scale_min < 0.8 < cfg.mpi.scale_max


def test_probe_refines_the_search_range(bank):
    # Two layers drawn in (0.4, 1.2): back 1.055, front 0.508 (seed 0). The probe
    # solves over the searched range widened by a quarter at both ends and keeps its
    # map's 1st-99th percentiles plus half a layer spacing. Measured: search 0.41-1.07,
    # probe percentiles 0.53-0.91, range 0.46-0.97: the probe's map is compressed
    # towards the middle on this tiny scene (32x40 px at the probe's 1/4 resolution),
    # so the back layer falls outside (dpjax/presets.py docstring).
    scene = dpjax.make_scene(np.random.default_rng(0), bank, num_layers=2,
                             scale_range=(0.4, 1.2))
    back, front = scene.scales
    base = dpjax.Config().replace(**{"mpi.num_layers": 8})
    search = presets.analyze_scale_range(scene.views, bank)
    est = presets.probe_scale_range(scene.views, bank, search, base)
    assert est.search_range == (search.s_min, search.s_max)
    width = search.s_max - search.s_min
    assert est.probe_range == pytest.approx((search.s_min - width / 4,
                                             search.s_max + width / 4))
    assert (est.probe_factor, est.probe_iters, est.probe_note) == (4, presets.PROBE_ITERS,
                                                                   None)
    assert est.probe_s > 0
    assert est.probe_range[0] <= est.probe_p_lo < est.probe_p_hi <= est.probe_range[1]
    assert est.s_min < est.probe_p_lo and est.probe_p_hi < est.s_max
    assert est.s_min < front < est.s_max < back
    assert abs(est.probe_p_lo - front) < 0.05 and abs(est.probe_p_hi - 0.91) < 0.05
    cfg = presets.auto_config(scene.views, bank, base, probe=True)
    assert (cfg.mpi.scale_min, cfg.mpi.scale_max) == (est.s_min, est.s_max)
    json.dumps(est._asdict())  # recorded in result.json


def test_probe_is_skipped_on_odd_tiles():
    odd = dpjax.parametric_bank(rows=1, cols=1, tile_h=63, tile_w=81, radius=6.0)
    scene = dpjax.make_scene(np.random.default_rng(0), odd, num_layers=1,
                             scale_range=(0.8, 0.8))
    search = presets.analyze_scale_range(scene.views, odd)
    est = presets.probe_scale_range(scene.views, odd, search)
    assert (est.s_min, est.s_max) == (search.s_min, search.s_max)
    assert est.probe_range is None and "not divisible" in est.probe_note


def test_auto_config_without_probe_keeps_the_search_range(bank):
    scene = dpjax.make_scene(np.random.default_rng(1), bank, num_layers=1,
                             scale_range=(0.8, 0.8))
    search = presets.analyze_scale_range(scene.views, bank)
    cfg = presets.auto_config(scene.views, bank)  # the default: no probe
    assert (cfg.mpi.scale_min, cfg.mpi.scale_max) == (search.s_min, search.s_max)


def test_estimate_scale_range_falls_back_on_flat_input(bank):
    views = np.full((2,) + bank.grid.image_shape + (1,), 0.5, np.float32)
    est = presets.analyze_scale_range(views, bank, default=(0.1, 1.6))
    assert est.fallback and (est.s_min, est.s_max) == (0.1, 1.6)


def test_search_scales_follow_the_recorded_blur():
    cands, span = presets.search_scales()
    np.testing.assert_array_equal(cands, np.asarray(presets.SEARCH_SCALES, np.float32))
    assert span == 1.0
    # Photos as blurred (in the kernels' unit) as the rule's development photos: the
    # grid as developed; half as blurred: half the reach.
    cands, span = presets.search_scales(presets.DEVELOPED_BLUR_P90)
    np.testing.assert_allclose(cands, presets.SEARCH_SCALES, rtol=1e-6)
    cands, span = presets.search_scales(presets.DEVELOPED_BLUR_P90 / 2)
    assert span == pytest.approx(0.5)
    np.testing.assert_allclose(cands, np.asarray(presets.SEARCH_SCALES) / 2, rtol=1e-6)
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="blur_p90"):
            presets.search_scales(bad)


def test_search_is_the_same_in_pixels_whatever_the_kernels_unit():
    # One two-layer scene, searched with kernels of radius 8 and of radius 6 px at
    # scale 1. With the photos' blur recorded in each unit (1.2 and 1.6) both grids
    # reach the same pixels of blur, so the confidence the range rule thresholds (best
    # cost against the median over the candidates) is the same: measured |difference|
    # 90th percentile 0.0007 (left: the parametric kernels' 0.5-px smoothing, which
    # does not scale with the radius). With the grid fixed in each unit, as before,
    # it is 0.028.
    b8 = dpjax.parametric_bank(rows=2, cols=2, tile_h=64, tile_w=80, radius=8.0)
    b6 = dpjax.parametric_bank(rows=2, cols=2, tile_h=64, tile_w=80, radius=6.0)
    scene = dpjax.make_scene(np.random.default_rng(3), b8, num_layers=2,
                             scale_range=(0.4, 1.2))
    (c8, span8), (c6, span6) = presets.search_scales(1.2), presets.search_scales(1.6)
    np.testing.assert_allclose(c8 * 8, c6 * 6, rtol=1e-5)
    r8 = baselines.dp_stereo_defocus(scene.views, b8, c8)
    r6 = baselines.dp_stereo_defocus(scene.views, b6, c6)
    diff = np.abs(np.asarray(r8.confidence) - np.asarray(r6.confidence))
    assert np.percentile(diff, 90) < 0.005
    np.testing.assert_allclose(np.asarray(r8.defocus) * 8, np.asarray(r6.defocus) * 6,
                               atol=0.125 * span8 * 8 + 1e-3)
    # search_defocus uses that grid and says so.
    s6 = presets.search_defocus(scene.views, b6, blur_p90=1.6)
    assert s6.span == pytest.approx(span6) and span6 == pytest.approx(span8 * 4 / 3)


def test_range_search_reuses_a_search_only_over_the_same_grid(bank):
    views = dpjax.make_scene(np.random.default_rng(0), bank, num_layers=2,
                             scale_range=(0.2, 1.4)).views
    developed = presets.search_defocus(views, bank)
    assert presets.range_search(views, bank, search=developed) is developed
    half = presets.DEVELOPED_BLUR_P90 / 2
    scaled = presets.range_search(views, bank, blur_p90=half, search=developed)
    assert scaled.span == pytest.approx(0.5)
    np.testing.assert_array_equal(
        scaled.defocus, presets.search_defocus(views, bank, blur_p90=half).defocus)
    assert presets.range_search(views, bank, blur_p90=half, search=scaled) is scaled


@pytest.mark.parametrize("start", [False, True])
def test_configure_searches_the_range_with_the_kernels_recorded_blur(bank, start):
    # The range comes from the grid scaled to the recorded blur, the start from the
    # grid as developed (on this two-layer scene the halved grid leaves 67% of the
    # pixels confident, the developed one 86%: the two are told apart).
    views = dpjax.make_scene(np.random.default_rng(0), bank, num_layers=2,
                             scale_range=(0.2, 1.4)).views
    opts = scene_lib.SceneOptions(base=Config().replace(**{"init.search": start}),
                                  preset="auto")
    timings = {}
    half = presets.DEVELOPED_BLUR_P90 / 2
    cfg, info, init, init_info = scene_lib.configure("a", views, bank, opts, timings,
                                                     input_encoding="linear", blur_p90=half)
    assert info["search_span"] == pytest.approx(0.5)
    est = presets.analyze_scale_range(
        views, bank, search=presets.search_defocus(views, bank, blur_p90=half))
    assert (cfg.mpi.scale_min, cfg.mpi.scale_max) == (est.s_min, est.s_max)
    assert (init is not None) == start
    if start:
        developed = presets.search_defocus(views, bank)
        assert init_info["confident_fraction"] == pytest.approx(developed.confident.mean())
    assert timings["preset_s"] > 0
    # Without a recorded blur: one search, the grid as developed, for both.
    cfg, info, _, _ = scene_lib.configure("a", views, bank, opts, input_encoding="linear")
    assert info["search_span"] == 1.0


@pytest.mark.parametrize("asked, input_encoding, expected", [
    (scene_lib.PRIOR_INPUT, "srgb", "srgb"), (scene_lib.PRIOR_INPUT, "linear", "linear"),
    (scene_lib.PRIOR_INPUT, "gamma:2.2", "gamma:2.2"), ("gamma:2", "srgb", "gamma:2")])
def test_configure_resolves_the_prior_encoding_from_the_input(bank, asked, input_encoding,
                                                              expected):
    # Every caller of configure gets the priors in the input's encoding unless it asks
    # for a curve: there is no path that silently keeps the library's linear default.
    views = dpjax.make_scene(np.random.default_rng(0), bank, num_layers=2).views
    opts = scene_lib.SceneOptions(base=Config(), preset="paper", prior_encoding=asked)
    cfg, *_ = scene_lib.configure("001", views, bank, opts, input_encoding=input_encoding)
    assert cfg.loss.prior_encoding == expected


def test_linear_input_solver_is_lbfgs_on_its_own_schedule_unless_an_optimizer_is_asked():
    settings = dict(preset="auto")
    linear = presets.linear_input_solver(**settings)
    assert linear == schedule(optimizer="lbfgs")  # its own fast budgets, not Adam's
    assert presets.base_config(**settings).solver.optimizer == "adam"
    assert linear.level_iters != presets.base_config(**settings).solver.level_iters
    # Explicit budgets and quality carry over, as with --optimizer=lbfgs.
    assert presets.linear_input_solver(preset="auto", level_iters=(5, 4, 3)).level_iters == (
        5, 4, 3)
    assert presets.linear_input_solver(preset="auto", quality="best") == schedule(
        quality="best", optimizer="lbfgs")
    # An optimizer asked for holds for every input; the paper preset is the paper's Adam.
    assert presets.linear_input_solver(preset="auto", optimizer="adam") is None
    assert presets.linear_input_solver(preset="auto", optimizer="lbfgs") is None
    assert presets.linear_input_solver(preset="paper") is None
    with pytest.raises(ValueError, match="either level_iters"):
        presets.linear_input_solver(preset="auto", level_iters=(5, 4, 3), num_iters=2)


@pytest.mark.parametrize("input_encoding, expected", [("linear", "lbfgs"), ("srgb", "adam"),
                                                      ("gamma:2.2", "adam")])
def test_configure_fits_linear_input_with_the_linear_solver(bank, input_encoding, expected):
    views = dpjax.make_scene(np.random.default_rng(0), bank, num_layers=2).views
    base = presets.base_config(preset="paper")
    opts = scene_lib.SceneOptions(base=base, preset="paper",
                                  linear_solver=schedule(optimizer="lbfgs"))
    cfg, *_ = scene_lib.configure("001", views, bank, opts, input_encoding=input_encoding)
    assert cfg.solver.optimizer == expected
    assert cfg.mpi.num_layers == base.mpi.num_layers  # only the solver is swapped
    with pytest.raises(ValueError, match="linear_solver must have base's pyramid levels"):
        scene_lib.SceneOptions(base=base, linear_solver=schedule(pyramid_levels=1))
