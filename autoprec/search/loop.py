"""Verify and repair: re-solve at a tighter error budget until the measured metric drop fits."""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Callable

from autoprec.core.errors import UsageError
from autoprec.core.plan import Budget, PrecisionPlan, TuneStep
from autoprec.search.problem import SearchProblem, Strategy, checked_budget
from autoprec.search.registry import get_strategy


#: The tune loop aims a re-solve at this fraction of the metric budget, leaving room for noise.
TARGET_FILL = 0.9
#: Stop refining once the known-good and known-bad error budgets are this close (relative).
BRACKET_TOL = 0.02
#: Stop once no plan between the known-good and known-bad budgets can be this much cheaper (relative).
GAIN_TOL = 0.01


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
      over budget known-bad; a step that leaves the bracket bisects it instead (geometrically
      once its lower end is above 0: error budgets span orders of magnitude). Error budget 0
      (all fp32, or the forced pins' formats: drop 0 by definition, never measured) is the
      first known-good point, so there is always a verified plan to fall back on.
    - Budgets above the strategy's unconstrained optimum change nothing and are clipped; a plan
      seen before is not measured again.
    - A cheaper plan needs more error budget, so no budget below the known-bad one finds a plan
      cheaper than the known-bad plan (exact for the MILP, whose optimal cost falls with the
      budget): once that plan is within GAIN_TOL of the best measured one, the loop stops.

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
    bad_cost = 0.0  # the cost of the plan at bad_b: no plan below bad_b is cheaper
    seen: dict[tuple, float] = {widest: 0.0}
    steps: list[TuneStep] = []
    evals = 0
    b = checked_budget(problem, error_budget) or ceiling
    for it in range(4 * limit + 8):
        b = min(b, ceiling)
        if it and not good_b < b < bad_b:
            if not math.isfinite(bad_b):
                break
            # error budgets span orders of magnitude: halve the bracket's ratio once it has one
            b = math.sqrt(good_b * bad_b) if good_b > 0 else bad_b / 2
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
        elif b < bad_b:
            bad_b, bad_cost = b, plan.cost
        if good_b >= ceiling or (bad_b - good_b) <= BRACKET_TOL * bad_b:
            break
        if best.cost - bad_cost <= GAIN_TOL * best.cost:
            break  # what the open bracket could still gain is below GAIN_TOL
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
