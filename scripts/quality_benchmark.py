"""Held-out quality of the joint method against baselines, at several sizes, through one rewrite and one evaluation.

    python scripts/quality_benchmark.py --model cifar10-resnet20 --out results/

For each target reduction (fraction of the model's parameters removed) it
prints the held-out test metric of: uniform rank fraction, energy threshold,
Fisher-weighted SVD (FWSVD), activation-whitened SVD (SVD-LLM/ASVD style; both
at a uniform rank fraction), and joint lossless (with the back-off's refit step unless --no-refit); then
compact mode's reduction and metric. The splits are
disjoint and fixed by --seed; the analysis runs once per model on the
calibration split and is shared by every target. Run times are measured here.
Each row's per-sample held-out predictions go to quality_<model>_test.npz beside
the JSON, so scripts/paired_difference.py can say which differences the test
split resolves.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from onnxlrf.models import load_model

from onnxlrf.data import load_data
from onnxlrf.export import export_model
from onnxlrf.graph.layers import count_params
from onnxlrf.measure.analysis import AnalysisOptions, joint_analysis
from onnxlrf.onnx_io import load_onnx
from onnxlrf.planning.joint import PlanOptions
from onnxlrf.runtime.evaluate import model_predictions
from onnxlrf.techniques.lowrank.planners import plan_baseline, plan_energy, plan_uniform
from onnxlrf.techniques.lowrank.rewrite import apply_plan
from onnxlrf.verify.backoff import backoff_plan
from onnxlrf.verify.splits import split_dataset

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
SETUPS = {
    "cifar10-resnet20": (SHARED / "cifar10/resnet20-12fca82f.th", "cifar10-jpeg:" + str(SHARED / "cifar10/cifar10_test_jpeg.npz"), 1000, 1000),
    "cifar10-resnet56": (SHARED / "cifar10/resnet56-4bfd9763.th", "cifar10-jpeg:" + str(SHARED / "cifar10/cifar10_test_jpeg.npz"), 1000, 1000),
    "minilm": (None, "stsb:" + str(SHARED / "stsb/sts-test.csv"), 300, 300),
}


def _chosen(result: Any) -> tuple[Any, Any]:
    """The plan and the model a back-off chose."""
    return result.plan, result.model


def load_setup(model: str) -> tuple[Any, Any, int, int]:
    """``model``'s reference ONNX (exported with a dynamic batch), its dataset, and its calibration
    and validation sizes, as every benchmark on these splits uses them."""
    weights, data_spec, n_calib, n_val = SETUPS[model]
    with tempfile.TemporaryDirectory() as tmp:
        spec = load_model(model, weights=str(weights) if weights else None)
        reference = load_onnx(export_model(spec, Path(tmp) / "model.onnx", dynamic_batch=True).path)
    return reference, load_data(data_spec, reference), n_calib, n_val


def write_results(directory: Path, name: str, results: Any) -> None:
    """``results`` as indented JSON in ``directory/name`` (the directory is made if needed)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / name).write_text(json.dumps(results, indent=1))


def row_key(method: str, target: float | None) -> str:
    """A row's name among the saved test predictions: ``method@target``, or ``method`` (compact)."""
    return method if target is None else f"{method}@{target:g}"


