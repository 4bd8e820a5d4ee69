"""What the benchmark scripts share: the step problem and how results are written."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, NamedTuple

import jax.numpy as jnp
import numpy as np
from absl import flags

from dpjax import kernels, scene


def emit(result: dict[str, Any], output: str | None, *, indent: int = 2) -> None:
    """Prints a benchmark's JSON object and, when `output` is set, writes it there."""
    text = json.dumps(result, indent=indent)
    print(text)
    if output:
        Path(output).write_text(text + "\n")


class StepProblem(NamedTuple):
    """The loss-and-gradient step benchmarks' problem (bench_step.py, profile_step.py).

    bank: parametric kernels of `kernel_size` on a rows x cols grid of square tiles;
    scales: [L] layer scales from scale_max to scale_min; radius: the largest rescaled
    kernel's half-width (the convolution geometry's)."""

    bank: kernels.KernelBank
    scales: jnp.ndarray
    radius: int


def define_step_flags() -> None:
    """The step problem's flags (defaults: the paper's full 1008x1344 Pixel 4 frame)."""
    flags.DEFINE_integer("rows", 6, "Tile rows.")
    flags.DEFINE_integer("cols", 8, "Tile columns.")
    flags.DEFINE_integer("tile", 168, "Tile side in pixels.")
    flags.DEFINE_integer("kernel_size", 61, "Reference kernel side.")
    flags.DEFINE_integer("num_layers", 12, "MPI layers.")
    flags.DEFINE_float("scale_min", 0.2, "Smallest layer scale.")
    flags.DEFINE_float("scale_max", 1.5, "Largest layer scale.")


def step_problem_of_flags() -> StepProblem:
    """`step_problem` of the flags `define_step_flags` defined."""
    f = flags.FLAGS
    return step_problem(rows=f.rows, cols=f.cols, tile=f.tile, kernel_size=f.kernel_size,
                        num_layers=f.num_layers, scale_min=f.scale_min,
                        scale_max=f.scale_max)


def step_problem(*, rows: int, cols: int, tile: int, kernel_size: int, num_layers: int,
                 scale_min: float, scale_max: float) -> StepProblem:
    """The parametric model through dpjax.scene, as the apps build their banks."""
    source = scene.kernel_source(scene.KernelOptions(
        kind="parametric", grid=(rows, cols), tile_size=tile, radius=kernel_size / 2 - 3,
        smooth=1.0, size=kernel_size), pyramid_factor=1)
    bank = scene.make_bank(source, {})
    scales = jnp.asarray(np.linspace(scale_max, scale_min, num_layers), jnp.float32)
    radius = kernels.rescaled_radius(kernel_size, max(abs(scale_min), abs(scale_max)))
    return StepProblem(bank, scales, radius)
