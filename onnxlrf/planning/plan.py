"""The plan: per layer, a technique's choice (low-rank: decomposition and components to keep;
quantization: bits, granularity, container, activations, where the scales come from, rounding).

A plan is plain JSON (``Plan.to_json``) so it can be inspected, edited and
re-applied (``onnxlrf rewrite --plan``); bases that are not the weight's own SVD
are stored beside it (``<plan>.bases.npz``); calibrated activation ranges are in the JSON.
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import onnx

from ..errors import OnnxlrfError
from ..graph.layers import Layer, find_layers, weight_array
from ..graph.quantizable import BLOCK_OPS, QuantLayer, find_quantizable
from ..onnx_io import check_regular_file, read_regular_file, staged_outputs

PLAN_FORMAT = "onnxlrf.plan"
# Version 2: each layer entry names its technique and holds the technique's choice under "choice".
# Version 1 (low-rank fields at the top of each entry) is still read, and written by nothing.
# Version 3 adds "activation_ranges" (calibrated [low, high] per tensor, for quantized activations);
# a version-2 plan is read as one without ranges.
# Version 4 adds "smoothing" (per smoothed activation tensor, its alpha and per-channel max |x|); older plans smooth
# nothing.
PLAN_VERSION = 4
READ_VERSIONS = (1, 2, 3, 4)
PLAN_DECOMPOSITIONS = ("channel", "spatial", "dense")
# "svd": the weight's own SVD, computed by the rewrite; any other basis is stored with the plan
# (Plan.bases): "joint" (onnxlrf's), "fwsvd" and "whitened" (baselines), "refit" (the refit's).
BASES = ("svd", "joint", "fwsvd", "whitened", "refit")
# A stored basis: W = x diag(s) yt per group, optionally with mu, the mean input row (bias correction),
# and shift, the bias change a refit layer pairs with its factors. Absent parts are None.
BASIS_PARTS = ("x", "s", "yt", "mu", "shift")
# A stored grid (a quantization entry rounded loss-aware): integer levels in the weight's layout and one
# scale per output channel.
GRID_PARTS = ("levels", "scales")
# Keys every entry has, whatever its technique (version 2 adds "technique" and "choice").
ENTRY_KEYS = ("node", "op_type", "weight", "weight_shape", "params_dense", "params_planned")


@dataclass
class PlanEntry:
    """One layer's entry in a plan: the node, its weight, and (in a subclass) a technique's choice for it.

    Every entry has ``params_dense``, ``params_planned`` and ``notes`` (the subclass declares them,
    so its positional fields read in the order of its choice). A subclass is registered in
    :data:`ENTRY_TYPES` under its ``technique``.
    """

    node: str
    op_type: str
    weight: str
    weight_shape: list[int]

    technique: ClassVar[str] = ""
    choice_keys: ClassVar[tuple[str, ...]] = ()

    @property
    def changed(self) -> bool:
        """Whether the entry changes its layer (False: the layer stays as it is)."""
        raise NotImplementedError

    def choice(self) -> dict:
        """The technique's choice as plain JSON data (the ``"choice"`` object of a version-2 entry)."""
        return {key: getattr(self, key) for key in self.choice_keys}

    def choice_key(self) -> tuple:
        """Equal for entries that change their weight the same way (nodes sharing a weight must agree)."""
        raise NotImplementedError

    def size_key(self) -> tuple:
        """The part of the choice that sets the layer's size (restoring a layer compares it)."""
        raise NotImplementedError

    def planned_cost(self, cost: Any, layers: list[Layer]) -> float:
        """What ``layers`` (the nodes sharing this entry's weight) cost in ``cost``'s units as planned."""
        raise NotImplementedError

    def check(self, layer: Layer, plan: "Plan") -> None:
        """Raise OnnxlrfError naming what about the choice does not fit ``layer`` (and the plan's stored arrays)."""
        raise NotImplementedError

    def to_dict(self) -> dict:
        """The entry as a version-2 JSON object."""
        out = {key: getattr(self, key) for key in ENTRY_KEYS[:4]}
        out["technique"] = self.technique
        out["choice"] = self.choice()
        out.update({key: getattr(self, key) for key in ENTRY_KEYS[4:]})
        out["notes"] = self.notes
        return out


