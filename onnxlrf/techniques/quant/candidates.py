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
from ...graph.layers import Layer, find_layers, matrices_to_weight, weight_array, weight_groups, weight_matrices
from ...graph.quantizable import find_quantizable
from ...planning.knapsack import CandidateSet
from ...planning.plan import QuantEntry
from ..base import Candidates
from .grid import dequantize_per_channel, quantize_per_channel
from .planners import INT4_BITS
from .rounding import loss_aware_levels

# The weight-only options the planner offers each layer, besides float.
PLANNED_BITS = (8, 6, 5, 4, 3, 2)
CONTAINER_BITS = {"int8": 8, "int4": 4}
# Whose channel matrices' rows are output channels (a ConvTranspose's are input channels): loss-aware
# rounding works per row with one scale each.
LOSS_AWARE_OPS = ("Conv", "Gemm", "MatMul")


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


def loss_aware_error(weight: np.ndarray, layer: Layer, bits: int, ls: Any, kappa: float
                     ) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray]]:
    """``Q(W) - W`` as channel matrices for the loss-aware rounding (:mod:`.rounding`) and its grid (levels in the
    weight's layout, scales per output channel)."""
    matrices = weight_matrices(weight, layer, "channel")
    gradient = ls.replication * ls.gradient if ls.replication else None
    curvature = kappa * ls.curvature_scale * np.diagonal(ls.output_factor, axis1=-2, axis2=-1)
    levels, scales = loss_aware_levels(matrices, ls.input_moment, bits, gradient, curvature)
    delta = levels.astype(np.float64) * scales[..., None].astype(np.float64) - matrices.astype(np.float64)
    return delta, (matrices_to_weight(levels, layer, "channel"), scales.reshape(-1))


def activation_noise_dloss(ls: Any, weight: np.ndarray, step: float, kappa: float) -> float:
    """Predicted loss change of rounding the layer's input to a grid of ``step`` (METHOD.md 8): noise of variance
    ``step^2 / 12`` per element, uncorrelated, acts as the weight perturbation ``W e``:
    ``kappa`` times the fitted curvature scale times ``step^2 / 12 * tr(B W W^T) / 2`` (``weight``: the
    layer's (quantized) channel matrices)."""
    trace = float(np.einsum("gmk,gmn,gkn->", ls.output_factor, weight, weight))
    return kappa * ls.curvature_scale * 0.5 * step**2 / 12.0 * trace


def quant_candidates(model: onnx.ModelProto, analysis: Any, kappa: float, cost: Any,
                     rounding: str = "loss-aware", cache: dict | None = None,
                     input_steps: dict[str, float] | None = None, int8_weight_bits: int = 8) -> list[Candidates]:
    """Per weight group of layers the analysis covers and that take quantized weights: float, then each of
    :data:`PLANNED_BITS` within the trusted range, with predicted loss change and cost saved (``cost``: a
    ``bytes`` or ``bits`` cost). ``rounding`` ``loss-aware``: each option is rounded to nearest and loss-aware
    (METHOD.md 9), and the one of smaller predicted loss change is offered; ``nearest``: round to nearest only.
    ``cache``: loss-aware grids by (weight, bits, kappa), reused across calls on the same analysis.
    ``input_steps``: with int8 activations, every option also quantizes the layer's input (grid step by input
    tensor, from the calibrated ranges), its noise added to the prediction, and the weights stay in int8
    containers (the integer kernels read int8); 8-bit weights become ``int8_weight_bits``."""
    quantizable = {layer.node: layer for layer in find_quantizable(model)[0]}
    layers = [layer for layer in find_layers(model)[0] if layer.node in analysis.layers and layer.node in quantizable]
    groups, shared_reason = weight_groups(model, layers)
    cache = {} if cache is None else cache
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
            step = None if input_steps is None else input_steps[quantizable[layer.node].input]
            for bits in PLANNED_BITS:
                if step is not None and bits == 8:
                    bits = int8_weight_bits
                variants = [(quantization_error(weight, layer, bits), None)]
                if rounding == "loss-aware" and layer.op_type in LOSS_AWARE_OPS:
                    # The shifted target moves with kappa only through first-order terms.
                    key = (layer.weight, bits, kappa if ls.replication else None)
                    if key not in cache:
                        cache[key] = loss_aware_error(weight, layer, bits, ls, kappa)
                    variants.append(cache[key])
                offered = []
                for delta, grid in variants:
                    relative = float(np.linalg.norm(delta)) / norm
                    if relative <= ls.perturbation_range:
                        predicted = ls.perturbation_dloss(delta, kappa)
                        if step is not None:
                            quantized = weight_matrices(weight, layer, "channel").astype(np.float64) + delta
                            predicted += activation_noise_dloss(ls, quantized, step, kappa)
                        offered.append((predicted, relative, grid))
                if not offered:
                    continue
                predicted, relative, grid = min(offered, key=lambda option: option[0])
                scales = weight.shape[channel_axis(layer)]
                holder = "int8" if step is not None else container(bits)
                removed.append(cost_units(cost, dense - cost.quantized(members, bits, CONTAINER_BITS[holder], scales)))
                dloss.append(predicted)
                sources.append((bits, predicted, relative, grid, step is not None))
        out.append(Candidates(members, CandidateSet(np.array(removed, dtype=np.int64), np.array(dloss),
                                                    key=layer.weight), sources, reason))
    return out


def quant_entries(group: Candidates, option: int) -> tuple[list[QuantEntry], dict]:
    """The plan entries of ``group`` at ``option`` (0: float), and the grid they store (loss-aware rounding)."""
    source = group.sources[option]
    if source is None:
        return [float_entry(layer, group.reason) for layer in group.layers], {}
    bits, predicted, relative, grid, int8_inputs = source
    entries = [QuantEntry(node=layer.node, op_type=layer.op_type, weight=layer.weight,
                          weight_shape=list(layer.weight_shape), bits=bits, granularity="per_channel",
                          block_size=None, container="int8" if int8_inputs else container(bits),
                          activations="int8" if int8_inputs else "float",
                          weight_scales="absmax" if grid is None else "searched",
                          rounding="nearest" if grid is None else "loss-aware",
                          params_dense=layer.params, params_planned=layer.params,
                          notes={"predicted_dloss": predicted, "relative_error": relative})
               for layer in group.layers]
    return entries, {} if grid is None else {group.layers[0].weight: grid}


def float_entry(layer: Layer, reason: str | None = None) -> QuantEntry:
    """The entry of a layer that stays float."""
    return QuantEntry(node=layer.node, op_type=layer.op_type, weight=layer.weight,
                      weight_shape=list(layer.weight_shape), bits=None, granularity=None, block_size=None,
                      container=None, activations="float", weight_scales=None, rounding=None,
                      params_dense=layer.params, params_planned=layer.params,
                      notes={"reason": reason} if reason else {})
