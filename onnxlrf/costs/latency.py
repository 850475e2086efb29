"""What a layer costs, dense and factorized, in FLOPs or in measured latency.

Planners with a ``target`` other than params ask a cost model (:class:`FlopsCost`,
:class:`LatencyCost`) for a layer's cost dense and factorized at a
(decomposition, rank), in the target's unit, and for the whole model's cost.

Latency is measured, not modelled: for every layer, one-node ONNX graphs (the
dense node, and the factorized pair built by :func:`onnxlrf.techniques.lowrank.rewrite.apply_plan`
at a sparse grid of ranks, per decomposition) are timed in onnxruntime on the
target provider with the layer's real input shape (shape inference on the model
at the benchmark batch). Runs are interleaved after a warm-up, the median is
kept, and the fixed cost of one ``session.run`` call (measured on a one-node
Identity graph) is subtracted. Between measured ranks, latency is interpolated
linearly, and made non-decreasing in rank (noise aside, more rank never costs
less; planners rely on monotone costs). Measurements are cached on disk as JSON
per context (provider, device, threads, onnxruntime version, I/O binding), keyed
by the op signature (op, attributes, weight/bias/input shapes, dtype).

A per-layer sum is not the whole model (weights stay in cache between single-node
runs, activations are fused in the graph, other ops take time): the total
(:meth:`LatencyCost.total`) is the model's own measured latency, and the per-layer
latencies are scaled by one factor calibrated on the model (see :class:`LatencyCost`).

Quantization plans under a latency target use :class:`QuantLatencyCost`: each layer's node timed
float and W8A8 as onnxruntime's Q/DQ form runs it (the same context, cache and calibration,
:class:`MeasuredLatency`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper

from ..errors import OnnxlrfError
from ..graph.layers import Layer, constant_producers, find_layers
from ..onnx_io import atomic_path, default_opset
from ..progress import ProgressLike, as_progress
from ..runtime.timing import device_name, time_interleaved
from .flops import FlopsCost

CACHE_VERSION = 1


# Geometric spacing of the measured ranks (ratio between neighbours) and how far below the largest useful rank.
RANK_GRID_RATIO = math.sqrt(2)


RANK_GRID_SPAN = 32


# Sessions timed together (interleaved); the dense node is one of them in every chunk. Bounds memory at batch 32.
SESSIONS_PER_CHUNK = 8


# The probe rewrite of the calibration, and the range its scale is trusted in (else 1).
CALIBRATION_RANK_FRACTION = 0.25


CALIBRATION_SCALE_RANGE = (0.25, 4.0)


# Ranks on multiples of 8 fit GPU tensor-core tiles and, measured here, onnxruntime's CPU convolutions
# (8-channel NCHWc blocks: ranks 57..64 run as fast as 64; README, "Ranks that fit the hardware").
HARDWARE_RANK_MULTIPLE = 8


def default_rank_multiple(providers: list[str], target: str = "params") -> int:
    """8 on CUDA/TensorRT, and for speed targets (latency, FLOPs) on any provider; 1 for the parameter
    target on CPU, which gains nothing from coarser ranks and hits its target more closely without.
    FLOPs count as a speed target: on ResNet-50 at batch 32 (CPU, 2 cores) 50% fewer FLOPs ran 0.82 of
    the ideal speedup with ranks of any size and 0.91 with multiples of 8 (README, Deployment speed)."""
    gpu = providers[0] in ("CUDAExecutionProvider", "TensorrtExecutionProvider")
    return HARDWARE_RANK_MULTIPLE if gpu or target in ("latency", "flops") else 1


def cache_dir() -> Path:
    """``$ONNXLRF_CACHE/latency`` or ``~/.cache/onnxlrf/latency``."""
    root = os.environ.get("ONNXLRF_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "onnxlrf") / "latency"


def _constants(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    """Constant tensors by name, including outputs of Identity nodes on constants (the TorchScript
    exporter shares equal tensors, e.g. all-zero biases, that way)."""
    constants = constant_producers(model)
    for node in model.graph.node:  # topological order: chains resolve in one pass
        if node.op_type == "Identity" and node.input[0] in constants:
            constants[node.output[0]] = constants[node.input[0]]
    return constants


def _single_node_model(model: onnx.ModelProto, layer: Layer, input_shape: list[int]) -> onnx.ModelProto:
    """The layer's node alone, with random weights of its shapes, reading an input of ``input_shape``."""
    node = next(n for n in model.graph.node if n.name == layer.node)
    producers = _constants(model)
    dtype = producers[layer.weight].data_type
    np_dtype = helper.tensor_dtype_to_np_dtype(dtype)
    rng = np.random.default_rng(0)
    constants = {}
    for name in node.input[1:]:
        if name and name not in producers:
            raise OnnxlrfError(f"cannot measure node {layer.node!r}: its input {name!r} is not a constant")
        if name:
            constants[name] = (0.1 * rng.standard_normal(list(producers[name].dims))).astype(np_dtype)
    single = helper.make_node(node.op_type, ["x"] + list(node.input[1:]), ["y"], name=node.name)
    single.attribute.extend(node.attribute)
    graph = helper.make_graph(
        [single], "latency_probe",
        [helper.make_tensor_value_info("x", dtype, input_shape)],
        [helper.make_tensor_value_info("y", dtype, None)],
        [numpy_helper.from_array(v, k) for k, v in constants.items()],
    )
    opset = default_opset(model, 17)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=min(model.ir_version, 9))


