"""Op kinds: the one registry of what each kind of op is, shared by both frontends and the cost model.

A kind is a normalised op name ("linear", "conv2d", "relu", "softmax", ...). Its :class:`OpKind`
says how it takes part in mixed precision (its :class:`Policy`), whether it is a layer and of which
class, whether it is a lookup, adds a bias, is exact in any format or only changes a view, and how
its FLOPs are counted (:func:`flops`). The frontends spell ops differently and map them here:

- ONNX op types: :func:`onnx_kind` (one table; ops that exist per spatial rank, Conv and the pools,
  are named by their operands' rank where it is known);
- ATen op names (torch.export graphs, the ONNX exporter's metadata): :func:`aten_kind`;
- torch objects (nn module classes, torch functions): tables in :mod:`autoprec.torch.capture` that
  map them to the kind names defined here.

Torch-free on purpose, so that users with only an .onnx file never import torch. The frozensets
below (LAYER_KINDS, FOLLOW_KINDS, ...) are views of the registry for callers that test membership.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from autoprec.core.opgraph import Policy


class FlopsRule(enum.Enum):
    """How an op's FLOPs follow from its shapes (multiply-adds count twice)."""

    ZERO = "zero"  # no arithmetic: a lookup copies rows, a shape read computes nothing
    PRODUCT = "product"  # 2 * output elements * the first operand's last dim (the contracted one)
    CONV = "conv"  # 2 * output elements * kernel elements per output channel (kernel.shape[1:])
    CONV_TRANSPOSE = "conv_transpose"  # 2 * input elements * kernel.shape[1:] (each input scatters)
    NORM = "norm"  # 5 per output element: statistics, normalise, scale (softmax and the norms)
    RECURRENT = "recurrent"  # 2 * steps (the first operand's elements but its last axis) * weight elements
    ELEMENTWISE = "elementwise"  # 1 per output element (and the default for unknown kinds)


#: the classes of layers: what matches a captured layer with an ONNX group (autoprec.onnx.passes.map_layers)
LAYER_CLASSES = ("linear", "conv", "conv_transpose", "matmul", "embedding")


@dataclass(frozen=True)
class OpKind:
    """One kind of op: its name, mixed-precision policy, layer class and FLOPs rule.

    ``layer``: the layer class (one of LAYER_CLASSES) of kinds the search chooses a format for, else
    None. ``lookup``: reads rows of its weight by integer indices (no floating activation in, no
    arithmetic). ``bias``: may add a bias, its third argument (autoprec.torch.semantics.finish).
    ``exact``: a FOLLOW op whose outputs hold only values (or negated values) of its inputs, so it
    needs no rounding in a 16-bit format. ``view``: changes only the view of a tensor (no kernel, no
    bytes moved: the cost model). ``opaque``: a NEVER kind autoprec does not model (it stays fp32 as
    any unknown op does), not one known to be numerically sensitive.
    """

    name: str
    policy: Policy
    layer: str | None = None
    lookup: bool = False
    bias: bool = False
    exact: bool = False
    view: bool = False
    opaque: bool = False
    flops: FlopsRule = FlopsRule.ELEMENTWISE

    def __post_init__(self) -> None:
        if (self.layer is not None) != (self.policy is Policy.ALWAYS) or \
                (self.layer is not None and self.layer not in LAYER_CLASSES):
            raise ValueError(f"kind {self.name}: a layer class of {LAYER_CLASSES} iff its policy is ALWAYS")
        if self.lookup and self.layer != "embedding":
            raise ValueError(f"kind {self.name}: a lookup is an embedding layer")
        if self.exact and self.policy is not Policy.FOLLOW:
            raise ValueError(f"kind {self.name}: only FOLLOW kinds are exact")
        if self.opaque and self.policy is not Policy.NEVER:
            raise ValueError(f"kind {self.name}: only NEVER kinds are opaque")


_ALWAYS, _FOLLOW, _NEVER, _NONE = Policy.ALWAYS, Policy.FOLLOW, Policy.NEVER, Policy.NONE

#: spatial ranks of the ops that exist once per rank (conv1d/2d/3d, max_pool1d/2d/3d, ...)
SPATIAL_RANKS = (1, 2, 3)


