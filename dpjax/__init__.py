"""dpjax: dual-pixel defocus-map estimation and deblurring in JAX.

Public API (see README.md):
- kernels: KernelBank, TileGrid, parametric_bank, parametric_dp_kernels, rescale_kernels,
  recenter_kernel_pairs
- kernel model (cameras without a calibration): DpKernelModel, render_kernel_pairs;
  fitting it to a camera's own DP pairs: dpjax.selfcal.fit_kernel_model
- configuration: Config, MpiConfig, SolverConfig, LossWeights, PostConfig
- solving: fit, fit_batch, FitResult, Progress
- synthetic data: make_scene, SyntheticScene
"""

from dpjax.config import Config, MpiConfig, SolverConfig
from dpjax.kernel_model import DpKernelModel, render_kernel_pairs
from dpjax.kernels import (
                           KernelBank,
                           TileGrid,
                           parametric_bank,
                           parametric_dp_kernels,
                           recenter_kernel_pairs,
                           rescale_kernels,
)
from dpjax.losses import LossTerms, LossWeights
from dpjax.mpi import MpiParams
from dpjax.postprocess import PostConfig
from dpjax.solver import FitResult, Progress, fit, fit_batch
from dpjax.synthetic import SyntheticScene, make_scene

__version__ = "0.1.0"

__all__ = [
                           "Config",
                           "DpKernelModel",
                           "FitResult",
                           "KernelBank",
                           "LossTerms",
                           "LossWeights",
                           "MpiConfig",
                           "MpiParams",
                           "PostConfig",
                           "Progress",
                           "SolverConfig",
                           "SyntheticScene",
                           "TileGrid",
                           "fit",
                           "fit_batch",
                           "make_scene",
                           "parametric_bank",
                           "parametric_dp_kernels",
                           "recenter_kernel_pairs",
                           "render_kernel_pairs",
                           "rescale_kernels",
]
