"""AssignFormats on ONNX decides what the fx AssignFormats and the cost model decide: the one lowering."""

from __future__ import annotations

import collections
import copy
import dataclasses
import json
import random

import onnx
import pytest

from autoprec.core.errors import PlanError
from autoprec.core.formats import Precision
from autoprec.core.lowering import lower
from autoprec.core.sensitivity import SensitivityProfile
from autoprec.search.problem import SearchProblem
from autoprec.torch.passes.assign_formats import AssignFormats as FxAssignFormats
from autoprec.torch.passes.base import FORMAT as FX_FORMAT, ROUNDS as FX_ROUNDS, VALUE_FORMAT as FX_VALUE_FORMAT
from autoprec.core.opgraph import Policy
from autoprec.torch.passes.assign_formats import decide_formats, policy
from autoprec.onnx.passes.assign_formats import AssignFormats, param_names
from autoprec.core.passes import PassManager
from autoprec.onnx.passes.base import (ACT_AMAX, FORMAT, GROUP, KIND, LAYER, POLICY, REASON, ROLE,
    ROLE_CORE, SCOPE, VALUE_FORMAT, get_meta)
from autoprec.onnx.passes.map_layers import MapLayers

BF16, FP16, E4M3, FP32 = Precision.BF16, Precision.FP16, Precision.FP8_E4M3, Precision.FP32


def _assign(case, plan, amax=None):
    model = onnx.ModelProto()
    model.CopyFrom(case.fp32)
    amax = case.amax if amax is None else amax
    return PassManager([MapLayers(case.captured, plan), AssignFormats(case.captured.graph, plan, amax, param_names(case.captured))]).run(model).graph


def _onnx_formats(model) -> collections.Counter:
    """(scope, kind, policy, format) of every group that computes on floats."""
    seen: dict[str, tuple] = {}
    for n in model.graph.node:
        if get_meta(n, POLICY) in ("none", None):
            continue
        seen.setdefault(get_meta(n, GROUP), (get_meta(n, SCOPE), get_meta(n, KIND), get_meta(n, FORMAT)))
    return collections.Counter(seen.values())


def _torch_formats(case, plan) -> collections.Counter:
    c = case.captured
    decided = decide_formats(c.gm, c.graph, plan)
    out = collections.Counter()
    for n in c.gm.graph.nodes:
        if policy(c.graph, n) in (Policy.ALWAYS, Policy.FOLLOW, Policy.NEVER):
            out[(n.meta.get("autoprec_scope", ""), n.meta.get("autoprec_kind"), decided[n.name].compute.value)] += 1
    return out


def _fx_and_cost_model_agree(case, plan) -> None:
    """The fx AssignFormats pass records the lowering's decision on every node, and the search's
    compiled copy of the lowering (what the MILP and the cost model price) decides the same."""
    c = case.captured
    gm = PassManager([FxAssignFormats(c.graph, plan, case.amax)]).run(copy.deepcopy(c.gm)).graph
    lowering = lower(c.graph, plan)
    for n in gm.graph.nodes:
        if n.name in lowering:
            d = lowering[n.name]
            assert (n.meta[FX_FORMAT], n.meta[FX_VALUE_FORMAT], n.meta[FX_ROUNDS]) == (d.compute, d.value, d.rounds)
    profile = SensitivityProfile(c.graph.model_name, c.graph.fingerprint(), "exact", "kl", (FP32, BF16, FP16, E4M3),
                                 {n: {f: 0.0 for f in (BF16, FP16, E4M3)} for n in c.graph.layer_names()}, {})
    # one unit per layer: a random plan may give tied layers different formats
    compiled = dataclasses.replace(SearchProblem.build(c.graph, profile, budget=1.0), ties=()).compiled
    fmt = compiled.from_layers({n: plan.get(n, FP32) for n in c.graph.layer_names()})
    priced = compiled.values.formats(fmt)
    assert [(d.compute, d.value) for d in lowering.decisions.values()] == priced


def _plans(case, n: int, seed: int) -> list[dict[str, Precision]]:
    rng = random.Random(seed)
    fmts = [FP32, BF16, FP16, E4M3]
    return [case.uniform(BF16), case.uniform(E4M3)] + [{l: rng.choice(fmts) for l in case.layers}
                                                        for _ in range(n)]


ZOO = ["cancer_mlp", "char_transformer", "digits_cnn", "digits_resnet", "resnet18"]


