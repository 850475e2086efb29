"""Label-free data (npz without labels) on a model of a task onnxlrf does not know: the outputs loss and fidelity.

The model is a small conv net built here with two outputs, a dense map (as a segmentation head gives)
and a vector (as a box head gives), of very different scales; the data is random images.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner, Result

from onnxlrf.cli import cli
from onnxlrf.data import load_data
from onnxlrf.measure.analysis import AnalysisOptions, default_labels, joint_analysis
from onnxlrf.onnx_io import load_onnx
from onnxlrf.planning.plan import Plan
from onnxlrf.runtime.evaluate import with_original_outputs

SAMPLES = 400
SPLITS = ("--calib", 120, "--val", 120)


class TwoHeads(torch.nn.Module):
    """A trunk of convs, then a per-pixel map and a pooled vector (scaled up 50x, as pixel boxes are)."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = torch.nn.Sequential(
            torch.nn.Conv2d(3, 32, 3, padding=1), torch.nn.ReLU(),
            torch.nn.Conv2d(32, 48, 3, padding=1), torch.nn.ReLU(),
            torch.nn.Conv2d(48, 48, 3, padding=1), torch.nn.ReLU())
        self.dense_head = torch.nn.Conv2d(48, 8, 1)
        self.vector_head = torch.nn.Sequential(torch.nn.Linear(48, 64), torch.nn.ReLU(), torch.nn.Linear(64, 6))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.trunk(x)
        return self.dense_head(features), 50.0 * self.vector_head(features.mean(dim=(2, 3)))


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    work = tmp_path_factory.mktemp("label_free")
    torch.manual_seed(0)
    model, path = TwoHeads().eval(), work / "two_heads.onnx"
    torch.onnx.export(model, torch.zeros(1, 3, 12, 12), str(path), input_names=["image"],
                      output_names=["map", "boxes"], dynamic_axes={"image": {0: "n"}, "map": {0: "n"},
                                                                   "boxes": {0: "n"}},
                      opset_version=17, dynamo=False)
    data = work / "images.npz"
    np.savez(data, image=np.random.default_rng(0).standard_normal((SAMPLES, 3, 12, 12)).astype(np.float32))
    return {"model": path, "data": data, "work": work}


def invoke(*args: object) -> Result:
    return CliRunner().invoke(cli, [str(a) for a in args])


def invoke_json(*args: object) -> tuple[dict, str]:
    result = invoke(*args, "--json")
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout), result.stderr


def test_default_labels_for_data_without_labels_is_outputs(files: dict[str, Path]) -> None:
    dataset = load_data(f"npz:{files['data']}", load_onnx(files["model"]))
    assert dataset.task == "outputs" and default_labels(dataset) == "outputs"
    assert AnalysisOptions().labels is None  # resolved per data: labels where there are labels


def test_outputs_loss_has_zero_first_order_term(files: dict[str, Path]) -> None:
    """At the original's weights the distance to its outputs has zero gradient: the curvature carries it."""
    model = load_onnx(files["model"])
    calib = load_data(f"npz:{files['data']}", model).subset(np.arange(100))
    sensitivity = joint_analysis(model, calib, AnalysisOptions(range_samples=50))
    assert sensitivity.loss == "outputs/outputs" and abs(sensitivity.reference_loss) < 1e-10
    for layer in sensitivity.all():
        quadratic = layer.quadratic.sum()
        assert quadratic > 0
        # Only the float noise of onnxruntime's targets against torch's outputs is left.
        assert np.abs(layer.first_order).sum() < 1e-4 * quadratic, layer.layer.node
        # The sampled Gauss-Newton curvature predicts the measured single-layer loss changes (to
        # K-FAC's approximation, within a factor the range checks fit), and every check agrees.
        for check in layer.range_checks:
            if check["measured"] > 1e-3:
                assert check["measured"] == pytest.approx(check["quadratic"], rel=0.5), (layer.layer.node, check)
        assert layer.perturbation_range > 0


