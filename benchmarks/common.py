"""What the benchmark scripts share: the step problem and how results are written."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, NamedTuple

import jax.numpy as jnp
import numpy as np
from absl import flags

from dpjax import config, kernels, scene


def emit(result: dict[str, Any], output: str | None, *, indent: int = 2) -> None:
    """Prints a benchmark's JSON object and, when `output` is set, writes it there."""
    text = json.dumps(result, indent=indent)
    print(text)
    if output:
        Path(output).write_text(text + "\n")


class StepProblem(NamedTuple):
    """The loss-and-gradient step benchmarks' problem (bench_step.py, profile_step.py).

    bank: parametric kernels of `kernel_size` on a rows x cols grid of square tiles;
    scales: [L] layer scales from scale_max to scale_min; radius: the layer kernels'
    half-width (`kernels.layer_kernel_radius`, the convolution geometry's)."""

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
    flags.DEFINE_string("calib_dir", None, "Calibrated kernels (blur_kernels_{left,right}"
                        ".npy) instead of the parametric model; their grid must be "
                        "rows x cols (the Pixel 4's: ../shared/data/pixel4/calibration).")
    flags.DEFINE_float("kernel_mass_cut", config.SolverConfig().kernel_mass_cut,
                       "Layer kernels cut to the window holding all but this fraction of "
                       "their mass (SolverConfig.kernel_mass_cut; 0: the whole window).")


def kernel_record(bank: kernels.KernelBank) -> dict[str, Any]:
    """What a benchmark's JSON records of the step problem's kernels (the flags')."""
    f = flags.FLAGS
    return {"kernel_size": bank.kernel_size, "calib_dir": f.calib_dir,
            "kernel_mass_cut": f.kernel_mass_cut}


def step_problem_of_flags() -> StepProblem:
    """`step_problem` of the flags `define_step_flags` defined."""
    f = flags.FLAGS
    return step_problem(rows=f.rows, cols=f.cols, tile=f.tile, kernel_size=f.kernel_size,
                        num_layers=f.num_layers, scale_min=f.scale_min,
                        scale_max=f.scale_max, mass_cut=f.kernel_mass_cut,
                        calib_dir=f.calib_dir)


def step_problem(*, rows: int, cols: int, tile: int, kernel_size: int, num_layers: int,
                 scale_min: float, scale_max: float,
                 mass_cut: float = config.SolverConfig().kernel_mass_cut,
                 calib_dir: str | None = None) -> StepProblem:
    """The parametric model (or the calibration in `calib_dir`, whose own kernel side
    replaces `kernel_size`) through dpjax.scene, as the apps build their banks."""
    if calib_dir is None:
        opts = scene.KernelOptions(kind="parametric", grid=(rows, cols), tile_size=tile,
                                   radius=kernel_size / 2 - 3, smooth=1.0, size=kernel_size)
    else:
        opts = scene.KernelOptions(calib_dir=Path(calib_dir), grid=(rows, cols),
                                   tile_size=tile)
    source = scene.kernel_source(opts, pyramid_factor=1)
    if calib_dir is not None and (source.grid, source.tile_size) != ((rows, cols), tile):
        raise ValueError(f"{calib_dir} has {source.grid[0]}x{source.grid[1]} kernel tiles of "
                         f"{source.tile_size} px, the problem {rows}x{cols} of {tile} px")
    bank = scene.make_bank(source, {})
    scales = jnp.asarray(np.linspace(scale_max, scale_min, num_layers), jnp.float32)
    radius = kernels.layer_kernel_radius(bank.kernel_size,
                                         max(abs(scale_min), abs(scale_max)),
                                         kernels.support_radius(bank.kernels, mass_cut))
    return StepProblem(bank, scales, radius)
