"""Model families nobody here wrote for autoprec: ``tune`` -> ``export`` -> ``verify`` end to end.

Each family file in this folder follows the model-file contract (models/README.md) and builds a
small instance from its library's config with seeded random weights (Hugging Face transformers) or
is written here in the style of torchvision. For each: the tune exits 0 with a plan that holds its
budget, the plan offers attention's products (also those inside scaled_dot_product_attention and
nn.MultiheadAttention) and recurrent layers' products (nn.LSTM, nn.GRU) as layers, ``verify`` of the
tuned ONNX file exits 0 with parity between the torch emulation and ONNX Runtime, and tied weights
get one format and are stored once.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import onnx
import pytest

from autoprec.cli import main
from autoprec.core.formats import Precision
from autoprec.core.plan import PrecisionPlan

pytest.importorskip("transformers")

HERE = Path(__file__).resolve().parent

#: family file -> the layers the plan offers, by kind
FAMILIES = {
    "hf_gpt2": {"linear": 9, "matmul": 4, "embedding": 2},
    "hf_bert": {"linear": 14, "matmul": 4, "embedding": 3},
    "hf_llama": {"linear": 15, "matmul": 4, "embedding": 1},
    "hf_vit": {"linear": 13, "matmul": 4, "conv2d": 1},
    "torch_encoder": {"linear": 12, "matmul": 6, "embedding": 1},
    "conv_family": {"conv1d": 2, "conv2d": 8, "conv3d": 1, "conv_transpose2d": 1, "linear": 1},
    # per layer and direction one input product and one hidden product per step (8 steps), the head
    "lstm_tagger": {"linear": 2 + 2 * 8 + 1, "embedding": 1},
    "gru_tagger": {"linear": 2 + 2 * 8 + 1, "embedding": 1},
}

#: recurrent families -> their recurrent module's scope and its hidden weights
RECURRENT = {"lstm_tagger": ("lstm", ("weight_hh_l0", "weight_hh_l1")),
             "gru_tagger": ("gru", ("weight_hh_l0", "weight_hh_l0_reverse"))}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def tuned(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    name = request.param
    out = tmp_path_factory.mktemp(name)
    # a deployment batch large enough that 16-bit GEMMs pay for their casts on the h100 estimate
    # hf_bert has an evaluate() written as users write them (it switches modes, asks for the device)
    budget = ["--budget", "2%"] if name == "hf_bert" else ["--fidelity-budget", "2%"]
    # the taggers' per-step GEMMs are too small for a narrower format to pay for its casts on the
    # latency estimate: tuned for memory, the search narrows their stored weights
    objective = ["--objective", "memory"] if name in RECURRENT else []
    code = main(["tune", str(HERE / f"{name}.py"), *budget, *objective, "--batch", "256", "--out", str(out)])
    assert code == 0, name
    return name, out


def test_tune_offers_every_product_and_holds_the_budget(tuned: tuple[str, Path]) -> None:
    name, out = tuned
    plan = PrecisionPlan.load(out / "plan.json")
    assert Counter(d.kind for d in plan.decisions) == FAMILIES[name], name
    m = plan.measured
    assert m["drop"] <= m["allowed_drop"]
    assert any(d.format is not Precision.FP32 for d in plan.decisions), f"{name}: nothing narrowed"


def test_verify_holds_parity_on_the_tuned_file(tuned: tuple[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    name, out = tuned
    capsys.readouterr()
    code = main(["verify", str(out / f"{name}.tuned.onnx"), "--model", str(HERE / f"{name}.py"), "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0 and report["ok"] and report["parity_ok"], report


def test_tied_weights_share_one_format_and_one_stored_copy(tmp_path: Path) -> None:
    """GPT-2's head reads the token embedding's table: any format forced on one holds for both, and
    the deployment file stores the table once (as fp8 codes, with one scale per row)."""
    out = tmp_path / "o"
    model = str(HERE / "hf_gpt2.py")
    assert main(["tune", model, "--fidelity-budget", "50%", "--force", "fp8_e4m3:lm_head",
                 "--out", str(out)]) == 0
    plan = PrecisionPlan.load(out / "plan.json")
    by_name = {d.layer: d for d in plan.decisions}
    tied = [n for n, d in by_name.items() if d.kind == "embedding" and "tied" in d.reason]
    assert len(tied) == 1 and by_name[tied[0]].format is Precision.FP8_E4M3 is by_name["linear"].format
    tables = [(t.name, t.data_type) for t in onnx.load(out / "hf_gpt2.tuned.onnx").graph.initializer
              if t.name.startswith("model.lm_head.weight")]  # the exporter names the tied table after the head
    assert tables == [("model.lm_head.weight_fp8_e4m3", onnx.TensorProto.FLOAT8E4M3FN),
                      ("model.lm_head.weight_scale", onnx.TensorProto.FLOAT)], tables


def test_coverage_names_what_stays_fp32(tuned: tuple[str, Path]) -> None:
    """The report says how much of the model the plan can change and names what stays fp32: the
    attention families' softmax (by rule); nothing of the taggers, whose LSTM/GRU products are layers."""
    name, out = tuned
    report = (out / "report.md").read_text()
    assert report.startswith(f"# autoprec tune: {name}\n")
    line = next(x for x in report.splitlines() if x.startswith("- coverage: "))
    if name in RECURRENT:
        assert line == "- coverage: the plan can change 100.0% of the FLOPs and 100.0% of the weights", line
        assert "## What stays fp32" not in report
    elif "matmul" in FAMILIES[name]:
        assert "fp32 always: " in line and "## What stays fp32" in report and "\n| softmax | " in report, report


def test_recurrent_steps_are_one_decision_and_one_stored_weight(tuned: tuple[str, Path]) -> None:
    """Each recurrent layer's hidden products over the 8 steps read one stored weight: the plan ties
    them (one format; the GRU's two input products, which read one tensor, too), and the deployment
    file stores each hidden weight once."""
    name, out = tuned
    if name not in RECURRENT:
        pytest.skip("not a recurrent family")
    scope, hidden = RECURRENT[name]
    plan = PrecisionPlan.load(out / "plan.json")
    fmt = {d.layer: d.format for d in plan.decisions}
    groups = set()
    for d in plan.decisions:
        match = re.search(r"tied with ([^;]+)", d.reason)
        if match:
            groups.add(frozenset([d.layer, *match.group(1).split(", ")]))
    assert sorted(len(g) for g in groups) == ([2] if name == "gru_tagger" else []) + [8, 8], groups
    assert all(len({fmt[n] for n in g}) == 1 for g in groups)
    stored = [t.name for t in onnx.load(out / f"{name}.tuned.onnx").graph.initializer
              if t.name.startswith(f"{scope}.weight_hh") and not t.name.endswith("_scale")]
    bases = sorted(re.sub(r"_(bf16|fp16|fp8_e4m3)$", "", n) for n in stored)
    assert bases == sorted(f"{scope}.{w}" for w in hidden), stored
