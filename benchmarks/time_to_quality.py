"""Time to quality: the paper's schedule vs dpjax's fast default, in one process.

On a Pixel 4 scene it runs (a) the paper's schedule (single-scale Adam, lr 0.3 ->
0.1 over 10,000 iterations, cut off by --paper_budget_s) and (b) the fast default
(`dpjax.config.fast_solver()`), recording the loss and the metrics against ground
truth over the solver's wall time (metric evaluation is excluded from the clock).
Prints JSON with, for each run, the time at which it first reaches the paper run's
final AIWE(1) and PSNR, and draws loss / AIWE(1) / PSNR against time to a PNG.

  python benchmarks/time_to_quality.py --scene=008 --crop=2x2 --paper_budget_s=600
  python benchmarks/time_to_quality.py --scene=008 --crop=full --paper_budget_s=1200

--crop=2x2 is the central 336x336 block of kernel tiles (rows 2-3, cols 3-4) with
its four kernels; --crop=full the whole 1008x1344 crop. The paper run uses the
paper's layer range for the scene (the published method). The fast run uses
--fast_preset: `auto` (default, what run_solver.py and reproduce_table.py do: the
range estimated from the pair, whose cost is counted in the fast run's clock) or
`paper` (the same range as the paper run, so only the schedule differs).
"""

import json
import platform
import resource
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from common import emit
from PIL import Image, ImageDraw

import dpjax
from dpjax import config as config_lib
from dpjax import io, metrics, mpi, postprocess, presets, scene

FLAGS = flags.FLAGS
flags.DEFINE_string("data_dir", str(Path(__file__).resolve().parents[2] / "shared" / "data" /
                                    "pixel4"), "Pixel 4 data folder.")
flags.DEFINE_string("scene", "008", "Scene id.")
flags.DEFINE_enum("crop", "2x2", ["2x2", "full"], "Central 2x2 tiles or the full crop.")
flags.DEFINE_float("paper_budget_s", 600.0, "Wall-time cap for the paper schedule.")
flags.DEFINE_integer("paper_iters", 10_000, "The paper schedule's iteration count.")
flags.DEFINE_integer("eval_every", 50, "Paper run: evaluate the metrics every N iterations.")
flags.DEFINE_integer("fast_eval_every", 20, "Fast run: evaluate the metrics every N iterations.")
flags.DEFINE_string("paper_json", "", "Reuse the paper run of an earlier output JSON of this "
                    "script (same scene, crop and paper settings) instead of running it again.")
flags.DEFINE_enum("fast_preset", "auto", ["auto", "paper"],
                  "Layer range and weights of the fast run (see the module docstring).")
flags.DEFINE_string("output", "", "Also write the JSON here.")
flags.DEFINE_string("plot", "", "PNG plot path.")

# The paper's per-scene layer ranges (data README) for the shared scenes.
PAPER_RANGES = {"001": (0.5, 1.6), "005": (0.1, 1.3), "008": (0.2, 1.5), "011": (0.2, 1.5),
                "013": (0.3, 1.6), "016": (0.3, 1.5)}


def load_problem():
    """Views, kernel bank and ground truth of the scene, loaded as the apps load it
    (dpjax.scene: re-centred calibrated kernels, the central block of tiles)."""
    data = Path(FLAGS.data_dir)
    pairs = {p.name: p for p in io.discover_pairs(data)}
    if FLAGS.scene not in pairs:
        raise app.UsageError(f"scene {FLAGS.scene} not found in {data}")
    crop = None if FLAGS.crop == "full" else (2, 2)
    source = scene.kernel_source(
        scene.KernelOptions(calib_dir=data / "calibration", recenter=True),
        2 ** (config_lib.fast_solver().pyramid_levels - 1), crop)
    opts = scene.SceneOptions(base=dpjax.Config(), crop_tiles=crop)
    views, info = scene.load_views(pairs[FLAGS.scene], source, opts)
    bank = scene.make_bank(source, info)
    gt_aif, gt_def = scene.load_ground_truth(data, FLAGS.scene, views.shape[1:3], info)
    if gt_aif is None or gt_def is None:
        raise app.UsageError(f"scene {FLAGS.scene}: ground truth missing or unusable "
                             f"({info.get('warnings')})")
    return views, bank, gt_aif, gt_def


