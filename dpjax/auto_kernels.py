"""--kernels=auto: a batch's own pairs calibrate its kernels before any scene is solved.

Without a calibration folder the runner (`dpjax.runner`) fits the dual-pixel kernel
model (`dpjax.selfcal.fit_kernel_model`) to the batch's pairs, one fit per camera
geometry, and solves every scene with the fitted model rendered on that scene's tiles:

  1. group: pairs are grouped by frame size (read from the file headers) and, where
     their EXIF says, camera model, f-number and focal length (`group_pairs`); one
     kernel set is for one camera, lens and aperture;
  2. fit: up to `MAX_FIT_PAIRS` pairs of a group, spread evenly over its scene names,
     are loaded as the solve loads them (`dpjax.scene.load_views`: linearised, Pixel
     pairs vignetting-corrected when white sheets are given) and fitted jointly;
  3. write: the fit is saved as a reusable calibration folder
     OUTPUT/self_calibration/GROUP/ (`selfcal.save_self_calibration`: blur_kernels_
     {left,right}.npy for the fitted frame, kernels_meta.json with the parameters and
     the fit's quality), which `--calib_dir` accepts for later photos of the camera;
  4. reuse: a later run reads the model back instead of fitting again when the
     folder's fitted pairs are all still in the group, unchanged (by content), loaded
     with the same settings and fitted by the same code; anything else fits again and
     replaces the folder. Adding photos to a folder therefore keeps its kernels (and
     the results solved with them); changing a fitted photo refits.

The fit draws on every pair of the input folder's group, not only the scenes selected
for this run (`--scenes`), so that a subset re-run reuses the same kernels. A fit the
quality checks reject (too little defocus or texture, an undetermined orientation)
falls back to `kernel_model.LEGACY_MODEL` (the default parametric kernels) with the
reason in the record and a warning.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from dpjax import io, outputs, selfcal
from dpjax.kernel_model import LEGACY_MODEL, DpKernelModel
from dpjax.scene import KernelOptions, SceneOptions, SetupError, kernel_source, load_views

__all__ = [
    "FOLDER",
    "MAX_FIT_PAIRS",
    "GroupFit",
    "fit_group",
    "group_pairs",
    "pick_pairs",
    "resolve",
]

FOLDER = "self_calibration"  # under the output folder
MAX_FIT_PAIRS = 8  # pairs per fit: 8 x 64 windows is plenty; more only costs time
MIN_FOLDER_TILE = 32  # smaller tiles: no folder is written (it would hold ~H W / 1000 tiles)


class GroupFit(NamedTuple):
    """One group's kernels.

    key: the group's name (its folder under OUTPUT/self_calibration); folder: that
    folder (None when nothing could be written); model: the kernel model every scene
    of the group is solved with; pairs: the scene names fitted; reused: read back from
    an earlier run's folder; fallback/note: the fit was rejected and why; summary:
    `SelfCalResult.summary()` (or the reused one); seconds: this run's time for it.
    """

    key: str
    folder: Path | None
    model: DpKernelModel
    pairs: tuple[str, ...]
    reused: bool
    fallback: bool
    note: str | None
    summary: dict[str, Any]
    seconds: float

    def record(self) -> dict[str, Any]:
        """What each scene's result.json keeps of it (part of its fingerprint: nothing
        here may change when the output folder is moved)."""
        return {"group": self.key, "fit_pairs": list(self.pairs),
                "fallback": self.fallback, "note": self.note,
                "gain": self.summary.get("gain"),
                "angle_margin": self.summary.get("angle_margin"),
                "blur_p90": selfcal.blur_p90(self.summary)}


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "_", text).strip("_") or "x"


def group_pairs(pairs: Mapping[str, io.ScenePair]) -> tuple[dict[str, list[str]], list[str]]:
    """({group key: scene names}, names whose size cannot be read).

    The key is "HxW" of the left view's file (header only), plus the camera model,
    f-number and focal length from its EXIF when a size holds pairs of several
    cameras or settings.
    """
    by_size: dict[str, list[tuple[str, dict]]] = {}
    unread: list[str] = []
    for name in sorted(pairs):
        p = pairs[name]
        if p.left is None or p.right is None:
            unread.append(name)
            continue
        try:
            h, w = io.image_size(p.left)
            cam = io.read_camera_settings(p.left)
        except (io.InputError, OSError):
            unread.append(name)
            continue
        by_size.setdefault(f"{h}x{w}", []).append((name, cam))
    groups: dict[str, list[str]] = {}
    for size, members in by_size.items():
        cams = {json.dumps(c, sort_keys=True) for _, c in members}
        for name, cam in members:
            key = size
            if len(cams) > 1:
                parts = [str(cam.get("model", "unknown"))]
                if "f_number" in cam:
                    parts.append(f"f{cam['f_number']:g}")
                if "focal_length_mm" in cam:
                    parts.append(f"{cam['focal_length_mm']:g}mm")
                key = f"{size}-{_slug('-'.join(parts))}"
            groups.setdefault(key, []).append(name)
    return groups, unread


def pick_pairs(names: Sequence[str], limit: int = MAX_FIT_PAIRS) -> list[str]:
    """Up to `limit` of the sorted names, spread evenly (deterministic)."""
    names = sorted(names)
    if len(names) <= limit:
        return names
    idx = np.unique(np.round(np.linspace(0, len(names) - 1, limit)).astype(int))
    return [names[i] for i in idx]


def _code_digest() -> str:
    root = Path(__file__).parent
    h = hashlib.sha256()
    for name in ("selfcal", "kernel_model", "kernels", "conv", "encoding", "io", "scene",
                 "auto_kernels"):
        h.update((root / f"{name}.py").read_bytes())
    return h.hexdigest()[:12]


def _inputs_digest(pairs: Sequence[io.ScenePair], scene_opts: SceneOptions,
                   white: tuple[Path, Path] | None, config: selfcal.SelfCalConfig) -> str:
    """Everything a fit depends on: the pairs' content, how they are loaded, the fit's
    settings and code."""
    rec = {"pairs": [[p.name, p.format, io.file_digest(p.left), io.file_digest(p.right)]
                     for p in pairs],
           "black_level": scene_opts.black_level, "allow_8bit": scene_opts.allow_8bit,
           "encoding": scene_opts.encoding or "auto",
           "white": None if white is None else [io.file_digest(w) for w in white],
           "config": repr(config), "code": _code_digest()}
    return hashlib.sha256(json.dumps(rec, sort_keys=True).encode()).hexdigest()[:16]


def _read_previous(folder: Path) -> dict[str, Any] | None:
    """An earlier run's kernels_meta.json in folder, when it is one of ours."""
    try:
        meta = json.loads((folder / io.KERNELS_META).read_text())
        DpKernelModel.from_dict(meta["model"])
        if not (isinstance(meta["auto_inputs"], str) and isinstance(meta["pairs"], list)
                and isinstance(meta["self_calibration"], dict)):
            return None
        return meta
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _write_folder(folder: Path, result: selfcal.SelfCalResult, shape: tuple[int, int],
                  pairs: Sequence[io.ScenePair], digest: str, settings: dict) -> None:
    """Writes the calibration folder into a staging sibling, then swaps it in
    (`outputs.swap_in`, as the runner's scene folders)."""
    staging = outputs.staging_dir(folder)
    shutil.rmtree(staging, ignore_errors=True)
    try:
        selfcal.save_self_calibration(
            staging, result, height=shape[0], width=shape[1],
            sources=[str(p.left) for p in pairs], settings=settings,
            extra_meta={"auto_inputs": digest, "pairs": [p.name for p in pairs]})
        outputs.swap_in(staging, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def fit_group(key: str, group: Sequence[io.ScenePair], scene_opts: SceneOptions,
              kernels: KernelOptions, out_root: Path | None, *,
              config: selfcal.SelfCalConfig = selfcal.SelfCalConfig(),
              max_pairs: int = MAX_FIT_PAIRS,
              log: Callable[[int, str], None] | None = None) -> GroupFit:
    """Fits (or reads back) one group's kernel model; never raises for bad pairs.

    Args:
      key: the group's name; group: all its pairs (up to max_pairs are fitted,
        `pick_pairs`).
      scene_opts: how views are loaded (encoding, black level, ...).
      kernels: the run's kernel options (kind auto; their white_dir is used).
      out_root: the output folder (None: write nothing, never reuse).
      config: the fit's settings.
      log: (logging level, message) for warnings.
    """
    import logging

    t0 = time.perf_counter()
    log = log or (lambda level, msg: None)
    loader = kernel_source(dataclasses.replace(kernels, kind="parametric", calib_dir=None,
                                               model=None), 1)
    folder = None if out_root is None else Path(out_root) / FOLDER / key
    by_name = {p.name: p for p in group}
    if folder is not None:
        meta = _read_previous(folder)
        if meta is not None and meta["pairs"] and all(n in by_name for n in meta["pairs"]):
            fitted = [by_name[n] for n in meta["pairs"]]
            if meta["auto_inputs"] == _inputs_digest(fitted, scene_opts, loader.white_sheets,
                                                     config):
                summary = meta["self_calibration"]
                return GroupFit(key, folder, DpKernelModel.from_dict(meta["model"]),
                                tuple(meta["pairs"]), True, bool(summary.get("fallback")),
                                summary.get("note"), summary, time.perf_counter() - t0)
    pairs = [by_name[n] for n in pick_pairs(list(by_name), max_pairs)]
    views, used, settings = [], [], []
    whole = dataclasses.replace(scene_opts, whole_frame=True)  # the frame the folder covers
    for p in pairs:
        try:
            v, _ = load_views(p, loader, whole)
        except (ValueError, OSError) as e:  # io.InputError is a ValueError
            log(logging.WARNING, f"self-calibration: {p.name} left out ({e})")
            continue
        if views and v.shape != views[0].shape:
            log(logging.WARNING, f"self-calibration: {p.name} left out (its views are "
                f"{v.shape[1]}x{v.shape[2]}, {used[0]}'s {views[0].shape[1]}x"
                f"{views[0].shape[2]})")
            continue
        try:
            cam = io.read_camera_settings(p.left)
        except (ValueError, OSError):  # unreadable EXIF: nothing to compare
            cam = {}
        views.append(v)
        used.append(p)
        settings.append(cam)
    note = None
    if not views:
        note = "no pair of the group could be loaded"
    else:
        try:
            res = selfcal.fit_kernel_model(views, config, names=[p.name for p in used])
        except (ValueError, FloatingPointError) as e:
            note = f"the fit failed: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
    if note is not None:
        return GroupFit(key, None, LEGACY_MODEL, tuple(p.name for p in used), False, True,
                        note, {"fallback": True, "note": note}, time.perf_counter() - t0)
    shared = {k: v for k, v in settings[0].items() if all(s.get(k) == v for s in settings)}
    h, w = views[0].shape[1:3]
    if folder is not None and selfcal.choose_tile_size(h, w) < MIN_FOLDER_TILE:
        log(logging.WARNING, f"self-calibration {key}: the kernels are used but no "
            f"calibration folder is written ({h}x{w} px has no common tile size of at least "
            f"{MIN_FOLDER_TILE} px; experiments/calibrate_kernels.py --tile_size on a cropped "
            "frame makes one)")
        folder = None
    if folder is not None:
        digest = _inputs_digest(used, scene_opts, loader.white_sheets, config)
        try:
            _write_folder(folder, res, (h, w), used, digest, shared)
        except (OSError, ValueError, RuntimeError) as e:  # RuntimeError: XLA out of memory
            log(logging.WARNING, f"self-calibration: cannot write {folder} ({e}); the "
                "kernels are used but not kept")
            folder = None
    return GroupFit(key, folder, res.model, tuple(p.name for p in used), False, res.fallback,
                    res.note, res.summary(), time.perf_counter() - t0)


def resolve(pairs: Mapping[str, io.ScenePair], kernels: KernelOptions,
            scene_opts: SceneOptions, out_root: Path | None, *,
            config: selfcal.SelfCalConfig = selfcal.SelfCalConfig(),
            max_pairs: int = MAX_FIT_PAIRS,
            log: Callable[[int, str], None] | None = None,
            ) -> tuple[dict[str, KernelOptions], dict[str, GroupFit]]:
    """Every scene's kernel options (kind "fitted", its group's model) and the fits.

    Scenes whose size cannot be read get the default parametric kernels (they fail
    to load anyway, with their own error).

    Raises:
      SetupError: kernels not of kind auto.
    """
    if kernels.resolved_kind() != "auto":
        raise SetupError("auto_kernels.resolve needs --kernels=auto")
    groups, unread = group_pairs(pairs)
    per_scene: dict[str, KernelOptions] = {}
    fits: dict[str, GroupFit] = {}
    for key, names in sorted(groups.items()):
        fit = fit_group(key, [pairs[n] for n in names], scene_opts, kernels, out_root,
                        config=config, max_pairs=max_pairs, log=log)
        fits[key] = fit
        opts = dataclasses.replace(kernels, kind="fitted", model=fit.model,
                                   fit_info=fit.record())
        for n in names:
            per_scene[n] = opts
    for n in unread:
        per_scene[n] = dataclasses.replace(kernels, kind="parametric")
    return per_scene, fits
