"""Joint compression in several rounds against one round, held-out metric.

    python scripts/rounds_benchmark.py --model cifar10-resnet56 --mode lossless --targets 0.2,0.3 --rounds 3

Each run is ``compress.compress_joint`` on the quality benchmark's splits
(seed 0: calibration / validation / held-out test as in ``quality_benchmark.py``),
so the one-round figures are that benchmark's joint rows. Prints one JSON line
per run (reduction, validation and held-out metric, the rounds' history, seconds)
and, with --out, writes them to rounds_<model>_<mode>[-label-free][-spatial][-<N>rounds].json (N: other than 3).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from onnxlrf.compress import compress_joint
from onnxlrf.planning import count_params
from onnxlrf.progress import Progress

from quality_benchmark import SETUPS, load_setup, write_results


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
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, help="Directory for the JSON results.")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    reference, data, n_calib, n_val = load_setup(args.model)
    targets = [float(t) for t in args.targets.split(",")] if args.mode == "lossless" else [None]
    rows = []
    for target in targets:
        start = time.perf_counter()
        result = compress_joint(reference, data, args.mode, target_reduction=target, calib=n_calib, val=n_val,
                                seed=args.seed, provider="cpu", rounds=args.rounds, progress=Progress(bars=False),
                                spatial=args.spatial, labels=args.labels)
        rows.append({"mode": args.mode, "target": target, "rounds": args.rounds, "spatial": args.spatial,
                     "labels": args.labels,
                     "reduction": 1 - count_params(result.compressed) / count_params(reference),
                     "val": result.splits["val"]["value"], "test": result.splits["test"]["value"],
                     "reference_test": result.splits["test"]["reference_value"],
                     "test_change_interval": result.splits["test"]["change_interval"],
                     "history": result.plan.options.get("rounds"), "seconds": time.perf_counter() - start})
        print(json.dumps(rows[-1]), flush=True)
    if args.out:
        suffix = ("-label-free" if args.labels == "predictions" else "") + ("-spatial" if args.spatial else "") \
            + (f"-{args.rounds}rounds" if args.rounds != 3 else "")
        write_results(args.out, f"rounds_{args.model}_{args.mode}{suffix}.json", rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
