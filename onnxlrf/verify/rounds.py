"""Several rounds of analysis and back-off: each round plans around the previous round's truncated weights."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import onnx

from ..errors import OnnxlrfError
from ..measure.analysis import AnalysisOptions
from ..planning.joint import plan_source
from ..planning.plan import Plan
from ..progress import Progress
from ..techniques import TECHNIQUES
from ..techniques.base import RewriteReport, Technique
from .backoff import (
    ValidationEvaluator,
    VerifyOptions,
    backoff_plan,
    metric_allowance,
    lossless_selection,
    refit_chosen,
    with_sizes,
)
from .search import Attempt, Verified
from .splits import Splits


@dataclass
class RoundsResult:
    """The plan after every round (for the original model), its model, and what each round did."""

    plan: Plan
    model: onnx.ModelProto
    report: RewriteReport
    attempts: list[Attempt]  # every round's, each with its round
    history: list[dict]  # per round: reduction so far, kappa and validation metric of its choice
    analysis: Any  # the last round's
    reference_value: float


def verify_in_rounds(reference: onnx.ModelProto, splits: Splits, options: Any, analysis_options: AnalysisOptions,
                     verify: VerifyOptions, cost: Any, provider: str, progress: Progress,
                     technique: Technique = TECHNIQUES["lowrank"]) -> RoundsResult:
    """Analysis on ``splits.calib`` and back-off on ``splits.val``, ``verify.rounds`` times.

    Round k > 1 analyzes the previous rounds' truncated weights, so its Taylor model sees what the
    earlier truncations did to the other layers. compact: until a round adds nothing that holds on
    validation (against the original's metric); lossless: round k aims at k/rounds of
    ``options.target_reduction`` (a :class:`~onnxlrf.planning.joint.PlanOptions`). ``verify.refit``:
    with one round the back-off's own refit step; with several, the final plan only.
    """
    rounds = verify.rounds
    if rounds < 1:
        raise OnnxlrfError(f"--rounds must be at least 1, got {rounds}")
    current, plan, reference_score, attempts, history = reference, None, None, [], []
    for index in range(rounds):
        if rounds > 1:
            progress.log(f"round {index + 1}/{rounds}" + ("" if index == 0 else ": around the truncated weights"))
        analysis = technique.analyse(current, splits.calib, analysis_options, progress)
        target = None if options.target_reduction is None else options.target_reduction * (index + 1) / rounds
        result = backoff_plan(current, analysis, splits.val, dataclasses.replace(options, target_reduction=target),
                              calib=splits.calib, refit=verify.refit and rounds == 1, reference_score=reference_score,
                              cost=cost, provider=provider, progress=progress, technique=technique,
                              rule=verify.acceptance, select=verify.select)
        reference_score = result.reference_score
        merged = merge_rounds(reference, plan, result.plan, cost)
        for attempt in result.attempts:
            attempt.round = index + 1
        attempts += result.attempts
        if plan is not None and options.mode == "compact" and \
                merged.options["achieved_reduction"] <= plan.options["achieved_reduction"]:
            progress.log(f"round {index + 1} added nothing that holds on validation; stopping")
            break
        plan, chosen_score = merged, result.score
        history.append({"round": index + 1, "achieved_reduction": plan.options["achieved_reduction"],
                        "params_reduction": plan.options["params_reduction"], "kappa": result.plan.options["kappa"],
                        "val": next((a.val for a in result.attempts if a.chosen), None)})
        if index + 1 < rounds:
            current = technique.perturbed_weights(reference, plan)
    plan.source = plan_source(reference)  # a later round's plan was made for truncated weights
    compressed, report = technique.rewrite(reference, plan, progress=progress)
    if verify.refit and rounds > 1 and plan.summary()["factorized"]:
        allowance = metric_allowance(splits.val, options)
        evaluator = ValidationEvaluator(reference, splits.val, technique, cost, provider, progress, reference_score,
                                        allowance)
        accepts = (verify.acceptance.check_against(reference_score, allowance) if options.mode == "compact"
                   else None)
        refits: list[Attempt] = []
        select = lossless_selection(verify.select, splits.val, options.mode)
        # The last round's back-off scored the merged plan's model (its weights carry the earlier rounds' choices).
        refitted = refit_chosen(reference, Verified(history[-1]["val"], plan, compressed, report, None, chosen_score),
                                [], splits.calib, evaluator, technique, progress, refits, accepts, select)
        for attempt in refits:
            attempt.round = len(history)
        attempts += refits
        if refitted is not None:
            plan, compressed, report = refitted.plan, refitted.model, refitted.report
            for attempt in attempts:  # the last round's choice is now the refit plan
                if attempt.round == len(history):
                    attempt.chosen = False
            refitted.attempt.chosen = True
    plan.options["backoff"] = [attempt.to_dict() for attempt in attempts]
    return RoundsResult(plan, compressed, report, attempts, history, analysis, reference_score.value)


def merge_rounds(reference: onnx.ModelProto, earlier: Plan | None, later: Plan, cost: Any) -> Plan:
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
        if not entry.changed and prior.changed:
            merged.layers[i] = prior
            if prior.weight in earlier.bases:
                merged.bases[prior.weight] = earlier.bases[prior.weight]
    return with_sizes(reference, merged, cost)
