"""A tiny pass framework for ONNX rewrites, and the graph queries the ONNX passes share.

An ONNX pass is a :class:`autoprec.core.passes.GraphPass` over ``onnx.ModelProto``: ``call(model) ->
PassResult(model, modified)``, ``requires(model)`` and ``ensures(model)``, its postcondition: the ONNX checker
accepts the model and whatever the pass promises holds. ``PassManager`` from :mod:`autoprec.core.passes` runs them.
Passes rewrite the ``onnx.ModelProto`` they are given in place.

Decisions travel between passes as node metadata (``NodeProto.metadata_props``) under the
``autoprec.*`` keys below, so a saved model still says which layer a node belongs to, its format
and why. :class:`GraphIndex` answers the questions every pass asks (who produces or reads a value,
its element type, whether it is an initializer).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Iterable

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from autoprec.core.errors import first_line
from autoprec.core.formats import Precision
from autoprec.core.fp8 import fp8_codes
from autoprec.onnx.values import FLOAT_TYPES, referenced_names  # noqa: F401  (FLOAT_TYPES re-exported)
from autoprec.core.passes import GraphPass, PassError

# --- node metadata keys ------------------------------------------------------------------------
#: id of the group a node belongs to: the exporter's FX node it came from (one torch op)
GROUP = "autoprec.group"
#: normalised op kind of the group (the same names as autoprec.torch.capture: "linear", "relu", ...)
KIND = "autoprec.kind"
#: module scope of the group ("blocks.0.attn.q"; "" at the top level)
SCOPE = "autoprec.scope"
#: plan layer the group computes (only on nodes of layer groups)
LAYER = "autoprec.layer"
#: "core" on the MatMul/Gemm/Conv/ConvTranspose node of a layer group (the Gather of an embedding)
ROLE = "autoprec.role"
#: policy of the group ("always", "follow", "never", "none")
POLICY = "autoprec.policy"
#: format the group computes in, and the format of the values it hands to other groups
FORMAT = "autoprec.format"
VALUE_FORMAT = "autoprec.value_format"
#: readable reason for the format
REASON = "autoprec.reason"
#: "1" on the nodes of a 16-bit FOLLOW group whose result the plan rounds (the lowering's ``rounds``)
ROUNDS = "autoprec.rounds"
#: JSON list: calibrated amax of each activation input of an fp8 layer (on its core node)
ACT_AMAX = "autoprec.act_amax"
#: on nodes a pass inserted: "cast", "round", "quantize", "weight"
INSERTED = "autoprec.inserted"

#: model-level metadata (ModelProto.metadata_props)
MODEL_MODE = "autoprec.mode"  # "deploy" | "emulate"
MODEL_ASSIGNMENT = "autoprec.assignment"  # JSON {layer: format}
MODEL_ACT_AMAX = "autoprec.act_amax"  # JSON {layer: [amax, ...]} of fp8 layers
MODEL_NAME = "autoprec.model"
MODEL_FINGERPRINT = "autoprec.fingerprint"
MODEL_PROVIDER = "autoprec.provider"  # the provider whose kernels a deployment graph's compute types follow
MODEL_IO = "autoprec.core.io"  # format of the graph's inputs and outputs when not fp32 ("fp16")

ROLE_CORE = "core"

_BY_ONNX_TYPE = {p.onnx_type: p for p in Precision}


def precision_of_type(elem_type: int) -> Precision | None:
    return _BY_ONNX_TYPE.get(elem_type)


# --- metadata helpers --------------------------------------------------------------------------


def get_meta(node: onnx.NodeProto, key: str, default: str | None = None) -> str | None:
    for p in node.metadata_props:
        if p.key == key:
            return p.value
    return default


def _set_prop(props: Any, key: str, value: str) -> None:
    """Set ``key`` in a repeated StringStringEntryProto field (node or model metadata_props)."""
    for p in props:
        if p.key == key:
            p.value = value
            return
    props.add(key=key, value=value)


def set_meta(node: onnx.NodeProto, key: str, value: str) -> None:
    _set_prop(node.metadata_props, key, value)


def drop_meta(node: onnx.NodeProto, keys: Iterable[str]) -> None:
    keep = [(p.key, p.value) for p in node.metadata_props if p.key not in set(keys)]
    del node.metadata_props[:]
    for k, v in keep:
        node.metadata_props.add(key=k, value=v)


def node_format(node: onnx.NodeProto) -> Precision | None:
    v = get_meta(node, FORMAT)
    return Precision(v) if v else None


def node_value_format(node: onnx.NodeProto) -> Precision | None:
    v = get_meta(node, VALUE_FORMAT)
    return Precision(v) if v else None


def node_amax(node: onnx.NodeProto) -> tuple[float, ...]:
    v = get_meta(node, ACT_AMAX)
    return tuple(float(a) for a in json.loads(v)) if v else ()


def model_meta(model: onnx.ModelProto) -> dict[str, str]:
    return {p.key: p.value for p in model.metadata_props}


def set_model_meta(model: onnx.ModelProto, key: str, value: str) -> None:
    _set_prop(model.metadata_props, key, value)


# --- the pass framework ------------------------------------------------------------------------


class OnnxPass(GraphPass[onnx.ModelProto]):
    """An ONNX pass: its default precondition is the node metadata it reads, its default
    postcondition the ONNX checker."""

    #: node metadata keys every node must carry before the pass runs (what an earlier pass wrote)
    needs: tuple[str, ...] = ()
    #: whether the pass leaves a type-consistent graph (full checker with shape inference); a pass
    #: that changes the element types of some values and leaves the reconciling casts to a later
    #: pass (LowerWeights in a deployment graph) checks the graph structure only
    type_consistent = True

    def requires(self, model: onnx.ModelProto) -> None:
        """Raise :class:`PassError` when a node lacks metadata of :attr:`needs`."""
        for n in model.graph.node:
            missing = [k for k in self.needs if get_meta(n, k) is None]
            if missing:
                raise PassError(f"{self.name}: node {n.name} has no {', '.join(missing)}: run the passes that "
                                "write it first")

    def ensures(self, model: onnx.ModelProto) -> None:
        """Raise :class:`PassError` when the ONNX checker rejects the result."""
        try:
            onnx.checker.check_model(checkable(model), full_check=self.type_consistent)
        except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
            raise PassError(f"{self.name}: the ONNX checker rejects the result: "
                                f"{first_line(exc, 300)}") from exc


# --- graph queries -----------------------------------------------------------------------------


def opset_of(model: onnx.ModelProto, domain: str = "") -> int:
    for o in model.opset_import:
        if o.domain in (domain, "ai.onnx" if domain == "" else domain):
            return int(o.version)
    raise PassError(f"the model imports no opset for domain {domain!r}")


def infer_types(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with value_info recomputed by ONNX shape inference (stale entries dropped first)."""
    del model.graph.value_info[:]
    inferred = onnx.shape_inference.infer_shapes(checkable(model), check_type=True, strict_mode=True, data_prop=True)
    model.graph.value_info.extend(inferred.graph.value_info)
    return model


