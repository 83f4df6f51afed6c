"""The lowering: a plan's decision for every node of an op graph, the one place formats are derived.

Given an :class:`~autoprec.core.opgraph.OpGraph` and an assignment (layer -> format), :func:`lower`
says for every node the format it computes in, the format of the value it hands on, whether a
16-bit FOLLOW result is rounded, and why; and it lists the casts: one per (value, format) where a
reader wants the value in another format than it was produced in. The torch passes, the ONNX passes
and the cost model all consume this, so what is priced is what is emulated and deployed
(DESIGN.md, numerical semantics):

- a layer (policy ALWAYS) computes in its plan format (fp32 when the plan leaves it out); its value
  is ``fmt.compute_output`` (an fp8 layer writes bf16);
- a FOLLOW op computes in the widest value format of its floating inputs, so it never runs in fp8;
  a parameter, a buffer or a graph input is an fp32 input. Its result is rounded when it runs in 16
  bits and computes new values (:data:`~autoprec.core.kinds.EXACT_FOLLOW_KINDS` do not);
- a NEVER op reads and computes fp32; the graph's output reads its values in the graph's I/O
  format (``graph.io``: fp32, or fp16 where the deployment takes and returns fp16);
- a floating graph input is in the I/O format: with fp16 I/O it is rounded to fp16 (the caller's
  fp32 data is rounded once, at the input), and an fp16 layer reads it without a cast;
- placeholders, parameters and shape arithmetic are fp32 and read nothing that needs a cast.

Imports no torch.
"""

from __future__ import annotations

from collections import ChainMap
from dataclasses import dataclass
from typing import Iterable, Iterator, Mapping

from autoprec.core.errors import PlanError
from autoprec.core.formats import Precision, wider
from autoprec.core.kinds import EXACT_FOLLOW_KINDS, act_arg_positions
from autoprec.core.opgraph import OpGraph, OpNode, Policy

FP32 = Precision.FP32

#: reasons of the nodes whose format no plan changes, by their kind (op: fp32 for any other NONE)
_FIXED_REASONS = {"placeholder": "model input", "get_attr": "parameter: fp32 master, cast at use"}


@dataclass(frozen=True)
class NodeDecision:
    """One node under a plan: the format it computes in, the format of its value, and why."""

    compute: Precision
    value: Precision
    reason: str
    rounds: bool = False  # a 16-bit FOLLOW op whose result is rounded to ``compute``


#: the decision for a layer's own weight or bias, which the op graph leaves out: an fp32 master,
#: rounded by the layer that reads it
PARAMETER = NodeDecision(FP32, FP32, "parameter: fp32 master, cast at use")


@dataclass(frozen=True)
class Cast:
    """One cast of the value ``value`` produces into ``to``, shared by every reader that wants it."""

    value: str
    src: Precision
    to: Precision
    readers: tuple[str, ...]
    elems: int


@dataclass(frozen=True)
class Lowering:
    """Every node's decision and every cast of one plan on one op graph."""

    decisions: Mapping[str, NodeDecision]
    casts: tuple[Cast, ...]

    def __getitem__(self, name: str) -> NodeDecision:
        return self.decisions[name]

    def __contains__(self, name: object) -> bool:
        return name in self.decisions

    def __iter__(self) -> Iterator[str]:
        return iter(self.decisions)

    def rounded(self) -> dict[str, Precision]:
        """The FOLLOW ops whose results the plan rounds (and, with 16-bit I/O, the graph inputs),
        with the format they are rounded to."""
        return {n: d.compute for n, d in self.decisions.items() if d.rounds}


def reads_values(op: OpNode) -> bool:
    """Whether ``op`` reads the values of its floating inputs (a shape query or a placeholder does
    not), so a reader that wants them in another format needs a cast."""
    return op.policy is not Policy.NONE or op.kind == "output"


def read_format(op: OpNode, decision: NodeDecision) -> Precision:
    """The format ``op`` reads its floating inputs in: its compute format (for the graph's output,
    the I/O format), fp32 for a NEVER op (the rule the cost model's and the passes' casts follow)."""
    if op.policy is Policy.ALWAYS or op.policy is Policy.FOLLOW or op.kind == "output":
        return decision.compute
    return FP32


def float_inputs(graph: OpGraph, name: str) -> list[str]:
    """The predecessors of ``name`` that hand it a floating value, in argument order."""
    return [p for p in graph.predecessors(name) if graph[p].float_out]


def check_assignment(graph: OpGraph, assignment: Mapping[str, Precision]) -> None:
    """PlanError unless every key names a layer of ``graph`` and every value is a Precision."""
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


def validate_plan(graph: OpGraph, assignment: Mapping[str, Precision],
                  act_amax: Mapping[str, tuple[float, ...]] | None) -> dict[str, tuple[float, ...]]:
    """Check the plan against the model; return the amax tuple of each fp8 layer.

    Raises :class:`PlanError` for names that are not layers of the model, formats that are not
    :class:`Precision` members, and fp8 layers without a calibrated amax for each activation input
    (an fp8 lookup reads none: its scales come from its table).
    """
    check_assignment(graph, assignment)
    amaxes: dict[str, tuple[float, ...]] = {}
    missing = []
    for name in graph.layer_names():
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
                        "act_amax (e.g. autoprec.torch.passes.act_amax_from_profile(profile)); fp8 uses static scales")
    return amaxes


