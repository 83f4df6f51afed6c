"""Tuning a model given only as an .onnx file: its data, its metric and its profile, on ONNX Runtime.

    model = OnnxModel.load("model.onnx", "inputs.npz", labels="labels.npy")
    prof = profile_onnx(model, formats)
    metric = model.metric()                       # accuracy / mse with labels, else fidelity
    value = metric.measure(model.build({"MatMul_0": Precision.FP16}, act_amax_from_profile(prof)))

Everything runs the graphs the ONNX passes write: a plan is applied to the analysed model
(:func:`autoprec.onnx.apply.apply_plan_analysed`) as an *emulation* graph, which computes in fp32 with
every rounding of DESIGN.md explicit (Cast round trips, fp8 Q/DQ) so that ONNX Runtime's CPU provider
computes exactly the plan's numerics (it would drop the rounding of fp16 nodes). The profile, the
search's verification and the final metric all measure such graphs, so the error of a trial is by
construction the error the tuned model has.

Data: an ``.npz`` file whose arrays are named after the model's inputs (or, written by
``np.savez(path, a, b)``, given in input order), all with the same number of samples on axis 0,
except the inputs the model declares as scalars (an If's condition), given once for every run.
Labels: an ``.npy``/``.npz`` file, or the name of an array in the data file that is not an input.
The first :data:`CALIBRATION_SAMPLES` samples calibrate (range statistics, fp8 scales) and profile;
the metric is measured on all of them.

Profiling is exact (ONNX Runtime has no backward pass for the fast estimate): one fp32 run records
every layer's input and output ranges, then each (layer, format) trial runs the graph with only that
layer lowered and measures the output error against fp32, and the layer's own output change.
"""

from __future__ import annotations

import math
import os
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper

from autoprec.core.errors import UsageError, first_line
from autoprec.core.formats import DEFAULT_CANDIDATES, Precision
from autoprec.core.metrics import Metric, fidelity_to, label_metric
from autoprec.onnx.graph import FLOAT_TYPES, OnnxAnalysis, analyse_onnx, graph_inputs, read_model
from autoprec.core.stats import NOT_FINITE, ErrorSum, Progress, RangeAccumulator, explain, measure_name, output_kind_of
from autoprec.onnx.apply import apply_plan_analysed
from autoprec.ort.runtime import open_session
from autoprec.core.kinds import act_arg_positions
from autoprec.core.sensitivity import LayerRanges, SensitivityProfile

#: samples that calibrate and profile (the metric uses all of them)
CALIBRATION_SAMPLES = 128
#: samples per ONNX Runtime call where the batch axis is free
RUN_BATCH = 256

Feeds = dict[str, np.ndarray]


def _read_arrays(path: Path, what: str) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise UsageError(f"no {what} file at {path}")
    try:
        loaded = np.load(path, allow_pickle=False)
        if isinstance(loaded, np.ndarray):
            return {"": loaded}
        with loaded:
            return {k: loaded[k] for k in loaded.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        # np.load calls any file that is neither a zip nor an .npy "pickled data": say what it is not
        why = "not an .npz (a zip of .npy arrays) or an .npy file" if "pickled" in str(exc) else first_line(exc)
        raise UsageError(f"cannot read {path} as numpy data: {why}; write it with np.savez or np.save") from None


def _input_dtype(vi: onnx.ValueInfoProto) -> np.dtype:
    return np.dtype(helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type))


