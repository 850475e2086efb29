"""The main job: model (name or ONNX file) in, compressed ONNX file out, validated.

``compress`` chains the stages a Python user can also call one by one:
export (or load) -> split -> analyse -> plan -> verify -> rewrite -> validate -> save.
Its settings come in a few option objects, one per concern, which the CLI's option groups fill:
:class:`ExportOptions`, :class:`~onnxlrf.planning.joint.PlanOptions`,
:class:`~onnxlrf.verify.splits.SplitOptions`, :class:`~onnxlrf.measure.analysis.AnalysisOptions`
and :class:`~onnxlrf.verify.backoff.VerifyOptions`.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from .costs.latency import QuantLatencyCost, default_rank_multiple, make_cost
from .costs.params import cost_model
from .errors import OnnxlrfError, first_line
from .graph.heads import PostProcessing, cut_at_heads, find_post_processing
from .graph.layers import check_finite_weights, count_params, find_layers, weight_array
from .measure.analysis import AnalysisOptions, analysis_cache_dir, default_labels
from .onnx_io import (
    StagedOutputs,
    check_output_path,
    check_regular_file,
    load_onnx,
    save_onnx,
    staged_outputs,
)
from .planning.joint import JOINT_MODES, PlanOptions, plan_source
from .planning.plan import Plan
from .progress import Progress, ProgressLike, as_progress
from .runtime.evaluate import model_metric, validate, with_original_outputs
from .runtime.sessions import make_session, optimized_op_counts, select_providers
from .techniques import TECHNIQUES
from .techniques.base import RewriteReport
from .techniques.lowrank.planners import plan_energy, plan_uniform
from .techniques.lowrank.rewrite import apply_plan
from .techniques.quant.calibration import calibrate_plan, search_smoothing
from .techniques.quant.candidates import PLANNED_BITS
from .techniques.quant.planners import QuantOptions, plan_uniform_quant, reduces_range, w8a8_weight_bits
from .techniques.quant.rewrite import QDQRewrite
from .techniques.quant.sequential import sequential_rounding
from .techniques.quant.smoothing import W8A8_WEIGHT_BITS
from .techniques.quant.sizes import average_weight_bits, file_bytes
from .verify.backoff import VerifyOptions
from .verify.rounds import verify_in_rounds
from .verify.search import Attempt
from .verify.splits import SplitOptions, split_dataset

PLANNING_MODES = ("uniform", "energy")
MODES = JOINT_MODES + PLANNING_MODES
# What loss-aware quantization plans count (the quantization technique chooses bits, not ranks).
QUANT_TARGETS = ("bytes", "bits", "latency")
# Fewer calibration or validation samples than this get a warning: validation on them decides by chance.
SMALL_SPLIT = 100


@dataclass(frozen=True)
class ExportOptions:
    """How a model name becomes the reference ONNX file (``onnxlrf export``'s flags; ignored for ONNX files).

    ``weights``: a checkpoint; ``dynamo``: torch's dynamo exporter (opset 18, external data) instead
    of TorchScript (opset 17, one file); ``batch``: the example batch; ``dynamic_batch``: a symbolic
    batch axis, so data runs in batches.
    """

    weights: str | None = None
    dynamo: bool = False
    batch: int = 1
    dynamic_batch: bool = False


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
    # The --json keys of the layers the technique changed and of those it left as they were.
    layer_keys: tuple[str, str] = ("layers_factorized", "layers_dense")

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
            self.layer_keys[0]: len(self.rewrite.rewritten),
            self.layer_keys[1]: len(self.rewrite.kept_dense),
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


def load_or_export(model: str, workdir: str | os.PathLike, export: ExportOptions = ExportOptions(),
                   progress: ProgressLike = None) -> tuple[Path, Any]:
    """Return the path of an ONNX file for ``model``: the file itself, or a fresh export into ``workdir``."""
    if is_onnx_path(model):
        if export.weights:
            raise OnnxlrfError("--weights applies to model names, not to ONNX files")
        load_onnx(model, load_external_data=False)  # fail early with a clear message
        return Path(model), None
    from .export import export_model
    from .models import load_model

    spec = load_model(model, weights=export.weights)
    exported = export_model(spec, Path(workdir) / "reference.onnx", dynamo=export.dynamo, batch=export.batch,
                            dynamic_batch=export.dynamic_batch, progress=progress)
    return Path(exported.path), exported


def make_plan(model: onnx.ModelProto, options: PlanOptions, cost: Any = None, progress: ProgressLike = None) -> Plan:
    """A data-free plan: ``uniform`` (rank fraction) or ``energy`` (share of squared singular values).

    ``options.target``, ``cost`` and ``options.rank_multiple``: see
    :func:`onnxlrf.techniques.lowrank.planners.plan_uniform`.
    """
    rank_multiple = options.rank_multiple or 1
    if options.mode == "uniform":
        return plan_uniform(model, rank_fraction=options.rank_fraction, target_reduction=options.target_reduction,
                            target=options.target, rank_multiple=rank_multiple, cost=cost)
    if options.mode == "energy":
        return plan_energy(model, energy=options.energy, target_reduction=options.target_reduction,
                           progress=progress, target=options.target, rank_multiple=rank_multiple, cost=cost)
    raise OnnxlrfError(f"unknown mode {options.mode!r}; known: {', '.join(MODES)}")


@dataclass
class JointResult:
    """The joint method's outcome (:func:`compress_joint`), in memory."""

    plan: Plan
    compressed: onnx.ModelProto
    report: RewriteReport
    splits: dict  # split name -> {"value", "reference_value", "samples"[, "change_interval"]}
    backoff: list[Attempt]  # every plan the back-off looked at
    sensitivity: Any  # the (last round's) analysis
    test_split: Any


def compress_joint(
    reference: onnx.ModelProto,
    dataset: Any,
    options: PlanOptions,
    splits: SplitOptions = SplitOptions(),
    analysis: AnalysisOptions = AnalysisOptions(),
    verify: VerifyOptions = VerifyOptions(),
    provider: str = "auto",
    cost: Any = None,
    report_test: bool = True,
    progress: ProgressLike = None,
) -> JointResult:
    """The joint method: analyze on calib, plan, verify and back off on val, report on the held-out test split.

    ``options``: the joint mode and its target. ``verify.refit``: the back-off also tries its plans
    with their factors refit on calib (:func:`onnxlrf.techniques.lowrank.refit.refit_plan`), and keeps
    them where validation says they are better (see :func:`~onnxlrf.verify.backoff.backoff_plan`);
    ``verify.rounds`` > 1 repeats analysis and back-off around the truncated weights of the previous
    round (:func:`~onnxlrf.verify.rounds.verify_in_rounds`). The returned plan applies to ``reference``.
    Each split's metric is reported with the original's; calib and test also with the 95%
    interval of the change (:func:`onnxlrf.runtime.evaluate.change_interval`).
    ``report_test=False`` leaves the test split's metrics to the caller (``compress`` gets
    them from its full validation of that split, so the split is evaluated once).
    ``analysis.spatial``: the planner may also choose spatial decomposition for k x k convs
    (None: for flops and latency targets, where its fewer FLOPs pay). ``analysis.cache``: a
    directory where each round's analysis is reused or kept, so another target or mode on the same
    data skips it. ``cost``: a prepared cost model for ``options.target``.
    Data without labels (task ``outputs``) is scored by fidelity to ``reference``'s outputs, and
    ``analysis.labels`` None becomes ``outputs`` for it; compact mode then needs a ``tolerance`` > 0
    (see :func:`~onnxlrf.verify.backoff.metric_allowance`).
    A detector's post-processing (:mod:`onnxlrf.graph.heads`) selects as many detections as survive,
    with no row per sample: analysis, back-off and the splits' metrics then see the model cut at
    the heads before it (their outputs are what the loss and the fidelity compare), and the
    returned model is ``reference`` rewritten by the plan, post-processing intact.
    """
    from .data import OUTPUTS

    if options.mode not in JOINT_MODES:
        raise OnnxlrfError(f"unknown joint mode {options.mode!r}; known: {', '.join(JOINT_MODES)}")
    progress = as_progress(progress)
    _check_float32(reference)
    post = post_processing(reference, options.target)
    compared = reference if post is None else cut_at_heads(reference, post.heads)
    if post is not None:
        progress.log(f"post-processing ({', '.join(post.selection_ops)}): the analysis and the metrics compare "
                     f"the heads before it ({', '.join(post.heads)}); the written model keeps it"
                     + (f"; the second stage's {len(post.second_stage)} weight layers run on the crops and stay "
                        f"dense" if post.second_stage else ""))
    if dataset.task == OUTPUTS:
        if options.mode == "compact" and options.tolerance <= 0:
            raise OnnxlrfError("compact mode on data without labels keeps the outputs within --tolerance of the "
                               "original's (relative squared error; every truncation moves them): pass "
                               "--tolerance > 0, e.g. 0.01")
        dataset = with_original_outputs(dataset, compared, provider, progress)
    if analysis.labels is None:
        analysis = dataclasses.replace(analysis, labels=default_labels(dataset))
        if dataset.task == OUTPUTS:
            progress.log("data without labels: the calibration loss is the distance to the original's outputs "
                         "(--labels outputs); the metric is fidelity to them")
    split = split_dataset(dataset, splits.calib, splits.val, splits.seed)
    progress.log(f"splits (seed {splits.seed}): {len(split.calib)} calibration, {len(split.val)} validation, "
                 f"{len(split.test)} held-out test samples")
    if min(len(split.calib), len(split.val)) < SMALL_SPLIT:
        progress.log(f"warning: {min(len(split.calib), len(split.val))} samples cannot tell a compressed model from "
                     f"the original; the back-off's verdicts on so few are chance (use --calib and --val of "
                     f"{SMALL_SPLIT} or more)")
    cost = cost_model(reference, options.target, cost or make_cost(reference, options.target))
    if analysis.spatial is None:
        analysis = dataclasses.replace(analysis, spatial=cost.target != "params")
    rounds = verify_in_rounds(compared, split, options, analysis, verify, cost, provider, progress)
    plan, compressed = rounds.plan, rounds.model
    plan.options.update({"calib": splits.calib, "val": splits.val, "seed": splits.seed, "labels": analysis.labels,
                         "backoff": [attempt.to_dict() for attempt in rounds.attempts]})
    if verify.rounds > 1:
        plan.options["rounds"] = rounds.history
    results = {}
    reported = (("calib", split.calib), ("val", split.val)) + ((("test", split.test),) if report_test else ())
    for name, data in progress.track(reported, "evaluate the splits", unit="split"):
        if name == "val":  # the original's metric was measured by the back-off already
            results[name] = {"value": model_metric(compressed, data, provider, progress, "val split: compressed"),
                             "reference_value": rounds.reference_value, "samples": len(data)}
        else:
            v = validate(compressed, data, reference=compared, provider=provider, progress=progress)
            results[name] = {"value": v.value, "reference_value": v.reference_value, "samples": len(data),
                             "change_interval": v.change_interval}
    report = rounds.report
    if post is not None:  # the plan's layers are the whole model's: the cut only dropped post-processing
        plan.source = plan_source(reference)
        compressed, report = apply_plan(reference, plan, progress=progress)
    return JointResult(plan, compressed, report, results, rounds.attempts, rounds.analysis, split.test)


def post_processing(reference: onnx.ModelProto, target: str) -> PostProcessing | None:
    """``reference``'s post-processing (:func:`~onnxlrf.graph.heads.find_post_processing`), where the
    ``target`` can be reached with it; None where it has none."""
    post = find_post_processing(reference)
    if post is not None and target == "latency":
        raise OnnxlrfError(f"--target latency cannot be measured on a model with post-processing "
                           f"({', '.join(post.selection_ops)}): its run time depends on how many detections "
                           f"survive, which the compression changes; use --target params or flops")
    return post


def _check_float32(model: onnx.ModelProto) -> None:
    """The joint analysis runs in float32 torch: refuse other weight types with what to do instead."""
    for layer in find_layers(model)[0]:
        dtype = weight_array(model, layer).dtype
        if dtype != np.float32:
            raise OnnxlrfError(f"the joint modes analyse float32 models; weight {layer.weight!r} is {dtype}: use "
                               f"--mode uniform or energy, or compress the float32 model and convert the result")


def check_written(path: str | os.PathLike) -> None:
    """A written model passes the ONNX checker (full check) and loads in onnxruntime, before it goes in place."""
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise OnnxlrfError(f"the written model fails the ONNX checker ({first_line(exc)}); nothing was written") \
            from None
    make_session(path, ["CPUExecutionProvider"])


def _check_paths(model: str, output: str | os.PathLike, data: str | None, export: ExportOptions,
                 plan_out: str | os.PathLike | None, overwrite: bool, cache: str | os.PathLike | None,
                 stores_arrays: bool) -> tuple[Path, Path | None]:
    """Before any work: the output and plan paths (checked: they may not replace an input, the model,
    checkpoint or data file; ``stores_arrays``: the plan's arrays go beside it too), the analysis cache
    directory, and the data file."""
    inputs = ((model,) if is_onnx_path(model) else ()) + (export.weights, data.partition(":")[2] if data else None)
    output = check_output_path(output, inputs, overwrite)
    if plan_out is not None:
        plan_out = check_output_path(plan_out, inputs + (output,), overwrite)
        if Path(plan_out).resolve() == output.resolve():
            raise OnnxlrfError("--plan-out must differ from the output path")
        if stores_arrays:
            check_output_path(plan_out.with_name(plan_out.name + ".bases.npz"), inputs, overwrite)
    if cache is not None:
        analysis_cache_dir(cache)
    if data is not None and ":" in data:  # a data file: there before the export, not after it
        check_regular_file(data.partition(":")[2], "data file")
    return output, plan_out


def compress(
    model: str,
    output: str | os.PathLike,
    options: PlanOptions,
    data: str | None = None,
    splits: SplitOptions = SplitOptions(),
    analysis: AnalysisOptions = AnalysisOptions(),
    verify: VerifyOptions = VerifyOptions(),
    export: ExportOptions = ExportOptions(),
    provider: str = "auto",
    plan_out: str | os.PathLike | None = None,
    overwrite: bool = False,
    progress: ProgressLike = None,
    stage: StagedOutputs | None = None,
) -> CompressResult:
    """Compress ``model`` (a model name or an ONNX path) and write ``output``.

    Modes (``options.mode``) ``lossless`` and ``compact`` are the joint method (they need ``data``:
    ``splits.calib`` samples for the analysis, ``splits.val`` for the back-off, the rest held out);
    ``uniform`` and ``energy`` are data-free baselines. With ``data``, the result is validated
    against the original in onnxruntime. Outputs are only written once everything before
    succeeded. ``progress`` (a :class:`~onnxlrf.progress.Progress`) shows bars and the decisions made.
    ``options.target``: ``target_reduction`` is a fraction of the model's parameters, FLOPs (at
    ``export.batch``) or latency (measured on ``provider`` at ``export.batch``, see
    :mod:`onnxlrf.costs.latency`). ``options.rank_multiple``: ranks are multiples of it (None:
    :func:`~onnxlrf.costs.latency.default_rank_multiple`). ``analysis`` and ``verify``: see
    :func:`compress_joint`. ``stage``: the caller's :func:`~onnxlrf.onnx_io.staged_outputs`, which
    the outputs join, to go in place with the caller's own files (the CLI's report); else they go in
    place here, together.
    """
    progress = as_progress(progress)
    mode = options.mode
    if mode not in MODES:
        raise OnnxlrfError(f"unknown mode {mode!r}; known: {', '.join(MODES)}")
    if mode in JOINT_MODES and data is None:
        raise OnnxlrfError(f"mode {mode} needs --data (calibration, validation and test splits come from it)")
    model = str(model)
    output, plan_out = _check_paths(model, output, data, export, plan_out, overwrite,
                                    analysis.cache if mode in JOINT_MODES else None, mode in JOINT_MODES)
    with tempfile.TemporaryDirectory(prefix="onnxlrf-") as workdir:
        reference_path, exported = load_or_export(model, workdir, export, progress)
        reference = load_onnx(reference_path)
        check_finite_weights(reference)
        if data is not None or options.target == "latency":  # what cannot be compared or measured: refused now
            post_processing(reference, options.target)
        dataset = None
        if data is not None:
            from .data import load_data

            dataset = load_data(data, reference)
        extra: dict = {}
        if options.rank_multiple is None:
            options = dataclasses.replace(options, rank_multiple=default_rank_multiple(select_providers(provider),
                                                                                      options.target))
        cost = make_cost(reference, options.target, batch=export.batch, provider=provider,
                         rank_multiple=options.rank_multiple, progress=progress)
        if mode in JOINT_MODES:
            joint = compress_joint(reference, dataset, options, splits, analysis, verify, provider, cost,
                                   report_test=False, progress=progress)
            plan, compressed, report = joint.plan, joint.compressed, joint.report
            extra = dict(joint.splits)
            dataset = joint.test_split
        else:
            plan = make_plan(reference, options, cost, progress)
            compressed, report = apply_plan(reference, plan, progress=progress)
        _log_rewrite(plan, report, progress)
        plan.source = {"model": model, **plan.source}
        validation = None
        if dataset is not None:
            # For joint modes this is the held-out test split.
            validation = validate(compressed, dataset, reference=reference, provider=provider, progress=progress)
            if mode in JOINT_MODES:
                extra["test"] = {"value": validation.value, "reference_value": validation.reference_value,
                                 "samples": len(dataset), "change_interval": validation.change_interval}
        # Model and plan go in place together: a failed write leaves neither, and existing files as they were.
        with staged_outputs(overwrite, within=stage) as outputs:
            check_written(save_onnx(compressed, outputs.path(output)))
            if plan_out is not None:
                plan.save(outputs.path(plan_out), overwrite=True)
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


def compress_quant(
    model: str,
    output: str | os.PathLike,
    options: QuantOptions,
    joint: PlanOptions | None = None,
    data: str | None = None,
    splits: SplitOptions = SplitOptions(),
    analysis: AnalysisOptions = AnalysisOptions(),
    verify: VerifyOptions = VerifyOptions(),
    export: ExportOptions = ExportOptions(),
    provider: str = "auto",
    plan_out: str | os.PathLike | None = None,
    overwrite: bool = False,
    progress: ProgressLike = None,
    stage: StagedOutputs | None = None,
) -> CompressResult:
    """Quantize ``model`` (a model name or an ONNX path) and write ``output`` in ``options.runtime``'s Q/DQ form.

    ``joint`` None: every quantizable layer at ``options.bits`` (uniform; Gemm/MatMul inputs smoothed where
    ``options.smoothing`` says (``auto``: W8A8 layers' inputs; ``on``: every int8 one) and the search finds it closer
    to float, :mod:`~onnxlrf.techniques.quant.smoothing`;
    ``options.rounding`` ``sequential``: then rounded again in graph order on the calibration split). ``joint`` a lossless or compact
    :class:`~onnxlrf.planning.joint.PlanOptions` with target ``bytes``, ``bits`` or ``latency``: the loss-aware plan
    (bits per layer from the joint analysis' predicted loss changes, each rounded as ``options.rounding`` says
    (default loss-aware), the knapsack over the target (latency: each layer's time float and W8A8 measured on
    ``provider`` at ``export.batch``, :class:`~onnxlrf.costs.latency.QuantLatencyCost`), the back-off and its
    acceptance rule on the validation split; one round; with ``verify.refit``, the back-off also tries its plans
    rounded again in graph order, :func:`~onnxlrf.techniques.quant.sequential.sequential_rounding`). With ``data``,
    it is split as for the joint modes (``splits``): int8 activations are calibrated on the calibration split, and
    the result is validated against the original on the held-out test split (W8A8 and the joint modes need
    ``data``). ``extra`` holds the sizes: ``average_weight_bits`` (logical bits of all Conv/Gemm/MatMul
    weights, float32 counting 32), ``model_bytes`` and ``reference_model_bytes`` (files on disk), and the op
    types onnxruntime's optimized graph has (``optimized_op_counts``). ``stage``: as :func:`compress`.
    """
    from .data import OUTPUTS
    from .techniques.quant.technique import Quant

    progress = as_progress(progress)
    if joint is None and options.bits is None:
        raise OnnxlrfError("mode uniform needs --bits")
    if joint is None and options.predictor != "kfac":
        raise OnnxlrfError("--predictor applies to lossless and compact plans; uniform plans predict nothing")
    if joint is None and options.rounding == "loss-aware":
        raise OnnxlrfError("--rounding loss-aware needs the analysis of a lossless or compact plan; uniform plans "
                           "round to nearest or sequentially")
    if joint is None and options.rounding == "sequential" and data is None:
        raise OnnxlrfError("--rounding sequential needs --data: each layer is rounded again on its calibration split")
    if options.smoothing == "on" and (joint is not None or options.activations != "int8"):
        raise OnnxlrfError("--smoothing on is for uniform plans with --activations int8 (weight-only layers have no "
                           "input to smooth; lossless and compact plans are not smoothed)")
    if joint is not None and options.rounding == "sequential":
        raise OnnxlrfError("--rounding sequential is for uniform plans; lossless and compact plans round the back-off's "
                           "plans sequentially as their improvement step (--refit)")
    if joint is not None:
        if joint.mode not in JOINT_MODES:
            raise OnnxlrfError(f"--technique quant has modes uniform, {', '.join(JOINT_MODES)}; not {joint.mode!r}")
        if joint.target not in QUANT_TARGETS:
            raise OnnxlrfError("--technique quant plans bytes, bits or latency: pass --target bytes, bits or "
                               "latency")
        if joint.target == "latency" and (options.activations != "int8" or options.runtime != "onnxruntime"):
            raise OnnxlrfError("--technique quant --target latency plans W8A8 layers in onnxruntime's form, measured "
                               "here: pass --activations int8 (weight-only layers run float weights in onnxruntime) "
                               "and --runtime onnxruntime (TensorRT cannot be timed here)")
        if data is None:
            raise OnnxlrfError(f"mode {joint.mode} needs --data (calibration, validation and test splits come "
                               f"from it)")
    if options.activations == "int8" and data is None:
        raise OnnxlrfError("--activations int8 needs --data: activation ranges are calibrated on its "
                           "calibration split")
    model = str(model)
    output, plan_out = _check_paths(model, output, data, export, plan_out, overwrite,
                                    analysis.cache if joint is not None else None, joint is not None)
    with tempfile.TemporaryDirectory(prefix="onnxlrf-") as workdir:
        reference_path, exported = load_or_export(model, workdir, export, progress)
        reference = load_onnx(reference_path)
        check_finite_weights(reference)
        split = None
        if data is not None:
            from .data import load_data

            split = split_dataset(load_data(data, reference), splits.calib, splits.val, splits.seed)
            progress.log(f"splits (seed {splits.seed}): {len(split.calib)} calibration, {len(split.val)} "
                         f"validation{' (unused by uniform plans)' if joint is None else ''}, {len(split.test)} "
                         f"held-out test samples")
        if joint is None:
            plan = plan_uniform_quant(reference, options)
            if options.activations == "int8":
                if options.smoothing != "off":
                    plan = search_smoothing(reference, plan, split.calib, options.runtime,
                                            W8A8_WEIGHT_BITS if options.smoothing == "auto" else 0, progress)
                calibrate_plan(reference, plan, split.calib, options.runtime, options.calibration_method, progress)
            if options.rounding == "sequential":
                plan = sequential_rounding(reference, plan, split.calib, options.runtime, progress=progress) or plan
        else:
            if split.calib.task == OUTPUTS:
                raise OnnxlrfError("the loss-aware quantization plans need labelled data so far")
            _check_float32(reference)
            analysis = dataclasses.replace(analysis, labels=analysis.labels or default_labels(split.calib),
                                           spatial=False)
            ranges = None
            if options.activations == "int8":  # every activation a plan may quantize, calibrated once
                every = calibrate_plan(reference, plan_uniform_quant(reference, dataclasses.replace(options, bits=8)),
                                       split.calib, options.runtime, options.calibration_method, progress)
                ranges = every.activation_ranges
            # Under a latency target the integer kernels take as long whatever the weights' logical bits: fewer
            # bits cost loss and save no time, so only W8A8 is offered (and measured).
            bits_offered = (8,) if joint.target == "latency" else PLANNED_BITS
            technique = Quant(options.rounding or "loss-aware", options.runtime, ranges, w8a8_weight_bits(options),
                              options.block_size, options.predictor, bits_offered)
            if joint.target == "latency":
                post_processing(reference, joint.target)
                cost = QuantLatencyCost(reference, w8a8_weight_bits(options), batch=export.batch, provider=provider,
                                        progress=progress)
            else:
                cost = cost_model(reference, joint.target)
            # One round; the improvement step (``verify.refit``) is the sequential rounding.
            rounds = verify_in_rounds(reference, split, joint, analysis, dataclasses.replace(verify, rounds=1),
                                      cost, provider, progress, technique=technique)
            plan = technique.with_ranges(reference, rounds.plan)
            plan.options["backoff"] = [attempt.to_dict() for attempt in rounds.attempts]
            plan.options["runtime"] = options.runtime
            if ranges is not None:
                plan.options.update({"calibration_method": options.calibration_method,
                                     "calibration_samples": len(split.calib),
                                     "reduce_range": reduces_range(options)})
        if split is not None:
            plan.options.update({"calib": splits.calib, "val": splits.val, "seed": splits.seed})
        compressed, report = QDQRewrite(options.runtime)(reference, plan, progress)
        progress.log(f"rewrite: {len(report.rewritten)} layers quantized ({options.runtime} form), "
                     f"{len(report.kept_dense)} float")
        plan.source = {"model": model, **plan.source}
        validation = None
        if split is not None:
            validation = validate(compressed, split.test, reference=reference, provider=provider,
                                  progress=progress)
        with staged_outputs(overwrite, within=stage) as outputs:
            written = save_onnx(compressed, outputs.path(output))
            check_written(written)
            model_bytes = file_bytes(written)
            if plan_out is not None:
                plan.save(outputs.path(plan_out), overwrite=True)
        extra = {"technique": "quant", "runtime": options.runtime,
                 "average_weight_bits": average_weight_bits(reference, plan), "model_bytes": model_bytes,
                 "reference_model_bytes": file_bytes(reference_path),
                 "optimized_op_counts": optimized_op_counts(compressed)}
        if options.activations == "int8":
            extra["calibration_method"] = options.calibration_method
            extra["reduce_range"] = reduces_range(options)
            extra["smoothed_inputs"] = len(plan.smoothing)
        params = count_params(reference)
        return CompressResult(output=output, plan=plan, rewrite=report, params=params, reference_params=params,
                              validation=validation, export=exported, extra=extra, reference=reference,
                              layer_keys=("layers_quantized", "layers_float"))


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
    if not isinstance(plan, Plan):
        path, plan = plan, Plan.load(plan)
        if plan.options.get("bases_file"):  # its stored bases are an input too
            check_output_path(output, (Path(path).parent / plan.options["bases_file"],), overwrite)
    reference = load_onnx(model)
    check_finite_weights(reference)
    techniques = {entry.technique for entry in plan.layers}
    if len(techniques) > 1:
        raise OnnxlrfError(f"plan mixes techniques {', '.join(sorted(techniques))}: one technique per plan so far")
    technique = TECHNIQUES[techniques.pop() if techniques else "lowrank"]
    compressed, report = technique.rewrite(reference, plan, progress=progress)
    with staged_outputs(overwrite) as stage:  # with external data, the .data file obeys --overwrite too
        check_written(save_onnx(compressed, stage.path(output)))
    return report
