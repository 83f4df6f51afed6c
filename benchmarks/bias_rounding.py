"""How much a 16-bit layer's bias rule moves a model's outputs.

    .venv/bin/python benchmarks/bias_rounding.py [model ...]

autoprec adds a 16-bit layer's bias as the deployed ONNX graph does, a 16-bit add after the rounded
product: round_P(round_P(x @ W) + round_P(b)) (:func:`autoprec.torch.semantics.finish`). A single rounding
with an fp32 bias, round_P(x @ W + b), is what a fused fp32 epilogue would compute, and no ONNX file
with 16-bit tensors can say it. This prints, per model and 16-bit format, the relative L2 distance and
the top-1 agreement between the all-16-bit torch emulation under the two rules (8 calibration
batches): the error a validation would make if it assumed the other rule.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.results import write_section  # noqa: E402
from autoprec.torch import semantics  # noqa: E402
from autoprec.torch.capture import capture  # noqa: E402
from autoprec.core.formats import Precision  # noqa: E402
from autoprec.torch.quantize import quantize  # noqa: E402
from autoprec.torch.spec import load_model_spec  # noqa: E402
from autoprec.torch.passes import apply_plan  # noqa: E402

MODELS = ("cancer_mlp", "digits_cnn", "char_transformer")


def _single_rounding(kind: str, product: torch.Tensor, bias: torch.Tensor | None, fmt: Precision,
                     recipe: object = None) -> torch.Tensor:
    """round(product + bias) with the bias in fp32: the rule autoprec does not use (``recipe``, the
    training fp8 recipe :func:`semantics.finish` also takes, is None outside training)."""
    return quantize(product if bias is None else product + semantics.bias_view(kind, bias), fmt.compute_output)


def _outputs(module: torch.nn.Module, batches: list, rule) -> torch.Tensor:
    """``module``'s outputs on ``batches`` with ``rule`` as the layers' bias rule (restored after)."""
    kept = semantics.finish
    semantics.finish = rule
    try:
        with torch.no_grad():
            ys = [module(*b) for b in batches]
    finally:
        semantics.finish = kept
    return torch.cat([y.reshape(-1, y.shape[-1]) for y in ys])


def main(argv: list[str]) -> int:
    lines = ["| model | format | rel L2 (one rounding vs autoprec's) | top-1 agreement |", "|---|---|---|---|"]
    print("\n".join(lines))
    for name in argv or MODELS:
        spec = load_model_spec(ROOT / "models" / f"{name}.py")
        cap = capture(spec.model(), spec.example_inputs(), name=spec.name)
        batches = spec.calibration_data()[:8]
        for fmt in (Precision.BF16, Precision.FP16):
            module = apply_plan(cap, {op.name: fmt for op in cap.graph.layers()}, {})
            ours, other = _outputs(module, batches, semantics.finish), _outputs(module, batches, _single_rounding)
            rel = float((other - ours).norm() / ours.norm())
            top1 = float((other.argmax(-1) == ours.argmax(-1)).float().mean())
            lines.append(f"| {name} | {fmt.value} | {rel:.2e} | {100 * top1:.2f}% |")
            print(lines[-1], flush=True)
    write_section("bias_rounding", "Bias rounding: one rounding against autoprec's rule", "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
