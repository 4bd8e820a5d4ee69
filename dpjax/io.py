"""Reading dual-pixel captures, ground truth and calibrated kernels (host-side numpy).

Nothing here imports JAX: loaders return numpy arrays that callers move to the device.

Conventions (the package's axis glossary): views are float32 `[V, H, W, C]` with
V = 2 (0 left, 1 right); kernels are float32 `[V, T, K, K]`, T tiles in row-major
order of a (rows, cols) grid of square tiles, K odd.

Pixel 4 preprocessing (METHOD.md, "Inputs"), done by `load_pixel_pair`:
1. subtract the black level (1024), clip at 0, divide by the white level 2^14 - 1;
2. vignetting: multiply the right view by the per-pixel ratio of the white-sheet
   images white_L / white_R (each preprocessed as in step 1), box-filtered over a
   101 x 101 window;
3. take the central crop (1008 x 1344, offset floor((H - h) / 2), floor((W - w) / 2));
4. divide the pair by its joint maximum.

The box filter is a mean over the window with 'reflect' edges (mirror about the edge
pixel without repeating it, numpy's 'reflect' = OpenCV's default BORDER_REFLECT_101),
computed with a summed-area table in float64. Xin et al.'s public code averages with
zero padding counted in the mean; the two differ only within 50 px of the sensor
border, which the default crop (252 / 336 px margins) discards.

Other capture formats (`load_pgm_pair`, `load_png_pair`, `load_tiff_pair`) subtract an
optional black level, clip at 0 and divide the pair by its joint maximum. Every
problem with an input file raises `InputError` (a ValueError) naming the file;
a missing file raises `MissingFileError`, which is both an `InputError` and a
`FileNotFoundError`.

PNG: greyscale (8/16-bit) and 8-bit colour PNGs are decoded by PIL. PIL reduces
16-bit colour PNGs to 8 bits, so those (colour types 2, 4, 6 at 16 bits, e.g.
Canon DP exports) are decoded here: chunks are parsed and CRC-checked, IDAT is
inflated with zlib, and the five scanline filters are undone with numpy. The
filters Average and Paeth depend on the reconstructed left neighbour, so they are
undone along anti-diagonal wavefronts (pixel (y, x) needs only (y, x-1), (y-1, x)
and (y-1, x-1)), vectorised over each diagonal. Alpha channels are dropped.
JPEG (8-bit greyscale or colour) is decoded by PIL, without applying the EXIF
orientation (rotating the views would turn left/right disparity into up/down).

Encodings (`dpjax.encoding`): the blur model is linear in intensity, so
`load_pair_with_info` decodes display-referred files (8-bit PNG/TIFF, JPEG: sRGB by
the "auto" rule of `encoding.auto_encoding`) to linear intensity before dividing the
pair by its joint maximum, and records what it assumed (a `Preprocessing`: encoding,
whether it was the auto choice, bit depth, black level, full scale and the scale
factor needed to write results back in the input's units). Linear input (Pixel raw,
PGM, 16-bit PNG/TIFF, float TIFF) is loaded exactly as by the per-format loaders.

Discovery (`discover_pairs`, `scan_inputs`) walks the input folder at any depth;
scene names are relative POSIX paths, each checked by `check_scene_name` so that a
scene can never name a folder outside the output folder.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import re
import shutil
import struct
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image

from dpjax.encoding import AUTO, LINEAR, Encoding, auto_encoding, parse_encoding, to_linear

__all__ = [
    "FORMATS",
    "RAW_FORMATS",
    "CalibratedKernels",
    "Discovery",
    "InputError",
    "LoadedPair",
    "MissingFileError",
    "Pixel4Preprocess",
    "Pixel4Scene",
    "Preprocessing",
    "ScenePair",
    "SkippedInput",
    "box_filter",
    "check_kernels_match_image",
    "check_scene_name",
    "discover_pairs",
    "load_calibration_kernels",
    "load_pair",
    "load_pair_with_info",
    "load_pgm_pair",
    "load_pixel4_scene",
    "load_pixel_pair",
    "load_png_pair",
    "load_tiff_pair",
    "probe_encoding",
    "read_camera_settings",
    "read_image",
    "save_calibration_kernels",
    "scan_inputs",
    "validate_pair",
]

KERNELS_LEFT = "blur_kernels_left.npy"
KERNELS_RIGHT = "blur_kernels_right.npy"
KERNELS_META = "kernels_meta.json"
WHITE_LEFT = "white_sheet_left.png"
WHITE_RIGHT = "white_sheet_right.png"

# Pixel 4 calibration geometry (data/pixel4/README.md).
PIXEL4_GRID = (6, 8)
PIXEL4_TILE = 168

# Kernel validation tolerances: sums within 1% of 1, negative lobes (interpolation
# ringing) no deeper than 1e-3 of the kernel's peak; both are then fixed exactly.
_KERNEL_SUM_RTOL = 1e-2
_KERNEL_NEG_RTOL = 1e-3


class InputError(ValueError):
    """An input file that cannot be used: unreadable, truncated, mismatched, wrong depth."""


class MissingFileError(InputError, FileNotFoundError):
    """A required input file does not exist (a FileNotFoundError and an InputError)."""


# ----------------------------------------------------------------------------------------
# Configuration and containers


@dataclasses.dataclass(frozen=True, kw_only=True)
class Pixel4Preprocess:
    """Pixel 4 DP preprocessing constants (METHOD.md, "Inputs").

    crop_hw=None keeps the full frame; vignetting_box must be odd.
    """

    black_level: int = 1024
    white_level: int = 2**14 - 1
    vignetting_box: int = 101
    crop_hw: tuple[int, int] | None = (1008, 1344)


class Pixel4Scene(NamedTuple):
    """One Pixel 4 scene.

    views: [2, H, W, 1] float32 preprocessed left/right views, max 1.
    gt_all_in_focus: [H, W] float32, the raw 16-bit ground-truth values, or None.
    gt_defocus: [H, W] float32, the raw 8-bit values (0 = no ground truth), or None.
    """

    views: np.ndarray
    gt_all_in_focus: np.ndarray | None
    gt_defocus: np.ndarray | None
    scene_id: str


class CalibratedKernels(NamedTuple):
    """kernels: [2, T, K, K] float32 (left, right), T = rows * cols, each summing to 1.

    blur_p90: the 90th-percentile blur radius of the photos the kernels were fitted to,
    in units of the kernels' scale 1, when known (a self-calibration records it; the
    auto preset's range search scales its candidates by it, `presets.search_scales`);
    None for a lab calibration.
    """

    kernels: np.ndarray
    grid: tuple[int, int]
    tile_size: int
    blur_p90: float | None = None


class ScenePair(NamedTuple):
    """A discovered capture; left or right is None when that view is missing."""

    name: str
    left: Path | None
    right: Path | None
    format: str  # one of FORMATS: "pixel", "canon", "pgm", "tiff" or "jpeg"


# ----------------------------------------------------------------------------------------
# Small helpers


def _read_bytes(path: str | Path, what: str = "file") -> bytes:
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"{what} not found: {path}")
    try:
        return path.read_bytes()
    except OSError as e:
        raise InputError(f"cannot read {what} {path}: {e}") from e


def box_filter(image: np.ndarray, size: int) -> np.ndarray:
    """Mean over a size x size window centred on each pixel, 'reflect' edges.

    Args:
      image: [H, W] array.
      size: odd window side.

    Returns:
      [H, W] float64. A summed-area table makes the cost independent of `size`;
      it is accumulated in float64 so that cancellation stays far below float32 noise.
    """
    if size < 1 or size % 2 != 1:
        raise ValueError(f"box filter size must be a positive odd integer, got {size}")
    if image.ndim != 2:
        raise ValueError(f"box_filter expects [H, W], got shape {image.shape}")
    r = size // 2
    x = np.asarray(image, np.float64)
    for axis in (0, 1):  # 'reflect' needs >= 2 pixels; a 1-pixel axis is constant ('edge')
        widths = [(0, 0), (0, 0)]
        widths[axis] = (r, r)
        x = np.pad(x, widths, mode="reflect" if x.shape[axis] > 1 else "edge")
    sat = np.zeros((x.shape[0] + 1, x.shape[1] + 1), np.float64)
    np.cumsum(np.cumsum(x, axis=0), axis=1, out=sat[1:, 1:])
    s = size
    total = sat[s:, s:] - sat[:-s, s:] - sat[s:, :-s] + sat[:-s, :-s]
    return total / (s * s)


def _central_crop(image: np.ndarray, crop_hw: tuple[int, int] | None, name: str) -> np.ndarray:
    """Central crop of the leading two axes, offsets floor((H - h) / 2), floor((W - w) / 2)."""
    if crop_hw is None:
        return image
    h, w = crop_hw
    big_h, big_w = image.shape[:2]
    if h > big_h or w > big_w:
        raise InputError(f"{name}: image {big_h}x{big_w} is smaller than the crop {h}x{w}")
    y0, x0 = (big_h - h) // 2, (big_w - w) // 2
    return image[y0:y0 + h, x0:x0 + w]


def _normalise_pair(left: np.ndarray, right: np.ndarray, name: str) -> np.ndarray:
    """Stack to [2, H, W, C] float32 divided by the joint maximum."""
    return _normalise_pair_peak(left, right, name)[0]


def _normalise_pair_peak(left: np.ndarray, right: np.ndarray,
                         name: str) -> tuple[np.ndarray, float]:
    """`_normalise_pair` and the joint maximum it divided by (float64)."""
    views = np.stack([left, right]).astype(np.float64)
    if views.ndim == 3:
        views = views[..., None]
    peak = views.max()
    if not peak > 0:
        raise InputError(f"{name}: both views are zero everywhere (after black level)")
    return (views / peak).astype(np.float32), float(peak)


# ----------------------------------------------------------------------------------------
# PNG


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_HEAD = len(_PNG_SIGNATURE) + 8 + 13  # bytes up to the end of IHDR's body


def _ihdr_of(head: bytes) -> bytes | None:
    """The 13 bytes of a PNG's IHDR chunk from the file's first _PNG_HEAD bytes (width,
    height, bit depth at 8, colour type at 9, ...), None when they are no PNG's."""
    if len(head) < _PNG_HEAD or not head.startswith(_PNG_SIGNATURE) or head[12:16] != b"IHDR":
        return None
    return head[16:_PNG_HEAD]


