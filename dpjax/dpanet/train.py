"""Training utilities for DPANet: losses, a jitted Adam step, checkpoints.

A library: no flags, no printing. The training app owns the loop, the data and the
logging; it calls `make_train_step` once and `save_checkpoint` / `restore_latest`.

Checkpoints are pairs in one folder:
- `ckpt_<step>.npz`: every array of the parameters ("params/<path>") and of the optax
  state ("opt/<path>"), paths joined with "/" (e.g. "params/enc/0/dcn/w");
- `ckpt_<step>.json`: format version, step, model and training config.
A weights-only copy for shipping (`export_weights`) keeps the parameters alone, rounded
to bfloat16 (sidecar field "params_storage"); inference reads it, training cannot resume
from it. Both files are written to a temporary file and moved into place with
os.replace, the JSON last, so a checkpoint exists (for `latest_checkpoint`) only once it
is complete.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dpjax.dpanet.model import DpanetConfig, Params, apply, init

FORMAT_VERSION = 1
_NAME = re.compile(r"^ckpt_(\d+)\.json$")


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Optimiser and loss (defaults: the paper's Adam with learning rate 2e-5).

    Attributes:
      learning_rate: initial Adam learning rate.
      halve_every: halve the learning rate every this many steps (staircase); 0 keeps
        it constant. The paper halves every 60 epochs.
      loss: "mse" (the paper's main training) or "charbonnier" (its fine-tuning).
      charbonnier_eps: epsilon of the Charbonnier loss.
      b1, b2, eps: Adam constants.
    """

    learning_rate: float = 2e-5
    halve_every: int = 0
    loss: Literal["mse", "charbonnier"] = "mse"
    charbonnier_eps: float = 1e-3
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8

    def __post_init__(self):
        if self.loss not in ("mse", "charbonnier"):
            raise ValueError(f"loss must be 'mse' or 'charbonnier', got {self.loss!r}")
        if self.learning_rate <= 0 or self.halve_every < 0:
            raise ValueError("learning_rate must be > 0 and halve_every >= 0")


class Batch(NamedTuple):
    """A training batch, all [N, H, W, C] with H, W divisible by 16."""

    left: jax.Array
    right: jax.Array
    target: jax.Array


class StepMetrics(NamedTuple):
    """Scalars of one step, evaluated at the parameters before the update."""

    loss: jax.Array
    grad_norm: jax.Array


class Checkpoint(NamedTuple):
    params: Params
    opt_state: Any
    step: int
    model_config: DpanetConfig
    train_config: TrainConfig


def mse_loss(pred: jax.Array, target: jax.Array) -> jax.Array:
    """Mean squared error over all elements."""
    return jnp.mean((pred - target) ** 2)


def charbonnier_loss(pred: jax.Array, target: jax.Array, eps: float = 1e-3) -> jax.Array:
    """mean sqrt((pred - target)^2 + eps^2): L1-like, with a finite gradient at 0."""
    return jnp.mean(jnp.sqrt((pred - target) ** 2 + eps**2))


def loss_fn(params: Params, batch: Batch, config: TrainConfig) -> jax.Array:
    """The configured loss of the network's prediction on a batch."""
    pred = apply(params, batch.left, batch.right)
    if config.loss == "mse":
        return mse_loss(pred, batch.target)
    return charbonnier_loss(pred, batch.target, config.charbonnier_eps)


def make_optimizer(config: TrainConfig) -> optax.GradientTransformation:
    """Adam, with the learning rate halved every `halve_every` steps if set.

    The schedule reads Adam's own step count, so a restored optimiser state resumes it.
    """
    lr: float | optax.Schedule = config.learning_rate
    if config.halve_every:
        lr = optax.exponential_decay(config.learning_rate, config.halve_every, 0.5,
                                     staircase=True)
    return optax.adam(lr, b1=config.b1, b2=config.b2, eps=config.eps)


def init_state(key: jax.Array, model_config: DpanetConfig,
               train_config: TrainConfig) -> tuple[Params, Any]:
    """Fresh parameters and optimiser state."""
    params = init(key, model_config)
    return params, make_optimizer(train_config).init(params)


def make_train_step(config: TrainConfig):
    """A jitted `train_step(params, opt_state, batch) -> (params, opt_state, StepMetrics)`.

    The function closes over nothing but the (static) optimiser; arrays are arguments.
    Parameter and optimiser-state buffers are donated: do not reuse the ones passed in.
    """
    optimizer = make_optimizer(config)

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def train_step(params: Params, opt_state: Any, batch: Batch):
        loss, grads = jax.value_and_grad(loss_fn)(params, batch, config)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return params, opt_state, StepMetrics(loss, optax.tree.norm(grads))

    return train_step


# ----------------------------------------------------------------------- checkpoints


