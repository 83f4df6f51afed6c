"""Models and helpers for the ONNX deployment tests (imported by name from the test modules).

``ExactNet``, ``ExactCNN`` and ``ExactEmbed`` are built so that every fp32 sum they compute is
exact: inputs are small integers, weights are integers in [-7, 7] with a +-7 in every output
channel (so the fp8 per-channel scale 7/448 is a power of two) and biases are integers (ExactCNN's
conv bias: multiples of 1/4). Such sums of products below 2^22 are exact in any order, so ONNX Runtime and torch compute the same
fp32 values, and any difference between the torch emulation and the ONNX emulation graph can only
come from where a rounding sits. The values are large enough (up to ~2000 before scaling by 0.375)
that rounding to bf16 and fp16 changes them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from autoprec.ort.runtime import open_session

ROOT = Path(__file__).resolve().parents[2]


def integer_weights(out_f: int, in_f: int, *rest: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randint(-7, 8, (out_f, in_f, *rest), generator=g).float()
    flat = w.view(out_f, -1)
    pos = torch.randint(0, flat.shape[1], (out_f,), generator=g)
    sign = torch.where(torch.rand(out_f, generator=g) < 0.5, -7.0, 7.0)
    flat[torch.arange(out_f), pos] = sign
    return w


def _int_linear(in_f: int, out_f: int, seed: int) -> nn.Linear:
    lin = nn.Linear(in_f, out_f)
    with torch.no_grad():
        lin.weight.copy_(integer_weights(out_f, in_f, seed=seed))
        lin.bias.copy_(torch.randint(-9, 10, (out_f,), generator=torch.Generator().manual_seed(seed + 100)).float())
    return lin


class ExactNet(nn.Module):
    """Linear layers, a buffer subtraction, ReLU and scaling, a residual add of two formats, a
    masked_fill, an activation x activation matmul, transpose/flatten and a concat of both paths."""

    def __init__(self) -> None:
        super().__init__()
        self.la = _int_linear(16, 8, 1)
        self.lb = _int_linear(16, 8, 2)
        self.head = _int_linear(8, 8, 3)
        self.register_buffer("shift", torch.randint(-3, 4, (16,), generator=torch.Generator().manual_seed(4)).float())
        self.register_buffer("mask", torch.triu(torch.ones(4, 4, dtype=torch.bool), diagonal=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x - self.shift
        a = self.la(x)
        b = self.lb(x)
        r = torch.relu(a) * 0.375
        y = r + b.masked_fill(b < -40, 0.0)
        s = torch.matmul(a, b.transpose(-2, -1)) * 0.125
        s = s.masked_fill(self.mask, 0.0)
        h = self.head(torch.relu(b))
        return torch.cat([y.flatten(1), s.flatten(1), h.flatten(1)], dim=1)


class ExactCNN(nn.Module):
    """Conv (with and without bias), ReLU, max-pool, a residual add, flatten and a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(2, 4, 3, padding=1)
        self.c2 = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.fc = nn.Linear(4 * 4 * 4, 6)
        with torch.no_grad():
            self.c1.weight.copy_(integer_weights(4, 2, 3, 3, seed=5))
            self.c1.bias.copy_(torch.tensor([96.75, -1.5, 0.25, -60.5]))  # quarters: where a rounding sits shows
            self.c2.weight.copy_(integer_weights(4, 4, 3, 3, seed=6))
            self.fc.weight.copy_(integer_weights(6, 64, seed=7))
            self.fc.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.c1(x))
        z = y + self.c2(y) * 0.375
        z = nn.functional.max_pool2d(z, 2)
        return self.fc(z.flatten(1))


class ExactEmbed(nn.Module):
    """Token and position embeddings (positions: a buffer narrowed to the input's length, as in
    models/char_transformer.py, a lookup the exporter's constant folding would turn into a
    constant), their sum, ReLU and a linear head. Table entries are integers plus multiples of
    2^-10 (16 significant bits): bf16 and fp16 round them, and every fp32 sum stays exact."""

    def __init__(self, vocab: int = 12, context: int = 6, d: int = 8) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(context, d)
        self.register_buffer("positions", torch.arange(context), persistent=False)
        self.head = _int_linear(d, 4, 8)
        g = torch.Generator().manual_seed(9)
        with torch.no_grad():
            for table in (self.tok.weight, self.pos.weight):
                table.copy_(torch.randint(-64, 65, table.shape, generator=g)
                            + torch.randint(0, 1024, table.shape, generator=g) / 1024)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.tok(idx) + self.pos(torch.narrow(self.positions, 0, 0, idx.size(1)))
        return self.head(torch.relu(x))


def integer_input(shape: tuple[int, ...], seed: int = 0, high: int = 15) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-high, high + 1, shape, generator=g).float()


def run_onnx(model, *inputs, providers="cpu") -> np.ndarray:
    """First output of ``model`` (ModelProto or bytes) on ``inputs`` through autoprec.ort.runtime."""
    data = model if isinstance(model, bytes) else model.SerializeToString()
    return open_session(data, providers)(*inputs)[0]


def rel_l2(a, b) -> float:
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))
