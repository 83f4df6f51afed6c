"""Batch norm folding (autoprec.core.bn_fold): one fp32 definition, applied by the torch capture, the
torch model's ONNX export and the ONNX analyser; the ops after, the numerics and the validity."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from onnx import helper

from autoprec.core.bn_fold import fold_batch_norm, folded_bias_name
from autoprec.torch.capture import capture
from autoprec.core.errors import UsageError
from autoprec.deploy.export import apply_plan_onnx, torch_to_onnx
from autoprec.core.formats import Precision
from autoprec.onnx.graph import analyse_onnx
from autoprec.core.opgraph import Policy
from tests.onnx_graph.onnx_graph_models import init, make, run, vi


def _randomise(bn: nn.Module, g: torch.Generator) -> None:
    """Trained-looking statistics, so that a fold changes the weights."""
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(bn.num_features, generator=g))
        bn.running_var.copy_(0.5 + torch.rand(bn.num_features, generator=g) * 2)
        if bn.affine:
            bn.weight.copy_(torch.randn(bn.num_features, generator=g))
            bn.bias.copy_(torch.randn(bn.num_features, generator=g))


class ConvNorms(nn.Module):
    """Every case a fold meets: a convolution without a bias (b1), one with a bias before a norm
    without affine parameters (b2), a norm whose convolution's output is also read elsewhere (b3:
    stays), a functional ``F.batch_norm`` (folds), and a BatchNorm1d after a linear layer (stays)."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.c1, self.b1 = nn.Conv2d(3, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6)
        self.c2, self.b2 = nn.Conv2d(6, 6, 3, padding=1), nn.BatchNorm2d(6, affine=False)
        self.c3, self.b3 = nn.Conv2d(6, 6, 1), nn.BatchNorm2d(6)
        self.c4 = nn.Conv2d(6, 4, 1, groups=2)
        self.fc, self.b5 = nn.Linear(4 * 4 * 4, 10), nn.BatchNorm1d(10)
        for bn in (self.b1, self.b2, self.b3, self.b5):
            _randomise(bn, g)
        self.register_buffer("mean4", torch.randn(4, generator=g))
        self.register_buffer("var4", 0.5 + torch.rand(4, generator=g))
        self.gamma4 = nn.Parameter(torch.randn(4, generator=g))
        self.beta4 = nn.Parameter(torch.randn(4, generator=g))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.b1(self.c1(x)))
        y = torch.relu(self.b2(self.c2(y)))
        z = self.c3(y)
        y = self.b3(z) + z
        y = F.batch_norm(self.c4(y), self.mean4, self.var4, self.gamma4, self.beta4, training=False, eps=1e-3)
        y = F.max_pool2d(y, 2)
        return self.b5(self.fc(y.flatten(1)))


@pytest.fixture
def model() -> ConvNorms:
    return ConvNorms().eval()


@pytest.fixture
def x() -> torch.Tensor:
    return torch.randn(5, 3, 8, 8, generator=torch.Generator().manual_seed(1))


def _rel(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray) -> float:
    a, b = torch.as_tensor(np.asarray(a)), torch.as_tensor(np.asarray(b))
    return float((a - b).norm() / b.norm())


def test_the_fold_is_the_norm_after_the_convolution_in_fp32() -> None:
    g = torch.Generator().manual_seed(2)
    w, b = torch.randn(5, 3, 3, 3, generator=g), torch.randn(5, generator=g)
    mean, var = torch.randn(5, generator=g), 0.1 + torch.rand(5, generator=g)
    gamma, beta = torch.randn(5, generator=g), torch.randn(5, generator=g)
    x = torch.randn(2, 3, 6, 6, generator=g)
    ref = F.batch_norm(F.conv2d(x, w, b), mean, var, gamma, beta, training=False, eps=1e-5)
    fw, fb = fold_batch_norm(w.numpy(), b.numpy(), mean.numpy(), var.numpy(), gamma.numpy(), beta.numpy(), 1e-5)
    assert fw.dtype == fb.dtype == np.float32 and fw.shape == (5, 3, 3, 3) and fb.shape == (5,)
    assert _rel(F.conv2d(x, torch.from_numpy(fw), torch.from_numpy(fb)), ref) < 1e-6
    # missing parameters are a zero bias, a unit scale and a zero shift
    zero, one = np.zeros(5, np.float32), np.ones(5, np.float32)
    a = fold_batch_norm(w.numpy(), None, mean.numpy(), var.numpy(), None, None, 1e-5)
    e = fold_batch_norm(w.numpy(), zero, mean.numpy(), var.numpy(), one, zero, 1e-5)
    assert all(np.array_equal(p, q) for p, q in zip(a, e))
    assert folded_bias_name("layer1.0.conv1.weight") == "layer1.0.conv1.bias"
    assert folded_bias_name("onnx::Conv_7") == "onnx::Conv_7.bias"


def test_capture_folds_each_norm_that_alone_reads_a_convolution(model: ConvNorms, x: torch.Tensor) -> None:
    before = {k: v.clone() for k, v in model.state_dict().items()}
    c = capture(model, (x,))
    assert c.folded_norms == (("c1", "b1"), ("c2", "b2"), ("c4", "batch_norm"))
    assert "b1 into c1, b2 into c2, batch_norm into c4" in c.notes()[0]  # the report says so
    norms = [op.name for op in c.graph.nodes if op.kind == "batch_norm"]
    assert norms == ["b3", "b5"] and all(c.graph[n].policy is Policy.NEVER for n in norms)
    assert c.graph.successors("c1") == ["relu"]  # the 16-bit chain conv -> relu has no norm between
    assert [op.name for op in c.graph.layers()] == ["c1", "c2", "c3", "c4", "fc"]
    with torch.no_grad():
        assert _rel(c.gm(x), model(x)) < 1e-6
    params = dict(c.gm.named_parameters())
    assert "c1.bias" in params and "b1.weight" not in params
    # the user's model keeps its weights, its norms and no new bias
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()) and model.c1.bias is None
    kept = capture(model, (x,), fold_norms=False)
    assert kept.folded_norms == () and sum(op.kind == "batch_norm" for op in kept.graph.nodes) == 5


