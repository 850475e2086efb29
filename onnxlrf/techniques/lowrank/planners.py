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
from ...planning.plan import LayerPlan, Plan
from ...progress import ProgressLike, as_progress


@dataclass
class _Candidate:
    """One weight group's choice as a function of the planner's knob."""

    layers: list[Layer]
    choose: Callable[[float], tuple[str, int] | None]  # knob -> (decomposition, rank) or None (dense)
    breakpoints: list[float]
    dense_reason: str | None = None


def _check_rank_multiple(rank_multiple: int) -> None:
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
                entries.append(LayerPlan(layer.node, layer.op_type, layer.weight, list(layer.weight_shape), "dense",
                                         None, layer.max_rank("channel"), None, layer.params, layer.params,
                                         {note_key: knob, "reason": reason, **cost.notes(layer, None, None)}))
            else:
                decomposition, rank = choice
                entries.append(LayerPlan(layer.node, layer.op_type, layer.weight, list(layer.weight_shape),
                                         decomposition, rank, layer.max_rank(decomposition), None, layer.params,
                                         layer.factorized_params(decomposition, rank),
                                         {note_key: knob, **cost.notes(layer, decomposition, rank)}))
    plan = Plan(layers=entries, mode=mode, options=dict(options), source=_source(model))
    params_reduction = plan.summary()["params_removed"] / max(count_params(model), 1)
    plan.options["target"] = cost.target
    plan.options["achieved_reduction"] = params_reduction if cost.target == "params" else saved / cost.total()
    plan.options["params_reduction"] = params_reduction
    if cost.describe():
        plan.options["cost_model"] = cost.describe()
    return plan


def _source(model: onnx.ModelProto) -> dict:
    return {"graph": model.graph.name, "params": count_params(model)}


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
    _check_rank_multiple(rank_multiple)
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
    _check_rank_multiple(rank_multiple)
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
        entries.append(LayerPlan(layer.node, layer.op_type, layer.weight, list(layer.weight_shape), d, rank, rank,
                                 None, layer.params, layer.factorized_params(d, rank)))
    return Plan(layers=entries, mode="full-rank", options={"decomposition": decomposition}, source=_source(model))


JOINT_MODES = ("lossless", "compact")


SOLVERS = ("lagrangian", "dp")


@dataclass
class _Options:
    """One layer's candidates: cost removed (integer units of the target) and predicted loss change, dense first.

    ``sources[c]`` is the analysis (one decomposition of the layer) candidate ``c`` truncates; None: dense.
    """

    layer: Layer
    ranks: np.ndarray  # 0 = dense
    removed: np.ndarray
    dloss: np.ndarray
    relative_error: np.ndarray
    sources: list


def _joint_options(sens: Any, kappa: float, cost: Any = None, rank_multiple: int = 1) -> list[_Options]:
    """Per analyzed layer, in each analyzed decomposition: ranks below break-even, multiples of
    ``rank_multiple``, inside that decomposition's trusted range and (for flops/latency) cheaper than dense."""
    out = []
    for node in sens.layers:
        layer = sens.layers[node].layer
        dense = None if cost is None else cost.dense([layer])
        ranks, removed, dloss, rel_errors, sources = [0], [0], [0.0], [0.0], [None]
        for ls in sens.candidates(node):
            decomposition = ls.decomposition
            predicted, rel = ls.predicted_dloss(kappa), ls.relative_error(kappa)
            allowed = [r for r in range(rank_multiple, layer.break_even_rank(decomposition) + 1, rank_multiple)
                       if rel[r] <= ls.perturbation_range]
            if cost is None:
                saved = [layer.params - layer.factorized_params(decomposition, r) for r in allowed]
            else:
                saved = [cost_units(cost, dense - cost.factorized([layer], decomposition, r)) for r in allowed]
            for r, units in zip(allowed, saved):
                if units > 0:
                    ranks.append(r)
                    removed.append(units)
                    dloss.append(predicted[r])
                    rel_errors.append(rel[r])
                    sources.append(ls)
        out.append(_Options(layer, np.array(ranks, dtype=np.int64), np.array(removed, dtype=np.int64),
                            np.array(dloss), np.array(rel_errors), sources))
    return out


def _lagrangian(options: list[_Options], lam: float) -> list[int]:
    return [int(np.argmin(o.dloss - lam * o.removed)) for o in options]


def _totals(options: list[_Options], choice: list[int]) -> tuple[int, float]:
    return (sum(int(o.removed[c]) for o, c in zip(options, choice)),
            sum(float(o.dloss[c]) for o, c in zip(options, choice)))


