"""Low-rank planners: per layer, which decomposition and which singular components to keep.

The data-free baselines (uniform rank fraction, energy threshold, full rank), the joint
planner over an analysis (METHOD.md section 4) and the data-aware baseline bases. None of them
emits a factorization that is not smaller than dense.

Whole-model targets (``target_reduction``) are fractions of the cost model's total
(parameters by default). Rule used by the data-free planners: among the plans the knob
(rank fraction or energy) can produce, pick the one that keeps the most
(largest fraction / energy) while removing at least ``target_reduction``;
i.e. the achieved reduction is the smallest achievable one that is
``>= target_reduction``. The knob's plans change only at finitely many
break points, so the search is an exact bisection over them.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import onnx

from ...costs.params import cost_model, cost_units
from ...errors import OnnxlrfError
from ...graph.layers import (
    Layer,
    count_params,
    find_layers,
    weight_array,
    weight_groups,
    weight_matrices,
)
from ...graph.linalg import singular_values, svd
from ...measure.coverage import analysis_exclusion
from ...planning.joint import plan_source
from ...planning.knapsack import CandidateSet
from ...planning.plan import LowRankEntry, Plan
from ...progress import ProgressLike, as_progress
from ..base import Candidates


@dataclass
class _Candidate:
    """One weight group's choice as a function of the planner's knob."""

    layers: list[Layer]
    choose: Callable[[float], tuple[str, int] | None]  # knob -> (decomposition, rank) or None (dense)
    breakpoints: list[float]
    dense_reason: str | None = None


def check_rank_multiple(rank_multiple: int) -> None:
    if not isinstance(rank_multiple, int) or isinstance(rank_multiple, bool) or rank_multiple < 1:
        raise OnnxlrfError(f"rank_multiple must be an integer >= 1, got {rank_multiple!r}")


def _round_up_rank(rank: int, multiple: int, max_rank: int) -> int:
    """``rank`` rounded up to a multiple of ``multiple``; ``max_rank`` is allowed when no multiple fits below it."""
    return min(max_rank, -(-rank // multiple) * multiple)


def _best(layers: list[Layer], ranks: dict[str, int], cost: Any) -> tuple[str, int] | None:
    """The cheapest decomposition (in ``cost``) among those with fewer parameters than dense that
    also cost less than dense; None if there is none."""
    layer = layers[0]
    dense = cost.dense(layers)
    options = [(cost.factorized(layers, d, r), layer.factorized_params(d, r), d, r) for d, r in ranks.items()
               if layer.factorized_params(d, r) < layer.params]
    options = [option for option in options if option[0] < dense]
    if not options:
        return None
    _, _, decomposition, rank = min(options)
    return decomposition, rank


def _build_plan(model: onnx.ModelProto, candidates: list[_Candidate], knob: float, mode: str, options: dict,
                note_key: str, cost: Any) -> Plan:
    entries = []
    saved = 0.0
    for cand in candidates:
        choice = None if cand.dense_reason else cand.choose(knob)
        if choice is not None:
            saved += cost.dense(cand.layers) - cost.factorized(cand.layers, *choice)
        for layer in cand.layers:
            if choice is None:
                reason = cand.dense_reason or (
                    "factorized form would not be smaller than dense" if cost.target == "params" else
                    f"no factorized form at this setting is smaller and has lower {cost.target} than dense")
                entries.append(LowRankEntry(layer.node, layer.op_type, layer.weight, list(layer.weight_shape), "dense",
                                         None, layer.max_rank("channel"), None, layer.params, layer.params,
                                         {note_key: knob, "reason": reason, **cost.notes(layer, None, None)}))
            else:
                decomposition, rank = choice
                entries.append(LowRankEntry(layer.node, layer.op_type, layer.weight, list(layer.weight_shape),
                                         decomposition, rank, layer.max_rank(decomposition), None, layer.params,
                                         layer.factorized_params(decomposition, rank),
                                         {note_key: knob, **cost.notes(layer, decomposition, rank)}))
    plan = Plan(layers=entries, mode=mode, options=dict(options), source=plan_source(model))
    params_reduction = plan.summary()["params_removed"] / max(count_params(model), 1)
    plan.options["target"] = cost.target
    plan.options["achieved_reduction"] = params_reduction if cost.target == "params" else saved / cost.total()
    plan.options["params_reduction"] = params_reduction
    if cost.describe():
        plan.options["cost_model"] = cost.describe()
    return plan


def _search(model: onnx.ModelProto, candidates: list[_Candidate], target: float, cost: Any) -> float:
    """The largest knob value whose plan removes at least ``target`` of the model's cost."""
    if not 0 < target < 1:
        raise OnnxlrfError(f"target_reduction must be in (0, 1), got {target}")
    total = cost_units(cost, cost.total())

    def removed(knob: float) -> int:
        saved = 0
        for cand in candidates:
            choice = None if cand.dense_reason else cand.choose(knob)
            if choice is not None:
                saved += cost_units(cost, cost.dense(cand.layers) - cost.factorized(cand.layers, *choice))
        return saved

    knobs = sorted({k for cand in candidates if not cand.dense_reason for k in cand.breakpoints})
    need = math.ceil(target * total - 1e-9)
    if not knobs or removed(knobs[0]) < need:
        best = removed(knobs[0]) / total if knobs else 0.0
        raise OnnxlrfError(
            f"target_reduction {target:g} is out of reach: factorizing every layer removes at most {best:.4f}"
            + ("" if cost.target == "params" else f" of the model's {cost.target}")
        )
    # removed() is non-increasing in the knob: bisect for the last knob that still removes enough.
    lo = bisect.bisect_right(range(len(knobs)), False, key=lambda i: removed(knobs[i]) < need)
    return knobs[lo - 1]


