"""Scheduling: static round-robin shards vs Ray's dynamic scheduling, and Ray's overhead.

A batch of tasks with mixed durations (a synthetic CPU-bound function whose cost is
proportional to a "size": `size` passes of np.sin over 10^5 doubles, single-threaded)
runs on N workers in several ways, each timed from the moment the workers are up:

- static_round_robin: N processes, process k runs tasks k, k+N, k+2N, ... one after
  another (what run_solver.py's jax.distributed sharding does with scenes today);
- ray_all_default / ray_all_spread: `RayExecutor` with every task submitted at once
  (max_in_flight = number of tasks), Ray's DEFAULT or SPREAD placement;
- ray_window: `RayExecutor`'s default, at most as many tasks in flight as the cluster
  runs at once, SPREAD placement;
- ray_window_largest_first: the same with the tasks sorted largest first (a driver
  could sort scenes by an estimated cost, e.g. `dpjax.batch.estimate_solve_memory`).

Ray runs on --cluster=nodes: N single-CPU Ray nodes on this machine (separate raylets,
as N one-worker machines would be; `ray.cluster_utils.Cluster`), or --cluster=local:
one Ray node with N CPUs.

The variants run --repeats times, interleaved. Each run reports its makespan and its
busy fraction: the seconds spent inside tasks (timed in the workers) over N times
the makespan, i.e. how little the workers idled; on a loaded machine the makespans
drift with the load, the busy fraction less.

It also reports each task's cost run locally in this process (the reference), the
makespans a perfect scheduler would reach with those costs (simulated: static shards,
greedy in order, greedy largest-first, and the lower bound max(total / N, largest)),
how unlucky the given order is for static sharding (the simulated static makespan
over 1000 random orders of the same tasks), and Ray's per-task overhead: the
round trip of an empty task (submit, run, get, one at a time, including the
executor's capacity look-up) and the time per task of many empty tasks, against
calling the function locally.

  python benchmarks/scheduling.py --workers=2 --output=benchmarks/results/scheduling_cpu2.json
  python benchmarks/scheduling.py --workers=3 --work=sleep \
      --output=benchmarks/results/scheduling_sleep3.json

Later the function can be switched to real small dpjax scenes (TODO).
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
flags.DEFINE_enum("cluster", "nodes", ["nodes", "local"], "Ray: N one-CPU nodes or one "
                  "N-CPU node on this machine.")
flags.DEFINE_string("sizes", "4x400,6x120,14x30",
                    "Task mix as COUNTxSIZE,... (size = passes of np.sin over 1e5 doubles, "
                    "1-3 ms each); shuffled with --seed.")
flags.DEFINE_enum("work", "cpu", ["cpu", "sleep"], "Task body: CPU-bound numpy, or a sleep "
                  "of the same nominal length (scheduling without core contention).")
flags.DEFINE_integer("seed", 0, "Shuffle seed of the task order.")
flags.DEFINE_integer("repeats", 2, "Rounds of all variants, interleaved so that a change "
                     "in the machine's load hits every one.")
flags.DEFINE_integer("overhead_tasks", 50, "Empty tasks for the overhead measurement.")
flags.DEFINE_string("output", "", "Also write the JSON here.")

VECTOR = 100_000
SLEEP_UNIT_S = 0.003  # about one np.sin pass on this machine


def synthetic_task(task: dict) -> dict:
    """Work proportional to task["size"]; returns a record like the runner's.

    task["work"] "cpu": `size` passes of np.sin over 10^5 doubles (single-threaded);
    "sleep": sleeps `size` * SLEEP_UNIT_S (scheduling alone, without the workers
    competing for this machine's cores).
    """
    t0 = time.perf_counter()
    checksum = 0.0
    if task.get("work", "cpu") == "sleep":
        time.sleep(task["size"] * SLEEP_UNIT_S)
    else:
        x = np.linspace(0.0, 1.0, VECTOR)
        for _ in range(int(task["size"])):
            x = np.sin(x) + 0.5
        checksum = float(x[0])
    return {"scene": task["name"], "status": "done", "seconds": time.perf_counter() - t0,
            "pid": os.getpid(), "checksum": checksum}


def make_tasks(spec: str, seed: int, work: str = "cpu") -> list[dict]:
    sizes = []
    for part in spec.split(","):
        count, size = part.lower().split("x")
        sizes += [int(size)] * int(count)
    order = np.random.default_rng(seed).permutation(len(sizes))
    return [{"name": f"t{i:02d}", "size": sizes[j], "work": work}
            for i, j in enumerate(order)]


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
    tasks = make_tasks(FLAGS.sizes, FLAGS.seed, FLAGS.work)
    t_all = time.perf_counter()

    # Reference: every task run locally, one after another (warm numpy).
    synthetic_task({"name": "warm", "size": 5})
    local = {t["name"]: synthetic_task(t)["seconds"] for t in tasks}
    costs = [local[t["name"]] for t in tasks]
    rng = np.random.default_rng(1)
    random_static = [static_makespan(list(rng.permutation(costs)), n) for _ in range(1000)]

    import ray

    from dpjax.ray_executor import RayExecutor

    lpt = sorted(tasks, key=lambda task: -task["size"])
    variants = {  # name: (executor options, task order)
        "ray_all_default": ({"max_in_flight": len(tasks), "scheduling_strategy": "DEFAULT"},
                            tasks),
        "ray_all_spread": ({"max_in_flight": len(tasks), "scheduling_strategy": "SPREAD"},
                           tasks),
        "ray_window": ({}, tasks),
        "ray_window_largest_first": ({}, lpt),
    }
    runs = {"static_round_robin": [], **{k: [] for k in variants}}
    t = time.perf_counter()
    cluster = None
    if FLAGS.cluster == "nodes":
        from ray.cluster_utils import Cluster

        cluster = Cluster(initialize_head=True, head_node_args={
            "num_cpus": 1, "include_dashboard": False, "object_store_memory": 80 * 2**20})
        for _ in range(n - 1):
            cluster.add_node(num_cpus=1, object_store_memory=80 * 2**20)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False)
    else:
        ray.init(num_cpus=n, include_dashboard=False, log_to_driver=False)
    ray_init_s = time.perf_counter() - t
    try:
        with RayExecutor(max_retries=1) as ex:
            t = time.perf_counter()
            ex.map_unordered(time.sleep, [1.0] * n)  # a worker on every node (imports dpjax)
            ray_warmup_s = time.perf_counter() - t
            overhead = ray_overhead(ex, FLAGS.overhead_tasks)
        for _ in range(FLAGS.repeats):
            runs["static_round_robin"].append(run_static(tasks, n))
            for name, (options, order) in variants.items():
                with RayExecutor(max_retries=1, **options) as ex:
                    runs[name].append(run_ray(ex, order))
    finally:
        ray.shutdown()
        if cluster is not None:
            cluster.shutdown()

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
        "workers": n, "cluster": FLAGS.cluster, "work": FLAGS.work, "num_tasks": len(tasks),
        "sizes": FLAGS.sizes, "seed": FLAGS.seed,
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
