"""The ONNX frontend: .onnx files read into an op graph, their data, metric and profile, and the ONNX passes."""
