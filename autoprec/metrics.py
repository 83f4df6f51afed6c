"""Metrics: what a tuned model is judged by, measured on a torch (or torch-callable) module.

A budget bounds the *drop* of a metric in its own direction (:mod:`autoprec.core.metrics`, which
holds the torch-free definition of both). Models with ``evaluate()`` use their own metric on
held-out data; models without it are judged on fidelity to the fp32 model over the calibration data:
top-1 agreement (classifier-like outputs; KL reported beside it) or relative L2 error (values).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch

from autoprec.core.errors import UsageError
from autoprec.core.metrics import metric_drop


@dataclass(frozen=True)
class Metric:
    """A named metric with a direction and the function that measures a module."""

    name: str
    higher_is_better: bool
    measure: Callable[[Any], float]

    def drop(self, reference: float, value: float) -> float:
        """How much worse ``value`` is than ``reference`` (positive = worse; NaN or inf: infinite)."""
        return metric_drop(reference, value, higher_is_better=self.higher_is_better)


def _outputs(module: Any, batches: list[tuple[Any, ...]]) -> list[torch.Tensor]:
    from autoprec.torch.profile import first_tensor  # the one definition of "the model's output"

    with torch.no_grad():
        return [first_tensor(module(*b)).float() for b in batches]


def fidelity_metric(reference_module: Any, batches: list[tuple[Any, ...]], output_kind: str) -> Metric:
    """Fidelity to the fp32 model: top-1 agreement (logits, higher is better) or relative L2
    error (values, lower is better), measured on ``batches``."""
    return fidelity_to(_outputs(reference_module, batches), lambda m: _outputs(m, batches), output_kind)


def fidelity_to(refs: list[torch.Tensor], outputs_of: Callable[[Any], list[torch.Tensor]], output_kind: str) -> Metric:
    """Fidelity of a model's outputs (``outputs_of(model)``, one tensor per batch) to ``refs``,
    the fp32 outputs of the same batches: the one definition the torch and ONNX flows share."""
    if output_kind == "logits":
        ref_top = [r.argmax(dim=-1) for r in refs]

        def agreement(model: Any) -> float:
            outs = outputs_of(model)
            same = sum(int((o.argmax(dim=-1) == t).sum()) for o, t in zip(outs, ref_top))
            return same / sum(t.numel() for t in ref_top)

        return Metric("top1_agreement", True, agreement)

    def rel_l2(model: Any) -> float:
        outs = outputs_of(model)
        num = sum(float(((o.float() - r.float()) ** 2).sum(dtype=torch.float64)) for o, r in zip(outs, refs))
        den = sum(float((r.float() ** 2).sum(dtype=torch.float64)) for r in refs)
        return math.sqrt(num / den) if den > 0 else 0.0

    return Metric("rel_l2_error", False, rel_l2)


def label_metric(labels: list[torch.Tensor], outputs_of: Callable[[Any], list[torch.Tensor]]) -> Metric:
    """A model's metric against true labels (one tensor per batch): accuracy of the arg-max over
    the last output axis for integer labels (higher is better), mean squared error for float
    labels (lower is better)."""
    if all(not lab.is_floating_point() for lab in labels):
        def accuracy(model: Any) -> float:
            outs = outputs_of(model)
            if tuple(outs[0].shape[:-1]) != tuple(labels[0].shape) or outs[0].shape[-1] < 2:
                raise UsageError(f"integer labels of shape {list(labels[0].shape)} need class scores on the last "
                                 f"output axis, but the output has shape {list(outs[0].shape)}: give float labels "
                                 "to be judged by mean squared error")
            right = sum(int((o.argmax(dim=-1) == lab.to(torch.int64)).sum()) for o, lab in zip(outs, labels))
            return right / sum(lab.numel() for lab in labels)

        return Metric("accuracy", True, accuracy)

    def mse(model: Any) -> float:
        outs = outputs_of(model)
        num = sum(float(((o.double().reshape(lab.shape) - lab.double()) ** 2).sum()) for o, lab in zip(outs, labels))
        return num / sum(lab.numel() for lab in labels)

    return Metric("mse", False, mse)


def kl_to_reference(reference_module: Any, module: Any, batches: list[tuple[Any, ...]]) -> float:
    """Mean KL(p_fp32 || p_module) per output position: reported beside top-1 agreement."""
    refs, outs = _outputs(reference_module, batches), _outputs(module, batches)
    total, count = 0.0, 0
    for r, o in zip(refs, outs):
        lp, lq = torch.log_softmax(r.double(), -1), torch.log_softmax(o.double(), -1)
        kl = (lp.exp() * (lp - lq)).sum(-1)
        total += float(kl.sum())
        count += kl.numel()
    return total / max(count, 1)
