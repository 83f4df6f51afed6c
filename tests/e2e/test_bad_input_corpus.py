"""A corpus of bad inputs to the CLI (the robustness issue): every case asserts the message, the exit
code, that nothing is left behind and that an older output folder is unchanged.

Each case runs ``autoprec.cli.main`` in-process in an empty working folder (``tmp_path``) that holds
the files the case writes first (a tiny model file, data, a plan, ...) and an older output folder
``out/`` (plan.json and report.md with known bytes), which the case names as its output where the
command takes one (``--out out``, ``-o out/x.onnx``, ``--json out/profile.json``). A bad input must
give exactly one line on stderr starting with ``error:`` that says what is wrong, exit 2 for a usage
error (a flag, argument or path the user typed, or data given for an .onnx model that do not fit
it) and 1 for a failure (a model file or its functions misbehaving, a corrupt plan, profile or ONNX
file, a file made for another model), with no traceback; afterwards the working folder holds
exactly what it held before: ``out/`` byte for byte, no new file or folder, no ``*.tmp``, no hidden
staging folder or lock file. (``__pycache__`` beside an imported model file is the interpreter's,
not autoprec's, and is not counted.)

Cases marked xfail(strict=True) are real bugs: the test asserts the correct behaviour.
"""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
import textwrap
import traceback
import warnings
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pytest

from autoprec.cli import main

ROOT = Path(__file__).resolve().parents[2]

# --- what the cases write ---------------------------------------------------------------------

#: A tiny fidelity-only model file (two Linear layers, captured as layers "_0" and "_2").
BASE = '''\
import torch
import torch.nn as nn


def build():
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))


def model():
    return build().eval()


def example_inputs():
    return (torch.randn(2, 4, generator=torch.Generator().manual_seed(1)),)


def calibration_data():
    g = torch.Generator().manual_seed(2)
    return [torch.randn(8, 4, generator=g) for _ in range(2)]
'''

#: evaluate() with its METRIC and HIGHER_IS_BETTER.
EVAL = '''
METRIC = "accuracy"
HIGHER_IS_BETTER = True


def evaluate(net):
    x = torch.randn(32, 4, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        return (net(x).argmax(-1) == 0).float().mean().item()
'''

#: what `autoprec train` needs besides build().
TRAIN = '''
TRAIN_EPOCHS = 1


def train_data():
    g = torch.Generator().manual_seed(4)
    return [(torch.randn(8, 4, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(2)]


def loss(net, batch):
    x, y = batch
    return nn.functional.cross_entropy(net(x), y)
'''


def py(*extra: str) -> str:
    """BASE with ``extra`` appended: a later ``def`` replaces BASE's, ``del`` removes it."""
    return BASE + "".join("\n\n" + textwrap.dedent(e).strip("\n") + "\n" for e in extra)


DIR = object()  # a files-table value: make a folder


def onnx_bytes(meta: Mapping[str, str] | None = None, weighted: bool = True) -> bytes:
    """A tiny ONNX model: y = x @ w (x: [n, 4] float), or y = relu(x) without a weighted layer."""
    from onnx import TensorProto, helper, numpy_helper

    if weighted:
        w = numpy_helper.from_array((np.arange(12, dtype=np.float32).reshape(4, 3) - 6) / 10, "w")
        nodes, inits, out = [helper.make_node("MatMul", ["x", "w"], ["y"])], [w], 3
    else:
        nodes, inits, out = [helper.make_node("Relu", ["x"], ["y"])], [], 4
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", out])], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    for k, v in (meta or {}).items():
        model.metadata_props.add(key=k, value=v)
    return model.SerializeToString()


def npz(**arrays: Any) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def npy(a: Any) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


X = np.random.default_rng(0).standard_normal((16, 4)).astype(np.float32)
ONNX = onnx_bytes()
DATA = npz(x=X)
#: an ONNX file as `autoprec export` marks its own (the plan it applied, in its metadata)
EXPORTED = onnx_bytes({"autoprec.mode": "emulate", "autoprec.assignment": json.dumps({"_0": "bf16", "_2": "fp32"})})


def plan(layers: Mapping[str, str] | None = None, model_name: str = "m", **top: Any) -> str:
    """A minimal valid plan.json for BASE (layers _0 and _2) unless told otherwise."""
    layers = layers or {"_0": "bf16", "_2": "fp32"}
    d: dict[str, Any] = {"version": 1, "model_name": model_name, "target": "h100", "objective": "latency",
                         "budget": {"value": 0.01, "kind": "metric_drop"}, "cost": 1.0, "fp32_cost": 1.0,
                         "decisions": [{"layer": k, "format": f} for k, f in layers.items()]}
    d.update(top)
    return json.dumps(d, indent=1)


