"""Quantization as a :class:`~onnxlrf.techniques.base.Technique` (the parts built so far: eligibility,
the rewrite, the quantized weights, and how the report shows an entry).

The parts the joint planner and the back-off need (``analyse``, ``candidates``, ``entries``,
``unplanned_entry``, ``plan_options``, ``signature``, ``improve``) come with the loss-aware planner; until
then plans come from :func:`~onnxlrf.techniques.quant.planners.plan_uniform_quant`.
"""

from __future__ import annotations

from typing import Any

import onnx
from onnx import numpy_helper

from ...graph.layers import constant_producers
from ...graph.quantizable import find_quantizable
from ...planning.plan import Plan, QuantEntry, validate_plan
from ...progress import ProgressLike
from ..base import EntryView, KeepPlot, RewriteReport
from .grid import dequantize_blocks, dequantize_per_channel, quantize_blocks, quantize_per_channel
from .rewrite import QDQRewrite

FLOAT_BITS = 32


class Quant:
    """Per layer: weight bits, granularity and container, and whether its input activations are int8 too."""

    name = QuantEntry.technique

    def ineligible(self, model: onnx.ModelProto) -> dict[str, str]:
        return {skipped.node: skipped.reason for skipped in find_quantizable(model)[1]}

    def rewrite(self, model: onnx.ModelProto, plan: Plan, progress: ProgressLike = None
                ) -> tuple[onnx.ModelProto, RewriteReport]:
        """:class:`~onnxlrf.techniques.quant.rewrite.QDQRewrite` in the form the plan names (``options["runtime"]``)."""
        return QDQRewrite(plan.options.get("runtime", "onnxruntime"))(model, plan, progress)

    def perturbed_weights(self, model: onnx.ModelProto, plan: Plan) -> onnx.ModelProto:
        """The float graph with each planned weight replaced by its dequantized grid values."""
        validate_plan(plan, model)
        layers = {layer.node: layer for layer in find_quantizable(model)[0]}
        constants = constant_producers(model)
        replaced = {}
        for entry in plan.layers:
            if not entry.changed:
                continue
            layer = layers[entry.node]
            weight = numpy_helper.to_array(constants[layer.weight])
            if entry.granularity == "block":
                levels, scales = quantize_blocks(weight, layer.reduction_axis, entry.block_size, entry.bits)
                replaced[layer.weight] = dequantize_blocks(levels, scales, layer.reduction_axis, entry.block_size)
            else:
                levels, scales = quantize_per_channel(weight, layer.channel_axis, entry.bits)
                replaced[layer.weight] = dequantize_per_channel(levels, scales, layer.channel_axis)
        result = onnx.ModelProto()
        result.CopyFrom(model)
        for init in result.graph.initializer:
            if init.name in replaced:
                init.CopyFrom(numpy_helper.from_array(replaced[init.name], init.name))
        return result

    keep_plot = KeepPlot("weight bits per layer", "bits", "bits",
                         "Weight bits per layer (grey: float32; blue: planned bits).")
    numeric_columns = ("bits",)

    def view(self, entry: QuantEntry, rewritten: dict | None) -> EntryView:
        """Bits (float where the layer stays as it is), container, granularity and activations."""
        bits = entry.bits if rewritten else None
        cells = {"bits": "float" if bits is None else str(bits),
                 "container": entry.container if rewritten else "-",
                 "granularity": (f"block {entry.block_size}" if entry.granularity == "block" else "per channel")
                 if rewritten else "-",
                 "activations": entry.activations}
        return EntryView(cells, bits, FLOAT_BITS, "float" if bits is None else f"{bits}b")

    def check_key(self, check: dict) -> Any:
        return check.get("bits")

    def check_label(self, check: dict) -> str:
        return f"{check['bits']}b"


QUANT = Quant()
