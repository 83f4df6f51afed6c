"""Unique node names: every top-level node gets a name no other node and no graph input has.

Why: plans, profiles, reasons and the ONNX passes address nodes by name, and the op graph puts
graph inputs (placeholders) and nodes in one namespace. Files from other software leave nodes
unnamed or give two nodes one name.

Hand-written rather than onnx_ir's ``NameFixPass``: that pass keeps node names unique among nodes
only (a node may still be called like a graph input), names an unnamed node ``node_<k>`` where
``<op_type>_<position>`` says which node it is, and renames values and subgraph nodes too.
"""

from __future__ import annotations

import onnx
import onnx_ir as ir

from autoprec.onnx.rewrites.base import Rewrite, RewriteResult, apply_to_proto


class NameNodes(Rewrite):
    """Name the main graph's nodes: an unnamed node becomes ``"<op_type>_<index>"`` (its position
    in the graph), a name already taken gets ``"_<n>"`` appended. The result counts the nodes
    (re)named."""

    def call(self, model: ir.Model) -> RewriteResult:
        taken = {v.name for v in model.graph.inputs}
        renamed = 0
        for index, node in enumerate(model.graph):
            base = node.name or f"{node.op_type}_{index}"
            name, k = base, 1
            while name in taken:
                name, k = f"{base}_{k}", k + 1
            if name != node.name:
                node.name = name
                renamed += 1
            taken.add(name)
        return RewriteResult(model, bool(renamed), renamed)


def name_nodes(model: onnx.ModelProto) -> int:
    """Name ``model``'s top-level nodes in place (:class:`NameNodes`); returns how many were (re)named."""
    return apply_to_proto(NameNodes(), model).count
