"""onnxruntime sessions: providers (checked, not assumed), sessions, running a dataset, random feeds.

Provider reporting always comes from ``session.get_providers()``: onnxruntime-gpu
lists CUDA as *available* even where it cannot load it, and then silently runs
on CPU.
"""

from __future__ import annotations

import functools
import os
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import onnxruntime as ort

from ..data import OUTPUTS, Dataset, cut_tokens, graph_inputs, same_outputs, token_inputs_cuttable
from ..errors import OnnxlrfError, first_line
from ..onnx_io import fits_one_message, save_onnx
from ..progress import ProgressLike, as_progress
from .shapes import (
    DEFAULT_SEQ_LENGTH,
    ModelLike,
    concrete_input_shapes,
)

CPU = "CPUExecutionProvider"


CUDA = "CUDAExecutionProvider"


PROVIDER_CHOICES = ("auto", "cuda", "cpu")


# Random token ids stay below this, which every vocabulary of interest exceeds.
RANDOM_TOKEN_LIMIT = 1000


# onnxruntime's default logger level (warning), restored after the CUDA probe.
_ORT_DEFAULT_LOG_SEVERITY = 2


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
        if fits_one_message(model):
            return ort.InferenceSession(model.SerializeToString(), options, providers=providers)
        with tempfile.TemporaryDirectory(prefix="onnxlrf-session-") as tmp:
            path = save_onnx(model, Path(tmp) / "model.onnx", external_data=True)
            return ort.InferenceSession(str(path), options, providers=providers)
    except OnnxlrfError:
        raise
    except Exception as exc:  # onnxruntime raises Fail/InvalidGraph/... with multi-line text
        raise OnnxlrfError(f"onnxruntime cannot load the model: {first_line(exc)}") from None