# the older output folder every case starts with
OLD = {"plan.json": b'{"version": 1, "note": "an older run"}\n', "report.md": b"# an older report\n"}


def tune(*a: str) -> list[str]:
    return ["tune", *a, "--out", "out"]


def train(*a: str) -> list[str]:
    """A training run into a folder of its own (it may not write into out/, another run's: a case)."""
    return ["train", *a, "--out", "trainout"]


def export(*a: str) -> list[str]:
    return ["export", *a, "-o", "out/x.onnx"]


def profile(*a: str) -> list[str]:
    return ["profile", *a, "--json", "out/profile.json"]


# --- running a case ---------------------------------------------------------------------------

def _tree(root: Path) -> dict[str, bytes | None]:
    """Every file (its bytes) and folder (None) under ``root``, hidden ones included."""
    out: dict[str, bytes | None] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d != "__pycache__"]
        here = Path(dirpath)
        for d in dirnames:
            out[str((here / d).relative_to(root))] = None
        for f in filenames:
            out[str((here / f).relative_to(root))] = (here / f).read_bytes()
    return out


def _write(root: Path, files: Mapping[str, Any]) -> None:
    for name, content in files.items():
        p = root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        if content is DIR:
            p.mkdir()
        elif isinstance(content, bytes):
            p.write_bytes(content)
        else:
            p.write_text(content)


def _call(argv: list[str]) -> tuple[int, str]:
    """main(argv) as the command line runs it: (exit code, extra stderr). An argparse error exits; an
    uncaught exception is the traceback Python would print; a warning is the line Python would print
    (once per place, DeprecationWarnings hidden, as Python's default filters do outside __main__)."""
    extra = ""
    # main() configures logging with basicConfig, which does nothing where the root logger has handlers
    # (pytest's, or a stream of an earlier test's): let it add its own, on this test's stderr
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    root.handlers.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", PendingDeprecationWarning)
        try:
            code = main(argv)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        except Exception:
            code, extra = 1, traceback.format_exc()
        finally:
            root.handlers[:] = handlers
            root.setLevel(level)
    for w in caught:
        extra += warnings.formatwarning(w.message, w.category, w.filename, w.lineno, w.line)
    return code, extra


def _check(err: str, got: int, code: int, fragments: tuple[str, ...], before: dict[str, bytes | None],
           after: dict[str, bytes | None]) -> None:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    shown = f"exit {got}; stderr:\n{err}"
    assert "Traceback" not in err, shown
    assert len(lines) == 1 and lines[0].startswith("error:"), shown
    for f in fragments:
        assert f in lines[0], f"{f!r} not in the message; {shown}"
    assert got == code, shown
    old = {k: v for k, v in before.items() if k == "out" or k.startswith("out/")}
    assert {k: v for k, v in after.items() if k == "out" or k.startswith("out/")} == old, \
        "the older output folder changed"
    assert sorted(after) == sorted(before), \
        f"left behind: {sorted(set(after) - set(before))}; removed: {sorted(set(before) - set(after))}"
    assert after == before, "a file the test wrote changed"


def run_case(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
             files: Mapping[str, Any], argv: list[str], code: int, fragments: tuple[str, ...]) -> None:
    monkeypatch.chdir(tmp_path)
    _write(tmp_path, {f"out/{k}": v for k, v in OLD.items()})
    _write(tmp_path, files)
    before = _tree(tmp_path)
    capsys.readouterr()
    got, extra = _call(argv)
    _check(capsys.readouterr().err + extra, got, code, fragments, before, _tree(tmp_path))


def case(name: str, files: Mapping[str, Any], argv: list[str], code: int, fragments: str | tuple[str, ...],
         bug: str | None = None) -> Any:
    """One bad input: the files it writes, the command line, the exit code and what the message must
    say. ``bug``: what autoprec does wrong today (the case is then a strict xfail)."""
    marks = [pytest.mark.xfail(strict=True, reason=bug)] if bug else []
    return pytest.param(files, argv, code, (fragments,) if isinstance(fragments, str) else fragments, id=name,
                        marks=marks)


ARGS = "files, argv, code, fragments"

# --- the model file ---------------------------------------------------------------------------

