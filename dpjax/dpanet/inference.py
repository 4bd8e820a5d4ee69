"""Using a trained DPANet: load a checkpoint, deblur a full capture tile by tile.

A library: no flags, no printing. The apps (`experiments/reproduce_table.py`,
`run_solver.py --method=dpanet`) call `resolve_checkpoint`, `load_model` and
`deblur_tiled`.

Checkpoints. `load_model` reads the parameters of a `ckpt_<step>.npz` written by
`dpjax.dpanet.train.save_checkpoint` (the optimiser state stored beside them, twice
the parameters' size, is never read) and rebuilds the DpanetConfig from its JSON
sidecar. A training output folder stands for its latest complete checkpoint. Every
problem (missing file or sidecar, unreadable archive, unsupported format, arrays
missing, extra, of the wrong shape or non-finite) raises a `CheckpointError` that
names the file; a missing path raises `MissingCheckpointError`, which is also a
FileNotFoundError.

Intensity scale. The network ends in a sigmoid, so it outputs (0, 1). It was trained
(`dpjax.dpanet.data`) on views in [0, 1] whose frame maximum is about 1: the real crops
come from Pixel 4 frames divided by their joint maximum (what `dpjax.io` loaders
return), the synthetic patches from [0, 1] scenes at exposures 0.3-1, clipped; the
targets share the views' scale. `deblur_tiled` therefore divides the capture by its
joint maximum (one factor for the whole frame, never per tile, so every tile sees the
same scale) and multiplies the output back: the result is in the input's scale, and
for views loaded by `dpjax.io` (maximum 1) the factor is 1.

Tiling. Memory grows with the image: at width 64 the first encoder stage's deformable
convolution alone gathers a [2, H, W, 9, 64] float32 tensor, about 6 GB for a
1008x1344 frame (0.3 GB for a 256x256 window), and it is built corner by corner, so a
single pass over a full frame needs well over 10 GB (estimated, not measured). So
`deblur_tiled` runs the network on overlapping `tile` x `tile` windows, one call of
`batch_tiles` windows at a time, and blends them on the host:
- the capture is edge-padded to a multiple of 16 at the bottom/right (as `deblur`
  does) and cropped back at the end; a side that fits in one tile is one window;
- window origins are multiples of 16 (the network's total stride), so a window
  computes what a single pass would wherever its receptive field lies inside it;
  neighbours overlap by at least `overlap` px, the last window ends at the border;
- blending weights along each axis (`tile_weights`) are 0 for the `overlap / 4` px
  next to an edge shared with another window, rise linearly over the next
  `overlap / 2` px and are 1 beyond; neighbours' ramps sum to 1, and the output is the
  weighted sum divided by the summed weights. Image borders get weight 1.
So a network whose receptive field radius is at most overlap / 4 px gives exactly the
single-pass output, and an image that fits in one tile is one single pass. DPANet's
receptive field is far larger (the 1/16-resolution bottleneck and the encoder and
decoder stages each add tens of px, hundreds in all), so tiled and single-pass outputs
differ by a small amount near the seams, which the ramps spread out instead of leaving
an edge; a larger `overlap` makes the difference smaller, a larger `tile` makes it
rarer.
"""

from __future__ import annotations

import functools
import zipfile
from pathlib import Path
from typing import NamedTuple

import jax
import numpy as np

from dpjax.dpanet import model as model_lib
from dpjax.dpanet import train
from dpjax.dpanet.model import MULTIPLE, DpanetConfig, Params

__all__ = [
    "DEFAULT_OVERLAP",
    "DEFAULT_TILE",
    "CheckpointError",
    "LoadedCheckpoint",
    "MissingCheckpointError",
    "check_tiling",
    "checkpoint_meta",
    "deblur_tiled",
    "load_checkpoint",
    "load_model",
    "resolve_checkpoint",
    "tile_starts",
    "tile_weights",
]

DEFAULT_TILE = 256
DEFAULT_OVERLAP = 32


class CheckpointError(ValueError):
    """A DPANet checkpoint that cannot be used (the message names the file)."""


class MissingCheckpointError(CheckpointError, FileNotFoundError):
    """No checkpoint at the given path (a CheckpointError and a FileNotFoundError)."""


# ----------------------------------------------------------------------------- loading


