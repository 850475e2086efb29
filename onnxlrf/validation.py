"""Running models in onnxruntime: sessions, accuracy and fidelity, FLOPs, latency.

Provider reporting always comes from ``session.get_providers()``: onnxruntime-gpu
lists CUDA as *available* even where it cannot load it, and then silently runs
on CPU.
"""

from __future__ import annotations

import functools
import os
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import onnxruntime as ort

from .data import CLASSIFICATION, Dataset, check_fits, cosine_rows, graph_inputs
from .errors import OnnxlrfError
from .onnx_io import load_onnx, save_onnx
from .planning import count_params
from .progress import ProgressLike, as_progress

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
PROVIDER_CHOICES = ("auto", "cuda", "cpu")

# protobuf cannot serialize 2 GiB or more in one message; bigger models go through a file.
_PROTOBUF_LIMIT = 2**31 - 1
# Symbolic dims other than the batch axis (sequence length) become this in random feeds and FLOP counts.
DEFAULT_SEQ_LENGTH = 128
# Random token ids stay below this, which every vocabulary of interest exceeds.
RANDOM_TOKEN_LIMIT = 1000
# onnxruntime's default logger level (warning), restored after the CUDA probe.
_ORT_DEFAULT_LOG_SEVERITY = 2

ModelLike = onnx.ModelProto | str | os.PathLike

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


@functools.lru_cache(maxsize=1)
def cuda_works() -> bool:
    """Whether a session on CUDAExecutionProvider really gets CUDA (not a silent CPU fallback)."""
    if CUDA not in ort.get_available_providers():
        return False
    probe = onnx.helper.make_model(
        onnx.helper.make_graph(
            [onnx.helper.make_node("Identity", ["x"], ["y"])],
            "cuda_probe",
            [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
            [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])],
        ),
        opset_imports=[onnx.helper.make_opsetid("", 13)],
        ir_version=7,
    )
    # A failed CUDA load logs a multi-line error through the default logger; the answer is enough.
    ort.set_default_logger_severity(4)
    try:
        session = ort.InferenceSession(probe.SerializeToString(), providers=[CUDA, CPU])
        return CUDA in session.get_providers()
    except Exception:  # any failure to set CUDA up means "no CUDA"
        return False
    finally:
        ort.set_default_logger_severity(_ORT_DEFAULT_LOG_SEVERITY)


def select_providers(provider: str = "auto") -> list[str]:
    """Execution providers for ``provider``: 'auto' (CUDA if it really works, else CPU), 'cuda' or 'cpu'."""
    if provider == "cpu":
        return [CPU]
    if provider == "cuda":
        if not cuda_works():
            raise OnnxlrfError("provider cuda requested, but onnxruntime cannot run on CUDA here (use --provider cpu)")
        return [CUDA, CPU]
    if provider == "auto":
        return [CUDA, CPU] if cuda_works() else [CPU]
    raise OnnxlrfError(f"unknown provider {provider!r}; known: {', '.join(PROVIDER_CHOICES)}")


