"""autoprec tune end to end: the budget holds by measurement, the plan beats uniform, the CLI
writes its files, bad input fails with one line and no files, plans refuse other models."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
import torch

from autoprec.api import apply_plan_file, tune
from autoprec.cli import main
from autoprec.core.errors import PlanError, UsageError
from autoprec.core.formats import Precision
from autoprec.metrics import Metric
from autoprec.core.plan import PrecisionPlan
from autoprec.ort.runtime import open_session, ort_module
from autoprec.torch.spec import load_model_spec
from autoprec.onnx.passes.base import MODEL_MODE, model_meta

ROOT = Path(__file__).resolve().parents[2]
CNN = str(ROOT / "models" / "digits_cnn.py")
MLP = str(ROOT / "models" / "cancer_mlp.py")
LM = str(ROOT / "models" / "char_transformer.py")


@pytest.fixture(scope="module")
def cnn_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int]:
    out = tmp_path_factory.mktemp("cnn")
    code = main(["tune", CNN, "--budget", "0.5%", "--out", str(out)])
    return out, code


def test_cli_tune_writes_plan_profile_report_and_plots(cnn_run: tuple[Path, int]) -> None:
    out, code = cnn_run
    assert code == 0
    for name in ("plan.json", "profile.json", "report.md", "sensitivity.png", "pareto.png"):
        assert (out / name).stat().st_size > 0, name
    plan = PrecisionPlan.load(out / "plan.json")
    m = plan.measured
    assert m["drop"] <= m["allowed_drop"] and m["metric"] == "accuracy"
    assert m["evaluations"] <= 2 + 3  # 2 + ceil(log2(5 layers))
    assert all(d.reason for d in plan.decisions)
    report = (out / "report.md").read_text()
    assert "## Layers" in report and "## Simple plans" in report
    assert not list(out.glob(".*.tmp"))  # atomic writes leave no temp files
    # the tuned model as ONNX: the deployment graph is what `autoprec export` writes, byte for byte
    tuned = onnx.load(out / "digits_cnn.tuned.onnx")
    onnx.checker.check_model(tuned, full_check=True)
    assert model_meta(tuned)[MODEL_MODE] == "deploy" and model_meta(onnx.load(out / "digits_cnn.emulation.onnx"))[
        MODEL_MODE] == "emulate"
    again = out.parent / "again.onnx"
    assert main(["export", CNN, "--plan", str(out / "plan.json"), "-o", str(again)]) == 0
    assert again.read_bytes() == (out / "digits_cnn.tuned.onnx").read_bytes()


def test_plan_refuses_another_model(cnn_run: tuple[Path, int]) -> None:
    out, _ = cnn_run
    with pytest.raises(PlanError, match=r"unknown layers .*conv1"):
        apply_plan_file(MLP, out / "plan.json")


def test_reapplied_plan_reproduces_the_measured_metric(cnn_run: tuple[Path, int]) -> None:
    out, _ = cnn_run
    plan = PrecisionPlan.load(out / "plan.json")
    spec = load_model_spec(CNN)
    m = plan.measured
    assert spec.evaluate(apply_plan_file(spec, out / "plan.json")) == m["metric_tuned"]
    # the plan was measured on ONNX Runtime too, within budget: the emulation graph written beside it gives that figure
    emulated = ort_module(open_session(str(out / "digits_cnn.emulation.onnx"), "cpu"))
    assert spec.evaluate(emulated) == m["metric_onnx"] and m["metric_fp32"] - m["metric_onnx"] <= m["allowed_drop"]
    assert m["onnx_checks"] >= 1 and "on ONNX Runtime" in (out / "report.md").read_text()


def test_a_plan_onnx_runtime_puts_over_budget_is_refused() -> None:
    """The torch emulation is not the deployed model: a plan is accepted only when ONNX Runtime's
    run of its emulation graph is within budget too. A metric that fails every ONNX Runtime run
    leaves the all-fp32 plan, which rounds nowhere and so is never run there."""
    spec = load_model_spec(CNN)

    def harsh(module: torch.nn.Module) -> float:
        return 0.0 if hasattr(module, "session") else spec.evaluate(module)

    metric = Metric("accuracy", True, harsh)
    r = tune(CNN, "2%", metric=metric)
    assert set(r.plan.assignment.values()) == {Precision.FP32} and "metric_onnx" not in r.plan.measured
    assert r.summary.onnx_checks >= 1 and r.summary.drop == 0.0
    unchecked = tune(CNN, "2%", metric=metric, onnx_check=False)
    assert set(unchecked.plan.assignment.values()) != {Precision.FP32} and unchecked.summary.onnx_checks == 0


def test_a_metric_that_cannot_measure_onnx_runtime_says_how_to_go_on() -> None:
    spec = load_model_spec(CNN)

    def needs_parameters(module: torch.nn.Module) -> float:
        # an evaluate() that reads the model's weights (ONNX Runtime's module has only an empty marker)
        assert sum(p.numel() for p in module.parameters()) > 0, "no weights"
        return spec.evaluate(module)

    with pytest.raises(UsageError, match=r"on ONNX Runtime's run of a plan failed \(AssertionError: no weights.*--no-onnx-check"):
        tune(CNN, "2%", metric=Metric("accuracy", True, needs_parameters))


def test_lm_plan_mixes_low_formats_within_budget_and_beats_uniform() -> None:
    r = tune(LM, "0.5%")
    s, plan = r.summary, r.plan
    assert s.drop <= s.allowed_drop
    low = {d.format for d in plan.decisions} - {Precision.FP32}
    assert len(low) >= 2, plan.format_counts()
    assert s.best_uniform is None or plan.speedup >= s.best_uniform.speedup
    for d in plan.decisions:  # every layer kept wider than the narrowest offered format says why
        if d.format is not Precision.FP8_E4M3:
            assert d.reason and d.reason != "cheapest format within budget", (d.layer, d.reason)
    # the rewritten module trains: gradients reach the fp32 master weights through the casts
    spec_batch = r.captured.example_inputs
    loss = r.module(*spec_batch).float().logsumexp(-1).mean()
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in r.module.parameters() if p.requires_grad)


def test_pins_and_target() -> None:
    r = tune(CNN, "2%", keep=["fp32:fc2"], force=["bf16:conv"], target="a100")
    a = r.plan.assignment
    assert a["fc2"] is Precision.FP32 and "pinned by --keep fp32:fc2" in r.plan.decision("fc2").reason
    assert all(a[n] is Precision.BF16 for n in ("conv1", "conv2", "conv3"))
    assert not any(f.is_fp8 for f in a.values())  # the A100 has no fp8


def test_fidelity_model_uses_its_own_budget_flag(tmp_path: Path) -> None:
    model = tmp_path / "tiny_fidelity.py"
    model.write_text(
        "import torch\n"
        "def model():\n"
        "    torch.manual_seed(0)\n"
        "    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4)).eval()\n"
        "def example_inputs():\n"
        "    return (torch.randn(2, 8, generator=torch.Generator().manual_seed(1)),)\n"
        "def calibration_data():\n"
        "    g = torch.Generator().manual_seed(2)\n"
        "    return [torch.randn(64, 8, generator=g) for _ in range(2)]\n")
    r = tune(str(model), fidelity_budget="1%")
    assert r.metric.name == "top1_agreement" and r.summary.metric_fp32 == 1.0
    assert r.summary.drop <= 0.01
    assert main(["tune", str(model), "--budget", "1%", "--out", str(tmp_path / "o")]) == 2
    assert not (tmp_path / "o").exists()


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "autoprec", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=300)


def test_bad_input_is_one_line_nonzero_and_writes_nothing(tmp_path: Path) -> None:
    out = tmp_path / "never"
    for args, pattern in (
        (["tune", CNN, "--budget", "lots", "--out", str(out)], r"bad budget 'lots'"),
        (["tune", "models/nope.py", "--out", str(out)], r"model file not found"),
        (["tune", CNN, "--formats", "fp12", "--out", str(out)], r"unknown format 'fp12'"),
        (["tune", CNN, "--keep", "fp32:(", "--out", str(out)], r"bad --keep pattern .*regular expression"),
        (["tune", CNN, "--target", "tpu", "--out", str(out)], r"tpu"),
        (["tune", CNN, "--keep", "fp32:^head$", "--out", str(out)], r"--keep fp32:\^head\$ matches no layer"),
        (["tune", CNN, "--out", "/proc/autoprec/never"], r"cannot write /proc/autoprec/never: .*folder you can write"),
        (["export", CNN, "--plan", "p.json", "-o", str(tmp_path)], r"cannot write .*: it is a folder; give a file path"),
    ):
        p = _cli(*args)
        assert p.returncode != 0, args
        lines = [ln for ln in p.stderr.strip().splitlines() if ln.strip()]
        assert len(lines) == 1 and re.search(pattern, lines[0]), (args, p.stderr)
        assert "Traceback" not in p.stderr
    assert not out.exists()


def test_unevaluable_fp32_model_stops_with_the_reason(tmp_path: Path) -> None:
    model = tmp_path / "broken_eval.py"
    model.write_text(
        "import torch\n"
        "METRIC = 'accuracy'\nHIGHER_IS_BETTER = True\n"
        "def model():\n    return torch.nn.Linear(4, 3).eval()\n"
        "def example_inputs():\n    return (torch.ones(2, 4),)\n"
        "def calibration_data():\n    return [torch.ones(8, 4)]\n"
        "def evaluate(m):\n    raise RuntimeError('labels file missing')\n")
    p = _cli("tune", str(model), "--out", str(tmp_path / "o"))
    assert p.returncode != 0 and "fp32 model cannot be evaluated" in p.stderr and "labels file missing" in p.stderr
    assert not (tmp_path / "o").exists()


def test_json_output_is_machine_readable(tmp_path: Path) -> None:
    p = _cli("tune", MLP, "--budget", "1%", "--out", str(tmp_path), "--json")
    assert p.returncode == 0, p.stderr
    data = json.loads(p.stdout)
    assert data["plan"]["model_name"] == "cancer_mlp" and "speedup" in data["summary"]


def test_readme_custom_strategy_runs_as_written() -> None:
    text = (ROOT / "README.md").read_text()
    block = next(b for b in re.findall(r"```python\n(.*?)```", text, re.S) if "class Bf16ButAttention" in b)
    scope: dict[str, object] = {}
    exec(compile(block.replace('"models/', f'"{ROOT}/models/'), "README.md", "exec"), scope)
    plan = scope["result"].plan  # type: ignore[attr-defined]
    assert plan.strategy == "bf16-but-attention"
    assert all((d.format is Precision.FP32) == (d.kind == "matmul") for d in plan.decisions)


def test_provider_exclusions_are_never_offered_and_are_reasons() -> None:
    r = tune(CNN, "2%", provider="cuda", formats=["bf16"])
    for name in ("conv1", "conv2", "conv3"):
        d = r.plan.decision(name)
        assert d.format is Precision.FP32  # ORT's CUDA EP has no bf16 Conv kernel
        assert "bf16 excluded" in d.reason and "Conv" in d.reason, d.reason


def test_cli_export_and_verify(cnn_run: tuple[Path, int], tmp_path: Path) -> None:
    out, _ = cnn_run
    onnx_path = tmp_path / "cnn.onnx"
    assert main(["export", CNN, "--plan", str(out / "plan.json"), "-o", str(onnx_path)]) == 0
    import onnx

    onnx.checker.check_model(onnx.load(str(onnx_path)), full_check=True)
    p = _cli("verify", str(onnx_path), "--model", CNN, "--plan", str(out / "plan.json"), "--json")
    assert p.returncode == 0, p.stderr
    report = json.loads(p.stdout)
    assert report["ok"] is True
    bad = _cli("export", CNN, "--plan", str(tmp_path / "missing.json"), "-o", str(tmp_path / "x.onnx"))
    assert bad.returncode != 0 and "plan" in bad.stderr and not (tmp_path / "x.onnx").exists()
