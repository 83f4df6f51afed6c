"""A transformer is priced block by block: every block adds the same cost in a uniform plan, so the
estimated speedup does not collapse with depth (it did when a residual stream's casts were counted
once per upstream layer)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from autoprec.core.formats import Precision
from autoprec.cost.roofline import RooflineCostModel
from autoprec.torch.capture import capture
from autoprec.torch.spec import load_model_spec

MODELS_DIR = Path(__file__).resolve().parents[2] / "models"


def _costs(n_layers: int) -> tuple[float, float]:
    zoo = load_model_spec(MODELS_DIR / "char_transformer.py").module
    torch.manual_seed(0)
    net = zoo.CharTransformer(n_layers=n_layers).eval()
    c = capture(net, (torch.zeros(2, 16, dtype=torch.long),), name=f"lm{n_layers}")
    g = c.graph.at_batch(1024)
    cm = RooflineCostModel("h100")
    bf16 = {n: Precision.BF16 for n in g.layer_names()}
    return cm.plan_cost(g, {}), cm.plan_cost(g, bf16)


def test_uniform_bf16_costs_the_same_per_block_at_any_depth():
    (f2, b2), (f3, b3), (f17, b17) = _costs(2), _costs(3), _costs(17)
    per_block_fp32, per_block_bf16 = f3 - f2, b3 - b2
    assert f17 - f2 == pytest.approx(15 * per_block_fp32, rel=1e-9)
    assert b17 - b2 == pytest.approx(15 * per_block_bf16, rel=1e-9)
    assert per_block_bf16 < per_block_fp32  # each block gains in bf16: deeper models gain more
    assert f17 / b17 >= f2 / b2
