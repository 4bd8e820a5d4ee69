"""Times one loss-and-gradient evaluation at the paper's full size, FFT vs direct.

Problem: 1008x1344 px, 12 layers, 6x8 tiles of 168 px, 61x61 reference kernels
(rescaled to the layer scales, so the largest layer kernel is bigger), two views,
one channel. Prints one JSON object.

  python benchmarks/bench_step.py [--repeats=3] [--methods=fft,direct]

--scan_steps=N also times N Adam steps inside one jitted lax.scan, as the solver runs
them ("ms_per_step_in_scan"): a lone step allocates its temporaries at every call.

The cost of colour: --channels=1,3 times each method with 1 and 3 channels on the same
problem (the layer weights are shared across channels, the colours are not) and
reports the ratio ("colour_over_grey").
"""

import platform
import resource
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags
from common import define_step_flags, emit, kernel_record, step_problem_of_flags

from dpjax import conv, losses, mpi

FLAGS = flags.FLAGS
flags.DEFINE_integer("repeats", 3, "Timed evaluations per method (after one warm-up).")
flags.DEFINE_list("methods", ["fft", "direct"], "Convolution paths to time.")
flags.DEFINE_list("channels", ["1"], "Channel counts to time (e.g. 1,3).")
flags.DEFINE_integer("scan_steps", 0, "Also time this many Adam steps inside one jitted "
                     "lax.scan, as the solver runs them (0: skip). A lone jitted step "
                     "allocates its temporaries afresh at every call; in the solver's "
                     "loop they are allocated once per chunk.")
flags.DEFINE_string("output", "", "Also write the JSON here.")
define_step_flags()


def _peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _xla_memory_gib(fn, *args) -> dict[str, float] | None:
    """XLA's own accounting of the compiled step (arguments, outputs, temporaries), GiB.

    Unlike the process's peak RSS it does not depend on other jobs or the allocator;
    None where the backend does not report it.
    """
    try:
        stats = fn.lower(*args).compile().memory_analysis()
    except (NotImplementedError, RuntimeError):
        return None
    if stats is None:
        return None
    names = ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes",
             "generated_code_size_in_bytes")
    return {n.removesuffix("_size_in_bytes"): getattr(stats, n) / 2**30 for n in names
            if hasattr(stats, n)}


def main(argv):
    del argv
    rng = np.random.default_rng(0)
    bank, scales, radius = step_problem_of_flags()
    grid = bank.grid
    h, w = grid.image_shape
    channels = [int(c) for c in FLAGS.channels]
    weights = losses.LossWeights()
    result = {
        "problem": {"height": h, "width": w, "layers": FLAGS.num_layers, "tiles": grid.num_tiles,
                    **kernel_record(bank), "layer_kernel_size": 2 * radius + 1,
                    "views": 2, "channels": channels[0] if len(channels) == 1 else channels},
        "jax_version": jax.__version__,
        "device": str(jax.devices()[0]),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
    }

    @jax.jit
    def step(params, obs, lk):
        return jax.value_and_grad(lambda p: losses.loss_terms(p, obs, lk, weights).total)(params)

    adam = optax.adam(0.05)

    @jax.jit
    def scan_steps(params, obs, lk):
        def body(carry, _):
            p, state = carry
            value, grad = jax.value_and_grad(
                lambda p: losses.loss_terms(p, obs, lk, weights).total)(p)
            updates, state = adam.update(grad, state, p)
            return (optax.apply_updates(p, updates), state), value
        return jax.lax.scan(body, (params, adam.init(params)), None, length=FLAGS.scan_steps)

    for method in FLAGS.methods:
        geom = conv.ConvGeometry.create(grid, radius, method)
        lk = jax.jit(mpi.prepare_layer_kernels, static_argnames="geom")(bank, scales, geom)
        for c in channels:
            obs = jnp.asarray(rng.random((2, c, h, w)) * 0.5 + 0.25, jnp.float32)
            params = mpi.init_params(obs, FLAGS.num_layers)
            memory = _xla_memory_gib(step, params, obs, lk)
            t0 = time.perf_counter()
            jax.block_until_ready(step(params, obs, lk))
            compile_and_first = time.perf_counter() - t0
            times = []
            for _ in range(FLAGS.repeats):
                t0 = time.perf_counter()
                jax.block_until_ready(step(params, obs, lk))
                times.append(time.perf_counter() - t0)
            key = method if len(channels) == 1 else f"{method}_c{c}"
            in_scan = None
            if FLAGS.scan_steps > 0:
                jax.block_until_ready(scan_steps(params, obs, lk))  # compile and warm up
                t0 = time.perf_counter()
                jax.block_until_ready(scan_steps(params, obs, lk))
                in_scan = 1e3 * (time.perf_counter() - t0) / FLAGS.scan_steps
            result[key] = {"ms_per_step": 1e3 * float(np.median(times)),
                           "ms_per_step_in_scan": in_scan,
                           "ms_all": [1e3 * t for t in times],
                           "first_call_s": compile_and_first,
                           "fft_shape": list(geom.fft_shape),
                           "peak_rss_gib_so_far": _peak_rss_gib(),
                           "xla_memory_gib": memory}
        if len(channels) > 1:
            result[f"{method}_colour_over_grey"] = (
                result[f"{method}_c{max(channels)}"]["ms_per_step"]
                / result[f"{method}_c{min(channels)}"]["ms_per_step"])
    if "fft" in result and "direct" in result:
        result["direct_over_fft"] = result["direct"]["ms_per_step"] / result["fft"]["ms_per_step"]
    result["peak_rss_gib"] = _peak_rss_gib()
    emit(result, FLAGS.output)


if __name__ == "__main__":
    app.run(main)
