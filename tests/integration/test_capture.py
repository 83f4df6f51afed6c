"""Capture: fx first, torch.export where fx cannot see the layers; the op graph's contents."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from autoprec.torch.capture import capture
from autoprec.core.errors import CaptureError
from autoprec.core.formats import Precision
from autoprec.core.lowering import lower
from autoprec.core.opgraph import OpGraph, Policy


def test_fx_capture_of_attention_block(tiny_attention: nn.Module) -> None:
    x = torch.randn(2, 8, 32)
    c = capture(tiny_attention, (x,), name="tiny")
    assert c.method == "fx"
    layers = c.graph.layers()
    assert [op.kind for op in layers] == ["linear"] * 3 + ["matmul", "matmul"] + ["linear"] * 4
    assert [op.scope for op in layers if op.kind == "linear"] == ["q", "k", "v", "o", "fc1", "fc2", "head"]
    # the normalised module computes exactly what the model does
    torch.testing.assert_close(c.gm(x), tiny_attention(x), rtol=0, atol=0)
    q = c.graph["q"]
    assert q.flops == 2 * 2 * 8 * 32 * 32 and q.weight_elems == 32 * 32 + 32 and q.weight == "q.weight"
    assert q.input_shapes[0] == (2, 8, 32) and q.output_shape == (2, 8, 32)
    assert c.graph["softmax"].policy is Policy.NEVER
    assert c.graph["ln"].policy is Policy.NEVER
    assert c.graph["gelu"].policy is Policy.FOLLOW
    assert c.graph.ties == [["q", "k", "v"]]  # same input, same shape: one fused GEMM when deployed


def test_follow_ops_pass_a_layers_format_on(tiny_attention: nn.Module) -> None:
    c = capture(tiny_attention, (torch.randn(2, 8, 32),))
    casts = lower(c.graph, {n: Precision.BF16 for n in c.graph.layer_names()}).casts
    readers = {r for cast in casts for r in cast.readers}
    assert "matmul" not in readers  # q and k reach it in bf16 through view/transpose
    assert "fc2" not in readers  # fc1's bf16 value reaches it through GELU
    ln = [cast for cast in casts if cast.value == "ln"]  # LayerNorm (NEVER) output is fp32: one cast
    assert len(ln) == 1 and {"q", "k", "v"} <= set(ln[0].readers) and ln[0].to is Precision.BF16


def test_cnn_capture_batchnorm_residual(tiny_cnn: nn.Module) -> None:
    c = capture(tiny_cnn, (torch.randn(3, 1, 8, 8),))
    assert [op.name for op in c.graph.layers()] == ["conv1", "conv2", "fc"]
    assert c.graph["conv2"].flops == 2 * (3 * 8 * 8 * 8) * (8 * 3 * 3)
    assert c.folded_norms == (("conv1", "bn"),) and "bn" not in c.graph  # folded (test_bn_fold.py)
    assert c.graph["add"].policy is Policy.FOLLOW
    # runs at another batch size than the example
    torch.testing.assert_close(c.gm(torch.ones(5, 1, 8, 8)), tiny_cnn(torch.ones(5, 1, 8, 8)))


def test_export_fallback_for_opaque_torch_modules(encoder_layer: nn.Module) -> None:
    m = encoder_layer
    x = torch.randn(2, 5, 16)
    c = capture(m, (x,))
    assert c.method == "export"
    scopes = [op.scope for op in c.graph.layers()]
    assert "enc.linear1" in scopes and "enc.linear2" in scopes and "head" in scopes
    torch.testing.assert_close(c.gm(torch.randn(3, 5, 16)).shape, torch.Size([3, 5, 4]))
    with pytest.raises(CaptureError, match="fx stops at enc"):
        capture(m, (x,), method="fx")


def test_uncapturable_model_gives_one_line_error() -> None:
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.l = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.sum().item() > 0:  # data-dependent: neither fx nor export can capture it
                return self.l(x)
            return x

    with pytest.raises(CaptureError) as info:
        capture(Branchy(), (torch.ones(2, 4),))
    assert "\n" not in str(info.value) and "fx:" in str(info.value) and "export:" in str(info.value)


def test_opgraph_json_round_trip(tiny_attention: nn.Module) -> None:
    g = capture(tiny_attention, (torch.randn(2, 8, 32),)).graph
    back = OpGraph.from_json(g.to_json())
    assert back.to_json() == g.to_json()
    assert back.fingerprint() == g.fingerprint()
    assert back.layer_names() == g.layer_names()


@pytest.mark.parametrize("method", ["fx", "export"])
def test_embedding_lookups_are_layers(tiny_lm: nn.Module, token_batches, method: str) -> None:
    """nn.Embedding (fx) and aten.embedding (torch.export) both become F.embedding(indices, table)
    layers: a weight, no floating input, no FLOPs, rows copied to the output."""
    (x,) = token_batches[0]
    c = capture(tiny_lm, (x,), method=method)
    lookups = [op for op in c.graph.layers() if op.kind == "embedding"]
    assert [(op.scope, op.weight, op.weight_elems) for op in lookups] == [("tok", "tok.weight", 20 * 16),
                                                                          ("pos", "pos.weight", 8 * 16)]
    tok, pos = lookups
    assert tok.flops == pos.flops == 0 and tok.act_in_elems == pos.act_in_elems == 0
    assert tok.act_out_elems == 4 * 6 * 16 and pos.output_shape == (6, 16)
    for op in lookups:
        node = c.node(op.name)
        assert node.target is nn.functional.embedding and node.args[1].op == "get_attr"
    assert not c.graph.ties  # lookups fuse into no GEMM
    casts = lower(c.graph, {n: Precision.BF16 for n in c.graph.layer_names()}).casts
    assert casts and all(r not in ("tok", "pos") for cast in casts for r in cast.readers)  # they read no floats
    torch.testing.assert_close(c.gm(x), tiny_lm(x), rtol=0, atol=0)


def test_embedding_that_renormalises_its_table_stays_fp32() -> None:
    class Renorm(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(10, 4, max_norm=1.0)  # rewrites its own rows at each lookup

        def forward(self, idx: torch.Tensor) -> torch.Tensor:
            return self.emb(idx)

    c = capture(Renorm(), (torch.randint(0, 10, (2, 3)),))
    assert not c.graph.layers() and c.graph["emb"].policy is Policy.NEVER
