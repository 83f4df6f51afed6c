"""tune's timing check on a GPU: the deployment graphs of the searched plan, the fastest uniform plan
within budget and all-fp32 are timed where the provider runs, and the fastest is adopted. ORT's
timing is replaced here by a fake (the machines that run the tests have no GPU); tests/gpu time
for real."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

import autoprec.ort.runtime as runtime
from autoprec.api import SPEED_MARGIN, tune
from autoprec.core.formats import Precision

ROOT = Path(__file__).resolve().parents[2]
CNN = str(ROOT / "models" / "digits_cnn.py")


class FakeGpu:
    """Stands in for a CUDA provider: times each candidate from ``ms`` by the formats of its layers."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, ms: dict[str, float]) -> None:
        self.ms, self.calls = ms, []
        monkeypatch.setattr(runtime, "probe_provider", lambda providers="auto": ("cuda", ""))
        monkeypatch.setattr(runtime, "latencies_ms", self.latencies_ms)

    def latencies_ms(self, models, feeds, provider="cuda", **kw) -> list[float]:
        self.calls.append((models, feeds, provider, kw))
        out = []
        for m in models:
            model = onnx.load_from_string(m)
            types = {t.data_type for t in model.graph.initializer}
            out.append(self.ms["fp16"] if onnx.TensorProto.FLOAT16 in types else self.ms["fp32"])
        return out


def test_a_faster_measured_fp32_graph_replaces_the_searched_plan(monkeypatch: pytest.MonkeyPatch) -> None:
    gpu = FakeGpu(monkeypatch, {"fp16": 0.30, "fp32": 0.20})
    r = tune(CNN, "0.5%", provider="cuda")
    plan, timing = r.plan, r.summary.timing
    assert set(plan.assignment.values()) == {Precision.FP32}
    assert plan.strategy.endswith("+timed") and timing is not None and timing.chosen == "all-fp32"
    assert all(d.reason.startswith("timed on cuda at batch 1024: all-fp32 ran in 0.2 ms") for d in plan.decisions)
    assert plan.measured["latency_chosen"] == "all-fp32" and plan.measured["latency_ms"]["all-fp32"] == 0.20
    assert plan.measured["drop"] == 0.0  # the adopted plan is evaluated like any other
    assert "adopted all-fp32" in r.summary.lines()[-2]
    # one timing call: GPU-resident, each candidate a deployment graph, all fed `batch` samples
    (models, feeds, provider, kw), = gpu.calls
    assert provider == "cuda" and kw["resident"] is True and len(models) == len(feeds) >= 2
    x = next(iter(feeds[0].values()))
    assert isinstance(x, np.ndarray) and x.shape[0] == 1024
    for m in models:
        onnx.checker.check_model(onnx.load_from_string(m), full_check=True)
    assert r.onnx_model("deploy").SerializeToString() in models  # the file tune writes is a graph it timed


def test_the_searched_plan_stays_when_it_is_fastest_or_within_the_noise(monkeypatch: pytest.MonkeyPatch) -> None:
    for fp32_ms in (0.40, 0.30 * (1 - SPEED_MARGIN / 2)):
        FakeGpu(monkeypatch, {"fp16": 0.30, "fp32": fp32_ms})
        r = tune(CNN, "0.5%", provider="cuda")
        assert r.summary.timing is not None and r.summary.timing.chosen == "tuned"
        assert Precision.FP16 in set(r.plan.assignment.values()) and "+timed" not in r.plan.strategy


def test_nothing_is_timed_without_the_provider_or_when_asked_not_to(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    monkeypatch.setattr(runtime, "latencies_ms", lambda *a, **k: calls.append(a) or [])
    if not runtime.cuda_available():
        assert tune(CNN, "0.5%", provider="cuda").summary.timing is None
    FakeGpu(monkeypatch, {"fp16": 0.30, "fp32": 0.20})
    monkeypatch.setattr(runtime, "latencies_ms", lambda *a, **k: calls.append(a) or [])
    assert tune(CNN, "0.5%", provider="cuda", timing=False).summary.timing is None
    assert tune(CNN, "0.5%", provider="cpu").summary.timing is None  # only cuda is timed
    assert not calls
