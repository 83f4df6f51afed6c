"""ONNX pass 3: store each low-precision layer's weight in its format (a real size reduction).

The fp32 initializer a layer reads is replaced, not cast at run time:

- 16-bit layers: the weight rounded to fp16/bf16 (exactly as :func:`autoprec.torch.semantics.quantize_weight`
  rounds it) becomes a 16-bit initializer. In a deployment graph the MatMul/Gemm/Conv reads it
  directly when ONNX admits that type for the op; where it does not (ONNX Conv has no bf16), and in
  an emulation graph, a ``Cast`` to fp32 follows it (ORT folds it once, at session start). An
  embedding's table is its Gather's input 0; Gather admits both 16-bit types, so a deployment graph
  looks the rows up in the 16-bit table and its result is already in the layer's format.
- fp8 layers: the weight becomes fp8 codes with one scale per output channel (amax / max of that
  channel, as semantics does) and a ``DequantizeLinear`` (axis = the output-channel axis) feeds the
  layer in fp32. The codes times the scales are bit for bit the torch emulation's rounded weight.
  A ConvTranspose's weight is [C_in, C_out/group, k...]: one group's scales lie along axis 1; with
  several groups, output channel (g, j) is column j of group g's rows, so the scales vary along
  both axes and the DequantizeLinear is a blocked one (opset 21: axis 0, ``block_size`` C_in/group,
  a scale of shape [group, C_out/group, k...], each repeated over the kernel's positions).
  An fp8 embedding table is the same with axis 0 (its rows): ONNX Gather admits no fp8 type, so the
  Gather looks its rows up in the dequantized fp32 table, and InsertCasts rounds them to bf16.

Biases stay fp32 here: a 16-bit layer's bias is read by its own Add (SplitBias), which InsertCasts
gives a copy in the layer's format; an fp8 layer adds its bias in fp32. Inserted nodes belong to
the layer's group. In a deployment graph the result is type-consistent only after InsertCasts, so
this pass checks the graph's structure, not its types.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto

from autoprec.ort.providers import kernel
from autoprec.core.formats import Precision
from autoprec.core.errors import PlanError
from autoprec.core.fp8 import ROWS, Channels, channel_amax, fp8_codes, fp8_scale
from autoprec.core.kinds import weight_arg_position, weight_channel_axis
from autoprec.core.passes import PassError, PassResult
from autoprec.onnx.passes.base import (FORMAT, GROUP, INSERTED, KIND, LAYER, POLICY, REASON, ROLE,
    ROLE_CORE, SCOPE, VALUE_FORMAT, GraphIndex, OnnxPass, admits, all_names, attr, get_meta,
    make_tensor, node_format, rounded_array, set_meta, set_nodes, unique_name, weight_read, weight_slot)

FP32 = Precision.FP32
MODES = ("deploy", "emulate")


def compute_precision(node: onnx.NodeProto, opset: int, fmt: Precision, mode: str,
                      provider: str | None = None) -> Precision:
    """The element format a node computes in: its group's 16-bit format where the graph is a
    deployment graph, ONNX admits the type for the op and the target ``provider`` (when one is
    named) has a kernel for it (:func:`autoprec.ort.providers.kernel`); fp32 otherwise. fp8 layers
    compute on dequantized fp32 operands, and emulation graphs compute everything in fp32.

    An fp32 node in a 16-bit group reads values already in the group's format and its result is
    rounded to it where it leaves the group: the plan's numerics, on a kernel the provider has."""
    if mode == "emulate" or fmt is FP32 or fmt.is_fp8:
        return FP32
    if not admits(node, opset, fmt.onnx_type):
        return FP32
    if provider is not None and not kernel(node.op_type, fmt, provider).ok:
        return FP32
    return fmt


#: the opset whose DequantizeLinear takes blocked scales (``block_size``)
BLOCKED_DQ_OPSET = 21


def fp8_weight(w_torch_layout: np.ndarray, fmt: Precision, channels: Channels = ROWS
               ) -> tuple[np.ndarray, np.ndarray]:
    """(codes in the torch layout as ``fmt``'s numpy dtype, per-output-channel fp32 scales shaped
    to broadcast against them: [C, 1, ...], or [C_in, C_out/groups, 1, ...] for a transposed
    convolution)."""
    w = np.ascontiguousarray(w_torch_layout, dtype=np.float32)
    scale = fp8_scale(channel_amax(w, channels), fmt)
    return fp8_codes(w, scale, fmt), scale


