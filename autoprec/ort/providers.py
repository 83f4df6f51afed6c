"""Which ONNX ops an ONNX Runtime execution provider can run in fp16, bf16 and fp8.

A plan is only useful if the deployment can execute it *faithfully*: a layer planned in bf16 must
find a bf16 kernel on the target execution provider (EP), or ONNX Runtime either refuses the model
(NOT_IMPLEMENTED) or, on the CPU EP, quietly computes in fp32 between inserted casts and throws the
16-bit rounding away (FACTS.md). :func:`exclusions` turns that into the ``excluded`` argument of
:meth:`autoprec.search.problem.SearchProblem.build`, with a reason a person can read.

Sources of the built-in table (every entry records whether it is *documented* or *assumed*):

- ``CPUExecutionProvider`` -- documented: generated on 2026-11-22 from
  ``onnxruntime.capi._pybind_state.get_all_opkernel_def()`` of onnxruntime 1.32.0 (the CPU wheel,
  in a scratch environment), taking the ``ai.onnx`` kernels whose opset range covers :data:`OPSET`.
  That registry is what ONNX Runtime's ``docs/OperatorKernels.md`` is generated from. The live
  probe below reproduces it exactly under 1.32.0, and under onnxruntime-gpu 1.31.1 differs only in
  bf16 Pad (added in 1.32) -- tests/onnx_graph/test_ep_support.py checks this.
- ``CUDAExecutionProvider`` -- documented: ONNX Runtime's ``docs/OperatorKernels.md`` (CUDA
  section) as stored at microsoft/onnxruntime commit 8f063305, read 2026-11-22. That file is from
  the ONNX Runtime 1.16/1.17 era (opset-19 fp8 Cast/QuantizeLinear/DequantizeLinear are listed,
  opset-20 Gelu is not); newer releases add kernels, rarely remove them, so a "no" here may be
  stale in the optimistic direction only. Entries that file does not cover (Gelu) are assumed.
- ``TensorrtExecutionProvider`` -- fp16 documented: onnx-tensorrt ``docs/operators.md`` for
  TensorRT 8.5 (onnx/onnx-tensorrt commit 6d0ab7be, read 2026-11-22). bf16 and fp8 are assumed:
  that list predates them; TensorRT's data types include BF16 and FP8 since 9.x, and NVIDIA's
  TensorRT-RTX guide ("Working with Quantized Types") limits FP8 to GEMMs fed by Q/DQ pairs on
  compute capability >= 8.9 -- taken as true of TensorRT too. TensorRT runs 16-bit kernels only when
  the engine allows it (``trt_fp16_enable`` / ``trt_bf16_enable`` or a strongly typed network);
  ops TensorRT rejects fall back to the CUDA EP, which this table does not model.

fp8 is never a compute type of an ONNX MatMul, Gemm, Conv, ConvTranspose or Gather (such a graph is invalid). An
fp8 layer is emitted as QuantizeLinear -> DequantizeLinear on its inputs followed by the ordinary op,
so it is *legal* on an EP when fp8 QuantizeLinear and DequantizeLinear kernels exist there, the
op runs in the dequantized format (fp32 is always available) and a bf16 Cast writes its result. An
fp8 embedding reads no activation: its table is DequantizeLinear'd (one scale per row), an fp32
Gather looks the rows up and a Cast rounds them to bf16 (:data:`FP8_FORMS`). What that buys differs:

- CPU: fp8 storage, product in fp32 -- faithful rounding, no speed-up (emulation).
- CUDA: the same; a real fp8 GEMM would need the contrib op ``com.microsoft.GemmFloat8`` (sm89+),
  which autoprec does not emit. Note that CUDA's DequantizeLinear outputs fp32 or fp16, not bf16.
- TensorRT: fuses the Q/DQ pair into an fp8 GEMM on sm89+ (assumed; Conv coverage is narrower).

ConvTranspose, read 2026-12-03 from microsoft/onnxruntime (onnxruntime/core/providers/cuda/nn/
conv_transpose.cc and cuda/tensor/quantize_linear.cc): the CUDA kernel is registered for float,
double and MLFloat16 only, so a bf16 ConvTranspose computes in fp32 between casts there (no bf16
entry below; ONNX's ConvTranspose admits no bf16 before opset 22 anyway). An fp8 ConvTranspose with
several groups reads its weight through a *blocked* DequantizeLinear (one scale per group and output
channel, :mod:`autoprec.onnx.passes.lower_weights`), which the CPU kernel runs (probed: exact) but
whose CUDA kernel implements blocks for 4-bit types only. autoprec's own sessions fold a weight's
DequantizeLinear on the CPU when they start (:mod:`autoprec.ort.runtime` turns the QDQ transformers
off, so constant folding takes DequantizeLinear too), so the CUDA kernel never runs it there; a
session of the deployment file opened with ONNX Runtime's defaults would hand it to that kernel.

The live refresh (on by default, once per process): ONNX Runtime's kernel registry is read in a
child process, since ``get_all_opkernel_def()`` crashes the interpreter (SIGSEGV, measured with
onnxruntime-gpu 1.31.1 here) when the CUDA provider library fails to load. When the registry cannot
be read, the CPU EP is probed instead: one single-node session per (op, type) with graph
optimisations off; an op counts as native when the session builds without ONNX Runtime inserting a
Cast. When the registry lists CUDA (its library loaded), CUDA answers come from it too; TensorRT is
never probed (building engines takes seconds per op).

This module imports no torch; onnx and onnxruntime only inside the live refresh.
"""

