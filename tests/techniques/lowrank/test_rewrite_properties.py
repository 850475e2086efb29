"""Property tests of the rewrite on random Conv / Gemm / MatMul nodes (hypothesis).

At full rank the rewritten graph reproduces the original outputs; at a random
rank it is a valid graph, has exactly the planned parameters, and computes
what the dense node computes with the truncated-SVD weight (numpy).
"""

from __future__ import annotations

import math
import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from onnxlrf.graph.layers import Layer, count_params, find_layers
from onnxlrf.planning.plan import LowRankEntry, Plan
from onnxlrf.techniques.lowrank.planners import plan_full_rank
from onnxlrf.techniques.lowrank.rewrite import apply_plan

# ONNXLRF_PROPERTY_EXAMPLES=1000 for a deeper search than the default run's.
PROPERTY = settings(max_examples=int(os.environ.get("ONNXLRF_PROPERTY_EXAMPLES", 40)), deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])
REL_TOL = 1e-4  # float32 outputs, relative to the largest output


def model_of(node: onnx.NodeProto, inputs: dict[str, list[int]], weights: dict[str, np.ndarray]) -> onnx.ModelProto:
    """One node; the output shape comes from shape inference."""
    graph = helper.make_graph(
        [node], "prop",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs.items()],
        [helper.make_tensor_value_info(node.output[0], TensorProto.FLOAT, None)],
        [numpy_helper.from_array(v, k) for k, v in weights.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    model.graph.output[0].CopyFrom(inferred.graph.output[0])
    onnx.checker.check_model(model, full_check=True)
    return model


def run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> np.ndarray:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)[0]


