"""Joint analysis: how each singular component of each layer moves the task loss.

METHOD.md sections 2, 2b and 3, computed in torch on the ONNX graph itself
(:mod:`onnxlrf.measure.torch_graph`), so the gradients are those of the exact weights
the rewrite factorizes.

Per layer (channel decomposition, per group) we collect over the calibration
split the mean loss gradient ``G`` and the Kronecker factors of the curvature:
``A = E[x x^T]`` (input activations, unfolded patches for a conv) and
``B = E_sample[sum_pos g g^T]`` (per-sample gradients at the layer's output).
The layer's basis is the SVD of ``B^(1/2) W A^(1/2)``; writing
``W = sum_i s_i x_i y_i^T`` in it, dropping a set ``D`` of components changes
the loss by

    dL(D) ~ sum_{i in D} a_i + kappa * sum_{i in D} s_i^2 / 2,    a_i = -s_i x_i^T G y_i

with no cross terms (the basis diagonalizes the K-FAC quadratic form).
The ``a_i`` used are shrunk toward 0 per layer by how much of them replicates between two halves
of the calibration split (:func:`first_order_replication`): what is the split's noise, a plan
must not chase.
``kappa`` (1 = the K-FAC estimate) is the knob the back-off turns up when a
plan that was predicted to be safe measures worse.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import numpy as np
import onnx
import torch
import torch.nn.functional as F

from ..errors import OnnxlrfError
from ..graph.layers import (
    Layer,
    find_layers,
    matrices_to_weight,
    weight_array,
    weight_matrices,
)
from ..graph.linalg import thin_svd
from ..progress import Progress, ProgressLike, as_progress
from .coverage import analysis_exclusion
from .torch_graph import TorchGraph, auto_pad, conv_pads, heap_reuse, node_attributes

# Relative damping of the Kronecker factors: keeps B^(-1/2), A^(-1/2) finite for
# dead channels (e.g. zero-padded shortcut channels) without changing the basis
# of well-conditioned layers.
DAMPING = 1e-3
# Truncated weights the range checks hold at once: the checks run in chunks of layers whose truncated
# weights (three levels each, float32) take at most this much; each chunk reruns the original once per batch.
RANGE_CHUNK_BYTES = 1 << 30

# Version of the saved analysis (Sensitivity.save); a file of another version is not read. It is part of
# the analysis cache's key (compress.analysis_key): raise it whenever the analysis computes differently.
# Version 3 keeps each layer's mean gradient and output factor B (perturbations other than truncations);
# version 4 runs token data in length-sorted micro-batches cut after their last real token (the same sums,
# added in another order).
ANALYSIS_VERSION = 4
_SAVED_ARRAYS = ("s", "x", "y", "first_order", "input_moment", "input_mean", "output_fisher", "gradient",
                 "output_factor")

Batch = tuple[dict[str, np.ndarray], np.ndarray]  # feeds, targets
LossFn = Callable[[list[torch.Tensor], torch.Tensor], torch.Tensor]  # -> per-sample losses


@dataclass
class LayerSensitivity:
    """A layer in its joint basis: ``W[g] = x[g] @ diag(s[g]) @ y[g].T``."""

    layer: Layer
    s: np.ndarray  # (g, k) singular values in the whitened metric
    x: np.ndarray  # (g, m, k) output-side basis
    y: np.ndarray  # (g, n, k) input-side basis
    first_order: np.ndarray  # (g, k) a_i
    weight_norm: float
    input_moment: np.ndarray = None  # (g, n, n) A = E[x x^T], for the activation-whitened baseline
    # (g, n) mean input row; set when the analysis compensates truncation with the bias (see output_shift).
    input_mean: np.ndarray | None = None
    output_fisher: np.ndarray = None  # (g, m) diag(B), for the Fisher-weighted baseline
    curvature_scale: float = 1.0  # fitted to measured single-layer loss changes (measure_ranges)
    # The factor first_order was shrunk by: the share of the raw a_i that replicates across two halves
    # of the calibration split (first_order_replication); 1 where it could not be measured.
    replication: float = 1.0
    perturbation_range: float = math.inf  # largest trusted ||dW|| / ||W||
    range_checks: list = field(default_factory=list)  # (rank, rel_error, predicted, measured)
    decomposition: str = "channel"  # which matrices of the weight x, s, y factor (analysis.weight_matrices)
    # (g, m, n) mean loss gradient and (g, m, m) output factor B, channel decomposition: a perturbation the
    # joint basis does not describe (a quantization error) is predicted from them (perturbation_dloss).
    gradient: np.ndarray | None = None
    output_factor: np.ndarray | None = None
    _stored_basis: tuple | None = field(default=None, init=False, repr=False, compare=False)

    def stored_basis(self) -> tuple[np.ndarray, ...]:
        """The basis as plans store it: ``x``, ``s`` and ``y^T`` with the components most important first
        (the reverse of :meth:`drop_order`), float32, and the input mean where set. Made once: every plan
        of this analysis shares the same arrays (a 110M encoder's are 0.6 GB; the back-off keeps a dozen
        plans)."""
        if self._stored_basis is None:
            priority = self.drop_order()[:, ::-1]
            x = np.take_along_axis(self.x, priority[:, None, :], axis=2)
            s = np.take_along_axis(self.s, priority, axis=1)
            y = np.take_along_axis(self.y, priority[:, None, :], axis=2)
            basis = (x.astype(np.float32), s.astype(np.float32),
                     np.ascontiguousarray(y.transpose(0, 2, 1)).astype(np.float32))
            if self.input_mean is not None:
                basis += (self.input_mean.astype(np.float32),)
            self._stored_basis = basis
        return self._stored_basis

    @property
    def quadratic(self) -> np.ndarray:
        return 0.5 * self.s**2

    def scores(self, kappa: float = 1.0) -> np.ndarray:
        """Predicted loss change of dropping each component alone."""
        return self.first_order + kappa * self.curvature_scale * self.quadratic

    def drop_order(self) -> np.ndarray:
        """(g, k) component indices, cheapest to drop first (weight error breaks ties), by the analysis's own
        prediction (first order plus the unscaled quadratic term). The order is fixed: the range checks
        (:func:`measure_ranges`) measure truncations in it, and the planners only choose ranks along it,
        so every planned truncation is one whose neighbourhood was measured. (An order that moved with the
        fitted curvature scale or kappa dropped components no check had measured; on a CIFAR ResNet-20 a
        scale fitted to 0.05 let first-order terms predict a calibration-loss drop larger than the loss.)"""
        scores = self.first_order + self.quadratic
        return np.stack([np.lexsort((self.s[j], scores[j])) for j in range(scores.shape[0])])

    def keep(self, rank: int) -> np.ndarray:
        """(g, rank) kept component indices, sorted."""
        order = self.drop_order()
        return np.sort(order[:, order.shape[1] - rank:], axis=1)

    def predicted_dloss(self, kappa: float = 1.0) -> np.ndarray:
        """(k+1,) predicted loss change when keeping rank r = 0..k (index r), dropping in :meth:`drop_order`;
        ``kappa`` multiplies the (fitted) quadratic term: larger trusts the curvature model less."""
        scores = self.scores(kappa)
        order = self.drop_order()
        dropped = np.take_along_axis(scores, order, axis=1)  # cheapest first
        k = scores.shape[1]
        cum = np.concatenate([np.zeros((scores.shape[0], 1)), np.cumsum(dropped, axis=1)], axis=1).sum(0)
        return cum[k - np.arange(k + 1)]  # rank r drops k - r components

    def perturbation_dloss(self, delta: np.ndarray, kappa: float = 1.0) -> float:
        """Predicted loss change of adding ``delta`` ((g, m, n) channel matrices) to the weight (METHOD.md
        section 8): ``<G, delta>`` (shrunk by the replication of the first-order terms, as for truncations;
        0 in an analysis without first-order terms)
        plus ``kappa`` times the fitted curvature scale times ``tr(B delta A delta^T) / 2``."""
        first, quadratic = self.perturbation_terms(delta)
        return first + kappa * quadratic

    def perturbation_terms(self, delta: np.ndarray) -> tuple[float, float]:
        """The two terms of :meth:`perturbation_dloss`: the first-order one, and the quadratic one at kappa 1
        (the fitted curvature scale included), so that callers trying several kappas compute them once."""
        if self.gradient is None or self.output_factor is None or self.input_moment is None:
            raise OnnxlrfError(f"the analysis of node {self.layer.node!r} keeps no gradient and Kronecker factors "
                               f"(an analysis cached before version {ANALYSIS_VERSION}, or a low-rank run's, which "
                               f"lets them go): analyse again")
        first = self.replication * float(np.sum(self.gradient * delta))
        quadratic = 0.5 * float(np.sum((self.output_factor @ delta @ self.input_moment) * delta))
        return first, self.curvature_scale * quadratic

    def relative_error(self) -> np.ndarray:
        """(k+1,) ||W - W_r||_F / ||W||_F when keeping rank r = 0..k in :meth:`drop_order`."""
        order = self.drop_order()
        k = order.shape[1]
        total = np.zeros(k + 1)
        for j in range(order.shape[0]):
            xs = self.x[j][:, order[j]] * self.s[j][order[j]]
            ys = self.y[j][:, order[j]]
            gram = (xs.T @ xs) * (ys.T @ ys)  # <x_a y_a^T, x_b y_b^T> terms
            # ||sum of the first t dropped||^2 for t = 0..k: prefix sums of the Gram matrix.
            prefix = np.cumsum(np.cumsum(gram, axis=0), axis=1).diagonal()
            total += np.concatenate([[0.0], prefix])[k - np.arange(k + 1)]
        return np.sqrt(np.maximum(total, 0.0)) / max(self.weight_norm, 1e-30)

    def reconstruct(self, keep: np.ndarray) -> np.ndarray:
        """(g, m, n) weight matrices from the kept components ``keep`` (g, r)."""
        out = []
        for j in range(self.s.shape[0]):
            idx = keep[j]
            out.append((self.x[j][:, idx] * self.s[j][idx]) @ self.y[j][:, idx].T)
        return np.stack(out)

    def input_whitening(self) -> tuple[np.ndarray, np.ndarray]:
        """``A^(1/2)`` and ``A^(-1/2)`` of the input moment, damped as the analysis damps its factors."""
        root, inv_root = _sqrt_and_inverse(torch.from_numpy(self.input_moment).to(torch.float64))
        return root.numpy(), inv_root.numpy()

    def output_shift(self, keep: np.ndarray) -> np.ndarray | None:
        """(g*m,) bias change that cancels the truncation's mean output error, ``-(W_r - W) mu``."""
        if self.input_mean is None:
            return None
        dropped = []
        for j in range(self.s.shape[0]):
            idx = np.setdiff1d(np.arange(self.s.shape[1]), keep[j])
            dropped.append((self.x[j][:, idx] * self.s[j][idx]) @ (self.y[j][:, idx].T @ self.input_mean[j]))
        return np.concatenate(dropped)  # W - W_r is exactly the dropped components