from __future__ import annotations

import functools
import json
import subprocess
import sys
from typing import Iterable, Mapping, NamedTuple

from autoprec.core.errors import UsageError
from autoprec.core.formats import DEFAULT_CANDIDATES, Precision, parse_precisions
from autoprec.core.opgraph import OpGraph

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
TENSORRT = "TensorrtExecutionProvider"
PROVIDERS: tuple[str, ...] = (CPU, CUDA, TENSORRT)

#: The opset whose kernels are looked up (autoprec upgrades ONNX inputs to it).
OPSET = 21

DOCUMENTED = "documented"
ASSUMED = "assumed"

F16, BF16, E4M3, E5M2 = "float16", "bfloat16", "float8e4m3fn", "float8e5m2"
_D, _A = DOCUMENTED, ASSUMED

_ALIASES = {
    "cpu": CPU, "cpuexecutionprovider": CPU,
    "cuda": CUDA, "cudaexecutionprovider": CUDA, "gpu": CUDA,
    "tensorrt": TENSORRT, "trt": TENSORRT, "tensorrtexecutionprovider": TENSORRT,
}

#: ONNX element type name of each non-fp32 format (as ONNX Runtime's registry spells it).
ONNX_TYPE = {Precision.FP16: F16, Precision.BF16: BF16, Precision.FP8_E4M3: E4M3, Precision.FP8_E5M2: E5M2}

#: ONNX ops that compute a layer of each layer kind (autoprec.core.kinds.LAYER_KINDS).
LAYER_OPS: dict[str, tuple[str, ...]] = {
    "linear": ("Gemm", "MatMul"),  # the exporter writes Gemm for 2-D inputs, MatMul (+Add) otherwise
    "matmul": ("MatMul",), "bmm": ("MatMul",),
    "conv1d": ("Conv",), "conv2d": ("Conv",), "conv3d": ("Conv",),
    "conv_transpose1d": ("ConvTranspose",), "conv_transpose2d": ("ConvTranspose",),
    "conv_transpose3d": ("ConvTranspose",),
    "embedding": ("Gather",),  # the lookup reads the table initializer (fp8: through DequantizeLinear)
}

#: ONNX ops that compute a FOLLOW op of each kind that does arithmetic (views and data movement are
#: exact in any format and left out), every form an exporter may write (a GELU: opset-20 Gelu, or
#: the erf form).
FOLLOW_OPS: dict[str, tuple[str, ...]] = {
    "relu": ("Relu",), "gelu": ("Gelu", "Erf"), "silu": ("Sigmoid", "Mul"), "sigmoid": ("Sigmoid",),
    "tanh": ("Tanh",), "leaky_relu": ("LeakyRelu",), "hardtanh": ("Clip",), "elu": ("Elu",), "erf": ("Erf",),
    "neg": ("Neg",), "abs": ("Abs",), "add": ("Add",), "iadd": ("Add",), "sub": ("Sub",), "mul": ("Mul",),
    "imul": ("Mul",), "div": ("Div",), "truediv": ("Div",), "max_pool1d": ("MaxPool",), "max_pool2d": ("MaxPool",),
    "avg_pool1d": ("AveragePool",), "avg_pool2d": ("AveragePool",),
    "adaptive_avg_pool1d": ("GlobalAveragePool", "ReduceMean"),
    "adaptive_avg_pool2d": ("GlobalAveragePool", "ReduceMean"),
    "adaptive_max_pool2d": ("GlobalMaxPool",), "masked_fill": ("Where",), "where": ("Where",), "pad": ("Pad",),
    "interpolate": ("Resize",),
}


