"""Sensitivity profiling: exact trials against full re-runs, fast against exact, flags, JSON."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
from scipy.stats import spearmanr

from autoprec.torch.capture import capture
from autoprec.core.formats import Precision
from autoprec.torch.profile import GraphRunner, output_tensors, profile
from autoprec.torch.semantics import LayerFormat, emulate_layer
from autoprec.core.sensitivity import SensitivityProfile

BF16, FP16, E4M3 = Precision.BF16, Precision.FP16, Precision.FP8_E4M3


def _batches(shape: tuple[int, ...], n: int = 3, scale: float = 1.0, seed: int = 0) -> list[tuple[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(shape, generator=g) * scale,) for _ in range(n)]


def test_downstream_rerun_equals_full_emulated_run(tiny_attention: nn.Module) -> None:
    """The exact mode's shortcut must give the same output as running the whole graph."""
    c = capture(tiny_attention, (torch.randn(2, 8, 32),))
    runner = GraphRunner(c.gm)
    (x,) = _batches((4, 8, 32), n=1)[0]
    for name in ("q", "matmul", "fc1"):
        node = c.node(name)
        node.meta["autoprec_layer"] = True
        kind = c.graph[name].kind
        env = runner.run((x,))
        args = torch.fx.node.map_arg(node.args, lambda a: env[a.name])
        val = emulate_layer(kind, args, {}, LayerFormat(E4M3))
        short, _ = runner.rerun(env, name, val)

        def hook(n, a, k):
            return emulate_layer(kind, a, k, LayerFormat(E4M3 if n.name == name else Precision.FP32))

        full = runner.run((x,), hook)[runner.nodes[-1].name]
        assert all(torch.equal(a, b) for a, b in zip(output_tensors(short), output_tensors(full), strict=True))
        node.meta.pop("autoprec_layer")


def test_exact_profile_orders_formats_and_round_trips(tiny_attention: nn.Module) -> None:
    c = capture(tiny_attention, (torch.randn(2, 8, 32),), name="tiny")
    prof = profile(c, _batches((8, 8, 32)), mode="exact")
    assert prof.measure == "kl" and prof.samples == 24 and set(prof.errors) == set(c.graph.layer_names())
    for name, errs in prof.errors.items():
        assert 0 <= errs[FP16] < errs[BF16] < errs[E4M3], name
        assert prof.local_errors[name][FP16] < prof.local_errors[name][E4M3]
    assert 0 < prof.rerun_fraction < 1
    back = SensitivityProfile.from_json(prof.to_json())
    assert back.to_json() == prof.to_json()
    assert back.error("q", Precision.FP32) == 0.0


def test_fast_mode_ranks_like_exact(tiny_attention: nn.Module) -> None:
    c = capture(tiny_attention, (torch.randn(2, 8, 32),))
    batches = _batches((16, 8, 32), n=4, scale=2.0)
    ex = profile(c, batches, mode="exact")
    fa = profile(c, batches, mode="fast")
    a = [ex.errors[n][f] for n in ex.errors for f in ex.formats]
    b = [fa.errors[n][f] for n in ex.errors for f in ex.formats]
    assert spearmanr(a, b).statistic >= 0.9
    # first-order estimates land within a factor of 3 of the measured error for most trials
    close = sum(1 for u, v in zip(a, b) if u > 0 and 1 / 3 <= v / u <= 3)
    assert close >= 0.8 * len(a)


def test_fast_mode_values_output_uses_rel_mse(tiny_cnn: nn.Module) -> None:
    c = capture(tiny_cnn, (torch.randn(2, 1, 8, 8),))
    batches = _batches((16, 1, 8, 8))
    ex = profile(c, batches, mode="exact", output_kind="values")
    fa = profile(c, batches, mode="fast", output_kind="values")
    assert ex.measure == fa.measure == "rel_mse"
    for n in ex.errors:
        assert 0.2 <= fa.errors[n][E4M3] / ex.errors[n][E4M3] <= 5


