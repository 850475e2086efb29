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
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality_benchmark import load_setup  # noqa: E402

KAPPAS = tuple(float(2 ** (i / 4)) for i in range(25))
SIZES = (0.02, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.5)


def per_sample(dataset, outputs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per sample: the task loss (cross-entropy; similarity: squared cosine error on gold / 5) and the prediction."""
    predictions = dataset.predictions(outputs)
    if dataset.task == "sentence-similarity":
        return (predictions - dataset.labels / 5.0) ** 2, predictions
    logits = outputs.reshape(len(outputs), -1).astype(np.float64)
    logits -= logits.max(axis=1, keepdims=True)
    log_probs = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    return -log_probs[np.arange(len(logits)), dataset.labels.astype(int)], predictions


def record(args: argparse.Namespace) -> None:
    from onnxlrf.costs.params import cost_model
    from onnxlrf.errors import OnnxlrfError
    from onnxlrf.measure.analysis import AnalysisOptions, joint_analysis
    from onnxlrf.runtime.evaluate import model_outputs
    from onnxlrf.techniques import TECHNIQUES
    from onnxlrf.planning.joint import plan_joint
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    rec = commands.add_parser("record")
    rec.add_argument("--model", required=True)
    rec.add_argument("--seeds", type=lambda text: [int(s) for s in text.split(",")], default=[1, 2, 3, 4, 5])
    rec.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if args.command == "record":
        record(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
