"""Command line: parses arguments and calls the library, nothing more."""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import json
import math
import numbers
import os
import shlex
import sys
from typing import TYPE_CHECKING, Any, Callable

import click

from .errors import OnnxlrfError
from .termination import sigterm_as_interrupt

if TYPE_CHECKING:
    from .progress import Progress


def _one_line_error(message: str) -> click.ClickException:
    """click's ``Error: <message>`` with exit status 1, the message's lines joined into one."""
    return click.ClickException(" ".join(line.strip() for line in message.splitlines()))


def _usage_error(exc: click.UsageError) -> click.ClickException:
    """A usage error (bad option value, missing option, unknown command) as one line and exit status 1,
    like any other bad input, in place of click's usage message and exit status 2."""
    where = f" (see '{exc.ctx.command_path} --help')" if exc.ctx is not None else ""
    return _one_line_error(exc.format_message() + where)


class _Group(click.Group):
    """Turns library errors and usage errors into one line ``Error: ...`` and exit status 1.

    Running ``onnxlrf`` without arguments still shows the help (click's NoArgsIsHelpError).
    """

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        ctx.meta["onnxlrf.argv"] = list(args)  # the exact command, for reports
        try:
            return super().parse_args(ctx, args)
        except click.exceptions.NoArgsIsHelpError:
            raise
        except click.UsageError as exc:
            raise _usage_error(exc) from None

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except OnnxlrfError as exc:
            raise _one_line_error(str(exc)) from None
        except click.exceptions.NoArgsIsHelpError:
            raise
        except click.UsageError as exc:  # the command's own arguments, or an unknown command
            raise _usage_error(exc) from None


def _run(as_json: bool, work: Callable[[], Any]) -> Any:
    """Run ``work``; with --json, keep stdout for the one JSON object."""
    if not as_json:
        return work()
    with contextlib.redirect_stdout(sys.stderr):
        return work()


def _progress(quiet: bool) -> Progress:
    """Progress bars and decision log on stderr, or nothing with --quiet."""
    from .progress import Progress

    return Progress(enabled=not quiet)


def _command_line() -> str:
    return shlex.join(["onnxlrf", *click.get_current_context().meta.get("onnxlrf.argv", [])])


_quiet_option = click.option("-q", "--quiet", is_flag=True, help="No progress bars or log on stderr.")


def _strict_json_value(value: Any) -> Any:
    """``value`` with NaN and infinities as null (JSON has no such numbers) and numpy scalars as numbers."""
    if isinstance(value, dict):
        return {key: _strict_json_value(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict_json_value(item) for item in value]
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value) if math.isfinite(value) else None
    return value


def _emit(as_json: bool, payload: dict, human: str) -> None:
    """Print the result: with ``as_json``, ``payload`` as strict JSON (non-finite numbers as null)."""
    if as_json:
        click.echo(json.dumps(_strict_json_value(payload), default=str, allow_nan=False))
    else:
        click.echo(human)


def _fmt_validation(v: Any) -> str:
    lines = [f"{v.metric}: {v.value:.4f}"]
    if v.reference_value is not None:
        lines[0] += f" (reference {v.reference_value:.4f})"
    if v.change_interval is not None:
        lines[0] += (f"; change {v.value - v.reference_value:+.4f}, 95% paired-bootstrap interval "
                     f"[{v.change_interval[0]:+.4f}, {v.change_interval[1]:+.4f}]")
    lines.append(f"params: {v.params:,}" + (f" (reference {v.reference_params:,})" if v.reference_params else ""))
    if v.max_abs_diff is not None:
        lines.append(f"max abs diff vs reference: {v.max_abs_diff:.3g}")
    if v.metric == "fidelity":  # which outputs: a detector's are the heads before its post-processing
        lines.append(f"compared: {', '.join(v.compared)}")
    lines.append(f"providers: {', '.join(v.providers)}")
    return "\n".join(lines)


@click.group(cls=_Group)
@click.version_option(package_name="onnxlrf")
def cli() -> None:
    """Low-rank factorization of ONNX models, validated in onnxruntime."""


