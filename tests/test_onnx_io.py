"""onnx_io: one-line load errors, atomic saves (one file and external data), output path rules."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxlrf.errors import OnnxlrfError
from onnxlrf.onnx_io import check_output_path, load_onnx, save_onnx, staged_outputs


def model_with(weight: np.ndarray) -> onnx.ModelProto:
    """y = x @ w."""
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", weight.shape[0]])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", weight.shape[1]])],
        [numpy_helper.from_array(weight, "w")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


@pytest.fixture()
def weight() -> np.ndarray:
    return np.random.default_rng(0).standard_normal((64, 32)).astype(np.float32)  # 8 KiB: goes external


def names(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())  # hidden temporaries included


def loaded_weight(model: onnx.ModelProto) -> np.ndarray:
    return numpy_helper.to_array(model.graph.initializer[0])


# --- load_onnx -------------------------------------------------------------------------------------

def test_load_missing(tmp_path: Path) -> None:
    with pytest.raises(OnnxlrfError, match="file not found: .*nothing.onnx"):
        load_onnx(tmp_path / "nothing.onnx")


def test_load_directory(tmp_path: Path) -> None:
    with pytest.raises(OnnxlrfError, match="directory"):
        load_onnx(tmp_path)


@pytest.mark.parametrize("content", [np.random.default_rng(0).bytes(3000), b"", b"hello, not onnx\n"],
                         ids=["random-bytes", "empty", "text"])
def test_load_not_onnx(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "bad.onnx"
    path.write_bytes(content)
    with pytest.raises(OnnxlrfError, match="not a valid ONNX file") as info:
        load_onnx(path)
    assert "\n" not in str(info.value) and "bad.onnx" in str(info.value)


def test_load_truncated(tmp_path: Path, weight: np.ndarray) -> None:
    whole = model_with(weight).SerializeToString()
    path = tmp_path / "cut.onnx"
    path.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(OnnxlrfError, match="not a valid ONNX file"):
        load_onnx(path)


def test_load_missing_external_data(tmp_path: Path, weight: np.ndarray) -> None:
    path = save_onnx(model_with(weight), tmp_path / "m.onnx", external_data=True)
    (tmp_path / "m.onnx.data").unlink()
    with pytest.raises(OnnxlrfError, match="external data of tensor 'w' not found"):
        load_onnx(path)
    assert len(load_onnx(path, load_external_data=False).graph.initializer) == 1  # the graph alone still loads


# --- save_onnx -------------------------------------------------------------------------------------

def test_save_one_file_round_trip(tmp_path: Path, weight: np.ndarray) -> None:
    path = save_onnx(model_with(weight), tmp_path / "m.onnx")
    assert path == tmp_path / "m.onnx" and names(tmp_path) == ["m.onnx"]
    np.testing.assert_array_equal(loaded_weight(load_onnx(path)), weight)


def test_save_external_data_round_trip(tmp_path: Path, weight: np.ndarray) -> None:
    model = model_with(weight)
    path = save_onnx(model, tmp_path / "m.onnx", external_data=True)
    assert names(tmp_path) == ["m.onnx", "m.onnx.data"]
    assert (tmp_path / "m.onnx.data").stat().st_size == weight.nbytes
    # The model file points at the final data name, not at a temporary one.
    bare = onnx.load(str(path), load_external_data=False)
    assert {e.key: e.value for e in bare.graph.initializer[0].external_data}["location"] == "m.onnx.data"
    np.testing.assert_array_equal(loaded_weight(load_onnx(path)), weight)
    assert not model.graph.initializer[0].external_data  # the caller's model is left as it was


def test_save_external_data_in_working_directory(tmp_path: Path, weight: np.ndarray,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A relative output in the working directory (onnx checks the data location against the cwd)."""
    monkeypatch.chdir(tmp_path)
    save_onnx(model_with(weight), "m.onnx", external_data=True)
    assert names(tmp_path) == ["m.onnx", "m.onnx.data"]
    np.testing.assert_array_equal(loaded_weight(load_onnx("m.onnx")), weight)


def test_save_external_data_without_large_tensors(tmp_path: Path) -> None:
    tiny = np.ones((2, 2), np.float32)
    path = save_onnx(model_with(tiny), tmp_path / "m.onnx", external_data=True)
    assert names(tmp_path) == ["m.onnx", "m.onnx.data"]
    np.testing.assert_array_equal(loaded_weight(load_onnx(path)), tiny)


