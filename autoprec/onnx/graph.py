"""ONNX models as input: preprocess an .onnx file and build its :class:`OpGraph`.

For users who only have an ONNX file written by other software. :func:`load_onnx` returns the
preprocessed ``ModelProto`` (what later ONNX passes rewrite) and the op graph (what profiling, the
cost model and the search read); :func:`analyse_onnx` returns the same plus per-node ONNX op types,
the reasons some nodes stay fp32 and a log of what preprocessing did.

Preprocessing, in order:

0. inline the model's local functions (``onnx.inliner``): torch's TorchScript exporter writes one
   per module with ``export_modules_as_functions=True``, and a layer inside a function body would
   be out of reach of the plan (a call is one node of an unknown op). The inlined nodes are named
   after the function bodies' nodes, numbered per call site;
1. upgrade the default-domain opset to ``target_opset`` (``onnx.version_converter``; never
   downgrades) and raise the IR version to the one that opset needs;
2. fold constants that make weights: ``Constant`` nodes become initializers, then nodes whose inputs
   are all initializers and whose op only moves or converts data (Identity, Cast, Transpose,
   Reshape, Squeeze, Unsqueeze, Flatten) are evaluated -- e.g. a weight stored transposed and fed
   through Transpose becomes one initializer the MatMul reads directly;
3. fold each inference ``BatchNormalization`` that alone reads a ``Conv`` into it, in fp32
   (:mod:`autoprec.core.bn_fold`, the fold a torch model's capture and export make);
4. give every node a unique name (``node.name``, else ``"<op_type>_<index>"``) in the ModelProto,
   so plans and passes can address nodes, then fuse each erf GELU and each layer norm written as
   separate nodes into one ``Gelu`` (opset >= 20: :func:`fuse_erf_gelus`) or ``LayerNormalization``
   (opset >= 17: :func:`fuse_layer_norms`), as ONNX Runtime would;
5. shape inference (strict, with data propagation; non-strict if strict fails), kept in
   ``value_info`` with the model's own symbolic dims.

The op graph has one :class:`OpNode` per top-level ONNX node plus one ``placeholder`` per graph
input, with the kinds, policies and FLOP counts of the registry the torch capture uses too
(:mod:`autoprec.core.kinds`: MatMul or Gemm reading an initializer is ``linear``, of two
activations ``matmul``, Conv ``conv1d``/``conv2d``/``conv3d`` by rank, ...). The
decomposed forms older exporters write are recognised: a ReduceMean/Sub/Pow/.../Div layer norm is
fused into one ``LayerNormalization`` where that says the same (else every node of it is a
``layer_norm``); either way it is NEVER, so its statistics stay fp32 as torch's single op does. An
erf-form GELU is fused into one ``Gelu`` (below opset 20, where ONNX has no Gelu, its nodes are
``gelu`` pieces kept fp32 with a reason). Control flow
(If, Loop, Scan) is one ``if``/``loop``/``scan`` node of policy NEVER: it and everything inside its
subgraphs stay fp32 (later passes rewrite top-level nodes only); the reason is in
:attr:`OnnxAnalysis.reasons`. Shapes are concrete: symbolic input dims are resolved from example
data, from ``batch`` (axis 0) and from ``dims`` (by name); values shape inference cannot size are
measured by one ONNX Runtime run.
"""

from __future__ import annotations

import ast
import math
import os
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
import onnx
import onnx.defs
import onnx.inliner
from onnx import TensorProto, helper, numpy_helper, shape_inference, version_converter

from autoprec.onnx.bn_fold import fold_onnx_batch_norms
from autoprec.core.kinds import CONV_KINDS, LOOKUP_KINDS, NEVER_KINDS, flops, onnx_kind, policy_of
from autoprec.core.errors import CaptureError, UsageError, first_line
from autoprec.core.opgraph import OpGraph, OpNode, Policy
from autoprec.onnx.values import FLOAT_TYPES, referenced_names, subgraphs

#: The opset ONNX inputs are upgraded to (fp8 QuantizeLinear/DequantizeLinear, blocked Q/DQ).
TARGET_OPSET = 21

#: Ops folded when all their inputs are constants: they move or convert data and compute nothing.
FOLDABLE_OPS = frozenset({"Identity", "Cast", "Transpose", "Reshape", "Squeeze", "Unsqueeze", "Flatten"})

CONTROL_FLOW_OPS = frozenset({"If", "Loop", "Scan"})

_NEVER_WHY = "stays fp32 by default (numerically sensitive: norms, softmax, exp/log/pow, reductions)"


@dataclass
class OnnxAnalysis:
    """What :func:`analyse_onnx` found: the preprocessed model and its op graph, plus

    ``op_types``: node name -> ONNX op type ("domain::Op" outside the default domain), the input
    :func:`autoprec.deploy.providers.exclusions` wants; ``reasons``: node name -> why the node stays
    fp32 (control flow, unknown op, ...); ``groups``: node name -> the node that names its group,
    the nodes that compute one op together and round its result once (a decomposed layer norm; a
    MatMul and the Add of its bias); ``notes``: what preprocessing changed, for the report.
    """

    model: onnx.ModelProto
    graph: OpGraph
    op_types: dict[str, str] = field(default_factory=dict)
    reasons: dict[str, str] = field(default_factory=dict)
    groups: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def load_onnx(
    source: str | os.PathLike[str] | onnx.ModelProto,
    batch: int | None = None,
    example: Any = None,
    dims: Mapping[str, int] | None = None,
    target_opset: int = TARGET_OPSET,
    name: str = "",
) -> tuple[onnx.ModelProto, OpGraph]:
    """The preprocessed model and its op graph (see :func:`analyse_onnx` for the arguments)."""
    a = analyse_onnx(source, batch=batch, example=example, dims=dims, target_opset=target_opset, name=name)
    return a.model, a.graph


def analyse_onnx(
    source: str | os.PathLike[str] | onnx.ModelProto,
    batch: int | None = None,
    example: Any = None,
    dims: Mapping[str, int] | None = None,
    target_opset: int = TARGET_OPSET,
    name: str = "",
) -> OnnxAnalysis:
    """Preprocess an ONNX model and build its op graph.

    ``source``: a path (external data next to it is loaded) or a ModelProto (not modified).
    ``batch``: the size of a symbolic axis 0 of inputs without example data (default 1).
    ``example``: arrays for some or all graph inputs -- a mapping by input name, a sequence in
    input order, or one array; their shapes fix every symbolic dim of those inputs.
    ``dims``: sizes of other symbolic dims by name (e.g. ``{"seq": 128}``).
    ``target_opset``: the opset to upgrade older models to; newer models are left alone.
    """
    model, label = read_model(source)
    model, notes = preprocess(model, target_opset)
    feeds = _example_arrays(model, example)
    shapes_in = _input_shapes(model, feeds, batch, dims or {})
    values, more = _concrete_values(model, shapes_in, feeds)
    notes += more
    graph, op_types, reasons, groups = build_opgraph(model, values, name or label)
    first = next((s for s in shapes_in.values() if s), ())
    graph.batch = int(first[0]) if first else 0
    return OnnxAnalysis(model, graph, op_types, reasons, groups, notes)


