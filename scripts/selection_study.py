"""Which plan the lossless back-off keeps, by the validation metric or by the validation loss, over many splits.

    python scripts/selection_study.py record --model cifar10-resnet56 --bits-reduction 0.875 --seeds 1,2,3,4,5 \
        --out scripts/results/selection --analysis-cache DIR
    python scripts/selection_study.py replay --results scripts/results/selection --resplits 200

``record``: per split seed, the plans ``onnxlrf compress MODEL --technique quant --mode lossless --target bits
--target-reduction R`` verifies (each kappa's knapsack plan and the uniform plan meeting the target, as rounded to
nearest and as the back-off improves them: rounded sequentially on the calibration split), built with the library's
own steps, each rewritten once and run in onnxruntime on every sample outside the calibration split (the seed's
validation and held-out test splits together). Per plan and sample it keeps the task loss and whether the
prediction is right, in ``selection_<model>_<R>_seed<S>.npz`` with the plans' names in a JSON beside it.

``replay``: per record, the plan each selection (:data:`onnxlrf.verify.search.SELECTIONS`, the back-off's own
:func:`~onnxlrf.verify.search.selection_key`; a tie keeps the plan verified first) keeps on the seed's own
validation split, and on ``--resplits`` random validation/held-out re-draws of the same samples, with the chosen
plan's held-out top-1 change against the original. The own-split rows reproduce ``seeds_benchmark.py``'s runs; the
re-draws say how each rule does on average over splits of the same data, which five seeds cannot.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality_benchmark import load_setup


def record(args: argparse.Namespace) -> None:
    from onnxlrf.costs.params import cost_model
    from onnxlrf.errors import OnnxlrfError
    from onnxlrf.measure.analysis import AnalysisOptions, default_labels
    from onnxlrf.planning.joint import PlanOptions, plan_joint
    from onnxlrf.runtime.evaluate import model_outputs
    from onnxlrf.techniques.quant.planners import QuantOptions, w8a8_weight_bits
    from onnxlrf.techniques.quant.technique import Quant
    from onnxlrf.verify.backoff import uniform_baseline
    from onnxlrf.verify.search import BACKOFF_KAPPAS
    from onnxlrf.verify.splits import split_dataset

    reference, dataset, n_calib, n_val = load_setup(args.model)
    if dataset.task != "classification":
        raise SystemExit("selection_study records classified data (top-1 and cross-entropy per sample)")
    technique = Quant(int8_weight_bits=w8a8_weight_bits(QuantOptions()))
    cost = cost_model(reference, "bits")
    options = PlanOptions("lossless", target_reduction=args.bits_reduction, target="bits")
    args.out.mkdir(parents=True, exist_ok=True)
    for seed in args.seeds:
        start = time.perf_counter()
        splits = split_dataset(dataset, n_calib, n_val, seed)
        order = np.random.default_rng(seed).permutation(len(dataset))
        pool = dataset.subset(order[n_calib:])  # validation first, then held-out test, as split_dataset draws them
        analysis = technique.analyse(reference, splits.calib, AnalysisOptions(
            labels=default_labels(splits.calib), spatial=False, cache=args.analysis_cache))
        plans, seen = [], set()
        for kappa in BACKOFF_KAPPAS:  # the back-off's order: the knapsack's plans, then the uniform plan, then improved
            try:
                plan = plan_joint(reference, technique, analysis, "lossless", target_reduction=args.bits_reduction,
                                  kappa=kappa, target="bits", cost=cost, rank_multiple=1)
            except OnnxlrfError as exc:
                print(f"seed {seed} kappa {kappa:g}: {exc}", file=sys.stderr)
                continue
            key = technique.signature(plan, analysis, kappa)
            if key not in seen:
                seen.add(key)
                plans.append((f"kappa {kappa:g}", technique.improve(reference, plan, splits.calib) or plan))
        uniform = uniform_baseline(reference, technique, analysis, options, cost)
        plans += [(uniform.options["baseline"], uniform),
                  (f"{uniform.options['baseline']}, {technique.improvement}",
                   technique.improve(reference, uniform, splits.calib) or uniform)]
        arrays = {"labels": pool.labels, "n_val": np.array(n_val)}
        for index, (name, plan) in enumerate([("original", None), *plans]):
            model = reference if plan is None else technique.rewrite(reference, plan)[0]
            outputs = model_outputs(model, pool, "auto")
            arrays[f"loss_{index}"] = pool.sample_losses(outputs)
            arrays[f"right_{index}"] = pool.predictions(outputs) == pool.labels
        name = f"selection_{args.model}_{args.bits_reduction:g}_seed{seed}"
        np.savez_compressed(args.out / f"{name}.npz", **arrays)
        (args.out / f"{name}.json").write_text(json.dumps(
            {"model": args.model, "seed": seed, "bits_reduction": args.bits_reduction, "calib": n_calib,
             "val": n_val, "plans": ["original", *(label for label, _ in plans)],
             "seconds": time.perf_counter() - start}, indent=1))
        print(f"{args.model} {args.bits_reduction:g} seed {seed}: {len(plans)} plans, "
              f"{time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)


def choose(loss: np.ndarray, right: np.ndarray, val: np.ndarray, select: str) -> int:
    """The plan (index among the recorded ones, the original at 0 excluded) that ``select`` keeps on ``val``,
    by the back-off's own :func:`~onnxlrf.verify.search.selection_key` and tie rule (the first verified)."""
    from onnxlrf.verify.search import Score, selection_key

    keys = [selection_key(Score(float(right[p, val].mean()), loss[p, val]), select) for p in range(1, len(loss))]
    return 1 + int(np.argmax(keys))  # argmax keeps the first of equal keys


