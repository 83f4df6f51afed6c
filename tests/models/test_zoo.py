"""The bundled model zoo (models/*.py) follows the model-file contract in models/README.md."""

from __future__ import annotations

import functools
import importlib.util
import math
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.fx

from autoprec.core.errors import ModelSpecError
from autoprec.torch.spec import load_model_spec

MODELS_DIR = Path(__file__).resolve().parents[2] / "models"

# name -> number of classes (size of the output's last dimension)
NUM_OUTPUTS = {"digits_cnn": 10, "cancer_mlp": 2, "digits_resnet": 10, "char_transformer": 97, "resnet18": 1000}

# name -> (metric, value recorded in models/README.md, allowed deviation, worst acceptable value)
RECORDED = {
    "digits_cnn": ("accuracy", 0.9889, 0.02, 0.97),
    "cancer_mlp": ("accuracy", 1.0000, 0.03, 0.95),
    "digits_resnet": ("accuracy", 0.9916, 0.02, 0.97),
    "char_transformer": ("perplexity", 5.1644, 0.25, 6.0),
}
TRAINED = sorted(RECORDED)
ALL = sorted(NUM_OUTPUTS)


@functools.cache
def spec(name: str):
    return load_model_spec(MODELS_DIR / f"{name}.py")


@functools.cache
def fp32_model(name: str):
    """One model per file for the read-only tests (resnet18 takes seconds to set up)."""
    return spec(name).model()


def test_every_model_file_is_tested():
    files = {p.stem for p in MODELS_DIR.glob("*.py")} - {"train", "zoo_common"}
    assert files == set(ALL)


@pytest.mark.parametrize("name", ALL)
def test_contract_attributes(name):
    s = spec(name)
    assert s.name == name
    assert s.output_kind == "logits"
    if name in RECORDED:
        metric, *_ = RECORDED[name]
        assert s.metric == metric
        assert s.higher_is_better is (metric == "accuracy")
        assert s.has_training
    else:
        assert s.evaluate is None and s.metric is None


@pytest.mark.parametrize("name", ALL)
def test_forward_shape_and_eval_mode(name):
    m = fp32_model(name)
    assert isinstance(m, torch.nn.Module)
    assert not any(mod.training for mod in m.modules())
    assert all(p.dtype == torch.float32 for p in m.parameters())
    inputs = spec(name).example_inputs()
    assert 1 <= inputs[0].shape[0] <= 8
    with torch.no_grad():
        out = m(*inputs)
    assert out.dtype == torch.float32
    assert out.shape[0] == inputs[0].shape[0]
    assert out.shape[-1] == NUM_OUTPUTS[name]
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", ALL)
def test_fx_trace_matches_module(name):
    m = fp32_model(name)
    gm = torch.fx.symbolic_trace(m)
    inputs = spec(name).example_inputs()
    with torch.no_grad():
        torch.testing.assert_close(gm(*inputs), m(*inputs), rtol=0, atol=0)
    ops = {n.op for n in gm.graph.nodes}
    assert "call_module" in ops


@pytest.mark.parametrize("name", ALL)
def test_calibration_data_is_deterministic_and_small(name):
    a = spec(name).calibration_data()
    b = spec(name).calibration_data()
    assert len(a) == len(b) >= 1
    for x, y in zip(a, b):
        assert len(x) == len(y)
        for t, u in zip(x, y):
            assert torch.equal(t, u)
    n = sum(batch[0].shape[0] for batch in a)
    if name == "resnet18":
        assert 16 <= n <= 32  # 224x224 images: a few dozen keep profiling in seconds
    else:
        assert 64 <= n <= 256


@pytest.mark.parametrize("name", ["digits_cnn", "cancer_mlp", "digits_resnet", "char_transformer"])
def test_calibration_runs(name):
    m = fp32_model(name)
    with torch.no_grad():
        for batch in spec(name).calibration_data():
            assert torch.isfinite(m(*batch)).all()


