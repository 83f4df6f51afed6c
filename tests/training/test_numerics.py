"""The numerics of a training step: 16-bit gradients, the fp8 HYBRID recipe with delayed scaling
against a plain reference written here, and the monitor's counts.

Reference values round with ml_dtypes (independent of torch's conversions) and use torch only for
the products, so they share the emulation's summation order and must agree bit for bit.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
import torch

from autoprec.core.errors import UsageError
from autoprec.core.formats import Precision
from autoprec.torch.numerics import Numerics, Recipe
from autoprec.torch.quantize import quantize, rounding_gradients
from autoprec.torch.semantics import LayerFormat, emulate_layer

BF16, FP16, E4M3, E5M2 = Precision.BF16, Precision.FP16, Precision.FP8_E4M3, Precision.FP8_E5M2
_ML = {BF16: ml_dtypes.bfloat16, FP16: np.float16, E4M3: ml_dtypes.float8_e4m3fn, E5M2: ml_dtypes.float8_e5m2}


def r(t: torch.Tensor, p: Precision, clip: bool = False) -> torch.Tensor:
    """``t`` rounded to ``p`` by ml_dtypes (clamped to the max first when ``clip``)."""
    a = t.detach().numpy().astype(np.float32)
    if clip:
        a = np.clip(a, -p.max, p.max)
    return torch.from_numpy(a.astype(_ML[p]).astype(np.float32))


def _leaf(t: torch.Tensor) -> torch.Tensor:
    return t.clone().requires_grad_(True)


@pytest.mark.parametrize("p", [BF16, FP16])
def test_linear_backward_rounds_each_gradient_product(p: Precision) -> None:
    gen = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(5, 8, generator=gen), torch.randn(6, 8, generator=gen) * 0.3, torch.randn(6, generator=gen)
    g = torch.randn(5, 6, generator=gen) * 1e-3
    xl, wl, bl = _leaf(x), _leaf(w), _leaf(b)
    with rounding_gradients(Numerics()):
        y = emulate_layer("linear", (xl, wl, bl), {}, LayerFormat(p))
    y.backward(g)
    gp = r(g, p)  # the gradient of a 16-bit output is 16-bit
    assert torch.equal(xl.grad, r(gp @ r(w, p), p))  # dgrad GEMM: P operands, fp32 accumulation, P result
    assert torch.equal(wl.grad, r(gp.t() @ r(x, p), p))  # wgrad GEMM, reaching the fp32 master exactly
    assert torch.equal(bl.grad, r(gp.sum(0), p))
    # outside training the same layer passes its gradient straight through
    xs = _leaf(x)
    emulate_layer("linear", (xs, w, b), {}, LayerFormat(p)).backward(g)
    assert torch.equal(xs.grad, g @ r(w, p))


def test_conv_backward_rounds_like_a_16bit_gpu_kernel() -> None:
    gen = torch.Generator().manual_seed(1)
    x, w = torch.randn(2, 3, 6, 6, generator=gen), torch.randn(4, 3, 3, 3, generator=gen) * 0.2
    g = torch.randn(2, 4, 6, 6, generator=gen)
    xl, wl = _leaf(x), _leaf(w)
    with rounding_gradients(Numerics()):
        y = emulate_layer("conv2d", (xl, wl, None, 1, 1), {}, LayerFormat(BF16))
    y.backward(g)
    gp, xp, wp = r(g, BF16), r(x, BF16), r(w, BF16)
    assert torch.equal(xl.grad, r(torch.nn.grad.conv2d_input(x.shape, wp, gp, padding=1), BF16))
    assert torch.equal(wl.grad, r(torch.nn.grad.conv2d_weight(xp, w.shape, gp, padding=1), BF16))


def test_monitor_counts_overflow_and_underflow_forward_and_backward() -> None:
    num = Numerics()
    x = torch.tensor([1.0, 7e4, -1e5, 1e-9, 0.0, 2e-8, 65519.0], requires_grad=True)
    with rounding_gradients(num, "site"):
        y = quantize(x, FP16)
    y.backward(torch.tensor([1e-9, 1.0, 1.0, 1e5, 0.0, 2.0, 1.0]))
    step = num.end_step()["site"]
    # forward: 7e4 and -1e5 become inf (65519 rounds to 65504); 1e-9 and 2e-8 flush to zero (below half the least subnormal)
    assert (step.fwd_overflow, step.fwd_underflow, step.fwd_nonzero) == (2, 2, 6)
    assert (step.bwd_overflow, step.bwd_underflow, step.bwd_nonzero) == (1, 1, 6)
    assert step.fwd_amax == pytest.approx(1e5) and step.bwd_amax == pytest.approx(1e5)
    assert num.end_step() == {}  # counts are per step
    # evaluation (recording off) neither counts nor records
    num.recording = False
    with rounding_gradients(num, "site"):
        quantize(x, FP16)
    assert num.end_step() == {}


class _ReferenceDelayed:
    """Delayed scaling as the recipe defines it, written out plainly: the scale used in a step comes
    from the history of earlier steps' amax (max over the window), 1 until an amax was seen."""

    def __init__(self, length: int, fmax: float, margin: int = 0) -> None:
        self.hist = np.zeros(length, dtype=np.float32)
        self.scale = np.float32(1.0)
        self.fmax, self.margin = np.float32(fmax), margin
        self.amax = np.float32(0.0)

    def use(self, t: torch.Tensor) -> float:
        self.amax = max(self.amax, np.float32(t.abs().max().item()))
        return float(self.scale)

    def end_step(self) -> None:
        self.hist = np.concatenate([[self.amax], self.hist[:-1]]).astype(np.float32)
        a = self.hist.max()
        if np.isfinite(a) and a > 0:
            self.scale = np.float32(a * np.float32(2.0 ** self.margin)) / self.fmax
        self.amax = np.float32(0.0)


