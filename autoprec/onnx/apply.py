"""The plan applied to an ONNX graph: the pass sequence for .onnx inputs, and the metadata a tuned file records.

:func:`apply_plan_analysed` runs the ONNX passes on a model given as an .onnx file (MapNodes, then
the same AssignFormats, SplitBias, LowerWeights, InsertCasts and KeepRoundings as a torch model's
export, :func:`autoprec.deploy.export.apply_plan_onnx`); :func:`run_plan_passes`, shared by both,
runs a sequence on a copy, records the plan in the model's metadata (``autoprec.*`` keys: mode,
assignment, fp8 amax, model, fingerprint, provider) and checks the result with the full ONNX checker;
:func:`recorded_plan` reads it back; :func:`set_io_format` gives a written graph 16-bit inputs and outputs.
Imports no torch.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

import onnx

from autoprec.core.errors import UsageError
from autoprec.core.formats import Precision, parse_precision
from autoprec.core.opgraph import OpGraph
from autoprec.core.plan import PrecisionPlan
from autoprec.core.passes import PassManager
from autoprec.ort.providers import parse_provider
from autoprec.onnx.graph import OnnxAnalysis
from autoprec.onnx.passes.assign_formats import AssignFormats
from autoprec.onnx.passes.base import (FORMAT, INSERTED, LAYER, MODEL_ACT_AMAX, MODEL_ASSIGNMENT, MODEL_FINGERPRINT,
                                       MODEL_IO, MODEL_MODE, MODEL_NAME, MODEL_PROVIDER, REASON, ROLE, ROLE_CORE, OnnxPass,
                                       checkable, compacted, drop_meta, get_meta, infer_types, model_meta, set_model_meta)
from autoprec.onnx.passes.insert_casts import InsertCasts
from autoprec.onnx.passes.io_format import IO_FORMATS, IOFormat
from autoprec.onnx.passes.keep_roundings import KeepRoundings
from autoprec.onnx.passes.lower_weights import MODES, LowerWeights
from autoprec.onnx.passes.map_nodes import MapNodes
from autoprec.onnx.passes.split_bias import SplitBias

FP32 = Precision.FP32

#: node metadata a written file keeps by default: the layer a node computes, its format (where not
#: fp32), what a pass inserted, and the reason for each layer's format. The exporter's stack traces
#: and scopes, its graph-level notes (torch.export's graph signature, which names parameters the
#: passes replaced), the passes' working notes and the inferred value_info go: on the zoo's small
#: models they weigh as much as a tenth of an fp8 model (``keep_metadata=True`` keeps them).
COMPACT_METADATA = (LAYER, FORMAT, INSERTED, REASON)


def analysed_passes(analysis: OnnxAnalysis, assignment: Mapping[str, Precision],
                    act_amax: Mapping[str, tuple[float, ...]] | None = None, mode: str = "deploy",
                    provider: str | None = None) -> list[OnnxPass]:
    """The ONNX pass sequence for a model given as an .onnx file (see :func:`apply_plan_analysed`)."""
    if mode not in MODES:
        raise UsageError(f"unknown ONNX mode {mode!r}: use 'deploy' (16-bit tensors, fp8 Q/DQ) or 'emulate'")
    return [MapNodes(analysis), AssignFormats(analysis.graph, assignment, act_amax), SplitBias(),
            LowerWeights(mode, provider), InsertCasts(frozenset(), mode, provider), KeepRoundings()]


def apply_plan_analysed(analysis: OnnxAnalysis, assignment: Mapping[str, Precision | str],
                        act_amax: Mapping[str, tuple[float, ...]] | None = None, mode: str = "deploy",
                        keep_metadata: bool = False, provider: str | None = None) -> onnx.ModelProto:
    """The analysed ONNX model (:func:`autoprec.onnx.graph.analyse_onnx`) running ``assignment``.

    The same passes as :func:`apply_plan_onnx` after MapNodes in place of MapLayers: the plan's
    layers are the analyser's node names. Every one-element initializer counts as a constant from
    the model's code (it does not make a 16-bit op fp32), as there are no torch parameters to tell.
    """
    plan = {name: parse_precision(p) for name, p in assignment.items()}
    return run_plan_passes(analysis.model, analysed_passes(analysis, plan, act_amax, mode, provider), analysis.graph,
                           plan, act_amax, mode, keep_metadata, provider)


def run_plan_passes(fp32_model: onnx.ModelProto, passes: list[OnnxPass], graph: OpGraph,
                    plan: Mapping[str, Precision], act_amax: Mapping[str, tuple[float, ...]] | None, mode: str,
                    keep_metadata: bool, provider: str | None = None) -> onnx.ModelProto:
    """Run ``passes`` on a copy of ``fp32_model``, record the plan (and the provider a deployment
    graph was written for) in the model's metadata and check the result with ``onnx.checker``
    (full_check)."""
    model = onnx.ModelProto()
    model.CopyFrom(fp32_model)
    model = PassManager(passes).run(model).graph
    if not keep_metadata:
        compact_metadata(model)
    used = {k: v for k, v in (act_amax or {}).items() if k in plan and plan[k].is_fp8}
    set_model_meta(model, MODEL_MODE, mode)
    set_model_meta(model, MODEL_ASSIGNMENT, json.dumps({k: v.value for k, v in sorted(plan.items())}, sort_keys=True))
    set_model_meta(model, MODEL_ACT_AMAX, json.dumps({k: [float(a) for a in v] for k, v in sorted(used.items())},
                                                     sort_keys=True))
    set_model_meta(model, MODEL_NAME, graph.model_name)
    set_model_meta(model, MODEL_FINGERPRINT, graph.fingerprint())
    if provider is not None and mode == "deploy":
        set_model_meta(model, MODEL_PROVIDER, parse_provider(provider))
    model = infer_types(model)
    onnx.checker.check_model(checkable(model), full_check=True)
    if not keep_metadata:
        del model.graph.value_info[:]
    return compacted(model)


def compact_metadata(model: onnx.ModelProto) -> None:
    """Keep only :data:`COMPACT_METADATA` on the nodes (formats only where not fp32 and not on a
    Cast, whose ``to`` says it; reasons only on the core node of each layer) and no graph-level
    metadata (autoprec's own is the model's)."""
    del model.graph.metadata_props[:]
    for n in model.graph.node:
        explain = get_meta(n, ROLE) == ROLE_CORE
        said = get_meta(n, FORMAT) in (None, FP32.value) or n.op_type == "Cast"
        drop = {p.key for p in n.metadata_props if p.key not in COMPACT_METADATA
                or (p.key == REASON and not explain) or (p.key == FORMAT and said)}
        if drop:
            drop_meta(n, drop)


def recorded_plan(model: onnx.ModelProto, source: str = "this ONNX file"
                  ) -> tuple[str, dict[str, Precision], dict[str, tuple[float, ...]]]:
    """(mode, assignment, fp8 amax) an autoprec export recorded in ``model``'s metadata (``source``
    names the file in errors)."""
    meta = model_meta(model)
    if MODEL_ASSIGNMENT not in meta:
        raise UsageError(f"{source} was not written by `autoprec export` (no autoprec.assignment metadata): "
                         "verify the file export or tune wrote")
    assignment = {k: Precision(v) for k, v in json.loads(meta[MODEL_ASSIGNMENT]).items()}
    amax = {k: tuple(float(a) for a in v) for k, v in json.loads(meta.get(MODEL_ACT_AMAX, "{}")).items()}
    return meta.get(MODEL_MODE, "deploy"), assignment, amax


def set_io_format(model: onnx.ModelProto, io: Precision | str) -> onnx.ModelProto:
    """A copy of ``model``, a graph written by this module, with its graph inputs and outputs in
    ``io`` (fp32, the default: ``model`` itself; fp16: :mod:`autoprec.onnx.passes.io_format`; an emulation
    graph rounds them to it instead), recorded in its metadata."""
    fmt = parse_precision(io)
    if fmt is FP32:
        return model
    if fmt not in IO_FORMATS:
        raise UsageError(f"graph inputs and outputs can be {' or '.join(f.value for f in IO_FORMATS)}, not {fmt}: "
                         "ONNX Runtime's Python API has no numpy type for bf16 or fp8")
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    model = PassManager([IOFormat(fmt, model_meta(copy).get(MODEL_MODE, "deploy"))]).run(copy).graph
    set_model_meta(model, MODEL_IO, fmt.value)
    del model.graph.value_info[:]
    onnx.checker.check_model(checkable(model), full_check=True)
    return model


def plan_io(plan: PrecisionPlan | str | os.PathLike[str] | Mapping[str, Any] | None,
            io: Precision | str | None) -> Precision:
    """The I/O format to write: ``io`` when given, else the one the plan was tuned for (``tune
    --io``; fp32 for a mapping, no plan, or a plan.json from before the field)."""
    if io is not None:
        return parse_precision(io)
    if isinstance(plan, PrecisionPlan):
        return plan.io
    if plan is None or isinstance(plan, Mapping):
        return FP32
    return PrecisionPlan.load(plan).io


def load_assignment(plan: PrecisionPlan | str | os.PathLike[str] | Mapping[str, Any] | None) -> dict[str, Precision]:
    """The layer -> format assignment of a plan given as a PrecisionPlan, a mapping or a plan.json
    path (None: no plan, every layer fp32)."""
    if plan is None:
        return {}
    if isinstance(plan, PrecisionPlan):
        return plan.assignment
    if isinstance(plan, Mapping):
        return {k: parse_precision(v) for k, v in plan.items()}
    return PrecisionPlan.load(plan).assignment