@pytest.mark.parametrize("which", ["exact_net", "exact_cnn", *ZOO])
def test_same_decisions_as_torch(which, request, zoo) -> None:
    """The ONNX passes, the fx passes and the cost model decide every node alike: on every zoo model,
    under every uniform plan and a few random ones."""
    case = request.getfixturevalue(which) if which.startswith("exact") else zoo(which)
    for plan in [case.uniform(f) for f in (FP32, FP16)] + _plans(case, 3, seed=len(which)):
        _fx_and_cost_model_agree(case, plan)
        got, want = _onnx_formats(_assign(case, plan)), _torch_formats(case, plan)
        # kinds both sides have equally often (views may split into several ONNX groups) must agree
        kinds = {(s, k) for s, k, _ in got} & {(s, k) for s, k, _ in want}
        compared = 0
        for sk in kinds:
            g = {key: v for key, v in got.items() if key[:2] == sk}
            w = {key: v for key, v in want.items() if key[:2] == sk}
            if sum(g.values()) == sum(w.values()):
                assert g == w, (sk, plan)
                compared += sum(g.values())
        assert compared >= len(case.layers), plan


def test_reasons_amax_and_value_formats(zoo) -> None:
    case = zoo("char_transformer")
    plan = {"blocks_0_attn_proj": E4M3, "blocks_0_mlp_fc1": BF16, "blocks_0_mlp_fc2": FP16, "matmul": FP16}
    model = _assign(case, plan)
    groups = {}
    for n in model.graph.node:
        groups.setdefault(get_meta(n, GROUP), n)
    by_kind = collections.defaultdict(list)
    for g, n in groups.items():
        by_kind[get_meta(n, KIND)].append(n)
    core = next(n for n in model.graph.node if get_meta(n, LAYER) == "blocks_0_attn_proj" and get_meta(n, ROLE) == ROLE_CORE)
    assert json.loads(get_meta(core, ACT_AMAX)) == [pytest.approx(case.amax["blocks_0_attn_proj"][0])]
    assert get_meta(core, VALUE_FORMAT) == "bf16" and get_meta(core, REASON) == "plan"  # fp8 layers write bf16
    softmax = by_kind["softmax"][0]
    assert get_meta(softmax, FORMAT) == "fp32" and "never" in get_meta(softmax, REASON)
    gelu0 = next(n for n in by_kind["gelu"] if get_meta(n, SCOPE) == "blocks.0.mlp.act")
    assert get_meta(gelu0, FORMAT) == "bf16" and get_meta(gelu0, REASON) == "follows blocks_0_mlp_fc1 (bf16)"
    # the residual add after an fp16 layer reads the fp32 stream: the wider wins, and says so
    add = next(n for n in by_kind["add"] if get_meta(n, SCOPE) == "blocks.0" and "blocks_0_mlp_fc2" in get_meta(n, REASON))
    assert get_meta(add, FORMAT) == "fp32" and get_meta(add, REASON).startswith("widest of its inputs")
    # the scale multiply after the fp16 matmul follows it; the constant 1/sqrt(d) does not count
    mul = next(n for n in by_kind["mul"] if get_meta(n, SCOPE) == "blocks.0.attn")
    assert get_meta(mul, FORMAT) == "fp16"
    assert all(get_meta(n, FORMAT) != "fp8_e4m3" for n in model.graph.node if get_meta(n, POLICY) != "always")


def test_plan_errors(exact_net) -> None:
    with pytest.raises(PlanError, match="does not have: nope"):
        _assign(exact_net, {"nope": BF16})
    with pytest.raises(PlanError, match="no calibrated activation amax"):
        _assign(exact_net, {"la": E4M3}, amax={})


def test_tables_and_the_sum_after_them(exact_embed) -> None:
    def add_of(model):
        return next(n for n in model.graph.node if n.op_type == "Add" and get_meta(n, KIND) == "add"
                    and get_meta(n, SCOPE) == "")

    # 16-bit tables: the sum of the two lookups runs in their format
    model = _assign(exact_embed, {"tok": FP16, "pos": FP16})
    add = add_of(model)
    assert get_meta(add, FORMAT) == "fp16" and get_meta(add, REASON) == "follows tok (fp16)"
    # fp8 tables read no activation (no amax needed, an empty one recorded) and write bf16 values
    model = _assign(exact_embed, {"tok": E4M3, "pos": E4M3}, amax={})
    gathers = [n for n in model.graph.node if get_meta(n, ROLE) == ROLE_CORE and get_meta(n, LAYER) != "head"]
    assert sorted(get_meta(n, LAYER) for n in gathers) == ["pos", "tok"]
    for n in gathers:
        assert n.op_type == "Gather" and get_meta(n, FORMAT) == "fp8_e4m3", n.name
        assert get_meta(n, VALUE_FORMAT) == "bf16" and json.loads(get_meta(n, ACT_AMAX)) == [], n.name
    assert get_meta(add_of(model), FORMAT) == "bf16"
