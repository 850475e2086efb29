"""The back-off's search over a fake evaluator: no model, no onnxruntime, no torch."""

from __future__ import annotations

import numpy as np
import pytest

from onnxlrf.errors import OnnxlrfError
from onnxlrf.planning.plan import Plan
from onnxlrf.progress import Progress
from onnxlrf.verify.search import (
    BACKOFF_KAPPAS,
    SIZE_SEARCH_START,
    Attempt,
    BackoffSearch,
    Score,
)


def plan_of(kappa: float, reduction: float, size: float | None = None) -> Plan:
    """A plan with no layers, known by its options only (the search never looks inside)."""
    options = {"kappa": kappa, "achieved_reduction": reduction, "predicted_dloss": -reduction, "target": "params"}
    if size is not None:
        options["size"] = size
    return Plan(layers=[], mode="compact", options=options)


class FakeEvaluator:
    """Scores a plan by its size: ``score(reduction)``, and with ``loss`` its per-sample losses ``loss(reduction)``;
    the "model" of a plan is the plan itself."""

    def __init__(self, score, reference: float = 0.80, speedup: float | None = None, loss=None) -> None:
        self.value_of, self.reference, self.fixed_speedup, self.loss_of = score, reference, speedup, loss
        self.rewritten: list[Plan] = []
        self.scored: list[Plan] = []

    def reference_score(self) -> Score:
        return Score(self.reference, None if self.loss_of is None else self.loss_of(0.0))

    def rewrite(self, plan: Plan) -> tuple[Plan, None]:
        self.rewritten.append(plan)
        return plan, None

    def score(self, model: Plan, description: str) -> Score:
        self.scored.append(model)
        reduction = model.options["achieved_reduction"]
        return Score(self.value_of(reduction), None if self.loss_of is None else self.loss_of(reduction))

    def speedup(self, model: Plan) -> float | None:
        return self.fixed_speedup(model) if callable(self.fixed_speedup) else self.fixed_speedup


def shrinking(kappa: float, size: float | None) -> Plan:
    """Plans that get smaller as kappa grows (0.4 at kappa 1, halving with each doubling)."""
    return plan_of(kappa, size if size is not None else 0.4 / kappa, size)


def by_kappa(plan: Plan, kappa: float) -> tuple:
    return (plan.options["achieved_reduction"],)


def search(mode: str, evaluator: FakeEvaluator, propose=shrinking, signature=by_kappa) -> BackoffSearch:
    return BackoffSearch(propose, evaluator, mode, signature, Progress(enabled=False))


def test_lossless_keeps_the_best_validation_metric_over_every_kappa() -> None:
    evaluator = FakeEvaluator(lambda r: 0.80 - abs(r - 0.05))  # best at the plan of 5%: kappa 8
    run = search("lossless", evaluator)
    best = run.run()
    assert [a.kappa for a in run.attempts] == list(BACKOFF_KAPPAS)
    assert best.plan.options["kappa"] == 8.0 and best.value == pytest.approx(0.80)
    assert best.attempt is run.attempts[3] and best.attempt.val == best.value
    assert [p.options["kappa"] for p in run.failing()] == [k for k in BACKOFF_KAPPAS if k != 8.0]


@pytest.mark.parametrize("baseline_value", [0.79, 0.80, 0.81])
def test_lossless_verifies_the_baseline_after_the_kappas_and_keeps_it_only_when_better(baseline_value) -> None:
    baseline = Plan(layers=[], mode="lossless", options={"kappa": None, "achieved_reduction": 0.5,
                                                         "predicted_dloss": None, "baseline": "uniform 4 bits"})
    evaluator = FakeEvaluator(lambda r: baseline_value if r == 0.5 else 0.80 - abs(r - 0.05))
    run = BackoffSearch(shrinking, evaluator, "lossless", by_kappa, Progress(enabled=False), baselines=(baseline,))
    best = run.run()
    assert [a.kappa for a in run.attempts] == [*BACKOFF_KAPPAS, None]
    last = run.attempts[-1]
    assert (last.baseline, last.val, last.predicted_dloss) == ("uniform 4 bits", baseline_value, None)
    assert last.to_dict()["baseline"] == "uniform 4 bits" and last.to_dict()["kappa"] is None
    assert (best.plan is baseline) == (baseline_value > 0.80)  # a tie keeps the knapsack's plan of kappa 8


