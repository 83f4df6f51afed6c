"""Bit-exact emulation of each :class:`~autoprec.core.formats.Precision` in torch.

``quantize(x, p)`` returns an fp32 tensor holding exactly the values format ``p`` can store:
round to nearest even, subnormals kept, fp16/bf16/E5M2 overflow to inf, E4M3FN saturating at
+-448 (DESIGN.md). The results match ml_dtypes bit for bit (tests/unit/test_formats.py).

fp8 formats take a scale: ``x`` is divided by it, rounded, and multiplied back, so the scale maps
the tensor's range onto the format's. Scales are per tensor (a scalar) or per output channel
(a tensor broadcastable against ``x``, e.g. shape [C_out, 1] for a linear weight; a transposed
convolution's output channels lie on another axis, :class:`autoprec.core.fp8.Channels`).

Gradients. Outside training a rounding passes its gradient straight through (the identity), which
is all the profiler's first-order estimate and a user's fine-tuning of the emulation need. While
training numerics are active (:func:`rounding_gradients`, entered by :mod:`autoprec.torch.training`)
a rounding to ``p`` also rounds the gradient it passes back, to ``p.compute_output``: a tensor a GPU
stores in a 16-bit format has its gradient stored in that format (the backward GEMMs of a 16-bit
layer write 16-bit results, and fp16 gradients underflow below 6e-8 and overflow above 65504), and
an fp8 layer's backward GEMMs write bf16. So a 16-bit layer's input gradient is
``round_P(round_P(g) @ W_P)`` and its weight gradient ``round_P(round_P(g).T @ x_P)``, reaching the
fp32 master exactly. Each such rounding, forward and backward, is reported to the active
:class:`RoundingObserver` under the site (layer) that made it.
"""

from __future__ import annotations

import contextlib
import functools
import math
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Iterator, Protocol

import torch

from autoprec.core.formats import Precision
from autoprec.core.fp8 import ROWS, Channels


def round_to(x: torch.Tensor, p: Precision) -> torch.Tensor:
    """Round fp32 ``x`` to the values of ``p`` (no scale), returned as fp32. Not differentiable."""
    if p is Precision.FP32:
        return x.float()
    if _by_bits(p, x):
        return _round_e4m3(x.float(), None)
    return _stored(x.float(), p).float()


def round_scaled(x: torch.Tensor, p: Precision, scale: torch.Tensor | None) -> torch.Tensor:
    """``round_to(x / scale, p) * scale``, bit for bit; for E4M3 on the CPU the multiplication by
    the scale is folded into reading the codes back (:func:`_e4m3_values`: one pass fewer)."""
    if scale is None:
        return round_to(x, p)
    y = x / scale
    if _by_bits(p, y):
        return _round_e4m3(y.float(), scale, owned=True)
    return round_to(y, p) * scale


def _stored(x: torch.Tensor, p: Precision) -> torch.Tensor:
    """fp32 ``x`` as a tensor of ``p``'s dtype."""
    if p.info.saturates:
        # E4M3FN has no inf: out-of-range values saturate to +-max (NaN stays NaN)
        x = torch.clamp(x, -p.max, p.max)
    # torch's fp32 -> {fp16, bf16, fp8} conversions round to nearest even with subnormals and
    # overflow to inf (checked against ml_dtypes for every code point in the tests).
    return x.to(p.torch_dtype)


def _by_bits(p: Precision, x: torch.Tensor) -> bool:
    """Whether E4M3 codes are read back by :func:`_e4m3_values` rather than by torch's own
    E4M3 -> fp32 conversion, which is slow on the CPU: on 4M values on a 2-core machine about 16 ms
    against 6 ms, where a whole bf16 rounding costs 4 ms (E5M2's conversion is as fast as fp16's)."""
    return p is Precision.FP8_E4M3 and x.device.type == "cpu"


#: an E4M3 code's bits moved into an fp16's read 2**8 too small (:func:`_e4m3_values`)
_E4M3_IN_FP16 = 256.0
#: an int16 with every bit set but bit 14 (where the shift leaves a second copy of the sign)
_CLEAR_BIT_14 = -(1 << 14) - 1


