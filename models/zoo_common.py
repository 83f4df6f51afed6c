"""Helpers shared by the bundled model files (data sets, splits, weights, evaluation loops).

The model loader puts ``models/`` on ``sys.path`` while it imports a model file, so the files
say ``import zoo_common``. Everything that reads or prepares data is cached, so calling a
model file's ``evaluate()`` / ``calibration_data()`` repeatedly costs only the forward passes.

All splits are made with NumPy's legacy ``RandomState`` (a stream NumPy promises never to
change), not with scikit-learn's splitters, so they do not move between library versions.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import sysconfig
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
SPLIT_SEED = 0


# ----------------------------------------------------------------------------- weights


def weights_path(name: str) -> Path:
    return WEIGHTS_DIR / f"{name}.pt"


def load_weights(net: nn.Module, name: str) -> nn.Module:
    """Load ``models/weights/<name>.pt`` into ``net``; a missing file says how to make it."""
    path = weights_path(name)
    if not path.is_file():
        raise FileNotFoundError(
            f"trained weights for {name!r} not found at {path}; "
            f"create them with: python models/train.py {name}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    net.load_state_dict(state)
    return net


def save_weights(net: nn.Module, name: str) -> Path:
    """Write the float32 state_dict atomically (temp file in the same folder, then os.replace)."""
    path = weights_path(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: (v.detach().to(torch.float32) if v.is_floating_point() else v.detach()).clone().contiguous()
             for k, v in net.state_dict().items()}
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:  # a file object, so the archive's inner names do not depend on tmp's name
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


# ----------------------------------------------------------------------------- helpers


def device_of(model: nn.Module) -> torch.device:
    """The device of the model's first parameter or buffer (CPU when it has none)."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def stratified_split(labels: np.ndarray, test_fraction: float, seed: int = SPLIT_SEED):
    """Indices (train, test): each class shuffled and ``test_fraction`` of it held out."""
    rng = np.random.RandomState(seed)
    train, test = [], []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        idx = idx[rng.permutation(len(idx))]
        n_test = round(len(idx) * test_fraction)
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    train = np.concatenate(train)
    test = np.concatenate(test)
    # Interleave the classes: a fixed shuffle of each split.
    return train[rng.permutation(len(train))], np.sort(test)


def batches(x: torch.Tensor, y: torch.Tensor, batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x[i:i + batch_size], y[i:i + batch_size]) for i in range(0, len(x), batch_size)]


def classification_loss(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(model(x).float(), y)


@contextlib.contextmanager
def evaluating(model: nn.Module) -> Iterator[None]:
    """Eval mode for the block, then back to whatever mode the caller had (a tuner may be training)."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 512) -> float:
    """Top-1 accuracy of ``model`` on (x, y), in eval mode, restoring the model's mode after."""
    with evaluating(model):
        dev = device_of(model)
        correct = 0
        for i in range(0, len(x), batch_size):
            logits = model(x[i:i + batch_size].to(dev))
            correct += int((logits.float().argmax(dim=-1).cpu() == y[i:i + batch_size]).sum())
    return correct / len(x)


# ----------------------------------------------------------------------------- sklearn digits


@functools.cache
def digits(size: int = 8):
    """(x_train, y_train, x_test, y_test) of sklearn's 8x8 digits as (N, 1, size, size) in [0, 1].

    20% of each class is held out. ``size`` > 8 upsamples bilinearly here, in data preparation.
    """
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target, dtype=torch.int64)
    if size != 8:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    tr, te = stratified_split(d.target, 0.2)
    tr, te = torch.from_numpy(tr), torch.from_numpy(te)
    return x[tr].contiguous(), y[tr].contiguous(), x[te].contiguous(), y[te].contiguous()


# ----------------------------------------------------------------------------- breast cancer


