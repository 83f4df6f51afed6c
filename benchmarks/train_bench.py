"""Training benchmark: a tuned plan trained from scratch against fp32, and the numerics monitor's cost.

    .venv/bin/python benchmarks/train_bench.py [models/x.py ...] [--budget 0.5%] [--epochs N] [--max-steps N]
                                               [--monitor-epochs 1] [--monitor-steps 20] [--repeats 3]
                                               [--seed 0] [--quick] [--monitor-only]

For each model (default: digits_cnn, then char_transformer) the plan is tuned at the budget
(:func:`autoprec.api.tune`, on the model's pretrained weights). Then:

- the numerics monitor's cost: the tuned plan trained from scratch for ``--monitor-epochs`` (1) over
  the first ``--monitor-steps`` (20) batches of the model file's train_data(), with the monitor off
  (the same numerics, without counting what each rounding lost), counting every step
  (``monitor_every=1``) and counting its default one step in MONITOR_EVERY (10; what ``autoprec
  train`` does), ``--repeats`` (3) runs of each, interleaved, the same seed; printed: the median
  wall time of each and their ratios to the run without the monitor. A fixed number of steps keeps this part short on a CPU, where one epoch
  of char_transformer under its plan takes many minutes. Without the monitor nothing counts the
  losses, so nothing is promoted: the two runs compute the same only up to the first promotion
  (steps 115 and 226 of char_transformer's and digits_cnn's plans at seed 0, after these 20 steps);
- fp32 against the plan: the untrained network (the model file's build(), seeded) trained twice with
  :func:`autoprec.training.train`, the same seed, data order and number of steps: once with every
  layer in fp32 (``formats="fp32"``) and once under the tuned plan (its rewritten graph in emulate
  mode: the plan's forward and backward numerics, loss scaling, promotions). Epochs: the model
  file's TRAIN_EPOCHS, or ``--epochs``; ``--max-steps N`` trains on the first N batches of each
  epoch only. Printed: the plan's formats, the held-out metric of each trained model (the model
  file's evaluate(), under the run's own numerics), the plan run's relative drop against the fp32
  run's metric next to the budget (within: yes/no; a measurement, not a failure: the exit code does
  not depend on it), the plan run's skipped steps and promotions, and the wall time of each train()
  call alone (time.perf_counter; tuning is not timed) with their ratio, emulated plan / fp32.

Both runs go through the same loop and the same fx graph, so the time ratio is what the plan's
emulated roundings (elementwise fp32 work around fp32 GEMMs), its loss scaler and the monitor cost on
this CPU, not what the plan would gain on a GPU. Wall times on a shared 2-core machine wobble by ~10%
and more; the ratios are what to compare. Each row is printed as soon as it is measured, and the two
tables again at the end (also, with what was measured so far, when the run is interrupted: Ctrl-C or
SIGTERM, e.g. from ``timeout``; it then exits 130).

A full run takes long on a 2-core CPU: char_transformer's fp32 run (5 epochs of 383 steps) took
20 minutes on a busy 2-core machine, and its plan run ~20 minutes per epoch. ``--quick`` (a smoke
run): 1 epoch of at most 20 steps per training run, and 1 repeat of each monitor run. Nothing is
downloaded (the zoo's data is scikit-learn's bundled digits and this interpreter's standard
library). ``--monitor-only`` times the monitor and skips the fp32 against plan runs. Exits 0 when
every run completed.
"""

from __future__ import annotations

import argparse
import signal
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.results import write_section  # noqa: E402
from autoprec.api import tune  # noqa: E402
from autoprec.core.metrics import DropBudget, metric_drop  # noqa: E402
from autoprec.torch.spec import load_model_spec  # noqa: E402
from autoprec.training import MONITOR_EVERY, seed_everything, train  # noqa: E402

MODELS = ("digits_cnn", "char_transformer")  # the quick one first: its rows come early


def model_path(name: str) -> Path:
    p = Path(name)
    return p if p.suffix == ".py" else ROOT / "models" / f"{name}.py"


def train_file(path: Path, plan: Any = None, *, seed: int, epochs: int | None = None, max_steps: int | None = None,
               **kw: Any) -> Any:
    """``train(path, ...)``; with ``max_steps``, the same run on the first ``max_steps`` batches of the
    model file's train_data() only (the live-module form of train(), given what train() takes from
    the file itself: build() after seeding, loss, evaluate, the TRAIN_* settings, optimizer/schedule)."""
    if max_steps is None:
        return train(str(path), plan, epochs=epochs, seed=seed, **kw)
    spec = load_model_spec(path)
    mod = spec.module
    seed_everything(seed)
    net = mod.build()
    data = list(mod.train_data())[:max_steps]
    return train(net, plan, data=data, loss=mod.loss, example_inputs=spec.example_inputs(), evaluate=spec.evaluate,
                 metric_name=spec.metric or "metric", epochs=epochs if epochs is not None else mod.TRAIN_EPOCHS,
                 lr=getattr(mod, "TRAIN_LR", 1e-3), weight_decay=getattr(mod, "TRAIN_WEIGHT_DECAY", 0.0),
                 warmup_steps=getattr(mod, "TRAIN_WARMUP_STEPS", 0), clip=getattr(mod, "TRAIN_CLIP", 1.0),
                 optimizer=getattr(mod, "optimizer", None), schedule=getattr(mod, "schedule", None), seed=seed, **kw)


