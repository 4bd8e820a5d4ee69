"""experiments/kernel_family_bound.py: fitting the kernel model to given kernels."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from dpjax import io, kernel_model

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))
import kernel_family_bound as kfb  # noqa: E402

TRUE = kernel_model.DpKernelModel(radius=6.0, angle_deg=3.0, split_gradient=-0.5,
                                  softness=0.2, ramp=0.3, smooth=0.12)


def _target(model, rows=2, cols=3, size=21):
    k = kernel_model.render_kernel_pairs(model, rows=rows, cols=cols, size=size)
    return k / k.sum(axis=(-2, -1), keepdims=True)


def test_fit_recovers_a_model_member_from_a_different_start():
    target = _target(TRUE)
    start_l1 = float(kfb.family_l1(
        {k: np.float32(v) for k, v in kfb.START.to_dict().items() if k != "radius"},
        target, kernel_model.tile_positions(2, 3), np.float32(6.0)))
    model, l1 = kfb.fit_shape(target, 2, 3, 6.0, steps=300, lr=0.02)
    assert start_l1 > 0.3 and l1 < 0.1 * start_l1, (start_l1, l1)
    assert abs(model.angle_deg - TRUE.angle_deg) < 1.5
    assert abs(model.ramp - TRUE.ramp) < 0.15 and abs(model.smooth - TRUE.smooth) < 0.05


def test_script_writes_a_loadable_calibration(tmp_path):
    cal = tmp_path / "cal"
    io.save_calibration_kernels(cal, io.CalibratedKernels(kernels=_target(TRUE), grid=(2, 3),
                                                          tile_size=32))
    out = tmp_path / "bound"
    subprocess.run([sys.executable, str(ROOT / "experiments/kernel_family_bound.py"),
                    f"--calib_dir={cal}", f"--output_dir={out}", "--radii=5,6",
                    "--steps=150"], check=True, capture_output=True, cwd=ROOT)
    got = io.load_calibration_kernels(out)
    assert got.grid == (2, 3) and got.tile_size == 32 and got.kernels.shape == (2, 6, 21, 21)
    report = json.loads((out / "family_fit.json").read_text())
    assert [f["radius"] for f in report["fits"]] == [5.0, 6.0]
    assert report["best"]["radius"] == 6.0  # the true radius fits best
    assert report["l1_rendered"] < 0.2
