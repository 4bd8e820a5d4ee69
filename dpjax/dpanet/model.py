"""DPANet (Li, Yi, Ren, Li, Zuo 2022): dual-pixel alignment network, in plain JAX.

Parameters are nested dicts (and lists) of arrays; `init(key, config)` builds them and
`apply(params, left, right)` runs the network. `apply` reads every structural choice
(widths, block counts, displacement range) from the parameter shapes, so it needs no
config and the parameter pytree is all a jitted caller passes.

Architecture (METHOD.md section 2), with w = config.width and c_k = w * 2^k, k = 0..3:

1. Pre-deblur, shared by the two views (stacked along the batch axis):
   f0 = lrelu(conv3x3(x) -> w); f1 = lrelu(conv3x3/2(f0)); f2 = lrelu(conv3x3/2(f1));
   g2 = RB^1(f2); g1 = RB^2(f1 + up(g2)); g0 = RB^5(f0 + up(g1)).
   Residual blocks here are conv-lrelu-conv + identity.
2. Cost volume: lrelu(correlation(g0_left, g0_right)), (2D+1)^2 = 81 channels at D = 4.
3. Encoder alignment modules (EAM) k = 0..3 at 1/2^k resolution. Features and the
   incoming cost volume are 2x max-pooled first (k > 0). A conv block (3x3 conv -> c_k
   + ReLU, then two conv-ReLU-conv residual blocks), shared by the views; the cost goes
   through two 1x1 convs (-> c_k, ReLU each); per view, a 3x3 conv on
   concat[left, right, cost] gives 18 offsets and 9 mask logits (sigmoid) for a 3x3
   modulated deformable conv c_k -> c_k, shared by the views, applied to that view's
   features. The aligned features are the stage output and the skip; the next stage's
   cost volume is lrelu(correlation) of the aligned features.
4. Bottleneck at 1/16: max-pool, a conv block c_3 -> c_3 per view (shared), concat
   (2 c_3 = 1024 at w = 64).
5. Decoder alignment modules (DAM), from 1/8 up to full resolution: bilinear x2
   upsampling, 2x2 conv (SAME: pads bottom/right) to half the channels + ReLU, giving u;
   per view, a 3x3 conv on concat[left skip, right skip, u] drives a modulated
   deformable conv (shared by the views) on that view's skip; concat[aligned left,
   aligned right, u] (3 c_k) goes through a conv block to c_k.
6. Head: 3x3 conv w -> w + ReLU, 3x3 conv -> C, sigmoid.

Choices where METHOD.md is silent or ambiguous:
- Pre-deblur activations are leaky ReLU 0.1 (the bullet names it); the pyramid is
  coarse-to-fine: each level's residual blocks run after the coarser level has been
  upsampled and added, and the strided convs branch off the stem features f0/f1.
- EAM/DAM conv blocks and 1x1 cost convs use ReLU; the deformable conv has no
  activation after it.
- Cost volumes are pooled with the same 2x max-pool as the features. The cost volume
  after the last EAM would feed nothing and is not computed.
- The offset/mask convs are separate per view (METHOD.md says "per view" and names
  weight sharing only for the conv blocks and the deformable conv); both see
  concat[left, right, cost or u] in that order. They are zero-initialised (DCNv2's
  convention: zero offsets, mask 0.5 at the start).
- DAM skips are the EAM outputs (aligned features); "half the channels" of the fusion
  conv block means half the DAM's input channels (1536 -> 512, 768 -> 256, ...).
- Other convs: He-normal weights, zero biases; the second conv of every residual block
  starts at 0.1x that scale so the deep residual stacks begin close to the identity.

Parameter count at width 64: 60,847,153 (1 channel) and 60,849,459 (3 channels), i.e.
about 61 M against the paper's "about 64 M" (-5%): encoder 19.1 M, bottleneck 11.8 M,
decoder 29.3 M, pre-deblur 0.67 M, head 0.04 M.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dpjax.dpanet import ops

Params = dict[str, Any]

MULTIPLE = 16  # H and W must be multiples of this (four 2x reductions)


@dataclasses.dataclass(frozen=True, kw_only=True)
class DpanetConfig:
    """Network shape.

    Attributes:
      width: channels of the first stage; stages use width * (1, 2, 4, 8)
        (64 gives the paper's 64, 128, 256, 512).
      channels: image channels C of the views and the output (1 Pixel green, 3 RGB).
      max_displacement: D of the correlation layer (cost volume (2D+1)^2 channels).
      pre_blocks: residual blocks of the pre-deblur pyramid at full, 1/2, 1/4 resolution.
      res_blocks: residual blocks in every EAM/DAM/bottleneck conv block.
    """

    width: int = 64
    channels: int = 1
    max_displacement: int = 4
    pre_blocks: tuple[int, int, int] = (5, 2, 1)
    res_blocks: int = 2

    def __post_init__(self):
        object.__setattr__(self, "pre_blocks", tuple(int(b) for b in self.pre_blocks))
        if self.width < 1 or self.channels < 1:
            raise ValueError(f"width and channels must be positive, got {self.width}, "
                             f"{self.channels}")
        if self.max_displacement < 0:
            raise ValueError(f"max_displacement must be >= 0, got {self.max_displacement}")
        if len(self.pre_blocks) != 3 or min(self.pre_blocks) < 0 or self.res_blocks < 0:
            raise ValueError("pre_blocks must be 3 counts >= 0 and res_blocks >= 0")

    @property
    def stage_widths(self) -> tuple[int, int, int, int]:
        return tuple(self.width * m for m in (1, 2, 4, 8))

    @property
    def cost_channels(self) -> int:
        return (2 * self.max_displacement + 1) ** 2

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (tuples become lists); inverse: DpanetConfig(**d)."""
        d = dataclasses.asdict(self)
        d["pre_blocks"] = list(self.pre_blocks)
        return d


# ----------------------------------------------------------------------------- init


class _Keys:
    """Deterministic stream of PRNG keys: fold_in(key, 0), fold_in(key, 1), ..."""

    def __init__(self, key: jax.Array):
        self._key = key
        self._count = 0

    def __call__(self) -> jax.Array:
        self._count += 1
        return jax.random.fold_in(self._key, self._count)


def _conv(keys: _Keys, k: int, cin: int, cout: int, scale: float = 1.0) -> Params:
    std = scale * math.sqrt(2.0 / (k * k * cin))
    return {"w": std * jax.random.normal(keys(), (k, k, cin, cout), jnp.float32),
            "b": jnp.zeros((cout,), jnp.float32)}


def _zero_conv(k: int, cin: int, cout: int) -> Params:
    return {"w": jnp.zeros((k, k, cin, cout), jnp.float32), "b": jnp.zeros((cout,), jnp.float32)}


def _res_block(keys: _Keys, c: int) -> Params:
    return {"conv1": _conv(keys, 3, c, c), "conv2": _conv(keys, 3, c, c, scale=0.1)}


def _conv_block(keys: _Keys, cin: int, cout: int, num_res: int) -> Params:
    return {"conv": _conv(keys, 3, cin, cout),
            "blocks": [_res_block(keys, cout) for _ in range(num_res)]}


def _aligner(keys: _Keys, guide_channels: int, c: int) -> Params:
    """Per-view offset/mask convs (27 = 18 offsets + 9 mask logits) and a shared DCN."""
    return {"offset_left": _zero_conv(3, guide_channels, 27),
            "offset_right": _zero_conv(3, guide_channels, 27),
            "dcn": _conv(keys, 3, c, c)}


@functools.partial(jax.jit, static_argnames="config")
def init(key: jax.Array, config: DpanetConfig) -> Params:
    """Initial parameters (see the module docstring for the initialisation).

    Jitted (config is static and hashable): run eagerly, the ~100 random draws of
    distinct shapes would each compile on their own (over 20 s at width 8 on CPU).
    Use `jax.eval_shape(functools.partial(init, config=config), key)` to get shapes
    without allocating.
    """
    keys = _Keys(key)
    w, cc = config.width, config.cost_channels
    widths = config.stage_widths
    pre = {"stem": _conv(keys, 3, config.channels, w),
           "down": [_conv(keys, 3, w, w), _conv(keys, 3, w, w)],
           "blocks": [[_res_block(keys, w) for _ in range(n)] for n in config.pre_blocks]}
    enc = []
    cin = w
    for c in widths:
        enc.append({"block": _conv_block(keys, cin, c, config.res_blocks),
                    "cost": [_conv(keys, 1, cc, c), _conv(keys, 1, c, c)],
                    **_aligner(keys, 3 * c, c)})
        cin = c
    bottleneck = _conv_block(keys, widths[-1], widths[-1], config.res_blocks)
    dec = []
    cin = 2 * widths[-1]
    for c in reversed(widths):
        dec.append({"up": _conv(keys, 2, cin, c),
                    **_aligner(keys, 3 * c, c),
                    "fuse": _conv_block(keys, 3 * c, c, config.res_blocks)})
        cin = c
    head = [_conv(keys, 3, w, w), _conv(keys, 3, w, config.channels)]
    return {"pre": pre, "enc": enc, "bottleneck": bottleneck, "dec": dec, "head": head}


def num_params(params: Params) -> int:
    """Number of scalars in a parameter pytree (arrays or jax.ShapeDtypeStruct)."""
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(params))


