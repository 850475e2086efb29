"""validation.py: sessions, providers, accuracy and fidelity, FLOPs, benchmarking."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from test_data import classifier_model, sentence_encoder_model

from onnxlrf.data import load_data
from onnxlrf.errors import OnnxlrfError
from onnxlrf.graph.layers import count_params
from onnxlrf.onnx_io import save_onnx
from onnxlrf.runtime.evaluate import BenchResult, benchmark, change_interval, validate
from onnxlrf.runtime.sessions import (
    make_session,
    random_feeds,
    run_dataset,
    select_providers,
)
from onnxlrf.runtime.shapes import count_flops, file_size


@pytest.fixture(scope="module")
def cifar_500(cifar_npz):
    return load_data(f"cifar10-jpeg:{cifar_npz}").subset(range(500))


def perturbed(model: onnx.ModelProto, scale: float = 0.05, seed: int = 1) -> onnx.ModelProto:
    """A copy with every float initializer nudged by relative noise."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    rng = np.random.default_rng(seed)
    for index, init in enumerate(copy.graph.initializer):
        array = numpy_helper.to_array(init)
        if array.dtype == np.float32:
            noisy = array * (1 + scale * rng.standard_normal(array.shape)).astype(np.float32)
            copy.graph.initializer[index].CopyFrom(numpy_helper.from_array(noisy, init.name))
    return copy


def test_select_providers_cpu_only_here():
    assert select_providers("auto") == ["CPUExecutionProvider"]
    assert select_providers("cpu") == ["CPUExecutionProvider"]
    with pytest.raises(OnnxlrfError, match="unknown provider 'tpu'"):
        select_providers("tpu")


def test_select_providers_cuda_refused_without_cuda():
    if select_providers("auto") != ["CPUExecutionProvider"]:
        pytest.skip("CUDA works on this machine")
    with pytest.raises(OnnxlrfError, match="cannot run on CUDA here"):
        select_providers("cuda")


def test_make_session_from_proto_and_path(tmp_path):
    model = classifier_model()
    path = save_onnx(model, tmp_path / "m.onnx")
    x = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
    from_proto = make_session(model).run(None, {"input": x})[0]
    from_path = make_session(path, threads=1).run(None, {"input": x})[0]
    np.testing.assert_array_equal(from_proto, from_path)


def test_make_session_errors_are_one_line(tmp_path):
    with pytest.raises(OnnxlrfError, match="file not found"):
        make_session(tmp_path / "none.onnx")
    model = classifier_model()
    model.graph.node[0].op_type = "NoSuchOp"
    with pytest.raises(OnnxlrfError, match="onnxruntime cannot load the model") as info:
        make_session(model)
    assert "\n" not in str(info.value)


def test_run_dataset_static_batch_pads_last_batch(cifar_500):
    part = cifar_500.subset(range(7))
    dynamic = run_dataset(make_session(classifier_model()), part, batch_size=3)
    static = run_dataset(make_session(classifier_model(batch=4)), part, batch_size=3)
    assert dynamic.shape == static.shape == (7, 10)
    np.testing.assert_allclose(static, dynamic, rtol=1e-5, atol=1e-5)


def test_validate_model_against_itself(cifar_500):
    model = classifier_model()
    result = validate(model, cifar_500, reference=model, batch_size=128, provider="cpu")
    assert result.metric == "top1" and result.samples == 500
    assert result.value == result.reference_value and 0 <= result.value <= 1
    assert result.max_abs_diff == 0 and result.mean_abs_diff == 0
    assert result.top1_agreement == 1 and result.cosine == pytest.approx(1)
    assert result.params == result.reference_params == 4 * 27 + 4 + 10 * 4 + 10
    assert result.providers == ["CPUExecutionProvider"]
    assert result.file_size == result.reference_file_size == model.ByteSize()
    assert result.change_interval == [0.0, 0.0]


