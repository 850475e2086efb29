"""planning.plan: quantization entries and activation ranges, saved, loaded and checked against the model."""

from __future__ import annotations

import json

import numpy as np
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
    assert json.loads((tmp_path / "plan.json").read_text())["version"] == 4
    validate_plan(loaded, residual_cnn())


@pytest.mark.parametrize("edit, message", [
    ({"bits": 9}, "bits 9 outside 2..8"),
    ({"container": "int4", "bits": 5}, "5-bit values do not fit container int4"),
    ({"granularity": "block", "block_size": 16}, "block scales are for Gemm/MatMul, not Conv"),
    ({"block_size": 16}, "block_size applies to granularity 'block' only"),
    ({"activations": "int8", "bits": 4, "container": "int4"}, "int8 activations need the weights in an int8 container"),
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


def loss_aware_plan() -> Plan:
    """conv2 rounded loss-aware: its levels and scales stored with the plan."""
    plan = plan_uniform_quant(residual_cnn(), QuantOptions(bits=3))
    entry = next(e for e in plan.layers if e.node == "conv2")
    entry.rounding, entry.weight_scales = "loss-aware", "searched"
    levels = np.random.default_rng(0).integers(-3, 4, size=entry.weight_shape).astype(np.int8)
    plan.bases[entry.weight] = (levels, np.full(entry.weight_shape[0], 0.05, np.float32))
    return plan


def test_a_loss_aware_entry_round_trips_with_its_grid(tmp_path):
    plan = loss_aware_plan()
    plan.save(tmp_path / "plan.json")
    assert (tmp_path / "plan.json.bases.npz").exists()
    loaded = Plan.load(tmp_path / "plan.json")
    levels, scales = loaded.bases["w2"]
    assert levels.dtype == np.int8 and np.array_equal(levels, plan.bases["w2"][0]) and scales.shape == (8,)
    validate_plan(loaded, residual_cnn())


@pytest.mark.parametrize("grid, message", [
    (None, "the plan stores no levels and scales for 'w2'"),
    ((np.zeros((8, 8, 3, 3), np.int8), np.ones(4, np.float32)), "do not fit the weight"),
    ((np.full((8, 8, 3, 3), 4, np.int8), np.ones(8, np.float32)), "exceed the 3-bit grid"),
])
def test_a_loss_aware_entry_needs_a_grid_that_fits(grid, message):
    plan = loss_aware_plan()
    if grid is None:
        del plan.bases["w2"]
    else:
        plan.bases["w2"] = grid
    with pytest.raises(OnnxlrfError, match=message):
        validate_plan(plan, residual_cnn())


def test_a_stored_grid_of_the_wrong_types_is_refused_on_load(tmp_path):
    plan = loss_aware_plan()
    plan.bases["w2"] = (plan.bases["w2"][0].astype(np.float32), plan.bases["w2"][1])
    plan.save(tmp_path / "plan.json")
    with pytest.raises(OnnxlrfError, match="the grid of 'w2' needs int8 levels"):
        Plan.load(tmp_path / "plan.json")


def test_a_block_entry_rounded_again_stores_its_block_scales_in_dequantize_linears_layout(tmp_path):
    plan = plan_uniform_quant(residual_cnn(), QuantOptions(bits=3, block_size=4))
    entry = next(e for e in plan.layers if e.node == "fc")  # a Gemm weight (4 outputs, 8 inputs): 2 blocks a row
    assert entry.granularity == "block"
    entry.rounding, entry.weight_scales = "sequential", "searched"
    levels = np.random.default_rng(0).integers(-3, 4, size=entry.weight_shape).astype(np.int8)
    plan.bases[entry.weight] = (levels, np.full((4, 2), 0.05, np.float32))
    plan.save(tmp_path / "plan.json")
    loaded = Plan.load(tmp_path / "plan.json")
    assert loaded.bases["fc_w"][1].shape == (4, 2)
    validate_plan(loaded, residual_cnn())
    loaded.bases["fc_w"] = (levels, np.full(4, 0.05, np.float32))  # one scale per channel: not this entry's grid
    with pytest.raises(OnnxlrfError, match=r"scales \[4\] do not fit the weight \[4, 8\] with 4-input blocks"):
        validate_plan(loaded, residual_cnn())
