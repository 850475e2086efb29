"""Apply a plan: replace each planned Conv/ConvTranspose/Gemm/MatMul by a pair of thinner nodes.

Factor shapes follow METHOD.md section 6 (a ConvTranspose, which it does not cover, becomes a 1x1
Conv then a ConvTranspose with its original attributes: README, "How the rewrite works"); the kept
singular values are split ``sqrt(s)`` on each side. For node ``N`` with weight ``W`` at rank ``r``:

* nodes ``N/lrf_a`` (reads the original input) and ``N/lrf_b`` (writes the
  original output tensor), joined by tensor ``N/lrf_a/output``;
* initializers ``W.lrf_a.r<r>`` (first factor) and ``W.lrf_b.r<r>`` (second),
  created once per weight and shared by every node that uses it (a numeric
  suffix is added if a name is taken).

The graph is edited with onnx-graphsurgeon; everything the edit does not
concern (graph inputs/outputs, value_info and initializers of untouched
tensors, node doc strings and metadata, functions, opset_import, ir_version,
producer, model metadata) is taken from the original model.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import numpy_helper

from ...errors import OnnxlrfError
from ...graph.layers import (
    CONV_OPS,
    Layer,
    count_params,
    find_layers,
    matrices_to_weight,
    weight_array,
    weight_matrices,
)
from ...graph.linalg import svd
from ...onnx_io import check_graph_reads, copy_model, default_opset, unique_name
from ...planning.plan import LowRankEntry, Plan, validate_plan
from ...progress import ProgressLike, as_progress
from ..base import RewritePass, RewriteReport
from .planners import plan_full_rank

__all__ = ["RewriteReport", "apply_plan", "plan_full_rank", "truncate_weights"]


def factor_pair(weight: np.ndarray, layer: Layer, decomposition: str, keep: list[int],
                basis: tuple | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The two factor tensors (first node's weight, second node's weight) in the weight's dtype.

    ``basis`` (u, s, vh[, mu]) with ``W = u diag(s) vh`` replaces the weight's own SVD (the joint basis).
    """
    u, s, vh = basis[:3] if basis is not None else svd(weight_matrices(weight, layer, decomposition))
    idx = np.asarray(keep, dtype=np.int64)
    root = np.sqrt(s[:, idx])
    left = u[:, :, idx] * root[:, None, :]  # (g, m, r)
    right = root[:, :, None] * vh[:, idx, :]  # (g, r, n): W_g ~ left_g @ right_g
    # Same norm per component on both sides (the SVD's is; stored bases' x and y^T need not be):
    # neither factor gets large entries, which keeps fp16 deployments in range.
    left_norm, right_norm = np.linalg.norm(left, axis=1), np.linalg.norm(right, axis=2)  # (g, r)
    usable = (left_norm > 0) & (right_norm > 0)
    scale = np.sqrt(np.where(usable, right_norm, 1.0) / np.where(usable, left_norm, 1.0))
    left, right = left * scale[:, None, :], right / scale[:, :, None]
    g, rank = left.shape[0], len(idx)
    if layer.op_type not in CONV_OPS:
        first, second = right[0].T, left[0].T  # X @ (K x r) @ (r x N)
    elif layer.op_type == "ConvTranspose":
        # Rows of the matrices are input channels: a 1x1 Conv mixes them down to r per group, and a
        # ConvTranspose with the original attributes spreads each of those over (output channel, kernel).
        cin_per_group, cout_per_group, kernel = layer.out_features, layer.weight_shape[1], layer.kernel
        first = left.transpose(0, 2, 1).reshape(g * rank, cin_per_group, *([1] * len(kernel)))
        second = right.reshape(g * rank, cout_per_group, *kernel)
    elif decomposition == "channel":
        cout, cin_per_group, kernel = layer.weight_shape[0], layer.weight_shape[1], layer.kernel
        first = right.reshape(g * rank, cin_per_group, *kernel)
        second = left.reshape(cout, rank, *([1] * len(kernel)))
    else:
        cout, cin, kh, kw = layer.weight_shape
        first = left[0].T.reshape(rank, cin, kh, 1)  # rows of M are (c, i)
        second = right[0].reshape(rank, cout, kw).transpose(1, 0, 2).reshape(cout, rank, 1, kw)  # columns (o, j)
    return np.ascontiguousarray(first, dtype=weight.dtype), np.ascontiguousarray(second, dtype=weight.dtype)


