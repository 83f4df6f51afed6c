"""Search: pick a format per layer that minimises estimated cost within an error budget.

The accuracy model is additive: a plan's predicted error is the sum of the profile's per-layer
errors (each measured with only that layer lowered). Under that model the problem is a
multiple-choice knapsack with cast costs on the edges between layers; the default strategy
solves it exactly as a MILP. Because the additive model is only a prediction, :func:`tune_loop`
verifies plans with a real measurement (a callback: this module imports no torch) and tightens
the error budget until the measured metric drop fits the user's budget.

Tied layers (``OpGraph.ties``) and pins are handled once, up front: every tie group becomes one
decision unit whose allowed formats are the intersection of its members'.
"""

from __future__ import annotations

import ctypes
import math
import os
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Callable, Iterable, Iterator, Mapping, Protocol, Sequence, runtime_checkable

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import csr_array

from autoprec.cost import CostModel, RooflineCostModel, cast_groups, memory_bytes
from autoprec.errors import UsageError
from autoprec.formats import Precision, parse_precision
from autoprec.opgraph import OpGraph, OpNode, Policy
from autoprec.plan import Alternative, Budget, LayerDecision, Pin, PrecisionPlan, TuneStep
from autoprec.sensitivity import SensitivityProfile

FP32 = Precision.FP32


# --- the problem -----------------------------------------------------------------------------
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
    def compiled(self) -> "_Compiled":
        return _Compiled(self)

    def uniform_assignment(self, f: Precision) -> dict[str, Precision]:
        """Every layer in ``f`` where exclusions, pins and ties allow it, else its widest allowed
        format (fp32 unless pinned otherwise): the uniform baseline a mixed plan must beat."""
        c = self.compiled
        return c.to_layers(c.uniform(f))

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


