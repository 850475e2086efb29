"""refit_plan: each planned layer refit to undo what the truncations before it changed, on models built here."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from test_data import masked_mean

from onnxlrf.data import Dataset
from onnxlrf.errors import OnnxlrfError
from onnxlrf.graph.layers import count_params, find_layers
from onnxlrf.planning.plan import Plan
from onnxlrf.runtime.sessions import make_session
from onnxlrf.techniques.lowrank.planners import plan_uniform
from onnxlrf.techniques.lowrank.refit import refit_plan
from onnxlrf.techniques.lowrank.rewrite import apply_plan

SAMPLES = 512


def _model(nodes: list, inputs: list, output: str, output_shape: list, initializers: dict) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "net", inputs,
                              [helper.make_tensor_value_info(output, TensorProto.FLOAT, output_shape)],
                              [numpy_helper.from_array(v.astype(np.float32), k) for k, v in initializers.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model, full_check=True)
    return model


def _decaying(rng: np.random.Generator, rows: int, cols: int, decay: float = 0.93) -> np.ndarray:
    """A matrix whose singular values fall off geometrically, as trained layers' do."""
    u = np.linalg.qr(rng.standard_normal((rows, rows)))[0]
    v = np.linalg.qr(rng.standard_normal((cols, cols)))[0]
    k = min(rows, cols)
    return (u[:, :k] * decay ** np.arange(k)) @ v[:, :k].T


def mlp() -> onnx.ModelProto:
    """Two exported-Linear layers (MatMul then Add) and a Gemm: x[N,48] -> [N,64] -> [N,64] -> [N,10]."""
    rng = np.random.default_rng(0)
    return _model(
        [helper.make_node("MatMul", ["x", "w1"], ["h1"], name="fc1"),
         helper.make_node("Add", ["h1", "b1"], ["a1"], name="fc1_bias"),
         helper.make_node("Relu", ["a1"], ["r1"], name="relu1"),
         helper.make_node("MatMul", ["r1", "w2"], ["h2"], name="fc2"),
         helper.make_node("Add", ["h2", "b2"], ["a2"], name="fc2_bias"),
         helper.make_node("Relu", ["a2"], ["r2"], name="relu2"),
         helper.make_node("Gemm", ["r2", "w3", "b3"], ["y"], name="fc3", transB=1)],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 48])], "y", ["batch", 10],
        {"w1": _decaying(rng, 48, 64), "b1": rng.standard_normal(64) / 5,
         "w2": _decaying(rng, 64, 64), "b2": rng.standard_normal(64) / 5,
         "w3": _decaying(rng, 10, 64), "b3": rng.standard_normal(10) / 5})


def convnet() -> onnx.ModelProto:
    """Two 3x3 convs with biases, the second grouped: x[N,6,8,8] -> [N,24,8,8] -> [N,24,8,8]."""
    rng = np.random.default_rng(0)
    w2 = np.stack([_decaying(rng, 12, 12 * 9) for _ in range(2)]).reshape(24, 12, 3, 3)
    return _model(
        [helper.make_node("Conv", ["x", "w1", "b1"], ["h1"], name="conv1", pads=[1, 1, 1, 1]),
         helper.make_node("Relu", ["h1"], ["r1"], name="relu1"),
         helper.make_node("Conv", ["r1", "w2", "b2"], ["h2"], name="conv2", pads=[1, 1, 1, 1], group=2),
         helper.make_node("Relu", ["h2"], ["y"], name="relu2")],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 6, 8, 8])], "y", ["batch", 24, 8, 8],
        {"w1": _decaying(rng, 24, 6 * 9).reshape(24, 6, 3, 3), "b1": rng.standard_normal(24) / 5,
         "w2": w2, "b2": rng.standard_normal(24) / 5})


def channel_plan(model: onnx.ModelProto, fraction: float) -> Plan:
    """Every layer in channel decomposition at ``fraction`` of its full rank."""
    layers = {layer.node: layer for layer in find_layers(model)[0]}
    entries = []
    for entry in plan_uniform(model, rank_fraction=1.0).layers:
        layer = layers[entry.node]
        rank = max(1, round(fraction * layer.max_rank("channel")))
        entries.append(dataclasses.replace(entry, decomposition="channel", rank=rank, keep=None,
                                           max_rank=layer.max_rank("channel"),
                                           params_planned=layer.factorized_params("channel", rank)))
    return Plan(layers=entries, mode="uniform")


