"""fp8 scaling in numpy: the static scale rule and fp8 codes, for the ONNX side (torch-free).

The torch emulation (:mod:`autoprec.torch.quantize`, :func:`autoprec.torch.passes.ops.fp8_codes`)
computes the same on tensors; ``tests/unit/test_fp8_numpy.py`` holds the two bit-identical. Both
follow one rule: a scale maps the calibrated amax onto the format's max, a zero or non-finite amax
gives scale 1 (all-zero tensors stay exact, no NaN appears); codes are ``x / scale`` in fp32,
clamped to the max for a saturating format (E4M3FN), rounded to nearest even by the conversion.
"""

from __future__ import annotations

import numpy as np

from autoprec.core.formats import Precision

F32 = np.float32


def fp8_scale(amax: np.ndarray | float, p: Precision = Precision.FP8_E4M3) -> np.ndarray:
    """Scale that maps ``amax`` onto ``p``'s max (elementwise for per-channel amax), in fp32."""
    a = np.asarray(amax, dtype=F32)
    ok = np.isfinite(a) & (a > 0)
    return np.where(ok, a / F32(p.max), F32(1.0)).astype(F32)


def channel_amax(w: np.ndarray) -> np.ndarray:
    """Per-output-channel amax of a weight (axis 0), shaped to broadcast against ``w``."""
    w = np.asarray(w, dtype=F32)
    flat = np.abs(w.reshape(w.shape[0], -1)).max(axis=1)
    return flat.reshape((w.shape[0],) + (1,) * (w.ndim - 1))


def fp8_codes(x: np.ndarray, scale: np.ndarray, p: Precision) -> np.ndarray:
    """The ``p`` array (ml_dtypes) whose values times ``scale`` are ``x`` rounded to ``p``."""
    with np.errstate(over="ignore", invalid="ignore"):
        y = np.asarray(x, dtype=F32) / np.asarray(scale, dtype=F32)
    if p.info.saturates:
        y = np.clip(y, -F32(p.max), F32(p.max))
    return y.astype(p.numpy_dtype)
