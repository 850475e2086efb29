"""Markdown and self-contained HTML reports of a compression run.

:func:`write_report` puts into one directory: ``report.md``, ``report.html``
(everything inline: styles, SVG plots, the plan; no external resources),
the plots as ``*.svg`` for the Markdown file, and ``plan.json``.

Contents: a summary (sizes, FLOPs, metrics on each split), a per-layer table
(weight shape, the technique's columns, e.g. maximum and kept rank,
decomposition and basis; predicted and measured loss change, parameters,
FLOPs and latency, dense and planned), three plots (what each layer keeps,
e.g. the rank; predicted vs measured single-layer loss change; metric vs size
with the back-off attempts and any baselines), the
back-off steps, the execution providers, package versions, the exact command
and the plan.

The plots are drawn with matplotlib's SVG backend (no display, the user's
rcParams left as they are) and put inline into the HTML, with fixed ids and no
date, so the same run gives the same bytes.
"""

from __future__ import annotations

import contextlib
import datetime
import html
import io
import math
import os
import platform
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import matplotlib.style
import onnx
from matplotlib.artist import Artist
from matplotlib.axes import Axes
from matplotlib.backends.backend_svg import FigureCanvasSVG
from matplotlib.colors import to_rgba
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FixedLocator, FuncFormatter, MaxNLocator, NullLocator
from matplotlib.transforms import Bbox

from .errors import OnnxlrfError
from .inspection import format_si
from .onnx_io import StagedOutputs, check_output_path, load_onnx, staged_outputs
from .techniques import TECHNIQUES
from .techniques.base import EntryView, KeepPlot

MARKDOWN, HTML, PLAN = "report.md", "report.html", "plan.json"
PLOTS = {"rank": "rank.svg", "loss": "loss.svg", "curve": "curve.svg"}
# The metric-vs-size plot's x axis by the plan's target.
TARGET_AXES = {"params": "parameters removed", "flops": "FLOPs removed", "latency": "latency removed",
               "bytes": "weight bytes removed", "bits": "weight bits removed"}
