"""Rounding variants of every layer of a CIFAR ResNet at one bit width, held-out top-1 and loss.

    python scripts/rounding_variants.py --model cifar10-resnet56 --bits 3 --seed 1 --out scripts/results

On split seed S (calibration: the first 1,000 images of onnxlrf's permutation, held-out: the 8,000 after
the 1,000 validation images), every Conv/Linear weight per output channel, symmetric:

* ``nearest``: round to nearest on absmax scales;
* ``nearest+bias``: the same with empirical bias correction (the mean output shift ``dW mu`` over the
  calibration inputs folded into the BatchNorm's running mean, or the Linear's bias: DFQ/AIMET's);
* ``loss-aware``: onnxlrf's rounding (:func:`onnxlrf.techniques.quant.rounding.loss_aware_levels`: error
  feedback along A's Cholesky factor after a clipping search), A the float model's input second moment;
* ``loss-aware+bias``: the same plus bias correction;
* ``loss-aware-centered+bias``: rounded in the centered metric (the covariance, A - mu mu^T), whose mean part
  the bias then absorbs;
* ``loss-aware-sequential``: each layer's A measured on the model whose earlier layers are already rounded
  (GPTQ's order), one layer at a time.

Per-channel grids of a Conv weight and of its BatchNorm-folded weight round alike (the fold scales each
output channel, and the metric is the same for every row), so the torch model is quantized as it is.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from models.cifar_resnet import DEPTHS, PUBLISHED_FILES, build  # noqa: E402

from onnxlrf.data import load_data  # noqa: E402
from onnxlrf.techniques.quant.grid import absmax_scales, round_to_grid  # noqa: E402
from onnxlrf.techniques.quant.rounding import loss_aware_levels  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10"
CALIB, VAL = 1000, 1000


class Harness:
    def __init__(self, name: str, seed: int) -> None:
        data = load_data("cifar10-jpeg:" + str(SHARED / "cifar10_test_jpeg.npz"))
        self.images, self.labels = torch.from_numpy(next(iter(data.inputs.values()))), torch.from_numpy(data.labels)
        order = np.random.default_rng(seed).permutation(len(self.labels))  # as onnxlrf's split_dataset
        self.calib, self.test = order[:CALIB], order[CALIB + VAL:]
        self.model = build(name, SHARED / PUBLISHED_FILES[DEPTHS[name]]).eval()
        self.original = {key: value.clone() for key, value in self.model.state_dict().items()}
        self.modules = dict(self.model.named_modules())
        self.layers = [n for n, m in self.modules.items() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]

    def evaluate(self, state: dict) -> dict:
        self.model.load_state_dict(state)
        images, labels = self.images[self.test], self.labels[self.test]
        with torch.no_grad():
            logits = torch.cat([self.model(images[i:i + 500]) for i in range(0, len(images), 500)])
        return {"top1": float((logits.argmax(1) == labels).double().mean()),
                "loss": float(F.cross_entropy(logits.double(), labels))}

    def input_statistics(self, state: dict, layers: list[str]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Each layer's input second moment A and mean row over the calibration images (rows: unfolded patches for
        a conv), in float64; the inputs are unfolded one layer at a time (all at once: 18 GB on ResNet-56)."""
        self.model.load_state_dict(state)
        captured = {}
        hooks = [self.modules[n].register_forward_hook(
            lambda module, inputs, output, n=n: captured.__setitem__(n, inputs[0].detach())) for n in layers]
        with torch.no_grad():
            self.model(self.images[self.calib])
        for hook in hooks:
            hook.remove()
        stats = {}
        for n in layers:
            module, x = self.modules[n], captured.pop(n)
            if isinstance(module, torch.nn.Conv2d):
                x = F.unfold(x, module.kernel_size, padding=module.padding, stride=module.stride)
                x = x.transpose(1, 2).reshape(-1, module.weight[0].numel())
            x = x.double()
            stats[n] = ((x.T @ x / len(x)).numpy(), x.mean(0).numpy())
        return stats

    def corrected(self, state: dict, n: str, delta: np.ndarray, mean: np.ndarray) -> None:
        """Cancel the mean output shift ``delta @ mean`` of layer ``n`` in ``state``."""
        shift = torch.from_numpy(delta @ mean).float()
        if isinstance(self.modules[n], torch.nn.Linear):
            state[n + ".bias"] = self.original[n + ".bias"] - shift
        else:  # the BatchNorm after each conv: conv1 -> bn1, layerX.Y.convZ -> layerX.Y.bnZ
            bn = n.replace("conv", "bn")
            state[bn + ".running_mean"] = self.original[bn + ".running_mean"] + shift


def rounded(weight: np.ndarray, bits: int, moment: np.ndarray | None) -> np.ndarray:
    if moment is None:
        scales = absmax_scales(weight, 0, bits)[:, None]
        return round_to_grid(weight, scales, bits) * scales.astype(np.float64)
    levels, scales = loss_aware_levels(weight[None], moment[None], bits)
    return levels[0].astype(np.float64) * scales[0][:, None].astype(np.float64)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(DEPTHS), default="cifar10-resnet56")
    parser.add_argument("--bits", type=int, default=3)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)
    h = Harness(args.model, args.seed)
    results = {"original": h.evaluate(h.original)}
    print(f"original: {results['original']}", flush=True)
    stats = h.input_statistics(h.original, h.layers)
    weights = {n: h.original[n + ".weight"].reshape(h.original[n + ".weight"].shape[0], -1).numpy().astype(np.float64)
               for n in h.layers}
    variants = {"nearest": (None, False), "nearest+bias": (None, True), "loss-aware": ("moment", False),
                "loss-aware+bias": ("moment", True), "loss-aware-centered+bias": ("centered", True)}
    for variant, (metric, bias) in variants.items():
        state = dict(h.original)
        for n in h.layers:
            moment, mean = stats[n]
            chosen = {None: None, "moment": moment, "centered": moment - np.outer(mean, mean)}[metric]
            q = rounded(weights[n], args.bits, chosen)
            state[n + ".weight"] = torch.from_numpy(q.astype(np.float32)).reshape(h.original[n + ".weight"].shape)
            if bias:
                h.corrected(state, n, q - weights[n], mean)
        results[variant] = h.evaluate(state)
        print(f"{variant}: {results[variant]}", flush=True)
    state = dict(h.original)
    for n in h.layers:
        q = rounded(weights[n], args.bits, h.input_statistics(state, [n])[n][0])
        state[n + ".weight"] = torch.from_numpy(q.astype(np.float32)).reshape(h.original[n + ".weight"].shape)
    results["loss-aware-sequential"] = h.evaluate(state)
    print(f"loss-aware-sequential: {results['loss-aware-sequential']}", flush=True)
    if args.out:
        path = args.out / f"rounding_variants_{args.model}_{args.bits}bit_seed{args.seed}.json"
        path.write_text(json.dumps({"model": args.model, "bits": args.bits, "seed": args.seed,
                                    "held_out_images": len(h.test), "results": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
