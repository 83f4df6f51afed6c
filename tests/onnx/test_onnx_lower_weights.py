"""LowerWeights: 16-bit and fp8 initializers replace the fp32 weights, bit for bit as semantics rounds."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from deploy_models import rel_l2, run_onnx
from onnx import TensorProto, numpy_helper

from autoprec.core.formats import Precision
from autoprec.torch.semantics import quantize_weight
from autoprec.onnx.passes.assign_formats import AssignFormats, param_names
from autoprec.core.passes import PassManager
from autoprec.onnx.passes.base import INSERTED, LAYER, ROLE, ROLE_CORE, attr, get_meta, weight_slot
from autoprec.onnx.passes.lower_weights import LowerWeights
from autoprec.onnx.passes.map_layers import MapLayers

BF16, FP16, E4M3, E5M2 = Precision.BF16, Precision.FP16, Precision.FP8_E4M3, Precision.FP8_E5M2


def _lower(case, plan, mode):
    model = onnx.ModelProto()
    model.CopyFrom(case.fp32)
    passes = [MapLayers(case.captured, plan), AssignFormats(case.captured.graph, plan, case.amax, param_names(case.captured)), LowerWeights(mode)]
    return PassManager(passes).run(model).graph


def _weight_as_fp32(model, core) -> np.ndarray:
    """The fp32 values a layer's core node multiplies by (looks up, for a Gather), evaluated from
    initializers and the inserted Cast / DequantizeLinear nodes (the way ONNX defines them)."""
    inits = {t.name: t for t in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output}
    name = core.input[weight_slot(core)]
    if name in inits:
        t = inits[name]
        return numpy_helper.to_array(t).astype(np.float32)
    p = producers[name]
    assert get_meta(p, INSERTED) == "weight"
    src = numpy_helper.to_array(inits[p.input[0]]).astype(np.float32)
    if p.op_type == "Cast":
        return src
    scale = numpy_helper.to_array(inits[p.input[1]])
    shape = [1] * src.ndim
    shape[attr(p, "axis", 1)] = -1
    return src * scale.reshape(shape)


def _cores(model):
    return {get_meta(n, LAYER): n for n in model.graph.node if get_meta(n, ROLE) == ROLE_CORE}


@pytest.mark.parametrize("mode", ["deploy", "emulate"])
def test_conv_and_gemm_weights(exact_cnn, mode) -> None:
    plan = {"c1": BF16, "c2": FP16, "fc": E4M3}
    model = _lower(exact_cnn, plan, mode)
    cores = _cores(model)
    inits = {t.name: t for t in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output}
    params = dict(exact_cnn.captured.gm.named_parameters())
    # the fp32 weights are gone; every layer reads its weight in its format
    assert not {"c1.weight", "c2.weight", "fc.weight"} & set(inits)
    for layer, fmt in plan.items():
        want = quantize_weight(params[f"{layer}.weight"].detach(), fmt).numpy()
        assert np.array_equal(_weight_as_fp32(model, cores[layer]), want), layer
    # ONNX Conv has no bf16: c1's bf16 weight is cast to fp32 (both modes); c2's fp16 weight is read
    # directly by the deployment graph's fp16 Conv; fc reads fp8 codes through DequantizeLinear
    assert producers[cores["c1"].input[1]].op_type == "Cast"
    assert inits[producers[cores["c1"].input[1]].input[0]].data_type == TensorProto.BFLOAT16
    if mode == "deploy":
        assert inits[cores["c2"].input[1]].data_type == TensorProto.FLOAT16
    else:
        assert producers[cores["c2"].input[1]].op_type == "Cast"
    dq = producers[cores["fc"].input[1]]
    assert dq.op_type == "DequantizeLinear" and attr(dq, "axis") == 0
    assert [inits[i].data_type for i in dq.input] == [TensorProto.FLOAT8E4M3FN, TensorProto.FLOAT]  # no zero point
    assert list(inits[dq.input[1]].dims) == [6]  # one scale per output channel
    if mode == "emulate":  # runnable; small integer weights are exact in every format: same outputs
        assert np.array_equal(run_onnx(model, *exact_cnn.inputs), run_onnx(exact_cnn.fp32, *exact_cnn.inputs))


@pytest.mark.parametrize("mode", ["deploy", "emulate"])
@pytest.mark.parametrize("plan", [{"tok": FP16, "pos": BF16}, {"tok": E4M3, "pos": E5M2}], ids=["16-bit", "fp8"])
def test_embedding_tables(exact_embed, mode, plan) -> None:
    """A table is its Gather's input 0. 16-bit: stored 16-bit, read directly by a deployment graph's
    Gather (which admits every type), through a Cast to fp32 in an emulation graph. fp8 (Gather
    admits no fp8): one byte per element and one scale per row behind a DequantizeLinear on axis 0
    without a zero point, in both graphs; the codes times the scales are semantics' rounded table."""
    model = _lower(exact_embed, plan, mode)
    cores = _cores(model)
    inits = {t.name: t for t in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output}
    params = dict(exact_embed.captured.gm.named_parameters())
    assert not {"tok.weight", "pos.weight"} & set(inits)
    for layer, fmt in plan.items():
        table = cores[layer].input[0]
        assert cores[layer].op_type == "Gather"
        w = params[f"{layer}.weight"].detach()
        want = quantize_weight(w, fmt).numpy()
        assert np.array_equal(_weight_as_fp32(model, cores[layer]), want), layer
        if fmt.is_fp8:
            dq = producers[table]
            assert dq.op_type == "DequantizeLinear" and attr(dq, "axis") == 0 and len(dq.input) == 2, layer
            codes, scale = inits[dq.input[0]], inits[dq.input[1]]
            assert codes.data_type == fmt.onnx_type and list(codes.dims) == list(w.shape), layer
            assert len(codes.raw_data) == w.numel(), layer  # one byte per table element
            assert scale.data_type == TensorProto.FLOAT and list(scale.dims) == [w.shape[0]], layer  # per row
            continue
        stored = table if mode == "deploy" else producers[table].input[0]
        if mode == "emulate":
            assert producers[table].op_type == "Cast" and attr(producers[table], "to") == TensorProto.FLOAT
        assert inits[stored].data_type == fmt.onnx_type, layer


