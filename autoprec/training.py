"""Training with a plan: ``autoprec train`` and :func:`train`.

The plan's rewritten graph (emulate mode) trains inside :class:`~autoprec.torch.numerics.PlanModule`,
so its backward pass has the plan's numerics (:mod:`autoprec.torch.numerics`): 16-bit gradients,
the fp8 HYBRID recipe, and a monitor that counts what every rounding lost. Around it, one loop:

- the optimizer and schedule of the model file when it defines ``optimizer(model)`` and
  ``schedule(optimizer, total_steps)``, else AdamW with ``TRAIN_LR`` / ``TRAIN_WEIGHT_DECAY``
  (weights with 2+ dimensions only), a linear warm-up of ``TRAIN_WARMUP_STEPS`` and cosine decay to
  zero, gradient-norm clipping at ``TRAIN_CLIP`` (1.0): the loop models/train.py trains the zoo with;
- loss scaling with torch's own :class:`torch.amp.GradScaler` whenever the plan has fp16 layers
  (a step with inf/NaN gradients is skipped and the scale backs off; it grows after 2000 good
  steps); without fp16 a step with non-finite gradients is skipped too, unscaled;
- the monitor counts one step in ``monitor_every`` (:data:`MONITOR_EVERY`): counting costs about
  as much again as the emulated roundings it watches, so a sampled monitor is one that can stay on;
- adaptive precision (:class:`PromotionPolicy`): a layer whose roundings lose more than
  ``threshold`` of their values to overflow or underflow in ``patience`` monitored steps in a row
  is promoted (fp8 -> bf16, fp16 -> bf16, bf16 -> fp32) and the promotion is written into the plan
  with its step and reason; gradient overflow counts only without a loss scaler (with one, it is
  the scaler's business). A FOLLOW op's roundings count for the layers whose format it follows;
- records in the output folder: train.csv (per step: loss, learning rate, loss scale, skipped,
  promotions; the metric at each epoch's end), numerics.csv (per step and site: the monitor's
  counts and amax), training.png (loss and loss scale), TensorBoard events when tensorboard is
  installed, the trained weights (weights.pt, the model's own state_dict names), the plan after
  training (plan.json) and, for a plan with fp8 layers, profile.json (the calibration of the
  trained weights that ``autoprec export`` reads their scales from);
- checkpoints (checkpoint.pt: weights, optimizer, schedule, scaler, fp8 scaling state, plan,
  records, random states) every ``checkpoint_every`` steps and at each epoch's end; ``resume``
  continues from one exactly as if the run had never stopped (batches are visited in an order
  drawn from ``seed`` and the epoch, so a resumed epoch skips the steps already taken);
- many processes: under ``torchrun`` (a process group initialised, :func:`init_distributed`) each
  rank trains on its slice of every batch in DistributedDataParallel; the monitor's counts and the
  fp8 amax are reduced across ranks before any decision, so every rank promotes and scales alike,
  and rank 0 alone writes files.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import os
import random
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from autoprec.core.errors import AutoprecError, ModelSpecError, PlanError, UsageError, first_line
from autoprec.core.formats import Precision, parse_precision
from autoprec.core.io import OutputFolder, atomic_write_bytes, atomic_write_text, writable_dir
from autoprec.core.lowering import check_assignment
from autoprec.core.opgraph import OpGraph, Policy
from autoprec.core.plan import Budget, LayerDecision, PrecisionPlan, Promotion
from autoprec.torch.capture import Captured, capture
from autoprec.torch.numerics import Numerics, PlanModule, Recipe, SiteStep, lost_fraction_text
from autoprec.torch.passes import apply_plan

log = logging.getLogger(__name__)

FP32 = Precision.FP32
#: where a layer that keeps losing values goes: a format with fp32's range (bf16), then fp32
PROMOTE_TO = {Precision.FP8_E4M3: Precision.BF16, Precision.FP8_E5M2: Precision.BF16,
              Precision.FP16: Precision.BF16, Precision.BF16: FP32}
LOSS_SCALING = ("auto", "on", "off")
CHECKPOINT = "checkpoint.pt"
CHECKPOINT_VERSION = 1
#: the monitor counts one training step in this many (the first, then every k-th): counting on every
#: step costs about as much again as an emulated step on a CPU, one in ten about a tenth of that
MONITOR_EVERY = 10

Progress = Callable[[int, int, str], None]


@dataclass(frozen=True)
class PromotionPolicy:
    """When a layer is promoted: its roundings lost more than ``threshold`` of their values (forward
    or backward) in each of ``patience`` consecutive steps."""

    threshold: float = 0.01
    patience: int = 5

    def __post_init__(self) -> None:
        if not (0 <= self.threshold < 1) or self.patience < 1:
            raise UsageError(f"a promotion policy needs 0 <= threshold < 1 and patience >= 1, got "
                             f"{self.threshold}, {self.patience}")


@dataclass(frozen=True)
class TrainConfig:
    """The hyper-parameters of one training run (a model file's ``TRAIN_*`` constants fill them)."""

    epochs: int
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 0
    clip: float | None = 1.0
    seed: int = 0
    recipe: Recipe = field(default_factory=Recipe)
    loss_scaling: str = "auto"
    promotion: PromotionPolicy | None = field(default_factory=PromotionPolicy)
    checkpoint_every: int = 0  # steps between checkpoints (0: at each epoch's end only)
    monitor: bool = True
    monitor_every: int = MONITOR_EVERY
    mode: str = "emulate"  # "native": real bf16/fp16 tensors (a GPU's speed; fp8 layers stay emulated)

    def __post_init__(self) -> None:
        if not isinstance(self.epochs, int) or self.epochs < 1:
            raise UsageError(f"--epochs must be a positive whole number, not {self.epochs!r}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise UsageError(f"the learning rate must be a positive number, not {self.lr!r}")
        if self.loss_scaling not in LOSS_SCALING:
            raise UsageError(f"unknown loss scaling {self.loss_scaling!r}: use {', '.join(LOSS_SCALING)}")
        if self.checkpoint_every < 0:
            raise UsageError(f"--checkpoint-every must be >= 0 steps, not {self.checkpoint_every}")
        if not isinstance(self.monitor_every, int) or self.monitor_every < 1:
            raise UsageError(f"--monitor-every must be a positive whole number of steps, not {self.monitor_every!r}")
        if self.mode not in ("emulate", "native"):
            raise UsageError(f"unknown training mode {self.mode!r}: use emulate or native")

    def to_dict(self) -> dict[str, Any]:
        return {"epochs": self.epochs, "lr": self.lr, "weight_decay": self.weight_decay,
                "warmup_steps": self.warmup_steps, "clip": self.clip, "seed": self.seed,
                "recipe": self.recipe.to_dict(), "loss_scaling": self.loss_scaling,
                "promotion": None if self.promotion is None else
                {"threshold": self.promotion.threshold, "patience": self.promotion.patience},
                "checkpoint_every": self.checkpoint_every, "monitor": self.monitor,
                "monitor_every": self.monitor_every, "mode": self.mode}


def lr_factor(step: int, total: int, warmup: int) -> float:
    """The default schedule: linear warm-up over ``warmup`` steps, then cosine decay to zero."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch (a model built after this is the same on every rank and run)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# --- the plan ---------------------------------------------------------------------------------
def uniform_assignment(graph: OpGraph, fmt: Precision | str) -> dict[str, Precision]:
    """Every layer of ``graph`` in ``fmt`` (the ``--formats`` baselines)."""
    f = parse_precision(fmt)
    return {name: f for name in graph.layer_names()}


def layer_owners(graph: OpGraph) -> dict[str, frozenset[str]]:
    """For every node, the layers whose format its roundings follow: a layer itself, a FOLLOW op the
    layers upstream of it through FOLLOW ops (the lowering's rule), nothing for the rest."""
    owners: dict[str, frozenset[str]] = {}
    for op in graph:
        if op.is_layer:
            owners[op.name] = frozenset({op.name})
        elif op.policy is Policy.FOLLOW:
            owners[op.name] = frozenset().union(*(owners.get(p, frozenset()) for p in graph.predecessors(op.name)))
        else:
            owners[op.name] = frozenset()
    return owners


def priced_plan(graph: OpGraph, assignment: Mapping[str, Precision], base: PrecisionPlan | None,
                promotions: Sequence[Promotion], label: str) -> PrecisionPlan:
    """The plan training ends with: ``base`` (the tuned plan, or a uniform one named ``label``) with
    the promoted layers' formats and reasons changed and the estimates recomputed for them. The
    plan's I/O format (``tune --io``) is a deployment's and carries over: training reads its batches
    as they come."""
    from autoprec.cost.memory import deployed_memory
    from autoprec.cost.roofline import cost_model

    target = base.target if base else "h100"
    objective = base.objective if base else "latency"
    model = cost_model(target, objective)
    last = {p.layer: p for p in promotions}
    decisions = []
    for op in graph.layers():
        fmt = assignment.get(op.name, FP32)
        prev = None
        if base is not None:
            prev = next((d for d in base.decisions if d.layer == op.name), None)
        if op.name in last:
            p = last[op.name]
            reason = f"promoted from {p.src} at step {p.step}: {p.reason}"
        elif prev is not None:
            reason = prev.reason
        else:
            reason = f"{label} (autoprec train --formats)"
        decisions.append(LayerDecision(op.name, op.scope, op.kind, fmt, reason,
                                       prev.predicted_error if prev is not None and prev.format is fmt else 0.0,
                                       model.layer_cost(op, fmt)))
    io = base.io if base else FP32
    fp32_graph, graph = graph.with_io(FP32), graph.with_io(io)
    b = model.breakdown(graph, assignment)
    fp32 = model.breakdown(fp32_graph, {})
    budget = base.budget if base else Budget(float("inf"), "metric_drop")
    return PrecisionPlan(
        model_name=graph.model_name, fingerprint=graph.fingerprint(), target=target, objective=objective,
        budget=budget, decisions=tuple(decisions), strategy=base.strategy if base else label,
        cost=b.total, fp32_cost=fp32.total, cast_cost=b.casts, memory_bytes=deployed_memory(graph, assignment),
        fp32_memory_bytes=deployed_memory(fp32_graph, {}),
        predicted_error=base.predicted_error if base and not promotions else 0.0,
        pins=base.pins if base else (), measured={}, steps=base.steps if base else (),
        alternatives=base.alternatives if base else (),
        notes=(base.notes if base else ()) + (("trained with autoprec train; estimates are for the plan after its "
                                              "promotions",) if promotions else ()),
        promotions=tuple(promotions), io=io)


def bound_graph(captured: Captured, assignment: Mapping[str, Precision], mode: str = "emulate") -> nn.Module:
    """The plan's rewritten graph (fp8 scaled at run time; ``mode`` as :func:`apply_plan`'s) reading
    the captured model's own parameters and buffers: the fp32 masters an optimizer updates, shared
    with the user's model (fx keeps its modules), and kept when a promotion rebuilds the graph."""
    gm = apply_plan(captured, assignment, mode=mode, dynamic_fp8=True)
    for kind in ("parameters", "buffers"):
        for qual, t in getattr(captured.gm, f"named_{kind}")(remove_duplicate=False):
            owner, _, attr = qual.rpartition(".")
            target = gm.get_submodule(owner) if owner else gm
            if kind == "parameters":
                setattr(target, attr, t)
            else:
                target._buffers[attr] = t
    return gm


def plan_module(model: nn.Module, plan: PrecisionPlan | Mapping[str, Precision | str], example_inputs: Any,
                recipe: Recipe | None = None, monitor: bool = True, mode: str = "emulate",
                monitor_every: int | None = None) -> PlanModule:
    """``model`` rewritten by ``plan`` for a training loop of the user's own: its forward and backward
    have the plan's numerics, its parameters are ``model``'s (trained in place). Call
    ``module.end_step()`` after each optimizer step (delayed fp8 scales, the monitor's counts), and
    scale the loss with ``torch.amp.GradScaler`` when the plan has fp16 layers. The monitor counts
    one step in ``monitor_every`` (the first, then every k-th; 1: every step; default
    :data:`MONITOR_EVERY`)."""
    from autoprec.torch.spec import as_tuple

    assignment = plan.assignment if isinstance(plan, PrecisionPlan) else \
        {k: parse_precision(v) for k, v in plan.items()}
    captured = capture(model, as_tuple(example_inputs), name=type(model).__name__, fold_norms=False)
    every = MONITOR_EVERY if monitor_every is None else monitor_every
    module = PlanModule(bound_graph(captured, assignment, mode), Numerics(recipe, monitor=monitor, every=every))
    module.train()
    return module


# --- processes ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Ranks:
    """This process's place among the training processes (one process: rank 0 of 1)."""

    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def reduce(self, t: torch.Tensor, op: str) -> torch.Tensor:
        """``t`` reduced over ranks (``op``: "sum" or "max"); itself on one process."""
        if self.world == 1:
            return t
        import torch.distributed as dist

        out = t.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
        return out

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()


def init_distributed() -> Ranks:
    """Join the process group ``torchrun`` describes (WORLD_SIZE, RANK, MASTER_ADDR in the
    environment): NCCL on GPUs, gloo on the CPU. One process when WORLD_SIZE is unset or 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Ranks()
    import torch.distributed as dist

    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    return Ranks(dist.get_rank(), dist.get_world_size())


def to_device(batch: Any, device: torch.device) -> Any:
    """``batch`` with every tensor on ``device`` (the model's)."""
    if torch.is_tensor(batch):
        return batch.to(device)
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_device(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    return batch


def shard(batch: Any, ranks: Ranks) -> Any:
    """This rank's slice of a batch: every tensor split along axis 0 into ``world`` parts."""
    if ranks.world == 1:
        return batch
    if torch.is_tensor(batch) and batch.dim() > 0:
        return batch.tensor_split(ranks.world)[ranks.rank]
    if isinstance(batch, (tuple, list)):
        return type(batch)(shard(b, ranks) for b in batch)
    if isinstance(batch, dict):
        return {k: shard(v, ranks) for k, v in batch.items()}
    return batch


# --- the loop ---------------------------------------------------------------------------------
@dataclass
class TrainResult:
    """What a training run produced."""

    plan: PrecisionPlan
    module: PlanModule
    model: nn.Module
    rows: list[dict[str, Any]]
    promotions: list[Promotion]
    metric: float | None
    skipped_steps: int
    out: Path | None
    files: list[Path]


class Trainer:
    """One training run of ``model`` under ``assignment``. :func:`train` builds and runs it; the
    pieces (:meth:`step`, :meth:`end_of_epoch`) serve a user's own loop as well."""

    def __init__(self, model: nn.Module, example_inputs: tuple[Any, ...], assignment: Mapping[str, Precision],
                 data: Any, loss: Callable[[Any, Any], torch.Tensor], config: TrainConfig, *,
                 evaluate: Callable[[Any], float] | None = None, metric_name: str = "metric",
                 optimizer: Callable[[nn.Module], torch.optim.Optimizer] | None = None,
                 schedule: Callable[[torch.optim.Optimizer, int], Any] | None = None,
                 ranks: Ranks | None = None, name: str = "", captured: Captured | None = None) -> None:
        self.model = model
        self.config = config
        self.ranks = ranks or Ranks()
        self.loss_fn = loss
        self.evaluate = evaluate
        self.metric_name = metric_name
        self.data = data
        # the training graph (norms kept): train() passes the one it made, anyone else gets a fresh one
        self.captured: Captured = captured or capture(model, example_inputs, name=name or type(model).__name__,
                                                      fold_norms=False)
        check_assignment(self.captured.graph, assignment)
        self.assignment = {k: v for k, v in assignment.items()}
        self.owners = layer_owners(self.captured.graph)
        self.numerics = Numerics(config.recipe, monitor=config.monitor, every=config.monitor_every)
        self.module = PlanModule(self._graph_module(), self.numerics)
        self.net: nn.Module = self.module
        if self.ranks.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            self.net = DistributedDataParallel(self.module)
        self.steps_per_epoch = _count(data)
        self.total_steps = config.epochs * self.steps_per_epoch
        params = list(self.captured.gm.parameters())
        if not params:
            raise UsageError(f"{name or type(model).__name__} has no parameters to train")
        if optimizer is not None:
            self.opt = optimizer(model)
        else:
            decay = [p for p in params if p.dim() >= 2]
            rest = [p for p in params if p.dim() < 2]
            self.opt = torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                                          {"params": rest, "weight_decay": 0.0}], lr=config.lr)
        if schedule is not None:
            self.sched = schedule(self.opt, self.total_steps)
        else:
            total, warm = self.total_steps, config.warmup_steps
            self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda s: lr_factor(s, total, warm))
        has_fp16 = any(f is Precision.FP16 for f in self.assignment.values())
        scaling = config.loss_scaling == "on" or (config.loss_scaling == "auto" and has_fp16)
        self.device = next(iter(params)).device
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=scaling)
        self.step_no = 0
        self.rows: list[dict[str, Any]] = []
        self.site_rows: list[dict[str, Any]] = []
        self.promotions: list[Promotion] = []
        self.bad_steps: dict[str, int] = {}
        self.skipped = 0

    # --- the module ---------------------------------------------------------------------------
    def _graph_module(self) -> nn.Module:
        return bound_graph(self.captured, self.assignment, self.config.mode)

    # --- one step -------------------------------------------------------------------------------
    def step(self, batch: Any) -> dict[str, Any]:
        """One optimizer step on ``batch`` (this rank's slice of it); returns its record."""
        self.module.train()
        try:
            loss = self.loss_fn(self.net, to_device(shard(batch, self.ranks), self.device))
        except (AutoprecError, KeyboardInterrupt, SystemExit):
            raise
        except Exception as exc:
            raise ModelSpecError(f"loss(model, batch) raised {type(exc).__name__} at step {self.step_no + 1}: "
                                 f"{first_line(exc, 160)}") from exc
        if not torch.is_tensor(loss) or loss.numel() != 1:
            raise ModelSpecError(f"loss(model, batch) must return a scalar tensor, got {type(loss).__name__}"
                                 + (f" of shape {tuple(loss.shape)}" if torch.is_tensor(loss) else ""))
        self.opt.zero_grad(set_to_none=True)
        scale = self.scaler.get_scale() if self.scaler.is_enabled() else 1.0
        self.scaler.scale(loss).backward()
        params = [p for g in self.opt.param_groups for p in g["params"]]
        if self.scaler.is_enabled():
            self.scaler.unscale_(self.opt)
            if self.config.clip:
                torch.nn.utils.clip_grad_norm_(params, self.config.clip)
            self.scaler.step(self.opt)
            self.scaler.update()
            skipped = self.scaler.get_scale() < scale
        else:
            grads = [p.grad for p in params if p.grad is not None]
            ok = all(bool(torch.isfinite(g).all()) for g in grads)
            skipped = not ok
            if ok:
                if self.config.clip:
                    torch.nn.utils.clip_grad_norm_(params, self.config.clip)
                self.opt.step()
        lr = float(self.opt.param_groups[0]["lr"])
        with warnings.catch_warnings():  # a skipped first step warns that the schedule moved before it
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step")
            self.sched.step()
        stats = self.module.end_step(self.ranks.reduce if self.ranks.world > 1 else None)
        value = self.ranks.reduce(loss.detach().float().reshape(1), "sum")[0] / self.ranks.world
        self.step_no += 1
        self.skipped += int(skipped)
        promoted = self._promote(stats)
        row = {"step": self.step_no, "epoch": (self.step_no - 1) // max(1, self.steps_per_epoch) + 1,
               "loss": float(value), "lr": lr, "loss_scale": scale, "skipped": int(skipped),
               "promotions": ";".join(f"{p.layer}:{p.src.value}->{p.dst.value}" for p in promoted), "metric": ""}
        self.rows.append(row)
        for site, st in stats.items():
            self.site_rows.append({"step": self.step_no, "site": site, **{k: getattr(st, k) for k in _SITE_FIELDS}})
        return row

    def _promote(self, stats: Mapping[str, SiteStep]) -> list[Promotion]:
        """Promote the layers that lost too much for ``patience`` steps; rebuild the graph if any."""
        policy = self.config.promotion
        if policy is None or not stats:
            return []
        grad_overflow = not self.scaler.is_enabled()
        worst: dict[str, tuple[float, str]] = {}
        for site, st in stats.items():
            fwd, bwd = st.lost(grad_overflow)
            lost = max(fwd, bwd)
            for layer in self.owners.get(site, frozenset()):
                if self.assignment.get(layer, FP32) is FP32:
                    continue
                if lost > worst.get(layer, (-1.0, ""))[0]:
                    worst[layer] = (lost, f"{site}: {lost_fraction_text(st, grad_overflow)}")
        promoted = []
        for layer in sorted(self.assignment):
            lost, why = worst.get(layer, (0.0, ""))
            if lost <= policy.threshold:
                self.bad_steps.pop(layer, None)
                continue
            self.bad_steps[layer] = self.bad_steps.get(layer, 0) + 1
            if self.bad_steps[layer] < policy.patience:
                continue
            for member in self._tie_of(layer):
                src = self.assignment[member]
                dst = PROMOTE_TO[src]
                every = self.config.monitor_every
                steps = "steps" if every == 1 else f"monitored steps (one in {every})"
                reason = (f"lost more than {policy.threshold:g} of its values in {policy.patience} consecutive "
                          f"{steps} (last: {why})")
                self.assignment[member] = dst
                self.bad_steps.pop(member, None)
                self.numerics.drop_layer(member)
                promoted.append(Promotion(member, src, dst, self.step_no, reason))
        if promoted:
            self.promotions.extend(promoted)
            self.module.graph_module = self._graph_module()
            if self.ranks.main:
                for p in promoted:
                    log.warning("step %d: promoted %s from %s to %s: %s", p.step, p.layer, p.src, p.dst, p.reason)
        return promoted

    def _tie_of(self, layer: str) -> list[str]:
        """``layer`` and the layers tied to it (one stored tensor, one format), in the plan."""
        for tie in self.captured.graph.ties:
            if layer in tie:
                return [m for m in tie if self.assignment.get(m, FP32) is not FP32]
        return [layer]

    # --- epochs ---------------------------------------------------------------------------------
    def batches_of_epoch(self, epoch: int) -> list[Any] | Iterable[Any]:
        """The batches of ``epoch`` (0-based) in their order: a list is visited in a permutation
        drawn from the seed and the epoch (the same on every rank and after a resume), any other
        iterable (a DataLoader) as it yields them."""
        if isinstance(self.data, (list, tuple)):
            gen = torch.Generator().manual_seed(self.config.seed * 1_000_003 + epoch)
            return [self.data[i] for i in torch.randperm(len(self.data), generator=gen).tolist()]
        return self.data

    def end_of_epoch(self) -> float | None:
        """The held-out metric of the model as it now stands, in the plan's numerics (rank 0 alone
        evaluates; None without evaluate()); recorded on the epoch's last row."""
        metric = None
        if self.evaluate is not None and self.ranks.main:
            self.module.eval()
            try:
                metric = float(self.evaluate(self.module))
            except AutoprecError:
                raise
            except Exception as exc:
                raise ModelSpecError(f"evaluate(model) failed on the model in training: {type(exc).__name__}: "
                                     f"{first_line(exc, 160)}") from exc
            finally:
                self.module.train()
            if self.rows:
                self.rows[-1]["metric"] = metric
        self.ranks.barrier()
        return metric

    # --- checkpoints ------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"version": CHECKPOINT_VERSION, "step": self.step_no, "config": self.config.to_dict(),
                "assignment": {k: v.value for k, v in sorted(self.assignment.items())},
                "params": {k: v.detach().clone() for k, v in self.captured.gm.state_dict().items()},
                "optimizer": self.opt.state_dict(), "schedule": self.sched.state_dict(),
                "scaler": self.scaler.state_dict(), "numerics": self.numerics.state_dict(),
                "promotions": [p.to_dict() for p in self.promotions], "bad_steps": dict(self.bad_steps),
                "skipped": self.skipped, "rows": list(self.rows), "site_rows": list(self.site_rows),
                "rng": {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}}

    def load_state_dict(self, d: Mapping[str, Any]) -> None:
        self.assignment = {k: Precision(v) for k, v in d["assignment"].items()}
        self.module.graph_module = self._graph_module()
        missing = self.captured.gm.load_state_dict(d["params"], strict=False)
        if missing.missing_keys:
            raise UsageError(f"the checkpoint lacks {len(missing.missing_keys)} tensor(s) of the model (e.g. "
                             f"{missing.missing_keys[0]}): it was written for another model")
        self.opt.load_state_dict(d["optimizer"])
        self.sched.load_state_dict(d["schedule"])
        self.scaler.load_state_dict(d["scaler"])
        self.numerics.load_state_dict(d["numerics"])
        self.promotions = [Promotion.from_dict(p) for p in d["promotions"]]
        self.bad_steps = dict(d["bad_steps"])
        self.skipped = int(d["skipped"])
        self.rows, self.site_rows = list(d["rows"]), list(d["site_rows"])
        self.step_no = int(d["step"])
        torch.set_rng_state(d["rng"]["torch"])
        random.setstate(d["rng"]["python"])
        np.random.set_state(d["rng"]["numpy"])


