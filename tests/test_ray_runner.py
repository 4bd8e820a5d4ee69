"""The batch runner on a real local Ray cluster (conftest's `ray_cluster`: a head and a
second node, one CPU each): `runner.run(opts, executor=RayExecutor(...))` and
`run_solver.py --executor=ray`.

Tiny scenes as in test_runner.py (64x64 px, 2x2 tiles, 4 layers, 1 level, 5
iterations). The first run solves four scenes while the test kills two Ray worker
processes in the middle of a scene: one while the solver is iterating, one after its
complete result is staged (result.json written in `.staging-<name>-<pid>-<thread>`)
and before the swap into place. The workers run the runner's own `solve_task`
through `_traced`, a shim that only counts: one file per call of the task and one
per start of a solve (`dpjax.pipeline.fit`), and, for the two victims' first
attempts, holds still at the chosen point so that the kill lands there.
"""

from __future__ import annotations

import functools
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from dpjax import outputs, runner
from dpjax.ray_executor import RayExecutor

ray = pytest.importorskip("ray", reason="ray is not installed (pip install 'dpjax[ray]')")

from test_runner import (
    ROOT,
    TINY_LINEAR_SOLVER,
    _case_missing_partner,
    _opts,
    _texture,
    _write_tiff_pair,
)

pytestmark = pytest.mark.slow  # ~2 min on a shared 2-core CPU (cluster start included)

# The workers cannot import this test module by name: ship its functions by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

KERNELS = {"grid": (2, 2), "kernel_radius": 3.0}  # parametric, as --grid=2x2 --kernel_radius=3
GOOD = ("a", "b")
VICTIMS = {"killed_solving": "solve", "killed_staged": "swap"}  # scene -> where it is killed
HOLD_S = 120.0  # a held attempt waits this long for its kill (the test fails before)


# ----------------------------------------------------------------------------------------
# Runs on the Ray workers


def _mark(folder: Path, name: str, text: str = "") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.{os.getpid()}.{time.time_ns()}").write_text(text)


def _hold(root: Path, name: str) -> None:
    """Says where this attempt is (hold/NAME holds the pid), then waits to be killed."""
    hold = root / "hold"
    hold.mkdir(exist_ok=True)
    tmp = hold / f".{name}.tmp"
    tmp.write_text(str(os.getpid()))
    os.replace(tmp, hold / name)
    time.sleep(HOLD_S)
    raise AssertionError(f"{name}: the test should have killed this worker")


def _traced(fn, root: str, kill_at: dict[str, str], task: runner.SceneTask):
    """fn(task) (the runner's solve_task) on a worker, counted: calls/NAME.PID.NS per
    call, solves/NAME.PID.NS per start of the solver; the first attempt of a scene in
    kill_at holds at "solve" (after the solver's first chunk of steps) or "swap" (the
    result complete in its staging folder, not yet swapped in)."""
    from dpjax import pipeline

    root_p, name = Path(root), task.name
    first = not list((root_p / "calls").glob(f"{name}.*"))
    _mark(root_p / "calls", name)
    where = kill_at.get(name) if first else None
    real_fit, real_swap = pipeline.fit, runner._swap_in

    def fit(*args, callback=None, **kwargs):
        _mark(root_p / "solves", name)

        def report(progress):
            if callback is not None:
                callback(progress)
            if where == "solve":
                _hold(root_p, name)

        return real_fit(*args, callback=report, **kwargs)

    def swap_in(staging, out_dir):
        if where == "swap":
            _hold(root_p, name)
        real_swap(staging, out_dir)

    pipeline.fit, runner._swap_in = fit, swap_in
    try:
        return fn(task)
    finally:
        pipeline.fit, runner._swap_in = real_fit, real_swap