# --- loading and preprocessing ------------------------------------------------------------------
def read_model(source: str | os.PathLike[str] | onnx.ModelProto) -> tuple[onnx.ModelProto, str]:
    """A copy of ``source`` (or the file, with its external data) and a label for it (the file's
    stem or the graph's name); a one-line error for a missing or unreadable file."""
    if isinstance(source, onnx.ModelProto):
        model = onnx.ModelProto()
        model.CopyFrom(source)
        return model, model.graph.name or "onnx_model"
    path = os.fspath(source)
    if not os.path.exists(path):
        raise UsageError(f"no ONNX file at {path}")
    try:
        model = onnx.load(path)
    except Exception as exc:
        raise CaptureError(f"cannot read {path} as ONNX: {type(exc).__name__}: {first_line(exc)}") from exc
    return model, os.path.splitext(os.path.basename(path))[0]


def default_opset(model: onnx.ModelProto) -> int:
    """The model's ai.onnx opset version (0 when it imports none)."""
    return max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)


def preprocess(model: onnx.ModelProto, target_opset: int = TARGET_OPSET) -> tuple[onnx.ModelProto, list[str]]:
    """Upgrade, fold weight constants, name nodes and infer shapes (see the module docstring).

    Returns a new model and notes saying what changed. Raises CaptureError when the opset
    conversion fails.
    """
    notes: list[str] = []
    if model.functions:
        count = len(model.functions)
        try:
            model = onnx.inliner.inline_local_functions(model)
        except Exception as exc:  # the inliner raises its C++ errors as plain exceptions
            raise CaptureError(f"cannot inline the model's {count} local function(s): {first_line(exc)} "
                               f"(export the model without functions)") from exc
        notes.append(f"inlined the model's {count} local function(s)")
    current = default_opset(model)
    if 0 < current < target_opset:
        advice = (f"re-export it at opset >= {target_opset}, or pass target_opset={current} to analyse "
                  f"it as it is")
        gone = _ops_missing_at(model.graph, target_opset)
        if gone:
            raise CaptureError(f"cannot upgrade the model from opset {current} to {target_opset}: "
                               f"{', '.join(gone)} no longer exist(s) in ONNX at opset {target_opset} "
                               f"({advice})")
        meta = {n.name: list(n.metadata_props) for n in model.graph.node if n.name and n.metadata_props}
        try:
            model = version_converter.convert_version(model, target_opset)
        except Exception as exc:
            detail = first_line(exc).split("failed: ")[-1]
            raise CaptureError(f"cannot upgrade the model from opset {current} to {target_opset}: "
                               f"{detail} ({advice})") from exc
        for n in model.graph.node:  # the converter drops node metadata (the torch scopes)
            if not n.metadata_props and n.name in meta:
                n.metadata_props.extend(meta[n.name])
        notes.append(f"upgraded opset {current} -> {target_opset}")
    needed = helper.find_min_ir_version_for(list(model.opset_import), ignore_unknown=True)
    if model.ir_version < needed:
        notes.append(f"raised IR version {model.ir_version} -> {needed}")
        model.ir_version = needed
    folded = fold_constants(model)
    if folded:
        notes.append(f"folded {folded} constant node(s) into initializers")
    norms = fold_onnx_batch_norms(model)
    if norms:
        notes.append(f"folded {len(norms)} batch norm(s) into the convolution before them, in fp32")
    renamed = name_nodes(model)
    if renamed:
        notes.append(f"named {renamed} unnamed or duplicate node(s)")
    gelus = fuse_erf_gelus(model)
    if gelus:
        notes.append(f"fused {gelus} erf GELU(s) written as separate nodes into one Gelu each (as ONNX Runtime "
                     f"fuses them), so the plan can run them in 16 bits")
    norms = fuse_layer_norms(model)
    if norms:
        notes.append(f"fused {norms} layer norm(s) written as separate nodes into one LayerNormalization each "
                     f"(one fp32 kernel, as ONNX Runtime fuses them)")
    model, how = _infer(model)
    if how:
        notes.append(how)
    return model, notes


def _ops_missing_at(g: onnx.GraphProto, opset: int) -> list[str]:
    """Default-domain op types of ``g`` (and its subgraphs) that ONNX has no schema for at ``opset``."""
    missing: list[str] = []
    for node in g.node:
        if node.domain in ("", "ai.onnx") and node.op_type not in missing:
            try:
                onnx.defs.get_schema(node.op_type, opset, "")
            except onnx.defs.SchemaError:
                missing.append(node.op_type)
        for sub in subgraphs(node):
            missing.extend(m for m in _ops_missing_at(sub, opset) if m not in missing)
    return missing


def _infer(model: onnx.ModelProto) -> tuple[onnx.ModelProto, str]:
    try:
        return shape_inference.infer_shapes(model, check_type=True, strict_mode=True, data_prop=True), ""
    except Exception as exc:
        inferred = shape_inference.infer_shapes(model, check_type=False, strict_mode=False, data_prop=True)
        return inferred, f"strict shape inference failed ({first_line(exc)}); used non-strict inference"


