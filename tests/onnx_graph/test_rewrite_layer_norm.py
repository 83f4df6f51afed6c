"""Layer-norm fusion (autoprec.onnx.rewrites.layer_norm): the forms fused, the forms left and found, numerics, validity."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import helper
from onnx_graph_models import assert_same_outputs, init, make, ops, vi

from autoprec.onnx.rewrites.layer_norm import decomposed_layer_norms, fuse_layer_norms


def _layer_norm(opset: int = 21, square: str = "pow", shift: bool = True, scale: bool = True, axes: tuple = (-1,),
                gamma_shape: tuple = (8,), residual: bool = False, swap: bool = False) -> onnx.ModelProto:
    """x[N,4,8] -> ReduceMean, Sub, Pow 2 (or x * x), ReduceMean, Add eps, Sqrt, Div[, Mul gamma[, Add beta]]
    -> y, the means over ``axes`` (an attribute below opset 18, an input from it); ``residual``: the
    scaled value plus x instead of a shift; ``swap``: the operands of every Add and Mul swapped."""
    n = helper.make_node
    rng = np.random.default_rng(0)

    def ab(a: str, b: str) -> list[str]:
        return [b, a] if swap else [a, b]

    def mean(src: str, out: str, name: str) -> onnx.NodeProto:
        if opset >= 18:
            return n("ReduceMean", [src, "axes"], [out], name=name)
        return n("ReduceMean", [src], [out], name=name, axes=list(axes))

    last = "y" if not scale else "xn"
    nodes = [mean("x", "mu", "/ln/ReduceMean"), n("Sub", ["x", "mu"], ["xc"]),
             n("Pow", ["xc", "two"], ["sq"]) if square == "pow" else n("Mul", ["xc", "xc"], ["sq"]),
             mean("sq", "var", "/ln/ReduceMean_1"), n("Add", ab("var", "eps"), ["ve"]), n("Sqrt", ["ve"], ["sd"]),
             n("Div", ["xc", "sd"], [last])]
    nodes[0].metadata_props.add(key="pkg.torch.onnx.name_scopes", value="['', 'ln']")
    inits = [init("eps", np.array(1e-5, np.float32))]
    if square == "pow":
        inits.append(init("two", np.array(2.0, np.float32)))
    if opset >= 18:
        inits.append(init("axes", np.array(axes, np.int64)))
    if scale:
        nodes.append(n("Mul", ab("xn", "gamma"), ["xg" if shift or residual else "y"]))
        inits.append(init("gamma", (1 + 0.1 * rng.standard_normal(gamma_shape)).astype(np.float32)))
        if shift:
            nodes.append(n("Add", ab("xg", "beta"), ["y"]))
            inits.append(init("beta", (0.1 * rng.standard_normal(8)).astype(np.float32)))
        elif residual:
            nodes.append(n("Add", ab("xg", "x"), ["y"]))
    return make(nodes, [vi("x", ["N", 4, 8])], [vi("y", ["N", 4, 8])], inits, opset=opset, ir=10)


def _fused(source: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    model = onnx.ModelProto()
    model.CopyFrom(source)
    return model, fuse_layer_norms(model)


X = np.random.default_rng(1).standard_normal((2, 4, 8)).astype(np.float32)


@pytest.mark.parametrize("opset", [17, 21])
@pytest.mark.parametrize("square", ["pow", "mul"])
@pytest.mark.parametrize("shift", [True, False])
@pytest.mark.parametrize("swap", [False, True])
def test_a_layer_norm_over_the_last_axis_becomes_one_layer_normalization(opset: int, square: str, shift: bool,
                                                                        swap: bool) -> None:
    source = _layer_norm(opset, square, shift, swap=swap)
    model, count = _fused(source)
    assert count == 1 and ops(model) == ["LayerNormalization"]
    ln = model.graph.node[0]
    assert (ln.name, list(ln.input), list(ln.output)) == ("/ln/LayerNormalization", ["x", "gamma"] + ["beta"] * shift, ["y"])
    assert {(a.name, helper.get_attribute_value(a)) for a in ln.attribute} == {("axis", -1), ("epsilon", np.float32(1e-5))}
    assert {(p.key, p.value) for p in ln.metadata_props} == {("pkg.torch.onnx.name_scopes", "['', 'ln']")}
    assert {t.name for t in model.graph.initializer} == ({"gamma", "beta"} if shift else {"gamma"})
    assert_same_outputs(source, model, {"x": X}, rtol=1e-6)
    onnx.checker.check_model(model, full_check=True)


@pytest.mark.parametrize("form", [{"scale": False}, {"axes": (-2, -1)}, {"gamma_shape": (1, 8)},
                                  {"shift": False, "residual": True}, {"opset": 16}])
def test_forms_layer_normalization_does_not_say_as_matched_stay_and_are_found(form: dict) -> None:
    """No scale, other axes, a scale that is not 1-D, a residual Add after a norm without shift, an
    opset without LayerNormalization: the nodes stay, and the analysis finds them as one norm."""
    source = _layer_norm(**form)
    model, count = _fused(source)
    assert count == 0 and ops(model) == ops(source)
    (chain,) = decomposed_layer_norms(ir.serde.deserialize_model(model).graph)
    assert [n.op_type for n in chain] == ops(source)
    assert_same_outputs(source, model, {"x": X})
    onnx.checker.check_model(model, full_check=True)
