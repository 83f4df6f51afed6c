"""The passes that apply a precision plan to an ONNX graph (exported from torch, or an .onnx input)."""