def _kinds(policy: Policy, *names: str, **traits: Any) -> tuple[OpKind, ...]:
    return tuple(OpKind(name, policy, **traits) for name in names)


def _per_rank(template: str) -> tuple[str, ...]:
    return tuple(template.format(n) for n in SPATIAL_RANKS)


_REGISTRY: tuple[OpKind, ...] = (
    # layers: the search chooses their format
    OpKind("linear", _ALWAYS, layer="linear", bias=True, flops=FlopsRule.PRODUCT),
    *(OpKind(name, _ALWAYS, layer="conv", bias=True, flops=FlopsRule.CONV) for name in _per_rank("conv{}d")),
    # a class of its own: its weight is [C_in, C_out/groups, k...] (the output channels on axis 1,
    # :func:`weight_channel_axis`), ONNX writes it as ConvTranspose, and a batch norm after it does
    # not fold as after a convolution (CONV_KINDS)
    *(OpKind(name, _ALWAYS, layer="conv_transpose", bias=True, flops=FlopsRule.CONV_TRANSPOSE)
      for name in _per_rank("conv_transpose{}d")),
    OpKind("matmul", _ALWAYS, layer="matmul", flops=FlopsRule.PRODUCT),
    OpKind("bmm", _ALWAYS, layer="matmul", flops=FlopsRule.PRODUCT),
    # an embedding table is the weight a language model stores first; in a format its output is the
    # lookup of the weight rounded to it (in fp8, one scale per row, rounded once more to bf16)
    OpKind("embedding", _ALWAYS, layer="embedding", lookup=True, flops=FlopsRule.ZERO),
    # FOLLOW: run in the (widest) format of their floating inputs
    *_kinds(_FOLLOW, "relu", "neg", "abs", "max_pool1d", "max_pool2d", "adaptive_max_pool2d",
            "contiguous", "cat", "stack", "select", "slice", "clone", exact=True),
    *_kinds(_FOLLOW, "reshape", "view", "flatten", "unflatten", "permute", "transpose", "t", "getitem",
            "squeeze", "unsqueeze", "expand", "split", "chunk", "identity", exact=True, view=True),
    OpKind("dropout", _FOLLOW, view=True),
    *_kinds(_FOLLOW, "gelu", "silu", "sigmoid", "tanh", "leaky_relu", "hardtanh", "elu", "erf",
            "add", "sub", "mul", "div", "truediv", "iadd", "imul",
            "avg_pool1d", "avg_pool2d", "adaptive_avg_pool1d", "adaptive_avg_pool2d",
            "masked_fill", "where", "pad", "interpolate", "to_copy"),
    # NEVER: numerically sensitive, fp32 by default
    *_kinds(_NEVER, "softmax", "log_softmax", "layer_norm", "batch_norm", "group_norm", flops=FlopsRule.NORM),
    *_kinds(_NEVER, "instance_norm", "rms_norm", "exp", "log", "pow", "sqrt", "rsqrt", "reciprocal",
            "mean", "sum", "var", "std", "amax", "max", "min", "norm", "cumsum",
            "cross_entropy", "nll_loss", "mse_loss", "scaled_dot_product_attention"),
    # NEVER, opaque: ops autoprec does not model (fp32 is the safe default for those)
    *_kinds(_NEVER, "maximum", "minimum", "if", "loop", "scan", opaque=True),
    # recurrent layers as one op: each step multiplies every weight matrix once. nn.LSTM/nn.GRU of
    # a torch model are traced as their products instead (autoprec.torch.recurrent: linear layers);
    # these kinds are what stays one op -- ONNX LSTM/GRU/RNN nodes, nn.RNN, an LSTM with proj_size,
    # a packed sequence -- whose products no plan reaches: fp32, and the coverage names them
    *_kinds(_NEVER, "lstm", "gru", "rnn_tanh", "rnn_relu", opaque=True, flops=FlopsRule.RECURRENT),
    # pools the torch side has no module or function entry for (and torch no 16-bit CPU kernel for
    # avg_pool3d): the names ONNX pools of those ranks get
    *_kinds(_NEVER, "max_pool3d", "avg_pool3d", "adaptive_avg_pool3d", "adaptive_max_pool1d",
            "adaptive_max_pool3d", opaque=True),
    # an attribute read: a shape (no floating value: no op) or a property such as .T, which capture
    # cannot tell apart from other attributes
    OpKind("getattr", _NEVER, view=True, opaque=True),
    # NONE: graph inputs and outputs, parameters, and reads of shapes and dtypes
    *_kinds(_NONE, "placeholder", "output", "get_attr", "dim", "numel", "shape", "dtype", "device", "type_as",
            "sym_size", flops=FlopsRule.ZERO),
    # constants made at run time (a recurrent layer's zero state, position ids): inputs, as stored tensors are
    *_kinds(_NONE, "zeros", "ones", "full", "empty", "zeros_like", "ones_like", "full_like", "empty_like",
            "new_zeros", "new_ones", "new_full", "new_empty", "arange", "scalar_tensor", flops=FlopsRule.ZERO),
    OpKind("size", _NONE, view=True, flops=FlopsRule.ZERO),
)

