"""A sequence tagger: token embedding, a bidirectional time-major nn.GRU and a per-token
linear head; seeded random weights. The GRU's products are linear layers of the plan
(autoprec.torch.recurrent): the two directions' input products read one tensor (tied:
one fused GEMM) and each direction's hidden products one stored weight (tied: one format). Small
(hidden 16, 8 steps) because every step's hidden product is a layer the profile measures."""

from __future__ import annotations

import torch
from _hf import seeded, token_batches
from torch import nn

VOCAB, T = 200, 8


class Tagger(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 32)
        self.gru = nn.GRU(32, 16, bidirectional=True)
        self.head = nn.Linear(32, 9)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h, _ = self.gru(self.embed(ids).transpose(0, 1))  # [T, B, 2H]: time first, as nn.GRU's default
        return self.head(h.transpose(0, 1))


def model() -> nn.Module:
    return seeded(Tagger)


def example_inputs() -> tuple[torch.Tensor, ...]:
    return (token_batches(VOCAB, 2, T, 1, seed=1)[0],)


def calibration_data() -> list[torch.Tensor]:
    return token_batches(VOCAB, 8, T, 3, seed=2)
