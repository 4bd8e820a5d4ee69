"""Host-side logic for batch solving (`run_solver.py --input_dir=...`).

Pure functions and small classes that return data; the app logs and writes.

- Work split: `shard_scenes` gives each of N processes a disjoint, deterministic
  share of the scenes (together they cover every scene exactly once);
  `group_by_shape` puts same-size scenes together (at most `batch_size` per group)
  and `assign_round_robin` deals groups to the local devices.
- Memory: `estimate_solve_memory` predicts the peak memory of one solve from its
  shapes (formula below); `memory_refusal` turns an estimate over budget into a
  clear message.
- Progress: `SceneEta` (iterations, loss and ETA of one solve, weighting pyramid
  levels by their pixel count) and `BatchEta` (scenes finished and ETA of the run),
  `format_scene_progress` / `format_batch_progress` render one-line bars.
- Reports: `summarize` (the summary.json object and exit status), `merge_shares`
  (summaries of several processes), `gallery_html` (the index.html page),
  `thumbnail` (gallery images).

Memory model of one solve (finest pyramid level, which dominates: every coarser
level has a quarter of the pixels of the next). With V = 2 views, L layers, C
channels, P = H * W pixels, T tiles, r = `kernels.layer_kernel_radius` the half-width
of the largest rescaled kernel, Fh x Fw the tile FFT size of `conv.ConvGeometry`
(Fr = Fw // 2 + 1 complex bins per row) and K' = 2r' + 1 the side of the window that
FFT holds (`conv.ConvGeometry.shared`, r' >= r), where the fit keeps its kernels:

  inputs   = V C P * 4                          observation (float32)
  kernels  = V L T (K'^2 * 4 + Fh Fr * 8)       layer kernels and their spectra
  pixels   = BETA (L C + L - 1) P * 4           MPI-sized buffers: logits, gradient,
                                                Adam state and the per-layer images
                                                the backward pass keeps
  work     = ALPHA V (2C + 1) T Fh Fr * 8       tile spectra of one layer's blurred
                                                signals (alpha * colour, alpha, colour)
                                                in both views: the loss blurs and
                                                scores one layer at a time
                                                (`losses.data_terms`)
  history  = (2 n + 6) (L C + L - 1) P * 4      an L-BFGS fit's n pairs of history and
                                                what its update holds beyond Adam's
                                                (its state's iterate, update and
                                                gradient, the line search's trial
                                                point and its gradient); 0 for Adam
                                                (fit_history n = 0). The 6 is measured:
                                                a full Pixel 4 frame's fit peaked
                                                1.00 GB (n = 1) and 1.91 GB (n = 5)
                                                above Adam's, 8.0 and 15.3 MPI-sized
                                                buffers of 125 MB
  refine   = ((2 + V) L P + (2 m + 3) U Pr) * 4   the all-in-focus refinement's own
           + REFINE_OVERHEAD                    arrays (frozen alphas, transmittances,
           + GAMMA L (C + 1) P * 4              blurred visibilities; its unknown of U
                                                images of Pr = (H + 2r)(W + 2r) values
                                                and m pairs of L-BFGS history) and its
                                                working set, when it runs
                                                (refine_images U > 0)
  total    = OVERHEAD + inputs + kernels + max(pixels + work + history, refine)

OVERHEAD (compiled code, runtime buffers), ALPHA and BETA are a least-squares fit to
the peak resident memory of nine single-level 5-step CPU solves on jax 0.10.2
(ru_maxrss minus the resident size after the imports), from 64x64 px / 4 layers to a
full 1008x1344 Pixel 4 frame with 61-px kernels and their whole window (3.94 GB);
MEMORY_MEASUREMENTS lists them, `benchmarks/memory_fit.py` re-measures them and
refits the constants (last run 2026-12-05, after the loss became a loop over the
layers: the full frame needed 7.8 GB before). The fit is within 7% on every problem
but the 128x128 one (-11%). A re-measurement at commit b81cda3
(benchmarks/results/memory_fit.json) came within 6% of MEMORY_MEASUREMENTS on every
problem, so the constants were kept. On GPU the same buffers live in device memory, but XLA's
fusion and buffer reuse differ: treat the estimate as a guide (+-30%), not a bound.

The refinement runs after the fit; the fit's working set is free by then and the
refinement's term holds what it keeps of the fit (the frozen alphas and colours) with
its own arrays, so a solve's peak is the larger of the two working sets, not their sum.
Since the fit became a loop over the layers the refinement is usually the larger (a
full Pixel 4 frame: 4.35 GB against the fit's 3.94 GB). REFINE_OVERHEAD and GAMMA are a
least-squares fit of the refinement's working set to REFINE_MEASUREMENTS, the peak
resident memory of the refinement alone (`benchmarks/bench_refine.py`, 10 iterations),
with the overhead then raised by the fit's largest shortfall, so that the estimate
covers every one of them (by 0-38%, most on the smallest problem, where the overhead
dominates). SOLVE_MEASUREMENTS checks the whole formula on whole solves (fit and
refinement in one process, `benchmarks/bench_blocks.py` with a budget that keeps the
frame in one block): the estimate is 8-15% above every one of them, and 3% above a
full Pixel 4 frame solved by `run_solver.py` with the lab kernels (4.34 GB measured,
the fit's level peaking at 4.14 GB; 4.46 GB estimated). Until 2026-12-05 the two
working sets were added, which overestimated those solves 1.6-1.9x and made the block
planner cut large frames into needlessly small blocks.
"""

