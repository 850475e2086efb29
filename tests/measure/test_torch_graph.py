"""The ONNX-in-torch evaluator agrees with onnxruntime on real exported graphs, both exporters."""

from __future__ import annotations

import ctypes
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner
from onnxlrf.models import load_model

from onnxlrf.cli import cli
from onnxlrf.errors import OnnxlrfError
from onnxlrf.export import export_model
from onnxlrf.measure import torch_graph
from onnxlrf.measure.sensitivity import analyze, classification_loss, measure_loss
from onnxlrf.measure.torch_graph import TorchGraph, UnsupportedError, heap_reuse, lacking_nodes
from onnxlrf.onnx_io import load_onnx


def _ort(model: onnx.ModelProto, feeds: dict) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)[0]


@pytest.mark.parametrize("dynamo", [False, True])
def test_resnet20_both_exporters(tmp_path, resnet20_weights, dynamo):
    spec = load_model("cifar10-resnet20", weights=str(resnet20_weights))
    path = export_model(spec, tmp_path / "r20.onnx", dynamo=dynamo, dynamic_batch=True).path
    model = load_onnx(path)
    feeds = {"input": np.random.default_rng(0).normal(size=(4, 3, 32, 32)).astype(np.float32)}
    np.testing.assert_allclose(TorchGraph(model)(feeds)[0].detach().numpy(), _ort(model, feeds), rtol=1e-4, atol=1e-4)


def test_minilm_gradients_reach_every_encoder_weight(tmp_path):
    spec = load_model("minilm")
    model = load_onnx(export_model(spec, tmp_path / "minilm.onnx", dynamic_batch=True).path)
    ids = np.array([[101, 7592, 2088, 102, 0], [101, 1037, 2936, 6251, 102]], dtype=np.int64)
    feeds = {"input_ids": ids, "attention_mask": (ids != 0).astype(np.int64)}
    from onnxlrf.graph.layers import find_layers

    layers, _ = find_layers(model)
    graph = TorchGraph(model, weights={layer.weight for layer in layers})
    out = graph(feeds)[0]
    np.testing.assert_allclose(out.detach().numpy(), _ort(model, feeds), rtol=1e-4, atol=1e-5)
    out.square().sum().backward()
    assert len(layers) == 36
    assert all(graph.parameters[layer.weight].grad.abs().sum() > 0 for layer in layers)


def _embedding_model(cumsum_on_weight_path: bool = False) -> onnx.ModelProto:
    """Token plus position embeddings (position ids: CumSum of the mask times the mask, as RoBERTa's),
    two MatMul layers, mean over tokens: logits. ``cumsum_on_weight_path``: a CumSum over the first
    layer's output too, so the gradient to that layer passes through it."""
    rng = np.random.default_rng(0)
    inits = [onnx.numpy_helper.from_array(value, name) for name, value in {
        "tokens": rng.normal(size=(20, 8)).astype(np.float32), "positions": rng.normal(size=(9, 8)).astype(np.float32),
        "w1": rng.normal(size=(8, 16)).astype(np.float32), "w2": rng.normal(size=(16, 4)).astype(np.float32),
        "axis": np.array(1, dtype=np.int64)}.items()]
    make = onnx.helper.make_node
    nodes = [make("Gather", ["tokens", "ids"], ["token_emb"], name="token_gather"),
             make("CumSum", ["mask", "axis"], ["running"], name="position_cumsum"),
             make("Mul", ["running", "mask"], ["position_ids"], name="position_mask"),
             make("Gather", ["positions", "position_ids"], ["position_emb"], name="position_gather"),
             make("Add", ["token_emb", "position_emb"], ["emb"], name="embed"),
             make("MatMul", ["emb", "w1"], ["h"], name="fc1"),
             make("Relu", ["h"], ["r"], name="relu")]
    if cumsum_on_weight_path:
        nodes += [make("CumSum", ["r", "axis"], ["r_sum"], name="hidden_cumsum")]
    nodes += [make("MatMul", ["r_sum" if cumsum_on_weight_path else "r", "w2"], ["y"], name="fc2"),
              make("ReduceMean", ["y"], ["logits"], name="pool", axes=[1], keepdims=0)]
    graph = onnx.helper.make_graph(
        nodes, "embedding", [onnx.helper.make_tensor_value_info(name, onnx.TensorProto.INT64, ["batch", "seq"])
                             for name in ("ids", "mask")],
        [onnx.helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, ["batch", 4])], inits)
    return onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)], ir_version=8)


