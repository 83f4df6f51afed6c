"""Helpers for the rewrite-pass tests: two independent ways of computing what a plan means.

``reference_run`` interprets the captured graph node by node with the plan's semantics written out
directly (layers through semantics.emulate_layer; FOLLOW ops in a 16-bit format compute in fp32 on
inputs rounded to that format and round their result). ``profiler_trial`` is the exact profiler's
single-layer trial (GraphRunner + emulate_layer, downstream re-run with the FOLLOW results the plan
runs in 16-bit rounded).
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, Mapping

import pytest
import torch
import torch.fx as fx
import torch.nn as nn

from autoprec.torch.capture import Captured, capture
from autoprec.core.formats import Precision
from autoprec.core.opgraph import Policy
from autoprec.torch.profile import GraphRunner, profile
from autoprec.torch.quantize import quantize
from autoprec.torch.semantics import LayerFormat, emulate_layer
from autoprec.torch.passes import act_amax_from_profile
from autoprec.core.lowering import single_layer_roundings
from autoprec.torch.passes.assign_formats import decide_formats, policy

FP32 = Precision.FP32


def _round_tree(x: Any, fmt: Precision) -> Any:
    if isinstance(x, (tuple, list)):
        return type(x)(_round_tree(e, fmt) for e in x)
    if torch.is_tensor(x) and x.is_floating_point():
        return quantize(x, fmt)
    return x


def reference_run(c: Captured, assignment: Mapping[str, Precision], amax: Mapping[str, tuple[float, ...]],
                  inputs: tuple[Any, ...], round_follow: bool = True) -> Any:
    """The plan's result (structured as the module returns it) computed straight from its definition (``round_follow=False``: FOLLOW ops
    in fp32 on whatever they read, i.e. only the layers rounded)."""
    formats = decide_formats(c.gm, c.graph, assignment)
    runner = GraphRunner(c.gm)
    env: dict[str, Any] = {}
    placeholders = iter(inputs)
    with torch.no_grad():
        for n in runner.nodes:
            if n.op == "placeholder":
                env[n.name] = next(placeholders)
                continue
            fmt = formats[n.name].compute
            pol = policy(c.graph, n)
            if pol is Policy.ALWAYS and fmt is not FP32:
                args = fx.node.map_arg(n.args, lambda a: env[a.name])
                kwargs = fx.node.map_arg(n.kwargs, lambda a: env[a.name])
                env[n.name] = emulate_layer(n.meta["autoprec_kind"], args, kwargs,
                                            LayerFormat(fmt, tuple(amax.get(n.name, ()))))
            elif pol is Policy.FOLLOW and fmt is not FP32 and round_follow:
                v = runner.value_of(n, env, lambda a: _round_tree(env[a.name], fmt))
                env[n.name] = _round_tree(v, fmt)
            else:
                env[n.name] = runner.value_of(n, env, lambda a: env[a.name])
    return runner.model_output(env[runner.nodes[-1].name])


def profiler_trial(c: Captured, layer: str, fmt: Precision, amax: tuple[float, ...],
                   inputs: tuple[Any, ...]) -> Any:
    """The result (structured as the module returns it) of what profile(mode="exact") computes for the trial (layer, fmt) on one batch, through the
    profiler's own GraphRunner.rerun (downstream re-run, FOLLOW results rounded as the plan does)."""
    runner = GraphRunner(c.gm)
    with torch.no_grad():
        env = runner.run(inputs)
        node = c.node(layer)
        args = fx.node.map_arg(node.args, lambda a: env[a.name])
        kwargs = fx.node.map_arg(node.kwargs, lambda a: env[a.name])
        val = emulate_layer(node.meta["autoprec_kind"], args, kwargs, LayerFormat(fmt, amax))
        out, _ = runner.rerun(env, layer, val, single_layer_roundings(c.graph, [layer], [fmt])[(layer, fmt)])
        return runner.model_output(out)


class SplitAdd(nn.Module):
    """A layer whose output is split (a tuple-returning FOLLOW op) and added back together."""

    def __init__(self) -> None:
        super().__init__()
        self.l1 = nn.Linear(16, 32)
        self.l2 = nn.Linear(16, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.l1(x).chunk(2, dim=-1)
        return self.l2(a + b)


Case = tuple[Captured, dict[str, tuple[float, ...]]]


@pytest.fixture
def attn_case(tiny_attention: nn.Module) -> Case:
    """TinyAttention captured, with activation amax calibrated on three batches."""
    c = capture(tiny_attention, (torch.randn(2, 8, 32),), name="tiny_attention")
    return c, _calibrate(c, (8, 8, 32))


@pytest.fixture
def cnn_case(tiny_cnn: nn.Module) -> Case:
    c = capture(tiny_cnn, (torch.randn(2, 1, 8, 8),), name="tiny_cnn")
    return c, _calibrate(c, (8, 1, 8, 8))


@pytest.fixture
def split_case() -> Case:
    torch.manual_seed(0)
    c = capture(SplitAdd().eval(), (torch.randn(4, 16),), name="split_add")
    return c, _calibrate(c, (8, 16))


def _calibrate(c: Captured, shape: tuple[int, ...]) -> dict[str, tuple[float, ...]]:
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(shape, generator=g),) for _ in range(3)]
    prof = profile(c, batches, formats=(Precision.FP8_E4M3,), mode="fast")
    return act_amax_from_profile(prof)


def seeded(shape: tuple[int, ...], seed: int = 123) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def oracles() -> SimpleNamespace:
    """The helpers of this file, for test modules (which cannot import a conftest by name)."""
    return SimpleNamespace(reference=reference_run, trial=profiler_trial, randn=seeded)
