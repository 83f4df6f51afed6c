"""autoprec profile on the language model: its embedding layers read no floating input (the table
says so instead of failing) and are profiled in every format, fp8 (per-row scales) included."""

from __future__ import annotations

from pathlib import Path

import pytest

from autoprec.torch.capture import capture
from autoprec.cli import main
from autoprec.core.formats import Precision
from autoprec.report import plot_sensitivity
from autoprec.core.sensitivity import SensitivityProfile
from autoprec.torch.spec import load_model_spec

LM = str(Path(__file__).resolve().parents[2] / "models" / "char_transformer.py")


def test_profile_table_and_json_of_embedding_layers(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "lm.profile.json"
    assert main(["profile", LM, "--mode", "fast", "--json", str(out)]) == 0
    rows = {line.split("│")[1].strip(): [c.strip() for c in line.split("│")[2:]]
            for line in capsys.readouterr().out.splitlines() if line.startswith("│ ")}
    for name in ("tok_emb", "pos_emb"):
        kind, _, flops, bf16, fp16, fp8, amax = rows[name][:7]
        assert (kind, flops) == ("embedding", "0") and amax.startswith("-/"), rows[name]
        assert float(fp8) > float(bf16) > float(fp16) > 0
    prof = SensitivityProfile.from_json(out.read_text())
    assert set(prof.errors["tok_emb"]) == {Precision.BF16, Precision.FP16, Precision.FP8_E4M3}
    assert Precision.FP8_E4M3 in prof.errors["head"]
    # the report's heatmap of a profile saved without some entries leaves those cells blank
    del prof.errors["tok_emb"][Precision.FP8_E4M3]
    spec = load_model_spec(LM)
    graph = capture(spec.model(), spec.example_inputs(), name=spec.name).graph
    assert plot_sensitivity(tmp_path / "sensitivity.png", prof, graph).stat().st_size > 0
