"""Smoothing of W8A8 Gemm/MatMul inputs (SmoothQuant, Xiao et al. 2023), its strength searched per input tensor.

A transformer's projections read activations a few of whose channels are many times wider than the rest
(MiniLM: the feed-forward input's widest channel up to 16 times its median one). One per-tensor uint8 grid
spans them all, so the other channels get few levels. Dividing channel ``j`` of the input by ``s_j`` and
multiplying row ``j`` of the weight (its input channel) by ``s_j`` computes the same product; with

    s_j = max|x_j|^alpha / max|w_j|^(1 - alpha)

(``max|w_j|`` over every layer that reads the tensor) the activation narrows and the weight, quantized per
output channel, widens. ``alpha`` is searched per input tensor (:func:`~.calibration.search_smoothing`) among
:data:`ALPHAS` and no smoothing, by the squared error of its readers' outputs quantized as the rewrite quantizes them (the calibrated range the minmax
calibrator measures, the runtime's activation grid, each layer's weight bits per channel) against the float
outputs, on rows of the calibration split. The plan records each smoothed tensor's ``alpha`` and the per-channel
``max|x_j|`` it was searched on (``Plan.smoothing``); :func:`apply_smoothing` computes ``s`` from them and the
model's weights, so an edited ``alpha`` is applied as written.

The rewritten model reads ``Mul(x, 1/s)`` (one per smoothed tensor, shared by its readers; the quantizer reads
it; other readers keep ``x``) and stores ``s * W``: the float function is unchanged up to rounding.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ...errors import OnnxlrfError
from ...graph.layers import constant_producers
from ...graph.quantizable import QuantLayer, find_quantizable
from ...onnx_io import copy_model, keep_model_fields, unique_name
from ...planning.plan import Plan, QuantEntry

__all__ = ["ALPHAS", "SMOOTHINGS", "W8A8_WEIGHT_BITS", "apply_smoothing", "check_smoothing", "smoothing_groups",
           "smoothing_scales", "weight_rows"]

# auto: the inputs of W8A8 layers (weights of at least W8A8_WEIGHT_BITS: 8, or 7 where the range is reduced); on:
# those of every layer with int8 activations; off: none. Below 7 bits the weights carry the error smoothing moves
# onto them: on MiniLM W4A8 it brought the embeddings closer to float and lowered Spearman on every split seed.
SMOOTHINGS = ("auto", "on", "off")
W8A8_WEIGHT_BITS = 7
ALPHAS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
SMOOTHED_OPS = ("Gemm", "MatMul")


def smoothing_groups(model: onnx.ModelProto, plan: Plan) -> dict[str, list[QuantLayer]]:
    """The tensors smoothing can apply to, each with the layers that read it: W8A8 Gemm/MatMul entries with
    per-channel scales, reading the tensor on their last axis (a Gemm without transA), each the only reader
    of its 2-D weight."""
    layers = {layer.node: layer for layer in find_quantizable(model)[0]}
    weight_readers: dict[str, int] = {}
    for node in model.graph.node:
        for name in node.input:
            weight_readers[name] = weight_readers.get(name, 0) + 1
    transposed = {node.name for node in model.graph.node if node.op_type == "Gemm"
                  and any(a.name == "transA" and a.i for a in node.attribute)}
    groups: dict[str, list[QuantLayer]] = {}
    for entry in plan.layers:
        layer = layers.get(entry.node)
        if not (isinstance(entry, QuantEntry) and entry.changed and entry.activations == "int8"
                and entry.granularity == "per_channel" and layer is not None and layer.op_type in SMOOTHED_OPS
                and layer.node not in transposed and len(layer.weight_shape) == 2
                and weight_readers.get(layer.weight) == 1):
            continue
        groups.setdefault(layer.input, []).append(layer)
    return groups


def weight_rows(model: onnx.ModelProto, layer: QuantLayer) -> np.ndarray:
    """``layer``'s weight as (input channels, output channels)."""
    weight = onnx.numpy_helper.to_array(constant_producers(model)[layer.weight]).astype(np.float32)
    return weight if layer.reduction_axis == 0 else weight.T


def smoothing_scales(absmax: np.ndarray, rows: list[np.ndarray], alpha: float) -> np.ndarray:
    """``s_j = max|x_j|^alpha / max|w_j|^(1 - alpha)``, 1 where either is 0."""
    weight_max = np.max([np.abs(w).max(axis=1) for w in rows], axis=0).astype(np.float64)
    absmax = np.asarray(absmax, dtype=np.float64)
    live = (absmax > 0) & (weight_max > 0)
    scales = np.ones_like(absmax)
    scales[live] = absmax[live] ** alpha / weight_max[live] ** (1.0 - alpha)
    return scales.astype(np.float32)


def check_smoothing(model: onnx.ModelProto, plan: Plan) -> dict[str, list[QuantLayer]]:
    """:func:`smoothing_groups`; raise OnnxlrfError unless every smoothed tensor of ``plan`` is one of them, with a
    ``channel_absmax`` per input channel."""
    groups = smoothing_groups(model, plan) if plan.smoothing else {}
    for tensor, smoothing in plan.smoothing.items():
        if tensor not in groups:
            raise OnnxlrfError(f"plan smooths tensor {tensor!r}, which no W8A8 Gemm/MatMul entry with per-channel "
                               f"scales (the only reader of its weight) reads")
        channels = weight_rows(model, groups[tensor][0]).shape[0]
        if len(smoothing["channel_absmax"]) != channels:
            raise OnnxlrfError(f"plan smoothing of {tensor!r} has {len(smoothing['channel_absmax'])} channel_absmax "
                               f"values; its readers have {channels} input channels")
    return groups


def apply_smoothing(model: onnx.ModelProto, plan: Plan) -> onnx.ModelProto:
    """``model`` itself where ``plan`` smooths nothing; else a copy whose readers of each smoothed tensor ``x``
    read ``Mul(x, 1/s)`` and store ``s * W`` (names: ``<x>/smoothed``, ``<x>/Smooth``; see the module doc)."""
    if not plan.smoothing:
        return model
    groups = check_smoothing(model, plan)
    work = copy_model(model)
    graph = gs.import_onnx(work)
    nodes = {node.name: node for node in graph.nodes}
    tensors = graph.tensors()
    taken = set(tensors) | set(nodes)
    for tensor in sorted(plan.smoothing):
        layers = groups[tensor]
        rows = [weight_rows(work, layer) for layer in layers]
        smoothing = plan.smoothing[tensor]
        scales = smoothing_scales(np.asarray(smoothing["channel_absmax"]), rows, smoothing["alpha"])
        for layer, weight in zip(layers, rows):
            scaled = weight * scales[:, None]
            tensors[layer.weight].values = np.ascontiguousarray(scaled if layer.reduction_axis == 0 else scaled.T)
        smoothed = gs.Variable(unique_name(f"{tensor}/smoothed", taken), dtype=np.float32)
        inverse = gs.Constant(unique_name(f"{tensor}/smoothing_inverse", taken), (1.0 / scales).astype(np.float32))
        graph.nodes.append(gs.Node("Mul", unique_name(f"{tensor}/Smooth", taken), inputs=[tensors[tensor], inverse],
                                   outputs=[smoothed]))
        for layer in layers:
            nodes[layer.node].inputs[0] = smoothed
    graph.toposort()
    result = gs.export_onnx(graph, do_type_check=False)
    keep_model_fields(work, result)
    return result