@dataclass
class Sensitivity:
    """The joint analysis of a model: per layer, keyed by node name."""

    layers: dict[str, LayerSensitivity]
    reference_loss: float
    samples: int
    loss: str
    # The same layers in spatial decomposition (2-D convs with a kernel larger than 1x1, one group).
    spatial: dict[str, LayerSensitivity] = field(default_factory=dict)
    # Layers the analysis could have covered but left out (they stay dense), node -> why.
    left_out: dict[str, str] = field(default_factory=dict)

    def get(self, node: str, decomposition: str = "channel") -> LayerSensitivity:
        """The analysis of ``node`` in ``decomposition``."""
        found = (self.layers if decomposition == "channel" else self.spatial).get(node)
        if found is None:
            raise OnnxlrfError(f"node {node!r} has no joint analysis in {decomposition} decomposition")
        return found

    def candidates(self, node: str) -> list[LayerSensitivity]:
        """``node``'s analyses, one per decomposition analyzed (channel first)."""
        return [ls for ls in (self.layers.get(node), self.spatial.get(node)) if ls is not None]

    def all(self) -> list[LayerSensitivity]:
        """Every analysis: each layer in each analyzed decomposition."""
        return list(self.layers.values()) + list(self.spatial.values())

    def release_perturbation_statistics(self) -> None:
        """Let go of each layer's mean gradient and output factor B, which only
        :meth:`LayerSensitivity.perturbation_dloss` reads (quantization's predictions): a low-rank run never
        does, and on a 110M encoder they are 1.9 GB (float64) held through the whole back-off. A saved
        analysis keeps them."""
        for ls in self.all():
            ls.gradient = ls.output_factor = None

    def save(self, path: str | os.PathLike, key: str = "") -> None:
        """Write the analysis to ``path``: an npz of every layer's arrays, and a JSON header with
        the rest (layers, fitted curvature scales, ranges and their checks). ``key`` says what
        the analysis was made from (see :func:`onnxlrf.measure.analysis.analysis_key`)."""
        header = {"format": "onnxlrf.analysis", "version": ANALYSIS_VERSION, "key": key,
                  "reference_loss": self.reference_loss, "samples": self.samples, "loss": self.loss,
                  "left_out": self.left_out, "entries": []}
        arrays = {}
        for index, ls in enumerate(self.all()):
            header["entries"].append({
                "layer": dataclasses.asdict(ls.layer), "decomposition": ls.decomposition,
                "weight_norm": ls.weight_norm, "curvature_scale": ls.curvature_scale,
                "replication": ls.replication,
                "perturbation_range": ls.perturbation_range, "range_checks": ls.range_checks})
            arrays.update({f"{index}.{name}": getattr(ls, name) for name in _SAVED_ARRAYS
                           if getattr(ls, name) is not None})
        with open(path, "wb") as stream:  # a stream: np.savez would append ".npz" to a path
            np.savez(stream, header=np.array(json.dumps(header)), **arrays)

    @classmethod
    def load(cls, path: str | os.PathLike) -> tuple[Sensitivity, str]:
        """The analysis :meth:`save` wrote to ``path``, and its key."""
        try:
            with np.load(path, allow_pickle=False) as saved:
                header = json.loads(str(saved["header"]))
                if header.get("format") != "onnxlrf.analysis" or header.get("version") != ANALYSIS_VERSION:
                    raise ValueError(f"format {header.get('format')!r} version {header.get('version')!r}, "
                                     f"expected onnxlrf.analysis version {ANALYSIS_VERSION}")
                channel, spatial = {}, {}
                for index, entry in enumerate(header["entries"]):
                    layer = Layer(**{name: tuple(value) if isinstance(value, list) else value
                                     for name, value in entry["layer"].items()})
                    arrays = {name: saved[f"{index}.{name}"] for name in _SAVED_ARRAYS
                              if f"{index}.{name}" in saved.files}
                    ls = LayerSensitivity(layer=layer, weight_norm=entry["weight_norm"],
                                          curvature_scale=entry["curvature_scale"],
                                          replication=entry["replication"],
                                          perturbation_range=entry["perturbation_range"],
                                          range_checks=entry["range_checks"], decomposition=entry["decomposition"],
                                          **arrays)
                    (channel if ls.decomposition == "channel" else spatial)[layer.node] = ls
        except (OSError, ValueError, KeyError, TypeError, zipfile.BadZipFile) as exc:
            raise OnnxlrfError(f"cannot read the analysis {path}: {exc}") from None
        return cls(layers=channel, reference_loss=header["reference_loss"], samples=header["samples"],
                   loss=header["loss"], spatial=spatial, left_out=header.get("left_out", {})), header["key"]