class _PngInfo(NamedTuple):
    width: int
    height: int
    bit_depth: int
    colour_type: int
    interlace: int
    idat: bytes


def _parse_png(data: bytes, name: str) -> _PngInfo:
    """Walk the chunks, checking lengths and CRCs; returns the header and joined IDAT."""
    if not data.startswith(_PNG_SIGNATURE):
        raise InputError(f"{name}: not a PNG file (bad signature)")
    pos, header, idat = len(_PNG_SIGNATURE), None, []
    while True:
        if pos + 8 > len(data):
            raise InputError(f"{name}: truncated PNG (no IEND chunk)")
        length, ctype = struct.unpack(">I4s", data[pos:pos + 8])
        end = pos + 8 + length
        if end + 4 > len(data):
            raise InputError(f"{name}: truncated PNG (chunk {ctype!r} cut short)")
        body = data[pos + 8:end]
        (crc,) = struct.unpack(">I", data[end:end + 4])
        if zlib.crc32(body, zlib.crc32(ctype)) != crc:
            raise InputError(f"{name}: corrupt PNG (CRC mismatch in chunk {ctype!r})")
        # The spec: IHDR first, and once (a reader taking another one would disagree
        # with `_ihdr_of`, which reads the first).
        if header is None and ctype != b"IHDR":
            raise InputError(f"{name}: corrupt PNG (no IHDR chunk first)")
        if header is not None and ctype == b"IHDR":
            raise InputError(f"{name}: corrupt PNG (a second IHDR chunk)")
        if ctype == b"IHDR":
            if length != 13:
                raise InputError(f"{name}: corrupt PNG (IHDR length {length})")
            header = struct.unpack(">IIBBBBB", body)
        elif ctype == b"IDAT":
            idat.append(body)
        elif ctype == b"IEND":
            break
        pos = end + 4
    width, height, depth, colour, _, _, interlace = header
    if width == 0 or height == 0:
        raise InputError(f"{name}: PNG has zero size {height}x{width}")
    return _PngInfo(width, height, depth, colour, interlace, b"".join(idat))