def _pair_model(single: onnx.ModelProto, layer: Layer, decomposition: str, rank: int) -> onnx.ModelProto:
    """``single`` with its node factorized at ``rank``, through the real rewrite."""
    from ..planning.plan import LowRankEntry, Plan

    entry = LowRankEntry(layer.node, layer.op_type, layer.weight, list(layer.weight_shape), decomposition, rank,
                      layer.max_rank(decomposition), None, layer.params, layer.factorized_params(decomposition, rank))
    return rewrite_with_random_factors(single, Plan(layers=[entry], mode="latency-probe"))


def rewrite_with_random_factors(model: onnx.ModelProto, plan: Any) -> onnx.ModelProto:
    """``model`` rewritten by ``plan`` with random factors of the planned shapes: the graph a real
    rewrite gives, for timing (values do not change the run time), without an SVD per layer."""
    from ..planning.plan import Plan
    from ..techniques.lowrank.rewrite import apply_plan

    layers = {layer.node: layer for layer in find_layers(model)[0]}
    rng = np.random.default_rng(1)
    entries, bases = [], {}
    for entry in plan.layers:
        if entry.decomposition != "dense":
            g, m, n = layers[entry.node].matrix_shape(entry.decomposition)
            bases[entry.weight] = (rng.standard_normal((g, m, entry.rank)), np.ones((g, entry.rank)),
                                   rng.standard_normal((g, entry.rank, n)))
        entries.append(dataclasses.replace(entry, keep=None, basis="joint" if entry.decomposition != "dense"
                                           else entry.basis, bias_correction=False))
    rewritten, _ = apply_plan(model, Plan(layers=entries, mode=plan.mode, bases=bases), keep_dense_if_larger=False)
    return rewritten


def _signature(model: onnx.ModelProto, layer: Layer, input_shape: list[int]) -> str:
    """What the run time of the layer's node depends on, as a stable string (the cache key)."""
    node = next(n for n in model.graph.node if n.name == layer.node)
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in sorted(attrs.items())}
    producers = _constants(model)
    return json.dumps({"op": node.op_type, "attrs": attrs, "input": list(input_shape),
                       "weights": [list(producers[name].dims) if name in producers else None
                                   for name in node.input[1:]],
                       "dtype": onnx.TensorProto.DataType.Name(producers[layer.weight].data_type)}, sort_keys=True)


def rank_grid(layer: Layer, decomposition: str, rank_multiple: int = 1) -> list[int]:
    """Ranks to measure: the largest multiple of ``rank_multiple`` that saves parameters, then
    geometrically smaller ones (on the multiple) down to 1/32 of it, and the multiple itself."""
    top = layer.break_even_rank(decomposition) // rank_multiple * rank_multiple
    if top < 1:
        return []
    ranks = {top, rank_multiple}
    value = top / RANK_GRID_RATIO
    while value >= max(rank_multiple, top / RANK_GRID_SPAN):
        ranks.add(max(rank_multiple, int(round(value / rank_multiple)) * rank_multiple))
        value /= RANK_GRID_RATIO
    return sorted(ranks)


