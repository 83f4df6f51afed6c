"""autoprec.api.tune on a live module, as a notebook user holding a Hugging Face model calls it:
no model file, a DataLoader of calibration batches and an evaluate callable."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from autoprec.api import tune
from autoprec.core.errors import UsageError

pytest.importorskip("transformers")


def _bert() -> torch.nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    class Logits(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.m = BertForSequenceClassification(BertConfig(
                vocab_size=128, hidden_size=64, num_hidden_layers=1, num_attention_heads=2, intermediate_size=128,
                max_position_embeddings=32, num_labels=3))

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.m(input_ids=ids).logits

    return Logits().eval()


def test_tune_a_live_module_with_a_dataloader_and_an_evaluate_callable() -> None:
    model = _bert()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 128, (24, 16), generator=g)
    loader = DataLoader(TensorDataset(ids), batch_size=8)  # yields [tensor] per batch
    held_out = torch.randint(0, 128, (16, 16), generator=g)
    with torch.no_grad():
        labels = model(held_out).argmax(-1)
    calls = []

    def evaluate(module: torch.nn.Module) -> float:
        calls.append(type(module).__name__)
        module.eval()
        with torch.no_grad():
            return float((module(held_out.to(next(module.parameters()).device)).argmax(-1) == labels).float().mean())

    result = tune(model, "5%", example_inputs=(ids[:2],), calibration=loader, evaluate=evaluate,
                  metric_name="agreement", formats=["bf16"], onnx_check=False, timing=False)
    assert result.plan.measured["metric"] == "agreement"
    assert result.plan.measured["drop"] <= result.plan.measured["allowed_drop"]
    assert {d.kind for d in result.plan.decisions} >= {"linear", "matmul", "embedding"}
    assert len(calls) >= 2  # fp32 and at least one plan


def test_a_live_module_without_calibration_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match="example_inputs=.*calibration="):
        tune(torch.nn.Linear(2, 2), fidelity_budget="1%")
