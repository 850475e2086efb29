"""How long the joint analysis takes: gradients and K-FAC factors, bases, perturbation ranges.

    python scripts/analysis_time.py --model torchvision:resnext50_32x4d --images 32

Random weights and random images (224x224) with random labels: run time does
not depend on the values. Prints the seconds of each phase and in total, as
the joint method runs them (``onnxlrf.measure.analysis.joint_analysis``: micro-batches of
--micro-batch, range checks on up to 256 samples in batches of 128).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from onnxlrf.models import load_model

from onnxlrf.data import Dataset
from onnxlrf.export import export_model
from onnxlrf.measure.analysis import AnalysisOptions, joint_analysis
from onnxlrf.onnx_io import load_onnx
from onnxlrf.progress import Progress


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="torchvision:resnext50_32x4d")
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--micro-batch", type=int, default=50)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        reference = load_onnx(export_model(load_model(args.model), Path(tmp) / "model.onnx", dynamic_batch=True).path)
    rng = np.random.default_rng(0)
    name = reference.graph.input[0].name
    images = rng.standard_normal((args.images, 3, args.size, args.size)).astype(np.float32)
    calib = Dataset("random", "classification", {name: images}, rng.integers(0, 1000, args.images))
    start = time.perf_counter()
    joint_analysis(reference, calib, AnalysisOptions(micro_batch=args.micro_batch), Progress(bars=False))
    print(f"{args.model}: joint analysis of {args.images} images at {args.size}x{args.size}, "
          f"{args.threads} threads: {time.perf_counter() - start:.1f} s in total")
    return 0


if __name__ == "__main__":
    sys.exit(main())