class _Compiled:
    """The problem reduced to units, per-unit costs/errors and cast groups (shared by strategies)."""

    def __init__(self, p: SearchProblem) -> None:
        self.p = p
        graph, cm = p.graph, p.cost_model
        layers = graph.layers()
        self.layer_err: dict[str, dict[Precision, float]] = {}
        self.layer_cost: dict[str, dict[Precision, float]] = {}
        self.err_note: dict[str, str] = {}
        owner = graph.follow_owner()
        owned: dict[str, list[OpNode]] = {}
        self.fixed = 0.0
        for op in graph.nodes:
            if op.policy is Policy.FOLLOW and owner.get(op.name):
                owned.setdefault(owner[op.name], []).append(op)
            elif op.policy is Policy.FOLLOW:
                self.fixed += cm.follow_cost(op, FP32)
            elif op.policy is not Policy.ALWAYS:
                self.fixed += cm.fixed_cost(op)
        allowed: dict[str, set[Precision]] = {}
        notes: dict[str, dict[Precision, str]] = {}
        pin_of: dict[str, Pin] = {}
        for op in layers:
            allowed[op.name], notes[op.name], pin = self._resolve(op)
            if pin is not None:
                pin_of[op.name] = pin
            self.layer_cost[op.name] = {
                f: cm.layer_cost(op, f) + sum(cm.follow_cost(x, f.compute_output) for x in owned.get(op.name, ()))
                for f in allowed[op.name]}
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
        # cast groups in unit terms
        self.groups = cast_groups(graph)
        self.g_src = [self.unit_of[g.producer] if g.producer else None for g in self.groups]
        self.g_dst = [tuple(sorted({self.unit_of[c] for c in g.consumers})) for g in self.groups]
        self.g_fp32 = [g.to_fp32 for g in self.groups]  # fp32 is a destination whatever the plan
        self.groups_of: list[list[int]] = [[] for _ in self.units]
        for gi, (s, ds) in enumerate(zip(self.g_src, self.g_dst)):
            for u in sorted(set(ds) | ({s} if s is not None else set())):
                self.groups_of[u].append(gi)
        self.neighbours = [sorted({ui} | {v for gi in gs for v in (*self.g_dst[gi], self.g_src[gi]) if v is not None})
                           for ui, gs in enumerate(self.groups_of)]
        self._cast_cache: dict[tuple[int, Precision, Precision], float] = {}
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
    def cast(self, gi: int, fmt: Sequence[Precision]) -> float:
        g, s = self.groups[gi], self.g_src[gi]
        src = FP32 if s is None else fmt[s].compute_output
        total = 0.0
        dsts = {fmt[u] for u in self.g_dst[gi]} | ({FP32} if self.g_fp32[gi] else set())
        for d in sorted(dsts - {src}, key=lambda f: f.rank):
            key = (g.elems, src, d)
            if key not in self._cast_cache:
                self._cast_cache[key] = self.p.cost_model.cast_cost(g.elems, src, d)
            total += self._cast_cache[key]
        return total

    def total_cost(self, fmt: Sequence[Precision]) -> float:
        return (self.fixed + sum(u.cost[f] for u, f in zip(self.units, fmt))
                + sum(self.cast(gi, fmt) for gi in range(len(self.groups))))

    def total_error(self, fmt: Sequence[Precision]) -> float:
        return sum(self.layer_err[n][f] for u, f in zip(self.units, fmt) for n in u.layers)

    def delta_cost(self, fmt: list[Precision], u: int, new: Precision) -> float:
        """Cost change when unit ``u`` alone switches to ``new``."""
        old = fmt[u]
        before = sum(self.cast(gi, fmt) for gi in self.groups_of[u])
        fmt[u] = new
        after = sum(self.cast(gi, fmt) for gi in self.groups_of[u])
        fmt[u] = old
        return self.units[u].cost[new] - self.units[u].cost[old] + after - before

    def undominated(self, ui: int, formats: list[Precision]) -> list[Precision]:
        """Drop formats another one beats in every respect (fp8_e5m2 next to a less harmful
        fp8_e4m3, say): no cheaper plan can use them, and the MILP gets smaller."""
        def beats(g: Precision, f: Precision) -> bool:
            u = self.units[ui]
            if g.compute_output is not f.compute_output or u.cost[g] > u.cost[f] or u.error[g] > u.error[f]:
                return False
            for gi in self.groups_of[ui]:
                if ui not in self.g_dst[gi]:
                    continue  # as a producer: same output format, same casts
                if len(self.g_dst[gi]) > 1 or self.g_fp32[gi] or self.g_src[gi] == ui:
                    return False  # a cast shared with other consumers may favour f
                n = self.groups[gi].elems
                for s in {FP32, Precision.BF16, Precision.FP16}:
                    cg = 0.0 if s is g else self.p.cost_model.cast_cost(n, s, g)
                    cf = 0.0 if s is f else self.p.cost_model.cast_cost(n, s, f)
                    if cg > cf:
                        return False
            return True

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
        """(cost, memory bytes) of the all-fp32 model, the baseline of every plan's speedup."""
        return self.p.cost_model.plan_cost(self.p.graph, {}), memory_bytes(self.p.graph, {})

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
                      f"pinned layers alone need {_fixed_error(self):.2e}",)
        return PrecisionPlan(
            model_name=graph.model_name or p.profile.model_name, fingerprint=graph.fingerprint(),
            target=cm.name, objective=cm.objective, budget=Budget(budget, p.profile.measure),
            decisions=decisions, strategy=strategy, cost=b.total, fp32_cost=self.fp32_reference[0],
            cast_cost=b.casts, memory_bytes=memory_bytes(graph, layer_fmt),
            fp32_memory_bytes=self.fp32_reference[1], predicted_error=total_err, pins=p.pins,
            alternatives=alternatives, notes=notes)

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


# --- strategies ------------------------------------------------------------------------------
@runtime_checkable
class Strategy(Protocol):
    """A search strategy: ``solve`` returns a plan whose predicted error fits ``budget``
    (``None``: the problem's budget) unless pins make that impossible."""

    name: str

    def solve(self, problem: SearchProblem, budget: float | None = None) -> PrecisionPlan: ...


def _budget(problem: SearchProblem, budget: float | None) -> float:
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


def _fixed_error(c: _Compiled) -> float:
    return sum(u.error[u.formats[0]] for u in c.units if len(u.formats) == 1)


