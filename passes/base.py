"""A tiny pass framework, shared by the torch.fx and the ONNX rewrites.

A pass is an object with ``call(graph) -> PassResult(graph, modified)`` and ``check(graph)``, its
postcondition: the graph is valid (fx lint here; the ONNX checker in :mod:`passes.onnx_base`) and
whatever the pass promises holds. :class:`PassManager` runs passes in sequence, checks each one's
postcondition right after it, and calls the passes' ``finish`` once at the end when any pass changed
the graph (fx passes recompile the module there; ONNX passes need nothing).

The metadata keys every autoprec pass reads or writes live here so reports can find them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Generic, Sequence, TypeVar

import torch.fx as fx

G = TypeVar("G")  # the graph a pass rewrites: fx.GraphModule or onnx.ModelProto

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
class PassResult(Generic[G]):
    graph: G
    modified: bool


class GraphPass(Generic[G]):
    """Base class: subclasses implement :meth:`call` and extend :meth:`check`."""

    @property
    def name(self) -> str:
        return type(self).__name__

    def call(self, graph: G) -> PassResult[G]:
        raise NotImplementedError

    def check(self, graph: G) -> None:
        """Postcondition. Raise a pass error on failure."""

    def finish(self, graph: G) -> None:
        """Run once after a sequence of passes of this kind changed ``graph``."""

    def __call__(self, graph: G) -> PassResult[G]:
        return self.call(graph)


class Pass(GraphPass[fx.GraphModule]):
    """An fx pass: its default postcondition is that the graph lints."""

    def check(self, gm: fx.GraphModule) -> None:
        try:
            gm.graph.lint()
        except Exception as exc:  # lint raises RuntimeError and friends
            raise PassError(f"{self.name}: graph does not lint: {exc}") from exc

    def finish(self, gm: fx.GraphModule) -> None:
        gm.recompile()


class PassManager(Generic[G]):
    """Runs passes in order; each pass's postcondition is checked right after it runs."""

    def __init__(self, passes: Sequence[GraphPass[G]]) -> None:
        self.passes = list(passes)

    def run(self, graph: G) -> PassResult[G]:
        modified = False
        for p in self.passes:
            result = p.call(graph)
            p.check(result.graph)
            graph = result.graph
            modified = modified or result.modified
        if modified and self.passes:
            self.passes[-1].finish(graph)
        return PassResult(graph, modified)