from __future__ import annotations

import dataclasses
import html
import importlib.util
import math
import os
import urllib.parse
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import jax
import numpy as np
from PIL import Image

from dpjax import conv
from dpjax.kernels import TileGrid, layer_kernel_radius

__all__ = [
    "ALPHA",
    "BETA",
    "MEMORY_MEASUREMENTS",
    "REFINE_MEASUREMENTS",
    "SOLVE_MEASUREMENTS",
    "REFINE_OVERHEAD_BYTES",
    "GAMMA",
    "OVERHEAD_BYTES",
    "STATUSES",
    "THUMBS",
    "BatchEta",
    "MemoryEstimate",
    "SceneEta",
    "assign_round_robin",
    "auto_grid",
    "estimate_solve_memory",
    "exit_status",
    "fit_tiles",
    "format_batch_progress",
    "format_duration",
    "format_scene_progress",
    "gallery_html",
    "group_by_shape",
    "memory_refusal",
    "merge_shares",
    "shard_scenes",
    "summarize",
    "thumbnail",
    "use_compilation_cache",
    "use_default_compilation_cache",
]

T = TypeVar("T")

STATUSES = ("done", "skipped", "failed")
# Records of scenes a run did not touch (kept from earlier runs): shown, never counted
# in the run's exit status.
KEPT_STATUSES = ("kept", "kept-failed")
# Gallery thumbnails written into each scene's folder.
THUMBS = {"input": "thumb_input.png", "all_in_focus": "thumb_all_in_focus.png",
          "defocus": "thumb_defocus_map.png"}

