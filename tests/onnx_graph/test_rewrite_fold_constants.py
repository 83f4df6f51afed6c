"""Constant folding (autoprec.onnx.rewrites.fold_constants): what folds and what stays, bit-exact numerics, validity."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
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


def _zoo_style_conv() -> onnx.ModelProto:
    """A Conv as the Caffe2 exporter of the onnx wheel's ``light_*.onnx`` graphs writes it (IR 3,
    opset 9): its weight made at run time by ConstantOfShape of a shape initializer, scaled by a
    Mul of a constant; its bias the Reshape of a Constant node."""
    n = helper.make_node
    value = helper.make_tensor("v", TensorProto.FLOAT, [1], [0.3])
    nodes = [n("ConstantOfShape", ["w_shape"], ["w_fill"], value=value),
             n("Mul", ["w_fill", "w_scale"], ["w"]),
             n("Constant", [], ["b_flat"], value=helper.make_tensor("b", TensorProto.FLOAT, [1, 4], [1.0, -2.0, 0.5, 3.0])),
             n("Reshape", ["b_flat", "b_shape"], ["b"]),
             n("Conv", ["x", "w", "b"], ["y"], pads=[1, 1, 1, 1])]
    inits = [init("w_shape", np.array([4, 3, 3, 3])), init("w_scale", np.array([0.7], np.float32)),
             init("b_shape", np.array([4]))]
    inputs = [vi("x", [1, 3, 5, 5]), vi("w_shape", [4], TensorProto.INT64), vi("w_scale", [1]),
              vi("b_shape", [1], TensorProto.INT64)]
    return make(nodes, inputs, [vi("y", [1, 4, 5, 5])], inits, opset=9, ir=3)


def test_a_conv_weight_made_by_constant_of_shape_and_mul_becomes_an_initializer() -> None:
    source = _zoo_style_conv()
    model = _copy(source)
    assert fold_constants(model) == 4
    assert ops(model) == ["Conv"]
    conv = model.graph.node[0]
    inits = {t.name: t for t in model.graph.initializer}
    assert list(conv.input[1:]) == ["w", "b"] and set(inits) == {"w", "b"}  # what the analyser takes as a layer
    assert list(inits["w"].dims) == [4, 3, 3, 3] and list(inits["b"].dims) == [4]
    assert [i.name for i in model.graph.input] == ["x", "w", "b"]  # IR 3 lists the initializers among the inputs
    x = np.random.default_rng(7).standard_normal((1, 3, 5, 5)).astype(np.float32)
    assert_same_outputs(source, model, {"x": x})  # bit for bit: 0.3f * 0.7f rounds as ONNX Runtime rounds it
    onnx.checker.check_model(model, full_check=True)


def test_the_analyser_takes_a_zoo_style_conv_as_a_layer() -> None:
    from autoprec.onnx.graph import analyse_onnx

    analysis = analyse_onnx(_zoo_style_conv())
    assert [(op.kind, analysis.op_types[op.name]) for op in analysis.graph.layers()] == [("conv2d", "Conv")]
    assert not analysis.reasons


def _filled(shape: list[int], reader: str) -> onnx.ModelProto:
    """x + ConstantOfShape(shape) read by ``reader``: an Add (a fill value), or a MatMul (a weight)."""
    n = helper.make_node
    value = helper.make_tensor("v", TensorProto.FLOAT, [1], [0.5])
    nodes = [n("ConstantOfShape", ["shape"], ["c"], value=value), n(reader, ["x", "c"], ["y"])]
    out = shape if reader == "Add" else [shape[0], shape[1]]
    return make(nodes, [vi("x", shape)], [vi("y", out)], [init("shape", np.array(shape))], opset=21, ir=10)


@pytest.mark.parametrize("shape, reader, folds", [
    ([4, 8], "Add", True),  # small: a constant like any other
    ([600, 500], "Add", False),  # larger than the library's limit and no weight: kept, the file stays small
    ([600, 600], "MatMul", True),  # a weight folds whatever its size
])
def test_a_constant_of_shape_folds_when_small_or_a_weight(shape: list[int], reader: str, folds: bool) -> None:
    source = _filled(shape, reader)
    model = _copy(source)
    assert fold_constants(model) == int(folds)
    assert ops(model) == ([reader] if folds else ["ConstantOfShape", reader])
    x = np.random.default_rng(8).standard_normal(shape).astype(np.float32)
    assert_same_outputs(source, model, {"x": x})
    onnx.checker.check_model(model, full_check=True)


def test_integer_division_and_inexact_arithmetic_stay() -> None:
    """ONNX's integer Div truncates where numpy's floors, and Exp is not correctly rounded: both
    are left to run time; the exact float Div and Sub fold."""
    n = helper.make_node
    nodes = [n("Div", ["i", "j"], ["q"]), n("Cast", ["q"], ["qf"], to=TensorProto.FLOAT),
             n("Exp", ["c"], ["e"]), n("Div", ["c", "d"], ["cd"]), n("Sub", ["cd", "c"], ["s"]),
             n("Add", ["x", "qf"], ["h1"]), n("Add", ["h1", "e"], ["h2"]), n("Add", ["h2", "s"], ["y"])]
    inits = [init("i", np.array([-7, 7], np.int64)), init("j", np.array([2, 2], np.int64)),
             init("c", np.array([0.1, 3.0], np.float32)), init("d", np.array([3.0, 7.0], np.float32))]
    source = make(nodes, [vi("x", [2])], [vi("y", [2])], inits, opset=21, ir=10)
    model = _copy(source)
    assert fold_constants(model) == 2
    assert ops(model) == ["Div", "Cast", "Exp", "Add", "Add", "Add"]
    assert_same_outputs(source, model, {"x": np.array([1.0, 2.0], np.float32)})
    onnx.checker.check_model(model, full_check=True)