def _match_inputs(arrays: dict[str, np.ndarray], inputs: Sequence[onnx.ValueInfoProto],
                  path: Path) -> tuple[Feeds, Feeds]:
    """The data arrays of each model input, by name, else (np.savez's arr_0, arr_1, ...) by order:
    (batched inputs, samples on axis 0; scalar inputs, e.g. an If's condition, the same for every run)."""
    names = [vi.name for vi in inputs]
    if list(arrays) == [""] and len(names) == 1:  # one .npy for a one-input model
        arrays = {names[0]: arrays[""]}
    if all(n in arrays for n in names):
        chosen = {n: arrays[n] for n in names}
    elif [k for k in arrays if k.startswith("arr_")] == [f"arr_{i}" for i in range(len(names))] \
            and not any(n in arrays for n in names):
        chosen = {n: arrays[f"arr_{i}"] for i, n in enumerate(names)}
    else:
        missing = [n for n in names if n not in arrays]
        raise UsageError(f"{path} has no array for model input(s) {', '.join(missing)} (it has "
                         f"{', '.join(sorted(arrays)) or 'none'}): name the arrays after the inputs, "
                         f"e.g. np.savez(path, **{{{names[0]!r}: x}})")
    feeds: Feeds = {}
    scalars: Feeds = {}
    for vi in inputs:
        a = chosen[vi.name]
        want = _input_dtype(vi)
        if a.dtype != want:
            # float64 -> float32 is a rounding a user expects; integers for a float input (or the
            # reverse) usually mean the wrong array: say so rather than convert silently
            if not np.can_cast(a.dtype, want, casting="same_kind") or (a.dtype.kind in "iub") != (want.kind in "iub"):
                raise UsageError(f"input {vi.name!r}: the data are {a.dtype}, the model takes {want}: save them as "
                                 f"{want} (e.g. x.astype(np.{want})) if that is what you mean")
            a = a.astype(want)
        rank = len(vi.type.tensor_type.shape.dim) if vi.type.tensor_type.HasField("shape") else a.ndim
        if rank == 0 and a.ndim == 0:
            scalars[vi.name] = a
            continue
        if a.ndim != rank or a.ndim == 0:
            raise UsageError(f"input {vi.name!r}: the data have shape {list(a.shape)}, the model takes rank {rank} "
                             "with the samples on axis 0")
        feeds[vi.name] = np.ascontiguousarray(a)
    if not feeds:
        raise UsageError("the model has no input with samples on axis 0: nothing to calibrate or measure on")
    sizes = {n: int(a.shape[0]) for n, a in feeds.items()}
    if len(set(sizes.values())) > 1:
        raise UsageError(f"the inputs in {path} hold different numbers of samples on axis 0: {sizes}")
    return feeds, scalars


def _fixed_batch(inputs: Sequence[onnx.ValueInfoProto]) -> int | None:
    """The batch size the model's inputs fix on axis 0, if they do."""
    fixed = {d.dim_value for vi in inputs if vi.type.tensor_type.HasField("shape")
             for d in vi.type.tensor_type.shape.dim[:1] if d.HasField("dim_value") and d.dim_value > 0}
    if len(fixed) > 1:
        raise UsageError(f"the model's inputs fix different batch sizes {sorted(fixed)} on axis 0")
    return fixed.pop() if fixed else None


def _batch_size(b: int | None, n: int) -> int:
    """Samples per run: the batch ``b`` the model fixes on axis 0, else :data:`RUN_BATCH`."""
    if b is None:
        return min(RUN_BATCH, n)
    if n % b:
        raise UsageError(f"the model takes batches of exactly {b} samples; the data hold {n}, not a multiple of {b}")
    return b


