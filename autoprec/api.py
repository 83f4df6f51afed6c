"""The library API: each stage of the pipeline as a plain function over plain data.

    spec = load_model_spec("models/digits_cnn.py")
    captured = capture(spec.model(), spec.example_inputs(), name=spec.name)
    prof = profile(captured, spec.calibration_data(), mode="fast")
    problem = SearchProblem.build(captured.graph, prof, RooflineCostModel("h100"))
    plan = solve(problem, "milp", budget=1e-3)
    tuned = apply_plan(captured, plan.assignment, act_amax_from_profile(prof))

:func:`tune` chains them with a real evaluation of every plan it accepts.
"""

from __future__ import annotations

import functools
import logging
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from autoprec.torch.capture import Captured, capture
from autoprec.cost.model import CostModel
from autoprec.cost.provider import ProviderCostModel
from autoprec.cost.roofline import RooflineCostModel
from autoprec.deploy.providers import exclusions
from autoprec.core.errors import AutoprecError, UsageError, first_line
from autoprec.core.formats import DEFAULT_CANDIDATES, Precision, parse_precisions
from autoprec.core.metrics import DropBudget
from autoprec.metrics import Metric, fidelity_metric
from autoprec.onnx.model import OnnxModel, profile_onnx
from autoprec.core.opgraph import OpGraph
from autoprec.core.plan import PrecisionPlan, parse_pins
from autoprec.torch.profile import Progress, output_kind_of, first_tensor, profile
from autoprec.report import LatencyCheck, TuneSummary, UniformResult
from autoprec.search.loop import tune_loop
from autoprec.search.pareto import ParetoPoint, pareto_sweep
from autoprec.search.problem import SearchProblem, Strategy
from autoprec.search.registry import get_strategy, solve
from autoprec.torch.semantics import needs_act_amax
from autoprec.core.sensitivity import SensitivityProfile
from autoprec.torch.spec import ModelSpec, load_model_spec
from autoprec.torch.passes import act_amax_from_profile, apply_plan

#: Samples per inference call the cost model prices by default: throughput serving. At small
#: batches the zoo's models are launch-bound on an H100 and no format beats fp32's zero casts.
DEPLOY_BATCH = 1024

#: how much faster (as a fraction) a measured candidate must run than the searched plan to replace
#: it: below that, two timings of one graph can differ by as much (interleaved medians on an H100)
SPEED_MARGIN = 0.03

log = logging.getLogger(__name__)

__all__ = ["capture", "profile", "load_model_spec", "profile_model", "SearchProblem", "solve", "apply_plan",
           "act_amax_from_profile", "apply_plan_file", "tune", "tune_onnx", "TuneResult", "RooflineCostModel",
           "Metric", "OnnxModel", "profile_onnx"]


def profile_model(model: str | Path | ModelSpec, mode: str = "exact",
                  formats: Iterable[Precision] = DEFAULT_CANDIDATES, capture_method: str = "auto",
                  progress: Progress | None = None) -> tuple[SensitivityProfile, Captured]:
    """Load a model file, capture it and profile every layer: what ``autoprec profile`` does."""
    spec = model if isinstance(model, ModelSpec) else load_model_spec(model)
    captured = capture(spec.model(), spec.example_inputs(), name=spec.name, method=capture_method)
    prof = profile(captured, spec.calibration_data(), formats=formats, mode=mode,
                   output_kind=spec.output_kind, progress=progress)
    return prof, captured