def follow_format(kind: str, precision: Precision | str, provider: str, live: bool = True) -> Precision:
    """The format a FOLLOW op of ``kind`` planned in ``precision`` computes in on ``provider``, as
    a deployment graph written for it runs it: the format itself where the provider has a kernel
    for every op the kind may be exported as, else fp32 between casts (views, data movement and
    kinds without arithmetic keep the format)."""
    p = _key(precision)
    ops = FOLLOW_OPS.get(kind)
    if p is Precision.FP32 or not ops or all(kernel(op, p, provider, live).ok for op in ops):
        return p
    return Precision.FP32


class Fp8Form(NamedTuple):
    """How autoprec emits a layer op in fp8: the kernels it needs, as (op type, format) with None
    for the layer's fp8 format, and how a reason names them."""

    kernels: tuple[tuple[str, Precision | None], ...]
    via: str


#: The fp8 form of each layer op, ending in the Cast of its result to bf16 (the output format of
#: every fp8 layer). A product reads Q/DQ'd operands and runs in fp32; a lookup dequantizes its
#: table (one scale per row) and gathers in fp32.
FP8_FORMS: dict[str, Fp8Form] = {
    **{op: Fp8Form((("QuantizeLinear", None), ("DequantizeLinear", None), (op, Precision.FP32),
                    ("Cast", Precision.BF16)), "QuantizeLinear/DequantizeLinear")
       for op in ("MatMul", "Gemm", "Conv", "ConvTranspose")},
    "Gather": Fp8Form((("DequantizeLinear", None), ("Gather", Precision.FP32), ("Cast", Precision.BF16)),
                      "DequantizeLinear of the table, fp32 Gather, bf16 Cast"),
}

#: Providers that fuse an fp8 layer's QuantizeLinear/DequantizeLinear pairs into an fp8 kernel
#: (assumed for TensorRT on sm89+, see the module docstring). Elsewhere the layer op runs in fp32 on
#: dequantized operands, and ONNX Runtime folds the DequantizeLinear of a constant weight into an
#: fp32 initializer when the session starts.
FUSES_FP8 = frozenset({TENSORRT})


def compute_format(precision: Precision | str, provider: str) -> Precision:
    """The format a layer planned in ``precision`` computes in on ``provider``, as autoprec emits
    it: the format itself, except fp8 where the provider does not fuse Q/DQ (then fp32)."""
    p = _key(precision)
    if p.is_fp8 and parse_provider(provider) not in FUSES_FP8:
        return Precision.FP32
    return p


_SOURCES = {
    CPU: "ONNX Runtime 1.32.0 CPU kernel registry",
    CUDA: "ONNX Runtime OperatorKernels.md, CUDA section",
    TENSORRT: "onnx-tensorrt operators.md (TensorRT 8.5)",
}

_NONE: dict[str, str] = {}