_SITE_FIELDS = ("fwd_overflow", "fwd_underflow", "fwd_nonzero", "bwd_overflow", "bwd_underflow", "bwd_nonzero",
                "fwd_amax", "bwd_amax")
_ROW_FIELDS = ("step", "epoch", "loss", "lr", "loss_scale", "skipped", "promotions", "metric")


def _count(data: Any) -> int:
    try:
        n = len(data)
    except TypeError:
        raise UsageError("the training data must have a length (a list of batches or a DataLoader)") from None
    if n == 0:
        raise UsageError("the training data has no batches")
    return n


# --- the run ------------------------------------------------------------------------------------
def run(trainer: Trainer, out: Path | None, base: PrecisionPlan | None, label: str, resume: bool = False,
        progress: Progress | None = None, calibration: list[tuple[Any, ...]] | None = None,
        example_inputs: tuple[Any, ...] = (), name: str = "") -> TrainResult:
    """Train to the end (from ``out``'s checkpoint when ``resume``) and write the records."""
    ckpt = out / CHECKPOINT if out is not None else None
    folder = OutputFolder(out) if out is not None and trainer.ranks.main else None
    if folder is None:
        return _run(trainer, out, ckpt, None, base, label, resume, progress, calibration, example_inputs, name)
    with folder.locked():  # one run per folder: a second fails at once, naming this one
        return _run(trainer, out, ckpt, folder, base, label, resume, progress, calibration, example_inputs, name)


