"""The search problem: layers' candidate formats, errors and costs, and the plan's value formats as the units choose.

The accuracy model is additive: a plan's predicted error is the sum of the profile's per-layer
errors (each measured with only that layer lowered). Its cost is the cost model's price of the
lowering (:mod:`autoprec.core.lowering`), the graph the passes deploy. Tied layers
(``OpGraph.ties``) and pins are handled once, up front: every tie group becomes one decision unit
whose allowed formats are the intersection of its members'. Imports no torch.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field
from functools import cached_property
from typing import Iterable, Mapping, Protocol, Sequence, runtime_checkable

from autoprec.core.errors import UsageError
from autoprec.core.formats import Precision, parse_precision, wider
from autoprec.core.kinds import LOOKUP_KINDS
from autoprec.core.lowering import float_inputs, reads_values
from autoprec.core.opgraph import OpGraph, OpNode, Policy
from autoprec.core.plan import Alternative, Budget, LayerDecision, Pin, PrecisionPlan
from autoprec.core.sensitivity import SensitivityProfile
from autoprec.cost.model import CostModel
from autoprec.cost.memory import deployed_memory
from autoprec.cost.roofline import RooflineCostModel

FP32 = Precision.FP32


@dataclass(frozen=True, eq=False)
class SearchProblem:
    """Everything a strategy needs. Build it with :meth:`build` unless you have your own candidates.

    ``candidates[layer]`` are the formats offered for a layer (fp32 is always allowed);
    ``excluded[layer]`` maps formats removed from the offer to the reason (range overflow, no
    support on the target, ...). ``budget`` is the default error budget, in the profile's units:
    a plan fits when the sum of its layers' profile errors is <= budget. ``ties`` defaults to
    ``graph.ties``. Pins are applied on top of candidates: ``--force`` wins over exclusions
    (the user asked), never over the target's support.
    """

    graph: OpGraph
    profile: SensitivityProfile
    cost_model: CostModel
    budget: float
    candidates: Mapping[str, tuple[Precision, ...]]
    excluded: Mapping[str, Mapping[Precision, str]] = field(default_factory=dict)
    pins: tuple[Pin, ...] = ()
    ties: tuple[tuple[str, ...], ...] | None = None

    @classmethod
    def build(
        cls,
        graph: OpGraph,
        profile: SensitivityProfile,
        cost_model: CostModel | str | None = None,
        budget: float = 0.0,
        formats: Iterable[Precision | str] | None = None,
        pins: Iterable[Pin] = (),
        excluded: Mapping[str, Mapping[Precision, str]] | None = None,
    ) -> "SearchProblem":
        """Offer ``formats`` (default: those the profile measured) to every layer, minus formats
        the target lacks and fp16 where the profile saw values beyond fp16's range."""
        if profile.fingerprint and profile.fingerprint != graph.fingerprint():
            raise UsageError(f"the sensitivity profile was made for another model "
                             f"({profile.model_name or profile.fingerprint}): re-run profiling")
        if cost_model is None or isinstance(cost_model, str):
            cost_model = RooflineCostModel(cost_model or "h100")
        offer = tuple(parse_precision(f) for f in (profile.formats if formats is None else formats))
        offer = tuple(f for f in dict.fromkeys(offer) if f is not FP32)
        pins = tuple(pins)
        layers = graph.layers()
        for pin in pins:  # a pattern that matches nothing is a typo, not a rule
            if not any(pin.matches(op) for op in layers):
                names = [op.name for op in layers]
                shown = ", ".join(names[:8]) + (f", ... ({len(names)} in all)" if len(names) > 8 else "")
                raise UsageError(f"{pin} matches no layer's scope, name or kind: check the pattern "
                                 f"(layers: {shown})")
        if offer and not any(cost_model.supports(f) for f in offer):
            raise UsageError(f"{cost_model.name} supports none of the formats asked for "
                             f"({', '.join(f.value for f in offer)}): ask for other formats or another target")
        cands: dict[str, tuple[Precision, ...]] = {}
        excl: dict[str, dict[Precision, str]] = {}
        for op in layers:
            why = dict((excluded or {}).get(op.name, {}))
            for f in offer:
                if not cost_model.supports(f):
                    why.setdefault(f, f"not supported on {cost_model.name}")
            over = _fp16_overflow(profile, op.name)
            if over is not None and Precision.FP16 in offer:
                why.setdefault(Precision.FP16, f"fp16 overflow: amax {over:.1e} > 65504")
            cands[op.name] = tuple(f for f in offer if f not in why)
            excl[op.name] = why
        return cls(graph, profile, cost_model, float(budget), cands, excl, pins)

    @cached_property
    def compiled(self) -> "CompiledProblem":
        return CompiledProblem(self)

    def uniform_assignment(self, f: Precision) -> dict[str, Precision]:
        """Every layer in ``f`` where exclusions, pins and ties allow it, else its widest allowed
        format (fp32 unless pinned otherwise): the uniform baseline a mixed plan must beat."""
        c = self.compiled
        return c.to_layers(c.uniform(f))

    def amp_assignment(self, f: Precision) -> dict[str, Precision]:
        """torch.amp's assignment in the 16-bit format ``f``: autocast runs products (linear, conv,
        matmul) in ``f`` and leaves an embedding lookup in its table's fp32; here every unit with no
        lookup in ``f`` where allowed, the others at their widest allowed format. The simple plan a
        torch user gets without a search."""
        c = self.compiled
        return c.to_layers([f if f in u.formats and not any(self.graph[n].kind in LOOKUP_KINDS
                                                                   for n in u.layers)
                            else c.widest[ui] for ui, u in enumerate(c.units)])

    def make_plan(self, assignment: Mapping[str, Precision], budget: float, strategy: str,
                  alternatives: Sequence[Alternative] = (), notes: Sequence[str] = ()) -> PrecisionPlan:
        """Turn a layer -> format assignment into a plan with reasons, costs and errors."""
        return self.compiled.plan(assignment, budget, strategy, tuple(alternatives), tuple(notes))