def plan_uniform(model: onnx.ModelProto, rank_fraction: float | None = None,
                 target_reduction: float | None = None, target: str = "params", rank_multiple: int = 1,
                 cost: Any = None) -> Plan:
    """Keep ``ceil(rank_fraction * max_rank)`` top components in every layer (rounded up to a multiple of
    ``rank_multiple``), in the decomposition of lowest ``target`` cost; a layer whose factorized form
    would not be smaller and cheaper than dense stays dense.

    With ``target_reduction`` (a fraction of the model's ``target`` cost), the fraction is
    chosen by the module's rule. ``cost``: a prepared cost model (see :func:`cost_model`).
    """
    if (rank_fraction is None) == (target_reduction is None):
        raise OnnxlrfError("plan_uniform needs exactly one of rank_fraction or target_reduction")
    if rank_fraction is not None and not 0 < rank_fraction <= 1:
        raise OnnxlrfError(f"rank_fraction must be in (0, 1], got {rank_fraction}")
    check_rank_multiple(rank_multiple)
    cost = cost_model(model, target, cost)
    layers, _ = find_layers(model)
    groups, dense_reason = weight_groups(model, layers)
    candidates = []
    for members in groups:
        layer = members[0]

        def choose(fraction: float, members: list[Layer] = members) -> tuple[str, int] | None:
            return _best(members, {d: _rank_for_fraction(fraction, members[0].max_rank(d), rank_multiple)
                                   for d in members[0].decompositions}, cost)

        breakpoints = sorted({k / layer.max_rank(d) for d in layer.decompositions
                              for k in range(1, layer.max_rank(d) + 1)})
        candidates.append(_Candidate(members, choose, breakpoints, dense_reason.get(layer.weight)))
    options: dict = {"rank_fraction": rank_fraction, "target_reduction": target_reduction,
                     "rank_multiple": rank_multiple}
    if target_reduction is not None:
        rank_fraction = _search(model, candidates, target_reduction, cost)
        options["rank_fraction"] = rank_fraction
    return _build_plan(model, candidates, rank_fraction, "uniform", options, "rank_fraction", cost)


