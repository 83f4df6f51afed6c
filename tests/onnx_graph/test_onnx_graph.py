"""ONNX models as input (autoprec.onnx.graph): preprocessing, the op graph, numerics after it.

Models come from two kinds of "other software": onnx.helper by hand (old opsets, Constant-node and
transposed weights, Gemm with transB, erf-form GELU, If/Loop) and torch.onnx.export(dynamo=True),
whose op graph must match what autoprec.torch.capture builds from the same torch model.
"""

from __future__ import annotations

import contextlib
import io
import math

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper
from onnx_graph_models import (
    conv_model,
    gelu_opset13,
    if_model,
    init,
    loop_model,
    make,
    mlp_opset13,
    run,
    vi,
)

from autoprec.torch.capture import capture
from autoprec.core.errors import CaptureError, UsageError
from autoprec.onnx.graph import analyse_onnx, default_opset, load_onnx
from autoprec.core.formats import Precision
from autoprec.core.lowering import lower
from autoprec.core.opgraph import OpGraph, Policy


def _ops(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]


def test_old_opset_mlp_is_upgraded_folded_named_and_counted() -> None:
    source = mlp_opset13()
    before = source.SerializeToString()
    a = analyse_onnx(source, batch=5)
    assert source.SerializeToString() == before  # the caller's model is not modified
    m, g = a.model, a.graph
    assert default_opset(m) == 21 and m.ir_version >= 10
    assert _ops(m) == ["MatMul", "Relu", "Gemm"]  # Constant + Transpose folded into one weight
    w_t = next(t for t in m.graph.initializer if t.name == "w_t")
    assert list(w_t.dims) == [8, 4]
    assert "w" not in {t.name for t in m.graph.initializer}
    assert [n.name for n in m.graph.node] == ["MatMul_0", "Relu_1", "Gemm_2"]
    assert any("13 -> 21" in n for n in a.notes) and any("folded 2" in n for n in a.notes)

    assert [(n.name, n.kind, n.policy) for n in g.nodes] == [
        ("x", "placeholder", Policy.NONE), ("MatMul_0", "linear", Policy.ALWAYS),
        ("Relu_1", "relu", Policy.FOLLOW), ("Gemm_2", "linear", Policy.ALWAYS),
        ("output", "output", Policy.NONE)]  # read in fp32: a 16-bit result is cast back there
    assert g.edges == [("x", "MatMul_0"), ("MatMul_0", "Relu_1"), ("Relu_1", "Gemm_2"), ("Gemm_2", "output")]
    mm, relu, gemm = g["MatMul_0"], g["Relu_1"], g["Gemm_2"]
    assert (mm.weight, mm.weight_elems, mm.flops) == ("w_t", 32, 2 * 5 * 4 * 8)
    assert (mm.input_shapes, mm.output_shape, mm.act_in_elems, mm.act_out_elems) == (((5, 8), (8, 4)), (5, 4), 40, 20)
    assert relu.flops == 20
    assert (gemm.weight, gemm.weight_elems, gemm.flops) == ("w2", 12 + 3, 2 * 5 * 3 * 4)
    assert g.batch == 5 and g.layer_names() == ["MatMul_0", "Gemm_2"]
    assert a.op_types == {"MatMul_0": "MatMul", "Relu_1": "Relu", "Gemm_2": "Gemm"}
    assert a.reasons == {}
    # FLOPs scale with the deployment batch; the graph survives a JSON round trip
    assert g.at_batch(10)["MatMul_0"].flops == 2 * mm.flops
    assert OpGraph.from_json(g.to_json()).fingerprint() == g.fingerprint()

    x = np.random.default_rng(0).standard_normal((5, 8)).astype(np.float32)
    np.testing.assert_array_equal(run(source, {"x": x})[0], run(m, {"x": x})[0])
    onnx.checker.check_model(m, full_check=True)


def test_load_onnx_reads_files_with_external_data(tmp_path) -> None:
    path = tmp_path / "mlp.onnx"
    onnx.save(mlp_opset13(), str(path), save_as_external_data=True, all_tensors_to_one_file=True,
              location="mlp.onnx.data", size_threshold=0)
    loaded = load_onnx(path, batch=2)
    assert isinstance(loaded, tuple) and isinstance(loaded[0], onnx.ModelProto)
    graph = loaded[1]
    assert graph.model_name == "mlp"
    assert graph.layer_names() == ["MatMul_0", "Gemm_2"] and graph.batch == 2
    with pytest.raises(UsageError, match="no ONNX file"):
        load_onnx(tmp_path / "missing.onnx")


