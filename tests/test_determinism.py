"""Determinism: the same model, data, options and seed give byte-identical ONNX, plan JSON and bases."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from onnxlrf.cli import cli

SAMPLES = 240


def small_cnn() -> onnx.ModelProto:
    """x[N,3,8,8] -> conv 3->12 3x3 -> Relu -> conv 12->16 3x3 /2 -> Relu -> pool -> Gemm 16->24 -> Relu -> Gemm 24->6."""
    rng = np.random.default_rng(0)
    inits = {"c1.w": rng.standard_normal((12, 3, 3, 3)) * 0.3, "c1.b": rng.standard_normal(12) * 0.1,
             "c2.w": rng.standard_normal((16, 12, 3, 3)) * 0.1, "fc1.w": rng.standard_normal((24, 16)) * 0.3,
             "fc1.b": rng.standard_normal(24) * 0.1, "fc2.w": rng.standard_normal((6, 24)) * 0.3}
    nodes = [
        helper.make_node("Conv", ["x", "c1.w", "c1.b"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "c2.w"], ["c2"], name="conv2", pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("GlobalAveragePool", ["r2"], ["p"], name="pool"),
        helper.make_node("Flatten", ["p"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "fc1.w", "fc1.b"], ["h"], name="fc1", transB=1),
        helper.make_node("Relu", ["h"], ["r3"], name="relu3"),
        helper.make_node("Gemm", ["r3", "fc2.w"], ["logits"], name="fc2", transB=1),
    ]
    graph = helper.make_graph(
        nodes, "cnn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 6])],
        [numpy_helper.from_array(v.astype(np.float32), k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model, full_check=True)
    return model


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The model and npz data labelled with the model's own predictions."""
    work = tmp_path_factory.mktemp("determinism")
    model = work / "cnn.onnx"
    onnx.save(small_cnn(), str(model))
    x = np.random.default_rng(1).standard_normal((SAMPLES, 3, 8, 8)).astype(np.float32)
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    labels = session.run(None, {"x": x})[0].argmax(axis=1).astype(np.int64)
    data = work / "data.npz"
    np.savez(data, x=x, labels=labels)
    return {"model": model, "data": data}


def compress_into(directory: Path, inputs: dict[str, Path], *options: str) -> dict[str, bytes]:
    """Run ``onnxlrf compress``; every file it wrote, by name."""
    directory.mkdir()
    result = CliRunner().invoke(cli, ["compress", str(inputs["model"]), "-o", str(directory / "out.onnx"),
                                      "--plan-out", str(directory / "plan.json"), "--data", f"npz:{inputs['data']}",
                                      "--provider", "cpu", *options])
    assert result.exit_code == 0, result.output
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


@pytest.mark.parametrize("options", [
    ("--mode", "uniform", "--target-reduction", "0.3"),
    ("--mode", "energy", "--energy", "0.9"),
    ("--mode", "lossless", "--target-reduction", "0.15", "--calib", "40", "--val", "40", "--seed", "5"),
    ("--mode", "lossless", "--target-reduction", "0.15", "--calib", "40", "--val", "40", "--seed", "5", "--spatial"),
], ids=["uniform", "energy", "lossless", "lossless-spatial"])
def test_same_inputs_same_bytes(tmp_path: Path, inputs: dict[str, Path], options: tuple[str, ...]) -> None:
    first = compress_into(tmp_path / "first", inputs, *options)
    again = compress_into(tmp_path / "again", inputs, *options)
    expected = {"out.onnx", "plan.json"} | ({"plan.json.bases.npz"} if "lossless" in options else set())
    assert set(first) == expected
    for name in sorted(first):
        assert first[name] == again[name], name
    # Not vacuous: some layer was factorized.
    assert b'"decomposition": "channel"' in first["plan.json"] or b'"decomposition": "spatial"' in first["plan.json"]
    if "lossless" in options:  # --spatial reaches the analysis (default for a params target: channel only)
        decompositions = json.loads(first["plan.json"])["options"]["decompositions"]
        assert decompositions == (["channel", "spatial"] if "--spatial" in options else ["channel"])
