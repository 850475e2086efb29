"""Quantization planners: the options a user picks, and the uniform plan (every eligible layer alike).

Loss-aware per-layer choices (METHOD.md sections 8-10: predicted loss change of each option from the
first-order and K-FAC statistics, a grouped knapsack over bits, verification on validation) are not
built yet.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx

from ...errors import OnnxlrfError
from ...graph.quantizable import BLOCK_OPS, find_quantizable
from ...planning.plan import QUANT_BITS, ROUNDINGS, Plan, QuantEntry
from .calibration import CALIBRATION_METHODS
from .rewrite import RUNTIMES

ACTIVATION_CHOICES = ("none", "int8")
# The largest value an int4 container holds; fewer bits than this are packed into int4 too.
INT4_BITS = 4
# W8A8 in onnxruntime's form keeps weights on 7 bits (its quantizer's reduce_range): on x86 CPUs without VNNI
# its u8 x s8 kernels add pairs of products in int16, which 8-bit weights overflow (measured on ResNet-56:
# 1.3 points of top-1 lost to it, none with 7-bit weights).
ONNXRUNTIME_W8A8_BITS = 7


@dataclass(frozen=True)
class QuantOptions:
    """``bits``: weight bits of every quantized layer (uniform plans; None: the loss-aware planner chooses per
    layer); ``activations``: ``int8`` quantizes their inputs too
    (W8A8, with 8-bit weights); ``runtime``: the Q/DQ form (``onnxruntime`` or ``tensorrt``);
    ``calibration_method``: onnxruntime's calibrator for activation ranges; ``block_size``: Gemm/MatMul
    weights get one scale per block of this many inputs (INT4 weight-only) instead of per output channel;
    ``rounding``: the loss-aware planner's (None: ``loss-aware``; uniform plans round to nearest)."""

    bits: int | None = None
    activations: str = "none"
    runtime: str = "onnxruntime"
    calibration_method: str = "minmax"
    block_size: int | None = None
    rounding: str | None = None

    def __post_init__(self) -> None:
        if self.bits is not None and (not isinstance(self.bits, int) or self.bits not in QUANT_BITS):
            raise OnnxlrfError(f"--bits must be one of {', '.join(map(str, QUANT_BITS))}, got {self.bits!r}")
        for flag, value, known in (("--activations", self.activations, ACTIVATION_CHOICES),
                                   ("--runtime", self.runtime, RUNTIMES),
                                   ("--calibration-method", self.calibration_method, CALIBRATION_METHODS)):
            if value not in known:
                raise OnnxlrfError(f"{flag} must be one of {', '.join(known)}, got {value!r}")
        if self.rounding not in (None,) + ROUNDINGS:
            raise OnnxlrfError(f"--rounding must be one of {', '.join(ROUNDINGS)}, got {self.rounding!r}")
        if self.activations == "int8" and self.bits not in (None, 8):
            raise OnnxlrfError(f"--activations int8 goes with --bits 8 (W8A8), not --bits {self.bits}")
        if self.block_size is not None:
            if (self.bits is not None and self.bits > INT4_BITS) or self.activations != "none":
                raise OnnxlrfError("--block-size is for weight-only int4 (--bits 4 or fewer, --activations none)")
            if not isinstance(self.block_size, int) or self.block_size < 2:
                raise OnnxlrfError(f"--block-size must be an integer >= 2, got {self.block_size!r}")


def plan_uniform_quant(model: onnx.ModelProto, options: QuantOptions) -> Plan:
    """Every quantizable layer at ``options.bits`` (int4 container up to 4 bits, else int8), per output channel
    or, for Gemm/MatMul with ``options.block_size``, per block; absmax scales, round to nearest. W8A8 in
    onnxruntime's form has 7-bit weights (:data:`ONNXRUNTIME_W8A8_BITS`).

    With int8 activations the plan still needs its activation ranges (:func:`calibration.calibrate_plan`).
    """
    if options.bits is None:
        raise OnnxlrfError("mode uniform needs --bits")
    layers = find_quantizable(model)[0]
    weight_bits = ONNXRUNTIME_W8A8_BITS if options.runtime == "onnxruntime" and options.activations == "int8" \
        else options.bits
    if not layers:
        raise OnnxlrfError("the model has no quantizable Conv/Gemm/MatMul layer (constant float32 weight)")
    entries = []
    for layer in layers:
        block = options.block_size if options.block_size is not None and layer.op_type in BLOCK_OPS else None
        entries.append(QuantEntry(
            node=layer.node, op_type=layer.op_type, weight=layer.weight, weight_shape=list(layer.weight_shape),
            bits=weight_bits, granularity="block" if block else "per_channel", block_size=block,
            container="int4" if weight_bits <= INT4_BITS else "int8",
            activations="int8" if options.activations == "int8" else "float",
            weight_scales="absmax", rounding="nearest", params_dense=layer.elements, params_planned=layer.elements))
    return Plan(entries, "uniform", {"technique": QuantEntry.technique, "bits": options.bits,
                                     "activations": options.activations, "runtime": options.runtime,
                                     "calibration_method": options.calibration_method,
                                     "block_size": options.block_size})
