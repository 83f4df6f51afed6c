"""ONNX pass 2: decide the format of every group before any edge is rewritten.

The same rules as the torch side (:func:`autoprec.torch.passes.assign_formats.decide_formats`), applied to the
groups :mod:`autoprec.onnx.passes.map_layers` found (one group = one torch op):

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
from dataclasses import dataclass
from typing import TYPE_CHECKING, Mapping

import networkx as nx
import onnx

from autoprec.core.kinds import LAYER_KINDS, act_arg_positions, policy_of
from autoprec.core.formats import Precision
from autoprec.core.lowering import NodeDecision, lower, validate_plan
from autoprec.core.opgraph import OpGraph, OpNode, Policy
from autoprec.core.passes import PassError, PassResult
from autoprec.onnx.passes.base import (ACT_AMAX, FORMAT, GROUP, KIND, LAYER, POLICY, REASON, ROLE,
    ROLE_CORE, ROUNDS, VALUE_FORMAT, GraphIndex, OnnxPass, get_meta, set_meta)

if TYPE_CHECKING:  # the torch capture is one of two sources of an op graph: no import at run time
    from autoprec.torch.capture import Captured

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
                raise PassError(f"node {n.name} has no group: run MapLayers first")
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
            raise PassError("the exporter's node groups form a cycle; cannot assign formats") from exc

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


@dataclass(frozen=True)
class GroupOpGraph:
    """The groups of an annotated model as an op graph the lowering decides (one node per group, one
    per graph input and per initializer a group reads as a floating value), with what the lowering
    needs besides: the plan keyed by group, the reasons of groups whose policy is not their kind's,
    and the label of each node in reasons (a layer group by its plan layer)."""

    graph: OpGraph
    assignment: Mapping[str, Precision]
    reasons: Mapping[str, str]
    labels: Mapping[str, str]


def group_op_graph(gg: GroupGraph, assignment: Mapping[str, Precision], params: frozenset[str]) -> GroupOpGraph:
    """The op graph of ``gg``'s groups. A one-element initializer that is no parameter or buffer is
    a Python number in the torch code, not an input; any other floating initializer or graph input
    is an fp32 source."""
    nodes: list[OpNode] = []
    edges: list[tuple[str, str]] = []
    sources: dict[str, str] = {}
    reasons: dict[str, str] = {}
    labels: dict[str, str] = {}
    for g in gg.order:
        for name in gg.ext_inputs[g]:
            if gg.producer_group(name) is not None or name in sources or not gg.idx.is_float(name) \
                    or is_scalar_constant(gg.idx, name, params):
                continue
            node = f"{'init' if name in gg.idx.inits else 'input'}:{name}"
            sources[name] = node
            labels[node] = "model input"
            nodes.append(OpNode(node, "get_attr" if name in gg.idx.inits else "placeholder", "", Policy.NONE,
                                float_out=True))
    group_assignment: dict[str, Precision] = {}
    for g in gg.order:
        policy, why = group_policy(gg, g)
        layer = gg.layer(g)
        if layer is not None:
            labels[g] = layer
            if layer in assignment:
                group_assignment[g] = assignment[layer]
        if why:
            reasons[g] = why
        nodes.append(OpNode(g, gg.kind(g), "", policy, float_out=gg.float_outputs(g)))
        preds: list[str] = []
        for name in gg.ext_inputs[g]:
            p = gg.producer_group(name) or sources.get(name)
            if p is not None and p not in preds:
                preds.append(p)
        edges.extend((p, g) for p in preds)
    return GroupOpGraph(OpGraph(nodes, edges), group_assignment, reasons, labels)


def decide_onnx_formats(model: onnx.ModelProto, assignment: Mapping[str, Precision],
                        params: frozenset[str]) -> dict[str, tuple[Policy, NodeDecision]]:
    """Every group's policy and decision under ``assignment``: the lowering of its group op graph
    (reads the model, changes nothing)."""
    gg = GroupGraph(model)
    gog = group_op_graph(gg, assignment, params)
    lowering = lower(gog.graph, gog.assignment, gog.reasons, gog.labels)
    return {g: (gog.graph[g].policy, lowering[g]) for g in gg.order}


class AssignFormats(OnnxPass):
    """Annotate every node with its group's format, value format, policy and reason."""

    needs = (GROUP, KIND)

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

    def call(self, model: onnx.ModelProto) -> PassResult:
        decisions = decide_onnx_formats(model, self.assignment, self.params)
        for n in model.graph.node:
            policy, nf = decisions[get_meta(n, GROUP) or ""]
            set_meta(n, POLICY, policy.value)
            set_meta(n, FORMAT, nf.compute.value)
            set_meta(n, VALUE_FORMAT, nf.value.value)
            set_meta(n, REASON, nf.reason)
            set_meta(n, ROUNDS, "1" if nf.rounds else "0")
            if get_meta(n, ROLE) == ROLE_CORE and nf.compute.is_fp8:
                layer = get_meta(n, LAYER) or ""
                need = len(act_arg_positions(self.graph[layer].kind))
                set_meta(n, ACT_AMAX, json.dumps([float(a) for a in self.amax[layer][:need]]))
        return PassResult(model, modified=False)  # metadata only

    def ensures(self, model: onnx.ModelProto) -> None:
        super().ensures(model)
        for n in model.graph.node:
            fmt, policy = get_meta(n, FORMAT), get_meta(n, POLICY)
            if not fmt or not policy or not get_meta(n, REASON):
                raise PassError(f"{self.name}: node {n.name} has no format or reason")
            p, f = Policy(policy), Precision(fmt)
            if p is not Policy.ALWAYS and (f.is_fp8 or Precision(get_meta(n, VALUE_FORMAT)).is_fp8):
                raise PassError(f"{self.name}: {n.name} ({p.value}) was given {f}: fp8 is for layers only")
            layer = get_meta(n, LAYER)
            if p is Policy.ALWAYS and f is not self.assignment.get(layer or "", FP32):
                raise PassError(f"{self.name}: layer {layer} is {f}, the plan says {self.assignment.get(layer or '')}")
