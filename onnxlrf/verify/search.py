"""The back-off's search (METHOD.md 5), apart from what runs a plan: typed attempts over an injected evaluator.

:class:`BackoffSearch` asks ``propose(kappa, size)`` for plans, trusting the curvature model less
each time (larger ``kappa``), and an :class:`Evaluator` for what each plan scores on the
validation split. It knows nothing of onnxruntime or of any technique, so it is tested with a fake
evaluator. :mod:`onnxlrf.verify.backoff` gives it the real ones.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable, Hashable, Protocol

import numpy as np

from ..errors import OnnxlrfError
from ..planning.plan import Plan
from ..progress import Progress

# Curvature multipliers tried in turn by the back-off (METHOD.md section 5): each
# trusts the quadratic model less, so plans get more conservative.
BACKOFF_KAPPAS = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0)
BACKOFF_BISECTIONS = 3
# Compact mode's size search (used when no component is free at the tolerance) starts here
# and doubles until a plan fails on validation.
SIZE_SEARCH_START = 0.01


@dataclass(frozen=True)
class Score:
    """A model's validation metric, and its task loss per validation sample (None: not measured)."""

    value: float
    losses: np.ndarray | None = None


def paired_loss_change(candidate: Score, reference: Score) -> tuple[float, float] | None:
    """The mean per-sample loss change of ``candidate`` against ``reference`` (the same samples) and its
    standard error; None where either has no per-sample losses."""
    if candidate.losses is None or reference.losses is None:
        return None
    change = np.asarray(candidate.losses, np.float64) - np.asarray(reference.losses, np.float64)
    spread = float(change.std(ddof=1)) if change.size > 1 else math.inf
    return float(change.mean()), spread / math.sqrt(max(change.size, 1))


@dataclass(frozen=True)
class AcceptanceRule:
    """When a plan holds on validation (METHOD.md 5): its metric is at least the original's less the
    allowance, and, with ``loss_z`` set, its mean per-sample task-loss change against the original
    (paired) is at most ``-loss_z`` standard errors: the plan lowers the loss by more than chance does.

    The metric alone lets the back-off keep the largest of many plans that tie or beat the original by
    luck on one split. The loss is measured on every sample, where the metric changes on a few, so the
    paired test resolves much smaller differences. Where either side has no per-sample losses, only
    the metric is checked.
    """

    loss_z: float | None = None

    def check(self, candidate: Score, reference: Score, allowance: float = 0.0) -> bool:
        """Whether ``candidate`` holds against the original's ``reference`` score."""
        if candidate.value < reference.value - allowance:
            return False
        change = None if self.loss_z is None else paired_loss_change(candidate, reference)
        return change is None or change[0] + self.loss_z * change[1] <= 0.0

    def check_against(self, reference: Score, allowance: float = 0.0) -> Callable[[Score], bool]:
        """:meth:`check` against a fixed ``reference``."""
        return lambda candidate: self.check(candidate, reference, allowance)

    def describe(self) -> str:
        """The rule in words, for logs and records."""
        text = "metric >= original's"
        return text if self.loss_z is None else f"{text} and paired loss change + {self.loss_z:g} s.e. <= 0"


# How lossless mode chooses among the plans it verified: the highest validation metric, or the lowest mean
# per-sample validation loss (see :func:`selection_key`).
SELECTIONS = ("metric", "loss")


def selection_key(score: Score, select: str) -> float:
    """What lossless mode maximizes over the plans it verified: the validation metric, or with ``select`` "loss"
    minus the mean per-sample task loss (the metric where the score has no per-sample losses).

    Plans at one target often score a few validation samples apart: top-1 on 1,000 images changes only where a
    prediction flips, so the highest metric is mostly the luckiest plan. The loss moves on every sample and tells
    such plans apart with a fraction of the noise."""
    if select == "loss" and score.losses is not None:
        return -float(np.mean(np.asarray(score.losses, np.float64)))
    return score.value


# The share of compact runs allowed to keep a plan that is no better than the original in truth.
FALSE_ACCEPTANCE_RATE = 0.05
# The default rule's one-sided z: the search may look at up to seven distinct plans before one
# holds (one per kappa), and a plan equal to the original in truth ties or beats its validation
# metric about half the time, so each plan's loss test runs at 0.05 / 7 / 0.5 (z = 2.2): at most
# FALSE_ACCEPTANCE_RATE of runs over plans that are each a fresh draw (tests/verify/test_acceptance.py
# simulates it), less over the real plans, which share most of their components.
DEFAULT_ACCEPTANCE = AcceptanceRule(loss_z=2.2)