def test_conv_model_kinds_policies_flops() -> None:
    _, g = load_onnx(conv_model(), batch=2)
    kinds = {n.name: (n.kind, n.policy) for n in g.nodes}
    assert kinds == {"x": ("placeholder", Policy.NONE), "conv": ("conv2d", Policy.ALWAYS),
                     "relu": ("relu", Policy.FOLLOW), "pool": ("max_pool2d", Policy.FOLLOW),
                     "flat": ("flatten", Policy.FOLLOW), "fc": ("linear", Policy.ALWAYS),
                     "softmax": ("softmax", Policy.NEVER), "output": ("output", Policy.NONE)}
    conv, fc, sm = g["conv"], g["fc"], g["softmax"]
    assert conv.output_shape == (2, 4, 8, 8) and conv.weight == "cw"
    assert conv.flops == 2 * (2 * 4 * 8 * 8) * (3 * 3 * 3) and conv.weight_elems == 4 * 27 + 4
    assert fc.flops == 2 * (2 * 5) * 64 and fc.weight_elems == 5 * 64 + 5 and fc.act_in_elems == 2 * 64
    assert sm.flops == 5 * 10
    bf16 = {n: Precision.BF16 for n in g.layer_names()}  # conv -> relu -> pool -> flat -> fc stays bf16
    assert [(c.value, c.to, c.readers, c.elems) for c in lower(g, bf16).casts] == [
        ("x", Precision.BF16, ("conv",), 2 * 3 * 8 * 8), ("fc", Precision.FP32, ("softmax",), 2 * 5)]


def test_an_erf_gelu_written_as_five_nodes_becomes_one_gelu() -> None:
    """Upgraded to opset 21, the old exporter's Div, Erf, Add, Mul, Mul is one Gelu (a FOLLOW op the
    plan can run in 16 bits), its constants are gone, and the model computes what it did."""
    a = analyse_onnx(gelu_opset13(), batch=3)
    assert [(n.op_type, n.name) for n in a.model.graph.node] == [("MatMul", "fc"), ("Gelu", "gelu_erf")]
    assert {t.name for t in a.model.graph.initializer} == {"w"}
    assert any("fused 1 erf GELU" in note for note in a.notes)
    assert (a.graph["gelu_erf"].kind, a.graph["gelu_erf"].policy) == ("gelu", Policy.FOLLOW)
    x = np.random.default_rng(1).standard_normal((3, 6)).astype(np.float32)
    np.testing.assert_allclose(run(gelu_opset13(), {"x": x})[0], run(a.model, {"x": x})[0], rtol=1e-6, atol=1e-7)


def _gelu_variant(pre: str, product: str, leak: bool = False, half: float = 0.5) -> onnx.ModelProto:
    """x -> erf GELU -> y at opset 13, in one of the forms exporters write: ``pre`` "div" (x / sqrt 2)
    or "mul" (x * 1/sqrt 2); ``product`` "x_first" ((x * a) * 0.5), "half_first" ((x * 0.5) * a)
    or "a_first" (x * (a * 0.5)); ``leak``: the Erf's result is a graph output too."""
    n = helper.make_node
    scale = ("sqrt2", math.sqrt(2.0)) if pre == "div" else ("isqrt2", math.sqrt(0.5))
    nodes = [n("Div" if pre == "div" else "Mul", ["x", scale[0]], ["d"]), n("Erf", ["d"], ["e"]),
             n("Add", ["one", "e"], ["a"])]
    nodes += {"x_first": [n("Mul", ["x", "a"], ["m"]), n("Mul", ["m", "half"], ["y"])],
              "half_first": [n("Mul", ["x", "half"], ["h"]), n("Mul", ["h", "a"], ["y"])],
              "a_first": [n("Mul", ["a", "half"], ["m"]), n("Mul", ["x", "m"], ["y"])]}[product]
    inits = [init(scale[0], np.array(scale[1], np.float32)), init("one", np.array(1.0, np.float32)),
             init("half", np.array(half, np.float32))]
    outputs = [vi("y", ["N", 6])] + ([vi("e", ["N", 6])] if leak else [])
    return make(nodes, [vi("x", ["N", 6])], outputs, inits)


