"""DPANet (Li et al. 2022), a supervised dual-pixel deblurring network in plain JAX.

An optional part of dpjax: the core solver never imports it. Parameters are nested
dicts of arrays; `init` and `apply` are pure. Training utilities (losses, a jitted Adam
step, checkpoints) live in `dpjax.dpanet.train`.

Public API:
- DpanetConfig, init, apply, num_params, config_of
- deblur: one [2, H, W, C] capture of any size -> [H, W, C]
- pad_to_multiple, crop: the padding `deblur` uses
"""

from dpjax.dpanet.model import (DpanetConfig, apply, config_of, crop, deblur, init, num_params,
                                pad_to_multiple)

__all__ = ["DpanetConfig", "init", "apply", "num_params", "config_of", "deblur",
           "pad_to_multiple", "crop"]
