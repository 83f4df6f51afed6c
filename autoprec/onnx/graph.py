"""ONNX models as input: preprocess an .onnx file and build its :class:`OpGraph`.

For users who only have an ONNX file written by other software. :func:`load_onnx` returns the
preprocessed ``ModelProto`` (what later ONNX passes rewrite) and the op graph (what profiling, the
cost model and the search read); :func:`analyse_onnx` returns the same plus per-node ONNX op types,
the reasons some nodes stay fp32 and a log of what preprocessing did.

Preprocessing (:func:`preprocess`), in order; each rewrite is one onnx_ir pass of
:mod:`autoprec.onnx.rewrites`, whose module says why it exists:

0. inline the model's local functions (:mod:`~autoprec.onnx.rewrites.inline_functions`);
1. upgrade the default-domain opset to ``target_opset`` (``onnx.version_converter``; never
   downgrades) and raise the IR version to the one that opset needs, then expand each fused op of
   :data:`EXPANDED_OPS` (``Attention``) into the function body ONNX defines for it (onnx's
   inliner), so that the products inside it are layers (:func:`_expand_ops`);
2. fold constants that make weights (:mod:`~autoprec.onnx.rewrites.fold_constants`): ``Constant``
   nodes become initializers, and nodes that move, convert or make constants, or do exact
   arithmetic on them, are evaluated -- e.g. a weight stored transposed and fed through Transpose,
   or made by ``ConstantOfShape`` (the model-zoo graphs' Caffe2 exporter), becomes one initializer
   the layer reads;
3. fold each inference ``BatchNormalization`` that alone reads a ``Conv`` into it, in fp32
   (:mod:`~autoprec.onnx.rewrites.fold_batch_norms`, the fold a torch model's capture and export make);
4. give every node a unique name (:mod:`~autoprec.onnx.rewrites.name_nodes`), so plans and passes
   can address nodes, then fuse each erf GELU and each layer norm written as separate nodes into
   one ``Gelu`` (opset >= 20: :mod:`~autoprec.onnx.rewrites.erf_gelu`) or ``LayerNormalization``
   (opset >= 17: :mod:`~autoprec.onnx.rewrites.layer_norm`), as ONNX Runtime would;
5. shape inference (strict, with data propagation; non-strict if strict fails), kept in
   ``value_info`` with the model's own symbolic dims.

The op graph has one :class:`OpNode` per top-level ONNX node plus one ``placeholder`` per graph
input, with the kinds, policies and FLOP counts of the registry the torch capture uses too
(:mod:`autoprec.core.kinds`: MatMul or Gemm reading an initializer is ``linear``, of two
activations ``matmul``, Conv ``conv1d``/``conv2d``/``conv3d`` by rank, ConvTranspose
``conv_transpose1d``/... likewise, ...). A decomposed layer
norm the fusion leaves (no scale, other axes) is one group whose every node is a ``layer_norm``;
either way it is NEVER, so its statistics stay fp32 as torch's single op does. Below opset 20,
where ONNX has no Gelu, an erf GELU's nodes are ``gelu`` pieces kept fp32 with a reason. Control
flow (If, Loop, Scan) is one ``if``/``loop``/``scan`` node of policy NEVER: it and everything inside
its subgraphs stay fp32 (later passes rewrite top-level nodes only); the reason is in
:attr:`OnnxAnalysis.reasons`. Shapes are concrete (:mod:`autoprec.onnx.shapes`): symbolic input
dims are resolved from example data, from ``batch`` (axis 0) and from ``dims`` (by name); values
shape inference cannot size are measured by one ONNX Runtime run.
"""

from __future__ import annotations

import ast
import os
from dataclasses import dataclass, field
from typing import Any, Mapping

import onnx
import onnx.defs
import onnx.inliner
import onnx_ir as ir
from onnx import helper, version_converter

from autoprec.core.errors import CaptureError, UsageError, first_line
from autoprec.core.kinds import (CONV_KINDS, CONV_TRANSPOSE_KINDS, LOOKUP_KINDS, NEVER_KINDS, flops, onnx_kind,
    policy_of)