@pytest.mark.parametrize("pre", ["div", "mul"])
@pytest.mark.parametrize("product", ["x_first", "half_first", "a_first"])
def test_every_form_of_the_erf_gelu_is_fused_and_nothing_else(pre: str, product: str) -> None:
    x = np.random.default_rng(2).standard_normal((4, 6)).astype(np.float32)
    source = _gelu_variant(pre, product)
    a = analyse_onnx(source, batch=4)
    assert [n.op_type for n in a.model.graph.node] == ["Gelu"]
    np.testing.assert_allclose(run(source, {"x": x})[0], run(a.model, {"x": x})[0], rtol=1e-6, atol=1e-7)
    # not a GELU: another constant, or a value of the pattern that other ops read
    for other in (_gelu_variant(pre, product, half=0.6), _gelu_variant(pre, product, leak=True)):
        assert "Gelu" not in [n.op_type for n in analyse_onnx(other, batch=4).model.graph.node]


def test_below_opset_20_an_erf_gelu_stays_five_fp32_nodes_with_a_reason() -> None:
    a = analyse_onnx(gelu_opset13(), batch=3, target_opset=13)
    for name in ("gelu_div", "gelu_erf", "gelu_add", "gelu_mul", "gelu_half"):
        assert (a.graph[name].kind, a.graph[name].policy) == ("gelu", Policy.NEVER)
        assert "erf GELU written as 5 nodes at opset 13: kept fp32" in a.reasons[name]
    assert a.graph["fc"].kind == "linear"


def test_if_node_is_kept_fp32_with_its_subgraphs() -> None:
    source = if_model()
    a = analyse_onnx(source, batch=4)
    g = a.graph
    assert {n.name for n in g.nodes} == {"x", "c", "relu", "branch", "bias", "output"}  # branch internals are no ops
    br = g["branch"]
    assert (br.kind, br.policy) == ("if", Policy.NEVER) and not g.layers()
    assert "control flow (If)" in a.reasons["branch"] and "3 node(s)" in a.reasons["branch"]
    # the If reads c directly and relu's output through its subgraphs
    assert set(g.predecessors("branch")) == {"c", "relu"}
    assert br.output_shape == (4, 4) and g["bias"].policy is Policy.FOLLOW
    x = np.random.default_rng(2).standard_normal((4, 8)).astype(np.float32)
    for c in (True, False):
        feeds = {"x": x, "c": np.array(c)}
        np.testing.assert_array_equal(run(source, feeds)[0], run(a.model, feeds)[0])


def test_loop_node_is_kept_fp32_and_layers_outside_it_stay_layers() -> None:
    source = loop_model()
    a = analyse_onnx(source, batch=2)
    g = a.graph
    assert g.layer_names() == ["proj"]
    assert (g["loop"].kind, g["loop"].policy) == ("loop", Policy.NEVER)
    assert "control flow (Loop)" in a.reasons["loop"]
    into_proj = [c for c in lower(g, {"proj": Precision.BF16}).casts if "proj" in c.readers]
    assert [(c.to, c.elems) for c in into_proj] == [(Precision.BF16, 12)]
    assert g["act"].output_shape == (2, 4)
    x = np.random.default_rng(3).standard_normal((2, 6)).astype(np.float32)
    np.testing.assert_array_equal(run(source, {"x": x})[0], run(a.model, {"x": x})[0])


def test_names_are_assigned_and_made_unique() -> None:
    nodes = [helper.make_node("Relu", ["x"], ["a"], name="act"),
             helper.make_node("Relu", ["a"], ["b"], name="act"),  # duplicate
             helper.make_node("Neg", ["b"], ["c"]),  # unnamed
             helper.make_node("Abs", ["c"], ["y"], name="x")]  # clashes with the input's name
    m, g = load_onnx(make(nodes, [vi("x", [2, 3])], [vi("y", [2, 3])]))
    names = [n.name for n in m.graph.node]
    assert names == ["act", "act_1", "Neg_2", "x_1"]
    assert [n.name for n in g.nodes] == ["x"] + names + ["output"]


