"""Peers' W8A8 post-training quantization beside onnxlrf's, on the same splits (issue 23, item 7).

    python scripts/quant_peers.py --model cifar10-resnet56 --seeds 1,2,3,4,5 --out scripts/results

Per split seed (calibration / validation / held-out test as `onnxlrf compress --seed S` draws them):

* onnxruntime ``quantize_static``: QDQ, per-channel symmetric int8 weights, uint8 activations (what its
  CPU provider fuses on x86), Conv/Gemm/MatMul, each of its calibrations (MinMax, Percentile, Entropy) on
  the calibration split; "best" is the one of highest validation metric (a user's choice: the held-out
  split is never looked at to pick).
* NVIDIA ModelOpt's ONNX INT8 PTQ (``modelopt.onnx.quantization.quantize``, ``quantize_mode="int8"``), with
  ``--modelopt-python``: the Python of a separate environment with ``pip install "nvidia-modelopt[onnx]"``
  (it pins its own onnxruntime-gpu); its calibrations ``max`` and ``entropy`` on the calibration split on the
  CPU provider, ``high_precision_dtype="fp32"`` (its fp16 default costs accuracy on onnxruntime's CPU);
  best on validation as above. Its Q/DQ is TensorRT's placement: evaluated for accuracy here, not speed.
* AMD Quark's ONNX PTQ (``quark.onnx.ModelQuantizer`` with a ``QConfig``), with ``--quark-python``: the Python of a
  separate environment with ``pip install amd-quark onnxruntime`` (and torch, which its fast finetuning needs);
  QDQ, per-channel symmetric int8 weights (``Int8Spec``, MinMax, ``QuantGranularity.Channel``), asymmetric uint8
  activations (``UInt8Spec``), Conv/Gemm/MatMul, its other options at their defaults; activation calibrations
  MinMax and Percentile (its 99.999) on the calibration split; then each of its fast finetunings named in
  ``--quark-finetune`` (``AdaRoundConfig()``, ``AdaQuantConfig()``: its defaults, 1000 and 3000 iterations at batch
  1 on the CPU over the whole calibration split) on the calibration of the higher validation metric; best on
  validation of all.
* onnxlrf ``compress --technique quant --mode uniform --bits 8 --activations int8`` with its defaults, run
  as the CLI (the same split by construction).

Each model's held-out metric, its change against the original with the 95% paired-bootstrap interval,
and the mean and range over seeds, in ``quant_peers_<model>.json``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static
from seeds_benchmark import COMMANDS  # scripts/ is on sys.path when a script runs

from onnxlrf.data import graph_inputs, load_data
from onnxlrf.onnx_io import load_onnx, save_onnx
from onnxlrf.pipeline import ExportOptions, load_or_export
from onnxlrf.runtime.evaluate import change_interval, model_predictions
from onnxlrf.verify.splits import split_dataset

MODELOPT_CALIBRATIONS = ("max", "entropy")
QUARK_CALIBRATIONS = ("minmax", "percentile")
QUARK_FINETUNES = ("adaround", "adaquant")
# Run by the Quark environment's Python: model, calibration npz, activation calibration, finetune ("" for none),
# output, batch size.
QUARK_PROGRAM = """
import sys, numpy as np
from quark.onnx import (AdaQuantConfig, AdaRoundConfig, CalibMethod, CalibrationDataReader, Int8Spec, ModelQuantizer,
                        QConfig, QLayerConfig, QuantGranularity, UInt8Spec)
model, calib, method, finetune, out, batch = sys.argv[1:7]
arrays, batch = dict(np.load(calib)), int(batch)
rows = len(next(iter(arrays.values())))
class Batches(CalibrationDataReader):
    def __init__(self):
        self.feeds = iter([{name: array[i:i + batch] for name, array in arrays.items()}
                           for i in range(0, rows, batch)])
    def get_next(self):
        return next(self.feeds, None)
calibration = {"minmax": CalibMethod.MinMax, "percentile": CalibMethod.Percentile}[method]
config = QConfig(global_config=QLayerConfig(
    activation=UInt8Spec(calibration_method=calibration),
    weight=Int8Spec(calibration_method=CalibMethod.MinMax, quant_granularity=QuantGranularity.Channel)),
    algo_config={"": [], "adaround": [AdaRoundConfig()], "adaquant": [AdaQuantConfig()]}[finetune],
    OpTypesToQuantize=["Conv", "Gemm", "MatMul"])
ModelQuantizer(config).quantize_model(model, out, Batches())
"""
# Run by the ModelOpt environment's Python: model, calibration npz (arrays by input name), shapes, method, output.
MODELOPT_PROGRAM = """
import sys, numpy as np
from modelopt.onnx.quantization import quantize
model, calib, shapes, method, out = sys.argv[1:6]
quantize(onnx_path=model, quantize_mode="int8", calibration_data=dict(np.load(calib)), calibration_method=method,
         calibration_shapes=shapes, calibration_eps=["cpu"], high_precision_dtype="fp32", output_path=out)
