"""Forward+backward of an ONNX model: onnxlrf's TorchGraph vs onnx2torch's converted torch.fx module.

    python scripts/onnx2torch_speed.py model.onnx [--runs 10] [--json out.json]

The work of the joint analysis' gradient pass (``measure.sensitivity``): gradients
of every Conv/Gemm/MatMul weight that is an initializer, each such node's output
kept for its gradient (a hook on the node), a loss on the outputs (their sum of
squares: the same work for both), backward. The two evaluators run interleaved
in one process (one warm-up run each, then ``--runs`` timed pairs); the medians
are printed, with how far their outputs and weight gradients differ. Feeds are
random: float inputs normal, integer inputs token ids below 1000 (an
``attention_mask`` input all ones). onnx2torch is not a dependency of onnxlrf:
run this in an environment that has both.

onnx2torch 1.5.15 runs three nodes of the exported MiniLM wrongly or not at
all: a GreaterOrEqual (it has no converter), a Clip with an omitted max (the
input named ``""``, which it looks up as a value) and a Flatten whose axis is
its input's rank (its module flattens to 1-D, then fails). Both evaluators
therefore run the graph rewritten with the same values: each
``GreaterOrEqual(a, b)`` written ``Not(Less(a, b))`` (equal on integers and on
floats without NaN), each Clip's omitted trailing bound dropped from its inputs,
each such Flatten written ``Reshape(x, [-1, 1])``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import Callable

import numpy as np
import onnx
import onnxruntime
import torch
from onnx2torch import convert
from onnx2torch.onnx_graph import OnnxGraph
from torch import fx

from onnxlrf.measure.torch_graph import TorchGraph

LAYER_OPS = ("Conv", "Gemm", "MatMul")


def layer_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """The Conv/Gemm/MatMul nodes whose weight (second input) is an initializer: the analysis' layers."""
    initializers = {init.name for init in model.graph.initializer}
    return [n for n in model.graph.node if n.op_type in LAYER_OPS and n.input[1] in initializers]