def test_torch_export_capture_folds_the_same_weights(model: ConvNorms, x: torch.Tensor) -> None:
    fx_c, ex_c = capture(model, (x,), method="fx"), capture(model, (x,), method="export")
    assert ex_c.method == "export" and len(ex_c.folded_norms) == 3
    fx_w, ex_w = dict(fx_c.gm.named_parameters()), dict(ex_c.gm.named_parameters())
    for name in ("c1.weight", "c1.bias", "c2.weight", "c2.bias", "c4.weight", "c4.bias"):
        assert torch.equal(fx_w[name], ex_w[name]), name


def test_onnx_export_folds_bit_for_bit_as_the_capture(model: ConvNorms, x: torch.Tensor) -> None:
    c = capture(model, (x,))
    fp32 = torch_to_onnx(model, (x,))
    onnx.checker.check_model(fp32, full_check=True)
    assert sum(n.op_type == "BatchNormalization" for n in fp32.graph.node) == 2  # b3 and b5
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in fp32.graph.initializer}
    params = dict(c.gm.named_parameters())
    for name in ("c1.weight", "c1.bias", "c2.weight", "c2.bias", "c4.weight", "c4.bias"):
        assert np.array_equal(inits[name], params[name].detach().numpy()), name
    assert not any(k.startswith("b1.") or k.startswith("b2.") for k in inits)
    (y,) = run(fp32, {"x": x.numpy()})
    with torch.no_grad():
        assert _rel(y, c.gm(x)) < 1e-6
    # the plan maps onto the folded export (MapLayers checks every weight bit for bit)
    fp16 = apply_plan_onnx(fp32, c, {n: Precision.FP16 for n in c.graph.layer_names()})
    onnx.checker.check_model(fp16, full_check=True)
    producers = {o: n for n in fp16.graph.node for o in n.output}
    relu = next(n for n in fp16.graph.node if n.op_type == "Relu")
    assert producers[relu.input[0]].op_type == "Add"  # c1's 16-bit bias Add: no norm, no Cast between
    assert producers[producers[relu.input[0]].input[0]].op_type == "Conv"
    # a capture that kept its norms (for training) describes another graph than the export: one line says so
    with pytest.raises(UsageError, match=r"kept its batch norms \(b1, b2, batch_norm; .*fold_norms=True"):
        apply_plan_onnx(fp32, capture(model, (x,), fold_norms=False), {n: Precision.FP16 for n in c.graph.layer_names()})


def _onnx_conv_norms() -> onnx.ModelProto:
    """x -> Conv(no bias) -> BN -> Relu -> Conv(bias) -> y1, BN(training_mode=0) after a Conv whose
    output is also a graph output (stays), as other software writes them (opset 15)."""
    rng = np.random.default_rng(3)

    def bn_params(p: str, n: int) -> list[onnx.TensorProto]:
        return [init(f"{p}_s", rng.standard_normal(n).astype(np.float32)),
                init(f"{p}_b", rng.standard_normal(n).astype(np.float32)),
                init(f"{p}_m", rng.standard_normal(n).astype(np.float32)),
                init(f"{p}_v", (0.5 + rng.random(n)).astype(np.float32))]

    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c1", "n1_s", "n1_b", "n1_m", "n1_v"], ["n1"], name="bn1",
                         epsilon=1e-3),
        helper.make_node("Relu", ["n1"], ["r"], name="relu"),
        helper.make_node("Conv", ["r", "w2", "b2"], ["c2"], name="conv2"),
        helper.make_node("BatchNormalization", ["c2", "n2_s", "n2_b", "n2_m", "n2_v"], ["y"], name="bn2"),
    ]
    inits = [init("w1", rng.standard_normal((4, 3, 3, 3)).astype(np.float32)),
             init("w2", rng.standard_normal((4, 4, 1, 1)).astype(np.float32)),
             init("b2", rng.standard_normal(4).astype(np.float32))] + bn_params("n1", 4) + bn_params("n2", 4)
    return make(nodes, [vi("x", ["N", 3, 6, 6])], [vi("y", ["N", 4, 6, 6]), vi("c2", ["N", 4, 6, 6])], inits,
                opset=15)


def test_onnx_input_folds_norms_in_preprocessing() -> None:
    source = _onnx_conv_norms()
    x = np.random.default_rng(4).standard_normal((2, 3, 6, 6)).astype(np.float32)
    a = analyse_onnx(source, batch=2)
    assert [n.op_type for n in a.model.graph.node] == ["Conv", "Relu", "Conv", "BatchNormalization"]
    assert any("folded 1 batch norm" in n for n in a.notes)
    assert len(source.graph.node) == 5  # the caller's model is not modified
    conv1 = a.model.graph.node[0]
    assert list(conv1.input) == ["x", "w1", "w1.bias"] and list(conv1.output) == ["n1"]
    assert not any(t.name.startswith("n1_") for t in a.model.graph.initializer)
    onnx.checker.check_model(a.model, full_check=True)
    for got, want in zip(run(a.model, {"x": x}), run(source, {"x": x})):
        assert _rel(got, want) < 1e-6
    assert [op.name for op in a.graph.layers()] == ["conv1", "conv2"]
