"""experiments/tile_average_kernels.py: kernels averaged over neighbouring tiles."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dpjax import io

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))
import tile_average_kernels as tak  # noqa: E402


def _kernels(rows=2, cols=3, size=5, seed=0):
    k = np.random.default_rng(seed).random((2, rows * cols, size, size)) + 0.01
    return (k / k.sum(axis=(-2, -1), keepdims=True)).astype(np.float32)


def test_neighbourhoods_average_the_right_tiles():
    k = _kernels()
    np.testing.assert_allclose(tak.tile_average(k, (2, 3), 0), k, atol=1e-6)
    one = tak.tile_average(k, (2, 3), 1)
    g = k.reshape(2, 2, 3, 5, 5).astype(np.float64)
    corner = g[:, :, :2].mean(axis=(1, 2))  # tile (0, 0): rows 0-1, columns 0-1
    middle = g.mean(axis=(1, 2))  # tile (0, 1): every tile of the 2x3 grid
    np.testing.assert_allclose(one[:, 0], corner / corner.sum(axis=(-2, -1), keepdims=True),
                               atol=1e-6)
    np.testing.assert_allclose(one[:, 1], middle / middle.sum(axis=(-2, -1), keepdims=True),
                               atol=1e-6)
    every = tak.tile_average(k, (2, 3), None)
    assert np.allclose(every, every[:, :1]) and not np.allclose(one, one[:, :1])
    np.testing.assert_allclose(every.sum(axis=(-2, -1)), 1.0, atol=1e-5)
    with pytest.raises(ValueError, match="must be"):
        tak.tile_average(k, (3, 3), 1)


def test_script_writes_a_calibration_and_refuses_bad_input(tmp_path):
    src, out = tmp_path / "cal", tmp_path / "avg"
    io.save_calibration_kernels(src, io.CalibratedKernels(kernels=_kernels(), grid=(2, 3),
                                                          tile_size=16, blur_p90=1.1))
    for name in (io.WHITE_LEFT, io.WHITE_RIGHT):
        (src / name).write_bytes(name.encode())  # copied as they are, not read
    script = [sys.executable, str(ROOT / "experiments" / "tile_average_kernels.py"),
              f"--calib_dir={src}"]
    proc = subprocess.run(script + [f"--output_dir={out}", "--neighbourhood=all"],
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    calib = io.load_calibration_kernels(out)
    assert calib.grid == (2, 3) and calib.tile_size == 16 and calib.blur_p90 == 1.1
    np.testing.assert_allclose(calib.kernels, tak.tile_average(_kernels(), (2, 3), None),
                               atol=1e-6)
    for name in (io.WHITE_LEFT, io.WHITE_RIGHT):
        assert (out / name).read_bytes() == name.encode()
    meta = json.loads((out / "kernels_meta.json").read_text())
    assert meta["tile_average"]["neighbourhood"] == "all"
    for bad, message in (("-1", ">= 0"), ("x", "integer >= 0 or 'all'")):
        proc = subprocess.run(script + [f"--output_dir={tmp_path / 'bad'}",
                                        f"--neighbourhood={bad}"],
                              capture_output=True, text=True, timeout=120, check=False)
        assert proc.returncode != 0 and message in proc.stderr
        assert not (tmp_path / "bad").exists()
    proc = subprocess.run(script + [f"--output_dir={src}"], capture_output=True, text=True,
                          timeout=120, check=False)
    assert proc.returncode != 0 and "must differ" in proc.stderr
    assert io.load_calibration_kernels(src).blur_p90 == 1.1  # untouched