def fold_constants(model: onnx.ModelProto) -> int:
    """Turn top-level Constant nodes, and data-movement nodes over constants, into initializers.

    Works in place; returns the number of nodes removed. Nodes whose output is a graph output, and
    nodes inside subgraphs, are left alone. Initializers only the folded nodes read are dropped.
    """
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    outputs = {o.name for o in g.output}
    keep: list[onnx.NodeProto] = []
    folded_inputs: set[str] = set()
    folded = 0
    for node in g.node:
        value = None
        if not any(o in outputs for o in node.output) and node.domain in ("", "ai.onnx") and len(node.output) == 1:
            if node.op_type == "Constant":
                value = _constant_value(node)
            elif node.op_type in FOLDABLE_OPS and node.input and all(i in inits for i in node.input if i):
                value = _evaluate(node, [numpy_helper.to_array(inits[i]) if i else None for i in node.input])
        if value is None:
            keep.append(node)
            continue
        tensor = numpy_helper.from_array(value, node.output[0])
        inits[tensor.name] = tensor
        g.initializer.append(tensor)
        folded_inputs.update(i for i in node.input if i)
        folded += 1
    if not folded:
        return 0
    del g.node[:]
    g.node.extend(keep)
    used = referenced_names(g)
    drop = {n for n in folded_inputs if n not in used}
    kept_inits = [t for t in g.initializer if t.name not in drop]
    del g.initializer[:]
    g.initializer.extend(kept_inits)
    kept_inputs = [i for i in g.input if i.name not in drop]
    del g.input[:]
    g.input.extend(kept_inputs)
    const_names = {t.name for t in g.initializer}
    kept_vi = [v for v in g.value_info if v.name not in const_names]
    del g.value_info[:]
    g.value_info.extend(kept_vi)
    return folded


def _constant_value(node: onnx.NodeProto) -> np.ndarray | None:
    for a in node.attribute:
        if a.name == "value":
            return numpy_helper.to_array(a.t)
        if a.name == "value_float":
            return np.array(a.f, dtype=np.float32)
        if a.name == "value_floats":
            return np.array(list(a.floats), dtype=np.float32)
        if a.name == "value_int":
            return np.array(a.i, dtype=np.int64)
        if a.name == "value_ints":
            return np.array(list(a.ints), dtype=np.int64)
    return None  # strings, sparse tensors: leave the node


def _attr(node: onnx.NodeProto, name: str, default: Any = None) -> Any:
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


# numpy rounds to nearest even like ONNX Runtime for these; bf16/fp8 casts are left to run time
_FOLD_CAST_TO = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE}


def _evaluate(node: onnx.NodeProto, args: list[np.ndarray | None]) -> np.ndarray | None:
    """numpy value of a FOLDABLE_OPS node over constant inputs, or None to leave it unfolded."""
    x = args[0]
    if x is None:
        return None
    op = node.op_type
    try:
        if op == "Identity":
            return x
        if op == "Cast":
            to = int(_attr(node, "to"))
            if to not in _FOLD_CAST_TO or x.dtype.kind not in "fiu":
                return None
            return x.astype(helper.tensor_dtype_to_np_dtype(to))
        if op == "Transpose":
            perm = _attr(node, "perm")
            return np.ascontiguousarray(np.transpose(x, perm if perm else None))
        if op == "Reshape":
            shape = [int(s) for s in args[1]] if len(args) > 1 and args[1] is not None else None
            if shape is None:
                return None
            if not _attr(node, "allowzero", 0):
                shape = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]
            return x.reshape(shape)
        if op == "Flatten":
            axis = int(_attr(node, "axis", 1))
            axis = axis + x.ndim if axis < 0 else axis
            return x.reshape(int(np.prod(x.shape[:axis], dtype=np.int64)), -1)
        if op in ("Squeeze", "Unsqueeze"):
            axes_in = args[1] if len(args) > 1 and args[1] is not None else _attr(node, "axes")
            axes = [int(a) for a in axes_in] if axes_in is not None else None
            if op == "Squeeze":
                if axes is None:
                    return np.squeeze(x)
                return np.squeeze(x, axis=tuple(a + x.ndim if a < 0 else a for a in axes))
            if axes is None:
                return None
            rank = x.ndim + len(axes)
            out = x
            for a in sorted(a + rank if a < 0 else a for a in axes):
                out = np.expand_dims(out, a)
            return out
    except (ValueError, TypeError, IndexError):
        return None
    return None


def name_nodes(model: onnx.ModelProto) -> int:
    """Give every top-level node a unique name, distinct from the graph inputs' names.

    Unnamed nodes become ``"<op_type>_<index>"``; a name already taken gets ``"_<n>"`` appended.
    Returns how many nodes were (re)named.
    """
    g = model.graph
    taken = {i.name for i in g.input}
    renamed = 0
    for idx, node in enumerate(g.node):
        base = node.name or f"{node.op_type}_{idx}"
        new, k = base, 1
        while new in taken:
            new, k = f"{base}_{k}", k + 1
        if new != node.name:
            node.name = new
            renamed += 1
        taken.add(new)
    return renamed


# --- concrete shapes ----------------------------------------------------------------------------
def graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """Graph inputs that are real inputs (initializers listed as inputs are weights)."""
    inits = {t.name for t in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in inits]


def _example_arrays(model: onnx.ModelProto, example: Any) -> dict[str, np.ndarray]:
    if example is None:
        return {}
    names = [i.name for i in graph_inputs(model)]
    if isinstance(example, Mapping):
        unknown = sorted(set(example) - set(names))
        if unknown:
            raise UsageError(f"example data for unknown input(s) {', '.join(unknown)}: the model's "
                             f"inputs are {', '.join(names)}")
        items = dict(example)
    else:
        seq = [example] if hasattr(example, "shape") else list(example)
        if len(seq) > len(names):
            raise UsageError(f"{len(seq)} example arrays for a model with {len(names)} input(s)")
        items = dict(zip(names, seq))
    return {k: _to_numpy(v) for k, v in items.items()}


def _to_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor, without importing torch
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _input_shapes(model: onnx.ModelProto, feeds: Mapping[str, np.ndarray], batch: int | None,
                  dims: Mapping[str, int]) -> dict[str, tuple[int, ...]]:
    """Concrete shape of every graph input: from its example array, else its declared dims with
    symbolic ones resolved from ``dims`` by name and ``batch`` on axis 0."""
    out: dict[str, tuple[int, ...]] = {}
    for vi in graph_inputs(model):
        declared = vi.type.tensor_type.shape.dim if vi.type.tensor_type.HasField("shape") else None
        if vi.name in feeds:
            shape = tuple(int(s) for s in feeds[vi.name].shape)
            if declared is not None:
                if len(declared) != len(shape):
                    raise UsageError(f"example for input {vi.name!r} has rank {len(shape)}, the model "
                                     f"expects rank {len(declared)}")
                for axis, (d, s) in enumerate(zip(declared, shape)):
                    if d.HasField("dim_value") and d.dim_value != s:
                        raise UsageError(f"example for input {vi.name!r} has size {s} on axis {axis}, "
                                         f"the model fixes it to {d.dim_value}")
            out[vi.name] = shape
            continue
        if declared is None:
            raise UsageError(f"input {vi.name!r} has no declared shape: pass example data for it")
        shape_l: list[int] = []
        for axis, d in enumerate(declared):
            if d.HasField("dim_value") and d.dim_value > 0:
                if axis == 0 and batch is not None and d.dim_value != batch:
                    raise UsageError(f"input {vi.name!r} fixes its batch dimension to {d.dim_value}; "
                                     f"batch={batch} cannot apply (omit batch)")
                shape_l.append(int(d.dim_value))
            elif d.HasField("dim_param") and d.dim_param in dims:
                shape_l.append(int(dims[d.dim_param]))
            elif axis == 0:
                shape_l.append(int(batch) if batch is not None else 1)
            else:
                label = d.dim_param or "?"
                raise UsageError(f"input {vi.name!r} has a symbolic dimension {label!r} on axis {axis}: "
                                 f"pass example data for it or dims={{{label!r}: size}}")
        out[vi.name] = tuple(shape_l)
    return out


