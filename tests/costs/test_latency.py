"""latency.py and the planners' targets: FLOPs per layer, rank grids, measurement and its cache,
target flops/latency and rank multiples in every planner. No test asserts a timing."""

from __future__ import annotations

import json

import numpy as np
import pytest
from onnx import helper
from quant_fixtures import conversion_timer
from test_plan import small_net
from test_rewrite import CONV2D_VARIANTS, conv_model, gemm_model, make_model

from onnxlrf.costs.flops import FlopsCost, layer_shapes
from onnxlrf.costs.latency import (
    LatencyCost,
    LayerTiming,
    default_rank_multiple,
    make_cost,
    rank_grid,
    rewrite_with_random_factors,
)
from onnxlrf.costs.params import ParamsCost
from onnxlrf.errors import OnnxlrfError
from onnxlrf.graph.layers import (
    count_params,
    find_layers,
    weight_array,
    weight_matrices,
)
from onnxlrf.graph.linalg import svd
from onnxlrf.measure.sensitivity import LayerSensitivity, Sensitivity
from onnxlrf.planning.plan import LowRankEntry, Plan
from onnxlrf.runtime.shapes import count_flops
from onnxlrf.techniques.lowrank.planners import plan_energy, plan_uniform
from onnxlrf.techniques.lowrank.rewrite import apply_plan
from onnxlrf.techniques.lowrank.technique import plan_joint

RNG = np.random.default_rng(5)


def one_entry_plan(layer, decomposition, rank):
    return Plan(layers=[LowRankEntry(layer.node, layer.op_type, layer.weight, list(layer.weight_shape), decomposition,
                                  rank, layer.max_rank(decomposition), None, layer.params,
                                  layer.factorized_params(decomposition, rank))], mode="test")


def matmul_model(shape=(2, 5, 12), n=10):
    weight = RNG.standard_normal((shape[-1], n)).astype(np.float32)
    node = helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")
    return make_model([node], {"x": list(shape)}, ("y", None), {"W": weight})


LAYER_MODELS = {
    **{f"conv-{name}": (lambda attrs=attrs: conv_model(**attrs)) for name, attrs in CONV2D_VARIANTS.items()},
    "conv-grouped": lambda: conv_model(cin=8, cout=12, groups=2),
    "gemm-transA": lambda: gemm_model(1, 0, "vector", None, None),
    "gemm-transB": lambda: gemm_model(0, 1, "none", 0.5, 2.0),
    "matmul-3d": matmul_model,
}


@pytest.mark.parametrize("name", sorted(LAYER_MODELS))
def test_flops_cost_matches_count_flops_of_the_rewritten_graph(name):
    model = LAYER_MODELS[name]()
    cost = FlopsCost(model)
    assert cost.total() == count_flops(model)
    layer = find_layers(model)[0][0]
    assert cost.dense([layer]) == count_flops(model)
    for decomposition in layer.decompositions:
        rank = 2
        rewritten, _ = apply_plan(model, one_entry_plan(layer, decomposition, rank), keep_dense_if_larger=False)
        assert cost.factorized([layer], decomposition, rank) == count_flops(rewritten), decomposition
        notes = cost.notes(layer, decomposition, rank)
        assert notes == {"flops_dense": count_flops(model), "flops_planned": count_flops(rewritten)}


def test_flops_depend_on_the_batch():
    model = matmul_model(shape=("N", 5, 12))
    assert layer_shapes(model, batch=3)["mm"] == ([3, 5, 12], [3, 5, 10])
    assert FlopsCost(model, batch=4).total() == 4 * FlopsCost(model, batch=1).total()


