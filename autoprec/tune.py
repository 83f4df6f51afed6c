"""The tune driver: one search, verification and comparison run over any model a :class:`Tunable` describes.

A torch model file and an .onnx input differ in how a plan is applied and measured, not in how a plan
is found: :func:`run_tune` searches, measures every plan it accepts, compares the result with the
uniform plans, times it where the provider runs and sweeps the Pareto front, seeing the model only
through the :class:`Tunable` protocol (``autoprec.api.TorchTunable``, ``autoprec.api.OnnxTunable``).
The driver imports no torch: what it knows of a model is that protocol.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterable, Mapping, Protocol

import onnx

from autoprec.core.coverage import coverage
from autoprec.core.formats import Precision
from autoprec.core.metrics import DropBudget, Metric
from autoprec.core.opgraph import OpGraph
from autoprec.core.plan import PrecisionPlan, parse_pins
from autoprec.core.resources import release_memory
from autoprec.core.sensitivity import SensitivityProfile
from autoprec.cost.model import CostModel
from autoprec.cost.provider import ProviderCostModel
from autoprec.cost.roofline import RooflineCostModel
from autoprec.ort.providers import exclusions
from autoprec.report import LatencyCheck, TuneSummary, UniformResult
from autoprec.search.loop import tune_loop
from autoprec.search.pareto import ParetoPoint, pareto_sweep
from autoprec.search.problem import SearchProblem, Strategy
from autoprec.search.registry import get_strategy

#: how much faster (as a fraction) a measured candidate must run than the searched plan to replace
#: it: below that, two timings of one graph can differ by as much (interleaved medians on an H100)
SPEED_MARGIN = 0.03

log = logging.getLogger(__name__)

Assignment = Mapping[str, Precision]


class Tunable(Protocol):
    """What the tune driver needs from a model, whatever it came as: its op graph and profile, its
    metric and fp32 reference, a way to measure a plan's metric, and the ONNX graphs of a plan.

    Optional capabilities are methods that return None where the model lacks them, so the driver
    asks rather than the caller wiring callables in."""

    @property
    def name(self) -> str:
        """The model's name (the report's and the plan's)."""

    @property
    def graph(self) -> OpGraph:
        """The op graph the plan's layers come from (at the profiled batch)."""

    @property
    def op_types(self) -> Mapping[str, str] | None:
        """ONNX op type per node where the graph was read from ONNX (the provider's kernel
        exclusions are looked up by them); None where the kinds say it (the torch capture)."""

    @property
    def profile(self) -> SensitivityProfile:
        """Every layer's error in every candidate format: what the search prices errors with."""

    @property
    def metric(self) -> Metric:
        """What a plan's drop is measured in."""

    @property
    def reference(self) -> float:
        """The fp32 model's metric: the drop of every plan is taken from it."""

    @property
    def eval_seconds(self) -> float:
        """Seconds one evaluation of the fp32 model took: the unit the summary reports tune time in."""

    @property
    def export_seconds(self) -> float:
        """Of the tune's time, the seconds an fp32 ONNX export took (0 where the model is ONNX):
        reported apart, since writing the tuned files needs it anyway."""

    def measure(self, assignment: Assignment) -> float:
        """The metric of the model with ``assignment`` applied, on the model's own emulation of the
        plan (the torch passes for a torch model, the emulation graph on ONNX Runtime for .onnx)."""

    def measure_on_onnx(self, assignment: Assignment) -> float | None:
        """The metric of ONNX Runtime's run of the plan's emulation graph where that differs from
        :meth:`measure` and is asked for (a torch model's exported numerics), else None."""

    def timing_feeds(self, batch: int) -> tuple[dict[str, Any], int] | None:
        """The inputs a deployment graph (:meth:`onnx_model` in ``deploy`` mode) is timed on at
        ``batch`` samples, with how many samples they hold (a model may fix its batch); None where
        the deployment graphs are not to be timed."""

    def onnx_model(self, assignment: Assignment, mode: str = "deploy", provider: str | None = None) -> onnx.ModelProto:
        """The plan as an ONNX graph: ``deploy`` for ``provider``'s kernels (what is written and
        timed), ``emulate`` for ORT's CPU provider (every rounding explicit)."""


@dataclass(frozen=True)
class TuneOutcome:
    """What one run of the driver found: the verified plan, its summary, the uniform plans it was
    compared with and the Pareto front."""

    plan: PrecisionPlan
    summary: TuneSummary
    uniforms: list[UniformResult]
    pareto: list[ParetoPoint]