class MilpStrategy:
    """Exact multiple-choice knapsack with cast costs, solved by HiGHS through scipy.optimize.milp.

    Variables: a binary x[u, f] per unit and allowed format, with sum_f x[u, f] = 1 and
    sum err[u, f] x[u, f] <= budget; casts are linearised exactly per cast group (see
    :meth:`_casts`): continuous "producer writes s, consumer reads d" indicators whose cast cost
    is charged once per (value, destination format). The objective therefore equals the cost
    model's plan_cost for every 0/1 assignment. Costs are scaled so the widest plan is 1e4 and the
    relative MIP gap is 1e-9: the answer is optimal to ~1e-9 of its cost. Formats that another
    format beats in cost, error and casts alike are dropped first (they cannot be in a strictly
    better plan), which shrinks the model. ``time_limit`` (seconds per HiGHS call) is a safety valve for huge
    or highly symmetric models: when it strikes, the best plan found so far is returned (still
    within budget) and the plan's notes say optimality was not proven.

    Ties in cost are common (bf16 and fp16 cost the same on every target), and a tie is where
    the profile should decide, so a second solve keeps the cost within COST_TOL of that optimum
    and minimises the predicted error: lexicographic (cost, error), deterministic.
    """

    name = "milp"
    COST_SCALE = 1e4
    COST_TOL = 1e-9

    def __init__(self, time_limit: float = 60.0, mip_rel_gap: float = 1e-9) -> None:
        self.time_limit = time_limit
        self.mip_rel_gap = mip_rel_gap

    def solve(self, problem: SearchProblem, budget: float | None = None) -> PrecisionPlan:
        b = _budget(problem, budget)
        c = problem.compiled
        fmt, proven = self.assign(c, b)
        notes = () if proven else (f"milp: optimality not proven within {self.time_limit:g} s; best plan found",)
        return problem.make_plan(c.to_layers(fmt), b, self.name, notes=notes)

    def assign(self, c: _Compiled, budget: float) -> tuple[list[Precision], bool]:
        """The optimal format per unit, and whether HiGHS proved it optimal."""
        rem = max(0.0, budget - _fixed_error(c))
        opts = [c.undominated(ui, [f for f in u.formats if len(u.formats) == 1 or u.error[f] <= rem])
                for ui, u in enumerate(c.units)]
        # HiGHS accepts a binary within 1e-6 of 0/1, so a rounded answer can overshoot the budget by
        # ~1e-6 of it: check exactly and, rarely, re-solve with the budget shaved by a margin.
        for margin in (0.0, 1e-9, 1e-6, 1e-4):
            fmt, proven = self._solve(c, opts, rem * (1 - margin))
            if c.total_error(fmt) <= budget or not math.isfinite(rem) or rem == 0:
                return fmt, proven
        return GreedyStrategy().assign(c, budget), False  # unreachable in practice; still valid

    def _solve(self, c: _Compiled, opts: list[list[Precision]], rem: float) -> tuple[list[Precision], bool]:
        cscale = self.COST_SCALE / c.base_cost if c.base_cost > 0 else 1.0
        m = _Model()
        x = {(ui, f): m.var(cscale * c.units[ui].cost[f], integer=True)
             for ui, fs in enumerate(opts) if len(fs) > 1 for f in fs}
        if not x:
            return [fs[0] for fs in opts], True
        for ui, fs in enumerate(opts):  # one format per unit
            if len(fs) > 1:
                m.row({x[(ui, f)]: 1.0 for f in fs}, 1.0, 1.0)
        if math.isfinite(rem) and any(c.units[ui].error[f] > 0 for (ui, f) in x):
            scale = rem if rem > 0 else 1.0
            m.row({i: c.units[ui].error[f] / scale for (ui, f), i in x.items()}, -np.inf, rem / scale)
        for gi, g in enumerate(c.groups):
            self._casts(c, m, x, opts, gi, cscale)
        opt = dict(time_limit=self.time_limit, mip_rel_gap=self.mip_rel_gap)
        res = m.solve(**opt)
        if res is None:  # cannot happen (all-widest is feasible); stay safe rather than crash
            return [fs[0] for fs in opts], False
        proven = res.status == 0
        escale = sum(max(u.error.values()) for u in c.units) / 1e3 or 1.0
        err = {i: c.units[ui].error[f] / escale for (ui, f), i in x.items()}
        if any(err.values()):  # second pass: least error among the (near-)cheapest plans
            m.row({i: v for i, v in enumerate(m.cost) if v}, -np.inf, res.fun + self.COST_TOL * max(abs(res.fun), 1.0))
            res = m.solve(objective=err, **opt) or res
        return [fs[0] if len(fs) == 1 else max(fs, key=lambda f: (res.x[x[(ui, f)]], -f.rank))
                for ui, fs in enumerate(opts)], proven

    @staticmethod
    def _casts(c: _Compiled, m: "_Model", x: dict, opts: list[list[Precision]], gi: int, cscale: float) -> None:
        """Charge the casts of cast group ``gi``.

        For each consumer unit, P[s, d] says "the producer writes s and the consumer reads d". If
        either side is fixed, P is the other side's indicator; otherwise P is a transport block
        z[s, d] >= 0 with row sums = the producer's indicators and column sums = the consumer's,
        which is exact for 0/1 x and gives a much tighter LP relaxation than w >= X + Y - 1.
        A cast shared by several consumer units is charged once through w[s, d] >= P[s, d].
        """
        g, su, dus = c.groups[gi], c.g_src[gi], c.g_dst[gi]
        srcs = sorted({FP32} if su is None else {f.compute_output for f in opts[su]}, key=lambda f: f.rank)

        def src(s: Precision) -> dict[int, float]:
            return {x[(su, f)]: 1.0 for f in opts[su] if f.compute_output is s}

        per_consumer: list[dict[tuple[Precision, Precision], dict[int, float] | None]] = []
        # an fp32 sink (NEVER op, graph output) is a consumer whose only format is fp32
        for du, dsts in [(du, opts[du]) for du in dus] + ([(None, [FP32])] if c.g_fp32[gi] else []):
            pairs: dict[tuple[Precision, Precision], dict[int, float] | None] = {}  # None: always 1
            if len(srcs) == 1 and len(dsts) == 1:
                pairs[(srcs[0], dsts[0])] = None
            elif len(srcs) == 1:
                pairs.update({(srcs[0], d): {x[(du, d)]: 1.0} for d in dsts})
            elif len(dsts) == 1:
                pairs.update({(s, dsts[0]): src(s) for s in srcs})
            else:
                z = {(s, d): m.var(0.0) for s in srcs for d in dsts}
                for s in srcs:
                    m.row({**{z[(s, d)]: 1.0 for d in dsts}, **{i: -1.0 for i in src(s)}}, 0.0, 0.0)
                for d in dsts:
                    m.row({**{z[(s, d)]: 1.0 for s in srcs}, x[(du, d)]: -1.0}, 0.0, 0.0)
                pairs.update({k: {i: 1.0} for k, i in z.items()})
            per_consumer.append(pairs)
        always = {k for pairs in per_consumer for k, t in pairs.items() if t is None}  # constants
        shared: dict[tuple[Precision, Precision], int] = {}
        for pairs in per_consumer:
            for (s, d), terms in pairs.items():
                cost = c.p.cost_model.cast_cost(g.elems, s, d) if s is not d else 0.0
                if cost <= 0 or terms is None or (s, d) in always:
                    continue
                if len(per_consumer) == 1:
                    for i, a in terms.items():
                        m.cost[i] += cscale * cost * a
                    continue
                if (s, d) not in shared:
                    shared[(s, d)] = m.var(cscale * cost)
                m.row({**terms, shared[(s, d)]: -1.0}, -np.inf, 0.0)


