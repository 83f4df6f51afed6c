"""The functions a rewritten graph calls: edge casts, FOLLOW-op rounding and low-precision layers.

They are module-level functions so fx code generation can name them, and each takes its format as a
keyword argument, so the generated code reads ``cast(ln, fmt=Precision.BF16, ...)``.

Two modes share every function (``native`` keyword):

emulate (``native=False``)
    Every tensor stays fp32; rounding goes through :mod:`autoprec.torch.quantize` (straight-through
    gradients). A layer is exactly :func:`autoprec.torch.semantics.emulate_layer`.

native (``native=True``)
    16-bit values are real bf16/fp16 tensors and 16-bit layers run on 16-bit operands (weights cast
    at use from the fp32 master); a layer's bias is a 16-bit add after the product, as
    :func:`autoprec.torch.semantics.finish` says (not the GEMM's fused bias, which rounds once). An fp8
    activation cast is a quantize-dequantize (fp32 tensor of
    E4M3 values times the static scale); the fp8 linear layer after it re-derives the fp8 codes
    (exact, see :func:`fp8_codes`) and runs ``torch._scaled_mm`` with fp32 accumulation, writing
    bf16. fp8 conv, transposed conv, matmul and bmm have no fp8 kernel in torch: native mode emulates
    those layers' numerics and writes a real bf16 tensor, as does an fp8 embedding lookup.

While training numerics are active (:func:`autoprec.torch.quantize.rounding_gradients`, emulate mode)
every rounding also rounds its gradient and reports both to the monitor under its ``site`` (the
layer's node name; a cast's first reader; a FOLLOW op's own name), and an fp8 layer scales its
operands by the training recipe instead of calibration: its fp8 casts pass values through and the
layer quantizes them itself.

Why a layer need not re-round inputs a cast already rounded: rounding to a 16-bit format is
idempotent, and so is the static fp8 quantize-dequantize (``q(q(x)) == q(x)``: ``fl(v*s)/s`` lies
within 2^-23 relative of the E4M3 value ``v``, far inside its rounding interval). So a layer computes
the same bits whether or not it rounds an input a cast node rounded, and :class:`InsertCasts
<autoprec.torch.passes.insert_casts.InsertCasts>`, which gives every layer's activation inputs in its
format, marks the layer ``rounded=True``: outside training it then skips those roundings (half of an
fp8 graph's roundings; q, k and v share one cast). Called without the mark, a layer rounds its
inputs itself, as the shared definition of a layer's numerics does. In training the mark is
ignored: an fp8 cast passes its value through for the recipe to scale, and a 16-bit layer's own
roundings are those whose backward rounds its input gradients.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import torch

from autoprec.torch.capture import layer_function
from autoprec.core.formats import Precision
from autoprec.core.kinds import LOOKUP_KINDS
from autoprec.torch.quantize import at_site, channel_amax, fp8_scale, quantize, training_observer
from autoprec.torch.semantics import LayerFormat, TrainingNumerics, bias_view, emulate_layer, quantize_activation, split_bias

FP32 = Precision.FP32


def _tree(fn: Any, x: Any) -> Any:
    """Apply ``fn`` to every floating tensor in ``x`` (tensors, tuples, lists); leave the rest."""
    if isinstance(x, (tuple, list)):
        return type(x)(_tree(fn, e) for e in x)
    if torch.is_tensor(x) and x.is_floating_point():
        return fn(x)
    return x


# --- edges and FOLLOW ops -----------------------------------------------------------------------


class _Watched(torch.autograd.Function):
    """Native training: the identity, reporting a 16-bit value and, backward, its gradient (both
    already rounded by torch's kernels) to the monitor."""

    @staticmethod
    def forward(ctx, t: torch.Tensor, fmt: Precision, numerics: Any, site: str) -> torch.Tensor:  # type: ignore[override]
        numerics.observe_result(site, t, fmt, False)
        ctx.fmt, ctx.numerics, ctx.site = fmt, numerics, site
        return t.view_as(t)

    @staticmethod
    def backward(ctx, g: torch.Tensor):  # type: ignore[override]
        ctx.numerics.observe_result(ctx.site, g, ctx.fmt, True)
        return g, None, None, None


def _native_to(t: torch.Tensor, fmt: Precision, site: str) -> torch.Tensor:
    """``t`` as a real ``fmt`` tensor; in native training, the conversion counted forward (before
    and after are both known) and its gradient watched."""
    out = t if t.dtype == fmt.torch_dtype else t.to(fmt.torch_dtype)
    numerics = training_observer()
    if numerics is None or not t.is_floating_point():
        return out
    if out is not t and fmt is not FP32:
        numerics.observe(site, t.float(), out.float(), fmt, False)
    return _Watched.apply(out, fmt, numerics, site) if fmt is not FP32 else out


def cast(x: Any, *, fmt: Precision, amax: float | None = None, native: bool = False, site: str = "") -> Any:
    """Convert a value to ``fmt`` on an edge where its producer and consumer disagree.

    fp8 (``amax`` given): the scaled E4M3 quantize with the calibrated static scale amax/max,
    returned dequantized in fp32 in both modes (in training, the value as it is: the fp8 layer
    quantizes it with the recipe's scale). Widening to fp32 is exact: the identity in emulate
    mode, a real ``.float()`` in native mode.
    """
    if fmt.is_fp8:
        if training_observer() is not None:
            return x
        return _tree(lambda t: quantize_activation(t.float(), fmt, amax), x)
    if native:
        return _tree(lambda t: _native_to(t, fmt, site), x)
    if fmt is FP32:
        return x
    with at_site(site):
        return _tree(lambda t: quantize(t, fmt), x)


def round_output(x: Any, *, fmt: Precision, native: bool = False, site: str = "") -> Any:
    """The result of a FOLLOW op that runs in 16-bit ``fmt``: computed in fp32, stored in ``fmt``.

    Native mode computes the op on 16-bit tensors already; this only fixes a result that type
    promotion made wider (e.g. a 16-bit tensor times an fp32 constant).
    """
    if fmt.is_fp8:
        raise ValueError(f"fp8 is never a storage format for FOLLOW ops (asked for {fmt})")
    if native:
        return _tree(lambda t: _native_to(t, fmt, site), x)
    if fmt is FP32:
        return x
    with at_site(site):
        return _tree(lambda t: quantize(t, fmt), x)


# --- layers ---------------------------------------------------------------------------------------


def lowp_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                fmt: Precision, amax: Sequence[float] | None = None, native: bool = False, site: str = "",
                rounded: bool = False) -> torch.Tensor:
    """``F.linear`` in ``fmt``: inputs and weight rounded, fp32 accumulation, output rounded."""
    numerics = training_observer()
    if native and fmt.is_fp8 and numerics is not None and _scaled_mm_usable(x, weight, fmt):
        layer = numerics.fp8_recipe(site, fmt)  # type: ignore[attr-defined]
        if layer.numerics.recipe.weight_scaling == "tensor":  # per-row weight scales sit along dgrad's sum
            return _Fp8LinearTraining.apply(x, weight, bias, layer, site)
    if native and fmt.is_fp8 and numerics is None and _scaled_mm_usable(x, weight, fmt):
        a = _amax(amax, 0) if amax else float(x.detach().abs().amax())  # dynamic: the tensor's own amax
        return _Fp8Linear.apply(x, weight, bias, a, fmt)
    return _layer("linear", (x, weight, bias), {}, fmt, amax, native, site, rounded)