REPORT_FILES = (MARKDOWN, HTML, PLAN, *PLOTS.values())
# Colours (tab10) shared by the plots and the page.
BLUE, ORANGE, GREEN, RED, PURPLE, BROWN, PINK, GREY, OLIVE, CYAN = (
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")
BASELINE_COLOURS = (ORANGE, GREEN, PURPLE, BROWN, PINK, OLIVE, CYAN)


@dataclass
class LayerRow:
    """One layer of the plan as the report shows it (None: not known); ``view``: its technique's columns."""

    node: str
    op_type: str
    weight_shape: list[int]
    technique: str
    view: EntryView
    params_dense: int
    params_planned: int
    predicted_dloss: float | None = None
    measured_dloss: float | None = None  # single-layer measurement at exactly this choice
    checks: list[dict] = field(default_factory=list)  # single-layer truncations measured by the analysis
    flops_dense: int | None = None
    flops_planned: int | None = None
    latency_ms_dense: float | None = None
    latency_ms_planned: float | None = None
    reason: str = ""  # why the layer stayed as it was

    @property
    def changed(self) -> bool:
        return self.view.kept is not None


def check_report_dir(directory: str | os.PathLike, overwrite: bool = False) -> Path:
    """Refuse a report directory that already holds report files (unless ``overwrite``) or is a file.

    Called before the work starts, so a run does not end with nowhere to write.
    """
    directory = Path(directory)
    existing = next((p for p in (directory, *directory.parents) if p.exists()), None)
    if existing == directory and not directory.is_dir():
        raise OnnxlrfError(f"report directory is a file: {directory}")
    if existing is not None and not existing.is_dir():
        raise OnnxlrfError(f"report directory {directory} lies below {existing}, which is not a directory")
    for name in REPORT_FILES:
        path = directory / name
        if path.exists() or path.is_symlink():
            if not overwrite:
                raise OnnxlrfError(f"report exists: {path} (pass --overwrite to replace it)")
            check_output_path(path, (), overwrite)  # a directory, FIFO or device there is never replaced
    return directory


def write_report(
    result: Any,
    directory: str | os.PathLike,
    command: str | None = None,
    baselines: list[dict] | None = None,
    overwrite: bool = False,
    stage: StagedOutputs | None = None,
) -> tuple[Path, Path]:
    """Write the report of ``result`` (a :class:`~onnxlrf.pipeline.CompressResult`) into ``directory``.

    ``command``: the command line that produced it (shown as it is). ``baselines``:
    other methods' results for the metric-vs-size plot, each ``{"method", "reduction", "value"}``
    (``value`` on the same split as the result's final metric). The directory is created;
    existing report files are replaced only with ``overwrite``; all files are
    written together or not at all (``stage``: the caller's
    :func:`~onnxlrf.onnx_io.staged_outputs`, with the model and plan of the run). Returns the
    Markdown and HTML paths.
    """
    directory = check_report_dir(directory, overwrite)
    baselines = _check_baselines(baselines or [])
    page = _collect(result, command, baselines)
    plots = {"rank": keep_plot(page["rows"]), "loss": loss_plot(page["rows"]),
             "curve": curve_plot(page["curve"], page["metric"], baselines)}
    created = not directory.exists()
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OnnxlrfError(f"cannot create report directory {directory}: {exc.strerror}") from None
    try:
        with staged_outputs(overwrite, within=stage) as outputs:
            for key, svg in plots.items():
                if svg is not None:
                    outputs.path(directory / PLOTS[key]).write_text(svg, encoding="utf-8")
            outputs.path(directory / PLAN).write_text(result.plan.to_json() + "\n", encoding="utf-8")
            outputs.path(directory / MARKDOWN).write_text(render_markdown(page, plots), encoding="utf-8")
            outputs.path(directory / HTML).write_text(render_html(page, plots), encoding="utf-8")
    except BaseException:
        if created:
            _remove_empty(directory)
        raise
    return directory / MARKDOWN, directory / HTML


def _remove_empty(directory: Path) -> None:
    try:
        directory.rmdir()
    except OSError:
        pass


def _check_baselines(baselines: list[dict]) -> list[dict]:
    for i, row in enumerate(baselines):
        missing = [k for k in ("method", "reduction", "value") if k not in row]
        if missing:
            raise OnnxlrfError(f"baseline {i} is missing key {missing[0]!r} (needs method, reduction, value)")
    return baselines


# --- what goes into the report --------------------------------------------------------------------------

def layer_rows(result: Any) -> list[LayerRow]:
    """The per-layer table of ``result``: the plan, what the rewrite did, FLOPs and plan notes."""
    rewritten = {entry["node"]: entry for entry in result.rewrite.rewritten}
    kept_dense = {entry["node"]: entry["reason"] for entry in result.rewrite.kept_dense}
    flops = _layer_flops(result)
    rows = []
    for entry in result.plan.layers:
        notes = entry.notes or {}
        done = rewritten.get(entry.node)
        technique = TECHNIQUES[entry.technique]
        row = LayerRow(
            node=entry.node, op_type=entry.op_type, weight_shape=list(entry.weight_shape), technique=entry.technique,
            view=technique.view(entry, done), params_dense=entry.params_dense,
            params_planned=done["params_after"] if done else entry.params_dense,
            predicted_dloss=notes.get("predicted_dloss") if done else None,
            checks=list(notes.get("range_checks") or []),
            flops_dense=notes.get("flops_dense", flops.get(entry.node, (None, None))[0]),
            flops_planned=notes.get("flops_planned", flops.get(entry.node, (None, None))[1]),
            latency_ms_dense=notes.get("latency_ms_dense"), latency_ms_planned=notes.get("latency_ms_planned"),
            reason="" if done else notes.get("reason") or kept_dense.get(entry.node, ""),
        )
        if not done:
            row.flops_planned = row.flops_dense
        measured = [c["measured"] for c in row.checks
                    if row.changed and technique.check_key(c) == row.view.check_key]
        row.measured_dloss = measured[0] if measured else None
        rows.append(row)
    return rows


def _layer_flops(result: Any) -> dict[str, tuple[int | None, int | None]]:
    """node -> (dense, planned) FLOPs from shape inference on the original and the written model."""
    from .runtime.shapes import flops_by_node

    try:
        compressed = flops_by_node(load_onnx(result.output))
        original = flops_by_node(result.reference) if result.reference is not None else {}
    except OnnxlrfError:  # shape inference fails on some graphs: the columns stay empty
        return {}
    out = {}
    new_nodes = {entry["node"]: entry["new_nodes"] for entry in result.rewrite.rewritten}
    for entry in result.plan.layers:
        if entry.node in new_nodes:
            # Conv/ConvTranspose/Gemm/MatMul nodes only, as count_flops counts (not e.g. an Add for a bias correction).
            parts = [compressed[name] for name in new_nodes[entry.node] if name in compressed]
            planned = None if None in parts or not parts else sum(parts)
            out[entry.node] = (original.get(entry.node), planned)
        else:
            out[entry.node] = (compressed.get(entry.node), compressed.get(entry.node))
    return out


def _model_flops(result: Any) -> tuple[int | None, int | None, str]:
    """Whole-model Conv/ConvTranspose/Gemm/MatMul FLOPs (original, compressed) and the input shapes they are for."""
    from .runtime.shapes import concrete_input_shapes, count_flops

    try:
        compressed = load_onnx(result.output)
        shapes = concrete_input_shapes(compressed)
        original = count_flops(result.reference, shapes) if result.reference is not None else None
        return original, count_flops(compressed, shapes), ", ".join(f"{k} {v}" for k, v in shapes.items())
    except OnnxlrfError:
        return None, None, ""


def versions() -> dict[str, str]:
    """Versions of onnxlrf, its main dependencies and Python."""
    from importlib.metadata import PackageNotFoundError, version

    import numpy
    import onnxruntime
    import torch

    try:
        own = version("onnxlrf")
    except PackageNotFoundError:  # running from a source tree that is not installed
        own = "not installed"
    return {"onnxlrf": own, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
            "torch": torch.__version__, "numpy": numpy.__version__, "python": platform.python_version(),
            "platform": platform.platform()}


def _splits(result: Any) -> list[dict]:
    """Metric of the original and the compressed model on each split that was evaluated."""
    rows = []
    for name in ("calib", "val", "test"):
        split = result.extra.get(name)
        if isinstance(split, dict) and "value" in split:
            rows.append({"split": {"calib": "calibration", "val": "validation", "test": "held-out test"}[name],
                         **split})
    if not rows and result.validation is not None:
        v = result.validation
        rows.append({"split": "data (all samples)", "value": v.value, "reference_value": v.reference_value,
                     "samples": v.samples, "change_interval": v.change_interval})
    return rows


def _collect(result: Any, command: str | None, baselines: list[dict]) -> dict:
    plan, validation = result.plan, result.validation
    rows = layer_rows(result)
    flops_original, flops_compressed, flops_inputs = _model_flops(result)
    splits = _splits(result)
    final = next((s for s in splits if s["split"] == "held-out test"), splits[0] if splits else None)
    target = plan.options.get("target", "params")
    curve = {"reduction": plan.options.get("achieved_reduction", result.params_reduction), "final": final,
             "axis": TARGET_AXES.get(target, f"{target} removed"),
             "val_reference": plan.options.get("reference_val"),
             "backoff": list(plan.options.get("backoff") or []), "select": plan.options.get("select")}
    summary = [
        ("model", str(plan.source.get("model", "-"))),
        ("mode", plan.mode),
        ("output", str(result.output)),
        ("parameters", f"{result.reference_params:,} -> {result.params:,} ({result.params_reduction:.1%} fewer)"),
        ("layers", f"{len(result.rewrite.rewritten)} {result.layer_keys[0].removeprefix('layers_')}, "
                   f"{len(result.rewrite.kept_dense)} {result.layer_keys[1].removeprefix('layers_')}"),
    ]
    if "average_weight_bits" in result.extra:
        summary.append(("weight bits (Conv/Gemm/MatMul, logical)",
                        f"32 -> {result.extra['average_weight_bits']:.2f} on average"))
    if "smoothing" in plan.options:
        alphas = sorted({smoothing["alpha"] for smoothing in plan.smoothing.values()})
        summary.append(("smoothed W8A8 Gemm/MatMul inputs (SmoothQuant)",
                        f"{len(plan.smoothing)} of {plan.options['smoothing']['searched']}"
                        + (f", alpha {', '.join(map(str, alphas))}" if alphas else "")))
    if flops_compressed is not None:
        before = _flops(flops_original) if flops_original is not None else "-"
        ratio = f" ({1 - flops_compressed / flops_original:.1%} fewer)" if flops_original else ""
        summary.append(("FLOPs (Conv/ConvTranspose/Gemm/MatMul)", f"{before} -> {_flops(flops_compressed)}{ratio}, "
                                                     f"inputs {flops_inputs}"))
    options = {k: v for k, v in plan.options.items() if k not in ("backoff", "bases_file", "smoothing")}
    summary.append(("plan options", ", ".join(f"{k} {_value(v)}" for k, v in options.items() if v is not None)))
    if validation is not None:
        fidelity = [f"max abs diff {validation.max_abs_diff:.3g}" if validation.max_abs_diff is not None else "",
                    f"cosine {validation.cosine:.6f}" if validation.cosine is not None else "",
                    f"top-1 agreement {validation.top1_agreement:.4f}" if validation.top1_agreement is not None
                    else ""]
        summary.append(("outputs vs the original", ", ".join(f for f in fidelity if f) or "-"))
        if validation.reference_file_size:
            summary.append(("file size", f"{validation.reference_file_size:,} -> {validation.file_size:,} bytes"))
    providers = {}
    if validation is not None:
        providers["validation (onnxruntime)"] = ", ".join(validation.providers)
    if result.export is not None:
        export = result.export
        providers["export check (onnxruntime)"] = ", ".join(export.providers) or "-"
        summary.append(("export", f"{export.exporter}, opset {export.opset}, max abs diff vs torch "
                                  f"{export.max_abs_diff:.3g} (tolerance {export.tolerance:.3g})"))
    return {
        "title": f"onnxlrf report: {plan.source.get('model', result.output)}",
        "written": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "summary": summary, "splits": splits, "metric": validation.metric if validation is not None else "metric",
        "rows": rows, "curve": curve, "versions": versions(),
        "providers": providers or {"onnxruntime": "no session ran (no data given)"},
        "command": command, "plan_json": plan.to_json(),
        "bases_note": "; its stored bases are not included (--plan-out writes them beside the plan)"
        if plan.bases else "",
    }


# --- formatting ----------------------------------------------------------------------------------------

def _value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _flops(n: int | None) -> str:
    return format_si(n, missing="-", space=" ")


def _signed(x: float | None) -> str:
    return "-" if x is None else f"{x:+.3g}"


def _pair(before: Any, after: Any, fmt: Callable[[Any], str]) -> str:
    if before is None and after is None:
        return "-"
    if before == after:
        return fmt(before)
    return f"{fmt(before)} -> {fmt(after)}"


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def _checks(row: LayerRow) -> str:
    """Single-layer checks: ``<choice> <predicted>/<measured>`` (low-rank: ``r<rank>``), ``!`` where they disagreed."""
    label = TECHNIQUES[row.technique].check_label
    return "; ".join(f"{label(c)} {c['predicted']:+.3f}/{c['measured']:+.3f}{'' if c.get('agree') else ' !'}"
                     for c in row.checks) or "-"


CHECKS_HEADER = "single-layer checks (pred/meas)"
TABLE_HEAD = ("node", "op", "weight shape")
TABLE_TAIL = ("predicted dloss", "measured dloss", CHECKS_HEADER, "params", "FLOPs", "latency ms", "note")


def table_header(rows: list[LayerRow]) -> tuple[str, ...]:
    """The per-layer table's columns: the generic ones around each technique's (in order of appearance)."""
    middle: dict[str, None] = {}
    for row in rows:
        middle.update(dict.fromkeys(row.view.cells))
    return (*TABLE_HEAD, *middle, *TABLE_TAIL)


def _table_cells(row: LayerRow, header: tuple[str, ...]) -> list[str]:
    generic = dict(zip(TABLE_HEAD, [row.node, row.op_type, "x".join(map(str, row.weight_shape))]))
    generic.update(zip(TABLE_TAIL, [
        _signed(row.predicted_dloss), _signed(row.measured_dloss), _checks(row),
        _pair(row.params_dense, row.params_planned, lambda n: f"{n:,}"),
        _pair(row.flops_dense, row.flops_planned, _flops),
        _pair(row.latency_ms_dense, row.latency_ms_planned, _ms), row.reason]))
    return [generic[h] if h in generic else row.view.cells.get(h, "") for h in header]


CHANGE_NOTE = ("change: compressed minus original; in brackets its 95% paired-bootstrap interval over the "
               "split's samples (validation.change_interval), where both models ran on them here. An interval "
               "that contains 0 means this split cannot tell the two models apart.")
COLUMNS_NOTE = ("params, FLOPs, latency: dense -> planned; FLOPs per run at the input shapes in the summary; "
                "latency only where the plan carries per-layer measurements.")


def table_note(rows: list[LayerRow]) -> str:
    """The per-layer table's note: each technique's words for its columns, then the shared columns'."""
    techniques = sorted({row.technique for row in rows})
    return " ".join([TECHNIQUES[name].table_note for name in techniques] + [COLUMNS_NOTE])


def render_markdown(page: dict, plots: dict[str, str | None]) -> str:
    """The report as Markdown (plots linked as the SVG files beside it)."""
    md = [f"# {page['title']}", "", f"Written {page['written']}.", "", "## Summary", "", "| | |", "|---|---|"]
    md += [f"| {_md(k)} | {_md(v)} |" for k, v in page["summary"]]
    if page["splits"]:
        md += ["", f"## Metric ({page['metric']}) on each split", "",
               "| split | samples | original | compressed | change |", "|---|---|---|---|---|"]
        md += [f"| {s['split']} | {s['samples']:,} | {_metric(s['reference_value'])} | {_metric(s['value'])} | "
               f"{_change(s)} |" for s in page["splits"]]
        md += ["", CHANGE_NOTE]
    header = table_header(page["rows"])
    md += ["", "## Per layer", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    md += ["| " + " | ".join(_md(c) for c in _table_cells(row, header)) + " |" for row in page["rows"]]
    md += ["", table_note(page["rows"]), "", "## Plots", ""]
    for key, (title, caption) in plot_words(page["rows"]).items():
        if plots.get(key) is not None:
            md += [f"![{title}]({PLOTS[key]})", "", f"*{caption}*", ""]
        else:
            md += [f"*{title.capitalize()}: {PLOT_MISSING[key]}.*", ""]
    if page["curve"]["backoff"]:
        md += ["## Back-off on the validation split", "", *([_selection_words(page["curve"]["select"]), ""]
                                                              if page["curve"]["select"] else []),
               "| kappa | reduction | predicted dloss | validation | loss change (s.e.) | |",
               "|---|---|---|---|---|---|"]
        md += [f"| {_kappa(b)} | {b['achieved_reduction']:.1%} | {_dloss(b)} | "
               f"{_metric(b.get('val'))} | {_loss_change(b)} | {_backoff_note(b)} |"
               for b in page["curve"]["backoff"]]
        md.append("")
    md += ["## Run", "", "Command:", "", "```", page["command"] or "(not recorded: Python API)", "```", "",
           "| execution providers | |", "|---|---|"]
    md += [f"| {k} | {_md(v)} |" for k, v in page["providers"].items()] or ["| - | - |"]
    md += ["", "| package | version |", "|---|---|"] + [f"| {k} | {_md(v)} |" for k, v in page["versions"].items()]
    md += ["", "## Plan", "", f"The plan as JSON: [{PLAN}]({PLAN}){page['bases_note']}.", ""]
    return "\n".join(md)


def _md(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _backoff_note(attempt: dict) -> str:
    """What became of one back-off attempt, for the report's back-off table."""
    outcome = _backoff_outcome(attempt)
    if "target_reduction" in attempt:  # compact mode's size search
        return f"size search: lossless at {attempt['target_reduction']:.3g}" + (f"; {outcome}" if outcome else "")
    return outcome


def _backoff_outcome(attempt: dict) -> str:
    restored = f"{attempt['restored']} layers restored (worst measured first)" if attempt.get("restored") else \
        "factors refit on the calibration split" if attempt.get("refit") else ""
    if attempt.get("chosen"):
        return f"chosen: {restored}" if restored else "chosen"
    if restored:
        return restored
    if "same_as_kappa" in attempt:
        return f"the plan of kappa {attempt['same_as_kappa']:.4g}"
    if "val" not in attempt:
        return f"rejected: {attempt['speedup']:.2f}x the original's speed"
    return ""


def _metric(x: float | None) -> str:
    return "-" if x is None else f"{x:.4f}"


def _change(split: dict) -> str:
    if split.get("reference_value") is None:
        return "-"
    interval = split.get("change_interval")
    return f"{split['value'] - split['reference_value']:+.4f}" + \
        (f" [{interval[0]:+.4f}, {interval[1]:+.4f}]" if interval else "")


CSS = """
body{font-family:-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;margin:2em auto;max-width:1500px;
 padding:0 1em;color:#222;line-height:1.4}
h1{font-size:1.6em;margin-bottom:.1em}h2{font-size:1.25em;margin-top:1.6em;border-bottom:1px solid #ddd}
.sub{color:#666;margin-top:0}
table{border-collapse:collapse;font-size:12px;margin:.5em 0}
th,td{border:1px solid #ddd;padding:3px 6px;text-align:left;vertical-align:top}
th{background:#f4f4f4;position:sticky;top:0}
td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
td.checks{white-space:nowrap;font-variant-numeric:tabular-nums}td.note{min-width:13em;font-size:11px}
tr.dense td{color:#777}
.layers{overflow-x:auto}
.note{color:#555;font-size:12px;max-width:1100px}
figure{display:inline-block;margin:0 1.5em 1.5em 0;vertical-align:top}
figcaption{font-size:13px;color:#444;max-width:640px}
pre{background:#f7f7f7;padding:.6em;overflow-x:auto;font-size:12px}
pre.command{white-space:pre-wrap;word-break:break-all}
details summary{cursor:pointer;color:#1f77b4}
.kv td:first-child{color:#555;white-space:nowrap}
"""

NUMERIC = ' class="num"'
CELL_CLASS = {**{h: NUMERIC for h in ("predicted dloss", "measured dloss", "params", "FLOPs", "latency ms")},
              CHECKS_HEADER: ' class="checks"', "note": ' class="note"'}
DENSE = ' class="dense"'


def render_html(page: dict, plots: dict[str, str | None]) -> str:
    """The report as one HTML file with everything inline."""
    e = html.escape
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           '<meta name="viewport" content="width=device-width, initial-scale=1">',
           f"<title>{e(page['title'])}</title><style>{CSS}</style></head><body>",
           f"<h1>{e(page['title'])}</h1>", f"<p class=\"sub\">Written {e(page['written'])}.</p>",
           "<h2>Summary</h2>", '<table class="kv">']
    out += [f"<tr><td>{e(k)}</td><td>{e(v)}</td></tr>" for k, v in page["summary"]]
    out.append("</table>")
    if page["splits"]:
        out += [f"<h2>Metric ({e(page['metric'])}) on each split</h2>", "<table><tr><th>split</th><th>samples</th>"
                "<th>original</th><th>compressed</th><th>change</th></tr>"]
        out += [f"<tr><td>{e(s['split'])}</td><td class=\"num\">{s['samples']:,}</td>"
                f"<td class=\"num\">{_metric(s['reference_value'])}</td><td class=\"num\">{_metric(s['value'])}</td>"
                f"<td class=\"num\">{_change(s)}</td></tr>" for s in page["splits"]]
        out += ["</table>", f"<p class=\"note\">{e(CHANGE_NOTE)}</p>"]
    header = table_header(page["rows"])
    out += ["<h2>Per layer</h2>", '<div class="layers"><table>',
            "<tr>" + "".join(f"<th>{e(h)}</th>" for h in header) + "</tr>"]
    for row in page["rows"]:
        numeric = set(TECHNIQUES[row.technique].numeric_columns)
        cells = "".join(f"<td{NUMERIC if h in numeric else CELL_CLASS.get(h, '')}>{_cell_html(h, c)}</td>"
                        for h, c in zip(header, _table_cells(row, header)))
        out.append(f"<tr{'' if row.changed else DENSE}>{cells}</tr>")
    out += ["</table></div>", f'<p class="note">{e(table_note(page["rows"]))}</p>', "<h2>Plots</h2>"]
    for key, (title, caption) in plot_words(page["rows"]).items():
        if plots.get(key) is not None:
            out.append(f"<figure>{plots[key]}<figcaption>{e(caption)}</figcaption></figure>")
        else:
            out.append(f'<p class="note">{e(title.capitalize())}: {e(PLOT_MISSING[key])}.</p>')
    if page["curve"]["backoff"]:
        out += ["<h2>Back-off on the validation split</h2>"]
        if page["curve"]["select"]:
            out.append(f"<p>{e(_selection_words(page['curve']['select']))}</p>")
        out += ["<table><tr><th>kappa</th><th>reduction</th><th>predicted dloss</th><th>validation</th>"
                "<th>loss change (s.e.)</th><th></th></tr>"]
        out += [f"<tr><td class=\"num\">{e(_kappa(b))}</td><td class=\"num\">{b['achieved_reduction']:.1%}</td>"
                f"<td class=\"num\">{_dloss(b)}</td><td class=\"num\">{_metric(b.get('val'))}</td>"
                f"<td class=\"num\">{_loss_change(b)}</td><td>{e(_backoff_note(b))}</td></tr>"
                for b in page["curve"]["backoff"]]
        out.append("</table>")
    command = page["command"] or "(not recorded: Python API)"
    out += ["<h2>Run</h2>", "<p>Command:</p>", f'<pre class="command">{e(command)}</pre>',
            '<table class="kv"><tr><th>execution providers</th><th></th></tr>']
    out += [f"<tr><td>{e(k)}</td><td>{e(v)}</td></tr>" for k, v in page["providers"].items()]
    out += ["</table>", '<table class="kv"><tr><th>package</th><th>version</th></tr>']
    out += [f"<tr><td>{e(k)}</td><td>{e(v)}</td></tr>" for k, v in page["versions"].items()]
    out += ["</table>", "<h2>Plan</h2>",
            f"<details><summary>The plan as JSON ({len(page['plan_json']):,} characters)"
            f"{e(page['bases_note'])}</summary>", f"<pre>{e(page['plan_json'])}</pre></details>", "</body></html>", ""]
    return "\n".join(out)


def _cell_html(header: str, text: str) -> str:
    escaped = html.escape(text)
    return escaped.replace("; ", "<br>") if header == CHECKS_HEADER else escaped  # one check per line


# --- plots (matplotlib, as SVG text) --------------------------------------------------------------------

# A plan that mixes techniques: the keep plot in words that fit all of them.
MIXED_KEEP_PLOT = KeepPlot("what each layer keeps", "kept", "choice kept",
                           "What each layer keeps of what it had (grey: all of it; blue: kept; unchanged layers in "
                           "light grey).")
CURVE_TITLE = "metric vs size"
PLOT_MISSING = {
    "rank": "no compressible layers",
    "loss": "no single-layer measurements (only the joint modes measure them)",
    "curve": "no metric (run with data)",
}


def keep_words(rows: list[LayerRow]) -> KeepPlot:
    """The words of the keep plot: the plan's technique's (:attr:`Technique.keep_plot`)."""
    techniques = {row.technique for row in rows}
    return TECHNIQUES[techniques.pop()].keep_plot if len(techniques) == 1 else MIXED_KEEP_PLOT


def plot_words(rows: list[LayerRow]) -> dict[str, tuple[str, str]]:
    """Each plot's title and caption."""
    keep = keep_words(rows)
    return {
        "rank": (keep.title, keep.caption),
        "loss": ("predicted vs measured loss change",
                 "Predicted vs measured loss change of single-layer checks (symmetric log axes; dashed: y = x; "
                 f"ringed: the {keep.axis} the plan kept)."),
        "curve": (CURVE_TITLE, "Metric vs the plan's target removed (parameters unless the plan names another): "
                                    "the back-off attempts on the validation split, the result on the held-out "
                                    "split, and baselines where run."),
    }
# Applied over matplotlib's defaults, so a user's matplotlibrc changes neither the look nor the bytes of a report.
PLOT_STYLE = {
    "svg.fonttype": "none",  # text stays text: small and selectable, and no glyphs defined again in each plot
    "font.family": "sans-serif",
    "font.sans-serif": ["DejaVu Sans"],  # shipped with matplotlib, which measures text with it; CSS falls back
    "font.size": 9,
    "xtick.labelsize": 8,
    "ytick.labelsize": 8,
    "legend.fontsize": 8.5,
    "legend.frameon": False,
    "axes.edgecolor": "#bbb",
    "axes.grid": True,
    "axes.axisbelow": True,
    "grid.color": "#eee",
    "axes.formatter.useoffset": False,  # tick labels say the metric's value, not an offset from it
}
NO_METADATA = {"Creator": None, "Date": None, "Format": None, "Type": None}  # no date: same input, same bytes


def _style(key: str) -> contextlib.AbstractContextManager:
    """The plots' settings for the duration of one plot (the user's rcParams come back after it)."""
    # A fixed salt makes the ids of markers and clip paths reproducible; one per plot keeps them unique on a page.
    return matplotlib.style.context(["default", {**PLOT_STYLE, "svg.hashsalt": f"onnxlrf-{key}"}])


def _figure(width: float, height: float, margins: tuple[float, float, float, float]) -> tuple[Figure, Axes]:
    """A ``width`` x ``height`` figure (points) with one axes inside ``margins`` (left, right, top, bottom)."""
    figure = Figure(figsize=(width / 72, height / 72), dpi=72)  # 72 dpi: matplotlib's units are the SVG's
    FigureCanvasSVG(figure)
    left, right, top, bottom = margins
    axes = figure.add_axes((left / width, bottom / height, 1 - (left + right) / width, 1 - (top + bottom) / height))
    return figure, axes


class _Tooltips:
    """Tooltips (SVG ``<title>``) of single artists, put into the groups matplotlib draws them in."""

    def __init__(self, key: str) -> None:
        self.key = key
        self.text: dict[str, str] = {}

    def add(self, artist: Artist, text: str) -> None:
        gid = f"{self.key}-{len(self.text)}"
        artist.set_gid(gid)
        self.text[gid] = text

    def insert(self, svg: str) -> str:
        return re.sub(rf'<g id="({self.key}-\d+)">',
                      lambda m: f"{m[0]}<title>{html.escape(self.text[m[1]])}</title>", svg)


def _svg(figure: Figure, title: str, tips: _Tooltips) -> str:
    """``figure`` as SVG text, both for a file of its own and for inline HTML."""
    buffer = io.StringIO()
    figure.canvas.print_svg(buffer, metadata=NO_METADATA)
    svg = buffer.getvalue()
    svg = svg[svg.index("<svg"):]  # no XML declaration or DOCTYPE: HTML has no place for them
    # matplotlib numbers its groups per figure (figure_1, axes_1...): plots on one page would repeat the ids.
    svg = re.sub(r'<g id="[\w.]+_\d+">', "<g>", svg)
    svg = svg.replace("<svg ", f'<svg role="img" aria-label="{html.escape(title)}" ', 1)
    return tips.insert(svg)


def _short(name: str, limit: int = 34) -> str:
    return name if len(name) <= limit else "\u2026" + name[-(limit - 1):]


def keep_plot(rows: list[LayerRow]) -> str | None:
    """Horizontal bars per layer: what it had (grey) and what it keeps (blue); unchanged layers light grey.

    Low-rank: the maximum rank and the rank kept. The words come from the plan's technique.
    """
    if not rows:
        return None
    words = keep_words(rows)
    row_height, top, bottom = 13, 30, 6
    with _style("rank"):
        figure, axes = _figure(540, top + row_height * len(rows) + bottom, (170, 56, top, bottom))
        tips = _Tooltips("rank")
        tip = [f"{row.node}: {row.view.label}" for row in rows]
        full = axes.barh(range(len(rows)), [row.view.full for row in rows], height=0.75,
                         color=["#ccc" if row.changed else "#e6e6e6" for row in rows],
                         edgecolor=["none" if row.changed else "#bbb" for row in rows], linewidth=0.5)
        changed = [i for i, row in enumerate(rows) if row.changed]
        kept = axes.barh(changed, [rows[i].view.kept for i in changed], height=0.75, color=BLUE)
        for i, bar in [*enumerate(full), *zip(changed, kept)]:
            tips.add(bar, tip[i])
        labels = axes.bar_label(full, [row.view.label for row in rows], padding=4, fontsize=8)
        for label, row in zip(labels, rows):
            if not row.changed:
                label.set_color("#888")
        axes.set_yticks(range(len(rows)), [_short(row.node) for row in rows])
        axes.set_ylim(len(rows) - 0.5, -0.5)  # the first layer on top
        axes.set_xlim(0, max(row.view.full for row in rows))
        axes.xaxis.set_major_locator(MaxNLocator(6, steps=[1, 2, 5, 10], integer=True))
        axes.xaxis.tick_top()
        axes.xaxis.set_label_position("top")
        axes.set_xlabel(words.axis, loc="left", fontweight="bold")
        axes.grid(axis="y", visible=False)
        axes.tick_params(left=False, top=False)
        for spine in axes.spines.values():
            spine.set_visible(False)
        return _svg(figure, words.title, tips)


def loss_plot(rows: list[LayerRow]) -> str | None:
    """Scatter of single-layer truncations: predicted vs measured loss change, y = x for reference."""
    points = [(row, c) for row in rows for c in row.checks
              if math.isfinite(c.get("predicted", math.nan)) and math.isfinite(c.get("measured", math.nan))]
    if not points:
        return None
    values = [abs(c[k]) for _, c in points for k in ("predicted", "measured") if c[k] != 0]
    # Linear within +-threshold: the smallest change's decade, at most 4 decades below the largest change.
    threshold = 10 ** math.floor(math.log10(max(min(values), 1e-6))) if values else 1e-3
    threshold = max(threshold, max(values, default=1.0) * 1e-4)
    high = max(max(values, default=1.0) * 1.5, 10 * threshold)
    low = -high if any(c[k] < 0 for _, c in points for k in ("predicted", "measured")) else 0.0
    # 0 and the decades from twice the threshold up (labels nearer 0 would overlap its label).
    decades = [10.0 ** k for k in range(math.ceil(math.log10(2 * threshold)), math.ceil(math.log10(high)) + 1)]
    ticks = sorted([0.0, *decades, *(-d for d in decades if low < 0)])
    size = 300
    with _style("loss"):
        figure, axes = _figure(62 + size + 96, 12 + size + 44, (62, 96, 12, 44))
        tips = _Tooltips("loss")
        # Linear within +-threshold, log beyond; 0.3 decades wide up to the threshold, like log10(1 + |v| / t).
        axes.set_xscale("symlog", linthresh=threshold, linscale=0.3)
        axes.set_yscale("symlog", linthresh=threshold, linscale=0.3)
        for axis in (axes.xaxis, axes.yaxis):
            axis.set_major_locator(FixedLocator(ticks))
            axis.set_minor_locator(NullLocator())
            axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        axes.set_xlim(low, high)
        axes.set_ylim(low, high)
        # y = x: straight, as both axes have the same scale and limits.
        axes.plot([low, high], [low, high], color=GREY, linewidth=0.8, dashes=(4, 3))
        words = keep_words(rows)
        for row, c in points:
            technique = TECHNIQUES[row.technique]
            kept = row.changed and technique.check_key(c) == row.view.check_key
            point, = axes.plot(c["predicted"], c["measured"], "o", markersize=6, clip_on=False,
                               markerfacecolor=to_rgba(BLUE if c.get("agree") else RED, 0.8),
                               markeredgecolor="black" if kept else "white", markeredgewidth=1.2 if kept else 0.4)
            tips.add(point, f"{row.node} {words.axis} {technique.check_key(c)}: predicted {c['predicted']:+.4f}, "
                          f"measured {c['measured']:+.4f}{'' if c.get('agree') else ' (disagree)'}")
        dot = {"linestyle": "", "marker": "o", "markersize": 6}
        legend = [Line2D([], [], color=BLUE, label="agree", **dot), Line2D([], [], color=RED, label="disagree", **dot),
                  Line2D([], [], markerfacecolor="white", markeredgecolor="black", markeredgewidth=1.2,
                         label=words.kept, **dot)]
        axes.legend(handles=legend, loc="upper left", bbox_to_anchor=(1.03, 1), borderaxespad=0)
        axes.set_xlabel("predicted loss change")
        axes.set_ylabel("measured loss change")
        return _svg(figure, plot_words(rows)["loss"][0], tips)


def curve_plot(curve: dict, metric: str, baselines: list[dict]) -> str | None:
    """Metric vs fraction of parameters removed: original, back-off attempts (validation), result, baselines."""
    final = curve.get("final")
    # Attempts rejected before validation (not faster) and repeats of an earlier plan have no point of their own.
    backoff = [b for b in curve.get("backoff") or [] if "val" in b and "same_as_kappa" not in b]
    if final is None and not backoff and not baselines:
        return None
    xs = [0.0, curve["reduction"]] + [b["achieved_reduction"] for b in backoff] + [b["reduction"] for b in baselines]
    ys = [b["val"] for b in backoff] + [b["value"] for b in baselines]
    for value in (curve.get("val_reference"), final and final.get("value"), final and final.get("reference_value")):
        if value is not None:
            ys.append(value)
    pad = max((max(ys) - min(ys)) * 0.08, 0.002)
    with _style("curve"):
        figure, axes = _figure(560, 300, (56, 190, 12, 44))
        tips = _Tooltips("curve")
        axes.set_xlim(0, max(xs) * 1.05 or 0.1)
        axes.set_ylim(min(ys) - pad, max(ys) + pad)
        axes.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v * 100:g}%"))
        legend: list[Artist] = []
        if final is not None and final.get("reference_value") is not None:
            legend.append(axes.axhline(final["reference_value"], color=GREY, linewidth=1, dashes=(5, 3),
                                       label=f"original, {final['split']}"))
        if curve.get("val_reference") is not None:
            legend.append(axes.axhline(curve["val_reference"], color=GREY, linewidth=1, dashes=(1, 3),
                                       label="original, validation"))
        attempt = {"linestyle": "", "marker": "o", "markersize": 7, "markeredgecolor": BLUE, "markeredgewidth": 1.2}
        for b in backoff:  # points unclipped: one at 0% removed is whole, not cut in half by the axes
            dot, = axes.plot(b["achieved_reduction"], b["val"], markerfacecolor=BLUE if b.get("chosen") else "white",
                             clip_on=False, **attempt)
            tips.add(dot, f"{_attempt_name(b)}: {b['achieved_reduction']:.1%} fewer, validation {b['val']:.4f}")
        if backoff:
            legend.append(Line2D([], [], markerfacecolor="white", label="back-off attempt, validation", **attempt))
        methods: dict[str, list[dict]] = {}
        for b in baselines:
            methods.setdefault(str(b["method"]), []).append(b)
        for i, (method, points) in enumerate(methods.items()):
            colour = BASELINE_COLOURS[i % len(BASELINE_COLOURS)]
            points = sorted(points, key=lambda p: p["reduction"])
            axes.plot([p["reduction"] for p in points], [p["value"] for p in points], color=colour, linewidth=1.2)
            for p in points:
                square, = axes.plot(p["reduction"], p["value"], "s", markersize=5, color=colour, clip_on=False)
                tips.add(square, f"{method}: {p['reduction']:.1%} fewer, {p['value']:.4f}")
            legend.append(Line2D([], [], color=colour, linewidth=1.2, marker="s", markersize=5, label=method))
        if final is not None:
            result = {"linestyle": "", "marker": "*", "color": RED, "markeredgecolor": "#600",
                      "markeredgewidth": 0.6}
            star, = axes.plot(curve["reduction"], final["value"], markersize=13, zorder=3, clip_on=False, **result)
            tips.add(star, f"result: {curve['reduction']:.1%} fewer, {final['value']:.4f} ({final['split']})")
            legend.append(Line2D([], [], markersize=11, label=f"result, {final['split']}", **result))
        _label_attempts(axes, backoff)
        axes.legend(handles=legend, loc="upper left", bbox_to_anchor=(1.03, 1), borderaxespad=0)
        axes.set_xlabel(curve.get("axis", "parameters removed"))
        axes.set_ylabel(metric)
        return _svg(figure, CURVE_TITLE, tips)


def _kappa(attempt: dict) -> str:
    """A back-off attempt's kappa, or the baseline it verified."""
    return f"{attempt['kappa']:.4g}" if attempt.get("kappa") is not None else attempt.get("baseline", "-")


def _dloss(attempt: dict) -> str:
    return f"{attempt['predicted_dloss']:+.3g}" if attempt.get("predicted_dloss") is not None else "-"


def _loss_change(attempt: dict) -> str:
    """The attempt's mean per-sample validation loss change against the original, with its standard error."""
    if attempt.get("loss_change") is None:
        return "-"
    return f"{attempt['loss_change']:+.4f} ({attempt['loss_se']:.4f})"


def _selection_words(select: str) -> str:
    """How lossless mode chose among the plans below (``--select``)."""
    return {"loss": "Lossless chose the plan of lowest mean validation loss (`--select`).",
            "metric": "Lossless chose the plan of highest validation metric (`--select`)."}[select]


def _attempt_name(attempt: dict) -> str:
    return f"kappa {_kappa(attempt)}" if attempt.get("kappa") is not None else _kappa(attempt)


def _label_attempts(axes: Axes, backoff: list[dict]) -> None:
    """Label each back-off attempt with its kappa beside its point, where the label overlaps no other label."""
    placed: list[Bbox] = []
    # The chosen attempt is labelled first, so it keeps its label when attempts crowd together.
    for b in sorted(backoff, key=lambda b: not b.get("chosen")):
        label = (f"\u03ba{b['kappa']:.3g}" if b.get("kappa") is not None else "uniform") + \
            ("+r" if b.get("restored") else "+refit" if b.get("refit") else "")
        for offset, ha, va in (((5, 3), "left", "bottom"), ((5, -3), "left", "top"), ((-5, 3), "right", "bottom")):
            text = axes.annotate(label, (b["achieved_reduction"], b["val"]), xytext=offset, textcoords="offset points",
                                 ha=ha, va=va, fontsize=7.5, color=BLUE)
            box = text.get_window_extent()
            if not any(box.overlaps(other) for other in placed):
                placed.append(box)
                break
            text.remove()
