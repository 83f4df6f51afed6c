"""Local-function inlining (autoprec.onnx.rewrites.inline_functions): the calls become their bodies, bit-exact, valid."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import helper
from onnx_graph_models import assert_same_outputs, init, ops, vi

from autoprec.core.errors import CaptureError
from autoprec.onnx.rewrites.base import apply_to_proto
from autoprec.onnx.rewrites.inline_functions import InlineFunctions

OPSETS = [helper.make_opsetid("", 21), helper.make_opsetid("local", 1)]


def _model(nodes: list[onnx.NodeProto], functions: list[onnx.FunctionProto], inits: list[onnx.TensorProto] = ()) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", [vi("x", ["N", 4])], [vi("y", ["N", 4])], list(inits))
    return helper.make_model(graph, opset_imports=OPSETS, functions=functions, ir_version=10)


def _modules() -> onnx.ModelProto:
    """One call of Block, a local function calling Affine (MatMul + Relu) twice, as torch writes
    modules with export_modules_as_functions=True."""
    affine = helper.make_function("local", "Affine", ["a", "w"], ["b"], [
        helper.make_node("MatMul", ["a", "w"], ["m"], name="mm"), helper.make_node("Relu", ["m"], ["b"], name="act")],
        OPSETS[:1])
    block = helper.make_function("local", "Block", ["x", "w1", "w2"], ["y"], [
        helper.make_node("Affine", ["x", "w1"], ["h"], domain="local", name="l1"),
        helper.make_node("Affine", ["h", "w2"], ["y"], domain="local", name="l2")], OPSETS)
    rng = np.random.default_rng(0)
    return _model([helper.make_node("Block", ["x", "w1", "w2"], ["y"], domain="local", name="block")], [affine, block],
                  [init("w1", rng.standard_normal((4, 4)).astype(np.float32)),
                   init("w2", rng.standard_normal((4, 4)).astype(np.float32))])


def test_nested_function_calls_become_the_nodes_of_their_bodies() -> None:
    source = _modules()
    model = onnx.ModelProto()
    model.CopyFrom(source)
    assert apply_to_proto(InlineFunctions(), model).count == 2
    assert not model.functions
    assert ops(model) == ["MatMul", "Relu", "MatMul", "Relu"]
    assert [n.name for n in model.graph.node] == ["mm", "act", "mm_2", "act_2"]  # the bodies' names, made unique
    x = np.random.default_rng(1).standard_normal((3, 4)).astype(np.float32)
    assert_same_outputs(source, model, {"x": x})
    onnx.checker.check_model(model, full_check=True)


def test_a_model_without_functions_is_left_alone() -> None:
    model = _model([helper.make_node("Relu", ["x"], ["y"])], [])
    result = InlineFunctions()(ir.serde.deserialize_model(model))
    assert (result.count, result.modified) == (0, False)


def test_a_recursive_function_is_a_one_line_error() -> None:
    loop = helper.make_function("local", "Again", ["a"], ["b"], [helper.make_node("Again", ["a"], ["b"], domain="local")],
                                OPSETS)
    model = _model([helper.make_node("Again", ["x"], ["y"], domain="local")], [loop])
    with pytest.raises(CaptureError, match=r"cannot inline the model's 1 local function\(s\): Cyclic dependency") as err:
        apply_to_proto(InlineFunctions(), model)
    assert "\n" not in str(err.value)
