"""InsertCasts: one conversion per (value, type), graph I/O fp32, and the emulation graph computes
bit for bit what the torch emulation computes (exact-arithmetic models make that testable)."""

from __future__ import annotations

import collections
import random

import numpy as np
import onnx
import pytest
from deploy_models import rel_l2, run_onnx
from onnx import TensorProto

from autoprec.deploy.export import apply_plan_onnx
from autoprec.core.formats import Precision
from autoprec.torch.passes import apply_plan
from autoprec.onnx.passes.base import GraphIndex, INSERTED, LAYER, ROLE, ROLE_CORE, attr, get_meta, infer_types

BF16, FP16, E4M3, FP32 = Precision.BF16, Precision.FP16, Precision.FP8_E4M3, Precision.FP32
MIXED = {"la": FP16, "lb": BF16, "matmul": BF16, "head": E4M3}


def _torch(case, plan, amax=None):
    return apply_plan(case.captured, plan, case.amax if amax is None else amax)(*case.inputs).detach().numpy()


def _onnx(case, plan, mode, amax=None):
    return apply_plan_onnx(case.fp32, case.captured, plan, case.amax if amax is None else amax, mode,
                           keep_metadata=True)


def _inserted(model):
    return [n for n in model.graph.node if get_meta(n, INSERTED) in ("cast", "round", "quantize")]


def test_deploy_graph_types_and_casts(exact_net) -> None:
    model = infer_types(_onnx(exact_net, MIXED, "deploy"))
    idx = GraphIndex(model)
    for v in idx.inputs + idx.outputs:
        assert idx.elem_type(v) == TensorProto.FLOAT
    cores = {get_meta(n, LAYER): n for n in model.graph.node if get_meta(n, ROLE) == ROLE_CORE}
    # 16-bit layers really compute in 16 bit; the fp8 layer computes on dequantized fp32 operands
    assert idx.elem_type(cores["la"].output[0]) == TensorProto.FLOAT16
    assert idx.elem_type(cores["matmul"].output[0]) == TensorProto.BFLOAT16
    assert idx.elem_type(cores["head"].output[0]) == TensorProto.FLOAT
    producers = {o: n for n in model.graph.node for o in n.output}
    assert producers[cores["head"].input[0]].op_type == "DequantizeLinear"
    q = producers[producers[cores["head"].input[0]].input[0]]
    assert q.op_type == "QuantizeLinear" and attr(q, "saturate") == 1
    # one conversion per (value, target): the subtraction's result is read by la (fp16) and lb
    # (bf16): one Cast each, none twice
    keys = collections.Counter((n.input[0], n.op_type, attr(n, "to")) for n in _inserted(model))
    assert max(keys.values()) == 1
    sub_out = next(n.output[0] for n in model.graph.node if n.op_type == "Sub")
    assert sorted(attr(n, "to") for n in _inserted(model) if n.input[0] == sub_out) == \
        sorted([TensorProto.FLOAT16, TensorProto.BFLOAT16])
    # no chains of inserted Casts
    inserted = {n.output[0] for n in _inserted(model)}
    assert not any(n.op_type == "Cast" and n.input[0] in inserted for n in _inserted(model))
    onnx.checker.check_model(model, full_check=True)


def test_emulation_graph_computes_in_fp32(exact_net) -> None:
    model = infer_types(_onnx(exact_net, MIXED, "emulate"))
    idx = GraphIndex(model)
    ops = collections.Counter(n.op_type for n in model.graph.node if get_meta(n, INSERTED))
    for n in model.graph.node:
        if get_meta(n, INSERTED):
            continue
        for v in list(n.input) + list(n.output):
            if v and idx.is_float(v) and v not in idx.inits:
                assert idx.elem_type(v) == TensorProto.FLOAT, (n.name, v)
    # roundings are Cast pairs; fp8 is QuantizeLinear/DequantizeLinear (activation + weight)
    pairs = [n for n in model.graph.node if n.op_type == "Cast" and get_meta(n, INSERTED) == "round"
             and attr(n, "to") != TensorProto.FLOAT]
    assert ops["QuantizeLinear"] == 1 and ops["DequantizeLinear"] == 2 and len(pairs) >= 6


def _plans(case, n, seed):
    rng = random.Random(seed)
    fmts = [FP32, BF16, FP16, E4M3]
    return ([case.uniform(f) for f in (BF16, FP16, E4M3)]
            + [{l: rng.choice(fmts) for l in case.layers} for _ in range(n)])


@pytest.mark.parametrize("which", ["exact_net", "exact_cnn", "exact_embed"])
def test_oracle_bit_exact_on_exact_arithmetic(which, request) -> None:
    """Sums of integers are exact in any order, so ORT and torch agree to the bit on fp32 math; the
    roundings must then land in the same places for the outputs to be equal."""
    case = request.getfixturevalue(which)
    y32 = case.module(*case.inputs).detach().numpy()
    assert np.array_equal(run_onnx(case.fp32, *case.inputs), y32)
    for plan in _plans(case, 6, seed=7):
        want = _torch(case, plan)
        got = run_onnx(_onnx(case, plan, "emulate"), *case.inputs)
        assert np.array_equal(got, want), {k: v.value for k, v in plan.items()}
        if FP32 not in plan.values():
            assert not np.array_equal(want, y32)  # the plan's roundings change the output


