"""ONNX pass 1: group the exported nodes by the torch op they came from and find the plan's layers.

The dynamo exporter writes on every node the module scopes it ran in and the FX node it was
translated from (``pkg.torch.onnx.name_scopes``, ``pkg.torch.onnx.class_hierarchy``). A *group* is
the set of ONNX nodes translated from one FX node: ``aten.linear`` on a 3-D input becomes
``MatMul`` + ``Add``, one group, which rounds its result once, as the torch op does.

Each group gets the same op kind the torch capture would give it (autoprec.torch.capture): when the
model was captured with torch.fx, ops inside a torch.nn leaf module (nn.ReLU, nn.AdaptiveAvgPool2d)
take the module's kind, as fx sees one call_module node; otherwise the ATen op's kind (the exporter
records every convolution as ``aten.convolution``: a ConvTranspose node's is a transposed one).

Layers are matched, never guessed from names: the captured layers and the ONNX groups of a layer
kind are bucketed by (module scope, layer class: linear | conv | conv_transpose | matmul | embedding)
and paired in execution order; a bucket must hold the same number on both sides, and each pair of
layers with a weight must read the same weight tensor (the ONNX initializer, transposed where the
exporter transposed it, equals the captured parameter bit for bit). An embedding is the ``Gather`` that reads its table as
input 0 (``torch_to_onnx`` keeps lookups of constant positions from being folded away). A plan
layer in a low-precision format that cannot be paired is a PlanError naming it.

Writes node metadata GROUP, KIND and SCOPE on every node, LAYER on the nodes of matched groups and
ROLE=core on each layer's MatMul/Gemm/Conv/ConvTranspose/Gather node.
"""

from __future__ import annotations

import ast
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Mapping

import numpy as np
import onnx

from autoprec.core.errors import PlanError
from autoprec.core.kinds import aten_kind, layer_class, onnx_kind, torch_module_kind, weight_arg_position
from autoprec.core.formats import Precision
from autoprec.core.passes import PassError, PassResult
from autoprec.onnx.passes.base import (GROUP, KIND, LAYER, ROLE, ROLE_CORE, SCOPE, GraphIndex,
    OnnxPass, get_meta, mark_layer, set_meta, weight_read)

if TYPE_CHECKING:  # the capture this export came from: only its data is read here
    from autoprec.torch.capture import Captured

log = logging.getLogger(__name__)

NAME_SCOPES = "pkg.torch.onnx.name_scopes"
CLASS_HIERARCHY = "pkg.torch.onnx.class_hierarchy"

#: ONNX ops that compute a layer's product
PRODUCT_OPS = frozenset({"Gemm", "MatMul", "Conv"})

#: the ONNX op that is a layer's core node, per layer class: its product, or an embedding's lookup
CORE_OPS = {"linear": PRODUCT_OPS, "conv": PRODUCT_OPS, "conv_transpose": frozenset({"ConvTranspose"}),
            "matmul": PRODUCT_OPS, "embedding": frozenset({"Gather"})}



def literal_list(text: str | None) -> list[str]:
    """The list of strings an exporter metadata entry holds (``"['', 'fc', 'linear']"``); [] if none."""
    if not text:
        return []
    try:
        v = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return []
    return [str(x) for x in v] if isinstance(v, (list, tuple)) else []


def _is_leaf_module(qualname: str) -> bool:
    """What torch.fx's default tracer treats as a leaf: torch.nn modules other than Sequential."""
    return qualname.startswith(("torch.nn.", "torch.ao.nn.")) and not qualname.endswith(".Sequential")


@dataclass(frozen=True)
class NodeOrigin:
    """Where one ONNX node came from: its group id, kind and module scope."""

    group: str
    kind: str
    scope: str


