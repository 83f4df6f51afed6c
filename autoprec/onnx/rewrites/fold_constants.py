"""Constant folding of an ONNX input: Constant nodes, and nodes moving or converting constants, become initializers.

Why: a layer is a product whose weight is an initializer it reads directly. Older exporters write
weights as ``Constant`` nodes, or store them transposed behind a ``Transpose`` (as torch stores
``nn.Linear``), or cast and reshape them at run time; folded, such a weight is one initializer the
MatMul reads, and the plan can lower it.

Some exporters (Caffe2's, in the model-zoo graphs the onnx wheel ships as ``light_*.onnx``) make
the weights at run time: ``ConstantOfShape`` of a shape initializer, perhaps scaled by a ``Mul``. A
Conv reading such a value is not a layer (its weight is no initializer), so nothing in the model
could be tuned; folded, every Conv and Gemm of those graphs is one.

The folder is onnxscript's (:func:`onnxscript.optimizer.fold_constants`, the one
:mod:`autoprec.deploy.export` folds the torch export with), followed by onnx_ir's dead-node removal and
constant lifting. ``should_fold`` restricts it to ops whose value numpy computes bit for bit as ONNX
Runtime does: ops that compute nothing (:data:`DATA_MOVEMENT`, and casts numpy rounds exactly as
ONNX Runtime does), ops that make constants (:data:`CONSTANT_MAKERS`) and correctly rounded
elementwise arithmetic (:data:`EXACT_ARITHMETIC`). The folded model computes the same numbers bit for
bit, and nothing a plan could lower (an embedding lookup, a product of constants) disappears into a
constant. A node whose result is larger than its largest input (a ``ConstantOfShape``, a broadcast)
folds when that result reaches a layer's weight or bias, whatever its size, and otherwise only up to
the library's default output size, so that folding a mask or a fill value does not swell the files
autoprec writes. The folder's op-specific simplifications apply too, whatever
``should_fold`` says: no-ops are bypassed (an Identity, a Cast or CastLike to the same type, a
Reshape, Expand or one-input Concat that changes nothing, an inference Dropout), shape arithmetic on
static shapes becomes constants, an If on a constant condition becomes its branch; then nodes and
initializers nothing reads are removed.
"""

from __future__ import annotations

import sys
from typing import Iterable

import numpy as np
import onnx
import onnx_ir as ir
import onnxscript.optimizer
from onnx_ir.passes.common import LiftConstantsToInitializersPass, RemoveUnusedNodesPass

from autoprec.onnx.rewrites.base import Rewrite, RewriteResult, apply_to_proto, node_names, restore_node_names

#: Ops folded when all their inputs are constants: they move or convert data and compute nothing.
DATA_MOVEMENT = frozenset({"Identity", "Cast", "Transpose", "Reshape", "Squeeze", "Unsqueeze", "Flatten",
                           "Concat", "Slice", "Expand", "Tile"})

#: Ops that make a constant from their attributes and constant shapes.
CONSTANT_MAKERS = frozenset({"ConstantOfShape"})

#: Elementwise ops IEEE 754 rounds correctly, so numpy's result is ONNX Runtime's, bit for bit.
EXACT_ARITHMETIC = frozenset({"Add", "Sub", "Mul", "Div", "Neg", "Abs"})

#: Element types :data:`EXACT_ARITHMETIC` folds: floats numpy rounds as ONNX Runtime does (fp16 by
#: way of fp32, which rounds the four operations correctly too); integers, where ONNX's Div
#: truncates and numpy's floors, for all but Div.
ARITHMETIC_TYPES = frozenset({ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.DOUBLE})
INTEGER_TYPES = frozenset({ir.DataType.INT32, ir.DataType.INT64})

#: Cast targets folded: numpy rounds to them as ONNX Runtime does (bf16 and fp8 are left to run time).
EXACT_CASTS = frozenset({ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.DOUBLE})

#: (op type, input slot) of the constants a layer lowers: weights and biases of products and
#: convolutions, embedding tables (:func:`autoprec.onnx.graph.build_opgraph`'s layers).
WEIGHT_SLOTS = frozenset({("MatMul", 0), ("MatMul", 1), ("Gemm", 0), ("Gemm", 1), ("Gemm", 2), ("Conv", 1),
                          ("Conv", 2), ("ConvTranspose", 1), ("ConvTranspose", 2), ("Gather", 0)})

#: Elements a growing result may have when it reaches no weight: the folder's own default limit.
GROWTH_LIMIT = onnxscript.optimizer.constant_folding.DEFAULT_CONSTANT_FOLD_OUTPUT_SIZE_LIMIT


def _foldable_op(node: ir.Node) -> bool:
    """Whether the folder may evaluate ``node`` when its inputs are constants (types aside)."""
    return (node.domain in ("", "ai.onnx") and len(node.outputs) == 1
            and node.op_type in DATA_MOVEMENT | CONSTANT_MAKERS | EXACT_ARITHMETIC)


