"""Which torch parameter each factorizable ONNX layer's weight came from.

The exporters do not keep names reliably: the TorchScript exporter folds
BatchNorm into Conv and renames the folded initializers (``onnx::Conv_123``);
the dynamo exporter folds too but keeps the parameter's name on the folded
(scaled) values, and renames the transposed weights of Linear layers it turns
into MatMul (``val_93``). So the match is made by values:

* exact: the ONNX weight equals the torch weight;
* transposed: it equals the transposed torch weight (Linear ``(out, in)`` as a
  MatMul ``(in, out)`` weight);
* channel-scaled (BatchNorm folded): every output channel of the ONNX weight is
  the torch weight's channel times one factor, ``channel_scale``.

Names only break ties between equally good value matches (tied or identical
weights). ONNX layers whose weight matches no torch parameter are absent from
the result.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import torch

from ..graph.layers import Layer, find_layers, weight_array

# Largest residual of a channel-scaled match, relative to the channel's largest
# ONNX weight: float32 folding errors are ~1e-7, unrelated weights are ~1.
SCALED_MATCH_TOLERANCE = 1e-4


@dataclass
class ParamMatch:
    """Where an ONNX layer's weight came from.

    With ``channel_scale`` ``s`` (None unless BatchNorm was folded in):
    ``onnx_weight = s[:, None, ...] * torch_weight``, then transposed when
    ``transposed`` (the output channel is the torch weight's axis 0).
    """

    module_name: str
    param_name: str
    transposed: bool
    channel_scale: np.ndarray | None
    exact: bool

    @property
    def qualified_name(self) -> str:
        return f"{self.module_name}.{self.param_name}" if self.module_name else self.param_name

    def reconstruct(self, torch_weight: np.ndarray) -> np.ndarray:
        """The ONNX weight this match predicts from the torch weight."""
        weight = np.asarray(torch_weight, dtype=np.float64)
        if self.channel_scale is not None:
            weight = self.channel_scale.reshape((-1,) + (1,) * (weight.ndim - 1)) * weight
        return weight.T if self.transposed else weight


def map_parameters(module: torch.nn.Module, model: onnx.ModelProto) -> dict[str, ParamMatch]:
    """``{onnx node name: ParamMatch}`` for the layers of ``analysis.find_layers`` whose weight is found in ``module``."""
    candidates = _candidate_parameters(module)
    by_numel: dict[int, list[tuple[str, str, np.ndarray]]] = {}
    for module_name, param_name, value in candidates:
        by_numel.setdefault(value.size, []).append((module_name, param_name, value))
    layers, _ = find_layers(model)
    matches = {}
    for layer in layers:
        weight = weight_array(model, layer)
        found = []
        for module_name, param_name, value in by_numel.get(weight.size, []):
            match = _match(weight, value, module_name, param_name)
            if match is not None:
                found.append(match)
        if found:
            matches[layer.node] = min(found, key=lambda m: _preference(m, layer))
    return matches


def _candidate_parameters(module: torch.nn.Module) -> list[tuple[str, str, np.ndarray]]:
    """(module name, parameter name, value) of every parameter with 2 or more dims, tied ones under each name."""
    out = []
    for module_name, sub in module.named_modules(remove_duplicate=False):
        for param_name, param in sub.named_parameters(recurse=False):
            if param.ndim >= 2 and param.is_floating_point():
                out.append((module_name, param_name, param.detach().cpu().float().numpy()))
    return out


def _match(weight: np.ndarray, value: np.ndarray, module_name: str, param_name: str) -> ParamMatch | None:
    weight = weight.astype(np.float32, copy=False)
    orientations = [(False, weight)]
    if weight.ndim == 2:
        orientations.append((True, weight.T))
    for transposed, oriented in orientations:
        if oriented.shape == value.shape and np.array_equal(oriented, value):
            return ParamMatch(module_name, param_name, transposed, None, exact=True)
    for transposed, oriented in orientations:
        if oriented.shape == value.shape:
            scale = _channel_scale(oriented, value)
            if scale is not None:
                return ParamMatch(module_name, param_name, transposed, scale, exact=False)
    return None


def _channel_scale(weight: np.ndarray, value: np.ndarray) -> np.ndarray | None:
    """Per-output-channel ``s`` with ``weight[c] == s[c] * value[c]``, or None if there is none."""
    w = weight.reshape(weight.shape[0], -1)
    v = value.reshape(value.shape[0], -1)
    if w.shape[1] < 2:  # a single weight per channel is proportional to anything
        return None
    # Most candidates are unrelated weights of the same size: reject them on the first channel.
    if _row_scales(w[:1], v[:1]) is None:
        return None
    return _row_scales(w, v)


def _row_scales(w: np.ndarray, v: np.ndarray) -> np.ndarray | None:
    w, v = w.astype(np.float64), v.astype(np.float64)
    vv = np.einsum("ij,ij->i", v, v)
    zero = vv == 0
    scale = np.where(zero, 1.0, np.einsum("ij,ij->i", w, v) / np.where(zero, 1.0, vv))
    residual = np.abs(w - scale[:, None] * v).max(axis=1)
    bound = SCALED_MATCH_TOLERANCE * np.maximum(np.abs(w).max(axis=1), np.finfo(np.float32).tiny)
    if np.any(residual > bound):
        return None
    return scale


def _preference(match: ParamMatch, layer: Layer) -> tuple:
    """Sort key: exact before scaled, then more name parts shared with the node/weight names."""
    hint = f"{layer.node} {layer.weight}"
    parts = [p for p in match.module_name.split(".") if p]
    shared = sum(1 for p in parts if p in hint)
    return (not match.exact, -shared, match.qualified_name)
