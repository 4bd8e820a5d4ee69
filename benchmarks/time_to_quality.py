"""Time to quality: the paper's schedule against dpjax's schedules, in one process.

On a Pixel 4 scene it runs, for each --runs name:
- `paper`: the paper's schedule (single-scale Adam, lr 0.3 -> 0.1 over 10,000
  iterations, cut off by --paper_budget_s) with the paper's layer range for the scene
  and no refinement (the published method);
- `fast`, `best`: dpjax's schedules (`--quality`, `dpjax.config.schedule`), loaded
  and configured as the apps do it (`dpjax.scene.configure`: the auto preset's range
  and the search-map start, their time counted; the optimizer the apps pick for the
  input's encoding, L-BFGS for the Pixel 4's raw pairs since 2026-12-07), the MPI
  solved with the refinement off and then finished (`dpjax.solver.finish_fit`) with
  each --refine_iters count of L-BFGS refinement iterations, every one from the same
  MPI: a user running with --refine_iters=K pays the MPI's time plus that finish.
It records the loss and the metrics against ground truth over the solver's wall time
(metric evaluation is excluded from the clock) and prints JSON with each run's final
result (the refinement count that is the default when it was run, else the last), the
Wiener filter at that run's defocus map and, when a paper run is there, the time at
which each run first reaches the paper run's final AIWE(1) and PSNR; --plot draws
loss / AIWE(1) / PSNR against time (refinement points as dots).

  python benchmarks/time_to_quality.py --scene=008 --crop=2x2 --paper_budget_s=600
  python benchmarks/time_to_quality.py --scene=008 --crop=full --runs=fast,best \\
      --refine_iters=0,5,15,45

--crop=2x2 is the central 336x336 block of kernel tiles (rows 2-3, cols 3-4) with
its four kernels (RxC any central block); --crop=full the whole 1008x1344 crop.
--fast_preset=paper gives the dpjax runs the paper run's layer range and the usual
start instead, so that only the schedule differs.
"""

import dataclasses
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
from dpjax import baselines, io, metrics, mpi, postprocess, presets, refine, scene, solver
from dpjax import config as config_lib
from dpjax_apps.flags import parse_rxc

FLAGS = flags.FLAGS
flags.DEFINE_string("data_dir", str(Path(__file__).resolve().parents[2] / "shared" / "data" /
                                    "pixel4"), "Pixel 4 data folder.")
flags.DEFINE_string("scene", "008", "Scene id.")
flags.DEFINE_string("crop", "2x2", "The central RxC block of kernel tiles, or full.")
flags.DEFINE_list("runs", ["paper", "fast"], "Runs, in order: paper and/or the names of "
                  "dpjax.config.QUALITIES (fast, best).")
flags.DEFINE_list("refine_iters", [str(refine.RefineConfig().iters)],
                  "Refinement iteration counts with which each dpjax run's MPI is finished "
                  "(0 = the MPI's own image); empty = 0 only.")
flags.DEFINE_float("paper_budget_s", 600.0, "Wall-time cap for the paper schedule.")
flags.DEFINE_integer("paper_iters", 10_000, "The paper schedule's iteration count.")
flags.DEFINE_integer("eval_every", 50, "Paper run: evaluate the metrics every N iterations.")
flags.DEFINE_integer("fast_eval_every", 20, "dpjax runs: evaluate the metrics every N "
                     "iterations.")
flags.DEFINE_string("paper_json", "", "Reuse the paper run of an earlier output JSON of this "
                    "script (same scene, crop and paper settings) instead of running it again.")
flags.DEFINE_enum("fast_preset", "auto", ["auto", "paper"],
                  "Layer range and start of the dpjax runs (see the module docstring).")
flags.DEFINE_string("output", "", "Also write the JSON here.")
flags.DEFINE_string("plot", "", "PNG plot path.")

# The paper's per-scene layer ranges (data README) for the shared scenes.
PAPER_RANGES = {"001": (0.5, 1.6), "005": (0.1, 1.3), "008": (0.2, 1.5), "011": (0.2, 1.5),
                "013": (0.3, 1.6), "016": (0.3, 1.5)}


