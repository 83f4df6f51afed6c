"""Budgets and the metrics a tuned model is judged by.

A budget is the largest allowed *drop* of a metric, in the metric's own direction: absolute
("0.005") or relative to the fp32 value ("0.5%"). Models with ``evaluate()`` use their own metric on
held-out data; models without it are judged on fidelity to the fp32 model over the calibration data:
top-1 agreement (classifier-like outputs; KL reported beside it) or relative L2 error (values).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch

from autoprec.errors import UsageError


@dataclass(frozen=True)
class DropBudget:
    """Largest allowed metric drop; ``relative`` means a fraction of |fp32 metric|."""

    value: float
    relative: bool

    @classmethod
    def parse(cls, text: str | float) -> "DropBudget":
        """"0.5%" -> relative 0.005; "0.005" -> absolute 0.005. One-line UsageError otherwise."""
        s = str(text).strip()
        rel = s.endswith("%")
        try:
            v = float(s[:-1] if rel else s)
        except ValueError:
            raise UsageError(f"bad budget {text!r}: use an absolute drop like 0.005 or a relative one like 0.5%") from None
        if not math.isfinite(v) or v < 0:
            raise UsageError(f"bad budget {text!r}: it must be a finite, non-negative number")
        return cls(v / 100 if rel else v, rel)

    def allowed_drop(self, reference: float) -> float:
        """The budget in metric units for a model whose fp32 metric is ``reference``.

        A relative budget is a fraction of |reference|, or of 1 when the reference is 0 (the
        relative L2 error of the fp32 model against itself): "1%" then means an error of 0.01.
        """
        if not self.relative:
            return self.value
        return self.value * (abs(reference) if reference != 0 else 1.0)

    def __str__(self) -> str:
        return f"{100 * self.value:g}%" if self.relative else f"{self.value:g}"


@dataclass(frozen=True)
class Metric:
    """A named metric with a direction and the function that measures a module."""

    name: str
    higher_is_better: bool
    measure: Callable[[Any], float]

    def drop(self, reference: float, value: float) -> float:
        """How much worse ``value`` is than ``reference`` (positive = worse)."""
        if math.isnan(value):
            return math.inf
        return reference - value if self.higher_is_better else value - reference


def _outputs(module: Any, batches: list[tuple[Any, ...]]) -> list[torch.Tensor]:
    from autoprec.profile import first_tensor  # the one definition of "the model's output"

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
