"""Fold an inference-mode batch norm into the convolution before it, the same way in torch and ONNX.

A deployment runtime folds ``conv -> BatchNorm`` into one convolution (ONNX Runtime's
``ConvBNFusion``, TensorRT), but only where it sees fp32 parameters: behind a 16-bit convolution
the norm stays a kernel of its own between two Casts (on an H100, digits_resnet with a dozen fp16
convolutions so deployed ran at 0.71x of its fp32 graph's speed). So autoprec folds first, in
fp32, before anything is profiled or planned: the plan then applies to the folded convolution,
whose weight is rounded once to the layer's format, and a 16-bit chain conv -> relu -> conv stays
16-bit end to end.

The fold is one numerical definition (:func:`fold_batch_norm`, numpy fp32, each operation rounded
once, no fused multiply-add) used by both graph rewrites: :func:`fold_fx_batch_norms` on the torch
capture and :func:`fold_onnx_batch_norms` on ONNX graphs (the torch model's export and `.onnx`
inputs). Both fold exactly the norms that read a convolution's output and are its only reader, with
constant running statistics, so the folded weights of one model agree bit for bit between the two
(``MapLayers`` checks every layer's weight). The fold is for inference: a module that trains keeps
its norms (``capture(..., fold_norms=False)``).

    scale = gamma / sqrt(var + eps)
    W'    = W * scale           (per output channel)
    b'    = (b - mean) * scale + beta
"""

from __future__ import annotations

import copy
from operator import attrgetter
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from autoprec.kinds import CONV_KINDS

if TYPE_CHECKING:
    import torch.fx as fx

F32 = np.float32


def fold_batch_norm(weight: np.ndarray, bias: np.ndarray | None, mean: np.ndarray, var: np.ndarray,
                    gamma: np.ndarray | None, beta: np.ndarray | None, eps: float) -> tuple[np.ndarray, np.ndarray]:
    """The folded (weight, bias) of a convolution followed by an inference batch norm, in fp32.

    ``weight`` has its output channels on axis 0 (Conv1d/2d/3d, grouped too); a missing ``bias``,
    ``gamma`` or ``beta`` is 0, 1 and 0. ``eps`` is taken as fp32, as ONNX stores it.
    """
    w = np.asarray(weight, dtype=F32)
    m, v = np.asarray(mean, dtype=F32), np.asarray(var, dtype=F32)
    g = np.ones_like(m) if gamma is None else np.asarray(gamma, dtype=F32)
    be = np.zeros_like(m) if beta is None else np.asarray(beta, dtype=F32)
    b = np.zeros_like(m) if bias is None else np.asarray(bias, dtype=F32)
    scale = g / np.sqrt(v + F32(eps))
    folded_w = w * scale.reshape((-1,) + (1,) * (w.ndim - 1))
    folded_b = (b - m) * scale + be
    return folded_w.astype(F32, copy=False), folded_b.astype(F32, copy=False)


def folded_bias_name(weight_name: str) -> str:
    """The name the folded bias takes: ``conv.weight`` -> ``conv.bias`` (the torch parameter name a
    convolution's bias has), else ``<weight>.bias``. Both rewrites use it, so a deployment graph's
    initializers keep the captured module's parameter names."""
    stem, dot, leaf = weight_name.rpartition(".")
    return f"{stem}.bias" if dot and leaf == "weight" else f"{weight_name}.bias"


def _shapes_fold(weight: np.ndarray | Any, channels: int) -> bool:
    return len(weight.shape) in (3, 4, 5) and int(weight.shape[0]) == channels


# --- ONNX -------------------------------------------------------------------------------------


def _sub_references(g: onnx.GraphProto) -> set[str]:
    """Names read inside the control-flow subgraphs of ``g``'s nodes (outer-scope reads)."""
    from autoprec.onnx_graph import referenced_names  # onnx_graph imports this module

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
        if not _shapes_fold(w, mean.size):
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


