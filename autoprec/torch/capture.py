"""Capture a PyTorch model as a normalised torch.fx GraphModule and build its :class:`OpGraph`.

Capture tries ``torch.fx.symbolic_trace`` first (it keeps the user's module names) and falls back
to ``torch.export`` when fx fails or stops at an opaque torch.nn module that hides compute layers
inside (nn.TransformerEncoderLayer, nn.MultiheadAttention, nn.LSTM and nn.GRU, whose per-step
products autoprec.torch.recurrent writes out under torch.export). Both paths end in the same form:

- every weighted layer is a ``call_function`` (``F.linear``/``F.conv*``/``F.conv_transpose*`` or the aten equivalent;
  ``F.embedding`` for lookups, whose aten form takes its arguments in another order) whose weight
  and bias are ``get_attr`` nodes, so one code path quantizes weights for both;
- every node carries ``meta["autoprec_scope"]`` (module path) and ``meta["autoprec_kind"]``;
- shapes come from running the example inputs through the graph once.

Node names of the fx path are fx's names for the original module calls ("blocks_1_attn_q"), so
plans keyed by them are stable for the same model code.
"""

from __future__ import annotations

import contextlib
import io

import logging
import operator
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata

from autoprec.torch.attention import explicit_attention
from autoprec.torch.bn_fold import fold_fx_batch_norms
from autoprec.torch.recurrent import explicit_recurrence
from autoprec.core.errors import CaptureError, first_line
from autoprec.core.kinds import BIAS_KINDS, LOOKUP_KINDS, TORCH_MODULE_KINDS, aten_kind, flops, policy_of
from autoprec.core.opgraph import OpGraph, OpNode, Policy

log = logging.getLogger(__name__)

# --- op classification ------------------------------------------------------------------------
# The torch spellings of the kinds of autoprec.core.kinds: fx's modules and functions here, its
# methods by name, export's aten ops by kinds.aten_kind. Every value is a kind of the registry.

#: torch.nn module classes (fx's call_module leaves) -> kind
#: torch.nn module classes -> kinds, from the registry's spellings (:data:`autoprec.core.kinds.TORCH_MODULE_KINDS`)
MODULE_KINDS: dict[type, str] = {getattr(nn, name): kind for name, kind in TORCH_MODULE_KINDS.items()}

#: torch functions and operators (fx's call_function targets) -> kind
_FUNCTION_KINDS: dict[Any, str] = {
    F.linear: "linear", F.conv1d: "conv1d", F.conv2d: "conv2d", F.conv3d: "conv3d",
    F.conv_transpose1d: "conv_transpose1d", F.conv_transpose2d: "conv_transpose2d",
    F.conv_transpose3d: "conv_transpose3d",
    torch.matmul: "matmul", operator.matmul: "matmul", torch.bmm: "bmm",
    operator.add: "add", operator.sub: "sub", operator.mul: "mul", operator.truediv: "div",
    operator.iadd: "add", operator.imul: "mul", operator.neg: "neg", operator.getitem: "getitem",
    torch.add: "add", torch.sub: "sub", torch.mul: "mul", torch.div: "div",
    torch.cat: "cat", torch.stack: "stack", torch.flatten: "flatten", torch.reshape: "reshape",
    torch.transpose: "transpose", torch.permute: "permute", torch.where: "where",
    torch.relu: "relu", torch.sigmoid: "sigmoid", torch.tanh: "tanh", torch.erf: "erf",
    torch.exp: "exp", torch.log: "log", torch.sqrt: "sqrt", torch.rsqrt: "rsqrt", torch.pow: "pow",
    torch.mean: "mean", torch.sum: "sum", torch.softmax: "softmax", torch.squeeze: "squeeze",
    torch.unsqueeze: "unsqueeze", torch.chunk: "chunk", torch.split: "split",
    F.relu: "relu", F.gelu: "gelu", F.silu: "silu", F.leaky_relu: "leaky_relu", F.elu: "elu",
    F.softmax: "softmax", F.log_softmax: "log_softmax", F.layer_norm: "layer_norm",
    F.batch_norm: "batch_norm", F.group_norm: "group_norm", F.dropout: "dropout",
    F.max_pool2d: "max_pool2d", F.avg_pool2d: "avg_pool2d", F.adaptive_avg_pool2d: "adaptive_avg_pool2d",
    F.interpolate: "interpolate", F.pad: "pad", F.embedding: "embedding",
    F.cross_entropy: "cross_entropy", F.scaled_dot_product_attention: "scaled_dot_product_attention",
}


