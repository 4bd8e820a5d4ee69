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

--work=scenes runs real dpjax scenes instead (`run_scenes`): a folder of synthetic DP
pairs of mixed sizes (rendered by `dpjax.synthetic` through a 2x2 parametric kernel
bank, 16-bit TIFF), solved with 4 layers, one pyramid level and --scene_iters steps
by the batch runner itself in these ways, each in fresh processes and timed from the
moment they are up (Python, JAX and dpjax imported):

- cache_cold / cache_warm: `runner.run(opts, executor=RayExecutor(...))` on the
  N-node cluster with an empty --compilation_cache_dir folder, then again in a new Ray
  job (new worker processes) with the folder the first run filled; per-scene times
  by frame size;
- static_round_robin: N processes, process k `runner.run(opts, process_index=k,
  process_count=N)`, i.e. `dpjax.batch.shard_scenes` (every N-th of the sorted names),
  each share solved serially; what the jax.distributed path does;
- ray: the runner on the cluster (dynamic, largest frames first, at most the
  cluster's capacity in flight), a new Ray job per repeat;
- local: one process, `runner.run(opts)`, every scene one after another;
- ray_serial: the runner on the cluster with max_in_flight=1 (one scene at a time,
  DEFAULT placement: the driver's node while it is idle): against local, Ray's cost
  per scene ("outside_scenes_s_per_scene": makespan minus the time inside the scenes,
  per scene).
All of them read compiled solvers from the cache the cold run wrote, so compilation
is (mostly) out of the comparison; each process still loads each shape once.

  python benchmarks/scheduling.py --work=scenes --workers=2 \
      --output=benchmarks/results/scheduling_scenes2.json

Numbers from a shared machine vary; compare the columns of one run.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from absl import app, flags
from common import emit

FLAGS = flags.FLAGS
flags.DEFINE_integer("workers", 2, "Workers (processes for static, CPUs for Ray).")
flags.DEFINE_enum("cluster", "nodes", ["nodes", "local"], "Ray: N one-CPU nodes or one "
                  "N-CPU node on this machine.")
flags.DEFINE_string("sizes", "4x400,6x120,14x30",
                    "Task mix as COUNTxSIZE,... (size = passes of np.sin over 1e5 doubles, "
                    "1-3 ms each); shuffled with --seed.")
flags.DEFINE_enum("work", "cpu", ["cpu", "sleep", "scenes"], "Task body: CPU-bound numpy, "
                  "a sleep of the same nominal length (scheduling without core contention), "
                  "or real dpjax scenes solved by the batch runner (--scene_*).")
flags.DEFINE_string("scene_sizes", "2x192x256,4x128x160,8x64x64",
                    "--work=scenes: the scene mix as COUNTxHxW,... (H, W even); names "
                    "shuffled with --seed.")
flags.DEFINE_integer("scene_iters", 20, "--work=scenes: solver steps per scene (4 layers, "
                     "one level).")
flags.DEFINE_string("scene_dir", "", "--work=scenes: work folder (inputs, outputs, the "
                    "compilation cache); default a temporary folder, removed at the end.")
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


def extrapolate(cost_by_size: dict[str, float], mix: dict[str, int], hosts=(2, 4, 8, 16, 32, 64),
                scenes_per_host: int = 25, overhead_s: float = 0.0, seed: int = 0) -> dict:
    """Simulated makespans on N hosts for a batch of scenes_per_host * N scenes drawn
    with the proportions of `mix` and the per-scene costs `cost_by_size` (steady state):
    static round-robin shards of a random order (median and 90th percentile over 200
    orders) against greedy largest-first (what the runner on Ray does), each Ray scene
    costing overhead_s more; lower bound max(total / N, largest)."""
    rng = np.random.default_rng(seed)
    sizes = [s for s, c in mix.items() for _ in range(c)]
    out = {}
    for n in hosts:
        m = scenes_per_host * n
        costs = [cost_by_size[s] for s in rng.choice(sizes, size=m)]
        static = [static_makespan(list(rng.permutation(costs)), n) for _ in range(200)]
        lpt = greedy_makespan(sorted((c + overhead_s for c in costs), reverse=True), n)
        bound = max(sum(costs) / n, max(costs))
        out[str(n)] = {"scenes": m, "lower_bound_s": round(bound, 2),
                       "static_median_s": round(float(np.median(static)), 2),
                       "static_p90_s": round(float(np.percentile(static, 90)), 2),
                       "ray_largest_first_s": round(lpt, 2)}
    return out


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
    if FLAGS.work == "scenes":
        return run_scenes()
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
    emit(result, FLAGS.output)



# ----------------------------------------------------------------------------------------
# Real scenes through the batch runner


def write_scenes(folder: Path, spec: str, seed: int) -> dict[str, tuple[int, int]]:
    """Synthetic DP pairs NAME_{left,right}.tif of the sizes in spec; {name: (H, W)}."""
    import tifffile

    import dpjax
    from dpjax import synthetic

    shapes = []
    for part in spec.split(","):
        count, h, w = (int(v) for v in part.lower().split("x"))
        shapes += [(h, w)] * count
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(shapes))  # names in random order of size
    pair = dpjax.parametric_dp_kernels(radius=3.0, ramp=0.5, smooth_sigma=0.7)
    kernels = np.repeat(pair[:, None], 4, axis=1)  # [2, T=4, K, K]
    folder.mkdir(parents=True, exist_ok=True)
    scenes = {}
    for i, j in enumerate(order):
        h, w = shapes[j]
        bank = dpjax.KernelBank.create(kernels, rows=2, cols=2, tile_h=h // 2, tile_w=w // 2)
        views = synthetic.make_scene(rng, bank).views[..., 0]  # [2, H, W]
        name = f"s{i:02d}"
        for side, v in zip(("left", "right"), views):
            tifffile.imwrite(folder / f"{name}_{side}.tif",
                             (np.clip(v, 0.0, 1.0) * 60000).astype(np.uint16))
        scenes[name] = (h, w)
    return scenes


def scene_options(inp: Path, out: Path, iters: int):
    """The runner's options: 4 layers, one level, `iters` steps, no preset, 2x2
    parametric kernels (as run_solver.py --grid=2x2 --kernel_radius=3 --preset=none)."""
    from dpjax import presets, runner
    from dpjax.config import Config, schedule
    from dpjax.scene import KernelOptions, SceneOptions

    cfg = Config(solver=schedule(pyramid_levels=1, num_iters=iters))
    base = presets.resolve_base("none", cfg.replace(**{"mpi.num_layers": 4}))
    return runner.RunOptions(
        input_dir=inp, output_dir=out,
        scene=SceneOptions(base=base, preset="none", input_dir=inp),
        kernels=KernelOptions(kind="parametric", grid=(2, 2), radius=3.0))


def _records(summary: dict, arrival: list[str] | None = None) -> list[dict]:
    """Per scene: status, who ran it ("worker" HOST:PID on Ray, else "process"), its
    time inside run_scene, and "order": its place among the scenes its worker ran
    (arrival order on Ray, where a worker runs one scene at a time; name order in a
    process, which solves its share sorted by name)."""
    keep = ("scene", "status", "worker", "process")
    place = {name: i for i, name in enumerate(arrival or sorted(
        r["scene"] for r in summary["scenes"]))}
    return [{**{k: r[k] for k in keep if k in r}, "order": place[r["scene"]],
             "total_s": round(r.get("timings", {}).get("total_s", float("nan")), 3)}
            for r in summary["scenes"]]


def _runner_process(opts, k: int, n: int, cache: str, ready, start, out) -> None:
    """One static-sharding (or, n = 1, local) process: imports, then waits for start."""
    import jax

    from dpjax import batch, runner

    batch.use_compilation_cache(cache)
    jax.devices()
    ready.put(k)
    start.wait()
    t0 = time.time()
    outcome = runner.run(opts, process_index=k, process_count=n)
    out.put((k, t0, time.time(), outcome.exit_status, _records(outcome.summary)))


def run_processes(opts, n: int, cache: Path) -> dict:
    """N processes running their shares (n = 1: the local executor, one process)."""
    ctx = mp.get_context("spawn")
    ready, start, out = ctx.Queue(), ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_runner_process, args=(opts, k, n, str(cache), ready,
                                                       start, out)) for k in range(n)]
    for p in procs:
        p.start()
    for _ in procs:
        ready.get(timeout=600)
    start.set()
    done = [out.get(timeout=1800) for _ in procs]
    for p in procs:
        p.join()
    if any(status != 0 for _, _, _, status, _ in done):
        raise RuntimeError(f"a process failed: {done}")
    makespan = max(e for _, _, e, _, _ in done) - min(s for _, s, _, _, _ in done)
    return {"makespan_s": makespan, "records": [r for *_, recs in done for r in recs]}


