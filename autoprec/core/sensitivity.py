"""SensitivityProfile: how much each layer hurts the model's output in each format.

Pure data (no torch): written by :mod:`autoprec.torch.profile`, read by the search and the report.
``errors[layer][format]`` is the output error of the model when only ``layer`` runs in ``format``
and everything else in fp32 (exact mode measures it; fast mode predicts it to first order).
The error measure is named by ``measure``: ``kl`` (mean KL divergence of the output distribution,
per sample or per token, nats) for classifier-like outputs, ``rel_mse`` (||y'-y||^2 / ||y||^2)
otherwise.

profile.json is checked field by field on load against :data:`PROFILE_DOCUMENT`
(:mod:`autoprec.core.schema`): a NaN or infinite amax, say, is a one-line ProfileError, not a scale.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping

from autoprec.core.errors import ProfileError
from autoprec.core.formats import Precision
from autoprec.core.io import atomic_write_text
from autoprec.core.opgraph import OpGraph
from autoprec.core.schema import (
    FINGERPRINT, FORMAT, Document, Int, ListOf, MapOf, Nullable, Num, Obj, OneOf, Str, check_fits,
)

#: every error measure a profile can have (autoprec.core.stats.measure_name): the errors of logits
#: outputs in KL, of values outputs in relative MSE, summed over outputs of both kinds
MEASURES = ("kl", "rel_mse", "kl+rel_mse")

PROFILE_VERSION = 1

#: an output error: >= 0, infinite where a format overflows (the profilers write inf, never NaN)
_ERROR = Num(lo=0, inf=True)
_FRACTION = Num(lo=0, hi=1)
#: RangeStats: calibrated statistics are finite (the profilers drop non-finite values before them)
_RANGE = Obj(
    required={"amax": Num(lo=0), "frac_over_fp16": _FRACTION, "frac_underflow_fp16": _FRACTION,
              "fp8_scale": Num(lo=0), "frac_fp8_saturated": _FRACTION, "frac_fp8_flushed": _FRACTION},
    optional={"rms": Num(lo=0)},
)
_ERRORS = MapOf(MapOf(_ERROR, key=FORMAT))  # layer -> format -> error

#: profile.json, field by field. Files written before PROFILE_VERSION existed carry no ``version``
#: field; their fields have not changed since profile.json was first written, so they read as
#: version 1. From version 1 on, to_dict writes the field.
PROFILE_DOCUMENT = Document("profile", PROFILE_VERSION, ProfileError, Obj(
    required={"model_name": Str(), "fingerprint": FINGERPRINT, "mode": OneOf(("exact", "fast")),
              "measure": OneOf(MEASURES), "formats": ListOf(FORMAT), "errors": _ERRORS},
    optional={"ranges": MapOf(Obj(required={"inputs": ListOf(_RANGE), "output": _RANGE},
                                  optional={"weight": Nullable(_RANGE)})),
              "local_errors": _ERRORS, "flags": MapOf(ListOf(Str())), "samples": Int(lo=0),
              "cost_passes": Num(lo=0), "rerun_fraction": _FRACTION, "seconds": Num(lo=0),
              "calibration": Obj(optional={"scale": Num(lo=0), "trials": ListOf(Obj({
                  "layer": Str(nonempty=True), "format": FORMAT, "fast": _ERROR, "exact": _ERROR}))})},
    keys_of={"ranges": "errors", "local_errors": "errors", "flags": "errors"},
), unversioned=1)


@dataclass(frozen=True)
class RangeStats:
    """Range statistics of one tensor over the calibration data (fp32 values)."""

    amax: float
    frac_over_fp16: float  # |x| > 65504: becomes inf in fp16
    frac_underflow_fp16: float  # 0 < |x| < 6.1e-5: below fp16's min normal (precision loss or flush)
    fp8_scale: float  # per-tensor E4M3 scale (amax / 448) used by emulation
    frac_fp8_saturated: float  # |x| / scale > 448 at that scale
    frac_fp8_flushed: float  # nonzero values that round to zero in E4M3 at that scale
    rms: float = 0.0  # root mean square: amax/rms measures how heavy-tailed the tensor is

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


@dataclass(frozen=True)
class LayerRanges:
    """Range statistics of a layer's activation input(s), weight and output."""

    inputs: tuple[RangeStats, ...]
    output: RangeStats
    weight: RangeStats | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "inputs": [r.to_dict() for r in self.inputs],
            "output": self.output.to_dict(),
            "weight": self.weight.to_dict() if self.weight else None,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "LayerRanges":
        return cls(
            inputs=tuple(RangeStats(**r) for r in d["inputs"]),
            output=RangeStats(**d["output"]),
            weight=RangeStats(**d["weight"]) if d.get("weight") else None,
        )