@functools.cache
def breast_cancer():
    """(x_train, y_train, x_test, y_test, mean, std): raw features; mean/std of the train split."""
    from sklearn.datasets import load_breast_cancer

    d = load_breast_cancer()
    x = torch.tensor(d.data, dtype=torch.float32)
    y = torch.tensor(d.target, dtype=torch.int64)
    tr, te = stratified_split(d.target, 0.25)
    tr, te = torch.from_numpy(tr), torch.from_numpy(te)
    x_tr = x[tr].contiguous()
    mean = x_tr.mean(dim=0)
    std = x_tr.std(dim=0).clamp_min(1e-6)
    return x_tr, y[tr].contiguous(), x[te].contiguous(), y[te].contiguous(), mean, std


# ----------------------------------------------------------------------------- stdlib text

# A fixed, sorted list of pure-Python standard-library modules (all present in CPython 3.10-3.13).
# Their text differs between Python versions, so the LM's metric does too (see models/README.md).
STDLIB_FILES = tuple(sorted((
    "argparse.py",
    "base64.py",
    "bisect.py",
    "calendar.py",
    "configparser.py",
    "contextlib.py",
    "copy.py",
    "csv.py",
    "dataclasses.py",
    "difflib.py",
    "enum.py",
    "fnmatch.py",
    "fractions.py",
    "functools.py",
    "glob.py",
    "heapq.py",
    "ipaddress.py",
    "json/decoder.py",
    "json/encoder.py",
    "pprint.py",
    "queue.py",
    "random.py",
    "shlex.py",
    "statistics.py",
    "string.py",
    "textwrap.py",
    "tokenize.py",
)))

# Vocabulary: index 0 is "unknown", then newline, then printable ASCII 32..126 (97 tokens).
VOCAB = "\x00\n" + "".join(chr(i) for i in range(32, 127))
UNK = 0
_CHAR_TO_ID = np.zeros(256, dtype=np.int64)
for _i, _c in enumerate(VOCAB[1:], start=1):
    _CHAR_TO_ID[ord(_c)] = _i


def encode(text: str) -> torch.Tensor:
    """Token ids of ``text``; anything outside the vocabulary (tabs, non-ASCII) becomes UNK."""
    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32).astype(np.int64)
    ids = np.where(codes < 256, _CHAR_TO_ID[np.minimum(codes, 255)], UNK)
    return torch.from_numpy(ids)


def decode(ids) -> str:
    return "".join(VOCAB[int(i)] if int(i) != UNK else "?" for i in ids)


@functools.cache
def stdlib_text() -> str:
    """The concatenation of STDLIB_FILES as read from this interpreter's standard library."""
    root = Path(sysconfig.get_paths()["stdlib"])
    parts = []
    for rel in STDLIB_FILES:
        p = root / rel
        if not p.is_file():
            raise FileNotFoundError(f"standard-library source {p} not found (the char LM reads its text from it)")
        parts.append(p.read_text(encoding="utf-8", errors="replace"))
    return "".join(parts)


@functools.cache
def stdlib_tokens() -> tuple[torch.Tensor, torch.Tensor]:
    """(train, held_out) token ids: the first 90% of the text and the last 10%."""
    ids = encode(stdlib_text())
    cut = int(len(ids) * 0.9)
    return ids[:cut].clone(), ids[cut:].clone()


def windows(ids: torch.Tensor, starts: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs ids[s : s+length] and next-token targets ids[s+1 : s+length+1] for each start s."""
    offs = starts.unsqueeze(1) + torch.arange(length + 1).unsqueeze(0)
    w = ids[offs]
    return w[:, :-1].contiguous(), w[:, 1:].contiguous()


@torch.no_grad()
def perplexity(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 128) -> float:
    """exp(mean next-token cross-entropy) of a language model over windows (x, y)."""
    with evaluating(model):
        dev = device_of(model)
        total, count = 0.0, 0
        for i in range(0, len(x), batch_size):
            logits = model(x[i:i + batch_size].to(dev)).float().cpu()
            t = y[i:i + batch_size]
            total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), t.reshape(-1), reduction="sum"))
            count += t.numel()
    return math.exp(total / count)


class BasicBlock(nn.Module):
    """ResNet basic block (two 3x3 convs with batch norm, residual add), shared by the zoo's ResNets."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))
