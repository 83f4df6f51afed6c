"""plan.json and profile.json are checked on load (no torch): each violation is one line naming the
file, the field and what it expects; valid files round-trip; a file for another model is refused."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable

import pytest

from autoprec.core.errors import PlanError, ProfileError, UsageError
from autoprec.core.formats import Precision
from autoprec.core.opgraph import OpGraph
from autoprec.core.plan import Alternative, Budget, LayerDecision, Pin, PrecisionPlan, TuneStep
from autoprec.core.sensitivity import LayerRanges, RangeStats, SensitivityProfile

from test_plan import graph as chain_graph  # tests/unit is on the path (rootdir import mode)

P = Precision


def graph(names: tuple[str, ...] = ("fc1", "fc2"), width: int = 8) -> OpGraph:
    """A chain of linear layers named ``names`` (test_plan's graph)."""
    return chain_graph(names, width)


def make_plan(g: OpGraph) -> PrecisionPlan:
    return PrecisionPlan(
        model_name=g.model_name, fingerprint=g.fingerprint(), target="h100", objective="latency",
        budget=Budget(0.01, "metric_drop"), strategy="milp", cost=1.0, fp32_cost=2.0, cast_cost=0.1,
        decisions=(LayerDecision("fc1", "net.fc1", "linear", P.FP8_E4M3, "cheapest", 1e-4, 0.5),
                   LayerDecision("fc2", "net.fc2", "linear", P.FP16, "overflow forced", math.inf, 0.5)),
        predicted_error=math.inf, pins=(Pin(P.FP16, "fc2", "force"),),
        steps=(TuneStep(1e-3, 1e-4, 0.002, 1.0, True), TuneStep(math.inf, 1e-4, None, 1.0, True)),
        alternatives=(Alternative("uniform fp16", math.inf, 0.8, False),),
        measured={"drop": 0.002, "allowed_drop": 0.01, "metric": "accuracy", "latency_ms": {"fp32": 1.5}},
        notes=("a note",))


def stats(amax: float) -> RangeStats:
    return RangeStats(amax=amax, frac_over_fp16=0.0, frac_underflow_fp16=0.01, fp8_scale=amax / 448,
                      frac_fp8_saturated=0.0, frac_fp8_flushed=0.001, rms=amax / 4)


def make_profile(g: OpGraph) -> SensitivityProfile:
    fmts = (P.BF16, P.FP16, P.FP8_E4M3)
    return SensitivityProfile(
        model_name=g.model_name, fingerprint=g.fingerprint(), mode="exact", measure="kl", formats=fmts,
        errors={"fc1": {P.BF16: 1e-4, P.FP16: 1e-5, P.FP8_E4M3: 1e-3}, "fc2": {P.BF16: 2e-4, P.FP16: math.inf}},
        ranges={"fc1": LayerRanges((stats(3.5),), stats(7.0), stats(0.4)),
                "fc2": LayerRanges((stats(7.0),), stats(9e4))},
        local_errors={"fc1": {P.BF16: 0.01}}, flags={"fc2": ["fp16 overflow"]}, samples=64, cost_passes=3.0,
        rerun_fraction=0.5, seconds=1.25)


# --- violations --------------------------------------------------------------------------------
Edit = Callable[[dict[str, Any]], Any]  # the saved file's dict -> the text (str) or JSON value to write


def setting(path: str, value: Any) -> Edit:
    """An edit that sets ``path`` (dotted; list indices as numbers) to ``value``."""
    def edit(d: dict[str, Any]) -> dict[str, Any]:
        *head, last = [int(k) if k.isdigit() else k for k in path.split(".")]
        node = d
        for k in head:
            node = node[k]
        node[last] = value
        return d
    return edit


def deleting(path: str) -> Edit:
    def edit(d: dict[str, Any]) -> dict[str, Any]:
        *head, last = path.split(".")
        node = d
        for k in head:
            node = node[int(k) if k.isdigit() else k]
        del node[last]
        return d
    return edit


def duplicate_first_decision(d: dict[str, Any]) -> dict[str, Any]:
    d["decisions"].append(dict(d["decisions"][0]))
    return d


def copying_ranges_to(layer: str) -> Edit:
    def edit(d: dict[str, Any]) -> dict[str, Any]:
        d["ranges"][layer] = d["ranges"]["fc1"]
        return d
    return edit


def adding_onnx_layer(d: dict[str, Any]) -> dict[str, Any]:
    d["errors"]["/blocks.0/MatMul"] = {"bf16": -0.5}
    return d


NAN, INF = float("nan"), float("inf")

PLAN_CASES: list[tuple[str, Edit, str]] = [
    ("not JSON", lambda d: "plan: {fc1: fp16}", "is not valid JSON: Expecting value (line 1, column 1)"),
    ("truncated", lambda d: json.dumps(d)[:120], "truncated?"),
    ("empty file", lambda d: "", "is not valid JSON: it is empty"),
    ("top level a list", lambda d: [d], "top level: got a list, expected an object"),
    ("missing version", deleting("version"), "version: missing, expected 1"),
    ("newer version", setting("version", 2), "written by a newer autoprec (version 2; this one reads version 1)"),
    ("version a string", setting("version", "1"), 'version: got the string "1", expected 1'),
    ("missing model_name", deleting("model_name"), "model_name: missing, expected a string"),
    ("missing decision format", deleting("decisions.0.format"), "decisions[0].format: missing"),
    ("cost a string", setting("cost", "1.5"), 'cost: got the string "1.5", expected a finite number >= 0'),
    ("cost NaN", setting("cost", NAN), "cost: got NaN, expected a finite number >= 0"),
    ("fp32_cost infinite", setting("fp32_cost", INF), "fp32_cost: got Infinity"),
    ("negative error", setting("decisions.0.predicted_error", -1.0), "decisions[0].predicted_error: got -1.0"),
    ("NaN error", setting("predicted_error", NAN), "predicted_error: got NaN, expected a number >= 0 (Infinity"),
    ("unknown format", setting("decisions.1.format", "fp4"),
     'decisions[1].format: got the string "fp4", expected one of fp32'),
    ("layer twice", duplicate_first_decision, 'decisions[2].layer: got the string "fc1" a second time'),
    ("misspelt field", setting("decisions.0.fromat", "bf16"), "decisions[0].fromat: unknown field, expected one of"),
    ("unknown budget kind", setting("budget.kind", "accuracy"), "budget.kind: got the string"),
    ("budget not an object", setting("budget", 0.01), "budget: got 0.01, expected an object"),
    ("bad pin regex", setting("pins.0.pattern", "fc("), "pins[0].pattern: got the string \"fc(\" (missing )"),
    ("step flag a string", setting("steps.0.accepted", "yes"),
     "steps[0].accepted: got the string \"yes\", expected true or false"),
    ("allowed_drop NaN", setting("measured.allowed_drop", NAN), "measured.allowed_drop: got NaN"),
    ("fingerprint not hex", setting("fingerprint", "XYZ"),
     "fingerprint: got the string \"XYZ\", expected a fingerprint"),
    ("layer name empty", setting("decisions.0.layer", ""),
     "decisions[0].layer: got the string \"\", expected a non-empty string"),
]

PROFILE_CASES: list[tuple[str, Edit, str]] = [
    ("not JSON", lambda d: "errors = {}", "is not valid JSON: Expecting value (line 1, column 1)"),
    ("truncated", lambda d: json.dumps(d)[:200], "truncated?"),
    ("top level a string", lambda d: '"fc1"', "top level: got the string \"fc1\", expected an object"),
    ("newer version", setting("version", 7), "written by a newer autoprec (version 7; this one reads version 1)"),
    ("unknown version", setting("version", 0), "version: got 0, expected 1"),
    ("missing errors", deleting("errors"), "errors: missing, expected an object"),
    ("NaN amax", setting("ranges.fc1.inputs.0.amax", NAN),
     "ranges.fc1.inputs[0].amax: got NaN, expected a finite number >= 0"),
    ("infinite amax", setting("ranges.fc1.inputs.0.amax", INF), "ranges.fc1.inputs[0].amax: got Infinity"),
    ("negative amax", setting("ranges.fc2.output.amax", -3.0), "ranges.fc2.output.amax: got -3.0"),
    ("amax a string", setting("ranges.fc1.weight.amax", "0.4"), 'ranges.fc1.weight.amax: got the string "0.4"'),
    ("fraction above 1", setting("ranges.fc1.output.frac_over_fp16", 2),
     "ranges.fc1.output.frac_over_fp16: got 2, expected a finite number in [0, 1]"),
    ("missing output ranges", deleting("ranges.fc1.output"), "ranges.fc1.output: missing, expected an object"),
    ("weight ranges a list", setting("ranges.fc1.weight", []), "ranges.fc1.weight: got a list, expected an object"),
    ("unknown format key", setting("errors.fc1.fp4", 0.1),
     'errors.fc1.fp4: got the string "fp4", expected one of fp32'),
    ("unknown format in list", setting("formats.1", "fp4"), 'formats[1]: got the string "fp4"'),
    ("NaN error", setting("errors.fc2.bf16", NAN),
     "errors.fc2.bf16: got NaN, expected a number >= 0 (Infinity allowed, NaN not)"),
    ("error a string", setting("local_errors.fc1.bf16", "small"), "local_errors.fc1.bf16: got the string \"small\""),
    ("unknown mode", setting("mode", "slow"), 'mode: got the string "slow", expected one of exact, fast'),
    ("samples not an integer", setting("samples", 1.5), "samples: got 1.5, expected an integer >= 0"),
    ("ranges of a layer without errors", copying_ranges_to("fc9"),
     'ranges.fc9: layer "fc9" is not in errors, expected only layers of errors'),
    ("flags not strings", setting("flags.fc2", [1]), "flags.fc2[0]: got 1, expected a string"),
    ("ONNX layer name", adding_onnx_layer, 'errors["/blocks.0/MatMul"].bf16: got -0.5, expected a number >= 0'),
    ("misspelt field", setting("sample", 64), "sample: unknown field, expected one of"),
]


def _write(tmp_path: Path, name: str, saved: Path, edit: Edit) -> Path:
    value = edit(json.loads(saved.read_text()))
    path = tmp_path / name
    path.write_text(value if isinstance(value, str) else json.dumps(value))
    return path


@pytest.mark.parametrize("case, edit, says", PLAN_CASES, ids=[c[0] for c in PLAN_CASES])
def test_plan_violations_are_one_line_plan_errors(tmp_path: Path, case: str, edit: Edit, says: str) -> None:
    path = _write(tmp_path, "plan.json", make_plan(graph()).save(tmp_path / "good.json"), edit)
    with pytest.raises(PlanError) as e:
        PrecisionPlan.load(path)
    msg = str(e.value)
    assert type(e.value) is PlanError and "\n" not in msg
    assert str(path) in msg and says in msg, msg


@pytest.mark.parametrize("case, edit, says", PROFILE_CASES, ids=[c[0] for c in PROFILE_CASES])
def test_profile_violations_are_one_line_profile_errors(tmp_path: Path, case: str, edit: Edit, says: str) -> None:
    path = _write(tmp_path, "profile.json", make_profile(graph()).save(tmp_path / "good.json"), edit)
    with pytest.raises(ProfileError) as e:
        SensitivityProfile.load(path)
    msg = str(e.value)
    assert type(e.value) is ProfileError and "\n" not in msg
    assert str(path) in msg and says in msg, msg


def test_text_without_a_file_is_named_by_kind() -> None:
    with pytest.raises(ProfileError, match=r"^malformed profile: ranges\.fc1\.inputs\[0\]\.amax: got NaN"):
        SensitivityProfile.from_json(make_profile(graph()).to_json().replace('"amax": 3.5', '"amax": NaN'))
    with pytest.raises(PlanError, match=r"^plan is not valid JSON"):
        PrecisionPlan.from_json("{")
    with pytest.raises(UsageError, match=r"cannot read profile .*missing\.json"):
        SensitivityProfile.load(Path("missing.json"))


def test_not_utf8_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "plan.json"
    path.write_bytes(b"\xff\xfe{")
    with pytest.raises(PlanError, match="not a JSON text file"):
        PrecisionPlan.load(path)


# --- valid files -------------------------------------------------------------------------------
def test_plan_round_trips_through_its_file(tmp_path: Path) -> None:
    plan = make_plan(graph())
    path = plan.save(tmp_path / "plan.json")
    assert json.loads(path.read_text())["version"] == 1
    back = PrecisionPlan.load(path)
    assert back == plan and back.to_json() == plan.to_json()


def test_profile_round_trips_through_its_file(tmp_path: Path) -> None:
    prof = make_profile(graph())
    path = prof.save(tmp_path / "profile.json")
    assert json.loads(path.read_text())["version"] == 1  # written on save
    back = SensitivityProfile.load(path)
    assert back == prof and back.to_json() == prof.to_json()
    assert back.errors["fc2"][P.FP16] == math.inf  # an overflow's error is infinite, and valid


def test_a_profile_without_version_reads_as_version_1(tmp_path: Path) -> None:
    """profile.json had no version field before PROFILE_VERSION; its fields have not changed since."""
    d = make_profile(graph()).to_dict()
    del d["version"]
    assert SensitivityProfile.from_dict(d) == make_profile(graph())


# --- the model a file belongs to ---------------------------------------------------------------
def test_files_refuse_another_model() -> None:
    g = graph()
    make_plan(g).check_against(g)
    make_profile(g).check_against(g)
    other, unfit = graph(("fc1", "fc3")), "for tiny does not fit tiny: unknown layers fc2; missing layers fc3$"
    with pytest.raises(ProfileError, match="^profile " + unfit):
        make_profile(g).check_against(other)
    with pytest.raises(ProfileError, match=r"other kinds or shapes \(fingerprint .*\): re-run autoprec profile"):
        make_profile(g).check_against(graph(width=16))
    with pytest.raises(PlanError, match="^plan " + unfit):
        make_plan(g).check_against(other)
