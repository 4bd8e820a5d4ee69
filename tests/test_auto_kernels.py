"""--kernels=auto end to end (dpjax.auto_kernels through dpjax.runner and run_solver.py).

Synthetic pairs rendered through a known, rotated and asymmetric kernel model are
solved by the runner without a calibration: the kernels it estimates must be close to
the true ones, be written as a reusable calibration folder, be reused by a re-run (and
when photos are added), and be fitted again when a fitted photo changes. The solves
are tiny (4 layers, one pyramid level, 5 iterations): the fit is what is tested.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile

import dpjax
from dpjax import auto_kernels, io, outputs, runner, scene, selfcal, synthetic
from dpjax.config import Config, schedule
from dpjax.kernel_model import DpKernelModel, model_bank, render_kernel_pairs
from dpjax.scene import KernelOptions, SceneOptions

ROOT = Path(__file__).resolve().parents[1]
TRUE = DpKernelModel(radius=5.0, angle_deg=30.0, split=0.1, split_gradient=-0.3,
                     softness=0.15, softness_asym=0.4, ramp=0.5, ramp_asym=0.3, smooth=0.06)
GRID = dpjax.TileGrid(rows=4, cols=4, tile_h=72, tile_w=96)  # 288 x 384: enough windows


def _write_pair(folder: Path, name: str, views: np.ndarray) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    v = np.clip(np.asarray(views)[..., 0] / float(np.max(views)), 0, 1)
    for side, img in zip(("left", "right"), v):
        tifffile.imwrite(folder / f"{name}_{side}.tif", (img * 60000).astype(np.uint16))


def _scenes(n: int, seed: int) -> list[np.ndarray]:
    bank = model_bank(TRUE, GRID)
    rng = np.random.default_rng(seed)
    return [np.asarray(synthetic.make_scene(rng, bank, num_layers=4,
                                            scale_range=(-2.0, 2.0)).views) for _ in range(n)]


def _opts(inp: Path, out: Path, **kernels) -> runner.RunOptions:
    cfg = Config(solver=schedule(pyramid_levels=1, num_iters=5))
    # No refinement: the kernels' fit is under test, and its compilation would be most
    # of the solves' time.
    cfg = cfg.replace(**{"mpi.num_layers": 4, "init.search": False, "refine.iters": 0})
    return runner.RunOptions(input_dir=inp, output_dir=out,
                             scene=SceneOptions(base=cfg, preset="none", input_dir=inp),
                             kernels=KernelOptions(**kernels))


def _kernel_distance(a: DpKernelModel, b: DpKernelModel, size: int = 31) -> float:
    """Mean per-kernel L1 on a 3x4 grid after matching the gauge and the sign."""
    kb = render_kernel_pairs(b, rows=3, cols=4, size=size)
    best = np.inf
    for alpha in np.linspace(0.5, 2.0, 31):
        ka = render_kernel_pairs(a.replace(radius=alpha * b.radius), rows=3, cols=4, size=size)
        for k in (ka, ka[:, :, ::-1, ::-1]):
            best = min(best, float(np.abs(k - kb).sum(axis=(2, 3)).mean()))
    return best


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("auto")
    inp, out = root / "in", root / "out"
    for i, views in enumerate(_scenes(2, seed=0)):
        _write_pair(inp, f"s{i}", views)
    outcome = runner.run(_opts(inp, out))
    return {"root": root, "inp": inp, "out": out, "outcome": outcome}


def test_auto_fits_the_true_kernels_and_writes_a_calibration_folder(first_run):
    out, outcome = first_run["out"], first_run["outcome"]
    assert outcome.exit_status == 0 and outcome.counts["done"] == 2
    kernels = outcome.summary["kernels"]
    assert kernels["model"] == "auto" and list(kernels["groups"]) == ["288x384"]
    group = kernels["groups"]["288x384"]
    assert not group["fallback"] and not group["reused"]
    assert group["fit_pairs"] == ["s0", "s1"]
    fitted = DpKernelModel.from_dict(group["kernel_model"])
    # The same tolerance as tests/test_selfcal.py's direct fit (0.18 measured there);
    # the default parametric kernels are far (> 0.4).
    assert _kernel_distance(fitted, TRUE) < 0.25
    # Each scene was solved with the fitted model, recorded in its result.
    result = json.loads((out / "s0" / outputs.RESULT_JSON).read_text())
    assert result["kernels"]["model"] == "fitted"
    assert result["kernels"]["kernel_model"] == group["kernel_model"]
    # The calibration folder is reusable with --calib_dir for the same frame size.
    calib = io.load_calibration_kernels(out / auto_kernels.FOLDER / "288x384")
    io.check_kernels_match_image(calib, 288, 384)
    # It records the blur it saw in its own unit (the radius is that blur, rounded),
    # and so does each scene's record, for the auto preset's search grid.
    assert calib.blur_p90 == pytest.approx(1.0, abs=0.05)
    assert result["kernels"]["blur_p90"] == pytest.approx(calib.blur_p90, rel=1e-6)
    fit = {"blur_radius_px": [1.0, 2.0, 5.2], "model": {"radius": 5.0}, "fallback": False}
    assert selfcal.blur_p90(fit) == pytest.approx(1.04)
    assert selfcal.blur_p90({**fit, "fallback": True}) is None  # the default kernels
    assert selfcal.blur_p90({"fallback": True, "note": "no pair"}) is None
    meta = json.loads((out / auto_kernels.FOLDER / "288x384" / io.KERNELS_META).read_text())
    assert meta["pairs"] == ["s0", "s1"] and meta["model"] == group["kernel_model"]
    # The summary lists only scenes, not the calibration folder.
    assert [r["scene"] for r in outcome.summary["scenes"]] == ["s0", "s1"]


def test_rerun_reuses_the_fit_and_added_photos_keep_it(first_run, tmp_path):
    inp, out = first_run["inp"], first_run["out"]
    meta_path = out / auto_kernels.FOLDER / "288x384" / io.KERNELS_META
    before = meta_path.stat().st_mtime_ns
    again = runner.run(_opts(inp, out))
    assert again.exit_status == 0 and again.counts == {**again.counts, "skipped": 2, "done": 0}
    assert again.summary["kernels"]["groups"]["288x384"]["reused"]
    assert meta_path.stat().st_mtime_ns == before
    # A copy of the folders with one more photo: the fit is kept, only the new one solved.
    import shutil

    inp2, out2 = tmp_path / "in", tmp_path / "out"
    shutil.copytree(inp, inp2)
    shutil.copytree(out, out2)
    _write_pair(inp2, "s2", _scenes(1, seed=5)[0])
    more = runner.run(_opts(inp2, out2))
    assert more.counts["done"] == 1 and more.counts["skipped"] == 2
    assert more.summary["kernels"]["groups"]["288x384"]["reused"]
    # A fitted photo that changes: fitted again (and the scenes solved again).
    _write_pair(inp2, "s0", _scenes(1, seed=9)[0])
    changed = runner.run(_opts(inp2, out2))
    group = changed.summary["kernels"]["groups"]["288x384"]
    assert not group["reused"] and group["fit_pairs"] == ["s0", "s1", "s2"]
    assert changed.counts["done"] >= 1


def test_groups_by_size_and_picks_pairs_evenly(tmp_path):
    rng = np.random.default_rng(0)
    for name, (h, w) in (("a", (40, 60)), ("b", (40, 60)), ("c", (50, 60))):
        for side in ("left", "right"):
            tifffile.imwrite(tmp_path / f"{name}_{side}.tif",
                             (rng.random((h, w)) * 6e4).astype(np.uint16))
    tifffile.imwrite(tmp_path / "d_left.tif", np.zeros((4, 4), np.uint16))  # no partner
    pairs = {p.name: p for p in io.discover_pairs(tmp_path)}
    groups, unread = auto_kernels.group_pairs(pairs)
    assert groups == {"40x60": ["a", "b"], "50x60": ["c"]} and unread == ["d"]
    names = [f"n{i:02d}" for i in range(20)]
    picked = auto_kernels.pick_pairs(names, 8)
    assert len(picked) == 8 and picked[0] == "n00" and picked[-1] == "n19"
    assert auto_kernels.pick_pairs(names[:3], 8) == names[:3]


def test_auto_refuses_several_processes(first_run, tmp_path):
    inp = first_run["inp"]
    outcome = runner.run(_opts(inp, tmp_path / "o"), process_count=2,
                         gather=lambda v: [v, v])
    assert outcome.exit_status == runner.EXIT_SETUP and outcome.state == "not started"
    assert not (tmp_path / "o" / auto_kernels.FOLDER).exists()


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, str(ROOT / "run_solver.py"), *args],
                          capture_output=True, text=True, timeout=300, env=env)


@pytest.mark.parametrize("args, message", [
    (["--kernels=auto", "--kernel_radius=3"], "--kernel_radius set(s) the parametric"),
    (["--kernels=parametric", "--calib_dir=x"], "--calib_dir is not read with"),
    (["--kernels=calibrated"], "--kernels=calibrated needs --calib_dir"),
])
def test_cli_refuses_contradicting_kernel_flags(tmp_path, args, message):
    proc = _cli(f"--input_dir={tmp_path}", f"--output_dir={tmp_path / 'o'}", *args)
    assert proc.returncode == 1 and message in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


def _mean_kernel_centroids(k: np.ndarray) -> np.ndarray:
    """[2, T, K, K] -> [T, 2] (x, y) centroid of each tile's (k_L + k_R) / 2, px."""
    m = k.mean(axis=0)
    c = (m.shape[-1] - 1) / 2
    y, x = np.mgrid[: m.shape[-2], : m.shape[-1]] - c
    s = m.sum(axis=(-2, -1))
    return np.stack([(m * x).sum(axis=(-2, -1)) / s, (m * y).sum(axis=(-2, -1)) / s], -1)


def test_fitted_kernels_are_recentred_like_calibrated_ones():
    # TRUE's split moves across the frame, so its mean kernel sits off centre by up to
    # ~1 px at the frame's sides: the solver's fitted source re-centres every tile's pair
    # (as a calibration folder's are), keeping each pair's disparity, unless told not to.
    info = {"tile_grid": [GRID.rows, GRID.cols, GRID.tile_h, GRID.tile_w]}
    banks = {}
    for recenter in (True, False):
        src = scene.kernel_source(KernelOptions(kind="fitted", model=TRUE, recenter=recenter),
                                  1)
        assert src.info["recentered"] is recenter
        banks[recenter] = np.asarray(scene.make_bank(src, info).kernels, np.float64)
    off = np.abs(_mean_kernel_centroids(banks[False])).max()
    assert off > 0.3, off
    assert np.abs(_mean_kernel_centroids(banks[True])).max() < 0.05 * off
    def disparity(k):
        return _mean_kernel_centroids(k[:1]) - _mean_kernel_centroids(k[1:])
    # (kept to the sub-pixel shift's interpolation: 1.5% of ~4.5 px here)
    np.testing.assert_allclose(disparity(banks[True]), disparity(banks[False]), atol=0.1)
