"""The torch evaluator's emulation of the types torch lacks (4-bit and 2-bit), FLOAT8E8M0 rounding, N-D Col2Im."""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from onnxlrf.measure.torch_graph import SubByteTensor, TorchGraph, value_from_numpy, value_to_numpy


def _model(nodes: list[onnx.NodeProto], inputs: dict[str, tuple[int, list]], outputs: dict[str, int],
           initializers: list[onnx.TensorProto] = ()) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(n, t, s) for n, (t, s) in inputs.items()],
                              [helper.make_tensor_value_info(n, t, None) for n, t in outputs.items()],
                              list(initializers))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 25)])


def _round_trip(values: list[float], through: int) -> list[float]:
    """``values`` cast to ONNX type ``through`` and back to float, in the torch evaluator."""
    model = _model([helper.make_node("Cast", ["x"], ["narrow"], to=through),
                    helper.make_node("Cast", ["narrow"], ["y"], to=TensorProto.FLOAT)],
                   {"x": (TensorProto.FLOAT, [len(values)])}, {"y": TensorProto.FLOAT})
    return TorchGraph(model)({"x": np.array(values, dtype=np.float32)})[0].tolist()


def test_cast_to_float4e2m1_rounds_to_even_and_saturates():
    # ONNX's float4 table: round to nearest even, beyond +-6 (infinities too) +-6, NaN 6.
    values = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -5.5, 7.0, 1e6, math.inf, -math.inf, math.nan, -0.0]
    assert _round_trip(values, TensorProto.FLOAT4E2M1) == [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, -6.0, 6.0, 6.0, 6.0,
                                                           -6.0, 6.0, -0.0]


def test_cast_to_int4_and_int2_truncates_in_range():
    assert _round_trip([-8.0, -7.5, -0.5, 0.9, 6.99, 7.0], TensorProto.INT4) == [-8.0, -7.0, 0.0, 0.0, 6.0, 7.0]
    assert _round_trip([-2.0, -1.5, 1.5, 3.0], TensorProto.UINT2) == [0.0, 0.0, 1.0, 3.0]
    # Out of range the spec leaves the result undefined; the evaluator gives 0, as onnx's reference does.
    assert _round_trip([-9.0, 8.0, math.nan], TensorProto.INT4) == [0.0, 0.0, 0.0]


def test_cast_from_integers_to_int4_keeps_the_low_bits():
    model = _model([helper.make_node("Cast", ["x"], ["y"], to=TensorProto.INT4)],
                   {"x": (TensorProto.INT32, [5])}, {"y": TensorProto.INT4})
    y = TorchGraph(model)({"x": np.array([-9, -8, 7, 8, 200], dtype=np.int32)})[0]
    assert isinstance(y, SubByteTensor) and y.elem_type == TensorProto.INT4
    assert y.values.tolist() == [7, -8, 7, -8, -8]  # two's complement: 200 = 0b1100_1000


def test_quantize_to_int4_saturates_per_axis():
    x = np.array([[-100.0, -3.0, 2.5, 100.0], [1.0, 3.0, 5.0, 7.0]], dtype=np.float32)
    scale = np.array([1.0, 2.0], dtype=np.float32)
    zero_point = np.array([0, 1], dtype=ml_dtypes.int4)
    model = _model([helper.make_node("QuantizeLinear", ["x", "scale", "zero_point"], ["y"], axis=0)],
                   {"x": (TensorProto.FLOAT, list(x.shape))}, {"y": TensorProto.INT4},
                   [numpy_helper.from_array(scale, "scale"), numpy_helper.from_array(zero_point, "zero_point")])
    y = TorchGraph(model)({"x": x})[0]
    assert y.values.dtype == torch.int8
    # Rounded half to even before the zero point is added: 2.5 -> 2; 5 / 2 -> 2 (+ 1 = 3), 7 / 2 -> 4 (+ 1 = 5).
    assert y.values.tolist() == [[-8, -3, 2, 7], [1, 3, 3, 5]]
    assert value_to_numpy(y).dtype == np.dtype(ml_dtypes.int4)
    np.testing.assert_array_equal(value_to_numpy(y).astype(np.int8), ReferenceEvaluator(model).run(None, {"x": x})[0])


