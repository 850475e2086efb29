"""How often a back-off acceptance rule accepts a plan that is worse than the original, and what it costs.

    python scripts/acceptance_study.py record --model cifar10-resnet56 --seeds 1,2,3,4,5 --out scripts/results/acceptance
    python scripts/acceptance_study.py rules --results scripts/results/acceptance --json

``record``: for each split seed, the joint analysis on that seed's calibration split, then the
compact plans of a kappa grid (2^(i/4), 1 to 64) and the lossless plans of a size ladder, each
rewritten once and run in onnxruntime on every sample outside the calibration split (the seed's
validation and held-out test splits together). Per plan and sample it keeps the task loss and the
prediction, in ``acceptance_<model>_seed<S>.npz`` with the plans' sizes in a JSON beside it.

``rules``: the back-off's choice under each acceptance rule, replayed on the recorded plans
(:class:`onnxlrf.verify.search.BackoffSearch` with an evaluator that reads the records), on the
seed's own validation split and on ``--resplits`` random validation/held-out re-draws of the same
non-calibration samples. A *false acceptance* is a chosen plan whose change on the held-out
samples of that draw is below ``-margin`` (0.1 points of top-1, 0.001 Spearman); the rate is over
runs, so it counts every plan a run looked at. It prints, per model and rule, the mean reduction
and held-out change on the seeds' own splits and the false-acceptance rate over the re-draws.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality_benchmark import load_setup

KAPPAS = tuple(float(2 ** (i / 4)) for i in range(25))
SIZES = (0.02, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.5)


def per_sample(dataset, outputs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per sample: the task loss (:meth:`onnxlrf.data.Dataset.sample_losses`) and the prediction."""
    return dataset.sample_losses(outputs), dataset.predictions(outputs)