class Traced:
    """A RayExecutor whose tasks run through `_traced` (everything else as is)."""

    def __init__(self, inner: RayExecutor, root: Path, kill_at: dict[str, str]):
        self.inner, self.root, self.kill_at = inner, root, kill_at

    def check_output_folder(self, folder):
        return self.inner.check_output_folder(folder)

    def imap_unordered(self, fn, tasks):
        return self.inner.imap_unordered(
            functools.partial(_traced, fn, str(self.root), self.kill_at), tasks)


# ----------------------------------------------------------------------------------------
# The driver's side


def _count(root: Path, kind: str, name: str) -> int:
    return len(list((root / kind).glob(f"{name}.*"))) if (root / kind).is_dir() else 0


def _staging(out: Path) -> list[Path]:
    return list(out.rglob(".staging-*"))


def _killer(root: Path, out: Path, seen: dict, errors: list, run_over: threading.Event
            ) -> None:
    """Kills each victim's worker once it holds; notes what the folders looked like.

    Watches until both are killed or the run is over (`run_over`), not for a fixed time:
    on a loaded machine the second victim can start minutes late. A victim that is
    never killed stops holding after HOLD_S and fails its attempt, so the run still ends.
    """
    try:
        pending = dict(VICTIMS)
        while pending and not run_over.is_set():
            for name, where in list(pending.items()):
                marker = root / "hold" / name
                if not marker.exists():
                    continue
                pid = int(marker.read_text())
                staged = [p for p in _staging(out) if p.name.startswith(f".staging-{name}-")]
                note = {"pid": pid, "complete": outputs.is_complete(out / name),
                        "staged": [p.name for p in staged]}
                if where == "swap":
                    # The staging folder's name carries the worker's pid.
                    (folder,) = staged
                    note["pid_in_name"] = int(re.match(rf"\.staging-{name}-(\d+)-",
                                                       folder.name).group(1))
                    note["staged_result"] = (folder / outputs.RESULT_JSON).read_text()
                    note["staged_complete"] = outputs.is_complete(folder)
                note["killed_at_ns"] = time.time_ns()
                os.kill(pid, signal.SIGKILL)
                seen[name] = note
                del pending[name]
            time.sleep(0.05)
        if pending:
            errors.append(f"no worker held for {sorted(pending)}")
    except Exception as e:  # noqa: BLE001 - reported by the test
        errors.append(repr(e))


@pytest.fixture(scope="module")
def ray_connection(ray_cluster):
    """This process connected to the cluster once for the module (executors reuse it)."""
    ray.init(address=ray_cluster.address, log_to_driver=False)
    yield ray_cluster.address
    ray.shutdown()


@pytest.fixture(scope="module")
def jax_cache(tmp_path_factory):
    """One persistent compilation cache for the module's runs: a retry or a fresh worker
    process loads the tiny solver instead of compiling it again (~20 s here)."""
    return tmp_path_factory.mktemp("jax_cache")


@pytest.fixture(scope="module")
def first_run(ray_connection, jax_cache, tmp_path_factory):
    """Four scenes on the cluster, two of their workers killed mid-scene."""
    root = tmp_path_factory.mktemp("ray_run")
    inp, out = root / "in", root / "out"
    for i, name in enumerate(GOOD + tuple(VICTIMS)):
        _write_tiff_pair(inp, name, _texture(i))
    seen: dict = {}
    errors: list = []
    run_over = threading.Event()
    killer = threading.Thread(target=_killer, args=(root, out, seen, errors, run_over),
                              daemon=True)
    killer.start()
    records = []
    t0 = time.perf_counter()
    try:
        with RayExecutor(address=ray_connection, max_retries=2,
                         compilation_cache_dir=jax_cache) as ex:
            # The options run_solver.py builds from the rerun's flags, below.
            outcome = runner.run(_opts(inp, out, linear_solver=TINY_LINEAR_SOLVER,
                                       **KERNELS),
                                 executor=Traced(ex, root, VICTIMS),
                                 on_event=lambda e: records.append(e.data)
                                 if e.kind == "scene" else None)
    finally:
        run_over.set()
    wall_s = time.perf_counter() - t0
    killer.join(timeout=5)
    assert not errors, errors
    return {"root": root, "inp": inp, "out": out, "outcome": outcome, "seen": seen,
            "records": records, "wall_s": wall_s, "jax_cache": jax_cache}


