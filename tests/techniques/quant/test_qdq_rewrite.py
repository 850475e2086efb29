"""techniques.quant.rewrite: both Q/DQ forms on small models: integer kernels in onnxruntime's optimized graph,
TensorRT's symmetric types and axes, int4 containers, kept interfaces, and one-line errors."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper
from quant_fixtures import images, matmul_model, residual_cnn

from onnxlrf.errors import OnnxlrfError
from onnxlrf.graph.layers import count_params
from onnxlrf.planning.plan import Plan
from onnxlrf.runtime.sessions import optimized_op_counts
from onnxlrf.techniques.quant.planners import QuantOptions, plan_uniform_quant
from onnxlrf.techniques.quant.rewrite import (INT4_PAIRS, QDQRewrite, check_tensorrt_form, pack_int4_pairs,
                                             quantized_activations)
from onnxlrf.techniques.quant.technique import QUANT

FLOAT_KERNELS = ("Conv", "FusedConv", "Gemm", "FusedGemm", "MatMul")


def run(model: onnx.ModelProto, feed: dict, optimize: bool = True) -> np.ndarray:
    options = ort.SessionOptions()
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, feed)[0]


def minmax_ranges(model: onnx.ModelProto, tensors: list[str], feed: dict) -> dict:
    """Exact ranges of ``tensors`` over ``feed`` (what the MinMax calibrator measures), for tests without it."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.extend(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None)
                              for name in tensors if name not in {o.name for o in model.graph.output})
    session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    values = dict(zip([o.name for o in session.get_outputs()], session.run(None, feed)))
    values.update(feed)
    return {name: [float(values[name].min()), float(values[name].max())] for name in tensors}


def w8a8_plan(model: onnx.ModelProto, runtime: str) -> Plan:
    plan = plan_uniform_quant(model, QuantOptions(bits=8, activations="int8", runtime=runtime, reduce_range="on"))
    tensors = [site.tensor for site in quantized_activations(model, plan, runtime)]
    plan.activation_ranges = minmax_ranges(model, tensors, {"input": images(64)})
    return plan


def interface(model: onnx.ModelProto) -> list:
    return [(v.name, v.type.SerializeToString()) for v in [*model.graph.input, *model.graph.output]]


def test_onnxruntime_form_runs_every_quantized_layer_as_an_integer_kernel():
    model = residual_cnn()
    plan = w8a8_plan(model, "onnxruntime")
    assert {entry.bits for entry in plan.layers} == {7}  # onnxruntime's reduced range (no int16 overflow)
    quantized, report = QDQRewrite("onnxruntime")(model, plan)
    onnx.checker.check_model(quantized, full_check=True)
    assert interface(quantized) == interface(model)
    assert [done["node"] for done in report.rewritten] == ["conv1", "conv2", "fc"]
    counts = optimized_op_counts(quantized)
    assert counts.get("QLinearConv") == 2 and counts.get("QGemm") == 1 and counts.get("QLinearAdd") == 1
    assert not any(counts.get(op) for op in FLOAT_KERNELS)
    assert "Relu" not in {node.op_type for node in quantized.graph.node}  # folded into uint8 quantizers
    feed = {"input": images(32, seed=5)}
    reference, output = run(model, feed), run(quantized, feed)
    assert np.abs(output - reference).max() < 0.05 * np.abs(reference).max()