from autoprec.core.opgraph import OpGraph, OpNode, Policy
from autoprec.onnx.rewrites.base import Rewrite
from autoprec.onnx.rewrites.erf_gelu import GELU_OPSET, FuseErfGelus, erf_gelu_nodes, fuse_erf_gelus
from autoprec.onnx.rewrites.fold_batch_norms import FoldBatchNorms
from autoprec.onnx.rewrites.fold_constants import FoldConstants, fold_constants
from autoprec.onnx.rewrites.inline_functions import InlineFunctions
from autoprec.onnx.rewrites.layer_norm import FuseLayerNorms, decomposed_layer_norms, fuse_layer_norms
from autoprec.onnx.rewrites.name_nodes import NameNodes, name_nodes
from autoprec.onnx.shapes import ConcreteValue, concrete_values, example_arrays, graph_inputs, infer_shapes, input_shapes
from autoprec.onnx.values import FLOAT_TYPES, subgraphs

#: The analyser's names, with graph_inputs and the rewrites' ModelProto entry points, which callers
#: import from here too.
__all__ = ["FLOAT_TYPES", "OnnxAnalysis", "TARGET_OPSET", "analyse_onnx", "build_opgraph", "default_opset",
           "fold_constants", "fuse_erf_gelus", "fuse_layer_norms", "graph_inputs", "load_onnx", "name_nodes",
           "preprocess", "read_model"]

#: The opset ONNX inputs are upgraded to (fp8 QuantizeLinear/DequantizeLinear, blocked Q/DQ).
TARGET_OPSET = 21

CONTROL_FLOW_OPS = frozenset({"If", "Loop", "Scan"})

#: Fused ONNX ops that preprocessing replaces by the function body ONNX defines for them
#: (:func:`_expand_ops`), so that the products inside become layers: Attention (opset 23) computes
#: Q Kᵀ and P V, the two matmuls a torch model's attention is captured as.
EXPANDED_OPS = ("Attention",)

_NEVER_WHY = "stays fp32 by default (numerically sensitive: norms, softmax, exp/log/pow, reductions)"

#: The rewrites after the opset upgrade, in order, with the note each writes when it changed something.
_REWRITES: tuple[tuple[type[Rewrite], str], ...] = (
    (FoldConstants, "folded {} constant node(s) into initializers"),
    (FoldBatchNorms, "folded {} batch norm(s) into the convolution before them, in fp32"),
    (NameNodes, "named {} unnamed or duplicate node(s)"),
    (FuseErfGelus, "fused {} erf GELU(s) written as separate nodes into one Gelu each (as ONNX Runtime fuses "
                   "them), so the plan can run them in 16 bits"),
    (FuseLayerNorms, "fused {} layer norm(s) written as separate nodes into one LayerNormalization each (one "
                     "fp32 kernel, as ONNX Runtime fuses them)"),
)


@dataclass
class OnnxAnalysis:
    """What :func:`analyse_onnx` found: the preprocessed model and its op graph, plus

    ``op_types``: node name -> ONNX op type ("domain::Op" outside the default domain), the input
    :func:`autoprec.ort.providers.exclusions` wants; ``reasons``: node name -> why the node stays
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
    feeds = example_arrays(model, example)
    shapes_in = input_shapes(model, feeds, batch, dims or {})
    values, more = concrete_values(model, shapes_in, feeds)
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
    return read_onnx_file(path), os.path.splitext(os.path.basename(path))[0]


def read_onnx_file(path: str | os.PathLike[str]) -> onnx.ModelProto:
    """The ONNX model in file ``path``: a missing path is a UsageError, a file that holds no ONNX
    graph (empty, other bytes, no nodes) a one-line CaptureError naming it."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise UsageError(f"no ONNX file at {path}")
    if os.path.isdir(path):
        raise UsageError(f"{path} is a folder: give the path of an .onnx file")
    if os.path.getsize(path) == 0:
        raise CaptureError(f"{path} is empty (0 bytes): not an ONNX model")
    try:
        model = onnx.load(path)
    except Exception as exc:
        raise CaptureError(f"cannot read {path} as ONNX: {type(exc).__name__}: {first_line(exc)}") from exc
    if not model.graph.node:
        raise CaptureError(f"{path} holds no ONNX graph (no nodes): is it an ONNX model?")
    return model


