"""Heuristic strategies: greedy, bisection (onnxconverter-common's recipe) and uniform plans."""

from __future__ import annotations

import math

from autoprec.core.formats import Precision, parse_precision
from autoprec.core.plan import Alternative, PrecisionPlan
from autoprec.search.problem import FP32, CompiledProblem, SearchProblem, checked_budget


class GreedyStrategy:
    """Start from the widest allowed format everywhere and repeatedly take the single-unit move
    with the best cost saving per unit of added error, until no saving fits the budget.

    Fast and transparent, but blind to moves that only pay off together (a chain of layers whose
    casts cancel out once all of them are lowered): the MILP finds those.
    """

    name = "greedy"

    def solve(self, problem: SearchProblem, budget: float | None = None) -> PrecisionPlan:
        b = checked_budget(problem, budget)
        c = problem.compiled
        return problem.make_plan(c.to_layers(self.assign(c, b)), b, self.name)

    def assign(self, c: CompiledProblem, budget: float) -> list[Precision]:
        fmt = list(c.widest)
        err = c.total_error(fmt)
        tiny = 1e-12 * c.base_cost
        history: list[tuple[int, Precision]] = []
        while True:
            savings: dict[tuple[int, Precision], float] = {}  # a move can reach far: recomputed per round
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
        b = checked_budget(problem, budget)
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
        b = checked_budget(problem, budget)
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
