"""graph.quantizable: which Conv/Gemm/MatMul nodes take quantized weights, their channel axes, and why not."""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from onnxlrf.graph.quantizable import find_quantizable


def model_of(nodes, inits, inputs):
    graph = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_axes_follow_each_op_and_small_layers_count():
    inits = [numpy_helper.from_array(np.ones(shape, np.float32), name) for name, shape in
             (("wc", (4, 3, 1, 1)), ("wg", (2, 4)), ("wt", (4, 2)), ("wm", (2, 5)))]
    nodes = [helper.make_node("Conv", ["x", "wc"], ["c"], "conv"),
             helper.make_node("Flatten", ["c"], ["f"], "flat"),
             helper.make_node("Gemm", ["f", "wg"], ["g"], "gemm_t", transB=1),
             helper.make_node("Gemm", ["g", "wt"], ["t"], "gemm"),
             helper.make_node("MatMul", ["t", "wm"], ["y"], "matmul")]
    layers, skipped = find_quantizable(model_of(nodes, inits, [helper.make_tensor_value_info(
        "x", TensorProto.FLOAT, [1, 3, 1, 1])]))
    assert not skipped
    axes = {layer.node: (layer.channel_axis, layer.reduction_axis) for layer in layers}
    assert axes == {"conv": (0, None), "gemm_t": (0, 1), "gemm": (1, 0), "matmul": (1, 0)}
    assert layers[0].input == "x" and layers[0].bias is None and layers[0].elements == 12


def test_reasons_for_what_cannot_be_quantized():
    inits = [numpy_helper.from_array(np.ones((2, 2), np.float16), "half"),
             numpy_helper.from_array(np.ones((2, 2), np.float32), "w")]
    nodes = [helper.make_node("MatMul", ["x", "half"], ["a"], "half_weight"),
             helper.make_node("MatMul", ["a", "x"], ["b"], "no_constant"),
             helper.make_node("MatMul", ["w", "b"], ["c"], "weight_first"),
             helper.make_node("MatMul", ["c", "w"], ["d"], ""),
             helper.make_node("MatMul", ["d", "w"], ["e"], "twice"),
             helper.make_node("MatMul", ["e", "w"], ["y"], "twice")]
    layers, skipped = find_quantizable(model_of(nodes, inits, [helper.make_tensor_value_info(
        "x", TensorProto.FLOAT, [2, 2])]))
    assert not layers
    reasons = [s.reason for s in skipped]
    assert reasons[0] == "weight dtype FLOAT16 is not float32"
    assert reasons[1] == "weight is not a constant"
    assert reasons[2].startswith("constant weight is the first MatMul input")
    assert reasons[3].startswith("node has no name") and reasons[4] == reasons[5] == "node name is not unique"
