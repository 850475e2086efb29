"""The technique protocol: what a compression technique provides to the planner, the back-off and the report.

A technique (low-rank factorization today; quantization next) is one object registered in
:data:`onnxlrf.techniques.TECHNIQUES`. The stages around it never look inside its choices:

* the knapsack (:mod:`onnxlrf.planning.knapsack`) sees per weight group a
  :class:`~onnxlrf.planning.knapsack.CandidateSet`: what each option saves and its predicted loss change;
* the back-off (:mod:`onnxlrf.verify.backoff`) asks for plans at a curvature multiplier, rewrites
  them with the technique's pass, measures the weights a plan produces (for restoring layers),
  and lets the technique improve its plans: the chosen one, kept where validation says it is better
  (low-rank: the refit), or every plan before it is verified (quantization: the sequential rounding), as
  :attr:`Technique.improves_every_plan` says;
* the report asks the technique for its per-layer columns.

A rewrite is a :class:`RewritePass`: it checks its preconditions, changes only what the plan
says, keeps the graph's inputs and outputs (names, dtypes, shapes), checks that afterwards,
and reports what it changed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Hashable, Protocol

import onnx

from ..errors import OnnxlrfError
from ..graph.layers import Layer
from ..onnx_io import check_graph_reads
from ..planning.knapsack import CandidateSet
from ..planning.plan import Plan, PlanEntry
from ..progress import ProgressLike


@dataclass
class RewriteReport:
    """What a rewrite did: per layer the new nodes (or why it left the layer as it was), and parameter counts."""

    rewritten: list[dict] = field(default_factory=list)
    kept_dense: list[dict] = field(default_factory=list)
    params_before: int = 0
    params_after: int = 0


def _value_infos(values: Any) -> list[tuple[str, bytes]]:
    return [(value.name, value.type.SerializeToString()) for value in values]


class RewritePass:
    """A graph rewrite in three steps (as onnx-ir's passes): :meth:`requires`, :meth:`call`, :meth:`ensures`.

    Calling the pass runs all three. The base :meth:`ensures` checks what every rewrite keeps:
    the graph's inputs and outputs (names, element types and shapes), and that every tensor a
    node reads is produced by a node, an initializer or a graph input (:func:`~onnxlrf.onnx_io.check_graph_reads`).
    """

    name = "rewrite"

    def requires(self, model: onnx.ModelProto, plan: Plan) -> None:
        """Raise :class:`~onnxlrf.errors.OnnxlrfError` naming what about ``model`` or ``plan`` the pass cannot take."""

    def call(self, model: onnx.ModelProto, plan: Plan, progress: ProgressLike = None
             ) -> tuple[onnx.ModelProto, RewriteReport]:
        """The rewritten model (``model`` itself is not modified) and what changed."""
        raise NotImplementedError

    def ensures(self, model: onnx.ModelProto, result: onnx.ModelProto, plan: Plan, report: RewriteReport) -> None:
        """Raise :class:`~onnxlrf.errors.OnnxlrfError` if ``result`` broke what the pass promises."""
        before, after = model.graph, result.graph
        if _value_infos(before.input) != _value_infos(after.input):
            raise OnnxlrfError(f"{self.name}: the rewrite changed the graph's inputs")
        if _value_infos(before.output) != _value_infos(after.output):
            raise OnnxlrfError(f"{self.name}: the rewrite changed the graph's outputs")
        try:
            check_graph_reads(result)
        except OnnxlrfError as exc:
            raise OnnxlrfError(f"{self.name} broke the graph: {exc}") from None

    def __call__(self, model: onnx.ModelProto, plan: Plan, progress: ProgressLike = None
                 ) -> tuple[onnx.ModelProto, RewriteReport]:
        self.requires(model, plan)
        result, report = self.call(model, plan, progress)
        self.ensures(model, result, plan, report)
        return result, report


@dataclass
class EntryView:
    """How the report shows one plan entry: the technique's table cells and what the layer keeps."""

    cells: dict[str, str]  # the technique's columns of the per-layer table, in order
    kept: float | None  # what the layer keeps (low-rank: its rank); None: the layer is unchanged
    full: float  # ... of this much (low-rank: the maximum rank)
    label: str  # the keep plot's label of the layer, e.g. "12/16" or "dense"
    check_key: Any = None  # the key of the analysis' single-layer check at exactly this choice, if any


@dataclass(frozen=True)
class KeepPlot:
    """The words of the report's plot of what each layer keeps."""

    title: str  # e.g. "rank kept per layer"
    axis: str  # e.g. "rank"
    kept: str  # the legend of the chosen single-layer check, e.g. "rank kept"
    caption: str


@dataclass
class Candidates:
    """One weight group's options for the knapsack, and how to turn the chosen one into plan entries."""

    layers: list[Layer]  # the nodes sharing the weight, first one representative
    options: CandidateSet  # option 0: unchanged
    sources: list[Any]  # per option, what the technique needs to write its entries (None for option 0)
    reason: str | None = None  # why the group has no option but "unchanged", where the technique knows


class Technique(Protocol):
    """What a compression technique provides; see the module's docstring for who uses what."""

    name: str

    def ineligible(self, model: onnx.ModelProto) -> dict[str, str]:
        """Nodes of the kinds the technique handles that it cannot take, with the reason (for ``inspect``)."""

    def analyse(self, model: onnx.ModelProto, calib: Any, options: Any, progress: ProgressLike = None) -> Any:
        """What the technique measures on the calibration split to predict its choices' loss changes."""

    def candidates(self, model: onnx.ModelProto, analysis: Any, kappa: float, cost: Any,
                   **options: Any) -> list[Candidates]:
        """Per weight group, the options inside the analysis' trusted ranges: choice, predicted loss change, cost."""

    def entries(self, model: onnx.ModelProto, analysis: Any, group: Candidates, option: int, kappa: float,
                cost: Any) -> tuple[list[PlanEntry], dict]:
        """Plan entries for ``group`` at ``option`` (0: unchanged), and the arrays they store beside the plan."""

    def unplanned_entry(self, model: onnx.ModelProto, layer: Layer, analysis: Any, cost: Any) -> PlanEntry:
        """The entry of a layer no candidate group covers (it stays as it is)."""

    def plan_options(self, analysis: Any, **options: Any) -> dict:
        """What the plan's options record of the technique's settings."""

    def signature(self, plan: Plan, analysis: Any, kappa: float) -> Hashable:
        """Equal for plans that make the same model (the back-off verifies each model once)."""

    def rewrite(self, model: onnx.ModelProto, plan: Plan, progress: ProgressLike = None
                ) -> tuple[onnx.ModelProto, RewriteReport]:
        """The technique's :class:`RewritePass` applied to ``model``."""

    def perturbed_weights(self, model: onnx.ModelProto, plan: Plan) -> onnx.ModelProto:
        """The same graph with each planned weight replaced by the dense weight its choice produces."""

    def improve(self, model: onnx.ModelProto, plan: Plan, calib: Any, progress: ProgressLike = None
                ) -> Plan | None:
        """An improved plan from calibration data without fine-tuning (None: nothing to improve)."""

    def uniform_plans(self, model: onnx.ModelProto, analysis: Any) -> list[Plan]:
        """The technique's calibration-only baselines over the layers ``analysis`` covers, every layer changed
        alike, least compressed first; lossless mode also verifies the first that meets its target (empty: none)."""

    # True: the improvement is part of how the technique makes a plan (it only brings the model closer to
    # the original's outputs), so the back-off verifies every plan improved; False: it can also undo what
    # the plan wanted, so the back-off tries the improved plan beside the chosen one and validation decides.
    improves_every_plan: bool
    improvement: str  # what :meth:`improve` does, as a plan's label says it ("refit", "rounded sequentially")

    keep_plot: KeepPlot
    numeric_columns: tuple[str, ...]  # which of the view's cells are numbers (right-aligned)
    table_note: str  # what the report's per-layer table says of the technique's columns

    def view(self, entry: PlanEntry, rewritten: dict | None) -> EntryView:
        """How the report shows ``entry``; ``rewritten``: what the rewrite reported for it (None: left as it was)."""

    def check_key(self, check: dict) -> Any:
        """The choice a single-layer check of the analysis measured (compared with :attr:`EntryView.check_key`)."""

    def check_label(self, check: dict) -> str:
        """A short name of the choice a single-layer check measured, e.g. "r12"."""
