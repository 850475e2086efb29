"""compress / rewrite_file: the Python API path, on a small MLP built here and once on the real ResNet-20."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxlrf.graph.layers import find_layers
from onnxlrf.pipeline import CompressResult, ExportOptions, compress, rewrite_file
from onnxlrf.planning.joint import PlanOptions
from onnxlrf.progress import Progress
from onnxlrf.techniques.lowrank.technique import LOWRANK
from onnxlrf.verify.backoff import ValidationEvaluator, restore_layers
from onnxlrf.verify.search import Score

HALF_RANK = PlanOptions("uniform", rank_fraction=0.5)
from onnxlrf.costs.params import ParamsCost
from onnxlrf.data import Dataset
from onnxlrf.errors import OnnxlrfError
from onnxlrf.graph.layers import count_params
from onnxlrf.onnx_io import load_onnx
from onnxlrf.planning.plan import Plan
from onnxlrf.runtime.sessions import make_session, run_dataset
from onnxlrf.techniques.lowrank.planners import plan_uniform
from onnxlrf.techniques.lowrank.rewrite import apply_plan

IN, HIDDEN, CLASSES, SAMPLES = 32, 48, 10, 200


def mlp(inputs: int = IN, hidden: int = HIDDEN, classes: int = CLASSES, nonfinite: float | None = None
        ) -> onnx.ModelProto:
    """x[N,inputs] -MatMul-> [N,hidden] -Relu-> Gemm(transB, bias) -> logits[N,classes].

    ``nonfinite`` (NaN or Inf) is written into w1[1, 2].
    """
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((inputs, hidden)).astype(np.float32)
    if nonfinite is not None:
        w1[1, 2] = nonfinite
    w2 = numpy_helper.from_array(rng.standard_normal((classes, hidden)).astype(np.float32), "w2")
    b2 = numpy_helper.from_array(rng.standard_normal(classes).astype(np.float32), "b2")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
         helper.make_node("Relu", ["h"], ["r"], name="relu"),
         helper.make_node("Gemm", ["r", "w2", "b2"], ["logits"], name="fc2", transB=1)],
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", inputs])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", classes])],
        [numpy_helper.from_array(w1, "w1"), w2, b2],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model, full_check=True)
    return model


def run(path: Path, x: np.ndarray) -> np.ndarray:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture()
def model_path(tmp_path: Path) -> Path:
    path = tmp_path / "mlp.onnx"
    onnx.save(mlp(), str(path))
    return path


@pytest.fixture()
def data(tmp_path: Path, model_path: Path) -> str:
    """npz data labelled with the original's own predictions: the reference scores exactly 1."""
    x = np.random.default_rng(1).standard_normal((SAMPLES, IN)).astype(np.float32)
    path = tmp_path / "data.npz"
    np.savez(path, x=x, labels=run(model_path, x).argmax(axis=1).astype(np.int64))
    return f"npz:{path}"


def test_compress_onnx_uniform(tmp_path: Path, model_path: Path, data: str) -> None:
    out, plan_out = tmp_path / "small.onnx", tmp_path / "plan.json"
    result = compress(str(model_path), out, PlanOptions("uniform", rank_fraction=0.25), data, plan_out=plan_out,
                      provider="cpu")
    assert isinstance(result, CompressResult) and result.output == out and result.export is None
    reference_params = IN * HIDDEN + CLASSES * HIDDEN + CLASSES
    assert result.reference_params == reference_params
    # fc1 at rank ceil(0.25*32)=8: 8*(32+48); fc2 at rank ceil(0.25*10)=3: 3*(48+10); bias unchanged.
    assert result.params == 8 * (IN + HIDDEN) + 3 * (HIDDEN + CLASSES) + CLASSES
    assert result.params == count_params(load_onnx(out))
    assert result.params_reduction == pytest.approx(1 - result.params / reference_params)
    assert {r["node"] for r in result.rewrite.rewritten} == {"fc1", "fc2"}

    v = result.validation
    assert v.metric == "top1" and v.samples == SAMPLES and v.reference_value == 1.0
    assert 0 <= v.value < 1 and v.max_abs_diff > 0 and v.providers == ["CPUExecutionProvider"]
    payload = result.to_dict()
    assert {"params", "reference_params", "params_reduction", "metric", "value", "reference_value",
            "max_abs_diff", "providers"} <= payload.keys()

    plan = Plan.load(plan_out)
    assert plan.mode == "uniform" and [layer.rank for layer in plan.layers] == [8, 3]
    assert plan.source["model"] == str(model_path)
    # The saved plan reproduces the output, from a path and from a Plan object.
    x = np.random.default_rng(2).standard_normal((5, IN)).astype(np.float32)
    for i, source in enumerate((plan_out, plan)):
        again = tmp_path / f"again{i}.onnx"
        report = rewrite_file(model_path, source, again)
        assert report.params_after == result.params
        np.testing.assert_array_equal(run(again, x), run(out, x))


