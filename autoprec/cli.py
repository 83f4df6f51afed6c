"""The ``autoprec`` command line. Logging is configured here and nowhere else.

Every user-facing failure is an :class:`~autoprec.core.errors.AutoprecError`: the CLI prints its one
line to stderr and exits with its code; tracebacks are for bugs only (or ``--debug``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import sys
from dataclasses import asdict
from pathlib import Path
from typing import NoReturn, Sequence, TextIO

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from autoprec.core.errors import AutoprecError, UsageError
from autoprec.core.formats import DEFAULT_CANDIDATES, parse_precisions
from autoprec.core.resources import collect_new_only, release_memory
from autoprec.ort.runtime import set_runtime_log

err_console = Console(stderr=True, soft_wrap=True)  # an error stays one line


#: where autoprec's own results go: the process's stdout. While a command runs, sys.stdout is the
#: terminal's stderr, so what user code prints (a model file's print()) cannot mix into them
#: (`tune --json` prints JSON alone)
_RESULTS = [sys.stdout]


def _stdout() -> TextIO:
    return _RESULTS[-1]


def _console() -> Console:
    """stdout console; wide enough for the tables when output goes to a file or a pipe."""
    c = Console(file=_stdout())
    return c if c.is_terminal else Console(file=_stdout(), width=160)


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


_EXACT_ONLY = ("ONNX models are profiled in exact mode (ONNX Runtime has no backward pass for the fast "
               "estimate): drop {flag} fast")


def _is_onnx(model: str) -> bool:
    return model.lower().endswith(".onnx")


def _need_data(args: argparse.Namespace) -> None:
    if _is_onnx(args.model) and getattr(args, "weights", None):
        raise UsageError("--weights is for model files: an .onnx file holds its own weights")
    if _is_onnx(args.model) and not args.data:
        raise UsageError(f"{args.model} is an ONNX model: give its inputs with --data inputs.npz (arrays named "
                         "after the model's inputs; see --help for which hold samples)")
    if not _is_onnx(args.model) and (args.data or getattr(args, "labels", None)):
        raise UsageError("--data and --labels are for .onnx models; a model file brings its own data")


def cmd_profile(args: argparse.Namespace) -> int:
    from autoprec import api
    from autoprec.core.io import atomic_write_text, writable_file

    _need_data(args)
    formats = parse_precisions(args.formats)
    if args.json:
        writable_file(args.json)  # fail before profiling, not after
    with _progress() as bar:
        task = bar.add_task(f"profile ({args.mode})", total=None, what="")

        def progress(done: int, total: int, what: str) -> None:
            bar.update(task, completed=done, total=total, what=what)

        if _is_onnx(args.model):
            if args.mode != "exact":
                raise UsageError(_EXACT_ONLY.format(flag="--mode"))
            om = api.OnnxModel.load(args.model, args.data)
            prof = api.profile_onnx(om, formats, progress)
            graph, source = om.analysis.graph, "analysed from ONNX, measured on ONNX Runtime"
        else:
            prof, captured = api.profile_model(args.model, mode=args.mode, formats=formats,
                                               capture_method=args.capture, progress=progress)
            graph, source = captured.graph, f"captured by {captured.method}"
    if args.json:
        atomic_write_text(args.json, prof.to_json())
    out = _console()
    table = Table(title=f"{prof.model_name}: {prof.mode} sensitivity ({prof.measure} of the output, "
                        f"{prof.samples} calibration samples, {source})")
    table.add_column("layer")
    table.add_column("kind")
    table.add_column("scope")
    table.add_column("FLOPs", justify="right")
    for f in prof.formats:
        table.add_column(str(f), justify="right")
    table.add_column("amax in/out", justify="right")
    table.add_column("flags")
    for op in graph.layers():
        r = prof.ranges.get(op.name)
        # a lookup (embedding) reads no floating input: "-" for its input amax
        amax_in = f"{max(s.amax for s in r.inputs):.3g}" if r and r.inputs else "-"
        amax = f"{amax_in}/{r.output.amax:.3g}" if r else ""
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


def cmd_tune(args: argparse.Namespace) -> int:
    from autoprec import api
    from autoprec.core.io import OutputFolder, atomic_write_bytes, atomic_write_text
    from autoprec.report import write_report

    _need_data(args)
    onnx_input = _is_onnx(args.model)
    dest = Path(args.out) if args.out else Path("out") / Path(args.model).stem
    if not onnx_input:  # the model file's import runs its code: before anything is written
        from autoprec.torch.spec import load_model_spec

        load_model_spec(args.model)
    # the folder is written as a unit: built beside dest, swapped in when complete (locked till then)
    with OutputFolder(dest) as out_dir, collect_new_only():
        with _progress() as bar:
            task = bar.add_task("profile", total=None, what="")

            def progress(done: int, total: int, what: str) -> None:
                bar.update(task, completed=done, total=total, what=what)

            common = dict(fidelity_budget=args.fidelity_budget, target=args.target, objective=args.objective,
                          formats=args.formats, strategy=args.strategy, keep=args.keep, force=args.force,
                          batch=args.batch, provider=args.provider, progress=progress, timing=not args.no_timing,
                          io=args.io)
            if onnx_input:
                if args.profile_mode == "fast":
                    raise UsageError(_EXACT_ONLY.format(flag="--profile-mode"))
                if args.no_onnx_check:
                    raise UsageError(".onnx models are measured on ONNX Runtime itself, every plan: drop --no-onnx-check")
                result = api.tune_onnx(args.model, args.data, args.labels, args.budget, **common)
            else:
                result = api.tune(args.model, args.budget, profile_mode=args.profile_mode or "fast",
                                  onnx_check=not args.no_onnx_check, cache=not args.no_cache, **common)
        plan = result.plan
        files = [plan.save(out_dir / "plan.json"), atomic_write_text(out_dir / "profile.json", result.profile.to_json())]
        # the tuned model itself: the deployment graph, and the graph ORT's CPU provider runs faithfully
        stem = Path(args.model).stem
        for mode, suffix in (("deploy", "tuned"), ("emulate", "emulation")):
            files.append(atomic_write_bytes(out_dir / f"{stem}.{suffix}.onnx", result.onnx_model(mode).SerializeToString()))
            release_memory()  # one graph of a large model at a time
        analysis = result.onnx.analysis if result.onnx is not None else None
        files += write_report(out_dir, plan, result.profile, result.graph, result.summary, result.uniforms,
                              result.pareto, fixed=analysis.reasons if analysis else None,
                              notes=analysis.notes if analysis else result.captured.notes())
    files = [dest / f.relative_to(out_dir) for f in files]  # where they are now
    if args.json:
        print(json.dumps({"plan": plan.to_dict(), "summary": asdict(result.summary),
                          "files": [str(f) for f in files]}, sort_keys=True, default=str), file=_stdout())
        return 0
    out = _console()
    table = Table(title=f"{plan.model_name}: plan for {plan.target} ({plan.objective})")
    for col in ("layer", "kind", "format", "reason"):
        table.add_column(col)
    for d in plan.decisions:
        table.add_row(d.layer, d.kind, str(d.format), d.reason)
    out.print(table)
    for line in result.summary.lines():
        out.print(line, highlight=False)
    if result.cache is not None:
        out.print(result.cache.line(), highlight=False)
    if analysis is not None and analysis.reasons:
        out.print(f"{len(analysis.reasons)} ONNX node(s) stay fp32 whatever the plan (reasons in report.md)",
                  highlight=False)
    out.print(f"formats: {', '.join(f'{k} x{v}' for k, v in plan.format_counts().items())}; wrote "
              + ", ".join(str(f) for f in files), highlight=False)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from autoprec.training import PromotionPolicy, Recipe, init_distributed, train

    if _is_onnx(args.model):
        raise UsageError(f"{args.model}: training needs a model file (a .py following models/README.md); an ONNX "
                         "file has no training loop")
    if args.epochs is not None and args.epochs < 1:
        raise UsageError(f"--epochs must be a positive whole number, not {args.epochs}")
    recipe = Recipe(fp8_scaling=args.fp8_scaling, amax_history=args.amax_history, amax_compute=args.amax_compute,
                    margin=args.margin, weight_scaling=args.weight_scaling)
    promotion = None if args.no_promote else PromotionPolicy(args.promote_threshold, args.promote_patience)
    out_dir = Path(args.out) if args.out else Path("out") / f"{Path(args.model).stem}.train"
    ranks = init_distributed()
    try:
        with _progress() as bar:
            task = bar.add_task("train", total=None, what="", visible=ranks.main)

            def progress(done: int, total: int, what: str) -> None:
                bar.update(task, completed=done, total=total, what=what)

            result = train(args.model, args.plan, formats=args.formats, epochs=args.epochs, out=out_dir,
                           resume=args.resume, init=args.init, recipe=recipe, loss_scaling=args.loss_scaling,
                           promotion=promotion, checkpoint_every=args.checkpoint_every, seed=args.seed,
                           monitor=not args.no_monitor, monitor_every=args.monitor_every,
                           mode="native" if args.native else "emulate",
                           device=args.device, progress=progress, ranks=ranks)
    finally:
        if ranks.world > 1:
            import torch.distributed as dist

            dist.destroy_process_group()
    if not ranks.main:
        return 0
    out = _console()
    last = result.rows[-1]
    metric = f"; held-out {result.plan.measured.get('metric_name', 'metric')} {result.metric:.4f}" \
        if result.metric is not None else ""
    agree = f" (weights identical on all {ranks.world})" if ranks.world > 1 else ""
    out.print(f"{result.plan.model_name}: {last['step']} steps on {ranks.world} process(es){agree}, final loss "
              f"{last['loss']:.4g}{metric}; {result.skipped_steps} step(s) skipped for non-finite gradients",
              highlight=False)
    for p in result.promotions:
        out.print(f"promoted {p.layer} {p.src} -> {p.dst} at step {p.step}: {p.reason}", highlight=False)
    out.print(f"formats: {', '.join(f'{k} x{v}' for k, v in result.plan.format_counts().items())}; wrote "
              + ", ".join(str(f) for f in result.files), highlight=False)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from autoprec.core.formats import Precision
    from autoprec.core.io import writable_file
    from autoprec.deploy.export import export_onnx
    from autoprec.onnx.apply import plan_io

    _need_data(args)
    writable_file(args.output)
    profile = args.profile
    if profile is None and (Path(args.plan).parent / "profile.json").is_file():
        profile = Path(args.plan).parent / "profile.json"  # `autoprec tune` writes both in one folder
    if _is_onnx(args.model):
        from autoprec.deploy.export import export_analysed

        out = export_analysed(args.model, args.data, args.plan, profile, args.output, emulation=args.emulation,
                              io=args.io, provider=args.provider)
    else:
        from autoprec.torch.spec import load_model_spec

        spec = load_model_spec(args.model).with_weights(args.weights)
        out = export_onnx(spec, args.plan, profile, args.output, opset=args.opset, emulation=args.emulation,
                          io=args.io, provider=args.provider)
    what = ("emulation graph: fp32 compute with every rounding explicit, for ONNX Runtime's CPU provider"
            if args.emulation else "deployment graph: 16-bit tensors and fp8 Q/DQ, for the CUDA / TensorRT providers")
    io = plan_io(args.plan, args.io)
    if io is not Precision.FP32:
        what += f"; its inputs and outputs are {io}"
    if args.provider and not args.emulation:
        what += f"; ops {args.provider} has no 16-bit kernel for compute in fp32 between casts"
    _console().print(f"Wrote {out} ({out.stat().st_size / 1e6:.2f} MB), the {what}.", highlight=False)
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from autoprec.deploy.verify import verify, verify_onnx_input

    _need_data(args)
    if _is_onnx(args.model):
        report = verify_onnx_input(args.onnx, args.model, args.data, args.labels, args.plan, providers=args.provider)
    else:
        from autoprec.torch.spec import load_model_spec

        report = verify(args.onnx, load_model_spec(args.model).with_weights(args.weights), args.plan,
                        providers=args.provider)
    if args.json:
        print(json.dumps(report.to_dict(), sort_keys=True, default=str), file=_stdout())
    else:
        out = _console()
        for line in report.lines():
            out.print(line, highlight=False)
    return 0 if report.ok else 1


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: what is wrong and where the help is, exit 2 (no usage dump)."""

    def error(self, message: str) -> NoReturn:
        err_console.print(f"[red]error:[/] {message} (see `{self.prog} --help`)", highlight=False)
        raise SystemExit(2)


