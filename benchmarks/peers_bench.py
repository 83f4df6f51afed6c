"""Peers benchmark: autoprec beside onnxconverter-common's auto mixed precision and the simple plans,
on the same .onnx files, data and budget, every result evaluated honestly.

    .venv/bin/python benchmarks/peers_bench.py [digits_cnn char_transformer] [--budget 0.5%]

Each zoo model is written as an .onnx file by torch's legacy exporter with its held-out inputs and
labels (scripts/onnx_example.py); the metric is accuracy on those labels (class accuracy, or
next-token accuracy for the language model), the budget a relative drop from the fp32 model's.

- autoprec: ``autoprec.api.tune_onnx`` (exact profile, the only one for .onnx input). Its drop is
  measured on the plan's emulation graph on ONNX Runtime's CPU provider, every rounding explicit.
- the simple plans tune measures beside it (uniform plans, torch.amp's op lists), as the tune's
  summary reports them: measured fastest first until one holds the budget, the rest "not measured".
- onnxconverter-common 1.16 (installed by ``make bench``): ``auto_convert_mixed_precision`` with
  ``keep_io_types=True`` and a metric check: its ``validate_fn`` accepts a candidate when the
  accuracy it sees on the same data is within the same allowed drop. Its check runs the fp16 graph
  on ONNX Runtime's CPU provider, which computes fp16 nodes in fp32 and drops their rounding
  (FACTS.md), so its own figure ("self-check") is optimistic. The honest figure runs its graph with
  every fp16 value rounded: each node that writes fp16 computes in fp32 and its result goes through
  a Cast to fp16 and back (:func:`emulate_fp16`, ONNX Runtime's graph optimizations off so no Cast
  pair is removed) -- what a GPU computing in fp16 with fp32 accumulation stores.

Printed per model and tool: whether the budget held (honest), the drop (honest, and the peer's self-
check), the estimated H100 speedup and deployed memory at batch 1024 (autoprec's cost model on the
same op graph; for the peer, its layers in the format its graph gives them and every other op as
autoprec's lowering runs it, which prices the peer's fp16 softmax and norms as fp32), the deployed
ONNX file's size, the tuning time in fp32 evaluations (the tune's median-timed unit) and the number
of full model runs (autoprec's exact profile adds partial re-runs of the graph downstream of each
layer, which its tuning time includes). Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from autoprec.api import tune_onnx  # noqa: E402
from autoprec.core.formats import Precision  # noqa: E402
from autoprec.core.metrics import DropBudget  # noqa: E402
from autoprec.cost.memory import deployed_memory  # noqa: E402
from autoprec.cost.roofline import RooflineCostModel  # noqa: E402
from autoprec.ort.runtime import set_runtime_log  # noqa: E402

BATCH = 1024  # the deployment batch the estimates price (autoprec tune's default)


def _examples() -> Any:
    spec = importlib.util.spec_from_file_location("onnx_example", ROOT / "scripts" / "onnx_example.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    return mod


def emulate_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    """An fp32 graph computing what ``model`` (a graph with fp16 values) computes on a GPU: every
    value ``model`` holds in fp16 is computed in fp32 by its node and rounded to fp16 (a Cast there and
    back); fp16 initializers and constants become fp32 (exact), a Cast to fp16 becomes that rounding."""
    inferred = onnx.shape_inference.infer_shapes(model)
    g0 = inferred.graph
    half = {v.name for v in [*g0.value_info, *g0.output, *g0.input] if v.type.tensor_type.elem_type == TensorProto.FLOAT16}
    m = onnx.ModelProto()
    m.CopyFrom(inferred)
    g = m.graph
    for init in g.initializer:
        if init.data_type == TensorProto.FLOAT16:
            half.discard(init.name)
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float32), init.name))
    nodes = []
    for node in g.node:
        for a in node.attribute:
            if node.op_type == "Cast" and a.name == "to" and a.i == TensorProto.FLOAT16:
                a.i = TensorProto.FLOAT
            if a.type == onnx.AttributeProto.TENSOR and a.t.data_type == TensorProto.FLOAT16:
                a.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(a.t).astype(np.float32), a.t.name))
        rounded = []
        for k, out in enumerate(node.output):
            if out in half:
                node.output[k] = f"{out}__fp32"
                rounded.append(out)
        nodes.append(node)
        for out in rounded:
            nodes.append(helper.make_node("Cast", [f"{out}__fp32"], [f"{out}__fp16"], to=TensorProto.FLOAT16))
            nodes.append(helper.make_node("Cast", [f"{out}__fp16"], [out], to=TensorProto.FLOAT))
    del g.node[:]
    g.node.extend(nodes)
    for v in [*g.input, *g.output]:
        if v.type.tensor_type.elem_type == TensorProto.FLOAT16:
            v.type.tensor_type.elem_type = TensorProto.FLOAT
    del g.value_info[:]
    onnx.checker.check_model(m)
    return m


def _run(model: onnx.ModelProto, feed: dict[str, np.ndarray], optimize: bool = True) -> np.ndarray:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if not optimize:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return np.asarray(sess.run(None, feed)[0], dtype=np.float32)


def _accuracy(labels: np.ndarray) -> Callable[[np.ndarray], float]:
    return lambda out: float(np.mean(np.argmax(out, axis=-1) == labels))


def _fp16_layers(peer: onnx.ModelProto, layers: list[str]) -> dict[str, Precision]:
    """The peer's format of each plan layer: fp16 where the node of that name writes fp16."""
    g = onnx.shape_inference.infer_shapes(peer).graph
    half = {v.name for v in [*g.value_info, *g.output] if v.type.tensor_type.elem_type == TensorProto.FLOAT16}
    by_name = {n.name: n for n in g.node}
    return {name: Precision.FP16 for name in layers if name in by_name and by_name[name].output[0] in half}