def _key_name(entry) -> str:
    for attr in ("key", "idx", "name"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)


def _flatten(tree: Any, prefix: str) -> dict[str, Any]:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {"/".join([prefix, *(_key_name(e) for e in path)]): leaf for path, leaf in leaves}


def _unflatten(template: Any, prefix: str, arrays: dict[str, np.ndarray], source: Path) -> Any:
    """Fill `template`'s structure from arrays, checking names, shapes and dtypes."""
    paths, treedef = jax.tree_util.tree_flatten_with_path(template)
    leaves = []
    for path, spec in paths:
        name = "/".join([prefix, *(_key_name(e) for e in path)])
        if name not in arrays:
            raise ValueError(f"{source}: missing array {name!r}")
        value = arrays[name]
        if value.shape != spec.shape or value.dtype != spec.dtype:
            raise ValueError(f"{source}: {name!r} is {value.dtype}{list(value.shape)}, "
                             f"expected {spec.dtype}{list(spec.shape)}")
        leaves.append(jnp.asarray(value))
    return jax.tree_util.tree_unflatten(treedef, leaves)


def _atomic_write(path: Path, write) -> None:
    """Call write(file) on a temporary file next to path, then os.replace it into place."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def checkpoint_paths(directory: str | os.PathLike, step: int) -> tuple[Path, Path]:
    """(npz, json) paths of the checkpoint at `step`."""
    stem = Path(directory) / f"ckpt_{step:09d}"
    return stem.with_suffix(".npz"), stem.with_suffix(".json")


def save_checkpoint(directory: str | os.PathLike, step: int, params: Params, opt_state: Any,
                    model_config: DpanetConfig, train_config: TrainConfig) -> Path:
    """Write ckpt_<step>.npz and its JSON sidecar atomically; returns the .npz path."""
    Path(directory).mkdir(parents=True, exist_ok=True)
    npz_path, json_path = checkpoint_paths(directory, step)
    arrays = {**_flatten(params, "params"), **_flatten(opt_state, "opt")}
    arrays = {name: np.asarray(jax.device_get(value)) for name, value in arrays.items()}
    meta = {"format": FORMAT_VERSION, "step": int(step),
            "model_config": model_config.to_dict(),
            "train_config": dataclasses.asdict(train_config)}
    _atomic_write(npz_path, lambda f: np.savez(f, **arrays))
    _atomic_write(json_path, lambda f: f.write(json.dumps(meta, indent=2).encode()))
    return npz_path


# A weights-only checkpoint's storage ("params_storage" in its sidecar): each parameter
# array rounded to bfloat16 (the upper half of a float32; round to nearest even) and
# kept as two uint8 planes, [2, *shape], high bytes first. The high bytes (sign and
# exponent) repeat, so the compressed archive is ~37% of the float32 parameters'
# size and ~12% of a training checkpoint's (which adds Adam's two moments).
BF16_PLANES = "bfloat16_planes"


def read_sidecar(npz_path: str | os.PathLike) -> dict:
    """A checkpoint's JSON sidecar, refused unless it is readable and has FORMAT_VERSION.

    The one check of the format, for training (resume, export) and inference
    (`dpjax.dpanet.checkpoint_meta`, which re-raises it as a CheckpointError).

    Raises:
      ValueError: a missing or unreadable sidecar, or another format.
    """
    npz_path = Path(npz_path)
    sidecar = npz_path.with_suffix(".json")
    try:
        meta = json.loads(sidecar.read_text())
    except FileNotFoundError:
        raise ValueError(f"{npz_path}: its sidecar {sidecar.name} is missing (an incomplete "
                         "checkpoint: the sidecar is written last)") from None
    except (OSError, ValueError) as e:
        raise ValueError(f"{sidecar}: unreadable checkpoint sidecar ({e})") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_VERSION:
        found = meta.get("format") if isinstance(meta, dict) else None
        raise ValueError(f"{sidecar}: unsupported checkpoint format {found!r} "
                         f"(expected {FORMAT_VERSION})")
    return meta


def _params_storage(meta: dict) -> str:
    """The sidecar's "params_storage": "float32" (a training checkpoint) or BF16_PLANES."""
    return meta.get("params_storage", "float32")


