"""The QDQ rewrite: a quantization plan as QuantizeLinear/DequantizeLinear nodes, in one of two forms.

Weights become integer initializers (int8, or int4 packed two per byte) read through a
DequantizeLinear with per-channel (or per-block) scales and zero point 0. Layers with int8 activations
get Q/DQ on their activations too, in the form a runtime turns into integer kernels:

* ``onnxruntime`` (what its CPU provider fuses into QLinearConv/QGemm/QLinearMatMul/QLinearAdd):
  uint8 activations with the calibrated range (zero point as needed), one QuantizeLinear after each
  quantized tensor's producer and a DequantizeLinear of its own for every consumer (a shared
  DequantizeLinear keeps the consumers from fusing). Quantized are the inputs and outputs of the W8A8
  layers and of residual Adds fed by one; a Relu that is the only reader of such an output is folded
  into the QuantizeLinear (uint8 with zero point 0 clips at 0, exactly what the Relu did), as
  onnxruntime's quantizer does. Biases become int32 at scale input scale x weight scale.
  A weight-only layer with per-channel scales reads its weight as ``Mul(Cast(levels), scales)``
  instead, the same float values: onnxruntime leaves a DequantizeLinear in the graph for its QDQ
  fusions, and its CPU provider has no weight-only Conv or per-channel MatMul kernel, so a Conv behind
  one ran every call on a weight computed anew (ResNet-56 at 4 bits: 0.58x the fp32 speed); a constant
  Cast and Mul it folds to the float weight when the session loads (0.98x). Its int4 levels are stored
  two per byte (low nibble first) and unpacked by a Gather from the table of each byte's two levels, also
  folded at load, so such a model keeps its opset: raised to 21 for int4 tensors, MiniLM ran 0.94x,
  because at opset 21 onnxruntime fuses Add+LayerNormalization into its slower SkipLayerNormalization.
  Block scales keep their DequantizeLinear (MatMulNBits runs them with the weight in 4 bits).
* ``tensorrt`` (what TensorRT's explicit quantization takes): symmetric int8 everywhere (zero points
  0), Q/DQ only on the inputs of the W8A8 layers and on the skip input of residual Adds fed by one;
  float biases; TensorRT fuses the rest itself. Weight-only layers keep their DequantizeLinear; int4 only
  with block scales (TensorRT's weight-only INT4 on MatMul/Gemm), so per-channel levels of 4 bits or fewer
  live in int8 there.

Smoothed inputs (``plan.smoothing``, :mod:`.smoothing`) are applied first: their readers read ``Mul(x, 1/s)``,
which is what gets quantized, and store ``s * W``.

int4 DequantizeLinear and block scales need opset 21 (the model's opset is raised, or the rewrite says why
it cannot be). Graph inputs and outputs keep their names, types and shapes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import ml_dtypes
import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import numpy_helper, version_converter

from ...errors import OnnxlrfError, first_line
from ...graph.layers import constant_producers, dequantized_weights
from ...graph.quantizable import QuantLayer, find_quantizable
from ...onnx_io import copy_model, default_opset, keep_model_fields, unique_name
from ...planning.plan import Plan, QuantEntry, validate_plan
from ...progress import ProgressLike, as_progress
from ..base import RewritePass, RewriteReport
from .grid import (dequantize_blocks, dequantize_per_channel, int8_scale, quantize_blocks, quantize_per_channel,
                   uint8_params)
from .smoothing import apply_smoothing, check_smoothing, smoothing_groups

RUNTIMES = ("onnxruntime", "tensorrt")
# Per-channel QuantizeLinear/DequantizeLinear (their axis) came with opset 13; int4 tensors and
# DequantizeLinear's block_size with opset 21 (and IR version 10).
PER_CHANNEL_OPSET = 13
INT4_OPSET, INT4_IR_VERSION = 21, 10
# The per-channel axis TensorRT takes for a layer's weight (output channels); Gemm follows its transB.
WEIGHT_AXES = {"Conv": 0, "MatMul": 1}
# Each byte's two int4 levels (low nibble first, two's complement): the table onnxruntime's form unpacks
# packed levels with.
INT4_PAIRS = np.array([[((byte & 15) ^ 8) - 8, ((byte >> 4) ^ 8) - 8] for byte in range(256)], dtype=np.int8)


def pack_int4_pairs(levels: np.ndarray) -> np.ndarray:
    """int4 ``levels`` (-8..7) in C order, two per uint8, the first in the low nibble (how ONNX packs int4); an
    odd count ends with a zero level."""
    flat = levels.reshape(-1).astype(np.int64) & 15
    if flat.size % 2:
        flat = np.append(flat, 0)
    return (flat[0::2] | (flat[1::2] << 4)).astype(np.uint8)


@dataclass
class ActivationSite:
    """One activation tensor that is quantized: ``tensor`` names its range (and its readers), ``source`` is
    the float tensor the QuantizeLinear reads (the producer's output, before a folded Relu)."""

    tensor: str
    source: str
    folded_relu: str | None = None
    readers: list[tuple[str, int]] = field(default_factory=list)  # (node, input index) that get a DQ


def quantized_activations(model: onnx.ModelProto, plan: Plan, runtime: str) -> list[ActivationSite]:
    """The activation tensors the rewrite quantizes for ``plan`` in ``runtime``'s form (see the module doc)."""
    if runtime not in RUNTIMES:
        raise OnnxlrfError(f"unknown runtime {runtime!r}; known: {', '.join(RUNTIMES)}")
    w8a8 = {entry.node for entry in plan.layers if isinstance(entry, QuantEntry) and entry.activations == "int8"}
    if not w8a8:
        return []
    nodes = list(model.graph.node)
    constants = constant_producers(model)
    producer = {out: node for node in nodes for out in node.output}
    readers: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
    for node in nodes:
        for index, name in enumerate(node.input):
            if name:
                readers.setdefault(name, []).append((node, index))
    outputs = {out.name for out in model.graph.output}
    by_name = {node.name: node for node in nodes}
    # Residual Adds: two activations, at least one written by a W8A8 layer.
    residual = [node for node in nodes if node.op_type == "Add" and len(node.input) == 2
                and not any(name in constants for name in node.input)
                and any(producer.get(name) is not None and producer[name].name in w8a8 for name in node.input)]
    sites: dict[str, ActivationSite] = {}

    def add(tensor: str, reader_filter: set[tuple[str, int]] | None = None) -> None:
        site = sites.get(tensor)
        if site is None:
            site = sites[tensor] = ActivationSite(tensor, tensor)
        for reader, index in readers.get(tensor, []):
            key = (reader.name, index)
            if (reader_filter is None or key in reader_filter) and key not in site.readers:
                site.readers.append(key)

    if runtime == "tensorrt":
        for name in sorted(w8a8):
            add(by_name[name].input[0], {(name, 0)})
        for node in residual:
            for index, name in enumerate(node.input):
                if producer.get(name) is None or producer[name].name not in w8a8:
                    add(name, {(node.name, index)})
        return list(sites.values())

    def folded(tensor: str) -> tuple[str, str | None]:
        """The tensor a quantized producer's output is quantized as: its Relu's output where a Relu is its
        only reader (and neither is a graph output), else itself."""
        reading = readers.get(tensor, [])
        if len(reading) == 1 and reading[0][0].op_type == "Relu" and tensor not in outputs \
                and reading[0][0].output[0] not in outputs:
            return reading[0][0].output[0], reading[0][0].name
        return tensor, None

    quantizing = [by_name[name] for name in sorted(w8a8)] + residual
    relu_source: dict[str, tuple[str, str]] = {}  # folded Relu output -> (producer output, Relu node)
    for node in quantizing:
        tensor, relu = folded(node.output[0])
        if relu is not None:
            relu_source[tensor] = (node.output[0], relu)
    quantized_readers = w8a8 | {node.name for node in residual}
    for node in quantizing:
        inputs = [node.input[0]] if node.name in w8a8 else list(node.input)
        output = folded(node.output[0])[0]
        # A graph output stays float: onnxruntime's kernels (QGemm) then write float themselves. So does a
        # MatMul/Gemm output no quantized node reads (a transformer's projection, read by its bias Add):
        # MatMulIntegerToFloat/QGemm write float, and a uint8 grid over the whole output range (up to ~200
        # in MiniLM's feed-forward outputs) would round away what the residual stream carries.
        float_output = output in outputs or (node.op_type in ("MatMul", "Gemm") and not any(
            reader.name in quantized_readers for reader, _ in readers.get(output, [])))
        for tensor in inputs + ([] if float_output else [output]):
            add(tensor)
    for site in sites.values():
        if site.tensor in relu_source:
            site.source, site.folded_relu = relu_source[site.tensor]
        else:  # float readers keep the float tensor (a folded Relu's output exists only as its quantized form)
            site.readers = [(reader, index) for reader, index in site.readers if reader in quantized_readers]
    return list(sites.values())


def raise_opset(model: onnx.ModelProto, opset: int, why: str) -> onnx.ModelProto:
    """A copy of ``model`` at default-domain opset ``opset`` or more, or a one-line error that says ``why`` the
    rewrite needs it."""
    current = default_opset(model)
    if current >= opset:
        return copy_model(model)
    try:
        return version_converter.convert_version(model, opset)
    except Exception as exc:  # the converter raises RuntimeError/ConvertError with adapter names
        raise OnnxlrfError(f"{why} need opset {opset}, and the model's opset {current} cannot be raised to it "
                           f"({first_line(exc)})") from None


def weight_levels(entry: QuantEntry, layer: QuantLayer, weight: np.ndarray, plan: Plan
                  ) -> tuple[np.ndarray, np.ndarray, dict]:
    """The integer levels and scales of ``entry``'s weight, and DequantizeLinear's attributes: the plan's stored
    grid where the entry was rounded loss-aware or sequentially, else round to nearest on absmax scales (per channel
    or block)."""
    block = entry.granularity == "block"
    if entry.stores_grid:
        levels, scales = plan.bases[entry.weight]
    elif block:
        levels, scales = quantize_blocks(weight, layer.reduction_axis, entry.block_size, entry.bits)
    else:
        levels, scales = quantize_per_channel(weight, layer.channel_axis, entry.bits)
    attrs = {"axis": layer.reduction_axis, "block_size": entry.block_size} if block else {"axis": layer.channel_axis}
    return levels, scales, attrs


def planned_weights(model: onnx.ModelProto, plan: Plan) -> dict[str, np.ndarray]:
    """The float32 weight (stored layout) each quantized entry of ``plan`` stands for, by weight name: what its
    DequantizeLinear computes."""
    validate_plan(plan, model)
    layers = {layer.node: layer for layer in find_quantizable(model)[0]}
    constants = constant_producers(model)
    out = {}
    for entry in plan.layers:
        if not entry.changed:
            continue
        layer = layers[entry.node]
        levels, scales, attrs = weight_levels(entry, layer, numpy_helper.to_array(constants[layer.weight]), plan)
        out[layer.weight] = dequantize_blocks(levels, scales, attrs["axis"], attrs["block_size"]) \
            if "block_size" in attrs else dequantize_per_channel(levels, scales, attrs["axis"])
    return out


class QDQRewrite(RewritePass):
    """The quantization plan as Q/DQ nodes in ``runtime``'s form (see the module doc)."""

    name = "QDQ rewrite"

    def __init__(self, runtime: str = "onnxruntime") -> None:
        if runtime not in RUNTIMES:
            raise OnnxlrfError(f"unknown runtime {runtime!r}; known: {', '.join(RUNTIMES)}")
        self.runtime = runtime

    def requires(self, model: onnx.ModelProto, plan: Plan) -> None:
        other = [entry.node for entry in plan.layers if not isinstance(entry, QuantEntry)]
        if other:
            raise OnnxlrfError(f"{self.name}: plan node {other[0]!r} is not a quantization entry")
        validate_plan(plan, model)
        if self.runtime == "tensorrt":
            per_channel_int4 = [entry.node for entry in plan.layers
                                if entry.changed and entry.container == "int4" and entry.granularity != "block"]
            if per_channel_int4:
                raise OnnxlrfError(f"{self.name}: TensorRT takes int4 weights only with block scales (weight-only "
                                   f"MatMul/Gemm); {per_channel_int4[0]!r} has per-channel int4: store it in "
                                   f"int8 (the plan's container)")
        check_smoothing(model, plan)
        missing = [site.tensor for site in quantized_activations(apply_smoothing(model, plan), plan, self.runtime)
                   if site.tensor not in plan.activation_ranges]
        if missing:
            raise OnnxlrfError(f"{self.name}: the plan has no calibrated range for activation {missing[0]!r}")

    def call(self, model: onnx.ModelProto, plan: Plan, progress: ProgressLike = None
             ) -> tuple[onnx.ModelProto, RewriteReport]:
        changed = [entry for entry in plan.layers if entry.changed]
        if any(entry.container == "int4" and not self._reads_through_mul(entry) or entry.granularity == "block"
               for entry in changed):
            work = raise_opset(model, INT4_OPSET, "int4 weights (use 5 bits or more for int8 containers)")
            work.ir_version = max(work.ir_version, INT4_IR_VERSION)
        else:
            work = raise_opset(model, PER_CHANNEL_OPSET, "per-channel scales")
        alphas = {layer.node: plan.smoothing[tensor]["alpha"] for tensor, readers in smoothing_groups(work, plan).items()
                  if tensor in plan.smoothing for layer in readers}
        work = apply_smoothing(work, plan)
        layers = {layer.node: layer for layer in find_quantizable(work)[0]}
        sites = quantized_activations(work, plan, self.runtime)
        weights = {name: numpy_helper.to_array(tensor) for name, tensor in constant_producers(work).items()}
        graph = gs.import_onnx(work)
        nodes = {node.name: node for node in graph.nodes}
        tensors = graph.tensors()
        taken = set(tensors) | {node.name for node in graph.nodes}
        int4: dict[str, np.ndarray] = {}  # graphsurgeon writes no int4: these initializers are set after export
        shared: dict[str, gs.Constant] = {}  # constants all layers read (the int4 pair table)
        report = RewriteReport(params_before=sum(layer.elements for layer in layers.values()))
        report.params_after = report.params_before  # quantization keeps every weight, in fewer bits

        activation_scale: dict[str, np.float32] = {}
        for site in sites:
            low, high = plan.activation_ranges[site.tensor]
            if site.folded_relu is not None:
                low = 0.0  # the folded Relu's output: non-negative by definition
            activation_scale[site.tensor] = self._quantize_activation(graph, nodes, tensors, site, low, high, taken)

        for entry in as_progress(progress).track(plan.layers, "quantize", unit="layer"):
            if not entry.changed:
                report.kept_dense.append({"node": entry.node, "reason": "planned float"})
                continue
            layer, node = layers[entry.node], nodes[entry.node]
            new_nodes, weight_scales = self._quantize_weight(graph, node, layer, entry, plan, weights[layer.weight],
                                                             taken, int4, shared)
            # A computed bias, or one broadcast from another shape (Gemm's C), stays float: no scales line up.
            bias = weights.get(layer.bias)
            if entry.activations == "int8" and self.runtime == "onnxruntime" and bias is not None \
                    and bias.shape == weight_scales.shape:
                new_nodes.append(self._quantize_bias(graph, node, layer, weights, weight_scales,
                                                     activation_scale[layer.input], taken))
            report.rewritten.append({
                "node": entry.node, "op_type": layer.op_type, "bits": entry.bits, "container": entry.container,
                "granularity": entry.granularity, "activations": entry.activations,
                "smoothing_alpha": alphas.get(entry.node),
                "params_before": layer.elements, "params_after": layer.elements, "new_nodes": new_nodes,
            })
        graph.cleanup(remove_unused_graph_inputs=False).toposort()
        result = gs.export_onnx(graph, do_type_check=False)
        for init in result.graph.initializer:
            if init.name in int4:
                init.CopyFrom(numpy_helper.from_array(int4[init.name].astype(ml_dtypes.int4), init.name))
        keep_model_fields(work, result)
        return result, report

    def _quantize_activation(self, graph: gs.Graph, nodes: dict, tensors: dict, site: ActivationSite, low: float,
                             high: float, taken: set[str]) -> np.float32:
        """QuantizeLinear after ``site``'s producer and a DequantizeLinear per reader; the activation's scale."""
        if self.runtime == "onnxruntime":
            scale, zero = uint8_params(low, high)
        else:
            scale, zero = int8_scale(low, high), np.int8(0)
        tensor = site.tensor
        quantized = gs.Variable(unique_name(f"{tensor}/quantized", taken), dtype=zero.dtype)
        graph.nodes.append(gs.Node("QuantizeLinear", unique_name(f"{tensor}/QuantizeLinear", taken),
                                   inputs=[tensors[site.source], _constant(f"{tensor}/scale", scale, taken),
                                           _constant(f"{tensor}/zero_point", zero, taken)],
                                   outputs=[quantized]))
        if site.folded_relu is not None:
            relu = nodes[site.folded_relu]
            relu.inputs.clear()
            relu.outputs.clear()
        for reader, index in site.readers:
            dequantized = gs.Variable(unique_name(f"{tensor}/dq/{reader}", taken), dtype=np.float32)
            graph.nodes.append(gs.Node("DequantizeLinear", unique_name(f"{tensor}/DequantizeLinear/{reader}", taken),
                                       inputs=[quantized, _constant(f"{tensor}/scale", scale, taken),
                                               _constant(f"{tensor}/zero_point", zero, taken)],
                                       outputs=[dequantized]))
            nodes[reader].inputs[index] = dequantized
        return scale

    def _quantize_weight(self, graph: gs.Graph, node: gs.Node, layer: QuantLayer, entry: QuantEntry, plan: Plan,
                         weight: np.ndarray, taken: set[str], int4: dict, shared: dict
                         ) -> tuple[list[str], np.ndarray]:
        """The node's weight as integer levels read through a DequantizeLinear of its own (in onnxruntime's
        form, a weight-only per-channel layer's through a Cast and a Mul); its new nodes' names and the weight
        scales."""
        levels, scales, attrs = weight_levels(entry, layer, weight, plan)
        stem = f"{layer.weight}/{node.name}"
        dequantized = gs.Variable(unique_name(f"{stem}/dequantized", taken), dtype=np.float32,
                                  shape=list(weight.shape))
        if self._reads_through_mul(entry):
            new_nodes = []
            if entry.container == "int4":
                stored, new_nodes = self._unpack_int4(graph, levels, stem, taken, shared)
            else:
                stored = _constant(f"{stem}/int{entry.bits}", levels, taken)
            cast_name, mul_name = unique_name(f"{stem}/Cast", taken), unique_name(f"{stem}/Mul", taken)
            widened = gs.Variable(unique_name(f"{stem}/levels", taken), dtype=np.float32, shape=list(weight.shape))
            shape = [1] * weight.ndim
            shape[attrs["axis"]] = -1
            graph.nodes.append(gs.Node("Cast", cast_name, {"to": onnx.TensorProto.FLOAT}, inputs=[stored],
                                       outputs=[widened]))
            graph.nodes.append(gs.Node("Mul", mul_name, inputs=[widened, _constant(f"{stem}/scale",
                                                                                   scales.reshape(shape), taken)],
                                       outputs=[dequantized]))
            node.inputs[1] = dequantized
            return new_nodes + [cast_name, mul_name], scales
        stored = _constant(f"{stem}/int{entry.bits}", levels, taken)
        zero = _constant(f"{stem}/zero_point", np.zeros(scales.shape, np.int8), taken)
        if entry.container == "int4":
            int4[stored.name], int4[zero.name] = levels, zero.values
        name = unique_name(f"{stem}/DequantizeLinear", taken)
        graph.nodes.append(gs.Node("DequantizeLinear", name, attrs,
                                   inputs=[stored, _constant(f"{stem}/scale", scales, taken), zero],
                                   outputs=[dequantized]))
        node.inputs[1] = dequantized
        return [name], scales

    def _reads_through_mul(self, entry: QuantEntry) -> bool:
        """Whether ``entry``'s weight is read as ``Mul(Cast(levels), scales)`` (onnxruntime, weight-only, per
        channel) rather than through a DequantizeLinear."""
        return self.runtime == "onnxruntime" and entry.activations == "float" and entry.granularity != "block"

    def _unpack_int4(self, graph: gs.Graph, levels: np.ndarray, stem: str, taken: set[str], shared: dict
                     ) -> tuple[gs.Variable, list[str]]:
        """``levels`` stored two per byte and unpacked to int8 in ``levels``' shape by constant nodes: Cast to int32,
        Gather from :data:`INT4_PAIRS` (one copy per model, kept in ``shared``), Reshape (an odd count first
        drops its padding level: Reshape to one axis, Slice)."""
        if "pairs" not in shared:
            shared["pairs"] = _constant("onnxlrf/int4_pairs_table", INT4_PAIRS, taken)
        packed = _constant(f"{stem}/int4_pairs", pack_int4_pairs(levels), taken)
        cast, gather = unique_name(f"{stem}/CastPairs", taken), unique_name(f"{stem}/GatherPairs", taken)
        # The intermediate tensors get no value_info (~70 bytes each, a 4% larger ResNet-56): onnx infers them.
        indices, pairs = (gs.Variable(unique_name(f"{stem}/{what}", taken)) for what in ("pair_indices", "pairs"))
        graph.nodes.append(gs.Node("Cast", cast, {"to": onnx.TensorProto.INT32}, inputs=[packed], outputs=[indices]))
        graph.nodes.append(gs.Node("Gather", gather, {"axis": 0}, inputs=[shared["pairs"], indices], outputs=[pairs]))
        names = [cast, gather]
        if levels.size % 2:
            flat, unpadded = (gs.Variable(unique_name(f"{stem}/{what}", taken))
                              for what in ("pairs_flat", "pairs_unpadded"))
            names += [unique_name(f"{stem}/Flatten", taken), unique_name(f"{stem}/DropPadding", taken)]
            graph.nodes.append(gs.Node("Reshape", names[-2], inputs=[
                pairs, _constant(f"{stem}/flat_shape", np.array([-1], np.int64), taken)], outputs=[flat]))
            graph.nodes.append(gs.Node("Slice", names[-1], inputs=[
                flat, _constant(f"{stem}/starts", np.array([0], np.int64), taken),
                _constant(f"{stem}/ends", np.array([levels.size], np.int64), taken)], outputs=[unpadded]))
            pairs = unpadded
        unpacked = gs.Variable(unique_name(f"{stem}/int4", taken))
        names.append(unique_name(f"{stem}/Reshape", taken))
        graph.nodes.append(gs.Node("Reshape", names[-1], inputs=[
            pairs, _constant(f"{stem}/shape", np.array(levels.shape, np.int64), taken)], outputs=[unpacked]))
        return unpacked, names

    def _quantize_bias(self, graph: gs.Graph, node: gs.Node, layer: QuantLayer, weights: dict,
                       weight_scales: np.ndarray, input_scale: np.float32, taken: set[str]) -> str:
        """onnxruntime's integer kernels take the bias as int32 at scale input scale x weight scale."""
        bias = weights[layer.bias].astype(np.float64)
        scales = (np.float64(input_scale) * weight_scales.astype(np.float64)).astype(np.float32)
        levels = np.clip(np.rint(bias / scales), np.iinfo(np.int32).min, np.iinfo(np.int32).max).astype(np.int32)
        stem = f"{layer.bias}/{node.name}"
        name = unique_name(f"{stem}/DequantizeLinear", taken)
        dequantized = gs.Variable(unique_name(f"{stem}/dequantized", taken), dtype=np.float32, shape=list(bias.shape))
        graph.nodes.append(gs.Node("DequantizeLinear", name, {"axis": 0},
                                   inputs=[_constant(f"{stem}/int32", levels, taken),
                                           _constant(f"{stem}/scale", scales, taken),
                                           _constant(f"{stem}/zero_point", np.zeros(scales.shape, np.int32), taken)],
                                   outputs=[dequantized]))
        node.inputs[2] = dequantized
        return name

    def ensures(self, model: onnx.ModelProto, result: onnx.ModelProto, plan: Plan, report: RewriteReport) -> None:
        super().ensures(model, result, plan, report)
        dequantized = dequantized_weights(result)
        reads = {node.name: node.input for node in result.graph.node}
        for done in report.rewritten:
            if reads.get(done["node"], [None, None])[1] not in dequantized:
                raise OnnxlrfError(f"{self.name}: node {done['node']!r} does not read a dequantized weight")
        if self.runtime == "tensorrt":
            check_tensorrt_form(result)


def check_tensorrt_form(model: onnx.ModelProto) -> None:
    """Raise OnnxlrfError unless every Q/DQ is symmetric with a type and axis TensorRT takes: int8 with zero
    point 0, float scales, per-tensor or per-channel (Conv weights axis 0, MatMul weights axis 1) or blocked on
    weights; int4 only for weights with block scales read by MatMul/Gemm (its weight-only INT4)."""
    constants = constant_producers(model)
    allowed = {onnx.TensorProto.INT8, onnx.TensorProto.INT4}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    for node in model.graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        zero = constants.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        scale = constants.get(node.input[1])
        if zero is None or zero.data_type not in allowed or numpy_helper.to_array(zero).astype(np.int64).any():
            raise OnnxlrfError(f"TensorRT form: {node.name!r} has no int8/int4 zero point of 0")
        if scale is None or scale.data_type != onnx.TensorProto.FLOAT:
            raise OnnxlrfError(f"TensorRT form: {node.name!r} has no constant float32 scale")
        if zero.data_type == onnx.TensorProto.INT4 and (
                node.op_type != "DequantizeLinear" or len(scale.dims) < 2
                or any(reader.op_type not in ("MatMul", "Gemm") for reader in readers.get(node.output[0], []))):
            raise OnnxlrfError(f"TensorRT form: {node.name!r} is int4 outside a blocked MatMul/Gemm weight")
        if node.op_type == "QuantizeLinear" and (len(scale.dims) or zero.data_type != onnx.TensorProto.INT8):
            raise OnnxlrfError(f"TensorRT form: activation quantizer {node.name!r} is not per-tensor int8")
        if node.op_type == "DequantizeLinear" and len(scale.dims) == 1:
            axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
            for reader in readers.get(node.output[0], []):
                if reader.op_type in WEIGHT_AXES and reader.input[1] == node.output[0] \
                        and axis != WEIGHT_AXES[reader.op_type]:
                    raise OnnxlrfError(f"TensorRT form: {node.name!r} has per-channel axis {axis} for a "
                                       f"{reader.op_type} weight (TensorRT takes {WEIGHT_AXES[reader.op_type]})")


def _constant(name: str, value: np.ndarray | np.generic, taken: set[str]) -> gs.Constant:
    return gs.Constant(unique_name(name, taken), np.asarray(value))
