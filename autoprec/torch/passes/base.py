"""The torch.fx side of the pass framework: the fx :class:`Pass` (its postcondition: the graph lints)
and the node-meta keys the fx passes read and write (:mod:`autoprec.core.passes` is the framework)."""

from __future__ import annotations

import torch.fx as fx

from autoprec.core.passes import GraphPass, PassError


#: compute format of a node (a Precision): a layer's plan format, a FOLLOW op's inherited one, ...
FORMAT = "autoprec_format"
#: format of the value a node produces: a layer's ``fmt.compute_output`` (fp8 layers write bf16)
VALUE_FORMAT = "autoprec_value_format"
#: True on a 16-bit FOLLOW op whose result the plan rounds (the lowering's ``rounds``)
ROUNDS = "autoprec_rounds"
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


class Pass(GraphPass[fx.GraphModule]):
    """An fx pass: its default precondition is the node metadata it reads, its default postcondition
    that the graph lints."""

    #: node.meta keys every node must carry before the pass runs (what an earlier pass wrote)
    needs: tuple[str, ...] = ()

    def requires(self, gm: fx.GraphModule) -> None:
        for node in gm.graph.nodes:
            missing = [k for k in self.needs if k not in node.meta]
            if missing:
                raise PassError(f"{self.name}: node {node.name} has no {', '.join(missing)}: run the passes "
                                "that write it first")

    def ensures(self, gm: fx.GraphModule) -> None:
        try:
            gm.graph.lint()
        except Exception as exc:  # lint raises RuntimeError and friends
            raise PassError(f"{self.name}: graph does not lint: {exc}") from exc

    def finish(self, gm: fx.GraphModule) -> None:
        gm.recompile()
