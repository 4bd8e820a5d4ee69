"""A visual check of all-in-focus images around an occlusion edge, side by side.

  python experiments/refine_visual.py --scene=001 --crop=3x4 \
      --runs=input=out/off/input,wiener=out/off/wiener,dpjax=out/off/dpjax,refined=out/on/dpjax \
      --output=experiments/results/refine_visual_001.png

Each run is LABEL=FOLDER, FOLDER holding <scene>/all_in_focus.tif as
experiments/reproduce_table.py writes it (OUTPUT_DIR/<method>). Every image is aligned
to the ground truth as the metrics align it (`dpjax.metrics.align_image`: translation
search and affine intensity fit), so the panels share one intensity scale; the last
panel is the ground truth. The window (--size px, shown --zoom times enlarged with
nearest-neighbour pixels) is centred where the defocus map of --edge_from (a run
label whose folder has defocus_map.tif; default the first such run) changes most over
a few pixels while the ground truth is textured: an occlusion edge between depths.
--center=Y,X places it by hand instead. A row of labels is not drawn: the panel order
is the order of --runs, then the ground truth, and the log says it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from absl import app, flags, logging

from dpjax import io, metrics, scene
from dpjax import reproduce as rt
from dpjax_apps.flags import parse_named, parse_rxc

FLAGS = flags.FLAGS
flags.DEFINE_string("scene", "001", "Scene id.")
flags.DEFINE_string("data_dir", str(rt.DEFAULT_DATA_DIR), "Pixel 4 dataset folder.")
flags.DEFINE_string("crop", "full", "The --crop the runs were made with.")
flags.DEFINE_list("runs", None, "LABEL=FOLDER pairs (FOLDER/<scene>/all_in_focus.tif).")
flags.DEFINE_string("edge_from", None, "Run label whose defocus map places the window.")
flags.DEFINE_list("center", None, "Y,X window centre in ground-truth pixels (overrides).")
flags.DEFINE_integer("size", 160, "Window side in pixels.")
flags.DEFINE_integer("zoom", 2, "Enlargement of the window in the PNG.")
flags.DEFINE_string("output", None, "PNG to write.")


def _box(x: np.ndarray, size: int) -> np.ndarray:
    return io.box_filter(np.asarray(x, np.float64), size)


def edge_center(defocus: np.ndarray, gt: np.ndarray, size: int) -> tuple[int, int]:
    """The window centre where the defocus map jumps most inside textured ground truth.

    Args:
      defocus: [H, W] a defocus map; gt: [H, W] ground-truth image (same grid).
    """
    d = _box(defocus, 5)
    jump = np.hypot(np.gradient(d, axis=0), np.gradient(d, axis=1))
    g = gt / max(float(gt.max()), 1e-12)
    texture = np.hypot(np.gradient(g, axis=0), np.gradient(g, axis=1))
    score = _box(jump / (jump.mean() + 1e-12), 31) * _box(texture / (texture.mean() + 1e-12), 31)
    h, w = score.shape
    m = size // 2 + 8
    inner = score[m:h - m, m:w - m]
    y, x = np.unravel_index(np.argmax(inner), inner.shape)
    return int(y + m), int(x + m)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not FLAGS.runs or not FLAGS.output:
        raise app.UsageError("--runs and --output are required")
    import tifffile
    from PIL import Image

    runs = [(label, folder / FLAGS.scene)
            for label, folder in parse_named(FLAGS.runs, "runs").items()]
    opts = rt.Options(data_dir=Path(FLAGS.data_dir), crop=parse_rxc(FLAGS.crop, "crop"),
                      scenes=(FLAGS.scene,), methods=("input",))
    try:  # the table's own checks: a missing pair or ground truth is one clear line
        run = rt.prepare_run(opts)
        _, _, gt, _, _ = rt.load_scene(run, run.pairs[FLAGS.scene])
    except (ValueError, FileNotFoundError, scene.SetupError) as e:
        raise SystemExit(f"refine_visual: error: {e}") from None
    gt = np.asarray(gt, np.float64)
    m = 6  # metrics' default translation search: aligned images lose m px per side
    aligned = []
    for label, folder in runs:
        est = np.squeeze(tifffile.imread(folder / "all_in_focus.tif"))
        al, region, shift = metrics.align_image(est, gt, max_shift=m)
        aligned.append(al)
        logging.info("%s: shift %s, PSNR %.2f dB", label, shift, metrics.psnr(al, region))
    if FLAGS.center:
        cy, cx = (int(v) - m for v in FLAGS.center)
    else:
        src = [f for lab, f in runs if (f / "defocus_map.tif").is_file()
               and (FLAGS.edge_from in (None, lab))]
        if not src:
            raise app.UsageError("no run with a defocus_map.tif to place the window; "
                                 "pass --center=Y,X")
        dmap = np.squeeze(tifffile.imread(src[0] / "defocus_map.tif"))[m:-m, m:-m]
        cy, cx = edge_center(dmap, region, FLAGS.size)
    half = FLAGS.size // 2
    h, w = region.shape[:2]
    cy, cx = int(np.clip(cy, half, h - half)), int(np.clip(cx, half, w - half))
    ys, xs = slice(cy - half, cy + half), slice(cx - half, cx + half)
    panels = [a[ys, xs] for a in aligned] + [region[ys, xs]]
    gap = np.ones((2 * half, 4))
    row = np.concatenate([p for panel in panels for p in (panel, gap)][:-1], axis=1)
    img = (np.clip(row, 0.0, 1.0) ** (1 / 2.2) * 255).round().astype(np.uint8)  # display gamma
    img = np.repeat(np.repeat(img, FLAGS.zoom, axis=0), FLAGS.zoom, axis=1)
    Path(FLAGS.output).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).save(FLAGS.output)
    logging.info("window centre (y, x) = (%d, %d) in ground-truth pixels; panels: %s, "
                 "ground truth; wrote %s", cy + m, cx + m,
                 ", ".join(label for label, _ in runs), FLAGS.output)


if __name__ == "__main__":
    app.run(main)