def dequantize_scale(scale: np.ndarray, shape: tuple[int, ...], channels: Channels
                     ) -> tuple[np.ndarray, dict[str, int]]:
    """The scale input and attributes of the DequantizeLinear that turns codes of ``shape`` (the
    torch layout) back into the weight, given :func:`fp8_weight`'s broadcastable ``scale``: per
    axis (1-D along the output-channel axis), or blocked along axis 0 for a transposed convolution
    with several groups (one block per group; ONNX wants the scale at the codes' rank, so each is
    repeated over the kernel's positions)."""
    if channels.axis == 0:
        return scale.reshape(-1), {"axis": 0}
    rows, cols = shape[0], shape[1]
    block = rows // channels.groups
    if channels.groups == 1:  # every row holds the same scales: one per column
        return scale[0].reshape(-1), {"axis": 1}
    blocked = np.broadcast_to(scale[::block], (channels.groups, cols, *shape[2:]))
    return np.ascontiguousarray(blocked), {"axis": 0, "block_size": block}


def weight_channels(node: onnx.NodeProto) -> Channels:
    """Where the weight of a layer's core node holds its output channels: axis 0, but a
    ConvTranspose's axis 1 with its ``group`` attribute (its weight is [C_in, C_out/group, k...])."""
    axis = weight_channel_axis(get_meta(node, KIND) or "")
    return ROWS if axis == 0 else Channels(axis, int(attr(node, "group", 1)))


def _reads_weight(node: onnx.NodeProto, fmt: Precision | None) -> bool:
    """Whether ``node`` is the core node of a low-precision layer with a weight (linear, conv,
    embedding; a matmul of two activations has none)."""
    return get_meta(node, ROLE) == ROLE_CORE and fmt is not None and fmt is not FP32 \
        and weight_arg_position(get_meta(node, KIND) or "") is not None


