"""Provider pricing: a cost model wrapped to price the graph an ONNX Runtime execution provider really runs."""

from __future__ import annotations

from autoprec.core.formats import Precision
from autoprec.core.kinds import BIAS_KINDS
from autoprec.core.opgraph import OpNode, Policy
from autoprec.cost.model import CostModel
from autoprec.ort.providers import TENSORRT, compute_format, follow_format, parse_provider


class ProviderCostModel(CostModel):
    """``base`` priced as an ONNX Runtime execution provider runs the deployed graph: each layer at
    the format it computes in there (:func:`autoprec.ort.providers.compute_format`). On the CPU and
    CUDA providers an fp8 layer is an fp32 op on dequantized operands whose fp8 weight ONNX Runtime
    dequantizes once, at session start: it costs what the fp32 layer costs, and its quantize casts
    come on top, so the search keeps fp8 for providers that fuse it into an fp8 kernel (TensorRT).
    A FOLLOW op without a kernel in its format there costs fp32 plus two casts
    (:func:`autoprec.ort.providers.follow_format`). A layer's bias that the deployed graph adds in an
    Add of its own, outside the product's kernel, costs that Add (:func:`separate_bias_add`); TensorRT
    fuses every bias. Casts and fixed ops are ``base``'s.
    """

    def __init__(self, base: CostModel, provider: str) -> None:
        self.base = base
        self.provider = parse_provider(provider)
        self._follow: dict[tuple[str, Precision], Precision] = {}  # (kind, format) -> the format it runs in
        self.name = base.name
        self.objective = base.objective

    def __repr__(self) -> str:
        return f"ProviderCostModel({self.base!r}, {self.provider!r})"

    def supports(self, fmt: Precision) -> bool:
        return self.base.supports(fmt)

    def layer_cost(self, op: OpNode, fmt: Precision) -> float:
        runs = compute_format(fmt, self.provider)
        cost = self.base.layer_cost(op, runs)
        add = separate_bias_add(op, runs) if self.provider != TENSORRT else None
        return cost if add is None else cost + self.base.follow_cost(add, runs)

    def compute_note(self, fmt: Precision) -> str | None:
        runs = compute_format(fmt, self.provider)
        if runs is fmt:
            return self.base.compute_note(fmt)
        return f"{self.provider} computes it in {runs} between QuantizeLinear/DequantizeLinear"

    def cast_cost(self, elems: int, src: Precision, dst: Precision) -> float:
        return self.base.cast_cost(elems, src, dst)

    def follow_cost(self, op: OpNode, fmt: Precision) -> float:
        """A FOLLOW op the provider has no kernel for in ``fmt`` (a bf16 Gelu on CUDA) runs in fp32
        between a cast of its input and a cast of its result, as the deployment graph has it."""
        key = (op.kind, fmt)
        if key not in self._follow:
            self._follow[key] = follow_format(op.kind, fmt, self.provider)
        runs = self._follow[key]
        if runs is fmt:
            return self.base.follow_cost(op, fmt)
        return (self.base.follow_cost(op, runs) + self.base.cast_cost(op.act_in_elems, fmt, runs)
                + self.base.cast_cost(op.act_out_elems, runs, fmt))

    def fixed_cost(self, op: OpNode) -> float:
        return self.base.fixed_cost(op)


def separate_bias_add(op: OpNode, runs: Precision) -> OpNode | None:
    """The Add that adds layer ``op``'s bias after its product in the deployed graph, when it is a
    node of its own, for a layer computing in ``runs``: a 16-bit layer's always (SplitBias: its
    product is rounded before the bias is added), and in any format a linear layer's on more than
    two dimensions (the exporter's MatMul + Add). None where the bias is fused into the Gemm/Conv
    (fp32, and fp8 layers computing in fp32) or the layer has none. A layer with a bias reads it as
    its third input (the capture's and the ONNX analyser's input shapes)."""
    if op.kind not in BIAS_KINDS or len(op.input_shapes) < 3:
        return None
    if not (runs.is_16bit or (op.kind == "linear" and len(op.output_shape) > 2)):
        return None
    return OpNode(f"{op.name}.bias", "add", op.scope, Policy.FOLLOW, input_shapes=(op.output_shape,),
                  output_shape=op.output_shape, act_in_elems=op.act_out_elems, act_out_elems=op.act_out_elems)
