"""The joint analysis of a model on its calibration split, with calibration micro-batches and a disk cache.

:func:`joint_analysis` runs :func:`~onnxlrf.measure.sensitivity.analyze` and
:func:`~onnxlrf.measure.sensitivity.measure_ranges` (or reads a cached result keyed by
:func:`analysis_key`).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import onnx

from ..data import cut_tokens, graph_inputs, same_outputs, token_inputs_cuttable
from ..errors import OnnxlrfError
from ..onnx_io import atomic_path
from ..progress import Progress, ProgressLike, as_progress

# Range checks rerun most of the network per layer and level, on the heap that
# torch_graph.heap_reuse keeps, where larger batches run convs faster per sample
# (ResNeXt-50, 32 images: 1.9 s in batches of 5, 1.6 s in batches of 16 or 32).
# This bound gives it batches of 20 (largest activation 3.2 MB per image).
RANGE_BATCH_BYTES = 64 << 20
# The gradient pass keeps a micro-batch's whole forward pass for its backward pass: at 50 STS-B
# pairs (100 sentences of 46 tokens) a BERT-base-sized encoder's values take 8.6 GiB (177 MiB per
# pair). This bound keeps them within 3 GiB (17 pairs there); it leaves the shared models at 50
# samples (CIFAR ResNet-56: 5 MiB of values per image, MiniLM: 47 MiB per pair).
ANALYSIS_BATCH_BYTES = 3 << 30
# Memory the analysis takes per byte of the values a forward pass computes (see samples_in_memory).
ANALYSIS_MEMORY_PER_VALUE_BYTE = 3


@dataclass(frozen=True)
class AnalysisOptions:
    """How the joint analysis runs (``onnxlrf compress``'s analysis flags).

    ``labels``: the loss's targets (:data:`LABEL_CHOICES`): the data's ``labels``, the original's
    ``predictions`` (label-free), or the original's ``outputs`` (label-free, any task: the loss is the
    distance to them); None: ``labels``, or ``outputs`` for data without labels (:func:`default_labels`);
    ``range_samples``: calibration samples of the range checks; ``micro_batch``:
    samples per gradient; ``spatial``: k x k convs analyzed in spatial decomposition too (None:
    for flops and latency targets); ``cache``: a directory of cached analyses (see :func:`joint_analysis`);
    ``first_order``: the loss gradient's first-order terms enter the predictions (default False: the
    curvature term alone, as for label-free targets, whose gradient is zero; with them, lossless 20%
    on the CIFAR ResNets lost 3 to 23 points of held-out top-1 instead of 0.6 to 1.3, split seeds 1-3).
    """

    labels: str | None = None
    range_samples: int = 256
    micro_batch: int = 50
    spatial: bool | None = None
    cache: str | os.PathLike | None = None
    first_order: bool = False


LABEL_CHOICES = ("labels", "predictions", "outputs")


def default_labels(dataset: Any) -> str:
    """``--labels`` where none is given: ``outputs`` for data without labels (a task onnxlrf does not know),
    else ``labels``."""
    from ..data import OUTPUTS

    return "outputs" if dataset.task == OUTPUTS else "labels"


class CalibrationBatches:
    """Micro-batches (feeds, targets) for the torch analysis: call it for a fresh iterator; ``len()`` counts them.

    ``lengths`` (per sample, :func:`token_cut_lengths`): the samples run in order of length, each batch cut
    after its longest sample's last real token. Every statistic the analysis takes is a sum over samples (and
    over real tokens), so the order does not change it; the padding it leaves out is compute saved (STS-B's
    test set: real tokens are 31% of the positions padded to its longest sentence, 33% in length-sorted
    batches of 128 rows).
    """

    def __init__(self, dataset: Any, targets: np.ndarray, batch_size: int, lengths: np.ndarray | None = None) -> None:
        self.dataset, self.targets, self.batch_size, self.lengths = dataset, targets, batch_size, lengths

    def __len__(self) -> int:
        return -(-len(self.dataset) // self.batch_size)

    def __call__(self) -> Iterator:
        order = np.arange(len(self.dataset)) if self.lengths is None else np.argsort(self.lengths, kind="stable")
        for start in range(0, len(self.dataset), self.batch_size):
            idx = order[start:start + self.batch_size]
            feeds = self.dataset.subset(idx).inputs
            if self.lengths is not None:
                feeds = cut_tokens(feeds, int(self.lengths[idx].max()))
            yield feeds, self.targets[idx]


# Samples of the check that a model's outputs are the same on token batches cut after their last real token.
CUT_CHECK_SAMPLES = 4


def token_cut_lengths(reference: onnx.ModelProto, dataset: Any) -> np.ndarray | None:
    """Per sample, the length the analysis' micro-batches of ``dataset`` may be cut to
    (:meth:`~onnxlrf.data.Dataset.sample_token_lengths`); None where they may not: no token mask, no padding,
    graph inputs that may not be cut (:func:`~onnxlrf.data.token_inputs_cuttable`), or outputs that differ on the shortest samples run cut and at full width (a token-level output, a model
    that reads the padding)."""
    import torch

    from .torch_graph import TorchGraph

    lengths = dataset.sample_token_lengths()
    dims = {inp.name: [dim.dim_value if dim.HasField("dim_value") else dim.dim_param
                       for dim in inp.type.tensor_type.shape.dim] for inp in graph_inputs(reference)}
    if lengths is None or not token_inputs_cuttable(dataset, dims):
        return None
    shortest = np.argsort(lengths, kind="stable")[:CUT_CHECK_SAMPLES]
    feeds = dataset.subset(shortest).inputs
    graph = TorchGraph(reference)
    with torch.no_grad():
        try:
            cut = graph(cut_tokens(feeds, int(lengths[shortest].max())))
        except (RuntimeError, OnnxlrfError):  # a shape fixed at the padded width (a Reshape to a constant)
            return None
        full = graph(feeds)
    agree = same_outputs([value.numpy() for value in cut], [value.numpy() for value in full])
    return lengths if agree else None


def range_batch_size(reference: onnx.ModelProto, dataset: Any, limit: int = 128) -> int:
    """Samples per range-check batch: as many as keep its largest activation within ``RANGE_BATCH_BYTES``
    (and one where the graph runs one sample at a time, see :func:`samples_per_run`)."""
    from .torch_graph import TorchGraph

    largest, _ = TorchGraph(reference).value_bytes(dataset.subset(np.arange(1)).inputs)
    return int(np.clip(RANGE_BATCH_BYTES // max(largest, 1), 1, samples_per_run(reference, dataset, limit)))


def samples_per_run(reference: onnx.ModelProto, dataset: Any, wanted: int) -> int:
    """``wanted``, or 1 where ``reference`` cannot run several samples at once in torch.

    A graph declared for a fixed batch may still hold the batch as a constant: a detector exported
    for one image takes the first image of its input (a Gather at 0) and gives one image's
    outputs for a batch of any size. Such a graph is tried on two samples; where that fails or
    does not give two rows per output, it runs one sample at a time.
    """
    from .torch_graph import TorchGraph

    inputs = graph_inputs(reference)
    dims = inputs[0].type.tensor_type.shape.dim if inputs else []
    if wanted <= 1 or len(dataset) < 2 or not dims or not dims[0].HasField("dim_value"):
        return wanted  # a symbolic batch axis: the exporter traced the batch as a variable
    pair = dataset.subset(np.arange(2))
    try:
        import torch

        with torch.no_grad():
            outputs = TorchGraph(reference)(pair.inputs)
    except RuntimeError:  # a shape fixed at the traced batch (a Reshape to a constant shape)
        return 1
    return wanted if all(output.dim() > 0 and output.shape[0] == pair.rows for output in outputs) else 1


def samples_in_memory(reference: onnx.ModelProto, dataset: Any, wanted: int) -> int:
    """``wanted``, or fewer: as many samples as keep a micro-batch of the analysis, with the Kronecker
    factors of the layers it covers, within half of the memory free now; at least one.

    The analysis keeps every value for the backward pass, their gradients and the layers' unfolded
    inputs: a micro-batch is given 3 times the values its forward pass computes (FCN-ResNet50 at
    224 x 224: 0.24 GiB per image).
    """
    from ..graph.layers import find_layers
    from .sensitivity import covered_layers, factors_in_memory, free_memory
    from .torch_graph import TorchGraph

    _, total = TorchGraph(reference).value_bytes(dataset.subset(np.arange(1)).inputs)
    per_sample = ANALYSIS_MEMORY_PER_VALUE_BYTE * total
    budget = free_memory() / 2
    budget -= factors_in_memory(covered_layers(find_layers(reference)[0]), budget)[1]
    return int(np.clip(budget // max(per_sample, 1), 1, wanted))


def analysis_batch_size(reference: onnx.ModelProto, dataset: Any, limit: int) -> int:
    """Samples per gradient micro-batch: at most ``limit``, and as many as keep one forward pass's
    values within ``ANALYSIS_BATCH_BYTES``."""
    from .torch_graph import TorchGraph

    _, total = TorchGraph(reference).value_bytes(dataset.subset(np.arange(1)).inputs)
    return int(np.clip(ANALYSIS_BATCH_BYTES // max(total, 1), 1, limit))


def calibration_batches(dataset: Any, targets: np.ndarray, batch_size: int,
                        reference: onnx.ModelProto | None = None) -> CalibrationBatches:
    """Micro-batches (feeds, targets) for the torch analysis; with ``reference``, token data runs in
    length-sorted batches cut after their last real token where that model allows it
    (:func:`token_cut_lengths`)."""
    lengths = None if reference is None else token_cut_lengths(reference, dataset)
    return CalibrationBatches(dataset, targets, batch_size, lengths)


def analysis_key(reference: onnx.ModelProto, calib: Any, labels: str, range_samples: int, micro_batch: int,
                 spatial: bool, first_order: bool = False) -> str:
    """A hash of everything the joint analysis depends on: the model's graph and weights, the
    calibration samples and labels, the options, and the versions of the analysis and of torch."""
    import torch

    from .. import __version__
    from .sensitivity import ANALYSIS_VERSION

    digest = hashlib.sha256()
    graph = reference.graph
    # Part by part: a whole model over 2 GB does not serialize at once.
    for part in [*reference.opset_import, *graph.input, *graph.output, *graph.node, *graph.initializer]:
        digest.update(part.SerializeToString())
    for name, array in [*sorted(calib.inputs.items()), ("labels", calib.labels)]:
        array = np.ascontiguousarray(array)
        digest.update(f"{name} {array.dtype} {array.shape}".encode())
        digest.update(array.tobytes())
    digest.update(repr((calib.task, calib.token_mask, labels, range_samples, micro_batch, bool(spatial),
                        bool(first_order), ANALYSIS_VERSION, __version__, torch.__version__)).encode())
    return digest.hexdigest()


def analysis_cache_dir(cache: str | os.PathLike) -> Path:
    """``cache`` as a directory, made if needed; checked before the work it would keep."""
    try:
        Path(cache).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OnnxlrfError(f"cannot make the analysis cache directory {cache}: {exc.strerror or exc}") from None
    return Path(cache)


def joint_analysis(reference: onnx.ModelProto, calib: Any, options: AnalysisOptions = AnalysisOptions(),
                   progress: ProgressLike = None) -> Any:
    """Sensitivity of every layer on the calibration split, with measured perturbation ranges.

    ``options.spatial``: k x k convs are analyzed in spatial decomposition too (see
    :func:`~onnxlrf.measure.sensitivity.analyze`), and their spatial truncations range-checked.
    ``options.cache``: a directory where analyses are kept, one file per :func:`analysis_key`; an
    analysis already there for this model, calibration split and options is read instead of
    computed (the same object, so the same plans), and a new one is saved there.
    ``options.labels`` ``outputs``: the loss is the distance to the original's outputs: for
    label-free data, those it carries (``calib.labels``, else ``reference``'s); for labelled data,
    ``reference``'s.
    """
    from ..data import OUTPUTS
    from .sensitivity import Sensitivity

    progress = as_progress(progress)
    labels = options.labels or default_labels(calib)
    range_samples, micro_batch = options.range_samples, options.micro_batch
    spatial, cache, first_order = bool(options.spatial), options.cache, options.first_order
    if labels not in LABEL_CHOICES:
        raise OnnxlrfError(f"--labels must be one of {', '.join(LABEL_CHOICES)}, got {labels!r}")
    if calib.task == OUTPUTS and labels != "outputs":
        raise OnnxlrfError(f"--labels {labels} needs labelled data; data without labels has the loss "
                           f"--labels outputs (the distance to the original's outputs)")
    if cache is None:
        return _analyze(reference, calib, labels, range_samples, micro_batch, progress, spatial, first_order)
    key = analysis_key(reference, calib, labels, range_samples, micro_batch, spatial, first_order)
    path = analysis_cache_dir(cache) / f"{key[:32]}.npz"
    if path.is_file():
        try:
            sensitivity, saved_key = Sensitivity.load(path)
        except OnnxlrfError as exc:  # a cache entry is disposable: analyze again
            progress.log(f"analysis: {exc}; analyzing again")
        else:
            if saved_key == key:
                progress.log(f"analysis: read from the cache, {path} (the same model, calibration split "
                             f"and options)")
                return sensitivity
    sensitivity = _analyze(reference, calib, labels, range_samples, micro_batch, progress, spatial, first_order)
    try:
        with atomic_path(path, ".npz") as tmp:
            sensitivity.save(tmp, key)
    except OnnxlrfError as exc:  # the analysis is done; a cache that cannot take it costs only reuse
        progress.log(f"analysis: not cached: {exc}")
    else:
        progress.log(f"analysis: saved to the cache, {path} ({path.stat().st_size / 2**20:.1f} MiB)")
    return sensitivity


def _analyze(reference: onnx.ModelProto, calib: Any, labels: str, range_samples: int, micro_batch: int,
             progress: Progress, spatial: bool, first_order: bool = False) -> Any:
    """:func:`joint_analysis` without the cache."""
    from .sensitivity import (
        CURVATURES,
        LOSSES,
        analyze,
        measure_ranges,
        output_distance_curvature,
        output_distance_loss,
    )

    loss_name = f"{calib.task}/{labels}"
    loss_fn, curvature_fn = LOSSES.get(calib.task), CURVATURES.get(calib.task)
    targets = calib.labels
    if labels == "outputs":
        from ..data import OUTPUTS
        from ..runtime.evaluate import with_original_outputs

        # Sentence pairs become one sample per sentence: the outputs of each row are compared.
        calib = with_original_outputs(calib if calib.task == OUTPUTS else calib.label_free(), reference, "cpu",
                                      progress)
        targets = calib.labels
        loss_fn = output_distance_loss(calib.output_scales)
        curvature_fn = output_distance_curvature(calib.output_scales)
    elif labels == "predictions":
        from ..data import cosine_rows
        from ..runtime.sessions import make_session, run_dataset

        outputs = run_dataset(make_session(reference, providers=["CPUExecutionProvider"]), calib,
                              progress=progress, description="label-free targets: the original's predictions")
        if calib.task == "classification":
            # The original's hard predictions: a distillation loss would have zero gradient here.
            targets = outputs.reshape(len(outputs), -1).argmax(axis=1)
        else:
            # The original's own similarity (on the gold 0-5 scale): zero gradient, so the plan
            # rests on the Gauss-Newton curvature alone, with no calibration noise to fit.
            targets = (5.0 * cosine_rows(outputs[:len(calib)], outputs[len(calib):])).astype(np.float32)
    batchable = samples_per_run(reference, calib, analysis_batch_size(reference, calib, micro_batch))
    micro_batch = samples_in_memory(reference, calib, batchable)
    if micro_batch < min(batchable, len(calib)):
        progress.log(f"analysis: micro-batches of {micro_batch} samples, to stay within half of the memory free")
    lengths = token_cut_lengths(reference, calib)  # one check for the gradient pass and the range checks
    sensitivity = analyze(reference, CalibrationBatches(calib, targets, micro_batch, lengths), loss_fn,
                          loss_name=loss_name, progress=progress,
                          curvature_fn=curvature_fn, token_mask=calib.token_mask, spatial=spatial,
                          first_order=first_order)
    n_range = min(range_samples, len(calib))
    measure_ranges(reference, sensitivity,
                   CalibrationBatches(calib.subset(np.arange(n_range)), targets[:n_range],
                                      range_batch_size(reference, calib),
                                      None if lengths is None else lengths[:n_range]),
                   loss_fn, progress=progress)
    return sensitivity
