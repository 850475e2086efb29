"""The cost protocol, the parameter and byte costs, and choosing a cost model by target.

What planners minimize besides the loss. Every cost model answers ``total()`` for the whole
model, ``dense(layers)`` and ``factorized(layers, decomposition, rank)`` for the nodes sharing one
weight, ``notes(layer, decomposition, rank)`` for the plan, ``describe()`` for the plan's options,
and has ``target`` and ``resolution`` (costs times it are compared as integers).
"""

from __future__ import annotations

from typing import Any

import onnx

from ..errors import OnnxlrfError
from ..graph.layers import Layer, count_params, find_layers
from .flops import FlopsCost

# What planners minimize besides the loss: whole-model ``target_reduction`` is a fraction of this.
TARGETS = ("params", "flops", "latency", "bytes", "bits")
FLOAT32_BITS = 32
FLOAT32_BYTES = 4


class ParamsCost:
    """Cost in parameters, the default target (a weight shared by several nodes counts once).

    See the module's docstring for the protocol it shares with :class:`~onnxlrf.costs.flops.FlopsCost`
    and :class:`~onnxlrf.costs.latency.LatencyCost`.
    """

    target = "params"
    resolution = 1.0
    per_param = 1  # what one float32 parameter costs (subclasses: bytes, bits)

    def __init__(self, model: onnx.ModelProto) -> None:
        self._total = count_params(model)

    def total(self) -> float:
        return float(self.per_param * self._total)

    def dense(self, layers: list[Layer]) -> float:
        return float(self.per_param * layers[0].params)

    def factorized(self, layers: list[Layer], decomposition: str, rank: int) -> float:
        return float(self.per_param * layers[0].factorized_params(decomposition, rank))

    def notes(self, layer: Layer, decomposition: str | None, rank: int | None) -> dict:
        return {}

    def describe(self) -> dict:
        return {}


class BytesCost(ParamsCost):
    """Cost in bytes of the weights as stored: float32 parameters 4 bytes each; a quantized layer its integer
    container (int4 packs two per byte) plus a float32 scale and a zero point (same container) per scale."""

    target = "bytes"
    per_param = FLOAT32_BYTES

    def quantized(self, layers: list[Layer], bits: int, container_bits: int, scales: int,
                  int8_inputs: bool = False) -> float:
        """``layers``' weight in ``container_bits``-bit integers with ``scales`` scales and zero points (``bits``,
        the logical bits, and whether the inputs are int8 too do not change what the file stores)."""
        return float(-(-layers[0].params * container_bits // 8) + FLOAT32_BYTES * scales
                     - (-scales * container_bits // 8))


class BitsCost(ParamsCost):
    """Cost in logical weight bits of the Conv/ConvTranspose/Gemm/MatMul layers, the sum behind
    ``average_weight_bits``: float32 counts 32 bits an element, a quantized layer its planned bits (a 3-bit
    weight counts 3 though its container holds 4 or 8); scales and biases are not counted."""

    target = "bits"
    per_param = FLOAT32_BITS

    def __init__(self, model: onnx.ModelProto) -> None:
        self._total = sum({layer.weight: layer.params for layer in find_layers(model)[0]}.values())

    def quantized(self, layers: list[Layer], bits: int, container_bits: int, scales: int,
                  int8_inputs: bool = False) -> float:
        return float(bits * layers[0].params)


def cost_model(model: onnx.ModelProto, target: str = "params", cost: Any = None) -> Any:
    """``cost`` when given (it must be for ``target``), else the cost model for ``target``.

    FLOPs are for batch 1 when not given. Latency is measured, so it must be given
    (:func:`onnxlrf.costs.latency.make_cost` measures it).
    """
    if target not in TARGETS:
        raise OnnxlrfError(f"unknown target {target!r}; known: {', '.join(TARGETS)}")
    if cost is not None:
        if cost.target != target:
            raise OnnxlrfError(f"the cost model is for target {cost.target!r}, not {target!r}")
        return cost
    if target == "params":
        return ParamsCost(model)
    if target == "flops":
        return FlopsCost(model)
    if target == "bytes":
        return BytesCost(model)
    if target == "bits":
        return BitsCost(model)
    raise OnnxlrfError("target 'latency' needs a measured cost model: onnxlrf.costs.latency.make_cost(model, "
                       "'latency', ...)")


def cost_units(cost: Any, value: float) -> int:
    """``value`` in the integer units the knapsack compares (``cost.resolution`` per unit of the target)."""
    return int(round(value * cost.resolution))
