"""How close can the self-calibration's kernel model get to a lab calibration?

  python experiments/kernel_family_bound.py --calib_dir=../shared/data/pixel4/calibration \
      --output_dir=out/family_bound [--radii=10,10.5,...] [--steps=300]

Fits every shape parameter of `dpjax.kernel_model.DpKernelModel` (smoothing included,
which the self-calibration cannot fit from photos) directly to the calibration's
kernels: Adam on the mean per-kernel L1 distance to the re-centred, unit-sum
calibration, at each radius of --radii (the disc's edge is not differentiated, so the
radius is searched). The best fit is the model family's bound: no self-calibration
with this model can get closer. It is written as a calibration folder on the
calibration's own tile grid and kernel size (with its white sheets, when it has them),
so that a solve with it (`--calib_dir`) measures what the family's shape error alone
costs the image and the defocus map (experiments/results/own_camera.md, "How far the
kernel model is from the lab's"). The parameters and the L1 of every radius go to
OUTPUT/family_fit.json.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags

from dpjax import io, kernel_model, kernels

FLAGS = flags.FLAGS
flags.DEFINE_string("calib_dir", None, "Calibration folder (blur_kernels_{left,right}.npy).")
flags.DEFINE_string("output_dir", None, "Calibration folder to write the best fit to.")
flags.DEFINE_list("radii", [str(r) for r in np.arange(10.0, 14.01, 0.5)],
                  "Radii (px) at which the shape is fitted.")
flags.DEFINE_integer("steps", 300, "Adam steps per radius.")
flags.DEFINE_float("lr", 0.02, "Adam learning rate.")

# Where every fit starts: the self-calibration's Pixel 4 fit (selfcal.md), smoothing
# at the model's default.
START = kernel_model.DpKernelModel(split_gradient=-0.8, softness=0.37, ramp=-0.24)


def family_l1(params: dict, target: jax.Array, positions: jax.Array, radius: jax.Array
              ) -> jax.Array:
    """Mean over views and tiles of sum |k_model - k_target| (0 equal, 2 disjoint)."""
    k = kernel_model.render_kernels_jnp(params, positions, radius=radius,
                                        size=target.shape[-1], supersample=2)
    return jnp.mean(jnp.sum(jnp.abs(k - target), axis=(-2, -1)))


def fit_shape(target: np.ndarray, rows: int, cols: int, radius: float, *,
              steps: int, lr: float, start: kernel_model.DpKernelModel = START
              ) -> tuple[kernel_model.DpKernelModel, float]:
    """The shape parameters closest in L1 to target [2, T, K, K] at one radius."""
    positions = jnp.asarray(kernel_model.tile_positions(rows, cols))
    fixed = {"radius", "softness_edge_power"}  # the gauge, and the profile's (unfitted) form
    z0 = {k: jnp.float32(v) for k, v in start.to_dict().items() if k not in fixed}
    power = jnp.float32(start.softness_edge_power)
    target = jnp.asarray(target, jnp.float32)
    r = jnp.float32(radius)
    opt = optax.adam(lr)

    def loss(z):  # the fitted parameters plus the fixed profile
        return family_l1({**z, "softness_edge_power": power}, target, positions, r)

    @jax.jit
    def run(z):
        def step(carry, _):
            z, state = carry
            updates, state = opt.update(jax.grad(loss)(z), state)
            return (optax.apply_updates(z, updates), state), None
        (z, _), _ = jax.lax.scan(step, (z, opt.init(z)), None, length=steps)
        return z, loss(z)

    z, l1 = run(z0)
    values = {k: float(v) for k, v in z.items()}
    values["softness"] = max(values["softness"], 0.0)
    values["smooth"] = max(values["smooth"], 0.0)
    return kernel_model.DpKernelModel(radius=float(radius),
                                      softness_edge_power=start.softness_edge_power,
                                      **values), float(l1)


def main(argv):
    del argv
    calib = io.load_calibration_kernels(Path(FLAGS.calib_dir))
    rows, cols = calib.grid
    target = kernels.recenter_kernel_pairs(np.asarray(calib.kernels, np.float64))
    target = target / target.sum(axis=(-2, -1), keepdims=True)
    fits = []
    for r in (float(x) for x in FLAGS.radii):
        model, l1 = fit_shape(target, rows, cols, r, steps=FLAGS.steps, lr=FLAGS.lr)
        fits.append({"l1": l1, **model.to_dict()})
        print(json.dumps(fits[-1]), flush=True)
    best = min(fits, key=lambda f: f["l1"])
    model = kernel_model.DpKernelModel(**{k: v for k, v in best.items() if k != "l1"})
    k = kernel_model.render_kernel_pairs(model, rows=rows, cols=cols, size=target.shape[-1])
    l1 = float(np.abs(k - target).sum(axis=(-2, -1)).mean())
    out = Path(FLAGS.output_dir)
    io.save_calibration_kernels(out, io.CalibratedKernels(kernels=k, grid=calib.grid,
                                                          tile_size=calib.tile_size),
                                extra_meta={"family_fit": best})
    io.copy_white_sheets(FLAGS.calib_dir, out)
    (out / "family_fit.json").write_text(json.dumps(
        {"best": best, "l1_rendered": l1, "fits": fits, "steps": FLAGS.steps}, indent=1))
    print(f"best radius {best['radius']}: L1 {l1:.3f} -> {out}")


if __name__ == "__main__":
    flags.mark_flags_as_required(["calib_dir", "output_dir"])
    app.run(main)
