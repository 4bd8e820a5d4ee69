"""One scene made ready to solve: views, kernel bank, configuration, start, ground truth.

Host-side glue shared by the batch runner (`dpjax.runner`), run_solver.py and
experiments/reproduce_table.py, so that every entry point loads, crops, configures and
starts a scene the same way:

  kernel_source(KernelOptions)        once per run: calibration folder or parametric model
  prepare(name, pair, SceneOptions)   per scene: views -> bank -> preset -> start -> checks

Axis glossary as in the README: V = 2 views, T tiles, K kernel side, H, W, C image.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import numpy as np

from dpjax import batch, blocks, encoding, io, pipeline, presets, refine
from dpjax import config as config_lib
from dpjax.kernel_model import render_kernel_pairs
from dpjax.kernels import (
    KernelBank,
    TileGrid,
    layer_kernel_radius,
    parametric_dp_kernels,
    recenter_kernel_pairs,
    support_radius,
)

__all__ = [
    "KernelOptions",
    "KernelSource",
    "PreparedScene",
    "SceneFailure",
    "SceneOptions",
    "SetupError",
    "crop_block",
    "display_kwargs",
    "input_warnings",
    "kernel_source",
    "load_ground_truth",
    "load_views",
    "make_bank",
    "plan_solve",
    "prepare",
    "solve_memory",
]


class SetupError(Exception):
    """A run cannot start (unreadable calibration, bad settings, unusable output folder)."""


class SceneFailure(Exception):
    """A scene that cannot be solved; `kind` names the category in the summary."""

    def __init__(self, kind: str, message: str, **details: Any):
        super().__init__(message)
        self.kind = kind
        self.details = details  # more fields for the scene's record


KERNEL_KINDS = ("auto", "calibrated", "parametric", "fitted")
# SceneOptions.prior_encoding: the image priors in each input's own encoding.
PRIOR_INPUT = "input"


@dataclasses.dataclass(frozen=True, kw_only=True)
class KernelOptions:
    """Where the blur kernels come from.

    Attributes:
      kind: "calibrated" (calib_dir's kernels), "auto" (estimated from the batch's own
        pairs before solving: `dpjax.auto_kernels`, which turns it into "fitted"),
        "parametric" (`dpjax.parametric_dp_kernels` with the arguments below), or
        "fitted" (`model` rendered on each scene's tiles). None: calibrated when
        calib_dir is given, else auto.
      calib_dir: a calibration folder (blur_kernels_{left,right}.npy, optional
        kernels_meta.json and Pixel white sheets).
      white_dir: where white_sheet_{left,right}.png for the Pixel vignetting correction
        are read (None: calib_dir's, when it has them).
      recenter: re-centre each tile's kernel pair (`recenter_kernel_pairs`), calibrated
        or fitted: a fitted model's mean kernel moves off centre where its split does
        (split, split_gradient), which would displace the all-in-focus image by an
        amount that grows with defocus, differently across the frame.
      grid, tile_size: parametric model's tile grid (rows, cols) and tile side in px
        (None: tiles of about 256 px, chosen per image; `batch.auto_tiles`).
      radius, ramp, smooth, size: `dpjax.parametric_dp_kernels` arguments.
      model: kind "fitted": the `dpjax.kernel_model.DpKernelModel` to render.
      fit_info: kind "fitted": where the model came from (recorded with the kernels).
    """

    kind: str | None = None
    calib_dir: Path | None = None
    white_dir: Path | None = None
    recenter: bool = True
    grid: tuple[int, int] | None = None
    tile_size: int | None = None
    radius: float = 8.0
    ramp: float = 0.5
    smooth: float = 0.7
    size: int | None = None
    model: Any = None
    fit_info: dict[str, Any] | None = dataclasses.field(default=None, compare=False)

    def resolved_kind(self) -> str:
        """The kind, with None resolved; SetupError for an inconsistent choice."""
        kind = self.kind or ("calibrated" if self.calib_dir is not None else "auto")
        if kind not in KERNEL_KINDS:
            raise SetupError(f"kernels must be one of {', '.join(KERNEL_KINDS)}, got {kind!r}")
        if (kind == "calibrated") != (self.calib_dir is not None):
            raise SetupError("calibrated kernels need a calibration folder (--calib_dir)"
                             if kind == "calibrated" else
                             f"--kernels={kind} does not read --calib_dir's kernels (use "
                             "--white_dir for its white sheets)")
        if (kind == "fitted") != (self.model is not None):
            raise SetupError("fitted kernels need a kernel model" if kind == "fitted" else
                             "a kernel model is only used with fitted kernels")
        return kind


@dataclasses.dataclass(frozen=True)
class KernelSource:
    """Calibrated kernels ([2, T, K, K] numpy and their grid), the parametric model, or a
    fitted kernel model (`model`; kernels then holds its centre tile's pair)."""

    kernels: np.ndarray  # [2, T, K, K] (parametric: [2, 1, K, K], repeated per tile)
    grid: tuple[int, int] | None  # None: chosen per image (parametric)
    tile_size: int | None  # None: chosen per image (parametric)
    info: dict[str, Any]
    white_sheets: tuple[Path, Path] | None = None
    model: Any = None  # fitted: the DpKernelModel rendered on each scene's tiles
    recenter: bool = False  # fitted: re-centre each tile's rendered pair
    # The fitted photos' blur in the kernels' unit, when known (io.CalibratedKernels):
    # scales the auto preset's search grid (presets.search_scales).
    blur_p90: float | None = None

    @property
    def kernel_size(self) -> int:
        return int(self.kernels.shape[-1])

    @property
    def fixed_shape(self) -> tuple[int, int] | None:
        if self.grid is None or self.tile_size is None:
            return None
        return self.grid[0] * self.tile_size, self.grid[1] * self.tile_size


def crop_block(crop_tiles: tuple[int, int] | None, grid: tuple[int, int],
               ) -> tuple[int, int, int, int] | None:
    """(row0, col0, R, C) of the central R x C block of a grid's tiles; None keeps all.

    Raises:
      SetupError: a block larger than the grid or empty.
    """
    if crop_tiles is None:
        return None
    r, c = crop_tiles
    if not (1 <= r <= grid[0] and 1 <= c <= grid[1]):
        raise SetupError(f"a crop of {r}x{c} tiles does not fit the {grid[0]}x{grid[1]} "
                         "kernel grid")
    return (grid[0] - r) // 2, (grid[1] - c) // 2, r, c


def _white_sheets(folder: Path | None, explicit: bool) -> tuple[Path, Path] | None:
    """(left, right) white sheets in folder, or None; SetupError when an explicit
    --white_dir lacks them."""
    if folder is None:
        return None
    whites = (Path(folder) / io.WHITE_LEFT, Path(folder) / io.WHITE_RIGHT)
    if all(p.is_file() for p in whites):
        return whites
    if explicit:
        raise SetupError(f"--white_dir {folder}: {io.WHITE_LEFT} and {io.WHITE_RIGHT} not "
                         "found")
    return None


def kernel_source(opts: KernelOptions, pyramid_factor: int,
                  crop_tiles: tuple[int, int] | None = None) -> KernelSource:
    """Loads the calibration once (cropped to `crop_tiles`), or sets up the parametric or
    fitted model. Kind "auto" must be resolved first (`dpjax.auto_kernels.resolve`).

    Raises:
      SetupError: an unreadable calibration, bad model parameters, tiles that do not
        divide by the pyramid factor, an unresolved "auto".
    """
    kind = opts.resolved_kind()
    if kind == "auto":
        raise SetupError("--kernels=auto is resolved by the batch runner before kernels are "
                         "loaded (dpjax.auto_kernels)")
    whites = _white_sheets(opts.white_dir, explicit=True) if opts.white_dir is not None \
        else None
    if kind == "calibrated":
        try:
            calib = io.load_calibration_kernels(opts.calib_dir)
        except (ValueError, OSError) as e:
            raise SetupError(f"calibration {opts.calib_dir}: {e}") from e
        kernels = calib.kernels
        if opts.recenter:
            kernels = recenter_kernel_pairs(kernels)
        have = [(Path(opts.calib_dir) / n).is_file() for n in (io.WHITE_LEFT, io.WHITE_RIGHT)]
        if whites is None:
            whites = _white_sheets(opts.calib_dir, explicit=False)
        grid = calib.grid
        block = crop_block(crop_tiles, grid)
        if block is not None:
            r0, c0, rows, cols = block
            k = kernels.reshape(2, grid[0], grid[1], *kernels.shape[-2:])
            kernels = k[:, r0:r0 + rows, c0:c0 + cols].reshape(2, rows * cols,
                                                               *kernels.shape[-2:])
            grid = (rows, cols)
        info = {"model": "calibrated", "calib_dir": str(opts.calib_dir),
                "grid": list(grid), "tile_size": calib.tile_size,
                "kernel_size": int(kernels.shape[-1]), "recentered": opts.recenter,
                "vignetting_white_sheets": whites is not None}
        if calib.blur_p90 is not None:  # a self-calibration's folder
            info["blur_p90"] = calib.blur_p90
        if any(have) and not all(have) and opts.white_dir is None:
            info["warning"] = ("the calibration has only one white sheet: Pixel pairs are "
                               "not corrected for vignetting")
        if block is not None:
            info.update(crop_tiles=list(block), full_grid=list(calib.grid))
        source = KernelSource(kernels=kernels, grid=grid, tile_size=calib.tile_size,
                              white_sheets=whites, info=info, blur_p90=calib.blur_p90)
    else:
        if crop_tiles is not None:
            raise SetupError("a crop of kernel tiles needs a calibration (--calib_dir)")
        if opts.tile_size is not None and opts.grid is None:
            raise SetupError("--tile_size needs --grid (RxC)")
        if kind == "fitted":
            pair = render_kernel_pairs(opts.model, rows=1, cols=1)
            info = {"model": "fitted", "kernel_model": opts.model.to_dict(),
                    "kernel_size": int(pair.shape[-1]), "recentered": opts.recenter,
                    **(opts.fit_info or {})}
        else:
            try:
                pair = parametric_dp_kernels(radius=opts.radius, ramp=opts.ramp,
                                             smooth_sigma=opts.smooth, size=opts.size)[:, None]
            except ValueError as e:
                raise SetupError(f"parametric kernel model: {e}") from e
            info = {"model": "parametric", "radius": opts.radius, "ramp": opts.ramp,
                    "smooth_sigma": opts.smooth, "kernel_size": int(pair.shape[-1])}
        info.update(grid=None if opts.grid is None else list(opts.grid),
                    tile_size=opts.tile_size, vignetting_white_sheets=whites is not None)
        source = KernelSource(kernels=pair, grid=opts.grid, tile_size=opts.tile_size,
                              white_sheets=whites, info=info,
                              model=opts.model if kind == "fitted" else None,
                              recenter=kind == "fitted" and opts.recenter,
                              blur_p90=(opts.fit_info or {}).get("blur_p90")
                              if kind == "fitted" else None)
    if source.tile_size is not None and source.tile_size % pyramid_factor:
        raise SetupError(f"kernel tiles of {source.tile_size} px do not divide by the pyramid "
                         f"factor {pyramid_factor}; use fewer --pyramid_levels")
    return source


@dataclasses.dataclass(frozen=True, kw_only=True)
class SceneOptions:
    """How each scene is loaded and configured (everything but the kernels' origin).

    Attributes:
      base: the configuration every scene starts from, with the preset's
        scene-independent choices already made (`presets.resolve_base`).
      preset: "auto", "paper" or "none" (`presets.resolve`).
      range_probe: auto preset: refine the searched range with a coarse probe solve.
      black_level: raw black level (None: the format's default).
      allow_8bit: accept 8-bit views read as linear (raw formats, --input_encoding=linear).
      encoding: how the files are encoded: None or "auto" (`dpjax.encoding.auto_encoding`:
        8-bit files and JPEG sRGB, the rest linear), "linear", "srgb", "gamma:G".
      crop_tiles: solve only the central R x C block of kernel tiles (calibrated).
      input_dir: where ground truth in the Pixel 4 layout is looked for
        (input_dir/gt_all_in_focus_im/NAME_gt.png, .../gt_defocus_map/NAME_gt.png).
      whole_frame: keep the whole frame (no kernel grid: DPANet).
      blocks: solve in a (rows, cols) split of overlapping blocks (`dpjax.blocks`)
        whatever the memory; None: one block when the frame fits the memory budget,
        else the split with the least estimated work whose blocks do (`plan_solve`).
      prior_encoding: the curve the fit's priors see the layer intensities through
        (`losses.LossWeights.prior_encoding`): PRIOR_INPUT ("input", the default) the
        input's own encoding (linear for raw and linear files, so their
        solve is the paper's), else "linear", "srgb" or "gamma:G" for every scene;
        resolved per scene by `configure`.
      linear_solver: the solver for scenes whose input is linear (raw, 16-bit, float),
        in place of `base.solver`; None: `base.solver` for every scene. The apps set
        it to `presets.linear_input_solver` (L-BFGS when no optimizer is asked for).
    """

    base: config_lib.Config
    preset: str = "auto"
    range_probe: bool = False
    black_level: float | None = None
    allow_8bit: bool = False
    encoding: str | None = None
    crop_tiles: tuple[int, int] | None = None
    input_dir: Path | None = None
    whole_frame: bool = False
    blocks: tuple[int, int] | None = None
    prior_encoding: str = PRIOR_INPUT
    linear_solver: config_lib.SolverConfig | None = None

    def __post_init__(self):
        check_prior_encoding(self.prior_encoding)
        if self.encoding is not None:
            try:
                encoding.parse_encoding(self.encoding, allow_auto=True)
            except ValueError as e:
                raise ValueError(f"encoding: {e}") from None
        if (self.linear_solver is not None
                and self.linear_solver.pyramid_levels != self.base.solver.pyramid_levels):
            raise ValueError("linear_solver must have base's pyramid levels "
                             f"({self.base.solver.pyramid_levels}), not "
                             f"{self.linear_solver.pyramid_levels}")


def check_prior_encoding(text: str) -> None:
    """ValueError unless `text` is a `SceneOptions.prior_encoding`."""
    if text != PRIOR_INPUT:
        try:
            encoding.parse_encoding(text)
        except ValueError as e:
            raise ValueError(f"prior_encoding: {e} (or '{PRIOR_INPUT}', the input's "
                             "own)") from None


def for_input(opts: SceneOptions, input_encoding: str) -> SceneOptions:
    """`opts` with `base` set for one scene whose input was encoded with
    `input_encoding`: `loss.prior_encoding` that encoding for PRIOR_INPUT (else the
    curve asked for), and the solver `linear_solver` for linear input when set."""
    enc = input_encoding if opts.prior_encoding == PRIOR_INPUT else opts.prior_encoding
    base = opts.base.replace(**{"loss.prior_encoding": enc})
    if encoding.parse_encoding(input_encoding).is_linear and opts.linear_solver is not None:
        base = base.replace(solver=opts.linear_solver)
    return dataclasses.replace(opts, base=base)


def load_views(pair: io.ScenePair, source: KernelSource, opts: SceneOptions,
               ) -> tuple[np.ndarray, dict[str, Any]]:
    """Views [2, H, W, C] cropped to the kernel grid, and what was done to them."""
    fixed = source.fixed_shape
    whites = {}
    block = source.info.get("crop_tiles")
    # Pixel: the calibration's central crop (the whole grid when a block is cut from it);
    # without a calibration grid the Pixel 4 preprocessing's own central crop (the raw
    # frame's edges are dark and strongly vignetted; the ground truth covers the crop).
    if fixed is not None:
        crop = fixed if block is None else _full_grid_shape(source)
    else:
        crop = _pixel_crop(pair.left) if pair.format == "pixel" and pair.left else None
    pre = io.Pixel4Preprocess(crop_hw=crop)
    if pair.format == "pixel" and source.white_sheets is not None:
        whites = {"white_left": source.white_sheets[0], "white_right": source.white_sheets[1]}
    views, loaded = io.load_pair_with_info(
        pair, black_level=opts.black_level, expect_16bit=not opts.allow_8bit,
        pixel_preprocess=pre, encoding=opts.encoding or "auto", **whites)
    info: dict[str, Any] = {"loaded_shape": list(views.shape), "vignetting": bool(whites),
                            "input": loaded.as_dict()}
    if block is not None:
        views, info = _crop_block_views(views, source, info, pair)
    h, w = views.shape[1:3]
    if fixed is not None:
        if h < fixed[0] or w < fixed[1]:
            raise io.InputError(f"{pair.left}: image {h}x{w} is smaller than the kernel grid "
                                f"({source.grid[0]}x{source.grid[1]} tiles of "
                                f"{source.tile_size} px = {fixed[0]}x{fixed[1]})")
        try:
            io.check_kernels_match_image(
                io.CalibratedKernels(source.kernels, source.grid, source.tile_size), h, w)
        except ValueError as e:
            raise SceneFailure("calibration", f"{pair.left}: {e}") from e
        info.setdefault("crop", None)
    elif opts.whole_frame:  # no kernel grid to fit: the whole frame
        info["crop"] = None
    else:
        factor = 2 ** (opts.base.solver.pyramid_levels - 1)
        min_tile = -(-source.kernel_size // factor) * factor
        try:
            tg, (y0, x0) = batch.auto_tiles(h, w, factor, min_tile, source.grid)
        except ValueError as e:
            raise io.InputError(f"{pair.left}: {e}") from e
        ch, cw = tg.image_shape
        if (ch, cw) != (h, w):
            views, info = _renormalise(views[:, y0:y0 + ch, x0:x0 + cw], info)
        info["crop"] = [y0, x0, ch, cw]
        info["tile_grid"] = [tg.rows, tg.cols, tg.tile_h, tg.tile_w]
    return np.ascontiguousarray(views, np.float32), info


def _pixel_crop(left: Path) -> tuple[int, int] | None:
    """The Pixel 4 preprocessing's central crop for a frame that holds it, else None."""
    crop = io.Pixel4Preprocess().crop_hw
    try:
        h, w = io.image_size(left)
    except (io.InputError, OSError):
        return None  # the loader reports it
    return crop if crop is not None and h >= crop[0] and w >= crop[1] else None


def _crop_block_views(views: np.ndarray, source: KernelSource, info: dict[str, Any],
                      pair: io.ScenePair) -> tuple[np.ndarray, dict[str, Any]]:
    """The central block of tiles of a calibrated grid (KernelOptions' crop), re-normalised
    to a maximum of 1 as a whole frame is."""
    r0, c0, rows, cols = source.info["crop_tiles"]
    tile = source.tile_size
    fh, fw = _full_grid_shape(source)
    full_rows, full_cols = fh // tile, fw // tile
    h, w = views.shape[1:3]
    if h < fh or w < fw:
        raise io.InputError(f"{pair.left}: image {h}x{w} is smaller than the kernel grid "
                            f"({full_rows}x{full_cols} tiles of {tile} px)")
    y0, x0 = (h - fh) // 2 + r0 * tile, (w - fw) // 2 + c0 * tile
    views = views[:, y0:y0 + rows * tile, x0:x0 + cols * tile]
    views, info = _renormalise(views, info)
    info = {**info, "crop": [y0, x0, rows * tile, cols * tile]}
    return views, info


def _renormalise(views: np.ndarray, info: dict[str, Any]) -> tuple[np.ndarray, dict]:
    """A cropped pair divided by its own maximum again (as a whole frame is), with the
    recorded input scale kept true (views * scale = linear input intensity)."""
    peak = float(views.max())
    if peak <= 0:
        return views, info
    inp = dict(info["input"])
    inp["scale"] = inp["scale"] * peak
    return views / peak, {**info, "input": inp}


def display_kwargs(info: dict[str, Any], *, bits: int | None = None) -> dict[str, Any]:
    """How a scene's all-in-focus image is shown (`outputs.display_image` /
    `write_result` keywords): back in the input's own encoding for display-referred
    input, the viewing transform for linear input (`io.Preprocessing.display_kwargs`)."""
    if "input" not in info:
        return {"encoding": None}
    return io.Preprocessing.from_dict(info["input"]).display_kwargs(bits=bits)


def _full_grid_shape(source: KernelSource) -> tuple[int, int]:
    """The uncropped calibration grid's image shape (before `crop_tiles`)."""
    full_rows, full_cols = source.info["full_grid"]
    return full_rows * source.tile_size, full_cols * source.tile_size


def make_bank(source: KernelSource, info: dict[str, Any]) -> KernelBank:
    """The kernel bank covering a scene's views (call inside its device context)."""
    if source.fixed_shape is not None:
        (rows, cols), th, tw = source.grid, source.tile_size, source.tile_size
    else:
        rows, cols, th, tw = info["tile_grid"]
    if source.model is not None:  # fitted: the model's kernels at each tile's position
        kernels = render_kernel_pairs(source.model, rows=rows, cols=cols,
                                      size=source.kernel_size)
        if source.recenter:
            kernels = recenter_kernel_pairs(kernels)
    elif source.kernels.shape[1] == 1:  # parametric: one pair for every tile
        kernels = np.repeat(source.kernels, rows * cols, axis=1)
    else:
        kernels = source.kernels
    return KernelBank.create(kernels, rows=rows, cols=cols, tile_h=th, tile_w=tw)


def load_ground_truth(input_dir: Path | None, name: str, shape: tuple[int, int],
                      info: dict[str, Any]) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Optional Pixel-4-layout ground truth (IN/gt_*/NAME_gt.png), cropped like the views.

    Unreadable or mis-sized ground truth is ignored with a warning in info["warnings"].
    """
    out = []
    for sub in ("gt_all_in_focus_im", "gt_defocus_map"):
        path = Path(input_dir or ".") / sub / f"{name}_gt.png"
        if input_dir is None or not path.is_file():
            out.append(None)
            continue
        try:
            arr, _ = io.read_image(path)
        except io.InputError as e:
            info.setdefault("warnings", []).append(f"ground truth ignored: {e}")
            out.append(None)
            continue
        arr = arr.astype(np.float32)
        crop = info.get("crop")
        if crop is not None and arr.shape[:2] == tuple(info["loaded_shape"][1:3]):
            y0, x0, ch, cw = crop
            arr = arr[y0:y0 + ch, x0:x0 + cw]
        if arr.shape[:2] != shape:
            info.setdefault("warnings", []).append(
                f"ground truth {path} is {arr.shape[0]}x{arr.shape[1]}, the views are "
                f"{shape[0]}x{shape[1]}: not scored")
            out.append(None)
            continue
        out.append(arr)
    return out[0], out[1]


# Input checks: a pair this flat or this clipped gives the solver nothing to work with.
FLAT_STD = 1e-3  # std of the mean view, relative to its maximum
SATURATED_FRACTION = 0.05  # pixels at the pair's maximum


def input_warnings(views: np.ndarray) -> list[str]:
    """Warnings for a flat (textureless) or saturated pair; empty when it looks usable.

    Args:
      views: [2, H, W, C] the loaded views (maximum 1 after normalisation).
    """
    v = np.asarray(views, np.float64)
    top = float(v.max()) if v.size else 0.0
    out = []
    mean = v.mean(axis=0)
    if top <= 0 or float(mean.std()) <= FLAT_STD * max(top, 1e-12):
        out.append(f"the views are flat (std {float(mean.std()):.2g} of a maximum "
                   f"{top:.3g}): nothing to estimate defocus from, results are meaningless")
    elif top > 0:
        sat = float(np.mean(v >= top * (1 - 1e-6)))
        if sat > SATURATED_FRACTION:
            out.append(f"{100 * sat:.1f}% of the pixels are at the maximum (saturated): "
                       "the blur model does not hold there")
    return out


@dataclasses.dataclass
class PreparedScene:
    """A scene loaded, configured and checked, ready to solve alone or in a batch.

    Attributes:
      views: [2, H, W, C] float32.
      info: preprocessing record (result.json "preprocessing").
      bank: kernel bank covering H x W.
      cfg: the scene's resolved configuration.
      preset: how it was chosen (result.json "preset").
      init: initial MpiParams (search start) or None.
      init_info: the start's record (result.json "search_init") or None.
      gt_aif, gt_def: optional ground truth [H, W] / [H, W, C].
      memory: `batch.estimate_solve_memory` of the solve (of one block when `plan`).
      timings: load_s, preset_s, search_init_s.
      plan: solve in these overlapping blocks (`dpjax.blocks`), None: at once.
      plan_info: how the plan was chosen (result.json "block_plan"), None without one.
    """

    name: str
    views: np.ndarray
    info: dict[str, Any]
    bank: Any
    cfg: config_lib.Config
    preset: dict[str, Any]
    init: Any
    init_info: dict[str, Any] | None
    gt_aif: np.ndarray | None
    gt_def: np.ndarray | None
    memory: Any
    timings: dict[str, float]
    plan: blocks.BlockPlan | None = None
    plan_info: dict[str, Any] | None = None


def prepare(name: str, pair: io.ScenePair, source: KernelSource, opts: SceneOptions, *,
            budget_bytes: float | None = None) -> PreparedScene:
    """Loads the views, makes the kernel bank, resolves the preset and the start, checks
    the memory estimate and reads the ground truth. Call inside the scene's device
    context (`jax.default_device`).

    Raises:
      io.InputError, SceneFailure, ValueError: a scene that cannot be solved.
    """
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    views, info = load_views(pair, source, opts)
    timings["load_s"] = time.perf_counter() - t0
    warnings = input_warnings(views)
    if warnings:
        info.setdefault("warnings", []).extend(warnings)
    bank = make_bank(source, info)
    cfg, preset_info, init, init_info = configure(
        name, views, bank, opts, timings, input_encoding=info["input"]["encoding"],
        blur_p90=source.blur_p90)
    plan, plan_info, est = plan_solve(views.shape[3], bank, cfg, opts.blocks, budget_bytes)
    gt_aif, gt_def = load_ground_truth(opts.input_dir, name, views.shape[1:3], info)
    return PreparedScene(name=name, views=views, info=info, bank=bank, cfg=cfg,
                         preset=preset_info, init=init, init_info=init_info, gt_aif=gt_aif,
                         gt_def=gt_def, memory=est, timings=timings, plan=plan,
                         plan_info=plan_info)


def _solve_memory(channels: int, bank: KernelBank, cfg: config_lib.Config, grid: TileGrid,
                  support: int) -> batch.MemoryEstimate:
    h, w = grid.image_shape
    return batch.estimate_solve_memory(
        height=h, width=w, channels=channels, num_layers=cfg.mpi.num_layers, grid=grid,
        kernel_size=bank.kernel_size, max_abs_scale=float(np.max(np.abs(cfg.mpi.scales()))),
        kernel_support=support, conv_method=cfg.solver.conv_method,
        round_fft=cfg.solver.round_fft,
        refine_images=refine.unknown_images(cfg.refine, cfg.mpi.num_layers),
        refine_history=cfg.refine.memory,
        fit_history=cfg.solver.lbfgs_memory if cfg.solver.optimizer == "lbfgs" else 0)


def solve_memory(channels: int, bank: KernelBank, cfg: config_lib.Config,
                 grid: TileGrid | None = None) -> batch.MemoryEstimate:
    """`batch.estimate_solve_memory` of one solve with `cfg` on `bank`'s kernels, as
    `plan_solve` estimates it.

    Args:
      channels: C of the views.
      grid: the tile grid solved (default: the bank's, the whole frame); a block's
        grid for a block.
    """
    grid = bank.grid if grid is None else grid
    return _solve_memory(channels, bank, cfg, grid,
                         support_radius(bank.kernels, cfg.solver.kernel_mass_cut))


def plan_solve(channels: int, bank: KernelBank, cfg: config_lib.Config,
               splits: tuple[int, int] | None, budget_bytes: float | None,
               ) -> tuple[blocks.BlockPlan | None, dict[str, Any] | None, batch.MemoryEstimate]:
    """Whether a scene is solved at once or in blocks: (plan or None, its record, the
    memory estimate of one solve).

    Args:
      channels: C of the views.
      bank: the scene's kernels (their grid is the frame's).
      splits: a forced (rows, cols) block split (SceneOptions.blocks), or None.
      budget_bytes: the memory budget (None: unlimited).

    Raises:
      SceneFailure: kind "memory" when not even the smallest block fits the budget;
        kind "config" for a forced split finer than the tile grid.
    """
    max_scale = float(np.max(np.abs(cfg.mpi.scales())))
    support = support_radius(bank.kernels, cfg.solver.kernel_mass_cut)

    def estimate(grid: TileGrid) -> batch.MemoryEstimate:
        return _solve_memory(channels, bank, cfg, grid, support)

    budget_gb = None if budget_bytes is None else round(budget_bytes / 1e9, 3)
    # A block shares the budget with the frame's own host arrays: the views and the
    # blended all-in-focus images (fitted and raw) and defocus map.
    h, w = bank.grid.image_shape
    frame_bytes = 4.0 * h * w * (2 * channels + 2 * channels + 1)
    if splits is not None and tuple(splits) != (1, 1):
        try:
            plan = blocks.plan_blocks(bank.grid, splits)
        except ValueError as e:
            raise SceneFailure("config", str(e)) from e
        est = estimate(plan.block_grid)
        refusal = batch.memory_refusal(est, budget_bytes, held_bytes=frame_bytes)
        if refusal is not None:
            raise SceneFailure("memory", f"a block of the {splits[0]}x{splits[1]} split "
                               f"{refusal}", memory_estimate_gb=round(est.gb, 3))
        return plan, {**plan.as_dict(), "chosen": "forced", "budget_gb": budget_gb}, est
    whole = estimate(bank.grid)
    if batch.memory_refusal(whole, budget_bytes) is None:
        return None, None, whole
    # Subdivided tiles stay divisible by the pyramid factor, at least the kernel side
    # (as whole frames' tiles are) and at least 4 rescaled kernel radii: the transform
    # of a tile pads it by that radius on each side, which must not dominate its cost,
    # and half a tile of overlap then discards at least two radii at a block's edge.
    factor = 2 ** (cfg.solver.pyramid_levels - 1)
    radius = layer_kernel_radius(bank.kernel_size, max_scale, support)
    subs = blocks.subdivisions(bank.grid, factor,
                               max(-(-bank.kernel_size // factor) * factor, 4 * radius))
    plan = blocks.choose_plan(bank.grid, lambda g: estimate(g).total,
                              budget_bytes - frame_bytes, subdivide=subs)
    if plan is None:
        finest = blocks.plan_blocks(bank.grid, (1, 1), subdivide=subs[-1]).grid
        smallest = estimate(blocks.plan_blocks(bank.grid, (finest.rows, finest.cols),
                                               subdivide=subs[-1]).block_grid)
        why = batch.memory_refusal(smallest, budget_bytes, held_bytes=frame_bytes)
        raise SceneFailure("memory", f"even the smallest block (one tile and its overlap) "
                           f"{why}", memory_estimate_gb=round(whole.gb, 3))
    est = estimate(plan.block_grid)
    return plan, {**plan.as_dict(), "chosen": "memory budget", "budget_gb": budget_gb,
                  "whole_frame_estimate_gb": round(whole.gb, 3)}, est


def configure(name: str, views: np.ndarray, bank: KernelBank, opts: SceneOptions,
              timings: dict[str, float] | None = None, *, input_encoding: str,
              search: tuple[presets.SearchMap, float] | None = None,
              range_search: tuple[presets.SearchMap, float] | None = None,
              blur_p90: float | None = None):
    """The scene's configuration and start: (cfg, preset record, init, init record).

    The kernel-symmetry search serves the auto preset's range and the search start; the
    range's grid follows the kernels' recorded blur (`presets.range_search`).

    Args:
      input_encoding: how the views were encoded before `load_views` linearised them
        (`info["input"]["encoding"]`: "linear", "srgb" or "gamma:G"); the fit's priors
        see the layers through it when `opts.prior_encoding` is PRIOR_INPUT, and
        linear input is fitted with `opts.linear_solver` when set.
      search: (`presets.search_defocus(views, bank)`, its seconds) for the search start
        when the caller has already run it; None: run here when the start needs it.
      range_search: (`presets.range_search(...)`, its seconds) for the auto range when
        the caller has already run it (experiments/reproduce_table.py shares it with its
        dp_stereo baseline); None: run here (reusing `search` where it can).
      blur_p90: the kernel source's (`KernelSource.blur_p90`), for the range's grid.
    """
    timings = {} if timings is None else timings
    opts = for_input(opts, input_encoding)
    search_s = range_s = 0.0
    if search is not None:
        search, search_s = search
    elif opts.base.init.search:
        t0 = time.perf_counter()
        search = presets.search_defocus(views, bank)
        search_s = time.perf_counter() - t0
    if range_search is not None:
        range_search, range_s = range_search
    elif opts.preset == "auto":
        t0 = time.perf_counter()
        range_search = presets.range_search(views, bank, blur_p90=blur_p90, search=search)
        range_s = time.perf_counter() - t0
    try:
        cfg, preset_info = presets.resolve(opts.preset, name, views, bank, opts.base,
                                           probe=opts.range_probe, search=range_search)
    except ValueError as e:
        raise SceneFailure("config", str(e)) from e
    # A search shared by the range and the start is timed with the start.
    timings["preset_s"] = preset_info["seconds"] + (0.0 if range_search is search else range_s)
    init = init_info = None
    if opts.base.init.search:
        t0 = time.perf_counter()
        init, init_info = pipeline.init_from_search(views.mean(axis=0), search, cfg)
        timings["search_init_s"] = search_s + time.perf_counter() - t0
        init_info.update(search_s=search_s, seconds=timings["search_init_s"])
    return cfg, preset_info, init, init_info
