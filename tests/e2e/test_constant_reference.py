"""A model whose fp32 outputs are the same for every input: fidelity to them measures nothing, and
the summary and report say so (issue: real models, a constant reference)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from autoprec.cli import main
from autoprec.core.metrics import CONSTANT_REFERENCE, constant_reference

MODEL = '''
import torch
from torch import nn


class Constant(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 4)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x * 0.0)))  # every input gives fc's bias path


def model():
    return Constant().eval()


def example_inputs():
    return (torch.randn(2, 8, generator=torch.Generator().manual_seed(1)),)


def calibration_data():
    g = torch.Generator().manual_seed(2)
    return [torch.randn(16, 8, generator=g) for _ in range(2)]
'''


def test_constant_reference_detection() -> None:
    same = np.tile(np.arange(4.0), (5, 1))
    assert constant_reference([[same], [same[:2]]])
    varied = same.copy()
    varied[3, 0] = 9.0
    assert not constant_reference([[same], [varied]])
    assert not constant_reference([[same[:1]]])  # one sample says nothing
    assert not constant_reference([[same], [same + 1.0]])  # a second output differs in another batch


def test_the_summary_and_report_warn_about_a_constant_reference(tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    model = tmp_path / "constant.py"
    model.write_text(MODEL)
    out = tmp_path / "o"
    assert main(["tune", str(model), "--fidelity-budget", "1%", "--out", str(out)]) == 0
    printed = " ".join(capsys.readouterr().out.split())
    assert "warning: " + CONSTANT_REFERENCE in printed
    assert CONSTANT_REFERENCE in (out / "report.md").read_text()
