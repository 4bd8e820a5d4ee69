"""One scene from views to written results: solve, score, write (host-side glue).

Shared by `run_solver.py`, the demo and `experiments/reproduce_table.py`, so every
entry point writes the same output layout and the same result.json keys.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dpjax import blocks, io, metrics, mpi, outputs
from dpjax import config as config_lib
from dpjax.kernels import KernelBank
from dpjax.solver import FitResult, Progress, downsample_image, fit


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
      dict with aiwe1, aiwe2, spearman, psnr, ssim, mae (those that apply). A ground
      truth that cannot score anything (`degenerate_ground_truth`) gives no numbers
      for its columns and a reason under "unavailable" ({"defocus": ..., "all_in_focus":
      ...}) instead: an AIWE of 1e-16 against a constant map is not a result.
    """
    out: dict[str, Any] = {}
    unavailable: dict[str, str] = {}
    if gt_defocus is not None and defocus is not None:
        conf = (np.asarray(gt_defocus) > 0 if defocus_confidence is None
                else np.asarray(defocus_confidence) > 0)
        why = degenerate_ground_truth(gt_defocus, conf)
        if why is not None:
            unavailable["defocus"] = f"defocus ground truth {why}"
        elif defocus_confidence is None:
            out.update(metrics.defocus_metrics(defocus, gt_defocus))
        else:
            out["aiwe1"] = metrics.aiwe1(defocus, gt_defocus, defocus_confidence)
            out["aiwe2"] = metrics.aiwe2(defocus, gt_defocus, defocus_confidence)
            out["spearman"] = metrics.spearman_loss(defocus, gt_defocus, defocus_confidence)
    if gt_all_in_focus is not None and (
            why := degenerate_ground_truth(gt_all_in_focus)) is not None:
        unavailable["all_in_focus"] = f"all-in-focus ground truth {why}"
    elif gt_all_in_focus is not None:
        est = all_in_focus
        gt = np.asarray(gt_all_in_focus)
        if gt.ndim == 2 and est.ndim == 3 and est.shape[-1] == 1:
            est = est[..., 0]
        im = metrics.image_metrics(est, gt, max_shift=max_shift)
        out.update(psnr=im["psnr"], ssim=im["ssim"], mae=im["mae"], shift=im["shift"])
    if unavailable:
        out["unavailable"] = unavailable
    return out


MIN_GT_PIXELS = 16  # fewer confident ground-truth pixels than this score nothing


def degenerate_ground_truth(gt, confidence=None) -> str | None:
    """Why a ground truth cannot score an estimate (None when it can).

    Args:
      gt: [H, W] or [H, W, C] ground truth.
      confidence: optional [H, W] bool, the pixels that count.

    Returns:
      "has only N confident pixels", "is constant" or "is not finite", else None.
    """
    g = np.asarray(gt, np.float64)
    if g.ndim == 3:
        g = g.mean(axis=-1)
    mask = np.ones(g.shape, bool) if confidence is None else np.asarray(confidence, bool)
    vals = g[mask]
    if vals.size < MIN_GT_PIXELS:
        return f"has only {vals.size} confident pixels"
    if not np.all(np.isfinite(vals)):
        return "is not finite"
    if float(vals.max() - vals.min()) <= 1e-9 * max(1.0, float(np.abs(vals).max())):
        return "is constant"
    return None


