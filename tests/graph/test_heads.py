"""find_post_processing and cut_at_heads on small built detectors; compress through one of them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from onnxlrf.cli import cli
from onnxlrf.errors import OnnxlrfError
from onnxlrf.graph.heads import cut_at_heads, find_post_processing
from onnxlrf.pipeline import post_processing

RNG = np.random.default_rng(0)
ANCHORS = 2 * 2 * 8 * 8  # two levels (the same one twice) of two anchors per position of an 8 x 8 map
CLASSES = 3


def const(name: str, value) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(value), name)


def detector(second_stage: str | None = None) -> onnx.ModelProto:
    """One image (static batch 1) -> a conv trunk -> box and class heads (Conv, Transpose, Reshape, Concat of
    two levels, here the same one twice) -> softmax scores, TopK of the best anchors (k read from a head's
    shape), NMS -> boxes and scores of the kept ones.

    ``second_stage``: ``matmul`` adds a MatMul on the kept boxes (weights after the selection),
    ``roialign`` a RoiAlign crop of the feature map by them and a MatMul on the crops (a second stage).
    """
    def weight(name: str, *shape: int, scale: float) -> onnx.TensorProto:
        return numpy_helper.from_array((RNG.standard_normal(shape) * scale).astype(np.float32), name)

    inits = [weight("trunk.w", 16, 3, 3, 3, scale=0.3), weight("trunk2.w", 16, 16, 3, 3, scale=0.2),
             weight("box.w", 8, 16, 1, 1, scale=0.3), weight("cls.w", 2 * CLASSES, 16, 1, 1, scale=1.0),
             const("box_shape", [1, -1, 4]), const("cls_shape", [1, -1, CLASSES]), const("axis1", [1]),
             const("zero", [0]), const("two", 2), const("max_out", [5]), const("iou", np.float32([0.5])),
             const("score_th", np.float32([0.0]))]
    nodes = [
        helper.make_node("Conv", ["input", "trunk.w"], ["t1"], name="trunk", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["t1"], ["t1r"]),
        helper.make_node("Conv", ["t1r", "trunk2.w"], ["t2"], name="trunk2", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["t2"], ["features"]),
        helper.make_node("Conv", ["features", "box.w"], ["box_map"], name="box_head"),
        helper.make_node("Conv", ["features", "cls.w"], ["cls_map"], name="cls_head"),
        helper.make_node("Transpose", ["box_map"], ["box_t"], perm=[0, 2, 3, 1]),
        helper.make_node("Reshape", ["box_t", "box_shape"], ["box_level"]),
        helper.make_node("Concat", ["box_level", "box_level"], ["box_regression"], axis=1),
        helper.make_node("Transpose", ["cls_map"], ["cls_t"], perm=[0, 2, 3, 1]),
        helper.make_node("Reshape", ["cls_t", "cls_shape"], ["cls_level"]),
        helper.make_node("Concat", ["cls_level", "cls_level"], ["cls_logits"], axis=1),
        helper.make_node("Softmax", ["cls_logits"], ["probabilities"], axis=-1),
        helper.make_node("ReduceMax", ["probabilities"], ["anchor_scores"], axes=[2], keepdims=0),
        helper.make_node("Shape", ["box_map"], ["box_map_shape"]),  # reads the head's shape, not its values
        helper.make_node("Gather", ["box_map_shape", "axis1"], ["k"]),
        helper.make_node("TopK", ["anchor_scores", "k"], ["top_scores", "top_index"], name="topk", axis=1),
        helper.make_node("Squeeze", ["top_index", "zero"], ["top"]),
        helper.make_node("Gather", ["box_regression", "top"], ["top_boxes"], axis=1),
        helper.make_node("Unsqueeze", ["top_scores", "axis1"], ["nms_scores"]),
        helper.make_node("NonMaxSuppression", ["top_boxes", "nms_scores", "max_out", "iou", "score_th"],
                         ["selected"], name="nms"),
        helper.make_node("Gather", ["selected", "two"], ["kept"], axis=1),
        helper.make_node("Gather", ["top_boxes", "kept"], ["kept_boxes"], axis=1),
        helper.make_node("Squeeze", ["kept_boxes", "zero"], ["boxes"]),
        helper.make_node("Gather", ["top_scores", "kept"], ["kept_scores"], axis=1),
        helper.make_node("Squeeze", ["kept_scores", "zero"], ["scores"]),
    ]
    outputs = [helper.make_tensor_value_info("boxes", TensorProto.FLOAT, ["detections", 4]),
               helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["detections"])]
    if second_stage == "matmul":
        inits.append(weight("refine.w", 4, 4, scale=1.0))
        nodes.append(helper.make_node("MatMul", ["boxes", "refine.w"], ["refined"], name="refine"))
        outputs.append(helper.make_tensor_value_info("refined", TensorProto.FLOAT, ["detections", 4]))
    elif second_stage == "roialign":
        inits += [weight("crop_head.w", 64, 4, scale=0.2), const("map_side", np.float32(7.0))]
        nodes += [helper.make_node("Mul", ["kept", "zero"], ["roi_batch"]),
                  helper.make_node("Sigmoid", ["boxes"], ["box_fractions"]),  # boxes within the 8 x 8 map
                  helper.make_node("Mul", ["box_fractions", "map_side"], ["roi_boxes"]),
                  helper.make_node("RoiAlign", ["features", "roi_boxes", "roi_batch"], ["crops"], name="roi_align",
                                   output_height=2, output_width=2),
                  helper.make_node("Flatten", ["crops"], ["crop_rows"]),
                  helper.make_node("MatMul", ["crop_rows", "crop_head.w"], ["crop_scores"], name="crop_head")]
        outputs.append(helper.make_tensor_value_info("crop_scores", TensorProto.FLOAT, ["detections", 4]))
    graph = helper.make_graph(nodes, "detector",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 8, 8])],
                              outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def test_heads_are_the_box_regressions_and_class_logits() -> None:
    post = find_post_processing(detector())
    assert post.selection_ops == ("TopK", "NonMaxSuppression")
    # Followed through Transpose, Reshape and Concat; the Shape of the box map reads no values.
    assert post.heads == ("box_regression", "cls_logits")


def test_cut_at_heads_runs_to_one_row_per_sample() -> None:
    model = detector()
    cut = cut_at_heads(model, find_post_processing(model).heads)
    assert {node.op_type for node in cut.graph.node}.isdisjoint({"TopK", "NonMaxSuppression", "Softmax"})
    assert [value.name for value in cut.graph.output] == ["box_regression", "cls_logits"]
    image = RNG.standard_normal((1, 3, 8, 8)).astype(np.float32)
    boxes, logits = ort.InferenceSession(cut.SerializeToString()).run(None, {"input": image})
    assert boxes.shape == (1, ANCHORS, 4) and logits.shape == (1, ANCHORS, CLASSES)
    full = ort.InferenceSession(model.SerializeToString()).run(None, {"input": image})
    assert full[0].ndim == 2 and full[0].shape[1] == 4  # the detections: no sample axis


def test_heads_keep_the_sample_axis_first() -> None:
    """A Reshape that folds the sample axis into the anchors (Faster R-CNN's proposal heads: (images x
    anchors, 4)) is not followed: the head is the tensor before it."""
    nodes = [helper.make_node("Conv", ["input", "w"], ["map"], name="head"),
             helper.make_node("Transpose", ["map"], ["map_t"], perm=[0, 2, 3, 1]),
             helper.make_node("Reshape", ["map_t", "flat_shape"], ["flat"]),
             helper.make_node("ReduceMax", ["flat"], ["anchor_scores"], axes=[1], keepdims=0),
             helper.make_node("TopK", ["anchor_scores", "k"], ["top", "index"], name="topk")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("top", TensorProto.FLOAT, [5])],
                              [numpy_helper.from_array(np.ones((4, 3, 1, 1), np.float32), "w"),
                               const("flat_shape", [-1, 4]), const("k", [5])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    assert find_post_processing(model).heads == ("map_t",)


def test_model_without_selection_has_no_post_processing() -> None:
    model = detector()
    assert find_post_processing(cut_at_heads(model, ["box_regression", "cls_logits"])) is None


def test_selection_on_the_inputs_alone_is_no_post_processing() -> None:
    """A TopK before any weight layer (on an input) selects no detections."""
    nodes = [helper.make_node("TopK", ["input", "k"], ["top", "index"], axis=1),
             helper.make_node("MatMul", ["top", "w"], ["output"], name="linear")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 8])],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 4])],
                              [const("k", [4]), numpy_helper.from_array(np.ones((4, 4), np.float32), "w")])
    assert find_post_processing(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])) is None


def test_two_stage_detector_compares_the_first_stage() -> None:
    """The heads are the feature map the crops read and the first stage's heads; the layer on the crops
    is the second stage, left out of the cut."""
    model = detector("roialign")
    post = find_post_processing(model)
    assert post.selection_ops == ("TopK", "NonMaxSuppression", "RoiAlign")
    assert post.heads == ("features", "box_regression", "cls_logits")
    assert post.second_stage == ("crop_head",)
    cut = cut_at_heads(model, post.heads)
    assert "crop_head.w" not in {tensor.name for tensor in cut.graph.initializer}
    assert find_post_processing(detector()).second_stage == ()


def test_weight_layers_after_the_selection_make_it_no_post_processing() -> None:
    """A selection that routes the computation (a mixture of experts' TopK) leaves the outputs alone."""
    assert find_post_processing(detector("matmul")) is None


def test_latency_target_refused_with_post_processing() -> None:
    with pytest.raises(OnnxlrfError, match="--target latency cannot be measured on a model with post-processing"):
        post_processing(detector(), "latency")
    assert post_processing(detector(), "params").heads == ("box_regression", "cls_logits")


@pytest.mark.parametrize("mode", [("--mode", "lossless", "--target-reduction", "0.1"),
                                  ("--mode", "compact", "--tolerance", "0.05")], ids=["lossless", "compact"])
def test_compress_keeps_post_processing_and_compares_heads(mode: tuple[str, ...], tmp_path: Path) -> None:
    model_path = tmp_path / "detector.onnx"
    onnx.save(detector(), model_path)
    data = tmp_path / "images.npz"
    np.savez(data, input=RNG.standard_normal((24, 3, 8, 8)).astype(np.float32))
    output = tmp_path / "compressed.onnx"
    result = CliRunner().invoke(cli, ["compress", str(model_path), "--data", f"npz:{data}", *mode, "--calib", "8",
                                      "--val", "8", "-o", str(output), "-q", "--json"])
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["compared"] == ["box_regression", "cls_logits"]
    assert report["metric"] == "fidelity" and 0 < report["value"] <= 1
    written = onnx.load(str(output))
    assert {"TopK", "NonMaxSuppression"} <= {node.op_type for node in written.graph.node}
    assert [value.name for value in written.graph.output] == ["boxes", "scores"]
    ort.InferenceSession(str(output)).run(None, {"input": RNG.standard_normal((1, 3, 8, 8)).astype(np.float32)})


def test_compress_two_stage_detector_keeps_its_second_stage_dense(tmp_path: Path) -> None:
    model_path = tmp_path / "detector.onnx"
    model = detector("roialign")
    onnx.save(model, model_path)
    data = tmp_path / "images.npz"
    np.savez(data, input=RNG.standard_normal((24, 3, 8, 8)).astype(np.float32))
    output = tmp_path / "compressed.onnx"
    result = CliRunner().invoke(cli, ["compress", str(model_path), "--data", f"npz:{data}", "--mode", "lossless",
                                      "--target-reduction", "0.1", "--calib", "8", "--val", "8", "-o", str(output),
                                      "-q", "--json"])
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["compared"] == ["features", "box_regression", "cls_logits"]
    written = onnx.load(str(output))
    weights = {tensor.name: tensor for tensor in written.graph.initializer}
    assert numpy_helper.to_array(weights["crop_head.w"]).tobytes() == \
        numpy_helper.to_array({t.name: t for t in model.graph.initializer}["crop_head.w"]).tobytes()
    assert "crop_head" in {node.name for node in written.graph.node}
    assert [value.name for value in written.graph.output] == ["boxes", "scores", "crop_scores"]
    ort.InferenceSession(str(output)).run(None, {"input": RNG.standard_normal((1, 3, 8, 8)).astype(np.float32)})
