"""Loss-aware quantization candidates (METHOD.md sections 8 and 10): per weight group, weight-only options
of fewer bits, each with its predicted loss change and the bytes it saves, for the joint planner's knapsack.

A quantization is a weight perturbation ``Q(W) - W``; its predicted loss change comes from the joint
analysis' mean gradient and Kronecker factors
(:meth:`~onnxlrf.measure.sensitivity.LayerSensitivity.perturbation_dloss`). Each option is also measured
with only its layer quantized (:func:`measure_options`); options are offered from the most bits down while
prediction and measurement agree, as truncations are within their measured range (METHOD.md 3 and 8).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx

from ...costs.params import cost_units
from ...errors import OnnxlrfError
from ...graph.layers import Layer, find_layers, matrices_to_weight, weight_array, weight_groups, weight_matrices
from ...graph.quantizable import BLOCK_OPS, QuantLayer, find_quantizable
from ...measure.analysis import calibration_batches, range_batch_size
from ...measure.sensitivity import agrees, replacement_gains, task_loss
from ...planning.knapsack import CandidateSet
from ...planning.plan import QuantEntry, weight_scale_count
from ...progress import ProgressLike
from ..base import Candidates
from .grid import dequantize_blocks, dequantize_per_channel, quantize_blocks, quantize_per_channel
from .planners import INT4_BITS, PREDICTORS, weight_container
from .rounding import loss_aware_block_levels, loss_aware_levels

# The weight-only options the planner offers each layer, besides float.
PLANNED_BITS = (8, 6, 5, 4, 3, 2)
CONTAINER_BITS = {"int8": 8, "int4": 4}
# Whose channel matrices' rows are output channels (a ConvTranspose's are input channels): loss-aware
# rounding works per row with one scale each.
LOSS_AWARE_OPS = ("Conv", "Gemm", "MatMul")


def channel_axis(layer: Layer) -> int:
    """The stored weight's axis of output channels (Conv 0; Gemm/MatMul 1 when stored (inputs, outputs))."""
    return 1 if layer.transposed else 0


def quantization_error(weight: np.ndarray, layer: Layer, bits: int) -> np.ndarray:
    """``Q(W) - W`` as (g, m, n) channel matrices, per output channel, symmetric, round to nearest."""
    axis = channel_axis(layer)
    levels, scales = quantize_per_channel(weight, axis, bits)
    delta = dequantize_per_channel(levels, scales, axis).astype(np.float64) - weight.astype(np.float64)
    return weight_matrices(delta, layer, "channel")


def block_quantization_error(weight: np.ndarray, layer: Layer, quantizable: QuantLayer, bits: int,
                             block_size: int) -> np.ndarray:
    """``Q(W) - W`` as channel matrices, one scale per ``block_size`` inputs of each output channel (Gemm/MatMul),
    symmetric, round to nearest."""
    levels, scales = quantize_blocks(weight, quantizable.reduction_axis, block_size, bits)
    dequantized = dequantize_blocks(levels, scales, quantizable.reduction_axis, block_size)
    return weight_matrices(dequantized.astype(np.float64) - weight.astype(np.float64), layer, "channel")


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


def loss_aware_block_error(weight: np.ndarray, layer: Layer, quantizable: QuantLayer, bits: int, block_size: int,
                           ls: Any, kappa: float) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray]]:
    """``Q(W) - W`` as channel matrices for the loss-aware rounding with block scales
    (:func:`~.rounding.loss_aware_block_levels`; a Gemm/MatMul, one matrix) and its grid in the stored layout
    (DequantizeLinear's: the summed axis in blocks)."""
    matrix = weight_matrices(weight, layer, "channel")[0]
    gradient = ls.replication * ls.gradient[0] if ls.replication else None
    curvature = kappa * ls.curvature_scale * np.diagonal(ls.output_factor[0])
    levels, scales = loss_aware_block_levels(matrix, ls.input_moment[0], bits, block_size, gradient, curvature)
    grid = tuple(matrices_to_weight(part[None], layer, "channel") for part in (levels, scales))
    delta = dequantize_blocks(*grid, quantizable.reduction_axis, block_size).astype(np.float64) - weight
    return weight_matrices(delta, layer, "channel"), grid