class _Model:
    """A small MILP builder over scipy.optimize.milp: variables in [0, 1], sparse rows."""

    def __init__(self) -> None:
        self.cost: list[float] = []
        self.integer: list[bool] = []
        self.rows: list[tuple[dict[int, float], float, float]] = []

    def var(self, cost: float, integer: bool = False) -> int:
        self.cost.append(cost)
        self.integer.append(integer)
        return len(self.cost) - 1

    def row(self, terms: dict[int, float], lo: float, hi: float) -> None:
        self.rows.append((terms, lo, hi))

    def solve(self, objective: Mapping[int, float] | None = None, time_limit: float = 60.0,
              mip_rel_gap: float = 1e-9):
        """Solve with HiGHS; None when it found no feasible point."""
        n = len(self.cost)
        c = np.array(self.cost) if objective is None else np.array([objective.get(i, 0.0) for i in range(n)])
        data, ri, ci = [], [], []
        for r, (terms, _, _) in enumerate(self.rows):
            for i, a in sorted(terms.items()):
                data.append(a)
                ri.append(r)
                ci.append(i)
        a = csr_array((data, (ri, ci)), shape=(len(self.rows), n))
        lo = np.array([r[1] for r in self.rows])
        hi = np.array([r[2] for r in self.rows])
        # presolve off: HiGHS 1.12 prints a stray "transformNewIntegerFeasibleSolution" line to
        # stdout when it maps a presolved solution back (ERGO-Code/HiGHS#2783); these models are
        # small enough that presolve buys nothing measurable. Its sub-MIPs print it too, hence
        # the silenced stdout.
        with silenced_c_stdout():
            res = milp(c, integrality=np.array(self.integer, dtype=float), bounds=Bounds(0.0, 1.0),
                       constraints=LinearConstraint(a, lo, hi),
                       options={"mip_rel_gap": mip_rel_gap, "time_limit": time_limit, "presolve": False})
        return res if res.x is not None else None


