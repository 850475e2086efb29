"""The back-off's steps around the search, over fakes: how lossless mode chooses, and the lossless refit."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from onnxlrf.data import CLASSIFICATION, OUTPUTS, SENTENCE_SIMILARITY
from onnxlrf.errors import OnnxlrfError
from onnxlrf.planning.plan import Plan
from onnxlrf.progress import Progress
from onnxlrf.verify.backoff import VerifyOptions, lossless_selection, refit_chosen
from onnxlrf.verify.search import Score, Verified


@pytest.mark.parametrize("task, chosen", [(CLASSIFICATION, "loss"), (SENTENCE_SIMILARITY, "metric"),
                                          (OUTPUTS, "metric")])
def test_auto_selects_by_loss_only_where_the_data_are_classified(task, chosen) -> None:
    val = SimpleNamespace(task=task)
    assert lossless_selection("auto", val) == chosen
    assert lossless_selection("metric", val) == "metric" and lossless_selection("loss", val) == "loss"
    assert lossless_selection("auto", val, "compact") == lossless_selection("loss", val, "compact") == "metric"


def test_verify_options_refuse_an_unknown_selection() -> None:
    assert VerifyOptions().select == "auto"
    with pytest.raises(OnnxlrfError, match="--select must be auto, metric or loss; got 'top1'"):
        VerifyOptions(select="top1")


class RefitTechnique:
    """Improves a plan into one marked refit; rewrites a plan into itself."""

    def improve(self, reference, plan, calib, progress=None) -> Plan:
        return Plan(layers=[], mode=plan.mode, options={**plan.options, "refit": True})

    def rewrite(self, reference, plan, progress=None):
        return plan, SimpleNamespace(params_after=100, params_before=100)


class ScoreByRefit:
    """The refit plan scores ``refit``; the original ``reference``."""

    def __init__(self, refit: Score, reference: Score) -> None:
        self.refit, self.reference = refit, reference

    def required_value(self) -> float:
        return self.reference.value

    def reference_score(self) -> Score:
        return self.reference

    def score(self, model, description) -> Score:
        return self.refit

    def speedup(self, model) -> None:
        return None


@pytest.mark.parametrize("select, kept", [("loss", True), ("metric", False)])
def test_the_lossless_refit_is_kept_by_the_selection_of_the_back_off(select, kept) -> None:
    plan = Plan(layers=[], mode="lossless", options={"kappa": 1.0, "achieved_reduction": 0.2,
                                                     "predicted_dloss": 0.0})
    chosen = Verified(0.81, plan, None, None, None, Score(0.81, np.full(4, 0.50)))
    # Refit: one prediction fewer right, a lower loss on every sample.
    evaluator = ScoreByRefit(Score(0.80, np.full(4, 0.45)), Score(0.80, np.full(4, 0.48)))
    attempts: list = []
    result = refit_chosen(None, chosen, [], None, evaluator, RefitTechnique(), Progress(enabled=False), attempts,
                          select=select)
    assert (result is not None) == kept
    assert attempts[0].refit and attempts[0].loss_change == pytest.approx(-0.03)
    tie = Verified(0.81, plan, None, None, None, Score(0.81, np.full(4, 0.45)))
    assert refit_chosen(None, tie, [], None, evaluator, RefitTechnique(), Progress(enabled=False), [],
                        select="loss") is None  # a tie keeps the plan
    unscored = Verified(0.79, plan, None, None, None)  # several rounds: the last round's metric only
    assert refit_chosen(None, unscored, [], None, evaluator, RefitTechnique(), Progress(enabled=False), [],
                        select="loss") is not None
