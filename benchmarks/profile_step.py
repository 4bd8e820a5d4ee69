"""Where one loss-and-gradient step's time and memory go, stage by stage.

The problem of bench_step.py (default: the full 1008x1344 Pixel 4 frame, 12 layers,
6x8 tiles of 168 px, 61-px kernels, FFT path). Each stage is its own jitted function,
timed alone (median of --repeats after a warm-up) forward, and where it matters
forward + backward (a vector-Jacobian product with a random cotangent); the last two
rows are the whole loss, forward and with its gradient, as the solver runs them. XLA's
memory report of the compiled whole step (arguments, outputs, temporaries) is included.
The FFT stages are one layer's (the loss loops over the layers, `losses.data_terms`);
the data and prior terms are all layers'. Stages overlap in the fused whole step, so
they need not add up to it.

  python benchmarks/profile_step.py [--channels=1] [--repeats=3] [--output=FILE.json]
"""

import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from common import define_step_flags, emit, kernel_record, step_problem_of_flags

from dpjax import conv, losses, mpi

FLAGS = flags.FLAGS
flags.DEFINE_integer("repeats", 3, "Timed calls per stage (after one warm-up).")
flags.DEFINE_integer("channels", 1, "Colour channels.")
flags.DEFINE_string("output", "", "Also write the JSON here.")
define_step_flags()


def _time(fn, *args) -> dict[str, float]:
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    first = time.perf_counter() - t0
    times = []
    for _ in range(FLAGS.repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return {"ms": round(1e3 * float(np.median(times)), 1), "first_call_s": round(first, 2)}


def _with_vjp(fn):
    """fn's forward and backward: its output and the VJP of a constant cotangent (both
    returned, so that XLA cannot drop the forward pass of a linear stage)."""
    def both(*args):
        out, pull = jax.vjp(fn, *args)
        ct = jax.tree_util.tree_map(lambda o: jnp.full_like(o, 0.5), out)
        return out, pull(ct)
    return jax.jit(both)


def main(argv):
    del argv
    rng = np.random.default_rng(0)
    bank, scales, radius = step_problem_of_flags()
    grid = bank.grid
    h, w = grid.image_shape
    L, C = FLAGS.num_layers, FLAGS.channels
    geom = conv.ConvGeometry.create(grid, radius, "fft")
    lk = jax.jit(mpi.prepare_layer_kernels, static_argnames="geom")(bank, scales, geom)
    obs = jnp.asarray(rng.random((2, C, h, w)) * 0.5 + 0.25, jnp.float32)
    params = mpi.init_params(obs, L)
    weights = losses.LossWeights()
    s = 2 * C + 1
    # The loss blurs one layer at a time (losses.data_terms): the FFT stages are timed
    # for one layer's S signals and both views; the loss runs them L times.
    signals = jnp.asarray(rng.random((1, s, h, w)), jnp.float32)
    padded = conv.pad_edges(signals, radius)
    spec = jax.jit(lambda x: conv.tile_spectra(x, geom))(padded)
    one_layer = jax.tree_util.tree_map(lambda x: x[0], mpi.layer_kernel_slices(lk))
    color, alpha = mpi.colors(params), mpi.alphas(params)
    norm = 0.5 / jnp.mean(obs)

    def forward_fft(x):
        return conv.tile_spectra(x, geom)

    def multiply_inverse(sp):
        return conv.apply_spectra(sp[None], one_layer.spectra[:, :, None], geom)

    def blur(x):
        return mpi.blur_layers(x, one_layer)

    def data(c, a):  # all layers: blur, composite, terms 1 and 2
        return sum(losses.data_terms(c, a, obs, lk, weights))

    def priors(c, a):  # terms 3 to 5
        return sum(losses.prior_terms(c, a, norm, weights))

    def loss(p):
        return losses.loss_terms(p, obs, lk, weights).total

    stages = {
        "tile_fft_forward_one_layer": (forward_fft, (padded,)),
        "multiply_and_inverse_fft_one_layer": (multiply_inverse, (spec,)),
        "blur_one_layer": (blur, (signals,)),
        "data_terms": (data, (color, alpha)),
        "prior_terms": (priors, (color, alpha)),
    }
    result: dict = {
        "problem": {"height": h, "width": w, "layers": L, "channels": C, "tiles": grid.num_tiles,
                    "signals_per_layer": s, "fft_shape": list(geom.fft_shape),
                    "layer_kernel_size": 2 * radius + 1, **kernel_record(bank),
                    "transforms_per_step_forward": {"forward": L * s * grid.num_tiles,
                                                    "inverse": 2 * L * s * grid.num_tiles},
                    "layers_per_step": L},
        "jax_version": jax.__version__, "device": str(jax.devices()[0]),
        "platform": platform.platform(), "stages": {},
    }
    for name, (fn, args) in stages.items():
        result["stages"][name] = {"forward": _time(jax.jit(fn), *args),
                                  "forward_backward": _time(_with_vjp(fn), *args)}
    step = jax.jit(jax.value_and_grad(loss))
    result["stages"]["loss"] = {"forward": _time(jax.jit(loss), params),
                                "forward_backward": _time(step, params)}
    try:
        stats = step.lower(params).compile().memory_analysis()
        result["xla_memory_gib"] = {
            n: round(getattr(stats, f"{n}_size_in_bytes") / 2**30, 3)
            for n in ("argument", "output", "temp", "generated_code")
            if hasattr(stats, f"{n}_size_in_bytes")}
    except (NotImplementedError, RuntimeError, AttributeError):
        result["xla_memory_gib"] = None
    emit(result, FLAGS.output)


if __name__ == "__main__":
    app.run(main)
