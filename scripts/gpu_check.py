"""The GPU check (issue 23, item 8): onnxlrf's low-rank and quantized models on an NVIDIA GPU.

    bash scripts/gpu_check.sh --out gpu_results        # or: python scripts/gpu_check.py --out gpu_results

On a machine with an NVIDIA GPU, onnxruntime-gpu (CUDA provider) and TensorRT's Python package (``tensorrt``)
with torch built for CUDA, it:

1. exports the CIFAR-10 ResNet-56 (``../shared/data`` or ``$ONNXLRF_SHARED``) and makes three models with the
   CLI: low-rank (``--mode lossless --target-reduction 0.2``), W8A8 in TensorRT's Q/DQ form (``--technique
   quant --mode uniform --bits 8 --activations int8 --runtime tensorrt``) and 4-bit weight-only in TensorRT's
   form (per-channel levels in int8 DequantizeLinear: TensorRT's INT4 is for blocked MatMul/Gemm weights);
2. validates each on the CUDA provider against the original (``onnxlrf validate --provider cuda``; the
   providers the session really used are checked, not the available ones);
3. builds a TensorRT engine of each (the original and low-rank in FP16, the Q/DQ models with INT8 and FP16
   enabled: explicit quantization; a model TensorRT refuses is reported with its error, which is what this
   check is for: the TensorRT forms were built without TensorRT) and times them against the original's FP16
   engine, interleaved, at batch 1 and 32 (CUDA events, after warm-up), printing each speedup.

Without a GPU (or without onnxruntime's CUDA provider, TensorRT, or torch with CUDA) it says which in one
line and exits with status 2, having done nothing. Results: ``gpu_check.json`` in ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

SHARED = Path(os.environ.get("ONNXLRF_SHARED", Path(__file__).resolve().parents[2] / "shared")) / "data"
MODELS = {  # name -> compress flags after the common ones (None: the exported original)
    "original": None,
    "lowrank": ["--mode", "lossless", "--target-reduction", "0.2"],
    "w8a8": ["--technique", "quant", "--mode", "uniform", "--bits", "8", "--activations", "int8",
             "--runtime", "tensorrt"],
    "w4": ["--technique", "quant", "--mode", "uniform", "--bits", "4", "--runtime", "tensorrt"],
}
BATCHES = (1, 32)
RUNS, WARMUP = 50, 10


def refuse(why: str) -> None:
    print(f"gpu_check: {why}; nothing was run", file=sys.stderr)
    raise SystemExit(2)


def preconditions() -> None:
    """One line and exit status 2 for the first thing missing."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        refuse("no NVIDIA GPU (nvidia-smi not found)")
    listed = subprocess.run([smi, "-L"], capture_output=True, text=True, check=False)
    if listed.returncode != 0 or "GPU" not in listed.stdout:
        refuse("no NVIDIA GPU (nvidia-smi -L lists none)")
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        refuse(f"onnxruntime {ort.__version__} has no CUDA provider (pip install onnxruntime-gpu)")
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        refuse("TensorRT's Python package is missing (pip install tensorrt)")
    import torch

    if not torch.cuda.is_available():
        refuse(f"torch {torch.__version__} cannot use the GPU (a CUDA build of torch is needed for TensorRT's buffers)")
    if not (SHARED / "cifar10" / "resnet56-4bfd9763.th").is_file():
        refuse(f"the shared ResNet-56 checkpoint is not under {SHARED} (set ONNXLRF_SHARED)")


def onnxlrf(*args: str) -> dict:
    done = subprocess.run([sys.executable, "-m", "onnxlrf.cli", *args, "--json", "-q"], capture_output=True,
                          text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"gpu_check: onnxlrf {args[0]} failed: {done.stderr.strip().splitlines()[-1]}")
    return json.loads(done.stdout)


def make_models(work: Path) -> dict[str, Path]:
    common = ["cifar10-resnet56", "--weights", str(SHARED / "cifar10/resnet56-4bfd9763.th"), "--dynamic-batch"]
    data = ["--data", "cifar10-jpeg:" + str(SHARED / "cifar10/cifar10_test_jpeg.npz")]
    paths = {"original": work / "original.onnx"}
    onnxlrf("export", *common, "-o", str(paths["original"]), "--overwrite")
    for name, flags in MODELS.items():
        if flags is not None:
            paths[name] = work / f"{name}.onnx"
            onnxlrf("compress", *common, *data, *flags, "-o", str(paths[name]), "--overwrite")
    return paths


