"""The batch runner: a folder of DP pairs in, one result folder per scene out.

    discover -> check the output folder, lock it -> for each scene: fingerprint ->
    skip, or prepare (dpjax.scene) -> solve -> write (staged, then swapped in) ->
    record -> summary.json and index.html describe every scene in the folder

`run(RunOptions, on_event=...)` returns the exit status; progress and log lines go to
the `on_event` callback (`Event`), never to a terminal: the apps (run_solver.py) draw
bars and log. `run_scene` solves one scene from nothing but picklable arguments (for
executors that run scenes in other processes).

Rules a user can rely on (docs/batch.md):
- A scene is skipped only when its result is complete and its fingerprint (everything
  that changes the output: method, resolved base configuration, preset, kernels,
  preprocessing, input files, solver code) matches this run's; otherwise it is solved
  again and the reason is logged and recorded ("settings changed: mpi.num_layers 4 -> 6").
- A result is written into a staging folder and swapped in only when complete, so a
  failing or interrupted re-solve never touches the previous result.
- The output folder is checked (a folder, writable) and locked (`LOCK_FILE`) before any
  solve; stale temporary files and staging folders of a killed run are removed.
- summary.json and index.html describe every scene present in the output folder, also
  those this run did not touch (status "kept").
- Exit status: 0 every scene of this run done or skipped, 1 some failed, 2 the run could
  not start, 130 interrupted (SIGINT), 143 terminated (SIGTERM: the app raises
  `Terminated`).
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import hashlib
import json
import logging
import os
import shutil
import socket
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from dpjax import batch, io, outputs, pipeline
from dpjax import config as config_lib
from dpjax.scene import (
    KernelOptions,
    KernelSource,
    PreparedScene,
    SceneFailure,
    SceneOptions,
    SetupError,
    display_kwargs,
    kernel_source,
    load_ground_truth,
    load_views,
    prepare,
)

__all__ = [
    "LOCK_FILE",
    "SUMMARY_JSON",
    "INDEX_HTML",
    "Event",
    "RunOptions",
    "RunOutcome",
    "SceneTask",
    "solve_task",
    "Terminated",
    "code_version",
    "fingerprint",
    "fingerprint_changes",
    "kernel_record",
    "make_fingerprint",
    "solver_record",
    "release_host_memory",
    "run",
    "run_scene",
]

SUMMARY_JSON = "summary.json"
INDEX_HTML = "index.html"
LOCK_FILE = ".dpjax.lock"
_STAGING, _RETIRED = outputs.STAGING_PREFIX, outputs.RETIRED_PREFIX

EXIT_OK, EXIT_FAILED, EXIT_SETUP, EXIT_SIGINT, EXIT_SIGTERM = 0, 1, 2, 130, 143


class Terminated(KeyboardInterrupt):
    """Raised by an app's SIGTERM handler: handled like Ctrl-C, exit status 143."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class RunOptions:
    """Everything a batch run needs (built from flags by the apps, or by a test).

    Attributes:
      input_dir, output_dir: folders.
      scene: how scenes are loaded and configured (`dpjax.scene.SceneOptions`; its
        `base` is the resolved base configuration).
      kernels: where the kernels come from.
      scenes: only these scene names (None: all found).
      overwrite: solve again even when a complete result's fingerprint matches.
      batch_size: solve up to this many same-size scenes together (`dpjax.fit_batch`).
      memory_budget_gb: refuse scenes whose estimated peak memory exceeds it (None:
        the device's memory, or host RAM / local devices on CPU).
      thumb_size: longest side of the gallery thumbnails.
      method: "mpi" (the solver) or "dpanet" (a trained DPANet, all-in-focus only).
      dpanet_checkpoint, dpanet_tile, dpanet_overlap: --method=dpanet.
    """

    input_dir: Path
    output_dir: Path
    scene: SceneOptions
    kernels: KernelOptions = KernelOptions()
    scenes: tuple[str, ...] | None = None
    overwrite: bool = False
    batch_size: int = 1
    memory_budget_gb: float | None = None
    thumb_size: int = 256
    method: str = "mpi"
    dpanet_checkpoint: Path | None = None
    dpanet_tile: int = 256
    dpanet_overlap: int = 32


class RunOutcome(NamedTuple):
    """What `run` returns.

    exit_status: module docstring; summary: the summary.json object (every scene in the
    output folder); counts: this run's scenes by status; state: complete, interrupted or
    terminated.
    """

    exit_status: int
    summary: dict[str, Any]
    counts: dict[str, int]
    state: str


class Event(NamedTuple):
    """What the runner reports to its `on_event` callback.

    kind:
      "start": data = {"scenes", "share", "devices", "process_index", "process_count"}.
      "progress": scene = name, data = `batch.SceneEta` of its solve.
      "scene": scene = name, data = its finished record (status done/skipped/failed).
      "log": data = (logging level, message).
    """

    kind: str
    scene: str | None = None
    data: Any = None


OnEvent = Callable[[Event], None]


def _log(on_event: OnEvent | None, level: int, msg: str, scene: str | None = None) -> None:
    if on_event is not None:
        on_event(Event("log", scene, (level, msg)))


# ----------------------------------------------------------------------------------------
# Fingerprints


_SOLVE_MODULES = ("batch", "baselines", "blocks", "config", "conv", "encoding", "io",
                  "kernel_model", "kernels", "losses", "mpi", "outputs", "pipeline",
                  "postprocess", "presets", "refine", "scene", "solver")


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """dpjax's version and a digest of the source of every module a solve runs through.

    Any change to that code (even a comment) changes the digest, so results of older
    code are solved again rather than passed off as this version's.
    """
    import dpjax

    h = hashlib.sha256(dpjax.__version__.encode())
    root = Path(dpjax.__file__).parent
    for name in _SOLVE_MODULES:
        h.update((root / f"{name}.py").read_bytes())
    return f"{dpjax.__version__}+{h.hexdigest()[:12]}"


def _kernel_digest(source: KernelSource) -> str:
    return hashlib.sha256(np.ascontiguousarray(source.kernels, np.float32).tobytes()
                          ).hexdigest()[:16]


def kernel_record(source: KernelSource) -> dict[str, Any]:
    """What a fingerprint records of the kernels: their description and a digest."""
    return {**{k: v for k, v in source.info.items() if k != "warning"},
            "digest": _kernel_digest(source)}


def make_fingerprint(method: str, pair: io.ScenePair, preprocessing: dict[str, Any],
                     **parts: Any) -> dict[str, Any]:
    """A result's fingerprint: everything that changes it, as a JSON-able dict (result.json
    "fingerprint") whose `digest` is a hash of the rest.

    The one definition, for the runner (`fingerprint`) and experiments/reproduce_table.py.

    Args:
      method: what made the result ("mpi", "dpanet", a baseline's name).
      pair: the scene's input files (recorded by content digest).
      preprocessing: how the views were read and cropped.
      parts: everything else the result depends on (config, preset, kernels from
        `kernel_record`, a model, other results it reads...), JSON-able.
    """
    out: dict[str, Any] = {
        "method": method,
        "inputs": {"left": io.file_digest(pair.left), "right": io.file_digest(pair.right),
                   "format": pair.format},
        "preprocessing": preprocessing,
        "code": code_version(),
        **parts,
    }
    out = outputs.to_json_compatible(out)
    digest = hashlib.sha256(json.dumps(out, sort_keys=True).encode()).hexdigest()[:16]
    return {"digest": digest, **out}


