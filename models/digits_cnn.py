"""Small CNN on scikit-learn's 8x8 handwritten digits (10 classes); metric: held-out accuracy.

Three 3x3 convolutions (two at 8x8, one at 4x4 after max-pooling) and a two-layer linear head.
Held out: 20% of each class (359 images). Train with ``python models/train.py digits_cnn``.
"""

from __future__ import annotations

import torch
import zoo_common
from torch import nn

NAME = "digits_cnn"
METRIC = "accuracy"
HIGHER_IS_BETTER = True
OUTPUT = "logits"

# Training hyper-parameters read by models/train.py.
TRAIN_EPOCHS = 40
TRAIN_LR = 3e-3
TRAIN_WEIGHT_DECAY = 1e-4
BATCH_SIZE = 32


class DigitsCNN(nn.Module):
    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, kernel_size=3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.conv3 = nn.Conv2d(32, 64, kernel_size=3, padding=1)
        self.act = nn.ReLU()
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(64 * 4 * 4, 128)
        self.fc2 = nn.Linear(128, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.conv1(x))
        x = self.pool(self.act(self.conv2(x)))
        x = self.act(self.conv3(x))
        x = self.act(self.fc1(self.flatten(x)))
        return self.fc2(x)


def build() -> nn.Module:
    """The untrained network (train.py seeds the RNG before calling this)."""
    return DigitsCNN()


def model() -> nn.Module:
    return zoo_common.load_weights(build(), NAME).eval()


def example_inputs() -> tuple[torch.Tensor, ...]:
    x_tr = zoo_common.digits()[0]
    return (x_tr[:8].clone(),)


def calibration_data() -> list[torch.Tensor]:
    """4 batches of 32 training images (128 in all), always the same ones."""
    x_tr = zoo_common.digits()[0]
    return [x_tr[i:i + 32].clone() for i in range(0, 128, 32)]


def train_data() -> list[tuple[torch.Tensor, torch.Tensor]]:
    x_tr, y_tr = zoo_common.digits()[:2]
    return zoo_common.batches(x_tr, y_tr, BATCH_SIZE)


def loss(model: nn.Module, batch) -> torch.Tensor:
    return zoo_common.classification_loss(model, batch)


def evaluate(model: nn.Module) -> float:
    """Top-1 accuracy on the 359 held-out images."""
    _, _, x_te, y_te = zoo_common.digits()
    return zoo_common.accuracy(model, x_te, y_te)
