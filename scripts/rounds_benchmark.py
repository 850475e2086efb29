"""Joint compression in several rounds against one round, held-out metric.

    python scripts/rounds_benchmark.py --model cifar10-resnet56 --mode lossless --targets 0.2,0.3 --rounds 3

Each run is ``onnxlrf.pipeline.compress_joint`` on the quality benchmark's splits
(seed 0: calibration / validation / held-out test as in ``quality_benchmark.py``),
so the one-round figures are that benchmark's joint rows. Prints one JSON line
per run (reduction, validation and held-out metric, the rounds' history, seconds)
and, with --out, writes them to rounds_<model>_<mode>[-label-free][-spatial][-no-refit][-<N>rounds].json (N: other than 3),
and each run's per-sample held-out predictions beside it, in rounds_<model>_<same tag>_test.npz (rows
named joint-<mode>[-label-free][-spatial][-no-refit]-<N>rounds[@target]), for scripts/paired_difference.py.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from quality_benchmark import (
    SETUPS,
    load_setup,
    row_key,
    write_predictions,
    write_results,
)

from onnxlrf.graph.layers import count_params
from onnxlrf.measure.analysis import AnalysisOptions
from onnxlrf.pipeline import compress_joint
from onnxlrf.planning.joint import PlanOptions
from onnxlrf.progress import Progress
from onnxlrf.runtime.evaluate import change_interval, model_predictions
from onnxlrf.verify.backoff import VerifyOptions
from onnxlrf.verify.splits import SplitOptions, split_dataset


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(SETUPS), default="cifar10-resnet56")
    parser.add_argument("--mode", choices=["lossless", "compact"], default="lossless")
    parser.add_argument("--targets", default="0.2,0.3", help="lossless: fractions of the parameters to remove.")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--spatial", action="store_true",
                        help="Joint analysis in spatial decomposition too, for k x k convs (compress --spatial).")
    parser.add_argument("--labels", choices=["labels", "predictions"], default="labels",
                        help="Calibration targets (compress --labels); predictions: label-free.")
    parser.add_argument("--no-refit", dest="refit", action="store_false",
                        help="Without the back-off's refit step (compress --no-refit; onnxlrf before stop 8).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, help="Directory for the JSON results.")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    reference, data, n_calib, n_val = load_setup(args.model)
    targets = [float(t) for t in args.targets.split(",")] if args.mode == "lossless" else [None]
    test = split_dataset(data, n_calib, n_val, args.seed).test
    tag = ("-label-free" if args.labels == "predictions" else "") + ("-spatial" if args.spatial else "") \
        + ("" if args.refit else "-no-refit")
    method = f"joint-{args.mode}{tag}-{args.rounds}rounds"
    predictions = {"original": model_predictions(reference, test, "cpu")}
    rows = []
    for target in targets:
        start = time.perf_counter()
        # The test split is scored here, from the predictions kept for paired_difference.py.
        result = compress_joint(reference, data, PlanOptions(args.mode, target_reduction=target),
                                SplitOptions(n_calib, n_val, args.seed),
                                AnalysisOptions(labels=args.labels, spatial=args.spatial),
                                VerifyOptions(rounds=args.rounds, refit=args.refit), provider="cpu",
                                report_test=False, progress=Progress(bars=False))
        key = row_key(method, target)
        predictions[key] = model_predictions(result.compressed, test, "cpu")
        rows.append({"mode": args.mode, "target": target, "rounds": args.rounds, "spatial": args.spatial,
                     "labels": args.labels, "refit": args.refit,
                     "reduction": 1 - count_params(result.compressed) / count_params(reference),
                     "val": result.splits["val"]["value"], "test": test.score_predictions(predictions[key]),
                     "reference_test": test.score_predictions(predictions["original"]),
                     "test_change_interval": change_interval(test, predictions[key], predictions["original"]),
                     "history": result.plan.options.get("rounds"), "seconds": time.perf_counter() - start})
        print(json.dumps(rows[-1]), flush=True)
    if args.out:
        name = f"rounds_{args.model}_{args.mode}{tag}" + (f"-{args.rounds}rounds" if args.rounds != 3 else "")
        write_results(args.out, f"{name}.json", rows)
        write_predictions(args.out, f"{name}_test.npz", predictions)
    return 0


if __name__ == "__main__":
    sys.exit(main())
