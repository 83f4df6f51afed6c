"""autoprec.ort.runtime: the provider a session really got, said plainly; and the ONNX Runtime
behaviours the emulation graph relies on, checked on this machine's onnxruntime."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from autoprec.core.errors import UsageError
from autoprec.core.formats import Precision
from autoprec.torch.quantize import fp8_scale, quantize
from autoprec.ort.runtime import Session, cuda_available, latency_ms, open_session, ort_module, parse_providers


def _model(nodes, inits=(), out_type=TensorProto.FLOAT) -> bytes:
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None])],
                          [helper.make_tensor_value_info("y", out_type, [None])], initializer=list(inits))
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)], ir_version=10).SerializeToString()


RELU = _model([helper.make_node("Relu", ["x"], ["y"])])


def test_parse_providers() -> None:
    assert parse_providers("auto") == ("cuda", "cpu")
    assert parse_providers("tensorrt,cuda") == ("tensorrt", "cuda", "cpu")
    assert parse_providers(["CUDAExecutionProvider", "cpu"]) == ("cuda", "cpu")
    with pytest.raises(UsageError, match="unknown ONNX Runtime provider 'rocm'"):
        parse_providers("rocm")


@pytest.mark.skipif(cuda_available(), reason="this machine runs CUDA: nothing falls back")
def test_asking_for_cuda_reports_the_cpu_it_got(caplog, capfd) -> None:
    import autoprec.ort.runtime as rt

    rt._warned.clear()
    with caplog.at_level(logging.WARNING, logger="autoprec.ort.runtime"):
        s = open_session(RELU, ("cuda", "cpu"))
    assert isinstance(s, Session) and s.provider == "cpu" and s.fell_back and s.providers == ["CPUExecutionProvider"]
    assert s.reason and "on cpu (asked for cuda" in s.describe()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "asked ONNX Runtime for CUDAExecutionProvider, got CPUExecutionProvider" in warnings[0]
    assert "\n" not in warnings[0]
    out, err = capfd.readouterr()
    assert "libcublas" not in err and "EP Error" not in out  # ORT's own noise is captured
    s2 = open_session(RELU, "tensorrt")  # TensorRT prints its fallback with print(): captured too
    assert s2.provider == "cpu" and s2.requested[0] == "tensorrt"
    out, err = capfd.readouterr()
    assert "EP Error" not in out and "TensorRT" not in err


def test_cuda_sessions_keep_fp32_out_of_tf32(monkeypatch) -> None:
    """The CUDA provider is asked for use_tf32=0 (ORT's default runs fp32 GEMMs and convolutions on
    TF32 tensor cores) and fuse_conv_bias=0 (a 16-bit Conv rounds its product before its bias); other
    providers get no options."""
    import onnxruntime as ort

    seen: list[tuple[list[str], list[dict[str, str]]]] = []
    real = ort.InferenceSession

    def spy(model, so, providers, provider_options, **kw):
        seen.append((list(providers), list(provider_options)))
        return real(model, so, providers=providers, provider_options=provider_options, **kw)

    monkeypatch.setattr(ort, "InferenceSession", spy)
    open_session(RELU, ("tensorrt", "cuda", "cpu"))
    available = set(ort.get_available_providers())
    options = dict(zip(*seen[-1]))
    if "CUDAExecutionProvider" in available:
        assert options["CUDAExecutionProvider"] == {"use_tf32": "0", "fuse_conv_bias": "0"}
    if "TensorrtExecutionProvider" in available:
        assert options["TensorrtExecutionProvider"] == {}
    assert options["CPUExecutionProvider"] == {}


def test_latency_is_measured_only_where_the_session_really_runs() -> None:
    feeds = {"x": np.ones(1024, np.float32)}
    for resident in (False, True):  # on the CPU provider "resident" is the plain run
        ms = latency_ms(RELU, feeds, "cpu", warmup=1, runs=3, resident=resident)
        assert ms is not None and ms > 0
    if not cuda_available():
        for resident in (False, True):  # never CPU time labelled as GPU
            assert latency_ms(RELU, feeds, "cuda", warmup=1, runs=3, resident=resident) is None


def test_cpu_session_and_torch_wrapper() -> None:
    s = open_session(RELU, "cpu")
    assert s.provider == "cpu" and not s.fell_back and s.describe() == "ONNX Runtime on cpu"
    m = ort_module(s)
    y = m(torch.tensor([-1.0, 2.0]))
    assert isinstance(y, torch.Tensor) and y.tolist() == [0.0, 2.0]
    with pytest.raises(UsageError, match="takes 1 input"):
        s(np.zeros(1, np.float32), np.zeros(1, np.float32))
    with pytest.raises(UsageError, match="ONNX Runtime cannot open the model"):
        open_session(b"not a model", "cpu")


def test_session_errors_give_the_reason_without_the_runtime_source_location() -> None:
    from onnx import TensorProto, helper

    g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "relu",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    too_new = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=99)
    with pytest.raises(UsageError, match=r"cannot open the model on cpu: .*Unsupported model IR version: 99") as info:
        open_session(too_new.SerializeToString(), "cpu")
    assert ".cc:" not in str(info.value) and "onnxruntime::" not in str(info.value)


# --- facts about ONNX Runtime the emulation graph relies on -------------------------------------


def _random_floats(n: int = 1 << 20) -> np.ndarray:
    bits = np.random.default_rng(0).integers(0, 2**32, size=n, dtype=np.uint64).astype(np.uint32)
    x = bits.view(np.float32)
    specials = np.array([1e5, -1e5, 65504, 65519.99, 65520, 3.4028235e38, 3.3895e38, 5.96e-8, 2.98e-8, 1e-40,
                         np.inf, -np.inf, 0.0, -0.0], np.float32)
    x = np.concatenate([x, specials])
    return x[~np.isnan(x)]


@pytest.mark.parametrize("fmt", [Precision.FP16, Precision.BF16])
def test_cast_pair_keeps_its_rounding(fmt) -> None:
    """ORT computes fp16 nodes in fp32 and drops their rounding, but a bare Cast(P) -> Cast(fp32)
    pair rounds exactly as torch does: nearest even, subnormals, overflow to inf."""
    x = _random_floats()
    pair = _model([helper.make_node("Cast", ["x"], ["h"], to=fmt.onnx_type),
                   helper.make_node("Cast", ["h"], ["y"], to=TensorProto.FLOAT)])
    y = open_session(pair, "cpu")(x)[0]
    want = quantize(torch.from_numpy(x), fmt).numpy()
    assert np.array_equal(y.view(np.uint32), want.view(np.uint32))
    assert np.isinf(y[x == 1e5]).all() == (fmt is Precision.FP16)


@pytest.mark.parametrize("amax", [1.0, 3.7, 2500.0])
def test_e4m3_quantize_dequantize_saturates_like_torch(amax) -> None:
    fmt = Precision.FP8_E4M3
    x = (np.random.default_rng(1).standard_normal(1 << 18) * 300).astype(np.float32)
    x = np.concatenate([x, np.array([1e5, -1e5, np.inf, -np.inf, 0.0], np.float32)])
    s = float(fp8_scale(amax, fmt))
    inits = [numpy_helper.from_array(np.array(s, np.float32), "s"), helper.make_tensor("z", fmt.onnx_type, [], [0])]
    qdq = _model([helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], saturate=1),
                  helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"])], inits)
    y = open_session(qdq, "cpu")(x)[0]
    assert np.array_equal(y, quantize(torch.from_numpy(x), fmt, torch.tensor(s)).numpy())
    assert y[-5] == 448 * np.float32(s)  # 1e5 saturates to the largest E4M3 value


def test_relu_before_fp8_quantize_survives() -> None:
    """ORT's ReluQuantRewrite deletes a Relu in front of a QuantizeLinear (right for an integer zero
    point at the type's minimum, wrong for fp8); open_session disables it."""
    fmt = Precision.FP8_E4M3
    inits = [numpy_helper.from_array(np.array(1 / 64, np.float32), "s"), helper.make_tensor("z", fmt.onnx_type, [], [0])]
    m = _model([helper.make_node("Relu", ["x"], ["r"]), helper.make_node("QuantizeLinear", ["r", "s", "z"], ["q"]),
                helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"])], inits)
    y = open_session(m, "cpu")(np.array([-2.0, -0.5, 1.0, 3.0], np.float32))[0]
    assert y.tolist() == [0.0, 0.0, 1.0, 3.0]
