"""The main job: model (name or ONNX file) in, low-rank ONNX file out, validated.

``compress`` chains the stages a Python user can also call one by one:
export (or load) -> plan -> rewrite -> save -> validate.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx

from .errors import OnnxlrfError
from .onnx_io import check_output_path, load_onnx, save_onnx
from .planning import Plan, count_params, plan_energy, plan_uniform
from .rewrite import RewriteReport, apply_plan

PLANNING_MODES = ("uniform", "energy")


@dataclass
class CompressResult:
    output: Path
    plan: Plan
    rewrite: RewriteReport
    params: int
    reference_params: int
    validation: Any = None  # validation.ValidationResult when data was given
    export: Any = None  # export.ExportResult when a model name was given
    extra: dict = field(default_factory=dict)

    @property
    def params_reduction(self) -> float:
        return 1.0 - self.params / self.reference_params

    def to_dict(self) -> dict:
        out = {
            "output": str(self.output),
            "mode": self.plan.mode,
            "params": self.params,
            "reference_params": self.reference_params,
            "params_reduction": self.params_reduction,
            "layers_factorized": len(self.rewrite.rewritten),
            "layers_dense": len(self.rewrite.kept_dense),
        }
        if self.validation is not None:
            out.update(dataclasses.asdict(self.validation))
            # compress's own parameter counts are the authority for both models.
            out["params"], out["reference_params"] = self.params, self.reference_params
        out.update(self.extra)
        return out


def is_onnx_path(model: str) -> bool:
    return model.endswith(".onnx") or Path(model).is_file()


def load_or_export(
    model: str,
    workdir: str | os.PathLike,
    weights: str | None = None,
    dynamo: bool = False,
    batch: int = 1,
    dynamic_batch: bool = False,
) -> tuple[Path, Any]:
    """Return the path of an ONNX file for ``model``: the file itself, or a fresh export into ``workdir``."""
    if is_onnx_path(model):
        if weights:
            raise OnnxlrfError("--weights applies to model names, not to ONNX files")
        load_onnx(model, load_external_data=False)  # fail early with a clear message
        return Path(model), None
    from .export import export_model
    from .models import load_model

    spec = load_model(model, weights=weights)
    exported = export_model(
        spec, Path(workdir) / "reference.onnx", dynamo=dynamo, batch=batch, dynamic_batch=dynamic_batch
    )
    return Path(exported.path), exported


def make_plan(
    model: onnx.ModelProto,
    mode: str,
    target_reduction: float | None = None,
    rank_fraction: float | None = None,
    energy: float | None = None,
) -> Plan:
    if mode == "uniform":
        if (target_reduction is None) == (rank_fraction is None):
            raise OnnxlrfError("mode uniform needs exactly one of --target-reduction or --rank-fraction")
        return plan_uniform(model, rank_fraction=rank_fraction, target_reduction=target_reduction)
    if mode == "energy":
        if (target_reduction is None) == (energy is None):
            raise OnnxlrfError("mode energy needs exactly one of --target-reduction or --energy")
        return plan_energy(model, energy=energy, target_reduction=target_reduction)
    raise OnnxlrfError(f"unknown mode {mode!r}; known: {', '.join(PLANNING_MODES)}")


def compress(
    model: str,
    output: str | os.PathLike,
    mode: str = "uniform",
    target_reduction: float | None = None,
    rank_fraction: float | None = None,
    energy: float | None = None,
    data: str | None = None,
    weights: str | None = None,
    plan_out: str | os.PathLike | None = None,
    overwrite: bool = False,
    dynamo: bool = False,
    batch: int = 1,
    dynamic_batch: bool = False,
    provider: str = "auto",
) -> CompressResult:
    """Compress ``model`` (a model name or an ONNX path) and write ``output``.

    With ``data``, the result is validated against the original model in
    onnxruntime. Outputs are only written once everything before succeeded.
    """
    inputs = (model,) if is_onnx_path(model) else ()
    output = check_output_path(output, inputs, overwrite)
    if plan_out is not None:
        plan_out = check_output_path(plan_out, inputs + (output,), overwrite)
        if Path(plan_out).resolve() == output.resolve():
            raise OnnxlrfError("--plan-out must differ from the output path")
    with tempfile.TemporaryDirectory(prefix="onnxlrf-") as workdir:
        reference_path, exported = load_or_export(model, workdir, weights, dynamo, batch, dynamic_batch)
        reference = load_onnx(reference_path)
        dataset = None
        if data is not None:
            from .data import load_data

            dataset = load_data(data, reference)
        plan = make_plan(reference, mode, target_reduction, rank_fraction, energy)
        plan.source = {"model": model, **plan.source}
        compressed, report = apply_plan(reference, plan)
        validation = None
        if dataset is not None:
            from .validation import validate

            validation = validate(compressed, dataset, reference=reference, provider=provider)
        save_onnx(compressed, output)
        if plan_out is not None:
            plan.save(plan_out)
        return CompressResult(
            output=output,
            plan=plan,
            rewrite=report,
            params=count_params(compressed),
            reference_params=count_params(reference),
            validation=validation,
            export=exported,
        )


def rewrite_file(
    model: str | os.PathLike, plan: str | os.PathLike | Plan, output: str | os.PathLike, overwrite: bool = False
) -> RewriteReport:
    """Apply a plan (a JSON file or a Plan) to an ONNX file and write the result."""
    output = check_output_path(output, (model, plan if not isinstance(plan, Plan) else None), overwrite)
    reference = load_onnx(model)
    if not isinstance(plan, Plan):
        plan = Plan.load(plan)
    compressed, report = apply_plan(reference, plan)
    save_onnx(compressed, output)
    return report
