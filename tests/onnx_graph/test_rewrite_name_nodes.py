"""Unique node names (autoprec.onnx.rewrites.name_nodes): names given and made unique, nothing else changed, validity."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper
from onnx_graph_models import assert_same_outputs, make, ops, vi

from autoprec.onnx.rewrites.name_nodes import name_nodes


def test_unnamed_duplicate_and_input_named_nodes_get_unique_names() -> None:
    nodes = [helper.make_node("Relu", ["x"], ["a"], name="act"),
             helper.make_node("Relu", ["a"], ["b"], name="act"),  # duplicate
             helper.make_node("Neg", ["b"], ["c"]),  # unnamed
             helper.make_node("Abs", ["c"], ["d"], name="x"),  # a graph input's name
             helper.make_node("Relu", ["d"], ["y"], name="act_1")]  # the name the duplicate would take
    source = make(nodes, [vi("x", [2, 3])], [vi("y", [2, 3])], opset=21, ir=10)
    model = onnx.ModelProto()
    model.CopyFrom(source)
    assert name_nodes(model) == 4
    assert [n.name for n in model.graph.node] == ["act", "act_1", "Neg_2", "x_1", "act_1_1"]
    assert ops(model) == ops(source) and [list(n.output) for n in model.graph.node] == [list(n.output) for n in source.graph.node]
    assert name_nodes(model) == 0  # unique names stay as they are
    unnamed = onnx.ModelProto()  # ONNX Runtime refuses the source itself: two nodes named "act"
    unnamed.CopyFrom(source)
    for node in unnamed.graph.node:
        node.name = ""
    x = np.random.default_rng(0).standard_normal((2, 3)).astype(np.float32)
    assert_same_outputs(unnamed, model, {"x": x})
    onnx.checker.check_model(model, full_check=True)
