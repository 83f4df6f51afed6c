"""digits_cnn with large activations: where fp16 overflows and an fp16-only tool must keep fp32.

The trained digits_cnn (models/digits_cnn.py, its shipped weights) rescaled exactly: conv1's weights
and bias and the biases of conv2 and conv3 are multiplied by ``SCALE`` = 2^15, and fc1's weights
divided by it. ReLU and max-pooling commute with a positive scale, so conv1..conv3 compute 32768
times their values and fc1 undoes it; with a power of two every product and sum is scaled exactly,
so in fp32 this is the same function as digits_cnn (the same logits bit for bit, the same accuracy
0.9889). But conv2's and conv3's outputs reach 1.1e5 and 2.3e5 on the calibration images, past
fp16's 65504: in fp16 they, and fc1's input, overflow to inf (conv1's reach 5.1e4). bf16 has fp32's range, and an fp8 layer's per-tensor scale maps any range onto its own, so
those layers can still run in low precision -- in another format than fp16.

This stands in for real models whose activations outgrow fp16 (outlier features in large language
models, un-normalised residual streams): a benchmark (benchmarks/peers_bench.py) where a tool that
only knows fp16 must fall back to fp32 and a plan mixing bf16, fp16 and fp8 wins. Data, metric and
calibration are digits_cnn's.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "models"))

import digits_cnn  # noqa: E402
import zoo_common  # noqa: E402

NAME = "digits_cnn_large"
METRIC = digits_cnn.METRIC
HIGHER_IS_BETTER = digits_cnn.HIGHER_IS_BETTER
OUTPUT = digits_cnn.OUTPUT
SCALE = 2.0 ** 15  # a power of two: the rescaling is exact in fp32


def model() -> nn.Module:
    net = digits_cnn.model()
    with torch.no_grad():
        net.conv1.weight.mul_(SCALE)
        for conv in (net.conv1, net.conv2, net.conv3):
            conv.bias.mul_(SCALE)
        net.fc1.weight.div_(SCALE)
    return net.eval()


def example_inputs() -> tuple[torch.Tensor, ...]:
    return digits_cnn.example_inputs()


def calibration_data() -> list[torch.Tensor]:
    return digits_cnn.calibration_data()


def evaluate(model: nn.Module) -> float:
    """Top-1 accuracy on digits_cnn's 359 held-out images."""
    _, _, x_te, y_te = zoo_common.digits()
    return zoo_common.accuracy(model, x_te, y_te)
