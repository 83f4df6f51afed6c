"""The runtime functions of rewritten graphs: idempotent casts, native fp8 GEMM vs emulation, and
how a layer's bias meets its product in each format."""

from __future__ import annotations

import pytest
import torch

from autoprec.core.formats import Precision
from autoprec.torch.quantize import quantize
from autoprec.torch.semantics import LayerFormat, emulate_layer, quantize_activation, quantize_weight
from autoprec.torch.passes import ops as fx_ops

FP32, BF16, FP16, E4M3, E5M2 = (Precision.FP32, Precision.BF16, Precision.FP16, Precision.FP8_E4M3,
                                Precision.FP8_E5M2)


def _wide_tensor(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mag = torch.exp2(torch.randint(-30, 30, (4096,), generator=g).float())
    x = torch.randn(4096, generator=g) * mag
    x[:8] = torch.tensor([0.0, -0.0, 1e30, -1e30, float("inf"), float("-inf"), 1e-40, -3e-39])
    return x


@pytest.mark.parametrize("fmt", [E4M3, E5M2], ids=str)
def test_static_fp8_quantize_is_idempotent(fmt) -> None:
    """A layer need not re-round an input its cast already rounded: q(q(x)) must equal q(x) exactly."""
    for seed in range(4):
        x = _wide_tensor(seed)
        for amax in (1e-6, 3.7e-3, 0.9, 1.0, 7.31, 448.0, 6.1e4, 2.5e7):
            once = quantize_activation(x, fmt, amax)
            twice = quantize_activation(once, fmt, amax)
            assert torch.equal(torch.nan_to_num(once), torch.nan_to_num(twice)), (seed, amax)


def test_16_bit_casts_and_rounding(oracles) -> None:
    x = _wide_tensor(5)
    for fmt in (BF16, FP16):
        q = fx_ops.cast(x, fmt=fmt)
        assert torch.equal(q, quantize(x, fmt)) and torch.equal(fx_ops.cast(q, fmt=fmt), q)
        assert fx_ops.cast(x, fmt=fmt, native=True).dtype == fmt.torch_dtype
        assert torch.equal(fx_ops.round_output(x, fmt=fmt), q)
    assert fx_ops.cast(x, fmt=FP32) is x  # widening is the identity in emulate mode
    assert fx_ops.cast(x.bfloat16(), fmt=FP32, native=True).dtype == torch.float32
    pair = fx_ops.cast((x, torch.arange(3)), fmt=BF16, native=True)  # tuples: floats cast, ints kept
    assert pair[0].dtype == torch.bfloat16 and pair[1].dtype == torch.int64
    with pytest.raises(ValueError, match="never a storage format"):
        fx_ops.round_output(x, fmt=E4M3)


def test_native_fp8_linear_matches_emulation(oracles) -> None:
    x = oracles.randn((3, 5, 48)).requires_grad_(True)
    w = (oracles.randn((40, 48), seed=7) * 0.2).requires_grad_(True)
    b = oracles.randn((40,), seed=8).requires_grad_(True)
    amax = 3.0
    xq = fx_ops.cast(x, fmt=E4M3, amax=amax)  # the cast node before the layer
    y_nat = fx_ops.lowp_linear(xq, w, b, fmt=E4M3, amax=(amax,), native=True)
    assert y_nat.dtype == torch.bfloat16 and y_nat.shape == (3, 5, 40)
    y_emu = emulate_layer("linear", (x, w, b), {}, LayerFormat(E4M3, (amax,)))
    # the same products summed in another order, then one bf16 rounding
    assert ((y_nat.float() - y_emu).abs() <= 2 ** -7 * y_emu.abs() + 1e-6).all()
    assert (y_nat.float() == y_emu).float().mean() > 0.95

    g = quantize(oracles.randn((3, 5, 40), seed=9), BF16)  # the gradient of a bf16 tensor is bf16
    grads_nat = torch.autograd.grad((y_nat.float() * g).sum(), (x, w, b))
    grads_emu = torch.autograd.grad((y_emu * g).sum(), (x, w, b))
    for a, e in zip(grads_nat, grads_emu):  # straight-through: the emulated layer's gradients
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)


