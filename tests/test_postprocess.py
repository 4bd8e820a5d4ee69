"""The defocus map's fill of textureless regions (dpjax.postprocess.fill_defocus)."""

import json
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import tifffile
from PIL import Image

import dpjax
from dpjax import outputs, postprocess

ROOT = Path(__file__).resolve().parents[1]


def _recursive_reference(x, guide, sigma_spatial, sigma_value, iterations=3):
    """The domain transform's recursive filter written as loops (Gastal & Oliveira 2011,
    eq. 21 and their iteration schedule), float64."""
    dx = 1 + sigma_spatial / sigma_value * np.abs(np.diff(guide, axis=1)).sum(-1)
    dy = 1 + sigma_spatial / sigma_value * np.abs(np.diff(guide, axis=0)).sum(-1)

    def along_rows(y, d, a):
        y = y.copy()
        w = a ** d
        for j in range(1, y.shape[1]):
            y[:, j] = (1 - w[:, j - 1, None]) * y[:, j] + w[:, j - 1, None] * y[:, j - 1]
        for j in range(y.shape[1] - 2, -1, -1):
            y[:, j] = (1 - w[:, j, None]) * y[:, j] + w[:, j, None] * y[:, j + 1]
        return y

    y = x.astype(np.float64)
    for i in range(iterations):
        sigma_i = sigma_spatial * np.sqrt(3) * 2 ** (iterations - i - 1) / np.sqrt(
            4 ** iterations - 1)
        a = np.exp(-np.sqrt(2) / sigma_i)
        y = along_rows(y, dx, a)
        y = along_rows(y.transpose(1, 0, 2), dy.T, a).transpose(1, 0, 2)
    return y


def test_domain_transform_matches_the_recursive_filter_written_as_loops():
    rng = np.random.default_rng(0)
    x, guide = rng.random((24, 31, 2)), rng.random((24, 31, 3))
    got = postprocess.domain_transform(jnp.asarray(x), jnp.asarray(guide),
                                       sigma_spatial=6.0, sigma_value=0.3)
    np.testing.assert_allclose(np.asarray(got), _recursive_reference(x, guide, 6.0, 0.3),
                               atol=2e-6)


def test_domain_transform_keeps_a_constant_and_stops_at_edges():
    guide = np.zeros((20, 40, 1), np.float32)
    guide[:, 20:] = 1.0  # a strong edge between columns 19 and 20
    const = np.full((20, 40, 1), 0.7, np.float32)
    out = postprocess.domain_transform(jnp.asarray(const), jnp.asarray(guide),
                                       sigma_spatial=30.0, sigma_value=0.05)
    np.testing.assert_allclose(np.asarray(out), 0.7, rtol=1e-5)
    step = np.where(np.arange(40) < 20, 0.0, 1.0)[None, :, None] * np.ones((20, 1, 1))
    out = np.asarray(postprocess.domain_transform(jnp.asarray(step, jnp.float32),
                                                  jnp.asarray(guide), sigma_spatial=30.0,
                                                  sigma_value=0.05))
    assert out[:, :20].max() < 0.01 and out[:, 20:].min() > 0.99  # no leak across it
    flat = np.asarray(postprocess.domain_transform(jnp.asarray(step, jnp.float32),
                                                   jnp.zeros_like(jnp.asarray(guide)),
                                                   sigma_spatial=30.0, sigma_value=0.05))
    assert 0.3 < flat[0, 19] < 0.7  # without the edge the step is smoothed


