"""One side-by-side figure of a solve, for a first look at what dpjax did (host-side).

    +---------------------+---------------------+---------------------+
    | input               | all-in-focus        | ground truth        |
    | (mean of the views) | estimate            | (or "none")         |
    +---------------------+---------------------+---------------------+
    | estimated defocus   | true defocus        | notes               |
    |                     | (or "none")         | (metrics, ...)      |
    +---------------------+---------------------+---------------------+
    | colour bar shared by both defocus maps    |
    +-------------------------------------------+

The three images share one display scale (`outputs.to_display` over all three at
once), so brightness differences are real; the two defocus maps share one colour
scale (the finite range of both), so equal colours mean equal defocus. That is only
meaningful when both maps are in the same units, as for the synthetic demo (signed
kernel scale). Text uses Pillow's bundled default font, no font files.

Nothing here imports JAX (pass `np.asarray(x)` of device arrays).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from dpjax import outputs

__all__ = ["MIN_PANEL_WIDTH", "compose_figure", "defocus_range", "score_notes", "write_figure"]

# Panels narrower than this are enlarged by an integer factor (labels must fit).
MIN_PANEL_WIDTH = 240
_WHITE, _BLACK, _GREY = (255, 255, 255), (0, 0, 0), (225, 225, 225)


def _font(size: int) -> ImageFont.ImageFont:
    """Pillow's bundled font at `size` px; the fixed small bitmap font without FreeType."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError, OSError):  # Pillow < 10.1, or built without FreeType
        return ImageFont.load_default()


def _rgb(image: np.ndarray) -> np.ndarray:
    """uint8 [H, W] / [H, W, 1] / [H, W, 3] -> [H, W, 3]."""
    if image.ndim == 2:
        image = image[..., None]
    return np.repeat(image, 3, axis=-1) if image.shape[-1] == 1 else image


def defocus_range(*maps) -> tuple[float, float]:
    """The finite (min, max) over all given maps (None entries skipped); (0, 1) if none."""
    finite = [np.asarray(m, np.float64)[np.isfinite(m)] for m in maps if m is not None]
    finite = [f for f in finite if f.size]
    if not finite:
        return 0.0, 1.0
    return float(min(f.min() for f in finite)), float(max(f.max() for f in finite))