def fingerprint(opts: RunOptions, source: KernelSource, pair: io.ScenePair,
                dpanet_info: dict[str, Any] | None = None) -> dict[str, Any]:
    """Everything that changes a scene's output of this run (`make_fingerprint`).

    `SceneOptions.linear_solver` counts only for a scene read as linear (by its files'
    headers, `io.probe_encoding`; when they cannot tell, it counts): a display-referred
    scene is fitted with `base`'s solver whatever it is.
    """
    s = opts.scene
    pre = {"black_level": s.black_level, "allow_8bit": s.allow_8bit,
           "encoding": s.encoding or "auto",
           "crop_tiles": None if s.crop_tiles is None else list(s.crop_tiles)}
    if opts.method == "mpi":
        enc = io.probe_encoding(pair, s.encoding or "auto") if s.linear_solver else None
        linear_solver = None if enc is not None and not enc.is_linear else s.linear_solver
        return make_fingerprint(opts.method, pair, pre, config=config_lib.to_dict(s.base),
                                preset=s.preset, range_probe=s.range_probe,
                                prior_encoding=s.prior_encoding,
                                linear_solver=solver_record(linear_solver),
                                kernels=kernel_record(source),
                                blocks=None if s.blocks is None else list(s.blocks))
    return make_fingerprint(opts.method, pair, pre, dpanet=dpanet_info)


def solver_record(solver: config_lib.SolverConfig | None) -> dict[str, Any] | None:
    """`SceneOptions.linear_solver` as results record it (fingerprints, run settings;
    also experiments/reproduce_table.py's)."""
    return None if solver is None else dataclasses.asdict(solver)


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d}


def fingerprint_changes(old: dict[str, Any] | None, new: dict[str, Any],
                        limit: int = 4) -> str | None:
    """None when the fingerprints match, else a one-line reason naming what changed."""
    if not isinstance(old, dict) or "digest" not in old:
        return "no settings fingerprint in the previous result (older dpjax)"
    if old.get("digest") == new.get("digest"):
        return None
    if old.get("method") != new.get("method"):  # everything else differs with it
        return f"settings changed: method {old.get('method')} -> {new.get('method')}"
    a, b = _flatten({k: v for k, v in old.items() if k != "digest"}), _flatten(
        {k: v for k, v in new.items() if k != "digest"})
    changed = []
    for key in sorted(set(a) | set(b)):
        if a.get(key) != b.get(key):
            if key == "code":
                changed.append("solver code changed")
            elif key.startswith("inputs."):
                changed.append("input files changed")
            else:
                changed.append(f"{key.removeprefix('config.')} {_short(a.get(key))} -> "
                               f"{_short(b.get(key))}")
    changed = list(dict.fromkeys(changed))
    more = f" (+{len(changed) - limit} more)" if len(changed) > limit else ""
    return "settings changed: " + "; ".join(changed[:limit]) + more


def _short(v: Any) -> str:
    text = json.dumps(v) if not isinstance(v, str) else v
    return text if len(text) <= 40 else text[:37] + "..."


# ----------------------------------------------------------------------------------------
# The output folder


def check_output_dir(path: Path) -> None:
    """Creates the output folder if needed and checks that it is a writable folder.

    Raises:
      SetupError: with a one-line reason.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise SetupError(f"output folder {path} exists and is not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SetupError(f"cannot create output folder {path}: {e.strerror or e}") from None
    probe = path / f".dpjax-write-test-{os.getpid()}"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise SetupError(f"output folder {path} is not writable: {e.strerror or e}") from None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class OutputLock:
    """An exclusive lock file in the output folder (`LOCK_FILE`).

    Holds the owner's host, pid and start time. A lock left by a process that no longer
    exists on this host is stale and taken over; any other lock refuses the run with a
    message naming its holder and the file to remove once that run is gone.
    """

    def __init__(self, folder: Path):
        self.path = Path(folder) / LOCK_FILE
        self.stale: dict[str, Any] | None = None

    def acquire(self) -> None:
        info = {"host": socket.gethostname(), "pid": os.getpid(),
                "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                if holder is not None and self._is_stale(holder):
                    self.stale = holder
                    self.path.unlink(missing_ok=True)
                    continue
                who = ("an unreadable lock" if holder is None else
                       f"pid {holder.get('pid')} on {holder.get('host')} since "
                       f"{holder.get('started')}")
                raise SetupError(f"output folder {self.path.parent} is in use by another run "
                                 f"({who}); wait for it, or remove {self.path} if that run "
                                 "is gone") from None
            except OSError as e:
                raise SetupError(f"cannot lock output folder {self.path.parent}: "
                                 f"{e.strerror or e}") from None
            with os.fdopen(fd, "w") as fh:
                json.dump(info, fh)
            return
        raise SetupError(f"cannot lock output folder {self.path.parent}")

    def _holder(self) -> dict[str, Any] | None:
        try:
            holder = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None
        return holder if isinstance(holder, dict) else None

    @staticmethod
    def _is_stale(holder: dict[str, Any]) -> bool:
        if holder.get("host") != socket.gethostname():
            return False
        try:
            return not _pid_alive(int(holder.get("pid")))
        except (TypeError, ValueError):
            return False

    def release(self) -> None:
        holder = self._holder()
        if holder is not None and holder.get("pid") == os.getpid():
            self.path.unlink(missing_ok=True)


def clean_stale(folder: Path) -> list[str]:
    """Removes what a killed run left behind (call with the lock held): temporary files of
    `outputs.atomic_write`, staging folders, and replaced results whose swap finished
    (a replaced result whose new one never arrived is put back). Returns what it did."""
    done = []
    for root, dirs, _ in os.walk(folder):  # first the folders: a restored one may hold .tmp
        rootp = Path(root)
        for d in list(dirs):
            p = rootp / d
            if d.startswith(_STAGING):
                shutil.rmtree(p, ignore_errors=True)
                dirs.remove(d)
                done.append(f"removed {p}")
            elif d.startswith(_RETIRED):
                target = rootp / d[len(_RETIRED):].rsplit("-", 1)[0]
                if target.exists():
                    shutil.rmtree(p, ignore_errors=True)
                    done.append(f"removed {p}")
                else:
                    os.replace(p, target)
                    done.append(f"restored {target}")
                dirs.remove(d)
    for root, _, files in os.walk(folder):
        for f in files:
            if f.startswith(".") and f.endswith(".tmp"):
                (Path(root) / f).unlink(missing_ok=True)
                done.append(f"removed {Path(root) / f}")
    return done


# Scene folders are staged and swapped in (`outputs.staging_dir` / `outputs.swap_in`);
# module names so that tests can intercept the swap.
_staging_dir, _swap_in = outputs.staging_dir, outputs.swap_in


_RESERVED = (SUMMARY_JSON, INDEX_HTML, LOCK_FILE)


def scene_dir(output_dir: Path, name: str) -> Path:
    """The scene's output folder; refuses names that would leave `output_dir` or take the
    place of the run's own files."""
    if name in _RESERVED or name.startswith("summary.process-"):
        raise io.InputError(f"scene name {name!r} is reserved for the run's own files")
    return Path(output_dir, *io.check_scene_name(name).split("/"))