def run_tune(model: Tunable, budget: DropBudget, formats: tuple[Precision, ...], *, target: str, objective: str,
             strategy: str | Strategy, keep: Iterable[str], force: Iterable[str], cost_model: CostModel | None,
             batch: int, provider: str | None, started: float) -> TuneOutcome:
    """Search, verify by real evaluation, compare with uniform plans, time where the provider runs
    and sweep the Pareto front. ``started``: when the tune began (``time.perf_counter``), so its
    seconds include loading, capture and profiling."""
    metric, reference, prof = model.metric, model.reference, model.profile
    allowed = budget.allowed_drop(reference)
    cost = cost_model or RooflineCostModel(target, objective)
    if provider:  # priced as that provider runs the deployed graph (fp8 is fp32 compute off TensorRT)
        cost = ProviderCostModel(cost, provider)
    pins = parse_pins(keep, "keep") + parse_pins(force, "force")
    deploy_graph = model.graph.at_batch(batch) if model.graph.batch else model.graph
    excluded = exclusions(deploy_graph, provider, formats, model.op_types) if provider else None
    problem = SearchProblem.build(deploy_graph, prof, cost, formats=formats, pins=pins, excluded=excluded)
    measured: dict[tuple, float] = {}  # the plan's metric (model.measure)
    on_onnx: dict[tuple, float] = {}  # and ONNX Runtime's, for the plans the search settled on

    def evaluate(assignment: Assignment) -> float:
        """The plan's measured drop on the model's own emulation (what the search decides on)."""
        key = _key(assignment)
        if key not in measured:
            measured[key] = model.measure(assignment)
            release_memory()  # the trial's emulated module, before the next one is built
        return metric.drop(reference, measured[key])

    def onnx_drop(assignment: Assignment) -> float | None:
        """ONNX Runtime's drop for a plan that rounds somewhere, where the model measures it there
        (a torch model's exported numerics); None otherwise (all-fp32 is the export itself)."""
        key = _key(assignment)
        if key not in on_onnx:
            if all(f == Precision.FP32 for f in assignment.values()):
                return None
            value = model.measure_on_onnx(assignment)
            release_memory()
            if value is None:
                return None
            on_onnx[key] = value
        return metric.drop(reference, on_onnx[key])

    def strict(assignment: Assignment) -> float:
        """The worse of the two drops, ONNX Runtime's asked only where the first is within budget."""
        d = evaluate(assignment)
        if d <= allowed and (o := onnx_drop(assignment)) is not None:
            d = max(d, o)
        return d

    def disagreement(plan: PrecisionPlan) -> str | None:
        """Why ONNX Runtime's run of ``plan`` fails the budget its torch emulation holds; None if it
        holds (or the model has no separate ONNX run)."""
        d = onnx_drop(plan.assignment)
        if d is None or d <= allowed:
            return None
        formats = ", ".join(f"{f} x{n}" for f, n in plan.format_counts().items())
        return (f"ONNX Runtime's run of the {formats} plan lost {d:.4g}, over the allowed "
                f"{allowed:.4g}, where its torch emulation lost {evaluate(plan.assignment):.4g}")

    # The search decides on the model's own emulation, and only the plan it settles on is also run on
    # ONNX Runtime: the two agree to rounding in all but rare cases (the oracle tests hold them
    # equal). Where they disagree, the search runs again with every plan judged by the worse of the two.
    #
    # A built-in strategy's plan gives way to a faster measured simple plan; a user's strategy is
    # only compared with them (its choices may encode constraints we cannot see)
    adopt = isinstance(strategy, str)
    plan = tune_loop(problem, strategy, lambda p: evaluate(p.assignment), allowed)
    search_evals = len(measured)
    plan, uniforms = _against_simple(problem, plan, evaluate, allowed, adopt=adopt)
    if (why := disagreement(plan)) is not None:
        log.warning("%s: searching again with every plan also run on ONNX Runtime", why)
        before = len(measured)
        plan = tune_loop(problem, strategy, lambda p: strict(p.assignment), allowed)
        search_evals += len(measured) - before
        plan, uniforms = _against_simple(problem, plan, strict, allowed, adopt=adopt)
        plan = replace(plan, notes=plan.notes + (f"{why}: the search ran again judging every plan by the "
                                                 "worse of the two",))
    timed = None
    if provider and objective == "latency":
        searched = plan
        plan, timed = _against_latency(problem, plan, uniforms, model, provider, batch, adopt=adopt)
        if (why := disagreement(plan)) is not None:
            plan = replace(searched, notes=searched.notes + (f"{why}: the searched plan was kept",))
    uniforms = [_with_onnx_drop(u, on_onnx, problem, metric, reference, allowed) for u in uniforms]
    key = _key(plan.assignment)
    evaluate(plan.assignment)  # measured already unless it is the widest plan
    tuned_value, onnx_value = measured[key], on_onnx.get(key)
    drop = max(metric.drop(reference, v) for v in (tuned_value, onnx_value) if v is not None)
    plan = plan.with_measured(metric=metric.name, metric_fp32=reference, metric_tuned=tuned_value,
                              drop=drop, allowed_drop=allowed, budget=str(budget), evaluations=search_evals,
                              baseline_evaluations=len(measured) - search_evals)
    if onnx_value is not None:
        plan = plan.with_measured(metric_onnx=onnx_value, onnx_checks=len(on_onnx))
    if timed is not None:
        plan = plan.with_measured(latency_provider=timed.provider, latency_batch=timed.batch,
                                  latency_ms=dict(timed.ms), latency_chosen=timed.chosen)
    pareto = pareto_sweep(problem, strategy, _sweep_budgets(prof))
    seconds = time.perf_counter() - started
    best_u = max((u for u in uniforms if u.within_budget), key=lambda u: u.speedup, default=None)
    summary = TuneSummary(model.name, metric.name, metric.higher_is_better, reference, tuned_value, str(budget),
                          allowed, plan.speedup, _ratio(plan.memory_bytes, plan.fp32_memory_bytes), best_u,
                          len(measured) + 1, seconds, seconds / model.eval_seconds if model.eval_seconds > 0 else 0.0,
                          timed, onnx_value, len(on_onnx), model.export_seconds, coverage(model.graph),
                          (metric.warning,) if metric.warning else ())
    return TuneOutcome(plan, summary, uniforms, pareto)


