"""RayExecutor on a real local Ray cluster: a head node and a second node (separate
raylets and worker processes on this machine), one CPU each.

The test function `work` writes one output file per task atomically (a data file
first, non-atomically, then result.json last, as the runner does) and leaves one
file per invocation in calls/, so the tests count how often each task ran.
"""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from dpjax import ray_executor
from dpjax.ray_executor import OutputFolderError, RayExecutor

ray = pytest.importorskip("ray", reason="ray is not installed (pip install 'dpjax[ray]')")

pytestmark = pytest.mark.slow  # ~25 s to start the two nodes on a 2-core CPU

# The workers cannot import this test module by name: ship its functions by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


def work(task):
    """One task: {"name", "root", "sleep", "raise", "wait_kill"} -> a record."""
    root = Path(task["root"])
    name = task["name"]
    calls = root / "calls"
    calls.mkdir(exist_ok=True)
    earlier = len(list(calls.glob(f"{name}.*")))
    (calls / f"{name}.{os.getpid()}.{time.time_ns()}").touch()
    out = root / "out" / name
    out.mkdir(parents=True, exist_ok=True)
    (out / "data.txt").write_text(f"partial from {os.getpid()}\n")  # not atomic on purpose
    if task.get("wait_kill") and earlier == 0:
        # First attempt: say where we are, then wait to be killed.
        (root / f"{name}.pid").write_text(str(os.getpid()))
        time.sleep(60)
        raise AssertionError("the test should have killed this worker")
    time.sleep(task.get("sleep", 0.0))
    if task.get("raise"):
        raise ValueError(f"bad scene {name}")
    with open(out / "data.txt", "a") as f:
        f.write("complete\n")
    rec = {"scene": name, "status": "done", "pid": os.getpid(), "finished_at": time.time()}
    tmp = out / ".result.json.tmp"
    tmp.write_text(json.dumps(rec))
    os.replace(tmp, out / "result.json")  # last, atomically: complete only now
    return rec


def cache_dir_seen(_task):
    import jax

    return jax.config.jax_compilation_cache_dir


def calls_of(root, name):
    return sorted((root / "calls").glob(f"{name}.*"))


@pytest.fixture(scope="module")
def cluster(ray_cluster):
    """Head (1 CPU) + one more node (1 CPU): conftest's shared `ray_cluster`."""
    return ray_cluster


@pytest.fixture(scope="module")
def executor(cluster):
    ex = RayExecutor(address=cluster.address, max_retries=2, num_cpus_per_task=1)
    with ex:
        # Start a worker on each node (1 CPU each: two 1-s tasks cannot share one) so
        # that the timing test below does not wait for workers importing dpjax.
        ex.map_unordered(time.sleep, [1.0, 1.0])
        yield ex


def test_importing_dpjax_does_not_import_ray():
    code = ("import sys, dpjax, dpjax.ray_executor; "
            "sys.exit(1 if 'ray' in sys.modules else 0)")
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    assert subprocess.run([sys.executable, "-c", code], env=env).returncode == 0


def test_task_env_vars_share_a_gpu_only_when_fractional():
    assert ray_executor.task_env_vars(1.0, None) == {}
    assert ray_executor.task_env_vars(0.0, {"A": "1"}) == {"A": "1"}
    assert ray_executor.task_env_vars(0.5, None) == {"XLA_PYTHON_CLIENT_MEM_FRACTION": "0.375"}
    own = {"XLA_PYTHON_CLIENT_PREALLOCATE": "false"}
    assert ray_executor.task_env_vars(0.25, own) == own