# --- torch.fx ---------------------------------------------------------------------------------


def _norm_of(gm: fx.GraphModule, node: fx.Node) -> dict[str, Any] | None:
    """An inference batch norm node's input, parameters (tensors or None) and eps; None for anything
    else (a norm in training mode, one without running stats, one whose parameters are computed)."""
    import torch
    import torch.fx as fx
    import torch.nn as nn
    import torch.nn.functional as F
    from torch.fx.operator_schemas import normalize_function

    def tensor(arg: Any) -> Any:
        if arg is None:
            return None
        if isinstance(arg, fx.Node) and arg.op == "get_attr":
            return attrgetter(str(arg.target))(gm)
        raise LookupError(arg)

    try:
        if node.op == "call_module":
            mod = gm.get_submodule(str(node.target))
            if not isinstance(mod, nn.modules.batchnorm._BatchNorm) or mod.training \
                    or mod.running_mean is None or mod.running_var is None:
                return None
            return {"input": node.args[0], "mean": mod.running_mean, "var": mod.running_var, "gamma": mod.weight,
                    "beta": mod.bias, "eps": mod.eps}
        if node.op != "call_function":
            return None
        if node.target is F.batch_norm:
            a = normalize_function(F.batch_norm, tuple(node.args), dict(node.kwargs),
                                   normalize_to_only_use_kwargs=True)
            if a is None or a.kwargs.get("training") or a.kwargs.get("running_mean") is None:
                return None
            k = a.kwargs
            return {"input": k["input"], "mean": tensor(k["running_mean"]), "var": tensor(k["running_var"]),
                    "gamma": tensor(k.get("weight")), "beta": tensor(k.get("bias")), "eps": k.get("eps", 1e-5)}
        if node.target is torch.ops.aten.batch_norm.default:  # what torch.export keeps of a module
            x, gamma, beta, mean, var, training, _momentum, eps = (list(node.args) + [None] * 8)[:8]
            if training or mean is None or var is None:
                return None
            return {"input": x, "mean": tensor(mean), "var": tensor(var), "gamma": tensor(gamma),
                    "beta": tensor(beta), "eps": 1e-5 if eps is None else eps}
    except LookupError:
        return None
    return None


def _set_param(gm: Any, target: str, value: Any) -> None:
    """Make ``target`` (a dotted path on ``gm``) a parameter holding ``value``."""
    import torch.nn as nn

    parent_path, _, leaf = target.rpartition(".")
    parent = gm.get_submodule(parent_path) if parent_path else gm
    param = nn.Parameter(value)
    if leaf in parent._parameters or not hasattr(parent, leaf):
        parent.register_parameter(leaf, param)
    else:
        setattr(parent, leaf, param)


def _conv_weights(conv: Any) -> tuple[Any, Any] | None:
    """(weight get_attr, bias get_attr or None) of a normalised convolution layer, or None when it
    cannot be folded into: a transposed convolution, a weight that is no attribute read by this
    convolution alone."""
    import torch
    import torch.fx as fx

    if not isinstance(conv, fx.Node) or conv.op != "call_function" \
            or conv.meta.get("autoprec_kind") not in CONV_KINDS:
        return None
    if conv.target is torch.ops.aten.convolution.default and len(conv.args) > 6 and conv.args[6]:
        return None  # transposed: its weight's output channels are on axis 1
    w = conv.args[1] if len(conv.args) > 1 else conv.kwargs.get("weight")
    b = conv.args[2] if len(conv.args) > 2 else conv.kwargs.get("bias")
    if not isinstance(w, fx.Node) or w.op != "get_attr" or not _own(w):
        return None
    if b is not None and (not isinstance(b, fx.Node) or b.op != "get_attr"):
        return None
    return w, b


