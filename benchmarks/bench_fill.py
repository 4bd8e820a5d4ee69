"""Times the defocus fill (`dpjax.postprocess.fill_defocus`) on one frame size.

A random smooth map and a random textured colour image of --height x --width (default
the full 1008x1344 Pixel 4 frame); the first call includes compilation, the next
--repeats are timed (median reported). Prints one JSON object.

  python benchmarks/bench_fill.py [--height=1008 --width=1344 --channels=1] [--output=...]
"""

import platform
import resource
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from common import emit

from dpjax import postprocess

FLAGS = flags.FLAGS
flags.DEFINE_integer("height", 1008, "Frame height.")
flags.DEFINE_integer("width", 1344, "Frame width.")
flags.DEFINE_integer("channels", 1, "Image channels.")
flags.DEFINE_integer("repeats", 5, "Timed calls after the first.")
flags.DEFINE_string("output", "", "Also write the JSON here.")


def main(argv):
    del argv
    rng = np.random.default_rng(0)
    h, w, c = FLAGS.height, FLAGS.width, FLAGS.channels
    image = jnp.asarray(rng.uniform(0.05, 1.0, (h, w, c)), jnp.float32)
    defocus = jnp.asarray(np.cumsum(rng.standard_normal((h, w)), axis=1) / w, jnp.float32)

    def call():
        t0 = time.perf_counter()
        jax.block_until_ready(postprocess.fill_defocus(defocus, image))
        return time.perf_counter() - t0

    first = call()
    times = [call() for _ in range(FLAGS.repeats)]
    emit({"benchmark": "bench_fill", "shape": [h, w, c], "first_call_s": round(first, 3),
          "median_s": round(float(np.median(times)), 4),
          "compile_s_estimate": round(first - float(np.median(times)), 3),
          "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3),
          "device": str(jax.devices()[0]), "jax": jax.__version__,
          "host": platform.node()}, FLAGS.output)


if __name__ == "__main__":
    app.run(main)
