"""Erf-GELU fusion: x * 0.5 * (1 + erf(x / sqrt(2))) written as separate nodes becomes one ONNX ``Gelu`` (opset 20).

Why: ONNX Runtime fuses those nodes into one Gelu kernel anyway (its GeluFusion), and as one op the
GELU is an ordinary FOLLOW op the plan can run in 16 bits. Left decomposed, each node would round in
16 bits on a GPU while the plan's numerics round the GELU once, so it would have to compute in fp32
between casts (below opset 20, where ONNX has no Gelu, the analyser keeps the pieces fp32:
:func:`erf_gelu_nodes` finds them).

onnxscript rewrite rules, one per form older exporters write: Div by sqrt(2) (or Mul by its
inverse), Erf, Add 1, then a product of x, that sum and 0.5 in two Muls -- (x * a) * 0.5,
(x * 0.5) * a or x * (a * 0.5) -- with every Add and Mul in either operand order. The check holds
the constants to the formula (one-element initializers within 1e-6 relative), and the rewriter's
own condition that no value but the result leaves the matched nodes makes the replacement change
nothing else. The ``Gelu`` is named after the Erf ("Erf" becomes "Gelu" in the name) and keeps its
metadata (the exporter's scope; keys only the other nodes carry are merged in by the rewriter).
Control-flow bodies are left as they are. Constants only the GELUs read are dropped.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import onnx
import onnx_ir as ir
from onnxscript.rewriter import MatchContext, RewriteRule, RewriterContext, RewriteRuleSet
from onnxscript.rewriter.pattern import OpsetPatternBuilder, Var

from autoprec.onnx.rewrites.base import (Rewrite, RewriteResult, apply_rules, apply_to_proto, fused_name,
                                         on_main_graph, onnx_opset, scalar)

#: The first ONNX opset with a Gelu op.
GELU_OPSET = 20

_PRODUCTS = ("x_first", "half_first", "a_first")


def _near(value: float | None, want: float) -> bool:
    """Whether a constant is the formula's, within float32's rounding of it."""
    return value is not None and abs(value - want) <= 1e-6 * abs(want)


def _pattern(pre: str, product: str) -> Callable[..., Any]:
    """The pattern of one form: ``pre`` "Div" (x / sqrt 2) or "Mul" (x * 1/sqrt 2), ``product``
    one of :data:`_PRODUCTS`."""

    def pattern(op: OpsetPatternBuilder, x: Var, scale: Var, one: Var, half: Var) -> Any:
        inner = op.Div(x, scale) if pre == "Div" else op.Mul(x, scale)
        a = op.Add(op.Erf(inner, _outputs=["erf"]), one)
        if product == "x_first":
            return op.Mul(op.Mul(x, a), half)
        if product == "half_first":
            return op.Mul(op.Mul(x, half), a)
        return op.Mul(x, op.Mul(a, half))

    return pattern


def _check(pre: str) -> Callable[..., bool]:
    """The condition of the forms whose first node is ``pre``: x is no constant, the three
    constants are the formula's, and the match is in the main graph."""
    want = math.sqrt(2.0) if pre == "Div" else math.sqrt(0.5)

    def check(context: MatchContext, x: ir.Value, scale: ir.Value, one: ir.Value, half: ir.Value,
              **_: ir.Value) -> bool:
        return (on_main_graph(context) and scalar(x) is None and _near(scalar(scale), want)
                and _near(scalar(one), 1.0) and _near(scalar(half), 0.5))

    return check


def _gelu(op: RewriterContext, x: ir.Value, erf: ir.Value, **_: ir.Value) -> ir.Value:
    """The replacement: one Gelu of x, named after the Erf and with its metadata (the exporter's scope)."""
    node = erf.producer()
    assert node is not None
    out = op.Gelu(x, _name=fused_name(node, "Gelu"))
    out.producer().metadata_props.update(node.metadata_props)
    return out


#: Every form of the erf GELU, each Add and Mul in either operand order.
RULES = RewriteRuleSet([RewriteRule(_pattern(pre, product), _gelu, _check(pre))
                        for pre in ("Div", "Mul") for product in _PRODUCTS], commute=True)


class FuseErfGelus(Rewrite):
    """Replace each erf GELU of the main graph by one ``Gelu``; below opset 20 nothing changes. The
    result counts the GELUs fused."""

    def call(self, model: ir.Model) -> RewriteResult:
        if onnx_opset(model) < GELU_OPSET:
            return RewriteResult(model, False, 0)
        return apply_rules(RULES, model)


def fuse_erf_gelus(model: onnx.ModelProto) -> int:
    """Fuse ``model``'s erf GELUs in place (:class:`FuseErfGelus`); returns how many."""
    return apply_to_proto(FuseErfGelus(), model).count


def erf_gelu_nodes(model: ir.Model) -> list[list[ir.Node]]:
    """The nodes of each erf GELU of the main graph (graph order), by the rules the fusion applies:
    what :class:`FuseErfGelus` would replace, for models below opset 20 that keep them."""
    graph = model.graph
    order = {node: k for k, node in enumerate(graph)}
    found: list[list[ir.Node]] = []
    for node in graph:
        match = next((m for m in (rule.match(model, graph, node) for rule in RULES) if m), None)
        if match:
            found.append(sorted(match.nodes, key=order.__getitem__))
    return found
