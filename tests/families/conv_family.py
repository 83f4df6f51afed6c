"""Convolutions in the torchvision style, written here: a MobileNet-like image branch (depthwise
and grouped convolutions, inverted residuals, BatchNorm, ReLU6), a Conv1d branch over a signal, a
Conv3d branch over a short clip, and a decoder with ConvTranspose2d and nearest upsampling;
seeded random weights, seeded noise inputs."""

from __future__ import annotations

import torch
from _hf import seeded
from torch import nn


def _bn_act(c: int) -> nn.Sequential:
    return nn.Sequential(nn.BatchNorm2d(c), nn.ReLU6())


class InvertedResidual(nn.Module):
    def __init__(self, c: int, expand: int = 4) -> None:
        super().__init__()
        h = c * expand
        self.block = nn.Sequential(
            nn.Conv2d(c, h, 1, bias=False), _bn_act(h),
            nn.Conv2d(h, h, 3, padding=1, groups=h, bias=False), _bn_act(h),  # depthwise
            nn.Conv2d(h, c, 1, groups=2, bias=False), nn.BatchNorm2d(c))  # grouped pointwise

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x)


class ConvFamily(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, stride=2, padding=1, bias=False), _bn_act(16))
        self.blocks = nn.Sequential(InvertedResidual(16), InvertedResidual(16))
        self.decode = nn.Sequential(nn.ConvTranspose2d(16, 8, 2, stride=2), nn.ReLU(),
                                    nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(8, 4, 3, padding=1))
        self.signal = nn.Sequential(nn.Conv1d(2, 16, 5, padding=2), nn.ReLU(), nn.Conv1d(16, 16, 3, groups=4))
        self.clip = nn.Sequential(nn.Conv3d(1, 8, 3, padding=1), nn.ReLU())
        self.head = nn.Linear(16 + 4 + 16 + 8, 10)

    def forward(self, image: torch.Tensor, signal: torch.Tensor, clip: torch.Tensor) -> torch.Tensor:
        f = self.blocks(self.stem(image))
        d = self.decode(f)  # back to the input's size
        feats = [f.mean((2, 3)), d.mean((2, 3)), self.signal(signal).mean(2), self.clip(clip).mean((2, 3, 4))]
        return self.head(torch.cat(feats, dim=1))


def _inputs(batch: int, seed: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 3, 32, 32, generator=g), torch.randn(batch, 2, 64, generator=g),
            torch.randn(batch, 1, 4, 8, 8, generator=g))


def model() -> nn.Module:
    return seeded(ConvFamily)


def example_inputs() -> tuple[torch.Tensor, ...]:
    return _inputs(2, seed=1)


def calibration_data() -> list[tuple[torch.Tensor, ...]]:
    return [_inputs(8, seed=s) for s in (2, 3, 4)]
