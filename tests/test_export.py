"""export: both exporters, static and dynamic batch, checked in onnxruntime; atomic and safe outputs."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnxlrf.models import ModelSpec, load_model

from onnxlrf.errors import OnnxlrfError
from onnxlrf.export import compare_detections, export_model, resize_batch
from onnxlrf.onnx_io import load_onnx


def _session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _dims(value: onnx.ValueInfoProto) -> list:
    return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]


def _metadata(model: onnx.ModelProto) -> dict[str, str]:
    return {p.key: p.value for p in model.metadata_props if p.key.startswith("onnxlrf.")}


@pytest.fixture(scope="module")
def resnet20(resnet20_weights: Path) -> ModelSpec:
    return load_model("cifar10-resnet20", weights=str(resnet20_weights))


@pytest.mark.parametrize(
    "dynamo, dynamic_batch",
    [(False, False), (False, True), (True, True), pytest.param(True, False, marks=pytest.mark.slow)],
    ids=["torchscript-static", "torchscript-dynamic", "dynamo-dynamic", "dynamo-static"],
)
def test_resnet20_export(resnet20: ModelSpec, tmp_path: Path, dynamo: bool, dynamic_batch: bool) -> None:
    out = tmp_path / "r20.onnx"
    result = export_model(resnet20, out, dynamo=dynamo, batch=2, dynamic_batch=dynamic_batch)
    assert result.path == out
    assert (result.exporter, result.opset) == (("dynamo", 18) if dynamo else ("torchscript", 17))
    assert result.providers == ["CPUExecutionProvider"]
    assert 0 <= result.max_abs_diff <= result.tolerance < 1e-2
    assert result.external_data == dynamo
    # Nothing but the model (and its data file) is left in the directory.
    assert sorted(os.listdir(tmp_path)) == (["r20.onnx", "r20.onnx.data"] if dynamo else ["r20.onnx"])

    model = load_onnx(out)
    onnx.checker.check_model(model)
    assert {o.domain: o.version for o in model.opset_import}[""] == result.opset
    assert _metadata(model) == {"onnxlrf.model": "cifar10-resnet20", "onnxlrf.task": "classification"}
    assert [i.name for i in model.graph.input] == ["input"]
    assert [o.name for o in model.graph.output] == ["logits"]
    batch_dim = "batch" if dynamic_batch else 2
    assert _dims(model.graph.input[0]) == [batch_dim, 3, 32, 32]
    assert _dims(model.graph.output[0]) == [batch_dim, 10]

    batch = 3 if dynamic_batch else 2
    x = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    got = _session(out).run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        expected = resnet20.module(x).numpy()
    np.testing.assert_allclose(got, expected, atol=result.tolerance, rtol=0)


@pytest.fixture(scope="module")
def minilm() -> ModelSpec:
    return load_model("minilm")


def _minilm_export(minilm: ModelSpec, tmp_path: Path, dynamo: bool, dynamic_batch: bool) -> None:
    out = tmp_path / "minilm.onnx"
    result = export_model(minilm, out, dynamo=dynamo, dynamic_batch=dynamic_batch)
    assert result.max_abs_diff <= result.tolerance
    assert result.external_data == dynamo
    model = load_onnx(out)
    assert _metadata(model) == {
        "onnxlrf.model": "minilm", "onnxlrf.task": "sentence-similarity", "onnxlrf.tokenizer": "minilm"
    }
    assert [i.name for i in model.graph.input] == ["input_ids", "attention_mask"]
    assert all(i.type.tensor_type.elem_type == onnx.TensorProto.INT64 for i in model.graph.input)
    # The sequence axis is dynamic even with a static batch.
    batch_dim = "batch" if dynamic_batch else 1
    assert [_dims(i) for i in model.graph.input] == [[batch_dim, "sequence"]] * 2
    assert _dims(model.graph.output[0]) == [batch_dim, 384]
    # Eager attention: the mask is added to the scores, with no NaN clean-up after the softmax.
    assert "IsNaN" not in {node.op_type for node in model.graph.node}

    # Another sequence length than the example's, and, with a dynamic batch, 3 rows with padding.
    ids = torch.randint(1000, 2000, (3 if dynamic_batch else 1, 5), generator=torch.Generator().manual_seed(0))
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 0, 0, 0]])[: ids.shape[0]]
    got = _session(out).run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0]
    with torch.no_grad():
        expected = minilm.module(ids, mask).numpy()
    np.testing.assert_allclose(got, expected, atol=result.tolerance, rtol=0)


def test_minilm_export_torchscript_dynamic_batch(minilm: ModelSpec, tmp_path: Path) -> None:
    _minilm_export(minilm, tmp_path, dynamo=False, dynamic_batch=True)


@pytest.mark.slow
def test_minilm_export_dynamo_static_batch(minilm: ModelSpec, tmp_path: Path) -> None:
    _minilm_export(minilm, tmp_path, dynamo=True, dynamic_batch=False)


def test_resize_batch_cycles_rows() -> None:
    t = torch.arange(6).view(2, 3)
    assert resize_batch(t, 1).tolist() == [[0, 1, 2]]
    assert resize_batch(t, 3).tolist() == [[0, 1, 2], [3, 4, 5], [0, 1, 2]]


def test_existing_output_refused_without_overwrite(resnet20: ModelSpec, tmp_path: Path) -> None:
    out = tmp_path / "r20.onnx"
    out.write_bytes(b"keep me")
    with pytest.raises(OnnxlrfError, match="output exists"):
        export_model(resnet20, out)
    assert out.read_bytes() == b"keep me"
    export_model(resnet20, out, overwrite=True)
    assert load_onnx(out).graph.node


def test_dynamo_refuses_existing_data_file(resnet20: ModelSpec, tmp_path: Path) -> None:
    (tmp_path / "r20.onnx.data").write_bytes(b"someone's data")
    with pytest.raises(OnnxlrfError, match=r"output exists: .*r20\.onnx\.data"):
        export_model(resnet20, tmp_path / "r20.onnx", dynamo=True)


class _Broken(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("cannot trace this\nsecond line")


class _Drifting(torch.nn.Module):
    """Adds a Python number that changes on every call: the traced graph freezes one value."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return x + float(self.calls)