@contextmanager
def silenced_c_stdout() -> Iterator[None]:
    """Send file descriptor 1 to the null device for the block: what C code prints there (HiGHS
    does, whatever its options) would otherwise corrupt output meant for programs, like
    ``autoprec tune --json``. Python's own prints in the block are flushed out first and then lost
    too, so the block must print nothing a user needs."""
    sys.stdout.flush()
    try:
        saved = os.dup(1)
    except OSError:  # no stdout at all: nothing to protect
        yield
        return
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 1)
        yield
    finally:
        _flush_c_stdio()  # C's buffer goes to the null device, not to the restored stdout
        os.dup2(saved, 1)
        os.close(saved)
        os.close(null)


def _flush_c_stdio() -> None:
    try:
        ctypes.CDLL(None).fflush(None)
    except (OSError, AttributeError, TypeError):  # no C library to ask (not a POSIX platform)
        pass


class GreedyStrategy:
    """Start from the widest allowed format everywhere and repeatedly take the single-unit move
    with the best cost saving per unit of added error, until no saving fits the budget.

    Fast and transparent, but blind to moves that only pay off together (a chain of layers whose
    casts cancel out once all of them are lowered): the MILP finds those.
    """

    name = "greedy"

    def solve(self, problem: SearchProblem, budget: float | None = None) -> PrecisionPlan:
        b = _budget(problem, budget)
        c = problem.compiled
        return problem.make_plan(c.to_layers(self.assign(c, b)), b, self.name)

    def assign(self, c: _Compiled, budget: float) -> list[Precision]:
        fmt = list(c.widest)
        err = c.total_error(fmt)
        tiny = 1e-12 * c.base_cost
        history: list[tuple[int, Precision]] = []
        savings: dict[tuple[int, Precision], float] = {}  # cached; a move invalidates its neighbours
        while True:
            best: tuple | None = None
            for ui, u in enumerate(c.units):
                for f in u.formats:
                    if f is fmt[ui]:
                        continue
                    de = u.error[f] - u.error[fmt[ui]]
                    if err + de > budget:
                        continue
                    if (ui, f) not in savings:
                        savings[(ui, f)] = -c.delta_cost(fmt, ui, f)
                    saving = savings[(ui, f)]
                    if saving <= tiny:
                        continue
                    score = saving / de if de > 0 else math.inf
                    key = (score, saving, -ui, -f.rank)
                    if best is None or key > best[0]:
                        best = (key, ui, f, de)
            if best is None:
                break
            _, ui, f, de = best
            history.append((ui, fmt[ui]))
            fmt[ui] = f
            for v in c.neighbours[ui]:
                for g in c.units[v].formats:
                    savings.pop((v, g), None)
            err = c.total_error(fmt)  # exact, not accumulated: the budget test is strict
        while history and c.total_error(fmt) > budget:  # a move that fit only by rounding
            ui, f = history.pop()
            fmt[ui] = f
        return fmt