@pytest.mark.parametrize("multiple", [1, 8])
def test_rank_grid_is_sparse_within_break_even_and_on_the_multiple(multiple):
    model = conv_model(cin=64, cout=64)
    layer = find_layers(model)[0][0]
    for decomposition in ("channel", "spatial"):
        grid = rank_grid(layer, decomposition, multiple)
        top = layer.break_even_rank(decomposition)
        assert grid == sorted(set(grid)) and 1 <= grid[0] and grid[-1] <= top
        assert all(r % multiple == 0 for r in grid)
        assert multiple in grid and len(grid) <= 12
        assert top - grid[-1] < multiple  # the largest useful rank (on the multiple) is measured
    assert rank_grid(find_layers(conv_model(cin=6, cout=8))[0][0], "channel", 8) == []  # no multiple saves params


def test_layer_timing_interpolates_and_never_decreases_in_rank():
    timing = LayerTiming(5.0, {"channel": {4: 1.0, 8: 3.0, 16: 2.0, 32: 6.0}})
    assert timing.factorized_ms("channel", 6) == pytest.approx(2.0)
    assert timing.factorized_ms("channel", 16) == pytest.approx(3.0)  # noise dip removed
    assert timing.factorized_ms("channel", 24) == pytest.approx(4.5)
    assert timing.factorized_ms("channel", 1) == 1.0 and timing.factorized_ms("channel", 64) == 6.0
    ranks = range(1, 40)
    values = [timing.factorized_ms("channel", r) for r in ranks]
    assert values == sorted(values)
    assert LayerTiming.from_json(json.loads(json.dumps(timing.to_json()))) == timing


def test_default_rank_multiple():
    assert default_rank_multiple(["CUDAExecutionProvider", "CPUExecutionProvider"]) == 8
    assert default_rank_multiple(["TensorrtExecutionProvider", "CUDAExecutionProvider"], "flops") == 8
    assert default_rank_multiple(["CPUExecutionProvider"], "latency") == 8
    assert default_rank_multiple(["CPUExecutionProvider"], "flops") == 8
    assert default_rank_multiple(["CPUExecutionProvider"], "params") == 1


def test_random_factor_rewrite_has_the_real_rewrites_graph():
    model = small_net()
    plan = plan_uniform(model, rank_fraction=0.3)
    real, _ = apply_plan(model, plan)
    probe = rewrite_with_random_factors(model, plan)
    assert [(n.op_type, n.name) for n in probe.graph.node] == [(n.op_type, n.name) for n in real.graph.node]
    shapes = {t.name: list(t.dims) for t in real.graph.initializer}
    assert {t.name: list(t.dims) for t in probe.graph.initializer} == shapes


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    """small_net measured once, in a private cache, with a tiny time budget."""
    cache = tmp_path_factory.mktemp("latency-cache")
    return LatencyCost(small_net(), provider="cpu", threads=1, rank_multiple=4, cache=cache, budget_s=0.02), cache


def test_latency_cost_measures_every_layer_and_caches_by_context(measured, monkeypatch):
    cost, cache = measured
    layers = find_layers(cost.model)[0]
    assert set(cost.timings) == {layer.node for layer in layers}
    for layer in layers:
        timing = cost.timings[layer.node]
        assert timing.dense_ms >= 0
        for decomposition in layer.decompositions:
            assert sorted(timing.pair_ms.get(decomposition, {})) == rank_grid(layer, decomposition, 4)
    assert cost.model_ms > 0 and cost.total() == cost.model_ms and cost.scale > 0
    files = list(cache.iterdir())
    assert len(files) == 1
    stored = json.loads(files[0].read_text())
    assert stored["context"]["provider"] == "CPUExecutionProvider" and stored["context"]["threads"] == 1
    assert {"device", "onnxruntime", "io_binding"} <= set(stored["context"])
    signatures = [json.loads(key) for key in stored["entries"]]
    assert {s["op"] for s in signatures} == {"Conv", "Gemm", "MatMul"}
    assert all({"attrs", "input", "weights", "dtype"} <= set(s) for s in signatures)

    def no_measuring(*args, **kwargs):
        raise AssertionError("measured again despite the cache")

    monkeypatch.setattr(LatencyCost, "_measure", no_measuring)
    again = LatencyCost(small_net(), provider="cpu", threads=1, rank_multiple=4, cache=cache, budget_s=0.02)
    assert {k: v.to_json() for k, v in again.timings.items()} == {k: v.to_json() for k, v in cost.timings.items()}
    with pytest.raises(AssertionError, match="measured again"):  # another thread count is another context
        LatencyCost(small_net(), provider="cpu", threads=2, rank_multiple=4, cache=cache, budget_s=0.02)


