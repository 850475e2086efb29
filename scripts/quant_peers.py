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
* Quark's auto mixed precision (``AutoMixprecisionConfig`` in the ``QConfig``'s ``algo_config``), with
  ``--quark-amp``: Quark's integer types are 8, 16 and 32 bits (4 bits only as its MX/MXFP block formats, Quark
  custom ops that plain onnxruntime cannot run), so it mixes int8 with int16 per Conv/Gemm/MatMul, with per-tensor
  weights (it re-quantizes a promoted weight per tensor and fails on per-channel ones): ``quality``
  starts from W8A8 as above but per-tensor and promotes the most sensitive layers (its layer-wise sensitivity analysis) to
  int16 weights and uint16 activations until the validation metric's drop is at most ``--quark-amp-threshold``
  (its ``speed``, from A16W16 demoting layers to W8A8, ran here but was not run to its end: not offered).
  Calibration on the calibration split (the calibration of the higher validation metric of the plain ones); its
  metric (``metric_evaluate_fn``, top-1) on the validation split: the script hands its AutoMixprecision step a
  reader of the validation split in place of the calibration one. Classification only; not a candidate for
  ``quark_best`` (another size); its weight bytes and average weight bits (of Conv/Gemm/MatMul weights as
  stored) and the layers at 16 bits are reported.
* Intel Neural Compressor's accuracy-driven PTQ (2.x: ``neural_compressor.quantization.fit`` with
  ``PostTrainingQuantConfig(approach="static", quant_format="QDQ")``, its ONNX Runtime adaptor), with
  ``--inc-python``: the Python of a separate environment with ``pip install neural-compressor==2.6 onnx==1.16.2
  onnxruntime==1.18.1 "numpy<2" "pandas<3" six`` (3.x has no ONNX backend; 2.6 imports six without declaring it).
  Its defaults otherwise: int8 symmetric per-channel weights (Conv and MatMul), uint8 asymmetric activations,
  all the op types it quantizes (Add, Gather, pooling, ... besides Conv/MatMul; Gemm becomes MatMul + Add), its
  graph optimization first (onnxruntime's basic level for a CV model, extended for an NLP one), its MinMax
  calibration on the whole calibration split. Then its tuning until the validation metric (its ``eval_func``:
  top-1 or Spearman, scored by this script as every peer's) is at most ``--inc-tolerance`` below the original's
  (absolute), in at most ``--inc-max-trials`` trials: with ``--inc-quant-level auto`` (its default) its default
  config, then its conservative strategy (from fp32, each whole op type of Conv and MatMul to int8, kept if the
  criterion holds; it ends there once any trial met it), then its basic strategy (other calibrations per op type,
  its recipes such as the first and last Conv/MatMul in fp32, then ops falling back to fp32 one at a time, then
  together); ``1``: the basic strategy alone. If no trial meets the criterion, the trial of highest validation
  metric is scored (``met_criterion`` false). Reported: average weight bits (of Conv/Gemm/MatMul), the layers
  with fp32 weights, the activation MatMuls and whether they are quantized, the ops INC left fp32, each
  evaluation's validation metric (the first is the original's) and its log of the search. Not a candidate for any
  ``_best``.
* onnxlrf ``compress --technique quant --mode uniform --bits 8 --activations int8`` with its defaults, run
  as the CLI (the same split by construction).

Each model's held-out metric, its change against the original with the 95% paired-bootstrap interval,
and the mean and range over seeds, in ``quant_peers_<model>.json``. ``--skip-ort`` leaves out onnxruntime's
``quantize_static`` and onnxlrf's W8A8 (both in the full runs' files for the same seeds); ``--threads N`` sets
the intra-op threads of every onnxruntime session this script and the INC environment open.
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
import onnx
import onnxruntime as ort
from onnx import TensorProto
from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static
from seeds_benchmark import COMMANDS  # scripts/ is on sys.path when a script runs

from onnxlrf.data import CLASSIFICATION, graph_inputs, load_data
from onnxlrf.onnx_io import load_onnx, save_onnx
from onnxlrf.pipeline import ExportOptions, load_or_export
from onnxlrf.runtime.evaluate import change_interval, model_predictions
from onnxlrf.verify.splits import split_dataset