#: Elements above which a float initializer is checked by its declared type and shape alone.
CHECKED_BY_SHAPE = 4096


def checkable(model: onnx.ModelProto) -> onnx.ModelProto:
    """What the ONNX checker and shape inference read in place of ``model``: a copy in which every
    float initializer of more than :data:`CHECKED_BY_SHAPE` elements is a graph input of its type
    and shape, once its bytes are checked to fill that shape.

    Why: both serialize the model they are given, and the passes check and type a graph several
    times per plan; with the weights of a model-zoo CNN (100 MB for ResNet-50, 550 MB for VGG-19)
    that copying was most of the time of a profile trial, which builds one plan's graph. Type and
    shape are all the checks and the inference read of such a tensor: no shape is computed from a
    large float constant.
    """
    big = {t.name for t in model.graph.initializer
           if t.data_type in FLOAT_TYPES and int(np.prod(t.dims, dtype=np.int64)) > CHECKED_BY_SHAPE}
    if not big:
        return model
    out = _copy_except(model, onnx.ModelProto(), "graph")
    _copy_except(model.graph, out.graph, "initializer")
    out.graph.initializer.extend(t for t in model.graph.initializer if t.name not in big)
    listed = {i.name for i in out.graph.input}
    for t in model.graph.initializer:
        if t.name in big:
            _check_filled(t)
            if t.name not in listed:
                out.graph.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    return out


