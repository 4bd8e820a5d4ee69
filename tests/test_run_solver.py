"""run_solver.py, the thin app: flags -> dpjax.runner -> exit status (subprocesses).

The multi-process test runs two `python run_solver.py` processes on 127.0.0.1; the
SIGTERM test stops a run the way schedulers and containers do.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dpjax import outputs

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
from test_runner import _by_scene, _summary, _texture, _write_tiff_pair  # noqa: E402

import run_solver  # noqa: E402


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
    proc = subprocess.run([sys.executable, str(ROOT / "run_solver.py"), "--quality=best"],
                          check=False, capture_output=True, text=True, timeout=120,
                          cwd=tmp_path)
    assert proc.returncode != 0 and "--quality need(s) --input_dir" in proc.stderr
    proc = subprocess.run([sys.executable, str(ROOT / "run_solver.py"), "--input_dir=.",
                           "--quality=best", "--level_iters=4,2,2"],
                          check=False, capture_output=True, text=True, timeout=120,
                          cwd=tmp_path)
    assert proc.returncode != 0 and "level_iters or quality" in proc.stderr
    assert not (tmp_path / "dpjax_out").exists()


def test_cli_bad_prior_encoding_is_a_usage_error(tmp_path):
    (tmp_path / "in").mkdir()
    proc = subprocess.run([sys.executable, str(ROOT / "run_solver.py"), "--input_dir=in",
                           "--prior_encoding=gamma:-1"],
                          check=False, capture_output=True, text=True, timeout=120,
                          cwd=tmp_path)
    assert proc.returncode != 0 and "--prior_encoding: bad encoding 'gamma:-1'" in proc.stderr
    assert "'input'" in proc.stderr and not (tmp_path / "dpjax_out").exists()


def test_cli_bad_compilation_cache_dir_is_a_usage_error(tmp_path):
    (tmp_path / "taken").write_text("not a folder")
    proc = subprocess.run([sys.executable, str(ROOT / "run_solver.py"),
                           "--compilation_cache_dir=taken"],
                          check=False, capture_output=True, text=True, timeout=120,
                          cwd=tmp_path)
    assert proc.returncode != 0 and "--compilation_cache_dir" in proc.stderr
    assert "is not a folder" in proc.stderr
    assert not (tmp_path / "dpjax_out").exists()  # refused before anything ran


def test_compilation_cache_is_on_by_default_and_can_be_turned_off(tmp_path):
    """The default folder (DPJAX_CACHE_DIR here) fills with compiled solvers; off
    writes none; a default folder that cannot be used is a warning, not a failure."""
    inp = tmp_path / "in"
    _write_tiff_pair(inp, "s0", _texture(0))
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    base = [sys.executable, str(ROOT / "run_solver.py"), f"--input_dir={inp}",
            "--grid=2x2", "--kernel_radius=3", "--kernel_smooth=0.5", "--num_layers=4",
            "--pyramid_levels=1", "--num_iters=2", "--preset=none", "--refine_iters=0"]
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    runs = {}
    for name, cache, extra in (("auto", tmp_path / "cache", []),
                               ("off", tmp_path / "cache_off", ["--compilation_cache_dir=off"]),
                               ("unusable", a_file / "below", [])):
        proc = subprocess.run(base + [f"--output_dir={tmp_path / name}"] + extra,
                              check=False, capture_output=True, text=True, timeout=300,
                              cwd=tmp_path, env={**env, "DPJAX_CACHE_DIR": str(cache),
                                                 "JAX_PLATFORMS": "cpu"})
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert outputs.is_complete(tmp_path / name / "s0")
        runs[name] = proc
    assert len(list((tmp_path / "cache").iterdir())) >= 3  # the solver's programs
    assert not (tmp_path / "cache_off").exists()
    assert "no persistent compilation cache" in runs["unusable"].stderr
    assert "no persistent compilation cache" not in runs["auto"].stderr


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
            "--refine_iters=0", "--quiet", f"--coordinator_address=127.0.0.1:{port}",
            "--num_processes=2", "--distributed_timeout_s=120"]
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


def test_sigterm_finishes_writing_and_exits_143(tmp_path):
    inp, out = tmp_path / "in", tmp_path / "out"
    for i in range(6):
        _write_tiff_pair(inp, f"s{i}", _texture(i))
    args = [sys.executable, str(ROOT / "run_solver.py"), f"--input_dir={inp}",
            f"--output_dir={out}", "--grid=2x2", "--kernel_radius=3", "--kernel_smooth=0.5",
            "--num_layers=4", "--pyramid_levels=1", "--num_iters=200", "--preset=none"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=tmp_path, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    try:
        deadline = time.time() + 300
        while time.time() < deadline and not outputs.is_complete(out / "s0"):
            time.sleep(0.2)
        assert outputs.is_complete(out / "s0"), proc.stderr.read()[-2000:]
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, stderr[-2000:]
    summary = _summary(out)
    assert summary["state"] == "terminated" and (out / "index.html").is_file()
    recs = _by_scene(summary)
    assert recs["s0"]["status"] == "done"
    assert "not run" in {r["status"] for r in recs.values()}
    assert "terminated" in stdout
    assert not (out / ".dpjax.lock").exists()
    assert not any(p.name.startswith((".staging", ".retired")) or p.suffix == ".tmp"
                   for p in out.rglob("*"))
    for name, rec in recs.items():  # a scene is complete exactly when recorded done
        assert outputs.is_complete(out / name) == (rec["status"] == "done"), name


def test_cli_output_dir_that_is_a_file_exits_2(tmp_path):
    _write_tiff_pair(tmp_path / "in", "a", _texture(0))
    (tmp_path / "out").write_text("a file")
    proc = subprocess.run([sys.executable, str(ROOT / "run_solver.py"),
                           f"--input_dir={tmp_path / 'in'}", f"--output_dir={tmp_path / 'out'}",
                           "--grid=2x2", "--kernel_radius=3", "--preset=none"],
                          check=False, capture_output=True, text=True, timeout=300,
                          cwd=tmp_path)
    assert proc.returncode == 2
    assert "exists and is not a folder" in proc.stderr and "Traceback" not in proc.stderr
