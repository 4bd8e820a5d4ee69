"""The DP kernel model (dpjax.kernel_model) and self-calibration (dpjax.selfcal)."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import dpjax
from dpjax import io, selfcal, synthetic
from dpjax.kernel_model import (
    LEGACY_MODEL,
    DpKernelModel,
    model_bank,
    normalise_angle,
    render_kernel_pairs,
)

# A rotated, asymmetric kernel with a split that moves across the frame.
TRUE = DpKernelModel(radius=5.0, angle_deg=30.0, split=0.1, split_gradient=-0.3,
                     softness=0.15, softness_asym=0.4, ramp=0.5, ramp_asym=0.3, smooth=0.06)
GRID = dpjax.TileGrid(rows=3, cols=4, tile_h=64, tile_w=72)  # 192 x 288
FAST = selfcal.SelfCalConfig(ref_radius=5.0, window=24, windows_per_pair=48)


def _kernel_distance(model_a, model_b, rows=3, cols=4, size=31):
    """Mean per-kernel L1 between two models after matching the gauge (a's radius
    scaled by 0.5 ... 2 against b's) and the sign (a rotated by 180 degrees)."""
    kb = render_kernel_pairs(model_b, rows=rows, cols=cols, size=size)
    best = np.inf
    for alpha in np.linspace(0.5, 2.0, 31):
        ka = render_kernel_pairs(model_a.replace(radius=alpha * model_b.radius), rows=rows,
                                 cols=cols, size=size)
        for k in (ka, ka[:, :, ::-1, ::-1]):
            best = min(best, float(np.abs(k - kb).sum(axis=(2, 3)).mean()))
    return best


@pytest.mark.parametrize("model", [
    DpKernelModel(),
    DpKernelModel(radius=3.0, softness=0.0, smooth=0.0),
    TRUE,
    DpKernelModel(radius=7.5, angle_deg=-70.0, split=-0.6, split_gradient=1.5, softness=1.0,
                  softness_asym=-1.0, ramp=-1.0, ramp_asym=1.0, smooth=0.2),
])
def test_model_renders_unit_sum_non_negative_pairs(model):
    k = render_kernel_pairs(model, rows=2, cols=3)
    assert k.shape == (2, 6, model.default_size(), model.default_size())
    assert np.all(np.isfinite(k)) and k.min() >= 0.0
    np.testing.assert_allclose(k.sum(axis=(2, 3)), 1.0, atol=1e-5)
    # The views differ (a DP pair, not two copies of one kernel).
    assert np.abs(k[0] - k[1]).sum(axis=(1, 2)).min() > 0.1


def test_hard_split_model_is_the_legacy_parametric_pair_up_to_the_ramp_shape():
    # softness 0, smooth 0: half discs as in parametric_dp_kernels; its linear ramp
    # 1 + 0.5|x|/r and our exp(ramp |u|) agree at the centre and the edge.
    new = render_kernel_pairs(DpKernelModel(radius=6.0, softness=0.0, smooth=0.0,
                                            ramp=float(np.log(1.5))), rows=1, cols=1, size=15)
    old = dpjax.parametric_dp_kernels(radius=6.0, ramp=0.5, size=15)
    assert np.abs(new[:, 0] - old).sum(axis=(1, 2)).max() < 0.03
    # Left view on the left (x <= 0), right view on the right.
    assert new[0, 0][:, 8:].sum() == 0 and new[1, 0][:, :7].sum() == 0


def test_orientation_90_is_the_transpose_of_0():
    m0 = TRUE.replace(angle_deg=0.0)
    k0 = render_kernel_pairs(m0, rows=2, cols=3)  # tiles (r, c) at (px_c, py_r)
    k90 = render_kernel_pairs(m0.replace(angle_deg=90.0), rows=3, cols=2)  # transposed grid
    k0 = k0.reshape(2, 2, 3, *k0.shape[-2:])
    k90 = k90.reshape(2, 3, 2, *k90.shape[-2:])
    np.testing.assert_allclose(k90, np.swapaxes(np.swapaxes(k0, 1, 2), -1, -2), atol=1e-6)


def test_angle_plus_180_is_the_sign_flip():
    # theta + 180 with split_gradient negated = the kernels rotated by 180 degrees.
    a = render_kernel_pairs(TRUE, rows=2, cols=2)
    angle, grad = normalise_angle(TRUE.angle_deg + 180.0, TRUE.split_gradient)
    assert angle == pytest.approx(TRUE.angle_deg) and grad == -TRUE.split_gradient
    b = render_kernel_pairs(TRUE.replace(angle_deg=210.0, split_gradient=0.3), rows=2, cols=2)
    np.testing.assert_allclose(b, a[:, :, ::-1, ::-1], atol=1e-5)


def test_model_validates_and_round_trips_as_dict():
    with pytest.raises(ValueError, match="radius"):
        DpKernelModel(radius=0.0)
    with pytest.raises(ValueError, match="split"):
        DpKernelModel(split=1.2)
    with pytest.raises(ValueError, match="unknown"):
        DpKernelModel.from_dict({"radius": 3.0, "bogus": 1.0})
    assert DpKernelModel.from_dict(TRUE.to_dict()) == TRUE


def _offsets(k: np.ndarray) -> np.ndarray:
    """Right minus left centroid along x of each tile's pair [2, T, K, K] -> [T]."""
    x = np.arange(k.shape[-1]) - (k.shape[-1] - 1) / 2
    c = (k * x).sum(axis=(-2, -1)) / k.sum(axis=(-2, -1))
    return c[1] - c[0]


def test_softness_edge_shrinks_the_offset_towards_the_edge_along_the_split_only():
    base = DpKernelModel(radius=4.0, softness=0.3, ramp=-0.3)
    flat = render_kernel_pairs(base, rows=3, cols=4, size=13)
    np.testing.assert_array_equal(render_kernel_pairs(base.replace(softness_edge=0.0), rows=3,
                                                      cols=4, size=13), flat)
    edge = render_kernel_pairs(base.replace(softness_edge=2.0), rows=3, cols=4, size=13)
    np.testing.assert_allclose(edge.sum(axis=(2, 3)), 1.0, atol=1e-5)
    off_flat = _offsets(flat.astype(np.float64)).reshape(3, 4)
    off_edge = _offsets(edge.astype(np.float64)).reshape(3, 4)
    assert np.ptp(off_flat) < 1e-4  # no split movement: the same offset everywhere
    # Columns 0/3 sit at |px| 0.75, 1/2 at 0.25: the outer ones lose more, left and
    # right alike; the rows (across the split) do not matter.
    assert np.all(off_edge[:, [0, 3]] < off_edge[:, [1, 2]] - 0.05)
    assert np.all(off_edge[:, [1, 2]] < off_flat[:, [1, 2]])
    np.testing.assert_allclose(off_edge[:, 0], off_edge[:, 3], atol=1e-4)
    np.testing.assert_allclose(off_edge, np.repeat(off_edge[:1], 3, axis=0), atol=1e-4)
    # Turned by 90 degrees it acts along the rows instead.
    turned = render_kernel_pairs(base.replace(softness_edge=2.0, angle_deg=90.0), rows=4,
                                 cols=3, size=13)
    np.testing.assert_allclose(turned.reshape(2, 4, 3, 13, 13),
                               np.swapaxes(np.swapaxes(edge.reshape(2, 3, 4, 13, 13), 1, 2),
                                           -1, -2), atol=1e-6)


def test_softness_edge_power_sets_the_profile_and_old_models_keep_p_squared():
    # Columns 0/3 sit at |p| 0.75, 1/2 at 0.25. With the power 1 (the default) the inner
    # columns lose more of their offset than with 2 (|p| > p^2 there), the outer ones too.
    base = DpKernelModel(radius=4.0, softness=0.3, ramp=-0.3, softness_edge=1.0)
    assert base.softness_edge_power == 1.0
    linear = _offsets(render_kernel_pairs(base, rows=1, cols=4, size=13).astype(np.float64))
    square = _offsets(render_kernel_pairs(base.replace(softness_edge_power=2.0), rows=1,
                                          cols=4, size=13).astype(np.float64))
    assert np.all(linear < square - 0.01)
    # A model saved before the power was recorded is read back with the p^2 it used.
    old = {k: v for k, v in base.to_dict().items() if k != "softness_edge_power"}
    assert DpKernelModel.from_dict(old).softness_edge_power == 2.0
    assert DpKernelModel.from_dict(base.to_dict()) == base
    with pytest.raises(ValueError, match="softness_edge_power must be positive"):
        base.replace(softness_edge_power=0.0)


def test_selfcal_config_refuses_unknown_fit_params():
    assert "softness_edge" in selfcal.SelfCalConfig().fit_params
    assert "smooth" not in selfcal.SelfCalConfig().fit_params  # runs to its bound
    selfcal.SelfCalConfig(fit_params=("angle_deg", "softness_edge"))
    with pytest.raises(ValueError, match="unknown fit_params \\['bogus'\\]"):
        selfcal.SelfCalConfig(fit_params=("angle_deg", "bogus"))


@pytest.fixture(scope="module")
def synthetic_fit():
    bank = model_bank(TRUE, GRID)
    rng = np.random.default_rng(0)
    pairs = [synthetic.make_scene(rng, bank, num_layers=4, scale_range=(-2.0, 2.0)).views
             for _ in range(2)]
    return selfcal.fit_kernel_model(pairs, FAST)


def test_fit_recovers_a_rotated_asymmetric_kernel(synthetic_fit):
    """Tolerances, with the values measured on a 2-core CPU in brackets: angle within
    3 degrees (30.05), split_gradient within 0.2 (-0.20 for -0.3), softness within
    0.1 (0.19 for 0.15), per-kernel L1 below 0.25 after matching the gauge (0.18;
    the legacy half discs: 0.45). The ramp and the asymmetries are weakly determined
    here (windows straddling two depths bias the cost by a few per cent, enough to
    move them: ramp 0.06 for 0.5) and are only checked through the kernels."""
    res = synthetic_fit
    assert not res.fallback, res.note
    m = res.model
    angle, grad = m.angle_deg, m.split_gradient
    if abs(angle - TRUE.angle_deg) > 90:  # the same family with the sign flipped
        angle, grad = normalise_angle(angle + 180.0, grad)
    assert angle == pytest.approx(TRUE.angle_deg, abs=3.0)
    assert grad == pytest.approx(TRUE.split_gradient, abs=0.2)
    assert m.softness == pytest.approx(TRUE.softness, abs=0.1)
    assert _kernel_distance(m, TRUE) < 0.25
    assert _kernel_distance(LEGACY_MODEL, TRUE) > 0.4
    # Quality: most of the left/right mismatch explained, the orientation decided.
    assert res.gain > 0.8 and res.angle_margin > 1.0
    assert min(res.angle_costs, key=res.angle_costs.get) in (0.0, 45.0)
    # Gauge: the 90th percentile of the blur radius (the scenes reach |s| = 2, 10 px).
    assert 7.0 < m.radius < 12.0
    # No softening towards the edge in TRUE: the fit keeps it at its lower bound (without
    # the projection these pairs give -0.42, a split sharpening towards the edge).
    assert 0.0 <= m.softness_edge < 0.1


def test_fit_falls_back_without_disparity():
    rng = np.random.default_rng(1)
    tex = synthetic.natural_texture(rng, 192, 288)
    pair = np.stack([tex, tex])  # no DP disparity anywhere
    cfg = selfcal.SelfCalConfig(ref_radius=5.0, window=24, windows_per_pair=32,
                                angles_deg=(0.0, 90.0), rounds=1, steps=10)
    res = selfcal.fit_kernel_model([pair], cfg)
    assert res.fallback and res.note
    assert res.model == LEGACY_MODEL


def test_pairs_of_different_sizes_are_refused():
    a = np.ones((2, 192, 288, 1), np.float32)
    b = np.ones((2, 192, 256, 1), np.float32)
    with pytest.raises(ValueError, match="b is 192x256x1 but a is 192x288x1: one kernel set "
                       "needs pairs of one size"):
        selfcal.fit_kernel_model([a, b], FAST, names=["a", "b"])
    with pytest.raises(ValueError, match=r"\[2, H, W, C\]"):
        selfcal.fit_kernel_model([np.ones((3, 8, 8, 1))], FAST)


def test_camera_settings_must_agree():
    same = [{"model": "R6m2", "f_number": 4.0}, {"model": "R6m2"}, {}]
    selfcal.check_same_camera(same, ["a", "b", "c"])
    with pytest.raises(ValueError, match="pairs a and c differ in f_number"):
        selfcal.check_same_camera([{"f_number": 4.0}, {}, {"f_number": 5.6}], ["a", "b", "c"])


def test_calibration_folder_round_trips(tmp_path, synthetic_fit):
    calib = selfcal.save_self_calibration(tmp_path, synthetic_fit, height=192, width=288,
                                          sources=["p0", "p1"])
    assert calib.grid == (2, 3) and calib.tile_size == 96
    loaded = io.load_calibration_kernels(tmp_path)
    assert loaded.grid == calib.grid and loaded.tile_size == calib.tile_size
    np.testing.assert_allclose(loaded.kernels, calib.kernels, atol=1e-6)
    meta = json.loads((tmp_path / io.KERNELS_META).read_text())
    assert DpKernelModel.from_dict(meta["model"]) == synthetic_fit.model
    assert meta["sources"] == ["p0", "p1"] and meta["source"] == "dpjax.selfcal"
    assert meta["self_calibration"]["fallback"] is False
    with pytest.raises(ValueError, match="does not divide"):
        selfcal.calibration_kernels(TRUE, height=192, width=288, tile_size=100)
    with pytest.raises(ValueError, match="redefine"):
        io.save_calibration_kernels(tmp_path, calib, extra_meta={"grid": [1, 1]})


def test_read_camera_settings(tmp_path):
    from PIL import Image

    exif = Image.Exif()
    exif[0x0110] = "EOS R6m2"
    exif.get_ifd(0x8769)[0x829D] = 4.0
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "a.png", exif=exif.tobytes())
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "b.png")
    assert io.read_camera_settings(tmp_path / "a.png") == {"model": "EOS R6m2", "f_number": 4.0}
    assert io.read_camera_settings(tmp_path / "b.png") == {}
    with pytest.raises(io.MissingFileError):
        io.read_camera_settings(tmp_path / "c.png")



