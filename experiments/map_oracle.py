"""How much of the all-in-focus image's error is the defocus map's? (issue "A sharper
all-in-focus image", a diagnostic.)

  python experiments/map_oracle.py --scenes=001,005,008,011,013,016 --crop=3x4 \
      --output=experiments/results/map_oracle_crops.json

Each Pixel 4 scene is loaded, configured and fitted once as `experiments/refine_sweep.py`
does it (the apps' defaults, refinement off). That fit's image is then deconvolved
again at two defocus maps:

- the fit's own map (what the apps output), and
- the ground-truth map: the dataset's 8-bit defocus map brought to the fit's units by
  the least-squares affine fit of the fit's map to it (the affine invariance the AIWE
  scores allow), clipped to the layer range; the fit's map where there is no ground
  truth (row "gt_map_check" scores the fit's image with it: AIWE(1) ~0).

Deconvolutions: `baselines.wiener_deconvolve` at either map, and the refinement
(`dpjax.refine`, today's defaults otherwise) with frozen transmittances that put each
pixel on the two layers bracketing the map's value (hat weights, not sharpened
further), on the fit's L layers and on 2L - 1 (the midpoints added). Every refinement
starts from the fit's composite and anchors to it, as the default one does. Two more
rows: the default refinement itself (the fit's own transmittances, sharpened), and
those sharpened transmittances on 2L - 1 layers with each pixel's heaviest layer's
weight split at the map's value (`split_params`).

If the refinement at the ground-truth map is far ahead of the one at the fit's map,
the map limits the image; if not, the deconvolution does.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging

from dpjax import baselines, mpi, outputs, pipeline, presets, refine, reproduce, solver
from dpjax_apps.flags import parse_rxc

sys.path.insert(0, str(Path(__file__).resolve().parent))
import refine_sweep  # noqa: E402  (its scene loading and fit)

FLAGS = flags.FLAGS


def oracle_map(fit_map: np.ndarray, gt: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """[H, W] the ground-truth map (8-bit, 0 = none) in the fit's units (module docstring)."""
    valid = gt > 0
    g = gt[valid].astype(np.float64) / 255.0
    a, b = np.polyfit(g, fit_map[valid].astype(np.float64), 1)
    out = fit_map.astype(np.float64).copy()
    out[valid] = a * g + b
    return np.clip(out, scales.min(), scales.max()).astype(np.float32)


def _logits(trans: np.ndarray, composite: np.ndarray) -> mpi.MpiParams:
    """Logits of transmittances [L, H, W] (a partition of one) with every layer's colour
    the fit's composite [C, H, W]: the refinement then starts from that composite and
    anchors to it, as it does by default."""
    below = np.cumsum(trans, axis=0)
    alpha = np.where(below > 0, trans / np.where(below > 0, below, 1.0), 0.0)
    alpha = np.clip(alpha[1:], 1e-6, 1.0 - 1e-6)
    comp = np.clip(composite, 1e-6, 1.0 - 1e-6)
    logits = np.broadcast_to(np.log(comp / (1.0 - comp)), (trans.shape[0],) + comp.shape)
    return mpi.MpiParams(color_logits=jnp.asarray(logits, jnp.float32),
                         alpha_logits=jnp.asarray(np.log(alpha / (1.0 - alpha)), jnp.float32))


def two_layer_params(dmap: np.ndarray, scales: np.ndarray, composite: np.ndarray
                     ) -> mpi.MpiParams:
    """MPI logits whose transmittances put each pixel on its two nearest layers.

    Args:
      dmap: [H, W] defocus (clipped to the layer range).
      scales: [L] layer scales, back to front (decreasing).
      composite: [C, H, W] the fit's all-in-focus composite (`_logits`).
    """
    # the Wiener baseline's weights of the two bracketing scales (ascending: flipped twice)
    ascending = np.asarray(scales, np.float32)[::-1]
    return _logits(baselines._interp_weights(dmap, ascending)[::-1], composite)


def split_params(trans: np.ndarray, dmap: np.ndarray, fine_scales: np.ndarray,
                 composite: np.ndarray) -> mpi.MpiParams:
    """Logits on 2L - 1 layers (the L layers and the midpoints between them) whose
    transmittances are `trans` [L, H, W], except that each pixel's heaviest layer's
    weight is shared by hat weights between the fine layers around dmap [H, W], within
    one fine spacing of that layer; every layer's colour is the fit's composite [C, H, W]
    (so the refinement starts from it and anchors to it, as by default)."""
    num_l = trans.shape[0]
    fine = np.zeros((2 * num_l - 1,) + trans.shape[1:])
    fine[::2] = trans
    top = np.argmax(trans, axis=0)  # [H, W]
    s = np.asarray(fine_scales, np.float64)
    t = np.interp(dmap, s[::-1], np.arange(len(s))[::-1].astype(np.float64))
    t = np.clip(t, 2 * top - 1, 2 * top + 1)
    heavy = np.take_along_axis(trans, top[None], 0)[0]
    np.put_along_axis(fine, 2 * top[None], 0.0, 0)
    idx = np.arange(len(s))[:, None, None]
    fine += heavy[None] * np.maximum(0.0, 1.0 - np.abs(idx - t[None]))
    return _logits(fine, composite)


