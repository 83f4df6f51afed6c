"""ONNX pass 1 for models given as .onnx files: annotate nodes from the analyser's op graph.

The counterpart of :mod:`autoprec.onnx.passes.map_layers` for a model that did not come from the torch
exporter. There is no torch capture to pair with: the plan's layers *are* ONNX nodes, named by
:func:`autoprec.onnx.graph.analyse_onnx` (which gives every node a unique name), and the groups are
the analyser's -- one node each, except the nodes that compute one op together and round its
result once: a decomposed layer norm, and a MatMul with the Add of its bias.

Writes GROUP, KIND and SCOPE on every node, LAYER on the nodes of layer groups and ROLE=core on
each layer's MatMul/Gemm/Conv node, so AssignFormats, LowerWeights and InsertCasts run unchanged.
"""

from __future__ import annotations

import onnx

from autoprec.core.errors import PlanError
from autoprec.onnx.graph import OnnxAnalysis
from autoprec.core.passes import PassError, PassResult
from autoprec.onnx.passes.base import GROUP, KIND, LAYER, ROLE, ROLE_CORE, SCOPE, OnnxPass, \
    get_meta, mark_layer, set_meta


class MapNodes(OnnxPass):
    """Write each node's group, kind and scope, and mark the plan's layers, from ``analysis``."""

    def __init__(self, analysis: OnnxAnalysis) -> None:
        self.analysis = analysis

    def call(self, model: onnx.ModelProto) -> PassResult:
        graph, groups = self.analysis.graph, self.analysis.groups
        names = [n.name for n in model.graph.node]
        unknown = [n for n in names if n not in groups or n not in graph]
        if unknown or len(names) != len(groups):
            raise PlanError(f"this ONNX model is not the one that was analysed (node(s) {', '.join(unknown[:3]) or '?'} "
                            "unknown, or nodes missing): run the passes on OnnxAnalysis.model")
        for n in model.graph.node:
            head = graph[groups[n.name]]
            set_meta(n, GROUP, head.name)
            set_meta(n, KIND, head.kind)
            set_meta(n, SCOPE, head.scope)
            if head.is_layer:
                mark_layer(n, head.name, n.name == head.name)
        return PassResult(model, modified=False)  # metadata only

    def ensures(self, model: onnx.ModelProto) -> None:
        super().ensures(model)
        cores = [get_meta(n, LAYER) for n in model.graph.node if get_meta(n, ROLE) == ROLE_CORE]
        layers = self.analysis.graph.layer_names()
        if sorted(c or "" for c in cores) != sorted(layers):
            raise PassError(f"{self.name}: core nodes {sorted(c or '' for c in cores)} are not the layers {layers}")