def lowp_conv1d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, stride: Any = 1,
                padding: Any = 0, dilation: Any = 1, groups: int = 1, *, fmt: Precision,
                amax: Sequence[float] | None = None, native: bool = False, site: str = "",
                rounded: bool = False) -> torch.Tensor:
    return _layer("conv1d", (x, weight, bias, stride, padding, dilation, groups), {}, fmt, amax, native, site, rounded)


def lowp_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, stride: Any = 1,
                padding: Any = 0, dilation: Any = 1, groups: int = 1, *, fmt: Precision,
                amax: Sequence[float] | None = None, native: bool = False, site: str = "",
                rounded: bool = False) -> torch.Tensor:
    return _layer("conv2d", (x, weight, bias, stride, padding, dilation, groups), {}, fmt, amax, native, site, rounded)


def lowp_conv3d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, stride: Any = 1,
                padding: Any = 0, dilation: Any = 1, groups: int = 1, *, fmt: Precision,
                amax: Sequence[float] | None = None, native: bool = False, site: str = "",
                rounded: bool = False) -> torch.Tensor:
    return _layer("conv3d", (x, weight, bias, stride, padding, dilation, groups), {}, fmt, amax, native, site, rounded)


def lowp_conv_transpose1d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, stride: Any = 1,
                          padding: Any = 0, output_padding: Any = 0, groups: int = 1, dilation: Any = 1, *,
                          fmt: Precision, amax: Sequence[float] | None = None, native: bool = False,
                          site: str = "", rounded: bool = False) -> torch.Tensor:
    """``F.conv_transpose1d`` in ``fmt`` (its argument order: output_padding and groups before dilation)."""
    return _layer("conv_transpose1d", (x, weight, bias, stride, padding, output_padding, groups, dilation), {},
                  fmt, amax, native, site, rounded)