def test_labelled_targets_refused_for_data_without_labels(files: dict[str, Path]) -> None:
    model = load_onnx(files["model"])
    calib = load_data(f"npz:{files['data']}", model).subset(np.arange(20))
    with pytest.raises(Exception, match="needs labelled data"):
        joint_analysis(model, calib, AnalysisOptions(labels="predictions"))


def test_compress_lossless_label_free(files: dict[str, Path]) -> None:
    out, plan_path = files["work"] / "lossless.onnx", files["work"] / "lossless.plan.json"
    payload, log = invoke_json("compress", files["model"], "-o", out, "--mode", "lossless", "--target-reduction", 0.1,
                               "--data", f"npz:{files['data']}", *SPLITS, "--plan-out", plan_path)
    assert "data without labels" in log and "--labels outputs" in log
    assert payload["params_reduction"] >= 0.1 and payload["layers_factorized"] > 0
    assert payload["metric"] == "fidelity" and payload["samples"] == SAMPLES - 240
    assert payload["reference_value"] == pytest.approx(1.0, abs=1e-9)
    assert 0.5 < payload["value"] < 1.0
    # The held-out change is the mean relative squared error with its interval: below zero, resolved.
    low, high = payload["change_interval"]
    assert low <= payload["value"] - payload["reference_value"] <= high < 0
    assert payload["test"]["change_interval"] == payload["change_interval"]
    plan = Plan.load(plan_path)
    assert plan.options["labels"] == "outputs" and plan.options["reference_val"] == pytest.approx(1.0, abs=1e-9)
    # No per-sample losses on label-free data: lossless keeps the highest validation fidelity.
    assert plan.options["select"] == "metric"
    verified = [attempt for attempt in plan.options["backoff"] if "val" in attempt]
    assert next(a for a in verified if a.get("chosen"))["val"] == max(a["val"] for a in verified)

    validated, _ = invoke_json("validate", out, "--reference", files["model"], "--data", f"npz:{files['data']}")
    assert validated["metric"] == "fidelity" and validated["reference_value"] == pytest.approx(1.0, abs=1e-9)
    assert validated["value"] < 1.0 and validated["samples"] == SAMPLES
    alone = invoke("validate", out, "--data", f"npz:{files['data']}")
    assert alone.exit_code == 1 and "pass --reference" in alone.stderr


def test_compress_compact_label_free_within_the_tolerance(files: dict[str, Path]) -> None:
    tolerance = 0.02
    out, plan_path = files["work"] / "compact.onnx", files["work"] / "compact.plan.json"
    payload, log = invoke_json("compress", files["model"], "-o", out, "--mode", "compact", "--tolerance", tolerance,
                               "--data", f"npz:{files['data']}", *SPLITS, "--plan-out", plan_path)
    assert payload["params_reduction"] > 0.05 and payload["metric"] == "fidelity"
    chosen = [attempt for attempt in Plan.load(plan_path).options["backoff"] if attempt.get("chosen")]
    assert len(chosen) == 1 and chosen[0]["val"] >= 1.0 - tolerance
    assert payload["val"]["value"] >= 1.0 - tolerance
    # The held-out error is near the tolerance the validation split verified, not far beyond it.
    assert payload["value"] >= 1.0 - 2 * tolerance
    assert "required 0.9800" in log


def test_compact_label_free_needs_a_tolerance(files: dict[str, Path]) -> None:
    out = files["work"] / "no_tolerance.onnx"
    result = invoke("compress", files["model"], "-o", out, "--mode", "compact", "--data", f"npz:{files['data']}",
                    *SPLITS)
    assert result.exit_code == 1 and "pass --tolerance > 0" in result.stderr and not out.exists()


def test_original_outputs_are_all_float_outputs_flattened(files: dict[str, Path]) -> None:
    model = load_onnx(files["model"])
    dataset = with_original_outputs(load_data(f"npz:{files['data']}", model).subset(np.arange(10)), model, "cpu")
    assert dataset.output_widths == (8 * 12 * 12, 6) and dataset.labels.shape == (10, 8 * 12 * 12 + 6)
    map_scale, boxes_scale = dataset.output_scales
    assert boxes_scale > 100 * map_scale  # each output is measured against its own scale