def run_scene(sid: str, data: Path, crop) -> dict:
    views, bank, cfg, res, gt_aif, gt_def, _ = refine_sweep.fit_scene(sid, data, crop)
    scales = cfg.mpi.scales()
    refined = cfg.replace(refine=presets.base_config(preset="auto").refine)

    def sc(img, dmap=None):
        s = pipeline.score(np.asarray(img), dmap, gt_all_in_focus=gt_aif, gt_defocus=gt_def)
        return {k: round(float(s[k]), 4) for k in ("psnr", "ssim", "aiwe1") if k in s}

    fit_map = np.asarray(res.defocus)
    gt_map = oracle_map(fit_map, gt_def, scales)
    alpha = mpi.alphas(res.params)
    composite = np.asarray(mpi.all_in_focus(mpi.colors(res.params),
                                            mpi.transmittance(alpha)))  # [C, H, W]
    rows = {"input": sc(views.mean(axis=0)), "fit": sc(res.all_in_focus, fit_map),
            "gt_map_check": sc(res.all_in_focus, gt_map)}
    rows["refined_fit_map"] = sc(solver.finish_fit(views, bank, refined,
                                                   res.params).all_in_focus_raw)
    rows["wiener_fit_map"] = sc(baselines.wiener_deconvolve(views, bank, fit_map, scales))
    rows["wiener_gt_map"] = sc(baselines.wiener_deconvolve(views, bank, gt_map, scales))
    # Two-layer weights (not sharpened further) on the fit's layers and on 2L - 1.
    flat = refined.replace(refine=dataclasses.replace(refined.refine, sharpen=1.0))
    fine_cfg = flat.replace(mpi=dataclasses.replace(flat.mpi, num_layers=2 * len(scales) - 1))
    for name, cfg_k in (("", flat), (f"_{2 * len(scales) - 1}_layers", fine_cfg)):
        for which, dmap in (("gt_map", gt_map), ("fit_map", fit_map)):
            params = two_layer_params(dmap, cfg_k.mpi.scales(), composite)
            rows[f"refined_{which}_two_layer{name}"] = sc(
                solver.finish_fit(views, bank, cfg_k, params).all_in_focus_raw)
    # The fit's sharpened weights, each pixel's heaviest layer split at its map value.
    trans = np.asarray(mpi.transmittance(refine.sharpen_alphas(alpha, refined.refine.sharpen)))
    dmap = np.asarray(mpi.estimate_defocus(mpi.transmittance(alpha), scales, cfg.post.defocus))
    rows[f"refined_split_{2 * len(scales) - 1}_layers"] = sc(solver.finish_fit(
        views, bank, fine_cfg, split_params(trans, dmap, fine_cfg.mpi.scales(), composite)
    ).all_in_focus_raw)
    logging.info("%s: %s", sid, json.dumps(rows))
    return rows


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    data = Path(FLAGS.data_dir)
    crop = parse_rxc(FLAGS.crop, "crop")
    report = {"crop": FLAGS.crop, "scenes": {}}
    for sid in FLAGS.scenes:
        report["scenes"][sid] = run_scene(sid, data, crop)
    names = list(next(iter(report["scenes"].values())))
    report["mean"] = {n: {k: float(np.mean([report["scenes"][s][n][k] for s in FLAGS.scenes]))
                          for k in report["scenes"][FLAGS.scenes[0]][n]} for n in names}
    for n in names:
        print(n, " ".join(f"{k} {v:.4f}" for k, v in report["mean"][n].items()))
    if FLAGS.output:
        outputs.write_json(Path(FLAGS.output), report)
    return 0


if __name__ == "__main__":
    flags.DEFINE_list("scenes", ["001", "005", "008"], "Pixel 4 scene ids.")
    flags.DEFINE_string("crop", "3x4", "RxC central kernel tiles, or 'full'.")
    flags.DEFINE_string("data_dir", str(reproduce.DEFAULT_DATA_DIR), "The Pixel 4 folder.")
    flags.DEFINE_string("output", "", "JSON file for every number.")
    sys.exit(app.run(main))
