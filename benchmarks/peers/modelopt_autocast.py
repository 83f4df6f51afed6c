"""Convert an .onnx model with NVIDIA ModelOpt's ONNX AutoCast, for benchmarks/peers_bench.py.

    .venv-modelopt/bin/python benchmarks/peers/modelopt_autocast.py IN.onnx OUT.onnx --low fp16|bf16 \\
        [--calibration DATA.npz]

Runs in ModelOpt's own venv (scripts/setup_modelopt.sh): ModelOpt pins older onnx and onnxruntime than
autoprec's .venv, so peers_bench starts this script in a subprocess and reads what it prints. Imports
nothing from autoprec.

AutoCast (``modelopt.onnx.autocast.convert_to_mixed_precision``) is rule-based and checks no accuracy:
every node goes to the low format unless a rule keeps it in fp32 -- an initializer beyond ``init_max``
(fp16's largest value by default), an input or output whose magnitude on reference data exceeds
``data_max`` (512 by default), an op type it cannot convert (Upsample, NonMaxSuppression, Celu) -- and
nothing runs the converted model. The reference data are one fp32 run of the graph with every
intermediate marked as an output: on ``--calibration`` (the .npz's arrays, named after the graph's
inputs, given as one batch: a folder holding that one file; given the .npz itself AutoCast would
split it into one-sample batches and run each, with the same ranges), else on random inputs in
[-1, 1]. I/O types are kept (``keep_io_types=True``), as peers_bench gives every tool fp32 I/O.

Writes OUT.onnx atomically and prints one JSON line on stdout: ``seconds`` (the conversion, not the
imports), ``low_nodes`` (nodes other than Casts and Constants that write a value in the low format),
``fp32_ops`` (op type -> count of such nodes that write an fp32 value: what it kept wide),
``reference_runs`` (fp32 runs of the model it made) and ``opset`` (AutoCast raises bf16 graphs to
opset 22). Everything the libraries print goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import onnx

LOW_TYPES = {"fp16": onnx.TensorProto.FLOAT16, "bf16": onnx.TensorProto.BFLOAT16}


def _value_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every value the graph names (after shape inference)."""
    g = onnx.shape_inference.infer_shapes(model).graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*g.value_info, *g.input, *g.output]}
    types.update({i.name: i.data_type for i in g.initializer})
    return types


def census(model: onnx.ModelProto, low: str) -> tuple[int, dict[str, int]]:
    """(nodes writing a value in ``low``, op type -> nodes writing fp32), Casts and Constants left
    out: the converted graph's own account of what AutoCast put in each format (its log counts every
    node, integer shape arithmetic included)."""
    types = _value_types(model)
    low_type = LOW_TYPES[low]
    n_low, kept = 0, Counter()
    for node in model.graph.node:
        if node.op_type in ("Cast", "Constant"):  # its own casts, and data rather than computation
            continue
        out = {types.get(o) for o in node.output}
        if low_type in out:
            n_low += 1
        elif onnx.TensorProto.FLOAT in out:
            kept[node.op_type] += 1
    return n_low, dict(sorted(kept.items()))


def convert(src: Path, dst: Path, low: str, calibration: Path | None) -> dict[str, object]:
    """Run AutoCast on ``src``, write its graph to ``dst`` atomically, and return the JSON record."""
    from modelopt.onnx.autocast import convert_to_mixed_precision  # slow (torch, onnxscript): only when converting

    with tempfile.TemporaryDirectory() as tmp:
        calib = None
        if calibration is not None:
            # a folder of .npz files is AutoCast's multi-batch form; one file in it is one batch
            calib = str(Path(tmp) / "calib")
            os.mkdir(calib)
            shutil.copyfile(calibration, Path(calib) / "batch0.npz")
        t0 = time.perf_counter()
        model = convert_to_mixed_precision(str(src), low_precision_type=low, keep_io_types=True,
                                           calibration_data=calib, providers=["cpu"])
        seconds = time.perf_counter() - t0
    n_low, kept = census(model, low)
    part = dst.with_name(dst.name + ".part")
    onnx.save(model, str(part))
    part.replace(dst)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    return {"seconds": round(seconds, 3), "low_nodes": n_low, "fp32_ops": kept, "reference_runs": 1,
            "opset": opset}


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("src", type=Path, help="the fp32 .onnx model")
    ap.add_argument("dst", type=Path, help="where to write AutoCast's mixed-precision .onnx")
    ap.add_argument("--low", choices=sorted(LOW_TYPES), required=True, help="the low format")
    ap.add_argument("--calibration", type=Path, default=None,
                    help=".npz of the graph's inputs for AutoCast's range rule (default: random inputs)")
    args = ap.parse_args(argv)
    # the JSON line is the only thing on stdout: ModelOpt logs to stdout, so point fd 1 at stderr
    result_out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    record = convert(args.src, args.dst, args.low, args.calibration)
    result_out.write(json.dumps(record) + "\n")
    result_out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