@dataclass
class LayerTiming:
    """Measured latency (ms, per-call overhead subtracted) of one op signature."""

    dense_ms: float
    pair_ms: dict[str, dict[int, float]]  # decomposition -> rank -> ms; or W8A8 -> weight bits -> ms

    def factorized_ms(self, decomposition: str, rank: int) -> float:
        """Interpolated in rank, non-decreasing; below/above the grid: the nearest measured value."""
        points = self.pair_ms.get(decomposition)
        if not points:
            raise OnnxlrfError(f"no latency measured for decomposition {decomposition!r}")
        ranks = np.array(sorted(points))
        values = np.maximum.accumulate(np.array([points[r] for r in ranks]))
        return float(np.interp(rank, ranks, values))

    def to_json(self) -> dict:
        return {"dense_ms": self.dense_ms,
                "pair_ms": {d: {str(r): v for r, v in sorted(p.items())} for d, p in self.pair_ms.items()}}

    @classmethod
    def from_json(cls, data: dict) -> "LayerTiming":
        return cls(float(data["dense_ms"]),
                   {d: {int(r): float(v) for r, v in p.items()} for d, p in data["pair_ms"].items()})


class LatencyCache:
    """Measurements on disk, one JSON file per measurement context."""

    def __init__(self, context: dict, directory: str | os.PathLike | None = None) -> None:
        self.context = context
        digest = hashlib.sha1(json.dumps(context, sort_keys=True).encode()).hexdigest()[:16]
        self.path = Path(directory) if directory is not None else cache_dir()
        self.path = self.path / f"{digest}.json"
        self.entries = self._read()

    def _read(self) -> dict:
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        if data.get("version") != CACHE_VERSION or data.get("context") != self.context:
            return {}
        return data.get("entries", {})

    def get(self, signature: str) -> LayerTiming | None:
        entry = self.entries.get(signature)
        return LayerTiming.from_json(entry) if entry else None

    def put(self, signature: str, timing: LayerTiming) -> None:
        """Store and write through (merging with entries another process wrote meanwhile)."""
        self.entries = {**self._read(), **self.entries, signature: timing.to_json()}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(self.path) as tmp:
                tmp.write_text(json.dumps({"version": CACHE_VERSION, "context": self.context,
                                           "entries": self.entries}, indent=1))
        except OSError:  # a read-only cache only costs re-measuring next time
            pass


@dataclass
class ModelRunner:
    """Runs ``model`` once on fixed feeds when called (what a timer times), and says which model it runs."""

    model: onnx.ModelProto
    run: Callable[[], None]

    def __call__(self) -> None:
        self.run()


