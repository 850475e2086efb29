"""sessions._run_rows on token data: length-sorted batches cut after their last real token, rows back in order."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from test_data import IR_VERSION, masked_mean

from onnxlrf.data import OUTPUTS, SENTENCE_SIMILARITY, Dataset
from onnxlrf.runtime.sessions import make_session, run_dataset, run_float_outputs

VOCAB, HIDDEN, WIDTH = 50, 6, 12


def token_model(batch: int | str = "N", seq: int | str = "S", tokens_out: bool = False,
                reads_padding: bool = False, mask_input: bool = True) -> onnx.ModelProto:
    """Gather -> MatMul -> ``sentence_embedding``, the mean over the masked tokens (over all
    positions with ``reads_padding`` or without ``mask_input``); ``tokens_out`` adds the
    token-level ``last_hidden_state``."""
    reads_padding = reads_padding or not mask_input
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((VOCAB, HIDDEN)).astype(np.float32), "embedding"),
             numpy_helper.from_array(rng.standard_normal((HIDDEN, HIDDEN)).astype(np.float32), "proj.w")]
    nodes = [helper.make_node("Gather", ["embedding", "input_ids"], ["tokens"]),
             helper.make_node("MatMul", ["tokens", "proj.w"], ["last_hidden_state"])]
    if reads_padding:  # the pooling ignores the mask
        nodes.append(helper.make_node("ReduceMean", ["last_hidden_state"], ["sentence_embedding"], axes=[1],
                                      keepdims=0))
    else:
        pooling, axes = masked_mean("last_hidden_state", "sentence_embedding")
        nodes += pooling
        inits += axes
    outputs = [helper.make_tensor_value_info("sentence_embedding", TensorProto.FLOAT, [batch, HIDDEN])]
    if tokens_out:
        outputs.append(helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT, [batch, seq, HIDDEN]))
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [batch, seq])]
    if mask_input:
        inputs.append(helper.make_tensor_value_info("attention_mask", TensorProto.INT64, [batch, seq]))
    if reads_padding and mask_input:  # an input the outputs do not depend on
        nodes.append(helper.make_node("Identity", ["attention_mask"], ["unused_mask"]))
        outputs.append(helper.make_tensor_value_info("unused_mask", TensorProto.INT64, [batch, seq]))
    graph = helper.make_graph(nodes, "tokens", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=IR_VERSION)
    onnx.checker.check_model(model, full_check=True)
    return model


def token_data(rows: int = 37, task: str = OUTPUTS, mask: str | None = "attention_mask", seed: int = 0) -> Dataset:
    """Random token rows of 1 to WIDTH - 2 real tokens, right-padded (id 0, mask 0) to WIDTH."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, WIDTH - 1, rows)
    real = np.arange(WIDTH) < lengths[:, None]
    ids = np.where(real, rng.integers(1, VOCAB, (rows, WIDTH)), 0).astype(np.int64)
    inputs = {"input_ids": ids, "attention_mask": real.astype(np.int64)}
    labels = np.zeros((rows, 0), np.float32) if task == OUTPUTS else np.zeros(rows // 2)
    return Dataset("tokens", task, inputs, labels, token_mask=mask)


class Recording:
    """A session that records the sequence length of every batch it runs."""

    def __init__(self, session) -> None:
        self.session, self.widths = session, []

    def get_inputs(self):
        return self.session.get_inputs()

    def get_outputs(self):
        return self.session.get_outputs()

    def run(self, names, feed):
        self.widths.append(feed["input_ids"].shape[1])
        return self.session.run(names, feed)


def expected_embeddings(model: onnx.ModelProto, data: Dataset) -> np.ndarray:
    weights = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
    tokens = weights["embedding"][data.inputs["input_ids"]] @ weights["proj.w"]
    mask = data.inputs["attention_mask"][..., None].astype(np.float32)
    return (tokens * mask).sum(1) / mask.sum(1)


def untrimmed(model: onnx.ModelProto, data: Dataset, batch_size: int) -> list[np.ndarray]:
    """The outputs of rows in order at full width: the data without its token mask."""
    plain = Dataset(data.name, OUTPUTS, data.inputs, np.zeros((data.rows, 0), np.float32))
    return run_float_outputs(make_session(model), plain, batch_size)


@pytest.mark.parametrize("batch_size", [1, 5, 64])
def test_token_batches_cut_sorted_and_back_in_row_order(batch_size):
    model, data = token_model(), token_data()
    session = Recording(make_session(model))
    (embeddings,) = run_float_outputs(session, data, batch_size)
    np.testing.assert_allclose(embeddings, expected_embeddings(model, data), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(embeddings, untrimmed(model, data, batch_size)[0], rtol=1e-6, atol=1e-6)
    lengths = np.sort(data.inputs["attention_mask"].sum(1))
    cuts = [int(lengths[start:start + batch_size].max()) for start in range(0, data.rows, batch_size)]
    # The first batch runs cut and at full width (the check), then every batch cut to its longest row.
    first = [cuts[0], WIDTH] if cuts[0] < WIDTH else [WIDTH]
    assert session.widths == first + cuts[1:]
    assert max(session.widths[2:], default=0) < WIDTH


def test_token_batches_static_batch_runs_each_row_at_its_length():
    data = token_data(rows=9)
    session = Recording(make_session(token_model(batch=1)))
    (embeddings,) = run_float_outputs(session, data)
    np.testing.assert_allclose(embeddings, expected_embeddings(token_model(), data), rtol=1e-5, atol=1e-5)
    lengths = sorted(data.inputs["attention_mask"].sum(1))
    assert session.widths == [lengths[0], WIDTH] + lengths[1:]


def test_token_batches_static_batch_pads_the_last_sorted_batch():
    data = token_data(rows=11)
    session = Recording(make_session(token_model(batch=4)))
    (embeddings,) = run_float_outputs(session, data)
    np.testing.assert_allclose(embeddings, expected_embeddings(token_model(), data), rtol=1e-5, atol=1e-5)
    assert len(session.widths) == 4 and max(session.widths[2:]) < WIDTH


def test_token_level_output_runs_at_full_width():
    model, data = token_model(tokens_out=True), token_data()
    session = Recording(make_session(model))
    outputs = run_float_outputs(session, data, batch_size=8)
    assert session.widths[0] < WIDTH and session.widths[1:] == [WIDTH] * 5  # the check, then all at full width
    for got, want in zip(outputs, untrimmed(model, data, 8)):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    assert outputs[1].shape == (data.rows, WIDTH * HIDDEN)


def test_model_reading_padding_runs_at_full_width():
    model, data = token_model(reads_padding=True), token_data(rows=36, task=SENTENCE_SIMILARITY)
    session = Recording(make_session(model))
    embeddings = run_dataset(session, data, batch_size=8)
    assert session.widths[0] < WIDTH and session.widths[1:] == [WIDTH] * 5
    np.testing.assert_allclose(embeddings, untrimmed(model, data, 8)[0], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("case", ["no mask", "mask not an input", "static sequence", "left padding"])
def test_token_batches_not_cut(case):
    model = token_model(seq=WIDTH if case == "static sequence" else "S", mask_input=case != "mask not an input")
    data = token_data()
    if case == "no mask":
        data.token_mask = None
    if case == "left padding":
        data.inputs = {name: array[:, ::-1].copy() for name, array in data.inputs.items()}
    session = Recording(make_session(model))
    outputs = run_float_outputs(session, data, batch_size=8)
    assert session.widths == [WIDTH] * 5
    for got, want in zip(outputs, untrimmed(model, data, 8)):
        np.testing.assert_array_equal(got, want)
