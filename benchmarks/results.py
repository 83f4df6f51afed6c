"""Where a benchmark leaves its figures for BENCHMARKS.md.

Every benchmark prints its table and also writes it, with the command, commit, machine and wall time
it ran with, to ``benchmarks/results/<name>.md`` (plots beside it as ``<name>*.png``).
``benchmarks/write_benchmarks.py`` runs the benchmarks and joins these sections into BENCHMARKS.md,
so each section of that file says exactly when and how its figures were measured, including a section
re-run alone later. ``BENCH_RESULTS`` points the files elsewhere (the tests use a temporary folder).
"""

from __future__ import annotations

import os
import platform
import shlex
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_START = time.perf_counter()


def zoo() -> list[Path]:
    """The bundled zoo's model files (models/*.py but the training script and its shared helpers)."""
    return sorted(p for p in (ROOT / "models").glob("*.py") if p.stem not in ("train", "zoo_common"))


def results_dir() -> Path:
    """The folder the sections and plots go to (created)."""
    d = Path(os.environ.get("BENCH_RESULTS", ROOT / "benchmarks" / "results"))
    d.mkdir(parents=True, exist_ok=True)
    return d


def plot_path(name: str) -> Path:
    """Where a plot called ``name`` (a file stem) is written; BENCHMARKS.md links it relative to itself."""
    return results_dir() / f"{name}.png"


def commit() -> str:
    """The commit the figures come from, with ``+dirty`` when autoprec/ or benchmarks/ differ from it
    (a figure from uncommitted code cannot be reproduced from the file's commit alone)."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "autoprec", "benchmarks", "models"], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout
        dirty = "\n".join(line for line in dirty.splitlines() if "benchmarks/results/" not in line)
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return head + ("+dirty" if dirty.strip() else "")


def machine() -> str:
    """One line: CPU model, cores and memory, and the library versions that set the figures."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        mem_kb = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                      if line.startswith("MemTotal"))
        mem = f", {mem_kb / 2**20:.0f} GiB"
    except (OSError, StopIteration):
        mem = ""
    versions = []
    for mod in ("torch", "onnxruntime", "onnx"):
        try:
            versions.append(f"{mod} {__import__(mod).__version__}")
        except ImportError:
            pass
    return f"{cpu}, {os.cpu_count()} cores{mem}; Python {platform.python_version()}, {', '.join(versions)}"


def _load() -> str:
    """The 15-minute load average: above the core count, other work shared the machine, and the
    wall-time figures (tuning time in fp32 evaluations, the profile's passes) are the less certain."""
    try:
        return f"{os.getloadavg()[2]:.1f}"
    except OSError:
        return "unknown"


def write_section(name: str, title: str, body: str, plots: tuple[str, ...] = ()) -> Path:
    """Write ``results/<name>.md``: ``title``, how it was run, ``body`` (markdown) and links to ``plots``
    (stems given to :func:`plot_path`). The file is written whole or not at all."""
    argv = " ".join(shlex.quote(a) for a in sys.argv[1:])
    script = Path(sys.argv[0]).resolve()
    rel = script.relative_to(ROOT) if script.is_relative_to(ROOT) else script
    head = [
        f"## {title}",
        "",
        f"`python {rel}{' ' + argv if argv else ''}` at commit {commit()}, "
        f"{datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}, {time.perf_counter() - _START:.0f} s wall.  ",
        f"Machine: {machine()}; load average over the last 15 minutes at the end: {_load()}.",
        "",
    ]
    links = [f"![{p}](benchmarks/results/{p}.png)" for p in plots]
    text = "\n".join(head) + "\n" + body.rstrip() + "\n" + ("\n" + "\n".join(links) + "\n" if links else "")
    out = results_dir() / f"{name}.md"
    tmp = out.with_suffix(".md.tmp")
    tmp.write_text(text)
    tmp.replace(out)
    return out
