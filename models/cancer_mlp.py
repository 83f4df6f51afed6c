"""MLP on scikit-learn's Wisconsin breast-cancer features (2 classes); metric: held-out accuracy.

The 30 raw features are standardised inside the network with the training split's mean and
standard deviation, stored as buffers (they travel in the weights file). Four Linear layers.
Held out: 25% of each class (142 samples). Train with ``python models/train.py cancer_mlp``.
"""

from __future__ import annotations

import torch
import zoo_common
from torch import nn

NAME = "cancer_mlp"
METRIC = "accuracy"
HIGHER_IS_BETTER = True
OUTPUT = "logits"

TRAIN_EPOCHS = 60
TRAIN_LR = 1e-3
TRAIN_WEIGHT_DECAY = 1e-3
BATCH_SIZE = 32


class CancerMLP(nn.Module):
    def __init__(self, mean: torch.Tensor, std: torch.Tensor, hidden: int = 64, num_classes: int = 2):
        super().__init__()
        self.register_buffer("mean", mean.clone().to(torch.float32))
        self.register_buffer("inv_std", (1.0 / std).to(torch.float32))
        self.fc1 = nn.Linear(mean.numel(), hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.fc3 = nn.Linear(hidden, hidden // 2)
        self.fc4 = nn.Linear(hidden // 2, num_classes)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - self.mean) * self.inv_std
        x = self.act(self.fc1(x))
        x = self.act(self.fc2(x))
        x = self.act(self.fc3(x))
        return self.fc4(x)


def build() -> nn.Module:
    mean, std = zoo_common.breast_cancer()[4:]
    return CancerMLP(mean, std)


def model() -> nn.Module:
    return zoo_common.load_weights(build(), NAME).eval()


def example_inputs() -> tuple[torch.Tensor, ...]:
    return (zoo_common.breast_cancer()[0][:8].clone(),)


def calibration_data() -> list[torch.Tensor]:
    """4 batches of 32 training samples (128 in all), always the same ones."""
    x_tr = zoo_common.breast_cancer()[0]
    return [x_tr[i:i + 32].clone() for i in range(0, 128, 32)]


def train_data() -> list[tuple[torch.Tensor, torch.Tensor]]:
    x_tr, y_tr = zoo_common.breast_cancer()[:2]
    return zoo_common.batches(x_tr, y_tr, BATCH_SIZE)


def loss(model: nn.Module, batch) -> torch.Tensor:
    return zoo_common.classification_loss(model, batch)


def evaluate(model: nn.Module) -> float:
    """Top-1 accuracy on the 142 held-out samples."""
    _, _, x_te, y_te, _, _ = zoo_common.breast_cancer()
    return zoo_common.accuracy(model, x_te, y_te)
