"""The pass framework shared by the torch.fx and the ONNX rewrites (torch-free).

A pass is an object with ``call(graph) -> PassResult(graph, modified)``, a precondition
``requires(graph)`` (what it needs to find: the metadata an earlier pass wrote) and a postcondition
``ensures(graph)`` (the graph is valid -- fx lint, the ONNX checker -- and whatever the pass
promises holds), in the manner of onnx_ir's passes. :class:`PassManager` runs a sequence, checking
each pass's precondition right before it and its postcondition right after, and calls the last
pass's ``finish`` once at the end when any pass changed the graph (fx passes recompile the module
there; ONNX passes need nothing). A broken condition is a :class:`PassError`: a bug in autoprec,
never the user's model or plan.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Generic, Sequence, TypeVar

G = TypeVar("G")  # the graph a pass rewrites: fx.GraphModule or onnx.ModelProto


class PassError(RuntimeError):
    """A pass broke its own pre- or postcondition: a bug in autoprec, not in the user's model or plan."""


@dataclass
class PassResult(Generic[G]):
    graph: G
    modified: bool


class GraphPass(Generic[G]):
    """Base class: subclasses implement :meth:`call` and extend :meth:`requires` / :meth:`ensures`."""

    @property
    def name(self) -> str:
        return type(self).__name__

    def call(self, graph: G) -> PassResult[G]:
        raise NotImplementedError

    def requires(self, graph: G) -> None:
        """Precondition, checked before :meth:`call`. Raise a :class:`PassError` on failure."""

    def ensures(self, graph: G) -> None:
        """Postcondition, checked after :meth:`call`. Raise a :class:`PassError` on failure."""

    def finish(self, graph: G) -> None:
        """Run once after a sequence of passes of this kind changed ``graph``."""

    def __call__(self, graph: G) -> PassResult[G]:
        return self.call(graph)


class PassManager(Generic[G]):
    """Runs passes in order, each between its precondition and its postcondition."""

    def __init__(self, passes: Sequence[GraphPass[G]]) -> None:
        self.passes = list(passes)

    def run(self, graph: G) -> PassResult[G]:
        modified = False
        for p in self.passes:
            p.requires(graph)
            result = p.call(graph)
            p.ensures(result.graph)
            graph = result.graph
            modified = modified or result.modified
        if modified and self.passes:
            self.passes[-1].finish(graph)
        return PassResult(graph, modified)