def _round_e4m3(y: torch.Tensor, scale: torch.Tensor | None, owned: bool = False) -> torch.Tensor:
    """fp32 ``y`` rounded to E4M3 (saturating), times ``scale`` if given; ``owned``: ``y`` is a
    temporary of the caller's, which this may overwrite (each 16 MB buffer not allocated saves a
    pass's worth of page faults). A tensor holding NaN (whose codes :func:`_e4m3_values` cannot
    read) goes through torch's conversion: the sum of the saturated values, at most 448 each, is
    NaN exactly when one of them is; so does a scale so large that 2**8 times it overflows (no fp8
    scale of a finite amax comes near)."""
    p = Precision.FP8_E4M3
    factor = _E4M3_IN_FP16 if scale is None else scale.float() * _E4M3_IN_FP16
    saturated = y.clamp_(-p.max, p.max) if owned else torch.clamp(y, -p.max, p.max)
    q = saturated.to(p.torch_dtype)
    if bool(torch.isnan(saturated.sum())) or not _finite(factor):
        vals = q.float()
        return vals if scale is None else vals * scale
    return _e4m3_values(q, factor, out=saturated)


def _finite(factor: float | torch.Tensor) -> bool:
    if not torch.is_tensor(factor):
        return math.isfinite(factor)
    return math.isfinite(float(factor)) if factor.numel() == 1 else bool(torch.isfinite(factor).all())


