"""Erf-GELU fusion (autoprec.onnx.rewrites.erf_gelu): every form fused, near misses left, numerics, validity."""

from __future__ import annotations

import math

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import helper
from onnx_graph_models import assert_same_outputs, init, make, ops, vi

from autoprec.onnx.rewrites.erf_gelu import erf_gelu_nodes, fuse_erf_gelus

PRODUCTS = ("x_first", "half_first", "a_first")


def _gelu(pre: str, product: str, opset: int = 21, half: float = 0.5, leak: bool = False,
          swap: bool = False) -> onnx.ModelProto:
    """x -> MatMul -> erf GELU -> y in one of the forms exporters write: ``pre`` "div" (h / sqrt 2)
    or "mul" (h * 1/sqrt 2); ``product`` (h * a) * 0.5, (h * 0.5) * a or h * (a * 0.5); ``swap``
    the operands of every Add and Mul; ``leak``: the Erf's result is a graph output too."""
    n = helper.make_node

    def ab(a: str, b: str) -> list[str]:
        return [b, a] if swap else [a, b]

    scale = ("sqrt2", math.sqrt(2.0)) if pre == "div" else ("isqrt2", math.sqrt(0.5))
    nodes = [n("MatMul", ["x", "w"], ["h"], name="fc"),
             n("Div", ["h", scale[0]], ["d"], name="/act/Div") if pre == "div" else n("Mul", ab("h", scale[0]), ["d"], name="/act/Mul"),
             n("Erf", ["d"], ["e"], name="/act/Erf"), n("Add", ab("e", "one"), ["a"], name="/act/Add")]
    nodes[2].metadata_props.add(key="pkg.torch.onnx.name_scopes", value="['', 'act']")
    nodes += {"x_first": [n("Mul", ab("h", "a"), ["m"]), n("Mul", ab("m", "half"), ["y"])],
              "half_first": [n("Mul", ab("h", "half"), ["m"]), n("Mul", ab("m", "a"), ["y"])],
              "a_first": [n("Mul", ab("a", "half"), ["m"]), n("Mul", ab("h", "m"), ["y"])]}[product]
    rng = np.random.default_rng(0)
    inits = [init("w", rng.standard_normal((6, 6)).astype(np.float32)), init(scale[0], np.array(scale[1], np.float32)),
             init("one", np.array(1.0, np.float32)), init("half", np.array(half, np.float32))]
    outputs = [vi("y", ["N", 6])] + ([vi("e", ["N", 6])] if leak else [])
    return make(nodes, [vi("x", ["N", 6])], outputs, inits, opset=opset, ir=10)


def _fused(source: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    model = onnx.ModelProto()
    model.CopyFrom(source)
    return model, fuse_erf_gelus(model)


@pytest.mark.parametrize("swap", [False, True])
@pytest.mark.parametrize("pre", ["div", "mul"])
@pytest.mark.parametrize("product", PRODUCTS)
def test_every_form_of_the_erf_gelu_becomes_one_gelu(pre: str, product: str, swap: bool) -> None:
    source = _gelu(pre, product, swap=swap)
    model, count = _fused(source)
    assert count == 1 and ops(model) == ["MatMul", "Gelu"]
    gelu = model.graph.node[1]
    assert (gelu.name, list(gelu.input), list(gelu.output)) == ("/act/Gelu", ["h"], ["y"])
    assert {(p.key, p.value) for p in gelu.metadata_props} == {("pkg.torch.onnx.name_scopes", "['', 'act']")}
    assert {t.name for t in model.graph.initializer} == {"w"}  # the formula's constants are gone
    x = np.random.default_rng(1).standard_normal((4, 6)).astype(np.float32)
    assert_same_outputs(source, model, {"x": x}, rtol=1e-6)
    onnx.checker.check_model(model, full_check=True)


@pytest.mark.parametrize("near_miss", [{"half": 0.6}, {"leak": True}, {"opset": 19}])
def test_near_misses_stay_as_they_are(near_miss: dict) -> None:
    """Another constant, a value of the formula that other nodes read, and an opset without Gelu."""
    source = _gelu("div", "x_first", **near_miss)
    model, count = _fused(source)
    assert count == 0 and ops(model) == ops(source)
    x = np.random.default_rng(2).standard_normal((4, 6)).astype(np.float32)
    assert_same_outputs(source, model, {"x": x})
    onnx.checker.check_model(model, full_check=True)


def test_below_opset_20_the_pieces_are_found_by_the_same_rules() -> None:
    model = ir.serde.deserialize_model(_gelu("mul", "a_first", opset=19))
    assert [[n.op_type for n in gelu] for gelu in erf_gelu_nodes(model)] == [["Mul", "Erf", "Add", "Mul", "Mul"]]
    assert erf_gelu_nodes(ir.serde.deserialize_model(_gelu("mul", "a_first", opset=19, half=0.6))) == []


def test_a_gelu_inside_a_control_flow_body_is_left_alone() -> None:
    """Later passes rewrite top-level nodes only, so the fusion does not reach into subgraphs."""
    body = _gelu("div", "x_first").graph
    then = helper.make_graph(list(body.node), "then", [], [vi("y", ["N", 6])], list(body.initializer))
    other = helper.make_graph([helper.make_node("Identity", ["x"], ["z"])], "else", [], [vi("z", ["N", 6])])
    source = make([helper.make_node("If", ["c"], ["out"], then_branch=then, else_branch=other)],
                  [vi("x", ["N", 6]), vi("c", [], onnx.TensorProto.BOOL)], [vi("out", ["N", 6])], opset=21, ir=10)
    model, count = _fused(source)
    branch = next(a.g for a in model.graph.node[0].attribute if a.name == "then_branch")
    assert count == 0 and [n.op_type for n in branch.node] == [n.op_type for n in then.node]
    x = np.random.default_rng(3).standard_normal((4, 6)).astype(np.float32)
    assert_same_outputs(source, model, {"x": x, "c": np.array(True)})
    onnx.checker.check_model(model, full_check=True)