# Memory model constants (module docstring), fitted to MEMORY_MEASUREMENTS.
OVERHEAD_BYTES = 359e6
ALPHA = 7.3
BETA = 20.6
# The refinement's working set (module docstring), fitted to REFINE_MEASUREMENTS; the
# least-squares overhead (270 MB) raised by the fit's largest shortfall (191 MB, the
# 504x672 grey problem) so that the estimate covers every measurement.
REFINE_OVERHEAD_BYTES = 461e6
GAMMA = 21.9
# ((H, W, rows, cols, layers, channels, kernel side, max |scale|), measured MB).
MEMORY_MEASUREMENTS: tuple[tuple[tuple[float, ...], float], ...] = (
    ((128, 128, 2, 2, 12, 1, 23, 1.6), 450),
    ((256, 256, 2, 2, 12, 1, 23, 1.6), 521),
    ((512, 512, 2, 2, 12, 1, 23, 1.6), 964),
    ((512, 512, 2, 2, 12, 3, 23, 1.6), 1468),
    ((384, 384, 4, 4, 8, 1, 15, 1.6), 567),
    ((336, 448, 2, 2, 12, 1, 61, 1.6), 746),
    ((64, 64, 2, 2, 4, 1, 13, 1.45), 358),
    ((768, 768, 3, 3, 12, 1, 23, 1.6), 1773),
    ((1008, 1344, 6, 8, 12, 1, 61, 1.6), 3944),
)
# The refinement alone, 10 iterations on random smooth layers (benchmarks/bench_refine.py
# --kernel_mass_cut=0: its peak_rss_gib, which includes rendering the views, minus the
# 0.17 GB resident after the imports), same key, MB; 2026-12-05, commit 9d10aeb.
REFINE_MEASUREMENTS: tuple[tuple[tuple[float, ...], float], ...] = (
    ((1008, 1344, 6, 8, 12, 1, 61, 1.5), 4354),
    ((504, 672, 3, 4, 12, 1, 61, 1.5), 1736),
    ((504, 672, 3, 4, 12, 3, 61, 1.5), 2401),
    ((256, 256, 2, 2, 12, 1, 23, 1.5), 719),
    ((512, 768, 4, 6, 12, 3, 13, 1.5), 2214),
)
# Whole solves (fit and refinement, the auto preset's schedule shortened to 3/3/3
# iterations, which leaves the buffers unchanged) of the first Canon R6 II pair enlarged
# to H x W (cropped to the tile grid), parametric kernels of radius 16 px (35-px
# window), layer scales -0.6 ... 1.0 (benchmarks/bench_blocks.py --height=H --width=W
# [--grey] --memory_budget_gb=200 --level_iters=3,3,3): peak_rss_gib minus the 0.17 GB
# resident after the imports, MB; 2026-12-05, commit 127cb64.
# Key: ((H, W, rows, cols, channels), measured MB).
SOLVE_MEASUREMENTS: tuple[tuple[tuple[int, ...], float], ...] = (
    ((512, 768, 2, 3, 3), 2504),
    ((744, 816, 3, 3, 3), 3491),
    ((1008, 1340, 4, 5, 1), 3674),
    ((992, 1488, 4, 6, 3), 7389),
    ((1512, 2016, 6, 8, 1), 7518),
)


# ----------------------------------------------------------------------------------------
# Splitting the work


def shard_scenes(names: Sequence[str], process_index: int, process_count: int) -> list[str]:
    """This process's share of the scenes: every process_count-th of the sorted names.

    Deterministic and disjoint: the shares of processes 0 .. process_count - 1
    partition the (de-duplicated) names, so together they cover each scene once.
    """
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(f"process {process_index} of {process_count} is not a valid "
                         "process index / count")
    return sorted(set(names))[process_index::process_count]