def _rank_for_fraction(fraction: float, max_rank: int, multiple: int = 1) -> int:
    # The tolerance keeps k/max_rank itself from rounding up to k+1.
    return _round_up_rank(max(1, math.ceil(fraction * max_rank - 1e-9)), multiple, max_rank)


def plan_energy(model: onnx.ModelProto, energy: float | None = None,
                target_reduction: float | None = None, progress: ProgressLike = None, target: str = "params",
                rank_multiple: int = 1, cost: Any = None) -> Plan:
    """Per layer, the smallest rank whose share of squared singular values is >= ``energy``
    (rounded up to a multiple of ``rank_multiple``), in the decomposition of lowest ``target`` cost.

    Grouped convs share one rank: the share is taken over all groups together.
    With ``target_reduction`` (a fraction of the model's ``target`` cost), the energy
    is chosen by the module's rule.
    """
    if (energy is None) == (target_reduction is None):
        raise OnnxlrfError("plan_energy needs exactly one of energy or target_reduction")
    if energy is not None and not 0 < energy <= 1:
        raise OnnxlrfError(f"energy must be in (0, 1], got {energy}")
    check_rank_multiple(rank_multiple)
    cost = cost_model(model, target, cost)
    layers, _ = find_layers(model)
    groups, dense_reason = weight_groups(model, layers)
    candidates = []
    for members in as_progress(progress).track(groups, "energy plan: singular values", unit="weight"):
        layer = members[0]
        weight = weight_array(model, layer)
        shares = {d: _energy_shares(weight_matrices(weight, layer, d)) for d in layer.decompositions}

        def choose(level: float, members: list[Layer] = members, shares: dict = shares) -> tuple[str, int] | None:
            ranks = {d: _round_up_rank(min(int(np.searchsorted(cum, level, side="left")) + 1, len(cum)),
                                       rank_multiple, len(cum)) for d, cum in shares.items()}
            return _best(members, ranks, cost)

        breakpoints = sorted({float(v) for cum in shares.values() for v in cum if v > 0})
        candidates.append(_Candidate(members, choose, breakpoints, dense_reason.get(layer.weight)))
    options: dict = {"energy": energy, "target_reduction": target_reduction, "rank_multiple": rank_multiple}
    if target_reduction is not None:
        energy = _search(model, candidates, target_reduction, cost)
        options["energy"] = energy
    return _build_plan(model, candidates, energy, "energy", options, "energy", cost)


def _energy_shares(matrices: np.ndarray) -> np.ndarray:
    """Cumulative share of squared singular values by rank (summed over groups)."""
    power = (singular_values(matrices) ** 2).sum(axis=0)
    total = power.sum()
    if total == 0:
        return np.ones_like(power)
    return np.cumsum(power) / total


def plan_full_rank(model: onnx.ModelProto, decomposition: str = "channel") -> Plan:
    """Every layer at its maximum rank (for exactness checks; apply with ``keep_dense_if_larger=False``).

    Layers where ``decomposition`` is not available use ``channel``.
    """
    if decomposition not in ("channel", "spatial"):
        raise OnnxlrfError(f"unknown decomposition {decomposition!r} (known: channel, spatial)")
    layers, _ = find_layers(model)
    entries = []
    for layer in layers:
        d = decomposition if decomposition in layer.decompositions else "channel"
        rank = layer.max_rank(d)
        entries.append(LowRankEntry(layer.node, layer.op_type, layer.weight, list(layer.weight_shape), d, rank, rank,
                                 None, layer.params, layer.factorized_params(d, rank)))
    return Plan(layers=entries, mode="full-rank", options={"decomposition": decomposition}, source=plan_source(model))


@dataclass
class JointOption:
    """What a candidate of the joint planner truncates: one decomposition's analysis of a layer, at a rank."""

    analysis: Any  # a LayerSensitivity
    rank: int
    relative_error: float


