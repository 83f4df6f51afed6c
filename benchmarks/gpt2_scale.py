"""GPT-2 at 124M parameters through `autoprec tune` on this machine: peak memory and tuning cost.

Runs ``autoprec tune benchmarks/models/gpt2_124m.py --fidelity-budget 1%`` (2 calibration batches of
2 x 64 tokens) in a child process and prints its peak resident memory (the child's ru_maxrss), its
wall time and the tuning time in fp32 evaluations as the tune reports it, with the tune's summary
lines (the plan's estimated speedup and deployed memory). The goal (issue "Real models"): peak RSS at
most 3 GB on a 2-core CPU machine; the fp32 weights alone are 0.5 GB. ``--io fp16`` tunes for a
deployment that returns fp16 logits (``autoprec tune --io``): at the priced batch of 1024 x 64 tokens
the fp32 copy of 16-bit logits is most of the deployed memory. ``--memory-only`` skips the tune and
prints the deployed memory of the all-fp16 plan with fp32 and with fp16 I/O
(:func:`autoprec.cost.memory.deployed_memory` of the captured graph at batch 1024).

    python benchmarks/gpt2_scale.py [--out DIR] [--io fp32|fp16] [--memory-only]
"""

from __future__ import annotations

import argparse
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "benchmarks" / "models" / "gpt2_124m.py"
sys.path.insert(0, str(ROOT))

from benchmarks.results import write_section  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="output folder of the tune (default: a temporary one)")
    ap.add_argument("--io", choices=("fp32", "fp16"), default="fp32", help="the tune's --io (default fp32)")
    ap.add_argument("--memory-only", action="store_true", help="only the all-fp16 plan's deployed memory per I/O format")
    args = ap.parse_args()
    if args.memory_only:
        return memory_by_io()
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or str(Path(tmp) / "gpt2")
        cmd = [sys.executable, "-m", "autoprec.cli", "tune", str(MODEL), "--fidelity-budget", "1%", "--io", args.io,
               "--out", out]
        t0 = time.perf_counter()
        run = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    text = " ".join(run.stdout.split())
    evals = re.search(r"= ([0-9.]+) fp32 evaluations", text)
    lines = [f"autoprec tune gpt2_124m --io {args.io} (124M parameters, fp32 weights 0.50 GB): exit {run.returncode}",
             f"peak RSS {peak_kb / 1024 ** 2:.2f} GB (goal <= 3 GB); wall {wall:.0f} s; "
             f"tuning = {evals.group(1) if evals else '?'} fp32 evaluations"]
    lines += [line for line in run.stdout.splitlines() if line.startswith(("estimated speedup", "coverage:", "formats:"))]
    if run.returncode:
        lines.append(run.stderr.strip().splitlines()[-1] if run.stderr.strip() else "(no stderr)")
    print("\n".join(lines))
    write_section(f"gpt2_scale_io_{args.io}", f"GPT-2 124M through autoprec tune, {args.io} I/O",
                  "\n".join(f"- {line}" for line in lines))
    return run.returncode


def memory_by_io() -> int:
    """The all-fp16 plan's deployed memory against all-fp32 at batch 1024, with fp32 and fp16 I/O."""
    sys.path.insert(0, str(MODEL.parent))
    import gpt2_124m

    from autoprec.core.formats import Precision
    from autoprec.cost.memory import deployed_memory
    from autoprec.torch.capture import capture

    graph = capture(gpt2_124m.model(), gpt2_124m.example_inputs(), name="gpt2_124m").graph.at_batch(1024)
    fp32 = deployed_memory(graph, {})
    half = {op.name: Precision.FP16 for op in graph.layers()}
    lines = []
    for io in (Precision.FP32, Precision.FP16):
        ratio = deployed_memory(graph.with_io(io), half) / fp32
        lines.append(f"all-fp16 with {io} inputs and outputs: deployed memory {100 * ratio:.1f}% of all-fp32 "
                     f"({fp32 / 1e9:.1f} GB) at batch 1024")
        print(lines[-1])
    write_section("gpt2_memory", "GPT-2 124M: deployed memory by I/O format", "\n".join(f"- {line}" for line in lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
