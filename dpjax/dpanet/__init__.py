"""DPANet (Li et al. 2022), a supervised dual-pixel deblurring network in plain JAX.

An optional part of dpjax: the core solver never imports it. Parameters are nested
dicts of arrays; `init` and `apply` are pure. Training utilities (losses, a jitted Adam
step, checkpoints) live in `dpjax.dpanet.train`; loading a trained model and deblurring
full captures in `dpjax.dpanet.inference`.

Public API:
- DpanetConfig, init, apply, num_params, config_of
- deblur: one [2, H, W, C] capture in one network pass -> [H, W, C]
- pad_to_multiple, crop: the padding `deblur` uses
- load_checkpoint (params, config, file, step, sidecar in one pass), load_model,
  resolve_checkpoint, checkpoint_meta, CheckpointError, MissingCheckpointError:
  trained checkpoints (a ckpt_<step>.npz or a training folder)
- deblur_tiled: one capture of any size in overlapping tiles (bounded memory), in the
  input's intensity scale
"""

from dpjax.dpanet.inference import (
    DEFAULT_OVERLAP,
    DEFAULT_TILE,
    CheckpointError,
    LoadedCheckpoint,
    MissingCheckpointError,
    checkpoint_meta,
    deblur_tiled,
    load_checkpoint,
    load_model,
    resolve_checkpoint,
)
from dpjax.dpanet.model import (
    DpanetConfig,
    apply,
    config_of,
    crop,
    deblur,
    init,
    num_params,
    pad_to_multiple,
)

__all__ = [
    "DEFAULT_OVERLAP",
    "DEFAULT_TILE",
    "CheckpointError",
    "DpanetConfig",
    "LoadedCheckpoint",
    "MissingCheckpointError",
    "apply",
    "checkpoint_meta",
    "config_of",
    "crop",
    "deblur",
    "deblur_tiled",
    "init",
    "load_checkpoint",
    "load_model",
    "num_params",
    "pad_to_multiple",
    "resolve_checkpoint",
]
