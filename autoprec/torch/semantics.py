"""The numerics of one compute layer in a given format: the single definition every part shares.

A layer (linear, conv, transposed conv, matmul/bmm) in format P (DESIGN.md):
- its activation inputs are rounded to P (fp8: per-tensor static scale from calibration amax),
- its weight is rounded to P (fp8: per-output-channel scale from the weight's own amax; a
  transposed convolution's output channels are the (group, column) pairs of its [C_in,
  C_out/groups, k...] weight, :func:`weight_channels`),
- the product is computed and accumulated in fp32,
- the output is rounded to P for 16-bit formats, to bf16 for fp8 (an fp8 GEMM writes bf16).

A bias (linear, conv, transposed conv) is added as a deployed graph adds it (:func:`finish`). In a
16-bit format the product is rounded to P, then the bias, rounded to P, is added and the sum rounded
to P again: ``round_P(round_P(x @ W) + round_P(b))``. ONNX types say so -- a 16-bit
MatMul/Gemm/Conv/ConvTranspose writes P, and the Add after it reads and writes P -- so every provider
computes it (the ONNX export moves a 16-bit Gemm's or (transposed) Conv's bias into such an Add: a
fused bias would round once on some kernels and twice on others). An fp8 layer computes on
dequantized fp32 operands: its bias is added in fp32 and the sum rounded once, to bf16.

An embedding lookup is the same rule with no activation input: in a 16-bit format P it returns
round_P(W)[idx], the table rounded to P and the rows copied exactly (its output rounding is then
the identity). In fp8 it returns round_bf16(quantize_weight(W, fp8))[idx]: the table's output
channels are its rows (dim 0), so the weight rule already gives one scale per row, and the rows
are rounded to bf16 as the output of every fp8 layer is. It reads no activation, so it needs no
calibrated amax.

Training (:mod:`autoprec.torch.training`) runs the same functions: a 16-bit layer's backward
rounding follows from its roundings (:mod:`autoprec.torch.quantize`), and an fp8 layer takes its
scales from a recipe instead of calibration (:class:`Fp8Recipe`: E4M3 operands with current or
delayed scales, its output gradient quantized to E5M2 before the backward GEMMs).

The profiler calls :func:`emulate_layer` on single layers; the fx apply pass builds the same
computation into the rewritten graph, and oracle tests hold the two to the same bits.
"""

from __future__ import annotations

import contextlib
import weakref
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Iterator, Protocol

import torch

from autoprec.torch.capture import layer_function
from autoprec.core.formats import Precision
from autoprec.core.fp8 import ROWS, Channels
from autoprec.core.kinds import (BIAS_KINDS, LOOKUP_KINDS, act_arg_positions, groups_arg_position,
    weight_arg_position, weight_channel_axis)
from autoprec.torch.quantize import (RoundingObserver, channel_amax, fp8_scale, quantize, static_scale,
    training_observer)

_BIAS_ARG = {kind: 2 for kind in BIAS_KINDS}


@dataclass(frozen=True)
class LayerFormat:
    """How one layer runs: its format and, for fp8, the calibrated amax of each activation input.

    The amax (not the scale) is stored so one calibration serves both fp8 formats.
    """

    fmt: Precision
    act_amax: tuple[float, ...] = ()  # one per activation input; used only for fp8

    def amax_for(self, i: int) -> float | None:
        if not self.fmt.needs_scale:
            return None
        return self.act_amax[i] if i < len(self.act_amax) else None


class Fp8Recipe(Protocol):
    """How one fp8 layer scales its tensors while it trains (the recipe's state for that layer)."""

    def activation(self, j: int, x: torch.Tensor) -> torch.Tensor:
        """Activation input ``j`` quantized to the forward fp8 format."""

    def weight(self, w: torch.Tensor, channels: Channels = ROWS) -> torch.Tensor:
        """The weight quantized to the forward fp8 format (``channels``: where its output
        channels lie, for scales per channel)."""

    def output_grad(self, y: torch.Tensor) -> torch.Tensor:
        """``y`` unchanged; its gradient quantized to the backward fp8 format (E5M2)."""


class TrainingNumerics(RoundingObserver, Protocol):
    """The training numerics in force (:class:`autoprec.torch.training.Numerics`): the observer of
    every rounding, and the fp8 scaling of each fp8 layer."""

    def fp8_recipe(self, site: str, fmt: Precision) -> Fp8Recipe:
        """The scaling state of fp8 layer ``site`` (computing in ``fmt``) for this step."""


