"""Profile statistics in numpy: the model's outputs, output errors over batches, range statistics, and the readable flags a profile gets.

The torch profiler (:mod:`autoprec.torch.profile`) and the ONNX one (:mod:`autoprec.onnx.model`)
accumulate with these on numpy arrays (a torch tensor is handed over as ``tensor.numpy()``), so a
profile means the same from either frontend. Imports no torch.

The model's outputs are every floating tensor leaf of what it returns (a tensor, or tuples, lists
and dicts of them, nested), in pytree order, each named by its path: "0", "1", "logits", "aux.0"
(a bare tensor is "0", as the first of a tuple is). :class:`Outputs` is which of them count (a
model file's ``OUTPUTS``; all by default) and the error measure of each; a frontend lists the
names and shapes and picks the tensors by position.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence, TypeVar

import numpy as np

from autoprec.core.errors import ModelSpecError, UsageError
from autoprec.core.formats import Precision
from autoprec.core.fp8 import fp8_scale
from autoprec.core.sensitivity import RangeStats, SensitivityProfile

FP16 = Precision.FP16
E4M3 = Precision.FP8_E4M3

Progress = Callable[[int, int, str], None]  # (done, total, what) -> None

#: the one-line error for a model whose fp32 output is already NaN or inf: no error can be measured against it
NOT_FINITE = ("the fp32 model's output is not finite (NaN or inf) on the calibration data: no error can be measured "
              "against it; fix the model or the data first")


#: the error measures of an output: "logits" (classifier-like: KL per position, top-1 agreement) or
#: "values" (regression-like: relative squared / L2 error)
OUTPUT_KINDS = ("logits", "values")

#: what a model declares about its outputs' kinds: one kind for all of them, a kind per output name,
#: or nothing (each decided from its shape by :func:`output_kind_of`)
DeclaredKinds = str | Mapping[str, str] | None

T = TypeVar("T")


def output_kind_of(y: Any, declared: str | None) -> str:
    """"logits" for classifier-like outputs ``y`` (an array or tensor, or its shape, whose last dim
    is > 1), else "values"; a model may declare it."""
    if declared is not None:
        return declared
    shape = tuple(getattr(y, "shape", y))
    return "logits" if len(shape) >= 2 and shape[-1] > 1 else "values"


def measure_name(kinds: str | Sequence[str]) -> str:
    """The profile's error measure for outputs of ``kinds`` (one kind, or one per output): "kl",
    "rel_mse", or "kl+rel_mse" when the errors of logits and values outputs are summed."""
    names = {"kl" if k == "logits" else "rel_mse" for k in ([kinds] if isinstance(kinds, str) else kinds)}
    return "+".join(m for m in ("kl", "rel_mse") if m in names)


def output_name(path: Sequence[str | int]) -> str:
    """The name of the output at pytree ``path`` (tuple indices, dict keys, attribute names):
    its parts joined by dots ("aux.0"); the empty path of a bare tensor is "0"."""
    return ".".join(str(p) for p in path) if path else "0"


def check_output_contract(outputs: Any, kinds: Any) -> str | None:
    """Why a model file's ``OUTPUTS`` (names of the outputs that count) or ``OUTPUT`` (one kind,
    or a dict name -> kind) is malformed, or None when both are well formed. Whether the names
    exist is known only once the model has run (:meth:`Outputs.resolve`)."""
    if outputs is not None and (not isinstance(outputs, (tuple, list)) or not outputs
                                or not all(isinstance(n, str) for n in outputs)):
        return f"OUTPUTS must be a non-empty tuple of output names such as ('logits',), not {outputs!r}"
    if isinstance(kinds, Mapping):
        bad = {k: v for k, v in kinds.items() if not isinstance(k, str) or v not in OUTPUT_KINDS}
        if bad or not kinds:
            return f"OUTPUT as a dict maps output names to 'logits' or 'values', not {dict(bad) or kinds!r}"
    elif kinds is not None and kinds not in OUTPUT_KINDS:
        return f"OUTPUT must be 'logits' or 'values' (or a dict output name -> kind), not {kinds!r}"
    return None


@dataclass(frozen=True)
class Outputs:
    """The model outputs that count and the error measure of each.

    ``names``: every floating output of the model, in pytree order; ``positions``: the selected
    ones among them; ``kinds``: the kind of each selected output. Frontends flatten a model's
    result into its floating tensors and :meth:`pick` the selected ones by position, so a result
    that arrives flat (ONNX Runtime, a torch.export graph's output node) is read the same way.
    """

    names: tuple[str, ...]
    positions: tuple[int, ...]
    kinds: tuple[str, ...]

    @classmethod
    def resolve(cls, names: Sequence[str], shapes: Sequence[Sequence[int]], wanted: Sequence[str] | None = None,
                declared: DeclaredKinds = None) -> "Outputs":
        """The outputs ``wanted`` (None: all) among a model's floating outputs ``names`` (of
        ``shapes``), each of the kind ``declared`` for it, else decided from its shape. A name not
        among ``names`` is a one-line ModelSpecError that lists them."""
        if not names:
            raise UsageError("the model returns no floating-point tensor: nothing to measure errors on")
        chosen = list(dict.fromkeys(wanted)) if wanted is not None else list(names)
        per_name = declared if isinstance(declared, Mapping) else {}
        for what, given in (("OUTPUTS", chosen), ("OUTPUT", per_name)):
            unknown = [n for n in given if n not in names]
            if unknown:
                raise ModelSpecError(f"{what} names the output {unknown[0]!r}, which the model does not return: its "
                                 f"floating-point outputs are {', '.join(repr(n) for n in names)}")
        positions = tuple(names.index(n) for n in chosen)
        kinds = tuple(output_kind_of(shapes[i], per_name.get(names[i]) if isinstance(declared, Mapping) else declared)
                      for i in positions)
        return cls(tuple(names), positions, kinds)

    @property
    def selected(self) -> tuple[str, ...]:
        """The names of the outputs that count."""
        return tuple(self.names[i] for i in self.positions)

    @property
    def measure(self) -> str:
        """The profile's error measure: the sum of each selected output's (:func:`measure_name`)."""
        return measure_name(self.kinds)

    def pick(self, leaves: Sequence[T]) -> list[T]:
        """The selected outputs among ``leaves``, a result's floating outputs in pytree order."""
        if len(leaves) != len(self.names):
            raise UsageError(f"the model returned {len(leaves)} floating-point output(s) where its fp32 run returned "
                             f"{len(self.names)} ({', '.join(self.names)}): cannot tell which output is which")
        return [leaves[i] for i in self.positions]

    def __len__(self) -> int:
        return len(self.positions)