def hessian_trace_dloss(ls: Any, delta: np.ndarray, kappa: float) -> float:
    """HAWQ-v2's predicted loss change of ``delta`` ((g, m, n) channel matrices): ``kappa`` times the fitted curvature
    scale times the mean Hessian diagonal ``sum_g tr(B_g) tr(A_g) / (g m n)`` times ``||delta||^2 / 2``."""
    trace = float(np.sum(np.einsum("gmm->g", ls.output_factor) * np.einsum("gnn->g", ls.input_moment)))
    return kappa * ls.curvature_scale * 0.5 * trace / delta.size * float(np.sum(delta * delta))


def activation_noise_dloss(ls: Any, weight: np.ndarray, step: float, kappa: float) -> float:
    """Predicted loss change of rounding the layer's input to a grid of ``step`` (METHOD.md 8): noise of variance
    ``step^2 / 12`` per element, uncorrelated, acts as the weight perturbation ``W e``:
    ``kappa`` times the fitted curvature scale times ``step^2 / 12 * tr(B W W^T) / 2`` (``weight``: the
    layer's (quantized) channel matrices)."""
    trace = float(np.sum((ls.output_factor @ weight) * weight))  # sum_g tr(B_g W_g W_g^T), as BLAS products
    return kappa * ls.curvature_scale * 0.5 * step**2 / 12.0 * trace


@dataclass(frozen=True)
class QuantOption:
    """One weight-only (or, with ``int8_inputs``, also input-quantizing) option of a weight group."""

    bits: int
    predicted: float  # loss change, weights as rounded (plus the input's rounding noise)
    relative: float  # ||Q(W) - W|| / ||W||
    grid: tuple | None  # (levels, scales) where rounded loss-aware; None: round to nearest
    int8_inputs: bool
    block_size: int | None = None  # one scale per this many inputs (Gemm/MatMul); None: per output channel

    @property
    def key(self) -> tuple[int, int | None]:
        return self.bits, self.block_size


