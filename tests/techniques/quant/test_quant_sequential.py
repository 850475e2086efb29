"""sequential_rounding: a quantization plan's layers rounded again in graph order on the inputs the quantized model
gives them, on models built here."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
import pytest
import torch
from test_refit import _dataset, _values, convnet, mlp

from onnxlrf.graph.layers import find_layers, matrices_to_weight, weight_array, weight_matrices
from onnxlrf.measure.sensitivity import layer_input_rows
from onnxlrf.pipeline import rewrite_file
from onnxlrf.planning.plan import Plan, validate_plan
from onnxlrf.techniques.quant.planners import QuantOptions, plan_uniform_quant
from onnxlrf.techniques.quant.rewrite import QDQRewrite, check_tensorrt_form
from onnxlrf.techniques.quant.rounding import loss_aware_levels
from onnxlrf.techniques.quant.sequential import input_rounding, sequential_rounding, sequential_target

BITS = 3


def test_the_target_is_the_weight_where_inputs_did_not_move_and_reproduces_the_output_better_where_they_did():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4000, 12)) @ rng.standard_normal((12, 12))
    moved = x @ (np.eye(12) + 0.2 * rng.standard_normal((12, 12))) + 0.1 * rng.standard_normal(x.shape)
    w = rng.standard_normal((1, 6, 12))
    second = (x.T @ x / len(x))[None]
    np.testing.assert_allclose(sequential_target(w, second, second), w, rtol=1e-12, atol=1e-12)
    target = sequential_target(w, (moved.T @ moved / len(x))[None], (x.T @ moved / len(x))[None])[0]
    error = np.mean((x @ w[0].T - moved @ target.T) ** 2)
    assert error < 0.1 * np.mean((x @ w[0].T - moved @ w[0].T) ** 2)


def _independent(model: onnx.ModelProto, plan: Plan, calib) -> Plan:
    """``plan`` with each layer rounded loss-aware on its input in the float model, as if it were the only one
    quantized (what the planner's loss-aware options do)."""
    layers = {layer.node: layer for layer in find_layers(model)[0]}
    nodes = {node.name: node for node in model.graph.node}
    bases = {}
    for entry in plan.layers:
        layer = layers[entry.node]
        (x,) = _values(model, calib, [nodes[entry.node].input[0]])
        rows = layer_input_rows(nodes[entry.node], layer, torch.from_numpy(x)).double().numpy()
        moment = np.einsum("grn,grk->gnk", rows, rows) / rows.shape[1]
        levels, scales = loss_aware_levels(weight_matrices(weight_array(model, layer), layer, "channel"), moment, BITS)
        bases[entry.weight] = (matrices_to_weight(levels, layer, "channel"), scales.reshape(-1))
    entries = [dataclasses.replace(e, rounding="loss-aware", weight_scales="searched") for e in plan.layers]
    return dataclasses.replace(plan, layers=entries, bases=bases)


# The three-layer MLP's last layers see inputs two roundings moved; the two convs' second sees one.
@pytest.mark.parametrize("build, output, ratio", [(mlp, "y", 0.85), (convnet, "y", 0.98)],
                         ids=["matmul-gemm", "conv-grouped"])
def test_sequential_rounding_reproduces_the_float_model_better_than_rounding_each_layer_alone(build, output, ratio,
                                                                                            tmp_path):
    model = build()
    calib, held_out = _dataset(model, seed=1), _dataset(model, seed=2)
    plan = plan_uniform_quant(model, QuantOptions(bits=BITS))
    independent = _independent(model, plan, calib)
    sequential = sequential_rounding(model, plan, calib, rows_per_feature=None)

    # Same bits, containers and activations: the plan's sizes do not change.
    for before, after in zip(plan.layers, sequential.layers):
        assert after.rounding == "sequential" and after.weight_scales == "searched"
        assert (after.bits, after.container, after.activations) == (before.bits, before.container, before.activations)
    validate_plan(sequential, model)  # levels within the 3-bit grid, one scale per channel
    assert sequential.options["sequential_rounding"] == {"samples": len(calib), "nodes": len(plan.layers)}

    # The first layer in graph order sees the float model's input: it is rounded as if it were alone.
    first = plan.layers[0].weight
    agree = np.mean(sequential.bases[first][0] == independent.bases[first][0])
    assert agree > 0.99
    # The later ones correct what the layers before them lost, on samples they were not fit on too.
    (reference,) = _values(model, held_out, [output])
    errors = {}
    for name, candidate in {"independent": independent, "sequential": sequential}.items():
        (value,) = _values(QDQRewrite()(model, candidate)[0], held_out, [output])
        errors[name] = float(np.mean((value - reference) ** 2))
    assert errors["sequential"] < ratio * errors["independent"], errors

    # The stored grids make the plan re-applicable from its JSON, byte for byte.
    sequential.save(tmp_path / "plan.json")
    onnx.save(model, str(tmp_path / "model.onnx"))
    rewrite_file(tmp_path / "model.onnx", tmp_path / "plan.json", tmp_path / "again.onnx")
    assert onnx.load(str(tmp_path / "again.onnx")) == QDQRewrite()(model, sequential)[0]


@pytest.mark.parametrize("bits", [3, 4])
def test_block_scaled_layers_are_rounded_block_by_block_and_reproduce_the_float_model_better(bits, tmp_path):
    model = mlp()  # fc1, fc2: MatMul weights stored (inputs, outputs); fc3: a Gemm with transB, (outputs, inputs)
    calib, held_out = _dataset(model, seed=1), _dataset(model, seed=2)
    nearest = plan_uniform_quant(model, QuantOptions(bits=bits, block_size=16))
    assert {entry.granularity for entry in nearest.layers} == {"block"}
    sequential = sequential_rounding(model, nearest, calib, rows_per_feature=None)

    assert sequential.options["sequential_rounding"]["nodes"] == 3
    layers = {layer.node: layer for layer in find_layers(model)[0]}
    for before, after in zip(nearest.layers, sequential.layers):
        assert (after.rounding, after.weight_scales) == ("sequential", "searched")
        assert (after.bits, after.granularity, after.block_size, after.container) == \
            (before.bits, before.granularity, before.block_size, before.container)
        levels, scales = sequential.bases[after.weight]
        inputs = 64 if after.node != "fc1" else 48
        # DequantizeLinear's block layout: the summed axis (0 for the MatMuls, 1 for the transposed Gemm) in blocks.
        assert scales.shape == ((inputs // 16, 64) if layers[after.node].transposed else (10, inputs // 16))
        assert np.abs(levels).max() <= 2 ** (bits - 1) - 1
    validate_plan(sequential, model)

    (reference,) = _values(model, held_out, ["y"])
    errors = {}
    for name, candidate in {"nearest": nearest, "sequential": sequential}.items():
        (value,) = _values(QDQRewrite()(model, candidate)[0], held_out, ["y"])
        errors[name] = float(np.mean((value - reference) ** 2))
    assert errors["sequential"] < 0.7 * errors["nearest"], errors
    # TensorRT's form of the same plan: int4 block DequantizeLinears of the stored levels, symmetric, checked.
    tensorrt = QDQRewrite("tensorrt")(model, sequential)[0]
    check_tensorrt_form(tensorrt)
    int4 = {init.name for init in tensorrt.graph.initializer if init.data_type == TensorProto.INT4}
    assert sum(node.op_type == "DequantizeLinear" and node.input[0] in int4 for node in tensorrt.graph.node) == 3

    # The block grids travel with the plan: applied from its JSON, the same model byte for byte.
    sequential.save(tmp_path / "plan.json")
    onnx.save(model, str(tmp_path / "model.onnx"))
    rewrite_file(tmp_path / "model.onnx", tmp_path / "plan.json", tmp_path / "again.onnx")
    assert onnx.load(str(tmp_path / "again.onnx")) == QDQRewrite()(model, sequential)[0]


def test_a_weight_two_nodes_share_keeps_its_planned_grid():
    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["h"], name="first"),
         helper.make_node("Relu", ["h"], ["r"], name="relu"),
         helper.make_node("MatMul", ["r", "w"], ["y"], name="second")], "shared",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 16])],
        [numpy_helper.from_array(rng.standard_normal((16, 16)).astype(np.float32), "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    plan = plan_uniform_quant(model, QuantOptions(bits=4))
    assert [entry.weight for entry in plan.layers if entry.changed] == ["w", "w"]
    assert sequential_rounding(model, plan, _dataset(model, seed=1)) is None


@pytest.mark.parametrize("runtime, zero_point", [("onnxruntime", np.uint8(0)), ("tensorrt", np.int8(0))])
def test_int8_inputs_are_rounded_as_quantize_then_dequantize_linear_round_them(runtime, zero_point):
    bounds = [-1.3, 2.9]
    rounded = input_rounding(bounds, runtime)
    x = np.random.default_rng(0).uniform(-2.0, 4.0, (64, 50)).astype(np.float32)
    from onnxlrf.techniques.quant.grid import int8_scale, uint8_params

    scale, zero_point = uint8_params(*bounds) if runtime == "onnxruntime" else (int8_scale(*bounds), zero_point)
    graph = helper.make_graph(
        [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
         helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"])], "qdq",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [64, 50])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [64, 50])],
        [numpy_helper.from_array(np.array(scale, np.float32), "s"), numpy_helper.from_array(np.array(zero_point), "z")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    (expected,) = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    np.testing.assert_allclose(rounded(torch.from_numpy(x)).numpy(), expected, rtol=0, atol=1e-6)


def test_the_backoff_verifies_every_plan_rounded_sequentially_and_rounds_each_plan_once():
    from onnxlrf.measure.analysis import AnalysisOptions
    from onnxlrf.planning.joint import PlanOptions
    from onnxlrf.runtime.sessions import make_session
    from onnxlrf.techniques.quant.technique import Quant
    from onnxlrf.verify.backoff import backoff_plan

    model = mlp()
    data = _dataset(model, seed=3)
    data.labels = make_session(model, providers=["CPUExecutionProvider"]).run(None, data.inputs)[0].argmax(axis=1)
    calib, val = data.subset(np.arange(0, 256)), data.subset(np.arange(256, 512))
    technique = Quant()
    analysis = technique.analyse(model, calib, AnalysisOptions(labels="labels", range_samples=128))
    improved = []
    improve = technique.improve
    technique.improve = lambda *args, **kwargs: improved.append(args[1]) or improve(*args, **kwargs)
    options = PlanOptions("lossless", target_reduction=0.85, target="bits")
    # select "metric": the knapsack's plan is chosen here (the uniform plan rounded to nearest has the lowest loss).
    result = backoff_plan(model, analysis, val, options, calib=calib, refit=True, technique=technique, select="metric")

    # Every plan verified is rounded sequentially: no separate refit attempt, and the model the back-off
    # scored is the chosen plan's.
    assert not any(attempt.refit for attempt in result.attempts)
    assert {entry.rounding for entry in result.plan.layers if entry.changed} == {"sequential"}
    assert result.model == technique.rewrite(model, result.plan)[0]
    # A plan proposed again at another kappa is not rounded again.
    signatures = {technique.signature(plan, analysis, plan.options["kappa"]) for plan in improved}
    assert len(signatures) == len(improved) < len(result.attempts)

    plain = backoff_plan(model, analysis, val, options, calib=calib, refit=False, technique=technique,
                         select="metric")
    assert {entry.rounding for entry in plain.plan.layers if entry.changed} <= {"loss-aware", "nearest"}
    assert len(improved) == len(signatures)  # --no-refit: nothing rounded again