def test_compress_energy_target(tmp_path: Path, model_path: Path) -> None:
    result = compress(str(model_path), tmp_path / "e.onnx", PlanOptions("energy", target_reduction=0.3))
    assert result.validation is None
    assert 0.3 <= result.params_reduction
    assert result.plan.options["target_reduction"] == 0.3 and 0 < result.plan.options["energy"] <= 1


def test_full_rank_fraction_changes_nothing(tmp_path: Path, model_path: Path, data: str) -> None:
    """Factorizing at full rank is never smaller, so every layer stays dense and outputs are identical."""
    result = compress(str(model_path), tmp_path / "same.onnx", PlanOptions("uniform", rank_fraction=1.0), data)
    assert result.params == result.reference_params and not result.rewrite.rewritten
    assert result.validation.max_abs_diff == 0 and result.validation.value == 1.0


def test_compress_model_name(tmp_path: Path, resnet20_weights: Path, cifar_npz: Path) -> None:
    with np.load(cifar_npz) as npz:
        images, labels = npz["images"][:200], npz["labels"][:200]
    subset = tmp_path / "cifar.npz"
    np.savez(subset, images=images, labels=labels)
    out = tmp_path / "r20.onnx"
    result = compress("cifar10-resnet20", out, PlanOptions("uniform", rank_fraction=0.5), f"cifar10-jpeg:{subset}",
                      export=ExportOptions(weights=str(resnet20_weights)))
    assert result.export.exporter == "torchscript" and result.export.max_abs_diff <= result.export.tolerance
    assert result.reference_params == 269_034  # ResNet-20 with BatchNorm folded into the convs
    assert 0.4 < result.params_reduction < 0.6
    assert result.validation.samples == 200 and result.validation.reference_value > 0.7
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cifar.npz", "r20.onnx"]  # the export stayed temporary


@pytest.mark.parametrize("kwargs, message", [
    ({"mode": "lossless", "target_reduction": 0.3}, "needs --data"),
    ({"mode": "uniform"}, "exactly one"),
    ({"mode": "uniform", "rank_fraction": 0.5, "target_reduction": 0.5}, "exactly one"),
    ({"mode": "energy", "rank_fraction": 0.5}, "exactly one"),
    ({"mode": "svd", "rank_fraction": 0.5}, "unknown mode 'svd'"),
    ({"mode": "uniform", "rank_fraction": 0.5, "weights": "w.th"}, "--weights"),
    ({"mode": "uniform", "rank_fraction": 0.5, "data": "npz:{dir}/nothing.npz"}, "nothing.npz"),
    ({"mode": "uniform", "target_reduction": 0.99}, "out of reach"),
], ids=["joint-without-data", "no-knob", "two-knobs", "energy-with-rank-fraction", "unknown-mode",
        "weights-with-onnx", "missing-data", "unreachable-target"])
def test_compress_errors_write_nothing(tmp_path: Path, model_path: Path, kwargs: dict, message: str) -> None:
    kwargs = {k: v.replace("{dir}", str(tmp_path)) if isinstance(v, str) else v for k, v in kwargs.items()}
    data, export = kwargs.pop("data", None), ExportOptions(weights=kwargs.pop("weights", None))
    before = sorted(tmp_path.iterdir())
    with pytest.raises(OnnxlrfError, match=message.replace("-", r"\-")) as info:
        compress(str(model_path), tmp_path / "out.onnx", PlanOptions(**kwargs), data, export=export,
                 plan_out=tmp_path / "plan.json")
    assert "\n" not in str(info.value)
    assert sorted(tmp_path.iterdir()) == before


