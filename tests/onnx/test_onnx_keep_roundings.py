"""KeepRoundings: a deployment graph's 16-bit node pairs that ONNX Runtime would fuse past a rounding
are rewritten into forms it keeps apart (checked on the graph ORT's optimizers leave), with the
function unchanged; its check refuses a graph that still has such a pair."""

from __future__ import annotations

import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from deploy_models import run_onnx
from onnx import TensorProto, helper, numpy_helper

from autoprec.torch.capture import Captured, capture
from autoprec.deploy.export import onnx_passes, torch_to_onnx
from autoprec.onnx.apply import analysed_passes, run_plan_passes
from autoprec.core.formats import Precision
from autoprec.onnx.graph import OnnxAnalysis
from autoprec.onnx.model import OnnxModel
from autoprec.ort.runtime import DISABLED_OPTIMIZERS
from autoprec.onnx.passes.base import PassError
from autoprec.onnx.passes.keep_roundings import KeepRoundings

FP16 = Precision.FP16
_16BIT = (TensorProto.FLOAT16, TensorProto.BFLOAT16)


def ort_optimized(model: onnx.ModelProto) -> list[str]:
    """Op types of ``model`` as ONNX Runtime's CPU provider rewrites it (levels 1 and 2, autoprec's
    settings)."""
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as d:
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        so.optimized_model_filepath = str(Path(d) / "opt.onnx")
        so.log_severity_level = 3
        ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"],
                             disabled_optimizers=list(DISABLED_OPTIMIZERS))
        return [n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node]


def fp32_twin(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with every fp16/bf16 tensor made fp32: the same graph, which the CPU provider runs on
    real kernels, so it applies the level-2 fusions it shares with CUDA (on fp16 it has no kernels
    and falls back to fp32 through casts of its own first)."""
    twin = onnx.ModelProto()
    twin.CopyFrom(model)
    g = twin.graph
    for k, t in enumerate(g.initializer):
        if t.data_type in _16BIT:
            g.initializer[k].CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float32), t.name))
    for n in g.node:
        for a in n.attribute:
            if n.op_type == "Cast" and a.name == "to" and a.i in _16BIT:
                a.i = TensorProto.FLOAT
    for v in list(g.input) + list(g.output):
        if v.type.tensor_type.elem_type in _16BIT:
            v.type.tensor_type.elem_type = TensorProto.FLOAT
    del g.value_info[:]
    return twin


def _deploy(source: Captured | OnnxAnalysis, fp32: onnx.ModelProto, plan: dict, keep: bool) -> onnx.ModelProto:
    """The fp16 deployment graph for the CUDA provider of a captured torch model (with its fp32
    export) or an analysed .onnx model, with or without KeepRoundings."""
    build = onnx_passes if isinstance(source, Captured) else analysed_passes
    passes = [p for p in build(source, plan, {}, "deploy", "cuda") if keep or not isinstance(p, KeepRoundings)]
    return run_plan_passes(fp32, passes, source.graph, plan, {}, "deploy", False, "cuda")


@pytest.fixture
def attention_case(tiny_attention) -> tuple[Captured, onnx.ModelProto, np.ndarray]:
    x = torch.randn(3, 6, 32)
    captured = capture(tiny_attention, (x,), name="tiny_attention")
    return captured, torch_to_onnx(tiny_attention, (x,)), x.numpy()


def test_attention_keeps_its_bias_adds_and_scale_apart(attention_case) -> None:
    """Unguarded, ORT folds fc1's bias Add into a BiasGelu and the score scale into a FusedMatMul;
    guarded, the 16-bit Adds read constants at their result's rank, the scale is no longer a scalar,
    and no fusion happens."""
    captured, fp32, x = attention_case
    plan = {name: FP16 for name in captured.graph.layer_names()}
    bare = _deploy(captured, fp32, plan, keep=False)
    fused = Counter(ort_optimized(fp32_twin(bare)))
    assert fused["BiasGelu"] == 1 and fused["FusedMatMul"] >= 1  # the patterns are live in this ORT
    deploy = _deploy(captured, fp32, plan, keep=True)
    kept = Counter(ort_optimized(fp32_twin(deploy)))
    assert kept["BiasGelu"] == 0 and kept["FusedMatMul"] == 0
    assert kept["Add"] == Counter(n.op_type for n in deploy.graph.node)["Add"]
    inits = {t.name: t for t in deploy.graph.initializer}
    scale = next(n for n in deploy.graph.node if n.op_type == "Mul" and any(u in inits for u in n.input))
    assert max(int(np.prod(inits[u].dims)) for u in scale.input if u in inits) > 1
    np.testing.assert_array_equal(run_onnx(fp32_twin(deploy), x), run_onnx(fp32_twin(bare), x))
    with pytest.raises(PassError, match="KeepRoundings"):
        KeepRoundings().ensures(bare)


def _dense_model() -> onnx.ModelProto:
    """x[N,8] -> MatMul + Add(b[16]) -> Relu -> MatMul + Add(b[4]): two dense layers as converters
    other than torch's write them on two dimensions."""
    rng = np.random.default_rng(3)
    inits = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n)
             for n, s in (("w1", (8, 16)), ("b1", (16,)), ("w2", (16, 4)), ("b2", (4,)))]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Add", ["h", "b1"], ["a"]),
             helper.make_node("Relu", ["a"], ["r"]), helper.make_node("MatMul", ["r", "w2"], ["m"]),
             helper.make_node("Add", ["m", "b2"], ["y"])]
    graph = helper.make_graph(nodes, "dense", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_a_2d_dense_layer_becomes_a_gemm_that_ort_leaves_apart_from_its_add() -> None:
    """ORT turns a 2-D MatMul + Add into a Gemm with C (cuBLAS then rounds once), whatever the batch;
    a 16-bit one becomes a Gemm without C, which ORT does not fuse with the Add -- in the fp16
    deployment graph as ORT loads it (MatMulAddFusion runs before the CPU provider's own casts)."""
    x = np.random.default_rng(4).standard_normal((6, 8)).astype(np.float32)
    analysis = OnnxModel.load(_dense_model(), {"x": x}).analysis
    plan = {name: FP16 for name in analysis.graph.layer_names()}
    assert Counter(ort_optimized(_deploy(analysis, analysis.model, plan, keep=False)))["Add"] == 0  # fused into Gemm with C
    deploy = _deploy(analysis, analysis.model, plan, keep=True)
    assert [n.op_type for n in deploy.graph.node if n.op_type in ("MatMul", "Gemm")] == ["Gemm", "Gemm"]
    inits = {t.name: list(t.dims) for t in deploy.graph.initializer}
    assert sorted(inits[n.input[1]] for n in deploy.graph.node if n.op_type == "Add") == [[1, 4], [1, 16]]
    assert Counter(ort_optimized(deploy))["Add"] == 2
    np.testing.assert_allclose(run_onnx(fp32_twin(deploy), x), run_onnx(_dense_model(), x), rtol=1e-2, atol=1e-2)