def _against_simple(problem: SearchProblem, plan: PrecisionPlan, drop_of: Callable[[Assignment], float],
                    allowed: float, adopt: bool) -> tuple[PrecisionPlan, list[UniformResult]]:
    """The simple plans a user could write without a search: uniform plans (every layer in one
    format where it is allowed) and torch.amp's op lists in each 16-bit format (products 16-bit,
    embedding lookups fp32), each distinct assignment once, fastest first, measured until one meets
    the budget (the rest are reported as not measured). If that one is faster than the searched plan
    (and ``adopt``), it becomes the plan: the additive error model can be pessimistic, and a measured
    faster plan wins. (They honour exclusions, pins and ties: SearchProblem.uniform_assignment.)"""
    uniform = get_strategy("uniform")
    cands = sorted({f for fs in problem.candidates.values() for f in fs}, key=lambda f: f.rank)
    labels = [(f, "") for f in cands] + [(f, f"{AMP} {f}") for f in cands if f.bits == 16]
    simple = [(f, label, _simple_assignment(problem, f, label)) for f, label in labels]
    seen: set[tuple] = set()
    plans = []
    for f, label, assignment in simple:
        if _key(assignment) not in seen:
            seen.add(_key(assignment))
            plans.append((f, label, problem.make_plan(assignment, math.inf, uniform.name)))
    results: list[UniformResult] = []
    found = False
    for f, label, up in sorted(plans, key=lambda x: -x[2].speedup):
        drop = None
        if not found:
            drop = drop_of(up.assignment)
            found = drop <= allowed
        results.append(UniformResult(f, up.speedup, _ratio(up.memory_bytes, up.fp32_memory_bytes),
                                     up.predicted_error, drop, drop is not None and drop <= allowed, label))
        if adopt and drop is not None and drop <= allowed and up.speedup > plan.speedup:
            how = "amp" if label else "uniform"
            plan = replace(problem.make_plan(up.assignment, math.inf, f"{plan.strategy}+{how}"),
                           budget=plan.budget, steps=plan.steps, measured=plan.measured)
    return plan, results


#: the label of torch.amp's op lists among the simple plans
AMP = "torch.amp"


def _simple_assignment(problem: SearchProblem, f: Precision, label: str) -> Assignment:
    """The simple plan named by ``label`` in format ``f``: torch.amp's lists, or the uniform plan ("")."""
    return problem.amp_assignment(f) if label.startswith(AMP) else problem.uniform_assignment(f)


