"""Shared, session-scoped ONNX exports for the deployment tests (exporting is the slow part)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import onnx
import pytest
import torch
from deploy_models import ROOT, ExactCNN, ExactEmbed, ExactNet, integer_input

from autoprec.torch.capture import Captured, capture
from autoprec.deploy.export import torch_to_onnx
from autoprec.core.formats import Precision
from autoprec.torch.profile import profile
from autoprec.torch.spec import ModelSpec, load_model_spec
from autoprec.torch.passes import act_amax_from_profile


@dataclass
class Case:
    """A captured model, its fp32 ONNX export, inputs and fp8 calibration."""

    name: str
    module: torch.nn.Module
    captured: Captured
    fp32: onnx.ModelProto
    inputs: tuple[Any, ...]
    amax: dict[str, tuple[float, ...]]
    spec: ModelSpec | None = None

    @property
    def layers(self) -> list[str]:
        return self.captured.graph.layer_names()

    def uniform(self, fmt: Precision) -> dict[str, Precision]:
        """Every layer (embedding tables included) in ``fmt``."""
        return {name: fmt for name in self.layers}


def _exact_case(name: str, module: torch.nn.Module, x: torch.Tensor) -> Case:
    c = capture(module, (x,), name=name)
    # amax = 448 * 4: the static fp8 scale is 4, a power of two, so fp8 arithmetic stays exact
    amax = {n: (1792.0, 1792.0) for n in c.graph.layer_names()}
    return Case(name, module, c, torch_to_onnx(module, (x,)), (x,), amax)


@pytest.fixture(scope="session")
def exact_net() -> Case:
    return _exact_case("exact_net", ExactNet().eval(), integer_input((6, 4, 16)))


@pytest.fixture(scope="session")
def exact_cnn() -> Case:
    return _exact_case("exact_cnn", ExactCNN().eval(), integer_input((6, 2, 8, 8), high=7))


@pytest.fixture(scope="session")
def exact_embed() -> Case:
    # 4 tokens of a context of 6: the position lookup reads a slice of its buffer
    idx = torch.randint(0, 12, (6, 4), generator=torch.Generator().manual_seed(0))
    return _exact_case("exact_embed", ExactEmbed().eval(), idx)


_ZOO: dict[str, Case] = {}


@pytest.fixture(scope="session")
def zoo() -> Callable[[str], Case]:
    """zoo("digits_cnn") -> the bundled model captured, exported and calibrated (cached)."""

    def get(name: str) -> Case:
        if name not in _ZOO:
            spec = load_model_spec(ROOT / "models" / f"{name}.py")
            module = spec.model()
            example = spec.example_inputs()
            c = capture(module, example, name=spec.name)
            batches = spec.calibration_data()
            prof = profile(c, batches[:2], formats=(Precision.FP8_E4M3,), mode="fast", output_kind=spec.output_kind)
            _ZOO[name] = Case(name, module, c, torch_to_onnx(module, example), example,
                              act_amax_from_profile(prof), spec)
        return _ZOO[name]

    return get
