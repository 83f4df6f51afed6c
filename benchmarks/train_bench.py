"""Training benchmark: a tuned plan trained from scratch against fp32, and the numerics monitor's cost.

    .venv/bin/python benchmarks/train_bench.py [models/x.py ...] [--budget 0.5%] [--epochs N]
                                               [--monitor-epochs 1] [--repeats 3] [--seed 0] [--quick]

For each model (default: char_transformer and digits_cnn), the plan is tuned at the budget
(:func:`autoprec.api.tune`, on the model's pretrained weights), then the untrained network (the model
file's build(), seeded) is trained twice with :func:`autoprec.training.train`, the same seed, data
order and number of steps: once with every layer in fp32 (``formats="fp32"``) and once under the
tuned plan (its rewritten graph in emulate mode: the plan's forward and backward numerics, loss
scaling, promotions). Epochs: the model file's TRAIN_EPOCHS, or ``--epochs``. Printed per model: the
plan's formats, the held-out metric of each trained model (the model file's evaluate(), under the
run's own numerics), the plan run's relative drop against the fp32 run's metric next to the budget
(within: yes/no; it is a measurement, not a failure: the exit code does not depend on it), the plan
run's skipped steps and promotions, and the wall time of each train() call alone (time.perf_counter;
tuning is not timed) with their ratio, emulated plan / fp32. Both runs go through the same loop and
the same fx graph, so the ratio is what the plan's emulated roundings, its loss scaler and the monitor
cost on this CPU, not what the plan would gain on a GPU.

The monitor's cost: the tuned plan trained for ``--monitor-epochs`` (1) with ``monitor=True`` and
``monitor=False`` (the same numerics, without counting what each rounding lost), ``--repeats`` (3)
runs of each, interleaved on/off, and the ratio of the medians (on / off). Wall times on a shared
2-core machine wobble by ~10%; the ratios are what to compare.

``--quick`` (a smoke run): 1 epoch per training run and 1 repeat of each monitor run. Nothing is
downloaded (the zoo's data is scikit-learn's bundled digits and this interpreter's standard library).
Exits 0 when every run completed.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from autoprec.api import tune  # noqa: E402
from autoprec.core.metrics import DropBudget, metric_drop  # noqa: E402
from autoprec.torch.spec import load_model_spec  # noqa: E402
from autoprec.training import train  # noqa: E402

MODELS = ("char_transformer", "digits_cnn")


def model_path(name: str) -> Path:
    p = Path(name)
    return p if p.suffix == ".py" else ROOT / "models" / f"{name}.py"


def timed_train(path: Path, plan: Any = None, **kw: Any) -> tuple[Any, float]:
    """One train() call and its wall seconds (the call alone)."""
    t0 = time.perf_counter()
    result = train(str(path), plan, **kw)
    return result, time.perf_counter() - t0


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="*", default=list(MODELS))
    ap.add_argument("--budget", default="0.5%")
    ap.add_argument("--epochs", type=int, help="epochs of the fp32 and plan runs (default: the model file's TRAIN_EPOCHS)")
    ap.add_argument("--monitor-epochs", type=int, default=1, help="epochs of each monitor on/off run (default 1)")
    ap.add_argument("--repeats", type=int, default=3, help="runs of each monitor setting; the median is used (default 3)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="1 epoch per run, 1 repeat of each monitor run")
    args = ap.parse_args(argv)
    epochs = 1 if args.quick else args.epochs
    repeats = 1 if args.quick else args.repeats
    budget = DropBudget.parse(args.budget)

    train_lines = ["| model | plan formats | epochs (steps) | metric fp32 run | metric plan run | rel. drop / budget "
                   "| within | skipped steps | promotions | train s fp32 | train s plan | plan / fp32 |",
                   "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    monitor_lines = ["| model | epochs (steps) | runs | median s monitor on | median s monitor off | on / off |",
                     "|---|---|---|---|---|---|"]
    for name in args.models:
        path = model_path(name)
        spec = load_model_spec(path)
        if spec.evaluate is None:
            print(f"{spec.name}: skipped (no evaluate(): nothing to compare the trained models on)", flush=True)
            continue
        plan = tune(spec, budget=args.budget).plan
        counts = ", ".join(f"{k} {v}" for k, v in plan.format_counts().items())

        fp32, t_fp32 = timed_train(path, formats="fp32", epochs=epochs, seed=args.seed)
        planned, t_plan = timed_train(path, plan, epochs=epochs, seed=args.seed)
        n_epochs = max(r["epoch"] for r in planned.rows)
        if len(fp32.rows) != len(planned.rows):
            raise SystemExit(f"{spec.name}: the runs took {len(fp32.rows)} and {len(planned.rows)} steps")
        if fp32.metric is None or planned.metric is None:
            raise SystemExit(f"{spec.name}: a run recorded no held-out metric")
        drop = metric_drop(fp32.metric, planned.metric, higher_is_better=spec.higher_is_better)
        allowed = budget.allowed_drop(fp32.metric)
        rel = drop / abs(fp32.metric) if fp32.metric else drop
        promos = "; ".join(f"{p.layer} {p.src.value}->{p.dst.value} @{p.step}" for p in planned.promotions)
        train_lines.append(
            f"| {spec.name} | {counts} | {n_epochs} ({len(planned.rows)}) | {spec.metric} {fp32.metric:.4f} "
            f"| {planned.metric:.4f} | {100 * rel:+.3f}% / {budget} | {'yes' if drop <= allowed else 'no'} "
            f"| {planned.skipped_steps} | {len(planned.promotions)}{f' ({promos})' if promos else ''} "
            f"| {t_fp32:.1f} | {t_plan:.1f} | {t_plan / t_fp32:.2f}x |")
        print(train_lines[-1], flush=True)

        times: dict[bool, list[float]] = {True: [], False: []}
        steps = 0
        for _ in range(repeats):
            for on in (True, False):
                r, t = timed_train(path, plan, epochs=args.monitor_epochs, seed=args.seed, monitor=on)
                times[on].append(t)
                steps = len(r.rows)
        on_s, off_s = statistics.median(times[True]), statistics.median(times[False])
        monitor_lines.append(f"| {spec.name} | {args.monitor_epochs} ({steps}) | {repeats} + {repeats} "
                             f"| {on_s:.1f} | {off_s:.1f} | {on_s / off_s:.3f}x |")
        print(monitor_lines[-1], flush=True)

    print()
    print(f"Training from scratch, fp32 against the plan tuned at {args.budget} (seed {args.seed}):")
    print("\n".join(train_lines))
    print()
    print("The numerics monitor's cost (the tuned plan, median wall time of the train() calls):")
    print("\n".join(monitor_lines))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
