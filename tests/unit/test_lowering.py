"""The lowering (autoprec.core.lowering): every node's format, roundings and casts, and the search's
compiled copy of it; the cast structure and the MILP grow linearly with depth."""

from __future__ import annotations

import random

import pytest

from autoprec.core.errors import PlanError
from autoprec.core.formats import Precision
from autoprec.core.lowering import check_assignment, lower, single_layer_roundings
from autoprec.core.opgraph import OpGraph, OpNode, Policy
from autoprec.core.sensitivity import SensitivityProfile
from autoprec.cost.roofline import RooflineCostModel
from autoprec.search.milp import MilpStrategy
from autoprec.search.problem import SearchProblem

P = Precision
LOW = (P.BF16, P.FP16, P.FP8_E4M3, P.FP8_E5M2)


def _layer(name: str, n: int, kind: str = "linear") -> OpNode:
    return OpNode(name, kind, name, Policy.ALWAYS, flops=2 * n * 64, weight_elems=64 * 64, act_in_elems=n,
                  act_out_elems=n)


def _op(name: str, kind: str, policy: Policy, n: int) -> OpNode:
    return OpNode(name, kind, name, policy, act_in_elems=n, act_out_elems=n)


def residual_mlp(depth: int, n: int = 4096, embed: bool = True) -> OpGraph:
    """x -> [emb ->] h0; h_{i+1} = h_i + fc_i(relu(h_i)); -> ln -> head -> output."""
    nodes = [OpNode("x", "placeholder", "", Policy.NONE, act_out_elems=n)]
    edges: list[tuple[str, str]] = []
    h = "x"
    if embed:
        nodes.append(_layer("emb", n))
        edges.append(("x", "emb"))
        h = "emb"
    for i in range(depth):
        nodes += [_op(f"relu{i}", "relu", Policy.FOLLOW, n), _layer(f"fc{i}", n), _op(f"add{i}", "add", Policy.FOLLOW, n)]
        edges += [(h, f"relu{i}"), (f"relu{i}", f"fc{i}"), (h, f"add{i}"), (f"fc{i}", f"add{i}")]
        h = f"add{i}"
    nodes += [_op("ln", "layer_norm", Policy.NEVER, n), _layer("head", n), OpNode("out", "output", "", Policy.NONE)]
    edges += [(h, "ln"), ("ln", "head"), ("head", "out")]
    return OpGraph(nodes, edges, f"residual{depth}", batch=1)


def _profile(graph: OpGraph, err: float = 1e-4) -> SensitivityProfile:
    return SensitivityProfile(graph.model_name, graph.fingerprint(), "exact", "kl", (P.FP32, *LOW),
                              {n: {f: err * (1 + f.rank) for f in LOW} for n in graph.layer_names()}, {})


def test_a_follow_op_fed_by_a_graph_input_runs_in_fp32_and_is_priced_so():
    """y = head(relu(x + lin(x))), both layers bf16: the add reads the fp32 input, so it and the relu
    run in fp32 (the passes compute that; the cost model used to price them in bf16)."""
    n = 1000
    nodes = [OpNode("x", "placeholder", "", Policy.NONE, act_out_elems=n), _layer("lin", n),
             _op("add", "add", Policy.FOLLOW, n), _op("relu", "relu", Policy.FOLLOW, n), _layer("head", n),
             OpNode("out", "output", "", Policy.NONE)]
    g = OpGraph(nodes, [("x", "lin"), ("x", "add"), ("lin", "add"), ("add", "relu"), ("relu", "head"),
                        ("head", "out")], "residual")
    plan = {"lin": P.BF16, "head": P.BF16}
    low = lower(g, plan)
    assert low["add"].compute is low["relu"].compute is P.FP32
    assert low["add"].reason == "widest of its inputs x (fp32), lin (bf16)"
    assert not low["add"].rounds and low.rounded() == {}
    assert {(c.value, c.to) for c in low.casts} == {("x", P.BF16), ("lin", P.FP32), ("relu", P.BF16),
                                                    ("head", P.FP32)}
    cm = RooflineCostModel("h100")
    b = cm.breakdown(g, plan)
    assert b.follow == pytest.approx(cm.follow_cost(g["add"], P.FP32) + cm.follow_cost(g["relu"], P.FP32))
    problem = SearchProblem.build(g, _profile(g), cm, budget=1.0)
    c = problem.compiled
    assert c.total_cost(c.from_layers(plan)) == pytest.approx(cm.plan_cost(g, plan))


def test_a_16_bit_follow_op_rounds_unless_it_only_moves_values():
    n = 100
    nodes = [OpNode("x", "placeholder", "", Policy.NONE, act_out_elems=n), _layer("a", n),
             _op("gelu", "gelu", Policy.FOLLOW, n), _op("view", "view", Policy.FOLLOW, n),
             _op("sm", "softmax", Policy.NEVER, n)]
    g = OpGraph(nodes, [("x", "a"), ("a", "gelu"), ("gelu", "view"), ("view", "sm")])
    low = lower(g, {"a": P.FP8_E4M3})
    assert low["a"].compute is P.FP8_E4M3 and low["a"].value is P.BF16  # fp8 layers write bf16
    assert low["gelu"].compute is P.BF16 and low["gelu"].rounds
    assert low["view"].compute is P.BF16 and not low["view"].rounds
    assert low["sm"].reason == "softmax stays fp32 (never)"
    with pytest.raises(PlanError, match="does not have: nope"):
        check_assignment(g, {"nope": P.BF16})


