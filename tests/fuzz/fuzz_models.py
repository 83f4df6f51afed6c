"""Random small models for the apply/export fuzz test: a hypothesis strategy over :class:`NetSpec`.

A :class:`NetSpec` is plain data (an input shape, a list of :class:`Block` steps and a weight seed),
so hypothesis shrinks it and prints it as a readable, copy-pasteable regression case;
:class:`FuzzNet` interprets it as an ``nn.Module`` whose ``forward`` torch.fx traces into a flat
graph. Every intermediate value is kept in a list, so a step can read any earlier value (residual
adds, products of two activations). The strategy tracks each value's shape (batch dimension
excluded), so every drawn model runs by construction.

Op vocabulary (``Block.op``):

- layers: ``linear`` (``nn.Linear`` on the last dimension, any rank), ``conv`` (``nn.Conv2d`` on a
  [C, H, W] value), ``matmul_w`` (``x @ W`` with a parameter W), ``matmul`` (``x @ v^T`` of two
  activations, v possibly x itself), ``bmm`` (``torch.bmm`` of two rank-3 activations);
- elementwise: ``relu``, ``gelu``, ``sigmoid``, ``tanh``, ``neg``, ``scale`` (``x * c``),
  ``shift`` (``x + c``), ``offset`` (``x + buffer``) and ``gain`` (``x * parameter``), both of the
  last dimension's size, fp32 tensors that are no layer's weight; and the binary ``add`` / ``sub`` /
  ``mul`` with an earlier value that broadcasts to x (same rank, each dimension equal or 1);
- reductions: ``sum``, ``mean`` over one non-batch dimension (keepdim or not), ``softmax``;
- shapes: ``flatten``, ``unflatten``, ``reshape``, ``permute``, ``transpose``, and ``cat`` with an
  earlier value along the last dimension.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import strategies as st

Shape = tuple[int, ...]

#: largest width of a layer's output and of a reshaped dimension: small models export quickly
MAX_WIDTH = 8
#: most elements per sample in any value (keeps x @ x^T and convolutions cheap)
MAX_ELEMENTS = 256

UNARY = ("relu", "gelu", "sigmoid", "tanh", "neg")
BINARY = ("add", "sub", "mul")
REDUCE = ("sum", "mean")
#: the layers with a weight, which may branch off an earlier value (``Block.ref``)
LAYER_OPS = ("linear", "matmul_w", "conv")


@dataclass(frozen=True)
class Block:
    """One step of a :class:`FuzzNet`: ``op`` applied to the latest value (``args``: the op's
    parameters, dimensions counted without the batch dimension; ``ref``: the index of an earlier
    value, 0 being the input: the second operand of a binary op, ``matmul``, ``bmm`` or ``cat``,
    or the input of a ``linear``, ``matmul_w`` or ``conv`` layer that branches off an earlier value
    instead of reading the latest, so one value feeds layers of several formats; :func:`net_specs`
    adds a branch of the latest's shape to the latest, else it is live only if a later step reads it)."""

    op: str
    args: tuple[Any, ...] = ()
    ref: int | None = None


@dataclass(frozen=True)
class NetSpec:
    """A whole random model: the input's per-sample shape, its steps, the seed of its weights and
    inputs, and the scale of its inputs (large ones push fp16 products past 65504, small ones into
    fp16's subnormals)."""

    input_shape: Shape
    blocks: tuple[Block, ...]
    seed: int = 0
    input_scale: float = 1.0

    def shapes(self) -> list[Shape]:
        """Every value's per-sample shape: the input's, then each block's result's."""
        out = [self.input_shape]
        for b in self.blocks:
            out.append(out_shape(out, b))
        return out

    def layer_blocks(self) -> list[int]:
        """Indices of the blocks that are plan layers."""
        return [i for i, b in enumerate(self.blocks) if b.op in ("matmul", "bmm", *LAYER_OPS)]


class FuzzNet(nn.Module):
    """``spec`` as a module. Weighted blocks own a submodule or parameter named ``b{i}``, so capture
    names its layer after the block (``b3``, or ``matmul_2`` for products of activations)."""

    def __init__(self, spec: NetSpec) -> None:
        super().__init__()
        self.spec = spec
        g = torch.Generator().manual_seed(spec.seed)
        shapes = spec.shapes()
        for i, b in enumerate(spec.blocks):
            shape = shapes[i if b.ref is None else b.ref]
            if b.op == "linear":
                out, bias = b.args
                mod: nn.Module = nn.Linear(shape[-1], out, bias=bias)
                _init(mod, g)
                self.add_module(f"b{i}", mod)
            elif b.op == "conv":
                out, k, stride, pad, bias = b.args
                mod = nn.Conv2d(shape[0], out, k, stride=stride, padding=pad, bias=bias)
                _init(mod, g)
                self.add_module(f"b{i}", mod)
            elif b.op in ("offset", "gain"):
                t = torch.randn(shape[-1], generator=g) * 0.5 + (1.0 if b.op == "gain" else 0.0)
                if b.op == "gain":
                    self.register_parameter(f"b{i}", nn.Parameter(t))
                else:
                    self.register_buffer(f"b{i}", t)
            elif b.op == "matmul_w":
                (out,) = b.args
                w = (torch.rand(shape[-1], out, generator=g) * 2 - 1) / math.sqrt(shape[-1])
                self.register_parameter(f"b{i}", nn.Parameter(w))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        vals = [x]
        for i, b in enumerate(self.spec.blocks):
            vals.append(_apply(self, i, b, vals))
        return vals[-1]


def _init(mod: nn.Module, g: torch.Generator) -> None:
    """Seeded weights in nn's default range (uniform, 1/sqrt(fan_in)), independent of the global RNG."""
    with torch.no_grad():
        for p in mod.parameters():
            fan_in = mod.weight[0].numel()
            p.copy_((torch.rand(p.shape, generator=g) * 2 - 1) / math.sqrt(fan_in))


def _apply(net: FuzzNet, i: int, b: Block, vals: list[torch.Tensor]) -> torch.Tensor:
    x = vals[-1]
    other = vals[b.ref] if b.ref is not None else None
    op = b.op
    if op in ("linear", "conv"):
        return getattr(net, f"b{i}")(x if other is None else other)
    if op == "matmul_w":
        return torch.matmul(x if other is None else other, getattr(net, f"b{i}"))
    if op == "matmul":
        return torch.matmul(x, other.transpose(-2, -1))
    if op == "bmm":
        return torch.bmm(x, other.transpose(1, 2))
    if op == "relu":
        return torch.relu(x)
    if op == "gelu":
        return F.gelu(x)
    if op == "sigmoid":
        return torch.sigmoid(x)
    if op == "tanh":
        return torch.tanh(x)
    if op == "neg":
        return -x
    if op == "scale":
        return x * b.args[0]
    if op == "shift":
        return x + b.args[0]
    if op == "offset":
        return x + getattr(net, f"b{i}")
    if op == "gain":
        return x * getattr(net, f"b{i}")
    if op == "add":
        return x + other
    if op == "sub":
        return x - other
    if op == "mul":
        return x * other
    if op == "sum":
        return x.sum(dim=b.args[0] + 1, keepdim=b.args[1])
    if op == "mean":
        return x.mean(dim=b.args[0] + 1, keepdim=b.args[1])
    if op == "softmax":
        return torch.softmax(x, dim=b.args[0] + 1)
    if op == "flatten":
        return x.flatten(1)
    if op == "unflatten":
        return x.unflatten(-1, b.args)
    if op == "reshape":
        return x.reshape(-1, *b.args)
    if op == "permute":
        return x.permute(0, *(d + 1 for d in b.args))
    if op == "transpose":
        return x.transpose(b.args[0] + 1, b.args[1] + 1)
    if op == "cat":
        return torch.cat([x, other], dim=-1)
    raise ValueError(f"unknown fuzz op {op}")


def out_shape(shapes: list[Shape], b: Block) -> Shape:
    """The per-sample shape of ``b``'s result, given every earlier value's (``shapes[-1]``: its input)."""
    op = b.op
    s = shapes[b.ref] if b.ref is not None and op in LAYER_OPS else shapes[-1]
    if op in ("linear", "matmul_w"):
        return s[:-1] + (b.args[0],)
    if op == "conv":
        out, k, stride, pad, _ = b.args
        return (out,) + tuple((d + 2 * pad - k) // stride + 1 for d in s[1:])
    if op in ("matmul", "bmm"):
        return s[:-1] + (shapes[b.ref][-2],)
    if op in ("sum", "mean"):
        dim, keep = b.args
        return tuple(1 if j == dim else d for j, d in enumerate(s)) if keep else s[:dim] + s[dim + 1:]
    if op == "flatten":
        return (math.prod(s),)
    if op == "unflatten":
        return s[:-1] + tuple(b.args)
    if op == "reshape":
        return tuple(b.args)
    if op == "permute":
        return tuple(s[d] for d in b.args)
    if op == "transpose":
        t = list(s)
        i, j = b.args
        t[i], t[j] = t[j], t[i]
        return tuple(t)
    if op == "cat":
        return s[:-1] + (s[-1] + shapes[b.ref][-1],)
    return s  # elementwise (binary ops: x's shape, the other broadcasts to it), softmax


# --- the strategy ------------------------------------------------------------------------------


def _factor_pairs(n: int) -> list[tuple[int, int]]:
    return [(a, n // a) for a in range(2, n) if n % a == 0]


def _broadcasts_to(small: Shape, big: Shape) -> bool:
    return len(small) == len(big) and all(a in (1, b) for a, b in zip(small, big))


def _conv_fits(s: Shape) -> bool:
    return len(s) == 3 and s[1] >= 2 and s[2] >= 2


def _layer(draw: st.DrawFn, s: Shape, ref: int | None, kind: str | None = None) -> Block:
    """A weighted layer on a value of shape ``s`` (``ref``: that value's index when it is not the
    latest; ``kind``: one of :data:`LAYER_OPS`, drawn when None)."""
    if kind is None:
        kind = draw(st.sampled_from(LAYER_OPS if _conv_fits(s) else LAYER_OPS[:2]))
    if kind == "conv":
        k = draw(st.sampled_from([1, 3]))
        pad = draw(st.sampled_from([0, 1])) if k == 3 else 0
        if min(s[1:]) + 2 * pad < k:
            k, pad = 1, 0
        stride = draw(st.sampled_from([1, 2]))
        area = math.prod((d + 2 * pad - k) // stride + 1 for d in s[1:])
        out = draw(st.integers(1, max(1, min(MAX_WIDTH, MAX_ELEMENTS // area))))
        return Block("conv", (out, k, stride, pad, draw(st.booleans())), ref)
    out = draw(st.integers(1, max(1, min(MAX_WIDTH, MAX_ELEMENTS // math.prod(s[:-1])))))
    return Block(kind, (out, draw(st.booleans())) if kind == "linear" else (out,), ref)


@st.composite
def blocks(draw: st.DrawFn, shapes: list[Shape]) -> Block:
    """One step valid on the current value ``shapes[-1]`` (every earlier value's shape given), whose
    result has at most :data:`MAX_ELEMENTS` elements per sample."""
    s = shapes[-1]
    n = len(s)
    rows = math.prod(s[:-1])
    options = ["unary", "scale", "shift", "offset", "gain", "binary", "binary", "softmax"]
    options += ["linear", "matmul_w"] * 3  # layers are what plans are about: drawn about half the time
    if _conv_fits(s):
        options += ["conv"] * 8
    products = [j for j, t in enumerate(shapes)  # x [..., M, K] @ v^T, v [..., N, K] (v may be x)
                if n >= 2 and len(t) == n and t[:-2] == s[:-2] and t[-1] == s[-1] and rows * t[-2] <= MAX_ELEMENTS]
    if products:
        options += ["matmul"] * 2 + (["bmm"] if n == 2 else [])
    if n >= 2:
        options += ["reduce", "reduce", "flatten", "transpose", "permute"]
    if n < 3 and _factor_pairs(s[-1]):
        options.append("unflatten")
    if math.prod(s) > 1:
        options.append("reshape")
    joins = [j for j, t in enumerate(shapes)
             if len(t) == n and t[:-1] == s[:-1] and math.prod(s) + math.prod(t) <= MAX_ELEMENTS]
    if joins:
        options.append("cat")
    if len(shapes) > 1:
        options += ["branch"] * 3
    kind = draw(st.sampled_from(options))
    if kind == "branch":  # a layer that reads an earlier value, not the latest
        joinable = [j for j, t in enumerate(shapes[:-1]) if t[:-1] == s[:-1]]
        if joinable and draw(st.booleans()):  # of the latest's width: net_specs adds it to the latest
            ref = draw(st.sampled_from(joinable))
            if draw(st.booleans()):
                return Block("linear", (s[-1], draw(st.booleans())), ref)
            return Block("matmul_w", (s[-1],), ref)
        ref = draw(st.integers(0, len(shapes) - 2))
        return _layer(draw, shapes[ref], ref)
    if kind in LAYER_OPS:
        return _layer(draw, s, None, kind)
    if kind in ("matmul", "bmm"):
        return Block(kind, (), draw(st.sampled_from(products)))
    if kind == "unary":
        return Block(draw(st.sampled_from(UNARY)))
    if kind == "scale":
        return Block("scale", (draw(st.sampled_from([0.5, 0.375, 1.7, -3.0])),))
    if kind == "shift":
        return Block("shift", (draw(st.sampled_from([1.0, -0.25, 3.3])),))
    if kind in ("offset", "gain"):
        return Block(kind)
    if kind == "binary":
        refs = [j for j, t in enumerate(shapes) if _broadcasts_to(t, s)]  # x itself at least
        return Block(draw(st.sampled_from(BINARY)), (), draw(st.sampled_from(refs)))
    if kind == "softmax":
        return Block("softmax", (draw(st.integers(0, n - 1)),))
    if kind == "reduce":
        return Block(draw(st.sampled_from(REDUCE)), (draw(st.integers(0, n - 1)), draw(st.booleans())))
    if kind == "flatten":
        return Block("flatten")
    if kind == "transpose":
        i, j = draw(st.lists(st.integers(0, n - 1), min_size=2, max_size=2, unique=True))
        return Block("transpose", (i, j))
    if kind == "permute":
        return Block("permute", tuple(draw(st.permutations(range(n)))))
    if kind == "unflatten":
        return Block("unflatten", draw(st.sampled_from(_factor_pairs(s[-1]))))
    if kind == "reshape":
        total = math.prod(s)
        return Block("reshape", draw(st.sampled_from([(total,)] + _factor_pairs(total))))
    if kind == "cat":
        return Block("cat", (), draw(st.sampled_from(joins)))
    raise AssertionError(kind)


@st.composite
def net_specs(draw: st.DrawFn, min_blocks: int = 2, max_blocks: int = 8) -> NetSpec:
    """A random :class:`NetSpec` with at least one plan layer: a vector, sequence or image input,
    then ``min_blocks``..``max_blocks`` steps."""
    input_shape = draw(st.one_of(
        st.tuples(st.integers(1, MAX_WIDTH)),
        st.tuples(st.integers(1, 6), st.integers(1, MAX_WIDTH)),
        st.tuples(st.integers(1, 3), st.integers(2, 6), st.integers(2, 6)),
    ))
    shapes = [input_shape]
    chosen: list[Block] = []
    count = draw(st.integers(min_blocks, max_blocks))
    while len(chosen) < count:
        b = draw(blocks(shapes))
        chosen.append(b)
        shapes.append(out_shape(shapes, b))
        if b.op in LAYER_OPS and b.ref is not None and shapes[-1] == shapes[-2]:
            chosen.append(Block("add", (), len(shapes) - 2))  # join the branch: x + layer(earlier value)
            shapes.append(shapes[-2])
    if not any(b.op in ("matmul", "bmm", *LAYER_OPS) for b in chosen):  # every model has a layer
        chosen.append(_layer(draw, shapes[-1], None, "linear"))
    return NetSpec(input_shape, tuple(chosen), draw(st.integers(0, 2**16)),
                   draw(st.sampled_from([1.0, 1.0, 2.0 ** -6, 300.0])))
