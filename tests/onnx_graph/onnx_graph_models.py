"""Small ONNX models written by hand with onnx.helper, the way older exporters and other tools write
them (old opsets, Constant-node weights, transposed weights, Gemm with transB, erf-form GELU,
control flow), plus an ONNX Runtime runner for numerics checks."""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

F = TensorProto.FLOAT


def make(nodes: Sequence[onnx.NodeProto], inputs: Sequence[onnx.ValueInfoProto],
         outputs: Sequence[onnx.ValueInfoProto], inits: Sequence[onnx.TensorProto] = (),
         opset: int = 13, ir: int = 7, extra_opsets: Mapping[str, int] | None = None) -> onnx.ModelProto:
    graph = helper.make_graph(list(nodes), "g", list(inputs), list(outputs), initializer=list(inits))
    ops = [helper.make_opsetid("", opset)] + [helper.make_opsetid(d, v) for d, v in (extra_opsets or {}).items()]
    model = helper.make_model(graph, opset_imports=ops)
    model.ir_version = ir
    return model


def vi(name: str, shape: Sequence[int | str] | None, elem: int = F) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem, shape)


def init(name: str, value: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(value), name)


def run(model: onnx.ModelProto, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(None, dict(feeds))


def mlp_opset13(seed: int = 0) -> onnx.ModelProto:
    """x[N,8] -> MatMul(Transpose(Constant W[4,8])) -> Relu -> Gemm(transB, W2[3,4], b2) -> y[N,3].

    The first weight is a Constant node stored transposed (as torch stores nn.Linear weights), the
    nodes have no names, and the opset is 13.
    """
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((4, 8)).astype(np.float32)
    nodes = [
        helper.make_node("Constant", [], ["w"], value=numpy_helper.from_array(w, "w_value")),
        helper.make_node("Transpose", ["w"], ["w_t"], perm=[1, 0]),
        helper.make_node("MatMul", ["x", "w_t"], ["h"]),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("Gemm", ["r", "w2", "b2"], ["y"], transB=1),
    ]
    inits = [init("w2", rng.standard_normal((3, 4)).astype(np.float32)),
             init("b2", rng.standard_normal(3).astype(np.float32))]
    return make(nodes, [vi("x", ["N", 8])], [vi("y", ["N", 3])], inits)


def gelu_opset13() -> onnx.ModelProto:
    """x[N,6] -> MatMul(W) -> erf-form GELU (Div, Erf, Add, Mul, Mul) -> y, as torch's old exporter."""
    rng = np.random.default_rng(1)
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"], name="fc"),
        helper.make_node("Div", ["h", "sqrt2"], ["d"], name="gelu_div"),
        helper.make_node("Erf", ["d"], ["e"], name="gelu_erf"),
        helper.make_node("Add", ["e", "one"], ["a"], name="gelu_add"),
        helper.make_node("Mul", ["h", "a"], ["m"], name="gelu_mul"),
        helper.make_node("Mul", ["m", "half"], ["y"], name="gelu_half"),
    ]
    inits = [init("w", rng.standard_normal((6, 6)).astype(np.float32)),
             init("sqrt2", np.array(math.sqrt(2.0), np.float32)), init("one", np.array(1.0, np.float32)),
             init("half", np.array(0.5, np.float32))]
    return make(nodes, [vi("x", ["N", 6])], [vi("y", ["N", 6])], inits)


def if_model() -> onnx.ModelProto:
    """Relu(x) then If(c): MatMul with W1 in one branch, W2 in the other (weights from the outer
    scope), then Add(b). Opset 13."""
    rng = np.random.default_rng(2)
    then_g = helper.make_graph([helper.make_node("MatMul", ["r", "w1"], ["t"], name="then_mm")], "then",
                               [], [vi("t", ["N", 4])])
    else_g = helper.make_graph([helper.make_node("MatMul", ["r", "w2"], ["t2"], name="else_mm"),
                                helper.make_node("Neg", ["t2"], ["t3"], name="else_neg")], "else",
                               [], [vi("t3", ["N", 4])])
    nodes = [
        helper.make_node("Relu", ["x"], ["r"], name="relu"),
        helper.make_node("If", ["c"], ["y0"], name="branch", then_branch=then_g, else_branch=else_g),
        helper.make_node("Add", ["y0", "b"], ["y"], name="bias"),
    ]
    inits = [init("w1", rng.standard_normal((8, 4)).astype(np.float32)),
             init("w2", rng.standard_normal((8, 4)).astype(np.float32)),
             init("b", rng.standard_normal(4).astype(np.float32))]
    return make(nodes, [vi("x", ["N", 8]), vi("c", [], TensorProto.BOOL)], [vi("y", ["N", 4])], inits)


def loop_model() -> onnx.ModelProto:
    """v <- v @ W + v, three times (a Loop whose body reads W from the outer scope). Opset 13."""
    rng = np.random.default_rng(3)
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]),
         helper.make_node("MatMul", ["v_in", "w"], ["vw"]),
         helper.make_node("Add", ["vw", "v_in"], ["v_out"])],
        "body",
        [vi("i", [], TensorProto.INT64), vi("cond_in", [], TensorProto.BOOL), vi("v_in", ["N", 4])],
        [vi("cond_out", [], TensorProto.BOOL), vi("v_out", ["N", 4])])
    nodes = [
        helper.make_node("MatMul", ["x", "w0"], ["v0"], name="proj"),
        helper.make_node("Loop", ["trips", "", "v0"], ["v"], name="loop", body=body),
        helper.make_node("Relu", ["v"], ["y"], name="act"),
    ]
    inits = [init("w0", rng.standard_normal((6, 4)).astype(np.float32)),
             init("w", (0.1 * rng.standard_normal((4, 4))).astype(np.float32)),
             init("trips", np.array(3, np.int64))]
    return make(nodes, [vi("x", ["N", 6])], [vi("y", ["N", 4])], inits)