def make_session(
    model: ModelLike, providers: list[str] | None = None, threads: int | None = None
) -> ort.InferenceSession:
    """An onnxruntime session (default graph optimizations, ``threads`` intra-op threads, no spinning)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or min(2, os.cpu_count() or 1)
    options.inter_op_num_threads = 1
    # Spinning threads burn CPU between runs and distort timings on a shared machine.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3
    providers = providers or select_providers("auto")
    try:
        if not isinstance(model, onnx.ModelProto):
            if not Path(model).is_file():
                raise OnnxlrfError(f"file not found: {model}")
            return ort.InferenceSession(str(model), options, providers=providers)
        if model.ByteSize() < _PROTOBUF_LIMIT:
            return ort.InferenceSession(model.SerializeToString(), options, providers=providers)
        with tempfile.TemporaryDirectory(prefix="onnxlrf-session-") as tmp:
            path = save_onnx(model, Path(tmp) / "model.onnx", external_data=True)
            return ort.InferenceSession(str(path), options, providers=providers)
    except OnnxlrfError:
        raise
    except Exception as exc:  # onnxruntime raises Fail/InvalidGraph/... with multi-line text
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise OnnxlrfError(f"onnxruntime cannot load the model: {first_line}") from None


def _static_batch(session: ort.InferenceSession) -> int | None:
    dims = session.get_inputs()[0].shape
    return dims[0] if dims and isinstance(dims[0], int) and dims[0] > 0 else None


def run_dataset(session: ort.InferenceSession, dataset: Dataset, batch_size: int = 128,
                progress: ProgressLike = None, description: str = "inference") -> np.ndarray:
    """The session's first output for every row of ``dataset``, in order.

    A model with a static batch size B is run B rows at a time, the last batch
    padded by repeating its last row (the padding's outputs are dropped).
    """
    static_batch = _static_batch(session)
    batch_size = static_batch or batch_size
    names = [i.name for i in session.get_inputs()]
    first_output = session.get_outputs()[0].name
    outputs = []
    n_batches = -(-dataset.rows // batch_size)  # rows: two per sentence pair
    for feed in as_progress(progress).track(dataset.batches(batch_size), description, n_batches, "batch"):
        feed = {name: feed[name] for name in names}
        rows = len(next(iter(feed.values())))
        if static_batch and rows < static_batch:
            feed = {n: np.concatenate([a, np.repeat(a[-1:], static_batch - rows, axis=0)]) for n, a in feed.items()}
        outputs.append(session.run([first_output], feed)[0][:rows])
    return np.concatenate(outputs)


def concrete_input_shapes(
    model: onnx.ModelProto, batch: int = 1, seq_length: int = DEFAULT_SEQ_LENGTH
) -> dict[str, list[int]]:
    """Graph input shapes with static dims kept, symbolic axis 0 -> ``batch``, other symbolic dims -> ``seq_length``."""
    shapes = {}
    for inp in graph_inputs(model):
        dims = inp.type.tensor_type.shape.dim
        shapes[inp.name] = [
            d.dim_value if d.HasField("dim_value") else (batch if axis == 0 else seq_length)
            for axis, d in enumerate(dims)
        ]
    return shapes


def _with_input_shapes(model: onnx.ModelProto, input_shapes: dict[str, list[int]]) -> onnx.ModelProto:
    """A copy whose graph inputs have ``input_shapes`` and no stale inferred shapes."""
    concrete = onnx.ModelProto()
    concrete.CopyFrom(model)
    del concrete.graph.value_info[:]
    for value in concrete.graph.output:  # symbolic output shapes could contradict the concrete ones
        value.type.tensor_type.ClearField("shape")
    for inp in graph_inputs(concrete):
        if inp.name in input_shapes:
            shape = inp.type.tensor_type.shape
            shape.ClearField("dim")
            for size in input_shapes[inp.name]:
                shape.dim.add().dim_value = int(size)
    return concrete


def _onnx_inference(model: onnx.ModelProto) -> onnx.ModelProto:
    if model.ByteSize() < _PROTOBUF_LIMIT:
        return onnx.shape_inference.infer_shapes(model, data_prop=True)
    with tempfile.TemporaryDirectory(prefix="onnxlrf-shapes-") as tmp:
        path = save_onnx(model, Path(tmp) / "model.onnx", external_data=True)
        onnx.shape_inference.infer_shapes_path(str(path), str(path), data_prop=True)
        return onnx.load(str(path), load_external_data=False)


def _symbolic_inference(model: onnx.ModelProto) -> onnx.ModelProto:
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    return SymbolicShapeInference.infer_shapes(model, auto_merge=True)


def _tensor_shapes(model: onnx.ModelProto) -> dict[str, list[int | None]]:
    shapes: dict[str, list[int | None]] = {}
    for value in list(model.graph.input) + list(model.graph.value_info) + list(model.graph.output):
        if value.type.tensor_type.HasField("shape"):
            shapes[value.name] = [
                d.dim_value if d.HasField("dim_value") else None for d in value.type.tensor_type.shape.dim
            ]
    for init in model.graph.initializer:
        shapes[init.name] = list(init.dims)
    for node in model.graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    shapes[node.output[0]] = list(attr.t.dims)
    return shapes


def _contraction_shapes(
    model: onnx.ModelProto, shapes: dict[str, list[int | None]]
) -> list[tuple[onnx.NodeProto, list | None, list | None]]:
    """Per Conv/Gemm/MatMul node: (node, output shape, contracted dims), None where unknown."""
    found = []
    for node in model.graph.node:
        if node.op_type not in ("Conv", "Gemm", "MatMul"):
            continue
        out, a, w = shapes.get(node.output[0]), shapes.get(node.input[0]), shapes.get(node.input[1])
        if node.op_type == "Conv":
            contraction = w[1:] if w else None
        elif node.op_type == "Gemm":
            trans_a = any(attr.name == "transA" and attr.i for attr in node.attribute)
            contraction = [a[0 if trans_a else 1]] if a and len(a) == 2 else None
        else:
            contraction = [a[-1]] if a else None
        found.append((node, out, contraction))
    return found


def _known(out: list | None, contraction: list | None) -> bool:
    return out is not None and contraction is not None and None not in out and None not in contraction


def infer_shapes(
    model: onnx.ModelProto, input_shapes: dict[str, list[int]] | None = None
) -> dict[str, list[int | None]]:
    """Shapes of the graph's tensors (None for unknown dims) with concrete inputs.

    ``input_shapes`` where given, else :func:`concrete_input_shapes` (batch 1,
    sequence length 128). ONNX's own inference loses dims through shape
    arithmetic (e.g. the CIFAR ResNets' zero-padding shortcut); where it leaves a
    Conv/Gemm/MatMul shape unknown, onnxruntime's symbolic inference is tried.
    """
    concrete = _with_input_shapes(model, input_shapes or concrete_input_shapes(model))
    shapes = None
    for infer in (_onnx_inference, _symbolic_inference):
        try:
            shapes = _tensor_shapes(infer(concrete))
        except Exception:  # either engine can fail on unusual graphs; the other may not
            continue
        if all(_known(out, contraction) for _, out, contraction in _contraction_shapes(model, shapes)):
            break
    if shapes is None:
        raise OnnxlrfError("shape inference fails on this model")
    return shapes


def count_flops(model: onnx.ModelProto, input_shapes: dict[str, list[int]] | None = None) -> int:
    """FLOPs (2 x multiply-accumulates) of all Conv, Gemm and MatMul nodes for one run.

    Shapes come from ONNX shape inference on a copy with concrete input shapes:
    ``input_shapes`` where given, else :func:`concrete_input_shapes` (batch 1,
    sequence length 128). Other ops (elementwise, pooling, softmax) are not counted.
    """
    nodes = _contraction_shapes(model, infer_shapes(model, input_shapes))
    macs = 0
    for node, out, contraction in nodes:
        if not _known(out, contraction):
            raise OnnxlrfError(
                f"cannot count FLOPs of {node.op_type} node {node.name!r}: shape inference left its shapes unknown"
            )
        macs += int(np.prod(out, dtype=np.int64)) * int(np.prod(contraction, dtype=np.int64))
    return 2 * macs


def flops_by_node(model: onnx.ModelProto, input_shapes: dict[str, list[int]] | None = None) -> dict[str, int | None]:
    """FLOPs of each Conv/Gemm/MatMul node by node name, as :func:`count_flops` counts them (None: shapes unknown)."""
    return {
        node.name: 2 * int(np.prod(out, dtype=np.int64)) * int(np.prod(contraction, dtype=np.int64))
        if _known(out, contraction) else None
        for node, out, contraction in _contraction_shapes(model, infer_shapes(model, input_shapes))
    }


def file_size(model: ModelLike) -> int:
    """Bytes on disk: the ONNX file plus its external data files; a ModelProto's serialized size."""
    if isinstance(model, onnx.ModelProto):
        return model.ByteSize()
    path = Path(model)
    proto = onnx.load(str(path), load_external_data=False)
    locations = {
        entry.value
        for tensor in onnx.external_data_helper._get_all_tensors(proto)
        if tensor.data_location == onnx.TensorProto.EXTERNAL
        for entry in tensor.external_data
        if entry.key == "location"
    }
    data_files = [path.parent / location for location in locations]
    return path.stat().st_size + sum(f.stat().st_size for f in data_files if f.is_file())


def _as_proto(model: ModelLike) -> onnx.ModelProto:
    return model if isinstance(model, onnx.ModelProto) else load_onnx(model)


def validate(
    model: ModelLike,
    dataset: Dataset,
    reference: ModelLike | None = None,
    batch_size: int = 128,
    provider: str = "auto",
    progress: ProgressLike = None,
) -> ValidationResult:
    """Score ``model`` on ``dataset`` and, with ``reference``, compare the two models' first outputs."""
    providers = select_providers(provider)
    proto = _as_proto(model)
    check_fits(dataset, proto)
    session = make_session(model, providers)
    outputs = run_dataset(session, dataset, batch_size, progress, f"validate on {len(dataset)} samples")
    predictions = dataset.predictions(outputs)
    result = ValidationResult(
        metric=dataset.metric_name,
        value=dataset.score_predictions(predictions),
        reference_value=None,
        params=count_params(proto),
        reference_params=None,
        max_abs_diff=None,
        mean_abs_diff=None,
        cosine=None,
        top1_agreement=None,
        providers=session.get_providers(),
        file_size=file_size(model),
        reference_file_size=None,
        samples=len(dataset),
    )
    if reference is None:
        return result
    reference_proto = _as_proto(reference)
    check_fits(dataset, reference_proto)
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
    result.reference_params = count_params(reference_proto)
    result.max_abs_diff = float(diff.max())
    result.mean_abs_diff = float(diff.mean())
    result.cosine = float(np.mean(cosine_rows(outputs, reference_outputs)))
    if dataset.task == CLASSIFICATION:
        result.top1_agreement = float(np.mean(predictions == reference_predictions))
    result.reference_file_size = file_size(reference)
    return result


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


def random_feeds(
    model: onnx.ModelProto, batch: int = 1, seq_length: int = DEFAULT_SEQ_LENGTH, seed: int = 0
) -> dict[str, np.ndarray]:
    """Inputs of :func:`concrete_input_shapes`: standard normal floats; for integer inputs token ids
    in [0, 1000), all-ones attention masks and zero token type ids."""
    rng = np.random.default_rng(seed)
    shapes = concrete_input_shapes(model, batch, seq_length)
    feeds = {}
    for inp in graph_inputs(model):
        shape = shapes[inp.name]
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(inp.type.tensor_type.elem_type))
        if dtype.kind == "f":
            feeds[inp.name] = rng.standard_normal(shape).astype(dtype)
        elif "mask" in inp.name:
            feeds[inp.name] = np.ones(shape, dtype=dtype)
        elif "type" in inp.name:
            feeds[inp.name] = np.zeros(shape, dtype=dtype)
        elif dtype.kind in "iu":
            feeds[inp.name] = rng.integers(0, RANDOM_TOKEN_LIMIT, size=shape).astype(dtype)
        else:
            raise OnnxlrfError(f"cannot make random data for input {inp.name!r} of type {dtype}; pass feeds")
    return feeds


def make_runner(session: ort.InferenceSession, feeds: dict[str, np.ndarray],
                io_binding: bool = False) -> Callable[[], None]:
    """A function running ``session`` once on ``feeds`` (its inputs), for timing.

    With ``io_binding`` the inputs are copied to the session's device (CUDA or
    CPU) once and the outputs stay there, so a timed run excludes host<->device
    copies; each run ends with a synchronization of the outputs.
    """
    feeds = {i.name: feeds[i.name] for i in session.get_inputs()}
    if not io_binding:
        return lambda: session.run(None, feeds)
    return _BoundRunner(session, feeds, "cuda" if session.get_providers()[0] == CUDA else "cpu")


class _BoundRunner:
    """Runs a session on inputs copied to ``device`` once; outputs are allocated there."""

    def __init__(self, session: ort.InferenceSession, feeds: dict[str, np.ndarray], device: str) -> None:
        self.session = session
        self.binding = session.io_binding()
        # The binding does not own its OrtValues: they live as long as this runner.
        self.inputs = {name: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array), device, 0)
                       for name, array in feeds.items()}
        for name, value in self.inputs.items():
            self.binding.bind_ortvalue_input(name, value)
        for output in session.get_outputs():
            self.binding.bind_output(output.name, device)

    def __call__(self) -> None:
        self.session.run_with_iobinding(self.binding)
        self.binding.synchronize_outputs()


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
    proto, reference_proto = _as_proto(model), _as_proto(reference)
    feeds = feeds if feeds is not None else random_feeds(proto, batch)
    session = make_session(model, providers, threads)
    reference_session = make_session(reference, providers, threads)
    model_feeds = {i.name: feeds[i.name] for i in session.get_inputs() if i.name in feeds}
    reference_feeds = {i.name: feeds[i.name] for i in reference_session.get_inputs() if i.name in feeds}
    for name, sess, sess_feeds in (("model", session, model_feeds), ("reference", reference_session, reference_feeds)):
        missing = [i.name for i in sess.get_inputs() if i.name not in sess_feeds]
        if missing:
            raise OnnxlrfError(f"feeds lack input(s) {', '.join(missing)} of the {name}")
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