@dataclass
class LowRankEntry(PlanEntry):
    """A low-rank layer entry: decomposition, rank (or the kept components) and basis (see README "The plan")."""

    decomposition: str
    rank: int | None
    max_rank: int
    keep: list[int] | None
    params_dense: int
    params_planned: int
    notes: dict = field(default_factory=dict)
    basis: str = "svd"  # one of BASES; stored bases list components in priority order
    # Add -(W_r - W) mu to the bias (mu: the stored basis' mean input), cancelling the mean output error.
    bias_correction: bool = False

    technique: ClassVar[str] = "lowrank"
    choice_keys: ClassVar[tuple[str, ...]] = ("decomposition", "rank", "max_rank", "keep", "basis",
                                               "bias_correction")

    @property
    def changed(self) -> bool:
        return self.decomposition != "dense"

    def kept_indices(self) -> list[int]:
        """The kept component indices (``keep``, or the top ``rank``)."""
        if self.rank is None:
            return []
        return list(self.keep) if self.keep is not None else list(range(self.rank))

    def choice_key(self) -> tuple:
        return self.decomposition, self.rank, tuple(sorted(self.kept_indices())), self.bias_correction

    def size_key(self) -> tuple:
        return self.decomposition, self.rank

    def planned_cost(self, cost: Any, layers: list[Layer]) -> float:
        return cost.factorized(layers, self.decomposition, self.rank) if self.changed else cost.dense(layers)

    def check(self, layer: Layer, plan: "Plan") -> None:
        node = self.node
        if self.decomposition not in PLAN_DECOMPOSITIONS:
            raise OnnxlrfError(
                f"plan node {node!r}: unknown decomposition {self.decomposition!r} "
                f"(known: {', '.join(PLAN_DECOMPOSITIONS)})"
            )
        if self.basis not in BASES:
            raise OnnxlrfError(f"plan node {node!r}: unknown basis {self.basis!r} (known: {', '.join(BASES)})")
        if self.decomposition == "dense":
            if self.rank is not None or self.keep is not None:
                raise OnnxlrfError(f"plan node {node!r}: a dense entry has rank and keep null")
            return
        if self.decomposition not in layer.decompositions:
            raise OnnxlrfError(
                f"plan node {node!r}: decomposition {self.decomposition!r} not available "
                f"(available: {', '.join(layer.decompositions)})"
            )
        max_rank = layer.max_rank(self.decomposition)
        if not _is_int(self.rank) or not 1 <= self.rank <= max_rank:
            raise OnnxlrfError(f"plan node {node!r}: rank {self.rank!r} outside 1..{max_rank}")
        if self.max_rank != max_rank:
            raise OnnxlrfError(f"plan node {node!r}: max_rank {self.max_rank}, model has {max_rank}")
        if self.keep is not None:
            keep = self.keep
            if not isinstance(keep, list) or not all(_is_int(i) for i in keep):
                raise OnnxlrfError(f"plan node {node!r}: keep must be a list of integers")
            if len(keep) != self.rank:
                raise OnnxlrfError(f"plan node {node!r}: keep has {len(keep)} indices, rank is {self.rank}")
            if len(set(keep)) != len(keep):
                raise OnnxlrfError(f"plan node {node!r}: keep has duplicate indices")
            bad = [i for i in keep if not 0 <= i < max_rank]
            if bad:
                raise OnnxlrfError(f"plan node {node!r}: keep index {bad[0]} outside 0..{max_rank - 1}")
        if self.basis != "svd":
            basis = plan.bases.get(self.weight)
            g, m, n = layer.matrix_shape(self.decomposition)
            if basis is None:
                raise OnnxlrfError(f"plan node {node!r} uses a {self.basis} basis, but the plan has none for "
                                   f"{self.weight!r}")
            if tuple(basis[0].shape[:2]) != (g, m) or tuple(basis[2].shape[::2]) != (g, n):
                raise OnnxlrfError(f"plan node {node!r}: {self.basis} basis does not fit the weight's {g}x{m}x{n} "
                                   f"matrices")
            components = basis[1].shape[1]
            if self.rank > components or any(i >= components for i in self.kept_indices()):
                raise OnnxlrfError(f"plan node {node!r}: rank {self.rank} (or a kept index) beyond the "
                                   f"{components} components its {self.basis} basis stores")
        if (self.bias_correction or self.basis == "refit") and layer.op_type == "ConvTranspose":
            # Its matrices' rows are input channels: a change per matrix row is no bias.
            raise OnnxlrfError(f"plan node {node!r}: a ConvTranspose takes no bias correction or refit")
        if self.bias_correction:
            basis = plan.bases.get(self.weight) if self.basis != "svd" else None
            if basis is None or len(basis) < 4 or basis[3] is None:
                raise OnnxlrfError(f"plan node {node!r} asks for bias correction, but the plan stores no mean input "
                                   f"for {self.weight!r}")
        if self.basis == "refit":
            basis = plan.bases[self.weight]
            g, m, _ = layer.matrix_shape(self.decomposition)
            if len(basis) < 5 or basis[4] is None or basis[4].shape != (g * m,):
                raise OnnxlrfError(f"plan node {node!r} is refit, but the plan stores no bias change of "
                                   f"{g * m} values for {self.weight!r}")


