"""ONNX pass (deployment graphs, on request): graph inputs and outputs in a 16-bit format.

A deployment graph takes and returns fp32 by default. A serving stack that already holds its
tensors in fp16 can ask for fp16 inputs and outputs instead (``autoprec export --io fp16``):

- a floating graph input becomes fp16. The ``Cast`` to fp16 that InsertCasts put after it goes (its
  readers read the input itself); readers that want fp32 read one shared ``Cast`` to fp32.
- a floating graph output becomes fp16 through a ``Cast`` at the end; where the value was an fp16
  result cast to fp32 for the output, that pair becomes an ``Identity`` of the fp16 result.

The model's numerics are those of the plan applied to inputs that are fp16 already: a caller who
has fp32 data rounds it once, at the input. Only fp16: ONNX Runtime's Python API has no numpy type
for bf16, so no caller could feed or read a bf16 graph.

In an emulation graph (``mode="emulate"``) the inputs and outputs keep their fp32 type and are
rounded to fp16 instead (``Cast`` to fp16 and back), so ORT's CPU provider measures what the fp16
file computes.
"""

from __future__ import annotations

import onnx
from onnx import TensorProto

from autoprec.core.formats import Precision
from autoprec.core.passes import PassError, PassResult
from autoprec.onnx.passes.base import (INSERTED, GraphIndex, OnnxPass, all_names, attr, get_meta,
    infer_types, set_meta, unique_name)

#: the formats a graph's inputs and outputs can take
IO_FORMATS = (Precision.FP32, Precision.FP16)
#: ops that read only their input's shape: they read an fp16 input as it is
SHAPE_READERS = frozenset({"Shape", "Size"})