def test_validate_against_perturbed_copy(cifar_500):
    model = classifier_model()
    other = perturbed(model)
    result = validate(other, cifar_500, reference=model)
    assert result.max_abs_diff > 0 and 0 < result.mean_abs_diff <= result.max_abs_diff
    assert 0.5 < result.cosine < 1
    assert 0 < result.top1_agreement < 1
    reference_logits = run_dataset(make_session(model), cifar_500)
    other_logits = run_dataset(make_session(other), cifar_500)
    assert result.max_abs_diff == pytest.approx(np.abs(other_logits - reference_logits).max(), rel=1e-6)
    expected = np.mean(other_logits.argmax(1) == reference_logits.argmax(1))
    assert result.top1_agreement == pytest.approx(expected)
    low, high = result.change_interval
    assert low <= result.value - result.reference_value <= high


def test_change_interval_covers_a_known_difference(cifar_500):
    labels = cifar_500.labels
    reference = labels.copy()
    reference[:100] = (labels[:100] + 1) % 10  # 80% correct
    better = labels.copy()
    better[:50] = reference[:50]  # 90% correct, right wherever the reference is
    low, high = change_interval(cifar_500, better, reference)
    # Paired: the change is the share of the 500 samples where only `better` is right (50),
    # a binomial proportion with standard error sqrt(0.1 * 0.9 / 500) = 0.0134.
    assert low == pytest.approx(0.1 - 1.96 * 0.0134, abs=0.006) and high == pytest.approx(0.1 + 1.96 * 0.0134, abs=0.006)
    assert change_interval(cifar_500, better, reference) == [low, high]  # fixed seed
    assert change_interval(cifar_500, reference, better) == pytest.approx([-high, -low])
    swapped = labels.copy()
    swapped[50:150] = (labels[50:150] + 1) % 10  # as accurate as the reference, wrong on other samples
    low, high = change_interval(cifar_500, swapped, reference)
    assert -0.06 < low < 0 < high < 0.06  # no change, and the data says so
    with pytest.raises(OnnxlrfError, match="confidence"):
        change_interval(cifar_500, better, reference, confidence=1.0)


def test_validate_without_reference_and_from_path(cifar_500, tmp_path):
    path = save_onnx(classifier_model(), tmp_path / "m.onnx")
    result = validate(path, cifar_500.subset(range(20)))
    assert result.reference_value is None and result.max_abs_diff is None and result.top1_agreement is None
    assert result.file_size == path.stat().st_size


def test_validate_rejects_data_that_does_not_fit(cifar_500):
    with pytest.raises(OnnxlrfError, match="expected float32\\[N,3,16,16\\]"):
        validate(classifier_model(size=16), cifar_500)


def test_validate_sentence_encoder(stsb_csv):
    model = sentence_encoder_model()
    dataset = load_data(f"stsb:{stsb_csv}", model).subset(range(200))
    result = validate(perturbed(model, scale=0.01), dataset, reference=model, batch_size=64)
    assert result.metric == "spearman" and result.samples == 200
    assert -1 <= result.value <= 1 and result.value == pytest.approx(result.reference_value, abs=0.05)
    assert result.top1_agreement is None and 0.99 < result.cosine < 1
    low, high = result.change_interval
    assert low <= result.value - result.reference_value <= high


def test_file_size_counts_external_data(tmp_path):
    model = sentence_encoder_model()
    path = save_onnx(model, tmp_path / "big.onnx", external_data=True)
    data_file = tmp_path / "big.onnx.data"
    assert data_file.is_file()
    assert file_size(path) == path.stat().st_size + data_file.stat().st_size
    assert file_size(path) > 4 * 30522 * 8


def test_count_params_counts_float_initializers_and_constants():
    model = sentence_encoder_model(hidden=8)
    assert count_params(model) == 30522 * 8 + 8 * 8  # int64 axes initializers are not parameters
    constant = onnx.helper.make_node(
        "Constant", [], ["c"], value=numpy_helper.from_array(np.zeros((2, 3), np.float32))
    )
    model.graph.node.insert(0, constant)
    assert count_params(model) == 30522 * 8 + 8 * 8 + 6


def test_count_flops_hand_computed():
    # Conv: out 2x4x32x32, 3*3*3 MACs each; Gemm: 2x10 outputs, 4 MACs each.
    expected = 2 * (2 * 4 * 32 * 32 * 27 + 2 * 10 * 4)
    assert count_flops(classifier_model(), {"input": [2, 3, 32, 32]}) == expected
    assert count_flops(classifier_model(batch=2)) == expected
    assert count_flops(classifier_model()) == expected // 2  # symbolic batch -> 1