def _paeth(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """PNG Paeth predictor on int16 arrays (ties broken a, then b, then c)."""
    pa = np.abs(b - c)
    pb = np.abs(a - c)
    pc = np.abs(a + b - 2 * c)
    return np.where((pa <= pb) & (pa <= pc), a, np.where(pb <= pc, b, c))


def _unfilter(raw: bytes, height: int, width: int, bpp: int, name: str) -> np.ndarray:
    """Undo PNG scanline filters (bit depth >= 8). Returns [height, width, bpp] uint8."""
    stride = width * bpp
    need = height * (stride + 1)
    if len(raw) < need:
        raise InputError(f"{name}: truncated PNG image data ({len(raw)} of {need} bytes)")
    rows = np.frombuffer(raw, np.uint8, count=need).reshape(height, stride + 1)
    ftype = rows[:, 0]
    filt = rows[:, 1:].reshape(height, width, bpp)
    if ftype.max() > 4:
        raise InputError(f"{name}: corrupt PNG (unknown filter type {int(ftype.max())})")

    if ftype.max() <= 2:  # None / Sub / Up only: row by row, each row vectorised.
        out = np.empty((height, width, bpp), np.uint8)
        prev = np.zeros((width, bpp), np.uint8)
        for y in range(height):
            t = ftype[y]
            if t == 0:
                out[y] = filt[y]
            elif t == 1:  # uint8 accumulation wraps modulo 256, as the filter requires.
                np.cumsum(filt[y], axis=0, dtype=np.uint8, out=out[y])
            else:
                np.add(filt[y], prev, out=out[y])
            prev = out[y]
        return out

    # General case: anti-diagonal wavefronts. Pixels are stored skewed, diag[d + 2, y + 1]
    # = pixel (y, x = d - y), so each wavefront is one contiguous slice and the left,
    # up and up-left neighbours are slices of the two previous wavefronts; never-written
    # cells are the zero border the filters assume outside the image.
    yy, xx = np.indices((height, width))
    skew = (yy + xx + 2, yy + 1)
    diag = np.zeros((height + width + 1, height + 1, bpp), np.int16)
    fdiag = np.zeros_like(diag)
    fdiag[skew] = filt
    types = ftype.astype(np.int16)[:, None]
    for d in range(height + width - 1):
        y0, y1 = max(0, d - width + 1), min(height, d + 1)
        a = diag[d + 1, y0 + 1:y1 + 1]  # left
        b = diag[d + 1, y0:y1]  # up
        c = diag[d, y0:y1]  # up-left
        t = types[y0:y1]
        pred = np.select([t == 1, t == 2, t == 3, t == 4],
                         [a, b, (a + b) >> 1, _paeth(a, b, c)], 0)
        diag[d + 2, y0 + 1:y1 + 1] = (fdiag[d + 2, y0 + 1:y1 + 1] + pred) & 255
    return diag[skew].astype(np.uint8)


def _decode_png_numpy(info: _PngInfo, name: str) -> np.ndarray:
    """Decode a non-interlaced 8/16-bit greyscale/RGB(A) PNG. Returns [H, W, C], alpha kept."""
    channels = {0: 1, 2: 3, 4: 2, 6: 4}.get(info.colour_type)
    if channels is None or info.bit_depth not in (8, 16) or info.interlace != 0:
        raise InputError(f"{name}: unsupported PNG (colour type {info.colour_type}, "
                         f"{info.bit_depth}-bit, interlace {info.interlace})")
    try:
        raw = zlib.decompress(info.idat)
    except zlib.error as e:
        raise InputError(f"{name}: truncated or corrupt PNG image data ({e})") from e
    nbytes = info.bit_depth // 8
    out = _unfilter(raw, info.height, info.width, channels * nbytes, name)
    if nbytes == 2:
        out = out.reshape(info.height, -1).view(">u2").astype(np.uint16)
    return out.reshape(info.height, info.width, channels)


def _decode_png(data: bytes, name: str) -> tuple[np.ndarray, int]:
    """Returns (samples [H, W] or [H, W, 3] uint8/uint16 with alpha dropped, bit depth)."""
    info = _parse_png(data, name)
    if info.bit_depth == 16 and info.colour_type in (2, 4, 6):
        if info.interlace:
            raise InputError(f"{name}: interlaced 16-bit colour PNGs are not supported")
        arr = _decode_png_numpy(info, name)
    else:
        try:
            with Image.open(io.BytesIO(data)) as im:
                im.load()
                if im.mode in ("P", "PA", "1"):
                    im = im.convert("RGBA" if im.mode == "PA" or "transparency" in im.info
                                    else ("RGB" if im.mode == "P" else "L"))
                arr = np.asarray(im)
        except (OSError, ValueError, SyntaxError) as e:
            raise InputError(f"{name}: unreadable PNG ({e})") from e
        if info.bit_depth == 16 and arr.dtype != np.uint16:  # PIL mode 'I' (int32)
            arr = arr.astype(np.uint16)
    if arr.ndim == 3:
        arr = arr[..., :1] if arr.shape[-1] == 2 else arr[..., :3]  # drop alpha
        if arr.shape[-1] == 1:
            arr = arr[..., 0]
    return np.ascontiguousarray(arr), info.bit_depth


# ----------------------------------------------------------------------------------------
# PGM


def _decode_pgm(data: bytes, name: str) -> tuple[np.ndarray, int]:
    """Binary PGM (P5): returns ([H, W] uint8 or uint16, bit depth 8 or 16).

    Header tokens (width, height, maxval) are separated by whitespace, '#' comments
    run to the end of a line, and exactly one whitespace byte precedes the raster.
    Samples are 1 byte for maxval < 256, else 2 bytes big-endian (the Netpbm spec,
    as written by Google's DP capture app for 16-bit data).
    """
    if data[:2] != b"P5":
        kind = "ASCII PGM (P2)" if data[:2] == b"P2" else "not a binary PGM (P5)"
        raise InputError(f"{name}: unsupported file: {kind}")
    pos, tokens = 2, []
    while len(tokens) < 3:
        while pos < len(data) and (data[pos:pos + 1].isspace() or data[pos:pos + 1] == b"#"):
            if data[pos:pos + 1] == b"#":
                eol = data.find(b"\n", pos)
                pos = len(data) if eol < 0 else eol
            pos += 1
        start = pos
        while pos < len(data) and data[pos:pos + 1].isdigit():
            pos += 1
        if pos == start:
            raise InputError(f"{name}: truncated or corrupt PGM header")
        tokens.append(int(data[start:pos]))
    if pos >= len(data) or not data[pos:pos + 1].isspace():
        raise InputError(f"{name}: truncated or corrupt PGM header")
    pos += 1
    width, height, maxval = tokens
    if width == 0 or height == 0 or not 0 < maxval < 65536:
        raise InputError(f"{name}: bad PGM header (size {width}x{height}, maxval {maxval})")
    dtype = np.dtype(np.uint8) if maxval < 256 else np.dtype(">u2")
    need = width * height * dtype.itemsize
    if len(data) - pos < need:
        raise InputError(f"{name}: truncated PGM ({len(data) - pos} of {need} raster bytes)")
    arr = np.frombuffer(data, dtype, count=width * height, offset=pos).reshape(height, width)
    return arr.astype(np.uint16 if maxval >= 256 else np.uint8), 16 if maxval >= 256 else 8


# ----------------------------------------------------------------------------------------
# Generic reading and validation


def read_image(path: str | Path) -> tuple[np.ndarray, int | None]:
    """Read one PNG, PGM, TIFF or JPEG file.

    Returns:
      (samples, bit depth): samples [H, W] or [H, W, C] in the file's dtype (alpha
      dropped); bit depth 8 or 16 for integer data, None for floating-point TIFF.
    """
    path = Path(path)
    data = _read_bytes(path, "image")
    kind = _image_kind(path, data)
    if kind == "png":
        return _decode_png(data, str(path))
    if kind == "pgm":
        return _decode_pgm(data, str(path))
    if kind == "tiff":
        return _decode_tiff(data, str(path))
    if kind == "jpeg":
        return _decode_jpeg(data, str(path))
    raise InputError(f"{path}: unknown image format (expected .png, .pgm, .tif, .tiff, "
                     ".jpg or .jpeg)")


_JPEG_SIGNATURE = b"\xff\xd8\xff"


def _image_kind(path: Path, head: bytes) -> str | None:
    """Which decoder reads a file ("png", "pgm", "tiff", "jpeg"; None: none), from its
    suffix and its first bytes (8 are enough): the one rule for `read_image` and the
    header probe (`probe_encoding`), so that both take a file for the same kind."""
    suffix = path.suffix.lower()
    if suffix == ".png" or head.startswith(_PNG_SIGNATURE):
        return "png"
    if suffix == ".pgm" or head[:2] in (b"P5", b"P2"):
        return "pgm"
    if suffix in (".tif", ".tiff"):
        return "tiff"
    if suffix in (".jpg", ".jpeg") or head.startswith(_JPEG_SIGNATURE):
        return "jpeg"
    return None


def _decode_jpeg(data: bytes, name: str) -> tuple[np.ndarray, int]:
    """JPEG via PIL: ([H, W] or [H, W, 3] uint8, 8).

    The EXIF orientation tag is deliberately ignored: the left/right views are defined
    along the sensor's rows, and rotating the pixels would turn horizontal disparity
    into vertical. CMYK and other colour modes are converted to RGB.
    """
    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.format != "JPEG":
                raise InputError(f"{name}: not a JPEG file (PIL reads it as {im.format})")
            im.load()
            if im.mode not in ("L", "RGB"):
                im = im.convert("RGB")
            arr = np.asarray(im)
    except (OSError, ValueError, SyntaxError) as e:
        if isinstance(e, InputError):
            raise
        raise InputError(f"{name}: unreadable or truncated JPEG ({e})") from e
    if arr.dtype != np.uint8:
        raise InputError(f"{name}: unsupported JPEG sample type {arr.dtype}")
    return np.ascontiguousarray(arr), 8


def _decode_tiff(data: bytes, name: str) -> tuple[np.ndarray, int | None]:
    import tifffile

    try:
        arr = tifffile.imread(io.BytesIO(data))
    except Exception as e:  # tifffile raises several types for corrupt files
        raise InputError(f"{name}: unreadable or truncated TIFF ({type(e).__name__}: {e})") from e
    arr = np.asarray(arr)
    if arr.size == 0:
        raise InputError(f"{name}: unreadable or truncated TIFF (no image data)")
    if arr.ndim == 3 and arr.shape[-1] > 4 and arr.shape[0] <= 4:  # planar [C, H, W]
        arr = np.moveaxis(arr, 0, -1)
    if arr.ndim == 3:
        arr = arr[..., :3] if arr.shape[-1] != 2 else arr[..., :1]  # drop alpha
        if arr.shape[-1] == 1:
            arr = arr[..., 0]
    if arr.ndim not in (2, 3):
        raise InputError(f"{name}: expected one [H, W] or [H, W, C] image, got shape {arr.shape}")
    if arr.dtype.kind == "f":
        return arr, None
    if arr.dtype.kind not in "ui":
        raise InputError(f"{name}: unsupported TIFF sample type {arr.dtype}")
    return arr, 8 * arr.dtype.itemsize


def file_digest(path: str | Path | None) -> str | None:
    """The first 16 hex digits of a file's SHA-256 (None for None or an unreadable
    file): how results and self-calibrations record which input files they used."""
    if path is None:
        return None
    import hashlib

    h = hashlib.sha256()
    try:
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    except OSError:
        return None
    return h.hexdigest()[:16]


def image_size(path: str | Path) -> tuple[int, int]:
    """(height, width) of an image from its header (no pixel data decoded; decodes when
    the header cannot be read). Raises InputError / MissingFileError like read_image."""
    path = Path(path)
    try:
        if path.suffix.lower() in (".tif", ".tiff"):
            import tifffile

            with tifffile.TiffFile(path) as tf:
                page = tf.pages[0]
                return int(page.imagelength), int(page.imagewidth)
        with Image.open(path) as im:
            return int(im.height), int(im.width)
    except Exception:  # noqa: BLE001 - any header failure: decode instead
        arr, _ = read_image(path)
        return int(arr.shape[0]), int(arr.shape[1])


def validate_pair(left: np.ndarray, right: np.ndarray, *, names: Sequence[str] = ("left", "right"),
                  bit_depths: Sequence[int | None] = (None, None), expect_16bit: bool = False,
                  min_hw: tuple[int, int] | None = None) -> None:
    """Raise InputError unless two raw views form a usable pair.

    Checks, each naming the offending file: 8-bit integer data where 16-bit is
    expected, non-finite values, mismatched shapes (size or channels), and images
    smaller than min_hw = (min_height, min_width).
    """
    for arr, name, depth in zip((left, right), names, bit_depths):
        if expect_16bit and depth is not None and depth < 16:
            raise InputError(f"{name}: {depth}-bit data where 16-bit is expected "
                             "(an 8-bit export has lost the linear raw range)")
        if arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):
            raise InputError(f"{name}: contains NaN or Inf values")
        if min_hw is not None and (arr.shape[0] < min_hw[0] or arr.shape[1] < min_hw[1]):
            raise InputError(f"{name}: image {arr.shape[0]}x{arr.shape[1]} is smaller than "
                             f"the minimum {min_hw[0]}x{min_hw[1]}")
    if left.shape != right.shape:
        raise InputError(f"views differ in shape: {names[0]} {left.shape} vs "
                         f"{names[1]} {right.shape}")