def test_symbolic_dims_need_example_or_dims() -> None:
    rng = np.random.default_rng(5)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y"], name="proj")]
    model = make(nodes, [vi("x", ["batch", "seq", 8])], [vi("y", ["batch", "seq", 4])],
                 [init("w", rng.standard_normal((8, 4)).astype(np.float32))])
    with pytest.raises(UsageError, match="symbolic dimension 'seq'") as err:
        load_onnx(model)
    assert "\n" not in str(err.value)
    _, g = load_onnx(model, batch=3, dims={"seq": 7})
    assert g["proj"].output_shape == (3, 7, 4) and g.batch == 3
    _, g = load_onnx(model, example=[np.zeros((2, 5, 8), np.float32)])
    assert g["proj"].output_shape == (2, 5, 4) and g.batch == 2 and g["proj"].flops == 2 * 40 * 8
    with pytest.raises(UsageError, match="axis 2"):
        load_onnx(model, example={"x": np.zeros((2, 5, 9), np.float32)})


def test_shapes_inference_cannot_tell_are_measured_with_onnx_runtime() -> None:
    """Reshape to a shape computed through Floor: data propagation stops there."""
    rng = np.random.default_rng(6)
    nodes = [
        helper.make_node("Shape", ["x"], ["s"], name="shape"),
        helper.make_node("Cast", ["s"], ["sf"], name="to_float", to=TensorProto.FLOAT),
        helper.make_node("Div", ["sf", "halves"], ["h"], name="halve"),
        helper.make_node("Floor", ["h"], ["fl"], name="floor"),
        helper.make_node("Cast", ["fl"], ["si"], name="to_int", to=TensorProto.INT64),
        helper.make_node("Concat", ["si", "two"], ["shape3"], name="cat", axis=0),
        helper.make_node("Reshape", ["x", "shape3"], ["x3"], name="reshape"),
        helper.make_node("MatMul", ["x3", "w"], ["y"], name="proj"),
    ]
    inits = [init("halves", np.array([1.0, 2.0], np.float32)), init("two", np.array([2], np.int64)),
             init("w", rng.standard_normal((2, 3)).astype(np.float32))]
    a = analyse_onnx(make(nodes, [vi("x", ["N", 8])], [vi("y", None)], inits), batch=3)
    g = a.graph
    assert g["reshape"].output_shape == (3, 4, 2)
    assert g["proj"].flops == 2 * (3 * 4 * 3) * 2 and g["proj"].kind == "linear"
    assert g["shape"].policy is Policy.NONE and g["to_int"].policy is Policy.NONE
    assert any("ONNX Runtime run" in n for n in a.notes)


def test_custom_and_unknown_ops_stay_fp32_with_a_reason() -> None:
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu"),
             helper.make_node("Foo", ["r"], ["f"], name="foo", domain="com.example"),
             helper.make_node("Sin", ["r"], ["s"], name="sin"),
             helper.make_node("Add", ["f", "s"], ["y"], name="add")]
    a = analyse_onnx(make(nodes, [vi("x", [2, 3])], [vi("y", [2, 3])], extra_opsets={"com.example": 1}))
    g = a.graph
    assert (g["foo"].kind, g["foo"].policy) == ("com.example.Foo", Policy.NEVER)
    assert "custom op com.example::Foo" in a.reasons["foo"]
    assert a.op_types["foo"] == "com.example::Foo"
    assert (g["sin"].kind, g["sin"].policy) == ("sin", Policy.NEVER)
    assert "no known mixed-precision behaviour" in a.reasons["sin"]
    assert any("no known shape" in n for n in a.notes)  # ORT cannot run com.example::Foo


def test_weights_listed_as_graph_inputs_are_weights() -> None:
    """IR-3 models list every initializer among the graph inputs."""
    rng = np.random.default_rng(7)
    nodes = [helper.make_node("Gemm", ["x", "w", "b"], ["y"], name="fc", transB=1)]
    model = make(nodes, [vi("x", ["N", 4]), vi("w", [2, 4]), vi("b", [2])], [vi("y", ["N", 2])],
                 [init("w", rng.standard_normal((2, 4)).astype(np.float32)), init("b", np.zeros(2, np.float32))],
                 opset=9, ir=3)
    _, g = load_onnx(model, batch=2)
    assert [n.name for n in g.nodes if n.kind == "placeholder"] == ["x"]
    assert g["fc"].weight == "w" and g["fc"].weight_elems == 10


