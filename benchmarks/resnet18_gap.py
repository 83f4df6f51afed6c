"""Why a peer's all-fp16 resnet18 holds a 1% fidelity budget that autoprec's all-fp16 plan does not.

    .venv/bin/python benchmarks/resnet18_gap.py

resnet18 (seeded weights, no labels) is judged on its 32 calibration images labelled by the fp32
model's own top-1 (scripts/onnx_example.py), so a 1% budget allows no image to change its class.
This runs the model's .onnx file (torch's legacy exporter) all in fp16 and all in bf16 two ways, both
on ONNX Runtime's CPU provider with every rounding explicit:

- autoprec's emulation graph of the uniform plan (``OnnxModel.build(..., "emulate")``): the
  numerics of the graph autoprec deploys, which adds a layer's bias to its rounded product in the
  layer's format and rounds the results of the ops that follow a 16-bit layer (DESIGN.md);
- the all-fp16 / all-bf16 graph onnxconverter-common's converter writes (ModelOpt AutoCast writes
  the same for this model: every node in 16 bits), emulated as peers_bench.py does: each node's
  output rounded once, a convolution's bias inside it.

Printed: the images whose class changes, with their fp32 top-2 logit margins next to the smallest
margins of all 32 images.
"""

from __future__ import annotations

import importlib.util
import sys
import tempfile
import warnings
from pathlib import Path
from types import ModuleType

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from autoprec.core.formats import Precision  # noqa: E402
from autoprec.onnx.model import OnnxModel  # noqa: E402
from benchmarks.peers_bench import emulate_low_precision, run_cpu  # noqa: E402
from benchmarks.results import write_section  # noqa: E402


def _load(name: str, path: Path) -> ModuleType:
    """A script of this repository imported as a module (registered: its dataclasses need it)."""
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    return mod


def main() -> int:
    from onnxconverter_common import float16

    examples = _load("onnx_example", ROOT / "scripts" / "onnx_example.py")
    lines = ["| graph | format | images whose class changes | their fp32 top-2 margins |", "|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path, data_path, labels_path = examples.write_example("resnet18", Path(tmp))
        om = OnnxModel.load(onnx_path, data_path, labels_path)
        x, labels = np.load(data_path)["input"], np.load(labels_path)
        fp32 = run_cpu(om.analysis.model, {"input": x})
        top2 = np.sort(fp32, axis=-1)[:, -2:]
        margins = top2[:, 1] - top2[:, 0]
        layers = om.analysis.graph.layer_names()
        for fmt in (Precision.FP16, Precision.BF16):
            graphs = {"autoprec's emulation of the uniform plan": om.build({n: fmt for n in layers}, None, "emulate")}
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # weights clipped to fp16's range
                converted = (float16.convert_float_to_float16(om.analysis.model, keep_io_types=True)
                             if fmt is Precision.FP16 else None)
            if converted is not None:
                graphs["the converter's graph, one rounding per node"] = emulate_low_precision(converted)
            for label, graph in graphs.items():
                out = run_cpu(graph, {"input": x}, optimize=False)
                flips = np.nonzero(out.argmax(-1) != labels)[0]
                lines.append(f"| {label} | {fmt.value} | {', '.join(map(str, flips)) or 'none'} "
                             f"| {', '.join(f'{margins[i]:.3f}' for i in flips) or '-'} |")
                print(lines[-1], flush=True)
    smallest = ", ".join(f"{m:.3f} (image {i})" for i, m in sorted(enumerate(margins), key=lambda t: t[1])[:4])
    lines += ["", f"The smallest fp32 top-2 margins of the 32 images: {smallest}."]
    print(lines[-1])
    write_section("resnet18_gap", "resnet18 at 1%: where autoprec's numerics and a peer's differ", "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
