"""Validation and held-out metric of uniform plans, rounded to nearest and sequentially, on split seeds.

    python scripts/uniform_validation.py --model minilm --seeds 1,2,3,4,5 --out scripts/results -- --bits 4 --activations int8

What the lossless back-off compares when it verifies a uniform baseline beside its knapsack plans: per
seed, ``onnxlrf compress MODEL --technique quant --mode uniform --rounding R`` (the flags after ``--``
added) for R in nearest and sequential, each model's metric on the seed's validation split (as the
back-off scores it) and its held-out change from the CLI's JSON. Writes ``uniform_validation_<model>_<tag>.json``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import onnx

from onnxlrf.data import load_data
from onnxlrf.runtime.evaluate import model_metric
from onnxlrf.verify.splits import SplitOptions, split_dataset
from seeds_benchmark import COMMANDS  # scripts/ is on sys.path when a script runs

ROUNDINGS = ("nearest", "sequential")


def split_flag(flags: list[str], name: str, default: str) -> str:
    return flags[flags.index(name) + 1] if name in flags else default


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(COMMANDS), required=True)
    parser.add_argument("--seeds", default="1,2,3,4,5")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--tag", default="", help="Suffix of the results file.")
    args, extra = parser.parse_known_args()
    extra = [flag for flag in extra if flag != "--"]
    flags = COMMANDS[args.model]
    data_spec = split_flag(flags, "--data", "")
    calib = int(split_flag(flags, "--calib", str(SplitOptions.calib)))
    val = int(split_flag(flags, "--val", str(SplitOptions.val)))
    rows, dataset = [], None
    with tempfile.TemporaryDirectory() as tmp:
        for seed in (int(s) for s in args.seeds.split(",")):
            splits = None
            for rounding in ROUNDINGS:
                path = Path(tmp) / f"{seed}-{rounding}.onnx"
                command = [sys.executable, "-m", "onnxlrf.cli", "compress", *flags, "--mode", "uniform", "--seed",
                           str(seed), "-o", str(path), "--json", "--quiet", "--technique", "quant", "--rounding",
                           rounding, *extra]
                result = json.loads(subprocess.run(command, capture_output=True, text=True, check=True).stdout)
                model = onnx.load(str(path))
                # Every model here has the original's inputs: the data is loaded once, split once a seed.
                if splits is None:
                    dataset = load_data(data_spec, model) if dataset is None else dataset
                    splits = split_dataset(dataset, calib, val, seed)
                rows.append({"seed": seed, "rounding": rounding, "command": " ".join(["onnxlrf", *command[3:]]),
                             "val": model_metric(model, splits.val, "auto"),
                             "held_out_change": result["value"] - result["reference_value"],
                             "change_interval": result["change_interval"]})
                print(f"seed {seed}, {rounding}: validation {rows[-1]['val']:.4f}, held-out change "
                      f"{rows[-1]['held_out_change']:+.4f}", flush=True)
            if args.out:
                args.out.mkdir(parents=True, exist_ok=True)
                name = f"uniform_validation_{args.model}{'_' + args.tag if args.tag else ''}.json"
                (args.out / name).write_text(json.dumps({"model": args.model, "extra_flags": extra, "rows": rows},
                                                        indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