def test_tensorrt_form_is_symmetric_int8_on_layer_inputs_and_the_skip_input():
    model = residual_cnn()
    plan = w8a8_plan(model, "tensorrt")
    assert {entry.bits for entry in plan.layers} == {8}
    quantized, _ = QDQRewrite("tensorrt")(model, plan)
    onnx.checker.check_model(quantized, full_check=True)
    check_tensorrt_form(quantized)
    nodes = {node.name: node for node in quantized.graph.node}
    quantizers = [node for node in quantized.graph.node if node.op_type == "QuantizeLinear"]
    # input (conv1), r1 (conv2's input and the Add's skip input: one quantizer), flat (fc)
    assert sorted(node.input[0] for node in quantizers) == ["flat", "input", "r1"]
    producer = {out: node for node in quantized.graph.node for out in node.output}
    assert producer[nodes["add"].input[1]].op_type == "DequantizeLinear"  # the skip input
    assert nodes["add"].input[0] == "c2"  # the conv's output: TensorRT fuses the Add into it
    for conv in ("conv1", "conv2"):  # float biases
        assert nodes[conv].input[2] in {init.name for init in quantized.graph.initializer}
    feed = {"input": images(32, seed=5)}
    assert np.abs(run(quantized, feed) - run(model, feed)).max() < 0.05 * np.abs(run(model, feed)).max()


def test_tensorrt_check_refuses_asymmetric_quantizers():
    model = residual_cnn()
    quantized, _ = QDQRewrite("onnxruntime")(model, w8a8_plan(model, "onnxruntime"))
    with pytest.raises(OnnxlrfError, match="TensorRT form"):
        check_tensorrt_form(quantized)


def test_four_bits_weight_only_are_packed_two_per_byte_at_the_models_opset_and_equal_the_grid_values():
    model = residual_cnn()
    plan = plan_uniform_quant(model, QuantOptions(bits=4))
    quantized, report = QUANT.rewrite(model, plan)
    onnx.checker.check_model(quantized, full_check=True)
    # No int4 tensor, so no opset 21 (at which onnxruntime fuses Add+LayerNormalization into a slower kernel).
    assert [o.version for o in quantized.opset_import if o.domain in ("", "ai.onnx")] == [17]
    stored = {init.name: init for init in quantized.graph.initializer}
    packed = [init for init in stored.values() if init.data_type == onnx.TensorProto.UINT8]
    assert len(packed) == 3 and not any(init.data_type == onnx.TensorProto.INT4 for init in stored.values())
    assert sorted(len(init.raw_data) for init in packed) == sorted([8 * 3 * 9 // 2, 8 * 8 * 9 // 2, 4 * 8 // 2])
    assert [init.name for init in stored.values() if list(init.dims) == [256, 2]] == ["onnxlrf/int4_pairs_table"]
    assert {"w1", "w2", "fc_w"}.isdisjoint(stored)  # the float weights are gone
    assert count_params(quantized) == count_params(model) + 8 + 8 + 4  # each level once, plus a scale per channel
    feed = {"input": images(16, seed=2)}
    np.testing.assert_allclose(run(quantized, feed), run(QUANT.perturbed_weights(model, plan), feed), atol=1e-5)
    assert len(report.rewritten) == 3 and not report.kept_dense
    assert all([name.rsplit("/", 1)[1] for name in done["new_nodes"]] == ["CastPairs", "GatherPairs", "Reshape",
                                                                          "Cast", "Mul"]
               for done in report.rewritten)
    # onnxruntime folds them into float weights when the session loads: the layers run as the original's.
    counts = optimized_op_counts(quantized)
    assert not {"Cast", "Gather", "Mul", "DequantizeLinear"} & set(counts)
    assert counts == optimized_op_counts(model)


def test_int4_pairs_are_packed_as_onnx_packs_int4_and_an_odd_count_drops_its_padding():
    levels = np.random.default_rng(0).integers(-7, 8, size=(5, 3)).astype(np.int8)
    onnx_int4 = numpy_helper.from_array(levels.astype(ml_dtypes.int4), "w")
    assert pack_int4_pairs(levels).tobytes() == onnx_int4.raw_data
    np.testing.assert_array_equal(INT4_PAIRS[pack_int4_pairs(levels)].reshape(-1)[:15], levels.reshape(-1))
    # A Gemm whose 15-element weight unpacks through a Slice that drops the padding level.
    weight = np.random.default_rng(1).standard_normal((5, 3)).astype(np.float32)
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Gemm", ["x", "w"], ["y"], name="gemm", transB=1)], "odd",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 3])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 5])],
        [numpy_helper.from_array(weight, "w")])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)], ir_version=8)
    plan = plan_uniform_quant(model, QuantOptions(bits=4))
    quantized, report = QUANT.rewrite(model, plan)
    onnx.checker.check_model(quantized, full_check=True)
    assert "DropPadding" in " ".join(report.rewritten[0]["new_nodes"]) and count_params(quantized) == 15 + 5
    feed = {"x": np.random.default_rng(2).standard_normal((2, 3)).astype(np.float32)}
    np.testing.assert_allclose(run(quantized, feed), run(QUANT.perturbed_weights(model, plan), feed), atol=1e-6)


