"""Run the benchmarks and write BENCHMARKS.md from their sections (what ``make bench`` does).

    .venv/bin/python benchmarks/write_benchmarks.py [--only NAME,...] [--skip NAME,...] [--assemble-only] [--list]

Each benchmark writes its own section, with the command, commit, machine and wall time it ran with,
to ``benchmarks/results/<name>.md`` (:mod:`benchmarks.results`); this script runs them one after the
other (each in its own process: one benchmark's memory or crash does not touch the next) and joins
the sections, in the order of :data:`BENCHES`, into BENCHMARKS.md at the repository root. A section
a benchmark has not written yet reads "not run yet" with the command that writes it; a benchmark
that fails in this run is named at the top, beside the commit its section (possibly an older one)
comes from. ``--only``/``--skip`` run a subset and keep the other sections as they are, so one slow
benchmark can be re-run alone and the file re-assembled. A full run takes hours on a 2-core CPU:
the zoo of ONNX test models and the training runs dominate. benchmarks/analysis.md, the reading of
the figures written by hand, follows the table of sections. Exit status: 0 when every benchmark run
exited 0.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from autoprec.core.io import atomic_write_text  # noqa: E402
from benchmarks.results import commit, machine, results_dir  # noqa: E402


@dataclass(frozen=True)
class Bench:
    """One benchmark run: the section it writes and the command line that writes it."""

    section: str
    argv: tuple[str, ...]

    @property
    def command(self) -> str:
        return "python " + " ".join(self.argv)


#: The benchmarks in the order BENCHMARKS.md shows them: the comparison with the peers first.
BENCHES: tuple[Bench, ...] = (
    Bench("peers", ("benchmarks/peers_bench.py",)),
    Bench("resnet18_gap", ("benchmarks/resnet18_gap.py",)),
    Bench("scaling", ("benchmarks/scaling_bench.py",)),
    Bench("prediction", ("benchmarks/prediction_bench.py",)),
    Bench("profile", ("benchmarks/profile_bench.py",)),
    Bench("emulation", ("benchmarks/emulation_bench.py",)),
    Bench("tune", ("benchmarks/tune_bench.py",)),
    Bench("deploy", ("benchmarks/deploy_bench.py",)),
    Bench("onnx_input", ("benchmarks/onnx_input_bench.py",)),
    Bench("gpt2_scale_io_fp32", ("benchmarks/gpt2_scale.py",)),
    Bench("gpt2_scale_io_fp16", ("benchmarks/gpt2_scale.py", "--io", "fp16")),
    Bench("gpt2_memory", ("benchmarks/gpt2_scale.py", "--memory-only")),
    Bench("train", ("benchmarks/train_bench.py",)),
    Bench("onnx_zoo", ("benchmarks/onnx_zoo_bench.py",)),
    Bench("frontend_pricing", ("benchmarks/frontend_pricing.py",)),
    Bench("bias_rounding", ("benchmarks/bias_rounding.py",)),
    Bench("scale_fusion", ("benchmarks/scale_fusion.py",)),
    Bench("ort_overhead", ("benchmarks/ort_overhead.py",)),
)

#: The reading of the figures, written by hand (what the numbers mean, where a peer wins and why):
#: placed after the table of sections.
ANALYSIS = ROOT / "benchmarks" / "analysis.md"

_HEADER = """# Benchmarks

Written by `make bench` (`python benchmarks/write_benchmarks.py`), which runs every benchmark below
and joins the sections they write. Each section says the command, commit, machine and wall time its
figures come from; a section can be re-measured alone
(`python benchmarks/write_benchmarks.py --only NAME`). Speedups and memory are autoprec's cost-model
estimates for the target GPU (H100 unless a section says otherwise); accuracies and drops are measured,
low-precision values really rounded (ONNX Runtime's CPU provider would drop fp16 rounding).
"""


def run(bench: Bench) -> tuple[int, float]:
    """Run one benchmark in a child process (its output goes straight to ours); its exit code and
    wall time."""
    print(f"== {bench.command}", flush=True)
    t0 = time.perf_counter()
    code = subprocess.run([sys.executable, *bench.argv], cwd=ROOT).returncode
    return code, time.perf_counter() - t0


def section_commit(text: str) -> str:
    m = re.search(r"at commit (\S+),", text)
    return m.group(1) if m else "?"


def assemble(statuses: dict[str, tuple[int, float]], out: Path) -> str:
    """BENCHMARKS.md's text from the sections in ``results_dir()``; ``statuses``: this run's exit
    codes and wall times, by section."""
    folder = results_dir()
    rows = ["| section | measured at commit | this run |", "|---|---|---|"]
    bodies = []
    for b in BENCHES:
        path = folder / f"{b.section}.md"
        text = path.read_text() if path.exists() else None
        if b.section in statuses:
            code, wall = statuses[b.section]
            now = f"exit {code} in {wall:.0f} s" + ("" if code == 0 else " (failed: see its output)")
        else:
            now = "not run (section kept)"
        rows.append(f"| [{b.section}](#{b.section}) | {section_commit(text) if text else 'not run yet'} | {now} |")
        anchor = f'<a id="{b.section}"></a>\n\n'
        bodies.append(anchor + (text.rstrip() if text else f"## {b.section}\n\nNot run yet: `{b.command}`."))
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    analysis = ANALYSIS.read_text().strip() + "\n" if ANALYSIS.exists() else ""
    head = (_HEADER + f"\nAssembled at commit {commit()}, {stamp}, on: {machine()}.\n\n" + "\n".join(rows) + "\n"
            + ("\n" + analysis if analysis else ""))
    text = head + "\n" + "\n\n".join(bodies) + "\n"
    atomic_write_text(out, text)
    return text


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", help="comma-separated sections to run (the others are kept as they are)")
    ap.add_argument("--skip", help="comma-separated sections not to run")
    ap.add_argument("--assemble-only", action="store_true", help="run nothing; join the sections there are")
    ap.add_argument("--list", action="store_true", help="print the sections and their commands")
    ap.add_argument("--out", default=str(ROOT / "BENCHMARKS.md"), help="the file to write (default BENCHMARKS.md)")
    args = ap.parse_args(argv)
    names = {b.section for b in BENCHES}
    chosen = {s for s in (args.only or "").split(",") if s}
    skipped = {s for s in (args.skip or "").split(",") if s}
    unknown = sorted((chosen | skipped) - names)
    if unknown:
        print(f"error: unknown section {', '.join(unknown)}: use --list to see them", file=sys.stderr)
        return 2
    if args.list:
        for b in BENCHES:
            print(f"{b.section:20} {b.command}")
        return 0
    statuses: dict[str, tuple[int, float]] = {}
    if not args.assemble_only:
        for b in BENCHES:
            if (chosen and b.section not in chosen) or b.section in skipped:
                continue
            statuses[b.section] = run(b)
    assemble(statuses, Path(args.out))
    failed = [s for s, (code, _) in statuses.items() if code]
    print(f"wrote {args.out}" + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
