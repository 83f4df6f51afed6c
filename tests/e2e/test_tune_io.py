"""`autoprec tune --io fp16`: a deployment that takes and returns fp16, priced, measured and written so
(issue: real models, scale: the deployed memory of a plan that only narrows formats is never above
fp32's once the outputs are not copied back to fp32)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto

from autoprec.cli import main
from autoprec.core.formats import Precision
from autoprec.core.plan import PrecisionPlan

# a language model's shape: the logits (batch x tokens x vocabulary) are the largest tensor, so at
# the deployment batch an fp32 copy of 16-bit logits is most of the deployed memory
MODEL = '''
import torch
from torch import nn

VOCAB = 400


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(VOCAB, 32)
        self.fc = nn.Linear(32, 32)
        self.head = nn.Linear(32, VOCAB)

    def forward(self, ids):
        return self.head(torch.relu(self.fc(self.emb(ids))))


def model():
    return Tiny().eval()


def _ids(seed):
    return torch.randint(0, VOCAB, (8, 12), generator=torch.Generator().manual_seed(seed))


def example_inputs():
    return (_ids(1)[:2],)


def calibration_data():
    return [_ids(2), _ids(3)]
'''


def _tune(tmp_path: Path, capsys: pytest.CaptureFixture[str], *extra: str) -> tuple[PrecisionPlan, str, Path]:
    model = tmp_path / "tiny_lm.py"
    model.write_text(MODEL)
    out = tmp_path / f"o{len(extra)}"
    assert main(["tune", str(model), "--fidelity-budget", "5%", "--formats", "fp16", "--force", "fp16:.",
                 "--out", str(out), *extra]) == 0
    printed = " ".join(capsys.readouterr().out.split())
    return PrecisionPlan.load(out / "plan.json"), printed, out


def test_fp16_io_prices_no_fp32_copy_of_the_logits_and_writes_an_fp16_graph(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    wide, _, _ = _tune(tmp_path, capsys)
    narrow, printed, out = _tune(tmp_path, capsys, "--io", "fp16")
    assert wide.io is Precision.FP32 and narrow.io is Precision.FP16
    assert json.loads((out / "plan.json").read_text())["io"] == "fp16"
    assert set(narrow.assignment.values()) == {Precision.FP16}
    # fp32 outputs: the fp16 logits and their fp32 copy are alive together, above all-fp32
    assert wide.memory_bytes > wide.fp32_memory_bytes
    # fp16 outputs: every tensor narrower, about half (the fp32 baseline is the same model)
    assert narrow.fp32_memory_bytes == wide.fp32_memory_bytes
    assert narrow.memory_bytes <= 0.55 * narrow.fp32_memory_bytes
    assert f"memory {round(100 * narrow.memory_bytes / narrow.fp32_memory_bytes)}% of all-fp32" in printed
    tuned = onnx.load(str(out / "tiny_lm.tuned.onnx"))
    assert [v.type.tensor_type.elem_type for v in tuned.graph.output] == [TensorProto.FLOAT16]
    assert [v.type.tensor_type.elem_type for v in tuned.graph.input] == [TensorProto.INT64]  # ids stay integer
    # export writes the plan's I/O unless told otherwise, and verify holds the file to the plan
    model = tmp_path / "tiny_lm.py"
    exported = tmp_path / "e.onnx"
    assert main(["export", str(model), "--plan", str(out / "plan.json"), "-o", str(exported)]) == 0
    assert onnx.load(str(exported)).graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT16
    assert main(["export", str(model), "--plan", str(out / "plan.json"), "-o", str(exported), "--io", "fp32"]) == 0
    assert onnx.load(str(exported)).graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT
    assert main(["verify", str(out / "tiny_lm.tuned.onnx"), "--model", str(model),
                 "--plan", str(out / "plan.json")]) == 0


def test_fp16_io_rounds_the_inputs_a_plan_is_measured_on(tmp_path: Path) -> None:
    """A float input given in fp16: the all-fp32 plan measured with fp16 I/O is not the fp32 model."""
    from torch import nn
    import torch

    from autoprec import api

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 3)).eval()
    x = torch.randn(16, 6) * 3 + 0.1
    result = api.tune(net, example_inputs=(x[:2],), calibration=[x], fidelity_budget="5%", io="fp16",
                      formats=["bf16"], cache=False)
    gm = result._tunable.module({})
    inp = next(n for n in gm.graph.nodes if n.op == "placeholder")
    assert [u.kwargs["fmt"] for u in inp.users] == [Precision.FP16]
    with torch.no_grad():
        assert not np.array_equal(gm(x).numpy(), net(x).numpy())
    with pytest.raises(Exception, match="--io must be fp32 or fp16"):
        api.tune(net, example_inputs=(x[:2],), calibration=[x], fidelity_budget="5%", io="bf16", cache=False)