def test_task_slots_counts_what_fits_on_live_nodes():
    nodes = [{"Alive": True, "Resources": {"CPU": 8.0, "GPU": 2.0}},
             {"Alive": True, "Resources": {"CPU": 4.0}},
             {"Alive": False, "Resources": {"CPU": 64.0, "GPU": 8.0}},
             {"Alive": True, "Resources": {"CPU": 3.0, "GPU": 1.0}}]
    slots = ray_executor.task_slots
    assert slots(nodes, num_cpus=1, num_gpus=0) == 8 + 4 + 3
    assert slots(nodes, num_cpus=2, num_gpus=0) == 4 + 2 + 1
    assert slots(nodes, num_cpus=1, num_gpus=1) == 2 + 0 + 1
    assert slots(nodes, num_cpus=4, num_gpus=0.5) == 2 + 0 + 0
    assert slots(nodes, num_cpus=0, num_gpus=0.1) == 20 + 0 + 10
    assert slots(nodes, num_cpus=0, num_gpus=0) == float("inf")


def test_each_task_once_results_as_they_complete(executor, tmp_path):
    assert executor.num_gpus_per_task == 0.0  # CPU-only cluster
    names = ["slow", "a", "b", "c", "d"]
    tasks = [{"name": n, "root": str(tmp_path), "sleep": 5.0 if n == "slow" else 0.2}
             for n in names]
    arrivals = []
    results = executor.map_unordered(
        work, tasks, lambda task, rec: arrivals.append((task["name"], time.time(), rec)))
    assert [r["scene"] for r in results] == names  # returned in task order
    assert all(r["status"] == "done" for r in results)
    for n in names:
        assert len(calls_of(tmp_path, n)) == 1, n
        assert (tmp_path / "out" / n / "data.txt").read_text().endswith("complete\n")
    order = [name for name, _, _ in arrivals]
    # The slow task was submitted first but arrives last; the quick ones arrived while
    # it was still running (on the other node), each as soon as it was done.
    assert order[-1] == "slow", order
    slow_end = results[0]["finished_at"]
    assert all(t < slow_end for name, t, _ in arrivals if name != "slow")
    assert {rec["pid"] for _, _, rec in arrivals[:-1]}.isdisjoint({results[0]["pid"]})


def test_max_in_flight_bounds_concurrency(cluster, executor, tmp_path):
    assert executor.capacity() == 2
    tasks = [{"name": n, "root": str(tmp_path), "sleep": 0.3} for n in "abc"]
    with RayExecutor(address=cluster.address, max_in_flight=1) as ex:
        results = ex.map_unordered(work, tasks)
    starts = sorted(int(p.name.rsplit(".", 1)[1]) / 1e9 for p in (tmp_path / "calls").iterdir())
    ends = sorted(r["finished_at"] for r in results)
    assert all(end <= start for end, start in zip(ends, starts[1:]))  # one at a time


def test_killed_worker_is_retried_and_no_partial_output_counts(executor, tmp_path):
    tasks = [{"name": "victim", "root": str(tmp_path), "wait_kill": True},
             {"name": "other", "root": str(tmp_path), "sleep": 0.5}]
    killed = []

    def killer():
        pid_file = tmp_path / "victim.pid"
        deadline = time.time() + 60
        while not pid_file.exists() and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(0.2)
        # The first attempt has written a partial data file but no result.json yet.
        killed.append((int(pid_file.read_text()),
                       (tmp_path / "out" / "victim" / "result.json").exists()))
        os.kill(killed[0][0], signal.SIGKILL)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    results = executor.map_unordered(work, tasks)
    thread.join(timeout=5)
    (victim_pid, complete_before_kill), = killed
    assert not complete_before_kill
    victim, other = results
    assert victim["status"] == "done" and victim["pid"] != victim_pid
    assert len(calls_of(tmp_path, "victim")) == 2  # killed once, retried once
    assert len(calls_of(tmp_path, "other")) == 1 and other["status"] == "done"
    written = json.loads((tmp_path / "out" / "victim" / "result.json").read_text())
    assert written["pid"] == victim["pid"]
    assert (tmp_path / "out" / "victim" / "data.txt").read_text() == (
        f"partial from {victim['pid']}\ncomplete\n")


