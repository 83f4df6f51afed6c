"""GPT-2 at its published size (124M parameters: 12 layers, d 768, 12 heads, 50,257-token vocabulary,
tied head) from transformers' config, seeded random weights; for benchmarks/gpt2_scale.py."""

from __future__ import annotations

import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel

VOCAB, T = 50257, 64


class Logits(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=ids, use_cache=False).logits


def model() -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return Logits(GPT2LMHeadModel(GPT2Config())).eval()


def _ids(batch: int, seed: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, T), generator=torch.Generator().manual_seed(seed))


def example_inputs() -> tuple[torch.Tensor, ...]:
    return (_ids(2, 1),)


def calibration_data() -> list[torch.Tensor]:
    return [_ids(2, 2), _ids(2, 3)]
