"""The multiple-choice knapsack: exact solvers agree, the Lagrangian is never better than exact, bounds hold."""

import itertools
import sys

import numpy as np
import pytest

from onnxlrf.errors import OnnxlrfError
from onnxlrf.planning.knapsack import SOLVERS, CandidateSet, solve, totals


def random_sets(rng: np.random.Generator, budgets: int = 0, groups: int = 6, options: int = 5,
                most: int = 30) -> list[CandidateSet]:
    """Small integer costs (the DP with its default bins is exact on them), option 0 unchanged.

    ``budgets`` 0: one-dimensional ``removed``; k >= 1: shape (n, k)."""
    sets = []
    for g in range(groups):
        n = int(rng.integers(1, options + 1))
        shape = (n - 1,) if budgets == 0 else (n - 1, budgets)
        removed = np.concatenate([np.zeros((1,) + shape[1:], dtype=np.int64), rng.integers(0, most + 1, shape)])
        dloss = np.concatenate([[0.0], rng.uniform(-0.1, 1.0, n - 1)])
        sets.append(CandidateSet(removed, dloss, key=g))
    return sets


def loss_slack(sets: list[CandidateSet]) -> float:
    """HiGHS's optimality and feasibility tolerances, in loss units (1e-9 of the largest |dloss|)."""
    return 1e-9 * max(float(np.abs(s.dloss).max()) for s in sets) * len(sets)


def brute_force(sets: list[CandidateSet], need: list[int] | None, tolerance: float | None) -> tuple | None:
    """The best (objective, removed, dloss) over all choices: least dloss (lossless), most removed[0] (compact)."""
    best = None
    for choice in itertools.product(*(range(len(s.dloss)) for s in sets)):
        removed, dloss = totals(sets, choice)
        if (need is not None and np.any(removed < need)) or (tolerance is not None and dloss > tolerance):
            continue
        objective = dloss if tolerance is None else -int(np.atleast_1d(removed)[0])
        if best is None or objective < best[0]:
            best = (objective, removed, dloss)
    return best


def test_exact_solvers_agree_and_lagrangian_is_never_better():
    for seed in range(120):
        rng = np.random.default_rng(seed)
        sets = random_sets(rng)
        most = sum(int(s.removed.max()) for s in sets)
        need = int(rng.integers(1, most + 10))  # past `most`: infeasible
        lossless = {solver: solve(sets, need=need, solver=solver) for solver in SOLVERS}
        if need > most:
            assert all(choice is None for choice in lossless.values()), seed
            continue
        assert all(choice is not None for choice in lossless.values()), seed
        removed, dloss = zip(*(totals(sets, lossless[solver]) for solver in SOLVERS))
        assert min(removed) >= need, seed
        lag, dp, milp = dloss
        assert milp == pytest.approx(dp, abs=loss_slack(sets)), seed
        assert lag >= milp - loss_slack(sets), seed

        tolerance = float(rng.uniform(-0.3, 3.0))
        compact = {solver: solve(sets, tolerance=tolerance, solver=solver) for solver in SOLVERS}
        floor = sum(float(s.dloss.min()) for s in sets)  # least total dloss any choice reaches
        if tolerance < floor:
            assert all(choice is None for choice in compact.values()), seed
            continue
        removed, dloss = zip(*(totals(sets, compact[solver]) for solver in SOLVERS))
        assert dloss[0] <= tolerance and dloss[1] <= tolerance and dloss[2] <= tolerance + loss_slack(sets), seed
        assert removed[2] == removed[1] >= removed[0], seed


