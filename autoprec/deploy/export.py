"""Export a model and its precision plan to ONNX for ONNX Runtime.

    path = export_onnx("models/digits_cnn.py", "out/digits_cnn/plan.json", "out/digits_cnn/profile.json",
                       "digits_cnn.onnx")

1. :func:`torch_to_onnx` exports the fp32 model with the dynamo exporter (batch dimension dynamic,
   weights inside the file), without the exporter's rewrite rules, then folds constants, except
   embedding lookups: a lookup of constant positions (``pos_emb(arange(T))`` with T fixed by the
   example) would become an fp32 constant, out of reach of the plan. Inference batch norms are
   folded into the convolution before them by :mod:`autoprec.core.bn_fold`, the numerics the capture
   folds them with (the exporter's own fold is not that definition, so its rules stay off).
2. :func:`apply_plan_onnx` runs the ONNX passes (``autoprec/onnx/passes``) that apply the same plan as
   the torch passes, with the same decisions: MapLayers (plan layers -> ONNX nodes through the
   exporter's metadata), AssignFormats, LowerWeights (16-bit / fp8 initializers), InsertCasts.

A model given as an .onnx file takes the same passes after MapNodes in place of MapLayers
(:func:`apply_plan_analysed`, :func:`export_analysed`): its plan's layers are the ONNX analyser's
node names (:mod:`autoprec.onnx.graph`).

Two graphs come out of one plan (``mode``): ``"deploy"``, with real 16-bit tensors and fp8 Q/DQ,
for the CUDA / TensorRT providers; and ``"emulate"`` (``emulation=True``), which computes in fp32
with every rounding explicit, so that ONNX Runtime's CPU provider, which computes fp16 nodes in
fp32 without their rounding and has no bf16 kernels, reproduces the torch emulation's numbers.

The plan and calibration travel in the model's metadata (``autoprec.*`` keys), so
:mod:`autoprec.deploy.verify` can rebuild the emulation of a deployed file.

fp8 layers are written as QuantizeLinear/DequantizeLinear around a standard MatMul/Gemm/Conv/ConvTranspose (the
form TensorRT fuses into fp8 GEMMs), not as ``com.microsoft.GemmFloat8``: that kernel takes one
scale per tensor, and the plan's numerics use one scale per output channel for weights.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import onnx

from autoprec.onnx.rewrites.fold_batch_norms import FoldBatchNorms
from autoprec.onnx.rewrites.fold_constants import fold_splits
from autoprec.torch.attention import explicit_attention
from autoprec.torch.recurrent import explicit_recurrence
from autoprec.torch.bn_fold import foldable_norms
from autoprec.torch.capture import Captured, capture
from autoprec.core.errors import AutoprecError, PlanError, UsageError, first_line
from autoprec.core.formats import Precision, parse_precision
from autoprec.core.io import atomic_write_bytes
from autoprec.core.kinds import aten_kind
from autoprec.core.opgraph import OpGraph
from autoprec.core.plan import PrecisionPlan
from autoprec.core.resources import release_memory
from autoprec.torch.semantics import needs_act_amax
from autoprec.core.sensitivity import SensitivityProfile
from autoprec.torch.spec import ModelSpec, load_model_spec
from autoprec.onnx.passes.assign_formats import AssignFormats, param_names
from autoprec.onnx.apply import load_assignment, plan_io, run_plan_passes, set_io_format
from autoprec.onnx.passes.base import OnnxPass, infer_types
from autoprec.onnx.passes.insert_casts import InsertCasts
from autoprec.onnx.passes.keep_roundings import KeepRoundings
from autoprec.onnx.passes.lower_weights import MODES, LowerWeights
from autoprec.onnx.passes.map_layers import CLASS_HIERARCHY, MapLayers, literal_list
from autoprec.onnx.passes.split_bias import SplitBias

if TYPE_CHECKING:
    import onnx_ir

log = logging.getLogger(__name__)

#: opset 21: fp8 QuantizeLinear/DequantizeLinear with per-axis scales and the saturate attribute
DEFAULT_OPSET = 21
MIN_OPSET = 19


FP32 = Precision.FP32


class ExportError(AutoprecError):
    """The torch model could not be exported to ONNX."""


# --- fp32 export ---------------------------------------------------------------------------------


@contextlib.contextmanager
def _quiet_exporter():
    """Silence the exporter's progress lines (stdout), its warnings and its registry log lines;
    yield the captured text so a failure can show it."""
    buf = io.StringIO()
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.onnx._internal.exporter._registration",
                                              "onnxscript", "torch.export", "torch._export")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(buf), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield buf
    finally:
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)


def _batch_dims(example_inputs: tuple[Any, ...]) -> tuple[Any, ...]:
    import torch

    return tuple({0: "batch"} if isinstance(x, torch.Tensor) and x.dim() > 0 else None for x in example_inputs)


def _at_least_batch_2(example_inputs: tuple[Any, ...]) -> tuple[Any, ...]:
    """torch.export specialises a dimension of size 1; a batch of 2 keeps it symbolic."""
    import torch

    out = []
    for x in example_inputs:
        if isinstance(x, torch.Tensor) and x.dim() > 0 and x.shape[0] < 2:
            x = torch.cat([x] * 2, dim=0)
        out.append(x)
    return tuple(out)


def _keep_lookups(node: onnx_ir.Node) -> bool | None:
    """Constant folding's veto: an embedding lookup stays a Gather, because it is a plan layer;
    every other node folds by the folder's default rules (None)."""
    classes = literal_list(node.metadata_props.get(CLASS_HIERARCHY))
    return False if node.op_type == "Gather" and classes and aten_kind(classes[-1]) == "embedding" else None