def feeds_for(model: onnx.ModelProto, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {i.name: rng.standard_normal([d.dim_value for d in i.type.tensor_type.shape.dim]).astype(np.float32)
            for i in model.graph.input}


def assert_close(got: np.ndarray, expected: np.ndarray) -> None:
    assert got.shape == expected.shape
    scale = max(float(np.abs(expected).max()), 1e-6)
    assert float(np.abs(got - expected).max()) <= REL_TOL * scale


def the_layer(model: onnx.ModelProto) -> Layer:
    layers, skipped = find_layers(model)
    assume(layers)  # too small to factorize, or depthwise: not what these properties are about
    return layers[0]


# --- random nodes -------------------------------------------------------------------------------------

@st.composite
def conv_models(draw: st.DrawFn, spatial: bool = False) -> onnx.ModelProto:
    """Any Conv; ``spatial``: a 2-D, ungrouped one with a kernel larger than 1x1 (spatial decomposition)."""
    ndim = 2 if spatial else draw(st.sampled_from([1, 2, 2, 2, 3]))
    groups = 1 if spatial else draw(st.sampled_from([1, 1, 2, 3]))
    cin = groups * draw(st.integers(2, 4))
    cout = groups * draw(st.integers(2, 5))
    kernel = [draw(st.integers(1, 4 if ndim < 3 else 2)) for _ in range(ndim)]
    if spatial:
        kernel[draw(st.integers(0, 1))] = draw(st.integers(2, 4))
    strides = [draw(st.integers(1, 3)) for _ in range(ndim)]
    dilations = [draw(st.integers(1, 2)) for _ in range(ndim)]
    auto_pad = draw(st.sampled_from(["NOTSET", "NOTSET", "SAME_UPPER", "SAME_LOWER", "VALID"]))
    if auto_pad.startswith("SAME"):
        dilations = [1] * ndim  # onnxruntime runs no dilated SAME_* conv
    attrs: dict = {"strides": strides, "dilations": dilations, "group": groups, "auto_pad": auto_pad}
    if auto_pad == "NOTSET":
        attrs["pads"] = [draw(st.integers(0, k - 1)) for k in kernel * 2]  # pads below the kernel size
    # Large enough for one output without padding.
    size = [d * (k - 1) + 1 + draw(st.integers(0, 4 if ndim < 3 else 2)) for k, d in zip(kernel, dilations)]
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    weights = {"W": rng.standard_normal((cout, cin // groups, *kernel)).astype(np.float32)}
    inputs = ["x", "W"]
    if draw(st.booleans()):
        weights["B"] = rng.standard_normal(cout).astype(np.float32)
        inputs.append("B")
    node = helper.make_node("Conv", inputs, ["y"], name="conv", **attrs)
    return model_of(node, {"x": [draw(st.integers(1, 2)), cin, *size]}, weights)


@st.composite
def gemm_models(draw: st.DrawFn) -> onnx.ModelProto:
    m, k, n = draw(st.integers(1, 5)), draw(st.integers(2, 12)), draw(st.integers(2, 12))
    trans_a, trans_b = draw(st.integers(0, 1)), draw(st.integers(0, 1))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    weights = {"W": rng.standard_normal((n, k) if trans_b else (k, n)).astype(np.float32)}
    inputs = ["a", "W"]
    bias = draw(st.sampled_from([None, [1], [n], [1, n], [m, 1], [m, n]]))
    if bias is not None:
        weights["C"] = rng.standard_normal(bias).astype(np.float32)
        inputs.append("C")
    attrs = {"transA": trans_a, "transB": trans_b}
    if draw(st.booleans()):
        attrs["alpha"] = draw(st.floats(0.1, 2.0) | st.floats(-2.0, -0.1))
        attrs["beta"] = draw(st.floats(-2.0, 2.0))
    node = helper.make_node("Gemm", inputs, ["y"], name="gemm", **attrs)
    return model_of(node, {"a": [k, m] if trans_a else [m, k]}, weights)


@st.composite
def matmul_models(draw: st.DrawFn) -> onnx.ModelProto:
    k, n = draw(st.integers(2, 12)), draw(st.integers(2, 12))
    batch = draw(st.lists(st.integers(1, 3), min_size=0, max_size=3))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    node = helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")
    return model_of(node, {"x": [*batch, k]}, {"W": rng.standard_normal((k, n)).astype(np.float32)})


# (strategy, decomposition) per case: every kind of node, and both Conv decompositions.
CASES = {
    "conv-channel": (conv_models(), "channel"),
    "conv-spatial": (conv_models(spatial=True), "spatial"),
    "gemm": (gemm_models(), "channel"),
    "matmul": (matmul_models(), "channel"),
}


# --- properties -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", sorted(CASES))
@PROPERTY
@given(data=st.data(), seed=st.integers(0, 2**16))
def test_full_rank_reproduces_outputs(case: str, data: st.DataObject, seed: int) -> None:
    strategy, decomposition = CASES[case]
    model = data.draw(strategy, label="model")
    layer = the_layer(model)
    assert decomposition in layer.decompositions
    out, report = apply_plan(model, plan_full_rank(model, decomposition), keep_dense_if_larger=False)
    onnx.checker.check_model(out, full_check=True)
    assert [r["decomposition"] for r in report.rewritten] == [decomposition]
    feeds = feeds_for(model, seed)
    assert_close(run(out, feeds), run(model, feeds))


@pytest.mark.parametrize("case", sorted(CASES))
@PROPERTY
@given(data=st.data(), rank_share=st.floats(0, 1), seed=st.integers(0, 2**16))
def test_random_rank_is_valid_with_planned_params(case: str, data: st.DataObject, rank_share: float,
                                                  seed: int) -> None:
    strategy, decomposition = CASES[case]
    model = data.draw(strategy, label="model")
    layer = the_layer(model)
    max_rank = layer.max_rank(decomposition)
    rank = min(max_rank, 1 + int(rank_share * max_rank))
    planned = layer.factorized_params(decomposition, rank)
    plan = Plan([LowRankEntry(layer.node, layer.op_type, layer.weight, list(layer.weight_shape), decomposition, rank,
                           max_rank, None, layer.params, planned)], mode="test")
    out, report = apply_plan(model, plan)
    onnx.checker.check_model(out, full_check=True)
    onnx.shape_inference.infer_shapes(out, strict_mode=True)
    feeds = feeds_for(model, seed)
    event("kept dense" if planned >= layer.params else "rewritten")
    if planned >= layer.params:  # not smaller: stays dense, the graph is unchanged
        assert report.rewritten == [] and out.graph.node == model.graph.node
        assert count_params(out) == count_params(model)
        return
    assert count_params(out) == report.params_after == count_params(model) - layer.params + planned
    assert [n.op_type for n in out.graph.node] == [layer.op_type] * 2
    weight = numpy_helper.to_array(model.graph.initializer[0])
    dense = onnx.ModelProto()
    dense.CopyFrom(model)
    dense.graph.initializer[0].CopyFrom(numpy_helper.from_array(truncated(weight, layer, decomposition, rank), "W"))
    assert_close(run(out, feeds), run(dense, feeds))


def truncated(weight: np.ndarray, layer: Layer, decomposition: str, rank: int) -> np.ndarray:
    """The weight with its matrices (METHOD.md section 6) cut to the top ``rank`` SVD components, in numpy."""
    if layer.op_type != "Conv":
        matrices = (weight.T if layer.transposed else weight)[None]
    elif decomposition == "channel":
        matrices = weight.reshape(layer.groups, weight.shape[0] // layer.groups, -1)
    else:
        cout, cin, kh, kw = weight.shape
        matrices = weight.transpose(1, 2, 0, 3).reshape(1, cin * kh, cout * kw)
    u, s, vh = np.linalg.svd(matrices.astype(np.float64), full_matrices=False)
    cut = (u[:, :, :rank] * s[:, None, :rank]) @ vh[:, :rank]
    if layer.op_type != "Conv":
        result = cut[0].T if layer.transposed else cut[0]
    elif decomposition == "channel":
        result = cut.reshape(weight.shape)
    else:
        result = cut.reshape(cin, kh, cout, kw).transpose(2, 0, 1, 3)
    return result.astype(np.float32)


@pytest.mark.parametrize("case", sorted(CASES))
def test_strategies_produce_factorizable_layers(case: str) -> None:
    """Guard against properties passing vacuously: most drawn models do have a layer."""
    found = []

    @settings(max_examples=20, deadline=None, database=None)
    @given(model=CASES[case][0])
    def collect(model: onnx.ModelProto) -> None:
        found.append(bool(find_layers(model)[0]))

    collect()
    assert sum(found) >= math.ceil(0.5 * len(found))
