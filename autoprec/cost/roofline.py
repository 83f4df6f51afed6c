"""The built-in cost model: a roofline per op on a :class:`~autoprec.cost.targets.Target`, with launch and cast costs.

Speed of low precision cannot be measured on the machines autoprec is developed on (FACTS.md), and
a search needs thousands of cost queries, so the cost is estimated from peak rates instead of timed.
This module imports no torch.
"""

from __future__ import annotations

from autoprec.core.errors import UsageError
from autoprec.core.formats import Precision
from autoprec.core.kinds import LOOKUP_KINDS, VIEW_KINDS
from autoprec.core.opgraph import OpNode, Policy
from autoprec.cost.model import CostModel
from autoprec.cost.targets import DEFAULT_TARGET, Target, get_target

#: Seconds of fixed overhead per kernel launch. A few microseconds is what a CUDA launch plus the
#: framework's dispatch costs; without it a tiny model would be predicted to run in nanoseconds
#: and every cast would look free.
LAUNCH_OVERHEAD_S = 3e-6

OBJECTIVES = ("latency", "memory")


class RooflineCostModel(CostModel):
    """Roofline estimate on a :class:`Target`.

    ``objective="latency"`` (seconds): an op takes max(compute time, memory time) plus one launch.
    Weights are pre-cast at deployment, so weight casts cost nothing.

    ``objective="memory"`` (bytes): weights stored in the layer's format plus every activation an
    op writes (casts write a copy). That sum is what a training step keeps alive for backward and
    an upper bound on inference peak; unlike a true peak it is additive, so the search stays exact.
    """

    def __init__(self, target: str | Target = DEFAULT_TARGET, objective: str = "latency") -> None:
        if objective not in OBJECTIVES:
            raise UsageError(f"unknown objective {objective!r}: use one of {', '.join(OBJECTIVES)}")
        self.target = get_target(target)
        self.objective = objective
        self.name = self.target.name

    def __repr__(self) -> str:
        return f"RooflineCostModel({self.target.name!r}, {self.objective!r})"

    def supports(self, fmt: Precision) -> bool:
        return self.target.supports(fmt)

    def _time(self, flops: float, nbytes: float, fmt: Precision = Precision.FP32) -> float:
        compute = flops / self.target.peak(fmt) if flops else 0.0
        return max(compute, nbytes / self.target.bandwidth) + LAUNCH_OVERHEAD_S

    def layer_cost(self, op: OpNode, fmt: Precision) -> float:
        """A layer reads its weight and inputs in ``fmt`` and writes its output in ``fmt``'s output
        format (bf16 for fp8).

        A lookup (embedding) stores its whole table but, in fp32 or a 16-bit format, reads only the
        rows it copies: as many table elements in ``fmt`` as it writes, whatever the vocabulary; it
        computes nothing. An fp8 table is priced as the deployment graph runs it, not as an ideal
        kernel would: ONNX has no Gather with per-row scales (and no fp8 Gather at all), so the
        exported graph dequantizes the *whole* table to fp32 on every run (one kernel: read it in
        fp8, write it in fp32), then gathers the rows from that copy and writes them in bf16 (a
        second kernel). That costs more than a bf16 lookup (which reads and writes only its rows)
        however few or many rows it copies, and grows with the vocabulary: under the latency
        objective an fp8 table always loses to a 16-bit one. Under the memory objective it stores
        one byte per element and wins; the fp32 copy is a transient workspace of the lookup, not a
        stored weight or a value handed to another op, so it is not counted. (A runtime that folds
        the constant DequantizeLinear at load instead -- ONNX Runtime does once its QDQ handling is
        off, as in :func:`autoprec.ort.runtime.open_session` -- keeps that fp32 copy for good: the
        lookup is then fast but the table takes four bytes per element in memory, not one.)
        """
        out_bytes = op.act_out_elems * fmt.compute_output.bytes
        if self.objective == "memory":
            return op.weight_elems * fmt.bytes + out_bytes
        if op.kind not in LOOKUP_KINDS:
            return self._time(op.flops, (op.weight_elems + op.act_in_elems) * fmt.bytes + out_bytes, fmt)
        if not fmt.is_fp8:
            return self._time(op.flops, op.act_out_elems * fmt.bytes + out_bytes, fmt)
        f32 = Precision.FP32.bytes
        dequantize = self._time(0, op.weight_elems * (fmt.bytes + f32))
        return dequantize + self._time(0, op.act_out_elems * f32 + out_bytes)

    def follow_cost(self, op: OpNode, fmt: Precision) -> float:
        if op.kind in VIEW_KINDS:
            return 0.0
        if self.objective == "memory":
            return op.act_out_elems * fmt.bytes
        if not (op.act_in_elems or op.act_out_elems):
            return 0.0
        return (op.act_in_elems + op.act_out_elems) * fmt.bytes / self.target.bandwidth + LAUNCH_OVERHEAD_S

    def fixed_cost(self, op: OpNode) -> float:
        if op.policy is Policy.NONE or op.kind in VIEW_KINDS:
            return 0.0
        f32 = Precision.FP32.bytes
        if self.objective == "memory":
            return op.weight_elems * f32 + op.act_out_elems * f32
        nbytes = (op.weight_elems + op.act_in_elems + op.act_out_elems) * f32
        if not (nbytes or op.flops):
            return 0.0
        return self._time(op.flops, nbytes)

    def cast_cost(self, elems: int, src: Precision, dst: Precision) -> float:
        """A cast reads ``src`` and writes ``dst``. Into fp8 it is a quantize with the static scale
        from calibration, fused into the same kernel (no amax pass at deployment)."""
        if src is dst or not elems:
            return 0.0
        if self.objective == "memory":
            return elems * dst.bytes
        return elems * (src.bytes + dst.bytes) / self.target.bandwidth + LAUNCH_OVERHEAD_S


def cost_model(target: str | Target = DEFAULT_TARGET, objective: str = "latency") -> RooflineCostModel:
    """The built-in cost model for ``target`` (a name such as "h100" or a :class:`Target`)."""
    return RooflineCostModel(target, objective)