#: third-party loggers whose chatter (exporter dumps, graph printouts) is for --debug only
_QUIET_LOGGERS = ("torch", "onnxscript", "onnx_ir", "onnxruntime", "matplotlib", "PIL")


#: --data of an .onnx model: which inputs hold samples is read off the graph (autoprec.onnx.model)
_DATA_HELP = (".onnx models: their inputs, arrays named after the graph inputs. An input whose axis 0 the graph "
              "leaves symbolic holds the samples on axis 0 (the same number in each); one whose axis 0 the graph "
              "fixes is fed whole to every run where its data have the graph's shape (a weight matrix, a scalar), "
              "and holds the samples where its data have another size there (runs then take the fixed number). "
              "Where every array has its input's exact shape, they are one batch if their axes 0 agree, else "
              "the model runs once on them")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="autoprec", description="Per-layer mixed precision (fp32/bf16/fp16/fp8) "
                                "for PyTorch models under an accuracy budget.")
    p.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    sub = p.add_subparsers(dest="command", required=True)

    pr = sub.add_parser("profile", help="per-layer sensitivity to bf16/fp16/fp8, with range statistics")
    pr.add_argument("model", help="model file following models/README.md (e.g. models/digits_cnn.py) or an .onnx file")
    pr.add_argument("--data", metavar="INPUTS.npz", help=_DATA_HELP)
    pr.add_argument("--mode", choices=("fast", "exact"), default="exact",
                    help="exact: isolated trials with downstream-only re-runs; fast: one forward+backward "
                         "first-order estimate (default: exact)")
    pr.add_argument("--formats", default=",".join(f.value for f in DEFAULT_CANDIDATES),
                    help="comma-separated candidate formats (default: bf16,fp16,fp8_e4m3)")
    pr.add_argument("--capture", choices=("auto", "fx", "export"), default="auto",
                    help="capture method (default: fx, falling back to torch.export)")
    pr.add_argument("--json", metavar="FILE", help="also write the profile as JSON")
    pr.set_defaults(func=cmd_profile)

    tu = sub.add_parser("tune", help="search the fastest per-layer plan within an accuracy budget, verified")
    tu.add_argument("model", help="model file following models/README.md, or an .onnx file (with --data)")
    tu.add_argument("--data", metavar="INPUTS.npz", help=_DATA_HELP)
    tu.add_argument("--labels", metavar="LABELS", help=".onnx models: labels of the --data samples (.npy, or the name "
                                                       "of an array in the --data file): integers give an accuracy "
                                                       "budget, floats a mean-squared-error one; without labels the "
                                                       "budget is on fidelity to fp32 (--fidelity-budget)")
    tu.add_argument("--budget", help="largest allowed drop of the model's metric: relative (0.5%%) or "
                                     "absolute (0.005); default 0.5%%")
    tu.add_argument("--fidelity-budget", help="for models without evaluate(): largest drop of top-1 agreement "
                                              "with fp32 (logits) or relative L2 error (values); default 1%%")
    tu.add_argument("--target", default="h100", help="hardware target for the cost model: h100, a100, l4, generic")
    tu.add_argument("--objective", choices=("latency", "memory"), default="latency")
    tu.add_argument("--io", default="fp32", choices=("fp32", "fp16"),
                    help="format of the deployed model's inputs and outputs (default fp32; fp16: every plan is "
                         "measured on inputs rounded to fp16 and returns fp16, with no fp32 copy of a 16-bit output; "
                         "the tuned .onnx takes and returns fp16, and `autoprec export` writes it so)")
    tu.add_argument("--batch", type=int, default=1024,
                    help="deployment batch (samples per call) the cost model prices (default 1024)")
    tu.add_argument("--formats", default=None, help="candidate formats (default: bf16,fp16,fp8_e4m3)")
    tu.add_argument("--provider", default=None,
                    help="ONNX Runtime execution provider the plan deploys on (cpu, cuda, tensorrt): formats it "
                         "cannot run per op are never offered, and layers are priced as it runs them (fp8 is "
                         "fp32 compute between Q/DQ except on tensorrt) (default: the target GPU's own kernels)")
    tu.add_argument("--no-timing", action="store_true",
                    help="with --provider cuda on a machine with a GPU: do not time the searched plan against the "
                         "fastest uniform plan within budget and all-fp32 (the fastest measured is adopted by default)")
    tu.add_argument("--no-onnx-check", action="store_true",
                    help="model files: accept plans on the torch emulation's metric alone (by default a plan must "
                         "also be within budget on ONNX Runtime's run of its emulation graph, the exported numerics)")
    tu.add_argument("--strategy", default="milp", help="milp (default), greedy, bisection[:FORMAT] or uniform")
    tu.add_argument("--keep", action="append", default=[], metavar="FMT:REGEX",
                    help="keep layers whose scope, name or kind matches REGEX at FMT or wider, e.g. fp32:'head|embed'")
    tu.add_argument("--force", action="append", default=[], metavar="FMT:REGEX",
                    help="force matching layers to FMT, e.g. bf16:'blocks\\.0\\.'")
    tu.add_argument("--profile-mode", choices=("fast", "exact"), default=None,
                    help="sensitivity estimate used by the search (default: fast; .onnx models: exact, the only one)")
    tu.add_argument("--out", metavar="DIR", help="output folder (default: out/<model name>): plan.json, profile.json, "
                                                 "report.md, plots, <name>.tuned.onnx and <name>.emulation.onnx")
    tu.add_argument("--no-cache", action="store_true",
                    help="neither reuse nor keep profiling results (by default they are kept in $AUTOPREC_CACHE or "
                         "~/.cache/autoprec, keyed by the model, its data, autoprec and the settings, so a tune "
                         "killed mid-profile resumes)")
    tu.add_argument("--json", action="store_true", help="print the plan and summary as JSON on stdout")
    tu.set_defaults(func=cmd_tune)

    tr = sub.add_parser("train", help="train a model file with a plan's numerics (16-bit gradients, fp8 recipe, "
                                      "loss scaling, adaptive promotion); torchrun for several processes")
    tr.add_argument("model", help="model file with train_data() and loss(model, batch) (models/README.md)")
    tr.add_argument("--plan", help="plan.json written by `autoprec tune` (its promotions are added to it)")
    tr.add_argument("--formats", help="instead of --plan: every layer in this one format (fp32, bf16, fp16, fp8), "
                                      "the uniform baselines")
    tr.add_argument("--epochs", type=int, default=None, help="epochs (default: the model file's TRAIN_EPOCHS)")
    tr.add_argument("--init", choices=("scratch", "pretrained"), default="scratch",
                    help="start from the model file's build() (scratch, default) or its trained model()")
    tr.add_argument("--out", metavar="DIR", help="output folder (default: out/<model name>.train): weights.pt, "
                                                 "plan.json, train.csv, numerics.csv, training.png, checkpoint.pt")
    tr.add_argument("--resume", action="store_true", help="continue the run whose checkpoint.pt is in --out")
    tr.add_argument("--checkpoint-every", type=int, default=0, metavar="STEPS",
                    help="also checkpoint every STEPS optimizer steps (default: at each epoch's end only)")
    tr.add_argument("--seed", type=int, default=0, help="seed of the initial weights and the batch order (default 0)")
    tr.add_argument("--loss-scaling", choices=("auto", "on", "off"), default="auto",
                    help="dynamic loss scaling (torch.amp.GradScaler): auto = when the plan has fp16 layers")
    tr.add_argument("--fp8-scaling", choices=("delayed", "current"), default="delayed",
                    help="fp8 activation and gradient scales: from the amax history (delayed, default) or each "
                         "tensor's own amax (current)")
    tr.add_argument("--amax-history", type=int, default=16, help="delayed scaling: steps of amax history (16)")
    tr.add_argument("--amax-compute", choices=("max", "most_recent"), default="max",
                    help="delayed scaling: the history's max (default) or its newest entry")
    tr.add_argument("--margin", type=int, default=0, help="fp8 scales 2**MARGIN larger than the amax needs (0)")
    tr.add_argument("--weight-scaling", choices=("tensor", "rowwise"), default="tensor",
                    help="fp8 weights: one scale per tensor (default) or per output row")
    tr.add_argument("--promote-threshold", type=float, default=0.01,
                    help="promote a layer whose roundings lose more than this fraction of their values (0.01) ...")
    tr.add_argument("--promote-patience", type=int, default=5,
                    help="... in this many consecutive counted steps (5; see --monitor-every)")
    tr.add_argument("--no-promote", action="store_true", help="never change the plan during training")
    tr.add_argument("--no-monitor", action="store_true", help="do not count overflows and underflows (no "
                                                              "numerics.csv, no promotions)")
    tr.add_argument("--monitor-every", type=int, default=None, metavar="K",
                    help="count the first step and then one in K (default 10; 1 counts every step, at 1.5-5.8x "
                         "an emulated step's time on a CPU); promotions wait for PATIENCE bad counted steps")
    tr.add_argument("--native", action="store_true",
                    help="compute on real bf16/fp16 tensors (a GPU's speed) instead of the emulation; fp8 layers "
                         "keep the emulated recipe")
    tr.add_argument("--device", default=None, help="where to train, e.g. cuda (default: the model's device; under "
                                                   "torchrun with GPUs, each rank's own)")
    tr.set_defaults(func=cmd_train)

    ex = sub.add_parser("export", help="export a model with its plan to ONNX for ONNX Runtime")
    ex.add_argument("model", help="model file following models/README.md, or the .onnx file the plan was tuned on")
    ex.add_argument("--plan", required=True, help="plan.json written by `autoprec tune`")
    ex.add_argument("--data", metavar="INPUTS.npz", help=".onnx models: the --data the plan was tuned with")
    ex.add_argument("--profile", help="profile.json with the fp8 calibration (default: the one beside --plan)")
    ex.add_argument("--weights", metavar="WEIGHTS.pt", help="model files: weights to export instead of model()'s "
                                                             "(the weights.pt `autoprec train` writes beside its plan)")
    ex.add_argument("-o", "--output", required=True, metavar="FILE.onnx", help="where to write the model")
    ex.add_argument("--emulation", action="store_true",
                    help="write the emulation graph (fp32 compute, explicit rounding) that ORT's CPU provider "
                         "runs faithfully, instead of the deployment graph")
    ex.add_argument("--opset", type=int, default=21, help="ONNX opset, 19 or later (default 21); .onnx models are "
                                                          "upgraded to 21")
    ex.add_argument("--provider", default=None,
                    help="ONNX Runtime provider the deployment graph is for (cpu, cuda, tensorrt): a node it has no "
                         "kernel for in its 16-bit format computes in fp32 between casts, with the plan's rounding "
                         "(default: ONNX's schemas decide; `tune --provider` does this for the files it writes)")
    ex.add_argument("--io", default=None, choices=("fp32", "fp16"),
                    help="format of the deployment graph's inputs and outputs (default: the plan's, from `tune --io`, "
                         "else fp32; fp16 for a serving stack that holds its tensors in fp16: the inputs are then "
                         "rounded to fp16 by the caller)")
    ex.set_defaults(func=cmd_export)

    ve = sub.add_parser("verify", help="metric through ONNX Runtime and parity with the torch emulation")
    ve.add_argument("onnx", help="ONNX file written by `autoprec export`")
    ve.add_argument("--model", required=True, help="the model file it was exported from, or the .onnx it was tuned from")
    ve.add_argument("--data", metavar="INPUTS.npz", help=".onnx models: the inputs it was tuned with")
    ve.add_argument("--labels", metavar="LABELS", help=".onnx models: the labels it was tuned with")
    ve.add_argument("--plan", help="plan.json it was exported with (checked; its budget judges the metric)")
    ve.add_argument("--weights", metavar="WEIGHTS.pt", help="model files: the weights it was exported with")
    ve.add_argument("--provider", default="auto",
                    help="ONNX Runtime providers to ask for: auto (CUDA, else CPU) or a list such as tensorrt,cuda")
    ve.add_argument("--json", action="store_true", help="print the report as JSON")
    ve.set_defaults(func=cmd_verify)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if not args.debug:
        for name in _QUIET_LOGGERS:
            logging.getLogger(name).setLevel(logging.ERROR)
    set_runtime_log(debug=args.debug)
    _RESULTS.append(sys.stdout)
    try:
        with contextlib.redirect_stdout(sys.stderr):  # user code's prints: see _RESULTS
            return int(args.func(args))
    except AutoprecError as exc:
        if args.debug:
            raise
        err_console.print(f"[red]error:[/] {exc}", highlight=False)
        return exc.exit_code
    except KeyboardInterrupt:
        err_console.print("interrupted")
        return 130
    except SystemExit as exc:  # autoprec itself never exits inside a command: user code did
        if args.debug:
            raise
        err_console.print(f"[red]error:[/] {_exit_source(exc)} called sys.exit({exc.code!r}) during `autoprec "
                          f"{args.command}`; a model file's functions must return, not exit", highlight=False)
        return 1
    finally:
        _RESULTS.pop()


def _exit_source(exc: SystemExit) -> str:
    """The user file whose code raised ``exc``: the innermost frame outside autoprec and the
    installed packages (a model file, or a helper beside it)."""
    package = str(Path(__file__).resolve().parent)
    prefixes = tuple({sys.prefix, sys.base_prefix, sys.exec_prefix})
    tb, where = exc.__traceback__, "the model's code"
    while tb is not None:
        name = tb.tb_frame.f_code.co_filename
        if not name.startswith((package, *prefixes)) and not name.startswith("<"):
            where = f"{name} (line {tb.tb_lineno})"
        tb = tb.tb_next
    return where


if __name__ == "__main__":
    sys.exit(main())