def op_kind(gm: fx.GraphModule, node: fx.Node) -> str:
    """Normalised kind of an fx node (its op for placeholders, outputs and attribute reads)."""
    if node.op in ("placeholder", "output", "get_attr"):
        return node.op
    if node.op == "call_module":
        mod = gm.get_submodule(str(node.target))
        for cls in type(mod).__mro__:
            if cls in MODULE_KINDS:
                return MODULE_KINDS[cls]
        return f"module:{type(mod).__name__}"
    if node.op == "call_method":
        return str(node.target).rstrip("_")  # in-place methods are their kinds: x.add_ is add
    target = node.target
    if target in _FUNCTION_KINDS:
        return _FUNCTION_KINDS[target]
    if isinstance(target, torch._ops.OpOverload):  # aten op from torch.export
        kernel = _meta_tensor(node.args[1]) if len(node.args) > 1 else None  # names aten.convolution
        return aten_kind(target._schema.name.split("::")[-1], kernel.dim() if kernel is not None else None)
    return getattr(target, "__name__", str(target))


# --- capture ----------------------------------------------------------------------------------


@dataclass
class Captured:
    """A normalised GraphModule, its op graph and how it was obtained."""

    gm: fx.GraphModule
    graph: OpGraph
    method: str  # "fx" | "export"
    example_inputs: tuple[Any, ...]
    #: (convolution layer, batch norm) pairs folded into one convolution (autoprec.core.bn_fold)
    folded_norms: tuple[tuple[str, str], ...] = ()
    folds_norms: bool = True  # capture(fold_norms=...): False keeps the norms, for training
    #: recurrent modules (nn.LSTM, nn.GRU) traced as their products (autoprec.torch.recurrent)
    unrolled: tuple[str, ...] = ()

    def notes(self) -> list[str]:
        """What capture changed in the model, for the report."""
        out: list[str] = []
        if self.folded_norms:
            pairs = ", ".join(f"{norm} into {conv}" for conv, norm in self.folded_norms)
            out.append(f"folded {len(self.folded_norms)} batch norm(s) into the convolution before them, "
                       f"in fp32: {pairs}")
        if self.unrolled:
            out.append(f"unrolled {len(self.unrolled)} recurrent module(s) over the example's time steps: "
                       f"{', '.join(self.unrolled)}; each layer and direction is one linear layer for its input "
                       "product and one per step for its hidden product, the steps tied to one format (they "
                       "read one stored weight); the gates follow the products' formats")
        return out

    def node(self, name: str) -> fx.Node:
        for n in self.gm.graph.nodes:
            if n.name == name:
                return n
        raise KeyError(name)