def test_lossless_verifies_each_baseline_in_turn_and_a_tie_keeps_the_earlier() -> None:
    def uniform(name: str, reduction: float) -> Plan:
        return Plan(layers=[], mode="lossless", options={"kappa": None, "achieved_reduction": reduction,
                                                         "predicted_dloss": None, "baseline": name})

    plain, improved = uniform("uniform 3 bits", 0.6), uniform("uniform 3 bits, rounded sequentially", 0.7)
    for improved_value, chosen in ((0.82, improved), (0.81, plain), (0.79, plain)):
        evaluator = FakeEvaluator(lambda r: {0.6: 0.81, 0.7: improved_value}.get(r, 0.80 - abs(r - 0.05)))
        run = BackoffSearch(shrinking, evaluator, "lossless", by_kappa, Progress(enabled=False),
                            baselines=(plain, improved))
        assert run.run().plan is chosen
        assert [a.baseline for a in run.attempts[-2:]] == ["uniform 3 bits", "uniform 3 bits, rounded sequentially"]


def test_lossless_by_loss_keeps_the_lowest_mean_validation_loss_whatever_the_metric() -> None:
    baseline = Plan(layers=[], mode="lossless", options={"kappa": None, "achieved_reduction": 0.4,
                                                         "predicted_dloss": None, "baseline": "uniform 4 bits"})
    metric = lambda r: 0.80 - abs(r - 0.05)  # noqa: E731  best metric: kappa 8's plan (5%)
    loss = lambda r: np.full(10, 1.0 + abs(r - 0.1))  # noqa: E731  lowest loss: kappa 4's plan (10%)
    by_loss = BackoffSearch(shrinking, FakeEvaluator(metric, loss=loss), "lossless", by_kappa,
                            Progress(enabled=False), select="loss").run()
    assert by_loss.plan.options["kappa"] == 4.0
    by_metric = BackoffSearch(shrinking, FakeEvaluator(metric, loss=loss), "lossless", by_kappa,
                              Progress(enabled=False)).run()
    assert by_metric.plan.options["kappa"] == 8.0
    # The baseline has kappa 1's size and so its loss: a tie keeps the plan verified first.
    tied = BackoffSearch(shrinking, FakeEvaluator(metric, loss=lambda r: np.full(10, 1.0 + abs(r - 0.4))),
                         "lossless", by_kappa, Progress(enabled=False), select="loss", baselines=(baseline,)).run()
    assert tied.plan.options["kappa"] == 1.0
    no_losses = BackoffSearch(shrinking, FakeEvaluator(metric), "lossless", by_kappa, Progress(enabled=False),
                              select="loss").run()
    assert no_losses.plan.options["kappa"] == 8.0  # no per-sample losses: the metric decides
    with pytest.raises(OnnxlrfError, match="unknown lossless selection 'accuracy'"):
        BackoffSearch(shrinking, FakeEvaluator(metric), "lossless", by_kappa, Progress(enabled=False),
                      select="accuracy")


def test_under_a_latency_target_a_plan_measured_to_meet_it_beats_a_better_scoring_one() -> None:
    baseline = Plan(layers=[], mode="lossless", options={"kappa": None, "achieved_reduction": 0.9, "target": "latency",
                                                         "predicted_dloss": None, "baseline": "uniform 8 bits",
                                                         "target_reduction": 0.4})

    def latency_plan(kappa: float, size: float | None) -> Plan:
        return Plan(layers=[], mode="lossless", options={**shrinking(kappa, size).options, "target_reduction": 0.4})

    speed = {0.4: 1.7, 0.2: 1.2, 0.9: 2.0}  # 40% less latency is 1.67x: only kappa 1's plan and the baseline reach it
    evaluator = FakeEvaluator(lambda r: {0.4: 0.78, 0.2: 0.82, 0.9: 0.79}.get(r, 0.70),
                              speedup=lambda plan: speed.get(plan.options["achieved_reduction"], 1.1))
    best = BackoffSearch(latency_plan, evaluator, "lossless", by_kappa, Progress(enabled=False),
                         baselines=(baseline,)).run()
    assert best.plan is baseline  # 0.79 beats kappa 1's 0.78; kappa 2's 0.82 ran 1.2x
    evaluator.fixed_speedup = lambda plan: 1.2  # nothing meets the target: the best scoring of those faster
    best = BackoffSearch(latency_plan, evaluator, "lossless", by_kappa, Progress(enabled=False),
                         baselines=(baseline,)).run()
    assert best.plan.options["kappa"] == 2.0


def test_a_baseline_not_measured_faster_is_not_chosen() -> None:
    baseline = Plan(layers=[], mode="lossless", options={"kappa": None, "achieved_reduction": 0.5,
                                                         "predicted_dloss": None, "baseline": "uniform 8 bits"})
    run = BackoffSearch(shrinking, FakeEvaluator(lambda r: 0.9, speedup=0.9), "lossless", by_kappa,
                        Progress(enabled=False), baselines=(baseline,))
    assert run.run() is None and all(a.val is None for a in run.attempts)
    assert "uniform 8 bits: 0.90x" in str(run.unreachable)  # what the back-off raises: the last rejection


