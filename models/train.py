"""Retrain the bundled models and write their weights to models/weights/<name>.pt.

    python models/train.py                  # every trainable model in models/
    python models/train.py digits_cnn ...   # only these

A model file is trainable when it defines ``build()`` (the untrained network), ``train_data()``
(a list of (inputs, targets) batches), ``loss(model, batch)`` and ``TRAIN_EPOCHS``; it may set
``TRAIN_LR`` (default 1e-3), ``TRAIN_WEIGHT_DECAY`` (default 0, applied to weights with 2+
dimensions only) and ``TRAIN_WARMUP_STEPS`` (default 0). The loop is the same for all: AdamW,
linear warm-up then cosine decay to zero, gradient-norm clipping at 1, batches visited in a
seeded random order each epoch. Everything is seeded and torch runs in deterministic mode, so a
rerun on the same machine (same torch, same thread count) reproduces the weights.
The held-out metric from the model's ``evaluate()`` is printed at the end; the weights file is
written atomically (temp file, then os.replace).
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from pathlib import Path

import torch

from autoprec import training
from autoprec.training import lr_factor  # the schedule `autoprec train` uses too

MODELS_DIR = Path(__file__).resolve().parent
SEED = 0


def seed_everything(seed: int = SEED) -> None:
    training.seed_everything(seed)
    torch.use_deterministic_algorithms(True)


def _import(name: str):
    if str(MODELS_DIR) not in sys.path:
        sys.path.insert(0, str(MODELS_DIR))
    return importlib.import_module(name)


def is_trainable(mod) -> bool:
    return all(callable(getattr(mod, f, None)) for f in ("build", "train_data", "loss")) and hasattr(
        mod, "TRAIN_EPOCHS")


def trainable_models() -> list[str]:
    names = []
    for p in sorted(MODELS_DIR.glob("*.py")):
        if p.stem in ("train", "zoo_common") or p.stem.startswith("_"):
            continue
        if is_trainable(_import(p.stem)):
            names.append(p.stem)
    return names


def train(name: str) -> float:
    mod = _import(name)
    if not is_trainable(mod):
        raise SystemExit(f"{name}: not trainable (needs build(), train_data(), loss() and TRAIN_EPOCHS)")
    seed_everything()
    start = time.perf_counter()
    net = mod.build()
    data = mod.train_data()
    epochs = int(mod.TRAIN_EPOCHS)
    lr = float(getattr(mod, "TRAIN_LR", 1e-3))
    weight_decay = float(getattr(mod, "TRAIN_WEIGHT_DECAY", 0.0))
    warmup = int(getattr(mod, "TRAIN_WARMUP_STEPS", 0))
    decay = [p for p in net.parameters() if p.dim() >= 2]
    no_decay = [p for p in net.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=lr)
    total = epochs * len(data)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, total, warmup))
    order_gen = torch.Generator().manual_seed(SEED)
    n_params = sum(p.numel() for p in net.parameters())
    print(f"[{name}] {n_params:,} parameters, {len(data)} batches x {epochs} epochs = {total} steps", flush=True)
    report_every = max(1, epochs // 10)
    for epoch in range(epochs):
        net.train()
        running = 0.0
        for i in torch.randperm(len(data), generator=order_gen).tolist():
            loss = mod.loss(net, data[i])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
            opt.step()
            sched.step()
            running += float(loss.detach())
        if (epoch + 1) % report_every == 0 or epoch + 1 == epochs:
            msg = f"[{name}] epoch {epoch + 1}/{epochs}  train loss {running / len(data):.4f}"
            if callable(getattr(mod, "evaluate", None)):
                msg += f"  held-out {mod.METRIC} {mod.evaluate(net):.4f}"
            print(msg + f"  ({time.perf_counter() - start:.0f} s)", flush=True)
    net.eval()
    import zoo_common  # after _import put models/ on sys.path

    path = zoo_common.save_weights(net, getattr(mod, "NAME", name))
    elapsed = time.perf_counter() - start
    metric = mod.evaluate(net) if callable(getattr(mod, "evaluate", None)) else float("nan")
    print(f"[{name}] done in {elapsed:.1f} s: held-out {getattr(mod, 'METRIC', 'metric')} = {metric:.4f}"
          f"  -> {path} ({path.stat().st_size / 1e6:.2f} MB)", flush=True)
    return metric


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("names", nargs="*", help="model files to train (default: every trainable one)")
    args = ap.parse_args(argv)
    names = args.names or trainable_models()
    results = {}
    for name in names:
        results[name] = train(name.removesuffix(".py"))
    if len(results) > 1:
        print("summary:", ", ".join(f"{k} {v:.4f}" for k, v in results.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