def nested_scene_problems(names: Sequence[str]) -> dict[str, str]:
    """Scenes whose folder would sit inside another scene's folder (e.g. "a" and "a/b"):
    replacing "a"'s result would take "a/b"'s with it, so the inner one is refused."""
    present = set(names)
    out = {}
    for name in names:
        parts = name.split("/")
        for i in range(1, len(parts)):
            outer = "/".join(parts[:i])
            if outer in present:
                out[name] = (f"input: scene {name!r} would be written inside scene "
                             f"{outer!r}'s folder; move one of them")
                break
    return out


# ----------------------------------------------------------------------------------------
# One scene


@dataclasses.dataclass
class _State:
    """Read-only state of a run shared by its scenes (plus the event callback)."""

    opts: RunOptions
    source: KernelSource
    budget: float | None
    on_event: OnEvent | None
    process_index: int = 0
    dpanet: Any = None  # dpjax.dpanet.LoadedCheckpoint for --method=dpanet
    dpanet_info: dict[str, Any] | None = None


def _failure_kind(e: BaseException) -> str:
    if isinstance(e, SceneFailure):
        return e.kind
    if isinstance(e, io.InputError):
        return "input"
    if isinstance(e, FloatingPointError):
        return "solver diverged"
    if isinstance(e, MemoryError):
        return "memory"
    if isinstance(e, ValueError):
        return "invalid"
    return "error"


def _record_failure(rec: dict[str, Any], e: BaseException) -> None:
    kind = _failure_kind(e)
    rec.update(status="failed", error=kind, reason=f"{kind}: {e}")
    rec.update(getattr(e, "details", None) or {})
    if kind == "error":
        rec["traceback"] = traceback.format_exc(limit=6)


def _new_record(st: _State, name: str, pair: io.ScenePair, device, group: int | None,
                fp: dict[str, Any]) -> dict[str, Any]:
    rec: dict[str, Any] = {"scene": name, "format": pair.format, "method": st.opts.method,
                           "inputs": [str(p) if p else None for p in (pair.left, pair.right)],
                           "process": st.process_index, "device": str(device),
                           "fingerprint": fp["digest"]}
    if group is not None and st.opts.batch_size > 1:
        rec["group"] = group
    return rec


def _write_thumb(path: Path, display: np.ndarray, size: int) -> None:
    if display.ndim == 3 and display.shape[-1] == 1:
        display = display[..., 0]
    outputs.write_png(path, batch.thumbnail(display, size))


def _scene_eta(cfg: config_lib.Config) -> batch.SceneEta:
    s = cfg.solver
    return batch.SceneEta(tuple(s.budget(lv) for lv in reversed(range(s.pyramid_levels))))


def _extra(st: _State, prep: PreparedScene, rec: dict[str, Any], fp: dict[str, Any],
           device) -> dict[str, Any]:
    extra = {"scene": prep.name, "format": rec["format"], "inputs": rec["inputs"],
             "preprocessing": prep.info, "kernels": st.source.info, "preset": prep.preset,
             "memory_estimate_gb": round(prep.memory.gb, 3), "assigned_device": str(device),
             "process": st.process_index, "fingerprint": fp}
    if prep.init_info is not None:
        extra["search_init"] = prep.init_info
    if prep.plan_info is not None:
        extra["block_plan"] = prep.plan_info
    return extra


def _finish_done(st: _State, prep: PreparedScene, res, result: dict[str, Any],
                 staging: Path, rec: dict[str, Any]) -> None:
    """Thumbnails into the staged result, swap it in, fill the record."""
    size = st.opts.thumb_size
    t0 = time.perf_counter()
    shown = display_kwargs(prep.info, bits=8)
    _write_thumb(staging / batch.THUMBS["input"],
                 outputs.display_image(prep.views.mean(axis=0), **shown), size)
    _write_thumb(staging / batch.THUMBS["all_in_focus"],
                 outputs.display_image(res.all_in_focus, **shown), size)
    _write_thumb(staging / batch.THUMBS["defocus"], outputs.defocus_png(res.defocus), size)
    prep.timings["thumbnails_s"] = time.perf_counter() - t0
    _swap_in(staging, scene_dir(st.opts.output_dir, prep.name))
    rec.update(status="done", iterations=result["iterations"],
               final_loss=result["final_loss"], solver_timings=result["timings"],
               shape=list(prep.views.shape), scale_range=prep.preset["scale_range"],
               memory_estimate_gb=round(prep.memory.gb, 3))
    for key in ("metrics", "input_metrics", "metrics_unavailable", "batch"):
        if key in result:
            rec[key] = result[key]
    if prep.info.get("warnings"):
        rec["warnings"] = prep.info["warnings"]
        for w in prep.info["warnings"]:
            _log(st.on_event, logging.WARNING, f"{prep.name}: {w}", prep.name)


def _solve_alone(st: _State, prep: PreparedScene, rec: dict[str, Any], fp: dict[str, Any],
                 device, extra: dict[str, Any] | None = None) -> None:
    """Solves a prepared scene with dpjax.fit, writes and swaps it in; raises for a bad
    scene (its previous result, if any, untouched)."""
    import jax

    eta = _scene_eta(prep.cfg)
    seen: set[str] = set()

    def progress(p):
        eta.update(level=p.level, step=p.step, num_steps=p.num_steps, loss=p.loss,
                   elapsed_s=p.elapsed_s, block=p.block, num_blocks=p.num_blocks)
        if p.params is not None and not seen:
            seen.update(str(d) for d in p.params.color_logits.devices())
        if st.on_event is not None:
            st.on_event(Event("progress", prep.name, eta))

    staging = _staging_dir(scene_dir(st.opts.output_dir, prep.name))
    try:
        with jax.default_device(device):
            t0 = time.perf_counter()
            res, result = pipeline.solve_scene(
                prep.views, prep.bank, prep.cfg, staging, gt_all_in_focus=prep.gt_aif,
                gt_defocus=prep.gt_def,
                extra={**_extra(st, prep, rec, fp, device), **(extra or {})},
                callback=progress, init=prep.init, display=display_kwargs(prep.info),
                plan=prep.plan)
            prep.timings["solve_s"] = time.perf_counter() - t0
        _finish_done(st, prep, res, result, staging, rec)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if seen:
        rec["device"] = ",".join(sorted(seen))


def _close(rec: dict[str, Any], timings: dict[str, float], t_start: float) -> dict[str, Any]:
    if "batch_solve_s" in timings:  # its own steps and its share of the batch
        timings["total_s"] = sum(v for k, v in timings.items() if k != "batch_solve_s")
    else:
        timings["total_s"] = time.perf_counter() - t_start
    rec["timings"] = timings
    return rec


def _prepare(st: _State, name: str, pair: io.ScenePair, device) -> PreparedScene:
    import jax

    with jax.default_device(device):
        return prepare(name, pair, st.source, st.opts.scene, budget_bytes=st.budget)


