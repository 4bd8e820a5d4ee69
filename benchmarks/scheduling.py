"""Scheduling: static round-robin shards vs Ray's dynamic scheduling, and Ray's overhead.

A batch of tasks with mixed durations (a synthetic CPU-bound function whose cost is
proportional to a "size": `size` passes of np.sin over 10^5 doubles, single-threaded)
runs on N workers in three ways, each timed from the moment the workers are up:

- static: N processes, process k runs tasks k, k+N, k+2N, ... one after another
  (what run_solver.py's jax.distributed sharding does with scenes today);
- ray: `RayExecutor` on a local Ray instance with N CPUs, tasks in the given order
  (each starts on whichever worker frees up first);
- ray_lpt: the same with the tasks sorted largest first (a driver could sort scenes
  by their estimated cost, e.g. `dpjax.batch.estimate_solve_memory`).

The three run --repeats times, interleaved. Each run reports its makespan and its
busy fraction: the seconds spent inside tasks (timed in the workers) over N times
the makespan, i.e. how little the workers idled; on a loaded machine the makespans
drift with the load, the busy fraction much less.

It also reports each task's cost run locally in this process (the reference), the
makespans a perfect scheduler would reach with those costs (simulated: static shards,
greedy in order, greedy largest-first, and the lower bound max(total / N, largest)),
how unlucky the given order is for static sharding (the simulated static makespan
over 1000 random orders of the same tasks), and Ray's per-task overhead: the
round-trip of an empty task (submit, run, get, one at a time) and the throughput of
many empty tasks submitted at once, against calling the function locally.

  python benchmarks/scheduling.py --workers=2 --output=benchmarks/results/scheduling_cpu2.json

Later the function can be switched to real small dpjax scenes (`--fn`, TODO).
Numbers from a shared machine vary; compare the columns of one run.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import platform
import time

import numpy as np
from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_integer("workers", 2, "Workers (processes for static, CPUs for Ray).")
flags.DEFINE_string("sizes", "4x400,6x120,14x30",
                    "Task mix as COUNTxSIZE,... (size = passes of np.sin over 1e5 doubles, "
                    "about 1 ms each on an idle core); shuffled with --seed.")
flags.DEFINE_integer("seed", 0, "Shuffle seed of the task order.")
flags.DEFINE_integer("repeats", 2, "Rounds of (static, ray, ray largest first), interleaved "
                     "so that a change in the machine's load hits every method.")
flags.DEFINE_integer("overhead_tasks", 50, "Empty tasks for the overhead measurement.")
flags.DEFINE_string("output", "", "Also write the JSON here.")

VECTOR = 100_000


def synthetic_task(task: dict) -> dict:
    """CPU-bound work proportional to task["size"]; returns a record like the runner's."""
    t0 = time.perf_counter()
    x = np.linspace(0.0, 1.0, VECTOR)
    for _ in range(int(task["size"])):
        x = np.sin(x) + 0.5
    return {"scene": task["name"], "status": "done", "seconds": time.perf_counter() - t0,
            "pid": os.getpid(), "checksum": float(x[0])}


def make_tasks(spec: str, seed: int) -> list[dict]:
    sizes = []
    for part in spec.split(","):
        count, size = part.lower().split("x")
        sizes += [int(size)] * int(count)
    order = np.random.default_rng(seed).permutation(len(sizes))
    return [{"name": f"t{i:02d}", "size": sizes[j]} for i, j in enumerate(order)]


# ----------------------------------------------------------------------------------------
# Simulated makespans from known costs


def static_makespan(costs: list[float], n: int) -> float:
    return max(sum(costs[k::n]) for k in range(n))


def greedy_makespan(costs: list[float], n: int) -> float:
    """Each task in order starts on the worker that frees up first (list scheduling)."""
    free = [0.0] * n
    for c in costs:
        k = int(np.argmin(free))
        free[k] += c
    return max(free)


# ----------------------------------------------------------------------------------------
# Static round-robin with real processes


def _shard_worker(shard: list[dict], start, out) -> None:
    start.wait()
    t0 = time.time()
    busy = sum(synthetic_task(task)["seconds"] for task in shard)
    out.put((t0, time.time(), busy))


def run_static(tasks: list[dict], n: int) -> tuple[float, float]:
    """(makespan, seconds spent in tasks summed over the workers)."""
    ctx = mp.get_context("spawn")
    start, out = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_shard_worker, args=(tasks[k::n], start, out))
             for k in range(n)]
    for p in procs:
        p.start()
    time.sleep(3.0)  # let the spawned interpreters import numpy before the clock starts
    start.set()
    spans = [out.get() for _ in procs]
    for p in procs:
        p.join()
    return max(e for _, e, _ in spans) - min(s for s, _, _ in spans), sum(b for *_, b in spans)


# ----------------------------------------------------------------------------------------
# Ray


