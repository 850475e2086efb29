"""Smoothing of W8A8 Gemm/MatMul inputs (SmoothQuant) on a model built here whose input has two wide channels."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxlrf.data import CLASSIFICATION, Dataset
from onnxlrf.errors import OnnxlrfError
from onnxlrf.planning.plan import Plan
from onnxlrf.runtime.sessions import make_session, optimized_op_counts
from onnxlrf.techniques.quant.calibration import calibrate_plan, search_smoothing
from onnxlrf.techniques.quant.planners import QuantOptions, plan_uniform_quant
from onnxlrf.techniques.quant.rewrite import QDQRewrite, check_tensorrt_form
from onnxlrf.techniques.quant.sequential import sequential_rounding
from onnxlrf.techniques.quant.smoothing import ALPHAS, W8A8_WEIGHT_BITS, apply_smoothing, smoothing_groups

WIDTH, WIDE = 32, (3, 17)


def projections() -> onnx.ModelProto:
    """``q = x Wq`` and ``k = x Wk`` read ``x``; ``y = (q * k) W2``; ``skip = Relu(x)`` reads ``x`` in float too."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array((rng.standard_normal(shape) * 0.3).astype(np.float32), name)
             for name, shape in (("Wq", (WIDTH, 16)), ("Wk", (WIDTH, 16)), ("W2", (16, 8)))]
    nodes = [helper.make_node("MatMul", ["x", "Wq"], ["q"], "query"),
             helper.make_node("MatMul", ["x", "Wk"], ["k"], "key"),
             helper.make_node("Mul", ["q", "k"], ["qk"], "gate"),
             helper.make_node("MatMul", ["qk", "W2"], ["y"], "out"),
             helper.make_node("Relu", ["x"], ["skip"], "skip")]
    graph = helper.make_graph(nodes, "projections", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", WIDTH])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8]),
                               helper.make_tensor_value_info("skip", TensorProto.FLOAT, ["N", WIDTH])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def data(seed: int, rows: int = 400) -> Dataset:
    """Inputs whose channels :data:`WIDE` are 30 times wider than the rest, as a transformer's outlier channels."""
    x = np.random.default_rng(seed).standard_normal((rows, WIDTH)).astype(np.float32)
    x[:, list(WIDE)] *= 30
    return Dataset("random", CLASSIFICATION, {"x": x}, np.zeros(rows, np.int64))


def w8a8(model: onnx.ModelProto, smoothing: bool, runtime: str = "onnxruntime") -> Plan:
    plan = plan_uniform_quant(model, QuantOptions(bits=8, activations="int8", runtime=runtime))
    if smoothing:
        plan = search_smoothing(model, plan, data(1), runtime)
    return calibrate_plan(model, plan, data(1), runtime)


def outputs(model: onnx.ModelProto, inputs: Dataset) -> list[np.ndarray]:
    return make_session(model, providers=["CPUExecutionProvider"]).run(None, inputs.inputs)


def test_the_wide_input_is_smoothed_and_the_float_function_kept():
    model = projections()
    plan = w8a8(model, smoothing=True)
    assert "x" in plan.smoothing and all(smoothing["alpha"] in ALPHAS for smoothing in plan.smoothing.values())
    assert plan.options["smoothing"]["searched"] == 2 and plan.options["smoothing"]["tensors"] == len(plan.smoothing)
    absmax = np.abs(data(1).inputs["x"]).max(axis=0)
    np.testing.assert_allclose(plan.smoothing["x"]["channel_absmax"], absmax, rtol=1e-6)
    smoothed = apply_smoothing(model, plan)
    readers = {node.name: list(node.input) for node in smoothed.graph.node}
    assert readers["query"][0] == readers["key"][0] == "x/smoothed" and readers["skip"] == ["x"]
    assert readers["x/Smooth"][0] == "x"
    # The smoothed range is the one calibrated; the float function is the original's.
    assert "x/smoothed" in plan.activation_ranges and "x" not in plan.activation_ranges
    for before, after in zip(outputs(model, data(2)), outputs(smoothed, data(2))):
        np.testing.assert_allclose(after, before, rtol=1e-4, atol=1e-4 * np.abs(before).max())


@pytest.mark.parametrize("runtime", ["onnxruntime", "tensorrt"])
def test_smoothed_w8a8_is_closer_to_float_on_held_out_inputs_and_keeps_its_integer_kernels(runtime):
    model = projections()
    (reference, _), held_out = outputs(model, data(2)), data(2)
    errors, rewritten = {}, {}
    for smoothing in (False, True):
        rewritten[smoothing], report = QDQRewrite(runtime)(model, w8a8(model, smoothing, runtime))
        errors[smoothing] = float(np.mean((outputs(rewritten[smoothing], held_out)[0] - reference) ** 2))
        alphas = {done["node"]: done["smoothing_alpha"] for done in report.rewritten}
        assert (alphas["query"] is not None) == smoothing and alphas["query"] == alphas["key"]
    assert errors[True] < 0.5 * errors[False]
    if runtime == "tensorrt":
        check_tensorrt_form(rewritten[True])
    else:
        counts = optimized_op_counts(rewritten[True])
        assert counts.get("MatMulIntegerToFloat", 0) + counts.get("QLinearMatMul", 0) == 3
        assert counts == {**optimized_op_counts(rewritten[False]), "Mul": counts.get("Mul", 0)}


def test_a_saved_plan_rewrites_the_same_bytes_and_sequential_rounding_keeps_the_smoothing(tmp_path):
    model = projections()
    plan = w8a8(model, smoothing=True)
    plan.save(tmp_path / "plan.json")
    saved = json.loads((tmp_path / "plan.json").read_text())
    assert saved["version"] == 4 and saved["smoothing"] == json.loads(json.dumps(plan.smoothing))
    direct = QDQRewrite()(model, plan)[0]
    assert QDQRewrite()(model, Plan.load(tmp_path / "plan.json"))[0].SerializeToString() == direct.SerializeToString()
    # Sequential rounding rounds the smoothed weights on the smoothed inputs: closer to float still.
    rounded = sequential_rounding(model, plan, data(1), rows_per_feature=None)
    assert rounded.smoothing == plan.smoothing
    reference = outputs(model, data(2))[0]
    error = {name: float(np.mean((outputs(QDQRewrite()(model, p)[0], data(2))[0] - reference) ** 2))
             for name, p in (("nearest", plan), ("sequential", rounded))}
    assert error["sequential"] < error["nearest"]


def test_a_floor_on_weight_bits_leaves_w4a8_inputs_alone():
    model = projections()
    w4a8 = plan_uniform_quant(model, QuantOptions(bits=4, activations="int8"))
    assert search_smoothing(model, w4a8, data(1), "onnxruntime", W8A8_WEIGHT_BITS).smoothing == {}
    assert "x" in search_smoothing(model, w4a8, data(1), "onnxruntime").smoothing
    w8a8_plan = plan_uniform_quant(model, QuantOptions(bits=8, activations="int8"))  # 7-bit weights: reduced range
    assert "x" in search_smoothing(model, w8a8_plan, data(1), "onnxruntime", W8A8_WEIGHT_BITS).smoothing


def test_what_cannot_be_smoothed_is_left_alone():
    model = projections()
    weight_only = plan_uniform_quant(model, QuantOptions(bits=8))
    assert smoothing_groups(model, weight_only) == {}
    # A weight another node reads too cannot be scaled for one of them.
    shared = projections()
    shared.graph.node.append(helper.make_node("MatMul", ["x", "Wk"], ["k2"], "key2"))
    shared.graph.output.append(helper.make_tensor_value_info("k2", TensorProto.FLOAT, ["N", 16]))
    plan = plan_uniform_quant(shared, QuantOptions(bits=8, activations="int8"))
    assert [layer.node for layer in smoothing_groups(shared, plan)["x"]] == ["query"]


def test_bad_smoothing_is_a_one_line_error():
    model = projections()
    plan = w8a8(model, smoothing=True)
    data_ = plan.to_dict()
    for bad, message in (({"alpha": 0, "channel_absmax": [1.0]}, "'alpha' must be a number in"),
                         ({"alpha": 0.5, "channel_absmax": [-1.0]}, "'channel_absmax' must be a list"),
                         ({"alpha": 0.5}, "keys 'alpha' and 'channel_absmax'")):
        with pytest.raises(OnnxlrfError, match=message):
            Plan.from_dict({**data_, "smoothing": {"x": bad}})
    short = dataclasses.replace(plan, smoothing={**plan.smoothing, "x": {"alpha": 0.5, "channel_absmax": [1.0] * 3}})
    with pytest.raises(OnnxlrfError, match="has 3 channel_absmax values; its readers have 32 input channels"):
        QDQRewrite()(model, short)
    elsewhere = dataclasses.replace(plan, smoothing={"skip": {"alpha": 0.5, "channel_absmax": [1.0] * 32},
                                                     **plan.smoothing})
    with pytest.raises(OnnxlrfError, match="plan smooths tensor .skip., which no W8A8 Gemm/MatMul entry"):
        QDQRewrite()(model, elsewhere)
