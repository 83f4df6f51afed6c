"""The op graph: a torch-free, JSON-serialisable view of a captured model.

Capture (:mod:`autoprec.torch.capture`) builds it from a torch.fx graph; the ONNX analyser can build the
same structure from an ONNX graph. Profiling, the cost model and the search read only this.

Each node is an :class:`OpNode`. The decision units ("layers") are the nodes whose policy is
ALWAYS: linear, conv, matmul/bmm (attention's two matmuls included) and embedding lookups.
"""

from __future__ import annotations

import enum
import hashlib
import json
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Iterator

import networkx as nx

from autoprec.core.formats import Precision


class Policy(enum.Enum):
    """How an op takes part in mixed precision (DESIGN.md, numerical semantics)."""

    ALWAYS = "always"  # a compute layer or an embedding lookup: the search chooses its format
    FOLLOW = "follow"  # runs in the (widest) format of its floating inputs
    NEVER = "never"  # stays fp32 by default (softmax, norms, reductions, exp/log, losses)
    NONE = "none"  # placeholders, outputs, parameters: not an op


@dataclass(frozen=True)
class OpNode:
    """One op of the model, with what the cost model and the report need to know about it."""

    name: str  # stable: the fx node name (or ONNX node name)
    kind: str  # normalised op kind: "linear", "conv2d", "matmul", "relu", "add", "softmax", ...
    scope: str  # module path, e.g. "blocks.1.attn.q"; "" for the top level
    policy: Policy
    input_shapes: tuple[tuple[int, ...], ...] = ()
    output_shape: tuple[int, ...] = ()
    flops: int = 0  # multiply-adds count twice
    weight_elems: int = 0  # parameter elements the op reads (weights and bias)
    act_in_elems: int = 0  # floating activation elements read
    act_out_elems: int = 0  # elements written
    weight: str | None = None  # parameter name of the weight, for layers that have one
    #: whether the op hands on a floating value (a tensor, or a tuple holding one): what a FOLLOW
    #: op's format follows and what a reader in another format casts (:mod:`autoprec.core.lowering`).
    #: None: every op with a policy does, and any other node that writes floating elements
    float_out: bool | None = None

    def __post_init__(self) -> None:
        if self.float_out is None:
            object.__setattr__(self, "float_out", self.policy is not Policy.NONE or self.act_out_elems > 0)

    @property
    def is_layer(self) -> bool:
        return self.policy is Policy.ALWAYS

    @property
    def weight_bytes(self) -> int:
        """fp32 bytes of the parameters (the master weights)."""
        return 4 * self.weight_elems

    @property
    def act_bytes(self) -> int:
        """fp32 bytes of activations read and written."""
        return 4 * (self.act_in_elems + self.act_out_elems)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["policy"] = self.policy.value
        d["input_shapes"] = [list(s) for s in self.input_shapes]
        d["output_shape"] = list(self.output_shape)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "OpNode":
        d = dict(d)
        d["policy"] = Policy(d["policy"])
        d["input_shapes"] = tuple(tuple(s) for s in d.get("input_shapes", ()))
        d["output_shape"] = tuple(d.get("output_shape", ()))
        return cls(**d)


