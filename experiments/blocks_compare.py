"""A block solve against the one-block solve of the same scene: numbers and a picture.

  python experiments/blocks_compare.py --reference=RUN1/001 --blocks=RUN4/001 \
      [--noise=RUN1_NOISY/001] --output=experiments/results/blocks_001

Each argument is a scene folder written by run_solver.py (result.json,
all_in_focus.tif, defocus_map.tif); --blocks must hold a block solve (result.json
"blocks"). --noise, optional: the one-block solve of a perturbed copy of the same input
(how much the result moves for a change that should not matter: the yardstick for
"within noise"). Writes OUTPUT.json (each run's metrics against the ground truth; the
block and noise runs against the reference: PSNR of the all-in-focus images, mean and
99th percentile |defocus difference|; the seam ratio: the mean difference within 8 px
of a boundary between block cores over the mean elsewhere, 1 = no seam) and OUTPUT.png
(defocus maps of both runs and their difference x10 with the block boundaries drawn,
at half resolution, then the all-in-focus images in a window on a boundary crossing, enlarged, and their
difference x10).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import tifffile
from absl import app, flags
from PIL import Image, ImageDraw

from dpjax import figures, outputs

FLAGS = flags.FLAGS
flags.DEFINE_string("reference", None, "Scene folder of the one-block solve.")
flags.DEFINE_string("blocks", None, "Scene folder of the block solve.")
flags.DEFINE_string("noise", None, "Scene folder of the one-block solve of a perturbed "
                    "input (optional).")
flags.DEFINE_string("output", None, "Output path without extension (.json, .png).")
flags.DEFINE_integer("band", 8, "Half-width in px of the band around block boundaries.")
flags.DEFINE_integer("window", 0, "Side of the all-in-focus window in px (0: a quarter "
                     "of the frame's width, shown enlarged to the panels' width).")

_METRICS = ("psnr", "ssim", "aiwe1", "aiwe2", "spearman")


def _load(folder: Path) -> dict:
    result = json.loads((folder / "result.json").read_text())
    return {"result": result,
            "aif": np.asarray(tifffile.imread(folder / outputs.AIF_TIFF), np.float64),
            "defocus": np.asarray(tifffile.imread(folder / outputs.DEFOCUS_TIFF), np.float64)}


def _boundaries(result: dict) -> tuple[list[int], list[int]]:
    """Pixel rows and columns of the boundaries between block cores."""
    plan = result["block_plan"]
    th, tw = plan.get("tile") or [p // t for p, t in zip(plan["block_pixels"],
                                                        plan["block_tiles"])]
    rows = sorted({b["core_rows"][0] * th for b in result["blocks"] if b["core_rows"][0] > 0})
    cols = sorted({b["core_cols"][0] * tw for b in result["blocks"] if b["core_cols"][0] > 0})
    return rows, cols


def _against(run: dict, ref: dict) -> dict:
    peak = float(np.max(ref["aif"]))
    mse = float(np.mean((run["aif"] - ref["aif"]) ** 2))
    d = np.abs(run["defocus"] - ref["defocus"])
    return {"aif_psnr_vs_reference": round(10 * np.log10(peak ** 2 / max(mse, 1e-30)), 2),
            "defocus_mean_abs_diff": round(float(d.mean()), 5),
            "defocus_p99_abs_diff": round(float(np.percentile(d, 99)), 5)}


def _seam_ratio(diff: np.ndarray, rows: list[int], cols: list[int], band: int) -> float:
    near = np.zeros(diff.shape, bool)
    for r in rows:
        near[max(r - band, 0):r + band] = True
    for c in cols:
        near[:, max(c - band, 0):c + band] = True
    if not near.any() or near.all():
        return float("nan")
    return round(float(diff[near].mean() / max(diff[~near].mean(), 1e-12)), 3)


def _label(img: np.ndarray, text: str) -> np.ndarray:
    pil = Image.fromarray(img)
    ImageDraw.Draw(pil).text((6, 4), text, fill=(255, 255, 255), font=figures._font(28),
                             stroke_width=2, stroke_fill=(0, 0, 0))
    return np.asarray(pil)


def _half(img: np.ndarray) -> np.ndarray:
    """uint8 [H, W, 3] -> [H // 2, W // 2, 3], 2x2 averages."""
    h, w = img.shape[0] // 2 * 2, img.shape[1] // 2 * 2
    x = img[:h, :w].astype(np.float32).reshape(h // 2, 2, w // 2, 2, -1).mean(axis=(1, 3))
    return np.round(x).astype(np.uint8)


def _lines(img: np.ndarray, rows: list[int], cols: list[int]) -> np.ndarray:
    out = img.copy()
    for r in rows:
        out[r, :] = (255, 0, 255)
    for c in cols:
        out[:, c] = (255, 0, 255)
    return out


def _figure(ref: dict, blk: dict, rows: list[int], cols: list[int], window: int,
            shown: dict) -> np.ndarray:
    vmin, vmax = figures.defocus_range(ref["defocus"], blk["defocus"])
    d_ref = outputs.colormap(ref["defocus"], vmin, vmax)
    d_blk = outputs.colormap(blk["defocus"], vmin, vmax)
    span = vmax - vmin
    diff = np.clip(10 * np.abs(blk["defocus"] - ref["defocus"]) / max(span, 1e-9), 0, 1)
    d_diff = np.repeat((255 * diff).astype(np.uint8)[..., None], 3, axis=-1)
    half_rows, half_cols = [r // 2 for r in rows], [c // 2 for c in cols]
    top = [_label(_half(d_ref), "defocus, one block"),
           _label(_lines(_half(d_blk), half_rows, half_cols), "defocus, blocks (boundaries)"),
           _label(_lines(_half(d_diff), half_rows, half_cols),
                  "|difference| x10 (of the range)")]
    h, w = ref["defocus"].shape
    window = min(window or w // 4, h, w)
    cy = rows[len(rows) // 2] if rows else h // 2
    cx = cols[len(cols) // 2] if cols else w // 2
    y0 = int(np.clip(cy - window // 2, 0, h - window))
    x0 = int(np.clip(cx - window // 2, 0, w - window))
    win = (slice(y0, y0 + window), slice(x0, x0 + window))
    a_ref = outputs.display_image(ref["aif"], **shown)[win]
    a_blk = outputs.display_image(blk["aif"], **shown)[win]
    a_diff = np.abs(ref["aif"] - blk["aif"])[win]
    a_diff = a_diff.mean(axis=-1) if a_diff.ndim == 3 else a_diff
    a_diff = np.clip(10 * a_diff / max(float(np.max(ref["aif"])), 1e-9), 0, 1)
    a_diff = np.repeat((255 * a_diff).astype(np.uint8)[..., None], 3, axis=-1)
    zoom = max(1, (w // 2) // window)
    in_rows = [(r - y0) * zoom for r in rows if y0 < r < y0 + window]
    in_cols = [(c - x0) * zoom for c in cols if x0 < c < x0 + window]
    bottom = []
    for img, text, lines in ((a_ref, "all-in-focus, one block", False),
                             (a_blk, "blocks (boundaries)", True),
                             (a_diff, "|difference| x10", True)):
        img = figures._rgb(img) if img.ndim == 2 or img.shape[-1] != 3 else img
        img = np.kron(img, np.ones((zoom, zoom, 1), np.uint8))
        if lines:
            img = _lines(img, in_rows, in_cols)
        if lines and text.startswith("|"):
            text += f"; window y{y0} x{x0}, {window} px, x{zoom}"
        bottom.append(_label(img, text))
    top_row = np.concatenate(top, axis=1)
    bot_row = np.concatenate(bottom, axis=1)
    width = max(top_row.shape[1], bot_row.shape[1])
    pad = lambda r: np.pad(r, ((0, 0), (0, width - r.shape[1]), (0, 0)))  # noqa: E731
    return np.concatenate([pad(top_row), np.zeros((8, width, 3), np.uint8), pad(bot_row)])


def main(argv):
    del argv
    ref = _load(Path(FLAGS.reference))
    blk = _load(Path(FLAGS.blocks))
    if "blocks" not in blk["result"]:
        raise app.UsageError(f"{FLAGS.blocks}/result.json holds no block solve")
    rows, cols = _boundaries(blk["result"])
    runs = {"reference": ref, "blocks": blk}
    if FLAGS.noise:
        runs["noise"] = _load(Path(FLAGS.noise))
    report: dict = {"block_plan": blk["result"]["block_plan"], "runs": {}}
    for name, run in runs.items():
        r = run["result"]
        entry = {"folder": str(getattr(FLAGS, name)),
                 "metrics": {k: r.get("metrics", {}).get(k) for k in _METRICS},
                 "input_metrics": r.get("input_metrics"),
                 "solve_s": r.get("timings", {}).get("wall_s")}
        if name != "reference":
            entry.update(_against(run, ref))
            entry["seam_ratio_defocus"] = _seam_ratio(
                np.abs(run["defocus"] - ref["defocus"]), rows, cols, FLAGS.band)
            a = np.abs(run["aif"] - ref["aif"])
            entry["seam_ratio_aif"] = _seam_ratio(a.mean(axis=-1) if a.ndim == 3 else a,
                                                  rows, cols, FLAGS.band)
        report["runs"][name] = entry
    out = Path(FLAGS.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    outputs.write_json(out.with_suffix(".json"), report)
    shown = {"encoding": None}
    outputs.write_png(out.with_suffix(".png"), _figure(ref, blk, rows, cols, FLAGS.window,
                                                       shown))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    flags.mark_flags_as_required(["reference", "blocks", "output"])
    app.run(main)