def bench(name: str, budget: str, tmp: Path) -> list[str]:
    onnx_path, data_path, labels_path = _examples().write_example(name, tmp)
    x = np.load(data_path)["input"]
    labels = np.load(labels_path)
    acc = _accuracy(labels)
    model = onnx.load(str(onnx_path))
    feed = {"input": x}
    fp32_acc = acc(_run(model, feed))
    allowed = DropBudget.parse(budget).allowed_drop(fp32_acc)
    rows = []

    t0 = time.perf_counter()
    res = tune_onnx(onnx_path, data_path, labels_path, budget, timing=False)
    wall = time.perf_counter() - t0
    s, plan = res.summary, res.plan
    eval_s = res._tunable.eval_seconds  # the tune's unit: the median of its fp32 evaluations
    graph = res.graph.at_batch(BATCH) if res.graph.batch else res.graph
    cm = RooflineCostModel("h100", "latency")
    fp32_cost, fp32_mem = cm.plan_cost(graph, {}), deployed_memory(graph, {})
    tuned_bytes = len(res.onnx_model("deploy").SerializeToString())
    counts = ", ".join(f"{k} {v}" for k, v in plan.format_counts().items())
    rows.append(f"| {name} | autoprec ({counts}) | {'yes' if s.drop <= allowed else 'no'} | {s.drop:.4f} | - "
                f"| {s.speedup:.2f}x | {100 * s.memory_ratio:.0f}% | {tuned_bytes / 1e6:.2f} | {wall / eval_s:.1f} "
                f"| {s.evaluations} + profile |")
    for u in res.uniforms:
        drop = "not measured" if u.measured_drop is None else f"{u.measured_drop:.4f}"
        rows.append(f"| {name} | {u.name} | {u.verdict} | {drop} | - | {u.speedup:.2f}x | {100 * u.memory_ratio:.0f}% "
                    "| - | - | - |")

    from onnxconverter_common.auto_mixed_precision import auto_convert_mixed_precision

    runs = [0]

    def validate(res0: list[np.ndarray], res1: list[np.ndarray]) -> bool:
        runs[0] += 1
        return fp32_acc - acc(np.asarray(res1[0], dtype=np.float32)) <= allowed

    t0 = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):  # it prints every attempt
        peer = auto_convert_mixed_precision(model, feed, validate_fn=validate, keep_io_types=True)
    peer_wall = time.perf_counter() - t0
    self_drop = fp32_acc - acc(_run(peer, feed))
    honest_drop = fp32_acc - acc(_run(emulate_fp16(peer), feed, optimize=False))
    assignment = _fp16_layers(peer, graph.layer_names())
    n16 = len(assignment)
    rows.append(f"| {name} | onnxconverter-common (fp16 x{n16}, fp32 x{len(graph.layer_names()) - n16}) "
                f"| {'yes' if honest_drop <= allowed else 'no'} | {honest_drop:.4f} | {self_drop:.4f} "
                f"| {fp32_cost / cm.plan_cost(graph, assignment):.2f}x "
                f"| {100 * deployed_memory(graph, assignment) / fp32_mem:.0f}% | {len(peer.SerializeToString()) / 1e6:.2f} "
                f"| {peer_wall / eval_s:.1f} | {runs[0] + 1} |")
    return rows


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="*", default=["digits_cnn", "char_transformer"])
    ap.add_argument("--budget", default="0.5%")
    args = ap.parse_args(argv)
    set_runtime_log(debug=False)
    lines = [f"Budget: {args.budget} of held-out accuracy (relative). Speedup and memory: autoprec's H100 estimate "
             f"at batch {BATCH}.", "",
             "| model | tool (plan) | budget held (honest) | drop, honest | drop, tool's self-check | est. speedup "
             "| memory | ONNX MB | tune time (fp32 evals) | full model runs |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            rows = bench(name, args.budget, Path(tmp) / name)
            lines += rows
            print("\n".join(rows), flush=True)
    print()
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
