"""Times the all-in-focus refinement (`dpjax.refine`) and measures its peak memory.

Problem: the step benchmarks' (bench_step.py; default the full 1008x1344 Pixel 4
frame, 12 layers, 6x8 tiles, 61-px kernels), one or three channels, with random
smooth alphas and colours standing in for a fit. Runs the refinement twice (the first
call includes compilation) with --iters L-BFGS iterations and reports seconds per
iteration, line-search evaluations per iteration, the compile time (first run minus
second) and the process's peak resident memory, rendering of the observation
included (run one problem per process for a clean peak). Prints one JSON object.

  python benchmarks/bench_refine.py [--channels=1] [--iters=10] [--output=...]
"""

import platform
import resource
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from common import define_step_flags, emit, kernel_record, step_problem_of_flags

from dpjax import conv, mpi, refine

FLAGS = flags.FLAGS
flags.DEFINE_integer("channels", 1, "Channels of the problem.")
flags.DEFINE_integer("iters", 10, "L-BFGS iterations per timed run.")
flags.DEFINE_string("output", "", "Also write the JSON here.")
define_step_flags()


def _smooth(rng, shape, sigma_px):
    """Random field [*shape] smoothed by a Gaussian of sigma_px (FFT)."""
    noise = rng.standard_normal(shape)
    fy = np.fft.fftfreq(shape[-2])[:, None]
    fx = np.fft.fftfreq(shape[-1])[None, :]
    gain = np.exp(-2 * (np.pi * sigma_px) ** 2 * (fx * fx + fy * fy))
    out = np.real(np.fft.ifft2(np.fft.fft2(noise) * gain))
    return out / out.std(axis=(-2, -1), keepdims=True)


def main(argv):
    del argv
    rng = np.random.default_rng(0)
    bank, scales, radius = step_problem_of_flags()
    h, w = bank.grid.image_shape
    num_l, c = FLAGS.num_layers, FLAGS.channels
    geom = conv.ConvGeometry.create(bank.grid, radius, "fft")
    lk = jax.jit(mpi.prepare_layer_kernels, static_argnames="geom")(bank, scales, geom)
    colour = np.clip(0.45 + 0.15 * _smooth(rng, (num_l, c, h, w), 4.0), 0.05, 0.95)
    alpha_logit = 3.0 * _smooth(rng, (num_l - 1, h, w), 30.0)
    params = mpi.MpiParams(color_logits=jnp.asarray(np.log(colour / (1 - colour)), jnp.float32),
                           alpha_logits=jnp.asarray(alpha_logit, jnp.float32))
    obs = mpi.render_views(mpi.colors(params), mpi.alphas(params), lk)
    obs = obs + jnp.asarray(0.005 * rng.standard_normal(obs.shape), jnp.float32)
    cfg = refine.RefineConfig(iters=FLAGS.iters)
    runs = []
    for _ in range(2):
        t0 = time.perf_counter()
        res = refine.refine_all_in_focus(params, obs, lk, cfg)
        runs.append({"seconds": time.perf_counter() - t0, "iterations": res.iterations,
                     "evaluations": res.evaluations, "objective_start": res.objective_start,
                     "objective_end": res.objective_end})
    warm = runs[1]
    emit({
        "problem": {"height": h, "width": w, "layers": num_l, "channels": c,
                    "tiles": bank.grid.num_tiles, **kernel_record(bank),
                    "layer_kernel_size": 2 * radius + 1, "fft_shape": list(geom.fft_shape)},
        "iters": FLAGS.iters,
        "runs": runs,
        "s_per_iteration": warm["seconds"] / max(warm["iterations"], 1),
        "evaluations_per_iteration": warm["evaluations"] / max(warm["iterations"], 1),
        "compile_s": runs[0]["seconds"] - warm["seconds"],
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "jax_version": jax.__version__, "device": str(jax.devices()[0]),
        "platform": platform.platform(), "processor": platform.processor() or platform.machine(),
    }, FLAGS.output)


if __name__ == "__main__":
    app.run(main)
