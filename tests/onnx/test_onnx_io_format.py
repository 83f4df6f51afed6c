"""IOFormat / onnx.apply.set_io_format: fp16 graph inputs and outputs on request (export --io fp16)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto

from autoprec.core.errors import UsageError
from autoprec.deploy.export import apply_plan_onnx
from autoprec.onnx.apply import set_io_format
from autoprec.core.formats import Precision
from autoprec.torch.quantize import quantize
from autoprec.ort.runtime import open_session
from autoprec.torch.passes import apply_plan
from autoprec.onnx.passes.base import INSERTED, MODEL_IO, get_meta, model_meta

FP16, BF16, E4M3 = Precision.FP16, Precision.BF16, Precision.FP8_E4M3
PLAN = {"c1": FP16, "c2": BF16, "fc": FP16}


def _io_types(model: onnx.ModelProto) -> tuple[list[int], list[int]]:
    g = model.graph
    return ([v.type.tensor_type.elem_type for v in g.input], [v.type.tensor_type.elem_type for v in g.output])


def test_deploy_graph_takes_and_returns_fp16(exact_cnn) -> None:
    """c1 (fp16) reads the fp16 input itself: InsertCasts' Cast to fp16 is gone; fc's fp16 result is
    the output as it is (an Identity, not a Cast to fp32 and back)."""
    before = apply_plan_onnx(exact_cnn.fp32, exact_cnn.captured, PLAN, mode="deploy")
    model = set_io_format(before, "fp16")
    onnx.checker.check_model(model, full_check=True)
    assert _io_types(model) == ([TensorProto.FLOAT16], [TensorProto.FLOAT16]) and model_meta(model)[MODEL_IO] == "fp16"
    x, y = model.graph.input[0].name, model.graph.output[0].name
    assert sorted(n.op_type for n in before.graph.node if x in n.input) == ["Cast", "Shape"]
    assert sorted(n.op_type for n in model.graph.node if x in n.input) == ["Conv", "Shape"]  # no Cast left
    producer = next(n for n in model.graph.node if y in n.output)
    assert producer.op_type == "Identity" and get_meta(producer, INSERTED) == "cast"
    assert sum(n.op_type == "Cast" for n in model.graph.node) == sum(n.op_type == "Cast" for n in before.graph.node) - 2


def test_emulation_rounds_inputs_and_outputs_like_the_fp16_file(exact_cnn) -> None:
    """The emulation graph keeps fp32 types and rounds at both ends: it computes the torch emulation
    of the fp16-rounded input, rounded to fp16, bit for bit."""
    emulation = set_io_format(apply_plan_onnx(exact_cnn.fp32, exact_cnn.captured, PLAN, mode="emulate"), FP16)
    assert _io_types(emulation) == ([TensorProto.FLOAT], [TensorProto.FLOAT])
    g = emulation.graph
    first = [n for n in g.node if g.input[0].name in n.input]
    last = next(n for n in g.node if g.output[0].name in n.output)
    assert [(n.op_type, get_meta(n, INSERTED), n.attribute[0].i) for n in first] == [("Cast", "round", TensorProto.FLOAT16)]
    assert (last.op_type, get_meta(last, INSERTED), last.attribute[0].i) == ("Cast", "round", TensorProto.FLOAT)
    x = exact_cnn.inputs[0] + 0.3  # not fp16-exact: the input rounding shows
    got = open_session(emulation.SerializeToString(), "cpu")(x)[0]
    with torch.no_grad():
        want = quantize(apply_plan(exact_cnn.captured, PLAN)(quantize(x, FP16)), FP16).numpy()
    assert np.array_equal(got, want)


def test_fp16_file_runs_on_fp32_data(zoo) -> None:
    """A deployment graph whose low-precision layer feeds the output runs on ORT's CPU provider: fed
    fp32 arrays (the session rounds them to the declared fp16), it returns fp16 equal to the
    emulation graph's outputs."""
    case = zoo("cancer_mlp")
    plan = {"fc4": E4M3}
    deploy = set_io_format(apply_plan_onnx(case.fp32, case.captured, plan, case.amax, "deploy"), "fp16")
    emulate = set_io_format(apply_plan_onnx(case.fp32, case.captured, plan, case.amax, "emulate"), "fp16")
    x = case.inputs[0].numpy()
    got = open_session(deploy.SerializeToString(), "cpu")(x)[0]
    assert got.dtype == np.float16
    assert np.array_equal(got.astype(np.float32), open_session(emulate.SerializeToString(), "cpu")(x)[0])


def test_only_fp16_inputs_and_outputs(exact_cnn) -> None:
    model = apply_plan_onnx(exact_cnn.fp32, exact_cnn.captured, PLAN, mode="deploy")
    assert set_io_format(model, "fp32") is model
    with pytest.raises(UsageError, match="no numpy type for bf16"):
        set_io_format(model, BF16)


@pytest.mark.parametrize("plan", [PLAN, {"c1": BF16, "c2": FP16}, {}], ids=["fp16-out", "fp32-out", "fp32"])
def test_the_torch_emulation_with_fp16_io_is_the_onnx_emulation(exact_cnn, plan) -> None:
    """One meaning of fp16 I/O on both paths: the lowering's (torch passes: the inputs rounded where
    the graph starts, the output handed on in fp16, rounded from an fp32 result) and IOFormat's on the
    ONNX emulation graph, bit for bit, whatever format the output's producer has."""
    x = exact_cnn.inputs[0] + 0.3
    emulation = set_io_format(apply_plan_onnx(exact_cnn.fp32, exact_cnn.captured, plan, mode="emulate"), FP16)
    got = open_session(emulation.SerializeToString(), "cpu")(x)[0]
    gm = apply_plan(exact_cnn.captured, plan, io=FP16)
    with torch.no_grad():
        want = gm(x).numpy()
    assert np.array_equal(got, want)
    inp = next(n for n in gm.graph.nodes if n.op == "placeholder")
    assert [u.kwargs["fmt"] for u in inp.users] == [FP16]  # one rounding where the graph starts, read by all
    if not plan:  # all-fp32 layers: the fp16 ends alone move the result
        assert not np.array_equal(want, apply_plan(exact_cnn.captured, plan)(x).detach().numpy())
