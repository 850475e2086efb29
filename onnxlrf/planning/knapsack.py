"""Multiple-choice knapsack: pick one option per group, trading what the options remove against predicted loss.

Technique-agnostic: a group is anything with alternatives (a layer's ranks, a quantization choice, ...),
described by a :class:`CandidateSet`. Option 0 of each set is, by convention, "unchanged" (removes
nothing, changes nothing), so staying put is always one of the choices.

Two problems, chosen by which bound :func:`solve` gets:

- lossless (``need``): remove at least ``need`` of every budget, least total predicted loss change;
- compact (``tolerance``): total predicted loss change at most ``tolerance``, most removed of the
  first budget (solver ``"milp"`` also takes ``need`` here, as lower bounds on every budget).

Solvers (:data:`SOLVERS`): ``"lagrangian"`` sweeps the multiplier of one budget (fast; exact only on
the convex hull of each set's options, so it can miss the optimum), ``"dp"`` is exact over removed
counted in at most ``bins`` units per budget (one budget), ``"milp"`` is exact (to HiGHS's
tolerances) for any number of budgets and needs scipy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from ..errors import OnnxlrfError

SOLVERS = ("lagrangian", "dp", "milp")
# The MILP's loss coefficients span [-1e3, 1e3]: HiGHS's absolute tolerances (1e-6, not settable through
# scipy) then amount to 1e-9 of the largest |dloss|; at 1, a planner's MILP missed the optimum by 4e-7 of it.
_LOSS_RESOLUTION = 1e3


@dataclass(frozen=True, eq=False)
class CandidateSet:
    """One group's options, option 0 being "unchanged".

    ``removed``: int64, shape (n,) for one budget or (n, k) for k budgets: what each option saves,
    in integer units of each budget (negative: the option costs more of that budget).
    ``dloss``: float, shape (n,): each option's predicted loss change. ``key``: the caller's identifier.
    """

    removed: np.ndarray
    dloss: np.ndarray
    key: Any = None

    def __post_init__(self) -> None:
        removed, dloss = np.asarray(self.removed), np.asarray(self.dloss, dtype=np.float64)
        if not np.issubdtype(removed.dtype, np.integer):
            raise OnnxlrfError(f"candidate set {self.key!r}: removed must be integer units, got {removed.dtype}")
        if removed.ndim not in (1, 2) or dloss.ndim != 1 or len(dloss) == 0 or removed.shape[0] != len(dloss) \
                or (removed.ndim == 2 and removed.shape[1] == 0):
            raise OnnxlrfError(f"candidate set {self.key!r}: removed must be (n,) or (n, k) and dloss (n,) with "
                               f"n >= 1 and k >= 1; got removed {removed.shape}, dloss {dloss.shape}")
        object.__setattr__(self, "removed", removed.astype(np.int64, copy=False))
        object.__setattr__(self, "dloss", dloss)

    @property
    def budgets(self) -> int:
        """How many budgets ``removed`` counts (k)."""
        return 1 if self.removed.ndim == 1 else self.removed.shape[1]


def totals(sets: Sequence[CandidateSet], choice: Sequence[int]) -> tuple[np.ndarray | int, float]:
    """Total removed (an int for one-dimensional ``removed``, else an int64 array per budget) and total dloss."""
    if sets and sets[0].removed.ndim == 2:
        removed: np.ndarray | int = np.sum([s.removed[c] for s, c in zip(sets, choice)], axis=0, dtype=np.int64)
    else:
        removed = sum(int(s.removed[c]) for s, c in zip(sets, choice))
    return removed, sum(float(s.dloss[c]) for s, c in zip(sets, choice))


def solve(sets: Sequence[CandidateSet], need: int | Sequence[int] | None = None, tolerance: float | None = None,
          solver: str = "lagrangian", bins: int = 4000) -> list[int] | None:
    """The chosen option index per set, or None when no choice meets the bounds.

    Lossless (``need`` only): total removed at least ``need`` (an int, or one int per budget), least
    total dloss; ties go to the most removed of the first budget. Compact (``tolerance``): total dloss
    at most ``tolerance``, most removed of the first budget (ties: least dloss); ``"milp"`` also accepts
    ``need`` here as lower bounds on every budget. ``bins``: the DP's resolution (removed is counted in
    ``ceil(sum of maxima / bins)`` units, rounded down: the DP never overstates what it removes).

    ``"lagrangian"`` and ``"dp"`` take one budget and one of ``need``/``tolerance``. ``"milp"`` is exact up
    to HiGHS's tolerances: integer budgets are met exactly, the loss optimum and the loss bound hold to
    about 1e-9 of the largest |dloss|.
    """
    if solver not in SOLVERS:
        raise OnnxlrfError(f"unknown solver {solver!r}; known: {', '.join(SOLVERS)}")
    if need is None and tolerance is None:
        raise OnnxlrfError("the knapsack needs need (lossless) or tolerance (compact)")
    shapes = {s.removed.shape[1:] for s in sets}
    if len(shapes) > 1:
        raise OnnxlrfError(f"candidate sets disagree on the number of budgets: {sorted(shapes)}")
    budgets = sets[0].budgets if sets else None
    needs = None if need is None else np.atleast_1d(np.asarray(need, dtype=np.int64))
    if needs is not None and (needs.ndim != 1 or budgets not in (None, len(needs))):
        raise OnnxlrfError(f"need gives {needs.size} budgets, the candidate sets count {budgets}")
    if not sets:
        return [] if (needs is None or bool(np.all(needs <= 0))) and (tolerance is None or tolerance >= 0) else None
    if solver == "milp":
        return _solve_milp(sets, needs, tolerance)
    if budgets != 1:
        raise OnnxlrfError(f"solver {solver!r} handles one budget, the candidate sets count {budgets}: use 'milp'")
    if need is not None and tolerance is not None:
        raise OnnxlrfError(f"solver {solver!r} takes need or tolerance, not both: use 'milp'")
    removed = [s.removed.reshape(-1) for s in sets]
    dloss = [s.dloss for s in sets]
    one_need = None if needs is None else int(needs[0])
    if solver == "dp":
        if any(int(r.min()) < 0 for r in removed):
            raise OnnxlrfError("solver 'dp' needs removed >= 0: use 'lagrangian' or 'milp'")
        return _solve_dp(removed, dloss, one_need, tolerance, bins)
    return _solve_lagrangian(removed, dloss, one_need, tolerance)


# The Lagrangian and DP solvers are the joint planner's original ones, same operations in the same order:
# plans (and so the compressed models) stay byte-identical.

def _lagrangian(removed: list[np.ndarray], dloss: list[np.ndarray], lam: float) -> list[int]:
    """Per set, the option minimizing dloss - lam * removed."""
    return [int(np.argmin(d - lam * r)) for r, d in zip(removed, dloss)]


def _totals(removed: list[np.ndarray], dloss: list[np.ndarray], choice: list[int]) -> tuple[int, float]:
    return (sum(int(r[c]) for r, c in zip(removed, choice)),
            sum(float(d[c]) for d, c in zip(dloss, choice)))


def _solve_lagrangian(removed: list[np.ndarray], dloss: list[np.ndarray], need: int | None,
                      tolerance: float | None) -> list[int] | None:
    """Lossless (``need``: units to remove, min dL) or compact (``tolerance``: max dL, max removed)."""
    scale = max(max((float(np.abs(d).max()) for d in dloss), default=1.0), 1e-12)
    lo, hi = 0.0, scale * 1e6  # lambda in loss per unit; hi removes all it can
    feasible = (lambda c: _totals(removed, dloss, c)[0] >= need) if need is not None else \
        (lambda c: _totals(removed, dloss, c)[1] <= tolerance)
    if need is not None:
        if not feasible(_lagrangian(removed, dloss, hi)):
            return None
        for _ in range(200):  # smallest lambda that still removes enough
            mid = math.sqrt(lo * hi) if lo > 0 else hi * 1e-12
            lo, hi = (lo, mid) if feasible(_lagrangian(removed, dloss, mid)) else (mid, hi)
            if hi - lo <= 1e-9 * hi:
                break
        return _lagrangian(removed, dloss, hi)
    if not feasible(_lagrangian(removed, dloss, 0.0)):
        return None
    for _ in range(200):  # largest lambda whose predicted change stays within tolerance
        mid = math.sqrt(lo * hi) if lo > 0 else hi * 1e-12
        lo, hi = (mid, hi) if feasible(_lagrangian(removed, dloss, mid)) else (lo, mid)
        if hi - lo <= 1e-9 * hi:
            break
    return _lagrangian(removed, dloss, lo)


def _solve_dp(removed: list[np.ndarray], dloss: list[np.ndarray], need: int | None, tolerance: float | None,
              bins: int) -> list[int] | None:
    """Exact multiple-choice knapsack over removed counted in units (floor: never overstates)."""
    total = sum(int(r.max()) for r in removed)
    unit = max(1, math.ceil(total / bins))
    size = total // unit + 1
    best = np.full(size, np.inf)
    best[0] = 0.0
    picks = []
    for r, d_set in zip(removed, dloss):
        units = r // unit
        new = np.full(size, np.inf)
        pick = np.zeros(size, dtype=np.int64)
        for c, (u, d) in enumerate(zip(units, d_set)):
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
    for r, pick in zip(reversed(removed), reversed(picks)):
        c = int(pick[target])
        choice.append(c)
        target -= int(r[c] // unit)
    return choice[::-1]


def _solve_milp(sets: Sequence[CandidateSet], needs: np.ndarray | None, tolerance: float | None
                ) -> list[int] | None:
    """Binary x[g, c], one option per group, with scipy's HiGHS.

    Lossless is solved in two passes: the least loss, then, with the loss bounded by that optimum,
    the compact objective; so exact ties in loss go deterministically to the most removed.
    """
    try:
        from scipy import sparse
        from scipy.optimize import Bounds, LinearConstraint, milp
    except ImportError as exc:
        raise OnnxlrfError("solver 'milp' needs scipy: pip install 'scipy>=1.9'") from exc
    sizes = [len(s.dloss) for s in sets]
    starts = np.cumsum([0] + sizes[:-1])
    n = sum(sizes)
    removed = np.concatenate([s.removed.reshape(len(s.dloss), -1) for s in sets]).astype(np.float64)
    dloss = np.concatenate([s.dloss for s in sets])
    scale = (float(np.abs(dloss).max()) or 1.0) / _LOSS_RESOLUTION
    scaled = dloss / scale
    one_each = LinearConstraint(sparse.csr_array((np.ones(n), (np.repeat(np.arange(len(sets)), sizes), np.arange(n))),
                                                 shape=(len(sets), n)), 1, 1)
    fixed = [one_each] + ([] if needs is None else [LinearConstraint(removed.T, needs.astype(np.float64), np.inf)])

    def run(objective: np.ndarray, loss_bound: float | None) -> list[int] | None:
        constraints = fixed + ([] if loss_bound is None else [LinearConstraint(scaled[None, :], -np.inf, loss_bound)])
        result = milp(objective, constraints=constraints, integrality=np.ones(n), bounds=Bounds(0, 1),
                      options={"mip_rel_gap": 0.0})
        if result.status == 2:
            return None
        if result.status != 0:
            raise OnnxlrfError(f"solver 'milp' failed: {result.message}")
        return [int(np.argmax(result.x[start:start + size])) for start, size in zip(starts, sizes)]

    # Most removed of the first budget; the loss term's total spread is below 1, one unit removed: it only breaks ties.
    compact_objective = -removed[:, 0] + scaled / (4 * len(sets) * _LOSS_RESOLUTION)
    if tolerance is not None:
        if tolerance == -math.inf:
            return None
        choice = run(compact_objective, None if tolerance == math.inf else tolerance / scale)
    else:
        least_loss = run(scaled, None)
        if least_loss is None:
            return None
        # The tie-break pass may trade a loss within HiGHS's tolerance for more removed: only a true tie counts.
        least = totals(sets, least_loss)[1]
        choice = run(compact_objective, least / scale)
        if choice is None or totals(sets, choice)[1] > least:
            choice = least_loss
    if choice is not None and needs is not None and not np.all(np.atleast_1d(totals(sets, choice)[0]) >= needs):
        raise OnnxlrfError("solver 'milp' returned a choice that misses a budget (HiGHS tolerance); "
                           "try solver 'dp' or 'lagrangian'")
    return choice
