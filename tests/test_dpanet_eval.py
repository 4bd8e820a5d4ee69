"""Evaluating DPANet: checkpoint loading, tiled inference, the apps' dpanet paths, and the
MPI warm start from an all-in-focus image.

Every network pass here uses one width-4 model on 64x64 windows, so the module compiles
the forward pass once (plus once for the 64x112 single-pass comparison; one tiny solve
compiles the solver). Parameters are drawn with numpy from `init`'s distribution: the
jitted `init` itself takes over a minute to compile on a loaded 2-core CPU.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tifffile

import dpjax
from dpjax import dpanet, io, mpi, outputs, pipeline, runner
from dpjax import reproduce as rt
from dpjax.dpanet import inference, train
from dpjax.solver import downsample_image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import run_solver

SCRIPT = ROOT / "experiments" / "reproduce_table.py"
CONFIG = dpanet.DpanetConfig(width=4, channels=1)
TILE, OVERLAP = 64, 32


def _random_params(config: dpanet.DpanetConfig, seed: int):
    """init's distribution drawn with numpy: He-normal weights (0.1x for the second conv of
    residual blocks), zero offset/mask convs, zero biases; same structure and shapes."""
    shapes = jax.eval_shape(functools.partial(dpanet.init, config=config), jax.random.key(0))
    rng = np.random.default_rng(seed)

    def draw(path, spec):
        names = [str(getattr(e, "key", "")) for e in path]
        if names[-1] == "b" or any(n.startswith("offset_") for n in names):
            return jnp.zeros(spec.shape, jnp.float32)
        k, _, cin, _ = spec.shape
        std = np.sqrt(2.0 / (k * k * cin)) * (0.1 if "conv2" in names else 1.0)
        return jnp.asarray(rng.normal(0.0, std, spec.shape), jnp.float32)

    return jax.tree_util.tree_map_with_path(draw, shapes)


def _save(directory: Path, step: int, params, config=CONFIG) -> Path:
    tc = train.TrainConfig()
    opt_state = train.make_optimizer(tc).init(params)
    return train.save_checkpoint(directory, step, params, opt_state, config, tc)


@pytest.fixture(scope="module")
def params():
    return _random_params(CONFIG, 0)


@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory, params):
    """A training-style folder: two checkpoints and a run_config.json naming the split."""
    d = tmp_path_factory.mktemp("dpanet_run")
    _save(d, 2, _random_params(CONFIG, 1))
    _save(d, 5, params)
    (d / "run_config.json").write_text(json.dumps(
        {"model": CONFIG.to_dict(), "data": {"train_scenes": ["001", "005", "008"]}}))
    return d


def _views(h: int, w: int, seed: int = 0) -> np.ndarray:
    """[2, h, w, 1] a smooth texture and a 2 px shifted copy, joint maximum 1."""
    rng = np.random.default_rng(seed)
    base = rng.uniform(0.1, 1.0, (h // 8 + 2, w // 8 + 3))
    big = np.kron(base, np.ones((8, 8)))
    v = np.stack([big[:h, :w], big[:h, 2:w + 2]])[..., None].astype(np.float32)
    return v / v.max()


def _assert_trees_equal(a, b):
    la, ta = jax.tree_util.tree_flatten(a)
    lb, tb = jax.tree_util.tree_flatten(b)
    assert ta == tb
    for x, y in zip(la, lb):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# ----------------------------------------------------------------------------- loading


def test_load_model_round_trip(ckpt_dir, params):
    latest = ckpt_dir / "ckpt_000000005.npz"
    assert dpanet.resolve_checkpoint(ckpt_dir) == latest
    for path in (ckpt_dir, latest, latest.with_suffix(".json")):
        loaded, config = dpanet.load_model(path)
        assert config == CONFIG
        _assert_trees_equal(loaded, params)
    older, _ = dpanet.load_model(ckpt_dir / "ckpt_000000002.npz")
    _assert_trees_equal(older, _random_params(CONFIG, 1))
    assert dpanet.checkpoint_meta(latest)["step"] == 5


def test_load_checkpoint_returns_everything_in_one_pass(ckpt_dir, params):
    ckpt = dpanet.load_checkpoint(ckpt_dir)
    assert ckpt.npz == ckpt_dir / "ckpt_000000005.npz"
    assert ckpt.step == 5 and ckpt.meta["step"] == 5
    assert ckpt.config == CONFIG
    _assert_trees_equal(ckpt.params, params)
    older = dpanet.load_checkpoint(ckpt_dir / "ckpt_000000002.json")
    assert older.step == 2 and older.npz.name == "ckpt_000000002.npz"


def test_bfloat16_planes_round_to_nearest_even():
    import ml_dtypes  # jax's own dependency: the reference rounding

    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(0, 1, 1000) * 10.0 ** rng.integers(-30, 30, 1000),
                        [0.0, -0.0, 1.0, 1.00390625, 1.01171875, -3.0e38]]).astype(np.float32)
    planes = train._to_bf16_planes(x.reshape(2, -1))
    assert planes.dtype == np.uint8 and planes.shape == (2, 2, x.size // 2)
    back = train._from_bf16_planes(planes).reshape(-1)
    np.testing.assert_array_equal(back, x.astype(ml_dtypes.bfloat16).astype(np.float32))
    assert np.all(np.abs(back - x) <= np.abs(x) * 2.0 ** -8)


def test_weights_only_export_loads_for_inference_not_for_training(ckpt_dir, params, tmp_path):
    src = ckpt_dir / "ckpt_000000005.npz"
    out = train.export_weights(src, tmp_path / "export")
    assert out == tmp_path / "export" / "ckpt_000000005.npz"
    assert out.stat().st_size < 0.2 * src.stat().st_size
    with np.load(out) as data:
        assert all(n.startswith("params/") for n in data.files)
    loaded = dpanet.load_checkpoint(tmp_path / "export")
    assert loaded.step == 5 and loaded.config == CONFIG
    assert loaded.meta["params_storage"] == train.BF16_PLANES
    for x, y in zip(jax.tree_util.tree_leaves(loaded.params), jax.tree_util.tree_leaves(params)):
        assert x.dtype == jnp.float32 and x.shape == y.shape
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=2.0 ** -8, atol=0)
    with pytest.raises(ValueError, match="training cannot resume"):
        train.load_checkpoint(out)
    with pytest.raises(ValueError, match="already a weights-only checkpoint"):
        train.export_weights(out, tmp_path / "again")
    with pytest.raises(ValueError, match="export to another folder"):
        train.export_weights(src, ckpt_dir)
    future = tmp_path / "future"
    future.mkdir()
    for suffix in (".npz", ".json"):
        shutil.copy(src.with_suffix(suffix), future / src.with_suffix(suffix).name)
    meta = json.loads(src.with_suffix(".json").read_text())
    (future / src.with_suffix(".json").name).write_text(json.dumps({**meta, "format": 99}))
    with pytest.raises(ValueError, match=r"unsupported checkpoint format 99 \(expected 1\)"):
        train.export_weights(future / src.name, tmp_path / "from_future")
    with pytest.raises(dpanet.CheckpointError, match=r"format 99 \(expected 1\)"):
        dpanet.load_model(future / src.name)
    # Training and inference read the sidecar through one check: the same messages.
    (future / src.with_suffix(".json").name).unlink()
    with pytest.raises(ValueError, match="sidecar .* is missing"):
        train.load_checkpoint(future / src.name)
    # A sidecar that names another storage, or float32 arrays under the bfloat16 name.
    meta = json.loads(out.with_suffix(".json").read_text())
    out.with_suffix(".json").write_text(json.dumps({**meta, "params_storage": "int4"}))
    with pytest.raises(dpanet.CheckpointError, match="unknown params_storage 'int4'"):
        dpanet.load_model(out)
    shutil.copy(src, out)
    out.with_suffix(".json").write_text(json.dumps(meta))
    with pytest.raises(dpanet.CheckpointError, match="is not stored as bfloat16_planes"):
        dpanet.load_model(out)


def test_export_app_writes_a_loadable_copy_and_fails_cleanly(ckpt_dir, tmp_path):
    script = ROOT / "experiments" / "export_dpanet.py"
    proc = subprocess.run([sys.executable, str(script), f"--checkpoint={ckpt_dir}",
                           f"--output_dir={tmp_path / 'w'}"], check=False,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert dpanet.load_checkpoint(tmp_path / "w").step == 5
    proc = subprocess.run([sys.executable, str(script), f"--checkpoint={tmp_path / 'w'}",
                           f"--output_dir={tmp_path / 'w2'}"], check=False,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("export_dpanet: error: ")
    assert "already a weights-only checkpoint" in proc.stderr


def test_run_solver_dpanet_tile_defaults_match_the_library():
    # run_solver defines its flags before importing dpjax (jax.distributed must start
    # first), so it spells the defaults out; they must stay the library's.
    from dpjax import runner
    from dpjax_apps import flags as app_flags

    defaults = {f.name: f.default for f in dataclasses.fields(runner.RunOptions)}
    assert defaults["dpanet_tile"] == dpanet.DEFAULT_TILE
    assert defaults["dpanet_overlap"] == dpanet.DEFAULT_OVERLAP
    assert (app_flags.DPANET_TILE, app_flags.DPANET_OVERLAP) == (dpanet.DEFAULT_TILE,
                                                                dpanet.DEFAULT_OVERLAP)


def test_load_model_errors_name_the_problem(tmp_path, ckpt_dir, params):
    good = ckpt_dir / "ckpt_000000005.npz"
    with pytest.raises(dpanet.MissingCheckpointError, match="not found") as info:
        dpanet.load_model(tmp_path / "nowhere")
    assert isinstance(info.value, FileNotFoundError)
    (tmp_path / "empty").mkdir()
    with pytest.raises(dpanet.MissingCheckpointError, match="no complete DPANet checkpoint"):
        dpanet.load_model(tmp_path / "empty")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(dpanet.CheckpointError, match="expected a ckpt_<step>.npz"):
        dpanet.load_model(tmp_path / "notes.txt")

    def variant(name: str, meta_change=None, npz_bytes=None) -> Path:
        d = tmp_path / name
        d.mkdir()
        npz = d / good.name
        if npz_bytes is None:
            shutil.copy(good, npz)
        else:
            npz.write_bytes(npz_bytes)
        meta = json.loads(good.with_suffix(".json").read_text())
        if meta_change is not None:
            meta_change(meta)
            npz.with_suffix(".json").write_text(json.dumps(meta))
        return npz

    no_sidecar = variant("no_sidecar")
    with pytest.raises(dpanet.CheckpointError, match="sidecar .* is missing"):
        dpanet.load_model(no_sidecar)
    corrupt = variant("corrupt", meta_change=lambda m: None, npz_bytes=b"PK\x03\x04 broken")
    with pytest.raises(dpanet.CheckpointError, match="unreadable checkpoint archive"):
        dpanet.load_model(corrupt)
    wider = variant("wider", meta_change=lambda m: m["model_config"].update(width=8))
    with pytest.raises(dpanet.CheckpointError, match="do not match the sidecar's model_config"):
        dpanet.load_model(wider)
    future = variant("future", meta_change=lambda m: m.update(format=99))
    with pytest.raises(dpanet.CheckpointError, match="unsupported checkpoint format 99"):
        dpanet.load_model(future)
    bad_config = variant("bad_config", meta_change=lambda m: m["model_config"].update(width=0))
    with pytest.raises(dpanet.CheckpointError, match="invalid step or model_config"):
        dpanet.load_model(bad_config)

    nan_params = jax.tree_util.tree_map(lambda x: x, params)
    nan_params["head"][1]["b"] = jnp.full_like(params["head"][1]["b"], jnp.nan)
    nan_path = _save(tmp_path / "nan", 1, nan_params)
    with pytest.raises(dpanet.CheckpointError, match="non-finite values in"):
        dpanet.load_model(nan_path)


# ----------------------------------------------------------------------------- tiling


def test_tile_layout_and_weights():
    assert inference.tile_starts(64, 64, 32) == [0]
    assert inference.tile_starts(48, 64, 32) == [0]
    assert inference.tile_starts(112, 64, 32) == [0, 32, 48]
    assert inference.tile_starts(256, 64, 16) == [0, 48, 96, 144, 192]
    # Neighbours at exactly `overlap` apart: the two ramps sum to one over the overlap.
    lead = inference.tile_weights(64, True, False, 32)
    trail = inference.tile_weights(64, False, True, 32)
    np.testing.assert_allclose(trail[32:] + lead[:32], 1.0)
    assert np.all(lead[:8] == 0) and np.all(lead[24:] == 1)  # 0 within overlap / 4
    np.testing.assert_array_equal(inference.tile_weights(48, False, False, 32), 1.0)
    np.testing.assert_array_equal(inference.tile_weights(48, True, True, 0), 1.0)


def _box(left, right, radius: int):
    """A local stand-in for the network: box mean of (left + right) / 2, edge-padded."""
    x = np.asarray((left + right) / 2)
    k = 2 * radius + 1
    p = np.pad(x, ((0, 0), (radius, radius), (radius, radius), (0, 0)), mode="edge")
    h, w = x.shape[1:3]
    return sum(p[:, i:i + h, j:j + w] for i in range(k) for j in range(k)) / k**2


@pytest.mark.parametrize("radius, exact", [(2, True), (4, True), (7, False)])
def test_blending_is_exact_for_receptive_fields_up_to_overlap_quarter(radius, exact):
    views = np.random.default_rng(1).uniform(size=(2, 80, 112, 1)).astype(np.float32)
    fn = functools.partial(_box, radius=radius)
    whole = fn(views[:1], views[1:])[0]
    for batch_tiles in (1, 3):  # 3 does not divide the 2 x 4 windows: the last call is padded
        tiled = inference._blend_tiles(fn, views, 48, 16, batch_tiles)  # overlap / 4 = 4 px
        err = np.abs(tiled - whole).max()
        assert (err < 1e-6) == exact, err


def test_deblur_tiled_single_pass_and_intensity_scale(params):
    views = _views(50, 60)  # padded to 64x64: one window
    want = np.asarray(dpanet.deblur(params, CONFIG, views))
    got = dpanet.deblur_tiled(params, CONFIG, views, tile=TILE, overlap=OVERLAP)
    assert got.shape == (50, 60, 1) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, atol=1e-6)
    # Any input scale: normalised by the joint maximum, returned in the input's scale.
    quarter = dpanet.deblur_tiled(params, CONFIG, 0.25 * views, tile=TILE, overlap=OVERLAP)
    np.testing.assert_allclose(quarter, 0.25 * got, atol=1e-6)
    raw = dpanet.deblur_tiled(params, CONFIG, 0.25 * views, tile=TILE, overlap=OVERLAP,
                              normalize=False)
    assert np.abs(raw - quarter).max() > 1e-3  # the network itself is not scale-equivariant


def test_deblur_tiled_multi_tile_close_to_single_pass(params):
    # DPANet's receptive field is hundreds of px, far beyond overlap / 4 = 8 px, so three
    # windows across 112 px do not reproduce the single pass exactly. On uniform noise
    # with these init-like weights (whose output is nearly flat: std 0.0028), the largest
    # difference was 0.15 output std and the mean 0.008 std. This guards the tiling
    # against regressions; it says nothing about a trained network's tiling error.
    views = np.random.default_rng(2).uniform(0.0, 1.0, (2, 64, 112, 1)).astype(np.float32)
    whole = np.asarray(dpanet.deblur(params, CONFIG, views))
    tiled = dpanet.deblur_tiled(params, CONFIG, views, tile=TILE, overlap=OVERLAP)
    diff = np.abs(tiled - whole)
    spread = whole.std()
    assert diff.max() < 0.3 * spread and diff.mean() < 0.02 * spread, (diff.max(), spread)
    assert diff.max() > 0  # a different computation, not the single pass again


def test_deblur_tiled_rejects_bad_input(params):
    views = _views(32, 32)
    with pytest.raises(ValueError, match="tile must be a positive multiple of 16"):
        dpanet.deblur_tiled(params, CONFIG, views, tile=40)
    with pytest.raises(ValueError, match="overlap must be"):
        dpanet.deblur_tiled(params, CONFIG, views, tile=32, overlap=32)
    with pytest.raises(ValueError, match=r"views must be \[2, H, W, 1\]"):
        dpanet.deblur_tiled(params, CONFIG, np.ones((2, 32, 32, 3), np.float32))
    bad = views.copy()
    bad[0, 3, 3] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        dpanet.deblur_tiled(params, CONFIG, bad)
    with pytest.raises(ValueError, match="all zero"):
        dpanet.deblur_tiled(params, CONFIG, np.zeros_like(views))
    with pytest.raises(ValueError, match="built for"):
        dpanet.deblur_tiled(params, dataclasses.replace(CONFIG, width=8), views)


# ----------------------------------------------------------------------------- warm start


@pytest.mark.parametrize("levels", [1, 2])
def test_init_from_all_in_focus_reproduces_the_image(levels):
    rng = np.random.default_rng(3)
    image = rng.uniform(-0.1, 1.1, (32, 48, 1)).astype(np.float32)  # some values clip
    init = pipeline.init_from_all_in_focus(image, 5, levels)
    f = 2 ** (levels - 1)
    assert init.color_logits.shape == (5, 1, 32 // f, 48 // f)
    assert init.alpha_logits.shape == (4, 32 // f, 48 // f)
    trans = mpi.transmittance(mpi.alphas(init))
    np.testing.assert_allclose(np.asarray(trans), 1 / 5, atol=1e-6)  # as mpi.init_params
    composite = np.asarray(mpi.all_in_focus(mpi.colors(init), trans))  # [C, H', W']
    want = np.clip(np.asarray(downsample_image(jnp.asarray(image.transpose(2, 0, 1)), f)),
                   1e-3, 1 - 1e-3)
    np.testing.assert_allclose(composite, want, atol=1e-5)
    with pytest.raises(ValueError, match="NaN"):
        pipeline.init_from_all_in_focus(np.full((32, 48, 1), np.nan), 5, levels)


@pytest.mark.slow  # one solver compilation, about 20 s
def test_fit_accepts_the_warm_start(tiny_bank):
    scene = dpjax.make_scene(np.random.default_rng(0), tiny_bank, num_layers=2)
    cfg = dpjax.Config(mpi=dpjax.MpiConfig(num_layers=4),
                       solver=dpjax.SolverConfig(num_iters=2, chunk_size=2))
    init = pipeline.init_from_all_in_focus(scene.all_in_focus, 4, 1)
    res = dpjax.fit(scene.views, tiny_bank, cfg, init=init)
    assert res.level_iterations == (2,)
    assert np.all(np.isfinite(res.all_in_focus))


# ----------------------------------------------------------------------------- reproduce_table


def test_reproduce_table_input_and_dpanet(tmp_path, pixel4_dir, ckpt_dir):
    out = tmp_path / "out"
    opts = rt.Options(data_dir=pixel4_dir, scenes=("011",), methods=("input", "dpanet"),
                      crop=(1, 1), output_dir=out, quiet=True, dpanet_checkpoint=ckpt_dir,
                      dpanet_tile=TILE, dpanet_overlap=OVERLAP)
    rows = rt.run(opts)
    d = out / "dpanet" / "011"
    assert outputs.is_complete(d)
    assert (d / "all_in_focus.tif").is_file() and not (d / "defocus_map.tif").exists()
    result = json.loads((d / "result.json").read_text())
    m = result["metrics"]
    assert m["aiwe1"] is None and m["spearman"] is None
    assert 5 < m["psnr"] < 60 and np.isfinite(m["ssim"])
    assert result["wall_s"] > 0
    info = result["dpanet"]
    assert info["checkpoint"].endswith("ckpt_000000005.npz") and info["step"] == 5
    assert info["trained_on_scene"] is False and info["tile"] == TILE
    aif = tifffile.imread(d / "all_in_focus.tif")
    assert aif.shape == (168, 168) and 0 < aif.max() <= 1.0  # views have max 1
    assert [(r["method"], r["scene"]) for r in rows] == [
        (mth, s) for mth in ("input", "dpanet") for s in ("011", "mean")]
    csv_text = (out / "table.csv").read_text()
    assert "\ndpanet,auto,011,,,," in csv_text  # defocus columns empty
    assert "DPANet:" in (out / "table.md").read_text()


def test_reproduce_table_dpanet_errors(tmp_path, pixel4_dir, monkeypatch):
    base = rt.Options(data_dir=pixel4_dir, scenes=("011",), methods=("dpanet",), crop=(1, 1),
                      output_dir=tmp_path / "out")
    monkeypatch.setattr(runner, "DEFAULT_DPANET_CHECKPOINT", tmp_path / "absent")
    with pytest.raises(FileNotFoundError, match="train_dpanet.py"):
        rt.run(base)
    with pytest.raises(FileNotFoundError, match="--dpanet_checkpoint: DPANet checkpoint not "
                                                "found"):
        rt.run(dataclasses.replace(base, dpanet_checkpoint=tmp_path / "nope"))
    with pytest.raises(ValueError, match="--dpanet_tile"):
        rt.run(dataclasses.replace(base, dpanet_tile=50))
    assert not (tmp_path / "out" / "table.md").exists()  # all before any work


def test_reproduce_table_cli_missing_checkpoint(tmp_path, pixel4_dir):
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), f"--data_dir={pixel4_dir}", "--scenes=011",
         "--methods=dpanet", f"--dpanet_checkpoint={tmp_path / 'none'}", "--crop=1x1",
         f"--output_dir={tmp_path / 'out'}"],
        check=False, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 1
    assert "error: --dpanet_checkpoint: DPANet checkpoint not found" in proc.stderr
    assert "Traceback" not in proc.stderr


# ----------------------------------------------------------------------------- run_solver


def _runner_opts(inp: Path, out: Path, **kw):
    sys.path.insert(0, str(ROOT / "tests"))
    from test_runner import _opts

    return _opts(inp, out, **{"num_layers": 4, "preset": "none", **kw})


def _write_pair(folder: Path, name: str, views: np.ndarray) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for side, v in zip(("left", "right"), views[..., 0]):
        tifffile.imwrite(folder / f"{name}_{side}.tif", (v * 60000).astype(np.uint16))


def test_run_solver_dpanet_batch(tmp_path, ckpt_dir):
    inp, out = tmp_path / "in", tmp_path / "out"
    _write_pair(inp, "a", _views(64, 64, seed=4))
    _write_pair(inp, "b", _views(56, 64, seed=5))  # not a multiple of 16: padded inside
    tifffile.imwrite(inp / "c_left.tif", np.ones((64, 64), np.uint16))  # no right view
    opts = _runner_opts(inp, out, method="dpanet", dpanet_checkpoint=ckpt_dir,
                        dpanet_tile=TILE, dpanet_overlap=OVERLAP)
    assert run_solver.run_batch(opts) == 1  # c failed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == "dpanet"
    recs = {r["scene"]: r for r in summary["scenes"]}
    assert recs["c"]["status"] == "failed" and recs["c"]["error"] == "input"
    for name, h in (("a", 64), ("b", 56)):
        d = out / name
        assert recs[name]["status"] == "done" and recs[name]["timings"]["deblur_s"] > 0
        assert outputs.is_complete(d)
        assert not (d / "defocus_map.tif").exists() and not (d / "defocus_map.png").exists()
        result = json.loads((d / "result.json").read_text())
        assert result["method"] == "dpanet" and result["dpanet"]["step"] == 5
        assert result["output_files"] == ["all_in_focus.tif", "all_in_focus.png", "result.json"]
        assert tifffile.imread(d / "all_in_focus.tif").shape == (h, 64)
        assert (d / "thumb_all_in_focus.png").is_file()
    assert 'src="a/thumb_all_in_focus.png"' in (out / "index.html").read_text()

    # Complete DPANet results are kept; the MPI solver solves such a folder again (another
    # method is another setting), and a re-solve that fails leaves the old result intact.
    before = (out / "a" / "result.json").stat().st_mtime_ns
    (inp / "c_left.tif").unlink()
    assert run_solver.run_batch(opts) == 0
    assert {r["status"] for r in json.loads((out / "summary.json").read_text())["scenes"]} == {
        "skipped"}
    assert (out / "a" / "result.json").stat().st_mtime_ns == before
    mpi_opts = _runner_opts(inp, out, scenes=("a",), grid=(2, 2), kernel_radius=3.0,
                            memory_budget_gb=0.001)
    assert run_solver.run_batch(mpi_opts) == 1
    recs = {r["scene"]: r for r in json.loads((out / "summary.json").read_text())["scenes"]}
    assert recs["a"]["error"] == "memory" and "method dpanet -> mpi" in recs["a"][
        "resolved_because"]
    assert recs["b"]["status"] == "kept"
    assert (out / "a" / "result.json").stat().st_mtime_ns == before


def test_run_solver_dpanet_setup_errors(tmp_path, monkeypatch):
    _write_pair(tmp_path / "in", "a", _views(64, 64))

    opts = _runner_opts(tmp_path / "in", tmp_path / "out", method="dpanet",
                        dpanet_checkpoint=tmp_path / "none")
    assert run_solver.run_batch(opts) == 2
    monkeypatch.setattr(runner, "DEFAULT_DPANET_CHECKPOINT", tmp_path / "absent")
    with pytest.raises(runner.SetupError, match="train_dpanet.py"):
        runner._load_dpanet(dataclasses.replace(opts, dpanet_checkpoint=None))
    proc = subprocess.run([sys.executable, str(ROOT / "run_solver.py"), "--method=dpanet"],
                          check=False, capture_output=True, text=True, timeout=120,
                          cwd=tmp_path)
    assert proc.returncode != 0 and "--method need(s) --input_dir" in proc.stderr


# ----------------------------------------------------------------- the committed checkpoint

COMMITTED = ROOT / "experiments" / "checkpoints" / "dpanet_w8"


def test_committed_checkpoint_deblurs_a_held_out_scene(pixel4_dir):
    """The shipped width-8 model loads as documented and sharpens the central 2x2 tiles of
    scene 011 (held out from its training): measured 32.65 -> 34.30 dB; asked +0.5 dB."""
    params, config = dpanet.load_model(COMMITTED)
    assert (config.width, config.channels) == (8, 1)
    assert sum(x.size for x in jax.tree_util.tree_leaves(params)) == 1_267_969
    train_scenes = json.loads((COMMITTED / "run_config.json").read_text())["data"]["train_scenes"]
    assert "011" not in train_scenes

    scene = io.load_pixel4_scene(pixel4_dir, "011", require_gt=True)
    ys, xs = slice(336, 672), slice(504, 840)  # tile rows 2-3, columns 3-4 of 6x8
    views = scene.views[:, ys, xs]
    views = views / views.max()
    gt = scene.gt_all_in_focus[ys, xs]
    out = np.asarray(dpanet.deblur_tiled(params, config, views))
    assert out.shape == views.shape[1:] and np.all(np.isfinite(out))
    before = pipeline.score(views.mean(axis=0), None, gt_all_in_focus=gt)["psnr"]
    after = pipeline.score(out, None, gt_all_in_focus=gt)["psnr"]
    assert after > before + 0.5, (before, after)
