"""apply_plan: every node kind, exactness at full rank, low-rank = numpy reconstruction, preservation."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from onnxlrf.costs.flops import FlopsCost
from onnxlrf.errors import OnnxlrfError
from onnxlrf.graph.layers import count_params, find_layers
from onnxlrf.onnx_io import load_onnx
from onnxlrf.planning.plan import LowRankEntry, Plan
from onnxlrf.runtime.shapes import count_flops
from onnxlrf.techniques.lowrank.planners import plan_full_rank, plan_uniform
from onnxlrf.techniques.lowrank.rewrite import apply_plan, truncate_weights

RNG = np.random.default_rng(0)


def make_model(nodes, inputs, output, initializers, opset=17):
    """``inputs``: {name: shape}; ``output``: (name, shape)."""
    graph = helper.make_graph(
        nodes, "test-graph",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs.items()],
        [helper.make_tensor_value_info(output[0], TensorProto.FLOAT, output[1])],
        [numpy_helper.from_array(v, k) for k, v in initializers.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="tests")
    model.ir_version = 8
    if output[1] is None:  # let shape inference fill in the output shape
        model = onnx.shape_inference.infer_shapes(model, strict_mode=True)
        del model.graph.value_info[:]
    onnx.checker.check_model(model, full_check=True)
    return model


def feeds_for(model):
    feeds = {}
    for inp in model.graph.input:
        shape = [d.dim_value for d in inp.type.tensor_type.shape.dim]
        feeds[inp.name] = RNG.standard_normal(shape).astype(np.float32)
    return feeds


def run(model, feeds):
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)[0]


def rel_diff(a, b):
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))


def check_valid(model):
    """checker + shape inference, and every graph output / value_info has static dims."""
    onnx.checker.check_model(model, full_check=True)
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    for vi in list(inferred.graph.value_info) + list(inferred.graph.output):
        dims = vi.type.tensor_type.shape.dim
        assert all(d.HasField("dim_value") for d in dims), vi.name


def with_weight(model, name, value):
    """A copy of ``model`` whose initializer ``name`` holds ``value``."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for tensor in out.graph.initializer:
        if tensor.name == name:
            tensor.CopyFrom(numpy_helper.from_array(value.astype(np.float32), name))
    return out


def reconstruct(weight, layer, decomposition, keep):
    """numpy low-rank reconstruction of ``weight`` keeping SVD components ``keep``, in the stored layout."""
    conv = layer.op_type in ("Conv", "ConvTranspose")
    if conv and decomposition == "spatial":
        cout, cin, kh, kw = weight.shape
        mats = weight.transpose(1, 2, 0, 3).reshape(1, cin * kh, cout * kw)
    elif conv:  # per group: Conv (Cout/g) x (Cin/g * k), ConvTranspose (Cin/g) x (Cout/g * k)
        mats = weight.reshape(layer.groups, weight.shape[0] // layer.groups, -1)
    else:
        mats = (weight.T if layer.transposed else weight)[None]
    out = []
    for mat in mats.astype(np.float64):
        u, s, vh = np.linalg.svd(mat, full_matrices=False)
        out.append((u[:, keep] * s[keep]) @ vh[keep])
    out = np.stack(out)
    if conv and decomposition == "spatial":
        return out.reshape(cin, kh, cout, kw).transpose(2, 0, 1, 3)
    if conv:
        return out.reshape(weight.shape)
    return out[0].T if layer.transposed else out[0]


def entry(layer, decomposition, rank, keep=None):
    return LowRankEntry(layer.node, layer.op_type, layer.weight, list(layer.weight_shape), decomposition, rank,
                     layer.max_rank(decomposition), keep, layer.params, layer.factorized_params(decomposition, rank))


def one_layer_plan(model, decomposition, rank, keep=None):
    (layer,), _ = find_layers(model)
    return layer, Plan([entry(layer, decomposition, rank, keep)], mode="test")


def assert_full_rank_exact(model, decomposition="channel"):
    feeds = feeds_for(model)
    plan = plan_full_rank(model, decomposition)
    out, report = apply_plan(model, plan, keep_dense_if_larger=False)
    check_valid(out)
    assert len(report.rewritten) == len(plan.layers) > 0
    assert rel_diff(run(out, feeds), run(model, feeds)) <= 1e-4


def assert_low_rank_matches(model, decomposition, rank, keep=None):
    """Rewritten model == dense model with the numpy reconstruction; exact planned parameter count."""
    feeds = feeds_for(model)
    layer, plan = one_layer_plan(model, decomposition, rank, keep)
    out, report = apply_plan(model, plan)
    check_valid(out)
    planned = layer.factorized_params(decomposition, rank)
    assert planned < layer.params
    assert count_params(out) == count_params(model) - layer.params + planned
    assert report.params_after == count_params(out)
    weight = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == layer.weight))
    keep = keep if keep is not None else list(range(rank))
    expected = run(with_weight(model, layer.weight, reconstruct(weight, layer, decomposition, keep)), feeds)
    assert rel_diff(run(out, feeds), expected) <= 1e-4
    return out


