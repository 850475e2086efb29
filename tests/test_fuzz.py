"""Fuzzing the CLI's untrusted inputs: every example ends in one ``Error:`` line and exit 1, or exit 0 with a
model that passes the ONNX checker and runs; never a traceback, never a changed input.

Each strategy mutates a valid input: the plan's JSON (a value replaced by another JSON value, a key dropped or
added), its bases file (an array reshaped, retyped, made non-finite or dropped; the bytes cut), the data file
(inputs and labels), and option values. ``ONNXLRF_FUZZ_EXAMPLES`` sets the examples per strategy (default 200;
2,000 for the long run: ``ONNXLRF_FUZZ_EXAMPLES=2000 python -m pytest tests/test_fuzz.py``).
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_bad_input import CLASSES, IN, invoke, mlp, snapshot
from test_plan import joint_like_plan

EXAMPLES = int(os.environ.get("ONNXLRF_FUZZ_EXAMPLES", "200"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=8),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3),
    max_leaves=6)


class Workspace(dict):
    """The fuzz tests' valid inputs (a short repr: hypothesis prints it with every failing example)."""

    def __repr__(self) -> str:
        return f"Workspace({self['dir']})"


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A model, a plan with stored bases (as joint plans have), and data, all valid."""
    directory = tmp_path_factory.mktemp("fuzz")
    model = mlp()
    onnx.save(model, str(directory / "mlp.onnx"))
    joint_like_plan(model).save(directory / "valid.json")
    with np.load(directory / "valid.json.bases.npz") as arrays:
        bases = dict(arrays)
    x = np.random.default_rng(1).standard_normal((40, IN)).astype(np.float32)
    return Workspace(dir=directory, model=directory / "mlp.onnx", plan=json.loads((directory / "valid.json").read_text()),
                     bases=bases, x=x, labels=np.arange(40, dtype=np.int64) % CLASSES)


def _paths(value: Any, path: tuple = ()) -> list[tuple]:
    """Every place in a JSON document (as key/index paths)."""
    out = [path]
    if isinstance(value, dict):
        for key, child in value.items():
            out += _paths(child, path + (key,))
    elif isinstance(value, list):
        for index, child in enumerate(value):
            out += _paths(child, path + (index,))
    return out


def _mutate(document: dict, path: tuple, action: str, value: Any) -> Any:
    """``document`` with the value at ``path`` replaced, dropped, or given an extra key."""
    if not path:
        return value
    parent = document
    for step in path[:-1]:
        parent = parent[step]
    if action == "replace":
        parent[path[-1]] = value
    elif action == "drop" and isinstance(parent, dict):
        del parent[path[-1]]
    elif action == "drop":
        parent.pop(path[-1])
    elif isinstance(parent, dict):
        parent["unexpected"] = value
    return document


def assert_clean_outcome(result, directory: Path, before: dict, output: Path) -> None:
    """Exit 1 with one Error line and nothing changed, or exit 0 with a checked, runnable model."""
    assert "Traceback" not in result.stderr, result.stderr
    if result.exit_code == 0:
        onnx.checker.check_model(str(output), full_check=True)
        session = ort.InferenceSession(str(output), providers=["CPUExecutionProvider"])
        outputs = session.run(None, {"x": np.zeros((2, IN), np.float32)})
        assert outputs[0].shape == (2, CLASSES)
        output.unlink()
    else:
        assert result.exit_code == 1, result.output
        lines = result.stderr.strip().splitlines()
        assert lines and lines[-1].startswith("Error: ") and sum(line.startswith("Error") for line in lines) == 1
    assert snapshot(directory) == before


@FUZZ
@given(data=st.data())
def test_fuzz_plan_documents(workspace: dict[str, Any], data: st.DataObject) -> None:
    document = copy.deepcopy(workspace["plan"])
    path = data.draw(st.sampled_from(_paths(document)))
    action = data.draw(st.sampled_from(["replace", "drop", "add"]))
    document = _mutate(document, path, action, data.draw(json_values))
    directory = workspace["dir"]
    plan = directory / "plan.json"
    plan.write_text(json.dumps(document))
    (directory / "plan.json.bases.npz").write_bytes((directory / "valid.json.bases.npz").read_bytes())
    before = snapshot(directory)
    result = invoke("rewrite", workspace["model"], "--plan", plan, "-o", directory / "out.onnx")
    assert_clean_outcome(result, directory, before, directory / "out.onnx")


@FUZZ
@given(data=st.data())
def test_fuzz_bases_files(workspace: dict[str, Any], data: st.DataObject) -> None:
    arrays = dict(workspace["bases"])
    key = data.draw(st.sampled_from(sorted(arrays)))
    spoil = data.draw(st.sampled_from(["drop", "nan", "inf", "shape", "dtype", "truncate", "rename"]))
    if spoil == "drop":
        del arrays[key]
    elif spoil in ("nan", "inf"):
        value = arrays[key].copy()
        value.flat[data.draw(st.integers(0, value.size - 1))] = np.nan if spoil == "nan" else np.inf
        arrays[key] = value
    elif spoil == "shape":
        arrays[key] = arrays[key].reshape(-1)[: data.draw(st.integers(0, arrays[key].size))]
    elif spoil == "dtype":
        arrays[key] = arrays[key].astype(data.draw(st.sampled_from([np.int8, np.float16, np.bool_, np.complex64])))
    elif spoil == "rename":
        arrays[data.draw(st.text(max_size=12))] = arrays.pop(key)
    directory = workspace["dir"]
    (directory / "plan.json").write_text(json.dumps(workspace["plan"]))
    bases = directory / "plan.json.bases.npz"
    np.savez(bases, **arrays)
    if spoil == "truncate":
        content = bases.read_bytes()
        bases.write_bytes(content[: data.draw(st.integers(0, len(content) - 1))])
    before = snapshot(directory)
    result = invoke("rewrite", workspace["model"], "--plan", directory / "plan.json", "-o", directory / "out.onnx")
    assert_clean_outcome(result, directory, before, directory / "out.onnx")


@FUZZ
@given(data=st.data())
def test_fuzz_data_files(workspace: dict[str, Any], data: st.DataObject) -> None:
    x, labels = workspace["x"].copy(), workspace["labels"].copy()
    spoil = data.draw(st.sampled_from(["x-nan", "x-shape", "x-dtype", "labels-value", "labels-dtype", "labels-shape",
                                       "empty", "no-labels", "extra"]))
    arrays = {"x": x, "labels": labels}
    if spoil == "x-nan":
        x.flat[data.draw(st.integers(0, x.size - 1))] = data.draw(st.sampled_from([np.nan, np.inf, -np.inf]))
    elif spoil == "x-shape":
        arrays["x"] = x.reshape(-1)[: data.draw(st.integers(0, x.size))]
    elif spoil == "x-dtype":
        arrays["x"] = x.astype(data.draw(st.sampled_from([np.float64, np.float16, np.int32])))
    elif spoil == "labels-value":
        labels[data.draw(st.integers(0, len(labels) - 1))] = data.draw(st.integers(-2**40, 2**40))
    elif spoil == "labels-dtype":
        arrays["labels"] = labels.astype(data.draw(st.sampled_from([np.float32, np.bool_, np.uint8])))
    elif spoil == "labels-shape":
        arrays["labels"] = labels[: data.draw(st.integers(0, len(labels) - 1))]
    elif spoil == "empty":
        arrays = {"x": x[:0], "labels": labels[:0]}
    elif spoil == "no-labels":
        del arrays["labels"]
    else:
        arrays["y"] = x
    directory = workspace["dir"]
    np.savez(directory / "data.npz", **arrays)
    before = snapshot(directory)
    result = invoke("compress", workspace["model"], "-o", directory / "out.onnx", "--mode", "uniform",
                    "--rank-fraction", "0.5", "--data", f"npz:{directory / 'data.npz'}", "--provider", "cpu")
    assert_clean_outcome(result, directory, before, directory / "out.onnx")


OPTION_VALUES = st.one_of(st.sampled_from(["nan", "inf", "-inf", "-1", "0", "1", "1e309", "", "0x10", "2**8", "-0"]),
                          st.floats(allow_nan=True, allow_infinity=True).map(repr), st.integers().map(str),
                          st.text(max_size=6))


@FUZZ
@given(option=st.sampled_from(["--target-reduction", "--tolerance", "--rank-fraction", "--energy", "--rank-multiple",
                               "--seed", "--calib", "--val", "--rounds", "--batch"]),
       value=OPTION_VALUES)
def test_fuzz_option_values(workspace: dict[str, Any], option: str, value: str) -> None:
    directory = workspace["dir"]
    np.savez(directory / "data.npz", x=workspace["x"], labels=workspace["labels"])
    knob = [] if option in ("--rank-fraction", "--target-reduction", "--energy") else ["--rank-fraction", "0.5"]
    mode = "energy" if option == "--energy" else "uniform"
    before = snapshot(directory)
    result = invoke("compress", workspace["model"], "-o", directory / "out.onnx", "--mode", mode, *knob,
                    "--data", f"npz:{directory / 'data.npz'}", "--provider", "cpu", option, value)
    assert_clean_outcome(result, directory, before, directory / "out.onnx")
