"""apply_plan end to end: oracles against the profiler, training, native mode, errors."""

from __future__ import annotations

import copy

import ml_dtypes
import numpy as np
import pytest
import torch
import torch.nn as nn

from autoprec.core.kinds import act_arg_positions
from autoprec.torch.capture import capture
from autoprec.core.errors import PlanError, UsageError
from autoprec.core.formats import Precision
from autoprec.core.lowering import lower, single_layer_roundings
from autoprec.torch.quantize import quantize
from autoprec.torch.semantics import LayerFormat, emulate_layer
from autoprec.torch.passes import apply_plan
from autoprec.torch.passes.insert_casts import is_cast, is_round

FP32, BF16, FP16, E4M3 = Precision.FP32, Precision.BF16, Precision.FP16, Precision.FP8_E4M3
E5M2 = Precision.FP8_E5M2
LOW = (BF16, FP16, E4M3)

# Layers whose low-precision output reaches fp32 consumers only through ops that keep values
# (view/transpose/reshape, ReLU, max-pool) or through FOLLOW ops that also read an fp32 value
# (residual adds, which therefore run in fp32): the plan and the profiler's trial must agree bit for bit.
# matmul is followed by "* 0.25" (head dim 16 ** -0.5): rounded too, but a power of two keeps values.
ATTN_AGREE = ["q", "k", "v", "matmul", "matmul_1", "o", "fc2", "head"]
CNN_AGREE = ["conv1", "conv2", "fc"]


def _roundings(c, layer: str, fmt: Precision) -> dict[str, Precision]:
    """The FOLLOW results the profiler's trial of (layer, fmt) rounds: those of the whole lowering."""
    got = single_layer_roundings(c.graph, [layer], [fmt])[(layer, fmt)]
    assert got == lower(c.graph, {layer: fmt}).rounded()
    return got


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.equal(torch.nan_to_num(a), torch.nan_to_num(b))


@pytest.mark.parametrize("fmt", LOW, ids=str)
def test_oracle_single_layer_equals_profiler_trial(attn_case, cnn_case, oracles, fmt) -> None:
    for (c, amax), layers, shape in ((attn_case, ATTN_AGREE, (4, 8, 32)), (cnn_case, CNN_AGREE, (4, 1, 8, 8))):
        x = oracles.randn(shape)
        for layer in layers:
            expected = {"mul": fmt.compute_output} if layer == "matmul" else {}
            assert _roundings(c, layer, fmt) == expected, layer
            gm = apply_plan(c, {layer: fmt}, amax)
            with torch.no_grad():
                got = gm(x)
            want = oracles.trial(c, layer, fmt, amax[layer], (x,))
            assert _same(got, want), f"{layer} in {fmt}"
            assert not _same(got, c.gm(x)), f"{layer} in {fmt} changed nothing"


@pytest.mark.parametrize("fmt", LOW, ids=str)
def test_oracle_where_follow_ops_compute(attn_case, split_case, oracles, fmt) -> None:
    """fc1 -> gelu, l1 -> chunk -> add: the plan runs these FOLLOW ops in the layer's output format
    and rounds their results; the profiler's trial rounds them too, so the two agree bit for bit."""
    for (c, amax), layer, op, shape in ((attn_case, "fc1", "gelu", (4, 8, 32)),
                                        (split_case, "l1", "add", (4, 16))):
        assert _roundings(c, layer, fmt) == {op: fmt.compute_output}
        x = oracles.randn(shape)
        with torch.no_grad():
            got = apply_plan(c, {layer: fmt}, amax)(x)
        assert _same(got, oracles.trial(c, layer, fmt, amax[layer], (x,))), (layer, fmt)


def test_mixed_plan_equals_reference_interpreter(attn_case, cnn_case, oracles) -> None:
    c, amax = attn_case
    plan = {"q": BF16, "k": BF16, "v": FP16, "matmul": E4M3, "matmul_1": FP16, "o": BF16, "fc1": E4M3,
            "fc2": FP16, "head": BF16}
    x = oracles.randn((3, 8, 32))
    with torch.no_grad():
        assert _same(apply_plan(c, plan, amax)(x), oracles.reference(c, plan, amax, (x,)))
    c, amax = cnn_case
    plan = {"conv1": FP16, "conv2": E4M3, "fc": BF16}
    x = oracles.randn((5, 1, 8, 8))
    with torch.no_grad():
        assert _same(apply_plan(c, plan, amax)(x), oracles.reference(c, plan, amax, (x,)))