@dataclass
class TuneResult:
    """Everything `tune` found: the verified plan, the data behind it and the tuned model."""

    plan: PrecisionPlan
    profile: SensitivityProfile
    graph: OpGraph
    metric: Metric
    summary: TuneSummary
    uniforms: list[UniformResult]
    pareto: list[ParetoPoint]
    captured: Captured | None = None  # torch models: the capture the plan applies to
    module: Any = None  # torch models: the emulated tuned module (inference: batch norms folded; runs on CPU)
    onnx: OnnxModel | None = None  # .onnx models: the analysed model and its data
    spec: ModelSpec | None = None  # torch models: the model file's contract (for the ONNX export)
    provider: str | None = None  # the ONNX Runtime provider the plan was tuned for (its deployment graph's)
    _fp32_onnx: Callable[[], Any] | None = field(default=None, repr=False, compare=False)  # torch models' export

    def onnx_model(self, mode: str = "deploy") -> Any:
        """The tuned ONNX model (deploy: 16-bit tensors and fp8 Q/DQ for CUDA / TensorRT; emulate:
        fp32 compute with every rounding explicit, for ORT's CPU provider). A torch model is
        exported once (torch.onnx) and both graphs come from that export. The deployment graph
        follows the kernels of the provider the plan was tuned for, when one was named."""
        from autoprec.deploy.export import apply_plan_onnx

        amax = act_amax_from_profile(self.profile)
        if self.onnx is not None:
            return self.onnx.build(self.plan.assignment, amax, mode, self.provider)
        if self.spec is None or self.captured is None:
            raise UsageError("this tune result holds no model to export: export it with autoprec.deploy.export.export_onnx")
        if self._fp32_onnx is None:
            self._fp32_onnx = _Fp32Export(self.spec)
        return apply_plan_onnx(self._fp32_onnx(), self.captured, self.plan.assignment, amax, mode,
                               provider=self.provider)


def model_metric(spec: ModelSpec, captured: Captured, batches: list[tuple[Any, ...]]) -> Metric:
    """The model's own metric when it has evaluate(), else fidelity to its fp32 outputs."""
    if spec.evaluate is not None:
        return Metric(spec.metric or "metric", spec.higher_is_better, spec.evaluate)
    y = first_tensor(captured.gm(*batches[0]))
    return fidelity_metric(captured.gm, batches, output_kind_of(y, spec.output_kind))


@dataclass
class _Run:
    """What the search half of a tune run needs, whatever the model came as."""

    name: str
    graph: OpGraph
    profile: SensitivityProfile
    metric: Metric
    reference: float  # the fp32 model's metric
    eval_seconds: float  # one evaluation of the fp32 model
    budget: DropBudget
    build: Callable[[dict[str, Precision]], Any]  # assignment -> what metric.measure takes
    op_types: dict[str, str] | None = None  # ONNX op type per node, where known
    deploy: Callable[[dict[str, Precision]], bytes] | None = None  # assignment -> serialized deployment graph
    feeds: Callable[[int], tuple[dict[str, Any], int]] | None = None  # batch -> (graph inputs, samples in them)
    # torch models: assignment -> ONNX Runtime's run of the plan's emulation graph, as metric.measure takes it
    on_onnx: Callable[[dict[str, Precision]], Any] | None = None
    fp32_export: _Fp32Export | None = None  # torch models: their fp32 ONNX export, when tune makes it


