"""ONNX pass 4: rewrite the edges where a value is produced in one format and read in another.

Two graphs come out of the same decisions (AssignFormats) and the same weights (LowerWeights):

deploy
    Tensors really are 16-bit: a node computes in its group's format where ONNX admits that type for
    the op and the target provider, when one is named, has a kernel for it (``compute_precision``),
    in fp32 otherwise (ONNX Conv and pooling have no bf16; ORT's CUDA provider no bf16 Where). A group
    hands its results to other groups in its value format (a Cast after it where it computed in
    another type: fp8 layers compute on dequantized fp32 operands and write bf16; an fp8 embedding's
    Gather looks its rows up in the table dequantized to fp32). A node reading a
    value of another type gets one shared ``Cast`` per (value, type); one-element constants and
    biases get a copy of the initializer in the type instead. fp8 layers read their activation
    through ``QuantizeLinear`` -> ``DequantizeLinear`` (FLOAT8E4M3FN zero point, static scale
    amax / 448, saturating). Graph inputs and outputs stay fp32.

emulate
    Everything computes in fp32 and every rounding of the semantics is explicit, so ONNX Runtime's
    CPU provider computes exactly what the torch emulation (``passes.apply_plan(mode="emulate")``)
    does: ``Cast(to P) -> Cast(to fp32)`` pairs round a value to a 16-bit format (ORT keeps the
    rounding of such a pair; fp16 nodes on its CPU provider drop it), Q/DQ rounds to fp8. Rounded are:
    a layer's activation inputs (to its format, when the value is in another), the product and the
    bias a 16-bit layer's bias Add reads (:func:`autoprec.torch.semantics.finish`), a layer's result (to
    its value format; not a 16-bit embedding's, whose Gather copies rows of a table LowerWeights
    already stored in that format; an fp8 embedding's rows, dequantized with their per-row scales,
    are rounded to bf16 like every fp8 layer's result), the results of 16-bit FOLLOW ops that
    compute new values (not views, ReLU or max-pooling: ``autoprec.core.kinds.EXACT_FOLLOW_KINDS``, the lowering's ``rounds``) and the inputs a
    16-bit FOLLOW op reads in another 16-bit format.

Each value is converted at most once per target (shared by every reader); a rounding of a group's
result keeps the value's name (the producer's output is renamed), so graph outputs keep theirs.

fp8 E5M2 (a gradient format, not a default candidate): ONNX Runtime 1.31's QuantizeLinear with
saturate=0 returns NaN where ``x / scale`` rounds past 57344, where torch gives inf; only values
beyond the calibrated range get there. E4M3FN, the forward format, matches torch bit for bit.
"""

from __future__ import annotations

import copy

import numpy as np
import onnx
from onnx import TensorProto

from autoprec.core.formats import Precision
from autoprec.core.kinds import LOOKUP_KINDS
from autoprec.core.opgraph import Policy
from autoprec.core.fp8 import fp8_scale
from autoprec.core.kinds import act_arg_positions
from autoprec.onnx.passes.assign_formats import is_scalar_constant
from autoprec.core.passes import PassError, PassResult
from autoprec.onnx.passes.base import (FLOAT_TYPES, FORMAT, GROUP, INSERTED, KIND, LAYER, POLICY,
    REASON, ROLE, ROLE_CORE, ROUNDS, SCOPE, GraphIndex, OnnxPass, all_names, attr, get_meta,
    infer_types, make_tensor, node_amax, node_format, node_value_format, output_follows_inputs,
    precision_of_type, rounded_array, same_type_inputs, set_attr, set_meta, set_nodes, unique_name)
from autoprec.onnx.passes.lower_weights import MODES, compute_precision

FP32 = Precision.FP32
FLOAT = TensorProto.FLOAT


def _type_name(elem_type: int) -> str:
    p = precision_of_type(elem_type)
    return p.value if p is not None else str(elem_type)