def test_native_fp8_without_a_kernel_is_emulated_in_bf16(oracles) -> None:
    a, b = oracles.randn((2, 4, 8)), oracles.randn((2, 8, 3), seed=3)
    y = fx_ops.lowp_bmm(fx_ops.cast(a, fmt=E4M3, amax=3.0), fx_ops.cast(b, fmt=E4M3, amax=2.0),
                        fmt=E4M3, amax=(3.0, 2.0), native=True)
    want = emulate_layer("bmm", (a, b), {}, LayerFormat(E4M3, (3.0, 2.0)))
    assert y.dtype == torch.bfloat16 and torch.equal(y.float(), want)


def _bias_case(kind: str, oracles) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    if kind == "linear":
        return (oracles.randn((4, 7, 48)), oracles.randn((40, 48), seed=3) * 0.2), oracles.randn((40,), seed=4)
    return (oracles.randn((2, 3, 9, 9)), oracles.randn((5, 3, 3, 3), seed=3) * 0.3), oracles.randn((5,), seed=4) * 3


@pytest.mark.parametrize("kind", ["linear", "conv2d"])
@pytest.mark.parametrize("fmt", [BF16, FP16], ids=str)
def test_a_16_bit_layer_rounds_its_product_then_adds_its_rounded_bias(oracles, kind, fmt) -> None:
    """round_P(round_P(x @ W) + round_P(b)): what a 16-bit MatMul/Conv followed by a 16-bit Add
    computes on every ONNX Runtime provider; a fused bias rounded once would not be that."""
    (x, w), b = _bias_case(kind, oracles)
    f = torch.nn.functional.linear if kind == "linear" else torch.nn.functional.conv2d
    xq, wq = quantize(x, fmt), quantize(w, fmt)
    view = b if kind == "linear" else b.reshape(-1, 1, 1)
    want = quantize(quantize(f(xq, wq), fmt) + quantize(view, fmt), fmt)
    got = emulate_layer(kind, (x, w, b), {}, LayerFormat(fmt))
    assert torch.equal(got, want)
    assert not torch.equal(got, quantize(f(xq, wq, b), fmt))  # one rounding differs somewhere
    assert torch.equal(emulate_layer(kind, (x, w), {"bias": b}, LayerFormat(fmt)), want)  # bias as a keyword
    # native mode: the product on 16-bit operands, then a 16-bit add (not the GEMM's fused bias)
    lowp = fx_ops.LAYER_OPS[kind]
    nat = lowp(x, w, b, fmt=fmt, native=True)
    assert nat.dtype == fmt.torch_dtype
    product = lowp(x, w, None, fmt=fmt, native=True)
    assert torch.equal(nat, product + view.to(fmt.torch_dtype))


def test_an_fp8_layer_adds_its_bias_in_fp32_and_rounds_once(oracles) -> None:
    (x, w), b = _bias_case("linear", oracles)
    lf = LayerFormat(E4M3, (3.0,))
    xq = quantize_activation(x, E4M3, 3.0)
    want = quantize(torch.nn.functional.linear(xq, quantize_weight(w, E4M3), b), BF16)
    assert torch.equal(emulate_layer("linear", (x, w, b), {}, lf), want)


def test_fp8_weights_are_rounded_once_inside_reuse_weight_rounding(attn_case, monkeypatch) -> None:
    """Inside reuse_weight_rounding an fp8 layer's weight is rounded on its first call only and the
    result is the same bits; an in-place update of the weight is seen, and a weight that records
    gradients is rounded at every call, as outside the context."""
    import autoprec.torch.semantics as sem
    from autoprec.torch.passes import apply_plan

    c, amax = attn_case
    plan = {name: E4M3 for name in c.graph.layer_names()}
    gm = apply_plan(c, plan, amax)
    calls: list[int] = []
    real = sem.quantize_weight
    monkeypatch.setattr(sem, "quantize_weight", lambda w, f, ch=sem.ROWS: calls.append(1) or real(w, f, ch))
    x = torch.randn(3, 8, 32)
    with torch.no_grad():
        plain = gm(x)
        per_call = len(calls)
        assert per_call > 0
        with sem.reuse_weight_rounding():
            calls.clear()
            first, again = gm(x), gm(x)
            assert len(calls) == per_call and torch.equal(first, plain) and torch.equal(again, plain)
            gm.get_parameter(c.node("q").args[1].target).mul_(0.5)
            changed = gm(x)
            assert len(calls) == per_call + 1 and not torch.equal(changed, plain)
        calls.clear()
        assert torch.equal(gm(x), changed) and len(calls) == per_call
    with sem.reuse_weight_rounding():
        calls.clear()
        gm(x), gm(x)
        assert len(calls) == 2 * per_call  # gradients recorded: nothing kept