def conv_model(cin=6, cout=8, kernel=(3, 3), size=(9, 11), groups=1, bias=True, **attrs):
    weight = RNG.standard_normal((cout, cin // groups, *kernel)).astype(np.float32)
    inits = {"W": weight}
    inputs = ["x", "W"]
    if bias:
        inits["B"] = RNG.standard_normal(cout).astype(np.float32)
        inputs.append("B")
    node = helper.make_node("Conv", inputs, ["y"], name="conv", group=groups, **attrs)
    return make_model([node], {"x": [2, cin, *size]}, ("y", None), inits)


CONV2D_VARIANTS = {
    "plain": {},
    "stride": {"strides": [2, 3]},
    "pads": {"pads": [1, 2, 0, 1]},
    "dilation": {"dilations": [2, 1], "pads": [2, 1, 2, 1]},
    "stride-pad-dilation": {"strides": [2, 1], "pads": [1, 0, 2, 1], "dilations": [1, 2]},
    "same-upper": {"auto_pad": "SAME_UPPER", "strides": [2, 2]},
    "same-lower": {"auto_pad": "SAME_LOWER", "strides": [2, 1]},
    "valid": {"auto_pad": "VALID", "strides": [1, 2]},
}


@pytest.mark.parametrize("decomposition", ["channel", "spatial"])
@pytest.mark.parametrize("variant", sorted(CONV2D_VARIANTS))
def test_conv2d_full_rank_is_exact(variant, decomposition):
    assert_full_rank_exact(conv_model(**CONV2D_VARIANTS[variant]), decomposition)


@pytest.mark.parametrize("variant", ["plain", "stride-pad-dilation", "same-upper", "same-lower", "valid"])
@pytest.mark.parametrize("decomposition", ["channel", "spatial"])
def test_conv2d_low_rank_matches_reconstruction(variant, decomposition):
    assert_low_rank_matches(conv_model(cin=8, cout=16, **CONV2D_VARIANTS[variant]), decomposition, 3)


def test_conv_kernel_5x3_spatial_and_no_bias():
    model = conv_model(kernel=(5, 3), bias=False, pads=[2, 1, 2, 1])
    assert_full_rank_exact(model, "spatial")
    assert_low_rank_matches(model, "spatial", 4)


def test_grouped_conv_is_factorized_per_group():
    model = conv_model(cin=8, cout=12, groups=2, pads=[1, 1, 1, 1])
    (layer,), _ = find_layers(model)
    assert (layer.groups, layer.out_features, layer.in_features) == (2, 6, 36)
    assert layer.decompositions == ("channel",)
    assert_full_rank_exact(model)
    out = assert_low_rank_matches(model, "channel", 2)
    convs = [n for n in out.graph.node if n.op_type == "Conv"]
    assert [onnx.helper.get_attribute_value(a) for n in convs for a in n.attribute if a.name == "group"] == [2, 2]


def test_depthwise_conv_stays_dense():
    model = conv_model(cin=8, cout=8, groups=8)
    layers, skipped = find_layers(model)
    assert layers == [] and "depthwise" in skipped[0].reason
    out, report = apply_plan(model, plan_full_rank(model), keep_dense_if_larger=False)
    assert report.rewritten == [] and [n.op_type for n in out.graph.node] == ["Conv"]


@pytest.mark.parametrize("kernel, size, attrs", [
    ((3,), (17,), {"strides": [2], "pads": [1, 2]}),
    ((2, 3, 3), (5, 6, 7), {"pads": [0, 1, 1, 1, 1, 0], "dilations": [1, 1, 2]}),
])
def test_conv1d_conv3d_channel(kernel, size, attrs):
    model = conv_model(cin=4, cout=10, kernel=kernel, size=size, **attrs)
    (layer,), _ = find_layers(model)
    assert layer.decompositions == ("channel",)
    assert_full_rank_exact(model)
    out = assert_low_rank_matches(model, "channel", 2)
    second = next(n for n in out.graph.node if n.name == "conv/lrf_b")
    kernel_shape = next(a for a in second.attribute if a.name == "kernel_shape")
    assert list(kernel_shape.ints) == [1] * len(kernel)


def conv_transpose_model(cin=6, cout=8, kernel=(3, 3), size=(5, 6), groups=1, bias=True, **attrs):
    weight = RNG.standard_normal((cin, cout // groups, *kernel)).astype(np.float32)
    inits = {"W": weight}
    if bias:
        inits["B"] = RNG.standard_normal(cout).astype(np.float32)
    node = helper.make_node("ConvTranspose", ["x", *inits], ["y"], name="convt", group=groups, **attrs)
    return make_model([node], {"x": [2, cin, *size]}, ("y", None), inits)


CONV_TRANSPOSE_VARIANTS = {
    "plain": {},
    "stride2-output-padding": {"strides": [2, 2], "output_padding": [1, 0]},
    "stride-pads": {"strides": [2, 1], "pads": [1, 0, 2, 1]},
    "dilation-no-bias": {"dilations": [2, 1], "pads": [1, 1, 0, 1], "bias": False},
    "group2": {"groups": 2, "strides": [2, 2], "pads": [1, 1, 1, 1], "output_padding": [1, 1]},
    "same-upper": {"auto_pad": "SAME_UPPER", "strides": [2, 2]},
    "output-shape": {"strides": [2, 2], "output_shape": [10, 12]},
    "1d": {"kernel": (4,), "size": (7,), "strides": [2], "pads": [1, 1], "output_padding": [1]},
    "1d-group2": {"kernel": (3,), "size": (9,), "groups": 2, "strides": [3], "dilations": [2]},
    "3d": {"kernel": (2, 3, 2), "size": (3, 4, 3), "strides": [2, 1, 2]},
}


@pytest.mark.parametrize("variant", sorted(CONV_TRANSPOSE_VARIANTS))
def test_conv_transpose_full_rank_is_exact_and_truncation_matches(variant):
    """1x1 Conv (Cin -> r*g) then ConvTranspose (r*g -> Cout, the original attributes): exact at full rank."""
    model = conv_transpose_model(**CONV_TRANSPOSE_VARIANTS[variant])
    (layer,), skipped = find_layers(model)
    assert layer.op_type == "ConvTranspose" and layer.decompositions == ("channel",) and skipped == []
    feeds = feeds_for(model)
    full, report = apply_plan(model, plan_full_rank(model), keep_dense_if_larger=False)
    check_valid(full)
    assert [r["node"] for r in report.rewritten] == ["convt"]
    expected = run(model, feeds)
    assert float(np.abs(run(full, feeds) - expected).max()) <= 1e-5 * max(float(np.abs(expected).max()), 1.0)

    out = assert_low_rank_matches(model, "channel", 2)
    first, second = out.graph.node
    attrs = {a.name: helper.get_attribute_value(a) for a in second.attribute}
    original = {a.name: helper.get_attribute_value(a) for a in model.graph.node[0].attribute}
    assert (first.op_type, second.op_type) == ("Conv", "ConvTranspose") and attrs == original
    assert {a.name: helper.get_attribute_value(a) for a in first.attribute} == {
        "kernel_shape": [1] * len(layer.kernel), **({"group": layer.groups} if layer.groups > 1 else {})}
    assert list(second.input[2:]) == list(model.graph.node[0].input[2:])  # the bias goes on the ConvTranspose


def test_conv_transpose_uniform_plan_removes_the_parameters_and_flops_it_says():
    model = conv_transpose_model(cin=16, cout=12, kernel=(4, 4), size=(6, 6), groups=2, strides=[2, 2],
                                 pads=[1, 1, 1, 1])
    (layer,), _ = find_layers(model)
    plan = plan_uniform(model, rank_fraction=0.5)
    (planned,) = plan.layers
    assert (planned.decomposition, planned.rank) == ("channel", 4)  # per group 8 x 96, half of rank 8
    out, report = apply_plan(model, plan)
    check_valid(out)
    assert report.params_after == count_params(out) == count_params(model) - plan.summary()["params_removed"]
    assert count_params(model) - count_params(out) == layer.params - 2 * 4 * (8 + 96)
    cost = FlopsCost(model)
    assert count_flops(model) == cost.dense([layer])
    assert count_flops(out) == cost.factorized([layer], "channel", 4) < cost.dense([layer])


def test_conv_transpose_refuses_bias_correction_and_depthwise_stays_dense():
    model = conv_transpose_model()
    layer, plan = one_layer_plan(model, "channel", 2)
    corrected = Plan([dataclasses.replace(plan.layers[0], bias_correction=True)], mode="test")
    with pytest.raises(OnnxlrfError, match="ConvTranspose takes no bias correction"):
        apply_plan(model, corrected)
    depthwise = conv_transpose_model(cin=8, cout=16, groups=8, strides=[2, 2])
    layers, skipped = find_layers(depthwise)
    assert layers == [] and skipped[0].reason.startswith("depthwise ConvTranspose")
    out, report = apply_plan(depthwise, plan_full_rank(depthwise), keep_dense_if_larger=False)
    assert report.rewritten == [] and [n.op_type for n in out.graph.node] == ["ConvTranspose"]


def gemm_model(trans_a, trans_b, bias, alpha, beta, m=3, k=12, n=10):
    weight = RNG.standard_normal((n, k) if trans_b else (k, n)).astype(np.float32)
    inits = {"W": weight}
    inputs = ["a", "W"]
    if bias == "vector":
        inits["C"] = RNG.standard_normal(n).astype(np.float32)
    elif bias == "matrix":
        inits["C"] = RNG.standard_normal((m, n)).astype(np.float32)
    if bias != "none":
        inputs.append("C")
    attrs = {"transA": trans_a, "transB": trans_b}
    if alpha is not None:
        attrs.update(alpha=alpha, beta=beta)
    node = helper.make_node("Gemm", inputs, ["y"], name="gemm", **attrs)
    return make_model([node], {"a": [k, m] if trans_a else [m, k]}, ("y", [m, n]), inits)


@pytest.mark.parametrize("trans_a", [0, 1])
@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("bias", ["none", "vector", "matrix"])
@pytest.mark.parametrize("alpha, beta", [(None, None), (0.5, 2.0)])
def test_gemm_all_attribute_combinations(trans_a, trans_b, bias, alpha, beta):
    model = gemm_model(trans_a, trans_b, bias, alpha, beta)
    assert_full_rank_exact(model)
    assert_low_rank_matches(model, "channel", 3)


@pytest.mark.parametrize("activation_shape", [[2, 5, 16], [2, 3, 4, 16], [16]])
def test_matmul_nd_activation(activation_shape):
    weight = RNG.standard_normal((16, 12)).astype(np.float32)
    node = helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")
    model = make_model([node], {"x": activation_shape}, ("y", activation_shape[:-1] + [12]), {"W": weight})
    (layer,), _ = find_layers(model)
    assert (layer.out_features, layer.in_features) == (12, 16)
    assert_full_rank_exact(model)
    assert_low_rank_matches(model, "channel", 4)


def test_keep_subset_matches_reconstruction_with_those_components():
    assert_low_rank_matches(conv_model(cin=8, cout=16, pads=[1, 1, 1, 1]), "channel", 3, keep=[5, 0, 9])
    assert_low_rank_matches(conv_model(cin=8, cout=16), "spatial", 2, keep=[1, 7])
    assert_low_rank_matches(gemm_model(0, 1, "vector", 0.5, 2.0, k=20, n=16), "channel", 3, keep=[2, 4, 11])


def shared_weight_model(third_user=False):
    weight = RNG.standard_normal((16, 16)).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["h"], name="mm1"),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("MatMul", ["r", "W"], ["y"], name="mm2"),
    ]
    if third_user:
        nodes.append(helper.make_node("Add", ["y", "W"], ["z"], name="add"))
    output = ("z" if third_user else "y", [16, 16])
    return make_model(nodes, {"x": [16, 16]}, output, {"W": weight})


def shared_plan(model, ranks):
    layers = {layer.node: layer for layer in find_layers(model)[0]}
    return Plan([entry(layers[node], "channel", rank) for node, rank in ranks.items()], mode="test")


def test_shared_weight_gets_one_factor_pair():
    model = shared_weight_model()
    feeds = feeds_for(model)
    out, report = apply_plan(model, shared_plan(model, {"mm1": 3, "mm2": 3}))
    check_valid(out)
    assert sorted(t.name for t in out.graph.initializer) == ["W.lrf_a.r3", "W.lrf_b.r3"]
    assert count_params(out) == 2 * 3 * 16 and len(report.rewritten) == 2
    layer = find_layers(model)[0][0]
    weight = numpy_helper.to_array(model.graph.initializer[0])
    expected = run(with_weight(model, "W", reconstruct(weight, layer, "channel", [0, 1, 2])), feeds)
    assert rel_diff(run(out, feeds), expected) <= 1e-4


def test_shared_weight_still_used_densely_is_kept():
    model = shared_weight_model(third_user=True)
    out, _ = apply_plan(model, shared_plan(model, {"mm1": 3}))
    check_valid(out)
    assert sorted(t.name for t in out.graph.initializer) == ["W", "W.lrf_a.r3", "W.lrf_b.r3"]
    assert [n.op_type for n in out.graph.node] == ["MatMul", "MatMul", "Relu", "MatMul", "Add"]


def test_shared_weight_with_different_plans_is_an_error():
    model = shared_weight_model()
    with pytest.raises(OnnxlrfError, match="share weight 'W'"):
        apply_plan(model, shared_plan(model, {"mm1": 3, "mm2": 4}))


def test_constant_node_weight():
    weight = RNG.standard_normal((20, 8)).astype(np.float32)
    nodes = [
        helper.make_node("Constant", [], ["w"], name="const", value=numpy_helper.from_array(weight)),
        helper.make_node("MatMul", ["x", "w"], ["y"], name="mm"),
    ]
    model = make_model(nodes, {"x": [3, 20]}, ("y", [3, 8]), {})
    assert count_params(model) == weight.size
    assert_full_rank_exact(model)
    out, _ = apply_plan(model, one_layer_plan(model, "channel", 2)[1])
    check_valid(out)
    assert [n.op_type for n in out.graph.node] == ["MatMul", "MatMul"]
    assert count_params(out) == 2 * (20 + 8)


def test_float16_weights_give_float16_factors():
    weight = RNG.standard_normal((8, 4, 3, 3)).astype(np.float16)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "W"], ["y"], name="conv", pads=[1, 1, 1, 1])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [1, 4, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT16, [1, 8, 6, 6])],
        [numpy_helper.from_array(weight, "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    out, _ = apply_plan(model, plan_full_rank(model), keep_dense_if_larger=False)
    check_valid(out)
    assert {t.data_type for t in out.graph.initializer} == {TensorProto.FLOAT16}
    x = {"x": RNG.standard_normal((1, 4, 6, 6)).astype(np.float16)}
    assert rel_diff(run(out, x).astype(np.float32), run(model, x).astype(np.float32)) <= 1e-2


def test_metadata_names_and_input_preserved():
    model = conv_model(pads=[1, 1, 1, 1])
    model.doc_string = "model doc"
    model.model_version = 7
    model.domain = "tests.domain"
    onnx.helper.set_model_props(model, {"onnxlrf.model": "tiny", "onnxlrf.task": "classification"})
    model.graph.node[0].doc_string = "conv doc"
    relu = helper.make_node("Relu", ["y"], ["z"], name="relu", doc_string="relu doc")
    model.graph.node.append(relu)
    model.graph.output[0].name = "z"
    model.graph.value_info.append(helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8, 9, 11]))
    before = model.SerializeToString()
    out, _ = apply_plan(model, plan_uniform(model, rank_fraction=0.25))
    check_valid(out)
    assert model.SerializeToString() == before
    assert [(o.domain, o.version) for o in out.opset_import] == [(o.domain, o.version) for o in model.opset_import]
    for attr in ("ir_version", "producer_name", "producer_version", "doc_string", "model_version", "domain"):
        assert getattr(out, attr) == getattr(model, attr)
    assert out.metadata_props == model.metadata_props
    assert out.graph.input == model.graph.input and out.graph.output == model.graph.output
    assert [vi.name for vi in out.graph.value_info] == ["y"]
    assert next(n for n in out.graph.node if n.name == "relu").doc_string == "relu doc"
    assert [n.name for n in out.graph.node] == ["conv/lrf_a", "conv/lrf_b", "relu"]
    assert next(n for n in out.graph.node if n.name == "conv/lrf_b").output == ["y"]