#: every kind by name
KINDS: Mapping[str, OpKind] = {k.name: k for k in _REGISTRY}
if len(KINDS) != len(_REGISTRY):
    raise ValueError(f"kinds defined twice: {sorted(n for n in KINDS if sum(k.name == n for k in _REGISTRY) > 1)}")


def policy_of(kind: str) -> Policy:
    """The policy of ``kind``; NEVER for an unknown kind: fp32 is the safe default for an op we
    cannot reason about."""
    k = KINDS.get(kind)
    return k.policy if k is not None else Policy.NEVER


def layer_class(kind: str) -> str | None:
    """The layer class of a layer kind ("conv" for conv1d/2d/3d, "conv_transpose" for
    conv_transpose1d/2d/3d, "matmul" for bmm), else None."""
    k = KINDS.get(kind)
    return k.layer if k is not None else None


# --- argument positions of layers (the capture's normalised form: F.linear(x, w, b), F.conv*(x, w, b,
# ...), F.conv_transpose*(x, w, b, stride, padding, output_padding, groups, dilation), torch.matmul(a,
# b), F.embedding(idx, table)); an ONNX layer's core node reads its activation and weight at the same
# input slots (MatMul/Gemm/Conv/ConvTranspose: A, B; Gather: table first, handled apart)
_ACT_ARGS = {"linear": (0,), "conv": (0,), "conv_transpose": (0,), "matmul": (0, 1), "embedding": ()}
_WEIGHT_ARG = {"linear": 1, "conv": 1, "conv_transpose": 1, "embedding": 1}
#: where a weight holds its output channels when not on axis 0 (a linear weight's rows, a
#: convolution's [C_out, C_in/groups, k...], a table's rows): a transposed convolution's weight is
#: [C_in, C_out/groups, k...], and with groups its output channel (g, j) reads only the input
#: channels of group g, so its groups argument (ONNX: the ``group`` attribute) matters too
_CHANNEL_AXIS = {"conv_transpose": 1}
_GROUPS_ARG = {"conv_transpose": 6}


def act_arg_positions(kind: str) -> tuple[int, ...]:
    """Positions of a layer's floating activation inputs (an embedding's indices are integers: none)."""
    cls = layer_class(kind)
    if cls is None:
        raise KeyError(f"{kind} is not a layer kind")
    return _ACT_ARGS[cls]


def weight_arg_position(kind: str) -> int | None:
    """Position of a layer's weight argument; None for a product of two activations (matmul)."""
    cls = layer_class(kind)
    return None if cls is None else _WEIGHT_ARG.get(cls)


def weight_channel_axis(kind: str) -> int:
    """The axis of a layer's weight that holds its output channels (what fp8 scales per channel
    along): 1 for a transposed convolution, 0 for every other layer with a weight."""
    return _CHANNEL_AXIS.get(layer_class(kind) or "", 0)


def groups_arg_position(kind: str) -> int | None:
    """Position of the groups argument of a layer whose output channels depend on it (a transposed
    convolution's, :data:`_CHANNEL_AXIS`); None for the others."""
    return _GROUPS_ARG.get(layer_class(kind) or "")


def _where(**want: object) -> frozenset[str]:
    return frozenset(k.name for k in _REGISTRY if all(getattr(k, f) == v for f, v in want.items()))