@dataclass
class Attempt:
    """One plan the back-off looked at, as the plan's ``options["backoff"]`` records it (:meth:`to_dict`)."""

    kappa: float | None  # None: the technique's uniform baseline (``baseline`` says which)
    achieved_reduction: float
    predicted_dloss: float | None  # None: the baseline, which predicts nothing
    val: float | None = None  # the validation metric; None: not evaluated (rejected for speed)
    speedup: float | None = None  # measured against the original, under a latency target
    target_reduction: float | None = None  # compact's size search: planned as lossless at this size
    same_as_kappa: float | None = None  # the same model as the plan of that kappa: not evaluated again
    restored: int | None = None  # layers set back to the plan that holds
    loss_change: float | None = None  # mean per-sample validation loss change against the original
    loss_se: float | None = None  # its standard error
    refit: bool = False  # the plan's factors refit on the calibration split
    round: int | None = None  # with several rounds: which one
    baseline: str | None = None  # the technique's uniform plan verified beside the kappas', e.g. "uniform 4 bits"
    chosen: bool = False

    def to_dict(self) -> dict:
        """The JSON object of the plan's ``options["backoff"]`` (only the fields that apply)."""
        out: dict[str, Any] = {} if self.round is None else {"round": self.round}
        out["kappa"] = self.kappa
        if self.refit:
            out["refit"] = True
        if self.restored is not None:
            out["restored"] = self.restored
        out["achieved_reduction"] = self.achieved_reduction
        out["predicted_dloss"] = self.predicted_dloss
        for key in ("baseline", "speedup", "val", "loss_change", "loss_se", "target_reduction", "same_as_kappa"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        if self.chosen:
            out["chosen"] = True
        return out

    @classmethod
    def of(cls, plan: Plan, **fields: Any) -> "Attempt":
        """The attempt of ``plan`` (its kappa, size and predicted loss change), with ``fields`` set."""
        return cls(kappa=plan.options["kappa"], achieved_reduction=plan.options["achieved_reduction"],
                   predicted_dloss=plan.options["predicted_dloss"], **fields)


@dataclass
class Verified:
    """A plan that was rewritten and scored on the validation split, with its attempt."""

    value: float
    plan: Plan
    model: Any  # the rewritten model (an onnx.ModelProto); None once scored in the search, see BackoffSearch.run
    report: Any  # what the rewrite changed
    attempt: Attempt | None
    score: Score | None = None  # the value with its per-sample losses


class Evaluator(Protocol):
    """What the search needs to judge a plan."""

    def reference_score(self) -> Score:
        """The original model's score on the validation split."""

    def rewrite(self, plan: Plan) -> tuple[Any, Any]:
        """The model ``plan`` makes, and the rewrite's report."""

    def score(self, model: Any, description: str) -> Score:
        """``model``'s score on the validation split."""

    def speedup(self, model: Any) -> float | None:
        """``model``'s measured speedup over the original, where the target is latency (else None)."""


def plan_label(plan: Plan) -> str:
    """How logs name a plan: its kappa, or the baseline it is."""
    kappa = plan.options.get("kappa")
    return f"kappa {kappa:.3g}" if kappa is not None else plan.options.get("baseline", "the plan")


def reduction_text(plan: Plan) -> str:
    """The plan's size in its target's words, e.g. '12.0% fewer parameters', '30.1% less latency' or
    '70.2% less bytes'."""
    target = plan.options.get("target", "params")
    reduction = plan.options["achieved_reduction"]
    if target == "params":
        return f"{reduction:.1%} fewer parameters"
    if target == "bits":
        return f"{reduction:.1%} fewer weight bits ({32 * (1 - reduction):.2f} a weight)"
    return f"{reduction:.1%} less {({'latency': 'latency', 'bytes': 'bytes'}).get(target, 'FLOPs')}"


class BackoffSearch:
    """Verify plans on validation, trusting the curvature model less each time.

    lossless: the plan of each kappa in :data:`BACKOFF_KAPPAS`, and the technique's ``baselines``, uniform plans
    that meet the same target; the best by ``select`` wins (:func:`selection_key`: the validation metric, or the
    mean validation loss; a tie: the first), and under a latency target among the plans whose measured speed
    meets the target first.
    compact: the first plan whose validation metric is at least the original's, then a bisection
    of kappa (log scale) between the last that failed and the first that held, for a larger plan
    that holds. Where the plan that holds removes nothing, because no component is free at the
    tolerance (label-free targets: every drop raises the loss), sizes are searched instead: lossless
    plans at :data:`SIZE_SEARCH_START` of the target measure, doubled while they hold, then bisected
    between the largest that held and the first that failed. Plans with the same ``signature`` make
    the same model and are evaluated once. Under a latency target, a plan not measured faster than
    the original is rejected. Every plan looked at is an :class:`Attempt` in :attr:`attempts`.

    Whether a plan holds is the ``rule``'s verdict (:class:`AcceptanceRule`, :meth:`accepts`).
    ``allowance``: how far below the original's metric a plan may score and still hold (0: at least
    the original's). Fidelity to the original's outputs (label-free data) can only fall, so there it is
    the tolerance (:func:`~onnxlrf.verify.backoff.metric_allowance`).
    """

    def __init__(self, propose: Callable[[float, float | None], Plan], evaluator: Evaluator, mode: str,
                 signature: Callable[[Plan, float], Hashable], progress: Progress,
                 kappas: tuple[float, ...] = BACKOFF_KAPPAS, bisections: int = BACKOFF_BISECTIONS,
                 allowance: float = 0.0, rule: AcceptanceRule | None = None, baselines: tuple[Plan, ...] = (),
                 select: str = "metric") -> None:
        if select not in SELECTIONS:
            raise OnnxlrfError(f"unknown lossless selection {select!r}; known: {', '.join(SELECTIONS)}")
        self.propose, self.evaluator, self.mode, self.signature = propose, evaluator, mode, signature
        self.baselines, self.select = baselines, select
        self.progress, self.kappas, self.bisections, self.allowance = progress, kappas, bisections, allowance
        self.rule = DEFAULT_ACCEPTANCE if rule is None else rule
        self.attempts: list[Attempt] = []
        self.reference: float | None = None
        self.reference_score: Score | None = None
        # The error of the last kappa without a plan (lossless: raised when no kappa has one).
        self.unreachable: OnnxlrfError | None = None
        self._verified: dict[Hashable, tuple[float, Attempt, Verified | None]] = {}
        self._task: Any = None

    def run(self) -> Verified | None:
        """The plan the search chooses (compact: None where no plan held), with its model.

        Each plan's model is let go once scored (the search may score a dozen), and the chosen plan is
        rewritten again at the end (rewrites are deterministic)."""
        with self.progress.task(f"back-off ({self.mode})", unit="plan") as self._task:
            self.reference_score = self.evaluator.reference_score()
            self.reference = self.reference_score.value
            self.progress.log(f"back-off: the original scores {self.reference:.4f} on validation")
            best = None
            failed_kappa = None
            for kappa in self.kappas:
                result = self.attempt(kappa)
                if result is None:
                    continue
                if self.mode == "compact" and self.holds(result):
                    best = result
                    break
                failed_kappa = kappa
                if self.mode == "lossless" and self._better(result, best):
                    best = result
            for baseline in self.baselines if self.mode == "lossless" else ():
                result = self._verify(baseline, None, "")
                if result is not None and self._better(result, best):
                    best = result
            if self.mode == "lossless" and best is not None and not self._meets_target(best):
                self.progress.log(f"back-off: no plan measured {best.plan.options['target_reduction']:.1%} less "
                                  f"latency; the best on validation of those measured faster is kept")
            if self.mode == "compact" and best is not None and failed_kappa is not None:
                best = self._bisect(failed_kappa, best)
            if self.mode == "compact" and best is not None and not best.plan.options["achieved_reduction"] > 0:
                best = self._search_sizes(best)
        if best is not None:  # the scored models were let go (a 110M encoder's are 0.4 GB each): rewrite it again
            model, report = self.evaluator.rewrite(best.plan)
            best = dataclasses.replace(best, model=model, report=report)
        return best

    @staticmethod
    def _meets_target(result: Verified) -> bool:
        """Whether the plan's measured speed reaches its latency target (true for every other target)."""
        speedup = result.attempt.speedup if result.attempt is not None else None
        return speedup is None or speedup * (1.0 - result.plan.options["target_reduction"]) >= 1.0

    def _better(self, result: Verified, best: Verified | None) -> bool:
        """Lossless: a plan measured to meet its target beats one that does not; then the higher
        :func:`selection_key` by :attr:`select` (a tie keeps ``best``, the first)."""
        if best is None:
            return True
        return ((self._meets_target(result), selection_key(result.score, self.select))
                > (self._meets_target(best), selection_key(best.score, self.select)))

    @property
    def required(self) -> float:
        """The validation metric a plan needs to hold: the original's, less the allowance."""
        return self.reference - self.allowance

    def _required_text(self) -> str:
        if not self.allowance:
            return f"original {self.reference:.4f}"
        return f"required {self.required:.4f} (original {self.reference:.4f} less {self.allowance:g})"

    def accepts(self, score: Score) -> bool:
        """Whether a model of this ``score`` holds against the original (the :attr:`rule`)."""
        return self.rule.check(score, self.reference_score, self.allowance)

    def holds(self, result: Verified | None) -> bool:
        """Whether ``result`` holds (:meth:`accepts`)."""
        return result is not None and self.accepts(result.score)

    def failing(self) -> list[Plan]:
        """The plans evaluated that do not hold."""
        return [result.plan for _, _, result in self._verified.values()
                if result is not None and not self.holds(result)]

    def attempt(self, kappa: float, size: float | None = None) -> Verified | None:
        """The plan at ``kappa`` verified; ``size``: the lossless plan of that size instead (compact's size search)."""
        try:
            plan = self.propose(kappa, size)
        except OnnxlrfError as exc:  # the target may be out of the trusted ranges in this order
            self.unreachable = exc
            self.progress.log(f"  kappa {kappa:.3g}{'' if size is None else f', size {size:.3g}'}: no plan ({exc})")
            return None
        key = self.signature(plan, kappa)
        if key in self._verified:
            same, attempt, result = self._verified[key]
            self.attempts.append(dataclasses.replace(attempt, kappa=kappa, same_as_kappa=same, chosen=False))
            self.progress.log(f"  kappa {kappa:.3g}: the plan of kappa {same:.3g} again")
            self._task.update()
        else:
            result = self._verify(plan, kappa, "" if size is None else f", size {size:.3g}")
            self._verified[key] = (kappa, self.attempts[-1], result)
        if size is not None:
            self.attempts[-1].target_reduction = size
        return result

    def _verify(self, plan: Plan, kappa: float | None, label: str) -> Verified | None:
        """``plan`` (of ``kappa``; None: the baseline) rewritten, timed where the target is latency, and scored."""
        model, report = self.evaluator.rewrite(plan)
        attempt = Attempt(kappa, plan.options["achieved_reduction"], plan.options["predicted_dloss"],
                          baseline=None if kappa is not None else plan.options["baseline"])
        self.attempts.append(attempt)
        name = plan_label(plan)
        attempt.speedup = self.evaluator.speedup(model)
        if attempt.speedup is not None and attempt.speedup <= 1.0:  # not faster: no plan for a latency target
            self.unreachable = OnnxlrfError(f"no plan for this latency target measured faster than the original "
                                            f"({name}: {attempt.speedup:.2f}x)")
            self.progress.log(f"  {name}: {reduction_text(plan)} predicted, measured "
                              f"{attempt.speedup:.2f}x the original's speed: rejected")
            self._task.update()
            return None
        score = self.evaluator.score(model, f"validate the plan of {name}")
        value = attempt.val = score.value
        change = paired_loss_change(score, self.reference_score)
        if change is not None:
            attempt.loss_change, attempt.loss_se = change
        self._task.update()
        predicted = plan.options["predicted_dloss"]
        summary = (f"  {name}{label}: {reduction_text(plan)}, "
                   + ("" if predicted is None else f"predicted dloss {predicted:+.3g}, ") + f"val {value:.4f}"
                   + ("" if change is None else f", loss change {change[0]:+.4f} (s.e. {change[1]:.4f})"))
        if self.mode == "lossless":
            self.progress.log(f"{summary} (original {self.reference:.4f})")
        elif self.accepts(score):
            self.progress.log(f"{summary}: holds ({self.rule.describe()}, {self._required_text()})")
        else:
            self.progress.log(f"{summary}: rejected ({self.rule.describe()}, {self._required_text()})"
                              + ("" if label else ", trusting the curvature less"))
        return Verified(value, plan, None, report, attempt, score)

    def _bisect(self, failed_kappa: float, best: Verified) -> Verified:
        """Doubling overshoots: bisect kappa (log scale) between the last failing and the first passing value."""
        lo, hi = failed_kappa, best.plan.options["kappa"]
        self.progress.log(f"back-off: bisecting kappa between {lo:g} (fails) and {hi:g} (holds) for a larger plan")
        for _ in range(self.bisections):
            mid = math.sqrt(lo * hi)
            result = self.attempt(mid)
            if self.holds(result):
                hi = mid
                if result.plan.options["achieved_reduction"] > best.plan.options["achieved_reduction"]:
                    best = result
            else:
                lo = mid
        return best

    def _search_sizes(self, holding: Verified) -> Verified:
        """Compact's size search (see the class); the largest plan that held, else ``holding``."""
        self.progress.log("back-off: no component is free at this tolerance; searching sizes on validation")
        held, failed, size = 0.0, None, SIZE_SEARCH_START
        while failed is None and size < 1.0:
            result = self.attempt(1.0, size)
            if self.holds(result):
                held, holding, size = size, result, 2 * size
            else:
                failed = size
        for _ in range(self.bisections if failed is not None else 0):
            size = (held + failed) / 2
            result = self.attempt(1.0, size)
            if self.holds(result):
                held, holding = size, result
            else:
                failed = size
        return holding
