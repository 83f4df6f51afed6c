"""Bit-exact emulation of each :class:`~autoprec.core.formats.Precision` in torch.

``quantize(x, p)`` returns an fp32 tensor holding exactly the values format ``p`` can store:
round to nearest even, subnormals kept, fp16/bf16/E5M2 overflow to inf, E4M3FN saturating at
+-448 (DESIGN.md). The results match ml_dtypes bit for bit (tests/unit/test_formats.py).

fp8 formats take a scale: ``x`` is divided by it, rounded, and multiplied back, so the scale maps
the tensor's range onto the format's. Scales are per tensor (a scalar) or per output channel
(a tensor broadcastable against ``x``, e.g. shape [C_out, 1] for a linear weight).

The straight-through gradient (identity) lets emulated models train: rounding is treated as the
identity in the backward pass, which is what fp32 master weights with low-precision compute do.
"""

from __future__ import annotations

import torch

from autoprec.core.formats import Precision


def round_to(x: torch.Tensor, p: Precision) -> torch.Tensor:
    """Round fp32 ``x`` to the values of ``p`` (no scale), returned as fp32. Not differentiable."""
    if p is Precision.FP32:
        return x.float()
    x = x.float()
    if p.info.saturates:
        # E4M3FN has no inf: out-of-range values saturate to +-max (NaN stays NaN)
        x = torch.clamp(x, -p.max, p.max)
    # torch's fp32 -> {fp16, bf16, fp8} conversions round to nearest even with subnormals and
    # overflow to inf (checked against ml_dtypes for every code point in the tests).
    return x.to(p.torch_dtype).float()


class _StraightThrough(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, p: Precision, scale: torch.Tensor | None) -> torch.Tensor:  # type: ignore[override]
        if scale is None:
            return round_to(x, p)
        return round_to(x / scale, p) * scale

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        return grad, None, None


def quantize(x: torch.Tensor, p: Precision, scale: torch.Tensor | float | None = None) -> torch.Tensor:
    """Emulate storing ``x`` in format ``p``: the fp32 tensor of representable values.

    ``scale`` (fp8 only, optional elsewhere): per-tensor scalar or per-channel tensor; ``x`` is
    divided by it before rounding and multiplied after. Gradients pass straight through.
    """
    if p is Precision.FP32:
        return x
    if scale is not None and not torch.is_tensor(scale):
        scale = torch.tensor(float(scale), dtype=torch.float32, device=x.device)
    return _StraightThrough.apply(x, p, scale)


def fp8_scale(amax: torch.Tensor | float, p: Precision = Precision.FP8_E4M3) -> torch.Tensor:
    """Scale that maps ``amax`` onto the format's max (static calibration scaling).

    A zero or non-finite amax gives scale 1 so that all-zero tensors stay exact and no NaN appears.
    Works elementwise for per-channel amax.
    """
    a = torch.as_tensor(amax, dtype=torch.float32)
    ok = torch.isfinite(a) & (a > 0)
    return torch.where(ok, a / p.max, torch.ones_like(a))


def channel_amax(w: torch.Tensor) -> torch.Tensor:
    """Per-output-channel amax of a weight (dim 0), shaped to broadcast against ``w``."""
    flat = w.detach().abs().reshape(w.shape[0], -1).amax(dim=1)
    return flat.reshape((w.shape[0],) + (1,) * (w.dim() - 1))