def test_compact_stops_at_the_first_plan_that_holds_then_bisects_kappa() -> None:
    evaluator = FakeEvaluator(lambda r: 0.81 if r <= 0.15 else 0.70)  # holds up to 15% smaller
    run = search("compact", evaluator)
    best = run.run()
    kappas = [a.kappa for a in run.attempts]
    assert kappas[:3] == [1.0, 2.0, 4.0]  # 40% and 20% fail, 10% holds: stop doubling
    assert len(kappas) == 3 + 3  # then three bisections between kappa 2 and 4
    assert all(2.0 < k < 4.0 for k in kappas[3:])
    assert best.plan.options["achieved_reduction"] <= 0.15
    assert best.plan.options["achieved_reduction"] == max(a.achieved_reduction for a in run.attempts
                                                          if a.val is not None and a.val >= 0.80)
    assert {p.options["kappa"] for p in run.failing()} == {a.kappa for a in run.attempts if a.val < 0.80}


def test_a_plan_seen_before_is_not_evaluated_again() -> None:
    evaluator = FakeEvaluator(lambda r: 0.79)  # nothing holds
    run = search("compact", evaluator, propose=lambda kappa, size: plan_of(kappa, 0.1),
                 signature=lambda plan, kappa: "the same components")
    assert run.run() is None
    assert len(evaluator.scored) == 1 and len(run.attempts) == len(BACKOFF_KAPPAS)
    assert [a.same_as_kappa for a in run.attempts] == [None] + [1.0] * (len(BACKOFF_KAPPAS) - 1)
    assert [a.val for a in run.attempts] == [0.79] * len(BACKOFF_KAPPAS)


def test_compact_searches_sizes_where_nothing_is_free() -> None:
    evaluator = FakeEvaluator(lambda r: 0.80 if r <= 0.05 else 0.75)
    run = search("compact", evaluator, propose=lambda kappa, size: plan_of(kappa, size or 0.0, size))
    best = run.run()
    sizes = [a.target_reduction for a in run.attempts if a.target_reduction is not None]
    assert sizes[:4] == [SIZE_SEARCH_START, 0.02, 0.04, 0.08]  # doubled until a plan fails
    assert sizes[4:] == [0.06, 0.05, 0.055]  # then bisected between the largest that held and the first failure
    assert best.plan.options["achieved_reduction"] == 0.05


def test_latency_plans_not_measured_faster_are_rejected_unscored() -> None:
    evaluator = FakeEvaluator(lambda r: 0.9, speedup=0.95)
    run = search("lossless", evaluator)
    assert run.run() is None
    assert evaluator.scored == [] and all(a.speedup == 0.95 and a.val is None for a in run.attempts)
    assert "measured faster" in str(run.unreachable)


def test_a_target_out_of_reach_is_no_plan() -> None:
    def unreachable(kappa: float, size: float | None) -> Plan:
        raise OnnxlrfError("target_reduction 0.9 is out of reach")

    run = search("lossless", FakeEvaluator(lambda r: 0.9), propose=unreachable)
    assert run.run() is None and run.attempts == [] and "out of reach" in str(run.unreachable)


def test_attempts_keep_the_json_keys_of_the_plan_options() -> None:
    assert Attempt(1.0, 0.1, -0.01, val=0.8).to_dict() == {
        "kappa": 1.0, "achieved_reduction": 0.1, "predicted_dloss": -0.01, "val": 0.8}
    record = Attempt(2.0, 0.2, 0.01, val=0.7, speedup=1.3, target_reduction=0.04, same_as_kappa=1.0, restored=3,
                     refit=True, round=2, chosen=True).to_dict()
    assert list(record) == ["round", "kappa", "refit", "restored", "achieved_reduction", "predicted_dloss",
                            "speedup", "val", "target_reduction", "same_as_kappa", "chosen"]


def test_the_search_keeps_no_scored_model_and_rewrites_the_chosen_plan_again() -> None:
    # A 110M encoder's models are 0.4 GB each, and the search keeps every plan it scored.
    import gc
    import weakref

    class Model:
        def __init__(self, plan: Plan) -> None:
            self.options = plan.options

    class Rewriting(FakeEvaluator):
        def rewrite(self, plan: Plan) -> tuple[Model, None]:
            self.rewritten.append(plan)
            model = Model(plan)
            models.append(weakref.ref(model))
            return model, None

        def score(self, model: Model, description: str) -> Score:  # keeps no model either
            self.scored.append(model.options)
            return Score(self.value_of(model.options["achieved_reduction"]))

    models: list = []
    evaluator = Rewriting(lambda r: 0.80 - abs(r - 0.05))
    best = search("lossless", evaluator).run()
    gc.collect()
    alive = [ref() for ref in models if ref() is not None]
    assert alive == [best.model] and best.model.options is best.plan.options
    assert evaluator.rewritten[-1] is best.plan and len(evaluator.rewritten) == len(evaluator.scored) + 1
