"""Which layers the joint analysis covers (torch-free, so that ``inspect`` can say it without loading torch).

The analysis needs each layer's input as rows its channel matrix multiplies (K-FAC's input factor): a
Conv's unfolded patches (1-D and 2-D), a Gemm's or MatMul's rows. A ConvTranspose's matrices have its
input channels as rows, so its output is no matrix product of input rows; a 3-D conv would need a 3-D
unfold. Such layers stay dense in joint plans; the data-free planners (uniform, energy) and the
rewrite factorize them.
"""

from __future__ import annotations

from ..graph.layers import Layer


def analysis_exclusion(layer: Layer) -> str | None:
    """Why the joint analysis leaves ``layer`` out (it stays dense in joint plans), or None if it covers it."""
    if layer.op_type == "ConvTranspose":
        return ("not analyzed: the joint analysis has no input statistics for a ConvTranspose (dense in joint "
                "plans; uniform and energy plans factorize it)")
    if layer.op_type == "Conv" and len(layer.kernel) > 2:
        return (f"not analyzed: the joint analysis unfolds the inputs of 1-D and 2-D convs, not {len(layer.kernel)}-D "
                f"(dense in joint plans; uniform and energy plans factorize it)")
    return None
