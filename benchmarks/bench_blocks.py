"""Time and peak memory of a large frame solved in overlapping blocks (dpjax.blocks).

The frame: a real dual-pixel pair (default: the first Canon R6 Mark II scene of
../shared/data, 768x512 sRGB) linearised and upsampled to --height x --width (default
4000x6000, the camera's full dual-pixel export size, 24 MP), so the texture and the
left/right disparity are real but 7.8x enlarged. Kernels: the parametric model with a
radius matched to that enlargement (--kernel_radius), on tiles of about 256 px
(`batch.auto_tiles`, as the runner chooses them). The configuration: the apps' default
(`--preset=auto`'s base; 12 layers, 3 pyramid levels) with the range fixed to
[--scale_min, --scale_max] and the schedule of --level_iters.

The split is chosen by the runner's own rule (`dpjax.scene.plan_solve`) for
--memory_budget_gb. --max_blocks solves only the first N blocks (their time is the
per-block time of the chosen schedule; 0 = all, the whole frame blended). Prints one
JSON object: plan, per-block seconds, peak RSS of the process, the memory estimate of
one block, and (when not all blocks ran) the whole frame's time extrapolated as
blocks x the mean time of the solved blocks after the first (which compiles).

  python benchmarks/bench_blocks.py --memory_budget_gb=4 --level_iters=3,3,3
  python benchmarks/bench_blocks.py --memory_budget_gb=4 --max_blocks=2
"""

import dataclasses
import platform
import resource
import time
from pathlib import Path

import jax
import numpy as np
from absl import app, flags
from common import emit

from dpjax import batch, blocks, encoding, io, kernels, presets, scene

ROOT = Path(__file__).resolve().parents[1]
FLAGS = flags.FLAGS
flags.DEFINE_string("pair", str(ROOT.parent / "shared/data/canon_r6ii/casual/orbbec/001"),
                    "Folder with l.png / r.png (8-bit sRGB) to enlarge.")
flags.DEFINE_integer("height", 4000, "Frame height after enlarging.")
flags.DEFINE_integer("width", 6000, "Frame width after enlarging.")
flags.DEFINE_bool("grey", False, "Solve the mean of the channels (default: colour).")
flags.DEFINE_float("memory_budget_gb", 4.0, "Memory budget that sets the split.")
flags.DEFINE_float("kernel_radius", 16.0, "Parametric kernel radius at scale 1, px.")
flags.DEFINE_float("scale_min", -0.6, "Smallest layer scale.")
flags.DEFINE_float("scale_max", 1.0, "Largest layer scale.")
flags.DEFINE_list("level_iters", ["200", "120", "20"], "Iterations per level, coarsest "
                  "first (default: the apps' default schedule).")
flags.DEFINE_integer("max_blocks", 0, "Solve only this many blocks (0: all).")
flags.DEFINE_string("output", "", "Also write the JSON here.")


def _peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _frame(height: int, width: int, grey: bool) -> np.ndarray:
    """[2, height, width, C] linear views: the pair enlarged (bilinear)."""
    views = []
    for name in ("l.png", "r.png"):
        arr, _ = io.read_image(Path(FLAGS.pair) / name)
        lin = encoding.to_linear(np.asarray(arr, np.float32) / 255.0, "srgb")
        big = jax.image.resize(lin, (height, width, lin.shape[-1]), "linear")
        views.append(np.asarray(big, np.float32))
    out = np.stack(views)
    return out.mean(axis=-1, keepdims=True) if grey else out


def main(argv):
    del argv
    t0 = time.perf_counter()
    views = _frame(FLAGS.height, FLAGS.width, FLAGS.grey)
    load_s = time.perf_counter() - t0
    iters = tuple(int(v) for v in FLAGS.level_iters)
    cfg = presets.base_config(preset="auto", level_iters=iters)
    cfg = cfg.replace(**{"mpi.scale_min": FLAGS.scale_min, "mpi.scale_max": FLAGS.scale_max})
    factor = 2 ** (cfg.solver.pyramid_levels - 1)
    pair = kernels.parametric_dp_kernels(radius=FLAGS.kernel_radius)
    h, w = views.shape[1:3]
    grid, (y0, x0) = batch.auto_tiles(h, w, factor, -(-pair.shape[-1] // factor) * factor)
    gh, gw = grid.image_shape
    views = np.ascontiguousarray(views[:, y0:y0 + gh, x0:x0 + gw])
    bank = kernels.KernelBank.create(np.repeat(pair[:, None], grid.num_tiles, axis=1),
                                     rows=grid.rows, cols=grid.cols, tile_h=grid.tile_h,
                                     tile_w=grid.tile_w)
    budget = FLAGS.memory_budget_gb * 1e9
    plan, plan_info, est = scene.plan_solve(views.shape[-1], bank, cfg, None, budget)
    whole = scene.solve_memory(views.shape[-1], bank, cfg)  # refinement included
    if plan is None:
        plan = blocks.plan_blocks(grid, (1, 1))
    run = plan if FLAGS.max_blocks <= 0 else dataclasses.replace(
        plan, blocks=plan.blocks[:FLAGS.max_blocks])
    t0 = time.perf_counter()
    res = blocks.fit_blocks(views, bank, cfg, run)
    solve_s = time.perf_counter() - t0
    secs = [b["seconds"] for b in res.blocks]
    warm = secs[1:] or secs
    result = {
        "benchmark": "bench_blocks",
        "frame": [gh, gw, int(views.shape[-1])], "source_pair": FLAGS.pair,
        "tile_grid": [grid.rows, grid.cols, grid.tile_h, grid.tile_w],
        "kernel_size": bank.kernel_size, "num_layers": cfg.mpi.num_layers,
        "level_iters": list(iters), "memory_budget_gb": FLAGS.memory_budget_gb,
        "plan": plan.as_dict(), "plan_chosen": None if plan_info is None else
        plan_info["chosen"],
        "estimate_block_gb": round(est.gb, 3), "estimate_whole_frame_gb": round(whole.gb, 3),
        "blocks_solved": len(run.blocks), "block_seconds": secs,
        "solve_s": round(solve_s, 1), "load_s": round(load_s, 1),
        "peak_rss_gib": round(_peak_rss_gib(), 2),
        "finite": bool(np.all(np.isfinite(res.all_in_focus))
                       and np.all(np.isfinite(res.defocus))),
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "devices": [str(d) for d in jax.devices()], "jax": jax.__version__},
    }
    if len(run.blocks) < len(plan.blocks):
        result["extrapolated_whole_frame_s"] = round(
            len(plan.blocks) * float(np.mean(warm)), 1)
    emit(result, FLAGS.output)


if __name__ == "__main__":
    app.run(main)