def lowp_conv_transpose2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, stride: Any = 1,
                          padding: Any = 0, output_padding: Any = 0, groups: int = 1, dilation: Any = 1, *,
                          fmt: Precision, amax: Sequence[float] | None = None, native: bool = False,
                          site: str = "", rounded: bool = False) -> torch.Tensor:
    return _layer("conv_transpose2d", (x, weight, bias, stride, padding, output_padding, groups, dilation), {},
                  fmt, amax, native, site, rounded)


def lowp_conv_transpose3d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, stride: Any = 1,
                          padding: Any = 0, output_padding: Any = 0, groups: int = 1, dilation: Any = 1, *,
                          fmt: Precision, amax: Sequence[float] | None = None, native: bool = False,
                          site: str = "", rounded: bool = False) -> torch.Tensor:
    return _layer("conv_transpose3d", (x, weight, bias, stride, padding, output_padding, groups, dilation), {},
                  fmt, amax, native, site, rounded)


def lowp_matmul(a: torch.Tensor, b: torch.Tensor, *, fmt: Precision, amax: Sequence[float] | None = None,
                native: bool = False, site: str = "", rounded: bool = False) -> torch.Tensor:
    """``a @ b`` in ``fmt`` (both operands are activations: each has its own fp8 scale)."""
    return _layer("matmul", (a, b), {}, fmt, amax, native, site, rounded)


def lowp_bmm(a: torch.Tensor, b: torch.Tensor, *, fmt: Precision, amax: Sequence[float] | None = None,
             native: bool = False, site: str = "", rounded: bool = False) -> torch.Tensor:
    return _layer("bmm", (a, b), {}, fmt, amax, native, site, rounded)


def lowp_embedding(indices: torch.Tensor, weight: torch.Tensor, padding_idx: int | None = None,
                   max_norm: float | None = None, norm_type: float = 2.0, scale_grad_by_freq: bool = False,
                   sparse: bool = False, *, fmt: Precision, amax: Sequence[float] | None = None,
                   native: bool = False, site: str = "", rounded: bool = False) -> torch.Tensor:
    """``F.embedding`` in ``fmt``: the rows of the table rounded to ``fmt`` (fp8: one scale per row,
    the rows then rounded to bf16, :mod:`autoprec.torch.semantics`).

    Both modes look the fp32 rows up first and round only those (:func:`autoprec.torch.semantics.lookup_rows`:
    the same values as rounding the table, at the cost of the rows, not of the vocabulary). Native
    mode writes a real 16-bit tensor (an fp8 table, which has no native lookup in torch, its rows
    as bf16). The gradient reaches the fp32 master table straight through the rounding in both modes.
    """
    return _layer("embedding", (indices, weight, padding_idx, max_norm, norm_type, scale_grad_by_freq, sparse),
                  {}, fmt, amax, native, site, rounded)


#: layer kind -> the function a lowered layer calls
LAYER_OPS = {"linear": lowp_linear, "conv1d": lowp_conv1d, "conv2d": lowp_conv2d, "conv3d": lowp_conv3d,
             "conv_transpose1d": lowp_conv_transpose1d, "conv_transpose2d": lowp_conv_transpose2d,
             "conv_transpose3d": lowp_conv_transpose3d, "matmul": lowp_matmul, "bmm": lowp_bmm,
             "embedding": lowp_embedding}


def _amax(amax: Sequence[float] | None, i: int) -> float:
    if amax is None or i >= len(amax):
        raise ValueError(f"an fp8 layer needs the calibrated amax of activation input {i}")
    return float(amax[i])


