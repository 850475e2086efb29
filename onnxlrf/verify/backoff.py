"""The back-off (METHOD.md 5): verify plans on the validation split, trusting the curvature less each time.

Also the steps around it: restoring the worst layers of a failing plan, refitting the chosen
plan's factors, and merging the plans of several rounds.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import onnx

from ..costs.params import cost_model
from ..errors import OnnxlrfError
from ..graph.layers import count_params, find_layers, weight_array
from ..measure.analysis import calibration_batches, range_batch_size
from ..planning.plan import Plan
from ..progress import Progress, ProgressLike, as_progress
from ..runtime.evaluate import model_metric
from ..techniques.lowrank.planners import JOINT_MODES, plan_joint
from ..techniques.lowrank.rewrite import RewriteReport, apply_plan, truncate_weights

# Curvature multipliers tried in turn by the back-off (METHOD.md section 5): each
# trusts the quadratic model less, so plans get more conservative.
BACKOFF_KAPPAS = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0)


BACKOFF_BISECTIONS = 3


# Compact mode's size search (used when no component is free at the tolerance) starts here
# and doubles until a plan fails on validation.
SIZE_SEARCH_START = 0.01


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
    the target size. ``refit`` (needs ``calib``): then :func:`refit_chosen`.
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
                progress.log(f"  kappa {kappa:.3g}: {reduction_text(plan)} predicted, measured "
                             f"{entry['speedup']:.2f}x the original's speed: rejected")
                attempts.update()
                return None
        value = entry["val"] = model_metric(compressed, val, provider, progress,
                                       f"validate the plan at kappa {kappa:.3g}")
        attempts.update()
        summary = (f"  kappa {kappa:.3g}{label}: {reduction_text(plan)}, "
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
            reference_val = model_metric(reference, val, provider, progress, "the original on validation")
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
        refitted = refit_chosen(reference, best, failing, calib, val, reference_val, measure_speed, cost,
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
                     + f": {reduction_text(best[1])}, val {best[0]:.4f} (original {reference_val:.4f})")
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
    (:func:`~onnxlrf.measure.sensitivity.replacement_gains`: each set-back run starts at its layer) on the
    plans' dense truncated weights (:func:`~onnxlrf.techniques.lowrank.rewrite.truncate_weights`, which refuses
    bias-corrected entries); a weight shared by several layers is set back for all of them.
    Layers whose setting back lowers that loss are set back in that order, the validation metric
    re-checked after each, until it is at least ``reference_val``. Returns (metric, plan, model,
    report), or None if it never is.
    """
    from ..measure.sensitivity import LOSSES, replacement_gains

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
        value = model_metric(compressed, val, provider, progress, f"validate with {count} layers set back")
        held = value >= reference_val
        progress.log(f"  {count} set back: {reduction_text(plan)}, val {value:.4f} "
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


def refit_chosen(reference: onnx.ModelProto, best: tuple | None, failing: list[Plan], calib: Any, val: Any,
                  reference_val: float, measure_speed: bool, cost: Any, provider: str, progress: Progress,
                  backoff: list) -> tuple[float, Plan, onnx.ModelProto, RewriteReport, dict] | None:
    """The back-off's choice refit (:func:`onnxlrf.techniques.lowrank.refit.refit_plan`), where validation says it is better.

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
    from ..techniques.lowrank.refit import refit_plan

    def attempt(plan: Plan, bar: float, description: str, strictly: bool = False) -> tuple | None:
        refit, summary = refit_plan(reference, plan, calib, progress=progress)
        if not summary["refit"]:  # the same plan: already judged
            progress.log(f"  {description}: nothing to refit (its factorized layers are spatial or share weights)")
            return None
        compressed, report = apply_plan(reference, refit, progress=progress)
        value = model_metric(compressed, val, provider, progress, f"validate {description} refit")
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
                                              f"({reduction_text(plan)})")
        if result is None:
            break
        chosen = result
    if chosen is None and best is not None and best[1].options["achieved_reduction"] > 0:
        chosen = attempt(best[1], best[0], f"the chosen plan ({reduction_text(best[1])})", strictly=True)
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
    return with_sizes(reference, plan, cost)


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
        if entry.decomposition == "dense" and prior.decomposition != "dense":
            merged.layers[i] = prior
            if prior.weight in earlier.bases:
                merged.bases[prior.weight] = earlier.bases[prior.weight]
    return with_sizes(reference, merged, cost)


def with_sizes(reference: onnx.ModelProto, plan: Plan, cost: Any) -> Plan:
    """``plan`` with its reductions (parameters, and in ``cost``'s units) counted from its entries."""
    layers = {layer.node: layer for layer in find_layers(reference)[0]}
    saved = sum(cost.dense([layers[e.node]]) - cost.factorized([layers[e.node]], e.decomposition, e.rank)
                for e in plan.layers if e.decomposition != "dense")
    params = plan.summary()["params_removed"] / max(count_params(reference), 1)
    plan.options["params_reduction"] = params
    plan.options["achieved_reduction"] = params if cost.target == "params" else saved / cost.total()
    return plan


def reduction_text(plan: Plan) -> str:
    """The plan's size in its target's words, e.g. '12.0% fewer parameters' or '30.1% less latency'."""
    target = plan.options.get("target", "params")
    reduction = plan.options["achieved_reduction"]
    if target == "params":
        return f"{reduction:.1%} fewer parameters"
    return f"{reduction:.1%} less {'latency' if target == 'latency' else 'FLOPs'}"
