"""inspect: layers, ranks, FLOPs and skipped nodes, on graphs built here, the int8 ShuffleNet and ResNet-20."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from onnxlrf.cli import cli
from onnxlrf.errors import OnnxlrfError
from onnxlrf.graph.layers import count_params
from onnxlrf.inspection import format_inspection, inspect_model
from onnxlrf.measure import torch_graph
from onnxlrf.runtime.shapes import count_flops

RNG = np.random.default_rng(0)


def make_model(nodes, inputs, outputs, initializers, opset=17):
    """``inputs``/``outputs``: {name: shape} (float); ``initializers``: {name: array}."""
    graph = helper.make_graph(
        nodes, "inspect-test",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs.items()],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in outputs.items()],
        [numpy_helper.from_array(v, k) for k, v in initializers.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="tests")
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def weights(*shape):
    return RNG.standard_normal(shape).astype(np.float32)


def cnn_and_mlp():
    """conv 6->8 3x3 (pads 1), grouped conv 8->8 g2 1x1, depthwise 3x3, pool, Gemm 8->20, MatMul 20->5 N-D,
    and a MatMul of two activations."""
    inits = {"c1.w": weights(8, 6, 3, 3), "c1.b": weights(8), "g.w": weights(8, 4, 1, 1),
             "dw.w": weights(8, 1, 3, 3), "fc.w": weights(20, 8), "fc.b": weights(20), "mm.w": weights(20, 5),
             "shape": np.array([1, 8], dtype=np.int64)}
    nodes = [
        helper.make_node("Conv", ["x", "c1.w", "c1.b"], ["c1"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["c1", "g.w"], ["g"], name="grouped", group=2),
        helper.make_node("Conv", ["g", "dw.w"], ["dw"], name="depthwise", group=8, pads=[1, 1, 1, 1]),
        helper.make_node("GlobalAveragePool", ["dw"], ["p"], name="pool"),
        helper.make_node("Reshape", ["p", "shape"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "fc.w", "fc.b"], ["h"], name="fc", transB=1),
        helper.make_node("MatMul", ["t", "mm.w"], ["tokens"], name="mm"),
        helper.make_node("MatMul", ["t", "tt"], ["scores"], name="attention"),
    ]
    inits = {k: v if v.dtype == np.int64 else v.astype(np.float32) for k, v in inits.items()}
    return make_model(nodes, {"x": [1, 6, 9, 11], "t": ["batch", 7, 20], "tt": ["batch", 20, 7]},
                      {"h": [1, 20], "tokens": ["batch", 7, 5], "scores": ["batch", 7, 7]}, inits)


def test_layers_ranks_flops_and_skipped_nodes():
    model = cnn_and_mlp()
    result = inspect_model(model)
    layers = {layer.node: layer for layer in result.layers}
    assert list(layers) == ["conv", "grouped", "fc", "mm"]

    conv = layers["conv"]
    assert (conv.op_type, conv.weight, conv.weight_shape, conv.groups, conv.params) == ("Conv", "c1.w", [8, 6, 3, 3],
                                                                                          1, 432)
    assert conv.flops == 2 * (8 * 9 * 11) * (6 * 3 * 3)
    channel, spatial = conv.decompositions
    # Break-even: the largest r with r * (m + n) < m * n (per group), capped by the max rank.
    assert (channel.name, channel.matrices, channel.max_rank, channel.break_even_rank) == ("channel", [1, 8, 54], 8, 6)
    assert (spatial.name, spatial.matrices, spatial.max_rank, spatial.break_even_rank) == ("spatial", [1, 18, 24], 18,
                                                                                           10)
    grouped = layers["grouped"]
    assert [(d.name, d.matrices, d.max_rank, d.break_even_rank) for d in grouped.decompositions] == [
        ("channel", [2, 4, 4], 4, 1)]
    assert grouped.flops == 2 * (8 * 9 * 11) * 4
    assert layers["fc"].flops == 2 * 20 * 8 and layers["fc"].decompositions[0].matrices == [1, 20, 8]
    # Dynamic batch: FLOPs at batch 1, and the notes say so.
    assert layers["mm"].flops == 2 * 7 * 5 * 20 and layers["mm"].decompositions[0].break_even_rank == 3
    assert result.flops_input_shapes == {"x": [1, 6, 9, 11], "t": [1, 7, 20], "tt": [1, 20, 7]}
    assert any("'t'" in note and "batch (axis 0) = 1" in note for note in result.notes)

    skipped = {s.node: s for s in result.skipped}
    assert "depthwise" in skipped["depthwise"].reason and skipped["depthwise"].flops == 2 * (8 * 9 * 11) * 9
    assert skipped["attention"].reason == "weight is not a constant"
    assert skipped["attention"].flops == 2 * 7 * 7 * 20

    assert result.params == count_params(model) == 432 + 8 + 32 + 72 + 160 + 20 + 100
    assert result.factorizable_params == 432 + 32 + 160 + 100
    assert result.flops == count_flops(model) == sum(layer.flops for layer in result.layers) + sum(
        s.flops for s in result.skipped)
    assert result.factorizable_flops == sum(layer.flops for layer in result.layers)
    assert result.nonfinite_weights == [] and result.opset == 17 and result.producer == "tests"
    assert json.loads(json.dumps(result.to_dict()))["layers"][0]["decompositions"][1]["name"] == "spatial"


def test_conv_kinds_reasons_and_conv_transpose_flops():
    """Each conv kind: factorized (grouped, 1-D, 3-D, ConvTranspose; the last two not analyzed by the joint
    analysis) or dense (depthwise), with the reason in the table."""
    inits = {"g.w": weights(8, 4, 3), "dw.w": weights(8, 1, 3), "c3.w": weights(6, 8, 1, 1, 3),
             "t.w": weights(8, 6, 4), "tdw.w": weights(8, 2, 4)}
    nodes = [
        helper.make_node("Conv", ["x", "g.w"], ["g"], name="grouped1d", group=2, pads=[1, 1]),
        helper.make_node("Conv", ["g", "dw.w"], ["dw"], name="depthwise1d", group=8, pads=[1, 1]),
        helper.make_node("ConvTranspose", ["dw", "t.w"], ["t"], name="convt", strides=[2], pads=[1, 1]),
        helper.make_node("ConvTranspose", ["dw", "tdw.w"], ["tdw"], name="convt_dw", group=8, strides=[2]),
        helper.make_node("Conv", ["v", "c3.w"], ["c3"], name="conv3d"),
    ]
    model = make_model(nodes, {"x": [1, 8, 10], "v": [1, 8, 2, 3, 5]},
                       {"t": [1, 6, 20], "tdw": [1, 16, 22], "c3": [1, 6, 2, 3, 3]}, inits)
    result = inspect_model(model)
    layers = {layer.node: layer for layer in result.layers}
    assert list(layers) == ["grouped1d", "convt", "conv3d"]
    assert [layers[n].not_analyzed is None for n in layers] == [True, False, False]
    assert layers["convt"].decompositions[0].matrices == [1, 8, 24]  # input channels x (output channels x kernel)
    assert layers["convt"].flops == 2 * (8 * 10) * (6 * 4)  # each input element spread over Cout/g x kernel
    skipped = {s.node: s.reason for s in result.skipped}
    assert skipped.keys() == {"depthwise1d", "convt_dw"}
    assert "8 groups is a 1x3 matrix, of rank 1" in skipped["depthwise1d"]
    assert "8 groups is a 1x8 matrix, of rank 1" in skipped["convt_dw"]
    assert result.flops == count_flops(model) == sum(layer.flops for layer in result.layers) + sum(
        s.flops for s in result.skipped)
    text = format_inspection(result)
    assert "not analyzed: the joint analysis has no input statistics for a ConvTranspose" in text
    assert "not analyzed: the joint analysis unfolds the inputs of 1-D and 2-D convs, not 3-D" in text
    assert "depthwise ConvTranspose (one input channel per group): stays dense" in text


def test_input_shapes_override_and_errors():
    model = cnn_and_mlp()
    result = inspect_model(model, {"t": [4, 7, 20], "tt": [4, 20, 7]})
    assert next(layer for layer in result.layers if layer.node == "mm").flops == 4 * 2 * 7 * 5 * 20
    assert not any("dynamic" in note for note in result.notes)
    with pytest.raises(OnnxlrfError, match="no input 'nope'"):
        inspect_model(model, {"nope": [1]})
    with pytest.raises(OnnxlrfError, match=r"shape \[4, 8, 20\] does not fit input 't' \[batch,7,20\]"):
        inspect_model(model, {"t": [4, 8, 20]})


def test_shared_weight_nonfinite_weight_and_quantized_node():
    w = weights(16, 16)
    w[2, 3] = np.nan
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["h"], name="mm1"),
        helper.make_node("Transpose", ["h"], ["ht"], name="transpose"),
        helper.make_node("Gemm", ["ht", "W"], ["y"], name="gemm", transB=1),  # reads W transposed
        helper.make_node("MatMulInteger", ["q", "qw"], ["qy"], name="int_mm"),
    ]
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [16, 16]),
         helper.make_tensor_value_info("q", TensorProto.UINT8, [4, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [16, 16]),
         helper.make_tensor_value_info("qy", TensorProto.INT32, [4, 8])],
        [numpy_helper.from_array(w, "W"), numpy_helper.from_array(np.ones((16, 8), np.uint8), "qw")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    result = inspect_model(model)
    assert [layer.node for layer in result.layers] == ["mm1", "gemm"]
    assert all(layer.dense_reason == "weight shared by nodes that read it differently" for layer in result.layers)
    assert result.factorizable_params == 256  # the shared weight once
    assert result.nonfinite_weights == ["W"]
    (quantized,) = result.skipped
    assert (quantized.node, quantized.op_type, quantized.reason) == ("int_mm", "MatMulInteger",
                                                                    "quantized op: not factorizable")
    assert any("1 quantized nodes" in note and "128 8-bit weight elements" in note for note in result.notes)
    text = format_inspection(result)
    assert "stays dense: weight shared" in text and "weights with NaN or Inf (1): W" in text
    assert "int_mm  MatMulInteger" in text


def invoke(*args: object):
    return CliRunner().invoke(cli, [str(a) for a in args])


def test_shufflenet_int8_reports_quantized_nodes(shufflenet_int8: Path):
    text = invoke("inspect", shufflenet_int8)
    assert text.exit_code == 0, text.output
    assert "factorizable layers: none" in text.stdout and "QLinearConv" in text.stdout
    result = invoke("inspect", shufflenet_int8, "--json")
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["layers"] == [] and payload["factorizable_params"] == 0
    ops = {s["op_type"] for s in payload["skipped"]}
    assert ops == {"QLinearConv", "QLinearMatMul"} and len(payload["skipped"]) == 57
    assert all(s["reason"] == "quantized op: not factorizable" for s in payload["skipped"])
    assert payload["inputs"] == {"input": [1, 3, 224, 224]} and payload["nonfinite_weights"] == []


@pytest.fixture(scope="module")
def resnet20(tmp_path_factory: pytest.TempPathFactory, resnet20_weights: Path) -> Path:
    from onnxlrf.models import load_model

    from onnxlrf.export import export_model

    path = tmp_path_factory.mktemp("inspect") / "r20.onnx"
    export_model(load_model("cifar10-resnet20", weights=str(resnet20_weights)), path, dynamic_batch=True)
    return path


def test_resnet20(resnet20: Path):
    result = invoke("inspect", resnet20, "--json", "--input-shape", "input=2,3,32,32")
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    model = onnx.load(str(resnet20))
    assert len(payload["layers"]) == 20 and payload["skipped"] == []  # 19 convs and the classifier
    assert payload["params"] == count_params(model) == 269_034
    assert payload["factorizable_params"] == sum(layer["params"] for layer in payload["layers"])
    assert payload["flops"] == payload["factorizable_flops"] == count_flops(model, {"input": [2, 3, 32, 32]})
    first = payload["layers"][0]
    assert first["weight_shape"] == [16, 3, 3, 3] and first["flops"] == 2 * 2 * (16 * 32 * 32) * 27
    assert [d["name"] for d in first["decompositions"]] == ["channel", "spatial"]
    assert payload["layers"][-1]["op_type"] == "Gemm"
    text = invoke("inspect", resnet20)
    assert text.exit_code == 0 and "/layer3/layer3.2/conv2/Conv" in text.stdout
    assert "batch (axis 0) = 1" in text.stdout and "params: 269,034" in text.stdout


@pytest.mark.parametrize("argv, message", [
    (["inspect", "{dir}/missing.onnx"], "file not found"),
    (["inspect", "{dir}/junk.onnx"], "not a valid ONNX file"),
    (["inspect", "{model}", "--input-shape", "y=1"], "no input 'y'"),
])
def test_cli_errors_are_one_line(tmp_path: Path, argv: list[str], message: str):
    (tmp_path / "junk.onnx").write_bytes(b"not onnx at all")
    model = tmp_path / "m.onnx"
    onnx.save(cnn_and_mlp(), str(model))
    result = invoke(*[a.replace("{dir}", str(tmp_path)).replace("{model}", str(model)) for a in argv])
    assert result.exit_code == 1 and result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and message in lines[0]


def test_ops_the_torch_analysis_lacks_on_and_off_the_weights_path(monkeypatch):
    """Position ids from a CumSum of the mask (no gradient passes) and a CumSum over a layer's output (one does),
    with CumSum taken out of the torch evaluator."""
    monkeypatch.delitem(torch_graph.OPS, "CumSum")
    nodes = [helper.make_node("CumSum", ["mask", "axis"], ["position_ids"], name="position_cumsum"),
             helper.make_node("Gather", ["positions", "position_ids"], ["position_emb"], name="position_gather"),
             helper.make_node("Add", ["x", "position_emb"], ["emb"], name="embed"),
             helper.make_node("MatMul", ["emb", "w1"], ["h"], name="fc1"),
             helper.make_node("CumSum", ["h", "axis"], ["h_sum"], name="hidden_cumsum"),
             helper.make_node("MatMul", ["h_sum", "w2"], ["y"], name="fc2")]
    graph = helper.make_graph(
        nodes, "lacking", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 5, 8]),
                           helper.make_tensor_value_info("mask", TensorProto.INT64, [2, 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 5, 4])],
        [numpy_helper.from_array(value, name) for name, value in {
            "positions": weights(6, 8), "w1": weights(8, 16), "w2": weights(16, 4),
            "axis": np.array(1, dtype=np.int64)}.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    inspection = inspect_model(model)
    assert [(n.node, n.op_type) for n in inspection.blocking] == [("hidden_cumsum", "CumSum")]
    assert [(n.node, n.op_type) for n in inspection.reference] == [("position_cumsum", "CumSum")]
    text = format_inspection(inspection)
    assert "nodes that block the joint modes (1)" in text and "hidden_cumsum  CumSum" in text
    assert "nodes onnx's reference evaluator runs in the joint modes (1)" in text and "position_cumsum  CumSum" in text
    assert json.loads(json.dumps(inspection.to_dict()))["blocking"] == [
        {"node": "hidden_cumsum", "op_type": "CumSum", "domain": ""}]


def test_two_stage_detector_second_stage_is_listed_as_not_analysed():
    """RoiAlign (which the torch evaluator lacks) lies after the heads the joint modes compare: it blocks
    nothing; the layer on its crops is listed with why the joint analysis leaves it out."""
    from test_heads import detector

    inspection = inspect_model(detector("roialign"))
    reasons = {layer.node: layer.not_analyzed for layer in inspection.layers}
    assert reasons["crop_head"].startswith("second stage of a two-stage detector")
    assert reasons["trunk"] is None and reasons["box_head"] is None
    assert inspection.blocking == [] and inspection.reference == []
    assert any(note.startswith("post-processing (TopK, NonMaxSuppression, RoiAlign): the joint modes analyse")
               for note in inspection.notes)


def test_quantizable_layers_and_why_others_are_not():
    """What --technique quant takes (the depthwise conv too: quantization needs no rank) and what not (a MatMul
    of two activations, with the reason), in the JSON and the text."""
    result = inspect_model(cnn_and_mlp())
    quantizable = {q.node: q for q in result.quantizable}
    assert set(quantizable) == {"conv", "grouped", "depthwise", "fc", "mm"}
    assert quantizable["mm"].channel_axis == 1 and quantizable["mm"].block_scales  # (in, out) MatMul weight
    assert quantizable["conv"].channel_axis == 0 and not quantizable["conv"].block_scales
    assert [(s.node, s.op_type) for s in result.not_quantizable] == [("attention", "MatMul")]
    assert result.not_quantizable[0].reason
    text = format_inspection(result)
    assert "quantizable layers (--technique quant, 5):" in text and "not quantizable (1):" in text
    assert json.loads(json.dumps(result.to_dict()))["quantizable"][0]["node"] == "conv"