@pytest.mark.parametrize("depth,embed,io", [(3, True, P.FP32), (8, True, P.FP32), (3, False, P.FP16), (8, True, P.FP16)])
def test_the_search_prices_every_plan_as_the_lowering_does(depth, embed, io):
    """The compiled problem (total_cost, delta_cost) and the MILP's objective equal the cost model's
    price of the lowering, on random plans over a residual stream (with fp16 I/O too: without the
    embedding, the fp16 input joins the stream's first FOLLOW ops)."""
    g = residual_mlp(depth, embed=embed).with_io(io)
    cm = RooflineCostModel("h100")
    problem = SearchProblem.build(g, _profile(g), cm, budget=1.0)
    c = problem.compiled
    rng = random.Random(depth)
    for _ in range(20):
        plan = {n: rng.choice((P.FP32, *LOW)) for n in g.layer_names()}
        fmt = c.from_layers(plan)
        assert c.total_cost(fmt) == pytest.approx(cm.plan_cost(g, plan), rel=1e-12)
        # every move from it: delta_cost re-prices only what changes, and must miss nothing
        for u, unit in enumerate(c.units):
            for new in unit.formats:
                moved = list(fmt)
                moved[u] = new
                assert (c.total_cost(fmt) + c.delta_cost(fmt, u, new)
                        == pytest.approx(c.total_cost(moved), rel=1e-12, abs=1e-12 * c.total_cost(moved)))
    # the MILP's optimum at any budget is the cheapest plan the cost model knows of among these
    for budget in (0.0, 5e-4, 1.0):
        plan = MilpStrategy().solve(problem, budget)
        assert plan.cost == pytest.approx(cm.plan_cost(g, plan.assignment), rel=1e-9)
        for f in (P.FP32, *LOW):
            uniform = problem.uniform_assignment(f)
            if c.total_error(c.from_layers(uniform)) <= budget:
                assert plan.cost <= cm.plan_cost(g, uniform) * (1 + 1e-9)


@pytest.mark.parametrize("embed,io", [(True, P.FP32), (False, P.FP16)])
def test_single_layer_roundings_are_the_whole_lowerings(embed, io):
    """Each layer's FOLLOW roundings in each format, decided again only downstream of the layer,
    equal the whole lowering's (with fp16 I/O the stream's first ops round whatever the plan is)."""
    g = residual_mlp(4, embed=embed).with_io(io)
    got = single_layer_roundings(g, g.layer_names(), LOW)
    assert set(got) == {(n, f) for n in g.layer_names() for f in LOW}
    for (layer, fmt), rounded in got.items():
        want = lower(g, {layer: fmt}).rounded()
        assert rounded == want and list(rounded) == list(want), (layer, fmt)
    # with fp16 I/O the first residual add reads the fp16 input and an fp16 fc0, so it rounds
    # (test_apply_plan checks non-empty roundings of captured models against the lowering too)
    assert any(got.values()) == (io is P.FP16)


def test_casts_and_the_milp_grow_linearly_with_depth():
    """A residual stream of L layers has O(L) casts and an O(L) MILP (it had L(L+1)/2 cast groups);
    at L = 100 HiGHS proves the optimum well inside its time limit."""
    sizes = {}
    for depth in (10, 100):
        g = residual_mlp(depth)
        low = lower(g, {n: P.BF16 for n in g.layer_names()[::2]})
        problem = SearchProblem.build(g, _profile(g), RooflineCostModel("h100"), budget=1e-3)
        m, _ = MilpStrategy().build(problem.compiled, 1e-3)
        sizes[depth] = (len(low.casts), len(m.cost), len(m.rows))
        plan = MilpStrategy(time_limit=60.0).solve(problem)
        assert not plan.notes, plan.notes  # optimality proven
    for small, big in zip(sizes[10], sizes[100]):
        assert big <= 12 * small, sizes  # linear: 10x the depth, about 10x the size


def test_fp16_io_rounds_the_inputs_and_hands_the_outputs_on_in_fp16():
    """With fp16 I/O a graph input is an fp16 value (rounded where the graph starts): an fp16 layer
    reads it as it is, an fp32 one through a widening cast; the output reads fp16, so an fp16 result
    needs no cast and a bf16 one is cast to fp16. The search prices the same casts."""
    n = 1000
    nodes = [OpNode("x", "placeholder", "", Policy.NONE, act_out_elems=n), OpNode("ids", "placeholder", "", Policy.NONE),
             _layer("a", n), _layer("b", n), _op("add", "add", Policy.FOLLOW, n), OpNode("out", "output", "", Policy.NONE)]
    g = OpGraph(nodes, [("x", "a"), ("x", "b"), ("a", "add"), ("b", "add"), ("add", "out")], "io", batch=1)
    io16 = g.with_io(P.FP16)
    for plan, casts in (({"a": P.FP16, "b": P.FP16}, set()),
                        ({"a": P.FP16}, {("x", P.FP32), ("a", P.FP32), ("add", P.FP16)}),
                        ({"a": P.BF16, "b": P.BF16}, {("x", P.BF16), ("add", P.FP16)})):
        low = lower(io16, plan)
        assert (low["x"].value, low["x"].rounds) == (P.FP16, True) and low.rounded()["x"] is P.FP16
        assert low["ids"].value is P.FP32 and not low["ids"].rounds  # an integer input stays as it is
        assert low["out"].compute is P.FP16 and low["out"].reason == "graph outputs are fp16"
        assert {(c.value, c.to) for c in low.casts} == casts, plan
        cm = RooflineCostModel("h100")
        c = SearchProblem.build(io16, _profile(io16), cm, budget=1.0).compiled
        assert c.total_cost(c.from_layers(plan)) == pytest.approx(cm.plan_cost(io16, plan))
    # fp32 I/O (the default): the input is fp32 and an fp16 result is cast back for the output
    assert {(c.value, c.to) for c in lower(g, {"a": P.FP16, "b": P.FP16}).casts} == {("x", P.FP16), ("add", P.FP32)}