def write_predictions(directory: Path, name: str, predictions: dict[str, np.ndarray], update: bool = False) -> None:
    """Per-sample held-out predictions by row (:func:`row_key`) in ``directory/name`` (npz);
    ``update``: merged into the file's rows, a row replacing the one of the same name."""
    path = directory / name
    if update and path.exists():
        with np.load(path) as earlier:
            predictions = {**{key: earlier[key] for key in earlier.files}, **predictions}
    directory.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **predictions)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(SETUPS), default="cifar10-resnet20")
    parser.add_argument("--targets", default="0.05,0.1,0.2,0.3,0.5")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--labels", default="labels",
                        help="Calibration targets of the joint analyses, comma-separated: labels, predictions "
                             "(label-free; its joint rows are named joint-...-label-free).")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-refit", dest="refit", action="store_false",
                        help="Joint rows without the back-off's refit step (onnxlrf before stop 8).")
    parser.add_argument("--out", type=Path, help="Directory for the JSON results.")
    parser.add_argument("--update", action="store_true",
                        help="Merge this run's rows into the JSON already in --out (a row replaces the one of the "
                             "same method and target) instead of writing a new one; with --targets '' only the "
                             "compact rows are run.")
    parser.add_argument("--replot", type=Path, metavar="DIR",
                        help="Only redraw quality_<model>.svg from the JSON results an earlier run wrote into DIR.")
    args = parser.parse_args()
    if args.replot:
        return replot(args.replot)
    torch.set_num_threads(args.threads)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731

    reference, dataset, n_calib, n_val = load_setup(args.model)
    splits = split_dataset(dataset, n_calib, n_val, args.seed)
    total = count_params(reference)
    predictions = {"original": model_predictions(reference, splits.test, "auto")}
    reference_test = splits.test.score_predictions(predictions["original"])
    rows = []

    analyses, analysis_s = {}, {}
    for labels in args.labels.split(","):
        start = time.perf_counter()
        analyses[labels] = joint_analysis(reference, splits.calib, AnalysisOptions(labels=labels))
        analysis_s[labels] = time.perf_counter() - start
        log(f"joint analysis ({labels}): {analysis_s[labels]:.1f} s")
    sensitivity = next(iter(analyses.values()))  # the first one's input moments serve the baselines

    def evaluate(method: str, target: float | None, make) -> None:
        t0 = time.perf_counter()
        try:
            plan, model = make()
        except Exception as exc:  # a target out of a method's reach is a result, not a crash
            rows.append({"method": method, "target": target, "error": str(exc)})
            log(f"{method} {target}: {exc}")
            return
        seconds = time.perf_counter() - t0
        predictions[row_key(method, target)] = model_predictions(model, splits.test, "auto")
        value = splits.test.score_predictions(predictions[row_key(method, target)])
        reduction = 1 - count_params(model) / total
        rows.append({"method": method, "target": target, "reduction": reduction, "test": value,
                     "reference_test": reference_test, "seconds": seconds})
        log(f"{method:>16} target {target}: reduction {reduction:.3f} test {value:.4f} "
            f"(original {reference_test:.4f}) {seconds:.1f} s")

    def rewrite(plan):
        return plan, apply_plan(reference, plan)[0]

    for target in [float(t) for t in args.targets.split(",") if t]:
        evaluate("uniform", target, lambda: rewrite(plan_uniform(reference, target_reduction=target)))
        evaluate("energy", target, lambda: rewrite(plan_energy(reference, target_reduction=target)))
        for kind in ("fwsvd", "whitened"):
            evaluate(kind, target, lambda: rewrite(plan_baseline(reference, sensitivity, kind, target)))
        for labels, analysis in analyses.items():
            evaluate(joint_name("lossless", labels), target,
                     lambda: _chosen(backoff_plan(reference, analysis, splits.val,
                                                  PlanOptions("lossless", target_reduction=target),
                                                  calib=splits.calib, refit=args.refit)))
    for labels, analysis in analyses.items():
        evaluate(joint_name("compact", labels), None,
                 lambda: _chosen(backoff_plan(reference, analysis, splits.val, PlanOptions("compact"),
                                              calib=splits.calib, refit=args.refit)))

    print(f"\n{args.model}: held-out test metric ({len(splits.test)} samples; original {reference_test:.4f}); "
          f"joint analysis {', '.join(f'{k} {v:.0f} s' for k, v in analysis_s.items())}, calib {n_calib}, val {n_val}, seed {args.seed}\n")
    print_table(rows, "out of reach")
    if args.out:
        results = {"model": args.model, "reference_test": reference_test, "analysis_seconds": analysis_s, "rows": rows}
        if args.update:
            results = merge_results(json.loads((args.out / f"quality_{args.model}.json").read_text()), results)
        write_results(args.out, f"quality_{args.model}.json", results)
        write_predictions(args.out, f"quality_{args.model}_test.npz", predictions, args.update)
        log(f"wrote {plot(args.out, args.model)}")
    return 0


def merge_results(earlier: dict, later: dict) -> dict:
    """``earlier``'s results with ``later``'s rows in place of those of the same method and target."""
    if earlier["reference_test"] != later["reference_test"]:
        raise SystemExit(f"the original scores {later['reference_test']} here but {earlier['reference_test']} in the "
                         "results to update: not the same model, data or splits")
    replaced = {(row["method"], row["target"]): row for row in later["rows"]}
    rows = [replaced.pop((row["method"], row["target"]), row) for row in earlier["rows"]]
    return {**earlier, "analysis_seconds": {**earlier["analysis_seconds"], **later["analysis_seconds"]},
            "rows": rows + list(replaced.values())}