class IOFormat(OnnxPass):
    """Make every fp32 graph input and output ``fmt`` (fp16); in an emulation graph, round them to it."""

    def __init__(self, fmt: Precision, mode: str = "deploy") -> None:
        if fmt not in IO_FORMATS or fmt is Precision.FP32:
            raise ValueError(f"graph inputs and outputs can be fp16 only, not {fmt}")
        if mode not in ("deploy", "emulate"):
            raise ValueError(f"unknown ONNX mode {mode!r}: use 'deploy' or 'emulate'")
        self.fmt = fmt
        self.mode = mode

    def call(self, model: onnx.ModelProto) -> PassResult:
        if self.mode == "emulate":
            return self._round(model)
        g = model.graph
        idx = GraphIndex(infer_types(model))  # the element type of every value, for the output peephole
        taken = all_names(model)
        t = self.fmt.onnx_type
        new_nodes: list[onnx.NodeProto] = []
        dropped: set[int] = set()
        rename: dict[str, str] = {}  # value a reader read -> what it reads now
        modified = False
        for vi in g.input:
            if vi.name in idx.inits or vi.type.tensor_type.elem_type != TensorProto.FLOAT:
                continue
            vi.type.tensor_type.elem_type = t
            modified = True
            fp32_readers: dict[int, onnx.NodeProto] = {}  # by node index: a node may read the input twice
            for i, _ in idx.consumers.get(vi.name, []):
                n = idx.nodes[i]
                if n.op_type == "Cast" and attr(n, "to") == t and get_meta(n, INSERTED) and n.output[0] not in \
                        idx.outputs:
                    dropped.add(i)  # its readers read the input itself
                    rename[n.output[0]] = vi.name
                elif n.op_type not in SHAPE_READERS:
                    fp32_readers[i] = n
            if fp32_readers:
                widened = unique_name(taken, f"{vi.name}_fp32")
                c = onnx.helper.make_node("Cast", [vi.name], [widened], name=unique_name(taken, f"{widened}_Cast"),
                                          to=TensorProto.FLOAT)
                set_meta(c, INSERTED, "cast")
                new_nodes.append(c)
                for n in fp32_readers.values():
                    n.input[:] = [widened if x == vi.name else x for x in n.input]
        for i, n in enumerate(idx.nodes):
            if i in dropped:
                continue
            n.input[:] = [rename.get(x, x) for x in n.input]
            new_nodes.append(n)
        tail: list[onnx.NodeProto] = []
        producer = {o: n for n in new_nodes for o in n.output}
        readers = {x for n in new_nodes for x in n.input}
        for vo in g.output:
            if vo.type.tensor_type.elem_type != TensorProto.FLOAT:
                continue
            vo.type.tensor_type.elem_type = t
            modified = True
            p = producer.get(vo.name)
            if p is not None and p.op_type == "Cast" and get_meta(p, INSERTED) and vo.name not in readers \
                    and idx.types.get(p.input[0]) == t:
                p.op_type = "Identity"  # an fp16 result cast to fp32 for the output: hand it out as it is
                del p.attribute[:]
                continue
            raw = unique_name(taken, f"{vo.name}_fp32")
            if p is not None:
                p.output[:] = [raw if x == vo.name else x for x in p.output]
            for n in new_nodes:
                n.input[:] = [raw if x == vo.name else x for x in n.input]
            c = onnx.helper.make_node("Cast", [raw], [vo.name], name=unique_name(taken, f"{vo.name}_Cast"), to=t)
            set_meta(c, INSERTED, "cast")
            tail.append(c)
        if modified:
            del g.node[:]
            g.node.extend(new_nodes + tail)
        return PassResult(model, modified)

    def _round(self, model: onnx.ModelProto) -> PassResult:
        """Emulation: a rounding pair after every fp32 input and before every fp32 output."""
        g = model.graph
        taken = all_names(model)
        inits = {t.name for t in g.initializer}
        head: list[onnx.NodeProto] = []
        tail: list[onnx.NodeProto] = []
        for vi in g.input:
            if vi.name in inits or vi.type.tensor_type.elem_type != TensorProto.FLOAT:
                continue
            rounded = unique_name(taken, f"{vi.name}_{self.fmt.value}")
            pair = self._pair(taken, vi.name, rounded)
            for n in g.node:
                n.input[:] = [rounded if x == vi.name else x for x in n.input]
            head += pair
        for vo in g.output:
            if vo.type.tensor_type.elem_type != TensorProto.FLOAT:
                continue
            raw = unique_name(taken, f"{vo.name}_fp32")
            for n in g.node:
                n.output[:] = [raw if x == vo.name else x for x in n.output]
                n.input[:] = [raw if x == vo.name else x for x in n.input]
            tail += self._pair(taken, raw, vo.name)
        if not (head or tail):
            return PassResult(model, False)
        nodes = head + list(g.node) + tail
        del g.node[:]
        g.node.extend(nodes)
        return PassResult(model, True)

    def _pair(self, taken: set[str], src: str, dst: str) -> list[onnx.NodeProto]:
        """Cast ``src`` to the I/O format and back to fp32 as ``dst`` (ORT keeps the rounding of such a pair)."""
        mid = unique_name(taken, f"{src}_as_{self.fmt.value}")
        pair = [onnx.helper.make_node("Cast", [src], [mid], name=unique_name(taken, f"{mid}_Cast"),
                                      to=self.fmt.onnx_type),
                onnx.helper.make_node("Cast", [mid], [dst], name=unique_name(taken, f"{dst}_Cast"),
                                      to=TensorProto.FLOAT)]
        for c in pair:
            set_meta(c, INSERTED, "round")
        return pair

    def ensures(self, model: onnx.ModelProto) -> None:
        super().ensures(model)
        if self.mode == "emulate":
            return
        g = model.graph
        inits = {t.name for t in g.initializer}
        wrong = [v.name for v in list(g.input) + list(g.output)
                 if v.name not in inits and v.type.tensor_type.elem_type == TensorProto.FLOAT]
        if wrong:
            raise PassError(f"{self.name}: graph value(s) {', '.join(wrong)} are still fp32, not {self.fmt}")