def _embedding_batches():
    rng = np.random.default_rng(1)
    ids = rng.integers(1, 20, size=(6, 8)).astype(np.int64)
    mask = (np.arange(8) < rng.integers(3, 9, size=(6, 1))).astype(np.int64)
    labels = rng.integers(0, 4, size=6)
    return lambda: iter([({"ids": ids * mask, "mask": mask}, labels)])


def test_position_ids_from_an_op_torch_lacks_run_in_the_reference_evaluator(monkeypatch):
    model, batches = _embedding_model(), _embedding_batches()
    in_torch = analyze(model, batches, classification_loss)
    loss_in_torch = measure_loss(model, batches, classification_loss)
    monkeypatch.delitem(torch_graph.OPS, "CumSum")
    blocking, reference = lacking_nodes(model, ["w1", "w2"])
    assert blocking == [] and [node.name for node in reference] == ["position_cumsum"]
    in_reference = analyze(model, batches, classification_loss)
    assert in_reference.reference_loss == in_torch.reference_loss
    for node, expected in in_torch.layers.items():
        got = in_reference.layers[node]
        for field in ("s", "x", "y", "first_order", "input_moment", "output_fisher"):
            np.testing.assert_array_equal(getattr(got, field), getattr(expected, field))
    assert measure_loss(model, batches, classification_loss) == loss_in_torch
    with pytest.raises(UnsupportedError, match="CumSum"):
        TorchGraph(model, reference_fallback=False)  # the conformance measurement counts the torch path alone


def test_an_op_torch_lacks_on_the_weights_path_is_one_line_naming_node_and_op(monkeypatch):
    model = _embedding_model(cumsum_on_weight_path=True)
    monkeypatch.delitem(torch_graph.OPS, "CumSum")
    with pytest.raises(UnsupportedError) as error:
        TorchGraph(model, weights={"w1", "w2"})
    message = str(error.value)
    assert "\n" not in message
    assert "node 'hidden_cumsum' (CumSum) lies on the path from the analysed weights to the loss" in message
    assert "--mode uniform or energy" in message
    # Only w2 analysed: no gradient to it passes through the CumSum, which runs in the reference evaluator.
    feeds = next(_embedding_batches()())[0]
    TorchGraph(model, weights={"w2"})(feeds)[0].sum().backward()
    # A custom-domain op off the path that the reference evaluator lacks either: named at construction.
    custom = _embedding_model()
    custom.graph.node[1].domain = "com.example"
    custom.opset_import.append(onnx.helper.make_opsetid("com.example", 1))
    with pytest.raises(UnsupportedError, match=r"node 'position_cumsum' \(com.example.CumSum\) lies off"):
        TorchGraph(custom, weights={"w1", "w2"})


