"""The plan: per layer, which decomposition and which components to keep.

A plan is plain JSON (``Plan.to_json``) so it can be inspected, edited and
re-applied (``onnxlrf rewrite --plan``); bases that are not the weight's own SVD
are stored beside it (``<plan>.bases.npz``).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from ..errors import OnnxlrfError
from ..graph.layers import find_layers
from ..onnx_io import staged_outputs

PLAN_FORMAT = "onnxlrf.plan"


PLAN_VERSION = 1


PLAN_DECOMPOSITIONS = ("channel", "spatial", "dense")


# "svd": the weight's own SVD, computed by the rewrite; any other basis is stored with the plan
# (Plan.bases): "joint" (onnxlrf's), "fwsvd" and "whitened" (baselines), "refit" (onnxlrf.refit).
BASES = ("svd", "joint", "fwsvd", "whitened", "refit")


# A stored basis: W = x diag(s) yt per group, optionally with mu, the mean input row (bias correction),
# and shift, the bias change a refit layer pairs with its factors. Absent parts are None.
BASIS_PARTS = ("x", "s", "yt", "mu", "shift")


@dataclass
class LayerPlan:
    """One layer's entry in a plan (see the README's "The plan")."""

    node: str
    op_type: str
    weight: str
    weight_shape: list[int]
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

    def kept_indices(self) -> list[int]:
        """The kept component indices (``keep``, or the top ``rank``)."""
        if self.rank is None:
            return []
        return list(self.keep) if self.keep is not None else list(range(self.rank))


_LAYER_KEYS = ("node", "op_type", "weight", "weight_shape", "decomposition", "rank", "max_rank", "keep",
               "params_dense", "params_planned")


@dataclass
class Plan:
    """Per layer, which decomposition and components to keep; saved as JSON (plus stored bases)."""

    layers: list[LayerPlan]
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
        """The plan as a JSON-ready dict (without the stored bases)."""
        return {
            "format": self.format,
            "version": self.version,
            "mode": self.mode,
            "options": self.options,
            "source": self.source,
            "layers": [asdict(layer) for layer in self.layers],
        }

    @classmethod
    def from_dict(cls, data: Any) -> "Plan":
        """A plan from :meth:`to_dict`'s form; a malformed one raises OnnxlrfError naming the problem."""
        if not isinstance(data, dict):
            raise OnnxlrfError("plan must be a JSON object")
        if data.get("format") != PLAN_FORMAT:
            raise OnnxlrfError(f"not an onnxlrf plan: format is {data.get('format')!r}, expected {PLAN_FORMAT!r}")
        if data.get("version") != PLAN_VERSION:
            raise OnnxlrfError(f"unsupported plan version {data.get('version')!r} (this onnxlrf reads {PLAN_VERSION})")
        for key in ("mode", "layers"):
            if key not in data:
                raise OnnxlrfError(f"plan is missing key {key!r}")
        if not isinstance(data["layers"], list):
            raise OnnxlrfError("plan key 'layers' must be a list")
        layers = []
        for i, entry in enumerate(data["layers"]):
            if not isinstance(entry, dict):
                raise OnnxlrfError(f"plan layer {i} must be an object")
            missing = [k for k in _LAYER_KEYS if k not in entry]
            if missing:
                raise OnnxlrfError(f"plan layer {i} ({entry.get('node', '?')!r}) is missing key {missing[0]!r}")
            unknown = set(entry) - set(_LAYER_KEYS) - {"notes", "basis", "bias_correction"}
            if unknown:
                raise OnnxlrfError(f"plan layer {i} ({entry['node']!r}) has unknown key {sorted(unknown)[0]!r}")
            layers.append(LayerPlan(**{k: entry[k] for k in _LAYER_KEYS}, notes=entry.get("notes") or {},
                                    basis=entry.get("basis", "svd"),
                                    bias_correction=bool(entry.get("bias_correction", False))))
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
        """Read a plan written by :meth:`save` (its bases file too, when it has one)."""
        try:
            text = open(path, encoding="utf-8").read()
        except OSError as exc:
            raise OnnxlrfError(f"cannot read plan {path}: {exc.strerror}") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise OnnxlrfError(f"plan {path} is not valid JSON: {exc.msg} at line {exc.lineno}") from None
        plan = cls.from_dict(data)
        bases_file = plan.options.get("bases_file")
        if bases_file:
            bases_path = Path(path).parent / bases_file
            try:
                with np.load(bases_path) as arrays:
                    parts: dict[str, dict] = {}
                    for key in arrays.files:
                        weight, part = key.rsplit("|", 1)
                        parts.setdefault(weight, {})[part] = arrays[key]
            except (OSError, ValueError) as exc:
                raise OnnxlrfError(f"cannot read the plan's joint bases {bases_path}: {exc}") from None
            plan.bases = {w: _basis_tuple(p) for w, p in parts.items()}
        return plan

    def summary(self) -> dict:
        """Parameters of the planned layers before/after (a weight shared by several nodes counted once)."""
        by_weight = {layer.weight: layer for layer in self.layers}
        before = sum(layer.params_dense for layer in by_weight.values())
        after = sum(layer.params_planned for layer in by_weight.values())
        return {
            "layers": len(self.layers),
            "factorized": sum(layer.decomposition != "dense" for layer in self.layers),
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
            raise OnnxlrfError(f"plan node {node!r} does not exist in the model (or is not Conv/Gemm/MatMul)")
        if entry.op_type != layer.op_type:
            raise OnnxlrfError(f"plan node {node!r}: op_type {entry.op_type!r}, model has {layer.op_type!r}")
        if entry.weight != layer.weight:
            raise OnnxlrfError(f"plan node {node!r}: weight {entry.weight!r}, model has {layer.weight!r}")
        if list(entry.weight_shape) != list(layer.weight_shape):
            raise OnnxlrfError(
                f"plan node {node!r}: weight shape {list(entry.weight_shape)}, model has {list(layer.weight_shape)}"
            )
        if entry.decomposition not in PLAN_DECOMPOSITIONS:
            raise OnnxlrfError(
                f"plan node {node!r}: unknown decomposition {entry.decomposition!r} "
                f"(known: {', '.join(PLAN_DECOMPOSITIONS)})"
            )
        if entry.basis not in BASES:
            raise OnnxlrfError(f"plan node {node!r}: unknown basis {entry.basis!r} (known: {', '.join(BASES)})")
        if entry.decomposition == "dense":
            if entry.rank is not None or entry.keep is not None:
                raise OnnxlrfError(f"plan node {node!r}: a dense entry has rank and keep null")
            continue
        if entry.decomposition not in layer.decompositions:
            raise OnnxlrfError(
                f"plan node {node!r}: decomposition {entry.decomposition!r} not available "
                f"(available: {', '.join(layer.decompositions)})"
            )
        max_rank = layer.max_rank(entry.decomposition)
        if not isinstance(entry.rank, int) or isinstance(entry.rank, bool) or not 1 <= entry.rank <= max_rank:
            raise OnnxlrfError(f"plan node {node!r}: rank {entry.rank!r} outside 1..{max_rank}")
        if entry.max_rank != max_rank:
            raise OnnxlrfError(f"plan node {node!r}: max_rank {entry.max_rank}, model has {max_rank}")
        if entry.basis != "svd":
            basis = plan.bases.get(entry.weight)
            g, m, n = layer.matrix_shape(entry.decomposition)
            if basis is None:
                raise OnnxlrfError(f"plan node {node!r} uses a {entry.basis} basis, but the plan has none for "
                                   f"{entry.weight!r}")
            if tuple(basis[0].shape[:2]) != (g, m) or tuple(basis[2].shape[::2]) != (g, n):
                raise OnnxlrfError(f"plan node {node!r}: {entry.basis} basis does not fit the weight's {g}x{m}x{n} matrices")
        if entry.bias_correction:
            basis = plan.bases.get(entry.weight) if entry.basis != "svd" else None
            if basis is None or len(basis) < 4 or basis[3] is None:
                raise OnnxlrfError(f"plan node {node!r} asks for bias correction, but the plan stores no mean input "
                                   f"for {entry.weight!r}")
        if entry.basis == "refit":
            basis = plan.bases[entry.weight]
            g, m, _ = layer.matrix_shape(entry.decomposition)
            if len(basis) < 5 or basis[4] is None or basis[4].shape != (g * m,):
                raise OnnxlrfError(f"plan node {node!r} is refit, but the plan stores no bias change of "
                                   f"{g * m} values for {entry.weight!r}")
        if entry.keep is not None:
            keep = entry.keep
            if not isinstance(keep, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in keep):
                raise OnnxlrfError(f"plan node {node!r}: keep must be a list of integers")
            if len(keep) != entry.rank:
                raise OnnxlrfError(f"plan node {node!r}: keep has {len(keep)} indices, rank is {entry.rank}")
            if len(set(keep)) != len(keep):
                raise OnnxlrfError(f"plan node {node!r}: keep has duplicate indices")
            bad = [i for i in keep if not 0 <= i < max_rank]
            if bad:
                raise OnnxlrfError(f"plan node {node!r}: keep index {bad[0]} outside 0..{max_rank - 1}")
    by_weight: dict[str, LayerPlan] = {}
    for entry in plan.layers:
        first = by_weight.setdefault(entry.weight, entry)
        if _factor_choice(entry) != _factor_choice(first):
            raise OnnxlrfError(
                f"plan nodes {first.node!r} and {entry.node!r} share weight {entry.weight!r} but plan it differently"
            )


def _basis_tuple(parts: dict) -> tuple:
    """A stored basis from its named parts, absent ones None, trailing absent ones left off."""
    basis = [parts.get(part) for part in BASIS_PARTS]
    while basis[-1] is None:
        basis.pop()
    return tuple(basis)


def _factor_choice(entry: LayerPlan) -> tuple:
    return entry.decomposition, entry.rank, tuple(sorted(entry.kept_indices())), entry.bias_correction
