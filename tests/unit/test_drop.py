"""Metric drops: one definition (autoprec.core.metrics.metric_drop), one NaN/inf rule, used everywhere.

The callers (torch metric, verify report, tune summary) are imported inside their tests, so the
torch-free definition is tested on its own, as it is meant to be importable.
"""

from __future__ import annotations

import math
import subprocess
import sys

import pytest

from autoprec.core.errors import UsageError
from autoprec.core.metrics import DropBudget, metric_drop

NON_NUMBERS = [math.nan, math.inf, -math.inf]


def test_higher_is_better_drop_is_reference_minus_value() -> None:
    assert metric_drop(0.9, 0.85, higher_is_better=True) == pytest.approx(0.05)
    assert metric_drop(0.9, 0.95, higher_is_better=True) == pytest.approx(-0.05)  # better: negative
    assert metric_drop(0.9, 0.9, higher_is_better=True) == 0.0


def test_lower_is_better_drop_is_value_minus_reference() -> None:
    assert metric_drop(0.1, 0.15, higher_is_better=False) == pytest.approx(0.05)
    assert metric_drop(0.1, 0.05, higher_is_better=False) == pytest.approx(-0.05)
    assert metric_drop(0.0, 0.01, higher_is_better=False) == pytest.approx(0.01)


@pytest.mark.parametrize("higher_is_better", [True, False])
@pytest.mark.parametrize("value", NON_NUMBERS)
def test_a_nan_or_inf_value_is_an_infinite_drop(value: float, higher_is_better: bool) -> None:
    """Even +inf accuracy or -inf error, which arithmetic would call an infinite gain."""
    d = metric_drop(0.9, value, higher_is_better=higher_is_better)
    assert d == math.inf and not d <= 1e300


@pytest.mark.parametrize("higher_is_better", [True, False])
@pytest.mark.parametrize("reference", NON_NUMBERS)
def test_a_nan_or_inf_reference_is_an_infinite_drop(reference: float, higher_is_better: bool) -> None:
    assert metric_drop(reference, 0.5, higher_is_better=higher_is_better) == math.inf


def test_a_drop_is_never_nan_so_max_is_order_free() -> None:
    drops = [metric_drop(1.0, v, higher_is_better=True) for v in (0.99, math.nan)]
    assert max(drops) == max(reversed(drops)) == math.inf


@pytest.mark.parametrize("higher_is_better", [True, False])
@pytest.mark.parametrize("value", [0.5, 0.91, math.nan, math.inf, -math.inf])
def test_metric_verify_report_and_tune_summary_agree(value: float, higher_is_better: bool) -> None:
    """The torch-side metric, the verify report and the tune summary all give metric_drop's answer."""
    from autoprec.deploy.verify import VerifyReport
    from autoprec.metrics import Metric
    from autoprec.report import TuneSummary

    reference = 0.9
    expected = metric_drop(reference, value, higher_is_better=higher_is_better)
    metric = Metric("m", higher_is_better, lambda _module: value)
    report = VerifyReport(onnx_path="m.onnx", model="m", file_mode="emulate", provider="cpu", provider_note="",
                          metric_graph="emulation", formats={}, parity=None, metric="m",
                          higher_is_better=higher_is_better, metric_onnx=value, metric_fp32=reference)
    summary = TuneSummary(model="m", metric="m", higher_is_better=higher_is_better, metric_fp32=reference,
                          metric_tuned=reference, budget_text="1%", allowed_drop=0.009, speedup=1.0,
                          memory_ratio=1.0, best_uniform=None, evaluations=1, seconds=0.0, eval_passes=0.0,
                          metric_onnx=value)
    assert metric.drop(reference, value) == expected
    assert report.drop == expected
    assert summary.drop == max(expected, 0.0)  # the worse of the torch emulation's (0) and ONNX Runtime's


def test_verify_report_drop_is_none_until_both_are_measured() -> None:
    from autoprec.deploy.verify import VerifyReport

    report = VerifyReport(onnx_path="m.onnx", model="m", file_mode="emulate", provider="cpu", provider_note="",
                          metric_graph="emulation", formats={}, parity=None, metric_onnx=0.5)
    assert report.drop is None and report.within_budget is None


def test_a_nan_metric_on_onnx_runtime_is_over_budget() -> None:
    from autoprec.deploy.verify import VerifyReport

    report = VerifyReport(onnx_path="m.onnx", model="m", file_mode="emulate", provider="cpu", provider_note="",
                          metric_graph="emulation", formats={}, parity=None, metric="m", metric_onnx=math.nan,
                          metric_fp32=0.9, allowed_drop=0.5)
    assert report.within_budget is False and not report.ok


def test_drop_budget_parses_and_scales() -> None:
    rel, absolute = DropBudget.parse("0.5%"), DropBudget.parse("0.005")
    assert rel == DropBudget(0.005, True) and absolute == DropBudget(0.005, False)
    assert rel.allowed_drop(0.8) == pytest.approx(0.004) and rel.allowed_drop(0.0) == pytest.approx(0.005)
    assert absolute.allowed_drop(0.8) == 0.005 and str(rel) == "0.5%" and str(absolute) == "0.005"
    for bad in ("abc", "-1", "nan", "inf%"):
        with pytest.raises(UsageError, match="bad budget"):
            DropBudget.parse(bad)


def test_core_metrics_imports_no_torch() -> None:
    code = "import autoprec.core.metrics, sys; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