# Weight bits a quantized layer may have; a container holds the values (int4 packs two per byte).
QUANT_BITS = (2, 3, 4, 5, 6, 7, 8)
QUANT_GRANULARITIES = ("per_channel", "block")
QUANT_CONTAINERS = {"int8": 8, "int4": 4}  # container -> bits it holds
QUANT_ACTIVATIONS = ("float", "int8")
# Where the weight scales come from: "absmax", the channel's (block's) largest |w| maps to the largest level;
# "searched", a clipping ratio per channel (block) chosen under the loss's metric (stored with the plan).
WEIGHT_SCALES = ("absmax", "searched")
# How a planner rounds: "nearest", the nearest grid point, ties to even (computed by the rewrite); "loss-aware",
# with error feedback in the loss's metric (METHOD.md 9; the levels are stored with the plan).
ROUNDINGS = ("nearest", "loss-aware")
# An entry may also say "sequential": rounded again in graph order on the inputs the quantized model gives the
# layer (the back-off's improvement step; stored with the plan too).
ENTRY_ROUNDINGS = ROUNDINGS + ("sequential",)
STORED_ROUNDINGS = ("loss-aware", "sequential")


def _check_known(where: str, field: str, value: Any, known: Any) -> None:
    """A one-line error unless ``value`` is one of ``known``."""
    if value not in known:
        raise OnnxlrfError(f"{where}: unknown {field} {value!r} (known: {', '.join(known)})")


