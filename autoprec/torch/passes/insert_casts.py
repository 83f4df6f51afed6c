"""Pass 3: rewrite the edges where a value is consumed in another format than it was produced in.

For each floating value and each format some consumer needs it in, one ``cast`` node is inserted
(before the first such consumer) and shared by all consumers needing that format. A consumer needs:

- a low-precision layer: its activation inputs in the layer's format (fp8: the scaled E4M3 quantize
  with the layer's calibrated static amax, so the key is (value, format, amax)); its weight and
  bias are read as they are (the layer rounds the weight at use from the fp32 master);
- a FOLLOW op, NEVER op or fp32 layer: every floating input in its own format (for NEVER ops and
  fp32 layers that is fp32: widening is exact, the identity in emulate mode and a real ``.float()``
  in native mode, but the node records the boundary);
- the graph output: the graph's I/O format (fp32, or fp16 for a deployment with fp16 I/O, whose
  floating inputs are rounded to fp16 where the graph starts);
- other consumers (shape queries such as ``x.shape``): the value as it is.

No cast is ever made to the format a value already has (fp8 activations always need one: no value
is stored in fp8), and a cast never reads a cast, so chains cannot appear.

A FOLLOW op in a 16-bit format computes in fp32 on its (16-bit) inputs and stores its result in
that format: a ``round_output`` node follows it, unless the op cannot create new values (views,
selections, ReLU, max-pooling, negation: ``autoprec.core.kinds.EXACT_FOLLOW_KINDS``), where
rounding would be the identity.

A lowered layer whose activation inputs all end up in its format (:func:`reads_rounded`) is marked
``rounded=True``: the cast already rounded them, so the layer, outside training, does not round them
again (the same bits: each rounding is idempotent; an fp8 graph's layers would otherwise round every
activation twice).
"""

from __future__ import annotations

import torch.fx as fx

from autoprec.core.formats import Precision
from autoprec.core.opgraph import OpGraph, Policy
from autoprec.core.kinds import act_arg_positions
from autoprec.core.passes import PassError, PassResult
from autoprec.torch.passes.base import ACT_AMAX, FORMAT, INSERTED, KIND, REASON, ROUNDS, SCOPE, VALUE_FORMAT, Pass
from autoprec.torch.capture import is_float_value
from autoprec.torch.passes.assign_formats import policy, value_format
from autoprec.torch.passes.lower_layers import is_lowered
from autoprec.torch.passes.ops import cast, round_output

FP32 = Precision.FP32

#: key of a cast: (value node name, target format, fp8 amax or None)
CastKey = tuple[str, Precision, "float | None"]