@dataclass
class OpGraph:
    """Ops in execution order plus data-flow edges (producer -> consumer, with element counts).

    ``ties`` lists groups of layers that must share one format (e.g. the q/k/v projections of one
    attention, which read the same input and feed the same product). ``io`` is the format of the
    deployed graph's floating inputs and outputs (:meth:`with_io`): fp32, or fp16 for a serving
    stack that holds its tensors in fp16.
    """

    nodes: list[OpNode]
    edges: list[tuple[str, str]]
    model_name: str = ""
    ties: list[list[str]] = field(default_factory=list)
    batch: int = 0  # batch size of the example inputs the counts were taken at (0: unknown)
    io: Precision = Precision.FP32  # format of the floating graph inputs and outputs
    graph: nx.DiGraph = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        g = nx.DiGraph()
        for n in self.nodes:
            g.add_node(n.name, op=n)
        for u, v in self.edges:
            g.add_edge(u, v)
        self.graph = g
        self._by_name = {n.name: n for n in self.nodes}

    # --- queries ---------------------------------------------------------------------------
    def __getitem__(self, name: str) -> OpNode:
        return self._by_name[name]

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def __iter__(self) -> Iterator[OpNode]:
        return iter(self.nodes)

    def layers(self) -> list[OpNode]:
        """The decision units, in execution order."""
        return [n for n in self.nodes if n.is_layer]

    def layer_names(self) -> list[str]:
        return [n.name for n in self.layers()]

    def storing_layers(self) -> list[OpNode]:
        """The layers that store their weight: all but the later readers of a tensor an earlier
        layer already reads (a head tied to its embedding), so a tied weight is counted once."""
        seen: set[str] = set()
        out = []
        for n in self.layers():
            if n.weight is not None and n.weight in seen:
                continue
            if n.weight is not None:
                seen.add(n.weight)
            out.append(n)
        return out

    def predecessors(self, name: str) -> list[str]:
        return list(self.graph.predecessors(name))

    def successors(self, name: str) -> list[str]:
        return list(self.graph.successors(name))

    def downstream(self, name: str) -> set[str]:
        """Every node whose value depends on ``name`` (not including ``name``)."""
        return nx.descendants(self.graph, name)

    def at_batch(self, batch: int) -> "OpGraph":
        """The same graph with FLOPs and activation sizes counted for ``batch`` samples.

        Everything that depends on a graph input's values scales linearly with the batch; weights
        and constants (ops fed only by parameters and buffers) do not, nor does what depends on an
        input only through a shape query (``pos_emb(arange(x.size(1)))`` has as many rows at any
        batch). Shapes stay as captured, so the fingerprint is unchanged. The cost model prices a
        deployment batch, not the example's.
        """
        if batch <= 0 or not self.batch:
            raise ValueError("at_batch needs a positive batch and a graph that knows its example batch")
        f = batch / self.batch
        live = {n.name for n in self.nodes if n.kind == "placeholder"}
        todo = list(live)
        while todo:
            u = todo.pop()
            if self._by_name[u].kind == "size":
                continue  # a shape query: its consumers see the input's shape, not its values
            for v in self.graph.successors(u):
                if v not in live:
                    live.add(v)
                    todo.append(v)
        scaled = [replace(n, flops=round(n.flops * f), act_in_elems=round(n.act_in_elems * f),
                          act_out_elems=round(n.act_out_elems * f)) if n.name in live else n
                  for n in self.nodes]
        return OpGraph(scaled, list(self.edges), self.model_name, [list(t) for t in self.ties], batch, self.io)

    def with_io(self, io: Precision) -> "OpGraph":
        """The same graph deployed with floating inputs and outputs in ``io``: the lowering then
        rounds each input to it and hands each output on in it (no fp32 copy of a 16-bit result)."""
        if io is self.io:
            return self
        return OpGraph(list(self.nodes), list(self.edges), self.model_name, [list(t) for t in self.ties], self.batch, io)

    def total_flops(self) -> int:
        return sum(n.flops for n in self.nodes)

    def fingerprint(self) -> str:
        """Hash of the layers (names, kinds, shapes): plans record it to detect a different model."""
        h = hashlib.sha256()
        for n in self.layers():
            h.update(f"{n.name}|{n.kind}|{n.input_shapes}|{n.output_shape};".encode())
        return h.hexdigest()[:16]

    # --- serialisation ---------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "model_name": self.model_name,
            "nodes": [n.to_dict() for n in self.nodes],
            "edges": [list(e) for e in self.edges],
            "ties": [list(t) for t in self.ties],
            "batch": self.batch,
            "io": self.io.value,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "OpGraph":
        return cls(
            nodes=[OpNode.from_dict(n) for n in d["nodes"]],
            edges=[(u, v) for u, v in d["edges"]],
            model_name=d.get("model_name", ""),
            ties=[list(t) for t in d.get("ties", [])],
            batch=int(d.get("batch", 0)),
            io=Precision(d.get("io", Precision.FP32.value)),
        )

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, indent=1)

    @classmethod
    def from_json(cls, text: str) -> "OpGraph":
        return cls.from_dict(json.loads(text))
