"""Does refining the all-in-focus image with the layer weights frozen beat the fit's own
image and a Wiener filter at the fit's defocus map? (dpjax.refine, issue "A sharper
all-in-focus image".)

  python experiments/refine_sweep.py --scenes=001,005,008 --crop=3x4 \
      --output=experiments/results/refine_sweep_dev.json

Each scene is loaded, configured and fitted once exactly as experiments/reproduce_table.py
does it (calibrated Pixel 4 kernels, the auto preset, today's defaults with the raw
views fitted by the apps' solver for linear input, refinement off); then every
--settings item refines that same fit (`refine.refine_all_in_focus` at full resolution
of the crop) and is scored against the ground truth, next to the input, the fit's image
and `baselines.wiener_deconvolve` at the fit's defocus map.
Settings are NAME:key=value;... of `dpjax.refine.RefineConfig`. Prints a Markdown table
of the means and writes every number (and each refinement's seconds) to --output.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging

import dpjax
from dpjax import (
    baselines,
    io,
    outputs,
    pipeline,
    postprocess,
    presets,
    refine,
    reproduce,
    scene,
    solver,
)
from dpjax.config import Config
from dpjax.kernels import KernelBank
from dpjax_apps.flags import parse_rxc

FLAGS = flags.FLAGS
DEFAULT_SETTINGS = ["tv3e-3:iters=30", "tv1e-3:iters=30;weight=1e-3",
                    "hl0.8:iters=30;power=0.8", "sharpen2:iters=30;sharpen=2"]


def parse_setting(text: str) -> tuple[str, refine.RefineConfig]:
    name, _, body = text.partition(":")
    kw = {}
    for item in filter(None, body.split(";")):
        key, _, value = item.partition("=")
        field = refine.RefineConfig.__dataclass_fields__.get(key)
        if field is None:
            raise app.UsageError(f"unknown RefineConfig field {key!r} in {text!r}")
        kind = type(getattr(refine.RefineConfig(), key))
        kw[key] = (value.lower() in ("1", "true", "yes")) if kind is bool else kind(value)
    return name, refine.RefineConfig(**kw)


class SceneFit(NamedTuple):
    """One Pixel 4 scene fitted with the apps' defaults, refinement off."""

    views: np.ndarray  # [2, H, W, C]
    bank: KernelBank
    config: Config  # refinement off
    result: solver.FitResult
    gt_all_in_focus: np.ndarray | None
    gt_defocus: np.ndarray | None
    fit_s: float


def fit_scene(sid: str, data: Path, crop) -> SceneFit:
    """Loads, configures and fits one scene as experiments/reproduce_table.py does it."""
    # The apps' defaults (fast coarse-to-fine schedule, auto preset's start and reading);
    # a bare Config() would be the library's single-level 1000-step solver.
    settings = {"preset": "auto", "refine_iters": 0}  # the fit alone
    base = presets.base_config(**settings)
    source = scene.kernel_source(scene.KernelOptions(calib_dir=data / "calibration"),
                                 2 ** (base.solver.pyramid_levels - 1), crop)
    # The raw views are linear: fitted with the apps' solver for linear input.
    opts = scene.SceneOptions(base=base, preset="auto", input_dir=data,
                              linear_solver=presets.linear_input_solver(**settings))
    pair = io.ScenePair(sid, data / f"{sid}_left.png", data / f"{sid}_right.png", "pixel")
    views, info = scene.load_views(pair, source, opts)
    bank = scene.make_bank(source, info)
    gt_aif, gt_def = scene.load_ground_truth(data, sid, views.shape[1:3], info)
    cfg, _, init, _ = scene.configure(sid, views, bank, opts,
                                      input_encoding=info["input"]["encoding"])
    t0 = time.perf_counter()
    res = dpjax.fit(views, bank, cfg, init=init, init_is_solution=False)
    return SceneFit(views, bank, cfg, res, gt_aif, gt_def, time.perf_counter() - t0)


def run_scene(sid: str, refinements, data: Path, crop) -> dict:
    views, bank, cfg, res, gt_aif, gt_def, fit_s = fit_scene(sid, data, crop)

    def sc(img, dmap=None):
        s = pipeline.score(np.asarray(img), dmap, gt_all_in_focus=gt_aif, gt_defocus=gt_def)
        return {k: s[k] for k in ("psnr", "ssim", "aiwe1") if k in s}

    rows = {"input": sc(views.mean(axis=0)), "fit": sc(res.all_in_focus, res.defocus),
            "fit_raw": sc(res.all_in_focus_raw)}
    t0 = time.perf_counter()
    rows["wiener"] = sc(baselines.wiener_deconvolve(views, bank, res.defocus,
                                                    cfg.mpi.scales()))
    rows["wiener"]["seconds"] = time.perf_counter() - t0
    for name, rc in refinements:
        done = solver.finish_fit(views, bank, cfg.replace(refine=rc), res.params)
        ref, img = done.refine, done.all_in_focus_raw
        rows[name] = {**sc(img), "seconds": ref["seconds"], "iterations": ref["iterations"],
                      "objective": [ref["objective_start"], ref["objective_end"]]}
        filtered = postprocess.bilateral_filter(jnp.asarray(img),
                                                sigma_spatial=cfg.post.sigma_spatial,
                                                sigma_value=cfg.post.sigma_value)
        rows[name + "+bilateral"] = sc(filtered)
        logging.info("%s %s: PSNR %.2f (fit %.2f, wiener %.2f) in %.0f s", sid, name,
                     rows[name]["psnr"], rows["fit"]["psnr"], rows["wiener"]["psnr"],
                     ref["seconds"])
    return {"rows": rows, "fit_s": fit_s, "shape": list(views.shape),
            "optimizer": cfg.solver.optimizer, "level_iters": list(cfg.solver.level_iters)}


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    settings = [parse_setting(s) for s in FLAGS.settings]
    data = Path(FLAGS.data_dir)
    crop = parse_rxc(FLAGS.crop, "crop")
    report = {"settings": {n: dict(vars(c)) for n, c in settings}, "crop": FLAGS.crop,
              "scenes": {}}
    for sid in FLAGS.scenes:
        report["scenes"][sid] = run_scene(sid, settings, data, crop)
        if FLAGS.output:
            outputs.write_json(Path(FLAGS.output), report)
    names = list(next(iter(report["scenes"].values()))["rows"])
    print("| image | PSNR | SSIM |\n|---|---:|---:|")
    for n in names:
        ps = [s["rows"][n]["psnr"] for s in report["scenes"].values()]
        ss = [s["rows"][n]["ssim"] for s in report["scenes"].values()]
        print(f"| {n} | {np.mean(ps):.2f} | {np.mean(ss):.3f} |")
    return 0


if __name__ == "__main__":
    flags.DEFINE_list("scenes", ["001", "005", "008"], "Pixel 4 scene ids.")
    flags.DEFINE_string("data_dir", str(reproduce.DEFAULT_DATA_DIR), "Pixel 4 data folder.")
    flags.DEFINE_string("crop", "3x4", "RxC block of kernel tiles, or full.")
    flags.DEFINE_list("settings", DEFAULT_SETTINGS,
                      "NAME:key=value;... RefineConfig items (comma-separated).")
    flags.DEFINE_string("output", None, "JSON file for every number.")
    sys.exit(app.run(main))