def test_measured_speedup_times_the_whole_model_against_the_original(measured):
    cost, _ = measured
    plan = plan_uniform(cost.model, rank_fraction=0.5)
    speedup = cost.measured_speedup(apply_plan(cost.model, plan)[0], runs=2)
    assert np.isfinite(speedup) and speedup > 0  # a ratio of two measured medians; its value is not asserted


def test_latency_plan_records_target_multiple_and_notes(measured):
    cost, _ = measured
    plan = plan_uniform(cost.model, rank_fraction=0.3, target="latency", rank_multiple=4, cost=cost)
    assert plan.options["target"] == "latency" and plan.options["rank_multiple"] == 4
    assert plan.options["cost_model"]["provider"] == "CPUExecutionProvider"
    for entry in plan.layers:
        notes = entry.notes
        assert {"latency_ms_dense", "latency_ms_planned", "flops_dense", "flops_planned"} <= set(notes)
        if entry.decomposition == "dense":
            assert notes["latency_ms_planned"] == notes["latency_ms_dense"]
        else:
            assert entry.rank % 4 == 0
            assert notes["latency_ms_planned"] < notes["latency_ms_dense"]  # slower pairs stay dense


class StubLatency:
    """A latency cost with fixed numbers: 'slow' layers are never faster factorized;
    spatial is cheaper than channel for every conv."""

    target = "latency"
    resolution = 1e6

    def __init__(self, model, slow=()):
        self.layers = {layer.node: layer for layer in find_layers(model)[0]}
        self.slow = set(slow)

    def total(self):
        return 10.0 * len(self.layers)

    def dense(self, layers):
        return 10.0 * len(layers)

    def factorized(self, layers, decomposition, rank):
        per = [20.0 if layer.node in self.slow else
               (1.0 if decomposition == "spatial" else 2.0) + 8.0 * rank / layer.max_rank(decomposition)
               for layer in layers]
        return sum(per)

    def notes(self, layer, decomposition, rank):
        return {}

    def describe(self):
        return {"stub": True}


@pytest.mark.parametrize("planner", ["uniform", "energy"])
def test_latency_target_keeps_slow_layers_dense_and_picks_the_faster_decomposition(planner):
    model = small_net()
    cost = StubLatency(model, slow={"fc1"})
    make = {"uniform": lambda **kw: plan_uniform(model, **kw), "energy": lambda **kw: plan_energy(model, **kw)}
    plan = make[planner](target_reduction=0.3, target="latency", cost=cost)
    by_node = {entry.node: entry for entry in plan.layers}
    assert by_node["fc1"].decomposition == "dense"
    assert by_node["conv2"].decomposition == "spatial"  # fewer params would have picked channel
    assert plan_uniform(model, rank_fraction=0.2).layers[1].decomposition == "channel"
    assert plan.options["achieved_reduction"] >= 0.3 and plan.options["target"] == "latency"
    assert plan.options["cost_model"] == {"stub": True}


@pytest.mark.parametrize("multiple", [2, 4, 8])
def test_rank_multiple_in_data_free_planners(multiple):
    model = small_net()
    for plan in (plan_uniform(model, target_reduction=0.3, rank_multiple=multiple),
                 plan_energy(model, target_reduction=0.3, rank_multiple=multiple),
                 plan_uniform(model, rank_fraction=0.4, target="flops", rank_multiple=multiple)):
        assert plan.options["rank_multiple"] == multiple
        for entry in plan.layers:
            assert entry.decomposition == "dense" or entry.rank % multiple == 0 or entry.rank == entry.max_rank
    plan = plan_uniform(model, target_reduction=0.3, rank_multiple=multiple)
    assert plan.options["achieved_reduction"] >= 0.3
    assert 1 - count_params(apply_plan(model, plan)[0]) / count_params(model) == pytest.approx(
        plan.options["achieved_reduction"])


