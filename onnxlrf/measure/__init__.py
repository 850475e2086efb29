"""The torch side: an ONNX graph evaluated in torch, gradients and curvature statistics on calibration data,
single-layer loss measurements, and the analysis cache."""
