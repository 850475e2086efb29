"""Plan JSON, validate_plan, count_params and the data-free planners."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxlrf.errors import OnnxlrfError
from onnxlrf.graph.layers import (
    count_params,
    find_layers,
    weight_array,
    weight_matrices,
)
from onnxlrf.graph.linalg import svd
from onnxlrf.planning.plan import (
    PLAN_FORMAT,
    PLAN_VERSION,
    LowRankEntry,
    Plan,
    validate_plan,
)
from onnxlrf.techniques.lowrank.planners import (
    plan_energy,
    plan_full_rank,
    plan_uniform,
)
from onnxlrf.techniques.lowrank.rewrite import apply_plan

RNG = np.random.default_rng(2)


def small_net():
    """conv 3->16 3x3, conv 16->32 3x3 /2, grouped conv, pool, Gemm 32->64, MatMul 64->10, plus an int shape."""
    inits = {
        "conv1.w": RNG.standard_normal((16, 3, 3, 3)), "conv2.w": RNG.standard_normal((32, 16, 3, 3)),
        "conv3.w": RNG.standard_normal((32, 8, 1, 1)),
        "fc1.w": RNG.standard_normal((64, 32)), "fc1.b": RNG.standard_normal(64),
        "fc2.w": RNG.standard_normal((64, 10)),
    }
    inits = {k: v.astype(np.float32) for k, v in inits.items()}
    nodes = [
        helper.make_node("Conv", ["input", "conv1.w"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "conv2.w"], ["c2"], name="conv2", pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("Conv", ["c2", "conv3.w"], ["c3"], name="conv3", group=4),
        helper.make_node("GlobalAveragePool", ["c3"], ["p"], name="pool"),
        helper.make_node("Reshape", ["p", "shape"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "fc1.w", "fc1.b"], ["h"], name="fc1", transB=1),
        helper.make_node("Relu", ["h"], ["r2"], name="relu2"),
        helper.make_node("MatMul", ["r2", "fc2.w"], ["logits"], name="fc2"),
    ]
    initializers = [numpy_helper.from_array(v, k) for k, v in inits.items()]
    initializers.append(numpy_helper.from_array(np.array([2, 32], dtype=np.int64), "shape"))
    graph = helper.make_graph(nodes, "small", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [2, 3, 8, 8])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [2, 10])], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


MODEL = small_net()
DENSE_PARAMS = 16 * 27 + 32 * 144 + 32 * 8 + 64 * 32 + 64 + 64 * 10


def test_count_params_counts_float_tensors_only():
    assert count_params(MODEL) == DENSE_PARAMS


def test_plan_json_round_trip(tmp_path):
    plan = plan_uniform(MODEL, rank_fraction=0.5)
    plan.layers[0].keep = list(range(plan.layers[0].rank))[::-1]
    plan.layers[0].notes["score"] = [1.5, -2.0]
    assert Plan.from_dict(json.loads(plan.to_json())) == plan
    path = tmp_path / "plan.json"
    plan.save(path)
    loaded = Plan.load(path)
    assert loaded == plan and loaded.format == PLAN_FORMAT and loaded.version == PLAN_VERSION
    assert [p.name for p in tmp_path.iterdir()] == ["plan.json"]  # no temporary file left behind
    validate_plan(loaded, MODEL)


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d.update(format="other"), "not an onnxlrf plan"),
    (lambda d: d.update(version=99), "unsupported plan version 99"),
    (lambda d: d.pop("layers"), "missing key 'layers'"),
    (lambda d: d["layers"][0]["choice"].pop("rank"), "missing key 'rank'"),
    (lambda d: d["layers"][0].update(colour="red"), "unknown key 'colour'"),
    (lambda d: d["layers"][0]["choice"].update(colour="red"), "unknown key 'colour'"),
    (lambda d: d["layers"][0].update(technique="pruning"), "unknown technique 'pruning'"),
    (lambda d: d["layers"][0].update(choice=[]), "'choice' must be an object"),
    (lambda d: d["layers"][0].update(node=["conv1"]), "'node' must be a string"),
    (lambda d: d["layers"][0].update(weight_shape=16), "'weight_shape' must be a list of integers"),
    (lambda d: d["layers"][0].update(weight_shape=None), "'weight_shape' must be a list of integers"),
    (lambda d: d["layers"][0].update(params_dense="many"), "'params_dense' must be an integer"),
    (lambda d: d["layers"][0].update(notes=[]), "'notes' must be an object"),
    (lambda d: d.update(options=[1]), "'options' must be an object"),
    (lambda d: d["options"].update(bases_file=3), "'bases_file' must be a file name"),
    (lambda d: d["options"].update(bases_file="../other.npz"), "'bases_file' must be a file name"),
    (lambda d: d.update(mode=None), "'mode' must be a string"),
    (lambda d: d.update(version="2"), "unsupported plan version '2'"),
    (lambda d: d.update(layers=[3]), "plan layer 0 must be an object"),
])
def test_plan_load_rejects_bad_documents(tmp_path, mutate, message):
    data = plan_uniform(MODEL, rank_fraction=0.5).to_dict()
    mutate(data)
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(data))
    with pytest.raises(OnnxlrfError, match=message):
        Plan.load(path)


def version_1(data: dict) -> dict:
    """A version-2 plan document in the version-1 form: each entry's low-rank choice at its top level."""
    layers = []
    for entry in data["layers"]:
        entry = dict(entry)
        assert entry.pop("technique") == "lowrank"
        choice = entry.pop("choice")
        flat = {key: entry[key] for key in ("node", "op_type", "weight", "weight_shape")}
        flat.update({key: choice[key] for key in ("decomposition", "rank", "max_rank", "keep")})
        flat.update({key: entry[key] for key in ("params_dense", "params_planned", "notes")})
        flat.update(basis=choice["basis"], bias_correction=choice["bias_correction"])
        layers.append(flat)
    return {**data, "version": 1, "layers": layers}


