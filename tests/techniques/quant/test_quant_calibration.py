"""techniques.quant.calibration: onnxruntime's calibrators fed the calibration split in batches."""

from __future__ import annotations

import numpy as np
import pytest
from quant_fixtures import images, residual_cnn

from onnxlrf.data import CLASSIFICATION, Dataset
from onnxlrf.errors import OnnxlrfError
from onnxlrf.techniques.quant.calibration import CALIBRATION_BATCH, calibrate_plan, calibrate_ranges
from onnxlrf.techniques.quant.planners import QuantOptions, plan_uniform_quant

ROWS = 2 * CALIBRATION_BATCH + 5  # several collect_data calls, the last one short


def dataset() -> Dataset:
    return Dataset("random", CLASSIFICATION, {"input": images(ROWS)}, np.zeros(ROWS, np.int64))


def test_minmax_measures_the_extremes_over_every_batch():
    data = dataset()
    ranges = calibrate_ranges(residual_cnn(), data, ["input", "r1"], "minmax")
    assert ranges["input"] == pytest.approx([data.inputs["input"].min(), data.inputs["input"].max()])
    assert ranges["r1"][0] == 0.0 and ranges["r1"][1] > 0


@pytest.mark.parametrize("method", ["percentile", "entropy"])
def test_histogram_methods_stay_inside_the_observed_range(method):
    data = dataset()
    low, high = calibrate_ranges(residual_cnn(), data, ["input"], method)["input"]
    assert data.inputs["input"].min() - 1e-3 <= low < high <= data.inputs["input"].max() + 1e-3


def test_calibrate_plan_records_what_the_rewrite_needs():
    model = residual_cnn()
    plan = plan_uniform_quant(model, QuantOptions(bits=8, activations="int8"))
    calibrate_plan(model, plan, dataset(), "onnxruntime", "minmax")
    assert sorted(plan.activation_ranges) == ["c2", "flat", "input", "r1", "r2"]
    assert plan.options["calibration_method"] == "minmax" and plan.options["calibration_samples"] == ROWS


def test_unknown_method_and_tensor_are_one_line_errors():
    with pytest.raises(OnnxlrfError, match="unknown calibration method 'kl'"):
        calibrate_ranges(residual_cnn(), dataset(), ["input"], "kl")
    with pytest.raises(OnnxlrfError, match="no range for tensor 'nowhere'"):
        calibrate_ranges(residual_cnn(), dataset(), ["input", "nowhere"])
