"""What a model offers for factorization, before any planning: ``onnxlrf inspect``.

Per factorizable layer: weight, shape, parameters, FLOPs, and for each
decomposition the matrices it factorizes, the maximum rank and the break-even
rank (the largest rank whose factorized form is still smaller than dense).
Per Conv/ConvTranspose/Gemm/MatMul or quantized node that is not a layer: why; per layer the joint
analysis leaves out (ConvTranspose, 3-D convs: dense in joint plans only): why. The nodes whose
op the torch analysis lacks: those on the path from the layers' weights to the outputs (they block
the joint modes) and those off it (onnx's reference evaluator runs them); for a detector, in the
model cut at its heads, as the joint modes run it. Works on any ONNX file:
nothing is run, shapes come from shape inference. For quantization: the layers ``--technique quant`` takes
and the Conv/Gemm/MatMul nodes it does not, with why.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field

import onnx

from .data import graph_inputs
from .errors import OnnxlrfError
from .graph.heads import cut_at_heads, find_post_processing
from .graph.layers import (
    QUANTIZED_OPS,
    count_params,
    dense_weight_reasons,
    find_layers,
    nonfinite_weights,
)
from .graph.quantizable import BLOCK_OPS, find_quantizable
from .measure.coverage import analysis_exclusion
from .measure.torch_graph import lacking_nodes
from .onnx_io import default_opset, load_onnx
from .runtime.shapes import concrete_input_shapes, flops_by_node

_INT8 = (onnx.TensorProto.INT8, onnx.TensorProto.UINT8)

SECOND_STAGE = ("second stage of a two-stage detector: runs on the crops of the boxes the first stage selected; "
                "the joint analysis compares the features it crops instead")


@dataclass
class DecompositionInfo:
    name: str  # channel | spatial
    matrices: list[int]  # [g, m, n]: g matrices of m x n
    max_rank: int
    break_even_rank: int  # 0: no rank is smaller than dense


@dataclass
class LayerInfo:
    node: str
    op_type: str
    weight: str
    weight_shape: list[int]
    groups: int
    params: int
    flops: int | None  # None: shape inference left the node's shapes unknown
    decompositions: list[DecompositionInfo]
    dense_reason: str | None = None  # why the planners keep it dense anyway (a shared weight)
    not_analyzed: str | None = None  # why the joint analysis leaves it out (dense in joint plans only)


@dataclass
class SkippedInfo:
    node: str
    op_type: str
    reason: str
    flops: int | None = None  # Conv/ConvTranspose/Gemm/MatMul only


@dataclass
class QuantizableInfo:
    """A node ``--technique quant`` can quantize: its weight, the axis of its per-channel scales, and whether
    its weight may take block scales (Gemm/MatMul, INT4 weight-only)."""
    node: str
    op_type: str
    weight: str
    weight_shape: list[int]
    channel_axis: int
    block_scales: bool


@dataclass
class LackingInfo:
    """A node whose op the torch analysis lacks."""
    node: str
    op_type: str
    domain: str = ""


@dataclass
class Inspection:
    model: str
    opset: int
    ir_version: int
    producer: str
    inputs: dict[str, list]  # declared shapes: ints, or the names of dynamic dims
    flops_input_shapes: dict[str, list[int]]  # the concrete shapes FLOPs are counted at
    layers: list[LayerInfo]
    skipped: list[SkippedInfo]
    params: int  # float initializers and Constants, as compress counts them
    factorizable_params: int  # of the layers' weights, a shared weight counted once
    flops: int | None  # Conv/ConvTranspose/Gemm/MatMul nodes, one run at flops_input_shapes; None if unknown
    factorizable_flops: int | None
    nonfinite_weights: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    # Ops the torch analysis lacks: on the weights' path (the joint modes stop) and off it (reference evaluator).
    blocking: list[LackingInfo] = field(default_factory=list)
    reference: list[LackingInfo] = field(default_factory=list)
    # What --technique quant takes (Conv/Gemm/MatMul with a constant float weight) and the others, with why.
    quantizable: list[QuantizableInfo] = field(default_factory=list)
    not_quantizable: list[SkippedInfo] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def inspect_model(model: onnx.ModelProto | str | os.PathLike,
                  input_shapes: dict[str, list[int]] | None = None) -> Inspection:
    """Inspect ``model`` (a ModelProto or an ONNX path).

    FLOPs are counted at ``input_shapes`` where given, else at the model's static
    input shapes with dynamic dims set to batch 1 (axis 0) and length
    ``DEFAULT_SEQ_LENGTH`` (other axes); the notes say which were set.
    """
    name = "<model>"
    if not isinstance(model, onnx.ModelProto):
        name = str(model)
        model = load_onnx(model)
    elif model.graph.name:
        name = model.graph.name
    declared = {inp.name: [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?")
                           for d in inp.type.tensor_type.shape.dim] for inp in graph_inputs(model)}
    notes: list[str] = []
    shapes = _flops_shapes(declared, input_shapes, notes, model)

    layers, skipped = find_layers(model)
    flops, flops_note = _node_flops(model, shapes)
    if flops_note:
        notes.append(flops_note)
    dense_reasons = dense_weight_reasons(model)
    post = find_post_processing(model)
    analysed = model
    if post is not None:
        analysed = cut_at_heads(model, post.heads)
        notes.append(f"post-processing ({', '.join(post.selection_ops)}): the joint modes analyse the model cut at "
                     f"its heads ({', '.join(post.heads)})")
    second_stage = set(post.second_stage) if post else set()  # layers have unique names: they match
    layer_infos = [
        LayerInfo(layer.node, layer.op_type, layer.weight, list(layer.weight_shape), layer.groups, layer.params,
                  flops.get(layer.node),
                  [DecompositionInfo(d, list(layer.matrix_shape(d)), layer.max_rank(d), layer.break_even_rank(d))
                   for d in layer.decompositions],
                  dense_reasons.get(layer.weight),
                  SECOND_STAGE if layer.node in second_stage else analysis_exclusion(layer))
        for layer in layers
    ]
    skipped_infos = [SkippedInfo(s.node, s.op_type, s.reason, flops.get(s.node) if s.node else None)
                     for s in skipped]
    quantized = sum(s.op_type in QUANTIZED_OPS for s in skipped)
    if quantized:
        int8 = sum(math.prod(t.dims) for t in model.graph.initializer if t.data_type in _INT8)
        notes.append(f"{quantized} quantized nodes: not factorizable; their FLOPs and their {int8:,} 8-bit "
                     "weight elements are not counted")

    blocking, reference = lacking_nodes(analysed, [layer.weight for layer in layers if "channel" in layer.decompositions
                                                   and layer.node not in second_stage])
    quant_layers, quant_skipped = find_quantizable(model)
    total_flops = None if None in flops.values() or flops_note else sum(flops.values())
    layer_flops = [info.flops for info in layer_infos]
    return Inspection(
        model=name,
        opset=default_opset(model),
        ir_version=model.ir_version,
        producer=" ".join(p for p in (model.producer_name, model.producer_version) if p),
        inputs=declared,
        flops_input_shapes=shapes,
        layers=layer_infos,
        skipped=skipped_infos,
        params=count_params(model),
        factorizable_params=sum({layer.weight: layer.params for layer in layers}.values()),
        flops=total_flops,
        factorizable_flops=None if None in layer_flops else sum(layer_flops),
        nonfinite_weights=nonfinite_weights(model),
        notes=notes,
        blocking=[LackingInfo(n.name or n.output[0], n.op_type, n.domain) for n in blocking],
        reference=[LackingInfo(n.name or n.output[0], n.op_type, n.domain) for n in reference],
        quantizable=[QuantizableInfo(q.node, q.op_type, q.weight, list(q.weight_shape), q.channel_axis,
                                     q.op_type in BLOCK_OPS) for q in quant_layers],
        not_quantizable=[SkippedInfo(q.node, q.op_type, q.reason, flops.get(q.node) if q.node else None)
                         for q in quant_skipped],
    )


def _flops_shapes(declared: dict[str, list], given: dict[str, list[int]] | None, notes: list[str],
                  model: onnx.ModelProto) -> dict[str, list[int]]:
    """The concrete input shapes for FLOPs: ``given`` (checked against the declared ones) or the defaults."""
    shapes = concrete_input_shapes(model)
    for input_name, dims in (given or {}).items():
        if input_name not in declared:
            raise OnnxlrfError(f"the model has no input {input_name!r} (inputs: {', '.join(declared) or 'none'})")
        want = declared[input_name]
        fits = len(dims) == len(want) and all(isinstance(w, str) or w == d for w, d in zip(want, dims))
        if not fits or any(d < 1 for d in dims):
            raise OnnxlrfError(f"shape {list(dims)} does not fit input {input_name!r} "
                               f"[{','.join(map(str, want))}]")
        shapes[input_name] = list(dims)
    for input_name, want in declared.items():
        if input_name in (given or {}):
            continue
        dynamic = [f"{dim} (axis {axis}) = {shapes[input_name][axis]}" for axis, dim in enumerate(want)
                   if isinstance(dim, str)]
        if dynamic:
            notes.append(f"input {input_name!r}: dynamic dims set for FLOPs: {', '.join(dynamic)} "
                         "(--input-shape to choose)")
    return shapes


def _node_flops(model: onnx.ModelProto, shapes: dict[str, list[int]]) -> tuple[dict[str, int | None], str | None]:
    """FLOPs per Conv/ConvTranspose/Gemm/MatMul node name, and a note when they cannot be counted."""
    try:
        return flops_by_node(model, shapes), None
    except OnnxlrfError as exc:
        return {}, f"FLOPs unknown: {exc}"


# --- the table -------------------------------------------------------------------------------------

def format_inspection(inspection: Inspection) -> str:
    """A readable report: header, layer table, skipped nodes, totals, notes."""
    i = inspection
    lines = [f"{i.model}: opset {i.opset}, IR {i.ir_version}" + (f", {i.producer}" if i.producer else "")]
    lines.append("inputs: " + "; ".join(f"{name} [{','.join(map(str, dims))}]" for name, dims in i.inputs.items()))
    if i.layers:
        rows = [["node", "op", "weight shape", "params", "FLOPs", "max / break-even rank"]]
        for layer in i.layers:
            ranks = ", ".join(f"{d.name} {d.max_rank}/{d.break_even_rank or '-'}" for d in layer.decompositions)
            if layer.groups > 1:
                ranks += f" (per group, {layer.groups} groups)"
            if layer.dense_reason:
                ranks += f"; stays dense: {layer.dense_reason}"
            elif layer.not_analyzed:
                ranks += f"; {layer.not_analyzed}"
            rows.append([layer.node, layer.op_type, "x".join(map(str, layer.weight_shape)), f"{layer.params:,}",
                         format_si(layer.flops), ranks])
        lines += ["", f"factorizable layers ({len(i.layers)}):"] + _table(rows, right={3, 4})
    else:
        lines += ["", "factorizable layers: none"]
    if i.skipped:
        rows = [["node", "op", "FLOPs", "why not factorizable"]]
        rows += [[s.node or "(no name)", s.op_type, "-" if s.op_type in QUANTIZED_OPS else format_si(s.flops), s.reason]
                 for s in i.skipped]
        lines += ["", f"skipped nodes ({len(i.skipped)}):"] + _table(rows, right={2})
    if i.blocking:
        lines += ["", f"nodes that block the joint modes ({len(i.blocking)}): a gradient from the layers' weights "
                  "passes through them and the torch analysis lacks their op (--mode uniform or energy still run)"]
        lines += _table([["node", "op"]] + [[n.node, _op(n)] for n in i.blocking], right=set())
    if i.reference:
        lines += ["", f"nodes onnx's reference evaluator runs in the joint modes ({len(i.reference)}): the torch "
                  "analysis lacks their op, and no gradient from the layers' weights passes through them"]
        lines += _table([["node", "op"]] + [[n.node, _op(n)] for n in i.reference], right=set())
    if i.quantizable:
        rows = [["node", "op", "weight shape", "channel axis (scales)", "block scales"]]
        rows += [[q.node, q.op_type, "x".join(map(str, q.weight_shape)), str(q.channel_axis),
                  "yes" if q.block_scales else "no"] for q in i.quantizable]
        lines += ["", f"quantizable layers (--technique quant, {len(i.quantizable)}):"] + _table(rows, right=set())
    else:
        lines += ["", "quantizable layers (--technique quant): none"]
    if i.not_quantizable:
        rows = [["node", "op", "why not quantizable"]]
        rows += [[s.node or "(no name)", s.op_type, s.reason] for s in i.not_quantizable]
        lines += ["", f"not quantizable ({len(i.not_quantizable)}):"] + _table(rows, right=set())
    share = f", {i.factorizable_params / i.params:.1%}" if i.params else ""
    lines += ["", f"params: {i.params:,} (in factorizable layers: {i.factorizable_params:,}{share})"]
    at = "; ".join(f"{name} [{','.join(map(str, dims))}]" for name, dims in i.flops_input_shapes.items())
    flops_share = f", {i.factorizable_flops / i.flops:.1%}" if i.flops and i.factorizable_flops is not None else ""
    lines.append(f"FLOPs (Conv/ConvTranspose/Gemm/MatMul, one run at {at}): {format_si(i.flops)} "
                 f"(in factorizable layers: {format_si(i.factorizable_flops)}{flops_share})")
    if i.nonfinite_weights:
        lines.append(f"weights with NaN or Inf ({len(i.nonfinite_weights)}): {', '.join(i.nonfinite_weights)}")
    lines += [f"note: {note}" for note in i.notes]
    return "\n".join(lines)


def format_si(value: int | None, missing: str = "?", space: str = "") -> str:
    """A count with a k/M/G prefix and three significant digits (``missing`` for None)."""
    if value is None:
        return missing
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if value >= scale:
            return f"{value / scale:.3g}{space}{unit}"
    return str(value)


def _op(node: LackingInfo) -> str:
    return f"{node.domain}.{node.op_type}" if node.domain not in ("", "ai.onnx") else node.op_type


def _table(rows: list[list[str]], right: set[int]) -> list[str]:
    widths = [max(len(row[c]) for row in rows) for c in range(len(rows[0]))]
    out = []
    for row in rows:
        cells = [cell.rjust(w) if c in right else cell.ljust(w) for c, (cell, w) in enumerate(zip(row, widths))]
        out.append("  " + "  ".join(cells).rstrip())
    return out


__all__ = ["DecompositionInfo", "Inspection", "LackingInfo", "LayerInfo", "SkippedInfo", "format_inspection", "inspect_model"]
