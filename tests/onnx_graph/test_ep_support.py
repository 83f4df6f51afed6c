"""Execution-provider legality (autoprec.ort.providers): the built-in table against this machine's ONNX
Runtime, the faithful-precision rules, and exclusions the search can take."""

from __future__ import annotations

import subprocess
import sys

import pytest
from onnx_graph_models import conv_model, mlp_opset13

from autoprec.ort import providers as ep
from autoprec.core.errors import UsageError
from autoprec.core.formats import Precision
from autoprec.onnx.graph import analyse_onnx
from autoprec.core.opgraph import OpGraph, OpNode, Policy

FP16, BF16, E4M3 = Precision.FP16, Precision.BF16, Precision.FP8_E4M3

#: The ops autoprec's plans touch: layers, what follows them, casts and fp8 Q/DQ.
KEY_OPS = ("MatMul", "Gemm", "Conv", "Add", "Mul", "Relu", "Gelu", "Erf", "Sigmoid", "Tanh", "Softmax",
           "LayerNormalization", "BatchNormalization", "Cast", "QuantizeLinear", "DequantizeLinear",
           "MaxPool", "AveragePool", "GlobalAveragePool", "Transpose", "Reshape", "Concat", "Flatten",
           "ReduceMean")


def test_live_cpu_registry_agrees_with_the_builtin_table() -> None:
    for op in KEY_OPS:
        found = ep.live_types(op, "cpu")
        assert found is not None, op
        types, source = found
        assert source.startswith("live"), source
        table = ep.builtin_types(op, "cpu")
        assert types == table, (op, sorted(types), sorted(table or ()))
    # Beyond the key ops only documented release-to-release changes may differ (bf16 Pad: ORT 1.32)
    assert set(ep.drift("cpu")) <= {"Pad"}


def test_registry_rows_fold_to_types_per_provider() -> None:
    rows = [
        ["MatMul", "", ep.CPU, 13, 2**31 - 1, {"T": ["tensor(float)", "tensor(double)"]}],
        ["MatMul", "", ep.CUDA, 13, 2**31 - 1, {"T": ["tensor(float16)", "tensor(bfloat16)"]}],
        ["MatMul", "", ep.CUDA, 1, 12, {"T": ["tensor(float8e4m3fn)"]}],  # does not cover opset 21
        ["QuantizeLinear", "", ep.CPU, 21, 22, {"T1": ["tensor(float16)"], "T2": ["tensor(float8e4m3fn)"]}],
        ["FusedMatMul", "com.microsoft", ep.CPU, 1, 2**31 - 1, {"T": ["tensor(float16)"]}],
    ]
    got = ep.parse_registry(rows)
    assert got[ep.CPU] == {"MatMul": frozenset(), "QuantizeLinear": frozenset({"float8e4m3fn"})}
    assert got[ep.CUDA] == {"MatMul": frozenset({"float16", "bfloat16"})}


def test_cpu_rules_for_faithful_precision() -> None:
    for live in (True, False):
        # fp16 MatMul "runs" on CPU only between inserted fp32 casts: not faithful
        assert not ep.supported("MatMul", FP16, "cpu", live).ok
        assert not ep.supported("Conv", BF16, "cpu", live).ok
        assert ep.supported("LayerNormalization", FP16, "cpu", live).ok
        # fp8: QuantizeLinear/DequantizeLinear exist, the product runs in fp32
        s = ep.supported("MatMul", E4M3, "cpu", live)
        assert s.ok and "QuantizeLinear/DequantizeLinear" in s.source
        # an fp8 table: no fp8 Gather kernel, but DequantizeLinear of the table + fp32 Gather + bf16 Cast
        assert not ep.kernel("Gather", E4M3, "cpu", live).ok
        s = ep.supported("Gather", E4M3, "cpu", live)
        assert s.ok and "DequantizeLinear of the table, fp32 Gather, bf16 Cast" in s.source
        assert ep.supported("Cast", E4M3, "cpu", live).ok
        assert not ep.supported("Add", E4M3, "cpu", live).ok
        assert ep.supported("MatMul", Precision.FP32, "cpu", live).ok
    why = ep.reason("MatMul", FP16, "cpu")
    assert why is not None and why.startswith("CPUExecutionProvider has no fp16 MatMul kernel (live")
    assert "inserted casts" in why
    assert ep.reason("MatMul", FP16, "cpu", live=False) == (
        "CPUExecutionProvider has no fp16 MatMul kernel (documented): ONNX Runtime would compute it "
        "in fp32 between inserted casts, losing the fp16 rounding")