@dataclass(frozen=True)
class _Value:
    elem_type: int
    shape: tuple[int, ...] | None  # None when unknown

    @property
    def is_float(self) -> bool:
        return self.elem_type in FLOAT_TYPES

    @property
    def numel(self) -> int:
        return math.prod(self.shape) if self.shape is not None else 0


def _value_of(vi: onnx.ValueInfoProto) -> _Value | None:
    if not vi.type.HasField("tensor_type"):
        return None
    tt = vi.type.tensor_type
    shape: tuple[int, ...] | None = None
    if tt.HasField("shape"):
        dims = [d.dim_value if d.HasField("dim_value") else -1 for d in tt.shape.dim]
        shape = tuple(int(d) for d in dims) if all(d >= 0 for d in dims) else None
    return _Value(tt.elem_type, shape)


def _concrete_values(model: onnx.ModelProto, inputs: Mapping[str, tuple[int, ...]],
                     feeds: Mapping[str, np.ndarray]) -> tuple[dict[str, _Value], list[str]]:
    """Type and concrete shape of every top-level value (inputs, initializers, node outputs)."""
    notes: list[str] = []
    fixed = onnx.ModelProto()
    fixed.CopyFrom(model)
    del fixed.graph.value_info[:]
    for vi in fixed.graph.input:
        if vi.name in inputs:
            shape = vi.type.tensor_type.shape
            del shape.dim[:]
            for s in inputs[vi.name]:
                shape.dim.add().dim_value = s
    fixed, how = _infer(fixed)
    if how:
        notes.append(how.replace("shape inference", "shape inference at the example shapes"))
    values: dict[str, _Value] = {}
    for t in fixed.graph.initializer:
        values[t.name] = _Value(t.data_type, tuple(int(d) for d in t.dims))
    for vi in list(fixed.graph.input) + list(fixed.graph.value_info) + list(fixed.graph.output):
        v = _value_of(vi)
        if v is not None and (vi.name not in values or values[vi.name].shape is None):
            values[vi.name] = v
    missing = [o for n in model.graph.node for o in n.output
               if o and (o not in values or values[o].shape is None)]
    if missing:
        measured, why = _measure_shapes(model, inputs, feeds, missing)
        values.update(measured)
        notes.append(why or f"measured {len(measured)} shape(s) shape inference left open with one "
                            f"ONNX Runtime run")
    return values, notes


def _measure_shapes(model: onnx.ModelProto, inputs: Mapping[str, tuple[int, ...]],
                    feeds: Mapping[str, np.ndarray], names: Sequence[str]) -> tuple[dict[str, _Value], str]:
    """Run the model once in ONNX Runtime (CPU) with ``names`` as extra outputs: their types and
    shapes, and "" -- or nothing and why it could not run (those values then count as unsized)."""
    import onnxruntime as ort

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    have = {o.name for o in probe.graph.output}
    for n in names:
        if n not in have:
            probe.graph.output.append(onnx.ValueInfoProto(name=n))
    run_feeds = {}
    for vi in graph_inputs(model):
        dtype = helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type)
        if vi.name in feeds:
            run_feeds[vi.name] = np.asarray(feeds[vi.name], dtype=dtype)
        else:
            run_feeds[vi.name] = np.zeros(inputs[vi.name], dtype=dtype)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    try:
        sess = ort.InferenceSession(probe.SerializeToString(), so, providers=["CPUExecutionProvider"])
        got = sess.run(list(names), run_feeds)
    except Exception as exc:
        return {}, (f"{len(names)} value(s) have no known shape (e.g. {names[0]!r}) and the model does "
                    f"not run in ONNX Runtime to measure them ({first_line(exc)}): their sizes count as 0")
    out = {}
    for n, arr in zip(names, got):
        if isinstance(arr, np.ndarray):
            out[n] = _Value(helper.np_dtype_to_tensor_dtype(arr.dtype), tuple(int(s) for s in arr.shape))
    return out, ""


