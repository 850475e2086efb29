"""Reading and writing ONNX files safely.

Every reader turns a bad file into one :class:`OnnxlrfError` line, and every
writer goes through a temporary file in the destination directory and an
atomic rename, so an interrupted run never leaves a half-written output nor
destroys an existing one.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator

import onnx

from .errors import OnnxlrfError

# protobuf cannot serialize a single message of 2 GiB or more.
_PROTOBUF_LIMIT = 2**31 - 1


def load_onnx(path: str | os.PathLike, load_external_data: bool = True) -> onnx.ModelProto:
    """Load an ONNX model with its external data, or raise a one-line error."""
    path = Path(path)
    if not path.exists():
        raise OnnxlrfError(f"file not found: {path}")
    if path.is_dir():
        raise OnnxlrfError(f"expected an ONNX file, got a directory: {path}")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf raises DecodeError and friends
        raise OnnxlrfError(f"not a valid ONNX file: {path} ({type(exc).__name__})") from None
    if not model.graph.node and not model.graph.output:
        raise OnnxlrfError(f"not a valid ONNX file (empty graph): {path}")
    if load_external_data:
        base = path.parent
        for tensor in _external_tensors(model):
            location = {e.key: e.value for e in tensor.external_data}.get("location", "")
            if not (base / location).is_file():
                raise OnnxlrfError(
                    f"external data of tensor {tensor.name!r} not found: {base / location}"
                )
        try:
            onnx.load_external_data_for_model(model, str(base))
        except Exception as exc:
            raise OnnxlrfError(f"cannot read external data of {path}: {exc}") from None
    return model


def _external_tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    for tensor in onnx.external_data_helper._get_all_tensors(model):
        if tensor.HasField("data_location") and tensor.data_location == onnx.TensorProto.EXTERNAL:
            yield tensor


def check_output_path(output: str | os.PathLike, inputs: tuple = (), overwrite: bool = False) -> Path:
    """Refuse an output path that is an input, or that exists without ``overwrite``."""
    output = Path(output)
    for inp in inputs:
        if inp is not None and Path(inp).exists() and output.exists() and os.path.samefile(inp, output):
            raise OnnxlrfError(f"output path is the same as input path: {output}")
        if inp is not None and Path(inp).resolve() == output.resolve():
            raise OnnxlrfError(f"output path is the same as input path: {output}")
    if output.exists() and not overwrite:
        raise OnnxlrfError(f"output exists: {output} (pass --overwrite to replace it)")
    if not output.parent.exists():
        raise OnnxlrfError(f"output directory does not exist: {output.parent}")
    return output


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` on success."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix or ".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # mkstemp creates 0600; give the output the permissions a plain open() would.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_path, 0o666 & ~umask)
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def save_onnx(model: onnx.ModelProto, path: str | os.PathLike, external_data: bool | None = None) -> Path:
    """Write ``model`` to ``path`` atomically.

    ``external_data=None`` chooses: one file below protobuf's 2 GiB limit,
    else the weights go to ``<name>.data`` beside it. The data file is written
    under a temporary name too and renamed before the model file, so the pair
    is complete once the model file exists.
    """
    path = Path(path)
    if external_data is None:
        external_data = model.ByteSize() >= _PROTOBUF_LIMIT
    if not external_data:
        with atomic_path(path) as tmp:
            tmp.write_bytes(model.SerializeToString())
        return path
    data_name = path.name + ".data"
    model_copy = onnx.ModelProto()
    model_copy.CopyFrom(model)
    with atomic_path(path.parent / data_name) as tmp_data:
        # onnx refuses a location that exists (checked relative to the working directory, so
        # it bites when that is the output directory): start from no file, end with one.
        tmp_data.unlink()
        onnx.external_data_helper.convert_model_to_external_data(
            model_copy, all_tensors_to_one_file=True, location=tmp_data.name, size_threshold=1024
        )
        onnx.external_data_helper.write_external_data_tensors(model_copy, str(path.parent))
        tmp_data.touch()
    # The data file is in place; now point the model at its final name and write it.
    for tensor in _external_tensors(model_copy):
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = data_name
    with atomic_path(path) as tmp_model:
        tmp_model.write_bytes(model_copy.SerializeToString())
    return path
