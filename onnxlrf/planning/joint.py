"""The joint planner (METHOD.md section 4), for any technique: candidates per weight group, one knapsack.

``lossless``: the least predicted loss change that removes at least ``target_reduction`` of the
cost model's total. ``compact``: the most removed with a predicted loss change of at most
``tolerance``. The technique (:class:`~onnxlrf.techniques.base.Technique`) offers each weight
group's options inside its trusted ranges and writes the chosen ones as plan entries; this module
never looks inside a choice.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import onnx

from ..costs.params import cost_model, cost_units
from ..errors import OnnxlrfError
from ..graph.layers import count_params, find_layers
from . import knapsack
from .plan import Plan, weight_fingerprints

JOINT_MODES = ("lossless", "compact")


@dataclass(frozen=True)
class PlanOptions:
    """What to plan: the mode, the size it aims at, and how (``onnxlrf compress``'s planning flags).

    ``mode``: ``lossless`` or ``compact`` (the joint method), ``uniform`` or ``energy`` (data-free).
    ``target_reduction``: the fraction of ``target`` (params, flops or latency) to remove;
    ``tolerance``: compact's allowed predicted loss increase; ``solver``: the knapsack's;
    ``rank_multiple``: ranks are multiples of it (None: 1, or in :func:`onnxlrf.pipeline.compress`
    the default for the provider and target); ``rank_fraction`` and ``energy``: the data-free
    modes' knobs, instead of ``target_reduction``.
    """

    mode: str
    target_reduction: float | None = None
    tolerance: float = 0.0
    solver: str = "lagrangian"
    target: str = "params"
    rank_multiple: int | None = None
    rank_fraction: float | None = None
    energy: float | None = None

    def __post_init__(self) -> None:
        """Refuse values no planner can take, before any work (the CLI's flag names in the messages)."""
        for flag, value, low, high in (("--target-reduction", self.target_reduction, 0.0, 1.0),
                                       ("--rank-fraction", self.rank_fraction, 0.0, 1.0 + 1e-12),
                                       ("--energy", self.energy, 0.0, 1.0 + 1e-12)):
            if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value)
                                          and low < value < high):
                raise OnnxlrfError(f"{flag} must be a number in (0, 1{')' if high == 1.0 else ']'}, got {value!r}")
        if not isinstance(self.tolerance, (int, float)) or not math.isfinite(self.tolerance) or self.tolerance < 0:
            raise OnnxlrfError(f"--tolerance must be a finite number >= 0 (a predicted loss increase), "
                               f"got {self.tolerance!r}")
        if self.rank_multiple is not None and (not isinstance(self.rank_multiple, int) or self.rank_multiple < 1):
            raise OnnxlrfError(f"--rank-multiple must be an integer >= 1, got {self.rank_multiple!r}")
        if self.mode == "lossless" and self.target_reduction is None:
            raise OnnxlrfError("mode lossless needs --target-reduction in (0, 1)")
        if self.mode == "uniform" and (self.target_reduction is None) == (self.rank_fraction is None):
            raise OnnxlrfError("mode uniform needs exactly one of --target-reduction or --rank-fraction")
        if self.mode == "energy" and (self.target_reduction is None) == (self.energy is None):
            raise OnnxlrfError("mode energy needs exactly one of --target-reduction or --energy")


def plan_joint(model: onnx.ModelProto, technique: Any, analysis: Any, mode: str,
               target_reduction: float | None = None, tolerance: float = 0.0, kappa: float = 1.0,
               solver: str = "lagrangian", target: str = "params", cost: Any = None, **options: Any) -> Plan:
    """A plan from ``technique``'s candidates over ``analysis`` at curvature multiplier ``kappa``.

    ``target``: what ``target_reduction`` and "removed" are counted in (``cost``: a prepared cost
    model for it). ``options`` go to the technique's ``candidates`` (low-rank: ``rank_multiple``).
    Layers of the model that no group covers stay as they are.
    """
    if mode not in JOINT_MODES:
        raise OnnxlrfError(f"unknown joint mode {mode!r}; known: {', '.join(JOINT_MODES)}")
    if solver not in knapsack.SOLVERS:
        raise OnnxlrfError(f"unknown solver {solver!r}; known: {', '.join(knapsack.SOLVERS)}")
    cost = cost_model(model, target, cost)
    groups = technique.candidates(model, analysis, kappa, cost, **options)
    sets = [group.options for group in groups]
    total = cost_units(cost, cost.total())
    need = None
    if mode == "lossless":
        if target_reduction is None or not 0 < target_reduction < 1:
            raise OnnxlrfError("mode lossless needs --target-reduction in (0, 1)")
        need = math.ceil(target_reduction * total - 1e-9)
    choice = knapsack.solve(sets, need, None if need is not None else tolerance, solver=solver)
    if choice is None:
        if need is not None:
            most = sum(int(s.removed.max()) for s in sets) / total
            raise OnnxlrfError(f"target_reduction {target_reduction:g} is out of reach within the layers' trusted "
                               f"perturbation ranges: at most {most:.4f}"
                               + ("" if cost.target == "params" else f" of the model's {cost.target}"))
        choice = [0] * len(sets)  # nothing predicted safe: stay as it is
    removed, dloss = knapsack.totals(sets, choice)
    by_node, bases = {}, {}
    for group, option in zip(groups, choice):
        entries, stored = technique.entries(model, analysis, group, option, kappa, cost)
        by_node.update((entry.node, entry) for entry in entries)
        bases.update(stored)
    layers = [by_node[layer.node] if layer.node in by_node else
              technique.unplanned_entry(model, layer, analysis, cost) for layer in find_layers(model)[0]]
    plan_options = {"target_reduction": target_reduction, "tolerance": tolerance, "kappa": kappa, "solver": solver,
                    "target": cost.target, **technique.plan_options(analysis, **options),
                    "predicted_dloss": dloss, "achieved_reduction": removed / max(total, 1)}
    plan = Plan(layers=layers, mode=mode, options=plan_options, source=plan_source(model), bases=bases)
    plan.options["params_reduction"] = plan.summary()["params_removed"] / max(count_params(model), 1)
    if cost.describe():
        plan.options["cost_model"] = cost.describe()
    return plan


def plan_source(model: onnx.ModelProto) -> dict:
    """What a plan records of the model it was made for: the graph's name, its parameters and a fingerprint
    of each compressible weight (:func:`~onnxlrf.planning.plan.weight_fingerprints`)."""
    return {"graph": model.graph.name, "params": count_params(model), "weights": weight_fingerprints(model)}
