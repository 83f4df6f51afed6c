"""ONNX pass 4: keep a deployment graph's 16-bit roundings out of ONNX Runtime's fusions.

In a deployment graph every 16-bit node rounds its result to its type, and the plan's numerics
(DESIGN.md; :mod:`autoprec.torch.semantics`) are those roundings. ONNX Runtime's graph optimizers run in
every session, whatever the provider, and some of them fuse two 16-bit nodes into one kernel that
skips the rounding between them (onnxruntime/core/optimizer; each checked on onnxruntime 1.31's CPU
provider, which runs the same rewrites on fp32 graphs):

- ``MatMulAddFusion`` (level 1, every provider) turns a 2-D MatMul + Add of a 1-D or ``[1, N]``
  constant into a Gemm with C, however dynamic the batch, and a static-shaped N-D one with a 1-D
  constant into Reshape + Gemm + Reshape: cuBLAS adds C before its single rounding;
- ``BiasGeluFusion`` (level 2, CPU and CUDA) folds an Add of a 1-D constant into the Gelu after it,
  which then reads the sum unrounded;
- ``MatMulScaleFusion`` (level 2, CPU and CUDA) folds a Mul or Div by a one-element constant before
  or after a MatMul into a FusedMatMul's ``alpha``, which scales the accumulator before its single
  rounding (attention's ``q @ k^T * scale``: on the all-bf16 char_transformer this alone moves the
  outputs by a relative L2 of 8.5e-3 and changes 0.8% of the next tokens:
  ``benchmarks/scale_fusion.py``).

So, where a node computes in 16 bits (fp16/bf16 types, as the file says):

- a constant an Add reads is stored at the rank of the Add's result (``[1, ..., 1, N]``), which
  broadcasts to the same sum and which neither pattern accepts;
- a MatMul of two matrices whose result an Add of a constant reads becomes a Gemm without C: the
  same product, and ORT fuses no Gemm with an Add;
- a one-element constant a Mul or Div next to a MatMul reads (the scale) is repeated along an axis
  of the other operand whose size is static and above one, so that it is no longer a scalar to ORT;
  without such an axis it stays (and the GPU parity check shows what the fusion changes). (An erf
  GELU another exporter wrote as Div, Erf, Add, Mul, Mul is one Gelu node by then:
  :func:`autoprec.onnx.graph.fuse_erf_gelus`.)

fp32 nodes are left alone: ORT's fusions there reorder fp32 arithmetic but drop no 16-bit rounding.
``ConvAddFusion`` (level 1) folds a Conv's bias Add back into its B; that is harmless (see
:mod:`autoprec.onnx.passes.split_bias`). An emulation graph computes in fp32 between explicit roundings, so
this pass finds nothing to do there.

Runs last, after InsertCasts, when every value has its final type.
"""

from __future__ import annotations

import copy

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from autoprec.core.passes import PassError, PassResult
from autoprec.onnx.passes.base import (GraphIndex, OnnxPass, all_names, infer_types, make_tensor,
    set_nodes, unique_name)

_16BIT = (TensorProto.FLOAT16, TensorProto.BFLOAT16)
_MATMULS = ("MatMul",)

#: a value's (element type, dims): a dim is its size, or None where it is symbolic
Shape = tuple[int, list[int | None]]


def _shapes(model: onnx.ModelProto) -> dict[str, Shape]:
    """Element type and dims of every value ONNX shape inference can tell in ``model`` (a copy is
    inferred; ``model`` is not changed)."""
    g = infer_types(copy.deepcopy(model)).graph
    out: dict[str, Shape] = {}
    for v in list(g.input) + list(g.output) + list(g.value_info):
        tt = v.type.tensor_type
        if v.type.HasField("tensor_type") and tt.HasField("shape"):
            out[v.name] = (tt.elem_type, [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim])
    for t in g.initializer:
        out[t.name] = (t.data_type, list(t.dims))
    return out