def tune(model: str | Path | ModelSpec, budget: str | float | None = None, *, fidelity_budget: str | float | None = None,
         target: str = "h100", objective: str = "latency", formats: Iterable[str | Precision] | None = None,
         strategy: str | Strategy = "milp", keep: Iterable[str] = (), force: Iterable[str] = (),
         profile_mode: str = "fast", cost_model: CostModel | None = None, metric: Metric | None = None,
         batch: int = DEPLOY_BATCH, provider: str | None = None, progress: Progress | None = None,
         timing: bool = True, onnx_check: bool = True) -> TuneResult:
    """Find the fastest per-layer plan whose *measured* metric drop stays within the budget.

    ``budget`` (models with evaluate()) or ``fidelity_budget`` (models without): "0.5%" relative
    to the fp32 metric, or an absolute drop such as 0.005. ``metric`` overrides the model's.
    ``batch``: the deployment batch the cost model prices (samples per inference call).
    ``provider``: an ONNX Runtime execution provider (cpu, cuda, tensorrt) the plan will run on:
    formats it has no faithful kernel for are never offered (each exclusion is a reason), and each
    layer is priced in the format it computes in there (:class:`~autoprec.cost.ProviderCostModel`:
    fp8 is an fp32 op between Q/DQ except on TensorRT).
    ``timing``: where ``provider`` is cuda and really runs here (a GPU), time the deployment graphs
    of the searched plan, of the fastest uniform plan within budget and of all-fp32, and adopt the
    fastest (:func:`_against_latency`): the cost model's choice checked by a measurement, as the
    budget is by an evaluation. A plan tuned on a GPU may therefore depend on those timings.
    ``onnx_check``: a plan is accepted only when ONNX Runtime's run of its emulation graph (the
    exported model's numerics, on the CPU) is within the budget too, not the torch emulation alone.
    Both compute the plan's roundings, in other summation orders, and where a sample's fp32 top-1 is
    a near tie the two can decide it differently; the budget holds for the model that is deployed.
    Off, the model is never exported to ONNX during the search.
    """
    _check_batch(batch)
    t0 = time.perf_counter()
    spec = model if isinstance(model, ModelSpec) else load_model_spec(model)
    drop_budget = _choose_budget(spec.name, spec.evaluate is not None or metric is not None,
                                 spec.metric or "metric", budget, fidelity_budget)
    fmts = parse_precisions(formats) if formats is not None else DEFAULT_CANDIDATES
    captured = capture(spec.model(), spec.example_inputs(), name=spec.name)
    _need_layers(captured.graph)
    batches = spec.calibration_data()
    metric = metric or model_metric(spec, captured, batches)
    reference, t_eval = _evaluate_fp32(metric, captured.gm)
    prof = profile(captured, batches, formats=fmts, mode=profile_mode, output_kind=spec.output_kind,
                   progress=progress, time_reference=False)
    amax = act_amax_from_profile(prof)
    fp32_onnx = _Fp32Export(spec)  # exported once, when first needed: the ONNX check, the timing, the file
    run = _Run(spec.name, captured.graph, prof, metric, reference, t_eval, drop_budget,
               lambda a: apply_plan(captured, a, amax), fp32_export=fp32_onnx)
    if timing:
        run.deploy, run.feeds = _torch_deployment(spec, captured, amax, provider, fp32_onnx)
    if onnx_check:
        run.on_onnx = _onnx_emulation(captured, amax, fp32_onnx)
    plan, summary, uniforms, pareto = _search_verified(run, fmts, target, objective, strategy, keep, force,
                                                       cost_model, batch, provider, t0)
    module = apply_plan(captured, plan.assignment, amax)
    return TuneResult(plan, prof, captured.graph, metric, summary, uniforms, pareto, captured=captured,
                      module=module, spec=spec, provider=provider, _fp32_onnx=fp32_onnx)


def tune_onnx(model: str | Path, data: str | Path | Mapping[str, Any], labels: str | Path | Any = None,
              budget: str | float | None = None, *, fidelity_budget: str | float | None = None,
              target: str = "h100", objective: str = "latency", formats: Iterable[str | Precision] | None = None,
              strategy: str | Strategy = "milp", keep: Iterable[str] = (), force: Iterable[str] = (),
              cost_model: CostModel | None = None, metric: Metric | None = None, batch: int = DEPLOY_BATCH,
              provider: str | None = None, progress: Progress | None = None, timing: bool = True) -> TuneResult:
    """:func:`tune` for a model given as an .onnx file, measured on ONNX Runtime.

    ``data``: an .npz with the model's inputs (see :mod:`autoprec.onnx.model`); ``labels``: an
    .npy, or the name of an array in ``data``. With labels the budget is a drop of accuracy
    (integer labels) or of mean squared error (float labels); without them, a ``fidelity_budget``
    on agreement with the fp32 model. ``metric.measure`` takes an ONNX ModelProto.
    Profiling is exact (ONNX Runtime has no backward pass for the fast estimate). ``timing``: as
    :func:`tune`'s.
    """
    _check_batch(batch)
    t0 = time.perf_counter()
    om = OnnxModel.load(model, data, labels)
    _need_layers(om.analysis.graph, om.analysis.reasons)
    name = om.analysis.graph.model_name
    own_metric = om.labels is not None or metric is not None
    metric = metric or om.metric()
    drop_budget = _choose_budget(name, own_metric, metric.name, budget, fidelity_budget, how="--labels")
    fmts = parse_precisions(formats) if formats is not None else DEFAULT_CANDIDATES
    reference, t_eval = _evaluate_fp32(metric, om.analysis.model)
    prof = profile_onnx(om, fmts, progress)
    amax = act_amax_from_profile(prof)
    run = _Run(name, om.analysis.graph, prof, metric, reference, t_eval, drop_budget,
               lambda a: om.build(a, amax), om.analysis.op_types)
    if timing:
        run.deploy = lambda a: om.build(a, amax, "deploy", provider).SerializeToString()
        run.feeds = functools.partial(_onnx_feeds, om)
    plan, summary, uniforms, pareto = _search_verified(run, fmts, target, objective, strategy, keep, force,
                                                       cost_model, batch, provider, t0)
    return TuneResult(plan, prof, om.analysis.graph, metric, summary, uniforms, pareto, onnx=om, provider=provider)