def layer_options(model: onnx.ModelProto, analysis: Any, kappa: float, rounding: str = "loss-aware",
                  cache: dict | None = None, input_steps: dict[str, float] | None = None,
                  int8_weight_bits: int = 8, block_size: int | None = None, predictor: str = "kfac",
                  bits_offered: tuple[int, ...] = PLANNED_BITS
                  ) -> list[tuple[list[Layer], str | None, list[QuantOption]]]:
    """Per weight group of layers the analysis covers and that take quantized weights: its layers, why it has no
    options (or None), and each of ``bits_offered`` (some of :data:`PLANNED_BITS`) as a :class:`QuantOption`.
    ``rounding`` ``loss-aware``:
    each option is rounded to nearest and loss-aware (METHOD.md 9) and keeps the one of smaller predicted loss
    change; ``nearest``: round to nearest only. ``cache``: loss-aware grids by (weight, bits, kappa), and the
    predictions' kappa-free terms, reused across calls on the same analysis (and the same ``input_steps``).
    ``input_steps``: with int8 activations, every option also quantizes the layer's input (grid step by input
    tensor, from the calibrated ranges), its noise added to the prediction. ``int8_weight_bits``: what the 8-bit
    option has (7 for onnxruntime's W8A8 form).
    ``block_size``: Gemm/MatMul weights are also offered weight-only options of ``bits_offered`` up to
    int4 with one scale per ``block_size`` inputs (rounded as the per-channel ones: to nearest, and loss-aware
    block by block where ``rounding`` says so), beside the per-channel ones.
    ``predictor``: :data:`~.planners.PREDICTORS`, each option's predicted loss change (``kfac``:
    :meth:`perturbation_dloss`; ``hessian-trace``: :func:`hessian_trace_dloss`); the rounding of an option is
    the one of smaller K-FAC prediction either way (the trace cannot tell two roundings' errors apart beyond
    their size, which round to nearest always minimizes)."""
    if predictor not in PREDICTORS:
        raise OnnxlrfError(f"--predictor must be one of {', '.join(PREDICTORS)}, got {predictor!r}")
    quantizable = {layer.node: layer for layer in find_quantizable(model)[0]}
    layers = [layer for layer in find_layers(model)[0] if layer.node in analysis.layers and layer.node in quantizable]
    groups, shared_reason = weight_groups(model, layers)
    cache = {} if cache is None else cache
    out = []
    for members in groups:
        layer = members[0]
        reason = shared_reason.get(layer.weight)
        options: list[QuantOption] = []
        out.append((members, reason, options))
        if reason is not None:
            continue
        ls = analysis.get(layer.node)
        weight = weight_array(model, layer)
        norm = max(float(np.linalg.norm(weight)), 1e-30)
        step = None if input_steps is None else input_steps[quantizable[layer.node].input]
        # The shifted target moves with kappa only through first-order terms; so does the option's
        # rounding, and what depends on it. Predictions are linear in kappa: their terms are kept.
        moving = kappa if ls.replication else None
        for bits in bits_offered:
            if bits == 8:
                bits = int8_weight_bits
            variants = [(quantization_error(weight, layer, bits), None)]
            if rounding == "loss-aware" and layer.op_type in LOSS_AWARE_OPS:
                key = (layer.weight, bits, moving)
                if key not in cache:
                    cache[key] = loss_aware_error(weight, layer, bits, ls, kappa)
                variants.append(cache[key])
            # The rounding is chosen in the K-FAC metric, which sees where an error lies; the option's
            # prediction (what the knapsack allocates bits by) is the predictor's.
            kfac = _kfac_predictions(ls, variants, kappa, cache, (layer.weight, bits), moving)
            chosen = int(np.argmin(kfac))
            delta, grid = variants[chosen]
            predicted = kfac[chosen] if predictor == "kfac" else hessian_trace_dloss(ls, delta, kappa)
            if step is not None:
                key = ("noise", layer.weight, bits, chosen, moving)
                if key not in cache:
                    quantized = weight_matrices(weight, layer, "channel").astype(np.float64) + delta
                    cache[key] = activation_noise_dloss(ls, quantized, step, 1.0)
                predicted += kappa * cache[key]
            options.append(QuantOption(bits, predicted, float(np.linalg.norm(delta)) / norm, grid, step is not None))
        if block_size is not None and step is None and layer.op_type in BLOCK_OPS:
            for bits in (bits for bits in bits_offered if bits <= INT4_BITS):
                variants = [(block_quantization_error(weight, layer, quantizable[layer.node], bits, block_size), None)]
                if rounding == "loss-aware":
                    key = ("block", layer.weight, bits, block_size, moving)
                    if key not in cache:
                        cache[key] = loss_aware_block_error(weight, layer, quantizable[layer.node], bits, block_size,
                                                            ls, kappa)
                    variants.append(cache[key])
                kfac = _kfac_predictions(ls, variants, kappa, cache, (layer.weight, bits, "block", block_size), moving)
                chosen = int(np.argmin(kfac))
                delta, grid = variants[chosen]
                predicted = kfac[chosen] if predictor == "kfac" else hessian_trace_dloss(ls, delta, kappa)
                options.append(QuantOption(bits, predicted,
                                           float(np.linalg.norm(delta)) / norm, grid, False, block_size))
    return out


