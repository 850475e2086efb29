"""The main job: model (name or ONNX file) in, low-rank ONNX file out, validated.

``compress`` chains the stages a Python user can also call one by one:
export (or load) -> plan -> rewrite -> save -> validate.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import onnx

from .errors import OnnxlrfError
from .analysis import check_finite_weights, find_layers, weight_array
from .onnx_io import atomic_path, check_output_path, load_onnx, save_onnx, staged_outputs
from .planning import Plan, cost_model, count_params, plan_energy, plan_joint, plan_uniform
from .progress import Progress, ProgressLike, as_progress
from .rewrite import RewriteReport, apply_plan, truncate_weights

PLANNING_MODES = ("uniform", "energy")
JOINT_MODES = ("lossless", "compact")
MODES = JOINT_MODES + PLANNING_MODES
# Curvature multipliers tried in turn by the back-off (METHOD.md section 5): each
# trusts the quadratic model less, so plans get more conservative.
BACKOFF_KAPPAS = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0)
BACKOFF_BISECTIONS = 3
# Compact mode's size search (used when no component is free at the tolerance) starts here
# and doubles until a plan fails on validation.
SIZE_SEARCH_START = 0.01
# Range checks rerun most of the network per layer and level, on the heap that
# torch_graph.heap_reuse keeps, where larger batches run convs faster per sample
# (ResNeXt-50, 32 images: 1.9 s in batches of 5, 1.6 s in batches of 16 or 32).
# This bound gives it batches of 20 (largest activation 3.2 MB per image).
RANGE_BATCH_BYTES = 64 << 20


@dataclass
class CompressResult:
    """What :func:`compress` did: the written file, the plan, the rewrite, sizes, and metrics where data was given."""

    output: Path
    plan: Plan
    rewrite: RewriteReport
    params: int
    reference_params: int
    validation: Any = None  # validation.ValidationResult when data was given
    export: Any = None  # export.ExportResult when a model name was given
    extra: dict = field(default_factory=dict)
    reference: onnx.ModelProto | None = field(default=None, repr=False)  # the original, for reports

    @property
    def params_reduction(self) -> float:
        """Fraction of the original's parameters removed."""
        return 1.0 - self.params / self.reference_params

    def to_dict(self) -> dict:
        """The JSON object ``onnxlrf compress --json`` prints."""
        out = {
            "output": str(self.output),
            "mode": self.plan.mode,
            "params": self.params,
            "reference_params": self.reference_params,
            "params_reduction": self.params_reduction,
            "layers_factorized": len(self.rewrite.rewritten),
            "layers_dense": len(self.rewrite.kept_dense),
        }
        if self.validation is not None:
            out.update(dataclasses.asdict(self.validation))
            # compress's own parameter counts are the authority for both models.
            out["params"], out["reference_params"] = self.params, self.reference_params
        out.update(self.extra)
        return out


def is_onnx_path(model: str) -> bool:
    """Whether ``model`` names an ONNX file (rather than a model name)."""
    return model.endswith(".onnx") or Path(model).is_file()


def load_or_export(
    model: str,
    workdir: str | os.PathLike,
    weights: str | None = None,
    dynamo: bool = False,
    batch: int = 1,
    dynamic_batch: bool = False,
    progress: ProgressLike = None,
) -> tuple[Path, Any]:
    """Return the path of an ONNX file for ``model``: the file itself, or a fresh export into ``workdir``."""
    if is_onnx_path(model):
        if weights:
            raise OnnxlrfError("--weights applies to model names, not to ONNX files")
        load_onnx(model, load_external_data=False)  # fail early with a clear message
        return Path(model), None
    from .export import export_model
    from .models import load_model

    spec = load_model(model, weights=weights)
    exported = export_model(
        spec, Path(workdir) / "reference.onnx", dynamo=dynamo, batch=batch, dynamic_batch=dynamic_batch,
        progress=progress)
    return Path(exported.path), exported


def make_plan(
    model: onnx.ModelProto,
    mode: str,
    target_reduction: float | None = None,
    rank_fraction: float | None = None,
    energy: float | None = None,
    progress: ProgressLike = None,
    target: str = "params",
    rank_multiple: int = 1,
    cost: Any = None,
) -> Plan:
    """A data-free plan: ``uniform`` (rank fraction) or ``energy`` (share of squared singular values).

    ``target``/``cost``/``rank_multiple``: see :func:`onnxlrf.planning.plan_uniform`.
    """
    if mode == "uniform":
        if (target_reduction is None) == (rank_fraction is None):
            raise OnnxlrfError("mode uniform needs exactly one of --target-reduction or --rank-fraction")
        return plan_uniform(model, rank_fraction=rank_fraction, target_reduction=target_reduction, target=target,
                            rank_multiple=rank_multiple, cost=cost)
    if mode == "energy":
        if (target_reduction is None) == (energy is None):
            raise OnnxlrfError("mode energy needs exactly one of --target-reduction or --energy")
        return plan_energy(model, energy=energy, target_reduction=target_reduction, progress=progress,
                           target=target, rank_multiple=rank_multiple, cost=cost)
    raise OnnxlrfError(f"unknown mode {mode!r}; known: {', '.join(MODES)}")


@dataclass
class Splits:
    """Disjoint calibration / validation / held-out test splits, fixed by the seed."""

    calib: Any
    val: Any
    test: Any
    seed: int


def split_dataset(dataset: Any, calib: int, val: int, seed: int = 0) -> Splits:
    """``calib`` and ``val`` samples drawn without overlap by ``seed``; the rest is the held-out test split."""
    if calib < 1 or val < 1:
        raise OnnxlrfError("--calib and --val must be at least 1")
    if calib + val >= len(dataset):
        raise OnnxlrfError(f"--calib {calib} + --val {val} leave no held-out test data of {len(dataset)} samples")
    order = np.random.default_rng(seed).permutation(len(dataset))
    return Splits(dataset.subset(order[:calib]), dataset.subset(order[calib:calib + val]),
                  dataset.subset(order[calib + val:]), seed)