class KeepRoundings(OnnxPass):
    """Rewrite the 16-bit node pairs ORT would fuse past a rounding into forms it does not fuse."""

    def call(self, model: onnx.ModelProto) -> PassResult:
        shapes = _shapes(model)
        idx = GraphIndex(model)
        self._model, self._idx, self._taken = model, idx, all_names(model)
        self._listed = {v.name for v in list(model.graph.input) + list(model.graph.output)}
        self._made: dict[tuple[str, tuple[int, ...]], str] = {}  # (initializer, dims) -> the one stored so
        modified = False
        for n in idx.nodes:
            if not _is_16bit(shapes, n.output[0] if n.output else ""):
                continue
            if n.op_type == "Add":
                for k in _lower_rank_constants(n, idx, shapes):
                    rank = len(shapes[n.output[0]][1])
                    dims = list(idx.inits[n.input[k]].dims)
                    n.input[k] = self._stored(n.input[k], [*([1] * (rank - len(dims))), *dims])
                    modified = True
            elif n.op_type == "MatMul" and _matrix_product_with_added_constant(n, idx, shapes):
                n.op_type = "Gemm"  # the same product: alpha 1, no transposes, no C
                modified = True
            elif n.op_type in ("Mul", "Div"):
                for k in _scale_slots(n, idx, shapes):
                    axis = _static_axis(shapes.get(n.input[1 - k]))
                    if axis is not None:
                        rank, at, size = axis
                        n.input[k] = self._stored(n.input[k], [size if d == at else 1 for d in range(rank)])
                        modified = True
        if modified:
            set_nodes(model, list(model.graph.node))
        return PassResult(model, modified)

    def _stored(self, name: str, dims: list[int]) -> str:
        """Initializer ``name``'s values broadcast to ``dims`` (a reshape, or a one-element constant
        repeated), made once per (initializer, dims): in place where only one node reads it and the
        graph does not list it, else as a new initializer. Returns the name to read."""
        key = (name, tuple(dims))
        if key in self._made:
            return self._made[key]
        old = self._idx.inits[name]
        if int(np.prod(dims)) != _numel(old):  # a scale repeated along an axis
            value = numpy_helper.to_array(old).reshape(())
            t = make_tensor(unique_name(self._taken, f"{name}_x{int(np.prod(dims))}"),
                            np.full(dims, value, dtype=value.dtype), old.data_type)
            self._model.graph.initializer.append(t)
        elif len(self._idx.consumers.get(name, [])) > 1 or name in self._listed:
            t = TensorProto()
            t.CopyFrom(old)
            t.name = unique_name(self._taken, f"{name}_{'x'.join(map(str, dims))}")
            del t.dims[:]
            t.dims.extend(dims)
            self._model.graph.initializer.append(t)
        else:
            t = old
            del t.dims[:]
            t.dims.extend(dims)
            vi = self._model.graph.value_info
            for k in reversed([k for k, v in enumerate(vi) if v.name == name]):
                del vi[k]
        self._made[key] = t.name
        return t.name

    def ensures(self, model: onnx.ModelProto) -> None:
        super().ensures(model)
        shapes = _shapes(model)
        idx = GraphIndex(model)
        for n in idx.nodes:
            if not _is_16bit(shapes, n.output[0] if n.output else ""):
                continue
            if n.op_type == "Add" and _lower_rank_constants(n, idx, shapes):
                raise PassError(f"{self.name}: the 16-bit Add {n.name} reads a constant below its result's rank, "
                                    "which ONNX Runtime fuses into the op before or after it")
            if n.op_type == "MatMul" and _matrix_product_with_added_constant(n, idx, shapes):
                raise PassError(f"{self.name}: the 16-bit MatMul {n.name} of two matrices and the Add after it "
                                    "would become one Gemm in ONNX Runtime")
            if n.op_type in ("Mul", "Div") and any(_static_axis(shapes.get(n.input[1 - k])) is not None
                                                    for k in _scale_slots(n, idx, shapes)):
                raise PassError(f"{self.name}: the 16-bit {n.op_type} {n.name} scales a MatMul by a scalar, "
                                    "which ONNX Runtime folds into the MatMul")


def _is_16bit(shapes: dict[str, Shape], name: str) -> bool:
    return name in shapes and shapes[name][0] in _16BIT


def _numel(t: TensorProto) -> int:
    return int(np.prod(t.dims)) if t.dims else 1


def _lower_rank_constants(add: onnx.NodeProto, idx: GraphIndex, shapes: dict[str, Shape]) -> list[int]:
    """Slots of ``add``'s initializer operands of more than one element whose rank is below the
    result's (where shape inference knows the result's rank)."""
    if add.output[0] not in shapes:
        return []
    rank = len(shapes[add.output[0]][1])
    return [k for k, u in enumerate(add.input)
            if u in idx.inits and _numel(idx.inits[u]) > 1 and len(idx.inits[u].dims) < rank]


def _matrix_product_with_added_constant(matmul: onnx.NodeProto, idx: GraphIndex, shapes: dict[str, Shape]) -> bool:
    """Whether ``matmul`` multiplies two matrices and an Add of an initializer reads its result."""
    if any(len(shapes.get(u, (0, []))[1]) != 2 for u in matmul.input[:2]):
        return False
    return any(idx.nodes[j].op_type == "Add" and any(u in idx.inits for u in idx.nodes[j].input)
               for j, _ in idx.consumers.get(matmul.output[0], []))


def _scale_slots(node: onnx.NodeProto, idx: GraphIndex, shapes: dict[str, Shape]) -> list[int]:
    """Slots of the one-element initializers by which Mul/Div ``node`` scales a MatMul's result, or
    an operand whose product a MatMul reads (Div: only its divisor scales)."""
    slots = [1] if node.op_type == "Div" else [0, 1]
    beside = any(idx.nodes[j].op_type in _MATMULS for j, _ in idx.consumers.get(node.output[0], []))
    out = []
    for k in slots:
        u, other = node.input[k], node.input[1 - k]
        if u not in idx.inits or _numel(idx.inits[u]) != 1:
            continue
        p = idx.producer.get(other)
        if beside or (p is not None and idx.nodes[p].op_type in _MATMULS):
            out.append(k)
    return out


def _static_axis(shape: Shape | None) -> tuple[int, int, int] | None:
    """(rank, axis, size) of the last axis of ``shape`` whose size is static and above one."""
    if shape is None:
        return None
    dims = shape[1]
    for at in range(len(dims) - 1, -1, -1):
        if dims[at] is not None and dims[at] > 1:
            return len(dims), at, dims[at]
    return None
