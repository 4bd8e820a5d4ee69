"""The cost and quality of a colour solve against a grey one, whole solves.

A synthetic colour scene (layered textures, `dpjax.make_scene`) on the step problem's
grid (defaults: a Canon-size 768x512 frame, 2x3 tiles of 256 px, 13-px kernels, the
scale range self-calibration finds on the Canon exports) is solved with the apps'
default schedule three ways in one process:
  grey      the channel mean of the same views (1 channel);
  colour    all channels at the finest level only (`SolverConfig.colour_levels` = 1,
            the default);
  colour_all  all channels at every level (colour_levels = pyramid_levels).
Each solve runs twice (the first compiles); the second's solver time is reported,
with PSNR/SSIM of its all-in-focus image and AIWE(1) of its defocus map against the
scene's ground truth, and the ratios colour / grey.

  python benchmarks/colour_solve.py --output=benchmarks/results/colour_solve_768x512.json
"""

import dataclasses
import platform
import time

import numpy as np
from absl import app, flags
from common import define_step_flags, emit, kernel_record, step_problem_of_flags

import dpjax
from dpjax import config as config_lib
from dpjax import metrics

FLAGS = flags.FLAGS
flags.DEFINE_string("output", "", "Also write the JSON here.")
flags.DEFINE_list("runs", ["grey", "colour", "colour_all"], "Which solves to run.")
flags.DEFINE_integer("seed", 0, "Synthetic scene seed.")
define_step_flags()
flags.FLAGS.set_default("rows", 2)
flags.FLAGS.set_default("cols", 3)
flags.FLAGS.set_default("tile", 256)
flags.FLAGS.set_default("kernel_size", 13)
flags.FLAGS.set_default("scale_min", -0.42)
flags.FLAGS.set_default("scale_max", 1.09)


def _defocus_as_gt8(d: np.ndarray) -> np.ndarray:
    """A defocus map in the 8-bit ground-truth convention (1..255, 0 = unknown)."""
    lo, hi = float(d.min()), float(d.max())
    return np.round(1 + 254 * (d - lo) / max(hi - lo, 1e-9)).astype(np.float32)


def main(argv):
    del argv
    bank, scales, _ = step_problem_of_flags()
    rng = np.random.default_rng(FLAGS.seed)
    synth = dpjax.make_scene(rng, bank, num_layers=4, channels=3,
                             scale_range=(FLAGS.scale_min, FLAGS.scale_max))
    gt_def = _defocus_as_gt8(synth.defocus)
    schedule = config_lib.schedule()
    base = dpjax.Config(mpi=config_lib.MpiConfig(num_layers=FLAGS.num_layers,
                                                 scale_min=FLAGS.scale_min,
                                                 scale_max=FLAGS.scale_max),
                        solver=dataclasses.replace(schedule, kernel_mass_cut=FLAGS.kernel_mass_cut))
    runs = {
        "grey": (synth.views.mean(axis=-1, keepdims=True), synth.all_in_focus.mean(
            axis=-1, keepdims=True), base),
        "colour": (synth.views, synth.all_in_focus, base),
        "colour_all": (synth.views, synth.all_in_focus, base.replace(**{
            "solver.colour_levels": schedule.pyramid_levels})),
    }
    result = {"benchmark": "colour_solve", "machine": platform.platform(),
              "processor": platform.processor(), "frame": list(bank.grid.image_shape),
              "grid": [bank.grid.rows, bank.grid.cols], **kernel_record(bank),
              "num_layers": FLAGS.num_layers, "level_iters": list(schedule.level_iters),
              "runs": {}}
    for name in FLAGS.runs:
        views, gt_aif, cfg = runs[name]
        dpjax.fit(views, bank, cfg)  # compiles
        t0 = time.perf_counter()
        res = dpjax.fit(views, bank, cfg)
        wall = time.perf_counter() - t0
        im = metrics.image_metrics(res.all_in_focus, gt_aif)
        dm = metrics.defocus_metrics(res.defocus, gt_def)
        result["runs"][name] = {
            "channels": int(views.shape[-1]),
            "colour_levels": cfg.solver.colour_levels, "wall_s": wall,
            "timings": {k: round(v, 3) for k, v in res.timings.items()},
            "psnr": im["psnr"], "ssim": im["ssim"], "aiwe1": dm["aiwe1"],
            "spearman": dm["spearman"]}
    grey = result["runs"].get("grey")
    if grey:
        for name, r in result["runs"].items():
            if name != "grey":
                result[f"{name}_over_grey"] = r["wall_s"] / grey["wall_s"]
    result["config"] = dataclasses.asdict(base.solver)
    emit(result, FLAGS.output)


if __name__ == "__main__":
    app.run(main)