def test_weight_only_tensorrt_form_keeps_dequantize_linear_and_per_channel_int4_levels_in_int8():
    """TensorRT takes int4 weights only with block scales on MatMul/Gemm: per-channel 4-bit levels live in int8."""
    model = residual_cnn()
    plan = plan_uniform_quant(model, QuantOptions(bits=4, runtime="tensorrt"))
    assert {entry.container for entry in plan.layers} == {"int8"}
    quantized, _ = QDQRewrite("tensorrt")(model, plan)
    check_tensorrt_form(quantized)
    assert not [init for init in quantized.graph.initializer if init.data_type == onnx.TensorProto.INT4]
    weights = [numpy_helper.to_array(init) for init in quantized.graph.initializer
               if init.data_type == onnx.TensorProto.INT8 and len(init.dims) > 1]
    assert len(weights) == 3 and max(np.abs(w).max() for w in weights) == 7
    assert sum(node.op_type == "DequantizeLinear" for node in quantized.graph.node) == 3
    feed = {"input": images(16, seed=2)}
    np.testing.assert_allclose(run(quantized, feed), run(QUANT.perturbed_weights(model, plan), feed), atol=1e-5)


def test_tensorrt_form_refuses_per_channel_int4():
    model = residual_cnn()
    plan = plan_uniform_quant(model, QuantOptions(bits=4))  # onnxruntime's plan: int4 containers
    with pytest.raises(OnnxlrfError, match="TensorRT takes int4 weights only with block scales.*'conv1'"):
        QDQRewrite("tensorrt")(model, plan)
    # A model that has one anyway (here the onnxruntime form's levels, as a DequantizeLinear) fails the check.
    weight = onnx.helper.make_tensor("w", onnx.TensorProto.INT4, [2, 3, 1, 1], [1, -2, 3, -4, 5, -6])
    nodes = [onnx.helper.make_node("DequantizeLinear", ["w", "s", "z"], ["wf"], name="dq", axis=0),
             onnx.helper.make_node("Conv", ["x", "wf"], ["y"], name="conv")]
    graph = onnx.helper.make_graph(
        nodes, "g", [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 3, 4, 4])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 2, 4, 4])],
        [weight, numpy_helper.from_array(np.ones(2, np.float32), "s"),
         onnx.helper.make_tensor("z", onnx.TensorProto.INT4, [2], [0, 0])])
    with pytest.raises(OnnxlrfError, match="'dq' is int4 outside a blocked MatMul/Gemm weight"):
        check_tensorrt_form(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 21)]))


def test_sub_8_bit_values_above_4_bits_stay_in_int8():
    model = residual_cnn()
    quantized, _ = QUANT.rewrite(model, plan_uniform_quant(model, QuantOptions(bits=6)))
    weights = [init for init in quantized.graph.initializer if list(init.dims) == [8, 8, 3, 3]]
    assert [init.data_type for init in weights] == [onnx.TensorProto.INT8]
    assert np.abs(numpy_helper.to_array(weights[0])).max() == 31