def _noop(task):
    return task


def run_ray(ex, tasks: list[dict]) -> tuple[float, float]:
    """(makespan, seconds spent in tasks summed over the workers)."""
    t0 = time.perf_counter()
    results = ex.map_unordered(synthetic_task, tasks)
    makespan = time.perf_counter() - t0
    bad = [r for r in results if r.get("status") != "done"]
    if bad:
        raise RuntimeError(f"ray tasks failed: {bad[:2]}")
    return makespan, sum(r["seconds"] for r in results)


def ray_overhead(ex, m: int) -> dict:
    import ray

    t = time.perf_counter()
    for i in range(m):
        _noop(i)
    local_us = (time.perf_counter() - t) / m * 1e6
    # One at a time: the round trip of one task.
    one = []
    for i in range(m):
        t = time.perf_counter()
        ex.map_unordered(_noop, [i])
        one.append(time.perf_counter() - t)
    # All at once: throughput over the workers.
    t = time.perf_counter()
    ex.map_unordered(_noop, list(range(m)))
    burst = time.perf_counter() - t
    return {"local_call_us": round(local_us, 3),
            "ray_round_trip_ms_median": round(float(np.median(one)) * 1e3, 2),
            "ray_round_trip_ms_p90": round(float(np.percentile(one, 90)) * 1e3, 2),
            "ray_burst_ms_per_task": round(burst / m * 1e3, 2),
            "tasks": m, "ray_version": ray.__version__}


def main(argv):
    del argv
    n = FLAGS.workers
    tasks = make_tasks(FLAGS.sizes, FLAGS.seed)
    t_all = time.perf_counter()

    # Reference: every task run locally, one after another (warm numpy).
    synthetic_task({"name": "warm", "size": 5})
    local = {t["name"]: synthetic_task(t)["seconds"] for t in tasks}
    costs = [local[t["name"]] for t in tasks]
    rng = np.random.default_rng(1)
    random_static = [static_makespan(list(rng.permutation(costs)), n) for _ in range(1000)]

    import ray

    from dpjax.ray_executor import RayExecutor

    runs = {"static_round_robin": [], "ray_dynamic": [], "ray_dynamic_largest_first": []}
    lpt = sorted(tasks, key=lambda task: -task["size"])
    t = time.perf_counter()
    ray.init(num_cpus=n, include_dashboard=False, log_to_driver=False)
    ray_init_s = time.perf_counter() - t
    with RayExecutor(max_retries=1, num_cpus_per_task=1) as ex:
        t = time.perf_counter()
        ex.map_unordered(_noop, list(range(n)))  # start the N workers (imports dpjax)
        ray_warmup_s = time.perf_counter() - t
        for _ in range(FLAGS.repeats):
            runs["static_round_robin"].append(run_static(tasks, n))
            runs["ray_dynamic"].append(run_ray(ex, tasks))
            runs["ray_dynamic_largest_first"].append(run_ray(ex, lpt))
        overhead = ray_overhead(ex, FLAGS.overhead_tasks)
    ray.shutdown()

    def summary(pairs):
        # busy: the fraction of the N workers' time spent inside tasks (1 = no idle
        # worker and no overhead); robust to the machine's load, unlike the makespan.
        return {"makespan_s": [round(m, 3) for m, _ in pairs],
                "busy_fraction": [round(b / (n * m), 3) for m, b in pairs],
                "task_seconds": [round(b, 3) for _, b in pairs]}

    total = sum(costs)
    result = {
        "benchmark": "scheduling",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "loadavg_at_end": [round(v, 2) for v in os.getloadavg()]},
        "workers": n, "num_tasks": len(tasks), "sizes": FLAGS.sizes, "seed": FLAGS.seed,
        "local_task_seconds": {"total": round(total, 3), "min": round(min(costs), 3),
                               "max": round(max(costs), 3)},
        "measured": {k: summary(v) for k, v in runs.items()},
        "simulated_makespan_s": {
            "static_round_robin": round(static_makespan(costs, n), 3),
            "greedy_in_order": round(greedy_makespan(costs, n), 3),
            "greedy_largest_first": round(greedy_makespan(sorted(costs, reverse=True), n), 3),
            "lower_bound": round(max(total / n, max(costs)), 3),
            "static_round_robin_random_orders": {
                "median": round(float(np.median(random_static)), 3),
                "p90": round(float(np.percentile(random_static, 90)), 3),
                "max": round(float(np.max(random_static)), 3)}},
        "ray_start_s": {"init": round(ray_init_s, 2), "first_tasks": round(ray_warmup_s, 2)},
        "ray_overhead": overhead,
        "wall_s": round(time.perf_counter() - t_all, 1),
    }
    text = json.dumps(result, indent=2)
    print(text)
    if FLAGS.output:
        with open(FLAGS.output, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    app.run(main)