def group_by_shape(names: Sequence[str], keys: Mapping[str, Hashable | None],
                   batch_size: int) -> list[list[str]]:
    """Groups of at most batch_size scenes that share a key (e.g. format and size).

    Scenes keep their order; a scene whose key is None (unknown, e.g. an unreadable
    file) gets a group of its own. batch_size=1 gives one group per scene.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    groups: list[list[str]] = []
    open_groups: dict[Hashable, list[str]] = {}
    for name in names:
        key = keys.get(name)
        if key is None:
            groups.append([name])
            continue
        group = open_groups.get(key)
        if group is None or len(group) >= batch_size:
            group = []
            groups.append(group)
            open_groups[key] = group
        group.append(name)
    return groups


def assign_round_robin(items: Sequence[T], devices: Sequence[Any]) -> list[tuple[T, Any]]:
    """Deals items to devices in turn: item i goes to devices[i % len(devices)]."""
    if not devices:
        raise ValueError("no devices to assign work to")
    return [(item, devices[i % len(devices)]) for i, item in enumerate(items)]


# ----------------------------------------------------------------------------------------
# Tile geometry for the parametric kernel model


def auto_grid(height: int, width: int, target_tile: int = 256) -> tuple[int, int]:
    """A rows x cols grid whose tiles are about target_tile px (at least 1 x 1)."""
    return (max(1, round(height / target_tile)), max(1, round(width / target_tile)))


# Frames from this many pixels up get tiles a block split can halve (`auto_tiles`).
LARGE_FRAME_PIXELS = 8_000_000


def auto_tiles(height: int, width: int, factor: int, min_tile: int,
               grid: tuple[int, int] | None = None) -> tuple[TileGrid, tuple[int, int]]:
    """The tile grid of a frame without a calibration grid, and its crop's offset.

    `grid` given: that grid (`fit_tiles`, tiles divisible by the pyramid `factor`).
    Else tiles of about 256 px (`auto_grid`); on frames of LARGE_FRAME_PIXELS or more,
    which are solved in blocks on most machines, tiles divisible by 2 x factor so that
    `dpjax.blocks` can subdivide them (a finer overlap), with the tile counts within one
    of `auto_grid`'s chosen to crop the fewest pixels (4000 x 6000: 16 x 22 tiles of
    248 x 272 px, 3968 x 5984, where 16 x 23 tiles of 248 x 260 px cannot be halved).

    Raises:
      ValueError: as `fit_tiles`.
    """
    if grid is not None:
        return fit_tiles(height, width, grid, factor, min_tile)
    rows, cols = auto_grid(height, width)
    if height * width < LARGE_FRAME_PIXELS:
        return fit_tiles(height, width, (rows, cols), factor, min_tile)
    m = 2 * factor

    def best(n: int, size: int) -> int:
        return max(range(max(1, n - 1), n + 2), key=lambda k: (size // k) // m * m * k)

    return fit_tiles(height, width, (best(rows, height), best(cols, width)), m, min_tile)


def fit_tiles(height: int, width: int, grid: tuple[int, int], multiple: int,
              min_tile: int) -> tuple[TileGrid, tuple[int, int]]:
    """The largest grid of equal tiles (sides divisible by `multiple`) inside an image.

    Returns:
      (TileGrid, (y0, x0)): the grid and the offset of its central crop.

    Raises:
      ValueError: when a tile would be smaller than min_tile px.
    """
    rows, cols = grid
    tile_h = (height // rows) // multiple * multiple
    tile_w = (width // cols) // multiple * multiple
    if min(tile_h, tile_w) < min_tile:
        raise ValueError(f"image {height}x{width} is smaller than the kernel grid: "
                         f"{rows}x{cols} tiles would be {tile_h}x{tile_w} px, below the "
                         f"minimum {min_tile} px (the kernel side, rounded up to a "
                         f"multiple of the pyramid factor {multiple})")
    tg = TileGrid(rows=rows, cols=cols, tile_h=tile_h, tile_w=tile_w)
    h, w = tg.image_shape
    return tg, ((height - h) // 2, (width - w) // 2)


# ----------------------------------------------------------------------------------------
# Memory


class MemoryEstimate(NamedTuple):
    """Predicted peak memory of one solve, in bytes, with its parts (module docstring)."""

    total: float
    parts: dict[str, float]

    @property
    def gb(self) -> float:
        return self.total / 1e9


def estimate_solve_memory(*, height: int, width: int, channels: int, num_layers: int,
                          grid: TileGrid, kernel_size: int, max_abs_scale: float,
                          kernel_support: int | None = None,
                          conv_method: str = "fft", round_fft: bool = True,
                          refine_images: int = 0, refine_history: int = 10,
                          fit_history: int = 0) -> MemoryEstimate:
    """Peak memory of `dpjax.fit` on one [2, height, width, channels] pair.

    Args:
      grid: the kernel tile grid covering height x width.
      kernel_size: side K of the calibrated kernels.
      max_abs_scale: largest |layer scale|; with `kernel_support` (the reference
        kernels' `kernels.support_radius` at the solve's `kernel_mass_cut`) it sets
        the layer kernels' radius (`kernels.layer_kernel_radius`).
      refine_images: C-channel images in the all-in-focus refinement's unknown
        (`dpjax.refine.unknown_images`); 0 when it does not run.
      refine_history: its L-BFGS history length m.
      fit_history: the fit's L-BFGS history length (`SolverConfig.lbfgs_memory`), 0 for
        an Adam fit.

    Returns:
      MemoryEstimate (bytes; see the module docstring for the formula).
    """
    v, L, c, p, t = 2, num_layers, channels, height * width, grid.num_tiles
    r = layer_kernel_radius(kernel_size, max_abs_scale, kernel_support)
    geom = conv.ConvGeometry.create(grid, r, "fft", round_fft)
    fh, fw = geom.fft_shape
    bins = fh * (fw // 2 + 1)
    # The fit's layer kernels fill the window its FFT holds (`conv.ConvGeometry.shared`).
    kside = 2 * conv.ConvGeometry.shared(grid, r, conv_method, round_fft).radius + 1
    parts = {
        "overhead": OVERHEAD_BYTES,
        "inputs": v * c * p * 4.0,
        "kernels": v * L * t * (kside * kside * 4.0 + (bins * 8.0 if conv_method == "fft" else 0)),
        "pixels": BETA * (L * c + L - 1) * p * 4.0,
        "work": ALPHA * v * (2 * c + 1) * t * bins * 8.0,
    }
    if fit_history > 0:
        parts["history"] = (2 * fit_history + 6) * (L * c + L - 1) * p * 4.0
    if refine_images > 0:
        padded = (height + 2 * r) * (width + 2 * r)
        parts["refine"] = ((2 + v) * L * p
                           + (2 * refine_history + 3) * refine_images * c * padded) * 4.0 + (
                               REFINE_OVERHEAD_BYTES + GAMMA * L * (c + 1) * p * 4.0)
    # The fit's working set and the refinement's are never held at once.
    held = parts["overhead"] + parts["inputs"] + parts["kernels"]
    working = max(parts["pixels"] + parts["work"] + parts.get("history", 0.0),
                  parts.get("refine", 0.0))
    return MemoryEstimate(total=float(held + working), parts=parts)


def memory_refusal(estimate: MemoryEstimate, budget_bytes: float | None, *,
                   held_bytes: float = 0.0) -> str | None:
    """None when the estimate fits the budget, else the reason to refuse the scene.

    Args:
      held_bytes: memory the solve shares the budget with (a block solve: the frame's
        own images, `dpjax.scene.plan_solve`).
    """
    if budget_bytes is None or estimate.total + held_bytes <= budget_bytes:
        return None
    big = max((k for k in estimate.parts if k != "overhead"), key=estimate.parts.get)
    beside = f" beside the frame's {held_bytes / 1e9:.2f} GB of images" if held_bytes else ""
    return (f"needs about {estimate.total / 1e9:.2f} GB (largest part: {big} "
            f"{estimate.parts[big] / 1e9:.2f} GB){beside}, over the memory budget of "
            f"{budget_bytes / 1e9:.2f} GB; raise --memory_budget_gb, use fewer layers "
            f"(--num_layers) or smaller images")


# ----------------------------------------------------------------------------------------
# Progress


def format_duration(seconds: float | None) -> str:
    """'42s', '3m05s', '2h07m'; '?' when unknown."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "?"
    s = round(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


def _bar(fraction: float, width: int) -> str:
    fraction = min(max(fraction, 0.0), 1.0)
    full = round(fraction * width)
    return "#" * full + "." * (width - full)


@dataclasses.dataclass
class SceneEta:
    """Progress of one coarse-to-fine solve.

    A step at pyramid level l (0 = finest) costs about 4^-l of a finest-level step
    (it touches a quarter of the pixels per level), so the work done and left are
    weighted that way and ETA = elapsed * left / done. Compilation time, which
    dominates small solves, makes early estimates pessimistic.

    Args:
      level_budgets: iterations per level, coarsest first (`SolverConfig.budget`).
    """

    level_budgets: tuple[int, ...]
    level: int = -1  # -1: not started; else the level being solved (0 = finest)
    step: int = 0
    block: int = 0  # a block solve's current block (0-based) and block count
    num_blocks: int = 1
    loss: float = float("nan")
    elapsed_s: float = 0.0

    def __post_init__(self):
        n = len(self.level_budgets)
        self._weights = [4.0 ** -(n - 1 - i) for i in range(n)]  # coarsest first

    @property
    def num_levels(self) -> int:
        return len(self.level_budgets)

    def update(self, *, level: int, step: int, num_steps: int, loss: float,
               elapsed_s: float, block: int = 0, num_blocks: int = 1) -> None:
        """Records a `dpjax.Progress` report (level 0 = finest; block of num_blocks in
        a block solve, `dpjax.blocks`)."""
        self.block, self.num_blocks = block, num_blocks
        i = self.num_levels - 1 - level
        budgets = list(self.level_budgets)
        budgets[i] = num_steps
        self.level_budgets = tuple(budgets)
        self.level, self.step, self.loss, self.elapsed_s = level, step, loss, elapsed_s

    @property
    def iterations(self) -> tuple[int, int]:
        """(iterations done, total budget) over all levels."""
        if self.level < 0:
            return 0, sum(self.level_budgets)
        i = self.num_levels - 1 - self.level
        return sum(self.level_budgets[:i]) + self.step, sum(self.level_budgets)

    @property
    def fraction(self) -> float:
        """Share of the weighted work done, in [0, 1]."""
        total = sum(w * b for w, b in zip(self._weights, self.level_budgets))
        if self.level < 0 or total <= 0:
            return 0.0
        i = self.num_levels - 1 - self.level
        done = sum(w * b for w, b in zip(self._weights[:i], self.level_budgets[:i]))
        done += self._weights[i] * self.step
        return min((self.block + done / total) / max(self.num_blocks, 1), 1.0)

    @property
    def eta_s(self) -> float | None:
        f = self.fraction
        if f <= 0:
            return None
        return self.elapsed_s * (1 - f) / f


def format_scene_progress(name: str, eta: SceneEta, width: int = 20) -> str:
    """'001 [#####.....] L2/3 it 120/248 loss 0.01234 ETA 12s'."""
    done, total = eta.iterations
    lvl = "-" if eta.level < 0 else f"{eta.num_levels - eta.level}/{eta.num_levels}"
    blk = f" block {eta.block + 1}/{eta.num_blocks}" if eta.num_blocks > 1 else ""
    return (f"{name} [{_bar(eta.fraction, width)}]{blk} L{lvl} it {done}/{total} "
            f"loss {eta.loss:.5g} ETA {format_duration(eta.eta_s)}")


@dataclasses.dataclass
class BatchEta:
    """Progress of the whole run: scenes finished and an ETA from the solves so far.

    ETA = mean solve time x scenes left / workers (skipped and failed scenes count
    as finished but not towards the mean).
    """

    total: int
    workers: int = 1
    counts: dict[str, int] = dataclasses.field(
        default_factory=lambda: {s: 0 for s in STATUSES})
    solve_times: list[float] = dataclasses.field(default_factory=list)

    def record(self, status: str, seconds: float | None = None) -> None:
        self.counts[status] = self.counts.get(status, 0) + 1
        if status == "done" and seconds is not None:
            self.solve_times.append(seconds)

    @property
    def finished(self) -> int:
        return sum(self.counts.values())

    @property
    def eta_s(self) -> float | None:
        left = self.total - self.finished
        if left <= 0:
            return 0.0
        if not self.solve_times:
            return None
        return float(np.mean(self.solve_times)) * left / max(self.workers, 1)


def format_batch_progress(eta: BatchEta, width: int = 20) -> str:
    """'[#####.....] 3/10 scenes (done 2, skipped 1, failed 0) ETA 4m10s'."""
    frac = eta.finished / eta.total if eta.total else 1.0
    c = eta.counts
    return (f"[{_bar(frac, width)}] {eta.finished}/{eta.total} scenes (done {c['done']}, "
            f"skipped {c['skipped']}, failed {c['failed']}) ETA {format_duration(eta.eta_s)}")


# ----------------------------------------------------------------------------------------
# Summary and gallery


def exit_status(records: Sequence[Mapping[str, Any]]) -> int:
    """1 if any scene of the run failed (or was not run), else 0 (KEPT_STATUSES and
    done/skipped count as fine)."""
    return int(any(r.get("status") not in ("done", "skipped", *KEPT_STATUSES)
                   for r in records))


def summarize(records: Sequence[Mapping[str, Any]], **meta: Any) -> dict[str, Any]:
    """The summary.json object: meta fields, counts, exit status, scenes sorted by name.

    Every record needs "scene" and "status" (one of STATUSES, or "not run" for a
    scene an interrupted run never reached) and, unless done, a "reason".
    """
    scenes = sorted((dict(r) for r in records), key=lambda r: r["scene"])
    names = [r["scene"] for r in scenes]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"scenes listed more than once: {dup}")
    counts = {s: 0 for s in STATUSES}
    for r in scenes:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    return {**meta, "counts": counts, "num_scenes": len(scenes),
            "exit_status": exit_status(scenes), "scenes": scenes}