def _load_raw_pair(left_path, right_path, *, expect_16bit: bool,
                   min_hw: tuple[int, int] | None) -> tuple[np.ndarray, np.ndarray]:
    left, right, _ = _load_raw_pair_depth(left_path, right_path, expect_16bit=expect_16bit,
                                          min_hw=min_hw)
    return left, right


def _read_raw_pair(left_path, right_path):
    """Both views as read ([H, W] or [H, W, C] samples) and their bit depths, unvalidated."""
    if left_path is None or right_path is None:
        present = left_path if right_path is None else right_path
        missing = "right" if right_path is None else "left"
        raise InputError(f"{present}: missing partner view ({missing} view not found)")
    left, depth_l = read_image(left_path)
    right, depth_r = read_image(right_path)
    return left, right, (depth_l, depth_r)


def _check_same_depth(left_path, right_path, depths) -> int | None:
    if depths[0] != depths[1]:
        bits = lambda d: "floating-point" if d is None else f"{d}-bit"
        raise InputError(f"views differ in bit depth: {left_path} {bits(depths[0])} vs "
                         f"{right_path} {bits(depths[1])}")
    return depths[0]


def _load_raw_pair_depth(left_path, right_path, *, expect_16bit: bool,
                         min_hw: tuple[int, int] | None):
    """`_load_raw_pair` and the pair's bit depth (None for floating point)."""
    left, right, depths = _read_raw_pair(left_path, right_path)
    validate_pair(left, right, names=(str(left_path), str(right_path)),
                  bit_depths=depths, expect_16bit=expect_16bit, min_hw=min_hw)
    return left, right, _check_same_depth(left_path, right_path, depths)


def _subtract_black(image: np.ndarray, black_level: float) -> np.ndarray:
    return np.maximum(image.astype(np.float64) - black_level, 0.0)


# ----------------------------------------------------------------------------------------
# Pixel 4


def _pixel_preprocess(raw: np.ndarray, p: Pixel4Preprocess) -> np.ndarray:
    """Black level, clip at 0, white level: [H, W] float64 in [0, ~1]."""
    return _subtract_black(raw, p.black_level) / p.white_level


def load_pixel_pair(left_path, right_path, *, white_left=None, white_right=None,
                    preprocess: Pixel4Preprocess = Pixel4Preprocess(), expect_16bit: bool = True,
                    min_hw: tuple[int, int] | None = None) -> np.ndarray:
    """Load and preprocess a Pixel DP pair (METHOD.md "Inputs"; module docstring).

    Args:
      left_path, right_path: 16-bit greyscale PNG (or PGM/TIFF) views, [H, W].
      white_left, white_right: white-sheet images of the same size for vignetting
        correction; both or neither (None skips the correction).
      preprocess: constants; crop_hw=None keeps the full frame.

    Returns:
      [2, H', W', 1] float32, the pair divided by its joint maximum (max == 1).
    """
    return _load_pixel_pair_peak(left_path, right_path, white_left=white_left,
                                 white_right=white_right, preprocess=preprocess,
                                 expect_16bit=expect_16bit, min_hw=min_hw)[0]


def _load_pixel_pair_peak(left_path, right_path, *, white_left, white_right,
                          preprocess: Pixel4Preprocess, expect_16bit: bool,
                          min_hw: tuple[int, int] | None):
    """`load_pixel_pair`, the joint maximum it divided by (in white-level units) and the
    views' bit depth."""
    p = preprocess
    left, right, depth = _load_raw_pair_depth(left_path, right_path, expect_16bit=expect_16bit,
                                              min_hw=min_hw)
    if left.ndim != 2:
        raise InputError(f"{left_path}: expected single-channel Pixel DP views, got {left.shape}")
    left, right = _pixel_preprocess(left, p), _pixel_preprocess(right, p)
    if (white_left is None) != (white_right is None):
        raise ValueError("give both white_left and white_right, or neither")
    if white_left is not None:
        wl, wr = _load_raw_pair(white_left, white_right, expect_16bit=expect_16bit, min_hw=None)
        if wl.shape != left.shape:
            raise InputError(f"white sheets {wl.shape} do not match the views {left.shape}")
        wl, wr = _pixel_preprocess(wl, p), _pixel_preprocess(wr, p)
        if np.any(wr <= 0):
            raise InputError(f"{white_right}: white sheet is zero (at or below the black level) "
                             f"at {int(np.sum(wr <= 0))} pixels; cannot form the vignetting ratio")
        right = right * box_filter(wl / wr, p.vignetting_box)
    left = _central_crop(left, p.crop_hw, str(left_path))
    right = _central_crop(right, p.crop_hw, str(right_path))
    views, peak = _normalise_pair_peak(left, right, str(left_path))
    return views, peak, depth