def test_entries_name_their_technique_and_version_1_to_3_plans_still_load(tmp_path):
    plan = plan_uniform(MODEL, rank_fraction=0.5)
    data = plan.to_dict()
    assert data["version"] == 4 and data["activation_ranges"] == {} and data["smoothing"] == {}
    version_3 = {key: value for key, value in data.items() if key != "smoothing"}
    assert Plan.from_dict({**version_3, "version": 3}) == plan
    # A version-3 plan smooths nothing, whatever a "smoothing" key holds.
    assert Plan.from_dict({**data, "version": 3, "smoothing": {"x": {"alpha": 2}}}).smoothing == {}
    version_2 = {key: value for key, value in version_3.items() if key != "activation_ranges"}
    assert Plan.from_dict({**version_2, "version": 2}) == plan
    entry = data["layers"][0]
    assert list(entry) == ["node", "op_type", "weight", "weight_shape", "technique", "choice", "params_dense",
                           "params_planned", "notes"]
    assert entry["technique"] == "lowrank" and entry["choice"] == {
        "decomposition": plan.layers[0].decomposition, "rank": plan.layers[0].rank,
        "max_rank": plan.layers[0].max_rank, "keep": None, "basis": "svd", "bias_correction": False}
    old = version_1(version_2)
    assert Plan.from_dict(old) == plan
    # A version-1 file without the optional keys (written before bases existed) reads as svd, no correction.
    for layer in old["layers"]:
        del layer["basis"], layer["bias_correction"]
    assert Plan.from_dict(old) == plan
    path = tmp_path / "v1.json"
    path.write_text(json.dumps(old))
    assert apply_plan(MODEL, Plan.load(path))[0].SerializeToString() == apply_plan(MODEL, plan)[0].SerializeToString()
    # Saving writes the current version.
    Plan.load(path).save(tmp_path / "v4.json")
    assert json.loads((tmp_path / "v4.json").read_text())["version"] == 4


def test_plan_load_rejects_bad_json_and_missing_file(tmp_path):
    path = tmp_path / "plan.json"
    path.write_text("{not json")
    with pytest.raises(OnnxlrfError, match="not valid JSON"):
        Plan.load(path)
    with pytest.raises(OnnxlrfError, match="plan not found"):
        Plan.load(tmp_path / "missing.json")


def entry_for(node, decomposition="channel", rank=2, keep=None):
    layer = {layer.node: layer for layer in find_layers(MODEL)[0]}[node]
    return LowRankEntry(node, layer.op_type, layer.weight, list(layer.weight_shape), decomposition, rank,
                     layer.max_rank(decomposition), keep, layer.params, layer.factorized_params(decomposition, rank))


