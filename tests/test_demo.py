"""The demo entry point end to end, at a reduced iteration count."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_demo_writes_outputs_and_beats_input(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "run_solver.py"), f"--output_dir={out}", "--num_iters=20",
         "--quiet"], capture_output=True, text=True, timeout=900, cwd=tmp_path, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    demo = out / "demo"
    for name in ("all_in_focus.tif", "defocus_map.tif", "all_in_focus.png", "defocus_map.png",
                 "result.json"):
        assert (demo / name).is_file(), name
    result = json.loads((demo / "result.json").read_text())
    m, i = result["metrics"], result["input_metrics"]
    assert set(m) >= {"aiwe1", "aiwe2", "spearman", "psnr", "ssim", "mae"}
    assert set(i) == {"psnr", "ssim", "mae"}
    assert result["config"]["solver"]["num_iters"] == 20
    assert m["psnr"] > i["psnr"]
    assert m["mae"] < i["mae"]
    assert "demo:" in proc.stdout
