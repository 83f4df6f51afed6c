"""Llama-style decoder from transformers: RMSNorm, rotary position embeddings, SwiGLU MLP,
grouped-query attention (4 query heads share 2 key/value heads), causal SDPA, untied head;
from a config with seeded random weights."""

from __future__ import annotations

import torch
from _hf import Logits, seeded, token_batches
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

VOCAB, T = 512, 32
CONFIG = dict(vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
              tie_word_embeddings=False, bos_token_id=0, eos_token_id=0, pad_token_id=0)


def model() -> nn.Module:
    return seeded(lambda: Logits(LlamaForCausalLM(LlamaConfig(**CONFIG)), "input_ids"))


def example_inputs() -> tuple[torch.Tensor, ...]:
    return (token_batches(VOCAB, 2, T, 1, seed=1)[0],)


def calibration_data() -> list[torch.Tensor]:
    return token_batches(VOCAB, 4, T, 3, seed=2)
