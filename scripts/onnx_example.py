"""Write zoo models as .onnx files made by *other* software, with their data, for `autoprec tune x.onnx`.

    python scripts/onnx_example.py OUT_DIR [digits_cnn|char_transformer|digits_resnet|cancer_mlp|resnet18|digits_cnn_large ...]

Each model is written by torch's legacy TorchScript exporter (``dynamo=False``) at opset 13 -- not
by autoprec's exporter: names like ``/conv1/Conv``, weights as initializers read through
Gemm/MatMul, layer norm decomposed into ReduceMean/Sub/Pow/Sqrt/Div (no LayerNormalization
before opset 17), and no autoprec metadata. Beside ``<name>.onnx`` it writes ``<name>.npz`` (the
model's held-out inputs, one array named after the graph input) and ``<name>_labels.npy`` (their
labels: classes, next-token ids, or for resnet18, which has none, the fp32 model's own top-1), so that

    autoprec tune OUT_DIR/digits_cnn.onnx --data OUT_DIR/digits_cnn.npz --labels OUT_DIR/digits_cnn_labels.npy

tunes an ONNX model end to end. The files are written atomically. digits_cnn_large is
benchmarks/models/digits_cnn_large.py: digits_cnn rescaled so that fp16 overflows in some layers.
"""

from __future__ import annotations

import io
import sys
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
MODELS_DIR = ROOT / "models"
sys.path.insert(0, str(MODELS_DIR))
sys.path.insert(0, str(ROOT))

import zoo_common  # noqa: E402

from autoprec.core.io import atomic_write_bytes  # noqa: E402
from autoprec.torch.spec import load_model_spec  # noqa: E402

OPSET = 13


def _digits_data(size: int = 8) -> tuple[np.ndarray, np.ndarray]:
    _, _, x_te, y_te = zoo_common.digits(size)
    return x_te.numpy(), y_te.numpy()


def _digits_resnet_data() -> tuple[np.ndarray, np.ndarray]:
    import digits_resnet

    return _digits_data(digits_resnet.IMAGE_SIZE)


def _cancer_data() -> tuple[np.ndarray, np.ndarray]:
    _, _, x_te, y_te, _, _ = zoo_common.breast_cancer()
    return x_te.numpy(), y_te.numpy()


def _resnet18_data() -> tuple[np.ndarray, np.ndarray]:
    """resnet18 has no labels (seeded random weights): its 32 calibration images, labelled by the fp32
    model's own top-1, so accuracy on them is fidelity, as `autoprec tune --fidelity-budget` measures."""
    import resnet18

    x = torch.cat(resnet18.calibration_data())
    with torch.no_grad():
        y = resnet18.model()(x).argmax(-1)
    return x.numpy(), y.numpy()


def _lm_data() -> tuple[np.ndarray, np.ndarray]:
    import char_transformer

    x, y = char_transformer.eval_windows()  # the windows evaluate() scores
    return x.numpy(), y.numpy()


#: model name -> its held-out (inputs, labels)
DATA: dict[str, Callable[[], tuple[np.ndarray, np.ndarray]]] = {
    "digits_cnn": _digits_data, "char_transformer": _lm_data, "digits_resnet": _digits_resnet_data,
    "cancer_mlp": _cancer_data, "resnet18": _resnet18_data, "digits_cnn_large": _digits_data}


def write_example(name: str, out_dir: Path) -> tuple[Path, Path, Path]:
    """Export ``name`` with the legacy exporter and write (model.onnx, data.npz, labels.npy)."""
    path = MODELS_DIR / f"{name}.py"
    spec = load_model_spec(path if path.exists() else ROOT / "benchmarks" / "models" / f"{name}.py")
    model = spec.model().eval()
    example = spec.example_inputs()
    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the legacy exporter's deprecation notice
        torch.onnx.export(model, example, buf, dynamo=False, opset_version=OPSET, input_names=["input"],
                          output_names=["output"], dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}})
    x, y = DATA[name]()
    out_dir.mkdir(parents=True, exist_ok=True)
    onnx_path = atomic_write_bytes(out_dir / f"{name}.onnx", buf.getvalue())
    data = io.BytesIO()
    np.savez(data, input=x)
    data_path = atomic_write_bytes(out_dir / f"{name}.npz", data.getvalue())
    labels = io.BytesIO()
    np.save(labels, y)
    labels_path = atomic_write_bytes(out_dir / f"{name}_labels.npy", labels.getvalue())
    return onnx_path, data_path, labels_path


def main(argv: list[str]) -> int:
    if not argv or argv[0].startswith("-"):
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    names = argv[1:] or ["digits_cnn"]
    unknown = [n for n in names if n not in DATA]
    if unknown:
        print(f"error: no ONNX example for {', '.join(unknown)}: choose from {', '.join(DATA)}", file=sys.stderr)
        return 2
    for name in names:
        for path in write_example(name, Path(argv[0])):
            print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
