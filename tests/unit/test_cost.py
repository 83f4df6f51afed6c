"""Roofline cost model (no torch): targets, layer/FOLLOW/NEVER costs, casts, memory, plug-ins."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from autoprec.core.lowering import lower
from autoprec.cost.model import CostModel
from autoprec.cost.provider import ProviderCostModel
from autoprec.cost.roofline import LAUNCH_OVERHEAD_S, RooflineCostModel
from autoprec.cost.targets import TARGETS, get_target
from autoprec.ort.providers import follow_format
from autoprec.core.errors import UsageError
from autoprec.core.formats import Precision
from autoprec.core.opgraph import OpGraph, OpNode, Policy
from autoprec.search.problem import SearchProblem
from autoprec.search.registry import solve
from autoprec.core.sensitivity import SensitivityProfile

P = Precision
H100 = get_target("h100")


def layer(name="l", flops=0, w=0, a_in=0, a_out=0, kind="linear") -> OpNode:
    return OpNode(name, kind, name, Policy.ALWAYS, flops=flops, weight_elems=w, act_in_elems=a_in, act_out_elems=a_out)


def test_targets_from_facts():
    assert set(TARGETS) == {"h100", "a100", "l4", "generic"}
    assert get_target().name == "h100" and get_target("H100") is H100
    assert H100.peak(P.FP32) == 67e12 and H100.peak(P.BF16) == H100.peak(P.FP16) == 989e12
    assert H100.peak(P.FP8_E4M3) == H100.peak(P.FP8_E5M2) == 1979e12
    assert H100.bandwidth == 3.35e12
    a100 = get_target("a100")
    assert not a100.supports(P.FP8_E4M3) and not a100.supports(P.FP8_E5M2)
    assert a100.formats == (P.FP32, P.BF16, P.FP16)
    assert get_target("l4").peak(P.FP8_E4M3) == 242e12 and get_target("l4").bandwidth == 0.30e12
    assert all(t.supports(f) for f in P for t in (H100, get_target("generic")))


def test_unknown_target_is_one_line_listing_names():
    with pytest.raises(UsageError) as e:
        get_target("b200")
    msg = str(e.value)
    assert "\n" not in msg and all(n in msg for n in TARGETS)
    with pytest.raises(UsageError, match="does not support fp8"):
        get_target("a100").peak(P.FP8_E4M3)
    with pytest.raises(UsageError, match="objective"):
        RooflineCostModel("h100", "energy")


def test_compute_bound_and_memory_bound_layers():
    cm = RooflineCostModel("h100")
    big = layer(flops=2 * 8192**3, w=8192**2, a_in=8192**2, a_out=8192**2)
    assert cm.layer_cost(big, P.BF16) == pytest.approx(2 * 8192**3 / 989e12 + LAUNCH_OVERHEAD_S)
    assert cm.layer_cost(big, P.FP32) == pytest.approx(2 * 8192**3 / 67e12 + LAUNCH_OVERHEAD_S)
    thin = layer(flops=2 * 10**6, w=10**6, a_in=10**3, a_out=10**3)  # a matrix-vector product
    nbytes = 10**6 * 2 + 10**3 * 2 + 10**3 * 2
    assert cm.layer_cost(thin, P.FP16) == pytest.approx(nbytes / 3.35e12 + LAUNCH_OVERHEAD_S)
    # fp8: one-byte weights and inputs, but the output is written in bf16
    fp8_bytes = 10**6 + 10**3 + 10**3 * 2
    assert cm.layer_cost(thin, P.FP8_E4M3) == pytest.approx(fp8_bytes / 3.35e12 + LAUNCH_OVERHEAD_S)
    tiny = layer(flops=2, w=1, a_in=1, a_out=1)
    assert cm.layer_cost(tiny, P.FP32) >= LAUNCH_OVERHEAD_S


def test_a_lookup_costs_the_rows_it_copies_not_its_table():
    cm = RooflineCostModel("h100")
    vocab, dim, tokens = 50_000, 1024, 4096
    emb = layer(kind="embedding", w=vocab * dim, a_out=tokens * dim)  # no FLOPs, no floating input
    for f in (P.FP32, P.BF16):
        read_and_write = 2 * tokens * dim * f.bytes  # the rows from the table, the same rows out
        assert cm.layer_cost(emb, f) == pytest.approx(read_and_write / 3.35e12 + LAUNCH_OVERHEAD_S)
    assert cm.layer_cost(emb, P.BF16) < cm.layer_cost(emb, P.FP32)
    # stored, it is the whole table
    mem = RooflineCostModel("h100", "memory")
    assert mem.layer_cost(emb, P.BF16) == 2 * vocab * dim + 2 * tokens * dim


def test_an_fp8_lookup_dequantizes_its_whole_table():
    """As exported (DequantizeLinear of the table, then Gather): read the table in fp8 and write it
    in fp32, then gather fp32 rows and write them in bf16, two kernels. Slower than a bf16 lookup
    at any vocabulary and batch; smaller under the memory objective (one byte per table element)."""
    cm, mem = RooflineCostModel("h100"), RooflineCostModel("h100", "memory")
    vocab, dim, tokens = 50_000, 1024, 4096
    emb = layer(kind="embedding", w=vocab * dim, a_out=tokens * dim)
    for f in (P.FP8_E4M3, P.FP8_E5M2):
        nbytes = vocab * dim * (1 + 4) + tokens * dim * (4 + 2)
        assert cm.layer_cost(emb, f) == pytest.approx(nbytes / 3.35e12 + 2 * LAUNCH_OVERHEAD_S)
        assert cm.layer_cost(emb, f) > cm.layer_cost(emb, P.BF16)
        assert mem.layer_cost(emb, f) == vocab * dim + 2 * tokens * dim < mem.layer_cost(emb, P.BF16)
    for v, t in ((8, 10**6), (10**6, 1)):  # a tiny table read many times, a huge one read once
        op = layer(kind="embedding", w=v * dim, a_out=t * dim)
        assert cm.layer_cost(op, P.FP8_E4M3) > cm.layer_cost(op, P.BF16), (v, t)


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 10**12), st.integers(0, 10**8), st.integers(0, 10**8), st.integers(0, 10**8),
       st.sampled_from(sorted(TARGETS)))
def test_narrower_formats_are_never_slower(flops, w, a_in, a_out, target):
    cm = RooflineCostModel(target)
    op = layer(flops=flops, w=w, a_in=a_in, a_out=a_out)
    costs = {f: cm.layer_cost(op, f) for f in cm.target.formats}
    assert costs[P.BF16] == costs[P.FP16] <= costs[P.FP32]
    if P.FP8_E4M3 in costs:
        assert costs[P.FP8_E4M3] == costs[P.FP8_E5M2] <= costs[P.BF16]
    assert all(c >= LAUNCH_OVERHEAD_S for c in costs.values())


def test_cast_costs():
    cm = RooflineCostModel("h100")
    n = 10**6
    assert cm.cast_cost(n, P.BF16, P.BF16) == 0.0
    assert cm.cast_cost(n, P.FP32, P.BF16) == pytest.approx(n * 6 / 3.35e12 + LAUNCH_OVERHEAD_S)
    # into fp8: one kernel that scales by the static calibration scale and casts (no amax pass)
    assert cm.cast_cost(n, P.BF16, P.FP8_E4M3) == pytest.approx(n * (2 + 1) / 3.35e12 + LAUNCH_OVERHEAD_S)
    assert cm.cast_cost(n, P.BF16, P.FP8_E4M3) < cm.cast_cost(n, P.BF16, P.FP16)
    mem = RooflineCostModel("h100", "memory")
    assert mem.cast_cost(n, P.FP32, P.FP16) == 2 * n


def qkv_graph() -> OpGraph:
    """x -> ln (NEVER) -> q, k, v (tied) ; q,k -> qk -> softmax -> av <- v ; av -> relu -> out."""
    n = 1000
    nodes = [
        OpNode("x", "placeholder", "", Policy.NONE, act_out_elems=n),
        OpNode("ln", "layer_norm", "ln", Policy.NEVER, act_in_elems=n, act_out_elems=n),
        *(layer(q, flops=2 * n * 64, w=64 * 64, a_in=n, a_out=n) for q in "qkv"),
        layer("qk", flops=2 * n * n, a_in=2 * n, a_out=n, kind="matmul"),
        OpNode("sm", "softmax", "sm", Policy.NEVER, act_in_elems=n, act_out_elems=n),
        layer("av", flops=2 * n * n, a_in=2 * n, a_out=n, kind="matmul"),
        OpNode("relu", "relu", "relu", Policy.FOLLOW, act_in_elems=n, act_out_elems=n),
        OpNode("view", "view", "view", Policy.FOLLOW, act_in_elems=n, act_out_elems=n),
        OpNode("out", "output", "", Policy.NONE),
    ]
    edges = [("x", "ln"), ("ln", "q"), ("ln", "k"), ("ln", "v"), ("q", "qk"), ("k", "qk"), ("qk", "sm"),
             ("sm", "av"), ("v", "av"), ("av", "relu"), ("relu", "view"), ("view", "out")]
    return OpGraph(nodes, edges, "qkv", ties=[["q", "k", "v"]])


def test_the_lowering_casts_once_per_value_and_format():
    g = qkv_graph()
    cm = RooflineCostModel("h100")
    all16 = {n: P.FP16 for n in g.layer_names()}
    casts = {(c.value, c.to, c.readers) for c in lower(g, all16).casts}
    # the LayerNorm output, read by three projections, is cast once; qk's output goes back to fp32
    # for the softmax, and av's (through relu and a view, which follow it in fp16) for the output
    assert casts == {("ln", P.FP16, ("q", "k", "v")), ("sm", P.FP16, ("av",)), ("qk", P.FP32, ("sm",)),
                     ("view", P.FP32, ("out",))}
    b = cm.breakdown(g, all16)
    # one fp32 -> fp16 cast for ln's output (not three), one for the softmax output av reads;
    # qk reads q and k, already fp16: no cast; qk's and av's results go back to fp32
    # (each cast moves the 1000 elements of the value it converts, not av's whole 2000-element input)
    expected = 2 * cm.cast_cost(1000, P.FP32, P.FP16) + 2 * cm.cast_cost(1000, P.FP16, P.FP32)
    assert b.casts == pytest.approx(expected)
    assert cm.breakdown(g, {}).casts == 0.0


def test_plan_cost_sums_layers_follow_fixed_and_casts():
    g = qkv_graph()
    cm = RooflineCostModel("h100")
    fp32 = cm.breakdown(g, {})
    assert fp32.total == cm.plan_cost(g, {}) == pytest.approx(fp32.layers + fp32.follow + fp32.fixed)
    mixed = {"q": P.FP8_E4M3, "k": P.FP8_E4M3, "v": P.FP8_E4M3, "qk": P.BF16, "av": P.FP16}
    b = cm.breakdown(g, mixed)
    relu = g["relu"]
    assert b.follow == pytest.approx(cm.follow_cost(relu, P.FP16))  # relu follows av (fp16)
    assert cm.follow_cost(g["view"], P.FP16) == 0.0  # views move no bytes
    assert b.fixed == fp32.fixed  # NEVER ops stay fp32 whatever the plan
    assert b.layers < fp32.layers
    # casts: ln -> fp8 (quantize), q,k (write bf16) -> qk bf16 needs none; v (bf16) -> av fp16;
    # qk (bf16) -> softmax and av (fp16) -> output go back to fp32
    assert b.casts == pytest.approx(cm.cast_cost(1000, P.FP32, P.FP8_E4M3) + cm.cast_cost(1000, P.FP32, P.FP16)
                                    + cm.cast_cost(1000, P.BF16, P.FP16) + cm.cast_cost(1000, P.BF16, P.FP32)
                                    + cm.cast_cost(1000, P.FP16, P.FP32))


def test_memory_objective_counts_weights_in_their_format():
    g = qkv_graph()
    mem = RooflineCostModel("h100", "memory")
    w = sum(op.weight_elems for op in g.layers())
    full = mem.plan_cost(g, {})
    half = mem.plan_cost(g, {n: P.BF16 for n in g.layer_names()})
    assert half < full
    assert full - mem.plan_cost(g, {"q": P.FP8_E4M3, "k": P.FP8_E4M3, "v": P.FP8_E4M3}) > 0
    assert mem.layer_cost(g["q"], P.FP8_E4M3) == 64 * 64 * 1 + 1000 * 2
    assert w * 4 <= full


class CountingCost(CostModel):
    """A user cost model: every layer costs its bit width; casts cost 1. Only two methods."""

    name = "bits"

    def layer_cost(self, op, fmt):
        return float(fmt.bits)

    def cast_cost(self, elems, src, dst):
        return 1.0


def test_custom_cost_model_plugs_into_the_search():
    g = qkv_graph()
    errors = {n: {f: 1e-3 for f in (P.BF16, P.FP16, P.FP8_E4M3)} for n in g.layer_names()}
    prof = SensitivityProfile("qkv", g.fingerprint(), "exact", "kl", (P.FP32, P.BF16, P.FP16, P.FP8_E4M3), errors)
    prob = SearchProblem.build(g, prof, CountingCost(), budget=1.0)
    plan = solve(prob, "milp")
    assert plan.target == "bits"
    assert plan.cost == CountingCost().plan_cost(g, plan.assignment)
    assert plan.cost <= CountingCost().plan_cost(g, {n: P.FP8_E4M3 for n in g.layer_names()})
    assert plan.cost < plan.fp32_cost


def test_at_batch_scales_what_depends_on_inputs_only():
    g = qkv_graph()
    g.batch = 4
    big = g.at_batch(16)
    assert big.batch == 16 and big.fingerprint() == g.fingerprint()
    assert big["q"].flops == 4 * g["q"].flops and big["q"].act_in_elems == 4 * g["q"].act_in_elems
    assert big["q"].weight_elems == g["q"].weight_elems  # weights do not grow with the batch
    assert big["x"].act_out_elems == 4 * g["x"].act_out_elems
    with pytest.raises(ValueError):
        qkv_graph().at_batch(16)  # a graph that does not know its example batch


def test_at_batch_does_not_scale_what_reads_an_input_only_through_its_shape():
    """``pos_emb(positions[:x.size(1)])`` copies as many rows at any batch; ``tok_emb(x)`` scales."""
    node = OpNode
    nodes = [node("x", "placeholder", "", Policy.NONE, output_shape=(2, 8)),
             node("size", "size", "", Policy.NONE, input_shapes=((2, 8),), output_shape=()),
             node("positions", "get_attr", "", Policy.NONE, output_shape=(64,)),
             node("narrow", "narrow", "", Policy.NONE, output_shape=(8,)),
             node("tok", "embedding", "tok", Policy.ALWAYS, flops=0, weight_elems=640, act_out_elems=2 * 8 * 16),
             node("pos", "embedding", "pos", Policy.ALWAYS, flops=0, weight_elems=1024, act_out_elems=8 * 16),
             node("add", "add", "", Policy.FOLLOW, act_in_elems=2 * 8 * 16 + 8 * 16, act_out_elems=2 * 8 * 16)]
    edges = [("x", "size"), ("x", "tok"), ("positions", "narrow"), ("size", "narrow"), ("narrow", "pos"),
             ("tok", "add"), ("pos", "add")]
    big = OpGraph(nodes, edges, "lm", batch=2).at_batch(32)
    assert big["tok"].act_out_elems == 16 * nodes[4].act_out_elems
    assert big["pos"].act_out_elems == nodes[5].act_out_elems
    assert big["add"].act_out_elems == 16 * nodes[6].act_out_elems


def test_provider_prices_layers_as_it_runs_them():
    """ORT's CPU and CUDA providers run an fp8 layer as an fp32 op between Q/DQ: it costs the fp32
    layer; TensorRT fuses Q/DQ into an fp8 kernel: the base model's fp8 cost. 16-bit is unchanged."""
    base = RooflineCostModel("h100")
    big = layer(flops=2 * 4096**3, w=4096**2, a_in=4096**2, a_out=4096**2)
    for prov in ("cuda", "CPUExecutionProvider"):
        cm = ProviderCostModel(base, prov)
        assert cm.layer_cost(big, P.FP8_E4M3) == base.layer_cost(big, P.FP32)
        assert cm.layer_cost(big, P.BF16) == base.layer_cost(big, P.BF16)
    trt = ProviderCostModel(base, "tensorrt")
    assert trt.layer_cost(big, P.FP8_E4M3) == base.layer_cost(big, P.FP8_E4M3)
    assert trt.cast_cost(100, P.FP32, P.FP8_E4M3) == base.cast_cost(100, P.FP32, P.FP8_E4M3)
    assert trt.name == base.name and trt.objective == base.objective
    with pytest.raises(UsageError, match="unknown execution provider"):
        ProviderCostModel(base, "rocm")