def test_gpu_tables_mark_documented_and_assumed() -> None:
    assert ep.supported("MatMul", BF16, "cuda") == ep.Support(True, "documented")
    assert ep.supported("Conv", FP16, "cuda") == ep.Support(True, "documented")
    assert ep.supported("Conv", BF16, "cuda") == ep.Support(False, "documented")
    assert ep.reason("Conv", BF16, "cuda") == "CUDAExecutionProvider has no bf16 Conv kernel (documented)"
    assert ep.supported("MaxPool", BF16, "cuda").ok is False
    assert ep.supported("Gelu", FP16, "cuda") == ep.Support(True, "assumed")
    assert ep.supported("Gelu", BF16, "cuda") == ep.Support(False, "assumed")
    s = ep.supported("Gemm", E4M3, "cuda")
    assert s.ok and s.source.startswith("documented")
    assert ep.supported("MatMul", FP16, "tensorrt") == ep.Support(True, "documented")
    assert ep.supported("MatMul", BF16, "trt") == ep.Support(True, "assumed")
    assert ep.supported("Conv", E4M3, "TensorrtExecutionProvider").source.startswith("assumed")
    assert not ep.supported("Cast", E4M3, "tensorrt").ok
    unknown = ep.supported("NoSuchOp", FP16, "cuda")
    assert not unknown.ok and "not in autoprec's table" in unknown.source
    for prov in ep.PROVIDERS:
        assert {"MatMul", "Gemm", "Conv", "QuantizeLinear", "DequantizeLinear"} <= set(ep.table_ops(prov))


def test_unknown_provider_is_a_one_line_usage_error() -> None:
    with pytest.raises(UsageError, match="unknown execution provider 'rocm'") as err:
        ep.supported("MatMul", FP16, "rocm")
    assert "\n" not in str(err.value)
    with pytest.raises(UsageError):
        ep.exclusions(OpGraph([], []), "OpenVINO")
    assert ep.parse_provider("CUDA") == ep.CUDA and ep.parse_provider("tensorrt") == ep.TENSORRT


def test_exclusions_for_an_onnx_model_per_provider() -> None:
    a = analyse_onnx(conv_model(), batch=2)  # layers: conv (Conv), fc (Gemm)
    cuda = ep.exclusions(a.graph, "cuda", ["bf16", "fp16", "fp8"], op_types=a.op_types)
    assert cuda == {"conv": {BF16: "CUDAExecutionProvider has no bf16 Conv kernel (documented)"}}
    cpu = ep.exclusions(a.graph, "cpu", ["bf16", "fp16", "fp8"], op_types=a.op_types, live=False)
    assert set(cpu) == {"conv", "fc"}
    assert set(cpu["fc"]) == {BF16, FP16}  # fp8 stays: Q/DQ runs on CPU
    assert cpu["fc"][BF16] == "CPUExecutionProvider has no bf16 Gemm kernel (documented)"
    trt = ep.exclusions(a.graph, "tensorrt", op_types=a.op_types)
    assert trt == {}
    assert ep.exclusions(a.graph, "cuda", ["fp32"]) == {}


def test_exclusions_from_kinds_without_op_types() -> None:
    nodes = [OpNode("x", "placeholder", "", Policy.NONE, output_shape=(2, 8), act_out_elems=16),
             OpNode("fc", "linear", "", Policy.ALWAYS, ((2, 8),), (2, 4), 128, 32, 16, 8, "fc.weight"),
             OpNode("c", "conv1d", "", Policy.ALWAYS, ((2, 1, 8),), (2, 1, 8), 64, 3, 16, 16, "c.weight"),
             OpNode("odd", "einsum_layer", "", Policy.ALWAYS, ((2, 8),), (2, 8), 10, 0, 16, 16)]
    g = OpGraph(nodes, [("x", "fc"), ("x", "c"), ("x", "odd")])
    out = ep.exclusions(g, "cuda", [BF16, FP16])
    assert set(out) == {"c", "odd"}
    assert out["c"] == {BF16: "CUDAExecutionProvider has no bf16 Conv kernel (documented)"}
    assert "does not know which ONNX op" in out["odd"][FP16]
    # linear may become Gemm or MatMul: both must be legal
    assert ep.exclusions(g, "cpu", [FP16], live=False)["fc"][FP16].startswith(
        "CPUExecutionProvider has no fp16 Gemm kernel")
    # an embedding is a Gather of its table, which every provider runs in 16 bits, and in fp8
    # through the DequantizeLinear of its table (fp8 DequantizeLinear, fp32 Gather, bf16 Cast)
    emb = OpGraph([nodes[0], OpNode("emb", "embedding", "", Policy.ALWAYS, ((2, 8),), (2, 8, 4), 0, 40, 0, 64,
                                    "emb.weight")], [("x", "emb")])
    for provider in ("cpu", "cuda", "tensorrt"):
        assert ep.exclusions(emb, provider, [BF16, FP16, E4M3], live=False) == {}, provider
    assert ep.reason("Gather", E4M3, "cuda") is None


