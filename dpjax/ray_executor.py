"""Running a batch on a Ray cluster: one Ray task per item, dynamic balancing, retries.

`RayExecutor` runs `fn(task)` for every task as one Ray task and hands the results
back as they complete, so a driver can write its summary after each one. It knows
nothing about scenes: the batch runner passes its own picklable per-scene function
(which records a bad scene as a failed record instead of raising) and its tasks.

Scheduling is dynamic: a task starts wherever a worker with the requested resources
(`num_gpus_per_task`, `num_cpus_per_task`) is free, so a node that draws short scenes
takes more of them, instead of each process owning a fixed share. By default the
executor keeps only as many tasks in flight as the live nodes can run at once
(`task_slots`) and submits the next one as each finishes, with Ray's SPREAD
placement. Submitting everything at once let Ray queue tasks behind a long one on
a busy node, or run a stream of short ones on one worker, while other nodes idled:
on a local 3-node cluster (1 CPU each; two 3-s tasks, twelve 0.2-s tasks, ideal
makespan ~3-3.5 s) Ray's default placement took 4.2-8.5 s and SPREAD 3.0-7.2 s with
everything submitted, against 3.2-3.8 s for SPREAD with the capacity window.

Failures are of two kinds, treated differently:
- the worker dies (node lost, process killed, out of memory): Ray runs the task
  again, up to `max_retries` more times (Ray's retries for system failures). A task
  whose every attempt died yields `worker_failure(...)`, a record-like dict
  {"status": "failed", "error": "worker", "reason": ...}, never an exception;
- `fn` raises: the task is not retried (`retry_exceptions=False`: an exception is a
  property of the task, not of the machine) and yields
  {"status": "failed", "error": "error", "reason": ..., "traceback": ...}.
A retried task runs `fn` again from the start, so `fn` must tolerate a partial
output folder left by a killed attempt: the runner writes every file atomically
and result.json last (`dpjax.outputs`), so a killed attempt never looks complete.
Ray's retries make a task run at least once, not exactly once: a worker cut off
from the cluster (network partition) may still be running when its retry starts.

Outputs: the workers write the result files themselves, so the output folder must
be one path that every node (and the driver, which writes summary.json) can write:
a shared file system (NFS, Lustre, EFS, Filestore) or a bucket mounted at the same
path on every node. `check_output_folder` tests this up front.

Compilation: with `compilation_cache_dir` each task turns on JAX's persistent
compilation cache there (`dpjax.batch.use_compilation_cache`) before calling `fn`;
on a shared folder each distinct problem shape then compiles once per cluster. Ray
gives a GPU task a fresh worker process (Ray's default for tasks that request GPUs,
because the GPU a process initialised cannot be handed to another task), so without
the persistent cache every scene would compile its solver again.

Ray is imported only when an executor starts: `import dpjax` does not need it.
"""

from __future__ import annotations

import math
import os
import socket
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

__all__ = [
    "OutputFolderError",
    "RayExecutor",
    "exception_failure",
    "task_env_vars",
    "task_slots",
    "worker_failure",
]

T = TypeVar("T")
R = TypeVar("R")

PROBE_PREFIX = ".dpjax-probe-"
# XLA preallocates this fraction of a GPU's memory by default; tasks that share a
# GPU (fractional num_gpus_per_task) get a proportional share of it instead.
_XLA_MEM_FRACTION = 0.75


class OutputFolderError(ValueError):
    """The output folder cannot be written by the driver or by some node."""


def worker_failure(error: BaseException) -> dict[str, Any]:
    """The result of a task whose worker died on every attempt (Ray's retries spent)."""
    return {"status": "failed", "error": "worker",
            "reason": f"worker: {type(error).__name__}: {_first_line(error)}"}


def exception_failure(cause: BaseException, tb: str | None = None) -> dict[str, Any]:
    """The result of a task whose function raised `cause` (not retried)."""
    rec = {"status": "failed", "error": "error",
           "reason": f"error: {type(cause).__name__}: {_first_line(cause)}"}
    if tb:
        rec["traceback"] = tb
    return rec


def task_env_vars(num_gpus: float, env_vars: Mapping[str, str] | None) -> dict[str, str]:
    """Environment of a task: `env_vars`, plus an XLA memory share for a shared GPU.

    A task with 0 < num_gpus < 1 shares its GPU with other processes, so XLA's default
    preallocation (75% of the GPU in each process) would run the second one out of
    memory: unless `env_vars` sets XLA's memory variables itself, the task gets
    XLA_PYTHON_CLIENT_MEM_FRACTION = 0.75 * num_gpus.
    """
    env = dict(env_vars or {})
    own = {"XLA_PYTHON_CLIENT_MEM_FRACTION", "XLA_PYTHON_CLIENT_PREALLOCATE",
           "XLA_PYTHON_CLIENT_ALLOCATOR"}
    if 0 < num_gpus < 1 and not own & env.keys():
        env["XLA_PYTHON_CLIENT_MEM_FRACTION"] = f"{_XLA_MEM_FRACTION * num_gpus:.3f}"
    return env


