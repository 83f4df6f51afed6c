"""MapLayers: groups by the exporter's FX node, layers paired by scope, kind and order, weights checked."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from deploy_models import run_onnx
from onnx import numpy_helper

from autoprec.core.errors import PlanError
from autoprec.core.formats import Precision
from autoprec.core.passes import PassManager
from autoprec.onnx.passes.base import GROUP, KIND, LAYER, ROLE, ROLE_CORE, SCOPE, get_meta, set_meta
from autoprec.onnx.passes.map_layers import NAME_SCOPES, MapLayers

BF16, FP16, E4M3, FP32 = Precision.BF16, Precision.FP16, Precision.FP8_E4M3, Precision.FP32


def _copy(m: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(m)
    return out


def _map(case, plan):
    model = _copy(case.fp32)
    p = MapLayers(case.captured, plan)
    model = PassManager([p]).run(model).graph
    return model, p


def test_every_layer_maps_to_one_group_with_one_core(exact_net) -> None:
    before = [n.op_type for n in exact_net.fp32.graph.node]
    model, p = _map(exact_net, exact_net.uniform(BF16))
    assert [n.op_type for n in model.graph.node] == before  # metadata only: same ops, same numbers
    assert np.array_equal(run_onnx(model, *exact_net.inputs), run_onnx(exact_net.fp32, *exact_net.inputs))
    assert sorted(p.matches) == sorted(exact_net.layers) and not p.unmatched
    by_layer: dict[str, list[onnx.NodeProto]] = {}
    for n in model.graph.node:
        assert get_meta(n, GROUP) and get_meta(n, KIND) is not None and get_meta(n, SCOPE) is not None
        if get_meta(n, LAYER):
            by_layer.setdefault(get_meta(n, LAYER), []).append(n)
    # a linear on a 3-D input is MatMul + Add: one group, one core
    assert [n.op_type for n in by_layer["la"]] == ["MatMul", "Add"]
    for layer, nodes in by_layer.items():
        cores = [n for n in nodes if get_meta(n, ROLE) == ROLE_CORE]
        assert len(cores) == 1 and cores[0].op_type in ("MatMul", "Gemm", "Conv"), layer
        assert len({get_meta(n, GROUP) for n in nodes}) == 1
    # the activation x activation matmul reads the two linear outputs
    core = next(n for n in by_layer["matmul"] if get_meta(n, ROLE) == ROLE_CORE)
    producers = {o: n for n in model.graph.node for o in n.output}
    assert get_meta(producers[core.input[0]], LAYER) == "la"
    assert get_meta(producers[core.input[1]], KIND) == "transpose"


def test_attention_matmuls_pair_in_order(zoo) -> None:
    case = zoo("char_transformer")
    model, p = _map(case, case.uniform(BF16))
    assert not p.unmatched and len(p.matches) == 19
    # both lookups are Gathers of their tables; the position lookup (of a slice of a buffer, fixed
    # by the example's length) was not folded into a constant
    gathers = {get_meta(n, LAYER): n.input[0] for n in model.graph.node
               if get_meta(n, ROLE) == ROLE_CORE and n.op_type == "Gather"}
    assert gathers == {"tok_emb": "tok_emb.weight", "pos_emb": "pos_emb.weight"}
    producers = {o: n for n in model.graph.node for o in n.output}
    cores = {get_meta(n, LAYER): n for n in model.graph.node if get_meta(n, ROLE) == ROLE_CORE}
    # matmul is q @ k^T, matmul_1 is softmax(...) @ v: the order within the scope decides
    assert producers[cores["matmul_1"].input[0]].op_type == "Softmax"
    assert producers[cores["matmul"].input[0]].op_type == "Transpose"
    # a torch.nn leaf module gives its kind to the ops inside it (fx sees one call_module node)
    kinds = {get_meta(n, KIND) for n in model.graph.node if get_meta(n, SCOPE) == "blocks.0.mlp.act"}
    assert kinds == {"gelu"}


def test_embeddings_pair_with_the_gathers_of_their_tables(exact_embed) -> None:
    model, p = _map(exact_embed, {"tok": FP16, "pos": BF16})
    assert not p.unmatched
    cores = {get_meta(n, LAYER): n for n in model.graph.node if get_meta(n, ROLE) == ROLE_CORE}
    for layer in ("tok", "pos"):
        m = p.matches[layer]
        assert cores[layer].op_type == "Gather" and cores[layer].input[0] == m.weight == f"{layer}.weight"
        assert not m.weight_transposed
    # an ONNX table that is not the captured one is refused, as a linear's weight is
    bad = _copy(exact_embed.fp32)
    table = next(t for t in bad.graph.initializer if t.name == "tok.weight")
    arr = numpy_helper.to_array(table).copy()
    arr[0, 0] += 1.0
    table.CopyFrom(numpy_helper.from_array(arr, table.name))
    with pytest.raises(PlanError, match=r"tok.*not tok\.weight"):
        PassManager([MapLayers(exact_embed.captured, {"tok": FP16})]).run(bad)


def test_conv_layers_and_bias_free_conv(exact_cnn) -> None:
    model, p = _map(exact_cnn, exact_cnn.uniform(FP16))
    assert {m.layer: m.weight_transposed for m in p.matches.values()} == {"c1": False, "c2": False, "fc": False}
    ops = {get_meta(n, LAYER): n.op_type for n in model.graph.node if get_meta(n, ROLE) == ROLE_CORE}
    assert ops == {"c1": "Conv", "c2": "Conv", "fc": "Gemm"}


def test_other_weights_are_a_plan_error_naming_the_layer(exact_net) -> None:
    model = _copy(exact_net.fp32)
    # the head's weight in the ONNX file is not the captured model's: pairing must refuse
    core = next(n for n in model.graph.node if n.op_type in ("MatMul", "Gemm")
                and any(s.endswith("head'") or "'head'" in s for s in [get_meta(n, NAME_SCOPES) or ""]))
    w = next(t for t in model.graph.initializer if t.name == core.input[1])
    arr = numpy_helper.to_array(w).copy()
    arr[0, 0] += 1.0
    w.CopyFrom(numpy_helper.from_array(arr, w.name))
    with pytest.raises(PlanError, match=r"head.*(not head\.weight)"):
        PassManager([MapLayers(exact_net.captured, {"head": BF16})]).run(model)
    # an fp32 layer that cannot be paired is no error: it stays fp32 either way
    p = MapLayers(exact_net.captured, {"la": BF16, "head": FP32})
    PassManager([p]).run(_copy(model))
    assert "head" in p.unmatched and "la" in p.matches


def test_missing_counterpart_is_a_plan_error(exact_net) -> None:
    model = _copy(exact_net.fp32)
    # pretend the exporter put lb in another scope: the scope 'lb' then has no linear in ONNX
    for n in model.graph.node:
        scopes = get_meta(n, NAME_SCOPES) or ""
        if "'lb'" in scopes:
            set_meta(n, NAME_SCOPES, scopes.replace("'lb'", "'elsewhere'"))
    with pytest.raises(PlanError, match=r"cannot map plan layer\(s\) lb .*scope 'lb' has 1 linear layer"):
        PassManager([MapLayers(exact_net.captured, {"lb": FP16})]).run(model)
