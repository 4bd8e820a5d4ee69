"""Writing results: atomic files, display images, colour-mapped defocus maps (host-side).

Every file is written atomically: the bytes go to a temporary file in the target's
folder, are flushed and fsync'ed, and `os.replace` then swaps it in, so a reader (or
a resumed batch run) sees either the old file or the complete new one, never a
partial file; on any error the temporary file is removed and the old file is left
as it was.

A scene's output folder is complete when result.json exists, parses, and every file
it lists under "output_files" exists: `write_result` deletes a stale result.json
first and writes the new one last, so an interrupted run never looks complete.

Nothing here imports JAX (pass `np.asarray(x)` of device arrays).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import struct
import tempfile
import threading
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from dpjax.encoding import Encoding, from_linear, parse_encoding

__all__ = [
    "RESULT_FILES",
    "RESULT_JSON",
    "atomic_write",
    "atomic_write_bytes",
    "colormap",
    "defocus_png",
    "display_image",
    "encode_for_display",
    "encode_png",
    "is_complete",
    "to_display",
    "to_json_compatible",
    "write_json",
    "write_png",
    "write_result",
    "write_tiff",
]

RESULT_JSON = "result.json"
AIF_TIFF, DEFOCUS_TIFF = "all_in_focus.tif", "defocus_map.tif"
AIF_PNG, DEFOCUS_PNG = "all_in_focus.png", "defocus_map.png"
RESULT_FILES = (AIF_TIFF, DEFOCUS_TIFF, AIF_PNG, DEFOCUS_PNG, RESULT_JSON)

# Viridis-like perceptual map: anchors at 0, 1/8, ..., 1, linearly interpolated in
# sRGB. Lightness rises monotonically from dark purple to yellow.
_CMAP_ANCHORS = np.array([
    (68, 1, 84), (71, 44, 122), (59, 82, 139), (44, 113, 142), (33, 145, 140),
    (39, 173, 129), (92, 200, 99), (170, 220, 50), (253, 231, 37),
], np.float64)
_INVALID_RGB = (255, 255, 255)  # non-finite values: white, outside the map's colours


# ----------------------------------------------------------------------------------------
# Atomic writes


def atomic_write(path, write: Callable[[BinaryIO], object]) -> Path:
    """Write a file atomically: `write(fh)` fills a temporary file that then replaces path.

    The temporary file lives in path's folder (created if needed) so that os.replace
    is a same-filesystem rename. If `write` or the replace fails, the temporary file
    is removed, the exception propagates and any existing file at path is untouched.
    The new file gets the old file's permission bits, else 0o644.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = path.stat().st_mode & 0o7777 if path.exists() else 0o644
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)  # reopened by name: some writers (tifffile) need a named file object
    try:
        with open(tmp, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


def atomic_write_bytes(path, data: bytes) -> Path:
    """Write bytes to path atomically (see `atomic_write`)."""
    return atomic_write(path, lambda fh: fh.write(data))


# Whole folders are written into a staging sibling and swapped in when complete, so
# that an interrupted write never leaves a half folder under the final name (the batch
# runner's scene folders, the self-calibration folders; `runner.clean_stale` tidies up).
STAGING_PREFIX = ".staging-"  # a folder being written (a sibling of its final place)
RETIRED_PREFIX = ".retired-"  # a replaced folder waiting to be removed


def staging_dir(out_dir) -> Path:
    """The staging sibling of out_dir for this process and thread (not created)."""
    out_dir = Path(out_dir)
    return out_dir.parent / (f"{STAGING_PREFIX}{out_dir.name}-{os.getpid()}-"
                             f"{threading.get_ident()}")


def swap_in(staging, out_dir) -> None:
    """Moves a complete staged folder to out_dir, replacing (then deleting) the old one."""
    staging, out_dir = Path(staging), Path(out_dir)
    retired = None
    if out_dir.exists():
        retired = out_dir.parent / f"{RETIRED_PREFIX}{out_dir.name}-{os.getpid()}"
        os.replace(out_dir, retired)
    os.replace(staging, out_dir)
    if retired is not None:
        shutil.rmtree(retired, ignore_errors=True)


def write_tiff(path, array) -> Path:
    """Write a float32 TIFF atomically.

    Args:
      array: [H, W], [H, W, 1] (written as [H, W]) or [H, W, 3] (RGB).
    """
    import tifffile

    a = np.asarray(array, np.float32)
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim == 2:
        photometric = "minisblack"
    elif a.ndim == 3 and a.shape[-1] == 3:
        photometric = "rgb"
    else:
        raise ValueError(f"write_tiff expects [H, W], [H, W, 1] or [H, W, 3], got {a.shape}")
    return atomic_write(path, lambda fh: tifffile.imwrite(fh, a, photometric=photometric))


def _png_chunk(ctype: bytes, body: bytes) -> bytes:
    return (struct.pack(">I", len(body)) + ctype + body
            + struct.pack(">I", zlib.crc32(body, zlib.crc32(ctype))))


def encode_png(array, *, level: int = 6) -> bytes:
    """Encode uint8 or uint16 [H, W] / [H, W, C] (C = 1 grey, 2 grey+alpha, 3 RGB, 4 RGBA).

    PIL cannot write 16-bit colour PNGs, so this is a minimal encoder: every
    scanline uses the Up filter, and the stream is one zlib-compressed IDAT chunk.
    """
    a = np.asarray(array)
    if a.dtype not in (np.uint8, np.uint16):
        raise ValueError(f"PNG needs uint8 or uint16 data, got {a.dtype}")
    if a.ndim == 2:
        a = a[..., None]
    if a.ndim != 3 or a.shape[-1] not in (1, 2, 3, 4) or 0 in a.shape:
        raise ValueError(f"PNG needs a non-empty [H, W] or [H, W, C<=4] array, got {a.shape}")
    h, w, c = a.shape
    depth = 8 * a.dtype.itemsize
    rows = np.ascontiguousarray(a.astype(a.dtype.newbyteorder(">"))).view(np.uint8)
    rows = rows.reshape(h, w * c * a.dtype.itemsize)
    filtered = rows.copy()
    filtered[1:] -= rows[:-1]  # Up filter, modulo 256 (the first row's prior is zero)
    scan = np.concatenate([np.full((h, 1), 2, np.uint8), filtered], axis=1)
    colour = {1: 0, 2: 4, 3: 2, 4: 6}[c]
    header = struct.pack(">IIBBBBB", w, h, depth, colour, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header)
            + _png_chunk(b"IDAT", zlib.compress(scan.tobytes(), level))
            + _png_chunk(b"IEND", b""))