def _layer(kind: str, args: tuple[Any, ...], kwargs: dict[str, Any], fmt: Precision,
           amax: Sequence[float] | None, native: bool, site: str = "", rounded: bool = False) -> torch.Tensor:
    """A lowered layer's call. ``rounded``: its activation inputs already hold values of ``fmt``
    (:class:`~autoprec.torch.passes.insert_casts.InsertCasts` says so of every layer it gives casts),
    so outside training the layer rounds only its weight and its result (module docstring)."""
    lf = LayerFormat(fmt, tuple(float(a) for a in amax) if amax else ())
    numerics: TrainingNumerics | None = training_observer()  # type: ignore[assignment]
    if numerics is not None and (not native or fmt.is_fp8):
        # emulated training, or an fp8 layer in native training (its recipe emulated on fp32
        # operands, its result a real bf16 tensor)
        recipe = numerics.fp8_recipe(site, fmt) if fmt.is_fp8 else None
        fargs = tuple(_tree(lambda t: t.float(), a) for a in args) if native else args
        with at_site(site):
            y = emulate_layer(kind, fargs, kwargs, lf, recipe=recipe)
        return y.to(fmt.compute_output.torch_dtype) if native else y
    if not native:
        return emulate_layer(kind, args, kwargs, lf, inputs_rounded=rounded)
    if fmt.is_fp8:
        # no fp8 kernel for this layer: its exact numerics, written as a real bf16 tensor
        fargs = tuple(_tree(lambda t: t.float(), a) for a in args)
        return emulate_layer(kind, fargs, kwargs, lf, inputs_rounded=rounded).to(fmt.compute_output.torch_dtype)
    dt = fmt.torch_dtype
    if kind in LOOKUP_KINDS:  # round the rows it copies, not the whole table: the same values
        return layer_function(kind)(*args, **kwargs).to(dt)
    def operand(t: torch.Tensor) -> torch.Tensor:
        """An operand in ``dt``; in training, watched: its gradient is a backward GEMM's result."""
        out = t if t.dtype == dt else t.to(dt)
        return out if numerics is None else _Watched.apply(out, fmt, numerics, site)

    nargs = tuple(_tree(operand, a) for a in args)
    nargs, kw, bias = split_bias(kind, nargs, kwargs)
    y = layer_function(kind)(*nargs, **kw)  # the product, rounded once to the 16-bit format
    y = y if bias is None else y + bias_view(kind, bias.to(dt))  # a 16-bit add: rounded again
    return y if numerics is None else _Watched.apply(y, fmt, numerics, site)


# --- native fp8 linear ------------------------------------------------------------------------------


def fp8_codes(x: torch.Tensor, scale: torch.Tensor, fmt: Precision) -> torch.Tensor:
    """The fp8 tensor whose values times ``scale`` are ``quantize(x, fmt, scale)``."""
    y = x.float() / scale
    if fmt.info.saturates:
        y = torch.clamp(y, -fmt.max, fmt.max)
    return y.to(fmt.torch_dtype)


@functools.lru_cache(maxsize=None)
def _scaled_mm_works(device_type: str, dtype_name: str) -> bool:
    """Whether ``torch._scaled_mm`` with row-wise scales and fp32 output runs on this device."""
    if not hasattr(torch, "_scaled_mm"):
        return False
    try:
        dt = getattr(torch, dtype_name)
        a = torch.ones(16, 16, device=device_type).to(dt)
        ones_a = torch.ones(16, 1, device=device_type)
        ones_b = torch.ones(1, 16, device=device_type)
        torch._scaled_mm(a, a.t(), scale_a=ones_a, scale_b=ones_b, out_dtype=torch.float32)
        return True
    except (RuntimeError, NotImplementedError, TypeError):
        return False


def _scaled_mm_usable(x: torch.Tensor, w: torch.Tensor, fmt: Precision) -> bool:
    if w.dim() != 2 or not _scaled_mm_works(x.device.type, fmt.info.torch_dtype_name):
        return False
    if x.device.type == "cuda":  # cuBLASLt fp8 GEMMs want dimensions divisible by 16
        return w.shape[0] % 16 == 0 and w.shape[1] % 16 == 0
    return True