def _run(trainer: Trainer, out: Path | None, ckpt: Path | None, folder: OutputFolder | None,
         base: PrecisionPlan | None, label: str, resume: bool, progress: Progress | None,
         calibration: list[tuple[Any, ...]] | None, example_inputs: tuple[Any, ...], name: str) -> TrainResult:
    if resume:
        if ckpt is None or not ckpt.is_file():
            raise UsageError(f"nothing to resume: {out if out is not None else 'no --out folder given'} has no "
                             f"{CHECKPOINT}; drop --resume to start a new run")
        state = _load_checkpoint(ckpt)
        if state["config"] != trainer.config.to_dict():
            raise UsageError(f"{ckpt} was written with other training settings; resume with the same options "
                             "(or start a new run in another --out folder)")
        trainer.load_state_dict(state)
    elif ckpt is not None and ckpt.exists():
        raise UsageError(f"{out} holds a checkpoint of an earlier run: pass --resume to continue it, or choose "
                         "another --out folder")
    elif out is not None and out.is_dir() and any(out.iterdir()):
        # a training run writes its checkpoints into its folder as it goes: never into another run's
        shown = ", ".join(sorted(p.name for p in out.iterdir())[:4])
        raise UsageError(f"{out} already holds files ({shown}) that are no training run's: give autoprec train a "
                         "folder of its own (--out)")
    try:
        _loop(trainer, ckpt, progress)
    except AutoprecError as exc:
        if ckpt is not None and ckpt.exists() and trainer.ranks.main:
            step = _load_checkpoint(ckpt)["step"]
            raise type(exc)(f"{exc}; {out} keeps the checkpoint of step {step}: fix this and rerun with --resume") \
                from exc
        raise
    return _finish(trainer, out, ckpt, folder, base, label, calibration, example_inputs, name)


