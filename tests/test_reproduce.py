"""Presets, classical baselines and experiments/reproduce_table.py end to end."""

import csv
import dataclasses
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile

import dpjax
from dpjax import io, outputs, presets, runner, scene
from dpjax import reproduce as rt

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "experiments" / "reproduce_table.py"
# The in-process runs that test what feeds the solve (range, start), not the solve: one
# small configuration, so that they share one set of compiled programs (compilation is
# most of their time; the end-to-end run keeps the defaults' shape).
SMALL_SOLVE = {"level_iters": (2,), "num_layers": 4, "refine_iters": 0}


@pytest.fixture(scope="module")
def bank():
    """2x2 tiles of 64x80 px, parametric DP pair of radius 8 px (base disparity ~7 px)."""
    return dpjax.parametric_bank(rows=2, cols=2, tile_h=64, tile_w=80, radius=8.0)


# ----------------------------------------------------------------------------- the script


def _tiny_dataset(tmp_path, pixel4_dir, *, calibration=True, gt=True, sid="011", as_sid=None):
    """A dataset folder of symlinks to one shared scene (named as_sid), optionally missing
    parts."""
    d = tmp_path / "data"
    d.mkdir()
    name = as_sid or sid
    for side in ("left", "right"):
        (d / f"{name}_{side}.png").symlink_to(pixel4_dir / f"{sid}_{side}.png")
    if calibration:
        (d / "calibration").symlink_to(pixel4_dir / "calibration")
    if gt:
        for sub in ("gt_all_in_focus_im", "gt_defocus_map"):
            (d / sub).mkdir()
            (d / sub / f"{name}_gt.png").symlink_to(pixel4_dir / sub / f"{sid}_gt.png")
    return d


def test_script_missing_calibration_is_clear(tmp_path, pixel4_dir):
    data = _tiny_dataset(tmp_path, pixel4_dir, calibration=False)
    opts = rt.Options(data_dir=data, output_dir=tmp_path / "out", crop=(1, 1))
    with pytest.raises(scene.SetupError, match="calibration file not found"):
        rt.run(opts)
    assert not (tmp_path / "out").exists()  # failed before any work


def test_script_missing_ground_truth_is_clear(tmp_path, pixel4_dir):
    data = _tiny_dataset(tmp_path, pixel4_dir, gt=False)
    opts = rt.Options(data_dir=data, output_dir=tmp_path / "out", crop=(1, 1))
    with pytest.raises(io.MissingFileError, match="no scene in .* has ground truth"):
        rt.run(opts)
    with pytest.raises(io.MissingFileError, match="011: ground truth not found"):
        rt.run(dataclasses.replace(opts, scenes=("011",)))
    with pytest.raises(io.MissingFileError, match="012: no 012_left.png"):
        rt.run(dataclasses.replace(opts, scenes=("012",)))
    assert not (tmp_path / "out").exists()


def test_script_rejects_dpanet_unknown_methods_and_bad_crop(tmp_path, pixel4_dir):
    base = rt.Options(data_dir=pixel4_dir, output_dir=tmp_path / "out", scenes=("011",))
    with pytest.raises(FileNotFoundError, match="DPANet checkpoint not found"):
        rt.run(dataclasses.replace(base, methods=("mpi", "dpanet"),
                                   dpanet_checkpoint=tmp_path / "no_such_run"))
    with pytest.raises(ValueError, match="unknown methods"):
        rt.run(dataclasses.replace(base, methods=("dpjax",)))  # the old name is gone
    with pytest.raises(scene.SetupError, match="does not fit"):
        rt.run(dataclasses.replace(base, crop=(7, 1)))
    with pytest.raises(ValueError, match="prior_encoding: unknown encoding 'log'"):
        rt.run(dataclasses.replace(base, prior_encoding="log"))
    data = _tiny_dataset(tmp_path, pixel4_dir, as_sid="099")
    with pytest.raises(ValueError, match="no paper settings"):
        rt.run(dataclasses.replace(base, data_dir=data, preset="paper", scenes=None))
    assert not (tmp_path / "out").exists()


