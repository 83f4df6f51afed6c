"""ONNX pass 2: decide the format of every group before any edge is rewritten.

The same rules as the torch side (:func:`passes.fx_assign_formats.decide_formats`), applied to the
groups :mod:`passes.onnx_map_layers` found (one group = one torch op):

- layers: the plan's format ("plan"); layers the plan leaves out run in fp32. A layer's value is
  in ``fmt.compute_output``: fp8 layers write bf16.
- FOLLOW ops: the widest of the value formats of their floating inputs, where a parameter or buffer
  counts as fp32 (the torch side reads it through an fp32 get_attr) and a one-element constant the
  exporter made from a Python number does not count (the torch side has no node for it).
- NEVER ops, unknown ops and layer-kind groups the capture does not call layers: fp32.
- groups without floating outputs (shape arithmetic): fp32, "not a tensor op".

Writes FORMAT, VALUE_FORMAT, REASON and POLICY on every node and, on the core node of each fp8
layer, ACT_AMAX (the calibrated amax of each activation input).
"""

from __future__ import annotations

import json
from typing import Mapping

import networkx as nx
import onnx

from autoprec.capture import Captured
from autoprec.kinds import LAYER_KINDS, policy_of
from autoprec.formats import Precision, wider
from autoprec.opgraph import OpGraph, Policy
from autoprec.semantics import act_arg_positions
from passes.fx_assign_formats import NodeFormat, validate_plan
from passes.onnx_base import (ACT_AMAX, FORMAT, GROUP, KIND, LAYER, POLICY, REASON, ROLE, ROLE_CORE, VALUE_FORMAT,
                              GraphIndex, OnnxPass, OnnxPassError, OnnxPassResult, get_meta, set_meta)

FP32 = Precision.FP32


def param_names(captured: Captured) -> frozenset[str]:
    """Names of the model's parameters and buffers: the exporter keeps them as initializer names."""
    gm = captured.gm
    return frozenset([k for k, _ in gm.named_parameters()] + [k for k, _ in gm.named_buffers()])


def is_scalar_constant(idx: GraphIndex, name: str, params: frozenset[str]) -> bool:
    """A one-element initializer that is no parameter or buffer: a Python number in the torch code."""
    return name in idx.inits and idx.numel(name) <= 1 and name not in params


class GroupGraph:
    """Groups of an annotated model with their external floating inputs and group-level order."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.idx = idx = GraphIndex(model)
        self.members: dict[str, list[int]] = {}
        for i, n in enumerate(idx.nodes):
            g = get_meta(n, GROUP)
            if g is None:
                raise OnnxPassError(f"node {n.name} has no group: run MapLayers first")
            self.members.setdefault(g, []).append(i)
        self.group_of_node = {i: get_meta(n, GROUP) for i, n in enumerate(idx.nodes)}
        self.ext_inputs: dict[str, list[str]] = {}
        dag = nx.DiGraph()
        first = {g: m[0] for g, m in self.members.items()}
        dag.add_nodes_from(self.members)
        for g, members in self.members.items():
            seen: list[str] = []
            for i in members:
                for name in idx.nodes[i].input:
                    if not name:
                        continue
                    p = idx.producer.get(name)
                    if p is not None and self.group_of_node[p] == g:
                        continue
                    if name not in seen:
                        seen.append(name)
                    if p is not None:
                        dag.add_edge(self.group_of_node[p], g)
            self.ext_inputs[g] = seen
        try:
            self.order = list(nx.lexicographical_topological_sort(dag, key=lambda g: first[g]))
        except nx.NetworkXUnfeasible as exc:
            raise OnnxPassError("the exporter's node groups form a cycle; cannot assign formats") from exc

    def producer_group(self, name: str) -> str | None:
        p = self.idx.producer.get(name)
        return None if p is None else self.group_of_node[p]

    def float_outputs(self, g: str) -> bool:
        return any(self.idx.is_float(o) for i in self.members[g] for o in self.idx.nodes[i].output if o)

    def layer(self, g: str) -> str | None:
        return get_meta(self.idx.nodes[self.members[g][0]], LAYER)

    def kind(self, g: str) -> str:
        return get_meta(self.idx.nodes[self.members[g][0]], KIND) or ""


def group_policy(gg: GroupGraph, g: str) -> tuple[Policy, str]:
    """The group's policy and, when it differs from the kind's, why."""
    if gg.layer(g) is not None:
        return Policy.ALWAYS, ""
    if not gg.float_outputs(g):
        return Policy.NONE, "not a tensor op"
    kind = gg.kind(g)
    if kind in LAYER_KINDS:
        return Policy.NEVER, f"{kind} is not a layer of the captured model: fp32"
    policy = policy_of(kind)
    return policy, ""


def decide_onnx_formats(model: onnx.ModelProto, assignment: Mapping[str, Precision],
                        params: frozenset[str]) -> dict[str, tuple[Policy, NodeFormat]]:
    """Every group's policy and format under ``assignment`` (reads the graph, changes nothing)."""
    gg = GroupGraph(model)
    out: dict[str, tuple[Policy, NodeFormat]] = {}
    for g in gg.order:
        policy, why = group_policy(gg, g)
        fmt, reason = _decide(gg, g, policy, why, assignment, params, out)
        value_fmt = fmt.compute_output if policy is Policy.ALWAYS else fmt
        out[g] = (policy, NodeFormat(fmt, value_fmt, reason))
    return out