MODEL_FILE = [
    case("missing-file", {}, tune("nowhere.py"), 2, "model file not found: nowhere.py"),
    case("a-folder", {"pkg": DIR}, tune("pkg"), 2, "pkg is a folder"),
    case("not-a-py-file", {"m.txt": BASE}, tune("m.txt"), 2, "expected a Python model file ending in .py"),
    case("syntax-error", {"m.py": py("def broken(:\n    pass")}, tune("m.py"), 1,
         ("m.py", "importing the model file failed: SyntaxError")),
    case("import-error", {"m.py": py("import autoprec_no_such_module")}, tune("m.py"), 1,
         "ModuleNotFoundError: No module named 'autoprec_no_such_module'"),
    case("raises-at-import", {"m.py": py("raise RuntimeError('weights/m.pt is missing')")}, tune("m.py"), 1,
         "RuntimeError: weights/m.pt is missing"),
    case("sys-exit-at-import", {"m.py": py("import sys\nsys.exit(3)")}, tune("m.py"), 1,
         "called sys.exit(3) while being imported"),
    case("no-model-function", {"m.py": py("del model")}, tune("m.py"), 1, "missing model()"),
    case("no-example-inputs-nor-calibration-data", {"m.py": py("del example_inputs, calibration_data")},
         tune("m.py"), 1, ("missing example_inputs", "calibration_data()")),
    case("evaluate-without-METRIC", {"m.py": py(EVAL, "del METRIC")}, tune("m.py"), 1, "evaluate() needs METRIC"),
    case("evaluate-not-a-function", {"m.py": py("evaluate = 0.9")}, tune("m.py"), 1, "evaluate must be a function"),
    case("OUTPUT-not-a-kind", {"m.py": py("OUTPUT = 'probabilities'")}, tune("m.py"), 1,
         "OUTPUT must be 'logits' or 'values'"),
    case("export-missing-model-file", {"p.json": plan()}, export("nowhere.py", "--plan", "p.json"), 2,
         "model file not found: nowhere.py"),
    case("verify-model-is-a-folder", {"x.onnx": EXPORTED, "pkg": DIR}, ["verify", "x.onnx", "--model", "pkg"], 2,
         "pkg is a folder"),
    case("train-syntax-error", {"m.py": py(TRAIN, "def broken(:\n    pass")}, train("m.py", "--formats", "bf16"), 1,
         "importing the model file failed: SyntaxError"),
]


