"""experiments/own_camera.py: depth scores split by texture, end to end on a run folder."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))
import own_camera  # noqa: E402


def _scene(rng, h=96, w=128):
    """A left half of noise texture and a flat right half; inverse depth a vertical
    ramp; a defocus map that follows the ramp on the left and is noise on the right."""
    image = np.full((h, w, 3), 0.5, np.float32)
    image[:, : w // 2] += 0.3 * rng.standard_normal((h, w // 2, 1)).astype(np.float32)
    image = np.clip(image, 0.01, 1.0)
    inv = np.repeat(np.linspace(0.5, 2.0, h)[:, None], w, axis=1)
    defocus = (1.5 - inv).astype(np.float32)
    defocus[:, w // 2:] = rng.standard_normal((h, w - w // 2)).astype(np.float32)
    return image, inv, defocus


def test_texture_split_scores_the_textured_and_the_flat_half_apart():
    image, inv, defocus = _scene(np.random.default_rng(0))
    valid = np.ones(inv.shape, bool)
    got = own_camera.texture_split_scores(defocus, image, inv, valid)
    assert got["one_minus_abs_rho_s_textured"] < 0.05  # the ramp, up to the boundary
    assert got["one_minus_abs_rho_s_untextured"] > 0.8  # noise against the ramp
    # The whole map sits between the two.
    whole = own_camera.depth_scores(defocus, inv, valid)["one_minus_abs_rho_s"]
    assert got["one_minus_abs_rho_s_textured"] < whole < got["one_minus_abs_rho_s_untextured"]


def test_depth_results_carry_the_split(tmp_path):
    image, inv, defocus = _scene(np.random.default_rng(1))
    depth_mm = np.round(1000.0 / inv).astype(np.uint16)
    canon = tmp_path / "canon"
    (canon / "casual" / "orbbec" / "001").mkdir(parents=True)
    Image.fromarray(depth_mm).save(canon / "casual" / "orbbec" / "001" / "d.png")
    run = tmp_path / "run" / "001"
    run.mkdir(parents=True)
    tifffile.imwrite(run / "defocus_map.tif", defocus)
    tifffile.imwrite(run / "all_in_focus.tif", image, photometric="rgb")
    (run / "result.json").write_text(json.dumps(
        {"output_files": ["defocus_map.tif", "all_in_focus.tif"],
         "timings": {"wall_s": 1.0}}))
    out = tmp_path / "scores.json"
    proc = subprocess.run([sys.executable, str(ROOT / "experiments" / "own_camera.py"),
                           f"--canon_dir={canon}", f"--results=r={tmp_path / 'run'}",
                           "--stereo=", f"--output={out}"],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    row = json.loads(out.read_text())["depth"]["r"]["001"]
    assert row["one_minus_abs_rho_s_textured"] < 0.05
    assert row["one_minus_abs_rho_s_untextured"] > 0.8
    assert "| r | 1 |" in proc.stdout