class MeasuredLatency:
    """What every measured latency cost shares: the measurement context (provider, device, threads, onnxruntime
    version, I/O binding), its on-disk cache, the fixed cost of one ``session.run`` call, the whole model's
    measured latency (``total()``, set by the subclass's calibration) and whole-model speedups measured where
    the costs were. ``timer``: what times the :class:`ModelRunner` objects, with
    :func:`~onnxlrf.runtime.timing.time_interleaved`'s arguments (None: that function; tests give a timer
    that does not depend on how busy the machine is)."""

    target = "latency"
    resolution = 1e6  # ms -> ns for the integer knapsack

    def __init__(self, model: onnx.ModelProto, batch: int, seq_length: int, provider: str, threads: int | None,
                 io_binding: bool | None, cache: str | os.PathLike | None, budget_s: float, progress: ProgressLike,
                 timer: Callable[..., list[list[float]]] | None) -> None:
        from ..runtime.sessions import select_providers

        self.timer = timer or time_interleaved
        self.model = model
        self.batch = batch
        self.providers = select_providers(provider)
        self.threads = threads or min(2, os.cpu_count() or 1)  # as validation.make_session
        self.io_binding = (self.providers[0] != "CPUExecutionProvider") if io_binding is None else io_binding
        self.budget_s = budget_s
        self.flops = FlopsCost(model, batch, seq_length)
        self.context = {"provider": self.providers[0], "device": device_name(self.providers),
                        "threads": self.threads, "onnxruntime": ort.__version__, "io_binding": self.io_binding}
        self.cache = LatencyCache(self.context, cache)
        self.progress = as_progress(progress)
        self.call_overhead_ms = self._call_overhead_ms()
        self.timings: dict[str, LayerTiming] = {}
        self.scale, self.rest_ms, self.model_ms = 1.0, 0.0, 0.0
        self.rescaled: list[dict] = []  # rescale()'s, in order

    def total(self) -> float:
        return self.model_ms

    def dense(self, layers: list[Layer]) -> float:
        return self.scale * sum(self.timings[layer.node].dense_ms for layer in layers)

    def describe(self) -> dict:
        """How the latencies were measured, for the plan's options."""
        return {**self.context, "batch": self.batch, "model_ms": self.model_ms,
                "layer_sum_ms": self.layer_sum_ms(), "scale": self.scale, "rest_ms": self.rest_ms,
                **({"rescaled": list(self.rescaled)} if self.rescaled else {})}

    def measured_speedup(self, compressed: onnx.ModelProto, runs: int = 10) -> float:
        """Whole-model speedup of ``compressed`` over the model, timed interleaved where the costs were measured.

        The per-layer costs are a model of the whole: on small layers (CIFAR
        ResNet-56, batch 32) a plan they predicted 10% faster measured 0.93x.
        """
        from ..runtime.evaluate import benchmark

        provider = "cpu" if self.providers[0] == "CPUExecutionProvider" else "cuda"
        return benchmark(compressed, self.model, batch=self.batch, warmup=2, runs=runs, provider=provider,
                         threads=self.threads, io_binding=self.io_binding).speedup

    def layer_sum_ms(self) -> float:
        """Sum of the dense layers' single-node latencies, unscaled (compare with the whole model's)."""
        return sum(timing.dense_ms for timing in self.timings.values())

    def _session(self, model: onnx.ModelProto) -> ort.InferenceSession:
        from ..runtime.sessions import make_session

        return make_session(model, self.providers, self.threads)

    def _runner(self, model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> ModelRunner:
        from ..runtime.sessions import make_runner

        return ModelRunner(model, make_runner(self._session(model), feeds, self.io_binding))

    def _call_overhead_ms(self) -> float:
        """Median time of one run of a one-element Identity graph: what every timed call carries."""
        graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "overhead",
                                  [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
                                  [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])])
        probe = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
        run = self._runner(probe, {"x": np.zeros(1, np.float32)})
        return statistics.median(self.timer([run], warmup=20, budget_s=0.2, min_rounds=50)[0]) * 1e3

    def _net_ms(self, seconds: list[float]) -> float:
        """The median of timed runs (seconds) in ms, less the fixed cost of one call (at least 0)."""
        return max(statistics.median(seconds) * 1e3 - self.call_overhead_ms, 0.0)

    def time_plan(self, compressed: onnx.ModelProto, predicted_saving: float) -> tuple[float, float]:
        """``compressed`` (a rewrite the costs, at the current scale, predict to save ``predicted_saving`` ms) and
        the model timed interleaved: the saving measured, as a fraction of the model's latency, and the scale
        that would have predicted it (the current one where it saves nothing). ``model_ms`` is measured again.

        The first calibration's probe changes every layer the same way; a plan mixes changed and unchanged
        layers, and pays for the conversions between them, which no single-layer time holds."""
        predicted = predicted_saving / self.model_ms  # of the model time the prediction was made with
        saving = self._time_against(compressed, "the plan")
        fitted = self._fitted_scale(saving, predicted_saving / self.scale)
        self.progress.log(f"latency: plan predicted {predicted:.1%} faster, measured "
                          f"{saving / self.model_ms:.1%}; scale fitted to it {fitted:.2f} (was {self.scale:.2f})")
        return saving / self.model_ms, fitted

    def rescale(self, scale: float, reason: str) -> None:
        """Multiply the per-layer times by ``scale`` from now on; ``describe()`` records it with ``reason``."""
        self.rescaled.append({"scale": scale, "was": self.scale, "reason": reason})
        self._set_scale(scale)

    def _calibrate(self, probe: onnx.ModelProto | None, predicted_saving: float) -> None:
        """Time the model and ``probe`` (a rewrite predicted to save ``predicted_saving`` ms, or None) interleaved:
        ``model_ms``, and ``scale`` = measured saving / predicted saving (within :data:`CALIBRATION_SCALE_RANGE`)."""
        saving = self._time_against(probe if predicted_saving > 0 else None, "probe rewrite")
        self._set_scale(self._fitted_scale(saving, predicted_saving))
        self.progress.log(f"latency: whole model {self.model_ms:.3f} ms, sum of single-node layers "
                          f"{self.layer_sum_ms():.3f} ms, in-graph scale {self.scale:.2f}")

    def _set_scale(self, scale: float) -> None:
        """``scale``, and ``rest_ms``: what the scaled dense layers leave of the whole model."""
        self.scale = scale
        self.rest_ms = max(self.model_ms - self.scale * self.layer_sum_ms(), 0.0)

    def _time_against(self, probe: onnx.ModelProto | None, what: str) -> float:
        """The model and ``probe`` (or the model alone) timed interleaved: sets ``model_ms``, returns the saving
        (ms; 0 without a probe)."""
        from ..runtime.sessions import random_feeds

        feeds = random_feeds(self.model, self.batch)
        runners = [self._runner(self.model, feeds)] + ([self._runner(probe, feeds)] if probe is not None else [])
        with self.progress.task(f"latency: whole model, original and {what}", None, "round"):
            times = self.timer(runners, warmup=2, budget_s=4 * self.budget_s, min_rounds=7, max_rounds=60)
        medians = [self._net_ms(t) for t in times]
        self.model_ms = medians[0]
        return medians[0] - medians[1] if probe is not None else 0.0

    def _fitted_scale(self, saving: float, predicted_saving: float) -> float:
        """Measured saving / unscaled predicted saving, within :data:`CALIBRATION_SCALE_RANGE`; the current scale
        where either is not positive."""
        if saving <= 0 or predicted_saving <= 0:
            return self.scale
        return float(np.clip(saving / predicted_saving, *CALIBRATION_SCALE_RANGE))