def conv_model() -> onnx.ModelProto:
    """x[N,3,8,8] -> Conv(W[4,3,3,3], B) -> Relu -> MaxPool 2x2 -> Flatten -> Gemm -> Softmax."""
    rng = np.random.default_rng(4)
    nodes = [
        helper.make_node("Conv", ["x", "cw", "cb"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("MaxPool", ["r"], ["p"], name="pool", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Flatten", ["p"], ["f"], name="flat"),
        helper.make_node("Gemm", ["f", "fw", "fb"], ["l"], name="fc", transB=1),
        helper.make_node("Softmax", ["l"], ["y"], name="softmax", axis=-1),
    ]
    inits = [init("cw", rng.standard_normal((4, 3, 3, 3)).astype(np.float32)),
             init("cb", rng.standard_normal(4).astype(np.float32)),
             init("fw", rng.standard_normal((5, 64)).astype(np.float32)),
             init("fb", rng.standard_normal(5).astype(np.float32))]
    return make(nodes, [vi("x", ["N", 3, 8, 8])], [vi("y", ["N", 5])], inits)


def block_opset13(seed: int = 5) -> onnx.ModelProto:
    """A transformer-style block as an old exporter writes it, opset 13, nodes unnamed:
    x[N,T,8] -> layer norm decomposed (ReduceMean, Sub, Pow, ReduceMean, Add, Sqrt, Div, Mul, Add)
    -> MatMul(W1 from a Constant node) + Add(b1) -> erf GELU -> MatMul(W2) + Add(b2) -> + x
    -> ReduceMean over T -> Gemm(transB) -> y[N,5] (logits)."""
    rng = np.random.default_rng(seed)
    w1 = (rng.standard_normal((8, 16)) / math.sqrt(8)).astype(np.float32)
    n = helper.make_node
    nodes = [
        n("ReduceMean", ["x"], ["mu"], axes=[-1]),
        n("Sub", ["x", "mu"], ["xc"]),
        n("Pow", ["xc", "two"], ["sq"]),
        n("ReduceMean", ["sq"], ["var"], axes=[-1]),
        n("Add", ["var", "eps"], ["ve"]),
        n("Sqrt", ["ve"], ["sd"]),
        n("Div", ["xc", "sd"], ["xn"]),
        n("Mul", ["xn", "gamma"], ["xg"]),
        n("Add", ["xg", "beta"], ["ln"]),
        n("Constant", [], ["w1"], value=numpy_helper.from_array(w1, "w1_value")),
        n("MatMul", ["ln", "w1"], ["h0"]),
        n("Add", ["h0", "b1"], ["h"]),
        n("Div", ["h", "sqrt2"], ["d"]),
        n("Erf", ["d"], ["e"]),
        n("Add", ["e", "one"], ["a"]),
        n("Mul", ["h", "a"], ["m"]),
        n("Mul", ["m", "half"], ["g"]),
        n("MatMul", ["g", "w2"], ["o0"]),
        n("Add", ["o0", "b2"], ["o"]),
        n("Add", ["o", "x"], ["r"]),
        n("ReduceMean", ["r"], ["pooled"], axes=[1], keepdims=0),
        n("Gemm", ["pooled", "wh", "bh"], ["y"], transB=1),
    ]
    inits = [init("two", np.array(2.0, np.float32)), init("eps", np.array(1e-5, np.float32)),
             init("gamma", (1 + 0.1 * rng.standard_normal(8)).astype(np.float32)),
             init("beta", (0.1 * rng.standard_normal(8)).astype(np.float32)),
             init("b1", (0.1 * rng.standard_normal(16)).astype(np.float32)),
             init("sqrt2", np.array(math.sqrt(2.0), np.float32)), init("one", np.array(1.0, np.float32)),
             init("half", np.array(0.5, np.float32)),
             init("w2", (rng.standard_normal((16, 8)) / 4).astype(np.float32)),
             init("b2", (0.1 * rng.standard_normal(8)).astype(np.float32)),
             init("wh", rng.standard_normal((5, 8)).astype(np.float32)),
             init("bh", (0.1 * rng.standard_normal(5)).astype(np.float32))]
    return make(nodes, [vi("x", ["N", 6, 8])], [vi("y", ["N", 5])], inits)


def ops(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]


def assert_same_outputs(before: onnx.ModelProto, after: onnx.ModelProto, feeds: Mapping[str, np.ndarray],
                        rtol: float = 0.0) -> None:
    """``after`` computes ``before``'s outputs on ``feeds`` (ONNX Runtime, CPU): bit for bit with
    ``rtol`` 0, else within ``rtol`` relative to each output's largest magnitude."""
    for want, got in zip(run(before, feeds), run(after, feeds), strict=True):
        if rtol == 0.0:
            np.testing.assert_array_equal(got, want)
        else:
            np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * float(np.abs(want).max()))
