"""A detector's post-processing, and the head tensors before it that still have one row per sample.

A single-stage detector (SSD, RetinaNet, FCOS) ends in post-processing that selects detections:
TopK, NonZero and NonMaxSuppression keep as many boxes as survive, so its outputs are one
image's detections, with no sample axis and in an order that ties decide. What feeds that
selection does have a sample axis: the heads' raw box regressions and class logits. Those are
what the label-free loss and the fidelity compare (:func:`cut_at_heads` makes the model that
outputs them); the written model keeps its post-processing as it was.

The heads are found from the graph alone: the selection ops that read what a weight layer computed
(a NonZero on an input mask is no post-processing); the trunk (every weight layer and everything
it depends on); the tensors the trunk hands to the rest of the graph on the way to the
selection (where the rest reads more than their shape), each followed through layout-only ops
(Reshape, Transpose, Concat, ...) as far as those read nothing else but constants and shapes and
keep the sample axis first (as far as their attributes, constant shapes and shape inference tell).
For ssdlite320 that is the Concat of the six levels' box regressions and that of their class
logits. A two-stage detector (Faster, Mask and Keypoint R-CNN) crops its features by the boxes its
first stage selected (RoIAlign) and runs a second stage on the crops: as many rows as proposals
survived, so nothing after the crop has a row per sample. Its heads are those of the first stage:
the feature maps the crops read and the proposal heads' outputs (objectness and box regressions)
that feed the selection. If those are kept, the second stage sees what it saw; its own weight
layers run on the crops, are not analysed, and stay dense (:attr:`PostProcessing.second_stage`).
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx

from ..errors import OnnxlrfError
from .layers import FACTORIZABLE_OPS, QUANTIZED_OPS, constant_producers, subgraph_reads

# Ops whose outputs are chosen by the values of their inputs: the start of post-processing.
SELECTION_OPS = ("TopK", "NonZero", "NonMaxSuppression")
# Ops that crop features by boxes a first stage proposed: only two-stage detectors have them.
REGION_OPS = ("RoiAlign", "MaxRoiPool")
# Ops that move a tensor's values without computing with them (the inputs they read values from).
LAYOUT_OPS = {"Reshape": 1, "Transpose": 1, "Flatten": 1, "Squeeze": 1, "Unsqueeze": 1, "Identity": 1,
              "Concat": None}
# Ops that read only their input's shape.
SHAPE_OPS = ("Shape", "Size")


@dataclass(frozen=True)
class PostProcessing:
    """Where a model's post-processing starts: the selection ops it has, and the head tensors it reads."""

    selection_ops: tuple[str, ...]  # op types found (selection, then region ops), in graph order
    heads: tuple[str, ...]  # tensors, in graph order
    # A two-stage detector's weight nodes that run on the crops (names, or first outputs where unnamed).
    second_stage: tuple[str, ...] = ()


def _ops_within(node: onnx.NodeProto) -> set[str]:
    """Op types of ``node`` and of the nodes in its subgraphs (If branches, Loop and Scan bodies), nested."""
    ops = {node.op_type}
    for attr in node.attribute:
        for graph in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
            for inner in graph.node:
                ops |= _ops_within(inner)
    return ops


def _reads(node: onnx.NodeProto) -> set[str]:
    return {name for name in node.input if name} | subgraph_reads(node)


def find_post_processing(model: onnx.ModelProto) -> PostProcessing | None:
    """The post-processing of ``model`` (see the module doc), or None where it has none: no selection op
    that reads what a weight layer computed (a NonZero on an input mask is not post-processing).

    Weight layers after a selection make it no post-processing (a mixture of experts routes by TopK),
    unless they run on crops a region op (RoIAlign) cut by the selected boxes: a two-stage detector's
    second stage.
    """
    nodes = list(model.graph.node)
    if not any(_ops_within(node) & {*SELECTION_OPS, *REGION_OPS} for node in nodes):
        return None
    constants = constant_producers(model)
    weight_layers = [i for i, node in enumerate(nodes) if node.op_type in (*FACTORIZABLE_OPS, *QUANTIZED_OPS)
                     and any(name in constants for name in node.input)]
    producer = {name: i for i, node in enumerate(nodes) for name in node.output}
    consumers: dict[str, list[int]] = {}
    for i, node in enumerate(nodes):
        for name in _reads(node):
            consumers.setdefault(name, []).append(i)
    selecting = sorted(i for i in _downstream(nodes, weight_layers, consumers)
                       if _ops_within(nodes[i]) & {*SELECTION_OPS, *REGION_OPS})
    if not selecting:
        return None

    after = set(weight_layers) & _downstream(nodes, selecting, consumers)
    regions = [i for i in selecting if _ops_within(nodes[i]) & set(REGION_OPS)]
    second_stage = after & _downstream(nodes, regions, consumers)
    if after - second_stage:
        return None  # the selection routes the computation (a mixture of experts' TopK), not its results

    trunk = _upstream(nodes, [i for i in weight_layers if i not in after], producer)
    before = _upstream(nodes, selecting, producer) - trunk
    computed = _computed_tensors(model, nodes)
    # Tensors the trunk computes from the inputs and hands to post-processing by value (a Shape of a
    # feature map reads no values).
    heads = {name for i in before if nodes[i].op_type not in SHAPE_OPS for name in _reads(nodes[i])
             if producer.get(name) in trunk and name in computed}
    first_dims = _first_dims(model)
    for i in sorted(before):  # graph order: a layout op's inputs are settled before it
        node = nodes[i]
        if node.op_type not in LAYOUT_OPS or not node.output:
            continue
        # Not followed where the op moves the sample axis (Faster R-CNN's proposal heads end in a Reshape
        # to (images x anchors, 4)).
        if not _keeps_sample_axis(node, constants, first_dims):
            continue
        values = [name for name in node.input[:LAYOUT_OPS[node.op_type]] if name in computed]
        alone = all(name in heads and all(nodes[j].op_type in SHAPE_OPS or j == i for j in consumers[name])
                    for name in values)
        if values and alone:
            heads.difference_update(values)
            heads.add(node.output[0])
    if not heads:  # the selection reads the layers' outputs only through their shapes
        return None
    ops = tuple(dict.fromkeys(op for ops in (SELECTION_OPS, REGION_OPS) for i in selecting
                              for op in sorted(_ops_within(nodes[i]) & set(ops))))
    return PostProcessing(ops, tuple(sorted(heads, key=lambda name: producer[name])),
                          tuple(nodes[i].name or nodes[i].output[0] for i in sorted(second_stage)))