def _solve_lagrangian(options: list[_Options], need: int | None, tolerance: float | None) -> list[int] | None:
    """Lossless (``need``: params to remove, min dL) or compact (``tolerance``: max dL, max removed)."""
    scale = max(max((float(np.abs(o.dloss).max()) for o in options), default=1.0), 1e-12)
    lo, hi = 0.0, scale * 1e6  # lambda in loss per parameter; hi removes all it can
    feasible = (lambda c: _totals(options, c)[0] >= need) if need is not None else \
        (lambda c: _totals(options, c)[1] <= tolerance)
    if need is not None:
        if not feasible(_lagrangian(options, hi)):
            return None
        for _ in range(200):  # smallest lambda that still removes enough
            mid = math.sqrt(lo * hi) if lo > 0 else hi * 1e-12
            lo, hi = (lo, mid) if feasible(_lagrangian(options, mid)) else (mid, hi)
            if hi - lo <= 1e-9 * hi:
                break
        return _lagrangian(options, hi)
    if not feasible(_lagrangian(options, 0.0)):
        return None
    for _ in range(200):  # largest lambda whose predicted change stays within tolerance
        mid = math.sqrt(lo * hi) if lo > 0 else hi * 1e-12
        lo, hi = (mid, hi) if feasible(_lagrangian(options, mid)) else (lo, mid)
        if hi - lo <= 1e-9 * hi:
            break
    return _lagrangian(options, lo)