@dataclass
class OnnxModel:
    """An analysed ONNX model with its data: what the ONNX tune flow works on."""

    analysis: OnnxAnalysis
    feeds: Feeds  # every sample, by input name
    scalars: Feeds  # rank-0 inputs, the same in every run
    labels: np.ndarray | None
    batch: int  # samples per ONNX Runtime run
    fixed_batch: bool = False  # the model takes exactly ``batch`` samples per run
    providers: str = "cpu"  # where :meth:`run` runs graphs (emulation graphs need the CPU provider)

    @classmethod
    def load(cls, source: str | os.PathLike[str] | onnx.ModelProto, data: str | os.PathLike[str] | Mapping[str, Any],
             labels: str | os.PathLike[str] | np.ndarray | None = None) -> "OnnxModel":
        """Analyse ``source`` and read its data (a path to an .npz, or arrays by input name) and
        labels (a path, the name of an array in the data file, or an array)."""
        proto, label = read_model(source)
        inputs = graph_inputs(proto)
        if isinstance(data, Mapping):
            path, arrays = Path("<arrays>"), {k: np.asarray(v) for k, v in data.items()}
        else:
            path = Path(data)
            arrays = _read_arrays(path, "data")
        feeds, scalars = _match_inputs(arrays, inputs, path)
        n = next(iter(feeds.values())).shape[0]
        if n == 0:
            raise UsageError(f"{path} holds no samples")
        lab = _labels(labels, arrays, feeds, n)
        fixed = _fixed_batch(inputs)
        run_batch = _batch_size(fixed, n)
        # shapes at one sample (or the batch the model fixes): the op graph, and so the plan's
        # fingerprint, do not depend on how many samples the data hold
        one = fixed or 1
        analysis = analyse_onnx(proto, example={**{k: v[:one] for k, v in feeds.items()}, **scalars}, name=label)
        return cls(analysis, feeds, scalars, lab, run_batch, fixed is not None)

    # --- data -----------------------------------------------------------------------------------
    @property
    def samples(self) -> int:
        return next(iter(self.feeds.values())).shape[0]

    def batches(self, limit: int | None = None) -> list[Feeds]:
        """The data as runs of :attr:`batch` samples: the first ``limit`` samples (rounded up to
        whole batches where the model fixes its batch size)."""
        n = self.samples if limit is None else min(self.samples, limit)
        if self.fixed_batch and n % self.batch:
            n = min(self.samples, math.ceil(n / self.batch) * self.batch)
        return [{**{k: v[i:min(i + self.batch, n)] for k, v in self.feeds.items()}, **self.scalars}
                for i in range(0, n, self.batch)]

    def calibration(self) -> list[Feeds]:
        return self.batches(CALIBRATION_SAMPLES)

    # --- graphs and runs ------------------------------------------------------------------------
    def build(self, assignment: Mapping[str, Precision], act_amax: Mapping[str, tuple[float, ...]] | None = None,
              mode: str = "emulate", provider: str | None = None) -> onnx.ModelProto:
        """The model running ``assignment`` (emulate: what ORT's CPU provider runs faithfully;
        deploy: for ``provider``'s kernels, :func:`autoprec.deploy.export.build_onnx`)."""

        return apply_plan_analysed(self.analysis, assignment, act_amax, mode, provider=provider)

    def run(self, model: onnx.ModelProto, batches: Sequence[Feeds], extra: Sequence[str] = ()) -> list[list[np.ndarray]]:
        """Per batch: the model's first floating output, then the values named in ``extra``."""
        m = model
        if extra:
            m = onnx.ModelProto()
            m.CopyFrom(model)
            have = {o.name for o in m.graph.output}
            m.graph.output.extend(onnx.ValueInfoProto(name=e) for e in extra if e not in have)
        session = open_session(m.SerializeToString(), self.providers)
        out_name = self._first_float_output(model)
        names = [out_name, *extra]
        return [session.run(b, names) for b in batches]

    def time_reference(self, batches: Sequence[Feeds]) -> float:
        """Seconds of one fp32 run over ``batches`` on an open session (best of 3): the unit of
        a profile's cost."""
        session = open_session(self.analysis.model.SerializeToString(), "cpu").session
        best = math.inf
        for _ in range(3):
            t = time.perf_counter()
            for b in batches:
                session.run(None, b)
            best = min(best, time.perf_counter() - t)
        return best

    def outputs(self, model: onnx.ModelProto, batches: Sequence[Feeds] | None = None) -> list[np.ndarray]:
        """The first floating output of ``model`` on ``batches`` (default: all the data)."""
        return [np.asarray(r[0], dtype=np.float32) for r in self.run(model, self.batches() if batches is None else batches)]

    @staticmethod
    def _first_float_output(model: onnx.ModelProto) -> str:
        for o in model.graph.output:
            if o.type.tensor_type.elem_type in FLOAT_TYPES:
                return o.name
        hint = ""
        if any(n.op_type == "ZipMap" for n in model.graph.node):
            hint = (" (its probabilities go through a ZipMap into maps: convert it with skl2onnx's option "
                    "{'zipmap': False} to get them as a tensor)")
        raise UsageError(f"the model has no floating-point output: nothing to measure errors on{hint}")

    # --- the metric -----------------------------------------------------------------------------
    def metric(self) -> Metric:
        """Accuracy (integer labels) or mean squared error (float labels) on all the data; without
        labels, fidelity to the fp32 model (top-1 agreement for logits, else relative L2 error)."""
        batches = self.batches()

        def outputs_of(model: onnx.ModelProto) -> list[np.ndarray]:
            return self.outputs(model, batches)

        if self.labels is not None:
            labs = [np.ascontiguousarray(self.labels[i:i + self.batch]) for i in range(0, self.samples, self.batch)]
            return label_metric(labs, outputs_of)
        refs = outputs_of(self.analysis.model)
        return fidelity_to(refs, outputs_of, output_kind_of(refs[0], None))


def _labels(labels: str | os.PathLike[str] | np.ndarray | None, arrays: Mapping[str, np.ndarray], feeds: Feeds,
            n: int) -> np.ndarray | None:
    if labels is None:
        return None
    if isinstance(labels, np.ndarray):
        lab = labels
    elif str(labels) in arrays and str(labels) not in feeds:
        lab = arrays[str(labels)]
    else:
        if not Path(labels).is_file():
            raise UsageError(f"no labels file at {labels}, and the data file has no array of that name "
                             f"(it has {', '.join(sorted(arrays))})")
        found = _read_arrays(Path(labels), "labels")
        if len(found) != 1:
            raise UsageError(f"{labels} holds {len(found)} arrays ({', '.join(sorted(found))}); give a file with "
                             "one array of labels, or the name of the labels array in the data file")
        lab = next(iter(found.values()))
    if lab.ndim == 0 or lab.shape[0] != n:
        raise UsageError(f"the labels hold {lab.shape[0] if lab.ndim else 0} samples, the data {n}: give one "
                         "label per sample")
    if lab.dtype.kind not in "iubf":
        raise UsageError(f"labels of type {lab.dtype} are neither class indices nor values")
    return np.ascontiguousarray(lab.astype(np.int64) if lab.dtype.kind in "iub" else lab.astype(np.float32))


