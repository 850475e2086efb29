"""Evaluating models in onnxruntime: metric, fidelity and the change interval against a reference; latency.

Results name the providers the sessions really used (see :mod:`onnxlrf.runtime.sessions`).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx

from ..data import (
    CLASSIFICATION,
    OUTPUTS,
    Dataset,
    check_fits,
    cosine_rows,
    graph_inputs,
)
from ..errors import OnnxlrfError
from ..graph.heads import cut_at_heads, find_post_processing
from ..graph.layers import count_params
from ..progress import ProgressLike, as_progress
from .sessions import (
    FLOAT_TYPES,
    make_runner,
    make_session,
    random_feeds,
    run_dataset,
    run_float_outputs,
    run_session,
    select_providers,
)
from .shapes import ModelLike, as_model_proto, count_flops, file_size

# Bootstrap resamples for change intervals: at 2,000 the interval's ends move by 1 to 2% of
# its width from seed to seed (standard deviation over 10 seeds, ResNet-56's and MiniLM's
# held-out splits).
BOOTSTRAP_RESAMPLES = 2000


@dataclass
class ValidationResult:
    """Metric, fidelity to a reference, sizes and the providers onnxruntime really used (``onnxlrf validate``)."""

    metric: str
    value: float
    reference_value: float | None
    params: int
    reference_params: int | None
    max_abs_diff: float | None
    mean_abs_diff: float | None
    cosine: float | None
    top1_agreement: float | None
    providers: list[str]
    file_size: int
    reference_file_size: int | None
    samples: int
    # With a reference: the 95% paired-bootstrap interval of value - reference_value (:func:`change_interval`).
    change_interval: list[float] | None = None
    # The tensors scored: the first output; for label-free data every float output, or for a detector
    # the heads before its post-processing (:mod:`onnxlrf.graph.heads`).
    compared: list[str] | None = None


@dataclass
class BenchResult:
    """Median latencies, speedup and FLOPs of a model against its reference (``onnxlrf bench``)."""

    latency_ms: float
    reference_latency_ms: float
    speedup: float
    flops: int
    reference_flops: int
    providers: list[str]
    batch: int
    runs: int


def validate(
    model: ModelLike,
    dataset: Dataset,
    reference: ModelLike | None = None,
    batch_size: int = 128,
    provider: str = "auto",
    progress: ProgressLike = None,
) -> ValidationResult:
    """Score ``model`` on ``dataset`` and, with ``reference``, compare the two models' first outputs
    (label-free data: all float outputs, scored by fidelity to the reference's, which it then needs;
    a detector's: the heads before its post-processing, where both models are cut, see
    :mod:`onnxlrf.graph.heads`). Parameters and file sizes are the whole models'."""
    providers = select_providers(provider)
    proto = as_model_proto(model)
    check_fits(dataset, proto)
    reference_proto = as_model_proto(reference) if reference is not None else None
    sizes = {"params": count_params(proto), "file_size": file_size(model)}
    if reference is not None:
        sizes.update(reference_params=count_params(reference_proto), reference_file_size=file_size(reference))
    reference_outputs = None
    post = find_post_processing(reference_proto) if dataset.task == OUTPUTS and reference is not None else None
    if post is not None:
        proto = model = cut_at_heads(proto, post.heads)
        reference = reference_proto = cut_at_heads(reference_proto, post.heads)
    if dataset.task == OUTPUTS and not dataset.output_widths:
        if reference is None:
            raise OnnxlrfError(f"data {dataset.name} has no labels: it is scored by fidelity to a reference "
                               f"model's outputs, so pass --reference")
        check_fits(dataset, reference_proto)
        dataset = with_original_outputs(dataset, reference, provider, progress)
        reference_outputs = dataset.labels
    session = make_session(model, providers)
    outputs = run_dataset(session, dataset, batch_size, progress, f"validate on {len(dataset)} samples")
    predictions = dataset.predictions(outputs)
    result = ValidationResult(
        metric=dataset.metric_name,
        value=dataset.score_predictions(predictions),
        reference_value=None,
        params=sizes["params"],
        reference_params=None,
        max_abs_diff=None,
        mean_abs_diff=None,
        cosine=None,
        top1_agreement=None,
        providers=session.get_providers(),
        file_size=sizes["file_size"],
        reference_file_size=None,
        samples=len(dataset),
        compared=compared_outputs(session, dataset),
    )
    if reference is None:
        return result
    check_fits(dataset, reference_proto)
    if reference_outputs is None:
        reference_outputs = run_dataset(make_session(reference, providers), dataset, batch_size, progress,
                                        f"validate the reference on {len(dataset)} samples")
    if reference_outputs.shape != outputs.shape:
        raise OnnxlrfError(
            f"model and reference outputs differ in shape: {list(outputs.shape)} vs {list(reference_outputs.shape)}"
        )
    diff = np.abs(outputs.astype(np.float64) - reference_outputs.astype(np.float64))
    reference_predictions = dataset.predictions(reference_outputs)
    result.reference_value = dataset.score_predictions(reference_predictions)
    result.change_interval = change_interval(dataset, predictions, reference_predictions)
    result.reference_params = sizes["reference_params"]
    result.max_abs_diff = float(diff.max())
    result.mean_abs_diff = float(diff.mean())
    result.cosine = float(np.mean(cosine_rows(outputs, reference_outputs)))
    if dataset.task == CLASSIFICATION:
        result.top1_agreement = float(np.mean(predictions == reference_predictions))
    result.reference_file_size = sizes["reference_file_size"]
    return result


