"""The plan: per layer, which decomposition and which components to keep.

A plan is plain JSON (``Plan.to_json``) so it can be inspected, edited and
re-applied (``onnxlrf rewrite --plan``); bases that are not the weight's own SVD
are stored beside it (``<plan>.bases.npz``).
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
from ..onnx_io import check_regular_file, read_regular_file, staged_outputs

PLAN_FORMAT = "onnxlrf.plan"
# Version 2: each layer entry names its technique and holds the technique's choice under "choice".
# Version 1 (low-rank fields at the top of each entry) is still read, and written by nothing.
PLAN_VERSION = 2
READ_VERSIONS = (1, 2)
PLAN_DECOMPOSITIONS = ("channel", "spatial", "dense")
# "svd": the weight's own SVD, computed by the rewrite; any other basis is stored with the plan
# (Plan.bases): "joint" (onnxlrf's), "fwsvd" and "whitened" (baselines), "refit" (the refit's).
BASES = ("svd", "joint", "fwsvd", "whitened", "refit")
# A stored basis: W = x diag(s) yt per group, optionally with mu, the mean input row (bias correction),
# and shift, the bias change a refit layer pairs with its factors. Absent parts are None.
BASIS_PARTS = ("x", "s", "yt", "mu", "shift")
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


# Entry classes by technique: a new technique registers its entry class here.
ENTRY_TYPES: dict[str, type[PlanEntry]] = {LowRankEntry.technique: LowRankEntry}


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
    # Stored bases by weight name: (x (g,m,k), s (g,k), y^T (g,k,n)[, mu (g,n)[, shift (g*m,)]]), components in
    # priority order; an absent part is None.
    # Saved beside the plan as <plan>.bases.npz (options["bases_file"]), not in the JSON.
    bases: dict = field(default_factory=dict, repr=False)

    def to_dict(self) -> dict:
        """The plan as a JSON-ready dict (without the stored bases), in the current version."""
        return {
            "format": self.format,
            "version": PLAN_VERSION,
            "mode": self.mode,
            "options": self.options,
            "source": self.source,
            "layers": [layer.to_dict() for layer in self.layers],
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
                   source=data.get("source") or {})

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
                arrays = {f"{weight}|{part}": value for weight, basis in self.bases.items()
                          for part, value in zip(BASIS_PARTS, basis) if value is not None}
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


def validate_plan(plan: Plan, model: onnx.ModelProto) -> None:
    """Raise OnnxlrfError naming the first plan entry that does not fit ``model``."""
    if not isinstance(plan, Plan):
        raise OnnxlrfError("expected a Plan")
    layers, skipped = find_layers(model)
    by_node = {layer.node: layer for layer in layers}
    skipped_by_node = {s.node: s for s in skipped}
    seen: set[str] = set()
    for entry in plan.layers:
        node = entry.node
        if node in seen:
            raise OnnxlrfError(f"plan lists node {node!r} twice")
        seen.add(node)
        layer = by_node.get(node)
        if layer is None:
            if node in skipped_by_node:
                raise OnnxlrfError(f"plan node {node!r} is not factorizable: {skipped_by_node[node].reason}")
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
    _check_fingerprints(plan, model, by_node)
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


def _check_fingerprints(plan: Plan, model: onnx.ModelProto, layers: dict[str, Layer]) -> None:
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
                if part not in BASIS_PARTS:
                    raise ValueError(f"unknown part {key!r}")
                parts.setdefault(weight, {})[part] = arrays[key]
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise OnnxlrfError(f"cannot read the plan's bases {path}: {exc}") from None
    for weight, basis in parts.items():
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
    return {weight: _basis_tuple(basis) for weight, basis in parts.items()}


def _basis_tuple(parts: dict) -> tuple:
    """A stored basis from its named parts, absent ones None, trailing absent ones left off."""
    basis = [parts.get(part) for part in BASIS_PARTS]
    while basis[-1] is None:
        basis.pop()
    return tuple(basis)