def merge_shares(shares: Sequence[Mapping[str, Any]], **meta: Any) -> dict[str, Any]:
    """One summary from the summaries of several processes' disjoint shares.

    Raises:
      ValueError: when two shares list the same scene.
    """
    records = [r for share in shares for r in share["scenes"]]
    return summarize(records, **meta)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _url(relative_path: str) -> str:
    """A relative file path as a URL path: every component percent-encoded."""
    return "/".join(urllib.parse.quote(part, safe="") for part in relative_path.split("/"))


def gallery_html(summary: Mapping[str, Any], existing: set[str] | None = None,
                 title: str = "dpjax batch results") -> str:
    """A self-contained HTML page: one row per scene with thumbnails, metrics, timings.

    Args:
      summary: the summary.json object (`summarize`).
      existing: relative paths of files that exist (thumbnails are shown only when
        listed); None shows every thumbnail link.

    Links are relative to the output folder (index.html sits beside summary.json).
    """
    esc = html.escape
    c = summary.get("counts", {})
    rows = []
    for r in summary["scenes"]:
        name = r["scene"]
        cells = [f'<td class="name">{esc(name)}</td>']
        for key, full in (("input", None), ("all_in_focus", "all_in_focus.png"),
                          ("defocus", "defocus_map.png")):
            rel = f"{name}/{THUMBS[key]}"
            if existing is None or rel in existing:
                # URLs percent-encoded (names may hold '#', '?', '%'), then HTML-escaped.
                target = esc(_url(f"{name}/{full}" if full else rel), quote=True)
                cells.append(f'<td><a href="{target}"><img src="{esc(_url(rel), quote=True)}" '
                             f'alt="{esc(name)} {key}"></a></td>')
            else:
                cells.append('<td class="none">&mdash;</td>')
        status = r["status"]
        info = [f'<b class="{esc(status.replace(" ", "-"))}">{esc(status)}</b>']
        if r.get("reason"):
            info.append(esc(r["reason"]))
        for label, key in (("metrics", "metrics"), ("input metrics", "input_metrics")):
            if r.get(key):
                info.append(f"{label}: " + ", ".join(f"{esc(k)} {esc(_fmt(v))}"
                                                     for k, v in r[key].items()
                                                     if v is not None and k != "shift"))
        if r.get("final_loss") is not None:
            info.append(f"final loss {r['final_loss']:.5g}")
        if r.get("scale_range"):
            info.append("scales {:.3g} .. {:.3g}".format(*r["scale_range"]))
        t = r.get("timings") or {}
        if t:
            info.append("time: " + ", ".join(f"{esc(k.removesuffix('_s'))} {v:.1f}s"
                                             for k, v in t.items() if isinstance(v, (int, float))))
        if r.get("device"):
            info.append(f"device {esc(str(r['device']))}")
        cells.append(f'<td class="info">{"<br>".join(info)}</td>')
        rows.append("<tr>" + "".join(cells) + "</tr>")
    head = (f"{summary.get('num_scenes', len(rows))} scenes: done {c.get('done', 0)}, "
            f"skipped {c.get('skipped', 0)}, failed {c.get('failed', 0)}")
    if c.get("kept") or c.get("kept-failed"):
        head += (f"; kept from earlier runs {c.get('kept', 0)} (failed "
                 f"{c.get('kept-failed', 0)})")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>