def _loop(trainer: Trainer, ckpt: Path | None, progress: Progress | None) -> None:
    """Optimizer steps to the end, with the records and checkpoints along the way."""
    spe = trainer.steps_per_epoch
    total = trainer.total_steps
    while trainer.step_no < total:
        epoch = trainer.step_no // spe
        done_in_epoch = trainer.step_no % spe
        for i, batch in enumerate(trainer.batches_of_epoch(epoch)):
            if i < done_in_epoch:
                continue
            row = trainer.step(batch)
            if progress is not None:
                progress(trainer.step_no, total, f"epoch {epoch + 1}/{trainer.config.epochs} loss {row['loss']:.4g}"
                         + (f" scale {row['loss_scale']:g}" if trainer.scaler.is_enabled() else ""))
            last_in_epoch = i == spe - 1
            if last_in_epoch:
                trainer.end_of_epoch()
            every = trainer.config.checkpoint_every
            if ckpt is not None and (last_in_epoch or (every and trainer.step_no % every == 0)):
                _save_checkpoint(trainer, ckpt)
            if last_in_epoch:
                break


def _finish(trainer: Trainer, out: Path | None, ckpt: Path | None, folder: OutputFolder | None,
            base: PrecisionPlan | None, label: str, calibration: list[tuple[Any, ...]] | None,
            example_inputs: tuple[Any, ...], name: str) -> TrainResult:
    """Check the ranks agree, price the plan training ends with, and write the folder."""
    check_ranks_agree(trainer)
    metric = next((r["metric"] for r in reversed(trainer.rows) if r["metric"] != ""), None)
    files: list[Path] = []
    # the inference graph (norms folded), as tune captured it: what the plan is priced and calibrated on
    was = trainer.model.training
    deployed = capture(trainer.model, example_inputs, name=name) if example_inputs else trainer.captured
    trainer.model.train(was)  # capture sets eval mode: leave the user's module as training left it
    plan = priced_plan(deployed.graph, trainer.assignment, base, trainer.promotions, label)
    if metric is not None:
        plan = plan.with_measured(metric_trained=metric, metric_name=trainer.metric_name)
    if out is not None and folder is not None:
        # the records are written beside the folder and swapped in with the last checkpoint, as a unit
        with folder as staging:
            written = _write_outputs(trainer, staging, plan, calibration, deployed)
            if ckpt is not None and ckpt.exists():
                os.replace(ckpt, staging / CHECKPOINT)
                written.append(staging / CHECKPOINT)
        files = [out / f.relative_to(staging) for f in written]
    trainer.ranks.barrier()
    return TrainResult(plan, trainer.module, trainer.model, trainer.rows, trainer.promotions, metric,
                       trainer.skipped, out, files)


