"""Real models nobody here wrote, end to end through the CLI, label-free (issue 24, part 5).

Random weights throughout (nothing is downloaded): torchvision segmentation and detection models
through ``torchvision:<name>``, a Conv -> ConvTranspose -> Conv decoder built here, and a RoBERTa
encoder (position ids built with CumSum) saved here as an ``hf:`` directory. Each runs lossless 10%
and compact (``--tolerance 0.02``) on ``npz:`` inputs without labels, so the loss is the distance
to the original's outputs (a detector's: its heads' outputs before post-processing) and the metric
its fidelity to them. Calibration and validation are
small (16 to 24 samples) to keep the run in minutes on 2 cores: the fidelity is reported, not
resolved.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from onnx import numpy_helper
from onnxlrf.models import ModelSpec, load_model

from onnxlrf.cli import cli
from onnxlrf.export import export_model

pytestmark = pytest.mark.slow

LOSSLESS = ("--mode", "lossless", "--target-reduction", "0.1")
COMPACT = ("--mode", "compact", "--tolerance", "0.02")


def compress(model: str | Path, data: Path, mode: tuple[str, ...], output: Path, splits: int):
    result = CliRunner().invoke(cli, ["compress", str(model), "--data", f"npz:{data}", *mode, "--calib",
                                      str(splits), "--val", str(splits), "-o", str(output), "-q", "--json"])
    return result


def check_compressed(result, output: Path, mode: tuple[str, ...]) -> dict:
    """Exit 0, a valid ONNX file, a finite fidelity and cosine to the original; lossless removes 10%."""
    assert result.exit_code == 0, result.stderr
    onnx.checker.check_model(str(output))
    report = json.loads(result.stdout)
    assert report["metric"] == "fidelity" and math.isfinite(report["value"]) and math.isfinite(report["cosine"])
    if mode == LOSSLESS:
        assert report["params_reduction"] >= 0.1
    return report


def images(path: Path, samples: int, channels: int, side: int) -> Path:
    np.savez(path, input=np.random.default_rng(0).standard_normal((samples, channels, side, side)).astype(np.float32))
    return path


@pytest.mark.parametrize("mode", [LOSSLESS, COMPACT], ids=["lossless", "compact"])
@pytest.mark.parametrize("name", ["lraspp_mobilenet_v3_large", "fcn_resnet50"])
def test_torchvision_segmentation(name: str, mode: tuple[str, ...], tmp_path: Path) -> None:
    # Segmentation models export at 224 x 224 (their weights' transforms resize to 520).
    data = images(tmp_path / "images.npz", 40, 3, 224)
    output = tmp_path / "compressed.onnx"
    check_compressed(compress(f"torchvision:{name}", data, mode, output, 16), output, mode)


@pytest.mark.parametrize("mode", [LOSSLESS, COMPACT], ids=["lossless", "compact"])
def test_torchvision_detection(mode: tuple[str, ...], tmp_path: Path) -> None:
    """ssdlite320: its outputs are one image's detections (no row per sample, ties in any order), so
    the loss and the fidelity compare the heads before its post-processing, which the written model keeps."""
    data = images(tmp_path / "images.npz", 40, 3, 320)
    output = tmp_path / "compressed.onnx"
    report = check_compressed(compress("torchvision:ssdlite320_mobilenet_v3_large", data, mode, output, 16),
                              output, mode)
    assert report["compared"] == ["/model/head/regression_head/Concat_12_output_0",
                                  "/model/head/classification_head/Concat_12_output_0"]
    assert {"TopK", "NonZero"} <= {node.op_type for node in onnx.load(str(output)).graph.node}
    assert [value.name for value in onnx.load(str(output)).graph.output] == ["boxes", "scores", "labels"]


@pytest.mark.parametrize("mode", [LOSSLESS, COMPACT], ids=["lossless", "compact"])
def test_torchvision_two_stage_detector(mode: tuple[str, ...], tmp_path: Path) -> None:
    """Faster R-CNN crops its features by the first stage's proposals (RoIAlign): the loss and the fidelity
    compare the first stage's heads (the feature maps the crops read, the proposal heads' outputs), and
    the second stage (the box head on the crops) is written as it was."""
    data = images(tmp_path / "images.npz", 40, 3, 320)
    output = tmp_path / "compressed.onnx"
    name = "torchvision:fasterrcnn_mobilenet_v3_large_320_fpn"
    report = check_compressed(compress(name, data, mode, output, 16), output, mode)
    assert len(report["compared"]) > 2
    written = {t.name: t for t in onnx.load(str(output)).graph.initializer}
    module = load_model(name).module
    for key in ("model.roi_heads.box_head.fc6.weight", "model.roi_heads.box_predictor.cls_score.weight"):
        original = module.state_dict()[key].numpy()
        # Second-stage weights keep their values (Gemm weights may be stored transposed by the exporter).
        assert any(array.shape in (original.shape, original.T.shape) and
                   np.array_equal(array, original if array.shape == original.shape else original.T)
                   for array in (numpy_helper.to_array(t) for t in written.values()
                                 if math.prod(t.dims) == original.size))
    assert "RoiAlign" in {node.op_type for node in onnx.load(str(output)).graph.node}


class Decoder(torch.nn.Module):
    """Conv (stride 2) -> ConvTranspose (stride 2, back to the input's size) -> Conv."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = torch.nn.Sequential(
            torch.nn.Conv2d(16, 64, 3, stride=2, padding=1), torch.nn.ReLU(),
            torch.nn.ConvTranspose2d(64, 64, 2, stride=2), torch.nn.ReLU(),
            torch.nn.Conv2d(64, 32, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


@pytest.mark.parametrize("mode", [LOSSLESS, COMPACT], ids=["lossless", "compact"])
def test_conv_transpose_decoder(mode: tuple[str, ...], tmp_path: Path) -> None:
    torch.manual_seed(0)
    spec = ModelSpec("decoder", Decoder().eval(), {"input": torch.randn(1, 16, 16, 16)}, ["out"],
                     {"input": {0: "batch"}, "out": {0: "batch"}}, "segmentation")
    model = export_model(spec, tmp_path / "decoder.onnx", dynamic_batch=True).path
    assert "ConvTranspose" in {node.op_type for node in onnx.load(str(model)).graph.node}
    output = tmp_path / "compressed.onnx"
    check_compressed(compress(model, images(tmp_path / "maps.npz", 64, 16, 16), mode, output, 24), output, mode)


def roberta_dir(directory: Path) -> Path:
    """A small RoBERTa with random weights and a byte-level BPE tokenizer without merges (one token per byte)."""
    from transformers import RobertaConfig, RobertaModel, RobertaTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    directory.mkdir()
    tokens = ["<s>", "<pad>", "</s>", "<unk>", *bytes_to_unicode().values(), "<mask>"]
    (directory / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(tokens)}))
    (directory / "merges.txt").write_text("#version: 0.2\n")
    RobertaTokenizer(str(directory / "vocab.json"), str(directory / "merges.txt")).save_pretrained(directory)
    torch.manual_seed(0)
    config = RobertaConfig(vocab_size=len(tokens), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=256, max_position_embeddings=66)
    RobertaModel(config).save_pretrained(directory)
    return directory


def token_ids(path: Path, samples: int = 64, length: int = 24) -> Path:
    """<s> random byte tokens </s>, of random lengths, padded with <pad> (id 1, which the position ids skip)."""
    rng = np.random.default_rng(0)
    ids = rng.integers(4, 260, (samples, length))
    mask = np.ones((samples, length), np.int64)
    ids[:, 0] = 0
    for row, used in enumerate(rng.integers(6, length + 1, samples)):
        ids[row, used - 1], ids[row, used:], mask[row, used:] = 2, 1, 0
    np.savez(path, input_ids=ids, attention_mask=mask)
    return path


@pytest.mark.parametrize("mode", [LOSSLESS, COMPACT], ids=["lossless", "compact"])
def test_hf_roberta_with_cumsum_position_ids(mode: tuple[str, ...], tmp_path: Path) -> None:
    model = f"hf:{roberta_dir(tmp_path / 'roberta')}"
    output = tmp_path / "compressed.onnx"
    check_compressed(compress(model, token_ids(tmp_path / "tokens.npz"), mode, output, 24), output, mode)
    assert "CumSum" in {node.op_type for node in onnx.load(str(output)).graph.node}