class LatencyCost(MeasuredLatency):
    """Measured latency (ms) of each layer, dense and factorized, on one provider at one batch.

    Layers are measured at construction (cached measurements are reused);
    ``rank_multiple`` sets the grid of measured ranks. ``total()`` is the whole
    model's measured median latency. Single-node timings miss in-graph effects
    (weights no longer in cache, fused activations, thread scheduling), so they are
    calibrated: the original and a probe rewrite (every layer whose pair is faster,
    at a quarter of its rank) are timed interleaved, and ``scale`` = measured
    saving / per-layer predicted saving multiplies every layer latency
    (``rest_ms``: what the scaled dense layers leave of the whole model).
    ``timer``: see :class:`MeasuredLatency`.
    """

    def __init__(self, model: onnx.ModelProto, batch: int = 1, seq_length: int = 128, provider: str = "auto",
                 threads: int | None = None, rank_multiple: int = 1, io_binding: bool | None = None,
                 cache: str | os.PathLike | None = None, budget_s: float = 0.5,
                 progress: ProgressLike = None, timer: Callable[..., list[list[float]]] | None = None) -> None:
        super().__init__(model, batch, seq_length, provider, threads, io_binding, cache, budget_s, progress, timer)
        self.rank_multiple = rank_multiple
        self._measure_layers()
        self.model_ms = self.layer_sum_ms()  # until calibrated
        self._calibrate_ranks()

    # -- cost interface used by the planners

    def factorized(self, layers: list[Layer], decomposition: str, rank: int) -> float:
        return self.scale * sum(self.timings[layer.node].factorized_ms(decomposition, rank) for layer in layers)

    def notes(self, layer: Layer, decomposition: str | None, rank: int | None) -> dict:
        dense = self.dense([layer])
        planned = dense if decomposition is None else self.factorized([layer], decomposition, rank)
        return {**self.flops.notes(layer, decomposition, rank),
                "latency_ms_dense": round(dense, 6), "latency_ms_planned": round(planned, 6)}

    # -- measurement

    def _measure_layers(self) -> None:
        shapes = self.flops.shapes
        layers = find_layers(self.model)[0]
        done: dict[str, LayerTiming] = {}
        with self.progress.task("latency: measure layers", len(layers), "layer") as task:
            for layer in layers:
                signature = _signature(self.model, layer, shapes[layer.node][0])
                if signature not in done:
                    grids = {d: rank_grid(layer, d, self.rank_multiple) for d in layer.decompositions}
                    timing = self.cache.get(signature)
                    missing = {d: [r for r in ranks if timing is None or r not in timing.pair_ms.get(d, {})]
                               for d, ranks in grids.items()}
                    if timing is None or any(missing.values()):
                        timing = self._measure(layer, shapes[layer.node][0], missing, timing)
                        self.cache.put(signature, timing)
                    done[signature] = timing
                self.timings[layer.node] = done[signature]
                task.update()

    def _measure(self, layer: Layer, input_shape: list[int], ranks: dict[str, list[int]],
                 known: LayerTiming | None) -> LayerTiming:
        single = _single_node_model(self.model, layer, input_shape)
        dtype = helper.tensor_dtype_to_np_dtype(single.graph.input[0].type.tensor_type.elem_type)
        feeds = {"x": np.random.default_rng(0).standard_normal(input_shape).astype(dtype)}
        variants = [(d, r) for d, rs in ranks.items() for r in rs]
        dense_times: list[float] = []
        pair_ms = {d: dict(p) for d, p in (known.pair_ms.items() if known else ())}
        dense = self._runner(single, feeds)
        # Interleave the dense node with a few pairs at a time: every session holds its own buffers.
        for start in range(0, max(len(variants), 1), SESSIONS_PER_CHUNK - 1):
            chunk = variants[start:start + SESSIONS_PER_CHUNK - 1]
            runners = [dense] + [self._runner(_pair_model(single, layer, d, r), feeds) for d, r in chunk]
            times = self.timer(runners, budget_s=self.budget_s)
            dense_times += times[0]
            for (d, r), t in zip(chunk, times[1:]):
                pair_ms.setdefault(d, {})[r] = self._net_ms(t)
            del runners
        dense_ms = self._net_ms(dense_times)
        if known is not None:
            dense_ms = known.dense_ms  # keep the value the cached pairs were compared with
        return LayerTiming(dense_ms, pair_ms)

    def _calibrate_ranks(self) -> None:
        from ..techniques.lowrank.planners import plan_uniform

        probe_plan = plan_uniform(self.model, rank_fraction=CALIBRATION_RANK_FRACTION, target="latency",
                                  rank_multiple=self.rank_multiple, cost=self)
        predicted_saving = sum(entry.notes["latency_ms_dense"] - entry.notes["latency_ms_planned"]
                               for entry in probe_plan.layers)
        probe = rewrite_with_random_factors(self.model, probe_plan) if predicted_saving > 0 else None
        self._calibrate(probe, predicted_saving)



