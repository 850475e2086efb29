"""Integer grids: symmetric ones for weights, per output channel or per block of inputs, round to nearest; and the
per-tensor grids of activations (asymmetric uint8 or symmetric int8).

A ``bits``-bit symmetric grid has the levels ``-(2^(bits-1) - 1) .. 2^(bits-1) - 1`` times a scale (zero
point 0, the form TensorRT accepts; the most negative level is left out so the grid is symmetric).
The scale of a channel (block) maps its largest ``|w|`` to the largest level ("absmax").
"""

from __future__ import annotations

import numpy as np

# A channel (block) of zeros gets this scale: any positive scale represents it exactly, and runtimes
# reject a zero scale.
ZERO_CHANNEL_SCALE = 1.0
UINT8_LEVELS = 255
INT8_LEVEL = 127


def largest_level(bits: int) -> int:
    """The largest integer level of a symmetric ``bits``-bit grid (127 for 8 bits, 1 for 2 bits)."""
    return 2 ** (bits - 1) - 1


def absmax_scales(weight: np.ndarray, axis: int, bits: int) -> np.ndarray:
    """Per index of ``axis``: the scale mapping the largest ``|w|`` over the other axes to the largest level."""
    others = tuple(i for i in range(weight.ndim) if i != axis)
    peak = np.abs(weight).max(axis=others).astype(np.float64)
    return np.where(peak > 0, peak / largest_level(bits), ZERO_CHANNEL_SCALE).astype(np.float32)


def round_to_grid(weight: np.ndarray, scales: np.ndarray, bits: int) -> np.ndarray:
    """``weight / scales`` rounded to the nearest level (ties to even, as QuantizeLinear does), clipped, as int8.

    ``scales`` broadcasts against ``weight``."""
    level = largest_level(bits)
    return np.clip(np.rint(weight / scales), -level, level).astype(np.int8)


def _broadcast(scales: np.ndarray, ndim: int, axis: int) -> np.ndarray:
    shape = [1] * ndim
    shape[axis] = scales.shape[0]
    return scales.reshape(shape)


def quantize_per_channel(weight: np.ndarray, axis: int, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Integer levels (int8 array, ``weight``'s shape) and one float32 scale per index of ``axis``."""
    scales = absmax_scales(weight, axis, bits)
    return round_to_grid(weight, _broadcast(scales, weight.ndim, axis), bits), scales


def quantize_blocks(weight: np.ndarray, axis: int, block_size: int, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Integer levels and block scales of a 2-D ``weight``, blocks of ``block_size`` along ``axis``.

    The scales have ``weight``'s shape with ``axis`` shortened to ``ceil(size / block_size)`` (the last block
    may be short), the layout of DequantizeLinear's ``block_size`` (opset 21).
    """
    moved = np.moveaxis(weight, axis, 0)
    size, blocks = moved.shape[0], -(-moved.shape[0] // block_size)
    padded = np.zeros((blocks * block_size,) + moved.shape[1:], dtype=weight.dtype)
    padded[:size] = moved
    grouped = padded.reshape(blocks, block_size, *moved.shape[1:])
    peak = np.abs(grouped).max(axis=1).astype(np.float64)
    scales = np.where(peak > 0, peak / largest_level(bits), ZERO_CHANNEL_SCALE).astype(np.float32)
    levels = round_to_grid(grouped, scales[:, None], bits).reshape(padded.shape)[:size]
    return np.moveaxis(levels, 0, axis), np.moveaxis(scales, 0, axis)


def dequantize_per_channel(levels: np.ndarray, scales: np.ndarray, axis: int) -> np.ndarray:
    """The float32 weight the levels stand for (what DequantizeLinear computes)."""
    return (levels.astype(np.float32) * _broadcast(scales, levels.ndim, axis)).astype(np.float32)


def dequantize_blocks(levels: np.ndarray, scales: np.ndarray, axis: int, block_size: int) -> np.ndarray:
    """The float32 weight of block-quantized levels (scales repeated over each block)."""
    repeated = np.repeat(scales, block_size, axis=axis)
    repeated = np.take(repeated, np.arange(levels.shape[axis]), axis=axis)
    return (levels.astype(np.float32) * repeated).astype(np.float32)


def uint8_params(low: float, high: float) -> tuple[np.float32, np.uint8]:
    """Scale and zero point of an asymmetric uint8 grid covering [low, high] and 0 (as onnxruntime's quantizer)."""
    low, high = min(low, 0.0), max(high, 0.0)
    if high == low:
        return np.float32(1.0), np.uint8(0)
    scale = (high - low) / UINT8_LEVELS
    return np.float32(scale), np.uint8(np.clip(round(-low / scale), 0, UINT8_LEVELS))


def int8_scale(low: float, high: float) -> np.float32:
    """Scale of a symmetric int8 grid (zero point 0) covering [low, high]."""
    peak = max(abs(low), abs(high))
    return np.float32(peak / INT8_LEVEL if peak > 0 else 1.0)


def round_activation(values: np.ndarray, low: float, high: float, symmetric: bool) -> np.ndarray:
    """``values`` through QuantizeLinear and DequantizeLinear on the grid of [low, high]: asymmetric uint8
    (:func:`uint8_params`) or symmetric int8 (:func:`int8_scale`), rounding half to even as they do."""
    if symmetric:
        scale = float(int8_scale(low, high))
        return np.clip(np.rint(values / scale), -INT8_LEVEL - 1, INT8_LEVEL) * scale
    scale, zero = (float(v) for v in uint8_params(low, high))
    return (np.clip(np.rint(values / scale) + zero, 0, UINT8_LEVELS) - zero) * scale