def test_application_exception_fails_once_with_its_reason(executor, tmp_path):
    tasks = [{"name": "bad", "root": str(tmp_path), "raise": True},
             {"name": "good", "root": str(tmp_path)}]
    bad, good = executor.map_unordered(work, tasks)
    assert good["status"] == "done"
    assert bad["status"] == "failed" and bad["error"] == "error"
    assert bad["reason"] == "error: ValueError: bad scene bad"
    assert "bad scene bad" in bad["traceback"]
    assert len(calls_of(tmp_path, "bad")) == 1  # not retried
    assert not (tmp_path / "out" / "bad" / "result.json").exists()


def test_worker_dying_on_every_attempt_is_a_failed_record(cluster, tmp_path):
    def die(task):
        (Path(task) / f"call.{os.getpid()}").touch()
        os.kill(os.getpid(), signal.SIGKILL)

    with RayExecutor(address=cluster.address, max_retries=1) as ex:
        (i, rec), = list(ex.imap_unordered(die, [str(tmp_path)]))
    assert len(list(tmp_path.glob("call.*"))) == 2  # tried, retried once, given up
    assert i == 0 and rec["status"] == "failed" and rec["error"] == "worker"
    assert rec["reason"].startswith("worker: ") and "\n" not in rec["reason"]


def test_output_folder_check(executor, tmp_path):
    out = tmp_path / "shared" / "out"
    assert executor.check_output_folder(out) == out
    assert list(out.iterdir()) == []  # probe files removed
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(OutputFolderError, match="not writable here"):
        executor.check_output_folder(blocker / "out")


def test_probe_reports_a_folder_that_is_not_the_drivers(tmp_path):
    # What a node whose output path is a local disk (not the shared one) sees.
    token = "0123"
    assert "does not exist" in ray_executor._probe_folder(str(tmp_path / "nope"), token)
    why = ray_executor._probe_folder(str(tmp_path), token)
    assert "not the driver's folder" in why and "\n" not in why
    (tmp_path / f"{ray_executor.PROBE_PREFIX}{token}").write_text(token)
    assert ray_executor._probe_folder(str(tmp_path), token) is None
    assert len(list(tmp_path.iterdir())) == 1  # its own probe file removed


def test_compilation_cache_is_set_on_workers(cluster, tmp_path):
    cache = tmp_path / "jax_cache"
    with RayExecutor(address=cluster.address, compilation_cache_dir=cache) as ex:
        seen = ex.map_unordered(cache_dir_seen, [0, 1])
    assert seen == [str(cache.resolve())] * 2
    assert cache.is_dir()


def test_default_compilation_cache_is_each_nodes_own(cluster, tmp_path):
    cache = tmp_path / "node_default"  # what DPJAX_CACHE_DIR names on the workers
    with RayExecutor(address=cluster.address, default_compilation_cache=True,
                     runtime_env={"env_vars": {"DPJAX_CACHE_DIR": str(cache),
                                               "JAX_COMPILATION_CACHE_DIR": ""}}) as ex:
        seen = ex.map_unordered(cache_dir_seen, [0, 1])
    assert seen == [str(cache.resolve())] * 2


def test_close_leaves_a_connection_it_did_not_make(executor, cluster):
    assert ray.is_initialized()  # the module executor is connected
    with RayExecutor(address=cluster.address) as ex:
        assert ex.map_unordered(len, ["ab"]) == [2]
    assert ray.is_initialized()


def test_a_local_instance_it_started_is_stopped_on_close(tmp_path):
    # In a fresh process: this one is connected to the test cluster already.
    code = """
import os, ray
from dpjax.ray_executor import RayExecutor
with RayExecutor(address="local", num_cpus_per_task=1) as ex:
    assert ex.map_unordered(len, ["abc"]) == [3]
    node = ray._private.worker._global_node
    pids = [p.process.pid for procs in node.all_processes.values() for p in procs]
assert not ray.is_initialized() and pids
for pid in pids:  # reaped by ray.shutdown: gone, or a zombie of this process
    try:
        os.kill(pid, 0)
        with open(f"/proc/{pid}/stat") as f:
            assert f.read().split(")")[1].split()[0] == "Z", pid
    except ProcessLookupError:
        pass
print("ok", len(pids))
"""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-2000:]
