"""Smoothing of W8A8 Gemm/MatMul inputs (SmoothQuant, Xiao et al. 2023), its strength searched per input tensor.

A transformer's projections read activations a few of whose channels are many times wider than the rest
(MiniLM: the feed-forward input's widest channel up to 16 times its median one). One per-tensor uint8 grid
spans them all, so the other channels get few levels. Dividing channel ``j`` of the input by ``s_j`` and
multiplying row ``j`` of the weight (its input channel) by ``s_j`` computes the same product; with

    s_j = max|x_j|^alpha / max|w_j|^(1 - alpha)

(``max|w_j|`` over every layer that reads the tensor) the activation narrows and the weight, quantized per
output channel, widens. ``alpha`` is searched per input tensor among :data:`ALPHAS` and no smoothing, by the
squared error of its readers' outputs quantized as the rewrite quantizes them (the calibrated range the minmax
calibrator measures, the runtime's activation grid, each layer's weight bits per channel) against the float
outputs, on rows of the calibration split. The plan records each smoothed tensor's ``alpha`` and the per-channel
``max|x_j|`` it was searched on (``Plan.smoothing``); :func:`apply_smoothing` computes ``s`` from them and the
model's weights, so an edited ``alpha`` is applied as written.

The rewritten model reads ``Mul(x, 1/s)`` (one per smoothed tensor, shared by its readers; the quantizer reads
it; other readers keep ``x``) and stores ``s * W``: the float function is unchanged up to rounding.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort

from ...data import Dataset, graph_inputs
from ...errors import OnnxlrfError
from ...graph.layers import constant_producers
from ...graph.quantizable import QuantLayer, find_quantizable
from ...onnx_io import save_onnx, unique_name
from ...planning.plan import Plan, QuantEntry
from ...progress import ProgressLike, as_progress
from .grid import dequantize_per_channel, quantize_per_channel, round_activation

__all__ = ["ALPHAS", "SMOOTHINGS", "apply_smoothing", "check_smoothing", "search_smoothing", "smoothing_groups"]

SMOOTHINGS = ("auto", "off")
ALPHAS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
# Calibration rows each tensor's search is scored on (sampled evenly across the split's batches).
SAMPLE_ROWS = 4096
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


def _weight_rows(model: onnx.ModelProto, layer: QuantLayer) -> np.ndarray:
    """``layer``'s weight as (input channels, output channels)."""
    weight = onnx.numpy_helper.to_array(constant_producers(model)[layer.weight]).astype(np.float32)
    return weight if layer.reduction_axis == 0 else weight.T


def _scales(absmax: np.ndarray, rows: list[np.ndarray], alpha: float) -> np.ndarray:
    """``s_j = max|x_j|^alpha / max|w_j|^(1 - alpha)``, 1 where either is 0."""
    weight_max = np.max([np.abs(w).max(axis=1) for w in rows], axis=0).astype(np.float64)
    absmax = np.asarray(absmax, dtype=np.float64)
    live = (absmax > 0) & (weight_max > 0)
    scales = np.ones_like(absmax)
    scales[live] = absmax[live] ** alpha / weight_max[live] ** (1.0 - alpha)
    return scales.astype(np.float32)


def check_smoothing(model: onnx.ModelProto, plan: Plan) -> None:
    """Raise OnnxlrfError unless every smoothed tensor of ``plan`` is one :func:`smoothing_groups` allows, with a
    ``channel_absmax`` per input channel."""
    if not plan.smoothing:
        return
    groups = smoothing_groups(model, plan)
    for tensor, smoothing in plan.smoothing.items():
        if tensor not in groups:
            raise OnnxlrfError(f"plan smooths tensor {tensor!r}, which no W8A8 Gemm/MatMul entry with per-channel "
                               f"scales (the only reader of its weight) reads")
        channels = _weight_rows(model, groups[tensor][0]).shape[0]
        if len(smoothing["channel_absmax"]) != channels:
            raise OnnxlrfError(f"plan smoothing of {tensor!r} has {len(smoothing['channel_absmax'])} channel_absmax "
                               f"values; its readers have {channels} input channels")


def apply_smoothing(model: onnx.ModelProto, plan: Plan) -> onnx.ModelProto:
    """``model`` itself where ``plan`` smooths nothing; else a copy whose readers of each smoothed tensor ``x``
    read ``Mul(x, 1/s)`` and store ``s * W`` (names: ``<x>/smoothed``, ``<x>/Smooth``; see the module doc)."""
    if not plan.smoothing:
        return model
    check_smoothing(model, plan)
    groups = smoothing_groups(model, plan)
    work = onnx.ModelProto()
    work.CopyFrom(model)  # graphsurgeon keeps lazy references to the tensors it imports
    graph = gs.import_onnx(work)
    nodes = {node.name: node for node in graph.nodes}
    tensors = graph.tensors()
    taken = set(tensors) | set(nodes)
    for tensor in sorted(plan.smoothing):
        layers = groups[tensor]
        rows = [_weight_rows(work, layer) for layer in layers]
        scales = _scales(np.asarray(plan.smoothing[tensor]["channel_absmax"]), rows, plan.smoothing[tensor]["alpha"])
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
    for field_name in ("ir_version", "producer_name", "producer_version"):
        setattr(result, field_name, getattr(work, field_name))
    del result.opset_import[:]
    result.opset_import.extend(work.opset_import)
    del result.metadata_props[:]
    result.metadata_props.extend(work.metadata_props)
    return result


