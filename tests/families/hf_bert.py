"""BERT-style encoder with a classification head from transformers (SDPA attention, GELU MLPs,
LayerNorms, token-type and position embeddings), from a config with seeded random weights."""

from __future__ import annotations

import torch
from _hf import Logits, seeded, token_batches
from torch import nn
from transformers import BertConfig, BertForSequenceClassification

VOCAB, T = 512, 32
CONFIG = dict(vocab_size=VOCAB, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
              intermediate_size=256, max_position_embeddings=64, num_labels=3)


def model() -> nn.Module:
    return seeded(lambda: Logits(BertForSequenceClassification(BertConfig(**CONFIG)), "input_ids"))


def example_inputs() -> tuple[torch.Tensor, ...]:
    return (token_batches(VOCAB, 2, T, 1, seed=1)[0],)


def calibration_data() -> list[torch.Tensor]:
    return token_batches(VOCAB, 8, T, 3, seed=2)


METRIC = "agreement"
HIGHER_IS_BETTER = True


def _held_out() -> list[torch.Tensor]:
    return token_batches(VOCAB, 16, T, 2, seed=3)


def evaluate(model: nn.Module) -> float:
    """Agreement with the fp32 model's classes on held-out token batches. Written as users write
    evaluate(): it switches the model to eval mode and back, and moves inputs to the model's device."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    reference = _reference_classes()
    right = total = 0
    with torch.no_grad():
        for ids, ref in zip(_held_out(), reference):
            pred = model(ids.to(device)).argmax(-1).cpu()
            right += int((pred == ref).sum())
            total += ref.numel()
    model.train(was_training)
    return right / total


_CLASSES: list[torch.Tensor] = []


def _reference_classes() -> list[torch.Tensor]:
    """The fp32 model's classes on the held-out batches (computed once)."""
    if not _CLASSES:
        fp32 = model()
        with torch.no_grad():
            _CLASSES.extend(fp32(ids).argmax(-1) for ids in _held_out())
    return _CLASSES