def onnx2torch_convertible(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, int]]:
    """A copy of ``model`` that onnx2torch converts, with the same values (see the module's doc), and how
    many nodes each rewrite changed."""
    model = onnx.shape_inference.infer_shapes(model)
    ranks = {v.name: len(v.type.tensor_type.shape.dim) for v in [*model.graph.input, *model.graph.value_info]}
    nodes, rewritten = [], {"greater_or_equal": 0, "clip_omitted_max": 0, "flatten_at_rank": 0}
    for node in model.graph.node:
        if node.op_type == "GreaterOrEqual":
            less = f"{node.output[0]}_less"
            nodes += [onnx.helper.make_node("Less", list(node.input), [less], name=f"{node.name}_less"),
                      onnx.helper.make_node("Not", [less], list(node.output), name=node.name)]
            rewritten["greater_or_equal"] += 1
            continue
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        if node.op_type == "Flatten" and axis == ranks.get(node.input[0]):
            shape = onnx.numpy_helper.from_array(np.array([-1, 1]), f"{node.output[0]}_shape")
            model.graph.initializer.append(shape)
            nodes.append(onnx.helper.make_node("Reshape", [node.input[0], shape.name], list(node.output),
                                               name=node.name))
            rewritten["flatten_at_rank"] += 1
            continue
        if node.op_type == "Clip" and len(node.input) == 3 and not node.input[2]:
            node.input.pop()
            rewritten["clip_omitted_max"] += 1
        nodes.append(node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return model, rewritten


def random_feeds(model: onnx.ModelProto, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random inputs of the graph's (fixed, else 64) shapes."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for info in model.graph.input:
        tensor = info.type.tensor_type
        shape = [d.dim_value or 64 for d in tensor.shape.dim]  # a named (dynamic) axis: the sequence
        if tensor.elem_type == onnx.TensorProto.FLOAT:
            feeds[info.name] = torch.from_numpy(rng.standard_normal(shape).astype(np.float32))
        elif info.name == "attention_mask":
            feeds[info.name] = torch.ones(shape, dtype=torch.int64)
        else:
            feeds[info.name] = torch.from_numpy(rng.integers(0, 1000, shape))
    return feeds


def onnx2torch_weights(module: fx.GraphModule, nodes: list[onnx.NodeProto]) -> dict[str, torch.Tensor]:
    """ONNX weight name -> the converted module's tensor holding it: a Conv's or Gemm's module parameter
    (nn.Conv2d, nn.Linear), else the buffer the node's module reads (a MatMul's), made a leaf with grad."""
    fx_nodes = {n.target: n for n in module.graph.nodes if n.op == "call_module"}
    weights = {}
    for node in nodes:
        submodule = module.get_submodule(OnnxGraph.generate_node_name(node))
        if isinstance(getattr(submodule, "weight", None), torch.nn.Parameter):
            weights[node.input[1]] = submodule.weight
        else:
            source = fx_nodes[OnnxGraph.generate_node_name(node)].args[1]
            weights[node.input[1]] = module.get_buffer(source.target).requires_grad_(True)
    return weights


def timed(step: Callable[[], None]) -> float:
    """Seconds ``step`` takes."""
    start = time.perf_counter()
    step()
    return time.perf_counter() - start


def compare(model: onnx.ModelProto, runs: int) -> dict:
    """Interleaved timings (seconds) of both evaluators' forward+backward, and their disagreement."""
    feeds = random_feeds(model)
    session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    expected = session.run(None, {k: v.numpy() for k, v in feeds.items()})  # the original graph's outputs
    model, rewritten = onnx2torch_convertible(model)
    nodes = layer_nodes(model)
    graph = TorchGraph(model, weights={n.input[1] for n in nodes})
    converted = convert(model)
    converted_weights = onnx2torch_weights(converted, nodes)
    results = {}

    def keep_output(outputs: list) -> Callable:
        def hook(*args) -> None:  # TorchGraph's (node, inputs, output), torch's (module, inputs, output)
            args[2].retain_grad()
            outputs.append(args[2])
        return hook

    def torch_graph_step() -> None:
        hooked: list = []
        for p in graph.parameters.values():
            p.grad = None
        outputs = graph(feeds, hook=keep_output(hooked), hook_nodes={n.name for n in nodes})
        sum(o.float().square().sum() for o in outputs).backward()
        results["torch_graph"] = (outputs, {k: p.grad for k, p in graph.parameters.items()}, hooked)

    converted_hooked: list = []
    for node in nodes:
        submodule = converted.get_submodule(OnnxGraph.generate_node_name(node))
        submodule.register_forward_hook(keep_output(converted_hooked))

    def onnx2torch_step() -> None:
        converted_hooked.clear()
        for w in converted_weights.values():
            w.grad = None
        outputs = converted(*(feeds[i.name] for i in model.graph.input))
        outputs = list(outputs) if isinstance(outputs, (tuple, list)) else [outputs]
        sum(o.float().square().sum() for o in outputs).backward()
        results["onnx2torch"] = (outputs, {k: w.grad for k, w in converted_weights.items()}, list(converted_hooked))

    times: dict[str, list[float]] = {"torch_graph": [], "onnx2torch": []}
    for run in range(runs + 1):  # the first pair warms up
        for name, step in (("torch_graph", torch_graph_step), ("onnx2torch", onnx2torch_step)):
            seconds = timed(step)
            if run:
                times[name].append(seconds)
    ours, theirs = results["torch_graph"], results["onnx2torch"]
    output_diff = max(float((a.detach() - b.detach()).abs().max()) for a, b in zip(ours[0], theirs[0]))
    onnxruntime_diff = {name: max(float(np.abs(o.detach().numpy() - e).max()) for o, e in zip(outputs, expected))
                        for name, outputs in (("torch_graph", ours[0]), ("onnx2torch", theirs[0]))}
    # nn.Linear holds a Gemm's weight transposed where the Gemm does not transpose it.
    grad_diff = max(float((g - (theirs[1][k] if theirs[1][k].shape == g.shape else theirs[1][k].T)).abs().max()
                          / g.abs().max()) for k, g in ours[1].items())
    return {"layers": len(nodes), "rewritten_for_onnx2torch": rewritten,
            "feeds": {k: list(v.shape) for k, v in feeds.items()}, "runs": runs, "threads": torch.get_num_threads(),
            "median_s": {k: statistics.median(v) for k, v in times.items()}, "times_s": times,
            "max_abs_output_diff": output_diff, "max_abs_output_diff_from_onnxruntime": onnxruntime_diff,
            "max_relative_weight_grad_diff": grad_diff,
            "output_abs_max": max(float(o.detach().abs().max()) for o in ours[0]),
            "hooked_outputs": {"torch_graph": len(ours[2]), "onnx2torch": len(theirs[2])}}


def main(argv: list[str] | None = None) -> int:
    """Command line: time one ONNX file, print the result (``--json``: also write it)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="an ONNX file")
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--json", help="also write the result to this file")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    report = {"model": args.model, "torch": torch.__version__, **compare(onnx.load(args.model), args.runs)}
    print(json.dumps({k: v for k, v in report.items() if k != "times_s"}, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
