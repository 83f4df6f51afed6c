"""PrecisionPlan and pins (no torch): parsing, JSON round trip, atomic save, model checks."""

from __future__ import annotations

import json
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from autoprec.core.errors import PlanError, UsageError
from autoprec.core.formats import Precision
from autoprec.core.opgraph import OpGraph, OpNode, Policy
from autoprec.core.plan import (
    Alternative, Budget, LayerDecision, Pin, PrecisionPlan, TuneStep, parse_pin, parse_pins,
)

P = Precision


def graph(names=("a", "b", "c"), width=8) -> OpGraph:
    nodes = [OpNode("x", "input", "", Policy.NONE, act_out_elems=width)]
    edges, prev = [], "x"
    for n in names:
        nodes.append(OpNode(n, "linear", f"net.{n}", Policy.ALWAYS, ((width,),), (width,), 2 * width * width,
                            width * width, width, width))
        edges.append((prev, n))
        prev = n
    return OpGraph(nodes, edges, "tiny")


def plan_for(g: OpGraph, fmt: Precision = P.BF16) -> PrecisionPlan:
    return PrecisionPlan(
        model_name=g.model_name, fingerprint=g.fingerprint(), target="h100", objective="latency",
        budget=Budget(1e-3, "kl"), strategy="milp", cost=1.0, fp32_cost=2.0,
        decisions=tuple(LayerDecision(op.name, op.scope, op.kind, fmt, "cheapest format within budget", 1e-4, 0.5)
                        for op in g.layers()))


# --- pins --------------------------------------------------------------------------------------
def test_parse_pins():
    assert parse_pin("fp32:head|embed") == Pin(P.FP32, "head|embed", "keep")
    assert parse_pin("head") == Pin(P.FP32, "head", "keep")  # --keep with a bare regex means fp32
    assert parse_pin("bf16:blocks\\.0", "force") == Pin(P.BF16, "blocks\\.0", "force")
    assert parse_pin("fp8:(?:q|k)") == Pin(P.FP8_E4M3, "(?:q|k)", "keep")
    assert parse_pin("(?:a|b)") == Pin(P.FP32, "(?:a|b)", "keep")  # the colon belongs to the regex
    assert str(parse_pin("fp32:head")) == "--keep fp32:head"
    assert parse_pins(["fp32:a", "fp16:b"], "force")[1] == Pin(P.FP16, "b", "force")
    assert parse_pin("bf16:x").allowed() == {P.FP32, P.BF16}
    assert parse_pin("bf16:x", "force").allowed() == {P.BF16}


@pytest.mark.parametrize("text, source, match", [
    ("fp33:head", "keep", "unknown format"),
    ("fp16:head(", "keep", "bad --keep pattern"),
    ("head", "force", "FORMAT:REGEX"),
    ("fp16:", "force", "empty pattern"),
    ("fp16:x", "sometimes", "pin source"),
])
def test_bad_pins_are_one_line_usage_errors(text, source, match):
    with pytest.raises(UsageError, match=match) as e:
        parse_pin(text, source)
    assert "\n" not in str(e.value)


def test_pin_matches_scope_name_and_kind():
    op = OpNode("fc_3", "linear", "model.head", Policy.ALWAYS)
    assert parse_pin("head").matches(op)
    assert parse_pin("fp16:^fc_").matches(op)
    assert parse_pin("fp16:^linear$").matches(op)
    assert not parse_pin("fp16:conv").matches(op)


# --- JSON ----------------------------------------------------------------------------------------
names = st.text("abcdefghij._0123456789", min_size=1, max_size=12)
finite = st.floats(0, 1e6, allow_nan=False)