# --- the built-in table: op -> {element type: documented|assumed}; a type absent has no kernel -----
_CPU_TABLE: dict[str, dict[str, str]] = {
    **{op: _NONE for op in (
        "MatMul", "Gemm", "Conv", "ConvTranspose", "Add", "Sub", "Mul", "Div", "Relu", "LeakyRelu",
        "Sigmoid", "Tanh", "Erf", "Gelu", "Exp", "Log", "Sqrt", "Pow", "Neg", "Abs", "Reciprocal",
        "Softmax", "LogSoftmax", "BatchNormalization", "InstanceNormalization", "MaxPool",
        "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "Where", "ReduceMean", "ReduceSum",
        "ReduceMax", "Dropout", "Resize")},
    "LayerNormalization": {F16: _D, BF16: _D},
    "Cast": {F16: _D, BF16: _D, E4M3: _D, E5M2: _D},
    # Q/DQ: the quantized (fp8) type only; the float side is fp32 in what autoprec emits
    "QuantizeLinear": {E4M3: _D, E5M2: _D},
    "DequantizeLinear": {E4M3: _D, E5M2: _D},
    **{op: {F16: _D, BF16: _D, E4M3: _D, E5M2: _D} for op in ("Transpose", "Reshape", "Identity")},
    **{op: {F16: _D, BF16: _D} for op in ("Concat", "Flatten", "Squeeze", "Unsqueeze", "Slice", "Split",
                                          "Gather")},
    **{op: {F16: _D} for op in ("Expand", "Clip", "Max", "Min")},
    "Pad": {BF16: _D},  # new in 1.32: onnxruntime 1.31 has no bf16 Pad
}

_HALF_BF = {F16: _D, BF16: _D}
_HALF = {F16: _D}
_CUDA_TABLE: dict[str, dict[str, str]] = {
    **{op: _HALF_BF for op in (
        "MatMul", "Gemm", "Add", "Sub", "Mul", "Div", "Relu", "Sigmoid", "Tanh", "Softmax",
        "LayerNormalization", "Transpose", "Concat", "Flatten", "Squeeze", "Unsqueeze", "Slice",
        "Split", "Gather", "Expand", "Max", "Min", "ReduceSum", "Dropout")},
    **{op: _HALF for op in (
        "Conv", "ConvTranspose", "LeakyRelu", "Erf", "Exp", "Log", "Sqrt", "Pow", "Neg", "Abs",
        "Reciprocal", "LogSoftmax", "BatchNormalization", "InstanceNormalization", "MaxPool",
        "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "Where", "Pad", "Clip", "ReduceMean",
        "ReduceMax", "Resize")},
    "Gelu": {F16: _A},  # opset-20 Gelu is newer than the OperatorKernels.md snapshot
    "Cast": {F16: _D, BF16: _D, E4M3: _D, E5M2: _D},
    "QuantizeLinear": {E4M3: _D, E5M2: _D},
    "DequantizeLinear": {E4M3: _D, E5M2: _D},
    "Reshape": {F16: _D, BF16: _D, E4M3: _D, E5M2: _D},
    "Identity": {F16: _D, BF16: _D, E4M3: _D, E5M2: _D},
}

_TRT_HALF = {F16: _D, BF16: _A}
_TRT_TABLE: dict[str, dict[str, str]] = {
    **{op: _TRT_HALF for op in (
        "MatMul", "Gemm", "Conv", "ConvTranspose", "Add", "Sub", "Mul", "Div", "Relu", "LeakyRelu",
        "Sigmoid", "Tanh", "Erf", "Exp", "Log", "Sqrt", "Pow", "Neg", "Abs", "Reciprocal", "Softmax",
        "LogSoftmax", "BatchNormalization", "InstanceNormalization", "MaxPool", "AveragePool",
        "GlobalAveragePool", "GlobalMaxPool", "Transpose", "Reshape", "Concat", "Flatten", "Squeeze",
        "Unsqueeze", "Slice", "Split", "Gather", "Expand", "Identity", "Where", "Pad", "Clip", "Max",
        "Min", "ReduceMean", "ReduceSum", "ReduceMax", "Dropout", "Resize", "Cast")},
    # not in the TensorRT 8.5 list (LayerNormalization: "N"; Gelu: opset 20); newer releases parse both
    "LayerNormalization": {F16: _A, BF16: _A},
    "Gelu": {F16: _A, BF16: _A},
    # TensorRT 8.5 lists INT8 Q/DQ only; FP8 Q/DQ came with TensorRT 9/10 (explicit quantization)
    "QuantizeLinear": {E4M3: _A, E5M2: _A},
    "DequantizeLinear": {E4M3: _A, E5M2: _A},
}