def test_dense_entries_and_larger_factorizations_are_reported_dense():
    model = conv_model(cin=8, cout=16)
    (layer,), _ = find_layers(model)
    full = entry(layer, "channel", layer.max_rank("channel"))
    out, report = apply_plan(model, Plan([full], mode="test"))
    assert report.rewritten == [] and "not smaller" in report.kept_dense[0]["reason"]
    assert out.graph.node == model.graph.node
    dense = LowRankEntry(layer.node, "Conv", "W", list(layer.weight_shape), "dense", None, layer.max_rank("channel"),
                      None, layer.params, layer.params)
    _, report = apply_plan(model, Plan([dense], mode="test"))
    assert report.kept_dense == [{"node": "conv", "reason": "planned dense"}]


class TinyNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(8)
        self.conv2 = torch.nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False)
        self.fc = torch.nn.Linear(16, 10)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv(x)))
        x = torch.relu(self.conv2(x))
        return self.fc(x.mean(dim=(2, 3)))


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("dynamo", [False, True])
def test_torch_exported_model_full_rank_matches(tmp_path, dynamo):
    torch.manual_seed(0)
    module = TinyNet().eval()
    with torch.no_grad():
        module.bn.running_mean.uniform_(-1, 1)
        module.bn.running_var.uniform_(0.5, 2)
    x = torch.randn(2, 3, 12, 12)
    path = tmp_path / "tiny.onnx"
    kwargs = {"dynamo": True} if dynamo else {"dynamo": False, "opset_version": 17}
    torch.onnx.export(module, (x,), str(path), input_names=["input"], output_names=["logits"], **kwargs)
    model = load_onnx(path)
    layers, _ = find_layers(model)
    assert sorted(layer.op_type for layer in layers) == ["Conv", "Conv", "Gemm"]
    feeds = {"input": x.numpy()}
    reference = run(model, feeds)
    np.testing.assert_allclose(reference, module(x).detach().numpy(), rtol=1e-4, atol=1e-4)
    for decomposition in ("channel", "spatial"):
        out, report = apply_plan(model, plan_full_rank(model, decomposition), keep_dense_if_larger=False)
        check_valid(out)
        assert len(report.rewritten) == 3
        assert [o.name for o in out.graph.output] == ["logits"]
        assert rel_diff(run(out, feeds), reference) <= 1e-4
    plan = plan_uniform(model, rank_fraction=0.5)
    out, report = apply_plan(model, plan)
    check_valid(out)
    removed = sum(e.params_dense - e.params_planned for e in plan.layers)
    assert report.params_after == count_params(model) - removed and removed > 0
    assert math.isfinite(rel_diff(run(out, feeds), reference))