def test_exclusions_feed_the_search() -> None:
    """SearchProblem.build takes the exclusions as they are and keeps the reasons."""
    from autoprec.search.problem import SearchProblem
    from autoprec.core.sensitivity import SensitivityProfile

    a = analyse_onnx(mlp_opset13(), batch=4)
    errors = {name: {BF16: 1e-3, FP16: 1e-4} for name in a.graph.layer_names()}
    profile = SensitivityProfile("mlp", a.graph.fingerprint(), "exact", "rel_mse", (BF16, FP16), errors)
    excluded = ep.exclusions(a.graph, "cpu", [BF16, FP16], op_types=a.op_types, live=False)
    problem = SearchProblem.build(a.graph, profile, formats=[BF16, FP16], excluded=excluded)
    assert problem.candidates == {"MatMul_0": (), "Gemm_2": ()}
    assert problem.excluded["MatMul_0"][BF16] == "CPUExecutionProvider has no bf16 MatMul kernel (documented)"


def test_ep_support_imports_no_torch_and_no_runtime() -> None:
    code = ("import sys, autoprec.ort.providers; "
            "assert not {'torch', 'onnxruntime', 'onnx'} & set(sys.modules), 'heavy import'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_an_fp8_form_is_refused_for_the_kernel_it_lacks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every kernel of an fp8 form must exist: without a bf16 Cast neither an fp8 product nor an fp8
    table can write its bf16 result; without fp8 QuantizeLinear only the products are refused (a
    table reads no activation)."""
    no_cast = {op: types for op, types in ep._TABLES[ep.TENSORRT].items() if op != "Cast"}
    monkeypatch.setitem(ep._TABLES, ep.TENSORRT, no_cast)
    for op in ("Gather", "MatMul"):
        why = ep.reason(op, E4M3, "tensorrt", live=False)
        assert why is not None and why.startswith("TensorrtExecutionProvider has no bfloat16 Cast kernel"), op
        assert why.endswith(f"which an fp8_e4m3 {op} needs"), op
    no_q = {op: types for op, types in ep._TABLES[ep.CUDA].items() if op != "QuantizeLinear"}
    monkeypatch.setitem(ep._TABLES, ep.CUDA, no_q)
    assert ep.reason("Gemm", E4M3, "cuda", live=False) == (
        "CUDAExecutionProvider has no float8e4m3fn QuantizeLinear kernel (assumed: QuantizeLinear is not in "
        "autoprec's table for CUDAExecutionProvider), which an fp8_e4m3 Gemm needs")
    assert ep.supported("Gather", E4M3, "cuda", live=False).ok


def test_follow_ops_name_follow_kinds_and_known_ops() -> None:
    """Every FOLLOW kind with arithmetic maps to ONNX ops the built-in tables know (a typo would make
    follow_format price the op in fp32 everywhere); ReLU keeps bf16 on CUDA, a bf16 GELU does not."""
    from autoprec.ort.providers import FOLLOW_OPS, follow_format, table_ops
    from autoprec.core.kinds import FOLLOW_KINDS

    assert set(FOLLOW_OPS) <= FOLLOW_KINDS
    known = set(table_ops("cuda")) | set(table_ops("cpu"))
    assert {op for ops in FOLLOW_OPS.values() for op in ops} - known == {"Elu"}  # in no table: fp32 where 16-bit
    assert follow_format("relu", "bf16", "cuda", live=False) is Precision.BF16
    assert follow_format("gelu", "bf16", "cuda", live=False) is Precision.FP32
    assert follow_format("view", "bf16", "cpu", live=False) is Precision.BF16  # no arithmetic: any format
