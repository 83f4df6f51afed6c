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
``np.savez(path, a, b)``, given in input order). Which inputs carry samples is read off the graph's
input shapes (:func:`_match_inputs`): an input whose axis 0 the graph leaves symbolic is *batched*,
its data hold the samples on axis 0 (all batched inputs the same number N). An input whose axis 0
the graph fixes to D is *fed whole*, the same array to every run, when its data have D there (a
weight matrix given as an input: it follows no batch), and batched when they hold N there instead
(a multiple of D: runs then take D samples). Without symbolic inputs, N is the axis-0 size of the
data that differ from their fixed D; where every array has exactly its input's shape, the inputs are
one batch when their axes 0 agree, and all fed whole, in one run, when they do not (a [2, 3] @
[3, 4] operator test). Rank-0 inputs (an If's condition) are fed whole. Integer inputs stay integers.
Labels: an ``.npy``/``.npz`` file, or the name of an array in the data file that is not an input.
The first :data:`CALIBRATION_SAMPLES` samples calibrate (range statistics, fp8 scales) and profile;
the metric is measured on all of them.

Every floating graph output counts (:class:`autoprec.core.stats.Outputs`, as for torch models):
the profile's error of a trial is the sum of each output's error, and fidelity to fp32 is the worst
output's (:func:`autoprec.core.metrics.fidelity_to`). Labels judge the first floating output.

Profiling is exact (ONNX Runtime has no backward pass for the fast estimate): one fp32 run records
every layer's input and output ranges, then each (layer, format) trial runs the graph with only that
layer lowered and measures the outputs' error against fp32, and the layer's own output change.
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
from autoprec.core.stats import NOT_FINITE, ErrorSum, Outputs, Progress, RangeAccumulator, explain
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
                  path: Path) -> tuple[Feeds, Feeds, int | None]:
    """The data arrays of each model input, by name, else (np.savez's arr_0, arr_1, ...) by order,
    split by the rule of the module docstring: (batched inputs, samples on axis 0; inputs fed whole
    to every run; the batch the batched inputs' graph shapes fix on axis 0, or None where it is free)."""
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
    data: Feeds = {}
    whole: Feeds = {}
    leading: dict[str, int | None] = {}  # the graph's axis 0 of each array input (None: symbolic)
    for vi in inputs:
        a = chosen[vi.name]
        want = _input_dtype(vi)
        if a.dtype != want:
            # float64 -> float32 is a rounding a user expects, int32 -> int64 a widening; integers for a
            # float input (or the reverse) usually mean the wrong array: say so rather than convert silently
            if not np.can_cast(a.dtype, want, casting="same_kind") or (a.dtype.kind in "iub") != (want.kind in "iub"):
                raise UsageError(f"input {vi.name!r}: the data are {a.dtype}, the model takes {want}: save them as "
                                 f"{want} (e.g. x.astype(np.{want})) if that is what you mean")
            a = a.astype(want)
        declared = _declared_dims(vi)
        if a.ndim == 0 and not declared:
            whole[vi.name] = a  # a scalar (an If's condition): the same for every run
            continue
        if declared is not None and (a.ndim != len(declared) or any(
                d is not None and d != s for d, s in zip(declared[1:], a.shape[1:]))):
            dims = vi.type.tensor_type.shape.dim
            shown = ", ".join(str(d.dim_value) if d.HasField("dim_value") else d.dim_param or "?" for d in dims)
            raise UsageError(f"input {vi.name!r}: the data have shape {list(a.shape)}, the model takes rank "
                             f"{len(declared)}: [{shown}]; the data cannot fit the graph")
        data[vi.name] = np.ascontiguousarray(a)
        leading[vi.name] = declared[0] if declared else None
    samples = _samples(data, leading)
    # every input's axis 0 fixed by the graph, every array of that exact shape, one size: one batch
    one_batch = samples is not None and all(a.shape[0] == leading[n] for n, a in data.items())
    feeds: Feeds = {}
    for name, a in data.items():
        fixed = leading[name]
        if fixed is None or one_batch or (a.shape[0] != fixed and a.shape[0] == samples):
            feeds[name] = a
        elif a.shape[0] == fixed:
            whole[name] = a  # the graph fixes its axis 0 and the data have that shape: it follows no batch
        else:
            raise UsageError(f"input {name!r}: its data have {a.shape[0]} on axis 0, neither the {samples} samples "
                             f"of the other inputs nor the {fixed} the model fixes: the data cannot fit the graph")
    fixed_by = {name: leading[name] for name in feeds if leading[name] is not None}
    if len(set(fixed_by.values())) > 1:
        raise UsageError(f"the model's inputs fix different batch sizes on axis 0 ({fixed_by}) and the data give "
                         f"each {samples} samples: the data cannot fit the graph")
    return feeds, whole, next(iter(fixed_by.values()), None)