def lower(graph: OpGraph, assignment: Mapping[str, Precision], reasons: Mapping[str, str] | None = None,
          labels: Mapping[str, str] | None = None) -> Lowering:
    """The decision for every node of ``graph`` under ``assignment`` (layers it leaves out are fp32).

    ``reasons`` overrides the reason of nodes whose policy the frontend fixed (an ONNX product that
    is no layer of the captured model, say); ``labels`` names nodes in reasons (an ONNX group by its
    plan layer). Nodes are decided in graph order, which is a topological order.
    """
    reasons = reasons or {}
    labels = labels or {}
    out: dict[str, NodeDecision] = {}
    for op in graph.nodes:
        out[op.name] = _decide(graph, op, assignment, out, reasons, labels)
    return Lowering(out, tuple(_casts(graph, out)))


def single_layer_roundings(graph: OpGraph, layers: Iterable[str], formats: Iterable[Precision]
                           ) -> dict[tuple[str, Precision], dict[str, Precision]]:
    """``lower(graph, {layer: fmt}).rounded()`` for every layer and format, from one lowering of the
    empty plan: a single layer's format reaches only the FOLLOW ops downstream of it through other
    FOLLOW ops, so only those are decided again. (A profile asks for every pair; lowering the whole
    graph for each grew as layers x nodes: 1.1 s of GPT-2's profile at 124M parameters.)"""
    base = lower(graph, {}).decisions
    order = list(base)
    index = {n: i for i, n in enumerate(order)}
    fmts = tuple(formats)
    out: dict[tuple[str, Precision], dict[str, Precision]] = {}
    for layer in layers:
        cone: set[str] = set()
        stack = [layer]
        while stack:
            for s in graph.successors(stack.pop()):
                if s not in cone and graph[s].policy is Policy.FOLLOW:
                    cone.add(s)
                    stack.append(s)
        again = [layer] + sorted(cone, key=index.__getitem__)
        for fmt in fmts:
            plan = {layer: fmt}
            new: dict[str, NodeDecision] = {}
            decided = ChainMap(new, base)
            for name in again:
                new[name] = _decide(graph, graph[name], plan, decided, {}, {})
            out[(layer, fmt)] = {n: d.compute for n in order if (d := decided[n]).rounds}
    return out


def _decide(graph: OpGraph, op: OpNode, assignment: Mapping[str, Precision], decided: Mapping[str, NodeDecision],
            reasons: Mapping[str, str], labels: Mapping[str, str]) -> NodeDecision:
    if op.policy is Policy.ALWAYS:
        if op.name in assignment:
            fmt = assignment[op.name]
            return NodeDecision(fmt, fmt.compute_output, "plan")
        return NodeDecision(FP32, FP32, "not in the plan: fp32")
    if op.policy is Policy.NEVER:
        return NodeDecision(FP32, FP32, reasons.get(op.name) or f"{op.kind} stays fp32 (never)")
    if op.policy is Policy.FOLLOW:
        ins = float_inputs(graph, op.name)
        if not ins:
            return NodeDecision(FP32, FP32, "no floating inputs")
        fmts = [decided[a].value for a in ins]
        best = fmts[0]
        for f in fmts[1:]:
            best = wider(best, f)
        if len(set(fmts)) == 1:
            why = f"follows {labels.get(ins[0], ins[0])} ({best})"
        else:
            why = "widest of its inputs " + ", ".join(f"{labels.get(a, a)} ({f})" for a, f in zip(ins, fmts))
        rounds = best is not FP32 and op.kind not in EXACT_FOLLOW_KINDS
        return NodeDecision(best, best, why, rounds)
    io = graph.io
    if op.kind == "output":
        return NodeDecision(io, io, f"graph outputs are {io}")
    if op.kind == "placeholder" and op.float_out and io is not FP32:
        return NodeDecision(io, io, f"model input, given in {io} (inputs and outputs in {io})", rounds=True)
    return NodeDecision(FP32, FP32, reasons.get(op.name) or _FIXED_REASONS.get(op.kind, "not a tensor op"))


def _casts(graph: OpGraph, decided: Mapping[str, NodeDecision]) -> list[Cast]:
    """One cast per (value, format) that some reader wants and the value is not in."""
    wanted: dict[tuple[str, Precision], list[str]] = {}
    for op in graph.nodes:
        if not reads_values(op):
            continue
        want = read_format(op, decided[op.name])
        for p in float_inputs(graph, op.name):
            if decided[p].value is not want:
                wanted.setdefault((p, want), []).append(op.name)
    return [Cast(v, decided[v].value, to, tuple(readers), graph[v].act_out_elems)
            for (v, to), readers in wanted.items()]