MODELOPT_CALIBRATIONS = ("max", "entropy")
QUARK_CALIBRATIONS = ("minmax", "percentile")
QUARK_FINETUNES = ("adaround", "adaquant")
QUARK_AMP_MODES = ("quality",)
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
# Run by the Quark environment's Python: model, calibration npz, activation calibration, validation npz, validation
# labels npy, output, batch size, mode ("quality" or "speed"), threshold.
QUARK_AMP_PROGRAM = """
import sys, numpy as np
import quark.onnx.postprocess.postproc as postproc
from quark.onnx import (AutoMixprecisionConfig, CalibMethod, CalibrationDataReader, Int8Spec, Int16Spec,
                        ModelQuantizer, QConfig, QLayerConfig, QuantGranularity, UInt8Spec, UInt16Spec)
from quark.onnx.calibration import CachedDataReader
model, calib, method, val, labels, out, batch, mode, threshold = sys.argv[1:10]
batch, labels = int(batch), np.load(labels)
class Batches(CalibrationDataReader):
    def __init__(self, arrays):
        rows = len(next(iter(arrays.values())))
        self.feeds = iter([{name: array[i:i + batch] for name, array in arrays.items()}
                           for i in range(0, rows, batch)])
    def get_next(self):
        return next(self.feeds, None)
validation = CachedDataReader(Batches(dict(np.load(val))))
def top1(outputs):  # outputs: per batch, [the model's first output]
    logits = np.concatenate([batch[0] for batch in outputs])
    return float(np.mean(logits.reshape(len(logits), -1).argmax(axis=1) == labels))
# Quark runs AutoMixprecision on its calibration reader; this hands it the validation split's instead (its
# calibration, tensor ranges included, stays on the calibration split).
quark_post = postproc.apply_post_quant_algorithms
def on_validation(float_model, quant_model, data_reader, *args, **kwargs):
    if kwargs.get("algorithm") == "AutoMixprecision":
        data_reader = validation
    return quark_post(float_model, quant_model, data_reader, *args, **kwargs)
postproc.apply_post_quant_algorithms = on_validation
calibration = {"minmax": CalibMethod.MinMax, "percentile": CalibMethod.Percentile}[method]
# Per-tensor weights: AutoMixprecision re-quantizes a promoted weight from its whole tensor's range, and a per-channel
# one fails there (MixingStrategy._dequantize_weight: "operands could not be broadcast together with shapes
# (16,3,3,3) (16,)").
int8 = QLayerConfig(activation=UInt8Spec(calibration_method=calibration),
                    weight=Int8Spec(calibration_method=CalibMethod.MinMax, quant_granularity=QuantGranularity.Tensor))
int16 = QLayerConfig(activation=UInt16Spec(calibration_method=calibration),
                     weight=Int16Spec(calibration_method=CalibMethod.MinMax, quant_granularity=QuantGranularity.Tensor))
base, target = (int8, int16) if mode == "quality" else (int16, int8)
# DataSize counts batches; its default 0 stops after one batch (inference_model: len(results) > data_num).
amp = AutoMixprecisionConfig(target_layer_config=target, target_op_type=["Conv", "Gemm", "MatMul"],
                             data_size=len(validation._data_cache), metric_evaluate_fn=top1,
                             metric_threshold=float(threshold), metric_optimize_object=mode)
config = QConfig(global_config=base, algo_config=[amp], OpTypesToQuantize=["Conv", "Gemm", "MatMul"])
ModelQuantizer(config).quantize_model(model, out, Batches(dict(np.load(calib))))
"""
# Run by the ModelOpt environment's Python: model, calibration npz (arrays by input name), shapes, method, output.
MODELOPT_PROGRAM = """
import sys, numpy as np
from modelopt.onnx.quantization import quantize
model, calib, shapes, method, out = sys.argv[1:6]
quantize(onnx_path=model, quantize_mode="int8", calibration_data=dict(np.load(calib)), calibration_method=method,
         calibration_shapes=shapes, calibration_eps=["cpu"], high_precision_dtype="fp32", output_path=out)
"""
# Run by the INC environment's Python: model, calibration npz, output, batch size, tolerance, max trials, threads
# (0: onnxruntime's default), quant level ("auto", 0 or 1). Its eval_func asks the script to score each candidate
# on the validation split: it writes the candidate's path on its protocol line (the original stdout; its own prints
# and logs go to stderr) and reads the metric back from stdin. Beside the output, ``.inc.json``: the ops its final config leaves fp32.
INC_PROGRAM = """
import json, os, sys, numpy as np
model, calib, out, batch, tolerance, trials, threads, level = sys.argv[1:9]
protocol = os.fdopen(os.dup(1), "w", buffering=1)
os.dup2(2, 1)
import onnx, onnxruntime as ort
if int(threads):
    session_init = ort.InferenceSession.__init__
    def with_threads(self, path_or_bytes, sess_options=None, *args, **kwargs):
        sess_options = sess_options or ort.SessionOptions()
        sess_options.intra_op_num_threads = int(threads)
        session_init(self, path_or_bytes, sess_options, *args, **kwargs)
    ort.InferenceSession.__init__ = with_threads
from neural_compressor import quantization
from neural_compressor.config import AccuracyCriterion, PostTrainingQuantConfig, TuningCriterion
arrays, batch = dict(np.load(calib)), int(batch)
rows = len(next(iter(arrays.values())))
class Batches:
    batch_size = batch
    def __iter__(self):
        for i in range(0, rows, batch):
            yield {name: array[i:i + batch] for name, array in arrays.items()}, None
    def __len__(self):
        return rows // batch
count = 0
def evaluate(candidate):
    global count
    count += 1
    path = os.path.abspath(f"inc_candidate_{count}.onnx")
    onnx.save(candidate if isinstance(candidate, onnx.ModelProto) else onnx.load(candidate), path)
    protocol.write(path + "\\n")
    return float(sys.stdin.readline())
config = PostTrainingQuantConfig(approach="static", quant_format="QDQ", backend="default", device="cpu",
                                 calibration_sampling_size=[rows],
                                 quant_level=level if level == "auto" else int(level),
                                 accuracy_criterion=AccuracyCriterion(criterion="absolute",
                                                                      tolerable_loss=float(tolerance)),
                                 tuning_criterion=TuningCriterion(max_trials=int(trials)))
quantized = quantization.fit(model, config, calib_dataloader=Batches(), eval_func=evaluate)
fp32, quantized_ops = [], []
if quantized is not None:
    quantized.save(out)
    for (name, op_type), op in ((quantized.q_config or {}).get("op") or {}).items():
        activation = op.get("activation", {}) if isinstance(op, dict) else {}
        (fp32 if activation.get("dtype") == "fp32" else quantized_ops).append(f"{name} ({op_type})")
json.dump({"met_criterion": quantized is not None, "fp32_ops": fp32, "quantized_ops": len(quantized_ops)},
          open(out + ".inc.json", "w"))
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


def quark_amp(python: str, reference: Path, calib, val, method: str, mode: str, threshold: float, out: Path) -> Path:
    """Quark's auto mixed precision (``mode`` "quality" or "speed") in its own environment, calibrated on ``calib``,
    its metric (top-1) on ``val``; run in ``out``'s folder as :func:`quark_int8`."""
    if val.task != CLASSIFICATION:
        raise SystemExit(f"Quark AutoMixprecision: top-1 on classification data only, not {val.task}")
    names = [inp.name for inp in graph_inputs(load_onnx(reference, load_external_data=False))]
    rows = len(calib.inputs[names[0]])
    np.savez(out.with_suffix(".calib.npz"), **{name: calib.inputs[name] for name in names})
    np.savez(out.with_suffix(".val.npz"), **{name: val.inputs[name] for name in names})
    np.save(out.with_suffix(".labels.npy"), val.labels)
    done = subprocess.run([python, "-c", QUARK_AMP_PROGRAM, str(reference), str(out.with_suffix(".calib.npz")), method,
                           str(out.with_suffix(".val.npz")), str(out.with_suffix(".labels.npy")), str(out),
                           str(max(b for b in range(1, BATCH + 1) if rows % b == 0)), mode, str(threshold)],
                          capture_output=True, text=True, check=False, cwd=out.parent)
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines()  # its last line is often a progress bar's
        raise SystemExit(f"Quark AutoMixprecision ({mode}) failed: "
                         + next((line for line in reversed(lines) if "Error" in line), lines[-1]))
    # Its log of the search (the W8A8 or A16W16 start's validation drop, each step's, the count) beside the model.
    steps = [line.split("]: ", 1)[1].replace("\x1b[0m", "") for line in (done.stdout + done.stderr).splitlines()
             if "]: " in line and ("baseline score" in line or "Mixing precision" in line
                                   or "Automatic Mixed Precision has" in line)]
    out.with_suffix(".amp.json").write_text(json.dumps(steps))
    return out