def _two_regions(rng, h=64, w=96):
    """A textured band on each side (noise) around a flat middle, two colours split at
    the middle column; defocus 1 on the left, 3 on the right, garbage in the flat parts
    (the texture and the colour edge carry a cue within 4 px: their defocus is right)."""
    image = np.full((h, w, 3), 0.2, np.float32)
    image[:, w // 2:] = 0.6
    noise = np.zeros((h, w), bool)
    noise[:, :12] = noise[:, -12:] = True
    image[noise] += 0.15 * rng.standard_normal((noise.sum(), 1)).astype(np.float32)
    tex = np.zeros((h, w), bool)
    tex[:, :16] = tex[:, -16:] = tex[:, w // 2 - 4:w // 2 + 4] = True
    image = np.clip(image, 0.01, 1.0)
    truth = np.where(np.arange(w) < w // 2, 1.0, 3.0)[None].repeat(h, 0).astype(np.float32)
    defocus = np.where(tex, truth, rng.uniform(-2, 5, (h, w))).astype(np.float32)
    return image, defocus, truth, tex


def test_fill_replaces_untextured_pixels_from_textured_ones_of_their_region():
    rng = np.random.default_rng(1)
    image, defocus, truth, tex = _two_regions(rng)
    filled, kept = postprocess.fill_defocus(jnp.asarray(defocus), jnp.asarray(image),
                                            quantile=50.0)
    filled, kept = np.asarray(filled), np.asarray(kept)
    # Untextured pixels tie at zero texture: fewer than half are above the median.
    assert 0.25 < kept.mean() <= 0.5 and not kept[:, 16:40].any()
    assert np.all(kept[:, 1:11] & kept[:, -11:-1])  # the noise bands are textured
    np.testing.assert_array_equal(filled[kept], defocus[kept])  # kept as they were
    flat = ~tex
    assert np.abs(filled - truth)[flat].mean() < 0.05  # each side from its own band
    assert np.abs(defocus - truth)[flat].mean() > 1.0
    assert np.all(np.isfinite(filled))


def test_fill_does_not_depend_on_the_exposure():
    rng = np.random.default_rng(2)
    image, defocus, _, _ = _two_regions(rng)
    a, _ = postprocess.fill_defocus(jnp.asarray(defocus), jnp.asarray(image))
    b, _ = postprocess.fill_defocus(jnp.asarray(defocus), jnp.asarray(image * 37.0))
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-4)


def test_post_config_refuses_bad_fill_settings():
    for bad in (dict(fill_sigma_spatial=0.0), dict(fill_sigma_spatial=2.0),
                dict(fill_sigma_value=0.0), dict(fill_quantile=100.0),
                dict(fill_quantile=-1.0)):
        with pytest.raises(ValueError, match="post.fill_"):
            dpjax.PostConfig(**bad)


def test_fit_fills_the_map_and_records_it(tmp_path):
    bank = dpjax.parametric_bank(rows=1, cols=2, tile_h=48, tile_w=48, radius=4.0)
    scene = dpjax.make_scene(np.random.default_rng(3), bank, num_layers=3)
    cfg = dpjax.Config().replace(**{"mpi.num_layers": 4, "solver.num_iters": 6,
                                    "solver.pyramid_levels": 1, "refine.iters": 0})
    plain = dpjax.fit(scene.views, bank, cfg)
    filled = dpjax.fit(scene.views, bank, cfg.replace(**{"post.fill": True}))
    np.testing.assert_allclose(filled.all_in_focus, plain.all_in_focus, atol=1e-5)
    expect = postprocess.filled_defocus(plain.defocus, plain.all_in_focus,
                                        cfg.replace(**{"post.fill": True}).post)
    np.testing.assert_allclose(filled.defocus, np.asarray(expect), atol=1e-5)
    assert not np.allclose(filled.defocus, plain.defocus)


def _solved_folder(root, image, defocus, *, fill=False):
    """A solve folder as run_solver.py writes it, scene "s01"."""
    cfg = dpjax.Config().replace(**{"post.fill": fill})
    result = {"config": dpjax.config.to_dict(cfg)}
    return outputs.write_result(root / "s01", all_in_focus=image, defocus=defocus,
                                result=result)


def test_defocus_fill_experiment_scores_the_fill_and_refuses_filled_maps(tmp_path):
    rng = np.random.default_rng(4)
    image, defocus, truth, _ = _two_regions(rng)
    data = tmp_path / "pixel4"
    (data / "gt_defocus_map").mkdir(parents=True)
    Image.fromarray((truth * 60).astype(np.uint8)).save(data / "gt_defocus_map" / "s01_gt.png")
    _solved_folder(tmp_path / "solved", image, defocus)
    script = ROOT / "experiments" / "defocus_fill.py"
    out = tmp_path / "fill.json"
    run = subprocess.run([sys.executable, str(script), f"--pixel=a={tmp_path / 'solved'}",
                          f"--pixel_data={data}", "--quantiles=50", f"--output={out}",
                          f"--figure={tmp_path / 'fig.png'}", "--figure_scenes=s01",
                          f"--write_filled={tmp_path / 'w'}"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    mean = json.loads(out.read_text())["pixel"]["a"]["mean"]
    assert mean["fill q50"]["aiwe1"] < 0.2 * mean["as solved"]["aiwe1"]
    assert (tmp_path / "fig.png").stat().st_size > 0
    for label, fill in (("as_solved", False), ("filled", True)):
        d = tmp_path / "w" / "a" / label / "mpi" / "s01"
        assert outputs.is_complete(d)
        assert json.loads((d / outputs.RESULT_JSON).read_text())["config"]["post"]["fill"] is fill
    written = tifffile.imread(tmp_path / "w" / "a" / "filled" / "mpi" / "s01"
                              / outputs.DEFOCUS_TIFF)
    expect, _ = postprocess.fill_defocus(jnp.asarray(defocus), jnp.asarray(image))
    # Written by the script's process, which compiles with XLA's optimisations (this
    # one does not: conftest.py): float32 rounding apart (measured 1.4e-6 at 3.0).
    np.testing.assert_allclose(written, np.asarray(expect), rtol=1e-6, atol=1e-6)
    _solved_folder(tmp_path / "filled", image, defocus, fill=True)
    run = subprocess.run([sys.executable, str(script), f"--pixel=a={tmp_path / 'filled'}",
                          f"--pixel_data={data}"], capture_output=True, text=True, timeout=300)
    assert run.returncode != 0 and "filled during the solve" in run.stderr


def test_large_frames_are_filled_on_a_coarser_grid(monkeypatch):
    assert postprocess.fill_factor(1008, 1344) == 1
    assert postprocess.fill_factor(4000, 6000) == 4
    rng = np.random.default_rng(5)
    image, defocus, truth, tex = _two_regions(rng, h=66, w=98)  # not multiples of 4
    fine, kept = postprocess.fill_defocus(jnp.asarray(defocus), jnp.asarray(image))
    monkeypatch.setattr(postprocess, "_FILL_MAX_PIXELS", 66 * 98 // 15)
    assert postprocess.fill_factor(66, 98) == 4
    coarse, kept4 = postprocess.fill_defocus(jnp.asarray(defocus), jnp.asarray(image),
                                             sigma_value=0.1000001)  # traced again
    coarse = np.asarray(coarse)
    assert coarse.shape == defocus.shape and np.all(np.isfinite(coarse))
    np.testing.assert_array_equal(np.asarray(kept4), np.asarray(kept))
    np.testing.assert_array_equal(coarse[np.asarray(kept)], defocus[np.asarray(kept)])
    flat = ~tex
    assert np.abs(coarse - truth)[flat].mean() < 0.1
    assert np.abs(coarse - np.asarray(fine))[flat].mean() < 0.1


def test_a_frame_without_texture_keeps_its_map():
    defocus = np.random.default_rng(6).uniform(0, 2, (40, 56)).astype(np.float32)
    filled, kept = postprocess.fill_defocus(jnp.asarray(defocus),
                                            jnp.full((40, 56, 3), 0.3, jnp.float32))
    assert not np.asarray(kept).any()  # nothing to fill from
    np.testing.assert_array_equal(np.asarray(filled), defocus)
