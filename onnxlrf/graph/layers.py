"""Which layers of an ONNX graph can be factorized, their weights as matrices, and weight groups.

A *layer* is a Conv, ConvTranspose, Gemm or MatMul node whose weight is a
constant (an initializer or a ``Constant`` node output). Its weight is seen
as ``g`` matrices of shape ``(m, n)``, see METHOD.md section 6:

* channel decomposition (any Conv, ConvTranspose, Gemm, MatMul), per group:
  Conv ``(Cout/g) x (Cin/g * prod(kernel))``; ConvTranspose, whose weight is
  stored ``(Cin, Cout/g, kernel...)``, ``(Cin/g) x (Cout/g * prod(kernel))``
  (rows are *input* channels: the rewrite mixes them with a 1x1 Conv first);
  Gemm/MatMul ``out x in``. Each is the stored weight reshaped, no transpose
  (Gemm/MatMul aside).
* spatial decomposition (2-D Conv, groups 1, kernel larger than 1x1):
  one ``(Cin*kh) x (Cout*kw)`` matrix.

Depthwise convs (one input channel per group, Conv or ConvTranspose) stay dense.

A weight shared by several nodes is one *group* (:func:`weight_groups`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import onnx
from onnx import numpy_helper

from ..errors import OnnxlrfError

DECOMPOSITIONS = ("channel", "spatial")


FLOAT_DTYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE)


QUANTIZED_OPS = ("QLinearConv", "QLinearMatMul", "ConvInteger", "MatMulInteger")


FACTORIZABLE_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


CONV_OPS = ("Conv", "ConvTranspose")


@dataclass(frozen=True)
class Layer:
    """A factorizable node. ``out_features``/``in_features`` are the channel matrix's ``m``/``n`` per group
    (for a ConvTranspose, ``m`` counts its input channels per group: see the module doc).

    ``transposed`` says how the stored weight relates to the ``m x n`` matrix:
    True when the stored 2-D weight is ``(n, m)`` (MatMul, Gemm with transB=0).
    """

    node: str
    op_type: str
    weight: str
    weight_shape: tuple
    groups: int
    out_features: int
    in_features: int
    kernel: tuple
    decompositions: tuple
    params: int
    transposed: bool = False

    def matrix_shape(self, decomposition: str) -> tuple[int, int, int]:
        """``(g, m, n)`` of the matrices :func:`weight_matrices` returns."""
        if decomposition == "channel":
            return self.groups, self.out_features, self.in_features
        if decomposition == "spatial" and "spatial" in self.decompositions:
            cout, cin, kh, kw = self.weight_shape
            return 1, cin * kh, cout * kw
        raise OnnxlrfError(f"decomposition {decomposition!r} is not available for node {self.node!r}")

    def max_rank(self, decomposition: str) -> int:
        """Full rank of the decomposition's matrices."""
        _, m, n = self.matrix_shape(decomposition)
        return min(m, n)

    def factorized_params(self, decomposition: str, rank: int) -> int:
        """Weights of the factorized pair at ``rank``."""
        g, m, n = self.matrix_shape(decomposition)
        return g * rank * (m + n)

    def break_even_rank(self, decomposition: str) -> int:
        """Largest rank whose factorized form has fewer parameters than dense (0 if none)."""
        g, m, n = self.matrix_shape(decomposition)
        rank = (self.params - 1) // (g * (m + n))
        return min(rank, self.max_rank(decomposition))


@dataclass(frozen=True)
class SkippedNode:
    """A Conv/ConvTranspose/Gemm/MatMul (or quantized) node that is not factorizable, and why."""

    node: str
    op_type: str
    reason: str


