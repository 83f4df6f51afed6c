"""AssignFormats: every node's format and reason, decided before any edge is rewritten."""

from __future__ import annotations

import copy

import pytest
import torch

from autoprec.core.errors import PlanError
from autoprec.core.formats import Precision
from autoprec.torch.passes import PassManager
from autoprec.torch.passes.base import ACT_AMAX, FORMAT, REASON, VALUE_FORMAT
from autoprec.torch.passes.assign_formats import AssignFormats, decide_formats

FP32, BF16, FP16, E4M3 = Precision.FP32, Precision.BF16, Precision.FP16, Precision.FP8_E4M3


def _ops(gm: torch.fx.GraphModule) -> list[tuple[str, str, object, str]]:
    return [(n.name, n.op, n.target, str(n.args)) for n in gm.graph.nodes]


def _run(c, plan, amax):
    return PassManager([AssignFormats(c.graph, plan, amax)]).run(copy.deepcopy(c.gm))


def test_formats_of_an_attention_block(attn_case, oracles) -> None:
    c, amax = attn_case
    plan = {"q": BF16, "k": BF16, "v": FP16, "matmul": E4M3, "o": FP16, "fc1": E4M3, "fc2": BF16}
    result = _run(c, plan, amax)
    gm = result.graph
    # op list: unchanged (annotation only), numerics: bit-identical, graph: lints
    assert not result.modified
    assert _ops(gm) == _ops(c.gm)
    x = oracles.randn((3, 8, 32))
    assert torch.equal(gm(x), c.gm(x))
    gm.graph.lint()

    fmt = {n.name: n.meta[FORMAT] for n in gm.graph.nodes}
    val = {n.name: n.meta[VALUE_FORMAT] for n in gm.graph.nodes}
    why = {n.name: n.meta[REASON] for n in gm.graph.nodes}
    assert {k: fmt[k] for k in plan} == plan and all(why[k] == "plan" for k in plan)
    assert fmt["head"] is FP32 and "not in the plan" in why["head"] and fmt["matmul_1"] is FP32
    # fp8 layers compute in fp8 and write bf16; what follows them is bf16, never fp8
    assert val["matmul"] is BF16 and fmt["mul"] is BF16 and why["mul"] == "follows matmul (bf16)"
    assert val["fc1"] is BF16 and fmt["gelu"] is BF16
    assert fmt["view"] is fmt["transpose"] is BF16 and fmt["view_2"] is fmt["transpose_2"] is FP16
    assert fmt["transpose_3"] is BF16  # transpose of a transpose of k
    # NEVER ops, inputs, parameters, shape arithmetic, outputs: fp32
    for name in ("softmax", "ln", "x", "q_weight", "getitem", "floordiv", "output"):
        assert fmt[name] is FP32, name
    assert "never" in why["softmax"]
    # residual add: x (fp32) + o (fp16): the wider wins, and the reason lists both
    assert fmt["add"] is FP32 and "x (fp32)" in why["add"] and "o (fp16)" in why["add"]
    assert not any(f.is_fp8 for n, f in val.items())
    assert gm.graph.find_nodes(op="call_function", target=torch.nn.functional.linear)[0].meta.get(ACT_AMAX) is None
    assert c.node("matmul").meta.get(FORMAT) is None  # the captured graph is not annotated
    assert {n.name: n.meta[ACT_AMAX] for n in gm.graph.nodes if ACT_AMAX in n.meta} == \
        {"matmul": amax["matmul"], "fc1": amax["fc1"]}


def test_wider_of_two_16_bit_inputs(split_case) -> None:
    """chunk returns a tuple (the op graph calls it NONE) but still follows its input."""
    c, _ = split_case
    f = decide_formats(c.gm, c.graph, {"l1": FP16})
    assert f["chunk"].compute is f["getitem"].compute is f["getitem_1"].compute is f["add"].compute is FP16
    assert f["l2"].compute is FP32


def test_unknown_names_and_missing_amax(attn_case) -> None:
    c, amax = attn_case
    with pytest.raises(PlanError, match="2 layer.*fc3, softmax"):
        AssignFormats(c.graph, {"fc3": BF16, "softmax": FP16, "q": BF16}, amax)
    with pytest.raises(PlanError, match="fc1.*amax"):
        AssignFormats(c.graph, {"fc1": E4M3}, None)
    with pytest.raises(PlanError, match="Precision"):
        AssignFormats(c.graph, {"fc1": "bf16"}, None)  # type: ignore[dict-item]