def _declared_dims(vi: onnx.ValueInfoProto) -> list[int | None] | None:
    """The graph's shape of input ``vi``, a symbolic or unknown dim as None; None without a shape."""
    if not vi.type.tensor_type.HasField("shape"):
        return None
    return [int(d.dim_value) if d.HasField("dim_value") and d.dim_value > 0 else None
            for d in vi.type.tensor_type.shape.dim]


def _samples(data: Feeds, leading: Mapping[str, int | None]) -> int | None:
    """How many samples the data hold on axis 0 (None: no input carries samples, one run): the
    shared axis-0 size of the inputs whose axis 0 the graph leaves symbolic; else that of the data
    whose axis 0 differs from the one the graph fixes; else, where every array has its input's exact
    shape, their shared axis 0 (one batch) -- or None when those differ (no shared batch axis)."""
    free = {n: a.shape[0] for n, a in data.items() if leading[n] is None}
    if free:
        if len(set(free.values())) > 1:
            raise UsageError(f"the inputs whose axis 0 is free (samples) hold different numbers of samples: {free}")
        return next(iter(free.values()))
    more = {n: a.shape[0] for n, a in data.items() if a.shape[0] != leading[n]}
    if len(set(more.values())) > 1:
        fixed = {n: leading[n] for n in more}
        raise UsageError(f"the inputs hold different numbers of samples on axis 0: {more}, where the model fixes "
                         f"{fixed}: the data cannot fit the graph")
    if more:
        return next(iter(more.values()))
    sizes = {a.shape[0] for a in data.values()}
    return sizes.pop() if len(sizes) == 1 else None


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
    feeds: Feeds  # the batched inputs: every sample, by input name
    whole: Feeds  # the inputs fed whole, the same in every run (rank 0, or without a shared batch axis)
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
        feeds, whole, fixed = _match_inputs(arrays, inputs, path)
        n = next(iter(feeds.values())).shape[0] if feeds else 1  # without batched inputs: one run
        if n == 0:
            raise UsageError(f"{path} holds no samples")
        lab = _labels(labels, arrays, feeds, n)
        run_batch = _batch_size(fixed, n)
        # shapes at one sample (or the batch the model fixes): the op graph, and so the plan's
        # fingerprint, do not depend on how many samples the data hold
        one = fixed or 1
        analysis = analyse_onnx(proto, example={**{k: v[:one] for k, v in feeds.items()}, **whole}, name=label)
        # the cost model scales what the inputs feed to the deployment batch; with every input fed
        # whole there are no samples to scale (0: price the graph as it is)
        analysis.graph.batch = one if feeds else 0
        return cls(analysis, feeds, whole, lab, run_batch, fixed is not None)

    # --- data -----------------------------------------------------------------------------------
    @property
    def samples(self) -> int:
        """Samples in the data (1 where every input is fed whole: the model then runs once)."""
        return next(iter(self.feeds.values())).shape[0] if self.feeds else 1

    def samples_in(self, batch: Feeds) -> int:
        """Samples in one run's ``batch`` (1 where every input is fed whole)."""
        return next((batch[k].shape[0] for k in self.feeds), 1)

    def batches(self, limit: int | None = None) -> list[Feeds]:
        """The data as runs of :attr:`batch` samples: the first ``limit`` samples (rounded up to
        whole batches where the model fixes its batch size)."""
        n = self.samples if limit is None else min(self.samples, limit)
        if self.fixed_batch and n % self.batch:
            n = min(self.samples, math.ceil(n / self.batch) * self.batch)
        return [{**{k: v[i:min(i + self.batch, n)] for k, v in self.feeds.items()}, **self.whole}
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
        """Per batch: the analysed model's floating outputs (:attr:`output_names`, which every graph
        a plan makes of it keeps), then the values named in ``extra``."""
        m = model
        if extra:
            m = onnx.ModelProto()
            m.CopyFrom(model)
            have = {o.name for o in m.graph.output}
            m.graph.output.extend(onnx.ValueInfoProto(name=e) for e in extra if e not in have)
        session = open_session(m.SerializeToString(), self.providers)
        names = [*self.output_names, *extra]
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

    def outputs(self, model: onnx.ModelProto, batches: Sequence[Feeds] | None = None) -> list[list[np.ndarray]]:
        """Per batch of ``batches`` (default: all the data), every floating output of ``model`` in
        fp32, in graph order (:attr:`output_names`)."""
        n = len(self.output_names)
        return [[np.asarray(y, dtype=np.float32) for y in r[:n]]
                for r in self.run(model, self.batches() if batches is None else batches)]

    @property
    def output_names(self) -> tuple[str, ...]:
        """The analysed model's floating graph outputs, in graph order: the outputs whose errors count."""
        model = self.analysis.model
        names = tuple(o.name for o in model.graph.output if o.type.tensor_type.elem_type in FLOAT_TYPES)
        if not names:
            hint = ""
            if any(n.op_type == "ZipMap" for n in model.graph.node):
                hint = (" (its probabilities go through a ZipMap into maps: convert it with skl2onnx's option "
                        "{'zipmap': False} to get them as a tensor)")
            raise UsageError(f"the model has no floating-point output: nothing to measure errors on{hint}")
        return names

    def measured(self, first: Sequence[np.ndarray]) -> Outputs:
        """The outputs that count and the kind of each (:meth:`Outputs.resolve`, decided by their
        shapes in ``first``, one fp32 run's outputs): every floating output, as for torch models."""
        return Outputs.resolve(self.output_names, [np.shape(y) for y in first])

    # --- the metric -----------------------------------------------------------------------------
    def metric(self) -> Metric:
        """Accuracy (integer labels) or mean squared error (float labels) of the first floating
        output on all the data; without labels, fidelity to the fp32 model on every floating output
        (one: top-1 agreement for logits, else relative L2 error; several: the worst output's loss)."""
        batches = self.batches()

        def outputs_of(model: onnx.ModelProto) -> list[list[np.ndarray]]:
            return self.outputs(model, batches)

        if self.labels is not None:
            labs = [np.ascontiguousarray(self.labels[i:i + self.batch]) for i in range(0, self.samples, self.batch)]
            return label_metric(labs, lambda model: [ys[0] for ys in outputs_of(model)])
        refs = outputs_of(self.analysis.model)
        return fidelity_to(refs, outputs_of, self.measured(refs[0]).kinds)


def _labels(labels: str | os.PathLike[str] | np.ndarray | None, arrays: Mapping[str, np.ndarray], feeds: Feeds,
            n: int) -> np.ndarray | None:
    if labels is None:
        return None
    if not feeds:
        raise UsageError("labels need samples, but every input of the model is fed whole (no input holds samples "
                         "on axis 0: the model runs once): tune it on fidelity to fp32, without labels")
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


def _node_key(n: onnx.NodeProto) -> tuple:
    """What a node computes, without the annotations plan passes write on it."""
    return (n.op_type, n.domain, tuple(n.input), tuple(n.output), tuple(a.SerializeToString() for a in n.attribute))


class _Downstream:
    """Runs a single-layer trial graph from where it departs from the fp32 graph.

    A trial's graph is the fp32 graph with one layer's nodes rewritten (casts around it, a lowered
    weight, rounded FOLLOW results after it); every other node computes the fp32 value it computed
    before, under the same name. So only the nodes that differ (another op, inputs or attributes, or
    an initializer read of another type or shape: the passes write rounded values under new names)
    and those downstream of them are run, on the fp32 values of what they read (:attr:`needed`: for
    every layer, what the nodes from its own onward read from before it, kept by the fp32 run). A
    graph with control flow (If, Loop, Scan, whose bodies read outer values by name) is run whole, as
    is a trial whose cut reads a value the fp32 run did not keep: :meth:`run` then returns None.
    """

    def __init__(self, fp32: onnx.ModelProto, io: Sequence[_LayerIO], groups: Mapping[str, str]) -> None:
        """``groups``: each node's layer group (the analysis's), whose nodes a layer's format rewrites."""
        g = fp32.graph
        self.keys = {n.output[0]: _node_key(n) for n in g.node if n.output}
        self.inits = {t.name: (t.data_type, tuple(t.dims)) for t in g.initializer}
        self.whole = any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
                         for n in g.node for a in n.attribute)
        self.needed: tuple[str, ...] = ()
        if self.whole:
            return
        given = {t.name for t in g.initializer} | {i.name for i in g.input}  # graph inputs: in every batch
        consumers = _consumers(g)
        members: dict[str, list[int]] = {}
        for i, n in enumerate(g.node):
            members.setdefault(groups.get(n.name, n.name), []).append(i)
        needed: dict[str, None] = {}
        for x in io:
            part = _closure(g, members[x.name], consumers)
            made = {o for i in part for o in g.node[i].output}
            for i in part:
                for v in g.node[i].input:
                    if v and v not in made and v not in given:
                        needed[v] = None
        self.needed = tuple(needed)

    def run(self, trial: onnx.ModelProto, values: Sequence[Mapping[str, np.ndarray]], names: Sequence[str],
            providers: Any) -> tuple[list[list[np.ndarray]], float] | None:
        """Per batch, ``names`` as ``trial`` computes them, and the share of its nodes that ran; None
        where the trial must run whole."""
        if self.whole:
            return None
        g = trial.graph
        other = {t.name for t in g.initializer if self.inits.get(t.name) != (t.data_type, tuple(t.dims))}
        changed = {i for i, n in enumerate(g.node) if not n.output or self.keys.get(n.output[0]) != _node_key(n)
                   or any(v in other for v in n.input)}
        part = sorted(_closure(g, changed, _consumers(g)))
        made = {o for i in part for o in g.node[i].output if o}
        inits = {t.name: t for t in g.initializer}
        reads = list(dict.fromkeys(v for i in part for v in g.node[i].input if v and v not in made and v not in inits))
        outs = [v for v in names if v in made]
        if not outs or not all(isinstance(values[0].get(v), np.ndarray) for v in reads):
            return None
        declared = {o.name: o for o in g.output}
        used = {v for i in part for v in g.node[i].input}
        sub = helper.make_model(
            helper.make_graph([g.node[i] for i in part], g.name,
                              [helper.make_tensor_value_info(v, helper.np_dtype_to_tensor_dtype(values[0][v].dtype), None)
                               for v in reads],
                              [declared[v] if v in declared else onnx.ValueInfoProto(name=v) for v in outs],
                              [t for name, t in inits.items() if name in used]),
            opset_imports=trial.opset_import, ir_version=trial.ir_version)
        sub.functions.extend(trial.functions)  # model-local functions its nodes may call
        session = open_session(sub.SerializeToString(), providers)
        results = []
        for b in values:
            got = dict(zip(outs, session.run({v: b[v] for v in reads}, outs)))
            results.append([got[v] if v in got else b[v] for v in names])
        return results, len(part) / max(len(g.node), 1)


