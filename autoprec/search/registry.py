"""Strategies by name: the built-in ones, users' own (``register_strategy``) and ``solve``."""

from __future__ import annotations

from autoprec.core.errors import UsageError
from autoprec.core.plan import PrecisionPlan
from autoprec.search.heuristics import BisectionStrategy, GreedyStrategy, UniformStrategy
from autoprec.search.milp import MilpStrategy
from autoprec.search.problem import SearchProblem, Strategy


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
