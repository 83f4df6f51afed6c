"""autoprec: automatic per-layer mixed precision (fp32, bf16, fp16, fp8) for PyTorch models and ONNX files."""

from typing import Any


def __getattr__(name: str) -> Any:
    """``autoprec.train`` on first use: importing autoprec loads no torch (an ONNX-only user tunes
    without it)."""
    if name == "train":
        from autoprec.training import train

        return train
    raise AttributeError(f"module 'autoprec' has no attribute {name!r}")
