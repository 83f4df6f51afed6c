"""ONNX Runtime: which ops its providers run in which format, and the one place that opens its sessions (torch-free)."""
