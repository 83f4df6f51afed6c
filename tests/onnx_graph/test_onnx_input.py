"""Tuning models given as .onnx files written by other software: the analyser's groups, the MapNodes
pass, data loading, agreement with the torch path, and `autoprec tune model.onnx` end to end."""

from __future__ import annotations

import importlib.util
import io
import json
import math
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnx.version_converter
import pytest
import torch
from onnx_graph_models import block_opset13, if_model, init, loop_model, make, mlp_opset13, vi
from onnx import helper

from autoprec.api import tune_onnx
from autoprec.torch.capture import capture
from autoprec.cli import main
from autoprec.core.errors import PlanError, UsageError
from autoprec.onnx.apply import apply_plan_analysed
from autoprec.core.formats import Precision
from autoprec.onnx.model import CALIBRATION_SAMPLES, OnnxModel, profile_onnx
from autoprec.core.plan import PrecisionPlan
from autoprec.torch.profile import profile
from autoprec.torch.quantize import quantize
from autoprec.ort.runtime import open_session
from autoprec.torch.semantics import quantize_weight
from autoprec.torch.spec import load_model_spec
from autoprec.deploy.verify import verify_onnx_input
from autoprec.torch.passes import act_amax_from_profile, apply_plan
from autoprec.core.passes import PassManager
from autoprec.onnx.passes.base import GROUP, LAYER, MODEL_MODE, ROLE, ROLE_CORE, get_meta, model_meta
from autoprec.onnx.passes.map_nodes import MapNodes

ROOT = Path(__file__).resolve().parents[2]
FP16, BF16, E4M3 = Precision.FP16, Precision.BF16, Precision.FP8_E4M3


def _legacy_example():
    spec = importlib.util.spec_from_file_location("onnx_example", ROOT / "scripts" / "onnx_example.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def legacy_cnn(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """digits_cnn written by torch's legacy TorchScript exporter at opset 13, with its held-out data."""
    return _legacy_example().write_example("digits_cnn", tmp_path_factory.mktemp("legacy"))


def mlp_path(tmp_path: Path) -> Path:
    p = tmp_path / "mlp.onnx"
    onnx.save(mlp_opset13(), str(p))
    return p


def _block_data(n: int = 96) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(0).standard_normal((n, 6, 8)).astype(np.float32)}


def _ort(model: onnx.ModelProto, feeds: dict[str, np.ndarray], outputs: list[str]) -> list[np.ndarray]:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    m.graph.output.extend(onnx.ValueInfoProto(name=o) for o in outputs if o not in {x.name for x in m.graph.output})
    return open_session(m.SerializeToString(), "cpu").session.run(outputs, feeds)


# --- the analyser's groups and the MapNodes pass -----------------------------------------------------


def test_analyser_groups_decomposed_ops_and_bias_adds() -> None:
    a = OnnxModel.load(block_opset13(), _block_data()).analysis
    groups: dict[str, list[str]] = {}
    for node, head in a.groups.items():
        groups.setdefault(head, []).append(node)
    assert groups["LayerNormalization_0"] == ["LayerNormalization_0"]  # ReduceMean_0 .. Add_8, fused into one
    assert groups["MatMul_9"] == ["MatMul_9", "Add_10"]  # the bias belongs to its layer
    assert groups["Gelu_12"] == ["Gelu_12"]  # the erf GELU (Div_11 .. Mul_15), fused into one node
    assert groups["Add_18"] == ["Add_18"]  # the residual add reads no constant: its own op
    assert a.graph.layer_names() == ["MatMul_9", "MatMul_16", "Gemm_20"]
    assert "layer_norm" in a.reasons["LayerNormalization_0"]


def test_map_nodes_marks_layers_and_leaves_ops_alone() -> None:
    a = OnnxModel.load(block_opset13(), _block_data()).analysis
    before = [n.op_type for n in a.model.graph.node]
    model = onnx.ModelProto()
    model.CopyFrom(a.model)
    out = PassManager([MapNodes(a)]).run(model).graph
    assert [n.op_type for n in out.graph.node] == before
    cores = {get_meta(n, LAYER) for n in out.graph.node if get_meta(n, ROLE) == ROLE_CORE}
    assert cores == {"MatMul_9", "MatMul_16", "Gemm_20"}
    bias = next(n for n in out.graph.node if n.name == "Add_10")
    assert get_meta(bias, GROUP) == "MatMul_9" and get_meta(bias, LAYER) == "MatMul_9"
    assert get_meta(bias, ROLE) is None


def test_map_nodes_refuses_another_model() -> None:
    a = OnnxModel.load(block_opset13(), _block_data()).analysis
    other = OnnxModel.load(mlp_opset13(), {"x": np.ones((4, 8), np.float32)}).analysis.model
    with pytest.raises(Exception, match="not the one that was analysed"):
        PassManager([MapNodes(a)]).run(other)