def test_milp_with_two_budgets_matches_brute_force():
    for seed in range(80):
        rng = np.random.default_rng(1000 + seed)
        sets = random_sets(rng, budgets=2, groups=4, options=4, most=10)
        most = np.sum([s.removed.max(axis=0) for s in sets], axis=0)
        need = [int(rng.integers(0, m + 3)) for m in most]
        choice = solve(sets, need=need, solver="milp")
        best = brute_force(sets, need, None)
        assert (choice is None) == (best is None), seed
        if choice is not None:
            removed, dloss = totals(sets, choice)
            assert removed.shape == (2,) and np.all(removed >= need), seed
            assert dloss == pytest.approx(best[2], abs=loss_slack(sets)), seed

        tolerance = float(rng.uniform(0.0, 2.0))  # compact, with need as lower bounds on both budgets
        need = [int(rng.integers(0, m // 2 + 1)) for m in most]
        choice = solve(sets, need=need, tolerance=tolerance, solver="milp")
        best = brute_force(sets, need, tolerance)
        assert (choice is None) == (best is None), seed
        if choice is not None:
            removed, dloss = totals(sets, choice)
            assert np.all(removed >= need) and dloss <= tolerance + loss_slack(sets), seed
            assert removed[0] == -best[0], seed


def test_lagrangian_misses_the_optimum_on_non_convex_options():
    """Why the exact solvers exist: the Lagrangian only reaches points on each set's lower convex hull.

    B's middle option (5 removed for 3.0) lies above the line from unchanged to its last option (10 for
    4.0), so no multiplier picks it; the exact optimum needs it."""
    sets = [CandidateSet(np.array([0, 10]), np.array([0.0, 1.0]), key="A"),
            CandidateSet(np.array([0, 5, 10]), np.array([0.0, 3.0, 4.0]), key="B")]
    for solver in ("dp", "milp"):
        assert solve(sets, need=15, solver=solver) == [1, 1]
        assert solve(sets, tolerance=4.0, solver=solver) == [1, 1]
    assert solve(sets, need=15) == [1, 2]  # removes 20 at dloss 5.0 instead of 15 at 4.0
    assert solve(sets, tolerance=4.0) == [1, 0]  # removes 10 instead of 15


def test_ties_and_edge_cases():
    sets = [CandidateSet(np.array([0, 2, 3]), np.array([0.0, 1.0, 1.0]))]
    assert solve(sets, need=1, solver="milp") == [2]  # equal loss: the one that removes more
    assert solve(sets, tolerance=1.0, solver="milp") == [2]
    sets = [CandidateSet(np.array([0, 2, 2]), np.array([0.0, 1.0, 0.5]))]
    assert solve(sets, tolerance=5.0, solver="milp") == [2]  # equal removal: the lower loss
    for solver in SOLVERS:
        assert solve([], need=0, solver=solver) == [] and solve([], need=1, solver=solver) is None
        assert solve(sets, tolerance=-np.inf, solver=solver) is None
    assert solve(sets, tolerance=np.inf, solver="milp") in ([1], [2])
    two = [CandidateSet(np.array([[0, 0], [3, 4]]), np.array([0.0, 1.0]))]
    removed, dloss = totals(two, [1])
    assert removed.tolist() == [3, 4] and dloss == 1.0
    assert totals(sets, [2]) == (2, 0.5)


def test_bad_input_is_one_line_error():
    with pytest.raises(OnnxlrfError, match="removed must be"):
        CandidateSet(np.array([0, 1]), np.array([0.0]))
    with pytest.raises(OnnxlrfError, match="integer units"):
        CandidateSet(np.array([0.0, 1.0]), np.array([0.0, 1.0]))
    two = [CandidateSet(np.array([[0, 0], [3, 4]]), np.array([0.0, 1.0]))]
    for solver in ("lagrangian", "dp"):
        with pytest.raises(OnnxlrfError, match="one budget"):
            solve(two, need=[1, 1], solver=solver)
    with pytest.raises(OnnxlrfError, match="need gives 1 budgets"):
        solve(two, need=1, solver="milp")
    with pytest.raises(OnnxlrfError, match="disagree"):
        solve(two + [CandidateSet(np.array([0, 1]), np.array([0.0, 1.0]))], need=[1, 1], solver="milp")
    with pytest.raises(OnnxlrfError, match="unknown solver"):
        solve(two, need=[1, 1], solver="greedy")
    with pytest.raises(OnnxlrfError, match="need .* or tolerance"):
        solve(two, solver="milp")


def test_milp_without_scipy_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "scipy.optimize", None)
    with pytest.raises(OnnxlrfError, match="pip install"):
        solve([CandidateSet(np.array([0, 1]), np.array([0.0, 1.0]))], need=1, solver="milp")