@pytest.mark.parametrize(ARGS, MODEL_FILE)
def test_model_file(files: Mapping[str, Any], argv: list[str], code: int, fragments: tuple[str, ...],
                    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    run_case(tmp_path, capsys, monkeypatch, files, argv, code, fragments)


def test_model_file_calling_os_exit(tmp_path: Path) -> None:
    """A model file that ends the process itself (os._exit cannot be caught, so the exit status is the
    model file's): the model file is imported before anything is written, so nothing is left behind
    and the older folder is intact. Only a separate process shows what a user sees."""
    _write(tmp_path, {f"out/{k}": v for k, v in OLD.items()})
    _write(tmp_path, {"m.py": py("import os\nos._exit(0)")})
    before = _tree(tmp_path)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    r = subprocess.run([sys.executable, "-m", "autoprec", *tune("m.py")], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout == ""  # the model file's own exit
    assert _tree(tmp_path) == before


# --- the contract functions and what they return ----------------------------------------------

_TRACEBACK = "a traceback instead of a one-line error: "

CONTRACT = [
    case("model-raises", {"m.py": py("def model():\n    raise FileNotFoundError('weights/m.pt not found')")},
         tune("m.py"), 1, ("model()", "weights/m.pt not found")),
    case("model-returns-no-module", {"m.py": py("def model():\n    return 42")}, tune("m.py"), 1, ("model()", "int")),
    case("model-calls-sys-exit", {"m.py": py("def model():\n    import sys\n    sys.exit(3)")}, tune("m.py"), 1,
         ("m.py", "called sys.exit(3)", "must return, not exit")),
    case("example-inputs-raise", {"m.py": py("def example_inputs():\n    raise ValueError('no example')")},
         tune("m.py"), 1, ("example_inputs()", "no example")),
    case("example-inputs-wrong-shape", {"m.py": py("def example_inputs():\n    return (torch.randn(2, 5),)")},
         tune("m.py"), 1, ("example_inputs()", "mat1 and mat2 shapes cannot be multiplied")),
    case("calibration-data-empty", {"m.py": py("def calibration_data():\n    return []")}, tune("m.py"), 1,
         "calibration_data() yielded no batches"),
    case("calibration-data-none", {"m.py": py("def calibration_data():\n    return None")}, tune("m.py"), 1,
         ("calibration_data()", "None")),
    case("calibration-batch-wrong-shape", {"m.py": py("def calibration_data():\n    return [torch.randn(8, 5)]")},
         tune("m.py"), 1, ("calibration", "mat1 and mat2 shapes cannot be multiplied")),
    case("calibration-batch-numpy", {"m.py": py("def calibration_data():\n    return [torch.randn(8, 4).numpy()]")},
         tune("m.py"), 1, ("calibration", "ndarray")),
    case("float64-model", {"m.py": py("def model():\n    return build().double().eval()",
                                      "def example_inputs():\n    return (torch.randn(2, 4, dtype=torch.float64),)",
                                      "def calibration_data():\n    return [torch.randn(8, 4, dtype=torch.float64)]")},
         tune("m.py"), 1, "float64"),
    case("untraceable-model", {"m.py": py('''
        class Branchy(nn.Module):
            def __init__(self):
                super().__init__()
                self.fc = nn.Linear(4, 3)

            def forward(self, x):
                if x.sum() > 0:
                    return self.fc(x)
                return -self.fc(x)


        def model():
            return Branchy().eval()
        ''')}, tune("m.py"), 1, ("cannot capture m", "data-dependent")),
    case("model-random-on-each-call", {"m.py": py(EVAL, "def evaluate(net):\n    return 0.5")}, tune("m.py"), 1,
         ("model() returns other weights on each call", "seed its initialisation")),
    case("evaluate-returns-nan", {"m.py": py(EVAL, "def evaluate(net):\n    return float('nan')")}, tune("m.py"), 1,
         "accuracy is nan"),
    case("evaluate-raises", {"m.py": py(EVAL, "def evaluate(net):\n    raise KeyError('labels')")}, tune("m.py"), 1,
         "KeyError: 'labels'"),
    case("evaluate-returns-text", {"m.py": py(EVAL, "def evaluate(net):\n    return 'good'")}, tune("m.py"), 1,
         "'good'"),
    case("OUTPUTS-names-no-output", {"m.py": py("OUTPUTS = ('logits',)")}, tune("m.py"), 1,
         "OUTPUTS names the output 'logits'"),
]


@pytest.mark.parametrize(ARGS, CONTRACT)
def test_contract_functions(files: Mapping[str, Any], argv: list[str], code: int, fragments: tuple[str, ...],
                            tmp_path: Path, capsys: pytest.CaptureFixture[str],
                            monkeypatch: pytest.MonkeyPatch) -> None:
    run_case(tmp_path, capsys, monkeypatch, files, argv, code, fragments)


# --- data for .onnx inputs --------------------------------------------------------------------

ONNX_DATA = [
    case("onnx-without-data", {"m.onnx": ONNX}, tune("m.onnx"), 2,
         "m.onnx is an ONNX model: give its inputs with --data"),
    case("data-not-npz", {"m.onnx": ONNX, "d.npz": b"garbage"}, tune("m.onnx", "--data", "d.npz"), 2,
         "cannot read d.npz as numpy data"),
    case("data-missing", {"m.onnx": ONNX}, tune("m.onnx", "--data", "nowhere.npz"), 2, "no data file at nowhere.npz"),
    case("data-wrong-array-names", {"m.onnx": ONNX, "d.npz": npz(inputs=X)}, tune("m.onnx", "--data", "d.npz"), 2,
         "d.npz has no array for model input(s) x"),
    case("data-wrong-rank", {"m.onnx": ONNX, "d.npz": npz(x=X[:, 0])}, tune("m.onnx", "--data", "d.npz"), 2,
         "the data have shape [16], the model takes rank 2"),
    case("data-no-samples", {"m.onnx": ONNX, "d.npz": npz(x=X[:0])}, tune("m.onnx", "--data", "d.npz"), 2,
         "d.npz holds no samples"),
    case("data-integers-for-a-float-input", {"m.onnx": ONNX, "d.npz": npz(x=np.ones((16, 4), np.int64))},
         tune("m.onnx", "--data", "d.npz"), 2, ("the data are int64, the model takes float32", "astype")),
    case("data-with-a-py-model", {"m.py": BASE, "d.npz": DATA}, tune("m.py", "--data", "d.npz"), 2,
         "--data and --labels are for .onnx models"),
    case("labels-missing", {"m.onnx": ONNX, "d.npz": DATA},
         tune("m.onnx", "--data", "d.npz", "--labels", "nowhere.npy"), 2, "no labels file at nowhere.npy"),
    case("labels-count-mismatch", {"m.onnx": ONNX, "d.npz": DATA, "y.npy": npy(np.zeros(3, dtype=np.int64))},
         tune("m.onnx", "--data", "d.npz", "--labels", "y.npy"), 2, "the labels hold 3 samples, the data 16"),
    case("profile-onnx-fast", {"m.onnx": ONNX, "d.npz": DATA}, profile("m.onnx", "--data", "d.npz", "--mode", "fast"),
         2, "drop --mode fast"),
    case("tune-onnx-profile-mode-fast", {"m.onnx": ONNX, "d.npz": DATA},
         tune("m.onnx", "--data", "d.npz", "--profile-mode", "fast"), 2, "drop --profile-mode fast"),
    case("tune-onnx-no-onnx-check", {"m.onnx": ONNX, "d.npz": DATA},
         tune("m.onnx", "--data", "d.npz", "--no-onnx-check"), 2, "drop --no-onnx-check"),
]


@pytest.mark.parametrize(ARGS, ONNX_DATA)
def test_onnx_data(files: Mapping[str, Any], argv: list[str], code: int, fragments: tuple[str, ...], tmp_path: Path,
                   capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    run_case(tmp_path, capsys, monkeypatch, files, argv, code, fragments)


# --- budgets and flags ------------------------------------------------------------------------

M, ME = {"m.py": BASE}, {"m.py": py(EVAL)}

FLAGS = [
    case("budget-malformed", ME, tune("m.py", "--budget", "lots"), 2, "bad budget 'lots'"),
    case("budget-negative", ME, tune("m.py", "--budget=-0.5%"), 2, ("bad budget '-0.5%'", "non-negative")),
    case("budget-without-evaluate", M, tune("m.py", "--budget", "1%"), 2, ("has no evaluate()", "--fidelity-budget")),
    case("fidelity-budget-with-evaluate", ME, tune("m.py", "--fidelity-budget", "1%"), 2,
         "give --budget (a drop of its accuracy), not --fidelity-budget"),
    case("formats-unknown", M, tune("m.py", "--formats", "bf16,fp12"), 2, "unknown format 'fp12'"),
    case("formats-empty", M, tune("m.py", "--formats", ","), 2, "empty format list"),
    case("profile-formats-unknown", M, profile("m.py", "--formats", "fp12"), 2, "unknown format 'fp12'"),
    case("target-unknown", M, tune("m.py", "--target", "tpu"), 2, "unknown target 'tpu'"),
    case("target-lacks-the-formats", M, tune("m.py", "--target", "a100", "--formats", "fp8"), 2,
         "a100 supports none of the formats asked for"),
    case("batch-zero", M, tune("m.py", "--batch", "0"), 2, "--batch must be a positive number of samples, not 0"),
    case("batch-not-a-number", M, tune("m.py", "--batch", "lots"), 2, ("--batch", "'lots'")),
    case("unknown-flag", M, tune("m.py", "--bugdet", "1%"), 2, "--bugdet"),
    case("strategy-unknown", M, tune("m.py", "--strategy", "annealing"), 2, "unknown strategy 'annealing'"),
    case("keep-bad-regex", M, tune("m.py", "--keep", "fp32:("), 2, "bad --keep pattern '('"),
    case("keep-bad-format", M, tune("m.py", "--keep", "fp12:_0"), 2, ("bad --keep 'fp12:_0'", "unknown format")),
    case("keep-empty-pattern", M, tune("m.py", "--keep", "fp32:"), 2, "empty pattern"),
    case("force-without-format", M, tune("m.py", "--force", "_0"), 2, "bad --force '_0': write FORMAT:REGEX"),
    case("keep-matches-no-layer", M, tune("m.py", "--keep", "fp32:^head$"), 2,
         "--keep fp32:^head$ matches no layer"),
    case("provider-unknown", M, tune("m.py", "--provider", "tpu"), 2, "unknown execution provider 'tpu'"),
]


@pytest.mark.parametrize(ARGS, FLAGS)
def test_budgets_and_flags(files: Mapping[str, Any], argv: list[str], code: int, fragments: tuple[str, ...],
                           tmp_path: Path, capsys: pytest.CaptureFixture[str],
                           monkeypatch: pytest.MonkeyPatch) -> None:
    run_case(tmp_path, capsys, monkeypatch, files, argv, code, fragments)


# --- plans and profiles -----------------------------------------------------------------------

FULL_PLAN = plan()
FP8_PLAN = plan({"_0": "fp8_e4m3", "_2": "fp32"})
PLANS = [
    case("plan-missing", M, export("m.py", "--plan", "nowhere/plan.json"), 2, "nowhere/plan.json"),
    case("verify-plan-missing", {**M, "x.onnx": EXPORTED},
         ["verify", "x.onnx", "--model", "m.py", "--plan", "nowhere.json"], 2, "nowhere.json"),
    case("plan-not-json", {**M, "p.json": "formats: bf16\n"}, export("m.py", "--plan", "p.json"), 1,
         "plan p.json is not valid JSON"),
    case("plan-empty", {**M, "p.json": ""}, export("m.py", "--plan", "p.json"), 1,
         "plan p.json is not valid JSON: it is empty"),
    case("plan-truncated", {**M, "p.json": FULL_PLAN[: len(FULL_PLAN) // 2]}, export("m.py", "--plan", "p.json"), 1,
         ("plan p.json", "truncated?")),
    case("plan-not-utf8", {**M, "p.json": b"\xff\xfe{}"}, export("m.py", "--plan", "p.json"), 1,
         "plan p.json is not a JSON text file (not UTF-8)"),
    case("plan-newer-version", {**M, "p.json": plan(version=2)}, export("m.py", "--plan", "p.json"), 1,
         "written by a newer autoprec"),
    case("plan-wrong-version", {**M, "p.json": plan(version=0)}, export("m.py", "--plan", "p.json"), 1,
         "malformed plan p.json: version: got 0, expected 1"),
    case("plan-unknown-format", {**M, "p.json": plan({"_0": "fp12", "_2": "fp32"})},
         export("m.py", "--plan", "p.json"), 1, "malformed plan p.json: decisions[0].format"),
    case("plan-for-another-model", {**M, "p.json": plan({"fc1": "bf16", "fc2": "fp32"}, model_name="other")},
         export("m.py", "--plan", "p.json"), 1, "plan for other does not fit m: unknown layers fc1, fc2"),
    case("fp8-plan-without-profile", {**M, "p.json": FP8_PLAN}, export("m.py", "--plan", "p.json"), 1,
         ("runs _0 in fp8", "give the profile.json")),
    case("profile-not-json", {**M, "p.json": FP8_PLAN, "prof.json": "{"},
         export("m.py", "--plan", "p.json", "--profile", "prof.json"), 1, "profile prof.json is not valid JSON"),
    case("profile-missing", {**M, "p.json": FP8_PLAN}, export("m.py", "--plan", "p.json", "--profile", "nowhere.json"),
         2, "cannot read profile nowhere.json"),
    case("export-weights-missing", {**M, "p.json": FULL_PLAN},
         export("m.py", "--plan", "p.json", "--weights", "nowhere.pt"), 2, "weights file not found: nowhere.pt"),
    case("export-opset-too-old", {**M, "p.json": FULL_PLAN}, export("m.py", "--plan", "p.json", "--opset", "17"), 2,
         "opset 17 has no fp8 QuantizeLinear"),
    case("verify-plan-not-json", {**M, "x.onnx": EXPORTED, "p.json": "{"},
         ["verify", "x.onnx", "--model", "m.py", "--plan", "p.json"], 1, "plan p.json is not valid JSON"),
    case("verify-another-plan", {**M, "x.onnx": EXPORTED, "p.json": plan({"_0": "fp16", "_2": "fp32"})},
         ["verify", "x.onnx", "--model", "m.py", "--plan", "p.json"], 1,
         "exported with another plan: _0 (bf16 in the file, fp16 in the plan)"),
    case("train-plan-for-another-model", {"m.py": py(TRAIN), "p.json": plan(model_name="other")},
         train("m.py", "--plan", "p.json"), 1, "the plan was made for other, not m"),
    case("train-plan-truncated", {"m.py": py(TRAIN), "p.json": FULL_PLAN[:40]}, train("m.py", "--plan", "p.json"), 1,
         ("plan p.json", "truncated?")),
]


@pytest.mark.parametrize(ARGS, PLANS)
def test_plans_and_profiles(files: Mapping[str, Any], argv: list[str], code: int, fragments: tuple[str, ...],
                            tmp_path: Path, capsys: pytest.CaptureFixture[str],
                            monkeypatch: pytest.MonkeyPatch) -> None:
    run_case(tmp_path, capsys, monkeypatch, files, argv, code, fragments)


# --- ONNX files -------------------------------------------------------------------------------

GARBAGE = b"\x00\xffnot an onnx model"

ONNX_FILES = [
    case("tune-empty-onnx", {"m.onnx": b"", "d.npz": DATA}, tune("m.onnx", "--data", "d.npz"), 1, ("m.onnx", "empty")),
    case("tune-garbage-onnx", {"m.onnx": GARBAGE, "d.npz": DATA}, tune("m.onnx", "--data", "d.npz"), 1,
         "cannot read m.onnx as ONNX"),
    case("profile-garbage-onnx", {"m.onnx": GARBAGE, "d.npz": DATA}, profile("m.onnx", "--data", "d.npz"), 1,
         "cannot read m.onnx as ONNX"),
    case("tune-onnx-without-layers", {"m.onnx": onnx_bytes(weighted=False), "d.npz": DATA},
         tune("m.onnx", "--data", "d.npz"), 2, "has no layer whose format can be chosen"),
    case("verify-missing-onnx", M, ["verify", "nowhere.onnx", "--model", "m.py"], 2,
         "ONNX file not found: nowhere.onnx"),
    case("verify-empty-onnx", {**M, "x.onnx": b""}, ["verify", "x.onnx", "--model", "m.py"], 1, ("x.onnx", "empty")),
    case("verify-garbage-onnx", {**M, "x.onnx": GARBAGE}, ["verify", "x.onnx", "--model", "m.py"], 1,
         "cannot read x.onnx as ONNX: DecodeError"),
    case("verify-onnx-not-from-export", {**M, "x.onnx": ONNX}, ["verify", "x.onnx", "--model", "m.py"], 2,
         "not written by `autoprec export`"),
    case("train-an-onnx-file", {"m.onnx": ONNX}, train("m.onnx", "--formats", "bf16"), 2,
         "m.onnx: training needs a model file"),
    case("export-onnx-without-data", {"m.onnx": ONNX, "p.json": FULL_PLAN}, export("m.onnx", "--plan", "p.json"), 2,
         "m.onnx is an ONNX model: give its inputs with --data"),
]


@pytest.mark.parametrize(ARGS, ONNX_FILES)
def test_onnx_files(files: Mapping[str, Any], argv: list[str], code: int, fragments: tuple[str, ...],
                    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    run_case(tmp_path, capsys, monkeypatch, files, argv, code, fragments)


# --- output paths -----------------------------------------------------------------------------

OUTPUT_PATHS = [
    case("tune-out-is-a-file", {**M, "afile": "x"}, ["tune", "m.py", "--out", "afile"], 2,
         ("afile", "is a file")),
    case("tune-out-under-a-file", {**M, "afile": "x"}, ["tune", "m.py", "--out", "afile/run"], 2, "afile is a file"),
    case("train-out-is-a-file", {"m.py": py(TRAIN), "afile": "x"},
         ["train", "m.py", "--formats", "bf16", "--out", "afile"], 2, "afile is a file"),
    case("export-o-is-a-folder", {**M, "p.json": FULL_PLAN}, ["export", "m.py", "--plan", "p.json", "-o", "out"], 2,
         "cannot write out: it is a folder"),
    case("export-o-under-a-file", {**M, "p.json": FULL_PLAN, "afile": "x"},
         ["export", "m.py", "--plan", "p.json", "-o", "afile/x.onnx"], 2, "afile is a file"),
    case("profile-json-is-a-folder", M, ["profile", "m.py", "--json", "out"], 2, "cannot write out: it is a folder"),
]


@pytest.mark.parametrize(ARGS, OUTPUT_PATHS)
def test_output_paths(files: Mapping[str, Any], argv: list[str], code: int, fragments: tuple[str, ...],
                      tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    run_case(tmp_path, capsys, monkeypatch, files, argv, code, fragments)


# --- autoprec train ---------------------------------------------------------------------------

MT = {"m.py": py(TRAIN)}

TRAINING = [
    case("neither-plan-nor-formats", MT, train("m.py"), 2, "not both and not neither"),
    case("both-plan-and-formats", {**MT, "p.json": FULL_PLAN}, train("m.py", "--plan", "p.json", "--formats", "bf16"),
         2, "not both and not neither"),
    case("epochs-zero", MT, train("m.py", "--formats", "bf16", "--epochs", "0"), 2,
         "--epochs must be a positive whole number, not 0"),
    case("train-formats-unknown", MT, train("m.py", "--formats", "fp12"), 2, "unknown format 'fp12'"),
    case("no-train-data", M, train("m.py", "--formats", "bf16"), 1, "training needs train_data() and loss"),
    case("no-build-for-scratch", {"m.py": py(TRAIN, "def model():\n    return nn.Linear(4, 3).eval()", "del build")},
         train("m.py", "--formats", "bf16"), 1, "--init scratch needs build()"),
    case("no-epochs-anywhere", {"m.py": py(TRAIN, "del TRAIN_EPOCHS")}, train("m.py", "--formats", "bf16"), 2,
         "give the number of epochs (--epochs N)"),
    case("resume-without-checkpoint", MT, train("m.py", "--formats", "bf16", "--resume"), 2,
         ("nothing to resume", "trainout has no checkpoint.pt")),
    case("train-into-another-runs-folder", MT, ["train", "m.py", "--formats", "bf16", "--out", "out"], 2,
         ("out already holds files (plan.json, report.md)", "a folder of its own")),
    case("promote-threshold-out-of-range", MT, train("m.py", "--formats", "bf16", "--promote-threshold", "2"), 2,
         "0 <= threshold < 1"),
    case("checkpoint-every-negative", MT, train("m.py", "--formats", "bf16", "--checkpoint-every=-1"), 2,
         "--checkpoint-every must be >= 0"),
    case("train-data-empty", {"m.py": py(TRAIN, "def train_data():\n    return []")},
         train("m.py", "--formats", "bf16"), 1, "no batches"),
    case("loss-not-scalar", {"m.py": py(TRAIN, "def loss(net, batch):\n    return net(batch[0]).sum(-1)")},
         train("m.py", "--formats", "bf16"), 1, "must return a scalar tensor"),
    case("loss-raises", {"m.py": py(TRAIN, "def loss(net, batch):\n    raise ValueError('bad targets')")},
         train("m.py", "--formats", "bf16"), 1, ("loss(model, batch) raised ValueError at step 1", "bad targets")),
]


@pytest.mark.parametrize(ARGS, TRAINING)
def test_train(files: Mapping[str, Any], argv: list[str], code: int, fragments: tuple[str, ...], tmp_path: Path,
               capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    run_case(tmp_path, capsys, monkeypatch, files, argv, code, fragments)


def test_a_training_run_that_fails_after_a_checkpoint_keeps_it_for_resume(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """The one output a failed run leaves, on purpose: the checkpoint in its own folder, named in the
    message, so a fixed loss continues with --resume."""
    monkeypatch.chdir(tmp_path)
    _write(tmp_path, {f"out/{k}": v for k, v in OLD.items()})
    _write(tmp_path, {"m.py": py(TRAIN, '''
        CALLS = []


        def loss(net, batch):
            CALLS.append(1)
            if len(CALLS) > 2:
                raise ValueError('bad targets in epoch 2')
            x, y = batch
            return nn.functional.cross_entropy(net(x), y)
        ''')})
    before = _tree(tmp_path)
    capsys.readouterr()
    got, extra = _call(train("m.py", "--formats", "bf16", "--epochs", "2"))
    after = _tree(tmp_path)
    kept = {k for k in after if k.startswith("trainout")}
    assert kept == {"trainout", "trainout/checkpoint.pt"}
    _check(capsys.readouterr().err + extra, got, 1,
           ("loss(model, batch) raised ValueError at step 3", "bad targets in epoch 2",
            "trainout keeps the checkpoint of step 2", "--resume"),
           before, {k: v for k, v in after.items() if k not in kept})


def test_what_user_code_prints_stays_out_of_the_results(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """A model file that prints (at import, in model()) does not corrupt `tune --json`: its lines go to
    stderr, autoprec's JSON alone to stdout."""
    monkeypatch.chdir(tmp_path)
    _write(tmp_path, {"m.py": py("print('hello from the model file')\n_model = model\n\n"
                                 "def model():\n    print('building')\n    torch.manual_seed(0)\n    return _model()")})
    capsys.readouterr()
    assert main(["tune", "m.py", "--out", "o", "--json"]) == 0
    out, err = capsys.readouterr()
    assert sorted(json.loads(out)) == ["files", "plan", "summary"]
    assert "hello from the model file" in err and "building" in err


def test_the_corpus_is_large_and_its_ids_unique() -> None:
    ids = [p.id for group in (MODEL_FILE, CONTRACT, ONNX_DATA, FLAGS, PLANS, ONNX_FILES, OUTPUT_PATHS, TRAINING)
           for p in group]
    assert len(ids) + 1 >= 40  # + test_model_file_calling_os_exit
    assert len(set(ids)) == len(ids), sorted(i for i in ids if ids.count(i) > 1)