def _kfac_predictions(ls: Any, variants: list[tuple[np.ndarray, Any]], kappa: float, cache: dict, key: tuple,
                      moving: float | None) -> list[float]:
    """Each of an option's roundings ``(delta, grid)`` predicted at ``kappa``; the kappa-free terms are cached under
    ``key`` and the rounding's index (a loss-aware rounding's also under ``moving``, the kappa its target moves
    with)."""
    predictions = []
    for index, (delta, _) in enumerate(variants):
        terms_key = ("terms", *key, index, moving if index else None)
        if terms_key not in cache:
            cache[terms_key] = ls.perturbation_terms(delta)
        first, quadratic = cache[terms_key]
        predictions.append(first + kappa * quadratic)
    return predictions


def trusted_options(options: list[QuantOption], checks: list[dict] | None, perturbation_range: float
                    ) -> list[QuantOption]:
    """The options a layer's measurements trust (METHOD.md 8, as section 3 for ranks): with ``checks`` (each
    option measured alone, :func:`measure_options`), the options from the most bits down to the last whose
    measured loss change agrees with the prediction (per channel and per block separately); without, those within
    the truncations' trusted range."""
    if checks is None:
        return [option for option in options if option.relative <= perturbation_range]
    agreed = {(check["bits"], check.get("block_size")): check["agree"] for check in checks}
    kept = []
    for block_size in dict.fromkeys(option.block_size for option in options):
        for option in sorted((o for o in options if o.block_size == block_size), key=lambda o: -o.bits):
            if not agreed.get(option.key, False):
                break
            kept.append(option)
    return kept


def option_weight(model: onnx.ModelProto, layer: Layer, option: QuantOption, reduction_axis: int | None = None
                  ) -> np.ndarray:
    """The float32 weight ``option`` stands for, in the stored layout (what DequantizeLinear computes);
    ``reduction_axis``: the axis a block option's blocks run along (Gemm/MatMul)."""
    if option.grid is not None:
        levels, scales = option.grid
    elif option.block_size is not None:
        levels, scales = quantize_blocks(weight_array(model, layer), reduction_axis, option.block_size, option.bits)
    else:
        levels, scales = quantize_per_channel(weight_array(model, layer), channel_axis(layer), option.bits)
    if option.block_size is not None:
        return dequantize_blocks(levels, scales, reduction_axis, option.block_size)
    return dequantize_per_channel(levels, scales, channel_axis(layer))


def measure_options(model: onnx.ModelProto, analysis: Any, calib: Any, samples: int, rounding: str = "loss-aware",
                    cache: dict | None = None, int8_weight_bits: int = 8, block_size: int | None = None,
                    progress: ProgressLike = None, predictor: str = "kfac",
                    bits_offered: tuple[int, ...] = PLANNED_BITS) -> dict[str, list[dict]]:
    """Per weight: each option's weights alone, measured on the first ``samples`` calibration samples (the task
    loss on their labels) against its prediction at kappa 1: ``bits`` (and ``block_size`` for a block option),
    ``relative_error``, ``predicted``, ``measured`` and whether they ``agree``
    (:func:`~onnxlrf.measure.sensitivity.agrees`). Input quantization is not part of the measurement."""
    groups = layer_options(model, analysis, 1.0, rounding, cache, None, int8_weight_bits, block_size, predictor,
                           bits_offered)
    axes = {layer.node: layer.reduction_axis for layer in find_quantizable(model)[0]}
    replacements = {(members[0].weight, *option.key):
                    {members[0].weight: option_weight(model, members[0], option, axes[members[0].node])}
                    for members, reason, options in groups for option in options}
    subset = calib.subset(np.arange(min(samples, len(calib))))
    gains = replacement_gains(model, replacements,
                              calibration_batches(subset, subset.labels, range_batch_size(model, subset), model),
                              task_loss(subset), progress,
                              f"quantization: {len(replacements)} options measured one layer at a time")
    checks = {}
    for members, _, options in groups:
        weight = members[0].weight
        checks[weight] = [{"bits": option.bits, **({"block_size": option.block_size} if option.block_size else {}),
                           "relative_error": option.relative, "predicted": option.predicted,
                           "measured": -gains[(weight, *option.key)],
                           "agree": agrees(option.predicted, -gains[(weight, *option.key)])} for option in options]
    return checks


