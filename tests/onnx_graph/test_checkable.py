"""The checker's view of a graph with large weights (autoprec.onnx.passes.base.checkable): the
same verdicts as the full checker on the model itself, without copying the weights."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper
from onnx_graph_models import init, make, vi

from autoprec.onnx.passes.base import CHECKED_BY_SHAPE, checkable, infer_types


def _model(w: onnx.TensorProto, reads: str = "h") -> onnx.ModelProto:
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Reshape", [reads, "shape"], ["y"])]
    return make(nodes, [vi("x", ["N", 128])], [vi("y", ["N", 2, 64])], [w, init("shape", np.array([-1, 2, 64]))],
                opset=21, ir=10)


def _big() -> onnx.TensorProto:
    w = np.random.default_rng(0).standard_normal((128, 128)).astype(np.float32)
    assert w.size > CHECKED_BY_SHAPE
    return init("w", w)


def test_the_view_moves_large_weights_to_inputs_and_leaves_the_model_alone() -> None:
    model = _model(_big())
    before = model.SerializeToString()
    view = checkable(model)
    assert [t.name for t in view.graph.initializer] == ["shape"]
    assert [i.name for i in view.graph.input] == ["x", "w"]
    assert model.SerializeToString() == before
    onnx.checker.check_model(view, full_check=True)
    typed = infer_types(model)  # types from the view, kept on the model itself
    assert {v.name: [d.dim_value or d.dim_param for d in v.type.tensor_type.shape.dim]
            for v in typed.graph.value_info} == {"h": ["N", 128]}
    assert [t.name for t in typed.graph.initializer] == ["w", "shape"]


@pytest.mark.parametrize("broken", ["undefined input", "short data"])
def test_the_view_rejects_what_the_checker_rejects(broken: str) -> None:
    w = _big()
    if broken == "short data":
        w.raw_data = w.raw_data[:-4]
    model = _model(w, reads="nowhere" if broken == "undefined input" else "h")
    with pytest.raises(onnx.checker.ValidationError):
        onnx.checker.check_model(model, full_check=True)
    with pytest.raises(onnx.checker.ValidationError):
        onnx.checker.check_model(checkable(model), full_check=True)


def test_small_models_are_checked_as_they_are() -> None:
    model = _model(init("w", np.ones((128, 8), np.float32)))
    assert checkable(model) is model