def _scene_id(scene_id: int | str) -> str:
    if isinstance(scene_id, (int, np.integer)):
        return f"{int(scene_id):03d}"
    scene_id = str(scene_id)
    return scene_id.zfill(3) if scene_id.isdigit() else scene_id


def load_pixel4_scene(data_dir, scene_id: int | str, *,
                      preprocess: Pixel4Preprocess = Pixel4Preprocess(), vignetting: bool = True,
                      require_gt: bool = False) -> Pixel4Scene:
    """Load one scene of the Pixel 4 dataset layout (data/pixel4/README.md).

    Files: data_dir/NNN_left.png, NNN_right.png, calibration/white_sheet_{left,right}.png,
    gt_all_in_focus_im/NNN_gt.png, gt_defocus_map/NNN_gt.png. Missing ground truth
    is None unless require_gt, which raises FileNotFoundError naming the file.
    """
    data_dir = Path(data_dir)
    sid = _scene_id(scene_id)
    paths = [data_dir / f"{sid}_left.png", data_dir / f"{sid}_right.png"]
    if vignetting:
        paths += [data_dir / "calibration" / WHITE_LEFT, data_dir / "calibration" / WHITE_RIGHT]
    for path in paths:
        if not path.is_file():
            raise MissingFileError(f"Pixel 4 scene {sid}: file not found: {path}")
    whites = {"white_left": paths[2], "white_right": paths[3]} if vignetting else {}
    views = load_pixel_pair(paths[0], paths[1], preprocess=preprocess, **whites)

    def _gt(sub: str) -> np.ndarray | None:
        path = data_dir / sub / f"{sid}_gt.png"
        if not path.is_file():
            if require_gt:
                raise MissingFileError(f"Pixel 4 scene {sid}: ground truth not found: {path}")
            return None
        arr, _ = read_image(path)
        if arr.ndim != 2:
            raise InputError(f"{path}: expected a single-channel ground truth, got {arr.shape}")
        if arr.shape != views.shape[1:3]:
            raise InputError(f"{path}: ground truth {arr.shape} does not match the views "
                             f"{views.shape[1:3]} (check the crop)")
        return arr.astype(np.float32)

    return Pixel4Scene(views=views, gt_all_in_focus=_gt("gt_all_in_focus_im"),
                       gt_defocus=_gt("gt_defocus_map"), scene_id=sid)


# ----------------------------------------------------------------------------------------
# Calibrated kernels


def _validate_kernels(kernels: np.ndarray, grid: tuple[int, int], where: str) -> np.ndarray:
    """Check a [2, T, K, K] bank; returns it clipped at 0 and renormalised to sum 1."""
    if kernels.ndim != 4 or kernels.shape[0] != 2:
        raise ValueError(f"{where}: kernels must be [2, T, K, K], got {kernels.shape}")
    _, t, kh, kw = kernels.shape
    rows, cols = grid
    if t != rows * cols:
        raise ValueError(f"{where}: {t} kernels per view but the grid {rows}x{cols} "
                         f"has {rows * cols} tiles")
    if kh != kw or kh % 2 != 1:
        raise ValueError(f"{where}: kernels must be square with an odd side, got {kh}x{kw}")
    if not np.all(np.isfinite(kernels)):
        raise ValueError(f"{where}: kernels contain NaN or Inf")
    k = kernels.astype(np.float64)
    peak = k.max(axis=(-2, -1), keepdims=True)
    if np.any(peak <= 0):
        raise ValueError(f"{where}: a kernel has no positive value")
    if np.any(k.min(axis=(-2, -1), keepdims=True) < -_KERNEL_NEG_RTOL * peak):
        raise ValueError(f"{where}: kernels have negative values deeper than "
                         f"{_KERNEL_NEG_RTOL:g} x their peak")
    sums = k.sum(axis=(-2, -1))
    bad = np.abs(sums - 1) > _KERNEL_SUM_RTOL
    if np.any(bad):
        v, i = np.argwhere(bad)[0]
        raise ValueError(f"{where}: kernel sums must be ~1; view {v} tile {i} sums to "
                         f"{sums[v, i]:.6g} ({int(bad.sum())} kernels off by > "
                         f"{_KERNEL_SUM_RTOL:g})")
    k = np.maximum(k, 0.0)
    return (k / k.sum(axis=(-2, -1), keepdims=True)).astype(np.float32)


def load_calibration_kernels(calib_dir, *, grid: tuple[int, int] | None = None,
                             tile_size: int | None = None) -> CalibratedKernels:
    """Load blur_kernels_left.npy / blur_kernels_right.npy ([T, K, K] each).

    grid / tile_size default to kernels_meta.json in calib_dir when present (written
    by `save_calibration_kernels`), else to the Pixel 4 values (6, 8) and 168; its
    optional "blur_p90" becomes CalibratedKernels.blur_p90.
    Explicit values that contradict kernels_meta.json raise ValueError.
    """
    calib_dir = Path(calib_dir)
    meta_path = calib_dir / KERNELS_META
    meta = {}
    blur_p90 = None
    if meta_path.is_file():
        try:
            raw = json.loads(meta_path.read_text())
            meta = {"grid": tuple(int(v) for v in raw["grid"]),
                    "tile_size": int(raw["tile_size"])}
            if raw.get("blur_p90") is not None:
                blur_p90 = float(raw["blur_p90"])
                if not (np.isfinite(blur_p90) and blur_p90 > 0):
                    raise ValueError(f"blur_p90 must be a positive number, not {blur_p90}")
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{meta_path}: unreadable kernel metadata ({e})") from e
    for key, value in (("grid", None if grid is None else tuple(grid)), ("tile_size", tile_size)):
        if value is not None and key in meta and meta[key] != value:
            raise ValueError(f"{meta_path} says {key}={meta[key]} but {value} was requested")
    grid = tuple(grid) if grid is not None else meta.get("grid", PIXEL4_GRID)
    tile_size = tile_size if tile_size is not None else meta.get("tile_size", PIXEL4_TILE)

    views = []
    for fname in (KERNELS_LEFT, KERNELS_RIGHT):
        path = calib_dir / fname
        if not path.is_file():
            raise MissingFileError(f"calibration file not found: {path}")
        try:
            views.append(np.load(path, allow_pickle=False))
        except (OSError, ValueError) as e:
            raise ValueError(f"{path}: unreadable kernel file ({e})") from e
    if views[0].shape != views[1].shape:
        raise ValueError(f"{calib_dir}: left kernels {views[0].shape} and right kernels "
                         f"{views[1].shape} differ in shape")
    kernels = _validate_kernels(np.stack(views), grid, str(calib_dir))
    return CalibratedKernels(kernels=kernels, grid=(int(grid[0]), int(grid[1])),
                             tile_size=int(tile_size), blur_p90=blur_p90)


def save_calibration_kernels(calib_dir, calib: CalibratedKernels, *,
                             extra_meta: dict | None = None) -> None:
    """Write blur_kernels_{left,right}.npy and kernels_meta.json (grid, tile size and
    blur_p90 when known), atomically.

    extra_meta: more kernels_meta.json entries (how the kernels were estimated, ...);
    they may not redefine "grid", "tile_size" or "blur_p90". Loaders read only those.
    """
    from dpjax.outputs import atomic_write, write_json

    calib_dir = Path(calib_dir)
    meta = {"grid": list(calib.grid), "tile_size": calib.tile_size}
    if calib.blur_p90 is not None:
        meta["blur_p90"] = float(calib.blur_p90)
    clash = sorted({"grid", "tile_size", "blur_p90"} & set(extra_meta or {}))
    if clash:
        raise ValueError(f"extra_meta may not redefine {clash}")
    kernels = _validate_kernels(np.asarray(calib.kernels), tuple(calib.grid), "save")
    for v, fname in enumerate((KERNELS_LEFT, KERNELS_RIGHT)):
        atomic_write(calib_dir / fname, lambda fh, k=kernels[v]: np.save(fh, k))
    write_json(calib_dir / KERNELS_META, {**meta, **(extra_meta or {})})