class Recorder:
    """Callback that scores the current MPI at each report (excluded from the clock)."""

    def __init__(self, shape, cfg, gt_aif, gt_defocus, stop_after_s=None, offset_s=0.0):
        self.shape, self.cfg = shape, cfg
        self.offset_s = offset_s  # time spent before the solve (range estimation)
        self.gt_aif, self.gt_defocus = gt_aif, gt_defocus
        self.stop_after_s = stop_after_s
        self.records = []
        self.steps = 0

    def __call__(self, p: dpjax.Progress):
        self.steps += 1
        params = p.params
        if params.color_logits.shape[-2:] != self.shape:
            params = dpjax.solver.upsample_params(params, self.shape)
        trans = mpi.transmittance(mpi.alphas(params))
        aif = jnp.transpose(mpi.all_in_focus(mpi.colors(params), trans), (1, 2, 0))
        post = self.cfg.post
        if post.bilateral:
            aif = postprocess.bilateral_filter(aif, sigma_spatial=post.sigma_spatial,
                                               sigma_value=post.sigma_value)
        dmap = np.asarray(mpi.estimate_defocus(trans, jnp.asarray(p.scales), post.defocus))
        im = metrics.image_metrics(np.asarray(aif)[..., 0], self.gt_aif)
        dm = metrics.defocus_metrics(dmap, self.gt_defocus)
        self.records.append({"t": p.elapsed_s + self.offset_s, "level": p.level, "step": p.step,
                             "loss": p.loss, "aiwe1": dm["aiwe1"], "psnr": im["psnr"],
                             "ssim": im["ssim"], "spearman": dm["spearman"]})
        return self.stop_after_s is not None and p.elapsed_s >= self.stop_after_s


def first_time(records, key, target, better):
    for r in records:
        if (r[key] <= target) if better == "lower" else (r[key] >= target):
            return r["t"]
    return None


def plot(runs, path):
    panels = [("loss", "loss (log)"), ("aiwe1", "AIWE(1)"), ("psnr", "PSNR dB")]
    w, h, pad = 420, 300, 40
    img = Image.new("RGB", (w * len(panels), h), "white")
    draw = ImageDraw.Draw(img)
    colours = {"paper": (200, 40, 40), "fast": (30, 90, 200)}
    tmax = max(r["t"] for run in runs.values() for r in run["records"])
    for i, (key, title) in enumerate(panels):
        x0 = i * w
        vals = [r[key] for run in runs.values() for r in run["records"]]
        if key == "loss":
            vals = np.log10(np.maximum(vals, 1e-9))
        lo, hi = float(np.min(vals)), float(np.max(vals))
        hi = hi if hi > lo else lo + 1
        draw.rectangle([x0 + pad, pad, x0 + w - 10, h - pad], outline=(0, 0, 0))
        draw.text((x0 + pad, 10), f"{title} vs solver time (s), t_max={tmax:.0f}", fill=(0, 0, 0))
        draw.text((x0 + 2, pad), f"{hi:.3g}", fill=(0, 0, 0))
        draw.text((x0 + 2, h - pad - 10), f"{lo:.3g}", fill=(0, 0, 0))
        for name, run in runs.items():
            pts = []
            for r in run["records"]:
                v = np.log10(max(r[key], 1e-9)) if key == "loss" else r[key]
                px = x0 + pad + (w - 10 - pad) * r["t"] / tmax
                py = h - pad - (h - 2 * pad) * (v - lo) / (hi - lo)
                pts.append((px, py))
            if len(pts) > 1:
                draw.line(pts, fill=colours[name], width=2)
            draw.text((x0 + pad + 5, pad + 5 + 12 * list(runs).index(name)), name,
                      fill=colours[name])
    img.save(path)