def _need_layers(graph: OpGraph, fixed: Mapping[str, str] | None = None) -> None:
    """A one-line error for a model with no layer whose format a plan could choose (a scikit-learn
    linear model converted to ai.onnx.ml's LinearClassifier, say): the search, the report and the
    plots have nothing to work on."""
    if graph.layers():
        return
    first = next(iter(sorted((fixed or {}).items())), None)
    why = f"; {len(fixed or {})} op(s) stay fp32, e.g. {first[0]}: {first[1]}" if first else ""
    raise UsageError(f"{graph.model_name} has no layer whose format can be chosen (linear, convolution, matmul "
                     f"with a constant weight, or an embedding table): nothing to tune{why}")


def _check_batch(batch: int) -> None:
    if batch <= 0:
        raise UsageError(f"--batch must be a positive number of samples, not {batch}")


def _search_verified(run: _Run, fmts: tuple[Precision, ...], target: str, objective: str, strategy: str | Strategy,
                     keep: Iterable[str], force: Iterable[str], cost_model: CostModel | None, batch: int,
                     provider: str | None, t0: float
                     ) -> tuple[PrecisionPlan, TuneSummary, list[UniformResult], list[ParetoPoint]]:
    """Search, verify by real evaluation, compare with uniform plans and sweep the Pareto front."""
    metric, reference, prof = run.metric, run.reference, run.profile
    allowed = run.budget.allowed_drop(reference)
    cost = cost_model or RooflineCostModel(target, objective)
    if provider:  # priced as that provider runs the deployed graph (fp8 is fp32 compute off TensorRT)
        cost = ProviderCostModel(cost, provider)
    pins = parse_pins(keep, "keep") + parse_pins(force, "force")
    deploy_graph = run.graph.at_batch(batch) if run.graph.batch else run.graph
    excluded = exclusions(deploy_graph, provider, fmts, run.op_types) if provider else None
    problem = SearchProblem.build(deploy_graph, prof, cost, formats=fmts, pins=pins, excluded=excluded)
    measured: dict[tuple, float] = {}  # the plan's metric (run.build)
    on_onnx: dict[tuple, float] = {}  # and ONNX Runtime's, for plans the first keeps within budget

    def evaluate(assignment: dict[str, Precision]) -> float:
        """The plan's measured drop: the worse of its run.build model's and, where that one is
        within budget, the plan rounds somewhere and the run checks ONNX, its emulation graph's on
        ONNX Runtime."""
        key = _key(assignment)
        if key not in measured:
            measured[key] = float(metric.measure(run.build(assignment)))
            rounds = any(f != Precision.FP32 for f in assignment.values())  # all-fp32: the export itself
            if run.on_onnx is not None and rounds and metric.drop(reference, measured[key]) <= allowed:
                on_onnx[key] = _measure_on_onnx(metric, run.on_onnx, assignment)
        drops = [metric.drop(reference, measured[key])]
        if key in on_onnx:
            drops.append(metric.drop(reference, on_onnx[key]))
        return max(drops)

    plan = tune_loop(problem, strategy, lambda p: evaluate(p.assignment), allowed)
    search_evals = len(measured)
    # a built-in strategy's plan gives way to a faster measured uniform plan; a user's strategy is
    # only compared against them (its choices may encode constraints we cannot see)
    plan, uniforms = _against_uniform(problem, plan, evaluate, allowed, adopt=isinstance(strategy, str))
    timed = None
    if provider and objective == "latency":
        plan, timed = _against_latency(problem, plan, uniforms, run, provider, batch, adopt=isinstance(strategy, str))
    drop, key = evaluate(plan.assignment), _key(plan.assignment)
    tuned_value, onnx_value = measured[key], on_onnx.get(key)
    plan = plan.with_measured(metric=metric.name, metric_fp32=reference, metric_tuned=tuned_value,
                              drop=drop, allowed_drop=allowed, budget=str(run.budget), evaluations=search_evals,
                              baseline_evaluations=len(measured) - search_evals)
    if onnx_value is not None:
        plan = plan.with_measured(metric_onnx=onnx_value, onnx_checks=len(on_onnx))
    if timed is not None:
        plan = plan.with_measured(latency_provider=timed.provider, latency_batch=timed.batch,
                                  latency_ms=dict(timed.ms), latency_chosen=timed.chosen)
    pareto = pareto_sweep(problem, strategy, _sweep_budgets(prof))
    seconds = time.perf_counter() - t0
    best_u = max((u for u in uniforms if u.within_budget), key=lambda u: u.speedup, default=None)
    summary = TuneSummary(run.name, metric.name, metric.higher_is_better, reference, tuned_value, str(run.budget),
                          allowed, plan.speedup, _ratio(plan.memory_bytes, plan.fp32_memory_bytes), best_u,
                          len(measured) + 1, seconds, seconds / run.eval_seconds if run.eval_seconds > 0 else 0.0,
                          timed, onnx_value, len(on_onnx), run.fp32_export.seconds if run.fp32_export else 0.0)
    return plan, summary, uniforms, pareto


