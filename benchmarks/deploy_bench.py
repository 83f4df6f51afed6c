"""Deployment benchmark: tune every zoo model, export it to ONNX and check it through ONNX Runtime.

    .venv/bin/python benchmarks/deploy_bench.py [models/x.py ...] [--budget 0.5%] [--out FILE]

For each model: tune at the budget (models without evaluate(): the same number as a fidelity
budget), export the tuned deployment graph, run the ONNX checker (full_check), and report

- the file size against the fp32 export, for the tuned plan and for every layer in bf16, fp16 and
  fp8 (goals: all-16-bit <= 0.52, all-fp8 <= 0.28 where layer weights dominate the file; embedding
  tables are fp8 in the fp8 figure too, with one scale per row), and the bytes of the layers'
  weights alone in those uniform files against fp32 (fp8: codes plus the per-channel fp32 scales,
  so 1/4 + 1/fan-in of fp32 per weight). The rest of a file is what no format changes (norm parameters
  and buffers, an fp8 layer's fp32 bias and scales) and the graph, which grows by the casts and a
  16-bit layer's bias Add; on the zoo's smallest models it is what keeps the file ratio above the
  goals. Both files drop the exporter's all-zero biases (SplitBias);
- the metric through ONNX Runtime against the torch emulation's and against the budget
  (autoprec.deploy.verify: on a CPU provider the metric runs on the emulation graph, and says so);
- parity between the torch emulation and ONNX Runtime (relative L2, top-1 agreement): the emulation
  graph on a CPU provider, the deployment graph itself on a GPU;
- with a working CUDA provider, the latency of the fp32 and tuned deployment graphs (median of 30
  runs at the batch tune prices, 1024; ``session.run`` on host arrays and, with IOBinding, on
  GPU-resident inputs and outputs) next to the cost model's estimated speedup and what tune's own
  timing check chose (:func:`autoprec.api.tune`), the plan then tuned and written for that provider (``--provider cuda``: fp8
  there is fp32 compute between Q/DQ, and ops without a 16-bit CUDA kernel compute in fp32); without
  one, a line saying it was skipped.

Prints a markdown table (and writes it to --out), with verify's note under it where a model's
ONNX metric misses the budget only at near ties; exits 1 if a tuned model fails the checker, its
parity or its budget.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import onnx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.results import write_section, zoo  # noqa: E402
from autoprec.api import DEPLOY_BATCH, tune  # noqa: E402
from autoprec.deploy.export import apply_plan_onnx, torch_to_onnx  # noqa: E402
from autoprec.core.formats import Precision  # noqa: E402
from autoprec.core.io import atomic_write_bytes, atomic_write_text  # noqa: E402
from autoprec.onnx.graph import graph_inputs  # noqa: E402
from autoprec.ort.runtime import cuda_available, latencies_ms, repeat_to, set_runtime_log  # noqa: E402
from autoprec.torch.spec import load_model_spec  # noqa: E402
from autoprec.deploy.verify import near_tie_note, verify  # noqa: E402
from autoprec.torch.passes import act_amax_from_profile  # noqa: E402
from autoprec.onnx.passes.base import INSERTED, LAYER, GraphIndex, get_meta, weight_slot  # noqa: E402

LATENCY_BATCH = DEPLOY_BATCH  # the batch tune prices and times
LATENCY_RUNS = 30


def _checked(model: onnx.ModelProto) -> bool:
    try:
        onnx.checker.check_model(model, full_check=True)
        return True
    except Exception:  # the checker raises ValidationError or InferenceError
        return False


def _latencies_ms(base: onnx.ModelProto, tuned: onnx.ModelProto, example, resident: bool) -> list[float]:
    """ORT CUDA latency of (fp32, tuned, fp32 again), timed in interleaved rounds: the two fp32
    figures differ by the measurement's noise."""
    x = [repeat_to(t.numpy(), LATENCY_BATCH) for t in example]
    feeds = dict(zip([i.name for i in graph_inputs(base)], x))
    models = [m.SerializeToString() for m in (base, tuned, base)]
    ms = latencies_ms(models, [feeds] * 3, "cuda", runs=LATENCY_RUNS, resident=resident)
    return [float("nan") if v is None else v for v in ms]