def _to_bf16_planes(x: np.ndarray) -> np.ndarray:
    """Finite float32 [...] -> uint8 [2, ...] (see BF16_PLANES)."""
    u = np.ascontiguousarray(x, np.float32).view(np.uint32)
    top = ((u + np.uint32(0x7FFF) + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    return np.stack([(top >> 8).astype(np.uint8), (top & 0xFF).astype(np.uint8)])


def _from_bf16_planes(planes: np.ndarray) -> np.ndarray:
    """uint8 [2, ...] -> float32 [...], exactly the stored bfloat16 values."""
    top = (planes[0].astype(np.uint32) << 8) | planes[1]
    return (top << 16).view(np.float32)


def export_weights(checkpoint: str | os.PathLike, directory: str | os.PathLike) -> Path:
    """A weights-only copy of a training checkpoint, for shipping a trained model.

    Writes `ckpt_<step>.npz` (the parameters in bfloat16, `BF16_PLANES`, compressed; no
    optimiser state) and its sidecar (the original's plus "params_storage") to
    `directory`, atomically, the sidecar last. `dpjax.dpanet.load_checkpoint` reads it
    as float32; `load_checkpoint` here (resuming training) refuses it.

    Args:
      checkpoint: a training checkpoint's .npz (or .json).
      directory: the output folder; not the checkpoint's own (the copy has its name).

    Returns:
      the written .npz.

    Raises:
      ValueError: an unsupported format, no float32 parameters, non-finite ones, or the
        checkpoint's own folder.
    """
    src = Path(checkpoint).with_suffix(".npz")
    meta = read_sidecar(src)
    if _params_storage(meta) != "float32":
        raise ValueError(f"{src}: already a weights-only checkpoint")
    with np.load(src) as data:
        params = {n: data[n] for n in data.files if n.startswith("params/")}
    bad = [n for n, a in params.items() if a.dtype != np.float32 or not np.all(np.isfinite(a))]
    if not params or bad:
        raise ValueError(f"{src}: no parameters, or not finite float32 ones ({bad[:3]})")
    npz_path, json_path = checkpoint_paths(directory, int(meta["step"]))
    if npz_path.resolve() == src.resolve():
        raise ValueError(f"{src}: export to another folder (the copy has the same name)")
    npz_path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {n: _to_bf16_planes(a) for n, a in params.items()}
    _atomic_write(npz_path, lambda f: np.savez_compressed(f, **arrays))
    meta = {**meta, "params_storage": BF16_PLANES}
    _atomic_write(json_path, lambda f: f.write(json.dumps(meta, indent=2).encode()))
    return npz_path


def decode_params(arrays: dict[str, np.ndarray], meta: dict, source: Path
                  ) -> dict[str, np.ndarray]:
    """A checkpoint's "params/..." arrays as float32, whatever its sidecar's storage.

    Raises:
      ValueError: an unknown storage, or arrays that are not stored as it says.
    """
    storage = _params_storage(meta)
    if storage == "float32":
        return arrays
    if storage != BF16_PLANES:
        raise ValueError(f"{source}: unknown params_storage {storage!r}")
    bad = [n for n, a in arrays.items() if a.dtype != np.uint8 or a.ndim < 1 or len(a) != 2]
    if bad:
        raise ValueError(f"{source}: {bad[0]!r} is not stored as {BF16_PLANES}")
    return {n: _from_bf16_planes(a) for n, a in arrays.items()}


def load_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Load a checkpoint from its .npz (or .json) path.

    The parameter and optimiser-state structures are rebuilt from the sidecar's
    configs (with jax.eval_shape, allocating nothing) and filled by path.
    """
    npz_path = Path(path).with_suffix(".npz")
    meta = read_sidecar(npz_path)
    if _params_storage(meta) != "float32":
        raise ValueError(f"{npz_path}: a weights-only checkpoint (export_weights) holds no "
                         "optimiser state: training cannot resume from it")
    model_config = DpanetConfig(**meta["model_config"])
    train_config = TrainConfig(**meta["train_config"])
    params_shape = jax.eval_shape(functools.partial(init, config=model_config),
                                  jax.random.key(0))
    opt_shape = jax.eval_shape(make_optimizer(train_config).init, params_shape)
    with np.load(npz_path) as data:
        arrays = {name: data[name] for name in data.files}
    params = _unflatten(params_shape, "params", arrays, npz_path)
    opt_state = _unflatten(opt_shape, "opt", arrays, npz_path)
    return Checkpoint(params, opt_state, int(meta["step"]), model_config, train_config)


def latest_checkpoint(directory: str | os.PathLike) -> Path | None:
    """The .npz of the highest-step complete checkpoint in directory, or None."""
    directory = Path(directory)
    if not directory.is_dir():
        return None
    best = None
    for entry in directory.iterdir():
        match = _NAME.match(entry.name)
        if match and entry.with_suffix(".npz").exists():
            step = int(match.group(1))
            if best is None or step > best[0]:
                best = (step, entry.with_suffix(".npz"))
    return None if best is None else best[1]


def restore_latest(directory: str | os.PathLike) -> Checkpoint | None:
    """Resume: the latest checkpoint's parameters, optimiser state, step and configs."""
    path = latest_checkpoint(directory)
    return None if path is None else load_checkpoint(path)