@st.composite
def plans(draw) -> PrecisionPlan:
    layers = draw(st.lists(names, min_size=1, max_size=6, unique=True))
    return PrecisionPlan(
        model_name=draw(names), fingerprint=draw(st.text("0123456789abcdef", max_size=16)),
        target=draw(st.sampled_from(["h100", "a100", "l4"])), objective=draw(st.sampled_from(["latency", "memory"])),
        budget=Budget(draw(finite), draw(st.sampled_from(["kl", "rel_mse", "metric_drop"]))),
        decisions=tuple(LayerDecision(n, draw(names), "linear", draw(st.sampled_from(list(P))), draw(st.text(max_size=30)),
                                      draw(finite), draw(finite)) for n in layers),
        strategy=draw(st.sampled_from(["milp", "greedy"])), cost=draw(finite), fp32_cost=draw(finite),
        cast_cost=draw(finite), memory_bytes=draw(finite), fp32_memory_bytes=draw(finite),
        predicted_error=draw(finite), pins=tuple(draw(st.lists(st.builds(Pin, st.sampled_from(list(P)), names,
                                                                             st.sampled_from(["keep", "force"])), max_size=2))),
        measured=draw(st.fixed_dictionaries({}, optional={"drop": finite, "evaluations": st.integers(0, 9),
                                                          "metric_fp32": finite})),
        steps=tuple(draw(st.lists(st.builds(TuneStep, finite, finite, st.none() | finite, finite, st.booleans()),
                                  max_size=3))),
        alternatives=tuple(draw(st.lists(st.builds(Alternative, names, finite, finite, st.booleans()), max_size=3))),
    )


@settings(max_examples=60, deadline=None)
@given(plans())
def test_json_round_trip(plan):
    text = plan.to_json()
    back = PrecisionPlan.from_json(text)
    assert back == plan
    assert back.to_json() == text
    assert list(json.loads(text)) == sorted(json.loads(text))  # sorted keys


def test_save_is_atomic_and_loads_back(tmp_path):
    g = graph()
    plan = plan_for(g).with_measured(metric_fp32=0.98, metric_tuned=0.975, drop=0.005, evaluations=3)
    path = plan.save(tmp_path / "sub" / "plan.json")
    assert os.listdir(path.parent) == ["plan.json"]  # no temp file left behind
    back = PrecisionPlan.load(path)
    assert back == plan and back.measured["evaluations"] == 3
    assert back.speedup == 2.0 and back.assignment == {"a": P.BF16, "b": P.BF16, "c": P.BF16}
    plan_for(g, P.FP16).save(path)  # overwrite in place
    assert PrecisionPlan.load(path).decision("a").format is P.FP16


def test_malformed_plans_raise_plan_error(tmp_path):
    with pytest.raises(PlanError, match="not valid JSON"):
        PrecisionPlan.from_json("{")
    with pytest.raises(PlanError, match="malformed plan"):
        PrecisionPlan.from_json('{"model_name": "x"}')
    bad = json.loads(plan_for(graph()).to_json())
    bad["decisions"][0]["format"] = "fp12"
    with pytest.raises(PlanError, match="malformed plan"):
        PrecisionPlan.from_dict(bad)
    with pytest.raises(UsageError, match="cannot read plan"):  # a path the user typed
        PrecisionPlan.load(tmp_path / "missing.json")
    with pytest.raises(PlanError, match="not in the plan"):
        plan_for(graph()).decision("zzz")


# --- applying a plan to a model ------------------------------------------------------------------
def test_check_against_accepts_its_own_model():
    g = graph()
    plan_for(g).check_against(g)
    plan_for(g).check_against(OpGraph.from_json(g.to_json()))


def test_check_against_names_unknown_and_missing_layers():
    plan = plan_for(graph(("a", "b", "c")))
    with pytest.raises(PlanError) as e:
        plan.check_against(graph(("a", "b2", "c", "d")))
    msg = str(e.value)
    assert "unknown layers b" in msg and "missing layers b2, d" in msg and "\n" not in msg


def test_check_against_detects_other_shapes():
    plan = plan_for(graph(width=8))
    with pytest.raises(PlanError, match="other kinds or shapes"):
        plan.check_against(graph(width=16))


def test_long_name_lists_are_shortened():
    plan = plan_for(graph(tuple(f"l{i}" for i in range(20))))
    with pytest.raises(PlanError, match="and 12 more"):
        plan.check_against(graph(("x1",)))
