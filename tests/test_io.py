"""Tests for dpjax.io: Pixel 4 loading and preprocessing, kernels, other formats, errors."""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from dpjax import io as dio

PIXEL4 = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "pixel4"


@pytest.fixture(scope="module")
def pixel4():
    if not PIXEL4.exists():
        pytest.skip(f"shared Pixel 4 data not found at {PIXEL4}")
    return PIXEL4


# ----------------------------------------------------------------------------------------
# Independent writers for test files


def _png_bytes(a: np.ndarray, filters=(0, 1, 2, 3, 4)) -> bytes:
    """Reference PNG encoder cycling the scanline filters row by row (spec definitions)."""
    a = np.asarray(a)
    if a.ndim == 2:
        a = a[..., None]
    h, w, c = a.shape
    bpp = c * a.dtype.itemsize
    raw = np.ascontiguousarray(a.astype(a.dtype.newbyteorder(">"))).view(np.uint8)
    raw = raw.reshape(h, w * bpp).astype(np.int32)
    up = np.vstack([np.zeros((1, w * bpp), np.int32), raw[:-1]])
    left = np.hstack([np.zeros((h, bpp), np.int32), raw[:, :-bpp]])
    upleft = np.hstack([np.zeros((h, bpp), np.int32), up[:, :-bpp]])
    p = left + up - upleft
    pa, pb, pc = abs(p - left), abs(p - up), abs(p - upleft)
    paeth = np.where((pa <= pb) & (pa <= pc), left, np.where(pb <= pc, up, upleft))
    preds = [0 * raw, left, up, (left + up) // 2, paeth]
    scan = np.empty((h, 1 + w * bpp), np.uint8)
    for y in range(h):
        t = filters[y % len(filters)]
        scan[y, 0] = t
        scan[y, 1:] = (raw[y] - preds[t][y]) % 256

    def chunk(ctype, body):
        return struct.pack(">I", len(body)) + ctype + body + struct.pack(
            ">I", zlib.crc32(ctype + body))

    colour = {1: 0, 2: 4, 3: 2, 4: 6}[c]
    ihdr = struct.pack(">IIBBBBB", w, h, 8 * a.dtype.itemsize, colour, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
            + chunk(b"IDAT", zlib.compress(scan.tobytes())) + chunk(b"IEND", b""))


def _write_pgm(path: Path, a: np.ndarray, maxval: int, comment: bool = True) -> Path:
    head = b"P5\n" + (b"# written by a test\n" if comment else b"")
    head += f"{a.shape[1]} {a.shape[0]}\n{maxval}\n".encode()
    body = a.astype(">u2" if maxval > 255 else np.uint8).tobytes()
    path.write_bytes(head + body)
    return path


def _write_grey16(path: Path, a: np.ndarray) -> Path:
    Image.fromarray(a.astype(np.uint16)).save(path)  # PIL writes 16-bit greyscale PNG
    return path


def _raw16(rng, shape, lo=0, hi=65535):
    return rng.integers(lo, hi + 1, shape).astype(np.uint16)


# ----------------------------------------------------------------------------------------
# Box filter


def test_box_filter_matches_direct_mean_with_reflect_edges():
    rng = np.random.default_rng(0)
    x = rng.random((13, 17))
    for size in (1, 3, 7):
        r = size // 2
        padded = np.pad(x, r, mode="reflect")
        direct = np.array([[padded[i:i + size, j:j + size].mean() for j in range(17)]
                           for i in range(13)])
        np.testing.assert_allclose(dio.box_filter(x, size), direct, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(dio.box_filter(np.full((5, 9), 2.5), 101), 2.5, rtol=1e-12)
    with pytest.raises(ValueError, match="odd"):
        dio.box_filter(x, 4)


# ----------------------------------------------------------------------------------------
# Shared Pixel 4 data


def test_pixel4_scene_shapes_range_and_ground_truth(pixel4):
    scene = dio.load_pixel4_scene(pixel4, "001")
    assert scene.scene_id == "001"
    assert scene.views.shape == (2, 1008, 1344, 1) and scene.views.dtype == np.float32
    assert scene.views.min() >= 0 and scene.views.max() == 1.0
    assert scene.gt_all_in_focus.shape == scene.views.shape[1:3]
    assert scene.gt_defocus.shape == scene.views.shape[1:3]
    assert scene.gt_all_in_focus.dtype == np.float32 and scene.gt_defocus.dtype == np.float32
    assert scene.gt_all_in_focus.max() > 255  # raw 16-bit values, not rescaled
    assert 0 < scene.gt_defocus.max() <= 255 and scene.gt_defocus.min() == 0
    # An integer id names the same scene.
    np.testing.assert_array_equal(dio.load_pixel4_scene(pixel4, 1).views, scene.views)


def test_pixel4_preprocessing_follows_method(pixel4):
    """Black level, white level, central crop and joint max, recomputed by hand."""
    p = dio.Pixel4Preprocess()
    views = dio.load_pixel_pair(pixel4 / "005_left.png", pixel4 / "005_right.png")
    raw = [np.asarray(Image.open(pixel4 / f"005_{s}.png")).astype(np.float64)
           for s in ("left", "right")]
    pre = [np.clip(r - 1024, 0, None) / (2**14 - 1) for r in raw]
    y0, x0 = (1512 - 1008) // 2, (2016 - 1344) // 2
    crop = np.stack(pre)[:, y0:y0 + 1008, x0:x0 + 1344]
    np.testing.assert_allclose(views[..., 0], crop / crop.max(), rtol=1e-6, atol=1e-7)
    full = dio.load_pixel_pair(pixel4 / "005_left.png", pixel4 / "005_right.png",
                               preprocess=dio.Pixel4Preprocess(crop_hw=None))
    assert full.shape == (2, 1512, 2016, 1) and full.max() == 1.0
    assert p.black_level == 1024 and p.white_level == 2**14 - 1 and p.vignetting_box == 101


def test_vignetting_correction_balances_left_and_right(pixel4):
    for sid in ("001", "013"):
        with_v = dio.load_pixel4_scene(pixel4, sid).views
        without = dio.load_pixel4_scene(pixel4, sid, vignetting=False).views
        ratio_with = with_v[0].mean() / with_v[1].mean()
        ratio_without = without[0].mean() / without[1].mean()
        assert abs(np.log(ratio_with)) < abs(np.log(ratio_without))
        assert abs(ratio_with - 1) < 0.05
        # The left view is only renormalised by the joint max: its shape is unchanged.
        np.testing.assert_allclose(with_v[0] / with_v[0].max(), without[0] / without[0].max(),
                                   rtol=1e-5, atol=1e-6)


def test_pixel4_kernels_load_and_validate(pixel4):
    calib = dio.load_calibration_kernels(pixel4 / "calibration")
    assert calib.kernels.shape == (2, 48, 61, 61) and calib.kernels.dtype == np.float32
    assert calib.grid == (6, 8) and calib.tile_size == 168
    np.testing.assert_allclose(calib.kernels.sum(axis=(-2, -1)), 1.0, atol=1e-6)
    assert calib.kernels.min() >= 0
    raw_left = np.load(pixel4 / "calibration" / "blur_kernels_left.npy")
    np.testing.assert_allclose(calib.kernels[0], raw_left, atol=1e-6)
    dio.check_kernels_match_image(calib, 1008, 1344)
    with pytest.raises(ValueError, match="1512x2016"):
        dio.check_kernels_match_image(calib, 1512, 2016)


def test_discover_pairs_on_pixel4_folder(pixel4):
    pairs = dio.discover_pairs(pixel4)
    assert [p.name for p in pairs] == ["001", "005", "008", "011", "013", "016"]
    assert all(p.format == "pixel" and p.left and p.right for p in pairs)


# ----------------------------------------------------------------------------------------
# A synthetic scene in the Pixel 4 layout (small crop)


def _synthetic_pixel_dir(tmp_path: Path, *, gt=True, whites=True) -> Path:
    rng = np.random.default_rng(1)
    h, w = 40, 56
    _write_grey16(tmp_path / "007_left.png", _raw16(rng, (h, w), 900, 9000))
    _write_grey16(tmp_path / "007_right.png", _raw16(rng, (h, w), 900, 9000))
    if whites:
        (tmp_path / "calibration").mkdir()
        _yy, xx = np.mgrid[:h, :w]
        falloff = 1 - 0.3 * xx / w  # the right view darker to the right
        _write_grey16(tmp_path / "calibration" / "white_sheet_left.png", np.full((h, w), 6000))
        _write_grey16(tmp_path / "calibration" / "white_sheet_right.png",
                      1024 + (6000 - 1024) * falloff)
    if gt:
        (tmp_path / "gt_all_in_focus_im").mkdir()
        (tmp_path / "gt_defocus_map").mkdir()
        _write_grey16(tmp_path / "gt_all_in_focus_im" / "007_gt.png", _raw16(rng, (24, 32)))
        Image.fromarray(rng.integers(0, 256, (24, 32)).astype(np.uint8)).save(
            tmp_path / "gt_defocus_map" / "007_gt.png")
    return tmp_path


PRE_SMALL = dio.Pixel4Preprocess(crop_hw=(24, 32), vignetting_box=5)


def test_synthetic_pixel_scene_and_vignetting_gain(tmp_path):
    d = _synthetic_pixel_dir(tmp_path)
    scene = dio.load_pixel4_scene(d, 7, preprocess=PRE_SMALL)
    assert scene.scene_id == "007" and scene.views.shape == (2, 24, 32, 1)
    assert scene.gt_all_in_focus.shape == (24, 32) and scene.gt_defocus.shape == (24, 32)
    # Right view multiplied by box(white_L / white_R) before crop and joint max.
    pre = lambda a: np.clip(a.astype(np.float64) - 1024, 0, None) / (2**14 - 1)
    read = lambda p: np.asarray(Image.open(p)).astype(np.float64)
    left, right = pre(read(d / "007_left.png")), pre(read(d / "007_right.png"))
    gain = dio.box_filter(pre(read(d / "calibration/white_sheet_left.png"))
                          / pre(read(d / "calibration/white_sheet_right.png")), 5)
    pair = np.stack([left, right * gain])[:, 8:32, 12:44]
    np.testing.assert_allclose(scene.views[..., 0], pair / pair.max(), rtol=1e-6)


def test_missing_ground_truth_and_calibration_files(tmp_path):
    d = _synthetic_pixel_dir(tmp_path, gt=False)
    scene = dio.load_pixel4_scene(d, "007", preprocess=PRE_SMALL)
    assert scene.gt_all_in_focus is None and scene.gt_defocus is None
    with pytest.raises(FileNotFoundError, match="gt_all_in_focus_im/007_gt.png"):
        dio.load_pixel4_scene(d, "007", preprocess=PRE_SMALL, require_gt=True)
    (d / "calibration" / "white_sheet_right.png").unlink()
    with pytest.raises(FileNotFoundError, match="white_sheet_right.png"):
        dio.load_pixel4_scene(d, "007", preprocess=PRE_SMALL)
    with pytest.raises(FileNotFoundError, match="008_left.png"):
        dio.load_pixel4_scene(d, 8, preprocess=PRE_SMALL)


def test_crop_larger_than_image_is_an_input_error(tmp_path):
    d = _synthetic_pixel_dir(tmp_path)
    with pytest.raises(dio.InputError, match="smaller than the crop"):
        dio.load_pixel4_scene(d, "007")  # default 1008x1344 crop of a 40x56 image


# ----------------------------------------------------------------------------------------
# Calibrated kernels


def _kernels(rng, t=6, k=9):
    ker = rng.random((2, t, k, k)).astype(np.float32)
    return ker / ker.sum(axis=(-2, -1), keepdims=True)


def _save_raw(d: Path, kernels: np.ndarray) -> Path:
    d.mkdir(exist_ok=True)
    np.save(d / "blur_kernels_left.npy", kernels[0])
    np.save(d / "blur_kernels_right.npy", kernels[1])
    return d


def test_kernel_save_load_roundtrip_and_metadata(tmp_path):
    ker = _kernels(np.random.default_rng(0))
    calib = dio.CalibratedKernels(kernels=ker, grid=(2, 3), tile_size=16)
    dio.save_calibration_kernels(tmp_path / "calib", calib)
    loaded = dio.load_calibration_kernels(tmp_path / "calib")  # grid from kernels_meta.json
    assert loaded.grid == (2, 3) and loaded.tile_size == 16
    np.testing.assert_allclose(loaded.kernels, ker, rtol=1e-6)
    dio.check_kernels_match_image(loaded, 32, 48)
    with pytest.raises(ValueError, match="do not belong"):
        dio.check_kernels_match_image(loaded, 32, 40)
    with pytest.raises(ValueError, match="grid"):
        dio.load_calibration_kernels(tmp_path / "calib", grid=(3, 2))
    assert not list((tmp_path / "calib").glob("*.tmp"))
    assert loaded.blur_p90 is None  # a lab calibration does not know its photos' blur


def test_calibration_blur_p90_round_trip_and_errors(tmp_path):
    calib = dio.CalibratedKernels(kernels=_kernels(np.random.default_rng(0)), grid=(2, 3),
                                  tile_size=16, blur_p90=1.04)
    dio.save_calibration_kernels(tmp_path / "calib", calib, extra_meta={"source": "test"})
    assert dio.load_calibration_kernels(tmp_path / "calib").blur_p90 == pytest.approx(1.04)
    with pytest.raises(ValueError, match="may not redefine"):
        dio.save_calibration_kernels(tmp_path / "c2", calib, extra_meta={"blur_p90": 2.0})
    meta_path = tmp_path / "calib" / dio.KERNELS_META
    for bad in (-1.0, "wide", 0):
        meta_path.write_text(json.dumps({"grid": [2, 3], "tile_size": 16, "blur_p90": bad}))
        with pytest.raises(ValueError, match="unreadable kernel metadata"):
            dio.load_calibration_kernels(tmp_path / "calib")


def test_kernels_are_renormalised_exactly(tmp_path):
    ker = _kernels(np.random.default_rng(1)) * 1.004
    ker[0, 0, 0, 0] = -1e-6  # tiny negative ringing is clipped
    calib = dio.load_calibration_kernels(_save_raw(tmp_path / "c", ker), grid=(2, 3))
    np.testing.assert_allclose(calib.kernels.sum(axis=(-2, -1)), 1.0, atol=1e-6)
    assert calib.kernels.min() >= 0


@pytest.mark.parametrize("breakage, message", [
    ("count", "grid"), ("even", "odd"), ("nan", "NaN"), ("negative", "negative"),
    ("sum", "sums"), ("mismatch", "differ in shape"),
])
def test_kernel_validation_errors(tmp_path, breakage, message):
    ker = _kernels(np.random.default_rng(2))
    left, right = ker[0], ker[1]
    if breakage == "count":
        left, right = left[:5], right[:5]
    elif breakage == "even":
        left, right = left[:, :8, :8], right[:, :8, :8]
    elif breakage == "nan":
        left = left.copy()
        left[1, 2, 3] = np.nan
    elif breakage == "negative":
        left = left.copy()
        left[1, 4, 4] = -0.05
    elif breakage == "sum":
        right = right * 2
    elif breakage == "mismatch":
        right = right[:, 1:-1, 1:-1]
    d = tmp_path / "c"
    d.mkdir()
    np.save(d / "blur_kernels_left.npy", left)
    np.save(d / "blur_kernels_right.npy", right)
    with pytest.raises(ValueError, match=message):
        dio.load_calibration_kernels(d, grid=(2, 3), tile_size=16)


def test_missing_calibration_file_is_named(tmp_path):
    d = _save_raw(tmp_path / "c", _kernels(np.random.default_rng(3)))
    (d / "blur_kernels_right.npy").unlink()
    with pytest.raises(FileNotFoundError, match="blur_kernels_right.npy"):
        dio.load_calibration_kernels(d, grid=(2, 3))


# ----------------------------------------------------------------------------------------
# PNG decoding


@pytest.mark.parametrize("channels", [3, 4, 2])
@pytest.mark.parametrize("filters", [(0, 1, 2), (3,), (4,), (0, 1, 2, 3, 4)])
def test_png_decoder_16bit_colour_all_filters(tmp_path, channels, filters):
    a = _raw16(np.random.default_rng(channels), (11, 13, channels))
    path = tmp_path / "x.png"
    path.write_bytes(_png_bytes(a, filters))
    out, depth = dio.read_image(path)
    assert depth == 16 and out.dtype == np.uint16
    expected = a[..., :1][..., 0] if channels == 2 else a[..., :3]  # alpha dropped
    np.testing.assert_array_equal(out, expected)


def test_png_numpy_decoder_agrees_with_pil(tmp_path):
    """The numpy decoder on files PIL reads exactly (PIL's own adaptive filtering)."""
    rng = np.random.default_rng(4)
    smooth = np.cumsum(np.cumsum(rng.integers(0, 9, (23, 31, 3)), 0), 1)
    cases = [smooth.astype(np.uint8), (smooth * 50).astype(np.uint16)[..., 0]]
    for a in cases:
        path = tmp_path / "p.png"
        Image.fromarray(a).save(path)
        data = path.read_bytes()
        info = dio._parse_png(data, "p")
        ours = dio._decode_png_numpy(info, "p")
        np.testing.assert_array_equal(ours.reshape(a.shape), np.asarray(Image.open(path)))


def test_load_png_pair_rgb16_and_black_level(tmp_path):
    rng = np.random.default_rng(5)
    a, b = _raw16(rng, (9, 12, 3), 100, 4000), _raw16(rng, (9, 12, 3), 100, 4000)
    (tmp_path / "s_L.png").write_bytes(_png_bytes(a))
    (tmp_path / "s_R.png").write_bytes(_png_bytes(b))
    views = dio.load_png_pair(tmp_path / "s_L.png", tmp_path / "s_R.png", black_level=512)
    ref = np.clip(np.stack([a, b]).astype(np.float64) - 512, 0, None)
    assert views.shape == (2, 9, 12, 3) and views.dtype == np.float32 and views.max() == 1
    np.testing.assert_allclose(views, ref / ref.max(), rtol=1e-6)
    # Greyscale 16-bit PNG pairs give one channel.
    _write_grey16(tmp_path / "g_L.png", a[..., 0])
    _write_grey16(tmp_path / "g_R.png", b[..., 0])
    assert dio.load_png_pair(tmp_path / "g_L.png", tmp_path / "g_R.png").shape == (2, 9, 12, 1)


# ----------------------------------------------------------------------------------------
# PGM and TIFF


def test_pgm_pair_16bit_big_endian(tmp_path):
    rng = np.random.default_rng(6)
    a, b = _raw16(rng, (7, 10), 0, 1023), _raw16(rng, (7, 10), 0, 1023)
    left = _write_pgm(tmp_path / "c_left.pgm", a, 1023)
    right = _write_pgm(tmp_path / "c_right.pgm", b, 1023, comment=False)
    views = dio.load_pgm_pair(left, right, black_level=64)
    ref = np.clip(np.stack([a, b]).astype(np.float64) - 64, 0, None)[..., None]
    assert views.shape == (2, 7, 10, 1) and views.dtype == np.float32
    np.testing.assert_allclose(views, ref / ref.max(), rtol=1e-6)
    # Big-endian really: the raw bytes of the first sample.
    raw, depth = dio.read_image(left)
    assert depth == 16 and raw[0, 0] == a[0, 0]


def test_pgm_8bit_and_broken_files(tmp_path):
    rng = np.random.default_rng(7)
    a = rng.integers(0, 256, (5, 6)).astype(np.uint8)
    l8 = _write_pgm(tmp_path / "l.pgm", a, 255)
    r8 = _write_pgm(tmp_path / "r.pgm", a, 255)
    with pytest.raises(dio.InputError, match="8-bit data where 16-bit"):
        dio.load_pgm_pair(l8, r8, black_level=0)
    assert dio.load_pgm_pair(l8, r8, black_level=0, expect_16bit=False).shape == (2, 5, 6, 1)
    good = _write_pgm(tmp_path / "g.pgm", _raw16(rng, (5, 6)), 65535)
    (tmp_path / "t.pgm").write_bytes(good.read_bytes()[:-7])
    with pytest.raises(dio.InputError, match="truncated PGM"):
        dio.load_pgm_pair(good, tmp_path / "t.pgm", black_level=0)
    (tmp_path / "a.pgm").write_bytes(b"P2\n2 1\n255\n1 2\n")
    with pytest.raises(dio.InputError, match="P2"):
        dio.load_pgm_pair(good, tmp_path / "a.pgm", black_level=0)


def test_tiff_pairs(tmp_path):
    rng = np.random.default_rng(8)
    a, b = _raw16(rng, (6, 8, 3)), _raw16(rng, (6, 8, 3))
    tifffile.imwrite(tmp_path / "x_left.tif", a)
    tifffile.imwrite(tmp_path / "x_right.tif", b)
    views = dio.load_tiff_pair(tmp_path / "x_left.tif", tmp_path / "x_right.tif")
    ref = np.stack([a, b]).astype(np.float64)
    np.testing.assert_allclose(views, ref / ref.max(), rtol=1e-6)
    f = rng.random((6, 8)).astype(np.float32)
    tifffile.imwrite(tmp_path / "f_left.tif", f)
    tifffile.imwrite(tmp_path / "f_right.tif", 2 * f)
    views = dio.load_tiff_pair(tmp_path / "f_left.tif", tmp_path / "f_right.tif")
    assert views.shape == (2, 6, 8, 1)
    np.testing.assert_allclose(views[1, ..., 0], 2 * f / (2 * f).max(), rtol=1e-6)


# ----------------------------------------------------------------------------------------
# Input errors


def test_input_errors(tmp_path):
    rng = np.random.default_rng(9)
    big = _write_grey16(tmp_path / "big.png", _raw16(rng, (20, 30)))
    other = _write_grey16(tmp_path / "other.png", _raw16(rng, (20, 30)))
    small = _write_grey16(tmp_path / "small.png", _raw16(rng, (20, 29)))
    # Mismatched sizes.
    with pytest.raises(dio.InputError, match="differ in shape"):
        dio.load_png_pair(big, small)
    # Too small.
    with pytest.raises(dio.InputError, match="smaller than the minimum 32x32"):
        dio.load_png_pair(big, other, min_hw=(32, 32))
    # 8-bit PNG where 16-bit is expected.
    eight = tmp_path / "eight.png"
    Image.fromarray(rng.integers(0, 256, (20, 30, 3)).astype(np.uint8)).save(eight)
    with pytest.raises(dio.InputError, match="8-bit data where 16-bit"):
        dio.load_png_pair(eight, eight)
    # Truncated and corrupt PNGs.
    data = big.read_bytes()
    (tmp_path / "trunc.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(dio.InputError, match="truncated"):
        dio.load_png_pair(big, tmp_path / "trunc.png")
    bad = bytearray(data)
    bad[60] ^= 0xFF
    (tmp_path / "crc.png").write_bytes(bytes(bad))
    with pytest.raises(dio.InputError, match="CRC"):
        dio.load_png_pair(big, tmp_path / "crc.png")
    (tmp_path / "junk.png").write_bytes(b"not an image at all")
    with pytest.raises(dio.InputError, match="not a PNG"):
        dio.load_png_pair(big, tmp_path / "junk.png")
    (tmp_path / "junk.tif").write_bytes(b"II*\x00garbage")
    with pytest.raises(dio.InputError, match="unreadable or truncated TIFF"):
        dio.load_tiff_pair(tmp_path / "junk.tif", tmp_path / "junk.tif")
    # NaN / Inf.
    f = rng.random((6, 8)).astype(np.float32)
    tifffile.imwrite(tmp_path / "ok.tif", f)
    data = (tmp_path / "ok.tif").read_bytes()
    (tmp_path / "cut.tif").write_bytes(data[: len(data) - 40])
    with pytest.raises(dio.InputError, match="unreadable or truncated TIFF"):
        dio.load_tiff_pair(tmp_path / "ok.tif", tmp_path / "cut.tif")
    f[2, 3] = np.inf
    tifffile.imwrite(tmp_path / "inf.tif", f)
    with pytest.raises(dio.InputError, match="NaN or Inf"):
        dio.load_tiff_pair(tmp_path / "ok.tif", tmp_path / "inf.tif")
    # 8-bit TIFF.
    tifffile.imwrite(tmp_path / "u8.tif", np.zeros((6, 8), np.uint8))
    with pytest.raises(dio.InputError, match="8-bit"):
        dio.load_tiff_pair(tmp_path / "u8.tif", tmp_path / "u8.tif")
    # A missing file is both an InputError and a FileNotFoundError, naming the file.
    with pytest.raises(FileNotFoundError, match="nope.png") as info:
        dio.load_png_pair(big, tmp_path / "nope.png")
    assert isinstance(info.value, dio.InputError)
    # Missing partner view.
    pair = dio.ScenePair(name="big", left=big, right=None, format="canon")
    with pytest.raises(dio.InputError, match="missing partner view"):
        dio.load_pair(pair)
    # All-black pair.
    zero = _write_grey16(tmp_path / "zero.png", np.zeros((20, 30)))
    with pytest.raises(dio.InputError, match="zero everywhere"):
        dio.load_png_pair(zero, zero)


# ----------------------------------------------------------------------------------------
# Discovery


def test_discover_pairs_mixed_names_and_missing_partners(tmp_path):
    rng = np.random.default_rng(10)
    g = _raw16(rng, (8, 8))
    for name in ("b_left.png", "b_right.png", "e_left.png", "dup_left.png", "dup_right.png"):
        _write_grey16(tmp_path / name, g)
    for name in ("a_L.png", "a_R.png", "f_R.png", "dup_L.png"):
        (tmp_path / name).write_bytes(_png_bytes(np.stack([g] * 3, -1)))
    _write_pgm(tmp_path / "c_left.pgm", g, 65535)
    _write_pgm(tmp_path / "c_right.pgm", g, 65535)
    tifffile.imwrite(tmp_path / "d_left.tif", g)
    tifffile.imwrite(tmp_path / "d_right.tiff", g)
    for name in ("notes.txt", "x.png", "left.png", "calibration"):
        (tmp_path / name).write_text("ignored")
    (tmp_path / "sub").mkdir()
    _write_grey16(tmp_path / "sub" / "z_left.png", g)  # found below too, named sub/z

    pairs = dio.discover_pairs(tmp_path)
    got = {p.name: (p.format, p.left and p.left.name, p.right and p.right.name) for p in pairs}
    assert [p.name for p in pairs] == sorted(got)
    assert got == {
        "a": ("canon", "a_L.png", "a_R.png"),
        "b": ("pixel", "b_left.png", "b_right.png"),
        "c": ("pgm", "c_left.pgm", "c_right.pgm"),
        "d": ("tiff", "d_left.tif", "d_right.tiff"),
        "dup_canon": ("canon", "dup_L.png", None),
        "dup_pixel": ("pixel", "dup_left.png", "dup_right.png"),
        "e": ("pixel", "e_left.png", None),
        "f": ("canon", None, "f_R.png"),
        "sub/z": ("pixel", "z_left.png", None),
    }
    # Complete pairs load through the dispatcher; the incomplete ones fail clearly.
    by_name = {p.name: p for p in pairs}
    assert dio.load_pair(by_name["a"]).shape == (2, 8, 8, 3)
    assert dio.load_pair(by_name["c"], black_level=0).shape == (2, 8, 8, 1)
    assert dio.load_pair(by_name["d"]).shape == (2, 8, 8, 1)
    small = dio.Pixel4Preprocess(crop_hw=None)
    assert dio.load_pair(by_name["b"], pixel_preprocess=small, black_level=0).shape == (2, 8, 8, 1)
    for name in ("e", "f", "dup_canon"):
        with pytest.raises(dio.InputError, match="missing partner"):
            dio.load_pair(by_name[name])
    with pytest.raises(FileNotFoundError):
        dio.discover_pairs(tmp_path / "absent")


# ----------------------------------------------------------------------------------------
# Nested layouts, JPEG, display-referred input, scene names


def _rgb8(rng, shape=(12, 16, 3)) -> np.ndarray:
    return rng.integers(0, 256, shape).astype(np.uint8)


def test_discover_nested_folder_pairs_at_depth_3(tmp_path):
    """The Canon layout: casual/orbbec/NNN/{l,r,d}.png and flat/001/1500/f4/{l,r}.png."""
    rng = np.random.default_rng(11)
    for scene in ("casual/orbbec/001", "casual/orbbec/002", "flat/001/1500/f4"):
        d = tmp_path / scene
        d.mkdir(parents=True)
        Image.fromarray(_rgb8(rng)).save(d / "l.png")
        Image.fromarray(_rgb8(rng)).save(d / "r.png")
    _write_grey16(tmp_path / "casual/orbbec/001/d.png", _raw16(rng, (12, 16)))  # depth map
    # Things beside the scenes that must neither become scenes nor break discovery.
    (tmp_path / "casual" / "README.md").write_text("notes")
    for sub in ("gt_all_in_focus_im", "gt_defocus_map", "calibration", ".cache/x"):
        (tmp_path / sub).mkdir(parents=True)
    _write_grey16(tmp_path / "gt_all_in_focus_im" / "001_gt.png", _raw16(rng, (12, 16)))
    _write_grey16(tmp_path / "calibration" / "white_sheet_left.png", _raw16(rng, (12, 16)))
    _write_grey16(tmp_path / "calibration" / "white_sheet_right.png", _raw16(rng, (12, 16)))
    Image.fromarray(_rgb8(rng)).save(tmp_path / ".cache/x" / "l.png")  # hidden: ignored
    Image.fromarray(_rgb8(rng)).save(tmp_path / ".cache/x" / "r.png")

    found = dio.scan_inputs(tmp_path)
    assert found.skipped == []
    got = {p.name: (p.format, p.left.relative_to(tmp_path).as_posix(),
                    p.right.relative_to(tmp_path).as_posix()) for p in found.pairs}
    assert list(got) == ["casual/orbbec/001", "casual/orbbec/002", "flat/001/1500/f4"]
    assert got["casual/orbbec/001"] == ("canon", "casual/orbbec/001/l.png",
                                        "casual/orbbec/001/r.png")
    assert got["flat/001/1500/f4"][0] == "canon"
    assert dio.discover_pairs(tmp_path) == found.pairs
    # Pointing at one scene folder: the pair is named after the folder.
    (one,) = dio.discover_pairs(tmp_path / "casual/orbbec/002")
    assert one.name == "002" and one.left.name == "l.png"


def test_discover_suffix_forms_at_depth_2(tmp_path):
    rng = np.random.default_rng(12)
    d, e = tmp_path / "trip" / "day1", tmp_path / "trip" / "day2"
    d.mkdir(parents=True)
    e.mkdir(parents=True)
    for name in ("x_L.png", "x_R.png", "y_left.png", "y_right.png"):
        Image.fromarray(_rgb8(rng)).save(d / name)
    for name in ("w_left.jpg", "w_right.JPEG"):
        Image.fromarray(_rgb8(rng)).save(d / name, format="JPEG")
    for name in ("z_left.png", "z_right.png"):  # greyscale: Pixel raw
        _write_grey16(e / name, _raw16(rng, (12, 16)))
    Image.fromarray(_rgb8(rng)[..., 0]).save(e / "g_left.png")  # 8-bit grey: still Pixel
    tifffile.imwrite(e / "t_l.tif", _raw16(rng, (12, 16, 3)))
    tifffile.imwrite(e / "t_r.tif", _raw16(rng, (12, 16, 3)))
    pairs = {p.name: p for p in dio.discover_pairs(tmp_path)}
    assert {n: p.format for n, p in pairs.items()} == {
        "trip/day1/w": "jpeg", "trip/day1/x": "canon", "trip/day1/y": "canon",
        "trip/day2/g": "pixel", "trip/day2/t": "tiff", "trip/day2/z": "pixel"}
    assert all(p.left and p.right for n, p in pairs.items() if n != "trip/day2/g")
    assert pairs["trip/day1/y"].left.name == "y_left.png"
    # Each loads; the 8-bit colour ones as sRGB without allow_8bit, in colour.
    for name in ("trip/day1/w", "trip/day1/x", "trip/day1/y"):
        loaded = dio.load_pair_with_info(pairs[name])
        assert loaded.views.shape == (2, 12, 16, 3)
        assert str(loaded.preprocessing.encoding) == "srgb"
    tiff = dio.load_pair_with_info(pairs["trip/day2/t"]).preprocessing
    assert str(tiff.encoding) == "linear" and tiff.bit_depth == 16
    raw = dio.load_pair_with_info(pairs["trip/day2/z"], black_level=0,
                                  pixel_preprocess=dio.Pixel4Preprocess(crop_hw=None))
    assert raw.views.shape == (2, 12, 16, 1) and raw.preprocessing.format == "pixel"


def test_probe_encoding_reads_what_the_load_assumes(tmp_path):
    """From the headers alone, the encoding the load picks: 8-bit PNG, JPEG and TIFF
    sRGB; 16-bit PNG and TIFF, float TIFF and Pixel raw linear; a requested one as
    asked; None for a file whose header says nothing."""
    from dpjax import outputs

    rng = np.random.default_rng(21)
    writers = {
        "png8": lambda p: Image.fromarray(_rgb8(rng)).save(p),
        "png16": lambda p: outputs.write_png(p, _raw16(rng, (12, 16, 3))),
        "jpeg": lambda p: Image.fromarray(_rgb8(rng)).save(p, format="JPEG"),
        "tif8": lambda p: tifffile.imwrite(p, _rgb8(rng)),
        "tif16": lambda p: tifffile.imwrite(p, _raw16(rng, (12, 16, 3))),
        "tiff32": lambda p: tifffile.imwrite(p, rng.uniform(0, 1, (12, 16, 3)).astype(
            np.float32)),
    }
    suffix = {"png8": "png", "png16": "png", "jpeg": "jpg", "tif8": "tif", "tif16": "tif",
              "tiff32": "tiff"}
    for name, write in writers.items():
        for side in ("L", "R"):
            write(tmp_path / f"{name}_{side}.{suffix[name]}")
    for side in ("left", "right"):
        _write_grey16(tmp_path / f"raw_{side}.png", _raw16(rng, (12, 16)))
    pairs = {p.name: p for p in dio.discover_pairs(tmp_path)}
    assert set(pairs) == {*writers, "raw"}
    expected = {"png8": "srgb", "png16": "linear", "jpeg": "srgb", "tif8": "srgb",
                "tif16": "linear", "tiff32": "linear", "raw": "linear"}
    for name, pair in pairs.items():
        probed = dio.probe_encoding(pair)
        loaded = dio.load_pair_with_info(pair, pixel_preprocess=dio.Pixel4Preprocess(
            crop_hw=None)).preprocessing.encoding
        assert (name, str(probed)) == (name, str(loaded)) == (name, expected[name])
    assert str(dio.probe_encoding(pairs["png8"], "gamma:2.2")) == "gamma:2.2"
    assert str(dio.probe_encoding(pairs["tif16"], "srgb")) == "srgb"
    broken = tmp_path / "broken_L.png"
    broken.write_bytes(b"not an image")
    assert dio.probe_encoding(pairs["png8"]._replace(left=broken)) is None
    assert dio.probe_encoding(pairs["png8"]._replace(left=tmp_path / "gone.png")) is None
    assert dio.probe_encoding(pairs["png8"]._replace(left=None)) is None
    # A 16-bit PGM named .jpg: read as the PGM it is (linear), which its name alone
    # would not say, so the probe does not tell.
    odd = tmp_path / "odd"
    odd.mkdir()
    for side in ("L", "R"):
        _write_pgm(odd / f"x_{side}.jpg", _raw16(rng, (12, 16)), 65535)
    (pgm_as_jpeg,) = dio.discover_pairs(odd)
    assert pgm_as_jpeg.format == "jpeg" and dio.probe_encoding(pgm_as_jpeg) is None
    assert str(dio.load_pair_with_info(pgm_as_jpeg).preprocessing.encoding) == "linear"


def test_png_ihdr_must_come_first_and_once(tmp_path):
    """So that every reader takes the same header (the probe reads the first)."""
    good = _png_bytes(np.zeros((4, 5), np.uint8))
    sig, ihdr_chunk, rest = good[:8], good[8:33], good[33:]
    ihdr16 = bytearray(ihdr_chunk)
    ihdr16[16] = 16  # bit depth
    body = bytes(ihdr16[4:21])
    ihdr16[21:25] = struct.pack(">I", zlib.crc32(body))
    for name, data, message in (
            ("twice.png", sig + ihdr_chunk + bytes(ihdr16) + rest, "a second IHDR chunk"),
            ("late.png", sig + rest[:-12] + ihdr_chunk + rest[-12:], "no IHDR chunk first")):
        (tmp_path / name).write_bytes(data)
        with pytest.raises(dio.InputError, match=message):
            dio.read_image(tmp_path / name)
    (tmp_path / "good.png").write_bytes(good)
    assert dio.read_image(tmp_path / "good.png")[1] == 8


def test_name_collisions_between_forms_stay_unique(tmp_path):
    rng = np.random.default_rng(13)
    (tmp_path / "x").mkdir()
    for path in (tmp_path / "x" / "l.png", tmp_path / "x" / "r.png", tmp_path / "x_L.png",
                 tmp_path / "x_R.png"):
        Image.fromarray(_rgb8(rng)).save(path)
    pairs = dio.discover_pairs(tmp_path)
    assert sorted(p.name for p in pairs) == ["x_canon", "x_canon_2"]
    assert {p.left.relative_to(tmp_path).as_posix() for p in pairs} == {"x/l.png", "x_L.png"}


def test_jpeg_pair_is_read_and_linearised(tmp_path):
    rng = np.random.default_rng(14)
    smooth = np.cumsum(np.cumsum(rng.integers(0, 3, (24, 32, 3)), 0), 1)
    img = (255 * smooth / smooth.max()).astype(np.uint8)
    Image.fromarray(img).save(tmp_path / "p_L.jpeg", quality=95)
    Image.fromarray(img[:, ::-1]).save(tmp_path / "p_R.jpg", quality=95)
    (pair,) = dio.discover_pairs(tmp_path)
    assert pair.format == "jpeg"
    codes = np.stack([np.asarray(Image.open(pair.left)), np.asarray(Image.open(pair.right))])
    raw, depth = dio.read_image(pair.left)
    assert depth == 8 and raw.dtype == np.uint8 and raw.shape == (24, 32, 3)
    np.testing.assert_array_equal(raw, codes[0])
    loaded = dio.load_pair_with_info(pair)
    pre = loaded.preprocessing
    assert (str(pre.encoding), pre.encoding_auto, pre.bit_depth, pre.full_scale) == (
        "srgb", True, 8, 255.0)
    lin = ((codes / 255 + 0.055) / 1.055) ** 2.4  # all codes here are above the sRGB toe
    lin = np.where(codes / 255 <= 0.04045, codes / 255 / 12.92, lin)
    np.testing.assert_allclose(loaded.views, lin / lin.max(), rtol=1e-5, atol=1e-7)
    assert pre.scale == pytest.approx(lin.max(), rel=1e-6)
    # Colour survives: channels differ.
    assert np.ptp(loaded.views.mean(axis=(0, 1, 2))) > 0
    (tmp_path / "bad_L.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    with pytest.raises(dio.InputError, match="bad_L.jpg"):
        dio.read_image(tmp_path / "bad_L.jpg")


def test_8bit_srgb_png_pair_needs_no_allow_8bit(tmp_path):
    rng = np.random.default_rng(15)
    a, b = _rgb8(rng), _rgb8(rng)
    Image.fromarray(a).save(tmp_path / "s_L.png")
    Image.fromarray(b).save(tmp_path / "s_R.png")
    (pair,) = dio.discover_pairs(tmp_path)
    loaded = dio.load_pair_with_info(pair)  # expect_16bit=True by default
    codes = np.stack([a, b]) / 255
    lin = np.where(codes <= 0.04045, codes / 12.92, ((codes + 0.055) / 1.055) ** 2.4)
    assert loaded.views.dtype == np.float32 and loaded.views.shape == (2, 12, 16, 3)
    np.testing.assert_allclose(loaded.views, lin / lin.max(), rtol=1e-5, atol=1e-7)
    assert loaded.preprocessing.as_dict() == {
        "format": "canon", "encoding": "srgb", "encoding_auto": True, "bit_depth": 8,
        "black_level": 0.0, "full_scale": 255.0, "scale": pytest.approx(lin.max()),
        "channels": 3}
    np.testing.assert_array_equal(dio.load_pair(pair), loaded.views)
    # An explicit gamma.
    g = dio.load_pair_with_info(pair, encoding="gamma:2.2")
    np.testing.assert_allclose(g.views, codes**2.2 / (codes**2.2).max(), rtol=1e-5, atol=1e-7)
    assert not g.preprocessing.encoding_auto
    # Read as linear, 8 bits is refused as before, unless allowed (then codes / max).
    with pytest.raises(dio.InputError, match="8-bit data where 16-bit"):
        dio.load_pair(pair, encoding="linear")
    np.testing.assert_allclose(dio.load_pair(pair, encoding="linear", expect_16bit=False),
                               codes / codes.max(), rtol=1e-6)
    # A black level belongs to linear data only.
    with pytest.raises(dio.InputError, match="black level"):
        dio.load_pair(pair, black_level=16)
    with pytest.raises(ValueError, match="unknown encoding"):
        dio.load_pair(pair, encoding="log")


def test_raw_formats_stay_linear_and_16bit_is_unchanged(tmp_path):
    rng = np.random.default_rng(16)
    # Pixel raw: 8-bit still refused (auto is linear for raw formats), sRGB refused.
    g8 = rng.integers(0, 256, (12, 16)).astype(np.uint8)
    for side in ("left", "right"):
        Image.fromarray(g8).save(tmp_path / f"p_{side}.png")
    pix = dio.ScenePair(name="p", left=tmp_path / "p_left.png", right=tmp_path / "p_right.png",
                        format="pixel")
    with pytest.raises(dio.InputError, match="8-bit data where 16-bit"):
        dio.load_pair(pix)
    with pytest.raises(dio.InputError, match="Pixel raw views are linear"):
        dio.load_pair(pix, encoding="srgb")
    # 16-bit colour PNG: exactly today's loader, scale in full-scale units.
    a, b = _raw16(rng, (9, 12, 3), 100, 40000), _raw16(rng, (9, 12, 3), 100, 40000)
    (tmp_path / "c_L.png").write_bytes(_png_bytes(a))
    (tmp_path / "c_R.png").write_bytes(_png_bytes(b))
    pair = dio.ScenePair(name="c", left=tmp_path / "c_L.png", right=tmp_path / "c_R.png",
                         format="canon")
    loaded = dio.load_pair_with_info(pair, black_level=100)
    np.testing.assert_array_equal(loaded.views, dio.load_png_pair(pair.left, pair.right,
                                                                  black_level=100))
    pre = loaded.preprocessing
    assert (str(pre.encoding), pre.bit_depth, pre.black_level) == ("linear", 16, 100.0)
    assert pre.scale == pytest.approx((max(a.max(), b.max()) - 100) / 65535)
    assert pre.display_kwargs() == {"encoding": None}
    # Pixel: scale in white-level units, black level recorded.
    (tmp_path / "px").mkdir()
    pixel_dir = _synthetic_pixel_dir(tmp_path / "px")
    (pixel_pair,) = dio.discover_pairs(pixel_dir)  # not the white sheets or ground truth
    assert pixel_pair.name == "007" and pixel_pair.format == "pixel"
    loaded = dio.load_pair_with_info(pixel_pair, pixel_preprocess=PRE_SMALL)  # no white sheets
    pre = loaded.preprocessing
    assert pre.format == "pixel" and pre.black_level == 1024 and pre.full_scale == 2**14 - 1
    assert pre.channels == 1 and str(pre.encoding) == "linear" and pre.bit_depth == 16
    raw = np.stack([np.asarray(Image.open(v)).astype(np.float64)
                    for v in (pixel_pair.left, pixel_pair.right)])[:, 8:32, 12:44]
    np.testing.assert_allclose(loaded.views[..., 0] * pre.scale,
                               np.clip(raw - 1024, 0, None) / (2**14 - 1), rtol=1e-6)


def test_check_scene_name():
    for good in ("001", "casual/orbbec/001", "a b", "été", "x_canon_2", "a.b", "a-b"):
        assert dio.check_scene_name(good) == good
    for bad, why in [("", "empty"), (".", "'.'"), ("..", "'..'"), ("a/../b", "'..'"),
                     ("/abs", "empty path component"), ("a//b", "empty"), ("a/", "empty"),
                     ("a\\b", "backslash"), ("a\nb", "control"), ("x\x00", "control"),
                     ("x\x7f", "control"), ("-x", "starts with '-'"), ("a/-x", "'-'"),
                     ("y" * 256, "255 bytes"), ("bad\udcff", "UTF-8")]:
        with pytest.raises(dio.InputError, match=why) as info:
            dio.check_scene_name(bad)
        assert "\n" not in str(info.value)


def test_discovery_skips_unsafe_names_and_reports_them(tmp_path):
    rng = np.random.default_rng(17)
    for folder in ("-rf", "ok", "a\nb", "back\\slash"):
        (tmp_path / folder).mkdir()
        for side in "lr":
            Image.fromarray(_rgb8(rng)).save(tmp_path / folder / f"{side}.png")
    Image.fromarray(_rgb8(rng)).save(tmp_path / "-x_L.png")
    found = dio.scan_inputs(tmp_path)
    assert [p.name for p in found.pairs] == ["ok"]
    reasons = {s.path.relative_to(tmp_path).as_posix(): s.reason for s in found.skipped}
    assert set(reasons) == {"-rf/l.png", "a\nb/l.png", "back\\slash/l.png", "-x_L.png"}
    assert "starts with '-'" in reasons["-rf/l.png"] and "control" in reasons["a\nb/l.png"]
    assert all("\n" not in r for r in reasons.values())
