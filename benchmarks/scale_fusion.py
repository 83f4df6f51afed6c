"""How much ONNX Runtime's MatMulScaleFusion would move a model's outputs, were it not kept out.

    .venv/bin/python benchmarks/scale_fusion.py [model ...]

ORT's MatMulScaleFusion folds a Mul/Div by a scalar constant after a MatMul (attention's
``q @ k^T * scale``) into a FusedMatMul, which rounds ``acc * scale`` once where a 16-bit plan rounds
the product and then the scaled product (:mod:`autoprec.onnx.passes.keep_roundings` keeps the two apart).
This prints, per model and 16-bit format, the relative L2 distance and the top-1 agreement between
the all-16-bit emulation graph and the same graph with each such product's rounding removed
(8 calibration batches, ORT's CPU provider): what the fusion would do on a GPU.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.results import write_section  # noqa: E402
from autoprec.torch.capture import capture  # noqa: E402
from autoprec.deploy.export import apply_plan_onnx, torch_to_onnx  # noqa: E402
from autoprec.core.formats import Precision  # noqa: E402
from autoprec.ort.runtime import open_session  # noqa: E402
from autoprec.torch.spec import load_model_spec  # noqa: E402
from autoprec.onnx.passes.base import GraphIndex  # noqa: E402

MODELS = ("char_transformer",)


def without_scale_rounding(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """A copy of emulation graph ``model`` where every Mul by a constant that reads a MatMul's result
    through its rounding (Cast to 16 bits, Cast back) reads the unrounded product; and how many."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    idx = GraphIndex(out)
    found = 0
    for n in out.graph.node:
        if n.op_type != "Mul":
            continue
        for k, u in enumerate(n.input):
            back = idx.producer.get(u)
            down = idx.producer.get(idx.nodes[back].input[0]) if back is not None else None
            if back is None or down is None or idx.nodes[back].op_type != "Cast" or idx.nodes[down].op_type != "Cast":
                continue
            mm = idx.producer.get(idx.nodes[down].input[0])
            if mm is not None and idx.nodes[mm].op_type == "MatMul" and n.input[1 - k] in idx.inits:
                n.input[k] = idx.nodes[down].input[0]
                found += 1
    return out, found


def main(argv: list[str]) -> int:
    names = argv or list(MODELS)
    lines = ["| model | format | scaled products | rel L2 | top-1 agreement |", "|---|---|---|---|---|"]
    print("\n".join(lines))
    for name in names:
        spec = load_model_spec(ROOT / "models" / f"{Path(name).stem}.py")
        module = spec.model()
        captured = capture(module, spec.example_inputs(), name=spec.name)
        fp32 = torch_to_onnx(module, spec.example_inputs())
        batches = [b[0].numpy() for b in spec.calibration_data()[:8]]
        for fmt in (Precision.BF16, Precision.FP16):
            emu = apply_plan_onnx(fp32, captured, {n: fmt for n in captured.graph.layer_names()}, mode="emulate")
            fused, found = without_scale_rounding(emu)
            a = np.concatenate([open_session(emu.SerializeToString(), "cpu")(x)[0] for x in batches])
            b = np.concatenate([open_session(fused.SerializeToString(), "cpu")(x)[0] for x in batches])
            rel = float(np.linalg.norm(a - b) / np.linalg.norm(a))
            top1 = float((a.argmax(-1) == b.argmax(-1)).mean())
            lines.append(f"| {spec.name} | {fmt.value} | {found} | {rel:.3g} | {100 * top1:.2f}% |")
            print(lines[-1], flush=True)
    write_section("scale_fusion", "Scale fusion: what ONNX Runtime's MatMulScaleFusion would move", "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
