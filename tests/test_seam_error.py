"""experiments/seam_error.py: the error along the kernel tiles' borders against away from them."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile

from dpjax import reproduce as rt

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))
import seam_error  # noqa: E402


def test_border_distance_counts_inner_borders_only():
    d = seam_error.border_distance((4, 12), (0, 2), (4, 6), (1, 3))
    # Frame columns 2..13; inner borders between 5|6 and 11|12; no row border (1 row).
    np.testing.assert_array_equal(d[0], [3, 2, 1, 0, 0, 1, 2, 2, 1, 0, 0, 1])
    assert np.all(d == d[0])
    assert np.all(np.isinf(seam_error.border_distance((3, 3), (0, 0), (3, 3), (1, 1))))


def test_a_seam_artefact_shows_and_plain_noise_does_not(tmp_path, pixel4_dir):
    run = rt.prepare_run(rt.Options(data_dir=pixel4_dir, crop=(1, 2), scenes=("001",),
                                    methods=("input",), output_dir=tmp_path / "unused"))
    _, bank, gt, _, _ = rt.load_scene(run, run.pairs["001"])
    gt = np.asarray(gt, np.float32)
    h, w = gt.shape
    rng = np.random.default_rng(0)
    noisy = gt + 0.01 * gt.max() * rng.standard_normal(gt.shape).astype(np.float32)
    seam = noisy.copy()
    c = bank.grid.tile_w  # the one inner border of a 1x2 crop, between columns c-1 and c
    seam[:, c - 3:c + 3] += 0.05 * gt.max() * rng.standard_normal((h, 6)).astype(np.float32)
    for label, img in (("noise", noisy), ("seam", seam)):
        (tmp_path / label / "001").mkdir(parents=True)
        tifffile.imwrite(tmp_path / label / "001" / "all_in_focus.tif", img[..., None])
    out = tmp_path / "seams.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "experiments" / "seam_error.py"), "--scenes=001",
         "--crop=1x2", f"--data_dir={pixel4_dir}", f"--output={out}",
         f"--runs=noise={tmp_path / 'noise'},seam={tmp_path / 'seam'}"],
        capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads(out.read_text())
    noise, seamed = res["scenes"]["001"]["noise"], res["scenes"]["001"]["seam"]
    assert abs(noise["ratio_db"]) < 1.0  # the same noise everywhere
    assert seamed["ratio_db"] > noise["ratio_db"] + 10.0  # 25x the variance along the seam
    assert seamed["far_mse"] == pytest.approx(noise["far_mse"], rel=1e-3)
    assert res["mean_ratio_db"]["seam"] == seamed["ratio_db"]


def test_edge_distance_measures_to_the_outer_edge():
    d = seam_error.edge_distance((3, 5), (1, 2), (6, 9))
    # Image rows 1..3 of 6 (distances 1, 2, 2), columns 2..6 of 9 (2, 3, 4, 3, 2).
    np.testing.assert_array_equal(d, [[1, 1, 1, 1, 1], [2, 2, 2, 2, 2], [2, 2, 2, 2, 2]])


def test_a_frame_edge_artefact_shows_with_edges_frame():
    rng = np.random.default_rng(1)
    gt = 0.5 + 0.1 * rng.standard_normal((80, 96))
    noisy = gt + 0.01 * rng.standard_normal(gt.shape)
    edged = noisy.copy()
    ring = seam_error.edge_distance(gt.shape, (0, 0), gt.shape) < 10
    edged[ring] += 0.05 * rng.standard_normal(int(ring.sum()))
    kw = dict(tile=(40, 48), grid=(2, 2), band=8, far=20)
    plain = seam_error.seam_ratio(noisy, gt, edges="frame", **kw)
    frame = seam_error.seam_ratio(edged, gt, edges="frame", **kw)
    tiles = seam_error.seam_ratio(edged, gt, edges="tiles", **kw)
    assert abs(plain["ratio_db"]) < 1.0
    assert frame["ratio_db"] > plain["ratio_db"] + 10.0  # 25x the variance near the edge
    assert frame["ratio_db"] > tiles["ratio_db"] + 10.0  # the seams' measure misses it