def test_provider_prices_a_bias_added_outside_the_product():
    """On ORT's CUDA/CPU providers a 16-bit layer's bias is an Add of its own (its product is rounded
    first), while fp32 and fp8 (fp32 compute) fuse it into the Gemm/Conv; a linear layer on 3-D
    inputs is MatMul + Add in every format. TensorRT fuses every bias; a layer without one pays nothing."""
    base = RooflineCostModel("h100")
    cuda, trt = ProviderCostModel(base, "cuda"), ProviderCostModel(base, "tensorrt")
    n = 1 << 16

    def lin(out_shape, bias=True):
        shapes = ((n, 128), (128, 128), (128,)) if bias else ((n, 128), (128, 128))
        return OpNode("fc", "linear", "fc", Policy.ALWAYS, input_shapes=shapes, output_shape=out_shape,
                      flops=2 * n * 128 * 128, weight_elems=128 * 129, act_in_elems=n * 128, act_out_elems=n * 128)

    def add_cost(fmt):  # an Add reading and writing the layer's output in fmt, one launch
        return 2 * n * 128 * fmt.bytes / base.target.bandwidth + LAUNCH_OVERHEAD_S

    gemm, matmul = lin((n, 128)), lin((n // 64, 64, 128))
    for fmt in (P.BF16, P.FP16):
        assert cuda.layer_cost(gemm, fmt) == pytest.approx(base.layer_cost(gemm, fmt) + add_cost(fmt))
        assert trt.layer_cost(gemm, fmt) == base.layer_cost(gemm, fmt)
        assert cuda.layer_cost(lin((n, 128), bias=False), fmt) == base.layer_cost(gemm, fmt)
    assert cuda.layer_cost(gemm, P.FP32) == base.layer_cost(gemm, P.FP32)
    assert cuda.layer_cost(gemm, P.FP8_E4M3) == base.layer_cost(gemm, P.FP32)
    for fmt, runs in ((P.FP32, P.FP32), (P.FP8_E4M3, P.FP32), (P.BF16, P.BF16)):
        assert cuda.layer_cost(matmul, fmt) == pytest.approx(base.layer_cost(matmul, runs) + add_cost(runs))
    conv = OpNode("c", "conv2d", "c", Policy.ALWAYS, input_shapes=((8, 3, 32, 32), (16, 3, 3, 3), (16,)),
                  output_shape=(8, 16, 32, 32), flops=2 * 8 * 16 * 32 * 32 * 27, weight_elems=16 * 28,
                  act_in_elems=8 * 3 * 32 * 32, act_out_elems=8 * 16 * 32 * 32)
    assert cuda.layer_cost(conv, P.FP16) > base.layer_cost(conv, P.FP16)
    assert cuda.layer_cost(conv, P.FP32) == base.layer_cost(conv, P.FP32)


def test_search_for_cuda_leaves_fp8_to_tensorrt():
    """Equal errors everywhere: on TensorRT the search picks fp8; priced for ORT's CUDA provider,
    where fp8 is fp32 compute plus quantize casts, it picks a 16-bit format."""
    n = 4096
    g = OpGraph([OpNode("x", "placeholder", "", Policy.NONE, act_out_elems=n * n),
                 layer("fc", flops=2 * n**3, w=n * n, a_in=n * n, a_out=n * n), OpNode("out", "output", "", Policy.NONE)],
                [("x", "fc"), ("fc", "out")], "big")
    errors = {n: {f: 1e-6 for f in (P.BF16, P.FP16, P.FP8_E4M3)} for n in g.layer_names()}
    prof = SensitivityProfile("big", g.fingerprint(), "exact", "kl", (P.FP32, P.BF16, P.FP16, P.FP8_E4M3), errors)
    picks = {}
    for prov in ("tensorrt", "cuda"):
        plan = solve(SearchProblem.build(g, prof, ProviderCostModel(RooflineCostModel("h100"), prov), budget=1.0),
                     "milp")
        picks[prov] = set(plan.assignment.values())
        reason = next(d.reason for d in plan.decisions if d.layer == "fc")
        assert ("CUDAExecutionProvider computes it in fp32 between QuantizeLinear/DequantizeLinear" in reason) \
            == (prov == "cuda"), reason
    assert Precision.FP8_E4M3 in picks["tensorrt"]
    assert Precision.FP8_E4M3 not in picks["cuda"] and picks["cuda"] <= {P.BF16, P.FP16}


def test_provider_prices_a_follow_op_without_a_kernel_in_fp32_between_casts():
    """ORT's CUDA provider has no bf16 Gelu in autoprec's table: a bf16 GELU there runs in fp32
    between two casts, as the deployment graph written for it does; fp16 and ReLU keep their price.
    (A machine whose live CUDA registry lists a bf16 Gelu prices it as bf16.)"""
    assert follow_format("gelu", P.BF16, "cuda", live=False) is P.FP32
    assert follow_format("gelu", P.FP16, "cuda", live=False) is P.FP16
    base = RooflineCostModel("h100")
    cuda = ProviderCostModel(base, "cuda")
    n = 1 << 20
    gelu = OpNode("g", "gelu", "g", Policy.FOLLOW, act_in_elems=n, act_out_elems=n)
    relu = OpNode("r", "relu", "r", Policy.FOLLOW, act_in_elems=n, act_out_elems=n)
    if follow_format("gelu", P.BF16, "cuda") is P.FP32:
        assert cuda.follow_cost(gelu, P.BF16) == pytest.approx(
            base.follow_cost(gelu, P.FP32) + base.cast_cost(n, P.BF16, P.FP32) + base.cast_cost(n, P.FP32, P.BF16))
        assert cuda.follow_cost(gelu, P.BF16) > base.follow_cost(gelu, P.BF16)
    assert cuda.follow_cost(gelu, P.FP16) == base.follow_cost(gelu, P.FP16)
    assert cuda.follow_cost(relu, P.BF16) == base.follow_cost(relu, P.BF16)


def test_a_16_bit_conv_before_an_fp32_norm_pays_the_cast_back():
    """conv -> batch_norm (NEVER, fp32) -> relu -> conv -> output: each 16-bit conv's result is cast
    back to fp32 (for the norm, for the graph output), and the norm's result cast to the second
    conv's format; all-fp32 pays no cast."""
    n = 4096
    nodes = [OpNode("x", "placeholder", "", Policy.NONE, act_out_elems=n),
             layer("c1", flops=2 * n * 64, w=64, a_in=n, a_out=n, kind="conv2d"),
             OpNode("bn", "batch_norm", "bn", Policy.NEVER, act_in_elems=n, act_out_elems=n),
             OpNode("relu", "relu", "relu", Policy.FOLLOW, act_in_elems=n, act_out_elems=n),
             layer("c2", flops=2 * n * 64, w=64, a_in=n, a_out=n, kind="conv2d"),
             OpNode("out", "output", "", Policy.NONE)]
    g = OpGraph(nodes, [("x", "c1"), ("c1", "bn"), ("bn", "relu"), ("relu", "c2"), ("c2", "out")], "convbn")
    cm = RooflineCostModel("h100")
    fp16 = {"c1": P.FP16, "c2": P.FP16}
    assert {(c.value, c.to) for c in lower(g, fp16).casts} == {("x", P.FP16), ("c1", P.FP32), ("relu", P.FP16),
                                                               ("c2", P.FP32)}
    assert cm.breakdown(g, {}).casts == 0.0
    fp16 = {"c1": P.FP16, "c2": P.FP16}
    assert cm.breakdown(g, fp16).casts == pytest.approx(
        2 * cm.cast_cost(n, P.FP32, P.FP16) + 2 * cm.cast_cost(n, P.FP16, P.FP32))
