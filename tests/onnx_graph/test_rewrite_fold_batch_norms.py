"""Batch-norm folding (autoprec.onnx.rewrites.fold_batch_norms): which norms fold, the weights they leave, numerics, validity."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
from onnx import helper, numpy_helper
from onnx_graph_models import assert_same_outputs, init, make, ops, vi

from autoprec.core.bn_fold import fold_batch_norm
from autoprec.onnx.bn_fold import fold_onnx_batch_norms
from autoprec.onnx.rewrites.fold_batch_norms import FoldBatchNorms


def _norm(p: str, n: int, rng: np.random.Generator) -> list[onnx.TensorProto]:
    return [init(f"{p}_s", rng.standard_normal(n).astype(np.float32)),
            init(f"{p}_b", rng.standard_normal(n).astype(np.float32)),
            init(f"{p}_m", rng.standard_normal(n).astype(np.float32)),
            init(f"{p}_v", (0.5 + rng.random(n)).astype(np.float32))]


def _conv_norms() -> onnx.ModelProto:
    """x -> Conv(no bias) -> BN -> Relu -> Conv(its own bias "w2.bias") -> BN -> Conv(bias) whose
    result is also a graph output -> BN (stays) -> y; opset 21."""
    rng = np.random.default_rng(0)
    n = helper.make_node
    nodes = [
        n("Conv", ["x", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        n("BatchNormalization", ["c1", "n1_s", "n1_b", "n1_m", "n1_v"], ["n1"], name="bn1", epsilon=1e-3),
        n("Relu", ["n1"], ["r"], name="relu"),
        n("Conv", ["r", "w2", "w2.bias"], ["c2"], name="conv2"),
        n("BatchNormalization", ["c2", "n2_s", "n2_b", "n2_m", "n2_v"], ["n2"], name="bn2"),
        n("Conv", ["n2", "w3", "b3"], ["c3"], name="conv3"),
        n("BatchNormalization", ["c3", "n3_s", "n3_b", "n3_m", "n3_v"], ["y"], name="bn3"),
    ]
    inits = [init("w1", rng.standard_normal((4, 3, 3, 3)).astype(np.float32)),
             init("w2", rng.standard_normal((4, 4, 1, 1)).astype(np.float32)),
             init("w2.bias", rng.standard_normal(4).astype(np.float32)),
             init("w3", rng.standard_normal((4, 4, 1, 1)).astype(np.float32)),
             init("b3", rng.standard_normal(4).astype(np.float32))]
    inits += _norm("n1", 4, rng) + _norm("n2", 4, rng) + _norm("n3", 4, rng)
    return make(nodes, [vi("x", ["N", 3, 6, 6])], [vi("y", ["N", 4, 6, 6]), vi("c3", ["N", 4, 6, 6])], inits,
                opset=21, ir=10)


def test_norms_that_alone_read_a_conv_fold_into_it() -> None:
    source = _conv_norms()
    model = onnx.ModelProto()
    model.CopyFrom(source)
    assert fold_onnx_batch_norms(model) == ["bn1", "bn2"]
    assert ops(model) == ["Conv", "Relu", "Conv", "Conv", "BatchNormalization"]
    conv1, _, conv2, conv3, _ = model.graph.node
    assert (conv1.name, list(conv1.input), list(conv1.output)) == ("conv1", ["x", "w1", "w1.bias"], ["n1"])
    assert (conv2.name, list(conv2.input), list(conv2.output)) == ("conv2", ["r", "w2", "w2.bias"], ["n2"])
    assert list(conv3.input) == ["n2", "w3", "b3"]  # its result is a graph output: the norm stays
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    assert not any(k.startswith(("n1_", "n2_")) for k in inits)
    src = {t.name: numpy_helper.to_array(t) for t in source.graph.initializer}
    w, b = fold_batch_norm(src["w1"], None, src["n1_m"], src["n1_v"], src["n1_s"], src["n1_b"], np.float32(1e-3))
    assert np.array_equal(inits["w1"], w) and np.array_equal(inits["w1.bias"], b)  # core.bn_fold's numbers
    x = np.random.default_rng(1).standard_normal((2, 3, 6, 6)).astype(np.float32)
    assert_same_outputs(source, model, {"x": x}, rtol=1e-6)
    onnx.checker.check_model(model, full_check=True)


def test_norms_after_a_shared_weight_or_a_shared_result_stay() -> None:
    """Two Convs reading one weight, and a Conv whose result another node reads too: folding would
    change what the others compute, so the norms stay."""
    rng = np.random.default_rng(2)
    n = helper.make_node
    nodes = [n("Conv", ["x", "w"], ["c1"], name="conv1"),
             n("BatchNormalization", ["c1", "n1_s", "n1_b", "n1_m", "n1_v"], ["y1"], name="bn1"),
             n("Conv", ["x", "w"], ["c2"], name="conv2"),
             n("Relu", ["c2"], ["r2"], name="relu"),
             n("BatchNormalization", ["c2", "n2_s", "n2_b", "n2_m", "n2_v"], ["b2"], name="bn2"),
             n("Add", ["b2", "r2"], ["y2"], name="add")]
    model = make(nodes, [vi("x", [2, 3, 4, 4])], [vi("y1", [2, 4, 4, 4]), vi("y2", [2, 4, 4, 4])],
                 [init("w", rng.standard_normal((4, 3, 1, 1)).astype(np.float32))] + _norm("n1", 4, rng)
                 + _norm("n2", 4, rng), opset=21, ir=10)
    ir_model = ir.serde.deserialize_model(model)
    result = FoldBatchNorms()(ir_model)
    assert (result.count, result.modified, result.norms) == (0, False, ())
    after = ir.serde.serialize_model(ir_model)
    assert ops(after) == ops(model)
    x = rng.standard_normal((2, 3, 4, 4)).astype(np.float32)
    assert_same_outputs(model, after, {"x": x})
    onnx.checker.check_model(after, full_check=True)