def test_emulation_rounds_each_group_result_once() -> None:
    """{MatMul_9: fp16}: the layer's result (after its bias add) and the GELU after it are fp16 values;
    the MatMul's own product (inside the group) and the layer norm before it are not rounded."""
    om = OnnxModel.load(block_opset13(), _block_data())
    feeds = om.batches()[0]
    emu = apply_plan_analysed(om.analysis, {"MatMul_9": FP16}, None, "emulate")
    onnx.checker.check_model(emu, full_check=True)
    h, g, ln, y = _ort(emu, feeds, ["h", "g", "ln", "y"])
    h32, g32, ln32, y32 = _ort(om.analysis.model, feeds, ["h", "g", "ln", "y"])
    for v, ref in ((h, h32), (g, g32)):
        t = torch.from_numpy(v)
        assert torch.equal(quantize(t, FP16), t), "a 16-bit group's result is an fp16 value"
        assert np.abs(v - ref).max() <= 2 * FP16.eps * np.abs(ref).max()
    assert np.array_equal(ln, ln32)  # upstream of the layer: untouched
    h0 = torch.from_numpy(_ort(emu, feeds, ["h0"])[0])
    assert not torch.equal(quantize(h0, FP16), h0), "no rounding between the MatMul and its bias add"
    assert not np.array_equal(y, y32)


def test_a_bf16_rounding_before_a_decomposed_layer_norm_loads_in_ort() -> None:
    """ORT's LayerNormFusionL1 takes a bf16 Cast round trip into the fused op and fails to load the
    session (onnxruntime 1.31); runtime disables it. (The analyser fuses the layer norms it matches
    itself; this is for the forms it leaves as they are.)"""
    rng = np.random.default_rng(7)
    ln = block_opset13().graph.node[:9]  # the decomposed layer norm of x, writing "ln"
    for n in ln:
        n.input[:] = ["hr" if i == "x" else i for i in n.input]
    nodes = [helper.make_node("MatMul", ["x", "w0"], ["h"]),
             helper.make_node("Cast", ["h"], ["hb"], to=onnx.TensorProto.BFLOAT16),
             helper.make_node("Cast", ["hb"], ["hr"], to=onnx.TensorProto.FLOAT),
             *ln, helper.make_node("MatMul", ["ln", "w3"], ["y"])]
    inits = [t for t in block_opset13().graph.initializer if t.name in ("two", "eps", "gamma", "beta")]
    inits += [init("w0", rng.standard_normal((8, 8)).astype(np.float32)),
              init("w3", rng.standard_normal((8, 3)).astype(np.float32))]
    model = onnx.version_converter.convert_version(make(nodes, [vi("x", ["N", 8])], [vi("y", ["N", 3])], inits), 21)
    x = rng.standard_normal((4, 8)).astype(np.float32)  # at opset 21, as autoprec writes its graphs
    y = open_session(model.SerializeToString(), "cpu").session.run(None, {"x": x})[0]
    assert np.isfinite(y).all() and y.shape == (4, 3)


# --- data ---------------------------------------------------------------------------------------------


def _npz(tmp_path: Path, name: str, **arrays: np.ndarray) -> Path:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    p = tmp_path / name
    p.write_bytes(buf.getvalue())
    return p


def test_data_by_name_by_order_and_as_one_npy(tmp_path: Path) -> None:
    x = np.random.default_rng(1).standard_normal((10, 8))  # float64: converted to the model's float32
    by_name = OnnxModel.load(mlp_opset13(), _npz(tmp_path, "a.npz", x=x))
    buf = io.BytesIO()
    np.savez(buf, x)
    (tmp_path / "b.npz").write_bytes(buf.getvalue())
    by_order = OnnxModel.load(mlp_opset13(), tmp_path / "b.npz")
    np.save(tmp_path / "c.npy", x)
    one = OnnxModel.load(mlp_opset13(), tmp_path / "c.npy")
    for m in (by_name, by_order, one):
        assert m.feeds["x"].dtype == np.float32 and np.array_equal(m.feeds["x"], x.astype(np.float32))
    assert by_name.analysis.graph.fingerprint() == OnnxModel.load(
        mlp_opset13(), {"x": x[:3]}).analysis.graph.fingerprint()  # the plan does not depend on the data size


@pytest.mark.parametrize("arrays, labels, message", [
    ({"y": np.ones((4, 8), np.float32)}, None, "no array for model input"),
    ({"x": np.ones((4, 3, 8), np.float32)}, None, "rank 2"),
    ({"x": np.ones((4, 8), np.complex64)}, None, "the model takes float32"),
    ({"x": np.ones((4, 8), np.float32)}, np.zeros(5, np.int64), "labels hold 5 samples"),
])
def test_bad_data_is_one_line(tmp_path: Path, arrays: dict, labels: np.ndarray | None, message: str) -> None:
    with pytest.raises(UsageError, match=message) as e:
        OnnxModel.load(mlp_opset13(), _npz(tmp_path, "d.npz", **arrays), labels)
    assert "\n" not in str(e.value)


