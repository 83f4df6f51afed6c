"""Attention written out: ``scaled_dot_product_attention`` as the two products a GPU kernel computes.

A fused attention kernel (flash attention, cuDNN's) computes ``Q Kᵀ`` and ``P V`` on tensor cores
in the format of its operands and the softmax between them in fp32. Those two products are where
attention's FLOPs are, so the search must be able to give them formats, as it does to explicit
``q @ k.transpose(-2, -1)`` layers. ``F.scaled_dot_product_attention`` hides them in one opaque op.

While a model is traced -- by the capture (:func:`autoprec.torch.capture.capture`) and by the ONNX
export of the same model (:func:`autoprec.deploy.export.torch_to_onnx`) -- :func:`explicit_attention`
replaces it by :func:`attention_products`, the same computation in ordinary torch ops: two
``matmul`` layers, a scale, the masks and an fp32 softmax. Both traces see the same ops in the same
module scopes, so the captured layers and the exported ONNX MatMuls pair up as every other layer
does. The user's model is not changed: the function is restored when the trace ends.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn.functional as F


def attention_products(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       attn_mask: torch.Tensor | None = None, dropout_p: float = 0.0, is_causal: bool = False,
                       scale: float | None = None, enable_gqa: bool = False) -> torch.Tensor:
    """``F.scaled_dot_product_attention`` with its arguments and result, as explicit ops.

    ``softmax(Q Kᵀ · scale + mask) V``; ``is_causal`` masks the upper triangle (top-left
    aligned, as torch's kernel does), a boolean ``attn_mask`` keeps where True, a float one is added.
    ``enable_gqa`` repeats each key/value head for its group of query heads (grouped-query
    attention). Dropout applies only while training, as in the fused op.
    """
    if enable_gqa and key.size(-3) != query.size(-3):
        repeat = query.size(-3) // key.size(-3)
        key = key.repeat_interleave(repeat, dim=-3)
        value = value.repeat_interleave(repeat, dim=-3)
    factor = query.size(-1) ** -0.5 if scale is None else scale
    scores = torch.matmul(query, key.transpose(-2, -1)) * factor
    if is_causal:
        keep = torch.ones(query.size(-2), key.size(-2), dtype=torch.bool, device=query.device).tril()
        scores = scores.masked_fill(keep.logical_not(), float("-inf"))
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(attn_mask.logical_not(), float("-inf"))
        else:
            scores = scores + attn_mask
    weights = torch.softmax(scores, dim=-1)
    if dropout_p > 0.0:
        weights = F.dropout(weights, dropout_p)
    return torch.matmul(weights, value)


@contextlib.contextmanager
def explicit_attention() -> Iterator[None]:
    """Trace ``F.scaled_dot_product_attention`` as :func:`attention_products` inside the block.

    Patched on ``torch.nn.functional``, the name models call it by (Hugging Face's attention
    functions, torch.nn.MultiheadAttention's functional form), and restored on exit."""
    original = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = attention_products
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original