def main(argv):
    del argv
    views, bank, gt_aif, gt_defocus = load_problem()
    s_min, s_max = PAPER_RANGES.get(FLAGS.scene, (0.1, 1.6))
    base = dpjax.Config().replace(**{"mpi.scale_min": s_min, "mpi.scale_max": s_max})
    runs = {}
    schedules = {
        "paper": (config_lib.paper_solver(FLAGS.paper_iters), FLAGS.eval_every,
                  FLAGS.paper_budget_s),
        "fast": (config_lib.fast_solver(), FLAGS.fast_eval_every, None),
    }
    if FLAGS.paper_json:
        earlier = json.loads(Path(FLAGS.paper_json).read_text())
        paper = earlier["runs"]["paper"]
        expected = json.loads(json.dumps(config_lib.to_dict(base.replace(
            solver=schedules["paper"][0]).replace(
            **{"solver.chunk_size": FLAGS.eval_every}))["solver"]))
        if (earlier["scene"], earlier["crop"]) != (FLAGS.scene, FLAGS.crop) or \
                paper["schedule"] != expected:
            raise app.UsageError(f"{FLAGS.paper_json} holds a paper run of scene "
                                 f"{earlier['scene']} crop {earlier['crop']} with other settings")
        runs["paper"] = {**paper, "reused_from": FLAGS.paper_json}
        del schedules["paper"]
    for name, (solver_cfg, every, budget) in schedules.items():
        cfg = base.replace(solver=solver_cfg).replace(**{"solver.chunk_size": every})
        estimate_s = 0.0
        if name == "fast" and FLAGS.fast_preset == "auto":
            t0 = time.perf_counter()
            cfg = presets.auto_config(views, bank, cfg)
            estimate_s = time.perf_counter() - t0
        rec = Recorder(views.shape[1:3], cfg, gt_aif, gt_defocus, stop_after_s=budget,
                       offset_s=estimate_s)
        res = dpjax.fit(views, bank, cfg, callback=rec)
        im = metrics.image_metrics(res.all_in_focus[..., 0], gt_aif)
        dm = metrics.defocus_metrics(res.defocus, gt_defocus)
        runs[name] = {"schedule": config_lib.to_dict(cfg)["solver"],
                      "iterations": list(res.level_iterations),
                      "scale_range": [cfg.mpi.scale_min, cfg.mpi.scale_max],
                      "range_estimate_s": estimate_s,
                      "solver_time_s": res.timings["total_s"] + estimate_s,
                      "final": {"aiwe1": dm["aiwe1"], "aiwe2": dm["aiwe2"],
                                "spearman": dm["spearman"], "psnr": im["psnr"],
                                "ssim": im["ssim"], "mae": im["mae"]},
                      "records": rec.records}
    target_aiwe, target_psnr = runs["paper"]["final"]["aiwe1"], runs["paper"]["final"]["psnr"]
    inp = metrics.image_metrics(views.mean(0)[..., 0], gt_aif)
    summary = {"scene": FLAGS.scene, "crop": FLAGS.crop, "shape": list(views.shape),
               "input_psnr": inp["psnr"], "input_ssim": inp["ssim"],
               "paper_target": {"aiwe1": target_aiwe, "psnr": target_psnr},
               "jax_version": jax.__version__, "device": str(jax.devices()[0]),
               "platform": platform.platform(),
               "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    for name, run in runs.items():
        t_a = first_time(run["records"], "aiwe1", target_aiwe, "lower")
        t_p = first_time(run["records"], "psnr", target_psnr, "higher")
        run["time_to_paper_aiwe1_s"] = t_a
        run["time_to_paper_psnr_s"] = t_p
        both = None if t_a is None or t_p is None else max(t_a, t_p)
        run["time_to_paper_quality_s"] = both
    paper_t = runs["paper"]["solver_time_s"]
    fast_both = runs["fast"]["time_to_paper_quality_s"]
    summary["fast_fraction_of_paper_time"] = (None if fast_both is None else fast_both / paper_t)
    summary["runs"] = runs
    emit(summary, FLAGS.output, indent=1)
    if FLAGS.plot:
        plot(runs, FLAGS.plot)


if __name__ == "__main__":
    app.run(main)
