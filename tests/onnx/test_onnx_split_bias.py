"""SplitBias: a 16-bit Gemm/Conv layer's bias moves into an Add after the product (ops after, the
fp32 function unchanged, validity); fp32 and fp8 layers keep their fused bias; zero biases go; a
16-bit linear layer's bias Add is in a form ONNX Runtime's optimizers do not fuse."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import onnx
import torch
from deploy_models import run_onnx
from onnx import TensorProto, helper, numpy_helper

from autoprec.capture import capture
from autoprec.export import apply_plan_analysed, torch_to_onnx
from autoprec.formats import Precision
from autoprec.onnx_input import OnnxModel
from passes.onnx_assign_formats import AssignFormats, param_names
from passes.onnx_base import FORMAT, LAYER, POLICY, ROLE, ROLE_CORE, OnnxPassManager, attr, get_meta, set_meta
from passes.onnx_map_layers import MapLayers
from passes.onnx_map_nodes import MapNodes
from passes.onnx_split_bias import SplitBias

BF16, FP16, E4M3 = Precision.BF16, Precision.FP16, Precision.FP8_E4M3


def _split(case, plan):
    model = onnx.ModelProto()
    model.CopyFrom(case.fp32)
    passes = [MapLayers(case.captured, plan), AssignFormats(case.captured.graph, plan, case.amax,
                                                            param_names(case.captured)), SplitBias()]
    return OnnxPassManager(passes).run(model).graph


def _core(model, layer):
    return next(n for n in model.graph.node if get_meta(n, LAYER) == layer and get_meta(n, ROLE) == ROLE_CORE)


def _reader(model, value):
    return [n for n in model.graph.node if value in n.input]


def test_a_16_bit_conv_moves_its_bias_into_an_add(exact_cnn) -> None:
    model = _split(exact_cnn, {"c1": BF16, "c2": FP16, "fc": BF16})
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    core = _core(model, "c1")
    assert core.op_type == "Conv" and len(core.input) == 2
    (add,) = _reader(model, core.output[0])
    assert add.op_type == "Add" and add.input[0] == core.output[0]
    assert np.array_equal(inits[add.input[1]], np.array([96.75, -1.5, 0.25, -60.5]).reshape(4, 1, 1))
    assert get_meta(add, LAYER) == "c1" and get_meta(add, ROLE) is None
    assert get_meta(add, FORMAT) == "bf16" and get_meta(add, POLICY) == "always"
    # c2 has no bias (the exporter wrote zeros) and fc's is zero: nothing to add, the zeros go
    for layer in ("c2", "fc"):
        assert len(_core(model, layer).input) == 2
        assert not any(n.op_type == "Add" and get_meta(n, LAYER) == layer for n in model.graph.node)
    # the function is unchanged in fp32 (these passes only annotate and move the bias)
    assert np.array_equal(run_onnx(model, *exact_cnn.inputs), run_onnx(exact_cnn.fp32, *exact_cnn.inputs))


def test_fp32_and_fp8_layers_keep_their_fused_bias(exact_cnn) -> None:
    model = _split(exact_cnn, {"c1": E4M3})
    assert len(_core(model, "c1").input) == 3  # fp8: an fp32 add before the one rounding
    fp32 = OnnxPassManager([SplitBias()]).run(_gemm_model(1.0, "fp32")).graph
    assert len(next(n for n in fp32.graph.node if n.op_type == "Gemm").input) == 3
    # zeros are dropped whatever the format: c2's (no bias in torch) and fc's (a zero bias)
    assert len(_core(model, "c2").input) == 2 and len(_core(model, "fc").input) == 2


def _gemm_model(beta: float, fmt: str = "fp16") -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((5, 3)).astype(np.float32), "w")
    c = numpy_helper.from_array(rng.standard_normal((5,)).astype(np.float32), "c")
    node = helper.make_node("Gemm", ["x", "w", "c"], ["y"], name="fc", transB=1, beta=beta)
    for key, value in ((ROLE, ROLE_CORE), (FORMAT, fmt), (LAYER, "fc")):
        set_meta(node, key, value)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 5])], [w, c])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)


def test_gemm_beta_is_folded_into_the_moved_bias() -> None:
    x = np.random.default_rng(1).standard_normal((4, 3)).astype(np.float32)
    for beta in (1.0, 0.5):
        before = _gemm_model(beta)
        after = OnnxPassManager([SplitBias()]).run(_gemm_model(beta)).graph
        gemm = next(n for n in after.graph.node if n.op_type == "Gemm")
        assert len(gemm.input) == 2 and attr(gemm, "beta", 1.0) == 1.0
        np.testing.assert_allclose(run_onnx(after, x), run_onnx(before, x), rtol=1e-6, atol=1e-6)
        onnx.checker.check_model(after, full_check=True)


class _LinearGelu(torch.nn.Module):
    """Linear on 3-D input (the exporter's MatMul + Add), GELU, Linear: ORT's BiasGeluFusion pattern."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2 = torch.nn.Linear(8, 16), torch.nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.nn.functional.gelu(self.fc1(x)))


def ort_optimized(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` as ONNX Runtime's CPU provider rewrites it (levels 1 and 2, autoprec's settings)."""
    import onnxruntime as ort

    from autoprec.runtime import DISABLED_OPTIMIZERS

    with tempfile.TemporaryDirectory() as d:
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        so.optimized_model_filepath = str(Path(d) / "opt.onnx")
        so.log_severity_level = 3
        ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"],
                             disabled_optimizers=list(DISABLED_OPTIMIZERS))
        return onnx.load(so.optimized_model_filepath)


def test_ort_keeps_a_16_bit_linear_layers_bias_add_apart() -> None:
    """The exporter's MatMul + Add(1-D bias) + Gelu is fused into BiasGelu by ORT (the sum then goes
    unrounded into the GELU); with the bias stored at the product's rank it is not, and the function
    is the same. The graph after SplitBias is still fp32-typed, so the CPU provider runs the fusions
    it shares with CUDA on it."""
    module = _LinearGelu().eval()
    x = torch.randn(2, 5, 8)
    captured = capture(module, (x,), name="linear_gelu")
    fp32 = torch_to_onnx(module, (x,))
    assert "BiasGelu" in [n.op_type for n in ort_optimized(fp32).graph.node]  # the pattern is live
    plan = {name: FP16 for name in captured.graph.layer_names()}
    model = onnx.ModelProto()
    model.CopyFrom(fp32)
    passes = [MapLayers(captured, plan), AssignFormats(captured.graph, plan, {}, param_names(captured)), SplitBias()]
    model = OnnxPassManager(passes).run(model).graph
    inits = {t.name: list(t.dims) for t in model.graph.initializer}
    adds = [n for n in model.graph.node if n.op_type == "Add" and get_meta(n, LAYER)]
    assert sorted(inits[n.input[1]] for n in adds) == [[1, 1, 4], [1, 1, 16]]
    optimized = [n.op_type for n in ort_optimized(model).graph.node]
    assert "BiasGelu" not in optimized and optimized.count("Add") == 2 and "Gemm" not in optimized
    np.testing.assert_array_equal(run_onnx(model, x.numpy()), run_onnx(fp32, x.numpy()))


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


def test_ort_keeps_a_16_bit_2d_dense_layers_bias_add_apart() -> None:
    """ORT turns a 2-D MatMul + Add into a Gemm with C (cuBLAS then rounds once), batch dynamic or not;
    a 16-bit layer's MatMul becomes a Gemm without C, which ORT does not fuse with the Add, in the
    fp16 deployment graph as ORT loads it."""
    fp32 = _dense_model()
    x = np.random.default_rng(4).standard_normal((6, 8)).astype(np.float32)
    assert "MatMul" not in [n.op_type for n in ort_optimized(fp32).graph.node]  # fused into Gemm
    analysis = OnnxModel.load(fp32, {"x": x}).analysis
    plan = {name: FP16 for name in analysis.graph.layer_names()}
    model = onnx.ModelProto()
    model.CopyFrom(analysis.model)
    moved = OnnxPassManager([MapNodes(analysis), AssignFormats(analysis.graph, plan, {}), SplitBias()]).run(model).graph
    cores = [n for n in moved.graph.node if get_meta(n, ROLE) == ROLE_CORE]
    assert [(n.op_type, len(n.input)) for n in cores] == [("Gemm", 2), ("Gemm", 2)]
    inits = {t.name: list(t.dims) for t in moved.graph.initializer}
    assert sorted(inits[n.input[1]] for n in moved.graph.node if n.op_type == "Add") == [[1, 4], [1, 16]]
    np.testing.assert_allclose(run_onnx(moved, x), run_onnx(fp32, x), rtol=1e-6, atol=1e-6)
    deploy = apply_plan_analysed(analysis, plan, mode="deploy", provider="cuda")
    optimized = ort_optimized(deploy).graph.node
    assert sum(n.op_type == "Add" for n in optimized) == 2 and not any(len(n.input) > 2 for n in optimized
                                                                      if n.op_type == "Gemm")
