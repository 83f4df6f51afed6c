"""Range statistics (autoprec.core.stats.RangeAccumulator): every count is the one its definition
gives, element by element, although each is taken as one comparison against a precomputed threshold."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from autoprec.core.fp8 import fp8_scale
from autoprec.core.formats import Precision
from autoprec.core.stats import RangeAccumulator

E4M3, FP16 = Precision.FP8_E4M3, Precision.FP16


def _by_definition(batches: list[np.ndarray]) -> dict[str, float]:
    """The statistics written out as their definitions: each fp8 quotient |x| / scale computed."""
    a = np.abs(np.concatenate([b.ravel() for b in batches]).astype(np.float32))
    a = np.where(np.isfinite(a), a, np.float32(0))
    amax = float(a.max())
    scale = np.float32(fp8_scale(amax, E4M3))
    with np.errstate(divide="ignore", invalid="ignore"):
        q = a / scale
    nonzero = int(np.count_nonzero(a))
    return {
        "amax": amax,
        "rms": math.sqrt(float(np.sum(a.astype(np.float64) ** 2)) / a.size),
        "over16": int(np.count_nonzero(a > FP16.max)) / a.size,
        "under16": int(np.count_nonzero((a > 0) & (a < FP16.min_normal))) / a.size,
        "sat": int(np.count_nonzero(q > E4M3.max)) / a.size,
        "flushed": int(np.count_nonzero((a > 0) & (q <= E4M3.min_subnormal / 2))) / max(nonzero, 1),
    }


def _accumulated(batches: list[np.ndarray], final: bool) -> dict[str, float]:
    acc = RangeAccumulator()
    for b in batches:
        acc.add(b, final=final)
    r = acc.finish()
    return {"amax": r.amax, "rms": r.rms, "over16": r.frac_over_fp16, "under16": r.frac_underflow_fp16,
            "sat": r.frac_fp8_saturated, "flushed": r.frac_fp8_flushed}


def _check(batches: list[np.ndarray], final: bool = False) -> None:
    want, got = _by_definition(batches), _accumulated(batches, final)
    assert got["rms"] == pytest.approx(want["rms"], rel=1e-5, abs=1e-45)
    for key in ("amax", "over16", "under16", "sat", "flushed"):
        assert got[key] == want[key], key


@settings(max_examples=150, deadline=None)
@given(st.integers(0, 2**32 - 1), st.floats(-160, 130), st.integers(1, 3), st.booleans())
def test_counts_match_their_definitions(seed, log2_size, n_batches, zeros):
    """Values spread over 40 binades around 2^log2_size (from subnormal to near fp32's max), split
    into batches: the fp8 quotients that land on either threshold's rounding edge are counted as
    the elementwise definition counts them."""
    rng = np.random.default_rng(seed)
    batches = []
    for _ in range(n_batches):
        x = (rng.choice([-1.0, 1.0], 500) * np.exp2(rng.uniform(log2_size - 20, log2_size + 20, 500)))
        x = np.clip(x, -3.4e38, 3.4e38).astype(np.float32)
        if zeros:
            x[rng.integers(0, 500, 40)] = 0.0
        batches.append(x)
    _check(batches)


def test_values_on_the_threshold_edges_count_as_their_quotients_round():
    """Every float32 within a few ulps of amax and of the flush threshold: the quotient of the
    largest value rounds to 448 or just above it, and half the smallest subnormal's neighbours
    round either side."""
    amax = np.float32(1000.0)
    scale = np.float32(fp8_scale(float(amax), E4M3))
    edge = np.float32(E4M3.min_subnormal / 2) * scale
    up, down = np.float32(np.inf), np.float32(0)
    near = [np.nextafter(amax, down), np.nextafter(amax, up), np.nextafter(edge, down), np.nextafter(edge, up)]
    x = np.array([amax, edge, *near, 0.0, 1e-30, 7e4], dtype=np.float32)
    walk = [edge]
    for _ in range(6):
        walk += [np.nextafter(walk[-1], up)]
    _check([x, np.array(walk, dtype=np.float32)])
    _check([np.array([amax, *walk], dtype=np.float32)], final=True)


def test_non_finite_and_degenerate_tensors():
    _check([np.array([1.0, np.inf, -np.nan, 3e38, 0.0], dtype=np.float32)])
    _check([np.zeros(10, dtype=np.float32)])
    _check([np.array([1e-45, 0.0, 1e-45], dtype=np.float32)])  # a scale that underflows to 0