def bias_shift(weight: np.ndarray, layer: Layer, first: np.ndarray, second: np.ndarray,
               mean_input: np.ndarray) -> np.ndarray:
    """``-(W_r - W) mu`` per output channel: the bias change that cancels the truncation's mean output error."""
    g, m, n = layer.matrix_shape("channel")
    dense = weight_matrices(weight.astype(np.float64), layer, "channel")
    if layer.op_type == "Conv":
        rank = first.shape[0] // g
        right = first.astype(np.float64).reshape(g, rank, n)
        left = second.astype(np.float64).reshape(g, m, rank)
    else:
        right, left = first.astype(np.float64).T[None], second.astype(np.float64).T[None]
    return -np.einsum("gmn,gn->gm", left @ right - dense, mean_input.astype(np.float64)).reshape(-1)


def apply_plan(model: onnx.ModelProto, plan: Plan, keep_dense_if_larger: bool = True,
               progress: ProgressLike = None) -> tuple[onnx.ModelProto, RewriteReport]:
    """Rewrite ``model`` by ``plan`` (:class:`LowRankRewrite`); returns a new model and what changed.

    ``model`` is not modified. ``keep_dense_if_larger`` leaves layers dense whose planned
    factorization is not smaller than the dense weight; False rewrites them anyway (used to
    check that full-rank factorization is exact).
    """
    return LowRankRewrite(keep_dense_if_larger)(model, plan, progress)


class LowRankRewrite(RewritePass):
    """Each planned layer becomes a pair of thinner nodes; everything else stays as it was.

    Requires: the plan fits the model (:func:`~onnxlrf.planning.plan.validate_plan`: nodes, weights,
    shapes, ranks, stored bases) and every node reads only what is produced before it. Ensures (besides
    the graph's inputs and outputs, see :class:`~onnxlrf.techniques.base.RewritePass`): every
    planned layer was rewritten or is reported as kept dense, with the reason.
    """

    name = "low-rank rewrite"

    def __init__(self, keep_dense_if_larger: bool = True) -> None:
        self.keep_dense_if_larger = keep_dense_if_larger

    def requires(self, model: onnx.ModelProto, plan: Plan) -> None:
        validate_plan(plan, model)
        opset = default_opset(model)
        gemm = next((e.node for e in plan.layers if e.changed and e.op_type == "Gemm"), None)
        if gemm is not None and opset < 7:
            raise OnnxlrfError(f"node {gemm!r}: a Gemm of opset {opset} cannot broadcast the bias the factorized "
                               f"pair needs; convert the model to opset 7 or newer (onnx.version_converter)")
        check_graph_reads(model)

    def ensures(self, model: onnx.ModelProto, result: onnx.ModelProto, plan: Plan, report: RewriteReport) -> None:
        super().ensures(model, result, plan, report)
        accounted = {item["node"] for item in report.rewritten} | {item["node"] for item in report.kept_dense}
        missing = [entry.node for entry in plan.layers if entry.node not in accounted]
        if missing:
            raise OnnxlrfError(f"{self.name}: planned node {missing[0]!r} was neither rewritten nor kept dense")

    def call(self, model: onnx.ModelProto, plan: Plan, progress: ProgressLike = None
             ) -> tuple[onnx.ModelProto, RewriteReport]:
        return _rewrite(model, plan, self.keep_dense_if_larger, progress)