def capture(model: nn.Module, example_inputs: tuple[Any, ...], name: str = "", method: str = "auto",
            fold_norms: bool = True) -> Captured:
    """Capture ``model`` for profiling and rewriting; raise CaptureError with the reasons on failure.

    ``method``: "auto" (fx, else export), "fx" or "export".
    ``fold_norms``: fold each inference batch norm into the convolution before it, in fp32, as the
    ONNX export does (:mod:`autoprec.core.bn_fold`): the plan then describes the deployed inference
    graph. The user's model is not changed. Pass False for a module that trains its norms.
    """
    model = model.eval()
    errors: list[str] = []
    gm: fx.GraphModule | None = None
    used = ""
    unrolled: list[nn.Module] = []
    if method in ("auto", "fx"):
        try:
            # fx keeps nn.LSTM/nn.GRU as leaf modules (opaque: export takes over) and cannot loop
            # over a traced length; a subclass it traces into fails on that loop and falls back too
            with explicit_attention(), explicit_recurrence():
                gm = fx.symbolic_trace(model)
            opaque = _opaque_modules(gm)
            if opaque:
                gm = None
                errors.append(f"fx stops at {', '.join(opaque)} (they hide compute layers)")
            else:
                used = "fx"
        except Exception as exc:  # fx raises many types for untraceable Python
            errors.append(f"fx: {type(exc).__name__}: {first_line(exc, 160)}")
    if gm is None and method in ("auto", "export"):
        try:
            with explicit_attention(), explicit_recurrence() as unrolled, warnings.catch_warnings(), quiet():
                warnings.simplefilter("ignore")  # its advice is for the model's author
                ep = torch.export.export(model, tuple(example_inputs), dynamic_shapes=_batch_dynamic(example_inputs))
            gm = ep.module()
            # export's module refuses train()/eval() (instance attributes that raise); its graph is
            # the inference graph whatever the mode flag says, and a model file's evaluate() may
            # switch modes (models/README.md): the plain nn.Module methods only set the flags
            for method_name in ("train", "eval"):
                gm.__dict__.pop(method_name, None)
            used = "export"
        except Exception as exc:
            errors.append(f"export: {type(exc).__name__}: {first_line(exc, 160)}")
    if gm is None:
        raise CaptureError(f"cannot capture {name or type(model).__name__}: " + "; ".join(errors)
                           + " (make forward() free of data-dependent Python control flow)")
    if errors:
        log.info("capture fell back to torch.export: %s", "; ".join(errors))
    normalise(gm, used)
    folded: list[tuple[str, str]] = []
    if fold_norms:
        gm, folded = fold_fx_batch_norms(gm)
        if folded:
            log.info("folded %d batch norm(s) into their convolutions", len(folded))
    _propagate_shapes(gm, example_inputs)
    graph = build_opgraph(gm, name or type(model).__name__)
    graph.batch = next((int(x.shape[0]) for x in example_inputs if isinstance(x, torch.Tensor) and x.dim() > 0), 0)
    names = {id(m): n for n, m in model.named_modules()}
    return Captured(gm=gm, graph=graph, method=used, example_inputs=tuple(example_inputs),
                    folded_norms=tuple(folded), folds_norms=fold_norms,
                    unrolled=tuple(names.get(id(m)) or type(m).__name__ for m in unrolled))


def _batch_dynamic(example_inputs: tuple[Any, ...]) -> tuple[Any, ...]:
    """Let torch.export keep the batch dimension symbolic so calibration batches of any size run."""
    auto = torch.export.Dim.AUTO
    return tuple({0: auto} if isinstance(x, torch.Tensor) and x.dim() > 0 else None for x in example_inputs)


def _opaque_modules(gm: fx.GraphModule) -> list[str]:
    """call_module leaves that are not known ops but contain weighted layers fx cannot see."""
    out = []
    for n in gm.graph.nodes:
        if n.op != "call_module":
            continue
        mod = gm.get_submodule(str(n.target))
        if type(mod) in MODULE_KINDS or any(isinstance(mod, c) for c in MODULE_KINDS):
            continue
        if any(isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)) for m in mod.modules()) or \
                any(p.dim() >= 2 for p in mod.parameters()):
            out.append(f"{n.target} ({type(mod).__name__})")
    return out