def test_export_captured_model(oracles, encoder_layer) -> None:
    c = capture(encoder_layer, (torch.randn(2, 5, 16),))
    assert c.method == "export"
    layers = c.graph.layer_names()
    x = oracles.randn((3, 5, 16))
    # nn.MultiheadAttention's two products are layers too (autoprec.torch.attention): 2 amax each
    assert [c.graph[n].kind for n in layers].count("matmul") == 2
    amax = {n: (8.0,) * len(act_arg_positions(c.graph[n].kind)) for n in layers}
    # after each layer: views and selections (keep values), residual adds with an fp32 input (fp32),
    # and dropout with p=0 in eval mode, which the plan rounds but which keeps values too
    for layer in layers:
        with torch.no_grad():
            got = apply_plan(c, {layer: E4M3}, amax)(x)
        assert _same(got, oracles.trial(c, layer, E4M3, amax[layer], (x,))), layer
    plan = dict(zip(layers, (BF16, FP16, E4M3, BF16, FP16, E4M3, BF16)))
    gm = apply_plan(c, plan, amax)
    with torch.no_grad():
        assert _same(gm(x), oracles.reference(c, plan, amax, (x,)))


def test_all_fp32_is_bit_identical_and_adds_nothing(attn_case, cnn_case, oracles) -> None:
    for (c, _), shape in ((attn_case, (3, 8, 32)), (cnn_case, (3, 1, 8, 8))):
        for plan in ({}, {name: FP32 for name in c.graph.layer_names()}):
            gm = apply_plan(c, plan, None)
            assert [(n.op, n.target) for n in gm.graph.nodes] == [(n.op, n.target) for n in c.gm.graph.nodes]
            assert not any(is_cast(n) or is_round(n) for n in gm.graph.nodes)
            x = oracles.randn(shape)
            assert torch.equal(gm(x), c.gm(x))


def test_captured_module_is_not_mutated(attn_case, oracles) -> None:
    c, amax = attn_case
    code, nodes = c.gm.code, [(n.name, n.op, n.target, n.args) for n in c.gm.graph.nodes]
    x = oracles.randn((2, 8, 32))
    before = c.gm(x)
    apply_plan(c, {"q": BF16, "fc1": E4M3}, amax, mode="native")
    apply_plan(c, {"q": BF16, "fc1": E4M3}, amax)
    assert c.gm.code == code and [(n.name, n.op, n.target, n.args) for n in c.gm.graph.nodes] == nodes
    assert not any("autoprec_format" in n.meta for n in c.gm.graph.nodes)
    assert torch.equal(c.gm(x), before)


def test_module_contract_batch_lint_state_dict(attn_case, oracles) -> None:
    c, amax = attn_case
    gm = apply_plan(c, {"q": BF16, "k": BF16, "v": BF16, "o": FP16, "fc1": E4M3, "fc2": E4M3}, amax)
    gm.graph.lint()
    assert isinstance(gm, nn.Module)
    for batch in (1, 7):
        assert gm(oracles.randn((batch, 8, 32))).shape == (batch, 8, 20)
    sd = gm.state_dict()
    assert list(sd) == list(c.gm.state_dict())
    assert all(v.dtype == torch.float32 for v in sd.values())
    other = copy.deepcopy(c.gm)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(1.0)
    gm.load_state_dict(other.state_dict())  # same names: a checkpoint moves between the two
    assert torch.equal(gm.get_parameter("q.weight"), other.get_parameter("q.weight"))


