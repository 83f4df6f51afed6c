"""Layer-norm fusion: a layer norm written as separate nodes becomes one ONNX ``LayerNormalization`` (opset 17).

The nodes: ReduceMean(x), Sub(x, mean), Pow(., 2) or x * x, ReduceMean, Add(eps), Sqrt, Div, Mul(scale)
[, Add(shift)], as exporters before opset 17 write it. Why: a decomposed layer norm is nine kernels on a GPU, one op. It stays fp32 either way (a NEVER
op), so plans do not change, but the deployed file runs it as one kernel, as ONNX Runtime's own
LayerNormFusion would (autoprec's sessions disable that fusion, see :mod:`autoprec.ort.runtime`).

onnxscript rewrite rules (with and without the shift Add, the square as Pow or x * x, every Add and
Mul in either operand order) matched strictly by their check: both means over axis -1 with kept
dims, a square (Pow 2 or x * x), a constant epsilon >= 0, a 1-D fp32 scale and optional 1-D fp32
shift, all initializers; the rewriter itself requires that no value but the result leaves the
matched nodes. A scale whose only reader is an Add is fused with that Add as the shift or not at
all (so a residual Add after a norm without shift keeps the norm decomposed, as the analysis groups
it). The ``LayerNormalization`` is named after the first ReduceMean ("ReduceMean" becomes
"LayerNormalization" in the name) and keeps its metadata (keys only the other nodes carry are
merged in by the rewriter). Control-flow bodies are left as they are. Constants only the norms
read are dropped.

:func:`decomposed_layer_norms` finds the norms this fusion leaves (no scale, other axes, other
constants, below opset 17), which the analysis keeps as one NEVER group. It stays hand-written: it
takes the longest chain of sole readers with any axes and constants, which one fixed pattern with a
check cannot say.
"""

from __future__ import annotations

from typing import Any, Callable

import onnx
import onnx_ir as ir
from onnxscript.rewriter import MatchContext, RewriteRule, RewriterContext, RewriteRuleSet
from onnxscript.rewriter.pattern import OpsetPatternBuilder, Var

from autoprec.onnx.rewrites.base import (Rewrite, RewriteResult, apply_rules, apply_to_proto, constant, fused_name,
                                         on_main_graph, onnx_opset, scalar)

#: The first ONNX opset with a LayerNormalization op.
LAYER_NORM_OPSET = 17


def _pattern(pow_square: bool, shift: bool) -> Callable[..., Any]:
    """The pattern of one form: the square as ``Pow`` (else x * x), with or without the shift Add."""

    def pattern(op: OpsetPatternBuilder, x: Var, exponent: Var, eps: Var, gamma: Var, beta: Var) -> Any:
        centred = op.Sub(x, op.ReduceMean(x, _allow_other_inputs=True, _outputs=["mean"]))
        square = op.Pow(centred, exponent) if pow_square else op.Mul(centred, centred)
        var = op.ReduceMean(square, _allow_other_inputs=True, _outputs=["var"])
        scaled = op.Mul(op.Div(centred, op.Sqrt(op.Add(var, eps))), gamma, _outputs=["scaled"])
        return op.Add(scaled, beta) if shift else scaled

    return pattern


def _last_axis_mean(node: ir.Node | None) -> bool:
    """A ReduceMean over axis -1 (attribute before opset 18, constant input after) with kept dims."""
    if node is None or node.attributes.get_int("keepdims", 1) != 1:
        return False
    if len(node.inputs) > 1 and node.inputs[1] is not None:
        axes = constant(node.inputs[1])
        return axes is not None and axes.ravel().tolist() == [-1]
    return node.attributes.get_ints("axes") in ([-1], (-1,))


def _vector(value: ir.Value | None) -> bool:
    """A 1-D fp32 initializer: a scale or shift LayerNormalization says as it is."""
    array = constant(value)
    return array is not None and array.ndim == 1 and value is not None and value.dtype == ir.DataType.FLOAT


