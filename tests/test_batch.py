"""dpjax.batch: work splitting, memory model, progress, summary and gallery (no solves)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from dpjax import batch, kernels, presets, scene
from dpjax.kernels import TileGrid


@pytest.mark.parametrize("count", [1, 2, 3, 5])
def test_shards_partition_the_scenes(count):
    names = [f"{i:03d}" for i in range(11)] + ["b", "a", "a"]  # unsorted, duplicated
    shares = [batch.shard_scenes(names, k, count) for k in range(count)]
    flat = list(itertools.chain(*shares))
    assert sorted(flat) == sorted(set(names))  # every scene exactly once
    assert len(flat) == len(set(flat))
    assert shares == [batch.shard_scenes(list(reversed(names)), k, count)  # deterministic
                      for k in range(count)]
    assert max(map(len, shares)) - min(map(len, shares)) <= 1  # balanced


def test_shard_rejects_bad_process_index():
    with pytest.raises(ValueError):
        batch.shard_scenes(["a"], 2, 2)
    with pytest.raises(ValueError):
        batch.shard_scenes(["a"], 0, 0)


def test_round_robin_over_fake_devices():
    devices = ["gpu:0", "gpu:1", "gpu:2"]
    got = batch.assign_round_robin(list("abcdefg"), devices)
    assert [d for _, d in got] == ["gpu:0", "gpu:1", "gpu:2"] * 2 + ["gpu:0"]
    assert [x for x, _ in got] == list("abcdefg")
    with pytest.raises(ValueError):
        batch.assign_round_robin(["a"], [])


def test_group_by_shape():
    names = ["a", "b", "c", "d", "e", "f"]
    keys = {"a": (64, 64), "b": (32, 32), "c": (64, 64), "d": (64, 64), "e": None,
            "f": (32, 32)}
    assert batch.group_by_shape(names, keys, 2) == [["a", "c"], ["b", "f"], ["d"], ["e"]]
    assert batch.group_by_shape(names, keys, 1) == [[n] for n in names]
    assert batch.group_by_shape(names, keys, 10) == [["a", "c", "d"], ["b", "f"], ["e"]]


def test_fit_tiles_crops_to_divisible_tiles_or_refuses():
    grid, (y0, x0) = batch.fit_tiles(70, 101, (2, 3), 4, 12)
    assert (grid.rows, grid.cols, grid.tile_h, grid.tile_w) == (2, 3, 32, 32)
    assert (y0, x0) == (3, 2)
    with pytest.raises(ValueError, match="smaller than the kernel grid"):
        batch.fit_tiles(16, 16, (2, 2), 4, 13)
    assert batch.auto_grid(1008, 1344) == (4, 5) and batch.auto_grid(10, 10) == (1, 1)


def _estimate(h=256, w=256, layers=12, channels=1, k=23, rows=2, cols=2, scale=1.6,
              **refine):
    grid = TileGrid(rows=rows, cols=cols, tile_h=h // rows, tile_w=w // cols)
    return batch.estimate_solve_memory(height=h, width=w, channels=channels,
                                       num_layers=layers, grid=grid, kernel_size=k,
                                       max_abs_scale=scale, **refine)


def test_memory_estimate_with_the_refinement():
    # The refinement's working set replaces the fit's when it is the larger (they are
    # never held at once) ...
    plain = _estimate(1008, 1344, 12, 1, 61, 6, 8)
    with_refine = _estimate(1008, 1344, 12, 1, 61, 6, 8, refine_images=1)
    assert "refine" not in plain.parts
    p = with_refine.parts
    fit_ws = p["pixels"] + p["work"]
    assert p["refine"] > fit_ws  # a full Pixel 4 frame since the layer loop
    assert with_refine.total == pytest.approx(plain.total - fit_ws + p["refine"])
    assert _estimate(1008, 1344, 12, 1, 61, 6, 8, refine_images=1,
                     refine_history=0).total >= plain.total
    assert (_estimate(refine_images=2).parts["refine"] > _estimate(refine_images=1).parts["refine"]
            < _estimate(refine_images=1, refine_history=20).parts["refine"])
    # ... and the estimate of the refinement alone (without the fit's working set) covers
    # every refinement measured alone, by 0-38% (batch.py).
    for (h, w, rows, cols, layers, c, k, s), mb in batch.REFINE_MEASUREMENTS:
        est = _estimate(h, w, layers, c, k, rows, cols, s, refine_images=1)
        p = est.parts
        alone = p["overhead"] + p["inputs"] + p["kernels"] + p["refine"]
        assert 1.0 <= alone / 1e6 / mb < 1.4, (h, w, c, alone / 1e6, mb)
        assert est.total >= alone


def test_memory_estimate_covers_whole_solves():
    # Fit and refinement in one process (batch.SOLVE_MEASUREMENTS, Adam fits): the
    # estimate is above every measured peak, by 8-15%.
    pair = kernels.parametric_dp_kernels(radius=16.0)
    cfg = presets.base_config(preset="auto", optimizer="adam").replace(
        **{"mpi.scale_min": -0.6, "mpi.scale_max": 1.0})  # as bench_blocks.py solves
    for (h, w, rows, cols, c), mb in batch.SOLVE_MEASUREMENTS:
        bank = kernels.KernelBank.create(np.repeat(pair[:, None], rows * cols, axis=1),
                                         rows=rows, cols=cols, tile_h=h // rows,
                                         tile_w=w // cols)
        est = scene.solve_memory(c, bank, cfg)
        assert 1.0 < est.total / 1e6 / mb < 1.2, (h, w, c, est.total / 1e6, mb)


def test_memory_estimate_of_an_lbfgs_fit_adds_its_history():
    adam = _estimate(1008, 1344, 12, 1, 61, 6, 8)
    lbfgs = _estimate(1008, 1344, 12, 1, 61, 6, 8, fit_history=5)
    assert "history" not in adam.parts
    mpi_bytes = (12 + 11) * 1008 * 1344 * 4.0  # one MPI-sized buffer, grey
    assert lbfgs.parts["history"] == pytest.approx(16 * mpi_bytes)
    assert lbfgs.total == pytest.approx(adam.total + 16 * mpi_bytes)
    # scene.solve_memory takes it from the config.
    bank = kernels.KernelBank.create(
        np.repeat(kernels.parametric_dp_kernels(radius=8.0)[:, None], 4, axis=1),
        rows=2, cols=2, tile_h=128, tile_w=128)
    base = presets.base_config(preset="auto")
    est = {opt: scene.solve_memory(1, bank, base.replace(**{"solver.optimizer": opt,
                                                            "refine.iters": 0}))
           for opt in ("adam", "lbfgs")}
    m = base.solver.lbfgs_memory
    assert est["lbfgs"].parts["history"] == pytest.approx((2 * m + 6) * 23 * 256 * 256 * 4.0)
    assert "history" not in est["adam"].parts


def test_memory_estimate_matches_measurements_and_scales():
    # The fit is within 7% of every measurement but the 128x128 one (-11%, batch.py).
    for (h, w, rows, cols, layers, c, k, s), mb in batch.MEMORY_MEASUREMENTS:
        est = _estimate(h, w, layers, c, k, rows, cols, s)
        assert abs(est.total / 1e6 / mb - 1) < 0.15, (h, w, est.total / 1e6, mb)
    small, big = _estimate(), _estimate(512, 512)
    assert big.total > 2.5 * (small.total - batch.OVERHEAD_BYTES)
    assert _estimate(layers=24).total > small.total
    assert _estimate(channels=3).total > small.total
    assert _estimate(k=61).parts["work"] > small.parts["work"]  # bigger FFT tiles
    assert small.total == pytest.approx(sum(small.parts.values()))


def test_memory_refusal_message():
    est = _estimate()
    assert batch.memory_refusal(est, None) is None
    assert batch.memory_refusal(est, est.total + 1) is None
    msg = batch.memory_refusal(est, 0.1e9)
    assert "over the memory budget of 0.10 GB" in msg and f"{est.gb:.2f} GB" in msg


def test_scene_eta_weights_levels_by_pixels():
    eta = batch.SceneEta((200, 40, 8))
    assert eta.fraction == 0 and eta.eta_s is None and eta.iterations == (0, 248)
    eta.update(level=2, step=200, num_steps=200, loss=1.0, elapsed_s=10.0)
    # Coarsest level done: 200/16 of 200/16 + 40/4 + 8 work units.
    assert eta.fraction == pytest.approx(12.5 / 30.5)
    assert eta.eta_s == pytest.approx(10.0 * 18.0 / 12.5)
    eta.update(level=0, step=8, num_steps=8, loss=0.5, elapsed_s=20.0)
    assert eta.fraction == 1.0 and eta.eta_s == 0.0 and eta.iterations == (248, 248)
    line = batch.format_scene_progress("001", eta)
    assert line.startswith("001 [") and "L3/3 it 248/248" in line and "loss 0.5" in line


def test_batch_eta_and_format():
    eta = batch.BatchEta(total=4, workers=2)
    assert eta.eta_s is None
    eta.record("skipped")
    eta.record("done", 10.0)
    assert eta.finished == 2 and eta.eta_s == pytest.approx(10.0)
    text = batch.format_batch_progress(eta)
    assert "2/4 scenes (done 1, skipped 1, failed 0) ETA 10s" in text
    assert batch.format_duration(3725) == "1h02m" and batch.format_duration(None) == "?"


def _records():
    return [{"scene": "b", "status": "failed", "reason": "input: x_left.tif: truncated"},
            {"scene": "a<1>", "status": "done", "metrics": {"psnr": 30.0, "shift": [0, 1]},
             "final_loss": 1.5, "timings": {"solve_s": 2.0}},
            {"scene": "c", "status": "skipped", "reason": "outputs complete"}]


def test_summary_counts_order_and_exit_status():
    s = batch.summarize(_records(), input_dir="in")
    assert [r["scene"] for r in s["scenes"]] == ["a<1>", "b", "c"]
    assert s["counts"] == {"done": 1, "skipped": 1, "failed": 1}
    assert s["exit_status"] == 1 and s["input_dir"] == "in"
    assert batch.summarize(_records()[1:])["exit_status"] == 0
    assert batch.exit_status([{"scene": "x", "status": "not run"}]) == 1
    with pytest.raises(ValueError, match="more than once"):
        batch.summarize(_records() + [{"scene": "b", "status": "done"}])


def test_merge_shares_rejects_overlap():
    recs = _records()
    merged = batch.merge_shares([batch.summarize(recs[:1]), batch.summarize(recs[1:])])
    assert merged["num_scenes"] == 3
    with pytest.raises(ValueError):
        batch.merge_shares([batch.summarize(recs), batch.summarize(recs[:1])])


def test_gallery_references_thumbnails_and_escapes():
    s = batch.summarize(_records())
    page = batch.gallery_html(s, existing={"a<1>/" + t for t in batch.THUMBS.values()})
    assert page.startswith("<!DOCTYPE html>")
    for t in batch.THUMBS.values():
        assert f'src="a%3C1%3E/{t}"' in page  # percent-encoded, then escaped
        assert f'src="b/{t}"' not in page  # failed scene: no thumbnails listed
    assert "a<1>" not in page  # escaped
    assert 'href="a%3C1%3E/all_in_focus.png"' in page
    assert "truncated" in page and "psnr 30" in page and "solve 2.0s" in page


def test_thumbnail_shrinks_with_area_filter():
    img = np.zeros((100, 300, 3), np.uint8)
    img[:, :150] = 200
    t = batch.thumbnail(img, 60)
    assert t.shape == (20, 60, 3) and t[0, 0, 0] == 200 and t[0, -1, 0] == 0
    assert batch.thumbnail(img[:10, :10], 60).shape == (10, 10, 3)
    with pytest.raises(ValueError):
        batch.thumbnail(img.astype(np.float32))


def test_default_compilation_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("DPJAX_CACHE_DIR", str(tmp_path / "mine"))
    assert batch.default_compilation_cache_dir() == tmp_path / "mine"
    monkeypatch.delenv("DPJAX_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert batch.default_compilation_cache_dir() == tmp_path / "xdg" / "dpjax" / "jax"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert batch.default_compilation_cache_dir() == (tmp_path / "home" / ".cache" / "dpjax"
                                                     / "jax")


def test_use_default_compilation_cache_keeps_a_set_cache_and_never_raises(monkeypatch,
                                                                           tmp_path):
    import jax

    before = jax.config.jax_compilation_cache_dir
    before_max = jax.config.jax_compilation_cache_max_size
    try:
        jax.config.update("jax_compilation_cache_dir", str(tmp_path / "set"))
        monkeypatch.setenv("DPJAX_CACHE_DIR", str(tmp_path / "default"))
        assert batch.use_default_compilation_cache() == (tmp_path / "set", None)
        assert not (tmp_path / "default").exists()

        jax.config.update("jax_compilation_cache_dir", None)
        a_file = tmp_path / "file"
        a_file.write_text("x")
        monkeypatch.setenv("DPJAX_CACHE_DIR", str(a_file))
        folder, why = batch.use_default_compilation_cache()
        assert folder is None and "is not a folder" in why
        assert jax.config.jax_compilation_cache_dir is None

        monkeypatch.setenv("DPJAX_CACHE_DIR", str(tmp_path / "default"))
        folder, why = batch.use_default_compilation_cache()
        assert why is None and folder == (tmp_path / "default").resolve() and folder.is_dir()
        assert jax.config.jax_compilation_cache_dir == str(folder)
        assert jax.config.jax_compilation_cache_max_size == batch.COMPILATION_CACHE_MAX_BYTES
    finally:
        jax.config.update("jax_compilation_cache_dir", before)
        jax.config.update("jax_compilation_cache_max_size", before_max)


def test_use_compilation_cache_sets_jax_and_rejects_bad_paths(tmp_path):
    import jax

    before = jax.config.jax_compilation_cache_dir
    before_max = jax.config.jax_compilation_cache_max_size
    try:
        folder = batch.use_compilation_cache(tmp_path / "cache" / "jax")
        assert folder.is_dir() and jax.config.jax_compilation_cache_dir == str(folder)
    finally:
        jax.config.update("jax_compilation_cache_dir", before)
        jax.config.update("jax_compilation_cache_max_size", before_max)
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(ValueError, match="is not a folder"):
        batch.use_compilation_cache(a_file)
    with pytest.raises(ValueError, match="cannot create"):
        batch.use_compilation_cache(a_file / "below")
    assert jax.config.jax_compilation_cache_dir == before


@pytest.mark.parametrize("shape", [(512, 768), (1008, 1344), (64, 96)])
def test_auto_tiles_of_small_frames_are_the_auto_grid(shape):
    got = batch.auto_tiles(*shape, 4, 8)
    assert got == batch.fit_tiles(*shape, batch.auto_grid(*shape), 4, 8)


@pytest.mark.parametrize("shape", [(4000, 6000), (6000, 4000), (3000, 4000)])
def test_auto_tiles_of_large_frames_can_be_halved_by_blocks(shape):
    from dpjax import blocks

    grid, (y0, x0) = batch.auto_tiles(*shape, 4, 36)
    rows, cols = batch.auto_grid(*shape)
    assert abs(grid.rows - rows) <= 1 and abs(grid.cols - cols) <= 1
    assert grid.tile_h % 8 == 0 and grid.tile_w % 8 == 0
    h, w = grid.image_shape
    assert h * w >= 0.98 * shape[0] * shape[1]  # crops at most 2% of the frame
    assert y0 == (shape[0] - h) // 2 and x0 == (shape[1] - w) // 2
    assert 2 in blocks.subdivisions(grid, 4, 64)