def init_from_all_in_focus(all_in_focus, num_layers: int,
                           pyramid_levels: int = 1) -> mpi.MpiParams:
    """Initial MPI logits whose every layer shows a given all-in-focus estimate.

    A warm start for `fit(init=...)` from another method's sharp image (e.g. DPANet's,
    `dpjax.dpanet.deblur_tiled`; this module never imports dpjax.dpanet). The image is
    area-downsampled by 2^(pyramid_levels - 1) to the coarsest level's resolution, as
    `fit` downsamples the observation, and goes through `mpi.init_params` as if it were
    both views: every layer's colour is the image clipped to [1e-3, 1 - 1e-3] (logit:
    the inverse of `mpi.colors`' sigmoid), and alpha_l = 1 / (l + 1) gives every layer
    transmittance 1/L. So at the start the composite all-in-focus image equals the
    given one up to that clipping, and the defocus map is flat (the mean layer scale):
    the solver starts from sharp colours and still has to find the layers.

    Pass it with `fit(..., init=..., init_is_solution=False)` (as `solve_scene` does):
    the alphas are the usual initial ones, so the first level runs the normal
    learning-rate schedule, not SolverConfig.refine_lr.

    Args:
      all_in_focus: [H, W, C] estimate in the views' intensity scale.
      num_layers: L of the solve's MpiConfig.
      pyramid_levels: the solve's SolverConfig.pyramid_levels (H and W must be
        divisible by 2^(pyramid_levels - 1), as for the solve itself).

    Returns:
      MpiParams: color_logits [L, C, H', W'], alpha_logits [L - 1, H', W'] at the
      coarsest level's H' x W'.
    """
    image = np.asarray(all_in_focus, np.float32)
    if image.ndim != 3:
        raise ValueError(f"all_in_focus must be [H, W, C], got {image.shape}")
    if not np.all(np.isfinite(image)):
        raise ValueError("all_in_focus contains NaN or Inf values")
    planar = jnp.asarray(np.transpose(image, (2, 0, 1)))  # [C, H, W]
    coarse = downsample_image(planar, 2 ** (pyramid_levels - 1))  # [C, H', W']
    return mpi.init_params(coarse[None], num_layers)


# Search-map initialisation defaults (`init_from_defocus`).
# The start's default settings live in config.InitConfig (the solve's `cfg.init`).
_INIT = config_lib.InitConfig()


def _smooth(x: np.ndarray, sigma: float) -> np.ndarray:
    """Three box passes (~Gaussian of std `sigma` px), 'reflect' edges: [h, w] float64."""
    size = max(1, round(math.sqrt(4.0 * sigma * sigma + 1.0))) | 1  # 3 (b^2 - 1) / 12 = sigma^2
    for _ in range(3):
        x = io.box_filter(x, size)
    return x