def weight_scale_count(op_type: str, weight_shape: list[int] | tuple[int, ...], transposed: bool,
                       block_size: int | None = None) -> int:
    """How many scales (and zero points) a quantized weight has: one per output channel, or with ``block_size``
    one per block of that many inputs of each output channel (Gemm/MatMul). ``transposed``: the stored 2-D weight
    is (inputs, outputs) (MatMul, Gemm with transB=0)."""
    channels = weight_shape[0] if op_type == "Conv" else weight_shape[1 if transposed else 0]
    if block_size is None:
        return channels
    return channels * -(-weight_shape[0 if transposed else 1] // block_size)


@dataclass
class QuantEntry(PlanEntry):
    """A quantization entry: weight bits (None: the layer stays float), per output channel or per block of
    ``block_size`` inputs, the integer container that stores them, whether the layer's input activations are
    int8 too, how the weight scales were chosen and how weights were rounded. Scales are symmetric (zero
    point 0)."""

    bits: int | None
    granularity: str | None
    block_size: int | None
    container: str | None
    activations: str
    weight_scales: str | None
    rounding: str | None
    params_dense: int
    params_planned: int
    notes: dict = field(default_factory=dict)

    technique: ClassVar[str] = "quant"
    choice_keys: ClassVar[tuple[str, ...]] = ("bits", "granularity", "block_size", "container", "activations",
                                               "weight_scales", "rounding")

    @property
    def changed(self) -> bool:
        return self.bits is not None

    def choice_key(self) -> tuple:
        return tuple(getattr(self, key) for key in self.choice_keys)

    @property
    def stores_grid(self) -> bool:
        """Its levels and scales are stored with the plan (``Plan.bases``), not computed by the rewrite."""
        return self.changed and (self.rounding in STORED_ROUNDINGS or self.weight_scales == "searched")

    def _check_grid(self, layer: QuantLayer, plan: "Plan", where: str) -> None:
        grid = plan.bases.get(self.weight)
        if grid is None or len(grid) != len(GRID_PARTS):
            raise OnnxlrfError(f"{where}: rounding {self.rounding!r} with weight_scales {self.weight_scales!r}, but the "
                               f"plan stores no levels and scales for {self.weight!r}")
        levels, scales = grid
        if self.granularity == "block":  # DequantizeLinear's layout: the summed axis shortened to its blocks
            expected = list(self.weight_shape)
            expected[layer.reduction_axis] = -(-expected[layer.reduction_axis] // self.block_size)
            scale_text = f"{self.block_size}-input blocks"
        else:
            expected = [self.weight_shape[layer.channel_axis]]
            scale_text = f"{expected[0]} channels"
        if list(levels.shape) != list(self.weight_shape) or list(scales.shape) != expected:
            raise OnnxlrfError(f"{where}: stored levels {list(levels.shape)} and scales {list(scales.shape)} do not fit "
                               f"the weight {list(self.weight_shape)} with {scale_text}")
        bound = 2 ** (self.bits - 1) - 1
        if np.abs(levels.astype(np.int64)).max(initial=0) > bound:
            raise OnnxlrfError(f"{where}: stored levels exceed the {self.bits}-bit grid (+-{bound})")

    def size_key(self) -> tuple:
        return self.bits, self.container, self.granularity, self.block_size

    def scale_count(self, transposed: bool) -> int:
        """How many scales (and zero points) the quantized weight has (:func:`weight_scale_count`)."""
        return weight_scale_count(self.op_type, self.weight_shape, transposed,
                                  self.block_size if self.granularity == "block" else None)

    def planned_cost(self, cost: Any, layers: list[Layer]) -> float:
        """Quantized layers cost what a ``bytes``, ``bits`` or ``latency`` cost's ``quantized`` says (container and
        scales, logical bits, or measured W8A8 time)."""
        if not self.changed:
            return cost.dense(layers)
        return cost.quantized(layers, self.bits, QUANT_CONTAINERS[self.container],
                              self.scale_count(layers[0].transposed), self.activations == "int8")

    def check(self, layer: QuantLayer, plan: "Plan") -> None:
        where = f"plan node {self.node!r}"
        _check_known(where, "activations", self.activations, QUANT_ACTIVATIONS)
        if self.bits is None:
            if any(value is not None for value in (self.granularity, self.block_size, self.container,
                                                   self.weight_scales, self.rounding)) \
                    or self.activations != "float":
                raise OnnxlrfError(f"{where}: a float entry (bits null) has granularity, block_size, container, "
                                   f"weight_scales and rounding null and activations 'float'")
            return
        if not _is_int(self.bits) or self.bits not in QUANT_BITS:
            raise OnnxlrfError(f"{where}: bits {self.bits!r} outside {QUANT_BITS[0]}..{QUANT_BITS[-1]}")
        _check_known(where, "granularity", self.granularity, QUANT_GRANULARITIES)
        _check_known(where, "container", self.container, QUANT_CONTAINERS)
        if self.bits > QUANT_CONTAINERS[self.container]:
            raise OnnxlrfError(f"{where}: {self.bits}-bit values do not fit container {self.container}")
        _check_known(where, "weight_scales", self.weight_scales, WEIGHT_SCALES)
        _check_known(where, "rounding", self.rounding, ENTRY_ROUNDINGS)
        if self.granularity == "block":
            if layer.op_type not in BLOCK_OPS:
                raise OnnxlrfError(f"{where}: block scales are for {'/'.join(BLOCK_OPS)}, not {layer.op_type}")
            if not _is_int(self.block_size) or self.block_size < 2:
                raise OnnxlrfError(f"{where}: block_size must be an integer >= 2, got {self.block_size!r}")
            if self.activations != "float":
                raise OnnxlrfError(f"{where}: block scales are weight-only (activations 'float')")
        elif self.block_size is not None:
            raise OnnxlrfError(f"{where}: block_size applies to granularity 'block' only")
        if self.stores_grid:
            self._check_grid(layer, plan, where)
        if self.activations == "int8":
            if self.container != "int8":
                raise OnnxlrfError(f"{where}: int8 activations need the weights in an int8 container (the integer "
                                   f"kernels read int8), not {self.container}")
            # A smoothed input's range is its smoothed tensor's, which the rewrite checks where it creates it.
            if layer.input not in plan.activation_ranges and layer.input not in plan.smoothing:
                raise OnnxlrfError(f"{where}: int8 activations, but the plan has no calibrated range for its input "
                                   f"{layer.input!r}")


# Entry classes by technique: a new technique registers its entry class here.
ENTRY_TYPES: dict[str, type[PlanEntry]] = {LowRankEntry.technique: LowRankEntry, QuantEntry.technique: QuantEntry}
# The layers each technique's entries refer to, and the nodes of those kinds it cannot take.
_LAYER_FINDERS = {LowRankEntry.technique: find_layers, QuantEntry.technique: find_quantizable}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _entry_from_dict(index: int, data: Any, version: int) -> PlanEntry:
    """A plan entry from its JSON object (version 1 or 2), every field's type checked."""
    if not isinstance(data, dict):
        raise OnnxlrfError(f"plan layer {index} must be an object")
    name = data.get("node")
    where = f"plan layer {index} ({name!r})" if isinstance(name, str) else f"plan layer {index}"
    if version == 1:
        technique, choice = LowRankEntry.technique, {key: data[key] for key in LowRankEntry.choice_keys if key in data}
        choice.setdefault("basis", "svd")
        choice.setdefault("bias_correction", False)
        extra = set(data) - set(ENTRY_KEYS) - set(LowRankEntry.choice_keys) - {"notes"}
    else:
        technique, choice = data.get("technique"), data.get("choice")
        if not isinstance(technique, str) or technique not in ENTRY_TYPES:
            raise OnnxlrfError(f"{where}: unknown technique {technique!r} (known: {', '.join(ENTRY_TYPES)})")
        if not isinstance(choice, dict):
            raise OnnxlrfError(f"{where}: 'choice' must be an object")
        extra = set(data) - set(ENTRY_KEYS) - {"technique", "choice", "notes"}
    missing = [key for key in ENTRY_KEYS if key not in data]
    if missing:
        raise OnnxlrfError(f"{where} is missing key {missing[0]!r}")
    if extra:
        raise OnnxlrfError(f"{where} has unknown key {sorted(extra)[0]!r}")
    for key in ("node", "op_type", "weight"):
        if not isinstance(data[key], str):
            raise OnnxlrfError(f"{where}: {key!r} must be a string")
    if not isinstance(data["weight_shape"], list) or not all(_is_int(d) for d in data["weight_shape"]):
        raise OnnxlrfError(f"{where}: 'weight_shape' must be a list of integers")
    for key in ("params_dense", "params_planned"):
        if not _is_int(data[key]):
            raise OnnxlrfError(f"{where}: {key!r} must be an integer")
    notes = {} if data.get("notes") is None else data["notes"]
    if not isinstance(notes, dict):
        raise OnnxlrfError(f"{where}: 'notes' must be an object")
    entry_type = ENTRY_TYPES[technique]
    missing = [key for key in entry_type.choice_keys if key not in choice]
    if missing:
        raise OnnxlrfError(f"{where} is missing key {missing[0]!r}")
    unknown = set(choice) - set(entry_type.choice_keys)
    if unknown:
        raise OnnxlrfError(f"{where} has unknown key {sorted(unknown)[0]!r}")
    return entry_type(**{key: data[key] for key in ENTRY_KEYS}, **choice, notes=notes)


@dataclass
class Plan:
    """Per layer, a technique's choice (:class:`PlanEntry`); saved as JSON (plus stored arrays)."""

    layers: list[PlanEntry]
    mode: str
    options: dict = field(default_factory=dict)
    source: dict = field(default_factory=dict)
    format: str = PLAN_FORMAT
    version: int = PLAN_VERSION
    # Arrays stored by weight name: a low-rank entry's basis (x (g,m,k), s (g,k), y^T (g,k,n)[, mu (g,n)[, shift
    # (g*m,)]]), components in priority order, an absent part None; a quantization entry's grid (levels in the
    # weight's shape, int8; scales (channels,), float32).
    # Saved beside the plan as <plan>.bases.npz (options["bases_file"]), not in the JSON.
    bases: dict = field(default_factory=dict, repr=False)
    # Calibrated [low, high] of each activation tensor that quantized layers read or write, by tensor name.
    activation_ranges: dict = field(default_factory=dict)
    # Smoothed inputs of W8A8 Gemm/MatMul layers, by tensor name: {"alpha": a, "channel_absmax": [max |x_j|, ...]}
    # (onnxlrf.techniques.quant.smoothing).
    smoothing: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        """The plan as a JSON-ready dict (without the stored bases), in the current version."""
        return {
            "format": self.format,
            "version": PLAN_VERSION,
            "mode": self.mode,
            "options": self.options,
            "source": self.source,
            "layers": [layer.to_dict() for layer in self.layers],
            "activation_ranges": self.activation_ranges,
            "smoothing": self.smoothing,
        }

    @classmethod
    def from_dict(cls, data: Any) -> "Plan":
        """A plan from its JSON form (version 1 or 2); a malformed one raises OnnxlrfError naming the problem."""
        if not isinstance(data, dict):
            raise OnnxlrfError("plan must be a JSON object")
        if data.get("format") != PLAN_FORMAT:
            raise OnnxlrfError(f"not an onnxlrf plan: format is {data.get('format')!r}, expected {PLAN_FORMAT!r}")
        version = data.get("version")
        if not _is_int(version) or version not in READ_VERSIONS:
            raise OnnxlrfError(f"unsupported plan version {version!r} (this onnxlrf reads "
                               f"{', '.join(map(str, READ_VERSIONS))})")
        for key in ("mode", "layers"):
            if key not in data:
                raise OnnxlrfError(f"plan is missing key {key!r}")
        if not isinstance(data["mode"], str):
            raise OnnxlrfError("plan key 'mode' must be a string")
        if not isinstance(data["layers"], list):
            raise OnnxlrfError("plan key 'layers' must be a list")
        for key in ("options", "source"):
            if not isinstance({} if data.get(key) is None else data[key], dict):
                raise OnnxlrfError(f"plan key {key!r} must be an object")
        bases_file = (data.get("options") or {}).get("bases_file")
        if bases_file is not None and (not isinstance(bases_file, str) or Path(bases_file).name != bases_file):
            raise OnnxlrfError("plan option 'bases_file' must be a file name beside the plan")
        layers = [_entry_from_dict(i, entry, version) for i, entry in enumerate(data["layers"])]
        return cls(layers=layers, mode=data["mode"], options=data.get("options") or {},
                   source=data.get("source") or {}, activation_ranges=_activation_ranges(data, version),
                   smoothing=_smoothing(data, version))

    def to_json(self) -> str:
        """The plan as JSON text."""
        return json.dumps(self.to_dict(), indent=1)

    def save(self, path: str | os.PathLike, overwrite: bool = False) -> None:
        """Write the JSON (and the stored bases beside it as ``<name>.bases.npz``, when the plan has any).

        Both files are written together (see :func:`~onnxlrf.onnx_io.staged_outputs`); an
        existing file is replaced only with ``overwrite``.
        """
        path = Path(path)
        if self.bases:
            self.options["bases_file"] = path.name + ".bases.npz"
        else:
            self.options.pop("bases_file", None)
        with staged_outputs(overwrite) as stage:
            staged = stage.path(path)
            if self.bases:
                grids = {entry.weight for entry in self.layers if isinstance(entry, QuantEntry)}
                arrays = {f"{weight}|{part}": value for weight, basis in self.bases.items()
                          for part, value in zip(GRID_PARTS if weight in grids else BASIS_PARTS, basis)
                          if value is not None}
                np.savez(staged.parent / self.options["bases_file"], **arrays)  # members dated 1980: same bytes
            staged.write_text(self.to_json() + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Plan":
        """Read a plan written by :meth:`save` (its bases file too, when it has one), every part checked."""
        raw = read_regular_file(path, "plan")
        try:
            data = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise OnnxlrfError(f"plan {path} is not UTF-8 text (byte {exc.start})") from None
        except json.JSONDecodeError as exc:
            raise OnnxlrfError(f"plan {path} is not valid JSON: {exc.msg} at line {exc.lineno}") from None
        except RecursionError:
            raise OnnxlrfError(f"plan {path} is nested too deeply to be a plan") from None
        plan = cls.from_dict(data)
        bases_file = plan.options.get("bases_file")
        if bases_file:
            plan.bases = _read_bases(Path(path).parent / bases_file)
        return plan

    def summary(self) -> dict:
        """Parameters of the planned layers before/after (a weight shared by several nodes counted once)."""
        by_weight = {layer.weight: layer for layer in self.layers}
        before = sum(layer.params_dense for layer in by_weight.values())
        after = sum(layer.params_planned for layer in by_weight.values())
        return {
            "layers": len(self.layers),
            "factorized": sum(layer.changed for layer in self.layers),
            "params_before": before,
            "params_after": after,
            "params_removed": before - after,
        }


def _activation_ranges(data: dict, version: int) -> dict:
    """The plan's calibrated activation ranges (version 3; none before), each a finite [low, high]."""
    ranges = data.get("activation_ranges") if version >= 3 else None
    ranges = {} if ranges is None else ranges
    if not isinstance(ranges, dict):
        raise OnnxlrfError("plan key 'activation_ranges' must be an object")
    for name, value in ranges.items():
        if not (isinstance(value, list) and len(value) == 2
                and all(isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v) for v in value)
                and value[0] <= value[1]):
            raise OnnxlrfError(f"plan activation range of {name!r} must be [low, high], finite, low <= high")
    return ranges


def _smoothing(data: dict, version: int) -> dict:
    """The plan's smoothed tensors (version 4; none before), each an alpha in (0, 1] and finite, non-negative
    per-channel maxima."""
    smoothing = data.get("smoothing") if version >= 4 else None
    smoothing = {} if smoothing is None else smoothing
    if not isinstance(smoothing, dict):
        raise OnnxlrfError("plan key 'smoothing' must be an object")
    for name, value in smoothing.items():
        if not isinstance(value, dict) or set(value) != {"alpha", "channel_absmax"}:
            raise OnnxlrfError(f"plan smoothing of {name!r} must be an object with keys 'alpha' and 'channel_absmax'")
        alpha, absmax = value["alpha"], value["channel_absmax"]
        if not (isinstance(alpha, (int, float)) and not isinstance(alpha, bool) and 0 < alpha <= 1):
            raise OnnxlrfError(f"plan smoothing of {name!r}: 'alpha' must be a number in (0, 1], got {alpha!r}")
        if not (isinstance(absmax, list) and absmax and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v) and v >= 0 for v in absmax)):
            raise OnnxlrfError(f"plan smoothing of {name!r}: 'channel_absmax' must be a list of finite numbers >= 0")
    return smoothing