class LowerWeights(OnnxPass):
    """Replace the fp32 weight initializer of every 16-bit and fp8 layer."""

    needs = (FORMAT, POLICY)

    def __init__(self, mode: str = "deploy", provider: str | None = None) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown ONNX mode {mode!r}: use one of {MODES}")
        self.mode = mode
        self.provider = provider  # deployment graphs: the provider whose kernels decide (None: any)
        # a deployment graph's 16-bit weights meet fp32 activations until InsertCasts runs
        self.type_consistent = mode == "emulate"

    def call(self, model: onnx.ModelProto) -> PassResult:
        idx = GraphIndex(model)
        taken = all_names(model)
        made: dict[tuple[str, Precision], str] = {}  # (fp32 initializer, 16-bit format) -> stored name
        # (fp32 initializer, fp8 format, transposed, channels) -> (codes, scale, DequantizeLinear
        # attributes): a table that a Gather reads by rows and a MatMul reads by columns needs two
        # sets of scales
        made8: dict[tuple[str, Precision, bool, Channels], tuple[str, str, dict[str, int]]] = {}
        before: dict[int, list[onnx.NodeProto]] = {}  # id(reader) -> inserted nodes that feed it
        for n in idx.nodes:
            fmt = node_format(n)
            read = weight_read(idx, n) if _reads_weight(n, fmt) else None
            if read is None:
                continue
            w_name = read.initializer
            w = idx.array(w_name).astype(np.float32)
            if fmt.is_fp8:
                channels = weight_channels(n)
                if channels.groups > 1 and idx.opset < BLOCKED_DQ_OPSET:
                    raise PlanError(f"{n.name}: the fp8 weight of a ConvTranspose with {channels.groups} groups "
                                    f"has one scale per (group, output channel), which needs the blocked "
                                    f"DequantizeLinear of opset {BLOCKED_DQ_OPSET} (this graph: opset {idx.opset})")
                key8 = (w_name, fmt, read.transposed, channels)
                if key8 not in made8:
                    made8[key8] = self._fp8_initializers(model, taken, w_name, w, read.transposed, fmt, channels)
                codes, scale, dq_attrs = made8[key8]
                dq = onnx.helper.make_node("DequantizeLinear", [codes, scale], [unique_name(taken, f"{w_name}_dq")],
                                           name=unique_name(taken, f"{n.name}_weight_dq"), **dq_attrs)
                self._annotate(dq, n, f"{fmt} weight: codes x per-output-channel scale -> fp32")
                before.setdefault(id(read.reader), []).append(dq)
                read.reader.input[read.slot] = dq.output[0]
            else:
                key = (w_name, fmt)
                if key not in made:
                    t = make_tensor(unique_name(taken, f"{w_name}_{fmt.value}"), rounded_array(w, fmt), fmt.onnx_type)
                    model.graph.initializer.append(t)
                    made[key] = t.name
                stored = made[key]
                if compute_precision(n, idx.opset, fmt, self.mode, self.provider) is fmt:
                    read.reader.input[read.slot] = stored
                else:
                    why = ("emulation: the layer computes in fp32 on the rounded weight" if self.mode == "emulate"
                           else f"no {fmt} {n.op_type} (ONNX schema or the provider's kernels): fp32 compute on "
                                f"the {fmt} weight")
                    c = onnx.helper.make_node("Cast", [stored], [unique_name(taken, f"{stored}_fp32")],
                                              name=unique_name(taken, f"{n.name}_weight_cast"), to=TensorProto.FLOAT)
                    self._annotate(c, n, why)
                    before.setdefault(id(read.reader), []).append(c)
                    read.reader.input[read.slot] = c.output[0]
        if not before and not made and not made8:
            return PassResult(model, False)
        set_nodes(model, [m for n in idx.nodes for m in (*before.get(id(n), ()), n)])
        return PassResult(model, True)

    @staticmethod
    def _fp8_initializers(model: onnx.ModelProto, taken: set[str], w_name: str, w: np.ndarray, transposed: bool,
                          fmt: Precision, channels: Channels) -> tuple[str, str, dict[str, int]]:
        """(codes, scale) initializers of an fp8 weight and its DequantizeLinear's attributes. No
        zero point: an fp8 one can only be 0, DequantizeLinear takes the type from the codes, and a
        stored zero would cost a byte a channel."""
        codes, scale = fp8_weight(w.T if transposed else w, fmt, channels)
        if transposed:  # a MatMul's [in, out]: the output channels are its columns
            codes, stored, dq_attrs = np.ascontiguousarray(codes.T), scale.reshape(-1), {"axis": 1}
        else:
            stored, dq_attrs = dequantize_scale(scale, codes.shape, channels)
        c = make_tensor(unique_name(taken, f"{w_name}_{fmt.value}"), codes, fmt.onnx_type)
        s = make_tensor(unique_name(taken, f"{w_name}_scale"), stored.astype(np.float32), TensorProto.FLOAT)
        model.graph.initializer.extend([c, s])
        return c.name, s.name, dq_attrs

    @staticmethod
    def _annotate(new: onnx.NodeProto, layer_node: onnx.NodeProto, reason: str) -> None:
        for key in (GROUP, KIND, SCOPE, LAYER, POLICY, FORMAT, VALUE_FORMAT):
            v = get_meta(layer_node, key)
            if v is not None:
                set_meta(new, key, v)
        set_meta(new, INSERTED, "weight")
        set_meta(new, REASON, reason)

    def ensures(self, model: onnx.ModelProto) -> None:
        super().ensures(model)
        idx = GraphIndex(model)
        for n in idx.nodes:
            fmt = node_format(n)
            if not _reads_weight(n, fmt):
                continue
            w = n.input[weight_slot(n)]
            via = idx.nodes[idx.producer[w]] if w in idx.producer else None
            if via is not None and via.op_type == "Transpose":  # a tied table read through a Transpose
                w = via.input[0]
            if w in idx.inits:
                if idx.elem_type(w) != fmt.onnx_type:
                    raise PassError(f"{self.name}: {n.name} reads weight {w} of type {idx.elem_type(w)}, not {fmt}")
                continue
            p = idx.nodes[idx.producer[w]] if w in idx.producer else None
            if p is None or get_meta(p, INSERTED) != "weight" or p.input[0] not in idx.inits \
                    or idx.elem_type(p.input[0]) != fmt.onnx_type:
                raise PassError(f"{self.name}: {n.name} ({fmt}) does not read a {fmt} weight initializer")

