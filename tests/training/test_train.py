"""Training with a plan: loss scaling against fp16 underflow, promotion on overflow, the tuned
digits_cnn plan from scratch, a user's own loop, and the output folder."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from autoprec import api
from autoprec.core.errors import UsageError
from autoprec.core.formats import Precision
from autoprec.core.plan import PrecisionPlan
from autoprec.training import PromotionPolicy, plan_module, train

ROOT = Path(__file__).resolve().parents[2]
DIGITS = ROOT / "models" / "digits_cnn.py"


def _regression(n_batches: int, scale: float, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(8, 1, generator=gen)
    out = []
    for _ in range(n_batches):
        x = torch.randn(32, 8, generator=gen)
        out.append((x, (x @ w) * scale))
    return out


class _Mlp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 32)
        self.fc2 = nn.Linear(32, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


def _tiny_loss(model: nn.Module, batch) -> torch.Tensor:
    """A loss in tiny units (2^-26 of the mean squared error): its gradients are below fp16's
    smallest subnormal (6e-8) unless scaled."""
    x, y = batch
    return torch.mean((model(x) - y) ** 2) * 2.0 ** -26


def _mse(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return torch.mean((model(x) - y) ** 2)


def _run(module: nn.Module, data, loss, fmt: str, **kw):
    torch.manual_seed(0)
    return train(module, {"fc1": fmt, "fc2": fmt}, data=data, loss=loss, example_inputs=data[0][0],
                 epochs=kw.pop("epochs", 4), **kw)


def test_fp16_without_loss_scaling_underflows_and_stalls_with_scaling_it_trains() -> None:
    data = _regression(10, 1.0)
    torch.manual_seed(0)
    runs = {}
    for fmt, scaling in (("fp32", "off"), ("fp16", "off"), ("fp16", "on")):
        torch.manual_seed(0)
        result = _run(_Mlp(), data, _tiny_loss, fmt, loss_scaling=scaling, promotion=None, lr=0.05, epochs=6)
        losses = [r["loss"] for r in result.rows]
        runs[fmt, scaling] = (sum(losses[:10]) / 10, sum(losses[-10:]) / 10, result)
    first, last, unscaled = runs["fp16", "off"]
    # without scaling every gradient rounds to zero and the loss does not move at all
    assert last == first
    assert all(r["loss_scale"] == 1.0 for r in unscaled.rows)
    # with torch's GradScaler the same steps train as fp32 does (70x lower loss)
    first32, last32, _ = runs["fp32", "off"]
    first_s, last_s, scaled = runs["fp16", "on"]
    assert last32 < first32 / 50
    assert last_s == pytest.approx(last32, rel=0.02)
    assert scaled.rows[0]["loss_scale"] == 65536.0


def test_fp16_underflow_is_counted_per_layer(tmp_path: Path) -> None:
    data = _regression(4, 1.0)
    torch.manual_seed(0)
    _run(_Mlp(), data, _tiny_loss, "fp16", loss_scaling="off", promotion=None, epochs=1, out=tmp_path,
         monitor_every=1)
    rows = list(csv.DictReader(open(tmp_path / "numerics.csv")))
    fc2 = [r for r in rows if r["site"] == "fc2"]
    assert len(fc2) == 4
    # fc2's output gradient (2^-26 scale) flushes to zero: every non-zero gradient value is lost, and
    # nothing reaches fc1
    assert all(float(r["bwd_underflow"]) == float(r["bwd_nonzero"]) == 32 for r in fc2)
    assert all(float(r["bwd_nonzero"]) == 0 for r in rows if r["site"] == "fc1")
    assert all(float(r["fwd_overflow"]) == 0 for r in rows)


def test_the_monitor_counts_one_step_in_monitor_every_and_promotes_on_those(tmp_path: Path) -> None:
    # every step of this run loses fc2's whole gradient to fp16 underflow; counting one step in 3
    # sees steps 1, 4, 7, 10, and the third bad counted step (step 7) promotes fc2
    data = _regression(10, 1.0)
    result = _run(_Mlp(), data, _tiny_loss, "fp16", loss_scaling="off", promotion=PromotionPolicy(0.5, 3),
                  epochs=1, out=tmp_path, monitor_every=3)
    counted = sorted({int(r["step"]) for r in csv.DictReader(open(tmp_path / "numerics.csv"))})
    assert counted == [1, 4, 7, 10]
    assert [(p.layer, p.step) for p in result.promotions] == [("fc2", 7)]
    assert "3 consecutive monitored steps (one in 3)" in result.promotions[0].reason
    with pytest.raises(UsageError, match="monitor-every"):
        _run(_Mlp(), data, _tiny_loss, "fp16", monitor_every=0)


def test_fp16_overflow_mid_training_promotes_the_layer_and_the_run_finishes(tmp_path: Path) -> None:
    # targets of 1e5 lie beyond fp16's 65504: the output layer overflows once it learns them
    data = _regression(8, 1.0)
    data = [(x, torch.full_like(y, 1e5)) for x, y in data]

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1 = nn.Linear(8, 8)
            self.fc2 = nn.Linear(8, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc2(self.fc1(x))

    torch.manual_seed(0)
    result = train(Net(), {"fc1": "bf16", "fc2": "fp16"}, data=data, loss=_mse, example_inputs=data[0][0],
                   epochs=40, out=tmp_path, promotion=PromotionPolicy(0.01, 3), lr=300.0)
    assert [(p.layer, p.src, p.dst) for p in result.promotions] == [("fc2", Precision.FP16, Precision.BF16)]
    promo = result.promotions[0]
    assert 1 < promo.step < 320
    assert "overflowed" in promo.reason
    plan = PrecisionPlan.load(tmp_path / "plan.json")
    assert plan.assignment["fc2"] is Precision.BF16
    assert plan.promotions[0].step == promo.step and plan.promotions[0].reason == promo.reason
    assert f"at step {promo.step}" in plan.decision("fc2").reason
    assert len(result.rows) == 320  # the run went on to its last step
    assert result.rows[-1]["loss"] < 1e8  # and kept training in bf16
    steps = list(csv.DictReader(open(tmp_path / "train.csv")))
    assert steps[promo.step - 1]["promotions"] == "fc2:fp16->bf16"


def test_digits_cnn_from_scratch_under_its_tuned_plan_matches_fp32_within_budget() -> None:
    tuned = api.tune(str(DIGITS), "0.5%")
    assert any(f is not Precision.FP32 for f in tuned.plan.assignment.values())
    fp32 = train(str(DIGITS), formats="fp32", epochs=10)
    planned = train(str(DIGITS), tuned.plan, epochs=10)
    assert len(fp32.rows) == len(planned.rows) == 450
    assert planned.metric >= fp32.metric * (1 - 0.005), (planned.metric, fp32.metric)
    assert planned.metric > 0.9


def test_the_tuned_module_drops_into_a_users_own_loop() -> None:
    """The documented pattern (README "Training with the plan"): wrap, then train as usual."""
    data = _regression(6, 1.0)
    torch.manual_seed(0)
    net = _Mlp()
    before = net.fc1.weight.detach().clone()
    module = plan_module(net, {"fc1": "bf16", "fc2": "fp16"}, example_inputs=data[0][0])
    opt = torch.optim.SGD(net.parameters(), lr=0.05)  # the user's own parameters
    scaler = torch.amp.GradScaler("cpu")
    losses, counted = [], []
    for _ in range(3):
        for batch in data:
            loss = _mse(module, batch)
            opt.zero_grad()
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            stats = module.end_step()
            losses.append(float(loss.detach()))
            counted.append(set(stats))
    # the monitor counted steps 1 and 11 of the 18 (one in MONITOR_EVERY = 10)
    assert [i + 1 for i, sites in enumerate(counted) if sites] == [1, 11]
    assert all(counted[i] >= {"fc1", "fc2"} for i in (0, 10))
    assert losses[-1] < 0.5 * losses[0]
    # the user's model trained in place, and the module reads its parameters
    assert module.graph_module.fc1.weight is net.fc1.weight
    assert not torch.equal(net.fc1.weight, before)


def test_train_errors_are_one_line(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="not both"):
        train(str(DIGITS), {"conv1": "bf16"}, formats="fp16", epochs=1)
    with pytest.raises(UsageError, match="not both and not neither"):
        train(str(DIGITS), epochs=1)
    with pytest.raises(UsageError, match="nothing to resume"):
        train(str(DIGITS), formats="bf16", epochs=1, out=tmp_path / "none", resume=True)
    with pytest.raises(Exception, match="does not have|layer"):
        train(str(DIGITS), {"nope": "bf16"}, epochs=1)
    with pytest.raises(UsageError, match="epochs"):
        train(str(DIGITS), formats="bf16", epochs=0)


def test_plan_json_round_trips_promotions(tmp_path: Path) -> None:
    data = _regression(2, 1.0)
    torch.manual_seed(0)
    result = _run(_Mlp(), data, _mse, "bf16", epochs=1, out=tmp_path)
    d = json.loads((tmp_path / "plan.json").read_text())
    assert d["promotions"] == [] and {x["format"] for x in d["decisions"]} == {"bf16"}
    assert PrecisionPlan.load(tmp_path / "plan.json").assignment == result.plan.assignment
    assert (tmp_path / "weights.pt").is_file() and (tmp_path / "training.png").is_file()
    assert set(torch.load(tmp_path / "weights.pt")) == {"fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"}


def test_native_training_follows_the_emulated_run(tmp_path: Path) -> None:
    """Real bf16/fp16 tensors on the CPU (torch's own kernels and gradient dtypes) against the
    emulation: the same losses within 1e-3 and the same gradient overflows counted; an fp8 layer
    keeps the emulated recipe and writes a real bf16 tensor."""
    data = _regression(10, 1.0)
    runs = {}
    for mode in ("emulate", "native"):
        torch.manual_seed(0)
        runs[mode] = train(_Mlp(), {"fc1": "bf16", "fc2": "fp16"}, data=data, loss=_mse, example_inputs=data[0][0],
                           epochs=3, lr=0.05, mode=mode, out=tmp_path / mode)
    a, b = ([r["loss"] for r in runs[m].rows] for m in ("emulate", "native"))
    assert all(abs(x - y) <= 1e-3 * abs(x) for x, y in zip(a, b))
    assert runs["emulate"].skipped_steps == runs["native"].skipped_steps
    counts = {m: [r for r in csv.DictReader(open(tmp_path / m / "numerics.csv")) if r["site"] == "fc2"][0]
              for m in runs}
    assert counts["emulate"]["bwd_overflow"] == counts["native"]["bwd_overflow"] != "0"
    torch.manual_seed(0)
    fp8 = train(_Mlp(), {"fc1": "fp8_e4m3", "fc2": "bf16"}, data=data, loss=_mse, example_inputs=data[0][0],
                epochs=1, lr=0.05, mode="native")
    assert fp8.module.graph_module(data[0][0]).dtype == torch.float32  # the graph output is fp32
    assert fp8.rows[-1]["loss"] < fp8.rows[0]["loss"]