class _Fp8Linear(torch.autograd.Function):
    """fp8 x fp8 -> fp32 GEMM (``torch._scaled_mm``), fp32 bias, bf16 result.

    Activation: per-tensor static scale amax/max; weight: per-output-channel scale, both as in
    :mod:`autoprec.torch.semantics`. Backward is the straight-through gradient of the emulated layer:
    the gradients of a linear layer evaluated at the dequantized operands.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, amax: float,  # type: ignore[override]
                fmt: Precision) -> torch.Tensor:
        n, k = w.shape
        sx = fp8_scale(amax, fmt).to(x.device)
        sw = fp8_scale(channel_amax(w), fmt).to(w.device)  # [N, 1]
        x2 = x.reshape(-1, k)
        xq = fp8_codes(x2, sx, fmt)
        wq = fp8_codes(w, sw, fmt)
        y = torch._scaled_mm(xq, wq.t(), scale_a=sx.expand(x2.shape[0], 1).contiguous(),
                             scale_b=sw.reshape(1, n).contiguous(), out_dtype=torch.float32)
        if b is not None:
            y = y + b.float()
        ctx.save_for_backward(xq, wq, sx, sw)
        ctx.x_shape, ctx.x_dtype, ctx.w_dtype = x.shape, x.dtype, w.dtype
        ctx.b_dtype = b.dtype if b is not None else None
        return y.to(fmt.compute_output.torch_dtype).reshape(*x.shape[:-1], n)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        xq, wq, sx, sw = ctx.saved_tensors
        g = grad.float().reshape(-1, wq.shape[0])
        xd = xq.float() * sx
        wd = wq.float() * sw
        gx = (g @ wd).reshape(ctx.x_shape).to(ctx.x_dtype) if ctx.needs_input_grad[0] else None
        gw = (g.t() @ xd).to(ctx.w_dtype) if ctx.needs_input_grad[1] else None
        gb = g.sum(0).to(ctx.b_dtype) if ctx.b_dtype is not None and ctx.needs_input_grad[2] else None
        return gx, gw, gb, None, None


class _Fp8LinearTraining(torch.autograd.Function):
    """The HYBRID recipe's linear layer on fp8 kernels (native training, per-tensor weight scales):
    E4M3 activation and weight codes with the recipe's scales, a ``torch._scaled_mm`` forward with
    fp32 accumulation, bias in fp32, a bf16 result; backward, the output gradient quantized to E5M2
    (saturating, with its own current or delayed scale) and both gradient GEMMs as fp8
    ``torch._scaled_mm`` products written in bf16. The numerics of the emulated recipe
    (:class:`autoprec.torch.numerics.Fp8Layer`), except that the kernels scale after accumulating,
    so results agree within a bf16 rounding."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, layer: Any,  # type: ignore[override]
                site: str) -> torch.Tensor:
        numerics, fmt = layer.numerics, layer.fmt
        n, k = w.shape
        x2 = x.reshape(-1, k).float()
        sx = layer.input_state(0).scale_for(x2, numerics.recording).to(x.device).float().reshape(1, 1)
        sw = layer.weight_scale(w.float()).to(w.device).float().reshape(1, 1)
        xq, wq = fp8_codes(x2, sx, fmt), fp8_codes(w.float(), sw, fmt)
        numerics.observe(site, x2 / sx, xq.float(), fmt, False)
        y = torch._scaled_mm(xq, wq.t(), scale_a=sx, scale_b=sw, out_dtype=torch.float32)
        if b is not None:
            y = y + b.float()
        ctx.save_for_backward(xq, wq, sx, sw)
        ctx.layer, ctx.site = layer, site
        ctx.dtypes = (x.shape, x.dtype, w.dtype, None if b is None else b.dtype)
        return y.to(torch.bfloat16).reshape(*x.shape[:-1], n)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        from autoprec.torch.numerics import GRAD_FP8

        xq, wq, sx, sw = ctx.saved_tensors
        layer, site = ctx.layer, ctx.site
        x_shape, x_dtype, w_dtype, b_dtype = ctx.dtypes
        g = grad.reshape(-1, wq.shape[0]).float()
        sg = layer.grad.scale_for(g, layer.numerics.recording).to(g.device).float().reshape(1, 1)
        scaled = g / sg
        gq = scaled.clamp(-GRAD_FP8.max, GRAD_FP8.max).to(GRAD_FP8.torch_dtype)  # a saturating cast
        layer.numerics.observe(site, scaled, gq.float(), GRAD_FP8, True, saturating=True)
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:  # dgrad [M, N] x [N, K]
            gx = torch._scaled_mm(gq, wq.t().contiguous().t(), scale_a=sg, scale_b=sw, out_dtype=torch.float32)
            gx = gx.to(torch.bfloat16).reshape(x_shape).to(x_dtype)
        if ctx.needs_input_grad[1]:  # wgrad [N, M] x [M, K]
            gw = torch._scaled_mm(gq.t().contiguous(), xq.t().contiguous().t(), scale_a=sg, scale_b=sx,
                                  out_dtype=torch.float32).to(torch.bfloat16).to(w_dtype)
        if b_dtype is not None and ctx.needs_input_grad[2]:
            gb = g.sum(0).to(b_dtype)
        return gx, gw, gb, None, None