def log_softmax(x: np.ndarray) -> np.ndarray:
    """log softmax over the last axis in float64."""
    x = np.asarray(x, dtype=np.float64)
    m = np.max(x, axis=-1, keepdims=True)
    z = x - m
    return z - np.log(np.sum(np.exp(z), axis=-1, keepdims=True))


#: an fp32 output as :meth:`ErrorSum.reference` prepares it: the values, or for logits their float64
#: log-probabilities and probabilities
Prepared = np.ndarray | tuple[np.ndarray, np.ndarray]


@dataclass
class ErrorSum:
    """Accumulates an error over batches: KL summed over positions, or squared error and norm.

    ``reference(y)`` prepares an fp32 output once (for logits its float64 log-probabilities and
    probabilities), so the many trials on one batch do not recompute them (for GPT-2's 50,257-way
    head, recomputing the probabilities was a fifth of the error sums' time).
    """

    kind: str
    num: float = 0.0
    den: float = 0.0

    def reference(self, ref: np.ndarray) -> Prepared:
        if self.kind != "logits":
            return np.asarray(ref)
        # float64: the KL of fp16-sized perturbations (~1e-9) is below fp32's cancellation noise
        logp = log_softmax(ref)
        return logp, np.exp(logp)

    def add(self, ref: np.ndarray, new: np.ndarray, prepared: Prepared | None = None) -> None:
        if not math.isfinite(self.num):
            return
        new = np.asarray(new)
        if not bool(np.isfinite(new).all()):
            self.num = math.inf  # the reference is finite (checked once per profile): overflow
            return
        ready = self.reference(ref) if prepared is None else prepared
        if self.kind == "logits":
            logp, p = ready
            kl = (p * (logp - log_softmax(new))).sum(axis=-1)
            self.num += float(kl.sum(dtype=np.float64))
            self.den += kl.size
        else:  # squares in fp32, sums in float64
            d = new.astype(np.float32) - np.asarray(ready, dtype=np.float32)
            r = np.asarray(ready, dtype=np.float32)
            self.num += float((d * d).sum(dtype=np.float64))
            self.den += float((r * r).sum(dtype=np.float64))

    def value(self) -> float:
        if not math.isfinite(self.num) or math.isnan(self.num):
            return math.inf
        return max(0.0, self.num / self.den) if self.den > 0 else 0.0