class InsertCasts(OnnxPass):
    """Insert the shared casts (deploy) or roundings (emulate) the decided formats call for."""

    needs = (FORMAT, POLICY)

    def __init__(self, params: frozenset[str] = frozenset(), mode: str = "deploy", provider: str | None = None) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown ONNX mode {mode!r}: use one of {MODES}")
        self.params = params
        self.mode = mode
        self.provider = provider  # deployment graphs: the provider whose kernels decide (None: any)

    # --- the rewrite ------------------------------------------------------------------------------
    def call(self, model: onnx.ModelProto) -> PassResult:
        idx = GraphIndex(model)
        self._idx = idx
        self._model = model
        self._taken = all_names(model)
        self._nodes: list[onnx.NodeProto] = []
        self._made: dict[tuple, str] = {}  # (value, what, format, amax) -> converted value
        self._st: dict[str, int] = dict(idx.types)  # storage type of each value as rewritten so far
        self._modified = False
        group_of = [get_meta(n, GROUP) for n in idx.nodes]
        prod_group = {v: group_of[i] for v, i in idx.producer.items()}
        ext_out = {v for v, i in idx.producer.items()
                   if v in idx.outputs or any(group_of[j] != group_of[i] for j, _ in idx.consumers.get(v, []))}
        raw_of: dict[str, str] = {}
        for i, n in enumerate(idx.nodes):
            if get_meta(n, INSERTED):
                self._nodes.append(n)
                for o in n.output:
                    self._st[o] = attr(n, "to") if n.op_type == "Cast" else FLOAT
                continue
            g = group_of[i]
            fmt = node_format(n) or FP32
            policy = Policy(get_meta(n, POLICY) or "none")
            ct = (compute_precision(n, idx.opset, fmt, self.mode, self.provider)
                  if policy in (Policy.ALWAYS, Policy.FOLLOW) else FP32)
            self._rewrite_inputs(n, g, fmt, policy, ct, prod_group, raw_of)
            if self.mode == "deploy" and n.op_type == "Cast" and attr(n, "to") in FLOAT_TYPES and ct is not FP32:
                set_attr(n, "to", ct.onnx_type)  # a float -> float Cast inside a 16-bit group
                self._modified = True
            self._nodes.append(n)
            for slot, v in enumerate(n.output):
                if not v or idx.types.get(v) not in FLOAT_TYPES:
                    continue
                if n.op_type == "Cast":
                    self._st[v] = attr(n, "to")
                elif output_follows_inputs(n, idx.opset, slot):
                    self._st[v] = ct.onnx_type
                if v in ext_out:
                    self._rewrite_output(n, slot, v, fmt, policy, ct, raw_of, v in idx.outputs)
        if self._modified:
            set_nodes(model, self._nodes)
            del model.graph.value_info[:]
        return PassResult(model, self._modified)

    def _rewrite_inputs(self, n: onnx.NodeProto, g: str | None, fmt: Precision, policy: Policy, ct: Precision,
                        prod_group: dict[str, str | None], raw_of: dict[str, str]) -> None:
        idx = self._idx
        core = get_meta(n, ROLE) == ROLE_CORE
        kind = get_meta(n, KIND) or ""
        act_slots = act_arg_positions(kind) if core and fmt is not FP32 else ()
        bias_add = self._is_bias_add(n, g, fmt, policy)
        amax = node_amax(n)
        tied = same_type_inputs(n, idx.opset)
        for k, u in enumerate(list(n.input)):
            if not u:
                continue
            internal = prod_group.get(u) == g and u in idx.producer
            if internal and u in raw_of:
                u = raw_of[u]
                n.input[k] = u
                self._modified = True
            if self._st.get(u) not in FLOAT_TYPES:
                continue
            if k in act_slots and fmt.is_fp8:
                j = act_slots.index(k)
                n.input[k] = self._qdq(u, fmt, amax[j], n)
                self._modified = True
                continue
            if self.mode == "emulate":
                if bias_add:  # the product and the bias, each rounded to the layer's format
                    if internal or self._value_format(u) is not fmt:  # (a bias another layer wrote in it is)
                        n.input[k] = self._round_input(u, fmt, n)
                        self._modified = True
                    continue
                if internal or fmt is FP32 or policy not in (Policy.ALWAYS, Policy.FOLLOW):
                    continue
                if policy is Policy.ALWAYS and k not in act_slots:
                    continue  # weight and bias: LowerWeights rounded the weight, the bias stays fp32
                if policy is Policy.FOLLOW and is_scalar_constant(idx, u, self.params):
                    continue
                have = self._value_format(u)
                if have is not fmt:
                    n.input[k] = self._round_input(u, fmt, n)
                    self._modified = True
                continue
            # deploy: every input the schema ties to the output's type is read in the compute type
            if not (k < len(tied) and tied[k]):
                continue
            if ct is FP32 and fmt is not FP32 and self._st.get(u) != fmt.onnx_type and (
                    bias_add or (not internal and (
                        (policy is Policy.ALWAYS and k in act_slots)
                        or (policy is Policy.FOLLOW and not is_scalar_constant(idx, u, self.params))))):
                # a 16-bit op on an fp32 kernel (no kernel in its format): its inputs still carry
                # the format's rounding, as in the emulation graph; then they widen to fp32 below
                u = self._typed_initializer(u, fmt) if u in idx.inits else self._cast_input(u, fmt.onnx_type, n)
            want = ct.onnx_type
            if self._st.get(u) == want:
                continue
            n.input[k] = self._typed_initializer(u, ct) if u in idx.inits else self._cast_input(u, want, n)
            self._modified = True

    def _rewrite_output(self, n: onnx.NodeProto, slot: int, v: str, fmt: Precision, policy: Policy, ct: Precision,
                        raw_of: dict[str, str], is_graph_output: bool) -> None:
        kind = get_meta(n, KIND) or ""
        value_fmt = fmt.compute_output if policy is Policy.ALWAYS else fmt
        if self.mode == "emulate":
            copies = kind in LOOKUP_KINDS and value_fmt is fmt  # rows of a table already in its value format
            rounds = (policy is Policy.ALWAYS and fmt is not FP32 and not copies) or get_meta(n, ROUNDS) == "1"
            if rounds:
                raw = self._rename_output(n, slot, v, "fp32", raw_of)
                why = (f"{get_meta(n, LAYER)} ({fmt}) writes {value_fmt}" if policy is Policy.ALWAYS
                       else f"{kind} runs in {fmt}: fp32 result stored in {fmt}")
                self._emit_round(raw, value_fmt, v, n, "round", why)
            return
        want = value_fmt.onnx_type if policy in (Policy.ALWAYS, Policy.FOLLOW) else FLOAT
        if self._st[v] != want:
            raw = self._rename_output(n, slot, v, ct.value, raw_of)
            why = (f"{get_meta(n, LAYER) or kind} computes in {ct}, its value is {value_fmt}")
            self._emit_cast(raw, want, v, n, "cast", why)
        if is_graph_output and self._st[v] != FLOAT:
            raw = self._rename_output_of_last(v, _type_name(self._st[v]))
            raw_of.setdefault(v, raw)
            # a node that reads the output in the type it had before this cast reads it from there,
            # not through a cast back (a chain; a redundant one after an fp8 layer's bf16 cast)
            self._made[(v, "cast", self._st[raw], None)] = raw
            self._emit_cast(raw, FLOAT, v, n, "cast", "graph outputs are fp32")

    # --- building blocks --------------------------------------------------------------------------
    def _is_bias_add(self, n: onnx.NodeProto, g: str | None, fmt: Precision, policy: Policy) -> bool:
        """Whether ``n`` adds a 16-bit layer's bias to its product (an Add of the layer's group that
        reads its core node's result: the exporter's MatMul + Add, or SplitBias's): it reads both
        rounded to the layer's format (:func:`autoprec.torch.semantics.finish`)."""
        if policy is not Policy.ALWAYS or not fmt.is_16bit or n.op_type != "Add" or get_meta(n, ROLE) == ROLE_CORE:
            return False
        idx = self._idx
        for u in n.input:
            p = idx.producer.get(u)
            if p is not None and get_meta(idx.nodes[p], ROLE) == ROLE_CORE and get_meta(idx.nodes[p], GROUP) == g:
                return True
        return False

    def _value_format(self, u: str) -> Precision:
        p = self._idx.producer.get(u)
        if p is None:
            return FP32
        return node_value_format(self._idx.nodes[p]) or FP32

    def _rename_output(self, n: onnx.NodeProto, slot: int, v: str, tag: str, raw_of: dict[str, str]) -> str:
        raw = unique_name(self._taken, f"{v}_{tag}")
        n.output[slot] = raw
        raw_of.setdefault(v, raw)
        self._st[raw] = self._st[v]
        self._modified = True
        return raw

    def _rename_output_of_last(self, v: str, tag: str) -> str:
        """Rename ``v`` where the last emitted node writes it (a cast we just added, or the producer).
        Renaming is a change on its own: a 16-bit layer that writes a graph output in its own
        format (a bf16 Gather) gets no other cast before its cast back to fp32."""
        for node in reversed(self._nodes):
            for s, o in enumerate(node.output):
                if o == v:
                    raw = unique_name(self._taken, f"{v}_{tag}")
                    node.output[s] = raw
                    self._st[raw] = self._st[v]
                    self._modified = True
                    return raw
        raise PassError(f"{self.name}: no node writes graph output {v}")

    def _new_node(self, op: str, inputs: list[str], output: str, reader: onnx.NodeProto, what: str, fmt: str,
                  reason: str, **attrs: object) -> onnx.NodeProto:
        node = onnx.helper.make_node(op, inputs, [output], name=unique_name(self._taken, f"{output}_{op}"), **attrs)
        set_meta(node, INSERTED, what)
        set_meta(node, FORMAT, fmt)
        set_meta(node, REASON, reason)
        set_meta(node, SCOPE, get_meta(reader, SCOPE) or "")
        self._nodes.append(node)
        return node

    def _emit_cast(self, src: str, to: int, out: str, reader: onnx.NodeProto, what: str, reason: str) -> None:
        self._new_node("Cast", [src], out, reader, what, _type_name(to), reason, to=to)
        self._st[out] = to

    def _emit_round(self, src: str, fmt: Precision, out: str, reader: onnx.NodeProto, what: str, reason: str) -> None:
        mid = unique_name(self._taken, f"{out}_to_{fmt.value}")
        self._new_node("Cast", [src], mid, reader, what, fmt.value, reason, to=fmt.onnx_type)
        self._new_node("Cast", [mid], out, reader, what, fmt.value, f"back to fp32 after rounding to {fmt}", to=FLOAT)
        self._st[mid], self._st[out] = fmt.onnx_type, FLOAT

    def _reader_label(self, n: onnx.NodeProto) -> str:
        return get_meta(n, LAYER) or get_meta(n, GROUP) or n.name

    def _cast_input(self, u: str, to: int, reader: onnx.NodeProto) -> str:
        key = (u, "cast", to, None)
        if key not in self._made:
            out = unique_name(self._taken, f"{u}_to_{_type_name(to)}")
            have = _type_name(self._st[u])
            self._emit_cast(u, to, out, reader, "cast",
                            f"{have} -> {_type_name(to)} for {self._reader_label(reader)} "
                            f"({get_meta(reader, REASON) or ''})")
            self._made[key] = out
        return self._made[key]

    def _round_input(self, u: str, fmt: Precision, reader: onnx.NodeProto) -> str:
        key = (u, "round", fmt, None)
        if key not in self._made:
            out = unique_name(self._taken, f"{u}_as_{fmt.value}")
            self._emit_round(u, fmt, out, reader, "round",
                             f"{self._value_format(u)} -> {fmt} for {self._reader_label(reader)} "
                             f"({get_meta(reader, REASON) or ''})")
            self._made[key] = out
        return self._made[key]

    def _typed_initializer(self, u: str, fmt: Precision) -> str:
        key = (u, "init", fmt, None)
        if key not in self._made:
            t = make_tensor(unique_name(self._taken, f"{u}_{fmt.value}"),
                            rounded_array(self._idx.array(u).astype("float32"), fmt), fmt.onnx_type)
            self._model.graph.initializer.append(t)
            self._st[t.name] = fmt.onnx_type
            self._made[key] = t.name
        return self._made[key]

    def _qdq(self, u: str, fmt: Precision, amax: float, reader: onnx.NodeProto) -> str:
        key = (u, "qdq", fmt, amax)
        if key in self._made:
            return self._made[key]
        src = u if self._st[u] == FLOAT else self._cast_input(u, FLOAT, reader)
        scale = float(fp8_scale(amax, fmt))
        s = make_tensor(unique_name(self._taken, f"{u}_{fmt.value}_scale"), np.array(scale, np.float32),
                        FLOAT)
        z = make_tensor(unique_name(self._taken, f"{u}_{fmt.value}_zero_point"),
                        np.zeros((), fmt.numpy_dtype), fmt.onnx_type)
        self._model.graph.initializer.extend([s, z])
        q = unique_name(self._taken, f"{u}_{fmt.value}")
        why = f"{self._value_format(u)} -> {fmt} (static scale amax {amax:.6g} / {fmt.max:g}) for fp8 layer " \
              f"{self._reader_label(reader)}"
        self._new_node("QuantizeLinear", [src, s.name, z.name], q, reader, "quantize", fmt.value, why,
                       saturate=1 if fmt.info.saturates else 0)
        out = unique_name(self._taken, f"{u}_as_{fmt.value}")
        self._new_node("DequantizeLinear", [q, s.name, z.name], out, reader, "quantize", fmt.value,
                       f"fp8 codes x scale -> fp32 for {self._reader_label(reader)}")
        self._st[q], self._st[out] = fmt.onnx_type, FLOAT
        self._made[key] = out
        return out

    # --- postcondition ----------------------------------------------------------------------------
    def ensures(self, model: onnx.ModelProto) -> None:
        super().ensures(model)
        typed = infer_types(copy.deepcopy(model))
        idx = GraphIndex(typed)
        for v in idx.inputs + idx.outputs:
            if idx.is_float(v) and idx.elem_type(v) != FLOAT:
                raise PassError(f"{self.name}: graph input/output {v} is {_type_name(idx.elem_type(v))}, not fp32")
        seen: set[tuple] = set()
        for n in idx.nodes:
            what = get_meta(n, INSERTED)
            if what in ("cast", "round", "quantize") and n.op_type in ("Cast", "QuantizeLinear"):
                src = n.input[0]
                target = attr(n, "to") if n.op_type == "Cast" else (
                    float(idx.array(n.input[1])), idx.elem_type(n.input[2]))
                key = (src, n.op_type, target)
                if key in seen:
                    raise PassError(f"{self.name}: a second {n.op_type} of {src} to the same target")
                seen.add(key)
                if n.op_type == "Cast" and self._redundant(idx, n):
                    raise PassError(f"{self.name}: {n.name} converts {src} to the type it already holds")
            if self.mode == "emulate" and not what:
                for v in list(n.input) + list(n.output):
                    if v and idx.is_float(v) and idx.elem_type(v) != FLOAT and v not in idx.inits:
                        raise PassError(f"{self.name}: emulation node {n.name} ({n.op_type}) handles "
                                            f"{_type_name(idx.elem_type(v))} value {v}")

    @staticmethod
    def _redundant(idx: GraphIndex, cast: onnx.NodeProto) -> bool:
        """A Cast to T of a value an inserted Cast (deploy) or rounding pair (emulate) just made T."""
        to = attr(cast, "to")
        prod = idx.nodes[idx.producer[cast.input[0]]] if cast.input[0] in idx.producer else None
        if prod is None or not get_meta(prod, INSERTED) or prod.op_type != "Cast":
            return False
        if attr(prod, "to") == to:
            return True
        if attr(prod, "to") == FLOAT and to != FLOAT and prod.input[0] in idx.producer:
            first = idx.nodes[idx.producer[prod.input[0]]]
            return bool(get_meta(first, INSERTED)) and first.op_type == "Cast" and attr(first, "to") == to
        return False
