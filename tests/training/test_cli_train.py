"""`autoprec train` from the command line: the plan that leaves training is the plan that deploys,
and bad input is a one-line error with no output left behind."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from autoprec.cli import main

ROOT = Path(__file__).resolve().parents[2]
DIGITS = str(ROOT / "models" / "digits_cnn.py")


def test_train_export_verify_with_an_fp8_layer(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    plan = tmp_path / "given.json"
    assert main(["train", DIGITS, "--formats", "bf16", "--epochs", "1", "--out", str(tmp_path / "uniform")]) == 0
    # a plan file with an fp8 layer (the uniform run's plan, edited as a user may)
    d = json.loads((tmp_path / "uniform" / "plan.json").read_text())
    for x in d["decisions"]:
        if x["layer"] == "fc1":
            x["format"] = "fp8_e4m3"
    plan.write_text(json.dumps(d))
    out = tmp_path / "run"
    assert main(["train", DIGITS, "--plan", str(plan), "--epochs", "1", "--out", str(out),
                 "--fp8-scaling", "current", "--weight-scaling", "rowwise"]) == 0
    said = capsys.readouterr().out
    assert "45 steps on 1 process(es)" in said and "fp8_e4m3 x1" in said
    names = {p.name for p in out.iterdir()}
    assert {"weights.pt", "plan.json", "profile.json", "train.csv", "numerics.csv", "training.png",
            "checkpoint.pt"} <= names
    assert not [n for n in names if n.endswith(".tmp")]
    onnx_file = tmp_path / "trained.onnx"
    assert main(["export", DIGITS, "--plan", str(out / "plan.json"), "--weights", str(out / "weights.pt"),
                 "-o", str(onnx_file)]) == 0
    capsys.readouterr()
    assert main(["verify", str(onnx_file), "--model", DIGITS, "--plan", str(out / "plan.json"),
                 "--weights", str(out / "weights.pt"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] and report["parity_ok"]


@pytest.mark.parametrize("argv, message, code", [
    (["train", DIGITS, "--epochs", "1"], "not both and not neither", 2),
    (["train", DIGITS, "--formats", "fp12", "--epochs", "1"], "fp12", 2),
    (["train", DIGITS, "--formats", "bf16", "--epochs", "0"], "--epochs must be a positive", 2),
    (["train", DIGITS, "--plan", "missing.json", "--epochs", "1"], "missing.json", 2),
    (["train", str(ROOT / "models" / "resnet18.py"), "--formats", "bf16"], "train_data()", 1),
    (["train", "model.onnx", "--formats", "bf16"], "needs a model file", 2),
    (["train", DIGITS, "--formats", "bf16", "--amax-history", "0"], "amax history", 2),
    (["train", DIGITS, "--formats", "bf16", "--promote-threshold", "2"], "threshold", 2),
    (["export", "m.onnx", "--plan", "p.json", "-o", "x.onnx", "--weights", "w.pt"], "--weights is for model files", 2),
    (["export", DIGITS, "--plan", str(ROOT / "missing" / "plan.json"), "-o", "x.onnx", "--weights", "nowhere.pt"],
     "weights file not found", 2),
])
def test_bad_train_input_is_one_line(argv: list[str], message: str, code: int, tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert main([*argv, *(["--out", str(tmp_path / "o")] if argv[0] == "train" else [])]) == code
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "o").exists()
