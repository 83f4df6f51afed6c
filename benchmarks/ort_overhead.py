"""ONNX Runtime's fixed cost per graph node on an execution provider: what every kernel of a
deployed graph costs on top of its work, the figure to hold against ``autoprec.cost.roofline.LAUNCH_OVERHEAD_S``.

    .venv/bin/python benchmarks/ort_overhead.py [--provider cuda] [--out FILE]

Times chains of N nodes (N = 2, 34, 66, 130) on a tensor too small for any node to do real work
([256, 16] fp32), with inputs and outputs resident on the device (IOBinding) and through
``session.run`` on host arrays, all graphs in interleaved rounds. The least-squares slope of the
median time against N is the cost of one node; the intercept is what a run costs whatever the
graph. The nodes are Relus: each is one small kernel, as a cast at a plan's boundary or a FOLLOW op
is (a chain of casts would not do: ONNX Runtime drops the round trips after the first, which round
nothing more). Without the provider it says so and exits 0.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from onnx import TensorProto, helper

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.results import write_section  # noqa: E402
from autoprec.core.io import atomic_write_text  # noqa: E402
from autoprec.ort.runtime import latencies_ms, parse_providers, probe_provider, set_runtime_log  # noqa: E402

LENGTHS = (2, 34, 66, 130)
SHAPE = (256, 16)


def chain(n: int) -> bytes:
    """A graph of ``n`` Relus in a row."""
    names = ["x"] + [f"t{i}" for i in range(n - 1)] + ["y"]
    nodes = [helper.make_node("Relu", [a], [b]) for a, b in zip(names, names[1:])]
    g = helper.make_graph(nodes, f"relu{n}", [helper.make_tensor_value_info("x", TensorProto.FLOAT, SHAPE)],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, SHAPE)])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)], ir_version=10).SerializeToString()


def fit(ms: list[float | None]) -> tuple[float, float]:
    """(microseconds per node, microseconds per run) from the medians of the LENGTHS chains."""
    slope, intercept = np.polyfit(np.array(LENGTHS, float), 1000 * np.array(ms, float), 1)
    return float(slope), float(intercept)


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--provider", default="cuda")
    ap.add_argument("--out", help="also write the table to this file")
    args = ap.parse_args(argv)
    set_runtime_log(debug=False)
    want = parse_providers(args.provider)[0]
    got, why = probe_provider(args.provider)
    if got != want:
        text = f"{args.provider}: not available here ({why}); nothing measured"
        print(text)
        write_section("ort_overhead", "ONNX Runtime's cost per node", text)
        return 0
    feeds = {"x": np.random.default_rng(0).standard_normal(SHAPE).astype(np.float32)}
    lines = [f"ONNX Runtime per-node cost on {want}: chains of Relus, {', '.join(map(str, LENGTHS))} nodes on a "
             f"{SHAPE[0]}x{SHAPE[1]} fp32 tensor, median of 120 runs each in interleaved rounds; least-squares fit.", "",
             "| timing | us per node | us per run (intercept) | medians (ms) |", "|---|---|---|---|"]
    models = [chain(n) for n in LENGTHS]
    for resident in (True, False):
        ms = latencies_ms(models, [feeds] * len(models), args.provider, resident=resident, runs=120, rounds=6)
        per_node, per_run = fit(ms)
        lines.append(f"| {'resident (IOBinding)' if resident else 'session.run, host arrays'} | {per_node:.2f} "
                     f"| {per_run:.1f} | {' / '.join(f'{m:.3f}' for m in ms)} |")
    text = "\n".join(lines)
    print(text)
    write_section("ort_overhead", "ONNX Runtime's cost per node", text)
    if args.out:
        atomic_write_text(args.out, text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