"""
ORT_CALIBRATIONS = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
                    "entropy": CalibrationMethod.Entropy}
BATCH = 32


class Batches(CalibrationDataReader):
    """The calibration split's rows by input name, in equal batches of at most ``BATCH`` (onnxruntime's histogram
    calibrators fail on a shorter last batch: "inhomogeneous shape")."""

    def __init__(self, inputs: dict[str, np.ndarray]) -> None:
        rows = len(next(iter(inputs.values())))
        size = max(b for b in range(1, BATCH + 1) if rows % b == 0)
        self.feeds = iter([{name: array[i:i + size] for name, array in inputs.items()}
                           for i in range(0, rows, size)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self.feeds, None)


def option(command: list[str], flag: str, default: str) -> str:
    return command[command.index(flag) + 1] if flag in command else default


def ort_static(reference: Path, calib, method: str, out: Path) -> Path:
    names = [inp.name for inp in graph_inputs(load_onnx(reference, load_external_data=False))]
    quantize_static(str(reference), str(out), Batches({name: calib.inputs[name] for name in names}),
                    quant_format=QuantFormat.QDQ, per_channel=True, activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8, op_types_to_quantize=["Conv", "Gemm", "MatMul"],
                    calibrate_method=ORT_CALIBRATIONS[method])
    return out


def modelopt_int8(python: str, reference: Path, calib, method: str, out: Path) -> Path:
    """ModelOpt's INT8 PTQ in its own environment; it writes intermediate files beside its input, so it gets a copy
    of the reference in ``out``'s folder."""
    names = [inp.name for inp in graph_inputs(load_onnx(reference, load_external_data=False))]
    rows = len(calib.inputs[names[0]])
    size = max(b for b in range(1, BATCH + 1) if rows % b == 0)
    folder = out.parent / f"modelopt_{method}"
    folder.mkdir()
    model = save_onnx(load_onnx(reference), folder / "reference.onnx")
    np.savez(folder / "calib.npz", **{name: calib.inputs[name] for name in names})
    shapes = ",".join(f"{name}:" + "x".join(str(d) for d in (size, *calib.inputs[name].shape[1:])) for name in names)
    done = subprocess.run([python, "-c", MODELOPT_PROGRAM, str(model), str(folder / "calib.npz"), shapes, method,
                           str(out)], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"ModelOpt ({method}) failed: {done.stderr.strip().splitlines()[-1]}")
    return out


def quark_int8(python: str, reference: Path, calib, method: str, finetune: str, out: Path) -> Path:
    """Quark's INT8 PTQ in its own environment, fed the calibration split by npz in ``Batches``' batch size, run in
    ``out``'s folder (Quark writes ``quantized_info.csv`` into its working directory)."""
    names = [inp.name for inp in graph_inputs(load_onnx(reference, load_external_data=False))]
    rows = len(calib.inputs[names[0]])
    npz = out.with_suffix(".npz")
    np.savez(npz, **{name: calib.inputs[name] for name in names})
    done = subprocess.run([python, "-c", QUARK_PROGRAM, str(reference), str(npz), method, finetune, str(out),
                           str(max(b for b in range(1, BATCH + 1) if rows % b == 0))],
                          capture_output=True, text=True, check=False, cwd=out.parent)
    if done.returncode != 0:
        raise SystemExit(f"Quark ({method} {finetune}) failed: {done.stderr.strip().splitlines()[-1]}")
    return out


def scored(dataset, predictions: np.ndarray, reference: np.ndarray) -> dict:
    value, base = dataset.score_predictions(predictions), dataset.score_predictions(reference)
    return {"value": value, "reference_value": base, "change": value - base,
            "change_interval": change_interval(dataset, predictions, reference)}


def onnxlrf_w8a8(model: str, seed: int, workdir: Path) -> dict:
    command = [sys.executable, "-m", "onnxlrf.cli", "compress", *COMMANDS[model], "--seed", str(seed),
               "--technique", "quant", "--mode", "uniform", "--bits", "8", "--activations", "int8",
               "-o", str(workdir / "onnxlrf_w8a8.onnx"), "--json", "-q"]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"onnxlrf seed {seed}: {done.stderr.strip().splitlines()[-1]}")
    result = json.loads(done.stdout)
    return {"value": result["value"], "reference_value": result["reference_value"],
            "change": result["value"] - result["reference_value"], "change_interval": result["change_interval"],
            "command": " ".join(["onnxlrf", *command[3:]])}