def constant_producers(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    """Constant tensors by name: initializers and ``Constant`` nodes with a ``value`` tensor."""
    graph_inputs = {i.name for i in model.graph.input}
    # An initializer that is also a graph input can be overridden at run time: not a constant.
    constants = {t.name: t for t in model.graph.initializer if t.name not in graph_inputs}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            for attr in node.attribute:
                if attr.name == "value":
                    constants[node.output[0]] = attr.t
    return constants


def count_float_tensor_params(model: onnx.ModelProto) -> int:
    """Elements of float initializers and float ``Constant`` tensors of the main graph."""
    total = sum(math.prod(t.dims) for t in model.graph.initializer if t.data_type in _ALL_FLOATS)
    for node in model.graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value" and attr.t.data_type in _ALL_FLOATS:
                    total += math.prod(attr.t.dims)
    return total


_ALL_FLOATS = FLOAT_DTYPES + (onnx.TensorProto.BFLOAT16,)


def nonfinite_weights(model: onnx.ModelProto) -> list[str]:
    """Names of the float initializers and ``Constant`` tensors of the main graph that hold NaN, or that hold
    +-Inf and are read by a Conv/ConvTranspose/Gemm/MatMul node (elsewhere +-Inf is legitimate: attention
    masks and fill values hold -Inf, as MiniLM's exported graph does)."""
    tensors = [(t.name, t) for t in model.graph.initializer]
    tensors += [(node.output[0], attr.t) for node in model.graph.node if node.op_type == "Constant"
                for attr in node.attribute if attr.name == "value"]
    read_by_layers = {name for node in model.graph.node if node.op_type in FACTORIZABLE_OPS for name in node.input}
    bad = []
    for name, tensor in tensors:
        if tensor.data_type in _ALL_FLOATS:
            values = numpy_helper.to_array(tensor)
            if values.dtype.kind != "f":  # bfloat16 comes as an ml_dtypes type numpy cannot test
                values = values.astype(np.float32)
            if np.isnan(values).any() or (name in read_by_layers and np.isinf(values).any()):
                bad.append(name)
    return bad


def check_finite_weights(model: onnx.ModelProto) -> None:
    """Raise OnnxlrfError naming the first weight that holds NaN or Inf."""
    bad = nonfinite_weights(model)
    if bad:
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise OnnxlrfError(f"weight {bad[0]!r} of the model contains NaN or Inf{more}")


def find_layers(model: onnx.ModelProto) -> tuple[list[Layer], list[SkippedNode]]:
    """Factorizable layers of the main graph, and the Conv/ConvTranspose/Gemm/MatMul/quantized nodes that are
    not."""
    return scan_nodes(model, FACTORIZABLE_OPS, "quantized op: not factorizable", _inspect)


def scan_nodes(model: onnx.ModelProto, op_types: tuple[str, ...], quantized_reason: str,
               inspect: Callable[[onnx.NodeProto, dict, dict], Any]) -> tuple[list, list[SkippedNode]]:
    """The default-domain nodes of ``op_types`` in the main graph as ``inspect(node, constants, dequantized)``
    makes them (a string: why the node is not one; ``dequantized``: :func:`dequantized_weights`), and the
    skipped nodes with why: quantized ops (``quantized_reason``) and nodes without a unique name (plans
    refer to nodes by name)."""
    constants = constant_producers(model)
    dequantized = dequantized_weights(model)
    name_count: dict[str, int] = {}
    for node in model.graph.node:
        name_count[node.name] = name_count.get(node.name, 0) + 1

    found: list = []
    skipped: list[SkippedNode] = []
    for node in model.graph.node:
        if node.domain not in ("", "ai.onnx"):
            continue
        if node.op_type in QUANTIZED_OPS:
            skipped.append(SkippedNode(node.name, node.op_type, quantized_reason))
            continue
        if node.op_type not in op_types:
            continue
        if not node.name:
            skipped.append(SkippedNode(node.name, node.op_type, "node has no name (plans refer to nodes by name)"))
            continue
        if name_count[node.name] > 1:
            skipped.append(SkippedNode(node.name, node.op_type, "node name is not unique"))
            continue
        result = inspect(node, constants, dequantized)
        if isinstance(result, str):
            skipped.append(SkippedNode(node.name, node.op_type, result))
        else:
            found.append(result)
    return found, skipped


def _inspect(node: onnx.NodeProto, constants: dict, dequantized: dict) -> Layer | str:
    """The node as a Layer, or the reason it is not one."""
    weight_index = 1
    if node.op_type == "MatMul" and node.input[0] in constants and node.input[1] not in constants:
        return "constant weight is the first MatMul input (only X @ W is supported)"
    if len(node.input) < 2 or node.input[weight_index] not in constants:
        name = node.input[weight_index] if len(node.input) > 1 else ""
        if name in dequantized:
            return "weight is dequantized from integers (quantized model): not factorizable"
        return "weight is not a constant"
    weight_name = node.input[weight_index]
    tensor = constants[weight_name]
    if tensor.data_type not in FLOAT_DTYPES:
        return f"weight dtype {onnx.TensorProto.DataType.Name(tensor.data_type)} is not supported"
    shape = tuple(int(d) for d in tensor.dims)
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}

    if node.op_type in CONV_OPS:
        if len(shape) < 3:
            return f"{node.op_type} weight of rank {len(shape)} is not supported"
        groups = int(attrs.get("group", 1))
        kernel = shape[2:]
        if node.op_type == "Conv":
            cout, cin_per_group = shape[0], shape[1]
            m, n = cout // groups, cin_per_group * math.prod(kernel)
        else:  # ConvTranspose: (Cin, Cout/g, kernel...), per group (Cin/g) x (Cout/g * kernel)
            cin_per_group = shape[0] // groups
            m, n = cin_per_group, shape[1] * math.prod(kernel)
        if cin_per_group == 1 and groups > 1:
            # With a channel multiplier > 1 a rank-1 pair would save a few weights per group, for one more node.
            why = "of rank 1, which no factor pair makes smaller" if min(m, n) == 1 else \
                f"where a factor pair would save at most {m * n - m - n} of {m * n} weights, for one more node"
            return (f"depthwise {node.op_type} (one input channel per group): stays dense; each of its "
                    f"{groups} groups is a {m}x{n} matrix, {why}")
        spatial = node.op_type == "Conv" and len(kernel) == 2 and groups == 1 and max(kernel) > 1
        decompositions = ("channel", "spatial") if spatial else ("channel",)
        layer = Layer(node.name, node.op_type, weight_name, shape, groups, m, n, tuple(kernel), decompositions,
                      math.prod(shape))
    else:
        if len(shape) != 2:
            return f"constant weight of rank {len(shape)} (only 2-D weights are supported)"
        if node.op_type == "Gemm":
            transposed = not attrs.get("transB", 0)
        else:
            transposed = True
        m, n = (shape[1], shape[0]) if transposed else shape
        layer = Layer(node.name, node.op_type, weight_name, shape, 1, m, n, (), ("channel",),
                      math.prod(shape), transposed)
    available = tuple(d for d in layer.decompositions if layer.break_even_rank(d) >= 1)
    if not available:
        return f"too small: no rank of the {m}x{n} weight saves parameters"
    return layer