def _if_position_model() -> onnx.ModelProto:
    """:func:`_embedding_model` with an If (control flow, not in torch) choosing the position ids;
    its branches read a value of the outer graph."""
    model = _embedding_model()
    make = onnx.helper.make_node
    branch_output = onnx.helper.make_tensor_value_info
    then_branch = onnx.helper.make_graph([make("Identity", ["running"], ["kept"])], "then", [],
                                         [branch_output("kept", onnx.TensorProto.INT64, None)])
    else_branch = onnx.helper.make_graph([make("Sub", ["running", "axis"], ["shifted"])], "else", [],
                                         [branch_output("shifted", onnx.TensorProto.INT64, None)])
    nodes = list(model.graph.node)
    nodes[2] = make("Mul", ["chosen", "mask"], ["position_ids"], name="position_mask")
    nodes[2:2] = [make("ReduceMax", ["mask"], ["any"], name="any_token", keepdims=0),
                  make("Cast", ["any"], ["condition"], name="condition", to=onnx.TensorProto.BOOL),
                  make("If", ["condition"], ["chosen"], name="choose", then_branch=then_branch,
                       else_branch=else_branch)]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    onnx.checker.check_model(model, full_check=True)
    return model


def test_if_off_the_weights_path_reads_outer_values_and_matches_onnxruntime():
    model = _if_position_model()
    graph = TorchGraph(model, weights={"w1", "w2"})
    feeds = next(_embedding_batches()())[0]
    logits = graph(feeds)[0]
    np.testing.assert_allclose(logits.detach().numpy(), _ort(model, feeds), rtol=1e-5, atol=1e-5)
    logits.sum().backward()
    assert graph.parameters["w1"].grad.abs().sum() > 0
    start = graph.first_reader("w1")
    with torch.no_grad():
        np.testing.assert_array_equal(graph.resume(graph.trace(feeds, resume_from=[start]), start)[0].numpy(),
                                      logits.detach().numpy())


def test_compress_lossless_runs_past_an_op_off_the_weights_path_and_stops_at_one_on_it(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    mask = (np.arange(8) < rng.integers(3, 9, size=(600, 1))).astype(np.int64)
    ids = rng.integers(1, 20, size=(600, 8)).astype(np.int64) * mask
    np.savez(tmp_path / "data.npz", ids=ids, mask=mask, labels=rng.integers(0, 4, size=600))
    # The untrained model's loss gradient is its signal, not noise: analysed with its first-order terms.
    args = ["--data", f"npz:{tmp_path / 'data.npz'}", "--mode", "lossless", "--target-reduction", "0.1",
            "--calib", "200", "--val", "200", "--first-order", "--json", "-q"]
    onnx.save(_if_position_model(), tmp_path / "if.onnx")
    result = CliRunner().invoke(cli, ["compress", str(tmp_path / "if.onnx"), *args, "-o", str(tmp_path / "if.out.onnx")])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["params"] < json.loads(result.output)["reference_params"]
    monkeypatch.delitem(torch_graph.OPS, "CumSum")
    onnx.save(_embedding_model(cumsum_on_weight_path=True), tmp_path / "blocked.onnx")
    result = CliRunner().invoke(cli, ["compress", str(tmp_path / "blocked.onnx"), *args,
                                      "-o", str(tmp_path / "blocked.out.onnx")])
    assert result.exit_code != 0
    assert result.output.strip().splitlines() == [
        "Error: node 'hidden_cumsum' (CumSum) lies on the path from the analysed weights to the loss, and the "
        "torch analysis has no CumSum: use --mode uniform or energy (no gradients), or export the model without CumSum"]


def test_negative_step_slice_matches_numpy():
    x = np.arange(24, dtype=np.float32).reshape(4, 6)
    consts = {"starts": [-1], "ends": [-(2**63) + 1], "axes": [1], "steps": [-2]}
    inits = [onnx.numpy_helper.from_array(np.array(v, dtype=np.int64), k) for k, v in consts.items()]
    node = onnx.helper.make_node("Slice", ["x", "starts", "ends", "axes", "steps"], ["y"])
    graph = onnx.helper.make_graph([node], "g", [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [4, 6])],
                                   [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)], inits)
    got = TorchGraph(onnx.helper.make_model(graph))({"x": torch.from_numpy(x)})[0].numpy()
    np.testing.assert_array_equal(got, x[:, ::-2])