def test_existing_outputs_survive(tmp_path: Path, model_path: Path) -> None:
    out, plan_out = tmp_path / "out.onnx", tmp_path / "plan.json"
    out.write_bytes(b"keep me")
    with pytest.raises(OnnxlrfError, match="output exists"):
        compress(str(model_path), out, HALF_RANK)
    assert out.read_bytes() == b"keep me"
    with pytest.raises(OnnxlrfError, match="must differ|same as input"):
        compress(str(model_path), tmp_path / "new.onnx", HALF_RANK, plan_out=tmp_path / "new.onnx")
    with pytest.raises(OnnxlrfError, match="same as input"):
        compress(str(model_path), model_path, HALF_RANK, overwrite=True)
    result = compress(str(model_path), out, HALF_RANK, plan_out=plan_out, overwrite=True)
    assert load_onnx(out) and result.plan.mode == "uniform" and plan_out.is_file()


def test_rewrite_file_errors(tmp_path: Path, model_path: Path) -> None:
    plan = plan_uniform(load_onnx(model_path), rank_fraction=0.5)
    out = tmp_path / "out.onnx"
    original = digest(model_path)
    with pytest.raises(OnnxlrfError, match="same as input"):
        rewrite_file(model_path, plan, model_path, overwrite=True)
    plan.layers[0].node = "nope"
    with pytest.raises(OnnxlrfError, match="'nope'"):
        rewrite_file(model_path, plan, out)
    plan.layers[0].node, plan.layers[0].rank = "fc1", plan.layers[0].max_rank + 1
    with pytest.raises(OnnxlrfError, match="rank"):
        rewrite_file(model_path, plan, out)
    bad_json = tmp_path / "bad.json"
    bad_json.write_text("{not json")
    with pytest.raises(OnnxlrfError, match="not valid JSON"):
        rewrite_file(model_path, bad_json, out)
    with pytest.raises(OnnxlrfError, match="same as input"):
        rewrite_file(model_path, bad_json, bad_json, overwrite=True)
    assert not out.exists() and digest(model_path) == original


# --- the output pair: both or neither ----------------------------------------------------------------

def _listing(directory: Path) -> dict[str, bytes]:
    """Every file, hidden temporaries included, with its content."""
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


