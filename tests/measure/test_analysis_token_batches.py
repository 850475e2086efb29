"""The analysis' micro-batches of token data: length-sorted, cut after their last real token, the same statistics."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from test_data import IR_VERSION, masked_mean

from onnxlrf.data import SENTENCE_SIMILARITY, Dataset, token_inputs_cuttable
from onnxlrf.measure.analysis import CalibrationBatches, calibration_batches, token_cut_lengths
from onnxlrf.measure.sensitivity import analyze, measure_ranges, similarity_loss

VOCAB, HIDDEN, WIDTH = 40, 12, 10


def encoder(seq: int | str = "S", pooling: str = "masked", tokens_out: bool = False) -> onnx.ModelProto:
    """Embedding -> MatMul -> Relu -> MatMul -> mean over the attention mask (``pooling`` ``all``: over every
    position, padding included); ``tokens_out`` adds the token-level output."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)
             for name, shape in (("embedding", (VOCAB, HIDDEN)), ("w1", (HIDDEN, HIDDEN)), ("w2", (HIDDEN, HIDDEN)))]
    nodes = [helper.make_node("Gather", ["embedding", "input_ids"], ["tokens"], name="embed"),
             helper.make_node("MatMul", ["tokens", "w1"], ["h1"], name="fc1"),
             helper.make_node("Relu", ["h1"], ["r1"], name="relu1"),
             helper.make_node("MatMul", ["r1", "w2"], ["h2"], name="fc2")]
    if pooling == "masked":
        mean, axes = masked_mean("h2", "y")
        nodes += mean
        inits += axes
    else:  # reads the padding; the mask is passed through so that the graph still takes it
        nodes += [helper.make_node("ReduceMean", ["h2"], ["y"], axes=[1], keepdims=0, name="mean"),
                  helper.make_node("Identity", ["attention_mask"], ["mask_out"], name="mask_out")]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", HIDDEN])]
    if pooling != "masked":
        outputs.append(helper.make_tensor_value_info("mask_out", TensorProto.INT64, ["N", seq]))
    if tokens_out:
        outputs.append(helper.make_tensor_value_info("h2", TensorProto.FLOAT, ["N", seq, HIDDEN]))
    inputs = [helper.make_tensor_value_info(name, TensorProto.INT64, ["N", seq])
              for name in ("input_ids", "attention_mask")]
    model = helper.make_model(helper.make_graph(nodes, "encoder", inputs, outputs, inits),
                              opset_imports=[helper.make_opsetid("", 17)], ir_version=IR_VERSION)
    onnx.checker.check_model(model, full_check=True)
    return model


def pairs(count: int = 120, padded: bool = True, seed: int = 0) -> Dataset:
    """Sentence pairs of 1 to WIDTH - 2 tokens (all WIDTH where not ``padded``), gold scores 0-5."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, WIDTH - 1, 2 * count) if padded else np.full(2 * count, WIDTH)
    mask = (np.arange(WIDTH) < lengths[:, None]).astype(np.int64)
    ids = np.where(mask == 1, rng.integers(1, VOCAB, (2 * count, WIDTH)), 0).astype(np.int64)
    return Dataset("pairs", SENTENCE_SIMILARITY, {"input_ids": ids, "attention_mask": mask},
                   rng.uniform(0, 5, count).astype(np.float32), token_mask="attention_mask")


def test_batches_run_in_order_of_length_each_cut_after_its_longest_sample():
    data = pairs()
    lengths = token_cut_lengths(encoder(), data)
    assert lengths is not None
    rows = data.token_lengths()
    np.testing.assert_array_equal(lengths, np.maximum(rows[:len(data)], rows[len(data):]))
    # Label-free, each sentence is a sample of its own.
    np.testing.assert_array_equal(token_cut_lengths(encoder(), data.label_free()), rows)
    targets = np.arange(len(data))  # identifies each pair
    seen, widths = [], []
    for feeds, batch_targets in CalibrationBatches(data, targets, 16, lengths)():
        width = feeds["input_ids"].shape[1]
        assert feeds["attention_mask"].shape == (2 * len(batch_targets), width)
        assert width == lengths[batch_targets].max()
        full = data.subset(batch_targets).inputs
        for name, array in feeds.items():  # the pairs' rows, only padding cut
            np.testing.assert_array_equal(array, full[name][:, :width])
            assert not full["attention_mask"][:, width:].any()
        seen += list(batch_targets)
        widths.append(width)
    assert sorted(seen) == list(range(len(data)))
    assert widths == sorted(widths) and widths[0] < widths[-1] < WIDTH
    assert len(CalibrationBatches(data, targets, 16, lengths)) == len(widths)


@pytest.mark.parametrize("model, data", [
    (encoder(tokens_out=True), pairs()),  # a token-level output changes shape when cut
    (encoder(pooling="all"), pairs()),  # the model reads the padding
    (encoder(seq=WIDTH), pairs()),  # a static sequence axis
    (encoder(), pairs(padded=False)),  # nothing to cut
], ids=["token-output", "reads-padding", "static-axis", "no-padding"])
def test_batches_stay_whole_where_cutting_would_change_the_outputs(model, data):
    assert token_cut_lengths(model, data) is None
    feeds, _ = next(iter(calibration_batches(data, data.labels, 16, model)()))
    assert feeds["input_ids"].shape[1] == WIDTH
    unmasked = Dataset(data.name, data.task, data.inputs, data.labels)  # no token mask: nothing to cut by
    assert token_cut_lengths(encoder(), unmasked) is None


def test_the_analysis_and_its_range_checks_are_the_same_on_cut_batches():
    """The same sums in another order. (First-order terms, off by default, are not compared: their replication
    factor compares two halves made of alternate micro-batches, which sorting composes differently.)"""
    model, data = encoder(), pairs()
    results = []
    for reference in (None, model):
        sensitivity = analyze(model, calibration_batches(data, data.labels, 25, reference), similarity_loss,
                              token_mask="attention_mask", first_order=False)
        measure_ranges(model, sensitivity, calibration_batches(data, data.labels, 40, reference), similarity_loss)
        results.append(sensitivity)
    whole, cut = results
    assert cut.reference_loss == pytest.approx(whole.reference_loss, rel=1e-5)
    for node, ls in whole.layers.items():
        other = cut.layers[node]
        np.testing.assert_allclose(other.input_moment, ls.input_moment, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(other.output_fisher, ls.output_fisher, rtol=1e-4, atol=1e-10)
        np.testing.assert_allclose(other.s, ls.s, rtol=1e-4)
        np.testing.assert_allclose(other.gradient, ls.gradient, rtol=1e-4, atol=1e-9)
        measured = [check["measured"] for check in ls.range_checks]
        np.testing.assert_allclose([check["measured"] for check in other.range_checks], measured,
                                   rtol=1e-3, atol=1e-7)


def test_inputs_may_be_cut_only_with_the_mask_among_them_and_a_dynamic_sequence_axis():
    data = pairs()
    assert token_inputs_cuttable(data, {"input_ids": ["N", "S"], "attention_mask": ["N", "S"]})
    assert not token_inputs_cuttable(data, {"input_ids": ["N", "S"]})  # the model would not see the padding
    assert not token_inputs_cuttable(data, {"input_ids": ["N", WIDTH], "attention_mask": ["N", WIDTH]})
    assert not token_inputs_cuttable(data, {"input_ids": ["N", "S"], "attention_mask": ["N", "S"], "other": ["N"]})