def label_suffix(labels: str) -> str:
    """How results name the calibration targets: '' for the data's labels, '-label-free' for predictions."""
    return "-label-free" if labels == "predictions" else ""


def joint_name(mode: str, labels: str) -> str:
    return f"joint-{mode}{label_suffix(labels)}"


def plot(directory: Path, model: str) -> Path:
    """Draw quality_<model>.svg from quality_<model>.json, with AIMET's rows (aimet_<model>.json) where present."""
    results = json.loads((directory / f"quality_{model}.json").read_text())
    rows = list(results["rows"])
    peer = directory / f"aimet_{model}.json"  # scripts/aimet_benchmark.py, same splits
    if peer.exists():
        rows += json.loads(peer.read_text())["rows"]
    path = directory / f"quality_{model}.svg"
    path.write_text(metric_vs_size_svg(rows, results["reference_test"], f"{model}: held-out test metric"))
    return path


def replot(directory: Path) -> int:
    """Redraw every quality_<model>.svg in ``directory`` from its JSON."""
    for result in sorted(directory.glob("quality_*.json")):
        print(plot(directory, result.stem.removeprefix("quality_")))
    return 0


def print_table(rows: list[dict], failure: str) -> None:
    """The Markdown results table; ``failure`` stands in a row whose method raised."""
    print("| method | target | reduction | test metric | time (s) |")
    print("|---|---|---|---|---|")
    for row in rows:
        if "error" in row:
            print(f"| {row['method']} | {row['target']} | {failure} | - | - |")
        else:
            target = "-" if row["target"] is None else f"{row['target']:.2f}"
            print(f"| {row['method']} | {target} | {row['reduction']:.3f} | {row['test']:.4f} | {row['seconds']:.1f} |")


def metric_vs_size_svg(rows: list[dict], reference: float, title: str) -> str:
    """A self-contained SVG line chart: held-out metric against parameters removed, one line per method."""
    series: dict[str, list[tuple[float, float]]] = {}
    for row in rows:
        if "error" not in row:
            series.setdefault(row["method"], []).append((row["reduction"], row["test"]))
    width, height, left, top = 520, 320, 60, 30
    xs = [x for points in series.values() for x, _ in points] + [0.0]
    ys = [y for points in series.values() for _, y in points] + [reference]
    x1, y0, y1 = max(xs) * 1.05, max(0.0, min(ys) - 0.02), min(1.0, max(ys) + 0.02)
    px = lambda x: left + x / x1 * width  # noqa: E731
    py = lambda y: top + height - (y - y0) / (y1 - y0) * height  # noqa: E731
    colours = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#17becf"]
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width + 230}" height="{height + 80}" '
           f'font-family="sans-serif" font-size="11">',
           f'<text x="{left}" y="18" font-size="13">{title}</text>',
           f'<rect x="{left}" y="{top}" width="{width}" height="{height}" fill="none" stroke="#bbb"/>',
           f'<line x1="{left}" x2="{left + width}" y1="{py(reference):.1f}" y2="{py(reference):.1f}" '
           f'stroke="#000" stroke-dasharray="4 3"/>',
           f'<text x="{left + width + 8}" y="{py(reference) + 4:.1f}">original {reference:.4f}</text>']
    for i in range(6):
        x, y = x1 * i / 5, y0 + (y1 - y0) * i / 5
        out.append(f'<text x="{px(x):.1f}" y="{top + height + 16}" text-anchor="middle">{x:.0%}</text>')
        out.append(f'<text x="{left - 6}" y="{py(y) + 4:.1f}" text-anchor="end">{y:.2f}</text>')
    out.append(f'<text x="{left + width / 2}" y="{top + height + 36}" text-anchor="middle">'
               f'parameters removed</text>')
    for i, (method, points) in enumerate(sorted(series.items())):
        colour = colours[i % len(colours)]
        points = sorted(points)
        path = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in points)
        out.append(f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="2"/>')
        out += [f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="3" fill="{colour}"/>' for x, y in points]
        out.append(f'<text x="{left + width + 8}" y="{top + 60 + 16 * i}" fill="{colour}">{method}</text>')
    return "\n".join(out + ["</svg>"]) + "\n"


if __name__ == "__main__":
    sys.exit(main())