def test_oracle_fp8_saturation(exact_net) -> None:
    """A calibrated amax below the data's range: E4M3 saturates at 448 in both implementations."""
    amax = {n: (224.0, 112.0) for n in exact_net.layers}
    plan = exact_net.uniform(E4M3)
    want = _torch(exact_net, plan, amax)
    got = run_onnx(_onnx(exact_net, plan, "emulate", amax), *exact_net.inputs)
    assert np.array_equal(got, want)
    assert not np.array_equal(want, _torch(exact_net, plan))


def test_numerics_against_the_unrewritten_model(exact_cnn) -> None:
    y32 = run_onnx(exact_cnn.fp32, *exact_cnn.inputs)
    for fmt in (BF16, FP16, E4M3):
        y = run_onnx(_onnx(exact_cnn, exact_cnn.uniform(fmt), "emulate"), *exact_cnn.inputs)
        assert 0 < rel_l2(y, y32) < 8 * fmt.eps, fmt


def test_deploy_graphs_run_where_the_cpu_can(exact_cnn, exact_net) -> None:
    # fp16 runs on ORT's CPU provider (computed in fp32 without the fp16 rounding: close, not equal)
    y16 = run_onnx(_onnx(exact_cnn, exact_cnn.uniform(FP16), "deploy"), *exact_cnn.inputs)
    assert rel_l2(y16, _torch(exact_cnn, exact_cnn.uniform(FP16))) < FP16.eps
    # an fp8 head in an fp32 model: Q/DQ + fp32 Gemm + bf16 result: the same roundings as emulation
    plan = {"head": E4M3}
    got = run_onnx(_onnx(exact_net, plan, "deploy"), *exact_net.inputs)
    assert np.array_equal(got, _torch(exact_net, plan))


def test_embedding_deploy_graph_reads_16_bit_tables(exact_embed) -> None:
    """Deployed, each lookup is a Gather of a 16-bit table: its rows, and the sum of the two
    embeddings after it, are 16-bit tensors; the position lookup of a buffer slice is no constant."""
    plan = {"tok": FP16, "pos": FP16, "head": FP16}
    model = infer_types(_onnx(exact_embed, plan, "deploy"))
    onnx.checker.check_model(model, full_check=True)
    idx = GraphIndex(model)
    cores = {get_meta(n, LAYER): n for n in model.graph.node if get_meta(n, ROLE) == ROLE_CORE}
    for layer in ("tok", "pos"):
        gather = cores[layer]
        assert gather.op_type == "Gather" and idx.elem_type(gather.input[0]) == TensorProto.FLOAT16, layer
        assert gather.input[0] in idx.inits and idx.elem_type(gather.output[0]) == TensorProto.FLOAT16, layer
    add = next(n for n in model.graph.node if n.op_type == "Add" and cores["tok"].output[0] in n.input)
    assert idx.elem_type(add.output[0]) == TensorProto.FLOAT16
    # ORT's CPU provider runs it (its fp16 Add computes in fp32 without the rounding: close, not equal)
    got = run_onnx(model, *exact_embed.inputs)
    assert rel_l2(got, _torch(exact_embed, plan)) < FP16.eps


def test_fp8_tables_dequantize_then_gather_then_round_to_bf16(exact_embed) -> None:
    """ONNX Gather admits no fp8: an fp8 table is DequantizeLinear(codes, per-row scales, axis 0) ->
    fp32 Gather, and the rows are rounded to bf16 like every fp8 layer's result (a Cast to bf16 in
    the deployment graph, a Cast pair in the emulation graph). ORT computes the torch emulation's bits."""
    plan = {"tok": E4M3, "pos": Precision.FP8_E5M2}
    for mode in ("deploy", "emulate"):
        model = infer_types(_onnx(exact_embed, plan, mode))
        onnx.checker.check_model(model, full_check=True)
        idx = GraphIndex(model)
        producers = {o: n for n in model.graph.node for o in n.output}
        cores = {get_meta(n, LAYER): n for n in model.graph.node if get_meta(n, ROLE) == ROLE_CORE}
        for layer, fmt in plan.items():
            gather = cores[layer]
            dq = producers[gather.input[0]]
            assert dq.op_type == "DequantizeLinear" and attr(dq, "axis") == 0 and len(dq.input) == 2, (mode, layer)
            assert idx.elem_type(dq.input[0]) == fmt.onnx_type and dq.input[0] in idx.inits, (mode, layer)
            assert gather.op_type == "Gather" and idx.elem_type(gather.output[0]) == TensorProto.FLOAT
            (cast,) = [n for n in model.graph.node if gather.output[0] in n.input]
            assert cast.op_type == "Cast" and attr(cast, "to") == TensorProto.BFLOAT16, (mode, layer)
            back = [n for n in model.graph.node if cast.output[0] in n.input]
            if mode == "emulate":
                assert [(n.op_type, attr(n, "to")) for n in back] == [("Cast", TensorProto.FLOAT)], layer
            else:  # the sum of the two bf16 lookups runs in bf16
                assert [n.op_type for n in back] == ["Add"] and idx.elem_type(back[0].output[0]) == TensorProto.BFLOAT16
        if mode == "emulate":
            assert np.array_equal(run_onnx(model, *exact_embed.inputs), _torch(exact_embed, plan))
    # ORT's CPU provider has no bf16 Add: the deployment graph runs where the rest of the model is fp32
    plan = {"tok": E4M3}
    assert np.array_equal(run_onnx(_onnx(exact_embed, plan, "deploy"), *exact_embed.inputs), _torch(exact_embed, plan))
