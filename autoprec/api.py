"""The library API: each stage of the pipeline as a plain function over plain data.

    spec = load_model_spec("models/digits_cnn.py")
    captured = capture(spec.model(), spec.example_inputs(), name=spec.name)
    prof = profile(captured, spec.calibration_data(), mode="fast")
    problem = SearchProblem.build(captured.graph, prof, RooflineCostModel("h100"))
    plan = solve(problem, "milp", budget=1e-3)
    tuned = apply_plan(captured, plan.assignment, act_amax_from_profile(prof))

:func:`tune` (a torch model file) and :func:`tune_onnx` (an .onnx file) chain them with a real
evaluation of every plan they accept: each describes its model as a :class:`~autoprec.tune.Tunable`
(:class:`TorchTunable`, :class:`OnnxTunable`) and hands it to the one driver,
:func:`autoprec.tune.run_tune`.
"""

from __future__ import annotations

import contextlib
import functools
import io

import math
import statistics
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import numpy as np
import onnx

from autoprec.torch.capture import Captured, capture
from autoprec.cost.model import CostModel
from autoprec.cost.roofline import RooflineCostModel
from autoprec.core.errors import AutoprecError, ModelSpecError, UsageError, first_line
from autoprec.core.formats import DEFAULT_CANDIDATES, Precision, parse_precision, parse_precisions
from autoprec.core.kinds import LAYER_CLASSES
from autoprec.core.metrics import DropBudget, Metric
from autoprec.metrics import model_metric
from autoprec.onnx.apply import set_io_format
from autoprec.onnx.passes.io_format import IO_FORMATS
from autoprec.onnx.model import OnnxModel, profile_onnx
from autoprec.core.opgraph import OpGraph
from autoprec.core.plan import PrecisionPlan
from autoprec.core.resources import collect_new_only, release_memory
from autoprec.core.stats import Progress
from autoprec.torch.profile import profile, profile_cache
from autoprec.core.cache import ResultCache
from autoprec.report import TuneSummary, UniformResult
from autoprec.search.pareto import ParetoPoint
from autoprec.search.problem import SearchProblem, Strategy
from autoprec.search.registry import solve
from autoprec.torch.semantics import needs_act_amax, reuse_weight_rounding
from autoprec.core.sensitivity import SensitivityProfile
from autoprec.torch.spec import ModelSpec, load_model_spec, model_spec
from autoprec.torch.passes import act_amax_from_profile, apply_plan
from autoprec.tune import SPEED_MARGIN, Tunable, run_tune

#: Samples per inference call the cost model prices by default: throughput serving. At small
#: batches the zoo's models are launch-bound on an H100 and no format beats fp32's zero casts.
DEPLOY_BATCH = 1024

__all__ = ["capture", "profile", "load_model_spec", "profile_model", "SearchProblem", "solve", "apply_plan",
           "act_amax_from_profile", "apply_plan_file", "tune", "tune_onnx", "TuneResult", "RooflineCostModel",
           "Metric", "OnnxModel", "profile_onnx", "TorchTunable", "OnnxTunable", "DEPLOY_BATCH", "SPEED_MARGIN"]


def as_spec(model: Any, example_inputs: Any = None, calibration: Iterable[Any] | None = None,
            evaluate: Callable[[Any], float] | None = None, metric_name: str | None = None,
            higher_is_better: bool = True) -> ModelSpec:
    """A model file's path, a :class:`ModelSpec`, or a live ``nn.Module`` with its example inputs,
    calibration batches and (optionally) evaluate(), as the ModelSpec every entry point works on."""
    if isinstance(model, ModelSpec):
        return model
    if isinstance(model, (str, Path)):
        return load_model_spec(model)
    if example_inputs is None or calibration is None:
        raise UsageError("a live module needs example_inputs=(...) and calibration=[batches of its inputs]; "
                         "or give the path of a model file")
    return model_spec(model, example_inputs, calibration, evaluate, metric_name, higher_is_better)


