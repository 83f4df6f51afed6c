"""The same plan priced from a model file and from its ONNX export: the two op graphs, one lowering.

    .venv/bin/python benchmarks/frontend_pricing.py [digits_cnn char_transformer ...]

For each zoo model: capture it (the torch op graph) and export it with autoprec's dynamo export,
then read the export back as an .onnx input (the ONNX op graph); price every uniform plan (every
layer in one format, embedding tables included) on both, at a deployment batch of 1024 on the h100
target, and print the estimated speedup over all-fp32 from each graph and their ratio. The graphs
differ where the export really differs from the capture: a linear layer on 3-D inputs is a MatMul
and a separate bias Add in ONNX (the Add is priced as a FOLLOW op there, inside the layer on the
torch side), and the exporter decomposes some ops into several nodes (each a kernel launch).
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.results import write_section  # noqa: E402
from autoprec.core.formats import Precision  # noqa: E402
from autoprec.cost.roofline import RooflineCostModel  # noqa: E402
from autoprec.deploy.export import torch_to_onnx  # noqa: E402
from autoprec.onnx.graph import analyse_onnx  # noqa: E402
from autoprec.torch.capture import capture  # noqa: E402
from autoprec.torch.spec import load_model_spec  # noqa: E402

MODELS = ["cancer_mlp", "digits_cnn", "digits_resnet", "char_transformer", "resnet18"]
FORMATS = [Precision.BF16, Precision.FP16, Precision.FP8_E4M3]
BATCH = 1024


def _speedups(graph, cm: RooflineCostModel) -> dict[Precision, float]:
    g = graph.at_batch(BATCH)
    base = cm.plan_cost(g, {})
    return {f: base / cm.plan_cost(g, {n: f for n in g.layer_names()}) for f in FORMATS}


def main(names: list[str]) -> None:
    cm = RooflineCostModel("h100")
    lines = ["| model | format | layers torch / onnx | est. speedup, torch graph | onnx graph | onnx / torch |",
             "|---|---|---|---|---|---|"]
    print("\n".join(lines))
    for name in names:
        spec = load_model_spec(ROOT / "models" / f"{name}.py")
        model, example = spec.model(), spec.example_inputs()
        captured = capture(model, example, name=name)
        analysis = analyse_onnx(torch_to_onnx(model, example), example=[x.numpy() for x in example], name=name)
        analysis.graph.batch = captured.graph.batch
        t, o = _speedups(captured.graph, cm), _speedups(analysis.graph, cm)
        layers = f"{len(captured.graph.layer_names())}/{len(analysis.graph.layer_names())}"
        for f in FORMATS:
            lines.append(f"| {name} | {f.value} | {layers} | {t[f]:.3f}x | {o[f]:.3f}x | {o[f] / t[f]:.3f} |")
            print(lines[-1], flush=True)
    write_section("frontend_pricing", "One plan priced from a model file and from its ONNX export", "\n".join(lines))


if __name__ == "__main__":
    main(sys.argv[1:] or MODELS)
