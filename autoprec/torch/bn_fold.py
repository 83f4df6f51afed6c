"""Fold inference batch norms of a torch.fx capture into the convolution before them (:mod:`autoprec.core.bn_fold`'s arithmetic)."""

from __future__ import annotations

import copy
from operator import attrgetter
from typing import Any

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.fx.operator_schemas import normalize_function

from autoprec.core.bn_fold import shapes_fold, fold_batch_norm, folded_bias_name
from autoprec.core.kinds import CONV_KINDS

def _norm_of(gm: fx.GraphModule, node: fx.Node) -> dict[str, Any] | None:
    """An inference batch norm node's input, parameters (tensors or None) and eps; None for anything
    else (a norm in training mode, one without running stats, one whose parameters are computed)."""

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
                and shapes_fold(weight, int(norm["mean"].numel())):
            out.append((node, norm, ws))
    return out


def foldable_norms(gm: fx.GraphModule) -> list[str]:
    """The batch norm nodes :func:`fold_fx_batch_norms` would fold (and the ONNX export folds)."""
    return [node.name for node, _, _ in _foldable(gm)]


def fold_fx_batch_norms(gm: fx.GraphModule) -> tuple[fx.GraphModule, list[tuple[str, str]]]:
    """Fold every inference batch norm that alone reads a convolution's output into it.

    ``gm`` is a normalised capture (:func:`autoprec.torch.capture.normalise`). Returns the GraphModule to
    use -- a deep copy when anything folds, so the user's model keeps its weights and norms -- and
    (convolution node, batch norm scope) pairs. The convolution keeps its node name and weight name;
    its bias is the parameter :func:`folded_bias_name` names."""

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
