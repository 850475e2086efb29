"""Rewritten graphs are ready to deploy: static shapes stay static, only standard ONNX ops, balanced
factors that survive fp16, and graph optimizers (onnxruntime, onnxslim, onnxsim) keep both factors."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from test_plan import small_net
from test_rewrite import make_model

from onnxlrf.graph.layers import find_layers, weight_array, weight_matrices
from onnxlrf.graph.linalg import svd
from onnxlrf.planning.plan import LowRankEntry, Plan
from onnxlrf.techniques.lowrank.planners import plan_uniform
from onnxlrf.techniques.lowrank.rewrite import apply_plan, factor_pair

RNG = np.random.default_rng(7)
# Nodes that do a contraction, in any domain (onnxruntime fuses activations into FusedConv/FusedGemm
# and moves convs to its NCHWc domain, but a fused-back pair would be one node fewer).
CONTRACTIONS = {"Conv", "Gemm", "MatMul", "FusedConv", "FusedGemm", "FusedMatMul"}


def encoder_block(batch=2, seq=16, hidden=32, ffn=64):
    """A transformer-style block: MatMul + Add (bias) on 3-D activations, GELU-ish, residual."""
    inits = {"w1": RNG.standard_normal((hidden, ffn)).astype(np.float32) * 0.2,
             "b1": RNG.standard_normal(ffn).astype(np.float32),
             "w2": RNG.standard_normal((ffn, hidden)).astype(np.float32) * 0.2,
             "b2": RNG.standard_normal(hidden).astype(np.float32)}
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"], name="ffn1"),
        helper.make_node("Add", ["h", "b1"], ["hb"], name="ffn1_bias"),
        helper.make_node("Relu", ["hb"], ["a"], name="act"),
        helper.make_node("MatMul", ["a", "w2"], ["o"], name="ffn2"),
        helper.make_node("Add", ["o", "b2"], ["ob"], name="ffn2_bias"),
        helper.make_node("Add", ["ob", "x"], ["y"], name="residual"),
    ]
    return make_model(nodes, {"x": [batch, seq, hidden]}, ("y", [batch, seq, hidden]), inits)


def spatial_plan(model, rank=3):
    """Every layer at ``rank``, spatial where available (covers both conv decompositions)."""
    entries = []
    for layer in find_layers(model)[0]:
        d = "spatial" if "spatial" in layer.decompositions else "channel"
        r = min(rank, layer.break_even_rank(d))
        entries.append(LowRankEntry(layer.node, layer.op_type, layer.weight, list(layer.weight_shape), d, r,
                                 layer.max_rank(d), None, layer.params, layer.factorized_params(d, r)))
    return Plan(layers=entries, mode="test")


CASES = {
    "cnn-channel": lambda: (small_net(), lambda m: plan_uniform(m, rank_fraction=0.4)),
    "cnn-spatial": lambda: (small_net(), spatial_plan),
    "encoder": lambda: (encoder_block(), lambda m: plan_uniform(m, rank_fraction=0.3)),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def rewritten(request):
    model, make_plan = CASES[request.param]()
    compressed, report = apply_plan(model, make_plan(model))
    assert report.rewritten
    return model, compressed, len(report.rewritten)


def feeds(model, dtype=np.float32):
    return {i.name: np.random.default_rng(0).standard_normal(
        [d.dim_value for d in i.type.tensor_type.shape.dim]).astype(dtype) for i in model.graph.input}


def run(model, inputs, optimization=ort.GraphOptimizationLevel.ORT_ENABLE_ALL, save_to=None):
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.graph_optimization_level = optimization
    if save_to:
        options.optimized_model_filepath = str(save_to)
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, inputs)[0]


def contractions(model):
    return sum(node.op_type in CONTRACTIONS for node in model.graph.node)


def shapes(model):
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    return {v.name: [d.dim_value if d.HasField("dim_value") else d.dim_param for d in v.type.tensor_type.shape.dim]
            for v in list(inferred.graph.value_info) + list(inferred.graph.output)}


def test_static_shapes_stay_static(rewritten):
    model, compressed, _ = rewritten
    inferred = shapes(compressed)
    produced = {o for node in compressed.graph.node for o in node.output}
    assert produced <= set(inferred)  # every tensor, the factor pairs' middle ones included, has a shape
    assert all(dims and all(isinstance(d, int) and d > 0 for d in dims) for dims in inferred.values())
    original = shapes(model)
    assert [inferred[o.name] for o in compressed.graph.output] == [original[o.name] for o in model.graph.output]


def test_dynamic_batch_stays_the_only_symbolic_dim():
    model = encoder_block()
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "batch"
    model.graph.output[0].type.tensor_type.shape.dim[0].dim_param = "batch"
    compressed, _ = apply_plan(model, plan_uniform(model, rank_fraction=0.3))
    for dims in shapes(compressed).values():
        assert dims[0] == "batch" and all(isinstance(d, int) for d in dims[1:])


def test_only_standard_onnx_ops(rewritten):
    model, compressed, _ = rewritten
    onnx.checker.check_model(compressed, full_check=True)
    assert all(node.domain in ("", "ai.onnx") for node in compressed.graph.node)
    added = {n.op_type for n in compressed.graph.node} - {n.op_type for n in model.graph.node}
    assert added <= {"Conv", "Gemm", "MatMul"}
    assert list(compressed.opset_import) == list(model.opset_import)
    assert {t.data_type for t in compressed.graph.initializer} <= {t.data_type for t in model.graph.initializer}


@pytest.mark.parametrize("level", ["ORT_ENABLE_BASIC", "ORT_ENABLE_EXTENDED", "ORT_ENABLE_ALL"])
def test_onnxruntime_optimizations_keep_both_factors(rewritten, level, tmp_path):
    model, compressed, factorized = rewritten
    optimization = getattr(ort.GraphOptimizationLevel, level)
    inputs = feeds(compressed)
    out = run(compressed, inputs, optimization, save_to=tmp_path / "optimized.onnx")
    optimized = onnx.load(str(tmp_path / "optimized.onnx"))
    assert contractions(optimized) == contractions(model) + factorized
    np.testing.assert_allclose(out, run(compressed, inputs, ort.GraphOptimizationLevel.ORT_DISABLE_ALL),
                               rtol=1e-4, atol=1e-4)


def test_onnxslim_keeps_both_factors(rewritten):
    onnxslim = pytest.importorskip("onnxslim")
    model, compressed, factorized = rewritten
    slimmed = onnxslim.slim(compressed)
    assert contractions(slimmed) == contractions(model) + factorized
    inputs = feeds(compressed)
    np.testing.assert_allclose(run(slimmed, inputs), run(compressed, inputs), rtol=1e-4, atol=1e-4)


def test_onnxsim_keeps_both_factors(rewritten):
    onnxsim = pytest.importorskip("onnxsim")
    model, compressed, factorized = rewritten
    simplified, ok = onnxsim.simplify(compressed)
    assert ok
    assert contractions(simplified) == contractions(model) + factorized
    inputs = feeds(compressed)
    np.testing.assert_allclose(run(simplified, inputs), run(compressed, inputs), rtol=1e-4, atol=1e-4)


def skewed_basis(weight, layer):
    """A valid basis of ``weight`` whose sides differ in scale by 1e8 (as a whitened joint basis can)."""
    u, s, vh = svd(weight_matrices(weight, layer, "channel"))
    return u * 1e4, s, vh * 1e-4


def test_factors_are_balanced_per_component():
    model = small_net()
    for layer in find_layers(model)[0]:
        weight = weight_array(model, layer)
        for basis in (None, skewed_basis(weight, layer)):
            first, second = factor_pair(weight, layer, "channel", [0, 1, 2], basis)
            if layer.op_type == "Conv":  # first: (g*r, cin/g, k...), second: (cout, r, 1...)
                g = layer.groups
                first_norms = np.linalg.norm(first.reshape(g * 3, -1), axis=1)
                second_norms = np.linalg.norm(second.reshape(g, -1, 3).transpose(0, 2, 1).reshape(g * 3, -1), axis=1)
            else:  # X @ first (n, r) @ second (r, m)
                first_norms, second_norms = np.linalg.norm(first, axis=0), np.linalg.norm(second, axis=1)
            np.testing.assert_allclose(first_norms, second_norms, rtol=1e-4)
            assert np.abs(first).max() / np.abs(second).max() < 30


def to_float16(model):
    half = onnx.ModelProto()
    half.CopyFrom(model)
    for i, tensor in enumerate(half.graph.initializer):
        array = numpy_helper.to_array(tensor)
        if array.dtype == np.float32:
            half.graph.initializer[i].CopyFrom(numpy_helper.from_array(array.astype(np.float16), tensor.name))
    for value in list(half.graph.input) + list(half.graph.output):
        value.type.tensor_type.elem_type = TensorProto.FLOAT16
    del half.graph.value_info[:]
    return half


def test_fp16_deployment_of_a_skewed_basis_stays_accurate():
    model = encoder_block()
    layer = find_layers(model)[0][0]
    weight = weight_array(model, layer)
    plan = plan_uniform(model, rank_fraction=0.5)
    plan.layers[0].basis = "fwsvd"  # any stored basis: the rewrite takes it from plan.bases
    plan.bases[layer.weight] = skewed_basis(weight, layer)
    compressed, _ = apply_plan(model, plan)
    assert max(np.abs(numpy_helper.to_array(t)).max() for t in compressed.graph.initializer) < 1e3
    inputs = feeds(compressed)
    reference = run(compressed, inputs)
    half = run(to_float16(compressed), {k: v.astype(np.float16) for k, v in inputs.items()})
    assert np.isfinite(half).all()
    assert np.abs(half.astype(np.float32) - reference).max() <= 2e-2 * np.abs(reference).max()
