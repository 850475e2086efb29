"""Loss-aware quantization candidates (METHOD.md sections 8 and 10): per weight group, weight-only options
of fewer bits, each with its predicted loss change and the bytes it saves, for the joint planner's knapsack.

A quantization is a weight perturbation ``Q(W) - W``; its predicted loss change comes from the joint
analysis' mean gradient and Kronecker factors
(:meth:`~onnxlrf.measure.sensitivity.LayerSensitivity.perturbation_dloss`). An option whose weight error
(relative, Frobenius) lies beyond the layer's measured trusted range is not offered, as for truncations.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx

from ...costs.params import cost_units
from ...graph.layers import Layer, find_layers, weight_array, weight_groups, weight_matrices
from ...graph.quantizable import find_quantizable
from ...planning.knapsack import CandidateSet
from ...planning.plan import QuantEntry
from ..base import Candidates
from .grid import dequantize_per_channel, quantize_per_channel
from .planners import INT4_BITS

# The weight-only options the planner offers each layer, besides float.
PLANNED_BITS = (8, 6, 5, 4, 3, 2)
CONTAINER_BITS = {"int8": 8, "int4": 4}


def channel_axis(layer: Layer) -> int:
    """The stored weight's axis of output channels (Conv 0; Gemm/MatMul 1 when stored (inputs, outputs))."""
    return 1 if layer.transposed else 0


def container(bits: int) -> str:
    return "int4" if bits <= INT4_BITS else "int8"


def quantization_error(weight: np.ndarray, layer: Layer, bits: int) -> np.ndarray:
    """``Q(W) - W`` as (g, m, n) channel matrices, per output channel, symmetric, round to nearest."""
    axis = channel_axis(layer)
    levels, scales = quantize_per_channel(weight, axis, bits)
    delta = dequantize_per_channel(levels, scales, axis).astype(np.float64) - weight.astype(np.float64)
    return weight_matrices(delta, layer, "channel")


def quant_candidates(model: onnx.ModelProto, analysis: Any, kappa: float, cost: Any) -> list[Candidates]:
    """Per weight group of layers the analysis covers and that take quantized weights: float, then each of
    :data:`PLANNED_BITS` within the trusted range, with predicted loss change and bytes saved (``cost``: a
    ``bytes`` cost)."""
    quantizable = {layer.node for layer in find_quantizable(model)[0]}
    layers = [layer for layer in find_layers(model)[0] if layer.node in analysis.layers and layer.node in quantizable]
    groups, shared_reason = weight_groups(model, layers)
    out = []
    for members in groups:
        layer = members[0]
        reason = shared_reason.get(layer.weight)
        ls = analysis.get(layer.node)
        dense = cost.dense(members)
        removed, dloss, sources = [0], [0.0], [None]
        if reason is None:
            weight = weight_array(model, layer)
            norm = max(float(np.linalg.norm(weight)), 1e-30)
            for bits in PLANNED_BITS:
                delta = quantization_error(weight, layer, bits)
                relative = float(np.linalg.norm(delta)) / norm
                if relative > ls.perturbation_range:
                    continue
                predicted = ls.perturbation_dloss(delta, kappa)
                scales = weight.shape[channel_axis(layer)]
                removed.append(cost_units(cost, dense - cost.quantized(members, CONTAINER_BITS[container(bits)],
                                                                       scales)))
                dloss.append(predicted)
                sources.append((bits, predicted, relative))
        out.append(Candidates(members, CandidateSet(np.array(removed, dtype=np.int64), np.array(dloss),
                                                    key=layer.weight), sources, reason))
    return out


def quant_entries(group: Candidates, option: int) -> list[QuantEntry]:
    """The plan entries of ``group`` at ``option`` (0: float)."""
    source = group.sources[option]
    if source is None:
        return [float_entry(layer, group.reason) for layer in group.layers]
    bits, predicted, relative = source
    return [QuantEntry(node=layer.node, op_type=layer.op_type, weight=layer.weight,
                       weight_shape=list(layer.weight_shape), bits=bits, granularity="per_channel", block_size=None,
                       container=container(bits), activations="float", weight_scales="absmax", rounding="nearest",
                       params_dense=layer.params, params_planned=layer.params,
                       notes={"predicted_dloss": predicted, "relative_error": relative})
            for layer in group.layers]


def float_entry(layer: Layer, reason: str | None = None) -> QuantEntry:
    """The entry of a layer that stays float."""
    return QuantEntry(node=layer.node, op_type=layer.op_type, weight=layer.weight,
                      weight_shape=list(layer.weight_shape), bits=None, granularity=None, block_size=None,
                      container=None, activations="float", weight_scales=None, rounding=None,
                      params_dense=layer.params, params_planned=layer.params,
                      notes={"reason": reason} if reason else {})