def _consumers(g: onnx.GraphProto) -> dict[str, list[int]]:
    """The nodes (by index) that read each value of ``g``."""
    out: dict[str, list[int]] = {}
    for i, n in enumerate(g.node):
        for v in n.input:
            out.setdefault(v, []).append(i)
    return out


def _closure(g: onnx.GraphProto, start: Iterable[int], consumers: Mapping[str, list[int]]) -> set[int]:
    """The nodes ``start`` and every node that reads, transitively, what they write."""
    part, stack = set(), list(start)
    while stack:
        i = stack.pop()
        if i in part:
            continue
        part.add(i)
        stack.extend(c for o in g.node[i].output if o for c in consumers.get(o, ()))
    return part


def _weight_array(model: OnnxModel, name: str) -> np.ndarray:
    t = next(t for t in model.analysis.model.graph.initializer if t.name == name)
    return numpy_helper.to_array(t).astype(np.float32)


def profile_onnx(model: OnnxModel, formats: Iterable[Precision] = DEFAULT_CANDIDATES,
                 progress: Progress | None = None) -> SensitivityProfile:
    """Exact sensitivity of every layer in each of ``formats``, measured on ONNX Runtime (CPU) with
    emulation graphs over the calibration samples: the sum of every floating output's error.

    Each trial runs only the part of its graph that the layer's format changes (:class:`_Downstream`):
    the rest computes what the fp32 graph computed, so its values are fed from one fp32 run."""
    fmts = tuple(f for f in formats if f is not Precision.FP32)
    if not fmts:
        raise UsageError("no low-precision format to profile: give at least one of bf16, fp16, fp8")
    io = _layer_io(model)
    batches = model.calibration()
    t_ref = model.time_reference(batches)
    t0 = time.perf_counter()
    cut = _Downstream(model.analysis.model, io, model.analysis.groups)
    extra = list(dict.fromkeys([*(v for x in io for v in (*x.acts, x.output)), *cut.needed]))
    base = model.run(model.analysis.model, batches, extra)
    n_out = len(model.output_names)  # each run's results: the outputs, then the extra values
    pos = {v: i + n_out for i, v in enumerate(extra)}
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
    refs = [[np.asarray(y, dtype=np.float32) for y in r[:n_out]] for r in base]
    if not all(bool(np.isfinite(y).all()) for ys in refs for y in ys):
        raise UsageError(NOT_FINITE)
    measured = model.measured(refs[0])
    prepared = [[ErrorSum(k).reference(y) for k, y in zip(measured.kinds, ys)] for ys in refs]
    values = [{**b, **{v: r[pos[v]] for v in cut.needed}, **dict(zip(model.output_names, r))}
              for b, r in zip(batches, base)]
    amax = {x.name: tuple(s.amax for s in ranges[x.name].inputs) for x in io}
    errors: dict[str, dict[Precision, float]] = {}
    local: dict[str, dict[Precision, float]] = {}
    total, done, rerun = len(io) * len(fmts), 0, 0.0
    for x in io:
        errors[x.name], local[x.name] = {}, {}
        own_ref = [np.asarray(r[pos[x.output]], dtype=np.float32) for r in base]
        for fmt in fmts:
            trial = model.build({x.name: fmt}, {x.name: amax[x.name]} if fmt.is_fp8 else None)
            ran = cut.run(trial, values, [*model.output_names, x.output], model.providers)
            results, share = ran if ran is not None else (model.run(trial, batches, [x.output]), 1.0)
            rerun += share
            accs = [ErrorSum(k) for k in measured.kinds]  # one per output: the error is their sum
            own = ErrorSum("values")
            for bi, res in enumerate(results):
                for acc, ref, new, prep in zip(accs, refs[bi], res, prepared[bi]):
                    acc.add(ref, np.asarray(new, dtype=np.float32), prep)
                own.add(own_ref[bi], np.asarray(res[n_out], dtype=np.float32))
            errors[x.name][fmt] = sum(acc.value() for acc in accs)
            local[x.name][fmt] = math.sqrt(own.value())
            done += 1
            if progress:
                progress(done, total, f"{x.name} {fmt}")
    seconds = time.perf_counter() - t0
    graph = model.analysis.graph
    prof = SensitivityProfile(model_name=graph.model_name, fingerprint=graph.fingerprint(), mode="exact",
                              measure=measured.measure, formats=fmts, errors=errors, ranges=ranges,
                              local_errors=local, samples=sum(model.samples_in(b) for b in batches),
                              cost_passes=seconds / t_ref if t_ref > 0 else 0.0,
                              rerun_fraction=rerun / max(total, 1), seconds=seconds)
    prof.flags = explain(prof)
    return prof
