"""Every torchvision builder through export and the joint analysis (issue 24: "no op blocks it").

    python scripts/builder_sweep.py --out scripts/results/builder_sweep.json
    python scripts/builder_sweep.py --task detection --names retinanet_resnet50_fpn,fcos_resnet50_fpn

Per builder of torchvision's classification, segmentation and detection modules, in a child process
of its own (memory returns between models; ``--timeout`` bounds each), random weights as
``torchvision:<name>`` gives them:

1. ``onnxlrf.export.export_model`` (TorchScript exporter, opset 17, batch 1) with its check against
   torch in onnxruntime. A builder whose export fails is recorded as such ("does not export"); one
   whose onnxruntime outputs differ from torch's beyond the check's tolerance is exported without the
   check and goes on, its row's ``export_check`` saying why it failed.
2. A detector's post-processing is cut off as ``compress`` cuts it (``onnxlrf.graph.heads``).
3. The ops the torch evaluator lacks, split as ``onnxlrf inspect`` splits them: on the path from an
   analysed weight to the outputs (they would block the joint modes) and off it (run by onnx's
   reference evaluator).
4. The joint analysis itself (``onnxlrf.measure.sensitivity.analyze``: gradients, Kronecker factors and
   each layer's basis) on ``--samples`` random inputs with the label-free loss (the distance to the
   original's outputs), as ``compress --labels outputs`` runs it, less the range checks (forward passes
   of the same evaluator). "analysed" means it finished with a finite basis for every layer it covers
   (a layer whose Kronecker factors would not fit in memory is left out dense, and listed).

Builders with more than ``--max-params`` parameters are listed as not run (memory of this machine).
Prints one line per builder and writes the JSON rows (with the totals) to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
import tempfile
import time
import traceback
from pathlib import Path

TASK_MODULES = ("classification", "segmentation", "detection")


def builders(task: str) -> list[str]:
    from torchvision import models

    module = {"classification": models, "segmentation": models.segmentation, "detection": models.detection}[task]
    return sorted(models.list_models(module=module))


# Small random configs of Hugging Face encoder types (the MiniLM tokenizer's 30,522-token vocabulary), and
# what some types need besides (or instead of: None) the common sizes. Types that need more inputs than token ids and a mask
# (layout boxes: lilt, bros; a language id: xmod) are not sentence encoders and are left out.
HF_COMMON = {"vocab_size": 30522, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
             "intermediate_size": 128}
SPECIAL_IDS = {"pad_token_id": 0, "bos_token_id": 101, "eos_token_id": 102, "cls_token_id": 101,
               "sep_token_id": 102, "mask_token_id": 103}
HF_TYPES = {
    "bert": {}, "roberta": {}, "xlm-roberta": {}, "xlm-roberta-xl": {}, "camembert": {}, "data2vec-text": {},
    "distilbert": {}, "albert": {}, "electra": {}, "mpnet": {}, "deberta": {}, "deberta-v2": {}, "ernie": {},
    "megatron-bert": {}, "roformer": {}, "rembert": {}, "mobilebert": {}, "convbert": {}, "ibert": {},
    "longformer": {"attention_window": 16}, "big_bird": {}, "nystromformer": {}, "mra": {}, "yoso": {},
    "fnet": {}, "canine": {}, "splinter": {}, "tapas": {}, "markuplm": {}, "layoutlm": {}, "flaubert": {},
    "xlm": {}, "luke": {}, "modernbert": SPECIAL_IDS, "eurobert": SPECIAL_IDS, "esm": SPECIAL_IDS,
    "funnel": {"block_sizes": [1, 1], "num_hidden_layers": None, "architectures": ["FunnelModel"]}, "squeezebert": {"embedding_size": 64},
}


def hf_dir(model_type: str, directory: Path) -> Path:
    """An ``hf:`` directory: a random ``model_type`` encoder of :data:`HF_COMMON` sizes and the MiniLM tokenizer."""
    import torch
    import transformers
    from onnxlrf.models.text import minilm_dir
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    transformers.utils.logging.disable_progress_bar()
    torch.manual_seed(0)
    sizes = {key: value for key, value in {**HF_COMMON, **HF_TYPES[model_type]}.items() if value is not None}
    config = AutoConfig.for_model(model_type, **sizes)
    AutoModel.from_config(config).save_pretrained(directory)
    AutoTokenizer.from_pretrained(str(minilm_dir())).save_pretrained(directory)
    return directory


def random_inputs(spec, samples: int, path: Path) -> Path:
    """``samples`` random inputs of ``spec``'s shapes: images, or token ids with padding at the end."""
    import numpy as np

    rng = np.random.default_rng(0)
    if "input_ids" not in spec.example_inputs:
        name, example = next(iter(spec.example_inputs.items()))
        np.savez(path, **{name: rng.standard_normal((samples, *example.shape[1:])).astype(np.float32)})
        return path
    length = 16
    ids = rng.integers(1000, 30000, (samples, length))
    mask = np.ones((samples, length), np.int64)
    ids[:, 0] = 101
    for row, used in enumerate(rng.integers(6, length + 1, samples)):
        ids[row, used - 1], ids[row, used:], mask[row, used:] = 102, 0, 0
    np.savez(path, input_ids=ids, attention_mask=mask)
    return path