def test_labels_choose_the_metric() -> None:
    x = np.random.default_rng(5).standard_normal((20, 8)).astype(np.float32)
    acc = OnnxModel.load(mlp_opset13(), {"x": x}, np.arange(20) % 3).metric()
    mse = OnnxModel.load(mlp_opset13(), {"x": x}, np.zeros((20, 3), np.float32)).metric()
    assert (acc.name, acc.higher_is_better, mse.name, mse.higher_is_better) == ("accuracy", True, "mse", False)
    model = OnnxModel.load(mlp_opset13(), {"x": x}).analysis.model
    (y,), = OnnxModel.load(mlp_opset13(), {"x": x}).outputs(model)
    assert acc.measure(model) == float(np.mean(y.argmax(-1) == np.arange(20) % 3))
    assert mse.measure(model) == pytest.approx(float(np.mean(y.astype(np.float64) ** 2)))
    with pytest.raises(UsageError, match="need class scores on the last output axis"):
        OnnxModel.load(mlp_opset13(), {"x": x}, np.zeros((20, 3), np.int64)).metric().measure(model)


# --- agreement with the torch path ---------------------------------------------------------------------


def _legacy_lm(module: torch.nn.Module) -> OnnxModel:
    """TinyLM (tests/conftest.py: token and position tables) written by torch's legacy exporter at
    opset 13, as scripts/onnx_example.py writes the zoo, with 128 sequences of token ids."""
    tokens = np.random.default_rng(0).integers(0, 20, (128, 8))
    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the legacy exporter's deprecation notice
        torch.onnx.export(module, (torch.from_numpy(tokens[:4]),), buf, dynamo=False, opset_version=13,
                          input_names=["input"], output_names=["output"], dynamic_axes={"input": {0: "batch"}})
    return OnnxModel.load(onnx.load_from_string(buf.getvalue()), {"input": tokens})


@pytest.mark.parametrize("which", ["digits_cnn", "tiny_lm"])
def test_legacy_export_emulation_agrees_with_torch_emulation(which: str, request: pytest.FixtureRequest) -> None:
    """The same plan applied to the torch model (torch passes) and to its ONNX export by other software
    (analyser + ONNX passes) gives the same outputs: plan layers map by module scope. tiny_lm's tables
    are Gathers of initializers on the ONNX side, embedding layers on both, in every format (fp8:
    DequantizeLinear with per-row scales, rows rounded to bf16)."""
    if which == "digits_cnn":
        onnx_path, data, _ = request.getfixturevalue("legacy_cnn")
        om = OnnxModel.load(onnx_path, data)
        spec = load_model_spec(ROOT / "models" / "digits_cnn.py")
        module, calibration = spec.model(), spec.calibration_data()
    else:
        module = request.getfixturevalue("tiny_lm")
        om = _legacy_lm(module)
        calibration = [(torch.from_numpy(om.feeds["input"][i:i + 32]),) for i in range(0, 128, 32)]
        assert [op.kind for op in om.analysis.graph.layers()][:2] == ["embedding", "embedding"]
    cap = capture(module, calibration[0], name=which)
    torch_amax = act_amax_from_profile(profile(cap, calibration, mode="fast", time_reference=False))
    by_scope = {op.scope: op.name for op in om.analysis.graph.layers()}
    assert sorted(by_scope) == sorted(cap.graph.layer_names())
    x = torch.from_numpy(om.feeds["input"][:128])
    for fmt in (BF16, FP16, E4M3):
        plan = {name: fmt for name in cap.graph.layer_names()}
        want = apply_plan(cap, plan, torch_amax)(x).detach().numpy()
        onnx_plan = {by_scope[k]: f for k, f in plan.items()}
        onnx_amax = {by_scope[k]: a for k, a in torch_amax.items()}
        (got,), = om.outputs(om.build(onnx_plan, onnx_amax), [{"input": x.numpy()}])
        rel = np.linalg.norm(got - want) / np.linalg.norm(want)
        assert rel <= fmt.eps, (fmt, rel)
        assert (got.argmax(-1) == want.argmax(-1)).mean() >= 0.995, fmt


def test_profile_trial_is_the_applied_plan(legacy_cnn: tuple[Path, Path, Path]) -> None:
    """A profile trial's error is the error of the model the plan {layer: fmt} builds (by construction,
    checked): re-measure one trial from the built emulation graph."""
    onnx_path, data, _ = legacy_cnn
    om = OnnxModel.load(onnx_path, data)
    prof = profile_onnx(om, (FP16, E4M3))
    layer = om.analysis.graph.layer_names()[1]
    assert prof.mode == "exact" and set(prof.errors) == set(om.analysis.graph.layer_names())
    batches = om.calibration()
    ref = [torch.from_numpy(a) for a, in om.outputs(om.analysis.model, batches)]
    got = [torch.from_numpy(a) for a, in om.outputs(om.build({layer: E4M3}, act_amax_from_profile(prof)), batches)]
    lp = [torch.log_softmax(r.double(), -1) for r in ref]
    kl = sum(float((p.exp() * (p - torch.log_softmax(g.double(), -1))).sum()) for p, g in zip(lp, got))
    n = sum(r.shape[0] for r in ref)
    assert prof.errors[layer][E4M3] == pytest.approx(kl / n, rel=1e-9)
    assert all(0 < prof.errors[k][FP16] < prof.errors[k][E4M3] for k in prof.errors)


