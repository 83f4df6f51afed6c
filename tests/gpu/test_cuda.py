"""GPU checks, skipped where there is no GPU: the plan's formats run natively in torch on CUDA, and
the deployed ONNX files run on ONNX Runtime's CUDA provider, both agreeing with the emulation.

On a machine with a GPU: ``.venv/bin/python -m pytest -q tests/gpu`` (the benchmarks record the
latencies: ``benchmarks/deploy_bench.py``, ``benchmarks/onnx_input_bench.py``).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from autoprec.torch.capture import Captured, capture
from autoprec.deploy.export import export_onnx
from autoprec.core.formats import Precision
from autoprec.torch.profile import model_outputs, profile, selected_outputs
from autoprec.torch.spec import ModelSpec, load_model_spec
from autoprec.deploy.verify import compare_outputs, narrowest_format, verify
from autoprec.torch.passes import act_amax_from_profile, apply_plan

ROOT = Path(__file__).resolve().parents[2]
FORMATS = (Precision.BF16, Precision.FP16, Precision.FP8_E4M3)
MODELS = ("digits_cnn", "char_transformer")


@pytest.fixture(scope="module")
def torch_cuda() -> None:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device for torch")


@pytest.fixture(scope="module")
def ort_cuda() -> None:
    from autoprec.ort.runtime import cuda_available

    if not cuda_available():
        pytest.skip("ONNX Runtime has no working CUDA provider here")


_CASES: dict[str, tuple[ModelSpec, Captured, dict[str, tuple[float, ...]]]] = {}


def _case(name: str) -> tuple[ModelSpec, Captured, dict[str, tuple[float, ...]]]:
    """(spec, capture, fp8 calibration amax) of a zoo model, cached."""
    if name not in _CASES:
        spec = load_model_spec(ROOT / "models" / f"{name}.py")
        cap = capture(spec.model(), spec.example_inputs(), name=spec.name)
        prof = profile(cap, spec.calibration_data(), mode="fast", time_reference=False)
        _CASES[name] = (spec, cap, act_amax_from_profile(prof))
    return _CASES[name]


@pytest.mark.parametrize("fmt", FORMATS, ids=str)
@pytest.mark.parametrize("name", MODELS)
def test_native_formats_on_cuda_agree_with_the_emulation(torch_cuda, name: str, fmt: Precision) -> None:
    """Every layer in ``fmt``, computed on real bf16/fp16 tensors (fp8 linears with torch._scaled_mm)
    on the GPU, against the fp32 emulation on the CPU: within the format's eps (or the model's own
    noise floor), top-1 agreement >= 99.5% outside near ties."""
    spec, cap, amax = _case(name)
    plan = {layer: fmt for layer in cap.graph.layer_names()}
    emulated = apply_plan(cap, plan, amax)
    native = apply_plan(cap, plan, amax, mode="native").cuda()
    batches = spec.calibration_data()
    with torch.no_grad():
        results = [emulated(*b) for b in batches]
        measured = model_outputs(results[0], spec.outputs, spec.output_kind)
        ref = [selected_outputs(measured, r) for r in results]
        got = [[y.float().cpu() for y in selected_outputs(
            measured, native(*(x.cuda() if isinstance(x, torch.Tensor) else x for x in b)))] for b in batches]
    for o, kind in enumerate(measured.kinds):
        par = compare_outputs([g[o] for g in got], [r[o] for r in ref], narrowest_format(plan), kind == "logits")
        assert par.ok, (measured.names[measured.positions[o]], par)


@pytest.mark.parametrize("fmt", FORMATS, ids=str)
@pytest.mark.parametrize("name", MODELS)
def test_deployed_onnx_on_cuda_agrees_with_the_torch_emulation(ort_cuda, tmp_path: Path, name: str,
                                                               fmt: Precision) -> None:
    """The deployment graph written for ORT's CUDA provider (16-bit tensors where it has the kernels,
    fp8 Q/DQ) loads there; verify measures its metric and its parity with the torch emulation."""
    spec, cap, amax = _case(name)
    plan = {layer: fmt for layer in cap.graph.layer_names()}
    path = export_onnx(spec, plan, amax, tmp_path / f"{name}.{fmt.value}.onnx", provider="cuda")
    report = verify(path, spec, plan, providers="cuda")
    assert report.provider == "cuda" and report.metric_graph == "deployment", report.lines()
    assert report.parity is not None and report.parity.ok, report.lines()


def test_latency_is_measured_on_cuda(ort_cuda) -> None:
    import numpy as np
    from onnx import TensorProto, helper

    from autoprec.ort.runtime import latency_ms

    g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "relu",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [64, 64])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [64, 64])])
    # IR version pinned: onnx's default can be newer than the onnxruntime beside it reads
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)], ir_version=10).SerializeToString()
    for resident in (False, True):
        ms = latency_ms(model, {"x": np.ones((64, 64), np.float32)}, "cuda", warmup=1, runs=3, resident=resident)
        assert ms is not None and ms > 0


def test_tune_times_its_plan_on_cuda(ort_cuda) -> None:
    """On a GPU, tune --provider cuda times the searched plan against all-fp32 (and the fastest
    uniform plan within budget) and keeps the fastest: the plan then runs at least as fast as
    all-fp32 did, up to the timing margin."""
    from autoprec.api import SPEED_MARGIN, tune

    r = tune(ROOT / "models" / "digits_cnn.py", "0.5%", provider="cuda")
    t = r.summary.timing
    assert t is not None and t.provider == "cuda" and t.batch == 1024
    ms = dict(t.ms)
    assert {"tuned", "all-fp32"} <= set(ms) and t.chosen in ms
    assert ms[t.chosen] <= ms["all-fp32"] / (1 - SPEED_MARGIN)
    assert r.plan.measured["latency_chosen"] == t.chosen and r.summary.drop <= r.summary.allowed_drop