CALIBRATE = Path(__file__).resolve().parents[1] / "experiments" / "calibrate_kernels.py"


def _run_calibrate(*args):
    env = dict(os.environ, PYTHONPATH=str(CALIBRATE.parents[1]))
    return subprocess.run([sys.executable, str(CALIBRATE), *args], capture_output=True,
                          text=True, env=env, timeout=300)


def test_calibrate_kernels_cli_refuses_mixed_sizes_and_unknown_scenes(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for name, (h, w) in (("a", (64, 96)), ("b", (64, 80))):
        for side in "LR":
            img = (rng.random((h, w, 3)) * 255).astype(np.uint8)
            Image.fromarray(img).save(tmp_path / f"{name}_{side}.png")
    out = tmp_path / "cal"
    res = _run_calibrate(f"--input_dir={tmp_path}", f"--output_dir={out}")
    assert res.returncode == 1
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("E")]
    assert len(errors) == 1 and "b is 64x80x3 but a is 64x96x3" in errors[0]
    res = _run_calibrate(f"--input_dir={tmp_path}", f"--output_dir={out}", "--scenes=a,zz")
    assert res.returncode == 1 and "--scenes zz not found" in res.stderr
    res = _run_calibrate(f"--input_dir={tmp_path}", f"--output_dir={out}", "--scenes=a",
                         "--fit_params=angle_deg,bogus")
    assert res.returncode == 1 and "unknown fit_params ['bogus']" in res.stderr
    assert not out.exists()


