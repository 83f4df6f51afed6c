"""Constant folding of an ONNX input: Constant nodes, and nodes moving or converting constants, become initializers.

Why: a layer is a product whose weight is an initializer it reads directly. Older exporters write
weights as ``Constant`` nodes, or store them transposed behind a ``Transpose`` (as torch stores
``nn.Linear``), or cast and reshape them at run time; folded, such a weight is one initializer the
MatMul reads, and the plan can lower it.

The folder is onnxscript's (:func:`onnxscript.optimizer.fold_constants`, the one
:mod:`autoprec.deploy.export` folds the torch export with), followed by onnx_ir's dead-node removal and
constant lifting. ``should_fold`` restricts it to ops that compute nothing (:data:`DATA_MOVEMENT`,
and casts numpy rounds exactly as ONNX Runtime does), of any size: the folded model computes the
same numbers bit for bit, and nothing a plan could lower (an embedding lookup, a product of
constants) disappears into a constant. The folder's op-specific simplifications apply too, whatever
``should_fold`` says: no-ops are bypassed (an Identity, a Cast or CastLike to the same type, a
Reshape, Expand or one-input Concat that changes nothing, an inference Dropout), shape arithmetic on
static shapes becomes constants, an If on a constant condition becomes its branch; then nodes and
initializers nothing reads are removed.
"""

from __future__ import annotations

import sys

import onnx
import onnx_ir as ir
import onnxscript.optimizer
from onnx_ir.passes.common import LiftConstantsToInitializersPass, RemoveUnusedNodesPass

from autoprec.onnx.rewrites.base import Rewrite, RewriteResult, apply_to_proto, node_names, restore_node_names

#: Ops folded when all their inputs are constants: they move or convert data and compute nothing.
DATA_MOVEMENT = frozenset({"Identity", "Cast", "Transpose", "Reshape", "Squeeze", "Unsqueeze", "Flatten"})

#: Cast targets folded: numpy rounds to them as ONNX Runtime does (bf16 and fp8 are left to run time).
EXACT_CASTS = frozenset({ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.DOUBLE})


def should_fold(node: ir.Node) -> bool:
    """The folder's veto (it asks only about nodes whose inputs are all constants): fold data
    movement and exact casts whatever their size, nothing else, and no node that writes a graph
    output (the output keeps its producer)."""
    if node.domain not in ("", "ai.onnx") or node.op_type not in DATA_MOVEMENT or len(node.outputs) != 1:
        return False
    if node.outputs[0].is_graph_output():
        return False
    if node.op_type == "Cast":
        source = node.inputs[0]
        to = node.attributes.get_int("to")
        dtype = source.dtype if source is not None else None
        return (to is not None and ir.DataType(to) in EXACT_CASTS and dtype is not None
                and (dtype.is_floating_point() or dtype.is_integer()))
    return True


class FoldConstants(Rewrite):
    """Fold the model's constants (see the module docstring); the result counts the top-level
    nodes that are gone."""

    def call(self, model: ir.Model) -> RewriteResult:
        graph = model.graph
        names = node_names(model)
        inputs = list(graph.inputs)
        # IR < 4 lists the initializers among the inputs too, and the folder does not fold a node
        # that reads a graph input; they are weights, so they are off the list while it folds
        weights = {v for v in inputs if v.is_initializer()}
        graph.inputs[:] = [v for v in inputs if v not in weights]
        before = len(graph)
        # no size limits: should_fold admits only ops whose result is the size of their input
        modified = onnxscript.optimizer.fold_constants(model, input_size_limit=sys.maxsize,
                                                       output_size_limit=sys.maxsize, should_fold=should_fold).modified
        modified |= RemoveUnusedNodesPass()(model).modified
        modified |= LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(model).modified
        restore_node_names(model, names, blank_new=True)  # name_nodes names what the folder made
        graph.inputs[:] = [v for v in inputs if v not in weights or v.is_initializer()]  # the weights still there
        if model.ir_version < 4:  # where every initializer must be listed, the new ones too
            graph.inputs.extend(v for v in graph.initializers.values() if v not in weights)
        return RewriteResult(model, modified, before - len(graph))


def fold_constants(model: onnx.ModelProto) -> int:
    """Fold ``model``'s constants in place (:class:`FoldConstants`); returns how many top-level
    nodes are gone."""
    return apply_to_proto(FoldConstants(), model).count