def _e4m3_values(q: torch.Tensor, factor: float | torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """The fp32 values of E4M3 codes ``q`` times ``factor / 2**8`` (the scale), by moving bits, not
    by conversion, written into ``out`` (an fp32 tensor of ``q``'s shape).

    A code ``s eeee mmm`` sign-extended to int16 and shifted left by 7 is the fp16 with sign ``s``,
    exponent field ``0eeee`` and mantissa ``mmm0000000`` once the second copy of the sign (bit 14)
    is cleared: 2**(e-15) * 1.mmm, or for e = 0 the fp16 subnormal mmm * 2**-17. Both are the E4M3
    value (2**(e-7) * 1.mmm, subnormal mmm * 2**-9) divided by 2**8 exactly, so the value is that
    fp16 widened (exact) times 2**8. A scale joins that multiplication: 2**8 * scale is exact, and
    (v / 2**8) * (2**8 * scale) rounds the same real number v * scale once, as ``v * scale`` does.
    The NaN codes (0x7F, 0xFF) would read +-480: callers keep NaN away.
    """
    h = q.view(torch.int8).to(torch.int16)
    h.bitwise_left_shift_(7).bitwise_and_(_CLEAR_BIT_14)
    return out.copy_(h.view(torch.float16)).mul_(factor)


class RoundingObserver(Protocol):
    """Receives every rounding made while training numerics are active (the numerics monitor)."""

    def observe(self, site: str, scaled: torch.Tensor, rounded: torch.Tensor, fmt: Precision,
                grad: bool) -> None:
        """``scaled``: the fp32 values divided by their scale; ``rounded``: those values in ``fmt``;
        ``grad``: a gradient in the backward pass (else a forward value)."""

    def observe_result(self, site: str, values: torch.Tensor, fmt: Precision, grad: bool) -> None:
        """A native tensor already in ``fmt`` (rounded inside a kernel): only what it holds is known."""


@dataclass(frozen=True)
class _Training:
    observer: RoundingObserver
    site: str


#: the training numerics in force in this context; None: straight-through gradients
_TRAINING: ContextVar[_Training | None] = ContextVar("autoprec_training", default=None)


def training_observer() -> RoundingObserver | None:
    """The observer of the training numerics in force (inside :func:`rounding_gradients`), else None."""
    state = _TRAINING.get()
    return None if state is None else state.observer


@contextlib.contextmanager
def rounding_gradients(observer: RoundingObserver, site: str = "") -> Iterator[None]:
    """Make every rounding in this context round its gradient too, reporting both to ``observer``
    under ``site``. Nested use changes the site (a layer inside a training step)."""
    token = _TRAINING.set(_Training(observer, site))
    try:
        yield
    finally:
        _TRAINING.reset(token)


@contextlib.contextmanager
def at_site(site: str) -> Iterator[None]:
    """Report the roundings made in this context under ``site``; nothing outside training."""
    state = _TRAINING.get()
    if state is None:
        yield
        return
    token = _TRAINING.set(_Training(state.observer, site))
    try:
        yield
    finally:
        _TRAINING.reset(token)


def _scaled_round(x: torch.Tensor, p: Precision, scale: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(x / scale, that rounded to ``p``) in fp32."""
    y = x.float() if scale is None else x.float() / scale
    return y, round_to(y, p)


class _RoundingBoth(torch.autograd.Function):
    """A training rounding: the value to ``p`` forward, its gradient to ``p.compute_output`` backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, p: Precision, scale: torch.Tensor | None,  # type: ignore[override]
                state: _Training) -> torch.Tensor:
        y, q = _scaled_round(x, p, scale)
        state.observer.observe(state.site, y, q, p, False)
        ctx.p, ctx.state = p, state
        return q if scale is None else q * scale

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        gp = ctx.p.compute_output
        g, q = _scaled_round(grad, gp, None)
        ctx.state.observer.observe(ctx.state.site, g, q, gp, True)
        return q, None, None, None


class _StraightThrough(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, p: Precision, scale: torch.Tensor | None) -> torch.Tensor:  # type: ignore[override]
        return round_scaled(x, p, scale)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        return grad, None, None


def quantize(x: torch.Tensor, p: Precision, scale: torch.Tensor | float | None = None) -> torch.Tensor:
    """Emulate storing ``x`` in format ``p``: the fp32 tensor of representable values.

    ``scale`` (fp8 only, optional elsewhere): per-tensor scalar or per-channel tensor; ``x`` is
    divided by it before rounding and multiplied after. Gradients pass straight through, or are
    rounded to ``p.compute_output`` while training numerics are active (module docstring).
    """
    if p is Precision.FP32:
        return x
    if scale is not None and not torch.is_tensor(scale):
        scale = torch.tensor(float(scale), dtype=torch.float32, device=x.device)
    state = _TRAINING.get()
    if state is not None:
        return _RoundingBoth.apply(x, p, scale, state)
    if torch.is_grad_enabled() and x.requires_grad:
        return _StraightThrough.apply(x, p, scale)
    return round_scaled(x, p, scale)  # nothing to record: a Function's call costs more than a small rounding


def fp8_scale(amax: torch.Tensor | float, p: Precision = Precision.FP8_E4M3) -> torch.Tensor:
    """Scale that maps ``amax`` onto the format's max (static calibration scaling).

    A zero or non-finite amax gives scale 1 so that all-zero tensors stay exact and no NaN appears.
    Works elementwise for per-channel amax.
    """
    a = torch.as_tensor(amax, dtype=torch.float32)
    ok = torch.isfinite(a) & (a > 0)
    return torch.where(ok, a / p.max, torch.ones_like(a))


@functools.lru_cache(maxsize=4096)
def static_scale(amax: float, p: Precision, device: torch.device) -> torch.Tensor:
    """:func:`fp8_scale` of a calibrated amax on ``device``, made once per (amax, format, device):
    a static activation scale is the same tensor on every call (read-only; callers never write
    to a scale), where making it anew costs more ops than a small rounding."""
    return fp8_scale(amax, p).to(device)


def channel_amax(w: torch.Tensor, channels: Channels = ROWS) -> torch.Tensor:
    """Per-output-channel amax of a weight, shaped to broadcast against ``w``: along dim 0, or a
    transposed convolution's (group, column) pairs (:class:`autoprec.core.fp8.Channels`, whose numpy
    twin computes the same values)."""
    a = w.detach().abs()
    if channels.axis == 0:
        flat = a.reshape(w.shape[0], -1).amax(dim=1)
        return flat.reshape((w.shape[0],) + (1,) * (w.dim() - 1))
    rows, cols, g = w.shape[0], w.shape[1], channels.groups
    per = a.reshape(g, rows // g, cols, -1).amax(dim=(1, 3))  # [groups, C_out/groups]
    return per.repeat_interleave(rows // g, dim=0).reshape((rows, cols) + (1,) * (w.dim() - 2))
