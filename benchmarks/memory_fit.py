"""Measures the peak memory of single-level solves and refits `dpjax.batch`'s memory model.

Each problem (default: the shapes of `batch.MEMORY_MEASUREMENTS`) is solved in its own
process, one pyramid level, --steps Adam steps, no refinement, random views and the
parametric kernel of the given side with its whole window (kernel_mass_cut 0, so that
the layer kernels' radius is the one `estimate_solve_memory` computes from the side);
the measured value is the process's peak resident memory minus its resident size after
the imports, in MB. The constants OVERHEAD_BYTES, ALPHA and BETA are then the
least-squares fit of `estimate_solve_memory`'s formula to the measurements (with the
inputs and kernels parts, which have no constant, moved to the left-hand side).

  python benchmarks/memory_fit.py [--steps=5] [--output=FILE.json]

One JSON object: per problem the measured MB, the estimate with the current constants
and with the fitted ones; the fitted constants.
"""

import json
import resource
import subprocess
import sys

import numpy as np
from absl import app, flags
from common import emit

from dpjax import batch

FLAGS = flags.FLAGS
flags.DEFINE_integer("steps", 5, "Adam steps per solve.")
flags.DEFINE_string("one", "", "Internal: solve this one problem (h,w,rows,cols,layers,"
                    "channels,kernel side,max scale) in this process and print its MB.")
flags.DEFINE_string("output", "", "Also write the JSON here.")


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e6  # MB (10^6 B)


def _current_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 1e6


def _solve_one(key: tuple[float, ...], steps: int) -> float:
    import jax.numpy as jnp

    import dpjax
    from dpjax import config as cfg_mod
    from dpjax.refine import RefineConfig

    h, w, rows, cols, layers, channels, k, s = key
    h, w, rows, cols, layers, channels, k = map(int, (h, w, rows, cols, layers, channels, k))
    base = _current_mb()
    bank = dpjax.parametric_bank(rows=rows, cols=cols, tile_h=h // rows, tile_w=w // cols,
                                 radius=k / 2 - 3, size=k)
    rng = np.random.default_rng(0)
    obs = jnp.asarray(rng.random((2, h, w, channels)) * 0.5 + 0.25, jnp.float32)
    config = dpjax.Config(
        mpi=dpjax.MpiConfig(num_layers=layers, scale_min=-0.2, scale_max=float(s)),
        solver=cfg_mod.SolverConfig(pyramid_levels=1, num_iters=steps, chunk_size=steps,
                                    kernel_mass_cut=0.0),
        refine=RefineConfig(iters=0))
    dpjax.fit(obs, bank, config)
    return _rss_mb() - base


def _estimate(key) -> batch.MemoryEstimate:
    h, w, rows, cols, layers, channels, k, s = key
    grid = batch.TileGrid(rows=int(rows), cols=int(cols), tile_h=int(h) // int(rows),
                          tile_w=int(w) // int(cols))
    return batch.estimate_solve_memory(height=int(h), width=int(w), channels=int(channels),
                                       num_layers=int(layers), grid=grid, kernel_size=int(k),
                                       max_abs_scale=float(s))


def main(argv):
    del argv
    if FLAGS.one:
        key = tuple(float(v) for v in FLAGS.one.split(","))
        print(json.dumps({"mb": _solve_one(key, FLAGS.steps)}))
        return
    rows = []
    for key, _ in batch.MEMORY_MEASUREMENTS:
        arg = ",".join(str(v) for v in key)
        out = subprocess.run([sys.executable, __file__, f"--one={arg}", f"--steps={FLAGS.steps}"],
                             capture_output=True, text=True, check=True)
        mb = json.loads(out.stdout.strip().splitlines()[-1])["mb"]
        rows.append((key, mb))
    # Linear least squares: measured - inputs - kernels = OVERHEAD + BETA x + ALPHA y.
    design, target = [], []
    for key, mb in rows:
        parts = _estimate(key).parts
        x = parts["pixels"] / batch.BETA
        y = parts["work"] / batch.ALPHA
        design.append([1.0, x, y])
        target.append(mb * 1e6 - parts["inputs"] - parts["kernels"])
    coef, *_ = np.linalg.lstsq(np.asarray(design), np.asarray(target), rcond=None)
    overhead, beta, alpha = (float(c) for c in coef)
    result = {"steps": FLAGS.steps, "fitted": {"OVERHEAD_BYTES": overhead, "BETA": beta,
                                               "ALPHA": alpha},
              "current": {"OVERHEAD_BYTES": batch.OVERHEAD_BYTES, "BETA": batch.BETA,
                          "ALPHA": batch.ALPHA},
              "problems": []}
    for (key, mb), row in zip(rows, design):
        current = _estimate(key)
        fitted = (current.parts["inputs"] + current.parts["kernels"] + overhead
                  + beta * row[1] + alpha * row[2])
        result["problems"].append({
            "key": list(key), "measured_mb": round(mb),
            "estimate_current_mb": round(current.total / 1e6),
            "estimate_fitted_mb": round(fitted / 1e6)})
    emit(result, FLAGS.output)


if __name__ == "__main__":
    app.run(main)