@pytest.mark.parametrize("fmt", [BF16, FP16, E4M3])
def test_numerics_of_rounded_weights(zoo, fmt) -> None:
    """Only the weights rounded (LowerWeights alone, emulation graph): a small, nonzero change."""
    case = zoo("digits_cnn")
    x = case.spec.calibration_data()[0][0]
    y = run_onnx(_lower(case, case.uniform(fmt), "emulate"), x)
    assert 0 < rel_l2(y, run_onnx(case.fp32, x)) < fmt.eps


def test_transposed_matmul_weight_scales_along_axis_1(exact_net) -> None:
    model = _lower(exact_net, exact_net.uniform(E4M3), "emulate")
    cores = _cores(model)
    producers = {o: n for n in model.graph.node for o in n.output}
    params = dict(exact_net.captured.gm.named_parameters())
    for layer in ("la", "lb", "head"):
        dq = producers[cores[layer].input[1]]
        assert attr(dq, "axis") == 1  # MatMul reads W^T: output channels are columns
        want = quantize_weight(params[f"{layer}.weight"].detach(), E4M3).numpy().T
        assert np.array_equal(_weight_as_fp32(model, cores[layer]), want)


def test_stored_bytes(exact_cnn) -> None:
    """16-bit weights take 2 bytes an element, fp8 codes 1 (plus one fp32 scale per output channel)."""
    n_weights = sum(p.numel() for n, p in exact_cnn.captured.gm.named_parameters() if n.endswith("weight"))
    for fmt, elem_type, size in ((FP16, TensorProto.FLOAT16, 2), (BF16, TensorProto.BFLOAT16, 2)):
        model = _lower(exact_cnn, exact_cnn.uniform(fmt), "deploy")
        assert sum(len(t.raw_data) for t in model.graph.initializer if t.data_type == elem_type) == size * n_weights
        assert not any(t.name.endswith(".weight") for t in model.graph.initializer)
    fp8 = _lower(exact_cnn, exact_cnn.uniform(E4M3), "deploy")
    codes = [t for t in fp8.graph.initializer if t.data_type == TensorProto.FLOAT8E4M3FN]
    assert sum(len(t.raw_data) for t in codes) == n_weights  # no stored zero points
    weight_dq = [n for n in fp8.graph.node if n.op_type == "DequantizeLinear" and get_meta(n, INSERTED) == "weight"]
    assert weight_dq and all(len(n.input) == 2 for n in weight_dq)


@pytest.mark.parametrize("fmt", list(Precision))
def test_rounded_array_rounds_as_torch_and_needs_no_torch(fmt: Precision) -> None:
    """The weights the passes store (autoprec.onnx.passes.base.rounded_array, numpy and ml_dtypes)
    hold torch's bits for every format: a million random bit patterns, ties, overflow, E4M3FN's
    saturation; and the function runs where torch cannot be imported."""
    import subprocess
    import sys

    import torch

    from autoprec.onnx.passes.base import rounded_array

    rng = np.random.default_rng(0)
    x = np.concatenate([rng.integers(0, 2**32, 1_000_000, dtype=np.uint64).astype(np.uint32).view(np.float32),
                        np.array([0.0, -0.0, np.inf, -np.inf, 65504, 65520, 1e5, 448, 464, 465, -500, 57344,
                                  61440, 3.4e38, 1 + 2**-8, 1 + 3 * 2**-8], np.float32)])
    t = torch.from_numpy(x.copy())
    if fmt.is_fp8 and fmt.info.saturates:
        t = torch.clamp(t, -fmt.max, fmt.max)
    want = t.to(fmt.torch_dtype)
    got = rounded_array(x, fmt)
    assert got.dtype == fmt.numpy_dtype
    as_float = torch.from_numpy(got.astype(np.float32))
    nan = torch.isnan(want.float())
    assert torch.equal(torch.isnan(as_float), nan)
    assert torch.equal(as_float[~nan], want.float()[~nan])
    code = ("import sys; sys.modules['torch'] = None; import numpy as np; from autoprec.core.formats import Precision; "
            "from autoprec.onnx.passes.base import rounded_array; "
            f"print(rounded_array(np.array([1.0009765625, 500.0], np.float32), Precision({fmt.value!r})).tolist())")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