def load_problem(opts: scene.SceneOptions):
    """Views, kernel bank, ground truth and the input's encoding of the scene, loaded as
    the apps load it (dpjax.scene: re-centred calibrated kernels, the central block of
    tiles)."""
    data = Path(FLAGS.data_dir)
    pairs = {p.name: p for p in io.discover_pairs(data)}
    if FLAGS.scene not in pairs:
        raise app.UsageError(f"scene {FLAGS.scene} not found in {data}")
    source = scene.kernel_source(
        scene.KernelOptions(calib_dir=data / "calibration", recenter=True),
        2 ** (opts.base.solver.pyramid_levels - 1), opts.crop_tiles)
    views, info = scene.load_views(pairs[FLAGS.scene], source, opts)
    bank = scene.make_bank(source, info)
    gt_aif, gt_def = scene.load_ground_truth(data, FLAGS.scene, views.shape[1:3], info)
    if gt_aif is None or gt_def is None:
        raise app.UsageError(f"scene {FLAGS.scene}: ground truth missing or unusable "
                             f"({info.get('warnings')})")
    return views, bank, gt_aif, gt_def, info["input"]["encoding"]


def scores(aif, dmap, gt_aif, gt_defocus):
    """The metrics of an all-in-focus image [H, W, 1] and a defocus map [H, W]."""
    im = metrics.image_metrics(np.asarray(aif)[..., 0], gt_aif)
    dm = metrics.defocus_metrics(dmap, gt_defocus)
    return {"aiwe1": dm["aiwe1"], "aiwe2": dm["aiwe2"], "spearman": dm["spearman"],
            "psnr": im["psnr"], "ssim": im["ssim"], "mae": im["mae"]}


def record_scores(score: dict) -> dict:
    """The metrics a curve record keeps."""
    return {key: score[key] for key in ("aiwe1", "psnr", "ssim", "spearman")}


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
        self.records.append({"t": p.elapsed_s + self.offset_s, "level": p.level, "step": p.step,
                             "loss": p.loss, **record_scores(scores(
                                 aif, dmap, self.gt_aif, self.gt_defocus))})
        return self.stop_after_s is not None and p.elapsed_s >= self.stop_after_s


def first_time(records, key, target, better):
    for r in records:
        if (r[key] <= target) if better == "lower" else (r[key] >= target):
            return r["t"]
    return None


COLOURS = [(200, 40, 40), (30, 90, 200), (30, 150, 60), (150, 90, 20)]


def plot(runs, path):
    panels = [("loss", "loss (log)"), ("aiwe1", "AIWE(1)"), ("psnr", "PSNR dB")]
    w, h, pad = 420, 300, 40
    img = Image.new("RGB", (w * len(panels), h), "white")
    draw = ImageDraw.Draw(img)
    tmax = max(r["t"] for run in runs.values() for r in run["records"])
    for i, (key, title) in enumerate(panels):
        x0 = i * w
        vals = [r[key] for run in runs.values() for r in run["records"] if r[key] is not None]
        if key == "loss":
            vals = np.log10(np.maximum(vals, 1e-9))
        lo, hi = float(np.min(vals)), float(np.max(vals))
        hi = hi if hi > lo else lo + 1
        draw.rectangle([x0 + pad, pad, x0 + w - 10, h - pad], outline=(0, 0, 0))
        draw.text((x0 + pad, 10), f"{title} vs solver time (s), t_max={tmax:.0f}", fill=(0, 0, 0))
        draw.text((x0 + 2, pad), f"{hi:.3g}", fill=(0, 0, 0))
        draw.text((x0 + 2, h - pad - 10), f"{lo:.3g}", fill=(0, 0, 0))
        for j, (name, run) in enumerate(runs.items()):
            colour = COLOURS[j % len(COLOURS)]
            pts, dots = [], []
            for r in run["records"]:
                if r[key] is None:
                    continue
                v = np.log10(max(r[key], 1e-9)) if key == "loss" else r[key]
                px = x0 + pad + (w - 10 - pad) * r["t"] / tmax
                py = h - pad - (h - 2 * pad) * (v - lo) / (hi - lo)
                (dots if r["level"] == "refine" else pts).append((px, py))
            if len(pts) > 1:
                draw.line(pts, fill=colour, width=2)
            for px, py in dots:
                draw.ellipse([px - 3, py - 3, px + 3, py + 3], outline=colour, width=2)
            draw.text((x0 + pad + 5, pad + 5 + 12 * j), name, fill=colour)
    img.save(path)


