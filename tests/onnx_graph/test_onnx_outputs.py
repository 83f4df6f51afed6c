"""ONNX models with several floating outputs: every one counts in the profile, the fidelity metric,
tune and verify, as for torch models (tests/integration/test_outputs.py)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto
from onnx_graph_models import init, make, vi

from autoprec.api import tune_onnx
from autoprec.core.formats import Precision
from autoprec.deploy.verify import verify_onnx_input
from autoprec.onnx.model import OnnxModel, profile_onnx
from autoprec.torch.passes import act_amax_from_profile

BF16, FP16, E4M3 = Precision.BF16, Precision.FP16, Precision.FP8_E4M3


def two_heads() -> onnx.ModelProto:
    """x[N, 32] -> cls (10 logits) and, on a second path, reg1 -> Relu -> reg2 -> Sub 1000 (one value: a [N, 1] output, not logits).
    reg2 writes values near 1000 that the graph then subtracts: rounded to 16 bits they lose the
    small difference, which only the second output shows."""
    rng = np.random.default_rng(0)
    f32 = np.float32
    nodes = [
        onnx.helper.make_node("MatMul", ["x", "w_cls"], ["cls_mm"], name="cls"),
        onnx.helper.make_node("Add", ["cls_mm", "b_cls"], ["logits"], name="cls_bias"),
        onnx.helper.make_node("MatMul", ["x", "w_reg1"], ["h"], name="reg1"),
        onnx.helper.make_node("Relu", ["h"], ["r"], name="relu"),
        onnx.helper.make_node("MatMul", ["r", "w_reg2"], ["reg_mm"], name="reg2"),
        onnx.helper.make_node("Add", ["reg_mm", "b_reg2"], ["shifted"], name="reg2_bias"),
        onnx.helper.make_node("Sub", ["shifted", "thousand"], ["values"], name="unshift"),
    ]
    inits = [init("w_cls", (rng.standard_normal((32, 10)) / 6).astype(f32)), init("b_cls", np.zeros(10, f32)),
             init("w_reg1", (rng.standard_normal((32, 48)) / 6).astype(f32)),
             init("w_reg2", (rng.standard_normal((48, 1)) / 7).astype(f32)),
             init("b_reg2", np.full(1, 1000.0, f32)), init("thousand", np.array(1000.0, f32))]
    return make(nodes, [vi("x", ["N", 32])], [vi("logits", ["N", 10]), vi("values", ["N", 1])], inits)


def _data(n: int = 96) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(1).standard_normal((n, 32)).astype(np.float32)}


def _rel_l2(got: list[np.ndarray], ref: list[np.ndarray]) -> float:
    num = sum(float(np.square(g.astype(np.float64) - r).sum()) for g, r in zip(got, ref))
    return math.sqrt(num / sum(float(np.square(r.astype(np.float64)).sum()) for r in ref))


def test_every_output_counts_in_the_profile_and_the_metric() -> None:
    om = OnnxModel.load(two_heads(), _data())
    assert om.output_names == ("logits", "values")
    prof = profile_onnx(om, (BF16, FP16, E4M3))
    assert prof.measure == "kl+rel_mse"
    # reg2 feeds only the second output: a profile of the first output alone saw no error at all
    assert all(prof.errors["reg2"][f] > 1e-6 for f in prof.formats), prof.errors["reg2"]
    assert prof.errors["reg2"][BF16] > 100 * prof.errors["cls"][BF16]
    metric = om.metric()
    assert (metric.name, metric.higher_is_better) == ("worst_output_fidelity_loss", False)
    assert metric.measure(om.analysis.model) == 0.0
    # a plan's fidelity is the worst output's loss: reg2 in bf16 leaves every top-1 as it was and
    # moves the second output by its relative L2 error
    plan = om.build({"reg2": BF16})
    ref = [ys[1] for ys in om.outputs(om.analysis.model)]
    got = om.outputs(plan)
    assert all(np.array_equal(ys[0], r[0]) for ys, r in zip(got, om.outputs(om.analysis.model)))
    loss = metric.measure(plan)
    assert loss > 1e-3 and loss == pytest.approx(_rel_l2([ys[1] for ys in got], ref), rel=1e-6)


def test_a_profile_trial_is_the_sum_of_its_outputs_errors() -> None:
    """reg1's trial, re-measured by hand from the emulation graph it builds: the KL of the logits
    (untouched: 0) plus the relative squared error of the values."""
    om = OnnxModel.load(two_heads(), _data())
    prof = profile_onnx(om, (FP16,))
    batches = om.calibration()
    ref = om.outputs(om.analysis.model, batches)
    got = om.outputs(om.build({"reg1": FP16}), batches)
    assert all(np.array_equal(g[0], r[0]) for g, r in zip(got, ref))
    rel_mse = _rel_l2([g[1] for g in got], [r[1] for r in ref]) ** 2
    assert prof.errors["reg1"][FP16] == pytest.approx(rel_mse, rel=1e-6)


def test_tune_keeps_the_layer_only_the_second_output_needs_in_fp32() -> None:
    r = tune_onnx(two_heads(), _data(), fidelity_budget="1%", timing=False)
    m = r.plan.measured
    assert m["metric"] == "worst_output_fidelity_loss" and m["drop"] <= m["allowed_drop"]
    assert r.plan.assignment["reg2"] is Precision.FP32, r.plan.assignment
    assert r.metric.measure(r.onnx_model("emulate")) == m["metric_tuned"]


def test_verify_holds_the_deployment_graph_to_every_output(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """verify's GPU branch (faked on the CPU provider, as in test_onnx_input.py): the parity covers
    both outputs and names the one furthest from its tolerance (the file is written for the CPU
    provider's kernels, so that it runs here: ops without a bf16 kernel compute in fp32 between casts)."""
    import autoprec.ort.runtime

    om = OnnxModel.load(two_heads(), _data())
    prof = profile_onnx(om, (E4M3,))
    plan = {"cls": E4M3, "reg1": E4M3}
    deployed = tmp_path / "deployed.onnx"
    onnx.save(om.build(plan, act_amax_from_profile(prof), "deploy", provider="cpu"), str(deployed))
    source = tmp_path / "two_heads.onnx"
    onnx.save(two_heads(), str(source))
    monkeypatch.setattr(autoprec.ort.runtime, "probe_provider", lambda providers: ("cuda", ""))
    report = verify_onnx_input(deployed, source, _data(), providers="cuda")
    assert report.metric == "worst_output_fidelity_loss"
    assert report.parity is not None and report.parity.ok, report.parity
    assert report.parity.output in ("logits", "values")


def test_an_integer_output_beside_the_floating_one_does_not_count() -> None:
    """An ArgMax output (int64) is no floating output: one output counts, so the metric is the
    one-output top-1 agreement."""
    nodes = [onnx.helper.make_node("MatMul", ["x", "w"], ["y"], name="fc"),
             onnx.helper.make_node("ArgMax", ["y"], ["label"], axis=1, keepdims=0)]
    w = np.random.default_rng(2).standard_normal((32, 5)).astype(np.float32)
    model = make(nodes, [vi("x", ["N", 32])], [vi("label", ["N"], TensorProto.INT64), vi("y", ["N", 5])],
                 [init("w", w)])
    om = OnnxModel.load(model, _data())
    assert om.output_names == ("y",) and om.metric().name == "top1_agreement"