@cli.command()
@click.argument("model")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="ONNX file to write.")
@click.option("--weights", type=click.Path(), help="Checkpoint to load instead of downloading.")
@click.option("--batch", default=1, show_default=True, type=click.IntRange(min=1), help="Static batch size.")
@click.option("--dynamic-batch", is_flag=True, help="Make the batch dimension dynamic.")
@click.option("--dynamo", is_flag=True, help="Use torch's dynamo exporter (opset 18) instead of TorchScript (opset 17).")
@click.option("--overwrite", is_flag=True, help="Replace an existing output file.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@_quiet_option
def export(model: str, output: str, weights: str | None, batch: int, dynamic_batch: bool, dynamo: bool,
           overwrite: bool, as_json: bool, quiet: bool) -> None:
    """Export MODEL (a model name, see docs) to ONNX and check it against torch in onnxruntime."""
    from .export import export_model
    from .models import load_model
    from .onnx_io import check_output_path

    def run() -> Any:
        check_output_path(output, (weights,), overwrite)  # before the checkpoint is even read
        return export_model(load_model(model, weights=weights), output, dynamo=dynamo, batch=batch,
                            dynamic_batch=dynamic_batch, overwrite=overwrite, progress=_progress(quiet))

    result = _run(as_json, run)
    payload = dataclasses.asdict(result)
    _emit(as_json, payload,
          f"wrote {result.path} ({result.exporter}, opset {result.opset}); "
          f"max abs diff vs torch {result.max_abs_diff:.3g} (tolerance {result.tolerance:g}) "
          f"on {', '.join(result.providers)}")


class _OptionGroup:
    """CLI options that fill one of the library's option objects (as Polygraphy's argument groups do).

    Decorating a command adds the options; :meth:`build` takes their values out of the command's
    keyword arguments and makes the object. ``fields`` maps parameter names to the object's fields.
    """

    def __init__(self, target: str, fields: dict[str, str], *options: Callable) -> None:
        self.target, self.fields, self.options = target, fields, options

    def __call__(self, command: Callable) -> Callable:
        for option in reversed(self.options):
            command = option(command)
        return command

    def build(self, params: dict[str, Any]) -> Any:
        module, name = self.target.rsplit(".", 1)
        options_type = getattr(importlib.import_module(module), name)
        return options_type(**{field: params.pop(param) for param, field in self.fields.items()})


# onnxlrf.verify.search.DEFAULT_ACCEPTANCE's z, here so that --help does not import the library
# (tests/test_cli.py checks that they agree).
DEFAULT_ACCEPTANCE_Z = "2.2"


def _acceptance_z(ctx: click.Context, param: click.Parameter, value: str) -> float | None:
    """``--acceptance-z``: a number, or ``off`` (None: the metric alone decides)."""
    if value.strip().lower() == "off":
        return None
    try:
        z = float(value)
    except ValueError:
        raise click.BadParameter(f"expected a number or 'off', got {value!r}") from None
    if not math.isfinite(z):
        raise click.BadParameter(f"expected a finite number or 'off', got {value!r}")
    return z


_plan_options = _OptionGroup(
    "onnxlrf.planning.joint.PlanOptions",
    {name: name for name in ("mode", "target_reduction", "target", "rank_multiple", "rank_fraction", "energy",
                             "tolerance", "solver")},
    click.option("--mode", type=click.Choice(["lossless", "compact", "uniform", "energy"]), required=True,
                 help="lossless: best accuracy at --target-reduction; compact: smallest model as accurate as the "
                      "original; uniform/energy: data-free baselines."),
    click.option("--target-reduction", type=click.FloatRange(0, 1, min_open=True, max_open=True),
                 help="Fraction of the model's --target (parameters by default) to remove."),
    click.option("--target", type=click.Choice(["params", "flops", "latency", "bytes", "bits"]), default="params",
                 show_default=True,
                 help="What --target-reduction counts: parameters, Conv/ConvTranspose/Gemm/MatMul FLOPs at --batch, "
                      "latency measured on --provider at --batch (layers whose factorized pair is not faster stay "
                      "dense), bytes of the weights as stored, or logical bits of the Conv/Gemm/MatMul weights "
                      "(float32: 32; 0.9 is 3.2 average bits). --technique quant plans bytes, bits, or latency "
                      "(W8A8 layers, --activations int8: layers not measured faster with int8 inputs stay float)."),
    click.option("--rank-multiple", type=click.IntRange(min=1),
                 help="Ranks are multiples of this (default: 8 on CUDA and for --target latency or flops, else 1)."),
    click.option("--rank-fraction", type=click.FloatRange(0, 1, min_open=True),
                 help="uniform: fraction of each layer's full rank to keep."),
    click.option("--energy", type=click.FloatRange(0, 1, min_open=True),
                 help="energy: share of squared singular values to keep in each layer."),
    click.option("--tolerance", default=0.0, show_default=True, type=float,
                 help="compact: largest predicted loss increase allowed (data without labels: also the largest "
                      "relative squared error to the original's outputs measured on validation; needs > 0)."),
    click.option("--solver", type=click.Choice(["lagrangian", "dp", "milp"]), default="lagrangian", show_default=True,
                 help="The knapsack's solver: Lagrangian sweep, exact DP over a discretized size, or exact MILP."),
)
_split_options = _OptionGroup(
    "onnxlrf.verify.splits.SplitOptions", {"calib": "calib", "val": "val", "seed": "seed"},
    click.option("--calib", default=1000, show_default=True, type=click.IntRange(min=1),
                 help="Joint modes: calibration samples."),
    click.option("--val", default=1000, show_default=True, type=click.IntRange(min=1),
                 help="Joint modes: validation samples (back-off); the rest is the held-out test split."),
    click.option("--seed", default=0, show_default=True, type=click.IntRange(min=0), help="Fixes the splits."),
)
_analysis_options = _OptionGroup(
    "onnxlrf.measure.analysis.AnalysisOptions",
    {"labels": "labels", "spatial": "spatial", "analysis_cache": "cache", "first_order": "first_order"},
    click.option("--labels", type=click.Choice(["labels", "predictions", "outputs"]),
                 help="Calibration targets: the data's labels, or the original model's predictions (label-free: "
                      "its classes; for sentence encoders its similarities, the better choice in lossless mode), "
                      "or its outputs (label-free, any model: the loss is the distance to them). Default: labels; "
                      "outputs for data without labels."),
    click.option("--spatial/--no-spatial", default=None,
                 help="Joint modes: also analyse k x k convs in spatial decomposition (k x 1 then 1 x k), so the "
                      "planner chooses channel or spatial per layer. Default: on for --target flops and latency."),
    click.option("--first-order/--no-first-order", default=False, show_default=True,
                 help="Joint modes: the calibration loss gradient's first-order terms enter the predicted loss "
                      "changes (off: the curvature term alone, as label-free targets have; on, they chase the "
                      "calibration split's noise)."),
    click.option("--analysis-cache", type=click.Path(file_okay=False),
                 help="Joint modes: keep each joint analysis in this directory and reuse it when the model, "
                      "calibration split and options are the same, so another target or mode skips the analysis."),
)
_verify_options = _OptionGroup(
    "onnxlrf.verify.backoff.VerifyOptions",
    {"rounds": "rounds", "refit": "refit", "acceptance_z": "acceptance_z", "select": "select"},
    click.option("--rounds", default=1, show_default=True, type=click.IntRange(min=1),
                 help="Joint modes: analyse and back off again around each round's truncated weights "
                      "(compact: until a round adds nothing; lossless: the target in equal steps)."),
    click.option("--refit/--no-refit", default=True, show_default=True,
                 help="Joint modes: also try the back-off's plans improved on the calibration split to undo "
                      "what the layers before each layer changed (low-rank: its factors refit; quant: its weights "
                      "rounded again on the quantized model's inputs); kept where validation says it is better."),
    click.option("--acceptance-z", default=DEFAULT_ACCEPTANCE_Z, show_default=True, callback=_acceptance_z,
                 metavar="Z|off",
                 help="compact: a plan holds on validation when its metric is at least the original's and its "
                      "mean per-sample loss change is Z standard errors below 0 (paired), which keeps plans that "
                      "are only lucky on the validation split out at a measured rate; off: the metric alone."),
    click.option("--select", type=click.Choice(["auto", "loss", "metric"]), default="auto", show_default=True,
                 help="lossless: how the back-off chooses among the plans it verified: loss, the lowest mean "
                      "validation loss (it moves on every sample, where top-1 moves on the few that flip); metric, "
                      "the highest validation metric; auto: loss for classification, metric otherwise (a sentence "
                      "encoder's loss is not what its Spearman metric rewards)."),
)
_quant_options = _OptionGroup(
    "onnxlrf.techniques.quant.planners.QuantOptions",
    {name: name for name in ("bits", "activations", "runtime", "calibration_method", "block_size", "rounding",
                             "reduce_range", "predictor", "smoothing")},
    click.option("--bits", type=click.IntRange(2, 8),
                 help="--technique quant: weight bits of every quantized layer (2-8; 4 or fewer are stored as "
                      "packed int4, 5-8 as int8; all in int8 with --activations int8)."),
    click.option("--activations", type=click.Choice(["none", "int8"]), default="none", show_default=True,
                 help="--technique quant: int8 also quantizes the layers' input activations (W8A8 with --bits 8, "
                      "W4A8 with --bits 4; ranges calibrated on the calibration split of --data)."),
    click.option("--runtime", type=click.Choice(["onnxruntime", "tensorrt"]), default="onnxruntime",
                 show_default=True,
                 help="--technique quant: the Q/DQ form: what onnxruntime's CPU provider fuses into integer kernels "
                      "(uint8 activations; see --reduce-range), or TensorRT's symmetric int8."),
    click.option("--calibration-method", type=click.Choice(["minmax", "percentile", "entropy"]), default="minmax",
                 show_default=True, help="--technique quant: onnxruntime's calibrator for activation ranges."),
    click.option("--block-size", type=click.IntRange(min=2),
                 help="--technique quant: Gemm/MatMul weights get one scale per block of this many inputs "
                      "(weight-only, --bits 4 or fewer; opset 21); lossless/compact plans offer them such "
                      "options at 4, 3 and 2 bits beside the per-channel ones."),
    click.option("--rounding", type=click.Choice(["loss-aware", "nearest", "sequential"]),
                 help="--technique quant. Loss-aware plans (lossless, compact): loss-aware (the default) rounds "
                      "each layer's option both ways, with error feedback in the loss's curvature and searched "
                      "clipping, or to nearest, and keeps the one of smaller predicted loss change; nearest: round "
                      "to nearest only. Uniform plans run no analysis: nearest (the default), or sequential: every "
                      "layer then rounded again in graph order, with error feedback, toward the weight that best "
                      "reproduces its float output from the quantized model's inputs on the calibration split."),
    click.option("--reduce-range", type=click.Choice(["on", "off", "auto"]), default="on", show_default=True,
                 help="--technique quant, onnxruntime form: W8A8 weights on 7 bits (on), which x86 CPUs without "
                      "VNNI need (their u8 x s8 kernels overflow 8-bit weights), or 8 (off: for CPUs with VNNI "
                      "or ARM); auto: as the machine running onnxlrf needs."),
    click.option("--predictor", type=click.Choice(["kfac", "hessian-trace"]), default="kfac", show_default=True,
                 help="--technique quant, loss-aware plans: how each option's loss change is predicted: kfac (the "
                      "total differential with K-FAC curvature), or hessian-trace (HAWQ-v2's mean Hessian diagonal "
                      "times ||dW||^2 / 2: a baseline to compare plans with)."),
    click.option("--smoothing", type=click.Choice(["auto", "on", "off"]), default="auto", show_default=True,
                 help="--technique quant, uniform plans with --activations int8: divide each Gemm/MatMul input's "
                      "channels by s and multiply the weight's rows by s (SmoothQuant), s's strength searched per "
                      "input on the calibration split (none where none quantizes its readers' outputs closer to "
                      "float). auto: the inputs of W8A8 layers (7- or 8-bit weights); on: also below 8 bits (W4A8); "
                      "off: none. Lossless and compact plans are not smoothed."),
)
_export_options = _OptionGroup(
    "onnxlrf.pipeline.ExportOptions",
    {"weights": "weights", "dynamo": "dynamo", "batch": "batch", "dynamic_batch": "dynamic_batch"},
    click.option("--weights", type=click.Path(), help="Checkpoint for a model name."),
    click.option("--dynamo", is_flag=True, help="Export with the dynamo exporter."),
    click.option("--batch", default=1, show_default=True, type=click.IntRange(min=1)),
    click.option("--dynamic-batch", is_flag=True),
)


@cli.command()
@click.argument("model")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="ONNX file to write.")
@_plan_options
@_split_options
@_analysis_options
@_verify_options
@click.option("--technique", type=click.Choice(["lowrank", "quant"]), default="lowrank", show_default=True,
              help="lowrank: low-rank factorization; quant: quantization (--mode uniform, or lossless/compact "
                   "with --target bytes, bits or latency).")
