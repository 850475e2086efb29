"""Sequential rounding: a quantization plan's layers rounded again, in graph order, on the inputs the
quantized model gives them.

The loss-aware rounding (:mod:`.rounding`) rounds each layer toward its float weight ``W`` in the metric of
its input's second moment in the original model, as if it were the only layer quantized. In the quantized
model a layer's input ``x'`` has moved from the original ``x`` by what the layers before it lost, and the
errors compound. Going through the plan's layers in graph order (as GPTQ quantizes a network, Frantar et
al. 2022), each is rounded again at its planned bits to minimize

    E || W x - Q x' ||^2  =  (Q - T) H (Q - T)^T + const,   H = E[x' x'^T],  T = W E[x x'^T] H^-1

that is toward the weight ``T`` that best reproduces the float layer's output from the quantized model's
input (the asymmetric target of GPTAQ and Qronos, 2025), in ``H``'s metric: the same error-feedback rounding
and clipping search (:func:`~.rounding.loss_aware_levels`; block scales block by block), with second moments
(no bias change), before the next layer's inputs are taken. A layer whose input is int8 reads ``x'`` rounded to its grid, as the
rewritten model does; other activations the rewrite quantizes (residual Adds, a Conv's output read by the
next) stay float here. Bits, containers and activations stay as planned: the
plan's sizes do not change. No gradient step is taken: this is not fine-tuning.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from typing import Any, Callable

import numpy as np
import onnx
import torch

from ...graph.layers import find_layers, matrices_to_weight, weight_array, weight_matrices
from ...graph.quantizable import find_quantizable
from ...measure.coverage import analysis_exclusion
from ...measure.sequential import PairedInputs
from ...measure.torch_graph import heap_reuse
from ...planning.plan import Plan
from ...progress import ProgressLike, as_progress
from .candidates import LOSS_AWARE_OPS
from .grid import UINT8_LEVELS, dequantize_blocks, dequantize_per_channel, int8_scale, uint8_params
from .rewrite import planned_weights
from .rounding import DAMPING, loss_aware_block_levels, loss_aware_levels
from .smoothing import apply_smoothing

__all__ = ["sequential_rounding"]

# Rows per input feature a layer's moments are estimated from (as the low-rank refit's).
ROWS_PER_FEATURE = 256


def sequential_target(weight: np.ndarray, second: np.ndarray, cross: np.ndarray) -> np.ndarray:
    """``T = W K H^-1`` of ``(g, m, n)`` weights, ``H = E[x' x'^T]``, ``K = E[x x'^T]``, with ``H`` damped as the
    rounding damps it and the damping's pull toward ``W``: unchanged inputs (``K = H``) give ``W`` exactly."""
    out = np.empty(weight.shape, dtype=np.float64)
    for j in range(weight.shape[0]):
        h = second[j]
        damped = h + DAMPING * max(float(np.diag(h).mean()), 1e-12) * np.eye(h.shape[0])
        w = weight[j].astype(np.float64)
        out[j] = w + np.linalg.solve(damped, (w @ (cross[j] - h)).T).T
    return out


def input_rounding(bounds: list[float], runtime: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """What QuantizeLinear then DequantizeLinear do to an activation calibrated to ``bounds`` in ``runtime``'s
    form (onnxruntime: asymmetric uint8; tensorrt: symmetric int8), rounding half to even as they do."""
    if runtime == "onnxruntime":
        scale, zero_point = (float(v) for v in uint8_params(*bounds))
        low, high = 0.0, float(UINT8_LEVELS)
    else:
        scale, zero_point, low, high = float(int8_scale(*bounds)), 0.0, -128.0, 127.0

    def rounded(x: torch.Tensor) -> torch.Tensor:
        return (torch.clamp(torch.round(x / scale) + zero_point, low, high) - zero_point) * scale
    return rounded


@heap_reuse()
def sequential_rounding(model: onnx.ModelProto, plan: Plan, dataset: Any, runtime: str = "onnxruntime",
                        batch_size: int = 100, rows_per_feature: int | None = ROWS_PER_FEATURE,
                        progress: ProgressLike = None) -> Plan | None:
    """``plan`` with its per-channel Conv/Gemm/MatMul layers rounded again in graph order on ``dataset`` (the
    calibration split), ``rounding: "sequential"`` and their levels and scales stored in ``plan.bases``; None
    if no layer qualifies. A layer with int8 inputs reads them rounded to the plan's calibrated grid
    (``plan.activation_ranges`` in ``runtime``'s form), in its moments and in what it passes on.

    A layer with block scales is rounded block by block (:func:`~.rounding.loss_aware_block_levels`). Layers whose
    weight another node shares, or outside the analysis, keep their planned grid (and the layers after them see
    it). Smoothed inputs (``plan.smoothing``) are applied first: the stored grids are of the smoothed weights.
    """
    progress = as_progress(progress)
    model = apply_smoothing(model, plan)
    quantizable = {layer.node: layer for layer in find_quantizable(model)[0]}
    layers = {layer.node: layer for layer in find_layers(model)[0] if layer.node in quantizable}
    users = Counter(entry.weight for entry in plan.layers if entry.changed)
    changed = [entry for entry in plan.layers if entry.changed]
    qualifies = {entry.node for entry in changed
                 if entry.op_type in LOSS_AWARE_OPS and entry.node in layers
                 and users[entry.weight] == 1 and analysis_exclusion(layers[entry.node]) is None}
    if not qualifies:
        return None
    planned = planned_weights(model, plan)
    as_planned = {entry.weight: planned[entry.weight] for entry in changed if entry.node not in qualifies}
    int8_inputs = {entry.node: input_rounding(plan.activation_ranges[quantizable[entry.node].input], runtime)
                   for entry in changed if entry.activations == "int8"}
    paired = PairedInputs(model, dataset, batch_size, as_planned, inputs=int8_inputs)
    entries, bases = {}, dict(plan.bases)
    by_node = {entry.node: entry for entry in changed}
    for node in progress.track(paired.order(sorted(qualifies)), "sequential rounding", unit="layer"):
        entry, layer = by_node[node], layers[node]
        moments = paired.moments(layer, rows_per_feature)
        weight = weight_matrices(weight_array(model, layer), layer, "channel")
        target = sequential_target(weight, moments.second_changed, moments.cross)
        if entry.granularity == "block":  # a Gemm/MatMul: one matrix, rows its output channels
            levels, scales = loss_aware_block_levels(target[0], moments.second_changed[0], entry.bits,
                                                     entry.block_size)
            levels, scales = (matrices_to_weight(part[None], layer, "channel") for part in (levels, scales))
            dequantized = dequantize_blocks(levels, scales, quantizable[node].reduction_axis, entry.block_size)
        else:
            levels, scales = loss_aware_levels(target, moments.second_changed, entry.bits)
            levels, scales = matrices_to_weight(levels, layer, "channel"), scales.reshape(-1)
            dequantized = dequantize_per_channel(levels, scales, quantizable[node].channel_axis)
        paired.replace(layer, dequantized)
        bases[entry.weight] = (levels, scales)
        entries[node] = dataclasses.replace(entry, rounding="sequential", weight_scales="searched")
    options = {**plan.options, "sequential_rounding": {"samples": len(dataset), "nodes": len(entries)}}
    progress.log(f"sequential rounding: {len(entries)} layers rounded again on {len(dataset)} calibration samples"
                 + (f"; {len(as_planned)} kept as planned" if as_planned else ""))
    return dataclasses.replace(plan, layers=[entries.get(entry.node, entry) for entry in plan.layers],
                               options=options, bases=bases)
