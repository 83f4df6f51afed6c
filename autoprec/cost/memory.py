"""Deployed memory: what a plan's model holds at its peak -- weights in their formats plus live activations.

The figure the summary and plan.json report as "memory": the bytes of every stored tensor in the
format the plan stores it in (a weight shared by tied layers once; fp8 one byte an element, its
per-channel scales left out as negligible; tensors no layer reads stay fp32), plus the largest sum
of activations alive at once when the ops run in graph order. A value is alive from the op that
writes it to its last reader; a cast's copy from just before its first reader to its last, its
source until the cast (unless others read the source itself); a view (reshape, transpose) is no
new memory, it keeps its source alive; the graph's output is the values it reads, in the graph's
I/O format (:meth:`~autoprec.core.opgraph.OpGraph.with_io`). So a plan that only narrows formats
holds no more than all-fp32 except where a cast's copy briefly sits beside its source: with fp32
I/O, the fp32 copy of a 16-bit output beside the 16-bit result (``tune --io fp16`` has none).

This is not the search's "memory" objective (:class:`~autoprec.cost.roofline.RooflineCostModel`),
which sums every written activation so that it stays additive over layers for the MILP; the peak
is what a user compares with the memory of a device. Torch-free.
"""

from __future__ import annotations

from typing import Mapping

from autoprec.core.formats import Precision
from autoprec.core.kinds import VIEW_KINDS
from autoprec.core.lowering import float_inputs, lower
from autoprec.core.opgraph import OpGraph, Policy

FP32 = Precision.FP32


def weight_bytes(graph: OpGraph, assignment: Mapping[str, Precision]) -> int:
    """Stored tensors in their formats: each layer's weight in its plan format (tied weights once),
    every other stored tensor in fp32."""
    layers = sum(op.weight_elems * assignment.get(op.name, FP32).bytes for op in graph.storing_layers())
    others = sum(op.weight_elems for op in graph if op.policy is not Policy.NONE and not op.is_layer)
    return layers + others * FP32.bytes


def peak_activation_bytes(graph: OpGraph, assignment: Mapping[str, Precision]) -> int:
    """The largest sum of activation bytes alive at once, running the ops in graph order.

    Each op is two moments: its input casts run (2i), then the op (2i + 1). A value lives from the
    moment it is written to its last read: by an op that reads it as it is, or by a cast, which
    frees the source for readers that only wanted the copy (an fp16 score matrix is gone once its
    fp32 copy for the softmax exists, as in the deployed graph)."""
    low = lower(graph, assignment)
    order = {op.name: i for i, op in enumerate(graph.nodes)}
    root: dict[str, str] = {}  # a view's storage is its source's
    for op in graph.nodes:
        ins = float_inputs(graph, op.name)
        root[op.name] = root[ins[0]] if op.kind in VIEW_KINDS and ins else op.name
    # a reader that wants a cast copy reads the source only when the cast runs: before its first reader
    via_cast = {(c.value, r): 2 * min(order[x] for x in c.readers) for c in low.casts for r in c.readers}
    alive: dict[str, tuple[int, int, int]] = {}  # key -> (first moment, last moment, bytes)
    for op in graph.nodes:
        i = order[op.name]
        if op.kind not in ("get_attr", "output") and op.kind not in VIEW_KINDS and op.act_out_elems:
            alive[op.name] = (2 * i + 1, 2 * i + 1, op.act_out_elems * low[op.name].value.bytes)
    for op in graph.nodes:
        for p in float_inputs(graph, op.name):
            r = root[p]
            if r in alive:
                first, last, size = alive[r]
                read = via_cast.get((p, op.name), 2 * order[op.name] + 1)
                alive[r] = (first, max(last, read), size)
    for k, c in enumerate(low.casts):
        steps = [order[r] for r in c.readers]
        alive[f"cast {k}"] = (2 * min(steps), 2 * max(steps) + 1, c.elems * c.to.bytes)
    events: dict[int, int] = {}
    for first, last, size in alive.values():
        events[first] = events.get(first, 0) + size
        events[last + 1] = events.get(last + 1, 0) - size
    total = peak = 0
    for t in sorted(events):
        total += events[t]
        peak = max(peak, total)
    return peak


def deployed_memory(graph: OpGraph, assignment: Mapping[str, Precision]) -> int:
    """Bytes a deployment of the plan holds at its peak: :func:`weight_bytes` + :func:`peak_activation_bytes`."""
    return weight_bytes(graph, assignment) + peak_activation_bytes(graph, assignment)
