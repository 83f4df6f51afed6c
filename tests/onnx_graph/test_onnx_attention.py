"""The ONNX Attention op (opset 23): preprocessing expands it into the function body ONNX defines
for it, so that its two products, Q Kᵀ and P V, are matmul layers the plan chooses a format for."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper
from onnx_graph_models import init, make, run, vi

from autoprec.cli import main
from autoprec.onnx.graph import analyse_onnx

T, D, HEADS = 6, 16, 2


def attention_block(opset: int = 23) -> onnx.ModelProto:
    """x[B, T, D] -> q, k, v projections -> Attention (3-D form, 2 heads, causal) -> output projection."""
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("MatMul", ["x", f"w_{p}"], [p], name=f"blk/{p}_proj") for p in ("q", "k", "v")]
    nodes.append(helper.make_node("Attention", ["q", "k", "v"], ["att"], name="blk/attn", q_num_heads=HEADS,
                                  kv_num_heads=HEADS, is_causal=1))
    nodes.append(helper.make_node("MatMul", ["att", "w_o"], ["y"], name="blk/out_proj"))
    inits = [init(f"w_{p}", (rng.standard_normal((D, D)) / 4).astype(np.float32)) for p in ("q", "k", "v", "o")]
    return make(nodes, [vi("x", ["B", T, D])], [vi("y", ["B", T, D])], inits, opset=opset, ir=11)


def _x(n: int = 64) -> np.ndarray:
    return np.random.default_rng(1).standard_normal((n, T, D)).astype(np.float32)


def test_attention_is_expanded_into_its_function_body_with_two_matmul_layers() -> None:
    a = analyse_onnx(attention_block(), example={"x": _x(1)})
    assert not any(n.op_type == "Attention" for n in a.model.graph.node)
    assert any("expanded 1 Attention node(s) into their ONNX function body" in n for n in a.notes), a.notes
    matmuls = [op for op in a.graph.layers() if op.kind == "matmul"]
    assert [op.name for op in matmuls] == ["blk/attn/MatMul", "blk/attn/MatMul_1"]
    assert all(op.scope == "blk.attn" for op in matmuls)
    assert [op.input_shapes for op in matmuls] == [((1, HEADS, T, D // HEADS), (1, HEADS, D // HEADS, T)),
                                                   ((1, HEADS, T, T), (1, HEADS, T, D // HEADS))]
    # the expansion computes what ONNX Runtime's own Attention kernel does (it has one on the CPU)
    x = _x(8)
    np.testing.assert_allclose(run(a.model, {"x": x})[0], run(attention_block(), {"x": x})[0], rtol=1e-5, atol=1e-5)


def test_cli_tunes_an_attention_model_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The two products forced to fp16 (the cost model keeps layers this small in fp32): the files
    tune writes compute them in fp16 and run on ONNX Runtime's CPU provider."""
    source = tmp_path / "attn.onnx"
    onnx.save(attention_block(), str(source))
    data = tmp_path / "inputs.npz"
    np.savez(data, x=_x())
    out = tmp_path / "out"
    assert main(["tune", str(source), "--data", str(data), "--fidelity-budget", "2%", "--force", "fp16:attn/MatMul",
                 "--out", str(out), "--json"]) == 0, capsys.readouterr().err
    plan = json.loads((out / "plan.json").read_text())
    assert sorted(d["kind"] for d in plan["decisions"]) == ["linear"] * 4 + ["matmul"] * 2
    assert {d["layer"]: d["format"] for d in plan["decisions"] if d["kind"] == "matmul"} == {
        "blk/attn/MatMul": "fp16", "blk/attn/MatMul_1": "fp16"}
    assert plan["measured"]["drop"] <= plan["measured"]["allowed_drop"]
    assert "expanded 1 Attention node(s) into their ONNX function body" in (out / "report.md").read_text()
    # the files tune writes run on ONNX Runtime's CPU provider
    for name in ("attn.tuned.onnx", "attn.emulation.onnx"):
        model = onnx.load(str(out / name))
        assert not any(n.op_type == "Attention" for n in model.graph.node)
        if name == "attn.tuned.onnx":  # the deployment graph: Q Kᵀ is an fp16 MatMul
            core = {n.name: n for n in model.graph.node}["blk/attn/MatMul"]
            typed = onnx.shape_inference.infer_shapes(model)
            types = {v.name: v.type.tensor_type.elem_type for v in typed.graph.value_info}
            assert types[core.output[0]] == onnx.TensorProto.FLOAT16
        assert run(model, {"x": _x(4)})[0].shape == (4, T, D)


def test_an_attention_onnx_cannot_expand_stays_one_fp32_op_with_a_note(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where onnx's inliner cannot build the body (faked here), the model is analysed as it is: the
    Attention node stays, fp32 with its reason, and the notes say why."""
    import onnx.inliner

    def refuse(*args: object, **kwargs: object) -> onnx.ModelProto:
        raise RuntimeError("no function body\nsecond line")

    monkeypatch.setattr(onnx.inliner, "inline_selected_functions", refuse)
    a = analyse_onnx(attention_block(), example={"x": _x(1)})
    assert any("could not expand 1 Attention node(s)" in n and "no function body" in n and "\n" not in n
               for n in a.notes), a.notes
    assert [op.kind for op in a.graph.layers()] == ["linear"] * 4
    assert "scaled_dot_product_attention" in a.reasons["blk/attn"]