def copy_white_sheets(src_dir, dst_dir) -> list[Path]:
    """Copy white_sheet_{left,right}.png that src_dir has into dst_dir (so that a
    calibration folder derived from another keeps its vignetting correction).

    Returns the copied files' new paths (empty when src_dir has none).
    """
    copied = []
    for name in (WHITE_LEFT, WHITE_RIGHT):
        if (Path(src_dir) / name).is_file():
            copied.append(Path(shutil.copy(Path(src_dir) / name, Path(dst_dir) / name)))
    return copied


def check_kernels_match_image(calib: CalibratedKernels, height: int, width: int) -> None:
    """ValueError unless the kernel grid covers exactly a height x width image."""
    rows, cols = calib.grid
    h, w = rows * calib.tile_size, cols * calib.tile_size
    if (h, w) != (height, width):
        raise ValueError(f"calibration covers {h}x{w} px ({rows}x{cols} tiles of "
                         f"{calib.tile_size} px) but the image is {height}x{width}; "
                         "the kernels do not belong to this image size (check the crop)")


# ----------------------------------------------------------------------------------------
# Camera settings (EXIF)

# EXIF tags: IFD0 Make, Model; Exif IFD FNumber, FocalLength.
_EXIF_IFD = 0x8769
_EXIF_TAGS = {"make": (None, 0x010F), "model": (None, 0x0110),
              "f_number": (_EXIF_IFD, 0x829D), "focal_length_mm": (_EXIF_IFD, 0x920A)}


def read_camera_settings(path) -> dict:
    """Camera make/model, f-number and focal length from an image's EXIF, when present.

    Reads EXIF through PIL (PNG eXIf chunk, TIFF, JPEG). Returns a dict with the keys
    found among "make", "model" (stripped strings), "f_number", "focal_length_mm"
    (floats); {} for a file without EXIF. Raises MissingFileError for a missing file
    and InputError for one PIL cannot open.
    """
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"image not found: {path}")
    try:
        with Image.open(path) as im:
            exif = im.getexif()
            out = {}
            for key, (ifd, tag) in _EXIF_TAGS.items():
                table = exif if ifd is None else exif.get_ifd(ifd)
                value = table.get(tag)
                if value is None:
                    continue
                if key in ("make", "model"):
                    if isinstance(value, bytes):
                        value = value.decode(errors="replace")
                    text = str(value).strip("\x00 ").strip()
                    if text:
                        out[key] = text
                else:
                    try:
                        out[key] = float(value)
                    except (TypeError, ValueError, ZeroDivisionError):
                        continue
            return out
    except (OSError, SyntaxError, ValueError) as e:
        raise InputError(f"{path}: cannot read EXIF ({e})") from e


# ----------------------------------------------------------------------------------------
# Other DP formats


def load_pgm_pair(left, right, *, black_level: float, expect_16bit: bool = True,
                  min_hw: tuple[int, int] | None = None) -> np.ndarray:
    """Binary PGM views (Google's DP capture app: 16-bit big-endian P5).

    Returns [2, H, W, 1] float32: black level subtracted, clipped at 0, / pair max.
    8-bit PGMs (maxval < 256) raise InputError unless expect_16bit=False.
    """
    a, b = _load_raw_pair(left, right, expect_16bit=expect_16bit, min_hw=min_hw)
    return _normalise_pair(_subtract_black(a, black_level), _subtract_black(b, black_level),
                           str(left))


def load_png_pair(left, right, *, black_level: float = 0, expect_16bit: bool = True,
                  min_hw: tuple[int, int] | None = None) -> np.ndarray:
    """PNG views, e.g. Canon-style *_L.png / *_R.png, 16-bit colour or greyscale.

    Returns [2, H, W, C] float32 (C = 3 colour, 1 greyscale; alpha dropped): black
    level subtracted, clipped at 0, divided by the pair max.
    """
    a, b = _load_raw_pair(left, right, expect_16bit=expect_16bit, min_hw=min_hw)
    return _normalise_pair(_subtract_black(a, black_level), _subtract_black(b, black_level),
                           str(left))


def load_tiff_pair(left, right, *, black_level: float = 0, expect_16bit: bool = True,
                   min_hw: tuple[int, int] | None = None) -> np.ndarray:
    """TIFF views (integer or float, [H, W] or [H, W, C]) via tifffile.

    Returns [2, H, W, C] float32 divided by the pair max. expect_16bit rejects 8-bit
    integer data only; float data is accepted but must be finite.
    """
    a, b = _load_raw_pair(left, right, expect_16bit=expect_16bit, min_hw=min_hw)
    return _normalise_pair(_subtract_black(a, black_level), _subtract_black(b, black_level),
                           str(left))


class Preprocessing(NamedTuple):
    """What `load_pair_with_info` assumed and did to a pair (for result.json: `as_dict`).

    format: the pair's format ("pixel", "canon", "pgm", "tiff", "jpeg").
    encoding: the transfer function the stored values were decoded with.
    encoding_auto: True when `encoding` was chosen by `encoding.auto_encoding`.
    bit_depth: bits per sample of the files (8, 16, ...), None for floating point.
    black_level: subtracted from the stored values (linear input only), in file units.
    full_scale: the stored value of white: 2^bit_depth - 1, 1.0 for floating point; for
      Pixel raw views the white level (2^14 - 1), applied after the black level.
    scale: the factor the linear pair was divided by (its joint maximum), in units of
      full scale: views * scale = linear intensity with white = 1. Writing a result
      back in the input's units is `from_linear(result * scale, encoding)`.
    channels: C of the views (1 or 3).
    """

    format: str
    encoding: Encoding
    encoding_auto: bool
    bit_depth: int | None
    black_level: float
    full_scale: float
    scale: float
    channels: int

    def as_dict(self) -> dict:
        """Plain JSON types; the encoding in its text form ("srgb", "gamma:2.2", ...)."""
        return {"format": self.format, "encoding": str(self.encoding),
                "encoding_auto": self.encoding_auto, "bit_depth": self.bit_depth,
                "black_level": self.black_level, "full_scale": self.full_scale,
                "scale": self.scale, "channels": self.channels}

    @classmethod
    def from_dict(cls, d: dict) -> Preprocessing:
        """Inverse of `as_dict` (e.g. from result.json "preprocessing"."input")."""
        return cls(**{**d, "encoding": parse_encoding(d["encoding"])})

    def display_kwargs(self, *, bits: int | None = None) -> dict:
        """Keyword arguments for `outputs.write_result` / `outputs.display_image`.

        Linear input gets the viewing transform (`outputs.to_display`, encoding None);
        encoded input is written back in its own encoding, scale and bit depth (8-bit
        files as 8-bit PNGs, deeper or float files as 16-bit PNGs) unless `bits` is
        given (thumbnails need 8).
        """
        if self.encoding.is_linear:
            return {"encoding": None}
        out_bits = bits if bits is not None else (8 if self.bit_depth == 8 else 16)
        return {"encoding": self.encoding, "scale": self.scale, "bits": out_bits}


class LoadedPair(NamedTuple):
    """views: [2, H, W, C] float32 linear, max 1; preprocessing: what was done."""

    views: np.ndarray
    preprocessing: Preprocessing


# Formats whose files hold raw sensor values (linear whatever their bit depth).
RAW_FORMATS = ("pixel", "pgm")
FORMATS = ("pixel", "canon", "pgm", "tiff", "jpeg")


