"""Solving a frame too large for memory in overlapping blocks of kernel tiles.

A frame of R x C kernel tiles is cut into a pr x pc grid of blocks. Each block owns a
contiguous range of tiles (its core) and is solved over its core widened by `overlap`
tiles on every side that has a neighbour; all blocks have the same size (an edge block
takes its extra tiles on its inner side), so one compiled solve serves them all. Every
block is solved alone by `dpjax.fit` with the frame's configuration: one layer range,
so the blocks' defocus maps are in the same units, and the frame's kernel support (the
layer kernels' window, `SolverConfig.kernel_mass_cut`).

Tiles may first be subdivided (`subdivide` s: every kernel tile becomes s x s tiles
with the same kernel), which leaves the blur model exactly as it was (each output tile
is its kernel's valid convolution, `dpjax.conv`) but makes the overlap finer: a
256-px tile is far more overlap than a blur of tens of pixels needs. Smaller tiles
cost more transform padding per pixel, so `choose_plan` weighs both.

Blending: across each boundary between two cores, the outputs are mixed with weights
that fall linearly over a window of half the overlap on either side of it; the other
half of the overlap, at each block's own edge, is solved and discarded, so the edge
padding of the blur model never reaches the frame. The 1-D weights of the blocks sum
to one at every pixel, hence so do their products in 2-D.

  plan_blocks(grid, splits, overlap, subdivide)   the blocks of a fixed split
  choose_plan(grid, estimate, budget)    the cheapest split whose blocks fit memory
  fit_blocks(observation, bank, cfg, plan)   solve every block, blend: a FitResult

Axis glossary as in the README: V = 2 views, T tiles, K kernel side, H, W, C image.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np

from dpjax import mpi, postprocess, solver
from dpjax.config import Config
from dpjax.kernels import KernelBank, TileGrid, support_radius

__all__ = ["DEFAULT_OVERLAP", "Block", "BlockPlan", "block_weights", "choose_plan",
           "fit_blocks", "plan_blocks", "subdivisions"]

DEFAULT_OVERLAP = 1  # tiles of overlap on each inner side of a block


@dataclasses.dataclass(frozen=True)
class Block:
    """One block, in tile units: rows/cols solved [start, stop), rows/cols owned."""

    rows: tuple[int, int]
    cols: tuple[int, int]
    core_rows: tuple[int, int]
    core_cols: tuple[int, int]


@dataclasses.dataclass(frozen=True)
class BlockPlan:
    """How a frame's tile grid is split (`plan_blocks`).

    Attributes:
      grid: the tile grid the blocks are cut from: the frame's kernel grid with every
        tile subdivided `subdivide` times along each axis.
      splits: (blocks along the rows, along the columns).
      overlap: tiles of `grid` each block extends past its core on a side with a
        neighbour.
      blocks: row-major, in tiles of `grid`.
      subdivide: s (module docstring); 1: the kernel tiles themselves.
    """

    grid: TileGrid
    splits: tuple[int, int]
    overlap: int
    blocks: tuple[Block, ...]
    subdivide: int = 1

    @property
    def frame_grid(self) -> TileGrid:
        """The frame's kernel tile grid (the bank's)."""
        s = self.subdivide
        return TileGrid(rows=self.grid.rows // s, cols=self.grid.cols // s,
                        tile_h=self.grid.tile_h * s, tile_w=self.grid.tile_w * s)

    @property
    def block_grid(self) -> TileGrid:
        """The tile grid of one block (all blocks have the same)."""
        b = self.blocks[0]
        return TileGrid(rows=b.rows[1] - b.rows[0], cols=b.cols[1] - b.cols[0],
                        tile_h=self.grid.tile_h, tile_w=self.grid.tile_w)

    def as_dict(self) -> dict[str, Any]:
        """JSON-able record (result.json "blocks")."""
        bg = self.block_grid
        return {"splits": list(self.splits), "overlap_tiles": self.overlap,
                "subdivide": self.subdivide, "tile": [bg.tile_h, bg.tile_w],
                "block_tiles": [bg.rows, bg.cols],
                "block_pixels": list(bg.image_shape), "num_blocks": len(self.blocks)}


def _cores(n: int, parts: int) -> list[tuple[int, int]]:
    edges = [round(i * n / parts) for i in range(parts + 1)]
    return list(itertools.pairwise(edges))


def _solved_length(n: int, parts: int, overlap: int) -> int:
    """Tiles every block of `parts` over n tiles solves (`_ranges`)."""
    if parts == 1:
        return n
    return min(n, max(b - a for a, b in _cores(n, parts)) + 2 * overlap)


def _ranges(n: int, parts: int, overlap: int) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """[(core, solved)] ranges of `parts` blocks over n tiles, every solved range the
    same length (module docstring)."""
    cores = _cores(n, parts)
    length = _solved_length(n, parts, overlap)
    out = []
    for a, b in cores:
        start = min(max(a - overlap, 0), n - length)
        out.append(((a, b), (start, start + length)))
    return out


def plan_blocks(grid: TileGrid, splits: tuple[int, int], overlap: int = DEFAULT_OVERLAP,
                subdivide: int = 1) -> BlockPlan:
    """The blocks of a pr x pc split of `grid` (the frame's kernel grid), its tiles
    first subdivided `subdivide` times (module docstring).

    Raises:
      ValueError: a split finer than the (subdivided) grid, a negative overlap, tiles
        that do not divide by `subdivide`.
    """
    sub = int(subdivide)
    if sub < 1 or grid.tile_h % sub or grid.tile_w % sub:
        raise ValueError(f"tiles of {grid.tile_h}x{grid.tile_w} px cannot be subdivided "
                         f"{subdivide} times")
    grid = TileGrid(rows=grid.rows * sub, cols=grid.cols * sub, tile_h=grid.tile_h // sub,
                    tile_w=grid.tile_w // sub)
    pr, pc = (int(s) for s in splits)
    if pr < 1 or pc < 1 or pr > grid.rows or pc > grid.cols:
        raise ValueError(f"cannot split a {grid.rows}x{grid.cols}-tile grid into {pr}x{pc} "
                         "blocks (at least one tile per block)")
    if overlap < 0:
        raise ValueError(f"block overlap must be >= 0 tiles; got {overlap}")
    blocks = tuple(Block(rows=rs, cols=cs, core_rows=rc, core_cols=cc)
                   for rc, rs in _ranges(grid.rows, pr, overlap)
                   for cc, cs in _ranges(grid.cols, pc, overlap))
    return BlockPlan(grid=grid, splits=(pr, pc), overlap=int(overlap), blocks=blocks,
                     subdivide=sub)


def subdivisions(grid: TileGrid, multiple: int = 1, min_tile: int = 1) -> list[int]:
    """[1] and the s > 1 for which the tiles of `grid` subdivided s times stay divisible
    by `multiple` (the pyramid factor) and at least `min_tile` px."""
    out = [1]
    for s in range(2, min(grid.tile_h, grid.tile_w) + 1):
        th, tw = grid.tile_h / s, grid.tile_w / s
        if min(th, tw) < min_tile:
            break
        if th.is_integer() and tw.is_integer() and th % multiple == 0 and tw % multiple == 0:
            out.append(s)
    return out


def choose_plan(grid: TileGrid, estimate: Callable[[TileGrid], float], budget: float, *,
                overlap: int = DEFAULT_OVERLAP,
                subdivide: Sequence[int] = (1,)) -> BlockPlan | None:
    """The cheapest split whose blocks fit `budget`; None when none does.

    The cost of a split is its number of blocks times the estimate of one block (the
    estimate grows with the pixels and the transforms a block solves, the best proxy
    of its time at hand); ties go to fewer blocks, then to squarer blocks.

    Args:
      grid: the frame's kernel tile grid.
      estimate: predicted peak memory of a solve over a tile grid (bytes).
      budget: bytes one block may use.
      subdivide: tile subdivisions to consider (`subdivisions`).
    """
    best = None
    for sub in subdivide:
        fine = plan_blocks(grid, (1, 1), overlap, sub).grid
        seen: set[tuple[int, int]] = set()
        for pr in range(1, fine.rows + 1):
            for pc in range(1, fine.cols + 1):
                shape = (_solved_length(fine.rows, pr, overlap),
                         _solved_length(fine.cols, pc, overlap))
                if shape in seen:  # no smaller blocks than a coarser split
                    continue
                seen.add(shape)
                bg = TileGrid(rows=shape[0], cols=shape[1], tile_h=fine.tile_h,
                              tile_w=fine.tile_w)
                need = estimate(bg)
                if need > budget:
                    continue
                h, w = bg.image_shape
                key = (pr * pc * need, pr * pc, max(h, w) / min(h, w))
                if best is None or key < best[0]:
                    best = (key, (pr, pc), sub)
    return None if best is None else plan_blocks(grid, best[1], overlap, best[2])


def _weights_1d(core: tuple[int, int], solved: tuple[int, int], n: int, tile: int,
                margin: int) -> np.ndarray:
    """[solved length in px] blending weights of one block along one axis.

    1 inside the core, a linear ramp over [boundary - margin, boundary + margin) at each
    boundary with a neighbour, 0 beyond (module docstring)."""
    x = np.arange(solved[0] * tile, solved[1] * tile, dtype=np.float64) + 0.5
    w = np.ones_like(x)
    if margin <= 0:
        lo, hi = core[0] * tile, core[1] * tile
        return ((x >= lo) & (x < hi)).astype(np.float32)
    if core[0] > 0:  # rises across the boundary with the previous block
        b = core[0] * tile
        w = np.minimum(w, np.clip((x - (b - margin)) / (2 * margin), 0.0, 1.0))
    if core[1] < n:  # falls across the boundary with the next block
        b = core[1] * tile
        w = np.minimum(w, np.clip(((b + margin) - x) / (2 * margin), 0.0, 1.0))
    return w.astype(np.float32)


def block_weights(plan: BlockPlan, block: Block) -> np.ndarray:
    """[h, w] blending weights of `block` over the pixels it solves; summed over the
    plan's blocks (each at its place) they are 1 everywhere."""
    g = plan.grid
    wy = _weights_1d(block.core_rows, block.rows, g.rows, g.tile_h,
                     plan.overlap * g.tile_h // 2)
    wx = _weights_1d(block.core_cols, block.cols, g.cols, g.tile_w,
                     plan.overlap * g.tile_w // 2)
    return wy[:, None] * wx[None, :]


def _pixels(plan: BlockPlan, block: Block) -> tuple[slice, slice]:
    g = plan.grid
    return (slice(block.rows[0] * g.tile_h, block.rows[1] * g.tile_h),
            slice(block.cols[0] * g.tile_w, block.cols[1] * g.tile_w))


def _sub_bank(bank: KernelBank, plan: BlockPlan, block: Block) -> KernelBank:
    """The block's kernels: each subdivided tile takes its kernel tile's pair."""
    g, s = plan.grid, plan.subdivide
    idx = np.asarray([(r // s) * (g.cols // s) + c // s
                      for r in range(*block.rows) for c in range(*block.cols)])
    return KernelBank(kernels=jnp.take(bank.kernels, jnp.asarray(idx), axis=1),
                      grid=plan.block_grid)


def _sub_init(init: mpi.MpiParams, plan: BlockPlan, block: Block) -> mpi.MpiParams:
    """The block's part of a start given at the coarsest level for the whole frame."""
    g = plan.grid
    h, w = g.image_shape
    fy, fx = h // init.alpha_logits.shape[-2], w // init.alpha_logits.shape[-1]
    ys = slice(block.rows[0] * g.tile_h // fy, block.rows[1] * g.tile_h // fy)
    xs = slice(block.cols[0] * g.tile_w // fx, block.cols[1] * g.tile_w // fx)
    return mpi.MpiParams(color_logits=init.color_logits[..., ys, xs],
                         alpha_logits=init.alpha_logits[..., ys, xs])


def fit_blocks(observation, bank: KernelBank, config: Config, plan: BlockPlan, *,
               callback: Callable[[solver.Progress], Any] | None = None,
               init: mpi.MpiParams | None = None,
               init_is_solution: bool = True) -> solver.FitResult:
    """`dpjax.fit` block by block, blended (module docstring).

    Args:
      observation: [2, H, W, C] left and right views covering `plan.grid`.
      bank: kernels of the whole frame (`plan.frame_grid`).
      config: the frame's resolved configuration (its layer range serves every block).
      plan: `plan_blocks` / `choose_plan` of bank.grid.
      callback: `fit`'s, with Progress.block / num_blocks set and elapsed_s counted
        from the first block's start; returning True stops the current block only.
      init, init_is_solution: as for `fit`, `init` covering the whole frame.

    Returns:
      FitResult of the whole frame: blended images and defocus map; params None (a
      frame's full-resolution logits are what blocks avoid holding); loss_history the
      blocks' histories one after the other; level_iterations the most any block ran;
      terms the core-area-weighted mean of the blocks'; timings summed, total the
      wall time; refine the blocks' refinement records; blocks one record per block
      (region, iterations, loss, seconds).

    Raises:
      ValueError: `bank` or `observation` not covering plan.grid.
      FloatingPointError: as `fit`, naming the block.
    """
    obs = np.asarray(observation, np.float32)
    if bank.grid != plan.frame_grid:
        raise ValueError(f"the kernel grid {bank.grid} is not the plan's {plan.frame_grid}")
    if obs.ndim != 4 or obs.shape[1:3] != plan.grid.image_shape:
        raise ValueError(f"observation {obs.shape} does not cover the "
                         f"{plan.grid.image_shape} frame of the plan")
    t_start = time.perf_counter()
    # The frame's kernel support sizes every block's layer kernels: one geometry, and
    # the tiles two blocks share are cut alike.
    support = support_radius(bank.kernels, config.solver.kernel_mass_cut)
    h, w, c = obs.shape[1], obs.shape[2], obs.shape[3]
    aif = np.zeros((h, w, c), np.float32)
    aif_raw = np.zeros((h, w, c), np.float32)
    defocus = np.zeros((h, w), np.float32)
    histories, records, iterations = [], [], []
    terms: dict[str, float] = {}
    timings: dict[str, float] = {}
    n = len(plan.blocks)
    total_core = float(plan.grid.num_tiles)
    # The defocus fill reaches across blocks: it runs once, on the blended frame.
    block_config = config.replace(**{"post.fill": False}) if config.post.fill else config
    for i, block in enumerate(plan.blocks):
        ys, xs = _pixels(plan, block)
        offset = time.perf_counter() - t_start
        report = None
        if callback is not None:
            def report(p, i=i, offset=offset):
                return callback(p._replace(block=i, num_blocks=n,
                                           elapsed_s=offset + p.elapsed_s))
        try:
            res = solver.fit(obs[:, ys, xs], _sub_bank(bank, plan, block), block_config,
                             callback=report,
                             init=None if init is None else _sub_init(init, plan, block),
                             init_is_solution=init_is_solution, kernel_support=support)
        except FloatingPointError as e:
            raise FloatingPointError(f"block {i + 1}/{n} (tile rows {block.rows}, cols "
                                     f"{block.cols}): {e}") from e
        wgt = block_weights(plan, block)
        aif[ys, xs] += wgt[..., None] * res.all_in_focus
        aif_raw[ys, xs] += wgt[..., None] * res.all_in_focus_raw
        defocus[ys, xs] += wgt * res.defocus
        share = ((block.core_rows[1] - block.core_rows[0])
                 * (block.core_cols[1] - block.core_cols[0]) / total_core)
        for k, v in res.terms.items():
            terms[k] = terms.get(k, 0.0) + share * float(v)
        for k, v in res.timings.items():
            timings[k] = timings.get(k, 0.0) + float(v)
        histories.append(np.asarray(res.loss_history))
        iterations.append(res.level_iterations)
        records.append({"rows": list(block.rows), "cols": list(block.cols),
                        "core_rows": list(block.core_rows),
                        "core_cols": list(block.core_cols),
                        "iterations": list(res.level_iterations),
                        "final_loss": (float(res.loss_history[-1])
                                       if res.loss_history.size else None),
                        "seconds": round(float(res.timings.get("total_s", 0.0)), 3)})
        if res.refine is not None:
            records[-1]["refine"] = res.refine
        scales = res.scales
        del res  # its device arrays (a block's logits) must not outlive the block
    if config.post.fill:
        defocus = np.asarray(postprocess.filled_defocus(defocus, aif, config.post))
    timings["total_s"] = time.perf_counter() - t_start
    refined = [r["refine"] for r in records if "refine" in r]
    return solver.FitResult(
        all_in_focus=aif, all_in_focus_raw=aif_raw, defocus=defocus, params=None,
        scales=scales, loss_history=np.concatenate(histories),
        level_iterations=tuple(max(its) for its in zip(*iterations)), terms=terms,
        timings=timings, refine={"blocks": refined} if refined else None, blocks=records)

