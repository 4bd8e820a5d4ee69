"""dpjax command line: the demo (no flags), or batch solving of a folder of DP pairs.

  python run_solver.py                      # demo -> ./dpjax_out/demo/
  python run_solver.py --input_dir=IN --output_dir=OUT [--calib_dir=CAL] [--preset=auto]
      [--num_iters=N] [--scenes=a,b] [--overwrite] [--batch_size=B] [--memory_budget_gb=G]
      [--blocks=RxC]
      [--coordinator_address=HOST:PORT --num_processes=N --process_id=K]
  python run_solver.py --input_dir=IN --output_dir=OUT --method=dpanet [--dpanet_checkpoint=C]

The demo renders a synthetic scene with known ground truth (textured layers with
occlusions, 256x320 px, 2x2 kernel tiles) through the parametric kernels stored in
calib_data/parametric_2x2, solves it, and writes all_in_focus.{tif,png},
defocus_map.{tif,png} and result.json (metrics of the estimate and of the input).

Batch mode is `dpjax.runner.run` (docs/batch.md): this file only turns flags into
`RunOptions`, shows progress (dpjax_apps.display) and returns the exit status: 0 every
scene of this run done or skipped, 1 some failed, 2 the run could not start, 130
interrupted, 143 terminated (SIGTERM).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from absl import app, flags, logging

from dpjax_apps import flags as common

FLAGS = flags.FLAGS

# dpjax is imported lazily (`_load_dpjax`): importing it initialises the XLA backend
# (dpjax.losses builds a jnp constant at import time), and jax.distributed.initialize
# must run before that happens.
dpjax = batch = io = outputs = pipeline = None


def _load_dpjax() -> None:
    global dpjax, batch, io, outputs, pipeline
    if dpjax is None:
        import dpjax as dpjax_
        from dpjax import batch as batch_
        from dpjax import io as io_
        from dpjax import outputs as outputs_
        from dpjax import pipeline as pipeline_
        dpjax, batch, io, outputs, pipeline = dpjax_, batch_, io_, outputs_, pipeline_


ROOT = Path(__file__).resolve().parent
DEMO_CALIB = ROOT / "calib_data" / "parametric_2x2"

# Flags that only make sense with --input_dir.
_BATCH_FLAGS = (
    "calib_dir", "preset", "range_probe", "search_init", "defocus_estimator", "scenes",
    "overwrite", "batch_size", "memory_budget_gb", "blocks", "quality", "optimizer",
    "pyramid_levels", "level_iters", "num_layers", "refine_iters", "black_level", "allow_8bit",
    "input_encoding", "prior_encoding", "recenter_kernels", "grid", "tile_size",
    "kernel_radius", "kernel_ramp", "kernel_smooth", "kernel_size", "crop", "kernels",
    "white_dir",
    "coordinator_address", "num_processes", "process_id", "distributed",
    "distributed_timeout_s", "thumb_size", "method", "dpanet_checkpoint", "dpanet_tile",
    "dpanet_overlap", "executor", "ray_address", "ray_max_retries", "ray_num_gpus",
    "ray_num_cpus", "ray_max_in_flight")


def _define_flags() -> None:
    """Flags are defined only when run as a program, so tests can import this module."""
    common.define_common(output_dir="dpjax_out")
    d = flags
    d.DEFINE_integer("seed", 0, "Seed of the demo scene.")
    d.DEFINE_string("input_dir", None, "Folder of DP pairs to solve (batch mode; without it "
                    "the demo runs).")
    d.DEFINE_enum("method", "mpi", ["mpi", "dpanet"], "mpi: the dpjax MPI solver (defocus "
                  "map and all-in-focus image); dpanet: a trained DPANet (all-in-focus only).")
    d.DEFINE_integer("batch_size", 1, "Solve up to this many same-size scenes together on "
                     "one device (dpjax.fit_batch; docs/batch.md).")
    d.DEFINE_float("memory_budget_gb", None, "Solve scenes whose estimated peak memory "
                   "exceeds this in overlapping blocks that fit it (docs/batch.md; default: "
                   "the device's memory; on CPU the host RAM divided by the number of local "
                   "devices).")
    d.DEFINE_string("blocks", None, "Solve every scene in an RxC split of overlapping "
                    "blocks of kernel tiles, whatever its memory (default: one block when "
                    "it fits --memory_budget_gb).")
    d.DEFINE_float("black_level", None, "Black level of the raw views (default: Pixel 1024, "
                   "PNG/TIFF 0; required for PGM).")
    d.DEFINE_bool("allow_8bit", False, "Accept 8-bit views (default: 16-bit expected).")
    d.DEFINE_enum("kernels", None, ["auto", "calibrated", "parametric"], "Where the blur "
                  "kernels come from: calibrated (--calib_dir), auto (estimated from the "
                  "pairs themselves before solving, written to OUTPUT/self_calibration/; "
                  "docs/own_camera.md) or parametric (the model of the flags below). "
                  "Default: calibrated with --calib_dir, parametric when a parametric flag "
                  "below is given, else auto.")
    d.DEFINE_string("white_dir", None, "Folder with white_sheet_{left,right}.png for the "
                    "Pixel vignetting correction (default: --calib_dir's, when it has them).")
    d.DEFINE_string("grid", None, "Parametric model: kernel tile grid RxC (default: tiles "
                    "of about 256 px).")
    d.DEFINE_integer("tile_size", None, "Parametric model: tile side in px; the image must "
                     "then match the grid (Pixel pairs are centre-cropped to it).")
    d.DEFINE_float("kernel_radius", 8.0, "Parametric model: aperture radius in px at "
                   "scale 1.")
    d.DEFINE_float("kernel_ramp", 0.5, "Parametric model: intensity ramp of the half disc.")
    d.DEFINE_float("kernel_smooth", 0.7, "Parametric model: Gaussian smoothing in px.")
    d.DEFINE_integer("kernel_size", None, "Parametric model: odd kernel side (default: "
                     "just large enough).")
    d.DEFINE_integer("thumb_size", 256, "Longest side of the gallery thumbnails.")
    # Ray.
    d.DEFINE_enum("executor", "local", ["local", "ray"], "local: this process solves the "
                  "scenes on its devices; ray: each scene is a task on a Ray cluster "
                  "(docs/ray.md; pip install 'dpjax[ray]'), this process writes the summary.")
    d.DEFINE_string("ray_address", None, "--executor=ray: the cluster (auto, HOST:PORT); "
                    "default Ray's own choice (RAY_ADDRESS, a cluster started on this "
                    "machine, else a new local instance).")
    d.DEFINE_integer("ray_max_retries", 3, "--executor=ray: extra attempts for a scene "
                     "whose worker dies (node lost, out of memory); a scene that fails on "
                     "its own merits is not retried.")
    d.DEFINE_float("ray_num_gpus", None, "--executor=ray: GPUs per scene (default: 1 on a "
                   "cluster with GPUs, else 0).")
    d.DEFINE_float("ray_num_cpus", 1.0, "--executor=ray: CPUs per scene.")
    d.DEFINE_integer("ray_max_in_flight", None, "--executor=ray: scenes submitted at once "
                     "(default: what the cluster can run; raise it on autoscaling clusters).")
    # Multi-host.
    d.DEFINE_string("coordinator_address", None, "HOST:PORT of process 0 for "
                    "jax.distributed.initialize (multi-host).")
    d.DEFINE_integer("num_processes", None, "Number of processes (multi-host).")
    d.DEFINE_integer("process_id", None, "This process's index (multi-host).")
    d.DEFINE_enum("distributed", "auto", ["auto", "on", "off"], "jax.distributed: on = "
                  "always initialize (missing flags auto-detected by JAX: SLURM, Open MPI, "
                  "Cloud TPU, ...); auto = when the flags above or a known cluster "
                  "environment are present; off = never.")
    d.DEFINE_integer("distributed_timeout_s", 300, "Seconds to wait for all processes.")


# ----------------------------------------------------------------------------------------
# Demo


def demo_config(num_iters: int | None) -> dpjax.Config:
    """One configuration for the demo: 12 layers, coarse-to-fine Adam."""
    cfg = dpjax.Config(
        mpi=dpjax.MpiConfig(num_layers=12, scale_min=0.0, scale_max=1.6),
        solver=dpjax.SolverConfig(num_iters=250, coarse_iters=250, pyramid_levels=2,
                                  chunk_size=50))
    if num_iters is not None:
        cfg = cfg.replace(**{"solver.num_iters": num_iters})
    return cfg


def run_demo() -> int:
    _load_dpjax()
    kernels = np.stack([np.load(DEMO_CALIB / "blur_kernels_left.npy"),
                        np.load(DEMO_CALIB / "blur_kernels_right.npy")])
    bank = dpjax.KernelBank.create(kernels, rows=2, cols=2, tile_h=128, tile_w=160)
    rng = np.random.default_rng(FLAGS.seed)
    scene = dpjax.make_scene(rng, bank, num_layers=4, scale_range=(0.15, 1.45), slope=2.0)
    cfg = demo_config(FLAGS.num_iters)
    out_dir = Path(FLAGS.output_dir) / "demo"

    def progress(p: dpjax.Progress):
        if not FLAGS.quiet:
            logging.info("level %d/%d  step %d/%d  loss %.4g  %.1fs", p.num_levels - p.level,
                         p.num_levels, p.step, p.num_steps, p.loss, p.elapsed_s)

    t0 = time.perf_counter()
    res, result = pipeline.solve_scene(
        scene.views, bank, cfg, out_dir, gt_all_in_focus=scene.all_in_focus,
        gt_defocus=scene.defocus, defocus_confidence=np.ones_like(scene.defocus),
        extra={"scene": "demo", "seed": FLAGS.seed, "scene_scales": scene.scales.tolist(),
               "kernels": str(DEMO_CALIB.relative_to(ROOT))}, callback=progress)
    m, i = result["metrics"], result["input_metrics"]
    from dpjax import figures  # imported here: dpjax loads lazily (_load_dpjax)
    figure = figures.write_figure(
        out_dir / "figure.png", views=scene.views, all_in_focus=np.asarray(res.all_in_focus),
        defocus=np.asarray(res.defocus), gt_all_in_focus=scene.all_in_focus,
        gt_defocus=scene.defocus, title="dpjax demo: a synthetic dual-pixel photo (dpjax sees "
        "only its two views; the truth is shown to compare)",
        notes=[*figures.score_notes(m, i), "", "Flat, textureless areas carry no blur",
               "cue: their defocus is a guess.", "",
               "files: *.tif (float32), *.png, result.json"])
    print(f"demo: {time.perf_counter() - t0:.0f}s  PSNR {i['psnr']:.2f} -> {m['psnr']:.2f} dB  "
          f"SSIM {i['ssim']:.3f} -> {m['ssim']:.3f}  defocus AIWE(1) {m['aiwe1']:.4f}  "
          f"1-|rho_s| {m['spearman']:.4f}  -> {out_dir}/  (look at {figure})")
    return 0


# ----------------------------------------------------------------------------------------
# Batch


_PARAMETRIC_FLAGS = ("grid", "tile_size", "kernel_radius", "kernel_ramp", "kernel_smooth",
                     "kernel_size")


def kernels_kind() -> str:
    """--kernels with its default resolved (UsageError for contradicting flags)."""
    given = [f"--{n}" for n in _PARAMETRIC_FLAGS if FLAGS[n].present]
    kind = FLAGS.kernels
    if kind is None:
        kind = "calibrated" if FLAGS.calib_dir else "parametric" if given else "auto"
    if given and kind != "parametric":
        raise app.UsageError(f"{', '.join(given)} set(s) the parametric kernel model: not "
                             f"with --kernels={kind}"
                             + (" (--calib_dir)" if FLAGS.calib_dir else ""))
    if (kind == "calibrated") != bool(FLAGS.calib_dir):
        raise app.UsageError("--kernels=calibrated needs --calib_dir" if kind == "calibrated"
                             else f"--calib_dir is not read with --kernels={kind} (for the "
                             "Pixel white sheets alone use --white_dir)")
    return kind


def run_options_from_flags():
    """`dpjax.runner.RunOptions` of the flags (UsageError for bad values)."""
    _load_dpjax()
    from dpjax import runner, scene

    base, linear_solver = common.base_configs()
    if FLAGS.method == "dpanet":  # no layers to start: the preset's search start is off
        if FLAGS.search_init:
            raise app.UsageError("--search_init needs --method=mpi (DPANet has no layers to "
                                 "initialise)")
        base = base.replace(**{"init.search": False})
    return runner.RunOptions(
        input_dir=Path(FLAGS.input_dir), output_dir=Path(FLAGS.output_dir),
        scene=scene.SceneOptions(
            base=base, preset=FLAGS.preset, range_probe=FLAGS.range_probe,
            black_level=FLAGS.black_level, allow_8bit=FLAGS.allow_8bit,
            encoding=common.input_encoding(), prior_encoding=common.prior_encoding(),
            linear_solver=linear_solver,
            crop_tiles=common.parse_rxc(FLAGS.crop, "crop"), input_dir=Path(FLAGS.input_dir),
            whole_frame=FLAGS.method == "dpanet",
            blocks=common.parse_rxc(FLAGS.blocks, "blocks")),
        kernels=scene.KernelOptions(
            kind=kernels_kind(), calib_dir=common.path_or_none(FLAGS.calib_dir),
            white_dir=common.path_or_none(FLAGS.white_dir), recenter=FLAGS.recenter_kernels,
            grid=common.parse_rxc(FLAGS.grid, "grid"), tile_size=FLAGS.tile_size,
            radius=FLAGS.kernel_radius, ramp=FLAGS.kernel_ramp, smooth=FLAGS.kernel_smooth,
            size=FLAGS.kernel_size),
        scenes=tuple(FLAGS.scenes) if FLAGS.scenes else None, overwrite=FLAGS.overwrite,
        batch_size=FLAGS.batch_size, memory_budget_gb=FLAGS.memory_budget_gb,
        thumb_size=FLAGS.thumb_size, method=FLAGS.method,
        dpanet_checkpoint=common.path_or_none(FLAGS.dpanet_checkpoint),
        dpanet_tile=FLAGS.dpanet_tile, dpanet_overlap=FLAGS.dpanet_overlap)


def make_executor():
    """The --executor=ray executor (None for local), or a UsageError saying what is
    missing."""
    ray_flags = [f"--{n}" for n in ("ray_address", "ray_max_retries", "ray_num_gpus",
                                    "ray_num_cpus", "ray_max_in_flight") if FLAGS[n].present]
    if FLAGS.executor != "ray":
        if ray_flags:
            raise app.UsageError(f"{', '.join(ray_flags)} need(s) --executor=ray")
        return None
    try:
        import ray  # noqa: F401
    except ImportError:
        raise app.UsageError("--executor=ray needs Ray: pip install 'dpjax[ray]'") from None
    from dpjax.ray_executor import RayExecutor

    try:
        return RayExecutor(address=FLAGS.ray_address, max_retries=FLAGS.ray_max_retries,
                           num_gpus_per_task=FLAGS.ray_num_gpus,
                           num_cpus_per_task=FLAGS.ray_num_cpus,
                           max_in_flight=FLAGS.ray_max_in_flight,
                           compilation_cache_dir=common.explicit_compilation_cache_dir(),
                           default_compilation_cache=(
                               FLAGS.compilation_cache_dir == common.CACHE_AUTO))
    except ValueError as e:
        raise app.UsageError(str(e)) from None


def run_batch(opts, *, devices=None, process_index: int = 0, process_count: int = 1,
              gather=None, quiet: bool = False, executor=None) -> int:
    """Runs the batch with a progress display; prints the final line; returns the exit
    status."""
    _load_dpjax()
    from dpjax import runner
    from dpjax_apps.display import Display

    display = Display(quiet)
    try:
        out = runner.run(opts, on_event=display.on_event, devices=devices,
                         process_index=process_index, process_count=process_count,
                         gather=gather, executor=executor)
    finally:
        display.close()
        if executor is not None:
            executor.close()
    if out.summary:
        c = out.summary["counts"]
        kept = c.get("kept", 0) + c.get("kept-failed", 0)
        print(f"batch: {out.summary['num_scenes'] - kept} scenes: {c['done']} done, "
              f"{c['skipped']} skipped, {c['failed']} failed"
              f"{', ' + out.state if out.state != 'complete' else ''}"
              f"{f' (+{kept} kept from earlier runs)' if kept else ''} -> "
              f"{Path(opts.output_dir) / runner.SUMMARY_JSON}", flush=True)
    return out.exit_status


# ----------------------------------------------------------------------------------------
# Multi-process set-up


def detect_cluster(environ=os.environ) -> str | None:
    """The multi-process environment `jax.distributed.initialize()` can read, if any.

    Mirrors the cheap checks of JAX's own detectors (jax._src.clusters): an explicit
    JAX_COORDINATOR_ADDRESS, a SLURM job step with several tasks, an Open MPI launch,
    a multi-host Cloud TPU slice. Detectors that need a network query (GCE metadata,
    Kubernetes API) are not tried: pass --distributed=on there. (Here rather than in
    dpjax.batch because it runs before dpjax may be imported.)
    """
    if environ.get("JAX_COORDINATOR_ADDRESS"):
        return "JAX_COORDINATOR_ADDRESS"
    if "SLURM_JOB_ID" in environ and int(environ.get("SLURM_NTASKS", "1") or 1) > 1:
        return "slurm"
    if "OMPI_MCA_orte_hnp_uri" in environ:
        return "open-mpi"
    hosts = environ.get("TPU_WORKER_HOSTNAMES") or environ.get("TPU_PROCESS_ADDRESSES")
    if hosts and "," in hosts:
        return "cloud-tpu"
    return None


def init_distributed() -> tuple[int, int, Any]:
    """jax.distributed.initialize per the flags; returns (index, count, gather)."""
    import jax

    explicit = any(v is not None for v in (FLAGS.coordinator_address, FLAGS.num_processes,
                                           FLAGS.process_id))
    mode = FLAGS.distributed
    cluster = detect_cluster()
    if mode == "off" or (mode == "auto" and not explicit and cluster is None):
        return 0, 1, None
    if mode == "auto" and not explicit:
        logging.info("multi-process environment detected (%s): jax.distributed.initialize",
                     cluster)
    jax.distributed.initialize(coordinator_address=FLAGS.coordinator_address,
                               num_processes=FLAGS.num_processes, process_id=FLAGS.process_id,
                               initialization_timeout=FLAGS.distributed_timeout_s)
    index, count = jax.process_index(), jax.process_count()
    if count == 1:
        return 0, 1, None

    def gather(value: Any) -> list[Any]:
        from jax.experimental import multihost_utils

        _load_dpjax()
        data = np.frombuffer(json.dumps(outputs.to_json_compatible(value)).encode(), np.uint8)
        sizes = np.asarray(multihost_utils.process_allgather(np.int32(data.size))).reshape(-1)
        buf = np.zeros(int(sizes.max()), np.uint8)
        buf[:data.size] = data
        every = np.asarray(multihost_utils.process_allgather(buf)).reshape(len(sizes), -1)
        return [json.loads(bytes(every[i, :sizes[i]]).decode()) for i in range(len(sizes))]

    return index, count, gather


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if FLAGS.quiet:
        logging.set_verbosity(logging.WARNING)
    _load_dpjax()
    cache = common.use_compilation_cache()
    if cache:
        logging.info("persistent compilation cache: %s", cache)
    if FLAGS.input_dir is None:
        given = [f"--{n}" for n in _BATCH_FLAGS if FLAGS[n].present]
        if given:
            raise app.UsageError(f"{', '.join(given)} need(s) --input_dir (batch mode)")
        return run_demo()
    executor = make_executor()
    if executor is not None and (FLAGS.coordinator_address or FLAGS.num_processes
                                 or FLAGS.distributed == "on"):
        raise app.UsageError("--executor=ray runs the batch from one driver: do not combine "
                             "it with jax.distributed flags")
    index, count, gather = (0, 1, None) if executor is not None else init_distributed()
    opts = run_options_from_flags()
    common.handle_sigterm()
    try:
        return run_batch(opts, process_index=index, process_count=count, gather=gather,
                         quiet=FLAGS.quiet, executor=executor)
    finally:
        if gather is not None:
            import jax

            jax.distributed.shutdown()


if __name__ == "__main__":
    _define_flags()
    sys.exit(app.run(main))
