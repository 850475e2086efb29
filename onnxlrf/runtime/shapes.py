"""Tensor shapes (ONNX and onnxruntime's symbolic inference), FLOPs of Conv/ConvTranspose/Gemm/MatMul nodes,
file sizes."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import onnx

from ..data import graph_inputs
from ..errors import OnnxlrfError
from ..onnx_io import fits_one_message, load_onnx, save_onnx


# Symbolic dims other than the batch axis (sequence length) become this in random feeds and FLOP counts.
DEFAULT_SEQ_LENGTH = 128


ModelLike = onnx.ModelProto | str | os.PathLike


def concrete_input_shapes(
    model: onnx.ModelProto, batch: int = 1, seq_length: int = DEFAULT_SEQ_LENGTH
) -> dict[str, list[int]]:
    """Graph input shapes with static dims kept, symbolic axis 0 -> ``batch``, other symbolic dims -> ``seq_length``."""
    shapes = {}
    for inp in graph_inputs(model):
        dims = inp.type.tensor_type.shape.dim
        shapes[inp.name] = [
            d.dim_value if d.HasField("dim_value") else (batch if axis == 0 else seq_length)
            for axis, d in enumerate(dims)
        ]
    return shapes


def _with_input_shapes(model: onnx.ModelProto, input_shapes: dict[str, list[int]]) -> onnx.ModelProto:
    """A copy whose graph inputs have ``input_shapes`` and no stale inferred shapes."""
    concrete = onnx.ModelProto()
    concrete.CopyFrom(model)
    del concrete.graph.value_info[:]
    for value in concrete.graph.output:  # symbolic output shapes could contradict the concrete ones
        value.type.tensor_type.ClearField("shape")
    for inp in graph_inputs(concrete):
        if inp.name in input_shapes:
            shape = inp.type.tensor_type.shape
            shape.ClearField("dim")
            for size in input_shapes[inp.name]:
                shape.dim.add().dim_value = int(size)
    return concrete


def _onnx_inference(model: onnx.ModelProto) -> onnx.ModelProto:
    if fits_one_message(model):
        return onnx.shape_inference.infer_shapes(model, data_prop=True)
    with tempfile.TemporaryDirectory(prefix="onnxlrf-shapes-") as tmp:
        path = save_onnx(model, Path(tmp) / "model.onnx", external_data=True)
        onnx.shape_inference.infer_shapes_path(str(path), str(path), data_prop=True)
        return onnx.load(str(path), load_external_data=False)


def _symbolic_inference(model: onnx.ModelProto) -> onnx.ModelProto:
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    # It writes temporary files (sym_shape_infer_temp.onnx, <uuid>.data) into the current directory
    # and can leave them there: run it in a directory of its own.
    with tempfile.TemporaryDirectory(prefix="onnxlrf-shapes-") as tmp:
        previous = os.getcwd()
        os.chdir(tmp)
        try:
            return SymbolicShapeInference.infer_shapes(model, auto_merge=True)
        finally:
            os.chdir(previous)


def _tensor_shapes(model: onnx.ModelProto) -> dict[str, list[int | None]]:
    shapes: dict[str, list[int | None]] = {}
    for value in list(model.graph.input) + list(model.graph.value_info) + list(model.graph.output):
        if value.type.tensor_type.HasField("shape"):
            shapes[value.name] = [
                d.dim_value if d.HasField("dim_value") else None for d in value.type.tensor_type.shape.dim
            ]
    for init in model.graph.initializer:
        shapes[init.name] = list(init.dims)
    for node in model.graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    shapes[node.output[0]] = list(attr.t.dims)
    return shapes


def _contraction_shapes(
    model: onnx.ModelProto, shapes: dict[str, list[int | None]]
) -> list[tuple[onnx.NodeProto, list | None, list | None]]:
    """Per Conv/ConvTranspose/Gemm/MatMul node: (node, positions, contracted dims), None where unknown.

    Each element of ``positions`` costs one multiply-accumulate per element of the contracted dims:
    the output shape, and for a ConvTranspose the input shape (each input element is spread over
    ``Cout/g x kernel`` outputs).
    """
    found = []
    for node in model.graph.node:
        if node.op_type not in ("Conv", "ConvTranspose", "Gemm", "MatMul"):
            continue
        out, a, w = shapes.get(node.output[0]), shapes.get(node.input[0]), shapes.get(node.input[1])
        if node.op_type == "ConvTranspose":
            out, contraction = a, (w[1:] if w else None)
        elif node.op_type == "Conv":
            contraction = w[1:] if w else None
        elif node.op_type == "Gemm":
            trans_a = any(attr.name == "transA" and attr.i for attr in node.attribute)
            contraction = [a[0 if trans_a else 1]] if a and len(a) == 2 else None
        else:
            contraction = [a[-1]] if a else None
        found.append((node, out, contraction))
    return found


def _known(out: list | None, contraction: list | None) -> bool:
    return out is not None and contraction is not None and None not in out and None not in contraction


def infer_shapes(
    model: onnx.ModelProto, input_shapes: dict[str, list[int]] | None = None
) -> dict[str, list[int | None]]:
    """Shapes of the graph's tensors (None for unknown dims) with concrete inputs.

    ``input_shapes`` where given, else :func:`concrete_input_shapes` (batch 1,
    sequence length 128). ONNX's own inference loses dims through shape
    arithmetic (e.g. the CIFAR ResNets' zero-padding shortcut); where it leaves a
    Conv/Gemm/MatMul shape unknown, onnxruntime's symbolic inference is tried.
    """
    concrete = _with_input_shapes(model, input_shapes or concrete_input_shapes(model))
    shapes = None
    for infer in (_onnx_inference, _symbolic_inference):
        try:
            shapes = _tensor_shapes(infer(concrete))
        except Exception:  # either engine can fail on unusual graphs; the other may not
            continue
        if all(_known(out, contraction) for _, out, contraction in _contraction_shapes(model, shapes)):
            break
    if shapes is None:
        raise OnnxlrfError("shape inference fails on this model")
    return shapes


def count_flops(model: onnx.ModelProto, input_shapes: dict[str, list[int]] | None = None) -> int:
    """FLOPs (2 x multiply-accumulates) of all Conv, ConvTranspose, Gemm and MatMul nodes for one run.

    Shapes come from ONNX shape inference on a copy with concrete input shapes:
    ``input_shapes`` where given, else :func:`concrete_input_shapes` (batch 1,
    sequence length 128). Other ops (elementwise, pooling, softmax) are not counted.
    """
    nodes = _contraction_shapes(model, infer_shapes(model, input_shapes))
    macs = 0
    for node, out, contraction in nodes:
        if not _known(out, contraction):
            raise OnnxlrfError(
                f"cannot count FLOPs of {node.op_type} node {node.name!r}: shape inference left its shapes unknown"
            )
        macs += int(np.prod(out, dtype=np.int64)) * int(np.prod(contraction, dtype=np.int64))
    return 2 * macs


def flops_by_node(model: onnx.ModelProto, input_shapes: dict[str, list[int]] | None = None) -> dict[str, int | None]:
    """FLOPs of each Conv/ConvTranspose/Gemm/MatMul node by node name, as :func:`count_flops` counts them
    (None: shapes unknown)."""
    return {
        node.name: 2 * int(np.prod(out, dtype=np.int64)) * int(np.prod(contraction, dtype=np.int64))
        if _known(out, contraction) else None
        for node, out, contraction in _contraction_shapes(model, infer_shapes(model, input_shapes))
    }


def file_size(model: ModelLike) -> int:
    """Bytes on disk: the ONNX file plus its external data files; a ModelProto's serialized size."""
    if isinstance(model, onnx.ModelProto):
        return model.ByteSize()
    path = Path(model)
    proto = onnx.load(str(path), load_external_data=False)
    locations = {
        entry.value
        for tensor in onnx.external_data_helper._get_all_tensors(proto)
        if tensor.data_location == onnx.TensorProto.EXTERNAL
        for entry in tensor.external_data
        if entry.key == "location"
    }
    data_files = [path.parent / location for location in locations]
    return path.stat().st_size + sum(f.stat().st_size for f in data_files if f.is_file())


def as_model_proto(model: ModelLike) -> onnx.ModelProto:
    return model if isinstance(model, onnx.ModelProto) else load_onnx(model)