def profile_model(model: Any, mode: str = "exact",
                  formats: Iterable[Precision] = DEFAULT_CANDIDATES, capture_method: str = "auto",
                  progress: Progress | None = None, *, example_inputs: Any = None,
                  calibration: Iterable[Any] | None = None) -> tuple[SensitivityProfile, Captured]:
    """Capture a model and profile every layer: what ``autoprec profile`` does. ``model``: a model
    file, a ModelSpec, or a live nn.Module with ``example_inputs`` and ``calibration`` (:func:`as_spec`)."""
    spec = as_spec(model, example_inputs, calibration)
    captured = capture(spec.model(), spec.example_inputs(), name=spec.name, method=capture_method)
    prof = profile(captured, spec.calibration_data(), formats=formats, mode=mode,
                   output_kind=spec.output_kind, outputs=spec.outputs, progress=progress)
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
    onnx: OnnxModel | None = None  # .onnx models: the analysed model and its data
    spec: ModelSpec | None = None  # torch models: the model file's contract (for the ONNX export)
    provider: str | None = None  # the ONNX Runtime provider the plan was tuned for (its deployment graph's)
    _tunable: Tunable | None = field(default=None, repr=False, compare=False)  # the model as tune measured it

    @functools.cached_property
    def module(self) -> Any:
        """torch models: the emulated tuned module (inference: batch norms folded; runs on CPU);
        None for .onnx models. Built on first use: it holds its own copy of the weights, which the
        tune's writing of a large model's files should not have beside it."""
        if self.captured is None or self._tunable is None:
            return None
        return self._tunable.module(self.plan.assignment)

    @property
    def cache(self) -> ResultCache | None:
        """The profiling cache the tune used (None: off, or an .onnx model)."""
        return getattr(self._tunable, "cache", None)

    def onnx_model(self, mode: str = "deploy") -> onnx.ModelProto:
        """The tuned ONNX model (deploy: 16-bit tensors and fp8 Q/DQ for CUDA / TensorRT; emulate:
        fp32 compute with every rounding explicit, for ORT's CPU provider). A torch model is
        exported once (torch.onnx, reusing tune's export) and both graphs come from that export.
        The deployment graph follows the kernels of the provider the plan was tuned for, when one
        was named, and is the graph tune timed there."""
        if self._tunable is None:
            raise UsageError("this tune result holds no model to export: export it with autoprec.deploy.export.export_onnx")
        return self._tunable.onnx_model(self.plan.assignment, mode, self.provider)


