"""Train DPANet on synthetic dual-pixel patches plus crops of the Pixel 4 training scenes.

  python experiments/train_dpanet.py --output_dir=dpanet_runs/w16 --width=16 --steps=2000

Data (dpjax.dpanet.data): every batch mixes Binomial(batch, --real_fraction) crops of the
Pixel 4 training scenes 001, 005, 008 (ground truth aligned to the views; 011, 013, 016
are held out for evaluation and never read here) with synthetic patches rendered by
dpjax's own forward model through calibrated Pixel 4 and parametric kernels. Step i's
batch comes from numpy's Generator seeded with (--seed, i), so a resumed run sees the
same batches as an uninterrupted one.

Outputs in --output_dir:
- run_config.json: the resolved model, optimiser and data configuration;
- ckpt_<step>.npz / .json every --checkpoint_every steps and at the end, written
  atomically (dpjax.dpanet.train.save_checkpoint);
- train_log.json on completion: the configuration, steps, timings and the loss history
  (mean loss and gradient norm per logging interval, continued across resumed runs;
  elapsed_s counts from the start of the invocation that logged it).

With --resume (the default) training continues from the latest checkpoint in
--output_dir with its optimiser state; a checkpoint whose model, optimiser or data
configuration differs from the flags is refused (only --steps, --checkpoint_every,
--log_every and --quiet may change between invocations).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging

from dpjax import io
from dpjax.dpanet import DpanetConfig, data, num_params, train

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "pixel4"

FLAGS = flags.FLAGS
flags.DEFINE_string("output_dir", "dpanet_out", "Checkpoints, run_config.json, train_log.json.")
flags.DEFINE_integer("width", 16, "DPANet width (stages width x 1, 2, 4, 8; the paper's is 64).",
                     lower_bound=1)
flags.DEFINE_integer("channels", 1, "Image channels (1: Pixel 4 green; real crops need 1).",
                     lower_bound=1)
flags.DEFINE_integer("patch", 128, "Training patch side (a multiple of 16).", lower_bound=16)
flags.DEFINE_integer("batch", 4, "Patches per step.", lower_bound=1)
flags.DEFINE_integer("steps", 1000, "Total optimiser steps (including resumed ones).",
                     lower_bound=0)
flags.DEFINE_float("lr", 1e-4, "Adam learning rate.")
flags.DEFINE_integer("halve_every", 0, "Halve the learning rate every this many steps (0: never).",
                     lower_bound=0)
flags.DEFINE_enum("loss", "mse", ["mse", "charbonnier"], "Training loss.")
flags.DEFINE_float("real_fraction", 0.2, "Expected fraction of real Pixel 4 crops per batch.",
                   lower_bound=0.0, upper_bound=1.0)
flags.DEFINE_string("data_dir", str(DEFAULT_DATA), "Pixel 4 data folder (real training scenes).")
flags.DEFINE_string("calib_dir", None, "Calibrated kernels (default: <data_dir>/calibration); "
                    "an empty string uses parametric kernels only.")
flags.DEFINE_integer("seed", 0, "Seed of the initial parameters and of the data.")
flags.DEFINE_bool("resume", True, "Continue from the latest checkpoint in --output_dir.")
flags.DEFINE_integer("checkpoint_every", 500, "Steps between checkpoints.", lower_bound=1)
flags.DEFINE_integer("log_every", 10, "Steps between log lines.", lower_bound=1)
flags.DEFINE_bool("quiet", False, "Only log warnings and the final summary.")

RUN_CONFIG = "run_config.json"
TRAIN_LOG = "train_log.json"


class ConfigError(ValueError):
    """Flags that cannot be used as given (reported without the flag listing)."""


def _write_json(path: Path, obj) -> None:
    """Write JSON to a temporary file beside path, then move it into place."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _calib_dir() -> Path | None:
    if FLAGS.calib_dir is None:
        return Path(FLAGS.data_dir) / "calibration"
    return Path(FLAGS.calib_dir) if FLAGS.calib_dir else None