def joint_candidates(model: onnx.ModelProto, sens: Any, kappa: float, cost: Any,
                     rank_multiple: int = 1) -> list[Candidates]:
    """Per analyzed weight group, in each analyzed decomposition: ranks below break-even, multiples of
    ``rank_multiple``, inside that decomposition's trusted range and (for flops/latency) cheaper than dense.

    A weight shared by several nodes, or also read by a node that stays dense, is one group with
    no option but dense: the analysis measures each node's use of it on its own, so it cannot predict
    a truncation of all of them (the data-free planners factorize such weights).
    """
    check_rank_multiple(rank_multiple)
    layers = [sens.layers[node].layer for node in sens.layers]
    groups, shared_reason = weight_groups(model, layers)
    by_cost = cost.target != "params"
    out = []
    for members in groups:
        layer = members[0]
        dense = cost.dense([layer]) if by_cost else None
        removed, dloss, sources = [0], [0.0], [None]
        reason = shared_reason.get(layer.weight) or (
            "weight shared by several nodes, which the analysis measures one by one" if len(members) > 1 else None)
        for ls in ([] if reason else sens.candidates(layer.node)):
            decomposition = ls.decomposition
            predicted, rel = ls.predicted_dloss(kappa), ls.relative_error()
            allowed = [r for r in range(rank_multiple, layer.break_even_rank(decomposition) + 1, rank_multiple)
                       if rel[r] <= ls.perturbation_range]
            if not by_cost:
                saved = [layer.params - layer.factorized_params(decomposition, r) for r in allowed]
            else:
                saved = [cost_units(cost, dense - cost.factorized([layer], decomposition, r)) for r in allowed]
            for r, units in zip(allowed, saved):
                if units > 0:
                    removed.append(units)
                    dloss.append(predicted[r])
                    sources.append(JointOption(ls, r, float(rel[r])))
        out.append(Candidates(members, CandidateSet(np.array(removed, dtype=np.int64), np.array(dloss),
                                                    key=layer.weight), sources, reason))
    return out


def joint_entries(model: onnx.ModelProto, sens: Any, group: Candidates, option: int,
                  cost: Any) -> tuple[list[LowRankEntry], dict]:
    """The entries of ``group``'s members at ``option`` (0: dense), and the joint basis they store."""
    if option == 0:
        reason = group.reason or _dense_reason(group)
        return [_dense_entry(layer, reason, sens, cost) for layer in group.layers], {}
    chosen = group.sources[option]
    ls, rank = chosen.analysis, chosen.rank
    decomposition = ls.decomposition
    entries = [LowRankEntry(layer.node, layer.op_type, layer.weight, list(layer.weight_shape), decomposition, rank,
                            layer.max_rank(decomposition), None, layer.params,
                            layer.factorized_params(decomposition, rank),
                            {"predicted_dloss": float(group.options.dloss[option]),
                             "relative_error": chosen.relative_error,
                             "perturbation_range": ls.perturbation_range,
                             "curvature_scale": ls.curvature_scale, "range_checks": _range_checks(ls),
                             **cost.notes(layer, decomposition, rank)},
                            basis="joint", bias_correction=ls.input_mean is not None)
               for layer in group.layers]
    return entries, {group.layers[0].weight: ls.stored_basis()}


def _dense_entry(layer: Layer, reason: str, sens: Any, cost: Any) -> LowRankEntry:
    notes = {"reason": reason}
    if layer.node in sens.layers:
        notes["range_checks"] = _range_checks(sens.layers[layer.node])
    notes.update(cost.notes(layer, None, None))
    return LowRankEntry(layer.node, layer.op_type, layer.weight, list(layer.weight_shape), "dense", None,
                        layer.max_rank("channel"), None, layer.params, layer.params, notes)


