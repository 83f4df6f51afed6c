"""Concrete shapes of an ONNX model's values: graph inputs sized from example data, the rest inferred or measured.

The op graph prices every node at one concrete shape (a plan's fingerprint must not depend on the
data size), while files written by other software leave dims symbolic. Inputs are sized from example
arrays, ``batch`` (axis 0) and ``dims`` (by name); ONNX shape inference sizes the rest; values it
cannot size are measured by one ONNX Runtime run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import onnx
from onnx import helper, shape_inference

from autoprec.core.errors import UsageError, first_line
from autoprec.onnx.values import FLOAT_TYPES


@dataclass(frozen=True)
class ConcreteValue:
    """A value's element type and concrete shape (None when unknown)."""

    elem_type: int
    shape: tuple[int, ...] | None

    @property
    def is_float(self) -> bool:
        return self.elem_type in FLOAT_TYPES

    @property
    def numel(self) -> int:
        return math.prod(self.shape) if self.shape is not None else 0


def graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """Graph inputs that are real inputs (initializers listed as inputs are weights)."""
    inits = {t.name for t in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in inits]


def infer_shapes(model: onnx.ModelProto) -> tuple[onnx.ModelProto, str]:
    """The model with ONNX shape inference's ``value_info`` (strict, with data propagation), and ""
    -- or, where strict inference fails, non-strict inference's and a note saying so."""
    try:
        return shape_inference.infer_shapes(model, check_type=True, strict_mode=True, data_prop=True), ""
    except Exception as exc:
        inferred = shape_inference.infer_shapes(model, check_type=False, strict_mode=False, data_prop=True)
        return inferred, f"strict shape inference failed ({first_line(exc)}); used non-strict inference"


def example_arrays(model: onnx.ModelProto, example: Any) -> dict[str, np.ndarray]:
    """``example`` (a mapping by input name, a sequence in input order, or one array) as numpy
    arrays by input name; a one-line error for names or counts the model does not have."""
    if example is None:
        return {}
    names = [i.name for i in graph_inputs(model)]
    if isinstance(example, Mapping):
        unknown = sorted(set(example) - set(names))
        if unknown:
            raise UsageError(f"example data for unknown input(s) {', '.join(unknown)}: the model's "
                             f"inputs are {', '.join(names)}")
        items = dict(example)
    else:
        seq = [example] if hasattr(example, "shape") else list(example)
        if len(seq) > len(names):
            raise UsageError(f"{len(seq)} example arrays for a model with {len(names)} input(s)")
        items = dict(zip(names, seq))
    return {k: _to_numpy(v) for k, v in items.items()}


def _to_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor, without importing torch
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def input_shapes(model: onnx.ModelProto, feeds: Mapping[str, np.ndarray], batch: int | None,
                 dims: Mapping[str, int]) -> dict[str, tuple[int, ...]]:
    """Concrete shape of every graph input: from its example array, else its declared dims with
    symbolic ones resolved from ``dims`` by name and ``batch`` on axis 0."""
    out: dict[str, tuple[int, ...]] = {}
    for vi in graph_inputs(model):
        declared = vi.type.tensor_type.shape.dim if vi.type.tensor_type.HasField("shape") else None
        if vi.name in feeds:
            shape = tuple(int(s) for s in feeds[vi.name].shape)
            if declared is not None:
                if len(declared) != len(shape):
                    raise UsageError(f"example for input {vi.name!r} has rank {len(shape)}, the model "
                                     f"expects rank {len(declared)}")
                for axis, (d, s) in enumerate(zip(declared, shape)):
                    if d.HasField("dim_value") and d.dim_value != s:
                        raise UsageError(f"example for input {vi.name!r} has size {s} on axis {axis}, "
                                         f"the model fixes it to {d.dim_value}")
            out[vi.name] = shape
            continue
        if declared is None:
            raise UsageError(f"input {vi.name!r} has no declared shape: pass example data for it")
        shape_l: list[int] = []
        for axis, d in enumerate(declared):
            if d.HasField("dim_value") and d.dim_value > 0:
                if axis == 0 and batch is not None and d.dim_value != batch:
                    raise UsageError(f"input {vi.name!r} fixes its batch dimension to {d.dim_value}; "
                                     f"batch={batch} cannot apply (omit batch)")
                shape_l.append(int(d.dim_value))
            elif d.HasField("dim_param") and d.dim_param in dims:
                shape_l.append(int(dims[d.dim_param]))
            elif axis == 0:
                shape_l.append(int(batch) if batch is not None else 1)
            else:
                label = d.dim_param or "?"
                raise UsageError(f"input {vi.name!r} has a symbolic dimension {label!r} on axis {axis}: "
                                 f"pass example data for it or dims={{{label!r}: size}}")
        out[vi.name] = tuple(shape_l)
    return out