def node_origin(node: onnx.NodeProto, capture_method: str, rank: int | None = None) -> NodeOrigin:
    """The group, kind and scope of ``node``: from the exporter's metadata (the ATen op it was
    translated from, or the torch.nn leaf module fx sees), else from its op type
    (:func:`autoprec.core.kinds.onnx_kind`; ``rank``: its kernel's or data operand's, where known)."""
    scopes = literal_list(get_meta(node, NAME_SCOPES))
    classes = literal_list(get_meta(node, CLASS_HIERARCHY))
    if not scopes:
        return NodeOrigin(f"onnx:{node.name}", onnx_kind(node.op_type, node.domain, rank), "")
    group = scopes[-1]
    scope = scopes[-2] if len(scopes) >= 2 else ""
    transposed = node.op_type == "ConvTranspose" and node.domain in ("", "ai.onnx")
    kind = aten_kind(classes[-1], rank, transposed) if classes else onnx_kind(node.op_type, node.domain, rank)
    if capture_method == "fx" and len(classes) == len(scopes):
        # the outermost torch.nn leaf module below the root is one call_module node to fx
        for i in range(1, len(classes) - 1):
            if _is_leaf_module(classes[i]):
                qual = classes[i]
                kind = torch_module_kind(qual) or f"module:{qual.rsplit('.', 1)[-1]}"
                scope = scopes[i]
                break
    if scope.startswith("_empty_nn_module_stack"):
        scope = ""
    return NodeOrigin(group, kind, scope)


def _ranks(g: onnx.GraphProto) -> dict[str, int]:
    """The rank of every value of ``g`` whose shape is known (initializers, inputs, value_info)."""
    ranks = {t.name: len(t.dims) for t in g.initializer}
    for v in list(g.input) + list(g.value_info) + list(g.output):
        if v.type.HasField("tensor_type") and v.type.tensor_type.HasField("shape"):
            ranks.setdefault(v.name, len(v.type.tensor_type.shape.dim))
    return ranks


def annotate_groups(model: onnx.ModelProto, capture_method: str) -> dict[str, list[int]]:
    """Write GROUP, KIND and SCOPE on every node; return group id -> node indices (graph order)."""
    groups: dict[str, list[int]] = {}
    ranks = _ranks(model.graph)
    for i, n in enumerate(model.graph.node):
        # a Conv's kernel (input 1) has its input's rank; a pool has only its input
        rank = next((ranks[v] for v in n.input[1::-1] if v in ranks), None)
        o = node_origin(n, capture_method, rank)
        set_meta(n, GROUP, o.group)
        set_meta(n, KIND, o.kind)
        set_meta(n, SCOPE, o.scope)
        groups.setdefault(o.group, []).append(i)
    return groups


@dataclass(frozen=True)
class LayerMatch:
    """A plan layer and the ONNX group that computes it."""

    layer: str
    group: str
    core: str  # name of the MatMul/Gemm/Conv/ConvTranspose/Gather node
    weight: str | None  # initializer holding the weight, for linear/conv/embedding layers
    weight_transposed: bool  # the initializer is the torch weight transposed (MatMul, Gemm transB=0)


def _core_node(idx: GraphIndex, members: list[int], cls: str) -> tuple[onnx.NodeProto | None, str]:
    wanted = CORE_OPS[cls]
    cores = [idx.nodes[i] for i in members if idx.nodes[i].op_type in wanted and idx.nodes[i].domain in ("", "ai.onnx")]
    if len(cores) == 1:
        return cores[0], ""
    ops = ", ".join(idx.nodes[i].op_type for i in members)
    return None, f"its ONNX nodes ({ops}) hold {len(cores)} {'/'.join(sorted(wanted))} nodes, not one"


def _torch_weight(captured: Captured, target: str) -> np.ndarray:
    obj = captured.gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj.detach().cpu().float().numpy()