def _solve_dp(options: list[_Options], need: int | None, tolerance: float | None, bins: int = 4000
              ) -> list[int] | None:
    """Exact multiple-choice knapsack over removed parameters counted in units (floor: never overstates)."""
    total = sum(int(o.removed.max()) for o in options)
    unit = max(1, math.ceil(total / bins))
    size = total // unit + 1
    best = np.full(size, np.inf)
    best[0] = 0.0
    picks = []
    for o in options:
        units = o.removed // unit
        new = np.full(size, np.inf)
        pick = np.zeros(size, dtype=np.int64)
        for c, (u, d) in enumerate(zip(units, o.dloss)):
            shifted = np.full(size, np.inf)
            shifted[u:] = best[: size - u] + d
            better = shifted < new
            new[better], pick[better] = shifted[better], c
        best = new
        picks.append(pick)
    if need is not None:
        reachable = [b for b in range(math.ceil(need / unit), size) if np.isfinite(best[b])]
        if not reachable:
            return None
        target = min(reachable, key=lambda b: best[b])
    else:
        ok = [b for b in range(size) if best[b] <= tolerance]
        if not ok:
            return None
        target = max(ok)
    choice = []
    for o, pick in zip(reversed(options), reversed(picks)):
        c = int(pick[target])
        choice.append(c)
        target -= int(o.removed[c] // unit)
    return choice[::-1]


def plan_joint(model: onnx.ModelProto, sensitivity: Any, mode: str, target_reduction: float | None = None,
               tolerance: float = 0.0, kappa: float = 1.0, solver: str = "lagrangian", target: str = "params",
               rank_multiple: int = 1, cost: Any = None) -> Plan:
    """Joint plan from a :class:`~onnxlrf.sensitivity.Sensitivity` (METHOD.md section 4).

    ``lossless``: minimum predicted loss change removing at least ``target_reduction``
    of the model's parameters. ``compact``: the most parameters removed with
    predicted loss change at most ``tolerance``. Only ranks inside each layer's
    perturbation range are candidates; within a layer, components are dropped
    in joint-score order. ``kappa`` multiplies the curvature term (back-off).
    ``target``: what ``target_reduction`` and "removed" are counted in (params, flops or
    measured latency; ``cost`` a prepared cost model); ranks are multiples of ``rank_multiple``.
    A layer analyzed in spatial decomposition too (``sensitivity.spatial``) has the candidates
    of both, and gets the one the knapsack prefers.
    """
    if mode not in JOINT_MODES:
        raise OnnxlrfError(f"unknown joint mode {mode!r}; known: {', '.join(JOINT_MODES)}")
    if solver not in SOLVERS:
        raise OnnxlrfError(f"unknown solver {solver!r}; known: {', '.join(SOLVERS)}")
    _check_rank_multiple(rank_multiple)
    cost = cost_model(model, target, cost)
    options = _joint_options(sensitivity, kappa, None if cost.target == "params" else cost, rank_multiple)
    total = cost_units(cost, cost.total())
    need = None
    if mode == "lossless":
        if target_reduction is None or not 0 < target_reduction < 1:
            raise OnnxlrfError("mode lossless needs --target-reduction in (0, 1)")
        need = math.ceil(target_reduction * total - 1e-9)
    solve = _solve_dp if solver == "dp" else _solve_lagrangian
    choice = solve(options, need, None if need is not None else tolerance)
    if choice is None:
        if need is not None:
            most = sum(int(o.removed.max()) for o in options) / total
            raise OnnxlrfError(f"target_reduction {target_reduction:g} is out of reach within the layers' trusted "
                               f"perturbation ranges: at most {most:.4f}"
                               + ("" if cost.target == "params" else f" of the model's {cost.target}"))
        choice = [0] * len(options)  # nothing predicted safe: stay dense
    removed, dloss = _totals(options, choice)
    entries, bases = [], {}
    chosen = {o.layer.node: (o, c) for o, c in zip(options, choice)}
    all_layers, _ = find_layers(model)
    for layer in all_layers:
        if layer.node not in chosen or chosen[layer.node][1] == 0:
            notes = {"reason": _dense_reason(chosen[layer.node][0]) if layer.node in chosen else "not analyzed"}
            if layer.node in sensitivity.layers:
                notes["range_checks"] = _range_checks(sensitivity.layers[layer.node])
            notes.update(cost.notes(layer, None, None))
            entries.append(LayerPlan(layer.node, layer.op_type, layer.weight, list(layer.weight_shape), "dense",
                                     None, layer.max_rank("channel"), None, layer.params, layer.params, notes))
            continue
        o, c = chosen[layer.node]
        ls = o.sources[c]
        decomposition = ls.decomposition
        rank = int(o.ranks[c])
        priority = ls.drop_order(kappa)[:, ::-1]  # most important first
        x = np.take_along_axis(ls.x, priority[:, None, :], axis=2)
        s = np.take_along_axis(ls.s, priority, axis=1)
        y = np.take_along_axis(ls.y, priority[:, None, :], axis=2)
        bases[layer.weight] = (x.astype(np.float32), s.astype(np.float32),
                               np.ascontiguousarray(y.transpose(0, 2, 1)).astype(np.float32))
        if ls.input_mean is not None:
            bases[layer.weight] += (ls.input_mean.astype(np.float32),)
        entries.append(LayerPlan(layer.node, layer.op_type, layer.weight, list(layer.weight_shape), decomposition,
                                 rank, layer.max_rank(decomposition), None, layer.params,
                                 layer.factorized_params(decomposition, rank),
                                 {"predicted_dloss": float(o.dloss[c]), "relative_error": float(o.relative_error[c]),
                                  "perturbation_range": ls.perturbation_range,
                                  "curvature_scale": ls.curvature_scale, "range_checks": _range_checks(ls),
                                  **cost.notes(layer, decomposition, rank)},
                                 basis="joint", bias_correction=ls.input_mean is not None))
    options_out = {"target_reduction": target_reduction, "tolerance": tolerance, "kappa": kappa, "solver": solver,
                   "target": cost.target, "rank_multiple": rank_multiple,
                   "decompositions": ["channel"] + (["spatial"] if sensitivity.spatial else []),
                   "predicted_dloss": dloss, "achieved_reduction": removed / max(total, 1)}
    plan = Plan(layers=entries, mode=mode, options=options_out, source=_source(model), bases=bases)
    plan.options["params_reduction"] = plan.summary()["params_removed"] / max(count_params(model), 1)
    if cost.describe():
        plan.options["cost_model"] = cost.describe()
    return plan


def _range_checks(ls: Any) -> list[dict]:
    """The measured single-layer truncations (rank, predicted at kappa 1, measured, agree) for the plan's notes."""
    return [{key: check[key] for key in ("rank", "relative_error", "predicted", "measured", "agree")}
            for check in ls.range_checks if "predicted" in check]


def _dense_reason(option: _Options) -> str:
    """Why the joint planner left a layer dense."""
    if len(option.ranks) == 1:
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
    _check_rank_multiple(rank_multiple)
    cost = cost_model(model, target, cost)
    analyzed = {ls.layer.node: ls for ls in sensitivity.layers.values()}
    layers, _ = find_layers(model)
    groups, dense_reason = weight_groups(model, layers)
    candidates = []
    for members in groups:
        layer = members[0]
        reason = dense_reason.get(layer.weight) or (None if layer.node in analyzed else "not analyzed")

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
