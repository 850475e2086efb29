"""The main job: model (name or ONNX file) in, low-rank ONNX file out, validated.

``compress`` chains the stages a Python user can also call one by one:
export (or load) -> plan -> rewrite -> save -> validate.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx

from .costs.latency import default_rank_multiple, make_cost
from .costs.params import cost_model
from .errors import OnnxlrfError
from .graph.layers import check_finite_weights, count_params
from .measure.analysis import analysis_cache_dir, joint_analysis
from .onnx_io import check_output_path, load_onnx, save_onnx, staged_outputs
from .planning.plan import Plan
from .progress import Progress, ProgressLike, as_progress
from .runtime.evaluate import model_metric
from .techniques.lowrank.planners import JOINT_MODES, plan_energy, plan_uniform
from .techniques.lowrank.rewrite import RewriteReport, apply_plan, truncate_weights
from .verify.backoff import backoff_plan, merge_rounds, refit_chosen
from .verify.splits import split_dataset

PLANNING_MODES = ("uniform", "energy")


MODES = JOINT_MODES + PLANNING_MODES


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

    ``target``/``cost``/``rank_multiple``: see :func:`onnxlrf.techniques.lowrank.planners.plan_uniform`.
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
class JointResult:
    """The joint method's outcome (:func:`compress_joint`), in memory."""

    plan: Plan
    compressed: onnx.ModelProto
    report: RewriteReport
    splits: dict  # split name -> {"value", "reference_value"}
    backoff: list  # per tried kappa: achieved reduction, predicted dL, validation metric
    sensitivity: Any
    test_split: Any


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
    (:func:`onnxlrf.techniques.lowrank.refit.refit_plan`), and keeps them where validation says they are better
    (see :func:`backoff_plan`); with ``rounds`` > 1, the final plan only.

    ``rounds`` > 1 repeats analysis and back-off around the truncated weights of the
    previous round, so each round's Taylor model sees what the earlier truncations
    did to the other layers. compact: until a round adds nothing that holds on
    validation (against the original's metric); lossless: round k aims at k/rounds
    of ``target_reduction``. The returned plan applies to ``reference`` itself.
    Each split's metric is reported with the original's; calib and test also with the 95%
    interval of the change (:func:`onnxlrf.runtime.evaluate.change_interval`).
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
    cost = cost_model(reference, target, cost or make_cost(reference, target))
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
        merged = merge_rounds(reference, plan, round_plan, cost)
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
        refitted = refit_chosen(reference, (history[-1]["val"], plan, compressed, report), [], splits.calib,
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
    from .runtime.evaluate import validate

    results = {}
    reported = (("calib", splits.calib), ("val", splits.val)) + ((("test", splits.test),) if report_test else ())
    for name, split in progress.track(reported, "evaluate the splits", unit="split"):
        if name == "val":  # the original's metric was measured by the back-off already
            results[name] = {"value": model_metric(compressed, split, provider, progress, "val split: compressed"),
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
    ``batch``) or latency (measured on ``provider`` at ``batch``, see :mod:`onnxlrf.costs.latency`).
    ``rank_multiple``: ranks are multiples of it (None: :func:`~onnxlrf.costs.latency.default_rank_multiple`).
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
        from .runtime.sessions import select_providers

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
            from .runtime.evaluate import validate

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