def is_cast(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target is cast


def is_round(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target is round_output


def needs(graph: OpGraph, consumer: fx.Node, value: fx.Node) -> tuple[Precision, float | None] | None:
    """(format, fp8 amax) in which ``consumer`` reads ``value``; None: as it is."""
    if consumer.op == "output":
        return consumer.meta[FORMAT], None
    pol = policy(graph, consumer)
    fmt = consumer.meta[FORMAT]
    if pol is Policy.ALWAYS and fmt is not FP32:
        kind = consumer.meta[KIND]
        amax = consumer.meta.get(ACT_AMAX, ())
        for j, pos in enumerate(act_arg_positions(kind)):
            if pos < len(consumer.args) and consumer.args[pos] is value:
                return fmt, (amax[j] if fmt.is_fp8 and j < len(amax) else None)
        return None  # weight, bias: the layer reads them itself
    if pol in (Policy.ALWAYS, Policy.FOLLOW, Policy.NEVER):
        return fmt, None
    return None


def reads_rounded(layer: fx.Node) -> bool:
    """Whether every activation input of lowered ``layer`` holds values of its format already: a
    cast to that format (fp8: with the layer's amax), or a value stored in it. Such a layer is
    marked ``rounded=True`` and skips rounding them again (:mod:`autoprec.torch.passes.ops`)."""
    fmt = layer.kwargs["fmt"]
    amax = layer.kwargs.get("amax") or ()
    for j, pos in enumerate(act_arg_positions(layer.meta[KIND])):
        if pos >= len(layer.args):
            continue
        value = layer.args[pos]
        if not isinstance(value, fx.Node):
            return False
        if fmt.is_fp8:
            if not (is_cast(value) and value.kwargs["fmt"] is fmt
                    and value.kwargs.get("amax") == (amax[j] if j < len(amax) else None)):
                return False
        elif VALUE_FORMAT not in value.meta or value_format(value) is not fmt:
            return False
    return True


class InsertCasts(Pass):
    """Insert the shared edge casts and the output rounding of 16-bit FOLLOW ops."""

    needs = (FORMAT, VALUE_FORMAT)

    def __init__(self, graph: OpGraph, native: bool = False) -> None:
        self.graph = graph
        self.native = native

    def call(self, gm: fx.GraphModule) -> PassResult:
        g = gm.graph
        casts: dict[CastKey, fx.Node] = {}
        modified = False
        for node in list(g.nodes):
            for value in list(node.all_input_nodes):
                if not is_float_value(value):
                    continue
                need = needs(self.graph, node, value)
                if need is None:
                    continue
                fmt, amax = need
                if fmt is value_format(value) and not fmt.is_fp8:
                    continue
                key = (value.name, fmt, amax)
                if key not in casts:
                    casts[key] = self._cast_node(g, node, value, fmt, amax)
                node.replace_input_with(value, casts[key])
                modified = True
            if self._needs_rounding(node):
                self._round_node(g, node)
                modified = True
            if is_lowered(node) and not node.kwargs.get("rounded") and reads_rounded(node):
                node.update_kwarg("rounded", True)
                modified = True
        return PassResult(gm, modified)

    def _needs_rounding(self, node: fx.Node) -> bool:
        return bool(node.meta.get(ROUNDS))

    def _cast_node(self, g: fx.Graph, consumer: fx.Node, value: fx.Node, fmt: Precision,
                   amax: float | None) -> fx.Node:
        with g.inserting_before(consumer):
            kwargs = {"fmt": fmt, "amax": amax, "native": self.native} if fmt.is_fp8 else \
                {"fmt": fmt, "native": self.native}
            kwargs["site"] = consumer.name  # a training monitor reports its roundings under its first reader
            c = g.create_node("call_function", cast, (value,), kwargs, name=f"{value.name}_to_{fmt.value}")
        have = value_format(value)
        if fmt.is_fp8:
            scale = f"static scale amax {amax:.6g} / {fmt.max:g}" if amax is not None else "scaled at run time"
            why = f"{have} -> {fmt} ({scale}) for fp8 layer {consumer.name}"
        elif fmt.rank < have.rank:
            why = f"{have} -> {fmt}: widening for {consumer.name} ({consumer.meta[REASON]})"
        else:
            why = f"{have} -> {fmt} for {consumer.name} ({consumer.meta[REASON]})"
        self._annotate(c, value, fmt, "cast", why, consumer.meta.get(SCOPE, ""))
        return c

    def _round_node(self, g: fx.Graph, node: fx.Node) -> fx.Node:
        fmt = node.meta[FORMAT]
        # a graph input is rounded after the last input, so the inputs stay the function's arguments
        at = max((n for n in g.nodes if n.op == "placeholder"), key=list(g.nodes).index) \
            if node.op == "placeholder" else node
        with g.inserting_after(at):
            r = g.create_node("call_function", round_output, (node,),
                              {"fmt": fmt, "native": self.native, "site": node.name},
                              name=f"{node.name}_{fmt.value}")
        node.replace_all_uses_with(r, delete_user_cb=lambda u: u is not r)
        what = f"input given in {fmt}" if node.op == "placeholder" else \
            f"{node.meta.get(KIND)} runs in {fmt}: fp32 result stored in {fmt}"
        self._annotate(r, node, fmt, "round", what,
                       node.meta.get(SCOPE, ""))
        return r

    @staticmethod
    def _annotate(n: fx.Node, src: fx.Node, fmt: Precision, kind: str, reason: str, scope: str) -> None:
        for k in ("tensor_meta", "val"):
            if k in src.meta:
                n.meta[k] = src.meta[k]
        n.meta.update({FORMAT: fmt, VALUE_FORMAT: fmt, REASON: reason, SCOPE: scope, KIND: kind, INSERTED: True})

    def ensures(self, gm: fx.GraphModule) -> None:
        super().ensures(gm)
        seen: set[CastKey] = set()
        for node in gm.graph.nodes:
            if is_cast(node):
                src = node.args[0]
                fmt = node.kwargs["fmt"]
                if is_cast(src):
                    raise PassError(f"{self.name}: cast chain {src.name} -> {node.name}")
                if fmt is value_format(src) and not fmt.is_fp8:
                    raise PassError(f"{self.name}: {node.name} casts {src.name} to the {fmt} it already has")
                key = (src.name, fmt, node.kwargs.get("amax"))
                if key in seen:
                    raise PassError(f"{self.name}: second cast of {src.name} to {fmt}")
                seen.add(key)
                continue
            if node.meta.get(INSERTED):
                continue
            for value in node.all_input_nodes:
                if not is_float_value(value):
                    continue
                need = needs(self.graph, node, value)
                if need is None:
                    continue
                fmt, amax = need
                have = value_format(value)
                ok = (is_cast(value) and value.kwargs.get("amax") == amax) if fmt.is_fp8 else have is fmt
                if not ok or (fmt.is_fp8 and value.kwargs["fmt"] is not fmt):
                    raise PassError(f"{self.name}: {node.name} reads {value.name} ({have}) but needs {fmt}")
            if self._needs_rounding(node):
                users = list(node.users)
                if len(users) != 1 or not is_round(users[0]):
                    raise PassError(f"{self.name}: {node.name} runs in {node.meta[FORMAT]} but its result "
                                    "is not rounded")