def _unfold_inputs(node: onnx.NodeProto, x: torch.Tensor, weight_shape: tuple) -> torch.Tensor:
    """A conv's input as (rows, Cin*prod(kernel)) patches, in the weight's (c, k...) order."""
    a = node_attributes(node)
    kernel = list(weight_shape[2:])
    spatial = len(kernel)
    strides = a.get("strides", [1] * spatial)
    dil = a.get("dilations", [1] * spatial)
    pads = auto_pad(x, a, kernel, strides, dil)
    if all(k == 1 for k in kernel) and not any(pads):
        # A 1x1 conv's patches are its input's pixels: channels-last, the rows are a view.
        x = x[(slice(None), slice(None)) + tuple(slice(None, None, st) for st in strides)]
        return x.movedim(1, -1).reshape(-1, x.shape[1])
    if any(pads):
        x = F.pad(x, conv_pads(pads, spatial))
    if spatial == 1:
        x, kernel, strides, dil = x.unsqueeze(-1), kernel + [1], strides + [1], dil + [1]
    elif spatial != 2:
        raise OnnxlrfError(f"joint analysis supports 1-D and 2-D convs, not {spatial}-D ({node.name})")
    cols = F.unfold(x, kernel, dilation=dil, stride=strides)  # (N, C*k, L)
    # Copied as (C*k, N*L) and returned transposed: a faster copy than (N*L, C*k), and
    # rows^T is contiguous for the product A = rows^T rows.
    return cols.transpose(0, 1).reshape(cols.shape[1], -1).t()


