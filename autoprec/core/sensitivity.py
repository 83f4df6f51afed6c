"""SensitivityProfile: how much each layer hurts the model's output in each format.

Pure data (no torch): written by :mod:`autoprec.torch.profile`, read by the search and the report.
``errors[layer][format]`` is the output error of the model when only ``layer`` runs in ``format``
and everything else in fp32 (exact mode measures it; fast mode predicts it to first order).
The error measure is named by ``measure``: ``kl`` (mean KL divergence of the output distribution,
per sample or per token, nats) for classifier-like outputs, ``rel_mse`` (||y'-y||^2 / ||y||^2)
otherwise.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from autoprec.core.formats import Precision


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
    def from_dict(cls, d: dict[str, Any]) -> "LayerRanges":
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
    measure: str  # "kl" | "rel_mse"
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
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SensitivityProfile":
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
            samples=int(d.get("samples", 0)),
            cost_passes=float(d.get("cost_passes", 0.0)),
            rerun_fraction=float(d.get("rerun_fraction", 0.0)),
            seconds=float(d.get("seconds", 0.0)),
        )

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, indent=1)

    @classmethod
    def from_json(cls, text: str) -> "SensitivityProfile":
        return cls.from_dict(json.loads(text))
