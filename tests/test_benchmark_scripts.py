"""The benchmark scripts run end to end on a tiny problem and write what BENCHMARKS.md reads.

They are not timed here (timings are their job, on an idle machine); this catches a
script that no longer runs against today's library, as experiments/refine_visual.py
once did unnoticed.
"""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dpjax import presets

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--rows=2", "--cols=2", "--tile=32", "--kernel_size=9", "--num_layers=4",
        "--scale_min=0.2", "--scale_max=1.2"]


def _run(script: str, args: list[str], tmp_path: Path) -> dict:
    out = tmp_path / f"{script}.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / f"{script}.py"), *args,
                           f"--output={out}"], capture_output=True, text=True, cwd=ROOT,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


def test_bench_step(tmp_path):
    res = _run("bench_step", [*TINY, "--repeats=1", "--methods=fft,direct", "--scan_steps=2"],
               tmp_path)
    assert res["problem"]["height"] == res["problem"]["width"] == 64
    for method in ("fft", "direct"):
        assert res[method]["ms_per_step"] > 0 and len(res[method]["ms_all"]) == 1
        assert res[method]["ms_per_step_in_scan"] > 0
    assert res["direct_over_fft"] > 0 and res["peak_rss_gib"] > 0


def test_bench_step_on_calibrated_kernels_with_the_cut(tmp_path):
    """--calib_dir: the calibration's kernels (their own side); the mass cut sizes the
    layer kernels, 0 keeps the whole window."""
    from dpjax import io

    y, x = np.mgrid[-7:8, -7:8]
    k = np.exp(-(x ** 2 + y ** 2) / 4.0).astype(np.float32)  # narrow in a 15-px window
    pair = np.stack([k / k.sum()] * 4)[None].repeat(2, axis=0)  # [2, 4, 15, 15]
    io.save_calibration_kernels(tmp_path / "calib", io.CalibratedKernels(pair, (2, 2), 32))
    args = [*TINY, "--repeats=1", "--methods=fft", f"--calib_dir={tmp_path / 'calib'}"]
    cut = _run("bench_step", args, tmp_path)["problem"]
    whole = _run("bench_step", [*args, "--kernel_mass_cut=0"], tmp_path)["problem"]
    assert cut["kernel_size"] == whole["kernel_size"] == 15  # not --kernel_size
    assert whole["layer_kernel_size"] == 2 * 9 + 1  # the whole window at scale 1.2
    assert cut["layer_kernel_size"] < whole["layer_kernel_size"]
    assert cut["kernel_mass_cut"] > 0 and whole["kernel_mass_cut"] == 0
    bad = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_step.py"),
                          "--rows=1", "--cols=2", "--tile=32", f"--calib_dir={tmp_path / 'calib'}"],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert bad.returncode != 0 and "2x2 kernel tiles of 32 px" in bad.stderr


def test_bench_refine(tmp_path):
    res = _run("bench_refine", [*TINY, "--iters=4", "--channels=3"], tmp_path)
    assert res["problem"]["channels"] == 3 and len(res["runs"]) == 2
    first, warm = res["runs"]
    # Same problem twice: the same iterations, evaluations and objectives.
    assert first["objective_end"] == warm["objective_end"] < warm["objective_start"]
    assert warm["iterations"] == 4 and warm["evaluations"] >= 4
    assert res["s_per_iteration"] > 0 and res["evaluations_per_iteration"] >= 1


def test_profile_step(tmp_path):
    res = _run("profile_step", [*TINY, "--repeats=1"], tmp_path)
    assert {"loss", "data_terms", "prior_terms", "blur_one_layer"} <= set(res["stages"])
    for stage in res["stages"].values():
        assert stage["forward"] is not None


def test_colour_solve(tmp_path):
    res = _run("colour_solve", [*TINY, "--tile=64", "--runs=grey,colour"], tmp_path)
    grey, colour = res["runs"]["grey"], res["runs"]["colour"]
    assert (grey["channels"], colour["channels"]) == (1, 3)
    assert res["colour_over_grey"] == pytest.approx(colour["wall_s"] / grey["wall_s"])
    for r in (grey, colour):
        assert r["wall_s"] > 0 and 0 < r["psnr"] < 100 and 0 <= r["aiwe1"]


@pytest.mark.skipif(not (ROOT.parent / "shared" / "data" / "pixel4" / "008_left.png").exists(),
                    reason="needs ../shared/data/pixel4")
def test_time_to_quality(tmp_path):
    # One tile, a 20-iteration paper run and the fast schedule finished with 0 and 3
    # refinement iterations: checks the records and the refinement curve, not the times.
    # The fast run fits the raw pairs with the apps' solver for linear input.
    res = _run("time_to_quality", ["--crop=1x1", "--paper_iters=20", "--eval_every=10",
                                   "--fast_eval_every=40", "--refine_iters=3",
                                   f"--plot={tmp_path / 'ttq.png'}"], tmp_path)
    paper, fast = res["runs"]["paper"], res["runs"]["fast"]
    assert res["shape"][1:3] == [168, 168] and res["refine_iters"] == [0, 3]
    assert paper["iterations"] == [20] and len(paper["records"]) == 2
    linear = presets.linear_input_solver(preset="auto")
    assert fast["iterations"] == list(linear.level_iters)
    assert fast["schedule"]["optimizer"] == linear.optimizer == "lbfgs"
    (curve,) = fast["refine_curve"]
    assert curve["iters"] == 3 and curve["refine"]["iterations"] == 3
    # The default (15) was not run, so the final result is the last count's.
    assert fast["final_refine_iters"] == 3 and fast["final"]["psnr"] == curve["psnr"]
    assert fast["solver_time_s"] == pytest.approx(fast["mpi_time_s"] + curve["seconds"])
    last = fast["records"][-1]
    assert last["level"] == "refine" and last["t"] == pytest.approx(fast["solver_time_s"])
    ts = [r["t"] for r in fast["records"]]
    assert ts == sorted(ts)
    assert res["input_psnr"] < fast["final"]["psnr"] < 60
    assert 0 < fast["wiener_at_final_map"]["psnr"] < 60
    assert (tmp_path / "ttq.png").stat().st_size > 0