def quant_candidates(model: onnx.ModelProto, analysis: Any, kappa: float, cost: Any,
                     rounding: str = "loss-aware", cache: dict | None = None,
                     input_steps: dict[str, float] | None = None, int8_weight_bits: int = 8,
                     checks: dict[str, list[dict]] | None = None, block_size: int | None = None,
                     predictor: str = "kfac", runtime: str = "onnxruntime",
                     bits_offered: tuple[int, ...] = PLANNED_BITS) -> list[Candidates]:
    """Per weight group: float, then the options of :func:`layer_options` its checks trust
    (:func:`trusted_options`; ``checks`` from :func:`measure_options`, else the truncations' trusted range),
    with predicted loss change and cost saved (``cost``: a ``bytes``, ``bits`` or measured ``latency`` cost). An
    option that saves nothing is not offered: under a latency target a layer not measured faster with int8
    inputs stays float. The weights' container is ``runtime``'s (:func:`~.planners.weight_container`); with
    int8 inputs it is int8 (the integer kernels read int8)."""
    out = []
    for members, reason, options in layer_options(model, analysis, kappa, rounding, cache, input_steps,
                                                  int8_weight_bits, block_size, predictor, bits_offered):
        layer = members[0]
        dense = cost.dense(members)
        removed, dloss, sources = [0], [0.0], [None]
        measured = None if checks is None else checks.get(layer.weight, [])
        for option in trusted_options(options, measured, analysis.get(layer.node).perturbation_range):
            holder = "int8" if option.int8_inputs else weight_container(option.bits, runtime, option.block_size)
            scales = weight_scale_count(layer.op_type, layer.weight_shape, layer.transposed, option.block_size)
            saved = cost_units(cost, dense - cost.quantized(members, option.bits, CONTAINER_BITS[holder], scales,
                                                            option.int8_inputs))
            if saved <= 0:
                continue
            removed.append(saved)
            dloss.append(option.predicted)
            sources.append((option, measured, holder))
        out.append(Candidates(members, CandidateSet(np.array(removed, dtype=np.int64), np.array(dloss),
                                                    key=layer.weight), sources, reason))
    return out


def quant_entries(group: Candidates, option: int) -> tuple[list[QuantEntry], dict]:
    """The plan entries of ``group`` at ``option`` (0: float), and the grid they store (loss-aware rounding)."""
    source = group.sources[option]
    if source is None:
        return [float_entry(layer, group.reason) for layer in group.layers], {}
    chosen, checks, holder = source
    notes = {"predicted_dloss": chosen.predicted, "relative_error": chosen.relative}
    if checks:
        notes["range_checks"] = checks
    entries = [QuantEntry(node=layer.node, op_type=layer.op_type, weight=layer.weight,
                          weight_shape=list(layer.weight_shape), bits=chosen.bits,
                          granularity="per_channel" if chosen.block_size is None else "block",
                          block_size=chosen.block_size,
                          container=holder,
                          activations="int8" if chosen.int8_inputs else "float",
                          weight_scales="absmax" if chosen.grid is None else "searched",
                          rounding="nearest" if chosen.grid is None else "loss-aware",
                          params_dense=layer.params, params_planned=layer.params, notes=dict(notes))
               for layer in group.layers]
    return entries, {} if chosen.grid is None else {group.layers[0].weight: chosen.grid}


def float_entry(layer: Layer, reason: str | None = None) -> QuantEntry:
    """The entry of a layer that stays float."""
    return QuantEntry(node=layer.node, op_type=layer.op_type, weight=layer.weight,
                      weight_shape=list(layer.weight_shape), bits=None, granularity=None, block_size=None,
                      container=None, activations="float", weight_scales=None, rounding=None,
                      params_dense=layer.params, params_planned=layer.params,
                      notes={"reason": reason} if reason else {})
