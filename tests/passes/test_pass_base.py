"""The pass framework: sequencing, the modified flag, postconditions."""

from __future__ import annotations

import operator

import pytest
import torch
import torch.fx as fx

from autoprec.torch.passes import Pass, PassError, PassManager, PassResult


class _AddOne(Pass):
    """Appends "+ 1" to the graph output."""

    def call(self, gm: fx.GraphModule) -> PassResult:
        out = next(n for n in gm.graph.nodes if n.op == "output")
        with gm.graph.inserting_before(out):
            new = gm.graph.call_function(operator.add, (out.args[0], 1))
        out.args = (new,)
        return PassResult(gm, True)


class _Nothing(Pass):
    def call(self, gm: fx.GraphModule) -> PassResult:
        return PassResult(gm, False)


class _Broken(_Nothing):
    def ensures(self, gm: fx.GraphModule) -> None:
        super().ensures(gm)
        raise PassError(f"{self.name}: postcondition violated")


def _gm() -> fx.GraphModule:
    return fx.symbolic_trace(torch.nn.ReLU())


def test_passes_run_in_order_and_recompile() -> None:
    result = PassManager([_AddOne(), _Nothing(), _AddOne()]).run(_gm())
    assert result.modified
    assert torch.equal(result.graph(torch.tensor([-1.0, 2.0])), torch.tensor([2.0, 4.0]))
    assert [n.op for n in result.graph.graph.nodes] == ["placeholder", "call_function", "call_function",
                                                     "call_function", "output"]
    assert not PassManager([_Nothing()]).run(_gm()).modified


def test_postcondition_failure_stops_the_sequence() -> None:
    with pytest.raises(PassError, match="_Broken"):
        PassManager([_Broken(), _AddOne()]).run(_gm())


def test_a_pass_run_before_the_pass_that_writes_what_it_reads_fails_its_precondition() -> None:
    """requires(): InsertCasts reads AssignFormats' decisions; the ONNX AssignFormats reads MapLayers'
    groups. Run out of order, each stops with a PassError before touching the graph."""
    import onnx

    from autoprec.core.opgraph import OpGraph
    from autoprec.onnx.passes.assign_formats import AssignFormats as OnnxAssignFormats
    from autoprec.torch.passes.insert_casts import InsertCasts

    gm = fx.symbolic_trace(torch.nn.Sequential(torch.nn.Linear(2, 2)))
    with pytest.raises(PassError, match="InsertCasts: node .* has no autoprec_format"):
        PassManager([InsertCasts(OpGraph([], []))]).run(gm)
    model = onnx.helper.make_model(onnx.helper.make_graph(
        [onnx.helper.make_node("Relu", ["x"], ["y"], name="r")], "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])]))
    with pytest.raises(PassError, match="AssignFormats: node r has no autoprec.group"):
        PassManager([OnnxAssignFormats(OpGraph([], []), {})]).run(model)