def layer_weight_bytes(model: onnx.ModelProto) -> int:
    """Bytes of the initializers the layers read as weights in ``model``: the tensor at the weight
    slot of each layer's MatMul/Gemm/Conv/Gather, or the initializers of the node LowerWeights put
    there (a 16-bit weight's Cast, an fp8 weight's codes and scales). A product of two activations
    reads none."""
    idx = GraphIndex(model)
    total = 0
    for n in idx.nodes:
        if not get_meta(n, LAYER) or n.op_type not in ("MatMul", "Gemm", "Conv", "Gather"):
            continue
        w = n.input[weight_slot(n)]
        if w in idx.inits:
            total += len(idx.inits[w].raw_data)
        elif w in idx.producer and get_meta(idx.nodes[idx.producer[w]], INSERTED) == "weight":
            total += sum(len(idx.inits[i].raw_data) for i in idx.nodes[idx.producer[w]].input if i in idx.inits)
    return total


def bench(path: Path, budget: str, workdir: Path, cuda: bool) -> dict[str, object]:
    spec = load_model_spec(path)
    t0 = time.perf_counter()
    kw = {"budget": budget} if spec.evaluate is not None else {"fidelity_budget": budget}
    provider = "cuda" if cuda else None  # on a GPU: priced and written for ORT's CUDA provider
    result = tune(spec, provider=provider, **kw)
    t_tune = time.perf_counter() - t0
    captured, plan = result.captured, result.plan
    amax = act_amax_from_profile(result.profile)
    module = spec.model()
    fp32 = torch_to_onnx(module, spec.example_inputs())
    base = apply_plan_onnx(fp32, captured, {}, amax, provider=provider)
    tuned = apply_plan_onnx(fp32, captured, plan.assignment, amax, provider=provider)
    size, weights = base.ByteSize(), layer_weight_bytes(base)
    ratios = {"tuned": tuned.ByteSize() / size}
    weight_ratios = {}
    for fmt in (Precision.BF16, Precision.FP16, Precision.FP8_E4M3):
        uniform = apply_plan_onnx(fp32, captured, {op.name: fmt for op in captured.graph.layers()}, amax)
        ratios[fmt.value] = uniform.ByteSize() / size
        weight_ratios[fmt.value] = layer_weight_bytes(uniform) / weights
    onnx_path = atomic_write_bytes(workdir / f"{spec.name}.onnx", tuned.SerializeToString())
    plan_path = plan.save(workdir / f"{spec.name}.plan.json")
    report = verify(onnx_path, spec, plan_path)
    row: dict[str, object] = {
        "model": spec.name, "layers": len(captured.graph.layer_names()), "formats": plan.format_counts(),
        "checker": _checked(onnx.load(str(onnx_path))), "fp32_bytes": size, "ratios": ratios,
        "weight_bytes": weights, "weight_ratios": weight_ratios,
        "metric": report.metric, "fp32": report.metric_fp32, "torch": report.metric_torch_emulated,
        "onnx": report.metric_onnx, "drop": report.drop, "allowed": report.allowed_drop,
        "within": report.within_budget, "graph": report.metric_graph, "provider": report.provider,
        "rel_l2": report.parity.rel_l2, "tolerance": report.parity.tolerance, "top1": report.parity.top1_agreement,
        "top1_raw": report.parity.top1_raw, "ties": report.parity.near_ties, "parity": report.parity.ok,
        "tune_s": t_tune, "note": near_tie_note(report),
    }
    if cuda:
        row["estimate"] = plan.speedup
        row["timed"] = result.summary.timing.chosen if result.summary.timing else "-"
        for resident in (False, True):
            row["resident" if resident else "host"] = _latencies_ms(base, tuned, spec.example_inputs(), resident)
    return row