_FUNCTIONAL = {nn.Linear: F.linear, nn.Conv1d: F.conv1d, nn.Conv2d: F.conv2d, nn.Conv3d: F.conv3d,
               nn.ConvTranspose1d: F.conv_transpose1d, nn.ConvTranspose2d: F.conv_transpose2d,
               nn.ConvTranspose3d: F.conv_transpose3d}

_aten_embedding = torch.ops.aten.embedding.default
_ADDMM = (torch.addmm, torch.ops.aten.addmm.default)


def _embedding_kwargs(padding_idx: int | None, scale_grad_by_freq: bool, sparse: bool) -> dict[str, Any]:
    """F.embedding's keyword arguments as fx records them when it traces a functional call."""
    return {"padding_idx": padding_idx, "max_norm": None, "norm_type": 2.0,
            "scale_grad_by_freq": scale_grad_by_freq, "sparse": sparse}


def _normalise_embedding(gm: fx.GraphModule, node: fx.Node) -> fx.Node | None:
    """``nn.Embedding`` calls and torch.export's ``aten.embedding(weight, indices, ...)`` become
    ``F.embedding(indices, weight_get_attr, ...)``: every lookup layer then has one signature, with
    its weight at argument 1. An ``nn.Embedding`` with ``max_norm`` is left alone: it renormalises
    its table in place at each lookup, which is no pure lookup (it stays an fp32 op). Returns the
    replacement node, or None when ``node`` is not such a lookup."""
    g = gm.graph
    if node.op == "call_module" and isinstance(gm.get_submodule(str(node.target)), nn.Embedding):
        mod = gm.get_submodule(str(node.target))
        if mod.max_norm is not None:
            return None
        with g.inserting_before(node):
            w = g.get_attr(f"{node.target}.weight")
            new = g.call_function(F.embedding, (node.args[0], w),
                                  _embedding_kwargs(mod.padding_idx, mod.scale_grad_by_freq, mod.sparse))
    elif node.op == "call_function" and node.target is _aten_embedding:
        # aten.embedding(weight, indices, padding_idx=-1, scale_grad_by_freq=False, sparse=False)
        a = {"padding_idx": -1, "scale_grad_by_freq": False, "sparse": False}
        a.update(zip(("weight", "indices", *a), node.args))
        a.update(node.kwargs)
        with g.inserting_before(node):
            new = g.call_function(F.embedding, (a["indices"], a["weight"]), _embedding_kwargs(
                None if a["padding_idx"] == -1 else a["padding_idx"], a["scale_grad_by_freq"], a["sparse"]))
    else:
        return None
    new.meta.update(node.meta)
    node.replace_all_uses_with(new)
    old_name = node.name
    g.erase_node(node)
    new.name = old_name
    return new


def _normalise_addmm(gm: fx.GraphModule, node: fx.Node) -> fx.Node | None:
    """``addmm(bias, x, W)`` with W a stored [in, out] weight (Hugging Face's Conv1D, a hand-written
    ``x @ W + b``) becomes ``F.linear(x, W_t, bias)``, where ``W_t`` is an attribute of the captured
    module holding ``W.t()``: a view, no copy, so the layer reads its weight in the [out, in] layout
    every linear layer has (rows are output channels: the fp8 rule scales per row). The ONNX export
    of the same model reads W as a Gemm/MatMul operand, which the layer mapping compares transposed.
    Returns the replacement node, or None when ``node`` is not such a product."""
    if node.op != "call_function" or node.target not in _ADDMM or len(node.args) != 3:
        return None
    bias, x, w = node.args
    if any(float(node.kwargs.get(k, 1)) != 1.0 for k in ("beta", "alpha")) or not isinstance(w, fx.Node) \
            or w.op != "get_attr" or not (bias is None or isinstance(bias, fx.Node) and bias.op == "get_attr"):
        return None
    weight = _attr(gm, str(w.target))
    if weight.dim() != 2 or (bias is not None and _attr(gm, str(bias.target)).dim() != 1):
        return None
    name = "autoprec_t_" + str(w.target).replace(".", "_")
    if not hasattr(gm, name):
        gm.register_buffer(name, weight.detach().t(), persistent=False)
    g = gm.graph
    with g.inserting_before(node):
        wt = g.get_attr(name)
        new = g.call_function(F.linear, (x, wt, bias))
    wt.meta.update(w.meta)
    new.meta.update(node.meta)
    node.replace_all_uses_with(new)
    old_name = node.name
    g.erase_node(node)
    if not w.users:
        g.erase_node(w)
    new.name = old_name
    return new


