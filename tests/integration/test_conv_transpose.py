"""Transposed convolutions are plan layers: capture, the torch emulation in every format, the ONNX
export and ONNX Runtime's parity with the emulation.

The reference here is computed apart from autoprec's rounding: operands rounded with ml_dtypes
(fp8: the weight divided by one scale per output channel, which for a transposed convolution's
[C_in, C_out/groups, k...] weight is each (group, column) slice's amax / max, found by a loop over
the output channels), the product by torch's fp32 kernel, the result rounded to the layer's output
format; a 16-bit layer adds its bias rounded, after rounding the product, and rounds again; an fp8
one adds it in fp32 and rounds once, to bf16.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from autoprec.core.formats import Precision
from autoprec.core.opgraph import Policy
from autoprec.deploy.export import export_onnx
from autoprec.deploy.verify import verify
from autoprec.torch.capture import capture
from autoprec.torch.passes import apply_plan
from autoprec.torch.semantics import quantize_weight, weight_channels

FP32, BF16, FP16, E4M3, E5M2 = (Precision.FP32, Precision.BF16, Precision.FP16, Precision.FP8_E4M3,
                                Precision.FP8_E5M2)
FORMATS = (BF16, FP16, E4M3, E5M2)
_ML = {BF16: ml_dtypes.bfloat16, FP16: np.float16, E4M3: ml_dtypes.float8_e4m3fn, E5M2: ml_dtypes.float8_e5m2}

#: the model file the export tests write: the decoder below, seeded
MODEL_FILE = '''
import torch
from torch import nn


class Decoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1)
        self.up_g = nn.ConvTranspose2d(6, 4, 2, stride=2, groups=2)
        self.up1 = nn.ConvTranspose1d(3, 4, 4, stride=2, padding=1, bias=False)

    def forward(self, x, s):
        return self.up_g(torch.relu(self.up(x))), self.up1(s)


def model():
    torch.manual_seed(0)
    return Decoder()


def _inputs(batch, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 4, 5, 5, generator=g), torch.randn(batch, 3, 9, generator=g)


def example_inputs():
    return _inputs(2, 1)


def calibration_data():
    return [_inputs(4, s) for s in (2, 3)]
'''


def _spec_namespace() -> dict[str, Any]:
    ns: dict[str, Any] = {}
    exec(compile(MODEL_FILE, "decoder", "exec"), ns)
    return ns


@pytest.fixture(scope="module")
def decoder() -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    ns = _spec_namespace()
    return ns["model"]().eval(), ns["example_inputs"]()


def _round(a: np.ndarray, fmt: Precision) -> np.ndarray:
    """``a`` rounded to ``fmt`` by ml_dtypes (E4M3FN saturates, so clamp first as it does)."""
    a = np.asarray(a, np.float32)
    if fmt is E4M3:
        a = np.clip(a, -448, 448)
    return a.astype(_ML[fmt]).astype(np.float32)


def _channel_scales(w: np.ndarray, groups: int, fmt: Precision) -> np.ndarray:
    """One fp8 scale per output channel of a transposed convolution's [C_in, C_out/groups, k...]
    weight, found channel by channel, broadcast against the weight."""
    c_in, per_group = w.shape[0], w.shape[1]
    rows = c_in // groups
    scale = np.ones((c_in, per_group) + (1,) * (w.ndim - 2), np.float32)
    for out_channel in range(groups * per_group):
        g, j = divmod(out_channel, per_group)
        amax = np.abs(w[g * rows:(g + 1) * rows, j]).max()
        scale[g * rows:(g + 1) * rows, j] = amax / np.float32(fmt.max) if amax > 0 else 1.0
    return scale


def _reference(conv: nn.Module, x: np.ndarray, fmt: Precision, amax: float) -> np.ndarray:
    """The layer ``conv`` in ``fmt`` on ``x``, from the rule in the module docstring."""
    w = conv.weight.detach().numpy()
    if fmt.is_fp8:
        sx = np.float32(amax) / np.float32(fmt.max)
        xq = _round(x / sx, fmt) * sx
        sw = _channel_scales(w, conv.groups, fmt)
        wq = _round(w / sw, fmt) * sw
    else:
        xq, wq = _round(x, fmt), _round(w, fmt)
    fn = F.conv_transpose1d if isinstance(conv, nn.ConvTranspose1d) else F.conv_transpose2d
    y = fn(torch.from_numpy(xq), torch.from_numpy(wq), None, conv.stride, conv.padding, conv.output_padding,
           conv.groups, conv.dilation).numpy()
    if conv.bias is None:
        return _round(y, fmt.compute_output)
    b = conv.bias.detach().numpy().reshape(-1, *([1] * (y.ndim - 2)))
    if fmt.is_fp8:
        return _round(y + b, BF16)
    return _round(_round(y, fmt) + _round(b, fmt), fmt)


def test_capture_makes_them_layers(decoder) -> None:
    """fx normalises each nn.ConvTranspose*d to F.conv_transpose*d on its weight and bias (argument
    order: output_padding and groups before dilation); torch.export names the same layers."""
    module, example = decoder
    for method in ("fx", "export"):
        c = capture(module, example, method=method)
        layers = c.graph.layers()
        assert [(op.scope, op.kind, op.policy) for op in layers] == [
            ("up", "conv_transpose2d", Policy.ALWAYS), ("up_g", "conv_transpose2d", Policy.ALWAYS),
            ("up1", "conv_transpose1d", Policy.ALWAYS)], method
        assert [op.weight for op in layers] == ["up.weight", "up_g.weight", "up1.weight"]
        assert [op.weight_elems for op in layers] == [4 * 6 * 9 + 6, 6 * 2 * 4 + 4, 3 * 4 * 4]
        # each input element scatters into C_out/groups x k outputs: 2 FLOPs each
        assert layers[0].flops == 2 * (2 * 4 * 5 * 5) * 6 * 9
        assert layers[1].flops == 2 * (2 * 6 * 10 * 10) * 2 * 4
    fx_node = capture(module, example, method="fx").node("up")
    assert fx_node.target is F.conv_transpose2d
    assert fx_node.args[3:] == ((2, 2), (1, 1), (1, 1), 1, (1, 1))


def test_weight_scales_per_group_and_column(decoder) -> None:
    """fp8: one scale per output channel, i.e. per (group, column) of the weight, not per row (a
    convolution's axis 0) nor per column shared by both groups."""
    module, _ = decoder
    conv = module.up_g
    w = conv.weight.detach()
    channels = weight_channels("conv_transpose2d", (None, w, None, 2, 0, 0, 2, 1), {})
    assert (channels.axis, channels.groups) == (1, 2)
    for fmt in (E4M3, E5M2):
        want = _channel_scales(w.numpy(), 2, fmt)
        got = quantize_weight(w, fmt, channels).numpy()
        assert np.array_equal(got, _round(w.numpy() / want, fmt) * want)
        assert not np.array_equal(got, quantize_weight(w, fmt).numpy())  # a scale per row differs
        shared = _channel_scales(w.numpy(), 1, fmt)  # one scale per column for both groups
        assert not np.array_equal(got, _round(w.numpy() / shared, fmt) * shared)


@pytest.mark.parametrize("method", ["fx", "export"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_emulation_is_the_reference_bit_for_bit(decoder, fmt: Precision, method: str) -> None:
    module, example = decoder
    c = capture(module, example, method=method)
    x, s = (t.numpy() for t in example)
    with torch.no_grad():
        h = torch.relu(module.up(example[0]))
        fp32_g, fp32_1 = (t.numpy() for t in module(*example))
    by_scope = {op.scope: op.name for op in c.graph.layers()}
    # calibrated amax: the fp32 inputs' (up_g's a little below it in E4M3: its largest values saturate)
    below = 0.9 if fmt.info.saturates else 1.0
    amax = {"up": float(np.abs(x).max()), "up_g": below * float(h.max()), "up1": float(np.abs(s).max())}
    gm = apply_plan(c, {name: fmt for name in by_scope.values()},
                    {by_scope[k]: (a,) for k, a in amax.items()} if fmt.is_fp8 else None, mode="emulate")
    with torch.no_grad():
        got_g, got_1 = (t.numpy() for t in gm(*example))
    up = _reference(module.up, x, fmt, amax["up"])
    # the ReLU after a 16-bit layer runs in its format; after an fp8 layer in bf16: exact either way
    want_g = _reference(module.up_g, np.maximum(up, 0), fmt, amax["up_g"])
    want_1 = _reference(module.up1, s, fmt, amax["up1"])
    assert np.isfinite(want_g).all() and not np.array_equal(want_g, fp32_g) and not np.array_equal(want_1, fp32_1)
    np.testing.assert_array_equal(got_g, want_g)
    np.testing.assert_array_equal(got_1, want_1)


@pytest.mark.parametrize("fmt", [BF16, FP16])
def test_native_mode_runs_them_on_16_bit_tensors(decoder, fmt: Precision) -> None:
    """Native mode: 16-bit operands, the product rounded once by torch's 16-bit kernel, the bias a
    16-bit add; its results (cast to fp32 for the graph's output) are values of the format, within a
    rounding or two of the emulation's."""
    module, example = decoder
    c = capture(module, example)
    plan = {name: fmt for name in c.graph.layer_names()}
    with torch.no_grad():
        native = apply_plan(c, plan, mode="native")(*example)
        emulated = apply_plan(c, plan, mode="emulate")(*example)
    for n, e in zip(native, emulated):
        assert torch.equal(n, n.to(fmt.torch_dtype).float())
        assert float((n.float() - e).norm() / e.norm()) < 4 * fmt.eps


def test_training_rowwise_weight_scales_follow_the_output_channels(decoder) -> None:
    """The fp8 training recipe's rowwise weight scaling scales a transposed convolution's weight per
    output channel too (current scaling: the activation by its own amax)."""
    from autoprec.torch.numerics import Numerics, Recipe
    from autoprec.torch.quantize import rounding_gradients
    from autoprec.torch.semantics import LayerFormat, emulate_layer

    module, _ = decoder
    conv = module.up_g
    x = torch.randn(2, 6, 5, 5, generator=torch.Generator().manual_seed(7))
    args = (x, conv.weight.detach(), None, conv.stride, conv.padding, conv.output_padding, conv.groups, conv.dilation)
    num = Numerics(Recipe(fp8_scaling="current", weight_scaling="rowwise"))
    with rounding_gradients(num):
        y = emulate_layer("conv_transpose2d", args, {}, LayerFormat(E4M3), recipe=num.fp8_recipe("up_g", E4M3))
    no_bias = nn.ConvTranspose2d(6, 4, 2, stride=2, groups=2, bias=False)
    no_bias.weight = conv.weight
    want = _reference(no_bias, x.numpy(), E4M3, float(x.abs().max()))
    np.testing.assert_array_equal(y.detach().numpy(), want)


def test_a_batch_norm_after_one_is_not_folded() -> None:
    """A norm after a transposed convolution does not fold as after a convolution (its output
    channels lie on axis 1 of the weight): it stays, in the capture and in the ONNX export."""
    from autoprec.deploy.export import torch_to_onnx

    torch.manual_seed(0)
    module = nn.Sequential(nn.ConvTranspose2d(3, 4, 2, stride=2), nn.BatchNorm2d(4)).eval()
    with torch.no_grad():
        module[1].running_mean.uniform_(-1, 1)
        module[1].running_var.uniform_(0.5, 2)
    x = torch.randn(2, 3, 4, 4)
    c = capture(module, (x,))
    assert c.folded_norms == () and "batch_norm" in [op.kind for op in c.graph]
    assert [n.op_type for n in torch_to_onnx(module, (x,)).graph.node] == ["ConvTranspose", "BatchNormalization"]


@pytest.fixture(scope="module")
def model_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("decoder") / "decoder.py"
    path.write_text(MODEL_FILE)
    return path


@pytest.mark.parametrize("fmt", FORMATS)
def test_export_holds_parity_with_the_emulation(model_file: Path, tmp_path: Path, fmt: Precision) -> None:
    """The deployment file passes the checker and holds `autoprec verify`'s parity (ONNX Runtime's
    CPU run of the plan's emulation graph against the torch emulation) in every format."""
    import onnx

    ns = _spec_namespace()
    c = capture(ns["model"]().eval(), ns["example_inputs"]())
    layers = c.graph.layer_names()
    amax = None
    if fmt.is_fp8:
        from autoprec.torch.profile import profile
        from autoprec.torch.passes import act_amax_from_profile

        amax = act_amax_from_profile(profile(c, ns["calibration_data"](), formats=(fmt,), mode="fast"))
    out = export_onnx(model_file, {name: fmt for name in layers}, amax, tmp_path / "decoder.onnx")
    deployed = onnx.load(out)
    onnx.checker.check_model(deployed, full_check=True)
    ops = [n.op_type for n in deployed.graph.node]
    assert ops.count("ConvTranspose") == 3
    report = verify(out, model_file, providers="cpu")
    assert report.parity is not None and report.parity.ok and report.ok, report.lines()