@pytest.mark.parametrize("change, message", [
    (lambda e: setattr(e, "node", "nope"), "'nope' does not exist"),
    (lambda e: setattr(e, "node", "relu1"), "'relu1' does not exist"),
    (lambda e: setattr(e, "rank", 17), r"rank 17 outside 1\.\.16"),
    (lambda e: setattr(e, "rank", 0), r"rank 0 outside"),
    (lambda e: setattr(e, "keep", [0, 0]), "duplicate"),
    (lambda e: setattr(e, "keep", [0, 16]), "keep index 16 outside"),
    (lambda e: setattr(e, "keep", [0]), "keep has 1 indices, rank is 2"),
    (lambda e: setattr(e, "decomposition", "tucker"), "unknown decomposition 'tucker'"),
    (lambda e: setattr(e, "weight_shape", [32, 16, 3, 3]), "weight shape"),
    (lambda e: setattr(e, "weight", "conv2.w"), "weight 'conv2.w'"),
    (lambda e: setattr(e, "max_rank", 3), "max_rank 3"),
])
def test_validate_plan_errors_name_the_node(change, message):
    bad = entry_for("conv1")
    change(bad)
    with pytest.raises(OnnxlrfError, match=message):
        validate_plan(Plan([bad], mode="test"), MODEL)


def test_validate_plan_rejects_unavailable_decomposition_and_duplicates():
    grouped = entry_for("conv3")
    grouped.decomposition = "spatial"
    with pytest.raises(OnnxlrfError, match="'conv3': decomposition 'spatial' not available"):
        validate_plan(Plan([grouped], mode="test"), MODEL)
    with pytest.raises(OnnxlrfError, match="'fc1' twice"):
        validate_plan(Plan([entry_for("fc1"), entry_for("fc1")], mode="test"), MODEL)


def assert_never_larger_than_dense(plan):
    for e in plan.layers:
        if e.decomposition == "dense":
            assert e.rank is None and e.params_planned == e.params_dense
        else:
            assert e.params_planned < e.params_dense


def test_uniform_rank_fraction_uses_ceil_and_best_decomposition():
    plan = plan_uniform(MODEL, rank_fraction=0.3)
    validate_plan(plan, MODEL)
    assert_never_larger_than_dense(plan)
    layers = {layer.node: layer for layer in find_layers(MODEL)[0]}
    for e in plan.layers:
        layer = layers[e.node]
        options = {d: layer.factorized_params(d, math.ceil(0.3 * layer.max_rank(d))) for d in layer.decompositions}
        best = min(options, key=options.get)
        if options[best] < layer.params:
            assert (e.decomposition, e.rank) == (best, math.ceil(0.3 * layer.max_rank(best)))
        else:
            assert e.decomposition == "dense"


def achieved(plan):
    return sum(e.params_dense - e.params_planned for e in plan.layers) / DENSE_PARAMS


@pytest.mark.parametrize("target", [0.1, 0.3, 0.5])
def test_uniform_target_reduction_is_closest_without_going_under(target):
    plan = plan_uniform(MODEL, target_reduction=target)
    assert_never_larger_than_dense(plan)
    fraction = plan.options["rank_fraction"]
    assert achieved(plan) >= target and plan.options["achieved_reduction"] == pytest.approx(achieved(plan))
    # The next fraction at which any layer's rank grows already removes too little.
    layers = find_layers(MODEL)[0]
    next_fraction = min(k / layer.max_rank(d) for layer in layers for d in layer.decompositions
                        for k in range(1, layer.max_rank(d) + 1) if k / layer.max_rank(d) > fraction + 1e-12)
    assert achieved(plan_uniform(MODEL, rank_fraction=next_fraction)) < target
    out, report = apply_plan(MODEL, plan)
    assert 1 - count_params(out) / count_params(MODEL) == pytest.approx(achieved(plan))
    assert report.params_after == count_params(out)


def energy_rank(matrices, level):
    _, s, _ = svd(matrices)
    power = (s ** 2).sum(axis=0)
    return int(np.argmax(np.cumsum(power) / power.sum() >= level - 1e-12)) + 1


