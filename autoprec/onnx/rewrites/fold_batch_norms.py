"""Batch-norm folding on ONNX graphs: an inference ``BatchNormalization`` that alone reads a ``Conv`` goes into it.

Why: the torch capture folds such norms (:mod:`autoprec.torch.bn_fold`), so a plan's convolution is
the folded one; the torch model's export (:mod:`autoprec.deploy.export`) and an ONNX input must fold
them the same way, with the one fp32 definition in :mod:`autoprec.core.bn_fold`, for plans and
weights to agree bit for bit.

A hand-written onnx_ir pass rather than an onnxscript rewrite rule: the Conv must stay the node it
is (its name, attributes and metadata address the plan's layer) and its weight initializer must keep
its name with the folded values (the export's layers are matched to the capture's by weight name);
a rewrite rule replaces nodes and adds initializers, which would rename both.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from autoprec.core.bn_fold import fold_batch_norm, folded_bias_name, shapes_fold
from autoprec.onnx.rewrites.base import Rewrite, RewriteResult, constant, drop_initializers


@dataclasses.dataclass
class FoldBatchNormsResult(RewriteResult):
    """The result of :class:`FoldBatchNorms`, with the folded norms' node names."""

    norms: tuple[str, ...] = ()


def _default_domain(node: ir.Node | None, op_type: str) -> bool:
    return node is not None and node.op_type == op_type and node.domain in ("", "ai.onnx")


def _pinned(value: ir.Value, graph: ir.Graph) -> bool:
    """Whether the graph's signature or a subgraph (an outer-scope read) holds on to ``value``."""
    return value.is_graph_output() or any(use.node.graph is not graph for use in value.uses())


def _fp32_initializer(value: ir.Value | None, graph: ir.Graph, only_reader: bool) -> bool:
    """An fp32 initializer of ``graph`` that the fold may rewrite (``only_reader``: one reader)."""
    return (value is not None and value.is_initializer() and value.const_value is not None
            and value.dtype == ir.DataType.FLOAT and not _pinned(value, graph)
            and (not only_reader or len(value.uses()) == 1))


def _array(value: ir.Value | None) -> np.ndarray:
    array = constant(value)
    assert array is not None  # _fp32_initializer said so
    return array


class FoldBatchNorms(Rewrite):
    """Fold every ``Conv -> BatchNormalization`` pair of the main graph.

    A pair folds when the norm is in inference mode (one output, ``training_mode`` 0), its four
    parameters are fp32 initializers, the Conv (default domain) writes a value only the norm reads,
    and the Conv's weight is an fp32 initializer only it reads (its bias, if any, an fp32
    initializer). The Conv takes the norm's output, its weight initializer keeps its name with the
    folded values, and its bias is named by :func:`folded_bias_name`; initializers nothing reads any
    more are dropped.
    """

    def call(self, model: ir.Model) -> FoldBatchNormsResult:
        graph = model.graph
        taken = {v.name for v in graph.inputs} | set(graph.initializers) | {
            v.name for node in graph for v in node.outputs}
        folded: list[str] = []
        unread: list[ir.Value] = []
        for bn in list(graph):
            if not _default_domain(bn, "BatchNormalization") or bn.attributes.get_int("training_mode", 0):
                continue
            if len([o for o in bn.outputs if o.name]) != 1 or len(bn.inputs) != 5:
                continue
            conv = bn.inputs[0].producer() if bn.inputs[0] is not None else None
            if conv is None or not _default_domain(conv, "Conv") or conv.graph is not graph or len(conv.inputs) < 2:
                continue
            out = conv.outputs[0]
            if len(out.uses()) != 1 or _pinned(out, graph):
                continue
            weight, bias = conv.inputs[1], conv.inputs[2] if len(conv.inputs) > 2 else None
            params = bn.inputs[1:]
            if not all(_fp32_initializer(p, graph, False) for p in params) or not _fp32_initializer(weight, graph, True) \
                    or (bias is not None and not _fp32_initializer(bias, graph, False)):
                continue
            assert weight is not None and weight.name is not None
            w, b = _array(weight), (_array(bias) if bias is not None else None)
            gamma, beta, mean, var = (_array(p) for p in params)
            if not shapes_fold(w, mean.size):
                continue
            fw, fb = fold_batch_norm(w, b, mean, var, gamma, beta, bn.attributes.get_float("epsilon", 1e-5))
            weight.const_value = ir.tensor(fw, name=weight.name)
            name = folded_bias_name(weight.name)
            if bias is not None and bias.name == name and len(bias.uses()) == 1:  # its own bias: rewritten in place
                bias.const_value = ir.tensor(fb, name=name)
            else:
                base, k = name, 2
                while name in taken:  # the name may hold some other value
                    name, k = f"{base}_{k}", k + 1
                taken.add(name)
                new_bias = ir.Value(name=name, shape=ir.Shape(fb.shape), type=ir.TensorType(ir.DataType.FLOAT),
                                    const_value=ir.tensor(fb, name=name))
                graph.register_initializer(new_bias)
                if bias is not None:
                    unread.append(bias)
                conv.resize_inputs(3)
                conv.replace_input_with(2, new_bias)
            result = bn.outputs[0]
            result.replace_all_uses_with(out, replace_graph_outputs=True)
            graph.remove(bn, safe=True)
            out.name = result.name
            unread.extend(p for p in params if p is not None)
            folded.append(bn.name or "")
        drop_initializers(graph, unread)
        return FoldBatchNormsResult(model, bool(folded), len(folded), tuple(folded))