def _own(node: Any) -> bool:
    """Whether the get_attr ``node`` is the only reader of its tensor (so it may be rewritten)."""
    return len(node.users) == 1 and sum(n.op == "get_attr" and n.target == node.target
                                        for n in node.graph.nodes) == 1


def _foldable(gm: Any) -> list[tuple[Any, dict[str, Any], tuple[Any, Any]]]:
    """(norm node, its parameters, its convolution's weight nodes) for every pair that folds."""
    import torch

    out = []
    for node in gm.graph.nodes:
        norm = _norm_of(gm, node)
        if norm is None or len(getattr(norm["input"], "users", ())) != 1:
            continue
        ws = _conv_weights(norm["input"])
        if ws is None:
            continue
        weight = attrgetter(str(ws[0].target))(gm)
        params = [norm[k] for k in ("mean", "var", "gamma", "beta")] + [weight]
        params += [attrgetter(str(ws[1].target))(gm)] if ws[1] is not None else []
        if all(p is None or p.dtype == torch.float32 for p in params) \
                and _shapes_fold(weight, int(norm["mean"].numel())):
            out.append((node, norm, ws))
    return out


def foldable_norms(gm: fx.GraphModule) -> list[str]:
    """The batch norm nodes :func:`fold_fx_batch_norms` would fold (and the ONNX export folds)."""
    return [node.name for node, _, _ in _foldable(gm)]


def fold_fx_batch_norms(gm: fx.GraphModule) -> tuple[fx.GraphModule, list[tuple[str, str]]]:
    """Fold every inference batch norm that alone reads a convolution's output into it.

    ``gm`` is a normalised capture (:func:`autoprec.capture.normalise`). Returns the GraphModule to
    use -- a deep copy when anything folds, so the user's model keeps its weights and norms -- and
    (convolution node, batch norm scope) pairs. The convolution keeps its node name and weight name;
    its bias is the parameter :func:`folded_bias_name` names."""
    import torch

    if not _foldable(gm):
        return gm, []
    gm = copy.deepcopy(gm)  # the folded weights must not land in the user's modules
    g = gm.graph
    done: list[tuple[str, str]] = []

    def arr(t: Any) -> np.ndarray | None:
        return None if t is None else t.detach().cpu().numpy()

    for node, norm, (w, b) in _foldable(gm):
        conv = norm["input"]
        bias = attrgetter(str(b.target))(gm) if b is not None else None
        fw, fb = fold_batch_norm(arr(attrgetter(str(w.target))(gm)), arr(bias), arr(norm["mean"]), arr(norm["var"]),
                                 arr(norm["gamma"]), arr(norm["beta"]), float(norm["eps"]))
        _set_param(gm, str(w.target), torch.from_numpy(fw))
        bias_target = folded_bias_name(str(w.target))
        if not (b is not None and str(b.target) == bias_target and _own(b)):
            i, base = 2, bias_target  # the name may hold some other tensor
            while _get_or_none(gm, bias_target) is not None:
                bias_target, i = f"{base}_{i}", i + 1
        _set_param(gm, bias_target, torch.from_numpy(fb))
        with g.inserting_before(conv):
            bias_node = g.get_attr(bias_target)
        bias_node.meta.update(autoprec_scope=w.meta.get("autoprec_scope", ""), autoprec_kind="get_attr")
        if len(conv.args) > 2:
            conv.args = (*conv.args[:2], bias_node, *conv.args[3:])
        else:
            conv.kwargs = {**conv.kwargs, "bias": bias_node}
        if b is not None and not b.users:
            g.erase_node(b)
        node.replace_all_uses_with(conv)
        g.erase_node(node)
        done.append((conv.name, node.meta.get("autoprec_scope") or node.name))
    gm.delete_all_unused_submodules()
    g.lint()
    gm.recompile()
    return gm, done


def _get_or_none(gm: Any, target: str) -> Any:
    try:
        return attrgetter(target)(gm)
    except AttributeError:
        return None
