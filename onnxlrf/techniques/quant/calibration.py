"""Activation ranges from the calibration split, measured by onnxruntime's calibrators; and the search of each W8A8
Gemm/MatMul input's smoothing (:mod:`.smoothing`) on the same split.

onnxruntime's calibrators (MinMax, Percentile, Entropy) run an augmented copy of the model that outputs the
tensors to calibrate (here only those the rewrite quantizes); onnxlrf only feeds it the calibration split in batches and reads the
ranges back. Each batch is one ``collect_data`` call, so the calibrators keep running statistics (min/max,
histograms) instead of every intermediate tensor of the whole split.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnxruntime.quantization import CalibrationDataReader
from onnxruntime.quantization.calibrate import EntropyCalibrater, MinMaxCalibrater, PercentileCalibrater

from ...data import Dataset, graph_inputs
from ...errors import OnnxlrfError, first_line
from ...graph.quantizable import QuantLayer
from ...onnx_io import save_onnx
from ...planning.plan import Plan
from ...progress import ProgressLike, as_progress
from ...runtime.sessions import make_session
from .grid import dequantize_per_channel, quantize_per_channel, round_activation
from .rewrite import quantized_activations
from .smoothing import ALPHAS, apply_smoothing, smoothing_groups, smoothing_scales, weight_rows

CALIBRATION_METHODS = {"minmax": MinMaxCalibrater, "percentile": PercentileCalibrater, "entropy": EntropyCalibrater}
# Rows per collect_data call: enough for the histograms' statistics, little memory for intermediate tensors.
CALIBRATION_BATCH = 32
# Calibration rows each input's smoothing search is scored on (sampled evenly across the batches).
SAMPLE_ROWS = 4096


class _Batches(CalibrationDataReader):
    """One batch of the dataset's rows (model inputs by name), then the end."""

    def __init__(self, feed: dict[str, np.ndarray]) -> None:
        self.feed: dict[str, np.ndarray] | None = feed

    def get_next(self) -> dict[str, np.ndarray] | None:
        feed, self.feed = self.feed, None
        return feed


def calibration_batches(model: onnx.ModelProto, calib: Dataset) -> list[tuple[int, int]]:
    """(start, stop) rows of each run over ``calib``: the model's static batch size, full batches only, if it has
    one; else :data:`CALIBRATION_BATCH` rows, the last batch what is left."""
    dims = graph_inputs(model)[0].type.tensor_type.shape.dim
    static = dims[0].dim_value if dims and dims[0].HasField("dim_value") else 0
    if static:
        return [(start, start + static) for start in range(0, max(calib.rows - static + 1, 1), static)]
    return [(start, min(start + CALIBRATION_BATCH, calib.rows)) for start in range(0, calib.rows, CALIBRATION_BATCH)]


def _calibrator(method: str, path: Path, op_types: list[str], augmented: str, wanted: set[str]) -> Any:
    """onnxruntime's ``method`` calibrator over ``wanted`` only, ready for ``collect_data``.

    Left to itself it calibrates every float input and output of the given op types: in a transformer that
    includes the attention mask's Add, whose -3.4e38 the histogram calibrators cannot bin. Ranges are kept as
    observed (symmetric ones are made from them where a runtime needs them)."""
    class Wanted(CALIBRATION_METHODS[method]):
        def select_tensors_to_calibrate(self, model: onnx.ModelProto) -> tuple[set, dict]:
            tensors, value_infos = super().select_tensors_to_calibrate(model)
            return tensors & wanted, value_infos

    calibrator = Wanted(path, op_types, augmented, symmetric=False)
    calibrator.augment_graph()
    calibrator.execution_providers = ["CPUExecutionProvider"]
    calibrator.create_inference_session()
    return calibrator