def _solve_one(st: _State, name: str, pair: io.ScenePair, device, group: int | None,
               fp: dict[str, Any]) -> dict[str, Any]:
    """Loads, configures, checks and solves one scene; never raises for a bad scene."""
    if st.opts.method == "dpanet":
        return _deblur_one(st, name, pair, device, group, fp)
    rec = _new_record(st, name, pair, device, group, fp)
    timings: dict[str, float] = {}
    t_start = time.perf_counter()
    try:
        prep = _prepare(st, name, pair, device)
        timings = prep.timings
        _solve_alone(st, prep, rec, fp, device)
    except KeyboardInterrupt:
        raise
    except Exception as e:  # noqa: BLE001 - a bad scene must not end the batch
        _record_failure(rec, e)
    return _close(rec, timings, t_start)


def _split_batches(st: _State, preps: Sequence[PreparedScene]) -> list[list[PreparedScene]]:
    """Prepared scenes in batches that dpjax.fit_batch can solve together: same shapes,
    kernel geometry and `solver.batch_key`, summed memory estimate within the budget; a
    scene solved in blocks (`dpjax.blocks`) alone."""
    from dpjax import solver

    by_key: dict[Any, list[PreparedScene]] = {}
    out: list[list[PreparedScene]] = [[p] for p in preps if p.plan is not None]
    for p in preps:
        if p.plan is not None:
            continue
        key = (p.views.shape, p.bank.grid, p.bank.kernel_size, solver.batch_key(p.cfg))
        by_key.setdefault(key, []).append(p)
    for same in by_key.values():
        current: list[PreparedScene] = []
        need = 0.0
        for p in same:
            overhead = p.memory.parts.get("overhead", 0.0)
            arrays = p.memory.total - overhead
            if current and st.budget is not None and need + arrays > st.budget:
                out.append(current)
                current = []
            if not current:
                need = overhead
            current.append(p)
            need += arrays
        out.append(current)
    return out


def _solve_batch(st: _State, preps: list[PreparedScene], recs: dict[str, dict[str, Any]],
                 fps: dict[str, dict[str, Any]], device) -> None:
    """Solves prepared scenes together with dpjax.fit_batch; when that fails (a scene
    diverges, memory runs out) solves them one by one so that only a bad one fails."""
    import jax

    from dpjax.solver import fit_batch

    names = [p.name for p in preps]
    etas = [_scene_eta(p.cfg) for p in preps]

    def progress(reports):
        for p, prep, eta in zip(reports, preps, etas):
            eta.update(level=p.level, step=p.step, num_steps=p.num_steps, loss=p.loss,
                       elapsed_s=p.elapsed_s)
            if st.on_event is not None:
                st.on_event(Event("progress", prep.name, eta))

    t0 = time.perf_counter()
    try:
        with jax.default_device(device):
            results = fit_batch([p.views for p in preps], [p.bank for p in preps],
                                [p.cfg for p in preps], callback=progress,
                                inits=[p.init for p in preps])
    except KeyboardInterrupt:
        raise
    except Exception as e:  # noqa: BLE001 - fall back to scene by scene
        _log(st.on_event, logging.WARNING, f"batch {','.join(names)} failed "
             f"({type(e).__name__}: {e}): solving its scenes one by one")
        for prep in preps:
            try:
                _solve_alone(st, prep, recs[prep.name], fps[prep.name], device,
                             extra={"batch_fallback": f"{e}"})
            except KeyboardInterrupt:
                raise
            except Exception as e1:  # noqa: BLE001
                _record_failure(recs[prep.name], e1)
        return
    solve_s = time.perf_counter() - t0
    for i, (prep, res) in enumerate(zip(preps, results)):
        prep.timings["solve_s"] = solve_s / len(preps)  # this scene's share
        prep.timings["batch_solve_s"] = solve_s
        rec = recs[prep.name]
        info = {"size": len(preps), "index": i, "scenes": names}
        staging = _staging_dir(scene_dir(st.opts.output_dir, prep.name))
        try:
            result = pipeline.write_scene(
                res, prep.views, prep.cfg, staging, wall_s=solve_s,
                gt_all_in_focus=prep.gt_aif, gt_defocus=prep.gt_def,
                extra={**_extra(st, prep, rec, fps[prep.name], device), "batch": info},
                display=display_kwargs(prep.info))
            _finish_done(st, prep, res, result, staging, rec)
            rec["device"] = result["device"]
        except KeyboardInterrupt:
            raise
        except Exception as e:  # noqa: BLE001
            _record_failure(rec, e)
        finally:
            shutil.rmtree(staging, ignore_errors=True)


def _solve_group(st: _State, names: Sequence[str], pairs: dict[str, io.ScenePair],
                 fps: dict[str, dict[str, Any]], device, group: int) -> list[dict[str, Any]]:
    """--batch_size > 1: prepares each scene alone (a bad one fails alone), then solves
    the rest in batches (`_split_batches`); returns the records in the order of names."""
    recs: dict[str, dict[str, Any]] = {}
    ready: list[PreparedScene] = []
    starts: dict[str, float] = {}
    for name in names:
        recs[name] = _new_record(st, name, pairs[name], device, group, fps[name])
        starts[name] = time.perf_counter()
        try:
            ready.append(_prepare(st, name, pairs[name], device))
        except KeyboardInterrupt:
            raise
        except Exception as e:  # noqa: BLE001
            _record_failure(recs[name], e)
            _close(recs[name], {}, starts[name])
    for preps in _split_batches(st, ready):
        if len(preps) == 1:
            try:
                _solve_alone(st, preps[0], recs[preps[0].name], fps[preps[0].name], device)
            except KeyboardInterrupt:
                raise
            except Exception as e:  # noqa: BLE001
                _record_failure(recs[preps[0].name], e)
        else:
            _solve_batch(st, preps, recs, fps, device)
        for p in preps:
            _close(recs[p.name], p.timings, starts[p.name])
    return [recs[n] for n in names]