_TABLES = {CPU: _CPU_TABLE, CUDA: _CUDA_TABLE, TENSORRT: _TRT_TABLE}
#: Status of "no kernel" for an op the table lists: the generated kernel lists document absence;
#: the TensorRT list predates bf16/fp8, so absence there is only assumed.
_ABSENT = {CPU: _D, CUDA: _D, TENSORRT: _A}
#: Listed ops whose source does not cover them: absence of a type there is assumed, not documented.
_ABSENT_ASSUMED = frozenset({(CUDA, "Gelu")})


class Support(NamedTuple):
    """Answer of :func:`kernel` and :func:`supported`: ``ok`` and where the answer comes from
    ("documented", "assumed", or "live (...)" for the registry or a probe of this machine)."""

    ok: bool
    source: str


def parse_provider(name: str) -> str:
    """Canonical EP name for ``name`` ("cuda", "CUDAExecutionProvider", "trt", ...)."""
    key = str(name).strip().lower().replace("_", "").replace("-", "")
    if key in _ALIASES:
        return _ALIASES[key]
    raise UsageError(f"unknown execution provider {name!r}: use one of {', '.join(PROVIDERS)} "
                     f"(or cpu, cuda, tensorrt)")


def _key(precision: Precision | str) -> Precision:
    return parse_precisions([precision])[0]


def table_ops(provider: str) -> tuple[str, ...]:
    """The op types the built-in table lists for ``provider``, sorted."""
    return tuple(sorted(_TABLES[parse_provider(provider)]))


def builtin_types(op_type: str, provider: str) -> frozenset[str] | None:
    """16/8-bit element types the built-in table lists for ``op_type`` (None: op not in the table)."""
    entry = _TABLES[parse_provider(provider)].get(op_type)
    return frozenset(entry) if entry is not None else None


def builtin_kernel(op_type: str, precision: Precision | str, provider: str) -> Support:
    """Whether the built-in table lists a native ``precision`` kernel of ``op_type`` on ``provider``."""
    prov, p = parse_provider(provider), _key(precision)
    if p is Precision.FP32:
        return Support(True, _D)
    entry = _TABLES[prov].get(op_type)
    if entry is None:
        return Support(False, f"{_A}: {op_type} is not in autoprec's table for {prov}")
    status = entry.get(ONNX_TYPE[p])
    if status is not None:
        return Support(True, status)
    return Support(False, _A if (prov, op_type) in _ABSENT_ASSUMED else _ABSENT[prov])


def kernel(op_type: str, precision: Precision | str, provider: str, live: bool = True) -> Support:
    """Whether ``provider`` has a native ``precision`` kernel of ``op_type`` (no inserted casts).

    With ``live`` the answer comes from this machine's ONNX Runtime when it can tell (see the
    module docstring), else from the built-in table.
    """
    prov, p = parse_provider(provider), _key(precision)
    if p is Precision.FP32:
        return Support(True, _D)
    if live:
        found = live_types(op_type, prov)
        if found is not None:
            types, source = found
            return Support(ONNX_TYPE[p] in types, source)
    return builtin_kernel(op_type, p, prov)


def supported(op_type: str, precision: Precision | str, provider: str, live: bool = True) -> Support:
    """Whether ``provider`` runs ``op_type`` in ``precision`` faithfully, as autoprec emits it.

    16-bit: a native kernel (on the CPU EP a missing fp16 kernel is "run" in fp32 between inserted
    casts, which loses the rounding, so it counts as unsupported). fp8 for MatMul/Gemm/Conv/ConvTranspose and for
    an embedding's Gather: every kernel of its :data:`FP8_FORMS` entry (fp8 QuantizeLinear (not for
    a Gather) and DequantizeLinear, the op itself in fp32, a bf16 Cast); fp8 for any other op: a
    native kernel (Cast, Q/DQ, Reshape, ...).
    """
    prov, p = parse_provider(provider), _key(precision)
    if p is Precision.FP32:
        return Support(True, _D)
    if p.is_fp8 and op_type in FP8_FORMS:
        missing = _fp8_form_gap(op_type, p, prov, live)
        if missing is not None:
            return Support(False, missing[2].source)
        dq = kernel("DequantizeLinear", p, prov, live)
        return Support(True, f"{dq.source}, via {FP8_FORMS[op_type].via}")
    return kernel(op_type, p, prov, live)


