"""Does starting the MPI solver from DPANet's all-in-focus image save iterations?

  python experiments/dpanet_init.py --dpanet_checkpoint=dpanet_runs/w8 --scene=011 \
      --crop=2x2 --budgets=25,50,100,200 --output=out/dpanet_init/011.json

For one Pixel 4 scene (default 011, held out from DPANet's training), cropped to the
central RxC block of kernel tiles exactly as experiments/reproduce_table.py does, the
dpjax solver runs once per budget in --budgets and start:
- "mean": the paper's initialisation (every layer's colour is the mean of the views);
- "dpanet": every layer's colour is DPANet's all-in-focus image
  (dpjax.pipeline.init_from_all_in_focus), alphas as in the paper.
A budget is the iteration count of the coarsest pyramid level; the finer levels run
--fine_iters (coarsest first), so with the defaults a budget b is the schedule
(b, 120, 20). The preset (auto: layer range from the DP pair; paper: the paper's values)
is chosen once for the scene and shared by every run.

Both starts run the same learning-rate schedule (the DPANet start is passed with
`init_is_solution=False`), so only the initial colours differ.

Output (--output, JSON): the configuration, DPANet's own scores and time, and one record
per (start, budget): all-in-focus PSNR / SSIM / MAE, defocus AIWE(1) / AIWE(2) /
1 - |rho_s|, final loss and solve time (the first run of each start includes JAX
compilation); then, per budget of the "mean" start, the smallest "dpanet" budget that
reaches its PSNR and its AIWE(1) (null when none does).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import jax
from absl import app, flags, logging

import dpjax
from dpjax import config as config_lib
from dpjax import dpanet, outputs, pipeline, presets, scene
from dpjax import reproduce as rt  # the table's scene loading and DPANet helpers
from dpjax_apps.flags import parse_rxc

FLAGS = flags.FLAGS
flags.DEFINE_string("data_dir", str(rt.DEFAULT_DATA_DIR), "Pixel 4 dataset folder.")
flags.DEFINE_string("calib_dir", None, "Calibration folder (default DATA_DIR/calibration).")
flags.DEFINE_string("scene", "011", "Scene id.")
flags.DEFINE_string("crop", "2x2", "RxC: the central R x C block of kernel tiles ('full': "
                    "the whole frame).")
flags.DEFINE_enum("preset", "auto", ["auto", "paper"], "Layer range and prior weights.")
flags.DEFINE_integer("pyramid_levels", 3, "Coarse-to-fine levels (1 + the number of "
                     "--fine_iters).")
flags.DEFINE_list("budgets", ["25", "50", "100", "200"], "Coarsest-level iteration budgets.")
flags.DEFINE_list("fine_iters", [str(n) for n in config_lib.FAST_LEVEL_ITERS[1:]],
                  "Iterations of the finer levels, coarsest first (pyramid_levels - 1 "
                  "values; default: the fast schedule's).")
flags.DEFINE_bool("recenter_kernels", True, "Re-centre each tile's kernel pair.")
flags.DEFINE_string("dpanet_checkpoint", None, "A ckpt_<step>.npz or a training output "
                    "folder (default experiments/checkpoints/dpanet_w8/).")
flags.DEFINE_integer("dpanet_tile", dpanet.DEFAULT_TILE, "DPANet tile side in px.")
flags.DEFINE_integer("dpanet_overlap", dpanet.DEFAULT_OVERLAP, "DPANet tile overlap in px.")
flags.DEFINE_string("output", None, "JSON output (default out/dpanet_init/<scene>.json).")

KEYS = ("psnr", "ssim", "mae", "aiwe1", "aiwe2", "spearman")


def _ints(name: str, values) -> tuple[int, ...]:
    try:
        out = tuple(int(v) for v in values)
    except ValueError:
        raise app.UsageError(f"--{name} must be integers, got {values}") from None
    if any(v < 0 for v in out):
        raise app.UsageError(f"--{name} must be >= 0, got {values}")
    return out


def smallest_matching(base: list[dict], warm: list[dict], key: str,
                      higher_is_better: bool) -> list[dict[str, Any]]:
    """Per baseline budget, the smallest warm-start budget at least as good on `key`."""
    out = []
    for b in base:
        target = b["metrics"].get(key)
        match = None
        if target is not None:
            for w in sorted(warm, key=lambda r: r["budget"]):
                v = w["metrics"].get(key)
                if v is not None and (v >= target if higher_is_better else v <= target):
                    match = w["budget"]
                    break
        out.append({"mean_budget": b["budget"], "value": target, "dpanet_budget": match})
    return out


def run() -> dict[str, Any]:
    budgets = _ints("budgets", FLAGS.budgets)
    fine = _ints("fine_iters", FLAGS.fine_iters)
    sid = FLAGS.scene.zfill(3) if FLAGS.scene.isdigit() else FLAGS.scene
    # The paper's uniform start and plain-mean map: only the colours' start differs.
    opts = rt.Options(
        data_dir=Path(FLAGS.data_dir),
        calib_dir=Path(FLAGS.calib_dir) if FLAGS.calib_dir else None, scenes=(sid,),
        methods=("mpi", "dpanet"), preset=FLAGS.preset, search_init=False,
        defocus_estimator="mean", pyramid_levels=FLAGS.pyramid_levels,
        level_iters=(budgets[0], *fine),
        crop=parse_rxc(FLAGS.crop, "crop"), recenter_kernels=FLAGS.recenter_kernels,
        dpanet_checkpoint=Path(FLAGS.dpanet_checkpoint) if FLAGS.dpanet_checkpoint else None,
        dpanet_tile=FLAGS.dpanet_tile, dpanet_overlap=FLAGS.dpanet_overlap)
    run = rt.prepare_run(opts)
    model = run.model
    if model.train_scenes and sid in model.train_scenes:
        logging.warning("scene %s was used to train DPANet: not a held-out result", sid)
    views, bank, gt_aif, gt_def, _ = rt.load_scene(run, run.pairs[sid])
    cfg0, preset_info = presets.resolve(opts.preset, sid, views, bank, run.base)
    logging.info("scene %s %s: %s preset, scales [%.2f, %.2f]", sid, views.shape[1:3],
                 opts.preset, cfg0.mpi.scale_min, cfg0.mpi.scale_max)

    t0 = time.perf_counter()
    aif = model.deblur(opts, views)
    dpanet_s = time.perf_counter() - t0
    dpanet_scores = pipeline.score(aif, None, gt_all_in_focus=gt_aif)
    logging.info("DPANet: PSNR %.2f dB in %.1fs", dpanet_scores["psnr"], dpanet_s)
    init = pipeline.init_from_all_in_focus(aif, cfg0.mpi.num_layers, cfg0.solver.pyramid_levels)

    runs: list[dict[str, Any]] = []
    for budget in budgets:
        cfg = cfg0.replace(**{"solver.level_iters": (budget, *fine)})
        for start in ("mean", "dpanet"):
            t0 = time.perf_counter()
            res = dpjax.fit(views, bank, cfg, init=init if start == "dpanet" else None,
                               init_is_solution=False)
            seconds = time.perf_counter() - t0
            m = pipeline.score(res.all_in_focus, res.defocus, gt_all_in_focus=gt_aif,
                               gt_defocus=gt_def)
            rec = {"start": start, "budget": budget, "level_iters": [budget, *fine],
                   "metrics": {k: m.get(k) for k in KEYS},
                   "final_loss": float(res.loss_history[-1]) if res.loss_history.size else None,
                   "solve_s": seconds}
            runs.append(rec)
            logging.info("budget %d, %s start: PSNR %.2f dB, AIWE(1) %.4f, loss %.5g (%.1fs)",
                         budget, start, m["psnr"], m["aiwe1"], rec["final_loss"], seconds)

    base_runs = [r for r in runs if r["start"] == "mean"]
    warm_runs = [r for r in runs if r["start"] == "dpanet"]
    return {
        "scene": sid, "crop": FLAGS.crop, "shape": list(views.shape), "preset": preset_info,
        "config": config_lib.to_dict(cfg0), "budgets": list(budgets),
        "fine_iters": list(fine),
        "note": "both starts run the same schedule; only the initial colours differ",
        "dpanet": {**model.info(opts, sid), "seconds": dpanet_s,
                   "metrics": {k: dpanet_scores.get(k) for k in ("psnr", "ssim", "mae")}},
        "runs": runs,
        "matched": {"psnr": smallest_matching(base_runs, warm_runs, "psnr", True),
                    "aiwe1": smallest_matching(base_runs, warm_runs, "aiwe1", False)},
        "device": str(jax.devices()[0]), "jax_version": jax.__version__,
    }


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    try:
        summary = run()
    except (ValueError, FileNotFoundError, scene.SetupError) as e:
        print(f"dpanet_init: error: {e}", file=sys.stderr)
        return 1
    path = Path(FLAGS.output or f"out/dpanet_init/{summary['scene']}.json")
    outputs.write_json(path, summary)
    print(f"dpanet_init: {len(summary['runs'])} solves -> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(app.run(main))