# --- profiling ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _LayerIO:
    """The ONNX values one layer reads as activations and writes as its (rounded) result."""

    name: str
    kind: str
    acts: tuple[str, ...]
    output: str
    weight: str | None


def _layer_io(model: OnnxModel) -> list[_LayerIO]:
    a = model.analysis
    nodes = {n.name: n for n in a.model.graph.node}
    members: dict[str, list[onnx.NodeProto]] = {}
    for n in a.model.graph.node:
        members.setdefault(a.groups[n.name], []).append(n)
    out = []
    for op in a.graph.layers():
        core = nodes[op.name]
        acts = tuple(core.input[p] for p in act_arg_positions(op.kind))
        inside = {i for m in members[op.name] for i in m.input}
        result = next(o for m in reversed(members[op.name]) for o in m.output if o and o not in inside)
        out.append(_LayerIO(op.name, op.kind, acts, result, op.weight))
    return out


def _weight_array(model: OnnxModel, name: str) -> np.ndarray:
    t = next(t for t in model.analysis.model.graph.initializer if t.name == name)
    return numpy_helper.to_array(t).astype(np.float32)


def profile_onnx(model: OnnxModel, formats: Iterable[Precision] = DEFAULT_CANDIDATES,
                 progress: Progress | None = None) -> SensitivityProfile:
    """Exact sensitivity of every layer in each of ``formats``, measured on ONNX Runtime (CPU) with
    emulation graphs over the calibration samples."""
    fmts = tuple(f for f in formats if f is not Precision.FP32)
    if not fmts:
        raise UsageError("no low-precision format to profile: give at least one of bf16, fp16, fp8")
    io = _layer_io(model)
    batches = model.calibration()
    t_ref = model.time_reference(batches)
    t0 = time.perf_counter()
    extra = list(dict.fromkeys(v for x in io for v in (*x.acts, x.output)))
    base = model.run(model.analysis.model, batches, extra)
    pos = {v: i + 1 for i, v in enumerate(extra)}
    ranges: dict[str, LayerRanges] = {}
    for x in io:
        accs = [RangeAccumulator() for _ in range(len(x.acts) + 1)]
        for res in base:
            for acc, v in zip(accs, (*x.acts, x.output)):
                acc.add(np.asarray(res[pos[v]], dtype=np.float32))
        weight = None
        if x.weight is not None:
            wacc = RangeAccumulator()
            wacc.add(_weight_array(model, x.weight))
            weight = wacc.finish()
        ranges[x.name] = LayerRanges(tuple(a.finish() for a in accs[:-1]), accs[-1].finish(), weight)
    refs = [np.asarray(r[0], dtype=np.float32) for r in base]
    if not all(bool(np.isfinite(r).all()) for r in refs):
        raise UsageError(NOT_FINITE)
    kind = output_kind_of(refs[0], None)
    prepared = [ErrorSum(kind).reference(r) for r in refs]
    amax = {x.name: tuple(s.amax for s in ranges[x.name].inputs) for x in io}
    errors: dict[str, dict[Precision, float]] = {}
    local: dict[str, dict[Precision, float]] = {}
    total, done = len(io) * len(fmts), 0
    for x in io:
        errors[x.name], local[x.name] = {}, {}
        own_ref = [np.asarray(r[pos[x.output]], dtype=np.float32) for r in base]
        for fmt in fmts:
            trial = model.build({x.name: fmt}, {x.name: amax[x.name]} if fmt.is_fp8 else None)
            acc, own = ErrorSum(kind), ErrorSum("values")
            for bi, res in enumerate(model.run(trial, batches, [x.output])):
                acc.add(refs[bi], np.asarray(res[0], dtype=np.float32), prepared[bi])
                own.add(own_ref[bi], np.asarray(res[1], dtype=np.float32))
            errors[x.name][fmt] = acc.value()
            local[x.name][fmt] = math.sqrt(own.value())
            done += 1
            if progress:
                progress(done, total, f"{x.name} {fmt}")
    seconds = time.perf_counter() - t0
    graph = model.analysis.graph
    prof = SensitivityProfile(model_name=graph.model_name, fingerprint=graph.fingerprint(), mode="exact",
                              measure=measure_name(kind), formats=fmts, errors=errors, ranges=ranges,
                              local_errors=local, samples=sum(b[next(iter(model.feeds))].shape[0] for b in batches),
                              cost_passes=seconds / t_ref if t_ref > 0 else 0.0, rerun_fraction=1.0, seconds=seconds)
    prof.flags = explain(prof)
    return prof