def apply_plan_file(model: str | Path | ModelSpec, plan: PrecisionPlan | str | Path, profile_json: str | Path | None = None,
                    mode: str = "emulate") -> Any:
    """The model of ``model`` rewritten by a saved plan (emulate: CPU rounding; native: real 16-bit).

    The plan must have been made for this model: unknown or missing layers are a PlanError that
    names them. fp8 layers need the calibrated activation amax of the plan's profile.json (by
    default the one beside plan.json).
    """
    spec = model if isinstance(model, ModelSpec) else load_model_spec(model)
    plan_path = None if isinstance(plan, PrecisionPlan) else Path(plan)
    plan = plan if isinstance(plan, PrecisionPlan) else PrecisionPlan.load(plan)
    captured = capture(spec.model(), spec.example_inputs(), name=spec.name)
    plan.check_against(captured.graph)
    amax: dict[str, tuple[float, ...]] = {}
    if any(needs_act_amax(captured.graph[k].kind, f) for k, f in plan.assignment.items()):
        src = Path(profile_json) if profile_json else (plan_path.parent / "profile.json" if plan_path else None)
        if src is None or not src.is_file():
            raise UsageError(f"the plan has fp8 layers, whose scales come from calibration: give the profile.json "
                             f"written beside plan.json ({src or 'no path given'} not found)")
        amax = act_amax_from_profile(SensitivityProfile.from_json(src.read_text()))
    return apply_plan(captured, plan.assignment, amax, mode=mode)


def _choose_budget(name: str, has_metric: bool, metric_name: str, budget: str | float | None,
                   fidelity_budget: str | float | None, how: str = "evaluate()") -> DropBudget:
    """The budget the user gave, checked against the kind of metric the model has: its own
    (``has_metric``: evaluate(), labels or a metric passed in) or fidelity to its fp32 outputs."""
    if not has_metric:
        if budget is not None:
            raise UsageError(f"{name} has no {how}: it is tuned on fidelity to its fp32 outputs; "
                             "give --fidelity-budget (e.g. 1%) instead of --budget")
        return DropBudget.parse(fidelity_budget if fidelity_budget is not None else "1%")
    if fidelity_budget is not None:
        raise UsageError(f"{name} has {how}: give --budget (a drop of its {metric_name}), not --fidelity-budget")
    return DropBudget.parse(budget if budget is not None else "0.5%")


def _evaluate_fp32(metric: Metric, fp32_model: Any) -> tuple[float, float]:
    """The fp32 metric and the seconds one evaluation takes; stop early if it cannot be had."""
    t = time.perf_counter()
    try:
        value = float(metric.measure(fp32_model))
    except AutoprecError:
        raise
    except Exception as exc:
        raise UsageError(f"the fp32 model cannot be evaluated, so there is nothing to keep within a budget: "
                         f"{metric.name} raised {type(exc).__name__}: {first_line(exc, 160)}") from exc
    if not math.isfinite(value):
        raise UsageError(f"the fp32 model's {metric.name} is {value}: fix the model's metric before tuning")
    return value, time.perf_counter() - t