def test_every_scene_solved_once_and_listed_done(first_run):
    root, out, outcome = first_run["root"], first_run["out"], first_run["outcome"]
    assert outcome.exit_status == 0 and outcome.state == "complete"
    assert outcome.counts == {"done": 4, "skipped": 0, "failed": 0}
    summary = json.loads((out / runner.SUMMARY_JSON).read_text())
    assert summary["counts"] == {"done": 4, "skipped": 0, "failed": 0}
    assert sorted(r["scene"] for r in summary["scenes"]) == sorted(GOOD + tuple(VICTIMS))
    assert all(r["status"] == "done" for r in summary["scenes"])
    # One record per scene reached the driver, each scene's result complete.
    assert sorted(r["scene"] for r in first_run["records"]) == sorted(GOOD + tuple(VICTIMS))
    for name in GOOD:
        assert _count(root, "calls", name) == 1 and _count(root, "solves", name) == 1, name
    # a and b were submitted together and each node runs one scene at a time.
    workers = {r["scene"]: r["worker"] for r in summary["scenes"]}
    assert workers["a"] != workers["b"]
    for name in GOOD + tuple(VICTIMS):
        assert outputs.is_complete(out / name), name
        assert json.loads((out / name / outputs.RESULT_JSON).read_text())["scene"] == name
    assert (out / runner.INDEX_HTML).is_file()
    # The workers wrote their compiled solver into the shared cache folder.
    assert any(first_run["jax_cache"].iterdir())


def test_killed_workers_are_retried_and_no_partial_result_counts(first_run):
    root, out, seen = first_run["root"], first_run["out"], first_run["seen"]
    assert sorted(seen) == sorted(VICTIMS)
    for name in VICTIMS:
        # Killed once, retried once by Ray on a new worker process; solved twice in all.
        assert _count(root, "calls", name) == 2 and _count(root, "solves", name) == 2, name
        pids = {int(p.name.split(".")[1]) for p in (root / "calls").glob(f"{name}.*")}
        assert seen[name]["pid"] in pids and len(pids) == 2
        assert not seen[name]["complete"], name  # nothing in place when it was killed
        record = next(r for r in first_run["records"] if r["scene"] == name)
        assert record["status"] == "done"
        assert int(record["worker"].rsplit(":", 1)[1]) == (pids - {seen[name]["pid"]}).pop()
    solving, staged = seen["killed_solving"], seen["killed_staged"]
    assert solving["staged"] == []  # killed before any output was written
    # Killed with a complete result in its staging folder, found by the pid in its name:
    # that result was never swapped in; the retry's own one was.
    assert staged["pid_in_name"] == staged["pid"] and staged["staged_complete"]
    final = out / "killed_staged" / outputs.RESULT_JSON
    assert final.read_text() != staged["staged_result"]
    assert final.stat().st_mtime_ns > staged["killed_at_ns"]
    # The dead workers' staging folders are gone; nothing else is left over.
    assert _staging(out) == [] and list(out.rglob(".retired-*")) == []
    assert not (out / runner.LOCK_FILE).exists()