def _warm(seconds: float) -> int:
    """A Ray task that imports JAX and dpjax's runner, then holds its node a moment."""
    import jax

    from dpjax import runner  # noqa: F401

    jax.devices()
    time.sleep(seconds)
    return os.getpid()


def run_ray_job(address: str, opts, n: int, cache: Path, **executor_options) -> dict:
    """The runner on the cluster in a new Ray job (new worker processes)."""
    import ray

    from dpjax import runner
    from dpjax.ray_executor import RayExecutor

    ray.init(address=address, log_to_driver=False)
    try:
        with RayExecutor(compilation_cache_dir=cache, max_retries=1,
                         **executor_options) as ex:
            ex.map_unordered(_warm, [1.0] * n)  # a worker on every node, imports done
            arrival: list[str] = []
            t0 = time.perf_counter()
            outcome = runner.run(opts, executor=ex, on_event=lambda e: arrival.append(
                e.scene) if e.kind == "scene" else None)
            makespan = time.perf_counter() - t0
    finally:
        ray.shutdown()
    if outcome.exit_status != 0:
        raise RuntimeError(f"ray run failed: {outcome.summary.get('scenes')}")
    return {"makespan_s": makespan, "records": _records(outcome.summary, arrival)}


def run_scenes() -> None:
    n = FLAGS.workers
    t_all = time.perf_counter()
    own_dir = not FLAGS.scene_dir
    work = Path(FLAGS.scene_dir or tempfile.mkdtemp(prefix="dpjax-sched-"))
    inp, cache = work / "in", work / "jax_cache"
    for sub in ("in", "out", "jax_cache"):
        shutil.rmtree(work / sub, ignore_errors=True)
    scenes = write_scenes(inp, FLAGS.scene_sizes, FLAGS.seed)

    def opts(label: str):
        return scene_options(inp, work / "out" / label, FLAGS.scene_iters)

    import ray
    from ray.cluster_utils import Cluster

    t = time.perf_counter()
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "include_dashboard": False, "object_store_memory": 80 * 2**20})
    for _ in range(n - 1):
        cluster.add_node(num_cpus=1, object_store_memory=80 * 2**20)
    cluster.wait_for_nodes()
    ray_start_s = time.perf_counter() - t
    runs: dict[str, list[dict]] = {k: [] for k in ("static_round_robin", "ray", "local",
                                                   "ray_serial")}
    try:
        cold = run_ray_job(cluster.address, opts("cache_cold"), n, cache)
        warm = run_ray_job(cluster.address, opts("cache_warm"), n, cache)
        for r in range(FLAGS.repeats):
            runs["static_round_robin"].append(run_processes(opts(f"static{r}"), n, cache))
            runs["ray"].append(run_ray_job(cluster.address, opts(f"ray{r}"), n, cache))
            runs["local"].append(run_processes(opts(f"local{r}"), 1, cache))
            # DEFAULT placement keeps the lone scene on the driver's (idle) node, so that
            # one worker process loads each shape once, as the local process does.
            runs["ray_serial"].append(run_ray_job(cluster.address, opts(f"serial{r}"), n,
                                                  cache, max_in_flight=1,
                                                  scheduling_strategy="DEFAULT"))
    finally:
        if ray.is_initialized():
            ray.shutdown()
        cluster.shutdown()

    names = sorted(scenes)
    size = {name: f"{h}x{w}" for name, (h, w) in scenes.items()}

    def by_shape(runs_records: list[list[dict]]) -> dict[str, dict[str, float]]:
        """Median scene time by frame size over runs: "first" of that size in its worker
        process (JAX traces the solver and compiles it or loads it from the persistent
        cache), and "repeat" (compiled in memory)."""
        first: dict[str, list[float]] = {}
        repeat: dict[str, list[float]] = {}
        for records in runs_records:
            seen = set()
            for rec in sorted(records, key=lambda r: r["order"]):
                key = (rec.get("worker", rec.get("process")), size[rec["scene"]])
                (repeat if key in seen else first).setdefault(key[1], []).append(
                    rec["total_s"])
                seen.add(key)
        return {shape: {"first": round(float(np.median(first[shape])), 2),
                        "repeat": (round(float(np.median(repeat[shape])), 2)
                                   if shape in repeat else None)}
                for shape in sorted(first)}

    def summary(pairs: list[dict], workers: int) -> dict:
        task_s = [sum(rec["total_s"] for rec in p["records"]) for p in pairs]
        return {
            "makespan_s": [round(p["makespan_s"], 2) for p in pairs],
            "task_seconds": [round(t, 2) for t in task_s],
            # The workers' time inside scenes over their time available.
            "busy_fraction": [round(t / (workers * p["makespan_s"]), 3)
                              for p, t in zip(pairs, task_s)],
            # What the run spent per scene outside the scenes themselves (submission,
            # scheduling, results back, summary writes; idle workers with N > 1).
            "outside_scenes_s_per_scene": [
                round((workers * p["makespan_s"] - t) / len(names), 3)
                for p, t in zip(pairs, task_s)],
            "scenes_per_worker": [sorted(
                np.unique([rec.get("worker", rec.get("process")) for rec in p["records"]],
                          return_counts=True)[1].tolist()) for p in pairs],
            "median_scene_s_by_size": by_shape([p["records"] for p in pairs])}

    local_costs = {}
    for rec in runs["local"][-1]["records"]:
        local_costs[rec["scene"]] = rec["total_s"]
    costs = [local_costs[name] for name in names]  # in the static shards' order
    total = sum(costs)
    rng = np.random.default_rng(1)
    random_static = [static_makespan(list(rng.permutation(costs)), n) for _ in range(1000)]
    result = {
        "benchmark": "scheduling", "work": "scenes",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "loadavg_at_end": [round(v, 2) for v in os.getloadavg()]},
        "workers": n, "cluster": f"{n} one-CPU Ray nodes on this machine",
        "scenes": {name: size[name] for name in names}, "scene_sizes": FLAGS.scene_sizes,
        "scene_iters": FLAGS.scene_iters, "layers": 4, "pyramid_levels": 1,
        "seed": FLAGS.seed, "repeats": FLAGS.repeats,
        "compilation_cache": {
            "cold": {"makespan_s": round(cold["makespan_s"], 2),
                     "median_scene_s_by_size": by_shape([cold["records"]]),
                     "task_seconds": round(sum(r["total_s"] for r in cold["records"]), 2)},
            "warm": {"makespan_s": round(warm["makespan_s"], 2),
                     "median_scene_s_by_size": by_shape([warm["records"]]),
                     "task_seconds": round(sum(r["total_s"] for r in warm["records"]), 2)},
            "entries": sum(1 for _ in cache.rglob("*") if _.is_file())},
        "measured": {
            "static_round_robin": summary(runs["static_round_robin"], n),
            "ray": summary(runs["ray"], n),
            "local": summary(runs["local"], 1),
            "ray_serial": summary(runs["ray_serial"], 1)},
        "simulated_from_local_scene_s": {
            "total": round(total, 2),
            "static_round_robin": round(static_makespan(costs, n), 2),
            "greedy_largest_first": round(greedy_makespan(sorted(costs, reverse=True), n), 2),
            "lower_bound": round(max(total / n, max(costs)), 2),
            "static_round_robin_random_orders": {
                "median": round(float(np.median(random_static)), 2),
                "p90": round(float(np.percentile(random_static, 90)), 2),
                "max": round(float(np.max(random_static)), 2)}},
        "ray_start_s": round(ray_start_s, 1),
        "wall_s": round(time.perf_counter() - t_all, 1),
        # Every run's scenes: [scene, who ran it, order on that worker, seconds].
        "records": {name: [[[r["scene"], r.get("worker", r.get("process")), r["order"],
                             r["total_s"]] for r in sorted(p["records"],
                                                           key=lambda r: r["scene"])]
                           for p in pairs]
                    for name, pairs in {"cache_cold": [cold], "cache_warm": [warm],
                                        **runs}.items()},
    }
    # N hosts: the local runs' steady-state scene costs by size (compiled in memory),
    # the mix's proportions, Ray's measured extra cost per scene.
    steady = {k: v["repeat"] if v["repeat"] is not None else v["first"]
              for k, v in result["measured"]["local"]["median_scene_s_by_size"].items()}
    mix: dict[str, int] = {}
    for shape in size.values():
        mix[shape] = mix.get(shape, 0) + 1
    extra = max(0.0, float(np.median(result["measured"]["ray_serial"][
        "outside_scenes_s_per_scene"])) - float(np.median(result["measured"]["local"][
            "outside_scenes_s_per_scene"])))
    result["extrapolated_n_hosts"] = {
        "scene_s_by_size": steady, "ray_overhead_s_per_scene": round(extra, 3),
        "makespans": extrapolate(steady, mix, overhead_s=extra),
        # The same mix with scenes 100 times longer (tens of seconds to minutes, as
        # full frames), Ray's overhead per scene unchanged.
        "makespans_scenes_x100": extrapolate({k: 100 * v for k, v in steady.items()}, mix,
                                             overhead_s=extra)}
    if own_dir:
        shutil.rmtree(work, ignore_errors=True)
    emit(result, FLAGS.output)


if __name__ == "__main__":
    app.run(main)
