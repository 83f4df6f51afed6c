"""What `autoprec tune` writes for people: report.md and two PNG plots.

Pure presentation over plain data (plan, profile, op graph, Pareto points): no torch, no search.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

from autoprec.core.coverage import Coverage
from autoprec.core.formats import Precision
from autoprec.core.io import atomic_write_bytes, atomic_write_text
from autoprec.core.metrics import metric_drop
from autoprec.core.opgraph import OpGraph
from autoprec.core.plan import PrecisionPlan
from autoprec.search.pareto import ParetoPoint
from autoprec.core.sensitivity import SensitivityProfile


@dataclass(frozen=True)
class UniformResult:
    """A simple plan a user could have written by hand, and its measured metric drop: a uniform
    plan (every layer in ``format``, where allowed) or, with ``label``, another fixed recipe in that
    format (torch.amp's op lists: ``autoprec.search.problem.SearchProblem.amp_assignment``)."""

    format: Precision
    speedup: float
    memory_ratio: float
    predicted_error: float
    measured_drop: float | None  # None when not measured
    within_budget: bool
    label: str = ""  # "" for the uniform plan

    @property
    def name(self) -> str:
        return self.label or f"all-{self.format}"

    @property
    def verdict(self) -> str:
        """Whether it held the budget, as measured: yes, no, or not measured (a faster simple plan
        already held it)."""
        return "not measured" if self.measured_drop is None else "yes" if self.within_budget else "no"


@dataclass(frozen=True)
class LatencyCheck:
    """The measured latency of candidate plans' deployment graphs on the provider they were tuned for,
    where it really runs (a GPU): the check of the cost model's choice (:func:`autoprec.api.tune`)."""

    provider: str
    batch: int  # samples per run
    ms: tuple[tuple[str, float], ...]  # (candidate, median ms with inputs and outputs on the GPU)
    chosen: str  # the candidate the plan is: "tuned" unless a measured one was faster

    def line(self) -> str:
        times = dict(self.ms)
        parts = ", ".join(f"{name} {t:.3g} ms" for name, t in self.ms)
        verdict = "kept the searched plan" if self.chosen == "tuned" else f"adopted {self.chosen}, the fastest"
        speed = ""
        if "all-fp32" in times:
            speed = f"; the plan runs at {times['all-fp32'] / times[self.chosen]:.2f}x all-fp32's speed"
        return f"measured on {self.provider} at batch {self.batch} (GPU-resident): {parts}; {verdict}{speed}"


@dataclass(frozen=True)
class TuneSummary:
    """The figures the CLI prints and the report opens with."""

    model: str
    metric: str
    higher_is_better: bool
    metric_fp32: float
    metric_tuned: float
    budget_text: str
    allowed_drop: float
    speedup: float
    memory_ratio: float  # plan memory / fp32 memory
    best_uniform: UniformResult | None
    evaluations: int
    seconds: float
    eval_passes: float  # tune wall time in units of one fp32 evaluation
    timing: LatencyCheck | None = None  # measured latencies, where the provider runs here
    metric_onnx: float | None = None  # the tuned plan's emulation graph on ONNX Runtime (torch models)
    onnx_checks: int = 0  # plans also measured on ONNX Runtime
    export_seconds: float = 0.0  # of ``seconds``: the fp32 ONNX export (which writing the tuned model needs)
    coverage: Coverage | None = None  # what share of the model the plan can change, and what stays fp32
    warnings: tuple[str, ...] = ()  # what makes the figures above mean less than they say

    @property
    def drop(self) -> float:
        """The tuned plan's drop: the worse of the torch emulation's and ONNX Runtime's."""
        return max(metric_drop(self.metric_fp32, v, higher_is_better=self.higher_is_better)
                   for v in (self.metric_tuned, self.metric_onnx) if v is not None)

    def lines(self) -> list[str]:
        arrow = "higher is better" if self.higher_is_better else "lower is better"
        onnx = "" if self.metric_onnx is None else f" in torch, {self.metric_onnx:.6g} on ONNX Runtime (emulation graph)"
        out = [
            f"{self.metric} ({arrow}): fp32 {self.metric_fp32:.6g} -> tuned {self.metric_tuned:.6g}{onnx} "
            f"(drop {self.drop:.4g}; budget {self.budget_text} = {self.allowed_drop:.4g})",
            f"estimated speedup {self.speedup:.2f}x and memory {100 * self.memory_ratio:.0f}% of all-fp32",
        ]
        if self.coverage is not None:
            out.append(self.coverage.line())
        out += [f"warning: {w}" for w in self.warnings]
        u = self.best_uniform
        if u is not None:
            out.append(f"best simple plan within budget: {u.name} at {u.speedup:.2f}x "
                       f"(measured drop {u.measured_drop:.4g}); tuned plan is {self.speedup / u.speedup:.2f}x that")
        else:
            out.append("no simple plan (uniform, torch.amp's lists) meets the budget")
        if self.timing is not None:
            out.append(self.timing.line())
        checks = f" ({self.onnx_checks} also on ONNX Runtime)" if self.onnx_checks else ""
        export = f", {self.export_seconds:.1f} s of it the ONNX export" if self.export_seconds else ""
        out.append(f"{self.evaluations} full evaluations{checks}; tuning took {self.seconds:.1f} s "
                   f"= {self.eval_passes:.1f} fp32 evaluations{export}")
        return out


def _e(x: float) -> str:
    return "inf" if not math.isfinite(x) else f"{x:.2e}"


def write_report(out_dir: Path, plan: PrecisionPlan, profile: SensitivityProfile, graph: OpGraph,
                 summary: TuneSummary, uniforms: Sequence[UniformResult], pareto: Sequence[ParetoPoint],
                 fixed: Mapping[str, str] | None = None, notes: Sequence[str] = ()) -> list[Path]:
    """Write report.md, sensitivity.png and pareto.png into ``out_dir``; return their paths.

    ``fixed``: ops that stay fp32 whatever the plan, with the reason (the ONNX analyser's);
    ``notes``: what loading the model changed (e.g. the ONNX analyser's opset upgrade)."""
    heat = plot_sensitivity(out_dir / "sensitivity.png", profile, graph)
    front = plot_pareto(out_dir / "pareto.png", pareto, plan, uniforms)
    lines = [f"# autoprec tune: {plan.model_name}", ""]
    lines += [f"- {s}" for s in summary.lines()]
    lines += [f"- target {plan.target}, objective {plan.objective}, strategy {plan.strategy}, "
              f"profile {profile.mode} ({profile.measure})", ""]
    if summary.coverage is not None and summary.coverage.uncovered:
        lines += ["## What stays fp32", "", "Whatever the plan, these ops run in fp32 (the estimate prices them so):",
                  "", *summary.coverage.table(), ""]
    lines += ["## Simple plans", "", "Uniform plans and torch.amp's op lists (compute layers in a 16-bit format, "
              "embedding lookups fp32), measured fastest first until one holds the budget:", "",
              "| plan | est. speedup | memory | predicted error | measured drop | within budget |",
              "|---|---|---|---|---|---|"]
    for u in uniforms:
        md = "-" if u.measured_drop is None else f"{u.measured_drop:.4g}"
        lines.append(f"| {u.name} | {u.speedup:.2f}x | {100 * u.memory_ratio:.0f}% | {_e(u.predicted_error)} "
                     f"| {md} | {u.verdict} |")
    lines += ["", "## Verification steps", "", "| error budget | predicted error | measured drop | est. cost | accepted |",
              "|---|---|---|---|---|"]
    for s in plan.steps:
        md = "(seen before)" if s.measured_drop is None else f"{s.measured_drop:.4g}"
        lines.append(f"| {_e(s.error_budget)} | {_e(s.predicted_error)} | {md} | {s.cost:.3g} | {s.accepted} |")
    lines += ["", "## Layers", "", "| layer | scope | kind | FLOPs | format | predicted error | est. cost (s) | reason |",
              "|---|---|---|---|---|---|---|---|"]
    for d in plan.decisions:
        op = graph[d.layer]
        lines.append(f"| {d.layer} | {d.scope} | {d.kind} | {op.flops:,} | {d.format} | {_e(d.predicted_error)} "
                     f"| {d.cost:.3g} | {d.reason} |")
    flagged = [(n, f) for n, fl in profile.flags.items() for f in fl]
    if flagged:
        lines += ["", "## Profile flags", ""] + [f"- `{n}`: {f}" for n, f in flagged]
    if notes:
        lines += ["", "## Model preprocessing", ""] + [f"- {n}" for n in notes]
    if fixed:
        lines += ["", "## Ops kept fp32 whatever the plan", "", "| op | reason |", "|---|---|"]
        lines += [f"| {n} | {why} |" for n, why in sorted(fixed.items())]
    lines += ["", f"![sensitivity]({heat.name})", "", f"![pareto]({front.name})", ""]
    report = atomic_write_text(out_dir / "report.md", "\n".join(lines))
    return [report, heat, front]


def _png(path: Path, fig: object) -> Path:
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")  # type: ignore[attr-defined]
    return atomic_write_bytes(path, buf.getvalue())


def plot_sensitivity(path: Path, profile: SensitivityProfile, graph: OpGraph) -> Path:
    """Heatmap of log10 error per layer (rows, execution order) and format (columns)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    layers = [n for n in graph.layer_names() if n in profile.errors]
    fmts = list(profile.formats)
    # NaN: a format the profile has no error for (one saved before embedding tables had fp8), left blank
    vals = np.array([[profile.errors[n].get(f, np.nan) for f in fmts] for n in layers], dtype=float)
    finite = vals[np.isfinite(vals) & (vals > 0)]
    floor = finite.min() if finite.size else 1e-12
    shown = np.log10(np.where(np.isfinite(vals), np.maximum(vals, floor), np.nan))
    fig, ax = plt.subplots(figsize=(2.2 + 1.1 * len(fmts), 1.2 + 0.28 * len(layers)))
    im = ax.imshow(shown, aspect="auto", cmap="viridis")
    ax.set_xticks(range(len(fmts)), [str(f) for f in fmts])
    ax.set_yticks(range(len(layers)), [f"{n} ({graph[n].kind})" for n in layers], fontsize=7)
    for i, j in zip(*np.where(np.isinf(vals))):
        ax.text(j, i, "inf", ha="center", va="center", color="red", fontsize=7)
    fig.colorbar(im, ax=ax, label=f"log10 {profile.measure} of the output")
    ax.set_title(f"{profile.model_name}: per-layer sensitivity ({profile.mode})")
    out = _png(path, fig)
    plt.close(fig)
    return out


def plot_pareto(path: Path, points: Sequence[ParetoPoint], plan: PrecisionPlan,
                uniforms: Sequence[UniformResult]) -> Path:
    """Predicted error against estimated speedup for a budget sweep, with the chosen plan and the
    uniform plans marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    pts = [p for p in points if p.predicted_error > 0]
    if pts:
        ax.plot([p.speedup for p in pts], [p.predicted_error for p in pts], "o-", ms=3, label="budget sweep")
    for u in uniforms:
        if u.predicted_error > 0 and math.isfinite(u.predicted_error):
            ax.scatter([u.speedup], [u.predicted_error], marker="s", color="grey")
            ax.annotate(u.name, (u.speedup, u.predicted_error), fontsize=7)
    if plan.predicted_error > 0:
        ax.scatter([plan.speedup], [plan.predicted_error], marker="*", s=160, color="red", label="chosen", zorder=5)
    ax.set_xlabel(f"estimated speedup on {plan.target} vs fp32")
    ax.set_ylabel("predicted error (sum of per-layer errors)")
    ax.set_title(f"{plan.model_name}: Pareto front")
    labelled = ax.get_legend_handles_labels()[0]
    if labelled or ax.collections:
        ax.set_yscale("log")
        if labelled:
            ax.legend(fontsize=8)
    else:  # a log axis cannot show error 0: say why the plot is empty instead
        ax.text(0.5, 0.5, "no plan rounds anywhere (predicted error 0 everywhere):\nnothing to plot",
                transform=ax.transAxes, ha="center", va="center", fontsize=9)
    out = _png(path, fig)
    plt.close(fig)
    return out
