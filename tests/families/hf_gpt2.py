"""GPT-2-style decoder from transformers (Conv1D layers with [in, out] weights, tied embedding and
head, causal SDPA), built from a config with seeded random weights; tuned on fidelity."""

from __future__ import annotations

import torch
from _hf import Logits, seeded, token_batches
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel

VOCAB, T = 512, 32
CONFIG = dict(vocab_size=VOCAB, n_positions=64, n_embd=128, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0)


def model() -> nn.Module:
    return seeded(lambda: Logits(GPT2LMHeadModel(GPT2Config(**CONFIG)), "input_ids"))


def example_inputs() -> tuple[torch.Tensor, ...]:
    return (token_batches(VOCAB, 2, T, 1, seed=1)[0],)


def calibration_data() -> list[torch.Tensor]:
    return token_batches(VOCAB, 4, T, 3, seed=2)