def _fp16_overflow(profile: SensitivityProfile, layer: str) -> float | None:
    """Largest amax among a layer's tensors when any of them overflows fp16, else None."""
    r = profile.ranges.get(layer)
    if r is None:
        return None
    stats = [*r.inputs, r.output] + ([r.weight] if r.weight else [])
    bad = [s.amax for s in stats if s.frac_over_fp16 > 0 or s.amax > Precision.FP16.max]
    return max(bad) if bad else None


@dataclass(frozen=True)
class _Unit:
    """A decision unit: one layer, or a tie group that must share a format."""

    layers: tuple[str, ...]
    formats: tuple[Precision, ...]  # allowed, widest first
    error: Mapping[Precision, float]
    cost: Mapping[Precision, float]  # layers + owned FOLLOW ops, casts excluded
    pin: Pin | None
    notes: Mapping[Precision, str]  # why formats are not allowed


class ValueModel:
    """The lowering's value formats, FOLLOW costs and casts as a function of the units' formats.

    The same rules as :func:`autoprec.core.lowering.lower` (a test holds the two equal), compiled
    for speed: nodes in graph order, each a layer of a unit, a FOLLOW op (the widest of its floating
    inputs), or fixed (fp32, or the I/O format); each floating value with the readers that read its values, each in
    its compute format (fp32 for NEVER ops; the graph's I/O format for its output, and the value of
    its floating inputs).
    """

    def __init__(self, graph: OpGraph, unit_of: Mapping[str, int], cm: CostModel) -> None:
        self.graph, self.cm = graph, cm
        self.ops = graph.nodes
        index = {op.name: i for i, op in enumerate(self.ops)}
        self.unit = [unit_of.get(op.name, -1) if op.is_layer else -1 for op in self.ops]
        self.follow = [op.policy is Policy.FOLLOW for op in self.ops]
        io = graph.io
        # the (compute, value) format of every other node: the graph's I/O format for its output and
        # floating inputs, fp32 for the rest
        self.fixed_format = [(io, io) if op.kind == "output" or (op.kind == "placeholder" and op.float_out)
                             else (FP32, FP32) for op in self.ops]
        self.is_output = [op.kind == "output" for op in self.ops]
        self.inputs = [[index[p] for p in float_inputs(graph, op.name)] for op in self.ops]
        self.readers: list[list[int]] = [[] for _ in self.ops]
        for i, op in enumerate(self.ops):
            if reads_values(op):
                for j in dict.fromkeys(self.inputs[i]):
                    self.readers[j].append(i)
        self.elems = [op.act_out_elems for op in self.ops]
        self._follow_cost: dict[tuple[int, Precision], float] = {}
        self._cast_cost: dict[tuple[int, Precision, Precision], float] = {}
        self._last: tuple[tuple[Precision, ...], list[tuple[Precision, Precision]]] | None = None
        # per unit its layers, and per node the FOLLOW ops that take their format from its value:
        # a unit's move re-decides only nodes whose inputs' formats changed (a residual stream
        # reaches every later add, but a move rarely changes more than the next few)
        self.members: list[list[int]] = [[] for _ in range(1 + max(self.unit, default=-1))]
        for i, v in enumerate(self.unit):
            if v >= 0:
                self.members[v].append(i)
        self.followers: list[list[int]] = [[] for _ in self.ops]
        for i in range(len(self.ops)):
            if self.follow[i]:
                for j in dict.fromkeys(self.inputs[i]):
                    self.followers[j].append(i)

    # --- evaluation ---------------------------------------------------------------------------
    def formats(self, fmt: Sequence[Precision]) -> list[tuple[Precision, Precision]]:
        """(compute, value) format of every node under the unit assignment ``fmt`` (the last one is
        kept: a strategy asks :meth:`delta` for many moves from one assignment)."""
        key = tuple(fmt)
        if self._last is None or self._last[0] != key:
            out: list[tuple[Precision, Precision]] = []
            for i in range(len(self.ops)):
                out.append(self._decide(i, fmt, out))
            self._last = (key, out)
        return list(self._last[1])

    def _decide(self, i: int, fmt: Sequence[Precision], done: Sequence[tuple[Precision, Precision]]
                ) -> tuple[Precision, Precision]:
        u = self.unit[i]
        if u >= 0:
            return fmt[u], fmt[u].compute_output
        if self.follow[i] and self.inputs[i]:
            best = done[self.inputs[i][0]][1]
            for j in self.inputs[i][1:]:
                best = wider(best, done[j][1])
            return best, best
        return self.fixed_format[i]

    def _read(self, i: int, formats: Sequence[tuple[Precision, Precision]]) -> Precision:
        return formats[i][0] if self.unit[i] >= 0 or self.follow[i] or self.is_output[i] else FP32

    def _node_cost(self, i: int, formats: Sequence[tuple[Precision, Precision]]) -> float:
        if not self.follow[i]:
            return 0.0  # layers are priced per unit, fixed ops in the constant part
        key = (i, formats[i][0])
        if key not in self._follow_cost:
            self._follow_cost[key] = self.cm.follow_cost(self.ops[i], formats[i][0])
        return self._follow_cost[key]

    def _casts(self, j: int, formats: Sequence[tuple[Precision, Precision]]) -> float:
        src = formats[j][1]
        total = 0.0
        for d in {self._read(i, formats) for i in self.readers[j]} - {src}:
            key = (j, src, d)
            if key not in self._cast_cost:
                self._cast_cost[key] = self.cm.cast_cost(self.elems[j], src, d)
            total += self._cast_cost[key]
        return total

    def cost(self, fmt: Sequence[Precision]) -> float:
        """Every cost but the units' own: FOLLOW ops, fixed ops and casts."""
        formats = self.formats(fmt)
        return (self.fixed + sum(self._node_cost(i, formats) for i in range(len(self.ops)))
                + sum(self._casts(j, formats) for j in range(len(self.ops)) if self.readers[j]))

    @cached_property
    def fixed(self) -> float:
        return sum(self.cm.fixed_cost(op) for op in self.ops if not op.is_layer and op.policy is not Policy.FOLLOW)

    def delta(self, fmt: list[Precision], u: int, new: Precision) -> float:
        """Change of :meth:`cost` when unit ``u`` alone switches to ``new``: its layers, then in graph
        order the FOLLOW ops whose inputs' value formats changed, and the casts of the values they
        write or read (nothing else changes)."""
        before = self.formats(fmt)
        after = list(before)
        changed: list[int] = []
        old = fmt[u]
        fmt[u] = new
        try:
            todo = list(self.members[u])
            queued = set(todo)
            while todo:
                i = heapq.heappop(todo)  # graph order: a FOLLOW op's inputs are decided before it
                after[i] = self._decide(i, fmt, after)
                if after[i] == before[i]:
                    continue
                changed.append(i)
                if after[i][1] != before[i][1]:
                    for k in self.followers[i]:
                        if k not in queued:
                            queued.add(k)
                            heapq.heappush(todo, k)
        finally:
            fmt[u] = old
        values = {j for i in changed for j in (i, *self.inputs[i]) if self.readers[j]}
        return (sum(self._node_cost(i, after) - self._node_cost(i, before) for i in changed)
                + sum(self._casts(j, after) - self._casts(j, before) for j in sorted(values)))

    def reads_no_dearer(self, u: int, g: Precision, f: Precision) -> bool:
        """Whether the layers of unit ``u`` read their inputs in ``g`` at no higher cast cost than
        in ``f`` whatever the inputs' formats, with no other reader that could share a cast into
        ``f`` or ``g`` (a shared cast may favour either)."""
        for i in self.members[u]:
            for j in self.inputs[i]:
                if any(r != i and (self.unit[r] >= 0 or self.follow[r] or FP32 in (f, g)) for r in self.readers[j]):
                    return False
                for s in (FP32, Precision.BF16, Precision.FP16):
                    cg = 0.0 if s is g else self.cm.cast_cost(self.elems[j], s, g)
                    cf = 0.0 if s is f else self.cm.cast_cost(self.elems[j], s, f)
                    if cg > cf:
                        return False
        return True


