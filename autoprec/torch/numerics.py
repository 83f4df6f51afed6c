"""Training numerics: the fp8 scaling recipe, the per-layer numerics monitor, and the module that
trains a plan.

A plan's rewritten graph (:func:`autoprec.torch.passes.apply_plan`, emulate mode) computes the
forward pass of every layer in its format. While it trains inside :class:`PlanModule`, the
numerics of the backward pass are those of a GPU running the plan (DESIGN.md, issue "train with
the plan"):

- every rounding to a format also rounds the gradient it passes back, to the format the backward
  GEMMs write (:mod:`autoprec.torch.quantize`): a 16-bit layer's gradients are 16-bit, an fp8
  layer's are bf16, and fp16 gradients underflow and overflow where a GPU's would;
- an fp8 layer follows the HYBRID recipe: its forward operands in its plan's fp8 format (E4M3 by
  default), the gradient of its output in E5M2 (a saturating cast, as Transformer Engine's and
  torchao's are: beyond the scale's range a value clamps to +-57344 rather than become inf)
  before the two backward GEMMs, each tensor with a
  per-tensor scale (weights: per tensor, or one scale per output channel with ``weight_scaling=
  "rowwise"``, a linear weight's rows and a transposed convolution's (group, column) pairs as in
  inference, always from the weight's own amax). Activation and gradient scales are *current*
  (this tensor's amax) or *delayed* (:class:`ScaleState`: the max, or the most recent, of an amax
  history of the last ``amax_history`` steps, as Transformer Engine's DelayedScaling defines
  them, with a margin of ``2**margin``);
- every rounding, forward and backward, is counted by the monitor under its site (the layer that
  made it, a cast's reader, a FOLLOW op): values that overflowed (to inf, or beyond an fp8
  format's max before saturation), values that underflowed (non-zero, rounded to zero), how many
  non-zero values there were (the fractions lost are of those: a ReLU's zeros lose nothing) and
  their amax (after the fp8 scale: what the format saw). Forward counts include the weights the
  layer rounds.

Scales here divide: a value is stored as ``round(x / s)`` and read as that times ``s``, with
``s = amax * 2**margin / fmt.max`` (the inverse of Transformer Engine's multiplying scale).
A zero or non-finite amax leaves the scale where it was (1 at the start).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Callable, Mapping

import torch
from torch import nn

from autoprec.core.errors import UsageError
from autoprec.core.formats import Precision
from autoprec.core.fp8 import ROWS, Channels
from autoprec.torch.quantize import channel_amax, fp8_scale, quantize, round_to, rounding_gradients

FP8_SCALINGS = ("delayed", "current")
AMAX_COMPUTE = ("max", "most_recent")
WEIGHT_SCALINGS = ("tensor", "rowwise")
GRAD_FP8 = Precision.FP8_E5M2


@dataclass(frozen=True)
class Recipe:
    """How fp8 layers scale their tensors while they train (16-bit layers need no recipe).

    ``fp8_scaling``: "delayed" (scales from the amax history of earlier steps; Transformer
    Engine's default) or "current" (each tensor's own amax). ``amax_history``: steps the history
    holds; ``amax_compute``: "max" over the history or its "most_recent" entry; ``margin``: the
    scale is ``2**margin`` times larger than the amax needs (headroom for growth);
    ``weight_scaling``: one scale per weight tensor or per output channel ("rowwise").
    """

    fp8_scaling: str = "delayed"
    amax_history: int = 16
    amax_compute: str = "max"
    margin: int = 0
    weight_scaling: str = "tensor"

    def __post_init__(self) -> None:
        if self.fp8_scaling not in FP8_SCALINGS:
            raise UsageError(f"unknown fp8 scaling {self.fp8_scaling!r}: use {' or '.join(FP8_SCALINGS)}")
        if self.amax_compute not in AMAX_COMPUTE:
            raise UsageError(f"unknown amax computation {self.amax_compute!r}: use {' or '.join(AMAX_COMPUTE)}")
        if self.weight_scaling not in WEIGHT_SCALINGS:
            raise UsageError(f"unknown weight scaling {self.weight_scaling!r}: use {' or '.join(WEIGHT_SCALINGS)}")
        if not isinstance(self.amax_history, int) or self.amax_history < 1:
            raise UsageError(f"the amax history needs at least 1 step, not {self.amax_history!r}")
        if not isinstance(self.margin, int) or self.margin < 0:
            raise UsageError(f"the fp8 margin is a whole number of binades >= 0, not {self.margin!r}")

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Recipe":
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})


class ScaleState:
    """The scale of one tensor of one fp8 layer (an activation input, or its output gradient).

    Current scaling computes the scale from the tensor it is given. Delayed scaling uses the scale
    set at the end of the previous step: :meth:`record` keeps the largest amax seen this step, and
    :meth:`end_step` pushes it onto the history (newest first) and sets the next step's scale from
    the history's max (or newest entry). Both are plain fp32 arithmetic on tensors.
    """

    def __init__(self, recipe: Recipe, fmt: Precision) -> None:
        self.recipe = recipe
        self.fmt = fmt
        self.history = torch.zeros(recipe.amax_history)
        self.scale = torch.ones(())
        self.step_amax = torch.zeros(())

    def scale_for(self, x: torch.Tensor, record: bool) -> torch.Tensor:
        """The scale to quantize ``x`` with now; ``record``: count its amax in this step's."""
        amax = x.detach().abs().amax().float().cpu() if x.numel() else torch.zeros(())
        if record:
            self.step_amax = torch.maximum(self.step_amax, amax)
        if self.recipe.fp8_scaling == "current":
            return _scale_from(amax, self.recipe.margin, self.fmt, torch.ones(())).to(x.device)
        return self.scale.to(x.device)

    def end_step(self) -> None:
        """Roll this step's amax into the history and set the next step's scale (delayed scaling)."""
        self.history = torch.cat([self.step_amax.reshape(1), self.history[:-1]])
        amax = self.history.max() if self.recipe.amax_compute == "max" else self.history[0]
        self.scale = _scale_from(amax, self.recipe.margin, self.fmt, self.scale)
        self.step_amax = torch.zeros(())

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"history": self.history.clone(), "scale": self.scale.clone(), "step_amax": self.step_amax.clone()}

    def load_state_dict(self, d: Mapping[str, torch.Tensor]) -> None:
        self.history, self.scale, self.step_amax = d["history"].clone(), d["scale"].clone(), d["step_amax"].clone()


