"""FLOPs of each layer, dense and factorized, at a batch size (shapes from onnxruntime's inference)."""

from __future__ import annotations

import math

import onnx

from ..errors import OnnxlrfError
from ..graph.layers import Layer, find_layers


def layer_shapes(model: onnx.ModelProto, batch: int = 1, seq_length: int = 128
                 ) -> dict[str, tuple[list[int], list[int]]]:
    """Per layer node: (input shape, output shape) at ``batch`` (symbolic non-batch dims -> ``seq_length``)."""
    from ..runtime.shapes import concrete_input_shapes, infer_shapes

    shapes = infer_shapes(model, concrete_input_shapes(model, batch, seq_length))
    nodes = {node.name: node for node in model.graph.node}
    out = {}
    for layer in find_layers(model)[0]:
        node = nodes[layer.node]
        x, y = shapes.get(node.input[0]), shapes.get(node.output[0])
        if x is None or y is None or None in x or None in y:
            raise OnnxlrfError(f"shape inference leaves the input or output shape of node {layer.node!r} unknown")
        out[layer.node] = (list(x), list(y))
    return out


def layer_flops(layer: Layer, input_shape: list[int], output_shape: list[int],
                decomposition: str | None = None, rank: int | None = None) -> int:
    """FLOPs (2 x MACs) of the dense node (``decomposition`` None) or of its factorized pair."""
    if layer.op_type == "Conv":
        positions = output_shape[0] * math.prod(output_shape[2:])  # batch x output pixels
    elif layer.op_type == "ConvTranspose":
        # Each input pixel is spread over (output channels x kernel); the pair's 1x1 Conv runs on the input too.
        positions = input_shape[0] * math.prod(input_shape[2:])
    else:
        positions = math.prod(input_shape[:-1])  # rows of X in X @ W (Gemm with transA: pass A's shape reversed)
    g, m, n = layer.groups, layer.out_features, layer.in_features
    if decomposition is None:
        return 2 * positions * g * m * n
    if decomposition == "channel":
        return 2 * positions * g * rank * (m + n)
    # spatial: (kh x 1) conv over the full input width, then (1 x kw) conv on the output grid
    cout, cin, kh, kw = layer.weight_shape
    first = output_shape[0] * output_shape[2] * input_shape[3] * rank * cin * kh
    return 2 * (first + positions * cout * rank * kw)


class FlopsCost:
    """Cost in FLOPs of Conv/ConvTranspose/Gemm/MatMul nodes at ``batch`` (the total is
    :func:`validation.count_flops`)."""

    target = "flops"
    resolution = 1.0

    def __init__(self, model: onnx.ModelProto, batch: int = 1, seq_length: int = 128) -> None:
        from ..runtime.shapes import concrete_input_shapes, count_flops

        self.model, self.batch, self.seq_length = model, batch, seq_length
        self.shapes = layer_shapes(self.model, self.batch, self.seq_length)
        self._total = count_flops(self.model, concrete_input_shapes(self.model, self.batch, self.seq_length))
        self._trans_a = {n.name: any(a.name == "transA" and a.i for a in n.attribute)
                         for n in self.model.graph.node if n.op_type == "Gemm"}

    def _flops(self, layer: Layer, decomposition: str | None = None, rank: int | None = None) -> int:
        x, y = self.shapes[layer.node]
        if self._trans_a.get(layer.node):
            x = x[::-1]  # Gemm with transA reads A as (K, M): rows are its last dim
        return layer_flops(layer, x, y, decomposition, rank)

    def total(self) -> float:
        return float(self._total)

    def dense(self, layers: list[Layer]) -> float:
        return float(sum(self._flops(layer) for layer in layers))

    def factorized(self, layers: list[Layer], decomposition: str, rank: int) -> float:
        return float(sum(self._flops(layer, decomposition, rank) for layer in layers))

    def describe(self) -> dict:
        return {"batch": self.batch, "seq_length": self.seq_length}

    def notes(self, layer: Layer, decomposition: str | None, rank: int | None) -> dict:
        dense = self._flops(layer)
        return {"flops_dense": dense,
                "flops_planned": dense if decomposition is None else self._flops(layer, decomposition, rank)}
