"""Markdown and self-contained HTML reports of a compression run.

:func:`write_report` puts into one directory: ``report.md``, ``report.html``
(everything inline: styles, SVG plots, the plan; no external resources),
the plots as ``*.svg`` for the Markdown file, and ``plan.json``.

Contents: a summary (sizes, FLOPs, metrics on each split), a per-layer table
(weight shape, maximum and kept rank, decomposition, basis, predicted and
measured loss change, parameters, FLOPs and latency, dense and planned),
three plots (rank kept per layer; predicted vs measured single-layer loss
change; metric vs size with the back-off attempts and any baselines), the
back-off steps, the execution providers, package versions, the exact command
and the plan.

The plots are drawn here as plain SVG, so reports need no plotting library.
"""

from __future__ import annotations

import datetime
import html
import math
import os
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import onnx

from .errors import OnnxlrfError
from .inspection import format_si
from .onnx_io import load_onnx, staged_outputs

MARKDOWN, HTML, PLAN = "report.md", "report.html", "plan.json"
PLOTS = {"rank": "rank.svg", "loss": "loss.svg", "curve": "curve.svg"}
REPORT_FILES = (MARKDOWN, HTML, PLAN, *PLOTS.values())
# Colours (tab10) shared by the plots and the page.
BLUE, ORANGE, GREEN, RED, PURPLE, BROWN, PINK, GREY, OLIVE, CYAN = (
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")
BASELINE_COLOURS = (ORANGE, GREEN, PURPLE, BROWN, PINK, OLIVE, CYAN)


@dataclass
class LayerRow:
    """One factorizable layer as the report shows it (None: not known)."""

    node: str
    op_type: str
    weight_shape: list[int]
    max_rank: int
    rank: int | None  # None: dense
    decomposition: str
    basis: str
    params_dense: int
    params_planned: int
    predicted_dloss: float | None = None
    measured_dloss: float | None = None  # single-layer measurement at exactly this rank
    checks: list[dict] = field(default_factory=list)  # single-layer truncations measured by the analysis
    flops_dense: int | None = None
    flops_planned: int | None = None
    latency_ms_dense: float | None = None
    latency_ms_planned: float | None = None
    reason: str = ""  # why the layer stayed dense


def check_report_dir(directory: str | os.PathLike, overwrite: bool = False) -> Path:
    """Refuse a report directory that already holds report files (unless ``overwrite``) or is a file.

    Called before the work starts, so a run does not end with nowhere to write.
    """
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise OnnxlrfError(f"report directory is a file: {directory}")
    if not overwrite:
        for name in REPORT_FILES:
            if (directory / name).exists():
                raise OnnxlrfError(f"report exists: {directory / name} (pass --overwrite to replace it)")
    return directory


def write_report(
    result: Any,
    directory: str | os.PathLike,
    command: str | None = None,
    baselines: list[dict] | None = None,
    overwrite: bool = False,
) -> tuple[Path, Path]:
    """Write the report of ``result`` (a :class:`~onnxlrf.pipeline.CompressResult`) into ``directory``.

    ``command``: the command line that produced it (shown as it is). ``baselines``:
    other methods' results for the metric-vs-size plot, each ``{"method", "reduction", "value"}``
    (``value`` on the same split as the result's final metric). The directory is created;
    existing report files are replaced only with ``overwrite``; all files are
    written together or not at all. Returns the Markdown and HTML paths.
    """
    directory = check_report_dir(directory, overwrite)
    baselines = _check_baselines(baselines or [])
    page = _collect(result, command, baselines)
    plots = {"rank": rank_plot(page["rows"]), "loss": loss_plot(page["rows"]),
             "curve": curve_plot(page["curve"], page["metric"], baselines)}
    created = not directory.exists()
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OnnxlrfError(f"cannot create report directory {directory}: {exc.strerror}") from None
    try:
        with staged_outputs(overwrite) as stage:
            for key, svg in plots.items():
                if svg is not None:
                    stage.path(directory / PLOTS[key]).write_text(svg, encoding="utf-8")
            stage.path(directory / PLAN).write_text(result.plan.to_json() + "\n", encoding="utf-8")
            stage.path(directory / MARKDOWN).write_text(render_markdown(page, plots), encoding="utf-8")
            stage.path(directory / HTML).write_text(render_html(page, plots), encoding="utf-8")
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
        row = LayerRow(
            node=entry.node, op_type=entry.op_type, weight_shape=list(entry.weight_shape), max_rank=entry.max_rank,
            rank=done["rank"] if done else None, decomposition=done["decomposition"] if done else "dense",
            basis=entry.basis if done else "-", params_dense=entry.params_dense,
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
        measured = [c["measured"] for c in row.checks if c.get("rank") == row.rank]
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
            # Conv/Gemm/MatMul nodes only, as count_flops counts (not e.g. an Add for a bias correction).
            parts = [compressed[name] for name in new_nodes[entry.node] if name in compressed]
            planned = None if None in parts or not parts else sum(parts)
            out[entry.node] = (original.get(entry.node), planned)
        else:
            out[entry.node] = (compressed.get(entry.node), compressed.get(entry.node))
    return out


def _model_flops(result: Any) -> tuple[int | None, int | None, str]:
    """Whole-model Conv/Gemm/MatMul FLOPs (original, compressed) and the input shapes they are for."""
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
    curve = {"reduction": result.params_reduction, "final": final,
             "val_reference": plan.options.get("reference_val"),
             "backoff": list(plan.options.get("backoff") or [])}
    summary = [
        ("model", str(plan.source.get("model", "-"))),
        ("mode", plan.mode),
        ("output", str(result.output)),
        ("parameters", f"{result.reference_params:,} -> {result.params:,} ({result.params_reduction:.1%} fewer)"),
        ("layers", f"{len(result.rewrite.rewritten)} factorized, {len(result.rewrite.kept_dense)} dense"),
    ]
    if flops_compressed is not None:
        before = _flops(flops_original) if flops_original is not None else "-"
        ratio = f" ({1 - flops_compressed / flops_original:.1%} fewer)" if flops_original else ""
        summary.append(("FLOPs (Conv/Gemm/MatMul)", f"{before} -> {_flops(flops_compressed)}{ratio}, "
                                                     f"inputs {flops_inputs}"))
    options = {k: v for k, v in plan.options.items() if k not in ("backoff", "bases_file")}
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
    """Single-layer truncations: ``r<rank> <predicted>/<measured>``, ``!`` where they disagreed."""
    return "; ".join(f"r{c['rank']} {c['predicted']:+.3f}/{c['measured']:+.3f}{'' if c.get('agree') else ' !'}"
                     for c in row.checks) or "-"


CHECKS_HEADER = "single-layer checks (pred/meas)"
TABLE_HEADER = ("node", "op", "weight shape", "max rank", "rank", "decomposition", "basis", "predicted dloss",
                "measured dloss", CHECKS_HEADER, "params", "FLOPs", "latency ms", "note")


def _table_cells(row: LayerRow) -> list[str]:
    return [row.node, row.op_type, "x".join(map(str, row.weight_shape)), str(row.max_rank),
            str(row.rank) if row.rank is not None else "dense", row.decomposition, row.basis,
            _signed(row.predicted_dloss), _signed(row.measured_dloss), _checks(row),
            _pair(row.params_dense, row.params_planned, lambda n: f"{n:,}"),
            _pair(row.flops_dense, row.flops_planned, _flops),
            _pair(row.latency_ms_dense, row.latency_ms_planned, _ms), row.reason]


CHANGE_NOTE = ("change: compressed minus original; in brackets its 95% paired-bootstrap interval over the "
               "split's samples (validation.change_interval), where both models ran on them here. An interval "
               "that contains 0 means this split cannot tell the two models apart.")
TABLE_NOTE = ("rank: kept components (dense: not factorized). predicted dloss: the planner's predicted change "
              "of the calibration loss from this layer's truncation alone, at the plan's kappa. measured dloss: "
              "the loss change measured with only this layer truncated, where the analysis measured this exact "
              "rank. single-layer checks: the analysis's truncations of this layer alone, predicted (kappa 1, "
              "fitted curvature scale) / measured loss change; ! where they disagree (beyond that the layer is "
              "not truncated). params, FLOPs, latency: dense -> planned; FLOPs per run at the input shapes in "
              "the summary; latency only where the plan carries per-layer measurements.")


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
    md += ["", "## Per layer", "", "| " + " | ".join(TABLE_HEADER) + " |", "|" + "---|" * len(TABLE_HEADER)]
    md += ["| " + " | ".join(_md(c) for c in _table_cells(row)) + " |" for row in page["rows"]]
    md += ["", TABLE_NOTE, "", "## Plots", ""]
    for key, caption in PLOT_CAPTIONS.items():
        if plots.get(key) is not None:
            md += [f"![{PLOT_TITLES[key]}]({PLOTS[key]})", "", f"*{caption}*", ""]
        else:
            md += [f"*{PLOT_TITLES[key].capitalize()}: {PLOT_MISSING[key]}.*", ""]
    if page["curve"]["backoff"]:
        md += ["## Back-off on the validation split", "", "| kappa | reduction | predicted dloss | validation | |",
               "|---|---|---|---|---|"]
        md += [f"| {b['kappa']:.4g} | {b['achieved_reduction']:.1%} | {b['predicted_dloss']:+.3g} | "
               f"{_metric(b.get('val'))} | {_backoff_note(b)} |"
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

CELL_CLASS = {**{h: ' class="num"' for h in ("max rank", "rank", "predicted dloss", "measured dloss", "params",
                                              "FLOPs", "latency ms")},
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
    out += ["<h2>Per layer</h2>", '<div class="layers"><table>',
            "<tr>" + "".join(f"<th>{e(h)}</th>" for h in TABLE_HEADER) + "</tr>"]
    for row in page["rows"]:
        cells = "".join(f"<td{CELL_CLASS.get(h, '')}>{_cell_html(h, c)}</td>"
                        for h, c in zip(TABLE_HEADER, _table_cells(row)))
        out.append(f"<tr{DENSE if row.rank is None else ''}>{cells}</tr>")
    out += ["</table></div>", f'<p class="note">{e(TABLE_NOTE)}</p>', "<h2>Plots</h2>"]
    for key, caption in PLOT_CAPTIONS.items():
        if plots.get(key) is not None:
            out.append(f"<figure>{plots[key]}<figcaption>{e(caption)}</figcaption></figure>")
        else:
            out.append(f'<p class="note">{e(PLOT_TITLES[key].capitalize())}: {e(PLOT_MISSING[key])}.</p>')
    if page["curve"]["backoff"]:
        out += ["<h2>Back-off on the validation split</h2>", "<table><tr><th>kappa</th><th>reduction</th>"
                "<th>predicted dloss</th><th>validation</th><th></th></tr>"]
        out += [f"<tr><td class=\"num\">{b['kappa']:.4g}</td><td class=\"num\">{b['achieved_reduction']:.1%}</td>"
                f"<td class=\"num\">{b['predicted_dloss']:+.3g}</td><td class=\"num\">{_metric(b.get('val'))}</td>"
                f"<td>{e(_backoff_note(b))}</td></tr>"
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


# --- plots (plain SVG) -----------------------------------------------------------------------------------

PLOT_TITLES = {"rank": "rank kept per layer", "loss": "predicted vs measured loss change",
               "curve": "metric vs size"}
PLOT_CAPTIONS = {
    "rank": "Rank kept per layer (grey: maximum rank; blue: kept; dense layers in light grey).",
    "loss": "Predicted vs measured loss change of single-layer truncations (symmetric log axes; dashed: y = x; "
            "ringed: the rank the plan kept).",
    "curve": "Metric vs parameters removed: the back-off attempts on the validation split, the result on the "
             "held-out split, and baselines where run.",
}
PLOT_MISSING = {
    "rank": "no factorizable layers",
    "loss": "no single-layer measurements (only the joint modes measure them)",
    "curve": "no metric (run with data)",
}


def _svg(width: float, height: float, body: Iterable[str], label: str) -> str:
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{height:.0f}" '
            f'viewBox="0 0 {width:.0f} {height:.0f}" font-family="Helvetica,Arial,sans-serif" font-size="11" '
            f'role="img" aria-label="{html.escape(label)}">'
            f'<rect width="100%" height="100%" fill="white"/>' + "".join(body) + "</svg>")


def _text(x: float, y: float, text: str, anchor: str = "start", size: int = 11, colour: str = "#222",
          rotate: float | None = None, weight: str = "normal") -> str:
    transform = f' transform="rotate({rotate:g} {x:.1f} {y:.1f})"' if rotate is not None else ""
    return (f'<text x="{x:.1f}" y="{y:.1f}" text-anchor="{anchor}" font-size="{size}" fill="{colour}" '
            f'font-weight="{weight}"{transform}>{html.escape(text)}</text>')


def _line(x1: float, y1: float, x2: float, y2: float, colour: str = "#999", width: float = 1,
          dash: str | None = None) -> str:
    dashes = f' stroke-dasharray="{dash}"' if dash else ""
    return (f'<line x1="{x1:.1f}" y1="{y1:.1f}" x2="{x2:.1f}" y2="{y2:.1f}" stroke="{colour}" '
            f'stroke-width="{width}"{dashes}/>')


def _nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """Round tick values covering [lo, hi]."""
    if hi <= lo:
        hi = lo + 1.0
    raw = (hi - lo) / count
    step = 10 ** math.floor(math.log10(raw))
    for factor in (1, 2, 2.5, 5, 10):
        if raw <= step * factor:
            step *= factor
            break
    first, last = math.floor(lo / step + 1e-9), math.ceil(hi / step - 1e-9)
    return [round(k * step, 12) for k in range(first, last + 1)]


def _short(name: str, limit: int = 34) -> str:
    return name if len(name) <= limit else "\u2026" + name[-(limit - 1):]


def rank_plot(rows: list[LayerRow]) -> str | None:
    """Horizontal bars per layer: maximum rank (grey) and the rank kept (blue); dense layers light grey."""
    if not rows:
        return None
    row_h, left, right, top, bottom, plot_w = 15, 230, 70, 34, 22, 420
    height = top + row_h * len(rows) + bottom
    scale = plot_w / max(r.max_rank for r in rows)
    body = [_text(left, 14, "rank", "start", 12, weight="bold")]
    for tick in _nice_ticks(0, max(r.max_rank for r in rows), 6):
        x = left + tick * scale
        if x <= left + plot_w + 1:
            body += [_line(x, top - 4, x, height - bottom, "#eee"), _text(x, top - 8, f"{tick:g}", "middle", 10)]
    for i, row in enumerate(rows):
        y = top + i * row_h
        full = row.max_rank * scale
        body.append(_text(left - 6, y + row_h - 4, _short(row.node), "end", 10))
        tip = f"{row.node}: {'dense' if row.rank is None else f'rank {row.rank}'} of {row.max_rank}"
        body.append(f'<g><title>{html.escape(tip)}</title>'
                    f'<rect x="{left}" y="{y + 2}" width="{full:.1f}" height="{row_h - 4}" fill="#ccc"/>')
        if row.rank is None:
            body.append(f'<rect x="{left}" y="{y + 2}" width="{full:.1f}" height="{row_h - 4}" fill="#e6e6e6" '
                        f'stroke="#bbb" stroke-width="0.5"/></g>')
            body.append(_text(left + full + 4, y + row_h - 4, "dense", "start", 10, "#888"))
        else:
            body.append(f'<rect x="{left}" y="{y + 2}" width="{row.rank * scale:.1f}" height="{row_h - 4}" '
                        f'fill="{BLUE}"/></g>')
            body.append(_text(left + full + 4, y + row_h - 4, f"{row.rank}/{row.max_rank}", "start", 10))
    return _svg(left + plot_w + right, height, body, PLOT_TITLES["rank"])


def _symlog(v: float, threshold: float) -> float:
    return math.copysign(math.log10(1 + abs(v) / threshold), v)


def loss_plot(rows: list[LayerRow]) -> str | None:
    """Scatter of single-layer truncations: predicted vs measured loss change, y = x for reference."""
    points = [(row, c) for row in rows for c in row.checks
              if math.isfinite(c.get("predicted", math.nan)) and math.isfinite(c.get("measured", math.nan))]
    if not points:
        return None
    size, left, top, bottom, right = 380, 70, 20, 50, 150
    values = [abs(c[k]) for _, c in points for k in ("predicted", "measured") if c[k] != 0]
    threshold = 10 ** math.floor(math.log10(max(min(values), 1e-6))) if values else 1e-3
    threshold = max(threshold, max(values, default=1.0) * 1e-4)
    extent = max(_symlog(max(values, default=1.0), threshold), 1.0) * 1.05
    lo = -extent if any(c[k] < 0 for _, c in points for k in ("predicted", "measured")) else 0.0

    def px(v: float) -> float:
        return left + (_symlog(v, threshold) - lo) / (extent - lo) * size

    def py(v: float) -> float:
        return top + size - (_symlog(v, threshold) - lo) / (extent - lo) * size

    body = [f'<rect x="{left}" y="{top}" width="{size}" height="{size}" fill="none" stroke="#bbb"/>']
    exponent = math.floor(math.log10(threshold))
    ticks = [0.0] + [s * 10.0 ** k for k in range(exponent, exponent + 8) for s in (1, -1)]
    for tick in ticks:
        position = _symlog(tick, threshold)
        if not lo <= position <= extent or (tick != 0 and abs(px(tick) - px(0.0)) < 24):  # labels would overlap 0
            continue
        label = f"{tick:g}"
        x, y = px(tick), py(tick)
        body += [_line(x, top, x, top + size, "#eee"), _line(left, y, left + size, y, "#eee"),
                 _text(x, top + size + 14, label, "middle", 9), _text(left - 4, y + 3, label, "end", 9)]
    body.append(_line(px(_inv_symlog(lo, threshold)), py(_inv_symlog(lo, threshold)),
                      px(_inv_symlog(extent, threshold)), py(_inv_symlog(extent, threshold)), GREY, 1, "4 3"))
    for row, c in points:
        colour = BLUE if c.get("agree") else RED
        kept = c.get("rank") == row.rank
        ring = ' stroke="#000" stroke-width="1.6"' if kept else ' stroke="white" stroke-width="0.5"'
        tip = (f"{row.node} rank {c['rank']}: predicted {c['predicted']:+.4f}, measured {c['measured']:+.4f}"
               f"{'' if c.get('agree') else ' (disagree)'}")
        body.append(f'<circle cx="{px(c["predicted"]):.1f}" cy="{py(c["measured"]):.1f}" r="3.5" fill="{colour}" '
                    f'fill-opacity="0.8"{ring}><title>{html.escape(tip)}</title></circle>')
    body += [_text(left + size / 2, top + size + 34, "predicted loss change", "middle", 11),
             _text(18, top + size / 2, "measured loss change", "middle", 11, rotate=-90)]
    legend = [(BLUE, "agree", ""), (RED, "disagree", ""), ("white", "rank kept", "#000")]
    for i, (colour, label, stroke) in enumerate(legend):
        y = top + 12 + 18 * i
        outline = f' stroke="{stroke}" stroke-width="1.6"' if stroke else ""
        body += [f'<circle cx="{left + size + 18}" cy="{y}" r="4" fill="{colour}"{outline}/>',
                 _text(left + size + 28, y + 4, label, "start", 11)]
    return _svg(left + size + right, top + size + bottom, body, PLOT_TITLES["loss"])


def _inv_symlog(y: float, threshold: float) -> float:
    return math.copysign((10 ** abs(y) - 1) * threshold, y)


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
    width, height, left, top, right, bottom = 430, 300, 60, 20, 210, 46
    x_ticks = _nice_ticks(0.0, max(xs) * 1.05 or 0.1, 5)
    y_lo, y_hi = min(ys), max(ys)
    pad = max((y_hi - y_lo) * 0.08, 0.002)
    y_ticks = _nice_ticks(y_lo - pad, y_hi + pad, 5)
    x0, x1, y0, y1 = x_ticks[0], x_ticks[-1], y_ticks[0], y_ticks[-1]

    def px(v: float) -> float:
        return left + (v - x0) / (x1 - x0) * width

    def py(v: float) -> float:
        return top + height - (v - y0) / (y1 - y0) * height

    body = [f'<rect x="{left}" y="{top}" width="{width}" height="{height}" fill="none" stroke="#bbb"/>']
    for t in x_ticks:
        body += [_line(px(t), top, px(t), top + height, "#eee"),
                 _text(px(t), top + height + 14, f"{t:.0%}", "middle", 9)]
    for t in y_ticks:
        body += [_line(left, py(t), left + width, py(t), "#eee"), _text(left - 4, py(t) + 3, f"{t:.4g}", "end", 9)]
    legend: list[tuple[str, str]] = []
    if final is not None and final.get("reference_value") is not None:
        body.append(_line(left, py(final["reference_value"]), left + width, py(final["reference_value"]), GREY, 1.2,
                          "5 3"))
        legend.append((f'<line x1="0" y1="0" x2="14" y2="0" stroke="{GREY}" stroke-width="1.2" '
                       'stroke-dasharray="5 3"/>',
                       f"original, {final['split']}"))
    if curve.get("val_reference") is not None:
        body.append(_line(left, py(curve["val_reference"]), left + width, py(curve["val_reference"]), GREY, 1,
                          "1 3"))
        legend.append((f'<line x1="0" y1="0" x2="14" y2="0" stroke="{GREY}" stroke-dasharray="1 3"/>',
                       "original, validation"))
    placed: list[tuple[float, float, float, float]] = []  # label boxes, so labels do not overlap
    # The chosen attempt is labelled first, so it keeps its label when attempts crowd together.
    for b in sorted(backoff, key=lambda b: not b.get("chosen")):
        chosen = b.get("chosen", False)
        tip = f"kappa {b['kappa']:.4g}: {b['achieved_reduction']:.1%} fewer, validation {b['val']:.4f}"
        body.append(f'<circle cx="{px(b["achieved_reduction"]):.1f}" cy="{py(b["val"]):.1f}" r="4" '
                    f'fill="{BLUE if chosen else "white"}" stroke="{BLUE}" stroke-width="1.5">'
                    f'<title>{html.escape(tip)}</title></circle>')
        label = f"\u03ba{b['kappa']:.3g}" + ("+r" if b.get("restored") else "+refit" if b.get("refit") else "")
        x, y = px(b["achieved_reduction"]), py(b["val"])
        for lx, ly in ((x + 6, y - 5), (x + 6, y + 12), (x - 6 - 5.5 * len(label), y - 5)):
            box = (lx, ly - 9, lx + 5.5 * len(label), ly + 1)
            if not any(box[0] < o[2] and o[0] < box[2] and box[1] < o[3] and o[1] < box[3] for o in placed):
                placed.append(box)
                body.append(_text(lx, ly, label, "start", 9, BLUE))
                break
    if backoff:
        legend.append((f'<circle cx="7" cy="0" r="4" fill="white" stroke="{BLUE}" stroke-width="1.5"/>',
                       "back-off attempt, validation"))
    methods: dict[str, list[dict]] = {}
    for b in baselines:
        methods.setdefault(str(b["method"]), []).append(b)
    for i, (method, points) in enumerate(methods.items()):
        colour = BASELINE_COLOURS[i % len(BASELINE_COLOURS)]
        points = sorted(points, key=lambda p: p["reduction"])
        path = " ".join(f"{px(p['reduction']):.1f},{py(p['value']):.1f}" for p in points)
        body.append(f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="1.5"/>')
        for p in points:
            tip = html.escape(f"{method}: {p['reduction']:.1%} fewer, {p['value']:.4f}")
            body.append(f'<rect x="{px(p["reduction"]) - 3:.1f}" y="{py(p["value"]) - 3:.1f}" width="6" height="6" '
                        f'fill="{colour}"><title>{tip}</title></rect>')
        legend.append((f'<rect x="4" y="-3" width="6" height="6" fill="{colour}"/>', method))
    if final is not None:
        x, y = px(curve["reduction"]), py(final["value"])
        tip = html.escape(f"result: {curve['reduction']:.1%} fewer, {final['value']:.4f} ({final['split']})")
        body.append(f'<polygon points="{_star(x, y, 7)}" fill="{RED}" stroke="#600" stroke-width="0.6">'
                    f'<title>{tip}</title></polygon>')
        legend.append((f'<polygon points="{_star(7, 0, 6)}" fill="{RED}"/>', f"result, {final['split']}"))
    for i, (symbol, label) in enumerate(legend):
        y = top + 10 + 18 * i
        body += [f'<g transform="translate({left + width + 12},{y})">{symbol}</g>',
                 _text(left + width + 32, y + 4, label, "start", 11)]
    body += [_text(left + width / 2, top + height + 34, "parameters removed", "middle", 11),
             _text(16, top + height / 2, metric, "middle", 11, rotate=-90)]
    return _svg(left + width + right, top + height + bottom, body, PLOT_TITLES["curve"])


def _star(x: float, y: float, r: float) -> str:
    points = []
    for k in range(10):
        radius = r if k % 2 == 0 else r * 0.45
        angle = math.pi / 2 + k * math.pi / 5
        points.append(f"{x + radius * math.cos(angle):.1f},{y - radius * math.sin(angle):.1f}")
    return " ".join(points)
