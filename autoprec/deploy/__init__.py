"""Deployment: a torch model and its plan exported to ONNX, and a written file verified against the plan."""
