"""Constant folding (autoprec.onnx.rewrites.fold_constants): what folds and what stays, bit-exact numerics, validity."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, version_converter
from onnx_graph_models import assert_same_outputs, init, make, mlp_opset13, ops, vi

from autoprec.onnx.rewrites.fold_constants import fold_constants

BF16 = TensorProto.BFLOAT16


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


def test_a_constant_weight_stored_transposed_becomes_one_initializer() -> None:
    source = version_converter.convert_version(mlp_opset13(), 21)
    model = _copy(source)
    assert fold_constants(model) == 2  # the Constant and the Transpose
    assert ops(model) == ["MatMul", "Relu", "Gemm"]
    inits = {t.name: t for t in model.graph.initializer}
    assert list(inits["w_t"].dims) == [8, 4] and "w" not in inits
    assert [n.name for n in model.graph.node] == ["", "", ""]  # naming is name_nodes' business
    x = np.random.default_rng(0).standard_normal((5, 8)).astype(np.float32)
    assert_same_outputs(source, model, {"x": x})
    onnx.checker.check_model(model, full_check=True)


def _movement_and_arithmetic() -> onnx.ModelProto:
    """x[N,6] through every data-movement op over constants (which fold) and what must stay: a bf16
    rounding of a constant, an embedding lookup, a product of constants, a node writing a graph
    output, and the nodes over the activation."""
    rng = np.random.default_rng(1)
    n = helper.make_node
    nodes = [
        n("Cast", ["w16"], ["w32"], to=TensorProto.FLOAT),  # an fp16 weight used in fp32: folds
        n("Unsqueeze", ["w32", "axis0"], ["w_un"]),
        n("Squeeze", ["w_un", "axis0"], ["w_sq"]),
        n("Flatten", ["w_sq"], ["w_flat"], axis=0),
        n("Reshape", ["w_flat", "shape"], ["w2d"]),
        n("Identity", ["w2d"], ["w"]),
        n("MatMul", ["x", "w"], ["h"]),
        n("Cast", ["bias"], ["bias_b"], to=BF16),  # stays: bf16 rounding is left to run time
        n("Cast", ["bias_b"], ["bias_r"], to=TensorProto.FLOAT),
        n("Add", ["h", "bias_r"], ["hb"]),
        n("Gather", ["table", "positions"], ["rows"], axis=0),  # stays: an embedding lookup is a layer
        n("MatMul", ["ca", "cb"], ["cc"]),  # stays: arithmetic is not folded
        n("Add", ["hb", "rows"], ["s"]),
        n("Add", ["s", "cc"], ["y"]),
        n("Transpose", ["table"], ["table_t"], perm=[1, 0]),  # stays: it writes a graph output
    ]
    inits = [init("w16", rng.standard_normal((6, 6)).astype(np.float16)), init("shape", np.array([6, 6])),
             init("axis0", np.array([0])), init("bias", rng.standard_normal(6).astype(np.float32)),
             init("table", rng.standard_normal((4, 6)).astype(np.float32)), init("positions", np.array([1, 2, 3])),
             init("ca", rng.standard_normal((3, 2)).astype(np.float32)),
             init("cb", rng.standard_normal((2, 6)).astype(np.float32))]
    return make(nodes, [vi("x", [3, 6])], [vi("y", [3, 6]), vi("table_t", [6, 4])], inits, opset=21, ir=10)


def test_data_movement_over_constants_folds_and_arithmetic_stays() -> None:
    source = _movement_and_arithmetic()
    model = _copy(source)
    assert fold_constants(model) == 6
    assert ops(model) == ["MatMul", "Cast", "Cast", "Add", "Gather", "MatMul", "Add", "Add", "Transpose"]
    matmul = model.graph.node[0]
    w = next(t for t in model.graph.initializer if t.name == matmul.input[1])
    assert w.name == "w" and w.data_type == TensorProto.FLOAT and list(w.dims) == [6, 6]
    assert not {"w16", "shape", "axis0", "w32"} & {t.name for t in model.graph.initializer}
    x = np.random.default_rng(2).standard_normal((3, 6)).astype(np.float32)
    assert_same_outputs(source, model, {"x": x})
    onnx.checker.check_model(model, full_check=True)


def test_a_large_weight_read_twice_folds_whatever_its_size() -> None:
    """The library folder's size limits (512 x 512 outputs that grow the model) do not apply: a
    weight both read directly and through a Transpose is kept and folded."""
    w = np.random.default_rng(3).standard_normal((600, 500)).astype(np.float32)
    nodes = [helper.make_node("Transpose", ["w"], ["w_t"], perm=[1, 0]),
             helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("MatMul", ["h", "w_t"], ["y"])]
    source = make(nodes, [vi("x", [2, 600])], [vi("y", [2, 600])], [init("w", w)], opset=21, ir=10)
    model = _copy(source)
    assert fold_constants(model) == 1 and ops(model) == ["MatMul", "MatMul"]
    assert {t.name for t in model.graph.initializer} == {"w", "w_t"}
    x = np.random.default_rng(4).standard_normal((2, 600)).astype(np.float32)
    assert_same_outputs(source, model, {"x": x})
    onnx.checker.check_model(model, full_check=True)


def test_weights_listed_as_graph_inputs_fold_and_stay_listed() -> None:
    """IR 3 lists every initializer among the graph inputs: a folded one goes from both, the new one
    is listed too."""
    w = np.random.default_rng(5).standard_normal((3, 4)).astype(np.float32)
    nodes = [helper.make_node("Transpose", ["w"], ["w_t"], perm=[1, 0]), helper.make_node("MatMul", ["x", "w_t"], ["y"])]
    source = make(nodes, [vi("x", [2, 4]), vi("w", [3, 4])], [vi("y", [2, 3])], [init("w", w)], opset=9, ir=3)
    model = _copy(source)
    assert fold_constants(model) == 1 and ops(model) == ["MatMul"]
    assert [i.name for i in model.graph.input] == ["x", "w_t"] and [t.name for t in model.graph.initializer] == ["w_t"]
    x = np.random.default_rng(6).standard_normal((2, 4)).astype(np.float32)
    assert_same_outputs(source, model, {"x": x})
    onnx.checker.check_model(model, full_check=True)
