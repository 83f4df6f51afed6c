"""InsertCasts: one cast per (value, format), never redundant, never chained; FOLLOW results rounded."""

from __future__ import annotations

import copy

import pytest
import torch

from autoprec.core.formats import Precision
from autoprec.torch.passes import PassError, PassManager, plan_passes
from autoprec.torch.passes.base import FORMAT, KIND, REASON, SCOPE, VALUE_FORMAT
from autoprec.torch.passes.assign_formats import AssignFormats
from autoprec.torch.passes.insert_casts import InsertCasts, is_cast, is_round
from autoprec.torch.passes.lower_layers import LowerLayers
from autoprec.torch.passes.ops import cast

FP32, BF16, FP16, E4M3 = Precision.FP32, Precision.BF16, Precision.FP16, Precision.FP8_E4M3

PLAN_A = {"q": BF16, "k": BF16, "v": BF16, "matmul": BF16, "matmul_1": FP16, "o": FP16, "fc1": E4M3, "fc2": BF16}


def _apply(c, plan, amax, mode="emulate"):
    return PassManager(plan_passes(c, plan, amax, mode)).run(copy.deepcopy(c.gm)).graph


def _casts(gm) -> dict[str, tuple[str, Precision, list[str]]]:
    return {n.name: (n.args[0].name, n.kwargs["fmt"], sorted(u.name for u in n.users))
            for n in gm.graph.nodes if is_cast(n)}


def test_cast_count_attention(attn_case, oracles) -> None:
    c, amax = attn_case
    gm = _apply(c, PLAN_A, amax)
    assert _casts(gm) == {
        "ln_to_bf16": ("ln", BF16, ["k", "q", "v"]),  # one cast, shared by the three projections
        "mul_bf16_to_fp32": ("mul_bf16", FP32, ["softmax"]),  # boundary: softmax stays fp32
        "softmax_to_fp16": ("softmax", FP16, ["matmul_1"]),
        "transpose_2_to_fp16": ("transpose_2", FP16, ["matmul_1"]),  # v is bf16, matmul_1 fp16
        "o_to_fp32": ("o", FP32, ["add"]),  # residual add with the fp32 input runs in fp32
        "add_to_fp8_e4m3": ("add", E4M3, ["fc1"]),
        "fc2_to_fp32": ("fc2", FP32, ["add_1"]),
    }
    # 16-bit FOLLOW ops that compute get their results rounded; views and transposes do not
    rounds = {n.name: (n.args[0].name, n.kwargs["fmt"]) for n in gm.graph.nodes if is_round(n)}
    assert rounds == {"mul_bf16": ("mul", BF16), "gelu_bf16": ("gelu", BF16)}
    # gelu's bf16 result feeds the bf16 fc2 directly; q's output reaches matmul through views, uncast
    nodes = {n.name: n for n in gm.graph.nodes}
    assert nodes["fc2"].args[0] is nodes["gelu_bf16"]
    assert nodes["matmul"].args[0] is nodes["transpose"]
    # every inserted node says what it is and why
    for n in gm.graph.nodes:
        if is_cast(n) or is_round(n):
            assert n.meta[KIND] in ("cast", "round") and n.meta[REASON] and SCOPE in n.meta
            assert n.meta[FORMAT] is n.kwargs["fmt"]
    assert "widening" in nodes["o_to_fp32"].meta[REASON] and "amax" in nodes["add_to_fp8_e4m3"].meta[REASON]
    assert nodes["ln_to_bf16"].meta[SCOPE] == "q"
    gm.graph.lint()
    x = oracles.randn((3, 8, 32))
    with torch.no_grad():
        y, y32 = gm(x), c.gm(x)
        assert torch.equal(y, oracles.reference(c, PLAN_A, amax, (x,)))
    assert 0 < (y - y32).norm() / y32.norm() < 0.1