def default_opset(model: onnx.ModelProto) -> int:
    """The model's ai.onnx opset version (0 when it imports none)."""
    return max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)


def preprocess(model: onnx.ModelProto, target_opset: int = TARGET_OPSET) -> tuple[onnx.ModelProto, list[str]]:
    """Inline, upgrade, fold, name, fuse and infer shapes (see the module docstring).

    Returns a new model and notes saying what changed. Raises CaptureError when the model cannot be
    inlined, upgraded or read into onnx_ir.
    """
    notes: list[str] = []
    if model.functions:
        ir_model, maps = _to_ir(model)
        notes.append(f"inlined the model's {InlineFunctions()(ir_model).count} local function(s)")
        model = _from_ir(ir_model, maps)
    model = _upgrade(model, target_opset, notes)
    model = _expand_ops(model, notes)
    ir_model, maps = _to_ir(model)
    for rewrite, note in _REWRITES:
        count = rewrite()(ir_model).count
        if count:
            notes.append(note.format(count))
    model, how = infer_shapes(_from_ir(ir_model, maps))
    if how:
        notes.append(how)
    return model, notes


def _to_ir(model: onnx.ModelProto) -> tuple[ir.Model, dict[str, onnx.TypeProto]]:
    """``model`` as an onnx_ir model, which the rewrites work on, and the types onnx_ir cannot hold
    of the graph's inputs and outputs, by name (maps: ai.onnx.ml's ZipMap writes a sequence of
    them); onnx_ir gets those values without a type, and :func:`_from_ir` puts them back. A one-line
    error where onnx_ir cannot represent the model otherwise (e.g. a sparse Constant)."""
    kept = {vi.name: vi.type for vi in (*model.graph.input, *model.graph.output) if _holds_map(vi.type)}
    if kept or any(_holds_map(vi.type) for vi in model.graph.value_info):
        model = _strip_map_types(model)
    try:
        return ir.serde.deserialize_model(model), kept
    except Exception as exc:
        cause = exc.__cause__ or exc
        raise CaptureError(f"cannot read the model into onnx_ir for preprocessing: {first_line(exc)} "
                           f"({type(cause).__name__}: {first_line(cause)})") from exc


def _from_ir(ir_model: ir.Model, kept: Mapping[str, onnx.TypeProto]) -> onnx.ModelProto:
    """The ModelProto of ``ir_model``, with the input and output types :func:`_to_ir` kept."""
    model = ir.serde.serialize_model(ir_model)
    for vi in (*model.graph.input, *model.graph.output):
        if vi.name in kept:
            vi.type.CopyFrom(kept[vi.name])
    return model


def _holds_map(t: onnx.TypeProto) -> bool:
    kind = t.WhichOneof("value")
    if kind == "map_type":
        return True
    if kind in ("sequence_type", "optional_type"):
        return _holds_map(getattr(t, kind).elem_type)
    return False


