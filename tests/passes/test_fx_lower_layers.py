"""LowerLayers: low-precision layers call autoprec.torch.passes.ops functions; fp32 layers stay as they are."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from autoprec.core.errors import PlanError
from autoprec.core.formats import Precision
from autoprec.torch.passes import PassManager
from autoprec.torch.passes.assign_formats import AssignFormats
from autoprec.torch.passes.lower_layers import LowerLayers
from autoprec.torch.passes.ops import lowp_conv2d, lowp_linear, lowp_matmul

FP32, BF16, FP16, E4M3 = Precision.FP32, Precision.BF16, Precision.FP16, Precision.FP8_E4M3


def _lower(c, plan, amax, native=False):
    return PassManager([AssignFormats(c.graph, plan, amax), LowerLayers(native)]).run(copy.deepcopy(c.gm))


def test_op_list_and_numerics_cnn(cnn_case, oracles) -> None:
    c, amax = cnn_case
    plan = {"conv1": BF16, "conv2": E4M3}
    result = _lower(c, plan, amax)
    gm = result.graph
    assert result.modified
    before = {n.name: n for n in c.gm.graph.nodes}
    after = {n.name: n for n in gm.graph.nodes}
    assert list(after) == list(before)  # no node added or removed, names kept
    assert after["conv1"].target is lowp_conv2d and after["conv1"].kwargs["fmt"] is BF16
    assert after["conv2"].target is lowp_conv2d and after["conv2"].kwargs["amax"] == amax["conv2"]
    assert after["fc"].target is F.linear  # fp32: untouched
    assert [str(a) for a in after["conv2"].args] == [str(a) for a in before["conv2"].args]
    assert list(gm.state_dict()) == list(c.gm.state_dict())
    gm.graph.lint()
    x = oracles.randn((3, 1, 8, 8))
    with torch.no_grad():
        y, y32 = gm(x), c.gm(x)
        # the layers alone are rounded (FOLLOW ops still fp32 until InsertCasts)
        assert torch.equal(y, oracles.reference(c, plan, amax, (x,), round_follow=False))
    assert 0 < (y - y32).norm() / y32.norm() < 0.1


def test_attention_matmuls_and_native(attn_case, oracles) -> None:
    c, amax = attn_case
    plan = {"q": FP16, "matmul": E4M3, "matmul_1": BF16}
    gm = _lower(c, plan, amax).graph
    nodes = {n.name: n for n in gm.graph.nodes}
    assert nodes["q"].target is lowp_linear and nodes["matmul"].target is lowp_matmul
    assert nodes["matmul"].kwargs["amax"] == amax["matmul"] and len(amax["matmul"]) == 2
    x = oracles.randn((2, 8, 32))
    with torch.no_grad():
        assert torch.equal(gm(x), oracles.reference(c, plan, amax, (x,), round_follow=False))
    native = _lower(c, plan, amax, native=True).graph
    assert all(n.kwargs["native"] for n in native.graph.nodes if n.target in (lowp_linear, lowp_matmul))


def test_unrewritable_layer_is_a_plan_error(cnn_case) -> None:
    c, amax = cnn_case
    gm = copy.deepcopy(c.gm)
    conv1 = next(n for n in gm.graph.nodes if n.name == "conv1")
    conv1.target = torch.ops.aten.convolution.default  # kind conv2d, other signature
    with pytest.raises(PlanError, match="conv1"):
        PassManager([AssignFormats(c.graph, {"conv1": BF16}, amax), LowerLayers()]).run(gm)