def test_flops_target_reaches_the_measured_flops_reduction():
    model = small_net()
    plan = plan_uniform(model, target_reduction=0.3, target="flops")
    compressed, _ = apply_plan(model, plan)
    achieved = 1 - count_flops(compressed) / count_flops(model)
    assert achieved >= 0.3 and achieved == pytest.approx(plan.options["achieved_reduction"])
    assert sum(e.notes["flops_planned"] for e in plan.layers) == count_flops(compressed)
    assert plan.options["params_reduction"] == pytest.approx(1 - count_params(compressed) / count_params(model))


def test_bad_target_and_multiple_are_one_line_errors():
    model = small_net()
    with pytest.raises(OnnxlrfError, match="unknown target 'speed'"):
        plan_uniform(model, rank_fraction=0.5, target="speed")
    with pytest.raises(OnnxlrfError, match="rank_multiple must be an integer >= 1"):
        plan_uniform(model, rank_fraction=0.5, rank_multiple=0)
    with pytest.raises(OnnxlrfError, match="cost model is for target 'params', not 'flops'"):
        plan_uniform(model, rank_fraction=0.5, target="flops", cost=ParamsCost(model))
    with pytest.raises(OnnxlrfError, match="unknown target"):
        make_cost(model, "speed")
    with pytest.raises(OnnxlrfError, match="out of reach: .* of the model's flops"):
        plan_uniform(model, target_reduction=0.99, target="flops")


def synthetic_sensitivity(model):
    """The weights' own SVD as the joint basis, with a loss that only sees the squared singular values."""
    layers = {}
    for layer in find_layers(model)[0]:
        u, s, vh = svd(weight_matrices(weight_array(model, layer), layer, "channel"))
        layers[layer.node] = LayerSensitivity(layer, s, u, vh.transpose(0, 2, 1), np.zeros_like(s),
                                              float(np.sqrt((s**2).sum())))
    return Sensitivity(layers, reference_loss=0.0, samples=0, loss="synthetic")


def test_joint_planner_targets_flops_and_latency_with_rank_multiples():
    model = small_net()
    sens = synthetic_sensitivity(model)
    plan = plan_joint(model, sens, "lossless", target_reduction=0.3, target="flops", rank_multiple=4)
    compressed, _ = apply_plan(model, plan)
    achieved = 1 - count_flops(compressed) / count_flops(model)
    assert achieved >= 0.3 and achieved == pytest.approx(plan.options["achieved_reduction"])
    assert plan.options["target"] == "flops" and plan.options["rank_multiple"] == 4
    factorized = [e for e in plan.layers if e.decomposition != "dense"]
    assert factorized and all(e.rank % 4 == 0 and e.decomposition == "channel" for e in factorized)
    assert all({"flops_dense", "flops_planned"} <= set(e.notes) for e in plan.layers)

    stub = StubLatency(model, slow={"conv2"})
    for solver in ("lagrangian", "dp", "milp"):
        plan = plan_joint(model, sens, "lossless", target_reduction=0.2, target="latency", cost=stub, solver=solver)
        by_node = {e.node: e for e in plan.layers}
        assert by_node["conv2"].decomposition == "dense"  # its pair is never faster
        assert plan.options["achieved_reduction"] >= 0.2
        assert plan.options["target"] == "latency" and plan.options["cost_model"] == {"stub": True}