def test_calibrate_kernels_cli_fits_softness_edge_by_default(tmp_path):
    import tifffile

    bank = model_bank(TRUE.replace(softness_edge=0.5), GRID)
    rng = np.random.default_rng(3)
    for i in range(3):
        views = synthetic.make_scene(rng, bank, num_layers=4, scale_range=(-2.0, 2.0)).views
        for v, side in enumerate("LR"):
            tifffile.imwrite(tmp_path / f"s{i}_{side}.tif",
                             np.round(np.clip(views[v, ..., 0], 0, 1) * 65535).astype(np.uint16))
    out = tmp_path / "cal"
    res = _run_calibrate(f"--input_dir={tmp_path}", f"--output_dir={out}")
    assert res.returncode == 0, res.stderr[-3000:]
    meta = json.loads((out / "kernels_meta.json").read_text())
    assert meta["fit_params"] == list(selfcal.SelfCalConfig().fit_params)
    # Fitted, from a start of 0, in the right direction; not accurately: small pairs
    # identify it weakly (own_camera.md, "Shape or variation"; SelfCalConfig).
    assert 0.2 < meta["model"]["softness_edge"] < 3.0
    tile = selfcal.choose_tile_size(192, 288)
    assert io.load_calibration_kernels(out).grid == (192 // tile, 288 // tile)


def test_a_softness_edge_not_fitted_keeps_its_start_even_below_the_fitted_bound():
    bank = model_bank(TRUE, GRID)
    pairs = [synthetic.make_scene(np.random.default_rng(5), bank, num_layers=4,
                                  scale_range=(-2.0, 2.0)).views]
    start = selfcal.SelfCalConfig().start.replace(softness_edge=-0.2)
    fixed = dataclasses.replace(FAST, start=start, steps=5, rounds=1, min_gain=0.0,
                                fit_params=("angle_deg", "softness"))
    assert selfcal.fit_kernel_model(pairs, fixed).fitted_model.softness_edge == \
        pytest.approx(-0.2, abs=1e-5)
    fitted = dataclasses.replace(fixed, fit_params=("angle_deg", "softness", "softness_edge"))
    assert selfcal.fit_kernel_model(pairs, fitted).fitted_model.softness_edge >= 0.0


@pytest.mark.parametrize("shape,tile", [((512, 768), 128), ((1008, 1344), 168),
                                        ((4000, 6000), 200), ((100, 150), 50)])
def test_choose_tile_size_covers_the_frame_with_pyramid_friendly_tiles(shape, tile):
    got = selfcal.choose_tile_size(*shape)
    assert got == tile
    assert shape[0] % got == 0 and shape[1] % got == 0
