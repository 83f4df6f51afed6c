"""Recurrent layers written out: ``nn.LSTM`` and ``nn.GRU`` as the products a GPU kernel computes.

A recurrent kernel (cuDNN's) computes, per layer and direction, one GEMM of the input sequence with
``W_ih`` for all time steps at once, then per step one GEMM of the previous hidden state with
``W_hh``, and the gates between them elementwise. Those GEMMs hold all of the module's FLOPs and
weights, so the search must be able to give them formats, as it does to any linear layer. The
module's forward hides them in one opaque op (``aten.lstm`` / ``aten.gru``, ONNX LSTM / GRU).

While a model is traced -- by the capture (:func:`autoprec.torch.capture.capture`) and by the ONNX
export of the same model (:func:`autoprec.deploy.export.torch_to_onnx`) -- :func:`explicit_recurrence`
makes ``nn.LSTM`` and ``nn.GRU`` compute their forward as :func:`recurrent_products`: the input
product is one ``F.linear`` layer over the whole sequence, each step's hidden product is one
``F.linear`` layer, and the gates are torch's own cell arithmetic. Every step's hidden product reads
the same stored ``W_hh``, so the capture ties them (one stored tensor: one format, stored once) and
the plan has one decision per weight. Both traces run the same Python, so the captured layers and
the exported ONNX Gemm/MatMul nodes pair up in order as every other layer does. The loop runs over
the concrete sequence length: torch.fx's symbolic trace, whose lengths are proxies, cannot unroll
it and keeps the module as a leaf, which the capture treats as opaque and falls back to
torch.export (concrete shapes but for the batch): the captured model and the exported ONNX file
run the example's sequence length, as a deployed unrolled graph does. The user's model is not
changed: the forward methods are restored when the trace ends.

A module the explicit form does not cover (an LSTM with ``proj_size``, a ``PackedSequence`` input)
runs its own forward and stays one fp32 op, as the coverage report then says.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

#: a cell step: (this step's input product, its hidden product, the state) -> the new state,
#: hidden state first
Cell = Callable[[torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...]], tuple[torch.Tensor, ...]]


def lstm_cell(gi: torch.Tensor, gh: torch.Tensor, state: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """One LSTM step as torch's cell computes it: gates i, f, g, o; ``c' = f c + i g``, ``h' = o tanh(c')``."""
    _, c = state
    i, f, g, o = (gi + gh).chunk(4, dim=-1)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(c), c


def gru_cell(gi: torch.Tensor, gh: torch.Tensor, state: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """One GRU step as torch's cell computes it: gates r, z, n, the hidden bias of n inside ``r * (...)``
    (it is part of the hidden product); ``h' = n + z (h - n)``."""
    (h,) = state
    i_r, i_z, i_n = gi.chunk(3, dim=-1)
    h_r, h_z, h_n = gh.chunk(3, dim=-1)
    r = torch.sigmoid(i_r + h_r)
    z = torch.sigmoid(i_z + h_z)
    n = torch.tanh(i_n + r * h_n)
    return (n + z * (h - n),)


def explicit_supported(module: nn.Module, input: Any) -> bool:
    """Whether :func:`recurrent_products` computes ``module(input)``: an ``nn.LSTM`` without
    projections or an ``nn.GRU``, on a batched (3-D) or unbatched (2-D) tensor."""
    if isinstance(module, nn.LSTM) and module.proj_size > 0:
        return False
    return isinstance(module, (nn.LSTM, nn.GRU)) and isinstance(input, torch.Tensor) and input.dim() in (2, 3)


def recurrent_products(module: nn.LSTM | nn.GRU, input: torch.Tensor,
                       hx: torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[Any, Any]:
    """``module(input, hx)`` for an ``nn.LSTM`` or ``nn.GRU`` (:func:`explicit_supported`), as explicit ops.

    Returns what the module returns: ``(output, (h_n, c_n))`` for an LSTM, ``(output, h_n)`` for a GRU.
    Per layer and direction: ``F.linear(x, W_ih, b_ih)`` over all steps, then per step (backwards
    for the reverse direction) ``F.linear(h, W_hh, b_hh)`` and the cell. Missing initial states are
    zeros, as in the module. Dropout applies between layers only while training, as in the module.
    """
    lstm = isinstance(module, nn.LSTM)
    cell: Cell = lstm_cell if lstm else gru_cell
    batched = input.dim() == 3
    states: tuple[torch.Tensor, ...]
    if hx is None:
        states = ()
    else:
        states = tuple(hx) if lstm else (hx,)
    if not batched:  # one sequence: a batch of one, as the module does it
        input = input.unsqueeze(0 if module.batch_first else 1)
        states = tuple(s.unsqueeze(1) for s in states)
    time_dim = 1 if module.batch_first else 0
    steps, batch = input.size(time_dim), input.size(1 - time_dim)
    directions = 2 if module.bidirectional else 1
    if not states:
        zeros = input.new_zeros(module.num_layers * directions, batch, module.hidden_size)
        states = (zeros, zeros) if lstm else (zeros,)
    x = input
    finals: list[tuple[torch.Tensor, ...]] = []
    for layer in range(module.num_layers):
        outputs = []
        for direction in range(directions):
            suffix = f"_l{layer}" + ("_reverse" if direction else "")
            weight_ih, weight_hh = getattr(module, "weight_ih" + suffix), getattr(module, "weight_hh" + suffix)
            bias_ih = getattr(module, "bias_ih" + suffix) if module.bias else None
            bias_hh = getattr(module, "bias_hh" + suffix) if module.bias else None
            gi = F.linear(x, weight_ih, bias_ih)
            state = tuple(s[layer * directions + direction] for s in states)
            hs: list[torch.Tensor] = []
            for t in (reversed(range(steps)) if direction else range(steps)):
                state = cell(gi.select(time_dim, t), F.linear(state[0], weight_hh, bias_hh), state)
                hs.append(state[0])
            outputs.append(torch.stack(hs[::-1] if direction else hs, dim=time_dim))
            finals.append(state)
        x = outputs[0] if directions == 1 else torch.cat(outputs, dim=-1)
        if module.training and module.dropout > 0 and layer < module.num_layers - 1:
            x = F.dropout(x, module.dropout, training=True)
    last = tuple(torch.stack([f[k] for f in finals]) for k in range(len(finals[0])))
    if not batched:
        x = x.squeeze(0 if module.batch_first else 1)
        last = tuple(s.squeeze(1) for s in last)
    return x, (last if lstm else last[0])


@contextlib.contextmanager
def explicit_recurrence() -> Iterator[list[nn.Module]]:
    """Run ``nn.LSTM`` and ``nn.GRU`` forwards as :func:`recurrent_products` inside the block.

    Patched on the two classes (and so on subclasses that keep their forward), restored on exit.
    Yields the list of modules that ran explicitly, in the order they first ran, for the capture's
    notes; a module :func:`explicit_supported` refuses runs its own forward."""
    originals = {cls: cls.forward for cls in (nn.LSTM, nn.GRU)}
    unrolled: list[nn.Module] = []

    def forward(self: nn.LSTM | nn.GRU, input: Any, hx: Any = None) -> Any:
        if not explicit_supported(self, input):
            return originals[nn.LSTM if isinstance(self, nn.LSTM) else nn.GRU](self, input, hx)
        if not any(m is self for m in unrolled):
            unrolled.append(self)
        return recurrent_products(self, input, hx)

    for cls in originals:
        cls.forward = forward  # type: ignore[method-assign]
    try:
        yield unrolled
    finally:
        for cls, original in originals.items():
            cls.forward = original  # type: ignore[method-assign]
