"""Reading and writing ONNX files safely.

Every reader turns a bad file into one :class:`OnnxlrfError` line, and every
writer goes through a temporary file in the destination directory and an
atomic rename, so an interrupted run (Ctrl-C or SIGTERM) never leaves a
half-written output nor destroys an existing one.

Input files must be regular files (a FIFO or a device would block or never
end). Outputs only ever replace regular files: a directory, FIFO, socket or
device at an output path is refused. A symbolic link at an output path counts
as an existing output (``--overwrite`` needed, even when it dangles); with
``overwrite`` the link itself is replaced by the new file, and the file it
pointed to is left as it was.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Iterator

import onnx

from .errors import OnnxlrfError
from .termination import sigterm_as_interrupt

# protobuf cannot serialize a single message of 2 GiB or more.
_PROTOBUF_LIMIT = 2**31 - 1
# Longest file name when the file system does not say (Linux and macOS file systems).
_NAME_MAX = 255
# Staging names start with this much of the output's name, so they stay short whatever its length.
_STAGING_NAME_CHARS = 40


def fits_one_message(model: onnx.ModelProto) -> bool:
    """Whether ``model`` serializes as one protobuf message (under 2 GiB). protobuf's C implementation
    computes the size by serializing, which raises for a larger model, so that says no too."""
    try:
        return model.ByteSize() < _PROTOBUF_LIMIT
    except Exception:  # noqa: BLE001 - google.protobuf.message.EncodeError, or ValueError in other backends
        return False


def _file_kind(mode: int) -> str:
    """What a non-regular file is, for messages."""
    for test, kind in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return kind
    return "not a regular file"


def check_regular_file(path: str | os.PathLike, what: str) -> Path:
    """``path`` if it is a regular file (after symbolic links), else a one-line error naming ``what``.

    For paths handed to code that opens them itself: a FIFO or a device there would block
    or read forever. Code that reads the file should use :func:`read_regular_file`, which
    checks the file it opened.
    """
    path = Path(path)
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise OnnxlrfError(f"{what} not found: {path}") from None
    except OSError as exc:
        raise OnnxlrfError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    if not stat.S_ISREG(mode):
        raise OnnxlrfError(f"{what} must be a regular file, got {_file_kind(mode)}: {path}")
    return path


def read_regular_file(path: str | os.PathLike, what: str) -> bytes:
    """The bytes of ``path``, or a one-line error naming ``what`` if it is missing, unreadable or
    not a regular file (a FIFO or a device is refused without blocking)."""
    path = Path(path)
    try:
        # O_NONBLOCK: opening a FIFO without a writer would otherwise wait forever.
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise OnnxlrfError(f"{what} not found: {path}") from None
    except OSError as exc:
        raise OnnxlrfError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise OnnxlrfError(f"{what} must be a regular file, got {_file_kind(mode)}: {path}")
        with open(fd, "rb", closefd=False) as file:
            return file.read()
    except OSError as exc:
        raise OnnxlrfError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    finally:
        os.close(fd)


def load_onnx(path: str | os.PathLike, load_external_data: bool = True) -> onnx.ModelProto:
    """Load an ONNX model with its external data, or raise a one-line error."""
    path = Path(path)
    content = read_regular_file(path, "model file")
    try:
        # The format from the file name, as onnx.load(path) chooses it (.onnx: binary protobuf).
        model_format = onnx.serialization.registry.get_format_from_file_extension(path.suffix)
        model = onnx.load_model_from_string(content, format=model_format)
    except Exception as exc:  # protobuf raises DecodeError and friends
        raise OnnxlrfError(f"not a valid ONNX file: {path} ({type(exc).__name__})") from None
    del content  # the serialized model can be as large as the model itself
    if not model.graph.node and not model.graph.output:
        raise OnnxlrfError(f"not a valid ONNX file (empty graph): {path}")
    check_graph_reads(model)
    if load_external_data:
        base = path.parent
        for tensor in _external_tensors(model):
            location = {e.key: e.value for e in tensor.external_data}.get("location", "")
            check_regular_file(base / location, f"external data of tensor {tensor.name!r}")
        try:
            onnx.load_external_data_for_model(model, str(base))
        except Exception as exc:
            raise OnnxlrfError(f"cannot read external data of {path}: {exc}") from None
    return model


def default_opset(model: onnx.ModelProto, missing: int = 0) -> int:
    """The model's opset of the default ONNX domain (``missing`` where it imports none)."""
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), missing)