def test_count_flops_matmul_uses_sequence_length():
    model = sentence_encoder_model(hidden=8)
    assert count_flops(model, {"input_ids": [3, 10], "attention_mask": [3, 10]}) == 2 * 3 * 10 * 8 * 8
    assert count_flops(model) == 2 * 1 * 128 * 8 * 8


def test_random_feeds_for_token_inputs():
    feeds = random_feeds(sentence_encoder_model(), batch=2)
    assert feeds["input_ids"].shape == feeds["attention_mask"].shape == (2, 128)
    assert feeds["input_ids"].dtype == np.int64 and 0 <= feeds["input_ids"].min() and feeds["input_ids"].max() < 1000
    assert (feeds["attention_mask"] == 1).all()


def test_benchmark_reports_consistent_figures():
    model = classifier_model()
    result = benchmark(perturbed(model), model, batch=2, warmup=1, runs=5, provider="cpu")
    assert isinstance(result, BenchResult)
    assert result.latency_ms > 0 and result.reference_latency_ms > 0
    assert result.speedup == pytest.approx(result.reference_latency_ms / result.latency_ms)
    assert result.flops == result.reference_flops == count_flops(model, {"input": [2, 3, 32, 32]})
    assert result.batch == 2 and result.runs == 5 and result.providers == ["CPUExecutionProvider"]


def test_benchmark_with_given_feeds_and_bad_feeds():
    model = sentence_encoder_model()
    feeds = {"input_ids": np.ones((1, 5), np.int64), "attention_mask": np.ones((1, 5), np.int64)}
    result = benchmark(model, model, warmup=0, runs=2, feeds=feeds)
    assert result.flops == 2 * 5 * 8 * 8 and result.batch == 1
    with pytest.raises(OnnxlrfError, match="feeds lack input.s. attention_mask of the model"):
        benchmark(model, model, runs=1, feeds={"input_ids": feeds["input_ids"]})


# Reference figures of /work/shared/README.md (CPU, fp32), reproduced through export + validate.
REFERENCE_TOLERANCE = 0.0005
RESNET20_FLOPS = 2 * 40_551_040  # conv1 442,368 + 3 stages of 14,155,776 / 12,976,128 / 12,976,128 + fc 640 MACs


def _exported(name: str, weights, directory) -> str:
    from onnxlrf.models import load_model

    from onnxlrf.export import export_model

    return str(export_model(load_model(name, weights=weights), directory / f"{name}.onnx", dynamic_batch=True).path)


def test_resnet20_reference_top1_and_flops(resnet20_weights, cifar_npz, tmp_path):
    path = _exported("cifar10-resnet20", resnet20_weights, tmp_path)
    model = onnx.load(path)
    assert count_flops(model) == RESNET20_FLOPS
    result = validate(path, load_data(f"cifar10-jpeg:{cifar_npz}", model), batch_size=256)
    assert result.samples == 10_000
    assert result.value == pytest.approx(0.8103, abs=REFERENCE_TOLERANCE)
    bench = benchmark(path, path, batch=2, warmup=1, runs=3)
    assert bench.flops == bench.reference_flops == 2 * RESNET20_FLOPS


@pytest.mark.slow
def test_resnet56_reference_top1(resnet56_weights, cifar_npz, tmp_path):
    path = _exported("cifar10-resnet56", resnet56_weights, tmp_path)
    result = validate(path, load_data(f"cifar10-jpeg:{cifar_npz}", onnx.load(path)), batch_size=256)
    assert result.value == pytest.approx(0.8320, abs=REFERENCE_TOLERANCE)


@pytest.mark.slow
def test_minilm_reference_spearman(stsb_csv, tmp_path):
    path = _exported("minilm", None, tmp_path)
    dataset = load_data(f"stsb:{stsb_csv}", onnx.load(path))
    assert len(dataset) == 1379
    result = validate(path, dataset, batch_size=128)
    assert result.value == pytest.approx(0.8205, abs=REFERENCE_TOLERANCE)
