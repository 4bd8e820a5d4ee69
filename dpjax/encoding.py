"""Transfer functions between stored image values and linear intensity (host-side numpy).

The blur model (a view is a sum of kernels times scene radiance) is linear in
intensity, so views stored with a tone curve must be linearised before fitting, and
results are written back through the same curve. An `Encoding` names the curve:

- `linear`: stored values are proportional to intensity (raw sensor data, 16-bit
  linear exports, float TIFF);
- `srgb`: the piecewise sRGB curve of IEC 61966-2-1 (a linear toe below
  0.0031308 linear / 0.04045 encoded, then a 2.4 power with offset 0.055);
- `gamma:G`: a pure power law, encoded = linear^(1/G), linear = encoded^G (G > 0).

Values are in [0, 1] for full-scale white on both sides of the curve. The curves are
extended to all reals as odd functions (f(-x) = -f(x)), so that values slightly below
zero (solver ringing) or above one (highlights) map monotonically instead of to NaN;
NaN stays NaN.

Which encoding a file gets when the user says `auto` is decided by `auto_encoding`,
the one place that rule lives.

Nothing here imports JAX.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

__all__ = [
    "AUTO",
    "LINEAR",
    "SRGB",
    "Encoding",
    "auto_encoding",
    "from_linear",
    "from_linear_differentiable",
    "parse_encoding",
    "to_linear",
]

AUTO = "auto"
_KINDS = ("linear", "srgb", "gamma")

# IEC 61966-2-1 constants.
_SRGB_LINEAR_KNEE = 0.0031308  # linear value where the power segment starts
_SRGB_ENCODED_KNEE = 0.04045  # encoded value where the power segment starts
_SRGB_SLOPE = 12.92
_SRGB_OFFSET = 0.055
_SRGB_EXPONENT = 2.4


@dataclasses.dataclass(frozen=True, kw_only=True)
class Encoding:
    """A transfer function from linear intensity to stored values.

    kind: "linear", "srgb" or "gamma"; gamma: the exponent G for kind "gamma"
    (None otherwise). `str(enc)` is the text form `parse_encoding` reads.
    """

    kind: str
    gamma: float | None = None

    def __post_init__(self):
        if self.kind not in _KINDS:
            raise ValueError(f"unknown encoding kind {self.kind!r} (expected one of {_KINDS})")
        if self.kind == "gamma":
            g = self.gamma
            if not isinstance(g, (int, float)) or isinstance(g, bool) or not (
                    math.isfinite(g) and g > 0):
                raise ValueError(f"gamma encoding needs a finite exponent > 0, got {g!r}")
            object.__setattr__(self, "gamma", float(g))
        elif self.gamma is not None:
            raise ValueError(f"encoding {self.kind!r} takes no gamma (got {self.gamma!r})")

    @property
    def is_linear(self) -> bool:
        return self.kind == "linear"

    def __str__(self) -> str:
        return f"gamma:{self.gamma:g}" if self.kind == "gamma" else self.kind


LINEAR = Encoding(kind="linear")
SRGB = Encoding(kind="srgb")


def parse_encoding(text: str | Encoding, *, allow_auto: bool = False) -> Encoding | None:
    """Read an encoding from text: "linear", "srgb" or "gamma:G" (case-insensitive).

    Args:
      text: the text, or an Encoding (returned as is).
      allow_auto: accept "auto" and return None for it (the caller then resolves it
        per file with `auto_encoding`); otherwise "auto" is an error.

    Raises:
      ValueError: one line naming the bad text and the accepted forms.
    """
    if isinstance(text, Encoding):
        return text
    if not isinstance(text, str):
        raise ValueError(f"encoding must be text, got {type(text).__name__}")
    forms = "'linear', 'srgb', 'gamma:G' (G > 0)" + (" or 'auto'" if allow_auto else "")
    s = text.strip().lower()
    if s == AUTO and allow_auto:
        return None
    if s in ("linear", "srgb"):
        return Encoding(kind=s)
    if s.startswith("gamma:"):
        try:
            g = float(s[len("gamma:"):])
        except ValueError:
            g = float("nan")
        if math.isfinite(g) and g > 0:
            return Encoding(kind="gamma", gamma=g)
        raise ValueError(f"bad encoding {text!r}: the gamma must be a finite number > 0 "
                         f"(e.g. 'gamma:2.2')")
    raise ValueError(f"unknown encoding {text!r}; expected {forms}")


def auto_encoding(bit_depth: int | None, *, raw_format: bool) -> Encoding:
    """The encoding assumed for a file when the user asks for "auto".

    The rule (the one place it is written down):
    - raw sensor formats (Pixel DP PNGs, PGM from a DP capture app): linear, at any
      bit depth (an 8-bit raw file is refused elsewhere unless allowed explicitly);
    - 8-bit integer samples (8-bit PNG, 8-bit TIFF, JPEG): sRGB, since 8 bits are
      almost always a display-referred export;
    - anything else (16-bit or wider integers, floating point): linear.

    Args:
      bit_depth: bits per sample of integer data, None for floating point.
      raw_format: whether the file format holds raw sensor values.
    """
    if raw_format or bit_depth is None or bit_depth > 8:
        return LINEAR
    return SRGB


def _odd(fn, x: np.ndarray) -> np.ndarray:
    """Apply fn (defined on x >= 0) as an odd function; NaN propagates."""
    a = np.abs(x)
    return np.copysign(fn(a), x)


def to_linear(x, enc: Encoding | str) -> np.ndarray:
    """Stored (encoded) values -> linear intensity, element-wise.

    Args:
      x: any shape, encoded values with full scale 1.
      enc: the encoding (or its text form).

    Returns:
      float32, same shape. Computed in float64, so the only error is the final
      rounding to float32.
    """
    enc = parse_encoding(enc)
    v = np.asarray(x, np.float64)
    if enc.kind == "linear":
        out = v
    elif enc.kind == "gamma":
        out = _odd(lambda a: a ** enc.gamma, v)
    else:
        def srgb_decode(a):
            with np.errstate(invalid="ignore"):
                power = ((a + _SRGB_OFFSET) / (1 + _SRGB_OFFSET)) ** _SRGB_EXPONENT
            return np.where(a <= _SRGB_ENCODED_KNEE, a / _SRGB_SLOPE, power)
        out = _odd(srgb_decode, v)
    return np.asarray(out, np.float32)


def from_linear(x, enc: Encoding | str) -> np.ndarray:
    """Linear intensity -> stored (encoded) values, element-wise (inverse of `to_linear`).

    Args:
      x: any shape, linear values with full scale 1.
      enc: the encoding (or its text form).

    Returns:
      float32, same shape, not clipped (quantising callers clip to [0, 1]).
    """
    enc = parse_encoding(enc)
    v = np.asarray(x, np.float64)
    if enc.kind == "linear":
        out = v
    elif enc.kind == "gamma":
        out = _odd(lambda a: a ** (1.0 / enc.gamma), v)
    else:
        def srgb_encode(a):
            power = (1 + _SRGB_OFFSET) * a ** (1.0 / _SRGB_EXPONENT) - _SRGB_OFFSET
            return np.where(a <= _SRGB_LINEAR_KNEE, a * _SRGB_SLOPE, power)
        out = _odd(srgb_encode, v)
    return np.asarray(out, np.float32)


# Below this linear value `from_linear_differentiable` continues a gamma curve as the
# straight line to the origin (its slope there is 1000^(1 - 1/G), 43 at G = 2.2).
GAMMA_TOE = 1e-3


def from_linear_differentiable(x, enc: Encoding | str, xp=np):
    """Linear intensity -> encoded values, written for any array module (numpy or
    jax.numpy) and with a bounded derivative, for objectives that are differentiated.

    Values are clipped to [0, 1] first (the encoded values of a fit's intensities, not
    of its ringing or highlights). The sRGB curve has its own linear toe; a pure gamma
    curve, whose slope is infinite at 0, is continued below `GAMMA_TOE` by the straight
    line to the origin. Equals `from_linear` on [0, 1] except there.

    Args:
      x: any shape, linear values with full scale 1.
      enc: the encoding (or its text form).
      xp: the array module of x.

    Returns:
      Same shape and dtype as x.
    """
    enc = parse_encoding(enc)
    if enc.kind == "linear":
        return x
    v = xp.clip(x, 0.0, 1.0)
    if enc.kind == "srgb":
        knee, slope, exponent = _SRGB_LINEAR_KNEE, _SRGB_SLOPE, _SRGB_EXPONENT
        power = (1 + _SRGB_OFFSET) * xp.maximum(v, knee) ** (1.0 / exponent) - _SRGB_OFFSET
    else:
        knee = GAMMA_TOE
        slope = knee ** (1.0 / enc.gamma - 1.0)
        power = xp.maximum(v, knee) ** (1.0 / enc.gamma)
    return xp.where(v <= knee, v * slope, power)

