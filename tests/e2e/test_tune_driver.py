"""The tune driver over its protocol alone: a made-up model (no torch, no ONNX Runtime) is searched,
verified, compared with uniform plans and timed through nothing but the :class:`Tunable` methods,
and each optional capability that answers None is skipped."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Mapping

import onnx
import pytest

import autoprec.ort.runtime as runtime
from autoprec.core.formats import Precision
from autoprec.core.metrics import DropBudget
from autoprec.core.opgraph import OpGraph, OpNode, Policy
from autoprec.core.sensitivity import SensitivityProfile
from autoprec.metrics import Metric
from autoprec.tune import Tunable, TuneOutcome, run_tune

P = Precision
ROOT = Path(__file__).resolve().parents[2]
LOW = (P.BF16, P.FP16, P.FP8_E4M3, P.FP8_E5M2)
FP8 = frozenset({P.FP8_E4M3, P.FP8_E5M2})


def _chain(n: int = 3, dim: int = 4096) -> tuple[OpGraph, SensitivityProfile]:
    """x -> l0 -> relu -> l1 -> ... -> output, large enough that 16-bit and fp8 layers price faster."""
    nodes = [OpNode("x", "input", "", Policy.NONE, act_out_elems=dim * dim)]
    edges, prev = [], "x"
    for i in range(n):
        nodes += [OpNode(f"l{i}", "linear", f"blocks.{i}", Policy.ALWAYS, flops=2 * dim ** 3, weight_elems=dim * dim,
                         act_in_elems=dim * dim, act_out_elems=dim * dim),
                  OpNode(f"relu{i}", "relu", f"blocks.{i}", Policy.FOLLOW, act_in_elems=dim * dim,
                         act_out_elems=dim * dim)]
        edges += [(prev, f"l{i}"), (f"l{i}", f"relu{i}")]
        prev = f"relu{i}"
    nodes.append(OpNode("output", "output", "", Policy.NONE))
    edges.append((prev, "output"))
    graph = OpGraph(nodes, edges, "chain")
    errors = {f"l{i}": {P.BF16: 2e-4, P.FP16: 1e-4, P.FP8_E4M3: 1e-3, P.FP8_E5M2: 2e-3} for i in range(n)}
    return graph, SensitivityProfile("chain", graph.fingerprint(), "exact", "kl", (P.FP32, *LOW), errors)


class FakeModel:
    """A :class:`Tunable` whose metric is 1 less a fixed loss per layer in each format: ``loss`` on
    its own emulation, ``onnx_loss`` on ONNX Runtime (None: it has no separate ONNX run), and which
    is timed on ``feeds`` when given."""

    name, op_types, reference, eval_seconds, export_seconds = "chain", None, 1.0, 0.01, 0.0

    def __init__(self, loss: Mapping[Precision, float], onnx_loss: Mapping[Precision, float] | None = None,
                 feeds: tuple[dict[str, Any], int] | None = None) -> None:
        self.graph, self.profile = _chain()
        self.metric = Metric("accuracy", True, lambda value: value)
        self.loss, self.onnx_loss, self.feeds = loss, onnx_loss, feeds
        self.measured: list[dict[str, Precision]] = []
        self.on_onnx: list[dict[str, Precision]] = []
        self.built: list[tuple[str, str | None]] = []

    @staticmethod
    def _value(assignment: Mapping[str, Precision], loss: Mapping[Precision, float]) -> float:
        return 1.0 - sum(loss.get(f, 0.0) for f in assignment.values())

    def measure(self, assignment: Mapping[str, Precision]) -> float:
        self.measured.append(dict(assignment))
        return self.metric.measure(self._value(assignment, self.loss))

    def measure_on_onnx(self, assignment: Mapping[str, Precision]) -> float | None:
        if self.onnx_loss is None:
            return None
        self.on_onnx.append(dict(assignment))
        return self._value(assignment, self.onnx_loss)

    def timing_feeds(self, batch: int) -> tuple[dict[str, Any], int] | None:
        return self.feeds

    def onnx_model(self, assignment: Mapping[str, Precision], mode: str = "deploy",
                   provider: str | None = None) -> onnx.ModelProto:
        """A stand-in graph that names its plan, so a fake timing can price it."""
        self.built.append((mode, provider))
        return onnx.ModelProto(producer_name=",".join(sorted({f.value for f in assignment.values()})))


def _run(model: Tunable, budget: str = "0.5%", provider: str | None = None) -> TuneOutcome:
    return run_tune(model, DropBudget.parse(budget), LOW, target="h100", objective="latency", strategy="milp",
                    keep=(), force=(), cost_model=None, batch=1024, provider=provider, started=time.perf_counter())


def test_the_driver_imports_no_torch() -> None:
    code = "import sys, autoprec.tune\nassert 'torch' not in sys.modules, 'torch'\n"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_a_plan_is_measured_and_beats_the_uniform_plans_within_budget() -> None:
    model = FakeModel({P.BF16: 1e-3, P.FP16: 1e-3, P.FP8_E4M3: 0.02, P.FP8_E5M2: 0.02})
    out = _run(model)
    m = out.plan.measured
    assert m["drop"] <= m["allowed_drop"] == pytest.approx(0.005) and m["metric_fp32"] == 1.0
    assert not FP8 & set(out.plan.assignment.values()) and "metric_onnx" not in m
    assert m["metric_tuned"] == model._value(out.plan.assignment, model.loss)
    assert any(u.within_budget for u in out.uniforms) and out.summary.best_uniform is not None
    assert out.plan.speedup >= out.summary.best_uniform.speedup
    assert out.summary.evaluations == len({tuple(sorted(a.items())) for a in model.measured}) + 1  # memoised
    assert out.summary.onnx_checks == 0 and out.summary.timing is None and out.pareto


def test_only_the_plan_the_search_settles_on_runs_on_onnx_runtime() -> None:
    """Where the model's emulation and ONNX Runtime agree, the search decides on the first alone and
    ONNX Runtime runs one plan: the one it returns."""
    loss = {P.BF16: 1e-3, P.FP16: 1e-3, P.FP8_E4M3: 0.02, P.FP8_E5M2: 0.02}
    model = FakeModel(loss, onnx_loss=loss)
    out = _run(model)
    assert len(model.measured) > 1 and model.on_onnx == [out.plan.assignment]
    assert out.summary.onnx_checks == 1 and out.plan.measured["metric_onnx"] == out.plan.measured["metric_tuned"]
    assert not out.plan.notes


def test_onnx_runtime_s_drop_counts_where_the_model_has_one() -> None:
    """fp8 is free on the model's own emulation and costly on ONNX Runtime: the plan the search
    settles on fails there, so it searches again taking the worse of the two (asking ONNX Runtime
    only about plans that round and pass the first measure), says so, and reports ONNX Runtime's
    figure."""
    free = {P.BF16: 1e-3, P.FP16: 1e-3}
    loose = _run(FakeModel(free))
    assert set(loose.plan.assignment.values()) <= FP8  # all-fp8 passes on the emulation alone
    model = FakeModel(free, onnx_loss={**free, P.FP8_E4M3: 0.02, P.FP8_E5M2: 0.02})
    out = _run(model)
    m = out.plan.measured
    assert not FP8 & set(out.plan.assignment.values()) and m["drop"] <= m["allowed_drop"]
    assert m["metric_onnx"] == model._value(out.plan.assignment, model.onnx_loss) == out.summary.metric_onnx
    assert m["onnx_checks"] == out.summary.onnx_checks == len({tuple(sorted(a.items())) for a in model.on_onnx})
    assert model.on_onnx and all(set(a.values()) != {P.FP32} for a in model.on_onnx)
    assert any("ONNX Runtime's run of the fp8" in n and "ran again" in n for n in out.plan.notes)


def test_timing_uses_the_deployment_graphs_and_is_skipped_without_feeds(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def latencies_ms(models: list[bytes], feeds: list[dict[str, Any]], provider: str = "cuda",
                     **kw: Any) -> list[float]:
        calls.append((models, feeds, kw))
        return [0.1 if onnx.load_from_string(m).producer_name == "fp32" else 1.0 for m in models]

    monkeypatch.setattr(runtime, "probe_provider", lambda providers="auto": ("cuda", ""))
    monkeypatch.setattr(runtime, "latencies_ms", latencies_ms)
    loss = {P.BF16: 1e-3, P.FP16: 1e-3, P.FP8_E4M3: 0.02, P.FP8_E5M2: 0.02}
    untimed = FakeModel(loss)
    assert _run(untimed, provider="cuda").summary.timing is None and not calls and not untimed.built
    model = FakeModel(loss, feeds=({"x": "batch"}, 64))
    out = _run(model, provider="cuda")
    (models, feeds, kw), = calls
    assert kw["resident"] and len(models) >= 2 and feeds == [{"x": "batch"}] * len(models)
    assert set(model.built) == {("deploy", "cuda")}
    t = out.summary.timing
    assert t is not None and t.batch == 64 and t.chosen == "all-fp32" and out.plan.strategy.endswith("+timed")
    assert set(out.plan.assignment.values()) == {P.FP32} and out.plan.measured["drop"] == 0.0


class _EmbeddingModel(FakeModel):
    """The chain behind an embedding lookup that loses 10% of the metric in any format but fp32."""

    def __init__(self) -> None:
        super().__init__({P.BF16: 1e-3, P.FP16: 5e-4, P.FP8_E4M3: 0.02, P.FP8_E5M2: 0.02})
        chain, _ = _chain()
        dim = 4096
        emb = OpNode("emb", "embedding", "emb", Policy.ALWAYS, weight_elems=dim * dim, act_out_elems=dim * dim)
        nodes = [chain.nodes[0], emb, *chain.nodes[1:]]
        edges = [("x", "emb"), ("emb", "l0"), *[e for e in chain.edges if e[0] != "x"]]
        self.graph = OpGraph(nodes, edges, "chain")
        errors = {n: {P.BF16: 2e-4, P.FP16: 1e-4, P.FP8_E4M3: 1e-3, P.FP8_E5M2: 2e-3} for n in self.graph.layer_names()}
        self.profile = SensitivityProfile("chain", self.graph.fingerprint(), "exact", "kl", (P.FP32, *LOW), errors)

    @staticmethod
    def _value(assignment: Mapping[str, Precision], loss: Mapping[Precision, float]) -> float:
        lookup = 0.0 if assignment.get("emb", P.FP32) is P.FP32 else 0.1
        return 1.0 - lookup - sum(loss.get(f, 0.0) for n, f in assignment.items() if n != "emb")


def test_torch_amp_s_lists_are_a_simple_plan_and_unmeasured_ones_say_so() -> None:
    """Uniform plans lose 10% at the lookup; torch.amp's (products 16-bit, the lookup fp32) holds the
    budget. Simple plans are measured fastest first until one holds: the slower ones are reported as
    not measured, never as over budget."""
    model = _EmbeddingModel()
    out = _run(model, "1%")
    by_name = {u.name: u for u in out.uniforms}
    assert {"all-bf16", "all-fp16", "all-fp8_e4m3", "all-fp8_e5m2", "torch.amp fp16", "torch.amp bf16"} == set(by_name)
    amp = by_name["torch.amp bf16"]  # priced as fast as fp16's: the first of the two is measured
    assert amp.measured_drop == pytest.approx(3 * 1e-3) and amp.verdict == "yes"
    assert out.summary.best_uniform is amp and "best simple plan within budget: torch.amp bf16" in \
        " ".join(out.summary.lines())
    faster = [u for u in out.uniforms if u.speedup > amp.speedup]
    assert faster and all(u.verdict == "no" and u.measured_drop >= 0.1 for u in faster)
    slower = [u for u in out.uniforms if u.speedup <= amp.speedup and u is not amp]
    assert slower and all(u.measured_drop is None and u.verdict == "not measured" for u in slower)
    assert out.plan.assignment["emb"] is P.FP32 and out.plan.speedup >= amp.speedup
