"""Helpers the Hugging Face family files share: seeded construction and a logits-only wrapper."""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn


class Logits(nn.Module):
    """A Hugging Face model as the model contract wants it: positional tensors in, logits out,
    no key/value cache (a cache is state across calls, which neither tracing nor a plan covers)."""

    def __init__(self, model: nn.Module, input_name: str) -> None:
        super().__init__()
        self.model = model
        self.input_name = input_name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kwargs: dict[str, Any] = {self.input_name: x}
        if getattr(self.model.config, "use_cache", None) is not None:
            kwargs["use_cache"] = False
        return self.model(**kwargs).logits


def seeded(build: Callable[[], nn.Module], seed: int = 0) -> nn.Module:
    """``build()`` under a fixed seed, without disturbing the caller's random state."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return build().eval()


def token_batches(vocab: int, batch: int, length: int, count: int, seed: int) -> list[torch.Tensor]:
    """``count`` deterministic batches of random token ids."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (batch, length), generator=g) for _ in range(count)]