@dataclass
class RangeAccumulator:
    """Range statistics of one tensor accumulated over batches.

    The fp8 counts need the final amax, known only after the last batch, so each batch's
    magnitudes are kept until :meth:`finish`. Every count is one comparison against a threshold
    found once (:func:`_last_below`) rather than a division of the whole tensor: a profile adds
    every layer's inputs and output on every batch, and this is most of its statistics' cost."""

    amax: float = 0.0
    sumsq: float = 0.0
    count: int = 0
    over16: int = 0
    under16: int = 0
    values: list[tuple[np.ndarray, float, int]] = field(default_factory=list)  # (magnitudes, amax, zeros) per batch
    final: bool = False  # added once as a whole (a weight): its fp8 counts are taken at once, no values kept
    fp8_counts: tuple[int, int, int] = (0, 0, 0)  # (saturated, flushed, non-zero) of a final tensor

    def add(self, x: np.ndarray, final: bool = False) -> None:
        """Add one batch of the tensor; ``final``: this is the whole tensor and nothing more comes
        (a weight), so its fp8 statistics are counted now instead of keeping a copy of it (the
        copies of every weight were half a GPT-2-size fast profile's memory)."""
        if self.final or (final and self.count):
            raise ValueError("a final tensor is added once, and alone")
        # in memory order: the magnitudes of a transposed weight flatten without a copy
        a = np.abs(np.asarray(x, dtype=np.float32)).ravel(order="K")
        amax = float(a.max()) if a.size else 0.0
        if not math.isfinite(amax):  # rare: ignore non-finite values for the statistics
            a = np.where(np.isfinite(a), a, np.float32(0.0))
            amax = float(a.max())
        self.amax = max(self.amax, amax)
        if 2.0**-30 <= amax <= 2.0**30:  # a float32 dot product (BLAS) neither overflows nor loses the sum
            self.sumsq += float(np.dot(a, a))
        else:
            self.sumsq += float(np.sum(np.square(a, dtype=np.float64)))
        self.count += a.size
        if amax > FP16.max:
            self.over16 += int(np.count_nonzero(a > FP16.max))
        zeros = int(np.count_nonzero(a == 0))
        self.under16 += int(np.count_nonzero(a < FP16.min_normal)) - zeros  # 0 < |x| < min normal
        if final:
            self.final, self.fp8_counts = True, _fp8_counts(a, amax, zeros, self.amax)
        else:
            self.values.append((a, amax, zeros))

    def finish(self) -> RangeStats:
        scale = float(fp8_scale(self.amax, E4M3))
        sat, flushed, nonzero = self.fp8_counts
        for a, top, zeros in self.values:
            s, f, nz = _fp8_counts(a, top, zeros, self.amax)
            sat, flushed, nonzero = sat + s, flushed + f, nonzero + nz
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


def _last_below(true_at: Callable[[np.float32], bool], guess: float) -> np.float32:
    """The largest float32 magnitude x >= 0 where ``true_at`` holds, for a ``true_at`` that holds
    from 0 up to some point and not beyond, starting from ``guess``, the point in exact arithmetic:
    the float32 rounding of a quotient moves it by an ulp or two, so a few steps find it."""
    up, down = np.float32(np.inf), np.float32(0)
    x = np.float32(min(guess, float(np.finfo(np.float32).max)))
    while not true_at(x):
        x = np.nextafter(x, down)
    while x < np.finfo(np.float32).max and true_at(np.nextafter(x, up)):
        x = np.nextafter(x, up)
    return x


def _fp8_counts(a: np.ndarray, a_max: float, zeros: int, amax: float) -> tuple[int, int, int]:
    """(saturated, flushed to zero, non-zero) elements of ``a`` (magnitudes: ``a_max`` the largest,
    ``zeros`` of them 0) in E4M3 scaled by ``amax``: those whose float32 quotient |x| / scale is
    above E4M3's max, and those at or below half of its smallest subnormal (2^-9), which round to
    zero (ties to even)."""
    nonzero = a.size - zeros
    scale = np.float32(float(fp8_scale(amax, E4M3)))
    if not scale > 0:  # an amax below ~3e-43 whose scale underflows: every non-zero quotient is inf
        return nonzero, 0, nonzero
    top, tiny = np.float32(E4M3.max), np.float32(E4M3.min_subnormal / 2)
    kept = _last_below(lambda x: x / scale <= top, E4M3.max * float(scale))
    flush = _last_below(lambda x: x / scale <= tiny, E4M3.min_subnormal / 2 * float(scale))
    sat = int(np.count_nonzero(a > kept)) if a_max > kept else 0
    flushed = int(np.count_nonzero(a <= flush)) - zeros  # zeros are not flushed
    return sat, flushed, nonzero


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
