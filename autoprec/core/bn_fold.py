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

from typing import Any

import numpy as np

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


def shapes_fold(weight: np.ndarray | Any, channels: int) -> bool:
    return len(weight.shape) in (3, 4, 5) and int(weight.shape[0]) == channels