def test_a_failed_opset_upgrade_is_a_clear_error() -> None:
    node = helper.make_node("ImageScaler", ["x"], ["y"], scale=2.0)
    model = make([node], [vi("x", [1, 3, 2, 2])], [vi("y", [1, 3, 2, 2])], opset=1, ir=3)
    with pytest.raises(CaptureError, match=r"cannot upgrade the model from opset 1 to 21: ImageScaler no "
                                           r"longer exist\(s\) in ONNX at opset 21") as err:
        load_onnx(model)
    assert "\n" not in str(err.value) and "target_opset=1" in str(err.value)
    # the converter's own failures are reported the same way
    up = helper.make_node("Upsample", ["x"], ["y"], height_scale=2.0, width_scale=2.0)
    model = make([up], [vi("x", [1, 3])], [vi("y", [2, 6])], opset=1, ir=3)
    with pytest.raises(CaptureError, match=r"cannot upgrade the model from opset 1 to 21: .*target_opset=1"):
        load_onnx(model)


def test_newer_opsets_are_not_downgraded() -> None:
    m, _ = load_onnx(mlp_opset13(), batch=1, target_opset=13)
    assert default_opset(m) == 13 and _ops(m) == ["MatMul", "Relu", "Gemm"]


def _export(model: torch.nn.Module, x: torch.Tensor) -> onnx.ModelProto:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        program = torch.onnx.export(model, (x,), dynamo=True, external_data=False)
    return program.model_proto


def _layer_rows(graph: OpGraph) -> list[tuple]:
    return [(n.kind, n.flops, n.weight_elems, n.act_in_elems, n.act_out_elems) for n in graph.layers()]


def test_dynamo_exported_attention_matches_capture(tiny_attention) -> None:
    x = torch.randn(2, 5, 32)
    exported = _export(tiny_attention, x)
    a = analyse_onnx(exported, example=[x.numpy()])
    c = capture(tiny_attention, (x,))
    assert _layer_rows(a.graph) == _layer_rows(c.graph)
    assert [n.scope for n in a.graph.layers()] == [n.scope for n in c.graph.layers()]
    by_pos = {o: t for o, t in zip(a.graph.layer_names(), c.graph.layer_names())}
    assert [[by_pos[n] for n in tie] for tie in a.graph.ties] == c.graph.ties == [["q", "k", "v"]]
    assert [(n.kind, n.policy) for n in a.graph.nodes if n.kind in ("softmax", "layer_norm")] == \
        [("layer_norm", Policy.NEVER), ("softmax", Policy.NEVER)]
    assert a.graph.total_flops() == pytest.approx(c.graph.total_flops(), rel=0.05)
    got = run(a.model, {a.model.graph.input[0].name: x.numpy()})[0]
    np.testing.assert_allclose(got, tiny_attention(x).detach().numpy(), rtol=1e-4, atol=1e-5)


def test_torchscript_exported_attention_at_opset13_matches_capture(tiny_attention) -> None:
    """torch's older exporter: opset 13, Constant nodes, shape arithmetic, decomposed layer norm."""
    x = torch.randn(2, 5, 32)
    buf = io.BytesIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        torch.onnx.export(tiny_attention, (x,), buf, dynamo=False, opset_version=13, input_names=["x"],
                          dynamic_axes={"x": {0: "batch"}})
    source = onnx.load_from_string(buf.getvalue())
    assert default_opset(source) == 13 and "Constant" in _ops(source)
    a = analyse_onnx(source, example=[x.numpy()])
    c = capture(tiny_attention, (x,))
    assert _layer_rows(a.graph) == _layer_rows(c.graph)
    assert [n.scope for n in a.graph.layers()] == [n.scope for n in c.graph.layers()]
    assert a.graph.ties == [["/q/MatMul", "/k/MatMul", "/v/MatMul"]]
    assert "Constant" not in _ops(a.model)
    ln = [n for n in a.graph.nodes if n.scope == "ln"]  # its nine nodes fused into one, as ORT fuses them
    assert [(n.kind, n.policy) for n in ln] == [("layer_norm", Policy.NEVER)]
    assert "LayerNormalization" in _ops(a.model) and "Sqrt" not in _ops(a.model)
    np.testing.assert_array_equal(run(source, {"x": x.numpy()})[0], run(a.model, {"x": x.numpy()})[0])