def table(rows: list[dict[str, object]], budget: str, cuda: bool) -> str:
    lines = [f"Deployment of the tuned plans (budget {budget}); sizes relative to autoprec's fp32 export of the "
             "same model; metric and parity from autoprec.deploy.verify.", "",
             "| model | formats | checker | bytes fp32 | tuned / bf16 / fp16 / fp8 | layer weights: fp32 bytes, "
             "bf16 / fp16 / fp8 | metric (graph) | fp32 -> torch emul. -> ONNX | drop / allowed | parity rel L2 (tol) "
             "| top-1 agr. | ok |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ratios, wr = r["ratios"], r["weight_ratios"]
        counts = ", ".join(f"{k} {v}" for k, v in r["formats"].items())
        ok = r["checker"] and r["parity"] and r["within"] is not False
        top1 = f"{100 * r['top1']:.2f}%" if r["top1"] is not None else "-"
        if r["ties"]:
            top1 += f" ({100 * r['top1_raw']:.2f}% with {r['ties']} near-tie(s))"
        allowed = f"{r['allowed']:.4g}" if r["allowed"] is not None else "-"
        lines.append(
            f"| {r['model']} | {counts} | {'pass' if r['checker'] else 'FAIL'} | {r['fp32_bytes']:,} "
            f"| {ratios['tuned']:.4f} / {ratios['bf16']:.4f} / {ratios['fp16']:.4f} / {ratios['fp8_e4m3']:.4f} "
            f"| {r['weight_bytes']:,}: {wr['bf16']:.3f} / {wr['fp16']:.3f} / {wr['fp8_e4m3']:.3f} "
            f"| {r['metric']} ({r['graph']}, {r['provider']}) | {r['fp32']:.4f} -> {r['torch']:.4f} -> {r['onnx']:.4f} "
            f"| {r['drop']:.4g} / {allowed} | {r['rel_l2']:.2e} ({r['tolerance']:.2e}) | {top1} "
            f"| {'yes' if ok else 'NO'} |")
    lines.append("")
    notes = [f"{r['model']}: {r['note']}." for r in rows if r["note"]]
    lines += notes + [""] * bool(notes)
    if cuda:
        lines += [f"ORT CUDA latency at batch {LATENCY_BATCH}, median of {LATENCY_RUNS} runs in interleaved rounds: "
                  "`session.run` on host arrays (copies in and out included), and with inputs and outputs resident "
                  "on the GPU (IOBinding: the graph alone); the fp32 graph is timed twice, and the two figures differ "
                  "by the measurement's noise; the cost model's estimate beside them.", "",
                  "| model | fp32 ms (again) | tuned ms | speedup | resident: fp32 ms (again) | tuned ms | speedup "
                  "| estimated | tune's timing check |", "|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            cells = []
            for key in ("host", "resident"):
                a, t, b = r[key]
                cells.append(f"{a:.3f} ({b:.3f}) | {t:.3f} | {(a + b) / 2 / t:.2f}x")
            lines.append(f"| {r['model']} | {' | '.join(cells)} | {r['estimate']:.2f}x | {r['timed']} |")
    else:
        lines.append("ORT CUDA latency: skipped (no working CUDA execution provider on this machine; "
                     "onnxruntime falls back to the CPU, where low-precision speed cannot be measured).")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="*")
    ap.add_argument("--budget", default="0.5%")
    ap.add_argument("--out", help="also write the table to this file")
    args = ap.parse_args(argv)
    set_runtime_log(debug=False)
    cuda = cuda_available()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for path in (args.models or zoo()):
            rows.append(bench(Path(path), args.budget, Path(tmp), cuda))
            print(f"{rows[-1]['model']}: done ({rows[-1]['tune_s']:.1f} s tuning)", file=sys.stderr, flush=True)
    text = table(rows, args.budget, cuda)
    print(text)
    write_section("deploy", "Deploy: tune, export and check through ONNX Runtime", text)
    if args.out:
        atomic_write_text(args.out, text + "\n")
    bad = [r for r in rows if not (r["checker"] and r["parity"] and r["within"] is not False)]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