def test_one_value_in_several_formats(attn_case) -> None:
    c, amax = attn_case
    gm = _apply(c, {"q": BF16, "k": FP16, "v": E4M3, "fc2": BF16, "head": BF16}, amax)
    casts = _casts(gm)
    from_ln = {v[1]: v[2] for v in casts.values() if v[0] == "ln"}
    assert from_ln == {BF16: ["q"], FP16: ["k"], E4M3: ["v"]}
    # fc2 (bf16) feeds add_1 (fp32) whose result head reads in bf16: a cast each, no chain
    assert casts["fc2_to_fp32"] == ("fc2", FP32, ["add_1"]) and casts["add_1_to_bf16"] == ("add_1", BF16, ["head"])
    assert casts["head_to_fp32"] == ("head", FP32, ["output"])  # graph outputs are fp32
    for name, (src, fmt, _) in casts.items():
        node = next(n for n in gm.graph.nodes if n.name == name)
        assert not is_cast(node.args[0]), name
        assert fmt.is_fp8 or fmt is not node.args[0].meta[VALUE_FORMAT], name
    assert len({(s, f) for s, f, _ in casts.values()}) == len(casts)


def test_fp8_layers_write_bf16_and_followers_never_run_in_fp8(attn_case, cnn_case) -> None:
    for (c, amax) in (attn_case, cnn_case):
        plan = {name: E4M3 for name in c.graph.layer_names()}
        gm = _apply(c, plan, amax)
        for n in gm.graph.nodes:
            if n.meta.get(VALUE_FORMAT, FP32).is_fp8:
                # the only fp8 values: activation casts, read by fp8 layers alone
                assert is_cast(n) and all(u.meta[FORMAT] is E4M3 and u.name in plan for u in n.users), n.name
            if n.name in plan:
                assert n.meta[VALUE_FORMAT] is BF16
        follow = {n.name: n.meta[FORMAT] for n in gm.graph.nodes if n.meta.get(KIND) in ("relu", "gelu", "mul", "view")}
        assert follow and all(f in (BF16, FP32) for f in follow.values()), follow


def test_postcondition_catches_chains_and_missing_casts(attn_case) -> None:
    c, amax = attn_case
    ins = InsertCasts(c.graph)
    gm = PassManager([AssignFormats(c.graph, {"q": BF16}, amax), LowerLayers(), ins]).run(copy.deepcopy(c.gm)).graph
    ins.ensures(gm)
    g = gm.graph
    first = next(n for n in g.nodes if is_cast(n))
    with g.inserting_after(first):
        chained = g.call_function(cast, (first,), {"fmt": FP16, "native": False})
    first.replace_all_uses_with(chained, delete_user_cb=lambda u: u is not chained)
    chained.meta.update(first.meta)
    with pytest.raises(PassError, match="chain|needs"):
        ins.ensures(gm)

    gm = PassManager([AssignFormats(c.graph, {"q": BF16}, amax), LowerLayers()]).run(copy.deepcopy(c.gm)).graph
    with pytest.raises(PassError, match="q reads ln"):
        ins.ensures(gm)  # the layer reads the fp32 ln output without its bf16 cast


def test_layers_fed_by_casts_skip_rounding_their_inputs_again(attn_case, cnn_case, oracles, monkeypatch) -> None:
    """InsertCasts marks each lowered layer whose activation inputs it gave in its format
    ``rounded=True``; the marked layers use them as they are. The graph computes the reference's
    bits (each layer rounding its inputs from scratch) and the unmarked graph's, with fewer roundings."""
    import autoprec.torch.quantize as q
    calls = []
    real = q.round_scaled
    monkeypatch.setattr(q, "round_scaled", lambda x, p, s: calls.append(p) or real(x, p, s))
    for (c, amax), shape in ((attn_case, (3, 8, 32)), (cnn_case, (3, 1, 8, 8))):
        layers = c.graph.layer_names()
        plans = [{n: E4M3 for n in layers}, {n: BF16 for n in layers}] + ([PLAN_A] if "fc1" in layers else [])
        for plan in plans:
            gm = _apply(c, plan, amax)
            lowered = [n for n in gm.graph.nodes if n.name in plan]
            assert lowered and all(n.kwargs.get("rounded") is True for n in lowered)
            unmarked = copy.deepcopy(gm)
            for n in unmarked.graph.nodes:
                if n.name in plan:
                    n.update_kwarg("rounded", False)
            unmarked.recompile()
            x = oracles.randn(shape)
            with torch.no_grad():
                calls.clear()
                y = gm(x)
                fewer = len(calls)
                calls.clear()
                assert torch.equal(y, unmarked(x)) and fewer < len(calls)
                assert torch.equal(y, oracles.reference(c, plan, amax, (x,)))