def config_of(params: Params) -> DpanetConfig:
    """The DpanetConfig that `init` would have used for these parameter shapes."""
    cost_channels = params["enc"][0]["cost"][0]["w"].shape[2]
    side = math.isqrt(cost_channels)
    return DpanetConfig(width=params["pre"]["stem"]["w"].shape[3],
                        channels=params["pre"]["stem"]["w"].shape[2],
                        max_displacement=(side - 1) // 2,
                        pre_blocks=tuple(len(b) for b in params["pre"]["blocks"]),
                        res_blocks=len(params["bottleneck"]["blocks"]))


# ---------------------------------------------------------------------------- apply


def _apply_conv(p: Params, x: jax.Array, **kwargs) -> jax.Array:
    return ops.conv2d(x, p["w"], p["b"], **kwargs)


def _res_blocks(blocks: list[Params], x: jax.Array, act) -> jax.Array:
    for p in blocks:
        x = x + _apply_conv(p["conv2"], act(_apply_conv(p["conv1"], x)))
    return x


def _apply_conv_block(p: Params, x: jax.Array) -> jax.Array:
    x = jax.nn.relu(_apply_conv(p["conv"], x))
    return _res_blocks(p["blocks"], x, jax.nn.relu)


def _pre_deblur(p: Params, x: jax.Array) -> jax.Array:
    """x: [B, H, W, C] -> [B, H, W, width] (B = 2N, both views)."""
    stride2 = {"stride": 2, "padding": ((1, 1), (1, 1))}
    f0 = ops.leaky_relu(_apply_conv(p["stem"], x))
    f1 = ops.leaky_relu(_apply_conv(p["down"][0], f0, **stride2))  # [B, H/2, W/2, w]
    f2 = ops.leaky_relu(_apply_conv(p["down"][1], f1, **stride2))  # [B, H/4, W/4, w]
    blocks_full, blocks_half, blocks_quarter = p["blocks"]
    g2 = _res_blocks(blocks_quarter, f2, ops.leaky_relu)
    g1 = _res_blocks(blocks_half, f1 + ops.upsample2(g2), ops.leaky_relu)
    return _res_blocks(blocks_full, f0 + ops.upsample2(g1), ops.leaky_relu)