def test_block_int4_matmul_becomes_matmulnbits():
    model = matmul_model()
    plan = plan_uniform_quant(model, QuantOptions(bits=4, block_size=16))
    assert plan.layers[0].granularity == "block" and plan.layers[0].block_size == 16
    quantized, _ = QDQRewrite("tensorrt")(model, plan)
    onnx.checker.check_model(quantized, full_check=True)
    check_tensorrt_form(quantized)
    dq = next(node for node in quantized.graph.node if node.op_type == "DequantizeLinear")
    assert {a.name: a.i for a in dq.attribute} == {"axis": 0, "block_size": 16}
    assert optimized_op_counts(quantized).get("MatMulNBits") == 1
    feed = {"x": np.random.default_rng(0).standard_normal((4, 64)).astype(np.float32)}
    grid = run(QUANT.perturbed_weights(model, plan), feed)
    np.testing.assert_allclose(run(quantized, feed, optimize=False), grid, atol=1e-4)
    # MatMulNBits also rounds the activations to int8 (onnxruntime's default accuracy level 4).
    assert np.abs(run(quantized, feed) - grid).max() < 0.02 * np.abs(grid).max()


def test_an_edited_plan_leaves_float_layers_alone():
    model = residual_cnn()
    plan = Plan.from_dict(plan_uniform_quant(model, QuantOptions(bits=8)).to_dict())
    fc = plan.layers[2]
    fc.bits = fc.granularity = fc.container = fc.weight_scales = fc.rounding = None
    quantized, report = QUANT.rewrite(model, plan)
    assert report.kept_dense == [{"node": "fc", "reason": "planned float"}]
    assert "fc_w" in {init.name for init in quantized.graph.initializer}


def test_one_line_errors_for_missing_ranges_and_an_opset_that_cannot_be_raised(monkeypatch):
    model = residual_cnn()
    plan = w8a8_plan(model, "onnxruntime")
    del plan.activation_ranges["r2"]  # the residual Add's output, after its folded Relu
    with pytest.raises(OnnxlrfError, match="no calibrated range for activation 'r2'"):
        QDQRewrite("onnxruntime")(model, plan)

    def refuse(model, opset):
        raise RuntimeError("no adapter for op Foo\nmore lines")

    monkeypatch.setattr(onnx.version_converter, "convert_version", refuse)
    with pytest.raises(OnnxlrfError) as raised:
        QDQRewrite("tensorrt")(matmul_model(), plan_uniform_quant(matmul_model(), QuantOptions(bits=4, block_size=16)))
    assert "\n" not in str(raised.value) and "opset 17 cannot be raised to it" in str(raised.value)


def test_w8a8_matmul_writing_a_graph_output_becomes_matmulintegertofloat():
    model = matmul_model()
    plan = plan_uniform_quant(model, QuantOptions(bits=8, activations="int8"))
    feed = {"x": np.random.default_rng(0).standard_normal((16, 64)).astype(np.float32)}
    assert [site.tensor for site in quantized_activations(model, plan, "onnxruntime")] == ["x"]  # y stays float
    plan.activation_ranges = minmax_ranges(model, ["x"], feed)
    quantized, _ = QDQRewrite("onnxruntime")(model, plan)
    assert optimized_op_counts(quantized) == {"QuantizeLinear": 1, "MatMulIntegerToFloat": 1}
    dq = next(node for node in quantized.graph.node if node.op_type == "DequantizeLinear"
              and node.output[0] == quantized.graph.node[-1].input[1])
    assert {a.name: a.i for a in dq.attribute} == {"axis": 1}  # per output column of the (in, out) weight
    assert np.abs(run(quantized, feed) - run(model, feed)).max() < 0.05 * np.abs(run(model, feed)).max()


def test_an_old_opset_is_raised_to_13_for_per_channel_scales_and_a_broadcast_bias_stays_float():
    model = residual_cnn(opset=11)
    fc_b = next(init for init in model.graph.initializer if init.name == "fc_b")
    fc_b.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(fc_b).reshape(1, -1), "fc_b"))
    plan = w8a8_plan(model, "onnxruntime")
    quantized, _ = QDQRewrite("onnxruntime")(model, plan)
    onnx.checker.check_model(quantized, full_check=True)
    assert [o.version for o in quantized.opset_import if o.domain in ("", "ai.onnx")] == [13]
    fc = next(node for node in quantized.graph.node if node.name == "fc")
    assert fc.input[2] == "fc_b"
    feed = {"input": images(8, seed=3)}
    assert np.abs(run(quantized, feed) - run(model, feed)).max() < 0.05 * np.abs(run(model, feed)).max()


