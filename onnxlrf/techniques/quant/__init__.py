"""Quantization (METHOD.md part II): the weight grid, activation calibration, planners, the QDQ rewrite,
sizes, and the technique object."""