def record(args: argparse.Namespace) -> None:
    from onnxlrf.costs.params import cost_model
    from onnxlrf.errors import OnnxlrfError
    from onnxlrf.measure.analysis import AnalysisOptions, joint_analysis
    from onnxlrf.planning.joint import plan_joint
    from onnxlrf.runtime.evaluate import model_outputs
    from onnxlrf.techniques import TECHNIQUES
    from onnxlrf.verify.splits import split_dataset

    technique = TECHNIQUES["lowrank"]
    reference, dataset, n_calib, n_val = load_setup(args.model)
    cost = cost_model(reference, "params")
    args.out.mkdir(parents=True, exist_ok=True)
    for seed in args.seeds:
        start = time.perf_counter()
        splits = split_dataset(dataset, n_calib, n_val, seed)
        order = np.random.default_rng(seed).permutation(len(dataset))
        pool = dataset.subset(order[n_calib:])  # validation first, then held-out test, as split_dataset draws them
        analysis = joint_analysis(reference, splits.calib, AnalysisOptions())
        analysis_s = time.perf_counter() - start
        plans, seen = [], {}
        proposals = [("compact", kappa, None) for kappa in KAPPAS] + [("lossless", 1.0, size) for size in SIZES]
        for mode, kappa, size in proposals:
            try:
                plan = plan_joint(reference, technique, analysis, mode, target_reduction=size, kappa=kappa,
                                  cost=cost)
            except OnnxlrfError as exc:
                print(f"seed {seed} {mode} kappa {kappa:.3g} size {size}: {exc}", file=sys.stderr)
                continue
            key = technique.signature(plan, analysis, kappa)
            meta = {"mode": mode, "kappa": kappa, "size": size, "reduction": plan.options["achieved_reduction"],
                    "predicted_dloss": plan.options["predicted_dloss"]}
            if key in seen:
                meta["same_as"] = seen[key]
                plans.append(meta)
                continue
            seen[key] = len(plans)
            plans.append(meta)
        arrays = {"labels": pool.labels, "n_val": np.array(n_val)}
        outputs = model_outputs(reference, pool, "auto")
        arrays["loss_original"], arrays["prediction_original"] = per_sample(pool, outputs)
        for index, meta in enumerate(plans):
            if "same_as" in meta:
                continue
            mode, kappa, size = meta["mode"], meta["kappa"], meta["size"]
            plan = plan_joint(reference, technique, analysis, mode, target_reduction=size, kappa=kappa, cost=cost)
            model, _ = technique.rewrite(reference, plan)
            arrays[f"loss_{index}"], arrays[f"prediction_{index}"] = per_sample(pool, model_outputs(model, pool, "auto"))
        name = f"acceptance_{args.model}_seed{seed}"
        np.savez_compressed(args.out / f"{name}.npz", **arrays)
        (args.out / f"{name}.json").write_text(json.dumps(
            {"model": args.model, "seed": seed, "task": dataset.task, "calib": n_calib, "val": n_val,
             "analysis_s": analysis_s, "seconds": time.perf_counter() - start, "plans": plans}, indent=1))
        print(f"{args.model} seed {seed}: {len(seen)} distinct plans of {len(plans)}, "
              f"{time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)


MARGINS = {"classification": 0.001, "sentence-similarity": 0.001}  # 0.1 points of top-1; 0.001 Spearman


class Records:
    """One model and seed's recorded plans: per plan, per-sample loss and prediction on the non-calibration pool."""

    def __init__(self, path: Path) -> None:
        meta = json.loads(path.with_suffix(".json").read_text())
        arrays = np.load(path)
        self.model, self.seed, self.task, self.n_val = meta["model"], meta["seed"], meta["task"], meta["val"]
        self.labels = arrays["labels"]
        self.plans = meta["plans"]
        self.loss = {"original": arrays["loss_original"]}
        self.prediction = {"original": arrays["prediction_original"]}
        for index, plan in enumerate(self.plans):
            source = plan.get("same_as", index)
            self.loss[index], self.prediction[index] = arrays[f"loss_{source}"], arrays[f"prediction_{source}"]
        self.compact = {round(4 * math.log2(plan["kappa"])): index for index, plan in enumerate(self.plans)
                        if plan["mode"] == "compact"}

    def metric(self, key, samples: np.ndarray) -> float:
        prediction, labels = self.prediction[key][samples], self.labels[samples]
        if self.task == "sentence-similarity":
            from onnxlrf.data import spearman
            return spearman(prediction, labels)
        return float(np.mean(prediction == labels))


def paired(records: Records, key, samples: np.ndarray) -> tuple[float, float, float, float]:
    """On ``samples``: the metric change against the original, its standard error (per-sample for top-1,
    else nan), the mean loss change and its standard error."""
    loss = records.loss[key][samples] - records.loss["original"][samples]
    n = len(samples)
    change = records.metric(key, samples) - records.metric("original", samples)
    if records.task == "classification":
        hits = (records.prediction[key][samples] == records.labels[samples]).astype(float)
        hits -= records.prediction["original"][samples] == records.labels[samples]
        metric_se = float(hits.std(ddof=1) / math.sqrt(n))
    else:
        metric_se = math.nan
    return change, metric_se, float(loss.mean()), float(loss.std(ddof=1) / math.sqrt(n))


# Acceptance rules: (metric change, its se, loss change, its se) on validation -> holds.
RULES = {
    "metric >= original (before)": lambda c, cs, l, ls: c >= 0,
    "metric >= original, loss <= original": lambda c, cs, l, ls: c >= 0 and l <= 0,
    "metric >= original, loss + 0.5 se <= 0": lambda c, cs, l, ls: c >= 0 and l + 0.5 * ls <= 0,
    "metric >= original, loss + 1.0 se <= 0": lambda c, cs, l, ls: c >= 0 and l + 1.0 * ls <= 0,
    "metric >= original, loss + 1.645 se <= 0": lambda c, cs, l, ls: c >= 0 and l + 1.645 * ls <= 0,
    "metric >= original, loss + 2.24 se <= 0": lambda c, cs, l, ls: c >= 0 and l + 2.24 * ls <= 0,
    "loss + 1.645 se <= 0": lambda c, cs, l, ls: l + 1.645 * ls <= 0,
    "metric - 1.645 se >= -margin": lambda c, cs, l, ls: c - 1.645 * cs >= -0.001,
}


def replay(records: Records, holds, val: np.ndarray) -> int | None:
    """The plan compact's kappa search chooses with ``holds`` on the validation samples ``val`` (kappa doubling from
    1, then two bisections on the recorded quarter-octave grid), or None."""
    cache = {}

    def check(step: int) -> bool:
        if step not in cache:
            index = records.compact.get(step)
            cache[step] = index is not None and holds(*paired(records, index, val))
        return cache[step]

    failed, held = None, None
    for step in range(0, 25, 4):
        if check(step):
            held = step
            break
        failed = step
    if held is None:
        return None
    if failed is not None:
        lo, hi = failed, held
        for _ in range(2):
            mid = (lo + hi) // 2
            if check(mid):
                hi = mid
            else:
                lo = mid
        held = min((step for step in cache if cache[step]),
                   key=lambda step: -records.plans[records.compact[step]]["reduction"])
    return records.compact[held]


def rules(args: argparse.Namespace) -> None:
    results = {}
    for path in sorted(args.results.glob("acceptance_*.npz")):
        records = Records(path)
        pool = len(records.labels)
        own_val, own_test = np.arange(records.n_val), np.arange(records.n_val, pool)
        rng = np.random.default_rng(1000 + records.seed)
        draws = [rng.permutation(pool) for _ in range(args.resplits)]
        margin = MARGINS[records.task]
        for name, holds in RULES.items():
            if records.task != "classification" and "metric - " in name:
                continue
            row = results.setdefault(records.model, {}).setdefault(name, {"seeds": {}, "draws": []})
            chosen = replay(records, holds, own_val)
            if chosen is None:
                row["seeds"][records.seed] = {"reduction": 0.0, "test_change": 0.0}
            else:
                change, se, _, _ = paired(records, chosen, own_test)
                row["seeds"][records.seed] = {"reduction": records.plans[chosen]["reduction"], "test_change": change,
                                              "test_se": se}
            for order in draws:
                val, test = order[:records.n_val], order[records.n_val:]
                chosen = replay(records, holds, val)
                if chosen is None:
                    row["draws"].append((0.0, 0.0))
                else:
                    row["draws"].append((records.plans[chosen]["reduction"], paired(records, chosen, test)[0]))
    summary = {}
    for model, by_rule in results.items():
        for name, row in by_rule.items():
            seeds = row["seeds"]
            reductions = [seeds[s]["reduction"] for s in sorted(seeds)]
            changes = [seeds[s]["test_change"] for s in sorted(seeds)]
            draws = np.array(row["draws"])
            margin = 0.001
            summary.setdefault(model, {})[name] = {
                "seeds": sorted(seeds), "reduction_mean": float(np.mean(reductions)),
                "reduction_min": float(np.min(reductions)), "test_change_mean": float(np.mean(changes)),
                "test_change_min": float(np.min(changes)),
                "runs_below_margin": int(sum(c < -margin for c in changes)),
                "draws": len(draws), "draw_reduction_mean": float(draws[:, 0].mean()),
                "false_acceptance": float(np.mean(draws[:, 1] < -margin)),
                "per_seed": seeds}
    if args.json:
        print(json.dumps(summary, indent=1))
        return
    for model, by_rule in summary.items():
        print(f"\n{model} (seeds {by_rule[next(iter(by_rule))]['seeds']}, {args.resplits} re-draws per seed)")
        print("| rule | reduction mean (min) | held-out change mean (min) | runs below -margin | "
              "false acceptance over re-draws | re-draw reduction |")
        print("|---|---|---|---|---|---|")
        for name, row in by_rule.items():
            print(f"| {name} | {row['reduction_mean']:.1%} ({row['reduction_min']:.1%}) | "
                  f"{row['test_change_mean']:+.4f} ({row['test_change_min']:+.4f}) | {row['runs_below_margin']} | "
                  f"{row['false_acceptance']:.1%} | {row['draw_reduction_mean']:.1%} |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    rec = commands.add_parser("record")
    rec.add_argument("--model", required=True)
    rec.add_argument("--seeds", type=lambda text: [int(s) for s in text.split(",")], default=[1, 2, 3, 4, 5])
    rec.add_argument("--out", type=Path, required=True)
    rul = commands.add_parser("rules")
    rul.add_argument("--results", type=Path, required=True)
    rul.add_argument("--resplits", type=int, default=200)
    rul.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.command == "record":
        record(args)
    else:
        rules(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
