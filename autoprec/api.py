"""The library API: each stage of the pipeline as a plain function over plain data.

    spec = load_model_spec("models/digits_cnn.py")
    captured = capture(spec.model(), spec.example_inputs(), name=spec.name)
    prof = profile(captured, spec.calibration_data(), mode="fast")
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from autoprec.capture import Captured, capture
from autoprec.formats import DEFAULT_CANDIDATES, Precision
from autoprec.profile import Progress, profile
from autoprec.sensitivity import SensitivityProfile
from autoprec.spec import ModelSpec, load_model_spec

__all__ = ["capture", "profile", "load_model_spec", "profile_model"]


def profile_model(model: str | Path | ModelSpec, mode: str = "exact",
                  formats: Iterable[Precision] = DEFAULT_CANDIDATES, capture_method: str = "auto",
                  progress: Progress | None = None) -> tuple[SensitivityProfile, Captured]:
    """Load a model file, capture it and profile every layer: what ``autoprec profile`` does."""
    spec = model if isinstance(model, ModelSpec) else load_model_spec(model)
    captured = capture(spec.model(), spec.example_inputs(), name=spec.name, method=capture_method)
    prof = profile(captured, spec.calibration_data(), formats=formats, mode=mode,
                   output_kind=spec.output_kind, progress=progress)
    return prof, captured
