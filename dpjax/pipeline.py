"""One scene from views to written results: solve, score, write (host-side glue).

Shared by `run_solver.py`, the demo and `experiments/reproduce_table.py`, so every
entry point writes the same output layout and the same result.json keys.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np

from dpjax import config as config_lib
from dpjax import metrics, outputs
from dpjax.kernels import KernelBank
from dpjax.solver import FitResult, Progress, fit


def score(all_in_focus: np.ndarray, defocus: np.ndarray | None, *,
          gt_all_in_focus: np.ndarray | None = None, gt_defocus: np.ndarray | None = None,
          defocus_confidence: np.ndarray | None = None, max_shift: int = 6) -> dict[str, Any]:
    """The paper's metrics for an estimate, for whichever ground truth is given.

    Args:
      all_in_focus: [H, W, C] estimate.
      defocus: [H, W] estimate or None.
      gt_all_in_focus: [H, W] or [H, W, C] ground truth (any scale) or None.
      gt_defocus: [H, W] ground truth or None; confidence = gt > 0 unless
        `defocus_confidence` is given (synthetic scenes have signed defocus).
      max_shift: translation search radius of the image alignment.

    Returns:
      dict with aiwe1, aiwe2, spearman, psnr, ssim, mae (those that apply).
    """
    out: dict[str, Any] = {}
    if gt_defocus is not None and defocus is not None:
        if defocus_confidence is None:
            out.update(metrics.defocus_metrics(defocus, gt_defocus))
        else:
            out["aiwe1"] = metrics.aiwe1(defocus, gt_defocus, defocus_confidence)
            out["aiwe2"] = metrics.aiwe2(defocus, gt_defocus, defocus_confidence)
            out["spearman"] = metrics.spearman_loss(defocus, gt_defocus, defocus_confidence)
    if gt_all_in_focus is not None:
        est = all_in_focus
        gt = np.asarray(gt_all_in_focus)
        if gt.ndim == 2 and est.ndim == 3 and est.shape[-1] == 1:
            est = est[..., 0]
        im = metrics.image_metrics(est, gt, max_shift=max_shift)
        out.update(psnr=im["psnr"], ssim=im["ssim"], mae=im["mae"], shift=im["shift"])
    return out


def _solve_device(res: FitResult) -> str:
    """The device the solve ran on (that of its final parameters), not jax.devices()[0]:
    a batch run places scenes on other local devices with jax.default_device."""
    leaf = res.params.color_logits
    if isinstance(leaf, jax.Array):
        return ",".join(sorted(str(d) for d in leaf.devices()))
    return str(jax.devices()[0])


def solve_scene(views: np.ndarray, bank: KernelBank, cfg: config_lib.Config, out_dir, *,
                gt_all_in_focus=None, gt_defocus=None, defocus_confidence=None,
                extra: dict[str, Any] | None = None,
                callback: Callable[[Progress], None] | None = None
                ) -> tuple[FitResult, dict[str, Any]]:
    """Solves one scene and writes the standard output layout to `out_dir`.

    Args:
      views: [2, H, W, C] preprocessed left/right views.
      bank: kernel bank covering H x W.
      cfg: resolved configuration (written into result.json).
      out_dir: the scene's output folder.
      gt_all_in_focus, gt_defocus, defocus_confidence: optional ground truth.
      extra: more JSON-able fields for result.json (scene id, paths...).
      callback: solver progress callback.

    Returns:
      (FitResult, the result dict written to result.json).
    """
    t0 = time.perf_counter()
    res = fit(views, bank, cfg, callback=callback)
    mean_input = np.mean(views, axis=0)
    result: dict[str, Any] = {
        **(extra or {}),
        "config": config_lib.to_dict(cfg),
        "timings": {**res.timings, "wall_s": time.perf_counter() - t0},
        "iterations": list(res.level_iterations),
        "loss_terms": res.terms,
        "final_loss": float(res.loss_history[-1]) if res.loss_history.size else None,
        "jax_version": jax.__version__,
        "device": _solve_device(res),
    }
    if gt_all_in_focus is not None or gt_defocus is not None:
        result["metrics"] = score(res.all_in_focus, res.defocus, gt_all_in_focus=gt_all_in_focus,
                                  gt_defocus=gt_defocus, defocus_confidence=defocus_confidence)
        if gt_all_in_focus is not None:
            inp = score(mean_input, None, gt_all_in_focus=gt_all_in_focus)
            result["input_metrics"] = {k: inp[k] for k in ("psnr", "ssim", "mae")}
    outputs.write_result(Path(out_dir), all_in_focus=res.all_in_focus, defocus=res.defocus,
                         result=result)
    return res, result