# The variant of a LayerTiming that holds a layer's W8A8 latency, by weight bits.
W8A8 = "w8a8"
# The range every probe's activations are quantized to: values do not change the run time.
PROBE_RANGE = (-4.0, 4.0)


class QuantLatencyCost(MeasuredLatency):
    """Measured latency (ms) of each quantizable layer in float and as W8A8 in onnxruntime's Q/DQ form, on one
    provider at one batch: the cost of quantization plans under a latency target.

    Each layer's node alone (random weights of its shapes, its real input shape) is timed float and rewritten
    W8A8 by the real rewrite (:class:`~onnxlrf.techniques.quant.rewrite.QDQRewrite`, ``weight_bits``-bit
    weights): its input quantized, and a Conv's output too (QLinearConv needs it; in the model the next
    quantized layer's input is that quantization). Both conversions count, so a layer is measured faster only
    where its integer kernel pays for them. A weight-only layer costs what the float one does: onnxruntime's
    form gives it a float weight at load. Calibrated as :class:`LatencyCost`: the model and its all-W8A8
    rewrite timed interleaved. ``timer``: see :class:`MeasuredLatency`.
    """

    def __init__(self, model: onnx.ModelProto, weight_bits: int = 8, batch: int = 1, seq_length: int = 128,
                 provider: str = "auto", threads: int | None = None, io_binding: bool | None = None,
                 cache: str | os.PathLike | None = None, budget_s: float = 0.5,
                 progress: ProgressLike = None, timer: Callable[..., list[list[float]]] | None = None) -> None:
        super().__init__(model, batch, seq_length, provider, threads, io_binding, cache, budget_s, progress, timer)
        self.weight_bits = weight_bits
        self._measure_layers()
        predicted_saving = sum(timing.dense_ms - timing.pair_ms[W8A8][weight_bits] for timing in self.timings.values())
        self._calibrate(self._w8a8(model), predicted_saving)

    def quantized(self, layers: list[Layer], bits: int, container_bits: int, scales: int,
                  int8_inputs: bool = False) -> float:
        """W8A8 where ``int8_inputs`` (the integer kernels' time does not depend on the weight's logical bits),
        else the float layer's."""
        if not int8_inputs:
            return self.dense(layers)
        return self.scale * sum(self.timings[layer.node].pair_ms[W8A8][self.weight_bits] for layer in layers)

    def describe(self) -> dict:
        return {**super().describe(), "w8a8_weight_bits": self.weight_bits}

    def _w8a8(self, model: onnx.ModelProto) -> onnx.ModelProto:
        """``model`` with every quantizable layer W8A8 in onnxruntime's form (activations at :data:`PROBE_RANGE`)."""
        from ..techniques.quant.planners import QuantOptions, plan_uniform_quant
        from ..techniques.quant.rewrite import QDQRewrite, quantized_activations

        plan = plan_uniform_quant(model, QuantOptions(bits=8, activations="int8",
                                                      reduce_range="on" if self.weight_bits < 8 else "off"))
        plan.activation_ranges = {site.tensor: list(PROBE_RANGE)
                                  for site in quantized_activations(model, plan, "onnxruntime")}
        return QDQRewrite("onnxruntime")(model, plan)[0]

    def _measure_layers(self) -> None:
        from ..graph.quantizable import find_quantizable

        shapes = self.flops.shapes
        layers = find_quantizable(self.model)[0]
        with self.progress.task("latency: measure layers, float and W8A8", len(layers), "layer") as task:
            for layer in layers:
                if layer.node not in shapes:
                    raise OnnxlrfError(f"cannot measure node {layer.node!r}: no input shape inferred for it")
                signature = f"{W8A8} {_signature(self.model, layer, shapes[layer.node][0])}"
                timing = self.cache.get(signature)
                if timing is None or self.weight_bits not in timing.pair_ms.get(W8A8, {}):
                    timing = self._measure(layer, shapes[layer.node][0])
                    self.cache.put(signature, timing)
                self.timings[layer.node] = timing
                task.update()

    def _measure(self, layer: Any, input_shape: list[int]) -> LayerTiming:
        from ..techniques.quant.grid import uint8_params

        single = _single_node_model(self.model, layer, input_shape)
        quantized = self._w8a8(single)
        if layer.op_type == "Conv":  # its output quantized, then read back as float
            graph = quantized.graph
            output = graph.output[0].name
            producer = next(node for node in graph.node if output in node.output)
            producer.output[list(producer.output).index(output)] = "probe_float"
            scale, zero_point = uint8_params(*PROBE_RANGE)
            graph.initializer.extend([numpy_helper.from_array(np.array(scale, np.float32), "probe_scale"),
                                      numpy_helper.from_array(np.array(zero_point, np.uint8), "probe_zero_point")])
            graph.node.extend([
                helper.make_node("QuantizeLinear", ["probe_float", "probe_scale", "probe_zero_point"], ["probe_q"]),
                helper.make_node("DequantizeLinear", ["probe_q", "probe_scale", "probe_zero_point"], [output])])
        dtype = helper.tensor_dtype_to_np_dtype(single.graph.input[0].type.tensor_type.elem_type)
        feeds = {"x": np.random.default_rng(0).standard_normal(input_shape).astype(dtype)}
        times = self.timer([self._runner(single, feeds), self._runner(quantized, feeds)], budget_s=self.budget_s)
        dense_ms, int8_ms = (self._net_ms(t) for t in times)
        return LayerTiming(dense_ms, {W8A8: {self.weight_bits: int8_ms}})

def make_cost(model: onnx.ModelProto, target: str, batch: int = 1, seq_length: int = 128, provider: str = "auto",
              rank_multiple: int = 1, cache: str | os.PathLike | None = None, threads: int | None = None,
              progress: ProgressLike = None, timer: Callable[..., list[list[float]]] | None = None) -> Any:
    """The cost model for ``target``: :class:`~onnxlrf.costs.params.ParamsCost`, :class:`FlopsCost`
    or :class:`LatencyCost` (measured now, on ``provider`` at ``batch``)."""
    from .params import BitsCost, BytesCost, ParamsCost

    if target == "params":
        return ParamsCost(model)
    if target == "bytes":
        return BytesCost(model)
    if target == "bits":
        return BitsCost(model)
    if target == "flops":
        return FlopsCost(model, batch, seq_length)
    if target == "latency":
        return LatencyCost(model, batch, seq_length, provider, threads=threads, rank_multiple=rank_multiple,
                           cache=cache, progress=progress, timer=timer)
    raise OnnxlrfError(f"unknown target {target!r}; known: params, flops, latency, bytes, bits")