def write_png(path, array) -> Path:
    """Write a uint8 or uint16 PNG atomically (shapes as in `encode_png`)."""
    return atomic_write_bytes(path, encode_png(array))


def to_json_compatible(obj):
    """Recursively convert to plain JSON types.

    numpy scalars and arrays become Python numbers and lists, tuples become lists,
    Paths strings, dataclasses dicts, and non-finite floats (NaN, +-Inf, which JSON
    cannot represent) null. Dict keys become strings.
    """
    if isinstance(obj, dict):
        return {str(k): to_json_compatible(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_json_compatible(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return to_json_compatible(obj.tolist())
    if isinstance(obj, np.generic):
        return to_json_compatible(obj.item())
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, (str, int, bool)) or obj is None:
        return obj
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return to_json_compatible(dataclasses.asdict(obj))
    raise TypeError(f"cannot write {type(obj).__name__} to JSON: {obj!r}")


def write_json(path, obj) -> Path:
    """Write obj as indented JSON atomically (see `to_json_compatible`; NaN -> null)."""
    text = json.dumps(to_json_compatible(obj), indent=2, allow_nan=False) + "\n"
    return atomic_write_bytes(path, text.encode("utf-8"))


# ----------------------------------------------------------------------------------------
# Display images


def to_display(image, gamma: float = 2.2, percentile: float = 99.5) -> np.ndarray:
    """Linear image -> uint8 for viewing.

    Divides by the given percentile of the finite values (so a few specular pixels
    do not darken the image), clips to [0, 1] and applies the display gamma
    x^(1/gamma). Non-finite pixels are shown black (for display only).

    Args:
      image: [H, W] or [H, W, C] linear intensities.

    Returns:
      uint8 of the same shape.
    """
    x = np.asarray(image, np.float64)
    finite = np.isfinite(x)
    x = np.where(finite, x, 0.0)
    scale = float(np.percentile(x[finite], percentile)) if finite.any() else 0.0
    if not scale > 0:
        scale = float(x.max()) if x.max() > 0 else 1.0
    y = np.clip(x / scale, 0.0, 1.0) ** (1.0 / gamma)
    return np.round(y * 255).astype(np.uint8)


def encode_for_display(image, enc: Encoding | str, *, scale: float = 1.0,
                       bits: int = 8) -> np.ndarray:
    """Linear image -> integer samples in a display encoding, with no stretch.

    The inverse of reading an encoded file (`io.load_pair_with_info`): multiplies by
    `scale` (the input's `Preprocessing.scale`, so that 1 is the input's full-scale
    white again), applies `encoding.from_linear`, clips to [0, 1] and rounds to
    2^bits - 1 levels. An image equal to the linearised input therefore comes back
    as the input's own samples (up to rounding). Non-finite pixels are written as 0.

    Args:
      image: [H, W] or [H, W, C] linear intensities, in units of the loaded views.
      enc: the encoding to write (an Encoding or its text form).
      scale: factor back to the input's full scale (> 0).
      bits: 8 (uint8) or 16 (uint16).

    Returns:
      uint8 or uint16 of the same shape.
    """
    if bits not in (8, 16):
        raise ValueError(f"bits must be 8 or 16, got {bits}")
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a finite number > 0, got {scale}")
    x = np.asarray(image, np.float64) * scale
    y = np.asarray(from_linear(x, enc), np.float64)
    y = np.clip(np.where(np.isfinite(y), y, 0.0), 0.0, 1.0)
    top = 2**bits - 1
    return np.round(y * top).astype(np.uint8 if bits == 8 else np.uint16)


def display_image(image, *, encoding: Encoding | str | None = None, scale: float = 1.0,
                  bits: int = 8) -> np.ndarray:
    """The image a person looks at for a linear result (all_in_focus.png, thumbnails).

    encoding None or linear: `to_display` (percentile stretch and gamma 2.2; for raw
    linear input such as Pixel DP views, which have no display encoding of their own).
    Otherwise `encode_for_display` in that encoding, scale and bit depth (for
    display-referred input: written back as it came in).

    Args:
      image: [H, W] or [H, W, C] linear intensities.

    Returns:
      uint8 (or uint16 for an encoding with bits=16), same shape.
    """
    enc = None if encoding is None else parse_encoding(encoding)
    if enc is None or enc.is_linear:
        return to_display(image)
    return encode_for_display(image, enc, scale=scale, bits=bits)


def colormap(values, vmin: float, vmax: float) -> np.ndarray:
    """Map values to a viridis-like perceptual colour ramp.

    Values are clipped to [vmin, vmax] (vmin == vmax maps all to the middle colour);
    non-finite values are white.

    Returns:
      uint8 [..., 3] RGB.
    """
    v = np.asarray(values, np.float64)
    span = float(vmax) - float(vmin)
    t = np.full(v.shape, 0.5) if not span > 0 else (v - float(vmin)) / span
    t = np.clip(np.where(np.isfinite(t), t, 0.0), 0.0, 1.0)
    knots = np.linspace(0.0, 1.0, len(_CMAP_ANCHORS))
    rgb = np.stack([np.interp(t, knots, _CMAP_ANCHORS[:, i]) for i in range(3)], axis=-1)
    rgb = np.round(rgb).astype(np.uint8)
    rgb[~np.isfinite(v)] = _INVALID_RGB
    return rgb


def _format_tick(v: float) -> str:
    return f"{v:.3g}"


def defocus_png(defocus, vmin: float | None = None, vmax: float | None = None) -> np.ndarray:
    """Colour-mapped defocus map with a vertical scale bar on the right.

    Args:
      defocus: [H, W] defocus values.
      vmin, vmax: colour range; default the finite minimum / maximum.

    Returns:
      uint8 [H, W + bar, 3]: the map, then a white panel with a colour strip
      (vmax at the top, vmin at the bottom) and its end values printed beside it.
    """
    d = np.asarray(defocus, np.float64)
    if d.ndim != 2:
        raise ValueError(f"defocus_png expects [H, W], got {d.shape}")
    finite = d[np.isfinite(d)]
    if vmin is None:
        vmin = float(finite.min()) if finite.size else 0.0
    if vmax is None:
        vmax = float(finite.max()) if finite.size else 1.0
    h, _w = d.shape
    image = colormap(d, vmin, vmax)

    font = ImageFont.load_default(size=max(10, min(h // 30, 28)))
    labels = [_format_tick(vmax), _format_tick(vmin)]
    boxes = [font.getbbox(s) for s in labels]
    text_w = max(b[2] - b[0] for b in boxes)
    text_h = max(b[3] for b in boxes)
    gap = max(4, font.size // 2)
    strip_w = max(8, font.size)
    bar_w = gap + strip_w + gap // 2 + text_w + gap

    # Strip from y0 to y1 inclusive; half a label of margin keeps end labels inside.
    margin = min(text_h // 2 + 1, max(0, (h - 2) // 2))
    y0, y1 = margin, h - 1 - margin
    panel = np.full((h, bar_w, 3), 255, np.uint8)
    ramp = np.linspace(vmax, vmin, y1 - y0 + 1) if y1 > y0 else np.array([vmax])
    panel[y0:y0 + ramp.size, gap:gap + strip_w] = colormap(ramp, vmin, vmax)[:, None, :]

    pil = Image.fromarray(panel)
    draw = ImageDraw.Draw(pil)
    x_text = gap + strip_w + gap // 2
    for label, box, y in zip(labels, boxes, (y0, y1)):
        draw.line([(gap + strip_w, y), (x_text - 1, y)], fill=(0, 0, 0))
        top = int(np.clip(y - (box[1] + box[3]) // 2, -box[1], max(-box[1], h - box[3])))
        draw.text((x_text, top), label, fill=(0, 0, 0), font=font)
    return np.concatenate([image, np.asarray(pil)], axis=1)


# ----------------------------------------------------------------------------------------
# Scene results


def write_result(out_dir, *, all_in_focus, defocus, result: dict,
                 encoding: Encoding | str | None = None, scale: float = 1.0,
                 bits: int = 8) -> Path:
    """Write one scene's outputs atomically; result.json last (it marks completion).

    Args:
      out_dir: the scene's folder (created if needed).
      all_in_focus: [H, W, C] or [H, W] linear image -> all_in_focus.tif (float32,
        as given) and all_in_focus.png (`display_image` with encoding, scale, bits:
        by default `to_display`; pass the input's `Preprocessing.display_kwargs()`
        to write display-referred input back in its own encoding and bit depth).
      defocus: [H, W] or None -> defocus_map.tif (float32) and defocus_map.png
        (`defocus_png`); skipped when None.
      result: JSON-able summary; written with "output_files" (the files written)
        added, which `is_complete` checks.

    Returns:
      The path of result.json.
    """
    out_dir = Path(out_dir)
    if "output_files" in result:
        raise ValueError("result must not contain the key 'output_files' (set by write_result)")
    aif = np.asarray(all_in_focus, np.float32)
    if aif.ndim not in (2, 3):
        raise ValueError(f"all_in_focus must be [H, W] or [H, W, C], got {aif.shape}")
    display = display_image(aif, encoding=encoding, scale=scale, bits=bits)  # checks args
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / RESULT_JSON).unlink(missing_ok=True)  # incomplete until rewritten below

    files = [AIF_TIFF, AIF_PNG]
    write_tiff(out_dir / AIF_TIFF, aif)
    write_png(out_dir / AIF_PNG, display[..., 0] if display.ndim == 3 and
              display.shape[-1] == 1 else display)
    if defocus is not None:
        dmap = np.asarray(defocus, np.float32)
        if dmap.shape != aif.shape[:2]:
            raise ValueError(f"defocus {dmap.shape} does not match all_in_focus {aif.shape}")
        write_tiff(out_dir / DEFOCUS_TIFF, dmap)
        write_png(out_dir / DEFOCUS_PNG, defocus_png(dmap))
        files += [DEFOCUS_TIFF, DEFOCUS_PNG]
    files.append(RESULT_JSON)
    return write_json(out_dir / RESULT_JSON, {**result, "output_files": files})


def is_complete(out_dir) -> bool:
    """True when result.json parses as an object and every file it lists exists.

    A result.json without "output_files" requires all of RESULT_FILES.
    """
    out_dir = Path(out_dir)
    try:
        result = json.loads((out_dir / RESULT_JSON).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if not isinstance(result, dict):
        return False
    files = result.get("output_files", list(RESULT_FILES))
    if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
        return False
    return all((out_dir / f).is_file() for f in files)