def test_dequantize_int4_initializer_per_block():
    weight = np.array([[-8, -1, 0, 7], [3, 2, 1, -5]], dtype=ml_dtypes.int4)
    scale = np.array([[0.5, 2.0], [1.0, 4.0]], dtype=np.float32)
    zero_point = np.array([[1, -1], [0, 2]], dtype=ml_dtypes.int4)
    model = _model([helper.make_node("DequantizeLinear", ["w", "scale", "zero_point"], ["y"], axis=1, block_size=2)],
                   {}, {"y": TensorProto.FLOAT},
                   [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(scale, "scale"),
                    numpy_helper.from_array(zero_point, "zero_point")])
    graph = TorchGraph(model)
    assert isinstance(graph.constants["w"], SubByteTensor)
    y = graph({})[0]
    assert y.dtype == torch.float32
    assert y.tolist() == [[-4.5, -1.0, 2.0, 16.0], [3.0, 2.0, -4.0, -28.0]]
    np.testing.assert_array_equal(y.numpy(), ReferenceEvaluator(model).run(None, {})[0])


@pytest.mark.parametrize("numpy_dtype, values", [
    (ml_dtypes.int4, [-8, 0, 7]), (ml_dtypes.uint4, [0, 9, 15]), (ml_dtypes.int2, [-2, 0, 1]),
    (ml_dtypes.uint2, [0, 2, 3]), (ml_dtypes.float4_e2m1fn, [-6.0, -0.0, 0.5, 1.5, 4.0])])
def test_sub_byte_arrays_convert_both_ways(numpy_dtype, values):
    array = np.array(values, dtype=np.float32).astype(numpy_dtype)
    value = value_from_numpy(array)
    assert isinstance(value, SubByteTensor)
    converted = value_to_numpy(value)
    assert converted.dtype == array.dtype
    np.testing.assert_array_equal(converted.astype(np.float32), array.astype(np.float32))


@pytest.mark.parametrize("round_mode, saturate, expected", [
    ("up", 1, [1.0, 2.0, 2.0, 2.0**127]),
    ("down", 1, [1.0, 1.0, 1.0, 2.0**127]),
    ("nearest", 1, [1.0, 1.0, 2.0, 2.0**127]),
    ("nearest", 0, [1.0, 1.0, 2.0, math.nan]),
])
def test_cast_to_float8e8m0_rounds_as_asked(round_mode, saturate, expected):
    model = _model([helper.make_node("Cast", ["x"], ["y"], to=TensorProto.FLOAT8E8M0, saturate=saturate,
                                     round_mode=round_mode)],
                   {"x": (TensorProto.FLOAT, [4])}, {"y": TensorProto.FLOAT8E8M0})
    # Infinity: the largest value when saturating (the spec's table), NaN otherwise.
    y = TorchGraph(model)({"x": np.array([1.0, 1.25, 1.5, math.inf], dtype=np.float32)})[0]
    assert y.dtype == torch.float8_e8m0fnu
    np.testing.assert_array_equal(y.float().numpy(), np.array(expected, dtype=np.float32))


def test_col2im_over_three_dims_with_strides_dilations_and_uneven_pads():
    block, image = [2, 2, 3], [5, 4, 6]
    strides, dilations, pads = [2, 1, 1], [1, 2, 1], [1, 0, 1, 0, 1, 2]
    counts = [(image[i] + pads[i] + pads[i + 3] - dilations[i] * (block[i] - 1) - 1) // strides[i] + 1
              for i in range(3)]
    x = np.random.default_rng(0).normal(size=(2, 3 * math.prod(block), math.prod(counts))).astype(np.float32)
    model = _model([helper.make_node("Col2Im", ["x", "image", "block"], ["y"], strides=strides, dilations=dilations,
                                     pads=pads)],
                   {"x": (TensorProto.FLOAT, list(x.shape))}, {"y": TensorProto.FLOAT},
                   [numpy_helper.from_array(np.array(image, dtype=np.int64), "image"),
                    numpy_helper.from_array(np.array(block, dtype=np.int64), "block")])
    y = TorchGraph(model)({"x": x})[0]
    np.testing.assert_allclose(y.numpy(), ReferenceEvaluator(model).run(None, {"x": x})[0], rtol=1e-6, atol=1e-6)