def optimized_op_counts(model: ModelLike, providers: list[str] | None = None) -> dict[str, int]:
    """How many nodes of each op type the graph onnxruntime runs has, after its optimizations (the session
    writes it to ``SessionOptions.optimized_model_filepath``): e.g. whether Q/DQ became integer kernels."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = 1
    with tempfile.TemporaryDirectory(prefix="onnxlrf-optimized-") as tmp:
        source = model
        if isinstance(model, onnx.ModelProto):
            source = save_onnx(model, Path(tmp) / "model.onnx")
        options.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        try:
            ort.InferenceSession(str(source), options, providers=providers or [CPU])
        except Exception as exc:  # onnxruntime raises Fail/InvalidGraph/... with multi-line text
            raise OnnxlrfError(f"onnxruntime cannot load the model: {first_line(exc)}") from None
        optimized = onnx.load(options.optimized_model_filepath, load_external_data=False)
    counts: dict[str, int] = {}
    for node in optimized.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def _static_batch(session: ort.InferenceSession) -> int | None:
    dims = session.get_inputs()[0].shape
    return dims[0] if dims and isinstance(dims[0], int) and dims[0] > 0 else None


# onnxruntime's names of the floating-point tensor types: the outputs label-free data is scored on.
FLOAT_TYPES = ("tensor(float)", "tensor(double)", "tensor(float16)", "tensor(bfloat16)")


def run_dataset(session: ort.InferenceSession, dataset: Dataset, batch_size: int = 128,
                progress: ProgressLike = None, description: str = "inference") -> np.ndarray:
    """The session's first output for every row of ``dataset``, in order; for label-free data
    (task ``outputs``) all its float outputs, each flattened per row, side by side (float32).

    A model with a static batch size B is run B rows at a time, the last batch
    padded by repeating its last row (the padding's outputs are dropped).
    """
    if dataset.task == OUTPUTS:
        return np.concatenate(run_float_outputs(session, dataset, batch_size, progress, description), axis=1)
    return _run_rows(session, dataset, [session.get_outputs()[0].name], batch_size, progress, description)[0]


def run_float_outputs(session: ort.InferenceSession, dataset: Dataset, batch_size: int = 128,
                      progress: ProgressLike = None, description: str = "inference") -> list[np.ndarray]:
    """Each float output of the session on every row of ``dataset``, flattened per row: (rows, width) float32.

    Every such output must have a row axis first (one row per input row): a per-sample distance needs one.
    """
    names = [output.name for output in session.get_outputs() if output.type in FLOAT_TYPES]
    if not names:
        raise OnnxlrfError("the model has no floating-point output to compare with the original's")
    outputs = _run_rows(session, dataset, names, batch_size, progress, description)
    return [array.reshape(len(array), -1).astype(np.float32, copy=False) for array in outputs]


def _run_rows(session: ort.InferenceSession, dataset: Dataset, names: list[str], batch_size: int,
              progress: ProgressLike, description: str) -> list[np.ndarray]:
    """The outputs ``names`` for every row of ``dataset`` (see :func:`run_dataset`), each with rows first.

    Token data whose rows end in padding (see :func:`_token_lengths`) runs in order of length,
    each batch cut on axis 1 after its longest row's last real token; the outputs come back in
    row order. Cutting drops only columns that are padding in every row of the batch, and is kept
    only if the first (shortest) batch, run both cut and at full width, gives outputs of the same
    shapes and values (see :func:`~onnxlrf.data.same_outputs`): a token-level output
    (``last_hidden_state``) or a model that reads the padding runs every batch at full width.
    """
    static_batch = _static_batch(session)
    batch_size = static_batch or batch_size
    inputs = [i.name for i in session.get_inputs()]
    lengths = _token_lengths(session, dataset)
    order = None if lengths is None else np.argsort(lengths, kind="stable")
    cut = lengths is not None  # until the first batch that can be cut says otherwise
    checked = False
    outputs: list[list[np.ndarray]] = [[] for _ in names]
    n_batches = -(-dataset.rows // batch_size)  # rows: two per sentence pair
    starts = range(0, dataset.rows, batch_size)
    for start in as_progress(progress).track(starts, description, n_batches, "batch"):
        rows_at = slice(start, start + batch_size) if order is None else order[start:start + batch_size]
        feed = {name: dataset.inputs[name][rows_at] for name in inputs}
        rows = len(next(iter(feed.values())))
        fed = rows
        if static_batch and rows < static_batch:
            feed = {n: np.concatenate([a, np.repeat(a[-1:], static_batch - rows, axis=0)]) for n, a in feed.items()}
            fed = static_batch
        width = int(lengths[rows_at].max()) if cut else 0
        if cut and width < feed[inputs[0]].shape[1]:
            values = run_session(session, names, cut_tokens(feed, width))
            if not checked:
                full = run_session(session, names, feed)
                cut, checked = same_outputs(values, full), True
                values = full
        else:
            values = run_session(session, names, feed)
        for name, collected, value in zip(names, outputs, values):
            if np.ndim(value) == 0 or len(value) != fed:
                raise OnnxlrfError(f"output {name!r} has shape {list(np.shape(value))} for {fed} input rows: "
                                   f"its first axis is not one row per input row")
            collected.append(value[:rows])
    results = [np.concatenate(collected) for collected in outputs]
    if order is None:
        return results
    back = np.argsort(order)
    return [array[back] for array in results]


def _token_lengths(session: ort.InferenceSession, dataset: Dataset) -> np.ndarray | None:
    """:meth:`Dataset.token_lengths`, where the session may run them cut
    (:func:`~onnxlrf.data.token_inputs_cuttable` on its inputs); None otherwise."""
    if not token_inputs_cuttable(dataset, {inp.name: inp.shape or [] for inp in session.get_inputs()}):
        return None
    return dataset.token_lengths()


def run_session(session: ort.InferenceSession, outputs: list[str] | None, feeds: dict[str, np.ndarray]) -> list:
    """``session.run``, with onnxruntime's failure (a node that cannot run these inputs) as one line naming it."""
    try:
        return session.run(outputs, feeds)
    except Exception as exc:  # onnxruntime raises Fail/InvalidArgument/RuntimeException with multi-line text
        raise OnnxlrfError(f"onnxruntime cannot run the model: {first_line(exc)}") from None



def random_feeds(
    model: onnx.ModelProto, batch: int = 1, seq_length: int = DEFAULT_SEQ_LENGTH, seed: int = 0
) -> dict[str, np.ndarray]:
    """Inputs of :func:`concrete_input_shapes`: standard normal floats; for integer inputs token ids
    in [0, 1000), all-ones attention masks and zero token type ids."""
    rng = np.random.default_rng(seed)
    shapes = concrete_input_shapes(model, batch, seq_length)
    _check_memory(model, shapes, batch)
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


def _check_memory(model: onnx.ModelProto, shapes: dict[str, list[int]], batch: int) -> None:
    """Refuse feeds that would take more than half of the memory free now (a batch of a million images)."""
    needed = sum(int(np.prod(shapes[inp.name], dtype=np.float64)) *
                 np.dtype(onnx.helper.tensor_dtype_to_np_dtype(inp.type.tensor_type.elem_type)).itemsize
                 for inp in graph_inputs(model))
    try:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # not on this platform: nothing to compare with
        return
    if needed > free / 2:
        raise OnnxlrfError(f"the inputs at batch {batch} need {needed / 2**30:.1f} GiB, more than half of the "
                           f"{free / 2**30:.1f} GiB of memory free: use a smaller --batch")


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
