"""The fp32 reference tune judges plans against: evaluated FP32_TIMING_RUNS times, timed by the
median (the unit tune's cost is reported in), and an evaluate() that gives a different value each
time is a warning in the summary (issue: benchmarks, predictions that mean what they say)."""

from __future__ import annotations

from pathlib import Path

import pytest
from torch import nn

from autoprec import api
from autoprec.cli import main
from autoprec.core.metrics import Metric

MODEL = '''
import torch
from torch import nn

CALLS = []
METRIC = "score"
HIGHER_IS_BETTER = True


def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).eval()


def example_inputs():
    return (torch.randn(2, 8, generator=torch.Generator().manual_seed(1)),)


def calibration_data():
    g = torch.Generator().manual_seed(2)
    return [torch.randn(16, 8, generator=g) for _ in range(2)]


def evaluate(m):
    CALLS.append(1)  # a metric that drifts: 0.9, 0.901, 0.902, ...
    return 0.9 + 0.001 * (len(CALLS) - 1)
'''


def test_the_reference_is_timed_by_a_median_of_several_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def measure(m: nn.Module) -> float:
        calls.append(m)
        return 0.5

    metric = Metric("m", True, measure)
    ticks = iter([0.0, 5.0, 5.0, 6.0, 6.0, 8.0])  # evaluations of 5 s (a cold first call), 1 s and 2 s
    monkeypatch.setattr(api.time, "perf_counter", lambda: next(ticks))
    value, median, same = api._evaluate_fp32(metric, nn.Linear(2, 2))
    assert len(calls) == api.FP32_TIMING_RUNS == 3
    assert value == 0.5 and median == 2.0 and same is metric


def test_a_drifting_evaluate_is_a_warning_and_the_first_value_is_the_reference(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = tmp_path / "drifting.py"
    model.write_text(MODEL)
    assert main(["tune", str(model), "--budget", "1%", "--out", str(tmp_path / "o")]) == 0
    printed = " ".join(capsys.readouterr().out.split())
    assert "warning: the fp32 model's score changed between evaluations (0.9, 0.901, 0.902)" in printed
    assert "fp32 0.9 ->" in printed
    assert "changed between evaluations" in (tmp_path / "o" / "report.md").read_text()