def _deblur_one(st: _State, name: str, pair: io.ScenePair, device, group: int | None,
                fp: dict[str, Any]) -> dict[str, Any]:
    """--method=dpanet: loads and deblurs one scene; never raises for a bad scene."""
    import jax

    from dpjax import dpanet

    opts, model = st.opts, st.dpanet
    rec = _new_record(st, name, pair, device, group, fp)
    timings: dict[str, float] = {}
    t_start = time.perf_counter()
    staging = _staging_dir(scene_dir(opts.output_dir, name))
    try:
        t0 = time.perf_counter()
        views, info = load_views(pair, st.source, opts.scene)
        timings["load_s"] = time.perf_counter() - t0
        rec["shape"] = list(views.shape)
        if views.shape[-1] != model.config.channels:
            raise SceneFailure("input", f"{pair.left}: {views.shape[-1]}-channel views, the "
                               f"DPANet checkpoint takes {model.config.channels}")
        gt_aif, _ = load_ground_truth(opts.scene.input_dir, name, views.shape[1:3], info)
        t0 = time.perf_counter()
        with jax.default_device(device):
            params = jax.device_put(model.params, device)
            aif = dpanet.deblur_tiled(params, model.config, views, tile=opts.dpanet_tile,
                                      overlap=opts.dpanet_overlap)
        timings["deblur_s"] = time.perf_counter() - t0
        result: dict[str, Any] = {
            "scene": name, "method": "dpanet", "format": pair.format, "inputs": rec["inputs"],
            "preprocessing": info, "dpanet": st.dpanet_info, "fingerprint": fp,
            "timings": {"wall_s": timings["deblur_s"]}, "jax_version": jax.__version__,
            "device": str(device), "process": st.process_index}
        if gt_aif is not None:
            m = pipeline.score(aif, None, gt_all_in_focus=gt_aif)
            inp = pipeline.score(views.mean(axis=0), None, gt_all_in_focus=gt_aif)
            result["metrics"] = {k: m[k] for k in ("psnr", "ssim", "mae")}
            result["input_metrics"] = {k: inp[k] for k in ("psnr", "ssim", "mae")}
            rec["metrics"], rec["input_metrics"] = result["metrics"], result["input_metrics"]
        outputs.write_result(staging, all_in_focus=aif, defocus=None, result=result,
                             **display_kwargs(info))
        t0 = time.perf_counter()
        shown = display_kwargs(info, bits=8)
        _write_thumb(staging / batch.THUMBS["input"],
                     outputs.display_image(views.mean(axis=0), **shown), opts.thumb_size)
        _write_thumb(staging / batch.THUMBS["all_in_focus"],
                     outputs.display_image(aif, **shown), opts.thumb_size)
        timings["thumbnails_s"] = time.perf_counter() - t0
        _swap_in(staging, scene_dir(opts.output_dir, name))
        rec["status"] = "done"
        for w in info.get("warnings", []):
            rec.setdefault("warnings", []).append(w)
            _log(st.on_event, logging.WARNING, f"{name}: {w}", name)
    except KeyboardInterrupt:
        raise
    except Exception as e:  # noqa: BLE001
        _record_failure(rec, e)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    timings["total_s"] = time.perf_counter() - t_start
    rec["timings"] = timings
    return rec


# ----------------------------------------------------------------------------------------
# Set-up shared by run() and run_scene()


DEFAULT_DPANET_CHECKPOINT = (Path(__file__).resolve().parents[1] / "experiments" /
                             "checkpoints" / "dpanet_w8")


def _load_dpanet(opts: RunOptions):
    from dpjax import dpanet

    path = Path(opts.dpanet_checkpoint or DEFAULT_DPANET_CHECKPOINT)
    if opts.dpanet_checkpoint is None and not path.exists():
        raise SetupError(
            f"--method=dpanet needs a trained checkpoint and the default {path} does not "
            "exist: train one (docs/dpanet.md: experiments/train_dpanet.py --output_dir=DIR) "
            "and pass --dpanet_checkpoint=DIR")
    try:
        dpanet.inference.check_tiling(opts.dpanet_tile, opts.dpanet_overlap)
        model = dpanet.load_checkpoint(path)
    except ValueError as e:  # CheckpointError included
        raise SetupError(f"--method=dpanet: {e}") from e
    info = {"checkpoint": str(model.npz), "step": model.step,
            "model_config": model.config.to_dict(), "tile": opts.dpanet_tile,
            "overlap": opts.dpanet_overlap, "digest": io.file_digest(Path(model.npz))}
    return model, info


# The share of the host's RAM a CPU run budgets for its solves: the rest is left to the
# operating system, the host-side copies of the inputs and the loaded libraries.
HOST_RAM_SHARE = 0.8


def memory_budget_bytes(opts: RunOptions, devices: Sequence[Any]) -> float | None:
    """--memory_budget_gb, else the device's memory limit, else HOST_RAM_SHARE of the
    host RAM / devices."""
    if opts.memory_budget_gb is not None:
        return opts.memory_budget_gb * 1e9
    try:
        stats = devices[0].memory_stats()
    except Exception:  # noqa: BLE001 - not every backend implements memory_stats
        stats = None
    if stats and stats.get("bytes_limit"):
        return float(stats["bytes_limit"])
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None
    return HOST_RAM_SHARE * float(ram) / max(1, len(devices))


def release_host_memory() -> bool:
    """Hands the heap's free pages back to the operating system (glibc's malloc_trim).

    XLA's CPU buffers come from malloc, and glibc keeps what a solve frees in its
    arenas, so a batch's resident memory creeps up from scene to scene and its peak
    with it; this removes a part of that creep (six Canon scenes in one process: peak
    by the sixth 3.18 -> 2.99 GB; BENCHMARKS.md, "Memory across the scenes of a
    batch"). Called after every scene. Returns False, doing nothing, where the C
    library has no malloc_trim (macOS, musl).
    """
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return False
    trim(0)
    return True


def _setup(opts: RunOptions, devices: Sequence[Any], on_event: OnEvent | None,
           process_index: int = 0) -> _State:
    """Validates the options and loads what every scene shares; raises SetupError."""
    if opts.batch_size < 1:
        raise SetupError("--batch_size must be >= 1")
    if opts.method not in ("mpi", "dpanet"):
        raise SetupError(f"--method must be mpi or dpanet, got {opts.method!r}")
    if opts.method == "dpanet" and opts.scene.base.init.search:
        raise SetupError("--search_init needs --method=mpi (DPANet has no layers to "
                         "initialise)")
    factor = 2 ** (opts.scene.base.solver.pyramid_levels - 1)
    kernels = opts.kernels
    if kernels.resolved_kind() == "auto":
        # Resolved per scene once the output folder is locked (`_fit_kernels`); until
        # then (and for DPANet, which has no kernels) the default parametric model.
        if opts.scene.crop_tiles is not None:
            raise SetupError("a crop of kernel tiles needs a calibration (--calib_dir)")
        kernels = dataclasses.replace(kernels, kind="parametric")
    source = kernel_source(kernels, factor, opts.scene.crop_tiles)
    model = info = None
    if opts.method == "dpanet":
        model, info = _load_dpanet(opts)
    return _State(opts=opts, source=source, budget=memory_budget_bytes(opts, devices),
                  on_event=on_event, process_index=process_index, dpanet=model,
                  dpanet_info=info)


def _previous_result(out_dir: Path) -> dict[str, Any] | None:
    if not outputs.is_complete(out_dir):
        return None
    try:
        result = json.loads((out_dir / outputs.RESULT_JSON).read_text())
    except (OSError, ValueError):
        return None
    return result if isinstance(result, dict) else None


def _skipped_record(name: str, result: dict[str, Any], status: str, reason: str,
                    ) -> dict[str, Any]:
    """The record of a complete scene not solved by this run, from its result.json."""
    rec: dict[str, Any] = {"scene": name, "status": status, "reason": reason,
                           "method": result.get("method", "mpi")}
    for key in ("metrics", "input_metrics", "metrics_unavailable", "final_loss",
                "iterations", "format"):
        if key in result:
            rec[key] = result[key]
    if isinstance(result.get("preset"), dict):
        rec["scale_range"] = result["preset"].get("scale_range")
    if isinstance(result.get("fingerprint"), dict):
        rec["fingerprint"] = result["fingerprint"].get("digest")
    warnings = (result.get("preprocessing") or {}).get("warnings")
    if warnings:
        rec["warnings"] = warnings
    wall = (result.get("timings") or {}).get("wall_s")
    if wall is not None:
        rec["timings"] = {"previous_solve_s": wall}
    return rec