def unplanned_entry(layer: Layer, sens: Any, cost: Any) -> LowRankEntry:
    """The dense entry of a layer the analysis did not cover."""
    return _dense_entry(layer, analysis_exclusion(layer) or sens.left_out.get(layer.node) or "not analyzed", sens,
                        cost)


def _range_checks(ls: Any) -> list[dict]:
    """The measured single-layer truncations (rank, predicted at kappa 1, measured, agree) for the plan's notes."""
    return [{key: check[key] for key in ("rank", "relative_error", "predicted", "measured", "agree")}
            for check in ls.range_checks if "predicted" in check]


def _dense_reason(group: Candidates) -> str:
    """Why the joint planner left a group dense."""
    if len(group.sources) == 1:
        return "no rank below break-even lies inside the layer's trusted perturbation range"
    return "kept dense by the planner: its allowed ranks cost more predicted loss per parameter than the plan affords"


def baseline_basis(ls: Any, kind: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(x, s, y^T) with ``W = x diag(s) y^T``, components by decreasing s, for a baseline basis.

    ``fwsvd``: SVD of ``diag(sqrt(I)) W`` with ``I`` the Fisher information of each output row
    (Hsu et al. 2022); ``whitened``: SVD of ``W A^(1/2)`` with ``A`` the input-activation
    second moment (as SVD-LLM and ASVD do). Truncation then drops the smallest s.
    """
    w = ls.reconstruct(np.tile(np.arange(ls.s.shape[1]), (ls.s.shape[0], 1)))
    if kind == "fwsvd":
        row = np.sqrt(ls.output_fisher) + 1e-6 * np.sqrt(ls.output_fisher).max()  # dead rows: keep finite
        u, s, vh = svd(row[:, :, None] * w)
        return (u / row[:, :, None], s, vh)
    if kind == "whitened":
        root, inv_root = ls.input_whitening()
        u, s, vh = svd(w @ root)
        return (u, s, vh @ inv_root)
    raise OnnxlrfError(f"unknown baseline basis {kind!r}; known: fwsvd, whitened")


def plan_baseline(model: onnx.ModelProto, sensitivity: Any, kind: str, target_reduction: float,
                  target: str = "params", rank_multiple: int = 1, cost: Any = None) -> Plan:
    """Uniform rank fraction (channel decomposition) in a baseline basis, the fraction bisected to the target
    (a fraction of the model's ``target`` cost); ranks rounded up to multiples of ``rank_multiple``."""
    check_rank_multiple(rank_multiple)
    cost = cost_model(model, target, cost)
    analyzed = {ls.layer.node: ls for ls in sensitivity.layers.values()}
    layers, _ = find_layers(model)
    groups, dense_reason = weight_groups(model, layers)
    candidates = []
    for members in groups:
        layer = members[0]
        reason = dense_reason.get(layer.weight) or (
            None if layer.node in analyzed else analysis_exclusion(layer) or "not analyzed")

        def choose(fraction: float, members: list[Layer] = members) -> tuple[str, int] | None:
            return _best(members, {"channel": _rank_for_fraction(fraction, members[0].max_rank("channel"),
                                                                 rank_multiple)}, cost)

        breakpoints = [k / layer.max_rank("channel") for k in range(1, layer.max_rank("channel") + 1)]
        candidates.append(_Candidate(members, choose, breakpoints, reason))
    fraction = _search(model, candidates, target_reduction, cost)
    plan = _build_plan(model, candidates, fraction, kind, {"target_reduction": target_reduction,
                                                          "rank_fraction": fraction, "rank_multiple": rank_multiple},
                       "rank_fraction", cost)
    for entry in plan.layers:
        if entry.decomposition != "dense":
            entry.basis = kind
            x, s, yt = baseline_basis(analyzed[entry.node], kind)
            plan.bases[entry.weight] = (x.astype(np.float32), s.astype(np.float32), yt.astype(np.float32))
    return plan
