"""Pass 1: write the lowering's decision for every node before any edge is rewritten.

The formats come from :func:`autoprec.core.lowering.lower`, the one definition the ONNX passes and
the cost model share; this pass only records them on the fx nodes: ``meta[FORMAT]`` (the format the
node computes in), ``meta[VALUE_FORMAT]`` (the format of the value it produces), ``meta[ROUNDS]``
(a 16-bit FOLLOW result is rounded) and ``meta[REASON]``. A layer's own weight, which the op graph
leaves out, is an fp32 master cast at use. fp8 layers also get ``meta[ACT_AMAX]``: the calibrated
amax of each activation input.
"""

from __future__ import annotations

from typing import Mapping

import torch.fx as fx

from autoprec.core.formats import Precision
from autoprec.core.lowering import PARAMETER, NodeDecision, check_assignment, lower, validate_plan
from autoprec.core.opgraph import OpGraph, Policy
from autoprec.core.passes import PassError, PassResult
from autoprec.torch.passes.base import ACT_AMAX, FORMAT, REASON, ROUNDS, VALUE_FORMAT, Pass

FP32 = Precision.FP32


def value_format(node: fx.Node) -> Precision:
    """The format of the value ``node`` produces (after :class:`AssignFormats` ran)."""
    return node.meta[VALUE_FORMAT]


def policy(graph: OpGraph, node: fx.Node) -> Policy:
    """The op graph's policy of ``node``; NONE for nodes the op graph leaves out (a layer's weight)."""
    return graph[node.name].policy if node.name in graph else Policy.NONE


def decide_formats(gm: fx.GraphModule, graph: OpGraph,
                   assignment: Mapping[str, Precision]) -> dict[str, NodeDecision]:
    """Every fx node's decision under ``assignment``: the lowering's (:func:`autoprec.core.lowering.lower`)
    for the op graph's nodes, :data:`~autoprec.core.lowering.PARAMETER` for the layer weights it
    leaves out. Reads the graph, changes nothing."""
    lowering = lower(graph, assignment)
    return {n.name: lowering.decisions.get(n.name, PARAMETER) for n in gm.graph.nodes}


class AssignFormats(Pass):
    """Annotate every node with its format and the reason (changes no graph structure)."""

    def __init__(self, graph: OpGraph, assignment: Mapping[str, Precision],
                 act_amax: Mapping[str, tuple[float, ...]] | None = None, dynamic_fp8: bool = False) -> None:
        """``dynamic_fp8``: fp8 layers take no calibrated amax and scale each activation by its own
        at run time (or by a training recipe's scales), so none is required."""
        self.graph = graph
        self.assignment = dict(assignment)
        if dynamic_fp8:
            check_assignment(graph, self.assignment)
            self.amax: dict[str, tuple[float, ...]] = {n: () for n, f in self.assignment.items() if f.is_fp8}
        else:
            self.amax = validate_plan(graph, self.assignment, act_amax)

    def call(self, gm: fx.GraphModule) -> PassResult:
        formats = decide_formats(gm, self.graph, self.assignment)
        for node in gm.graph.nodes:
            nf = formats[node.name]
            node.meta[FORMAT] = nf.compute
            node.meta[VALUE_FORMAT] = nf.value
            node.meta[REASON] = nf.reason
            node.meta[ROUNDS] = nf.rounds
            if nf.compute.is_fp8 and policy(self.graph, node) is Policy.ALWAYS:
                node.meta[ACT_AMAX] = self.amax[node.name]
            else:
                node.meta.pop(ACT_AMAX, None)
        return PassResult(gm, modified=False)  # metadata only: the code is unchanged

    def ensures(self, gm: fx.GraphModule) -> None:
        super().ensures(gm)
        for node in gm.graph.nodes:
            fmt = node.meta.get(FORMAT)
            if not isinstance(fmt, Precision) or not node.meta.get(REASON):
                raise PassError(f"{self.name}: node {node.name} has no format or reason")
            pol = policy(self.graph, node)
            if pol is not Policy.ALWAYS and (fmt.is_fp8 or node.meta[VALUE_FORMAT].is_fp8):
                raise PassError(f"{self.name}: {node.name} ({pol.value}) was given {fmt}: fp8 is for layers only")
            if pol is Policy.ALWAYS and fmt is not self.assignment.get(node.name, FP32):
                raise PassError(f"{self.name}: layer {node.name} is {fmt}, the plan says "
                                f"{self.assignment.get(node.name, FP32)}")
