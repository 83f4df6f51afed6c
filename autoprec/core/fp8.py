"""fp8 scaling in numpy: the static scale rule and fp8 codes, for the ONNX side (torch-free).

The torch emulation (:mod:`autoprec.torch.quantize`, :func:`autoprec.torch.passes.ops.fp8_codes`)
computes the same on tensors; ``tests/unit/test_fp8_numpy.py`` holds the two bit-identical. Both
follow one rule: a scale maps the calibrated amax onto the format's max, a zero or non-finite amax
gives scale 1 (all-zero tensors stay exact, no NaN appears); codes are ``x / scale`` in fp32,
clamped to the max for a saturating format (E4M3FN), rounded to nearest even by the conversion.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from autoprec.core.formats import Precision

F32 = np.float32


@dataclass(frozen=True)
class Channels:
    """Where a weight holds its output channels, the unit of a per-channel fp8 scale.

    ``axis`` 0: a linear weight's rows, a convolution's [C_out, C_in/groups, k...], a table's rows.
    ``axis`` 1: a transposed convolution's [C_in, C_out/groups, k...]; its output channel
    g * C_out/groups + j is column j of the rows of group g (the input channels it reads), so
    ``groups`` splits axis 0 and each (group, column) pair has its own scale. One scale per column
    shared by all groups (what a per-axis scale on axis 1 could say) would make a grouped or
    depthwise layer's channels share the amax of unrelated channels.
    """

    axis: int = 0
    groups: int = 1

    def __post_init__(self) -> None:
        if self.axis not in (0, 1) or self.groups < 1 or (self.axis == 0 and self.groups != 1):
            raise ValueError(f"output channels on axis {self.axis} with {self.groups} groups: "
                             "axis 0 (one group) or axis 1 (groups along axis 0)")


#: output channels on axis 0, the layout of every layer's weight but a transposed convolution's
ROWS = Channels()


def fp8_scale(amax: np.ndarray | float, p: Precision = Precision.FP8_E4M3) -> np.ndarray:
    """Scale that maps ``amax`` onto ``p``'s max (elementwise for per-channel amax), in fp32."""
    a = np.asarray(amax, dtype=F32)
    ok = np.isfinite(a) & (a > 0)
    return np.where(ok, a / F32(p.max), F32(1.0)).astype(F32)


def channel_amax(w: np.ndarray, channels: Channels = ROWS) -> np.ndarray:
    """Per-output-channel amax of a weight (:class:`Channels`), shaped to broadcast against ``w``:
    [C, 1, ...] for channels on axis 0; [C_in, C_out/groups, 1, ...] for a transposed convolution,
    each (group, column) amax repeated over the rows of its group."""
    w = np.asarray(w, dtype=F32)
    if channels.axis == 0:
        flat = np.abs(w.reshape(w.shape[0], -1)).max(axis=1)
        return flat.reshape((w.shape[0],) + (1,) * (w.ndim - 1))
    rows, cols, g = w.shape[0], w.shape[1], channels.groups
    per = np.abs(w.reshape(g, rows // g, cols, -1)).max(axis=(1, 3))  # [groups, C_out/groups]
    return np.repeat(per, rows // g, axis=0).reshape((rows, cols) + (1,) * (w.ndim - 2))


def fp8_codes(x: np.ndarray, scale: np.ndarray, p: Precision) -> np.ndarray:
    """The ``p`` array (ml_dtypes) whose values times ``scale`` are ``x`` rounded to ``p``."""
    with np.errstate(over="ignore", invalid="ignore"):
        y = np.asarray(x, dtype=F32) / np.asarray(scale, dtype=F32)
    if p.info.saturates:
        y = np.clip(y, -F32(p.max), F32(p.max))
    return y.astype(p.numpy_dtype)