LAYER_KINDS = _where(policy=Policy.ALWAYS)
#: layers that look rows of their weight up by integer indices: they read no floating activation
#: and compute nothing
LOOKUP_KINDS = _where(lookup=True)
#: layers that may add a bias to their product (their third argument)
BIAS_KINDS = _where(bias=True)
#: convolutions: an inference-mode batch norm right after one folds into it (autoprec.core.bn_fold; not
#: after a transposed convolution, whose output channels lie on another axis of its weight)
CONV_KINDS = _where(layer="conv")
#: transposed convolutions (ONNX ConvTranspose): their weight is [C_in, C_out/groups, k...]
CONV_TRANSPOSE_KINDS = _where(layer="conv_transpose")
FOLLOW_KINDS = _where(policy=Policy.FOLLOW)
#: kinds kept fp32 because their numerics are sensitive (norms, softmax, exp/log/pow, reductions, losses)
NEVER_KINDS = _where(policy=Policy.NEVER, opaque=False)
#: FOLLOW kinds whose outputs hold only values (or negated values) of their inputs: on inputs
#: representable in a format their results are too, so running them in 16-bit needs no rounding
EXACT_FOLLOW_KINDS = _where(exact=True)
#: kinds that only change the view of a tensor: no kernel, no bytes moved (the cost model)
VIEW_KINDS = _where(view=True)


# --- torch spellings ------------------------------------------------------------------------------
#: torch.nn module classes (by name under torch.nn) -> kind: what fx records as one call_module
#: (autoprec.torch.capture resolves them to the classes; the ONNX exporter's class hierarchy names
#: them as torch.nn.modules.<file>.<name>, which autoprec.onnx.passes.map_layers reads)
TORCH_MODULE_KINDS: Mapping[str, str] = {
    "Linear": "linear", "Conv1d": "conv1d", "Conv2d": "conv2d", "Conv3d": "conv3d", "ReLU": "relu",
    "ConvTranspose1d": "conv_transpose1d", "ConvTranspose2d": "conv_transpose2d",
    "ConvTranspose3d": "conv_transpose3d",
    "GELU": "gelu", "SiLU": "silu", "Sigmoid": "sigmoid", "Tanh": "tanh", "LeakyReLU": "leaky_relu",
    "Hardtanh": "hardtanh", "ELU": "elu", "MaxPool1d": "max_pool1d", "MaxPool2d": "max_pool2d",
    "AvgPool1d": "avg_pool1d", "AvgPool2d": "avg_pool2d", "AdaptiveAvgPool1d": "adaptive_avg_pool1d",
    "AdaptiveAvgPool2d": "adaptive_avg_pool2d", "AdaptiveMaxPool2d": "adaptive_max_pool2d",
    "Flatten": "flatten", "Unflatten": "unflatten", "Dropout": "dropout", "Identity": "identity",
    "Softmax": "softmax", "LogSoftmax": "log_softmax", "LayerNorm": "layer_norm",
    "BatchNorm1d": "batch_norm", "BatchNorm2d": "batch_norm", "BatchNorm3d": "batch_norm",
    "GroupNorm": "group_norm", "InstanceNorm2d": "instance_norm", "Embedding": "embedding",
    "CrossEntropyLoss": "cross_entropy", "MSELoss": "mse_loss",
}


def torch_module_kind(qualname: str) -> str | None:
    """The kind of a torch.nn module class given by its qualified name (``torch.nn.modules.linear.Linear``),
    None for a class that is not a torch.nn module of the table."""
    if not qualname.startswith("torch.nn."):
        return None
    return TORCH_MODULE_KINDS.get(qualname.rsplit(".", 1)[-1])


