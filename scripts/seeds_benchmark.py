"""The headline rows: `onnxlrf compress` with default flags on split seeds 1 to 5, mean and spread.

    python scripts/seeds_benchmark.py --model cifar10-resnet56 --seeds 1,2,3,4,5 --out scripts/results
    python scripts/seeds_benchmark.py --model minilm --mode compact --out scripts/results

Each seed runs the CLI exactly as a user would (one process, `--json`), so its time and peak
memory (of the child process) are the whole job's. Per seed it keeps the CLI's JSON; it prints each
seed's reduction, held-out change with its 95% paired interval, time and peak memory, then the
mean and spread (min, max) over the seeds, and writes ``seeds_<model>_<mode>.json``.
Extra CLI flags go after ``--``.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
CIFAR = "cifar10-jpeg:" + str(SHARED / "cifar10/cifar10_test_jpeg.npz")
COMMANDS = {
    "cifar10-resnet20": ["cifar10-resnet20", "--weights", str(SHARED / "cifar10/resnet20-12fca82f.th"),
                         "--dynamic-batch", "--data", CIFAR],
    "cifar10-resnet56": ["cifar10-resnet56", "--weights", str(SHARED / "cifar10/resnet56-4bfd9763.th"),
                         "--dynamic-batch", "--data", CIFAR],
    "minilm": ["minilm", "--dynamic-batch", "--data", "stsb:" + str(SHARED / "stsb/sts-test.csv"),
               "--calib", "300", "--val", "300"],
}


def export_args(model: str) -> list[str]:
    """The model flags of ``COMMANDS[model]``, without the data and split flags (what ``onnxlrf export`` takes)."""
    args, flags = [], iter(COMMANDS[model])
    for flag in flags:
        if flag in ("--data", "--calib", "--val"):
            next(flags)
        else:
            args.append(flag)
    return args


def bench(output: Path, reference: Path, batch: int) -> dict:
    """``onnxlrf bench`` of ``output`` against ``reference``, interleaved, 1 thread, CPU provider."""
    command = [sys.executable, "-m", "onnxlrf.cli", "bench", str(output), "--reference", str(reference), "--batch",
               str(batch), "--threads", "1", "--provider", "cpu", "--runs", "20", "--json", "--quiet"]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return {"command": " ".join(["onnxlrf", *command[3:]]), **json.loads(done.stdout)}


def run_seed(model: str, mode: str, seed: int, extra: list[str], reference: Path | None = None,
             bench_batch: int | None = None) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        command = [sys.executable, "-m", "onnxlrf.cli", "compress", *COMMANDS[model], "--mode", mode,
                   "--seed", str(seed), "-o", str(Path(tmp) / "out.onnx"), "--plan-out", str(Path(tmp) / "plan.json"),
                   "--json", *extra]
        before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        start = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        seconds = time.perf_counter() - start
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        if done.returncode != 0:
            raise SystemExit(f"seed {seed}: {done.stderr.strip().splitlines()[-1]}")
        speed = None if bench_batch is None else bench(Path(tmp) / "out.onnx", reference, bench_batch)
        plan_options = json.loads((Path(tmp) / "plan.json").read_text())["options"]
    result = json.loads(done.stdout)
    # ru_maxrss of children is the largest child so far (KiB): exact for the first, a bound after.
    return {"seed": seed, "command": " ".join(["onnxlrf", *command[3:]]), "seconds": seconds,
            "peak_rss_gib": max(peak, before) / 2**20, "result": result, **({"bench": speed} if speed else {}),
            "plan_options": plan_options, "log": [line for line in done.stderr.splitlines() if line.strip()]}


def held_out(result: dict) -> dict:
    """The held-out test figures of a CLI result: under ``test`` for the joint modes, at the top for the others."""
    return result.get("test") or result


def size_text(result: dict) -> str:
    if result.get("technique") == "quant":
        return f"{result['average_weight_bits']:.2f} average weight bits, {result['model_bytes']:,} bytes"
    return f"{result['params_reduction']:.1%} fewer parameters"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(COMMANDS), required=True)
    parser.add_argument("--mode", default="compact")
    parser.add_argument("--seeds", default="1,2,3,4,5")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--tag", default="", help="Suffix of the results file (a variant's name).")
    parser.add_argument("--bench-batch", type=int,
                        help="Also time each compressed model against the original (onnxlrf bench, interleaved, "
                             "1 thread, CPU) at this batch.")
    args, extra = parser.parse_known_args()
    extra = [flag for flag in extra if flag != "--"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        reference = None
        if args.bench_batch:
            reference = Path(tmp) / "reference.onnx"
            subprocess.run([sys.executable, "-m", "onnxlrf.cli", "export", *export_args(args.model), "-o",
                            str(reference), "--quiet"], check=True)
        for seed in (int(s) for s in args.seeds.split(",")):
            rows.append(run_seed(args.model, args.mode, seed, extra, reference, args.bench_batch))
            report(rows[-1])
            write(args, extra, rows)  # after every seed: a long run cut short keeps the seeds it finished
    summarize(args, extra, rows)
    return 0


def report(row: dict) -> None:
    """One seed's line."""
    seed = row["seed"]
    test = held_out(row["result"])
    change = test["value"] - test["reference_value"]
    low, high = test["change_interval"]
    speed = f", {row['bench']['speedup']:.2f}x the original's speed" if "bench" in row else ""
    print(f"seed {seed}: {size_text(row['result'])}, held-out "
          f"{test['value']:.4f} (original {test['reference_value']:.4f}), change {change:+.4f} "
          f"[{low:+.4f}, {high:+.4f}]{speed}, {row['seconds']:.0f} s, peak {row['peak_rss_gib']:.2f} GiB",
          flush=True)


