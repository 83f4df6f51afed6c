"""Hardware cost model: how long (or how many bytes) a model takes with a given format per layer.

Speed of low precision cannot be measured on the machines autoprec is developed on (FACTS.md), and
a search needs thousands of cost queries, so the cost is estimated with a roofline model over the
op graph instead of timed.

The total cost of a plan is a sum of independent parts, which is what lets the MILP search
(:mod:`autoprec.search`) optimise it exactly:

- each layer (``Policy.ALWAYS``) in its format: :meth:`CostModel.layer_cost`;
- each FOLLOW op in the output format of the layer that owns it (``OpGraph.follow_owner``):
  :meth:`CostModel.follow_cost`; FOLLOW ops owned by an fp32 source are a fixed cost;
- every other op (NEVER ops stay fp32): :meth:`CostModel.fixed_cost` (an inference batch norm
  after a convolution is not among them: capture folds it into the convolution, :mod:`autoprec.bn_fold`);
- one cast per (value, destination format) at each format boundary: :meth:`CostModel.cast_cost`
  over the :func:`cast_groups` of the graph, the casts back to fp32 in front of NEVER ops and the
  graph's outputs included.

This module imports no torch.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Mapping

from autoprec.ep_support import TENSORRT, compute_format, follow_format, parse_provider
from autoprec.errors import UsageError
from autoprec.formats import Precision
from autoprec.kinds import BIAS_KINDS, LOOKUP_KINDS
from autoprec.opgraph import OpGraph, OpNode, Policy

#: Seconds of fixed overhead per kernel launch. A few microseconds is what a CUDA launch plus the
#: framework's dispatch costs; without it a tiny model would be predicted to run in nanoseconds
#: and every cast would look free.
LAUNCH_OVERHEAD_S = 3e-6

#: FOLLOW op kinds that only change the view of a tensor: no kernel, no bytes moved.
VIEW_KINDS = frozenset({
    "reshape", "view", "flatten", "unflatten", "permute", "transpose", "squeeze", "unsqueeze",
    "expand", "getitem", "getattr", "size", "identity", "dropout", "chunk", "split", "t",
})

OBJECTIVES = ("latency", "memory")


@dataclass(frozen=True)
class Target:
    """A GPU as data: dense peak throughput per format and memory bandwidth (datasheet figures).

    ``peaks`` holds (format, FLOP/s) pairs; a format absent from it is not supported on the
    target (A100 has no fp8 tensor cores, so fp8 is never offered there).

    fp32 uses the non-tensor-core peak, not TF32: PyTorch disables TF32 for matmuls by default
    (``torch.backends.cuda.matmul.allow_tf32 = False``) and autoprec measures accuracy with true
    fp32 arithmetic, so the fp32 baseline it compares against is the plain fp32 one.
    """

    name: str
    description: str
    peaks: tuple[tuple[Precision, float], ...]
    bandwidth: float  # bytes per second

    @property
    def formats(self) -> tuple[Precision, ...]:
        """Supported formats, widest first."""
        return tuple(sorted((p for p, _ in self.peaks), key=lambda p: p.rank))

    def supports(self, fmt: Precision) -> bool:
        return any(p is fmt for p, _ in self.peaks)

    def peak(self, fmt: Precision) -> float:
        """Dense FLOP/s in ``fmt``; UsageError if the target lacks it."""
        for p, v in self.peaks:
            if p is fmt:
                return v
        raise UsageError(f"target {self.name} does not support {fmt}: use one of "
                         + ", ".join(str(p) for p in self.formats))


def _peaks(fp32: float, half: float, fp8: float | None) -> tuple[tuple[Precision, float], ...]:
    out = [(Precision.FP32, fp32), (Precision.BF16, half), (Precision.FP16, half)]
    if fp8 is not None:  # e5m2 runs at the same rate as e4m3 on every fp8 GPU
        out += [(Precision.FP8_E4M3, fp8), (Precision.FP8_E5M2, fp8)]
    return tuple(out)


TARGETS: Mapping[str, Target] = {
    t.name: t
    for t in (
        Target("h100", "NVIDIA H100 SXM", _peaks(67e12, 989e12, 1979e12), 3.35e12),
        Target("a100", "NVIDIA A100 SXM 80GB (no fp8)", _peaks(19.5e12, 312e12, None), 2.04e12),
        Target("l4", "NVIDIA L4", _peaks(30e12, 121e12, 242e12), 0.30e12),
        # Not a real part: a mid-range GPU with every format, for users without a datasheet.
        Target("generic", "modest GPU with all formats", _peaks(20e12, 150e12, 300e12), 1.0e12),
    )
}

DEFAULT_TARGET = "h100"


def get_target(name: str | Target = DEFAULT_TARGET) -> Target:
    """Look a built-in target up by name (case-insensitive)."""
    if isinstance(name, Target):
        return name
    try:
        return TARGETS[str(name).strip().lower()]
    except KeyError:
        raise UsageError(f"unknown target {name!r}: use one of {', '.join(TARGETS)}") from None


@dataclass(frozen=True)
class CastGroup:
    """Consumers of one value that each need it in their own input format.

    A cast is paid once per destination format that differs from the producer's output format,
    however many consumers share it (DESIGN.md: one cast per (value, format)). ``producer`` is a
    layer name, or "" for an fp32 source (graph input or NEVER op). ``to_fp32``: the value also
    feeds an op that is fp32 whatever the plan (a NEVER op or the graph's output), so fp32 is a
    destination too; ``consumers`` holds the layers alone (and may then be empty).
    """

    producer: str
    consumers: tuple[str, ...]
    elems: int
    to_fp32: bool = False


def cast_groups(graph: OpGraph) -> list[CastGroup]:
    """Group ``graph.layer_edges()`` and ``graph.fp32_sink_edges()`` by the value the consumers read.

    Two consumers read the same value when they have the same upstream layer, the same direct
    predecessors and the same element count (q/k/v projections after one LayerNorm, say).
    """
    def value(producer: str, consumer: str, elems: int) -> tuple[str, tuple[str, ...], int]:
        return producer, tuple(sorted(graph.predecessors(consumer))), int(elems)

    groups: dict[tuple[str, tuple[str, ...], int], list[str]] = {}
    sinks: set[tuple[str, tuple[str, ...], int]] = set()
    for producer, consumer, elems in graph.layer_edges():
        members = groups.setdefault(value(producer, consumer, elems), [])
        if consumer not in members:
            members.append(consumer)
    for producer, consumer, elems in graph.fp32_sink_edges():
        key = value(producer, consumer, elems)
        groups.setdefault(key, [])
        sinks.add(key)
    return [CastGroup(k[0], tuple(c), k[2], k in sinks) for k, c in groups.items()]


def output_format(fmt: Precision | None) -> Precision:
    """Format of the value a layer in ``fmt`` writes (None: an fp32 source)."""
    return Precision.FP32 if fmt is None else fmt.compute_output


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
        fmt = {n: assignment.get(n, Precision.FP32) for n in graph.layer_names()}
        owner = graph.follow_owner()
        layers = follow = fixed = 0.0
        for op in graph.nodes:
            if op.policy is Policy.ALWAYS:
                layers += self.layer_cost(op, fmt[op.name])
            elif op.policy is Policy.FOLLOW and owner.get(op.name):
                follow += self.follow_cost(op, fmt[owner[op.name]].compute_output)
            elif op.policy is Policy.FOLLOW:
                fixed += self.follow_cost(op, Precision.FP32)
            else:
                fixed += self.fixed_cost(op)
        casts = 0.0
        for g in cast_groups(graph):
            src = output_format(fmt[g.producer] if g.producer else None)
            dsts = {fmt[c] for c in g.consumers} | ({Precision.FP32} if g.to_fp32 else set())
            for dst in sorted(dsts - {src}, key=lambda p: p.rank):
                casts += self.cast_cost(g.elems, src, dst)
        return CostBreakdown(layers, follow, fixed, casts)

    def plan_cost(self, graph: OpGraph, assignment: Mapping[str, Precision]) -> float:
        """Total cost: layers + FOLLOW ops + fixed ops + casts."""
        return self.breakdown(graph, assignment).total


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
        off, as in :func:`autoprec.runtime.open_session` -- keeps that fp32 copy for good: the
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


class ProviderCostModel(CostModel):
    """``base`` priced as an ONNX Runtime execution provider runs the deployed graph: each layer at
    the format it computes in there (:func:`autoprec.ep_support.compute_format`). On the CPU and
    CUDA providers an fp8 layer is an fp32 op on dequantized operands whose fp8 weight ONNX Runtime
    dequantizes once, at session start: it costs what the fp32 layer costs, and its quantize casts
    come on top, so the search keeps fp8 for providers that fuse it into an fp8 kernel (TensorRT).
    A FOLLOW op without a kernel in its format there costs fp32 plus two casts
    (:func:`autoprec.ep_support.follow_format`). A layer's bias that the deployed graph adds in an
    Add of its own, outside the product's kernel, costs that Add (:func:`separate_bias_add`); TensorRT
    fuses every bias. Casts and fixed ops are ``base``'s.
    """

    def __init__(self, base: CostModel, provider: str) -> None:
        self.base = base
        self.provider = parse_provider(provider)
        self._follow: dict[tuple[str, Precision], Precision] = {}  # (kind, format) -> the format it runs in
        self.name = base.name
        self.objective = base.objective

    def __repr__(self) -> str:
        return f"ProviderCostModel({self.base!r}, {self.provider!r})"

    def supports(self, fmt: Precision) -> bool:
        return self.base.supports(fmt)

    def layer_cost(self, op: OpNode, fmt: Precision) -> float:
        runs = compute_format(fmt, self.provider)
        cost = self.base.layer_cost(op, runs)
        add = separate_bias_add(op, runs) if self.provider != TENSORRT else None
        return cost if add is None else cost + self.base.follow_cost(add, runs)

    def compute_note(self, fmt: Precision) -> str | None:
        runs = compute_format(fmt, self.provider)
        if runs is fmt:
            return self.base.compute_note(fmt)
        return f"{self.provider} computes it in {runs} between QuantizeLinear/DequantizeLinear"

    def cast_cost(self, elems: int, src: Precision, dst: Precision) -> float:
        return self.base.cast_cost(elems, src, dst)

    def follow_cost(self, op: OpNode, fmt: Precision) -> float:
        """A FOLLOW op the provider has no kernel for in ``fmt`` (a bf16 Gelu on CUDA) runs in fp32
        between a cast of its input and a cast of its result, as the deployment graph has it."""
        key = (op.kind, fmt)
        if key not in self._follow:
            self._follow[key] = follow_format(op.kind, fmt, self.provider)
        runs = self._follow[key]
        if runs is fmt:
            return self.base.follow_cost(op, fmt)
        return (self.base.follow_cost(op, runs) + self.base.cast_cost(op.act_in_elems, fmt, runs)
                + self.base.cast_cost(op.act_out_elems, runs, fmt))

    def fixed_cost(self, op: OpNode) -> float:
        return self.base.fixed_cost(op)


def separate_bias_add(op: OpNode, runs: Precision) -> OpNode | None:
    """The Add that adds layer ``op``'s bias after its product in the deployed graph, when it is a
    node of its own, for a layer computing in ``runs``: a 16-bit layer's always (SplitBias: its
    product is rounded before the bias is added), and in any format a linear layer's on more than
    two dimensions (the exporter's MatMul + Add). None where the bias is fused into the Gemm/Conv
    (fp32, and fp8 layers computing in fp32) or the layer has none. A layer with a bias reads it as
    its third input (the capture's and the ONNX analyser's input shapes)."""
    if op.kind not in BIAS_KINDS or len(op.input_shapes) < 3:
        return None
    if not (runs.is_16bit or (op.kind == "linear" and len(op.output_shape) > 2)):
        return None
    return OpNode(f"{op.name}.bias", "add", op.scope, Policy.FOLLOW, input_shapes=(op.output_shape,),
                  output_shape=op.output_shape, act_in_elems=op.act_out_elems, act_out_elems=op.act_out_elems)


def cost_model(target: str | Target = DEFAULT_TARGET, objective: str = "latency") -> RooflineCostModel:
    """The built-in cost model for ``target`` (a name such as "h100" or a :class:`Target`)."""
    return RooflineCostModel(target, objective)


def memory_bytes(graph: OpGraph, assignment: Mapping[str, Precision]) -> float:
    """The memory proxy of :class:`RooflineCostModel` (it does not depend on the target)."""
    return RooflineCostModel(DEFAULT_TARGET, "memory").plan_cost(graph, assignment)
