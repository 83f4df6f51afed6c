"""Graph outputs other software writes that the plan passes must keep: a layer's result that is a
graph output (alone, or read by another node too), and outputs that are a graph input or an
initializer. Every plan and mode must pass the full checker and run on ONNX Runtime's CPU provider
with the plan's numerics; the pytorch-converted Embedding test models of the onnx wheel (a bf16
Gather writing the graph output) crashed InsertCasts."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from onnx_graph_models import init, make, vi

from autoprec.core.formats import Precision
from autoprec.onnx.apply import apply_plan_analysed
from autoprec.onnx.graph import analyse_onnx
from autoprec.onnx.passes.base import INSERTED, get_meta
from autoprec.ort.runtime import open_session

FP16, BF16, E4M3 = Precision.FP16, Precision.BF16, Precision.FP8_E4M3
FORMATS = (BF16, FP16, E4M3)
MODES = ("deploy", "emulate")


def run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """``model``'s outputs on ONNX Runtime's CPU provider, in the session autoprec opens (without
    the optimisers that miscompile fp8 Q/DQ)."""
    return open_session(model.SerializeToString(), "cpu").session.run(None, feeds)


def _round(a: np.ndarray, fmt: Precision) -> np.ndarray:
    return a.astype(fmt.numpy_dtype).astype(np.float32)


def _embedding() -> onnx.ModelProto:
    """The pytorch-converted ``test_Embedding`` model: IR 3, opset 6, the table listed among the
    inputs, and the Gather's rows are the graph output."""
    table = (np.arange(40, dtype=np.float32).reshape(10, 4) * 0.1013).astype(np.float32)
    nodes = [helper.make_node("Gather", ["table", "idx"], ["rows"])]
    inputs = [vi("idx", [1, 4], TensorProto.INT64), vi("table", [10, 4])]
    return make(nodes, inputs, [vi("rows", [1, 4, 4])], [init("table", table)], opset=6, ir=3)


def _checked(model: onnx.ModelProto, assignment: dict[str, Precision], mode: str,
             amax: dict[str, tuple[float, ...]] | None = None) -> onnx.ModelProto:
    analysis = analyse_onnx(model)
    out = apply_plan_analysed(analysis, assignment, amax, mode)
    onnx.checker.check_model(out, full_check=True)
    assert [o.name for o in out.graph.output] == [o.name for o in model.graph.output]
    assert all(o.type.tensor_type.elem_type == TensorProto.FLOAT for o in out.graph.output)
    return out


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("fmt", FORMATS)
def test_a_lookup_whose_rows_are_the_graph_output(fmt: Precision, mode: str) -> None:
    source = _embedding()
    model = _checked(source, {"Gather_0": fmt}, mode)
    idx = np.array([[1, 2, 4, 9]], np.int64)
    table = onnx.numpy_helper.to_array(source.graph.initializer[0])
    if fmt.is_fp8:  # one scale per row, amax / 448; the rows dequantized, then rounded to bf16
        scale = np.abs(table).max(axis=1, keepdims=True) / np.float32(448)
        codes = (table / scale).astype(fmt.numpy_dtype).astype(np.float32)
        want = _round(codes * scale, BF16)[idx]
    else:
        want = _round(table, fmt)[idx]
    if mode == "deploy":  # the Gather reads the 16-bit table (fp8: its dequantized fp32 copy); one Cast to fp32
        gather = next(n for n in model.graph.node if n.op_type == "Gather")
        casts = [n for n in model.graph.node if n.op_type == "Cast"]
        assert casts[-1].input[0] in gather.output or casts[-1].input[0] == casts[0].output[0]
        assert casts[-1].output[0] == "rows"
    if mode == "emulate" or fmt is not BF16:  # ORT's CPU provider has no bf16 Gather
        np.testing.assert_array_equal(run(model, {"idx": idx})[0], want)


def _layer_output_read_again() -> onnx.ModelProto:
    """h = x @ w is a graph output and Relu's input: exact small integers, so every sum is exact
    and the plan's roundings are all that move the values."""
    rng = np.random.default_rng(0)
    w = rng.integers(-4, 5, (4, 3)).astype(np.float32) * np.float32(1.0078125)  # not a bf16 value
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Relu", ["h"], ["y"])]
    return make(nodes, [vi("x", ["N", 4])], [vi("h", ["N", 3]), vi("y", ["N", 3])], [init("w", w)], opset=21, ir=10)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("fmt", FORMATS)
def test_a_layer_result_that_is_a_graph_output_and_read_again(fmt: Precision, mode: str) -> None:
    source = _layer_output_read_again()
    x = np.arange(-8, 8, dtype=np.float32).reshape(4, 4)
    model = _checked(source, {"MatMul_0": fmt}, mode, {"MatMul_0": (8.0,)})
    producer = {o: n for n in model.graph.node for o in n.output}
    for n in model.graph.node:  # no Cast reads a Cast pass-inserted for the same value
        if get_meta(n, INSERTED) and n.op_type == "Cast":
            before = producer.get(n.input[0])
            assert before is None or not (get_meta(before, INSERTED) and before.op_type == "Cast"
                                          and n.input[0] == "h"), n.name
    relu = next(n for n in model.graph.node if n.op_type == "Relu")
    if mode == "deploy":  # the Relu reads the layer's value in its format, not the graph output's fp32 Cast
        assert relu.input[0] != "h"
    if mode == "emulate":
        w = onnx.numpy_helper.to_array(source.graph.initializer[0])
        if fmt.is_fp8:
            scale = np.abs(w).max(axis=0, keepdims=True) / np.float32(448)
            wq = (w / scale).astype(fmt.numpy_dtype).astype(np.float32) * scale
            xs = np.float32(8.0 / 448)
            xq = (x / xs).astype(fmt.numpy_dtype).astype(np.float32) * xs
            h = _round(xq @ wq, BF16)
        else:
            h = _round(_round(x, fmt) @ _round(w, fmt), fmt)
        got_h, got_y = run(model, {"x": x})
        np.testing.assert_allclose(got_h, h, rtol=1e-6)
        np.testing.assert_array_equal(got_y, np.maximum(got_h, 0))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("fmt", FORMATS)
def test_outputs_that_are_a_graph_input_or_an_initializer(fmt: Precision, mode: str) -> None:
    w = np.random.default_rng(1).standard_normal((4, 3)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y"])]
    source = make(nodes, [vi("x", ["N", 4])], [vi("y", ["N", 3]), vi("x", ["N", 4]), vi("w", [4, 3])],
                  [init("w", w)], opset=21, ir=10)
    model = _checked(source, {"MatMul_0": fmt}, mode, {"MatMul_0": (4.0,)})
    x = np.random.default_rng(2).standard_normal((2, 4)).astype(np.float32)
    if mode == "emulate" or fmt is not BF16:
        _, got_x, got_w = run(model, {"x": x})
        np.testing.assert_array_equal(got_x, x)  # the user's input and weight, as they were
        np.testing.assert_array_equal(got_w, w)
