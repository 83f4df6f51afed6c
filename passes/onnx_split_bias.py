"""ONNX pass 2b: give a 16-bit layer's bias an Add of its own, in a form ONNX Runtime keeps.

A 16-bit layer computes ``round_P(round_P(x @ W) + round_P(b))`` (:func:`autoprec.semantics.finish`).
An Add after the product says that in ONNX types on every provider: the product node writes P and
the Add reads and writes P. A bias fused into the Gemm (input C) does not: ORT's CUDA Gemm adds C
inside cuBLAS before its single rounding, and the CPU provider computes it in fp32.

For each core Gemm (C an initializer, or any C when ``beta`` is 1) and Conv (B an initializer) of a
16-bit layer: the node loses the input, and an Add in the layer's group (same metadata, no role)
adds it to the product under the node's output name. Gemm's ``beta`` is folded into a copy of C;
Conv's B is stored as ``[M, 1, ...]`` so it broadcasts over the spatial axes. The exporter already
writes a linear layer on more than two dimensions as MatMul + Add, and other tools write one on two
dimensions so too.

ONNX Runtime's graph optimizers run in every session and would fuse such an Add into a neighbour
that adds it unrounded (onnxruntime/core/optimizer; checked on onnxruntime 1.31's CPU provider):
``MatMulAddFusion`` (level 1, every provider) turns a 2-D MatMul + Add into a Gemm with C, a dynamic
batch notwithstanding, and a static-shaped N-D one with a 1-D bias into Reshape + Gemm + Reshape;
``BiasGeluFusion`` (level 2, CPU and CUDA) folds an Add of a 1-D bias into the Gelu after it. So a
16-bit MatMul/Gemm layer's bias is stored at the product's rank, ``[1, ..., 1, N]``, which those
patterns (and the other level-2 ones that look for a 1-D bias) do not accept and which broadcasts
to the same sum, and a 2-D MatMul core becomes a Gemm without C: the same product, and ORT fuses no
Gemm + Add. ``ConvAddFusion`` (level 1) folds a Conv's bias Add back into its B whatever the shape;
that is harmless: the CUDA Conv then writes its rounded product and adds B with a cudnnAddTensor,
two roundings, unless the provider option ``fuse_conv_bias`` is on (:mod:`autoprec.runtime` pins
it off), and the CPU provider has no 16-bit Conv.

An all-zero bias (the exporter writes one for a convolution without a bias) is dropped from every
layer, whatever its format: adding zeros changes nothing (but the sign of a zero), and the file is
smaller. fp32 layers keep their fused bias (nothing is rounded between), and so do fp8 layers
(their bias is an fp32 add before the single rounding to bf16, which the fused form computes).

Runs after AssignFormats (it reads the layer's format) and before LowerWeights.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto

from passes.onnx_base import (ACT_AMAX, GROUP, ROLE, ROLE_CORE, GraphIndex, OnnxPass, OnnxPassError, OnnxPassResult,
                              all_names, attr, get_meta, make_tensor, node_format, set_attr, set_nodes, unique_name)

_BIAS_SLOT = {"Gemm": 2, "Conv": 2}


def _zero_bias(node: onnx.NodeProto, idx: GraphIndex) -> bool:
    """Whether ``node`` is a layer's core Gemm/Conv whose bias is an initializer of zeros."""
    slot = _BIAS_SLOT.get(node.op_type)
    if get_meta(node, ROLE) != ROLE_CORE or slot is None or len(node.input) <= slot:
        return False
    bias = node.input[slot]
    return bias in idx.inits and not np.any(idx.array(bias))


def _is_16bit_core(node: onnx.NodeProto) -> bool:
    fmt = node_format(node)
    return get_meta(node, ROLE) == ROLE_CORE and fmt is not None and fmt.is_16bit


def _splits(node: onnx.NodeProto, idx: GraphIndex) -> bool:
    """Whether ``node`` is the core of a 16-bit layer whose bias this pass moves."""
    slot = _BIAS_SLOT.get(node.op_type)
    if not _is_16bit_core(node) or slot is None or len(node.input) <= slot or not node.input[slot]:
        return False
    bias = node.input[slot]
    if node.op_type == "Conv":
        return bias in idx.inits
    return bias in idx.inits or float(attr(node, "beta", 1.0)) == 1.0


def _ranks(model: onnx.ModelProto) -> dict[str, int]:
    """Rank of every value whose shape the model records (graph inputs, outputs, value_info)."""
    g = model.graph
    return {v.name: len(v.type.tensor_type.shape.dim) for v in list(g.input) + list(g.output) + list(g.value_info)
            if v.type.HasField("tensor_type") and v.type.tensor_type.HasField("shape")}


