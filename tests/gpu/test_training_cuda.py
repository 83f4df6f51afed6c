"""GPU checks of the training numerics, skipped where there is no GPU: a 16-bit layer's backward on
real bf16/fp16 CUDA tensors (cuBLAS GEMMs, fp32 accumulation, 16-bit results) against the emulated
training step on the CPU (:mod:`autoprec.torch.numerics`).

On a machine with a GPU: ``.venv/bin/python -m pytest -q tests/gpu``. cuBLAS may sum in another
order than the CPU, so the two agree within one unit in the last place of the format, not bit for bit.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from autoprec.core.formats import Precision
from autoprec.torch.numerics import Numerics
from autoprec.torch.quantize import quantize, rounding_gradients
from autoprec.torch.semantics import LayerFormat, emulate_layer


@pytest.fixture(scope="module")
def torch_cuda() -> None:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device for torch")


def _ulps(a: torch.Tensor, b: torch.Tensor, p: Precision) -> float:
    """The largest difference of ``a`` and ``b`` in units of ``p``'s spacing at their magnitude."""
    scale = torch.maximum(a.abs(), b.abs()).clamp_min(p.min_normal)
    return float(((a - b).abs() / (scale * p.eps)).max())


@pytest.mark.parametrize("p", [Precision.BF16, Precision.FP16], ids=str)
def test_native_16bit_linear_backward_matches_the_emulated_training_step(torch_cuda, p: Precision) -> None:
    gen = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(64, 128, generator=gen), torch.randn(96, 128, generator=gen) * 0.1, torch.randn(96, generator=gen)
    g = torch.randn(64, 96, generator=gen) * 1e-2
    # native: 16-bit tensors on the GPU, gradients in the tensors' own format
    xn, wn, bn = (t.to("cuda", p.torch_dtype).requires_grad_(True) for t in (x, w, b))
    F.linear(xn, wn, bn).backward(g.to("cuda", p.torch_dtype))
    # emulated: fp32 tensors holding the same values, the training numerics on
    xe, we, be = (quantize(t, p).detach().requires_grad_(True) for t in (x, w, b))
    with rounding_gradients(Numerics()):
        y = emulate_layer("linear", (xe, we, be), {}, LayerFormat(p))
    y.backward(g)
    for native, emulated in ((xn.grad, xe.grad), (wn.grad, we.grad), (bn.grad, be.grad)):
        assert native.dtype == p.torch_dtype
        assert _ulps(native.float().cpu(), emulated, p) <= 1.0


def test_native_training_on_cuda_follows_the_emulated_run(torch_cuda) -> None:
    """`autoprec train --native --device cuda` against the emulated run on the CPU: the same plan,
    seeds and steps give loss curves within 1% (cuBLAS sums in its own order, and a flipped 16-bit
    rounding drifts slowly), and the same number of skipped steps."""
    from torch import nn

    from autoprec.training import train

    gen = torch.Generator().manual_seed(0)
    w = torch.randn(16, 1, generator=gen)
    data = [(x, x @ w) for x in (torch.randn(64, 16, generator=gen) for _ in range(8))]

    def mse(model: nn.Module, batch) -> torch.Tensor:
        x, y = batch
        return torch.mean((model(x).float() - y) ** 2)

    runs = {}
    for mode, device in (("emulate", "cpu"), ("native", "cuda")):
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 1))
        runs[mode] = train(net, {"_0": "bf16", "_2": "fp16"}, data=data, loss=mse, example_inputs=data[0][0],
                           epochs=3, lr=0.01, mode=mode, device=device)
    a, b = ([r["loss"] for r in runs[m].rows] for m in runs)
    assert all(abs(x - y) <= 0.01 * abs(x) for x, y in zip(a, b))
    assert runs["emulate"].skipped_steps == runs["native"].skipped_steps


def test_native_fp8_linear_training_on_cuda_matches_the_emulated_recipe(torch_cuda) -> None:
    """The HYBRID recipe's linear layer on the GPU's fp8 GEMMs (torch._scaled_mm: E4M3 forward, E5M2
    x E4M3 backward) against the emulated recipe on the CPU: within one bf16 rounding."""
    from autoprec.torch.numerics import Recipe
    from autoprec.torch.passes.ops import lowp_linear

    e4m3 = Precision.FP8_E4M3
    gen = torch.Generator().manual_seed(0)
    w, b = torch.randn(64, 128, generator=gen) * 0.2, torch.randn(64, generator=gen)
    cpu, gpu = Numerics(Recipe()), Numerics(Recipe())
    for step in range(4):
        x, g = torch.randn(32, 128, generator=gen) * (1 + step), torch.randn(32, 64, generator=gen) * 1e-2
        got = []
        for num, device, native in ((cpu, "cpu", False), (gpu, "cuda", True)):
            xl, wl, bl = (t.to(device).requires_grad_(True) for t in (x, w, b))
            with rounding_gradients(num):
                y = lowp_linear(xl, wl, bl, fmt=e4m3, amax=None, native=native, site="lin")
            y.float().backward(g.to(device, y.dtype))
            got.append([t.float().cpu() for t in (y.detach(), xl.grad, wl.grad, bl.grad)])
            num.end_step()
        for emulated, native_value in zip(*got):
            assert _ulps(native_value, emulated, Precision.BF16) <= 1.0, step