def summarize(args: argparse.Namespace, extra: list[str], rows: list[dict]) -> None:
    """The mean and spread over the seeds, printed."""
    summary = write(args, extra, rows)
    if "speedup_mean" in summary:
        print(f"speed against the original at batch {args.bench_batch}: {summary['speedup_mean']:.2f}x "
              f"(min {summary['speedup_min']:.2f}x, max {summary['speedup_max']:.2f}x)")
    print(f"mean over seeds {summary['seeds']}: {summary['reduction_mean']:.1%} fewer parameters "
          f"(min {summary['reduction_min']:.1%}, max {summary['reduction_max']:.1%}), held-out change "
          f"{summary['change_mean']:+.4f} (min {summary['change_min']:+.4f}, max {summary['change_max']:+.4f}), "
          f"{summary['seconds_mean']:.0f} s (max {summary['seconds_max']:.0f} s)")


def write(args: argparse.Namespace, extra: list[str], rows: list[dict]) -> dict:
    """The mean and spread over the seeds so far, written as JSON with ``--out``."""
    reductions = np.array([r["result"]["params_reduction"] for r in rows])
    changes = np.array([held_out(r["result"])["value"] - held_out(r["result"])["reference_value"] for r in rows])
    seconds = np.array([r["seconds"] for r in rows])
    summary = {"model": args.model, "mode": args.mode, "extra_flags": extra, "seeds": [r["seed"] for r in rows],
               "reduction_mean": float(reductions.mean()), "reduction_min": float(reductions.min()),
               "reduction_max": float(reductions.max()), "change_mean": float(changes.mean()),
               "change_min": float(changes.min()), "change_max": float(changes.max()),
               "seconds_mean": float(seconds.mean()), "seconds_max": float(seconds.max()), "runs": rows}
    if all("bench" in r for r in rows):
        speedups = np.array([r["bench"]["speedup"] for r in rows])
        summary.update(speedup_mean=float(speedups.mean()), speedup_min=float(speedups.min()),
                       speedup_max=float(speedups.max()))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        name = f"seeds_{args.model}_{args.mode}{'_' + args.tag if args.tag else ''}.json"
        (args.out / name).write_text(json.dumps(summary, indent=1))
    return summary


if __name__ == "__main__":
    sys.exit(main())