<style>
body {{ font-family: sans-serif; margin: 1em; }}
table {{ border-collapse: collapse; }}
td, th {{ border: 1px solid #ccc; padding: 4px; vertical-align: top; }}
img {{ max-width: 256px; max-height: 256px; display: block; }}
.info {{ font-size: 0.85em; max-width: 28em; }}
.done {{ color: #080; }} .skipped, .kept {{ color: #555; }}
.failed, .not-run, .kept-failed {{ color: #b00; }}
.none {{ color: #aaa; text-align: center; }}
</style></head><body>
<h1>{esc(title)}</h1>
<p>{esc(head)}. Click a thumbnail for the full-size image; numbers in summary.json.</p>
<table>
<tr><th>scene</th><th>input</th><th>all-in-focus</th><th>defocus</th><th>status, metrics, timings</th></tr>
{chr(10).join(rows)}
</table></body></html>
"""


def thumbnail(image: np.ndarray, max_side: int = 256) -> np.ndarray:
    """A uint8 [H, W] or [H, W, 3] image shrunk (area filter) to at most max_side px."""
    a = np.asarray(image)
    if a.dtype != np.uint8:
        raise ValueError(f"thumbnail expects uint8 display data, got {a.dtype}")
    h, w = a.shape[:2]
    s = min(1.0, max_side / max(h, w))
    if s >= 1.0:
        return a
    size = (max(1, round(w * s)), max(1, round(h * s)))
    return np.asarray(Image.fromarray(a).resize(size, Image.Resampling.BOX))


# The apps' default persistent compilation cache (--compilation_cache_dir=auto): the
# folder named by this environment variable, else $XDG_CACHE_HOME/dpjax/jax
# (~/.cache/dpjax/jax); JAX evicts the least recently used entries beyond the cap.
CACHE_DIR_ENV = "DPJAX_CACHE_DIR"
COMPILATION_CACHE_MAX_BYTES = 2 * 2**30


def default_compilation_cache_dir() -> Path:
    """The default cache folder: $DPJAX_CACHE_DIR, else $XDG_CACHE_HOME/dpjax/jax, else
    ~/.cache/dpjax/jax (not created here)."""
    if os.environ.get(CACHE_DIR_ENV):
        return Path(os.environ[CACHE_DIR_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "dpjax" / "jax"


def use_default_compilation_cache() -> tuple[Path | None, str | None]:
    """Turns on the persistent compilation cache in `default_compilation_cache_dir`,
    unless one is on already (JAX_COMPILATION_CACHE_DIR or an earlier call), which is
    kept.

    Returns:
      (the folder in use, None), or (None, why not) when the default folder cannot be
      used: the caller warns and goes on without a cache (nobody asked for that
      folder by name).
    """
    current = jax.config.jax_compilation_cache_dir
    if current:
        return Path(current), None
    try:
        return use_compilation_cache(default_compilation_cache_dir()), None
    except ValueError as e:
        return None, str(e)


def use_compilation_cache(path: str | os.PathLike) -> Path:
    """Turns on JAX's persistent compilation cache in `path` (created if missing).

    Compiled solver chunks are then written there and reused by later runs and other
    processes with the same shapes, configuration and JAX version, instead of being
    compiled again (BENCHMARKS.md, "Compilation: a cold and a warm cache": 13% of a
    768x512 colour scene on the 2-core CPU, lost in the noise of a full Pixel 4 frame;
    more where compute is fast). JAX keys the entries itself, so a stale entry is
    never used for a different program; beyond COMPILATION_CACHE_MAX_BYTES it evicts
    the least recently used (with the `filelock` package, a dependency of dpjax;
    without it the folder is not capped).

    Returns:
      The resolved folder.

    Raises:
      ValueError: `path` exists and is not a folder, or cannot be created or written.
    """
    folder = Path(path).expanduser().resolve()
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"compilation cache {folder} exists and is not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"cannot create the compilation cache folder {folder}: {e}") from e
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"compilation cache folder {folder} is not writable")
    jax.config.update("jax_compilation_cache_dir", str(folder))
    if importlib.util.find_spec("filelock") is not None:  # JAX's eviction needs it
        jax.config.update("jax_compilation_cache_max_size", COMPILATION_CACHE_MAX_BYTES)
    # JAX caches only compilations over 1 s by default; a solve's many small programs
    # (coarse levels, the search) then compile again in every new process (a Ray worker
    # per GPU scene). Measured on this 2-core CPU, first 128x160 scene of a process:
    # 13.5 s without a cache, 4.3-5.1 s with the default threshold, 2.4-2.8 s with 0.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    return folder