def resolved_config(model: DpanetConfig, opt: train.TrainConfig,
                    synth: data.SyntheticConfig) -> dict:
    """The JSON-ready run configuration. Its "model", "optimizer" and "data" parts must
    match for a resumed run."""
    calib = _calib_dir()
    return {
        "model": model.to_dict(),
        "optimizer": dataclasses.asdict(opt),
        "data": {
            "patch": FLAGS.patch, "batch": FLAGS.batch, "seed": FLAGS.seed,
            "real_fraction": FLAGS.real_fraction,
            "train_scenes": list(data.TRAIN_SCENES) if FLAGS.real_fraction > 0 else [],
            "held_out_scenes": list(data.HELD_OUT_SCENES),
            "kernels": "calibrated+parametric" if calib else "parametric",
            "synthetic": json.loads(json.dumps(dataclasses.asdict(synth))),
        },
        "paths": {"data_dir": FLAGS.data_dir, "calib_dir": None if calib is None else str(calib)},
    }


def _differences(prefix: str, old, new) -> list[str]:
    """'key: checkpoint X, flags Y' lines for differing leaves of two JSON-like dicts."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new)):
            out += _differences(f"{prefix}.{key}" if prefix else key, old.get(key), new.get(key))
        return out
    return [] if old == new else [f"  {prefix}: checkpoint {old!r}, flags {new!r}"]


def check_resumable(ckpt: train.Checkpoint, config: dict, output_dir: Path) -> None:
    """Raise ConfigError if the checkpoint was trained with another configuration."""
    diffs = _differences("model", ckpt.model_config.to_dict(), config["model"])
    diffs += _differences("optimizer", dataclasses.asdict(ckpt.train_config), config["optimizer"])
    run_config = output_dir / RUN_CONFIG
    if run_config.is_file():
        diffs += _differences("data", json.loads(run_config.read_text()).get("data"),
                              config["data"])
    else:
        diffs.append(f"  data: {run_config} is missing, cannot check the data configuration")
    if diffs:
        raise ConfigError(
            f"refusing to resume from step {ckpt.step} in {output_dir}: the checkpoint's "
            "configuration differs from the flags:\n" + "\n".join(diffs) +
            "\nUse the original flags, or a new --output_dir to start another run.")


def _load_data(synth: data.SyntheticConfig):
    calib_dir = _calib_dir()
    calibrated = None
    if calib_dir is not None:
        calib = io.load_calibration_kernels(calib_dir)
        calibrated = data.prepare_calibrated_kernels(calib.kernels, synth.base_kernel_size)
        logging.info("calibrated kernels: %d tile pairs from %s", calibrated.shape[1], calib_dir)
    real = None
    if FLAGS.real_fraction > 0:
        real = data.load_real_pairs(FLAGS.data_dir, data.TRAIN_SCENES)
        logging.info("real training scenes %s (held out: %s), ground-truth shifts %s",
                     ", ".join(real.scene_ids), ", ".join(data.HELD_OUT_SCENES), real.shifts)
    return calibrated, real


def _fmt_time(seconds: float) -> str:
    seconds = round(seconds)
    return f"{seconds // 3600:d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def run() -> dict:
    output_dir = Path(FLAGS.output_dir)
    if FLAGS.patch % data.MULTIPLE:
        raise ConfigError(f"--patch must be a multiple of {data.MULTIPLE}, got {FLAGS.patch}")
    if FLAGS.real_fraction > 0 and FLAGS.channels != 1:
        raise ConfigError("the real Pixel 4 crops are single-channel: use --channels=1 or "
                          "--real_fraction=0")
    try:
        model_cfg = DpanetConfig(width=FLAGS.width, channels=FLAGS.channels)
        opt_cfg = train.TrainConfig(learning_rate=FLAGS.lr, halve_every=FLAGS.halve_every,
                                    loss=FLAGS.loss)
    except ValueError as e:
        raise ConfigError(str(e)) from e
    synth_cfg = data.SyntheticConfig(channels=FLAGS.channels)
    config = resolved_config(model_cfg, opt_cfg, synth_cfg)

    ckpt_path = train.latest_checkpoint(output_dir)
    history: list[dict] = []
    if ckpt_path is not None and not FLAGS.resume:
        raise ConfigError(f"{output_dir} already holds checkpoints ({ckpt_path.name}) and "
                          "--noresume was given: use a new --output_dir")
    if ckpt_path is not None:
        try:
            ckpt = train.load_checkpoint(ckpt_path)
        except ValueError as e:  # e.g. a weights-only copy (export_dpanet.py)
            raise ConfigError(str(e)) from e
        check_resumable(ckpt, config, output_dir)
        params, opt_state, start = ckpt.params, ckpt.opt_state, ckpt.step
        log_path = output_dir / TRAIN_LOG
        if log_path.is_file():
            history = [h for h in json.loads(log_path.read_text()).get("history", [])
                       if h["step"] <= start]
        logging.info("resuming from %s (step %d)", ckpt_path, start)
    else:
        params, opt_state = train.init_state(jax.random.key(FLAGS.seed), model_cfg, opt_cfg)
        start = 0
    output_dir.mkdir(parents=True, exist_ok=True)
    _write_json(output_dir / RUN_CONFIG, config)
    logging.info("DPANet width %d, %d parameters; %s loss, lr %g; patch %d, batch %d; "
                 "steps %d -> %d on %s", FLAGS.width, num_params(params), FLAGS.loss, FLAGS.lr,
                 FLAGS.patch, FLAGS.batch, start, FLAGS.steps, jax.devices()[0].platform)

    calibrated, real = _load_data(synth_cfg)
    train_step = train.make_train_step(opt_cfg)
    t_start = time.perf_counter()
    t_first = None  # end of the first step (compilation included)
    window: list[tuple[int, jax.Array, jax.Array]] = []
    last_ckpt = ckpt_path
    step = start
    while step < FLAGS.steps:
        rng = np.random.default_rng([FLAGS.seed, step])
        batch = data.training_batch(rng, FLAGS.batch, FLAGS.patch, synth_cfg,
                                    calibrated=calibrated, real=real,
                                    real_fraction=FLAGS.real_fraction)
        batch = train.Batch(*(jnp.asarray(a) for a in batch))
        params, opt_state, metrics = train_step(params, opt_state, batch)
        step += 1
        window.append((step, metrics.loss, metrics.grad_norm))
        if t_first is None:
            jax.block_until_ready(metrics.loss)
            t_first = time.perf_counter()
        if step % FLAGS.log_every == 0 or step == FLAGS.steps or step % FLAGS.checkpoint_every == 0:
            losses = np.array([float(loss) for _, loss, _ in window])
            norms = np.array([float(norm) for _, _, norm in window])
            if not np.all(np.isfinite(losses)) or not np.all(np.isfinite(norms)):
                bad = window[int(np.argmin(np.isfinite(losses) & np.isfinite(norms)))][0]
                raise FloatingPointError(
                    f"non-finite loss or gradient at step {bad}; the last good checkpoint is "
                    f"{last_ckpt}")
            now = time.perf_counter()
            done = step - start - 1  # steps after the compiled first one
            rate = done / (now - t_first) if done > 0 and now > t_first else float("nan")
            eta = (FLAGS.steps - step) / rate if rate > 0 else float("nan")
            history.append({"step": step, "loss": float(losses.mean()),
                            "grad_norm": float(norms.mean()),
                            "elapsed_s": round(now - t_start, 3)})
            logging.info("step %d/%d  loss %.5g  |g| %.3g  %.3g steps/s  ETA %s", step,
                         FLAGS.steps, losses.mean(), norms.mean(), rate,
                         _fmt_time(eta) if math.isfinite(eta) else "?")
            window = []
        if step % FLAGS.checkpoint_every == 0 or step == FLAGS.steps:
            last_ckpt = train.save_checkpoint(output_dir, step, params, opt_state, model_cfg,
                                              opt_cfg)
            logging.info("checkpoint %s", last_ckpt)

    wall = time.perf_counter() - t_start
    steady = step - start - 1
    summary = {
        "run_config": config,
        "start_step": start,
        "resumed": start > 0,
        "final_step": step,
        "steps_run": step - start,
        "wall_s": round(wall, 3),
        "first_step_s": None if t_first is None else round(t_first - t_start, 3),
        "steps_per_s": (round(steady / (time.perf_counter() - t_first), 4)
                        if t_first is not None and steady > 0 else None),
        "final_loss": history[-1]["loss"] if history else None,
        "checkpoint": None if last_ckpt is None else str(last_ckpt),
        "num_params": num_params(params),
        "device": jax.devices()[0].platform,
        "history": history,
    }
    _write_json(output_dir / TRAIN_LOG, summary)
    return summary


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if FLAGS.quiet:
        logging.set_verbosity(logging.WARNING)
    try:
        s = run()
    except ConfigError as e:
        print(f"train_dpanet: error: {e}", file=sys.stderr)
        return 2
    loss = "n/a" if s["final_loss"] is None else f"{s['final_loss']:.5g}"
    print(f"train_dpanet: steps {s['start_step']} -> {s['final_step']} in {s['wall_s']:.0f}s, "
          f"loss {loss} -> {Path(FLAGS.output_dir) / TRAIN_LOG}")
    return 0


if __name__ == "__main__":
    sys.exit(app.run(main))
