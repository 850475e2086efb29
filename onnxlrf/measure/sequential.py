"""Paired layer inputs in graph order: the original model's, and those of the model changed so far.

A technique plans each layer as if it were the only one changed (METHOD.md 2 to 4, 8). In the
rewritten model every later layer sees inputs the earlier changes have moved, and the errors compound.
A sequential correction (low-rank's refit, quantization's sequential rounding) goes through the changed
layers in graph order and fits each one, on the calibration split, to what the original layer computes
from the original model's input ``x``, given the input ``x'`` the model changed so far gives it; then the
fitted layer replaces it before the next layer's inputs are taken. :class:`PairedInputs` runs both models
batch by batch up to each layer (one torch graph: the changed weights live in the changed runs' values)
and gives the moments of ``(x, x')`` such fits need (:class:`PairedMoments`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import onnx
import torch

from ..graph.layers import Layer
from .analysis import calibration_batches, samples_per_run
from .sensitivity import layer_input_rows, shift_outputs
from .torch_graph import TorchGraph, channels_last

__all__ = ["PairedInputs", "PairedMoments"]


@dataclass
class PairedMoments:
    """Moments of one layer's input in the original model (``x``) and in the changed one (``x'``), per group:
    ``mean`` ``E[x]`` and ``mean_changed`` ``E[x']`` ``(g, n)``; ``second_changed`` ``E[x' x'^T]`` and ``cross``
    ``E[x x'^T]`` ``(g, n, n)``; over ``rows`` rows (positions)."""

    rows: int
    mean: np.ndarray
    mean_changed: np.ndarray
    second_changed: np.ndarray
    cross: np.ndarray

    def covariances(self) -> tuple[np.ndarray, np.ndarray]:
        """``Cov(x')`` and ``Cov(x, x')``."""
        return (self.second_changed - self.mean_changed[:, :, None] * self.mean_changed[:, None, :],
                self.cross - self.mean[:, :, None] * self.mean_changed[:, None, :])


def torch_weight(weight: np.ndarray, conv: bool) -> torch.Tensor:
    """A weight in its stored layout as the torch graph reads it (a Conv's channels last)."""
    value = torch.from_numpy(np.ascontiguousarray(weight, dtype=np.float32))
    return channels_last(value) if conv else value


class PairedInputs:
    """Both models run on ``dataset`` (the calibration split) up to each layer asked for, in graph order.

    ``changed``: weights (stored layout) the changed model has from the start, e.g. the layers a correction
    leaves as planned; ``shifts``: per node, a change of its output channels (bias) there; ``inputs``: per
    node, what the changed model does to its first input before the node reads it (e.g. rounds it to an
    int8 grid), in the moments and in what the node computes. Token data runs in length-sorted batches cut
    after their last real token, as the analysis runs it; padding tokens' rows are left out of the moments.
    """

    def __init__(self, model: onnx.ModelProto, dataset: Any, batch_size: int = 100,
                 changed: dict[str, np.ndarray] | None = None, shifts: dict[str, np.ndarray] | None = None,
                 inputs: dict[str, Callable[[torch.Tensor], torch.Tensor]] | None = None) -> None:
        self.graph = TorchGraph(model)
        self.index = {node.name: i for i, node in enumerate(self.graph.nodes)}
        self.nodes = {node.name: node for node in self.graph.nodes}
        self.shifts = {node: torch.from_numpy(np.asarray(shift, dtype=np.float32))
                       for node, shift in (shifts or {}).items()}
        self.inputs = dict(inputs or {})
        batches = [feeds for feeds, _ in calibration_batches(dataset, dataset.labels,
                                                             samples_per_run(model, dataset, batch_size), model)()]
        self.originals = [self.graph.feed(feeds) for feeds in batches]
        self.changed = [self.graph.feed(feeds) for feeds in batches]
        conv_weights = {node.input[1] for node in self.graph.nodes if node.op_type == "Conv"}
        for name, weight in (changed or {}).items():
            value = torch_weight(weight, name in conv_weights)
            for env in self.changed:
                env[name] = value
        self.masks = [torch.as_tensor(feeds[dataset.token_mask]) if dataset.token_mask else None for feeds in batches]
        self.position = 0

    def order(self, nodes: list[str]) -> list[str]:
        """``nodes`` in graph order (the order :meth:`moments` must be asked in)."""
        return sorted(nodes, key=self.index.__getitem__)

    def moments(self, layer: Layer, rows_per_feature: int | None = None) -> PairedMoments:
        """The moments of ``layer``'s input in both models, from at most ``rows_per_feature`` rows per input
        feature sampled at random (seeded by the layer's place) from every batch (None: all rows)."""
        node, stop = self.nodes[layer.node], self.index[layer.node]
        if stop < self.position:
            raise ValueError(f"{layer.node!r} comes before the layers already taken")
        g, _, n = layer.matrix_shape("channel")
        rows, sums = 0, torch.zeros(2, g, n, dtype=torch.float64)
        second = torch.zeros(g, n, n, dtype=torch.float64)
        cross = torch.zeros(g, n, n, dtype=torch.float64)
        sample = torch.Generator().manual_seed(stop)
        wanted = None if rows_per_feature is None else math.ceil(rows_per_feature * n / len(self.originals))
        with torch.no_grad():
            for b in range(len(self.originals)):
                self.originals[b] = self.graph.advance(self.originals[b], self.position, stop)
                self.changed[b] = self.graph.advance(self.changed[b], self.position, stop, self._hook,
                                                     set(self.shifts) | set(self.inputs))
                x_changed = self.changed[b][node.input[0]]
                if layer.node in self.inputs:
                    x_changed = self.inputs[layer.node](x_changed)
                x, x_changed = _paired_rows(node, layer, self.originals[b][node.input[0]], x_changed,
                                            self.masks[b], wanted, sample)
                # float32 products (fast), float64 accumulation across batches.
                second += (x_changed.transpose(1, 2) @ x_changed).to(torch.float64)
                cross += (x.transpose(1, 2) @ x_changed).to(torch.float64)
                sums[0] += x.sum(1).to(torch.float64)
                sums[1] += x_changed.sum(1).to(torch.float64)
                rows += x.shape[1]
        self.position = stop
        mean, mean_changed = (sums / rows).numpy()
        return PairedMoments(rows, mean, mean_changed, (second / rows).numpy(), (cross / rows).numpy())

    def _hook(self, node: onnx.NodeProto, args: list, output: torch.Tensor) -> torch.Tensor:
        """The changed model's output of ``node``: computed from its changed input, then shifted."""
        if node.name in self.inputs:
            index = self.index[node.name]
            output = self.graph.ops[index](self.inputs[node.name](args[0]), *args[1:], a=self.graph.attrs[index])
        if node.name in self.shifts:
            output = shift_outputs(self.shifts)(node, args, output)
        return output

    def replace(self, layer: Layer, weight: np.ndarray, shift: np.ndarray | None = None) -> None:
        """Give the changed model ``layer``'s new weight (stored layout) and output shift from here on."""
        value = torch_weight(weight, layer.op_type == "Conv")
        for env in self.changed:
            env[layer.weight] = value
        if shift is not None:
            self.shifts[layer.node] = torch.from_numpy(np.asarray(shift, dtype=np.float32))


def _paired_rows(node: onnx.NodeProto, layer: Layer, x: torch.Tensor, x_changed: torch.Tensor,
                 token_mask: torch.Tensor | None, wanted: int | None,
                 sample: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """The same ``wanted`` random rows (:func:`layer_input_rows`) of both inputs; all of them if None or fewer.

    Only enough samples to give 4 times ``wanted`` rows (before padding tokens are left
    out) are unfolded: unfolding every position of every image took most of the refit's time.
    """
    per_sample = layer_input_rows(node, layer, x[:1]).shape[1]
    if wanted is None or per_sample * len(x) <= wanted:
        return layer_input_rows(node, layer, x, token_mask), layer_input_rows(node, layer, x_changed, token_mask)
    samples = min(len(x), math.ceil(4 * wanted / per_sample))
    mask = None if token_mask is None else token_mask[:samples]
    x, x_changed = (layer_input_rows(node, layer, x[:samples], mask),
                    layer_input_rows(node, layer, x_changed[:samples], mask))
    pick = torch.randperm(x.shape[1], generator=sample)[:wanted]
    return x[:, pick], x_changed[:, pick]
