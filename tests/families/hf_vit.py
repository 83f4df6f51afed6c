"""ViT image classifier from transformers (patch-embedding convolution, class token, SDPA
attention, GELU MLPs), from a config with seeded random weights; images are seeded noise."""

from __future__ import annotations

import torch
from _hf import Logits, seeded
from torch import nn
from transformers import ViTConfig, ViTForImageClassification

CONFIG = dict(image_size=32, patch_size=8, num_channels=3, hidden_size=128, num_hidden_layers=2,
              num_attention_heads=4, intermediate_size=256, num_labels=10)


def _images(batch: int, seed: int) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def model() -> nn.Module:
    return seeded(lambda: Logits(ViTForImageClassification(ViTConfig(**CONFIG)), "pixel_values"))


def example_inputs() -> tuple[torch.Tensor, ...]:
    return (_images(2, seed=1),)


def calibration_data() -> list[torch.Tensor]:
    return [_images(8, seed=s) for s in (2, 3, 4)]
