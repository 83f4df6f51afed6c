"""nn.LSTM / nn.GRU written out as their products (autoprec.torch.recurrent): the same numbers as the
modules, linear layers in the capture with each layer's hidden products tied, the modules restored,
and the cases the explicit form does not cover left as one fp32 op that the coverage names."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from torch.nn.utils.rnn import pack_padded_sequence

from autoprec.core.coverage import coverage
from autoprec.core.opgraph import Policy
from autoprec.torch.capture import capture
from autoprec.torch.recurrent import explicit_recurrence, recurrent_products

#: (module class, keyword arguments, batched input, initial state given)
CONFIGS = [
    (nn.LSTM, {"num_layers": 2, "batch_first": True}, True, False),
    (nn.LSTM, {"bidirectional": True, "bias": False}, True, True),
    (nn.LSTM, {"num_layers": 2, "bidirectional": True, "batch_first": True, "dropout": 0.5}, False, True),
    (nn.GRU, {"num_layers": 2, "bidirectional": True}, True, False),
    (nn.GRU, {"batch_first": True, "bias": False}, True, True),
    (nn.GRU, {"num_layers": 2}, False, False),
]


def _flat(result: tuple) -> list[torch.Tensor]:
    out, state = result
    return [out, *state] if isinstance(state, tuple) else [out, state]


@pytest.mark.parametrize("cls, kwargs, batched, given", CONFIGS)
def test_explicit_forward_equals_the_module(cls: type, kwargs: dict, batched: bool, given: bool) -> None:
    """To float rounding in fp32, outputs and final states alike (dropout is off in eval mode)."""
    torch.manual_seed(0)
    m = cls(12, 16, **kwargs).eval()
    x = torch.randn(8, 12)  # 8 steps, 3 sequences (time first unless batch_first)
    if batched:
        x = torch.randn(3, 8, 12) if m.batch_first else torch.randn(8, 3, 12)
    hx = None
    if given:
        rows = m.num_layers * (2 if m.bidirectional else 1)
        shape = (rows, 3, 16) if batched else (rows, 16)
        hx = (torch.randn(shape), torch.randn(shape)) if cls is nn.LSTM else torch.randn(shape)
    with torch.no_grad():
        want, got = _flat(m(x, hx)), _flat(recurrent_products(m, x, hx))
    for w, g in zip(want, got, strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-6)


@pytest.mark.filterwarnings("ignore:LSTM with projections is not supported with oneDNN")
def test_uncovered_modules_run_their_own_forward_and_classes_are_restored() -> None:
    forwards = (nn.LSTM.forward, nn.GRU.forward)
    projected = nn.LSTM(12, 16, proj_size=8).eval()
    plain = nn.GRU(12, 16).eval()
    x = torch.randn(8, 3, 12)
    packed = pack_padded_sequence(x, torch.tensor([8, 5, 2]))
    with torch.no_grad():
        want = projected(x)[0], plain(packed)[0].data
        with explicit_recurrence() as unrolled:
            got = projected(x)[0], plain(packed)[0].data
            plain(x)
    assert unrolled == [plain]  # only the batched tensor input was written out
    assert (nn.LSTM.forward, nn.GRU.forward) == forwards
    for w, g in zip(want, got, strict=True):
        assert torch.equal(w, g)


class Tagger(nn.Module):
    def __init__(self, rnn: nn.Module) -> None:
        super().__init__()
        self.rnn = rnn
        self.head = nn.Linear(2 * rnn.hidden_size if rnn.bidirectional else rnn.hidden_size, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(x)[0])


def test_capture_offers_the_products_as_linear_layers_with_the_steps_tied() -> None:
    """fx stops at the module (a leaf it cannot see into) and torch.export unrolls the 6 steps: per
    layer one input product and one hidden product per step, each layer's steps tied (one stored
    weight); the capture runs other batch sizes and computes what the model does."""
    torch.manual_seed(0)
    model = Tagger(nn.LSTM(8, 16, num_layers=2, batch_first=True)).eval()
    c = capture(model, (torch.randn(2, 6, 8),))
    assert c.method == "export" and c.unrolled == ("rnn",)
    assert "unrolled 1 recurrent module(s) over the example's time steps: rnn" in c.notes()[0]
    layers = c.graph.layers()
    assert [op.kind for op in layers] == ["linear"] * 15
    assert [op.weight for op in layers] == (["rnn.weight_ih_l0"] + ["rnn.weight_hh_l0"] * 6
                                            + ["rnn.weight_ih_l1"] + ["rnn.weight_hh_l1"] * 6 + ["head.weight"])
    names = [op.name for op in layers]
    assert c.graph.ties == [names[1:7], names[8:14]]
    x = torch.randn(5, 6, 8)
    with torch.no_grad():
        torch.testing.assert_close(c.gm(x), model(x), rtol=0, atol=1e-6)
    assert "lstm" not in {op.kind for op in c.graph}


def test_both_directions_read_one_input_product_and_keep_their_own_steps() -> None:
    """A bidirectional GRU: the two input products read the same tensor with the same weight shape
    (one fused GEMM when deployed: tied); each direction's steps are tied among themselves only."""
    model = Tagger(nn.GRU(8, 16, bidirectional=True)).eval()
    c = capture(model, (torch.randn(4, 2, 8),))
    by_weight = {op.weight: op.name for op in c.graph.layers()}
    forward_in, reverse_in = by_weight["rnn.weight_ih_l0"], by_weight["rnn.weight_ih_l0_reverse"]
    ties = [set(t) for t in c.graph.ties]
    assert {forward_in, reverse_in} in ties and len(ties) == 3
    assert sorted(len(t) for t in ties) == [2, 4, 4]


def test_a_projected_lstm_stays_one_fp32_op_that_the_coverage_names() -> None:
    model = Tagger(nn.LSTM(8, 32, proj_size=16, batch_first=True)).eval()
    model.head = nn.Linear(16, 5)
    c = capture(model, (torch.randn(2, 6, 8),))
    assert c.unrolled == () and c.notes() == []
    lstm = [op for op in c.graph if op.kind == "lstm"]
    assert len(lstm) == 1 and lstm[0].policy is Policy.NEVER
    assert [op.weight for op in c.graph.layers()] == ["head.weight"]
    line = coverage(c.graph).line()
    assert "fp32 always: lstm x1" in line and "a recurrent op autoprec does not write out as layers" in line, line