def replay(args: argparse.Namespace) -> None:
    from onnxlrf.verify.search import SELECTIONS

    results = []
    for path in sorted(args.results.glob("selection_*.npz")):
        meta = json.loads(path.with_suffix(".json").read_text())
        with np.load(path) as arrays:
            count = len(meta["plans"])
            loss = np.stack([arrays[f"loss_{p}"] for p in range(count)])
            right = np.stack([arrays[f"right_{p}"] for p in range(count)]).astype(np.float64)
            n_val = int(arrays["n_val"])
        pool = loss.shape[1]
        rng = np.random.default_rng(1000 + meta["seed"])
        draws = [np.arange(pool)] + [rng.permutation(pool) for _ in range(args.resplits)]
        row = {"model": meta["model"], "bits_reduction": meta["bits_reduction"], "seed": meta["seed"],
               "plans": meta["plans"][1:]}
        for select in SELECTIONS:
            changes, chosen = [], []
            for order in draws:
                val, test = order[:n_val], order[n_val:]
                plan = choose(loss, right, val, select)
                chosen.append(plan)
                changes.append(float(right[plan, test].mean() - right[0, test].mean()))
            row[select] = {"own_split": {"plan": meta["plans"][chosen[0]], "held_out_change": changes[0]},
                           "resplits_mean_change": float(np.mean(changes[1:])),
                           "resplits_chosen": {meta["plans"][p]: chosen[1:].count(p) for p in sorted(set(chosen[1:]))}}
        # Each plan kept whatever validation says (a fixed choice, e.g. always the uniform plan), on the same draws.
        row["fixed"] = {meta["plans"][p]: float(np.mean([right[p, order[n_val:]].mean() - right[0, order[n_val:]].mean()
                                                         for order in draws[1:]])) for p in range(1, count)}
        results.append(row)
        print(f"{meta['model']} {meta['bits_reduction']:g} seed {meta['seed']}: own split metric "
              f"{row['metric']['own_split']['held_out_change']:+.4f} ({row['metric']['own_split']['plan']}), loss "
              f"{row['loss']['own_split']['held_out_change']:+.4f} ({row['loss']['own_split']['plan']}); "
              f"{args.resplits} re-draws: metric {row['metric']['resplits_mean_change']:+.4f}, loss "
              f"{row['loss']['resplits_mean_change']:+.4f}")
    by_budget: dict = {}
    for row in results:
        by_budget.setdefault((row["model"], row["bits_reduction"]), []).append(row)
    for (model, reduction), rows in by_budget.items():
        fixed = {name: np.mean([r["fixed"][name] for r in rows]) for name in rows[0]["fixed"]
                 if all(name in r["fixed"] for r in rows)}
        print(f"{model} {reduction:g}, {len(rows)} seeds: re-draws' mean held-out change, metric "
              f"{np.mean([r['metric']['resplits_mean_change'] for r in rows]):+.4f}, loss "
              f"{np.mean([r['loss']['resplits_mean_change'] for r in rows]):+.4f}; always "
              + ", ".join(f"{name} {value:+.4f}" for name, value in fixed.items()))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    rec = commands.add_parser("record")
    rec.add_argument("--model", required=True)
    rec.add_argument("--bits-reduction", type=float, required=True,
                     help="--target-reduction of --target bits (0.875: 4 bits a weight)")
    rec.add_argument("--seeds", type=lambda text: [int(s) for s in text.split(",")], default=[1, 2, 3, 4, 5])
    rec.add_argument("--out", type=Path, required=True)
    rec.add_argument("--analysis-cache", type=Path)
    rep = commands.add_parser("replay")
    rep.add_argument("--results", type=Path, required=True)
    rep.add_argument("--resplits", type=int, default=200)
    rep.add_argument("--json", type=Path, help="Write the rows here.")
    args = parser.parse_args()
    if args.command == "record":
        record(args)
    else:
        replay(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