def _fp8_form_gap(op_type: str, p: Precision, prov: str, live: bool) -> tuple[str, Precision, Support] | None:
    """The first kernel of ``op_type``'s fp8 form that ``prov`` lacks: (op, format, answer); None: none."""
    for op, q in FP8_FORMS[op_type].kernels:
        fmt = p if q is None else q
        s = kernel(op, fmt, prov, live)
        if not s.ok:
            return op, fmt, s
    return None


def reason(op_type: str, precision: Precision | str, provider: str, live: bool = True) -> str | None:
    """Why ``provider`` cannot run ``op_type`` in ``precision`` (None when it can)."""
    prov, p = parse_provider(provider), _key(precision)
    s = supported(op_type, p, prov, live)
    if s.ok:
        return None
    if p.is_fp8 and op_type in FP8_FORMS:
        missing = _fp8_form_gap(op_type, p, prov, live)
        if missing is not None:
            op, fmt, q = missing
            return f"{prov} has no {ONNX_TYPE[fmt]} {op} kernel ({q.source}), which an {p} {op_type} needs"
    text = f"{prov} has no {p} {op_type} kernel ({s.source})"
    if prov == CPU and p is Precision.FP16:
        text += ": ONNX Runtime would compute it in fp32 between inserted casts, losing the fp16 rounding"
    return text


def exclusions(
    graph: OpGraph,
    provider: str,
    formats: Iterable[Precision | str] | None = None,
    op_types: Mapping[str, str] | None = None,
    live: bool = True,
) -> dict[str, dict[Precision, str]]:
    """Formats each layer of ``graph`` cannot run in on ``provider``, with the reason.

    The result is the ``excluded`` argument of :meth:`SearchProblem.build`; layers with nothing
    excluded are left out. ``formats`` defaults to the forward candidates (bf16, fp16, fp8).
    ``op_types`` maps layer names to their ONNX op type when it is known (ONNX inputs:
    :class:`autoprec.onnx.graph.OnnxAnalysis`); otherwise the layer's kind decides, and a layer is
    legal in a format only when every op its kind may be exported as is (``LAYER_OPS``).
    """
    prov = parse_provider(provider)
    fmts = [f for f in (parse_precisions(formats) if formats is not None else DEFAULT_CANDIDATES)
            if f is not Precision.FP32]
    out: dict[str, dict[Precision, str]] = {}
    for op in graph.layers():
        known = (op_types or {}).get(op.name)
        candidates = (known,) if known else LAYER_OPS.get(op.kind)
        for f in fmts:
            if candidates is None:
                why: str | None = f"autoprec does not know which ONNX op a {op.kind!r} layer becomes"
            else:
                why = next((r for r in (reason(t, f, prov, live) for t in candidates) if r), None)
            if why:
                out.setdefault(op.name, {})[f] = why
    return out


def drift(provider: str) -> dict[str, tuple[frozenset[str], frozenset[str]]]:
    """Ops where this machine's live answer differs from the built-in table: op -> (live, table).

    Only 16/8-bit types are compared. Empty when the tables agree or no live answer exists.
    """
    prov = parse_provider(provider)
    out: dict[str, tuple[frozenset[str], frozenset[str]]] = {}
    for op in sorted(_TABLES[prov]):
        found = live_types(op, prov)
        if found is None:
            continue
        table = builtin_types(op, prov) or frozenset()
        if found[0] != table:
            out[op] = (found[0], table)
    return out


# --- live refresh ------------------------------------------------------------------------------
_FLOAT_TYPES = (F16, BF16, E4M3, E5M2)
#: For these the table tracks only the quantized type (their float side may also be fp16).
_QUANTIZED_ONLY = frozenset({"QuantizeLinear", "DequantizeLinear"})

_REGISTRY_SCRIPT = r"""
import json, sys
from onnxruntime.capi import _pybind_state as C
rows = []
for k in C.get_all_opkernel_def():
    lo, hi = k.version_range
    rows.append([k.op_name, k.domain, k.provider, int(lo), int(hi),
                 {n: list(ts) for n, ts in k.type_constraints.items()}])
json.dump(rows, sys.stdout)
"""


def _ort_version() -> str:
    try:
        import onnxruntime

        return str(onnxruntime.__version__)
    except Exception:  # pragma: no cover - onnxruntime is a dependency
        return "unknown"