def _trial_errors(om: OnnxModel, prof, fmts) -> dict[tuple[str, Precision], float]:
    """Each single-layer trial run whole on ONNX Runtime: its mean KL against the fp32 outputs."""
    batches = om.calibration()
    ref = [torch.from_numpy(a) for a, in om.outputs(om.analysis.model, batches)]
    lp = [torch.log_softmax(r.double(), -1) for r in ref]
    n = sum(r.shape[:-1].numel() for r in ref)
    amax = act_amax_from_profile(prof)
    out = {}
    for layer in om.analysis.graph.layer_names():
        for fmt in fmts:
            got = [torch.from_numpy(a) for a, in om.outputs(om.build({layer: fmt}, amax), batches)]
            out[(layer, fmt)] = sum(float((p.exp() * (p - torch.log_softmax(g.double(), -1))).sum())
                                    for p, g in zip(lp, got)) / n
    return out


def test_profile_onnx_runs_each_trial_from_where_it_departs() -> None:
    """A trial runs only the nodes its layer's format changes and those after them, on the fp32 run's
    values of what they read (the block's head re-runs one Gemm, not the block): the errors are
    those of the whole trial graph. With control flow (an If reading outer values) trials run whole."""
    feeds = {"x": np.random.default_rng(6).standard_normal((64, 6, 8)).astype(np.float32)}
    om = OnnxModel.load(block_opset13(), feeds)
    prof = profile_onnx(om, (BF16, E4M3))
    assert 0 < prof.rerun_fraction < 1  # the layer norm before the first layer never re-runs
    for (layer, fmt), want in _trial_errors(om, prof, (BF16, E4M3)).items():
        assert prof.errors[layer][fmt] == pytest.approx(want, rel=1e-9), (layer, fmt)
    n = helper.make_node
    branch = [helper.make_graph([n("Relu", ["h"], ["t"])], "then", [], [vi("t", ["N", 4])]),
              helper.make_graph([n("Neg", ["h"], ["t2"])], "else", [], [vi("t2", ["N", 4])])]
    rng = np.random.default_rng(7)
    model = make([n("MatMul", ["x", "w"], ["h"], name="mm"),
                  n("If", ["c"], ["y0"], name="branch", then_branch=branch[0], else_branch=branch[1]),
                  n("MatMul", ["y0", "w2"], ["y"], name="head")],
                 [vi("x", ["N", 8]), vi("c", [], onnx.TensorProto.BOOL)], [vi("y", ["N", 3])],
                 [init("w", rng.standard_normal((8, 4)).astype(np.float32)),
                  init("w2", rng.standard_normal((4, 3)).astype(np.float32))])
    om = OnnxModel.load(model, {"x": rng.standard_normal((16, 8)).astype(np.float32), "c": np.array(False)})
    prof = profile_onnx(om, (BF16,))
    assert prof.rerun_fraction == 1.0 and om.analysis.graph.layer_names()
    for (layer, fmt), want in _trial_errors(om, prof, (BF16,)).items():
        assert prof.errors[layer][fmt] == pytest.approx(want, rel=1e-9), (layer, fmt)


def test_profile_onnx_trials_tables_in_fp8(tiny_lm: torch.nn.Module) -> None:
    """Embedding tables of an ONNX input are profiled in fp8 like every layer, and a table's trial is
    the model the plan {table: fp8} builds (no calibrated amax needed: it reads no activation)."""
    om = _legacy_lm(tiny_lm)
    prof = profile_onnx(om, (BF16, E4M3))
    tables = [op.name for op in om.analysis.graph.layers() if op.kind == "embedding"]
    assert len(tables) == 2 and set(prof.errors) == set(om.analysis.graph.layer_names())
    for t in tables:
        assert 0 < prof.errors[t][BF16] < prof.errors[t][E4M3] < math.inf, t
    batches = om.calibration()
    ref = [torch.from_numpy(a) for a, in om.outputs(om.analysis.model, batches)]
    got = [torch.from_numpy(a) for a, in om.outputs(om.build({tables[0]: E4M3}, None), batches)]
    lp = [torch.log_softmax(r.double(), -1) for r in ref]
    kl = sum(float((p.exp() * (p - torch.log_softmax(g.double(), -1))).sum()) for p, g in zip(lp, got))
    n = sum(r.shape[:-1].numel() for r in ref)
    assert prof.errors[tables[0]][E4M3] == pytest.approx(kl / n, rel=1e-9)