def normalise(gm: fx.GraphModule, method: str) -> None:
    """Turn weighted module calls into functional calls on get_attr weights; record scope and kind."""
    g = gm.graph
    for node in list(g.nodes):
        scope = _scope(gm, node, method)
        replaced = _normalise_embedding(gm, node) or _normalise_addmm(gm, node)
        if replaced is not None:
            for a in replaced.all_input_nodes:
                if a.op == "get_attr":
                    a.meta.setdefault("autoprec_scope", scope)
            node = replaced
        elif node.op == "call_module":
            mod = gm.get_submodule(str(node.target))
            fn = _FUNCTIONAL.get(type(mod))
            # a transposed convolution called with output_size picks its output padding from the
            # input's shape at run time: left as the module call, which stays fp32
            sized = isinstance(mod, nn.modules.conv._ConvTransposeNd) and \
                (len(node.args) > 1 or node.kwargs.get("output_size") is not None)
            if fn is not None and getattr(mod, "padding_mode", "zeros") == "zeros" and not sized:
                old_name = node.name
                with g.inserting_before(node):
                    w = g.get_attr(f"{node.target}.weight")
                    b = g.get_attr(f"{node.target}.bias") if mod.bias is not None else None
                    if fn is F.linear:
                        new = g.call_function(fn, (node.args[0], w, b))
                    elif isinstance(mod, nn.modules.conv._ConvTransposeNd):
                        new = g.call_function(fn, (node.args[0], w, b, mod.stride, mod.padding,
                                                   mod.output_padding, mod.groups, mod.dilation))
                    else:
                        new = g.call_function(fn, (node.args[0], w, b, mod.stride, mod.padding,
                                                   mod.dilation, mod.groups))
                node.replace_all_uses_with(new)
                g.erase_node(node)
                new.name = old_name  # codegen names variables after node.name: keep fx's stable name
                for n in (w, b) if b is not None else (w,):
                    n.meta["autoprec_scope"] = scope
                node = new
        node.meta["autoprec_scope"] = scope
        node.meta["autoprec_kind"] = op_kind(gm, node)
    _fold_weight_paths(gm)
    g.lint()
    gm.recompile()


def _constant_value(gm: fx.GraphModule, node: Any, memo: dict[str, Any]) -> Any:
    """The value of ``node`` when it depends on stored tensors and literals only (a slice of a
    parameter, its transpose), else None. Views stay views: nothing is copied."""
    if not isinstance(node, fx.Node):
        return node
    if node.name in memo:
        return memo[node.name]
    value = None
    if node.op == "get_attr":
        value = _attr(gm, str(node.target))
    elif node.op in ("call_function", "call_method"):
        args = [_constant_value(gm, a, memo) for a in node.args]
        kwargs = {k: _constant_value(gm, v, memo) for k, v in node.kwargs.items()}
        known = all(v is not None or a is None for a, v in zip((*node.args, *node.kwargs.values()),
                                                               (*args, *kwargs.values())))
        if known:
            with torch.no_grad():
                value = node.target(*args, **kwargs) if node.op == "call_function" \
                    else getattr(args[0], str(node.target))(*args[1:], **kwargs)
    memo[node.name] = value
    return value