def task_slots(nodes: Sequence[Mapping[str, Any]], *, num_cpus: float,
               num_gpus: float) -> int | float:
    """How many tasks of num_cpus CPUs and num_gpus GPUs fit on the live nodes at once.

    Args:
      nodes: `ray.nodes()` entries ("Alive", "Resources": the node's totals).

    Returns:
      The sum over live nodes of the tasks each fits; math.inf when a task requests
      neither CPUs nor GPUs.
    """
    need = {k: v for k, v in (("CPU", num_cpus), ("GPU", num_gpus)) if v > 0}
    if not need:
        return math.inf
    total = 0
    for node in nodes:
        if not node.get("Alive"):
            continue
        have = node.get("Resources", {})
        # Small tolerance: 0.1 + 0.2 GPUs must count as fitting 0.3.
        total += min(math.floor(have.get(k, 0.0) / v + 1e-9) for k, v in need.items())
    return total


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else ""


# ----------------------------------------------------------------------------------------
# Code that runs on the workers


_cache_dir_in_use: str | None = None  # per worker process
# `_run_task`'s cache_dir for "the node's own default folder" (default_compilation_cache).
_NODE_DEFAULT_CACHE = "<node default>"


def _run_task(fn: Callable[[T], R], task: T, cache_dir: str | None) -> R:
    """One task on a worker: the compilation cache first (once per process), then fn."""
    global _cache_dir_in_use
    if cache_dir is not None and cache_dir != _cache_dir_in_use:
        from dpjax import batch  # imports jax: only when asked for

        if cache_dir == _NODE_DEFAULT_CACHE:
            batch.use_default_compilation_cache()  # a node without one solves without
        else:
            batch.use_compilation_cache(cache_dir)
        _cache_dir_in_use = cache_dir
    return fn(task)


def _probe_folder(folder: str, token: str) -> str | None:
    """On one node: None when `folder` is the driver's folder and writable, else why not."""
    where = socket.gethostname()
    path = Path(folder)
    if not path.is_dir():
        return f"{folder} does not exist on {where}"
    marker = path / f"{PROBE_PREFIX}{token}"
    try:
        seen = marker.read_text()
    except OSError:
        seen = None
    if seen != token:
        return (f"{folder} on {where} is not the driver's folder (the driver's probe file "
                "is missing): use a shared file system or a bucket mounted on every node")
    probe = path / f"{PROBE_PREFIX}{token}-{uuid.uuid4().hex}"
    try:
        probe.write_text(token)
        ok = probe.read_text() == token
    except OSError as e:
        return f"cannot write {folder} on {where}: {e}"
    finally:
        try:
            probe.unlink()
        except OSError:
            pass
    return None if ok else f"{folder} on {where} does not read back what was written"


# ----------------------------------------------------------------------------------------
# The executor (driver side)


