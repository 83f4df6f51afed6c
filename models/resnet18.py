"""ResNet-18-sized image classifier with seeded random weights (no weights file, no metric).

Standard ResNet-18 layout: 7x7/2 stem convolution, BatchNorm, ReLU, 3x3/2 max-pool, four stages
of two BasicBlocks (64, 128, 256, 512 channels; 1x1 projection shortcuts where the shape
changes), global average pooling and a 1000-way Linear head: 20 Conv2d + 1 Linear, ~11.7 M
parameters, 224x224x3 inputs.

The weights are random but seeded, so every call builds the same network. To make the
activations realistically scaled, the BatchNorm scales/shifts are drawn randomly around (1, 0)
and the running statistics are set by passing a few seeded synthetic image batches through the
network in train mode (a cumulative average); the result is then put in eval mode. That set-up
costs a few seconds once per process; model() returns a fresh deep copy of the cached network.

There is no evaluate(): a tuner judges this model by fidelity to its fp32 outputs.
"""

from __future__ import annotations

import copy
import functools

import torch
import torch.nn.functional as F
import zoo_common
from torch import nn

NAME = "resnet18"
OUTPUT = "logits"
IMAGE_SIZE = 224
NUM_CLASSES = 1000
SEED = 0
HEAD_LOGIT_STD = 2.0


class ResNet18(nn.Module):
    def __init__(self, num_classes: int = NUM_CLASSES, widths=(64, 128, 256, 512), blocks=(2, 2, 2, 2)):
        super().__init__()
        self.conv1 = nn.Conv2d(3, widths[0], 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        cin = widths[0]
        layers = []
        for i, (w, n) in enumerate(zip(widths, blocks)):
            stage = []
            for j in range(n):
                stage.append(zoo_common.BasicBlock(cin, w, stride=2 if (i > 0 and j == 0) else 1))
                cin = w
            layers.append(nn.Sequential(*stage))
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.flatten(self.avgpool(x)))


def synthetic_images(n: int, seed: int) -> torch.Tensor:
    """Seeded image-like inputs: smooth random colour fields plus fine noise, roughly unit variance."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn(n, 3, IMAGE_SIZE // 8, IMAGE_SIZE // 8, generator=g)
    smooth = F.interpolate(coarse, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
    return smooth + 0.25 * torch.randn(n, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g)


def build() -> nn.Module:
    """The seeded random network, BatchNorm running statistics not yet set."""
    with torch.random.fork_rng(devices=[]):  # seed construction without disturbing the caller's RNG
        torch.manual_seed(SEED)
        net = ResNet18()
    g = torch.Generator().manual_seed(SEED)  # then redraw every weight from a private generator
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            fan_out = m.out_channels * m.kernel_size[0] * m.kernel_size[1]
            with torch.no_grad():
                m.weight.normal_(0.0, (2.0 / fan_out) ** 0.5, generator=g)
        elif isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.weight.uniform_(0.5, 1.5, generator=g)
                m.bias.normal_(0.0, 0.1, generator=g)
        elif isinstance(m, nn.Linear):
            bound = 1.0 / m.in_features ** 0.5
            with torch.no_grad():
                m.weight.uniform_(-bound, bound, generator=g)
                m.bias.uniform_(-bound, bound, generator=g)
    return net


@functools.lru_cache(maxsize=1)
def _calibrated() -> nn.Module:
    net = build()
    images = [synthetic_images(8, seed=1000 + i) for i in range(2)]
    bns = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches below
    net.train()
    with torch.no_grad():
        for x in images:
            net(x)
    for m in bns:
        m.momentum = 0.1
    net.eval()
    # Random features average out to nearly image-independent per-channel constants, which would
    # make one class win for every input. Standardise each logit over the same synthetic images
    # (mean 0, std HEAD_LOGIT_STD), so the top class depends on the input as in a trained net.
    with torch.no_grad():
        feats = torch.cat([_features(net, x) for x in images])
        logits = net.fc(feats)
        mu, sigma = logits.mean(dim=0), logits.std(dim=0).clamp_min(1e-6)
        net.fc.weight.mul_((HEAD_LOGIT_STD / sigma).unsqueeze(1))
        net.fc.bias.sub_(mu).mul_(HEAD_LOGIT_STD / sigma)
    return net


def _features(net: ResNet18, x: torch.Tensor) -> torch.Tensor:
    x = net.maxpool(net.relu(net.bn1(net.conv1(x))))
    x = net.layer4(net.layer3(net.layer2(net.layer1(x))))
    return net.flatten(net.avgpool(x))


def model() -> nn.Module:
    """A fresh copy of the seeded network in eval mode (torch's global RNG is left untouched)."""
    return copy.deepcopy(_calibrated()).eval()


def example_inputs() -> tuple[torch.Tensor, ...]:
    return (synthetic_images(1, seed=1),)


def calibration_data() -> list[torch.Tensor]:
    """4 batches of 8 seeded synthetic images: fidelity (top-1 agreement with fp32) moves in steps
    of 1/32, so any budget below 3.125% lets no sample change its top-1. More images would make
    every evaluation of this 224x224 network slower (about 1 s per 32 on this CPU)."""
    return [synthetic_images(8, seed=100 + i) for i in range(4)]