def _rewrite(model: onnx.ModelProto, plan: Plan, keep_dense_if_larger: bool, progress: ProgressLike
             ) -> tuple[onnx.ModelProto, RewriteReport]:
    layers = {layer.node: layer for layer in find_layers(model)[0]}
    report = RewriteReport(params_before=count_params(model))

    work = copy_model(model)
    graph = gs.import_onnx(work)
    nodes = {node.name: node for node in graph.nodes}
    taken = set(graph.tensors()) | {n.name for n in graph.nodes}
    factors: dict[tuple, tuple[gs.Constant, gs.Constant]] = {}
    weights: dict[str, np.ndarray] = {}
    maybe_unused: set[str] = set()  # initializers the rewrite replaced: dropped if nothing reads them
    replaced: dict[str, list[str]] = {}

    for entry in as_progress(progress).track(plan.layers, "rewrite", unit="layer"):
        layer = layers[entry.node]
        if entry.decomposition == "dense":
            report.kept_dense.append({"node": entry.node, "reason": "planned dense"})
            continue
        params_after = layer.factorized_params(entry.decomposition, entry.rank)
        if keep_dense_if_larger and params_after >= layer.params:
            report.kept_dense.append({
                "node": entry.node,
                "reason": f"factorized form ({params_after} params) is not smaller than dense ({layer.params})",
            })
            continue
        key = (layer.weight, entry.decomposition, layer.op_type, layer.transposed, layer.groups,
               tuple(entry.kept_indices()))
        if key not in factors:
            if layer.weight not in weights:
                weights[layer.weight] = weight_array(model, layer)
            basis = plan.bases[layer.weight] if entry.basis != "svd" else None
            first, second = factor_pair(weights[layer.weight], layer, entry.decomposition, entry.kept_indices(),
                                        basis)
            factors[key] = (
                gs.Constant(unique_name(f"{layer.weight}.lrf_a.r{entry.rank}", taken), first),
                gs.Constant(unique_name(f"{layer.weight}.lrf_b.r{entry.rank}", taken), second),
            )
        shift = None
        if entry.basis == "refit":
            shift = plan.bases[layer.weight][4]
        elif entry.bias_correction:
            first, second = (c.values for c in factors[key])
            shift = bias_shift(weights[layer.weight], layer, first, second, plan.bases[layer.weight][3])
        if shift is not None:
            node_bias = nodes[entry.node].inputs[2:3]
            if node_bias and isinstance(node_bias[0], gs.Constant):
                maybe_unused.add(node_bias[0].name)  # replaced by the shifted bias
        touched: dict[str, str] = {}
        new_nodes = _replace(graph, nodes[entry.node], layer, entry, *factors[key], taken, shift, touched)
        for name, old_bias in touched.items():
            replaced[name] = [name]
            maybe_unused.add(old_bias)
        replaced[entry.node] = [n.name for n in new_nodes]
        maybe_unused.add(layer.weight)
        report.rewritten.append({
            "node": entry.node, "op_type": layer.op_type, "decomposition": entry.decomposition,
            "rank": entry.rank, "params_before": layer.params, "params_after": params_after,
            "new_nodes": [n.name for n in new_nodes],
        })

    exported = gs.export_onnx(graph, do_type_check=False)
    result = _assemble(model, exported, maybe_unused, replaced)
    report.params_after = count_params(result)
    return result, report


def truncate_weights(model: onnx.ModelProto, plan: Plan) -> tuple[onnx.ModelProto, RewriteReport]:
    """The same graph with each planned weight replaced by its low-rank reconstruction, kept dense.

    Names, shapes, dtypes and nodes stay as they are; only the values of the
    planned layers' weight initializers change. This is the point a further
    joint analysis expands around (``compress_joint(rounds=...)``). Layers the
    rewrite would keep dense (planned dense, or a pair not smaller) keep their weight.
    """
    validate_plan(plan, model)
    layers = {layer.node: layer for layer in find_layers(model)[0]}
    report = RewriteReport(params_before=count_params(model))
    truncated: dict[str, np.ndarray] = {}
    for entry in plan.layers:
        layer = layers[entry.node]
        if entry.decomposition == "dense" or layer.factorized_params(entry.decomposition, entry.rank) >= layer.params:
            report.kept_dense.append({"node": entry.node, "reason": "planned dense or pair not smaller"})
            continue
        if entry.bias_correction or entry.basis == "refit":
            raise OnnxlrfError(f"node {entry.node!r}: a bias-corrected or refit truncation changes the bias too; "
                               "truncate_weights keeps biases as they are")
        weight = weight_array(model, layer)
        u, s, vh = plan.bases[layer.weight][:3] if entry.basis != "svd" else \
            svd(weight_matrices(weight, layer, entry.decomposition))
        idx = np.asarray(entry.kept_indices(), dtype=np.int64)
        value = matrices_to_weight((u[:, :, idx] * s[:, None, idx]) @ vh[:, idx, :], layer, entry.decomposition)
        value = value.astype(weight.dtype)
        if layer.weight in truncated and not np.array_equal(truncated[layer.weight], value):
            raise OnnxlrfError(f"weight {layer.weight!r} is shared by nodes planned differently")
        truncated[layer.weight] = value
        report.rewritten.append({"node": entry.node, "op_type": layer.op_type, "decomposition": entry.decomposition,
                                 "rank": entry.rank, "params_before": layer.params, "params_after": layer.params,
                                 "new_nodes": []})
    result = onnx.ModelProto()
    result.CopyFrom(model)
    for init in result.graph.initializer:
        if init.name in truncated:
            init.CopyFrom(numpy_helper.from_array(truncated[init.name], init.name))
    report.params_after = count_params(result)
    return result, report