@pytest.mark.parametrize("mode", ["emulate", "native"])
def test_training_updates_fp32_masters(attn_case, oracles, mode) -> None:
    c, amax = attn_case
    plan = {"q": BF16, "k": BF16, "v": FP16, "matmul": E4M3, "matmul_1": BF16, "o": FP16, "fc1": E4M3,
            "fc2": BF16, "head": E4M3}
    gm = apply_plan(c, plan, amax, mode=mode).train()
    x = oracles.randn((4, 8, 32))
    target = torch.randint(0, 20, (4, 8), generator=torch.Generator().manual_seed(0))
    before = {k: v.detach().clone() for k, v in gm.named_parameters()}
    opt = torch.optim.SGD(gm.parameters(), lr=0.1)
    loss = nn.functional.cross_entropy(gm(x).reshape(-1, 20), target.reshape(-1))
    loss.backward()
    for name, p in gm.named_parameters():
        assert p.grad is not None and p.grad.dtype == torch.float32, name
        assert torch.isfinite(p.grad).all(), name
    opt.step()
    for name, p in gm.named_parameters():
        assert p.dtype == torch.float32, name
        if name != "k.bias":  # softmax is invariant to k's bias: its gradient is rounding noise only
            assert p.grad.abs().max() > 1e-6 and not torch.equal(p.detach(), before[name]), name


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_native_mode_is_close_and_really_16_bit(attn_case, cnn_case, oracles) -> None:
    c, amax = attn_case
    x = oracles.randn((4, 8, 32))
    sixteen = {"q": BF16, "k": BF16, "v": BF16, "matmul": BF16, "matmul_1": FP16, "o": FP16, "fc1": BF16,
               "fc2": BF16, "head": FP16}
    with torch.no_grad():
        y_nat, y_emu = apply_plan(c, sixteen, amax, mode="native")(x), apply_plan(c, sixteen, amax)(x)
    assert y_nat.dtype == torch.float32
    assert _rel(y_nat, y_emu) < 1e-2  # 16-bit kernels: other summation order, bias in 16-bit

    plan = {**sixteen, "fc1": E4M3, "head": E4M3}
    native = apply_plan(c, plan, amax, mode="native")
    with torch.no_grad():
        y_nat, y_emu, y32 = native(x), apply_plan(c, plan, amax)(x), c.gm(x)
    # fp8: a last-bit difference upstream can move a value across an E4M3 rounding boundary, so
    # native and emulate differ by a fraction of the fp8 error itself
    assert _rel(y_nat, y_emu) < 0.5 * _rel(y_emu, y32)

    dtypes = _node_dtypes(native, x)
    for name in ("q", "view", "transpose", "matmul", "mul", "fc1", "gelu", "fc2", "head"):
        assert dtypes[name] == torch.bfloat16, name  # fp8 layers (fc1, head) write bf16
    for name in ("matmul_1", "transpose_4", "reshape", "o", "softmax_to_fp16"):
        assert dtypes[name] == torch.float16, name
    for name in ("x", "ln", "softmax", "add", "add_1", "output"):
        assert dtypes.get(name, torch.float32) == torch.float32, name

    c, amax = cnn_case
    plan = {"conv1": BF16, "conv2": FP16, "fc": E4M3}
    x = oracles.randn((4, 1, 8, 8))
    native = apply_plan(c, plan, amax, mode="native")
    with torch.no_grad():
        y_nat, y_emu, y32 = native(x), apply_plan(c, plan, amax)(x), c.gm(x)
    assert _rel(y_nat, y_emu) < 0.5 * _rel(y_emu, y32)
    dtypes = _node_dtypes(native, x)
    assert dtypes["conv1"] == dtypes["relu"] == torch.bfloat16  # its batch norm is folded into it
    assert dtypes["conv2"] == dtypes["relu_1"] == torch.float16
    assert dtypes["add"] == torch.bfloat16  # bf16 relu + fp16 relu_1: the wider of the two (formats.wider)