def _against_uniform(problem: SearchProblem, plan: PrecisionPlan, drop_of: Callable[[dict[str, Precision]], float],
                     allowed: float, adopt: bool) -> tuple[PrecisionPlan, list[UniformResult]]:
    """Uniform plans (every layer in one format where it is allowed), fastest first, measured until
    one meets the budget. If that one is faster than the searched plan (and ``adopt``), it becomes the plan: the
    additive error model can be pessimistic, and a measured faster plan wins. (Uniform plans honour
    exclusions, pins and ties, see SearchProblem.uniform_assignment.)"""
    uniform = get_strategy("uniform")
    results: list[UniformResult] = []
    found = False
    cands = sorted({f for fs in problem.candidates.values() for f in fs}, key=lambda f: f.rank)
    plans = [(f, problem.make_plan(problem.uniform_assignment(f), math.inf, uniform.name)) for f in cands]
    for f, up in sorted(plans, key=lambda x: -x[1].speedup):
        drop = None
        if not found:
            drop = drop_of(up.assignment)
            found = drop <= allowed
        results.append(UniformResult(f, up.speedup, _ratio(up.memory_bytes, up.fp32_memory_bytes),
                                     up.predicted_error, drop, drop is not None and drop <= allowed))
        if adopt and drop is not None and drop <= allowed and up.speedup > plan.speedup:
            plan = replace(problem.make_plan(up.assignment, math.inf, f"{plan.strategy}+uniform"),
                           budget=plan.budget, steps=plan.steps, measured=plan.measured)
    return plan, results


def _against_latency(problem: SearchProblem, plan: PrecisionPlan, uniforms: list[UniformResult], run: _Run,
                     provider: str, batch: int, adopt: bool) -> tuple[PrecisionPlan, LatencyCheck | None]:
    """Where ``provider`` is cuda and really runs here, time the deployment graphs of the searched
    plan, the fastest uniform plan within budget and all-fp32 (GPU-resident inputs, interleaved
    rounds: :func:`autoprec.deploy.runtime.latencies_ms`), and adopt the fastest when it beats the searched
    plan by more than :data:`SPEED_MARGIN` (and ``adopt``). All three are within budget.

    The cost model prices kernels from peak rates; on small tensors a GPU runs 16-bit kernels no
    faster than fp32 ones while each cast still costs a launch, so a plan it predicts faster can be
    slower (measured: a 16-layer ResNet on 16x16 images, 0.71x of fp32 on an H100). TensorRT is not
    timed: building its engines takes minutes per graph. Without the provider, nothing is timed."""
    from autoprec.deploy.providers import CUDA, parse_provider
    from autoprec.deploy.runtime import cuda_available, latencies_ms

    if run.deploy is None or run.feeds is None or parse_provider(provider) != CUDA or not cuda_available():
        return plan, None
    candidates = {"tuned": dict(plan.assignment)}
    best = max((u for u in uniforms if u.within_budget), key=lambda u: u.speedup, default=None)
    if best is not None:
        candidates[f"all-{best.format}"] = problem.uniform_assignment(best.format)
    candidates["all-fp32"] = problem.uniform_assignment(Precision.FP32)
    unique: dict[str, dict[str, Precision]] = {}
    for name, assignment in candidates.items():
        if assignment not in unique.values():
            unique[name] = assignment
    feeds, samples = run.feeds(batch)
    log.info("timing %d deployment graphs on cuda at batch %d", len(unique), samples)
    try:
        ms = latencies_ms([run.deploy(a) for a in unique.values()], [feeds] * len(unique), "cuda", resident=True,
                          warmup=5, runs=30, rounds=3)
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