def _bias_reads(idx: GraphIndex) -> list[tuple[int, int, int]]:
    """(core node, its bias Add, the Add's bias slot) for each 16-bit layer whose bias an Add of its
    group adds to the core's result, the bias being an initializer."""
    found = []
    for i, core in enumerate(idx.nodes):
        if not _is_16bit_core(core) or core.op_type not in ("MatMul", "Gemm", "Conv"):
            continue
        for j, k in idx.consumers.get(core.output[0], []):
            add = idx.nodes[j]
            if add.op_type != "Add" or get_meta(add, GROUP) != get_meta(core, GROUP) or len(add.input) != 2:
                continue
            if add.input[1 - k] in idx.inits:
                found.append((i, j, 1 - k))
    return found


def _stored_shape(core: onnx.NodeProto, dims: list[int], rank: int | None) -> list[int] | None:
    """The shape in which a 16-bit MatMul/Gemm layer's bias of shape ``dims`` is stored: the product's
    rank (``rank``, where the model records it; a Gemm's is 2). None where it has that rank already,
    where the rank is unknown, or where the bias is not a vector of the product's columns (it is then
    left alone), and for a Conv, whose ``[M, 1, ...]`` is already what it broadcasts (module docstring)."""
    if core.op_type == "Conv":
        return None
    if core.op_type == "Gemm":
        rank = 2
    if rank is None or len(dims) >= rank or any(d != 1 for d in dims[:-1]):
        return None
    return [*([1] * (rank - 1)), dims[-1] if dims else 1]


def _matmul_2d(core: onnx.NodeProto, idx: GraphIndex, ranks: dict[str, int]) -> bool:
    """Whether ``core`` is a MatMul of two matrices (which ORT would fuse with the Add after it)."""
    if core.op_type != "MatMul":
        return False
    w = core.input[1]
    w_rank = ranks.get(w, len(idx.inits[w].dims) if w in idx.inits else None)
    return ranks.get(core.input[0]) == 2 and w_rank == 2


class SplitBias(OnnxPass):
    """Give every 16-bit Gemm/Conv/MatMul layer's bias an Add of its own after the product, in a form
    ORT's graph optimizers do not fuse back, and drop every layer's bias of zeros."""

    def call(self, model: onnx.ModelProto) -> OnnxPassResult:
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
            if n.op_type == "Conv" or beta != 1.0:
                b = idx.array(bias).astype(np.float32)
                if n.op_type == "Gemm":
                    b = b * np.float32(beta)
                else:  # Conv: [M] -> [M, 1, ...], one 1 per spatial axis of the weight
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
        return OnnxPassResult(model, self._keep_apart(model, taken) or modified)

    def _keep_apart(self, model: onnx.ModelProto, taken: set[str]) -> bool:
        """Store each 16-bit layer's bias at its product's rank and make a 2-D MatMul core a Gemm, so
        ORT's fusions (module docstring) leave the Add where it is."""
        idx = GraphIndex(model)
        ranks = _ranks(model)
        listed = {v.name for v in list(model.graph.input) + list(model.graph.output)}  # with a shape of their own
        modified = False
        for i, j, slot in _bias_reads(idx):
            core, add = idx.nodes[i], idx.nodes[j]
            if _matmul_2d(core, idx, ranks):
                core.op_type = "Gemm"  # the same product: alpha 1, no transposes, no C
                modified = True
            old = idx.inits[add.input[slot]]
            shape = _stored_shape(core, list(old.dims), ranks.get(core.output[0]))
            if shape is None:
                continue
            t = old
            if len(idx.consumers.get(old.name, [])) > 1 or old.name in listed:  # reshape a copy
                t = TensorProto()
                t.CopyFrom(old)
                t.name = unique_name(taken, f"{old.name}_{'x'.join(map(str, shape))}")
                model.graph.initializer.append(t)
                add.input[slot] = t.name
            del t.dims[:]
            t.dims.extend(shape)
            stale = [k for k, v in enumerate(model.graph.value_info) if v.name == t.name]
            for k in reversed(stale):
                del model.graph.value_info[k]
            modified = True
        if modified:
            set_nodes(model, list(model.graph.node))
        return modified

    def check(self, model: onnx.ModelProto) -> None:
        super().check(model)
        idx = GraphIndex(model)
        for n in idx.nodes:
            if _splits(n, idx) or _zero_bias(n, idx):
                raise OnnxPassError(f"{self.name}: layer node {n.name} still adds a bias of zeros or, in 16-bit, "
                                    "its bias itself")
        ranks = _ranks(model)
        for i, j, slot in _bias_reads(idx):
            core, add = idx.nodes[i], idx.nodes[j]
            dims = list(idx.inits[add.input[slot]].dims)
            if _matmul_2d(core, idx, ranks) or _stored_shape(core, dims, ranks.get(core.output[0])) is not None:
                raise OnnxPassError(f"{self.name}: 16-bit layer node {core.name} and its bias Add {add.name} are in a "
                                    "form ONNX Runtime fuses (a 2-D MatMul, or a bias below the product's rank)")