def check_ranks_agree(trainer: Trainer) -> None:
    """Raise unless every rank ends with the same weights, bit for bit (an exact integer checksum of
    each tensor's bits, compared across ranks): DDP's averaged gradients and the agreed fp8 amax
    must have kept them in step."""
    if trainer.ranks.world == 1:
        return
    sums = torch.stack([t.detach().contiguous().view(-1).view(torch.int32).to(torch.int64).sum()
                        if t.dtype == torch.float32 else t.detach().double().sum().view(torch.int64)
                        for t in trainer.captured.gm.state_dict().values()])
    if not torch.equal(trainer.ranks.reduce(sums, "max"), sums) or not torch.equal(-trainer.ranks.reduce(-sums, "max"), sums):
        raise AutoprecError(f"the {trainer.ranks.world} training processes ended with different weights: a rank "
                            "took another decision (report this as a bug, with the command)")


def _save_checkpoint(trainer: Trainer, path: Path) -> None:
    if trainer.ranks.main:
        buf = io.BytesIO()
        torch.save(trainer.state_dict(), buf)
        atomic_write_bytes(path, buf.getvalue())
    trainer.ranks.barrier()


def _load_checkpoint(path: Path) -> dict[str, Any]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise UsageError(f"{path} is not a readable checkpoint ({type(exc).__name__}: {first_line(exc, 120)}); "
                         "delete it to start over") from exc
    if not isinstance(state, dict) or state.get("version") != CHECKPOINT_VERSION:
        raise UsageError(f"{path} is not an autoprec training checkpoint of version {CHECKPOINT_VERSION}")
    return state