@_quant_options
@click.option("--data", help="DATA spec, e.g. cifar10-jpeg:PATH, stsb:PATH, npz:PATH (joint modes need it).")
@_export_options
@click.option("--plan-out", type=click.Path(dir_okay=False), help="Also write the plan (JSON).")
@click.option("--provider", type=click.Choice(["auto", "cuda", "cpu"]), default="auto", show_default=True)
@click.option("--report", "report_dir", type=click.Path(file_okay=False),
              help="Also write a Markdown and a self-contained HTML report into this directory.")
@click.option("--overwrite", is_flag=True, help="Replace existing output files.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@_quiet_option
def compress(model: str, output: str, technique: str, data: str | None, plan_out: str | None, provider: str,
             report_dir: str | None, overwrite: bool, as_json: bool, quiet: bool, **params: Any) -> None:
    """Compress MODEL (a model name or an ONNX file) into a low-rank or quantized ONNX file."""
    from .onnx_io import staged_outputs
    from .pipeline import compress as run_compress
    from .pipeline import compress_quant
    from .report import check_report_dir, write_report

    if technique == "quant":
        if params["bits"] is not None and params["mode"] != "uniform":
            raise OnnxlrfError(f"--bits is for --mode uniform; mode {params['mode']} chooses bits per layer")
        if params["mode"] == "uniform" and (params["target"] != "params" or params["target_reduction"] is not None):
            raise OnnxlrfError("--target and --target-reduction are for --mode lossless or compact; --mode uniform "
                               "quantizes every layer at --bits")
    elif params["bits"] is not None or params["block_size"] is not None or params["activations"] != "none" \
            or params["rounding"] is not None or params["predictor"] != "kfac" or params["smoothing"] != "auto":
        raise OnnxlrfError("--bits, --activations, --block-size, --rounding, --predictor and --smoothing apply to "
                           "--technique quant")
    if report_dir is not None:
        check_report_dir(report_dir, overwrite)  # before the work, not after
    quant = _quant_options.build(params) if technique == "quant" else None
    # A uniform quantization plan takes none of the plan options (nor their low-rank checks).
    options = _plan_options.build(params) if quant is None or params["mode"] != "uniform" else None
    splits = _split_options.build(params)
    analysis, verify, export = _analysis_options.build(params), _verify_options.build(params), \
        _export_options.build(params)

    def work() -> tuple[Any, Any]:
        # Model, plan and report go in place together, or none of them.
        with staged_outputs(overwrite) as stage:
            if quant is not None:
                result = compress_quant(model, output, quant, options, data, splits, analysis, verify, export,
                                        provider=provider, plan_out=plan_out, overwrite=overwrite,
                                        progress=_progress(quiet), stage=stage)
            else:
                result = run_compress(model, output, options, data, splits, analysis, verify, export,
                                      provider=provider, plan_out=plan_out, overwrite=overwrite,
                                      progress=_progress(quiet), stage=stage)
            report = None if report_dir is None else \
                write_report(result, report_dir, _command_line(), overwrite=overwrite, stage=stage)[1]
        return result, report

    result, html_path = _run(as_json, work)
    payload = result.to_dict()
    if html_path is not None:
        payload["report"] = str(html_path)
    if technique == "quant":
        human = (f"wrote {result.output}: {result.extra['model_bytes']:,} bytes (reference "
                 f"{result.extra['reference_model_bytes']:,}), {result.extra['average_weight_bits']:.2f} weight bits "
                 f"on average; {len(result.rewrite.rewritten)} layers quantized, {len(result.rewrite.kept_dense)} "
                 f"float")
    else:
        human = (f"wrote {result.output}: {result.params:,} params "
                 f"({result.params_reduction:.1%} fewer than {result.reference_params:,}); "
                 f"{len(result.rewrite.rewritten)} layers factorized, {len(result.rewrite.kept_dense)} dense")
    if result.validation is not None:
        human += "\n" + _fmt_validation(result.validation)
    if report_dir is not None:
        human += f"\nreport: {payload['report']}"
    _emit(as_json, payload, human)


@cli.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--plan", "plan_path", required=True, type=click.Path(dir_okay=False), help="Plan JSON.")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False))
@click.option("--overwrite", is_flag=True)
@click.option("--json", "as_json", is_flag=True)
@_quiet_option
def rewrite(model: str, plan_path: str, output: str, overwrite: bool, as_json: bool, quiet: bool) -> None:
    """Apply a plan (low-rank or quantization) to MODEL (ONNX) and write the compressed ONNX file."""
    from .pipeline import rewrite_file

    report = _run(as_json, lambda: rewrite_file(model, plan_path, output, overwrite=overwrite,
                                                progress=_progress(quiet)))
    quantized = any("bits" in done for done in report.rewritten)  # a quantization plan's layers
    _emit(as_json, dataclasses.asdict(report),
          f"wrote {output}: {len(report.rewritten)} layers factorized, {len(report.kept_dense)} dense; "
          f"params {report.params_before:,} -> {report.params_after:,}" if not quantized else
          f"wrote {output}: {len(report.rewritten)} layers quantized, {len(report.kept_dense)} float")


@cli.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--reference", type=click.Path(dir_okay=False), help="Original ONNX model to compare with.")
@click.option("--data", required=True, help="DATA spec: cifar10-jpeg:PATH, cifar10, stsb:PATH, npz:PATH.")
@click.option("--provider", type=click.Choice(["auto", "cuda", "cpu"]), default="auto", show_default=True)
@click.option("--batch-size", default=128, show_default=True, type=click.IntRange(min=1))
@click.option("--json", "as_json", is_flag=True)
@_quiet_option
def validate(model: str, reference: str | None, data: str, provider: str, batch_size: int, as_json: bool,
             quiet: bool) -> None:
    """Evaluate MODEL on DATA in onnxruntime, optionally against a reference model."""
    from .data import load_data
    from .onnx_io import load_onnx
    from .runtime.evaluate import validate as run_validate

    def work() -> Any:
        onnx_model = load_onnx(model)
        ref = load_onnx(reference) if reference else None
        dataset = load_data(data, onnx_model)
        return run_validate(onnx_model, dataset, reference=ref, batch_size=batch_size, provider=provider,
                            progress=_progress(quiet))

    result = _run(as_json, work)
    _emit(as_json, dataclasses.asdict(result), _fmt_validation(result))


@cli.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--reference", required=True, type=click.Path(dir_okay=False), help="Original ONNX model.")
@click.option("--batch", default=1, show_default=True, type=click.IntRange(min=1))
@click.option("--runs", default=30, show_default=True, type=click.IntRange(min=1))
@click.option("--warmup", default=5, show_default=True, type=click.IntRange(min=0))
@click.option("--threads", type=click.IntRange(1, os.cpu_count() or 1),
              help="onnxruntime intra-op threads (at most this machine's CPUs).")
@click.option("--provider", type=click.Choice(["auto", "cuda", "cpu"]), default="auto", show_default=True)
@click.option("--io-binding", is_flag=True,
              help="Copy inputs to the provider's device once and keep outputs there (GPU timing without "
                   "host<->device copies; on CPU, inputs bound in host memory).")
@click.option("--json", "as_json", is_flag=True)
@_quiet_option
def bench(model: str, reference: str, batch: int, runs: int, warmup: int, threads: int | None, provider: str,
          io_binding: bool, as_json: bool, quiet: bool) -> None:
    """Time MODEL against REFERENCE, interleaved, in onnxruntime."""
    from .onnx_io import load_onnx
    from .runtime.evaluate import benchmark

    result = _run(as_json, lambda: benchmark(
        load_onnx(model), load_onnx(reference), batch=batch, warmup=warmup, runs=runs, provider=provider,
        threads=threads, progress=_progress(quiet), io_binding=io_binding))
    _emit(as_json, dataclasses.asdict(result),
          f"latency {result.latency_ms:.3f} ms vs reference {result.reference_latency_ms:.3f} ms: "
          f"{result.speedup:.2f}x; FLOPs {result.flops:,} vs {result.reference_flops:,}; "
          f"providers {', '.join(result.providers)}")


def _input_shapes(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> dict[str, list[int]]:
    shapes = {}
    for value in values:
        name, _, dims = value.rpartition("=")
        try:
            shapes[name] = [int(d) for d in dims.split(",")]
        except ValueError:
            raise click.BadParameter(f"{value!r} is not NAME=D1,D2,...") from None
        if not name:
            raise click.BadParameter(f"{value!r} is not NAME=D1,D2,...")
    return shapes


@cli.command("inspect")
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--input-shape", "input_shapes", multiple=True, callback=_input_shapes, metavar="NAME=D1,D2,...",
              help="Input shape to count FLOPs at (default: static dims; dynamic batch 1, other dynamic dims 128).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@_quiet_option
def inspect_command(model: str, input_shapes: dict[str, list[int]], as_json: bool, quiet: bool) -> None:
    """List MODEL's factorizable layers (shapes, params, FLOPs, ranks) and the nodes that are not, and why."""
    del quiet  # accepted like on every command; inspect shows no progress
    from .inspection import format_inspection, inspect_model

    result = _run(as_json, lambda: inspect_model(model, input_shapes or None))
    _emit(as_json, result.to_dict(), format_inspection(result))


def main() -> None:
    """The ``onnxlrf`` console script. SIGTERM stops it like Ctrl-C, so that no staged output or
    temporary file is left behind."""
    with sigterm_as_interrupt():
        cli(prog_name="onnxlrf")


if __name__ == "__main__":
    main()