def weight_array(model: onnx.ModelProto, layer: Layer) -> np.ndarray:
    """The layer's weight as stored (initializer or Constant node value)."""
    tensor = constant_producers(model).get(layer.weight)
    if tensor is None:
        raise OnnxlrfError(f"weight {layer.weight!r} of node {layer.node!r} is not a constant of this model")
    return numpy_helper.to_array(tensor)


def weight_matrices(weight: np.ndarray, layer: Layer, decomposition: str) -> np.ndarray:
    """The weight as ``(g, m, n)`` matrices for ``decomposition`` (see module doc)."""
    g, m, n = layer.matrix_shape(decomposition)
    if tuple(weight.shape) != tuple(layer.weight_shape):
        raise OnnxlrfError(
            f"weight of node {layer.node!r} has shape {list(weight.shape)}, expected {list(layer.weight_shape)}"
        )
    if layer.op_type not in CONV_OPS:
        return (weight.T if layer.transposed else weight)[None]
    if decomposition == "channel":
        return weight.reshape(g, m, n)
    cout, cin, kh, kw = weight.shape
    # M[c*kh + i, o*kw + j] = W[o, c, i, j]
    return weight.transpose(1, 2, 0, 3).reshape(1, cin * kh, cout * kw)


def matrices_to_weight(matrices: np.ndarray, layer: Layer, decomposition: str) -> np.ndarray:
    """Inverse of :func:`weight_matrices`: ``(g, m, n)`` matrices back to the stored weight's layout."""
    if layer.op_type not in CONV_OPS:
        return matrices[0].T if layer.transposed else matrices[0]
    if decomposition == "channel":
        return matrices.reshape(layer.weight_shape)
    cout, cin, kh, kw = layer.weight_shape
    return matrices.reshape(cin, kh, cout, kw).transpose(2, 0, 1, 3)


def _integer_sources(model: onnx.ModelProto) -> dict[str, tuple[str, int]]:
    """Integer tensors with the integer initializer they are computed from by constant ops and the elements they
    hold: the initializers themselves, and what Cast, Gather (from a constant table), Reshape and Slice make
    of them (how onnxruntime's form unpacks int4 levels stored two per byte)."""
    initializers = {t.name: t for t in model.graph.initializer}
    sources = {name: (name, math.prod(t.dims)) for name, t in initializers.items() if t.data_type not in _ALL_FLOATS}
    for node in model.graph.node:
        if not node.input or not node.output or node.domain not in ("", "ai.onnx"):
            continue
        if node.op_type == "Cast" and node.input[0] in sources and \
                next((a.i for a in node.attribute if a.name == "to"), None) not in _ALL_FLOATS:
            sources[node.output[0]] = sources[node.input[0]]
        elif node.op_type == "Gather" and len(node.input) == 2 and node.input[1] in sources \
                and node.input[0] in initializers:
            name, elements = sources[node.input[1]]
            sources[node.output[0]] = name, elements * math.prod(initializers[node.input[0]].dims[1:])
        elif node.op_type in ("Reshape", "Slice") and node.input[0] in sources \
                and all(name in initializers for name in node.input[1:] if name):
            name, elements = sources[node.input[0]]
            if node.op_type == "Reshape":
                shape = numpy_helper.to_array(initializers[node.input[1]])
                elements = math.prod(shape.tolist()) if (shape > 0).all() else elements
            sources[node.output[0]] = name, elements
    return sources