@pytest.mark.parametrize("margin", [0, 1])
def test_fp8_delayed_scaling_matches_a_plain_reference_step_by_step(margin: int) -> None:
    gen = torch.Generator().manual_seed(2)
    w, b = torch.randn(4, 8, generator=gen) * 0.5, torch.randn(4, generator=gen) * 0.1
    num = Numerics(Recipe(fp8_scaling="delayed", amax_history=3, margin=margin))
    ref_x, ref_g = _ReferenceDelayed(3, E4M3.max, margin), _ReferenceDelayed(3, E5M2.max, margin)
    for step, mag in enumerate([1.0, 30.0, 0.5, 0.2, 4.0, 0.01]):
        x = torch.randn(6, 8, generator=gen) * mag
        g = torch.randn(6, 4, generator=gen) * mag * 1e-3
        xl, wl, bl = _leaf(x), _leaf(w), _leaf(b)
        with rounding_gradients(num):
            y = emulate_layer("linear", (xl, wl, bl), {}, LayerFormat(E4M3), recipe=num.fp8_recipe("lin", E4M3))
        y.backward(g)
        # the reference: E4M3 operands (weight: current per-tensor scale), fp32 product, bf16 output;
        # the bf16 output gradient quantized to E5M2 (saturating), bf16 results of both backward GEMMs
        sx = np.float32(ref_x.use(x))
        xq = r(x / sx, E4M3, clip=True) * sx
        sw = np.float32(w.abs().max().item() * 2.0 ** margin) / np.float32(E4M3.max)
        wq = r(w / sw, E4M3, clip=True) * sw
        assert torch.equal(y.detach(), r(xq @ wq.t() + b, BF16)), f"output differs at step {step}"
        gb = r(g, BF16)
        sg = np.float32(ref_g.use(gb))
        gq = r(gb / sg, E5M2, clip=True) * sg
        assert torch.equal(xl.grad, r(gq @ wq, BF16)), f"input gradient differs at step {step}"
        assert torch.equal(wl.grad, r(gq.t() @ xq, BF16)), f"weight gradient differs at step {step}"
        assert torch.equal(bl.grad, gb.sum(0))
        num.end_step()
        ref_x.end_step()
        ref_g.end_step()
        states = num.layers["lin"].states()
        assert np.array_equal(states["input0"].history.numpy(), ref_x.hist)
        assert np.array_equal(states["grad"].history.numpy(), ref_g.hist)
        assert states["input0"].scale.item() == float(ref_x.scale)
        assert states["grad"].scale.item() == float(ref_g.scale)