def match_layers(model: onnx.ModelProto, captured: Captured,
                 groups: Mapping[str, list[int]]) -> tuple[dict[str, LayerMatch], dict[str, str]]:
    """Pair captured layers with ONNX groups. Returns (matches by layer, reason by unmatched layer)."""
    idx = GraphIndex(model)
    onnx_buckets: dict[tuple[str, str], list[str]] = {}
    for gid, members in sorted(groups.items(), key=lambda kv: kv[1][0]):
        first = idx.nodes[members[0]]
        cls = layer_class(get_meta(first, KIND) or "")
        if cls is not None and any(idx.nodes[i].op_type in CORE_OPS[cls] for i in members):
            onnx_buckets.setdefault((get_meta(first, SCOPE) or "", cls), []).append(gid)
    torch_buckets: dict[tuple[str, str], list[str]] = {}
    for op in captured.graph.layers():
        cls = layer_class(op.kind)
        if cls is not None:
            torch_buckets.setdefault((op.scope, cls), []).append(op.name)
    matches: dict[str, LayerMatch] = {}
    problems: dict[str, str] = {}
    for key, layers in torch_buckets.items():
        scope, cls = key
        found = onnx_buckets.get(key, [])
        if len(found) != len(layers):
            for name in layers:
                problems[name] = (f"scope '{scope}' has {len(layers)} {cls} layer(s) in the captured model but "
                                  f"{len(found)} in the exported ONNX graph")
            continue
        for name, gid in zip(layers, found):
            core, why = _core_node(idx, groups[gid], cls)
            if core is None:
                problems[name] = why
                continue
            op = captured.graph[name]
            weight, transposed = (None, False)
            if weight_arg_position(op.kind) is not None:
                read = weight_read(idx, core)
                if read is None:
                    problems[name] = f"its ONNX {core.op_type} node {core.name} reads no weight initializer"
                    continue
                weight, transposed = read.initializer, read.transposed
                if op.weight is not None:
                    w = idx.array(weight).astype(np.float32)
                    w = w.T if transposed else w
                    ref = _torch_weight(captured, op.weight)
                    if w.shape != ref.shape or not np.array_equal(w, ref):
                        problems[name] = (f"ONNX node {core.name} in the same scope reads weight {weight} "
                                          f"{list(idx.inits[weight].dims)}, which is not {op.weight}")
                        continue
            matches[name] = LayerMatch(name, gid, core.name, weight, transposed)
    for op in captured.graph.layers():
        if op.name not in matches and op.name not in problems:
            problems[op.name] = f"kind {op.kind} has no ONNX counterpart"
    return matches, problems


class MapLayers(OnnxPass):
    """Annotate groups and pair the plan's layers with ONNX nodes (one-to-one, weights checked)."""

    def __init__(self, captured: Captured, assignment: Mapping[str, Precision]) -> None:
        self.captured = captured
        self.assignment = dict(assignment)
        self.matches: dict[str, LayerMatch] = {}
        self.unmatched: dict[str, str] = {}

    def call(self, model: onnx.ModelProto) -> PassResult:
        groups = annotate_groups(model, self.captured.method)
        self.matches, self.unmatched = match_layers(model, self.captured, groups)
        needed = sorted(n for n, f in self.assignment.items() if f is not Precision.FP32 and n in self.unmatched)
        if needed:
            detail = "; ".join(f"{n}: {self.unmatched[n]}" for n in needed[:6])
            raise PlanError(f"cannot map plan layer(s) {', '.join(needed)} onto the exported ONNX graph ({detail}); "
                            "keep them in fp32 or report the model")
        for name in sorted(self.unmatched):
            log.info("layer %s stays fp32 in ONNX: %s", name, self.unmatched[name])
        by_group = {m.group: m for m in self.matches.values()}
        for n in model.graph.node:
            m = by_group.get(get_meta(n, GROUP) or "")
            if m is not None:
                mark_layer(n, m.layer, n.name == m.core)
        return PassResult(model, modified=False)  # metadata only

    def ensures(self, model: onnx.ModelProto) -> None:
        super().ensures(model)
        cores: dict[str, int] = {}
        for n in model.graph.node:
            if get_meta(n, GROUP) is None or get_meta(n, KIND) is None:
                raise PassError(f"{self.name}: node {n.name} has no group")
            if get_meta(n, ROLE) == ROLE_CORE:
                layer = get_meta(n, LAYER) or ""
                cores[layer] = cores.get(layer, 0) + 1
        for name in self.matches:
            if cores.get(name) != 1:
                raise PassError(f"{self.name}: layer {name} has {cores.get(name, 0)} core nodes")
        if set(cores) - set(self.matches):
            raise PassError(f"{self.name}: core nodes for unknown layers {sorted(set(cores) - set(self.matches))}")
