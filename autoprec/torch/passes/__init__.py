"""Rewrite passes that apply a precision plan to a model.

Torch side (``fx_*``): :func:`apply_plan` turns a captured model and a plan into an fx.GraphModule
that computes in the planned formats and still trains:

1. :class:`~autoprec.torch.passes.assign_formats.AssignFormats` decides every node's format first;
2. :class:`~autoprec.torch.passes.lower_layers.LowerLayers` points low-precision layers at
   :mod:`autoprec.torch.passes.ops` functions (weights rounded at use from the fp32 masters);
3. :class:`~autoprec.torch.passes.insert_casts.InsertCasts` adds one cast per (value, format) where a producer
   and a consumer disagree, and the 16-bit rounding of FOLLOW ops' results.
"""

from __future__ import annotations

import copy
import warnings
from typing import Mapping

import torch.fx as fx

from autoprec.torch.capture import Captured
from autoprec.core.errors import UsageError
from autoprec.core.formats import Precision, parse_precision
from autoprec.core.sensitivity import SensitivityProfile
from autoprec.core.passes import PassError, PassManager, PassResult
from autoprec.torch.passes.base import Pass
from autoprec.torch.passes.assign_formats import AssignFormats
from autoprec.torch.passes.insert_casts import InsertCasts
from autoprec.torch.passes.lower_layers import LowerLayers

MODES = ("emulate", "native")

__all__ = ["MODES", "Pass", "PassError", "PassManager", "PassResult", "act_amax_from_profile", "apply_plan",
           "plan_passes"]


def act_amax_from_profile(profile: SensitivityProfile) -> dict[str, tuple[float, ...]]:
    """The calibrated amax of each layer's activation inputs, as :func:`apply_plan` takes it."""
    return {name: tuple(float(s.amax) for s in r.inputs) for name, r in profile.ranges.items()}


def plan_passes(captured: Captured, assignment: Mapping[str, Precision],
                act_amax: Mapping[str, tuple[float, ...]] | None = None, mode: str = "emulate",
                dynamic_fp8: bool = False, io: Precision = Precision.FP32) -> list[Pass]:
    """The pass sequence :func:`apply_plan` runs (for callers who want to run or inspect it)."""
    if mode not in MODES:
        raise UsageError(f"unknown apply mode {mode!r}: use 'emulate' (fp32 tensors, exact rounding) or 'native'")
    native = mode == "native"
    graph = captured.graph.with_io(io)
    return [AssignFormats(graph, assignment, act_amax, dynamic_fp8), LowerLayers(native), InsertCasts(graph, native)]


def apply_plan(captured: Captured, assignment: Mapping[str, Precision | str],
               act_amax: Mapping[str, tuple[float, ...]] | None = None, mode: str = "emulate",
               dynamic_fp8: bool = False, share_weights: bool = False, io: Precision = Precision.FP32) -> fx.GraphModule:
    """A copy of ``captured.gm`` that runs each layer in its planned format.

    ``assignment`` maps layer node names to formats; layers it leaves out stay fp32, and names the
    model does not have raise :class:`~autoprec.core.errors.PlanError`. ``act_amax`` maps each fp8 layer
    to the calibrated amax of its activation inputs (:func:`act_amax_from_profile`); fp8 layers use
    these static scales, and a missing amax is a PlanError (no silent dynamic scaling).

    ``dynamic_fp8``: fp8 layers need no ``act_amax``: each activation is scaled by its own amax at
    run time, or by the training recipe while :mod:`autoprec.torch.training` trains the result.

    ``mode``: "emulate" keeps fp32 tensors and rounds exactly as :mod:`autoprec.torch.semantics` (the
    default; bit-exact to the profiler); "native" computes 16-bit ops on real bf16/fp16 tensors and
    fp8 linear layers with ``torch._scaled_mm`` where the device has it.

    The captured module is never modified. The result keeps the captured parameter names (fp32
    masters), runs on any batch size and trains.

    ``share_weights`` (emulate mode only): the result reads the captured module's own parameters and
    buffers instead of copies of them. For evaluating a plan (a tune's trials): a copy per trial
    would hold a second set of a large model's weights (0.5 GB for GPT-2 at 124M parameters).
    Training the result would then train the captured module.

    ``io``: the format of the deployed graph's floating inputs and outputs (``autoprec tune/export
    --io``): with fp16 each input is rounded to fp16 where the graph starts and each output is handed
    on in fp16, as the deployed file takes and returns them.
    """
    if share_weights and mode != "emulate":
        raise ValueError("share_weights is for emulate mode: native mode converts its copy's tensors")
    plan = {name: parse_precision(p) for name, p in assignment.items()}
    passes = plan_passes(captured, plan, act_amax, mode, dynamic_fp8, io)
    with warnings.catch_warnings():  # deep-copying torch.export modules warns about pytree specs
        warnings.simplefilter("ignore", FutureWarning)
        shared = [*captured.gm.parameters(), *captured.gm.buffers()] if share_weights else []
        gm = copy.deepcopy(captured.gm, {id(t): t for t in shared})
    result = PassManager(passes).run(gm)
    if not result.modified:
        result.graph.recompile()
    return result.graph
