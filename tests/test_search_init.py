"""The search-map initialisation: presets.search_defocus + pipeline.init_from_defocus."""

import numpy as np
import pytest

import dpjax
from dpjax import mpi, pipeline, presets

SCALES = np.linspace(1.2, 0.2, 6).astype(np.float32)  # back to front, spacing 0.2


def _trans(init) -> np.ndarray:
    return np.asarray(mpi.transmittance(mpi.alphas(init)))  # [L, H', W']


def _image(h=32, w=48):
    return np.random.default_rng(0).uniform(0.1, 0.9, (h, w, 1)).astype(np.float32)


@pytest.mark.parametrize("levels,factor", [(1, 1), (2, 1), (3, 2), (1, 2)])
def test_transmittances_peak_at_the_map(levels, factor):
    h, w = 32, 48
    d = np.full((h // factor, w // factor), 0.4, np.float32)
    d[:, (w // factor) // 2:] = 1.0  # left half near (0.4), right half far (1.0)
    conf = np.ones_like(d, bool)
    image = _image(h, w)
    init = pipeline.init_from_defocus(image, d, conf, SCALES, levels, factor=factor,
                                      fill_sigma_px=1.0)  # keeps the step sharp
    f = 2 ** (levels - 1)
    assert init.alpha_logits.shape == (5, h // f, w // f)
    assert init.color_logits.shape == (6, 1, h // f, w // f)
    t = _trans(init)
    np.testing.assert_allclose(t.sum(axis=0), 1.0, atol=1e-5)
    assert np.all(t > 0.5 / 6 - 1e-6)  # the uniform half is kept everywhere
    peak = np.argmax(t, axis=0)
    assert np.all(peak[:, : (w // f) // 2 - 1] == 4)  # SCALES[4] = 0.4
    assert np.all(peak[:, (w // f) // 2 + 1:] == 1)  # SCALES[1] = 1.0
    # Half uniform (mean 0.7), half a narrow Gaussian centred on the map.
    sharp = pipeline.init_from_defocus(image, d, conf, SCALES, levels, factor=factor,
                                       spread_layers=0.3, fill_sigma_px=1.0)
    dmap = np.asarray(mpi.defocus_map(mpi.transmittance(mpi.alphas(sharp)), SCALES))
    assert dmap[0, 0] == pytest.approx(0.5 * 0.7 + 0.5 * 0.4, abs=0.02)
    assert dmap[0, -1] == pytest.approx(0.5 * 0.7 + 0.5 * 1.0, abs=0.02)
    # Colours as the plain warm start: every layer shows the image.
    base = pipeline.init_from_all_in_focus(image, 6, levels)
    np.testing.assert_array_equal(np.asarray(init.color_logits), np.asarray(base.color_logits))


def test_unconfident_pixels_are_filled_from_their_neighbours():
    d = np.full((32, 48), 0.4, np.float32)
    conf = np.ones_like(d, bool)
    d[:, 24:] = 9.0  # garbage where the search is unsure...
    conf[:, 24:] = False
    d[:, 40:], conf[:, 40:] = 1.0, True  # ...next to a confident far strip
    init = pipeline.init_from_defocus(_image(), d, conf, SCALES, 1, fill_sigma_px=4.0,
                                      weight=1.0)
    dmap = np.asarray(mpi.defocus_map(mpi.transmittance(mpi.alphas(init)), SCALES))
    assert np.all(np.isfinite(dmap)) and dmap.max() <= 1.2 + 1e-5
    # Each side leans towards its nearer value (the uniform start's mean is 0.7).
    assert dmap[5, 26] < 0.65 and dmap[5, 38] > 0.75
    # No confident pixel at all: the uniform start.
    flat = pipeline.init_from_defocus(_image(), d, np.zeros_like(conf), SCALES, 1)
    np.testing.assert_allclose(_trans(flat), 1 / 6, atol=1e-6)


def test_the_start_leans_on_the_map_only_where_the_search_was_sure():
    d = np.full((32, 64), 9.0, np.float32)  # unconfident garbage must not leak in
    conf = np.zeros_like(d, bool)
    d[:, :24], conf[:, :24] = 0.4, True  # the search is sure of the left part only
    kw = {"fill_sigma_px": 2.0, "weight": 1.0, "spread_layers": 0.3}
    t = _trans(pipeline.init_from_defocus(_image(32, 64), d, conf, SCALES, 1, **kw))
    sure = _trans(pipeline.init_from_defocus(_image(32, 64), np.full_like(d, 0.4),
                                             np.ones_like(conf), SCALES, 1, **kw))
    np.testing.assert_allclose(t.sum(axis=0), 1.0, atol=1e-5)
    # Well inside the confident part: as if the whole map were confident.
    np.testing.assert_allclose(t[:, :, :16], sure[:, :, :16], atol=1e-3)
    assert np.all(np.argmax(t[:, :, :16], axis=0) == 4)  # SCALES[4] = 0.4
    # Far from any confident pixel: the uniform 1/L start, neither the garbage nor a
    # guess filled in from afar.
    np.testing.assert_allclose(t[:, :, 40:], 1 / 6, atol=1e-4)
    # In between, the lean fades with the distance to the confident part.
    peak = t[4]  # the 0.4 layer's share
    assert np.all(np.diff(peak[:, 20:36], axis=1) <= 1e-6)
    assert np.all(peak[:, 22] > peak[:, 28] + 0.2)


def test_bad_arguments_are_named():
    image, d = _image(), np.zeros((32, 48), np.float32)
    conf = np.ones_like(d, bool)
    with pytest.raises(ValueError, match="divided by factor"):
        pipeline.init_from_defocus(image, d, conf, SCALES, 1, factor=2)
    bad = d.copy()
    bad[3, 3] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        pipeline.init_from_defocus(image, bad, conf, SCALES, 1)
    with pytest.raises(ValueError, match="weight"):
        pipeline.init_from_defocus(image, d, conf, SCALES, 1, weight=1.5)
    with pytest.raises(ValueError, match="scales"):
        pipeline.init_from_defocus(image, d, conf, SCALES[:1], 1)


def test_search_defocus_feeds_the_range_and_the_init():
    bank = dpjax.parametric_bank(rows=2, cols=2, tile_h=64, tile_w=80, radius=8.0)
    scene = dpjax.make_scene(np.random.default_rng(0), bank, num_layers=2,
                             scale_range=(0.4, 1.2), slope=2.0)
    search = presets.search_defocus(scene.views, bank)
    h, w = scene.views.shape[1:3]
    assert search.defocus.shape == search.confident.shape == (h // search.factor,
                                                              w // search.factor)
    assert search.confident.dtype == bool and search.confident.mean() > 0.3
    est = presets.analyze_scale_range(scene.views, bank, search=search)
    assert est == presets.analyze_scale_range(scene.views, bank)  # same search inside
    cfg = presets.auto_config_from_estimate(est)
    # This scene is 128 x 160 px: the default smoothing (48 px, for 1008 x 1344 photos)
    # would average its two layers together, so a 16 px one keeps its layout.
    init = pipeline.init_from_defocus(scene.views.mean(axis=0), search.defocus,
                                      search.confident, cfg.mpi.scales(),
                                      cfg.solver.pyramid_levels, factor=search.factor,
                                      fill_sigma_px=16.0)
    dmap = np.asarray(mpi.defocus_map(mpi.transmittance(mpi.alphas(init)),
                                      cfg.mpi.scales()))
    # The start already orders the two layers as the ground truth does.
    f = 2 ** (cfg.solver.pyramid_levels - 1)
    gt = scene.defocus.reshape(h // f, f, w // f, f).mean(axis=(1, 3))
    front, back = gt < 0.8, gt > 0.8
    assert dmap[back].mean() > dmap[front].mean() + 0.1


def test_pixel_noise_of_the_map_is_smoothed_out():
    d = np.where(np.indices((32, 48)).sum(axis=0) % 2 == 0, 0.4, 1.0).astype(np.float32)
    init = pipeline.init_from_defocus(_image(), d, np.ones_like(d, bool), SCALES, 1,
                                      weight=1.0, spread_layers=0.3)
    dmap = np.asarray(mpi.defocus_map(mpi.transmittance(mpi.alphas(init)), SCALES))
    np.testing.assert_allclose(dmap[4:-4, 4:-4], 0.7, atol=0.03)  # the checkerboard's mean


def test_auto_preset_uses_it_by_default():
    assert presets.uses_search_init("auto")
    assert not presets.uses_search_init("paper") and not presets.uses_search_init("none")
    assert not presets.uses_search_init("auto", False)  # --nosearch_init
    assert presets.uses_search_init("paper", True)


def test_auto_preset_reads_the_map_sharpened():
    assert presets.defocus_estimator("auto") == "sharpened"
    assert presets.defocus_estimator("paper") == "mean"
    assert presets.defocus_estimator("none") == "mean"
    assert presets.defocus_estimator("auto", "mean") == "mean"  # --defocus_estimator
    assert presets.defocus_estimator("paper", "sharpened") == "sharpened"
    assert dpjax.PostConfig().defocus == "mean"  # the library keeps the paper's