def validate_plan(plan: Plan, model: onnx.ModelProto) -> None:
    """Raise OnnxlrfError naming the first plan entry that does not fit ``model``."""
    if not isinstance(plan, Plan):
        raise OnnxlrfError("expected a Plan")
    found = {technique: find(model) for technique, find in _LAYER_FINDERS.items()
             if any(entry.technique == technique for entry in plan.layers)}
    by_node = {technique: {layer.node: layer for layer in layers} for technique, (layers, _) in found.items()}
    skipped_by_node = {technique: {s.node: s for s in skipped} for technique, (_, skipped) in found.items()}
    seen: set[str] = set()
    for entry in plan.layers:
        node = entry.node
        if node in seen:
            raise OnnxlrfError(f"plan lists node {node!r} twice")
        seen.add(node)
        layer = by_node[entry.technique].get(node)
        if layer is None:
            skipped = skipped_by_node[entry.technique].get(node)
            if skipped is not None:
                what = "factorizable" if entry.technique == LowRankEntry.technique else "quantizable"
                raise OnnxlrfError(f"plan node {node!r} is not {what}: {skipped.reason}")
            raise OnnxlrfError(f"plan node {node!r} does not exist in the model "
                               f"(or is not Conv/ConvTranspose/Gemm/MatMul)")
        if entry.op_type != layer.op_type:
            raise OnnxlrfError(f"plan node {node!r}: op_type {entry.op_type!r}, model has {layer.op_type!r}")
        if entry.weight != layer.weight:
            raise OnnxlrfError(f"plan node {node!r}: weight {entry.weight!r}, model has {layer.weight!r}")
        if list(entry.weight_shape) != list(layer.weight_shape):
            raise OnnxlrfError(
                f"plan node {node!r}: weight shape {list(entry.weight_shape)}, model has {list(layer.weight_shape)}"
            )
        entry.check(layer, plan)
    _check_fingerprints(plan, model)
    by_weight: dict[str, PlanEntry] = {}
    for entry in plan.layers:
        first = by_weight.setdefault(entry.weight, entry)
        if (entry.technique, entry.choice_key()) != (first.technique, first.choice_key()):
            raise OnnxlrfError(
                f"plan nodes {first.node!r} and {entry.node!r} share weight {entry.weight!r} but plan it differently"
            )


