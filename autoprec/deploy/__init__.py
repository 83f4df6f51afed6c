"""Deployment: provider kernel tables, ONNX Runtime sessions, export of a plan to ONNX, and verification."""
