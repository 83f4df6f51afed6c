"""Verify an exported ONNX model: its metric through ONNX Runtime and its parity with the torch emulation.

    report = verify("digits_cnn.onnx", "models/digits_cnn.py", plan="out/digits_cnn/plan.json")
    print("\\n".join(report.lines()))

The plan and the fp8 calibration an ONNX file was exported with are read from its metadata, so a
deployed file can be verified on its own; a plan given beside it must agree with it.

Where the session runs on CUDA (or TensorRT), the metric is measured on the deployment graph
itself. ONNX Runtime's CPU provider cannot measure a low-precision model faithfully: it computes
fp16 nodes in fp32 and drops their rounding, and it has no bf16 kernels. There the metric is
measured on the *emulation graph* of the same plan (fp32 compute, every rounding explicit), and
the report says so.

Parity holds the torch emulation (``autoprec.torch.passes.apply_plan(mode="emulate")``) and ONNX Runtime's run of
the emulation graph to the same numbers on the model's calibration data: relative L2 error within
the epsilon of the narrowest format the plan uses (or twice the model's own response to a one-ulp
input change, where that is larger: see :class:`Parity`), and equal argmax on at least 99.5% of
positions (classifier outputs). The two differ only where the two runtimes' fp32 arithmetic does
(summation order in a GEMM or convolution) and a rounding then lands on the other side of a tie.
A model with several outputs (every floating tensor it returns, or those its ``OUTPUTS`` names) is
held to that on each output; the report shows the output furthest from its tolerance, and the
metric is the worst output's (:func:`autoprec.core.metrics.fidelity_to`).
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping, Sequence

import onnx

from autoprec.core.errors import PlanError, UsageError
from autoprec.core.formats import Precision
from autoprec.core.metrics import metric_drop
from autoprec.core.opgraph import OpGraph
from autoprec.core.plan import PrecisionPlan
from autoprec.core.stats import DeclaredKinds
from autoprec.ort.providers import CPU
from autoprec.ort import runtime
from autoprec.onnx.graph import read_onnx_file
from autoprec.onnx.apply import load_assignment, recorded_plan, set_io_format
from autoprec.onnx.model import OnnxModel
from autoprec.onnx.passes.base import MODEL_FINGERPRINT, MODEL_IO, MODEL_MODE, MODEL_PROVIDER, model_meta, opset_of
from autoprec.torch.spec import ModelSpec, load_model_spec

#: fewest top-1 agreements (fraction of positions) parity accepts
TOP1_AGREEMENT = 0.995
#: smallest relative-L2 tolerance: two fp32 runtimes already differ by about 1e-7
MIN_TOLERANCE = 1e-5


@dataclass
class Parity:
    """Torch emulation vs ONNX Runtime's emulation graph on the same inputs.

    ``noise_floor``: how far the torch emulation itself moves when its floating inputs change by
    one part in 2^23 (relative L2). A deep model with random weights (resnet18) amplifies a one-ulp
    change in one rounding into percent-level output changes; two runtimes that sum in different
    orders cannot agree better than that, so the tolerance is the larger of the narrowest format's
    epsilon and twice the noise floor.

    Top-1 agreement is counted where the torch emulation's top-1 logit leads the runner-up by more
    than twice the largest difference between the two outputs at that position; closer calls
    (``near_ties``) flip with either runtime's summation order and say nothing about the rounding.
    ``top1_raw`` counts every position.
    """

    rel_l2: float
    top1_agreement: float | None  # None for outputs that are not logits
    positions: int
    tolerance: float
    narrowest: str
    noise_floor: float = 0.0
    top1_raw: float | None = None
    near_ties: int = 0
    output: str = ""  # the output this is the parity of, when the model has several: the one furthest from its tolerance

    @property
    def ok(self) -> bool:
        top_ok = self.top1_agreement is None or self.top1_agreement >= TOP1_AGREEMENT
        return math.isfinite(self.rel_l2) and self.rel_l2 <= self.tolerance and top_ok


@dataclass
class VerifyReport:
    """What :func:`verify` measured, with the lines the CLI prints."""

    onnx_path: str
    model: str
    file_mode: str  # "deploy" | "emulate": what the ONNX file holds
    provider: str  # where ONNX Runtime ran the metric
    provider_note: str  # why not the provider asked for ("" when it was)
    metric_graph: str  # "deployment" | "emulation"
    formats: dict[str, int]
    parity: Parity | None  # None: nothing to compare with (an .onnx input verified on a CPU provider)
    metric: str | None = None
    higher_is_better: bool = True
    metric_onnx: float | None = None
    metric_torch_emulated: float | None = None
    metric_fp32: float | None = None
    allowed_drop: float | None = None
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    parity_of: str = "torch emulation vs ONNX emulation graph"  # what the parity compares

    @property
    def drop(self) -> float | None:
        """How much worse ONNX Runtime's metric is than fp32's (positive = worse); None until both are measured."""
        if self.metric_onnx is None or self.metric_fp32 is None:
            return None
        return metric_drop(self.metric_fp32, self.metric_onnx, higher_is_better=self.higher_is_better)

    @property
    def within_budget(self) -> bool | None:
        if self.allowed_drop is None or self.drop is None:
            return None
        return self.drop <= self.allowed_drop + 1e-12

    @property
    def ok(self) -> bool:
        return (self.parity is None or self.parity.ok) and self.within_budget is not False

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(drop=self.drop, within_budget=self.within_budget, ok=self.ok,
                 parity_ok=None if self.parity is None else self.parity.ok)
        return d

    def lines(self) -> list[str]:
        p = self.parity
        counts = ", ".join(f"{k} x{v}" for k, v in sorted(self.formats.items()))
        out = [f"{self.onnx_path}: {self.model}, {self.file_mode} graph ({counts})"]
        where = f"ONNX Runtime on {self.provider}" + (f" ({self.provider_note})" if self.provider_note else "")
        if self.metric_graph == "emulation":
            out.append(f"{where}: the metric is measured on the emulation graph (fp32 compute with every rounding "
                       "explicit), because ORT's CPU provider computes fp16 ops without their rounding and has no "
                       "bf16 kernels")
        else:
            out.append(f"{where}: the metric is measured on the deployment graph")
        if self.metric is not None and self.metric_onnx is not None:
            line = f"{self.metric}: ONNX {self.metric_onnx:.6g}"
            if self.metric_torch_emulated is not None:
                line += f", torch emulation {self.metric_torch_emulated:.6g}"
            if self.metric_fp32 is not None:
                line += f", fp32 {self.metric_fp32:.6g} (drop {self.drop:.4g}"
                line += (f"; allowed {self.allowed_drop:.4g}: {'within' if self.within_budget else 'OVER'} budget)"
                         if self.allowed_drop is not None else ")")
            out.append(line)
        if p is None:
            out.extend(self.notes)
            return out
        top = ""
        if p.top1_agreement is not None:
            top = f", top-1 agreement {100 * p.top1_agreement:.2f}%"
            if p.near_ties:
                top += f" ({100 * p.top1_raw:.2f}% counting {p.near_ties} near-tie(s))"
        basis = (f"eps of {p.narrowest}" if p.tolerance <= max(Precision(p.narrowest).eps, MIN_TOLERANCE)
                 else f"twice the model's own response to a 1-ulp input change, {p.noise_floor:.3g}")
        worst = f" on output {p.output!r} (the furthest of the model's outputs from its tolerance)" if p.output else ""
        out.append(f"parity {self.parity_of}{worst}: relative L2 {p.rel_l2:.3g} (tolerance "
                   f"{p.tolerance:.3g}, {basis}){top} over {p.positions} outputs: {'ok' if p.ok else 'FAILED'}")
        out.extend(self.notes)
        return out


def _assignment_of(plan: PrecisionPlan | str | os.PathLike[str] | Mapping[str, Any]) -> dict[str, Precision]:

    return load_assignment(plan)


def _check_same_plan(recorded: Mapping[str, Precision], given: Mapping[str, Precision]) -> None:
    fp32 = Precision.FP32
    names = sorted(set(recorded) | set(given))
    diff = [n for n in names if recorded.get(n, fp32) is not given.get(n, fp32)]
    if diff:
        shown = ", ".join(f"{n} ({recorded.get(n, fp32)} in the file, {given.get(n, fp32)} in the plan)" for n in diff[:5])
        raise PlanError(f"the ONNX file was exported with another plan: {shown}"
                        + (f" and {len(diff) - 5} more" if len(diff) > 5 else ""))


def narrowest_format(assignment: Mapping[str, Precision], io: Precision = Precision.FP32) -> Precision:
    """The narrowest format of a plan's layers and of the graph's inputs and outputs (``io``)."""
    return max([io, *assignment.values()], key=lambda f: f.rank)


def _io_format(model: onnx.ModelProto, notes: list[str]) -> Precision:
    """The format of an exported file's graph inputs and outputs (recorded by `export --io`); a
    note says so when it is not fp32."""

    io = Precision(model_meta(model).get(MODEL_IO, Precision.FP32.value))
    if io is not Precision.FP32:
        notes.append(f"the file takes and returns {io}: fp32 data is rounded to {io} at its inputs")
    return io


def _measures_the_file(model: onnx.ModelProto, provider: str) -> bool:
    """Whether verify measures ``model`` itself on ``provider`` rather than its emulation graph: on
    a GPU provider, and on the CPU for a deployment graph written for it (`--provider cpu`), whose
    ops compute in 16 bits only where the CPU has the kernel, so that it computes the plan
    faithfully there."""

    if provider in ("cuda", "tensorrt"):
        return True
    meta = model_meta(model)
    return provider == "cpu" and meta.get(MODEL_MODE) == "deploy" and meta.get(MODEL_PROVIDER) == CPU


def _nudged(batch: tuple[Any, ...]) -> tuple[Any, ...]:
    import torch

    return tuple(x * (1 + 2.0 ** -23) if isinstance(x, torch.Tensor) and x.is_floating_point() else x for x in batch)


def _nudged_feeds(feeds: Mapping[str, Any]) -> dict[str, Any]:
    """:func:`_nudged` for ONNX Runtime feeds (name -> numpy array)."""
    import numpy as np

    return {k: (v * np.float32(1 + 2.0 ** -23)).astype(v.dtype) if np.issubdtype(v.dtype, np.floating) else v
            for k, v in feeds.items()}


def compare_outputs(got: Sequence[Any], ref: Sequence[Any], narrowest: Precision, logits: bool,
                    nudged: Sequence[Any] | None = None) -> Parity:
    """Parity of ``got`` with the reference outputs ``ref`` (torch tensors, one per batch).

    ``nudged``: the reference's outputs on the same batches with every floating input scaled by
    1 + 2^-23, which measure its noise floor (None: no floor). ``narrowest``: the narrowest format
    the plan uses; its epsilon is the tolerance unless the floor is larger (see :class:`Parity`).
    """
    num = den = noise = 0.0
    same = same_raw = total = decided = elements = 0
    for i, (g, r) in enumerate(zip(got, ref, strict=True)):
        g, r = g.float(), r.float()
        if g.shape != r.shape:
            raise UsageError(f"the ONNX model's output has shape {tuple(g.shape)}, the reference's {tuple(r.shape)}")
        elements += r.numel()
        num += float(((g - r).double() ** 2).sum())
        den += float((r.double() ** 2).sum())
        if nudged is not None:
            noise += float(((nudged[i].float() - r).double() ** 2).sum())
        if logits:
            agree = g.argmax(-1) == r.argmax(-1)
            top2 = r.topk(min(2, r.shape[-1]), dim=-1).values
            margin = top2[..., 0] - top2[..., -1]
            clear = margin > 2 * (g - r).abs().amax(-1)
            same_raw += int(agree.sum())
            same += int((agree & clear).sum())
            decided += int(clear.sum())
            total += agree.numel()
    rel = math.sqrt(num / den) if den > 0 else (0.0 if num == 0 else math.inf)
    if math.isnan(rel):
        rel = math.inf
    floor = math.sqrt(noise / den) if den > 0 else 0.0
    if not math.isfinite(floor):
        floor = 0.0
    top1 = (same / decided if decided else 1.0) if logits and total else None
    return Parity(rel, top1, total if logits else elements, max(narrowest.eps, 2 * floor, MIN_TOLERANCE),
                  narrowest.value, floor, same_raw / total if logits and total else None, total - decided)


def parity(torch_module: Any, session: Any, batches: Sequence[tuple[Any, ...]], narrowest: Precision,
           logits: bool | None = None, *, outputs: Sequence[str] | None = None,
           output_kind: DeclaredKinds = None) -> Parity:
    """Relative L2 and top-1 agreement between a torch module (the reference) and an ORT session
    on ``batches``, with the torch module's own noise floor (see :class:`Parity`), on each output
    named in ``outputs`` (None: every floating output); the parity of the output furthest from its
    tolerance. Each output is judged as ``output_kind`` declares it or its shape says, unless
    ``logits`` judges them all as logits (True) or values (False)."""
    import torch

    from autoprec.torch.profile import model_outputs, selected_outputs

    declared = output_kind if logits is None else ("logits" if logits else "values")
    ort = runtime.ort_module(session)
    with torch.no_grad():
        results = [torch_module(*b) for b in batches]
        measured = model_outputs(results[0], outputs, declared)
        ref = [selected_outputs(measured, r) for r in results]
        nudged = [selected_outputs(measured, torch_module(*_nudged(b))) for b in batches]
        got = [selected_outputs(measured, ort(*b)) for b in batches]
    return worst_parity([(measured.names[i], compare_outputs([g[o] for g in got], [r[o] for r in ref], narrowest,
                                                             kind == "logits", [n[o] for n in nudged]))
                         for o, (i, kind) in enumerate(zip(measured.positions, measured.kinds))])


def worst_parity(per: Sequence[tuple[str, Parity]]) -> Parity:
    """A model's parity from each output's (name, parity): the one output's, or of several the
    output furthest from its tolerance, named, so that the parity holds for every output."""
    if len(per) == 1:
        return per[0][1]
    name, worst = max(per, key=lambda item: (not item[1].ok, item[1].rel_l2 / item[1].tolerance))
    return replace(worst, output=name)


def verify(onnx_path: str | os.PathLike[str], model_file: ModelSpec | str | os.PathLike[str],
           plan: PrecisionPlan | str | os.PathLike[str] | Mapping[str, Any] | None = None,
           providers: str | Sequence[str] = "auto") -> VerifyReport:
    """Measure an exported model's metric through ONNX Runtime and its parity with the torch emulation.

    On a CUDA / TensorRT provider both are taken on the file itself (the deployment graph, on the
    GPU), and the emulation graph's parity on the CPU is a note. On a CPU provider both are taken on
    the emulation graph, since ORT's CPU provider drops fp16 roundings and has no bf16 kernels, unless
    the file is a deployment graph written for it (`--provider cpu`): that one is measured itself.

    ``plan``: optional; when given it must be the plan the file was exported with (its measured
    ``allowed_drop`` then judges the metric). ``providers``: what to ask ONNX Runtime for.
    """
    from autoprec.metrics import model_metric
    from autoprec.torch.capture import capture
    from autoprec.deploy.export import apply_plan_onnx, torch_to_onnx
    from autoprec.torch.passes import apply_plan

    t0 = time.perf_counter()
    path, model, mode, assignment, amax, allowed = _read_exported(onnx_path, plan)
    spec = model_file if isinstance(model_file, ModelSpec) else load_model_spec(model_file)
    module = spec.model()
    example = spec.example_inputs()
    captured = capture(module, example, name=spec.name)
    recorded_fp = model_meta(model).get(MODEL_FINGERPRINT)
    if recorded_fp and recorded_fp != captured.graph.fingerprint():
        raise PlanError(f"{path} was exported from another model than {spec.path.name}, or by an older autoprec "
                        f"(fingerprint {recorded_fp} != {captured.graph.fingerprint()}): export it again")
    torch_emulated = apply_plan(captured, assignment, amax or None, mode="emulate")
    notes: list[str] = []
    io = _io_format(model, notes)
    if mode == "emulate":
        emulation = model
    else:
        fp32 = torch_to_onnx(module, example, opset_of(model))
        emulation = set_io_format(apply_plan_onnx(fp32, captured, assignment, amax or None, "emulate"), io)
    emu_session = runtime.open_session(emulation.SerializeToString(), "cpu")
    asked = runtime.parse_providers(providers)
    provider, why = runtime.probe_provider(asked)
    if _measures_the_file(model, provider):
        metric_session = runtime.open_session(str(path), providers)
        provider, why = metric_session.provider, metric_session.reason
        graph = "deployment" if mode == "deploy" else "emulation"
    else:
        metric_session = emu_session
        graph = "emulation"
    batches = spec.calibration_data()
    narrow = narrowest_format(assignment, io)
    par = parity(torch_emulated, metric_session, batches, narrow, outputs=spec.outputs, output_kind=spec.output_kind)
    parity_of = VerifyReport.parity_of  # the default: torch emulation vs ONNX emulation graph
    if metric_session is not emu_session:  # the deployed graph itself; the emulation graph's is a note
        parity_of = f"torch emulation vs ONNX {graph} graph on {provider}"
        emu = parity(torch_emulated, emu_session, batches, narrow, outputs=spec.outputs, output_kind=spec.output_kind)
        notes.append(f"parity torch emulation vs ONNX emulation graph on the CPU: relative L2 {emu.rel_l2:.3g} "
                     f"(tolerance {emu.tolerance:.3g}): {'ok' if emu.ok else 'FAILED'}")
    metric = model_metric(spec, captured, batches)
    report = VerifyReport(
        onnx_path=str(path), model=spec.name, file_mode=mode, provider=provider,
        provider_note=f"asked for {asked[0]}: {why}" if provider != asked[0] else "",
        metric_graph=graph, formats=_counts(assignment, captured.graph), parity=par, metric=metric.name,
        higher_is_better=metric.higher_is_better, allowed_drop=allowed, notes=notes, parity_of=parity_of)
    report.metric_onnx = float(metric.measure(runtime.ort_module(metric_session)))
    report.metric_torch_emulated = float(metric.measure(torch_emulated))
    report.metric_fp32 = float(metric.measure(captured.gm))
    if spec.evaluate is None:
        notes.append(f"{spec.name} has no evaluate(): the metric is {metric.name} against the fp32 torch model "
                     "on the calibration data")
    note = near_tie_note(report)
    if note:
        notes.append(note)
    report.seconds = time.perf_counter() - t0
    return report


def near_tie_note(report: VerifyReport) -> str | None:
    """Why ONNX Runtime's metric can be over budget when the torch emulation of the same plan is
    not: both compute the plan's roundings, but in other summation orders, so at a near tie (see
    :class:`Parity`) either may pick the other top-1. The verdict stands -- this is what the
    deployment measures -- and the note says where it comes from. None when that is not the case."""
    p = report.parity
    if report.within_budget is not False or p is None or not p.ok or not p.near_ties \
            or p.top1_raw is None or p.top1_raw >= 1.0 or report.allowed_drop is None \
            or report.metric_fp32 is None or report.metric_torch_emulated is None:
        return None
    if metric_drop(report.metric_fp32, report.metric_torch_emulated,
                   higher_is_better=report.higher_is_better) > report.allowed_drop + 1e-12:
        return None
    flips = round((1.0 - p.top1_raw) * p.positions)
    return (f"the torch emulation of this plan is within budget; ONNX Runtime's top-1 differs from it at {flips} of "
            f"{p.positions} positions, all near ties (the runtimes' summation orders decide them), and "
            f"{report.metric} moves by 1/{p.positions} per position")


def _read_exported(onnx_path: str | os.PathLike[str], plan: PrecisionPlan | str | os.PathLike[str] | Mapping[str, Any]
                   | None) -> tuple[Path, onnx.ModelProto, str, dict[str, Precision], dict[str, tuple[float, ...]],
                                    float | None]:
    """(path, model, mode, assignment, fp8 amax, allowed drop) of a file `autoprec` wrote; a plan
    given beside it must be the one it recorded (its measured allowed drop judges the metric)."""

    path = Path(onnx_path)
    if not path.exists():
        raise UsageError(f"ONNX file not found: {path}")
    model = read_onnx_file(path)
    mode, assignment, amax = recorded_plan(model, str(path))
    allowed = None
    if plan is not None:
        _check_same_plan(assignment, _assignment_of(plan))
        loaded = plan if isinstance(plan, PrecisionPlan) else (
            PrecisionPlan.load(plan) if isinstance(plan, (str, os.PathLike)) else None)
        if loaded is not None and "allowed_drop" in loaded.measured:
            allowed = float(loaded.measured["allowed_drop"])
    return path, model, mode, assignment, amax, allowed


def verify_onnx_input(onnx_path: str | os.PathLike[str], source: str | os.PathLike[str],
                      data: str | os.PathLike[str] | Mapping[str, Any], labels: Any = None,
                      plan: PrecisionPlan | str | os.PathLike[str] | Mapping[str, Any] | None = None,
                      providers: str | Sequence[str] = "auto") -> VerifyReport:
    """:func:`verify` for a model tuned from an .onnx file (``source``, with its ``data`` and ``labels``).

    There is no torch model. On a CUDA / TensorRT provider, or on the CPU for a deployment graph
    written for it (`--provider cpu`), the metric runs on the file itself and the parity compares
    its outputs with the emulation graph's on ONNX Runtime's CPU provider; otherwise, on a CPU
    provider, the metric runs on the emulation graph (rebuilt from ``source`` and the recorded plan)
    and there is nothing to compare it with.
    """
    from dataclasses import replace


    t0 = time.perf_counter()
    path, model, mode, assignment, amax, allowed = _read_exported(onnx_path, plan)
    om = OnnxModel.load(source, data, labels)
    graph = om.analysis.graph
    recorded_fp = model_meta(model).get(MODEL_FINGERPRINT)
    if recorded_fp and recorded_fp != graph.fingerprint():
        raise PlanError(f"{path} was not tuned from {Path(source).name} (fingerprint {recorded_fp} != "
                        f"{graph.fingerprint()})")
    notes: list[str] = []
    io = _io_format(model, notes)
    emulation = model if mode == "emulate" else set_io_format(om.build(assignment, amax or None, "emulate"), io)
    asked = runtime.parse_providers(providers)
    provider, why = runtime.probe_provider(asked)
    metric = om.metric()
    report = VerifyReport(onnx_path=str(path), model=graph.model_name, file_mode=mode, provider=provider,
                          provider_note=f"asked for {asked[0]}: {why}" if provider != asked[0] else "",
                          metric_graph="emulation", formats=_counts(assignment, graph), parity=None, metric=metric.name,
                          higher_is_better=metric.higher_is_better, allowed_drop=allowed, notes=notes,
                          parity_of="deployment graph vs emulation graph on the CPU")
    report.metric_fp32 = float(metric.measure(om.analysis.model))
    emulated = float(metric.measure(emulation))
    if _measures_the_file(model, provider):
        gpu = replace(om, providers=provider)
        report.metric_graph = "deployment" if mode == "deploy" else "emulation"
        report.metric_onnx = float(gpu.metric().measure(model))
        report.metric_torch_emulated = None
        report.notes.append(f"{metric.name} of the emulation graph on the CPU: {emulated:.6g}")
        import torch  # parity is computed on tensors, as for torch models

        batches = om.calibration()

        def outputs(runner: OnnxModel, m: onnx.ModelProto, feeds: list[dict[str, Any]]) -> list[list[torch.Tensor]]:
            return [[torch.from_numpy(a) for a in ys] for ys in runner.outputs(m, feeds)]

        want = outputs(om, emulation, batches)
        got = outputs(gpu, model, batches)
        nudged = outputs(om, emulation, [_nudged_feeds(b) for b in batches])
        measured = om.measured(want[0])  # every floating output, as the metric counts them
        narrow = narrowest_format(assignment, io)
        report.parity = worst_parity([(name, compare_outputs([g[o] for g in got], [w[o] for w in want], narrow,
                                                             kind == "logits", [n[o] for n in nudged]))
                                      for o, (name, kind) in enumerate(zip(measured.names, measured.kinds))])
    else:
        report.metric_onnx = emulated
        report.notes.append("parity: the model came as an .onnx file, so there is no torch emulation to compare "
                            "with; on a CUDA provider verify compares the deployment graph with the emulation graph")
    report.seconds = time.perf_counter() - t0
    return report


def _counts(assignment: Mapping[str, Precision], graph: OpGraph) -> dict[str, int]:
    """Layers of ``graph`` per format under ``assignment`` (layers it leaves out are fp32)."""
    counts: dict[str, int] = {}
    for name in graph.layer_names():
        f = assignment.get(name, Precision.FP32).value
        counts[f] = counts.get(f, 0) + 1
    return counts