class TorchTunable:
    """A torch model file as the tune driver sees it (:class:`~autoprec.tune.Tunable`): its capture
    and profile, plans measured on the torch emulation and, with ``onnx_check``, on ONNX Runtime's run
    of the plan's emulation graph, both from one fp32 ONNX export made on first need and reused for
    the timing and the written files."""

    def __init__(self, spec: ModelSpec, captured: Captured, metric: Metric, reference: float, eval_seconds: float,
                 prof: SensitivityProfile, *, onnx_check: bool, timing: bool, net: Any = None,
                 weight_sums: Mapping[str, float] | None = None, cache: ResultCache | None = None) -> None:
        self.spec, self.captured, self.metric, self.profile = spec, captured, metric, prof
        self.reference, self.eval_seconds = reference, eval_seconds
        self.name, self.graph, self.op_types = spec.name, captured.graph, None
        self._amax = act_amax_from_profile(prof)
        self._fp32 = _Fp32Export(spec, net, weight_sums, cache)
        self._onnx_check, self._timing = onnx_check, timing
        self.cache = cache  # where the fp32 metric, the profile and the fp32 export are kept
        self.io = Precision.FP32

    def deploy_io(self, io: Precision) -> None:
        """Deploy with floating inputs and outputs in ``io``: every plan is priced, measured and
        written so (:meth:`autoprec.core.opgraph.OpGraph.with_io`)."""
        self.io, self.graph = io, self.captured.graph.with_io(io)

    @classmethod
    def load(cls, spec: ModelSpec, formats: tuple[Precision, ...], metric: Metric | None, profile_mode: str,
             progress: Progress | None, *, onnx_check: bool, timing: bool, cache: bool = True) -> TorchTunable:
        """Capture ``spec``'s model, evaluate it in fp32 (an error stops here, before the
        profile's cost) and profile it; ``metric`` overrides the model's own. ``cache``: reuse and
        keep the fp32 metric and the profile on disk (:mod:`autoprec.core.cache`)."""
        net = spec.model()
        sums = weight_sums(net)
        captured = capture(net, spec.example_inputs(), name=spec.name)
        _need_layers(captured.graph)
        batches = spec.calibration_data()
        _check_batches(spec, captured, batches)
        metric = metric or model_metric(spec, captured, batches)
        store = None
        if cache:
            source = spec.path.read_bytes() if spec.path.is_file() else b""
            settings = {"mode": profile_mode, "formats": [f.value for f in formats], "outputs": spec.outputs,
                        "output_kind": spec.output_kind, "metric": metric.name, "weights": str(spec.weights or "")}
            store = profile_cache(captured, batches, settings, source)
        kept = store.get("reference") if store is not None and spec.path.is_file() else None
        if kept is not None:
            reference, t_eval = float(kept["value"]), float(kept["seconds"])
        else:
            reference, t_eval, metric = _evaluate_fp32(metric, captured.gm)
            if store is not None and spec.path.is_file():  # evaluate() lives in the file: its bytes are in the key
                store.put("reference", {"value": reference, "seconds": t_eval})
        prof = profile(captured, batches, formats=formats, mode=profile_mode, output_kind=spec.output_kind,
                       outputs=spec.outputs, progress=progress, time_reference=False, cache=store)
        release_memory()  # the profile's saved activations and gradients
        # net: the model the capture reads, which the fp32 export is made from
        return cls(spec, captured, metric, reference, t_eval, prof, onnx_check=onnx_check, timing=timing, net=net,
                   weight_sums=sums, cache=store)

    @property
    def export_seconds(self) -> float:
        return self._fp32.seconds

    def module(self, assignment: Mapping[str, Precision]) -> Any:
        """The torch emulation of the plan: the capture rewritten by the torch passes."""
        return apply_plan(self.captured, assignment, self._amax, io=self.io)

    def measure(self, assignment: Mapping[str, Precision]) -> float:
        """The metric of the plan's torch emulation, which reads the captured weights (no copy per trial)
        and rounds each fp8 weight once for all the batches the metric runs."""
        module = apply_plan(self.captured, assignment, self._amax, share_weights=True, io=self.io)
        with reuse_weight_rounding():
            return float(self.metric.measure(module))

    def measure_on_onnx(self, assignment: Mapping[str, Precision]) -> float | None:
        """The metric of ONNX Runtime's CPU session of the plan's emulation graph, as a
        torch-callable module: the deployed numerics, which the model's metric measures like the
        torch emulation. None with ``onnx_check`` off. A failure says how to tune without it."""
        if not self._onnx_check:
            return None
        from autoprec.ort.runtime import open_session, ort_module

        try:
            data = self.onnx_model(assignment, "emulate").SerializeToString()
            release_memory()  # the graph's protobuf: only its bytes go on to the session
            session = open_session(data, "cpu")
            del data
            return float(self.metric.measure(ort_module(session)))
        except AutoprecError:
            raise
        except Exception as exc:  # the model's own evaluate(), or ONNX Runtime
            raise UsageError(f"measuring {self.metric.name} on ONNX Runtime's run of a plan failed "
                             f"({type(exc).__name__}: {first_line(exc, 160)}): evaluate() must only call the model "
                             "it is given; or tune with --no-onnx-check (onnx_check=False) to accept plans on the "
                             "torch emulation alone") from exc

    def timing_feeds(self, batch: int) -> tuple[dict[str, Any], int] | None:
        """The example inputs repeated to ``batch`` samples, by the export's input names."""
        if not self._timing:
            return None
        from autoprec.onnx.graph import graph_inputs
        from autoprec.ort.runtime import repeat_to

        arrays = [_in_io(repeat_to(t.numpy(), batch), self.io) for t in self.spec.example_inputs()]
        return dict(zip([i.name for i in graph_inputs(self._fp32())], arrays)), batch

    def onnx_model(self, assignment: Mapping[str, Precision], mode: str = "deploy",
                   provider: str | None = None) -> onnx.ModelProto:
        from autoprec.deploy.export import apply_plan_onnx

        return set_io_format(apply_plan_onnx(self._fp32(), self.captured, assignment, self._amax, mode,
                                             provider=provider), self.io)