class _Fp32Export:
    """The model's fp32 ONNX export (torch.onnx), made on the first call and kept, with the seconds
    it took: tune reports them apart, since writing the tuned model needs the export anyway."""

    def __init__(self, spec: ModelSpec) -> None:
        self._spec = spec
        self._model: Any = None
        self.seconds = 0.0

    def __call__(self) -> Any:
        if self._model is None:
            from autoprec.deploy.export import torch_to_onnx

            t = time.perf_counter()
            self._model = torch_to_onnx(self._spec.model(), self._spec.example_inputs())
            self.seconds = time.perf_counter() - t
        return self._model


def _measure_on_onnx(metric: Metric, on_onnx: Callable[[dict[str, Precision]], Any],
                     assignment: dict[str, Precision]) -> float:
    """``metric`` of ONNX Runtime's run of the plan; a failure says how to tune without it."""
    try:
        return float(metric.measure(on_onnx(assignment)))
    except AutoprecError:
        raise
    except Exception as exc:  # the model's own evaluate(), or ONNX Runtime
        raise UsageError(f"measuring {metric.name} on ONNX Runtime's run of a plan failed ({type(exc).__name__}: "
                         f"{first_line(exc, 160)}): evaluate() must only call the model it is given; or tune with "
                         "--no-onnx-check (onnx_check=False) to accept plans on the torch emulation alone") from exc


def _onnx_emulation(captured: Captured, amax: Mapping[str, tuple[float, ...]], fp32: Callable[[], Any]
                    ) -> Callable[[dict[str, Precision]], Any]:
    """assignment -> ONNX Runtime's CPU session of the plan's emulation graph (made from the fp32
    export ``fp32`` returns), as a torch-callable module: the deployed numerics, which the model's
    metric measures like the torch emulation."""
    from autoprec.deploy.export import apply_plan_onnx
    from autoprec.deploy.runtime import open_session, ort_module

    def build(assignment: dict[str, Precision]) -> Any:
        graph = apply_plan_onnx(fp32(), captured, assignment, amax, "emulate")
        return ort_module(open_session(graph.SerializeToString(), "cpu"))

    return build


def _torch_deployment(spec: ModelSpec, captured: Captured, amax: Mapping[str, tuple[float, ...]], provider: str | None,
                      fp32: Callable[[], Any]
                      ) -> tuple[Callable[[dict[str, Precision]], bytes], Callable[[int], tuple[dict[str, Any], int]]]:
    """(assignment -> deployment graph, batch -> its inputs) for a torch model whose fp32 export
    ``fp32`` returns (:class:`_Fp32Export`)."""
    from autoprec.deploy.export import apply_plan_onnx
    from autoprec.onnx.graph import graph_inputs
    from autoprec.deploy.runtime import repeat_to

    def deploy(assignment: dict[str, Precision]) -> bytes:
        return apply_plan_onnx(fp32(), captured, assignment, amax, provider=provider).SerializeToString()

    def feeds(batch: int) -> tuple[dict[str, Any], int]:
        arrays = [repeat_to(t.numpy(), batch) for t in spec.example_inputs()]
        return dict(zip([i.name for i in graph_inputs(fp32())], arrays)), batch

    return deploy, feeds


def _onnx_feeds(om: OnnxModel, batch: int) -> tuple[dict[str, Any], int]:
    """An .onnx model's first data batch repeated to ``batch`` samples (its own batch where the
    model fixes it), with the sample count."""
    from autoprec.deploy.runtime import repeat_to

    first = om.batches()[0]
    if om.fixed_batch:
        return first, om.batch
    return {**first, **{k: repeat_to(v, batch) for k, v in first.items() if k in om.feeds}}, batch


def _sweep_budgets(prof: SensitivityProfile, n: int = 10) -> list[float]:
    """Error budgets for the Pareto plot: 0, then n log-spaced points up to every error at once."""
    errs = sorted(v for e in prof.errors.values() for v in e.values() if math.isfinite(v) and v > 0)
    if not errs:
        return [0.0]
    lo, hi = errs[0], sum(errs)
    return [0.0] + [lo * (hi / lo) ** (i / (n - 1)) for i in range(n)]


def _key(assignment: Mapping[str, Precision]) -> tuple[tuple[str, str], ...]:
    """An assignment as a hashable key, whatever order its layers come in."""
    return tuple(sorted((k, v.value) for k, v in assignment.items()))


def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 else 1.0