def _fold_weight_paths(gm: fx.GraphModule) -> None:
    """A linear layer or (transposed) convolution whose weight or bias is computed from stored tensors only -- the
    slices of ``nn.MultiheadAttention``'s packed projection when query and key differ -- reads
    it as a stored attribute instead (a view of the parameter), as a layer's weight is read: the
    profiler and the passes round it as a weight, and the ONNX export, whose folder folds the same
    slices into initializers, pairs it with its MatMul."""
    g = gm.graph
    memo: dict[str, Any] = {}
    for node in list(g.nodes):
        kind = node.meta.get("autoprec_kind")
        if node.op != "call_function" or kind not in BIAS_KINDS:  # weight at 1, bias at 2
            continue
        for pos in (1, 2):
            arg = node.args[pos] if len(node.args) > pos else None
            if not isinstance(arg, fx.Node) or arg.op == "get_attr":
                continue
            value = _constant_value(gm, arg, memo)
            if not isinstance(value, torch.Tensor):
                continue
            name = f"autoprec_w_{arg.name}"
            if not hasattr(gm, name):
                gm.register_buffer(name, value.detach(), persistent=False)
            with g.inserting_before(node):
                attr = g.get_attr(name)
            attr.meta["autoprec_scope"] = node.meta.get("autoprec_scope", "")
            attr.meta["autoprec_kind"] = "get_attr"
            node.replace_input_with(arg, attr)
    g.eliminate_dead_code()


def _scope(gm: fx.GraphModule, node: fx.Node, method: str) -> str:
    if node.op == "call_module":
        return str(node.target)
    stack = node.meta.get("nn_module_stack")
    if stack:
        path = list(stack.values())[-1][0]
        return _clean_export_path(path)
    if node.op == "get_attr":
        return str(node.target).rsplit(".", 1)[0] if "." in str(node.target) else ""
    return ""


def _clean_export_path(path: str) -> str:
    """torch.export writes scopes like "L['self'].blocks[0].attn" in some versions."""
    p = path.replace("L['self'].", "").replace("L['self']", "")
    for ch in "[]":
        p = p.replace(ch, "." if ch == "[" else "")
    return p.strip(".")