def _placeholder(height: int, width: int, text: str, font) -> np.ndarray:
    pil = Image.new("RGB", (width, height), _GREY)
    draw = ImageDraw.Draw(pil)
    box = draw.textbbox((0, 0), text, font=font)
    draw.text(((width - box[2]) // 2, (height - box[3]) // 2), text, fill=_BLACK, font=font)
    return np.asarray(pil)


def _ticks(vmin: float, vmax: float, count: int = 7) -> np.ndarray:
    """About `count` round values inside [vmin, vmax] (both ends when the span is 0)."""
    span = vmax - vmin
    if not span > 0:
        return np.array([vmin])
    raw = span / max(1, count - 1)
    step = 10.0 ** np.floor(np.log10(raw))
    step *= min((m for m in (1, 2, 2.5, 5, 10) if m * step >= raw), default=10)
    first = np.ceil(vmin / step - 1e-9) * step
    ticks = np.arange(first, vmax + step * 1e-9, step)
    return np.round(ticks / step) * step + 0.0  # exact multiples; + 0.0 turns -0 into 0


def compose_figure(*, views, all_in_focus, defocus, gt_all_in_focus=None, gt_defocus=None,
                   title: str | None = None, notes: Sequence[str] = (),
                   defocus_label: str = ("defocus = blur size as a multiple of the "
                                         "calibrated kernel (0 = in focus)"),
                   ) -> np.ndarray:
    """Compose the figure described in the module docstring.

    Args:
      views: [2, H, W, C] or [2, H, W] left and right views (linear); the input panel
        shows their mean.
      all_in_focus: [H, W, C] or [H, W] the estimate (linear).
      defocus: [H, W] the estimated defocus map.
      gt_all_in_focus: optional [H, W, C] or [H, W] ground-truth sharp image.
      gt_defocus: optional [H, W] ground-truth defocus, in the same units as `defocus`.
      title: optional line above the figure.
      notes: lines of text for the bottom-right panel (e.g. metrics).
      defocus_label: caption of the shared colour bar.

    Returns:
      uint8 [H_fig, W_fig, 3] RGB, with W_fig = 3 W' + 4 gaps and H_fig = 2 H' plus label
      bands, the colour bar and the optional title (fixed for given H, W and font);
      H' x W' is H x W enlarged by the smallest integer factor that makes W' at least
      MIN_PANEL_WIDTH.

    Raises:
      ValueError: shapes that do not match.
    """
    v = np.asarray(views, np.float64)
    if v.ndim == 3:
        v = v[..., None]
    if v.ndim != 4 or v.shape[0] != 2:
        raise ValueError(f"views must be [2, H, W] or [2, H, W, C], got {v.shape}")
    h, w = v.shape[1:3]
    mean_input = v.mean(axis=0)
    images = [mean_input, np.asarray(all_in_focus, np.float64)]
    if gt_all_in_focus is not None:
        images.append(np.asarray(gt_all_in_focus, np.float64))
    for i, im in enumerate(images):
        im = im[..., None] if im.ndim == 2 else im
        if im.shape[:2] != (h, w) or im.ndim != 3:
            raise ValueError(f"image {i} has shape {im.shape}, the views are {h}x{w}")
        images[i] = im
    maps = [np.asarray(defocus, np.float64)]
    if gt_defocus is not None:
        maps.append(np.asarray(gt_defocus, np.float64))
    for m in maps:
        if m.shape != (h, w):
            raise ValueError(f"defocus maps must be [{h}, {w}], got {m.shape}")

    # One display scale for the three images: tone-map them side by side.
    channels = max(im.shape[-1] for im in images)
    strip = np.concatenate([np.broadcast_to(im, (h, w, channels)) for im in images], axis=1)
    shown = np.split(_rgb(outputs.to_display(strip)), len(images), axis=1)
    vmin, vmax = defocus_range(*maps)
    coloured = [outputs.colormap(m, vmin, vmax) for m in maps]
    # Small images are enlarged (pixel replication) so that the labels fit their panels.
    zoom = -(-MIN_PANEL_WIDTH // w)
    if zoom > 1:
        shown, coloured = ([np.repeat(np.repeat(p, zoom, 0), zoom, 1) for p in panels]
                           for panels in (shown, coloured))
        h, w = h * zoom, w * zoom

    size = int(np.clip(min(h, w) // 16, 11, 22))
    font, small = _font(size), _font(max(10, size - 2))
    gap, band = max(6, size // 2), size + max(6, size // 2)
    no_gt = _placeholder(h, w, "no ground truth", font)
    top = [(shown[0], "input: mean of the two views"),
           (shown[1], "all-in-focus estimate (dpjax)"),
           (shown[2] if len(shown) > 2 else no_gt, "ground truth (sharp)")]
    bottom = [(coloured[0], "estimated defocus (dpjax)"),
              (coloured[1] if len(coloured) > 1 else no_gt, "true defocus"),
              (np.full((h, w, 3), 255, np.uint8), "")]

    bar_h = max(10, size)  # colour strip height; ticks and caption below it
    legend_h = bar_h + 4 + size + 4 + size + gap
    width = 3 * w + 4 * gap
    height = gap + (band if title else 0) + 2 * (band + h + gap) + legend_h
    pil = Image.new("RGB", (width, height), _WHITE)
    draw = ImageDraw.Draw(pil)
    y = gap
    if title:
        draw.text((gap, y), title, fill=_BLACK, font=font)
        y += band
    for panels in (top, bottom):
        for col, (panel, label) in enumerate(panels):
            x = gap + col * (w + gap)
            draw.text((x, y), label, fill=_BLACK, font=font)
            pil.paste(Image.fromarray(np.ascontiguousarray(panel)), (x, y + band))
        y += band + h + gap
    # Notes in the bottom-right panel.
    for i, line in enumerate(notes):
        draw.text((gap + 2 * (w + gap), y - h - gap + i * (size + 4)), line, fill=_BLACK,
                  font=small)

    # The shared colour bar under the two defocus maps, with round tick values.
    x0, x1 = gap, gap + 2 * w + gap - 1
    y_bar = y
    ramp = np.linspace(vmin, vmax, x1 - x0 + 1)
    pil.paste(Image.fromarray(np.repeat(outputs.colormap(ramp, vmin, vmax)[None], bar_h, 0)),
              (x0, y_bar))
    draw.rectangle([x0 - 1, y_bar - 1, x1 + 1, y_bar + bar_h], outline=_BLACK)
    for t in _ticks(vmin, vmax):
        xt = x0 + (round((t - vmin) / (vmax - vmin) * (x1 - x0)) if vmax > vmin else 0)
        draw.line([(xt, y_bar + bar_h), (xt, y_bar + bar_h + 3)], fill=_BLACK)
        label = f"{t:.3g}"
        tw = draw.textbbox((0, 0), label, font=small)[2]
        draw.text((int(np.clip(xt - tw // 2, 0, width - tw)), y_bar + bar_h + 4), label,
                  fill=_BLACK, font=small)
    draw.text((x0, y_bar + bar_h + 4 + size + 4),
              f"{defocus_label}: one colour scale for both maps", fill=_BLACK, font=small)
    return np.asarray(pil)


def score_notes(metrics: dict, input_metrics: dict | None = None) -> list[str]:
    """Lines for `compose_figure(notes=...)` from `pipeline.score`'s dicts.

    Args:
      metrics: the estimate's scores (keys psnr, ssim and, when scored, aiwe1, spearman).
      input_metrics: the input's (mean of the views) image scores, or None.

    Returns:
      Lines naming each score and which direction is better.
    """
    lines = []
    if "psnr" in metrics:
        lines.append("all-in-focus vs truth (higher = better)")
        if input_metrics and "psnr" in input_metrics:
            before = input_metrics
            lines += [f"  PSNR  input {before['psnr']:.2f} dB, dpjax {metrics['psnr']:.2f} dB",
                      f"  SSIM  input {before['ssim']:.3f}, dpjax {metrics['ssim']:.3f}"]
        else:
            lines.append(f"  PSNR {metrics['psnr']:.2f} dB, SSIM {metrics['ssim']:.3f}")
    if "aiwe1" in metrics:
        lines += ["defocus vs truth (lower = better)",
                  f"  AIWE(1) {metrics['aiwe1']:.3f}, 1-|rho_s| {metrics['spearman']:.3f}"]
    return lines


def write_figure(path, **kwargs) -> Path:
    """`compose_figure(**kwargs)` written atomically as an RGB PNG; returns the path."""
    return outputs.write_png(path, compose_figure(**kwargs))
