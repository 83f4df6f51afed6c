"""The cost-model protocol: what the search asks of a cost model, and a plan's cost as the lowering deploys it.

The total cost of a plan is a sum over what :func:`autoprec.core.lowering.lower` decides for it,
so the search prices exactly the graph the passes emulate and deploy:

- each layer (``Policy.ALWAYS``) in its format: :meth:`CostModel.layer_cost`;
- each FOLLOW op in the format it computes in: :meth:`CostModel.follow_cost` (the widest of its
  inputs' formats: a residual Add reading a bf16 branch and an fp32 stream runs in fp32);
- every other op (NEVER ops stay fp32): :meth:`CostModel.fixed_cost` (an inference batch norm
  after a convolution is not among them: capture folds it into the convolution, :mod:`autoprec.core.bn_fold`);
- each of the lowering's casts, one per (value, format) a reader wants: :meth:`CostModel.cast_cost`,
  the casts back to fp32 in front of NEVER ops and the graph's outputs included.

This module imports no torch.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Mapping

from autoprec.core.formats import Precision
from autoprec.core.lowering import lower
from autoprec.core.opgraph import OpGraph, OpNode, Policy


@dataclass(frozen=True)
class CostBreakdown:
    """A plan's cost split by where it comes from (same units as the objective)."""

    layers: float
    follow: float
    fixed: float
    casts: float

    @property
    def total(self) -> float:
        return self.layers + self.follow + self.fixed + self.casts


class CostModel(abc.ABC):
    """What the search needs from a cost model. Subclass it to plug your own.

    Implement :meth:`layer_cost` and :meth:`cast_cost` (and optionally :meth:`follow_cost`,
    :meth:`fixed_cost`); :meth:`plan_cost` sums them as described in the module docstring, and
    the MILP search is exact for exactly that sum. All costs must be >= 0.
    """

    name: str = "custom"
    objective: str = "latency"

    @abc.abstractmethod
    def layer_cost(self, op: OpNode, fmt: Precision) -> float:
        """Cost of one layer computing in ``fmt`` (its casts not included)."""

    @abc.abstractmethod
    def cast_cost(self, elems: int, src: Precision, dst: Precision) -> float:
        """Cost of converting a tensor of ``elems`` elements from ``src`` to ``dst`` (src != dst)."""

    def follow_cost(self, op: OpNode, fmt: Precision) -> float:
        """Cost of a FOLLOW op running in ``fmt`` (the owner layer's output format)."""
        return 0.0

    def fixed_cost(self, op: OpNode) -> float:
        """Cost of an op whose format the search does not choose (NEVER ops stay fp32)."""
        return 0.0

    def supports(self, fmt: Precision) -> bool:
        """Whether the hardware behind this model offers ``fmt``."""
        return True

    def compute_note(self, fmt: Precision) -> str | None:
        """Why a layer in ``fmt`` gets no faster math than the format says (None: it does); the
        search's reasons quote it."""
        return None

    def breakdown(self, graph: OpGraph, assignment: Mapping[str, Precision]) -> CostBreakdown:
        """Cost of ``graph`` with ``assignment`` (layer -> format; missing layers are fp32)."""
        lowering = lower(graph, assignment)
        layers = follow = fixed = 0.0
        for op in graph.nodes:
            fmt = lowering[op.name].compute
            if op.policy is Policy.ALWAYS:
                layers += self.layer_cost(op, fmt)
            elif op.policy is Policy.FOLLOW:
                follow += self.follow_cost(op, fmt)
            else:
                fixed += self.fixed_cost(op)
        casts = sum(self.cast_cost(c.elems, c.src, c.to) for c in lowering.casts)
        return CostBreakdown(layers, follow, fixed, casts)

    def plan_cost(self, graph: OpGraph, assignment: Mapping[str, Precision]) -> float:
        """Total cost: layers + FOLLOW ops + fixed ops + casts."""
        return self.breakdown(graph, assignment).total