class CalibrationBatches:
    """Micro-batches (feeds, targets) for the torch analysis: call it for a fresh iterator; ``len()`` counts them."""

    def __init__(self, dataset: Any, targets: np.ndarray, batch_size: int) -> None:
        self.dataset, self.targets, self.batch_size = dataset, targets, batch_size

    def __len__(self) -> int:
        return -(-len(self.dataset) // self.batch_size)

    def __call__(self) -> Iterator:
        for start in range(0, len(self.dataset), self.batch_size):
            idx = np.arange(start, min(start + self.batch_size, len(self.dataset)))
            yield self.dataset.subset(idx).inputs, self.targets[idx]


def range_batch_size(reference: onnx.ModelProto, dataset: Any, limit: int = 128) -> int:
    """Samples per range-check batch: as many as keep its largest activation within ``RANGE_BATCH_BYTES``."""
    from .torch_graph import TorchGraph

    largest = TorchGraph(reference).largest_value_bytes(dataset.subset(np.arange(1)).inputs)
    return int(np.clip(RANGE_BATCH_BYTES // max(largest, 1), 1, limit))


def calibration_batches(dataset: Any, targets: np.ndarray, batch_size: int) -> CalibrationBatches:
    """Micro-batches (feeds, targets) for the torch analysis."""
    return CalibrationBatches(dataset, targets, batch_size)


def _outputs(model: onnx.ModelProto, dataset: Any, provider: str, progress: ProgressLike = None,
             description: str = "evaluate") -> np.ndarray:
    """``model``'s first output on every row of ``dataset``, in onnxruntime."""
    from .validation import make_session, run_dataset, select_providers

    session = make_session(model, providers=select_providers(provider))
    return run_dataset(session, dataset, progress=progress, description=description)


def _predictions(model: onnx.ModelProto, dataset: Any, provider: str, progress: ProgressLike = None,
                 description: str = "evaluate") -> np.ndarray:
    """``model``'s per-sample predictions on ``dataset`` (:meth:`Dataset.predictions`), in onnxruntime."""
    return dataset.predictions(_outputs(model, dataset, provider, progress, description))


def _metric(model: onnx.ModelProto, dataset: Any, provider: str, progress: ProgressLike = None,
            description: str = "evaluate") -> float:
    return dataset.score(_outputs(model, dataset, provider, progress, description))


@dataclass
class JointResult:
    """The joint method's outcome (:func:`compress_joint`), in memory."""

    plan: Plan
    compressed: onnx.ModelProto
    report: RewriteReport
    splits: dict  # split name -> {"value", "reference_value"}
    backoff: list  # per tried kappa: achieved reduction, predicted dL, validation metric
    sensitivity: Any
    test_split: Any


def analysis_key(reference: onnx.ModelProto, calib: Any, labels: str, range_samples: int, micro_batch: int,
                 spatial: bool) -> str:
    """A hash of everything the joint analysis depends on: the model's graph and weights, the
    calibration samples and labels, the options, and the versions of the analysis and of torch."""
    import torch

    from . import __version__
    from .sensitivity import ANALYSIS_VERSION

    digest = hashlib.sha256()
    graph = reference.graph
    # Part by part: a whole model over 2 GB does not serialize at once.
    for part in [*reference.opset_import, *graph.input, *graph.output, *graph.node, *graph.initializer]:
        digest.update(part.SerializeToString())
    for name, array in [*sorted(calib.inputs.items()), ("labels", calib.labels)]:
        array = np.ascontiguousarray(array)
        digest.update(f"{name} {array.dtype} {array.shape}".encode())
        digest.update(array.tobytes())
    digest.update(repr((calib.task, calib.token_mask, labels, range_samples, micro_batch, bool(spatial),
                        ANALYSIS_VERSION, __version__, torch.__version__)).encode())
    return digest.hexdigest()


def analysis_cache_dir(cache: str | os.PathLike) -> Path:
    """``cache`` as a directory, made if needed; checked before the work it would keep."""
    try:
        Path(cache).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OnnxlrfError(f"cannot make the analysis cache directory {cache}: {exc.strerror or exc}") from None
    return Path(cache)


def joint_analysis(
    reference: onnx.ModelProto,
    calib: Any,
    labels: str = "labels",
    range_samples: int = 256,
    micro_batch: int = 50,
    progress: ProgressLike = None,
    spatial: bool = False,
    cache: str | os.PathLike | None = None,
) -> Any:
    """Sensitivity of every layer on the calibration split, with measured perturbation ranges.

    ``spatial``: k x k convs are analyzed in spatial decomposition too (see
    :func:`~onnxlrf.sensitivity.analyze`), and their spatial truncations range-checked.
    ``cache``: a directory where analyses are kept, one file per :func:`analysis_key`; an
    analysis already there for this model, calibration split and options is read instead of
    computed (the same object, so the same plans), and a new one is saved there.
    """
    from .sensitivity import Sensitivity

    progress = as_progress(progress)
    if labels not in ("labels", "predictions"):
        raise OnnxlrfError(f"--labels must be 'labels' or 'predictions', got {labels!r}")
    if cache is None:
        return _analyze(reference, calib, labels, range_samples, micro_batch, progress, spatial)
    key = analysis_key(reference, calib, labels, range_samples, micro_batch, spatial)
    path = analysis_cache_dir(cache) / f"{key[:32]}.npz"
    if path.is_file():
        try:
            sensitivity, saved_key = Sensitivity.load(path)
        except OnnxlrfError as exc:  # a cache entry is disposable: analyze again
            progress.log(f"analysis: {exc}; analyzing again")
        else:
            if saved_key == key:
                progress.log(f"analysis: read from the cache, {path} (the same model, calibration split "
                             f"and options)")
                return sensitivity
    sensitivity = _analyze(reference, calib, labels, range_samples, micro_batch, progress, spatial)
    try:
        with atomic_path(path, ".npz") as tmp:
            sensitivity.save(tmp, key)
    except OnnxlrfError as exc:  # the analysis is done; a cache that cannot take it costs only reuse
        progress.log(f"analysis: not cached: {exc}")
    else:
        progress.log(f"analysis: saved to the cache, {path} ({path.stat().st_size / 2**20:.1f} MiB)")
    return sensitivity


def _analyze(reference: onnx.ModelProto, calib: Any, labels: str, range_samples: int, micro_batch: int,
             progress: Progress, spatial: bool) -> Any:
    """:func:`joint_analysis` without the cache."""
    from .sensitivity import CURVATURES, LOSSES, analyze, measure_ranges

    loss_fn = LOSSES[calib.task]
    targets = calib.labels
    if labels == "predictions":
        from .data import cosine_rows
        from .validation import make_session, run_dataset

        outputs = run_dataset(make_session(reference, providers=["CPUExecutionProvider"]), calib,
                              progress=progress, description="label-free targets: the original's predictions")
        if calib.task == "classification":
            # The original's hard predictions: a distillation loss would have zero gradient here.
            targets = outputs.reshape(len(outputs), -1).argmax(axis=1)
        else:
            # The original's own similarity (on the gold 0-5 scale): zero gradient, so the plan
            # rests on the Gauss-Newton curvature alone, with no calibration noise to fit.
            targets = (5.0 * cosine_rows(outputs[:len(calib)], outputs[len(calib):])).astype(np.float32)
    sensitivity = analyze(reference, calibration_batches(calib, targets, micro_batch), loss_fn,
                          loss_name=f"{calib.task}/{labels}", progress=progress,
                          curvature_fn=CURVATURES.get(calib.task), token_mask=calib.token_mask, spatial=spatial)
    n_range = min(range_samples, len(calib))
    measure_ranges(reference, sensitivity,
                   calibration_batches(calib.subset(np.arange(n_range)), targets[:n_range],
                                       range_batch_size(reference, calib)),
                   loss_fn, progress=progress)
    return sensitivity


def backoff_plan(
    reference: onnx.ModelProto,
    sensitivity: Any,
    val: Any,
    mode: str,
    target_reduction: float | None = None,
    tolerance: float = 0.0,
    solver: str = "lagrangian",
    provider: str = "auto",
    progress: ProgressLike = None,
    target: str = "params",
    rank_multiple: int = 1,
    cost: Any = None,
    reference_val: float | None = None,
    calib: Any = None,
    refit: bool = False,
) -> tuple[Plan, onnx.ModelProto, RewriteReport, list]:
    """Verify plans on the validation split, trusting the curvature model less each time (METHOD.md 5).

    compact: the first plan whose validation metric is at least the original's
    (none: the model stays dense). Where that plan removes nothing, because no component is
    free at ``tolerance`` (label-free targets: every drop raises the loss), sizes are searched
    instead: lossless plans at ``SIZE_SEARCH_START`` of the target measure, doubled while
    they hold on validation, then bisected between the largest that held and the first that
    failed. Then, given ``calib``, the smallest plan that failed with
    its worst layers (measured on ``calib``) set back until it holds on ``val``
    (:func:`restore_layers`), if that is larger. lossless: the best validation metric at
    the target size. ``refit`` (needs ``calib``): then :func:`_refit_chosen`.
    Under a latency target, a plan not measured faster than the original is rejected.
    ``target``: what the size is counted in (params, flops or latency; ``cost`` a prepared
    cost model, else one is built once here); ranks are multiples of ``rank_multiple``.
    """
    cost = cost_model(reference, target, cost)

    if mode not in JOINT_MODES:
        raise OnnxlrfError(f"unknown joint mode {mode!r}; known: {', '.join(JOINT_MODES)}")
    progress = as_progress(progress)
    best = None
    backoff = []
    refit_entry = None
    unreachable = None
    # Latency targets are verified as accuracy is: each plan is timed against the original.
    measure_speed = cost.target == "latency" and hasattr(cost, "measured_speedup")
    # Kappas that keep the same components (e.g. with no first-order term, as label-free
    # similarity targets give) make the same model: it is verified once.
    verified: dict[tuple, tuple[float, dict, tuple | None]] = {}

    def attempt(kappa: float, size: float | None = None) -> tuple | None:
        """The plan at ``kappa`` verified; ``size``: the lossless plan of that size instead (compact's size search)."""
        nonlocal unreachable
        try:
            plan = plan_joint(reference, sensitivity, mode if size is None else "lossless",
                              target_reduction=target_reduction if size is None else size, tolerance=tolerance,
                              kappa=kappa, solver=solver, target=target, rank_multiple=rank_multiple, cost=cost)
        except OnnxlrfError as exc:  # the target may be out of the trusted ranges in this order
            unreachable = exc
            progress.log(f"  kappa {kappa:.3g}{'' if size is None else f', size {size:.3g}'}: no plan ({exc})")
            return None
        if size is not None:  # planned as lossless at that size, chosen as compact
            plan = dataclasses.replace(plan, mode=mode, options={**plan.options, "size_search": True})
        kept = tuple((e.node, e.decomposition, e.rank,
                      sensitivity.get(e.node, e.decomposition).keep(e.rank, kappa).tobytes())
                     for e in plan.layers if e.decomposition != "dense")
        if kept in verified:
            same, entry, result = verified[kept]
            backoff.append({**entry, "kappa": kappa, "same_as_kappa": same})
            progress.log(f"  kappa {kappa:.3g}: the plan of kappa {same:.3g} again")
            attempts.update()
        else:
            result = verify(plan, kappa, "" if size is None else f", size {size:.3g}")
            verified[kept] = (kappa, backoff[-1], result)
        if size is not None:
            backoff[-1]["target_reduction"] = size
        return result

    def holds(result: tuple | None) -> bool:
        return result is not None and result[0] >= reference_val

    def search_sizes(holding: tuple) -> tuple:
        """Compact's size search (see above); returns the largest plan that held, else ``holding``."""
        progress.log("back-off: no component is free at this tolerance; searching sizes on validation")
        held, failed, size = 0.0, None, SIZE_SEARCH_START
        while failed is None and size < 1.0:
            result = attempt(1.0, size)
            if holds(result):
                held, holding, size = size, result, 2 * size
            else:
                failed = size
        for _ in range(BACKOFF_BISECTIONS if failed is not None else 0):
            size = (held + failed) / 2
            result = attempt(1.0, size)
            if holds(result):
                held, holding = size, result
            else:
                failed = size
        return holding

    def verify(plan: Plan, kappa: float, label: str = "") -> tuple | None:
        nonlocal unreachable
        compressed, report = apply_plan(reference, plan, progress=progress)
        entry = {"kappa": kappa, "achieved_reduction": plan.options["achieved_reduction"],
                 "predicted_dloss": plan.options["predicted_dloss"]}
        backoff.append(entry)
        if measure_speed:
            entry["speedup"] = cost.measured_speedup(compressed)
            if entry["speedup"] <= 1.0:  # a latency target that is not faster is no plan at all
                unreachable = OnnxlrfError(f"no plan for this latency target measured faster than the original "
                                           f"(kappa {kappa:.3g}: {entry['speedup']:.2f}x)")
                progress.log(f"  kappa {kappa:.3g}: {_reduction_text(plan)} predicted, measured "
                             f"{entry['speedup']:.2f}x the original's speed: rejected")
                attempts.update()
                return None
        value = entry["val"] = _metric(compressed, val, provider, progress,
                                       f"validate the plan at kappa {kappa:.3g}")
        attempts.update()
        summary = (f"  kappa {kappa:.3g}{label}: {_reduction_text(plan)}, "
                   f"predicted dloss {plan.options['predicted_dloss']:+.3g}, val {value:.4f}")
        if mode == "lossless":
            progress.log(f"{summary} (original {reference_val:.4f})")
        elif value >= reference_val:
            progress.log(f"{summary} >= original {reference_val:.4f}: holds")
        else:
            progress.log(f"{summary} < original {reference_val:.4f}: rejected"
                         + ("" if label else ", trusting the curvature less"))
        return value, plan, compressed, report

    with progress.task(f"back-off ({mode})", unit="plan") as attempts:
        if reference_val is None:
            reference_val = _metric(reference, val, provider, progress, "the original on validation")
        progress.log(f"back-off: the original scores {reference_val:.4f} on {len(val)} validation samples")
        failed_kappa = None
        for kappa in BACKOFF_KAPPAS:
            result = attempt(kappa)
            if result is None:
                continue
            if mode == "compact" and holds(result):
                best = result
                break
            failed_kappa = kappa
            if mode == "lossless" and (best is None or result[0] > best[0]):
                best = result
        if mode == "compact" and best is not None and failed_kappa is not None:
            # Doubling overshoots: bisect kappa (log scale) between the last failing and the first passing value.
            lo, hi = failed_kappa, best[1].options["kappa"]
            progress.log(f"back-off: bisecting kappa between {lo:g} (fails) and {hi:g} (holds) for a larger plan")
            for _ in range(BACKOFF_BISECTIONS):
                mid = math.sqrt(lo * hi)
                result = attempt(mid)
                if holds(result):
                    hi = mid
                    if result[1].options["achieved_reduction"] > best[1].options["achieved_reduction"]:
                        best = result
                else:
                    lo = mid
        if mode == "compact" and best is not None and not best[1].options["achieved_reduction"] > 0:
            best = search_sizes(best)
    if best is None and mode == "lossless":
        raise unreachable
    failing = [] if mode == "lossless" else \
        [result[1] for _, _, result in verified.values() if result is not None and result[0] < reference_val]
    if mode == "compact":
        holding = best[1] if best is not None else plan_joint(
            reference, sensitivity, mode, tolerance=-math.inf, solver=solver, target=target,
            rank_multiple=rank_multiple, cost=cost)  # no compression: the smallest plan that holds
        restored = None if calib is None else _restore_smallest_failing(
            reference, failing, holding, calib, val, reference_val, cost, measure_speed, provider, progress)
        if restored is not None:
            best = restored
            backoff.append({"kappa": restored[1].options["kappa"],
                            "restored": len(restored[1].options["restored"]["layers"]),
                            "achieved_reduction": restored[1].options["achieved_reduction"],
                            "predicted_dloss": restored[1].options["predicted_dloss"], "val": restored[0]})
    if refit and calib is not None:
        refitted = _refit_chosen(reference, best, failing, calib, val, reference_val, measure_speed, cost,
                                 provider, progress, backoff)
        if refitted is not None:
            *best, refit_entry = refitted
            best = tuple(best)
    if best is None:  # compact, and no plan held on validation: no compression is the smallest safe plan
        progress.log("back-off: no plan held on validation; the model stays dense")
        compressed, report = apply_plan(reference, holding, progress=progress)
        best = (reference_val, holding, compressed, report)
    else:
        set_back = best[1].options.get("restored")
        chosen = refit_entry if best[1].options.get("refit") else backoff[-1] if set_back else \
            next(entry for _, entry, result in verified.values() if result is best)
        chosen["chosen"] = True
        progress.log(f"back-off chose kappa {best[1].options['kappa']:.3g}"
                     + (f" with {len(set_back['layers'])} layers set back" if set_back else "")
                     + (" refit" if best[1].options.get("refit") else "")
                     + f": {_reduction_text(best[1])}, val {best[0]:.4f} (original {reference_val:.4f})")
    _, plan, compressed, report = best
    plan.options["backoff"] = backoff
    plan.options["reference_val"] = reference_val
    return plan, compressed, report, backoff


def restore_layers(
    reference: onnx.ModelProto,
    failing: Plan,
    holding: Plan,
    calib: Any,
    val: Any,
    reference_val: float,
    cost: Any,
    provider: str = "auto",
    progress: ProgressLike = None,
) -> tuple[float, Plan, onnx.ModelProto, RewriteReport] | None:
    """METHOD.md 5: set ``failing``'s layers back to ``holding``'s entries, worst first, until validation holds.

    A layer's measured contribution is how much the loss on ``calib`` (the task's loss on its
    gold labels) falls when that layer alone is set back: measured on data the check below does
    not see, so the validation split only verifies. It is measured in torch
    (:func:`~onnxlrf.sensitivity.replacement_gains`: each set-back run starts at its layer) on the
    plans' dense truncated weights (:func:`~onnxlrf.rewrite.truncate_weights`, which refuses
    bias-corrected entries); a weight shared by several layers is set back for all of them.
    Layers whose setting back lowers that loss are set back in that order, the validation metric
    re-checked after each, until it is at least ``reference_val``. Returns (metric, plan, model,
    report), or None if it never is.
    """
    from .sensitivity import LOSSES, replacement_gains

    progress = as_progress(progress)
    before = {entry.node: entry for entry in holding.layers}
    differing = [e.node for e in failing.layers
                 if (e.decomposition, e.rank) != (before[e.node].decomposition, before[e.node].rank)]
    if len(differing) < 2:
        return None
    layers = {layer.node: layer for layer in find_layers(reference)[0]}
    held = truncate_weights(reference, holding)[0]
    gains = replacement_gains(
        truncate_weights(reference, failing)[0],
        {node: {layers[node].weight: weight_array(held, layers[node])} for node in differing},
        calibration_batches(calib, calib.labels, range_batch_size(reference, calib)), LOSSES[calib.task],
        progress, f"back-off: measure each layer's contribution ({len(differing)} layers)")
    order = sorted((node for node in differing if gains[node] > 0), key=lambda node: -gains[node])
    progress.log(f"back-off: restoring the layers of the smallest failing plan ({len(differing)} differ from "
                 f"the plan that holds), worst measured first: "
                 + ", ".join(f"{node} ({-gains[node]:+.3g} calibration loss)" for node in order[:5])
                 + (" ..." if len(order) > 5 else ""))
    for count in range(1, min(len(order), len(differing) - 1) + 1):  # all of them set back is ``holding``
        plan = _set_back(reference, failing, holding, frozenset(order[:count]), cost)
        compressed, report = apply_plan(reference, plan)
        value = _metric(compressed, val, provider, progress, f"validate with {count} layers set back")
        held = value >= reference_val
        progress.log(f"  {count} set back: {_reduction_text(plan)}, val {value:.4f} "
                     f"{'>=' if held else '<'} original {reference_val:.4f}")
        if held:
            return value, plan, compressed, report
    return None


def _restore_smallest_failing(reference: onnx.ModelProto, failing: list[Plan], holding: Plan, calib: Any, val: Any,
                              reference_val: float, cost: Any, measure_speed: bool, provider: str,
                              progress: Progress) -> tuple[float, Plan, onnx.ModelProto, RewriteReport] | None:
    """:func:`restore_layers` on the smallest failing plan larger than ``holding``, if the result is larger
    than ``holding`` too (and, under a latency target, measured faster than the original)."""
    size = holding.options["achieved_reduction"]
    larger = [plan for plan in failing if plan.options["achieved_reduction"] > size]
    if not larger:
        return None
    smallest = min(larger, key=lambda plan: plan.options["achieved_reduction"])
    restored = restore_layers(reference, smallest, holding, calib, val, reference_val, cost, provider, progress)
    if restored is None or restored[1].options["achieved_reduction"] <= size:
        return None
    if measure_speed:
        speedup = cost.measured_speedup(restored[2])
        if speedup <= 1.0:
            progress.log(f"  measured {speedup:.2f}x the original's speed: rejected")
            return None
    return restored


def _refit_chosen(reference: onnx.ModelProto, best: tuple | None, failing: list[Plan], calib: Any, val: Any,
                  reference_val: float, measure_speed: bool, cost: Any, provider: str, progress: Progress,
                  backoff: list) -> tuple[float, Plan, onnx.ModelProto, RewriteReport, dict] | None:
    """The back-off's choice refit (:func:`onnxlrf.refit.refit_plan`), where validation says it is better.

    The refit undoes how the earlier layers' truncations change a layer's inputs, the
    wanted changes too: it helps where truncation error compounds and can hurt where the
    joint plan gains by its drops (ResNet-56 at 10% fewer parameters), so validation decides.
    lossless: the chosen plan refit, if it scores better (a tie keeps the plan: on ResNet-56's
    compact plan a tie on validation lost 0.8 points held-out). compact: first the plans that
    failed and are larger than the chosen one, smallest first, for as long as each holds once
    refit; then, if none did, the chosen plan refit (unless it factorizes nothing), if it scores better.
    Under a latency target, a refit plan must also be measured faster than the original.
    Each attempt is appended to ``backoff``; the one kept comes back as the last element.
    """
    from .refit import refit_plan

    def attempt(plan: Plan, bar: float, description: str, strictly: bool = False) -> tuple | None:
        refit, summary = refit_plan(reference, plan, calib, progress=progress)
        if not summary["refit"]:  # the same plan: already judged
            progress.log(f"  {description}: nothing to refit (its factorized layers are spatial or share weights)")
            return None
        compressed, report = apply_plan(reference, refit, progress=progress)
        value = _metric(compressed, val, provider, progress, f"validate {description} refit")
        entry = {"kappa": plan.options["kappa"], "refit": True, "achieved_reduction": plan.options["achieved_reduction"],
                 "predicted_dloss": plan.options["predicted_dloss"], "val": value}
        backoff.append(entry)
        holds = value > bar if strictly else value >= bar
        if holds and measure_speed:
            entry["speedup"] = cost.measured_speedup(compressed)
            holds = entry["speedup"] > 1.0
        progress.log(f"  {description} refit: val {value:.4f} (needs {'more than ' if strictly else ''}"
                     f"{bar:.4f}): {'kept' if holds else 'rejected'}")
        return (value, refit, compressed, report, entry) if holds else None

    chosen = None
    size = best[1].options["achieved_reduction"] if best is not None else 0.0
    for plan in sorted((p for p in failing if p.options["achieved_reduction"] > size),
                       key=lambda p: p.options["achieved_reduction"]):
        result = attempt(plan, reference_val, f"the failing plan of kappa {plan.options['kappa']:.3g} "
                                              f"({_reduction_text(plan)})")
        if result is None:
            break
        chosen = result
    if chosen is None and best is not None and best[1].options["achieved_reduction"] > 0:
        chosen = attempt(best[1], best[0], f"the chosen plan ({_reduction_text(best[1])})", strictly=True)
    return chosen


def _set_back(reference: onnx.ModelProto, failing: Plan, holding: Plan, nodes: frozenset, cost: Any) -> Plan:
    """``failing`` with the entries (and bases) of ``nodes`` taken from ``holding``."""
    before = {entry.node: entry for entry in holding.layers}
    layers = [dataclasses.replace(before[e.node]) if e.node in nodes else e for e in failing.layers]
    bases = {w: b for w, b in failing.bases.items()
             if w not in {before[node].weight for node in nodes}}
    bases.update({before[node].weight: holding.bases[before[node].weight]
                  for node in nodes if before[node].weight in holding.bases})
    options = dict(failing.options)
    options["predicted_dloss"] = sum(e.notes.get("predicted_dloss", 0.0) for e in layers)
    if nodes:
        options["restored"] = {"to_kappa": holding.options.get("kappa") if holding.summary()["factorized"] else None,
                               "layers": [e.node for e in failing.layers if e.node in nodes]}
    plan = dataclasses.replace(failing, layers=layers, bases=bases, options=options)
    return _with_sizes(reference, plan, cost)


def _merge_rounds(reference: onnx.ModelProto, earlier: Plan | None, later: Plan, cost: Any) -> Plan:
    """``later``, planned on ``earlier``'s truncated weights, as a plan for ``reference``.

    A layer ``later`` keeps dense stays at ``earlier``'s truncation (its weight was
    that truncation when ``later`` was verified), so its earlier entry and basis stand.
    """
    if earlier is None:
        return later
    before = {entry.node: entry for entry in earlier.layers}
    merged = dataclasses.replace(later, layers=list(later.layers), bases=dict(later.bases),
                                 options=dict(later.options))
    for i, entry in enumerate(merged.layers):
        prior = before[entry.node]
        if entry.decomposition == "dense" and prior.decomposition != "dense":
            merged.layers[i] = prior
            if prior.weight in earlier.bases:
                merged.bases[prior.weight] = earlier.bases[prior.weight]
    return _with_sizes(reference, merged, cost)


def _with_sizes(reference: onnx.ModelProto, plan: Plan, cost: Any) -> Plan:
    """``plan`` with its reductions (parameters, and in ``cost``'s units) counted from its entries."""
    layers = {layer.node: layer for layer in find_layers(reference)[0]}
    saved = sum(cost.dense([layers[e.node]]) - cost.factorized([layers[e.node]], e.decomposition, e.rank)
                for e in plan.layers if e.decomposition != "dense")
    params = plan.summary()["params_removed"] / max(count_params(reference), 1)
    plan.options["params_reduction"] = params
    plan.options["achieved_reduction"] = params if cost.target == "params" else saved / cost.total()
    return plan


def _reduction_text(plan: Plan) -> str:
    """The plan's size in its target's words, e.g. '12.0% fewer parameters' or '30.1% less latency'."""
    target = plan.options.get("target", "params")
    reduction = plan.options["achieved_reduction"]
    if target == "params":
        return f"{reduction:.1%} fewer parameters"
    return f"{reduction:.1%} less {'latency' if target == 'latency' else 'FLOPs'}"


def compress_joint(
    reference: onnx.ModelProto,
    dataset: Any,
    mode: str,
    target_reduction: float | None = None,
    tolerance: float = 0.0,
    calib: int = 1000,
    val: int = 1000,
    seed: int = 0,
    labels: str = "labels",
    solver: str = "lagrangian",
    range_samples: int = 256,
    micro_batch: int = 50,
    provider: str = "auto",
    progress: ProgressLike = None,
    report_test: bool = True,
    target: str = "params",
    rank_multiple: int = 1,
    cost: Any = None,
    rounds: int = 1,
    refit: bool = True,
    spatial: bool | None = None,
    analysis_cache: str | os.PathLike | None = None,
) -> JointResult:
    """The joint method: analyze on calib, plan, verify and back off on val, report on the held-out test split.

    ``refit``: the back-off also tries its plans with their factors refit on calib
    (:func:`onnxlrf.refit.refit_plan`), and keeps them where validation says they are better
    (see :func:`backoff_plan`); with ``rounds`` > 1, the final plan only.

    ``rounds`` > 1 repeats analysis and back-off around the truncated weights of the
    previous round, so each round's Taylor model sees what the earlier truncations
    did to the other layers. compact: until a round adds nothing that holds on
    validation (against the original's metric); lossless: round k aims at k/rounds
    of ``target_reduction``. The returned plan applies to ``reference`` itself.
    Each split's metric is reported with the original's; calib and test also with the 95%
    interval of the change (:func:`onnxlrf.validation.change_interval`).
    ``report_test=False`` leaves the test split's metrics to the caller (``compress`` gets
    them from its full validation of that split, so the split is evaluated once).
    ``spatial``: the planner may also choose spatial decomposition for k x k convs
    (None: for flops and latency targets, where its fewer FLOPs pay; see :func:`joint_analysis`).
    ``analysis_cache``: a directory where each round's analysis is reused or kept (see
    :func:`joint_analysis`), so another target or mode on the same data skips it.
    """
    if mode not in JOINT_MODES:
        raise OnnxlrfError(f"unknown joint mode {mode!r}; known: {', '.join(JOINT_MODES)}")
    if rounds < 1:
        raise OnnxlrfError(f"--rounds must be at least 1, got {rounds}")
    progress = as_progress(progress)
    splits = split_dataset(dataset, calib, val, seed)
    progress.log(f"splits (seed {seed}): {len(splits.calib)} calibration, {len(splits.val)} validation, "
                 f"{len(splits.test)} held-out test samples")
    cost = cost_model(reference, target, cost)
    if spatial is None:
        spatial = cost.target != "params"
    current, plan, reference_val, backoff, history = reference, None, None, [], []
    for index in range(rounds):
        if rounds > 1:
            progress.log(f"round {index + 1}/{rounds}" + ("" if index == 0 else ": around the truncated weights"))
        sensitivity = joint_analysis(current, splits.calib, labels, range_samples, micro_batch, progress, spatial,
                                     analysis_cache)
        round_target = None if target_reduction is None else target_reduction * (index + 1) / rounds
        round_plan, _, _, round_backoff = backoff_plan(current, sensitivity, splits.val, mode, round_target,
                                                       tolerance, solver, provider, progress, target,
                                                       rank_multiple, cost, reference_val, splits.calib,
                                                       refit=refit and rounds == 1)
        reference_val = round_plan.options["reference_val"]
        merged = _merge_rounds(reference, plan, round_plan, cost)
        backoff += [{"round": index + 1, **entry} for entry in round_backoff]
        if plan is not None and mode == "compact" and \
                merged.options["achieved_reduction"] <= plan.options["achieved_reduction"]:
            progress.log(f"round {index + 1} added nothing that holds on validation; stopping")
            break
        plan = merged
        history.append({"round": index + 1, "achieved_reduction": plan.options["achieved_reduction"],
                        "params_reduction": plan.options["params_reduction"], "kappa": round_plan.options["kappa"],
                        "val": next((e["val"] for e in round_backoff if e.get("chosen")), None)})
        if index + 1 < rounds:
            current = truncate_weights(reference, plan)[0]
    compressed, report = apply_plan(reference, plan, progress=progress)
    if refit and rounds > 1 and plan.summary()["factorized"]:
        attempts: list = []
        refitted = _refit_chosen(reference, (history[-1]["val"], plan, compressed, report), [], splits.calib,
                                 splits.val, reference_val, cost.target == "latency" and
                                 hasattr(cost, "measured_speedup"), cost, provider, progress, attempts)
        for entry in attempts:
            entry["round"] = len(history)
        backoff += attempts
        if refitted is not None:
            _, plan, compressed, report, kept = refitted
            for entry in backoff:  # the last round's choice is now the refit plan
                if entry["round"] == len(history):
                    entry.pop("chosen", None)
            kept["chosen"] = True
    plan.options.update({"calib": calib, "val": val, "seed": seed, "labels": labels, "backoff": backoff})
    if rounds > 1:
        plan.options["rounds"] = history
    from .validation import validate

    results = {}
    reported = (("calib", splits.calib), ("val", splits.val)) + ((("test", splits.test),) if report_test else ())
    for name, split in progress.track(reported, "evaluate the splits", unit="split"):
        if name == "val":  # the original's metric was measured by the back-off already
            results[name] = {"value": _metric(compressed, split, provider, progress, "val split: compressed"),
                             "reference_value": plan.options["reference_val"], "samples": len(split)}
        else:
            v = validate(compressed, split, reference=reference, provider=provider, progress=progress)
            results[name] = {"value": v.value, "reference_value": v.reference_value, "samples": len(split),
                             "change_interval": v.change_interval}
    return JointResult(plan, compressed, report, results, backoff, sensitivity, splits.test)


def compress(
    model: str,
    output: str | os.PathLike,
    mode: str = "uniform",
    target_reduction: float | None = None,
    rank_fraction: float | None = None,
    energy: float | None = None,
    data: str | None = None,
    weights: str | None = None,
    plan_out: str | os.PathLike | None = None,
    overwrite: bool = False,
    dynamo: bool = False,
    batch: int = 1,
    dynamic_batch: bool = False,
    provider: str = "auto",
    tolerance: float = 0.0,
    calib: int = 1000,
    val: int = 1000,
    seed: int = 0,
    labels: str = "labels",
    solver: str = "lagrangian",
    progress: ProgressLike = None,
    target: str = "params",
    rank_multiple: int | None = None,
    rounds: int = 1,
    refit: bool = True,
    spatial: bool | None = None,
    analysis_cache: str | os.PathLike | None = None,
) -> CompressResult:
    """Compress ``model`` (a model name or an ONNX path) and write ``output``.

    Modes ``lossless`` and ``compact`` are the joint method (they need ``data``:
    ``calib`` samples for the analysis, ``val`` for the back-off, the rest
    held out); ``uniform`` and ``energy`` are data-free baselines. With
    ``data``, the result is validated against the original in onnxruntime.
    Outputs are only written once everything before succeeded. ``progress``
    (a :class:`~onnxlrf.progress.Progress`) shows bars and the decisions made.
    ``target``: ``target_reduction`` is a fraction of the model's parameters, FLOPs (at
    ``batch``) or latency (measured on ``provider`` at ``batch``, see :mod:`onnxlrf.latency`).
    ``rank_multiple``: ranks are multiples of it (None: :func:`~onnxlrf.latency.default_rank_multiple`).
    ``rounds``, ``spatial``, ``analysis_cache``: joint modes, see :func:`compress_joint`.
    """
    progress = as_progress(progress)
    if mode not in MODES:
        raise OnnxlrfError(f"unknown mode {mode!r}; known: {', '.join(MODES)}")
    if mode in JOINT_MODES and data is None:
        raise OnnxlrfError(f"mode {mode} needs --data (calibration, validation and test splits come from it)")
    model = str(model)
    # Outputs may not replace any input: model, checkpoint, data file.
    inputs = ((model,) if is_onnx_path(model) else ()) + (weights, data.partition(":")[2] if data else None)
    output = check_output_path(output, inputs, overwrite)
    if plan_out is not None:
        plan_out = check_output_path(plan_out, inputs + (output,), overwrite)
        if Path(plan_out).resolve() == output.resolve():
            raise OnnxlrfError("--plan-out must differ from the output path")
        if mode in JOINT_MODES:  # joint plans keep their bases beside the JSON
            check_output_path(plan_out.with_name(plan_out.name + ".bases.npz"), inputs, overwrite)
    if analysis_cache is not None and mode in JOINT_MODES:
        analysis_cache_dir(analysis_cache)
    with tempfile.TemporaryDirectory(prefix="onnxlrf-") as workdir:
        reference_path, exported = load_or_export(model, workdir, weights, dynamo, batch, dynamic_batch, progress)
        reference = load_onnx(reference_path)
        check_finite_weights(reference)
        dataset = None
        if data is not None:
            from .data import load_data

            dataset = load_data(data, reference)
        extra: dict = {}
        from .latency import default_rank_multiple, make_cost
        from .validation import select_providers

        if rank_multiple is None:
            rank_multiple = default_rank_multiple(select_providers(provider), target)
        cost = make_cost(reference, target, batch=batch, provider=provider, rank_multiple=rank_multiple,
                         progress=progress)
        if mode in JOINT_MODES:
            joint = compress_joint(reference, dataset, mode, target_reduction, tolerance, calib, val, seed, labels,
                                   solver, provider=provider, progress=progress, report_test=False, target=target,
                                   rank_multiple=rank_multiple, cost=cost, rounds=rounds, refit=refit,
                                   spatial=spatial, analysis_cache=analysis_cache)
            plan, compressed, report = joint.plan, joint.compressed, joint.report
            extra = dict(joint.splits)
            dataset = joint.test_split
        else:
            plan = make_plan(reference, mode, target_reduction, rank_fraction, energy, progress, target,
                             rank_multiple, cost)
            compressed, report = apply_plan(reference, plan, progress=progress)
        _log_rewrite(plan, report, progress)
        plan.source = {"model": model, **plan.source}
        validation = None
        if dataset is not None:
            from .validation import validate

            # For joint modes this is the held-out test split.
            validation = validate(compressed, dataset, reference=reference, provider=provider, progress=progress)
            if mode in JOINT_MODES:
                extra["test"] = {"value": validation.value, "reference_value": validation.reference_value,
                                 "samples": len(dataset), "change_interval": validation.change_interval}
        # Model and plan go in place together: a failed write leaves neither, and existing files as they were.
        with staged_outputs(overwrite) as stage:
            save_onnx(compressed, stage.path(output))
            if plan_out is not None:
                plan.save(stage.path(plan_out), overwrite=True)
        return CompressResult(
            output=output,
            plan=plan,
            rewrite=report,
            params=count_params(compressed),
            reference_params=count_params(reference),
            validation=validation,
            export=exported,
            extra=extra,
            reference=reference,
        )


def _log_rewrite(plan: Plan, report: RewriteReport, progress: Progress) -> None:
    """What the rewrite did, and why layers stayed dense (grouped by reason; the planner's where it gave one)."""
    progress.log(f"rewrite: {len(report.rewritten)} layers factorized, {len(report.kept_dense)} kept dense; "
                 f"parameters {report.params_before:,} -> {report.params_after:,}")
    planned = {entry.node: entry.notes.get("reason") for entry in plan.layers}
    reasons: dict[str, int] = {}
    for entry in report.kept_dense:
        reason = planned.get(entry["node"]) or entry["reason"]
        reasons[reason] = reasons.get(reason, 0) + 1
    for reason, count in sorted(reasons.items(), key=lambda item: -item[1]):
        progress.log(f"  {count} dense: {reason}")


def rewrite_file(
    model: str | os.PathLike, plan: str | os.PathLike | Plan, output: str | os.PathLike, overwrite: bool = False,
    progress: ProgressLike = None,
) -> RewriteReport:
    """Apply a plan (a JSON file or a Plan) to an ONNX file and write the result."""
    output = check_output_path(output, (model, plan if not isinstance(plan, Plan) else None), overwrite)
    reference = load_onnx(model)
    check_finite_weights(reference)
    if not isinstance(plan, Plan):
        plan = Plan.load(plan)
    compressed, report = apply_plan(reference, plan, progress=progress)
    with staged_outputs(overwrite) as stage:  # with external data, the .data file obeys --overwrite too
        save_onnx(compressed, stage.path(output))
    return report