def torch_to_onnx(model: Any, example_inputs: tuple[Any, ...], opset: int = DEFAULT_OPSET) -> onnx.ModelProto:
    """The fp32 model as ONNX: dynamo exporter, dynamic batch, constants folded, inference batch
    norms folded into their convolutions as :func:`autoprec.torch.capture.capture` folds them, nothing
    else fused. Attention and ``nn.LSTM``/``nn.GRU`` are exported as their products, as the capture
    traces them (:mod:`autoprec.torch.attention`, :mod:`autoprec.torch.recurrent`)."""
    import torch
    from onnx_ir.passes.common import LiftConstantsToInitializersPass, RemoveUnusedNodesPass
    from onnxscript import ir
    from onnxscript.optimizer import fold_constants_ir

    if opset < MIN_OPSET:
        raise UsageError(f"opset {opset} has no fp8 QuantizeLinear; use {MIN_OPSET} or later (default {DEFAULT_OPSET})")
    args = _at_least_batch_2(tuple(example_inputs))
    model = model.eval()
    with _quiet_exporter() as out:
        try:
            # attention's and recurrent layers' products as the capture has them
            with torch.no_grad(), explicit_attention(), explicit_recurrence():
                program = torch.onnx.export(model, args, dynamo=True, external_data=False, optimize=False,
                                            opset_version=opset, dynamic_shapes=_batch_dims(args))
        except Exception as exc:  # the exporter raises many types
            tail = " | ".join(out.getvalue().strip().splitlines()[-3:])
            raise ExportError(f"torch.onnx.export failed: {type(exc).__name__}: {first_line(exc)}"
                              + (f" ({tail})" if tail else "")) from exc
        if program is None:
            raise ExportError("torch.onnx.export returned no program")
        ir_model = program.model
        fold_constants_ir(ir_model, should_fold=_keep_lookups)
        fold_splits(ir_model.graph)  # then fold what reads the parts (a Transpose)
        fold_constants_ir(ir_model, should_fold=_keep_lookups)
        RemoveUnusedNodesPass()(ir_model)
        LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(ir_model)
        RemoveUnusedNodesPass()(ir_model)
        FoldBatchNorms()(ir_model)  # as capture folds them: the same weights, bit for bit
        proto = ir.serde.serialize_model(ir_model)
        del program, ir_model
    release_memory()  # the exporter's graphs and the constants it folded, before a plan is built from it
    return infer_types(proto)