def run_seed(model: str, seed: int, modelopt_python: str | None, quark_python: str | None,
             quark_finetunes: list[str]) -> dict:
    command = COMMANDS[model]
    calib_n, val_n = int(option(command, "--calib", "1000")), int(option(command, "--val", "1000"))
    with tempfile.TemporaryDirectory(prefix="quant-peers-") as tmp:
        work = Path(tmp)
        weights = option(command, "--weights", None) if "--weights" in command else None
        reference, _ = load_or_export(command[0], work, ExportOptions(weights=weights, dynamic_batch=True))
        dataset = load_data(option(command, "--data", ""), load_onnx(reference))
        splits = split_dataset(dataset, calib_n, val_n, seed)
        reference_val = model_predictions(load_onnx(reference), splits.val, "cpu")
        reference_test = model_predictions(load_onnx(reference), splits.test, "cpu")
        row: dict = {"seed": seed}
        peers = {f"ort_{method}": lambda out, method=method: ort_static(reference, splits.calib, method, out)
                 for method in ORT_CALIBRATIONS}
        if modelopt_python:
            peers.update({f"modelopt_{method}": lambda out, method=method: modelopt_int8(
                modelopt_python, reference, splits.calib, method, out) for method in MODELOPT_CALIBRATIONS})
        if quark_python:
            peers.update({f"quark_{method}": lambda out, method=method: quark_int8(
                quark_python, reference, splits.calib, method, "", out) for method in QUARK_CALIBRATIONS})
            # Run after the plain ones (dicts keep order): each finetunes on the calibration of the best validation.
            peers.update({f"quark_{finetune}": lambda out, finetune=finetune: quark_int8(
                quark_python, reference, splits.calib,
                max(QUARK_CALIBRATIONS, key=lambda method: row[f"quark_{method}"]["val"]), finetune, out)
                for finetune in quark_finetunes})
        for name, quantize in peers.items():
            start = time.perf_counter()
            quantized = load_onnx(quantize(work / f"{name}.onnx"))
            seconds = time.perf_counter() - start
            row[name] = {"val": splits.val.score_predictions(model_predictions(quantized, splits.val, "cpu")),
                         "test": scored(splits.test, model_predictions(quantized, splits.test, "cpu"), reference_test),
                         "seconds": seconds}
        for peer in ("ort", *(["modelopt"] if modelopt_python else []), *(["quark"] if quark_python else [])):
            best = max((name for name in peers if name.startswith(peer + "_")), key=lambda name: row[name]["val"])
            row[f"{peer}_best"] = {"calibration": best.split("_", 1)[1], **row[best]}
        row["reference_val"] = splits.val.score_predictions(reference_val)
        row["onnxlrf_w8a8"] = onnxlrf_w8a8(model, seed, work)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(COMMANDS), required=True)
    parser.add_argument("--seeds", default="1,2,3,4,5")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--modelopt-python", help="Python of an environment with nvidia-modelopt[onnx].")
    parser.add_argument("--quark-python", help="Python of an environment with amd-quark, onnxruntime and torch.")
    parser.add_argument("--quark-finetune", default=",".join(QUARK_FINETUNES),
                        help="Quark's fast finetunings to run, comma-separated, of: " + ", ".join(QUARK_FINETUNES)
                        + " (empty for none).")
    args = parser.parse_args()
    quark_finetunes = [name for name in args.quark_finetune.split(",") if name]
    if set(quark_finetunes) - set(QUARK_FINETUNES):
        parser.error(f"--quark-finetune: one of {', '.join(QUARK_FINETUNES)}, comma-separated")
    for flag, python in (("--modelopt-python", args.modelopt_python), ("--quark-python", args.quark_python)):
        if python and not shutil.which(python):
            parser.error(f"{flag}: no Python at {python}")
    rows = []
    methods = ["ort_minmax", "ort_percentile", "ort_entropy", "ort_best"]
    if args.modelopt_python:
        methods += ["modelopt_max", "modelopt_entropy", "modelopt_best"]
    if args.quark_python:
        methods += [f"quark_{name}" for name in (*QUARK_CALIBRATIONS, *quark_finetunes)] + ["quark_best"]
    methods.append("onnxlrf_w8a8")
    for seed in (int(s) for s in args.seeds.split(",")):
        rows.append(run_seed(args.model, seed, args.modelopt_python, args.quark_python, quark_finetunes))
        row = rows[-1]
        cells = [f"{name} {held(row[name])['change']:+.4f} [{held(row[name])['change_interval'][0]:+.4f}, "
                 f"{held(row[name])['change_interval'][1]:+.4f}]" for name in methods if "best" in name or
                 name.startswith("onnxlrf")]
        print(f"seed {seed}: original {held(row['onnxlrf_w8a8'])['reference_value']:.4f}; " + "; ".join(cells),
              flush=True)
    summary = {"model": args.model, "seeds": rows}
    for name in methods:
        changes = np.array([held(row[name])["change"] for row in rows])
        summary[name] = {"change_mean": float(changes.mean()), "change_min": float(changes.min()),
                         "change_max": float(changes.max())}
        print(f"{name}: held-out change mean {changes.mean():+.4f} (min {changes.min():+.4f}, "
              f"max {changes.max():+.4f}) over {len(rows)} seeds")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"quant_peers_{args.model}.json").write_text(json.dumps(summary, indent=1) + "\n")


def held(result: dict) -> dict:
    """The held-out figures of a peer's row (``test``) or of onnxlrf's (at the top)."""
    return result.get("test", result)


if __name__ == "__main__":
    main()