def _strip_map_types(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` whose inputs and outputs of map types have no type, and without the
    value_info of such values (shape inference writes it again)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    for vi in (*g.input, *g.output):
        if _holds_map(vi.type):
            vi.ClearField("type")
    kept = [vi for vi in g.value_info if not _holds_map(vi.type)]
    del g.value_info[:]
    g.value_info.extend(kept)
    return out


def _upgrade(model: onnx.ModelProto, target_opset: int, notes: list[str]) -> onnx.ModelProto:
    """``model`` at ``target_opset`` if it is older, with the IR version that opset needs; notes what
    changed. Node metadata (the torch scopes), which the converter drops, is kept."""
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
        for n in model.graph.node:
            if not n.metadata_props and n.name in meta:
                n.metadata_props.extend(meta[n.name])
        notes.append(f"upgraded opset {current} -> {target_opset}")
    needed = helper.find_min_ir_version_for(list(model.opset_import), ignore_unknown=True)
    if model.ir_version < needed:
        notes.append(f"raised IR version {model.ir_version} -> {needed}")
        model.ir_version = needed
    return model


def _expand_ops(model: onnx.ModelProto, notes: list[str]) -> onnx.ModelProto:
    """``model`` with each node of :data:`EXPANDED_OPS` replaced by the ONNX function body its
    schema defines for it (onnx's inliner builds the context-dependent body from the node's
    attributes and inputs): the fused op's products become ordinary MatMuls, i.e. ``matmul``
    layers, as a fused attention kernel computes them. The body's nodes are named after the node
    they expand (``<name>/<op_type>``, made unique by :class:`NameNodes`) and carry its metadata, so
    their layers keep its scope. A body onnx cannot build leaves the model as it is, with a note:
    the fused node then stays fp32 with its reason."""
    fused = [n for n in model.graph.node if _expands(n)]
    if not fused:
        return model
    what = ", ".join(sorted({n.op_type for n in fused}))
    try:
        out = onnx.inliner.inline_selected_functions(model, [("", op) for op in EXPANDED_OPS],
                                                     inline_schema_functions=True)
    except Exception as exc:  # onnx's C++ inliner: a body it cannot build for these inputs or attributes
        notes.append(f"could not expand {len(fused)} {what} node(s) into their ONNX function body "
                     f"({first_line(exc)}): kept as one fp32 op each")
        return model
    _name_expanded(model.graph, out.graph)
    notes.append(f"expanded {len(fused)} {what} node(s) into their ONNX function body, so that each one's "
                 "products (Q Kᵀ and P V) are matmul layers")
    return out


def _name_expanded(before: onnx.GraphProto, after: onnx.GraphProto) -> None:
    """Name each node the inliner made (the nodes of ``after`` that are not nodes of ``before``)
    after the node of ``before`` it expands, with that node's metadata. The inliner writes each
    expanded node's body in its place, in order, the node's outputs written by the body's last
    nodes: so the made nodes belong to the expanded nodes in turn, each up to its outputs."""
    kept = {n.SerializeToString() for n in before.node if not _expands(n)}
    owners = [n for n in before.node if _expands(n)]
    k, pending = 0, {o for o in owners[0].output if o}
    for node in after.node:
        if node.SerializeToString() in kept:
            continue
        owner = owners[k]
        if owner.name:
            node.name = f"{owner.name}/{node.op_type}"
        node.metadata_props.extend(owner.metadata_props)
        pending.difference_update(node.output)
        if not pending and k + 1 < len(owners):
            k += 1
            pending = {o for o in owners[k].output if o}


def _expands(node: onnx.NodeProto) -> bool:
    """Whether preprocessing replaces ``node`` by its ONNX function body (:data:`EXPANDED_OPS`)."""
    return node.domain in ("", "ai.onnx") and node.op_type in EXPANDED_OPS


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


def _attr(node: onnx.NodeProto, name: str, default: Any = None) -> Any:
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


# --- the op graph -------------------------------------------------------------------------------
def build_opgraph(model: onnx.ModelProto, values: Mapping[str, ConcreteValue],
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
    ir_model, _ = _to_ir(model)
    for chain in decomposed_layer_norms(ir_model.graph):  # the forms fuse_layer_norms leaves
        names = [n.name or "" for n in chain]
        head = min(names, key=order.__getitem__)
        for member in names:
            fused[member] = "layer_norm"
            groups[member] = head
    # erf GELUs are left decomposed only below opset 20 (fuse_erf_gelus): each node would round
    # in 16 bits on a GPU, the plan's numerics round a GELU once, so they stay fp32
    gelus = erf_gelu_nodes(ir_model) if default_opset(model) < GELU_OPSET else []
    unfused = {n.name or "": len(gelu) for gelu in gelus for n in gelu}
    fused.update((name, "gelu") for name in unfused)
    ties: dict[tuple[str, str, tuple[int, ...]], list[str]] = {}
    bias_adds: set[str] = set()  # the Adds of layers' biases: their initializer is the layer's
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
            bias_adds.add(bias_add[0])
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
        stored = _weight_elems(node, weight, inits, values, bias_add[1] if bias_add else None) \
            if weight is not None or node.name in bias_adds else _stored_elems(ins, inits, values)
        op = OpNode(
            name=node.name,
            kind=kind,
            scope=_scope(node),
            policy=policy,
            input_shapes=tuple(v.shape for v in in_vals if v.shape is not None),
            output_shape=out_v.shape if out_v is not None and out_v.shape is not None else (),
            flops=_flops(base, node, values, stored) if policy is not Policy.NONE else 0,
            weight_elems=stored,
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
    # the graph's outputs are read in its I/O format (fp32: a deployment graph casts a 16-bit result
    # back; OpGraph.with_io), as the torch capture's output node is
    taken = {n.name for n in nodes}
    out_name = next(c for c in ("output", *(f"output_{i}" for i in range(1, len(taken) + 2))) if c not in taken)
    outs = [o.name for o in g.output]
    nodes.append(OpNode(name=out_name, kind="output", scope="", policy=Policy.NONE,
                        act_in_elems=sum(values[o].numel for o in outs if o in values and values[o].is_float)))
    edges.extend((p, out_name) for p in dict.fromkeys(producer[o] for o in outs if o in producer))
    graph = OpGraph(nodes=nodes, edges=edges, model_name=name)
    graph.ties = [members for _, members in sorted(ties.items()) if len(members) > 1]
    return graph, op_types, reasons, {n.name: groups.get(n.name, n.name) for n in g.node}


#: kinds of the ONNX ops that read their kernel as input 1 (Conv, ConvTranspose)
_KERNEL_KINDS = CONV_KINDS | CONV_TRANSPOSE_KINDS


def _unsupported_layer(node: onnx.NodeProto, kind: str, weight: str | None) -> bool:
    """A MatMul/Gemm/Conv/ConvTranspose the passes cannot lower: its weight is not a constant
    second operand."""
    if kind == "linear":
        return weight is None or len(node.input) < 2 or node.input[1] != weight
    if kind in _KERNEL_KINDS:
        return weight is None
    return False


def _bias_add(node: onnx.NodeProto, weight: str | None, inits: set[str], values: Mapping[str, ConcreteValue],
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


def _rank(values: Mapping[str, ConcreteValue], name: str) -> int | None:
    v = values.get(name)
    return len(v.shape) if v is not None and v.shape is not None else None


def _kind(node: onnx.NodeProto, inits: set[str], values: Mapping[str, ConcreteValue]) -> tuple[str, str | None]:
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
    weight = ins[1] if kind in _KERNEL_KINDS and len(ins) > 1 and ins[1] in inits else None
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
    if kind == "linear" or kind in _KERNEL_KINDS:
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


def _flops(kind: str, node: onnx.NodeProto, values: Mapping[str, ConcreteValue], stored: int = 0) -> int:
    """FLOPs by :func:`autoprec.core.kinds.flops`, the rule the torch capture counts by (``stored``:
    the initializer elements it reads)."""
    outs = [values[o] for o in node.output if o and o in values and values[o].shape is not None]
    shapes = [values[i].shape or () if i and i in values else () for i in node.input]
    if node.op_type == "Gemm" and _attr(node, "transA", 0) and shapes and len(shapes[0]) == 2:
        shapes[0] = shapes[0][::-1]  # A as the product reads it: its contracted dim last
    return flops(kind, shapes, outs[0].shape if outs else None, weight_elems=stored)


def _stored_elems(ins: list[str], inits: set[str], values: Mapping[str, ConcreteValue]) -> int:
    """Float initializer elements an op that is no layer reads (a norm's scale, a position table):
    stored tensors a plan does not change (:mod:`autoprec.core.coverage`), as the torch capture counts them."""
    return sum(values[i].numel for i in dict.fromkeys(ins) if i in inits and i in values and values[i].is_float)


def _weight_elems(node: onnx.NodeProto, weight: str | None, inits: set[str], values: Mapping[str, ConcreteValue],
                  bias_add: str | None) -> int:
    """Parameter elements a layer reads: its weight and its bias -- Gemm's C, (Transpose)Conv's B, or a
    MatMul's ``bias_add`` constant (:func:`_bias_add`), counted as torch counts nn.Linear's bias."""
    if weight is None:
        return 0
    total = values[weight].numel
    if node.op_type in ("Gemm", "Conv", "ConvTranspose") and len(node.input) > 2 and node.input[2] in inits:
        total += values[node.input[2]].numel
    elif bias_add is not None:
        total += values[bias_add].numel
    return total
