"""Full-rank factorization is exact: the core rewrite check on real models.

    python scripts/check_full_rank.py [--shared ../shared] [--models resnet56,resnext50,minilm]

Each model is exported (TorchScript, dynamic batch), every Conv/Gemm/MatMul
is planned at its maximum rank (``planning.plan_full_rank``) and rewritten
with ``keep_dense_if_larger=False``, so every layer becomes a factor pair.
The rewritten graph must reproduce the original's outputs (relative max abs
diff ``max|y - y0| / max|y0| <= 1e-4``) and its metric:

- resnet56: akamaster's CIFAR-10 ResNet-56 (shared weights), top-1 on the
  10,000 shared test images;
- resnext50: torchvision resnext50_32x4d with random weights (grouped 3x3
  convs), a few random 224x224 inputs, no metric;
- minilm: all-MiniLM-L6-v2, Spearman on the 1,379 STS-B test pairs.

Metrics come from ``validation.validate`` with the original as reference.
Prints a table; exits 1 if any check fails.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from onnxlrf.models import load_model

from onnxlrf.data import load_data
from onnxlrf.export import export_model
from onnxlrf.graph.layers import count_params, find_layers
from onnxlrf.runtime.evaluate import validate
from onnxlrf.runtime.sessions import (
    make_session,
    random_feeds,
    run_dataset,
    select_providers,
)
from onnxlrf.techniques.lowrank.planners import plan_full_rank
from onnxlrf.techniques.lowrank.rewrite import apply_plan

MODELS = ("resnet56", "resnext50", "minilm")
RELATIVE_TOLERANCE = 1e-4
# A metric is "unchanged" within this: one CIFAR image in 10,000 flipping on a near-tie of two
# logits, or Spearman's fourth decimal (both can move with float32 rounding of an exact rewrite).
METRIC_TOLERANCE = 1e-4
RANDOM_INPUTS = 3  # resnext50 random inputs (one batch)
SCALE_ROWS = 512  # rows whose reference outputs give max|y0| (a lower bound of the full max: conservative)


@dataclass
class Row:
    model: str
    layers: int
    rewritten: int
    params_before: int
    params_after: int
    relative_diff: float
    metric: str
    value: float | None
    reference_value: float | None
    seconds: float = 0.0  # export included; set by the caller

    @property
    def passed(self) -> bool:
        metric_ok = self.value is None or abs(self.value - self.reference_value) <= METRIC_TOLERANCE
        return self.rewritten == self.layers > 0 and self.relative_diff <= RELATIVE_TOLERANCE and metric_ok


def default_shared() -> Path:
    return Path(__file__).resolve().parents[1].parent / "shared"


def export(name: str, workdir: Path, weights: Path | None = None) -> onnx.ModelProto:
    spec = load_model(name, weights=str(weights) if weights else None)
    path = export_model(spec, workdir / f"{name.replace(':', '_')}.onnx", dynamic_batch=True).path
    return onnx.load(str(path))


def rewrite_full_rank(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int, int]:
    """The full-rank rewrite, the number of factorizable layers, and how many were rewritten."""
    plan = plan_full_rank(model)
    rewritten, report = apply_plan(model, plan, keep_dense_if_larger=False)
    onnx.checker.check_model(rewritten)
    return rewritten, len(find_layers(model)[0]), len(report.rewritten)


def check_with_data(name: str, model: onnx.ModelProto, data_spec: str) -> Row:
    rewritten, layers, done = rewrite_full_rank(model)
    dataset = load_data(data_spec, model)
    result = validate(rewritten, dataset, reference=model, provider="cpu")
    scale_rows = dataset.subset(np.arange(min(SCALE_ROWS, dataset.rows)))
    scale = np.abs(run_dataset(make_session(model, select_providers("cpu")), scale_rows)).max()
    return Row(name, layers, done, count_params(model), count_params(rewritten), result.max_abs_diff / scale,
               result.metric, result.value, result.reference_value)


def check_random_inputs(name: str, model: onnx.ModelProto, batch: int = RANDOM_INPUTS) -> Row:
    rewritten, layers, done = rewrite_full_rank(model)
    feeds = random_feeds(model, batch=batch, seed=0)
    providers = select_providers("cpu")
    y0 = make_session(model, providers).run(None, feeds)[0].astype(np.float64)
    y = make_session(rewritten, providers).run(None, feeds)[0].astype(np.float64)
    return Row(name, layers, done, count_params(model), count_params(rewritten),
               float(np.abs(y - y0).max() / np.abs(y0).max()), "-", None, None)


def check_resnet56(shared: Path, workdir: Path) -> Row:
    data = shared / "data" / "cifar10"
    model = export("cifar10-resnet56", workdir, data / "resnet56-4bfd9763.th")
    return check_with_data("resnet56", model, f"cifar10-jpeg:{data / 'cifar10_test_jpeg.npz'}")


def check_resnext50(shared: Path, workdir: Path) -> Row:
    torch.manual_seed(0)  # torchvision's random init
    return check_random_inputs("resnext50", export("torchvision:resnext50_32x4d", workdir))


def check_minilm(shared: Path, workdir: Path) -> Row:
    return check_with_data("minilm", export("minilm", workdir), f"stsb:{shared / 'data' / 'stsb' / 'sts-test.csv'}")


CHECKS = {"resnet56": check_resnet56, "resnext50": check_resnext50, "minilm": check_minilm}


def format_table(rows: list[Row]) -> str:
    def fmt(value: float | None, spec: str = ".4f") -> str:
        return "-" if value is None else format(value, spec)

    header = (f"{'model':<10} {'layers':>7} {'params before':>14} {'params after':>13} {'rel diff':>9} "
              f"{'metric':>8} {'value':>7} {'original':>8} {'|delta|':>8} {'time s':>7}  result")
    lines = [header]
    for r in rows:
        delta = None if r.value is None else abs(r.value - r.reference_value)
        lines.append(f"{r.model:<10} {f'{r.rewritten}/{r.layers}':>7} {r.params_before:>14,} {r.params_after:>13,} "
                     f"{r.relative_diff:>9.2e} {r.metric:>8} {fmt(r.value):>7} {fmt(r.reference_value):>8} "
                     f"{fmt(delta, '.1e'):>8} {r.seconds:>7.1f}  {'ok' if r.passed else 'FAIL'}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shared", type=Path, default=default_shared(), help="The shared folder (default: %(default)s).")
    parser.add_argument("--models", default=",".join(MODELS), help="Comma-separated subset of: %(default)s.")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    unknown = [n for n in names if n not in CHECKS]
    if unknown or not names:
        parser.error(f"unknown model(s) {', '.join(unknown) or '(none)'}; known: {', '.join(MODELS)}")
    # Multi-threaded SVDs crawl on a busy 2-core machine; onnxruntime keeps its own threads.
    torch.set_num_threads(1)
    start = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory(prefix="onnxlrf-full-rank-") as tmp:
        for name in names:
            check_start = time.perf_counter()
            rows.append(CHECKS[name](args.shared, Path(tmp)))
            rows[-1].seconds = time.perf_counter() - check_start
            print(f"{name} done in {rows[-1].seconds:.0f} s", file=sys.stderr, flush=True)
    print(format_table(rows))
    print(f"total {time.perf_counter() - start:.0f} s; tolerance: relative diff <= {RELATIVE_TOLERANCE:g}, "
          f"metric within {METRIC_TOLERANCE:g}")
    return 0 if all(r.passed for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
