"""Metrics of a torch model: its own evaluate(), or its fidelity to the fp32 model.

A budget bounds the *drop* of a metric in its own direction (:mod:`autoprec.core.metrics`, which
holds the torch-free definition of both). Models with ``evaluate()`` use their own metric on
held-out data; models without it are judged on fidelity to the fp32 model over the calibration data,
on every output that counts (:class:`autoprec.core.stats.Outputs`): top-1 agreement (a
classifier-like output) or relative L2 error (values) for one output, the worst output's fidelity
loss for several.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from autoprec.core.metrics import Metric, fidelity_to
from autoprec.core.stats import DeclaredKinds
from autoprec.torch.capture import Captured
from autoprec.torch.spec import ModelSpec
from autoprec.torch.profile import model_outputs, selected_outputs  # the one definition of "the model's outputs"


def fidelity_metric(reference_module: Any, batches: list[tuple[Any, ...]], output_kind: DeclaredKinds = None,
                    outputs: Sequence[str] | None = None) -> Metric:
    """Fidelity to the fp32 model, measured on ``batches`` over the outputs named in ``outputs``
    (None: every floating output), each of the kind ``output_kind`` declares for it or its shape
    says (:func:`autoprec.core.metrics.fidelity_to`)."""
    with torch.no_grad():
        results = [reference_module(*b) for b in batches]
    measured = model_outputs(results[0], outputs, output_kind)

    def arrays(result: Any) -> list[np.ndarray]:
        return [y.float().cpu().numpy() for y in selected_outputs(measured, result)]

    def outputs_of(module: Any) -> list[list[np.ndarray]]:
        with torch.no_grad():
            return [arrays(module(*b)) for b in batches]

    return fidelity_to([arrays(r) for r in results], outputs_of, measured.kinds)


def model_metric(spec: ModelSpec, captured: Captured, batches: list[tuple[Any, ...]]) -> Metric:
    """The model's own metric when it has evaluate(), else fidelity to its fp32 outputs (those its
    ``OUTPUTS`` names, or all)."""
    if spec.evaluate is not None:
        return Metric(spec.metric or "metric", spec.higher_is_better, spec.evaluate)
    return fidelity_metric(captured.gm, batches, spec.output_kind, spec.outputs)