def weight_fingerprints(model: onnx.ModelProto) -> dict[str, str]:
    """A SHA-256 of each compressible layer's weight (its dtype, shape and bytes), by weight name."""
    out = {}
    for layer in find_layers(model)[0]:
        if layer.weight not in out:
            weight = np.ascontiguousarray(weight_array(model, layer))
            digest = hashlib.sha256(f"{weight.dtype} {list(weight.shape)}".encode())
            digest.update(weight.tobytes())
            out[layer.weight] = "sha256:" + digest.hexdigest()
    return out


def _check_fingerprints(plan: Plan, model: onnx.ModelProto) -> None:
    """Refuse a plan whose stored arrays were computed from other weights than ``model``'s (another checkpoint
    of the same graph would get a hybrid of both). Entries without stored arrays are computed from the
    model's own weights; plans without fingerprints (version 1) are taken as they are."""
    recorded = plan.source.get("weights")
    if not isinstance(recorded, dict):
        return
    stored = [entry for entry in plan.layers if entry.weight in plan.bases and entry.weight in recorded]
    if not stored:
        return
    actual = weight_fingerprints(model)
    for entry in stored:
        if actual.get(entry.weight) != recorded[entry.weight]:
            raise OnnxlrfError(f"plan node {entry.node!r}: weight {entry.weight!r} is not the one the plan's stored "
                               f"bases were computed from (its fingerprint differs): plan another checkpoint anew")