def copy_model(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` for graphsurgeon to import (it keeps lazy references to the tensors it imports)."""
    work = onnx.ModelProto()
    work.CopyFrom(model)
    return work


def keep_model_fields(source: onnx.ModelProto, result: onnx.ModelProto) -> None:
    """What graphsurgeon's export does not carry: IR version, opsets, producer, metadata and functions of
    ``source``."""
    result.ir_version = source.ir_version
    del result.opset_import[:]
    result.opset_import.extend(source.opset_import)
    result.producer_name, result.producer_version = source.producer_name, source.producer_version
    del result.metadata_props[:]
    result.metadata_props.extend(source.metadata_props)
    del result.functions[:]
    result.functions.extend(source.functions)


def unique_name(name: str, taken: set[str]) -> str:
    """``name``, or ``name.1``, ``name.2``, ... : the first not in ``taken``, which it is added to."""
    candidate, i = name, 1
    while candidate in taken:
        candidate, i = f"{name}.{i}", i + 1
    taken.add(candidate)
    return candidate


def check_graph_reads(model: onnx.ModelProto) -> None:
    """Every node of the main graph reads only what a graph input, an initializer or an earlier node produces
    (ONNX requires that order); else a one-line error naming the node and the value."""
    available = {value.name for value in model.graph.input} | {t.name for t in model.graph.initializer} | {""}
    for node in model.graph.node:
        missing = next((name for name in node.input if name not in available), None)
        if missing is not None:
            raise OnnxlrfError(f"node {node.name!r} ({node.op_type}) reads {missing!r}, which no graph input, "
                               f"initializer or earlier node produces")
        available.update(node.output)


def _external_tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    for tensor in onnx.external_data_helper._get_all_tensors(model):
        if tensor.HasField("data_location") and tensor.data_location == onnx.TensorProto.EXTERNAL:
            yield tensor


def _name_max(directory: Path) -> int:
    try:
        return os.pathconf(directory, "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):  # no such directory (reported later), or no pathconf
        return _NAME_MAX


def _output_exists(path: Path) -> bool:
    """Whether something is at output ``path``: a regular file or a symbolic link (dangling or not).

    Anything else (directory, FIFO, socket, device) is a one-line error: outputs never replace it.
    """
    try:
        mode = os.lstat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        return False
    except OSError as exc:
        raise write_error(path, exc) from None
    if not (stat.S_ISREG(mode) or stat.S_ISLNK(mode)):
        raise OnnxlrfError(f"output must be a regular file, got {_file_kind(mode)}: {path}")
    return True


def check_output_path(output: str | os.PathLike, inputs: tuple = (), overwrite: bool = False) -> Path:
    """Refuse an output path that is an input, that exists without ``overwrite``, that is not a regular
    file (a symbolic link counts as an existing output, see the module doc), or whose name is too long."""
    output = Path(output)
    name_max = _name_max(output.parent)
    if len(os.fsencode(output.name)) > name_max:
        raise OnnxlrfError(f"output file name is longer than {name_max} bytes: {output}")
    for inp in inputs:
        if inp is not None and Path(inp).exists() and output.exists() and os.path.samefile(inp, output):
            raise OnnxlrfError(f"output path is the same as input path: {output}")
        if inp is not None and Path(inp).resolve() == output.resolve():
            raise OnnxlrfError(f"output path is the same as input path: {output}")
    if _output_exists(output) and not overwrite:
        raise OnnxlrfError(f"output exists: {output} (pass --overwrite to replace it)")
    if not output.parent.is_dir():
        raise OnnxlrfError(f"output directory does not exist: {output.parent}")
    return output


def _staging_prefix(name: str) -> str:
    """Hidden, and short whatever the length of ``name`` (a file name's 255 bytes are soon reached)."""
    return f".{name[:_STAGING_NAME_CHARS]}."


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` on success.

    An OSError while writing (full disk, no permission) becomes a one-line OnnxlrfError;
    SIGTERM meanwhile raises :class:`~onnxlrf.termination.Terminated`, so the temporary
    file is removed. Only a regular file or a symbolic link at ``path`` is replaced.
    """
    path = Path(path)
    with sigterm_as_interrupt():
        try:
            fd, tmp = tempfile.mkstemp(prefix=_staging_prefix(path.name), suffix=suffix or ".tmp", dir=path.parent)
        except OSError as exc:
            raise write_error(path, exc) from None
        os.close(fd)
        tmp_path = Path(tmp)
        try:
            yield tmp_path
            # mkstemp creates 0600; give the output the permissions a plain open() would.
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp_path, 0o666 & ~umask)
            _output_exists(path)  # refuses to replace anything but a regular file or a link
            os.replace(tmp_path, path)
        except OSError as exc:
            raise write_error(path, exc) from None
        finally:
            if tmp_path.exists():
                tmp_path.unlink()


def write_error(path: str | os.PathLike, exc: OSError) -> OnnxlrfError:
    """The one-line error for a failed write of ``path`` (a staged file is named by its final path)."""
    path = Path(path)
    while path.parent in _STAGING_DIRS:
        path = _STAGING_DIRS[path.parent] / path.name
    return OnnxlrfError(f"cannot write {path}: {exc.strerror or exc}")


_STAGING_DIRS: dict[Path, Path] = {}  # staging directory -> final directory, while staged outputs are open


class StagedOutputs:
    """Output files written under temporary names, then put in place together.

    :meth:`path` gives where to write a final path's file: ``<staging dir>/<name>``,
    a hidden directory beside the final path; files written next to it (external
    data, a plan's bases) go along. :meth:`commit` moves every staged file onto its
    final name; if one move fails, the moves made are undone and replaced files
    restored, so either all new files are in place or none is.
    """

    def __init__(self, overwrite: bool = True) -> None:
        self.overwrite = overwrite
        self._stack = contextlib.ExitStack()
        self._staging: dict[Path, tuple[Path, Path]] = {}  # resolved final dir -> (final dir, staging dir)
        self.finals: list[Path] = []  # as passed to path(), in order

    def path(self, final: str | os.PathLike) -> Path:
        final = Path(final)
        key = final.parent.resolve()
        if key not in self._staging:
            try:
                staging = self._stack.enter_context(
                    tempfile.TemporaryDirectory(prefix=_staging_prefix(final.name), dir=final.parent))
            except OSError as exc:
                raise write_error(final, exc) from None
            self._staging[key] = (final.parent, Path(staging))
            _STAGING_DIRS[Path(staging)] = final.parent
        self.finals.append(final)
        return self._staging[key][1] / final.name

    def _moves(self) -> list[tuple[Path, Path]]:
        """(staged file, final path): side files before the files they belong to, which come in staging order."""
        moves = []
        for key, (final_dir, staging) in self._staging.items():
            mains = [f.name for f in self.finals if f.parent.resolve() == key]
            names = sorted(p.name for p in staging.iterdir() if p.is_file())
            ordered = [n for n in names if n not in mains] + [n for n in dict.fromkeys(mains) if n in names]
            moves += [(staging / name, final_dir / name) for name in ordered]
        return moves

    def commit(self) -> None:
        moves = self._moves()
        with _locked({final.parent for _, final in moves}):
            self._commit(moves)

    def _commit(self, moves: list[tuple[Path, Path]]) -> None:
        existing = {final for _, final in moves if _output_exists(final)}
        if existing and not self.overwrite:
            final = next(final for _, final in moves if final in existing)
            raise OnnxlrfError(f"output exists: {final} (pass --overwrite to replace it)")
        done: list[tuple[Path, Path | None]] = []
        final = None
        try:
            for number, (staged, final) in enumerate(moves):
                backup = None
                if final in existing:
                    backup = staged.with_name(f".replaced.{number}")  # same file system as final
                    _keep_copy(final, backup)
                os.replace(staged, final)
                done.append((final, backup))
        except BaseException as exc:
            for moved, backup in reversed(done):
                if backup is not None:
                    os.replace(backup, moved)
                else:
                    moved.unlink(missing_ok=True)
            if isinstance(exc, OSError):
                raise write_error(final, exc) from None
            raise

    def close(self) -> None:
        """Remove the staging directories and whatever was not committed."""
        for _, staging in self._staging.values():
            _STAGING_DIRS.pop(staging, None)
        self._stack.close()


def _keep_copy(path: Path, copy: Path) -> None:
    """A copy of ``path`` to restore; a symbolic link is kept as the link, not its target."""
    try:
        os.link(path, copy, follow_symlinks=False)
    except OSError:  # file systems without hard links
        shutil.copy2(path, copy, follow_symlinks=False)


@contextlib.contextmanager
def _locked(directories: set[Path]) -> Iterator[None]:
    """An exclusive lock on each directory (in one order: no deadlock) while outputs move into it, so two runs
    writing the same outputs never interleave their files. Where the platform has no ``flock``, no lock."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    held = []
    try:
        for directory in sorted(directories):
            try:
                fd = os.open(directory, os.O_RDONLY)
            except OSError:  # a directory we may write but not read: the moves go on without its lock
                continue
            held.append(fd)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        for fd in held:
            os.close(fd)  # closing releases the lock


@contextlib.contextmanager
def staged_outputs(overwrite: bool = True, within: StagedOutputs | None = None) -> Iterator[StagedOutputs]:
    """A :class:`StagedOutputs` committed when the block succeeds and cleaned up in any case.

    ``overwrite=False`` refuses (before moving anything) to replace an existing file,
    side files included; a final path that is not a regular file or a link is refused in
    any case. An OSError while writing becomes a one-line OnnxlrfError. SIGTERM
    meanwhile raises :class:`~onnxlrf.termination.Terminated`, so the staging directory is removed.
    ``within``: a stage the caller opened; the block adds to it, and the caller's commit moves everything.
    """
    if within is not None:  # the caller's stage: its files go in place with the caller's, when it commits
        yield within
        return
    with sigterm_as_interrupt():
        stage = StagedOutputs(overwrite)
        try:
            try:
                yield stage
            except OSError as exc:
                unknown = ", ".join(map(str, stage.finals)) or "output"
                raise write_error(exc.filename or unknown, exc) from None
            stage.commit()
        finally:
            stage.close()


def save_onnx(model: onnx.ModelProto, path: str | os.PathLike, external_data: bool | None = None) -> Path:
    """Write ``model`` to ``path`` atomically.

    ``external_data=None`` chooses: one file below protobuf's 2 GiB limit,
    else the weights go to ``<name>.data`` beside it. The pair is staged
    (:func:`staged_outputs`) and the data file renamed before the model file,
    so the pair is complete once the model file exists, and a failure leaves an
    existing pair as it was.
    """
    path = Path(path)
    if external_data is None:
        external_data = not fits_one_message(model)
    if not external_data:
        with atomic_path(path) as tmp:
            tmp.write_bytes(model.SerializeToString())
        return path
    data_name = path.name + ".data"
    model_copy = onnx.ModelProto()
    model_copy.CopyFrom(model)
    # Data file and model file are staged together: a failure leaves no new file and an
    # existing pair as it was.
    with staged_outputs() as stage:
        staged = stage.path(path)
        # onnx refuses a location that exists (checked relative to the working directory, so it
        # bites when that is the output directory): write under a fresh name, then rename.
        fd, tmp_data = tempfile.mkstemp(prefix=".data.", dir=staged.parent)
        os.close(fd)
        os.unlink(tmp_data)
        onnx.external_data_helper.convert_model_to_external_data(
            model_copy, all_tensors_to_one_file=True, location=Path(tmp_data).name, size_threshold=1024
        )
        onnx.external_data_helper.write_external_data_tensors(model_copy, str(staged.parent))
        Path(tmp_data).touch()
        os.replace(tmp_data, staged.parent / data_name)
        for tensor in _external_tensors(model_copy):
            for entry in tensor.external_data:
                if entry.key == "location":
                    entry.value = data_name
        staged.write_bytes(model_copy.SerializeToString())
    return path
