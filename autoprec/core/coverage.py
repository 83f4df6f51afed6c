"""Coverage: how much of a model a plan can change, and what it cannot change, with the reason.

A plan chooses formats for layers only. The rest of the model stays fp32: ops kept fp32 by rule
(softmax, the norms: numerically sensitive), ops autoprec does not model (an ONNX LSTM node:
unknown behaviour in low precision), and the stored tensors those ops read. A
speedup or memory figure means little without saying how much of the model it could touch: an
ONNX tagger whose LSTM node holds 94% of the weights has a plan for the other 6%. The cost model
already prices what stays fp32 at fp32; this says it in words, in the summary and the report.

Computed from the op graph alone (FLOPs and weight elements per op), for both frontends. Torch-free.
"""

from __future__ import annotations

from dataclasses import dataclass

from autoprec.core.kinds import KINDS, FlopsRule
from autoprec.core.opgraph import OpGraph, OpNode, Policy

#: how many kinds the one-line summary names (the report lists them all)
NAMED_IN_SUMMARY = 3


@dataclass(frozen=True)
class Uncovered:
    """Ops of one kind that stay fp32 whatever the plan: how many, their FLOPs and weight elements, why."""

    kind: str
    count: int
    flops: int
    weights: int
    reason: str


@dataclass(frozen=True)
class Coverage:
    """FLOPs and weight elements of the whole model, and those a plan can change."""

    flops: int
    changeable_flops: int
    weights: int
    layer_weights: int
    uncovered: tuple[Uncovered, ...]  # largest first

    def share(self, part: int, whole: int) -> float:
        return part / whole if whole else 1.0

    @property
    def flops_share(self) -> float:
        return self.share(self.changeable_flops, self.flops)

    @property
    def weights_share(self) -> float:
        return self.share(self.layer_weights, self.weights)

    def _shares(self, u: Uncovered) -> str:
        parts = []
        if u.flops:
            parts.append(f"{100 * self.share(u.flops, self.flops):.1f}% of FLOPs")
        if u.weights:
            parts.append(f"{100 * self.share(u.weights, self.weights):.1f}% of weights")
        return ", ".join(parts)

    def line(self) -> str:
        """One line for the summary: the shares, then the largest kinds it cannot change."""
        head = (f"coverage: the plan can change {100 * self.flops_share:.1f}% of the FLOPs and "
                f"{100 * self.weights_share:.1f}% of the weights")
        shown = [u for u in self.uncovered if u.flops or u.weights][:NAMED_IN_SUMMARY]
        if not shown:
            return head
        named = "; ".join(f"{u.kind} x{u.count} ({self._shares(u)}): {u.reason}" for u in shown)
        more = len([u for u in self.uncovered if u.flops or u.weights]) - len(shown)
        return head + "; fp32 always: " + named + (f"; {more} more kind(s) in the report" if more > 0 else "")

    def table(self) -> list[str]:
        """Markdown rows for the report: every kind that stays fp32."""
        rows = ["| kind | ops | share of FLOPs | share of weights | why it stays fp32 |", "|---|---|---|---|---|"]
        for u in self.uncovered:
            rows.append(f"| {u.kind} | {u.count} | {100 * self.share(u.flops, self.flops):.2f}% "
                        f"| {100 * self.share(u.weights, self.weights):.2f}% | {u.reason} |")
        return rows


def _reason(op: OpNode) -> str:
    k = KINDS.get(op.kind)
    if op.policy is Policy.FOLLOW:
        return "reads a stored tensor that is no layer's weight: the tensor stays fp32"
    if k is not None and k.layer is not None:
        return "a layer with nothing to lower here (a product of constants, or an operand form autoprec cannot rewrite)"
    if k is not None and k.flops is FlopsRule.RECURRENT:  # autoprec.torch.recurrent writes out the others
        return ("a recurrent op autoprec does not write out as layers (an ONNX LSTM/GRU/RNN node, nn.RNN, "
                "an LSTM with proj_size, a packed sequence): not modelled")
    if k is None or k.opaque:
        return "not modelled by autoprec (its behaviour in low precision is unknown)"
    return "kept fp32 by rule (numerically sensitive)"


def coverage(graph: OpGraph) -> Coverage:
    """The :class:`Coverage` of ``graph``. The plan changes the FLOPs of layers and of the ops that
    follow their formats, and the weights of layers; a weight read by several layers (tied) counts once."""
    flops = changeable_flops = other_weights = 0
    layer_weights = sum(op.weight_elems for op in graph.storing_layers())
    groups: dict[tuple[str, str], list[OpNode]] = {}
    for op in graph:
        if op.policy is Policy.NONE:
            continue
        flops += op.flops
        if op.is_layer:
            changeable_flops += op.flops
            continue
        other_weights += op.weight_elems
        if op.policy is Policy.FOLLOW:
            changeable_flops += op.flops
            if not op.weight_elems:
                continue
        elif not (op.flops or op.weight_elems):
            continue
        groups.setdefault((op.kind, _reason(op)), []).append(op)
    weights = layer_weights + other_weights
    uncovered = [Uncovered(kind, len(ops), 0 if ops[0].policy is Policy.FOLLOW else sum(o.flops for o in ops),
                           sum(o.weight_elems for o in ops), reason) for (kind, reason), ops in groups.items()]
    uncovered.sort(key=lambda u: (-(u.flops / max(flops, 1) + u.weights / max(weights, 1)), u.kind))
    return Coverage(flops, changeable_flops, weights, layer_weights, tuple(uncovered))