def validate_on_cuda(paths: dict[str, Path]) -> dict:
    data = "cifar10-jpeg:" + str(SHARED / "cifar10/cifar10_test_jpeg.npz")
    results = {}
    for name, path in paths.items():
        result = onnxlrf("validate", str(path), "--data", data, "--reference", str(paths["original"]),
                         "--provider", "cuda")
        if result["providers"][0] != "CUDAExecutionProvider":
            raise SystemExit(f"gpu_check: {name} ran on {result['providers']}, not the CUDA provider")
        results[name] = {key: result[key] for key in ("value", "reference_value", "change_interval", "providers",
                                                       "params", "file_size")}
        print(f"{name}: top-1 {result['value']:.4f} (original {result['reference_value']:.4f}) on "
              f"{result['providers'][0]}", flush=True)
    return results


def build_engine(path: Path, int8: bool):
    """A TensorRT engine of ``path`` for batches 1 to 32 (FP16; with ``int8``, explicit Q/DQ INT8 too)."""
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise SystemExit(f"gpu_check: TensorRT cannot parse {path.name}: {errors}")
    config = builder.create_builder_config()
    config.set_flag(trt.BuilderFlag.FP16)
    if int8:
        config.set_flag(trt.BuilderFlag.INT8)
    profile = builder.create_optimization_profile()
    tensor = network.get_input(0)
    shape = tuple(tensor.shape)[1:]
    profile.set_shape(tensor.name, (1, *shape), (max(BATCHES), *shape), (max(BATCHES), *shape))
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise SystemExit(f"gpu_check: TensorRT could not build an engine of {path.name}")
    return trt.Runtime(logger).deserialize_cuda_engine(serialized)


def timed_runs(engines: dict, batch: int) -> dict[str, float]:
    """Median milliseconds per batch of each engine, the engines run in turn (interleaved) ``RUNS`` times."""
    import torch

    contexts, streams = {}, torch.cuda.Stream()
    for name, engine in engines.items():
        context = engine.create_execution_context()
        for i in range(engine.num_io_tensors):
            tensor = engine.get_tensor_name(i)
            if engine.get_tensor_mode(tensor).name == "INPUT":
                context.set_input_shape(tensor, (batch, *tuple(engine.get_tensor_shape(tensor))[1:]))
        buffers = []
        for i in range(engine.num_io_tensors):
            tensor = engine.get_tensor_name(i)
            buffer = torch.randn(tuple(context.get_tensor_shape(tensor)), device="cuda")
            context.set_tensor_address(tensor, buffer.data_ptr())
            buffers.append(buffer)
        contexts[name] = (context, buffers)
    times: dict[str, list[float]] = {name: [] for name in engines}
    for run in range(WARMUP + RUNS):
        for name, (context, _) in contexts.items():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(streams)
            context.execute_async_v3(streams.cuda_stream)
            end.record(streams)
            end.synchronize()
            if run >= WARMUP:
                times[name].append(start.elapsed_time(end))
    return {name: sorted(values)[len(values) // 2] for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("gpu_results"))
    args = parser.parse_args()
    preconditions()
    start = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    paths = make_models(args.out)
    report = {"validation": validate_on_cuda(paths), "tensorrt": {}}
    engines, report["tensorrt_errors"] = {}, {}
    for name, path in paths.items():
        try:  # a model TensorRT refuses is a finding to report, not the end of the check
            engines[name] = build_engine(path, int8=name in ("w8a8", "w4"))
        except SystemExit as exc:
            if name == "original":
                raise
            report["tensorrt_errors"][name] = str(exc)
            print(exc, flush=True)
    for batch in BATCHES:
        medians = timed_runs(engines, batch)
        report["tensorrt"][f"batch_{batch}"] = {
            name: {"ms": ms, "speedup_vs_original_fp16": medians["original"] / ms} for name, ms in medians.items()}
        print(f"TensorRT batch {batch}: " + ", ".join(f"{name} {ms:.3f} ms ({medians['original'] / ms:.2f}x)"
                                                     for name, ms in medians.items()), flush=True)
    import torch

    report["device"] = torch.cuda.get_device_name(0)
    report["seconds"] = time.perf_counter() - start
    (args.out / "gpu_check.json").write_text(json.dumps(report, indent=1) + "\n")
    print(f"gpu_check: done in {report['seconds']:.0f} s on {report['device']}; {args.out / 'gpu_check.json'}")


if __name__ == "__main__":
    main()