class OnnxTunable:
    """An .onnx input as the tune driver sees it (:class:`~autoprec.tune.Tunable`): every plan is
    measured on its emulation graph on ONNX Runtime, so there is no separate ONNX check and no
    export."""

    export_seconds = 0.0

    def __init__(self, om: OnnxModel, metric: Metric, reference: float, eval_seconds: float,
                 prof: SensitivityProfile, *, timing: bool) -> None:
        self.om, self.metric, self.profile = om, metric, prof
        self.reference, self.eval_seconds = reference, eval_seconds
        self.name, self.graph, self.op_types = om.analysis.graph.model_name, om.analysis.graph, om.analysis.op_types
        self._amax = act_amax_from_profile(prof)
        self._timing = timing
        self.io = Precision.FP32

    def deploy_io(self, io: Precision) -> None:
        """See :meth:`TorchTunable.deploy_io`."""
        self.io, self.graph = io, self.om.analysis.graph.with_io(io)

    @classmethod
    def load(cls, om: OnnxModel, formats: tuple[Precision, ...], metric: Metric, progress: Progress | None, *,
             timing: bool) -> OnnxTunable:
        """Evaluate the fp32 model (an error stops here) and profile it, exactly: ONNX Runtime has
        no backward pass for the fast estimate."""
        reference, t_eval, metric = _evaluate_fp32(metric, om.analysis.model)
        return cls(om, metric, reference, t_eval, profile_onnx(om, formats, progress), timing=timing)

    def measure(self, assignment: Mapping[str, Precision]) -> float:
        return float(self.metric.measure(self.onnx_model(assignment, "emulate")))

    def measure_on_onnx(self, assignment: Mapping[str, Precision]) -> None:
        """None: :meth:`measure` already is ONNX Runtime's run of the emulation graph."""
        return None

    def timing_feeds(self, batch: int) -> tuple[dict[str, Any], int] | None:
        """The first data batch repeated to ``batch`` samples (the model's own batch where it fixes it)."""
        if not self._timing:
            return None
        from autoprec.ort.runtime import repeat_to

        first = {k: _in_io(v, self.io) for k, v in self.om.batches()[0].items()}
        if self.om.fixed_batch:
            return first, self.om.batch
        return {**first, **{k: repeat_to(v, batch) for k, v in first.items() if k in self.om.feeds}}, batch

    def onnx_model(self, assignment: Mapping[str, Precision], mode: str = "deploy",
                   provider: str | None = None) -> onnx.ModelProto:
        return set_io_format(self.om.build(assignment, self._amax, mode, provider), self.io)


def _in_io(array: Any, io: Precision) -> Any:
    """A timing feed as a graph with ``io`` inputs takes it: float arrays in fp16 for fp16 I/O."""
    return array.astype(np.float16) if io is Precision.FP16 and array.dtype == np.float32 else array


