"""The generic joint planner and its knapsack groups: a weight shared by several nodes is one group."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxlrf.costs.params import ParamsCost
from onnxlrf.data import Dataset
from onnxlrf.graph.layers import count_params, find_layers
from onnxlrf.measure.analysis import AnalysisOptions, joint_analysis
from onnxlrf.pipeline import compress_joint
from onnxlrf.planning.joint import PlanOptions
from onnxlrf.planning.plan import validate_plan
from onnxlrf.runtime.sessions import make_session
from onnxlrf.techniques.lowrank.planners import plan_uniform
from onnxlrf.techniques.lowrank.rewrite import apply_plan
from onnxlrf.techniques.lowrank.technique import LOWRANK, plan_joint
from onnxlrf.verify.backoff import VerifyOptions
from onnxlrf.verify.splits import SplitOptions

WIDTH, SAMPLES = 48, 600


def shared_weight_mlp() -> onnx.ModelProto:
    """x[N,48] -> fc_in -> Relu -> fc_a(w_shared) -> Relu -> fc_b(w_shared) -> Relu -> fc_out -> [N,6]."""
    rng = np.random.default_rng(0)

    def decaying(rows: int, cols: int) -> np.ndarray:
        u = np.linalg.qr(rng.standard_normal((rows, rows)))[0]
        v = np.linalg.qr(rng.standard_normal((cols, cols)))[0]
        k = min(rows, cols)
        return ((u[:, :k] * 0.9 ** np.arange(k)) @ v[:, :k].T).astype(np.float32)

    weights = {"w_in": decaying(WIDTH, WIDTH), "w_shared": decaying(WIDTH, WIDTH), "w_out": decaying(WIDTH, 6)}
    nodes = [helper.make_node("MatMul", ["x", "w_in"], ["h0"], name="fc_in"),
             helper.make_node("Relu", ["h0"], ["r0"]),
             helper.make_node("MatMul", ["r0", "w_shared"], ["h1"], name="fc_a"),
             helper.make_node("Relu", ["h1"], ["r1"]),
             helper.make_node("MatMul", ["r1", "w_shared"], ["h2"], name="fc_b"),
             helper.make_node("Relu", ["h2"], ["r2"]),
             helper.make_node("MatMul", ["r2", "w_out"], ["y"], name="fc_out")]
    graph = helper.make_graph(nodes, "shared", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", WIDTH])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 6])],
                              [numpy_helper.from_array(v, k) for k, v in weights.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model, full_check=True)
    return model


@pytest.fixture(scope="module")
def model_and_data() -> tuple[onnx.ModelProto, Dataset]:
    model = shared_weight_mlp()
    x = np.random.default_rng(1).standard_normal((SAMPLES, WIDTH)).astype(np.float32)
    labels = make_session(model, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0].argmax(axis=1)
    return model, Dataset("random", "classification", {"x": x}, labels)


def test_a_shared_weight_is_one_knapsack_group(model_and_data) -> None:
    model, data = model_and_data
    analysis = joint_analysis(model, data.subset(np.arange(200)), AnalysisOptions(range_samples=100))
    groups = LOWRANK.candidates(model, analysis, 1.0, ParamsCost(model))
    members = {group.options.key: [layer.node for layer in group.layers] for group in groups}
    assert members == {"w_in": ["fc_in"], "w_shared": ["fc_a", "fc_b"], "w_out": ["fc_out"]}
    shared = next(group for group in groups if group.options.key == "w_shared")
    # The analysis measures each use of the weight on its own: it cannot predict truncating both.
    assert len(shared.options.dloss) == 1 and "shared" in shared.reason
    for mode, kwargs in (("lossless", {"target_reduction": 0.2}), ("compact", {"tolerance": 1.0})):
        plan = plan_joint(model, analysis, mode, kappa=1.0, **kwargs)
        validate_plan(plan, model)  # nodes sharing a weight are planned alike
        by_node = {entry.node: entry for entry in plan.layers}
        assert not by_node["fc_a"].changed and not by_node["fc_b"].changed
        assert by_node["fc_a"].notes["reason"] == by_node["fc_b"].notes["reason"] == shared.reason


@pytest.mark.parametrize("mode, target", [("lossless", 0.2), ("compact", None)])
def test_joint_modes_on_a_model_with_a_shared_weight(model_and_data, mode, target) -> None:
    model, data = model_and_data
    result = compress_joint(model, data, PlanOptions(mode, target_reduction=target), SplitOptions(200, 200, seed=1),
                            AnalysisOptions(range_samples=100), VerifyOptions(refit=False), provider="cpu")
    by_node = {entry.node: entry for entry in result.plan.layers}
    assert by_node["fc_a"].choice_key() == by_node["fc_b"].choice_key()
    removed = result.plan.summary()["params_removed"]
    assert count_params(result.compressed) == count_params(model) - removed  # the shared weight counted once
    if mode == "lossless":
        assert removed >= 0.2 * count_params(model)
    assert apply_plan(model, result.plan)[0].SerializeToString() == result.compressed.SerializeToString()


def test_the_data_free_planners_factorize_a_shared_weight_once(model_and_data) -> None:
    model, _ = model_and_data
    plan = plan_uniform(model, rank_fraction=0.25)
    by_node = {entry.node: entry for entry in plan.layers}
    assert by_node["fc_a"].changed and by_node["fc_a"].choice_key() == by_node["fc_b"].choice_key()
    compressed, _ = apply_plan(model, plan)
    assert count_params(compressed) == count_params(model) - plan.summary()["params_removed"]
    factors = [init.name for init in compressed.graph.initializer if init.name.startswith("w_shared.")]
    assert len(factors) == 2  # one pair of factors, read by both nodes
    assert {layer.weight for layer in find_layers(compressed)[0]} >= set(factors)


def test_plans_of_one_analysis_share_its_stored_basis(model_and_data) -> None:
    # The back-off keeps a dozen plans; a copy of the bases in each took 0.6 GB apiece on a 110M encoder.
    model, data = model_and_data
    analysis = joint_analysis(model, data.subset(np.arange(200)), AnalysisOptions(range_samples=100))
    small, large = (plan_joint(model, analysis, "lossless", kappa=1.0, target_reduction=reduction)
                    for reduction in (0.1, 0.3))
    shared = set(small.bases) & set(large.bases)
    assert shared
    for weight in shared:
        assert all(a is b for a, b in zip(small.bases[weight], large.bases[weight]))
        assert small.bases[weight][0].dtype == np.float32


def test_a_low_rank_run_lets_the_quantization_statistics_go_and_its_cache_keeps_them(model_and_data, tmp_path) -> None:
    from onnxlrf.techniques.quant.technique import Quant

    model, data = model_and_data
    calib = data.subset(np.arange(200))
    options = AnalysisOptions(range_samples=100, cache=tmp_path)
    lowrank = LOWRANK.analyse(model, calib, options)
    assert all(ls.gradient is None and ls.output_factor is None for ls in lowrank.all())
    quant = Quant().analyse(model, calib, options)  # read from the same cache entry
    assert all(ls.gradient is not None and ls.output_factor is not None for ls in quant.all())
    assert len(list(tmp_path.rglob("*.npz"))) == 1
