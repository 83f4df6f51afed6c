"""Targets: GPUs as data (dense peak throughput per format and memory bandwidth, from datasheets)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

from autoprec.core.errors import UsageError
from autoprec.core.formats import Precision


@dataclass(frozen=True)
class Target:
    """A GPU as data: dense peak throughput per format and memory bandwidth (datasheet figures).

    ``peaks`` holds (format, FLOP/s) pairs; a format absent from it is not supported on the
    target (A100 has no fp8 tensor cores, so fp8 is never offered there).

    fp32 uses the non-tensor-core peak, not TF32: PyTorch disables TF32 for matmuls by default
    (``torch.backends.cuda.matmul.allow_tf32 = False``) and autoprec measures accuracy with true
    fp32 arithmetic, so the fp32 baseline it compares against is the plain fp32 one.
    """

    name: str
    description: str
    peaks: tuple[tuple[Precision, float], ...]
    bandwidth: float  # bytes per second

    @property
    def formats(self) -> tuple[Precision, ...]:
        """Supported formats, widest first."""
        return tuple(sorted((p for p, _ in self.peaks), key=lambda p: p.rank))

    def supports(self, fmt: Precision) -> bool:
        return any(p is fmt for p, _ in self.peaks)

    def peak(self, fmt: Precision) -> float:
        """Dense FLOP/s in ``fmt``; UsageError if the target lacks it."""
        for p, v in self.peaks:
            if p is fmt:
                return v
        raise UsageError(f"target {self.name} does not support {fmt}: use one of "
                         + ", ".join(str(p) for p in self.formats))


def _peaks(fp32: float, half: float, fp8: float | None) -> tuple[tuple[Precision, float], ...]:
    out = [(Precision.FP32, fp32), (Precision.BF16, half), (Precision.FP16, half)]
    if fp8 is not None:  # e5m2 runs at the same rate as e4m3 on every fp8 GPU
        out += [(Precision.FP8_E4M3, fp8), (Precision.FP8_E5M2, fp8)]
    return tuple(out)


TARGETS: Mapping[str, Target] = {
    t.name: t
    for t in (
        Target("h100", "NVIDIA H100 SXM", _peaks(67e12, 989e12, 1979e12), 3.35e12),
        Target("a100", "NVIDIA A100 SXM 80GB (no fp8)", _peaks(19.5e12, 312e12, None), 2.04e12),
        Target("l4", "NVIDIA L4", _peaks(30e12, 121e12, 242e12), 0.30e12),
        # Not a real part: a mid-range GPU with every format, for users without a datasheet.
        Target("generic", "modest GPU with all formats", _peaks(20e12, 150e12, 300e12), 1.0e12),
    )
}

DEFAULT_TARGET = "h100"


def get_target(name: str | Target = DEFAULT_TARGET) -> Target:
    """Look a built-in target up by name (case-insensitive)."""
    if isinstance(name, Target):
        return name
    try:
        return TARGETS[str(name).strip().lower()]
    except KeyError:
        raise UsageError(f"unknown target {name!r}: use one of {', '.join(TARGETS)}") from None