def _check(context: MatchContext, mean: ir.Value, var: ir.Value, exponent: ir.Value | None, eps: ir.Value,
           gamma: ir.Value, beta: ir.Value | None, scaled: ir.Value, **_: ir.Value) -> bool:
    """The condition of every form: what LayerNormalization says as it is (see the module docstring)."""
    if not on_main_graph(context) or not (_last_axis_mean(mean.producer()) and _last_axis_mean(var.producer())):
        return False
    if exponent is not None and scalar(exponent) != 2.0:
        return False
    epsilon = scalar(eps)
    if epsilon is None or epsilon < 0 or not _vector(gamma) or (beta is not None and not _vector(beta)):
        return False
    readers = scaled.consumers()
    # without a shift: the scale's sole reader must not be an Add (that is the shift, or no fusion)
    return beta is not None or not (len(readers) == 1 and readers[0].op_type == "Add")


def _layer_norm(op: RewriterContext, x: ir.Value, eps: ir.Value, gamma: ir.Value, mean: ir.Value,
                beta: ir.Value | None = None, **_: ir.Value) -> ir.Value:
    """The replacement: one LayerNormalization over the last axis, named after the first ReduceMean
    and with its metadata (the exporter's scope)."""
    node = mean.producer()
    assert node is not None
    out = op.LayerNormalization(x, gamma, *([beta] if beta is not None else []), axis=-1, epsilon=scalar(eps),
                                _name=fused_name(node, "LayerNormalization"))
    out.producer().metadata_props.update(node.metadata_props)
    return out


#: Every form the fusion takes, each Add and Mul in either operand order.
RULES = RewriteRuleSet([RewriteRule(_pattern(pow_square, shift), _layer_norm, _check)
                        for pow_square in (True, False) for shift in (True, False)], commute=True)


class FuseLayerNorms(Rewrite):
    """Replace each decomposed layer norm of the main graph by one ``LayerNormalization``; below
    opset 17 nothing changes. The result counts the norms fused."""

    def call(self, model: ir.Model) -> RewriteResult:
        if onnx_opset(model) < LAYER_NORM_OPSET:
            return RewriteResult(model, False, 0)
        return apply_rules(RULES, model)


def fuse_layer_norms(model: onnx.ModelProto) -> int:
    """Fuse ``model``'s decomposed layer norms in place (:class:`FuseLayerNorms`); returns how many."""
    return apply_to_proto(FuseLayerNorms(), model).count


def _sole_reader(value: ir.Value, op_types: tuple[str, ...]) -> ir.Node | None:
    """The one node that reads ``value``, if it is one of ``op_types``."""
    readers = value.consumers()
    return readers[0] if len(readers) == 1 and readers[0].op_type in op_types else None


def decomposed_layer_norms(graph: ir.Graph) -> list[list[ir.Node]]:
    """The nodes of each layer norm ``graph`` still writes as ReduceMean(x) -> Sub(x, mean) ->
    square (Pow, or x * x) -> ReduceMean -> Add(eps) -> Sqrt -> Div(sub, .) [-> Mul -> Add], each
    the sole reader of the one before (the centred value read by the square and the Div only), any
    axes and constants; one list per norm, in chain order."""
    found: list[list[ir.Node]] = []
    for mean in graph:
        if mean.op_type != "ReduceMean" or mean.domain not in ("", "ai.onnx") or mean.inputs[0] is None:
            continue
        x = mean.inputs[0]
        subs = [n for n in mean.outputs[0].consumers() if n.op_type == "Sub" and list(n.inputs) == [x, mean.outputs[0]]]
        if len(subs) != 1:
            continue
        sub = subs[0]
        centred = sub.outputs[0]
        readers = centred.consumers()
        square = next((n for n in readers if n.op_type == "Pow" and n.inputs[0] is centred
                       or n.op_type == "Mul" and list(n.inputs) == [centred, centred]), None)
        div = next((n for n in readers if n.op_type == "Div" and n.inputs[0] is centred), None)
        if square is None or div is None or len(readers) != 2:
            continue
        var = _sole_reader(square.outputs[0], ("ReduceMean",))
        add_eps = _sole_reader(var.outputs[0], ("Add",)) if var is not None else None
        root = _sole_reader(add_eps.outputs[0], ("Sqrt",)) if add_eps is not None else None
        if var is None or add_eps is None or root is None or div.inputs[1] is not root.outputs[0]:
            continue
        chain = [mean, sub, square, var, add_eps, root, div]
        scale = _sole_reader(div.outputs[0], ("Mul",))
        if scale is not None:
            chain.append(scale)
            shift = _sole_reader(scale.outputs[0], ("Add",))
            if shift is not None:
                chain.append(shift)
        found.append(chain)
    return found
