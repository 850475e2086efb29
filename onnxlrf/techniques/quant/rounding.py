"""Loss-aware rounding of a weight to its per-channel grid (METHOD.md section 9, CET reconstructed).

Round-to-nearest makes each entry's error as small as it can be; the loss feels the error through the
quadratic form ``tr(B delta A delta^T)``. With ``B`` taken as its diagonal ``b_i`` the output channels
(rows) decouple, and each row minimizes

    g_i . (q - w_i) + c/2 * b_i (q - w_i) A (q - w_i)^T      (c: kappa times the fitted curvature scale)

over its grid: ``(q - t_i) A (q - t_i)^T`` toward the first-order-shifted target
``t_i = w_i - (c b_i)^-1 g_i A^-1`` (no shift in an analysis without first-order terms). It is solved as
GPTQ/OBQ solve it: entries rounded one input at a time, each error fed back to the inputs not yet rounded
along ``A^-1``'s Cholesky factor, so the errors land where ``A`` is flat. The scale of each row comes first,
from a search of the clipping ratio under the same metric (round to nearest at each ratio).

With block scales (Gemm/MatMul weights, one scale per ``block_size`` consecutive inputs of a row) the inputs are
rounded in their own order, as GPTQ rounds with groups: each block's scales are searched when its first input
comes, on the weights as the errors fed back so far have moved them, in the block's part of the metric.
"""

from __future__ import annotations

import numpy as np

from .grid import ZERO_CHANNEL_SCALE, largest_level

# Clipping ratios the scale search tries (1: absmax).
CLIP_RATIOS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7)
# A's diagonal is raised by this share of its mean before inverting (GPTQ's dampening): inputs the
# calibration split never excites still get a finite, positive curvature.
DAMPING = 0.01


def loss_aware_levels(weight: np.ndarray, moment: np.ndarray, bits: int, gradient: np.ndarray | None = None,
                      curvature: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Integer levels and per-row scales of ``(g, m, n)`` weight matrices.

    ``moment``: ``(g, n, n)`` input second moment ``A``; ``gradient``: ``(g, m, n)`` mean loss gradient as it
    enters the prediction (None or zeros: no first-order shift); ``curvature``: ``(g, m)`` ``c b_i``, needed
    with a gradient. Returns levels ``(g, m, n)`` int8 within the symmetric ``bits``-bit grid and scales
    ``(g, m)`` float32.
    """
    level = largest_level(bits)
    g, m, n = weight.shape
    levels = np.empty((g, m, n), dtype=np.int8)
    scales = np.empty((g, m), dtype=np.float32)
    for j in range(g):
        w = weight[j].astype(np.float64)
        hessian = _damped(moment[j].astype(np.float64))
        target = w if gradient is None else _shifted_target(w, hessian, gradient[j], curvature[j])
        scales[j] = _searched_scales(w, target, hessian, level)
        levels[j] = _error_feedback_round(target, hessian, scales[j].astype(np.float64), level)
    return levels, scales


def loss_aware_block_levels(weight: np.ndarray, moment: np.ndarray, bits: int, block_size: int,
                            gradient: np.ndarray | None = None, curvature: np.ndarray | None = None
                            ) -> tuple[np.ndarray, np.ndarray]:
    """Integer levels ``(m, n)`` int8 and block scales ``(m, ceil(n / block_size))`` float32 of an ``(m, n)`` weight
    matrix rounded with error feedback in the metric of its input's second moment ``moment`` ``(n, n)``, toward
    the first-order-shifted target where ``gradient`` ``(m, n)`` and ``curvature`` ``(m,)`` are given (as
    :func:`loss_aware_levels`); the last block may be short."""
    level = largest_level(bits)
    hessian = _damped(moment.astype(np.float64))
    upper = np.linalg.cholesky(np.linalg.inv(hessian)).T  # A^-1 = U^T U
    w = weight.astype(np.float64)
    w = w.copy() if gradient is None else _shifted_target(w, hessian, gradient, curvature)
    m, n = w.shape
    levels = np.empty((m, n), dtype=np.int8)
    scales = np.empty((m, -(-n // block_size)), dtype=np.float64)
    for i in range(n):
        block = i // block_size
        if i % block_size == 0:
            inputs = slice(i, min(i + block_size, n))
            scales[:, block] = _searched_scales(w[:, inputs], w[:, inputs], hessian[inputs, inputs], level)
        q = np.clip(np.rint(w[:, i] / scales[:, block]), -level, level)
        levels[:, i] = q
        error = (w[:, i] - q * scales[:, block]) / upper[i, i]
        w[:, i + 1:] -= np.outer(error, upper[i, i + 1:])
    return levels, scales.astype(np.float32)


def _damped(moment: np.ndarray) -> np.ndarray:
    diag = np.diag(moment)
    damp = DAMPING * max(float(diag.mean()), 1e-12)
    return moment + damp * np.eye(moment.shape[0])


def _shifted_target(w: np.ndarray, hessian: np.ndarray, gradient: np.ndarray, curvature: np.ndarray) -> np.ndarray:
    """``w_i - (c b_i)^-1 g_i A^-1`` for rows with curvature; rows the loss does not curve keep ``w_i``."""
    gradient = gradient.astype(np.float64)
    if not np.any(gradient):
        return w
    curved = curvature > 1e-12 * max(float(curvature.max()), 1e-30)
    shift = np.linalg.solve(hessian, gradient.T).T  # g_i A^-1 per row (A symmetric)
    out = w.copy()
    out[curved] -= shift[curved] / curvature[curved, None]
    return out


def _searched_scales(w: np.ndarray, target: np.ndarray, hessian: np.ndarray, level: int) -> np.ndarray:
    """Per row, the clipping ratio of ``|w|``'s peak whose round-to-nearest error of ``target`` is least in
    the ``A`` metric."""
    peak = np.abs(w).max(axis=1)
    best_scale = np.where(peak > 0, peak / level, ZERO_CHANNEL_SCALE)
    best_cost = np.full(w.shape[0], np.inf)
    for ratio in CLIP_RATIOS:
        scale = np.where(peak > 0, ratio * peak / level, ZERO_CHANNEL_SCALE)
        error = np.clip(np.rint(target / scale[:, None]), -level, level) * scale[:, None] - target
        cost = np.einsum("mn,mn->m", error @ hessian, error)
        better = cost < best_cost
        best_cost[better], best_scale[better] = cost[better], scale[better]
    return best_scale


def _error_feedback_round(target: np.ndarray, hessian: np.ndarray, scales: np.ndarray, level: int) -> np.ndarray:
    """Round ``target``'s rows to their grids one input at a time, inputs of largest curvature first, each
    rounding error spread over the inputs still to round along the upper Cholesky factor of ``A^-1``."""
    order = np.argsort(-np.diag(hessian), kind="stable")
    hessian = hessian[np.ix_(order, order)]
    upper = np.linalg.cholesky(np.linalg.inv(hessian)).T  # A^-1 = U^T U
    w = target[:, order].copy()
    out = np.empty(w.shape, dtype=np.int8)
    for i in range(w.shape[1]):
        q = np.clip(np.rint(w[:, i] / scales), -level, level)
        out[:, i] = q
        error = (w[:, i] - q * scales) / upper[i, i]
        w[:, i + 1:] -= np.outer(error, upper[i, i + 1:])
    levels = np.empty_like(out)
    levels[:, order] = out
    return levels
