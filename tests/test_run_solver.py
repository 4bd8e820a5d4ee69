"""run_solver.py batch mode end to end on tiny folders (64x64 px, 2x2 tiles of 32 px).

One in-process solve compiles the tiny problem once (4 layers, 1 pyramid level, 5
iterations); every bad-input case fails before the solver and costs no compilation.
The multi-process test runs two `python run_solver.py` processes on 127.0.0.1.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import tifffile

import dpjax
from dpjax import batch, io, outputs, pipeline

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import run_solver

SIZE, TILE = 64, 32
TINY = {"num_layers": 4, "pyramid_levels": 1, "num_iters": 5, "preset": "none", "quiet": True}


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


def _opts(inp: Path, out: Path, **kw) -> run_solver.BatchOptions:
    return run_solver.BatchOptions(input_dir=inp, output_dir=out, **{**TINY, **kw})


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
                      np.full((SIZE, SIZE), 100, np.uint8))

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
    assert sorted(recs) == ["a", "b"]
    assert recs["a"]["status"] == recs["b"]["status"] == "done"
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

    monkeypatch.setattr(run_solver.dpjax, "fit_batch", fit_batch)
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


def test_unknown_scene_and_paper_preset_fail_clearly(tmp_path, calib_dir):
    inp, out = tmp_path / "in", tmp_path / "out"
    _write_tiff_pair(inp, "a", _texture(0))
    code = run_solver.run_batch(_opts(inp, out, calib_dir=calib_dir, preset="paper",
                                      scenes=("a", "nope")))
    assert code == 1
    recs = _by_scene(_summary(out))
    assert recs["nope"]["error"] == "input" and "not found" in recs["nope"]["reason"]
    if run_solver.load_presets() is not None:
        assert recs["a"]["error"] == "config" and "paper" in recs["a"]["reason"]


def test_no_pairs_or_bad_calibration_cannot_start(tmp_path):
    (tmp_path / "empty").mkdir()
    assert run_solver.run_batch(_opts(tmp_path / "empty", tmp_path / "out")) == 2
    _write_tiff_pair(tmp_path / "in", "a", _texture(0))
    (tmp_path / "cal").mkdir()
    assert run_solver.run_batch(_opts(tmp_path / "in", tmp_path / "out",
                                      calib_dir=tmp_path / "cal")) == 2


def test_missing_presets_module_falls_back(monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "dpjax.presets", None)
    monkeypatch.delattr(dpjax, "presets", raising=False)
    assert run_solver.load_presets() is None
    assert "dpjax.presets is not available" in caplog.text
    base = run_solver.base_config(_opts(Path("."), Path(".")))
    ctx = types.SimpleNamespace(opts=types.SimpleNamespace(preset="auto"), presets=None,
                                base=base)
    cfg, info = run_solver.scene_config(ctx, "a", None, None)
    assert cfg == base and "unavailable" in info["note"]


@pytest.mark.parametrize("probe", [False, True])
def test_auto_preset_records_its_range_estimate(probe):
    bank = dpjax.parametric_bank(rows=2, cols=2, tile_h=32, tile_w=40, radius=6.0)
    scene = dpjax.make_scene(np.random.default_rng(0), bank, num_layers=2,
                             scale_range=(0.3, 1.2))
    base = run_solver.base_config(_opts(Path("."), Path("."), num_iters=20))
    ctx = types.SimpleNamespace(opts=types.SimpleNamespace(preset="auto", range_probe=probe),
                                presets=run_solver.load_presets(), base=base)
    cfg, info = run_solver.scene_config(ctx, "a", scene.views, bank)
    est = info["range_estimate"]
    assert info["scale_range"] == [est["s_min"], est["s_max"]]
    assert [cfg.mpi.scale_min, cfg.mpi.scale_max] == info["scale_range"]
    assert (est["probe_range"] is not None) == probe
    assert est["probe_iters"] == (dpjax.presets.PROBE_ITERS if probe else 0)
    json.dumps(info)


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
    assert si["weight"] == pipeline.INIT_WEIGHT and si["seconds"] >= si["search_s"] > 0
    assert "range_estimate" in result["preset"]
    # The auto preset also reads the map with the sharpened estimator.
    assert result["config"]["post"]["defocus"] == "sharpened"
    assert _summary(out)["defocus_estimator"] == "sharpened"
    # The batched solve takes each scene's start too.
    _write_tiff_pair(inp, "b", _texture(1))
    starts = []
    fit_batch = dpjax.fit_batch

    def batch_spy(*args, inits=None, **kw):
        starts.append(inits)
        return fit_batch(*args, inits=inits, **kw)

    monkeypatch.setattr(run_solver.dpjax, "fit_batch", batch_spy)
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
        assert run_solver.run_batch(dataclasses.replace(opts, output_dir=out4, **over)) == 0
        assert len(seen) == 2 and seen == [None, None]
        result = json.loads((out4 / "a" / "result.json").read_text())
        assert "search_init" not in result
        # The estimator follows the preset: the paper's mean with `none`.
        want = "sharpened" if over.get("preset", "auto") == "auto" else "mean"
        assert result["config"]["post"]["defocus"] == want
    # Not with DPANet (no layers to start): refused before any work.
    out3 = tmp_path / "out3"
    assert run_solver.run_batch(dataclasses.replace(opts, output_dir=out3, method="dpanet",
                                                    search_init=True)) == 2
    assert not out3.exists()


def test_detect_cluster():
    assert run_solver.detect_cluster({}) is None
    assert run_solver.detect_cluster({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1"}) is None
    assert run_solver.detect_cluster({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4"}) == "slurm"
    assert run_solver.detect_cluster({"JAX_COORDINATOR_ADDRESS": "h:1"}) is not None
    assert run_solver.detect_cluster({"TPU_WORKER_HOSTNAMES": "a,b"}) == "cloud-tpu"


def test_cli_batch_flags_need_input_dir(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "run_solver.py"), "--calib_dir=x"],
                          check=False, capture_output=True, text=True, timeout=120,
                          cwd=tmp_path)
    assert proc.returncode != 0 and "--calib_dir need(s) --input_dir" in proc.stderr


def test_cli_bad_compilation_cache_dir_is_a_usage_error(tmp_path):
    (tmp_path / "taken").write_text("not a folder")
    proc = subprocess.run([sys.executable, str(ROOT / "run_solver.py"),
                           "--compilation_cache_dir=taken"],
                          check=False, capture_output=True, text=True, timeout=120,
                          cwd=tmp_path)
    assert proc.returncode != 0 and "--compilation_cache_dir" in proc.stderr
    assert "is not a folder" in proc.stderr
    assert not (tmp_path / "dpjax_out").exists()  # refused before anything ran


def test_base_config_schedules():
    opts = _opts(Path("."), Path("."), pyramid_levels=3, num_iters=None)
    assert run_solver.base_config(opts).solver.level_iters == dpjax.config.FAST_LEVEL_ITERS
    opts = _opts(Path("."), Path("."), pyramid_levels=3, num_iters=30)
    assert run_solver.base_config(opts).solver.level_iters == dpjax.config.FAST_LEVEL_ITERS[:-1] + (30,)
    cfg = run_solver.base_config(_opts(Path("."), Path(".")))
    assert cfg.solver.pyramid_levels == 1 and cfg.solver.num_iters == 5
    assert cfg.mpi.num_layers == 4
    assert cfg.post.defocus == dpjax.PostConfig().defocus  # --defocus_estimator unset
    for estimator in ("mean", "sharpened"):
        opts = _opts(Path("."), Path("."), defocus_estimator=estimator)
        assert run_solver.base_config(opts).post.defocus == estimator


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_cover_each_scene_once(tmp_path):
    inp, out = tmp_path / "in", tmp_path / "out"
    for i in range(4):
        _write_tiff_pair(inp, f"s{i}", _texture(i))
    port = _free_port()
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
           "JAX_PLATFORMS": "cpu"}
    args = [sys.executable, str(ROOT / "run_solver.py"), f"--input_dir={inp}",
            f"--output_dir={out}", "--grid=2x2", "--kernel_radius=3", "--kernel_smooth=0.5",
            "--num_layers=4", "--pyramid_levels=1", "--num_iters=5", "--preset=none",
            "--quiet", f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
            "--distributed_timeout_s=120"]
    procs = [subprocess.Popen(args + [f"--process_id={k}"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
             for k in range(2)]
    results = []
    try:
        for p in procs:
            results.append(p.communicate(timeout=400))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    for p, (stdout, stderr) in zip(procs, results):
        assert p.returncode == 0, stderr[-3000:]
    # Both processes print the same merged summary line.
    finals = [stdout.strip().splitlines()[-1] for stdout, _ in results]
    assert finals[0] == finals[1] and "4 scenes: 4 done" in finals[0]

    summary = _summary(out)
    assert summary["process_count"] == 2 and summary["counts"]["done"] == 4
    assert [r["scene"] for r in summary["scenes"]] == ["s0", "s1", "s2", "s3"]
    shares = [json.loads((out / f"summary.process-{k}-of-2.json").read_text())
              for k in range(2)]
    names = [sorted(r["scene"] for r in s["scenes"]) for s in shares]
    assert names == [["s0", "s2"], ["s1", "s3"]]  # disjoint, deterministic, complete
    for k, share in enumerate(shares):
        for rec in share["scenes"]:
            assert _by_scene(summary)[rec["scene"]]["status"] == rec["status"] == "done"
            assert rec["process"] == k
        # Each process spread its two scenes over its two local devices.
        assert len({r["device"] for r in share["scenes"]}) == 2
    for i in range(4):
        assert outputs.is_complete(out / f"s{i}")
