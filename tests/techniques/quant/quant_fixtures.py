"""Small ONNX models for the quantization tests, built in code (seconds to run)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnxlrf.runtime.shapes import count_flops

CLASSES = 4


def residual_cnn(seed: int = 0, opset: int = 17) -> onnx.ModelProto:
    """Conv+Relu, Conv, residual Add, Relu, global pool, Gemm (transB=1): ResNet's pattern in miniature.

    Input ``input`` (N, 3, 8, 8) with a dynamic batch; output ``logits`` (N, 4)."""
    rng = np.random.default_rng(seed)

    def init(name: str, shape: tuple, scale: float = 0.3) -> onnx.TensorProto:
        return numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name)

    inits = [init("w1", (8, 3, 3, 3)), init("b1", (8,), 0.1), init("w2", (8, 8, 3, 3)), init("b2", (8,), 0.1),
             init("fc_w", (CLASSES, 8)), init("fc_b", (CLASSES,), 0.1),
             numpy_helper.from_array(np.array([-1, 8], np.int64), "flat_shape")]
    nodes = [
        helper.make_node("Conv", ["input", "w1", "b1"], ["c1"], "conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], "relu1"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], "conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["c2", "r1"], ["a"], "add"),
        helper.make_node("Relu", ["a"], ["r2"], "relu2"),
        helper.make_node("GlobalAveragePool", ["r2"], ["pool"], "pool"),
        helper.make_node("Reshape", ["pool", "flat_shape"], ["flat"], "flatten"),
        helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["logits"], "fc", transB=1),
    ]
    graph = helper.make_graph(nodes, "residual_cnn",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 8, 8])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", CLASSES])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)


def matmul_model(rows: int = 64, cols: int = 16, seed: int = 0) -> onnx.ModelProto:
    """``y = x @ W`` with a constant (rows, cols) W: a transformer's projection in miniature."""
    weight = (np.random.default_rng(seed).standard_normal((rows, cols)) * 0.2).astype(np.float32)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"], "proj")], "matmul",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", rows])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", cols])],
                              [numpy_helper.from_array(weight, "W")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def images(count: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((count, 3, 8, 8)).astype(np.float32)


def conversion_timer(seen: list | None = None):
    """Each run takes 1 us, plus 1 ns per FLOP (a quarter of that in a model with int8 activations), plus 10 us
    per QuantizeLinear/DequantizeLinear node: int8 pays on wide layers only. ``seen`` collects the models.

    A stand-in for :func:`~onnxlrf.runtime.timing.time_interleaved` that does not depend on how busy the machine is."""
    def timer(runners, **kwargs):
        times = []
        for runner in runners:
            if seen is not None:
                seen.append(runner.model)
            ops = [node.op_type for node in runner.model.graph.node]
            conversions = ops.count("QuantizeLinear") + ops.count("DequantizeLinear")
            speed = 4 if "QuantizeLinear" in ops else 1
            times.append([1e-6 + 1e-9 * count_flops(runner.model) / speed + 1e-5 * conversions] * 5)
        return times
    return timer

