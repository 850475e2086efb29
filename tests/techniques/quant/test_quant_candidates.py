"""techniques.quant.candidates: the options' loss predictions and roundings."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
from onnx import numpy_helper
from test_refit import _dataset, mlp

from onnxlrf.graph.layers import find_layers
from onnxlrf.graph.quantizable import find_quantizable
from onnxlrf.measure.analysis import AnalysisOptions
from onnxlrf.runtime.sessions import make_session
from onnxlrf.techniques.quant.candidates import (block_quantization_error, hessian_trace_dloss, layer_options,
                                                 option_weight)
from onnxlrf.techniques.quant.grid import dequantize_blocks
from onnxlrf.techniques.quant.technique import Quant


def test_hessian_trace_prediction_is_the_kfac_one_where_the_curvature_is_isotropic():
    """With B = b I and A = a I the K-FAC quadratic tr(B dW A dW^T) / 2 is b a ||dW||^2 / 2: exactly what the trace
    estimate (mean Hessian diagonal times ||dW||^2 / 2) gives; with anisotropic A they differ."""
    rng = np.random.default_rng(0)
    delta = rng.standard_normal((1, 3, 5))
    ls = SimpleNamespace(output_factor=2.0 * np.eye(3)[None], input_moment=0.5 * np.eye(5)[None],
                         curvature_scale=1.5)
    exact = 1.5 * 0.5 * float(np.sum((ls.output_factor @ delta @ ls.input_moment) * delta))
    assert np.isclose(hessian_trace_dloss(ls, delta, kappa=1.0), exact)
    assert np.isclose(hessian_trace_dloss(ls, delta, kappa=2.0), 2 * exact)
    ls.input_moment = np.diag([5.0, 0.1, 0.1, 0.1, 0.1])[None]  # same trace, curvature along one input
    along = np.zeros((1, 3, 5))
    along[0, :, 0] = 1.0
    assert hessian_trace_dloss(ls, along, 1.0) < 1.5 * 0.5 * float(np.sum((ls.output_factor @ along @ ls.input_moment)
                                                                            * along))


def test_block_options_are_rounded_loss_aware_block_by_block_where_that_predicts_less():
    model = mlp()
    data = _dataset(model, seed=3)
    data.labels = make_session(model, providers=["CPUExecutionProvider"]).run(None, data.inputs)[0].argmax(axis=1)
    analysis = Quant().analyse(model, data.subset(np.arange(256)), AnalysisOptions(labels="labels", range_samples=128))
    quantizable = {layer.node: layer for layer in find_quantizable(model)[0]}
    layers = {layer.node: layer for layer in find_layers(model)[0]}
    aware = nearest = 0
    for members, reason, options in layer_options(model, analysis, 1.0, block_size=16):
        layer = members[0]
        ls, q = analysis.get(layer.node), quantizable[layer.node]
        blocks = [option for option in options if option.block_size == 16]
        assert reason is None and [option.bits for option in blocks] == [4, 3, 2]
        for option in blocks:
            weight = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == layer.weight))
            rounded_to_nearest = ls.perturbation_dloss(block_quantization_error(weight, layers[layer.node], q,
                                                                                option.bits, 16), 1.0)
            assert option.predicted <= rounded_to_nearest + 1e-12
            if option.grid is None:
                nearest += 1
                continue
            aware += 1
            levels, scales = option.grid
            blocked = list(weight.shape)
            blocked[q.reduction_axis] //= 16
            assert levels.shape == weight.shape and list(scales.shape) == blocked
            np.testing.assert_array_equal(option_weight(model, layers[layer.node], option, q.reduction_axis),
                                          dequantize_blocks(levels, scales, q.reduction_axis, 16))
    assert aware >= 6, (aware, nearest)  # loss-aware wins on most of the 3 layers x 3 widths