def timed(path: Path, plan: Any = None, **kw: Any) -> tuple[Any, float]:
    """One training run and its wall seconds (the run alone)."""
    t0 = time.perf_counter()
    result = train_file(path, plan, **kw)
    return result, time.perf_counter() - t0


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="*", default=list(MODELS))
    ap.add_argument("--budget", default="0.5%")
    ap.add_argument("--epochs", type=int, help="epochs of the fp32 and plan runs (default: the model file's TRAIN_EPOCHS)")
    ap.add_argument("--max-steps", type=int, help="train the fp32 and plan runs on the first N batches of each epoch")
    ap.add_argument("--monitor-epochs", type=int, default=1, help="epochs of each monitor on/off run (default 1)")
    ap.add_argument("--monitor-steps", type=int, default=20, help="batches per epoch of each monitor run (default 20)")
    ap.add_argument("--repeats", type=int, default=3, help="runs of each monitor setting; the median is used (default 3)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="1 epoch of at most 20 steps per run, 1 repeat per monitor setting")
    ap.add_argument("--monitor-only", action="store_true", help="time the monitor only (no fp32 against plan runs)")
    args = ap.parse_args(argv)
    epochs = 1 if args.quick else args.epochs
    max_steps = min(20, args.max_steps or 20) if args.quick else args.max_steps
    repeats = 1 if args.quick else args.repeats
    budget = DropBudget.parse(args.budget)
    signal.signal(signal.SIGTERM, _interrupt)

    train_lines = ["| model | plan formats | epochs (steps) | metric fp32 run | metric plan run | rel. drop / budget "
                   "| within | skipped steps | promotions | train s fp32 | train s plan | plan / fp32 |",
                   "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    monitor_lines = ["| model | epochs (steps) | runs | median s monitor off | median s every step | median s one "
                     f"in {MONITOR_EVERY} (default) | every step / off | one in {MONITOR_EVERY} / off |",
                     "|---|---|---|---|---|---|---|---|"]
    settings = {"off": {"monitor": False}, "every": {"monitor_every": 1}, "default": {"monitor_every": MONITOR_EVERY}}
    status = 0
    try:
        for name in args.models:
            path = model_path(name)
            spec = load_model_spec(path)
            if spec.evaluate is None:
                print(f"{spec.name}: skipped (no evaluate(): nothing to compare the trained models on)", flush=True)
                continue
            t0 = time.perf_counter()
            plan = tune(spec, budget=args.budget).plan
            counts = ", ".join(f"{k} {v}" for k, v in plan.format_counts().items())
            print(f"{spec.name}: tuned at {args.budget} in {time.perf_counter() - t0:.0f} s: {counts}", flush=True)

            times: dict[str, list[float]] = {k: [] for k in settings}
            steps = 0
            for _ in range(repeats):
                for key, kw in settings.items():
                    r, t = timed(path, plan, epochs=args.monitor_epochs, max_steps=args.monitor_steps, seed=args.seed,
                                 **kw)
                    times[key].append(t)
                    steps = len(r.rows)
            med = {k: statistics.median(v) for k, v in times.items()}
            monitor_lines.append(f"| {spec.name} | {args.monitor_epochs} ({steps}) | {repeats} x 3 | {med['off']:.1f} "
                                 f"| {med['every']:.1f} | {med['default']:.1f} | {med['every'] / med['off']:.3f}x "
                                 f"| {med['default'] / med['off']:.3f}x |")
            print(monitor_lines[-1], flush=True)
            if args.monitor_only:
                continue

            fp32, t_fp32 = timed(path, formats="fp32", epochs=epochs, max_steps=max_steps, seed=args.seed)
            print(f"{spec.name}: fp32 run: {len(fp32.rows)} steps in {t_fp32:.1f} s, {spec.metric} {fp32.metric:.4f}",
                  flush=True)
            planned, t_plan = timed(path, plan, epochs=epochs, max_steps=max_steps, seed=args.seed)
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
    except KeyboardInterrupt:
        print("\ninterrupted: the tables hold what was measured so far", flush=True)
        status = 130

    text = "\n".join([
        f"Training from scratch, fp32 against the plan tuned at {args.budget} (seed {args.seed}"
        f"{f', at most {max_steps} steps per epoch' if max_steps else ''}):", "", *train_lines, "",
        f"The numerics monitor's cost (the tuned plan, first {args.monitor_steps} batches per epoch, median wall "
        "time of the train() calls):", "", *monitor_lines])
    print()
    print(text)
    if status == 0:  # an interrupted run's tables are printed but do not replace the last full section
        write_section("train", "Training with the plan", text)
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