def _spec(module: torch.nn.Module) -> ModelSpec:
    return ModelSpec(
        name="toy", module=module.eval(), example_inputs={"input": torch.ones(1, 4)}, output_names=["logits"],
        dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, task="classification",
        metadata={"onnxlrf.model": "toy", "onnxlrf.task": "classification"},
    )


def test_failed_export_leaves_nothing(tmp_path: Path) -> None:
    with pytest.raises(OnnxlrfError, match=r"^torchscript export of toy failed: RuntimeError: cannot trace this$"):
        export_model(_spec(_Broken()), tmp_path / "out.onnx")
    assert os.listdir(tmp_path) == []


def test_failed_check_leaves_nothing(tmp_path: Path) -> None:
    with pytest.raises(OnnxlrfError, match=r"differs from torch: max abs diff .* > tolerance"):
        export_model(_spec(_Drifting()), tmp_path / "out.onnx")
    assert os.listdir(tmp_path) == []
    result = export_model(_spec(_Drifting()), tmp_path / "out.onnx", check=False)
    assert np.isnan(result.max_abs_diff) and result.providers == []


def test_bad_batch_and_missing_directory(resnet20: ModelSpec, tmp_path: Path) -> None:
    with pytest.raises(OnnxlrfError, match="batch must be at least 1"):
        export_model(resnet20, tmp_path / "x.onnx", batch=0)
    with pytest.raises(OnnxlrfError, match="output directory does not exist"):
        export_model(resnet20, tmp_path / "missing" / "x.onnx")


def test_detections_compare_as_a_set() -> None:
    rng = np.random.default_rng(0)
    boxes = rng.uniform(0, 300, (6, 4)).astype(np.float32)
    scores = np.array([0.5, 0.5, 0.5, 0.4, 0.3, 0.3], np.float32)  # ties: their order is up to rounding
    labels = np.array([1, 2, 1, 3, 3, 1], np.int64)
    order = np.array([2, 0, 1, 3, 5, 4])
    moved = boxes[order] + np.float32(0.001)
    assert compare_detections(boxes, scores, labels, moved, scores[order], labels[order], "m") == pytest.approx(
        0.001, abs=1e-4)
    relabelled = labels[order].copy()
    relabelled[0] = 7  # no box of label 7 on torch's side
    assert compare_detections(boxes, scores, labels, boxes[order], scores[order], relabelled, "m") == np.inf
    with pytest.raises(OnnxlrfError, match="^export of m keeps 5 detections, torch keeps 6$"):
        compare_detections(boxes, scores, labels, boxes[:5], scores[:5], labels[:5], "m")


class _SelfAttention(torch.nn.Module):
    """A ViT block's attention: in eval mode without gradients nn.MultiheadAttention takes its fused fast path."""

    def __init__(self) -> None:
        super().__init__()
        self.attention = torch.nn.MultiheadAttention(8, 2, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attention(x, x, x, need_weights=False)[0]


def test_multi_head_attention_fast_path_exports(tmp_path: Path) -> None:
    torch.manual_seed(0)
    spec = ModelSpec(name="attention", module=_SelfAttention().eval(), example_inputs={"input": torch.randn(2, 5, 8)},
                     output_names=["out"], dynamic_axes={"input": {0: "batch"}, "out": {0: "batch"}},
                     task="classification")
    result = export_model(spec, tmp_path / "attention.onnx")
    assert result.max_abs_diff <= result.tolerance
    assert torch.backends.mha.get_fastpath_enabled()  # restored after the export


def test_torchvision_random_weights_have_no_zero_layers() -> None:
    """torchvision zero-initializes a ViT's head; random weights give it values, so the output is not constant."""
    from onnxlrf.models.vision import initialize_zero_weights

    module = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    torch.nn.init.zeros_(module[1].weight)
    before = module[0].weight.detach().clone()
    initialize_zero_weights(module)
    assert module[1].weight.detach().any() and torch.equal(module[0].weight.detach(), before)