def paper_run(views, bank, gt_aif, gt_defocus, base):
    cfg = base.replace(solver=config_lib.paper_solver(FLAGS.paper_iters)).replace(
        **{"solver.chunk_size": FLAGS.eval_every, "refine.iters": 0, "loss.noise_power": 0.0})
    rec = Recorder(views.shape[1:3], cfg, gt_aif, gt_defocus, stop_after_s=FLAGS.paper_budget_s)
    res = dpjax.fit(views, bank, cfg, callback=rec)
    return {"schedule": config_lib.to_dict(cfg)["solver"],
            "iterations": list(res.level_iterations),
            "scale_range": [cfg.mpi.scale_min, cfg.mpi.scale_max],
            "range_estimate_s": 0.0, "solver_time_s": res.timings["total_s"],
            "final": scores(res.all_in_focus, res.defocus, gt_aif, gt_defocus),
            "records": rec.records}


def dpjax_run(name, views, bank, gt_aif, gt_defocus, opts, paper_base, refine_iters,
              encoding):
    """A dpjax schedule's run: the MPI without refinement, then each refinement count."""
    settings = {"preset": "auto", "quality": name, "refine_iters": 0}
    chunk = FLAGS.fast_eval_every
    base = presets.base_config(**settings).replace(**{"solver.chunk_size": chunk})
    linear = presets.linear_input_solver(**settings)  # as the apps: L-BFGS for raw input
    opts = dataclasses.replace(opts, base=base, linear_solver=linear and dataclasses.replace(
        linear, chunk_size=chunk))
    t0 = time.perf_counter()
    if FLAGS.fast_preset == "auto":
        cfg, _, init, _ = scene.configure(FLAGS.scene, views, bank, opts,
                                          input_encoding=encoding)
    else:
        cfg = scene.for_input(opts, encoding).base.replace(mpi=paper_base.mpi)
        init = None
    configure_s = time.perf_counter() - t0
    rec = Recorder(views.shape[1:3], cfg, gt_aif, gt_defocus, offset_s=configure_s)
    res = dpjax.fit(views, bank, cfg, callback=rec, init=init, init_is_solution=False)
    mpi_s = configure_s + res.timings["total_s"]
    points = {0: (scores(res.all_in_focus, res.defocus, gt_aif, gt_defocus), mpi_s)}
    finishes = []
    for k in refine_iters:
        if k == 0:
            continue
        done = solver.finish_fit(views, bank, cfg.replace(**{"refine.iters": k}), res.params)
        point = scores(done.all_in_focus, done.defocus, gt_aif, gt_defocus)
        points[k] = (point, mpi_s + done.timings["total_s"])
        rec.records.append({"t": points[k][1], "level": "refine", "step": k, "loss": None,
                            **record_scores(point)})
        finishes.append({"iters": k, "seconds": done.timings["total_s"],
                         "refine": done.refine, **point})
    default_k = refine.RefineConfig().iters
    final_k = default_k if default_k in points else refine_iters[-1]
    final, solver_s = points[final_k]
    t0 = time.perf_counter()
    wiener_aif = baselines.wiener_deconvolve(views, bank, res.defocus, cfg.mpi.scales())
    wiener_s = time.perf_counter() - t0  # the deconvolution alone, not its scoring
    wiener = {**scores(wiener_aif, res.defocus, gt_aif, gt_defocus), "seconds": wiener_s}
    return {"schedule": config_lib.to_dict(cfg)["solver"],
            "iterations": list(res.level_iterations),
            "scale_range": [cfg.mpi.scale_min, cfg.mpi.scale_max],
            "range_estimate_s": configure_s, "mpi_time_s": mpi_s, "solver_time_s": solver_s,
            "final_refine_iters": final_k, "final": final, "refine_curve": finishes,
            "wiener_at_final_map": wiener, "records": rec.records}