def resolve_checkpoint(path: str | Path) -> Path:
    """The .npz of a checkpoint: the file itself, its .json sidecar's, or a folder's latest.

    Args:
      path: a `ckpt_<step>.npz` (or its `.json`), or a training output folder (the
        highest-step checkpoint whose .npz and .json both exist).

    Raises:
      MissingCheckpointError: nothing usable at path.
    """
    path = Path(path)
    if not path.exists():
        raise MissingCheckpointError(f"DPANet checkpoint not found: {path}")
    if path.is_dir():
        latest = train.latest_checkpoint(path)
        if latest is None:
            raise MissingCheckpointError(
                f"{path} holds no complete DPANet checkpoint (a ckpt_<step>.npz with its "
                ".json sidecar, as experiments/train_dpanet.py writes)")
        return latest
    if path.suffix not in (".npz", ".json"):
        raise CheckpointError(f"{path}: expected a ckpt_<step>.npz file or a training "
                              "output folder")
    npz = path.with_suffix(".npz")
    if not npz.is_file():
        raise MissingCheckpointError(f"DPANet checkpoint not found: {npz}")
    return npz


def checkpoint_meta(npz: str | Path) -> dict:
    """The checkpoint's JSON sidecar (format, step, model and training config), checked.

    Raises:
      CheckpointError: a missing or unreadable sidecar, an unsupported format or an
        invalid model configuration.
    """
    sidecar = Path(npz).with_suffix(".json")
    try:
        meta = train.read_sidecar(npz)
    except ValueError as e:
        raise CheckpointError(str(e)) from e
    try:
        DpanetConfig(**meta["model_config"])
        int(meta["step"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{sidecar}: invalid step or model_config ({e})") from e
    return meta


class LoadedCheckpoint(NamedTuple):
    """A trained DPANet read by `load_checkpoint`.

    params: device arrays shaped as `init(key, config)`; config: the model config;
    npz: the resolved checkpoint file; step: its training step; meta: its checked
    JSON sidecar (format, step, model and training config).
    """

    params: Params
    config: DpanetConfig
    npz: Path
    step: int
    meta: dict


def load_checkpoint(path: str | Path) -> LoadedCheckpoint:
    """Resolves, checks and reads a trained DPANet in one pass (sidecar read once): a
    training checkpoint or a weights-only copy (`train.export_weights`), as float32.

    Args:
      path: as for `resolve_checkpoint`.

    Raises:
      MissingCheckpointError, CheckpointError.
    """
    npz = resolve_checkpoint(path)
    meta = checkpoint_meta(npz)
    config = DpanetConfig(**meta["model_config"])
    shapes = jax.eval_shape(functools.partial(model_lib.init, config=config),
                            jax.random.key(0))
    try:
        with np.load(npz) as data:
            names = [n for n in data.files if n.startswith("params/")]
            arrays = {n: data[n] for n in names}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise CheckpointError(f"{npz}: unreadable checkpoint archive ({e})") from e
    try:
        arrays = train.decode_params(arrays, meta, npz)  # a weights-only copy's bfloat16
    except ValueError as e:
        raise CheckpointError(str(e)) from e
    try:
        params = train._unflatten(shapes, "params", arrays, npz)
    except ValueError as e:
        raise CheckpointError(f"{e} (the arrays do not match the sidecar's model_config "
                              f"{meta['model_config']})") from e
    expected = len(jax.tree_util.tree_leaves(shapes))
    if len(arrays) != expected:
        raise CheckpointError(f"{npz}: {len(arrays)} parameter arrays, the sidecar's "
                              f"model_config has {expected}")
    bad = [n for n, a in arrays.items() if not np.all(np.isfinite(a))]
    if bad:
        raise CheckpointError(f"{npz}: non-finite values in {bad[:3]}")
    return LoadedCheckpoint(params, config, npz, int(meta["step"]), meta)


def load_model(path: str | Path) -> tuple[Params, DpanetConfig]:
    """(params, config) of a trained DPANet: `load_checkpoint` without the metadata."""
    ckpt = load_checkpoint(path)
    return ckpt.params, ckpt.config


# ----------------------------------------------------------------------------- tiling


def tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Window origins along one axis: multiples of 16, neighbours >= overlap apart.

    Args:
      size: the (padded) side, a multiple of 16.
      tile: window side, a multiple of 16; a side <= tile is one window at 0.
      overlap: least overlap of neighbours, a multiple of 16 below tile.
    """
    if size <= tile:
        return [0]
    stride = tile - overlap
    return list(range(0, size - tile, stride)) + [size - tile]


def tile_weights(length: int, lead: bool, trail: bool, overlap: int) -> np.ndarray:
    """[length] blending weights of a window along one axis (module docstring, "Tiling").

    Args:
      lead, trail: whether the window's first / last edge is shared with a neighbour.
    """
    w = np.ones(length, np.float64)
    if overlap == 0:
        return w
    q, r = overlap / 4, overlap / 2
    d = np.arange(length, dtype=np.float64)
    if lead:
        w *= np.clip((d - q + 0.5) / r, 0.0, 1.0)
    if trail:
        w *= np.clip((length - 1 - d - q + 0.5) / r, 0.0, 1.0)
    return w


def check_tiling(tile: int, overlap: int, batch_tiles: int = 1) -> None:
    """Raise ValueError unless the `deblur_tiled` settings are valid."""
    if tile < MULTIPLE or tile % MULTIPLE:
        raise ValueError(f"tile must be a positive multiple of {MULTIPLE}, got {tile}")
    if overlap < 0 or overlap % MULTIPLE or overlap >= tile:
        raise ValueError(f"overlap must be a multiple of {MULTIPLE} in [0, tile), got "
                         f"{overlap} (tile {tile})")
    if batch_tiles < 1:
        raise ValueError(f"batch_tiles must be >= 1, got {batch_tiles}")


def _blend_tiles(fn, padded: np.ndarray, tile: int, overlap: int,
                 batch_tiles: int) -> np.ndarray:
    """Run fn on the windows of padded [2, H, W, C] and blend them into [H, W, C'].

    fn maps (left, right) [N, th, tw, C] to [N, th, tw, C'].
    """
    _, h, w, _ = padded.shape
    th, tw = min(tile, h), min(tile, w)
    ys, xs = tile_starts(h, tile, overlap), tile_starts(w, tile, overlap)
    origins = [(y, x) for y in ys for x in xs]
    acc = None
    wsum = np.zeros((h, w, 1), np.float64)
    for i in range(0, len(origins), batch_tiles):
        group = origins[i:i + batch_tiles]
        full = group + [group[-1]] * (batch_tiles - len(group))  # one compiled shape
        windows = np.stack([padded[:, y:y + th, x:x + tw] for y, x in full], axis=1)
        out = np.asarray(fn(windows[0], windows[1]), np.float64)  # [B, th, tw, C']
        if acc is None:
            acc = np.zeros((h, w, out.shape[-1]), np.float64)
        for (y, x), o in zip(group, out):
            wy = tile_weights(th, y > 0, y + th < h, overlap)
            wx = tile_weights(tw, x > 0, x + tw < w, overlap)
            weight = (wy[:, None] * wx[None, :])[..., None]  # [th, tw, 1]
            acc[y:y + th, x:x + tw] += weight * o
            wsum[y:y + th, x:x + tw] += weight
    return (acc / wsum).astype(np.float32)


def deblur_tiled(params: Params, config: DpanetConfig, views, *, tile: int = DEFAULT_TILE,
                 overlap: int = DEFAULT_OVERLAP, batch_tiles: int = 1,
                 normalize: bool = True) -> np.ndarray:
    """Deblur one capture of any size with bounded memory (module docstring, "Tiling").

    Args:
      params, config: from `load_model` (or `init`); checked against each other.
      views: [2, H, W, C] left and right views, linear, any positive scale.
      tile: window side in px (a multiple of 16). Memory per call grows with
        batch_tiles * tile^2.
      overlap: least overlap of neighbouring windows (a multiple of 16, < tile).
      batch_tiles: windows per network call (the last call is padded by repeating a
        window, so every call has one compiled shape).
      normalize: divide by the views' joint maximum before the network and multiply
        the output back (module docstring, "Intensity scale"). Without it, views must
        already be in the training scale.

    Returns:
      [H, W, C] float32 all-in-focus estimate in the input's scale (numpy, host).
    """
    if model_lib.config_of(params) != config:
        raise ValueError(f"parameters were built for {model_lib.config_of(params)}, not "
                         f"{config}")
    check_tiling(tile, overlap, batch_tiles)
    views = np.asarray(views, np.float32)
    if views.ndim != 4 or views.shape[0] != 2 or views.shape[-1] != config.channels:
        raise ValueError(f"views must be [2, H, W, {config.channels}], got {views.shape}")
    if not np.all(np.isfinite(views)):
        raise ValueError("views contain NaN or Inf values")
    scale = 1.0
    if normalize:
        scale = float(views.max())
        if not scale > 0:
            raise ValueError("views are all zero (nothing to normalise)")
        views = views / np.float32(scale)
    h, w = views.shape[1:3]
    padded = np.pad(views, ((0, 0), (0, -h % MULTIPLE), (0, -w % MULTIPLE), (0, 0)),
                    mode="edge")
    apply = functools.partial(model_lib._apply_jit, params)
    out = _blend_tiles(apply, padded, tile, overlap, batch_tiles)
    return np.ascontiguousarray(out[:h, :w]) * np.float32(scale)