def _scale_from(amax: torch.Tensor, margin: int, fmt: Precision, previous: torch.Tensor) -> torch.Tensor:
    """``amax * 2**margin / fmt.max``; ``previous`` where the amax is zero or not finite."""
    ok = torch.isfinite(amax) & (amax > 0)
    return torch.where(ok, amax * float(2 ** margin) / fmt.max, previous)


class _GradFp8(torch.autograd.Function):
    """The identity forward; backward, the gradient quantized to E5M2 with its scale (the input of
    an fp8 layer's two backward GEMMs)."""

    @staticmethod
    def forward(ctx, y: torch.Tensor, state: ScaleState, numerics: "Numerics", site: str) -> torch.Tensor:  # type: ignore[override]
        ctx.state, ctx.numerics, ctx.site = state, numerics, site
        return y.view_as(y)

    @staticmethod
    def backward(ctx, g: torch.Tensor):  # type: ignore[override]
        numerics: Numerics = ctx.numerics
        s = ctx.state.scale_for(g, numerics.recording)
        y = g.float() / s
        q = round_to(y.clamp(-GRAD_FP8.max, GRAD_FP8.max), GRAD_FP8)  # a saturating cast, as fp8 recipes use
        numerics.observe(ctx.site, y, q, GRAD_FP8, True, saturating=True)
        return q * s, None, None, None