def test_energy_picks_smallest_rank_reaching_the_energy():
    plan = plan_energy(MODEL, energy=0.8)
    validate_plan(plan, MODEL)
    assert_never_larger_than_dense(plan)
    layers = {layer.node: layer for layer in find_layers(MODEL)[0]}
    for e in plan.layers:
        if e.decomposition != "dense":
            layer = layers[e.node]
            mats = weight_matrices(weight_array(MODEL, layer), layer, e.decomposition)
            assert e.rank == energy_rank(mats, 0.8)


@pytest.mark.parametrize("target", [0.2, 0.45])
def test_energy_target_reduction_reaches_target(target):
    plan = plan_energy(MODEL, target_reduction=target)
    assert_never_larger_than_dense(plan)
    assert achieved(plan) >= target
    level = plan.options["energy"]
    assert achieved(plan_energy(MODEL, energy=min(1.0, level + 1e-9))) < target


def test_unreachable_target_is_an_error():
    with pytest.raises(OnnxlrfError, match="out of reach"):
        plan_uniform(MODEL, target_reduction=0.99)
    with pytest.raises(OnnxlrfError, match="exactly one"):
        plan_uniform(MODEL)


def test_weight_shared_with_a_dense_user_stays_dense():
    w = numpy_helper.from_array(RNG.standard_normal((16, 16)).astype(np.float32), "W")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["h"], name="mm"), helper.make_node("Add", ["h", "W"], ["y"], name="add")],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [16, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [16, 16])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    (e,) = plan_uniform(model, rank_fraction=0.1).layers
    assert e.decomposition == "dense" and "dense" in e.notes["reason"]


def test_full_rank_plan_uses_requested_decomposition_where_available():
    plan = plan_full_rank(MODEL, "spatial")
    validate_plan(plan, MODEL)
    assert {e.node: e.decomposition for e in plan.layers} == {
        "conv1": "spatial", "conv2": "spatial", "conv3": "channel", "fc1": "channel", "fc2": "channel"}
    assert all(e.rank == e.max_rank for e in plan.layers)
    summary = plan.summary()
    assert summary["layers"] == 5 and summary["params_before"] == DENSE_PARAMS - 64


def _plan_with_bases() -> Plan:
    plan = plan_uniform(MODEL, rank_fraction=0.5)
    layer = plan.layers[0]
    g, m, n = 1, 16, 27
    rng = np.random.default_rng(0)
    plan.bases[layer.weight] = (rng.standard_normal((g, m, m)).astype(np.float32),
                                rng.standard_normal((g, m)).astype(np.float32),
                                rng.standard_normal((g, m, n)).astype(np.float32))
    return plan


def test_plan_save_refuses_existing_files_without_overwrite(tmp_path):
    plan, path = _plan_with_bases(), tmp_path / "plan.json"
    bases = tmp_path / "plan.json.bases.npz"
    for existing in (path, bases):
        existing.write_bytes(b"precious")
        with pytest.raises(OnnxlrfError, match=f"output exists: .*{existing.name} \\(pass --overwrite"):
            plan.save(path)
        assert sorted(p.name for p in tmp_path.iterdir()) == [existing.name]
        assert existing.read_bytes() == b"precious"
        existing.unlink()
    path.write_bytes(b"old")
    bases.write_bytes(b"old")
    plan.save(path, overwrite=True)
    loaded = Plan.load(path)
    assert loaded.options["bases_file"] == bases.name
    np.testing.assert_array_equal(loaded.bases[plan.layers[0].weight][2], plan.bases[plan.layers[0].weight][2])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plan.json", "plan.json.bases.npz"]


def test_plan_save_is_byte_identical(tmp_path, monkeypatch):
    """Same plan, same bytes: the bases archive does not record when it was written."""
    plan = _plan_with_bases()
    plan.save(tmp_path / "a.json")
    real_localtime = __import__("time").localtime
    monkeypatch.setattr("time.localtime", lambda *a: real_localtime(1_000_000_000))  # another day
    plan.save(tmp_path / "b.json")
    assert (tmp_path / "a.json.bases.npz").read_bytes() == (tmp_path / "b.json.bases.npz").read_bytes()
    a, b = (json.loads((tmp_path / f"{n}.json").read_text()) for n in "ab")
    assert a["options"].pop("bases_file") == "a.json.bases.npz" and b["options"].pop("bases_file") == "b.json.bases.npz"
    assert a == b