def test_untouched_nodes_with_duplicate_names_are_kept_in_place():
    weight = RNG.standard_normal((8, 8)).astype(np.float32)
    nodes = [
        helper.make_node("Relu", ["x"], ["a"], name="dup"),
        helper.make_node("MatMul", ["a", "W"], ["b"], name="mm"),
        helper.make_node("Sigmoid", ["b"], ["y"], name="dup"),
    ]
    model = make_model(nodes, {"x": [4, 8]}, ("y", [4, 8]), {"W": weight})
    out, _ = apply_plan(model, one_layer_plan(model, "channel", 2)[1])
    check_valid(out)
    assert [n.op_type for n in out.graph.node] == ["Relu", "MatMul", "MatMul", "Sigmoid"]


def _matmul_model(with_bias_add):
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h" if with_bias_add else "y"], name="mm")]
    inits = {"W": RNG.standard_normal((16, 12)).astype(np.float32)}
    if with_bias_add:  # how exporters write a Linear on 3-D activations
        nodes.append(helper.make_node("Add", ["h", "b"], ["y"], name="mm_bias"))
        inits["b"] = RNG.standard_normal(12).astype(np.float32)
    return make_model(nodes, {"x": [2, 5, 16]}, ("y", [2, 5, 12]), inits)


BIAS_CORRECTION_CASES = {  # model, extra nodes the correction may add
    "conv-bias": (lambda: conv_model(pads=[1, 1, 1, 1]), 0),
    "conv-no-bias": (lambda: conv_model(bias=False), 0),
    "gemm-beta": (lambda: gemm_model(0, 1, "vector", 0.5, 2.0), 0),
    "gemm-no-bias": (lambda: gemm_model(1, 0, "none", None, None), 0),
    "matmul-then-add": (lambda: _matmul_model(True), 0),
    "matmul-alone": (lambda: _matmul_model(False), 1),
}


