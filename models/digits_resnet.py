"""ResNet-style CNN on scikit-learn's digits, upsampled to 16x16; metric: held-out accuracy.

A 3x3 stem convolution, three stages of two basic residual blocks (16, 32, 64 channels; the
second and third stages halve the resolution, with 1x1 projection shortcuts), BatchNorm after
every convolution, global average pooling and a linear head: 15 Conv2d layers, 1 Linear.
The 8x8 images are upsampled bilinearly to 16x16 in data preparation, not in the model.
Held out: 20% of each class (359 images). Train with ``python models/train.py digits_resnet``.
"""

from __future__ import annotations

import torch
import zoo_common
from torch import nn

NAME = "digits_resnet"
METRIC = "accuracy"
HIGHER_IS_BETTER = True
OUTPUT = "logits"

IMAGE_SIZE = 16
TRAIN_EPOCHS = 30
TRAIN_LR = 3e-3
TRAIN_WEIGHT_DECAY = 1e-4
BATCH_SIZE = 32


class DigitsResNet(nn.Module):
    def __init__(self, widths=(16, 32, 64), blocks_per_stage: int = 2, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(1, widths[0], 3, padding=1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU())
        stages = []
        cin = widths[0]
        for i, w in enumerate(widths):
            blocks = []
            for j in range(blocks_per_stage):
                blocks.append(zoo_common.BasicBlock(cin, w, stride=2 if (i > 0 and j == 0) else 1))
                cin = w
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(self.stem(x))
        return self.fc(self.flatten(self.pool(x)))


def build() -> nn.Module:
    return DigitsResNet()


def model() -> nn.Module:
    return zoo_common.load_weights(build(), NAME).eval()


def example_inputs() -> tuple[torch.Tensor, ...]:
    return (zoo_common.digits(IMAGE_SIZE)[0][:8].clone(),)


def calibration_data() -> list[torch.Tensor]:
    """4 batches of 32 training images (128 in all), always the same ones."""
    x_tr = zoo_common.digits(IMAGE_SIZE)[0]
    return [x_tr[i:i + 32].clone() for i in range(0, 128, 32)]


def train_data() -> list[tuple[torch.Tensor, torch.Tensor]]:
    x_tr, y_tr = zoo_common.digits(IMAGE_SIZE)[:2]
    return zoo_common.batches(x_tr, y_tr, BATCH_SIZE)


def loss(model: nn.Module, batch) -> torch.Tensor:
    return zoo_common.classification_loss(model, batch)


def evaluate(model: nn.Module) -> float:
    """Top-1 accuracy on the 359 held-out images."""
    _, _, x_te, y_te = zoo_common.digits(IMAGE_SIZE)
    return zoo_common.accuracy(model, x_te, y_te)