class _ShapeProp(ShapeProp):
    """ShapeProp that tolerates non-tensor outputs."""


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Keep a third-party tool's chatter (torch.export's graph printouts and log lines when it fails)
    off the user's terminal; with autoprec's debug logging on, it goes to the debug log instead."""
    out, err = io.StringIO(), io.StringIO()
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            yield
    finally:
        logging.disable(previous)
        chatter = (out.getvalue() + err.getvalue()).strip()
        if chatter:
            log.debug("suppressed output:\n%s", chatter)


def _propagate_shapes(gm: fx.GraphModule, example_inputs: tuple[Any, ...]) -> None:
    with torch.no_grad():
        try:  # ShapeProp prints the traceback of a failing node itself: the user gets one line instead
            with contextlib.redirect_stderr(io.StringIO()):
                _ShapeProp(gm).propagate(*example_inputs)
        except Exception as exc:
            cause = exc.__cause__ if exc.__cause__ is not None else exc  # ShapeProp wraps the node's error
            raise CaptureError(f"the model does not run on example_inputs(): "
                               f"{type(cause).__name__}: {first_line(cause)}") from exc


def _meta_tensor(node: Any) -> Any:
    """A tensor-like with .shape/.dtype for a node, from shape propagation (or export's meta)."""
    if not isinstance(node, fx.Node):
        return None
    tm = node.meta.get("tensor_meta")
    if tm is not None and hasattr(tm, "shape"):
        return _Meta(tuple(tm.shape), tm.dtype)
    val = node.meta.get("val")
    if isinstance(val, torch.Tensor):
        return _Meta(tuple(val.shape), val.dtype)
    return None


@dataclass(frozen=True)
class _Meta:
    shape: tuple[int, ...]
    dtype: torch.dtype

    def dim(self) -> int:
        return len(self.shape)

    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= int(s)
        return n


def _is_float(m: Any) -> bool:
    return m is not None and m.dtype.is_floating_point


def _float_meta(m: Any) -> bool:
    if isinstance(m, TensorMetadata):  # a NamedTuple: test before the tuple case
        return m.dtype.is_floating_point
    if isinstance(m, torch.Tensor):
        return m.is_floating_point()
    if isinstance(m, (tuple, list)):
        return any(_float_meta(e) for e in m)
    if isinstance(m, dict):
        return any(_float_meta(e) for e in m.values())
    return False


def is_float_value(node: fx.Node) -> bool:
    """Whether ``node`` produces a floating tensor (or a tuple holding one), from shape propagation."""
    m = node.meta.get("tensor_meta")
    if m is None:
        m = node.meta.get("val")
    return _float_meta(m)


def layer_weight_nodes(node: fx.Node) -> tuple[fx.Node | None, fx.Node | None]:
    """(weight, bias) get_attr nodes of a linear/conv/transposed conv layer, (table, None) of a
    normalised embedding lookup, or (None, None)."""
    kind = node.meta.get("autoprec_kind")
    if kind in LOOKUP_KINDS:
        # max_norm renormalises the table in place at each lookup: no pure lookup, the op stays fp32
        max_norm = node.args[3] if len(node.args) > 3 else node.kwargs.get("max_norm")
        plain = node.op == "call_function" and node.target is F.embedding and max_norm is None
        w = node.args[1] if plain else None
        return (w if isinstance(w, fx.Node) and w.op == "get_attr" else None), None
    if kind in BIAS_KINDS:
        args = list(node.args) + [None] * 3
        w, b = args[1], args[2]
        return (w if isinstance(w, fx.Node) and w.op == "get_attr" else None,
                b if isinstance(b, fx.Node) and b.op == "get_attr" else None)
    return None, None


def build_opgraph(gm: fx.GraphModule, name: str) -> OpGraph:
    """The op graph of a normalised GraphModule (after shape propagation)."""
    nodes: list[OpNode] = []
    edges: list[tuple[str, str]] = []
    weight_attrs: set[str] = set()
    for n in gm.graph.nodes:
        w, b = layer_weight_nodes(n)
        weight_attrs.update(x.name for x in (w, b) if x is not None)
    kept: set[str] = set()
    for n in gm.graph.nodes:
        if n.name in weight_attrs:
            continue
        kind = n.meta.get("autoprec_kind", n.op)
        out = _meta_tensor(n)
        float_out = _is_float(out)
        hands_float = n.op != "output" and is_float_value(n)  # a float tensor, or a tuple holding one
        ins = [_meta_tensor(a) for a in n.all_input_nodes]
        float_ins = [m for a, m in zip(n.all_input_nodes, ins) if _is_float(m) and a.name not in weight_attrs]
        policy = policy_of(kind)
        if policy is not Policy.NONE and not (float_out or (hands_float and float_ins)):
            policy = Policy.NONE  # shape arithmetic, integer indexing, tuples of non-floats
        wnode, bnode = layer_weight_nodes(n)
        wmeta = _meta_tensor(wnode)
        weight_elems = 0
        for x in (wnode, bnode):
            if x is not None:
                weight_elems += gm.get_parameter(str(x.target)).numel() if _is_param(gm, str(x.target)) \
                    else _attr(gm, str(x.target)).numel()
        if kind in ("matmul", "bmm") and any(a.op == "get_attr" for a in n.all_input_nodes):
            weight_elems = sum(_meta_tensor(a).numel() for a in n.all_input_nodes if a.op == "get_attr")
        elif wnode is None and policy is not Policy.NONE:  # a norm's scale, a position table: stored, fp32
            weight_elems = sum(m.numel() for a in n.all_input_nodes if a.op == "get_attr" and a.name not in weight_attrs
                               for m in (_meta_tensor(a),) if _is_float(m))
        if policy is Policy.ALWAYS and (wnode is None if kind in LOOKUP_KINDS else len(float_ins) < 1):
            policy = Policy.NEVER  # nothing to lower: a product of constants, a lookup with no table
        input_shapes = tuple(tuple(int(s) for s in m.shape) for m in ins if m is not None)
        op = OpNode(
            name=n.name,
            kind=kind,
            scope=n.meta.get("autoprec_scope", ""),
            policy=policy,
            input_shapes=input_shapes,
            output_shape=tuple(int(s) for s in out.shape) if out is not None else (),
            flops=flops(kind, input_shapes, out.shape if out is not None else None,
                        wmeta.shape if wmeta is not None else None, weight_elems) if policy is not Policy.NONE else 0,
            weight_elems=weight_elems,
            act_in_elems=sum(m.numel() for m in float_ins),
            act_out_elems=out.numel() if float_out else 0,
            weight=str(wnode.target) if wnode is not None else None,
            float_out=hands_float,
        )
        nodes.append(op)
        kept.add(n.name)
        for a in n.all_input_nodes:
            if a.name in kept:
                edges.append((a.name, n.name))
    graph = OpGraph(nodes=nodes, edges=edges, model_name=name)
    graph.ties = _ties(gm, graph)
    return graph


def _is_param(gm: fx.GraphModule, target: str) -> bool:
    try:
        gm.get_parameter(target)
        return True
    except AttributeError:
        return False


def _attr(gm: fx.GraphModule, target: str) -> torch.Tensor:
    return operator.attrgetter(target)(gm)


def _ties(gm: fx.GraphModule, graph: OpGraph) -> list[list[str]]:
    """Groups of layers that must share one format.

    - Layers reading one weight tensor (a language model's output head tied to its token
      embedding): the weight is stored once, in one format.
    - Layers of one kind and weight shape reading the same input (q/k/v projections): a deployment
      fuses them into one GEMM, which has one format (lookups fuse into no GEMM).
    Groups that share a layer are merged."""
    by_weight: dict[tuple[int, int, tuple[int, ...], tuple[int, ...]], list[str]] = {}
    fused: dict[tuple[str, str, tuple[int, ...]], list[str]] = {}
    for n in gm.graph.nodes:
        op = graph[n.name] if n.name in graph else None
        if op is None or not op.is_layer or op.weight is None:
            continue
        w = _attr(gm, op.weight)
        same = (w.untyped_storage().data_ptr(), w.storage_offset(), tuple(w.shape), tuple(w.stride()))
        by_weight.setdefault(same, []).append(n.name)
        src = n.args[0]
        if op.kind not in LOOKUP_KINDS and isinstance(src, fx.Node):
            fused.setdefault((src.name, op.kind, tuple(w.shape)), []).append(n.name)
    groups = [g for g in by_weight.values() if len(g) > 1] + [g for _, g in sorted(fused.items()) if len(g) > 1]
    merged: list[set[str]] = []
    for g in groups:
        overlapping = [m for m in merged if m & set(g)]
        union = set(g).union(*overlapping)
        merged = [m for m in merged if not m & set(g)] + [union]
    order = {n.name: i for i, n in enumerate(gm.graph.nodes)}
    return sorted((sorted(m, key=order.__getitem__) for m in merged), key=lambda m: order[m[0]])


def layer_function(kind: str) -> Callable[..., torch.Tensor]:
    """The fp32 function that computes a layer of ``kind`` from its (possibly rounded) arguments."""
    return {"linear": F.linear, "conv1d": F.conv1d, "conv2d": F.conv2d, "conv3d": F.conv3d,
            "conv_transpose1d": F.conv_transpose1d, "conv_transpose2d": F.conv_transpose2d,
            "conv_transpose3d": F.conv_transpose3d, "matmul": torch.matmul, "bmm": torch.bmm,
            "embedding": F.embedding}[kind]
