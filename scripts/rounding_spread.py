"""How much the rounding realization alone moves a CIFAR ResNet's accuracy at a given bit width.

    python scripts/rounding_spread.py --model cifar10-resnet56 --bits 4 --out scripts/results

Round-to-nearest per output channel (symmetric, :mod:`onnxlrf.techniques.quant.grid`) with the absmax scale
times each of a set of multipliers near 1: equally principled grids, each a different rounding of the same
weights. Their spread of top-1 and loss on all 10,000 test images is the noise floor against which two
roundings (say uniform round-to-nearest and a loss-aware plan) can be told apart. Per-channel grids of a
Conv's weight and of its BatchNorm-folded weight round alike (the fold scales each output channel), so the
torch model is quantized as it is.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from models.cifar_resnet import PUBLISHED_FILES, DEPTHS, build  # noqa: E402

from onnxlrf.data import load_data  # noqa: E402
from onnxlrf.techniques.quant.grid import absmax_scales, round_to_grid  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10"
MULTIPLIERS = (1.0, 0.97, 0.98, 0.985, 0.99, 0.995, 1.005, 1.01, 1.015, 1.02, 1.03)


def evaluate(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> dict:
    with torch.no_grad():
        logits = torch.cat([model(images[i:i + 500]) for i in range(0, len(images), 500)])
    return {"top1": float((logits.argmax(1) == labels).double().mean()),
            "loss": float(torch.nn.functional.cross_entropy(logits.double(), labels))}


def rounded(state: dict, bits: int, multiplier: float) -> dict:
    """Every Conv/Linear weight on its per-channel grid with ``multiplier`` times the absmax scale."""
    out = {}
    for name, value in state.items():
        if name.endswith("weight") and value.ndim in (2, 4):
            weight = value.numpy()
            scales = absmax_scales(weight, 0, bits) * np.float32(multiplier)
            shape = (-1,) + (1,) * (weight.ndim - 1)
            value = torch.from_numpy(round_to_grid(weight, scales.reshape(shape), bits) * scales.reshape(shape))
        out[name] = value
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(DEPTHS), default="cifar10-resnet56")
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    data = load_data("cifar10-jpeg:" + str(SHARED / "cifar10_test_jpeg.npz"))
    images, labels = torch.from_numpy(next(iter(data.inputs.values()))), torch.from_numpy(data.labels)
    model = build(args.model, SHARED / PUBLISHED_FILES[DEPTHS[args.model]]).eval()
    state = {name: value.clone() for name, value in model.state_dict().items()}
    original = evaluate(model, images, labels)
    print(f"original: top1 {original['top1']:.4f} loss {original['loss']:.4f}", flush=True)
    rows = []
    for multiplier in MULTIPLIERS:
        model.load_state_dict(rounded(state, args.bits, multiplier))
        rows.append({"multiplier": multiplier, **evaluate(model, images, labels)})
        print(f"x{multiplier:<6} top1 {rows[-1]['top1']:.4f} ({100 * (rows[-1]['top1'] - original['top1']):+.2f} pts)"
              f" loss {rows[-1]['loss']:.4f}", flush=True)
    top1 = np.array([row["top1"] for row in rows])
    summary = {"mean_change_pts": 100 * float(top1.mean() - original["top1"]), "sd_pts": 100 * float(top1.std(ddof=1)),
               "min_change_pts": 100 * float(top1.min() - original["top1"]),
               "max_change_pts": 100 * float(top1.max() - original["top1"])}
    print(f"{args.bits} bits, {len(rows)} roundings: change {summary['mean_change_pts']:+.2f} pts mean, "
          f"sd {summary['sd_pts']:.2f}, range {summary['min_change_pts']:+.2f}..{summary['max_change_pts']:+.2f}")
    if args.out:
        path = args.out / f"rounding_spread_{args.model}_{args.bits}bit.json"
        path.write_text(json.dumps({"model": args.model, "bits": args.bits, "images": len(labels),
                                    "original": original, "roundings": rows, "summary": summary}, indent=1) + "\n")


if __name__ == "__main__":
    main()