def first_line(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else ""


def check_builder(name: str, samples: int, max_params: float, queue: multiprocessing.Queue) -> None:
    """Run the four steps on ``name`` (``torchvision:<builder>`` or ``hf:<type>``); put a result row on ``queue``."""
    import numpy as np
    import onnx
    import torch
    from onnxlrf.models import load_model

    from onnxlrf.data import load_data
    from onnxlrf.export import export_model
    from onnxlrf.graph.heads import cut_at_heads, find_post_processing
    from onnxlrf.graph.layers import find_layers
    from onnxlrf.measure.analysis import calibration_batches
    from onnxlrf.measure.coverage import analysis_exclusion
    from onnxlrf.measure.sensitivity import (
        analyze,
        output_distance_curvature,
        output_distance_loss,
    )
    from onnxlrf.measure.torch_graph import lacking_nodes
    from onnxlrf.runtime.evaluate import with_original_outputs

    torch.set_num_threads(1)
    row: dict = {"name": name}
    start = time.perf_counter()
    try:
        family, _, builder = name.rpartition(":")
        model_tmp = tempfile.TemporaryDirectory()
        spec = load_model(f"hf:{hf_dir(builder, Path(model_tmp.name))}" if family == "hf"
                          else f"torchvision:{builder}")
        row["task"] = spec.task
        row["params"] = sum(p.numel() for p in spec.module.parameters())
        if row["params"] > max_params:
            row["status"] = "not run"
            row["reason"] = f"{row['params'] / 1e6:.0f}M parameters, over --max-params {max_params / 1e6:.0f}M"
            queue.put(row)
            return
        row["input_shapes"] = {k: list(v.shape) for k, v in spec.example_inputs.items()}
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / f"{builder}.onnx"
            try:
                exported = export_model(spec, path)
            except Exception as exc:  # noqa: BLE001 - the row records why
                row["export_check"] = f"{type(exc).__name__}: {first_line(exc)}"
                if "differs from torch" not in str(exc):
                    row["status"] = "does not export"
                    row["reason"] = row["export_check"]
                    queue.put(row)
                    return
                # Exported, but onnxruntime's outputs differ from torch's (Faster R-CNN's RoIAlign): the
                # analysis runs on the file all the same, and the row says the check failed.
                exported = export_model(spec, path, check=False, overwrite=True)
            row["export_max_abs_diff"] = exported.max_abs_diff
            row["export_seconds"] = time.perf_counter() - start
            model = onnx.load(str(path))
            post = find_post_processing(model)
            compared = model if post is None else cut_at_heads(model, post.heads)
            row["post_processing"] = sorted(post.selection_ops) if post else []
            layers = [layer for layer in find_layers(compared)[0] if analysis_exclusion(layer) is None]
            row["layers_analysed"] = len(layers)
            blocking, reference = lacking_nodes(compared, [layer.weight for layer in layers])
            row["blocking_ops"] = sorted({node.op_type for node in blocking})
            row["reference_ops"] = sorted({node.op_type for node in reference})
            if blocking:
                row["status"] = "blocked"
                row["reason"] = f"{len(blocking)} nodes on the weights' path lack a torch op"
                queue.put(row)
                return
            data_path = random_inputs(spec, samples, Path(tmp) / "inputs.npz")
            data = with_original_outputs(load_data(f"npz:{data_path}", compared), compared, "cpu")
            analysis_start = time.perf_counter()
            sensitivity = analyze(compared, calibration_batches(data, data.labels, 1),
                                  output_distance_loss(data.output_scales),
                                  loss_name="outputs/outputs", layers=layers,
                                  curvature_fn=output_distance_curvature(data.output_scales), first_order=False)
            row["analysis_seconds"] = time.perf_counter() - analysis_start
            row["layers_with_basis"] = len(sensitivity.layers)
            row["layers_nonfinite"] = sorted(name for name, layer in sensitivity.layers.items()
                                             if not (np.isfinite(layer.s).all() and np.isfinite(layer.x).all()))
            row["left_out"] = dict(sensitivity.left_out)  # kept dense for memory, with why
            complete = (row["layers_with_basis"] + len(sensitivity.left_out) == len(layers)
                        and not row["layers_nonfinite"])
            row["status"] = "analysed" if complete else "incomplete"
    except Exception as exc:  # noqa: BLE001 - the row records where it stopped
        row["status"] = "failed"
        row["reason"] = f"{type(exc).__name__}: {first_line(exc)}"
        row["traceback"] = traceback.format_exc().splitlines()[-6:]
    row["seconds"] = time.perf_counter() - start
    queue.put(row)


def run(name: str, samples: int, max_params: float, timeout: float) -> dict:
    queue: multiprocessing.Queue = multiprocessing.get_context("spawn").Queue()
    process = multiprocessing.get_context("spawn").Process(target=check_builder,
                                                           args=(name, samples, max_params, queue))
    start = time.perf_counter()
    process.start()
    process.join(timeout)
    if process.is_alive():
        process.kill()
        process.join()
        return {"name": name, "status": "timed out", "reason": f"over {timeout:.0f} s", "seconds": timeout}
    if queue.empty():
        return {"name": name, "status": "failed", "reason": f"child exited with code {process.exitcode}",
                "seconds": time.perf_counter() - start}
    row = queue.get()
    row.setdefault("seconds", time.perf_counter() - start)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default=",".join(TASK_MODULES + ("hf",)),
                        help="comma-separated: " + ", ".join(TASK_MODULES) + " (torchvision), hf (encoder types)")
    parser.add_argument("--names", help="comma-separated torchvision:<builder> or hf:<type> (default: all of the tasks)")
    parser.add_argument("--samples", type=int, default=2, help="random inputs of the analysis")
    parser.add_argument("--max-params", type=float, default=150e6)
    parser.add_argument("--timeout", type=float, default=900, help="seconds per builder")
    parser.add_argument("--out", type=Path, help="JSON file of the rows (rewritten after every builder)")
    args = parser.parse_args()
    names = args.names.split(",") if args.names else [
        n for t in args.task.split(",")
        for n in ([f"hf:{t}" for t in HF_TYPES] if t == "hf" else [f"torchvision:{b}" for b in builders(t)])]
    done = {}
    if args.out and args.out.is_file():  # resume: builders already recorded are not run again
        done = {row["name"]: row for row in json.loads(args.out.read_text())["rows"]}
    rows = [row for name, row in done.items() if name not in names]  # kept from other runs
    for name in names:
        row = done.get(name) or run(name, args.samples, args.max_params, args.timeout)
        rows.append(row)
        print(f"{name:40s} {row['status']:16s} {row.get('seconds', 0):7.1f} s  "
              f"{row.get('reason', '')}{' reference: ' + ','.join(row['reference_ops']) if row.get('reference_ops') else ''}",
              flush=True)
        if args.out:
            totals = {}
            for r in rows:
                totals[r["status"]] = totals.get(r["status"], 0) + 1
            args.out.write_text(json.dumps({"command": " ".join(sys.argv), "samples": args.samples,
                                            "totals": totals, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