def tune(model: Any, budget: str | float | None = None, *, fidelity_budget: str | float | None = None,
         target: str = "h100", objective: str = "latency", formats: Iterable[str | Precision] | None = None,
         strategy: str | Strategy = "milp", keep: Iterable[str] = (), force: Iterable[str] = (),
         profile_mode: str = "fast", cost_model: CostModel | None = None, metric: Metric | None = None,
         batch: int = DEPLOY_BATCH, provider: str | None = None, progress: Progress | None = None,
         timing: bool = True, onnx_check: bool = True, example_inputs: Any = None,
         calibration: Iterable[Any] | None = None, evaluate: Callable[[Any], float] | None = None,
         metric_name: str | None = None, higher_is_better: bool = True, cache: bool = True,
         io: str | Precision = "fp32") -> TuneResult:
    """Find the fastest per-layer plan whose *measured* metric drop stays within the budget.

    ``model``: a model file (models/README.md), a ModelSpec, or a live ``nn.Module`` with
    ``example_inputs``, ``calibration`` (an iterable or DataLoader of input batches) and optionally
    ``evaluate(module) -> float`` named ``metric_name`` (:func:`as_spec`)::

        result = tune(hf_model, example_inputs=(ids,), calibration=batches, fidelity_budget="1%")

    ``budget`` (models with evaluate()) or ``fidelity_budget`` (models without): "0.5%" relative
    to the fp32 metric, or an absolute drop such as 0.005. ``metric`` overrides the model's.
    ``batch``: the deployment batch the cost model prices (samples per inference call).
    ``provider``: an ONNX Runtime execution provider (cpu, cuda, tensorrt) the plan will run on:
    formats it has no faithful kernel for are never offered (each exclusion is a reason), and each
    layer is priced in the format it computes in there (:class:`~autoprec.cost.provider.ProviderCostModel`:
    fp8 is an fp32 op between Q/DQ except on TensorRT).
    ``timing``: where ``provider`` is cuda and really runs here (a GPU), time the deployment graphs
    of the searched plan, of the fastest uniform plan within budget and of all-fp32, and adopt the
    fastest (:func:`autoprec.tune.run_tune`): the cost model's choice checked by a measurement, as the
    budget is by an evaluation. A plan tuned on a GPU may therefore depend on those timings.
    ``onnx_check``: a plan is accepted only when ONNX Runtime's run of its emulation graph (the
    exported model's numerics, on the CPU) is within the budget too, not the torch emulation alone.
    Both compute the plan's roundings, in other summation orders, and where a sample's fp32 top-1 is
    a near tie the two can decide it differently; the budget holds for the model that is deployed.
    Off, the model is never exported to ONNX during the search.
    ``cache``: reuse the fp32 metric and the profile of an earlier run of the same model, data,
    code and settings, and keep this run's (:mod:`autoprec.core.cache`; a killed tune resumes).
    ``io``: the format of the deployed graph's floating inputs and outputs, fp32 or fp16 (a serving
    stack that holds its tensors in fp16). With fp16 every plan is measured on inputs rounded to
    fp16 and outputs handed on in fp16, and priced without the fp32 copy of a 16-bit output (which
    at a large batch of language-model logits is most of the deployed memory).
    """
    _check_batch(batch)
    io_fmt = _io_format(io)
    started = time.perf_counter()
    spec = as_spec(model, example_inputs, calibration, evaluate, metric_name, higher_is_better)
    drop_budget = _choose_budget(spec.name, spec.evaluate is not None or metric is not None,
                                 spec.metric or "metric", budget, fidelity_budget)
    fmts = parse_precisions(formats) if formats is not None else DEFAULT_CANDIDATES
    with collect_new_only():
        tunable = TorchTunable.load(spec, fmts, metric, profile_mode, progress, onnx_check=onnx_check,
                                    timing=timing, cache=cache)
        tunable.deploy_io(io_fmt)
        out = run_tune(tunable, drop_budget, fmts, target=target, objective=objective, strategy=strategy, keep=keep,
                       force=force, cost_model=cost_model, batch=batch, provider=provider, started=started)
    return TuneResult(out.plan, tunable.profile, tunable.graph, tunable.metric, out.summary, out.uniforms, out.pareto,
                      captured=tunable.captured, spec=spec,
                      provider=provider, _tunable=tunable)


