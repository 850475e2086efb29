"""Which held-out differences between methods the test split can resolve: paired-bootstrap intervals.

    python scripts/paired_difference.py --model minilm --results scripts/results
    python scripts/paired_difference.py --model minilm --results scripts/results --against aimet-weight_svd@0.05
    python scripts/paired_difference.py --model minilm --results scripts/results --against joint-lossless-label-free

Reads the per-sample held-out predictions that quality_benchmark.py,
aimet_benchmark.py and rounds_benchmark.py keep (quality_<model>_test.npz,
aimet_<model>_test.npz, rounds_<model>_<tag>_test.npz in --results), rebuilds
the same test split (seed 0, the benchmarks' sizes) for its labels, and prints each row's metric, its change against the --against row
(default: the original model; a method without "@target": that method's row at
each row's own target) and the 95% interval of that change
(onnxlrf.runtime.evaluate.change_interval: both rows scored on the same 2,000
resamples of the test samples). An interval that contains 0 is a difference the
test split does not resolve.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from quality_benchmark import (  # scripts/ is on sys.path when a script runs
    SETUPS,
    load_setup,
)

from onnxlrf.runtime.evaluate import change_interval
from onnxlrf.verify.splits import split_dataset


def load_rows(results: Path, model: str) -> dict[str, np.ndarray]:
    """Every saved row of ``model``'s benchmarks in ``results``; the files must agree on the original."""
    rows: dict[str, np.ndarray] = {}
    for path in sorted([*results.glob(f"*_{model}_test.npz"), *results.glob(f"rounds_{model}_*_test.npz")]):
        with np.load(path) as saved:
            for key in saved.files:
                if key == "original" and key in rows and not np.allclose(rows[key], saved[key], atol=1e-6):
                    raise SystemExit(f"{path}: its original's predictions differ from another file's: not the same split")
                rows.setdefault(key, saved[key])
    if "original" not in rows:
        raise SystemExit(f"no saved predictions of {model} with the original's in {results}")
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(SETUPS), required=True)
    parser.add_argument("--results", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--against", default="original",
                        help="The row every other row is compared with; a method without @target: its row at "
                             "each row's target.")
    parser.add_argument("--seed", type=int, default=0, help="The benchmarks' split seed.")
    args = parser.parse_args()

    rows = load_rows(args.results, args.model)
    per_target = args.against not in rows
    if per_target and not any(key.startswith(f"{args.against}@") for key in rows):
        raise SystemExit(f"no row {args.against!r}; saved rows: {', '.join(sorted(rows))}")
    _, dataset, n_calib, n_val = load_setup(args.model)
    test = split_dataset(dataset, n_calib, n_val, args.seed).test
    print(f"{args.model}: held-out {test.metric_name} on {len(test)} samples; change against {args.against}"
          f"{' at the same target' if per_target else ''} with its 95% paired-bootstrap interval\n")
    print("| row | metric | against | change | 95% interval | resolved |")
    print("|---|---|---|---|---|---|")
    for key in sorted(rows, key=lambda k: (k.rsplit("@", 1)[-1] if "@" in k else "~", k)):
        against = f"{args.against}@{key.rsplit('@', 1)[-1]}" if per_target and "@" in key else args.against
        if key == against or against not in rows:
            continue
        value, base = test.score_predictions(rows[key]), test.score_predictions(rows[against])
        low, high = change_interval(test, rows[key], rows[against])
        resolved = "better" if low > 0 else "worse" if high < 0 else "no"
        print(f"| {key} | {value:.4f} | {base:.4f} | {value - base:+.4f} | [{low:+.4f}, {high:+.4f}] | {resolved} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
