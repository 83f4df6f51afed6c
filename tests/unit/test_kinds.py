"""The op-kind registry: its consistency, the frontends' spellings of its kinds and its FLOPs rule."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from autoprec.core.kinds import (ATEN_ALIASES, ATEN_RANKED_KINDS, ATEN_TRANSPOSED_KINDS, BIAS_KINDS, CONV_KINDS,
                                 CONV_TRANSPOSE_KINDS, EXACT_FOLLOW_KINDS,
                                 FOLLOW_KINDS, KINDS, LAYER_CLASSES, LAYER_KINDS, LOOKUP_KINDS, NEVER_KINDS,
                                 ONNX_CONTRIB_KINDS, ONNX_KINDS, ONNX_RANKED_KINDS, SPATIAL_RANKS, TORCH_MODULE_KINDS,
                                 VIEW_KINDS,
                                 FlopsRule, OpKind, aten_kind, flops, groups_arg_position, layer_class, onnx_kind,
                                 policy_of, torch_module_kind, weight_channel_axis)
from autoprec.core.opgraph import Policy


def test_the_frozensets_are_views_of_the_registry() -> None:
    assert CONV_TRANSPOSE_KINDS == {"conv_transpose1d", "conv_transpose2d", "conv_transpose3d"}
    assert LAYER_KINDS == {"linear", "conv1d", "conv2d", "conv3d", "matmul", "bmm", "embedding"} | CONV_TRANSPOSE_KINDS
    # a batch norm folds after a convolution only (CONV_KINDS), not after a transposed one
    assert LOOKUP_KINDS == {"embedding"} and CONV_KINDS == {"conv1d", "conv2d", "conv3d"}
    assert BIAS_KINDS == {"linear"} | CONV_KINDS | CONV_TRANSPOSE_KINDS
    assert LAYER_KINDS == {k.name for k in KINDS.values() if k.policy is Policy.ALWAYS}
    assert FOLLOW_KINDS == {k.name for k in KINDS.values() if k.policy is Policy.FOLLOW}
    assert EXACT_FOLLOW_KINDS <= FOLLOW_KINDS and NEVER_KINDS.isdisjoint(FOLLOW_KINDS | LAYER_KINDS)
    assert {"reshape", "permute", "transpose", "getitem", "relu", "max_pool2d", "neg"} <= EXACT_FOLLOW_KINDS
    assert {"gelu", "add", "dropout", "avg_pool2d"}.isdisjoint(EXACT_FOLLOW_KINDS)  # they compute new values
    assert {"reshape", "permute", "dropout", "getattr", "size"} <= VIEW_KINDS and "cat" not in VIEW_KINDS
    assert {"softmax", "layer_norm", "exp", "sum", "cross_entropy"} <= NEVER_KINDS
    # opaque kinds stay fp32 as unknown ops do, and are not called numerically sensitive
    assert policy_of("loop") is policy_of("lstm") is Policy.NEVER
    assert {"loop", "maximum", "lstm", "max_pool3d"}.isdisjoint(NEVER_KINDS)


def test_policies_and_layer_classes() -> None:
    assert {k: policy_of(k) for k in ("linear", "relu", "softmax", "placeholder", "size", "sym_size")} == {
        "linear": Policy.ALWAYS, "relu": Policy.FOLLOW, "softmax": Policy.NEVER, "placeholder": Policy.NONE,
        "size": Policy.NONE, "sym_size": Policy.NONE}
    assert policy_of("sin") is policy_of("module:Custom") is Policy.NEVER  # unknown: fp32, the safe default
    assert {k: layer_class(k) for k in sorted(LAYER_KINDS)} == {
        "bmm": "matmul", "conv1d": "conv", "conv2d": "conv", "conv3d": "conv", "embedding": "embedding",
        "linear": "linear", "matmul": "matmul", "conv_transpose1d": "conv_transpose",
        "conv_transpose2d": "conv_transpose", "conv_transpose3d": "conv_transpose"}
    # a transposed convolution's weight is [C_in, C_out/groups, k...]: output channels on axis 1,
    # its groups (F.conv_transpose2d's argument 6) splitting axis 0
    assert [weight_channel_axis(k) for k in ("linear", "conv2d", "embedding", "conv_transpose2d")] == [0, 0, 0, 1]
    assert groups_arg_position("conv_transpose1d") == 6 and groups_arg_position("conv2d") is None
    assert layer_class("relu") is None and layer_class("sin") is None
    assert {layer_class(k) for k in LAYER_KINDS} == set(LAYER_CLASSES)


@pytest.mark.parametrize("bad", [
    dict(name="x", policy=Policy.ALWAYS),  # a layer needs a layer class
    dict(name="x", policy=Policy.FOLLOW, layer="linear"),  # ... and only layers have one
    dict(name="x", policy=Policy.ALWAYS, layer="pool"),
    dict(name="x", policy=Policy.ALWAYS, layer="linear", lookup=True),
    dict(name="x", policy=Policy.NEVER, exact=True),
    dict(name="x", policy=Policy.FOLLOW, opaque=True),
])
def test_an_inconsistent_kind_is_refused(bad: dict) -> None:
    with pytest.raises(ValueError):
        OpKind(**bad)


def test_every_spelling_names_a_registry_kind() -> None:
    from autoprec.ort.providers import FOLLOW_OPS, LAYER_OPS
    from autoprec.onnx.passes.map_layers import CORE_OPS
    from autoprec.torch.capture import _FUNCTION_KINDS, MODULE_KINDS

    spelled = {**{f"module {c.__name__}": k for c, k in MODULE_KINDS.items()},
               **{f"function {getattr(f, '__name__', f)}": k for f, k in _FUNCTION_KINDS.items()},
               **{f"onnx {op}": k for op, k in ONNX_KINDS.items()},
               **{f"com.microsoft {op}": k for op, k in ONNX_CONTRIB_KINDS.items()},
               **{f"aten {op}": k for op, k in ATEN_ALIASES.items()},
               **{f"torch.nn.{name}": k for name, k in TORCH_MODULE_KINDS.items()}}
    for table in (ONNX_RANKED_KINDS, ATEN_RANKED_KINDS, ATEN_TRANSPOSED_KINDS):
        spelled.update({f"{op} at rank {n}": t.format(n) for op, t in table.items() for n in SPATIAL_RANKS})
    unknown = {where: k for where, k in spelled.items() if k not in KINDS}
    assert not unknown
    assert set(LAYER_OPS) == LAYER_KINDS and set(FOLLOW_OPS) <= FOLLOW_KINDS and set(CORE_OPS) == set(LAYER_CLASSES)


def test_onnx_spellings() -> None:
    assert onnx_kind("Transpose") == "permute"  # a whole permutation, as graph.py and map_layers both say
    assert [onnx_kind("Conv", rank=r) for r in (3, 4, 5, None)] == ["conv1d", "conv2d", "conv3d", "conv2d"]
    assert onnx_kind("Conv", rank=7) == "conv"  # no 5-D convolution kind: unknown, fp32
    assert [onnx_kind(op, rank=3) for op in ("MaxPool", "AveragePool", "GlobalAveragePool", "ConvTranspose")] == [
        "max_pool1d", "avg_pool1d", "adaptive_avg_pool1d", "conv_transpose1d"]
    assert (onnx_kind("MatMul"), onnx_kind("Gemm"), onnx_kind("Gather")) == ("matmul", "linear", "select")
    assert (onnx_kind("Clip"), onnx_kind("Sum"), onnx_kind("Max"), onnx_kind("Constant")) == (
        "hardtanh", "add", "maximum", "get_attr")
    assert onnx_kind("Sin") == "sin" and onnx_kind("Relu", "ai.onnx") == "relu"
    assert onnx_kind("FastGelu", "com.microsoft") == "gelu"
    assert onnx_kind("Relu", "com.example") == "com.example.Relu"  # another domain's op is unknown


def test_aten_spellings() -> None:
    assert aten_kind("aten.conv2d.default") == aten_kind("conv2d") == "conv2d"
    assert [aten_kind("aten.convolution.default", r) for r in (3, 4, 5, None)] == [
        "conv1d", "conv2d", "conv3d", "conv2d"]
    assert aten_kind("convolution", 3) == "conv1d"  # the schema name capture reads
    # the ONNX exporter writes every convolution as aten.convolution: a ConvTranspose is transposed
    assert [aten_kind("aten.convolution.default", r, transposed=True) for r in (3, 4, None)] == [
        "conv_transpose1d", "conv_transpose2d", "conv_transpose2d"]
    assert aten_kind("aten.conv_transpose2d.input") == "conv_transpose2d"
    assert {t: aten_kind(t) for t in ("aten._unsafe_view.default", "aten.permute_copy.default",
                                      "aten.native_layer_norm.default", "aten.sym_size.int", "aten.addmm.default",
                                      "aten.transpose.int", "aten.mean.dim", "relu_")} == {
        "aten._unsafe_view.default": "reshape", "aten.permute_copy.default": "permute",
        "aten.native_layer_norm.default": "layer_norm", "aten.sym_size.int": "size", "aten.addmm.default": "linear",
        "aten.transpose.int": "transpose", "aten.mean.dim": "mean", "relu_": "relu"}
    assert aten_kind("<built-in function getitem>") == "<built-in function getitem>"


def test_flops_rule() -> None:
    x, out = (2, 5, 8), (2, 5, 4)
    assert flops("linear", [x, (4, 8), (4,)], out) == 2 * 40 * 8
    assert flops("matmul", [(3, 4, 6), (3, 6, 5)], (3, 4, 5)) == flops("bmm", [(3, 4, 6), (3, 6, 5)], (3, 4, 5)) \
        == 2 * 60 * 6
    conv_out = (2, 4, 8, 8)
    assert flops("conv2d", [(2, 3, 8, 8), (4, 3, 3, 3), (4,)], conv_out) == 2 * (2 * 4 * 8 * 8) * 27
    # the kernel is the weight where the caller knows it, else operand 1
    assert flops("conv2d", [(2, 3, 8, 8)], conv_out, weight_shape=(4, 3, 3, 3)) == 2 * (2 * 4 * 8 * 8) * 27
    # a transposed convolution scatters each input element through its kernel slice
    assert flops("conv_transpose2d", [(2, 4, 2, 2), (4, 3, 2, 2)], (2, 3, 4, 4)) == 2 * (2 * 4 * 2 * 2) * 12
    for kind in ("softmax", "log_softmax", "layer_norm", "batch_norm", "group_norm"):
        assert flops(kind, [(2, 5)], (2, 5)) == 5 * 10
    assert flops("relu", [(2, 5)], (2, 5)) == flops("rms_norm", [(2, 5)], (2, 5)) == 10
    assert flops("sin", [(2, 5)], (2, 5)) == 10  # unknown kinds count one per output element
    assert flops("embedding", [(2, 6), (20, 16)], (2, 6, 16)) == 0  # a lookup copies rows
    assert flops("linear", [x], None) == 0  # no known output
    assert flops("linear", [()], out) == 40  # unknown operand shape: one per output element
    assert flops("conv2d", [(2, 3, 8, 8)], conv_out) == 2 * 4 * 8 * 8
    assert KINDS["linear"].flops is FlopsRule.PRODUCT and KINDS["size"].flops is FlopsRule.ZERO


def test_both_frontends_name_and_count_a_conv1d_alike() -> None:
    """A Conv1d the torch capture sees and the same layer in an ONNX file get one kind and one count."""
    import torch

    from autoprec.onnx.graph import load_onnx
    from autoprec.torch.capture import capture

    conv = torch.nn.Conv1d(3, 4, 3, padding=1).eval()
    torch_op = capture(torch.nn.Sequential(conv), (torch.randn(2, 3, 10),)).graph["_0"]
    w = numpy_helper.from_array(conv.weight.detach().numpy(), "w")
    b = numpy_helper.from_array(conv.bias.detach().numpy(), "b")
    node = helper.make_node("Conv", ["x", "w", "b"], ["y"], name="conv", pads=[1, 1])
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 10])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4, 10])], [w, b])
    _, graph = load_onnx(helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)]))
    onnx_op = graph["conv"]
    assert torch_op.kind == onnx_op.kind == "conv1d"
    assert torch_op.flops == onnx_op.flops == 2 * (2 * 4 * 10) * (3 * 3)
    assert torch_op.weight_elems == onnx_op.weight_elems == int(np.prod(conv.weight.shape)) + 4


def test_the_registry_imports_no_torch() -> None:
    code = "import sys, autoprec.core.kinds; assert 'torch' not in sys.modules and 'onnx' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_torch_module_spellings_resolve_both_ways() -> None:
    """capture resolves each name to its torch.nn class; the exporter's qualified class names map back."""
    from autoprec.torch.capture import MODULE_KINDS

    assert len(MODULE_KINDS) == len(TORCH_MODULE_KINDS)
    for cls, kind in MODULE_KINDS.items():
        assert torch_module_kind(f"{cls.__module__}.{cls.__qualname__}") == kind
    assert torch_module_kind("torch.nn.modules.container.Sequential") is None
    assert torch_module_kind("mypkg.Linear") is None