@functools.lru_cache(maxsize=1)
def registry() -> tuple[dict[str, dict[str, frozenset[str]]], str]:
    """ONNX Runtime's kernel registry ({provider: {op: 16/8-bit types}}) and a note on how it was read.

    Read in a child process (crash-safe); ``({}, why)`` when that fails.
    """
    try:
        proc = subprocess.run([sys.executable, "-c", _REGISTRY_SCRIPT], capture_output=True,
                              text=True, timeout=120, check=False)
    except (OSError, subprocess.SubprocessError) as exc:
        return {}, f"kernel registry unreadable: {type(exc).__name__}"
    if proc.returncode != 0:
        return {}, f"get_all_opkernel_def() failed in a child process (exit {proc.returncode})"
    try:
        rows = json.loads(proc.stdout)
    except ValueError:
        return {}, "get_all_opkernel_def() printed no JSON"
    return parse_registry(rows), f"onnxruntime {_ort_version()} kernel registry"


def parse_registry(rows: Iterable[list]) -> dict[str, dict[str, frozenset[str]]]:
    """Fold registry rows [op, domain, provider, since, until, {constraint: [types]}] into
    {provider: {op: the 16/8-bit element types of its ai.onnx kernels that cover OPSET}}."""
    acc: dict[str, dict[str, set[str]]] = {}
    for op, domain, provider, lo, hi, constraints in rows:
        if domain not in ("", "ai.onnx") or not lo <= OPSET <= hi:
            continue
        types = acc.setdefault(provider, {}).setdefault(op, set())
        wanted = (E4M3, E5M2) if op in _QUANTIZED_ONLY else _FLOAT_TYPES
        for listed in constraints.values():
            for t in listed:
                name = t[len("tensor("):-1] if t.startswith("tensor(") else ""
                if name in wanted:
                    types.add(name)
    return {prov: {op: frozenset(ts) for op, ts in ops.items()} for prov, ops in acc.items()}


def live_types(op_type: str, provider: str) -> tuple[frozenset[str], str] | None:
    """16/8-bit element types with a native ``op_type`` kernel on ``provider`` according to this
    machine's ONNX Runtime, and the source; None when this machine cannot tell."""
    prov = parse_provider(provider)
    reg, note = registry()
    if prov in reg:
        types = reg[prov].get(op_type)
        return (types, f"live ({note})") if types is not None else None
    if prov == CPU:
        return _probe_cpu(op_type)
    return None


@functools.lru_cache(maxsize=None)
def _probe_cpu(op_type: str) -> tuple[frozenset[str], str] | None:
    if op_type not in _PROBES:
        return None
    wanted = (E4M3, E5M2) if op_type in _QUANTIZED_ONLY else _FLOAT_TYPES
    found = frozenset(t for t in wanted if _probe(op_type, t))
    return found, f"live (CPU session probe, onnxruntime {_ort_version()})"


