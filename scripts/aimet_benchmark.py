"""The real peer: Qualcomm AIMET's Spatial SVD and Weight SVD with its greedy ratio selection.

    pip install aimet-torch        # optional; a pure-Python wheel, kept out of onnxlrf's dependencies
    python scripts/aimet_benchmark.py --model cifar10-resnet20 --out results/
    python scripts/aimet_benchmark.py --model minilm --schemes weight_svd --out results/

Same splits as scripts/quality_benchmark.py (seed 0; CIFAR-10: calibration
1,000 / validation 1,000 / held-out test 8,000 images; STS-B: 300 / 300 / 779
pairs). AIMET's greedy selection scores each layer at each candidate ratio
with an evaluation callback; it gets the calibration and validation splits
(what the joint method sees: the callback returns their size-weighted mean
metric), never the test split. Its compressed torch model is exported to ONNX
and evaluated on the held-out test split in onnxruntime (per-sample
predictions kept in aimet_<model>_test.npz, as quality_benchmark.py keeps
its own), and its parameter reduction is counted on the ONNX file exactly
as for every other method
(``planning.count_params``). AIMET's own cost counts only the layers it may
compress, so each target (a fraction of the whole model) is handed to it
divided by their share of the model's parameters. CIFAR ResNets: the first
conv is left alone, as in AIMET's examples. MiniLM: every encoder Linear is a
candidate (Spatial SVD compresses convolutions only, so Weight SVD is the
scheme); AIMET traces the model from a random float tensor, so it gets the
encoder behind one float input of token ids, padding 0 masked.
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
from onnxlrf.models import load_model
from quality_benchmark import (  # scripts/ is on sys.path when a script runs
    SETUPS,
    print_table,
    row_key,
    write_predictions,
    write_results,
)

from onnxlrf.data import load_data
from onnxlrf.export import export_model
from onnxlrf.graph.layers import count_params
from onnxlrf.onnx_io import load_onnx
from onnxlrf.runtime.evaluate import model_predictions
from onnxlrf.verify.splits import split_dataset


class TokenIdsEncoder(torch.nn.Module):
    """A sentence encoder with one float input, token ids whose padding (id 0) is the attention mask."""

    def __init__(self, encoder: torch.nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        ids = ids.long()
        return self.encoder(ids, (ids != 0).long())


def outputs(model: torch.nn.Module, dataset, chunk: int) -> np.ndarray:
    """``model``'s first output on every row of ``dataset`` (token ids as floats for an encoder)."""
    if dataset.task == "classification":
        (x,) = dataset.inputs.values()
    else:
        x = dataset.inputs["input_ids"].astype(np.float32)
    with torch.no_grad():
        return np.concatenate([model(torch.from_numpy(x[i:i + chunk])).numpy() for i in range(0, len(x), chunk)])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(SETUPS), default="cifar10-resnet20")
    parser.add_argument("--targets", default="0.05,0.1,0.2,0.3,0.5")
    parser.add_argument("--schemes", default="spatial_svd,weight_svd")
    parser.add_argument("--candidates", type=int, default=10, help="AIMET's comp-ratio candidates per layer.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, help="Directory for the JSON results.")
    args = parser.parse_args()
    try:
        from aimet_torch.common.defs import (
            CompressionScheme,
            CostMetric,
            GreedySelectionParameters,
        )
        from aimet_torch.compress import ModelCompressor
        from aimet_torch.defs import SpatialSvdParameters, WeightSvdParameters
    except ImportError:
        print("this benchmark needs AIMET: pip install aimet-torch", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731

    weights, data_spec, n_calib, n_val = SETUPS[args.model]
    spec = load_model(args.model, weights=str(weights) if weights else None)
    work = Path(tempfile.mkdtemp(prefix="onnxlrf-aimet-"))
    reference = load_onnx(export_model(spec, work / "reference.onnx", dynamic_batch=True).path)
    dataset = load_data(data_spec, reference)
    splits = split_dataset(dataset, n_calib, n_val, args.seed)
    total = count_params(reference)
    predictions = {"original": model_predictions(reference, splits.test, "cpu")}
    reference_test = splits.test.score_predictions(predictions["original"])
    encoder = dataset.task != "classification"
    if encoder and not np.array_equal(dataset.inputs["input_ids"] != 0, dataset.inputs["attention_mask"] != 0):
        raise SystemExit("the attention mask is not the non-padding tokens: TokenIdsEncoder would change the model")
    wrap = TokenIdsEncoder if encoder else lambda module: module
    input_shape = (1, dataset.inputs["input_ids"].shape[1]) if encoder else (1, 3, 32, 32)
    chunk = 100 if encoder else 500
    stem = None if encoder else "conv1"  # left alone, as in AIMET's examples

    def evaluate(model: torch.nn.Module, iterations: int | None = None, use_cuda: bool = False) -> float:
        model.eval()
        seen = (splits.calib, splits.val)
        return sum(len(s) * s.score(outputs(model, s, chunk)) for s in seen) / sum(len(s) for s in seen)

    rows = []
    for scheme in args.schemes.split(","):
        scores = work / f"{scheme}-eval-scores.pkl"  # AIMET's per-layer sweep, reused across targets
        kinds = (torch.nn.Conv2d,) if scheme == "spatial_svd" else (torch.nn.Conv2d, torch.nn.Linear)
        candidates = [m for name, m in spec.module.named_modules() if isinstance(m, kinds) and name != stem]
        share = sum(m.weight.numel() for m in candidates) / total
        for target in [float(t) for t in args.targets.split(",")]:
            if not candidates or target >= share:
                rows.append({"method": f"aimet-{scheme}", "target": target,
                             "error": f"{scheme} may compress {share:.1%} of the model's parameters"})
                log(f"aimet {scheme} {target}: {rows[-1]['error']}")
                continue
            ratio = 1.0 - target / share
            greedy = GreedySelectionParameters(target_comp_ratio=ratio,
                                               num_comp_ratio_candidates=args.candidates,
                                               saved_eval_scores_dict=str(scores) if scores.exists() else None)
            # AIMET matches the modules to ignore by identity: they must be the copy's own.
            model = wrap(copy.deepcopy(spec.module))
            ignore = [module for name, module in model.named_modules() if stem and name == stem]
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
                model, _ = ModelCompressor.compress_model(model, evaluate, None, input_shape, kind, CostMetric.memory,
                                                          params)
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
            compressed_spec.module = (model.encoder if encoder else model).eval()
            path = export_model(compressed_spec, work / f"{scheme}-{target}.onnx", dynamic_batch=True,
                                overwrite=True).path
            compressed = load_onnx(path)
            key = row_key(f"aimet-{scheme}", target)
            predictions[key] = model_predictions(compressed, splits.test, "cpu")
            value = splits.test.score_predictions(predictions[key])
            reduction = 1 - count_params(compressed) / total
            rows.append({"method": f"aimet-{scheme}", "target": target, "aimet_ratio": ratio, "reduction": reduction,
                         "test": value, "reference_test": reference_test, "seconds": seconds})
            log(f"aimet {scheme} target {target}: reduction {reduction:.3f} test {value:.4f} "
                f"(original {reference_test:.4f}) {seconds:.0f} s")

    metric = "Spearman" if encoder else "top-1"
    print(f"\n{args.model}: AIMET (aimet-torch) held-out test {metric} ({len(splits.test)} samples; original "
          f"{reference_test:.4f}); seed {args.seed}\n")
    print_table(rows, "failed")
    if args.out:
        write_results(args.out, f"aimet_{args.model}.json",
                      {"model": args.model, "reference_test": reference_test, "rows": rows})
        write_predictions(args.out, f"aimet_{args.model}_test.npz", predictions)
    return 0


if __name__ == "__main__":
    sys.exit(main())
