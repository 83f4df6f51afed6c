"""autoprec: automatic per-layer mixed precision (fp32, bf16, fp16, fp8) for PyTorch models and ONNX files."""