def calibrate_ranges(model: onnx.ModelProto, calib: Dataset, tensors: list[str], method: str = "minmax",
                     progress: ProgressLike = None) -> dict[str, list[float]]:
    """``[low, high]`` of each of ``tensors`` (activations of ``model``) over the rows of ``calib``.

    ``method``: ``minmax`` (the observed extremes), ``percentile`` (99.999th percentile of a histogram)
    or ``entropy`` (the range minimizing the KL divergence of the quantized histogram).
    """
    if method not in CALIBRATION_METHODS:
        raise OnnxlrfError(f"unknown calibration method {method!r}; known: {', '.join(CALIBRATION_METHODS)}")
    if not tensors:
        return {}
    wanted = set(tensors)
    op_types = sorted({node.op_type for node in model.graph.node if wanted & {*node.input, *node.output}})
    names = [inp.name for inp in graph_inputs(model)]
    # The histogram calibrators print a line per batch on stdout, which belongs to the CLI's result.
    with tempfile.TemporaryDirectory(prefix="onnxlrf-calibrate-") as tmp, contextlib.redirect_stdout(io.StringIO()):
        path = save_onnx(model, Path(tmp) / "model.onnx")
        try:
            calibrator = _calibrator(method, path, op_types, str(Path(tmp) / "augmented.onnx"), wanted)
            for start, stop in as_progress(progress).track(calibration_batches(model, calib), f"calibrate ({method})",
                                                           unit="batch"):
                calibrator.collect_data(_Batches({name: calib.inputs[name][start:stop] for name in names}))
            computed = calibrator.compute_data()
        except OnnxlrfError:
            raise
        except Exception as exc:  # onnxruntime's calibrators raise ValueError, Fail, ... with long texts
            raise OnnxlrfError(f"onnxruntime's {method} calibrator failed: {first_line(exc)}") from None
    ranges = {}
    for name in tensors:
        if name not in computed.data:
            raise OnnxlrfError(f"the {method} calibrator measured no range for tensor {name!r}")
        low, high = (float(v) for v in np.asarray(computed.data[name].range_value, dtype=np.float64).ravel()[:2])
        if not (np.isfinite(low) and np.isfinite(high)):
            raise OnnxlrfError(f"the {method} calibrator measured a non-finite range for tensor {name!r}")
        ranges[name] = [low, high]
    return ranges


def calibrate_plan(model: onnx.ModelProto, plan: Plan, calib: Dataset, runtime: str, method: str = "minmax",
                   progress: ProgressLike = None) -> Plan:
    """``plan`` with the ranges of the activations its int8 layers quantize in ``runtime``'s form, measured
    on ``calib`` by onnxruntime's ``method`` calibrator (recorded in ``plan.options``); a smoothed input's range is
    that of its smoothed tensor (:func:`~.smoothing.apply_smoothing`)."""
    smoothed = apply_smoothing(model, plan)
    tensors = [site.tensor for site in quantized_activations(smoothed, plan, runtime)]
    plan.activation_ranges = calibrate_ranges(smoothed, calib, tensors, method, progress)
    plan.options["calibration_method"] = method
    plan.options["calibration_samples"] = len(calib)
    return plan


def _channel_statistics(model: onnx.ModelProto, calib: Dataset, tensors: list[str]
                        ) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Per tensor: per-channel minimum and maximum over the calibration split, and up to :data:`SAMPLE_ROWS`
    of its rows (last axis the channels), run by onnxruntime in the calibrators' batches."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    outputs = {out.name for out in probe.graph.output}
    probe.graph.output.extend(onnx.ValueInfoProto(name=name) for name in tensors if name not in outputs)
    batches = calibration_batches(model, calib)
    quota = -(-SAMPLE_ROWS // len(batches))
    rng = np.random.default_rng(0)
    names = [inp.name for inp in graph_inputs(model)]
    low: dict[str, np.ndarray] = {}
    high: dict[str, np.ndarray] = {}
    sampled: dict[str, list[np.ndarray]] = {name: [] for name in tensors}
    session = make_session(probe, providers=["CPUExecutionProvider"])
    for start, stop in batches:
        values = session.run(tensors, {name: calib.inputs[name][start:stop] for name in names})
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


def search_smoothing(model: onnx.ModelProto, plan: Plan, calib: Dataset, runtime: str, min_weight_bits: int = 0,
                     progress: ProgressLike = None) -> Plan:
    """``plan`` with ``smoothing`` for each tensor of :func:`smoothing_groups` whose readers all have at least
    ``min_weight_bits`` and whose quantized outputs some alpha of :data:`ALPHAS` brings closer to the float ones
    than no smoothing does (module doc), searched on ``calib`` (the calibration split, in the calibrators'
    batches); its ranges must be calibrated after (:func:`calibrate_plan`)."""
    bits = {entry.node: entry.bits for entry in plan.layers}
    groups = {tensor: layers for tensor, layers in smoothing_groups(model, plan).items()
              if all(bits[layer.node] >= min_weight_bits for layer in layers)}
    if not groups:
        return plan
    progress = as_progress(progress)
    statistics = _channel_statistics(model, calib, sorted(groups))
    chosen = {}
    for tensor in progress.track(sorted(groups), "smoothing search", unit="tensor"):
        low, high, inputs = statistics[tensor]
        rows = [weight_rows(model, layer) for layer in groups[tensor]]
        absmax = np.maximum(np.abs(low), np.abs(high))
        best_alpha = None
        best = _output_error(inputs, low, high, groups[tensor], rows, bits, np.ones_like(absmax), runtime)
        for alpha in ALPHAS:
            error = _output_error(inputs, low, high, groups[tensor], rows, bits, smoothing_scales(absmax, rows, alpha),
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