def test_script_wiener_needs_mpi(tmp_path, pixel4_dir):
    opts = rt.Options(data_dir=pixel4_dir, output_dir=tmp_path / "out", scenes=("011",),
                      methods=("wiener",), crop=(1, 1))
    with pytest.raises(FileNotFoundError, match="include mpi in --methods"):
        rt.run(opts)


def test_registry_order_puts_readers_after_their_sources():
    assert rt.run_order(("wiener", "input", "mpi")) == ("mpi", "input", "wiener")
    assert rt.run_order(("dpanet", "wiener", "dp_stereo", "mpi"))[:1] == ("mpi",)
    assert rt.run_order(("wiener",)) == ("wiener",)  # its source's result must exist
    assert rt.METHODS["wiener"].reads == ("mpi",) and not rt.METHODS["wiener"].defocus
    assert rt.METHODS["mpi"].defocus and rt.METHODS["dp_stereo"].defocus

    def noop(sc):
        raise AssertionError("not run")

    # A reader listed before its source in the registry still runs after it.
    registry = {"b": rt.Method(run=noop, defocus=False, reads=("a",)),
                "c": rt.Method(run=noop, defocus=False),
                "a": rt.Method(run=noop, defocus=True)}
    assert rt.run_order(("c", "b", "a"), registry) == ("a", "b", "c")
    cyclic = {**registry, "a": rt.Method(run=noop, defocus=True, reads=("b",))}
    with pytest.raises(ValueError, match="read each other"):
        rt.run_order(("a", "b"), cyclic)
    with pytest.raises(ValueError, match="unknown methods"):
        rt.run_order(("magic",))


