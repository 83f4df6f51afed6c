"""A tiny pass framework for torch.fx rewrites.

A pass is an object with ``call(gm) -> PassResult(gm, modified)`` and ``check(gm)``, its
postcondition: the fx graph lints and whatever the pass promises holds. :class:`PassManager` runs
passes in sequence, checks each one's postcondition right after it, and recompiles the module once
at the end when any pass changed the graph.

The metadata keys every autoprec pass reads or writes live here so reports can find them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch.fx as fx

#: compute format of a node (a Precision): a layer's plan format, a FOLLOW op's inherited one, ...
FORMAT = "autoprec_format"
#: format of the value a node produces: a layer's ``fmt.compute_output`` (fp8 layers write bf16)
VALUE_FORMAT = "autoprec_value_format"
#: readable reason for the format ("plan", "follows q (bf16)", "softmax stays fp32 (never)")
REASON = "autoprec_reason"
#: calibrated amax of each activation input of an fp8 layer (tuple of floats)
ACT_AMAX = "autoprec_act_amax"
#: module path of a node (set by capture; copied onto inserted nodes)
SCOPE = "autoprec_scope"
#: normalised op kind (set by capture); inserted nodes are "cast" or "round"
KIND = "autoprec_kind"
#: True on nodes a pass inserted
INSERTED = "autoprec_inserted"


class PassError(RuntimeError):
    """A pass broke its own postcondition: a bug in autoprec, not in the user's model or plan."""


@dataclass
class PassResult:
    gm: fx.GraphModule
    modified: bool


class Pass:
    """Base class: subclasses implement :meth:`call` and extend :meth:`check`."""

    @property
    def name(self) -> str:
        return type(self).__name__

    def call(self, gm: fx.GraphModule) -> PassResult:
        raise NotImplementedError

    def check(self, gm: fx.GraphModule) -> None:
        """Postcondition; the default only lints the graph. Raise :class:`PassError` on failure."""
        try:
            gm.graph.lint()
        except Exception as exc:  # lint raises RuntimeError and friends
            raise PassError(f"{self.name}: graph does not lint: {exc}") from exc

    def __call__(self, gm: fx.GraphModule) -> PassResult:
        return self.call(gm)


class PassManager:
    """Runs passes in order; each pass's postcondition is checked right after it runs."""

    def __init__(self, passes: Sequence[Pass]) -> None:
        self.passes = list(passes)

    def run(self, gm: fx.GraphModule) -> PassResult:
        modified = False
        for p in self.passes:
            result = p.call(gm)
            p.check(result.gm)
            gm = result.gm
            modified = modified or result.modified
        if modified:
            gm.recompile()
        return PassResult(gm, modified)