def test_cli_compress_targets_and_bench_with_io_binding(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from onnxlrf.cli import cli
    from onnxlrf.costs import latency as latency_module
    from onnxlrf.onnx_io import save_onnx
    from onnxlrf.runtime.shapes import count_flops

    def flops_timer(runners, **kwargs):
        """Each run takes 1 us plus 1 ns per FLOP of the model it runs, however busy the machine is."""
        return [[1e-6 + 1e-9 * count_flops(runner.model)] * 5 for runner in runners]

    monkeypatch.setattr(latency_module, "time_interleaved", flops_timer)
    monkeypatch.setenv("ONNXLRF_CACHE", str(tmp_path / "cache"))
    # One wide layer: at low rank its pair does a small fraction of the dense work, so it is faster.
    model = save_onnx(matmul_model(shape=(64, 512), n=512), tmp_path / "wide.onnx")

    def invoke(*args):
        result = CliRunner().invoke(cli, [str(a) for a in args])
        assert result.exit_code == 0, result.output
        return result

    for target, multiple in (("flops", "4"), ("latency", None)):
        out, plan_path = tmp_path / f"{target}.onnx", tmp_path / f"{target}.plan.json"
        invoke("compress", model, "-o", out, "--mode", "uniform", "--target", target, "--target-reduction", "0.05",
               "--plan-out", plan_path, "--quiet", *(["--rank-multiple", multiple] if multiple else []))
        plan = json.loads(plan_path.read_text())
        assert plan["options"]["target"] == target
        assert plan["options"]["rank_multiple"] == (4 if multiple else 8)  # latency defaults to 8
        assert all("flops_planned" in layer["notes"] for layer in plan["layers"])
    assert list((tmp_path / "cache" / "latency").glob("*.json"))  # measured into $ONNXLRF_CACHE/latency

    result = invoke("bench", tmp_path / "flops.onnx", "--reference", model, "--runs", 3, "--warmup", 1,
                    "--io-binding", "--provider", "cpu", "--json", "--quiet")
    payload = json.loads(result.stdout)
    assert payload["providers"] == ["CPUExecutionProvider"] and payload["speedup"] > 0

    # Rank 64 keeps a quarter of the 512x512 layer's FLOPs: 95% fewer is out of reach.
    bad = CliRunner().invoke(cli, ["compress", str(model), "-o", str(tmp_path / "x.onnx"), "--mode", "uniform",
                                   "--target", "flops", "--rank-multiple", "64", "--target-reduction", "0.95",
                                   "--quiet"])
    assert bad.exit_code == 1 and "out of reach" in bad.output and "flops" in bad.output


class TimedStub(StubLatency):
    """StubLatency whose whole-model measurement says every plan runs at ``speedup`` times the original."""

    def __init__(self, model, speedup):
        super().__init__(model)
        self.speedup, self.timed = speedup, 0

    def measured_speedup(self, compressed):
        self.timed += 1
        return self.speedup


@pytest.mark.parametrize("speedup", [0.93, 1.2])
def test_backoff_rejects_latency_plans_not_measured_faster(speedup):
    from onnxlrf.data import Dataset
    from onnxlrf.planning.joint import PlanOptions
    from onnxlrf.runtime.sessions import make_session
    from onnxlrf.verify.backoff import backoff_plan

    model = small_net()
    x = np.random.default_rng(0).standard_normal((40, 3, 8, 8)).astype(np.float32)
    session = make_session(model, providers=["CPUExecutionProvider"])
    labels = np.concatenate([session.run(None, {"input": x[i:i + 2]})[0].argmax(1) for i in range(0, 40, 2)])
    val = Dataset("val", "classification", {"input": x}, labels)
    stub = TimedStub(model, speedup)
    lossless = PlanOptions("lossless", target_reduction=0.2, target="latency")
    compact = PlanOptions("compact", target_reduction=0.2, target="latency")
    kwargs = dict(provider="cpu", cost=stub)
    if speedup < 1:
        with pytest.raises(OnnxlrfError, match="no plan for this latency target measured faster"):
            backoff_plan(model, synthetic_sensitivity(model), val, lossless, **kwargs)
        stub.timed = 0
        result = backoff_plan(model, synthetic_sensitivity(model), val, compact, **kwargs)
        assert all(e.decomposition == "dense" for e in result.plan.layers)  # nothing faster: the model stays dense
    else:
        result = backoff_plan(model, synthetic_sensitivity(model), val, lossless, **kwargs)
        assert result.plan.options["achieved_reduction"] >= 0.2
    attempts = result.attempts
    # No first-order term: every kappa keeps the same components, so the model is verified once.
    assert len(attempts) == 7 and stub.timed == 1
    assert [a.same_as_kappa for a in attempts] == [None] + [attempts[0].kappa] * 6
    assert all(a.speedup == speedup for a in attempts)
    assert all((a.val is not None) == (speedup > 1) for a in attempts)
    assert result.plan.options["backoff"] == [a.to_dict() for a in attempts]
    assert len({a.val for a in attempts}) == 1


class ScaledStub(StubLatency):
    """StubLatency whose per-layer costs carry a scale, as measured costs do; a plan, timed, saves ``efficiency``
    times what its unscaled costs say (what conversions between changed and unchanged layers take back)."""

    def __init__(self, model, efficiency):
        super().__init__(model)
        self.efficiency, self.scale, self.rescaled, self.timed = efficiency, 1.0, [], []

    def dense(self, layers):
        return self.scale * super().dense(layers)

    def factorized(self, layers, decomposition, rank):
        return self.scale * super().factorized(layers, decomposition, rank)

    def time_plan(self, plan, predicted_saving):  # the evaluator below hands the plan itself over as its model
        saving = self.efficiency * predicted_saving / self.scale
        self.timed.append(plan)
        return saving / self.total(), max(self.efficiency, 0.25)

    def rescale(self, scale, reason):
        self.rescaled.append((scale, reason))
        self.scale = scale


class PlanAsModel:
    def __init__(self, cost):
        self.cost = cost

    def rewrite(self, plan):
        return plan, None


@pytest.mark.parametrize("efficiency", [0.6, 0.2, 1.0])
def test_a_latency_plan_that_misses_its_target_refits_the_scale_and_plans_again(efficiency):
    from onnxlrf.progress import as_progress
    from onnxlrf.verify.backoff import PLAN_CALIBRATIONS, calibrate_on_plans

    model = small_net()
    sens = synthetic_sensitivity(model)
    cost = ScaledStub(model, efficiency)

    def plan_at():
        return plan_joint(model, sens, "lossless", target_reduction=0.3, target="latency", cost=cost)

    first = plan_at()
    calibrate_on_plans(plan_at, PlanAsModel(cost), 0.3, as_progress(None))
    assert cost.timed[0].options["achieved_reduction"] == first.options["achieved_reduction"] >= 0.3
    if efficiency == 1.0:  # the plan saved what it predicted: kept as it is
        assert cost.rescaled == [] and len(cost.timed) == 1
    elif efficiency == 0.6:  # the plan is short of the target: the scale fitted to it, and the next plan meets it
        assert [scale for scale, _ in cost.rescaled] == [0.6] and len(cost.timed) == 2 <= PLAN_CALIBRATIONS
        again = plan_at()
        assert again.options["achieved_reduction"] >= 0.3  # predicted at the fitted scale
        assert efficiency * again.options["achieved_reduction"] / cost.scale >= 0.3  # and what it would measure
        assert again.summary()["factorized"] >= first.summary()["factorized"]
    else:  # at the fitted scale no plan reaches 30%: the probe's scale stays
        assert [scale for scale, _ in cost.rescaled] == [0.25, 1.0] and "out of reach" in cost.rescaled[1][1]
        assert cost.scale == 1.0 and len(cost.timed) == 1


def test_time_plan_fits_the_scale_to_a_plan_timed_against_the_model(tmp_path):
    from onnxlrf.costs.latency import ModelRunner, QuantLatencyCost
    from onnxlrf.techniques.quant.candidates import float_entry
    from onnxlrf.techniques.quant.planners import QuantOptions, plan_uniform_quant
    from onnxlrf.techniques.quant.rewrite import QDQRewrite, quantized_activations

    model, seen = small_net(), []
    timer = conversion_timer(seen)
    cost = QuantLatencyCost(model, weight_bits=8, batch=16, provider="cpu", threads=1, cache=tmp_path, timer=timer)
    plan = plan_uniform_quant(model, QuantOptions(bits=8, activations="int8"))
    layers = {layer.node: layer for layer in find_layers(model)[0]}
    plan.layers = [entry if entry.node == "conv1" else float_entry(layers[entry.node]) for entry in plan.layers]
    plan.activation_ranges = {site.tensor: [-4.0, 4.0] for site in quantized_activations(model, plan, "onnxruntime")}
    compressed = QDQRewrite("onnxruntime")(model, plan)[0]
    model_s, compressed_s = (t[0] for t in timer([ModelRunner(m, None) for m in (model, compressed)]))
    scale = cost.scale
    measured, fitted = cost.time_plan(compressed, predicted_saving=0.5 * cost.model_ms)
    assert cost.model_ms == pytest.approx(model_s * 1e3 - cost.call_overhead_ms)
    assert measured == pytest.approx((model_s - compressed_s) / (model_s - cost.call_overhead_ms / 1e3))
    assert fitted == pytest.approx(np.clip(measured * cost.model_ms / (0.5 * cost.model_ms / scale), 0.25, 4.0))
    assert cost.scale == scale  # time_plan fits; rescale takes it
    cost.rescale(fitted, "test")
    assert cost.scale == fitted and cost.describe()["rescaled"] == [{"scale": fitted, "was": scale, "reason": "test"}]
    assert cost.rest_ms == pytest.approx(max(cost.model_ms - fitted * cost.layer_sum_ms(), 0.0))


def test_quant_latency_cost_times_each_layer_float_and_w8a8_as_onnxruntime_fuses_it(tmp_path):
    from onnxlrf.costs.latency import W8A8, QuantLatencyCost
    from onnxlrf.graph.quantizable import find_quantizable
    from onnxlrf.pipeline import optimized_op_counts

    model, seen = small_net(), []
    cost = QuantLatencyCost(model, weight_bits=7, batch=16, provider="cpu", threads=1, cache=tmp_path,
                            timer=conversion_timer(seen))
    layers = find_quantizable(model)[0]
    assert set(cost.timings) == {layer.node for layer in layers}
    faster = set()
    for layer in layers:
        timing = cost.timings[layer.node]
        assert set(timing.pair_ms) == {W8A8} and set(timing.pair_ms[W8A8]) == {7}
        dense, w8a8 = cost.dense([layer]), cost.quantized([layer], 7, 8, 1, int8_inputs=True)
        assert w8a8 == pytest.approx(cost.scale * timing.pair_ms[W8A8][7])
        assert cost.quantized([layer], 4, 8, 1) == dense  # weight-only: a float weight once onnxruntime loads it
        if w8a8 < dense:
            faster.add(layer.op_type)
    assert "Conv" in faster and "Gemm" not in faster  # the fake timer's verdict: wide layers pay for conversions
    assert cost.total() == cost.model_ms > 0 and cost.describe()["w8a8_weight_bits"] == 7
    # The probes are what onnxruntime fuses: a Conv's probe runs as QLinearConv, a MatMul's as an integer kernel.
    probes = [model for model in seen if len(model.graph.node) < 8
              and any(node.op_type == "QuantizeLinear" for node in model.graph.node)]
    counts = [optimized_op_counts(probe) for probe in probes]
    assert any(c.get("QLinearConv") for c in counts)
    assert any(c.get("MatMulIntegerToFloat") or c.get("QLinearMatMul") for c in counts)
    again = QuantLatencyCost(model, weight_bits=7, batch=16, provider="cpu", threads=1, cache=tmp_path,
                             timer=conversion_timer(seen := []))
    assert {k: v.to_json() for k, v in again.timings.items()} == {k: v.to_json() for k, v in cost.timings.items()}
    assert len(seen) == 2 + 1  # from the cache: only the call overhead and the whole model, original and probe