def _csv(rows: Sequence[Mapping[str, Any]], fields: Sequence[str]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(fields), lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: (f"{v:.9g}" if isinstance(v, float) else v) for k, v in r.items() if k in fields})
    return buf.getvalue()


def trained_state_dict(trainer: Trainer) -> dict[str, torch.Tensor]:
    """The model's state_dict with its trained values (names as the model's own ``state_dict``)."""
    trained = trainer.captured.gm.state_dict()
    own = trainer.model.state_dict()
    missing = [k for k in own if k not in trained]
    if missing:
        raise UsageError(f"cannot map the trained tensors back onto the model: {len(missing)} of its tensors "
                         f"(e.g. {missing[0]}) have no counterpart in the captured graph")
    return {k: trained[k].detach().clone().contiguous() for k in own}


def _write_outputs(trainer: Trainer, out: Path, plan: PrecisionPlan, calibration: list[tuple[Any, ...]] | None,
                   deployed: Captured) -> list[Path]:
    files = []
    buf = io.BytesIO()
    torch.save(trained_state_dict(trainer), buf)
    files.append(atomic_write_bytes(out / "weights.pt", buf.getvalue()))
    files.append(atomic_write_text(out / "train.csv", _csv(trainer.rows, _ROW_FIELDS)))
    files.append(atomic_write_text(out / "numerics.csv", _csv(trainer.site_rows, ("step", "site", *_SITE_FIELDS))))
    if any(f.is_fp8 for f in trainer.assignment.values()) and calibration:
        files.append(_write_profile(trainer, out, calibration, deployed))
    files.append(plan.save(out / "plan.json"))
    files.append(plot_training(out / "training.png", trainer.rows))
    _tensorboard(out, trainer.rows)
    return files