def test_num_iters_is_the_finest_level_and_excludes_level_iters(tmp_path, pixel4_dir):
    solver = rt.Options(num_iters=7).base_config().solver
    assert solver.pyramid_levels == 3
    assert solver.level_iters == dpjax.config.FAST_LEVEL_ITERS[:-1] + (7,)
    assert rt.Options().base_config().solver.level_iters == dpjax.config.FAST_LEVEL_ITERS
    assert rt.Options(kernel_mass_cut=0.0).base_config().solver.kernel_mass_cut == 0.0
    assert (rt.Options().base_config().solver.kernel_mass_cut
            == dpjax.SolverConfig().kernel_mass_cut)
    with pytest.raises(ValueError, match="kernel_mass_cut must be in"):
        rt.Options(kernel_mass_cut=1.5).base_config()
    opts = rt.Options(data_dir=pixel4_dir, output_dir=tmp_path / "out", scenes=("011",),
                      crop=(1, 1), num_iters=7, level_iters=(4, 2, 2))
    with pytest.raises(ValueError, match="not both"):
        rt.run(opts)
    assert not (tmp_path / "out").exists()
    # The command line: the same flags, the same meaning (dpjax_apps.flags).
    code = ("import sys; sys.argv = ['reproduce_table']; import reproduce_table as app; "
            "from absl import flags; flags.FLAGS(sys.argv + %r); "
            "o = app.options_from_flags(); print(o.base_config().solver.level_iters, o.crop)")
    env = {**os.environ, "PYTHONPATH": f"{ROOT}:{ROOT / 'experiments'}"}
    proc = subprocess.run([sys.executable, "-c", code % (["--num_iters=7", "--crop=full"],)],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split("\n")[-2] == "(200, 120, 7) None"
    proc = subprocess.run([sys.executable, "-c", code % (["--num_iters=7",
                                                          "--level_iters=4,2,2"],)],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode != 0 and "not both" in proc.stderr
    proc = subprocess.run([sys.executable, "-c", code % (["--quality=best"],)],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split("\n")[-2] == f"{dpjax.config.BEST_LEVEL_ITERS} None"


def _fake_result(d, fp, **fields):
    outputs.write_result(d, all_in_focus=np.ones((4, 4)), defocus=np.ones((4, 4)),
                         result={"fingerprint": fp, **fields})


def _recorder():
    """A `dpjax.reproduce.Log` keeping (level, message) pairs, and those pairs."""
    lines: list[tuple[int, str]] = []
    return (lambda level, msg: lines.append((level, msg))), lines


def _warned(lines, text: str) -> bool:
    return any(level == logging.WARNING and text in msg for level, msg in lines)


def test_changed_settings_are_solved_again_with_the_reason(tmp_path, pixel4_dir):
    out = tmp_path / "out"
    opts = rt.Options(data_dir=pixel4_dir, output_dir=out, scenes=("011",), crop=(1, 1),
                      methods=("mpi", "wiener"))
    log, lines = _recorder()
    run = rt.prepare_run(opts, log)
    pair = run.pairs["011"]
    fp = rt.fingerprint(run, "mpi", pair)
    assert fp["config"]["post"]["defocus"] == "sharpened"  # the auto preset's
    assert fp["config"]["init"]["search"] is True and fp["preset"] == "auto"
    _fake_result(out / "mpi" / "011", fp, config=fp["config"])
    assert not rt._needs_solve(run, "mpi", "011", fp)  # same settings: kept
    assert rt._needs_solve(dataclasses.replace(run, opts=dataclasses.replace(
        opts, overwrite=True)), "mpi", "011", fp)

    # Another estimator, start or schedule: solved again, the log says why.
    for change, why in ((dict(defocus_estimator="mean"), "post.defocus sharpened -> mean"),
                        (dict(search_init=False), "init.search true -> false"),
                        (dict(num_iters=7), "solver.level_iters")):
        other = rt.prepare_run(dataclasses.replace(opts, **change), log)
        lines.clear()
        assert rt._needs_solve(other, "mpi", "011", rt.fingerprint(other, "mpi", pair))
        assert _warned(lines, f"mpi/011: solving again, settings changed: {why}")
    # A result of an older version (no fingerprint) is solved again too.
    _fake_result(out / "mpi" / "011", None)
    assert rt._needs_solve(run, "mpi", "011", fp)
    assert _warned(lines, "no settings fingerprint")

    # wiener's fingerprint holds the fingerprint of the mpi result it reads.
    _fake_result(out / "mpi" / "011", fp)
    w = rt.fingerprint(run, "wiener", pair)
    assert w["reads"] == {"mpi": fp["digest"]}
    _fake_result(out / "mpi" / "011", {**fp, "digest": "another"})
    assert rt.fingerprint(run, "wiener", pair)["digest"] != w["digest"]


def test_changed_crop_resolves_input_end_to_end(tmp_path, pixel4_dir):
    out = tmp_path / "out"
    opts = rt.Options(data_dir=pixel4_dir, output_dir=out, scenes=("011",), crop=(1, 1),
                      methods=("input",), quiet=True)
    rows = rt.run(opts)
    path = out / "input" / "011" / "result.json"
    first = json.loads(path.read_text())
    assert first["crop"] == "1x1" and first["fingerprint"]["preprocessing"]["crop_tiles"] == [1, 1]
    stamp = path.stat().st_mtime_ns
    assert rt.run(opts) == rows and path.stat().st_mtime_ns == stamp  # kept
    log, lines = _recorder()
    rt.run(dataclasses.replace(opts, crop=(1, 2)), log)
    assert _warned(lines, "input/011: solving again, settings changed: preprocessing.crop_tiles")
    assert any("wrote" in msg and "table.md" in msg for _, msg in lines)
    assert tifffile.imread(out / "input" / "011" / "all_in_focus.tif").shape == (168, 336)
    assert not (out / runner.LOCK_FILE).exists()  # the lock is released


@pytest.mark.slow
def test_reproduce_table_end_to_end(tmp_path, pixel4_dir):
    out = tmp_path / "out"
    cmd = [sys.executable, str(SCRIPT), f"--data_dir={pixel4_dir}", "--scenes=011",
           "--crop=1x1", "--level_iters=12,4,2", f"--output_dir={out}", "--quiet"]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=600,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]

    results = {}
    for method in ("mpi", "input", "wiener", "dp_stereo"):
        d = out / method / "011"
        result = json.loads((d / "result.json").read_text())
        results[method] = result
        m = result["metrics"]
        assert set(m) >= {"aiwe1", "aiwe2", "spearman", "psnr", "ssim", "mae"}
        assert np.isfinite([m["psnr"], m["ssim"], m["mae"]]).all()
        assert 10 < m["psnr"] < 60 and 0 < m["ssim"] <= 1
        assert (d / "all_in_focus.tif").is_file() and (d / "all_in_focus.png").is_file()
        assert result["wall_s"] >= 0 and result["fingerprint"]["method"] == method
        has_defocus = method in ("mpi", "dp_stereo")
        assert (d / "defocus_map.tif").is_file() == has_defocus
        if has_defocus:
            assert 0 <= m["aiwe1"] < 1 and 0 <= m["spearman"] <= 1
            assert m["aiwe1"] > 0  # the crop has varying ground truth
        else:
            assert m["aiwe1"] is None
    dp = results["mpi"]
    assert dp["config"]["solver"]["level_iters"] == [12, 4, 2]
    # The Pixel 4's raw pairs are linear: fitted with L-BFGS, as the table's header says.
    assert dp["config"]["solver"]["optimizer"] == "lbfgs"
    assert dp["preset"]["name"] == "auto"
    assert dp["config"]["loss"]["alpha_tv"] == presets.AUTO_ALPHA_TV
    lo, hi = dp["preset"]["scale_range"]
    assert dp["config"]["mpi"]["scale_min"] == lo and dp["config"]["mpi"]["scale_max"] == hi
    assert results["wiener"]["scales"] == pytest.approx(
        np.linspace(hi, lo, dp["config"]["mpi"]["num_layers"]).tolist(), abs=1e-6)
    assert results["wiener"]["fingerprint"]["reads"] == {"mpi": dp["fingerprint"]["digest"]}

    with open(out / "table.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [(r["method"], r["scene"]) for r in rows] == [
        (m, s) for m in ("mpi", "input", "dp_stereo", "wiener") for s in ("011", "mean")]
    assert rows[0]["psnr"] == rows[1]["psnr"] != ""
    assert rows[2]["aiwe1"] == ""  # input: no defocus map
    table = (out / "table.md").read_text()
    assert "AIWE(1)" in table and "| **mpi** | **mean** |" in table
    assert ("adam, pyramid_levels=3, level_iters=12,4,2 (lbfgs, pyramid_levels=3, "
            "level_iters=12,4,2 for linear input)") in table

    # A second run keeps complete results with the same settings (no --overwrite).
    stamp = (out / "mpi" / "011" / "result.json").stat().st_mtime_ns
    proc = subprocess.run(cmd + ["--methods=mpi,input"], check=False, capture_output=True,
                          text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "mpi" / "011" / "result.json").stat().st_mtime_ns == stamp


def test_range_probe_serves_mpi_only(tmp_path, pixel4_dir):
    out = tmp_path / "out"
    rt.run(rt.Options(data_dir=pixel4_dir, output_dir=out, scenes=("011",), crop=(1, 1),
                      methods=("mpi", "dp_stereo"), range_probe=True, quiet=True,
                      **SMALL_SOLVE))
    dp = json.loads((out / "mpi" / "011" / "result.json").read_text())["preset"]
    st = json.loads((out / "dp_stereo" / "011" / "result.json").read_text())
    probe, search = dp["range_estimate"], st["preset"]["range_estimate"]
    assert probe["probe_iters"] == presets.PROBE_ITERS and probe["probe_range"] is not None
    assert probe["search_range"] == [search["s_min"], search["s_max"]]
    assert search["probe_range"] is None  # the classical baseline never sees the solver
    assert dp["scale_range"] == [probe["s_min"], probe["s_max"]]
    assert st["candidates"][0] == pytest.approx(search["s_min"])
    assert st["candidates"][-1] == pytest.approx(search["s_max"])


def test_search_init_is_recorded_and_shared(tmp_path, pixel4_dir,
                                            monkeypatch):
    out = tmp_path / "out"
    calls = []
    search = presets.search_defocus
    monkeypatch.setattr(presets, "search_defocus", lambda *a: calls.append(1) or search(*a))
    opts = rt.Options(data_dir=pixel4_dir, output_dir=out, scenes=("011",), crop=(1, 1),
                      methods=("mpi", "dp_stereo"), quiet=True, **SMALL_SOLVE)
    assert opts.preset == "auto" and opts.search_init is None  # on: the auto preset's default
    rt.run(opts)
    assert len(calls) == 1  # one search: the range of both methods and the start
    dp = json.loads((out / "mpi" / "011" / "result.json").read_text())
    st = json.loads((out / "dp_stereo" / "011" / "result.json").read_text())
    si = dp["search_init"]
    assert si["weight"] == dpjax.config.InitConfig().weight and si["factor"] in (1, 2)
    assert 0 < si["confident_fraction"] <= 1 and si["search_s"] > 0
    assert dp["config"]["init"]["search"] is True
    assert dp["preset"]["range_estimate"] == st["preset"]["range_estimate"]
    assert dp["timings"]["start_s"] >= si["search_s"]
    assert st["timings"]["start_s"] >= si["search_s"]  # the search counts for both
    assert np.all(np.isfinite(tifffile.imread(out / "mpi" / "011" / "defocus_map.tif")))


def test_recorded_blur_scales_the_shared_range_search(tmp_path, pixel4_dir, monkeypatch):
    # A calibration that records its photos' blur: the start searches the grid as
    # developed, the range the scaled grid, once for both methods.
    data = _tiny_dataset(tmp_path, pixel4_dir, calibration=False)
    (data / "calibration").mkdir()
    for f in (pixel4_dir / "calibration").iterdir():
        (data / "calibration" / f.name).symlink_to(f)
    span = 1.25
    (data / "calibration" / io.KERNELS_META).write_text(
        json.dumps({"grid": list(io.PIXEL4_GRID), "tile_size": io.PIXEL4_TILE,
                    "blur_p90": presets.DEVELOPED_BLUR_P90 * span}))
    spans = []
    search = presets.search_defocus

    def counted(*a, **k):
        found = search(*a, **k)
        spans.append(found.span)
        return found

    monkeypatch.setattr(presets, "search_defocus", counted)
    out = tmp_path / "out"
    rt.run(rt.Options(data_dir=data, output_dir=out, scenes=("011",), crop=(1, 1),
                      methods=("mpi", "dp_stereo"), quiet=True, **SMALL_SOLVE))
    assert sorted(spans) == pytest.approx([1.0, span])
    dp = json.loads((out / "mpi" / "011" / "result.json").read_text())
    st = json.loads((out / "dp_stereo" / "011" / "result.json").read_text())
    assert dp["preset"]["search_span"] == st["preset"]["search_span"] == pytest.approx(span)
    assert dp["preset"]["range_estimate"] == st["preset"]["range_estimate"]
    assert dp["search_init"]["search_s"] > 0


def test_cli_error_message_for_missing_ground_truth(tmp_path, pixel4_dir):
    data = _tiny_dataset(tmp_path, pixel4_dir, gt=False)
    proc = subprocess.run([sys.executable, str(SCRIPT), f"--data_dir={data}", "--crop=1x1",
                           "--scenes=11", f"--output_dir={tmp_path / 'out'}"], check=False,
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 1
    assert "error: scene 011: ground truth not found" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_cli_refuses_flags_it_would_ignore_or_cannot_read(tmp_path):
    for flag, why in (("--input_encoding=srgb", "--input_encoding is not read here"),
                      ("--prior_encoding=log", "--prior_encoding: unknown encoding 'log'")):
        proc = subprocess.run([sys.executable, str(SCRIPT), flag,
                               f"--output_dir={tmp_path / 'out'}"], check=False,
                              capture_output=True, text=True, timeout=300, cwd=tmp_path)
        assert proc.returncode != 0 and why in proc.stderr, proc.stderr
    assert not (tmp_path / "out").exists()
