"""Models with several outputs: every floating output counts in the profile, the fidelity metric,
verify and tune, unless the model file's OUTPUTS names the ones that do."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from autoprec.cli import main
from autoprec.core.errors import ModelSpecError
from autoprec.core.formats import Precision
from autoprec.core.plan import PrecisionPlan
from autoprec.core.sensitivity import SensitivityProfile
from autoprec.deploy.verify import verify
from autoprec.metrics import fidelity_metric, model_metric
from autoprec.torch.capture import capture
from autoprec.torch.passes import apply_plan
from autoprec.torch.profile import model_outputs, output_tensors, profile
from autoprec.torch.spec import ModelSpec, load_model_spec

BF16, FP16, E4M3 = Precision.BF16, Precision.FP16, Precision.FP8_E4M3

#: a classifier head and a regression head; reg1 and reg2 feed only the second output ("1"). reg2
#: writes values near 1000 that the model then subtracts: rounded to 16 bits they lose the small
#: difference, so reg2 must stay fp32 (which a profile of the first output alone never sees).
TWO_HEADS = '''
import torch
import torch.nn as nn

OUTPUT = {"1": "values"}  # (batch, 32) would read as logits by its shape


class TwoHeads(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Linear(256, 1024)
        self.cls = nn.Linear(1024, 10)
        self.reg1 = nn.Linear(256, 768)
        self.reg2 = nn.Linear(768, 32)
        with torch.no_grad():
            self.reg2.bias.add_(1000.0)

    def forward(self, x):
        return self.cls(torch.relu(self.trunk(x))), self.reg2(torch.relu(self.reg1(x))) - 1000.0


def model():
    torch.manual_seed(0)
    return TwoHeads().eval()


def example_inputs():
    return (torch.randn(2, 256, generator=torch.Generator().manual_seed(1)),)


def calibration_data():
    g = torch.Generator().manual_seed(2)
    return [torch.randn(64, 256, generator=g) for _ in range(4)]
'''

#: a dict output with a nested tuple; OUTPUTS counts the logits only
DICT_OUT = '''
import torch
import torch.nn as nn

OUTPUTS = ("logits",)


class DictOut(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.cls = nn.Linear(8, 5)
        self.aux = nn.Linear(8, 3)

    def forward(self, x):
        a = self.aux(x)
        return {"logits": self.cls(x), "aux": (a, a.argmax(-1), a.sum(-1))}


def model():
    torch.manual_seed(0)
    return DictOut().eval()


def example_inputs():
    return (torch.randn(2, 8, generator=torch.Generator().manual_seed(1)),)


def calibration_data():
    g = torch.Generator().manual_seed(2)
    return [torch.randn(32, 8, generator=g) for _ in range(2)]
'''


def _spec(tmp_path: Path, name: str, source: str) -> ModelSpec:
    path = tmp_path / f"{name}.py"
    path.write_text(source)
    return load_model_spec(path)


@pytest.fixture
def two_heads(tmp_path: Path) -> ModelSpec:
    return _spec(tmp_path, "two_heads", TWO_HEADS)


def test_outputs_are_every_floating_leaf_named_by_its_path(tmp_path: Path) -> None:
    spec = _spec(tmp_path, "dict_out", DICT_OUT)
    out = spec.model()(*spec.example_inputs())
    every = model_outputs(out)
    assert every.names == ("logits", "aux.0", "aux.2")  # aux.1 is an integer tensor: not an output
    assert every.kinds == ("logits", "logits", "values") and every.measure == "kl+rel_mse"
    assert model_outputs(out, spec.outputs).selected == ("logits",)
    assert [t.shape for t in output_tensors(out)] == [(2, 5), (2, 3), (2,)]
    assert model_outputs(torch.ones(3, 2)).names == ("0",)  # a bare tensor is output "0"


def test_a_layer_feeding_only_the_second_output_has_an_error_in_both_modes(two_heads: ModelSpec) -> None:
    c = capture(two_heads.model(), two_heads.example_inputs())
    batches = two_heads.calibration_data()
    kind = two_heads.output_kind
    exact = profile(c, batches, mode="exact", output_kind=kind, time_reference=False)
    fast = profile(c, batches, mode="fast", output_kind=kind, time_reference=False)
    assert exact.measure == fast.measure == "kl+rel_mse"
    for prof in (exact, fast):
        for layer in c.graph.layer_names():
            assert all(prof.errors[layer][f] > 0 for f in prof.formats), (prof.mode, layer)
    for layer in c.graph.layer_names():  # fast mode's one backward pass estimates the same sum
        assert 0.2 <= fast.errors[layer][E4M3] / exact.errors[layer][E4M3] <= 5, layer
    # exact: the error is the sum of the outputs' own errors, each measured alone
    alone = [profile(c, batches, mode="exact", output_kind=kind, outputs=(o,), time_reference=False) for o in "01"]
    assert alone[0].measure == "kl" and alone[1].measure == "rel_mse"
    assert alone[0].errors["reg1"][E4M3] == 0.0 and alone[1].errors["trunk"][E4M3] == 0.0
    for layer in c.graph.layer_names():
        for f in exact.formats:
            assert exact.errors[layer][f] == alone[0].errors[layer][f] + alone[1].errors[layer][f]


def test_a_profile_of_both_kinds_reads_back(two_heads: ModelSpec) -> None:
    c = capture(two_heads.model(), two_heads.example_inputs())
    prof = profile(c, two_heads.calibration_data(), mode="exact", output_kind=two_heads.output_kind,
                   time_reference=False)
    assert SensitivityProfile.from_json(prof.to_json()).measure == "kl+rel_mse"


def test_the_fidelity_metric_sees_the_second_output(two_heads: ModelSpec) -> None:
    module = two_heads.model()
    batches = two_heads.calibration_data()
    metric = fidelity_metric(module, batches, two_heads.output_kind)
    assert metric.name == "worst_output_fidelity_loss" and not metric.higher_is_better
    assert metric.measure(module) == 0.0

    class SecondOff(torch.nn.Module):
        """The model with its second output 3% too large and its first untouched."""

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            a, b = module(x)
            return a, b * 1.03

    assert metric.measure(SecondOff()) == pytest.approx(0.03, rel=1e-5)
    c = capture(two_heads.model(), two_heads.example_inputs())
    assert model_metric(two_heads, c, batches).name == "worst_output_fidelity_loss"
    # one output named: the one-output metric, unchanged
    assert fidelity_metric(module, batches, two_heads.output_kind, outputs=("0",)).name == "top1_agreement"
    assert fidelity_metric(module, batches, two_heads.output_kind, outputs=("1",)).name == "rel_l2_error"


def test_outputs_selects_a_key_of_a_dict_output(tmp_path: Path) -> None:
    spec = _spec(tmp_path, "dict_out", DICT_OUT)
    assert spec.outputs == ("logits",)
    c = capture(spec.model(), spec.example_inputs())
    batches = spec.calibration_data()
    assert model_metric(spec, c, batches).name == "top1_agreement"
    for mode in ("exact", "fast"):
        prof = profile(c, batches, mode=mode, output_kind=spec.output_kind, outputs=spec.outputs,
                       time_reference=False)
        assert prof.measure == "kl" and prof.errors["cls"][E4M3] > 0, mode
        assert all(e == 0.0 for e in prof.errors["aux"].values()), mode  # aux does not count
    every = profile(c, batches, mode="exact", time_reference=False)
    assert every.measure == "kl+rel_mse" and every.errors["aux"][E4M3] > 0


def test_an_unknown_output_name_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = _spec(tmp_path, "typo", DICT_OUT.replace('OUTPUTS = ("logits",)', 'OUTPUTS = ("logit",)'))
    c = capture(spec.model(), spec.example_inputs())
    with pytest.raises(ModelSpecError, match=r"^OUTPUTS names the output 'logit', which the model does not return: its "
                                         r"floating-point outputs are 'logits', 'aux.0', 'aux.2'$"):
        model_metric(spec, c, spec.calibration_data())
    code = main(["tune", str(spec.path), "--fidelity-budget", "1%", "--out", str(tmp_path / "out")])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert code == ModelSpecError.exit_code and len(err) == 1 and "'logits', 'aux.0', 'aux.2'" in err[0]
    with pytest.raises(ModelSpecError, match="OUTPUTS must be a non-empty tuple of output names"):
        _spec(tmp_path, "bare", DICT_OUT.replace('OUTPUTS = ("logits",)', 'OUTPUTS = "logits"'))


def test_tune_holds_the_fidelity_budget_on_every_output(two_heads: ModelSpec, tmp_path: Path) -> None:
    """The bug this guards: profiled and measured on its first output alone, this model's plan put
    reg2 in fp16 (profile error 0) and its second output moved by 64% under a 1% fidelity budget."""
    out = tmp_path / "out"
    assert main(["tune", str(two_heads.path), "--fidelity-budget", "1%", "--out", str(out)]) == 0
    plan = PrecisionPlan.load(out / "plan.json")
    assert plan.measured["metric"] == "worst_output_fidelity_loss"
    saved = json.loads((out / "profile.json").read_text())
    assert saved["measure"] == "kl+rel_mse" and all(e > 0 for e in saved["errors"]["reg1"].values())
    # the plan's outputs, measured here from the saved plan (fp8 scales: the saved calibration)
    c = capture(two_heads.model(), two_heads.example_inputs())
    amax = {name: tuple(s["amax"] for s in r["inputs"]) for name, r in saved["ranges"].items()}
    tuned = apply_plan(c, plan.assignment, amax)
    num = den = 0.0
    agree = total = 0
    with torch.no_grad():
        for b in two_heads.calibration_data():
            (ref_cls, ref_reg), (cls, reg) = c.gm(*b), tuned(*b)
            num += float(((reg - ref_reg).double() ** 2).sum())
            den += float((ref_reg.double() ** 2).sum())
            agree += int((cls.argmax(-1) == ref_cls.argmax(-1)).sum())
            total += ref_cls.shape[0]
    assert math.sqrt(num / den) <= 0.01 and 1 - agree / total <= 0.01
    assert plan.assignment["reg2"] is Precision.FP32
    assert set(plan.assignment.values()) != {Precision.FP32}  # the budget left room for low formats
    # verify: parity on each output (the report shows the worst), the metric over both
    report = verify(out / "two_heads.tuned.onnx", two_heads, plan=out / "plan.json")
    assert report.metric == "worst_output_fidelity_loss" and report.ok, report.lines()
    assert report.parity is not None and report.parity.output in ("0", "1")
