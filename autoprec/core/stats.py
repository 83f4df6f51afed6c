"""Profile statistics in numpy: output errors over batches, range statistics, and the readable flags a profile gets.

The torch profiler (:mod:`autoprec.torch.profile`) and the ONNX one (:mod:`autoprec.onnx.model`)
accumulate with these on numpy arrays (a torch tensor is handed over as ``tensor.numpy()``), so a
profile means the same from either frontend. Imports no torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from autoprec.core.formats import Precision
from autoprec.core.fp8 import fp8_scale
from autoprec.core.sensitivity import RangeStats, SensitivityProfile

FP16 = Precision.FP16
E4M3 = Precision.FP8_E4M3

Progress = Callable[[int, int, str], None]  # (done, total, what) -> None

#: the one-line error for a model whose fp32 output is already NaN or inf: no error can be measured against it
NOT_FINITE = ("the fp32 model's output is not finite (NaN or inf) on the calibration data: no error can be measured "
              "against it; fix the model or the data first")


def output_kind_of(y: Any, declared: str | None) -> str:
    """"logits" for classifier-like outputs ``y`` (an array or tensor whose last dim is > 1), else
    "values"; a model may declare it."""
    if declared is not None:
        return declared
    shape = tuple(y.shape)
    return "logits" if len(shape) >= 2 and shape[-1] > 1 else "values"


def measure_name(kind: str) -> str:
    return "kl" if kind == "logits" else "rel_mse"


def log_softmax(x: np.ndarray) -> np.ndarray:
    """log softmax over the last axis in float64."""
    x = np.asarray(x, dtype=np.float64)
    m = np.max(x, axis=-1, keepdims=True)
    z = x - m
    return z - np.log(np.sum(np.exp(z), axis=-1, keepdims=True))


@dataclass
class ErrorSum:
    """Accumulates an error over batches: KL summed over positions, or squared error and norm.

    ``reference(y)`` prepares an fp32 output once (its float64 log-probabilities for logits), so
    the many trials on one batch do not recompute it.
    """

    kind: str
    num: float = 0.0
    den: float = 0.0

    def reference(self, ref: np.ndarray) -> np.ndarray:
        # float64: the KL of fp16-sized perturbations (~1e-9) is below fp32's cancellation noise
        return log_softmax(ref) if self.kind == "logits" else np.asarray(ref)

    def add(self, ref: np.ndarray, new: np.ndarray, prepared: np.ndarray | None = None) -> None:
        if not math.isfinite(self.num):
            return
        new = np.asarray(new)
        if not bool(np.isfinite(new).all()):
            self.num = math.inf  # the reference is finite (checked once per profile): overflow
            return
        ref_p = self.reference(ref) if prepared is None else prepared
        if self.kind == "logits":
            kl = (np.exp(ref_p) * (ref_p - log_softmax(new))).sum(axis=-1)
            self.num += float(kl.sum(dtype=np.float64))
            self.den += kl.size
        else:  # squares in fp32, sums in float64
            d = new.astype(np.float32) - np.asarray(ref_p, dtype=np.float32)
            r = np.asarray(ref_p, dtype=np.float32)
            self.num += float((d * d).sum(dtype=np.float64))
            self.den += float((r * r).sum(dtype=np.float64))

    def value(self) -> float:
        if not math.isfinite(self.num) or math.isnan(self.num):
            return math.inf
        return max(0.0, self.num / self.den) if self.den > 0 else 0.0


@dataclass
class RangeAccumulator:
    """Range statistics of one tensor accumulated over batches."""

    amax: float = 0.0
    sumsq: float = 0.0
    count: int = 0
    over16: int = 0
    under16: int = 0
    values: list[np.ndarray] = field(default_factory=list)  # kept for fp8 stats at the final amax

    def add(self, x: np.ndarray) -> None:
        a = np.abs(np.asarray(x, dtype=np.float32))
        amax = float(a.max()) if a.size else 0.0
        if not math.isfinite(amax):  # rare: ignore non-finite values for the statistics
            a = np.where(np.isfinite(a), a, np.float32(0.0))
            amax = float(a.max())
        self.amax = max(self.amax, amax)
        self.sumsq += float(np.sum(np.square(a, dtype=np.float64)))
        self.count += a.size
        self.over16 += int(np.count_nonzero(a > FP16.max))
        # 0 < |x| < min normal, counted as (|x| < min normal) - (|x| == 0) without a third mask
        self.under16 += int(np.count_nonzero(a < FP16.min_normal)) - (a.size - int(np.count_nonzero(a)))
        self.values.append(a)

    def finish(self) -> RangeStats:
        scale = float(fp8_scale(self.amax, E4M3))
        # |x|/scale at or below half of E4M3's smallest subnormal (2^-9) rounds to zero (ties to even)
        flush_at = E4M3.min_subnormal / 2
        sat = flushed = nonzero = 0
        for a in self.values:
            s = a / np.float32(scale)
            sat += int(np.count_nonzero(s > E4M3.max))
            nz = int(np.count_nonzero(a))
            nonzero += nz
            flushed += int(np.count_nonzero(s <= flush_at)) - (a.size - nz)  # zeros are not flushed
        n = max(self.count, 1)
        self.values = []
        return RangeStats(
            amax=self.amax,
            rms=math.sqrt(self.sumsq / n),
            frac_over_fp16=self.over16 / n,
            frac_underflow_fp16=self.under16 / n,
            fp8_scale=scale,
            frac_fp8_saturated=sat / n,
            frac_fp8_flushed=flushed / max(nonzero, 1),
        )


def _fmt_num(x: float) -> str:
    return f"{x:.2g}" if (x != 0 and (abs(x) < 1e-2 or abs(x) >= 1e4)) else f"{x:.3g}"


def explain(prof: SensitivityProfile) -> dict[str, list[str]]:
    """Readable flags per layer: range hazards, and why the most sensitive layers are sensitive."""
    flags: dict[str, list[str]] = {}
    fmts = [f for f in prof.formats if f is not Precision.FP32]
    medians = {}
    for f in fmts:
        vals = sorted(e[f] for e in prof.errors.values() if f in e and math.isfinite(e[f]))
        medians[f] = vals[len(vals) // 2] if vals else 0.0
    last_layer = prof.layers()[-1] if prof.errors else None
    for name, errs in prof.errors.items():
        out: list[str] = []
        r = prof.ranges.get(name)
        tensors = []
        if r is not None:
            tensors = [("input" if len(r.inputs) == 1 else f"input {i}", s) for i, s in enumerate(r.inputs)]
            tensors.append(("output", r.output))
            if r.weight is not None:
                tensors.append(("weight", r.weight))
        for label, s in tensors:
            if s.frac_over_fp16 > 0:
                out.append(f"fp16 overflow: {label} amax {_fmt_num(s.amax)} > 65504 "
                           f"({100 * s.frac_over_fp16:.2g}% of values become inf)")
            if s.frac_underflow_fp16 > 0.01:
                out.append(f"fp16 underflow: {100 * s.frac_underflow_fp16:.2g}% of {label} values below 6.1e-05")
            if s.frac_fp8_flushed > 0.05:
                out.append(f"fp8 flushes {100 * s.frac_fp8_flushed:.2g}% of nonzero {label} values to zero "
                           f"at scale {_fmt_num(s.fp8_scale)} (amax/rms {_fmt_num(s.amax / max(s.rms, 1e-30))})")
        for f in (f for f in fmts if f in errs):
            e = errs[f]
            if not math.isfinite(e):
                out.append(f"{f} makes the output non-finite (overflow)")
            elif medians[f] > 0 and e >= 10 * medians[f] and e > 1e-6:
                why = _why_sensitive(prof, name, f, last_layer)
                out.append(f"most sensitive in {f}: error {_fmt_num(e)} is {e / medians[f]:.0f}x the median layer; {why}")
        if out:
            flags[name] = out
    return flags


def _why_sensitive(prof: SensitivityProfile, name: str, f: Precision, last_layer: str | None) -> str:
    """Split a large error into its two measured factors: how much the layer's own output moves,
    and how strongly the model output responds to that movement, each against the median layer."""
    reasons = []
    local = prof.local_errors.get(name, {}).get(f)
    if local is not None and local > 0:
        locs = sorted(e[f] for e in prof.local_errors.values() if e.get(f, 0) > 0)
        med_local = locs[len(locs) // 2]
        gains = sorted(prof.errors[n][f] / prof.local_errors[n][f] ** 2 for n in prof.local_errors
                       if prof.local_errors[n].get(f, 0) > 0 and math.isfinite(prof.errors[n][f]))
        med_gain = gains[len(gains) // 2] if gains else 0.0
        gain = prof.errors[name][f] / local ** 2
        reasons.append(f"{f} rounding moves its own output by {100 * local:.2g}% (median layer {100 * med_local:.2g}%)")
        if med_gain > 0:
            reasons.append(f"the model output is {gain / med_gain:.2g}x as sensitive to that change as for the median layer")
    r = prof.ranges.get(name)
    if r is not None:
        worst = max(r.inputs + (r.output,), key=lambda s: s.amax / max(s.rms, 1e-30))
        ratio = worst.amax / max(worst.rms, 1e-30)
        if ratio > 20:
            reasons.append(f"heavy-tailed activations (amax/rms {ratio:.0f}) leave few {f} levels for typical values")
    if name == last_layer:
        reasons.append("it writes the model output directly")
    if not reasons:
        reasons.append(f"{f} rounding of its tensors (eps {f.eps:.3g}) reaches the output undamped")
    return "; ".join(reasons)