def _label(gg: GroupGraph, g: str | None) -> str:
    if g is None:
        return "model input"
    return gg.layer(g) or g


def _decide(gg: GroupGraph, g: str, policy: Policy, why: str, assignment: Mapping[str, Precision],
            params: frozenset[str], decided: Mapping[str, tuple[Policy, NodeFormat]]) -> tuple[Precision, str]:
    if policy is Policy.ALWAYS:
        layer = gg.layer(g) or ""
        if layer in assignment:
            return assignment[layer], "plan"
        return FP32, "not in the plan: fp32"
    if policy is Policy.NEVER:
        return FP32, why or f"{gg.kind(g)} stays fp32 (never)"
    if policy is Policy.FOLLOW:
        srcs: list[tuple[str | None, Precision]] = []
        for name in gg.ext_inputs[g]:
            if not gg.idx.is_float(name) or is_scalar_constant(gg.idx, name, params):
                continue
            pg = gg.producer_group(name)
            srcs.append((pg, decided[pg][1].value_fmt if pg is not None else FP32))
        if not srcs:
            return FP32, "no floating inputs"
        best = srcs[0][1]
        for _, f in srcs[1:]:
            best = wider(best, f)
        if len({f for _, f in srcs}) == 1:
            return best, f"follows {_label(gg, srcs[0][0])} ({best})"
        return best, "widest of its inputs " + ", ".join(f"{_label(gg, s)} ({f})" for s, f in srcs)
    return FP32, why or "not a tensor op"


class AssignFormats(OnnxPass):
    """Annotate every node with its group's format, value format, policy and reason."""

    def __init__(self, graph: OpGraph, assignment: Mapping[str, Precision],
                 act_amax: Mapping[str, tuple[float, ...]] | None = None,
                 params: frozenset[str] = frozenset()) -> None:
        """``graph``: the op graph the plan was made for (its layers name the plan's keys);
        ``params``: initializers that count as fp32 inputs even when they hold one element (the
        torch model's parameters and buffers, :func:`param_names`)."""
        self.graph = graph
        self.assignment = dict(assignment)
        self.amax = validate_plan(graph, self.assignment, act_amax)
        self.params = params

    def call(self, model: onnx.ModelProto) -> OnnxPassResult:
        decisions = decide_onnx_formats(model, self.assignment, self.params)
        for n in model.graph.node:
            policy, nf = decisions[get_meta(n, GROUP) or ""]
            set_meta(n, POLICY, policy.value)
            set_meta(n, FORMAT, nf.fmt.value)
            set_meta(n, VALUE_FORMAT, nf.value_fmt.value)
            set_meta(n, REASON, nf.reason)
            if get_meta(n, ROLE) == ROLE_CORE and nf.fmt.is_fp8:
                layer = get_meta(n, LAYER) or ""
                need = len(act_arg_positions(self.graph[layer].kind))
                set_meta(n, ACT_AMAX, json.dumps([float(a) for a in self.amax[layer][:need]]))
        return OnnxPassResult(model, modified=False)  # metadata only

    def check(self, model: onnx.ModelProto) -> None:
        super().check(model)
        for n in model.graph.node:
            fmt, policy = get_meta(n, FORMAT), get_meta(n, POLICY)
            if not fmt or not policy or not get_meta(n, REASON):
                raise OnnxPassError(f"{self.name}: node {n.name} has no format or reason")
            p, f = Policy(policy), Precision(fmt)
            if p is not Policy.ALWAYS and (f.is_fp8 or Precision(get_meta(n, VALUE_FORMAT)).is_fp8):
                raise OnnxPassError(f"{self.name}: {n.name} ({p.value}) was given {f}: fp8 is for layers only")
            layer = get_meta(n, LAYER)
            if p is Policy.ALWAYS and f is not self.assignment.get(layer or "", FP32):
                raise OnnxPassError(f"{self.name}: layer {layer} is {f}, the plan says {self.assignment.get(layer or '')}")