def test_dynamo_exported_cnn_matches_capture(tiny_cnn) -> None:
    x = torch.randn(2, 1, 8, 8)
    exported = _export(tiny_cnn, x)
    a = analyse_onnx(exported, example={exported.graph.input[0].name: x.numpy()})
    c = capture(tiny_cnn, (x,))
    assert _layer_rows(a.graph) == _layer_rows(c.graph)
    assert [n.kind for n in a.graph.nodes if n.policy is Policy.FOLLOW] == \
        ["relu", "relu", "add", "max_pool2d", "reshape"]
    np.testing.assert_array_equal(run(exported, {"x": x.numpy()})[0], run(a.model, {"x": x.numpy()})[0])
    assert a.graph.batch == 2


def test_modules_exported_as_local_functions_are_inlined(tiny_cnn) -> None:
    """torch's older exporter with export_modules_as_functions=True: the whole model is one call of
    a local function (whose body calls one per module). Inlined, its layers are the capture's, and
    the model computes the same outputs."""
    x = torch.randn(2, 1, 8, 8)
    buf = io.BytesIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        torch.onnx.export(tiny_cnn, (x,), buf, dynamo=False, opset_version=15, input_names=["x"],
                          export_modules_as_functions=True)
    source = onnx.load_from_string(buf.getvalue())
    assert source.functions and len(source.graph.node) == 1
    a = analyse_onnx(source, example=[x.numpy()])
    assert not a.model.functions and "inlined the model's" in " ".join(a.notes)
    assert _layer_rows(a.graph) == _layer_rows(capture(tiny_cnn, (x,)).graph)
    np.testing.assert_allclose(run(source, {"x": x.numpy()})[0], run(a.model, {"x": x.numpy()})[0], rtol=0, atol=0)


def _layer_norm_variant(scale: bool = True, axes: tuple[int, ...] = (-1,)) -> onnx.ModelProto:
    """x[N,4,8] -> a layer norm written as ReduceMean, Sub, Pow, ReduceMean, Add, Sqrt, Div[, Mul, Add]
    at opset 13, over ``axes``."""
    n = helper.make_node
    rng = np.random.default_rng(3)
    nodes = [n("ReduceMean", ["x"], ["mu"], axes=list(axes)), n("Sub", ["x", "mu"], ["xc"]),
             n("Pow", ["xc", "two"], ["sq"]), n("ReduceMean", ["sq"], ["var"], axes=list(axes)),
             n("Add", ["var", "eps"], ["ve"]), n("Sqrt", ["ve"], ["sd"]),
             n("Div", ["xc", "sd"], ["y" if not scale else "xn"])]
    inits = [init("two", np.array(2.0, np.float32)), init("eps", np.array(1e-5, np.float32))]
    if scale:
        nodes += [n("Mul", ["xn", "gamma"], ["xg"]), n("Add", ["xg", "beta"], ["y"])]
        inits += [init("gamma", (1 + 0.1 * rng.standard_normal(8)).astype(np.float32)),
                  init("beta", (0.1 * rng.standard_normal(8)).astype(np.float32))]
    return make(nodes, [vi("x", ["N", 4, 8])], [vi("y", ["N", 4, 8])], inits)


def test_a_layer_norm_written_as_nine_nodes_becomes_one_layer_normalization() -> None:
    x = np.random.default_rng(4).standard_normal((2, 4, 8)).astype(np.float32)
    a = analyse_onnx(_layer_norm_variant(), batch=2)
    assert _ops(a.model) == ["LayerNormalization"] and {t.name for t in a.model.graph.initializer} == {"gamma", "beta"}
    assert (a.graph.nodes[1].kind, a.graph.nodes[1].policy) == ("layer_norm", Policy.NEVER)
    np.testing.assert_allclose(run(_layer_norm_variant(), {"x": x})[0], run(a.model, {"x": x})[0], rtol=1e-6, atol=1e-6)
    # forms LayerNormalization cannot say as matched stay nodes, one NEVER group, as before
    for other in (_layer_norm_variant(scale=False), _layer_norm_variant(axes=(-2, -1))):
        b = analyse_onnx(other, batch=2)
        assert "LayerNormalization" not in _ops(b.model) and len(set(b.groups.values())) == 1
        assert {(n.kind, n.policy) for n in b.graph.nodes[1:-1]} == {("layer_norm", Policy.NEVER)}
    c = analyse_onnx(_layer_norm_variant(), batch=2, target_opset=13)  # no LayerNormalization before opset 17
    assert "LayerNormalization" not in _ops(c.model)
