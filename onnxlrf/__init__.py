"""onnxlrf: low-rank factorization of ONNX models without fine-tuning.

The pipeline, one module per stage:
``export`` (torch -> ONNX), ``analysis`` (factorizable layers, SVD),
``planning`` (which components to keep, as a JSON plan), ``rewrite``
(onnx-graphsurgeon pass), ``validation`` (onnxruntime metrics, fidelity,
latency); ``compress`` chains them.
"""

from .errors import OnnxlrfError

__version__ = "0.1.0"
__all__ = ["OnnxlrfError", "__version__"]
