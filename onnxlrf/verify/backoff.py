"""The back-off (METHOD.md 5) on real models: plans verified in onnxruntime on the validation split.

:func:`backoff_plan` runs the search of :mod:`onnxlrf.verify.search` with an evaluator that
rewrites each plan with its technique and scores it in onnxruntime, then the steps around it:
restoring the worst layers of a failing plan (:func:`restore_layers`) and improving the chosen
plan without fine-tuning (low-rank: the refit, :func:`refit_chosen`).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable

import onnx

from ..costs.params import cost_model
from ..errors import OnnxlrfError
from ..graph.layers import count_params, find_layers, weight_array
from ..measure.analysis import calibration_batches, range_batch_size
from ..measure.sensitivity import replacement_gains, task_loss
from ..planning.joint import JOINT_MODES, PlanOptions, plan_joint, plan_source
from ..planning.plan import Plan
from ..progress import Progress, ProgressLike, as_progress
from ..runtime.evaluate import model_outputs
from ..techniques import TECHNIQUES
from ..techniques.base import RewriteReport, Technique
from .search import (
    DEFAULT_ACCEPTANCE,
    SELECTIONS,
    AcceptanceRule,
    Attempt,
    BackoffSearch,
    Score,
    Verified,
    paired_loss_change,
    plan_label,
    reduction_text,
    selection_key,
)


@dataclass(frozen=True)
class VerifyOptions:
    """How the joint method verifies (``onnxlrf compress``'s ``--rounds`` and ``--refit``).

    ``rounds`` > 1 repeats analysis and back-off around the previous round's truncated weights;
    ``refit``: the back-off also tries its plans improved by the technique (low-rank: refit factors);
    ``acceptance_z``: when a plan holds on validation: its metric at least the original's and its
    paired validation-loss change at least this many standard errors below 0 (None: the metric only;
    see :class:`~onnxlrf.verify.search.AcceptanceRule` and :data:`~onnxlrf.verify.search.DEFAULT_ACCEPTANCE`);
    ``select``: how lossless mode chooses among the plans it verified (:func:`lossless_selection`).
    """

    rounds: int = 1
    refit: bool = True
    acceptance_z: float | None = DEFAULT_ACCEPTANCE.loss_z
    select: str = "auto"

    def __post_init__(self) -> None:
        if self.acceptance_z is not None and not (isinstance(self.acceptance_z, (int, float))
                                                  and math.isfinite(self.acceptance_z)):
            raise OnnxlrfError(f"--acceptance-z must be a finite number or 'off', got {self.acceptance_z!r}")
        if self.select not in ("auto", *SELECTIONS):
            raise OnnxlrfError(f"--select must be auto, {' or '.join(SELECTIONS)}; got {self.select!r}")

    @property
    def acceptance(self) -> AcceptanceRule:
        """The back-off's acceptance rule."""
        return AcceptanceRule(loss_z=self.acceptance_z)


@dataclass
class BackoffResult:
    """What :func:`backoff_plan` chose: the plan, its model and rewrite report, and every attempt."""

    plan: Plan
    model: onnx.ModelProto
    report: RewriteReport
    attempts: list[Attempt]
    value: float  # the chosen plan's validation metric
    reference_score: Score  # the original's, with its per-sample losses
    score: Score | None = None  # the chosen plan's, with its per-sample losses (None: compact kept the model as it is)

    @property
    def reference_value(self) -> float:
        """The original's validation metric."""
        return self.reference_score.value


class ValidationEvaluator:
    """Plans rewritten by their technique and scored in onnxruntime on the validation split ``val``.

    Under a latency target (a cost model that measures speed), each model is also timed against
    the original. ``reference_score``: the original's score, when the caller measured it already.
    ``allowance``: how far below the original's a plan may score and hold (:func:`metric_allowance`).
    """

    def __init__(self, reference: onnx.ModelProto, val: Any, technique: Technique, cost: Any, provider: str,
                 progress: Progress, reference_score: Score | None = None, allowance: float = 0.0) -> None:
        self.reference, self.val, self.technique, self.cost = reference, val, technique, cost
        self.provider, self.progress, self._reference_score = provider, progress, reference_score
        self.allowance = allowance
        self.measures_speed = cost.target == "latency" and hasattr(cost, "measured_speedup")

    def reference_score(self) -> Score:
        if self._reference_score is None:
            self._reference_score = self.score(self.reference, "the original on validation")
        return self._reference_score

    def required_value(self) -> float:
        """What a plan's metric must reach on validation to hold: the original's less the allowance."""
        return self.reference_score().value - self.allowance

    def rewrite(self, plan: Plan) -> tuple[onnx.ModelProto, RewriteReport]:
        return self.technique.rewrite(self.reference, plan, progress=self.progress)

    def score(self, model: onnx.ModelProto, description: str) -> Score:
        """The metric and the per-sample task losses; label-free data has no losses here: its loss is the
        distance to the original's outputs, 0 for the original on every sample, so only the metric
        (fidelity, within the allowance) can judge a plan."""
        from ..data import OUTPUTS

        outputs = model_outputs(model, self.val, self.provider, self.progress, description)
        losses = None if self.val.task == OUTPUTS else self.val.sample_losses(outputs)
        return Score(self.val.score(outputs), losses)

    def speedup(self, model: onnx.ModelProto) -> float | None:
        return self.cost.measured_speedup(model) if self.measures_speed else None


def lossless_selection(select: str, val: Any, mode: str = "lossless") -> str:
    """How lossless mode chooses among the plans it verified on ``val`` (:func:`~onnxlrf.verify.search.selection_key`),
    the refit of the chosen plan included; other modes compare by the metric. ``select`` itself, or for "auto"
    the lowest mean validation loss where the data are classified (the
    cross-entropy on each sample's label moves on every sample, where top-1 moves on the few that flip), else the
    highest validation metric: a sentence encoder's loss (the squared error of each pair's cosine against its gold
    score) is not what its Spearman metric rewards (a shift of every cosine changes the loss and no rank), and
    label-free data has no per-sample losses here."""
    from ..data import CLASSIFICATION

    if mode != "lossless":
        return "metric"
    if select != "auto":
        return select
    return "loss" if val.task == CLASSIFICATION else "metric"


def metric_allowance(val: Any, options: PlanOptions) -> float:
    """How far below the original's validation metric a plan may score and still hold: 0, except for
    label-free data, whose metric is fidelity to the original's outputs (the original's is 1, every
    truncation lowers it): there compact mode's ``tolerance``, so a plan holds when its measured
    validation error (the calibration loss's measure, 1 - fidelity) is within the tolerance the planner
    budgeted for its predicted loss increase."""
    from ..data import OUTPUTS

    return options.tolerance if val.task == OUTPUTS and options.mode == "compact" else 0.0


def backoff_plan(
    reference: onnx.ModelProto,
    analysis: Any,
    val: Any,
    options: PlanOptions,
    calib: Any = None,
    refit: bool = False,
    reference_score: Score | None = None,
    cost: Any = None,
    provider: str = "auto",
    progress: ProgressLike = None,
    technique: Technique = TECHNIQUES["lowrank"],
    rule: AcceptanceRule = DEFAULT_ACCEPTANCE,
    select: str = "auto",
) -> BackoffResult:
    """Verify plans on the validation split ``val``, trusting the curvature model less each time (METHOD.md 5).

    ``options``: the joint mode and its target (:class:`~onnxlrf.planning.joint.PlanOptions`).
    The search (:class:`~onnxlrf.verify.search.BackoffSearch`) chooses; then, in compact mode and
    given ``calib``, the smallest plan that failed with its worst layers (measured on ``calib``)
    set back until it holds on ``val`` (:func:`restore_layers`), if that is larger. ``refit``
    (needs ``calib``): every plan is verified as the technique improves it where
    :attr:`~onnxlrf.techniques.base.Technique.improves_every_plan`, else :func:`refit_chosen` at the end.
    Compact with no plan that holds keeps the model as it is. ``cost``: a prepared cost model for
    ``options.target`` (else one is built here); a measured latency in lossless mode is first fitted to the
    planner's own plans (:func:`calibrate_on_plans`). Lossless mode also verifies the technique's uniform plan
    that meets the target (:func:`uniform_baseline`), and where the back-off improves every plan, that plan
    improved too (quantization: rounded sequentially).
    ``rule``: when a plan holds on validation, in every step (:class:`~onnxlrf.verify.search.AcceptanceRule`).
    ``select``: how lossless mode chooses among its verified plans, the refit one included (:func:`lossless_selection`).
    The chosen plan's options record every attempt (``"backoff"``), ``"reference_val"`` and, in lossless mode,
    how the plan was chosen (``"select"``).
    """
    mode = options.mode
    if mode not in JOINT_MODES:
        raise OnnxlrfError(f"unknown joint mode {mode!r}; known: {', '.join(JOINT_MODES)}")
    cost = cost_model(reference, options.target, cost)
    progress = as_progress(progress)
    rank_multiple = options.rank_multiple or 1

    improve_each = refit and calib is not None and technique.improves_every_plan
    improved: dict = {}  # by the plan's signature: a plan proposed again is not improved again

    def propose_plain(kappa: float, size: float | None = None) -> Plan:  # as the planner gives it, not improved
        return plan_joint(reference, technique, analysis, mode if size is None else "lossless",
                          target_reduction=options.target_reduction if size is None else size,
                          tolerance=options.tolerance, kappa=kappa, solver=options.solver, target=options.target,
                          cost=cost, rank_multiple=rank_multiple)

    def propose(kappa: float, size: float | None) -> Plan:
        plan = propose_plain(kappa, size)
        if size is not None:  # planned as lossless at that size, chosen as compact
            plan = dataclasses.replace(plan, mode=mode, options={**plan.options, "size_search": True})
        if improve_each:
            key = technique.signature(plan, analysis, kappa)
            if key not in improved:
                improved[key] = technique.improve(reference, plan, calib, progress=progress) or plan
            plan = _as_improved(plan, improved[key])
        return plan

    allowance = metric_allowance(val, options)
    evaluator = ValidationEvaluator(reference, val, technique, cost, provider, progress, reference_score, allowance)
    if mode == "lossless" and hasattr(cost, "time_plan"):
        calibrate_on_plans(lambda: propose_plain(1.0), evaluator, options.target_reduction, progress)
    baselines = ()
    if mode == "lossless" and (uniform := uniform_baseline(reference, technique, analysis, options, cost)) is not None:
        # Improved, the uniform plan is also one of the technique's plans: both are verified, validation decides.
        improved_uniform = technique.improve(reference, uniform, calib, progress=progress) if improve_each else None
        baselines = (uniform,) if improved_uniform is None else (uniform, dataclasses.replace(
            improved_uniform, options={**improved_uniform.options,
                                       "baseline": f"{uniform.options['baseline']}, {technique.improvement}"}))
    select = lossless_selection(select, val, mode)
    search = BackoffSearch(propose, evaluator, mode, lambda plan, kappa: technique.signature(plan, analysis, kappa),
                           progress, allowance=allowance, rule=rule, baselines=baselines, select=select)
    best = search.run()
    reference_val = search.reference
    if best is None and mode == "lossless":
        raise search.unreachable
    failing = search.failing() if mode == "compact" else []
    attempts = search.attempts
    if mode == "compact":
        holding = best.plan if best is not None else plan_joint(
            reference, technique, analysis, mode, tolerance=-math.inf, solver=options.solver, target=options.target,
            cost=cost, rank_multiple=rank_multiple)  # no compression: the smallest plan that holds
        restored = None if calib is None else _restore_smallest_failing(
            reference, failing, holding, calib, evaluator, technique, cost, progress, search.accepts)
        if restored is not None:
            restored.attempt = Attempt.of(restored.plan, restored=len(restored.plan.options["restored"]["layers"]),
                                          val=restored.value)
            best = restored
            attempts.append(restored.attempt)
    if refit and calib is not None and not improve_each:
        best = refit_chosen(reference, best, failing, calib, evaluator, technique, progress, attempts,
                            search.accepts if mode == "compact" else None, select) or best
    if best is None:  # compact, and no plan held on validation: no compression is the smallest safe plan
        progress.log("back-off: no plan held on validation; the model stays dense")
        compressed, report = technique.rewrite(reference, holding, progress=progress)
        best = Verified(reference_val, holding, compressed, report, None, search.reference_score)
    else:
        best.attempt.chosen = True
        set_back = best.plan.options.get("restored")
        progress.log(f"back-off chose {plan_label(best.plan)}"
                     + (f" with {len(set_back['layers'])} layers set back" if set_back else "")
                     + (" refit" if best.plan.options.get("refit") else "")
                     + f": {reduction_text(best.plan)}, val {best.value:.4f} (original {reference_val:.4f})"
                     + (", the lowest validation loss" if select == "loss" else ""))
    best.plan.options["backoff"] = [attempt.to_dict() for attempt in attempts]
    best.plan.options["reference_val"] = reference_val
    if mode == "lossless":
        best.plan.options["select"] = select
    return BackoffResult(best.plan, best.model, best.report, attempts, best.value, search.reference_score,
                         best.score if best.attempt is not None else None)


def uniform_baseline(reference: onnx.ModelProto, technique: Technique, analysis: Any, options: PlanOptions,
                     cost: Any) -> Plan | None:
    """The first of the technique's uniform plans (:meth:`~onnxlrf.techniques.base.Technique.uniform_plans`, the
    least compressed first) that meets ``options.target_reduction`` in the cost's units, with the layers whose change
    saves nothing left as they are; None where none does.

    Lossless mode verifies it beside the knapsack's plans. It is a feasible point of the same knapsack that the
    predictions rank lower, and where they cannot tell plans apart it can be the better one: at 4 bits a weight
    ResNet-56's uniform plan scored above the loss-aware mixed plan on every split seed, and at 3 bits MiniLM's,
    rounded sequentially, above the mixed plan on every seed (README)."""
    layers = {layer.node: layer for layer in find_layers(reference)[0]}
    for plan in technique.uniform_plans(reference, analysis):
        # A layer whose change saves nothing in the target's units (under a latency target: not measured faster)
        # stays as it is, as the knapsack offers it nothing.
        entries = [technique.unplanned_entry(reference, layers[e.node], analysis, cost)
                   if e.changed and cost.dense([layers[e.node]]) <= e.planned_cost(cost, [layers[e.node]]) else e
                   for e in plan.layers]
        plan = with_sizes(reference, dataclasses.replace(plan, layers=entries), cost)
        if plan.options["achieved_reduction"] >= options.target_reduction:
            plan.options.update(target_reduction=options.target_reduction, target=cost.target, kappa=None,
                                predicted_dloss=None)
            plan.source = plan_source(reference)
            if cost.describe():
                plan.options["cost_model"] = cost.describe()
            return plan
    return None


# How many times a measured-latency cost is fitted again on the planner's own plan before the back-off.
PLAN_CALIBRATIONS = 2


def calibrate_on_plans(plan_at: Callable[[], Plan], evaluator: "ValidationEvaluator", target_reduction: float,
                       progress: Progress) -> None:
    """Fit a measured-latency cost (``evaluator.cost``) to the plans it makes, before the back-off verifies them.

    The cost's per-layer times carry one scale, fitted on a probe that changes every layer; a plan that changes
    some layers also pays for the conversions (and layout changes) between changed and unchanged neighbours, so
    it can run slower than predicted and miss ``target_reduction``. Up to :data:`PLAN_CALIBRATIONS` times, the
    plan ``plan_at()`` gives is rewritten and timed against the original; where it saves less than the target,
    the cost takes the scale fitted to it, and the next plan is made with that scale. A scale under which the
    target is out of reach is taken back (the back-off then reports the measured speed of its plans).
    """
    cost = evaluator.cost
    plan = plan_at()
    for _ in range(PLAN_CALIBRATIONS):
        predicted_saving = plan.options["achieved_reduction"] * cost.total()
        if predicted_saving <= 0:
            return
        measured, fitted = cost.time_plan(evaluator.rewrite(plan)[0], predicted_saving)
        if measured >= target_reduction or fitted == cost.scale:
            return
        scale = cost.scale
        cost.rescale(fitted, f"the plan predicted {plan.options['achieved_reduction']:.4f} faster measured "
                             f"{measured:.4f}")
        try:
            plan = plan_at()
        except OnnxlrfError:
            progress.log(f"latency: the target is out of reach at the plan's scale; the scale stays {scale:.2f}")
            cost.rescale(scale, "the target is out of reach at the plan's scale")
            return


def restore_layers(
    reference: onnx.ModelProto,
    failing: Plan,
    holding: Plan,
    calib: Any,
    evaluator: Any,
    technique: Technique,
    cost: Any,
    progress: ProgressLike = None,
    accepts: Callable[[Score], bool] | None = None,
) -> Verified | None:
    """METHOD.md 5: set ``failing``'s layers back to ``holding``'s entries, worst first, until validation holds.

    A layer's measured contribution is how much the loss on ``calib`` (the task's loss on its
    gold labels; label-free: the distance to the original's outputs) falls when that layer alone is set back: measured on data the check below does
    not see, so the validation split only verifies. It is measured in torch
    (:func:`~onnxlrf.measure.sensitivity.replacement_gains`: each set-back run starts at its layer) on
    the weights the plans produce (the technique's ``perturbed_weights``; low-rank refuses
    bias-corrected entries there); a weight shared by several layers is set back for all of them.
    Layers whose setting back lowers that loss are set back in that order, the validation metric
    (``evaluator``, see :class:`ValidationEvaluator`) re-checked after each, until the plan holds:
    ``accepts`` (the back-off's rule), by default :data:`~onnxlrf.verify.search.DEFAULT_ACCEPTANCE`
    against the evaluator's original and allowance. Returns the plan that holds, or None if none does.
    """
    progress = as_progress(progress)
    required = evaluator.required_value()
    accepts = accepts or DEFAULT_ACCEPTANCE.check_against(evaluator.reference_score(), evaluator.allowance)
    before = {entry.node: entry for entry in holding.layers}
    differing = [e.node for e in failing.layers if e.size_key() != before[e.node].size_key()]
    if len(differing) < 2:
        return None
    layers = {layer.node: layer for layer in find_layers(reference)[0]}
    held = technique.perturbed_weights(reference, holding)
    gains = replacement_gains(
        technique.perturbed_weights(reference, failing),
        {node: {layers[node].weight: weight_array(held, layers[node])} for node in differing},
        calibration_batches(calib, calib.labels, range_batch_size(reference, calib), reference),
        task_loss(calib),
        progress, f"back-off: measure each layer's contribution ({len(differing)} layers)")
    order = sorted((node for node in differing if gains[node] > 0), key=lambda node: -gains[node])
    progress.log(f"back-off: restoring the layers of the smallest failing plan ({len(differing)} differ from "
                 f"the plan that holds), worst measured first: "
                 + ", ".join(f"{node} ({-gains[node]:+.3g} calibration loss)" for node in order[:5])
                 + (" ..." if len(order) > 5 else ""))
    for count in range(1, min(len(order), len(differing) - 1) + 1):  # all of them set back is ``holding``
        plan = _set_back(reference, failing, holding, frozenset(order[:count]), cost)
        compressed, report = technique.rewrite(reference, plan)
        score = evaluator.score(compressed, f"validate with {count} layers set back")
        held = accepts(score)
        progress.log(f"  {count} set back: {reduction_text(plan)}, val {score.value:.4f} "
                     f"({'original' if not evaluator.allowance else 'required'} {required:.4f}): "
                     f"{'holds' if held else 'rejected'}")
        if held:
            return Verified(score.value, plan, compressed, report, None, score)
    return None


def _restore_smallest_failing(reference: onnx.ModelProto, failing: list[Plan], holding: Plan, calib: Any,
                              evaluator: ValidationEvaluator, technique: Technique, cost: Any,
                              progress: Progress, accepts: Callable[[Score], bool]) -> Verified | None:
    """:func:`restore_layers` on the smallest failing plan larger than ``holding``, if the result is larger
    than ``holding`` too (and, under a latency target, measured faster than the original)."""
    size = holding.options["achieved_reduction"]
    larger = [plan for plan in failing if plan.options["achieved_reduction"] > size]
    if not larger:
        return None
    smallest = min(larger, key=lambda plan: plan.options["achieved_reduction"])
    restored = restore_layers(reference, smallest, holding, calib, evaluator, technique, cost, progress, accepts)
    if restored is None or restored.plan.options["achieved_reduction"] <= size:
        return None
    speedup = evaluator.speedup(restored.model)
    if speedup is not None and speedup <= 1.0:
        progress.log(f"  measured {speedup:.2f}x the original's speed: rejected")
        return None
    return restored


def refit_chosen(reference: onnx.ModelProto, best: Verified | None, failing: list[Plan], calib: Any,
                 evaluator: Any, technique: Technique, progress: Progress, attempts: list[Attempt],
                 accepts: Callable[[Score], bool] | None = None, select: str = "metric") -> Verified | None:
    """The back-off's choice improved by the technique (low-rank: refit factors), where validation says it is better.

    The refit undoes how the earlier layers' truncations change a layer's inputs, the
    wanted changes too: it helps where truncation error compounds and can hurt where the
    joint plan gains by its drops (ResNet-56 at 10% fewer parameters), so validation decides.
    lossless: the chosen plan refit, if it scores better by ``select``
    (:func:`~onnxlrf.verify.search.selection_key`; a tie keeps the plan: on ResNet-56's compact plan a tie on
    validation lost 0.8 points held-out). compact: first the plans that failed and are larger than the chosen one,
    smallest first, for as long as each holds once refit; then, if none did, the chosen plan refit (unless it
    factorizes nothing), if it scores better.
    Under a latency target, a refit plan must also be measured faster than the original. An
    improvement that adds parameters the plan does not count (a refit bias change on a layer whose
    bias cannot take it becomes a new bias) is rejected before validation: lossless plans keep their size.
    ``accepts`` (compact: the back-off's rule): a refit plan must also hold by it. Each attempt is
    appended to ``attempts``; returns the one kept, or None.
    """
    required = evaluator.required_value()

    def attempt(plan: Plan, bar: float, description: str, strictly: bool = False,
                by: str = "metric") -> Verified | None:
        """``plan`` improved and scored; kept where its :func:`selection_key` by ``by`` reaches ``bar`` (``strictly``:
        exceeds it) and ``accepts`` it."""
        improved = technique.improve(reference, plan, calib, progress=progress)
        if improved is None:  # the same plan: already judged
            progress.log(f"  {description}: nothing to improve (none of its changed layers can be)")
            return None
        compressed, report = technique.rewrite(reference, improved, progress=progress)
        added = report.params_after - (report.params_before - plan.summary()["params_removed"])
        if added > 0:  # e.g. a refit bias change on a layer with no bias to fold it into
            progress.log(f"  {description} refit: adds {added:,} parameters the plan does not count: rejected")
            return None
        score = evaluator.score(compressed, f"validate {description} refit")
        value = score.value
        record = Attempt.of(plan, refit=True, val=value)
        change = paired_loss_change(score, evaluator.reference_score())
        if change is not None:
            record.loss_change, record.loss_se = change
        attempts.append(record)
        key = selection_key(score, by)
        holds = (key > bar if strictly else key >= bar) and (accepts is None or accepts(score))
        if holds:
            record.speedup = evaluator.speedup(compressed)
            holds = record.speedup is None or record.speedup > 1.0
        by_loss = by == "loss" and score.losses is not None
        sign = -1.0 if by_loss else 1.0  # the key of a loss is its negative
        progress.log(f"  {description} refit: {'validation loss' if by_loss else 'val'} {sign * key:.4f} (needs "
                     f"{('below ' if strictly else 'at most ') if by_loss else ('more than ' if strictly else '')}"
                     f"{sign * bar:.4f}): {'kept' if holds else 'rejected'}")
        return Verified(value, improved, compressed, report, record, score) if holds else None

    chosen = None
    size = best.plan.options["achieved_reduction"] if best is not None else 0.0
    for plan in sorted((p for p in failing if p.options["achieved_reduction"] > size),
                       key=lambda p: p.options["achieved_reduction"]):
        result = attempt(plan, required, f"the failing plan of kappa {plan.options['kappa']:.3g} "
                                              f"({reduction_text(plan)})")
        if result is None:
            break
        chosen = result
    if chosen is None and best is not None and best.plan.options["achieved_reduction"] > 0:
        by = select if best.score is not None and best.score.losses is not None else "metric"
        bar = selection_key(best.score, by) if best.score is not None else best.value
        chosen = attempt(best.plan, bar, f"the chosen plan ({reduction_text(best.plan)})", strictly=True, by=by)
    return chosen


def _as_improved(plan: Plan, improved: Plan) -> Plan:
    """``plan`` with the choices and stored arrays of ``improved`` (the same plan improved, possibly proposed at
    another kappa): its own notes and options, and what the improvement recorded in its options."""
    by_node = {entry.node: entry for entry in improved.layers}
    layers = [dataclasses.replace(by_node[entry.node], notes=entry.notes) for entry in plan.layers]
    return dataclasses.replace(plan, layers=layers, bases=improved.bases, options={**improved.options, **plan.options})


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
    return with_sizes(reference, plan, cost)


def with_sizes(reference: onnx.ModelProto, plan: Plan, cost: Any) -> Plan:
    """``plan`` with its reductions (parameters, and in ``cost``'s units) counted from its entries."""
    layers = {layer.node: layer for layer in find_layers(reference)[0]}
    saved = sum(cost.dense([layers[e.node]]) - e.planned_cost(cost, [layers[e.node]]) for e in plan.layers if e.changed)
    params = plan.summary()["params_removed"] / max(count_params(reference), 1)
    plan.options["params_reduction"] = params
    plan.options["achieved_reduction"] = params if cost.target == "params" else saved / cost.total()
    return plan
