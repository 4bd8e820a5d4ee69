"""Block solving (dpjax.blocks): the split, the blending weights, the memory-driven
choice, and a block solve against the whole-frame solve on a synthetic scene."""

from __future__ import annotations

import numpy as np
import pytest

import dpjax
from dpjax import blocks, kernels, postprocess, scene, solver
from dpjax.kernels import TileGrid


@pytest.mark.parametrize("rows,cols,splits,overlap", [
    (6, 8, (2, 2), 1), (7, 5, (3, 2), 1), (12, 16, (3, 4), 2), (5, 9, (1, 3), 1),
    (4, 4, (1, 1), 1)])
def test_plan_cores_partition_and_blocks_share_one_shape(rows, cols, splits, overlap):
    grid = TileGrid(rows=rows, cols=cols, tile_h=24, tile_w=32)
    plan = blocks.plan_blocks(grid, splits, overlap)
    assert len(plan.blocks) == splits[0] * splits[1]
    owned = np.zeros((rows, cols), int)
    shapes = set()
    for b in plan.blocks:
        owned[b.core_rows[0]:b.core_rows[1], b.core_cols[0]:b.core_cols[1]] += 1
        shapes.add((b.rows[1] - b.rows[0], b.cols[1] - b.cols[0]))
        assert 0 <= b.rows[0] and b.rows[1] <= rows and 0 <= b.cols[0] and b.cols[1] <= cols
        # every side with a neighbour is solved `overlap` tiles past the core
        for (c0, c1), (s0, s1), n in ((b.core_rows, b.rows, rows),
                                      (b.core_cols, b.cols, cols)):
            assert s0 <= max(c0 - overlap, 0) and s1 >= min(c1 + overlap, n)
    assert np.all(owned == 1)
    assert shapes == {(plan.block_grid.rows, plan.block_grid.cols)}


@pytest.mark.parametrize("splits,overlap", [((2, 3), 1), ((3, 3), 2), ((1, 2), 1),
                                            ((2, 2), 0)])