def inc_int8(python: str, reference: Path, calib, val, tolerance: float, trials: int, threads: int, level: str,
             out: Path) -> Path:
    """INC's accuracy-driven static QDQ PTQ in its own environment (``INC_PROGRAM``), calibrated on ``calib``; each
    candidate it evaluates is scored here on ``val`` (its first evaluation is the original's). Run in ``out``'s
    folder (it writes ``nc_workspace/`` into its working directory). Beside the model, ``.inc.json``: whether a trial
    met the criterion, the ops INC left fp32 and the validation metric of every evaluation. With no trial meeting
    it, ``out`` is the candidate of highest validation metric."""
    names = [inp.name for inp in graph_inputs(load_onnx(reference, load_external_data=False))]
    rows = len(calib.inputs[names[0]])
    npz = out.with_suffix(".npz")
    np.savez(npz, **{name: calib.inputs[name] for name in names})
    log = out.with_suffix(".log")
    evaluations: list[float] = []
    best = None
    with log.open("w") as stderr:
        process = subprocess.Popen([python, "-c", INC_PROGRAM, str(reference), str(npz), str(out),
                                    str(max(b for b in range(1, BATCH + 1) if rows % b == 0)), str(tolerance),
                                    str(trials), str(threads), level],
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr, text=True,
                                   cwd=out.parent)
        for line in process.stdout:
            candidate = Path(line.strip())
            evaluations.append(val.score_predictions(model_predictions(load_onnx(candidate), val, "cpu")))
            process.stdin.write(f"{evaluations[-1]!r}\n")
            process.stdin.flush()
            if len(evaluations) > 1 and (best is None or evaluations[-1] > max(evaluations[1:-1])):
                best = shutil.copyfile(candidate, out.with_suffix(".best.onnx"))
            candidate.unlink()
        process.wait()
    if process.returncode != 0:
        lines = log.read_text().strip().splitlines() or ["(no output)"]
        raise SystemExit("INC failed: " + next((line for line in reversed(lines) if "Error" in line), lines[-1]))
    report = json.loads(Path(str(out) + ".inc.json").read_text())
    if not report["met_criterion"]:
        if best is None:
            raise SystemExit("INC evaluated no quantized candidate")
        shutil.copyfile(best, out)
    report["evaluations"] = evaluations
    # INC's account of its search (its strategies' steps, each trial's result), from its log.
    steps = ("result is:", "*** ", "allback", "Apply ", "Quantize the model", "Start ")
    report["trials"] = [step for step in (line.split("] ", 1)[-1] for line in log.read_text().splitlines())
                        if any(word in step for word in steps) and not step.startswith("|")]
    out.with_suffix(".inc.json").write_text(json.dumps(report))
    return out