def test_a_table_read_by_a_gather_and_a_matmul_gets_scales_for_each() -> None:
    """One initializer, two fp8 layers: the Gather's table takes a scale per row (axis 0), the
    MatMul's weight one per output column (axis 1); neither may reuse the other's codes."""
    table = np.random.default_rng(3).standard_normal((5, 4)).astype(np.float32)
    nodes = [helper.make_node("Gather", ["table", "idx"], ["rows"], name="emb"),
             helper.make_node("MatMul", ["x", "table"], ["proj_out"], name="proj")]
    model = make(nodes, [vi("idx", ["N", 3], onnx.TensorProto.INT64), vi("x", ["N", 5])],
                 [vi("rows", ["N", 3, 4]), vi("proj_out", ["N", 4])], [init("table", table)])
    feeds = {"idx": np.random.default_rng(4).integers(0, 5, (8, 3)),
             "x": np.random.default_rng(5).standard_normal((8, 5)).astype(np.float32)}
    om = OnnxModel.load(model, feeds)
    assert [(op.name, op.kind) for op in om.analysis.graph.layers()] == [("emb", "embedding"), ("proj", "linear")]
    built = om.build({"emb": E4M3, "proj": E4M3}, {"proj": (float(np.abs(feeds["x"]).max()),)})
    dqs = [n for n in built.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in
           {t.name for t in built.graph.initializer} and "table" in n.input[0]]
    assert sorted(helper.get_attribute_value(a) for n in dqs for a in n.attribute if a.name == "axis") == [0, 1]
    assert len({n.input[0] for n in dqs}) == 2
    rows = open_session(built.SerializeToString(), "cpu").session.run(["rows"], feeds)[0]
    want = quantize(quantize_weight(torch.from_numpy(table), E4M3), BF16)[torch.from_numpy(feeds["idx"])]
    assert np.array_equal(rows, want.numpy())


# --- tune end to end ------------------------------------------------------------------------------------


def test_cli_tunes_a_legacy_export_end_to_end(legacy_cnn: tuple[Path, Path, Path], tmp_path: Path) -> None:
    onnx_path, data, labels = legacy_cnn
    out = tmp_path / "out"
    assert main(["tune", str(onnx_path), "--data", str(data), "--labels", str(labels), "--budget", "0.5%",
                 "--out", str(out)]) == 0
    plan = PrecisionPlan.load(out / "plan.json")
    m = plan.measured
    assert m["metric"] == "accuracy" and m["drop"] <= m["allowed_drop"]
    assert any(f is not Precision.FP32 for f in plan.assignment.values())
    tuned = onnx.load(out / "digits_cnn.tuned.onnx")
    onnx.checker.check_model(tuned, full_check=True)
    inits = {t.data_type for t in tuned.graph.initializer}
    assert inits & {onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16, onnx.TensorProto.FLOAT8E4M3FN}
    assert [i.type.tensor_type.elem_type for i in tuned.graph.input] == [onnx.TensorProto.FLOAT]
    # the emulation graph's accuracy through ONNX Runtime is the measured one, and the report says why
    # ops stay fp32
    om = OnnxModel.load(onnx_path, data, labels)
    assert om.metric().measure(onnx.load(out / "digits_cnn.emulation.onnx")) == m["metric_tuned"]
    assert "## Model preprocessing" in (out / "report.md").read_text()
    # export re-applies the plan to the same file: the same bytes
    again = tmp_path / "again.onnx"
    assert main(["export", str(onnx_path), "--data", str(data), "--plan", str(out / "plan.json"), "-o",
                 str(again)]) == 0
    assert again.read_bytes() == (out / "digits_cnn.tuned.onnx").read_bytes()
    # verify: on this CPU the metric runs on the emulation graph rebuilt from the input and the plan
    report = verify_onnx_input(out / "digits_cnn.tuned.onnx", onnx_path, data, labels, out / "plan.json", "cpu")
    assert report.ok and report.metric_graph == "emulation" and report.parity is None
    assert report.metric_onnx == m["metric_tuned"] and report.within_budget
    with pytest.raises(PlanError, match="was not tuned from"):
        verify_onnx_input(out / "digits_cnn.tuned.onnx", mlp_path(tmp_path), {"x": np.ones((2, 8), np.float32)})
    # fp16 inputs and outputs on request; verify measures the emulation of that file
    half = tmp_path / "half.onnx"
    assert main(["export", str(onnx_path), "--data", str(data), "--plan", str(out / "plan.json"), "-o", str(half),
                 "--io", "fp16"]) == 0
    assert [i.type.tensor_type.elem_type for i in onnx.load(half).graph.input] == [onnx.TensorProto.FLOAT16]
    report = verify_onnx_input(half, onnx_path, data, labels, out / "plan.json", "cpu")
    assert report.ok and any("takes and returns fp16" in n for n in report.notes)
    assert report.metric_onnx == pytest.approx(m["metric_tuned"], abs=0.01)
    # written for the CPU provider, the deployment graph itself is measured, and equals the emulation
    cpu = tmp_path / "cpu.onnx"
    assert main(["export", str(onnx_path), "--data", str(data), "--plan", str(out / "plan.json"), "-o", str(cpu),
                 "--provider", "cpu"]) == 0
    report = verify_onnx_input(cpu, onnx_path, data, labels, out / "plan.json", "cpu")
    assert report.metric_graph == "deployment" and report.parity is not None and report.parity.rel_l2 == 0.0
    assert report.ok and report.metric_onnx == m["metric_tuned"]