def _node_values(gm: torch.fx.GraphModule, *inputs: torch.Tensor) -> dict[str, torch.Tensor]:
    seen: dict[str, torch.Tensor] = {}

    class Rec(torch.fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if torch.is_tensor(out):
                seen[n.name] = out
            return out

    with torch.no_grad():
        Rec(gm).run(*inputs)
    return seen


def _node_dtypes(gm: torch.fx.GraphModule, *inputs: torch.Tensor) -> dict[str, torch.dtype]:
    return {name: v.dtype for name, v in _node_values(gm, *inputs).items()}


def test_embedding_plan_equals_its_semantics(tiny_lm, token_batches, oracles) -> None:
    """An embedding in a 16-bit P returns round_P(W)[idx], in fp8 round_bf16(W quantized with one
    scale per row)[idx]; a plan with embeddings computes what the reference interpreter
    (semantics.emulate_layer per layer) computes, bit for bit."""
    (x,) = token_batches[0]
    c = capture(tiny_lm, (x,))
    for plan in ({"tok": FP16}, {"pos": BF16}, {"tok": FP16, "pos": FP16, "fc": BF16, "head": FP16},
                 {"tok": E4M3}, {"tok": E4M3, "pos": E5M2, "fc": FP16}):
        with torch.no_grad():
            assert _same(apply_plan(c, plan)(x), oracles.reference(c, plan, {}, (x,))), plan
    table = c.gm.get_parameter("tok.weight")
    want = quantize(table, FP16)[x]
    assert not torch.equal(want, table[x])  # fp16 rounds this table
    assert torch.equal(_node_values(apply_plan(c, {"tok": FP16}), x)["tok"], want)
    assert torch.equal(emulate_layer("embedding", (x, table), {}, LayerFormat(FP16)), want)
    # fp8 from its definition, with ml_dtypes' roundings: scale = row amax / 448, E4M3 codes
    # (saturating), codes x scale in fp32, then bf16
    w = table.detach().numpy()
    scale = np.abs(w).max(axis=1, keepdims=True) / np.float32(E4M3.max)
    codes = np.clip(w / scale, -E4M3.max, E4M3.max).astype(ml_dtypes.float8_e4m3fn)
    rows = torch.from_numpy((codes.astype(np.float32) * scale).astype(ml_dtypes.bfloat16).astype(np.float32))
    want8 = rows[x]
    assert not torch.equal(want8, quantize(table, BF16)[x])  # fp8 rounds more than bf16 alone
    assert torch.equal(emulate_layer("embedding", (x, table), {}, LayerFormat(E4M3)), want8)
    for mode in ("emulate", "native"):
        gm = apply_plan(c, {"tok": E4M3}, mode=mode)  # an fp8 table reads no activation: no amax
        got = _node_values(gm, x)["tok"]
        assert got.dtype == (torch.bfloat16 if mode == "native" else torch.float32), mode
        assert torch.equal(got.float(), want8), mode
        # it trains: the gradient reaches the fp32 master table, in the rows the batch looked up
        gm(x).sum().backward()
        grad = gm.get_parameter("tok.weight").grad
        assert grad is not None and grad.dtype == torch.float32, mode
        assert set(grad.abs().sum(1).nonzero().flatten().tolist()) == set(x.flatten().tolist()), mode


def test_native_embedding_rounds_only_the_rows_it_looks_up(tiny_lm, token_batches, monkeypatch) -> None:
    """The lookup reads the fp32 master table (no 16-bit copy of the whole vocabulary per forward)
    and writes its rows as a real 16-bit tensor, equal to the emulation's."""
    (x,) = token_batches[0]
    c = capture(tiny_lm, (x,))
    plan = {"tok": FP16, "pos": BF16}
    native = apply_plan(c, plan, mode="native")
    tables = []
    lookup = nn.functional.embedding

    def spy(idx: torch.Tensor, weight: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        tables.append(weight.dtype)
        return lookup(idx, weight, *args, **kwargs)

    monkeypatch.setattr(nn.functional, "embedding", spy)
    got = _node_values(native, x)
    assert tables == [torch.float32, torch.float32]
    emulated = _node_values(apply_plan(c, plan), x)
    for name, dtype in (("tok", torch.float16), ("pos", torch.bfloat16)):
        # a lookup computes nothing: the 16-bit rows are the emulated values
        assert got[name].dtype == dtype and torch.equal(got[name].float(), emulated[name]), name
    # the masters stay fp32 and train through the 16-bit rows
    native(x).sum().backward()
    table = native.get_parameter("tok.weight")
    assert table.dtype == torch.float32 and table.grad is not None and table.grad.abs().sum() > 0


def test_plan_errors(attn_case, tiny_lm) -> None:
    c, amax = attn_case
    with pytest.raises(PlanError) as info:
        apply_plan(c, {"q": BF16, "nope": FP16, "softmax": BF16, "blocks_0_q": E4M3}, amax)
    msg = str(info.value)
    assert "nope" in msg and "softmax" in msg and "blocks_0_q" in msg and "\n" not in msg
    with pytest.raises(PlanError, match="fc1"):
        apply_plan(c, {"fc1": E4M3}, {})
    with pytest.raises(PlanError, match="matmul"):
        apply_plan(c, {"matmul": E4M3}, {"matmul": (1.0,)})  # two activation inputs, one amax
    with pytest.raises(UsageError):
        apply_plan(c, {"q": BF16}, amax, mode="fast")
    lm = capture(tiny_lm, (torch.zeros(2, 3, dtype=torch.long),))
    with pytest.raises(PlanError, match="fp8 layer.s. fc have no calibrated activation amax"):
        apply_plan(lm, {"tok": E4M3, "fc": E4M3}, {})  # the fp8 table needs none
    gm = apply_plan(c, {"q": "bf16", "fc1": "fp8"}, amax)  # strings are parsed at this edge
    fmts = {n.name: n.kwargs.get("fmt") for n in gm.graph.nodes}
    assert fmts["q"] is BF16 and fmts["fc1"] is E4M3
