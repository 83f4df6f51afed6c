"""PrecisionPlan: the search's answer, as plain data that survives a trip through JSON.

A plan says, for every layer of one model, which format to run it in and why. It is what the
apply passes read, what the report prints and what a user can edit by hand, so it carries the
model's fingerprint and refuses to be applied to a different model (:meth:`check_against`).
plan.json is checked field by field on load against :data:`PLAN_DOCUMENT` (:mod:`autoprec.core.schema`).
Pins (``--keep`` / ``--force``) are parsed here because they are part of what a plan records.
This module imports no torch.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable, Mapping

from autoprec.core.errors import PlanError, UsageError
from autoprec.core.formats import Precision, parse_precision
from autoprec.core.io import atomic_write_text
from autoprec.core.opgraph import OpGraph, OpNode
from autoprec.core.sensitivity import MEASURES
from autoprec.core.schema import (
    FINGERPRINT, FORMAT, Bool, Document, ListOf, Nullable, Num, Obj, OneOf, Regex, Str, check_fits,
)

PLAN_VERSION = 1

PIN_SOURCES = ("keep", "force")

#: an error measure (the profile's, or a sum of them): >= 0, infinite where a format overflows
_ERROR = Num(lo=0, inf=True)
#: an estimated cost (cost-model units or bytes): finite and >= 0
_COST = Num(lo=0)

#: plan.json, field by field. Every plan.json autoprec ever wrote carries ``version`` (1 since the
#: first), so a file without one is no plan; the optional fields are those older files may lack.
PLAN_DOCUMENT = Document("plan", PLAN_VERSION, PlanError, Obj(
    required={
        "model_name": Str(),
        "target": Str(nonempty=True),
        "objective": Str(nonempty=True),  # a user's cost model may name its own
        "budget": Obj({"value": _ERROR, "kind": OneOf((*MEASURES, "metric_drop"))}),
        "cost": _COST,
        "fp32_cost": _COST,
        "decisions": ListOf(Obj(
            required={"layer": Str(nonempty=True), "format": FORMAT},
            optional={"scope": Str(), "kind": Str(), "reason": Str(), "predicted_error": _ERROR, "cost": _COST},
        ), unique="layer"),
    },
    optional={
        "fingerprint": FINGERPRINT,
        "strategy": Str(),
        "speedup": Num(lo=0, inf=True),  # derived (fp32_cost / cost): written for readers, not read back
        "cast_cost": _COST,
        "memory_bytes": _COST,
        "fp32_memory_bytes": _COST,
        "predicted_error": _ERROR,
        "pins": ListOf(Obj({"format": FORMAT, "pattern": Regex(), "source": OneOf(PIN_SOURCES)})),
        # what verification found, free-form, but verify reads allowed_drop back as a number
        "measured": Obj(optional={"allowed_drop": Num(inf=True)}, open=True),
        "steps": ListOf(Obj({"error_budget": _ERROR, "predicted_error": _ERROR,
                             "measured_drop": Nullable(Num(inf=True)), "cost": _COST, "accepted": Bool()})),
        "alternatives": ListOf(Obj({"label": Str(), "predicted_error": _ERROR, "cost": _COST,
                                    "within_budget": Bool()})),
        "notes": ListOf(Str()),
        # the deployed graph's floating inputs and outputs (tune --io): what export writes by default
        "io": OneOf(("fp32", "fp16")),
        # what training changed (autoprec train): the layers it promoted, when and why
        "promotions": ListOf(Obj({"layer": Str(nonempty=True), "from": FORMAT, "to": FORMAT,
                                  "step": Num(lo=0), "reason": Str()})),
    },
))


# --- pins ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Pin:
    """A user rule for the layers whose scope, name or kind matches ``pattern`` (``re.search``).

    ``source="keep"`` allows only fp32 or ``format`` (keep a layer at least that precise);
    ``source="force"`` imposes ``format``.
    """

    format: Precision
    pattern: str
    source: str = "keep"

    def matches(self, op: OpNode) -> bool:
        rx = re.compile(self.pattern)
        return any(rx.search(s) for s in (op.scope, op.name, op.kind))

    def allowed(self) -> frozenset[Precision]:
        """The formats a matching layer may take."""
        if self.source == "force":
            return frozenset({self.format})
        return frozenset({Precision.FP32, self.format})

    def __str__(self) -> str:
        return f"--{self.source} {self.format}:{self.pattern}"

    def to_dict(self) -> dict[str, str]:
        return {"format": self.format.value, "pattern": self.pattern, "source": self.source}

    @classmethod
    def from_dict(cls, d: Mapping[str, str]) -> "Pin":
        return cls(Precision(d["format"]), d["pattern"], d["source"])


_FORMAT_WORD = re.compile(r"^[A-Za-z0-9_]+$")


def parse_pin(text: str, source: str = "keep") -> Pin:
    """Parse ``"fp32:head|embed"`` (format, colon, regex); ``--keep`` also takes a bare regex (fp32)."""
    if source not in PIN_SOURCES:
        raise UsageError(f"unknown pin source {source!r}: use one of {', '.join(PIN_SOURCES)}")
    head, sep, rest = text.partition(":")
    if sep and _FORMAT_WORD.match(head.strip()):
        try:
            fmt = parse_precision(head)
        except UsageError as e:
            raise UsageError(f"bad --{source} {text!r}: {e}") from None
        pattern = rest
    elif source == "keep":
        fmt, pattern = Precision.FP32, text
    else:
        raise UsageError(f"bad --force {text!r}: write FORMAT:REGEX, e.g. fp16:blocks\\.0")
    if not pattern:
        raise UsageError(f"bad --{source} {text!r}: empty pattern after the format")
    try:
        re.compile(pattern)
    except re.error as e:
        raise UsageError(f"bad --{source} pattern {pattern!r}: {e} (it is a Python regular expression, e.g. 'head|embed')") from None
    return Pin(fmt, pattern, source)


def parse_pins(texts: Iterable[str] = (), source: str = "keep") -> tuple[Pin, ...]:
    """Parse several pins of one source (the repeated values of one CLI option)."""
    return tuple(parse_pin(t, source) for t in texts)


# --- the plan --------------------------------------------------------------------------------
@dataclass(frozen=True)
class LayerDecision:
    """The format chosen for one layer, with a reason a person can read."""

    layer: str
    scope: str
    kind: str
    format: Precision
    reason: str
    predicted_error: float = 0.0  # the profile's error for this layer in this format
    cost: float = 0.0  # estimated cost of the layer and the FOLLOW ops it owns (casts excluded)

    def to_dict(self) -> dict[str, Any]:
        return {"layer": self.layer, "scope": self.scope, "kind": self.kind,
                "format": self.format.value, "reason": self.reason,
                "predicted_error": self.predicted_error, "cost": self.cost}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "LayerDecision":
        return cls(d["layer"], d.get("scope", ""), d.get("kind", ""), Precision(d["format"]),
                   d.get("reason", ""), float(d.get("predicted_error", 0.0)), float(d.get("cost", 0.0)))


@dataclass(frozen=True)
class Budget:
    """An accuracy budget: ``kind`` is the profile's error measure ("kl", "rel_mse") for a
    budget in error units, or "metric_drop" for a budget in the user's metric."""

    value: float
    kind: str

    def to_dict(self) -> dict[str, Any]:
        return {"value": self.value, "kind": self.kind}


