"""techniques.quant.candidates: the options' loss predictions."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np

from onnxlrf.techniques.quant.candidates import hessian_trace_dloss


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