def _replace(graph: gs.Graph, node: gs.Node, layer: Layer, entry: LowRankEntry, first: gs.Constant,
             second: gs.Constant, taken: set[str], shift: np.ndarray | None = None,
             touched: dict[str, str] | None = None) -> list[gs.Node]:
    """Swap ``node`` for its factorized pair, in place in the node list (keeps topological order).

    ``shift`` (per output channel) is added to the bias: folded into a constant
    Conv bias or Gemm C, or into the bias of the ``Add`` an exported Linear puts
    after its MatMul (recorded in ``touched``: node name -> replaced constant's
    name), else an ``Add`` node ``N/lrf_bias`` follows the pair.
    """
    inputs, outputs, attrs = list(node.inputs), list(node.outputs), dict(node.attrs)
    node.inputs.clear()
    node.outputs.clear()
    middle = gs.Variable(unique_name(f"{node.name}/lrf_a/output", taken))
    name_a, name_b = unique_name(f"{node.name}/lrf_a", taken), unique_name(f"{node.name}/lrf_b", taken)
    added: list[gs.Node] = []
    if shift is not None:
        shift = shift.astype(first.values.dtype)
        bias = inputs[2] if len(inputs) > 2 and inputs[2].name else None
        foldable = layer.op_type in ("Conv", "Gemm") and (bias is None or isinstance(bias, gs.Constant))
        consumers = outputs[0].outputs
        bias_add = consumers[0] if (layer.op_type == "MatMul" and len(consumers) == 1 and consumers[0].op == "Add"
                                    and consumers[0].name and touched is not None
                                    and not graph_output(graph, outputs[0])) else None
        add_bias = None
        if bias_add is not None:  # exported Linear: MatMul then Add(bias); fold the shift into that bias
            add_bias = next((t for t in bias_add.inputs if t is not outputs[0] and isinstance(t, gs.Constant)
                             and t.values.shape[-1:] == shift.shape), None)
        if add_bias is not None:
            slot = bias_add.inputs.index(add_bias)
            bias_add.inputs[slot] = gs.Constant(unique_name(f"{add_bias.name}.lrf_bias", taken),
                                                np.ascontiguousarray(add_bias.values + shift))
            touched[bias_add.name] = add_bias.name
        elif foldable:
            scale = float(attrs.get("beta", 1.0)) if (layer.op_type == "Gemm" and bias is not None) else 1.0
            values = shift / scale if bias is None else bias.values + shift / scale
            inputs[2:] = [gs.Constant(unique_name(f"{bias.name if bias is not None else node.name}.lrf_bias", taken),
                                      np.ascontiguousarray(values, dtype=shift.dtype))]
        else:
            # MatMul (no bias input) or a computed bias: add the shift after the pair.
            final = outputs
            outputs = [gs.Variable(unique_name(f"{node.name}/lrf_b/output", taken))]
            offset = shift.reshape(-1, *[1] * len(layer.kernel)) if layer.op_type == "Conv" else shift
            added.append(gs.Node("Add", unique_name(f"{node.name}/lrf_bias", taken), {},
                                 [outputs[0], gs.Constant(unique_name(f"{node.name}.lrf_bias", taken), offset)], final))
    if layer.op_type == "Conv":
        attrs_a, attrs_b = _conv_attrs(attrs, layer, entry.decomposition)
        node_a = gs.Node("Conv", name_a, attrs_a, [inputs[0], first], [middle])
        node_b = gs.Node("Conv", name_b, attrs_b, [middle, second] + inputs[2:], outputs)
    elif layer.op_type == "ConvTranspose":
        # x -> 1x1 Conv (Cin -> r*g) -> ConvTranspose (r*g -> Cout, every original attribute, bias). The 1x1
        # Conv is pointwise, so it commutes with the transposed conv's upsampling, padding and cropping.
        attrs_a = {"kernel_shape": [1] * len(layer.kernel)}
        if layer.groups > 1:
            attrs_a["group"] = layer.groups
        node_a = gs.Node("Conv", name_a, attrs_a, [inputs[0], first], [middle])
        node_b = gs.Node("ConvTranspose", name_b, attrs, [middle, second] + inputs[2:], outputs)
    elif layer.op_type == "Gemm":
        # Y = alpha * A' @ B + beta * C with B = P @ Q: (alpha * A' @ P) @ Q + beta * C
        attrs_a = {k: attrs[k] for k in ("alpha", "transA") if k in attrs}
        attrs_b = {"beta": attrs["beta"]} if "beta" in attrs and len(inputs) > 2 and inputs[2].name else {}
        # Before opset 11 C is a required input: the first Gemm adds a zero (broadcast).
        zero = [gs.Constant(unique_name(f"{node.name}.lrf_zero", taken), np.zeros(1, first.values.dtype))] \
            if graph.opset < 11 else []
        node_a = gs.Node("Gemm", name_a, attrs_a, [inputs[0], first] + zero, [middle])
        node_b = gs.Node("Gemm", name_b, attrs_b, [middle, second] + inputs[2:], outputs)
    else:
        node_a = gs.Node("MatMul", name_a, {}, [inputs[0], first], [middle])
        node_b = gs.Node("MatMul", name_b, {}, [middle, second], outputs)
    index = graph.nodes.index(node)
    graph.nodes[index:index + 1] = [node_a, node_b] + added
    return [node_a, node_b] + added