@dataclass(frozen=True)
class TuneStep:
    """One verified attempt of the tune loop."""

    error_budget: float
    predicted_error: float
    measured_drop: float | None  # None when not measured (all-fp32, or a plan measured before)
    cost: float
    accepted: bool

    def to_dict(self) -> dict[str, Any]:
        return {"error_budget": self.error_budget, "predicted_error": self.predicted_error,
                "measured_drop": self.measured_drop, "cost": self.cost, "accepted": self.accepted}


@dataclass(frozen=True)
class Alternative:
    """Another plan the strategy considered (uniform plans, Pareto points), for the report."""

    label: str
    predicted_error: float
    cost: float
    within_budget: bool

    def to_dict(self) -> dict[str, Any]:
        return {"label": self.label, "predicted_error": self.predicted_error, "cost": self.cost,
                "within_budget": self.within_budget}


@dataclass(frozen=True)
class Promotion:
    """A layer training moved to a wider format (``autoprec train``'s adaptive precision): it kept
    losing values to overflow or underflow in ``src``. ``step`` is the optimizer step it happened at."""

    layer: str
    src: Precision
    dst: Precision
    step: int
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {"layer": self.layer, "from": self.src.value, "to": self.dst.value, "step": self.step,
                "reason": self.reason}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Promotion":
        return cls(d["layer"], Precision(d["from"]), Precision(d["to"]), int(d["step"]), d["reason"])


