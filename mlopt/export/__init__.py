"""ONNX export, onnxruntime sessions and benchmarking."""