class Fp8Layer:
    """The recipe's state for one fp8 layer (implements :class:`autoprec.torch.semantics.Fp8Recipe`)."""

    def __init__(self, numerics: "Numerics", site: str, fmt: Precision) -> None:
        self.numerics, self.site, self.fmt = numerics, site, fmt
        self.inputs: dict[int, ScaleState] = {}
        self.grad = ScaleState(numerics.recipe, GRAD_FP8)

    def input_state(self, j: int) -> ScaleState:
        """The scale state of activation input ``j``."""
        return self.inputs.setdefault(j, ScaleState(self.numerics.recipe, self.fmt))

    def activation(self, j: int, x: torch.Tensor) -> torch.Tensor:
        return quantize(x, self.fmt, self.input_state(j).scale_for(x, self.numerics.recording))

    def weight_scale(self, w: torch.Tensor, channels: Channels = ROWS) -> torch.Tensor:
        """The weight's scale from its own amax: a scalar, or one per output channel ([N, 1] for
        a linear weight; ``channels`` says where they lie, as the inference rule's do)."""
        if self.numerics.recipe.weight_scaling == "rowwise":
            amax = channel_amax(w, channels)
        else:
            amax = w.detach().abs().amax()
        return fp8_scale(amax * float(2 ** self.numerics.recipe.margin), self.fmt)

    def weight(self, w: torch.Tensor, channels: Channels = ROWS) -> torch.Tensor:
        return quantize(w, self.fmt, self.weight_scale(w, channels))

    def output_grad(self, y: torch.Tensor) -> torch.Tensor:
        return _GradFp8.apply(y, self.grad, self.numerics, self.site)

    def states(self) -> dict[str, ScaleState]:
        """Every scale this layer keeps, by role ("input0", "grad")."""
        return {**{f"input{j}": s for j, s in sorted(self.inputs.items())}, "grad": self.grad}


#: the monitor's counters of one site, in this order
COUNTERS = ("fwd_overflow", "fwd_underflow", "fwd_nonzero", "bwd_overflow", "bwd_underflow", "bwd_nonzero",
            "fwd_amax", "bwd_amax")
_AMAX_AT = 6


@dataclass(frozen=True)
class SiteStep:
    """What one site's roundings did in one step (counts summed over ranks, amax their max)."""

    fwd_overflow: float
    fwd_underflow: float
    fwd_nonzero: float
    bwd_overflow: float
    bwd_underflow: float
    bwd_nonzero: float
    fwd_amax: float
    bwd_amax: float

    def lost(self, count_grad_overflow: bool) -> tuple[float, float]:
        """(forward, backward) fraction of values lost to overflow or underflow; gradient overflow
        counts only when ``count_grad_overflow`` (no loss scaler skips those steps)."""
        fwd = (self.fwd_overflow + self.fwd_underflow) / self.fwd_nonzero if self.fwd_nonzero else 0.0
        lost = self.bwd_underflow + (self.bwd_overflow if count_grad_overflow else 0.0)
        bwd = lost / self.bwd_nonzero if self.bwd_nonzero else 0.0
        return fwd, bwd