def _against_latency(problem: SearchProblem, plan: PrecisionPlan, uniforms: list[UniformResult], model: Tunable,
                     provider: str, batch: int, adopt: bool) -> tuple[PrecisionPlan, LatencyCheck | None]:
    """Where ``provider`` is cuda and really runs here, time the deployment graphs of the searched
    plan, the fastest uniform plan within budget and all-fp32 (GPU-resident inputs, interleaved
    rounds: :func:`autoprec.ort.runtime.latencies_ms`), and adopt the fastest when it beats the searched
    plan by more than :data:`SPEED_MARGIN` (and ``adopt``). All three are within budget.

    The cost model prices kernels from peak rates; on small tensors a GPU runs 16-bit kernels no
    faster than fp32 ones while each cast still costs a launch, so a plan it predicts faster can be
    slower (measured: a 16-layer ResNet on 16x16 images, 0.71x of fp32 on an H100). TensorRT is not
    timed: building its engines takes minutes per graph. Without the provider, or where the model's
    deployment graphs are not to be timed, nothing is timed."""
    from autoprec.ort.providers import CUDA, parse_provider
    from autoprec.ort.runtime import cuda_available, latencies_ms

    if parse_provider(provider) != CUDA or not cuda_available():
        return plan, None
    inputs = model.timing_feeds(batch)
    if inputs is None:
        return plan, None
    feeds, samples = inputs
    candidates = {"tuned": dict(plan.assignment)}
    best = max((u for u in uniforms if u.within_budget), key=lambda u: u.speedup, default=None)
    if best is not None:
        candidates[best.name] = _simple_assignment(problem, best.format, best.label)
    candidates["all-fp32"] = problem.uniform_assignment(Precision.FP32)
    unique: dict[str, dict[str, Precision]] = {}
    for name, assignment in candidates.items():
        if assignment not in unique.values():
            unique[name] = assignment
    log.info("timing %d deployment graphs on cuda at batch %d", len(unique), samples)
    try:
        graphs = [model.onnx_model(a, "deploy", provider).SerializeToString() for a in unique.values()]
        ms = latencies_ms(graphs, [feeds] * len(unique), "cuda", resident=True, warmup=5, runs=30, rounds=3)
    except Exception as exc:  # ORT's own exception types (an out-of-memory batch, a kernel it lacks)
        log.warning("could not time the plans on cuda (%s); the plan stays the cost model's choice", exc)
        return plan, None
    times = {name: t for name, t in zip(unique, ms) if t is not None}
    if "tuned" not in times:
        return plan, None
    fastest = min(times, key=lambda n: times[n])
    chosen = "tuned"
    if adopt and fastest != "tuned" and times[fastest] < times["tuned"] * (1 - SPEED_MARGIN):
        chosen = fastest
        why = (f"timed on cuda at batch {samples}: {fastest} ran in {times[fastest]:.3g} ms, the searched plan in "
               f"{times['tuned']:.3g} ms")
        new = problem.make_plan(unique[fastest], math.inf, f"{plan.strategy}+timed", notes=(why,))
        decisions = tuple(replace(d, reason=f"{why}; {d.reason}") for d in new.decisions)
        plan = replace(new, decisions=decisions, budget=plan.budget, steps=plan.steps, measured=plan.measured)
    return plan, LatencyCheck("cuda", samples, tuple(times.items()), chosen)


def _with_onnx_drop(u: UniformResult, on_onnx: Mapping[tuple, float], problem: SearchProblem, metric: Metric,
                    reference: float, allowed: float) -> UniformResult:
    """A simple plan's result with ONNX Runtime's drop where it was run there too (the worse counts)."""
    key = _key(_simple_assignment(problem, u.format, u.label))
    if u.measured_drop is None or key not in on_onnx:
        return u
    drop = max(u.measured_drop, metric.drop(reference, on_onnx[key]))
    return replace(u, measured_drop=drop, within_budget=drop <= allowed)


def _sweep_budgets(prof: SensitivityProfile, n: int = 10) -> list[float]:
    """Error budgets for the Pareto plot: 0, then n log-spaced points up to every error at once."""
    errs = sorted(v for e in prof.errors.values() for v in e.values() if math.isfinite(v) and v > 0)
    if not errs:
        return [0.0]
    lo, hi = errs[0], sum(errs)
    return [0.0] + [lo * (hi / lo) ** (i / (n - 1)) for i in range(n)]


def _key(assignment: Assignment) -> tuple[tuple[str, str], ...]:
    """An assignment as a hashable key, whatever order its layers come in."""
    return tuple(sorted((k, v.value) for k, v in assignment.items()))


def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 else 1.0
