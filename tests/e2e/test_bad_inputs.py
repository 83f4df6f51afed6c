"""Bad inputs a user can give the CLI: one line on stderr naming what is wrong, a non-zero exit, no output."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

MODEL = '''
import sys
import torch
import torch.nn as nn

def model():
    {model_body}
    return nn.Sequential(nn.Linear(4, 2))

def example_inputs():
    return (torch.randn(2, 4),)

def calibration_data():
    return [torch.randn(2, 4)]
'''


def _run(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "autoprec", *args, "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)


def _model(tmp_path: Path, top: str = "", model_body: str = "pass") -> Path:
    path = tmp_path / "m.py"
    path.write_text(top + MODEL.replace("{model_body}", model_body))
    return path


def _one_line_error(r: subprocess.CompletedProcess[str], code: int, *needles: str) -> None:
    assert r.returncode == code, (r.returncode, r.stderr)
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), r.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])
    assert "Traceback" not in r.stderr


def test_a_model_file_that_exits_while_imported_is_an_error_naming_it(tmp_path: Path) -> None:
    path = _model(tmp_path, top="import sys\nsys.exit(3)\n")
    r = _run(tmp_path, "tune", str(path))
    _one_line_error(r, 1, str(path), "sys.exit(3)", "__main__")
    assert not (tmp_path / "out").exists()


def test_a_contract_function_that_exits_is_an_error_naming_the_file(tmp_path: Path) -> None:
    path = _model(tmp_path, model_body="sys.exit(3)")
    r = _run(tmp_path, "tune", str(path))
    _one_line_error(r, 1, str(path), "sys.exit(3)", "must return, not exit")
    assert not (tmp_path / "out").exists()


def test_a_folder_given_as_the_model_is_named_a_folder(tmp_path: Path) -> None:
    r = _run(tmp_path, "tune", str(tmp_path))
    _one_line_error(r, 2, "is a folder", ".py")


def test_formats_the_target_lacks_entirely_are_an_error_not_an_all_fp32_plan(tmp_path: Path) -> None:
    r = _run(tmp_path, "tune", "models/digits_cnn.py", "--target", "a100", "--formats", "fp8")
    _one_line_error(r, 2, "a100 supports none of the formats asked for (fp8_e4m3)")
    assert not (tmp_path / "out").exists()


def test_data_that_is_no_numpy_file_says_so(tmp_path: Path) -> None:
    onnx_path = tmp_path / "m.onnx"
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]), onnx_path)
    for i, junk in enumerate((b"garbage", b"PK\x03\x04garbage")):
        data = tmp_path / f"d{i}.npz"
        data.write_bytes(junk)
        r = _run(tmp_path, "tune", str(onnx_path), "--data", str(data))
        _one_line_error(r, 2, f"cannot read {data} as numpy data", "np.savez")
        assert not (tmp_path / "out").exists()


def test_a_model_whose_fp32_output_is_not_finite_is_an_error_in_either_profile_mode(tmp_path: Path) -> None:
    """A model returning NaN: the fast profile's label sampling crashed on it, the exact one tuned it
    to "agreement 1 -> 1"; no error can be measured against such a reference."""
    path = tmp_path / "nan.py"
    path.write_text(MODEL.replace("{model_body}", "pass").replace(
        "return nn.Sequential(nn.Linear(4, 2))", "return nn.Sequential(nn.Linear(4, 2), NaN())")
        + "\n\nclass NaN(nn.Module):\n    def forward(self, x):\n        return x * float('nan')\n")
    for mode in ("fast", "exact"):
        r = _run(tmp_path, "tune", str(path), "--profile-mode", mode)
        _one_line_error(r, 2, "fp32 model's output is not finite (NaN or inf)")
        assert not (tmp_path / "out").exists()