def float_layers(model) -> dict:
    """Of a Q/DQ model: the Conv/Gemm/MatMul nodes whose weight (an initializer) is stored as float; the MatMuls of
    two activations (onnxruntime's FusedMatMul included) and how many of them have both inputs from a
    DequantizeLinear; the op types of other domains (a graph optimization's fused ops) with their counts; the op types
    with an input from a DequantizeLinear; the weights (DequantizeLinear of an initializer) with per-channel scales."""
    initializers = {tensor.name: tensor for tensor in model.graph.initializer}
    producers = {output: node for node in model.graph.node for output in node.output}

    def dequantized(name: str) -> bool:
        return name in producers and producers[name].op_type == "DequantizeLinear"

    floats, activation_matmuls, quantized, per_channel = [], 0, 0, 0
    fused: dict[str, int] = {}
    fed: dict[str, int] = {}  # op types with an input from a DequantizeLinear: what runs on quantized values
    for node in model.graph.node:
        if node.domain not in ("", "ai.onnx"):
            fused[f"{node.domain}.{node.op_type}"] = fused.get(f"{node.domain}.{node.op_type}", 0) + 1
        if node.op_type == "DequantizeLinear":
            per_channel += (node.input[0] in initializers and len(node.input) > 1 and node.input[1] in initializers
                            and int(np.prod(initializers[node.input[1]].dims)) > 1)
        elif node.op_type != "QuantizeLinear" and any(dequantized(name) for name in node.input):
            fed[node.op_type] = fed.get(node.op_type, 0) + 1
        if node.op_type not in ("Conv", "Gemm", "MatMul", "FusedMatMul") or len(node.input) < 2:
            continue
        if node.input[1] in initializers:
            floats.append(node.name)
        elif not dequantized(node.input[1]) or producers[node.input[1]].input[0] not in initializers:
            activation_matmuls += 1
            quantized += all(dequantized(name) for name in node.input[:2])
    return {"float_weight_layers": floats, "activation_matmuls": activation_matmuls,
            "activation_matmuls_quantized": quantized, "other_domain_ops": fused, "quantized_op_types": fed,
            "per_channel_weights": per_channel}