@pytest.mark.parametrize("existing", [False, True], ids=["new", "replacing"])
def test_failed_plan_write_leaves_no_pair(tmp_path: Path, model_path: Path, existing: bool,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    out, plan_out = tmp_path / "out.onnx", tmp_path / "plan.json"
    if existing:
        out.write_bytes(b"old model")
        plan_out.write_bytes(b"old plan")
    before = _listing(tmp_path)

    def disk_full(self: Path, *args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device", str(self))

    monkeypatch.setattr(Path, "write_text", disk_full)  # the model is written (write_bytes), the plan is not
    with pytest.raises(OnnxlrfError) as info:
        compress(str(model_path), out, HALF_RANK, plan_out=plan_out, overwrite=existing)
    assert str(info.value) == f"cannot write {plan_out}: No space left on device"
    assert _listing(tmp_path) == before


def test_failed_rename_of_the_plan_restores_the_model(tmp_path: Path, model_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    out, plan_out = tmp_path / "out.onnx", tmp_path / "plan.json"
    out.write_bytes(b"old model")
    before = _listing(tmp_path)
    real_replace = __import__("os").replace

    def replace(src: object, dst: object) -> None:
        if Path(dst) == plan_out:
            raise OSError(5, "Input/output error")
        real_replace(src, dst)

    monkeypatch.setattr("os.replace", replace)
    with pytest.raises(OnnxlrfError, match=r"cannot write .*plan\.json: Input/output error"):
        compress(str(model_path), out, HALF_RANK, plan_out=plan_out, overwrite=True)
    assert _listing(tmp_path) == before


def test_existing_bases_file_needs_overwrite(tmp_path: Path, model_path: Path, data: str) -> None:
    """A joint plan writes <plan>.bases.npz beside the JSON: it obeys --overwrite too, checked before any work."""
    bases = tmp_path / "plan.json.bases.npz"
    bases.write_bytes(b"precious")
    with pytest.raises(OnnxlrfError, match=r"output exists: .*plan\.json\.bases\.npz \(pass --overwrite"):
        compress(str(model_path), tmp_path / "out.onnx", PlanOptions("compact"), data, plan_out=tmp_path / "plan.json")
    assert bases.read_bytes() == b"precious" and not (tmp_path / "out.onnx").exists()


def _with_nonfinite(path: Path, value: float, weight: str = "w2") -> Path:
    model = onnx.load(str(path))
    tensor = next(t for t in model.graph.initializer if t.name == weight)
    array = numpy_helper.to_array(tensor).copy()
    array.flat[3] = value
    tensor.CopyFrom(numpy_helper.from_array(array, weight))
    bad = path.with_name(f"bad_{value}.onnx")
    onnx.save(model, str(bad))
    return bad


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nonfinite_weights_are_refused(tmp_path: Path, model_path: Path, value: float) -> None:
    bad = _with_nonfinite(model_path, value)
    before = _listing(tmp_path)
    with pytest.raises(OnnxlrfError, match="weight 'w2' of the model contains NaN or Inf"):
        compress(str(bad), tmp_path / "out.onnx", HALF_RANK, plan_out=tmp_path / "plan.json")
    with pytest.raises(OnnxlrfError, match="weight 'w2' of the model contains NaN or Inf"):
        rewrite_file(bad, plan_uniform(load_onnx(model_path), rank_fraction=0.5), tmp_path / "out.onnx")
    assert _listing(tmp_path) == before


def test_range_check_batches_keep_activations_within_budget(tmp_path: Path, resnet20_weights: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    from onnxlrf.models import load_model

    from onnxlrf.data import Dataset
    from onnxlrf.export import export_model
    from onnxlrf.measure import analysis as analysis_module

    spec = load_model("cifar10-resnet20", weights=str(resnet20_weights))
    model = load_onnx(export_model(spec, tmp_path / "r20.onnx", dynamic_batch=True).path)
    images = Dataset("zeros", "classification", {"input": np.zeros((4, 3, 32, 32), np.float32)}, np.zeros(4, int))
    per_image = 16 * 32 * 32 * 4  # ResNet-20's largest activation
    assert analysis_module.range_batch_size(model, images) == 128  # 16 MiB fits 256 images: the cap
    monkeypatch.setattr(analysis_module, "RANGE_BATCH_BYTES", 5 * per_image + 1)
    assert analysis_module.range_batch_size(model, images) == 5
    monkeypatch.setattr(analysis_module, "RANGE_BATCH_BYTES", per_image // 2)
    assert analysis_module.range_batch_size(model, images) == 1


def test_restore_sets_back_the_worst_measured_layer_until_validation_holds() -> None:
    model = mlp()
    x = np.random.default_rng(1).standard_normal((SAMPLES, IN)).astype(np.float32)
    labels = make_session(model, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0].argmax(axis=1)
    val = Dataset("val", "classification", {"x": x}, labels)
    holding = plan_uniform(model, rank_fraction=1.0)  # every layer dense: nothing is below break-even
    assert holding.summary()["factorized"] == 0
    ranks = {"fc1": 19, "fc2": 1}  # fc1 mildly truncated; fc2 at rank 1 ruins the model
    layers = {layer.node: layer for layer in find_layers(model)[0]}
    failing = Plan(layers=[dataclasses.replace(e, decomposition="channel", rank=ranks[e.node],
                                               params_planned=layers[e.node].factorized_params("channel",
                                                                                               ranks[e.node]))
                           for e in holding.layers], mode="uniform", options=dict(holding.options))
    fc1_only = dataclasses.replace(failing, layers=[failing.layers[0], holding.layers[1]])
    fc1_metric = val.score(run_dataset(make_session(apply_plan(model, fc1_only)[0]), val))
    assert fc1_metric > val.score(run_dataset(make_session(apply_plan(model, failing)[0]), val))

    # Contributions are measured on a calibration split of their own; the check is on val.
    x_calib = np.random.default_rng(2).standard_normal((SAMPLES, IN)).astype(np.float32)
    calib = Dataset("calib", "classification", {"x": x_calib},
                    make_session(model, providers=["CPUExecutionProvider"]).run(None, {"x": x_calib})[0].argmax(axis=1))
    cost = ParamsCost(model)
    evaluator = ValidationEvaluator(model, val, LOWRANK, cost, "cpu", Progress(enabled=False), Score(fc1_metric))
    restored = restore_layers(model, failing, holding, calib, evaluator, LOWRANK, cost)
    value, plan, compressed = restored.value, restored.plan, restored.model
    assert plan.options["restored"] == {"to_kappa": None, "layers": ["fc2"]}
    assert [(e.node, e.decomposition, e.rank) for e in plan.layers] == [("fc1", "channel", 19), ("fc2", "dense", None)]
    assert value == fc1_metric
    assert plan.options["achieved_reduction"] == pytest.approx(1 - count_params(compressed) / count_params(model))
    # A bar that not even the plan with every harmful layer set back reaches: no plan.
    evaluator = ValidationEvaluator(model, val, LOWRANK, cost, "cpu", Progress(enabled=False), Score(1.01))
    assert restore_layers(model, failing, holding, calib, evaluator, LOWRANK, cost) is None
