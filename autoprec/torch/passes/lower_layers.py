"""Pass 2: replace each low-precision layer by a call to its :mod:`autoprec.torch.passes.ops` function.

``F.linear(x, w, b)`` in bf16 becomes ``lowp_linear(x, w, b, fmt=Precision.BF16, amax=None,
native=False)``: same node name, same arguments, so parameters keep their names and stay fp32 (the
function rounds the weight at use). The function computes exactly
:func:`autoprec.torch.semantics.emulate_layer` (emulate mode) or runs on 16-bit/fp8 operands (native).
Layers in fp32 are left as they are.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn.functional as F

from autoprec.core.errors import PlanError
from autoprec.core.formats import Precision
from autoprec.core.passes import PassError, PassResult
from autoprec.torch.passes.base import ACT_AMAX, FORMAT, KIND, Pass
from autoprec.torch.passes.ops import LAYER_OPS

_aten = torch.ops.aten

#: targets whose positional signature is the one fx_ops' layer functions take
_LOWERABLE = {
    "linear": {F.linear, _aten.linear.default},
    "conv1d": {F.conv1d, torch.conv1d, _aten.conv1d.default},
    "conv2d": {F.conv2d, torch.conv2d, _aten.conv2d.default},
    "conv3d": {F.conv3d, torch.conv3d, _aten.conv3d.default},
    "conv_transpose1d": {F.conv_transpose1d, torch.conv_transpose1d, _aten.conv_transpose1d.default},
    "conv_transpose2d": {F.conv_transpose2d, torch.conv_transpose2d, _aten.conv_transpose2d.input},
    "conv_transpose3d": {F.conv_transpose3d, torch.conv_transpose3d, _aten.conv_transpose3d.input},
    "matmul": {torch.matmul, operator.matmul, _aten.matmul.default, _aten.mm.default, "matmul", "mm"},
    "bmm": {torch.bmm, _aten.bmm.default, "bmm"},
    "embedding": {F.embedding},  # capture normalises nn.Embedding and aten.embedding to it
}


def _lowerable(node: fx.Node, kind: str) -> bool:
    targets = _LOWERABLE.get(kind, set())
    if node.op == "call_method":
        return str(node.target) in targets
    return node.op == "call_function" and node.target in targets


def is_lowered(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in LAYER_OPS.values()


class LowerLayers(Pass):
    """Point every layer whose format is not fp32 at its low-precision function."""

    needs = (FORMAT,)

    def __init__(self, native: bool = False) -> None:
        self.native = native

    def call(self, gm: fx.GraphModule) -> PassResult:
        modified = False
        for node in gm.graph.nodes:
            fmt = node.meta.get(FORMAT)
            kind = node.meta.get(KIND)
            if fmt is None or fmt is Precision.FP32 or kind not in LAYER_OPS or node.op == "get_attr":
                continue
            if not _lowerable(node, kind):
                raise PlanError(f"layer {node.name} ({node.op} {node.target}) has a signature autoprec cannot "
                                f"rewrite to {fmt}; keep it in fp32")
            amax = node.meta.get(ACT_AMAX)
            node.op = "call_function"
            node.target = LAYER_OPS[kind]
            node.kwargs = {**node.kwargs, "fmt": fmt, "amax": tuple(amax) if amax else None,
                           "native": self.native, "site": node.name}
            modified = True
        return PassResult(gm, modified)

    def ensures(self, gm: fx.GraphModule) -> None:
        super().ensures(gm)
        for node in gm.graph.nodes:
            fmt = node.meta.get(FORMAT)
            if node.meta.get(KIND) not in LAYER_OPS or node.op == "get_attr" or fmt is None:
                continue
            if (fmt is Precision.FP32) == is_lowered(node):
                raise PassError(f"{self.name}: layer {node.name} in {fmt} is "
                                f"{'lowered' if is_lowered(node) else 'not lowered'}")
            if is_lowered(node) and node.kwargs.get("fmt") is not fmt:
                raise PassError(f"{self.name}: layer {node.name} calls {node.target.__name__} with "
                                f"fmt={node.kwargs.get('fmt')}, its format is {fmt}")