class CompiledProblem:
    """The problem reduced to decision units with their costs and errors, and the plan's value
    formats as a function of the units' choices (shared by the strategies).

    The cost of an assignment is the cost model's :meth:`~autoprec.cost.model.CostModel.breakdown`
    of the lowering (:mod:`autoprec.core.lowering`): units' layer costs, every FOLLOW op at the
    format it computes in, fixed ops, and one cast per (value, format) a reader wants. It is
    computed here node by node (:meth:`total_cost`), and only over the nodes a unit's choice
    changes when one unit moves (:meth:`delta_cost`): its layers, the FOLLOW ops whose inputs'
    formats change (through FOLLOW ops only), and the casts of the values they write and read.
    """

    def __init__(self, p: SearchProblem) -> None:
        self.p = p
        graph, cm = p.graph, p.cost_model
        layers = graph.layers()
        self.layer_err: dict[str, dict[Precision, float]] = {}
        self.layer_cost: dict[str, dict[Precision, float]] = {}
        self.err_note: dict[str, str] = {}
        allowed: dict[str, set[Precision]] = {}
        notes: dict[str, dict[Precision, str]] = {}
        pin_of: dict[str, Pin] = {}
        for op in layers:
            allowed[op.name], notes[op.name], pin = self._resolve(op)
            if pin is not None:
                pin_of[op.name] = pin
            self.layer_cost[op.name] = {f: cm.layer_cost(op, f) for f in allowed[op.name]}
        # tie groups -> units (union-find over layer names)
        parent = {op.name: op.name for op in layers}

        def root(n: str) -> str:
            while parent[n] != n:
                parent[n] = parent[parent[n]]
                n = parent[n]
            return n

        for tie in graph.ties if p.ties is None else p.ties:
            members = [n for n in tie if n in parent]
            for n in members[1:]:
                parent[root(n)] = root(members[0])
        groups: dict[str, list[str]] = {}
        for op in layers:
            groups.setdefault(root(op.name), []).append(op.name)
        self.units: list[_Unit] = []
        self.unit_of: dict[str, int] = {}
        for members in groups.values():  # insertion order = execution order of first member
            common = set.intersection(*(allowed[n] for n in members))
            if not common:
                raise UsageError(f"tied layers {', '.join(members)} have no format in common: check the pins")
            fmts = tuple(sorted(common, key=lambda f: f.rank))
            pins = [pin_of[n] for n in members if n in pin_of]
            pin = next((q for q in pins if q.source == "force"), pins[0] if pins else None)
            merged = {f: r for n in members for f, r in notes[n].items() if f not in common}
            for f in set().union(*(allowed[n] for n in members)) - common:
                merged.setdefault(f, "not allowed for every tied layer")
            for n in members:
                self.unit_of[n] = len(self.units)
            self.units.append(_Unit(
                tuple(members), fmts,
                {f: sum(self.layer_err[n][f] for n in members) for f in fmts},
                {f: sum(self.layer_cost[n][f] for n in members) for f in fmts},
                pin, merged))
        self.values = ValueModel(graph, self.unit_of, cm)
        self.widest = [u.formats[0] for u in self.units]
        self.base_cost = self.total_cost(self.widest)  # all fp32 but for forced pins: the scale

    def _resolve(self, op: OpNode) -> tuple[set[Precision], dict[Precision, str], Pin | None]:
        """Allowed formats of one layer, why the others are not, and the pin that applies."""
        p, cm, name = self.p, self.p.cost_model, op.name
        offered = {FP32, *p.candidates.get(name, ())}
        why = {f: r for f, r in p.excluded.get(name, {}).items() if f is not FP32}
        prof = p.profile.errors.get(name, {})
        errs = {f: max(0.0, float(v)) for f, v in prof.items() if math.isfinite(v)}  # < 0 is noise
        errs[FP32] = 0.0
        for f in sorted(offered - {FP32}, key=lambda f: f.rank):
            if not cm.supports(f):
                why.setdefault(f, f"not supported on {cm.name}")
            elif f not in prof:
                why.setdefault(f, f"not profiled in {f}")
            elif f not in errs:
                why.setdefault(f, f"{f} error is {prof[f]}")
        allowed = {f for f in offered if f not in why}
        pin: Pin | None = None
        for q in p.pins:
            if q.source == "keep" and q.matches(op):
                allowed &= q.allowed()
                pin = pin or q
        forced = [q for q in p.pins if q.source == "force" and q.matches(op)]
        if len({q.format for q in forced}) > 1:
            raise UsageError(f"layer {name} matches conflicting pins: {', '.join(map(str, forced))}")
        if forced:
            kept = [q for q in p.pins if q.source == "keep" and q.matches(op) and forced[0].format not in q.allowed()]
            if kept:
                raise UsageError(f"layer {name} matches {kept[0]} and {forced[0]}, which asks for a format the keep "
                                 "forbids: drop one of the two or narrow its pattern")
            pin, f = forced[0], forced[0].format
            if not cm.supports(f):
                raise UsageError(f"{pin} asks for {f} but {cm.name} does not support it")
            if f not in errs:
                errs[f] = 0.0
                self.err_note[name] = f"its {f} error ({prof.get(f, 'not profiled')}) is not counted"
            allowed = {f}
        self.layer_err[name] = {f: errs.get(f, 0.0) for f in allowed}
        return allowed, {f: r for f, r in why.items() if f not in allowed}, pin

    # --- evaluation ---------------------------------------------------------------------------
    def total_cost(self, fmt: Sequence[Precision]) -> float:
        """The cost model's plan cost of the assignment ``fmt`` (one format per unit)."""
        return sum(u.cost[f] for u, f in zip(self.units, fmt)) + self.values.cost(fmt)

    def total_error(self, fmt: Sequence[Precision]) -> float:
        return sum(self.layer_err[n][f] for u, f in zip(self.units, fmt) for n in u.layers)

    def delta_cost(self, fmt: list[Precision], u: int, new: Precision) -> float:
        """Cost change when unit ``u`` alone switches to ``new``."""
        return self.units[u].cost[new] - self.units[u].cost[fmt[u]] + self.values.delta(fmt, u, new)

    def undominated(self, ui: int, formats: list[Precision]) -> list[Precision]:
        """Drop formats another one beats in every respect (fp8_e5m2 next to a less harmful
        fp8_e4m3, say): no cheaper plan can use them, and the MILP gets smaller."""
        def beats(g: Precision, f: Precision) -> bool:
            u = self.units[ui]
            if g.compute_output is not f.compute_output or u.cost[g] > u.cost[f] or u.error[g] > u.error[f]:
                return False
            return self.values.reads_no_dearer(ui, g, f)

        return [f for f in formats
                if not any(g is not f and beats(g, f) and (not beats(f, g) or g.rank < f.rank) for g in formats)]

    def uniform(self, f: Precision) -> list[Precision]:
        """Every unit in ``f`` where it is allowed, else in its widest allowed format."""
        return [f if f in u.formats else self.widest[ui] for ui, u in enumerate(self.units)]

    def to_layers(self, fmt: Sequence[Precision]) -> dict[str, Precision]:
        return {n: f for u, f in zip(self.units, fmt) for n in u.layers}

    def from_layers(self, assignment: Mapping[str, Precision]) -> list[Precision]:
        out = []
        for u in self.units:
            fs = {assignment.get(n, FP32) for n in u.layers}
            if len(fs) != 1:
                raise UsageError(f"tied layers {', '.join(u.layers)} were given different formats")
            f = fs.pop()
            if f not in u.formats:
                why = u.notes.get(f) or (f"pinned by {u.pin}" if u.pin else "not a candidate")
                raise UsageError(f"{f} is not allowed for {u.layers[0]}: {why}")
            out.append(f)
        return out

    # --- plans ---------------------------------------------------------------------------------
    @cached_property
    def fp32_reference(self) -> tuple[float, float]:
        """(cost, deployed memory bytes) of the all-fp32 model with fp32 inputs and outputs, the
        baseline of every plan's speedup and memory figure (:func:`autoprec.cost.memory.deployed_memory`)."""
        fp32 = self.p.graph.with_io(Precision.FP32)
        return self.p.cost_model.plan_cost(fp32, {}), deployed_memory(fp32, {})

    def plan(self, assignment: Mapping[str, Precision], budget: float, strategy: str,
             alternatives: tuple[Alternative, ...], notes: tuple[str, ...]) -> PrecisionPlan:
        p, cm, graph = self.p, self.p.cost_model, self.p.graph
        fmt = self.from_layers(assignment)
        layer_fmt = self.to_layers(fmt)
        total_err = self.total_error(fmt)
        reasons = self.reasons(fmt, budget, strategy, total_err)
        decisions = tuple(
            LayerDecision(op.name, op.scope, op.kind, layer_fmt[op.name], reasons[op.name],
                          self.layer_err[op.name][layer_fmt[op.name]], self.layer_cost[op.name][layer_fmt[op.name]])
            for op in graph.layers())
        b = cm.breakdown(graph, layer_fmt)
        if total_err > budget:
            notes += (f"predicted error {total_err:.2e} exceeds the budget {budget:.2e}: "
                      f"pinned layers alone need {fixed_error(self):.2e}",)
        return PrecisionPlan(
            model_name=graph.model_name or p.profile.model_name, fingerprint=graph.fingerprint(),
            target=cm.name, objective=cm.objective, budget=Budget(budget, p.profile.measure),
            decisions=decisions, strategy=strategy, cost=b.total, fp32_cost=self.fp32_reference[0],
            cast_cost=b.casts, memory_bytes=deployed_memory(graph, layer_fmt),
            fp32_memory_bytes=self.fp32_reference[1], predicted_error=total_err, pins=p.pins,
            alternatives=alternatives, notes=notes, io=graph.io)

    def reasons(self, fmt: list[Precision], budget: float, strategy: str, total_err: float) -> dict[str, str]:
        """A readable reason per layer: pin, exclusion, budget or cost."""
        out: dict[str, str] = {}
        for ui, (u, f) in enumerate(zip(self.units, fmt)):
            remaining = budget - (total_err - u.error[f])
            alts = [g for g in u.formats if g is not f]
            cheaper = sorted((g for g in alts if self.delta_cost(fmt, ui, g) < -1e-9 * self.base_cost),
                             key=lambda g: (self.delta_cost(fmt, ui, g), g.rank))
            if u.pin is not None and (u.pin.source == "force" or not alts):
                text = f"pinned by {u.pin}"
            elif f is FP32 and not alts:
                text = _excluded_text(u.notes.items()) or "no other candidate format"
            elif f is FP32 and not cheaper:
                text = "fp32 is cheapest here: the casts around a lower format cost more than it saves"
            elif cheaper and min(u.error[g] for g in cheaper) > remaining:
                g = min(cheaper, key=lambda g: (u.error[g], g.rank))
                gap = f"sensitivity {u.error[g]:.1e} in {g} exceeds the remaining budget {max(remaining, 0.0):.1e}"
                text = gap if f is FP32 else f"cheapest format within budget ({gap})"
            elif cheaper:
                text = f"kept at {f} by the {strategy} strategy ({cheaper[0]} would be cheaper and fit)"
            else:
                text = "cheapest format within budget"
                narrower = sorted((g for g in alts if g.rank > f.rank and g not in u.notes), key=lambda g: g.rank)
                slow = {g: note for g in narrower if (note := self.p.cost_model.compute_note(g))}
                faster = [g for g in narrower if g not in slow]
                if faster:
                    text += (f"; {'/'.join(str(g) for g in faster)} would cost more here: the casts at its "
                             f"boundaries outweigh its faster math")
                for g, note in slow.items():
                    text += f"; {g} would cost more here: {note}, so it adds only casts"
            if f is not FP32 or alts:
                # formats the layer was never offered: say why (overflow, target or provider support)
                lost = _excluded_text(u.notes.items())
                if lost:
                    text += f"; {lost}" if text.endswith(")") else f" ({lost})"
            if u.pin is not None and u.pin.source == "keep" and alts:
                text += f"; limited by {u.pin}"
            for n in u.layers:
                extra = f"; tied with {', '.join(m for m in u.layers if m != n)}" if len(u.layers) > 1 else ""
                note = f"; {self.err_note[n]}" if n in self.err_note else ""
                out[n] = text + extra + note
        return out



@runtime_checkable
class Strategy(Protocol):
    """A search strategy: ``solve`` returns a plan whose predicted error fits ``budget``
    (``None``: the problem's budget) unless pins make that impossible."""

    name: str

    def solve(self, problem: SearchProblem, budget: float | None = None) -> PrecisionPlan: ...


def checked_budget(problem: SearchProblem, budget: float | None) -> float:
    b = problem.budget if budget is None else float(budget)
    if math.isnan(b) or b < 0:
        raise UsageError(f"error budget must be >= 0, got {b}")
    return b


def _excluded_text(notes: Iterable[tuple[Precision, str]]) -> str:
    """Exclusions grouped by reason: ``fp8_e5m2, fp8_e4m3 excluded: not supported on a100``."""
    by_reason: dict[str, list[Precision]] = {}
    for f, r in sorted(notes, key=lambda x: x[0].rank):
        by_reason.setdefault(r, []).append(f)
    return "; ".join(f"{', '.join(map(str, fs))} excluded: {r}" for r, fs in by_reason.items())


def fixed_error(c: CompiledProblem) -> float:
    return sum(u.error[u.formats[0]] for u in c.units if len(u.formats) == 1)


