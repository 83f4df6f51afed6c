"""Fold inference batch norms of an ONNX graph into the Conv before them (:mod:`autoprec.core.bn_fold`'s arithmetic)."""

from __future__ import annotations

import onnx
from onnx import TensorProto, numpy_helper

from autoprec.onnx.values import referenced_names
from autoprec.core.bn_fold import shapes_fold, fold_batch_norm, folded_bias_name

def _sub_references(g: onnx.GraphProto) -> set[str]:
    """Names read inside the control-flow subgraphs of ``g``'s nodes (outer-scope reads)."""
    names: set[str] = set()
    for node in g.node:
        for a in node.attribute:
            for sub in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
                names |= referenced_names(sub)
    return names


def fold_onnx_batch_norms(model: onnx.ModelProto) -> list[str]:
    """Fold every ``Conv -> BatchNormalization`` pair of ``model``'s main graph in place; return the
    folded norms' node names.

    A pair folds when the norm is in inference mode (one output, ``training_mode`` 0), its four
    parameters are fp32 initializers, the Conv (default domain) writes a value only the norm reads,
    and the Conv's weight is an fp32 initializer only it reads (its bias, if any, an fp32
    initializer). The Conv takes the norm's output name, its weight initializer keeps its name with
    the folded values, and its bias is named by :func:`folded_bias_name`; initializers nothing
    reads any more are dropped.
    """
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    readers: dict[str, int] = {}
    producer: dict[str, onnx.NodeProto] = {}
    for n in g.node:
        for i in n.input:
            if i:
                readers[i] = readers.get(i, 0) + 1
        for o in n.output:
            producer[o] = n
    pinned = {o.name for o in g.output} | _sub_references(g)
    graph_inputs = {v.name for v in g.input}

    def fp32_init(name: str, single_reader: bool) -> bool:
        return (name in inits and inits[name].data_type == TensorProto.FLOAT and name not in pinned
                and (not single_reader or readers.get(name, 0) == 1))

    folded: list[str] = []
    drop: set[str] = set()
    for bn in list(g.node):
        if bn.op_type != "BatchNormalization" or bn.domain not in ("", "ai.onnx"):
            continue
        training = next((a.i for a in bn.attribute if a.name == "training_mode"), 0)
        if training or len([o for o in bn.output if o]) != 1 or len(bn.input) != 5:
            continue
        conv = producer.get(bn.input[0])
        if conv is None or conv.op_type != "Conv" or conv.domain not in ("", "ai.onnx"):
            continue
        if readers.get(conv.output[0], 0) != 1 or conv.output[0] in pinned or len(conv.input) < 2:
            continue
        has_bias = len(conv.input) > 2 and bool(conv.input[2])
        if not all(fp32_init(p, False) for p in bn.input[1:]) or not fp32_init(conv.input[1], True) \
                or (has_bias and not fp32_init(conv.input[2], False)):
            continue
        w = numpy_helper.to_array(inits[conv.input[1]])
        gamma, beta, mean, var = (numpy_helper.to_array(inits[p]) for p in bn.input[1:])
        if not shapes_fold(w, mean.size):
            continue
        eps = next((a.f for a in bn.attribute if a.name == "epsilon"), 1e-5)
        bias = numpy_helper.to_array(inits[conv.input[2]]) if has_bias else None
        fw, fb = fold_batch_norm(w, bias, mean, var, gamma, beta, eps)
        inits[conv.input[1]].CopyFrom(numpy_helper.from_array(fw, conv.input[1]))
        bias_name = folded_bias_name(conv.input[1])
        own = has_bias and conv.input[2] == bias_name and readers[bias_name] == 1  # rewritten in place
        if not own:
            i, base = 2, bias_name  # the name may hold some other value
            while bias_name in inits or bias_name in producer or bias_name in graph_inputs:
                bias_name, i = f"{base}_{i}", i + 1
            if has_bias:
                drop.add(conv.input[2])  # dropped at the end unless something else reads it
        if bias_name in inits:
            inits[bias_name].CopyFrom(numpy_helper.from_array(fb, bias_name))
        else:
            t = numpy_helper.from_array(fb, bias_name)
            g.initializer.append(t)
            inits[bias_name] = g.initializer[-1]
        del conv.input[2:]
        conv.input.append(bias_name)
        old_out = conv.output[0]
        conv.output[0] = bn.output[0]
        producer[bn.output[0]] = conv
        stale = [v for v in g.value_info if v.name == old_out]
        for v in stale:
            g.value_info.remove(v)
        drop.update(bn.input[1:])
        g.node.remove(bn)
        folded.append(bn.name)
    if folded:
        used = {i for n in g.node for i in n.input} | pinned
        keep = [t for t in g.initializer if t.name not in drop or t.name in used]
        del g.initializer[:]
        g.initializer.extend(keep)
        kept = {t.name for t in keep}
        ins = [v for v in g.input if v.name not in drop or v.name in kept]
        del g.input[:]
        g.input.extend(ins)
    return folded