def transformer_block(width: int = 32, seed: int = 0) -> onnx.ModelProto:
    """x (N, tokens, width) -> MatMul -> bias Add -> residual Add with x -> y: a transformer's projection and its
    skip path."""
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array((rng.standard_normal((width, width)) * 0.2).astype(np.float32), "W"),
             numpy_helper.from_array((rng.standard_normal(width) * 0.1).astype(np.float32), "b")]
    nodes = [onnx.helper.make_node("MatMul", ["x", "W"], ["proj"], "proj"),
             onnx.helper.make_node("Add", ["proj", "b"], ["biased"], "bias"),
             onnx.helper.make_node("Add", ["biased", "x"], ["y"], "residual")]
    graph = onnx.helper.make_graph(nodes, "block",
                                   [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 4, width])],
                                   [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 4, width])],
                                   inits)
    return onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)], ir_version=8)


def test_w8a8_projection_keeps_its_output_and_the_skip_path_float():
    # MiniLM's W8A8 lost 0.031 Spearman when every projection's output went through a uint8 grid and its
    # residual Adds read the quantized input; with both float it lost 0.001.
    model = transformer_block()
    plan = plan_uniform_quant(model, QuantOptions(bits=8, activations="int8"))
    sites = quantized_activations(model, plan, "onnxruntime")
    assert [(site.tensor, site.readers) for site in sites] == [("x", [("proj", 0)])]
    feed = {"x": np.random.default_rng(1).standard_normal((16, 4, 32)).astype(np.float32)}
    plan.activation_ranges = minmax_ranges(model, ["x"], feed)
    quantized, _ = QDQRewrite("onnxruntime")(model, plan)
    assert optimized_op_counts(quantized).get("MatMulIntegerToFloat") == 1
    residual = next(node for node in quantized.graph.node if node.name == "residual")
    assert "x" in residual.input  # the skip path reads the float input, not its dequantized copy


@pytest.mark.parametrize("machine, cpuinfo, expected", [
    ("x86_64", "flags : fpu avx2 avx512f", 7),  # no VNNI: u8 x s8 pairs add in int16
    ("x86_64", "flags : fpu avx2 avx512_vnni", 8),
    ("x86_64", "flags : fpu avx2 avx_vnni", 8),
    ("aarch64", "", 8),
])
def test_reduce_range_auto_follows_this_machines_kernels(monkeypatch, tmp_path, machine, cpuinfo, expected):
    from onnxlrf.techniques.quant import planners

    monkeypatch.setattr(planners.platform, "machine", lambda: machine)
    (tmp_path / "cpuinfo").write_text(cpuinfo)
    real_path = planners.Path
    monkeypatch.setattr(planners, "Path", lambda p: real_path(tmp_path / "cpuinfo") if p == "/proc/cpuinfo"
                        else real_path(p))
    assert planners.w8a8_weight_bits(QuantOptions(bits=8, activations="int8", reduce_range="auto")) == expected
    assert planners.w8a8_weight_bits(QuantOptions(bits=8, activations="int8")) == 7  # the default: any x86 CPU
    assert planners.w8a8_weight_bits(QuantOptions(bits=8, activations="int8", reduce_range="on")) == 7
    assert planners.w8a8_weight_bits(QuantOptions(bits=8, activations="int8", reduce_range="off")) == 8
    assert planners.w8a8_weight_bits(QuantOptions(bits=8, activations="int8", runtime="tensorrt",
                                                  reduce_range="on")) == 8  # TensorRT's form keeps 8 bits