def joint_like_plan(model: onnx.ModelProto) -> Plan:
    """A uniform plan at half rank whose layers use stored bases (each weight's own SVD), as joint plans do."""
    plan = plan_uniform(model, rank_fraction=0.5)
    layers = {layer.node: layer for layer in find_layers(model)[0]}
    for entry in plan.layers:
        if entry.changed:
            layer = layers[entry.node]
            plan.bases[entry.weight] = tuple(a.astype(np.float32) for a in svd(
                weight_matrices(weight_array(model, layer), layer, entry.decomposition)))
            entry.basis = "joint"
    return plan


def test_a_plan_with_stored_bases_binds_to_the_weights_they_came_from(tmp_path):
    plan = joint_like_plan(MODEL)
    assert set(plan.source["weights"]) == {layer.weight for layer in find_layers(MODEL)[0]}
    validate_plan(plan, MODEL)
    other = onnx.ModelProto()
    other.CopyFrom(MODEL)  # another checkpoint of the same graph: same names and shapes, other values
    for init in other.graph.initializer:
        if init.name == "conv2.w":
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * 1.01, init.name))
    with pytest.raises(OnnxlrfError, match="weight 'conv2.w' is not the one the plan's stored bases were computed"):
        validate_plan(plan, other)
    plan.save(tmp_path / "plan.json")
    with pytest.raises(OnnxlrfError, match="conv2.w"):
        apply_plan(other, Plan.load(tmp_path / "plan.json"))
    # Entries without stored bases are computed from the model's own weights: any checkpoint will do.
    validate_plan(plan_uniform(MODEL, rank_fraction=0.5), other)


@pytest.mark.parametrize("spoil, message", [
    (lambda arrays, w: arrays.update({f"{w}|s": np.full_like(arrays[f"{w}|s"], np.nan)}), "not finite"),
    (lambda arrays, w: arrays.pop(f"{w}|yt"), "lack part 'yt'"),
    (lambda arrays, w: arrays.update({f"{w}|x": arrays[f"{w}|x"][:, :, :-1]}), "do not fit each other"),
    (lambda arrays, w: arrays.update({f"{w}|colour": np.zeros(1)}), "unknown part"),
    (lambda arrays, w: [arrays.update({k: v[..., :1] if k.endswith("|x") or k.endswith("|s") else v[:, :1]})
                        for k, v in list(arrays.items()) if k.startswith(w)], "beyond the 1 components"),
])
def test_bases_files_are_checked_before_use(tmp_path, spoil, message):
    plan = joint_like_plan(MODEL)
    plan.save(tmp_path / "plan.json")
    bases = tmp_path / "plan.json.bases.npz"
    with np.load(bases) as stored:
        arrays = dict(stored)
    spoil(arrays, "conv2.w")
    np.savez(bases, **arrays)
    with pytest.raises(OnnxlrfError, match=message) as caught:
        apply_plan(MODEL, Plan.load(tmp_path / "plan.json"))
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("write, message", [
    (lambda path: path.write_bytes(b"PK\x03\x04 not a zip"), "cannot read the plan's bases"),
    (lambda path: path.unlink(), "bases file not found"),
])
def test_unreadable_bases_files(tmp_path, write, message):
    plan = joint_like_plan(MODEL)
    plan.save(tmp_path / "plan.json")
    write(tmp_path / "plan.json.bases.npz")
    with pytest.raises(OnnxlrfError, match=message):
        Plan.load(tmp_path / "plan.json")


@pytest.mark.parametrize("content, message", [
    ("{}".encode("utf-16"), "not UTF-8"),
    (b"[" * 200_000 + b"]" * 200_000, "nested too deeply|not valid JSON"),
])
def test_plan_files_that_are_not_plans(tmp_path, content, message):
    path = tmp_path / "plan.json"
    path.write_bytes(content)
    with pytest.raises(OnnxlrfError, match=message):
        Plan.load(path)


def test_a_fifo_is_no_plan(tmp_path):
    os.mkfifo(tmp_path / "plan.json")
    with pytest.raises(OnnxlrfError, match="plan must be a regular file, got a FIFO"):
        Plan.load(tmp_path / "plan.json")
