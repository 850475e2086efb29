"""techniques.quant.rounding: loss-aware rounding lands the error where the loss's curvature is flat."""

from __future__ import annotations

import numpy as np
import pytest

from onnxlrf.techniques.quant.grid import dequantize_per_channel, largest_level, quantize_per_channel
from onnxlrf.techniques.quant.rounding import loss_aware_levels


def correlated_inputs(n: int, seed: int = 0) -> np.ndarray:
    """A = E[x x^T] of ReLU'd, correlated inputs, as a conv's patches have."""
    rng = np.random.default_rng(seed)
    x = np.maximum(rng.standard_normal((4000, n)) @ (np.eye(n) + 0.2 * rng.standard_normal((n, n))), 0)
    return x.T @ x / len(x)


def metric(error: np.ndarray, moment: np.ndarray) -> float:
    return float(np.einsum("mn,nk,mk->", error, moment, error))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_error_in_the_curvature_metric_is_below_round_to_nearest(bits):
    moment = correlated_inputs(72)
    weight = (np.random.default_rng(1).standard_normal((16, 72)) * 0.1).astype(np.float32)
    levels, scales = loss_aware_levels(weight[None], moment[None], bits)
    assert levels.dtype == np.int8 and np.abs(levels).max() <= largest_level(bits) and (scales > 0).all()
    nearest = dequantize_per_channel(*quantize_per_channel(weight, 0, bits), 0) - weight
    aware = levels[0] * scales[0][:, None].astype(np.float64) - weight
    # Error feedback and the clipping search together cut the metric well below round to nearest.
    assert metric(aware, moment) < 0.7 * metric(nearest, moment)


def test_the_first_order_shift_lowers_the_predicted_loss_change():
    moment = correlated_inputs(32, seed=2)
    rng = np.random.default_rng(3)
    weight = (rng.standard_normal((8, 32)) * 0.1).astype(np.float32)
    gradient = rng.standard_normal((8, 32)) * 0.05
    curvature = np.full(8, 4.0)

    def predicted(levels, scales):
        delta = levels[0] * scales[0][:, None].astype(np.float64) - weight
        return float(np.sum(gradient * delta)) + 0.5 * float(np.einsum("m,mn,nk,mk->", curvature, delta, moment, delta))

    plain = predicted(*loss_aware_levels(weight[None], moment[None], 3))
    shifted = predicted(*loss_aware_levels(weight[None], moment[None], 3, gradient[None], curvature[None]))
    assert shifted < plain


def test_inputs_the_split_never_excites_and_zero_rows_round_to_finite_levels():
    moment = correlated_inputs(24, seed=4)
    moment[5, :] = moment[:, 5] = 0.0  # an input that is always zero on the calibration split
    weight = (np.random.default_rng(5).standard_normal((6, 24)) * 0.1).astype(np.float32)
    weight[2] = 0.0
    levels, scales = loss_aware_levels(weight[None], moment[None], 4)
    assert np.isfinite(scales).all() and (levels[0, 2] == 0).all()