@pytest.mark.parametrize("case", sorted(BIAS_CORRECTION_CASES))
def test_bias_correction_adds_minus_truncation_times_mean_input(case):
    make, extra_nodes = BIAS_CORRECTION_CASES[case]
    model = make()
    (layer,), _ = find_layers(model)
    weight = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == layer.weight))
    mats = (weight.T if layer.transposed else weight)[None] if layer.op_type != "Conv" else \
        weight.reshape(1, weight.shape[0], -1)
    u, s, vh = np.linalg.svd(mats.astype(np.float64), full_matrices=False)
    mean = RNG.standard_normal((1, mats.shape[2]))
    rank = 2
    plan = Plan([entry(layer, "channel", rank)], mode="test")
    plan.layers[0].basis, plan.layers[0].bias_correction = "joint", True
    plan.bases[layer.weight] = (u, s, vh, mean)
    out, report = apply_plan(model, plan)
    check_valid(out)
    assert len(out.graph.node) == len(model.graph.node) + 1 + extra_nodes
    assert report.params_after == count_params(out)

    truncated = reconstruct(weight, layer, "channel", list(range(rank)))
    mats_r = (truncated.T if layer.transposed else truncated)[None] if layer.op_type != "Conv" else \
        truncated.reshape(1, truncated.shape[0], -1)
    shift = -np.einsum("gmn,gn->gm", mats_r - mats, mean)[0]
    feeds = feeds_for(model)
    expected = run(with_weight(model, layer.weight, truncated), feeds)
    expected = expected + (shift[:, None, None] if layer.op_type == "Conv" else shift)
    assert rel_diff(run(out, feeds), expected) <= 1e-4


