"""The batch runner (dpjax.runner, through run_solver.run_batch's display) end to end on
tiny folders (64x64 px, 2x2 tiles of 32 px).

One in-process solve compiles the tiny problem once (4 layers, 1 pyramid level, 5
iterations); every bad-input case fails before the solver and costs no compilation.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile

import dpjax
from dpjax import batch, io, outputs, pipeline, presets, runner, scene
from dpjax.config import Config, schedule
from dpjax.scene import PRIOR_INPUT, KernelOptions, SceneOptions

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import run_solver

SIZE, TILE = 64, 32
# No refinement: these tests are about the runner, and the refinement's compilation
# would be much of each solve's time (test_ray_runner.py's rerun passes the same flag).
TINY = {"num_layers": 4, "pyramid_levels": 1, "num_iters": 5, "preset": "none",
        "refine_iters": 0, "quiet": True}
# What run_solver.py with TINY's flags fits linear input with (no --optimizer given);
# `_opts` keeps base's solver unless given it.
TINY_LINEAR_SOLVER = presets.linear_input_solver(
    **{k: v for k, v in TINY.items() if k != "quiet"})


def _texture(seed: int, h: int = SIZE, w: int = SIZE) -> np.ndarray:
    """[2, h, w] views in (0, 1]: a smooth random texture, the right view shifted."""
    rng = np.random.default_rng(seed)
    base = rng.uniform(0.1, 1.0, (h // 8 + 2, w // 8 + 2))
    big = np.kron(base, np.ones((8, 8)))[: h + 1, : w + 1]
    return np.stack([big[:h, :w], big[:h, 1:w + 1]]) * 0.9 + 0.05


def _write_tiff_pair(folder: Path, name: str, views, dtype=np.uint16, scale=60000.0):
    folder.mkdir(parents=True, exist_ok=True)
    for side, v in zip(("left", "right"), views):
        data = v if dtype == np.float32 else (np.asarray(v) * scale).astype(dtype)
        tifffile.imwrite(folder / f"{name}_{side}.tif", np.asarray(data, dtype))


def _tiny_kernels() -> np.ndarray:
    pair = dpjax.parametric_dp_kernels(radius=3.0, ramp=0.5, smooth_sigma=0.5)
    return np.repeat(pair[:, None], 4, axis=1)  # [2, 4, K, K]


@pytest.fixture(scope="module")
def calib_dir(tmp_path_factory) -> Path:
    """2x2 tiles of 32 px and white sheets for 72x72 Pixel-style frames."""
    d = tmp_path_factory.mktemp("calib")
    io.save_calibration_kernels(d, io.CalibratedKernels(_tiny_kernels(), (2, 2), TILE))
    white = np.full((72, 72), 9000, np.uint16)
    outputs.write_png(d / io.WHITE_LEFT, white)
    outputs.write_png(d / io.WHITE_RIGHT, white)
    return d


def _opts(inp: Path, out: Path, **kw) -> runner.RunOptions:
    """RunOptions from flag-like keywords (TINY's unless given)."""
    kw = {**TINY, **kw}
    kw.pop("quiet")
    preset, method = kw.pop("preset"), kw.get("method", "mpi")
    search_init = kw.pop("search_init", None)
    if method == "dpanet" and not search_init:
        search_init = False
    cfg = Config(solver=schedule(pyramid_levels=kw.pop("pyramid_levels"),
                                 num_iters=kw.pop("num_iters")))
    cfg = cfg.replace(**{"mpi.num_layers": kw.pop("num_layers"),
                         "refine.iters": kw.pop("refine_iters")})
    base = presets.resolve_base(preset, cfg, search_init=search_init,
                                defocus_estimator_name=kw.pop("defocus_estimator", None))
    calib = kw.pop("calib_dir", None)
    kind = kw.pop("kernels", "calibrated" if calib else "parametric")
    kernels = KernelOptions(kind=kind, calib_dir=calib, grid=kw.pop("grid", None),
                            radius=kw.pop("kernel_radius", 8.0))
    scene = SceneOptions(base=base, preset=preset, input_dir=inp,
                         whole_frame=method == "dpanet", blocks=kw.pop("blocks", None),
                         prior_encoding=kw.pop("prior_encoding", PRIOR_INPUT),
                         linear_solver=kw.pop("linear_solver", None))
    return runner.RunOptions(input_dir=inp, output_dir=out, scene=scene, kernels=kernels, **kw)


def _summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


def _by_scene(summary: dict) -> dict:
    return {r["scene"]: r for r in summary["scenes"]}


def _snapshot(folder: Path) -> dict:
    return {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(folder.iterdir())}


def test_batch_solves_resumes_and_overwrites(tmp_path, calib_dir):
    inp, out = tmp_path / "in", tmp_path / "out"
    _write_tiff_pair(inp, "a", _texture(0))
    _write_tiff_pair(inp, "b", _texture(1))
    # A Pixel pair (16-bit PNG, black level 1024) larger than the kernel grid: it is
    # vignetting-corrected with the white sheets and centre-cropped to 64x64, and
    # scored against ground truth in the Pixel 4 layout.
    raw = (1024 + _texture(2, 72, 72) * 8000).astype(np.uint16)
    outputs.write_png(inp / "001_left.png", raw[0])
    outputs.write_png(inp / "001_right.png", raw[1])
    (inp / "gt_all_in_focus_im").mkdir()
    (inp / "gt_defocus_map").mkdir()
    outputs.write_png(inp / "gt_all_in_focus_im" / "001_gt.png", raw[0, 4:68, 4:68])
    outputs.write_png(inp / "gt_defocus_map" / "001_gt.png",
                      np.tile(np.linspace(50, 200, SIZE).astype(np.uint8), (SIZE, 1)))

    assert run_solver.run_batch(_opts(inp, out, calib_dir=calib_dir)) == 0
    summary = _summary(out)
    assert summary["counts"] == {"done": 3, "skipped": 0, "failed": 0}
    assert summary["exit_status"] == 0 and summary["state"] == "complete"
    recs = _by_scene(summary)
    for name in ("a", "b", "001"):
        assert outputs.is_complete(out / name), name
        assert recs[name]["timings"]["solve_s"] > 0
        assert recs[name]["iterations"] == [5]
        for thumb in batch.THUMBS.values():
            assert (out / name / thumb).is_file()
    assert recs["001"]["shape"] == [2, SIZE, SIZE, 1]
    assert {"psnr", "ssim", "aiwe1"} <= set(recs["001"]["metrics"])
    result = json.loads((out / "001" / "result.json").read_text())
    assert result["preprocessing"]["vignetting"] is True
    assert result["kernels"]["model"] == "calibrated"
    page = (out / "index.html").read_text()
    for name in ("a", "b", "001"):
        for thumb in batch.THUMBS.values():
            assert f'src="{name}/{thumb}"' in page

    # Resume: complete scenes are skipped and left untouched; an incomplete one is redone.
    before = _snapshot(out / "a")
    (out / "b" / "defocus_map.tif").unlink()
    assert run_solver.run_batch(_opts(inp, out, calib_dir=calib_dir)) == 0
    recs = _by_scene(_summary(out))
    assert recs["a"]["status"] == "skipped" and recs["001"]["status"] == "skipped"
    assert "metrics" in recs["001"]  # carried over from result.json
    assert recs["b"]["status"] == "done"
    assert outputs.is_complete(out / "b")
    assert _snapshot(out / "a") == before

    # --overwrite redoes complete scenes; --scenes restricts the run; --batch_size
    # groups the two same-size TIFF scenes.
    assert run_solver.run_batch(_opts(inp, out, calib_dir=calib_dir, overwrite=True,
                                      scenes=("a", "b"), batch_size=2)) == 0
    summary = _summary(out)
    recs = _by_scene(summary)
    assert sorted(recs) == ["001", "a", "b"]  # every scene in the folder stays listed
    assert recs["a"]["status"] == recs["b"]["status"] == "done"
    assert recs["001"]["status"] == "kept" and "metrics" in recs["001"]
    assert recs["a"]["group"] == recs["b"]["group"]
    after = _snapshot(out / "a")
    assert after["result.json"][0] != before["result.json"][0]


def _case_missing_partner(inp):
    _write_tiff_pair(inp, "x", _texture(0))
    (inp / "x_right.tif").unlink()
    return "missing partner view"


def _case_mismatched_sizes(inp):
    _write_tiff_pair(inp, "x", _texture(0))
    tifffile.imwrite(inp / "x_right.tif", np.ones((SIZE, SIZE + 8), np.uint16))
    return "views differ in shape"


def _case_truncated(inp):
    raw = (1024 + _texture(0, 72, 72) * 8000).astype(np.uint16)
    data = outputs.encode_png(raw[0])
    (inp / "x_left.png").write_bytes(data[: len(data) // 2])
    outputs.write_png(inp / "x_right.png", raw[1])
    return "truncated"


def _case_unreadable(inp):
    _write_tiff_pair(inp, "x", _texture(0))
    (inp / "x_left.tif").write_bytes(b"II*\x00 this is not a tiff")
    return "unreadable or truncated TIFF"


def _case_eight_bit(inp):
    # Pixel raw views (greyscale NAME_left.png) exported at 8 bits: still refused. (An
    # 8-bit TIFF or colour PNG is read as sRGB by the "auto" encoding and loads.)
    raw = (_texture(0) * 250).astype(np.uint8)
    outputs.write_png(inp / "x_left.png", raw[0])
    outputs.write_png(inp / "x_right.png", raw[1])
    return "8-bit data where 16-bit is expected"


def _case_nan(inp):
    v = _texture(0).astype(np.float32)
    v[0, 5, 7] = np.nan
    _write_tiff_pair(inp, "x", v, dtype=np.float32)
    return "NaN or Inf"


def _case_smaller_than_grid(inp):
    _write_tiff_pair(inp, "x", _texture(0, 48, 48))
    return "smaller than the kernel grid"


def _case_calibration_mismatch(inp):
    _write_tiff_pair(inp, "x", _texture(0, 96, 96))
    return "calibration covers 64x64 px"


BAD_CASES = {  # case -> (writer, failure kind)
    "missing_partner": (_case_missing_partner, "input"),
    "mismatched_sizes": (_case_mismatched_sizes, "input"),
    "truncated": (_case_truncated, "input"),
    "unreadable": (_case_unreadable, "input"),
    "eight_bit": (_case_eight_bit, "input"),
    "nan_values": (_case_nan, "input"),
    "smaller_than_grid": (_case_smaller_than_grid, "input"),
    "calibration_mismatch": (_case_calibration_mismatch, "calibration"),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_input_fails_one_scene_and_keeps_good_outputs(case, tmp_path, calib_dir, caplog):
    inp, out = tmp_path / "in", tmp_path / "out"
    inp.mkdir()
    writer, kind = BAD_CASES[case]
    expected = writer(inp)
    # A previous good result for the same scene must survive a failed --overwrite run.
    outputs.write_result(out / "x", all_in_focus=np.ones((4, 4, 1)), defocus=np.zeros((4, 4)),
                         result={"scene": "x"})
    before = _snapshot(out / "x")
    code = run_solver.run_batch(_opts(inp, out, calib_dir=calib_dir, overwrite=True,
                                      quiet=False))
    assert code == 1
    (rec,) = _summary(out)["scenes"]
    assert rec["scene"] == "x" and rec["status"] == "failed" and rec["error"] == kind
    assert expected in rec["reason"], rec["reason"]
    assert _snapshot(out / "x") == before
    lines = [r.getMessage() for r in caplog.records if "FAILED" in r.getMessage()]
    assert len(lines) == 1 and expected in lines[0]


def test_batch_size_solves_same_size_scenes_together(tmp_path, calib_dir):
    inp, out = tmp_path / "in", tmp_path / "out"
    _write_tiff_pair(inp, "a", _texture(0))
    _write_tiff_pair(inp, "b", _texture(1))
    _case_nan(inp)  # "x": same size, so probed into the group of a and b; fails to load
    code = run_solver.run_batch(_opts(inp, out, calib_dir=calib_dir, batch_size=3))
    assert code == 1
    recs = _by_scene(_summary(out))
    assert recs["x"]["status"] == "failed" and recs["x"]["error"] == "input"
    assert "NaN or Inf" in recs["x"]["reason"]
    assert not (out / "x").exists()
    assert recs["a"]["group"] == recs["b"]["group"] == recs["x"]["group"]
    for i, name in enumerate(("a", "b")):
        rec = recs[name]
        assert rec["status"] == "done" and rec["iterations"] == [5], rec
        assert rec["batch"] == {"size": 2, "index": i, "scenes": ["a", "b"]}
        assert rec["timings"]["solve_s"] > 0 and rec["timings"]["batch_solve_s"] > 0
        assert outputs.is_complete(out / name)
        for thumb in batch.THUMBS.values():
            assert (out / name / thumb).is_file()
        result = json.loads((out / name / "result.json").read_text())
        assert result["batch"] == rec["batch"]
        assert result["scene"] == name and result["iterations"] == [5]
        assert {"config", "loss_terms", "final_loss", "preprocessing", "kernels",
                "timings", "device"} <= set(result)
        assert tifffile.imread(out / name / outputs.DEFOCUS_TIFF).shape == (SIZE, SIZE)


def test_batch_that_diverges_is_solved_scene_by_scene(tmp_path, calib_dir, monkeypatch,
                                                      caplog):
    inp, out = tmp_path / "in", tmp_path / "out"
    _write_tiff_pair(inp, "a", _texture(0))
    _write_tiff_pair(inp, "b", _texture(1))
    run_solver._load_dpjax()  # its modules are imported lazily, on the first run
    real_fit = run_solver.pipeline.fit
    diverging = {}

    def fit_batch(views, banks, configs, callback=None, inits=None):
        diverging["views"] = views[1]
        raise dpjax.solver.BatchFloatingPointError("scene 1 of the batch diverged", (1,))

    def fit(views, *args, **kwargs):  # scene b also diverges alone
        if views is diverging["views"]:
            raise FloatingPointError("non-finite loss or gradient at iteration 3")
        return real_fit(views, *args, **kwargs)

    monkeypatch.setattr(dpjax.solver, "fit_batch", fit_batch)
    monkeypatch.setattr(run_solver.pipeline, "fit", fit)
    code = run_solver.run_batch(_opts(inp, out, calib_dir=calib_dir, batch_size=2,
                                      quiet=False))
    assert code == 1
    recs = _by_scene(_summary(out))
    assert recs["a"]["status"] == "done" and "batch" not in recs["a"]
    assert recs["b"]["status"] == "failed" and recs["b"]["error"] == "solver diverged"
    assert outputs.is_complete(out / "a") and not (out / "b").exists()
    result = json.loads((out / "a" / "result.json").read_text())
    assert "scene 1 of the batch diverged" in result["batch_fallback"]
    assert any("solving its scenes one by one" in r.getMessage() for r in caplog.records)


def test_parametric_model_image_smaller_than_grid(tmp_path):
    inp, out = tmp_path / "in", tmp_path / "out"
    _write_tiff_pair(inp, "tiny", _texture(0, 16, 16))
    code = run_solver.run_batch(_opts(inp, out, grid=(2, 2), kernel_radius=3.0))
    assert code == 1
    (rec,) = _summary(out)["scenes"]
    assert rec["status"] == "failed" and "smaller than the kernel grid" in rec["reason"]


def test_memory_budget_refuses_scene(tmp_path, calib_dir):
    inp, out = tmp_path / "in", tmp_path / "out"
    _write_tiff_pair(inp, "a", _texture(0))
    code = run_solver.run_batch(_opts(inp, out, calib_dir=calib_dir, memory_budget_gb=0.01))
    assert code == 1
    (rec,) = _summary(out)["scenes"]
    assert rec["error"] == "memory" and "over the memory budget of 0.01 GB" in rec["reason"]
    assert rec["memory_estimate_gb"] > 0.01
    assert not (out / "a").exists()


def test_heap_is_trimmed_after_every_scene(tmp_path, calib_dir, monkeypatch):
    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        assert runner.release_host_memory()
    calls = []
    monkeypatch.setattr(runner, "release_host_memory", lambda: calls.append(1) or True)
    inp, out = tmp_path / "in", tmp_path / "out"
    for name in ("a", "b"):
        _write_tiff_pair(inp, name, _texture(0))
    run_solver.run_batch(_opts(inp, out, calib_dir=calib_dir, memory_budget_gb=0.01))
    assert len(calls) == 2


def test_blocks_forced_or_by_memory_budget(tmp_path):
    """A 32x192 frame of 1x6 tiles: split by --blocks, then by the memory budget; a
    budget change re-solves a scene whose split it set."""
    inp = tmp_path / "in"
    _write_tiff_pair(inp, "wide", _texture(0, 32, 192))
    kw = {"grid": (1, 6), "kernel_radius": 3.0}

    def result(out):
        return json.loads((out / "wide" / "result.json").read_text())

    out = tmp_path / "forced"
    assert run_solver.run_batch(_opts(inp, out, blocks=(1, 2), **kw)) == 0
    res = result(out)
    assert res["block_plan"]["chosen"] == "forced" and res["block_plan"]["splits"] == [1, 2]
    assert res["block_plan"]["block_tiles"] == [1, 5] and len(res["blocks"]) == 2
    assert res["fingerprint"]["blocks"] == [1, 2]
    aif = tifffile.imread(out / "wide" / outputs.AIF_TIFF)
    assert aif.shape[:2] == (32, 192) and np.all(np.isfinite(aif))
    # the same folder without --blocks: different settings, solved again at once
    assert run_solver.run_batch(_opts(inp, out, **kw)) == 0
    assert _summary(out)["scenes"][0]["status"] == "done"
    assert "block_plan" not in result(out) and "blocks" not in result(out)

    # a budget between the whole frame's estimate and a 1x2 split's block (1x5 tiles)
    opts = _opts(inp, tmp_path / "budget", **kw)
    src = scene.kernel_source(opts.kernels, 1)
    bank = dpjax.KernelBank.create(np.repeat(src.kernels, 6, axis=1), rows=1, cols=6,
                                   tile_h=TILE)

    cfg = opts.scene.base

    def need(cols):  # as dpjax.scene.plan_solve estimates a solve
        grid = dpjax.TileGrid(rows=1, cols=cols, tile_h=TILE, tile_w=TILE)
        return scene.solve_memory(1, bank, cfg, grid).total

    budget_gb = (need(6) + need(5)) / 2 / 1e9
    out = tmp_path / "budget"
    assert run_solver.run_batch(_opts(inp, out, memory_budget_gb=budget_gb, **kw)) == 0
    plan = result(out)["block_plan"]
    assert plan["chosen"] == "memory budget" and plan["num_blocks"] > 1
    assert plan["budget_gb"] == round(budget_gb, 3)
    assert run_solver.run_batch(_opts(inp, out, memory_budget_gb=budget_gb, **kw)) == 0
    assert _summary(out)["scenes"][0]["status"] == "skipped"
    assert run_solver.run_batch(_opts(inp, out, memory_budget_gb=2 * budget_gb, **kw)) == 0
    (rec,) = _summary(out)["scenes"]
    assert rec["status"] == "done" and "memory budget changed" in rec["resolved_because"]
    assert "block_plan" not in result(out)


def test_unknown_scene_and_paper_preset_fail_clearly(tmp_path, calib_dir):
    inp, out = tmp_path / "in", tmp_path / "out"
    _write_tiff_pair(inp, "a", _texture(0))
    code = run_solver.run_batch(_opts(inp, out, calib_dir=calib_dir, preset="paper",
                                      scenes=("a", "nope")))
    assert code == 1
    recs = _by_scene(_summary(out))
    assert recs["nope"]["error"] == "input" and "not found" in recs["nope"]["reason"]
    assert recs["a"]["error"] == "config" and "paper" in recs["a"]["reason"]


def test_no_pairs_or_bad_calibration_cannot_start(tmp_path):
    (tmp_path / "empty").mkdir()
    assert run_solver.run_batch(_opts(tmp_path / "empty", tmp_path / "out")) == 2
    _write_tiff_pair(tmp_path / "in", "a", _texture(0))
    (tmp_path / "cal").mkdir()
    assert run_solver.run_batch(_opts(tmp_path / "in", tmp_path / "out",
                                      calib_dir=tmp_path / "cal")) == 2


def test_search_init_reaches_the_solve_and_result(tmp_path, calib_dir, monkeypatch):
    inp, out = tmp_path / "in", tmp_path / "out"
    _write_tiff_pair(inp, "a", _texture(0))
    seen = []
    solve = pipeline.solve_scene

    def spy(*args, init=None, **kw):
        seen.append(init)
        return solve(*args, init=init, **kw)

    monkeypatch.setattr(pipeline, "solve_scene", spy)  # the module run_solver calls
    opts = _opts(inp, out, calib_dir=calib_dir, preset="auto")  # on by default with auto
    assert run_solver.run_batch(opts) == 0
    assert _summary(out)["search_init"] is True
    assert len(seen) == 1 and seen[0] is not None
    assert seen[0].alpha_logits.shape == (3, SIZE, SIZE)  # 4 layers, one level
    trans = np.asarray(dpjax.mpi.transmittance(dpjax.mpi.alphas(seen[0])))
    assert trans.std(axis=0).max() > 0.01  # not the uniform 1/L start
    result = json.loads((out / "a" / "result.json").read_text())
    si = result["search_init"]
    assert si["weight"] == Config().init.weight and si["seconds"] >= si["search_s"] > 0
    assert "range_estimate" in result["preset"]
    # The auto preset also reads the map with the sharpened estimator.
    assert result["config"]["post"]["defocus"] == "sharpened"
    assert _summary(out)["defocus_estimator"] == "sharpened"
    assert _summary(out)["defocus_fill"] is True
    # The batched solve takes each scene's start too.
    _write_tiff_pair(inp, "b", _texture(1))
    starts = []
    fit_batch = dpjax.fit_batch

    def batch_spy(*args, inits=None, **kw):
        starts.append(inits)
        return fit_batch(*args, inits=inits, **kw)

    monkeypatch.setattr(dpjax.solver, "fit_batch", batch_spy)
    out2 = tmp_path / "out2"
    assert run_solver.run_batch(dataclasses.replace(opts, output_dir=out2, batch_size=2)) == 0
    (inits,) = starts
    assert len(inits) == 2 and all(i is not None for i in inits)
    np.testing.assert_array_equal(inits[0].alpha_logits, seen[0].alpha_logits)
    for name in ("a", "b"):
        result = json.loads((out2 / name / "result.json").read_text())
        assert result["batch"]["size"] == 2 and "search_init" in result
    # --nosearch_init, or another preset, keeps the paper's uniform start.
    for i, over in enumerate(({"search_init": False}, {"preset": "none"})):
        seen.clear()
        out4 = tmp_path / f"uniform{i}"
        assert run_solver.run_batch(_opts(inp, out4, calib_dir=calib_dir,
                                          **{"preset": "auto", **over})) == 0
        assert len(seen) == 2 and seen == [None, None]
        result = json.loads((out4 / "a" / "result.json").read_text())
        assert "search_init" not in result
        # The estimator follows the preset: the paper's mean with `none`.
        want = "sharpened" if over.get("preset", "auto") == "auto" else "mean"
        assert result["config"]["post"]["defocus"] == want
    # Not with DPANet (no layers to start): refused before any work.
    out3 = tmp_path / "out3"
    assert run_solver.run_batch(_opts(inp, out3, calib_dir=calib_dir, preset="auto",
                                      method="dpanet", search_init=True)) == 2
    assert not out3.exists()




# ----------------------------------------------------------------------------------------
# Safe re-runs


def test_rerun_with_other_settings_resolves_and_says_why(tmp_path, calib_dir, caplog):
    inp, out = tmp_path / "in", tmp_path / "out"
    _write_tiff_pair(inp, "a", _texture(0))
    _write_tiff_pair(inp, "b", _texture(1))
    assert run_solver.run_batch(_opts(inp, out, calib_dir=calib_dir)) == 0
    first = json.loads((out / "a" / "result.json").read_text())
    assert first["fingerprint"]["config"]["mpi"]["num_layers"] == 4
    # Same settings: skipped, untouched.
    before = _snapshot(out / "a")
    assert run_solver.run_batch(_opts(inp, out, calib_dir=calib_dir)) == 0
    assert {r["status"] for r in _summary(out)["scenes"]} == {"skipped"}
    assert _snapshot(out / "a") == before
    # Other settings on a subset: that scene is solved again and the log says why; the
    # other scene stays in summary.json and the gallery.
    code = run_solver.run_batch(_opts(inp, out, calib_dir=calib_dir, num_layers=5,
                                      scenes=("a",), quiet=False))
    assert code == 0
    assert any("settings changed: mpi.num_layers 4 -> 5" in r.getMessage()
               for r in caplog.records)
    recs = _by_scene(_summary(out))
    assert recs["a"]["status"] == "done"
    assert recs["a"]["resolved_because"].startswith("settings changed: mpi.num_layers 4 -> 5")
    assert recs["b"]["status"] == "kept"
    assert json.loads((out / "a" / "result.json").read_text())["config"]["mpi"][
        "num_layers"] == 5
    page = (out / "index.html").read_text()
    assert 'src="b/thumb_input.png"' in page and 'src="a/thumb_input.png"' in page
    # Changed input files count as changed settings too.
    _write_tiff_pair(inp, "b", _texture(7))
    caplog.clear()
    assert run_solver.run_batch(_opts(inp, out, calib_dir=calib_dir, quiet=False)) == 0
    recs = _by_scene(_summary(out))
    assert recs["b"]["status"] == "done" and "input files changed" in recs["b"][
        "resolved_because"]
    assert recs["a"]["status"] == "done"  # num_layers back to 4: solved again as well


def test_image_priors_and_optimizer_follow_each_inputs_encoding(tmp_path):
    """By default the fit's image prior sees each scene through its file's encoding
    (16-bit TIFF linear, 8-bit TIFF sRGB: result.json's config says which), and the
    linear scene is fitted with `linear_solver`; asking for another curve re-solves the
    scenes and says why."""
    inp, out = tmp_path / "in", tmp_path / "out"
    _write_tiff_pair(inp, "deep", _texture(0))
    _write_tiff_pair(inp, "eight", _texture(1), dtype=np.uint8, scale=250.0)
    lbfgs = schedule(pyramid_levels=TINY["pyramid_levels"], num_iters=TINY["num_iters"],
                     optimizer="lbfgs")
    kw = {"grid": (2, 2), "kernel_radius": 3.0, "linear_solver": lbfgs}
    assert run_solver.run_batch(_opts(inp, out, **kw)) == 0

    def used(name):
        result = json.loads((out / name / "result.json").read_text())
        return (result["config"]["loss"]["prior_encoding"],
                result["preprocessing"]["input"]["encoding"],
                result["config"]["solver"]["optimizer"])

    assert used("deep") == ("linear", "linear", "lbfgs")
    assert used("eight") == ("srgb", "srgb", "adam")
    assert _summary(out)["linear_input_solver"]["optimizer"] == "lbfgs"
    assert run_solver.run_batch(_opts(inp, out, prior_encoding="gamma:2.2", quiet=False,
                                      **kw)) == 0
    recs = _by_scene(_summary(out))
    assert all(r["status"] == "done" for r in recs.values())
    assert "prior_encoding input -> gamma:2.2" in recs["eight"]["resolved_because"]
    assert used("deep") == ("gamma:2.2", "linear", "lbfgs")
    assert used("eight") == ("gamma:2.2", "srgb", "adam")
    # Without a linear solver the linear scene is fitted with base's Adam: solved
    # again, the reason named; the sRGB scene, fitted with Adam either way, is kept.
    kw.pop("linear_solver")
    eight_before = (out / "eight" / "result.json").read_bytes()
    assert run_solver.run_batch(_opts(inp, out, prior_encoding="gamma:2.2", quiet=False,
                                      **kw)) == 0
    recs = _by_scene(_summary(out))
    assert "linear_solver" in recs["deep"]["resolved_because"]
    assert recs["eight"]["status"] == "skipped"
    assert (out / "eight" / "result.json").read_bytes() == eight_before
    assert used("deep") == ("gamma:2.2", "linear", "adam")
    with pytest.raises(ValueError, match="prior_encoding: unknown encoding 'log'"):
        SceneOptions(base=Config(), prior_encoding="log")
    with pytest.raises(ValueError, match="^encoding: unknown encoding 'log'"):
        SceneOptions(base=Config(), encoding="log")


def test_fingerprint_changes_names_the_difference():
    old = {"digest": "1", "config": {"mpi": {"num_layers": 4}}, "preset": "auto", "code": "x"}
    new = {"digest": "2", "config": {"mpi": {"num_layers": 6}}, "preset": "paper", "code": "y"}
    why = runner.fingerprint_changes(old, new)
    assert "mpi.num_layers 4 -> 6" in why and "preset auto -> paper" in why
    assert "solver code changed" in why
    assert runner.fingerprint_changes({**new}, new) is None
    assert "older dpjax" in runner.fingerprint_changes(None, new)


def test_output_folder_problems_stop_before_any_solve(tmp_path, calib_dir, monkeypatch):
    inp = tmp_path / "in"
    _write_tiff_pair(inp, "a", _texture(0))
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert run_solver.run_batch(_opts(inp, afile, calib_dir=calib_dir)) == 2
    assert run_solver.run_batch(_opts(inp, afile / "sub", calib_dir=calib_dir)) == 2
    assert afile.read_text() == "x"
    with pytest.raises(runner.SetupError, match="is not a folder"):
        runner.check_output_dir(afile)
    with pytest.raises(runner.SetupError, match="cannot create"):
        runner.check_output_dir(afile / "sub")
    # Not writable (root ignores permission bits: the probe write is made to fail).
    real = Path.write_bytes

    def deny(self, data):
        if self.name.startswith(".dpjax-write-test"):
            raise PermissionError(13, "Permission denied")
        return real(self, data)

    monkeypatch.setattr(Path, "write_bytes", deny)
    out = tmp_path / "ro"
    with pytest.raises(runner.SetupError, match="is not writable: Permission denied"):
        runner.check_output_dir(out)
    assert run_solver.run_batch(_opts(inp, out, calib_dir=calib_dir)) == 2
    assert not (out / "a").exists()


def test_lock_refuses_a_second_run_and_takes_over_a_stale_one(tmp_path, calib_dir, caplog):
    import socket as socket_

    inp, out = tmp_path / "in", tmp_path / "out"
    _write_tiff_pair(inp, "a", _texture(0))
    out.mkdir()
    lock = out / runner.LOCK_FILE
    lock.write_text(json.dumps({"host": socket_.gethostname(), "pid": os.getppid(),
                                "started": "then"}))
    assert run_solver.run_batch(_opts(inp, out, calib_dir=calib_dir, quiet=False)) == 2
    msg = " ".join(r.getMessage() for r in caplog.records)
    assert f"in use by another run (pid {os.getppid()}" in msg and str(lock) in msg
    assert not (out / "a").exists() and lock.is_file()
    # A lock whose process is gone (on this host) is stale: taken over, with a warning.
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    lock.write_text(json.dumps({"host": socket_.gethostname(), "pid": int(dead.stdout),
                                "started": "then"}))
    caplog.clear()
    assert run_solver.run_batch(_opts(inp, out, calib_dir=calib_dir, quiet=False)) == 0
    assert any("stale lock" in r.getMessage() for r in caplog.records)
    assert not lock.exists()  # released at the end


def test_stale_temporary_files_are_removed_on_resume(tmp_path, calib_dir):
    inp, out = tmp_path / "in", tmp_path / "out"
    _write_tiff_pair(inp, "a", _texture(0))
    assert run_solver.run_batch(_opts(inp, out, calib_dir=calib_dir)) == 0
    tmp_file = out / "a" / ".all_in_focus.png.k3j2.tmp"
    tmp_file.write_bytes(b"partial")
    staging = out / ".staging-a-99999-1"
    staging.mkdir()
    (staging / "all_in_focus.tif").write_bytes(b"partial")
    # A swap killed between its two renames: the old result waits as .retired-*.
    os.replace(out / "a", out / ".retired-a-99999")
    assert run_solver.run_batch(_opts(inp, out, calib_dir=calib_dir)) == 0
    assert _by_scene(_summary(out))["a"]["status"] == "skipped"  # the old result, restored
    assert not tmp_file.exists() and not staging.exists()
    assert not any(p.name.startswith(".") for p in out.rglob("*")
                   if p.name != runner.LOCK_FILE)


def test_scene_names_are_safe_and_gallery_links_encoded(tmp_path, calib_dir):
    inp, out = tmp_path / "in", tmp_path / "out"
    _write_tiff_pair(inp, "..", _texture(0))  # hidden files are not scenes
    _write_tiff_pair(inp, "a#1?%", _texture(1))
    _write_tiff_pair(inp / "a#1?%", "inner", _texture(2))  # inside another scene's folder
    _write_tiff_pair(inp, "summary.json", _texture(3))
    code = run_solver.run_batch(_opts(inp, out, calib_dir=calib_dir))
    assert code == 1
    recs = _by_scene(_summary(out))
    assert ".." not in recs
    assert recs["a#1?%"]["status"] == "done" and outputs.is_complete(out / "a#1?%")
    assert recs["a#1?%/inner"]["status"] == "failed"
    assert "inside scene 'a#1?%'" in recs["a#1?%/inner"]["reason"]
    assert recs["summary.json"]["status"] == "failed" and "reserved" in recs[
        "summary.json"]["reason"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "out"]  # nothing outside
    with pytest.raises(io.InputError, match="reserved"):
        runner.scene_dir(out, "index.html")
    page = (out / "index.html").read_text()
    assert 'src="a%231%3F%25/thumb_input.png"' in page
    for bad in ("../x", "a/../b", ".hidden", "a\\b", "", "a\x00b"):
        with pytest.raises(io.InputError):
            io.check_scene_name(bad)
    assert io.check_scene_name("casual/orbbec/001") == "casual/orbbec/001"


def test_flat_pair_is_solved_with_a_warning(tmp_path, calib_dir):
    inp, out = tmp_path / "in", tmp_path / "out"
    _write_tiff_pair(inp, "grey", np.full((2, SIZE, SIZE), 0.5))
    assert run_solver.run_batch(_opts(inp, out, calib_dir=calib_dir)) == 0
    rec = _by_scene(_summary(out))["grey"]
    assert any("flat" in w for w in rec["warnings"])
    result = json.loads((out / "grey" / "result.json").read_text())
    assert any("flat" in w for w in result["preprocessing"]["warnings"])
