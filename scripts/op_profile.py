"""Where the time goes: onnxruntime's profile of a model and of its compressed copy, per op type.

    python scripts/op_profile.py --model minilm --batch 32 --setting flops-m8 --reduction 0.5

The model and the setting are the latency benchmark's (``latency_benchmark.py``:
random weights, static inputs, ``plan_uniform``). Both models are profiled on the
same inputs, interleaved (CPU provider unless --provider, 2 threads, no spinning;
median of --runs runs after --warmup). Kernels are split into *weight layers* (Conv/Gemm/MatMul nodes
with an initializer input, and onnxruntime's fusions of them with their bias: what
the rewrite factorizes) and *the rest*. It prints
the weight layers' measured speedup against their own FLOPs ratio, and the
whole-model quotient speedup / ideal that a rewrite running exactly at the weight
layers' FLOPs ratio would reach: the rest bounds it.
"""

from __future__ import annotations

import argparse
import bisect
import collections
import json
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from latency_benchmark import MODELS, SEQ_LENGTH, exported, static_copy, uniform_plan

from onnxlrf.costs.flops import FlopsCost
from onnxlrf.costs.params import ParamsCost
from onnxlrf.runtime.sessions import random_feeds, select_providers
from onnxlrf.runtime.shapes import concrete_input_shapes, count_flops, flops_by_node
from onnxlrf.techniques.lowrank.rewrite import apply_plan


def profiles(models: dict[str, onnx.ModelProto], feeds: dict, providers: list[str], runs: int, warmup: int,
             work: Path) -> dict[str, dict]:
    """Per model: median kernel ms per run of each op type, of the weight layers and of the rest.

    The models run interleaved (one run of each per round), so load on the machine
    falls on both alike; the first ``warmup`` runs of each are left out.
    """
    sessions = {}
    for tag, model in models.items():
        options = ort.SessionOptions()
        options.intra_op_num_threads = 2
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.enable_profiling = True
        options.profile_file_prefix = str(work / tag)  # one file per model
        sessions[tag] = ort.InferenceSession(model.SerializeToString(), options, providers=providers)
    for _ in range(warmup + runs):
        for session in sessions.values():
            session.run(None, feeds)
    results = {}
    for tag, session in sessions.items():
        events = json.loads(Path(session.end_profiling()).read_text())
        starts = sorted(e["ts"] for e in events if e.get("cat") == "Session" and e["name"] == "model_run")
        initializers = {init.name for init in models[tag].graph.initializer}
        # onnxruntime names a fused node after the first node it fused ("<name>/MatMulAddFusion").
        layer_nodes = {node.name for node in models[tag].graph.node
                       if node.op_type in ("Conv", "Gemm", "MatMul") and initializers & set(node.input[:2])}
        per_run = [collections.Counter() for _ in starts]
        for event in events:
            if event.get("cat") != "Node" or not event["name"].endswith("_kernel_time"):
                continue
            run = per_run[bisect.bisect_right(starts, event["ts"]) - 1]
            name, ms = event["name"].removesuffix("_kernel_time"), event["dur"] / 1000
            run[event["args"]["op_name"]] += ms
            run["weight layers" if name.split("/MatMulAddFusion")[0] in layer_nodes else "the rest"] += ms
        kept = per_run[warmup:]
        results[tag] = {key: float(np.median([run[key] for run in kept])) for key in set().union(*kept)}
    return results


def weight_flops(model: onnx.ModelProto, shapes: dict[str, list[int]]) -> int:
    """FLOPs of the Conv/Gemm/MatMul nodes that read an initializer."""
    initializers = {init.name for init in model.graph.initializer}
    readers = {node.name for node in model.graph.node if initializers & set(node.input[:2])}
    return sum(flops for name, flops in flops_by_node(model, shapes).items() if name in readers and flops)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(MODELS), default="minilm")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--setting", choices=["params", "params-m8", "flops-m8"], default="flops-m8")
    parser.add_argument("--reduction", type=float, default=0.5)
    parser.add_argument("--runs", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--provider", choices=["auto", "cpu", "cuda"], default="cpu")
    parser.add_argument("--work", type=Path, default=Path("latency-work"), help="Exports (as latency_benchmark.py).")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    reference = static_copy(exported(args.model, args.work), args.batch)
    shapes = concrete_input_shapes(reference, args.batch, SEQ_LENGTH)
    costs = {"params": ParamsCost(reference), "flops": FlopsCost(reference, args.batch, SEQ_LENGTH)}
    plan = uniform_plan(reference, args.setting, args.reduction, costs)
    compressed, _ = apply_plan(reference, plan)
    feeds = random_feeds(reference, args.batch, SEQ_LENGTH)
    with tempfile.TemporaryDirectory() as tmp:
        measured = profiles({"original": reference, "compressed": compressed}, feeds, select_providers(args.provider),
                            args.runs, args.warmup, Path(tmp))
    ref, cmp = (collections.Counter(measured[tag]) for tag in ("original", "compressed"))

    print(f"{args.model}, batch {args.batch}, {args.setting} at {args.reduction:.0%}; {args.provider} provider; "
          f"kernel ms per run (median of {args.runs}, interleaved)\n")
    print("| op type | original ms | compressed ms |\n|---|---|---|")
    parts = ("weight layers", "the rest")
    for op in sorted((set(ref) | set(cmp)) - set(parts), key=lambda op: -max(ref[op], cmp[op])):
        print(f"| {op} | {ref[op]:.1f} | {cmp[op]:.1f} |")
    ref_weights, ref_rest = ref[parts[0]], ref[parts[1]]
    cmp_weights, cmp_rest = cmp[parts[0]], cmp[parts[1]]
    ideal = count_flops(reference, shapes) / count_flops(compressed, shapes)
    layer_ideal = weight_flops(reference, shapes) / weight_flops(compressed, shapes)
    reference_ms, compressed_ms = ref_weights + ref_rest, cmp_weights + cmp_rest
    bound = reference_ms / (ref_weights / layer_ideal + ref_rest)
    print(f"\nweight layers: {ref_weights:.1f} -> {cmp_weights:.1f} ms, {ref_weights / cmp_weights:.2f}x "
          f"against their FLOPs ratio {layer_ideal:.2f}x ({ref_weights / cmp_weights / layer_ideal:.2f} of it); "
          f"{ref_weights / reference_ms:.0%} of the original's kernel time")
    print(f"the rest: {ref_rest:.1f} -> {cmp_rest:.1f} ms")
    print(f"whole model: {reference_ms:.1f} -> {compressed_ms:.1f} ms, {reference_ms / compressed_ms:.2f}x, ideal "
          f"(FLOPs) {ideal:.2f}x, quotient {reference_ms / compressed_ms / ideal:.2f}")
    print(f"with the weight layers exactly at their FLOPs ratio and the rest unchanged: {bound:.2f}x, "
          f"quotient {bound / ideal:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
