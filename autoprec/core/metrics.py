"""Metric drops: how much worse a measured metric is than its fp32 reference, and the budget that bounds it.

A drop is measured in the metric's own direction, so positive is always worse: for a metric where
higher is better (accuracy) it is ``reference - value``, for one where lower is better (an error)
``value - reference``. A budget is the largest allowed drop: absolute ("0.005") or relative to the
fp32 value ("0.5%").

The one rule for values that are not numbers: a drop is never NaN. A NaN or infinite measured value
is an infinite drop, so it is never within any budget -- a model that produced NaN logits, or whose
error overflowed, did not keep its metric, and ``NaN <= budget`` being False in one place and
``max(NaN, x)`` returning x in another must not decide that. A NaN or infinite *reference* is an
infinite drop too: with no fp32 value to compare with, nothing can be shown to be within budget
(tuning refuses such a reference up front; verifying a file reports it as over budget).

How a model's metric is measured (torch) is :mod:`autoprec.metrics`; this module imports no
torch, so the report and verification judge drops by the same definition as tuning does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from autoprec.core.errors import UsageError


def metric_drop(reference: float, value: float, *, higher_is_better: bool) -> float:
    """How much worse ``value`` is than ``reference`` in the metric's direction (positive = worse).

    Infinite when either is NaN or infinite (see the module docstring), so every caller's
    ``drop <= allowed`` and ``max(drops)`` judge a non-number the same way: over budget.
    """
    if not (math.isfinite(reference) and math.isfinite(value)):
        return math.inf
    return reference - value if higher_is_better else value - reference


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
    #: what makes the metric meaningless for this model, for the summary (None: nothing)
    warning: str | None = None

    def drop(self, reference: float, value: float) -> float:
        """How much worse ``value`` is than ``reference`` (positive = worse; NaN or inf: infinite)."""
        return metric_drop(reference, value, higher_is_better=self.higher_is_better)


def fidelity_to(refs: Sequence[Any], outputs_of: Callable[[Any], Sequence[Any]], kinds: Sequence[str]) -> Metric:
    """Fidelity of a model's outputs to ``refs``, the fp32 model's outputs on the same batches.
    The one definition the torch and ONNX flows share.

    ``refs[b]`` holds batch b's outputs that count, one array per output, of ``kinds`` ("logits"
    or "values", :class:`autoprec.core.stats.Outputs`); ``outputs_of(model)`` returns the same for
    ``model``. With one output the metric is its top-1 agreement (logits, higher is better) or
    relative L2 error (values, lower is better). With several it is the worst output's fidelity
    loss, the largest of 1 - top-1 agreement and relative L2 error over the outputs (lower is
    better): a budget then holds for every output, where an average would let a small error on
    one output hide a large one on another.
    """
    ref_top = {o: [np.argmax(r[o], axis=-1) for r in refs] for o, k in enumerate(kinds) if k == "logits"}

    def agreement(o: int, outs: Sequence[Sequence[np.ndarray]]) -> float:
        same = sum(int(np.count_nonzero(np.argmax(b[o], axis=-1) == t)) for b, t in zip(outs, ref_top[o]))
        return same / sum(t.size for t in ref_top[o])

    def rel_l2(o: int, outs: Sequence[Sequence[np.ndarray]]) -> float:
        num = sum(float(np.square(np.asarray(b[o], np.float32) - np.asarray(r[o], np.float32)).sum(dtype=np.float64))
                  for b, r in zip(outs, refs))
        den = sum(float(np.square(np.asarray(r[o], np.float32)).sum(dtype=np.float64)) for r in refs)
        return math.sqrt(num / den) if den > 0 else 0.0

    warning = CONSTANT_REFERENCE if constant_reference(refs) else None
    if len(kinds) == 1:
        if kinds[0] == "logits":
            return Metric("top1_agreement", True, lambda model: agreement(0, outputs_of(model)), warning)
        return Metric("rel_l2_error", False, lambda model: rel_l2(0, outputs_of(model)), warning)

    def worst_loss(model: Any) -> float:
        outs = outputs_of(model)
        losses = [1.0 - agreement(o, outs) if k == "logits" else rel_l2(o, outs) for o, k in enumerate(kinds)]
        return math.nan if any(math.isnan(v) for v in losses) else max(losses)  # max() would skip a NaN

    return Metric("worst_output_fidelity_loss", False, worst_loss, warning)


CONSTANT_REFERENCE = ("the fp32 model gives the same outputs for every calibration sample, so fidelity to them says "
                      "nothing about how the model treats its inputs: give the model a metric (evaluate(), or "
                      "--labels for an .onnx file) or calibration data that changes its outputs")


def constant_reference(refs: Sequence[Sequence[np.ndarray]]) -> bool:
    """Whether every output in ``refs`` (``refs[b][o]``, samples on axis 0) is the same for every
    sample of every batch: then agreement with it cannot tell a good plan from a bad one."""
    if not refs or sum(int(np.shape(r[0])[0]) if np.ndim(r[0]) else 1 for r in refs) < 2:
        return False
    for o in range(len(refs[0])):
        if any(np.ndim(r[o]) == 0 for r in refs):
            return False
        first = np.asarray(refs[0][o])[:1]
        if any(not np.array_equal(np.asarray(r[o]), np.broadcast_to(first, np.shape(r[o]))) for r in refs):
            return False
    return True


def label_metric(labels: list[np.ndarray], outputs_of: Callable[[Any], list[np.ndarray]]) -> Metric:
    """A model's metric against true labels (one array per batch): accuracy of the arg-max over
    the last output axis for integer labels (higher is better), mean squared error for float
    labels (lower is better)."""
    if all(not np.issubdtype(np.asarray(lab).dtype, np.floating) for lab in labels):
        def accuracy(model: Any) -> float:
            outs = outputs_of(model)
            if tuple(outs[0].shape[:-1]) != tuple(labels[0].shape) or outs[0].shape[-1] < 2:
                raise UsageError(f"integer labels of shape {list(labels[0].shape)} need class scores on the last "
                                 f"output axis, but the output has shape {list(outs[0].shape)}: give float labels "
                                 "to be judged by mean squared error")
            right = sum(int(np.count_nonzero(np.argmax(o, axis=-1) == np.asarray(lab, np.int64)))
                        for o, lab in zip(outs, labels))
            return right / sum(np.asarray(lab).size for lab in labels)

        return Metric("accuracy", True, accuracy)

    def mse(model: Any) -> float:
        outs = outputs_of(model)
        num = sum(float(np.square(np.asarray(o, np.float64).reshape(np.shape(lab)) - np.asarray(lab, np.float64)).sum())
                  for o, lab in zip(outs, labels))
        return num / sum(np.asarray(lab).size for lab in labels)

    return Metric("mse", False, mse)