class RayExecutor:
    """Runs fn(task) for each task as one Ray task; results come back as they complete.

    Use as a context manager (or call `start` and `close`):

      with RayExecutor(address="auto", compilation_cache_dir="/shared/jax_cache") as ex:
          ex.check_output_folder("/shared/out")
          for index, result in ex.imap_unordered(run_scene, tasks):
              ...

    `fn` and the tasks must be picklable (a module-level function; dpjax must be
    importable on every node: installed there, or shipped with
    runtime_env={"py_modules": [...]} / {"working_dir": ...}).
    """

    def __init__(self, *, address: str | None = None, max_retries: int = 3,
                 num_gpus_per_task: float | None = None, num_cpus_per_task: float = 1.0,
                 runtime_env: Mapping[str, Any] | None = None,
                 compilation_cache_dir: str | os.PathLike | None = None,
                 default_compilation_cache: bool = False,
                 max_in_flight: int | None = None, scheduling_strategy: str = "SPREAD"):
        """Sets the executor up; Ray is started or connected by `start` (or `with`).

        Args:
          address: None: Ray's default (the cluster in RAY_ADDRESS or one started with
            `ray start` on this machine, else a new local instance, as on a laptop);
            "local": always a new local instance; "auto": the running cluster;
            "HOST:PORT": that cluster's head.
          max_retries: extra attempts for a task whose worker dies (>= 0).
          num_gpus_per_task: GPUs each task reserves. None: 1 if the cluster has GPUs
            when the executor starts, else 0. Set it on autoscaling clusters whose GPU
            nodes are not up yet. A fraction (0.5) packs tasks onto a GPU and gives
            each a share of its memory (`task_env_vars`).
          num_cpus_per_task: CPUs each task reserves (limits concurrency on CPU nodes).
          runtime_env: Ray runtime environment of the tasks (env_vars, py_modules, ...).
          compilation_cache_dir: JAX persistent compilation cache folder that every task
            turns on before calling fn; a shared folder compiles each shape once.
          default_compilation_cache: without compilation_cache_dir, every task turns
            on its own node's default folder (`dpjax.batch.use_default_compilation_cache`;
            none where that folder cannot be used).
          max_in_flight: most tasks submitted and not finished at a time. None: the
            cluster's capacity (`capacity`), so that no task waits in one node's queue
            while another node is idle. On an autoscaling cluster set it above the
            current capacity (e.g. the number of scenes): Ray adds nodes only for
            tasks that are waiting.
          scheduling_strategy: Ray's placement of each task: "SPREAD" (default: over
            the nodes) or "DEFAULT" (Ray's default: the driver's node until it is
            about half busy, then the others).
        """
        if max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {max_retries}")
        if num_gpus_per_task is not None and num_gpus_per_task < 0:
            raise ValueError(f"num_gpus_per_task must be >= 0, got {num_gpus_per_task}")
        if num_cpus_per_task < 0:
            raise ValueError(f"num_cpus_per_task must be >= 0, got {num_cpus_per_task}")
        if max_in_flight is not None and max_in_flight < 1:
            raise ValueError(f"max_in_flight must be >= 1, got {max_in_flight}")
        self.address = address
        self.max_retries = max_retries
        self.num_cpus_per_task = num_cpus_per_task
        self.runtime_env = dict(runtime_env) if runtime_env else None
        # Absolute: a relative folder would be taken from each worker's working folder.
        self.compilation_cache_dir = (
            os.fspath(Path(compilation_cache_dir).expanduser().absolute())
            if compilation_cache_dir is not None
            else _NODE_DEFAULT_CACHE if default_compilation_cache else None)
        self.max_in_flight = max_in_flight
        self.scheduling_strategy = scheduling_strategy
        self._num_gpus_requested = num_gpus_per_task
        self.num_gpus_per_task: float | None = num_gpus_per_task  # resolved by start()
        self._ray = None
        self._started_ray = False
        self._remote = None

    # -- lifecycle

    def start(self) -> RayExecutor:
        """Connects to (or starts) Ray unless this process already did; idempotent."""
        if self._ray is not None:
            return self
        import ray

        if not ray.is_initialized():
            ray.init(address=self.address)
            self._started_ray = True
        self._ray = ray
        gpus = self._num_gpus_requested
        if gpus is None:
            gpus = 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
        self.num_gpus_per_task = float(gpus)
        runtime_env = dict(self.runtime_env or {})
        env = task_env_vars(self.num_gpus_per_task, runtime_env.get("env_vars"))
        if env:
            runtime_env["env_vars"] = env
        options: dict[str, Any] = {
            "num_cpus": self.num_cpus_per_task, "num_gpus": self.num_gpus_per_task,
            "max_retries": self.max_retries, "retry_exceptions": False,
            "scheduling_strategy": self.scheduling_strategy}
        if runtime_env:
            options["runtime_env"] = runtime_env
        # Decorated with num_gpus so that Ray's default for GPU tasks applies: a fresh
        # worker process per task (max_calls=1), never one that initialised another GPU.
        self._remote = ray.remote(**options)(_run_task)
        return self

    def close(self) -> None:
        """Disconnects from Ray, or stops the local instance, if start() did either."""
        if self._ray is not None and self._started_ray and self._ray.is_initialized():
            self._ray.shutdown()
        self._ray = None
        self._remote = None
        self._started_ray = False

    def __enter__(self) -> RayExecutor:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    # -- checks

    def check_output_folder(self, folder: str | os.PathLike, timeout_s: float = 120.0) -> Path:
        """Checks that the driver and every live node can write the same `folder`.

        The driver creates `folder` and a probe file in it; one tiny task per live node
        (no CPU reserved, so it runs on busy and CPU-less nodes too) checks that it
        sees that file, writes and reads back its own, and removes it. Nodes that join
        later (autoscaling) are not checked.

        Returns:
          The absolute folder.

        Raises:
          OutputFolderError: one line naming the first node (and how many more) that
            cannot use the folder, or the driver itself.
        """
        self.start()
        ray = self._ray
        path = Path(folder).expanduser().absolute()
        token = uuid.uuid4().hex
        marker = path / f"{PROBE_PREFIX}{token}"
        try:
            path.mkdir(parents=True, exist_ok=True)
            marker.write_text(token)
        except OSError as e:
            raise OutputFolderError(f"output folder {path} is not writable here "
                                    f"(driver): {e}") from e
        try:
            from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

            probe = ray.remote(num_cpus=0, max_retries=0)(_probe_folder)
            nodes = [n for n in ray.nodes() if n.get("Alive")]
            refs = {}
            for node in nodes:
                options = {"scheduling_strategy": NodeAffinitySchedulingStrategy(
                    node_id=node["NodeID"], soft=False)}
                if self.runtime_env:
                    options["runtime_env"] = self.runtime_env
                ref = probe.options(**options).remote(str(path), token)
                refs[ref] = node.get("NodeManagerAddress", node["NodeID"][:8])
            ready, late = ray.wait(list(refs), num_returns=len(refs), timeout=timeout_s)
            problems = [f"node {refs[r]}: no answer within {timeout_s:g} s" for r in late]
            for r in ready:
                try:
                    why = ray.get(r)
                except Exception as e:  # noqa: BLE001 - any failure of the probe is a problem
                    why = f"probe failed: {type(e).__name__}: {_first_line(e)}"
                if why:
                    problems.append(f"node {refs[r]}: {why}")
            for r in late:
                ray.cancel(r, force=True)
        finally:
            try:
                marker.unlink()
            except OSError:
                pass
        if problems:
            more = f" (and {len(problems) - 1} more nodes)" if len(problems) > 1 else ""
            raise OutputFolderError(f"output folder not usable from every node: "
                                    f"{sorted(problems)[0]}{more}")
        return path

    # -- running

    def capacity(self) -> int:
        """How many tasks the live nodes can run at once (`task_slots`), at least 1."""
        self.start()
        return max(1, task_slots(self._ray.nodes(), num_cpus=self.num_cpus_per_task,
                                 num_gpus=self.num_gpus_per_task))

    def imap_unordered(self, fn: Callable[[T], R], tasks: Iterable[T]
                       ) -> Iterator[tuple[int, R | dict[str, Any]]]:
        """Yields (index into tasks, result) for every task, in order of completion.

        The result is fn(task), or `worker_failure(...)` when the task's worker died
        on every attempt, or `exception_failure(...)` when fn raised. Tasks are
        submitted in order, at most `max_in_flight` unfinished at a time (by default
        the cluster's current capacity, re-read as results arrive). When the caller
        stops early (break, exception), the tasks in flight are cancelled and the
        rest never start.
        """
        self.start()
        ray = self._ray
        from ray import exceptions as rex

        fn_ref = ray.put(fn)  # pickled once, not once per task
        todo = iter(enumerate(tasks))
        index: dict[Any, int] = {}  # in-flight ObjectRef -> task index
        window = self._window()
        window_read = time.monotonic()
        try:
            while True:
                while len(index) < window:
                    item = next(todo, None)
                    if item is None:
                        break
                    i, task = item
                    index[self._remote.remote(fn_ref, task, self.compilation_cache_dir)] = i
                if not index:
                    return
                ready, _ = ray.wait(list(index), num_returns=1)
                more, _ = ray.wait(list(index), num_returns=len(index), timeout=0)
                for ref in dict.fromkeys(ready + more):  # everything done already, in one go
                    try:
                        result = ray.get(ref)
                    except rex.RayTaskError as e:
                        cause = e.cause if isinstance(e.cause, BaseException) else e
                        result = exception_failure(cause, _task_traceback(e))
                    except rex.TaskCancelledError as e:
                        result = {"status": "failed", "error": "cancelled",
                                  "reason": f"cancelled: {_first_line(e)}"}
                    except rex.RayError as e:
                        result = worker_failure(e)
                    yield index.pop(ref), result
                if self.max_in_flight is None and time.monotonic() - window_read > 5.0:
                    window, window_read = self._window(), time.monotonic()  # nodes come and go
        finally:
            for ref in index:
                ray.cancel(ref, force=True)

    def _window(self) -> int | float:
        return self.capacity() if self.max_in_flight is None else self.max_in_flight

    def map_unordered(self, fn: Callable[[T], R], tasks: Sequence[T],
                      on_result: Callable[[T, R | dict[str, Any]], None] | None = None
                      ) -> list[R | dict[str, Any]]:
        """Runs fn on every task; calls on_result(task, result) as each one completes.

        Returns:
          The results in the order of `tasks` (see `imap_unordered` for failures).
        """
        tasks = list(tasks)
        results: list[Any] = [None] * len(tasks)
        for i, result in self.imap_unordered(fn, tasks):
            results[i] = result
            if on_result is not None:
                on_result(tasks[i], result)
        return results


def _task_traceback(e: BaseException) -> str | None:
    """The remote traceback Ray attached to a RayTaskError (its message), trimmed."""
    text = str(e).strip()
    if not text:
        return None
    lines = text.splitlines()
    return "\n".join(lines[-12:]) if len(lines) > 12 else text

