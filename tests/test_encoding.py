"""Tests for dpjax.encoding and the display-referred round trip through io and outputs."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from dpjax import encoding as denc
from dpjax import io as dio
from dpjax import outputs

# ----------------------------------------------------------------------------------------
# Transfer functions


@pytest.mark.parametrize("enc", ["srgb", "gamma:2.2", "gamma:1.8", "gamma:0.5", "linear"])
def test_round_trips_over_unit_interval(enc):
    x = np.concatenate([np.linspace(0, 1, 200_001, dtype=np.float32),
                        np.random.default_rng(0).random(10_000, dtype=np.float32)])
    lin = denc.to_linear(x, enc)
    enc_back = denc.from_linear(x, enc)
    assert lin.dtype == np.float32 and enc_back.dtype == np.float32
    assert lin.shape == x.shape
    np.testing.assert_allclose(denc.to_linear(denc.from_linear(x, enc), enc), x, atol=1e-6,
                               rtol=0)
    np.testing.assert_allclose(denc.from_linear(denc.to_linear(x, enc), enc), x, atol=1e-6,
                               rtol=0)
    # Monotone, 0 -> 0 and 1 -> 1.
    assert np.all(np.diff(denc.to_linear(x[:200_001], enc)) >= 0)
    assert denc.to_linear(0.0, enc) == 0 and denc.to_linear(1.0, enc) == pytest.approx(1, abs=1e-7)


@pytest.mark.parametrize("enc", ["srgb", "gamma:2.2", "gamma:0.5", "linear"])
def test_differentiable_curve_matches_and_has_a_bounded_slope(enc):
    import jax
    import jax.numpy as jnp

    x = np.linspace(0, 1, 10_001)
    got = denc.from_linear_differentiable(x, enc)
    above = x >= denc.GAMMA_TOE
    np.testing.assert_allclose(got[above], denc.from_linear(x[above], enc), atol=1e-6)
    assert np.all(np.diff(got) >= 0)  # monotonic, the toe included
    if enc != "linear":  # clipped outside [0, 1]
        out = denc.from_linear_differentiable(np.array([-0.5, 1.5]), enc)
        np.testing.assert_allclose(out, [0.0, 1.0], atol=1e-12)
    slope = jax.vmap(jax.grad(lambda v: denc.from_linear_differentiable(v, enc, xp=jnp)))(
        jnp.asarray(x[1:], jnp.float32))
    assert np.all(np.isfinite(np.asarray(slope))) and float(jnp.max(slope)) < 100


def test_srgb_known_values():
    # IEC 61966-2-1: ((V + 0.055) / 1.055)^2.4 above 0.04045, V / 12.92 below.
    assert denc.to_linear(0.5, "srgb") == pytest.approx(0.2140411, abs=1e-6)
    assert denc.to_linear(128 / 255, "srgb") == pytest.approx(0.2158605, abs=1e-6)
    assert denc.to_linear(0.04045, "srgb") == pytest.approx(0.04045 / 12.92, abs=1e-9)
    assert denc.to_linear(0.02, "srgb") == pytest.approx(0.02 / 12.92, abs=1e-9)
    assert denc.from_linear(0.18, "srgb") == pytest.approx(0.4613561, abs=1e-6)
    assert denc.from_linear(0.001, "srgb") == pytest.approx(0.01292, abs=1e-9)
    # The two pieces meet at the knee (the standard's constants agree to ~1e-8).
    assert denc.from_linear(0.0031308, "srgb") == pytest.approx(0.04045, abs=1e-6)
    assert denc.to_linear(0.5, "gamma:2.2") == pytest.approx(0.5**2.2, rel=1e-6)
    assert denc.from_linear(0.25, "gamma:2") == pytest.approx(0.5, rel=1e-6)


def test_out_of_range_values_are_odd_and_nan_propagates():
    x = np.array([-0.5, -0.01, 0.0, 0.01, 0.5, 1.5, np.nan], np.float32)
    for enc in ("srgb", "gamma:2.4"):
        lin = denc.to_linear(x, enc)
        np.testing.assert_allclose(lin[:2], -denc.to_linear(-x[:2], enc), rtol=1e-7)
        assert lin[5] > 1 and np.isnan(lin[6]) and np.all(np.isfinite(lin[:6]))
        np.testing.assert_allclose(denc.from_linear(lin[:6], enc), x[:6], atol=1e-6)


def test_parse_encoding_forms_and_errors():
    assert denc.parse_encoding("linear") == denc.LINEAR
    assert denc.parse_encoding(" SRGB ") == denc.SRGB
    g = denc.parse_encoding("gamma:2.2")
    assert g == denc.Encoding(kind="gamma", gamma=2.2) and str(g) == "gamma:2.2"
    assert denc.parse_encoding(str(g)) == g and denc.parse_encoding(g) is g
    assert denc.parse_encoding("auto", allow_auto=True) is None
    assert not denc.SRGB.is_linear and denc.LINEAR.is_linear
    for bad, message in [("auto", "unknown encoding 'auto'"), ("rec709", "expected"),
                         ("", "unknown"), ("gamma", "unknown"), ("gamma:", "gamma must be"),
                         ("gamma:0", "> 0"), ("gamma:-2", "> 0"), ("gamma:nan", "> 0"),
                         ("gamma:inf", "> 0"), ("gamma:two", "> 0")]:
        with pytest.raises(ValueError, match=message):
            denc.parse_encoding(bad)
    with pytest.raises(ValueError, match="text"):
        denc.parse_encoding(2.2)
    with pytest.raises(ValueError, match="takes no gamma"):
        denc.Encoding(kind="srgb", gamma=2.0)
    with pytest.raises(ValueError, match="unknown encoding kind"):
        denc.Encoding(kind="log")


def test_auto_rule():
    assert denc.auto_encoding(8, raw_format=False) == denc.SRGB
    assert denc.auto_encoding(16, raw_format=False) == denc.LINEAR
    assert denc.auto_encoding(None, raw_format=False) == denc.LINEAR  # float TIFF
    assert denc.auto_encoding(8, raw_format=True) == denc.LINEAR  # Pixel raw, PGM


# ----------------------------------------------------------------------------------------
# Writing back in the input's encoding


def test_encode_for_display_inverts_loading_exactly():
    codes = np.arange(256, dtype=np.uint8).reshape(16, 16)
    for scale in (1.0, 0.7):
        lin = denc.to_linear(codes / 255, "srgb") / scale
        out = outputs.encode_for_display(lin, "srgb", scale=scale, bits=8)
        assert out.dtype == np.uint8
        np.testing.assert_array_equal(out, codes)
    c16 = np.linspace(0, 65535, 4099).astype(np.uint16)
    lin16 = denc.to_linear(c16 / 65535, "gamma:2.2")
    np.testing.assert_array_equal(outputs.encode_for_display(lin16, "gamma:2.2", bits=16), c16)
    # Out of range and non-finite values: clipped, NaN written as 0.
    odd = outputs.encode_for_display(np.array([-1.0, 2.0, np.nan]), "srgb")
    np.testing.assert_array_equal(odd, [0, 255, 0])
    with pytest.raises(ValueError, match="bits"):
        outputs.encode_for_display(lin, "srgb", bits=12)
    with pytest.raises(ValueError, match="scale"):
        outputs.encode_for_display(lin, "srgb", scale=0.0)


def _similar_srgb_pair(rng, h=48, w=64):
    """An 8-bit colour pair: smooth random colours (bilinear over an 8-px grid), the
    right view shifted by 1 px, as in a real DP pair's small disparities."""
    base = rng.random((h // 8 + 2, w // 8 + 2, 3))
    yy, xx = np.arange(h + 8) / 8, np.arange(w + 8) / 8
    y0, x0 = yy.astype(int), xx.astype(int)
    fy, fx = (yy - y0)[:, None, None], (xx - x0)[None, :, None]
    up = ((1 - fy) * (1 - fx) * base[y0][:, x0] + (1 - fy) * fx * base[y0][:, x0 + 1]
          + fy * (1 - fx) * base[y0 + 1][:, x0] + fy * fx * base[y0 + 1][:, x0 + 1])
    img = 20 + 215 * up
    left = np.round(img[:h, :w]).astype(np.uint8)
    right = np.round(img[:h, 1:w + 1]).astype(np.uint8)
    return left, right


def test_srgb_pair_mean_written_back_matches_input(tmp_path):
    left, right = _similar_srgb_pair(np.random.default_rng(1))
    Image.fromarray(left).save(tmp_path / "s_L.png")
    Image.fromarray(right).save(tmp_path / "s_R.png")
    (pair,) = dio.discover_pairs(tmp_path)
    loaded = dio.load_pair_with_info(pair)
    pre = loaded.preprocessing
    assert loaded.views.shape == (2, 48, 64, 3) and loaded.views.max() == 1
    aif = loaded.views.mean(axis=0)
    outputs.write_result(tmp_path / "out", all_in_focus=aif, defocus=None, result={},
                         **pre.display_kwargs())
    png = np.asarray(Image.open(tmp_path / "out" / outputs.AIF_PNG))
    assert png.dtype == np.uint8 and png.shape == (48, 64, 3)
    # The linear mean of the views, encoded again: within one level everywhere.
    lin = denc.to_linear(np.stack([left, right]) / 255, "srgb").mean(axis=0)
    expected = np.round(255 * denc.from_linear(lin, "srgb"))
    assert np.abs(png.astype(float) - expected).max() <= 1
    assert np.all(np.abs((png - expected).mean(axis=(0, 1))) < 1)
    # Against the mean of the input samples: per-channel mean shift below one level
    # (no stretch, no extra gamma; views this similar differ little in linear mean).
    code_mean = np.stack([left, right]).astype(float).mean(axis=0)
    shift = (png.astype(float) - code_mean).mean(axis=(0, 1))
    assert np.all(np.abs(shift) < 1), shift
    # The viewing transform for linear input would not have matched (it stretches).
    stretched = outputs.to_display(aif).astype(float)
    assert np.abs((stretched - code_mean).mean(axis=(0, 1))).max() > 5
    # The TIFF stays the linear float32 image.
    import tifffile
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "out" / outputs.AIF_TIFF), aif)
    # Thumbnails: the same display image at 8 bits.
    thumb = outputs.display_image(aif, **pre.display_kwargs(bits=8))
    np.testing.assert_array_equal(thumb, png)


def test_display_kwargs_for_linear_and_deep_input(tmp_path):
    lin = dio.Preprocessing(format="pixel", encoding=denc.LINEAR, encoding_auto=True,
                            bit_depth=16, black_level=1024.0, full_scale=15359.0, scale=0.8,
                            channels=1)
    assert lin.display_kwargs() == {"encoding": None}
    img = np.random.default_rng(2).random((8, 8))
    np.testing.assert_array_equal(outputs.display_image(img, **lin.display_kwargs()),
                                  outputs.to_display(img))
    deep = lin._replace(format="tiff", encoding=denc.SRGB, encoding_auto=False, bit_depth=None,
                        black_level=0.0, full_scale=1.0)
    assert deep.display_kwargs() == {"encoding": denc.SRGB, "scale": 0.8, "bits": 16}
    assert deep.as_dict()["encoding"] == "srgb" and deep.as_dict()["bit_depth"] is None
    assert outputs.display_image(img, **deep.display_kwargs()).dtype == np.uint16
