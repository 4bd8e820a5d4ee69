"""experiments/refine_visual.py: the side-by-side crops it writes (it once broke unnoticed)."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image

from dpjax import reproduce as rt

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "experiments" / "refine_visual.py"


def test_panels_are_the_runs_aligned_to_the_ground_truth(tmp_path, pixel4_dir):
    run = rt.prepare_run(rt.Options(data_dir=pixel4_dir, crop=(1, 2), scenes=("001",),
                                    methods=("input",), output_dir=tmp_path / "unused"))
    _, _, gt, _, _ = rt.load_scene(run, run.pairs["001"])
    gt = np.asarray(gt, np.float32)
    h, w = gt.shape[:2]
    # Run "same": the ground truth itself, with a defocus map stepping at column w // 2.
    same = tmp_path / "same" / "001"
    same.mkdir(parents=True)
    tifffile.imwrite(same / "all_in_focus.tif", gt[..., None])
    dmap = np.where(np.arange(w)[None] < w // 2, 0.2, 1.2) * np.ones((h, 1))
    tifffile.imwrite(same / "defocus_map.tif", dmap.astype(np.float32))
    # Run "flat": a constant image (aligned by the affine fit to the ground truth's mean).
    flat = tmp_path / "flat" / "001"
    flat.mkdir(parents=True)
    tifffile.imwrite(flat / "all_in_focus.tif", np.full((h, w, 1), 0.3, np.float32))
    out = tmp_path / "visual.png"
    size, zoom = 64, 2
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--scene=001", "--crop=1x2", f"--data_dir={pixel4_dir}",
         f"--runs=same={same.parent},flat={flat.parent}", f"--size={size}", f"--zoom={zoom}",
         f"--output={out}"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    img = np.asarray(Image.open(out))
    # Three panels (two runs, then the ground truth) with 4-px gaps, enlarged zoom times.
    assert img.shape[:2] == (size * zoom, (3 * size + 2 * 4) * zoom)
    step = (size + 4) * zoom
    panel = [img[:, i * step:i * step + size * zoom] for i in range(3)]
    # The ground truth run's panel is the ground truth's panel (same window, same scale).
    assert np.abs(panel[0].astype(int) - panel[2].astype(int)).max() <= 1
    assert panel[2].std() > 5  # a textured window, not an empty one
    assert panel[1].std() < 1  # the constant run stays constant
    # The window was placed on the defocus step (the log names its centre).
    assert "window centre" in proc.stderr
    cx = int(proc.stderr.split("window centre (y, x) = (")[1].split(")")[0].split(", ")[1])
    assert abs(cx - w // 2) <= size
    # A scene without a pair or ground truth is one clear line, not a traceback.
    bad = subprocess.run(
        [sys.executable, str(SCRIPT), "--scene=999", "--crop=1x2", f"--data_dir={pixel4_dir}",
         f"--runs=same={same.parent}", f"--output={tmp_path / 'bad.png'}"],
        capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert bad.returncode == 1
    assert "refine_visual: error: scene 999" in bad.stderr
    assert "Traceback" not in bad.stderr
    assert not (tmp_path / "bad.png").exists()