def _read_bases(path: Path) -> dict[str, tuple]:
    """The stored bases of a plan (see :attr:`Plan.bases`): every weight's x, s and y^T present, finite,
    and of shapes that fit each other."""
    check_regular_file(path, "plan's bases file")
    parts: dict[str, dict] = {}
    try:
        with np.load(path, allow_pickle=False) as arrays:
            for key in arrays.files:
                weight, part = key.rsplit("|", 1)
                if part not in BASIS_PARTS + GRID_PARTS:
                    raise ValueError(f"unknown part {key!r}")
                parts.setdefault(weight, {})[part] = arrays[key]
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise OnnxlrfError(f"cannot read the plan's bases {path}: {exc}") from None
    grids = {weight: _grid_tuple(path, weight, basis) for weight, basis in parts.items()
             if set(basis) & set(GRID_PARTS)}
    for weight, basis in parts.items():
        if weight in grids:
            continue
        missing = [part for part in BASIS_PARTS[:3] if part not in basis]
        if missing:
            raise OnnxlrfError(f"the plan's bases {path} lack part {missing[0]!r} of weight {weight!r}")
        bad = [part for part, value in basis.items()
               if not np.issubdtype(value.dtype, np.floating) or not np.isfinite(value).all()]
        if bad:
            raise OnnxlrfError(f"the plan's bases {path}: part {bad[0]!r} of weight {weight!r} is not finite floats")
        x, singular, yt = basis["x"], basis["s"], basis["yt"]
        if x.ndim != 3 or singular.ndim != 2 or yt.ndim != 3 or not x.shape[0] == singular.shape[0] == yt.shape[0] \
                or not x.shape[2] == singular.shape[1] == yt.shape[1]:
            raise OnnxlrfError(f"the plan's bases {path}: the parts of weight {weight!r} do not fit each other "
                               f"(x {list(x.shape)}, s {list(singular.shape)}, yt {list(yt.shape)})")
    return {weight: grids.get(weight) or _basis_tuple(basis) for weight, basis in parts.items()}


def _grid_tuple(path: Path, weight: str, parts: dict) -> tuple:
    """A stored grid (levels, scales): integer levels, finite positive float scales, nothing else."""
    if set(parts) != set(GRID_PARTS):
        raise OnnxlrfError(f"the plan's bases {path}: weight {weight!r} has parts {sorted(parts)}, a grid has "
                           f"exactly {', '.join(GRID_PARTS)}")
    levels, scales = parts["levels"], parts["scales"]
    if levels.dtype != np.int8 or scales.dtype != np.float32 or scales.ndim not in (1, levels.ndim) \
            or not (np.isfinite(scales).all() and (scales > 0).all()):
        raise OnnxlrfError(f"the plan's bases {path}: the grid of {weight!r} needs int8 levels and finite positive "
                           f"float32 scales, one per channel or per block")
    return levels, scales


def _basis_tuple(parts: dict) -> tuple:
    """A stored basis from its named parts, absent ones None, trailing absent ones left off."""
    basis = [parts.get(part) for part in BASIS_PARTS]
    while basis[-1] is None:
        basis.pop()
    return tuple(basis)
