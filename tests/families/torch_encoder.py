"""torch.nn.TransformerEncoder (batch-first, pre-LN, GELU) over a token embedding, plus one extra
nn.MultiheadAttention pooling step with a learned query; seeded random weights."""

from __future__ import annotations

import torch
from _hf import seeded, token_batches
from torch import nn

VOCAB, T, D = 256, 24, 128


class Encoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, D)
        layer = nn.TransformerEncoderLayer(D, nhead=4, dim_feedforward=256, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        self.query = nn.Parameter(torch.randn(1, 1, D))
        self.pool = nn.MultiheadAttention(D, num_heads=4, batch_first=True)
        self.head = nn.Linear(D, 5)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.encoder(self.embed(ids))
        q = self.query.expand(ids.shape[0], -1, -1)
        pooled, _ = self.pool(q, h, h, need_weights=False)
        return self.head(pooled[:, 0])


def model() -> nn.Module:
    return seeded(Encoder)


def example_inputs() -> tuple[torch.Tensor, ...]:
    return (token_batches(VOCAB, 2, T, 1, seed=1)[0],)


def calibration_data() -> list[torch.Tensor]:
    return token_batches(VOCAB, 8, T, 3, seed=2)
