"""planning.plan: quantization entries and activation ranges, saved, loaded and checked against the model."""

from __future__ import annotations

import json

import pytest
from quant_fixtures import residual_cnn

from onnxlrf.errors import OnnxlrfError
from onnxlrf.planning.plan import Plan, validate_plan
from onnxlrf.techniques.quant.planners import QuantOptions, plan_uniform_quant


def plan_json(**options) -> dict:
    plan = plan_uniform_quant(residual_cnn(), QuantOptions(**options))
    plan.activation_ranges = {"input": [-1.0, 2.0]}
    return plan.to_dict()


def test_quant_plan_round_trips_with_its_ranges(tmp_path):
    data = plan_json(bits=4)
    entry = data["layers"][0]
    assert entry["technique"] == "quant" and entry["choice"] == {
        "bits": 4, "granularity": "per_channel", "block_size": None, "container": "int4", "activations": "float",
        "weight_scales": "absmax", "rounding": "nearest"}
    plan = Plan.from_dict(data)
    plan.save(tmp_path / "plan.json")
    loaded = Plan.load(tmp_path / "plan.json")
    assert loaded == plan and loaded.activation_ranges == {"input": [-1.0, 2.0]}
    assert json.loads((tmp_path / "plan.json").read_text())["version"] == 3
    validate_plan(loaded, residual_cnn())


@pytest.mark.parametrize("edit, message", [
    ({"bits": 9}, "bits 9 outside 2..8"),
    ({"container": "int4", "bits": 5}, "5-bit values do not fit container int4"),
    ({"granularity": "block", "block_size": 16}, "block scales are for Gemm/MatMul, not Conv"),
    ({"block_size": 16}, "block_size applies to granularity 'block' only"),
    ({"activations": "int8", "bits": 4, "container": "int4"}, "int8 activations go with 8-bit weights"),
    ({"activations": "int4"}, "unknown activations 'int4'"),
    ({"rounding": "up"}, "unknown rounding 'up'"),
    ({"bits": None}, "a float entry (bits null)"),
])
def test_bad_quant_choices_are_named(edit, message):
    data = plan_json(bits=8)
    data["layers"][0]["choice"].update(edit)
    with pytest.raises(OnnxlrfError, match=message.replace("(", r"\(").replace(")", r"\)")):
        validate_plan(Plan.from_dict(data), residual_cnn())


def test_int8_activations_need_the_input_range_and_ranges_must_be_finite():
    data = plan_json(bits=8, activations="int8")
    with pytest.raises(OnnxlrfError, match="no calibrated range for its input 'r1'"):
        validate_plan(Plan.from_dict(data), residual_cnn())
    data["activation_ranges"] = {"input": [1.0, -1.0]}
    with pytest.raises(OnnxlrfError, match="activation range of 'input' must be"):
        Plan.from_dict(data)