def _ensure_thumbnails(out_dir: Path, size: int) -> None:
    """Gallery thumbnails of a complete scene from its PNGs, where missing."""
    from PIL import Image

    for key, full in (("all_in_focus", outputs.AIF_PNG), ("defocus", outputs.DEFOCUS_PNG)):
        thumb, src = out_dir / batch.THUMBS[key], out_dir / full
        if thumb.is_file() or not src.is_file():
            continue
        try:
            with Image.open(src) as im:
                a = np.asarray(im.convert("L" if im.mode in ("L", "I;16", "I") else "RGB"))
        except OSError:
            continue
        _write_thumb(thumb, a, size)


def run_scene(opts: RunOptions, name: str, pair: io.ScenePair, *, device=None,
              on_event: OnEvent | None = None) -> dict[str, Any]:
    """Solves (or skips) one scene with nothing but picklable arguments, as an executor in
    another process needs; returns its record and never raises for a bad scene.

    The caller holds the output folder's lock (`run` does). Skips a complete result
    whose fingerprint matches unless opts.overwrite.
    """
    import jax

    device = device if device is not None else jax.local_devices()[0]
    st = _cached_state(opts, device, on_event)
    return _one(st, name, pair, device, None)


_STATE_CACHE: dict[Any, _State] = {}


def _cached_state(opts: RunOptions, device, on_event: OnEvent | None) -> _State:
    key = (opts, str(device))
    st = _STATE_CACHE.get(key)
    if st is None:
        st = _setup(opts, [device], on_event)
        _STATE_CACHE.clear()
        _STATE_CACHE[key] = st
    return dataclasses.replace(st, on_event=on_event)


def _decide(st: _State, name: str, pair: io.ScenePair) -> tuple[dict[str, Any] | None,
                                                                  dict[str, Any]]:
    """(a skip record or None when the scene must be solved, its fingerprint)."""
    fp = fingerprint(st.opts, st.source, pair, st.dpanet_info)
    out_dir = scene_dir(st.opts.output_dir, name)
    previous = _previous_result(out_dir)
    if previous is None:
        return None, fp
    if st.opts.overwrite:
        _log(st.on_event, logging.INFO, f"{name}: --overwrite: solving again", name)
        return None, fp
    why = fingerprint_changes(previous.get("fingerprint"), fp)
    plan = previous.get("block_plan") or {}
    if why is None and plan.get("chosen") == "memory budget":
        budget = None if st.budget is None else round(st.budget / 1e9, 3)
        if plan.get("budget_gb") != budget:  # the split depends on the budget
            why = (f"the memory budget changed ({plan.get('budget_gb')} -> {budget} GB), "
                   "which set its block split")
    if why is None:
        _ensure_thumbnails(out_dir, st.opts.thumb_size)
        return _skipped_record(name, previous, "skipped",
                               "outputs complete with the same settings (--overwrite to "
                               "redo)"), fp
    _log(st.on_event, logging.WARNING, f"{name}: solving again, {why}", name)
    return None, {**fp, "resolve_reason": why}


def _one(st: _State, name: str, pair: io.ScenePair, device, group: int | None,
         ) -> dict[str, Any]:
    try:
        scene_dir(st.opts.output_dir, name)
    except io.InputError as e:
        return {"scene": name, "status": "failed", "error": "input", "reason": f"input: {e}"}
    skip, fp = _decide(st, name, pair)
    if skip is not None:
        return skip
    why = fp.pop("resolve_reason", None)
    rec = _solve_one(st, name, pair, device, group, fp)
    if why is not None:
        rec["resolved_because"] = why
    return rec


# ----------------------------------------------------------------------------------------
# The run


