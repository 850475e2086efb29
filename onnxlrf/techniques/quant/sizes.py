"""What a quantized model weighs: logical weight bits (what the accuracy reflects) and bytes on disk.

Sub-8-bit values live in a standard container (int8, or int4 packed two per byte), so the two differ: a
3-bit layer costs 8 bits a weight on disk. Both are reported, never one for the other.
"""

from __future__ import annotations

import os
from pathlib import Path

import onnx

from ...graph.quantizable import QUANTIZABLE_OPS
from ...graph.layers import constant_producers
from ...planning.plan import Plan, QuantEntry


def layer_weights(model: onnx.ModelProto) -> dict[str, tuple[int, int]]:
    """Every constant Conv/Gemm/MatMul weight of the main graph: name -> (elements, bits per element as stored)."""
    constants = constant_producers(model)
    out = {}
    for node in model.graph.node:
        if node.op_type in QUANTIZABLE_OPS and len(node.input) > 1 and node.input[1] in constants:
            tensor = constants[node.input[1]]
            elements = 1
            for dim in tensor.dims:
                elements *= dim
            itemsize = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
            out[node.input[1]] = (elements, 8 * itemsize)
    return out


def average_weight_bits(reference: onnx.ModelProto, plan: Plan) -> float:
    """Logical bits per weight of all Conv/Gemm/MatMul weights of ``reference`` under ``plan``: a quantized
    weight counts its planned bits, any other its stored type's (float32: 32). A shared weight counts once."""
    planned = {entry.weight: entry.bits for entry in plan.layers if isinstance(entry, QuantEntry) and entry.changed}
    weights = layer_weights(reference)
    total = sum(elements for elements, _ in weights.values())
    bits = sum(elements * planned.get(name, stored) for name, (elements, stored) in weights.items())
    return bits / total if total else 0.0


def file_bytes(path: str | os.PathLike) -> int:
    """Bytes of an ONNX file on disk, with the external data files its tensors point to."""
    path = Path(path)
    model = onnx.load(str(path), load_external_data=False)
    extra = {entry.value for tensor in model.graph.initializer for entry in tensor.external_data
             if entry.key == "location"}
    return path.stat().st_size + sum((path.parent / name).stat().st_size for name in extra)
