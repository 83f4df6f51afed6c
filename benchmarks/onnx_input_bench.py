"""ONNX-input benchmark: tune zoo models given only as .onnx files written by another exporter.

    .venv/bin/python benchmarks/onnx_input_bench.py [digits_cnn char_transformer] [--budget 0.5%]

Each model is written by torch's legacy TorchScript exporter at opset 13 (scripts/onnx_example.py)
with its held-out inputs and labels, then tuned with `autoprec.api.tune_onnx` (accuracy budget:
class accuracy, or next-token accuracy for the LM). Printed per model: the fp32 and tuned accuracy
measured through ONNX Runtime on the emulation graph, the drop against the allowed drop (must be
within), the formats, the estimated speedup against the best uniform plan within budget, the
exact profile's cost in fp32 runs and the tuning time, and the size of the tuned deployment graph
against the input file. With a working CUDA provider the plan is tuned and written for it
(``provider="cuda"``), and the benchmark also records the ORT CUDA latency of the
input model and of the tuned deployment graph (median of 60 runs of one 256-sample batch, the two
graphs in interleaved rounds; ``session.run`` on host arrays, then with inputs and outputs resident
on the GPU) and the
accuracy of the deployment graph measured on the GPU next to the CPU emulation's
(autoprec.deploy.verify.verify_onnx_input); without one it says so. Exits 1 when a plan is over budget,
fails the ONNX checker, or (on a GPU) fails its parity with the emulation graph.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
from pathlib import Path

import onnx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.results import write_section  # noqa: E402
from autoprec.api import tune_onnx  # noqa: E402
from autoprec.core.io import atomic_write_bytes  # noqa: E402
from autoprec.ort.runtime import cuda_available, latencies_ms, set_runtime_log  # noqa: E402
from autoprec.deploy.verify import verify_onnx_input  # noqa: E402


def _examples():
    spec = importlib.util.spec_from_file_location("onnx_example", ROOT / "scripts" / "onnx_example.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    return mod


def main(argv: list[str]) -> tuple[str, bool]:
    ap = argparse.ArgumentParser()
    ap.add_argument("models", nargs="*", default=["digits_cnn", "char_transformer"])
    ap.add_argument("--budget", default="0.5%")
    args = ap.parse_args(argv)
    ex = _examples()
    lines = ["| model (.onnx, opset 13) | accuracy fp32 -> tuned | drop / allowed | within | formats | est. speedup "
             "| best uniform | profile (fp32 runs) | tune time | tuned / input bytes |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    ok = True
    set_runtime_log(debug=False)
    cuda = cuda_available()
    gpu = ["| model | ORT CUDA fp32 | tuned | speedup | resident: fp32 | tuned | speedup "
           "| accuracy, deployment graph on the GPU | CPU emulation | parity rel L2 |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            onnx_path, data, labels = ex.write_example(name, Path(tmp))
            r = tune_onnx(onnx_path, data, labels, args.budget, provider="cuda" if cuda else None)
            s, plan = r.summary, r.plan
            deploy = r.onnx_model("deploy")
            try:
                onnx.checker.check_model(deploy, full_check=True)
            except Exception as exc:  # the checker raises several types
                ok = False
                print(f"{name}: tuned model fails the checker: {exc}", file=sys.stderr)
            within = s.drop <= s.allowed_drop
            ok &= within
            u = s.best_uniform
            counts = ", ".join(f"{k} {v}" for k, v in plan.format_counts().items())
            ratio = deploy.ByteSize() / onnx_path.stat().st_size
            if cuda:
                feeds = r.onnx.batches()[0]
                models = [r.onnx.analysis.model.SerializeToString(), deploy.SerializeToString()]
                ms = [t for resident in (False, True)
                      for t in latencies_ms(models, [feeds] * 2, "cuda", resident=resident)]
                tuned_path = atomic_write_bytes(Path(tmp) / f"{name}.tuned.onnx", deploy.SerializeToString())
                v = verify_onnx_input(tuned_path, onnx_path, data, labels, providers="cuda")
                ok &= v.ok
                gpu.append(f"| {name} | {ms[0]:.3f} ms | {ms[1]:.3f} ms | {ms[0] / ms[1]:.2f}x | {ms[2]:.3f} ms "
                           f"| {ms[3]:.3f} ms | {ms[2] / ms[3]:.2f}x | {v.metric_onnx:.4f} "
                           f"({v.provider}) | {s.metric_tuned:.4f} | {v.parity.rel_l2:.3g} |")
            lines.append(f"| {name} | {s.metric_fp32:.4f} -> {s.metric_tuned:.4f} | {s.drop:.4g} / {s.allowed_drop:.4g} "
                         f"| {'yes' if within else 'NO'} | {counts} | {plan.speedup:.2f}x "
                         f"| {f'{u.format} {u.speedup:.2f}x' if u else 'none'} | {r.profile.cost_passes:.1f} "
                         f"({r.profile.seconds:.1f} s) | {s.seconds:.1f} s | {ratio:.3f} |")
            print(lines[-1], flush=True)
    lines.append("")
    lines += gpu if cuda else ["ORT CUDA latency and GPU metric: skipped (no working CUDA execution provider on this "
                               "machine; ONNX Runtime would fall back to the CPU)."]
    return "\n".join(lines), ok


if __name__ == "__main__":
    table, passed = main(sys.argv[1:])
    print()
    print(table)
    write_section("onnx_input", "ONNX input: models written by another exporter", table)
    sys.exit(0 if passed else 1)
