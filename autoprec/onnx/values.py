"""ONNX values: which element types are floating and which names a graph (with its subgraphs) reads."""

from __future__ import annotations

import onnx
from onnx import TensorProto

#: ONNX floating element types (fp32/fp64/16-bit/fp8): the values a precision plan can touch
FLOAT_TYPES = frozenset({
    TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE,
    TensorProto.FLOAT8E4M3FN, TensorProto.FLOAT8E4M3FNUZ, TensorProto.FLOAT8E5M2,
    TensorProto.FLOAT8E5M2FNUZ,
})


def referenced_names(g: onnx.GraphProto) -> set[str]:
    """Every value name read by a node of ``g`` or of its subgraphs, plus ``g``'s outputs."""
    names = {o.name for o in g.output}
    for node in g.node:
        names.update(i for i in node.input if i)
        for sub in subgraphs(node):
            names.update(referenced_names(sub))
    return names


def subgraphs(node: onnx.NodeProto) -> list[onnx.GraphProto]:
    """The control-flow bodies (If branches, Loop and Scan bodies) a node holds."""
    out = []
    for a in node.attribute:
        if a.type == onnx.AttributeProto.GRAPH:
            out.append(a.g)
        elif a.type == onnx.AttributeProto.GRAPHS:
            out.extend(a.graphs)
    return out