def test_fp8_current_scaling_and_rowwise_weights() -> None:
    gen = torch.Generator().manual_seed(3)
    x, w = torch.randn(5, 8, generator=gen) * 40, torch.randn(3, 8, generator=gen) * torch.tensor([[1.0], [1e-3], [5.0]])
    num = Numerics(Recipe(fp8_scaling="current", weight_scaling="rowwise"))
    with rounding_gradients(num):
        y = emulate_layer("linear", (x, w, None), {}, LayerFormat(E4M3), recipe=num.fp8_recipe("lin", E4M3))
    sx = np.float32(x.abs().max().item()) / np.float32(448)
    sw = (w.abs().amax(1, keepdim=True) / 448)
    expected = r(r(x / sx, E4M3, clip=True) * sx @ (r(w / sw, E4M3, clip=True) * sw).t(), BF16)
    assert torch.equal(y, expected)


def test_state_dict_round_trip_and_recipe_errors() -> None:
    num = Numerics(Recipe(amax_history=4))
    layer = num.fp8_recipe("a", E4M3)
    layer.activation(0, torch.ones(3) * 7)
    num.end_step()
    again = Numerics()
    again.load_state_dict(num.state_dict())
    assert again.recipe == num.recipe
    assert torch.equal(again.layers["a"].inputs[0].history, layer.inputs[0].history)
    assert again.layers["a"].inputs[0].scale.item() == pytest.approx(7 / 448)
    for bad in (dict(fp8_scaling="dynamic"), dict(amax_history=0), dict(margin=-1), dict(weight_scaling="col")):
        with pytest.raises(UsageError):
            Recipe(**bad)


def test_training_numerics_do_not_change_the_forward() -> None:
    gen = torch.Generator().manual_seed(4)
    x, w, b = torch.randn(4, 8, generator=gen), torch.randn(5, 8, generator=gen), torch.randn(5, generator=gen)
    for p in (BF16, FP16):
        plain = emulate_layer("linear", (x, w, b), {}, LayerFormat(p))
        with rounding_gradients(Numerics()):
            trained = emulate_layer("linear", (x, w, b), {}, LayerFormat(p))
        assert torch.equal(plain, trained)
        assert torch.equal(plain, r(r(r(x, p) @ r(w, p).t(), p) + r(b, p), p))


@pytest.mark.parametrize("scaling", ["current", "delayed"])
def test_native_fp8_linear_training_on_scaled_mm_matches_the_emulated_recipe(scaling: str) -> None:
    """Native training runs an fp8 linear layer on torch._scaled_mm (E4M3 forward, E5M2 x E4M3
    backward GEMMs); the emulated recipe computes the same values (here, on the CPU's kernels, bit
    for bit; a GPU's may scale after accumulating: tests/gpu)."""
    from autoprec.torch.passes import ops

    calls = []
    forward = ops._Fp8LinearTraining.forward

    def counted(ctx, *args):
        calls.append(1)
        return forward(ctx, *args)

    gen = torch.Generator().manual_seed(5)
    w, b = torch.randn(32, 64, generator=gen) * 0.2, torch.randn(32, generator=gen)
    runs = {False: Numerics(Recipe(fp8_scaling=scaling)), True: Numerics(Recipe(fp8_scaling=scaling))}
    dtypes: dict[bool, torch.dtype] = {}
    ops._Fp8LinearTraining.forward = staticmethod(counted)
    try:
        for step in range(4):
            x, g = torch.randn(16, 64, generator=gen) * (1 + step), torch.randn(16, 32, generator=gen) * 1e-2
            got = {}
            for native, num in runs.items():
                xl, wl, bl = _leaf(x), _leaf(w), _leaf(b)
                with rounding_gradients(num):
                    y = ops.lowp_linear(xl, wl, bl, fmt=E4M3, amax=None, native=native, site="lin")
                y.float().backward(g.to(y.dtype))
                got[native] = (y.float().detach(), xl.grad, wl.grad, bl.grad)
                dtypes[native] = y.dtype
                num.end_step()
            for emulated, native_value in zip(got[False], got[True]):
                assert torch.allclose(native_value, emulated, rtol=2 ** -8, atol=0), step
            assert torch.equal(runs[False].layers["lin"].grad.scale, runs[True].layers["lin"].grad.scale)
    finally:
        ops._Fp8LinearTraining.forward = forward
    assert len(calls) == 4  # the native run took the fp8 kernel path every step
    assert dtypes == {False: torch.float32, True: torch.bfloat16}  # an fp8 layer writes a real bf16 tensor