# --- ONNX spellings -----------------------------------------------------------------------------
#: ONNX op type (default domain) -> kind. MatMul and Gemm are layers only when they read a constant
#: weight (autoprec.onnx.graph decides from the graph; Gemm of two activations is a matmul), a
#: Gather of a float table on axis 0 is an embedding, else a select. Ops absent map to their
#: lower-cased name, an unknown kind (NEVER).
ONNX_KINDS: Mapping[str, str] = {
    "MatMul": "matmul", "Gemm": "linear", "Gather": "select",
    "Relu": "relu", "LeakyRelu": "leaky_relu", "Sigmoid": "sigmoid", "Tanh": "tanh", "Elu": "elu",
    "Gelu": "gelu", "Erf": "erf", "Neg": "neg", "Abs": "abs", "Clip": "hardtanh",
    "Add": "add", "Sub": "sub", "Mul": "mul", "Div": "div", "Sum": "add",
    "Exp": "exp", "Log": "log", "Pow": "pow", "Sqrt": "sqrt", "Reciprocal": "reciprocal",
    "Max": "maximum", "Min": "minimum",
    "Softmax": "softmax", "LogSoftmax": "log_softmax", "LayerNormalization": "layer_norm",
    "BatchNormalization": "batch_norm", "InstanceNormalization": "instance_norm",
    "GroupNormalization": "group_norm", "RMSNormalization": "rms_norm",
    "ReduceMean": "mean", "ReduceSum": "sum", "ReduceMax": "amax", "ReduceMin": "min",
    "ReduceL2": "norm", "CumSum": "cumsum",
    # Transpose takes a whole permutation: torch's permute (transpose swaps two axes)
    "Reshape": "reshape", "Transpose": "permute", "Flatten": "flatten", "Squeeze": "squeeze",
    "Unsqueeze": "unsqueeze", "Expand": "expand", "Concat": "cat", "Split": "split", "Slice": "slice",
    "Identity": "identity", "Dropout": "dropout", "Pad": "pad", "Resize": "interpolate",
    "Where": "where", "Cast": "to_copy", "CastLike": "to_copy",
    "Constant": "get_attr", "Shape": "size", "Size": "size",
    "If": "if", "Loop": "loop", "Scan": "scan", "Attention": "scaled_dot_product_attention",
    "LSTM": "lstm", "GRU": "gru", "RNN": "rnn_tanh", "ConstantOfShape": "full", "Range": "arange",
}

#: ONNX op types that exist for every spatial rank -> their kinds' names, "{}" the spatial rank
ONNX_RANKED_KINDS: Mapping[str, str] = {
    "Conv": "conv{}d", "ConvTranspose": "conv_transpose{}d", "MaxPool": "max_pool{}d",
    "AveragePool": "avg_pool{}d", "GlobalAveragePool": "adaptive_avg_pool{}d",
    "GlobalMaxPool": "adaptive_max_pool{}d",
}

#: com.microsoft (ONNX Runtime contrib) op types with a kind; other custom-domain ops are unknown
ONNX_CONTRIB_KINDS: Mapping[str, str] = {
    "Gelu": "gelu", "FastGelu": "gelu", "BiasGelu": "gelu", "QuickGelu": "gelu",
    "SimplifiedLayerNormalization": "rms_norm",
}


def _ranked(template: str, rank: int | None) -> str | None:
    """``template`` at the spatial rank of operands of ``rank`` (2-D when unknown), None when no
    such kind exists (a 4-D convolution)."""
    name = template.format(rank - 2 if rank is not None and rank >= 3 else 2)
    return name if name in KINDS else None


def onnx_kind(op_type: str, domain: str = "", rank: int | None = None) -> str:
    """The kind of an ONNX op type, without looking at the graph around it (see ONNX_KINDS).

    ``rank``: the rank of the node's kernel or data operand where known; it names the ops of
    ONNX_RANKED_KINDS (a Conv with a rank-3 kernel is conv1d; unknown, they are named 2-D). Ops of
    another domain than the default one are "<domain>.<op_type>" (unknown) unless com.microsoft
    ones of ONNX_CONTRIB_KINDS.
    """
    if domain not in ("", "ai.onnx"):
        contrib = ONNX_CONTRIB_KINDS.get(op_type) if domain == "com.microsoft" else None
        return contrib or f"{domain}.{op_type}"
    if op_type in ONNX_RANKED_KINDS:
        return _ranked(ONNX_RANKED_KINDS[op_type], rank) or op_type.lower()
    return ONNX_KINDS.get(op_type, op_type.lower())