def _probe(op_type: str, elem: str) -> bool:
    """Build a one-node model of ``op_type`` in element type ``elem`` and ask the CPU EP for it."""
    import os
    import tempfile

    import numpy as np
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    t = {F16: TensorProto.FLOAT16, BF16: TensorProto.BFLOAT16, E4M3: TensorProto.FLOAT8E4M3FN,
         E5M2: TensorProto.FLOAT8E5M2}[elem]
    spec = _PROBES[op_type]
    inputs, inits = [], []
    names = []
    for i, (kind, shape) in enumerate(spec.inputs):
        name = f"i{i}" if kind else ""
        names.append(name)
        if not kind:  # an omitted optional input
            continue
        if kind == "T":
            inputs.append(helper.make_tensor_value_info(name, t, shape))
        elif kind == "F":
            inputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, shape))
        elif kind == "B":
            inputs.append(helper.make_tensor_value_info(name, TensorProto.BOOL, shape))
        elif kind == "Z":  # an fp8/16-bit zero point: a scalar initializer of type T
            inits.append(helper.make_tensor(name, t, [], [0.0]))
        elif kind == "S":  # a float scale initializer
            inits.append(numpy_helper.from_array(np.array(0.5, np.float32), name))
        elif kind == "FV":  # a float32 initializer with the given values
            inits.append(numpy_helper.from_array(np.array(shape, np.float32), name))
        else:  # "I": an int64 initializer with the given values
            inits.append(numpy_helper.from_array(np.array(shape, np.int64), name))
    out_type = TensorProto.FLOAT if spec.out == "F" else t
    attrs = dict(spec.attrs)
    if op_type == "Cast":
        attrs["to"] = t
    outputs = [helper.make_tensor_value_info(f"o{j}", out_type, None) for j in range(spec.n_out)]
    node = helper.make_node(op_type, names, [o.name for o in outputs], **attrs)
    graph = helper.make_graph([node], "probe", inputs, outputs, initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 10
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 4
    with tempfile.TemporaryDirectory() as tmp:
        so.optimized_model_filepath = os.path.join(tmp, "probe.onnx")
        try:
            ort.InferenceSession(model.SerializeToString(), so, providers=[CPU])
        except Exception:  # NOT_IMPLEMENTED, INVALID_GRAPH, type errors: no kernel
            return False
        optimised = onnx.load(so.optimized_model_filepath)
    casts = sum(n.op_type == "Cast" for n in optimised.graph.node)
    return casts == (1 if op_type == "Cast" else 0)


class _Probe(NamedTuple):
    inputs: tuple[tuple[str, object], ...]  # (kind, shape or values); kinds: T F B Z S I FV ""
    attrs: tuple[tuple[str, object], ...] = ()
    out: str = "T"  # "T": output has the probed type; "F": float32
    n_out: int = 1


_X = ("T", [2, 2, 4, 4])
_PROBES: dict[str, _Probe] = {
    **{op: _Probe((_X,)) for op in (
        "Relu", "LeakyRelu", "Sigmoid", "Tanh", "Erf", "Gelu", "Exp", "Log", "Sqrt", "Neg", "Abs",
        "Reciprocal", "Softmax", "LogSoftmax", "Identity", "Transpose", "Flatten", "Dropout",
        "GlobalAveragePool", "GlobalMaxPool", "ReduceMean", "ReduceSum", "ReduceMax")},
    **{op: _Probe((_X, _X)) for op in ("Add", "Sub", "Mul", "Div", "Pow", "MatMul", "Max", "Min")},
    "Clip": _Probe((_X, ("Z", None), ("Z", None))),
    "MaxPool": _Probe((_X,), (("kernel_shape", [2, 2]),)),
    "AveragePool": _Probe((_X,), (("kernel_shape", [2, 2]),)),
    "Concat": _Probe((_X, _X), (("axis", 0),)),
    "Gemm": _Probe((("T", [2, 4]), ("T", [4, 3]))),
    "Conv": _Probe((_X, ("T", [2, 2, 3, 3]))),
    "ConvTranspose": _Probe((_X, ("T", [2, 2, 3, 3]))),
    "LayerNormalization": _Probe((_X, ("T", [4]), ("T", [4]))),
    "InstanceNormalization": _Probe((_X, ("T", [2]), ("T", [2]))),
    "BatchNormalization": _Probe((_X,) + (("T", [2]),) * 4),
    "Where": _Probe((("B", [2, 2, 4, 4]), _X, _X)),
    "Reshape": _Probe((_X, ("I", [4, 16]))),
    "Squeeze": _Probe((("T", [1, 4]), ("I", [0]))),
    "Unsqueeze": _Probe((_X, ("I", [0]))),
    "Slice": _Probe((_X, ("I", [0]), ("I", [1]))),
    "Split": _Probe((_X,), (("axis", 0), ("num_outputs", 2)), n_out=2),
    "Gather": _Probe((_X, ("I", [0]))),
    "Expand": _Probe((_X, ("I", [2, 2, 4, 4]))),
    "Pad": _Probe((_X, ("I", [0, 0, 1, 1, 0, 0, 1, 1]))),
    "Resize": _Probe((_X, ("", None), ("FV", [1.0, 1.0, 2.0, 2.0])), (("mode", "nearest"),)),
    "Cast": _Probe((("F", [2, 4]),)),
    "QuantizeLinear": _Probe((("F", [2, 4]), ("S", None), ("Z", None))),
    "DequantizeLinear": _Probe((("T", [2, 4]), ("S", None), ("Z", None)), out="F"),
}
