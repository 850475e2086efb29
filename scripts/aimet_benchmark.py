"""The real peer: Qualcomm AIMET's Spatial SVD and Weight SVD with its greedy ratio selection.

    pip install aimet-torch        # optional; a pure-Python wheel, kept out of onnxlrf's dependencies
    python scripts/aimet_benchmark.py --model cifar10-resnet20 --out results/

Same splits as scripts/quality_benchmark.py (seed 0: calibration 1,000 /
validation 1,000 / held-out test 8,000 of the shared CIFAR-10 images). AIMET's
greedy selection scores each layer at each candidate ratio with an evaluation
callback; it gets the calibration and validation images (the 2,000 the joint
method sees), never the test split. Its compressed torch model is exported
to ONNX and evaluated on the held-out test split in onnxruntime, and its
parameter reduction is counted on the ONNX file exactly as for every other
method (``planning.count_params``; AIMET's own cost counts only the layers it
compresses). The first conv is left alone, as in AIMET's examples.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from onnxlrf.compress import _metric, split_dataset
from onnxlrf.data import load_data
from onnxlrf.export import export_model
from onnxlrf.models import load_model
from onnxlrf.onnx_io import load_onnx
from onnxlrf.planning import count_params
from quality_benchmark import print_table, write_results  # scripts/ is on sys.path when a script runs

SHARED = Path(os.environ.get("ONNXLRF_SHARED", Path(__file__).resolve().parents[2] / "shared")) / "data"
WEIGHTS = {"cifar10-resnet20": "resnet20-12fca82f.th", "cifar10-resnet56": "resnet56-4bfd9763.th"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(WEIGHTS), default="cifar10-resnet20")
    parser.add_argument("--targets", default="0.05,0.1,0.2,0.3,0.5")
    parser.add_argument("--schemes", default="spatial_svd,weight_svd")
    parser.add_argument("--candidates", type=int, default=10, help="AIMET's comp-ratio candidates per layer.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, help="Directory for the JSON results.")
    args = parser.parse_args()
    try:
        from aimet_torch.common.defs import CompressionScheme, CostMetric, GreedySelectionParameters
        from aimet_torch.compress import ModelCompressor
        from aimet_torch.defs import SpatialSvdParameters, WeightSvdParameters
    except ImportError:
        print("this benchmark needs AIMET: pip install aimet-torch", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731

    spec = load_model(args.model, weights=str(SHARED / "cifar10" / WEIGHTS[args.model]))
    work = Path(tempfile.mkdtemp(prefix="onnxlrf-aimet-"))
    reference = load_onnx(export_model(spec, work / "reference.onnx", dynamic_batch=True).path)
    dataset = load_data("cifar10-jpeg:" + str(SHARED / "cifar10" / "cifar10_test_jpeg.npz"), reference)
    splits = split_dataset(dataset, 1000, 1000, args.seed)
    total = count_params(reference)
    reference_test = _metric(reference, splits.test, "cpu")
    (name,) = splits.calib.inputs
    seen_x = torch.from_numpy(np.concatenate([splits.calib.inputs[name], splits.val.inputs[name]]))
    seen_y = torch.from_numpy(np.concatenate([splits.calib.labels, splits.val.labels]))

    def evaluate(model: torch.nn.Module, iterations: int | None = None, use_cuda: bool = False) -> float:
        model.eval()
        with torch.no_grad():
            correct = sum(int((model(seen_x[i:i + 500]).argmax(1) == seen_y[i:i + 500]).sum())
                          for i in range(0, len(seen_x), 500))
        return correct / len(seen_x)

    rows = []
    for scheme in args.schemes.split(","):
        scores = work / f"{scheme}-eval-scores.pkl"  # AIMET's per-layer sweep, reused across targets
        for target in [float(t) for t in args.targets.split(",")]:
            greedy = GreedySelectionParameters(target_comp_ratio=1.0 - target,
                                               num_comp_ratio_candidates=args.candidates,
                                               saved_eval_scores_dict=str(scores) if scores.exists() else None)
            ignore = [spec.module.conv1]
            if scheme == "spatial_svd":
                params = SpatialSvdParameters(SpatialSvdParameters.Mode.auto,
                                              SpatialSvdParameters.AutoModeParams(greedy, modules_to_ignore=ignore))
                kind = CompressionScheme.spatial_svd
            else:
                from aimet_torch.common.defs import RankSelectScheme

                params = WeightSvdParameters(WeightSvdParameters.Mode.auto,
                                             WeightSvdParameters.AutoModeParams(RankSelectScheme.greedy, greedy,
                                                                                modules_to_ignore=ignore))
                kind = CompressionScheme.weight_svd
            start = time.perf_counter()
            cwd = os.getcwd()
            os.chdir(work)  # AIMET writes its eval-score pickle under ./data
            try:
                model, _ = ModelCompressor.compress_model(copy.deepcopy(spec.module), evaluate, None, (1, 3, 32, 32),
                                                          kind, CostMetric.memory, params)
            except Exception as exc:  # a target AIMET cannot reach is a result, not a crash
                rows.append({"method": f"aimet-{scheme}", "target": target, "error": str(exc)})
                log(f"aimet {scheme} {target}: {exc}")
                continue
            finally:
                os.chdir(cwd)
            seconds = time.perf_counter() - start
            saved = work / "data" / "greedy_selection_eval_scores_dict.pkl"
            if saved.exists() and not scores.exists():
                saved.rename(scores)
            compressed_spec = copy.copy(spec)
            compressed_spec.module = model.eval()
            path = export_model(compressed_spec, work / f"{scheme}-{target}.onnx", dynamic_batch=True,
                                overwrite=True).path
            compressed = load_onnx(path)
            value = _metric(compressed, splits.test, "cpu")
            reduction = 1 - count_params(compressed) / total
            rows.append({"method": f"aimet-{scheme}", "target": target, "reduction": reduction, "test": value,
                         "reference_test": reference_test, "seconds": seconds})
            log(f"aimet {scheme} target {target}: reduction {reduction:.3f} test {value:.4f} "
                f"(original {reference_test:.4f}) {seconds:.0f} s")

    print(f"\n{args.model}: AIMET (aimet-torch) held-out test top-1 ({len(splits.test)} images; original "
          f"{reference_test:.4f}); seed {args.seed}\n")
    print_table(rows, "failed")
    if args.out:
        write_results(args.out, f"aimet_{args.model}.json",
                      {"model": args.model, "reference_test": reference_test, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
