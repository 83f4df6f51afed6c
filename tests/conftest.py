"""Shared fixtures: small hand-written models that exercise capture and profiling quickly."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn as nn


def pytest_configure(config: pytest.Config) -> None:
    """One intra-op thread per test process: the test models are tiny, and with pytest-xdist's two
    workers on two cores, extra threads only add synchronisation. The profiling cache is off (each
    test computes what it checks; tests/e2e/test_cache.py turns it on in a folder of its own), and
    subprocesses inherit that."""
    torch.set_num_threads(1)
    os.environ["AUTOPREC_CACHE"] = "off"


class TinyAttention(nn.Module):
    """A pre-LN attention block with separate q/k/v projections and an MLP, then a vocab head."""

    def __init__(self, d: int = 32, heads: int = 2, vocab: int = 20) -> None:
        super().__init__()
        self.heads = heads
        self.ln = nn.LayerNorm(d)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)
        self.head = nn.Linear(d, vocab)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        y = self.ln(x)
        q = self.q(y).view(b, t, self.heads, c // self.heads).transpose(1, 2)
        k = self.k(y).view(b, t, self.heads, c // self.heads).transpose(1, 2)
        v = self.v(y).view(b, t, self.heads, c // self.heads).transpose(1, 2)
        att = ((q @ k.transpose(-2, -1)) * (c // self.heads) ** -0.5).softmax(dim=-1)
        x = x + self.o((att @ v).transpose(1, 2).reshape(b, t, c))
        x = x + self.fc2(torch.nn.functional.gelu(self.fc1(x)))
        return self.head(x)


class TinyCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn(self.conv1(x)))
        y = y + torch.relu(self.conv2(y))  # residual add
        y = nn.functional.max_pool2d(y, 2)
        return self.fc(y.flatten(1))


class TinyLM(nn.Module):
    """Token and learned position embeddings (positions: a buffer narrowed to the input's length, as
    models/char_transformer.py does), their sum, a LayerNorm, a linear with a residual, a vocab head."""

    def __init__(self, vocab: int = 20, context: int = 8, d: int = 16) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(context, d)
        self.register_buffer("positions", torch.arange(context), persistent=False)
        self.ln = nn.LayerNorm(d)
        self.fc = nn.Linear(d, d)
        self.head = nn.Linear(d, vocab)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.tok(idx) + self.pos(torch.narrow(self.positions, 0, 0, idx.size(1)))
        return self.head(torch.relu(self.fc(self.ln(x))) + x)


class EncoderLayerModel(nn.Module):
    """nn.TransformerEncoderLayer hides its linears from fx: capture must fall back to torch.export."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.enc(x))


@pytest.fixture
def encoder_layer() -> EncoderLayerModel:
    torch.manual_seed(0)
    return EncoderLayerModel().eval()


@pytest.fixture
def tiny_attention() -> TinyAttention:
    torch.manual_seed(0)
    return TinyAttention().eval()


@pytest.fixture
def tiny_lm() -> TinyLM:
    torch.manual_seed(0)
    return TinyLM().eval()


@pytest.fixture
def token_batches() -> list[tuple[torch.Tensor]]:
    """Three seeded batches of 4 sequences of 6 token ids for TinyLM (context 8: the position
    lookup reads a slice of its buffer)."""
    g = torch.Generator().manual_seed(0)
    return [(torch.randint(0, 20, (4, 6), generator=g),) for _ in range(3)]


@pytest.fixture
def tiny_cnn() -> TinyCNN:
    torch.manual_seed(0)
    return TinyCNN().eval()
