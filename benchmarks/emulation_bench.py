"""Emulation benchmark: what an emulated forward pass costs against the fp32 one, per format.

    .venv/bin/python benchmarks/emulation_bench.py [--rounds N] [models/x.py ...]

Every plan a tune judges is run as the model's emulation (fp32 tensors, every rounding of the plan
explicit), so its cost against one fp32 forward is the unit price of the search's real evaluations
(issue 19's goal: at most 2x in every format). For each zoo model, and each format, the uniform
plan (every layer the profile sees in that format, fp8 layers with the fast profile's calibrated
amax) is applied with :func:`autoprec.api.apply_plan`, and the emulated module and the fp32 one run
over the model's calibration batches without gradients, as a tune measures a plan (each fp8 weight
rounded once per run, :func:`autoprec.torch.semantics.reuse_weight_rounding`), interleaved round
by round so that the machine's drift hits both alike. Printed per format: the median over rounds of that round's
emulated / fp32 time, and the fastest emulated run against the fastest fp32 one.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.results import write_section, zoo  # noqa: E402
from autoprec.api import act_amax_from_profile, apply_plan, capture, load_model_spec, profile  # noqa: E402
from autoprec.core.formats import Precision  # noqa: E402
from autoprec.torch.semantics import reuse_weight_rounding  # noqa: E402

FORMATS = (Precision.BF16, Precision.FP16, Precision.FP8_E4M3, Precision.FP8_E5M2)
GOAL = 2.0


def _run(module: Callable[..., Any], batches: list[tuple[Any, ...]]) -> float:
    """Seconds to run ``module`` over ``batches`` as a tune's measurement of a plan does."""
    start = time.perf_counter()
    with torch.no_grad(), reuse_weight_rounding():
        for b in batches:
            module(*b)
    return time.perf_counter() - start


def bench(path: Path, rounds: int) -> dict[str, Any]:
    spec = load_model_spec(path)
    captured = capture(spec.model(), spec.example_inputs(), name=spec.name)
    batches = spec.calibration_data()
    prof = profile(captured, batches, formats=(Precision.FP8_E4M3,), mode="fast", output_kind=spec.output_kind)
    amax = act_amax_from_profile(prof)
    modules: dict[str, Callable[..., Any]] = {"fp32": captured.gm}
    for f in FORMATS:
        modules[f.value] = apply_plan(captured, {name: f for name in prof.errors}, amax, share_weights=True)
    times: dict[str, list[float]] = {k: [] for k in modules}
    for m in modules.values():  # warm up: first-call allocations and lazy imports
        _run(m, batches)
    for _ in range(rounds):
        for k, m in modules.items():
            times[k].append(_run(m, batches))
    fp32 = times["fp32"]
    ratios = {f.value: (statistics.median(t / b for t, b in zip(times[f.value], fp32)), min(times[f.value]) / min(fp32))
              for f in FORMATS}
    return {"model": spec.name, "layers": len(prof.errors), "batches": len(batches),
            "fp32_ms": 1e3 * min(fp32) / len(batches), "ratios": ratios}


def main(argv: list[str]) -> str:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=15, help="interleaved timing rounds per model (default 15)")
    ap.add_argument("models", nargs="*", help="model files (default: the zoo)")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    rows = [bench(Path(p), args.rounds) for p in (args.models or zoo())]
    head = " | ".join(f"{f.value}" for f in FORMATS)
    lines = [
        f"Emulated forward / fp32 forward over the calibration batches, no gradients, {args.rounds} interleaved "
        f"rounds, {torch.get_num_threads()} threads: the median of the rounds' ratios (the fastest run's "
        f"ratio in brackets). Goal: at most {GOAL:g}x in every format.",
        "",
        f"| model | layers | batches | fp32 ms per batch | {head} | goal held |",
        "|---|---|---|---|" + "---|" * len(FORMATS) + "---|",
    ]
    for r in rows:
        cells = " | ".join(f"{med:.2f}x ({best:.2f}x)" for med, best in r["ratios"].values())
        held = "yes" if all(med <= GOAL for med, _ in r["ratios"].values()) else "no"
        lines.append(f"| {r['model']} | {r['layers']} | {r['batches']} | {r['fp32_ms']:.1f} | {cells} | {held} |")
    return "\n".join(lines)


if __name__ == "__main__":
    out = main(sys.argv[1:])
    print(out)
    write_section("emulation", "Emulation: an emulated forward against the fp32 one", out)
