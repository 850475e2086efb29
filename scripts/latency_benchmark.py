"""Does removing parameters make the model faster? Original and compressed timed interleaved, in one run.

    python scripts/latency_benchmark.py --models resnet50,minilm --batches 1,32 --work bench-work/

Models (random weights; latency does not depend on the values): torchvision
ResNet-18, ResNet-50, ResNeXt-50 32x4d at 224x224, and the MiniLM encoder
(all-MiniLM-L6-v2) at sequence length 128. Each is exported once (cached in
--work) and pinned to static input shapes per batch.

Settings, each at every --reductions level:
  params            uniform rank fraction, the fraction of the factorizable layers' parameters removed
                    (for MiniLM the word embeddings, half the model, are not factorizable; rank multiple 1)
  params-m8         the same with ranks rounded up to multiples of 8
  flops-m8          uniform rank fraction, the fraction of Conv/Gemm/MatMul FLOPs removed, multiples of 8
  latency-m8        uniform rank fraction, the fraction of the measured latency removed (layers whose
                    factorized pair is not faster stay dense; channel or spatial by measured cost)

Per setting: original and compressed median latency (warm-up, then interleaved
runs), speedup, the ideal speedup (FLOPs ratio of Conv/Gemm/MatMul) and
speedup/ideal. For the latency cost model it also prints the sum of the dense
layers' single-node latencies against the whole model's, and the predicted
latency reduction of each latency-target plan next to the measured one.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import onnx
from onnxlrf.models import load_model

from onnxlrf.costs.flops import FlopsCost
from onnxlrf.costs.latency import LatencyCost
from onnxlrf.costs.params import ParamsCost
from onnxlrf.export import export_model
from onnxlrf.graph.layers import count_params, find_layers
from onnxlrf.onnx_io import load_onnx
from onnxlrf.planning.plan import Plan
from onnxlrf.progress import Progress
from onnxlrf.runtime.evaluate import benchmark
from onnxlrf.runtime.sessions import select_providers
from onnxlrf.runtime.shapes import concrete_input_shapes, count_flops
from onnxlrf.runtime.timing import device_name
from onnxlrf.techniques.lowrank.planners import plan_uniform
from onnxlrf.techniques.lowrank.rewrite import apply_plan

MODELS = {
    "resnet18": "torchvision:resnet18",
    "resnet50": "torchvision:resnet50",
    "resnext50": "torchvision:resnext50_32x4d",
    "minilm": "minilm",
}
SEQ_LENGTH = 128
SETTINGS = ("params", "params-m8", "flops-m8", "latency-m8")


def static_copy(model: onnx.ModelProto, batch: int) -> onnx.ModelProto:
    """The model with every input dim fixed (batch, sequence 128), outputs' symbolic dims cleared."""
    shapes = concrete_input_shapes(model, batch, SEQ_LENGTH)
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    del copy.graph.value_info[:]
    for value in copy.graph.output:
        value.type.tensor_type.ClearField("shape")
    for value in copy.graph.input:
        if value.name in shapes:
            dims = value.type.tensor_type.shape
            dims.ClearField("dim")
            for size in shapes[value.name]:
                dims.dim.add().dim_value = size
    return onnx.shape_inference.infer_shapes(copy)


def uniform_plan(reference: onnx.ModelProto, setting: str, reduction: float, costs: dict) -> Plan:
    """``plan_uniform`` for a setting (``params``, ``params-m8``, ...; ``costs`` by target). A params
    reduction counts the factorizable layers' parameters, not the embeddings'."""
    target, _, multiple = setting.partition("-m")
    if target == "params":
        reduction *= sum(layer.params for layer in find_layers(reference)[0]) / count_params(reference)
    return plan_uniform(reference, target_reduction=reduction, target=target, rank_multiple=int(multiple or 1),
                        cost=costs[target])


