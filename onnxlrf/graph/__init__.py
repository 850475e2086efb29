"""The ONNX graph seen as weighted layers: which nodes can be compressed, their weights, counts."""