@pytest.fixture(scope="module")
def sklearn_mlp(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, np.ndarray], np.ndarray]:
    """A scikit-learn pipeline (StandardScaler, MLPClassifier) on the digits, converted by skl2onnx at
    opset 17: ai.onnx.ml ops, MatMul + Add with [1, N] biases, an int64 label output beside the
    probabilities. Returns the file and the held-out inputs and labels."""
    from sklearn.datasets import load_digits
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from skl2onnx import to_onnx

    x, y = load_digits(return_X_y=True)
    x = x.astype(np.float32)
    mlp = MLPClassifier(hidden_layer_sizes=(128, 64), max_iter=100, random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the solver's not-converged warning: accuracy is ample
        clf = make_pipeline(StandardScaler(), mlp).fit(x[:1200], y[:1200])
    model = to_onnx(clf, x[:1], options={id(mlp): {"zipmap": False}}, target_opset={"": 17, "ai.onnx.ml": 3})
    path = tmp_path_factory.mktemp("sklearn") / "digits_mlp.onnx"
    onnx.save(model, str(path))
    return path, {"X": x[1200:]}, y[1200:].astype(np.int64)


def test_api_tunes_a_scikit_learn_model_converted_by_skl2onnx(sklearn_mlp) -> None:
    """Another converter's conventions: each dense layer's [1, N] bias Add belongs to its layer (a
    16-bit layer adds it in 16-bit, no casts between), ai.onnx.ml ops stay fp32 with a reason, the
    int64 label output is left alone, and the plan is within budget on ONNX Runtime."""
    path, data, labels = sklearn_mlp
    r = tune_onnx(path, data, labels, "0.5%", objective="memory")
    m = r.plan.measured
    assert m["metric"] == "accuracy" and m["metric_fp32"] > 0.85 and m["drop"] <= m["allowed_drop"]
    low = {n for n, f in r.plan.assignment.items() if f.is_16bit}
    assert low and len(r.plan.assignment) == 3
    analysis = r.onnx.analysis
    scaler = next(n for n, t in analysis.op_types.items() if t == "ai.onnx.ml::Scaler")
    assert analysis.reasons[scaler].startswith("ONNX-ML op Scaler: classical machine learning")
    deploy = r.onnx_model("deploy")
    onnx.checker.check_model(deploy, full_check=True)
    producer = {o: n for n in deploy.graph.node for o in n.output}
    inits = {t.name: t for t in deploy.graph.initializer}
    for add in (n for n in deploy.graph.node if n.op_type == "Add"):
        core = producer[add.input[0]]
        assert core.op_type == "MatMul" and analysis.groups[add.name] == core.name
        if core.name in low:  # the product and the bias meet in the layer's format
            bias = inits[add.input[1]]
            assert list(bias.dims)[:-1] == [1] and bias.data_type == r.plan.assignment[core.name].onnx_type
    assert [o.type.tensor_type.elem_type for o in deploy.graph.output] == [onnx.TensorProto.INT64,
                                                                             onnx.TensorProto.FLOAT]
    emulate = r.onnx_model("emulate")  # the deployment graph's bf16 ops have no CPU kernel
    label, _ = open_session(emulate.SerializeToString(), "cpu").session.run(None, data)
    assert np.mean(label == labels) == m["metric_tuned"] == r.metric.measure(emulate)


def test_cli_json_is_all_that_tune_prints_on_stdout(sklearn_mlp, tmp_path: Path) -> None:
    """This model's MILP is one where HiGHS printf()s from C; --json output must still parse."""
    path, data, labels = sklearn_mlp
    np.savez(tmp_path / "data.npz", **data)
    np.save(tmp_path / "labels.npy", labels)
    p = subprocess.run([sys.executable, "-m", "autoprec", "tune", str(path), "--data", str(tmp_path / "data.npz"),
                        "--labels", str(tmp_path / "labels.npy"), "--objective", "memory", "--json",
                        "--out", str(tmp_path / "out")], capture_output=True, text=True, cwd=ROOT)
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)
    assert doc["plan"]["measured"]["drop"] <= doc["plan"]["measured"]["allowed_drop"]


