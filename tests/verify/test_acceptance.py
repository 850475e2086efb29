"""The acceptance rule (when a plan holds on validation), simulated: plans equal to the original in
truth but lucky on one validation split, and plans truly better, through the real compact search."""

from __future__ import annotations

import numpy as np
import pytest

from onnxlrf.planning.plan import Plan
from onnxlrf.progress import Progress
from onnxlrf.verify.search import (
    BACKOFF_KAPPAS,
    DEFAULT_ACCEPTANCE,
    FALSE_ACCEPTANCE_RATE,
    AcceptanceRule,
    BackoffSearch,
    Score,
    paired_loss_change,
)

SAMPLES = 1000  # the default validation split
RUNS = 2000


class NoisyEvaluator:
    """Every plan scores the original's metric plus luck, and its per-sample losses are the original's plus
    ``shift`` plus independent noise: each plan is a fresh draw, the worst case for a search that looks at many."""

    def __init__(self, rng: np.random.Generator, shift: float = 0.0, noise: float = 0.3,
                 metric_luck: float = 0.006) -> None:
        self.rng, self.shift, self.noise, self.metric_luck = rng, shift, noise, metric_luck
        self.losses = rng.exponential(0.4, SAMPLES)
        self.scored = 0

    def reference_score(self) -> Score:
        return Score(0.80, self.losses)

    def rewrite(self, plan: Plan) -> tuple[Plan, None]:
        return plan, None

    def score(self, model: Plan, description: str) -> Score:
        self.scored += 1
        value = 0.80 + self.metric_luck * self.rng.standard_normal()
        return Score(value, self.losses + self.shift + self.noise * self.rng.standard_normal(SAMPLES))

    def speedup(self, model: Plan) -> None:
        return None


def compact_run(evaluator: NoisyEvaluator, rule: AcceptanceRule):
    """One compact back-off over distinct plans (each kappa's plan smaller), with ``rule``."""
    def propose(kappa: float, size: float | None) -> Plan:
        return Plan(layers=[], mode="compact", options={"kappa": kappa, "achieved_reduction": 0.4 / kappa,
                                                        "predicted_dloss": -0.01, "target": "params"})

    search = BackoffSearch(propose, evaluator, "compact", lambda plan, kappa: kappa, Progress(enabled=False),
                           rule=rule)
    return search.run()


def acceptance_rate(rule: AcceptanceRule, shift: float, seed: int) -> float:
    rng = np.random.default_rng(seed)
    return float(np.mean([compact_run(NoisyEvaluator(rng, shift), rule) is not None for _ in range(RUNS)]))


def test_plans_equal_in_truth_are_accepted_at_most_at_the_stated_rate() -> None:
    # Seven distinct plans per run, each lucky or not on its own: the metric alone keeps one in almost every run.
    assert acceptance_rate(AcceptanceRule(loss_z=None), 0.0, seed=0) > 0.9
    rate = acceptance_rate(DEFAULT_ACCEPTANCE, 0.0, seed=1)
    # The binomial standard error of the simulated rate is about 0.005.
    assert rate <= FALSE_ACCEPTANCE_RATE + 0.01


def test_plans_truly_better_are_accepted() -> None:
    # A plan that lowers the mean loss by 0.04 (a tenth of it) on every sample is found in nearly every run.
    assert acceptance_rate(DEFAULT_ACCEPTANCE, -0.04, seed=2) > 0.95


def test_the_rule_needs_the_metric_and_the_loss() -> None:
    reference = Score(0.80, np.zeros(SAMPLES))
    rule = AcceptanceRule(loss_z=2.0)
    better = np.full(SAMPLES, -0.01) + 0.1 * np.random.default_rng(0).standard_normal(SAMPLES)
    assert rule.check(Score(0.80, better), reference)
    assert not rule.check(Score(0.799, better), reference)  # metric below the original's
    assert rule.check(Score(0.799, better), reference, allowance=0.002)
    assert not rule.check(Score(0.81, -better), reference)  # loss higher
    assert rule.check(Score(0.81), reference)  # no per-sample losses: the metric decides
    mean, se = paired_loss_change(Score(0.80, better), reference)
    assert mean == pytest.approx(better.mean()) and se == pytest.approx(better.std(ddof=1) / np.sqrt(SAMPLES))


def test_the_search_records_the_loss_change_of_each_plan() -> None:
    evaluator = NoisyEvaluator(np.random.default_rng(3), shift=-0.05)
    search = BackoffSearch(lambda kappa, size: Plan(layers=[], mode="compact", options={
        "kappa": kappa, "achieved_reduction": 0.1, "predicted_dloss": -0.01, "target": "params"}),
        evaluator, "compact", lambda plan, kappa: kappa, Progress(enabled=False), rule=DEFAULT_ACCEPTANCE)
    assert search.run() is not None
    attempt = search.attempts[0]
    assert attempt.loss_change == pytest.approx(-0.05, abs=0.03) and 0 < attempt.loss_se < 0.02
    assert {"loss_change", "loss_se"} <= set(attempt.to_dict())
    assert len(BACKOFF_KAPPAS) >= len(search.attempts)