def _cost_volume(feat: jax.Array, n: int, max_disp: int) -> jax.Array:
    """feat: [2N, h, w, c] (left then right) -> [N, h, w, (2D+1)^2]."""
    return ops.leaky_relu(ops.correlation(feat[:n], feat[n:], max_disp))


def _align(p: Params, feat: jax.Array, guide: jax.Array, n: int) -> jax.Array:
    """Deformably align each view's features.

    Args:
      feat: [2N, h, w, c] left then right features.
      guide: [N, h, w, g] what the offsets are predicted from.

    Returns:
      [2N, h, w, c] aligned features.
    """
    raw = jnp.concatenate([_apply_conv(p["offset_left"], guide),
                           _apply_conv(p["offset_right"], guide)], axis=0)  # [2N, h, w, 27]
    offsets, mask = raw[..., :18], jax.nn.sigmoid(raw[..., 18:])
    return ops.modulated_deform_conv(feat, offsets, mask, p["dcn"]["w"], p["dcn"]["b"])


def _eam(p: Params, feat: jax.Array, cost: jax.Array, n: int) -> jax.Array:
    """feat: [2N, h, w, c_in], cost: [N, h, w, (2D+1)^2] -> aligned [2N, h, w, c]."""
    feat = _apply_conv_block(p["block"], feat)
    cost = jax.nn.relu(_apply_conv(p["cost"][0], cost))
    cost = jax.nn.relu(_apply_conv(p["cost"][1], cost))  # [N, h, w, c]
    guide = jnp.concatenate([feat[:n], feat[n:], cost], axis=-1)  # [N, h, w, 3c]
    return _align(p, feat, guide, n)


def _dam(p: Params, dec: jax.Array, skip: jax.Array, n: int) -> jax.Array:
    """dec: [N, h/2, w/2, c_in], skip: [2N, h, w, c] -> [N, h, w, c]."""
    up = jax.nn.relu(_apply_conv(p["up"], ops.upsample2(dec)))  # [N, h, w, c]
    guide = jnp.concatenate([skip[:n], skip[n:], up], axis=-1)  # [N, h, w, 3c]
    aligned = _align(p, skip, guide, n)
    fused = jnp.concatenate([aligned[:n], aligned[n:], up], axis=-1)
    return _apply_conv_block(p["fuse"], fused)


