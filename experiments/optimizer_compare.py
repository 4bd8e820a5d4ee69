"""Optimisers and schedules on Pixel 4 crops: scores and solve time without compilation.

  python experiments/optimizer_compare.py --scenes=001,005,008 --crop=3x4 \
      --schedules=adam:adam:200,120,20,lbfgs:lbfgs:100,60,6 --jsonl=out/optimizers.jsonl

Each scene is loaded and configured as the apps do it (`dpjax.scene.configure`: the
auto preset's layer range and search start, calibrated kernels re-centred), then solved
once per --schedules entry NAME:OPTIMIZER:L1,L2,... (the iteration budgets of the
pyramid levels, coarsest first, one level or more; everything else the apps' defaults,
refinement included). Before the timed runs, every optimiser and level count named is
run once with one iteration per level, so that the timed runs reuse compiled code and
their seconds compare the schedules, not compilation. Per scene and run one JSON line:
seconds (configuration and solve), the final objective, the image's PSNR / SSIM,
AIWE(1), 1 - |rho_s|, and the Wiener filter's PSNR at the run's own defocus map.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import numpy as np
from absl import app, flags

import dpjax
from dpjax import baselines, pipeline, presets, scene
from dpjax import reproduce as rt
from dpjax_apps.flags import parse_rxc

FLAGS = flags.FLAGS


def _define_flags() -> None:
    flags.DEFINE_string("data_dir", str(rt.DEFAULT_DATA_DIR), "Pixel 4 dataset folder.")
    flags.DEFINE_list("scenes", ["001", "005", "008"], "Scene ids.")
    flags.DEFINE_string("crop", "3x4", "The central RxC block of kernel tiles, or full.")
    flags.DEFINE_string("schedules", "adam:adam:200,120,20,lbfgs:lbfgs:100,60,6",
                        "NAME:OPTIMIZER:L1,L2,... entries (one budget per pyramid level, "
                        "coarsest first), comma-separated.")
    flags.DEFINE_string("jsonl", None, "Also append the JSON lines to this file.")


def parse_runs(text: str) -> dict[str, tuple[str, tuple[int, ...]]]:
    """'a:adam:200,120,20,b:lbfgs:6' -> {name: (optimizer, budgets)}.

    An entry starts at each part with two colons; the plain numbers after it are its
    levels' budgets, coarsest first (at least one).
    """
    out = {}
    usage = f"--schedules takes NAME:OPTIMIZER:L1,L2,... entries, got {text!r}"
    for part in text.split(","):
        head = part.split(":")
        if len(head) == 3:
            name, optimizer, part = head
            if not name or name in out:
                raise ValueError(f"{usage} (empty or repeated name {name!r})")
            out[name] = (optimizer, ())
        elif len(head) != 1 or not out:
            raise ValueError(usage)
        try:
            budget = int(part)
        except ValueError:
            raise ValueError(f"{usage} ({part!r} is not a number)") from None
        optimizer, budgets = out[name]
        out[name] = (optimizer, budgets + (budget,))
    if not out:
        raise ValueError(usage)
    return out


def solve(sid, views, bank, gt_aif, gt_def, opts, optimizer, budgets, encoding) -> dict:
    """One configured solve and its scores (`encoding`: the input's, as loaded)."""
    base = presets.base_config(preset="auto", level_iters=budgets, optimizer=optimizer)
    t0 = time.perf_counter()
    # Each schedule names its optimizer: no separate solver for linear input.
    cfg, _, init, _ = scene.configure(
        sid, views, bank, dataclasses.replace(opts, base=base, linear_solver=None),
        input_encoding=encoding)
    res = dpjax.fit(views, bank, cfg, init=init, init_is_solution=False)
    seconds = time.perf_counter() - t0
    s = pipeline.score(np.asarray(res.all_in_focus), res.defocus, gt_all_in_focus=gt_aif,
                       gt_defocus=gt_def)
    wiener = baselines.wiener_deconvolve(views, bank, res.defocus, cfg.mpi.scales())
    w = pipeline.score(np.asarray(wiener), None, gt_all_in_focus=gt_aif)
    return {"seconds": round(seconds, 1), "level_iterations": list(res.level_iterations),
            "objective": round(float(res.terms["total"]), 3),
            "psnr": round(s["psnr"], 3), "ssim": round(s["ssim"], 4),
            "aiwe1": round(s["aiwe1"], 4), "one_minus_abs_rho_s": round(s["spearman"], 3),
            "wiener_psnr": round(w["psnr"], 3)}


def main(argv):
    del argv
    try:
        runs = parse_runs(FLAGS.schedules)
        for optimizer, _ in runs.values():
            dpjax.config.schedule(optimizer=optimizer)  # checks the name
    except ValueError as e:
        raise app.UsageError(str(e)) from None
    try:
        run = rt.prepare_run(rt.Options(
            data_dir=Path(FLAGS.data_dir), crop=parse_rxc(FLAGS.crop, "crop"),
            scenes=tuple(FLAGS.scenes), methods=("input",), output_dir=Path("unused")))
    except (ValueError, FileNotFoundError, scene.SetupError) as e:
        raise app.UsageError(str(e)) from None
    opts = run.scene_opts
    for sid, pair in run.pairs.items():
        views, bank, gt_aif, gt_def, info = rt.load_scene(run, pair)
        scene_data = (views, bank, gt_aif, gt_def, opts)
        encoding = info["input"]["encoding"]
        for optimizer, levels in sorted({(o, len(b)) for o, b in runs.values()}):
            solve(sid, *scene_data, optimizer, (1,) * levels, encoding)  # compile, untimed
        for name, (optimizer, budgets) in runs.items():
            row = {"scene": sid, "crop": FLAGS.crop, "run": name, "optimizer": optimizer,
                   **solve(sid, *scene_data, optimizer, budgets, encoding)}
            line = json.dumps(row)
            print(line, flush=True)
            if FLAGS.jsonl:
                with open(FLAGS.jsonl, "a") as f:
                    f.write(line + "\n")


if __name__ == "__main__":
    _define_flags()
    app.run(main)
