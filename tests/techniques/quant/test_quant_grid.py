"""techniques.quant.grid: symmetric grids per channel and per block, round to nearest."""

from __future__ import annotations

import numpy as np
import pytest

from onnxlrf.techniques.quant.grid import (
    dequantize_blocks,
    dequantize_per_channel,
    largest_level,
    quantize_blocks,
    quantize_per_channel,
)


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
def test_per_channel_levels_are_symmetric_and_error_is_half_a_step(bits):
    weight = np.random.default_rng(bits).standard_normal((6, 3, 3, 3)).astype(np.float32)
    weight[2] = 0.0  # a channel of zeros stays exact
    levels, scales = quantize_per_channel(weight, 0, bits)
    assert levels.dtype == np.int8 and scales.shape == (6,) and (scales > 0).all()
    assert np.abs(levels).max() == largest_level(bits)
    restored = dequantize_per_channel(levels, scales, 0)
    assert (np.abs(restored - weight) <= scales[:, None, None, None] / 2 + 1e-6).all()
    assert not restored[2].any()
    # Each channel's largest |w| is exactly on the grid.
    assert np.allclose(np.abs(restored).reshape(6, -1).max(1), np.abs(weight).reshape(6, -1).max(1))


def test_per_channel_axis_1_for_matmul_weights():
    weight = np.array([[1.0, 10.0], [-0.5, 5.0]], np.float32)
    levels, scales = quantize_per_channel(weight, 1, 8)
    assert np.allclose(scales, [1 / 127, 10 / 127]) and levels[0].tolist() == [127, 127]


def test_blocks_run_along_the_axis_and_the_last_may_be_short():
    weight = np.random.default_rng(0).standard_normal((10, 3)).astype(np.float32)
    levels, scales = quantize_blocks(weight, 0, 4, 4)
    assert levels.shape == (10, 3) and scales.shape == (3, 3)
    for block in range(3):
        rows = slice(4 * block, 4 * block + 4)
        assert np.allclose(scales[block], np.abs(weight[rows]).max(0) / 7)
    restored = dequantize_blocks(levels, scales, 0, 4)
    assert (np.abs(restored - weight) <= np.repeat(scales, 4, 0)[:10] / 2 + 1e-6).all()
    levels_t, scales_t = quantize_blocks(weight.T.copy(), 1, 4, 4)
    assert np.array_equal(levels_t, levels.T) and np.array_equal(scales_t, scales.T)


def test_ties_round_to_even_like_quantize_linear():
    weight = np.array([[2.5, 1.5, -2.5, 127.0]], np.float32)
    levels, _ = quantize_per_channel(weight, 0, 8)
    assert levels.tolist() == [[2, 2, -2, 127]]
