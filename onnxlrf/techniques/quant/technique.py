"""Quantization as a :class:`~onnxlrf.techniques.base.Technique`: the joint planner and the back-off take
it as they take low-rank (weight-only options per layer, :mod:`~onnxlrf.techniques.quant.candidates`), and
the rewrite is the QDQ pass in the form the plan names."""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any, Hashable

import onnx
from onnx import numpy_helper

from ...graph.layers import Layer, find_layers, weight_groups
from ...graph.quantizable import BLOCK_OPS, find_quantizable
from ...errors import OnnxlrfError
from ...measure.analysis import AnalysisOptions, joint_analysis
from ...planning.plan import ROUNDINGS, Plan, QuantEntry
from ...progress import ProgressLike
from ..base import Candidates, EntryView, KeepPlot, RewriteReport
from .candidates import PLANNED_BITS, float_entry, measure_options, quant_candidates, quant_entries
from .planners import uniform_entry
from .grid import int8_scale, uint8_params
from .rewrite import RUNTIMES, QDQRewrite, planned_weights, quantized_activations
from .sequential import sequential_rounding

FLOAT_BITS = 32


class Quant:
    """Per layer: weight bits, granularity and container, and whether its input activations are int8 too."""

    name = QuantEntry.technique
    improves_every_plan = True  # the sequential rounding only brings each layer closer to its float output
    improvement = "rounded sequentially"

    def __init__(self, rounding: str = "loss-aware", runtime: str = "onnxruntime",
                 activation_ranges: dict[str, list[float]] | None = None, int8_weight_bits: int = 8,
                 block_size: int | None = None, predictor: str = "kfac",
                 bits_offered: tuple[int, ...] = PLANNED_BITS) -> None:
        """``activation_ranges``: calibrated ranges of every activation a plan may quantize (None: weight-only
        options); with them every option quantizes the layer's input to int8 as well, in ``runtime``'s form,
        and the 8-bit option has ``int8_weight_bits`` (7: onnxruntime's reduced range). ``block_size``
        (weight-only): Gemm/MatMul layers are also offered int4-and-fewer options with one scale per this
        many inputs. ``predictor``: how options' loss changes are predicted (:data:`~.planners.PREDICTORS`).
        ``bits_offered``: the weight bits each layer is offered (some of :data:`~.candidates.PLANNED_BITS`)."""
        if rounding not in ROUNDINGS:
            raise OnnxlrfError(f"--rounding must be one of {', '.join(ROUNDINGS)}, got {rounding!r}")
        if runtime not in RUNTIMES:
            raise OnnxlrfError(f"unknown runtime {runtime!r}; known: {', '.join(RUNTIMES)}")
        if block_size is not None and activation_ranges is not None:
            raise OnnxlrfError("block scales are weight-only: --block-size goes without --activations int8")
        self.rounding, self.runtime, self.activation_ranges = rounding, runtime, activation_ranges
        if not bits_offered or not set(bits_offered) <= set(PLANNED_BITS):
            raise OnnxlrfError(f"bits offered must be some of {', '.join(map(str, PLANNED_BITS))}, "
                               f"got {bits_offered!r}")
        self.block_size, self.predictor, self.bits_offered = block_size, predictor, tuple(bits_offered)
        self.int8_weight_bits = int8_weight_bits if activation_ranges is not None else 8
        self._grids: dict = {}  # loss-aware grids of the last analysis, reused across kappas
        self._grids_of: int | None = None
        self.checks: dict[str, list[dict]] | None = None  # each option measured alone (set by analyse)

    def input_steps(self) -> dict[str, float] | None:
        """The int8 grid step of each calibrated activation in the runtime's form (None: weight-only)."""
        if self.activation_ranges is None:
            return None
        if self.runtime == "onnxruntime":
            return {name: float(uint8_params(*bounds)[0]) for name, bounds in self.activation_ranges.items()}
        return {name: float(int8_scale(*bounds)) for name, bounds in self.activation_ranges.items()}

    def with_ranges(self, model: onnx.ModelProto, plan: Plan) -> Plan:
        """``plan`` with the calibrated ranges of the activations its int8 layers quantize."""
        if self.activation_ranges is None:
            return plan
        sites = quantized_activations(model, plan, self.runtime)
        return dataclasses.replace(plan, activation_ranges={site.tensor: self.activation_ranges[site.tensor]
                                                            for site in sites})

    def ineligible(self, model: onnx.ModelProto) -> dict[str, str]:
        return {skipped.node: skipped.reason for skipped in find_quantizable(model)[1]}

    def analyse(self, model: onnx.ModelProto, calib: Any, options: AnalysisOptions,
                progress: ProgressLike = None) -> Any:
        """The joint analysis low-rank uses (gradients, K-FAC factors, measured ranges; the same statistics
        predict a quantization error), then each layer's options measured alone on the range checks'
        calibration samples (:func:`~.candidates.measure_options`), which decide the options offered."""
        analysis = joint_analysis(model, calib, options, progress)
        self._grids, self._grids_of = {}, id(analysis)
        self.checks = measure_options(model, analysis, calib, options.range_samples, self.rounding, self._grids,
                                      self.int8_weight_bits, self.block_size, progress, self.predictor,
                                      self.bits_offered)
        return analysis

    def candidates(self, model: onnx.ModelProto, analysis: Any, kappa: float, cost: Any,
                   **options: Any) -> list[Candidates]:
        """Each weight group's options the checks trust, weight-only or with int8 inputs (``options``: the low-rank
        planner's, which do not apply)."""
        if self._grids_of != id(analysis):
            self._grids, self._grids_of = {}, id(analysis)
        return quant_candidates(model, analysis, kappa, cost, self.rounding, self._grids, self.input_steps(),
                                self.int8_weight_bits, self.checks, self.block_size, self.predictor, self.runtime,
                                self.bits_offered)

    def entries(self, model: onnx.ModelProto, analysis: Any, group: Candidates, option: int, kappa: float,
                cost: Any) -> tuple[list[QuantEntry], dict]:
        """:func:`~.candidates.quant_entries`; under a latency target each entry also notes its layer's time float
        and as planned (ms, as the report shows low-rank's)."""
        entries, grid = quant_entries(group, option)
        if cost.target == "latency":
            for entry, layer in zip(entries, group.layers):
                entry.notes.update(latency_ms_dense=round(cost.dense([layer]), 6),
                                   latency_ms_planned=round(entry.planned_cost(cost, [layer]), 6))
        return entries, grid

    def unplanned_entry(self, model: onnx.ModelProto, layer: Layer, analysis: Any, cost: Any) -> QuantEntry:
        return float_entry(layer)

    def plan_options(self, analysis: Any, **options: Any) -> dict:
        return {"technique": self.name, "runtime": self.runtime, "bits_offered": list(self.bits_offered),
                "rounding": self.rounding, "activations": "none" if self.activation_ranges is None else "int8",
                **({"predictor": self.predictor} if self.predictor != "kfac" else {}),
                **({"block_size": self.block_size} if self.block_size is not None else {})}

    def signature(self, plan: Plan, analysis: Any, kappa: float) -> Hashable:
        """The bits and rounding of every quantized layer, and the bytes of its stored levels and scales (a loss-aware
        grid moves with kappa where first-order terms shift its target)."""
        def stored(entry: QuantEntry) -> str:
            if not entry.stores_grid:
                return ""
            return hashlib.sha256(b"".join(array.tobytes() for array in plan.bases[entry.weight])).hexdigest()
        return tuple((entry.node, entry.bits, entry.rounding, stored(entry)) for entry in plan.layers if entry.changed)

    def improve(self, model: onnx.ModelProto, plan: Plan, calib: Any, progress: ProgressLike = None) -> Plan | None:
        """The plan's layers rounded again in graph order on the inputs the quantized model gives them
        (:func:`~.sequential.sequential_rounding`); None where no layer can be."""
        return sequential_rounding(model, self.with_ranges(model, plan), calib, self.runtime, progress=progress)

    def uniform_plans(self, model: onnx.ModelProto, analysis: Any) -> list[Plan]:
        """Every layer the analysis covers at one width of :attr:`bits_offered`, most bits first, as ``--mode uniform
        --bits B`` quantizes it (per channel, absmax scales, rounded to nearest; with int8 inputs where the technique
        has them, the levels in int8; with :attr:`block_size`, Gemm/MatMul weights in blocks, as ``--block-size``
        writes them); a weight group that must stay float (:func:`~onnxlrf.graph.layers.weight_groups`) stays float,
        as in the knapsack."""
        every = find_layers(model)[0]
        quantizable = {layer.node for layer in find_quantizable(model)[0]}
        groups, shared = weight_groups(model, [layer for layer in every
                                               if layer.node in analysis.layers and layer.node in quantizable])
        planned = [layer for members in groups if shared.get(members[0].weight) is None for layer in members]
        int8_inputs = self.activation_ranges is not None
        plans = []
        for bits in sorted(self.bits_offered, reverse=True):
            weight_bits = self.int8_weight_bits if bits == 8 and int8_inputs else bits
            quantized = {layer.node: uniform_entry(layer, weight_bits, layer.params, int8_inputs, self.runtime,
                                                   self.block_size if layer.op_type in BLOCK_OPS else None)
                         for layer in planned}
            entries = [quantized.get(layer.node) or float_entry(layer) for layer in every]
            plans.append(Plan(entries, "lossless", {"baseline": f"uniform {weight_bits} bits", "runtime": self.runtime,
                                                    **self.plan_options(analysis)}))
        return plans

    def rewrite(self, model: onnx.ModelProto, plan: Plan, progress: ProgressLike = None
                ) -> tuple[onnx.ModelProto, RewriteReport]:
        """:class:`~onnxlrf.techniques.quant.rewrite.QDQRewrite` in the form the plan names (``options["runtime"]``)."""
        if not plan.activation_ranges:
            plan = self.with_ranges(model, plan)
        return QDQRewrite(plan.options.get("runtime", "onnxruntime"))(model, plan, progress)

    def perturbed_weights(self, model: onnx.ModelProto, plan: Plan) -> onnx.ModelProto:
        """The float graph with each planned weight replaced by its dequantized grid values."""
        replaced = planned_weights(model, plan)
        result = onnx.ModelProto()
        result.CopyFrom(model)
        for init in result.graph.initializer:
            if init.name in replaced:
                init.CopyFrom(numpy_helper.from_array(replaced[init.name], init.name))
        return result

    keep_plot = KeepPlot("weight bits per layer", "bits", "bits",
                         "Weight bits per layer (grey: float32; blue: planned bits).")
    numeric_columns = ("bits",)
    table_note = ("bits: logical weight bits (float: not quantized); container: the integer type that stores them "
                  "(int4 packs two a byte); activations int8: the layer's input is quantized too; input smoothed: its "
                  "channels divided by s and the weight's rows multiplied by s first (SmoothQuant). predicted dloss: "
                  "the planner's predicted change of the calibration loss from this layer's quantization alone "
                  "(weights as rounded, plus its input's rounding noise), at the plan's kappa. Single-layer "
                  "checks: each option measured with only its layer quantized; a layer is offered its options "
                  "from the most bits down while prediction and measurement agree.")

    def view(self, entry: QuantEntry, rewritten: dict | None) -> EntryView:
        """Bits (float where the layer stays as it is), container, granularity and activations."""
        bits = entry.bits if rewritten else None
        cells = {"bits": "float" if bits is None else str(bits),
                 "container": entry.container if rewritten else "-",
                 "granularity": (f"block {entry.block_size}" if entry.granularity == "block" else "per channel")
                 if rewritten else "-",
                 "activations": entry.activations}
        if rewritten and rewritten.get("smoothing_alpha") is not None:
            cells["input smoothed, alpha"] = str(rewritten["smoothing_alpha"])
        return EntryView(cells, bits, FLOAT_BITS, "float" if bits is None else f"{bits}b")

    def check_key(self, check: dict) -> Any:
        return check.get("bits")

    def check_label(self, check: dict) -> str:
        return f"{check['bits']}b"


QUANT = Quant()