def layer_input_rows(node: onnx.NodeProto, layer: Layer, x: torch.Tensor,
                     token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The layer's input ``x`` as ``(g, rows, n)``: per group, one row per position its weight is applied at.

    ``token_mask`` (one 0/1 per token, e.g. ``(batch, sequence)``): where it matches the
    input's leading dimensions, only real tokens' rows are returned.
    """
    g, _, n = layer.matrix_shape("channel")
    if layer.op_type == "Conv":
        rows = _unfold_inputs(node, x, layer.weight_shape)
    elif layer.op_type == "Gemm" and node_attributes(node).get("transA", 0):
        rows = x.t()
    elif token_mask is not None and tuple(x.shape[:-1]) == tuple(token_mask.shape):
        rows = x[token_mask != 0]
    else:
        rows = x.reshape(-1, x.shape[-1])
    return rows.reshape(-1, g, n).transpose(0, 1)


class _Statistics:
    """Accumulates A, B and the gradient of one weight over micro-batches."""

    def __init__(self, layer: Layer):
        self.layer = layer
        g, m, n = layer.matrix_shape("channel")
        self.a = torch.zeros(g, n, n, dtype=torch.float64)
        self.b = torch.zeros(g, m, m, dtype=torch.float64)
        self.rows = 0
        self.input_sum = torch.zeros(g, n, dtype=torch.float64)
        self.grad_sum = torch.zeros(g, m, dtype=torch.float64)
        self.outputs: list[torch.Tensor] = []

    def add_input(self, node: onnx.NodeProto, inputs: list, token_mask: torch.Tensor | None) -> None:
        rows = layer_input_rows(node, self.layer, inputs[0].detach(), token_mask)
        # float32 products (fast), float64 accumulation across micro-batches.
        self.a += (rows.transpose(1, 2) @ rows).to(torch.float64)
        self.input_sum += rows.sum(1).to(torch.float64)
        self.rows += rows.shape[1]

    def add_output_grad(self, grad: torch.Tensor) -> None:
        layer = self.layer
        g, m, _ = layer.matrix_shape("channel")
        grad = grad.detach()
        if layer.op_type == "Conv":
            grad = grad.movedim(1, -1)
        grad = grad.reshape(-1, g, m).transpose(0, 1)
        self.b += (grad.transpose(1, 2) @ grad).to(torch.float64)
        self.grad_sum += grad.sum(1).to(torch.float64)


def _damped(mat: torch.Tensor) -> torch.Tensor:
    """A PSD matrix (batched), symmetrized, plus ``DAMPING`` times its mean diagonal."""
    mat = 0.5 * (mat + mat.transpose(-1, -2))
    diag_mean = mat.diagonal(dim1=-2, dim2=-1).mean(-1).clamp_min(1e-30)
    return mat + DAMPING * diag_mean[:, None, None] * torch.eye(mat.shape[-1], dtype=mat.dtype)


def _sqrt_and_inverse(mat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric square root and inverse square root of a damped PSD matrix (batched)."""
    vals, vecs = torch.linalg.eigh(_damped(mat))
    vals = vals.clamp_min(1e-12 * vals.max())
    root = (vecs * vals.sqrt()[:, None, :]) @ vecs.transpose(-1, -2)
    inv_root = (vecs * vals.rsqrt()[:, None, :]) @ vecs.transpose(-1, -2)
    return root, inv_root


def _joint_basis(w: torch.Tensor, b: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``W = x diag(s) y^T`` with ``s`` the singular values of ``W`` in the metric ``tr(dW^T B dW A)``.

    Any factors with ``B = Lb Lb^T`` and ``A = La La^T`` give the same ``x``, ``s``, ``y``
    as the symmetric square roots (they differ by an orthogonal factor, which the SVD
    absorbs), so the Cholesky factors of the damped ``B`` and ``A`` are used: several
    times cheaper than eigendecompositions (ResNeXt-50's bases: 27 s -> 11 s).
    """
    lb = torch.linalg.cholesky(_damped(b))
    la = torch.linalg.cholesky(_damped(a))
    u, s, vh = thin_svd(lb.transpose(-1, -2) @ w @ la)
    x = torch.linalg.solve_triangular(lb.transpose(-1, -2), u, upper=True)  # (g, m, k)
    y = torch.linalg.solve_triangular(la.transpose(-1, -2), vh.transpose(-1, -2), upper=True)  # (g, n, k)
    return x, s, y


def _spatial_factors(a: torch.Tensor, b: torch.Tensor, layer: Layer) -> tuple[torch.Tensor, torch.Tensor]:
    """The K-FAC factors of the spatial matrix ``M[(c, i), (o, j)] = W[o, c, i, j]``: rows, columns.

    The channel factors are ``A`` over the patch index ``(c, i, j)`` and ``B`` over ``o``.
    ``A`` is replaced by its nearest Kronecker product ``A_ci (x) A_j`` (Van Loan and
    Pitsianis: the top singular pair of ``A`` rearranged as ``(ci, ci') x (j, j')``), so the
    metric on ``M`` is ``A_ci`` on its rows and ``B (x) A_j`` on its columns. The range
    checks fit the scale this approximation misses, as they do for K-FAC's.
    """
    _, cin, kh, kw = layer.weight_shape
    rows = cin * kh
    blocks = a[0].reshape(rows, kw, rows, kw).permute(0, 2, 1, 3).reshape(rows * rows, kw * kw)
    _, vecs = torch.linalg.eigh(blocks.T @ blocks)  # kw^2 x kw^2: the top right singular vector
    right = vecs[:, -1]
    left = blocks @ right  # = sigma * u
    if float(left.reshape(rows, rows).diagonal().sum()) < 0:  # both factors of a PSD A can be taken PSD
        left, right = -left, -right
    a_rows = left.reshape(rows, rows)
    a_shift = right.reshape(kw, kw)
    return a_rows[None], torch.kron(b[0], a_shift)[None]


def classification_loss(outputs: list[torch.Tensor], targets: torch.Tensor) -> torch.Tensor:
    """Per-sample cross-entropy of the first output against class labels."""
    return F.cross_entropy(outputs[0], targets.long(), reduction="none")


def _pair_cosines(outputs: list[torch.Tensor]) -> torch.Tensor:
    """Rows [first sentences; second sentences] of the first output: the cosine of each pair."""
    emb = outputs[0]
    half = emb.shape[0] // 2
    return F.cosine_similarity(emb[:half], emb[half:], dim=-1)


def similarity_loss(outputs: list[torch.Tensor], targets: torch.Tensor) -> torch.Tensor:
    """Per pair, the cosine regressed on gold / 5."""
    cos = _pair_cosines(outputs)
    return (cos - targets.to(cos.dtype) / 5.0) ** 2


def similarity_curvature(outputs: list[torch.Tensor], targets: torch.Tensor) -> torch.Tensor:
    """Per pair, sqrt(2) * cosine: its gradients give the Gauss-Newton curvature of :func:`similarity_loss`."""
    return math.sqrt(2.0) * _pair_cosines(outputs)


def _float_rows(outputs: list[torch.Tensor]) -> list[torch.Tensor]:
    """The float outputs, each flattened per row: what label-free data compares (as the runtime does)."""
    return [output.reshape(len(output), -1) for output in outputs if output.is_floating_point()]


def _output_weights(outputs: list[torch.Tensor], targets: torch.Tensor,
                    scales: tuple[float, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, width) outputs side by side, and each column's weight 1 / (outputs * width * scale)."""
    rows = _float_rows(outputs)
    widths = [row.shape[1] for row in rows]
    if len(rows) != len(scales) or sum(widths) != targets.shape[1]:
        raise OnnxlrfError(f"the model's float outputs ({len(rows)}, {sum(widths)} values per row) differ from "
                           f"the original's ({len(scales)}, {targets.shape[1]} values)")
    weights = torch.cat([torch.full((width,), 1.0 / (len(rows) * width * scale), dtype=torch.float64)
                         for width, scale in zip(widths, scales)])
    return torch.cat(rows, dim=1), weights


def output_distance_loss(scales: tuple[float, ...]) -> LossFn:
    """Per sample, the relative squared error of all float outputs to the original's (the targets,
    flattened side by side): per output the mean squared difference over ``scales`` (its mean square),
    averaged over the outputs. Label-free data's loss for any model: at the original's weights it is
    zero with zero gradient, so the curvature term alone predicts a truncation's effect."""
    def loss(outputs: list[torch.Tensor], targets: torch.Tensor) -> torch.Tensor:
        values, weights = _output_weights(outputs, targets, scales)
        difference = values - targets.to(values.dtype)
        return (difference * difference) @ weights.to(values.dtype)
    return loss


def output_distance_curvature(scales: tuple[float, ...], seed: int = 0) -> LossFn:
    """Per sample, ``v . outputs`` with a random sign vector ``v_e = +-sqrt(2 w_e)`` (``w``: the
    column weights of :func:`output_distance_loss`): its gradient ``J^T v`` has ``E[J^T v v^T J] =
    2 J^T diag(w) J``, the loss's Gauss-Newton curvature, with one backward pass for outputs of any
    width (K-FAC's sampled Fisher). The signs come from a generator seeded by ``seed``, so an analysis
    is repeatable."""
    generator = torch.Generator().manual_seed(seed)

    def curvature(outputs: list[torch.Tensor], targets: torch.Tensor) -> torch.Tensor:
        values, weights = _output_weights(outputs, targets, scales)
        signs = torch.randint(0, 2, values.shape, generator=generator).to(values.dtype) * 2 - 1
        return (values * signs * torch.sqrt(2 * weights).to(values.dtype)).sum(dim=1)
    return curvature


LOSSES: dict[str, LossFn] = {"classification": classification_loss, "sentence-similarity": similarity_loss}
# Per-sample outputs whose gradients define B, where the loss's own gradients would mislead.
# The regression loss's gradient is 2 * residual * dcos: its empirical Fisher weighs curvature
# by the squared residual, small for a well-fit model, where the Gauss-Newton term 2 dcos dcos^T
# does not. Cross-entropy keeps its empirical Fisher (measured on the CIFAR ResNets).
CURVATURES: dict[str, LossFn] = {"sentence-similarity": similarity_curvature}


def task_loss(dataset: Any) -> LossFn:
    """The per-sample loss of ``dataset``'s task on its labels (:data:`LOSSES`); for label-free data
    (task ``outputs``, its labels the original's outputs) :func:`output_distance_loss`."""
    if dataset.task == "outputs":
        return output_distance_loss(dataset.output_scales)
    return LOSSES[dataset.task]


@heap_reuse()
def analyze(
    model: onnx.ModelProto,
    batches: Callable[[], Iterator[Batch]],
    loss_fn: LossFn,
    loss_name: str = "",
    layers: list[Layer] | None = None,
    progress: ProgressLike = None,
    bias_correction: bool = False,
    curvature_fn: LossFn | None = None,
    token_mask: str | None = None,
    spatial: bool = False,
    first_order: bool = True,
) -> Sensitivity:
    """Collect gradients and Kronecker factors over ``batches()`` and build each layer's joint basis.

    ``layers`` (default: all of the model's) less those the analysis does not cover
    (:func:`~onnxlrf.measure.coverage.analysis_exclusion`: ConvTranspose, 3-D convs), which the
    joint plans keep dense.

    ``spatial``: 2-D convs with a kernel larger than 1x1 (one group) are also analyzed in
    spatial decomposition (:func:`_spatial_factors`), so the planners can choose per layer.

    ``curvature_fn``: per-sample outputs whose gradients at each layer's output make up
    ``B`` (a Gauss-Newton factor, see :data:`CURVATURES`); None: the per-sample loss
    gradients (the empirical Fisher).

    ``bias_correction``: truncations are paired with the bias change that cancels
    their mean output error (``-(W_r - W) E[x]``, free at inference). The
    quadratic term then sees only the input covariance ``A - mu mu^T``, and the
    first-order term the gradient through both weight and bias,
    ``G - g_b mu^T``; the basis whitens with the covariance. Off by default:
    on ResNet-20 it lowered joint lossless held-out top-1 at 10/20/30% fewer
    parameters (0.8095/0.8000/0.7586 against 0.8110/0.8049/0.7724 without),
    although it lifts plain truncated SVD at 20% from 0.47 to 0.70.

    ``token_mask``: the feed marking real tokens (:attr:`Dataset.token_mask`); the input
    statistics ``A`` then count real tokens only. Padding tokens cannot reach the output,
    so their gradients are zero and, in ``A``, they only dilute the real tokens' statistics.

    ``first_order``: False sets the first-order terms to 0, so the predictions, the drop order and
    the range checks' curvature fit rest on the curvature term alone. A trained model's gradient on
    a thousand calibration samples is mostly that split's noise, and the range checks measure on the
    same split, where a truncation along its gradient looks free.

    ``batches`` may have a ``len()`` (number of micro-batches) for the progress bar.

    A layer whose Kronecker factors would not fit in half of the memory free now (see
    :func:`factors_in_memory`) is left out, with the reason in :attr:`Sensitivity.left_out`: one
    huge layer (FCN-ResNet50's 3 x 3 conv on 2,048 channels: 2.7 GB for ``A`` alone, five copies
    while its basis is computed) must not stop the whole model.
    """
    progress = as_progress(progress)
    if layers is None:
        layers = find_layers(model)[0]
    covered = covered_layers(layers)
    left_out, _ = factors_in_memory(covered, free_memory() / 2)
    for node, reason in left_out.items():
        progress.log(f"  {node} stays dense: {reason}")
    covered = [layer for layer in covered if layer.node not in left_out]
    if not covered:
        why = f" ({analysis_exclusion(layers[0]) or left_out.get(layers[0].node)})" if layers else ""
        raise OnnxlrfError(f"no layers of the model the joint analysis covers{why}")
    layers = covered
    graph = TorchGraph(model, weights={layer.weight for layer in layers})
    stats = {layer.node: _Statistics(layer) for layer in layers}
    nodes = set(stats)

    mask = None  # the current micro-batch's token mask

    def hook(node: onnx.NodeProto, inputs: list, output: torch.Tensor) -> None:
        entry = stats[node.name]
        entry.add_input(node, inputs, mask)
        output.retain_grad()
        entry.outputs.append(output)

    total_loss, samples, half_samples = 0.0, 0, 0
    # The weights' loss gradients summed over all micro-batches, and over every other one: two
    # independent halves of the split, whose first-order terms tell signal from noise.
    parameters = {layer.weight: graph.parameters[layer.weight] for layer in layers}
    grad_total = {name: torch.zeros_like(p) for name, p in parameters.items()}
    grad_half = {name: torch.zeros_like(p) for name, p in parameters.items()}
    n_batches = len(batches) if hasattr(batches, "__len__") else None
    tracked = progress.track(batches(), "analysis: gradients and K-FAC factors", n_batches, "batch")
    for batch_index, (feeds, targets) in enumerate(tracked):
        for p in parameters.values():
            p.grad = None
        mask = torch.as_tensor(feeds[token_mask]) if token_mask else None
        outputs = graph({k: torch.as_tensor(v) for k, v in feeds.items()}, hook=hook, hook_nodes=nodes)
        losses = loss_fn(outputs, torch.as_tensor(targets))
        if not torch.isfinite(losses).all():
            raise OnnxlrfError("the calibration loss is not finite (NaN/Inf in the model or the data)")
        # Sum of per-sample losses: output gradients are then per-sample gradients (for B).
        losses.sum().backward(retain_graph=curvature_fn is not None)
        hooked = [out for entry in stats.values() for out in entry.outputs]
        if curvature_fn is None:
            grads = [out.grad for out in hooked]
        else:  # autograd.grad leaves the parameters' accumulated loss gradients alone
            grads = torch.autograd.grad(curvature_fn(outputs, torch.as_tensor(targets)).sum(), hooked,
                                        allow_unused=True)
        grads = iter([torch.zeros_like(out) if grad is None else grad for out, grad in zip(hooked, grads)])
        for entry in stats.values():
            for _ in entry.outputs:
                entry.add_output_grad(next(grads))
            entry.outputs.clear()
        total_loss += float(losses.detach().sum())
        samples += int(losses.numel())
        for name, p in parameters.items():
            if p.grad is not None:
                grad_total[name] += p.grad
                if batch_index % 2 == 0:
                    grad_half[name] += p.grad
        half_samples += int(losses.numel()) if batch_index % 2 == 0 else 0

    result: dict[str, LayerSensitivity] = {}
    spatial_result: dict[str, LayerSensitivity] = {}
    for layer in progress.track(layers, "analysis: joint bases (Cholesky, SVD)", unit="layer"):
        entry = stats.pop(layer.node)  # its sums are copied into the layer's result: release them as we go
        weight = weight_array(model, layer).astype(np.float64)
        weight_norm = float(np.linalg.norm(weight))
        w = torch.from_numpy(weight_matrices(weight, layer, "channel"))
        grad = grad_total[layer.weight].detach().numpy().astype(np.float64)
        half = grad_half[layer.weight].detach().numpy().astype(np.float64)
        halves = (half / max(half_samples, 1), (grad - half) / max(samples - half_samples, 1))
        grad = grad / samples
        gmat = torch.from_numpy(weight_matrices(grad, layer, "channel"))
        moment = entry.a / max(entry.rows, 1)
        mean = entry.input_sum / max(entry.rows, 1)
        output_factor, input_factor = entry.b / samples, moment
        if bias_correction:
            gmat = gmat - (entry.grad_sum / samples)[:, :, None] * mean[:, None, :]
            input_factor = moment - mean[:, :, None] * mean[:, None, :]
        x, s, y = _joint_basis(w, output_factor, input_factor)
        first, replication = _first_order(x, s, y, gmat, [weight_matrices(g, layer, "channel") for g in halves]
                                          if 0 < half_samples < samples and not bias_correction else None,
                                          first_order)
        result[layer.node] = LayerSensitivity(
            layer=layer, s=s.numpy(), x=x.numpy(), y=y.numpy(), first_order=first, replication=replication,
            weight_norm=weight_norm, input_moment=moment.numpy(),
            output_fisher=output_factor.diagonal(dim1=-2, dim2=-1).numpy(),
            input_mean=mean.numpy() if bias_correction else None,
            gradient=gmat.numpy(), output_factor=output_factor.numpy(),
        )
        # Bias correction pairs each truncation with a channel-space mean shift: channel only.
        if (spatial and not bias_correction and "spatial" in layer.decompositions
                and layer.break_even_rank("spatial") >= 1):
            w = torch.from_numpy(weight_matrices(weight, layer, "spatial"))
            gmat = torch.from_numpy(weight_matrices(grad, layer, "spatial"))
            x, s, y = _joint_basis(w, *_spatial_factors(input_factor, output_factor, layer))
            first, replication = _first_order(x, s, y, gmat, [weight_matrices(g, layer, "spatial") for g in halves]
                                              if 0 < half_samples < samples else None, first_order)
            spatial_result[layer.node] = LayerSensitivity(
                layer=layer, s=s.numpy(), x=x.numpy(), y=y.numpy(), first_order=first, replication=replication,
                weight_norm=weight_norm, decomposition="spatial")
    return Sensitivity(layers=result, reference_loss=total_loss / samples, samples=samples, loss=loss_name,
                       spatial=spatial_result, left_out=left_out)


# Copies of a layer's Kronecker factors the analysis holds (the accumulated sums and the input moment
# it keeps), and the further copies while its basis is computed (damped, Cholesky factor, transposed).
HELD_FACTOR_COPIES, BASIS_FACTOR_COPIES = 2, 3


def covered_layers(layers: list[Layer]) -> list[Layer]:
    """The layers the joint analysis covers (see :func:`~onnxlrf.measure.coverage.analysis_exclusion`)."""
    return [layer for layer in layers if "channel" in layer.decompositions and analysis_exclusion(layer) is None]


def factors_in_memory(layers: list[Layer], budget: float) -> tuple[dict[str, str], int]:
    """The layers whose factors do not fit in ``budget`` bytes (node -> why), and the bytes the others hold.

    In graph order, a layer fits if what the layers before it hold plus its own factors while its
    basis is computed (:data:`HELD_FACTOR_COPIES` + :data:`BASIS_FACTOR_COPIES` copies) stay within it.
    """
    left_out, held = {}, 0
    for layer in layers:
        needed = factor_bytes(layer)
        if held + (HELD_FACTOR_COPIES + BASIS_FACTOR_COPIES) * needed > budget:
            left_out[layer.node] = (f"not analyzed: its Kronecker factors ({needed / 2**30:.2f} GiB, "
                                    f"{HELD_FACTOR_COPIES + BASIS_FACTOR_COPIES} copies while its basis is "
                                    f"computed) would not fit in half of the memory free ({budget / 2**30:.1f} "
                                    f"GiB, {held / 2**30:.1f} GiB of it held by the layers before)")
        else:
            held += HELD_FACTOR_COPIES * needed
    return left_out, held


def factor_bytes(layer: Layer) -> int:
    """Bytes of a layer's Kronecker factors as the analysis holds them: ``A`` (n x n) and ``B`` (m x m)
    per group, float64."""
    g, m, n = layer.matrix_shape("channel")
    return 8 * g * (n * n + m * m)


def free_memory() -> float:
    """Bytes of memory available now (MemAvailable: free plus reclaimable caches); inf where unknown."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return float(line.split()[1]) * 1024
    except OSError:  # not Linux: nothing to compare with
        pass
    return float("inf")


def first_order_replication(halves: list[np.ndarray]) -> float:
    """The share of a layer's first-order terms that is signal: ``sum(a' * a'') / sum(a^2)``, with
    ``a'`` and ``a''`` the terms measured on two independent halves of the calibration split and
    ``a`` their mean, clipped to [0, 1].

    The halves' noises are independent, so ``sum(a' * a'')`` estimates the squared signal and
    ``sum(a^2)`` the squared signal plus the mean's noise: the ratio is the least-squares
    shrinkage of ``a`` toward 0. Without it the planners chase the split's noise: on a CIFAR
    ResNet-20 the raw terms predicted calibration-loss drops the validation split did not see.
    """
    first, second = halves
    mean = 0.5 * (first + second)
    signal = float(np.sum(first * second))
    total = float(np.sum(mean * mean))
    return float(np.clip(signal / total, 0.0, 1.0)) if total > 0 else 1.0


def _first_order(x: torch.Tensor, s: torch.Tensor, y: torch.Tensor, gmat: torch.Tensor,
                 halves: list[np.ndarray] | None, used: bool = True) -> tuple[np.ndarray, float]:
    """The first-order terms ``a_i = -s_i x_i^T G y_i`` of the basis ``x, s, y``, shrunk by their
    :func:`first_order_replication` between the gradients of two halves of the split (``halves``;
    None: not shrunk), and that factor; zeros and factor 0 where not ``used``."""
    if not used:
        return np.zeros(tuple(s.shape)), 0.0
    def terms(g: torch.Tensor) -> np.ndarray:
        return (-s * torch.einsum("gmk,gmn,gnk->gk", x, g, y)).numpy()

    first = terms(gmat)
    if halves is None:
        return first, 1.0
    replication = first_order_replication([terms(torch.from_numpy(g)) for g in halves])
    return replication * first, replication


@contextmanager
def _replaced(graph: TorchGraph, replacements: dict[str, np.ndarray] | None) -> Iterator[None]:
    """``graph`` with some weights replaced (initializer name -> array in stored layout), restored after."""
    saved = {}
    for name, value in (replacements or {}).items():
        store = graph.parameters if name in graph.parameters else graph.constants
        saved[name] = store[name]
        # A copy: the caller's array may be read-only (onnx's are), which torch warns about sharing.
        store[name] = torch.tensor(value, dtype=saved[name].dtype)
    try:
        yield
    finally:
        for name, value in saved.items():
            store = graph.parameters if name in graph.parameters else graph.constants
            store[name] = value


def shift_outputs(shifts: dict[str, torch.Tensor]) -> Callable[[onnx.NodeProto, list, torch.Tensor], torch.Tensor]:
    """A :class:`TorchGraph` hook adding ``shifts[node]`` (per output channel) to those nodes' outputs."""
    def hook(node: onnx.NodeProto, inputs: list, output: torch.Tensor) -> torch.Tensor:
        vec = shifts[node.name]
        return output + (vec.reshape(-1, *[1] * (output.dim() - 2)) if node.op_type == "Conv" else vec)
    return hook


def measure_loss(
    model: onnx.ModelProto,
    batches: Callable[[], Iterator[Batch]],
    loss_fn: LossFn,
    replacements: dict[str, np.ndarray] | None = None,
    graph: TorchGraph | None = None,
    output_shifts: dict[str, np.ndarray] | None = None,
) -> float:
    """Mean loss with some weights replaced (initializer name -> array in stored layout).

    ``output_shifts`` (node name -> per-output-channel vector) is added to those
    nodes' outputs: a bias change, whether or not the node has a bias input.
    """
    graph = graph or TorchGraph(model)
    shifts = {name: torch.as_tensor(v, dtype=torch.float32) for name, v in (output_shifts or {}).items()}
    with _replaced(graph, replacements), torch.no_grad():
        return _mean_loss(loss_fn(graph({k: torch.as_tensor(v) for k, v in feeds.items()},
                                        hook=shift_outputs(shifts) if shifts else None, hook_nodes=set(shifts)),
                                  torch.as_tensor(targets))
                          for feeds, targets in batches())


def _mean_loss(losses: Iterator[torch.Tensor]) -> float:
    """Mean of per-sample losses arriving in batches."""
    total, count = 0.0, 0
    for batch in losses:
        total += float(batch.sum())
        count += int(batch.numel())
    return total / count


@heap_reuse()
def replacement_gains(
    model: onnx.ModelProto,
    replacements: dict[str, dict[str, np.ndarray]],
    batches: Callable[[], Iterator[Batch]],
    loss_fn: LossFn,
    progress: ProgressLike = None,
    description: str = "loss with each replacement",
) -> dict[str, float]:
    """Per key of ``replacements``: how much ``model``'s mean loss on ``batches()`` falls when only
    that key's weights (initializer name -> array) are replaced.

    Each batch runs through ``model`` once; each replacement then starts at the first
    node that reads one of its weights, from that run's activations, so a replacement
    late in the graph costs only the rest of the graph.
    """
    graph = TorchGraph(model)
    starts = {key: min(graph.first_reader(name) for name in weights) for key, weights in replacements.items()}
    base, totals, count = 0.0, dict.fromkeys(replacements, 0.0), 0
    n_batches = len(batches) if hasattr(batches, "__len__") else None
    with torch.no_grad():
        for feeds, targets in as_progress(progress).track(batches(), description, n_batches, "batch"):
            values = graph.trace({k: torch.as_tensor(v) for k, v in feeds.items()}, resume_from=set(starts.values()))
            targets = torch.as_tensor(targets)
            losses = loss_fn(graph.outputs(values), targets)
            base += float(losses.double().sum())
            count += int(losses.numel())
            for key, weights in replacements.items():
                with _replaced(graph, weights):
                    totals[key] += float(loss_fn(graph.resume(values, starts[key]), targets).double().sum())
    return {key: (base - total) / count for key, total in totals.items()}


# A single-layer check agrees when |measured - predicted| <= AGREEMENT_ABS + AGREEMENT_REL * max(|measured|,
# |predicted|) (loss units; METHOD.md 3).
AGREEMENT_ABS, AGREEMENT_REL = 0.025, 0.5


def agrees(predicted: float, measured: float, tolerance_abs: float = AGREEMENT_ABS,
           tolerance_rel: float = AGREEMENT_REL) -> bool:
    """Whether a predicted and a measured single-layer loss change agree (see :data:`AGREEMENT_ABS`)."""
    return bool(abs(measured - predicted) <= tolerance_abs + tolerance_rel * max(abs(measured), abs(predicted)))


@heap_reuse()
def measure_ranges(
    model: onnx.ModelProto,
    sensitivity: Sensitivity,
    batches: Callable[[], Iterator[Batch]],
    loss_fn: LossFn,
    levels: tuple[float, ...] = (0.75, 0.5, 0.25),
    tolerance_abs: float = AGREEMENT_ABS,
    tolerance_rel: float = AGREEMENT_REL,
    progress: ProgressLike = None,
) -> None:
    """Per layer: fit the curvature scale and find the trusted range (METHOD.md 3).

    For each level (a fraction of the layer's break-even rank) only that layer
    is truncated, in joint order, and the loss change measured on ``batches``.
    The K-FAC quadratic term assumes uncorrelated positions and underestimates
    conv curvature, so its scale is fitted per layer (least squares over the
    measured points, kept within [0.05, 100]). With it, a level agrees when
    ``|measured - predicted| <= tolerance_abs + tolerance_rel * max(|measured|, |predicted|)``;
    the range is the relative error of the most aggressive level that agrees
    while every milder one agreed too (0: the layer stays dense).
    """
    progress = as_progress(progress)
    planned = []  # (layer sensitivity, its ranks, most to least)
    for ls in sensitivity.all():
        ls.curvature_scale = 1.0
        top = ls.layer.break_even_rank(ls.decomposition)
        planned.append((ls, sorted({max(1, int(round(top * f))) for f in levels}, reverse=True)))
    measured = _truncation_losses(model, planned, batches, loss_fn, progress)
    for ls, ranks in planned:
        rel = ls.relative_error()
        checks = []
        for rank in ranks:
            dropped = np.ones_like(ls.s, dtype=bool)
            np.put_along_axis(dropped, ls.keep(rank), False, axis=1)
            checks.append({"rank": rank, "relative_error": float(rel[rank]),
                           "measured": measured[ls.layer.node, ls.decomposition, rank],
                           "first_order": float(ls.first_order[dropped].sum()),
                           "quadratic": float(ls.quadratic[dropped].sum())})
        lin = np.array([c["first_order"] for c in checks])
        quad = np.array([c["quadratic"] for c in checks])
        meas = np.array([c["measured"] for c in checks])
        fitted = np.dot(meas - lin, quad) / max(np.dot(quad, quad), 1e-30)
        ls.curvature_scale = float(np.clip(fitted, 0.05, 100.0))
        ls.perturbation_range = 0.0
        for c in checks:
            c["predicted"] = c["first_order"] + ls.curvature_scale * c["quadratic"]
            c["agree"] = agrees(c["predicted"], c["measured"], tolerance_abs, tolerance_rel)
        for c in checks:
            if not c["agree"]:
                break
            ls.perturbation_range = c["relative_error"]
        ls.range_checks = checks
    _log_ranges(sensitivity, progress)


def _truncation_losses(model: onnx.ModelProto, planned: list, batches: Callable[[], Iterator[Batch]],
                       loss_fn: LossFn, progress: Progress) -> dict[tuple[str, str, int], float]:
    """Loss change of each (node, decomposition, rank) of ``planned`` with only that layer truncated (in joint
    order). Batch by batch, one run of the original and each truncation resumed at its layer
    (:func:`replacement_gains`), in chunks of layers whose truncated weights fit :data:`RANGE_CHUNK_BYTES`
    (a chunk's weights are made when it runs); a truncation paired with a bias change (an analysis with bias
    correction) is a full run of its own."""
    measured: dict[tuple[str, str, int], float] = {}
    chunk: dict = {}
    chunk_bytes, part = 0, 0

    def run_chunk() -> None:
        nonlocal chunk, chunk_bytes, part
        part += 1
        gains = replacement_gains(model, chunk, batches, loss_fn, progress,
                                  f"perturbation ranges ({len(chunk)} truncations, part {part})")
        measured.update({key: -gain for key, gain in gains.items()})
        chunk, chunk_bytes = {}, 0

    graph, base = None, None
    for ls, ranks in planned:
        for rank in ranks:
            keep = ls.keep(rank)
            weight = matrices_to_weight(ls.reconstruct(keep), ls.layer, ls.decomposition).astype(np.float32)
            key = (ls.layer.node, ls.decomposition, rank)
            shift = ls.output_shift(keep)
            if shift is not None:
                if graph is None:
                    graph = TorchGraph(model)
                    base = measure_loss(model, batches, loss_fn, graph=graph)
                measured[key] = measure_loss(model, batches, loss_fn, {ls.layer.weight: weight}, graph=graph,
                                             output_shifts={ls.layer.node: shift}) - base
                continue
            if chunk and chunk_bytes + weight.nbytes > RANGE_CHUNK_BYTES:
                run_chunk()
            chunk[key] = {ls.layer.weight: weight}
            chunk_bytes += weight.nbytes
    if chunk:
        run_chunk()
    return measured


def _log_ranges(sensitivity: Sensitivity, progress: Progress) -> None:
    """Say which layers the planners may truncate, and why the others stay dense."""
    layers = sensitivity.all()
    untrusted = [ls for ls in layers if ls.perturbation_range == 0.0]
    scales = [ls.curvature_scale for ls in layers]
    spatial = sum(ls.decomposition == "spatial" for ls in layers)
    progress.log(f"perturbation ranges: {len(layers) - len(untrusted)}/{len(layers)} layer decompositions"
                 f"{f' ({spatial} spatial)' if spatial else ''} can be truncated; "
                 f"fitted curvature scale {min(scales):.3g} to {max(scales):.3g}")
    for ls in untrusted:
        check = ls.range_checks[0]
        verdict = "stays dense" if ls.decomposition == "channel" else f"gets no {ls.decomposition} candidates"
        progress.log(f"  {ls.layer.node} {verdict}: at its mildest tested truncation (rank {check['rank']}) "
                     f"the measured loss change {check['measured']:+.4f} disagrees with the predicted "
                     f"{check['predicted']:+.4f}")
