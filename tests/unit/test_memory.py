"""Deployed memory (autoprec.cost.memory): weights in their formats, tied once, plus peak live activations."""

from __future__ import annotations

from autoprec.core.formats import Precision as P
from autoprec.core.opgraph import OpGraph, OpNode, Policy
from autoprec.cost.memory import deployed_memory, peak_activation_bytes, weight_bytes


def _layer(name: str, a_in: int, a_out: int, w: int = 0, weight: str | None = None, kind: str = "linear") -> OpNode:
    return OpNode(name, kind, name, Policy.ALWAYS, weight_elems=w, act_in_elems=a_in, act_out_elems=a_out,
                  weight=weight)


def tied_lm() -> OpGraph:
    """ids -> embed (table T) -> fc -> gelu -> view -> head (reads T, tied) -> output; ln reads a scale."""
    nodes = [
        OpNode("ids", "placeholder", "", Policy.NONE),
        _layer("embed", 0, 100, w=1000, weight="T", kind="embedding"),
        _layer("fc", 100, 400, w=40, weight="fc.w"),
        OpNode("gelu", "gelu", "gelu", Policy.FOLLOW, act_in_elems=400, act_out_elems=400),
        OpNode("view", "view", "view", Policy.FOLLOW, act_in_elems=400, act_out_elems=400),
        OpNode("ln", "layer_norm", "ln", Policy.NEVER, act_in_elems=400, act_out_elems=400, weight_elems=8),
        _layer("head", 400, 1000, w=1000, weight="T"),
        OpNode("out", "output", "", Policy.NONE, act_in_elems=1000),
    ]
    edges = [("ids", "embed"), ("embed", "fc"), ("fc", "gelu"), ("gelu", "view"), ("view", "ln"), ("ln", "head"),
             ("head", "out")]
    return OpGraph(nodes, edges, "lm", ties=[["embed", "head"]])


def test_a_tied_weight_is_stored_once_in_its_format() -> None:
    g = tied_lm()
    assert weight_bytes(g, {}) == (1000 + 40 + 8) * 4
    plan = {"embed": P.FP8_E4M3, "head": P.FP8_E4M3, "fc": P.BF16}
    assert weight_bytes(g, plan) == 1000 * 1 + 40 * 2 + 8 * 4  # the norm's scale stays fp32


def test_peak_counts_live_values_casts_and_no_views() -> None:
    g = tied_lm()
    # fp32: the largest step is head (ln's output 400 and head's 1000 alive together); the view is free
    assert peak_activation_bytes(g, {}) == (400 + 1000) * 4
    # fc in bf16: gelu and the view follow in bf16; ln reads fp32 through a cast of the view's source
    # (400 bf16 + its 400-element fp32 copy alive at ln, then ln's output): at most 400*2 + 400*4 + 400*4
    plan = {"fc": P.BF16}
    assert peak_activation_bytes(g, plan) == max(400 * 2 + 400 * 4 + 400 * 4, (400 + 1000) * 4)


def test_narrowing_every_layer_never_costs_more_than_fp32() -> None:
    g = tied_lm()
    fp32 = deployed_memory(g, {})
    for fmt in (P.BF16, P.FP16, P.FP8_E4M3):
        plan = {n: fmt for n in g.layer_names()}
        assert deployed_memory(g, plan) <= fp32, fmt


def test_a_cast_in_front_of_softmax_frees_its_16_bit_source() -> None:
    """Attention's scores in bf16, the softmax in fp32, P V in bf16: the peak is the softmax's input
    copy and output, as in fp32; the bf16 scores are freed once their fp32 copy exists."""
    n = 1000
    nodes = [
        OpNode("x", "placeholder", "", Policy.NONE, act_out_elems=n),
        _layer("qk", 2 * n, n, kind="matmul"),
        OpNode("sm", "softmax", "sm", Policy.NEVER, act_in_elems=n, act_out_elems=n),
        _layer("av", 2 * n, n, kind="matmul"),
        OpNode("out", "output", "", Policy.NONE, act_in_elems=n),
    ]
    g = OpGraph(nodes, [("x", "qk"), ("qk", "sm"), ("sm", "av"), ("x", "av"), ("av", "out")], "attn")
    fp32 = peak_activation_bytes(g, {})
    assert fp32 == 3 * n * 4  # x, the scores and the softmax at once
    assert peak_activation_bytes(g, {"qk": P.BF16, "av": P.BF16}) <= fp32


def _logits_lm(out_elems: int) -> OpGraph:
    """x -> fc -> head -> output, the output node sized as capture sizes it (the logits it reads)."""
    nodes = [
        OpNode("x", "placeholder", "", Policy.NONE, act_out_elems=100),
        _layer("fc", 100, 100, w=10, weight="fc.w"),
        _layer("head", 100, 1000, w=10, weight="head.w"),
        OpNode("out", "output", "", Policy.NONE, act_in_elems=1000, act_out_elems=out_elems),
    ]
    return OpGraph(nodes, [("x", "fc"), ("fc", "head"), ("head", "out")], "lm")


def test_the_output_is_the_values_it_reads_not_another_tensor() -> None:
    # the logits are counted once, however the frontend sized the output node
    assert peak_activation_bytes(_logits_lm(1000), {}) == peak_activation_bytes(_logits_lm(0), {}) == (100 + 1000) * 4


def test_fp16_io_drops_the_fp32_copy_of_a_16_bit_output() -> None:
    g = _logits_lm(1000)
    half = {"fc": P.FP16, "head": P.FP16}
    fp32 = peak_activation_bytes(g, {})
    # fp32 outputs: the fp16 logits and their fp32 copy are alive together, above fp32's peak
    assert peak_activation_bytes(g, half) == 1000 * 2 + 1000 * 4 > fp32
    # fp16 outputs: the input arrives in fp16 and the fp16 logits are the output
    io16 = g.with_io(P.FP16)
    assert peak_activation_bytes(io16, half) == (100 + 1000) * 2
    for fmt in (P.BF16, P.FP16, P.FP8_E4M3):  # every narrowing plan within fp32's memory
        assert deployed_memory(io16, {n: fmt for n in g.layer_names()}) <= deployed_memory(g, {}), fmt
    # fp32 layers with fp16 I/O: the fp16 copy of the fp32 logits for the output sits beside them
    assert peak_activation_bytes(io16, {}) == 1000 * 4 + 1000 * 2


def test_the_io_format_is_part_of_the_graph() -> None:
    g = _logits_lm(1000).with_io(P.FP16)
    g.batch = 2
    assert g.io is P.FP16 and g.at_batch(8).io is P.FP16
    assert OpGraph.from_dict(g.to_dict()).io is P.FP16
    assert OpGraph.from_dict({k: v for k, v in g.to_dict().items() if k != "io"}).io is P.FP32  # older files
    assert g.with_io(P.FP16) is g and g.fingerprint() == _logits_lm(1000).fingerprint()
