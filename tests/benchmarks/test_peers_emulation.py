"""benchmarks/peers_bench.py's honest evaluation of a peer's fp16 graph: every value the graph holds
in fp16 is rounded, as a GPU computing in fp16 with fp32 accumulation stores it (ONNX Runtime's CPU
provider would compute the fp16 nodes in fp32 and drop that rounding)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parents[2]


def _bench():
    spec = importlib.util.spec_from_file_location("peers_bench", ROOT / "benchmarks" / "peers_bench.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    return mod


def _fp16_graph(w: np.ndarray, b: np.ndarray) -> onnx.ModelProto:
    """y = float(relu(half(x) @ W + B)) with W, B stored in fp16, as onnxconverter-common writes it."""
    nodes = [helper.make_node("Cast", ["x"], ["x16"], to=TensorProto.FLOAT16, name="in_cast"),
             helper.make_node("MatMul", ["x16", "W"], ["m"], name="mm"),
             helper.make_node("Add", ["m", "B"], ["a"], name="add"),
             helper.make_node("Relu", ["a"], ["r"], name="relu"),
             helper.make_node("Cast", ["r"], ["y"], to=TensorProto.FLOAT, name="out_cast")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 3])],
                          [numpy_helper.from_array(w.astype(np.float16), "W"),
                           numpy_helper.from_array(b.astype(np.float16), "B")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)


def test_every_fp16_value_is_rounded_and_computed_in_fp32() -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 4)).astype(np.float32) * 3
    w = rng.standard_normal((4, 3)).astype(np.float32)
    b = rng.standard_normal(3).astype(np.float32)
    emulated = _bench().emulate_fp16(_fp16_graph(w, b))
    onnx.checker.check_model(emulated, full_check=True)
    g = emulated.graph
    assert all(i.data_type == TensorProto.FLOAT for i in g.initializer)
    assert [v.type.tensor_type.elem_type for v in [*g.input, *g.output]] == [TensorProto.FLOAT, TensorProto.FLOAT]
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    got = ort.InferenceSession(emulated.SerializeToString(), opts, providers=["CPUExecutionProvider"]).run(
        None, {"x": x})[0]
    h = lambda v: v.astype(np.float16).astype(np.float32)  # noqa: E731  (round to fp16, back to fp32)
    x16, w16, b16 = h(x), h(w), h(b)
    m = h(np.einsum("nk,kj->nj", x16.astype(np.float64), w16.astype(np.float64)).astype(np.float32))
    want = h(np.maximum(h(m + b16), 0))
    assert np.array_equal(got, want)
    # without the roundings the result differs: the rounding is what the emulation adds
    assert not np.array_equal(got, np.maximum(x16 @ w16 + b16, 0))
