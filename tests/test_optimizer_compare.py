"""experiments/optimizer_compare.py: schedules parsed, solved and scored per scene."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))
import optimizer_compare  # noqa: E402


def test_parse_runs():
    assert optimizer_compare.parse_runs("a:adam:200,120,20,b:lbfgs:1,2,3") == {
        "a": ("adam", (200, 120, 20)), "b": ("lbfgs", (1, 2, 3))}
    assert optimizer_compare.parse_runs("a:adam:5,b:lbfgs:6,7") == {
        "a": ("adam", (5,)), "b": ("lbfgs", (6, 7))}
    for bad in ("", "1,a:adam:2", "a:200,120,20", "a:adam:x,1,2", "a:adam:", ":adam:1",
                "a:adam:1,a:lbfgs:2", "a:adam:1,b:c"):
        with pytest.raises(ValueError):
            optimizer_compare.parse_runs(bad)


def _run(args, tmp_path):
    return subprocess.run([sys.executable, str(ROOT / "experiments" / "optimizer_compare.py"),
                           *args], capture_output=True, text=True, cwd=ROOT, timeout=600)


def test_unknown_optimizer_is_refused_before_any_work(tmp_path):
    proc = _run(["--schedules=a:sgd:1,1,1"], tmp_path)
    assert proc.returncode != 0
    assert "unknown optimizer 'sgd'" in proc.stderr


def test_solves_and_scores_each_schedule(tmp_path, pixel4_dir):
    out = tmp_path / "rows.jsonl"
    proc = _run([f"--data_dir={pixel4_dir}", "--scenes=008", "--crop=1x1",
                 "--schedules=a:adam:2,l:lbfgs:2", f"--jsonl={out}"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["run"], r["optimizer"]) for r in rows] == [("a", "adam"), ("l", "lbfgs")]
    for r in rows:
        assert r["scene"] == "008" and r["level_iterations"] == [2]
        assert r["seconds"] > 0 and r["objective"] > 0
        assert 15 < r["psnr"] < 50 and 0 < r["aiwe1"] < 1 and 0 <= r["ssim"] <= 1
        assert 15 < r["wiener_psnr"] < 50
    # Two different optimisers from the same start end at different objectives.
    assert rows[0]["objective"] != rows[1]["objective"]
    assert proc.stdout.strip().splitlines() == out.read_text().strip().splitlines()
