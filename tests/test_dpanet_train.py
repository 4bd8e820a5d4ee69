"""DPANet training data (dpjax.dpanet.data) and the training app, end to end."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

import dpjax
from dpjax import metrics
from dpjax.dpanet import data, train

ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = ROOT.parent / "shared" / "data" / "pixel4"  # as conftest.pixel4_dir
APP = ROOT / "experiments" / "train_dpanet.py"

# Small and fixed: one number of layers means one render compilation for the module.
SMALL = data.SyntheticConfig(num_layers=(3, 3), kernel_radius=24, radius=(2.0, 8.0))


@pytest.fixture(scope="module")
def fake_calibrated():
    """Parametric pairs shifted off-centre, standing in for calibrated kernels [2, 3, 61, 61]."""
    pairs = [np.roll(dpjax.parametric_dp_kernels(radius=r, ramp=0.5, smooth_sigma=0.5, size=61),
                     (-1, -3), axis=(1, 2)) for r in (3.0, 5.0, 7.0)]
    return data.prepare_calibrated_kernels(np.stack(pairs, axis=1), size=51)


def _centroid(k):
    c = np.arange(k.shape[-1]) - (k.shape[-1] - 1) / 2
    return (k.sum(-1) * c).sum(-1) / k.sum((-2, -1)), (k.sum(-2) * c).sum(-1) / k.sum((-2, -1))


def test_prepare_calibrated_kernels_recentres_and_crops(fake_calibrated):
    assert fake_calibrated.shape == (2, 3, 51, 51)
    np.testing.assert_allclose(fake_calibrated.sum((-2, -1)), 1.0, atol=1e-5)
    cy, cx = _centroid(fake_calibrated.mean(axis=0))
    np.testing.assert_allclose(cy, 0.0, atol=0.05)
    np.testing.assert_allclose(cx, 0.0, atol=0.05)
    # Left/right disparity is kept: the left kernel's centroid stays left of the right's.
    assert np.all(_centroid(fake_calibrated[0])[1] < _centroid(fake_calibrated[1])[1] - 0.5)


def test_synthetic_batch_is_deterministic(fake_calibrated):
    a = data.synthetic_batch(np.random.default_rng(7), 3, 32, SMALL, fake_calibrated)
    b = data.synthetic_batch(np.random.default_rng(7), 3, 32, SMALL, fake_calibrated)
    c = data.synthetic_batch(np.random.default_rng(8), 3, 32, SMALL, fake_calibrated)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a.target, c.target)


@pytest.mark.parametrize("channels", [1, 3])
def test_synthetic_shapes_and_ranges(fake_calibrated, channels):
    cfg = dataclasses.replace(SMALL, channels=channels)
    batch = data.synthetic_batch(np.random.default_rng(1), 2, 48, cfg, fake_calibrated)
    assert isinstance(batch, data.PairBatch)
    for x in batch:
        assert x.shape == (2, 48, 48, channels) and x.dtype == np.float32
        assert np.all(np.isfinite(x)) and x.min() >= 0.0 and x.max() <= 1.0
    assert batch.target.std() > 0.01  # textured, not a flat patch
    assert not np.array_equal(batch.left, batch.right)  # the views differ (disparity, noise)


def test_target_is_sharper_than_the_views(fake_calibrated):
    # Without noise, every target has more gradient energy than its blurred views.
    quiet = dataclasses.replace(SMALL, shot=(1e-9, 1e-9), read=(1e-9, 1e-9))
    batch = data.synthetic_batch(np.random.default_rng(3), 4, 64, quiet, fake_calibrated)
    for left, right, target in zip(*batch):
        assert data.gradient_energy(target) > max(data.gradient_energy(left),
                                                  data.gradient_energy(right))
    # With the default noise levels, still clearly sharper on average.
    batch = data.synthetic_batch(np.random.default_rng(3), 4, 64, SMALL, fake_calibrated)
    inputs = data.gradient_energy(np.concatenate([batch.left, batch.right]))
    assert data.gradient_energy(batch.target) > 1.3 * inputs
    # The mean of the views is a blurred version of the target, not another image.
    mean = (batch.left + batch.right) / 2
    assert np.corrcoef(mean.ravel(), batch.target.ravel())[0, 1] > 0.8


def test_bad_arguments_raise(fake_calibrated):
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="multiple of 16"):
        data.synthetic_batch(rng, 1, 40, SMALL)
    with pytest.raises(ValueError, match="low"):
        data.SyntheticConfig(back_scale=(1.5, 0.5))
    with pytest.raises(ValueError, match="base_kernel_size"):
        data.synthetic_batch(rng, 1, 32, data.SyntheticConfig(base_kernel_size=61),
                             fake_calibrated)
    with pytest.raises(ValueError, match="needs real pairs"):
        data.training_batch(rng, 2, 32, SMALL, real_fraction=0.5)


@pytest.mark.parametrize("scenes", [["011"], ["001", 13], ("005", "16")])
def test_real_source_refuses_held_out_scenes(tmp_path, scenes):
    # The folder does not exist: the split is checked before anything is read.
    with pytest.raises(ValueError, match="held-out"):
        data.load_real_pairs(tmp_path / "missing", scenes)
    assert set(data.TRAIN_SCENES).isdisjoint(data.HELD_OUT_SCENES)


def test_real_pairs_are_aligned_crops(pixel4_dir):
    real = data.load_real_pairs(pixel4_dir, ["1"])
    assert real.scene_ids == ("001",)
    views, target = real.views[0], real.targets[0]
    assert views.shape == (2, 1008 - 12, 1344 - 12, 1) and target.shape == views.shape[1:]
    assert max(abs(s) for s in real.shifts[0]) <= 3  # data README: 0-3 px
    assert 0.0 <= target.min() and target.max() <= 1.0
    # Aligned and on the views' intensity scale: the blurry input is close to the target.
    assert metrics.psnr(views.mean(0), target) > 22.0
    a = data.training_batch(np.random.default_rng(5), 3, 64, SMALL, real=real, real_fraction=1.0)
    b = data.training_batch(np.random.default_rng(5), 3, 64, SMALL, real=real, real_fraction=1.0)
    for x, y in zip(a, b):
        assert x.shape == (3, 64, 64, 1)
        np.testing.assert_array_equal(x, y)


def _run_app(out_dir, steps, env, *extra):
    calib = [] if DATA_DIR.exists() else ["--calib_dir="]
    cmd = [sys.executable, str(APP), f"--output_dir={out_dir}", "--width=4", "--patch=32",
           "--batch=1", f"--steps={steps}", "--real_fraction=0", "--checkpoint_every=100",
           f"--data_dir={DATA_DIR}", "--quiet", *calib, *extra]
    return subprocess.run(cmd, check=False, env=env, capture_output=True, text=True,
                          timeout=600)


@pytest.mark.slow
def test_train_app_runs_and_resumes(tmp_path, request):
    # A persistent compilation cache lets the second invocation reuse the first's
    # executables (and repeated test sessions reuse both).
    pytest_cache = getattr(request.config, "cache", None)  # absent with -p no:cacheprovider
    cache = (pytest_cache.mkdir("jax_compilation_cache") if pytest_cache
             else tmp_path / "jax_cache")
    env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": str(cache),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    out = tmp_path / "run"

    first = _run_app(out, 3, env)
    assert first.returncode == 0, first.stderr[-3000:]
    log = json.loads((out / "train_log.json").read_text())
    assert (log["start_step"], log["final_step"], log["resumed"]) == (0, 3, False)
    assert train.latest_checkpoint(out).name == "ckpt_000000003.npz"
    assert json.loads((out / "run_config.json").read_text())["model"]["width"] == 4

    second = _run_app(out, 5, env)
    assert second.returncode == 0, second.stderr[-3000:]
    log = json.loads((out / "train_log.json").read_text())
    assert (log["start_step"], log["final_step"], log["resumed"]) == (3, 5, True)
    assert [h["step"] for h in log["history"]] == [3, 5]
    assert all(np.isfinite(h["loss"]) for h in log["history"])
    ckpt = train.restore_latest(out)
    assert ckpt.step == 5
    # The optimiser state was restored, not re-initialised: Adam has counted 5 updates.
    counts = [leaf for path, leaf in jax.tree_util.tree_flatten_with_path(ckpt.opt_state)[0]
              if "count" in jax.tree_util.keystr(path)]
    assert counts and all(int(c) == 5 for c in counts)

    third = _run_app(out, 7, env, "--width=8")
    assert third.returncode == 2
    assert "refusing to resume from step 5" in third.stderr
    assert "model.width: checkpoint 4, flags 8" in third.stderr
    assert train.latest_checkpoint(out).name == "ckpt_000000005.npz"
