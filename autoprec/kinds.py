"""Op kinds and their mixed-precision policy: shared by the torch capture and the ONNX analyser.

Torch-free on purpose, so that users with only an .onnx file never import torch. Kind names are
normalised over fx (torch functions, methods, modules), torch.export (aten ops) and ONNX op types.
"""

from __future__ import annotations

from autoprec.opgraph import Policy

LAYER_KINDS = frozenset({"linear", "conv1d", "conv2d", "conv3d", "matmul", "bmm", "embedding"})

#: Layers that look rows of their weight up by integer indices: they read no floating activation and
#: compute nothing (their output in a format is the lookup of the weight rounded to it; in fp8, with
#: one scale per row, rounded once more to bf16). An embedding table is the weight a language model
#: stores first.
LOOKUP_KINDS = frozenset({"embedding"})

#: Layers that may add a bias to their product (their third argument; see autoprec.semantics.finish).
BIAS_KINDS = frozenset({"linear", "conv1d", "conv2d", "conv3d"})

#: Convolutions: an inference-mode batch norm right after one folds into it (autoprec.bn_fold).
CONV_KINDS = frozenset({"conv1d", "conv2d", "conv3d"})

FOLLOW_KINDS = frozenset({
    "relu", "gelu", "silu", "sigmoid", "tanh", "leaky_relu", "hardtanh", "elu", "erf", "neg", "abs",
    "add", "sub", "mul", "div", "truediv", "iadd", "imul",
    "max_pool1d", "max_pool2d", "avg_pool1d", "avg_pool2d", "adaptive_avg_pool1d", "adaptive_avg_pool2d",
    "adaptive_max_pool2d",
    "reshape", "view", "flatten", "unflatten", "permute", "transpose", "t", "contiguous", "getitem",
    "squeeze", "unsqueeze", "expand", "cat", "stack", "split", "chunk", "select", "slice", "clone",
    "dropout", "masked_fill", "where", "pad", "interpolate", "identity", "to_copy",
})

NEVER_KINDS = frozenset({
    "softmax", "log_softmax", "layer_norm", "batch_norm", "group_norm", "instance_norm", "rms_norm",
    "exp", "log", "pow", "sqrt", "rsqrt", "mean", "sum", "var", "std", "amax", "max", "min", "norm",
    "cross_entropy", "nll_loss", "mse_loss", "cumsum", "scaled_dot_product_attention",
})

# methods and attribute reads that produce no float tensor (shapes, dtypes)
_META_METHODS = frozenset({"size", "dim", "numel", "shape", "dtype", "device", "type_as", "sym_size"})


def policy_of(kind: str) -> Policy:
    if kind in LAYER_KINDS:
        return Policy.ALWAYS
    if kind in FOLLOW_KINDS:
        return Policy.FOLLOW
    if kind in ("placeholder", "output", "get_attr") or kind in _META_METHODS:
        return Policy.NONE
    # NEVER_KINDS and anything unknown: fp32 is the safe default for an op we cannot reason about
    return Policy.NEVER
