"""ONNX files from the wild: `autoprec tune` on every backend test model the onnx wheel ships.

    .venv/bin/python benchmarks/onnx_zoo_bench.py [--quick] [--only REGEX] [--timeout S] [--light-samples N]

The onnx package carries graphs written by other exporters (``onnx/backend/test/data``):
``pytorch-converted`` and ``pytorch-operator`` (small torch modules and single operators, each with
``test_data_set_*/input_*.pb``) and ``light`` (model-zoo CNNs whose weights come from
ConstantOfShape nodes, with reference outputs but no inputs). Each is tuned by the CLI as a user
would, ``autoprec tune model.onnx --data inputs.npz --fidelity-budget 1% --out DIR``, in a
subprocess with a timeout, because the CLI is what a user meets: a model must either tune (exit 0)
or say in one line why it cannot (exit 1 or 2, no traceback).

Data: the model's own test inputs, matched to its graph inputs in order (the .pb names are often
empty) and joined along axis 0 across data sets; the light models, which ship none, get
``--light-samples`` standard-normal samples of their input shape (seeded).

Printed per model: the outcome (tuned, the one-line message of a model with nothing to tune, or
CRASH: a traceback, a multi-line error, a signal or the timeout), the layers in the plan, the
convolutions the plan runs below fp32 against the Conv/ConvTranspose nodes in the file, and the
wall seconds. Exits 1 on any crash, and when a light model has a convolution that is not a plan
layer (so not the search's choice: the analyser kept it fp32, e.g. a weight it does not see as a
constant). ``--quick`` skips the two largest light models (vgg19, alexnet: hundreds of MB of
weights once folded); the default run covers every model.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.results import write_section  # noqa: E402
from autoprec.onnx.graph import graph_inputs  # noqa: E402

DATA = Path(onnx.__file__).resolve().parent / "backend" / "test" / "data"
SUITES = ("pytorch-converted", "pytorch-operator", "light")
CONV_OPS = frozenset({"Conv", "ConvTranspose"})
#: the light models --quick leaves out: the two with the most weight once ConstantOfShape is folded
SLOW = frozenset({"light_vgg19", "light_bvlc_alexnet"})
AUTOPREC = ROOT / ".venv" / "bin" / "autoprec"


@dataclass
class Case:
    """One model file and where its inputs come from."""

    suite: str
    name: str
    model: Path

    @property
    def light(self) -> bool:
        return self.suite == "light"


@dataclass
class Outcome:
    """What one tune did: ``status`` is tuned, nothing or CRASH; ``message`` the one line said."""

    status: str
    message: str
    layers: int | None
    convs_tuned: int | None
    convs_present: int
    convs_unplanned: int
    seconds: float


def cases() -> list[Case]:
    """Every model of :data:`SUITES`, in suite then name order."""
    found = []
    for suite in SUITES:
        folder = DATA / suite
        if suite == "light":
            found += [Case(suite, p.stem, p) for p in sorted(folder.glob("light_*.onnx"))]
        else:
            found += [Case(suite, d.name, d / "model.onnx") for d in sorted(folder.iterdir()) if (d / "model.onnx").is_file()]
    return found


def _test_inputs(case: Case, inputs: list[onnx.ValueInfoProto]) -> dict[str, np.ndarray]:
    """The model's own test inputs by graph input name: input_<i>.pb is the i-th graph input
    that is not an initializer; the data sets are joined on axis 0 (samples)."""
    sets = sorted(case.model.parent.glob("test_data_set_*"))
    per_input: dict[str, list[np.ndarray]] = {vi.name: [] for vi in inputs}
    for folder in sets:
        for i, vi in enumerate(inputs):
            pb = folder / f"input_{i}.pb"
            if pb.is_file():
                per_input[vi.name].append(numpy_helper.to_array(onnx.load_tensor(str(pb))))
    arrays = {}
    for name, parts in per_input.items():
        if parts:
            same = all(p.shape[1:] == parts[0].shape[1:] for p in parts) and parts[0].ndim > 0
            arrays[name] = np.concatenate(parts) if same else parts[0]
    return arrays


def _random_inputs(inputs: list[onnx.ValueInfoProto], samples: int) -> dict[str, np.ndarray]:
    """Seeded standard-normal samples for models that ship no inputs (all floating, fixed shapes)."""
    rng = np.random.default_rng(0)
    arrays = {}
    for vi in inputs:
        dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else 1 for d in vi.type.tensor_type.shape.dim]
        dtype = onnx.helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type)
        shape = [samples * dims[0], *dims[1:]] if dims else []
        arrays[vi.name] = rng.standard_normal(shape).astype(dtype)
    return arrays


def write_data(case: Case, proto: onnx.ModelProto, path: Path, light_samples: int) -> None:
    """The .npz the CLI reads with --data."""
    inputs = graph_inputs(proto)
    arrays = _random_inputs(inputs, light_samples) if case.light else _test_inputs(case, inputs)
    np.savez(path, **arrays)


def _one_line(stderr: str) -> str | None:
    """The CLI's one-line error (``error: ...``), or None when stderr says more (a traceback)."""
    lines = [ln for ln in stderr.strip().splitlines() if ln.strip()]
    if len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in stderr:
        return lines[0][len("error:"):].strip()
    return None


