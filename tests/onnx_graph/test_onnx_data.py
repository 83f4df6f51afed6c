"""`--data` for real graphs: which inputs hold samples on axis 0 and which are fed whole to every
run is read off the graph's input shapes (autoprec.onnx.model's docstring); integer inputs stay
integers; data that cannot fit the graph is a one-line error. The onnx wheel's pytorch-operator
tests with inputs of different sizes on axis 0 tune, or say that they have no layer."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, numpy_helper
from onnx_graph_models import init, make, vi

from autoprec.cli import main
from autoprec.core.errors import UsageError
from autoprec.core.formats import Precision
from autoprec.onnx.model import OnnxModel

OPERATORS = Path(onnx.__file__).resolve().parent / "backend" / "test" / "data" / "pytorch-operator"
I64 = TensorProto.INT64


def matmul_with_matrix_input(batch: int | str = "N") -> onnx.ModelProto:
    """x[batch, 3] @ w[3, 4], both graph inputs: a product of two activations (a matmul layer)."""
    nodes = [onnx.helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")]
    return make(nodes, [vi("x", [batch, 3]), vi("w", [3, 4])], [vi("y", [batch, 4])])


def _x(n: int) -> np.ndarray:
    return np.random.default_rng(n).standard_normal((n, 3)).astype(np.float32)


W = np.arange(12, dtype=np.float32).reshape(3, 4) / 7


@pytest.mark.parametrize("n", [50, 3, 600])  # 3: as many samples as the matrix has rows
def test_an_input_without_the_batch_axis_is_fed_whole_to_every_run(n: int) -> None:
    om = OnnxModel.load(matmul_with_matrix_input(), {"x": _x(n), "w": W})
    assert set(om.feeds) == {"x"} and set(om.whole) == {"w"} and om.samples == n
    batches = om.batches()
    assert all(np.array_equal(b["w"], W) for b in batches) and sum(len(b["x"]) for b in batches) == n
    y = np.concatenate([ys[0] for ys in om.outputs(om.analysis.model)])
    np.testing.assert_allclose(y, _x(n) @ W, rtol=1e-6)
    assert om.analysis.graph.batch == 1 and [op.kind for op in om.analysis.graph.layers()] == ["matmul"]


def test_a_fixed_batch_takes_its_samples_a_batch_at_a_time_beside_a_whole_input() -> None:
    """x fixes its batch to 4 and its data hold 12 samples: 3 runs of 4, each with the whole w."""
    om = OnnxModel.load(matmul_with_matrix_input(4), {"x": _x(12), "w": W})
    assert (om.fixed_batch, om.batch, set(om.whole)) == (True, 4, {"w"})
    assert [len(b["x"]) for b in om.batches()] == [4, 4, 4]


def test_integer_inputs_stay_integers_batched_or_whole() -> None:
    """Token ids (batched) and positions (fed whole) index two tables; int32 data for an int64 input
    widen to int64, never to a float."""
    rng = np.random.default_rng(0)
    nodes = [onnx.helper.make_node("Gather", ["tok_table", "tokens"], ["tok"], name="tok_emb"),
             onnx.helper.make_node("Gather", ["pos_table", "pos"], ["p"], name="pos_emb"),
             onnx.helper.make_node("Add", ["tok", "p"], ["h"], name="add"),
             onnx.helper.make_node("MatMul", ["h", "w"], ["y"], name="head")]
    inits = [init("tok_table", rng.standard_normal((20, 8)).astype(np.float32)),
             init("pos_table", rng.standard_normal((6, 8)).astype(np.float32)),
             init("w", rng.standard_normal((8, 5)).astype(np.float32))]
    model = make(nodes, [vi("tokens", ["B", 6], I64), vi("pos", [6], I64)], [vi("y", ["B", 6, 5])], inits)
    tokens = rng.integers(0, 20, (40, 6)).astype(np.int32)
    om = OnnxModel.load(model, {"tokens": tokens, "pos": np.arange(6, dtype=np.int64)})
    assert om.feeds["tokens"].dtype == np.int64 and np.array_equal(om.feeds["tokens"], tokens)
    assert om.whole["pos"].dtype == np.int64
    assert all(b["tokens"].dtype == np.int64 and b["pos"].dtype == np.int64 for b in om.batches())
    assert {op.kind for op in om.analysis.graph.layers()} == {"embedding", "linear"}
    assert om.metric().measure(om.analysis.model) == 1.0


def test_inputs_with_different_fixed_sizes_on_axis_0_run_once_fed_whole() -> None:
    """test_operator_mm's shapes: [2, 3] @ [3, 4], the data exactly those shapes. No axis 0 is
    shared: both are fed whole, in one run; labels, which need samples, are refused."""
    nodes = [onnx.helper.make_node("MatMul", ["a", "b"], ["y"], name="mm")]
    model = make(nodes, [vi("a", [2, 3]), vi("b", [3, 4])], [vi("y", [2, 4])])
    data = {"a": np.ones((2, 3), np.float32), "b": W}
    om = OnnxModel.load(model, data)
    assert (om.feeds, set(om.whole), om.samples, len(om.batches())) == ({}, {"a", "b"}, 1, 1)
    assert om.analysis.graph.batch == 0  # no samples: the cost model prices the graph as it is
    with pytest.raises(UsageError, match="every input of the model is fed whole") as e:
        OnnxModel.load(model, data, np.zeros(2, np.int64))
    assert "\n" not in str(e.value)


def test_inputs_that_share_a_fixed_axis_0_are_one_batch() -> None:
    """A model that fixes a batch of 2 on both inputs, with exactly 2 samples: one batch of 2, so
    labels (one per sample) can judge it."""
    nodes = [onnx.helper.make_node("Add", ["a", "b"], ["s"]), onnx.helper.make_node("MatMul", ["s", "w"], ["y"])]
    model = make(nodes, [vi("a", [2, 3]), vi("b", [2, 3])], [vi("y", [2, 4])], [init("w", W)])
    om = OnnxModel.load(model, {"a": np.ones((2, 3), np.float32), "b": np.ones((2, 3), np.float32)},
                        np.array([1, 3]))
    assert set(om.feeds) == {"a", "b"} and om.samples == 2 and om.metric().name == "accuracy"


@pytest.mark.parametrize("model, arrays, message", [
    (matmul_with_matrix_input(), {"x": _x(10), "w": np.ones((5, 4), np.float32)},
     r"input 'w': its data have 5 on axis 0, neither the 10 samples of the other inputs nor the 3 the model fixes"),
    (matmul_with_matrix_input(), {"x": _x(10), "w": np.ones((3, 5), np.float32)},
     r"input 'w': the data have shape \[3, 5\], the model takes rank 2: \[3, 4\]"),
    (matmul_with_matrix_input(), {"x": np.ones((10, 3, 1), np.float32), "w": W}, r"takes rank 2: \[N, 3\]"),
    (matmul_with_matrix_input(4), {"x": _x(10), "w": W}, "batches of exactly 4 samples; the data hold 10"),
    (make([onnx.helper.make_node("MatMul", ["x", "z"], ["y"])], [vi("x", ["N", 3]), vi("z", ["M", 3, 2])],
          [vi("y", ["N", 3, 2])]),
     {"x": _x(10), "z": np.ones((7, 3, 2), np.float32)}, r"whose axis 0 is free .* different numbers of samples"),
])
def test_data_that_cannot_fit_the_graph_is_one_line(model: onnx.ModelProto, arrays: dict, message: str) -> None:
    with pytest.raises(UsageError, match=message) as e:
        OnnxModel.load(model, arrays)
    assert "\n" not in str(e.value)


def _operator_data(name: str, path: Path) -> Path:
    """The operator test's own inputs (input_<i>.pb is the i-th graph input) as an .npz."""
    model = onnx.load(str(OPERATORS / name / "model.onnx"))
    arrays = {vi.name: numpy_helper.to_array(onnx.load_tensor(str(OPERATORS / name / "test_data_set_0" / f"input_{i}.pb")))
              for i, vi in enumerate(model.graph.input)}
    np.savez(path, **arrays)
    return path


