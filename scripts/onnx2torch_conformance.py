"""ONNX's node conformance cases run through onnx2torch's converter (ONNX -> ``torch.fx``).

    python scripts/onnx2torch_conformance.py [--json] [--ops Relu,Cast] [--failures] [--older-converters]

The evidence for the evaluator choice (``scripts/results/README.md``, "Evaluator:
own TorchGraph vs onnx2torch"): the same cases, feeds, comparison and totals as
``scripts/onnx_conformance.py``, with each case's model converted by
``onnx2torch.convert`` and the converted module run on the feeds. onnx2torch is
not a dependency of onnxlrf: run this in an environment that has it.

A case is *unsupported* where onnx2torch refuses it with ``NotImplementedError``
(no converter for the op at that opset, or an attribute value it does not
cover; at conversion or when run), *failed* where it raises anything else or
its outputs disagree.

onnx2torch looks a converter up by the op's schema version at the model's opset
(its ``since_version``), so an op whose schema changed after onnx2torch's release
(most did at opset 21-23, adding dtypes) is refused at the cases' opsets.
``--older-converters`` uses the newest converter registered for an older schema
version of the op instead: what onnx2torch's op implementations do on these
cases, rather than what its registry accepts.
"""

from __future__ import annotations

import sys

import onnx
import onnx2torch.converter
import torch
from onnx2torch import convert
from onnx2torch.node_converters import registry

from onnx_conformance import main
from onnxlrf.measure.torch_graph import SubByteTensor, UnsupportedError


def evaluate_onnx2torch(model: onnx.ModelProto, feeds: dict[str, torch.Tensor]) -> list:
    """The graph's outputs, in order, from onnx2torch's module converted from ``model``."""
    if any(isinstance(value, SubByteTensor) for value in feeds.values()):
        raise UnsupportedError("onnx2torch runs torch tensors: no 4-bit or 2-bit inputs")
    try:
        module = convert(model)
        initializers = {init.name for init in model.graph.initializer}
        # The module's inputs are positional, in the graph's order, initializers left out.
        returned = module(*(feeds[i.name] for i in model.graph.input if i.name not in initializers))
    except NotImplementedError as error:
        raise UnsupportedError(f"onnx2torch: {error}") from error
    return _graph_outputs(model, returned)


def get_older_converter(operation_type: str, version: int, domain: str = onnx.defs.ONNX_DOMAIN) -> registry.TConverter:
    """onnx2torch's converter for the op's schema at opset ``version``, else the newest one registered for an
    older schema version of the op."""
    try:
        return registry.get_converter(operation_type, version, domain)
    except NotImplementedError:
        older = [d.version for d in registry._CONVERTER_REGISTRY
                 if (d.domain, d.operation_type) == (domain, operation_type) and d.version <= version]
        if not older:
            raise
        return registry._CONVERTER_REGISTRY[registry.OperationDescription(domain, operation_type, max(older))]


def _graph_outputs(model: onnx.ModelProto, returned) -> list:
    """The module returns, per node that makes a graph output (first appearance order), that node's
    result: a tensor, or a tuple for a node with several outputs. Pick each graph output from it."""
    producer = {name: (index, position) for index, node in enumerate(model.graph.node)
                for position, name in enumerate(node.output)}
    nodes = list(dict.fromkeys(producer[o.name][0] for o in model.graph.output))
    per_node = dict(zip(nodes, (returned,) if len(nodes) == 1 else returned))
    outputs = []
    for info in model.graph.output:
        index, position = producer[info.name]
        result = per_node[index]
        several = len(model.graph.node[index].output) > 1 and isinstance(result, (tuple, list))
        outputs.append(result[position] if several else result)
    return outputs


if __name__ == "__main__":
    argv = sys.argv[1:]
    if "--older-converters" in argv:
        argv.remove("--older-converters")
        onnx2torch.converter.get_converter = get_older_converter  # the name convert() calls
    sys.exit(main(argv, evaluate=evaluate_onnx2torch, description=__doc__.splitlines()[0]))