def run_case(case: Case, timeout: float, light_samples: int) -> Outcome:
    """Tune ``case`` with the CLI in a subprocess and read its plan."""
    proto = onnx.load(str(case.model))
    present = sum(n.op_type in CONV_OPS for n in proto.graph.node)
    with tempfile.TemporaryDirectory(prefix="onnx_zoo_") as tmp:
        data, out = Path(tmp) / "inputs.npz", Path(tmp) / "out"
        write_data(case, proto, data, light_samples)
        cmd = [str(AUTOPREC), "tune", str(case.model), "--data", str(data), "--fidelity-budget", "1%", "--out", str(out)]
        start = time.perf_counter()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                                  env={**os.environ, "COLUMNS": "200"})
        except subprocess.TimeoutExpired:
            return Outcome("CRASH", f"timeout after {timeout:.0f} s", None, None, present, present, time.perf_counter() - start)
        seconds = time.perf_counter() - start
        if proc.returncode != 0:
            line = _one_line(proc.stderr)
            if line is not None and proc.returncode in (1, 2):
                return Outcome("nothing", f"exit {proc.returncode}: {line}", None, None, present, present, seconds)
            tail = proc.stderr.strip().splitlines()[-1:] or [f"exit {proc.returncode}"]
            return Outcome("CRASH", f"exit {proc.returncode}: {tail[0][:160]}", None, None, present, present, seconds)
        decisions = json.loads((out / "plan.json").read_text())["decisions"]
        convs = [d for d in decisions if d["kind"].startswith("conv")]
        tuned = sum(d["format"] != "fp32" for d in convs)
        return Outcome("tuned", "", len(decisions), tuned, present, present - len(convs), seconds)


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help=f"skip {', '.join(sorted(SLOW))}")
    ap.add_argument("--only", default=None, help="regular expression on suite/name")
    # densenet121 takes ~950 s alone on a 2-core machine, and twice that beside another job
    ap.add_argument("--timeout", type=float, default=2400.0, help="seconds per model (default 2400)")
    ap.add_argument("--light-samples", type=int, default=4, help="random samples for the light models (default 4)")
    args = ap.parse_args(argv)
    todo = [c for c in cases() if not (args.quick and c.name in SLOW)
            and (args.only is None or re.search(args.only, f"{c.suite}/{c.name}"))]
    lines = ["| suite | model | outcome | plan layers | convs tuned / present | wall s |", "|---|---|---|---|---|---|"]
    print("\n".join(lines))
    total = time.perf_counter()
    crashes, unplanned = [], []
    counts = {"tuned": 0, "nothing": 0, "CRASH": 0}
    for case in todo:
        o = run_case(case, args.timeout, args.light_samples)
        counts[o.status] += 1
        if o.status == "CRASH":
            crashes.append(case.name)
        if case.light and o.convs_unplanned:
            unplanned.append(f"{case.name} ({o.convs_unplanned} of {o.convs_present})")
        outcome = {"tuned": "tuned", "nothing": f"nothing to tune: {o.message}", "CRASH": f"CRASH: {o.message}"}[o.status]
        layers = "-" if o.layers is None else str(o.layers)
        convs = f"{'-' if o.convs_tuned is None else o.convs_tuned} / {o.convs_present}"
        lines.append(f"| {case.suite} | {case.name} | {outcome.replace('|', '/')} | {layers} | {convs} "
                     f"| {o.seconds:.1f} |")
        print(lines[-1], flush=True)
    lines.append(f"\n{len(todo)} models in {time.perf_counter() - total:.0f} s: {counts['tuned']} tuned, "
                 f"{counts['nothing']} with nothing to tune, {counts['CRASH']} crashes"
                 + (f" ({', '.join(crashes)})" if crashes else "")
                 + (f"; light models with convolutions the analyser kept out of the plan: {', '.join(unplanned)}"
                    if unplanned else ""))
    print(lines[-1])
    write_section("onnx_zoo", "ONNX files from the wild: the onnx package's backend test models", "\n".join(lines))
    return 1 if crashes or unplanned else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