def init_from_defocus(all_in_focus, defocus, confident, scales, pyramid_levels: int = 1, *,
                      factor: int = 1, spread_layers: float = _INIT.spread_layers,
                      weight: float = _INIT.weight, fill_sigma_px: float = _INIT.fill_sigma_px,
                      weight_by_confidence: bool = _INIT.weight_by_confidence,
                      ) -> mpi.MpiParams:
    """Initial MPI logits whose layer weights start near a rough defocus map.

    The paper's start gives every layer transmittance 1/L, so each pixel starts at the
    middle of the layer range, and regions with little texture move from there slowly.
    This start leans each pixel's transmittances towards a first estimate instead
    (e.g. the kernel-symmetry search, `dpjax.presets.search_defocus`):

    1. the map is replaced by a confidence-weighted Gaussian average of the confident
       values (std `fill_sigma_px` full-resolution pixels): unconfident pixels are
       filled from their neighbourhood and the search's pixel noise is smoothed out,
       since the start only needs the coarse layout; where no confident pixel is
       near, the median of the confident values (which step 3 then barely uses);
    2. the map is area-resampled to the coarsest pyramid level and clipped to the
       layer range;
    3. T_l = w G_l + (1 - w) / L, G a Gaussian over the layer scales centred on the
       map (std `spread_layers` layer spacings, normalised over the layers), and
       w = weight * (the same Gaussian average of the confident mask), resampled as
       the map: the start leans on the map by `weight` where the search was sure
       around a pixel and stays near the uniform 1/L where it found little (flat or
       ambiguous regions, whose filled value is a guess from further away);
       alpha_l = T_l / sum_{m <= l} T_m (back to front) gives exactly these T_l;
    4. every layer's colour is `all_in_focus` (as `init_from_all_in_focus`).

    With no confident pixel it returns `init_from_all_in_focus`'s uniform start. Pass
    it with `fit(..., init=..., init_is_solution=False)` (as `solve_scene` does).

    Args:
      all_in_focus: [H, W, C] colour start (e.g. the mean of the views).
      defocus: [H / factor, W / factor] signed scales.
      confident: [H / factor, W / factor] bool, the pixels to trust.
      scales: [L] layer scales, back to front (MpiConfig.scales()).
      pyramid_levels: the solve's SolverConfig.pyramid_levels.
      factor: the map's downsampling factor relative to H x W.

    Returns:
      MpiParams at the coarsest level: color_logits [L, C, H', W'], alpha_logits
      [L - 1, H', W'].
    """
    base = init_from_all_in_focus(all_in_focus, len(scales), pyramid_levels)
    d = np.asarray(defocus, np.float64)
    conf = np.asarray(confident, bool)
    h, w = np.shape(all_in_focus)[:2]
    if d.shape != conf.shape or d.shape != (h // factor, w // factor) or h % factor or w % factor:
        raise ValueError(f"defocus {d.shape} and confident {conf.shape} must be the image "
                         f"{(h, w)} divided by factor {factor}")
    if not np.all(np.isfinite(d[conf])):
        raise ValueError("defocus contains NaN or Inf values at confident pixels")
    if not 0.0 <= weight <= 1.0 or spread_layers <= 0 or fill_sigma_px <= 0:
        raise ValueError("need 0 <= weight <= 1, spread_layers > 0 and fill_sigma_px > 0")
    s = np.asarray(scales, np.float64)
    if s.ndim != 1 or len(s) < 2:
        raise ValueError(f"scales must be [L >= 2], got shape {s.shape}")
    if not np.any(conf):
        return base
    c = conf.astype(np.float64)
    dc = np.where(conf, d, 0.0)
    sigma = fill_sigma_px / factor
    num, den = _smooth(dc * c, sigma), _smooth(c, sigma)
    near = den > 1e-3
    filled = np.where(near, num / np.where(near, den, 1.0), np.median(d[conf]))
    coarse = 2 ** (pyramid_levels - 1)
    hc, wc = h // coarse, w // coarse

    def to_coarse(x):  # [h / factor, w / factor] -> [H', W'], area resampling
        full = np.repeat(np.repeat(x, factor, axis=0), factor, axis=1)
        return full.reshape(hc, coarse, wc, coarse).mean(axis=(1, 3))

    m = np.clip(to_coarse(filled), s.min(), s.max())
    if weight_by_confidence:
        lean = weight * np.clip(to_coarse(den), 0.0, 1.0)  # [H', W'], w of step 3
    else:
        lean = np.full((hc, wc), weight)
    spacing = (s.max() - s.min()) / (len(s) - 1)
    z = (m[None] - s[:, None, None]) / (spread_layers * max(spacing, 1e-6))
    g = np.exp(-0.5 * z * z)  # the map lies within the range: its nearest layer is > 0
    g /= g.sum(axis=0, keepdims=True)
    trans = lean[None] * g + (1.0 - lean[None]) / len(s)  # [L, H', W'], sums to 1
    alpha = np.clip(trans / np.cumsum(trans, axis=0), 1e-4, 1.0 - 1e-4)[1:]
    logits = np.log(alpha) - np.log1p(-alpha)
    return mpi.MpiParams(color_logits=base.color_logits,
                         alpha_logits=jnp.asarray(logits, jnp.float32))


def init_from_search(all_in_focus, search, cfg: config_lib.Config,
                     ) -> tuple[mpi.MpiParams, dict[str, Any]]:
    """`init_from_defocus` from a `dpjax.presets.SearchMap` for a solve with `cfg`.

    Returns:
      (the initial MpiParams, the record result.json keeps under "search_init").
    """
    ic = cfg.init
    init = init_from_defocus(all_in_focus, search.defocus, search.confident,
                             cfg.mpi.scales(), cfg.solver.pyramid_levels,
                             factor=search.factor, spread_layers=ic.spread_layers,
                             weight=ic.weight, fill_sigma_px=ic.fill_sigma_px,
                             weight_by_confidence=ic.weight_by_confidence)
    record = {"confident_fraction": float(np.mean(search.confident)),
              "factor": int(search.factor), **search_init_settings(cfg)}
    return init, record


def search_init_settings(cfg: config_lib.Config | None = None) -> dict[str, Any]:
    """The settings `init_from_search` uses with `cfg` (default Config()) and records
    (result.json "search_init"); they are also part of the resolved config."""
    ic = (cfg or config_lib.Config()).init
    return {"spread_layers": ic.spread_layers, "weight": ic.weight,
            "fill_sigma_px": ic.fill_sigma_px, "weight_by_confidence": ic.weight_by_confidence}


def _solve_device(res: FitResult) -> str:
    """The device the solve ran on (that of its final parameters), not jax.devices()[0]:
    a batch run places scenes on other local devices with jax.default_device."""
    leaf = None if res.params is None else res.params.color_logits
    if isinstance(leaf, jax.Array):
        return ",".join(sorted(str(d) for d in leaf.devices()))
    return str(jax.devices()[0])


def solve_scene(views: np.ndarray, bank: KernelBank, cfg: config_lib.Config, out_dir, *,
                gt_all_in_focus=None, gt_defocus=None, defocus_confidence=None,
                extra: dict[str, Any] | None = None,
                callback: Callable[[Progress], None] | None = None,
                init: mpi.MpiParams | None = None,
                display: dict[str, Any] | None = None,
                plan: blocks.BlockPlan | None = None) -> tuple[FitResult, dict[str, Any]]:
    """Solves one scene and writes the standard output layout to `out_dir`.

    Args:
      views: [2, H, W, C] preprocessed left/right views.
      bank: kernel bank covering H x W.
      cfg: resolved configuration (written into result.json).
      out_dir: the scene's output folder.
      gt_all_in_focus, gt_defocus, defocus_confidence: optional ground truth.
      extra: more JSON-able fields for result.json (scene id, paths...).
      callback: solver progress callback.
      init: optional initial MPI logits at the coarsest level from
        `init_from_all_in_focus` (a starting image, not a solution: the first level
        runs the normal schedule).
      display: how all_in_focus.png is encoded (`outputs.write_result` keywords;
        `dpjax.scene.display_kwargs`); default the viewing transform.
      plan: solve in these overlapping blocks (`dpjax.blocks`; recorded in result.json
        "block_plan" and "blocks"); None: the whole frame at once.

    Returns:
      (FitResult, the result dict written to result.json).
    """
    t0 = time.perf_counter()
    if plan is None:
        res = fit(views, bank, cfg, callback=callback, init=init, init_is_solution=False)
    else:
        res = blocks.fit_blocks(views, bank, cfg, plan, callback=callback, init=init,
                                init_is_solution=False)
        extra = {"block_plan": plan.as_dict(), **(extra or {})}
    result = write_scene(res, views, cfg, out_dir, wall_s=time.perf_counter() - t0,
                         gt_all_in_focus=gt_all_in_focus, gt_defocus=gt_defocus,
                         defocus_confidence=defocus_confidence, extra=extra, display=display)
    return res, result


def write_scene(res: FitResult, views: np.ndarray, cfg: config_lib.Config, out_dir, *,
                wall_s: float, gt_all_in_focus=None, gt_defocus=None, defocus_confidence=None,
                extra: dict[str, Any] | None = None,
                display: dict[str, Any] | None = None) -> dict[str, Any]:
    """Scores a solved scene and writes the standard output layout to `out_dir`.

    `solve_scene`'s second half, also used after a batched solve (`fit_batch`).

    Args:
      res: the scene's FitResult.
      views: [2, H, W, C] the views it was solved from.
      cfg: its resolved configuration (written into result.json).
      wall_s: the solve's wall time (timings.wall_s).
      gt_all_in_focus, gt_defocus, defocus_confidence, extra, display: as for
        `solve_scene`.

    Returns:
      the result dict written to result.json.
    """
    mean_input = np.mean(views, axis=0)
    result: dict[str, Any] = {
        **(extra or {}),
        "config": config_lib.to_dict(cfg),
        "timings": {**res.timings, "wall_s": wall_s},
        "iterations": list(res.level_iterations),
        "loss_terms": res.terms,
        "final_loss": float(res.loss_history[-1]) if res.loss_history.size else None,
        "jax_version": jax.__version__,
        "device": _solve_device(res),
    }
    if res.refine is not None:
        result["refine"] = res.refine
    if res.blocks is not None:
        result["blocks"] = res.blocks
    if gt_all_in_focus is not None or gt_defocus is not None:
        m = score(res.all_in_focus, res.defocus, gt_all_in_focus=gt_all_in_focus,
                  gt_defocus=gt_defocus, defocus_confidence=defocus_confidence)
        unavailable = m.pop("unavailable", None)
        if unavailable:
            result["metrics_unavailable"] = unavailable
        if m:
            result["metrics"] = m
        if gt_all_in_focus is not None and "psnr" in m:
            inp = score(mean_input, None, gt_all_in_focus=gt_all_in_focus)
            result["input_metrics"] = {k: inp[k] for k in ("psnr", "ssim", "mae")}
    outputs.write_result(Path(out_dir), all_in_focus=res.all_in_focus, defocus=res.defocus,
                         result=result, **(display or {}))
    return result