@pytest.mark.parametrize("name", TRAINED)
def test_evaluate_matches_recorded_metric(name):
    metric, recorded, tol, worst = RECORDED[name]
    if name == "char_transformer" and sys.version_info[:2] != (3, 11):
        tol = math.inf  # its text is this interpreter's stdlib source; recorded on CPython 3.11
    s = spec(name)
    t0 = time.perf_counter()
    value = s.evaluate(fp32_model(name))
    elapsed = time.perf_counter() - t0
    assert isinstance(value, float) and math.isfinite(value)
    assert abs(value - recorded) <= tol, f"{name}: {metric} {value:.4f}, recorded {recorded}"
    assert value >= worst if s.higher_is_better else value <= worst
    assert elapsed < 5.0  # ~0.1-0.3 s unloaded; a tuner calls it many times


@pytest.mark.parametrize("name", TRAINED)
def test_evaluate_accepts_graph_module_and_keeps_mode(name):
    s = spec(name)
    m = s.model()
    gm = torch.fx.symbolic_trace(m)
    gm.train()
    assert s.evaluate(gm) == s.evaluate(m)
    assert gm.training  # evaluate() restores the mode it found


@pytest.mark.parametrize("name", TRAINED)
def test_train_data_and_loss(name):
    s = spec(name)
    data = s.module.train_data()
    assert len(data) >= 2
    m = s.model()
    m.train()
    loss = s.module.loss(m, data[0])
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None for p in m.parameters())


def test_missing_weights_say_how_to_train(monkeypatch, tmp_path):
    s = spec("digits_cnn")
    monkeypatch.setattr(s.module.zoo_common, "WEIGHTS_DIR", tmp_path)
    with pytest.raises(ModelSpecError, match=r"digits_cnn\.py: model\(\) raised FileNotFoundError: .*models/train\.py digits_cnn"):
        s.model()


def test_char_vocabulary_is_fixed():
    zc = spec("char_transformer").module.zoo_common
    assert len(zc.VOCAB) == 97
    ids = zc.encode("def f():\n\treturn 'é'")
    assert ids.tolist().count(zc.UNK) == 2  # the tab and the non-ASCII letter
    assert zc.decode(zc.encode("x = 1\n")) == "x = 1\n"
    assert list(zc.STDLIB_FILES) == sorted(zc.STDLIB_FILES)


def test_resnet18_size_and_repeatability():
    m = fp32_model("resnet18")
    assert 11_000_000 < sum(p.numel() for p in m.parameters()) < 12_500_000
    convs = [mod for mod in m.modules() if isinstance(mod, torch.nn.Conv2d)]
    assert len(convs) == 20
    again = spec("resnet18").model()
    assert again is not m
    for (k, a), (_, b) in zip(m.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), k


def _train_module():
    path = MODELS_DIR / "train.py"
    mod_spec = importlib.util.spec_from_file_location("autoprec_zoo_train_under_test", path)
    mod = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(mod)
    return mod


def test_train_script_retrains_small_model(monkeypatch, tmp_path):
    monkeypatch.setattr(sys, "path", list(sys.path))  # train.py puts models/ on it
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    train = _train_module()
    try:
        assert train.trainable_models() == TRAINED
        zoo_common = sys.modules["zoo_common"]
        monkeypatch.setattr(zoo_common, "WEIGHTS_DIR", tmp_path)
        acc = train.train("cancer_mlp")
    finally:
        torch.use_deterministic_algorithms(was_deterministic)
    assert acc >= 0.95
    state = torch.load(tmp_path / "cancer_mlp.pt", weights_only=True)
    assert all(v.dtype == torch.float32 for v in state.values())
    assert not list(tmp_path.glob(".*tmp"))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet18"])
def test_resnet18_calibration_batches_run(name):
    m = fp32_model(name)
    with torch.no_grad():
        for batch in spec(name).calibration_data():
            out = m(*batch)
            assert out.shape == (batch[0].shape[0], 1000) and torch.isfinite(out).all()