def tune_onnx(model: str | Path, data: str | Path | Mapping[str, Any], labels: str | Path | Any = None,
              budget: str | float | None = None, *, fidelity_budget: str | float | None = None,
              target: str = "h100", objective: str = "latency", formats: Iterable[str | Precision] | None = None,
              strategy: str | Strategy = "milp", keep: Iterable[str] = (), force: Iterable[str] = (),
              cost_model: CostModel | None = None, metric: Metric | None = None, batch: int = DEPLOY_BATCH,
              provider: str | None = None, progress: Progress | None = None, timing: bool = True,
              io: str | Precision = "fp32") -> TuneResult:
    """:func:`tune` for a model given as an .onnx file, measured on ONNX Runtime.

    ``data``: an .npz with the model's inputs (see :mod:`autoprec.onnx.model`); ``labels``: an
    .npy, or the name of an array in ``data``. With labels the budget is a drop of accuracy
    (integer labels) or of mean squared error (float labels); without them, a ``fidelity_budget``
    on agreement with the fp32 model. ``metric.measure`` takes an ONNX ModelProto.
    Profiling is exact (ONNX Runtime has no backward pass for the fast estimate). ``timing`` and
    ``io``: as :func:`tune`'s.
    """
    _check_batch(batch)
    io_fmt = _io_format(io)
    started = time.perf_counter()
    om = OnnxModel.load(model, data, labels)
    _need_layers(om.analysis.graph, om.analysis.reasons)
    own_metric = om.labels is not None or metric is not None
    metric = metric or om.metric()
    drop_budget = _choose_budget(om.analysis.graph.model_name, own_metric, metric.name, budget, fidelity_budget,
                                 how="--labels")
    fmts = parse_precisions(formats) if formats is not None else DEFAULT_CANDIDATES
    with collect_new_only():
        tunable = OnnxTunable.load(om, fmts, metric, progress, timing=timing)
        tunable.deploy_io(io_fmt)
        out = run_tune(tunable, drop_budget, fmts, target=target, objective=objective, strategy=strategy, keep=keep,
                       force=force, cost_model=cost_model, batch=batch, provider=provider, started=started)
    return TuneResult(out.plan, tunable.profile, tunable.graph, metric, out.summary, out.uniforms, out.pareto,
                      onnx=om, provider=provider, _tunable=tunable)


def _need_layers(graph: OpGraph, fixed: Mapping[str, str] | None = None) -> None:
    """A one-line error for a model with no layer whose format a plan could choose (a scikit-learn
    linear model converted to ai.onnx.ml's LinearClassifier, say): the search, the report and the
    plots have nothing to work on."""
    if graph.layers():
        return
    first = next(iter(sorted((fixed or {}).items())), None)
    why = f"; {len(fixed or {})} op(s) stay fp32, e.g. {first[0]}: {first[1]}" if first else ""
    raise UsageError(f"{graph.model_name} has no layer whose format can be chosen (the layer classes: "
                     f"{', '.join(LAYER_CLASSES)}): nothing to tune{why}")


def _io_format(io: str | Precision) -> Precision:
    """The I/O format a tune deploys with: fp32 or fp16 (ONNX Runtime's Python API has no bf16)."""
    fmt = parse_precision(io) if isinstance(io, str) else io
    if fmt not in IO_FORMATS:
        raise UsageError(f"--io must be fp32 or fp16, not {fmt}: ONNX Runtime's Python API has no numpy type "
                         "for bf16 or fp8 inputs and outputs")
    return fmt


def _check_batch(batch: int) -> None:
    if batch <= 0:
        raise UsageError(f"--batch must be a positive number of samples, not {batch}")


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
        prof = SensitivityProfile.load(src)
        prof.check_against(captured.graph)
        amax = act_amax_from_profile(prof)
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


def _check_batches(spec: ModelSpec, captured: Captured, batches: list[tuple[Any, ...]]) -> None:
    """A one-line error naming the first calibration batch the model cannot run, before any work
    (one forward pass per distinct input signature: batches shaped alike run alike)."""
    import torch

    seen = set()
    with torch.no_grad():
        for i, b in enumerate(batches):
            sig = tuple((tuple(x.shape), x.dtype) if torch.is_tensor(x) else repr(x) for x in b)
            if sig in seen:
                continue
            seen.add(sig)
            try:  # an fx module prints the failing line's traceback itself: one line instead
                with contextlib.redirect_stderr(io.StringIO()):
                    captured.gm(*b)
            except Exception as exc:
                raise ModelSpecError(f"{spec.path}: calibration_data() batch {i} does not fit the model: "
                                     f"{type(exc).__name__}: {first_line(exc, 200)}") from exc


#: fp32 evaluations timed for the unit tune's cost is reported in (their median): one timing of a
#: first call wobbled 2.4x between runs of the same tune on a shared machine
FP32_TIMING_RUNS = 3