@dataclass
class SensitivityProfile:
    """Per-layer, per-format output error plus range statistics and readable flags."""

    model_name: str
    fingerprint: str
    mode: str  # "exact" | "fast"
    measure: str  # one of core.stats.MEASURES
    formats: tuple[Precision, ...]
    errors: dict[str, dict[Precision, float]]
    ranges: dict[str, LayerRanges] = field(default_factory=dict)
    # exact mode: relative L2 change of the layer's own output in each format (before downstream)
    local_errors: dict[str, dict[Precision, float]] = field(default_factory=dict)
    flags: dict[str, list[str]] = field(default_factory=dict)
    samples: int = 0  # calibration samples used
    cost_passes: float = 0.0  # wall time in units of one fp32 forward pass over the calibration data
    rerun_fraction: float = 0.0  # exact mode: mean fraction of graph nodes recomputed per trial
    seconds: float = 0.0
    #: fast mode: the factor its estimates were multiplied by to put them on the exact profile's
    #: scale ("scale"), and the exact trials it was taken from ("trials": layer, format, the fast
    #: estimate before scaling, the exact error); empty for an exact profile
    calibration: dict[str, Any] = field(default_factory=dict)

    def layers(self) -> list[str]:
        return list(self.errors)

    def error(self, layer: str, fmt: Precision) -> float:
        """Error of ``layer`` in ``fmt``; fp32 is exact by definition."""
        if fmt is Precision.FP32:
            return 0.0
        return self.errors[layer][fmt]

    def most_sensitive(self, k: int = 3) -> list[str]:
        """Layers with the largest error in their best low format, worst first."""
        def best(layer: str) -> float:
            vals = [v for f, v in self.errors[layer].items() if f is not Precision.FP32]
            return min(vals) if vals else 0.0

        return sorted(self.errors, key=lambda n: (-best(n), n))[:k]

    # --- serialisation ---------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "version": PROFILE_VERSION,
            "model_name": self.model_name,
            "fingerprint": self.fingerprint,
            "mode": self.mode,
            "measure": self.measure,
            "formats": [f.value for f in self.formats],
            "errors": {n: {f.value: v for f, v in e.items()} for n, e in self.errors.items()},
            "ranges": {n: r.to_dict() for n, r in self.ranges.items()},
            "local_errors": {n: {f.value: v for f, v in e.items()} for n, e in self.local_errors.items()},
            "flags": {n: list(v) for n, v in self.flags.items()},
            "samples": self.samples,
            "cost_passes": self.cost_passes,
            "rerun_fraction": self.rerun_fraction,
            "seconds": self.seconds,
            "calibration": dict(self.calibration),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str | None = None) -> "SensitivityProfile":
        """The profile in ``d`` (parsed profile.json), checked against :data:`PROFILE_DOCUMENT` first:
        any violation is a one-line ProfileError naming ``source`` (the file), the field and what it expects."""
        PROFILE_DOCUMENT.check(d, source)
        return cls(
            model_name=d["model_name"],
            fingerprint=d["fingerprint"],
            mode=d["mode"],
            measure=d["measure"],
            formats=tuple(Precision(f) for f in d["formats"]),
            errors={n: {Precision(f): float(v) for f, v in e.items()} for n, e in d["errors"].items()},
            ranges={n: LayerRanges.from_dict(r) for n, r in d.get("ranges", {}).items()},
            local_errors={n: {Precision(f): float(v) for f, v in e.items()}
                          for n, e in d.get("local_errors", {}).items()},
            flags={n: list(v) for n, v in d.get("flags", {}).items()},
            samples=d.get("samples", 0),
            cost_passes=float(d.get("cost_passes", 0.0)),
            rerun_fraction=float(d.get("rerun_fraction", 0.0)),
            seconds=float(d.get("seconds", 0.0)),
            calibration=dict(d.get("calibration", {})),
        )

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, indent=1)

    @classmethod
    def from_json(cls, text: str, source: str | None = None) -> "SensitivityProfile":
        """The profile in JSON ``text``; ``source`` (its file) is named in errors."""
        return cls.from_dict(PROFILE_DOCUMENT.parse(text, source), source)

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write profile.json atomically (temp file + os.replace), as :meth:`PrecisionPlan.save` does."""
        return atomic_write_text(Path(path), self.to_json())

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "SensitivityProfile":
        """The profile saved at ``path``; an unreadable, truncated or malformed file is a one-line ProfileError."""
        return cls.from_dict(PROFILE_DOCUMENT.read(path), str(path))

    # --- checks ----------------------------------------------------------------------------
    def check_against(self, graph: OpGraph) -> None:
        """Raise ProfileError unless this profile was made for ``graph`` (same layers, same shapes):
        its calibrated scales and errors mean nothing for another model."""
        check_fits("profile", self.model_name, self.fingerprint, self.layers(), graph, ProfileError, "autoprec profile")
