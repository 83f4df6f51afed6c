"""ConvTranspose layers through the ONNX passes and as layers of .onnx inputs.

``ExactDecoder`` computes only exact fp32 sums (small integer inputs, integer weights with a +-7 in
every output channel, so each fp8 weight scale is 7/448 = 2^-6, and biases in quarters): ONNX
Runtime and torch then compute the same fp32 values in any order, and the emulation graph must
equal the torch emulation bit for bit. Its grouped layer has 2 groups of 3 output channels, so a
scale per (group, column) is not a scale per column.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from deploy_models import integer_input
from onnx import TensorProto, numpy_helper
from torch import nn

from autoprec.cli import main
from autoprec.core.errors import PlanError
from autoprec.core.formats import Precision
from autoprec.core.plan import PrecisionPlan
from autoprec.deploy.export import apply_plan_onnx, torch_to_onnx
from autoprec.onnx.graph import analyse_onnx
from autoprec.onnx.passes.base import INSERTED, LAYER, ROLE, ROLE_CORE, attr, get_meta
from autoprec.ort import providers
from autoprec.ort.runtime import open_session
from autoprec.torch.capture import capture
from autoprec.torch.passes import apply_plan
from autoprec.torch.semantics import quantize_weight, weight_channels

BF16, FP16, E4M3, E5M2 = Precision.BF16, Precision.FP16, Precision.FP8_E4M3, Precision.FP8_E5M2
BACKEND = Path(onnx.__file__).resolve().parent / "backend" / "test" / "data"


def _exact_weight(c_in: int, per_group: int, groups: int, *kernel: int, seed: int) -> torch.Tensor:
    """Integers in [-7, 7] with a +-7 in every output channel (each (group, column) slice)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randint(-7, 8, (c_in, per_group, *kernel), generator=g).float()
    rows = c_in // groups
    for group in range(groups):
        for j in range(per_group):
            block = w[group * rows:(group + 1) * rows, j].reshape(-1)
            block[int(torch.randint(0, block.numel(), (), generator=g))] = 7.0 if (group + j) % 2 else -7.0
    return w


class ExactDecoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(2, 4, 3, stride=2, padding=1, output_padding=1)
        self.up_g = nn.ConvTranspose2d(4, 6, 2, stride=2, groups=2, bias=False)
        self.up1 = nn.ConvTranspose1d(2, 3, 3, stride=2)
        with torch.no_grad():
            self.up.weight.copy_(_exact_weight(2, 4, 1, 3, 3, seed=1))
            self.up.bias.copy_(torch.tensor([30.25, -1.5, 0.75, -12.5]))
            self.up_g.weight.copy_(_exact_weight(4, 3, 2, 2, 2, seed=2))
            self.up1.weight.copy_(_exact_weight(2, 3, 1, 3, seed=3))
            self.up1.bias.copy_(torch.tensor([2.25, -1000.375, 0.5]))  # rounded in 16 bits

    def forward(self, x: torch.Tensor, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.up_g(torch.relu(self.up(x))), self.up1(s)


@pytest.fixture(scope="module")
def decoder():
    module = ExactDecoder().eval()
    inputs = (integer_input((3, 2, 4, 4), seed=4, high=3), integer_input((3, 2, 6), seed=5, high=3))
    c = capture(module, inputs)
    # amax 448 * 2^k: static fp8 activation scales that are powers of two keep the arithmetic exact
    amax = {"up": (448.0 / 64,), "up_g": (448.0,), "up1": (448.0 / 64,)}
    return c, torch_to_onnx(module, inputs), inputs, amax


def _plan(c, fmt: Precision) -> dict[str, Precision]:
    return {name: fmt for name in c.graph.layer_names()}


def _by_layer(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    return {get_meta(n, LAYER): n for n in model.graph.node if get_meta(n, ROLE) == ROLE_CORE}


def _dequantized(model: onnx.ModelProto, dq: onnx.NodeProto) -> np.ndarray:
    """What a DequantizeLinear of initializers computes, by ONNX's definition (per axis or blocked)."""
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    codes, scale = inits[dq.input[0]].astype(np.float32), inits[dq.input[1]]
    axis, block = attr(dq, "axis", 1), attr(dq, "block_size", 0)
    if block:
        scale = np.repeat(scale, block, axis=axis)
    else:
        shape = [1] * codes.ndim
        shape[axis] = -1
        scale = scale.reshape(shape)
    return codes * scale


@pytest.mark.parametrize("mode", ["deploy", "emulate"])
@pytest.mark.parametrize("fmt", [BF16, FP16, E4M3, E5M2])
def test_passes_write_the_plan(decoder, fmt: Precision, mode: str) -> None:
    """The ops after the passes, in a graph the full checker accepts, and (emulation graph) the
    torch emulation's outputs bit for bit on ONNX Runtime's CPU provider."""
    c, fp32, inputs, amax = decoder
    model = apply_plan_onnx(fp32, c, _plan(c, fmt), amax if fmt.is_fp8 else None, mode, keep_metadata=True)
    onnx.checker.check_model(model, full_check=True)
    nodes = {n.output[0]: n for n in model.graph.node}
    cores = _by_layer(model)
    assert {n.op_type for n in cores.values()} == {"ConvTranspose"}
    weights = dict(c.gm.named_parameters())
    inits = {t.name: t for t in model.graph.initializer}
    for layer, core in cores.items():
        w = weights[f"{layer}.weight"].detach()
        # a 16-bit initializer is read directly only by a deployment graph's fp16 ConvTranspose
        # (ONNX's ConvTranspose has no bf16 before opset 22); else through an inserted node
        if mode == "deploy" and fmt is FP16:
            assert inits[core.input[1]].data_type == TensorProto.FLOAT16, layer
            continue
        reader = nodes[core.input[1]]
        assert get_meta(reader, INSERTED) == "weight"
        stored = inits[reader.input[0]]
        if fmt.is_fp8:  # fp8 codes, one scale per output channel, dequantized to fp32
            assert reader.op_type == "DequantizeLinear" and stored.data_type == fmt.onnx_type
            want = quantize_weight(w, fmt, weight_channels(c.graph[layer].kind, c.node(layer).args, {})).numpy()
            assert np.array_equal(_dequantized(model, reader), want), layer
            act = nodes[core.input[0]]  # the activation's QuantizeLinear -> DequantizeLinear
            assert act.op_type == "DequantizeLinear" and nodes[act.input[0]].op_type == "QuantizeLinear"
        else:  # the 16-bit initializer cast to fp32
            assert reader.op_type == "Cast" and stored.data_type == fmt.onnx_type, layer
            assert np.array_equal(numpy_helper.to_array(stored).astype(np.float32), quantize_weight(w, fmt).numpy())
    if fmt.is_fp8:
        up, up_g = (nodes[cores[k].input[1]] for k in ("up", "up_g"))
        assert attr(up, "axis") == 1 and attr(up, "block_size", 0) == 0  # one group: its columns
        assert list(inits[up.input[1]].dims) == [4]
        # two groups of 3 channels: blocked along the 4 input channels (2 per group)
        assert attr(up_g, "axis") == 0 and attr(up_g, "block_size") == 2
        assert list(inits[up_g.input[1]].dims) == [2, 3, 2, 2]
    if fmt.is_16bit and mode == "deploy":  # a 16-bit layer's bias is an Add of its own after the product
        assert len(cores["up"].input) == 2 and any(n.op_type == "Add" and get_meta(n, LAYER) == "up"
                                                   for n in model.graph.node)
    if mode == "emulate":
        with torch.no_grad():
            want = apply_plan(c, _plan(c, fmt), amax if fmt.is_fp8 else None, mode="emulate")(*inputs)
            fp32_out = c.gm(*inputs)
        got = open_session(model.SerializeToString(), "cpu")(*inputs)
        for g, w, ref in zip(got, want, fp32_out):
            assert not torch.equal(w, ref)  # the plan changes every output
            np.testing.assert_array_equal(g, w.numpy())


def test_provider_kernels_decide_the_compute_format(decoder) -> None:
    """Written for a provider: CUDA has an fp16 ConvTranspose but no bf16 one, the CPU neither, so
    there the layer computes in fp32 between the casts that keep the plan's roundings."""
    c, fp32, _, _ = decoder
    for provider, fmt, compute in (("cuda", FP16, TensorProto.FLOAT16), ("cuda", BF16, TensorProto.FLOAT),
                                   ("cpu", FP16, TensorProto.FLOAT)):
        model = apply_plan_onnx(fp32, c, _plan(c, fmt), None, "deploy", keep_metadata=True, provider=provider)
        onnx.checker.check_model(model, full_check=True)
        inferred = onnx.shape_inference.infer_shapes(model).graph.value_info
        types = {v.name: v.type.tensor_type.elem_type for v in inferred}
        for core in _by_layer(model).values():
            assert types[core.output[0]] == compute, (provider, fmt)
    graph = c.graph
    cuda = providers.exclusions(graph, "cuda", live=False)
    assert set(cuda) == set(graph.layer_names()) and all(set(x) == {BF16} for x in cuda.values())
    assert "no bf16 ConvTranspose kernel" in cuda["up"][BF16]
    cpu = providers.exclusions(graph, "cpu", live=False)
    assert all(set(x) == {BF16, FP16} for x in cpu.values())  # fp8: Q/DQ around an fp32 ConvTranspose


def test_grouped_fp8_weight_needs_opset_21(decoder) -> None:
    """Before opset 21 DequantizeLinear has no blocks: a grouped ConvTranspose cannot be fp8 there
    (a one-group one can: its scales lie along one axis)."""
    c, _, inputs, amax = decoder
    module = ExactDecoder().eval()
    old = torch_to_onnx(module, inputs, opset=20)
    onnx.checker.check_model(apply_plan_onnx(old, c, {"up": E4M3, "up1": E4M3}, amax), full_check=True)
    with pytest.raises(PlanError, match="blocked DequantizeLinear of opset 21"):
        apply_plan_onnx(old, c, {"up_g": E4M3}, amax)


CASES = [("pytorch-converted", "test_ConvTranspose2d", (3, 7, 6)),
         ("pytorch-converted", "test_ConvTranspose2d_no_bias", (3, 6, 7)),
         ("pytorch-operator", "test_operator_convtranspose", (3, 4, 5))]


@pytest.mark.parametrize("suite,name,shape", CASES, ids=[c[1] for c in CASES])
def test_backend_models_tune_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str], suite: str, name: str,
                                        shape: tuple[int, ...]) -> None:
    """The onnx wheel's ConvTranspose test models (which had "no layer to tune") have one layer;
    `autoprec tune` writes a plan for it, in bf16 and in fp8 when forced, and `verify` accepts the
    tuned file."""
    source = BACKEND / suite / name / "model.onnx"
    analysis = analyse_onnx(onnx.load(source))
    assert [(op.name, op.kind) for op in analysis.graph.layers()] == [("ConvTranspose_0", "conv_transpose2d")]
    data = tmp_path / "inputs.npz"
    np.savez(data, **{"0": np.random.default_rng(0).standard_normal((16, *shape)).astype(np.float32)})
    for fmt in (BF16, E4M3):
        out = tmp_path / fmt.value
        code = main(["tune", str(source), "--data", str(data), "--fidelity-budget", "5%",
                     "--force", f"{fmt.value}:ConvTranspose_0", "--out", str(out)])
        assert code == 0, fmt
        plan = PrecisionPlan.load(out / "plan.json")
        assert [(d.layer, d.kind, d.format) for d in plan.decisions] == [("ConvTranspose_0", "conv_transpose2d", fmt)]
        tuned = onnx.load(out / "model.tuned.onnx")
        onnx.checker.check_model(tuned, full_check=True)
        ops = [n.op_type for n in tuned.graph.node]
        assert "ConvTranspose" in ops and ("DequantizeLinear" in ops) == fmt.is_fp8
        capsys.readouterr()
        code = main(["verify", str(out / "model.tuned.onnx"), "--model", str(source), "--data", str(data), "--json"])
        report = json.loads(capsys.readouterr().out)
        assert code == 0 and report["ok"], report