# --- the op graph -------------------------------------------------------------------------------
def build_opgraph(model: onnx.ModelProto, values: Mapping[str, _Value],
                  name: str = "") -> tuple[OpGraph, dict[str, str], dict[str, str], dict[str, str]]:
    """The op graph of a preprocessed model, given every value's type and concrete shape.

    Returns (graph, op_types, reasons, groups) as in :class:`OnnxAnalysis`.
    """
    g = model.graph
    inits = {t.name for t in g.initializer}
    producer: dict[str, str] = {}
    nodes: list[OpNode] = []
    edges: list[tuple[str, str]] = []
    seen_edges: set[tuple[str, str]] = set()
    op_types: dict[str, str] = {}
    reasons: dict[str, str] = {}
    for vi in graph_inputs(model):
        v = values.get(vi.name)
        nodes.append(OpNode(name=vi.name, kind="placeholder", scope="", policy=Policy.NONE,
                            output_shape=v.shape or () if v else (),
                            act_out_elems=v.numel if v is not None and v.is_float else 0))
        producer[vi.name] = vi.name
    consumers = _consumers(g)
    order = {n.name: i for i, n in enumerate(g.node)}
    fused: dict[str, str] = {}
    groups: dict[str, str] = {}
    for chain in _layer_norm_nodes(g, consumers):
        head = min(chain, key=order.__getitem__)
        for member in chain:
            fused[member] = "layer_norm"
            groups[member] = head
    # erf GELUs are left decomposed only below opset 20 (fuse_erf_gelus): each node would round
    # in 16 bits on a GPU, the plan's numerics round a GELU once, so they stay fp32
    unfused = {n.name: len(gelu.nodes) for gelu in (_erf_gelus(g) if default_opset(model) < 20 else ())
               for n in gelu.nodes}
    fused.update((name, "gelu") for name in unfused)
    ties: dict[tuple[str, str, tuple[int, ...]], list[str]] = {}
    for node in g.node:
        ins = _node_inputs(node)
        base, weight = _kind(node, inits, values)
        kind = fused.get(node.name, base)  # a piece of a decomposed op counts its own FLOPs
        outs = [values.get(o) for o in node.output if o]
        float_out = any(v is None or v.is_float for v in outs)  # unknown types may be floats
        policy = Policy.NEVER if node.name in unfused else policy_of(kind)
        if policy is Policy.ALWAYS and _unsupported_layer(node, kind, weight):
            policy = Policy.NEVER
        bias_add = _bias_add(node, weight, inits, values, consumers)
        if policy is Policy.ALWAYS and bias_add is not None:
            groups[bias_add[0]] = node.name  # the bias belongs to the layer, as in torch's linear
        # floating activations read (a value of unknown type, e.g. a custom op's output, may be one)
        act_ins = [i for i in dict.fromkeys(ins) if i not in inits and (values.get(i) is None or values[i].is_float)]
        if policy is not Policy.NONE and not float_out:
            policy = Policy.NONE  # shape arithmetic, masks, indices
        if policy is Policy.ALWAYS and not act_ins and kind not in LOOKUP_KINDS:
            policy = Policy.NEVER  # a product of constants: nothing to lower
        if node.op_type in CONTROL_FLOW_OPS and node.domain in ("", "ai.onnx") and float_out:
            policy = Policy.NEVER
        op_types[node.name] = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}::{node.op_type}"
        why = _reason(node, kind, policy, bool(act_ins))
        if node.name in unfused:
            why = (f"part of an erf GELU written as {unfused[node.name]} nodes at opset {default_opset(model)}: "
                   f"kept fp32 (ONNX's one-op Gelu needs opset 20; analyse at target_opset >= 20 to fuse it)")
        if why:
            reasons[node.name] = why
        in_vals = [values[i] for i in dict.fromkeys(ins) if values.get(i) is not None and values[i].shape is not None]
        out_v = next((v for v in outs if v is not None), None)
        op = OpNode(
            name=node.name,
            kind=kind,
            scope=_scope(node),
            policy=policy,
            input_shapes=tuple(v.shape for v in in_vals if v.shape is not None),
            output_shape=out_v.shape if out_v is not None and out_v.shape is not None else (),
            flops=_flops(base, node, values) if policy is not Policy.NONE else 0,
            weight_elems=_weight_elems(node, weight, inits, values, bias_add[1] if bias_add else None),
            act_in_elems=sum(values[i].numel for i in act_ins if i in values),
            act_out_elems=sum(v.numel for v in outs if v is not None and v.is_float),
            weight=weight,
        )
        nodes.append(op)
        for i in ins:
            p = producer.get(i)
            if p is not None and (p, node.name) not in seen_edges:
                seen_edges.add((p, node.name))
                edges.append((p, node.name))
        for o in node.output:
            if o:
                producer[o] = node.name
        if op.is_layer and weight is not None and kind not in LOOKUP_KINDS:
            src = next((i for i in node.input if i and i not in inits), None)
            if src is not None:
                ties.setdefault((src, kind, values[weight].shape or ()), []).append(node.name)
    # the graph's outputs are read in fp32 (a deployment graph casts a 16-bit result back), as the
    # torch capture's output node is
    taken = {n.name for n in nodes}
    out_name = next(c for c in ("output", *(f"output_{i}" for i in range(1, len(taken) + 2))) if c not in taken)
    outs = [o.name for o in g.output]
    nodes.append(OpNode(name=out_name, kind="output", scope="", policy=Policy.NONE,
                        act_in_elems=sum(values[o].numel for o in outs if o in values and values[o].is_float)))
    edges.extend((p, out_name) for p in dict.fromkeys(producer[o] for o in outs if o in producer))
    graph = OpGraph(nodes=nodes, edges=edges, model_name=name)
    graph.ties = [members for _, members in sorted(ties.items()) if len(members) > 1]
    return graph, op_types, reasons, {n.name: groups.get(n.name, n.name) for n in g.node}


def _unsupported_layer(node: onnx.NodeProto, kind: str, weight: str | None) -> bool:
    """A MatMul/Gemm/Conv the passes cannot lower: its weight is not a constant second operand."""
    if kind == "linear":
        return weight is None or len(node.input) < 2 or node.input[1] != weight
    if kind in CONV_KINDS:
        return weight is None
    return False


def _bias_add(node: onnx.NodeProto, weight: str | None, inits: set[str], values: Mapping[str, _Value],
              consumers: Mapping[str, list[onnx.NodeProto]]) -> tuple[str, str] | None:
    """(the Add node, the bias initializer) that adds a linear layer's bias to a MatMul's result,
    when the Add is its only reader and the bias is a float constant that varies along the last
    axis only: how exporters write ``nn.Linear`` on inputs of rank > 2 (shape [N]) and how
    skl2onnx writes every dense layer (shape [1, N])."""
    if node.op_type != "MatMul" or weight is None or not node.output:
        return None
    users = consumers.get(node.output[0], [])
    if len(users) != 1 or users[0].op_type != "Add" or users[0].domain not in ("", "ai.onnx"):
        return None
    others = [i for i in users[0].input if i != node.output[0]]
    if len(others) != 1 or others[0] not in inits:
        return None
    b = values.get(others[0])
    out = values.get(node.output[0])
    if b is None or not b.is_float or not b.shape or any(d != 1 for d in b.shape[:-1]):
        return None
    if out is not None and out.shape is not None and len(b.shape) > len(out.shape):
        return None  # it would add axes: not a bias
    return users[0].name, others[0]


def _node_inputs(node: onnx.NodeProto) -> list[str]:
    """Values a node reads: its inputs and the outer-scope values its subgraphs use."""
    ins = [i for i in node.input if i]
    for sub in subgraphs(node):
        ins.extend(n for n in _outer_names(sub) if n not in ins)
    return ins