def test_bias_correction_without_a_stored_mean_is_a_plan_error():
    model = conv_model()
    layer, plan = one_layer_plan(model, "channel", 2)
    plan.layers[0].bias_correction = True
    with pytest.raises(OnnxlrfError, match="bias correction"):
        apply_plan(model, plan)


@pytest.mark.parametrize("model, decomposition, rank", [
    (conv_model(groups=2), "channel", 2),
    (conv_model(), "spatial", 3),
    (make_model([helper.make_node("Gemm", ["x", "W", "B"], ["y"], name="gemm", transB=1)], {"x": [3, 12]},
                ("y", None), {"W": RNG.standard_normal((10, 12)).astype(np.float32),
                              "B": RNG.standard_normal(10).astype(np.float32)}), "channel", 3),
], ids=["grouped-conv", "spatial-conv", "gemm-transB"])
def test_truncate_weights_keeps_the_graph_and_matches_the_pair(model, decomposition, rank):
    layer, plan = one_layer_plan(model, decomposition, rank, keep=list(range(1, rank + 1)))
    truncated, report = truncate_weights(model, plan)
    assert [n.SerializeToString() for n in truncated.graph.node] == [n.SerializeToString() for n in model.graph.node]
    before = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    after = {t.name: numpy_helper.to_array(t) for t in truncated.graph.initializer}
    assert {k: (v.shape, v.dtype) for k, v in after.items()} == {k: (v.shape, v.dtype) for k, v in before.items()}
    assert all(np.array_equal(after[k], before[k]) for k in before if k != layer.weight)
    expected = reconstruct(before[layer.weight], layer, decomposition, plan.layers[0].kept_indices())
    np.testing.assert_allclose(after[layer.weight], expected, rtol=1e-5, atol=1e-5)
    assert [r["node"] for r in report.rewritten] == [layer.node] and report.params_after == count_params(model)
    feeds = feeds_for(model)
    assert rel_diff(run(truncated, feeds), run(apply_plan(model, plan)[0], feeds)) <= 1e-4



@pytest.mark.parametrize("opset", [7, 9, 11])
def test_gemm_of_an_old_opset_gets_the_c_input_it_requires(opset):
    """Before opset 11 Gemm's C is required: the first node of the pair adds a broadcast zero."""
    rng = np.random.default_rng(0)
    weights = {"w": rng.standard_normal((32, 24)).astype(np.float32), "b": rng.standard_normal(32).astype(np.float32)}
    graph = helper.make_graph([helper.make_node("Gemm", ["x", "w", "b"], ["y"], name="fc", transB=1)], "old",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 24])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 32])],
                              [numpy_helper.from_array(v, k) for k, v in weights.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=7)
    onnx.checker.check_model(model, full_check=True)
    out, report = apply_plan(model, plan_full_rank(model), keep_dense_if_larger=False)
    onnx.checker.check_model(out, full_check=True)
    pair = [n for n in out.graph.node if n.op_type == "Gemm"]
    assert len(pair) == 2 and (len(pair[0].input) == 3) == (opset < 11)
    x = rng.standard_normal((4, 24)).astype(np.float32)
    run = lambda m: ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(run(out), run(model), rtol=1e-4, atol=1e-4)
