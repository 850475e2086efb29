"""pipeline.compress_quant through the CLI: compress --technique quant on a small model with npz data, the plan
re-applied by rewrite, and one-line errors that write nothing."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnx import numpy_helper
from quant_fixtures import conversion_timer, images, residual_cnn

from onnxlrf.cli import cli

SAMPLES = 300


@pytest.fixture
def files(tmp_path):
    model = residual_cnn()
    onnx.save(model, str(tmp_path / "model.onnx"))
    x = images(SAMPLES)
    logits = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {
        "input": x})[0]
    np.savez(tmp_path / "data.npz", input=x, labels=logits.argmax(1).astype(np.int64))
    return tmp_path


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def compress_args(files, *extra):
    return ("compress", files / "model.onnx", "--technique", "quant", "--mode", "uniform", "--data",
            f"npz:{files / 'data.npz'}", "--calib", 100, "--val", 50, "-o", files / "out.onnx", *extra)


def test_w8a8_reports_bits_bytes_and_integer_kernels_and_rewrite_reapplies_the_plan(files):
    result = invoke(*compress_args(files, "--bits", 8, "--activations", "int8", "--reduce-range", "on",
                                   "--plan-out", files / "plan.json", "--report", files / "report", "--json", "-q"))
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["layers_quantized"] == 3 and payload["samples"] == SAMPLES - 150
    assert payload["average_weight_bits"] == 7.0 and payload["reduce_range"]  # 7-bit weights, any x86 CPU
    assert payload["model_bytes"] == (files / "out.onnx").stat().st_size
    assert payload["reference_model_bytes"] == (files / "model.onnx").stat().st_size
    assert payload["optimized_op_counts"]["QLinearConv"] == 2 and payload["value"] >= 0.9
    plan = json.loads((files / "plan.json").read_text())
    assert plan["options"]["calibration_method"] == "minmax" and "r1" in plan["activation_ranges"]
    # The Gemm's input is the one smoothing can apply to (searched by default; kept where it quantizes closer).
    assert plan["options"]["smoothing"]["searched"] == 1 and payload["smoothed_inputs"] == len(plan["smoothing"])
    markdown = (files / "report" / "report.md").read_text()
    assert f"smoothed W8A8 Gemm/MatMul inputs (SmoothQuant) | {len(plan['smoothing'])} of 1" in markdown
    assert ("input smoothed, alpha" in markdown) == bool(plan["smoothing"])
    again = invoke("rewrite", files / "model.onnx", "--plan", files / "plan.json", "-o", files / "again.onnx", "-q")
    assert again.exit_code == 0, again.output
    assert (files / "again.onnx").read_bytes() == (files / "out.onnx").read_bytes()


def test_w8a8_without_smoothing_searches_none(files):
    result = invoke(*compress_args(files, "--bits", 8, "--activations", "int8", "--smoothing", "off",
                                   "--plan-out", files / "plan.json", "--json", "-q"))
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["smoothed_inputs"] == 0
    plan = json.loads((files / "plan.json").read_text())
    assert plan["smoothing"] == {} and "smoothing" not in plan["options"]


@pytest.mark.parametrize("runtime", ["onnxruntime", "tensorrt"])
def test_w4a8_stores_4_bit_levels_in_int8_for_the_integer_kernels(files, runtime):
    result = invoke(*compress_args(files, "--bits", 4, "--activations", "int8", "--runtime", runtime,
                                   "--plan-out", files / "plan.json", "--json", "-q", "--overwrite"))
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["average_weight_bits"] == 4.0 and payload["layers_quantized"] == 3
    plan = json.loads((files / "plan.json").read_text())
    assert {(layer["choice"]["bits"], layer["choice"]["container"], layer["choice"]["activations"])
            for layer in plan["layers"]} == {(4, "int8", "int8")}
    assert plan["smoothing"] == {} and "smoothing" not in plan["options"]  # auto smooths W8A8 inputs only
    model = onnx.load(files / "out.onnx")
    weights = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer
               if init.data_type == onnx.TensorProto.INT8 and len(init.dims) > 1}
    assert len(weights) == 3 and all(np.abs(w).max() <= 7 for w in weights.values())
    if runtime == "onnxruntime":
        assert payload["optimized_op_counts"]["QLinearConv"] == 2
    else:
        from onnxlrf.techniques.quant.rewrite import check_tensorrt_form

        check_tensorrt_form(model)  # symmetric, int8 weights and activations


def test_w8a8_rounded_sequentially_keeps_its_kernels_and_rewrite_reapplies_the_plan(files):
    result = invoke(*compress_args(files, "--bits", 8, "--activations", "int8", "--rounding", "sequential",
                                   "--plan-out", files / "plan.json", "--json", "-q"))
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["average_weight_bits"] == 7.0 and payload["optimized_op_counts"]["QLinearConv"] == 2
    plan = json.loads((files / "plan.json").read_text())
    assert {layer["choice"]["rounding"] for layer in plan["layers"]} == {"sequential"}
    assert plan["options"]["sequential_rounding"]["nodes"] == 3
    again = invoke("rewrite", files / "model.onnx", "--plan", files / "plan.json", "-o", files / "again.onnx", "-q")
    assert again.exit_code == 0, again.output
    assert (files / "again.onnx").read_bytes() == (files / "out.onnx").read_bytes()


def test_weight_only_without_data_and_the_tensorrt_form(files):
    result = invoke("compress", files / "model.onnx", "--technique", "quant", "--mode", "uniform", "--bits", 4,
                    "--runtime", "tensorrt", "-o", files / "out.onnx", "--json", "-q")
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["average_weight_bits"] == 4.0 and "value" not in payload
    assert payload["model_bytes"] < payload["reference_model_bytes"]


@pytest.mark.parametrize("extra, message", [
    ((), "mode uniform needs --bits"),
    (("--bits", 8, "--block-size", 32), "--block-size is for weight-only int4"),
    (("--rounding", "sequential", "--mode", "lossless", "--target", "bits", "--target-reduction", 0.8),
     "--rounding sequential is for uniform plans"),
    (("--mode", "lossless", "--target", "latency", "--target-reduction", 0.3), "pass --activations int8"),
    (("--bits", 4, "--target", "latency"), "--target and --target-reduction are for --mode lossless or compact"),
    (("--bits", 4, "--target-reduction", 0.5), "--target and --target-reduction are for --mode lossless or compact"),
    (("--mode", "lossless", "--target", "latency", "--target-reduction", 0.3, "--activations", "int8", "--runtime",
      "tensorrt"), "TensorRT cannot be timed here"),
])
def test_bad_quant_flags_are_one_line_errors_and_write_nothing(files, extra, message):
    result = invoke(*compress_args(files, *extra))
    assert result.exit_code == 1 and message in result.output and len(result.output.strip().splitlines()) == 1
    assert not (files / "out.onnx").exists()


def test_quant_flags_need_the_quant_technique(files):
    result = invoke("compress", files / "model.onnx", "--mode", "uniform", "--rank-fraction", 0.5, "--bits", 8,
                    "-o", files / "out.onnx")
    assert result.exit_code == 1 and "apply to --technique quant" in result.output
    result = invoke(*compress_args(files, "--bits", 8), "--mode", "compact")
    assert result.exit_code == 1 and "--bits is for --mode uniform" in result.output
    result = invoke(*compress_args(files), "--mode", "compact")
    assert result.exit_code == 1 and "pass --target bytes, bits or latency" in result.output
    result = invoke("compress", files / "model.onnx", "--technique", "quant", "--mode", "uniform", "--bits", 4,
                    "--rounding", "sequential", "-o", files / "out.onnx")
    assert result.exit_code == 1 and "--rounding sequential needs --data" in result.output
    result = invoke("compress", files / "model.onnx", "--mode", "uniform", "--rank-fraction", 0.5, "--smoothing", "off",
                    "-o", files / "out.onnx")
    assert result.exit_code == 1 and "--smoothing apply to --technique quant" in result.output
    result = invoke(*compress_args(files, "--bits", 8, "--smoothing", "on"))
    assert result.exit_code == 1 and "--smoothing on is for uniform plans with --activations int8" in result.output
    assert not (files / "out.onnx").exists()


def test_loss_aware_plans_choose_bits_per_layer_in_bytes_and_verify_them(files):
    # 80% of the bytes: more than 8-bit weights everywhere remove, so some layer must go lower.
    result = invoke(*compress_args(files, "--mode", "lossless", "--target", "bytes", "--target-reduction", 0.8,
                                   "--plan-out", files / "plan.json", "--json", "-q"))
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    plan = json.loads((files / "plan.json").read_text())
    assert plan["mode"] == "lossless" and plan["options"]["target"] == "bytes"
    assert plan["options"]["achieved_reduction"] >= 0.8 and plan["options"]["backoff"]
    bits = [layer["choice"]["bits"] for layer in plan["layers"]]
    assert all(b in (2, 3, 4, 5, 6, 8) for b in bits) and payload["layers_quantized"] == 3
    assert all("predicted_dloss" in layer["notes"] for layer in plan["layers"])
    assert payload["average_weight_bits"] < 8 and payload["model_bytes"] < payload["reference_model_bytes"]


def test_loss_aware_plans_with_int8_activations_run_as_integer_kernels(files):
    result = invoke(*compress_args(files, "--mode", "lossless", "--target", "bits", "--target-reduction", 0.85,
                                   "--activations", "int8", "--reduce-range", "on", "--plan-out", files / "plan.json",
                                   "--json", "-q"))
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    plan = json.loads((files / "plan.json").read_text())
    quantized = [layer for layer in plan["layers"] if layer["choice"]["bits"] is not None]
    assert quantized and all(layer["choice"]["activations"] == "int8" and layer["choice"]["container"] == "int8"
                             for layer in quantized)
    assert all(layer["choice"]["bits"] <= 7 for layer in quantized)  # the reduced range: 7-bit weights at most
    assert plan["options"]["activations"] == "int8" and plan["options"]["calibration_method"] == "minmax"
    assert plan["options"]["reduce_range"] is True
    # Each quantized Conv runs as QLinearConv; ranges are kept for the activations the plan quantizes only.
    convs = sum(layer["op_type"] == "Conv" for layer in quantized)
    assert payload["optimized_op_counts"].get("QLinearConv", 0) == convs
    assert "input" in plan["activation_ranges"] and payload["average_weight_bits"] <= 32 * 0.15 + 1e-9


def test_a_loss_aware_int8_plan_in_the_tensorrt_form_is_symmetric_int8(files):
    from onnxlrf.techniques.quant.rewrite import check_tensorrt_form

    result = invoke(*compress_args(files, "--mode", "lossless", "--target", "bits", "--target-reduction", 0.8,
                                   "--activations", "int8", "--runtime", "tensorrt", "--json", "-q"))
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["runtime"] == "tensorrt" and payload["average_weight_bits"] <= 32 * 0.2 + 1e-9
    check_tensorrt_form(onnx.load(str(files / "out.onnx")))  # fewer bits still live in int8, zero points 0


def test_quant_report_says_bits_layers_and_the_target_axis(files):
    result = invoke(*compress_args(files, "--mode", "lossless", "--target", "bits", "--target-reduction", 0.85,
                                   "--report", files / "report", "-q"))
    assert result.exit_code == 0, result.output
    markdown = (files / "report" / "report.md").read_text()
    assert "| layers | 3 quantized, 0 float |" in markdown
    assert "| weight bits (Conv/Gemm/MatMul, logical) | 32 -> " in markdown and "bits: logical weight bits" in markdown
    assert "weight bits removed" in (files / "report" / "curve.svg").read_text()


def test_loss_aware_rounding_on_a_bits_target_is_stored_and_rewrite_reapplies_it(files):
    # 4.8 average weight bits: the logical-bits target lets 3- and 2-bit options count for what they are.
    result = invoke(*compress_args(files, "--mode", "lossless", "--target", "bits", "--target-reduction", 0.85,
                                   "--plan-out", files / "plan.json", "--json", "-q"))
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["average_weight_bits"] <= 4.8 + 1e-9
    plan = json.loads((files / "plan.json").read_text())
    roundings = {layer["choice"]["rounding"] for layer in plan["layers"]}
    # Every plan the back-off verifies is rounded again in graph order (the default --refit), and so is
    # the chosen one.
    assert roundings <= {"sequential", None} and plan["options"]["rounding"] == "loss-aware"
    sequential = [layer for layer in plan["layers"] if layer["choice"]["rounding"] == "sequential"]
    assert sequential and plan["options"]["sequential_rounding"]["nodes"] == len(sequential)
    # Each quantized layer's options were measured alone; the chosen bits are among those that agreed.
    for layer in plan["layers"]:
        checks = {check["bits"]: check for check in layer["notes"]["range_checks"]}
        assert checks[layer["choice"]["bits"]]["agree"]
        assert {"predicted", "measured", "relative_error"} <= set(checks[layer["choice"]["bits"]])
    assert (files / "plan.json.bases.npz").exists()
    again = invoke("rewrite", files / "model.onnx", "--plan", files / "plan.json", "-o", files / "again.onnx", "-q")
    assert again.exit_code == 0, again.output
    assert (files / "again.onnx").read_bytes() == (files / "out.onnx").read_bytes()
    alone = invoke(*compress_args(files, "--mode", "lossless", "--target", "bits", "--target-reduction", 0.85,
                                  "--no-refit", "--select", "metric", "--plan-out", files / "plan.json", "--overwrite",
                                  "-q"))
    assert alone.exit_code == 0, alone.output
    plan = json.loads((files / "plan.json").read_text())
    # Without it, loss-aware rounding predicts less than round to nearest on these layers' correlated inputs (the
    # knapsack's plan, chosen here by the metric; by the loss the uniform plan rounded to nearest wins).
    assert plan["options"]["backoff"][0].get("chosen") and plan["options"]["backoff"][0]["kappa"] == 1.0
    assert "loss-aware" in {layer["choice"]["rounding"] for layer in plan["layers"]}
    assert "sequential_rounding" not in plan["options"]
    nearest = invoke(*compress_args(files, "--mode", "lossless", "--target", "bits", "--target-reduction", 0.85,
                                    "--rounding", "nearest", "--no-refit", "--plan-out", files / "plan.json",
                                    "--overwrite", "-q"))
    assert nearest.exit_code == 0, nearest.output
    plan = json.loads((files / "plan.json").read_text())
    assert {layer["choice"]["rounding"] for layer in plan["layers"]} <= {"nearest", None}
    uniform = invoke(*compress_args(files, "--bits", 4, "--rounding", "loss-aware", "--overwrite"))
    assert uniform.exit_code == 1 and "uniform plans round to nearest" in uniform.output


def test_lossless_verifies_the_uniform_plan_of_the_target_beside_the_knapsacks(files):
    result = invoke(*compress_args(files, "--mode", "lossless", "--target", "bits", "--target-reduction", 0.875,
                                   "--plan-out", files / "plan.json", "--report", files / "report", "--json", "-q"))
    assert result.exit_code == 0, result.output
    plan = json.loads((files / "plan.json").read_text())
    attempts = plan["options"]["backoff"]
    baseline = [attempt for attempt in attempts if attempt.get("baseline")]
    # 4 bits a weight: the most bits whose uniform plan meets 87.5% fewer weight bits, as written and as the
    # back-off improves every plan (rounded sequentially).
    assert [(a["baseline"], a["kappa"], a["predicted_dloss"]) for a in baseline] == [
        ("uniform 4 bits", None, None), ("uniform 4 bits, rounded sequentially", None, None)]
    assert all(a["achieved_reduction"] == pytest.approx(0.875) and "val" in a for a in baseline)
    verified = [a for a in attempts if "val" in a]
    chosen = next(a for a in attempts if a.get("chosen"))
    # Classified data: the lowest mean validation loss wins (--select auto), a tie the first verified.
    assert plan["options"]["select"] == "loss"
    losses = [a["loss_change"] for a in verified]
    assert chosen is verified[losses.index(min(losses))]
    choices = {(layer["choice"]["bits"], layer["choice"]["rounding"]) for layer in plan["layers"]}
    expected = {"uniform 4 bits": {(4, "nearest")}, "uniform 4 bits, rounded sequentially": {(4, "sequential")}}
    assert choices == expected.get(chosen.get("baseline"), choices)
    report = (files / "report" / "report.md").read_text()
    assert "| uniform 4 bits |" in report and "| uniform 4 bits, rounded sequentially |" in report
    assert "Lossless chose the plan of lowest mean validation loss" in report
    row = next(line for line in report.splitlines() if line.startswith("| uniform 4 bits |"))
    assert f"| {baseline[0]['loss_change']:+.4f} ({baseline[0]['loss_se']:.4f}) |" in row
    html = (files / "report" / "report.html").read_text()
    assert "<th>loss change (s.e.)</th>" in html and "Lossless chose the plan of lowest mean validation loss" in html
    again = invoke("rewrite", files / "model.onnx", "--plan", files / "plan.json", "-o", files / "again.onnx", "-q")
    assert again.exit_code == 0, again.output
    assert (files / "again.onnx").read_bytes() == (files / "out.onnx").read_bytes()
    by_metric = invoke(*compress_args(files, "--mode", "lossless", "--target", "bits", "--target-reduction", 0.875,
                                      "--select", "metric", "--plan-out", files / "plan.json", "--overwrite", "-q"))
    assert by_metric.exit_code == 0, by_metric.output
    attempts = json.loads((files / "plan.json").read_text())["options"]["backoff"]
    verified = [a for a in attempts if "val" in a]
    values = [a["val"] for a in verified]
    assert verified[values.index(max(values))].get("chosen")  # the highest metric, a tie the first verified


def test_loss_aware_plans_offer_gemm_block_options_with_block_size(files):
    """With --block-size the Gemm is also offered int4-and-fewer options with one scale per 4 inputs, each measured
    alone; the Convs are not. Chosen at 3.2 average bits, a block option is written as a blocked DequantizeLinear."""
    # --select metric: on this fixture the knapsack's plan has the best metric, the uniform one the lowest loss.
    result = invoke(*compress_args(files, "--mode", "lossless", "--target", "bits", "--target-reduction", 0.9,
                                   "--block-size", 4, "--select", "metric", "--plan-out", files / "plan.json", "--json",
                                   "-q"))
    assert result.exit_code == 0, result.output
    plan = json.loads((files / "plan.json").read_text())
    assert plan["options"]["block_size"] == 4 and plan["options"]["backoff"][0]["kappa"] == 1.0
    layers = {layer["node"]: layer for layer in plan["layers"]}
    fc_checks = layers["fc"]["notes"]["range_checks"]
    assert sorted(check["bits"] for check in fc_checks if check.get("block_size") == 4) == [2, 3, 4]
    assert all("block_size" not in check for check in layers["conv1"]["notes"]["range_checks"])
    for layer in plan["layers"]:
        choice = layer["choice"]
        if choice["granularity"] == "block":
            assert layer["node"] == "fc" and choice["block_size"] == 4 and choice["container"] == "int4"
            assert any(check["bits"] == choice["bits"] and check.get("block_size") == 4 and check["agree"]
                       for check in fc_checks)
    written = onnx.load(str(files / "out.onnx"))
    blocked = [node for node in written.graph.node if node.op_type == "DequantizeLinear"
               and any(attr.name == "block_size" for attr in node.attribute)]
    assert len(blocked) == (layers["fc"]["choice"]["granularity"] == "block")
    again = invoke("rewrite", files / "model.onnx", "--plan", files / "plan.json", "-o", files / "again.onnx", "-q")
    assert again.exit_code == 0, again.output
    assert (files / "again.onnx").read_bytes() == (files / "out.onnx").read_bytes()


def test_the_hessian_trace_baseline_plans_through_the_same_knapsack(files):
    """--predictor hessian-trace (HAWQ-v2's estimate) predicts each option from ||dW|| alone, through the same checks,
    knapsack and back-off; the rounding of each option is still chosen in the K-FAC metric (loss-aware grids are
    stored), and with --rounding nearest every layer is rounded to nearest (HAWQ's own rounding; --no-refit: no
    sequential rounding after; --select metric: the knapsack's plan, which the uniform one beats on loss here)."""
    for rounding, stores_grids in (("loss-aware", True), ("nearest", False)):
        result = invoke(*compress_args(files, "--mode", "lossless", "--target", "bits", "--target-reduction", 0.8,
                                       "--predictor", "hessian-trace", "--rounding", rounding, "--no-refit", "--select",
                                       "metric", "--plan-out", files / "plan.json", "--json", "-q", "--overwrite"))
        assert result.exit_code == 0, result.output
        plan = json.loads((files / "plan.json").read_text())
        assert plan["options"]["predictor"] == "hessian-trace"
        roundings = {layer["choice"]["rounding"] for layer in plan["layers"]} - {None}
        assert ("loss-aware" in roundings) == stores_grids and roundings <= {"loss-aware", "nearest"}
        for layer in plan["layers"]:  # with one rounding, the trace estimate grows with ||dW||^2
            checks = sorted(layer["notes"].get("range_checks", []), key=lambda check: check["relative_error"])
            if rounding == "nearest":
                assert [check["predicted"] for check in checks] == sorted(check["predicted"] for check in checks)
    uniform = invoke(*compress_args(files, "--bits", 4, "--predictor", "hessian-trace"))
    assert uniform.exit_code == 1 and "--predictor applies to lossless and compact plans" in uniform.output


def test_the_uniform_baseline_of_a_latency_target_leaves_the_layers_not_measured_faster_float(tmp_path):
    from types import SimpleNamespace

    from onnxlrf.costs.latency import QuantLatencyCost
    from onnxlrf.costs.params import BitsCost
    from onnxlrf.graph.layers import find_layers
    from onnxlrf.planning.joint import PlanOptions
    from onnxlrf.techniques.quant.technique import Quant
    from onnxlrf.verify.backoff import uniform_baseline

    model = residual_cnn()
    cost = QuantLatencyCost(model, weight_bits=7, batch=16, provider="cpu", threads=1, cache=tmp_path,
                            timer=conversion_timer())
    layers = find_layers(model)[0]
    technique = Quant(activation_ranges={name: [-3.0, 3.0] for name in ("input", "r1", "c2", "a", "flat")},
                      int8_weight_bits=7)
    analysis = SimpleNamespace(layers={layer.node: None for layer in layers})
    plan = uniform_baseline(model, technique, analysis, PlanOptions("lossless", target_reduction=0.1,
                                                                    target="latency"), cost)
    faster = {layer.node for layer in layers if cost.quantized([layer], 7, 8, 1, True) < cost.dense([layer])}
    assert faster and faster != {layer.node for layer in layers}  # this timer: the Gemm is not faster
    assert {entry.node for entry in plan.layers if entry.changed} == faster
    assert plan.options["baseline"] == "uniform 7 bits" and plan.options["kappa"] is None
    assert plan.options["achieved_reduction"] >= 0.1 and plan.options["target"] == "latency"
    bits = BitsCost(model)  # the most bits that meet the target: 3 for 90% fewer weight bits; none for 99%
    assert uniform_baseline(model, technique, analysis, PlanOptions("lossless", target_reduction=0.9, target="bits"),
                            bits).options["baseline"] == "uniform 3 bits"
    assert uniform_baseline(model, technique, analysis, PlanOptions("lossless", target_reduction=0.99, target="bits"),
                            bits) is None
    # With --block-size the Gemm's weight is in blocks, as `--mode uniform --bits 3 --block-size 4` writes it.
    blocked = uniform_baseline(model, Quant(block_size=4), analysis, PlanOptions("lossless", target_reduction=0.9,
                                                                                 target="bits"), bits)
    assert {entry.node: (entry.bits, entry.granularity, entry.block_size) for entry in blocked.layers} == {
        "conv1": (3, "per_channel", None), "conv2": (3, "per_channel", None), "fc": (3, "block", 4)}


def test_a_latency_target_quantizes_the_layers_measured_faster_with_int8_inputs(files, monkeypatch):
    from onnxlrf.costs import latency as latency_module
    from onnxlrf.costs.latency import QuantLatencyCost

    monkeypatch.setattr(latency_module, "time_interleaved", conversion_timer())
    monkeypatch.setenv("ONNXLRF_CACHE", str(files / "cache"))
    monkeypatch.setattr(QuantLatencyCost, "measured_speedup", lambda self, compressed, runs=10: 1.3)
    result = invoke(*compress_args(files, "--mode", "lossless", "--target", "latency", "--target-reduction", 0.2,
                                   "--activations", "int8", "--batch", 16, "--plan-out", files / "plan.json",
                                   "--report", files / "report", "--json", "-q"))
    assert result.exit_code == 0, result.output
    plan = json.loads((files / "plan.json").read_text())
    assert plan["options"]["target"] == "latency" and plan["options"]["achieved_reduction"] >= 0.2
    assert plan["options"]["cost_model"]["batch"] == 16 and "w8a8_weight_bits" in plan["options"]["cost_model"]
    assert all(attempt["speedup"] == 1.3 for attempt in plan["options"]["backoff"])
    assert plan["options"]["bits_offered"] == [8]  # fewer bits would cost loss and save no time: not measured
    assert all(len(layer["notes"]["range_checks"]) == 1 for layer in plan["layers"] if layer["choice"]["bits"])
    choices = {layer["node"]: layer["choice"] for layer in plan["layers"]}
    assert choices["fc"]["bits"] is None  # the 8-to-4 Gemm is not faster with int8 inputs under this timer
    notes = {layer["node"]: layer["notes"] for layer in plan["layers"]}
    assert notes["fc"]["latency_ms_planned"] == notes["fc"]["latency_ms_dense"]
    assert all(notes[node]["latency_ms_planned"] < notes[node]["latency_ms_dense"]
               for node, c in choices.items() if c["bits"] is not None)
    fc_row = next(line for line in (files / "report" / "report.md").read_text().splitlines() if "| fc |" in line)
    assert f"{notes['fc']['latency_ms_dense']:.3f}" in fc_row  # the report's latency column
    assert all(c["activations"] == "int8" for c in choices.values() if c["bits"] is not None)
    assert any(c["bits"] is not None for c in choices.values())
    payload = json.loads(result.stdout)
    assert payload["optimized_op_counts"].get("QLinearConv", 0) == sum(
        c["bits"] is not None for node, c in choices.items() if node.startswith("conv"))