def _write_profile(trainer: Trainer, out: Path, calibration: list[tuple[Any, ...]], deployed: Captured) -> Path:
    """profile.json of the trained weights: fp8 layers deploy with scales calibrated on them."""
    from autoprec.torch.profile import profile

    fmts = tuple(sorted({f for f in trainer.assignment.values() if f is not FP32}, key=lambda f: f.rank))
    prof = profile(deployed, calibration, formats=fmts, mode="fast", time_reference=False)
    return prof.save(out / "profile.json")


def plot_training(path: Path, rows: Sequence[Mapping[str, Any]]) -> Path:
    """training.png: the loss per step (skipped steps marked) and the loss scale, log scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    fig, (a, b) = plt.subplots(2, 1, figsize=(7, 5), sharex=True)
    loss = [r["loss"] if math.isfinite(r["loss"]) else float("nan") for r in rows]
    a.plot(steps, loss, lw=0.8)
    skipped = [r["step"] for r in rows if r["skipped"]]
    if skipped:
        a.plot(skipped, [np.nanmax(loss) if any(math.isfinite(v) for v in loss) else 0.0] * len(skipped), "r|",
               label="skipped step")
        a.legend()
    a.set_ylabel("loss")
    a.set_yscale("log" if all(v > 0 for v in loss if math.isfinite(v)) else "linear")
    b.plot(steps, [r["loss_scale"] for r in rows], lw=0.8)
    b.set_yscale("log")
    b.set_ylabel("loss scale")
    b.set_xlabel("step")
    for r in rows:
        if r["promotions"]:
            for ax in (a, b):
                ax.axvline(r["step"], color="orange", lw=0.6)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, metadata={"Software": None})
    plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())


def _tensorboard(out: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    """TensorBoard events beside the CSV when tensorboard is installed (optional)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return
    w = SummaryWriter(str(out / "tensorboard"))
    for r in rows:
        w.add_scalar("loss", r["loss"], r["step"])
        w.add_scalar("loss_scale", r["loss_scale"], r["step"])
        if r["metric"] != "":
            w.add_scalar("metric", r["metric"], r["step"])
    w.close()


