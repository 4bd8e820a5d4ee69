"""Tests for dpjax.outputs: atomic writes, PNG/TIFF/JSON, display images, scene results."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import tifffile
from PIL import Image

from dpjax import io as dio
from dpjax import outputs


def _no_temp_files(folder) -> bool:
    return not [p for p in os.listdir(folder) if p.endswith(".tmp")]


def test_atomic_write_bytes_replaces_and_leaves_no_temp(tmp_path):
    path = tmp_path / "sub" / "f.bin"
    outputs.atomic_write_bytes(path, b"first")
    outputs.atomic_write_bytes(path, b"second")
    assert path.read_bytes() == b"second"
    assert _no_temp_files(path.parent)
    assert (path.stat().st_mode & 0o777) == 0o644


def test_failing_write_keeps_old_file(tmp_path):
    path = tmp_path / "f.bin"
    outputs.atomic_write_bytes(path, b"old contents")

    def half_then_fail(fh):
        fh.write(b"partial new")
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"):
        outputs.atomic_write(path, half_then_fail)
    assert path.read_bytes() == b"old contents"
    assert _no_temp_files(tmp_path)
    with pytest.raises(TypeError):
        outputs.write_json(path, {"x": object()})
    with pytest.raises(ValueError):
        outputs.write_tiff(path, np.zeros((2, 3, 5)))
    assert path.read_bytes() == b"old contents"
    assert _no_temp_files(tmp_path)


def test_failing_replace_keeps_old_file(tmp_path, monkeypatch):
    path = tmp_path / "f.json"
    outputs.write_json(path, {"v": 1})

    def broken_replace(src, dst):
        raise OSError("replace failed")

    monkeypatch.setattr(outputs.os, "replace", broken_replace)
    with pytest.raises(OSError, match="replace failed"):
        outputs.write_json(path, {"v": 2})
    monkeypatch.undo()
    assert json.loads(path.read_text()) == {"v": 1}
    assert _no_temp_files(tmp_path)


def test_write_json_converts_numpy_and_nan(tmp_path):
    obj = {"a": np.float32(1.5), "b": np.arange(3), "c": float("nan"), "d": np.array([1.0, np.inf]),
           "e": (np.int64(2), tmp_path), 3: np.bool_(True)}
    outputs.write_json(tmp_path / "r.json", obj)
    text = (tmp_path / "r.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text) == {"a": 1.5, "b": [0, 1, 2], "c": None, "d": [1.0, None],
                                "e": [2, str(tmp_path)], "3": True}


def test_write_tiff_roundtrip(tmp_path):
    rng = np.random.default_rng(0)
    for shape in [(5, 7), (5, 7, 1), (5, 7, 3)]:
        a = rng.random(shape).astype(np.float32)
        outputs.write_tiff(tmp_path / "a.tif", a)
        back = tifffile.imread(tmp_path / "a.tif")
        assert back.dtype == np.float32
        np.testing.assert_array_equal(back, a[..., 0] if shape[-1] == 1 else a)


def test_write_png_roundtrip(tmp_path):
    rng = np.random.default_rng(1)
    u8 = rng.integers(0, 256, (6, 9, 3)).astype(np.uint8)
    g16 = rng.integers(0, 65536, (6, 9)).astype(np.uint16)
    rgb16 = rng.integers(0, 65536, (6, 9, 3)).astype(np.uint16)
    outputs.write_png(tmp_path / "u8.png", u8)
    outputs.write_png(tmp_path / "g16.png", g16)
    outputs.write_png(tmp_path / "rgb16.png", rgb16)
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "u8.png")), u8)
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "g16.png")), g16)
    np.testing.assert_array_equal(dio.read_image(tmp_path / "rgb16.png")[0], rgb16)
    with pytest.raises(ValueError, match="uint8 or uint16"):
        outputs.write_png(tmp_path / "f.png", np.zeros((2, 2), np.float32))


def test_to_display_and_colormap():
    x = np.linspace(0, 2, 1000).reshape(20, 50)
    x[0, 0] = 1e6  # one outlier does not darken the image
    d = outputs.to_display(x)
    assert d.dtype == np.uint8 and d.shape == x.shape and d.max() == 255
    assert d[10, 25] > 150  # mid-grey linear 1.0 of ~2 -> bright after gamma
    assert outputs.to_display(np.zeros((3, 4, 3))).max() == 0
    rgb = outputs.colormap(np.array([0.0, 0.5, 1.0, np.nan, 5.0]), 0.0, 1.0)
    assert rgb.shape == (5, 3) and rgb.dtype == np.uint8
    np.testing.assert_array_equal(rgb[0], (68, 1, 84))
    np.testing.assert_array_equal(rgb[2], (253, 231, 37))
    np.testing.assert_array_equal(rgb[3], (255, 255, 255))
    np.testing.assert_array_equal(rgb[4], rgb[2])  # clipped
    lum = outputs.colormap(np.linspace(0, 1, 50), 0, 1) @ np.array([0.2126, 0.7152, 0.0722])
    assert np.all(np.diff(lum) >= 0)  # perceptual: lightness increases monotonically
    assert np.all(outputs.colormap(np.ones(3), 1.0, 1.0) == outputs.colormap(0.5, 0, 1))


@pytest.mark.parametrize("shape", [(24, 40), (200, 300)])
def test_defocus_png_shape_and_bar(shape):
    d = np.linspace(-1, 2, shape[0] * shape[1]).reshape(shape)
    img = outputs.defocus_png(d)
    assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3
    assert img.shape[0] == shape[0] and img.shape[1] > shape[1]
    np.testing.assert_array_equal(img[:, :shape[1]], outputs.colormap(d, -1, 2))
    bar = img[:, shape[1]:]
    assert (bar == 0).all(axis=-1).any()  # black tick labels were drawn
    assert outputs.defocus_png(d, vmin=0, vmax=1).shape[0] == shape[0]


def test_write_result_and_is_complete(tmp_path):
    rng = np.random.default_rng(2)
    aif = rng.random((16, 24, 3)).astype(np.float32)
    dmap = rng.random((16, 24)).astype(np.float32)
    out = tmp_path / "scene"
    assert not outputs.is_complete(out)
    outputs.write_result(out, all_in_focus=aif, defocus=dmap, result={"psnr": np.float64(np.nan)})
    assert outputs.is_complete(out)
    assert sorted(os.listdir(out)) == sorted(outputs.RESULT_FILES)
    result = json.loads((out / "result.json").read_text())
    assert result["psnr"] is None and "result.json" in result["output_files"]
    np.testing.assert_array_equal(tifffile.imread(out / "defocus_map.tif"), dmap)
    np.testing.assert_array_equal(tifffile.imread(out / "all_in_focus.tif"), aif)
    dpng = np.asarray(Image.open(out / "defocus_map.png"))
    assert dpng.shape[0] == 16 and dpng.shape[1] > 24 and dpng.shape[2] == 3
    # A missing listed file or a corrupt result.json makes the folder incomplete.
    (out / "defocus_map.png").unlink()
    assert not outputs.is_complete(out)
    (out / "result.json").write_text("{not json")
    assert not outputs.is_complete(out)
    # Rewriting removes the stale result.json first; a failure midway leaves it absent.
    with pytest.raises(ValueError, match="does not match"):
        outputs.write_result(out, all_in_focus=aif, defocus=dmap[:8], result={})
    assert not (out / "result.json").exists() and not outputs.is_complete(out)
    # Without a defocus map, only the image files are written and required.
    out2 = tmp_path / "grey"
    outputs.write_result(out2, all_in_focus=aif[..., :1], defocus=None, result={"n": 1})
    assert outputs.is_complete(out2) and not (out2 / "defocus_map.tif").exists()
    assert np.asarray(Image.open(out2 / "all_in_focus.png")).shape == (16, 24)
    assert _no_temp_files(out) and _no_temp_files(out2)
