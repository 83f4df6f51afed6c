"""benchmarks/peers_bench.py's honest evaluation of a peer's fp16 or bf16 graph: every value the graph
holds in a 16-bit format is rounded, as a GPU computing in that format with fp32 accumulation stores it
(ONNX Runtime's CPU provider would compute fp16 nodes in fp32 and drop that rounding, and has no bf16
kernels for most ops)."""

from __future__ import annotations

import functools
import importlib.util
import sys
from pathlib import Path
from types import ModuleType, SimpleNamespace

import ml_dtypes
import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parents[2]


@functools.cache
def _bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("peers_bench", ROOT / "benchmarks" / "peers_bench.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["peers_bench"] = mod  # its dataclasses look their module up by name
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    return mod


def _low_graph(w: np.ndarray, b: np.ndarray, low: int = TensorProto.FLOAT16) -> onnx.ModelProto:
    """y = float(relu(low(x) @ W + B)) with W, B stored in ``low`` (fp16 as onnxconverter-common writes
    it, bf16 as ModelOpt's AutoCast does)."""
    dtype = np.float16 if low == TensorProto.FLOAT16 else ml_dtypes.bfloat16
    nodes = [helper.make_node("Cast", ["x"], ["x16"], to=low, name="in_cast"),
             helper.make_node("MatMul", ["x16", "W"], ["m"], name="mm"),
             helper.make_node("Add", ["m", "B"], ["a"], name="add"),
             helper.make_node("Relu", ["a"], ["r"], name="relu"),
             helper.make_node("Cast", ["r"], ["y"], to=TensorProto.FLOAT, name="out_cast")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 3])],
                          [numpy_helper.from_array(w.astype(dtype), "W"),
                           numpy_helper.from_array(b.astype(dtype), "B")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)


def test_every_fp16_value_is_rounded_and_computed_in_fp32() -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 4)).astype(np.float32) * 3
    w = rng.standard_normal((4, 3)).astype(np.float32)
    b = rng.standard_normal(3).astype(np.float32)
    emulated = _bench().emulate_low_precision(_low_graph(w, b))
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


def _run_unoptimized(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"]).run(
        None, {"x": x})[0]


def test_every_bf16_value_is_rounded_to_bf16() -> None:
    """A bf16 graph (which ONNX Runtime's CPU provider cannot run) is emulated with bf16 rounding --
    7 mantissa bits, not fp16's 10 -- and every bf16 value is rounded, not just the output."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((64, 4)).astype(np.float32) * 3
    w = rng.standard_normal((4, 3)).astype(np.float32)
    b = rng.standard_normal(3).astype(np.float32)
    bench = _bench()
    graph = _low_graph(w, b, TensorProto.BFLOAT16)
    emulated = bench.emulate_low_precision(graph)
    onnx.checker.check_model(emulated, full_check=True)
    g = emulated.graph
    assert all(i.data_type == TensorProto.FLOAT for i in g.initializer)
    assert {n.attribute[0].i for n in g.node if n.op_type == "Cast"} == {TensorProto.BFLOAT16, TensorProto.FLOAT}
    got = _run_unoptimized(emulated, x)
    h = lambda v: v.astype(ml_dtypes.bfloat16).astype(np.float32)  # noqa: E731  (round to bf16 and back)
    x16, w16, b16 = h(x), h(w), h(b)
    m = h(np.einsum("nk,kj->nj", x16.astype(np.float64), w16.astype(np.float64)).astype(np.float32))
    want = h(np.maximum(h(m + b16), 0))
    assert np.array_equal(got, want)
    # dropping the rounding of the product (rounding the output only) or rounding to fp16 both differ
    assert not np.array_equal(got, h(np.maximum(x16 @ w16 + b16, 0)))
    f16 = lambda v: v.astype(np.float16).astype(np.float32)  # noqa: E731
    assert not np.array_equal(got, f16(np.maximum(f16(f16(f16(x) @ f16(w)) + f16(b)), 0)))
    # the plan layer "mm" writes bf16: the peer's assignment prices it as bf16
    assert bench.low_layers(graph, ["mm", "missing"]) == {"mm": bench.Precision.BF16}


def test_without_the_modelopt_venv_one_line_says_how_and_the_other_rows_remain(tmp_path, monkeypatch, capsys) -> None:
    bench = _bench()
    monkeypatch.setenv("BENCH_RESULTS", str(tmp_path))
    monkeypatch.setattr(bench, "MODELOPT_PYTHON", tmp_path / "no-venv" / "bin" / "python")
    row = "| digits_cnn | autoprec: bf16 x5 | yes | 0.0000 | - | 1.42x | 50% | 0.32 | 70.0 | 3 + profile |"

    def fake_bench(name: str, budget: str, tmp: Path, autocast: bool):
        assert not autocast  # no AutoCast run is tried
        return bench.ModelResult(name, 0.99, 0.985, rows=[row], points=[bench.Point("autoprec", 1.42, 0.99, True, {})])

    monkeypatch.setattr(bench, "bench", fake_bench)
    assert bench.main(["digits_cnn"]) == 0
    printed = capsys.readouterr().out
    assert printed.count("scripts/setup_modelopt.sh") == 2  # at the start, and among the notes
    section = (tmp_path / "peers.md").read_text()
    assert row in section and "scripts/setup_modelopt.sh" in section
    assert (tmp_path / "peers_digits_cnn.png").stat().st_size > 0


def test_the_verdict_names_the_fastest_holder_and_explains_a_faster_peer() -> None:
    """A peer faster than autoprec within budget is explained by autoprec's error model when that
    model predicts the peer's layer formats over the error budget its search ran with."""
    bench = _bench()
    P = bench.Precision
    plan = SimpleNamespace(assignment={"a": P.FP16, "b": P.FP32}, budget=SimpleNamespace(value=0.01))
    res = SimpleNamespace(plan=plan,
                          profile=SimpleNamespace(error=lambda layer, f: {"a": 0.004, "b": 0.02}[layer]))
    peer = bench.Point("peer", 1.6, 0.99, True, {"a": P.FP16, "b": P.FP16}, 0.001)
    r = bench.ModelResult("m", 0.991, 0.986, points=[bench.Point("autoprec", 1.3, 0.99, True, {"a": P.FP16}), peer,
                                                     bench.Point("all-fp8_e4m3", 2.0, 0.9, False)])
    line = bench.verdict(r, res)
    assert line.startswith("m: peer holds the budget at the highest estimated speedup, 1.60x.")
    assert "predicts 0.024" in line and "error budget 0.01" in line and "(b)" in line
    res.plan.budget.value = 0.1  # within autoprec's own budget: nothing in its figures says why
    assert "not explained" in bench.verdict(r, res)
