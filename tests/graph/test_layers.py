"""find_layers, weight_array, weight_matrices, svd."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from onnxlrf.graph.layers import (
    Layer,
    count_params,
    find_layers,
    matrices_to_weight,
    weight_array,
    weight_matrices,
)
from onnxlrf.graph.linalg import singular_values, svd
from onnxlrf.measure.coverage import analysis_exclusion
from onnxlrf.onnx_io import load_onnx

RNG = np.random.default_rng(1)


def graph_model(nodes, initializers, inputs=("x",)):
    """A model holding ``nodes``; only analysed, never run, so shapes need not be consistent."""
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in inputs],
        [helper.make_tensor_value_info(nodes[-1].output[0], TensorProto.FLOAT, None)],
        [numpy_helper.from_array(v, k) for k, v in initializers.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def weights(*shape):
    return RNG.standard_normal(shape).astype(np.float32)


def test_layers_and_skipped_nodes_with_reasons():
    nodes = [
        helper.make_node("Conv", ["x", "c1"], ["a"], name="conv"),
        helper.make_node("Conv", ["x", "grouped"], ["b"], name="grouped", group=2),
        helper.make_node("Conv", ["x", "dw"], ["c"], name="depthwise", group=8),
        helper.make_node("Gemm", ["x", "g0"], ["d"], name="gemm_n", transB=0),
        helper.make_node("Gemm", ["x", "g1"], ["e"], name="gemm_t", transB=1),
        helper.make_node("MatMul", ["x", "m"], ["f"], name="matmul"),
        helper.make_node("MatMul", ["m", "x"], ["g"], name="matmul_left"),
        helper.make_node("MatMul", ["x", "m3"], ["h"], name="matmul_3d"),
        helper.make_node("MatMul", ["x", "y"], ["i"], name="matmul_dynamic"),
        helper.make_node("Gemm", ["x", "tiny"], ["j"], name="gemm_tiny", transB=1),
        helper.make_node("DequantizeLinear", ["qw", "scale"], ["dq"], name="dequant"),
        helper.make_node("Conv", ["x", "dq"], ["k"], name="conv_dq"),
        helper.make_node("QLinearConv", ["x", "s", "z", "qw", "s", "z", "s", "z"], ["l"], name="qconv"),
        helper.make_node("MatMulInteger", ["x", "qw"], ["n"], name="mmint"),
        helper.make_node("MatMul", ["x", "m"], ["o"]),
        helper.make_node("Relu", ["o"], ["p"], name="relu"),
    ]
    inits = {
        "c1": weights(16, 8, 3, 3), "grouped": weights(12, 4, 1, 1), "dw": weights(8, 1, 3, 3),
        "g0": weights(32, 10), "g1": weights(10, 32), "m": weights(24, 6), "m3": weights(2, 24, 6),
        "tiny": weights(1, 32),
    }
    model = graph_model(nodes, inits, inputs=("x", "y"))
    layers, skipped = find_layers(model)
    by_node = {layer.node: layer for layer in layers}
    assert list(by_node) == ["conv", "grouped", "gemm_n", "gemm_t", "matmul"]
    assert by_node["conv"] == Layer("conv", "Conv", "c1", (16, 8, 3, 3), 1, 16, 72, (3, 3), ("channel", "spatial"),
                                    16 * 72)
    assert (by_node["grouped"].groups, by_node["grouped"].out_features, by_node["grouped"].in_features) == (2, 6, 4)
    assert by_node["grouped"].decompositions == ("channel",)  # spatial needs groups == 1 and a kernel > 1x1
    for name in ("gemm_n", "gemm_t"):
        assert (by_node[name].out_features, by_node[name].in_features) == (10, 32)
    assert (by_node["matmul"].out_features, by_node["matmul"].in_features) == (6, 24)
    reasons = {s.node: s.reason for s in skipped}
    assert "depthwise" in reasons["depthwise"]
    assert "first MatMul input" in reasons["matmul_left"]
    assert "rank 3" in reasons["matmul_3d"]
    assert "not a constant" in reasons["matmul_dynamic"]
    assert "too small" in reasons["gemm_tiny"]
    assert "dequantized from integers" in reasons["conv_dq"]
    assert "quantized" in reasons["qconv"] and "quantized" in reasons["mmint"]
    assert "no name" in reasons[""]
    assert "relu" not in reasons


def test_layer_rank_and_param_arithmetic():
    layer = find_layers(graph_model([helper.make_node("Conv", ["x", "w"], ["y"], name="c", group=2)],
                                    {"w": weights(12, 4, 3, 3)}))[0][0]
    assert layer.params == 12 * 4 * 9
    assert layer.max_rank("channel") == 6  # per group: 6 x 36
    assert layer.factorized_params("channel", 2) == 2 * 2 * (6 + 36)
    # largest r with 2 * r * 42 < 432 is 5
    assert layer.break_even_rank("channel") == 5
    square = find_layers(graph_model([helper.make_node("MatMul", ["x", "w"], ["y"], name="m")],
                                     {"w": weights(10, 10)}))[0][0]
    assert square.break_even_rank("channel") == 4  # 4 * 20 = 80 < 100 <= 5 * 20


def test_spatial_matrix_layout_and_rank():
    w = weights(5, 3, 2, 4)
    layer = find_layers(graph_model([helper.make_node("Conv", ["x", "w"], ["y"], name="c")], {"w": w}))[0][0]
    mats = weight_matrices(w, layer, "spatial")
    assert mats.shape == (1, 3 * 2, 5 * 4)
    for o, c, i, j in [(0, 0, 0, 0), (4, 2, 1, 3), (2, 1, 0, 2)]:
        assert mats[0, c * 2 + i, o * 4 + j] == w[o, c, i, j]
    assert layer.max_rank("spatial") == 6 and layer.factorized_params("spatial", 2) == 2 * (6 + 20)


def test_channel_matrices_per_group():
    w = weights(6, 2, 3, 3)
    layer = find_layers(graph_model([helper.make_node("Conv", ["x", "w"], ["y"], name="c", group=3)], {"w": w}))[0][0]
    mats = weight_matrices(w, layer, "channel")
    assert mats.shape == (3, 2, 18)
    np.testing.assert_array_equal(mats[1], w[2:4].reshape(2, 18))


def conv_kinds_model():
    """One node of each conv kind: grouped, depthwise (multiplier 1 and 2), 1-D, 3-D, ConvTranspose
    (2-D, 1-D grouped, depthwise)."""
    nodes = [
        helper.make_node("Conv", ["x", "grouped"], ["a"], name="grouped", group=2),
        helper.make_node("Conv", ["x", "dw"], ["b"], name="depthwise", group=8),
        helper.make_node("Conv", ["x", "dw2"], ["c"], name="depthwise_x2", group=8),
        helper.make_node("Conv", ["x", "c1d"], ["d"], name="conv1d"),
        helper.make_node("Conv", ["x", "c3d"], ["e"], name="conv3d"),
        helper.make_node("ConvTranspose", ["x", "t2d"], ["f"], name="convt2d", strides=[2, 2]),
        helper.make_node("ConvTranspose", ["x", "t1d"], ["g"], name="convt1d_grouped", group=2),
        helper.make_node("ConvTranspose", ["x", "tdw"], ["h"], name="convt_depthwise", group=8),
    ]
    return graph_model(nodes, {
        "grouped": weights(12, 4, 3, 3), "dw": weights(8, 1, 3, 3), "dw2": weights(16, 1, 3, 3),
        "c1d": weights(16, 8, 5), "c3d": weights(16, 8, 3, 3, 3), "t2d": weights(8, 16, 4, 4),
        "t1d": weights(8, 6, 3), "tdw": weights(8, 2, 4, 4)})


def test_conv_kinds_factorized_or_dense_with_reasons():
    layers, skipped = find_layers(conv_kinds_model())
    by_node = {layer.node: layer for layer in layers}
    assert list(by_node) == ["grouped", "conv1d", "conv3d", "convt2d", "convt1d_grouped"]
    shapes = {node: (layer.matrix_shape("channel"), layer.decompositions) for node, layer in by_node.items()}
    assert shapes == {
        "grouped": ((2, 6, 36), ("channel",)),  # spatial: one group only
        "conv1d": ((1, 16, 40), ("channel",)),  # spatial: 2-D kernels only
        "conv3d": ((1, 16, 216), ("channel",)),
        "convt2d": ((1, 8, 256), ("channel",)),  # (Cin/g) x (Cout/g * kernel): rows are input channels
        "convt1d_grouped": ((2, 4, 18), ("channel",)),
    }
    reasons = {s.node: s.reason for s in skipped}
    assert reasons.keys() == {"depthwise", "depthwise_x2", "convt_depthwise"}
    assert reasons["depthwise"].startswith("depthwise Conv (one input channel per group): stays dense")
    assert "8 groups is a 1x9 matrix, of rank 1" in reasons["depthwise"]
    assert "2x9 matrix, where a factor pair would save at most 7 of 18 weights" in reasons["depthwise_x2"]
    assert reasons["convt_depthwise"].startswith("depthwise ConvTranspose") and "1x32 matrix" in reasons[
        "convt_depthwise"]
    assert {node: analysis_exclusion(layer) is None for node, layer in by_node.items()} == {
        "grouped": True, "conv1d": True, "conv3d": False, "convt2d": False, "convt1d_grouped": False}
    assert "not 3-D" in analysis_exclusion(by_node["conv3d"])
    assert "ConvTranspose" in analysis_exclusion(by_node["convt2d"])


def test_conv_transpose_matrices_are_the_weight_reshaped_per_group():
    w = weights(6, 5, 2, 3)  # (Cin, Cout/g, kh, kw), 2 groups: per group 3 input channels x (5 * 6)
    model = graph_model([helper.make_node("ConvTranspose", ["x", "w"], ["y"], name="t", group=2)], {"w": w})
    (layer,), _ = find_layers(model)
    mats = weight_matrices(w, layer, "channel")
    assert mats.shape == (2, 3, 30) and layer.max_rank("channel") == 3
    np.testing.assert_array_equal(mats[1], w[3:].reshape(3, 30))
    np.testing.assert_array_equal(matrices_to_weight(mats, layer, "channel"), w)
    assert layer.factorized_params("channel", 2) == 2 * 2 * (3 + 30) and layer.break_even_rank("channel") == 2


@pytest.mark.parametrize("op, attrs, shape, orient", [
    ("Gemm", {"transB": 0}, (12, 5), "T"),
    ("Gemm", {"transB": 1}, (5, 12), "same"),
    ("MatMul", {}, (12, 5), "T"),
])
def test_linear_matrix_is_out_by_in(op, attrs, shape, orient):
    w = weights(*shape)
    layer = find_layers(graph_model([helper.make_node(op, ["x", "w"], ["y"], name="n", **attrs)], {"w": w}))[0][0]
    mats = weight_matrices(w, layer, "channel")
    assert mats.shape == (1, 5, 12)
    np.testing.assert_array_equal(mats[0], w.T if orient == "T" else w)


def test_weight_array_from_initializer_and_constant_node():
    w = weights(8, 4)
    model = graph_model([
        helper.make_node("Constant", [], ["cw"], name="const", value=numpy_helper.from_array(w)),
        helper.make_node("MatMul", ["x", "cw"], ["a"], name="from_constant"),
        helper.make_node("MatMul", ["a", "init"], ["b"], name="from_initializer"),
    ], {"init": weights(4, 7)})
    layers, skipped = find_layers(model)
    assert [layer.weight for layer in layers] == ["cw", "init"] and skipped == []
    np.testing.assert_array_equal(weight_array(model, layers[0]), w)
    np.testing.assert_array_equal(weight_array(model, layers[1]), numpy_helper.to_array(model.graph.initializer[0]))


def test_overridable_initializer_is_not_a_constant_weight():
    model = graph_model([helper.make_node("MatMul", ["x", "w"], ["y"], name="m")], {"w": weights(8, 8)},
                        inputs=("x", "w"))
    layers, skipped = find_layers(model)
    assert layers == [] and "not a constant" in skipped[0].reason


def test_svd_float64_descending_reconstructs():
    threads = torch.get_num_threads()
    mats = weights(3, 7, 5)
    u, s, vh = svd(mats)
    assert torch.get_num_threads() == threads
    assert u.dtype == s.dtype == vh.dtype == np.float64
    assert (u.shape, s.shape, vh.shape) == ((3, 7, 5), (3, 5), (3, 5, 5))
    assert np.all(np.diff(s, axis=1) <= 0)
    np.testing.assert_allclose(u * s[:, None, :] @ vh, mats, atol=1e-6)
    np.testing.assert_allclose(singular_values(mats), s, rtol=1e-10)


def test_svd_retries_on_the_transposes_where_lapack_fails(monkeypatch):
    """LAPACK's gesdd does not converge on some rank-deficient matrices (a MiniLM refit hit it):
    the SVD then comes from the transposed matrices."""
    lapack = torch.linalg.svd
    calls = []

    def failing_when_tall(a, full_matrices=True):
        calls.append(tuple(a.shape))
        if a.shape[-2] > a.shape[-1]:
            raise torch.linalg.LinAlgError("linalg.svd: The algorithm failed to converge")
        return lapack(a, full_matrices=full_matrices)

    monkeypatch.setattr(torch.linalg, "svd", failing_when_tall)
    mats = weights(3, 7, 5)
    mats[:, :, 4] = mats[:, :, 3]  # rank deficient, as the failing matrix was
    u, s, vh = svd(mats)
    assert calls == [(3, 7, 5), (3, 5, 7)]
    assert (u.shape, s.shape, vh.shape) == ((3, 7, 5), (3, 5), (3, 5, 5))
    np.testing.assert_allclose(u * s[:, None, :] @ vh, mats, atol=1e-12)
    np.testing.assert_allclose(np.swapaxes(u, 1, 2) @ u, np.broadcast_to(np.eye(5), (3, 5, 5)), atol=1e-12)
    np.testing.assert_allclose(s, np.linalg.svd(mats, compute_uv=False), atol=1e-12)


def test_real_int8_model_is_reported_not_factorizable(shufflenet_int8):
    layers, skipped = find_layers(load_onnx(shufflenet_int8))
    assert layers == []
    assert {s.op_type for s in skipped} == {"QLinearConv", "QLinearMatMul"}
    assert all("quantized" in s.reason for s in skipped)


def test_nonfinite_weights_nan_anywhere_inf_only_in_layer_inputs():
    """-Inf in a mask or fill value is how exported attention looks (MiniLM); in a MatMul/Conv weight it is broken."""
    from onnxlrf.errors import OnnxlrfError
    from onnxlrf.graph.layers import check_finite_weights, nonfinite_weights

    mask = np.where(np.triu(np.ones((4, 4)), 1) > 0, -np.inf, 0).astype(np.float32)

    def model(weight: np.ndarray, scale: np.ndarray):
        nodes = [
            helper.make_node("Constant", [], ["fill"], name="fill", value=numpy_helper.from_array(
                np.array(-np.inf, np.float32))),
            helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
            helper.make_node("Add", ["h", "mask"], ["masked"], name="add"),
            helper.make_node("Mul", ["masked", "scale"], ["scaled"], name="mul"),
            helper.make_node("Max", ["scaled", "fill"], ["y"], name="max"),
        ]
        graph = helper.make_graph(
            nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 4])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 4])],
            [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(mask, "mask"),
             numpy_helper.from_array(scale, "scale")])
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)

    weight, scale = np.eye(4, dtype=np.float32), np.ones(4, np.float32)
    assert nonfinite_weights(model(weight, scale)) == []  # the mask and the fill value are fine
    check_finite_weights(model(weight, scale))
    bad_weight = weight.copy()
    bad_weight[0, 1] = np.inf
    assert nonfinite_weights(model(bad_weight, scale)) == ["w"]
    bad_scale = scale.copy()
    bad_scale[2] = np.nan
    assert nonfinite_weights(model(weight, bad_scale)) == ["scale"]
    with pytest.raises(OnnxlrfError, match="weight 'w' of the model contains NaN or Inf \\(and 1 more\\)"):
        check_finite_weights(model(bad_weight, bad_scale))


def test_a_weight_read_inside_a_subgraph_stays_dense():
    """A weight an If branch reads too cannot go: factorizing it would add the factors and keep the weight."""
    from onnxlrf.graph.layers import dense_weight_reasons
    from onnxlrf.techniques.lowrank.planners import plan_uniform
    from onnxlrf.techniques.lowrank.rewrite import apply_plan

    rng = np.random.default_rng(0)
    weights = {"w": rng.standard_normal((32, 32)).astype(np.float32),
               "v": rng.standard_normal((32, 32)).astype(np.float32), "flag": np.array(True)}
    branch = lambda name: helper.make_graph(  # noqa: E731
        [helper.make_node("MatMul", ["h", "w"], [f"{name}_out"], name=f"{name}_mm")], name, [],
        [helper.make_tensor_value_info(f"{name}_out", TensorProto.FLOAT, [4, 32])])
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="fc_w"),
             helper.make_node("MatMul", ["h", "v"], ["k"], name="fc_v"),
             helper.make_node("If", ["flag"], ["y"], name="branch", then_branch=branch("then"),
                              else_branch=branch("else")),
             helper.make_node("Add", ["y", "k"], ["z"], name="sum")]
    graph = helper.make_graph(nodes, "sub", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 32])],
                              [helper.make_tensor_value_info("z", TensorProto.FLOAT, [4, 32])],
                              [numpy_helper.from_array(v, k) for k, v in weights.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model, full_check=True)
    assert dense_weight_reasons(model) == {"w": "weight also read inside a subgraph (an If, Loop or Scan body)"}
    plan = plan_uniform(model, rank_fraction=0.25)
    by_node = {entry.node: entry for entry in plan.layers}
    assert not by_node["fc_w"].changed and by_node["fc_v"].changed
    compressed, _ = apply_plan(model, plan)
    assert count_params(compressed) == count_params(model) - plan.summary()["params_removed"] < count_params(model)


def test_quantized_weights_count_as_parameters():
    levels = numpy_helper.from_array(np.ones((4, 3), np.int8), "w_q")
    scale = numpy_helper.from_array(np.ones(4, np.float32), "w_scale")
    graph = helper.make_graph(
        [helper.make_node("DequantizeLinear", ["w_q", "w_scale"], ["w"], axis=0),
         helper.make_node("Gemm", ["x", "w"], ["y"], transB=1)], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], [levels, scale])
    assert count_params(helper.make_model(graph)) == 12 + 4
