"""The Pareto sweep: the cheapest plan at each of several error budgets, a cost-monotone front."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from autoprec.core.plan import PrecisionPlan
from autoprec.search.problem import SearchProblem, Strategy
from autoprec.search.registry import get_strategy


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