def compared_outputs(session: Any, dataset: Dataset) -> list[str]:
    """The outputs :func:`validate` scores: every float output for label-free data, else the first."""
    if dataset.task == OUTPUTS:
        return [output.name for output in session.get_outputs() if output.type in FLOAT_TYPES]
    return [session.get_outputs()[0].name]


def with_original_outputs(dataset: Dataset, original: ModelLike, provider: str = "auto",
                          progress: ProgressLike = None) -> Dataset:
    """Label-free ``dataset`` with ``original``'s float outputs as its labels (see
    :meth:`~onnxlrf.data.Dataset.with_original_outputs`); as it is where it has them already."""
    if dataset.output_widths:
        return dataset
    session = make_session(original, select_providers(provider))
    return dataset.with_original_outputs(run_float_outputs(
        session, dataset, progress=progress, description=f"the original's outputs on {len(dataset)} samples"))


def change_interval(
    dataset: Dataset,
    predictions: np.ndarray,
    reference_predictions: np.ndarray,
    confidence: float = 0.95,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = 0,
) -> list[float]:
    """[low, high]: the ``confidence`` interval of ``dataset``'s metric of ``predictions`` minus
    that of ``reference_predictions`` (per sample, :meth:`Dataset.predictions`), by the paired
    bootstrap: both are scored on the same resampled samples, so the noise that the two models
    share (which samples are easy) cancels. An interval that contains 0 says ``dataset`` cannot
    tell the two models apart."""
    if not 0 < confidence < 1:
        raise OnnxlrfError(f"confidence must be between 0 and 1, got {confidence}")
    if resamples < 1 or len(dataset) < 1:
        raise OnnxlrfError(f"a bootstrap needs samples and resamples, got {len(dataset)} and {resamples}")
    rng = np.random.default_rng(seed)
    changes = np.empty(resamples)
    for i in range(resamples):
        samples = rng.integers(0, len(dataset), len(dataset))
        changes[i] = dataset.score_predictions(predictions, samples) - \
            dataset.score_predictions(reference_predictions, samples)
    tail = 100 * (1 - confidence) / 2
    low, high = np.percentile(changes, [tail, 100 - tail])
    return [float(low), float(high)]


def _check_feeds(name: str, model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> None:
    """Refuse feeds of another dtype or shape than the model's inputs declare (one model's random inputs fed to
    a reference of another input shape, or of a static batch)."""
    for inp in graph_inputs(model):
        value, tensor_type = feeds[inp.name], inp.type.tensor_type
        expected = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type))
        if value.dtype != expected:
            raise OnnxlrfError(f"input {inp.name!r} of the {name} is {expected}, but the inputs are {value.dtype}: "
                               f"bench models with the same inputs")
        declared = [d.dim_value if d.HasField("dim_value") else d.dim_param or "?" for d in tensor_type.shape.dim]
        if len(declared) != value.ndim or any(isinstance(d, int) and d != n for d, n in zip(declared, value.shape)):
            raise OnnxlrfError(f"input {inp.name!r} of the {name} has shape {declared}, but the inputs are "
                               f"{list(value.shape)}: bench models with the same input shapes (a static batch "
                               f"needs the same --batch)")


