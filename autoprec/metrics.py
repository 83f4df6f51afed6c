"""Metrics of a torch model: its own evaluate(), or its fidelity to the fp32 model.

A budget bounds the *drop* of a metric in its own direction (:mod:`autoprec.core.metrics`, which
holds the torch-free definition of both). Models with ``evaluate()`` use their own metric on
held-out data; models without it are judged on fidelity to the fp32 model over the calibration data:
top-1 agreement (classifier-like outputs; KL reported beside it) or relative L2 error (values).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from autoprec.core.metrics import Metric, fidelity_to
from autoprec.core.stats import output_kind_of
from autoprec.torch.capture import Captured
from autoprec.torch.spec import ModelSpec
from autoprec.torch.profile import first_tensor  # the one definition of "the model's output"


def _outputs(module: Any, batches: list[tuple[Any, ...]]) -> list[torch.Tensor]:
    with torch.no_grad():
        return [first_tensor(module(*b)).float() for b in batches]


def fidelity_metric(reference_module: Any, batches: list[tuple[Any, ...]], output_kind: str) -> Metric:
    """Fidelity to the fp32 model: top-1 agreement (logits, higher is better) or relative L2
    error (values, lower is better), measured on ``batches``."""
    def outputs(module: Any) -> list[np.ndarray]:
        return [o.cpu().numpy() for o in _outputs(module, batches)]

    return fidelity_to(outputs(reference_module), outputs, output_kind)


def model_metric(spec: ModelSpec, captured: Captured, batches: list[tuple[Any, ...]]) -> Metric:
    """The model's own metric when it has evaluate(), else fidelity to its fp32 outputs."""
    if spec.evaluate is not None:
        return Metric(spec.metric or "metric", spec.higher_is_better, spec.evaluate)
    y = first_tensor(captured.gm(*batches[0]))
    return fidelity_metric(captured.gm, batches, output_kind_of(y, spec.output_kind))