def graph_output(graph: gs.Graph, tensor: gs.Tensor) -> bool:
    return any(out is tensor for out in graph.outputs)


def _conv_attrs(attrs: dict, layer: Layer, decomposition: str) -> tuple[dict, dict]:
    ndim = len(layer.kernel)
    if decomposition == "channel":
        # The first conv does all the spatial work; the second is a 1x1 (per group) mixing.
        attrs_a = {**attrs, "kernel_shape": list(layer.kernel)}
        attrs_b = {"kernel_shape": [1] * ndim}
        if layer.groups > 1:
            attrs_b["group"] = layer.groups
        return attrs_a, attrs_b
    # Spatial: height work in the first conv, width work in the second; each keeps its dimension's
    # stride/dilation/padding, so the pair computes exactly the dense conv's output grid.
    kh, kw = layer.kernel
    sh, sw = attrs.get("strides", [1, 1])
    dh, dw = attrs.get("dilations", [1, 1])
    attrs_a = {"kernel_shape": [kh, 1], "strides": [sh, 1], "dilations": [dh, 1]}
    attrs_b = {"kernel_shape": [1, kw], "strides": [1, sw], "dilations": [1, dw]}
    auto_pad = attrs.get("auto_pad", "NOTSET")
    if auto_pad != "NOTSET":
        attrs_a["auto_pad"] = attrs_b["auto_pad"] = auto_pad
    elif "pads" in attrs:
        ph0, pw0, ph1, pw1 = attrs["pads"]
        attrs_a["pads"] = [ph0, 0, ph1, 0]
        attrs_b["pads"] = [0, pw0, 0, pw1]
    return attrs_a, attrs_b


def _assemble(original: onnx.ModelProto, exported: onnx.ModelProto, maybe_unused: set[str],
              replaced: dict[str, list[str]]) -> onnx.ModelProto:
    """The original model with the rewritten nodes and initializers; everything else as it was.

    Untouched nodes are taken from the original (graphsurgeon drops node doc
    strings and metadata); each replaced node gives way to its pair, in place.
    """
    used = _used_names(exported.graph)
    dropped = {w for w in maybe_unused if w not in used}
    new_names = {name for names in replaced.values() for name in names}
    new_nodes = {n.name: n for n in exported.graph.node if n.name in new_names}
    nodes = []
    for node in original.graph.node:
        if node.name in replaced:
            nodes.extend(new_nodes[name] for name in replaced[node.name])
        elif not (node.op_type == "Constant" and node.output[0] in dropped):  # a weight nobody reads any more
            nodes.append(node)
    original_inits = {t.name for t in original.graph.initializer}
    new_inits = [t for t in exported.graph.initializer if t.name not in original_inits]

    result = onnx.ModelProto()
    result.CopyFrom(original)
    graph = result.graph
    del graph.node[:]
    graph.node.extend(nodes)
    kept = [t for t in graph.initializer if t.name not in dropped]
    del graph.initializer[:]
    graph.initializer.extend(kept + new_inits)
    names = used | {t.name for t in graph.initializer} | {o for n in nodes for o in n.output}
    value_info = [vi for vi in graph.value_info if vi.name in names]
    del graph.value_info[:]
    graph.value_info.extend(value_info)
    return result


def _used_names(graph: onnx.GraphProto) -> set[str]:
    """Tensor names read by any node (subgraphs included) or returned by the graph."""
    used = {o.name for o in graph.output}
    for node in graph.node:
        used.update(node.input)
        for attr in node.attribute:
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                used |= _used_names(sub)
    return used