# --- entry points -----------------------------------------------------------------------------------
def train(model: Any, plan: PrecisionPlan | str | os.PathLike[str] | Mapping[str, Any] | None = None, *,
          formats: str | Precision | None = None, data: Any = None, loss: Callable[[Any, Any], torch.Tensor] | None = None,
          example_inputs: Any = None, evaluate: Callable[[Any], float] | None = None, metric_name: str = "metric",
          epochs: int | None = None, lr: float | None = None, weight_decay: float | None = None,
          warmup_steps: int | None = None, clip: float | None = None,
          optimizer: Callable[[nn.Module], torch.optim.Optimizer] | None = None,
          schedule: Callable[[torch.optim.Optimizer, int], Any] | None = None,
          out: str | os.PathLike[str] | None = None, resume: bool = False,
          init: str = "scratch", recipe: Recipe | None = None, loss_scaling: str = "auto",
          promotion: PromotionPolicy | None = PromotionPolicy(), checkpoint_every: int = 0, seed: int = 0,
          monitor: bool = True, monitor_every: int | None = None, mode: str = "emulate", device: str | None = None,
          progress: Progress | None = None, ranks: Ranks | None = None) -> TrainResult:
    """Train ``model`` with a plan's numerics; what ``autoprec train`` does.

    ``model``: a model file (its ``build()`` for ``init="scratch"``, ``model()`` for
    ``init="pretrained"``, with ``train_data()``, ``loss(model, batch)``, ``TRAIN_EPOCHS`` and
    optionally ``TRAIN_LR``, ``TRAIN_WEIGHT_DECAY``, ``TRAIN_WARMUP_STEPS``, ``TRAIN_CLIP``,
    ``optimizer(model)``, ``schedule(optimizer, total_steps)``), or a live ``nn.Module`` (trained
    in place) with ``data`` (a list or DataLoader of batches), ``loss`` and ``example_inputs``.
    ``plan``: plan.json from ``autoprec tune``, a PrecisionPlan or a layer -> format mapping; or
    ``formats="fp16"`` for the uniform plan. The result's plan records every promotion.
    ``monitor_every``: the monitor counts the first step and then one in this many (1: every step;
    default :data:`MONITOR_EVERY`);
    promotions wait for ``promotion.patience`` bad monitored steps in a row.
    ``mode="native"`` computes on real bf16/fp16 tensors (the speed of a GPU; its backward rounds
    as torch's kernels do, which the emulation matches within one unit in the last place; fp8 layers
    keep the emulated recipe); ``device`` ("cuda", "cuda:1") moves the model and every batch there
    (default: where the model is; under torchrun with CUDA, each rank's own GPU).
    ``lr``, ``weight_decay``, ``warmup_steps``, ``clip``, ``optimizer(model)`` and
    ``schedule(optimizer, total_steps)`` override the model file's (defaults: 1e-3, 0, 0, 1.0,
    AdamW, warm-up then cosine decay).
    """
    from autoprec.torch.spec import ModelSpec, as_tuple, load_model_spec

    if (plan is None) == (formats is None):
        raise UsageError("give a plan (--plan plan.json from autoprec tune) or a uniform format (--formats fp16), "
                         "not both and not neither")
    if init not in ("scratch", "pretrained"):
        raise UsageError(f"unknown --init {init!r}: use scratch (the model file's build()) or pretrained (its model())")
    ranks = ranks or Ranks()
    outp = Path(out) if out is not None else None
    if outp is not None and ranks.main:
        writable_dir(outp)
    file_defaults: dict[str, Any] = {}
    calibration = None
    spec: ModelSpec | None = None
    if isinstance(model, (str, os.PathLike)):
        spec = load_model_spec(model)
        mod = spec.module
        if not spec.has_training:
            raise ModelSpecError(f"{spec.path}: training needs train_data() and loss(model, batch) in the model file "
                                 "(models/README.md)")
        builder = getattr(mod, "build", None) if init == "scratch" else spec.model
        if not callable(builder):
            raise ModelSpecError(f"{spec.path}: --init scratch needs build() (the untrained network); use --init "
                                 "pretrained to train from model()")
        seed_everything(seed)
        net = builder()
        data = list(mod.train_data())
        if not data:
            raise ModelSpecError(f"{spec.path}: train_data() returned no batches; return a list of (inputs, "
                                 "targets) batches")
        loss = mod.loss
        example_inputs = spec.example_inputs()
        evaluate = spec.evaluate
        metric_name = spec.metric or metric_name
        calibration = spec.calibration_data()
        name = spec.name
        file_defaults = {"epochs": getattr(mod, "TRAIN_EPOCHS", None), "lr": getattr(mod, "TRAIN_LR", 1e-3),
                         "weight_decay": getattr(mod, "TRAIN_WEIGHT_DECAY", 0.0),
                         "warmup_steps": getattr(mod, "TRAIN_WARMUP_STEPS", 0), "clip": getattr(mod, "TRAIN_CLIP", 1.0)}
        optimizer = optimizer or getattr(mod, "optimizer", None)
        schedule = schedule or getattr(mod, "schedule", None)
    else:
        if not isinstance(model, nn.Module):
            raise UsageError(f"expected a model file or a torch.nn.Module, got {type(model).__name__}")
        if data is None or loss is None or example_inputs is None:
            raise UsageError("a live module trains with data=<batches>, loss=<loss(model, batch)> and "
                             "example_inputs=<one batch of inputs>")
        net, name = model, type(model).__name__
        example_inputs = as_tuple(example_inputs)
    given = {"lr": lr, "weight_decay": weight_decay, "warmup_steps": warmup_steps, "clip": clip}
    file_defaults.update({k: v for k, v in given.items() if v is not None})
    n_epochs = epochs if epochs is not None else file_defaults.get("epochs")
    if n_epochs is None:
        raise UsageError("give the number of epochs (--epochs N)")
    config = TrainConfig(epochs=int(n_epochs), lr=float(file_defaults.get("lr", 1e-3)),
                         weight_decay=float(file_defaults.get("weight_decay", 0.0)),
                         warmup_steps=int(file_defaults.get("warmup_steps", 0)),
                         clip=file_defaults.get("clip", 1.0), seed=seed, recipe=recipe or Recipe(),
                         loss_scaling=loss_scaling, promotion=promotion, checkpoint_every=checkpoint_every,
                         monitor=monitor, monitor_every=MONITOR_EVERY if monitor_every is None else monitor_every,
                         mode=mode)
    if device is None and ranks.world > 1 and torch.cuda.is_available():
        device = f"cuda:{torch.cuda.current_device()}"
    if device is not None:
        try:
            net = net.to(device)
        except (RuntimeError, AssertionError) as exc:
            raise UsageError(f"cannot move the model to {device}: {first_line(exc, 160)}") from None
        example_inputs = to_device(example_inputs, torch.device(device))
        calibration = [to_device(b, torch.device(device)) for b in calibration] if calibration else calibration
    captured = capture(net, example_inputs, name=name, fold_norms=False)
    graph = captured.graph
    base: PrecisionPlan | None = None
    if formats is not None:
        assignment = uniform_assignment(graph, formats)
        label = f"uniform {parse_precision(formats).value}"
    elif isinstance(plan, PrecisionPlan) or isinstance(plan, (str, os.PathLike)):
        base = plan if isinstance(plan, PrecisionPlan) else PrecisionPlan.load(plan)
        assignment, label = base.assignment, base.strategy
        if base.model_name and spec is not None and base.model_name != spec.name:
            raise PlanError(f"the plan was made for {base.model_name}, not {spec.name}: tune this model first")
    else:
        assignment, label = {k: parse_precision(v) for k, v in dict(plan).items()}, "given assignment"
    trainer = Trainer(net, example_inputs, assignment, data, loss, config, evaluate=evaluate, metric_name=metric_name,
                      optimizer=optimizer, schedule=schedule, ranks=ranks, name=name, captured=captured)
    return run(trainer, outp, base, label, resume=resume, progress=progress, calibration=calibration,
               example_inputs=example_inputs, name=name)


__all__ = ["PROMOTE_TO", "bound_graph", "plan_module", "PromotionPolicy", "Ranks", "Recipe", "TrainConfig", "TrainResult", "Trainer",
           "init_distributed", "layer_owners", "lr_factor", "priced_plan", "run", "shard", "train", "uniform_assignment"]

