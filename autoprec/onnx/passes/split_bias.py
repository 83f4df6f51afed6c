"""ONNX pass 2b: move a 16-bit layer's bias out of its Gemm/Conv/ConvTranspose into an Add of its own.

A 16-bit layer computes ``round_P(round_P(x @ W) + round_P(b))`` (:func:`autoprec.torch.semantics.finish`).
An Add after the product says that in ONNX types on every provider: the product node writes P and
the Add reads and writes P. A bias fused into the Gemm (input C) does not: ORT's CUDA Gemm adds C
inside cuBLAS before its single rounding, and the CPU provider computes it in fp32. The exporter
already writes a linear layer on more than two dimensions as MatMul + Add, which this pass leaves
as it is.

For each core Gemm (C an initializer, or any C when ``beta`` is 1) and Conv or ConvTranspose (B an
initializer) of a 16-bit layer: the node loses the input, and an Add in the layer's group (same
metadata, no role) adds it to the product under the node's output name. Gemm's ``beta`` is folded
into a copy of C; a convolution's B is stored as ``[M, 1, ...]`` so it broadcasts over the spatial
axes. An all-zero bias (the exporter writes one for a convolution without a bias) is dropped from
every layer, whatever its format: adding zeros changes nothing (but the sign of a zero), and the
file is smaller. fp32 layers keep their fused bias (nothing is rounded between), and so do fp8
layers (their bias is an fp32 add before the single rounding to bf16, which the fused form computes).

ONNX Runtime's graph optimizers would fuse a linear layer's Add back into a kernel that adds the
bias unrounded; :mod:`autoprec.onnx.passes.keep_roundings` stores the deployment graph in forms they leave
alone. Its ``ConvAddFusion`` folds a Conv's bias Add back into B whatever the form, and that is
harmless: ORT's CUDA Conv writes its rounded product and then adds B with a cudnnAddTensor (two
roundings, as here) unless the provider option ``fuse_conv_bias`` is on, which
:mod:`autoprec.ort.runtime` pins off; the CPU provider has no 16-bit Conv. ORT fuses no Add into
a ConvTranspose (none of the CPU provider's optimizers does, checked on onnxruntime 1.31).

Runs after AssignFormats (it reads the layer's format) and before LowerWeights.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto

from autoprec.core.passes import PassError, PassResult
from autoprec.onnx.passes.base import (ACT_AMAX, FORMAT, ROLE, ROLE_CORE, GraphIndex, OnnxPass, all_names,
    attr, get_meta, make_tensor, node_format, set_attr, set_nodes, unique_name)

_BIAS_SLOT = {"Gemm": 2, "Conv": 2, "ConvTranspose": 2}
#: ops whose bias B is one value per output channel, added along axis 1 of the result
_CONV_OPS = frozenset({"Conv", "ConvTranspose"})


def _zero_bias(node: onnx.NodeProto, idx: GraphIndex) -> bool:
    """Whether ``node`` is a layer's core Gemm/Conv/ConvTranspose whose bias is an initializer of zeros."""
    slot = _BIAS_SLOT.get(node.op_type)
    if get_meta(node, ROLE) != ROLE_CORE or slot is None or len(node.input) <= slot:
        return False
    bias = node.input[slot]
    return bias in idx.inits and not np.any(idx.array(bias))


def _splits(node: onnx.NodeProto, idx: GraphIndex) -> bool:
    """Whether ``node`` is the core of a 16-bit layer whose bias this pass moves."""
    fmt = node_format(node)
    slot = _BIAS_SLOT.get(node.op_type)
    if get_meta(node, ROLE) != ROLE_CORE or fmt is None or not fmt.is_16bit or slot is None:
        return False
    if len(node.input) <= slot or not node.input[slot]:
        return False
    bias = node.input[slot]
    if node.op_type in _CONV_OPS:
        return bias in idx.inits
    return bias in idx.inits or float(attr(node, "beta", 1.0)) == 1.0


class SplitBias(OnnxPass):
    """Give the bias of every 16-bit Gemm/Conv/ConvTranspose layer an Add of its own after the product, and drop
    every layer's bias of zeros."""

    needs = (FORMAT,)

    def call(self, model: onnx.ModelProto) -> PassResult:
        idx = GraphIndex(model)
        taken = all_names(model)
        nodes: list[onnx.NodeProto] = []
        typed = {v.name: v for v in list(model.graph.value_info) + list(model.graph.output)}
        modified = False
        for n in idx.nodes:
            nodes.append(n)
            if _zero_bias(n, idx):  # the exporter's zeros for a layer without a bias, in any format
                del n.input[_BIAS_SLOT[n.op_type]:]
                modified = True
                continue
            if not _splits(n, idx):
                continue
            slot = _BIAS_SLOT[n.op_type]
            bias = n.input[slot]
            beta = float(attr(n, "beta", 1.0)) if n.op_type == "Gemm" else 1.0
            if n.op_type in _CONV_OPS or beta != 1.0:
                b = idx.array(bias).astype(np.float32)
                if n.op_type == "Gemm":
                    b = b * np.float32(beta)
                else:  # [M] -> [M, 1, ...], one 1 per spatial axis of the weight
                    b = b.reshape(-1, *([1] * (len(idx.inits[n.input[1]].dims) - 2)))
                t = make_tensor(unique_name(taken, f"{bias}_bias"), b, TensorProto.FLOAT)
                model.graph.initializer.append(t)
                bias = t.name
            del n.input[slot:]
            if n.op_type == "Gemm":
                set_attr(n, "beta", 1.0)
            out = n.output[0]
            n.output[0] = unique_name(taken, f"{out}_product")
            vi = typed.get(out)
            if vi is not None:  # the product has the result's type and shape (the bias broadcasts into it)
                model.graph.value_info.append(onnx.helper.make_tensor_value_info(n.output[0], 0, None))
                model.graph.value_info[-1].type.CopyFrom(vi.type)
            add = onnx.helper.make_node("Add", [n.output[0], bias], [out], name=unique_name(taken, f"{n.name}_bias"))
            for p in n.metadata_props:
                if p.key not in (ROLE, ACT_AMAX):
                    add.metadata_props.add(key=p.key, value=p.value)
            nodes.append(add)
            modified = True
        if modified:
            set_nodes(model, nodes)
        return PassResult(model, modified)

    def ensures(self, model: onnx.ModelProto) -> None:
        super().ensures(model)
        idx = GraphIndex(model)
        for n in idx.nodes:
            if _splits(n, idx) or _zero_bias(n, idx):
                raise PassError(f"{self.name}: layer node {n.name} still adds a bias of zeros or, in 16-bit, "
                                    "its bias itself")