class BisectionStrategy:
    """The onnxconverter-common recipe: lower every layer to one format; while the predicted
    error is over budget, split the layer list in halves, recurse into each half with the budget
    the earlier half left, and keep single offending layers in fp32."""

    def __init__(self, low: Precision | str = Precision.FP16) -> None:
        self.low = parse_precision(low)
        self.name = "bisection" if self.low is Precision.FP16 else f"bisection:{self.low}"

    def solve(self, problem: SearchProblem, budget: float | None = None) -> PrecisionPlan:
        b = _budget(problem, budget)
        c = problem.compiled
        fmt = list(c.widest)
        order = [ui for ui, u in enumerate(c.units) if FP32 in u.formats and self.low in u.formats]

        def lower(seg: list[int], remaining: float) -> float:
            e = sum(c.units[ui].error[self.low] for ui in seg)
            if e <= remaining:
                for ui in seg:
                    fmt[ui] = self.low
                return e
            if len(seg) == 1:
                return 0.0
            mid = len(seg) // 2
            e1 = lower(seg[:mid], remaining)
            return e1 + lower(seg[mid:], remaining - e1)

        if order:
            lower(order, b - c.total_error(fmt))
        return problem.make_plan(c.to_layers(fmt), b, self.name)


class UniformStrategy:
    """Every layer in one format (fp32 where that format is not allowed): the cheapest such plan
    within budget. The plan lists every uniform option with its predicted error and cost."""

    name = "uniform"

    def solve(self, problem: SearchProblem, budget: float | None = None) -> PrecisionPlan:
        b = _budget(problem, budget)
        c = problem.compiled
        formats = sorted({f for u in c.units for f in u.formats} | {FP32}, key=lambda f: f.rank)
        options = []
        for f in formats:
            fmt = c.uniform(f)
            e, cost = c.total_error(fmt), c.total_cost(fmt)
            options.append((fmt, Alternative(f"uniform {f}", e, cost, e <= b)))
        fits = [o for o in options if o[1].within_budget] or options[:1]
        best = min(fits, key=lambda o: (o[1].cost, o[1].predicted_error))
        return problem.make_plan(c.to_layers(best[0]), b, self.name, [a for _, a in options])


STRATEGIES: dict[str, Strategy] = {
    s.name: s for s in (MilpStrategy(), GreedyStrategy(), BisectionStrategy(), UniformStrategy())
}


def register_strategy(strategy: Strategy) -> None:
    """Make ``strategy`` available by its ``name`` (e.g. for ``--strategy``)."""
    STRATEGIES[strategy.name] = strategy


def get_strategy(name: str | Strategy = "milp") -> Strategy:
    """A strategy by name; ``"bisection:bf16"`` picks bisection's low format."""
    if not isinstance(name, str):
        return name
    key = name.strip().lower()
    if key in STRATEGIES:
        return STRATEGIES[key]
    if key.startswith("bisection:"):
        return BisectionStrategy(key.split(":", 1)[1])
    raise UsageError(f"unknown strategy {name!r}: use one of {', '.join(STRATEGIES)} (or bisection:FORMAT)")


def solve(problem: SearchProblem, strategy: str | Strategy = "milp", budget: float | None = None) -> PrecisionPlan:
    """Solve ``problem`` with a strategy given by name or object."""
    return get_strategy(strategy).solve(problem, budget)


# --- verify & repair -------------------------------------------------------------------------
#: The tune loop aims a re-solve at this fraction of the metric budget, leaving room for noise.
TARGET_FILL = 0.9
#: Stop refining once the known-good and known-bad error budgets are this close (relative).
BRACKET_TOL = 0.02


def max_measurements(n_layers: int) -> int:
    """The tune loop's measurement cap: 2 + ceil(log2(L))."""
    return 2 + math.ceil(math.log2(max(n_layers, 1)))


