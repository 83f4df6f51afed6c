"""SplitBias: a 16-bit Gemm/Conv layer's bias moves into an Add after the product (ops after, the
fp32 function unchanged, validity); fp32 and fp8 layers keep their fused bias; zero biases go."""

from __future__ import annotations

import numpy as np
import onnx
from deploy_models import run_onnx
from onnx import TensorProto, helper, numpy_helper

from autoprec.core.formats import Precision
from autoprec.onnx.passes.assign_formats import AssignFormats, param_names
from autoprec.core.passes import PassManager
from autoprec.onnx.passes.base import FORMAT, LAYER, POLICY, ROLE, ROLE_CORE, attr, get_meta, set_meta
from autoprec.onnx.passes.map_layers import MapLayers
from autoprec.onnx.passes.split_bias import SplitBias

BF16, FP16, E4M3 = Precision.BF16, Precision.FP16, Precision.FP8_E4M3


def _split(case, plan):
    model = onnx.ModelProto()
    model.CopyFrom(case.fp32)
    passes = [MapLayers(case.captured, plan), AssignFormats(case.captured.graph, plan, case.amax,
                                                            param_names(case.captured)), SplitBias()]
    return PassManager(passes).run(model).graph


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
    fp32 = PassManager([SplitBias()]).run(_gemm_model(1.0, "fp32")).graph
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
        after = PassManager([SplitBias()]).run(_gemm_model(beta)).graph
        gemm = next(n for n in after.graph.node if n.op_type == "Gemm")
        assert len(gemm.input) == 2 and attr(gemm, "beta", 1.0) == 1.0
        np.testing.assert_allclose(run_onnx(after, x), run_onnx(before, x), rtol=1e-6, atol=1e-6)
        onnx.checker.check_model(after, full_check=True)