def exported(name: str, work: Path) -> onnx.ModelProto:
    path = work / f"{name}.onnx"
    if not path.exists():
        export_model(load_model(MODELS[name]), path, dynamic_batch=True)
    return load_onnx(path)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="resnet18,resnet50,resnext50,minilm")
    parser.add_argument("--batches", default="1,32")
    parser.add_argument("--reductions", default="0.3,0.5,0.7")
    parser.add_argument("--settings", default=",".join(SETTINGS))
    parser.add_argument("--provider", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--io-binding", action="store_true", help="Bind inputs/outputs on the device (GPU timing).")
    parser.add_argument("--threads", type=int, help="onnxruntime intra-op threads (default: min(2, cores)).")
    parser.add_argument("--runs", type=int, help="Timed rounds per setting (default: 30 at batch 1, 8 above).")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--work", type=Path, default=Path("latency-work"), help="Exports and the latency cache.")
    parser.add_argument("--out", type=Path, help="Write the rows as JSON here.")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    progress = Progress()
    providers = select_providers(args.provider)
    device = device_name(providers)
    settings = [s for s in args.settings.split(",") if s]
    unknown = set(settings) - set(SETTINGS)
    if unknown:
        parser.error(f"unknown settings {sorted(unknown)}; known: {', '.join(SETTINGS)}")
    rows, cost_rows = [], []
    for name in args.models.split(","):
        dynamic = exported(name, args.work)
        for batch in [int(b) for b in args.batches.split(",")]:
            reference = static_copy(dynamic, batch)
            runs = args.runs or (30 if batch == 1 else 8)
            shapes = concrete_input_shapes(reference, batch, SEQ_LENGTH)
            reference_flops = count_flops(reference, shapes)
            costs = {"params": ParamsCost(reference), "flops": FlopsCost(reference, batch, SEQ_LENGTH)}
            layer_params = sum(layer.params for layer in find_layers(reference)[0])
            if "latency-m8" in settings:
                start = time.perf_counter()
                latency = LatencyCost(reference, batch, SEQ_LENGTH, args.provider, args.threads, rank_multiple=8,
                                      io_binding=args.io_binding or None, cache=args.work / "latency-cache",
                                      progress=progress)
                costs["latency"] = latency
                cost_rows.append({"model": name, "batch": batch, **latency.describe(),
                                  "seconds": time.perf_counter() - start})
                progress.log(f"{name} b{batch}: cost model measured in {time.perf_counter() - start:.0f} s")
            for setting in settings:
                for reduction in [float(r) for r in args.reductions.split(",")]:
                    row = {"model": name, "batch": batch, "setting": setting, "reduction": reduction,
                           "device": device}
                    try:
                        plan = uniform_plan(reference, setting, reduction, costs)
                    except Exception as exc:  # out of reach is a result
                        row["error"] = str(exc)
                        rows.append(row)
                        progress.log(f"{name} b{batch} {setting} {reduction}: {exc}")
                        continue
                    compressed, _ = apply_plan(reference, plan)
                    result = benchmark(compressed, reference, batch=batch, warmup=args.warmup, runs=runs,
                                       provider=args.provider, threads=args.threads, io_binding=args.io_binding)
                    flops = count_flops(compressed, shapes)
                    row.update({
                        "params_reduction": 1 - count_params(compressed) / count_params(reference),
                        "layer_params_reduction": (count_params(reference) - count_params(compressed)) / layer_params,
                        "flops_reduction": 1 - flops / reference_flops,
                        "predicted_reduction": plan.options["achieved_reduction"],
                        "reference_ms": result.reference_latency_ms, "compressed_ms": result.latency_ms,
                        "speedup": result.speedup, "ideal": reference_flops / flops,
                        "providers": result.providers, "runs": runs,
                    })
                    row["quotient"] = row["speedup"] / row["ideal"]
                    rows.append(row)
                    progress.log(f"{name} b{batch} {setting} {reduction}: {row['reference_ms']:.2f} -> "
                                 f"{row['compressed_ms']:.2f} ms, speedup {row['speedup']:.2f}x, ideal "
                                 f"{row['ideal']:.2f}x, quotient {row['quotient']:.2f} (layer params -"
                                 f"{row['layer_params_reduction']:.0%}, FLOPs -{row['flops_reduction']:.0%})")
                    if args.out:  # partial results survive an interrupted run
                        args.out.write_text(json.dumps({"rows": rows, "cost_model": cost_rows}, indent=1))

    print(f"\nDevice: {device}; providers {', '.join(providers)}; I/O binding {args.io_binding}\n")
    print("| model | batch | setting | target | layer params -% | FLOPs -% | original ms | compressed ms | speedup | "
          "ideal | speedup/ideal |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        head = f"| {row['model']} | {row['batch']} | {row['setting']} | {row['reduction']:.0%} |"
        if "error" in row:
            print(f"{head} out of reach | | | | | | |")
            continue
        print(f"{head} {row['layer_params_reduction']:.1%} | {row['flops_reduction']:.1%} | {row['reference_ms']:.2f} | "
              f"{row['compressed_ms']:.2f} | {row['speedup']:.2f}x | {row['ideal']:.2f}x | {row['quotient']:.2f} |")
    if cost_rows:
        print("\n| model | batch | whole model ms | sum of single-node layers ms | sum / whole | in-graph scale | "
              "measure (s) |")
        print("|---|---|---|---|---|---|---|")
        for row in cost_rows:
            print(f"| {row['model']} | {row['batch']} | {row['model_ms']:.2f} | {row['layer_sum_ms']:.2f} | "
                  f"{row['layer_sum_ms'] / row['model_ms']:.2f} | {row['scale']:.2f} | {row['seconds']:.0f} |")
        print("\nLatency targets: predicted vs measured latency reduction (1 - 1/speedup)\n")
        print("| model | batch | target | predicted | measured |")
        print("|---|---|---|---|---|")
        for row in rows:
            if row["setting"].startswith("latency") and "error" not in row:
                print(f"| {row['model']} | {row['batch']} | {row['reduction']:.0%} | "
                      f"{row['predicted_reduction']:.1%} | {1 - 1 / row['speedup']:.1%} |")
    if args.out:
        args.out.write_text(json.dumps({"rows": rows, "cost_model": cost_rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