def tune_loop(
    problem: SearchProblem,
    strategy: str | Strategy,
    measure: Callable[[PrecisionPlan], float],
    budget_metric: float,
    max_evals: int | None = None,
    error_budget: float | None = None,
) -> PrecisionPlan:
    """Find the cheapest plan whose *measured* metric drop is within ``budget_metric``.

    ``measure(plan)`` returns the metric drop of the plan (metric units, positive is worse).

    The additive error model ranks plans well, but its exchange rate to the user's metric is
    unknown, so the loop learns it from measurements:

    - The first plan is solved at ``error_budget`` (default: the problem's budget, the caller's
      guess of the metric budget in error units; when that is 0, the strategy's unconstrained
      optimum, whose large predicted error gives a well-conditioned first estimate).
    - After each measurement, k = measured drop / predicted error is the exchange rate, and the
      next error budget is TARGET_FILL * budget_metric / k (a secant step aimed just inside).
    - Every measured plan brackets the answer: within budget makes its error budget known-good,
      over budget known-bad; a step that leaves the bracket bisects it instead. Error budget 0
      (all fp32, or the forced pins' formats: drop 0 by definition, never measured) is the
      first known-good point, so there is always a verified plan to fall back on.
    - Budgets above the strategy's unconstrained optimum change nothing and are clipped; a plan
      seen before is not measured again.

    ``measure`` runs at most ``max_evals`` times (default 2 + ceil(log2(L)), L layers). The
    result is the cheapest plan measured within budget, with ``steps`` (error budget, predicted,
    measured per attempt) and ``measured`` = {drop, evaluations, error_budget}; callers add
    metric_fp32 / metric_tuned with :meth:`PrecisionPlan.with_measured`.
    """
    strat = get_strategy(strategy)
    limit = max_measurements(len(problem.graph.layers())) if max_evals is None else max(0, int(max_evals))
    if not budget_metric >= 0:
        raise UsageError(f"metric budget must be >= 0, got {budget_metric}")
    c = problem.compiled
    best = problem.make_plan(c.to_layers(c.widest), 0.0, strat.name)
    best_drop = 0.0
    widest = tuple(best.assignment.items())
    ceiling = strat.solve(problem, math.inf).predicted_error
    good_b, bad_b = 0.0, math.inf
    seen: dict[tuple, float] = {widest: 0.0}
    steps: list[TuneStep] = []
    evals = 0
    b = _budget(problem, error_budget) or ceiling
    for it in range(4 * limit + 8):
        b = min(b, ceiling)
        if it and not good_b < b < bad_b:
            if not math.isfinite(bad_b):
                break
            b = (good_b + bad_b) / 2
        plan = strat.solve(problem, b)
        key = tuple(plan.assignment.items())
        fresh = key not in seen
        if fresh:
            if evals >= limit:
                break
            seen[key] = float(measure(plan))
            evals += 1
        drop = seen[key]
        ok = drop <= budget_metric
        steps.append(TuneStep(b, plan.predicted_error, drop if fresh else None, plan.cost, ok))
        if ok:
            good_b = max(good_b, b)
            if plan.cost < best.cost:
                best, best_drop = plan, drop
        else:
            bad_b = min(bad_b, b)
        if good_b >= ceiling or (bad_b - good_b) <= BRACKET_TOL * bad_b:
            break
        if not ok and plan.predicted_error == 0:
            break  # formats the profile calls harmless hurt: no error budget can repair that
        if plan.predicted_error > 0 and drop > 0:
            nxt = TARGET_FILL * budget_metric * plan.predicted_error / drop
        else:
            nxt = ceiling if drop <= 0 else b / 2
        if ok and abs(nxt - b) <= BRACKET_TOL * b and not math.isfinite(bad_b):
            break  # aimed at the target and hit it: more budget would only overshoot
        b = nxt
    return replace(best, budget=Budget(budget_metric, "metric_drop"), strategy=strat.name, steps=tuple(steps),
                   measured={**best.measured, "drop": best_drop, "evaluations": evals,
                             "error_budget": best.budget.value})


# --- Pareto sweep ----------------------------------------------------------------------------
@dataclass(frozen=True)
class ParetoPoint:
    """One point of the error/cost trade-off curve."""

    budget: float
    predicted_error: float
    cost: float
    speedup: float
    memory_bytes: float


def pareto_sweep(problem: SearchProblem, strategy: str | Strategy, budgets: Iterable[float]) -> list[ParetoPoint]:
    """Solve at each budget (ascending). Cost never rises as the budget grows: a plan found at a
    smaller budget also fits a larger one, so a heuristic's worse answer is replaced by it."""
    strat = get_strategy(strategy)
    out: list[ParetoPoint] = []
    prev: PrecisionPlan | None = None
    for b in sorted(float(x) for x in budgets):
        plan = strat.solve(problem, b)
        if prev is not None and plan.cost > prev.cost:
            plan = prev
        prev = plan
        out.append(ParetoPoint(b, plan.predicted_error, plan.cost, plan.speedup, plan.memory_bytes))
    return out