def _evaluate_fp32(metric: Metric, fp32_model: Any) -> tuple[float, float, Metric]:
    """The fp32 metric, the median seconds of :data:`FP32_TIMING_RUNS` evaluations, and the metric
    with a warning added if the evaluations disagree (a drop measured against a moving reference
    means little); stop early if the metric cannot be had."""
    values, seconds = [], []
    for _ in range(FP32_TIMING_RUNS):
        t = time.perf_counter()
        try:
            value = float(metric.measure(fp32_model))
        except AutoprecError:
            raise
        except Exception as exc:
            raise ModelSpecError(f"the fp32 model cannot be evaluated, so there is nothing to keep within a budget: "
                                 f"{metric.name} raised {type(exc).__name__}: {first_line(exc, 160)}") from exc
        seconds.append(time.perf_counter() - t)
        if not math.isfinite(value):
            raise ModelSpecError(f"the fp32 model's {metric.name} is {value}: fix the model's metric before tuning")
        values.append(value)
    if len(set(values)) > 1:
        moving = (f"the fp32 model's {metric.name} changed between evaluations ({', '.join(f'{v:.6g}' for v in values)}): "
                  "evaluate() is not deterministic (dropout left on, sampled data?), so plans are judged against "
                  "noise; the first value is the reference")
        metric = replace(metric, warning=f"{metric.warning}; {moving}" if metric.warning else moving)
    return values[0], statistics.median(seconds), metric


_PROTOBUF_LIMIT = 2**31 - 1  # a ModelProto past 2 GB cannot be serialized whole, so it is not cached


class _Fp32Export:
    """The model's fp32 ONNX export (torch.onnx), made on the first call and kept, with the seconds
    it took: tune reports them apart, since writing the tuned model needs the export anyway.

    ``net``: the module the capture was made from (the capture shares its parameters, so exporting
    it holds no second copy of the weights); None: the model file's ``model()``. ``sums``: ``net``'s
    :func:`weight_sums`, which a second ``model()`` must match before anything is exported
    (:func:`_same_weights`). ``cache``: the tune's profile cache, whose key holds the captured graph,
    weights and autoprec's code; the export is kept there (under torch's version: its exporter writes
    it), so a second tune of the same model reads it back instead of exporting (3-9 s on the zoo).
    A cached export was made by a run that passed the weights check with these very weights."""

    def __init__(self, spec: ModelSpec, net: Any = None, sums: Mapping[str, float] | None = None,
                 cache: ResultCache | None = None) -> None:
        self._spec = spec
        self._net = net
        self._sums = sums
        self._cache = cache
        self._model: Any = None
        self.seconds = 0.0

    def __call__(self) -> Any:
        if self._model is None:
            import torch

            from autoprec.deploy.export import torch_to_onnx

            t = time.perf_counter()
            key = f"fp32_export-torch{torch.__version__}"
            kept = self._cache.get_bytes(key) if self._cache is not None else None
            if kept is not None:
                self._model = onnx.load_from_string(kept)
                del kept
            else:
                if self._sums is not None:  # one model at a time: the check's copy is gone before the export
                    _same_weights(self._spec, self._sums, self._spec.model())
                    release_memory()
                net = self._net if self._net is not None else self._spec.model()
                self._model = torch_to_onnx(net, self._spec.example_inputs())
                del net
                release_memory()  # the exporter's graphs, before a plan is built from the export
                if self._cache is not None and self._model.ByteSize() < _PROTOBUF_LIMIT:
                    self._cache.put_bytes(key, self._model.SerializeToString())
            self.seconds = time.perf_counter() - t
        return self._model


def weight_sums(net: Any) -> dict[str, float]:
    """A checksum of each floating tensor ``net`` stores (its float64 sum): two model() calls that
    built different weights differ in them."""
    return {k: float(v.detach().double().sum()) for k, v in net.state_dict().items() if v.is_floating_point()}


def _same_weights(spec: ModelSpec, sums: Mapping[str, float], net: Any) -> None:
    """A ModelSpecError unless a second ``model()`` holds the weights the captured one did: the plan is
    measured on one, and ``autoprec export`` builds another, so a model() that initialises at random
    on each call would deploy weights the plan was never measured on."""
    for name, value in weight_sums(net).items():
        if name in sums and sums[name] != value and not (math.isnan(value) and math.isnan(sums[name])):
            raise ModelSpecError(f"{spec.path}: model() returns other weights on each call ({name} differs): seed "
                                 "its initialisation or load saved weights, so every call builds the same model")
