"""A sequence tagger: token embedding, a 2-layer batch-first nn.LSTM and a per-token linear head;
seeded random weights. The LSTM holds most of the weights and FLOPs: the plan offers its products as
linear layers (autoprec.torch.recurrent), one input product per layer and one hidden product per
layer and step, the steps of a layer tied to one format. Small (hidden 32, 8 steps) because every
step's hidden product is a layer the profile measures."""

from __future__ import annotations

import torch
from _hf import seeded, token_batches
from torch import nn

VOCAB, T = 200, 8


class Tagger(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 32)
        self.lstm = nn.LSTM(32, 32, num_layers=2, batch_first=True)
        self.head = nn.Linear(32, 9)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h, _ = self.lstm(self.embed(ids))
        return self.head(h)


def model() -> nn.Module:
    return seeded(Tagger)


def example_inputs() -> tuple[torch.Tensor, ...]:
    return (token_batches(VOCAB, 2, T, 1, seed=1)[0],)


def calibration_data() -> list[torch.Tensor]:
    return token_batches(VOCAB, 8, T, 3, seed=2)