def _scan_results(out_root: Path) -> dict[str, dict[str, Any]]:
    """Complete scene results under out_root (any depth), by scene name."""
    found: dict[str, dict[str, Any]] = {}
    for root, dirs, files in os.walk(out_root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        if outputs.RESULT_JSON in files:
            d = Path(root)
            result = _previous_result(d)
            if result is not None and d != out_root:
                found[d.relative_to(out_root).as_posix()] = result
            dirs[:] = []  # a scene folder holds no other scene
    return found


def _all_records(out_root: Path, this_run: dict[str, dict[str, Any]],
                 previous_summary: dict[str, Any] | None,
                 inputs: set[str]) -> list[dict[str, Any]]:
    """This run's records, plus every other scene present in the output folder (its
    last record in the previous summary, or one made from its result.json), plus earlier
    failures of scenes still in the input folder (`inputs`)."""
    records = dict(this_run)
    prev = {}
    if isinstance(previous_summary, dict):
        for r in previous_summary.get("scenes") or []:
            if isinstance(r, dict) and isinstance(r.get("scene"), str):
                prev[r["scene"]] = r
    for name, result in _scan_results(out_root).items():
        if name in records:
            continue
        old = prev.get(name, {})
        records[name] = {**_skipped_record(name, result, "kept", "not part of this run; "
                                           "result kept from an earlier run"),
                         **({"timings": old["timings"]} if "timings" in old else {})}
    for name, r in prev.items():  # failures of earlier runs stay visible until retried
        if name not in records and name in inputs and r.get("status") == "failed":
            records[name] = {**r, "status": "kept-failed",
                             "reason": f"earlier run: {r.get('reason', '')}"}
    return list(records.values())


def write_reports(out_root: Path, summary: dict[str, Any]) -> None:
    """summary.json and the index.html gallery (both atomic)."""
    outputs.write_json(out_root / SUMMARY_JSON, summary)
    existing = {f"{r['scene']}/{t}" for r in summary["scenes"] for t in batch.THUMBS.values()
                if (out_root / r["scene"] / t).is_file()}
    page = batch.gallery_html(summary, existing)
    outputs.atomic_write_bytes(out_root / INDEX_HTML, page.encode("utf-8"))


Gather = Callable[[Any], list[Any]]


def _scene_list_digest(names: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(names).encode()).hexdigest()[:16]


def _probe_key(pair: io.ScenePair):
    """(format, raw size) of a pair for grouping, or None when it cannot be read."""
    if pair.left is None or pair.right is None:
        return None
    try:
        return pair.format, io.read_image(pair.left)[0].shape
    except (io.InputError, OSError):
        return None


def _frame_pixels(pair: io.ScenePair) -> int:
    """Pixels in a pair's left view read from the file's header (`io.image_size`), to
    order scenes by size on an executor's driver (decoding every frame there costs
    ~0.15 s per Pixel 4 frame before the first scene is submitted); 0 when the view
    cannot be read."""
    if pair.left is None:
        return 0
    try:
        h, w = io.image_size(pair.left)
    except (io.InputError, OSError):
        return 0
    return h * w


class SceneTask(NamedTuple):
    """One scene for an executor that runs scenes in other processes (picklable)."""

    opts: RunOptions
    name: str
    pair: io.ScenePair


def _absolute(opts: RunOptions) -> RunOptions:
    """opts with every path absolute (`Path.absolute`: symlinks kept), for tasks that run
    in other processes: a relative path would be read from each worker's own working
    folder, not the driver's."""

    def fix(path):
        return None if path is None else Path(path).expanduser().absolute()

    return dataclasses.replace(
        opts, input_dir=fix(opts.input_dir), output_dir=fix(opts.output_dir),
        dpanet_checkpoint=fix(opts.dpanet_checkpoint),
        scene=dataclasses.replace(opts.scene, input_dir=fix(opts.scene.input_dir)),
        kernels=dataclasses.replace(opts.kernels, calib_dir=fix(opts.kernels.calib_dir),
                                    white_dir=fix(opts.kernels.white_dir)))


def solve_task(task: SceneTask) -> dict[str, Any]:
    """`run_scene` of a SceneTask: the function an executor runs for every scene. Its
    record also names the process that ran it ("worker": "HOST:PID")."""
    rec = run_scene(task.opts, task.name, task.pair)
    return {**rec, "worker": f"{socket.gethostname()}:{os.getpid()}"}


def _auto_kernels(opts: RunOptions) -> bool:
    """Whether this run estimates its kernels from its pairs (--kernels=auto, MPI)."""
    return opts.method == "mpi" and opts.kernels.resolved_kind() == "auto"


def _fit_kernels(opts: RunOptions, pairs: dict[str, io.ScenePair], out_root: Path,
                 on_event: OnEvent | None) -> tuple[dict[str, KernelOptions], dict[str, Any]]:
    """--kernels=auto (`dpjax.auto_kernels`): every scene's kernel options and the
    summary's record of the fits. Call with the output folder locked."""
    from dpjax import auto_kernels

    t0 = time.perf_counter()
    _log(on_event, logging.INFO, "no --calib_dir: estimating the DP kernels from the "
         f"pairs themselves (--kernels=auto, up to {auto_kernels.MAX_FIT_PAIRS} pairs per "
         "camera and frame size)")
    per_scene, fits = auto_kernels.resolve(
        pairs, opts.kernels, opts.scene, out_root,
        log=lambda level, msg: _log(on_event, level, msg))
    groups = {}
    for key, fit in fits.items():
        how = "reused" if fit.reused else f"fitted in {fit.seconds:.0f} s"
        where = f" -> {fit.folder} (reusable: --calib_dir)" if fit.folder else ""
        if fit.fallback:
            _log(on_event, logging.WARNING, f"self-calibration {key}: rejected ({fit.note}); "
                 "using the default parametric kernels")
        else:
            m = fit.model
            _log(on_event, logging.INFO, f"self-calibration {key}: {how} from "
                 f"{len(fit.pairs)} pairs, radius {m.radius:.3g} px, split angle "
                 f"{m.angle_deg:.1f} deg, explains {fit.summary.get('gain', 0):.0%} of the "
                 f"left/right mismatch{where}")
        groups[key] = {**fit.record(), "kernel_model": fit.model.to_dict(),
                       "self_calibration": str(fit.folder) if fit.folder else None,
                       "reused": fit.reused, "seconds": round(fit.seconds, 3)}
    meta = {"model": "auto", "groups": groups,
            "self_calibration_s": round(time.perf_counter() - t0, 3)}
    return per_scene, meta


def run(opts: RunOptions, *, on_event: OnEvent | None = None,
        devices: Sequence[Any] | None = None, process_index: int = 0,
        process_count: int = 1, gather: Gather | None = None,
        executor: Any = None) -> RunOutcome:
    """Solves this process's share of the scenes in opts.input_dir; returns the exit
    status (module docstring).

    Args:
      on_event: receives `Event`s (progress, finished scenes, log lines).
      devices: local devices to spread scenes over (default jax.local_devices()).
      process_index, process_count: this process's place among the run's processes.
      gather: with several processes, a collective returning every process's value
        (in process order); called the same number of times by all processes.
      executor: run the scenes elsewhere instead of on the local devices: an object
        with `check_output_folder(folder)` and `imap_unordered(fn, tasks)` yielding
        (task index, result) as tasks complete (`dpjax.ray_executor.RayExecutor`); each
        scene is one `solve_task(SceneTask)`, this process writes the summary as
        records arrive. Not with `gather` (one driver).
    """
    import jax

    t_start = time.perf_counter()
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    if executor is not None:
        opts = _absolute(opts)  # the scenes' paths as the driver means them
    out_root = Path(opts.output_dir)
    devices = list(devices) if devices is not None else jax.local_devices()
    lock = OutputLock(out_root)
    try:
        found = io.scan_inputs(opts.input_dir)
        pairs = {p.name: p for p in found.pairs}
        for skipped in found.skipped:
            _log(on_event, logging.WARNING, f"input {skipped.path} ignored: {skipped.reason}")
        if not pairs:
            raise SetupError(f"no DP pairs found in {opts.input_dir} (expected NAME_left/"
                             "NAME_right or NAME_L/NAME_R .png/.tif/.jpg/.pgm images, or "
                             "l/r images in one folder per scene, at any depth)")
        if executor is not None and gather is not None:
            raise SetupError("an executor runs the whole batch from one driver: do not "
                             "combine it with jax.distributed processes")
        st = _setup(opts, devices, on_event, process_index)
        if _auto_kernels(opts) and process_count > 1:
            raise SetupError("--kernels=auto fits the kernels in one process: fit them once "
                             "(experiments/calibrate_kernels.py) and pass --calib_dir to "
                             "every process")
        check_output_dir(out_root)
        if process_index == 0:
            lock.acquire()
        if executor is not None:
            try:
                executor.check_output_folder(out_root)
            except (ValueError, OSError) as e:
                lock.release()
                raise SetupError(str(e)) from None
    except (SetupError, io.InputError) as e:
        _log(on_event, logging.ERROR, f"batch cannot start: {e}")
        return RunOutcome(EXIT_SETUP, {}, {}, "not started")
    try:
        return _run_locked(opts, st, pairs, devices, on_event, process_index, process_count,
                           gather, lock, out_root, started, t_start, executor)
    finally:
        if process_index == 0:
            lock.release()


def _run_locked(opts, st, pairs, devices, on_event, process_index, process_count, gather,
                lock, out_root, started, t_start, executor=None) -> RunOutcome:
    if lock.stale is not None:
        _log(on_event, logging.WARNING, f"took over a stale lock of pid "
             f"{lock.stale.get('pid')} (no longer running)")
    if process_index == 0:
        for line in clean_stale(out_root):
            _log(on_event, logging.INFO, f"cleaned up after an interrupted run: {line}")
    if st.source.info.get("warning"):
        _log(on_event, logging.WARNING, f"calibration: {st.source.info['warning']}")
    names = sorted(pairs)
    missing: list[str] = []
    if opts.scenes:
        missing = sorted(set(opts.scenes) - set(pairs))
        names = sorted(set(opts.scenes))
    if gather is not None:
        digests = gather(_scene_list_digest(names))
        if len(set(digests)) != 1:
            _log(on_event, logging.ERROR, "the processes found different scene lists (is "
                 "--input_dir the same shared folder on every host?)")
            return RunOutcome(EXIT_SETUP, {}, {}, "not started")
    share = batch.shard_scenes(names, process_index, process_count)
    scene_kernels: dict[str, KernelOptions] = {}
    kernels_meta: dict[str, Any] = st.source.info
    if _auto_kernels(opts):
        try:
            scene_kernels, kernels_meta = _fit_kernels(opts, pairs, out_root, on_event)
        except KeyboardInterrupt as e:
            terminated = isinstance(e, Terminated)
            _log(on_event, logging.ERROR, f"{'terminated' if terminated else 'interrupted'} "
                 "during self-calibration: nothing solved")
            return RunOutcome(EXIT_SIGTERM if terminated else EXIT_SIGINT, {}, {},
                              "terminated" if terminated else "interrupted")
    states: dict[KernelOptions, _State] = {}

    def state_of(name: str) -> _State:
        k = scene_kernels.get(name)
        if k is None:
            return st
        if k not in states:
            states[k] = _setup(dataclasses.replace(opts, kernels=k), devices, on_event,
                               process_index)
        return states[k]

    if st.source.info["model"] == "parametric" and opts.method == "mpi" and not scene_kernels:
        k = opts.kernels
        _log(on_event, logging.INFO, f"--kernels=parametric: the parametric DP kernel model "
             f"(radius {k.radius:.3g} px, ramp {k.ramp:.3g}, smoothing {k.smooth:.3g} px, "
             f"{st.source.kernel_size} px kernels)")
    if on_event is not None:
        on_event(Event("start", None, {"scenes": len(names), "share": len(share),
                                        "devices": [str(d) for d in devices],
                                        "process_index": process_index,
                                        "process_count": process_count}))
    try:
        previous_summary = json.loads((out_root / SUMMARY_JSON).read_text())
    except (OSError, ValueError):
        previous_summary = None
    meta = {"input_dir": str(opts.input_dir), "output_dir": str(out_root),
            "method": opts.method, "kernels": kernels_meta, "preset": opts.scene.preset,
            "search_init": opts.scene.base.init.search,
            "defocus_estimator": opts.scene.base.post.defocus,
            "defocus_fill": opts.scene.base.post.fill,
            "base_config": config_lib.to_dict(opts.scene.base),
            "linear_input_solver": solver_record(opts.scene.linear_solver),
            "code_version": code_version(),
            "process_count": process_count, "devices_per_process": len(devices),
            "batch_size": opts.batch_size,
            "memory_budget_gb": None if st.budget is None else round(st.budget / 1e9, 3),
            "started": started}
    share_path = out_root / (SUMMARY_JSON if process_count == 1 else
                             f"summary.process-{process_index}-of-{process_count}.json")
    records: dict[str, dict[str, Any]] = {}
    rlock = threading.Lock()

    def summary_of(recs: list[dict[str, Any]], state: str, **extra) -> dict[str, Any]:
        return batch.summarize(recs, **meta, **extra, state=state,
                               wall_s=time.perf_counter() - t_start)

    def save_share(state: str) -> dict[str, Any]:
        with rlock:
            recs = list(records.values())
        extra = {"process_index": process_index} if process_count > 1 else {}
        if process_count == 1:
            summary = summary_of(_all_records(out_root, {r["scene"]: r for r in recs},
                                              previous_summary, set(pairs)), state)
            write_reports(out_root, summary)
            return summary
        summary = summary_of(recs, state, **extra)
        outputs.write_json(share_path, summary)
        return summary

    def finish(rec: dict[str, Any]) -> None:
        with rlock:
            records[rec["scene"]] = rec
        if on_event is not None:
            on_event(Event("scene", rec["scene"], rec))
        save_share("running")
        release_host_memory()

    nested = nested_scene_problems(names)
    todo: list[str] = []
    for name in share:
        if name in nested:
            finish({"scene": name, "status": "failed", "error": "input",
                    "reason": nested[name]})
        elif name in missing:
            finish({"scene": name, "status": "failed", "error": "input",
                    "reason": f"input: scene {name!r} (from --scenes) not found in "
                              f"{opts.input_dir}"})
        else:
            todo.append(name)

    keys: dict[str, Any] = {}
    if opts.batch_size > 1:  # one batch: one shape and one kernel set; unreadable alone
        for n in todo:
            probe = _probe_key(pairs[n])
            keys[n] = None if probe is None else (probe, scene_kernels.get(n))
    for name in todo:  # kernel sources are set up here, not in the workers' threads
        state_of(name)
    groups = batch.group_by_shape(todo, keys, opts.batch_size)
    per_device: dict[int, list[tuple[int, list[str]]]] = {i: [] for i in range(len(devices))}
    for gi, (group, slot) in enumerate(batch.assign_round_robin(groups,
                                                                list(range(len(devices))))):
        per_device[slot].append((gi, group))

    def worker(slot: int) -> None:
        device = devices[slot]
        for gi, group in per_device[slot]:
            if len(group) > 1 and opts.method == "mpi":
                solve, fps = [], {}
                for name in group:
                    try:
                        scene_dir(opts.output_dir, name)
                    except io.InputError as e:
                        finish({"scene": name, "status": "failed", "error": "input",
                                "reason": f"input: {e}"})
                        continue
                    skip, fp = _decide(state_of(name), name, pairs[name])
                    if skip is not None:
                        finish(skip)
                    else:
                        fp.pop("resolve_reason", None)
                        solve.append(name)
                        fps[name] = fp
                if solve:
                    for rec in _solve_group(state_of(solve[0]), solve, pairs, fps, device,
                                            gi):
                        finish(rec)
                continue
            for name in group:
                finish(_one(state_of(name), name, pairs[name], device, gi))

    def remote() -> None:
        # Largest frames first: with dynamic scheduling the long scenes then start early
        # and the short ones fill the gaps at the end (docs/ray.md, the benchmark).
        size = {n: _frame_pixels(pairs[n]) for n in todo}
        order = sorted(todo, key=lambda n: -size[n])
        tasks = [SceneTask(state_of(name).opts, name, pairs[name]) for name in order]
        for i, rec in executor.imap_unordered(solve_task, tasks):
            if "scene" not in rec:  # the executor's record of a task that never returned
                rec = {"scene": order[i], **rec}
            finish(rec)

    state, status = "complete", None
    try:
        if executor is not None:
            remote()
        elif len(devices) == 1:
            worker(0)
        else:
            threads = [threading.Thread(target=worker, args=(i,), daemon=True,
                                        name=f"dpjax-{devices[i]}") for i in per_device]
            for t in threads:
                t.start()
            for t in threads:
                while t.is_alive():
                    t.join(timeout=0.5)
    except KeyboardInterrupt as e:
        terminated = isinstance(e, Terminated)
        state = "terminated" if terminated else "interrupted"
        status = EXIT_SIGTERM if terminated else EXIT_SIGINT
        with rlock:
            for name in share:
                records.setdefault(name, {"scene": name, "status": "not run",
                                          "reason": f"{state} before this scene finished"})
        _log(on_event, logging.ERROR, f"{state}: completed scenes are kept; run the same "
             "command again to resume")
    if executor is not None and process_index == 0:
        clean_stale(out_root)  # staging folders of workers that died mid-scene
    share_summary = save_share(state)
    summary = share_summary
    if gather is not None:
        shares = gather(share_summary)
        recs = {r["scene"]: r for s in shares for r in s["scenes"]}
        summary = summary_of(_all_records(out_root, recs, previous_summary, set(pairs)), state)
        if process_index == 0:
            write_reports(out_root, summary)
    mine = list(records.values())
    counts = {k: sum(1 for r in mine if r["status"] == k) for k in batch.STATUSES}
    if status is None:
        status = batch.exit_status(mine)
    return RunOutcome(status, summary, counts, state)