def check_views(left: jax.Array, right: jax.Array, channels: int | None = None) -> None:
    """Raise ValueError unless left/right are equal [N, H, W, C] with H, W % 16 == 0."""
    if left.ndim != 4 or left.shape != right.shape:
        raise ValueError(f"left and right must be equal [N, H, W, C] arrays, got "
                         f"{left.shape} and {right.shape}")
    _, h, w, c = left.shape
    if h % MULTIPLE or w % MULTIPLE:
        raise ValueError(f"DPANet needs H and W divisible by {MULTIPLE}, got {h}x{w}; "
                         "pad with dpjax.dpanet.pad_to_multiple (or use deblur)")
    if channels is not None and c != channels:
        raise ValueError(f"views have {c} channels, the network expects {channels}")


def apply(params: Params, left: jax.Array, right: jax.Array) -> jax.Array:
    """Deblur a batch of dual-pixel pairs.

    Args:
      params: from `init`.
      left, right: [N, H, W, C] views, intensities about [0, 1]; H, W divisible by 16.

    Returns:
      [N, H, W, C] all-in-focus estimate in (0, 1).
    """
    check_views(left, right, params["pre"]["stem"]["w"].shape[2])
    n = left.shape[0]
    max_disp = (math.isqrt(params["enc"][0]["cost"][0]["w"].shape[2]) - 1) // 2
    feat = _pre_deblur(params["pre"], jnp.concatenate([left, right], axis=0))  # [2N, H, W, w]
    cost = _cost_volume(feat, n, max_disp)  # [N, H, W, (2D+1)^2]
    skips = []
    for k, stage in enumerate(params["enc"]):
        if k > 0:
            feat, cost = ops.max_pool2(feat), ops.max_pool2(cost)
        feat = _eam(stage, feat, cost, n)  # [2N, H/2^k, W/2^k, c_k]
        skips.append(feat)
        if k + 1 < len(params["enc"]):
            cost = _cost_volume(feat, n, max_disp)
    bottom = _apply_conv_block(params["bottleneck"], ops.max_pool2(feat))  # [2N, H/16, W/16, c_3]
    dec = jnp.concatenate([bottom[:n], bottom[n:]], axis=-1)  # [N, H/16, W/16, 2 c_3]
    for stage, skip in zip(params["dec"], reversed(skips)):
        dec = _dam(stage, dec, skip, n)
    y = jax.nn.relu(_apply_conv(params["head"][0], dec))
    return jax.nn.sigmoid(_apply_conv(params["head"][1], y))


def pad_to_multiple(x: jax.Array, multiple: int = MULTIPLE) -> tuple[jax.Array, tuple[int, int]]:
    """Edge-pad the bottom/right of [..., H, W, C] so H and W are multiples.

    Edge (not reflect) padding works for any image size, including sides < multiple.

    Returns:
      The padded array and the original (H, W), for `crop`.
    """
    h, w = x.shape[-3], x.shape[-2]
    pad_h, pad_w = -h % multiple, -w % multiple
    widths = [(0, 0)] * (x.ndim - 3) + [(0, pad_h), (0, pad_w), (0, 0)]
    return jnp.pad(x, widths, mode="edge"), (h, w)


def crop(x: jax.Array, hw: tuple[int, int]) -> jax.Array:
    """Undo `pad_to_multiple`: keep the top-left [..., H, W, C]."""
    return x[..., :hw[0], :hw[1], :]


_apply_jit = jax.jit(apply)


def deblur(params: Params, config: DpanetConfig, views: jax.Array) -> jax.Array:
    """Deblur one dual-pixel capture of any size (padded to 16 and cropped back).

    Args:
      params: from `init` or a checkpoint, matching config.
      config: the network's config (checked against the parameters).
      views: [2, H, W, C] left and right views.

    Returns:
      [H, W, C] all-in-focus estimate in (0, 1).
    """
    if config_of(params) != config:
        raise ValueError(f"parameters were built for {config_of(params)}, not {config}")
    views = jnp.asarray(views, jnp.float32)
    if views.ndim != 4 or views.shape[0] != 2 or views.shape[-1] != config.channels:
        raise ValueError(f"views must be [2, H, W, {config.channels}], got {views.shape}")
    padded, hw = pad_to_multiple(views)
    out = _apply_jit(params, padded[:1], padded[1:])  # [1, H', W', C]
    return crop(out[0], hw)
