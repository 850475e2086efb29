"""Activation ranges from the calibration split, measured by onnxruntime's calibrators.

onnxruntime's calibrators (MinMax, Percentile, Entropy) run an augmented copy of the model that outputs the
tensors to calibrate (here only those the rewrite quantizes); onnxlrf only feeds it the calibration split in batches and reads the
ranges back. Each batch is one ``collect_data`` call, so the calibrators keep running statistics (min/max,
histograms) instead of every intermediate tensor of the whole split.
"""

from __future__ import annotations

import contextlib
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
from ...onnx_io import save_onnx
from ...planning.plan import Plan
from ...progress import ProgressLike, as_progress
from .rewrite import quantized_activations
from .smoothing import apply_smoothing

CALIBRATION_METHODS = {"minmax": MinMaxCalibrater, "percentile": PercentileCalibrater, "entropy": EntropyCalibrater}
# Rows per collect_data call: enough for the histograms' statistics, little memory for intermediate tensors.
CALIBRATION_BATCH = 32


class _Batches(CalibrationDataReader):
    """One batch of the dataset's rows (model inputs by name), then the end."""

    def __init__(self, feed: dict[str, np.ndarray]) -> None:
        self.feed: dict[str, np.ndarray] | None = feed

    def get_next(self) -> dict[str, np.ndarray] | None:
        feed, self.feed = self.feed, None
        return feed


def calibration_batch_rows(model: onnx.ModelProto) -> int:
    """Rows per run: the model's static batch size if it has one, else :data:`CALIBRATION_BATCH`."""
    dims = graph_inputs(model)[0].type.tensor_type.shape.dim
    static = dims[0].dim_value if dims and dims[0].HasField("dim_value") else 0
    return static or CALIBRATION_BATCH


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
    rows = calibration_batch_rows(model)
    names = [inp.name for inp in graph_inputs(model)]
    starts = range(0, max(calib.rows - rows + 1, 1), rows)  # a static batch takes only full batches
    # The histogram calibrators print a line per batch on stdout, which belongs to the CLI's result.
    with tempfile.TemporaryDirectory(prefix="onnxlrf-calibrate-") as tmp, contextlib.redirect_stdout(io.StringIO()):
        path = save_onnx(model, Path(tmp) / "model.onnx")
        try:
            calibrator = _calibrator(method, path, op_types, str(Path(tmp) / "augmented.onnx"), wanted)
            for start in as_progress(progress).track(starts, f"calibrate ({method})", unit="batch"):
                calibrator.collect_data(_Batches({name: calib.inputs[name][start:start + rows] for name in names}))
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