def test_fp16_overflow_is_infinite_error_and_explained() -> None:
    class Big(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(8, 8)
            self.b = nn.Linear(8, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(torch.relu(self.a(x)) * 1e-3)

    torch.manual_seed(0)
    m = Big().eval()
    with torch.no_grad():
        m.a.weight.mul_(3e4)  # activations around 1e5: beyond fp16's 65504
    c = capture(m, (torch.randn(2, 8),))
    for mode in ("exact", "fast"):
        prof = profile(c, _batches((32, 8), scale=1e4), mode=mode)
        assert math.isinf(prof.errors["a"][FP16]), mode
        assert math.isfinite(prof.errors["a"][BF16]), mode
        assert prof.ranges["a"].output.frac_over_fp16 > 0
        text = " ".join(prof.flags["a"])
        assert "fp16 overflow: output amax" in text and "fp16 makes the output non-finite" in text


def test_fp8_flush_statistics() -> None:
    class Tiny(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.l = nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.l(x)

    c = capture(Tiny(), (torch.randn(2, 4),))
    x = torch.full((64, 4), 1e-5)
    x[0, 0] = 448.0  # one outlier sets the scale to 1: every 1e-5 flushes to zero in E4M3
    prof = profile(c, [(x,)], mode="exact", output_kind="values")
    s = prof.ranges["l"].inputs[0]
    assert s.amax == 448.0 and s.fp8_scale == 1.0
    assert abs(s.frac_fp8_flushed - 255 / 256) < 1e-9
    assert s.frac_fp8_saturated == 0.0
    assert any("fp8 flushes" in f for f in prof.flags["l"])


def test_profile_error_is_the_error_of_the_applied_single_layer_plan(tiny_attention: nn.Module) -> None:
    """Oracle: exact mode's number for (L, P) is the output error of apply_plan({L: P}), to the bit."""
    from autoprec.core.stats import ErrorSum
    from autoprec.torch.passes import act_amax_from_profile, apply_plan

    c = capture(tiny_attention, (torch.randn(2, 8, 32),))
    batches = _batches((4, 8, 32), n=2)
    prof = profile(c, batches, mode="exact")
    amax = act_amax_from_profile(prof)
    for layer in ("q", "matmul", "fc1", "head"):
        for fmt in (BF16, E4M3):
            gm = apply_plan(c, {layer: fmt}, amax)
            acc = ErrorSum("logits")
            with torch.no_grad():
                for (x,) in batches:
                    acc.add(c.gm(x), gm(x))
            assert acc.value() == prof.errors[layer][fmt], (layer, fmt)


def test_embedding_profile_oracle_and_fp8(tiny_lm: nn.Module, token_batches) -> None:
    """Oracle for lookups: the exact error of (embedding, P) is apply_plan({embedding: P})'s error to
    the bit, fp8 (per-row scales) included. No activation input to take ranges of."""
    from autoprec.core.stats import ErrorSum
    from autoprec.torch.passes import apply_plan

    c = capture(tiny_lm, token_batches[0])
    exact = profile(c, token_batches, mode="exact")
    fast = profile(c, token_batches, mode="fast")
    for layer in ("tok", "pos"):
        for prof in (exact, fast):
            assert set(prof.errors[layer]) == {BF16, FP16, E4M3}, prof.mode
            r = prof.ranges[layer]
            assert r.inputs == () and r.weight is not None and r.output.amax == r.weight.amax
            errs = prof.errors[layer]
            assert 0 < errs[FP16] < errs[BF16] < errs[E4M3] < math.inf, prof.mode
        for fmt in (BF16, FP16, E4M3):  # an fp8 table needs no calibrated amax
            gm = apply_plan(c, {layer: fmt})
            acc = ErrorSum("logits")
            with torch.no_grad():
                for (x,) in token_batches:
                    acc.add(c.gm(x), gm(x))
            assert acc.value() == exact.errors[layer][fmt], (layer, fmt)
    assert E4M3 in exact.errors["fc"] and set(exact.errors) == set(c.graph.layer_names())


def test_fast_mode_counts_a_tables_rounding_once(tiny_lm: nn.Module) -> None:
    """A lookup's output is rows of its table: fast mode measures the table's rounding at the output
    only (in fp8 the rows rounded with their own per-row scales, then to bf16). Counting it again as
    a weight term would double the estimate; rounding the rows to bf16 only would miss the fp8 error."""
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randint(0, 20, (16, 6), generator=g),) for _ in range(8)]
    c = capture(tiny_lm, batches[0])
    exact = profile(c, batches, mode="exact", formats=(BF16, FP16, E4M3))
    fast = profile(c, batches, mode="fast", formats=(BF16, FP16, E4M3))
    for fmt in (BF16, FP16, E4M3):
        assert 0.7 <= fast.errors["tok"][fmt] / exact.errors["tok"][fmt] <= 1.4, fmt


def test_the_fast_profile_is_put_on_the_exact_profile_s_scale() -> None:
    """digits_resnet's fast estimates were 5,400x smaller than its exact errors: calibrated on exact
    trials of its three most sensitive fp8 layers, each format's total (the error of a uniform plan)
    and the trial layers themselves are within 2x of the exact profile, the ranking unchanged."""
    from pathlib import Path

    from autoprec.torch.profile import CALIBRATION_TRIALS
    from autoprec.torch.spec import load_model_spec

    spec = load_model_spec(Path(__file__).resolve().parents[2] / "models" / "digits_resnet.py")
    c = capture(spec.model(), spec.example_inputs(), name=spec.name)
    batches = spec.calibration_data()
    ex = profile(c, batches, mode="exact", output_kind=spec.output_kind)
    fa = profile(c, batches, mode="fast", output_kind=spec.output_kind)
    cal = fa.calibration
    assert cal["scale"] > 100 and len(cal["trials"]) == CALIBRATION_TRIALS
    fp8 = [t for t in cal["trials"] if t["format"] == "fp8_e4m3"]
    assert len(fp8) == CALIBRATION_TRIALS
    for t in fp8:  # the trials are exact runs: the exact profile's numbers
        assert math.isclose(t["exact"], ex.errors[t["layer"]][E4M3], rel_tol=1e-9)
        assert 0.5 <= fa.errors[t["layer"]][E4M3] / t["exact"] <= 2
    for f in fa.formats:
        total_fast = sum(fa.errors[n][f] for n in fa.errors)
        total_exact = sum(ex.errors[n][f] for n in ex.errors)
        assert 0.5 <= total_fast / total_exact <= 2, f
    assert SensitivityProfile.from_json(fa.to_json()).calibration == cal
    assert ex.calibration == {}
