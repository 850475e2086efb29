"""Quantization planners: the options a user picks, and the uniform plan (every eligible layer alike).

Loss-aware per-layer choices (METHOD.md sections 8-10: predicted loss change of each option from the
first-order and K-FAC statistics, a grouped knapsack over bits, verification on validation) are not
built yet.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx

from ...errors import OnnxlrfError
from ...graph.quantizable import BLOCK_OPS, find_quantizable
from ...planning.plan import ENTRY_ROUNDINGS, QUANT_BITS, Plan, QuantEntry
from .calibration import CALIBRATION_METHODS
from .rewrite import RUNTIMES
from .smoothing import SMOOTHINGS

# How the loss-aware planner predicts an option's loss change: ``kfac``, the total differential with the
# Kronecker-factored curvature (METHOD.md 8); ``hessian-trace``, HAWQ-v2's estimate, the layer's mean Hessian
# diagonal (here the K-FAC trace tr(B) tr(A) over its weight count) times ||dW||^2 / 2: a baseline that
# sees how large a perturbation is, not where it lies.
PREDICTORS = ("kfac", "hessian-trace")

ACTIVATION_CHOICES = ("none", "int8")
# The largest value an int4 container holds; fewer bits than this are packed into int4 too.
INT4_BITS = 4
# W8A8 in onnxruntime's form with a reduced range keeps weights on 7 bits (its quantizer's reduce_range): on x86
# CPUs without VNNI its u8 x s8 kernels add pairs of products in int16, which 8-bit weights overflow (measured on
# ResNet-56: 1.3 points of top-1 lost to it, none with 7-bit weights). With VNNI (or on ARM) products add in
# int32, and 8-bit weights are exact, but on split seeds 1-5 they were not more accurate (W8A8 mean held-out
# change with 7 / 8 bits: ResNet-20 -0.0010 / +0.0013, ResNet-56 +0.0003 / -0.0008, MiniLM -0.0025 / worse on
# each seed run), so 7 bits, which any x86 CPU runs exactly, stay the default.
ONNXRUNTIME_W8A8_BITS = 7
REDUCE_RANGE_CHOICES = ("auto", "on", "off")


def weight_container(bits: int, runtime: str, block_size: int | None = None) -> str:
    """The integer type that stores ``bits``-bit weight levels: int4 (two per byte) up to :data:`INT4_BITS`, else
    int8. In the TensorRT form int4 only with block scales: TensorRT takes INT4 weights only as weight-only
    MatMul/Gemm with block scales, so its per-channel levels of 4 bits or fewer live in int8."""
    if bits > INT4_BITS or (runtime == "tensorrt" and block_size is None):
        return "int8"
    return "int4"


def cpu_sums_in_int32() -> bool:
    """Whether this machine's onnxruntime u8 x s8 kernels add products in int32: an x86 CPU with VNNI
    (AVX512-VNNI or AVX-VNNI, read from /proc/cpuinfo), or an ARM CPU. Unknown (another OS): False."""
    if platform.machine().lower() in ("aarch64", "arm64"):
        return True
    try:
        flags = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return False
    return any(flag in flags.split() for flag in ("avx512_vnni", "avx_vnni"))


def reduces_range(options: "QuantOptions") -> bool:
    """Whether W8A8 weights keep 7 bits: onnxruntime's form only; ``auto``: where this machine's kernels would
    overflow 8-bit weights (:func:`cpu_sums_in_int32`), since the held-out figures are measured here."""
    if options.runtime != "onnxruntime":
        return False
    if options.reduce_range == "auto":
        return not cpu_sums_in_int32()
    return options.reduce_range == "on"


def w8a8_weight_bits(options: "QuantOptions") -> int:
    """Weight bits of a layer whose inputs are int8 too, at 8 bits: 7 where the range is reduced."""
    return ONNXRUNTIME_W8A8_BITS if reduces_range(options) else 8


@dataclass(frozen=True)
class QuantOptions:
    """``bits``: weight bits of every quantized layer (uniform plans; None: the loss-aware planner chooses per
    layer); ``activations``: ``int8`` quantizes their inputs too
    (W8A8 at 8 bits; below, W4A8 and the like: the weights' levels in int8, which the integer kernels read);
    ``runtime``: the Q/DQ form (``onnxruntime`` or ``tensorrt``);
    ``calibration_method``: onnxruntime's calibrator for activation ranges; ``block_size``: Gemm/MatMul
    weights get one scale per block of this many inputs (INT4 weight-only) instead of per output channel;
    ``rounding``: the loss-aware planner's (None: ``loss-aware``), or for uniform plans ``nearest`` (None) or
    ``sequential`` (each layer rounded again in graph order on the calibration split,
    :func:`~.sequential.sequential_rounding`);
    ``reduce_range``: W8A8 weights on 7 bits in onnxruntime's form (``on``, ``off``, or ``auto``: where this
    machine's kernels need it, :func:`reduces_range`); ``predictor``: how the loss-aware planner predicts each
    option's loss change (:data:`PREDICTORS`); ``smoothing``: ``auto`` searches a smoothing of each W8A8 Gemm/MatMul
    input of a uniform plan on the calibration split (:func:`~.calibration.search_smoothing`), ``on`` of every
    Gemm/MatMul input with int8 activations (W4A8 too), ``off`` none (:data:`~.smoothing.SMOOTHINGS`)."""

    bits: int | None = None
    activations: str = "none"
    runtime: str = "onnxruntime"
    calibration_method: str = "minmax"
    block_size: int | None = None
    rounding: str | None = None
    reduce_range: str = "on"
    predictor: str = "kfac"
    smoothing: str = "auto"

    def __post_init__(self) -> None:
        if self.bits is not None and (not isinstance(self.bits, int) or self.bits not in QUANT_BITS):
            raise OnnxlrfError(f"--bits must be one of {', '.join(map(str, QUANT_BITS))}, got {self.bits!r}")
        for flag, value, known in (("--activations", self.activations, ACTIVATION_CHOICES),
                                   ("--reduce-range", self.reduce_range, REDUCE_RANGE_CHOICES),
                                   ("--runtime", self.runtime, RUNTIMES),
                                   ("--calibration-method", self.calibration_method, CALIBRATION_METHODS),
                                   ("--predictor", self.predictor, PREDICTORS),
                                   ("--smoothing", self.smoothing, SMOOTHINGS)):
            if value not in known:
                raise OnnxlrfError(f"{flag} must be one of {', '.join(known)}, got {value!r}")
        if self.rounding not in (None,) + ENTRY_ROUNDINGS:
            raise OnnxlrfError(f"--rounding must be one of {', '.join(ENTRY_ROUNDINGS)}, got {self.rounding!r}")
        if self.block_size is not None:
            if (self.bits is not None and self.bits > INT4_BITS) or self.activations != "none":
                raise OnnxlrfError("--block-size is for weight-only int4 (--bits 4 or fewer, --activations none)")
            if not isinstance(self.block_size, int) or self.block_size < 2:
                raise OnnxlrfError(f"--block-size must be an integer >= 2, got {self.block_size!r}")


def uniform_entry(layer: Any, bits: int, params: int, int8_inputs: bool, runtime: str,
                  block_size: int | None = None) -> QuantEntry:
    """``layer`` (a :class:`~onnxlrf.graph.layers.Layer` or quantizable layer) at ``bits`` as a uniform plan
    quantizes it: absmax scales per output channel (or per block of ``block_size`` inputs), rounded to nearest,
    in ``runtime``'s container (:func:`weight_container`; int8 with ``int8_inputs``, which the integer kernels read)."""
    return QuantEntry(
        node=layer.node, op_type=layer.op_type, weight=layer.weight, weight_shape=list(layer.weight_shape),
        bits=bits, granularity="block" if block_size else "per_channel", block_size=block_size,
        container="int8" if int8_inputs else weight_container(bits, runtime, block_size),
        activations="int8" if int8_inputs else "float",
        weight_scales="absmax", rounding="nearest", params_dense=params, params_planned=params)


def plan_uniform_quant(model: onnx.ModelProto, options: QuantOptions) -> Plan:
    """Every quantizable layer at ``options.bits`` (in :func:`weight_container`'s integer type; int8 with int8
    inputs), per output channel or, for Gemm/MatMul with ``options.block_size``, per block; absmax scales, round
    to nearest. W8A8 in onnxruntime's form has 7-bit weights where the range is reduced (:func:`reduces_range`).

    With int8 activations the plan still needs its activation ranges (:func:`calibration.calibrate_plan`).
    """
    if options.bits is None:
        raise OnnxlrfError("mode uniform needs --bits")
    layers = find_quantizable(model)[0]
    int8_inputs = options.activations == "int8"
    weight_bits = min(options.bits, w8a8_weight_bits(options)) if int8_inputs else options.bits
    if not layers:
        raise OnnxlrfError("the model has no quantizable Conv/Gemm/MatMul layer (constant float32 weight)")
    entries = [uniform_entry(layer, weight_bits, layer.elements, int8_inputs, options.runtime,
                             options.block_size if options.block_size is not None and layer.op_type in BLOCK_OPS
                             else None) for layer in layers]
    return Plan(entries, "uniform", {"technique": QuantEntry.technique, "bits": options.bits,
                                     "activations": options.activations, "runtime": options.runtime,
                                     "calibration_method": options.calibration_method,
                                     "block_size": options.block_size,
                                     "reduce_range": reduces_range(options) if options.activations == "int8"
                                     else None})