def _dataset(model: onnx.ModelProto, seed: int = 1) -> Dataset:
    """Inputs that, as real data, vary in fewer directions than they have features."""
    shape = [d.dim_value or SAMPLES for d in model.graph.input[0].type.tensor_type.shape.dim]
    rng, mixing = np.random.default_rng(seed), np.random.default_rng(0).standard_normal((shape[1] // 4, shape[1]))
    x = np.moveaxis(np.moveaxis(rng.standard_normal([shape[0], shape[1] // 4, *shape[2:]]), 1, -1) @ mixing, -1, 1)
    x = (x + 0.05 * rng.standard_normal(shape)).astype(np.float32)
    return Dataset("random", "classification", {"x": x}, np.zeros(SAMPLES, dtype=np.int64))


def _values(model: onnx.ModelProto, data: Dataset, names: list[str]) -> list[np.ndarray]:
    """Tensors ``names`` of ``model`` on ``data``, computed in onnxruntime."""
    exposed = onnx.ModelProto()
    exposed.CopyFrom(model)
    del exposed.graph.output[:]
    exposed.graph.output.extend(helper.make_empty_tensor_value_info(name) for name in names)
    return make_session(exposed, providers=["CPUExecutionProvider"]).run(None, data.inputs)


def _only(plan: Plan, node: str) -> Plan:
    """``plan`` with every other layer dense."""
    layers = [entry if entry.node == node else dataclasses.replace(entry, decomposition="dense", rank=None, keep=None,
                                                                   params_planned=entry.params_dense)
              for entry in plan.layers]
    return dataclasses.replace(plan, layers=layers)


@pytest.mark.parametrize("build, first, second, output", [
    (mlp, "fc1", "fc2", "a2"),
    (convnet, "conv1", "conv2", "h2"),
], ids=["matmul-gemm", "conv-grouped"])
def test_refit_undoes_what_earlier_truncations_changed(build, first: str, second: str, output: str) -> None:
    model = build()
    plan = channel_plan(model, 0.3)
    calib, held_out = _dataset(model, seed=1), _dataset(model, seed=2)
    refit, summary = refit_plan(model, plan, calib, batch_size=100)

    planned = {e.node: e for e in plan.layers if e.decomposition != "dense"}
    assert set(summary["refit"]) == set(planned) and summary["skipped"] == []
    for entry in refit.layers:  # same ranks, so the same sizes
        if entry.node in planned:
            assert (entry.basis, entry.rank, entry.decomposition) == ("refit", planned[entry.node].rank, "channel")
    compressed, report = apply_plan(model, plan)
    refit_model, refit_report = apply_plan(model, refit)
    assert refit_report.params_after == report.params_after == count_params(refit_model)

    # The first planned layer sees the original inputs: nothing to correct.
    (alone,) = _values(apply_plan(model, _only(plan, first))[0], held_out, [output])
    (first_refit,) = _values(apply_plan(model, _only(refit, first))[0], held_out, [output])
    np.testing.assert_allclose(first_refit, alone, rtol=1e-3, atol=1e-4)
    # The second sees the first's truncation. Its target is its own planned truncation on the original inputs,
    # and the refit reproduces it better than the plan does, on samples it was not fit on too.
    (target,) = _values(apply_plan(model, _only(plan, second))[0], held_out, [output])
    (as_planned,) = _values(compressed, held_out, [output])
    (refit_output,) = _values(refit_model, held_out, [output])
    before, after = np.linalg.norm(as_planned - target), np.linalg.norm(refit_output - target)
    assert after < 0.8 * before


def test_refit_plan_saves_and_loads(tmp_path: Path) -> None:
    model = mlp()
    refit, _ = refit_plan(model, channel_plan(model, 0.3), _dataset(model))
    refit.save(tmp_path / "plan.json")
    loaded = Plan.load(tmp_path / "plan.json")
    for weight, basis in refit.bases.items():
        assert len(loaded.bases[weight]) == len(basis) == 5 and loaded.bases[weight][3] is None
        np.testing.assert_array_equal(loaded.bases[weight][4], basis[4])
    data = _dataset(model, seed=2)
    np.testing.assert_array_equal(_values(apply_plan(model, loaded)[0], data, ["y"])[0],
                                  _values(apply_plan(model, refit)[0], data, ["y"])[0])


def test_refit_without_its_bias_change_is_refused() -> None:
    model = mlp()
    refit, _ = refit_plan(model, channel_plan(model, 0.3), _dataset(model))
    broken = dataclasses.replace(refit, bases={w: b[:3] for w, b in refit.bases.items()})
    with pytest.raises(OnnxlrfError, match="refit, but the plan stores no bias change"):
        apply_plan(model, broken)


def test_refit_keeps_spatial_layers_as_planned() -> None:
    model = convnet()
    plan = channel_plan(model, 0.3)
    layers = [dataclasses.replace(e, decomposition="spatial", rank=4, keep=None, max_rank=18)
              if e.node == "conv1" else e for e in plan.layers]
    refit, summary = refit_plan(model, dataclasses.replace(plan, layers=layers), _dataset(model))
    assert summary["skipped"] == [{"node": "conv1", "reason": "spatial decomposition"}]
    assert [e.basis for e in refit.layers] == ["svd", "refit"]


def test_backoff_keeps_the_refit_plan_where_validation_is_better() -> None:
    from onnxlrf.measure.analysis import AnalysisOptions, joint_analysis
    from onnxlrf.planning.joint import PlanOptions
    from onnxlrf.verify.backoff import backoff_plan

    model = mlp()
    data = _dataset(model, seed=3)
    session = make_session(model, providers=["CPUExecutionProvider"])
    data.labels = session.run(None, data.inputs)[0].argmax(axis=1)  # the original scores 1.0
    calib, val = data.subset(np.arange(0, 256)), data.subset(np.arange(256, 512))
    # The plans this scenario was built on (a refit beating its plan on validation) come with first-order terms.
    sensitivity = joint_analysis(model, calib, AnalysisOptions(labels="labels", first_order=True))
    result = backoff_plan(model, sensitivity, val, PlanOptions("lossless", target_reduction=0.7), calib=calib,
                          refit=True, select="metric")
    plan, backoff = result.plan, result.attempts
    refit = [entry for entry in backoff if entry.refit]
    assert len(refit) == 1 and refit[0].chosen and [e for e in backoff if e.chosen] == refit
    assert refit[0].val > max(entry.val for entry in backoff if not entry.refit and entry.val is not None)
    assert {e.basis for e in plan.layers if e.decomposition != "dense"} == {"refit"}

    plain = backoff_plan(model, sensitivity, val, PlanOptions("lossless", target_reduction=0.7), calib=calib)
    assert not any(entry.refit for entry in plain.attempts)
    assert plain.plan.summary()["params_after"] == plan.summary()["params_after"]

    # A refit plan that does not beat the plan on validation is recorded, and the plan kept.
    result = backoff_plan(model, sensitivity, val, PlanOptions("lossless", target_reduction=0.2), calib=calib,
                          refit=True, select="metric")
    (refit,) = [entry for entry in result.attempts if entry.refit]
    (chosen,) = [entry for entry in result.attempts if entry.chosen]
    assert refit is not chosen and refit.val <= chosen.val
    assert "refit" not in {e.basis for e in result.plan.layers}
    # Classified data chooses by the mean validation loss (select "auto"), the refit included.
    for target in (0.2, 0.7):
        result = backoff_plan(model, sensitivity, val, PlanOptions("lossless", target_reduction=target), calib=calib,
                              refit=True)
        assert result.plan.options["select"] == "loss"
        (refit,) = [entry for entry in result.attempts if entry.refit]
        plain = [e for e in result.attempts if not e.refit and e.val is not None and e.same_as_kappa is None]
        lowest = min(e.loss_change for e in plain)
        (chosen,) = [entry for entry in result.attempts if entry.chosen]
        assert chosen.loss_change == min(lowest, refit.loss_change)
        assert (chosen is refit) == (refit.loss_change < lowest)
        assert ("refit" in {e.basis for e in result.plan.layers}) == (chosen is refit)


def token_encoder(decay: float = 0.93) -> onnx.ModelProto:
    """Embedding -> MatMul -> Relu -> MatMul -> mean over the attention mask: padding tokens cannot reach the output."""
    rng = np.random.default_rng(0)
    vocab, hidden = 40, 24
    floats = {"embedding": rng.standard_normal((vocab, hidden)), "w1": _decaying(rng, hidden, hidden, decay),
              "w2": _decaying(rng, hidden, hidden, decay)}
    pooling, axes = masked_mean("h2", "y")
    graph = helper.make_graph(
        [helper.make_node("Gather", ["embedding", "input_ids"], ["tokens"], name="embed"),
         helper.make_node("MatMul", ["tokens", "w1"], ["h1"], name="fc1"),
         helper.make_node("Relu", ["h1"], ["r1"], name="relu1"),
         helper.make_node("MatMul", ["r1", "w2"], ["h2"], name="fc2")] + pooling,
        "encoder",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", 6]),
         helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", hidden])],
        [numpy_helper.from_array(v.astype(np.float32), k) for k, v in floats.items()] + axes)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model, full_check=True)
    return model


def token_pairs(padding_ids: int, token_mask: str | None = "attention_mask", pairs: int = 200) -> Dataset:
    """Sentence pairs of 2 to 6 tokens; padded positions hold ``padding_ids`` (which the model must ignore)."""
    rng = np.random.default_rng(0)
    lengths = rng.integers(2, 7, 2 * pairs)
    mask = (np.arange(6) < lengths[:, None]).astype(np.int64)
    ids = np.where(mask == 1, rng.integers(0, 20, (2 * pairs, 6)), padding_ids).astype(np.int64)
    return Dataset("pairs", "sentence-similarity", {"input_ids": ids, "attention_mask": mask},
                   np.zeros(pairs, dtype=np.float32), token_mask=token_mask)


def test_refit_leaves_padding_tokens_out() -> None:
    """The regression fits real tokens only: what padding positions hold cannot change the refit."""
    model = token_encoder()
    plan = channel_plan(model, 0.3)

    def refit_weights(data: Dataset) -> dict:
        return {w: b[:3] for w, b in refit_plan(model, plan, data)[0].bases.items()}

    masked = refit_weights(token_pairs(padding_ids=0))
    for weight, basis in refit_weights(token_pairs(padding_ids=39)).items():
        for part, other in zip(basis, masked[weight]):
            np.testing.assert_allclose(part, other, rtol=1e-4, atol=1e-5)
    # Without the mask the padding rows enter the fit of the second layer.
    unmasked = refit_weights(token_pairs(padding_ids=0, token_mask=None))
    assert not np.allclose(unmasked["w2"][1], masked["w2"][1], rtol=1e-3)


def test_a_refit_that_would_add_a_bias_is_not_kept() -> None:
    """A MatMul with no bias to fold the refit's shift into would get a new bias: parameters the plan does not
    count, so the back-off rejects the refit before validating it and the plan keeps its size."""
    import io

    from onnxlrf.measure.analysis import AnalysisOptions, joint_analysis
    from onnxlrf.planning.joint import PlanOptions
    from onnxlrf.progress import Progress
    from onnxlrf.verify.backoff import backoff_plan

    rng = np.random.default_rng(0)
    model = _model(
        [helper.make_node("MatMul", ["x", "w1"], ["h1"], name="fc1"),
         helper.make_node("Relu", ["h1"], ["r1"], name="relu1"),
         helper.make_node("MatMul", ["r1", "w2"], ["h2"], name="fc2"),
         helper.make_node("Relu", ["h2"], ["r2"], name="relu2"),
         helper.make_node("MatMul", ["r2", "w3"], ["y"], name="fc3")],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 48])], "y", ["batch", 10],
        {"w1": _decaying(rng, 48, 64), "w2": _decaying(rng, 64, 64), "w3": _decaying(rng, 64, 10)})
    data = _dataset(model, seed=3)
    data.labels = make_session(model, providers=["CPUExecutionProvider"]).run(None, data.inputs)[0].argmax(axis=1)
    calib, val = data.subset(np.arange(0, 256)), data.subset(np.arange(256, 512))
    log = io.StringIO()
    result = backoff_plan(model, joint_analysis(model, calib, AnalysisOptions(labels="labels")), val,
                          PlanOptions("lossless", target_reduction=0.6), calib=calib, refit=True,
                          progress=Progress(stream=log, bars=False))
    assert "parameters the plan does not count: rejected" in log.getvalue()
    assert not any(attempt.refit for attempt in result.attempts)
    compressed_params = count_params(result.model)
    assert compressed_params == count_params(model) - result.plan.summary()["params_removed"]
    assert compressed_params <= 0.4 * count_params(model)