def _consumers(g: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    """Value name -> the top-level nodes that read it (subgraphs' outer-scope reads included)."""
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in g.node:
        for i in _node_inputs(node):
            consumers.setdefault(i, []).append(node)
    return consumers


def _outer_names(g: onnx.GraphProto) -> list[str]:
    """Names a subgraph reads but does not define (captured from the enclosing scope)."""
    defined = {i.name for i in g.input} | {t.name for t in g.initializer}
    out: list[str] = []
    for node in g.node:
        for i in node.input:
            if i and i not in defined and i not in out:
                out.append(i)
        for sub in subgraphs(node):
            for i in _outer_names(sub):
                if i not in defined and i not in out:
                    out.append(i)
        defined.update(o for o in node.output if o)
    for o in g.output:
        if o.name not in defined and o.name not in out:
            out.append(o.name)
    return out


def _rank(values: Mapping[str, _Value], name: str) -> int | None:
    v = values.get(name)
    return len(v.shape) if v is not None and v.shape is not None else None


def _kind(node: onnx.NodeProto, inits: set[str], values: Mapping[str, _Value]) -> tuple[str, str | None]:
    """Normalised kind of an ONNX node (:func:`autoprec.core.kinds.onnx_kind`, with what the graph
    says about its operands) and the initializer that is its weight (layers only)."""
    op = node.op_type
    ins = list(node.input)
    default = node.domain in ("", "ai.onnx")
    if default and op in ("MatMul", "Gemm"):
        a, b = ins[0], ins[1]
        weight = b if b in inits else (a if a in inits else None)
        if weight is not None and (a not in inits or b not in inits):
            return "linear", weight
        return "matmul", None
    if default and op == "Gather":
        data = values.get(ins[0])
        if ins[0] in inits and data is not None and data.is_float and int(_attr(node, "axis", 0)) == 0:
            return "embedding", ins[0]  # a table lookup: the table is the layer's weight
    # a Conv's kernel (input 1) has its input's rank; a pool has only its input
    rank = next((r for r in (_rank(values, i) for i in ins[1::-1]) if r is not None), None)
    kind = onnx_kind(op, node.domain, rank)
    weight = ins[1] if kind in CONV_KINDS and len(ins) > 1 and ins[1] in inits else None
    return kind, weight


def _reason(node: onnx.NodeProto, kind: str, policy: Policy, reads_activations: bool) -> str | None:
    """Why a node stays fp32 (None for nodes whose format the plan decides or follows)."""
    if node.op_type in CONTROL_FLOW_OPS and node.domain in ("", "ai.onnx"):
        inside = sum(_count_nodes(s) for s in subgraphs(node))
        return (f"control flow ({node.op_type}): kept fp32 with the {inside} node(s) of its "
                f"subgraph(s); autoprec rewrites top-level nodes only")
    if policy is not Policy.NEVER:
        return None
    if (kind in ("linear", "matmul") or kind.startswith("conv")) and not reads_activations:
        return f"{node.op_type} reads only constants: nothing to lower"
    if kind == "linear" or kind in CONV_KINDS:
        return (f"{node.op_type} whose weight is not a constant second operand: kept fp32 (autoprec lowers "
                f"weights stored as initializers and read as input 1)")
    if node.domain == "ai.onnx.ml":
        return f"ONNX-ML op {node.op_type}: classical machine learning, not a network layer; kept fp32"
    if node.domain not in ("", "ai.onnx") and kind.startswith(node.domain):
        return f"custom op {node.domain}::{node.op_type}: unknown numerics, kept fp32"
    if kind in NEVER_KINDS:
        return f"{kind} {_NEVER_WHY}"
    return f"op {node.op_type} has no known mixed-precision behaviour: kept fp32 (the safe default)"


def _count_nodes(g: onnx.GraphProto) -> int:
    return sum(1 + sum(_count_nodes(s) for s in subgraphs(n)) for n in g.node)


def _scope(node: onnx.NodeProto) -> str:
    """Module path of a node: the torch exporter's name-scope metadata, else the name's prefix."""
    for p in node.metadata_props:
        if p.key == "pkg.torch.onnx.name_scopes":
            try:
                scopes = ast.literal_eval(p.value)
            except (ValueError, SyntaxError):
                break
            if isinstance(scopes, (list, tuple)) and len(scopes) >= 2:
                return str(scopes[-2])
            return ""
    name = node.name
    if "/" in name:  # TorchScript exporter: "/blocks.0/attn/q/MatMul"
        parts = [p for p in name.split("/") if p]
        return ".".join(parts[:-1])
    if "." in name:
        return name.rsplit(".", 1)[0]
    return ""


def _flops(kind: str, node: onnx.NodeProto, values: Mapping[str, _Value]) -> int:
    """FLOPs by :func:`autoprec.core.kinds.flops`, the rule the torch capture counts by."""
    outs = [values[o] for o in node.output if o and o in values and values[o].shape is not None]
    shapes = [values[i].shape or () if i and i in values else () for i in node.input]
    if node.op_type == "Gemm" and _attr(node, "transA", 0) and shapes and len(shapes[0]) == 2:
        shapes[0] = shapes[0][::-1]  # A as the product reads it: its contracted dim last
    return flops(kind, shapes, outs[0].shape if outs else None)


def _weight_elems(node: onnx.NodeProto, weight: str | None, inits: set[str], values: Mapping[str, _Value],
                  bias_add: str | None) -> int:
    """Parameter elements a layer reads: its weight and its bias -- Gemm's/Conv's C/B input, or a
    MatMul's ``bias_add`` constant (:func:`_bias_add`), counted as torch counts nn.Linear's bias."""
    if weight is None:
        return 0
    total = values[weight].numel
    if node.op_type in ("Gemm", "Conv") and len(node.input) > 2 and node.input[2] in inits:
        total += values[node.input[2]].numel
    elif bias_add is not None:
        total += values[bias_add].numel
    return total


# --- decomposed ops older exporters write -------------------------------------------------------
def _layer_norm_nodes(g: onnx.GraphProto, consumers: Mapping[str, list[onnx.NodeProto]]) -> list[list[str]]:
    """Node names of each decomposed layer norm (one list per instance, in graph order), as exporters before opset 17 write it:
    ReduceMean(x) -> Sub(x, mean) -> Pow(., 2) -> ReduceMean -> Add(eps) -> Sqrt -> Div(sub, .)
    [-> Mul(gamma) -> Add(beta)]. They are labelled "layer_norm", a NEVER kind, as torch's one op:
    its statistics must stay fp32, whichever format the layer before it runs in."""
    found: list[list[str]] = []

    def only_user(value: str, op_types: tuple[str, ...]) -> onnx.NodeProto | None:
        users = consumers.get(value, [])
        return users[0] if len(users) == 1 and users[0].op_type in op_types else None

    for mean in g.node:
        if mean.op_type != "ReduceMean" or mean.domain not in ("", "ai.onnx"):
            continue
        x = mean.input[0]
        subs = [n for n in consumers.get(mean.output[0], []) if n.op_type == "Sub" and list(n.input) == [x, mean.output[0]]]
        if len(subs) != 1:
            continue
        sub = subs[0]
        users = consumers.get(sub.output[0], [])
        sq = next((n for n in users if n.op_type == "Pow" or (n.op_type == "Mul" and list(n.input) == [sub.output[0]] * 2)), None)
        div = next((n for n in users if n.op_type == "Div" and n.input[0] == sub.output[0]), None)
        if sq is None or div is None or len(users) != 2:
            continue
        chain = [mean, sub, sq]
        var = only_user(sq.output[0], ("ReduceMean",))
        eps = only_user(var.output[0], ("Add",)) if var is not None else None
        root = only_user(eps.output[0], ("Sqrt",)) if eps is not None else None
        if root is None or div.input[1] != root.output[0]:
            continue
        chain += [var, eps, root, div]
        scale = only_user(div.output[0], ("Mul",))
        if scale is not None:
            chain.append(scale)
            shift = only_user(scale.output[0], ("Add",))
            if shift is not None:
                chain.append(shift)
        found.append([n.name for n in chain])
    return found



def _scalar(name: str, inits_proto: Mapping[str, onnx.TensorProto]) -> float | None:
    t = inits_proto.get(name)
    if t is None:
        return None
    arr = numpy_helper.to_array(t)
    return float(arr.reshape(-1)[0]) if arr.size == 1 else None


def _reduce_axes(node: onnx.NodeProto, protos: Mapping[str, onnx.TensorProto]) -> tuple[int, ...] | None:
    """A ReduceMean's axes, from its attribute (opset < 18) or its constant second input; None when
    it reduces every axis or they are not constants."""
    if len(node.input) > 1 and node.input[1]:
        t = protos.get(node.input[1])
        return tuple(int(a) for a in numpy_helper.to_array(t).ravel()) if t is not None else None
    axes = _attr(node, "axes")
    return tuple(int(a) for a in axes) if axes is not None else None


def fuse_layer_norms(model: onnx.ModelProto) -> int:
    """Replace each layer norm written as separate nodes (:func:`_layer_norm_nodes`) over the last
    axis, with a 1-D scale, by one ONNX ``LayerNormalization`` (opset 17), in place; returns how many.

    Why: a decomposed layer norm is nine kernels on a GPU, one op. It stays fp32 either way (a
    NEVER op), so plans do not change, but the deployed file runs it as one kernel, as ONNX
    Runtime's own LayerNormFusion would (autoprec's sessions disable that fusion, see
    :mod:`autoprec.deploy.runtime`). Matched strictly: both means over axis -1 with kept dims, a square
    (Pow 2 or x * x), a constant epsilon, a 1-D fp32 scale and optional 1-D fp32 shift, and no
    value but the result read outside. Anything else is left as it was.
    """
    if default_opset(model) < 17:
        return 0
    g = model.graph
    protos = {t.name: t for t in g.initializer}
    consumers = _consumers(g)
    by_name = {n.name: n for n in g.node}
    results = {o.name for o in g.output}
    taken = {n.name for n in g.node} | {i.name for i in g.input}
    replace_last: dict[int, onnx.NodeProto] = {}
    gone: set[int] = set()
    read: set[str] = set()
    for names in _layer_norm_nodes(g, consumers):
        chain = [by_name[n] for n in names]
        fused = _layer_norm_node(chain, protos, consumers, results)
        if fused is None:
            continue
        mean = chain[0]
        fused.name = _fused_name(mean, "LayerNormalization", taken)
        fused.metadata_props.extend(mean.metadata_props)
        replace_last[id(chain[-1])] = fused
        gone.update(id(n) for n in chain)
        read.update(i for n in chain for i in n.input)
    if not replace_last:
        return 0
    _replace_nodes(g, replace_last, gone, read)
    return len(replace_last)


def _layer_norm_node(chain: list[onnx.NodeProto], protos: Mapping[str, onnx.TensorProto],
                     consumers: Mapping[str, list[onnx.NodeProto]], results: set[str]) -> onnx.NodeProto | None:
    """The LayerNormalization that computes ``chain`` ([mean, sub, square, var, add eps, sqrt, div,
    scale, shift?]), or None where the nodes are not exactly that."""
    if len(chain) < 8:
        return None  # no scale: LayerNormalization needs one, of a size shape inference may not know
    mean, sub, sq, var, add_eps, _, div, scale = chain[:8]
    shift = chain[8] if len(chain) > 8 else None
    if any(_reduce_axes(m, protos) != (-1,) or _attr(m, "keepdims", 1) != 1 for m in (mean, var)):
        return None
    if sq.op_type == "Pow" and _scalar(sq.input[1], protos) != 2.0:
        return None
    eps = next((_scalar(i, protos) for i in add_eps.input if i != var.output[0]), None)
    if eps is None or eps < 0 or list(div.input) != [sub.output[0], chain[5].output[0]]:
        return None

    def vector(node: onnx.NodeProto, reads: str) -> str | None:
        other = [i for i in node.input if i != reads]
        t = protos.get(other[0]) if len(other) == 1 else None
        return other[0] if t is not None and len(t.dims) == 1 and t.data_type == TensorProto.FLOAT else None

    gamma = vector(scale, div.output[0])
    beta = vector(shift, scale.output[0]) if shift is not None else None
    if gamma is None or (shift is not None and beta is None):
        return None
    inside = {id(n) for n in chain}
    out = chain[-1].output[0]
    if any(o != out and (o in results or any(id(c) not in inside for c in consumers.get(o, [])))
           for n in chain for o in n.output):
        return None
    return helper.make_node("LayerNormalization", [mean.input[0], gamma] + ([beta] if beta else []), [out],
                            axis=-1, epsilon=float(eps))


def _fused_name(node: onnx.NodeProto, op_type: str, taken: set[str]) -> str:
    """The name of the ``op_type`` node that replaces a group named by ``node``: its name with its op
    type's last mention swapped ("/ln/ReduceMean" -> "/ln/LayerNormalization"), else (no mention,
    or taken) its name as it is, which the replaced node frees."""
    name = op_type.join(node.name.rsplit(node.op_type, 1))
    return name if node.op_type in node.name and name not in taken else node.name


def _replace_nodes(g: onnx.GraphProto, replace_last: Mapping[int, onnx.NodeProto], gone: set[int],
                   read: set[str]) -> None:
    """Put each fused node where the last node it replaces was (``replace_last``, by id), drop the
    other replaced nodes (``gone``), and the initializers of ``read`` nothing reads any more."""
    nodes = [replace_last.get(id(n), n) for n in g.node if id(n) not in gone or id(n) in replace_last]
    del g.node[:]
    g.node.extend(nodes)
    used = referenced_names(g)
    dropped = {t.name for t in g.initializer if t.name in read and t.name not in used}
    kept = [t for t in g.initializer if t.name not in dropped]
    del g.initializer[:]
    g.initializer.extend(kept)
    inputs = [i for i in g.input if i.name not in dropped]  # old IRs list initializers as inputs too
    del g.input[:]
    g.input.extend(inputs)


@dataclass(frozen=True)
class _ErfGelu:
    """One erf-form GELU an older exporter wrote as several nodes: ``nodes`` (graph order), reading
    ``x`` and writing ``out``."""

    nodes: tuple[onnx.NodeProto, ...]
    x: str
    out: str


def _near(value: float | None, want: float) -> bool:
    return value is not None and abs(value - want) <= 1e-6 * abs(want)


def _erf_gelus(g: onnx.GraphProto) -> list[_ErfGelu]:
    """Each erf-form GELU, x * 0.5 * (1 + erf(x / sqrt(2))), as older exporters write it: Div by
    sqrt(2) (or Mul by its inverse), Erf, Add 1, then a product of x, that sum and 0.5 in one or two
    Muls (x * 0.5 may come first). The whole formula is checked, constants included, and no value
    but the result may leave the nodes: replacing them by one Gelu must change nothing."""
    protos = {t.name: t for t in g.initializer}
    producer = {o: n for n in g.node for o in n.output if o}
    consumers = _consumers(g)
    results = {o.name for o in g.output}
    order = {id(n): k for k, n in enumerate(g.node)}
    default = ("", "ai.onnx")
    found: list[_ErfGelu] = []
    for erf in g.node:
        pre = producer.get(erf.input[0]) if erf.op_type == "Erf" and erf.domain in default else None
        if pre is None or pre.op_type not in ("Div", "Mul") or pre.domain not in default:
            continue
        scalars = [_scalar(i, protos) for i in pre.input]
        x = next((i for i, v in zip(pre.input, scalars) if v is None), None)
        c = next((v for v in scalars if v is not None), None)
        if x is None or not _near(c, math.sqrt(2.0) if pre.op_type == "Div" else math.sqrt(0.5)):
            continue
        if pre.op_type == "Div" and pre.input[0] != x:
            continue
        users = consumers.get(erf.output[0], [])
        add = users[0] if len(users) == 1 and users[0].op_type == "Add" else None
        if add is None or not any(_near(_scalar(i, protos), 1.0) for i in add.input):
            continue
        muls: list[onnx.NodeProto] = []
        while len(muls) < 2:
            nxt = consumers.get((muls[-1] if muls else add).output[0], [])
            if len(nxt) != 1 or nxt[0].op_type != "Mul" or nxt[0].domain not in default:
                break
            muls.append(nxt[0])
        for k in range(len(muls), 0, -1):  # the longest product that is the formula
            gelu = _erf_gelu_product(muls[:k], x, add, erf, pre, producer, protos)
            if gelu is None:
                continue
            out = muls[k - 1].output[0]
            inside = {id(n) for n in gelu}
            leaks = [o for n in gelu for o in n.output if o and o != out and (
                o in results or any(id(c) not in inside for c in consumers.get(o, [])))]
            if not leaks:
                found.append(_ErfGelu(tuple(sorted(gelu, key=lambda n: order[id(n)])), x, out))
            break
    return found


def _erf_gelu_product(muls: list[onnx.NodeProto], x: str, add: onnx.NodeProto, erf: onnx.NodeProto,
                      pre: onnx.NodeProto, producer: Mapping[str, onnx.NodeProto],
                      protos: Mapping[str, onnx.TensorProto]) -> list[onnx.NodeProto] | None:
    """The GELU's nodes if ``muls`` (and a Mul of x by 0.5 feeding them) multiply exactly x, the
    Add's result and 0.5, the last of ``muls`` writing the result; else None."""
    mine = {m.output[0]: m for m in muls}
    nodes = [pre, erf, add, *muls]
    leaves: list[str] = []
    todo = [muls[-1].output[0]]
    while todo:
        v = todo.pop()
        m = mine.get(v)
        p = producer.get(v)
        if m is None and p is not None and p.op_type == "Mul" and x in p.input and p not in nodes and all(
                i == x or _scalar(i, protos) is not None for i in p.input):
            m = p  # x * 0.5 written first
            nodes.append(p)
        if m is None:
            leaves.append(v)
        else:
            todo.extend(m.input)
    values = {v: _scalar(v, protos) for v in leaves}
    consts = [values[v] for v in leaves if values[v] is not None]
    others = sorted(v for v in leaves if values[v] is None)
    if others != sorted([x, add.output[0]]) or len(consts) != 1 or not _near(consts[0], 0.5):
        return None
    return nodes


def fuse_erf_gelus(model: onnx.ModelProto) -> int:
    """Replace each erf-form GELU (:func:`_erf_gelus`) by one ONNX ``Gelu`` (opset 20), in place;
    returns how many. Below opset 20 ONNX has no Gelu, and nothing changes.

    Why: ONNX Runtime fuses those nodes into one Gelu kernel anyway (its GeluFusion), and as one op
    the GELU is an ordinary FOLLOW op the plan can run in 16 bits. Left decomposed, each node would
    round in 16 bits on a GPU while the plan's numerics round the GELU once, so it would have to
    compute in fp32 between casts. The Gelu is named after the Erf ("Erf" becomes "Gelu" in the
    name) and keeps its metadata (the exporter's scope). Constants only the GELUs read are dropped.
    """
    if default_opset(model) < 20:
        return 0
    g = model.graph
    found = _erf_gelus(g)
    if not found:
        return 0
    taken = {n.name for n in g.node} | {i.name for i in g.input}
    replace_last: dict[int, onnx.NodeProto] = {}
    gone: set[int] = set()
    for gelu in found:
        erf = next(n for n in gelu.nodes if n.op_type == "Erf")
        node = helper.make_node("Gelu", [gelu.x], [gelu.out], name=_fused_name(erf, "Gelu", taken))
        node.metadata_props.extend(erf.metadata_props)
        replace_last[id(gelu.nodes[-1])] = node
        gone.update(id(n) for n in gelu.nodes)
    _replace_nodes(g, replace_last, gone, {i for n in found for m in n.nodes for i in m.input})
    return len(found)
