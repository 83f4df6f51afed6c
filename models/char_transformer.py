"""Decoder-only character-level transformer LM on Python standard-library source; metric: perplexity.

Text: a fixed, sorted list of pure-Python standard-library modules (``zoo_common.STDLIB_FILES``)
read at run time from this interpreter's ``sysconfig.get_paths()["stdlib"]`` and concatenated.
The first 90% is the training split, the last 10% is held out. Vocabulary: printable ASCII plus
newline, with every other character mapped to one "unknown" token (97 tokens), so it does not
depend on the text.

Architecture: token + learned position embeddings, pre-LN blocks (LayerNorm, causal
self-attention with separate q/k/v Linear projections and an output projection, LayerNorm,
GELU MLP), a final LayerNorm and an untied Linear head. Attention is written out explicitly
(``q @ k^T * scale``, a causal-mask buffer, softmax, ``@ v``) so torch.fx traces every op.
Input: int64 token ids (batch, T <= CONTEXT); output: logits (batch, T, vocab).
Train with ``python models/train.py char_transformer``.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
import zoo_common
from torch import nn

NAME = "char_transformer"
METRIC = "perplexity"
HIGHER_IS_BETTER = False
OUTPUT = "logits"

VOCAB_SIZE = len(zoo_common.VOCAB)
CONTEXT = 64
D_MODEL = 128
N_HEADS = 4
N_LAYERS = 2
MLP_RATIO = 4

# Training (models/train.py): AdamW with warm-up and cosine decay over TRAIN_EPOCHS passes over
# train_data(), which is TRAIN_COVERAGE x the training text in randomly placed windows.
TRAIN_EPOCHS = 5
TRAIN_LR = 3e-3
TRAIN_WEIGHT_DECAY = 0.05
TRAIN_WARMUP_STEPS = 100
TRAIN_COVERAGE = 1
BATCH_SIZE = 32
EVAL_WINDOWS = 256


class CausalSelfAttention(nn.Module):
    def __init__(self, d_model: int, n_heads: int, context: int):
        super().__init__()
        self.n_heads = n_heads
        self.head_dim = d_model // n_heads
        self.scale = 1.0 / math.sqrt(self.head_dim)
        self.q = nn.Linear(d_model, d_model)
        self.k = nn.Linear(d_model, d_model)
        self.v = nn.Linear(d_model, d_model)
        self.proj = nn.Linear(d_model, d_model)
        mask = torch.triu(torch.ones(context, context, dtype=torch.bool), diagonal=1)
        self.register_buffer("mask", mask, persistent=False)  # True above the diagonal: hidden

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.size(0), x.size(1), x.size(2)
        q = self.q(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        v = self.v(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        att = (q @ k.transpose(-2, -1)) * self.scale
        # torch.narrow rather than self.mask[:t, :t]: a slice holding a traced size cannot index a tensor.
        mask = torch.narrow(torch.narrow(self.mask, 0, 0, t), 1, 0, t)
        att = att.masked_fill(mask, float("-inf"))
        att = F.softmax(att, dim=-1)
        y = (att @ v).transpose(1, 2).reshape(b, t, c)
        return self.proj(y)


class MLP(nn.Module):
    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(d_model, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, d_model: int, n_heads: int, context: int, mlp_ratio: int):
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, n_heads, context)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = MLP(d_model, mlp_ratio * d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class CharTransformer(nn.Module):
    def __init__(self, vocab_size: int = VOCAB_SIZE, context: int = CONTEXT, d_model: int = D_MODEL,
                 n_heads: int = N_HEADS, n_layers: int = N_LAYERS, mlp_ratio: int = MLP_RATIO):
        super().__init__()
        self.tok_emb = nn.Embedding(vocab_size, d_model)
        self.pos_emb = nn.Embedding(context, d_model)
        self.register_buffer("positions", torch.arange(context), persistent=False)
        self.blocks = nn.Sequential(*[Block(d_model, n_heads, context, mlp_ratio) for _ in range(n_layers)])
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.size(1)
        x = self.tok_emb(idx) + self.pos_emb(torch.narrow(self.positions, 0, 0, t))
        x = self.blocks(x)
        return self.head(self.ln_f(x))


def _init_weights(net: CharTransformer) -> None:
    """GPT-style initialisation; residual output projections scaled down by depth."""
    n_layers = len(net.blocks)
    for name, m in net.named_modules():
        if isinstance(m, nn.Linear):
            std = 0.02 / math.sqrt(2 * n_layers) if name.endswith(("proj", "fc2")) else 0.02
            nn.init.normal_(m.weight, 0.0, std)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, 0.0, 0.02)


def build() -> nn.Module:
    net = CharTransformer()
    _init_weights(net)
    return net


def model() -> nn.Module:
    return zoo_common.load_weights(build(), NAME).eval()


def example_inputs() -> tuple[torch.Tensor, ...]:
    return (calibration_data()[0][:2].clone(),)


@functools.cache
def _calibration() -> tuple[torch.Tensor, ...]:
    train, _ = zoo_common.stdlib_tokens()
    g = torch.Generator().manual_seed(1234)
    starts = torch.randint(0, len(train) - CONTEXT - 1, (64,), generator=g)
    x, _ = zoo_common.windows(train, starts, CONTEXT)
    return tuple(x[i:i + 16] for i in range(0, 64, 16))


def calibration_data() -> list[torch.Tensor]:
    """4 batches of 16 training windows of CONTEXT tokens, always the same ones."""
    return [b.clone() for b in _calibration()]


@functools.cache
def _train_batches() -> tuple[tuple[torch.Tensor, torch.Tensor], ...]:
    train, _ = zoo_common.stdlib_tokens()
    n = TRAIN_COVERAGE * len(train) // CONTEXT
    n -= n % BATCH_SIZE
    g = torch.Generator().manual_seed(0)
    starts = torch.randint(0, len(train) - CONTEXT - 1, (n,), generator=g)
    x, y = zoo_common.windows(train, starts, CONTEXT)
    return tuple(zoo_common.batches(x, y, BATCH_SIZE))


def train_data() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(inputs, next-token targets) batches of windows drawn from the training split."""
    return list(_train_batches())


def loss(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    logits = model(x).float()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


@functools.cache
def eval_windows() -> tuple[torch.Tensor, torch.Tensor]:
    """Up to EVAL_WINDOWS non-overlapping windows spread evenly over the held-out text."""
    _, held = zoo_common.stdlib_tokens()
    n_avail = (len(held) - 1) // CONTEXT
    n = min(EVAL_WINDOWS, n_avail)
    starts = (torch.arange(n) * (n_avail // n)) * CONTEXT
    return zoo_common.windows(held, starts, CONTEXT)


def evaluate(model: nn.Module) -> float:
    """exp(mean next-token cross-entropy) over all positions of the held-out windows."""
    x, y = eval_windows()
    return zoo_common.perplexity(model, x, y)