# --- the plan on ONNX ----------------------------------------------------------------------------


def onnx_passes(captured: Captured, assignment: Mapping[str, Precision],
                act_amax: Mapping[str, tuple[float, ...]] | None = None, mode: str = "deploy",
                provider: str | None = None) -> list[OnnxPass]:
    """The ONNX pass sequence :func:`apply_plan_onnx` runs."""
    if mode not in MODES:
        raise UsageError(f"unknown ONNX mode {mode!r}: use 'deploy' (16-bit tensors, fp8 Q/DQ) or 'emulate'")
    return [MapLayers(captured, assignment), AssignFormats(captured.graph, assignment, act_amax, param_names(captured)),
            SplitBias(), LowerWeights(mode, provider), InsertCasts(param_names(captured), mode, provider),
            KeepRoundings()]


def apply_plan_onnx(fp32_model: onnx.ModelProto, captured: Captured, assignment: Mapping[str, Precision | str],
                    act_amax: Mapping[str, tuple[float, ...]] | None = None, mode: str = "deploy",
                    keep_metadata: bool = False, provider: str | None = None) -> onnx.ModelProto:
    """A copy of ``fp32_model`` (from :func:`torch_to_onnx` of the captured model) running ``assignment``.

    ``captured``: the same model, captured (plan layer names and weights come from it).
    ``keep_metadata``: keep every node's metadata (the exporter's stack traces and scopes, the
    passes' groups, kinds and policies); by default only :data:`COMPACT_METADATA` stays.
    The result passes ``onnx.checker.check_model(full_check=True)``.
    """
    if not captured.folds_norms:
        kept = foldable_norms(captured.gm)
        if kept:
            names = ", ".join(kept[:3]) + (", ..." if len(kept) > 3 else "")
            raise UsageError(f"this capture kept its batch norms ({names}; capture(..., fold_norms=False) is for "
                             "training), and the ONNX export folds them into their convolutions: export from a "
                             "capture with fold_norms=True")
    plan = {name: parse_precision(p) for name, p in assignment.items()}
    return run_plan_passes(fp32_model, onnx_passes(captured, plan, act_amax, mode, provider), captured.graph, plan,
                           act_amax, mode, keep_metadata, provider)


# --- files ---------------------------------------------------------------------------------------


def _load_amax(profile: SensitivityProfile | str | os.PathLike[str] | Mapping[str, Any] | None,
               graph: OpGraph) -> dict[str, tuple[float, ...]] | None:
    """The calibrated activation amax of each layer of ``graph``, from a profile made for it."""
    from autoprec.torch.passes import act_amax_from_profile

    if profile is None:
        return None
    if isinstance(profile, Mapping):
        return {k: tuple(float(a) for a in v) for k, v in profile.items()}
    if not isinstance(profile, SensitivityProfile):
        profile = SensitivityProfile.load(profile)  # a one-line error naming the file and the field
    profile.check_against(graph)
    return act_amax_from_profile(profile)