def weight_precision(model) -> dict:
    """Of a Q/DQ model's Conv/Gemm/MatMul weights (initializers, directly or through a DequantizeLinear): the bytes
    as stored, the average bits per weight, and the layers whose weight or input activation is 16-bit."""
    initializers = {tensor.name: tensor for tensor in model.graph.initializer}
    producers = {output: node for node in model.graph.node for output in node.output}
    bits = {TensorProto.INT8: 8, TensorProto.UINT8: 8, TensorProto.INT16: 16, TensorProto.UINT16: 16,
            TensorProto.INT32: 32, TensorProto.FLOAT: 32, TensorProto.FLOAT16: 16, TensorProto.BFLOAT16: 16}

    def stored(name: str) -> onnx.TensorProto | None:
        node = producers.get(name)
        if node is not None and node.op_type == "DequantizeLinear":
            name = node.input[0]
        return initializers.get(name)

    total_bits = params = 0
    wide = []
    for node in model.graph.node:
        if node.op_type not in ("Conv", "Gemm", "MatMul") or len(node.input) < 2:
            continue
        weight = stored(node.input[1])
        if weight is None:
            continue
        count = int(np.prod(weight.dims))
        total_bits, params = total_bits + bits[weight.data_type] * count, params + count
        activation = producers.get(node.input[0])
        zero_point = (initializers.get(activation.input[2]) if activation is not None and
                      activation.op_type == "DequantizeLinear" and len(activation.input) > 2 else None)
        if bits[weight.data_type] == 16 or (zero_point is not None and bits[zero_point.data_type] == 16):
            wide.append(node.name)
    return {"weight_bytes": total_bits // 8, "weight_params": params, "average_weight_bits": total_bits / params,
            "layers_16bit": len(wide), "layers_16bit_names": wide}


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
             quark_finetunes: list[str], quark_amp_modes: list[str] = (), quark_amp_threshold: float = 0.001,
             inc_python: str | None = None, inc_tolerance: float = 0.001, inc_max_trials: int = 30,
             threads: int = 0, skip_ort: bool = False, inc_quant_level: str = "auto") -> dict:
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
        peers = {} if skip_ort else {
            f"ort_{method}": lambda out, method=method: ort_static(reference, splits.calib, method, out)
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
            peers.update({f"quark_amp_{mode}": lambda out, mode=mode: quark_amp(
                quark_python, reference, splits.calib, splits.val,
                max(QUARK_CALIBRATIONS, key=lambda method: row[f"quark_{method}"]["val"]), mode, quark_amp_threshold,
                out) for mode in quark_amp_modes})
        if inc_python:
            peers["inc"] = lambda out: inc_int8(inc_python, reference, splits.calib, splits.val, inc_tolerance,
                                                inc_max_trials, threads, inc_quant_level, out)
        for name, quantize in peers.items():
            start = time.perf_counter()
            quantized = load_onnx(quantize(work / f"{name}.onnx"))
            seconds = time.perf_counter() - start
            row[name] = {"val": splits.val.score_predictions(model_predictions(quantized, splits.val, "cpu")),
                         "test": scored(splits.test, model_predictions(quantized, splits.test, "cpu"), reference_test),
                         "seconds": seconds}
            if name.startswith("quark_amp_"):
                row[name].update(weight_precision(quantized), file_bytes=(work / f"{name}.onnx").stat().st_size,
                                 threshold=quark_amp_threshold,
                                 search_log=json.loads((work / f"{name}.amp.json").read_text()))
            if name == "inc":
                row[name].update(**weight_precision(quantized), **float_layers(quantized),
                                 file_bytes=(work / f"{name}.onnx").stat().st_size, tolerance=inc_tolerance,
                                 max_trials=inc_max_trials, quant_level=inc_quant_level,
                                 **json.loads((work / "inc.inc.json").read_text()))
        for peer in (*([] if skip_ort else ["ort"]), *(["modelopt"] if modelopt_python else []),
                     *(["quark"] if quark_python else [])):
            best = max((name for name in peers if name.startswith(peer + "_") and not name.startswith("quark_amp_")),
                       key=lambda name: row[name]["val"])
            row[f"{peer}_best"] = {"calibration": best.split("_", 1)[1], **row[best]}
        row["reference_val"] = splits.val.score_predictions(reference_val)
        row["reference_test"] = splits.test.score_predictions(reference_test)
        if not skip_ort:
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
    parser.add_argument("--quark-amp", default="",
                        help="Quark's AutoMixprecision runs, comma-separated, of: " + ", ".join(QUARK_AMP_MODES)
                        + " (empty, the default, for none).")
    parser.add_argument("--quark-amp-threshold", type=float, default=0.001,
                        help="AutoMixprecision's threshold: the most the validation top-1 may drop (not 0: Quark reads "
                        "0 as no threshold).")
    parser.add_argument("--inc-python", help="Python of an environment with neural-compressor 2.x and onnxruntime.")
    parser.add_argument("--inc-tolerance", type=float, default=0.001,
                        help="INC's accuracy criterion: the most the validation metric may drop, absolute.")
    parser.add_argument("--inc-max-trials", type=int, default=30,
                        help="INC's tuning trials at most (each a calibration and a validation run).")
    parser.add_argument("--inc-quant-level", choices=("auto", "0", "1"), default="auto",
                        help="INC's quant_level: auto (its default: the default config, then its conservative "
                        "strategy, which quantizes whole op types and keeps those that meet the criterion, then basic), "
                        "0 (conservative only) or 1 (basic only: ops fall back to fp32 one at a time).")
    parser.add_argument("--skip-ort", action="store_true",
                        help="Leave out onnxruntime's quantize_static and onnxlrf's W8A8.")
    parser.add_argument("--threads", type=int, default=0,
                        help="Intra-op threads of every onnxruntime session here and in the INC environment "
                        "(0: their defaults).")
    args = parser.parse_args()
    if args.threads:
        session_init = ort.InferenceSession.__init__

        def with_threads(self, path_or_bytes, sess_options=None, *rest, **kwargs):
            sess_options = sess_options or ort.SessionOptions()
            sess_options.intra_op_num_threads = args.threads
            session_init(self, path_or_bytes, sess_options, *rest, **kwargs)

        ort.InferenceSession.__init__ = with_threads
    quark_amp_modes = [name for name in args.quark_amp.split(",") if name]
    if set(quark_amp_modes) - set(QUARK_AMP_MODES):
        parser.error(f"--quark-amp: one of {', '.join(QUARK_AMP_MODES)}, comma-separated")
    if quark_amp_modes and not args.quark_python:
        parser.error("--quark-amp needs --quark-python")
    quark_finetunes = [name for name in args.quark_finetune.split(",") if name]
    if set(quark_finetunes) - set(QUARK_FINETUNES):
        parser.error(f"--quark-finetune: one of {', '.join(QUARK_FINETUNES)}, comma-separated")
    for flag, python in (("--modelopt-python", args.modelopt_python), ("--quark-python", args.quark_python),
                         ("--inc-python", args.inc_python)):
        if python and not shutil.which(python):
            parser.error(f"{flag}: no Python at {python}")
    rows = []
    methods = [] if args.skip_ort else ["ort_minmax", "ort_percentile", "ort_entropy", "ort_best"]
    if args.modelopt_python:
        methods += ["modelopt_max", "modelopt_entropy", "modelopt_best"]
    if args.quark_python:
        methods += [f"quark_{name}" for name in (*QUARK_CALIBRATIONS, *quark_finetunes)] + ["quark_best"]
        methods += [f"quark_amp_{mode}" for mode in quark_amp_modes]
    if args.inc_python:
        methods.append("inc")
    if not args.skip_ort:
        methods.append("onnxlrf_w8a8")
    for seed in (int(s) for s in args.seeds.split(",")):
        rows.append(run_seed(args.model, seed, args.modelopt_python, args.quark_python, quark_finetunes,
                             quark_amp_modes, args.quark_amp_threshold, args.inc_python, args.inc_tolerance,
                             args.inc_max_trials, args.threads, args.skip_ort, args.inc_quant_level))
        row = rows[-1]
        cells = [f"{name} {held(row[name])['change']:+.4f} [{held(row[name])['change_interval'][0]:+.4f}, "
                 f"{held(row[name])['change_interval'][1]:+.4f}]" for name in methods if "best" in name or
                 name.startswith(("onnxlrf", "quark_amp_", "inc"))]
        print(f"seed {seed}: original {row['reference_test']:.4f}; " + "; ".join(cells), flush=True)
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