def _keeps_sample_axis(node: onnx.NodeProto, constants: dict[str, onnx.TensorProto],
                       first_dims: dict[str, int]) -> bool:
    """Whether layout op ``node`` keeps its input's first axis first: false where its attributes or a
    constant target shape move or fold axis 0, or shape inference knows the two first dims differ."""
    known = [first_dims.get(name) for name in (node.input[0], node.output[0])]
    if None not in known and known[0] != known[1]:
        return False
    attrs = {attr.name: onnx.helper.get_attribute_value(attr) for attr in node.attribute}
    if node.op_type == "Transpose":
        return list(attrs.get("perm", [1]))[:1] == [0]
    if node.op_type in ("Concat", "Flatten"):
        return attrs.get("axis", 1) != 0
    axes = list(attrs.get("axes", []))
    if len(node.input) > 1 and node.input[1] in constants:
        values = onnx.numpy_helper.to_array(constants[node.input[1]]).reshape(-1).tolist()
        if node.op_type == "Reshape":
            return not values or values[0] != -1  # 0 copies the first dim; -1 there folds axis 0 in
        axes = values
    return 0 not in axes if node.op_type in ("Squeeze", "Unsqueeze") else True


def _first_dims(model: onnx.ModelProto) -> dict[str, int]:
    """The first dimension of each tensor whose shape inference knows it as a number (two symbols that
    differ may still be the same size)."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model).graph
    except Exception:  # noqa: BLE001 - a model shape inference cannot take: attributes and constants decide alone
        return {}
    dims = {}
    for value in [*inferred.input, *inferred.value_info, *inferred.output]:
        shape = value.type.tensor_type.shape
        if value.type.tensor_type.HasField("shape") and shape.dim and shape.dim[0].HasField("dim_value"):
            dims[value.name] = shape.dim[0].dim_value
    return dims


def _downstream(nodes: list[onnx.NodeProto], start: list[int], consumers: dict[str, list[int]]) -> set[int]:
    """Nodes that read, directly or not, what the ``start`` nodes write (not those nodes themselves)."""
    seen: set[int] = set()
    stack = list(start)
    while stack:
        for name in nodes[stack.pop()].output:
            for j in consumers.get(name, ()):
                if j not in seen:
                    seen.add(j)
                    stack.append(j)
    return seen


def _upstream(nodes: list[onnx.NodeProto], start: list[int], producer: dict[str, int]) -> set[int]:
    """The ``start`` nodes and every node they depend on."""
    seen = set(start)
    stack = list(start)
    while stack:
        for name in _reads(nodes[stack.pop()]):
            j = producer.get(name)
            if j is not None and j not in seen:
                seen.add(j)
                stack.append(j)
    return seen


def _computed_tensors(model: onnx.ModelProto, nodes: list[onnx.NodeProto]) -> set[str]:
    """Tensors computed from the graph inputs' values (not from initializers and constants alone, nor from
    the inputs' shapes alone: Faster R-CNN's transform reads the image size as scalars)."""
    fed = {value.name for value in model.graph.input} - {tensor.name for tensor in model.graph.initializer}
    computed: set[str] = set()
    for node in nodes:  # graph order
        if node.op_type not in SHAPE_OPS and _reads(node) & (fed | computed):
            computed.update(node.output)
    return computed


def cut_at_heads(model: onnx.ModelProto, heads: tuple[str, ...] | list[str]) -> onnx.ModelProto:
    """``model`` with ``heads`` as its outputs and only the nodes, initializers and inputs they need."""
    nodes = list(model.graph.node)
    producer = {name: i for i, node in enumerate(nodes) for name in node.output}
    missing = [name for name in heads if name not in producer]
    if missing:
        raise OnnxlrfError(f"the model has no tensor {missing[0]!r} to cut at")
    kept = _upstream(nodes, [producer[name] for name in heads], producer)
    reads = {name for i in kept for name in _reads(nodes[i])}
    types = {value.name: value for value in [*model.graph.value_info, *model.graph.output]}
    if not all(name in types for name in heads):  # exporters record few intermediate types
        inferred = onnx.shape_inference.infer_shapes(model).graph
        types.update({value.name: value for value in inferred.value_info})
    outputs = [types[name] if name in types else onnx.helper.make_empty_tensor_value_info(name) for name in heads]
    graph = onnx.helper.make_graph(
        [nodes[i] for i in sorted(kept)], model.graph.name,
        [value for value in model.graph.input if value.name in reads],
        outputs,
        [tensor for tensor in model.graph.initializer if tensor.name in reads],
        value_info=[value for value in model.graph.value_info if value.name in reads and value.name not in heads],
    )
    cut = onnx.ModelProto()
    cut.CopyFrom(model)
    cut.graph.CopyFrom(graph)
    return cut