class Numerics:
    """The training numerics of one plan: the fp8 recipe's state per layer and the monitor.

    ``monitor=False`` skips the counting (the numerics are the same). ``every=k`` counts one
    training step in k (the first, then every k-th): counting costs about as much again as the
    emulated roundings it watches, so a sampled monitor is what can stay on (the fp8 recipe's amax is
    recorded at every step regardless). ``recording`` is set by :class:`PlanModule` from its
    training flag: evaluation reads the scales but neither records amax nor counts. Implements
    :class:`autoprec.torch.semantics.TrainingNumerics`.
    """

    def __init__(self, recipe: Recipe | None = None, monitor: bool = True, every: int = 1) -> None:
        if not isinstance(every, int) or every < 1:
            raise UsageError(f"the monitor counts every k-th step with k >= 1, not {every!r}")
        self.recipe = recipe or Recipe()
        self.monitor = monitor
        self.every = every
        self.steps = 0  # steps ended so far: which of them the monitor counts
        self.recording = True
        self.layers: dict[str, Fp8Layer] = {}
        self._acc: dict[str, list[tuple[bool, torch.Tensor, torch.Tensor]]] = {}

    # --- TrainingNumerics -----------------------------------------------------------------------
    def fp8_recipe(self, site: str, fmt: Precision) -> Fp8Layer:
        layer = self.layers.get(site)
        if layer is None or layer.fmt is not fmt:
            layer = self.layers[site] = Fp8Layer(self, site, fmt)
        return layer

    def observe(self, site: str, scaled: torch.Tensor, rounded: torch.Tensor, fmt: Precision, grad: bool,
                saturating: bool = False) -> None:
        """Count one rounding (``saturating``: the values were clamped to the format's max first).

        Three passes over the tensor (on a CPU 1.5-5.8x an emulated step's time when every
        step is counted: the trainer counts one in ``every``). A value underflowed when it rounded
        to zero and was not zero (zeros of ``rounded`` less zeros of ``scaled``); overflow is looked
        for only when the amax passes the format's max; the counts are kept as tensors per rounding
        and summed once, at :meth:`end_step`."""
        if not self.counting:
            return
        with torch.no_grad():
            lo, hi = torch.aminmax(scaled) if scaled.numel() else (scaled.new_zeros(()), scaled.new_zeros(()))
            amax = torch.maximum(-lo, hi).float()
            zeros_in = (scaled == 0).sum()
            under = (rounded == 0).sum() - zeros_in
            if scaled.is_cuda or not bool(amax <= fmt.max):  # no sync on a GPU; on the CPU, skip the usual case
                if saturating or fmt.info.saturates:
                    over = (scaled.abs() > fmt.max).sum()
                else:
                    over = torch.isinf(rounded).sum() - torch.isinf(scaled).sum()
            else:
                over = zeros_in.new_zeros(())
            self._record(site, grad, torch.stack([over, under, scaled.numel() - zeros_in]), amax)

    def observe_result(self, site: str, values: torch.Tensor, fmt: Precision, grad: bool) -> None:
        """Count a native 16-bit result whose rounding happened inside a kernel: its non-finite
        values are overflows; its underflows cannot be seen (native mode counts none)."""
        if not self.counting or not values.is_floating_point():
            return
        with torch.no_grad():
            v = values.detach()
            over = (~torch.isfinite(v)).sum()
            nonzero = (v != 0).sum()
            finite = v.float().abs().nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)
            amax = finite.amax() if finite.numel() else finite.new_zeros(())
            self._record(site, grad, torch.stack([over, over.new_zeros(()), nonzero]), amax)

    @property
    def counting(self) -> bool:
        """Whether this step's roundings are counted: a monitored training step."""
        return self.monitor and self.recording and self.steps % self.every == 0

    def _record(self, site: str, grad: bool, counts: torch.Tensor, amax: torch.Tensor) -> None:
        """Keep one rounding's (overflow, underflow, non-zero) counts and amax for :meth:`end_step`."""
        self._acc.setdefault(site, []).append((grad, counts, amax))

    # --- steps ----------------------------------------------------------------------------------
    def end_step(self, reduce: Callable[[torch.Tensor, str], torch.Tensor] | None = None) -> dict[str, SiteStep]:
        """Close a training step: agree fp8 amax and counts across ranks (``reduce(tensor, op)``,
        op "sum" or "max", returns the reduced tensor; None on one process), roll the delayed
        scales, and return what each site's roundings did this step."""
        states = [s for _, layer in sorted(self.layers.items()) for _, s in sorted(layer.states().items())]
        if states and reduce is not None:
            amax = reduce(torch.stack([s.step_amax for s in states]), "max")
            for s, a in zip(states, amax):
                s.step_amax = a.clone()
        for s in states:
            s.end_step()
        self.steps += 1
        sites = sorted(self._acc)
        if not sites:
            return {}
        acc = torch.zeros(len(sites), len(COUNTERS), dtype=torch.float64)
        for i, site in enumerate(sites):
            for g in (False, True):
                kept = [(c, a) for grad, c, a in self._acc[site] if grad is g]
                if kept:
                    off = 3 if g else 0
                    acc[i, off:off + 3] = torch.stack([c for c, _ in kept]).sum(0).double().cpu()
                    acc[i, _AMAX_AT + int(g)] = torch.stack([a for _, a in kept]).max().double().cpu()
        if reduce is not None:
            acc = torch.cat([reduce(acc[:, :_AMAX_AT].contiguous(), "sum"), reduce(acc[:, _AMAX_AT:].contiguous(), "max")], 1)
        self._acc = {}
        return {site: SiteStep(*(float(v) for v in row)) for site, row in zip(sites, acc.tolist())}

    def state_dict(self) -> dict[str, Any]:
        """The recipe's scaling state, for checkpoints (a resumed run scales exactly as before)."""
        return {"recipe": self.recipe.to_dict(), "steps": self.steps,
                "layers": {site: {"fmt": layer.fmt.value,
                                  "states": {k: s.state_dict() for k, s in layer.states().items()}}
                           for site, layer in sorted(self.layers.items())}}

    def load_state_dict(self, d: Mapping[str, Any]) -> None:
        self.recipe = Recipe.from_dict(d["recipe"])
        self.steps = int(d.get("steps", 0))
        self.layers = {}
        for site, entry in d["layers"].items():
            layer = self.fp8_recipe(site, Precision(entry["fmt"]))
            for role, sd in entry["states"].items():
                if role == "grad":
                    state = layer.grad
                else:
                    state = layer.inputs.setdefault(int(role.removeprefix("input")), ScaleState(self.recipe, layer.fmt))
                state.load_state_dict(sd)

    def drop_layer(self, site: str) -> None:
        """Forget a layer's fp8 state (it was promoted out of fp8)."""
        self.layers.pop(site, None)


