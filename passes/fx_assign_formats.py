"""Pass 1: decide the format of every node before any edge is rewritten.

Writes on every node ``meta[FORMAT]`` (the format the node computes in), ``meta[VALUE_FORMAT]``
(the format of the value it produces) and ``meta[REASON]``:

- layers (policy ALWAYS): the plan's format, reason ``"plan"``; layers the plan leaves out run in
  fp32. A layer's value is in ``fmt.compute_output``: fp8 layers write bf16.
- FOLLOW ops: the widest (:func:`autoprec.formats.wider`) of the value formats of their floating
  inputs. Since no value is ever fp8, FOLLOW ops never run in fp8.
- NEVER ops: fp32.
- placeholders, parameters, constants, the output and shape arithmetic: fp32.

fp8 layers also get ``meta[ACT_AMAX]``: the calibrated amax of each activation input.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch
import torch.fx as fx
from torch.fx.passes.shape_prop import TensorMetadata

from autoprec.capture import policy_of
from autoprec.errors import PlanError
from autoprec.formats import Precision, wider
from autoprec.opgraph import OpGraph, Policy
from autoprec.semantics import act_arg_positions
from passes.base import ACT_AMAX, FORMAT, KIND, REASON, VALUE_FORMAT, Pass, PassError, PassResult

FP32 = Precision.FP32


def _float_meta(m: Any) -> bool:
    if isinstance(m, TensorMetadata):  # a NamedTuple: test before the tuple case
        return m.dtype.is_floating_point
    if isinstance(m, torch.Tensor):
        return m.is_floating_point()
    if isinstance(m, (tuple, list)):
        return any(_float_meta(e) for e in m)
    if isinstance(m, dict):
        return any(_float_meta(e) for e in m.values())
    return False


def is_float_value(node: fx.Node) -> bool:
    """Whether ``node`` produces a floating tensor (or a tuple holding one), from shape propagation."""
    m = node.meta.get("tensor_meta")
    if m is None:
        m = node.meta.get("val")
    return _float_meta(m)


def float_inputs(node: fx.Node) -> list[fx.Node]:
    """The floating-tensor inputs of ``node``, in argument order, each once."""
    return [a for a in node.all_input_nodes if is_float_value(a)]


def value_format(node: fx.Node) -> Precision:
    """The format of the value ``node`` produces (after :class:`AssignFormats` ran)."""
    return node.meta[VALUE_FORMAT]


def effective_policy(graph: OpGraph, node: fx.Node) -> Policy:
    """The op graph's policy, except for ops returning tuples of tensors (split, chunk, max with a
    dim), which the op graph records as NONE: they follow (or stay fp32) as their kind says."""
    if node.name not in graph:
        return Policy.NONE
    policy = graph[node.name].policy
    if policy is Policy.NONE and node.op in ("call_function", "call_method", "call_module") \
            and is_float_value(node) and float_inputs(node):
        by_kind = policy_of(str(node.meta.get(KIND, "")))
        if by_kind is Policy.FOLLOW or by_kind is Policy.NEVER:
            return by_kind
    return policy


def validate_plan(graph: OpGraph, assignment: Mapping[str, Precision],
                  act_amax: Mapping[str, tuple[float, ...]] | None) -> dict[str, tuple[float, ...]]:
    """Check the plan against the model; return the amax tuple of each fp8 layer.

    Raises :class:`PlanError` for names that are not layers of the model, formats that are not
    :class:`Precision` members, and fp8 layers without a calibrated amax for each activation input
    (an fp8 lookup reads none: its scales come from its table).
    """
    layers = graph.layer_names()
    known = set(layers)
    unknown = sorted(n for n in assignment if n not in known)
    if unknown:
        shown = ", ".join(layers[:12]) + (", ..." if len(layers) > 12 else "")
        raise PlanError(f"the plan names {len(unknown)} layer(s) the model does not have: {', '.join(unknown)} "
                        f"(its layers are: {shown}); was the plan made for another model?")
    bad = sorted(n for n, p in assignment.items() if not isinstance(p, Precision))
    if bad:
        raise PlanError("plan formats must be Precision members (parse strings with parse_precision): "
                        + ", ".join(bad))
    amaxes: dict[str, tuple[float, ...]] = {}
    missing = []
    for name in layers:
        fmt = assignment.get(name, FP32)
        if not fmt.is_fp8:
            continue
        need = len(act_arg_positions(graph[name].kind))
        got = tuple(float(a) for a in (act_amax or {}).get(name, ()))
        if len(got) < need:
            missing.append(name)
        amaxes[name] = got
    if missing:
        raise PlanError(f"fp8 layer(s) {', '.join(missing)} have no calibrated activation amax: pass "
                        "act_amax (e.g. passes.act_amax_from_profile(profile)); fp8 uses static scales")
    return amaxes


#: FOLLOW kinds whose outputs hold only values (or negated values) of their inputs: on inputs
#: representable in a format their results are too, so running them in 16-bit needs no rounding
EXACT_FOLLOW_KINDS = frozenset({
    "reshape", "view", "flatten", "unflatten", "permute", "transpose", "t", "contiguous", "getitem",
    "squeeze", "unsqueeze", "expand", "cat", "stack", "split", "chunk", "select", "slice", "clone",
    "identity", "relu", "max_pool1d", "max_pool2d", "adaptive_max_pool2d", "neg", "abs",
})


@dataclass(frozen=True)
class NodeFormat:
    """The decision for one node: the format it computes in, the format of its value, and why."""

    fmt: Precision
    value_fmt: Precision
    reason: str


def decide_formats(gm: fx.GraphModule, graph: OpGraph,
                   assignment: Mapping[str, Precision]) -> dict[str, NodeFormat]:
    """Every node's format under ``assignment``, in graph order (reads the graph, changes nothing)."""
    out: dict[str, NodeFormat] = {}
    for node in gm.graph.nodes:
        policy = effective_policy(graph, node)
        fmt, reason = _decide(node, policy, assignment, out)
        value_fmt = fmt.compute_output if policy is Policy.ALWAYS else fmt
        out[node.name] = NodeFormat(fmt, value_fmt, reason)
    return out