def _value_of(vi: onnx.ValueInfoProto) -> ConcreteValue | None:
    if not vi.type.HasField("tensor_type"):
        return None
    tt = vi.type.tensor_type
    shape: tuple[int, ...] | None = None
    if tt.HasField("shape"):
        dims = [d.dim_value if d.HasField("dim_value") else -1 for d in tt.shape.dim]
        shape = tuple(int(d) for d in dims) if all(d >= 0 for d in dims) else None
    return ConcreteValue(tt.elem_type, shape)


def concrete_values(model: onnx.ModelProto, inputs: Mapping[str, tuple[int, ...]],
                    feeds: Mapping[str, np.ndarray]) -> tuple[dict[str, ConcreteValue], list[str]]:
    """Type and concrete shape of every top-level value (inputs, initializers, node outputs) with
    the graph inputs at ``inputs``, and notes on how they were found."""
    notes: list[str] = []
    fixed = onnx.ModelProto()
    fixed.CopyFrom(model)
    del fixed.graph.value_info[:]
    for vi in fixed.graph.input:
        if vi.name in inputs:
            shape = vi.type.tensor_type.shape
            del shape.dim[:]
            for s in inputs[vi.name]:
                shape.dim.add().dim_value = s
    fixed, how = infer_shapes(fixed)
    if how:
        notes.append(how.replace("shape inference", "shape inference at the example shapes"))
    values: dict[str, ConcreteValue] = {}
    for t in fixed.graph.initializer:
        values[t.name] = ConcreteValue(t.data_type, tuple(int(d) for d in t.dims))
    for vi in list(fixed.graph.input) + list(fixed.graph.value_info) + list(fixed.graph.output):
        v = _value_of(vi)
        if v is not None and (vi.name not in values or values[vi.name].shape is None):
            values[vi.name] = v
    missing = [o for n in model.graph.node for o in n.output
               if o and (o not in values or values[o].shape is None)]
    if missing:
        measured, why = _measure_shapes(model, inputs, feeds, missing)
        values.update(measured)
        notes.append(why or f"measured {len(measured)} shape(s) shape inference left open with one "
                            f"ONNX Runtime run")
    return values, notes


def _measure_shapes(model: onnx.ModelProto, inputs: Mapping[str, tuple[int, ...]],
                    feeds: Mapping[str, np.ndarray], names: Sequence[str]) -> tuple[dict[str, ConcreteValue], str]:
    """Run the model once in ONNX Runtime (CPU) with ``names`` as extra outputs: their types and
    shapes, and "" -- or nothing and why it could not run (those values then count as unsized)."""
    import onnxruntime as ort

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    have = {o.name for o in probe.graph.output}
    for n in names:
        if n not in have:
            probe.graph.output.append(onnx.ValueInfoProto(name=n))
    run_feeds = {}
    for vi in graph_inputs(model):
        dtype = helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type)
        if vi.name in feeds:
            run_feeds[vi.name] = np.asarray(feeds[vi.name], dtype=dtype)
        else:
            run_feeds[vi.name] = np.zeros(inputs[vi.name], dtype=dtype)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    try:
        sess = ort.InferenceSession(probe.SerializeToString(), so, providers=["CPUExecutionProvider"])
        got = sess.run(list(names), run_feeds)
    except Exception as exc:
        return {}, (f"{len(names)} value(s) have no known shape (e.g. {names[0]!r}) and the model does "
                    f"not run in ONNX Runtime to measure them ({first_line(exc)}): their sizes count as 0")
    out = {}
    for n, arr in zip(names, got):
        if isinstance(arr, np.ndarray):
            out[n] = ConcreteValue(helper.np_dtype_to_tensor_dtype(arr.dtype), tuple(int(s) for s in arr.shape))
    return out, ""