class PlanModule(nn.Module):
    """A plan's rewritten graph that trains with the plan's numerics.

    Its forward runs the graph with :class:`Numerics` active, so the backward pass rounds each
    gradient as the plan's formats do and the monitor counts what every rounding lost. Training
    mode records fp8 amax and counts; eval mode (a user's ``evaluate``) only reads the scales.
    The parameters are the fp32 masters: an optimizer updates them as usual. Call
    :meth:`end_step` after each optimizer step (:func:`autoprec.train` does) to roll the delayed
    fp8 scales and collect the step's counts.
    """

    def __init__(self, graph_module: nn.Module, numerics: Numerics) -> None:
        super().__init__()
        self.graph_module = graph_module
        self.numerics = numerics

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        self.numerics.recording = self.training
        with rounding_gradients(self.numerics):
            return self.graph_module(*args, **kwargs)

    def end_step(self, reduce: Callable[[torch.Tensor, str], torch.Tensor] | None = None) -> dict[str, SiteStep]:
        """See :meth:`Numerics.end_step`."""
        return self.numerics.end_step(reduce)


def lost_fraction_text(step: SiteStep, count_grad_overflow: bool) -> str:
    """A site's losses in one step, as a reason in the plan reads them."""
    parts = []
    for label, n, total in (("activations overflowed", step.fwd_overflow, step.fwd_nonzero),
                            ("activations underflowed", step.fwd_underflow, step.fwd_nonzero),
                            ("gradients overflowed", step.bwd_overflow if count_grad_overflow else 0.0, step.bwd_nonzero),
                            ("gradients underflowed", step.bwd_underflow, step.bwd_nonzero)):
        if n and total:
            parts.append(f"{100 * n / total:.3g}% of {label}")
    return ", ".join(parts) if parts else "no values lost"


