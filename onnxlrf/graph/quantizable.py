"""Which Conv/Gemm/MatMul nodes can have their weights quantized, and why the others cannot.

A quantizable layer is a uniquely named Conv, Gemm or MatMul node whose weight is a float32
constant (initializer or ``Constant`` node). Quantization is per output channel, so each layer
records the axis of its stored weight that holds output channels (Conv 0; Gemm ``transB=1`` 0,
``transB=0`` 1; MatMul 1) and the axis its inputs are summed over (blocks run along it).
Unlike factorization, size does not matter: a 1x1 conv or a 10-class classifier is quantizable.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import onnx

from .layers import SkippedNode, scan_nodes

QUANTIZABLE_OPS = ("Conv", "Gemm", "MatMul")
# Block-wise scales (DequantizeLinear's block_size) are what the runtimes execute for matrix products only.
BLOCK_OPS = ("Gemm", "MatMul")


@dataclass(frozen=True)
class QuantLayer:
    """A node whose weight can be quantized: names, the stored weight's shape and its channel axes."""

    node: str
    op_type: str
    weight: str
    weight_shape: tuple
    input: str  # the activation the node reads (its first input)
    bias: str | None  # Conv's or Gemm's bias input, if it has one
    channel_axis: int  # axis of the stored weight that holds output channels (per-channel scales)
    reduction_axis: int | None  # Gemm/MatMul: axis the product sums over (block scales run along it)

    @property
    def elements(self) -> int:
        return math.prod(self.weight_shape)


def find_quantizable(model: onnx.ModelProto) -> tuple[list[QuantLayer], list[SkippedNode]]:
    """Quantizable layers of the main graph, and the Conv/Gemm/MatMul (or already quantized) nodes that
    are not, with the reason."""
    return scan_nodes(model, QUANTIZABLE_OPS, "already a quantized op", _inspect)


def _inspect(node: onnx.NodeProto, constants: dict, dequantized: dict) -> QuantLayer | str:
    """The node as a QuantLayer, or why it is not one."""
    if node.op_type == "MatMul" and node.input[0] in constants and node.input[1] not in constants:
        return "constant weight is the first MatMul input (only X @ W is supported)"
    weight = node.input[1] if len(node.input) > 1 else ""
    if weight not in constants:
        if weight in dequantized:
            return "weight is dequantized from integers: already quantized"
        return "weight is not a constant"
    tensor = constants[weight]
    if tensor.data_type != onnx.TensorProto.FLOAT:
        return f"weight dtype {onnx.TensorProto.DataType.Name(tensor.data_type)} is not float32"
    shape = tuple(int(d) for d in tensor.dims)
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
    if node.op_type == "Conv":
        if len(shape) < 3:
            return f"Conv weight of rank {len(shape)} is not supported"
        channel_axis, reduction_axis = 0, None
    else:
        if len(shape) != 2:
            return f"constant weight of rank {len(shape)} (only 2-D weights are supported)"
        transposed = node.op_type == "Gemm" and bool(attrs.get("transB", 0))
        channel_axis, reduction_axis = (0, 1) if transposed else (1, 0)
    return QuantLayer(node.name, node.op_type, weight, shape, node.input[0], bias, channel_axis, reduction_axis)
