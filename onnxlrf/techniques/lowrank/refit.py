"""Sequential refit of a plan's factors: each layer corrects what the layers before it changed.

The planners choose each layer's kept components as if it were the only
layer truncated (METHOD.md 2 to 4). In the rewritten model every later layer
sees inputs that earlier truncations have already changed, and the errors
compound. The refit (asymmetric reconstruction, as in Zhang et al.,
"Accelerating Very Deep Convolutional Networks for Classification and
Detection", 2016) goes through the planned layers in graph order and replaces
each layer's planned rank-r weight ``W_r`` by the rank-r ``W'`` and bias change
that best reproduce, on the calibration split, what the planned layer computes
on the original model's inputs:

    min over rank(W') <= r of  E || (W_r x + b) - (W' x' + b') ||^2

``x`` is the layer's input in the original model, ``x'`` its input in the model
refit so far. The target is the planned layer, not the original one, so the
components the joint method dropped because the loss wants them gone stay
dropped; only the compounding is corrected. Closed form (reduced-rank
regression): with ``C = Cov(x')`` and ``K = Cov(x, x')``, ``W_ls = W_r K C^-1``
and ``W' = P W_ls``, where ``P`` projects on the top r left singular vectors of
``W_ls C^(1/2)``; the bias changes by ``W_r E[x] - W' E[x']``. Ranks, and so
the plan's sizes, do not change. No gradient step is taken: this is not
fine-tuning.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from typing import Any

import numpy as np
import onnx

from ...errors import OnnxlrfError
from ...graph.layers import (
    Layer,
    find_layers,
    matrices_to_weight,
    weight_array,
    weight_matrices,
)
from ...graph.linalg import svd
from ...measure.coverage import analysis_exclusion
from ...measure.sensitivity import DAMPING
from ...measure.sequential import PairedInputs
from ...measure.torch_graph import heap_reuse
from ...planning.plan import LowRankEntry, Plan
from ...progress import ProgressLike, as_progress

__all__ = ["refit_plan"]

# Rows per input feature a layer's covariances are estimated from. A conv's calibration
# images give far more (1,000 CIFAR images: 1M positions for 144 features), and the products
# with all of them were most of the refit's time.
ROWS_PER_FEATURE = 256


def _planned_matrices(model: onnx.ModelProto, plan: Plan, entry: LowRankEntry, layer: Layer) -> tuple[np.ndarray, np.ndarray]:
    """The planned truncation as ``(g, m, n)`` matrices of its decomposition, and the bias change it comes with."""
    dense = weight_matrices(weight_array(model, layer).astype(np.float64), layer, entry.decomposition)
    x, s, yt = plan.bases[layer.weight][:3] if entry.basis != "svd" else svd(dense)
    idx = np.asarray(entry.kept_indices(), dtype=np.int64)
    planned = (x[:, :, idx] * s[:, None, idx].astype(np.float64)) @ yt[:, idx, :]
    shift = np.zeros(layer.groups * layer.out_features)
    if entry.bias_correction:
        shift = -np.einsum("gmn,gn->gm", planned - dense, plan.bases[layer.weight][3]).reshape(-1)
    return planned, shift


def _reduced_rank_fit(target: np.ndarray, cross: np.ndarray, cov: np.ndarray, rank: int) -> np.ndarray:
    """Rank-``rank`` ``W`` minimizing ``E||target x - W x'||^2`` given ``K = Cov(x, x')`` and ``C = Cov(x')``."""
    n = cov.shape[0]
    damped = cov + DAMPING * max(np.trace(cov) / n, 1e-30) * np.eye(n)
    # target K C^-1, damped towards the target itself: where the inputs have no variance (dead
    # channels) the planned weight stands, and unchanged inputs (K = C) give the target exactly.
    least_squares = target + np.linalg.solve(damped, (target @ (cross - cov)).T).T
    evals, evecs = np.linalg.eigh(cov)
    root = (evecs * np.sqrt(np.maximum(evals, 0.0))) @ evecs.T
    u = svd(least_squares @ root)[0][:, :rank]
    return u @ (u.T @ least_squares)


@heap_reuse()
def refit_plan(model: onnx.ModelProto, plan: Plan, dataset: Any, batch_size: int = 100,
               rows_per_feature: int | None = ROWS_PER_FEATURE, progress: ProgressLike = None) -> tuple[Plan, dict]:
    """``plan`` with each refittable layer's factors refit on ``dataset`` (the calibration split).

    A layer's statistics use at most ``rows_per_feature`` rows (positions) per input feature,
    sampled at random from every batch (None: all), and no padding tokens
    (``dataset.token_mask``): the refit reproduces the layer where it can reach the output.
    Batches are of one sample where the graph runs one at a time
    (:func:`~onnxlrf.measure.analysis.samples_per_run`).

    Refittable: planned layers with channel decomposition whose factorized pair
    the rewrite would keep, each with its own weight. The others keep their
    planned factors. Returns the refit plan (``basis="refit"`` entries, their
    weights and bias changes stored in ``plan.bases``) and a summary: the nodes
    refit, and the nodes kept as planned with the reason.
    """
    progress = as_progress(progress)
    layers = {layer.node: layer for layer in find_layers(model)[0]}
    users = Counter(entry.weight for entry in plan.layers if entry.decomposition != "dense")
    entries, skipped, as_planned = [], [], []
    for entry in plan.layers:
        if entry.decomposition == "dense":
            continue
        layer = layers.get(entry.node)
        if layer is None:
            raise OnnxlrfError(f"plan node {entry.node!r} is not a factorizable layer of the model")
        if layer.factorized_params(entry.decomposition, entry.rank) >= layer.params:
            continue  # the rewrite keeps it dense
        why = ("spatial decomposition" if entry.decomposition != "channel" else
               "weight shared with another node" if users[entry.weight] > 1 else analysis_exclusion(layer))
        if why:
            skipped.append({"node": entry.node, "reason": why})
            as_planned.append(entry)
        else:
            entries.append(entry)

    # Layers kept as planned are truncated from the start, so the layers after them see what the rewrite
    # will give them.
    fixed, fixed_shifts = {}, {}
    for entry in as_planned:
        layer = layers[entry.node]
        planned, shift = _planned_matrices(model, plan, entry, layer)
        fixed[entry.weight] = matrices_to_weight(planned, layer, entry.decomposition)
        if entry.bias_correction:
            fixed_shifts[entry.node] = shift
    paired = PairedInputs(model, dataset, batch_size, fixed, fixed_shifts)
    refit_entries, bases = {}, dict(plan.bases)
    by_node = {entry.node: entry for entry in entries}
    for node in progress.track(paired.order(list(by_node)), "refit", unit="layer"):
        entry, layer = by_node[node], layers[node]
        moments = paired.moments(layer, rows_per_feature)
        cov, cross = moments.covariances()
        planned, planned_shift = _planned_matrices(model, plan, entry, layer)
        fitted = np.stack([_reduced_rank_fit(planned[j], cross[j], cov[j], entry.rank)
                           for j in range(layer.groups)])
        shift = planned_shift + (np.einsum("gmn,gn->gm", planned, moments.mean)
                                 - np.einsum("gmn,gn->gm", fitted, moments.mean_changed)).reshape(-1)
        paired.replace(layer, matrices_to_weight(fitted, layer, "channel"), shift)
        u, s, vh = svd(fitted)
        bases[layer.weight] = (u[:, :, :entry.rank].astype(np.float32), s[:, :entry.rank].astype(np.float32),
                               vh[:, :entry.rank].astype(np.float32), None, shift.astype(np.float32))
        refit_entries[node] = dataclasses.replace(entry, basis="refit", keep=None, bias_correction=False)
    layers_out = [refit_entries.get(entry.node, entry) for entry in plan.layers]
    options = {**plan.options, "refit": {"samples": len(dataset), "nodes": len(refit_entries)}}
    refit = dataclasses.replace(plan, layers=layers_out, options=options, bases=bases)
    summary = {"refit": list(refit_entries), "skipped": skipped}
    progress.log(f"refit: {len(refit_entries)} layers refit on {len(dataset)} calibration samples"
                 + (f"; {len(skipped)} kept as planned" if skipped else ""))
    return refit, summary