@dataclass(frozen=True)
class PrecisionPlan:
    """Layer -> format for one model, with estimated cost and (after verification) measurements.

    ``measured`` holds what verification found: ``drop`` (metric units, positive is worse),
    ``evaluations``, and, when the caller knows them, ``metric_fp32`` and ``metric_tuned``.
    """

    model_name: str
    fingerprint: str
    target: str
    objective: str
    budget: Budget
    decisions: tuple[LayerDecision, ...]
    strategy: str
    cost: float  # estimated total (layers + FOLLOW ops + fixed ops + casts)
    fp32_cost: float
    cast_cost: float = 0.0
    memory_bytes: float = 0.0
    fp32_memory_bytes: float = 0.0
    predicted_error: float = 0.0
    pins: tuple[Pin, ...] = ()
    measured: Mapping[str, Any] = field(default_factory=dict)
    steps: tuple[TuneStep, ...] = ()
    alternatives: tuple[Alternative, ...] = ()
    notes: tuple[str, ...] = ()  # plan-wide remarks for the report (e.g. pins over budget)
    promotions: tuple[Promotion, ...] = ()  # layers training widened, in the order it did
    io: Precision = Precision.FP32  # format of the deployed graph's floating inputs and outputs

    # --- views -------------------------------------------------------------------------------
    @property
    def assignment(self) -> dict[str, Precision]:
        return {d.layer: d.format for d in self.decisions}

    @property
    def speedup(self) -> float:
        """fp32 cost / plan cost (a compression ratio when the objective is memory)."""
        return self.fp32_cost / self.cost if self.cost > 0 else 1.0

    def decision(self, layer: str) -> LayerDecision:
        for d in self.decisions:
            if d.layer == layer:
                return d
        raise PlanError(f"layer {layer!r} is not in the plan for {self.model_name or 'this model'}")

    def format_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for d in self.decisions:
            counts[d.format.value] = counts.get(d.format.value, 0) + 1
        return dict(sorted(counts.items()))

    def with_measured(self, **measured: Any) -> "PrecisionPlan":
        """A copy with ``measured`` entries added (e.g. metric_fp32=0.98, metric_tuned=0.975)."""
        return replace(self, measured={**self.measured, **measured})

    # --- checks ------------------------------------------------------------------------------
    def check_against(self, graph: OpGraph) -> None:
        """Raise PlanError unless this plan was made for ``graph`` (same layers, same shapes)."""
        check_fits("plan", self.model_name, self.fingerprint, [d.layer for d in self.decisions], graph,
                   PlanError, "the search")

    # --- serialisation -----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "version": PLAN_VERSION,
            "model_name": self.model_name,
            "fingerprint": self.fingerprint,
            "target": self.target,
            "objective": self.objective,
            "budget": self.budget.to_dict(),
            "strategy": self.strategy,
            "cost": self.cost,
            "fp32_cost": self.fp32_cost,
            "speedup": self.speedup,
            "cast_cost": self.cast_cost,
            "memory_bytes": self.memory_bytes,
            "fp32_memory_bytes": self.fp32_memory_bytes,
            "predicted_error": self.predicted_error,
            "pins": [p.to_dict() for p in self.pins],
            "measured": dict(self.measured),
            "steps": [s.to_dict() for s in self.steps],
            "alternatives": [a.to_dict() for a in self.alternatives],
            "notes": list(self.notes),
            "promotions": [p.to_dict() for p in self.promotions],
            "io": self.io.value,
            "decisions": [d.to_dict() for d in self.decisions],
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str | None = None) -> "PrecisionPlan":
        """The plan in ``d`` (parsed plan.json), checked against :data:`PLAN_DOCUMENT` first: any
        violation is a one-line PlanError naming ``source`` (the file), the field and what it expects."""
        PLAN_DOCUMENT.check(d, source)
        return cls(
            model_name=d["model_name"],
            fingerprint=d.get("fingerprint", ""),
            target=d["target"],
            objective=d["objective"],
            budget=Budget(float(d["budget"]["value"]), d["budget"]["kind"]),
            decisions=tuple(LayerDecision.from_dict(x) for x in d["decisions"]),
            strategy=d.get("strategy", ""),
            cost=float(d["cost"]),
            fp32_cost=float(d["fp32_cost"]),
            cast_cost=float(d.get("cast_cost", 0.0)),
            memory_bytes=float(d.get("memory_bytes", 0.0)),
            fp32_memory_bytes=float(d.get("fp32_memory_bytes", 0.0)),
            predicted_error=float(d.get("predicted_error", 0.0)),
            pins=tuple(Pin.from_dict(p) for p in d.get("pins", [])),
            measured=dict(d.get("measured", {})),
            steps=tuple(TuneStep(**s) for s in d.get("steps", [])),
            alternatives=tuple(Alternative(**a) for a in d.get("alternatives", [])),
            notes=tuple(d.get("notes", [])),
            promotions=tuple(Promotion.from_dict(p) for p in d.get("promotions", [])),
            io=Precision(d.get("io", Precision.FP32.value)),
        )

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, indent=1) + "\n"

    @classmethod
    def from_json(cls, text: str, source: str | None = None) -> "PrecisionPlan":
        """The plan in JSON ``text``; ``source`` (its file) is named in errors."""
        return cls.from_dict(PLAN_DOCUMENT.parse(text, source), source)

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the plan atomically (temp file + os.replace): a reader never sees half a file."""
        return atomic_write_text(Path(path), self.to_json())

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "PrecisionPlan":
        """The plan saved at ``path``; an unreadable, truncated or malformed file is a one-line PlanError."""
        return cls.from_dict(PLAN_DOCUMENT.read(path), str(path))
