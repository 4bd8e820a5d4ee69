"""The all-in-focus diagnostics: experiments/map_oracle.py's transmittances and
experiments/error_by_gradient.py's split of the error."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile

from dpjax import io, mpi

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))
import map_oracle  # noqa: E402

SCALES = np.linspace(1.5, 0.3, 5).astype(np.float32)  # back to front, as MpiConfig.scales


def _trans(params):
    return np.asarray(mpi.transmittance(mpi.alphas(params)))


def test_two_layer_weights_bracket_the_map():
    dmap = np.array([[1.5, 1.2], [0.75, 0.0]], np.float32)  # on layer 0, 1, between 2-3, below
    comp = np.full((1, 2, 2), 0.4, np.float32)
    params = map_oracle.two_layer_params(dmap, SCALES, comp)
    t = _trans(params)
    np.testing.assert_allclose(t.sum(axis=0), 1.0, atol=1e-5)
    np.testing.assert_allclose(t[:, 0, 0], [1, 0, 0, 0, 0], atol=1e-5)
    np.testing.assert_allclose(t[:, 0, 1], [0, 1, 0, 0, 0], atol=1e-5)
    np.testing.assert_allclose(t[:, 1, 0], [0, 0, 0.5, 0.5, 0], atol=1e-5)
    np.testing.assert_allclose(t[:, 1, 1], [0, 0, 0, 0, 1], atol=1e-5)  # clipped to the range
    # every layer carries the composite: the refinement starts from it
    np.testing.assert_allclose(np.asarray(mpi.colors(params)), 0.4, atol=1e-6)


def test_split_moves_only_the_heaviest_layer():
    trans = np.zeros((5, 1, 2), np.float32)
    trans[:, 0, 0] = [0.1, 0.0, 0.9, 0.0, 0.0]  # heaviest layer 2, a little of layer 0
    trans[:, 0, 1] = [0.0, 0.0, 0.0, 1.0, 0.0]
    fine_scales = np.linspace(1.5, 0.3, 9)
    # pixel 0's map a quarter of a coarse spacing towards layer 3; pixel 1's far away
    dmap = np.array([[0.9 - 0.075, 1.5]], np.float32)
    t = _trans(map_oracle.split_params(trans, dmap, fine_scales, np.full((1, 1, 2), 0.5)))
    np.testing.assert_allclose(t.sum(axis=0), 1.0, atol=1e-5)
    expect0 = np.zeros(9)
    expect0[0], expect0[4], expect0[5] = 0.1, 0.45, 0.45  # fine index 4.5
    np.testing.assert_allclose(t[:, 0, 0], expect0, atol=1e-5)
    expect1 = np.zeros(9)
    expect1[5] = 1.0  # clamped to one fine spacing from layer 3 (fine index 6)
    np.testing.assert_allclose(t[:, 0, 1], expect1, atol=1e-5)


def test_error_split_by_gradient(tmp_path, pixel4_dir):
    gt, _ = io.read_image(pixel4_dir / "gt_all_in_focus_im" / "001_gt.png")
    gt = gt.astype(np.float64)
    gt = gt.mean(axis=-1) if gt.ndim == 3 else gt
    y0, x0, h, w = 100, 200, 96, 128
    region = gt[y0:y0 + h, x0:x0 + w] / gt.max()
    noise = np.random.default_rng(0).normal(0.0, 0.01, region.shape)
    # wiener: the ground truth plus noise; mpi: half that noise (a quarter of the MSE)
    for method, amount in (("wiener", 1.0), ("mpi", 0.5), ("input", 2.0)):
        folder = tmp_path / method / "001"
        folder.mkdir(parents=True)
        tifffile.imwrite(folder / "all_in_focus.tif",
                         (region + amount * noise).astype(np.float32)[..., None])
        (folder / "result.json").write_text(
            json.dumps({"preprocessing": {"crop": [y0, x0, h, w]}}))
    out = tmp_path / "split.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "experiments" / "error_by_gradient.py"),
         f"--results={tmp_path}", f"--data_dir={pixel4_dir}", f"--output={out}"],
        capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    r = json.loads(out.read_text())["001"]
    for method, ratio in (("wiener", 1.0), ("mpi", 0.25), ("input", 4.0)):
        shares = [r[method][p]["share"] for p in ("flat_50", "middle_40", "steep_10")]
        assert sum(shares) == pytest.approx(1.0)
        # white noise: each part's share of the error is its share of the pixels
        np.testing.assert_allclose(shares, [0.5, 0.4, 0.1], atol=0.05)
        for p in ("flat_50", "middle_40", "steep_10"):
            assert r[method][p]["mse_vs_wiener"] == pytest.approx(ratio, rel=0.05)
