"""Low-rank factorization as a :class:`~onnxlrf.techniques.base.Technique`."""

from __future__ import annotations

from typing import Any, Hashable

import onnx

from ...graph.layers import Layer, find_layers
from ...measure.analysis import AnalysisOptions, joint_analysis
from ...planning import joint
from ...planning.plan import LowRankEntry, Plan
from ...progress import ProgressLike
from ..base import Candidates, EntryView, KeepPlot, RewriteReport
from .planners import joint_candidates, joint_entries, unplanned_entry
from .refit import refit_plan
from .rewrite import apply_plan, truncate_weights


class LowRank:
    """Per layer a decomposition and the singular components to keep (METHOD.md part I).

    Analysis: :func:`onnxlrf.measure.analysis.joint_analysis` (a
    :class:`~onnxlrf.measure.sensitivity.Sensitivity`); rewrite: a pair of thinner nodes per layer
    (:func:`~onnxlrf.techniques.lowrank.rewrite.apply_plan`); improvement: the refit of the
    factors on calibration data (:func:`~onnxlrf.techniques.lowrank.refit.refit_plan`).
    """

    name = LowRankEntry.technique
    improves_every_plan = False  # the refit also undoes the drops the joint plan wanted: validation decides
    improvement = "refit"

    def ineligible(self, model: onnx.ModelProto) -> dict[str, str]:
        return {skipped.node: skipped.reason for skipped in find_layers(model)[1]}

    def analyse(self, model: onnx.ModelProto, calib: Any, options: AnalysisOptions,
                progress: ProgressLike = None) -> Any:
        """:func:`~onnxlrf.measure.analysis.joint_analysis`: gradients, K-FAC statistics, joint bases, ranges;
        the statistics only quantization's predictions read are let go (a cache keeps them)."""
        analysis = joint_analysis(model, calib, options, progress)
        analysis.release_perturbation_statistics()
        return analysis

    def candidates(self, model: onnx.ModelProto, analysis: Any, kappa: float, cost: Any,
                   rank_multiple: int = 1) -> list[Candidates]:
        return joint_candidates(model, analysis, kappa, cost, rank_multiple)

    def entries(self, model: onnx.ModelProto, analysis: Any, group: Candidates, option: int, kappa: float,
                cost: Any) -> tuple[list[LowRankEntry], dict]:
        return joint_entries(model, analysis, group, option, cost)

    def unplanned_entry(self, model: onnx.ModelProto, layer: Layer, analysis: Any, cost: Any) -> LowRankEntry:
        return unplanned_entry(layer, analysis, cost)

    def plan_options(self, analysis: Any, rank_multiple: int = 1) -> dict:
        return {"rank_multiple": rank_multiple,
                "decompositions": ["channel"] + (["spatial"] if analysis.spatial else [])}

    def signature(self, plan: Plan, analysis: Any, kappa: float) -> Hashable:
        """The rank of every factorized layer (its components are dropped in one fixed order, so kappas that
        choose the same ranks make the same model)."""
        return tuple((e.node, e.decomposition, e.rank) for e in plan.layers if e.changed)

    def rewrite(self, model: onnx.ModelProto, plan: Plan, progress: ProgressLike = None
                ) -> tuple[onnx.ModelProto, RewriteReport]:
        return apply_plan(model, plan, progress=progress)

    def perturbed_weights(self, model: onnx.ModelProto, plan: Plan) -> onnx.ModelProto:
        return truncate_weights(model, plan)[0]

    def improve(self, model: onnx.ModelProto, plan: Plan, calib: Any, progress: ProgressLike = None
                ) -> Plan | None:
        """The plan with its factors refit on ``calib``; None where no layer could be refit."""
        refit, summary = refit_plan(model, plan, calib, progress=progress)
        return refit if summary["refit"] else None

    def uniform_plans(self, model: onnx.ModelProto, analysis: Any) -> list[Plan]:
        """None: a uniform rank fraction keeps the same share of every layer whatever its spectrum, and the joint
        plan's refit is verified beside it instead."""
        return []

    keep_plot = KeepPlot("rank kept per layer", "rank", "rank kept",
                         "Rank kept per layer (grey: maximum rank; blue: kept; dense layers in light grey).")
    numeric_columns = ("max rank", "rank")
    table_note = ("rank: kept components (dense: not factorized). predicted dloss: the planner's predicted change "
                  "of the calibration loss from this layer's truncation alone, at the plan's kappa. measured dloss: "
                  "the loss change measured with only this layer truncated, where the analysis measured this exact "
                  "rank. single-layer checks: the analysis's truncations of this layer alone, predicted (kappa 1, "
                  "fitted curvature scale) / measured loss change; ! where they disagree (beyond that the layer is "
                  "not truncated).")

    def view(self, entry: LowRankEntry, rewritten: dict | None) -> EntryView:
        """Maximum rank, the rank the rewrite kept (dense where it left the layer), decomposition and basis."""
        rank = rewritten["rank"] if rewritten else None
        cells = {"max rank": str(entry.max_rank), "rank": "dense" if rank is None else str(rank),
                 "decomposition": rewritten["decomposition"] if rewritten else "dense",
                 "basis": entry.basis if rewritten else "-"}
        return EntryView(cells, rank, entry.max_rank, "dense" if rank is None else f"{rank}/{entry.max_rank}", rank)

    def check_key(self, check: dict) -> Any:
        return check.get("rank")

    def check_label(self, check: dict) -> str:
        return f"r{check['rank']}"


LOWRANK = LowRank()


def plan_joint(model: onnx.ModelProto, sensitivity: Any, mode: str, **options: Any) -> Plan:
    """The joint low-rank plan (:func:`onnxlrf.planning.joint.plan_joint` with :data:`LOWRANK`).

    ``options``: ``target_reduction``, ``tolerance``, ``kappa``, ``solver``, ``target``, ``cost`` and
    ``rank_multiple`` (ranks are multiples of it). A layer analyzed in spatial decomposition too
    (``sensitivity.spatial``) has the candidates of both, and gets the one the knapsack prefers.
    """
    return joint.plan_joint(model, LOWRANK, sensitivity, mode, **options)
