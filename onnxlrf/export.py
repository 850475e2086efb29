"""torch -> ONNX with either exporter, checked against torch in onnxruntime.

``dynamo=False`` uses the TorchScript exporter at opset 17 and writes one file
(external data only above protobuf's 2 GiB limit). ``dynamo=True`` uses the
torch.export-based exporter at opset 18, which always saves the weights as
external data; the file pair is ``<name>`` plus ``<name>.data``. Both
exporters fold BatchNorm into the preceding Conv.

The export goes to a hidden temporary directory beside the output; the result
is written beside the output atomically (data file first, then the model file),
so a failed export, a failed check or SIGTERM leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch

from .errors import OnnxlrfError
from .models import ModelSpec
from .models.vision import DETECTION
from .onnx_io import check_output_path, save_onnx
from .progress import ProgressLike, as_progress
from .termination import sigterm_as_interrupt

DEFAULT_OPSET = {False: 17, True: 18}  # keyed by dynamo
# ORT vs torch, float32: allowed max abs difference relative to the output's scale
# (BatchNorm folding and kernel choice reorder float sums).
RELATIVE_TOLERANCE = 1e-4


@dataclass
class ExportResult:
    """The exported file and how it compares with torch in onnxruntime (``onnxlrf export``)."""

    path: Path
    exporter: str  # 'torchscript' | 'dynamo'
    opset: int
    max_abs_diff: float  # NaN, like tolerance, when exported with check=False
    tolerance: float
    providers: list[str]  # onnxruntime's session.get_providers() of the check; [] without check
    external_data: bool


def export_model(
    spec: ModelSpec,
    output: str | os.PathLike,
    dynamo: bool = False,
    batch: int = 1,
    dynamic_batch: bool = False,
    opset: int | None = None,
    overwrite: bool = False,
    check: bool = True,
    progress: ProgressLike = None,
) -> ExportResult:
    """Export ``spec`` to ``output`` and (with ``check``) compare onnxruntime with torch on the example input.

    The graph has batch ``batch``, or a dynamic batch with ``dynamic_batch``;
    text models always have a dynamic sequence axis.
    """
    if batch < 1:
        raise OnnxlrfError(f"batch must be at least 1, got {batch}")
    output = check_output_path(output, (), overwrite)
    if dynamo:  # the dynamo export always has a data file beside the model
        check_output_path(output.with_name(output.name + ".data"), (), overwrite)
    opset = opset or DEFAULT_OPSET[dynamo]
    # torch.export specializes a dimension traced at size 1, so a dynamic batch is traced at 2 or more.
    trace_batch = max(batch, 2) if dynamic_batch else batch
    inputs = {name: resize_batch(t, trace_batch) for name, t in spec.example_inputs.items()}
    dynamic_axes = {
        name: {axis: dim for axis, dim in axes.items() if dynamic_batch or axis != 0}
        for name, axes in spec.dynamic_axes.items()
    }
    dynamic_axes = {name: axes for name, axes in dynamic_axes.items() if axes}

    exporter = "dynamo" if dynamo else "torchscript"
    steps = 3 if check else 2  # export, (check,) save
    with sigterm_as_interrupt(), \
            tempfile.TemporaryDirectory(prefix=".onnxlrf-export-", dir=output.parent) as tmp, \
            as_progress(progress).task(f"export {spec.name} ({exporter}, opset {opset})", steps, "step") as task:
        exported = Path(tmp) / output.name
        task.note("tracing")
        _run_exporter(spec, inputs, exported, dynamo, opset, dynamic_axes)
        task.update()
        try:
            model = onnx.load(str(exported))
        except Exception as exc:
            raise OnnxlrfError(f"torch wrote an unreadable ONNX file: {exc}".splitlines()[0]) from None
        if not dynamic_batch:
            _pin_batch(model, spec, batch)
        for key, value in spec.metadata.items():
            entry = model.metadata_props.add()
            entry.key, entry.value = key, value
        max_diff, tolerance, providers = float("nan"), float("nan"), []
        if check:
            task.note("checking against torch in onnxruntime")
            max_diff, tolerance, providers = _check(spec, model, exported, inputs)
            task.update()
        task.note("saving")
        save_onnx(model, output, external_data=True if dynamo else None)
        task.update()
    return ExportResult(
        path=output,
        exporter=exporter,
        opset=opset,
        max_abs_diff=max_diff,
        tolerance=tolerance,
        providers=providers,
        external_data=_uses_external_data(output),
    )


def resize_batch(tensor: torch.Tensor, batch: int) -> torch.Tensor:
    """The example batch cut or repeated (cycling through its rows) to ``batch`` rows."""
    return tensor.index_select(0, torch.arange(batch) % tensor.shape[0])


def _run_exporter(
    spec: ModelSpec,
    inputs: dict[str, torch.Tensor],
    path: Path,
    dynamo: bool,
    opset: int,
    dynamic_axes: dict[str, dict[int, str]],
) -> None:
    args = tuple(inputs.values())
    names = dict(input_names=list(inputs), output_names=list(spec.output_names))
    # Both exporters are chatty (deprecation notes, progress lines on stdout); results are reported instead.
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), torch.no_grad():
        warnings.simplefilter("ignore")
        try:
            if dynamo:
                dims = {}
                shapes = tuple(
                    {axis: dims.setdefault(dim, torch.export.Dim(dim)) for axis, dim in dynamic_axes.get(name, {}).items()}
                    or None
                    for name in inputs
                )
                torch.onnx.export(
                    spec.module, args, str(path), dynamo=True, opset_version=opset, external_data=True,
                    dynamic_shapes=shapes if any(shapes) else None, verbose=False, **names,
                )
            else:
                # nn.MultiheadAttention's inference fast path (torchvision's ViTs) is one fused op the
                # TorchScript exporter has no symbolic for; its composite path exports.
                fastpath = torch.backends.mha.get_fastpath_enabled()
                torch.backends.mha.set_fastpath_enabled(False)
                try:
                    torch.onnx.export(
                        spec.module, args, str(path), dynamo=False, opset_version=opset, do_constant_folding=True,
                        dynamic_axes=dynamic_axes or None, **names,
                    )
                finally:
                    torch.backends.mha.set_fastpath_enabled(fastpath)
        except OnnxlrfError:
            raise
        except Exception as exc:
            exporter = "dynamo" if dynamo else "torchscript"
            message = f"{type(exc).__name__}: {exc}".splitlines()[0]
            raise OnnxlrfError(f"{exporter} export of {spec.name} failed: {message}") from None


def _pin_batch(model: onnx.ModelProto, spec: ModelSpec, batch: int) -> None:
    """Write the static batch into graph inputs/outputs where the exporter left a made-up symbol.

    The TorchScript exporter names some output dims it could not infer
    (``Gemmlogits_dim_0``) even though the batch is static.
    """
    for value in (*model.graph.input, *model.graph.output):
        if 0 in spec.dynamic_axes.get(value.name, {}):
            dim = value.type.tensor_type.shape.dim[0]
            if not dim.HasField("dim_value"):
                dim.dim_value = batch


def _check(
    spec: ModelSpec, model: onnx.ModelProto, path: Path, inputs: dict[str, torch.Tensor]
) -> tuple[float, float, list[str]]:
    """Max abs difference between onnxruntime (on the file as torch wrote it) and torch, and the tolerance."""
    import onnxruntime as ort

    with torch.no_grad():
        expected = spec.module(*inputs.values())
    expected = [t.detach().numpy() for t in (expected if isinstance(expected, tuple) else (expected,))]
    # A detector's outputs are compared as a set of detections; other models' first output row by row.
    names = spec.output_names if spec.task == DETECTION else spec.output_names[:1]
    options = ort.SessionOptions()
    options.intra_op_num_threads = min(2, os.cpu_count() or 1)
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        got = session.run(names, {k: v.numpy() for k, v in inputs.items()})
    except Exception as exc:
        raise OnnxlrfError(f"onnxruntime cannot run the export of {spec.name}: {exc}".splitlines()[0]) from None
    if spec.task == DETECTION:
        max_diff = compare_detections(*expected, *got, spec.name)
        scale = expected[0]
    else:
        got, expected = got[0], expected[0].astype(np.float32)
        if got.shape != expected.shape:
            raise OnnxlrfError(f"export of {spec.name} gives shape {got.shape}, torch gives {expected.shape}")
        max_diff = float(np.max(np.abs(got.astype(np.float64) - expected))) if got.size else 0.0
        scale = expected
    tolerance = RELATIVE_TOLERANCE * max(1.0, float(np.max(np.abs(scale))) if scale.size else 0.0)
    if not max_diff <= tolerance:  # also catches NaN
        raise OnnxlrfError(
            f"export of {spec.name} differs from torch: max abs diff {max_diff:.3g} > tolerance {tolerance:.3g}"
        )
    return max_diff, tolerance, list(session.get_providers())


def compare_detections(boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray, got_boxes: np.ndarray,
                       got_scores: np.ndarray, got_labels: np.ndarray, name: str) -> float:
    """The max abs difference between two sets of detections (torch's, then onnxruntime's), in any order.

    Detections whose scores (nearly) tie come out of NMS and TopK in an order that float rounding
    decides, so rows are not compared with rows: the scores are compared sorted, and each detection's
    box with the nearest box of the same label in the other set (both ways). The sets must have the
    same size.
    """
    if len(got_boxes) != len(boxes):
        raise OnnxlrfError(f"export of {name} keeps {len(got_boxes)} detections, torch keeps {len(boxes)}")
    if not len(boxes):
        return 0.0
    score_diff = np.max(np.abs(np.sort(got_scores.astype(np.float64)) - np.sort(scores.astype(np.float64))))

    def box_diff(a_boxes, a_labels, b_boxes, b_labels) -> float:
        """Over detections of ``a``: the distance to the nearest box of the same label in ``b`` (max abs)."""
        distance = np.max(np.abs(a_boxes[:, None, :].astype(np.float64) - b_boxes[None, :, :]), axis=2)
        distance[a_labels[:, None] != b_labels[None, :]] = np.inf
        return float(np.max(np.min(distance, axis=1)))

    return max(float(score_diff), box_diff(boxes, labels, got_boxes, got_labels),
               box_diff(got_boxes, got_labels, boxes, labels))


def _uses_external_data(path: Path) -> bool:
    model = onnx.load(str(path), load_external_data=False)
    return any(
        t.data_location == onnx.TensorProto.EXTERNAL for t in onnx.external_data_helper._get_all_tensors(model)
    )
