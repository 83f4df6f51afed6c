"""Number formats autoprec can assign to a layer.

This module is pure data and imports no torch, so the search and plan stages can use it.
The torch emulation of each format lives in :mod:`autoprec.torch.quantize`.

User strings ("bf16", "fp8", "float16", ...) are parsed once, at the edge, by
:func:`parse_precision`; everything inside the package passes :class:`Precision` members.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, Iterable

from autoprec.core.errors import UsageError


@dataclass(frozen=True)
class FormatInfo:
    """Bit layout and limits of one floating-point format (values checked against ml_dtypes)."""

    sign_bits: int
    exponent_bits: int
    mantissa_bits: int
    bias: int
    max: float
    min_normal: float
    min_subnormal: float
    has_inf: bool
    saturates: bool  # emulation clamps to +-max instead of overflowing (E4M3FN)
    torch_dtype_name: str
    onnx_type_name: str
    ml_dtypes_name: str


class Precision(enum.Enum):
    """A storage/compute format. Ordered from widest to narrowest by :attr:`rank`."""

    FP32 = "fp32"
    BF16 = "bf16"
    FP16 = "fp16"
    FP8_E4M3 = "fp8_e4m3"
    FP8_E5M2 = "fp8_e5m2"

    @property
    def info(self) -> FormatInfo:
        return _INFO[self]

    @property
    def bits(self) -> int:
        i = self.info
        return i.sign_bits + i.exponent_bits + i.mantissa_bits

    @property
    def bytes(self) -> float:
        return self.bits / 8

    @property
    def max(self) -> float:
        return self.info.max

    @property
    def min_normal(self) -> float:
        return self.info.min_normal

    @property
    def min_subnormal(self) -> float:
        return self.info.min_subnormal

    @property
    def eps(self) -> float:
        """Distance from 1.0 to the next representable value."""
        return 2.0 ** (-self.info.mantissa_bits)

    @property
    def is_fp8(self) -> bool:
        return self in (Precision.FP8_E4M3, Precision.FP8_E5M2)

    @property
    def is_16bit(self) -> bool:
        return self in (Precision.BF16, Precision.FP16)

    @property
    def needs_scale(self) -> bool:
        """fp8 ranges are too narrow for raw activations: values are divided by a scale first."""
        return self.is_fp8

    @property
    def rank(self) -> int:
        """0 for fp32; larger means fewer bits. Used to pick the wider of two formats."""
        return _ORDER.index(self)

    @property
    def compute_output(self) -> "Precision":
        """Format of a layer's output when the layer computes in this format.

        16-bit layers write 16-bit results; an fp8 GEMM on Hopper writes bf16, never fp8.
        """
        return Precision.BF16 if self.is_fp8 else self

    @property
    def torch_dtype(self) -> Any:
        import torch  # local: this module must stay importable without torch

        return getattr(torch, self.info.torch_dtype_name)

    @property
    def onnx_type(self) -> int:
        import onnx

        return getattr(onnx.TensorProto, self.info.onnx_type_name)

    @property
    def numpy_dtype(self) -> Any:
        import ml_dtypes
        import numpy as np

        if self is Precision.FP32:
            return np.dtype(np.float32)
        if self is Precision.FP16:
            return np.dtype(np.float16)
        return np.dtype(getattr(ml_dtypes, self.info.ml_dtypes_name))

    def __str__(self) -> str:
        return self.value


_ORDER = [Precision.FP32, Precision.BF16, Precision.FP16, Precision.FP8_E5M2, Precision.FP8_E4M3]

_INFO = {
    Precision.FP32: FormatInfo(1, 8, 23, 127, 3.4028234663852886e38, 2.0**-126, 2.0**-149, True, False,
                               "float32", "FLOAT", "float32"),
    Precision.BF16: FormatInfo(1, 8, 7, 127, 3.3895313892515355e38, 2.0**-126, 2.0**-133, True, False,
                               "bfloat16", "BFLOAT16", "bfloat16"),
    Precision.FP16: FormatInfo(1, 5, 10, 15, 65504.0, 2.0**-14, 2.0**-24, True, False,
                               "float16", "FLOAT16", "float16"),
    Precision.FP8_E4M3: FormatInfo(1, 4, 3, 7, 448.0, 2.0**-6, 2.0**-9, False, True,
                                   "float8_e4m3fn", "FLOAT8E4M3FN", "float8_e4m3fn"),
    Precision.FP8_E5M2: FormatInfo(1, 5, 2, 15, 57344.0, 2.0**-14, 2.0**-16, True, False,
                                   "float8_e5m2", "FLOAT8E5M2", "float8_e5m2"),
}

_ALIASES = {
    "fp32": Precision.FP32, "float32": Precision.FP32, "float": Precision.FP32, "f32": Precision.FP32,
    "bf16": Precision.BF16, "bfloat16": Precision.BF16,
    "fp16": Precision.FP16, "float16": Precision.FP16, "half": Precision.FP16, "f16": Precision.FP16,
    # "fp8" alone means the forward format: E4M3 (DESIGN.md)
    "fp8": Precision.FP8_E4M3, "fp8_e4m3": Precision.FP8_E4M3, "e4m3": Precision.FP8_E4M3,
    "fp8e4m3": Precision.FP8_E4M3, "float8_e4m3fn": Precision.FP8_E4M3, "e4m3fn": Precision.FP8_E4M3,
    "fp8_e5m2": Precision.FP8_E5M2, "e5m2": Precision.FP8_E5M2, "fp8e5m2": Precision.FP8_E5M2,
    "float8_e5m2": Precision.FP8_E5M2,
}

#: Candidate formats for a layer when the user names none: the forward formats of DESIGN.md.
DEFAULT_CANDIDATES: tuple[Precision, ...] = (Precision.BF16, Precision.FP16, Precision.FP8_E4M3)


def parse_precision(text: str | Precision) -> Precision:
    """Parse a user string such as ``"bf16"`` or ``"fp8"``; raise a one-line UsageError otherwise."""
    if isinstance(text, Precision):
        return text
    key = str(text).strip().lower().replace("-", "_")
    try:
        return _ALIASES[key]
    except KeyError:
        names = ", ".join(p.value for p in Precision)
        raise UsageError(f"unknown format {text!r}: use one of {names} (or fp8 for fp8_e4m3)") from None


def parse_precisions(texts: str | Iterable[str | Precision]) -> tuple[Precision, ...]:
    """Parse a comma-separated list (or iterable) of formats, keeping order and dropping repeats."""
    items = texts.split(",") if isinstance(texts, str) else list(texts)
    out: list[Precision] = []
    for item in items:
        if isinstance(item, str) and not item.strip():
            continue
        p = parse_precision(item)
        if p not in out:
            out.append(p)
    if not out:
        raise UsageError("empty format list: name at least one of fp32, bf16, fp16, fp8")
    return tuple(out)


def wider(a: Precision, b: Precision) -> Precision:
    """The format with more precision of the two (the rule for FOLLOW ops with mixed inputs)."""
    return a if a.rank <= b.rank else b
