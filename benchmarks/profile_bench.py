"""Profile benchmark: fast vs exact agreement and the cost of each mode, for every zoo model.

    .venv/bin/python benchmarks/profile_bench.py [models/x.py ...]

Prints a markdown table: Spearman rank correlation between fast and exact errors over all
(layer, format) pairs with finite errors (goal >= 0.8), and each mode's wall time in units of one
fp32 forward pass over the calibration data (goals: exact <= L x formats / 2, fast <= 3), and the
scale of the fast profile: the factor its calibration multiplied the first-order estimates by, and
the median over layers of fast / exact error per format after it (goal: within 0.5-2x). Wall
times on a shared 2-core machine wobble by ~10%; the FLOP-free ratios are what to compare.
"""

from __future__ import annotations

import math
import statistics
import sys
from pathlib import Path

import torch
from scipy.stats import spearmanr

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.results import write_section, zoo  # noqa: E402
from autoprec.api import capture, load_model_spec, profile  # noqa: E402
from autoprec.core.formats import DEFAULT_CANDIDATES  # noqa: E402


def bench(path: Path) -> dict[str, object]:
    spec = load_model_spec(path)
    captured = capture(spec.model(), spec.example_inputs(), name=spec.name)
    batches = spec.calibration_data()
    exact = profile(captured, batches, formats=DEFAULT_CANDIDATES, mode="exact", output_kind=spec.output_kind)
    fast = profile(captured, batches, formats=DEFAULT_CANDIDATES, mode="fast", output_kind=spec.output_kind)
    pairs = [(e, fast.errors[n][f]) for n in exact.errors for f, e in exact.errors[n].items()
             if math.isfinite(e) and math.isfinite(fast.errors[n][f])]  # inf: the format overflows there
    rho = spearmanr([a for a, _ in pairs], [b for _, b in pairs]).statistic if len(pairs) > 2 else float("nan")
    n_layers = len(exact.errors)
    medians = []
    for f in exact.formats:
        ratios = [fast.errors[n][f] / exact.errors[n][f] for n in exact.errors
                  if 0 < exact.errors[n][f] < math.inf and 0 < fast.errors[n][f] < math.inf]
        if ratios:
            medians.append(f"{f.value} {statistics.median(ratios):.2f}")
    return {
        "scale": fast.calibration.get("scale", 1.0), "medians": ", ".join(medians),
        "model": spec.name, "layers": n_layers, "formats": len(exact.formats), "capture": captured.method,
        "spearman": rho, "exact_passes": exact.cost_passes, "exact_goal": n_layers * len(exact.formats) / 2,
        "rerun": exact.rerun_fraction, "fast_passes": fast.cost_passes,
    }


def main(paths: list[str]) -> str:
    torch.manual_seed(0)
    rows = [bench(Path(p)) for p in (paths or zoo())]
    lines = [
        "| model | capture | layers | Spearman fast~exact (goal >= 0.8) | exact passes | exact goal (L*F/2) "
        "| mean re-run share | fast passes (goal <= 3) | fast calibration factor | median fast / exact (goal 0.5-2) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['model']} | {r['capture']} | {r['layers']} | {r['spearman']:.3f} | {r['exact_passes']:.1f} "
                     f"| {r['exact_goal']:.1f} | {100 * r['rerun']:.0f}% | {r['fast_passes']:.1f} | {r['scale']:.3g} "
                     f"| {r['medians']} |")
    return "\n".join(lines)


if __name__ == "__main__":
    out = main(sys.argv[1:])
    print(out)
    write_section("profile", "Profile: fast against exact, and the cost of each", out)