def load_pair(pair: ScenePair, *, black_level: float | None = None, expect_16bit: bool = True,
              min_hw: tuple[int, int] | None = None,
              pixel_preprocess: Pixel4Preprocess = Pixel4Preprocess(),
              white_left=None, white_right=None,
              encoding: Encoding | str = AUTO) -> np.ndarray:
    """Load a discovered pair with the loader of its format; returns [2, H, W, C] float32.

    The views of `load_pair_with_info` (see there for the arguments).
    """
    return load_pair_with_info(pair, black_level=black_level, expect_16bit=expect_16bit,
                               min_hw=min_hw, pixel_preprocess=pixel_preprocess,
                               white_left=white_left, white_right=white_right,
                               encoding=encoding).views


def load_pair_with_info(pair: ScenePair, *, black_level: float | None = None,
                        expect_16bit: bool = True, min_hw: tuple[int, int] | None = None,
                        pixel_preprocess: Pixel4Preprocess = Pixel4Preprocess(),
                        white_left=None, white_right=None,
                        encoding: Encoding | str = AUTO) -> LoadedPair:
    """Load a discovered pair as linear views, and record what was assumed.

    Args:
      pair: from `discover_pairs`.
      black_level: None uses the format's default (Pixel: pixel_preprocess.black_level,
        else 0; required for linear PGM, whose black level depends on the capture app).
        Applies to linear input only; a non-zero value with an encoded pair is an error.
      expect_16bit: refuse 8-bit data that is read as linear (Pixel raw, PGM, or any
        file with encoding "linear"): an 8-bit export has lost the raw range. 8-bit
        files read as sRGB / gamma (the "auto" choice for 8-bit PNG, TIFF and JPEG)
        are accepted regardless.
      min_hw: refuse views smaller than (min_height, min_width).
      pixel_preprocess, white_left, white_right: Pixel raw views only (`load_pixel_pair`).
      encoding: "auto" (per file, `encoding.auto_encoding`), "linear", "srgb",
        "gamma:G" or an Encoding. Raw formats must be linear.

    Returns:
      LoadedPair: views [2, H, W, C] float32, linear, divided by the pair's joint
      maximum (so max 1); linear input gives exactly the views of the per-format
      loaders (`load_png_pair`, ...). preprocessing: a `Preprocessing` record.

    Raises:
      InputError: unreadable, mismatched or unusable files, or an encoding that does
        not fit the format (naming the file).
      ValueError: a bad encoding text or a PGM pair read as linear without a black level.
    """
    requested = parse_encoding(encoding, allow_auto=True)
    if pair.format not in FORMATS:
        raise ValueError(f"{pair.name}: unknown format {pair.format!r}")
    left_path, right_path = pair.left, pair.right
    name = str(left_path)
    if pair.format == "pixel":
        if requested is not None and not requested.is_linear:
            raise InputError(f"{name}: Pixel raw views are linear; encoding {requested} does "
                             "not apply (use 'auto' or 'linear')")
        if black_level is not None:
            pixel_preprocess = dataclasses.replace(pixel_preprocess, black_level=black_level)
        views, peak, depth = _load_pixel_pair_peak(
            left_path, right_path, white_left=white_left, white_right=white_right,
            preprocess=pixel_preprocess, expect_16bit=expect_16bit, min_hw=min_hw)
        p = pixel_preprocess
        info = Preprocessing(format="pixel", encoding=LINEAR, encoding_auto=requested is None,
                             bit_depth=depth, black_level=float(p.black_level),
                             full_scale=float(p.white_level), scale=peak,
                             channels=int(views.shape[-1]))
        return LoadedPair(views, info)

    left, right, depths = _read_raw_pair(left_path, right_path)
    depth = depths[0]
    raw = pair.format in RAW_FORMATS
    enc = requested if requested is not None else auto_encoding(depth, raw_format=raw)
    validate_pair(left, right, names=(str(left_path), str(right_path)), bit_depths=depths,
                  expect_16bit=expect_16bit and enc.is_linear, min_hw=min_hw)
    depth = _check_same_depth(left_path, right_path, depths)
    full_scale = 1.0 if depth is None else float(2**depth - 1)
    if enc.is_linear:
        if black_level is None:
            if pair.format == "pgm":
                raise ValueError(f"{pair.name}: PGM input needs an explicit black_level")
            black_level = 0
        views, peak = _normalise_pair_peak(_subtract_black(left, black_level),
                                           _subtract_black(right, black_level), name)
        scale = peak / full_scale
    else:
        if black_level:
            raise InputError(f"{name}: a black level ({black_level:g}) applies to linear input "
                             f"only, but this pair is read as {enc}")
        black_level = 0
        lin = [to_linear(np.asarray(a, np.float64) / full_scale, enc) for a in (left, right)]
        views, scale = _normalise_pair_peak(lin[0], lin[1], name)
    info = Preprocessing(format=pair.format, encoding=enc, encoding_auto=requested is None,
                         bit_depth=depth, black_level=float(black_level),
                         full_scale=full_scale, scale=float(scale),
                         channels=int(views.shape[-1]))
    return LoadedPair(views, info)