def benchmark(
    model: ModelLike,
    reference: ModelLike,
    batch: int = 1,
    warmup: int = 5,
    runs: int = 30,
    provider: str = "auto",
    threads: int | None = None,
    feeds: dict[str, np.ndarray] | None = None,
    progress: ProgressLike = None,
    io_binding: bool = False,
) -> BenchResult:
    """Median latency of ``model`` and ``reference`` on the same inputs.

    After ``warmup`` runs of each, the two models run alternately (the order
    flipping every round) so both see the same machine noise. Without ``feeds``,
    inputs are :func:`random_feeds` (a static batch dim in the model wins over ``batch``).
    ``io_binding``: inputs and outputs stay on the provider's device (see :func:`make_runner`).
    """
    if runs < 1 or warmup < 0:
        raise OnnxlrfError(f"need runs >= 1 and warmup >= 0, got runs={runs}, warmup={warmup}")
    providers = select_providers(provider)
    proto, reference_proto = as_model_proto(model), as_model_proto(reference)
    feeds = feeds if feeds is not None else random_feeds(proto, batch)
    session = make_session(model, providers, threads)
    reference_session = make_session(reference, providers, threads)
    model_feeds = {i.name: feeds[i.name] for i in session.get_inputs() if i.name in feeds}
    reference_feeds = {i.name: feeds[i.name] for i in reference_session.get_inputs() if i.name in feeds}
    for name, sess, sess_feeds, graph in (("model", session, model_feeds, proto),
                                          ("reference", reference_session, reference_feeds, reference_proto)):
        missing = [i.name for i in sess.get_inputs() if i.name not in sess_feeds]
        if missing:
            raise OnnxlrfError(f"feeds lack input(s) {', '.join(missing)} of the {name}")
        _check_feeds(name, graph, sess_feeds)
        run_session(sess, None, sess_feeds)  # a model that cannot run these inputs: one line, before any timing
    progress = as_progress(progress)
    run_model = make_runner(session, model_feeds, io_binding)
    run_reference = make_runner(reference_session, reference_feeds, io_binding)
    for _ in progress.track(range(warmup), "benchmark: warm-up", unit="round"):
        run_model()
        run_reference()
    times: dict[int, list[float]] = {0: [], 1: []}
    pairs = ((0, run_model), (1, run_reference))
    # A bar update between timed runs costs microseconds, outside the timed calls.
    for round_number in progress.track(range(runs), "benchmark: interleaved runs", unit="round"):
        for which, run in pairs if round_number % 2 == 0 else pairs[::-1]:
            start = time.perf_counter()
            run()
            times[which].append(time.perf_counter() - start)
    latency_ms = statistics.median(times[0]) * 1e3
    reference_latency_ms = statistics.median(times[1]) * 1e3
    shapes = {name: list(array.shape) for name, array in feeds.items()}
    return BenchResult(
        latency_ms=latency_ms,
        reference_latency_ms=reference_latency_ms,
        speedup=reference_latency_ms / latency_ms,
        flops=count_flops(proto, shapes),
        reference_flops=count_flops(reference_proto, shapes),
        providers=session.get_providers(),
        batch=len(next(iter(feeds.values()))) if feeds else batch,
        runs=runs,
    )


def model_outputs(model: onnx.ModelProto, dataset: Any, provider: str, progress: ProgressLike = None,
             description: str = "evaluate") -> np.ndarray:
    """``model``'s first output on every row of ``dataset``, in onnxruntime."""
    from .sessions import make_session, run_dataset, select_providers

    session = make_session(model, providers=select_providers(provider))
    return run_dataset(session, dataset, progress=progress, description=description)


def model_predictions(model: onnx.ModelProto, dataset: Any, provider: str, progress: ProgressLike = None,
                 description: str = "evaluate") -> np.ndarray:
    """``model``'s per-sample predictions on ``dataset`` (:meth:`Dataset.predictions`), in onnxruntime."""
    return dataset.predictions(model_outputs(model, dataset, provider, progress, description))


def model_metric(model: onnx.ModelProto, dataset: Any, provider: str, progress: ProgressLike = None,
            description: str = "evaluate") -> float:
    return dataset.score(model_outputs(model, dataset, provider, progress, description))