def test_save_replaces_existing_pair(tmp_path: Path, weight: np.ndarray) -> None:
    save_onnx(model_with(weight), tmp_path / "m.onnx", external_data=True)
    save_onnx(model_with(2 * weight), tmp_path / "m.onnx", external_data=True)
    assert names(tmp_path) == ["m.onnx", "m.onnx.data"]
    np.testing.assert_array_equal(loaded_weight(load_onnx(tmp_path / "m.onnx")), 2 * weight)


class _Unserializable:
    def SerializeToString(self) -> bytes:  # noqa: N802 (protobuf's name)
        raise RuntimeError("disk full")


def test_failed_save_keeps_existing_file(tmp_path: Path) -> None:
    path = tmp_path / "m.onnx"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="disk full"):
        save_onnx(_Unserializable(), path, external_data=False)  # type: ignore[arg-type]
    assert names(tmp_path) == ["m.onnx"] and path.read_bytes() == b"old"


def test_failed_external_save_keeps_existing_pair(tmp_path: Path, weight: np.ndarray,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    save_onnx(model_with(weight), tmp_path / "m.onnx", external_data=True)
    before = {name: (tmp_path / name).read_bytes() for name in names(tmp_path)}

    def fail(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(onnx.external_data_helper, "write_external_data_tensors", fail)
    with pytest.raises(OnnxlrfError, match="cannot write .*m.onnx: disk full"):
        save_onnx(model_with(2 * weight), tmp_path / "m.onnx", external_data=True)
    assert {name: (tmp_path / name).read_bytes() for name in names(tmp_path)} == before


# --- check_output_path -----------------------------------------------------------------------------

def test_output_new_file(tmp_path: Path) -> None:
    assert check_output_path(str(tmp_path / "out.onnx"), (None, tmp_path / "in.onnx")) == tmp_path / "out.onnx"


def test_output_exists(tmp_path: Path) -> None:
    out = tmp_path / "out.onnx"
    out.write_bytes(b"x")
    with pytest.raises(OnnxlrfError, match="output exists: .*--overwrite"):
        check_output_path(out)
    assert check_output_path(out, overwrite=True) == out
    assert out.read_bytes() == b"x"


def test_output_same_as_input(tmp_path: Path) -> None:
    model = tmp_path / "m.onnx"
    model.write_bytes(b"x")
    (tmp_path / "sub").mkdir()
    link = tmp_path / "link.onnx"
    link.symlink_to(model)
    for spelling in (model, tmp_path / "sub" / ".." / "m.onnx", link):
        with pytest.raises(OnnxlrfError, match="same as input"):
            check_output_path(spelling, (str(model),), overwrite=True)
    # Not yet existing: same path spelled differently is still the input.
    with pytest.raises(OnnxlrfError, match="same as input"):
        check_output_path(tmp_path / "sub" / ".." / "new.onnx", (tmp_path / "new.onnx",))


def test_output_directory_missing(tmp_path: Path) -> None:
    with pytest.raises(OnnxlrfError, match="output directory does not exist"):
        check_output_path(tmp_path / "no" / "out.onnx")


def test_output_relative_in_working_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert check_output_path("out.onnx") == Path("out.onnx")
    Path("in.onnx").write_bytes(b"x")
    with pytest.raises(OnnxlrfError, match="same as input"):
        check_output_path(os.path.join(os.getcwd(), "in.onnx"), ("in.onnx",), overwrite=True)


# --- write failures and staged groups --------------------------------------------------------------

def _enospc(*args: object, **kwargs: object) -> None:
    raise OSError(28, "No space left on device")


def test_disk_full_is_one_line_and_leaves_nothing(tmp_path: Path, weight: np.ndarray,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "old.onnx").write_bytes(b"old")
    monkeypatch.setattr(Path, "write_bytes", _enospc)
    for path, external in ((tmp_path / "new.onnx", False), (tmp_path / "old.onnx", False),
                           (tmp_path / "new.onnx", True), (tmp_path / "old.onnx", True)):
        with pytest.raises(OnnxlrfError) as info:
            save_onnx(model_with(weight), path, external_data=external)
        assert str(info.value) == f"cannot write {path}: No space left on device"
        assert names(tmp_path) == ["old.onnx"] and (tmp_path / "old.onnx").read_bytes() == b"old"


def test_interrupted_save_leaves_nothing(tmp_path: Path, weight: np.ndarray,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    def interrupt(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(Path, "write_bytes", interrupt)
    for external in (False, True):
        with pytest.raises(KeyboardInterrupt):
            save_onnx(model_with(weight), tmp_path / "m.onnx", external_data=external)
        assert names(tmp_path) == []


def test_staged_outputs_commit_together(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    with staged_outputs() as stage:
        first, second = stage.path(tmp_path / "a.txt"), stage.path(tmp_path / "sub" / "b.txt")
        first.write_text("a")
        (first.parent / "a.txt.side").write_text("side")  # a file written beside a staged one goes along
        second.write_text("b")
        assert [n for n in names(tmp_path) if not n.startswith(".")] == ["sub"]  # nothing in place yet
    assert names(tmp_path) == ["a.txt", "a.txt.side", "sub"] and names(tmp_path / "sub") == ["b.txt"]
    assert (tmp_path / "sub" / "b.txt").read_text() == "b"


def test_staged_outputs_refuse_existing_side_file_without_overwrite(tmp_path: Path) -> None:
    (tmp_path / "a.txt.side").write_text("precious")
    with pytest.raises(OnnxlrfError, match=r"output exists: .*a\.txt\.side \(pass --overwrite"):
        with staged_outputs(overwrite=False) as stage:
            path = stage.path(tmp_path / "a.txt")
            path.write_text("a")
            (path.parent / "a.txt.side").write_text("new")
    assert names(tmp_path) == ["a.txt.side"] and (tmp_path / "a.txt.side").read_text() == "precious"


def test_failed_move_undoes_the_group(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The second rename fails: the first new file is taken back, the replaced file restored."""
    (tmp_path / "a.txt").write_text("old a")
    real_replace = os.replace
    calls = []

    def replace(src: object, dst: object) -> None:
        calls.append(Path(dst).name)
        if Path(dst).name == "b.txt":
            raise OSError(28, "No space left on device")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OnnxlrfError, match=r"cannot write .*b\.txt: No space left on device"):
        with staged_outputs() as stage:
            stage.path(tmp_path / "a.txt").write_text("new a")
            stage.path(tmp_path / "b.txt").write_text("new b")
    assert calls[:2] == ["a.txt", "b.txt"]
    assert names(tmp_path) == ["a.txt"] and (tmp_path / "a.txt").read_text() == "old a"


def _write_pair(directory: str, tag: str, barrier, rounds: int) -> None:
    """One writer: each round, the same two outputs with this writer's tag, released together with the other."""
    for _ in range(rounds):
        barrier.wait()
        with staged_outputs(overwrite=True) as stage:
            stage.path(Path(directory) / "model.onnx").write_bytes(tag.encode() * 50_000)
            stage.path(Path(directory) / "plan.json").write_text(tag)
        barrier.wait()


def test_concurrent_overwriting_runs_never_mix_their_outputs(tmp_path: Path) -> None:
    """Two runs writing the same model and plan paths at once: every round leaves one run's pair."""
    import multiprocessing

    rounds = 20
    context = multiprocessing.get_context("fork")
    barrier = context.Barrier(3)
    writers = [context.Process(target=_write_pair, args=(str(tmp_path), tag, barrier, rounds)) for tag in "AB"]
    for writer in writers:
        writer.start()
    try:
        for _ in range(rounds):
            barrier.wait()  # both start committing
            barrier.wait()  # both done
            model, plan = (tmp_path / "model.onnx").read_bytes(), (tmp_path / "plan.json").read_text()
            assert model == plan.encode() * 50_000
    finally:
        for writer in writers:
            writer.join(timeout=60)
    assert [writer.exitcode for writer in writers] == [0, 0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "plan.json"]  # no staging left behind


def test_a_model_protobuf_cannot_size_goes_to_external_data():
    """protobuf's C implementation sizes a message by serializing it, which raises at 2 GiB or more: such a
    model does not fit one message (and is written with external data) instead of failing."""
    from google.protobuf.message import EncodeError

    from onnxlrf.onnx_io import fits_one_message

    class Huge:
        def ByteSize(self) -> int:
            raise EncodeError("Failed to serialize proto")

    assert not fits_one_message(Huge())
    assert fits_one_message(onnx.helper.make_model(onnx.helper.make_graph([], "g", [], [])))
