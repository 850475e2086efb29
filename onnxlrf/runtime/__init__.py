"""onnxruntime: sessions and providers, shapes and FLOPs, interleaved timing, evaluation on data."""