def dequantized_weights(model: onnx.ModelProto) -> dict[str, str]:
    """Float tensors made from integers, each with the integer initializer: a DequantizeLinear's output, or a Mul
    by float scales of a Cast to float of integer levels (the onnxruntime form of weight-only layers, which the
    session folds to float weights when it loads; int4 levels are unpacked from bytes first)."""
    return {output: name for output, (name, _) in _dequantized(model).items()}


def _dequantized(model: onnx.ModelProto) -> dict[str, tuple[str, int]]:
    """:func:`dequantized_weights` with the number of levels each float tensor is made of."""
    sources = _integer_sources(model)
    scales = {t.name for t in model.graph.initializer if t.data_type in _ALL_FLOATS}
    cast = {node.output[0]: sources[node.input[0]] for node in model.graph.node
            if node.op_type == "Cast" and node.input and node.input[0] in sources}
    found = {}
    for node in model.graph.node:
        if node.op_type == "DequantizeLinear" and node.input:
            found[node.output[0]] = sources.get(node.input[0], (node.input[0], 0))
        elif node.op_type == "Mul" and len(node.input) == 2 and node.input[0] in cast and node.input[1] in scales:
            found[node.output[0]] = cast[node.input[0]]
    return found


def count_params(model: onnx.ModelProto) -> int:
    """Model parameters: elements of float initializers plus float ``Constant`` tensors, and the integer levels
    quantized weights are made from (:func:`dequantized_weights`: parameters in fewer bits; levels unpacked from
    bytes count once each)."""
    levels = {name: count for name, count in _dequantized(model).values()}
    integers = {t.name for t in model.graph.initializer if t.data_type not in _ALL_FLOATS}
    return count_float_tensor_params(model) + sum(count for name, count in levels.items() if name in integers)


def weight_groups(model: onnx.ModelProto, layers: list[Layer]) -> tuple[list[list[Layer]], dict[str, str]]:
    """Layers grouped by weight, and why a group must stay dense (if it must).

    A weight shared by several nodes is factorized once for all of them; that
    is only possible when they see it as the same matrices, and only saves
    parameters when no other node still needs the dense weight.
    """
    groups: dict[str, list[Layer]] = {}
    for layer in layers:
        groups.setdefault(layer.weight, []).append(layer)
    layer_nodes = {layer.node for layer in layers}
    other_users: set[str] = set()
    subgraph_readers: set[str] = set()
    for node in model.graph.node:
        if node.name not in layer_nodes:
            other_users.update(node.input)
        elif node.op_type in ("Conv", "ConvTranspose", "Gemm"):
            other_users.update(node.input[2:])  # a weight used as a bias is a dense use
        subgraph_readers |= subgraph_reads(node)
    for output in model.graph.output:
        other_users.add(output.name)
    dense_reason = {}
    for weight, members in groups.items():
        first = members[0]
        if any((m.op_type, m.transposed, m.groups, m.kernel) != (first.op_type, first.transposed, first.groups,
                                                                    first.kernel) for m in members):
            dense_reason[weight] = "weight shared by nodes that read it differently"
        elif weight in subgraph_readers:
            dense_reason[weight] = "weight also read inside a subgraph (an If, Loop or Scan body)"
        elif weight in other_users:
            dense_reason[weight] = "weight also used by a node that stays dense"
    return list(groups.values()), dense_reason


def subgraph_reads(node: onnx.NodeProto) -> set[str]:
    """Names the subgraphs of ``node`` (If branches, Loop and Scan bodies, nested) read."""
    reads: set[str] = set()
    for attr in node.attribute:
        for graph in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
            for inner in graph.node:
                reads.update(inner.input)
                reads |= subgraph_reads(inner)
            reads.update(output.name for output in graph.output)
    return reads


def dense_weight_reasons(model: onnx.ModelProto) -> dict[str, str]:
    """Weights of factorizable layers that every planner keeps dense, with the reason (shared weights)."""
    layers, _ = find_layers(model)
    return weight_groups(model, layers)[1]