def test_trace_keeps_only_what_resuming_needs(tmp_path, resnet20_weights):
    spec = load_model("cifar10-resnet20", weights=str(resnet20_weights))
    model = load_onnx(export_model(spec, tmp_path / "r20.onnx", dynamic_batch=True).path)
    graph = TorchGraph(model)
    feeds = {"input": np.random.default_rng(0).normal(size=(2, 3, 32, 32)).astype(np.float32)}
    convs = [i for i, n in enumerate(graph.nodes) if n.op_type == "Conv"]
    start = convs[len(convs) // 2]
    with torch.no_grad():
        full = graph(feeds)[0]
        traced = graph.trace(feeds, resume_from=[start])
        computed = [k for k in traced if k not in graph.constants]
        # The input to the middle conv and the residual branch it will be added to; the output.
        assert len(computed) <= 3
        np.testing.assert_array_equal(graph.resume(traced, start)[0].numpy(), full.numpy())
        with pytest.raises(OnnxlrfError, match="the trace lacks"):
            graph.resume(traced, convs[1])


def test_conv_with_asymmetric_pads_matches_onnxruntime():
    rng = np.random.default_rng(0)
    weight = onnx.numpy_helper.from_array(rng.normal(size=(4, 3, 3, 3)).astype(np.float32), "w")
    node = onnx.helper.make_node("Conv", ["x", "w"], ["y"], pads=[0, 1, 2, 1], strides=[2, 1])
    graph = onnx.helper.make_graph(
        [node], "g", [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 3, 7, 6])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)], [weight])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)], ir_version=8)
    feeds = {"x": rng.normal(size=(1, 3, 7, 6)).astype(np.float32)}
    np.testing.assert_allclose(TorchGraph(model)(feeds)[0].numpy(), _ort(model, feeds), rtol=1e-5, atol=1e-5)


def test_value_bytes_are_the_largest_activation_and_all_of_them(tmp_path, resnet20_weights):
    spec = load_model("cifar10-resnet20", weights=str(resnet20_weights))
    graph = TorchGraph(load_onnx(export_model(spec, tmp_path / "r20.onnx", dynamic_batch=True).path))
    feeds = {"input": np.zeros((2, 3, 32, 32), dtype=np.float32)}
    largest, total = graph.value_bytes(feeds)
    assert largest == 2 * 16 * 32 * 32 * 4  # the first stage's 16 channels at 32x32
    values = []
    graph(feeds, hook=lambda node, inputs, output: values.append(output.nbytes), hook_nodes={n.name for n in graph.nodes})
    assert total == sum(values) > largest


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def _mmapped_bytes(libc) -> int:
    libc.mallinfo2.restype = _MallInfo2
    return libc.mallinfo2().hblkhd


def test_heap_reuse_serves_large_tensors_from_the_heap_and_restores_mmap():
    libc = torch_graph._glibc()
    if libc is None or not hasattr(libc, "mallinfo2"):
        pytest.skip("glibc with mallinfo2 only")
    size = 64 << 20  # over glibc's largest mmap threshold (32 MiB)
    with heap_reuse():
        with heap_reuse():  # nested: the outer one restores
            before = _mmapped_bytes(libc)
            inside = torch.empty(size, dtype=torch.uint8)
            assert _mmapped_bytes(libc) - before < size
            del inside
        assert torch_graph._heap_reuse_depth == 1
    assert torch_graph._heap_reuse_depth == 0
    # Larger than any free block the test process's heap can hold, so only an mmap serves it
    # (pages untouched: nothing is committed).
    huge = 4 << 30
    before = _mmapped_bytes(libc)
    outside = torch.empty(huge, dtype=torch.uint8)
    assert _mmapped_bytes(libc) - before >= huge
    del outside
    with pytest.raises(RuntimeError), heap_reuse():
        raise RuntimeError("fails inside")
    assert torch_graph._heap_reuse_depth == 0