def _decide(node: fx.Node, policy: Policy, assignment: Mapping[str, Precision],
            decided: Mapping[str, NodeFormat]) -> tuple[Precision, str]:
    if node.op == "placeholder":
        return FP32, "model input"
    if node.op == "get_attr":
        return FP32, "parameter: fp32 master, cast at use"
    if node.op == "output":
        return FP32, "graph outputs are fp32"
    kind = node.meta.get(KIND, node.op)
    if policy is Policy.ALWAYS:
        if node.name in assignment:
            return assignment[node.name], "plan"
        return FP32, "not in the plan: fp32"
    if policy is Policy.NEVER:
        return FP32, f"{kind} stays fp32 (never)"
    if policy is Policy.FOLLOW:
        ins = float_inputs(node)
        if not ins:
            return FP32, "no floating inputs"
        fmts = [decided[a.name].value_fmt for a in ins]
        best = fmts[0]
        for f in fmts[1:]:
            best = wider(best, f)
        if len(set(fmts)) == 1:
            return best, f"follows {ins[0].name} ({best})"
        listed = ", ".join(f"{a.name} ({f})" for a, f in zip(ins, fmts))
        return best, f"widest of its inputs {listed}"
    return FP32, "not a tensor op"


def needs_output_rounding(node: fx.Node, policy: Policy, fmt: Precision) -> bool:
    """A FOLLOW op running in a 16-bit format whose result may not be representable in it."""
    return policy is Policy.FOLLOW and fmt is not FP32 and node.meta.get(KIND) not in EXACT_FOLLOW_KINDS


def follow_roundings(gm: fx.GraphModule, graph: OpGraph,
                     assignment: Mapping[str, Precision]) -> dict[str, Precision]:
    """FOLLOW ops whose results the plan stores in a 16-bit format (rounded), with that format.

    For a single-layer assignment {L: P} these are the ops after L through which P's rounding
    reaches further than the profiler's trial lets it (it runs them in fp32): the profiler rounds
    the results of exactly these ops to agree with the applied plan.
    """
    formats = decide_formats(gm, graph, assignment)
    out = {}
    for node in gm.graph.nodes:
        fmt = formats[node.name].fmt
        if needs_output_rounding(node, effective_policy(graph, node), fmt):
            out[node.name] = fmt
    return out


class AssignFormats(Pass):
    """Annotate every node with its format and the reason (changes no graph structure)."""

    def __init__(self, graph: OpGraph, assignment: Mapping[str, Precision],
                 act_amax: Mapping[str, tuple[float, ...]] | None = None) -> None:
        self.graph = graph
        self.assignment = dict(assignment)
        self.amax = validate_plan(graph, self.assignment, act_amax)

    def call(self, gm: fx.GraphModule) -> PassResult:
        formats = decide_formats(gm, self.graph, self.assignment)
        for node in gm.graph.nodes:
            nf = formats[node.name]
            node.meta[FORMAT] = nf.fmt
            node.meta[VALUE_FORMAT] = nf.value_fmt
            node.meta[REASON] = nf.reason
            if nf.fmt.is_fp8 and effective_policy(self.graph, node) is Policy.ALWAYS:
                node.meta[ACT_AMAX] = self.amax[node.name]
            else:
                node.meta.pop(ACT_AMAX, None)
        return PassResult(gm, modified=False)  # metadata only: the code is unchanged

    def check(self, gm: fx.GraphModule) -> None:
        super().check(gm)
        for node in gm.graph.nodes:
            fmt = node.meta.get(FORMAT)
            if not isinstance(fmt, Precision) or not node.meta.get(REASON):
                raise PassError(f"{self.name}: node {node.name} has no format or reason")
            policy = effective_policy(self.graph, node)
            if policy is not Policy.ALWAYS and (fmt.is_fp8 or node.meta[VALUE_FORMAT].is_fp8):
                raise PassError(f"{self.name}: {node.name} ({policy.value}) was given {fmt}: fp8 is for layers only")
            if policy is Policy.ALWAYS and fmt is not self.assignment.get(node.name, FP32):
                raise PassError(f"{self.name}: layer {node.name} is {fmt}, the plan says "
                                f"{self.assignment.get(node.name, FP32)}")
