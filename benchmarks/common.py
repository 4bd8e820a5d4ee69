"""What the benchmark scripts share: the step problem and how results are written."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, NamedTuple

import jax.numpy as jnp
import numpy as np

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