def _channel_statistics(model: onnx.ModelProto, calib: Dataset, tensors: list[str], batch_rows: int
                        ) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Per tensor: per-channel minimum and maximum over the calibration split, and up to :data:`SAMPLE_ROWS`
    of its rows (last axis the channels), run by onnxruntime in the calibrators' batches."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    outputs = {out.name for out in probe.graph.output}
    probe.graph.output.extend(onnx.ValueInfoProto(name=name) for name in tensors if name not in outputs)
    starts = list(range(0, max(calib.rows - batch_rows + 1, 1), batch_rows))
    quota = -(-SAMPLE_ROWS // len(starts))
    rng = np.random.default_rng(0)
    names = [inp.name for inp in graph_inputs(model)]
    low: dict[str, np.ndarray] = {}
    high: dict[str, np.ndarray] = {}
    sampled: dict[str, list[np.ndarray]] = {name: [] for name in tensors}
    with tempfile.TemporaryDirectory(prefix="onnxlrf-smooth-") as tmp, contextlib.redirect_stdout(io.StringIO()):
        options = ort.SessionOptions()
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        session = ort.InferenceSession(str(save_onnx(probe, Path(tmp) / "probe.onnx")), options,
                                       providers=["CPUExecutionProvider"])
        for start in starts:
            values = session.run(tensors, {name: calib.inputs[name][start:start + batch_rows] for name in names})
            for name, value in zip(tensors, values):
                rows = np.asarray(value, dtype=np.float32).reshape(-1, value.shape[-1])
                low[name] = np.minimum(low[name], rows.min(0)) if name in low else rows.min(0)
                high[name] = np.maximum(high[name], rows.max(0)) if name in high else rows.max(0)
                sampled[name].append(rows[rng.choice(len(rows), min(len(rows), quota), replace=False)])
    return {name: (low[name], high[name], np.concatenate(sampled[name])) for name in tensors}


def _output_error(inputs: np.ndarray, low: np.ndarray, high: np.ndarray, layers: list[QuantLayer],
                  rows: list[np.ndarray], bits: dict[str, int], scales: np.ndarray, runtime: str) -> float:
    """Squared error of the readers' outputs with input ``inputs / scales`` on its grid and weights ``scales * W``
    rounded per output channel, against the float outputs."""
    grid = round_activation(inputs / scales, float((low / scales).min()), float((high / scales).max()),
                            symmetric=runtime == "tensorrt")
    error = 0.0
    for layer, weight in zip(layers, rows):
        levels, channel_scales = quantize_per_channel(weight * scales[:, None], 1, bits[layer.node])
        error += float(np.square(grid @ dequantize_per_channel(levels, channel_scales, 1) - inputs @ weight).sum())
    return error


def search_smoothing(model: onnx.ModelProto, plan: Plan, calib: Dataset, runtime: str, batch_rows: int,
                     progress: ProgressLike = None) -> Plan:
    """``plan`` with ``smoothing`` for each tensor of :func:`smoothing_groups` whose readers' quantized outputs
    some alpha of :data:`ALPHAS` brings closer to the float ones than no smoothing does (module doc), searched
    on ``calib`` (the calibration split, in batches of ``batch_rows``); its ranges must be calibrated after."""
    groups = smoothing_groups(model, plan)
    if not groups:
        return plan
    progress = as_progress(progress)
    statistics = _channel_statistics(model, calib, sorted(groups), batch_rows)
    bits = {entry.node: entry.bits for entry in plan.layers}
    chosen = {}
    for tensor in progress.track(sorted(groups), "smoothing search", unit="tensor"):
        low, high, inputs = statistics[tensor]
        rows = [_weight_rows(model, layer) for layer in groups[tensor]]
        absmax = np.maximum(np.abs(low), np.abs(high))
        best_alpha = None
        best = _output_error(inputs, low, high, groups[tensor], rows, bits, np.ones_like(absmax), runtime)
        for alpha in ALPHAS:
            error = _output_error(inputs, low, high, groups[tensor], rows, bits, _scales(absmax, rows, alpha),
                                  runtime)
            if error < best:
                best_alpha, best = alpha, error
        if best_alpha is not None:
            chosen[tensor] = {"alpha": best_alpha, "channel_absmax": [float(v) for v in absmax]}
    progress.log(f"smoothing: {len(chosen)} of {len(groups)} Gemm/MatMul inputs smoothed on {len(calib)} "
                 f"calibration samples")
    options = {**plan.options, "smoothing": {"tensors": len(chosen), "searched": len(groups),
                                             "alphas": list(ALPHAS), "samples": len(calib)}}
    return dataclasses.replace(plan, smoothing=chosen, options=options)