def main(argv):
    del argv
    names = list(FLAGS.runs)
    allowed = ["paper", *config_lib.QUALITIES]
    if not names or any(n not in allowed for n in names) or len(set(names)) != len(names):
        raise app.UsageError(f"--runs must name distinct runs among {', '.join(allowed)}")
    try:
        refine_iters = sorted({int(k) for k in FLAGS.refine_iters} | {0})
    except ValueError as e:
        raise app.UsageError(f"--refine_iters must be integers: {e}") from None
    if refine_iters[0] < 0:
        raise app.UsageError("--refine_iters must be >= 0")
    crop = parse_rxc(FLAGS.crop, "crop")
    opts = scene.SceneOptions(base=presets.base_config(preset="auto"), preset="auto",
                              crop_tiles=crop)
    views, bank, gt_aif, gt_defocus, encoding = load_problem(opts)
    s_min, s_max = PAPER_RANGES.get(FLAGS.scene, (0.1, 1.6))
    paper_base = dpjax.Config().replace(**{"mpi.scale_min": s_min, "mpi.scale_max": s_max})
    runs = {}
    if FLAGS.paper_json:
        earlier = json.loads(Path(FLAGS.paper_json).read_text())
        paper = earlier["runs"]["paper"]
        expected = json.loads(json.dumps(config_lib.to_dict(paper_base.replace(
            solver=config_lib.paper_solver(FLAGS.paper_iters)).replace(
            **{"solver.chunk_size": FLAGS.eval_every}))["solver"]))
        if (earlier["scene"], earlier["crop"]) != (FLAGS.scene, FLAGS.crop) or \
                paper["schedule"] != expected:
            raise app.UsageError(f"{FLAGS.paper_json} holds a paper run of scene "
                                 f"{earlier['scene']} crop {earlier['crop']} with other settings")
        runs["paper"] = {**paper, "reused_from": FLAGS.paper_json}
    for name in names:
        if name == "paper":
            if "paper" not in runs:
                runs["paper"] = paper_run(views, bank, gt_aif, gt_defocus, paper_base)
        else:
            runs[name] = dpjax_run(name, views, bank, gt_aif, gt_defocus, opts, paper_base,
                                   refine_iters, encoding)
    inp = metrics.image_metrics(views.mean(0)[..., 0], gt_aif)
    summary = {"scene": FLAGS.scene, "crop": FLAGS.crop, "shape": list(views.shape),
               "input_psnr": inp["psnr"], "input_ssim": inp["ssim"],
               "refine_iters": refine_iters,
               "jax_version": jax.__version__, "device": str(jax.devices()[0]),
               "platform": platform.platform(),
               "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    if "paper" in runs:
        target_aiwe, target_psnr = runs["paper"]["final"]["aiwe1"], runs["paper"]["final"]["psnr"]
        summary["paper_target"] = {"aiwe1": target_aiwe, "psnr": target_psnr}
        for run in runs.values():
            t_a = first_time(run["records"], "aiwe1", target_aiwe, "lower")
            t_p = first_time(run["records"], "psnr", target_psnr, "higher")
            run["time_to_paper_aiwe1_s"] = t_a
            run["time_to_paper_psnr_s"] = t_p
            run["time_to_paper_quality_s"] = None if t_a is None or t_p is None else max(t_a, t_p)
        if "fast" in runs:
            fast_both = runs["fast"]["time_to_paper_quality_s"]
            summary["fast_fraction_of_paper_time"] = (
                None if fast_both is None else fast_both / runs["paper"]["solver_time_s"])
    summary["runs"] = runs
    emit(summary, FLAGS.output, indent=1)
    if FLAGS.plot:
        plot(runs, FLAGS.plot)


if __name__ == "__main__":
    app.run(main)