@pytest.mark.parametrize("name, layers", [("test_operator_mm", 1), ("test_operator_addmm", 2)])
def test_operator_tests_with_different_sizes_on_axis_0_tune(name: str, layers: int, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    data = _operator_data(name, tmp_path / "inputs.npz")
    out = tmp_path / "out"
    assert main(["tune", str(OPERATORS / name / "model.onnx"), "--data", str(data), "--fidelity-budget", "1%",
                 "--out", str(out), "--json"]) == 0, capsys.readouterr().err
    plan = json.loads((out / "plan.json").read_text())
    assert [d["kind"] for d in plan["decisions"]] == ["matmul"] * layers


def test_an_operator_test_without_a_layer_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """test_operator_add_broadcast: a float64 Add of a [2, 3] and a [3] input. The data fit (both fed
    whole); there is no layer, and tune says that in one line."""
    name = "test_operator_add_broadcast"
    data = _operator_data(name, tmp_path / "inputs.npz")
    assert main(["tune", str(OPERATORS / name / "model.onnx"), "--data", str(data), "--fidelity-budget", "1%",
                 "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert "has no layer whose format can be chosen" in err and len(err.splitlines()) == 1


def test_addmm_plans_build_in_every_format_pair() -> None:
    """test_operator_addmm adds one Gemm's result as the next Gemm's bias: in a 16-bit plan the bias
    is already in the layer's format, and the emulation graph must not round it a second time
    (InsertCasts' postcondition refused the redundant rounding)."""
    name = "test_operator_addmm"
    model = onnx.load(str(OPERATORS / name / "model.onnx"))
    arrays = {vi.name: numpy_helper.to_array(onnx.load_tensor(str(OPERATORS / name / "test_data_set_0" / f"input_{i}.pb")))
              for i, vi in enumerate(model.graph.input)}
    om = OnnxModel.load(model, arrays)
    formats = [Precision.FP32, Precision.BF16, Precision.FP16, Precision.FP8_E4M3]
    amax = {layer: (8.0, 8.0) for layer in ("Gemm_0", "Gemm_1")}
    for first in formats:
        for second in formats:
            for mode in ("emulate", "deploy"):
                built = om.build({"Gemm_0": first, "Gemm_1": second}, amax, mode)
                onnx.checker.check_model(built, full_check=True)