def weight_channels(kind: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Channels:
    """Where the weight of a layer call of ``kind`` holds its output channels: axis 0, or a
    transposed convolution's axis 1 with its groups (an int argument of the call)."""
    axis = weight_channel_axis(kind)
    if axis == 0:
        return ROWS
    pos = groups_arg_position(kind)
    groups = kwargs.get("groups", args[pos] if pos is not None and len(args) > pos else 1)
    return Channels(axis, int(groups))


#: fp8 layer weights already rounded in this context (:func:`reuse_weight_rounding`): id(weight) ->
#: (a weak reference to it, its version, format and channels, the rounded tensor); None outside it
_ROUNDED_WEIGHTS: ContextVar[dict[int, tuple[Any, tuple[Any, ...], torch.Tensor]] | None] = \
    ContextVar("autoprec_rounded_weights", default=None)


@contextlib.contextmanager
def reuse_weight_rounding() -> Iterator[None]:
    """Round each fp8 layer weight once in this context, not at every call of its layer.

    For evaluating a plan over many batches (a tune's measurement): an fp8 weight's rounding (its
    per-channel amax and scales, then about a dozen passes) is the same on every batch, and on a
    small model costs as much as the activations' roundings. The rounded copy is reused while the
    weight is the same tensor, unchanged (its ``_version`` counts in-place updates), and no
    gradient is recorded for it; the copies go with the context (at most one fp32 copy of the fp8
    layers' weights more while it lasts). 16-bit weights are not kept: their rounding is two
    passes, as reading a kept copy back would be.
    """
    token = _ROUNDED_WEIGHTS.set({})
    try:
        yield
    finally:
        _ROUNDED_WEIGHTS.reset(token)


def quantize_weight(w: torch.Tensor, fmt: Precision, channels: Channels = ROWS) -> torch.Tensor:
    """Round a weight to ``fmt``; fp8 uses one scale per output channel (``channels``: dim 0 but
    for a transposed convolution, :func:`weight_channels`)."""
    if fmt.needs_scale:
        return quantize(w, fmt, fp8_scale(channel_amax(w, channels), fmt))
    return quantize(w, fmt)


def _layer_weight(w: torch.Tensor, fmt: Precision, channels: Channels) -> torch.Tensor:
    """:func:`quantize_weight` of a layer's weight, kept for reuse inside :func:`reuse_weight_rounding`."""
    kept = _ROUNDED_WEIGHTS.get()
    if kept is None or not fmt.needs_scale or (torch.is_grad_enabled() and w.requires_grad) \
            or training_observer() is not None:
        return quantize_weight(w, fmt, channels)
    key = (w._version, fmt, channels)
    hit = kept.get(id(w))
    if hit is not None and hit[0]() is w and hit[1] == key:
        return hit[2]
    q = quantize_weight(w, fmt, channels)
    kept[id(w)] = (weakref.ref(w), key, q)
    return q


def split_bias(kind: str, args: tuple[Any, ...], kwargs: dict[str, Any]
               ) -> tuple[tuple[Any, ...], dict[str, Any], torch.Tensor | None]:
    """A layer call without its bias, and the bias (None when the layer has none)."""
    pos = _BIAS_ARG.get(kind)
    if pos is None:
        return args, kwargs, None
    if "bias" in kwargs:
        kw = dict(kwargs)
        return args, kw, kw.pop("bias")
    if len(args) > pos and args[pos] is not None:
        a = list(args)
        b, a[pos] = a[pos], None
        return tuple(a), kwargs, b
    return args, kwargs, None


def bias_view(kind: str, bias: torch.Tensor) -> torch.Tensor:
    """``bias`` shaped to broadcast over a layer's output: the last axis of a linear layer's, the
    channel axis of a convolution's (the one before its spatial axes, batched or not)."""
    if kind == "linear":
        return bias
    return bias.reshape(-1, *([1] * int(kind[-2])))  # conv1d ... conv_transpose3d: the spatial rank


def finish(kind: str, product: torch.Tensor, bias: torch.Tensor | None, fmt: Precision,
           recipe: Fp8Recipe | None = None) -> torch.Tensor:
    """A layer's result in ``fmt`` from its fp32-accumulated ``product`` and its fp32 ``bias``
    (module docstring): 16-bit ``round_P(round_P(product) + round_P(bias))``, fp8
    ``round_bf16(product + bias)``, without a bias the product rounded to ``fmt.compute_output``.
    A training fp8 ``recipe`` quantizes the product's gradient (the bias's stays bf16)."""
    if recipe is not None:
        product = recipe.output_grad(product)
    if bias is None:
        return quantize(product, fmt.compute_output)
    b = bias_view(kind, bias)
    if fmt.is_fp8:
        return quantize(product + b, fmt.compute_output)
    return quantize(quantize(product, fmt) + quantize(b, fmt), fmt)


def needs_act_amax(kind: str, fmt: Precision) -> bool:
    """Whether a layer of ``kind`` in ``fmt`` needs the calibrated amax of its activation inputs:
    fp8 layers that read any (an fp8 lookup reads none: its scales come from its table)."""
    return fmt.needs_scale and bool(act_arg_positions(kind))


def lookup_rows(rows: torch.Tensor, fmt: Precision) -> torch.Tensor:
    """A lookup's result in ``fmt`` computed from the fp32 rows it copied (``W[idx]``), equal to
    :func:`emulate_layer` on the whole table: each row of the result is a row of the table, and
    :func:`quantize_weight` scales a table row by row (its output channels), so a row's fp8 scale is
    its own amax. For a 16-bit ``fmt`` it is ``round_fmt(rows)``."""
    q = quantize_weight(rows.reshape(-1, rows.shape[-1]), fmt).reshape(rows.shape)
    return quantize(q, fmt.compute_output)


def quantize_activation(x: torch.Tensor, fmt: Precision, amax: float | None) -> torch.Tensor:
    """Round an activation to ``fmt``; fp8 without a calibrated amax uses the tensor's own (dynamic)."""
    if fmt.needs_scale:
        scale = fp8_scale(x.detach().abs().amax(), fmt) if amax is None else static_scale(float(amax), fmt, x.device)
        return quantize(x, fmt, scale)
    return quantize(x, fmt)


def emulate_layer(kind: str, args: tuple[Any, ...], kwargs: dict[str, Any], lf: LayerFormat,
                  weight_q: torch.Tensor | None = None, recipe: Fp8Recipe | None = None,
                  inputs_rounded: bool = False) -> torch.Tensor:
    """Compute a layer from its fp32 arguments with the rounding of ``lf`` (fp32 arithmetic).

    ``weight_q``: the weight already rounded by :func:`quantize_weight` with the layer's
    :func:`weight_channels` (callers that run one layer on many batches round it once).
    ``recipe``: a training fp8 layer's scaling, used instead of the calibrated amax and the
    per-channel weight scales.
    ``inputs_rounded``: the activation inputs already hold values of ``lf`` (with its static fp8
    scales): rounding them again would give the same bits (each rounding is idempotent), so they
    are used as they are. Ignored with a ``recipe``, which scales the inputs itself.
    """
    if recipe is not None and not lf.fmt.is_fp8:
        raise ValueError(f"an fp8 recipe was given for a layer in {lf.fmt}")
    fn = layer_function(kind)
    if lf.fmt is Precision.FP32:
        return fn(*args, **kwargs)
    if kind in LOOKUP_KINDS and weight_q is None:  # the rows it copies, not the whole table
        return lookup_rows(fn(*args, **kwargs), lf.fmt)
    a = list(args)
    for j, pos in enumerate(() if inputs_rounded and recipe is None else act_arg_positions(kind)):
        if torch.is_tensor(a[pos]):
            a[pos] = recipe.activation(j, a[pos]) if recipe else quantize_activation(a[pos], lf.fmt, lf.amax_for(j))
    wpos = weight_arg_position(kind)
    if wpos is not None and torch.is_tensor(a[wpos]):
        if weight_q is not None:
            a[wpos] = weight_q
        else:
            channels = weight_channels(kind, args, kwargs)
            a[wpos] = recipe.weight(a[wpos], channels) if recipe else _layer_weight(a[wpos], lf.fmt, channels)
    a2, kw, bias = split_bias(kind, tuple(a), kwargs)
    return finish(kind, fn(*a2, **kw), bias, lf.fmt, recipe)
