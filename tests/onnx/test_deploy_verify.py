"""verify(): the metric through ONNX Runtime (the emulation graph on a CPU provider) and parity."""

from __future__ import annotations

from dataclasses import replace

import onnx
import pytest
from deploy_models import ROOT

from autoprec.core.errors import PlanError, UsageError
from autoprec.deploy.export import export_onnx
from autoprec.ort.runtime import cuda_available
from autoprec.deploy.verify import Parity, VerifyReport, near_tie_note, verify

MODEL = ROOT / "models" / "cancer_mlp.py"
PLAN = {"fc1": "fp8", "fc2": "bf16", "fc3": "fp16", "fc4": "fp32"}


@pytest.fixture(scope="module")
def exported(tmp_path_factory, zoo):
    case = zoo("cancer_mlp")
    out = tmp_path_factory.mktemp("verify") / "cancer_mlp.onnx"
    return export_onnx(MODEL, PLAN, case.amax, out), case


def test_verify_report(exported) -> None:
    path, _ = exported
    r = verify(path, MODEL, PLAN)
    assert r.model == "cancer_mlp" and r.file_mode == "deploy" and r.formats == {"bf16": 1, "fp16": 1, "fp32": 1,
                                                                                 "fp8_e4m3": 1}
    if not cuda_available():
        assert r.provider == "cpu" and r.metric_graph == "emulation" and r.provider_note
        assert any("measured on the emulation graph" in line for line in r.lines())
    assert r.parity.ok and r.parity.narrowest == "fp8_e4m3" and r.parity.positions == 128
    assert r.parity.top1_agreement == 1.0 and r.parity.rel_l2 < 1e-6
    assert r.metric == "accuracy" and r.metric_onnx == pytest.approx(r.metric_torch_emulated, abs=1 / 142)
    assert r.metric_fp32 > 0.9 and r.drop is not None and r.within_budget is None  # no plan file: no budget
    assert r.ok and r.to_dict()["parity_ok"]


def test_verify_refuses_other_plans_models_and_files(exported, tmp_path) -> None:
    path, _ = exported
    with pytest.raises(PlanError, match=r"another plan: fc2 \(bf16 in the file, fp16 in the plan\)"):
        verify(path, MODEL, {**PLAN, "fc2": "fp16"})
    with pytest.raises(PlanError, match="does not fit|another model"):
        verify(path, ROOT / "models" / "digits_cnn.py")
    stale = tmp_path / "stale.onnx"  # the model's graph changed since (or capture did: batch norm folding)
    m = onnx.load(str(path))
    next(p for p in m.metadata_props if p.key == "autoprec.fingerprint").value = "0" * 16
    onnx.save(m, str(stale))
    with pytest.raises(PlanError, match="another model than cancer_mlp.py, or by an older autoprec"):
        verify(stale, MODEL, PLAN)
    plain = tmp_path / "plain.onnx"
    m = onnx.load(str(path))
    del m.metadata_props[:]
    onnx.save(m, str(plain))
    with pytest.raises(UsageError, match="not written by `autoprec export`"):
        verify(plain, MODEL)


def test_verify_on_a_gpu_provider_measures_the_deployment_graph(tmp_path, zoo, monkeypatch) -> None:
    """verify's GPU branch, run here where the CUDA request falls back to the CPU: the metric and the
    parity come from the deployment graph, and the report names the provider the session really got. Only the last
    layer, whose output is the graph's, is low precision: ORT's CPU provider has no 16-bit kernels
    for the ops around the others."""
    import autoprec.ort.runtime

    plan = {"fc4": "fp8"}
    path = export_onnx(MODEL, plan, zoo("cancer_mlp").amax, tmp_path / "head_fp8.onnx")
    really = "cuda" if cuda_available() else "cpu"
    monkeypatch.setattr(autoprec.ort.runtime, "probe_provider", lambda providers: ("cuda", ""))
    r = verify(path, MODEL, plan, providers="cuda")
    assert r.metric_graph == "deployment" and r.parity_of == f"torch emulation vs ONNX deployment graph on {really}"
    assert r.provider == really and any(n.startswith("parity torch emulation vs ONNX emulation graph") for n in r.notes)
    assert r.parity.ok and r.metric_onnx == pytest.approx(r.metric_torch_emulated, abs=1 / 142)


def test_verify_a_file_with_fp16_inputs_and_outputs(tmp_path, zoo) -> None:
    """export --io fp16: verify measures the emulation of that file (inputs and outputs rounded to
    fp16), says so, and holds parity at fp16's eps at least."""
    path = export_onnx(MODEL, PLAN, zoo("cancer_mlp").amax, tmp_path / "half.onnx", io="fp16")
    r = verify(path, MODEL, PLAN)
    assert r.ok and r.parity.narrowest == "fp8_e4m3" and any("takes and returns fp16" in n for n in r.notes)
    r16 = verify(export_onnx(MODEL, {}, None, tmp_path / "half32.onnx", io="fp16"), MODEL, {})
    assert r16.parity.narrowest == "fp16" and r16.parity.ok  # fp32 layers: the tolerance is fp16's


def test_verify_measures_a_file_written_for_the_cpu_itself(tmp_path, zoo) -> None:
    """export --provider cpu: every op the CPU has no 16-bit kernel for computes in fp32 between
    rounding casts, so the file computes the plan faithfully on the CPU and verify measures it."""
    path = export_onnx(MODEL, PLAN, zoo("cancer_mlp").amax, tmp_path / "cpu.onnx", provider="cpu")
    r = verify(path, MODEL, PLAN, providers="cpu")
    assert r.provider == "cpu" and r.metric_graph == "deployment" and r.parity_of.endswith("deployment graph on cpu")
    assert r.ok and r.parity.rel_l2 < 1e-6
    assert r.metric_onnx == verify(export_onnx(MODEL, PLAN, zoo("cancer_mlp").amax, tmp_path / "e.onnx"), MODEL,
                                   PLAN, providers="cpu").metric_onnx


def test_a_budget_missed_only_at_near_ties_is_explained() -> None:
    """ONNX Runtime over budget while the torch emulation of the same plan is within it, and every
    position where they differ a near tie: the verdict stands, and a note says where it comes from."""
    par = Parity(rel_l2=3e-3, top1_agreement=1.0, positions=32, tolerance=6e-3, narrowest="fp16",
                 top1_raw=31 / 32, near_ties=3)
    report = VerifyReport(onnx_path="m.onnx", model="m", file_mode="emulate", provider="cpu", provider_note="",
                          metric_graph="emulation", formats={"fp16": 1}, parity=par, metric="top1_agreement",
                          allowed_drop=0.005, metric_onnx=31 / 32, metric_torch_emulated=1.0, metric_fp32=1.0)
    assert report.within_budget is False and not report.ok
    assert "differs from it at 1 of 32 positions, all near ties" in near_tie_note(report)
    over = replace(report, metric_torch_emulated=31 / 32)  # the plan itself is over budget
    decided = replace(report, parity=replace(par, top1_agreement=0.9))  # a decided position differs
    within = replace(report, metric_onnx=1.0)
    assert near_tie_note(over) is near_tie_note(decided) is near_tie_note(within) is None