def _exact(node: ir.Node) -> bool:
    """Whether numpy computes ``node`` exactly as ONNX Runtime does (its inputs are constants)."""
    dtypes = [v.dtype for v in node.inputs if v is not None]
    if node.op_type == "Cast":
        to = node.attributes.get_int("to")
        return (to is not None and ir.DataType(to) in EXACT_CASTS and dtypes[0] is not None
                and (dtypes[0].is_floating_point() or dtypes[0].is_integer()))
    if node.op_type in EXACT_ARITHMETIC:
        allowed = ARITHMETIC_TYPES if node.op_type == "Div" else ARITHMETIC_TYPES | INTEGER_TYPES
        return all(d in allowed for d in dtypes)
    return True


def _elements(shape: Iterable[int]) -> int:
    return int(np.prod(list(shape), dtype=np.int64))


def _result_elements(node: ir.Node) -> int | None:
    """Elements of ``node``'s result where it can exceed its largest input's (None: it cannot, or
    the shapes do not say)."""
    arrays = [v.const_value.numpy() if v is not None and v.const_value is not None else None for v in node.inputs]
    if node.op_type == "ConstantOfShape":
        return _elements(arrays[0]) if arrays and arrays[0] is not None else None
    if any(a is None for a in arrays):
        return None
    try:
        if node.op_type == "Expand":
            return _elements(np.broadcast_shapes(arrays[0].shape, tuple(int(d) for d in arrays[1])))
        if node.op_type == "Tile":
            return _elements(arrays[0].shape) * _elements(arrays[1])
        if node.op_type in EXACT_ARITHMETIC:
            return _elements(np.broadcast_shapes(*(a.shape for a in arrays)))
    except ValueError:  # shapes that do not broadcast: ONNX Runtime's error, not the folder's
        return None
    return None


def _reaches_weight(value: ir.Value, depth: int = 16) -> bool:
    """Whether ``value`` is read as a layer's weight or bias (:data:`WEIGHT_SLOTS`), directly or
    through ops the folder may evaluate."""
    for use in value.uses():
        node = use.node
        if (node.op_type, use.idx) in WEIGHT_SLOTS and node.domain in ("", "ai.onnx"):
            return True
        if depth and _foldable_op(node) and _reaches_weight(node.outputs[0], depth - 1):
            return True
    return False


def should_fold(node: ir.Node) -> bool:
    """The folder's veto (it asks only about nodes whose inputs are all constants): fold what
    numpy computes exactly (see the module docstring), no node that writes a graph output (the
    output keeps its producer), and a result larger than the node's inputs only when it reaches a
    layer's weight or is small."""
    if not _foldable_op(node) or node.outputs[0].is_graph_output() or not _exact(node):
        return False
    grown = _result_elements(node)
    largest = max((_elements(v.const_value.shape) for v in node.inputs if v is not None and v.const_value is not None),
                  default=0)
    if node.op_type in CONSTANT_MAKERS or (grown is not None and grown > largest):
        return (grown is not None and grown <= GROWTH_LIMIT) or _reaches_weight(node.outputs[0])
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
        # no size limits: should_fold judges sizes itself, knowing which constants are weights
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


def fold_splits(graph: ir.Graph) -> None:
    """A ``Split`` of a stored tensor becomes one initializer per part.

    nn.MultiheadAttention cuts its packed projection into the query's and the key/value's weights
    when query and key differ; folded, each part is the initializer its MatMul reads, as the capture
    reads it (:func:`autoprec.torch.capture._fold_weight_paths`). onnxscript's folder leaves ops with
    several outputs alone, and a Split only moves data, so numpy's split is exact. Parts are views
    of the stored tensor's array until serialised."""
    for node in list(graph):
        if node.op_type != "Split" or node.domain != "" or node.inputs[0] is None \
                or node.inputs[0].const_value is None:
            continue
        sizes_in = node.inputs[1] if len(node.inputs) > 1 else None
        if sizes_in is not None and sizes_in.const_value is None:
            continue
        data = node.inputs[0].const_value.numpy()
        axis = node.attributes.get_int("axis", 0) % data.ndim
        n = len(node.outputs)
        if sizes_in is not None:
            sizes = [int(v) for v in sizes_in.const_value.numpy().reshape(-1)]
        else:  # num_outputs: equal parts, the last one smaller
            step = -(-data.shape[axis] // n)
            sizes = [min(step, data.shape[axis] - i * step) for i in range(n)]
        parts = np.split(data, np.cumsum(sizes)[:-1], axis=axis)
        for out, part in zip(node.outputs, parts):
            value = ir.Value(name=f"{out.name}_folded", const_value=ir.tensor(np.ascontiguousarray(part)))
            graph.register_initializer(value)
            ir.convenience.replace_all_uses_with(out, value)