def test_scikit_learn_models_autoprec_cannot_tune_say_why_in_one_line(tmp_path: Path) -> None:
    """A linear model converts to one ai.onnx.ml LinearClassifier (no layer to tune); a classifier
    converted with its default ZipMap returns no tensor of probabilities to measure."""
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression
    from sklearn.neural_network import MLPClassifier
    from skl2onnx import to_onnx

    x, y = load_digits(return_X_y=True)
    x, y = x[:200].astype(np.float32), y[:200].astype(np.int64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # not converged: irrelevant here
        linear = to_onnx(LogisticRegression(max_iter=20).fit(x, y), x[:1], options={"zipmap": False})
        zipped = to_onnx(MLPClassifier((8,), max_iter=5, random_state=0).fit(x, y), x[:1])
    with pytest.raises(UsageError, match=r"no layer whose format can be chosen.*ONNX-ML op LinearClassifier"):
        tune_onnx(linear, {"X": x}, y)
    with pytest.raises(UsageError, match=r"no floating-point output.*\{'zipmap': False\}"):
        tune_onnx(zipped, {"X": x}, y)


def test_api_tunes_a_hand_built_model_on_fidelity() -> None:
    """No labels: a fidelity budget; a forced fp16 layer lands in the tuned graphs."""
    r = tune_onnx(block_opset13(), _block_data(), fidelity_budget="2%", force=["fp16:MatMul_16"])
    m = r.plan.measured
    assert m["metric"] == "top1_agreement" and m["drop"] <= m["allowed_drop"]
    assert r.plan.assignment["MatMul_16"] is FP16
    deploy = r.onnx_model("deploy")
    core = next(n for n in deploy.graph.node if n.name == "MatMul_16")
    w = next(t for t in deploy.graph.initializer if t.name == core.input[1])
    assert w.data_type == onnx.TensorProto.FLOAT16
    assert r.metric.measure(r.onnx_model("emulate")) == m["metric_tuned"]


def test_control_flow_stays_fp32_and_keeps_the_weights_its_body_reads() -> None:
    """A Loop whose body reads an initializer from the outer scope: the layer before it is lowered,
    the Loop stays fp32 with its reason, and the body's weight survives the passes."""
    x = np.random.default_rng(3).standard_normal((32, 6)).astype(np.float32)
    r = tune_onnx(loop_model(), {"x": x}, fidelity_budget="5%", force=["fp16:proj"])
    assert r.plan.assignment["proj"] is FP16 and "control flow (Loop)" in r.onnx.analysis.reasons["loop"]
    for mode in ("deploy", "emulate"):
        model = r.onnx_model(mode)
        assert "w" in {t.name for t in model.graph.initializer}
    deploy = r.onnx_model("deploy")
    producer = {o: n for n in deploy.graph.node for o in n.output}
    loop = next(n for n in deploy.graph.node if n.op_type == "Loop")
    cast = producer[loop.input[2]]  # the fp16 MatMul's result goes back to fp32 for the Loop
    assert cast.op_type == "Cast" and cast.attribute[0].i == onnx.TensorProto.FLOAT
    assert r.metric.measure(r.onnx_model("emulate")) == r.plan.measured["metric_tuned"]


@pytest.mark.parametrize("cond", [True, False])
def test_a_scalar_input_is_fed_to_every_run(cond: bool) -> None:
    """An If's condition is a rank-0 input: given once, it goes with every batch of samples."""
    x = np.random.default_rng(4).standard_normal((300, 8)).astype(np.float32)
    om = OnnxModel.load(if_model(), {"x": x, "c": np.array(cond)})
    assert set(om.whole) == {"c"} and len(om.batches()) == 2
    assert all(b["c"].shape == () for b in om.batches())
    ys = om.outputs(om.analysis.model)  # every run is fed the condition
    assert sum(len(y) for y, in ys) == 300 and om.metric().measure(om.analysis.model) == 1.0
    # its only products are inside the If, which stays fp32: nothing to tune, and tune says why
    with pytest.raises(UsageError, match=r"no layer whose format can be chosen.*branch: control flow \(If\)"):
        tune_onnx(if_model(), {"x": x, "c": np.array(cond)}, fidelity_budget="1%")


@pytest.mark.parametrize("extra, message", [
    ([], "give its inputs with --data"),
    (["--data", "{data}", "--profile-mode", "fast"], "profiled in exact mode"),
    (["--data", "{data}", "--budget", "1%"], "give --fidelity-budget"),
    (["--data", "{data}", "--no-onnx-check"], "measured on ONNX Runtime itself"),
    (["--data", "{labels}"], "the data are int64, the model takes float32"),
])
def test_cli_onnx_errors_are_one_line_and_write_nothing(legacy_cnn: tuple[Path, Path, Path], tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str], extra: list[str],
                                                        message: str) -> None:
    onnx_path, data, labels = legacy_cnn
    args = [a.format(data=data, labels=labels) for a in extra]
    out = tmp_path / "out"
    assert main(["tune", str(onnx_path), *args, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not out.exists()


def test_cli_profile_onnx(legacy_cnn: tuple[Path, Path, Path], tmp_path: Path,
                          capsys: pytest.CaptureFixture[str]) -> None:
    onnx_path, data, _ = legacy_cnn
    assert main(["profile", str(onnx_path), "--data", str(data), "--json", str(tmp_path / "p.json")]) == 0
    assert "/conv1/Conv" in capsys.readouterr().out
    assert set(json.loads((tmp_path / "p.json").read_text())["errors"]) == {
        "/conv1/Conv", "/conv2/Conv", "/conv3/Conv", "/fc1/Gemm", "/fc2/Gemm"}


def test_verify_compares_the_deployment_graph_with_the_emulation_graph(
        legacy_cnn: tuple[Path, Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """verify's GPU branch, run here on the CPU provider: the metric comes from the deployment graph
    and the parity compares its outputs with the emulation graph's (the GPU's numbers need a GPU; this
    checks the branch itself: ORT's CPU provider has no 16-bit kernels for most ops, so the plan puts
    only the classifier, whose output is the graph's, in fp8; the two graphs agree within fp8's eps)."""
    import autoprec.ort.runtime

    onnx_path, data, labels = legacy_cnn
    om = OnnxModel.load(onnx_path, data, labels)
    plan = {om.analysis.graph.layer_names()[-1]: E4M3}
    prof = profile_onnx(om, (E4M3,))
    deployed = tmp_path / "deployed.onnx"
    onnx.save(om.build(plan, act_amax_from_profile(prof), "deploy"), str(deployed))
    monkeypatch.setattr(autoprec.ort.runtime, "probe_provider", lambda providers: ("cuda", ""))
    report = verify_onnx_input(deployed, onnx_path, data, labels, providers="cuda")
    assert report.metric_graph == "deployment" and report.metric_torch_emulated is None
    assert report.parity is not None and report.parity.ok, report.parity
    assert report.parity.narrowest == E4M3.value and report.parity.positions == min(om.samples, CALIBRATION_SAMPLES)
    assert any("emulation graph on the CPU" in n for n in report.notes)
    assert report.metric_onnx == pytest.approx(om.metric().measure(om.build(plan, act_amax_from_profile(prof))),
                                               abs=0.01)


def test_tune_onnx_times_deployment_graphs_where_cuda_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    """tune_onnx's timing check (ORT's timing faked: the test machines have no GPU) times deployment
    graphs for cuda fed with the data repeated to the priced batch, and adopts the fastest."""
    import autoprec.ort.runtime as runtime

    seen = []

    def fake(models, feeds, provider="cuda", **kw):
        seen.append((models, feeds, kw))
        return [1.0] + [0.5] * (len(models) - 1)  # every candidate beats the searched plan

    monkeypatch.setattr(runtime, "probe_provider", lambda providers="auto": ("cuda", ""))
    monkeypatch.setattr(runtime, "latencies_ms", fake)
    r = tune_onnx(block_opset13(), _block_data(), fidelity_budget="2%", provider="cuda", batch=200)
    (models, feeds, kw), = seen
    assert kw["resident"] and feeds[0]["x"].shape == (200, 6, 8)
    for m in models:
        model = onnx.load_from_string(m)
        assert model_meta(model)[MODEL_MODE] == "deploy"
        onnx.checker.check_model(model, full_check=True)
    t = r.summary.timing
    assert t is not None and t.batch == 200 and len(t.ms) == len(models)
    assert t.chosen == ("tuned" if len(models) == 1 else t.ms[1][0]) and r.plan.measured["latency_chosen"] == t.chosen


def test_a_fused_erf_gelu_runs_in_the_plan_s_16_bit_format_where_the_provider_can() -> None:
    """block_opset13's erf GELU is one Gelu: in an fp16 plan it reads and writes fp16 between the fp16
    layers, with no cast; in a bf16 plan for the CUDA provider (no bf16 Gelu kernel) it computes in
    fp32 between one Cast in and one out, and the layers around it stay bf16."""
    from autoprec.onnx.passes.base import infer_types

    om = OnnxModel.load(block_opset13(), _block_data())
    for fmt, provider, gelu_type in ((FP16, None, onnx.TensorProto.FLOAT16), (FP16, "cuda", onnx.TensorProto.FLOAT16),
                                     (BF16, "cuda", onnx.TensorProto.FLOAT)):
        plan = {n: fmt for n in om.analysis.graph.layer_names()}
        model = infer_types(om.build(plan, {}, "deploy", provider))
        onnx.checker.check_model(model, full_check=True)
        types = {v.name: v.type.tensor_type.elem_type for v in (*model.graph.value_info, *model.graph.output)}
        producer = {o: n for n in model.graph.node for o in n.output}
        gelu = next(n for n in model.graph.node if n.op_type == "Gelu")
        assert "Erf" not in {n.op_type for n in model.graph.node}
        assert types[gelu.output[0]] == gelu_type
        into = producer[gelu.input[0]]
        readers = [n for n in model.graph.node if gelu.output[0] in n.input]
        if gelu_type == fmt.onnx_type:  # the bias Add's 16-bit result in, the next MatMul reads it as is
            assert into.op_type == "Add" and [n.op_type for n in readers] == ["MatMul"]
        else:
            assert into.op_type == "Cast" and into.attribute[0].i == onnx.TensorProto.FLOAT
            assert [n.op_type for n in readers] == ["Cast"] and readers[0].attribute[0].i == fmt.onnx_type
        assert {types[n.output[0]] for n in model.graph.node if n.op_type == "MatMul"} == {fmt.onnx_type}