# --- ATen spellings -----------------------------------------------------------------------------
#: ATen op name -> kind, where they differ: in-place and private variants, the forms torch.export
#: and the ONNX exporter's decompositions write (torch.fx's ``x.reshape`` arrives as
#: ``aten._unsafe_view``), and the ``*_copy`` ops of functionalised graphs. Other ATen names are
#: their kinds (``aten.linear`` is linear).
ATEN_ALIASES: Mapping[str, str] = {
    "_to_copy": "to_copy", "to": "to_copy", "div_": "div", "add_": "add", "mul_": "mul", "relu_": "relu",
    "native_layer_norm": "layer_norm", "_native_batch_norm_legit_no_training": "batch_norm",
    "clamp": "hardtanh", "alias": "identity", "alias_copy": "identity", "lift_fresh_copy": "identity",
    "detach": "identity", "mm": "matmul", "addmm": "linear", "_unsafe_view": "reshape",
    "_reshape_alias": "reshape", "_softmax": "softmax", "_log_softmax": "log_softmax", "sym_size": "size",
    "split_with_sizes": "split", "unsafe_split": "split", "max_pool2d_with_indices": "max_pool2d",
    "native_dropout": "dropout", "_adaptive_avg_pool2d": "adaptive_avg_pool2d", "expand_copy": "expand",
    "view_copy": "view", "permute_copy": "permute", "transpose_copy": "transpose",
    "unsqueeze_copy": "unsqueeze", "squeeze_copy": "squeeze", "slice_copy": "slice",
    "select_copy": "select", "t_copy": "t",
}

#: ATen ops that exist for every spatial rank -> their kinds' names, "{}" the spatial rank
ATEN_RANKED_KINDS: Mapping[str, str] = {"convolution": "conv{}d"}
#: the same for the transposed form (``aten.convolution`` with ``transposed=True``)
ATEN_TRANSPOSED_KINDS: Mapping[str, str] = {"convolution": "conv_transpose{}d"}


def aten_kind(target: str, rank: int | None = None, transposed: bool = False) -> str:
    """The kind of an ATen op: ``aten.conv2d.default`` (an exporter's spelling) or ``conv2d`` (a
    schema's name). ``rank``: the rank of its kernel where known, which names ``aten.convolution``
    (2-D when unknown); ``transposed``: its transposed flag, which the ONNX exporter's metadata does
    not record (it writes every convolution as ``aten.convolution``; the ONNX op, Conv or
    ConvTranspose, says which)."""
    parts = target.split(".")
    base = parts[1] if len(parts) > 1 and parts[0] == "aten" else parts[-1]
    ranked = ATEN_TRANSPOSED_KINDS if transposed else ATEN_RANKED_KINDS
    if base in ranked:
        return _ranked(ranked[base], rank) or base
    return ATEN_ALIASES.get(base, base)


# --- FLOPs --------------------------------------------------------------------------------------
def flops(kind: str, input_shapes: Sequence[Sequence[int]], output_shape: Sequence[int] | None,
          weight_shape: Sequence[int] | None = None, weight_elems: int = 0) -> int:
    """FLOPs of one op of ``kind`` (its :class:`FlopsRule`; multiply-adds count twice).

    ``input_shapes``: its operands' shapes in argument order (``()`` for one of unknown shape; a
    Gemm reading A transposed passes A's shape as the product sees it). ``output_shape``: its
    (first) output's, None when unknown (then 0). ``weight_shape``: a convolution's kernel, else its
    operand 1. ``weight_elems``: the stored elements it reads (a recurrent layer's weight matrices).
    A rule whose shapes are missing counts one FLOP per output element.
    """
    k = KINDS.get(kind)
    rule = k.flops if k is not None else FlopsRule.ELEMENTWISE
    first = tuple(input_shapes[0]) if input_shapes else ()
    if rule is FlopsRule.RECURRENT:  # returns a tuple (outputs and states): its shape says nothing here
        return 2 * math.prod(int(s) for s in first[:-1]) * weight_elems if first else 0
    if output_shape is None:
        return 0
    n_out = math.prod(int(s) for s in output_shape)
    kernel = tuple(weight_shape) if weight_shape is not None else \
        tuple(input_shapes[1]) if len(input_shapes) > 1 else ()
    if rule is FlopsRule.ZERO:
        return 0
    if rule is FlopsRule.PRODUCT and first:
        return 2 * n_out * int(first[-1])
    if rule is FlopsRule.CONV and kernel:
        return 2 * n_out * math.prod(int(s) for s in kernel[1:])
    if rule is FlopsRule.CONV_TRANSPOSE and kernel and first:
        return 2 * math.prod(int(s) for s in first) * math.prod(int(s) for s in kernel[1:])
    if rule is FlopsRule.NORM:
        return 5 * n_out
    return n_out
