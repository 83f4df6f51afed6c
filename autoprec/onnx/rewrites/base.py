"""What the preprocessing rewrites share: a result that counts, ModelProto entry, node names, the fusions' helpers.

The analyser's notes say how many nodes each rewrite changed, which an onnx_ir
:class:`~onnx_ir.passes.PassResult` does not carry; callers that hold a ``ModelProto`` (the torch
export, tests) apply a single rewrite without handling onnx_ir themselves; onnxscript's passes rename
nodes the analyser names itself; and the two fusions (:mod:`.erf_gelu`, :mod:`.layer_norm`) read
constants, stay in the main graph and name the fused node by the same rules.
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Iterable, Mapping

import numpy as np
import onnx
import onnx_ir as ir
from onnxscript.rewriter import MatchContext, RewriteRuleSet


@dataclasses.dataclass
class RewriteResult(ir.passes.PassResult):
    """An onnx_ir pass result with ``count``: how many rewrites the pass made (for the notes)."""

    count: int = 0


class Rewrite(ir.passes.InPlacePass):
    """An in-place onnx_ir pass whose result is a :class:`RewriteResult`."""

    def __call__(self, model: ir.Model) -> RewriteResult:
        result = super().__call__(model)
        assert isinstance(result, RewriteResult)
        return result

    @abc.abstractmethod
    def call(self, model: ir.Model) -> RewriteResult: ...


def apply_to_proto(rewrite: Rewrite, model: onnx.ModelProto) -> RewriteResult:
    """Run ``rewrite`` on ``model`` in place (through onnx_ir) and return its result. An unchanged
    model is left as it is: copying the result in would keep a second copy of every weight in the
    model's protobuf arena (see :func:`autoprec.onnx.passes.base.compacted`)."""
    ir_model = ir.serde.deserialize_model(model)
    result = rewrite(ir_model)
    if result.modified:
        model.CopyFrom(ir.serde.serialize_model(ir_model))
    return result


def drop_initializers(graph: ir.Graph, values: Iterable[ir.Value]) -> None:
    """Remove the initializers among ``values`` that nothing reads any more, from the graph's
    initializers and, where an old IR lists them there too, from its inputs."""
    for value in values:
        if value.is_initializer() and not value.uses() and not value.is_graph_output() and value.graph is graph:
            assert value.name is not None
            graph.initializers.pop(value.name)
            if value in graph.inputs:
                graph.inputs.remove(value)


def onnx_opset(model: ir.Model) -> int:
    """The model's ai.onnx opset version (0 when it imports none)."""
    return max(model.opset_imports.get("", 0), model.opset_imports.get("ai.onnx", 0))


def constant(value: ir.Value | None) -> np.ndarray | None:
    """The value of an initializer; None for any other value (the rewrites after constant folding
    find every constant as an initializer)."""
    if value is None or not value.is_initializer() or value.const_value is None:
        return None
    return value.const_value.numpy()


def scalar(value: ir.Value | None) -> float | None:
    """The number a one-element initializer holds; None for any other value."""
    array = constant(value)
    return float(array.reshape(-1)[0]) if array is not None and array.size == 1 else None


def on_main_graph(context: MatchContext) -> bool:
    """Whether a match is in the main graph: the fusions leave control-flow bodies as they are,
    since later passes rewrite top-level nodes only."""
    return context.graph_or_function is context.model.graph


def fused_name(node: ir.Node, op_type: str) -> str:
    """The name of the ``op_type`` node that replaces a group named by ``node`` (a node of the main
    graph): its name with its op type's last mention swapped ("/ln/ReduceMean" ->
    "/ln/LayerNormalization"), else (no mention, or taken by another node or a graph input) its
    name as it is, which the replaced node frees."""
    name = node.name or ""
    new = op_type.join(name.rsplit(node.op_type, 1))
    graph = node.graph
    assert isinstance(graph, ir.Graph)
    taken = {n.name for n in graph} | {v.name for v in graph.inputs}
    return new if node.op_type in name and new not in taken else name


def node_names(model: ir.Model) -> dict[ir.Node, str]:
    """Every node's name, subgraphs included, for :func:`restore_node_names`."""
    return {node: node.name or "" for node in ir.traversal.RecursiveGraphIterator(model.graph)}


def restore_node_names(model: ir.Model, names: Mapping[ir.Node, str], blank_new: bool) -> None:
    """Put back the node names recorded by :func:`node_names` before an onnxscript pass: its last
    step, onnx_ir's NameFixPass, names every unnamed node ``node_<k>``, and node names are the
    analyser's (:mod:`.name_nodes` names them by position). Nodes the pass created keep their
    names, or lose them with ``blank_new``."""
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        if node in names or blank_new:
            node.name = names.get(node, "")


def apply_rules(rules: RewriteRuleSet, model: ir.Model) -> RewriteResult:
    """Apply onnxscript rewrite ``rules`` to ``model``, keep the other nodes' names, and drop the
    initializers only the replaced nodes read (the rewriter leaves them); the result counts the
    rewrites."""
    read = [v for v in model.graph.initializers.values() if v.uses()]
    names = node_names(model)
    count = rules.apply_to_model(model)
    restore_node_names(model, names, blank_new=False)
    drop_initializers(model.graph, read)
    return RewriteResult(model, bool(count), count)