def test_blend_weights_sum_to_one_and_stay_inside_each_block(splits, overlap):
    grid = TileGrid(rows=6, cols=7, tile_h=16, tile_w=20)
    plan = blocks.plan_blocks(grid, splits, overlap)
    total = np.zeros(grid.image_shape)
    for b in plan.blocks:
        w = blocks.block_weights(plan, b)
        ys, xs = blocks._pixels(plan, b)
        assert w.shape == (ys.stop - ys.start, xs.stop - xs.start)
        assert w.min() >= 0 and w.max() <= 1
        if overlap:  # the outer half of each overlap is discarded: zero at inner edges
            if b.rows[0] > 0:
                assert np.all(w[:overlap * grid.tile_h // 2] == 0)
            if b.cols[1] < grid.cols:
                assert np.all(w[:, -(overlap * grid.tile_w // 2):] == 0)
        total[ys, xs] += w
    np.testing.assert_allclose(total, 1.0, atol=1e-6)


def test_plan_rejects_splits_finer_than_the_grid():
    grid = TileGrid(rows=2, cols=3, tile_h=16, tile_w=16)
    with pytest.raises(ValueError, match="cannot split a 2x3-tile grid into 3x1"):
        blocks.plan_blocks(grid, (3, 1))


def test_choose_plan_takes_the_cheapest_split_that_fits():
    grid = TileGrid(rows=8, cols=12, tile_h=32, tile_w=32)

    def pixels(g):  # a cost per pixel: the cheapest plan solves the fewest pixels
        return float(g.image_shape[0] * g.image_shape[1])

    tile_px = 32 * 32
    assert blocks.choose_plan(grid, pixels, 1e9).splits == (1, 1)
    # at most 40 tiles: 1x4 gives blocks of 8x5 (4 x 40 = 160 tiles solved), 2x3 of 6x6
    # (216): 1x4 is cheaper
    plan = blocks.choose_plan(grid, pixels, 40 * tile_px)
    assert plan.splits == (1, 4) and plan.block_grid.num_tiles == 40
    assert blocks.choose_plan(grid, pixels, 4 * tile_px) is None  # 3x3 tiles at best
    # tiles subdivided in two: the overlap halves, fewer pixels are solved twice
    plan = blocks.choose_plan(grid, pixels, 40 * tile_px, subdivide=(1, 2))
    assert plan.subdivide == 2 and plan.block_grid.tile_h == 16 and plan.frame_grid == grid
    assert len(plan.blocks) * pixels(plan.block_grid) < 160 * tile_px
    assert pixels(plan.block_grid) <= 40 * tile_px
    assert blocks.subdivisions(grid, multiple=4, min_tile=8) == [1, 2, 4]
    assert blocks.subdivisions(TileGrid(rows=1, cols=1, tile_h=168, tile_w=168), 4, 64) == [
        1, 2]
    assert blocks.subdivisions(TileGrid(rows=1, cols=1, tile_h=168, tile_w=168), 4, 200) == [
        1]


@pytest.mark.parametrize("sub", [1, 2])
def test_subdivided_bank_is_the_same_blur(sub):
    """Subdividing the tiles leaves the rendered views unchanged (module docstring)."""
    from dpjax import synthetic

    pair = dpjax.parametric_dp_kernels(radius=3.0)
    rng = np.random.default_rng(1)
    kernels = np.stack([np.roll(pair, t % 3, axis=-1) for t in range(4)], axis=1)
    bank = dpjax.KernelBank.create(kernels, rows=2, cols=2, tile_h=24)
    plan = blocks.plan_blocks(bank.grid, (1, 1), subdivide=sub)
    fine = blocks._sub_bank(bank, plan, plan.blocks[0])
    assert fine.grid == plan.grid
    colors, alphas, scales = synthetic.random_layers(rng, height=48, width=48, num_layers=2,
                                                     channels=1, scale_range=(0.5, 1.2),
                                                     slope=2.0)
    a = synthetic.render_layers(colors, alphas, scales, bank)
    b = synthetic.render_layers(colors, alphas, scales, fine)
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_plan_solve_splits_only_over_budget_and_refuses_what_no_block_fits():
    bank = dpjax.parametric_bank(rows=6, cols=6, tile_h=32, radius=3.0)
    cfg = dpjax.Config()
    whole = scene.solve_memory(1, bank, cfg).total
    assert scene.plan_solve(1, bank, cfg, None, None)[0] is None
    assert scene.plan_solve(1, bank, cfg, None, whole)[0] is None
    plan, info, est = scene.plan_solve(1, bank, cfg, None, whole - 1)
    assert plan is not None and est.total < whole
    assert info["chosen"] == "memory budget" and info["num_blocks"] == len(plan.blocks) > 1
    forced, info, est = scene.plan_solve(1, bank, cfg, (2, 3), None)
    assert forced.splits == (2, 3) and info["chosen"] == "forced"
    # A forced split's block shares the budget with the frame's own arrays, too.
    frame = 4.0 * 192 * 192 * 5  # views, two blended images and the defocus map
    assert scene.plan_solve(1, bank, cfg, (2, 3), est.total + frame)[0] is not None
    with pytest.raises(scene.SceneFailure, match="beside the frame's") as e:
        scene.plan_solve(1, bank, cfg, (2, 3), est.total + frame / 2)
    assert e.value.kind == "memory"
    with pytest.raises(scene.SceneFailure, match="even the smallest block") as e:
        scene.plan_solve(1, bank, cfg, None, 1e6)
    assert e.value.kind == "memory"
    with pytest.raises(scene.SceneFailure, match="cannot split") as e:
        scene.plan_solve(1, bank, cfg, (7, 1), None)
    assert e.value.kind == "config"


def test_block_solve_matches_whole_frame_solve_without_seams():
    """Same scene, same settings: a 2x2 block solve against the whole-frame solve."""
    bank = dpjax.parametric_bank(rows=6, cols=6, tile_h=24, radius=3.0)
    sc = dpjax.make_scene(np.random.default_rng(0), bank, num_layers=3,
                          scale_range=(0.2, 1.4), slope=2.0)
    cfg = dpjax.Config(
        mpi=dpjax.MpiConfig(num_layers=5, scale_min=0.0, scale_max=1.6),
        solver=dpjax.SolverConfig(num_iters=30, coarse_iters=30, pyramid_levels=2,
                                  chunk_size=30))
    whole = dpjax.fit(sc.views, bank, cfg)
    plan = blocks.plan_blocks(bank.grid, (2, 2))
    reports = []
    res = blocks.fit_blocks(sc.views, bank, cfg, plan, callback=reports.append)
    assert res.params is None and len(res.blocks) == 4
    assert res.level_iterations == whole.level_iterations
    assert {(p.block, p.num_blocks) for p in reports} == {(i, 4) for i in range(4)}
    assert all(b.elapsed_s <= a.elapsed_s + 1e-9 for a, b in zip(reports[1:], reports))
    for out in (res.all_in_focus, res.defocus):
        assert np.all(np.isfinite(out))

    def psnr(a, b):
        return 10 * np.log10(1.0 / np.mean((a - b) ** 2))

    gt_whole = psnr(whole.all_in_focus, sc.all_in_focus)
    gt_blocks = psnr(res.all_in_focus, sc.all_in_focus)
    assert gt_blocks > psnr(sc.views.mean(axis=0), sc.all_in_focus) + 2
    assert abs(gt_blocks - gt_whole) < 0.3
    assert psnr(res.all_in_focus, whole.all_in_focus) > 40
    assert np.mean(np.abs(res.defocus - whole.defocus)) < 0.02
    # no seam: the difference to the whole solve is not larger on the block boundary
    diff = np.abs(res.all_in_focus - whole.all_in_focus)[..., 0]
    seam = diff[72 - 4:72 + 4].mean()
    assert seam < 3 * diff.mean() + 1e-4


def test_blocks_share_the_frames_kernel_window(monkeypatch):
    """Tiles whose kernels differ in size: every block's layer kernels get the frame's
    window (one compiled geometry; overlapping tiles cut alike), not its own tiles'."""
    radii = [1.0] * 10 + [6.0] * 2  # 6 x 2 tiles: the bottom row blurs more
    pairs = [dpjax.parametric_dp_kernels(radius=r, ramp=0.4, smooth_sigma=0.5, size=17)
             for r in radii]
    bank = dpjax.KernelBank.create(np.stack(pairs, axis=1), rows=6, cols=2, tile_h=16)
    cfg = dpjax.Config(mpi=dpjax.MpiConfig(num_layers=3, scale_min=0.2, scale_max=1.2),
                       solver=dpjax.SolverConfig(num_iters=2, chunk_size=2)
                       ).replace(**{"refine.iters": 0})
    cut = cfg.solver.kernel_mass_cut
    plan = blocks.plan_blocks(bank.grid, (2, 1))
    own = {kernels.support_radius(blocks._sub_bank(bank, plan, b).kernels, cut)
           for b in plan.blocks}
    frame = kernels.support_radius(bank.kernels, cut)
    assert min(own) < frame  # the blocks' own supports differ from the frame's
    seen = []
    level_problem = solver._level_problem

    def record(s, factor, *args, **kwargs):
        seen.append(solver._kernel_radius(s, factor))
        return level_problem(s, factor, *args, **kwargs)

    monkeypatch.setattr(solver, "_level_problem", record)
    views = np.random.default_rng(0).uniform(0.2, 0.8, (2, 96, 32, 1)).astype(np.float32)
    blocks.fit_blocks(views, bank, cfg, plan)
    assert len(seen) == 2
    assert set(seen) == {kernels.layer_kernel_radius(bank.kernel_size, 1.2, frame)}


def test_block_solve_fills_the_blended_map_once(monkeypatch):
    """post.fill reaches across blocks: the blocks solve without it and the blended
    frame is filled once."""
    bank = dpjax.parametric_bank(rows=2, cols=2, tile_h=32, radius=3.0)
    views = np.random.default_rng(1).uniform(0.2, 0.8, (2, 64, 64, 1)).astype(np.float32)
    cfg = dpjax.Config(mpi=dpjax.MpiConfig(num_layers=3, scale_min=0.2, scale_max=1.2),
                       solver=dpjax.SolverConfig(num_iters=2, chunk_size=2)
                       ).replace(**{"refine.iters": 0})
    plan = blocks.plan_blocks(bank.grid, (2, 1))
    plain = blocks.fit_blocks(views, bank, cfg, plan)
    fills = []
    filled_defocus = postprocess.filled_defocus

    def spy(defocus, image, post):
        fills.append(np.shape(defocus))
        return filled_defocus(defocus, image, post)

    monkeypatch.setattr(postprocess, "filled_defocus", spy)
    res = blocks.fit_blocks(views, bank, cfg.replace(**{"post.fill": True}), plan)
    assert fills == [(64, 64)]
    np.testing.assert_allclose(res.all_in_focus, plain.all_in_focus, atol=1e-6)
    expect = filled_defocus(plain.defocus, plain.all_in_focus,
                            cfg.replace(**{"post.fill": True}).post)
    np.testing.assert_allclose(res.defocus, np.asarray(expect), atol=1e-5)