def _header_bit_depth(path: Path) -> int | None:
    """Bits per sample from an image file's header as `read_image` would report them
    (None for floating point), without decoding pixels. Raises InputError when the
    header cannot tell, and for PGM (raw sensor data, whose encoding is not automatic)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(_PNG_HEAD)
    except OSError as e:
        raise InputError(f"{path}: unreadable ({e})") from e
    kind = _image_kind(path, head)
    if kind == "png":
        ihdr = _ihdr_of(head)
        if ihdr is None:
            raise InputError(f"{path}: no PNG header")
        return int(ihdr[8])
    if kind == "pgm":
        raise InputError(f"{path}: a PGM file's encoding is decided when it is read")
    if kind == "tiff":
        import tifffile

        try:
            with tifffile.TiffFile(path) as tf:
                dtype = np.dtype(tf.pages[0].dtype)
        except Exception as e:  # tifffile raises several types for corrupt files
            raise InputError(f"{path}: unreadable TIFF header ({type(e).__name__})") from e
        return None if dtype.kind == "f" else 8 * dtype.itemsize
    if kind == "jpeg":
        return 8
    raise InputError(f"{path}: no PNG, PGM, TIFF or JPEG header")


def probe_encoding(pair: ScenePair, encoding: Encoding | str = AUTO) -> Encoding | None:
    """The encoding `load_pair_with_info` reads `pair` with, from the left file's header
    (no pixels decoded): what a result's settings fingerprint needs before the solve.

    Returns None when the header cannot tell (a missing, broken or unknown file): the
    load then decides, and reports what is wrong.
    """
    requested = parse_encoding(encoding, allow_auto=True)
    if requested is not None:
        return requested
    if pair.format in RAW_FORMATS:
        return LINEAR
    if pair.left is None:
        return None
    try:
        depth = _header_bit_depth(Path(pair.left))
    except InputError:
        return None
    return auto_encoding(depth, raw_format=False)


# ----------------------------------------------------------------------------------------
# Scene names and discovery


_NAME_MAX_BYTES = 255  # the usual file-name limit (NAME_MAX) of POSIX file systems


def check_scene_name(name: str) -> str:
    """Return name unchanged if it is safe as a relative output path, else InputError.

    A scene name is a relative POSIX path; the runner writes a scene's files under
    output_dir/name, so every "/"-separated component must be one ordinary folder
    name: not empty (no leading, trailing or doubled "/", so never absolute), not
    "." or "..", no backslash, no control characters (including NUL and newlines),
    not starting with "-" (it would read as an option to command-line tools) or "."
    (hidden: the batch runner's staging folders are), valid
    UTF-8 (file names that are not are refused) and at most 255 bytes. The error
    message is one line with the name escaped.
    """
    if not isinstance(name, str):
        raise InputError(f"scene name must be text, got {type(name).__name__}")
    shown = ascii(name)
    if not name:
        raise InputError("unsafe scene name '': empty")
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise InputError(f"unsafe scene name {shown}: not valid UTF-8") from None
    for part in name.split("/"):
        reason = None
        if not part:
            reason = "empty path component (leading, trailing or doubled '/')"
        elif part in (".", ".."):
            reason = f"path component {part!r} is not allowed"
        elif part.startswith("."):
            reason = f"path component {ascii(part)} starts with '.' (hidden; the runner's own"\
                     " temporary folders do)"
        elif "\\" in part:
            reason = "backslash in name"
        elif any(ord(ch) < 32 or 127 <= ord(ch) < 160 for ch in part):
            reason = "control character in name"
        elif part.startswith("-"):
            reason = f"path component {ascii(part)} starts with '-'"
        elif len(part.encode("utf-8")) > _NAME_MAX_BYTES:
            reason = f"path component longer than {_NAME_MAX_BYTES} bytes"
        if reason is not None:
            raise InputError(f"unsafe scene name {shown}: {reason}")
    return name


class SkippedInput(NamedTuple):
    """A file or folder `scan_inputs` could not turn into a scene, and why (one line)."""

    path: Path
    reason: str


class Discovery(NamedTuple):
    """pairs: the scenes found, sorted by name; skipped: what was left out and why."""

    pairs: list[ScenePair]
    skipped: list[SkippedInput]


# NAME_left / NAME_right / NAME_L / NAME_R, and a bare l / r (one scene per folder).
_PAIR_RE = re.compile(
    r"^(?P<name>.+)_(?P<side>left|right|l|r)\.(?P<ext>png|pgm|tiff?|jpe?g)$", re.IGNORECASE)
_BARE_RE = re.compile(r"^(?P<side>l|r)\.(?P<ext>png|pgm|tiff?|jpe?g)$", re.IGNORECASE)
_FAMILY = {"png": "png", "pgm": "pgm", "tif": "tiff", "tiff": "tiff", "jpg": "jpeg",
           "jpeg": "jpeg"}
_NOT_VIEWS = (WHITE_LEFT, WHITE_RIGHT)  # calibration files named like views


def _is_grey_png(path: Path) -> bool:
    """Whether a PNG's header says greyscale (Pixel raw views are; colour PNGs never);
    True if unreadable, so that a broken file keeps the name-based format and fails at
    load, naming itself."""
    try:
        with open(path, "rb") as fh:
            ihdr = _ihdr_of(fh.read(_PNG_HEAD))
    except OSError:
        return True
    return ihdr is None or ihdr[9] in (0, 4)  # colour type: greyscale, greyscale + alpha


def scan_inputs(input_dir) -> Discovery:
    """Find DP pairs under input_dir at any depth; see `discover_pairs` for the rules.

    Unlike `discover_pairs`, also returns what was skipped: pairs whose scene name
    fails `check_scene_name`, and folders that could not be listed.
    """
    input_dir = Path(input_dir)
    if not input_dir.is_dir():
        raise MissingFileError(f"input folder not found: {input_dir}")
    skipped: list[SkippedInput] = []
    # (folder, stem, family, naming, extra) -> {"left": path, "right": path}; stem is the
    # NAME of NAME_left (the file name for an extra view), None for a bare l / r.
    groups: dict[tuple, dict[str, Path]] = {}
    seen: set[tuple[int, int]] = set()

    def unreadable(e: OSError) -> None:
        skipped.append(SkippedInput(Path(e.filename or input_dir),
                                    f"cannot list folder: {e.strerror or e}"))

    for dirpath, dirnames, filenames in os.walk(input_dir, onerror=unreadable,
                                                followlinks=True):
        try:
            st = os.stat(dirpath)
        except OSError as e:
            unreadable(e)
            dirnames[:] = []
            continue
        if (st.st_dev, st.st_ino) in seen:  # a symlink loop or a second link to a folder
            dirnames[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        folder = Path(dirpath).relative_to(input_dir).as_posix()
        for fname in sorted(filenames):
            if fname.startswith(".") or fname.lower() in _NOT_VIEWS:
                continue
            m = _PAIR_RE.match(fname)
            if m is not None:
                stem, side = m["name"], m["side"].lower()
                naming = "long" if len(side) > 1 else "short"
            else:
                m = _BARE_RE.match(fname)
                if m is None:
                    continue
                stem, side, naming = None, m["side"].lower(), "bare"
            path = Path(dirpath) / fname
            if not path.is_file():
                continue
            family = _FAMILY[m["ext"].lower()]
            key = "left" if side.startswith("l") else "right"
            views = groups.setdefault((folder, stem, family, naming, False), {})
            if key in views:  # e.g. x_left.tif and x_left.tiff: report the extra one alone
                views = groups.setdefault((folder, fname, family, naming, True), {})
            views[key] = path

    found = []
    for (folder, stem, family, naming, _), views in groups.items():
        if family == "png":
            first = views.get("left") or views["right"]
            fmt = "pixel" if naming == "long" and _is_grey_png(first) else "canon"
        else:
            fmt = family
        if stem is None:
            base = folder if folder != "." else input_dir.resolve().name
        else:
            base = stem if folder == "." else f"{folder}/{stem}"
        found.append((base, fmt, views))
    counts: dict[str, int] = {}
    for base, _, _ in found:
        counts[base] = counts.get(base, 0) + 1
    found.sort(key=lambda f: (f[0], f[1], str(f[2].get("left") or f[2].get("right"))))
    used = {base for base, _, _ in found if counts[base] == 1}
    pairs = []
    for base, fmt, views in found:
        name = base
        if counts[base] > 1:  # one NAME in two formats (or forms): NAME_format, then _2, ...
            name, k = f"{base}_{fmt}", 2
            while name in used:
                name, k = f"{base}_{fmt}_{k}", k + 1
            used.add(name)
        pair = ScenePair(name=name, left=views.get("left"), right=views.get("right"),
                         format=fmt)
        try:
            check_scene_name(name)
        except InputError as e:
            skipped.append(SkippedInput(pair.left or pair.right, str(e)))
            continue
        pairs.append(pair)
    return Discovery(sorted(pairs, key=lambda p: p.name), skipped)


def discover_pairs(input_dir) -> list[ScenePair]:
    """Find DP pairs in input_dir and every folder below it, sorted by scene name.

    Recognised files (case-insensitive, extensions .png, .pgm, .tif/.tiff, .jpg/.jpeg):
    - NAME_left / NAME_right and NAME_L / NAME_R in any folder: scene
      "FOLDER/NAME", FOLDER the folder's path relative to input_dir (POSIX "/"; just
      NAME at the top level);
    - a bare l / r, one scene per folder: scene "FOLDER" (at the top level, the input
      folder's own name).
    Formats: .pgm "pgm", .tif/.tiff "tiff", .jpg/.jpeg "jpeg"; .png "pixel" (Pixel DP
    raw, black level 1024) for NAME_left / NAME_right whose header says greyscale,
    else "canon" (generic PNG, black level 0; a colour NAME_left.png is a user's
    photo, never Pixel raw).

    Everything else is ignored without error: other files (depth maps d.png, ground
    truth NNN_gt.png, the calibration white sheets white_sheet_left/right.png), and
    files and folders whose names start with "." (hidden). Symbolic links are
    followed (a folder reached twice is read once). A view without its partner is
    returned with the other side None, never dropped; so is a second view for the
    same side (named after its file). When one name occurs twice (two formats, or a
    folder scene "x" beside a file pair "x_L"), each becomes NAME_format (then
    NAME_format_2, ...). Pairs whose scene name fails `check_scene_name` are left
    out; `scan_inputs` returns them with the reason.
    """
    return scan_inputs(input_dir).pairs