def test_rerun_from_the_command_line_skips_everything(first_run, ray_connection):
    root, out = first_run["root"], first_run["out"]
    before = {n: (out / n / outputs.RESULT_JSON).stat().st_mtime_ns
              for n in GOOD + tuple(VICTIMS)}
    # Relative paths from another working folder than the cluster's (where the workers
    # run): the driver must hand the workers absolute ones.
    cache = os.path.relpath(first_run["jax_cache"], root)
    args = [sys.executable, str(ROOT / "run_solver.py"), "--input_dir=in",
            "--output_dir=out", "--grid=2x2", "--kernel_radius=3", "--num_layers=4",
            "--pyramid_levels=1", "--num_iters=5", "--preset=none", "--refine_iters=0",
            "--quiet", "--executor=ray", f"--ray_address={ray_connection}",
            "--ray_max_retries=1", f"--compilation_cache_dir={cache}"]
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT),
                                                       os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run(args, check=False, capture_output=True, text=True, env=env,
                          cwd=root, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "4 scenes: 0 done, 4 skipped, 0 failed" in proc.stdout.strip().splitlines()[-1]
    summary = json.loads((out / runner.SUMMARY_JSON).read_text())
    assert {r["scene"]: r["status"] for r in summary["scenes"]} == {
        n: "skipped" for n in GOOD + tuple(VICTIMS)}
    assert before == {n: (out / n / outputs.RESULT_JSON).stat().st_mtime_ns for n in before}


def test_bad_inputs_fail_once_with_their_reason(ray_connection, jax_cache, tmp_path):
    inp, out = tmp_path / "in", tmp_path / "out"
    _write_tiff_pair(inp, "good", _texture(0))
    _case_missing_partner(inp)  # "x": x_right.tif missing
    nan = _texture(1).astype(np.float32)
    nan[1, 9, 3] = np.nan
    _write_tiff_pair(inp, "y", nan, dtype=np.float32)
    with RayExecutor(address=ray_connection, max_retries=2,
                     compilation_cache_dir=jax_cache) as ex:
        outcome = runner.run(_opts(inp, out, **KERNELS), executor=Traced(ex, tmp_path, {}))
    assert outcome.exit_status == 1 and outcome.counts == {"done": 1, "skipped": 0,
                                                           "failed": 2}
    recs = {r["scene"]: r for r in json.loads((out / runner.SUMMARY_JSON).read_text())["scenes"]}
    assert recs["good"]["status"] == "done"
    for name, why in (("x", "missing partner view"), ("y", "NaN or Inf")):
        assert recs[name]["status"] == "failed" and recs[name]["error"] == "input", recs[name]
        assert why in recs[name]["reason"], recs[name]["reason"]
        # Failed in the runner's own code on the worker: one attempt, no solve, no output.
        assert _count(tmp_path, "calls", name) == 1 and _count(tmp_path, "solves", name) == 0
        assert not (out / name).exists()
    assert _staging(out) == []


class _Recorder:
    """An executor that runs nothing: notes the order of the tasks it is given."""

    def __init__(self):
        self.order: list[str] = []

    def check_output_folder(self, folder):
        return folder

    def imap_unordered(self, fn, tasks):
        for i, task in enumerate(tasks):
            self.order.append(task.name)
            yield i, {"scene": task.name, "status": "failed", "error": "test",
                      "reason": "test: not run"}


def test_scenes_are_submitted_largest_frame_first(tmp_path, monkeypatch):
    # Sizes from the files' headers (TIFF and PNG), not decoded on the driver; an
    # unreadable view (decoded to make sure) goes last.
    inp = tmp_path / "in"
    _write_tiff_pair(inp, "small", _texture(0, 64, 64))
    _write_tiff_pair(inp, "large", _texture(1, 96, 128))
    raw = (1024 + _texture(2, 80, 104) * 8000).astype(np.uint16)
    outputs.write_png(inp / "medium_left.png", raw[0])
    outputs.write_png(inp / "medium_right.png", raw[1])
    _write_tiff_pair(inp, "broken", _texture(3))
    (inp / "broken_left.tif").write_bytes(b"II*\x00 not a tiff")
    decoded = []
    real_read = runner.io.read_image
    monkeypatch.setattr(runner.io, "read_image",
                        lambda path: decoded.append(Path(path).name) or real_read(path))
    ex = _Recorder()
    outcome = runner.run(_opts(inp, tmp_path / "out", **KERNELS), executor=ex)
    assert ex.order == ["large", "medium", "small", "broken"]
    assert decoded == ["broken_left.tif"]
    assert outcome.exit_status == 1 and outcome.counts["failed"] == 4