def compacted(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` re-read from its bytes: the same model in a fresh protobuf arena.

    Why: with protobuf's upb backend a message's memory lives in an arena that only grows while the
    message lives; an initializer removed or replaced by a pass keeps its bytes there. The plan
    passes replace every lowered weight, so a GPT-2-size graph (0.25 GB serialized) held 1.5 GB
    until compacted, and the fp32 export 1 GB for its 0.5 GB of weights."""
    return onnx.load_from_string(model.SerializeToString())


def _copy_except(source: Any, target: Any, field: str) -> Any:
    """Copy every set field of protobuf message ``source`` but ``field`` into ``target``."""
    for fd, value in source.ListFields():
        if fd.name == field:
            continue
        # protobuf >= 6 says is_repeated; older versions only label
        if getattr(fd, "is_repeated", None) or getattr(fd, "label", None) == fd.LABEL_REPEATED:
            getattr(target, fd.name).extend(value)
        elif fd.message_type is not None:
            getattr(target, fd.name).CopyFrom(value)
        else:
            setattr(target, fd.name, value)
    return target


def _check_filled(t: TensorProto) -> None:
    """The check ``onnx.checker`` makes of an initializer it does not see: its data fill its shape."""
    n = int(np.prod(t.dims, dtype=np.int64))
    if t.data_location == TensorProto.EXTERNAL:
        return  # external data is read where it lies, not checked here
    if t.HasField("raw_data"):
        have, want = len(t.raw_data), n * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
    else:
        have, want = len(numpy_helper.to_array(t).reshape(-1)), n
    if have != want:
        raise onnx.checker.ValidationError(f"TensorProto (tensor name: {t.name}) holds {have} "
                                           f"{'bytes' if t.HasField('raw_data') else 'values'}, its shape needs {want}")


class GraphIndex:
    """Producers, consumers, element types and initializers of a graph (rebuild after a rewrite)."""

    def __init__(self, model: onnx.ModelProto) -> None:
        g = model.graph
        self.model = model
        self.opset = opset_of(model)
        self.nodes = list(g.node)
        self.producer: dict[str, int] = {}
        self.consumers: dict[str, list[tuple[int, int]]] = {}
        for i, n in enumerate(self.nodes):
            for o in n.output:
                if o:
                    self.producer[o] = i
            for k, name in enumerate(n.input):
                if name:
                    self.consumers.setdefault(name, []).append((i, k))
        self.inits: dict[str, TensorProto] = {t.name: t for t in g.initializer}
        self.inputs = [v.name for v in g.input if v.name not in self.inits]
        self.outputs = [v.name for v in g.output]
        self.types: dict[str, int] = {}
        for v in list(g.input) + list(g.output) + list(g.value_info):
            if v.type.HasField("tensor_type") and v.type.tensor_type.elem_type:
                self.types[v.name] = v.type.tensor_type.elem_type
        for t in g.initializer:
            self.types[t.name] = t.data_type
        for n in self.nodes:  # Cast outputs are typed by their attribute even before inference
            if n.op_type == "Cast" and n.domain in ("", "ai.onnx"):
                self.types.setdefault(n.output[0], attr(n, "to"))

    def elem_type(self, name: str) -> int | None:
        return self.types.get(name)

    def is_float(self, name: str) -> bool:
        return self.types.get(name) in FLOAT_TYPES

    def array(self, name: str) -> np.ndarray:
        return numpy_helper.to_array(self.inits[name])

    def numel(self, name: str) -> int:
        return int(np.prod(self.inits[name].dims)) if name in self.inits else -1


def weight_slot(core: onnx.NodeProto) -> int:
    """Input slot of a layer's weight on its core node: a Gather (an embedding) reads its table as
    input 0 and the indices as input 1; MatMul, Gemm, Conv and ConvTranspose read the weight as input 1."""
    return 0 if core.op_type == "Gather" else 1


@dataclass(frozen=True)
class WeightRead:
    """Where a layer's core node reads its weight initializer.

    ``reader``/``slot``: the node and input slot naming the initializer -- the core node itself, or
    a ``Transpose`` (perm [1, 0]) between them, which is how the exporter writes a linear layer
    whose weight is tied to an embedding table: the table is stored once, [out, in], and read by
    the Gather as it is and by the MatMul through the Transpose. ``transposed``: the initializer
    holds the torch weight transposed ([in, out]: MatMul, Gemm without transB), so its output
    channels are its columns."""

    reader: onnx.NodeProto
    slot: int
    initializer: str
    transposed: bool


def weight_read(idx: GraphIndex, core: onnx.NodeProto) -> WeightRead | None:
    """The :class:`WeightRead` of a layer's core node; None when it reads no weight initializer."""
    slot = weight_slot(core)
    if len(core.input) <= slot or not core.input[slot]:
        return None
    transposed = core.op_type == "MatMul" or (core.op_type == "Gemm" and not attr(core, "transB", 0))
    name = core.input[slot]
    if name in idx.inits:
        return WeightRead(core, slot, name, transposed)
    p = idx.nodes[idx.producer[name]] if name in idx.producer else None
    if p is not None and p.op_type == "Transpose" and p.domain in ("", "ai.onnx") and p.input[0] in idx.inits \
            and len(idx.inits[p.input[0]].dims) == 2 and list(attr(p, "perm", [1, 0])) == [1, 0]:
        return WeightRead(p, 0, p.input[0], not transposed)
    return None


def attr(node: onnx.NodeProto, name: str, default: Any = None) -> Any:
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def set_attr(node: onnx.NodeProto, name: str, value: Any) -> None:
    for i, a in enumerate(node.attribute):
        if a.name == name:
            del node.attribute[i]
            break
    node.attribute.append(onnx.helper.make_attribute(name, value))


# --- schemas: which inputs share the output's type, which types an op admits --------------------


def _schema(node: onnx.NodeProto, opset: int) -> Any:
    try:
        return onnx.defs.get_schema(node.op_type, opset, node.domain or "")
    except onnx.defs.SchemaError:
        return None


def same_type_inputs(node: onnx.NodeProto, opset: int) -> list[bool]:
    """For each input slot: whether the schema ties its type to the type of output 0 or of another
    input (``T`` of Add, of Where's X and Y, of Less's A and B). Such inputs must all be given in the
    type the node computes in; an input with a type of its own (Shape's data, Resize's scales) not."""
    s = _schema(node, opset)
    if s is None or not s.outputs:
        return [False] * len(node.input)
    out_t = s.outputs[0].type_str
    params = {c.type_param_str for c in s.type_constraints}
    formal = [s.inputs[min(i, len(s.inputs) - 1)].type_str if s.inputs else "" for i in range(len(node.input))]
    uses = {t: formal.count(t) for t in formal}
    return [t in params and (t == out_t or uses[t] > 1) for t in formal]


def output_follows_inputs(node: onnx.NodeProto, opset: int, slot: int = 0) -> bool:
    """Whether output ``slot``'s type is the type of some input (Add, Relu, MatMul), not fixed by an
    attribute or the op (ConstantOfShape, Shape, LayerNormalization's statistics)."""
    s = _schema(node, opset)
    if s is None or not s.outputs:
        return False
    out_t = s.outputs[min(slot, len(s.outputs) - 1)].type_str
    return any(i.type_str == out_t for i in s.inputs)


def admits(node: onnx.NodeProto, opset: int, elem_type: int) -> bool:
    """Whether the op's schema lets output 0 (and the inputs typed like it) be ``elem_type``."""
    s = _schema(node, opset)
    if s is None or not s.outputs:
        return False
    out_t = s.outputs[0].type_str
    want = f"tensor({onnx.helper.tensor_dtype_to_string(elem_type).removeprefix('TensorProto.').lower()})"
    for c in s.type_constraints:
        if c.type_param_str == out_t:
            return want in set(c.allowed_type_strs)
    return out_t == want


# --- tensors in a format -------------------------------------------------------------------------


def rounded_array(a: np.ndarray, fmt: Precision) -> np.ndarray:
    """``a`` stored in ``fmt`` (numpy array of the format's dtype), rounded exactly as torch rounds.

    numpy and ml_dtypes round to nearest even as torch does, overflowing to inf; fp8 clamps to the
    format's max first when it saturates (E4M3FN), as :func:`autoprec.core.fp8.fp8_codes` (held
    bit-identical to torch by ``tests/unit/test_fp8_numpy.py``) and autoprec.torch.quantize do. In
    numpy, not torch: the ONNX frontend runs without torch, and importing it for the first weight
    a plan lowers cost a tune of an .onnx file ten seconds.
    """
    a = np.ascontiguousarray(a, dtype=np.float32)
    if fmt.is_fp8:
        return fp8_codes(a, np.float32(1.0), fmt)
    with np.errstate(over="ignore", invalid="ignore"):  # overflow to inf, NaN stays NaN: as torch
        return a.astype(fmt.numpy_dtype)


def make_tensor(name: str, a: np.ndarray, elem_type: int) -> TensorProto:
    """A TensorProto of ``elem_type`` holding the bytes of ``a`` (already in that type's layout)."""
    t = TensorProto(name=name, data_type=elem_type, dims=list(a.shape))
    t.raw_data = np.ascontiguousarray(a).tobytes()
    return t


def unique_name(taken: set[str], base: str) -> str:
    """``base``, or ``base_2``, ``base_3``, ... whichever is not in ``taken`` (which it joins)."""
    name, i = base, 2
    while name in taken:
        name, i = f"{base}_{i}", i + 1
    taken.add(name)
    return name


def all_names(model: onnx.ModelProto) -> set[str]:
    g = model.graph
    names = {t.name for t in g.initializer} | {v.name for v in g.input} | {v.name for v in g.output}
    for n in g.node:
        names.update(n.output)
        names.add(n.name)
    return names


def set_nodes(model: onnx.ModelProto, nodes: list[onnx.NodeProto]) -> None:
    """Make ``nodes`` the graph's nodes (a pass's rewrite, in order) and drop the initializers no
    node reads any more."""
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    remove_unused_initializers(model)


def mark_layer(node: onnx.NodeProto, layer: str, core: bool) -> None:
    """Say that ``node`` computes plan layer ``layer`` (its core node: MatMul/Gemm/Conv/ConvTranspose/Gather)."""
    set_meta(node, LAYER, layer)
    if core:
        set_meta(node, ROLE, ROLE_CORE)


def remove_unused_initializers(model: onnx.ModelProto) -> int:
    """Drop initializers no node reads (a control-flow subgraph's outer-scope reads count) and no
    graph output names; return how many went."""
    g = model.graph
    used = referenced_names(g)
    gone = {t.name for t in g.initializer if t.name not in used}
    if gone:
        # deleted in place: re-adding the kept ones would copy every weight into the model's arena
        # again (see compacted)
        for i in reversed(range(len(g.initializer))):
            if g.initializer[i].name in gone:
                del g.initializer[i]
        ins = [v for v in g.input if v.name not in gone]
        del g.input[:]
        g.input.extend(ins)
    return len(gone)
