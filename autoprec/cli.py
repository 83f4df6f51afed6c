"""The ``autoprec`` command line. Logging is configured here and nowhere else.

Every user-facing failure is an :class:`~autoprec.errors.AutoprecError`: the CLI prints its one
line to stderr and exits with its code; tracebacks are for bugs only (or ``--debug``).
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from typing import Sequence

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from autoprec.errors import AutoprecError
from autoprec.formats import DEFAULT_CANDIDATES, parse_precisions

err_console = Console(stderr=True)


def _progress() -> Progress:
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[what]}"), TimeElapsedColumn(), console=err_console,
                    transient=True, disable=not err_console.is_terminal)


def _fmt_err(x: float) -> str:
    return "inf" if not math.isfinite(x) else f"{x:.2e}"


def _flops(n: int) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= div:
            return f"{n / div:.1f}{unit}"
    return str(n)


def cmd_profile(args: argparse.Namespace) -> int:
    from autoprec import api
    from autoprec.io import atomic_write_text

    formats = parse_precisions(args.formats)
    with _progress() as bar:
        task = bar.add_task(f"profile ({args.mode})", total=None, what="")

        def progress(done: int, total: int, what: str) -> None:
            bar.update(task, completed=done, total=total, what=what)

        prof, captured = api.profile_model(args.model, mode=args.mode, formats=formats,
                                           capture_method=args.capture, progress=progress)
    if args.json:
        atomic_write_text(args.json, prof.to_json())
    out = Console()
    table = Table(title=f"{prof.model_name}: {prof.mode} sensitivity ({prof.measure} of the output, "
                        f"{prof.samples} calibration samples, captured by {captured.method})")
    table.add_column("layer")
    table.add_column("kind")
    table.add_column("scope")
    table.add_column("FLOPs", justify="right")
    for f in prof.formats:
        table.add_column(str(f), justify="right")
    table.add_column("amax in/out", justify="right")
    table.add_column("flags")
    for op in captured.graph.layers():
        r = prof.ranges.get(op.name)
        amax = f"{max(s.amax for s in r.inputs):.3g}/{r.output.amax:.3g}" if r else ""
        fl = prof.flags.get(op.name, [])
        table.add_row(op.name, op.kind, op.scope, _flops(op.flops),
                      *[_fmt_err(prof.errors[op.name][f]) for f in prof.formats], amax,
                      "; ".join(x.split(":")[0] for x in fl))
    out.print(table)
    for name in [n for n in prof.errors if n in prof.flags]:
        for line in prof.flags[name]:
            out.print(f"  [bold]{name}[/]: {line}")
    worst = prof.most_sensitive(3)
    out.print(f"Most sensitive: {', '.join(worst)}. "
              + ("; ".join(f"{n}: {prof.flags[n][0]}" for n in worst[:1] if n in prof.flags)
                 or "no layer stands out from the others."))
    out.print(f"Profiling took {prof.seconds:.1f} s = {prof.cost_passes:.1f} fp32 forward passes over the "
              f"calibration data" + (f" (each trial re-ran {100 * prof.rerun_fraction:.0f}% of the graph on average)"
                                     if prof.mode == "exact" else "") + ".")
    if args.json:
        out.print(f"Wrote {args.json}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="autoprec", description="Per-layer mixed precision (fp32/bf16/fp16/fp8) "
                                "for PyTorch models under an accuracy budget.")
    p.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    sub = p.add_subparsers(dest="command", required=True)

    pr = sub.add_parser("profile", help="per-layer sensitivity to bf16/fp16/fp8, with range statistics")
    pr.add_argument("model", help="model file following models/README.md, e.g. models/digits_cnn.py")
    pr.add_argument("--mode", choices=("fast", "exact"), default="exact",
                    help="exact: isolated trials with downstream-only re-runs; fast: one forward+backward "
                         "first-order estimate (default: exact)")
    pr.add_argument("--formats", default=",".join(f.value for f in DEFAULT_CANDIDATES),
                    help="comma-separated candidate formats (default: bf16,fp16,fp8_e4m3)")
    pr.add_argument("--capture", choices=("auto", "fx", "export"), default="auto",
                    help="capture method (default: fx, falling back to torch.export)")
    pr.add_argument("--json", metavar="FILE", help="also write the profile as JSON")
    pr.set_defaults(func=cmd_profile)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args))
    except AutoprecError as exc:
        if args.debug:
            raise
        err_console.print(f"[red]error:[/] {exc}", highlight=False)
        return exc.exit_code
    except KeyboardInterrupt:
        err_console.print("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