def build_onnx(spec_or_model_file: ModelSpec | str | os.PathLike[str],
               plan: PrecisionPlan | str | os.PathLike[str] | Mapping[str, Any] | None,
               profile: SensitivityProfile | str | os.PathLike[str] | Mapping[str, Any] | None = None,
               opset: int = DEFAULT_OPSET, mode: str = "deploy",
               provider: str | None = None) -> tuple[onnx.ModelProto, Captured]:
    """The model file's model with ``plan`` applied, as an in-memory ONNX model (and its capture).

    ``plan``: a PrecisionPlan, a plan.json path or a {layer: format} mapping (None: all fp32).
    ``profile``: a SensitivityProfile, a profile.json path or a {layer: (amax, ...)} mapping; it is
    needed when the plan has fp8 layers (their static activation scales come from its calibration).
    ``provider``: the ONNX Runtime provider a deployment graph is for: a node it has no kernel for
    in its group's 16-bit format computes in fp32 between the casts (None: ONNX's schemas decide).
    """
    spec = spec_or_model_file if isinstance(spec_or_model_file, ModelSpec) else load_model_spec(spec_or_model_file)
    module = spec.model()
    example = spec.example_inputs()
    captured = capture(module, example, name=spec.name)
    if isinstance(plan, (str, os.PathLike)):
        plan = PrecisionPlan.load(plan)
    if isinstance(plan, PrecisionPlan):
        plan.check_against(captured.graph)  # same layers, kinds and shapes as the model it was made for
    assignment = load_assignment(plan)
    amax = _load_amax(profile, captured.graph)
    fp8 = sorted(k for k, f in assignment.items() if k in captured.graph and needs_act_amax(captured.graph[k].kind, f))
    if fp8 and amax is None:
        raise PlanError(f"the plan runs {', '.join(fp8)} in fp8: give the profile.json of the tune run "
                        "(--profile) for their calibrated activation scales")
    fp32 = torch_to_onnx(module, example, opset)
    return apply_plan_onnx(fp32, captured, assignment, amax, mode, provider=provider), captured


def export_onnx(spec_or_model_file: ModelSpec | str | os.PathLike[str],
                plan: PrecisionPlan | str | os.PathLike[str] | Mapping[str, Any] | None,
                profile: SensitivityProfile | str | os.PathLike[str] | Mapping[str, Any] | None,
                out_path: str | os.PathLike[str], opset: int = DEFAULT_OPSET, emulation: bool = False,
                io: Precision | str | None = None, provider: str | None = None) -> Path:
    """Export the model file's model with ``plan`` applied to ``out_path`` (written atomically).

    ``emulation=False`` writes the deployment graph (16-bit tensors, fp8 Q/DQ) for CUDA / TensorRT;
    ``emulation=True`` the fp32 graph with explicit rounding that ORT's CPU provider runs faithfully.
    ``io``: the format of the deployment graph's inputs and outputs (:func:`set_io_format`); default:
    the plan's (``tune --io``), fp32 for a plan without one.
    ``provider``: the provider the deployment graph is for (:func:`build_onnx`).
    """
    model, _ = build_onnx(spec_or_model_file, plan, profile, opset, "emulate" if emulation else "deploy", provider)
    return atomic_write_bytes(Path(out_path), set_io_format(model, plan_io(plan, io)).SerializeToString())


def export_analysed(onnx_file: str | os.PathLike[str], data: str | os.PathLike[str] | Mapping[str, Any],
                    plan: PrecisionPlan | str | os.PathLike[str],
                    profile: SensitivityProfile | str | os.PathLike[str] | Mapping[str, Any] | None,
                    out_path: str | os.PathLike[str], emulation: bool = False, io: Precision | str | None = None,
                    provider: str | None = None) -> Path:
    """:func:`export_onnx` for a model given as an .onnx file: apply a plan `autoprec tune` made
    for it. ``data`` (its inputs, as for tuning) sizes the symbolic dimensions the plan was made at."""
    from autoprec.onnx.model import OnnxModel

    om = OnnxModel.load(onnx_file, data)
    plan = plan if isinstance(plan, PrecisionPlan) else PrecisionPlan.load(plan)
    plan.check_against(om.analysis.graph)
    graph = om.analysis.graph
    amax = _load_amax(profile, graph)
    if any(needs_act_amax(graph[k].kind, f) for k, f in plan.assignment.items()) and amax is None:
        raise PlanError("the plan has fp8 layers: give the profile.json of the tune run (--profile) for their "
                        "calibrated activation scales")
    model = om.build(plan.assignment, amax, "emulate" if emulation else "deploy", provider)
    return atomic_write_bytes(Path(out_path), set_io_format(model, plan_io(plan, io)).SerializeToString())

