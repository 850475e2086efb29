"""report: Markdown and self-contained HTML reports, through the API and `compress --report`; CLI --quiet."""

from __future__ import annotations

import copy
import html
import io
import json
import re
import xml.etree.ElementTree as ET
from html.parser import HTMLParser
from pathlib import Path

import matplotlib
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from onnxlrf import report as report_module
from onnxlrf.cli import cli
from onnxlrf.errors import OnnxlrfError
from onnxlrf.pipeline import CompressResult, compress
from onnxlrf.planning.joint import PlanOptions
from onnxlrf.progress import Progress
from onnxlrf.report import PLOTS, REPORT_FILES, layer_rows, write_report
from onnxlrf.verify.search import DEFAULT_ACCEPTANCE
from onnxlrf.verify.splits import SplitOptions

IN, HIDDEN, CLASSES, SAMPLES = 32, 64, 10, 300
BASELINES = [{"method": "uniform", "reduction": 0.1, "value": 0.9},
             {"method": "uniform", "reduction": 0.3, "value": 0.7},
             {"method": "energy", "reduction": 0.2, "value": 0.85}]
SVG = "{http://www.w3.org/2000/svg}"
VOID = {"meta", "br", "hr", "img", "input", "link", "source", "wbr", "col", "area", "base", "embed", "param", "track"}
SVG_LEAVES = {"rect", "path", "use"}  # self-closed inside SVG (matplotlib draws each marker as a <use>)


def low_rank_mlp() -> onnx.ModelProto:
    """x[N,32] -MatMul-> 64 -Relu-> MatMul 64x64 -Relu-> Gemm -> 10; the MatMul weights are nearly rank 6,
    so the joint method finds layers to truncate, and the last one is too sensitive to touch."""
    rng = np.random.default_rng(0)

    def low_rank(m: int, n: int) -> np.ndarray:
        return (rng.standard_normal((m, 6)) @ rng.standard_normal((6, n)) / np.sqrt(6)
                + 0.02 * rng.standard_normal((m, n))).astype(np.float32)

    inits = [numpy_helper.from_array(low_rank(IN, HIDDEN), "w1"),
             numpy_helper.from_array(low_rank(HIDDEN, HIDDEN), "w2"),
             numpy_helper.from_array(0.3 * rng.standard_normal((CLASSES, HIDDEN)).astype(np.float32), "w3"),
             numpy_helper.from_array(np.zeros(CLASSES, np.float32), "b3")]
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w1"], ["h1"], name="fc1"), helper.make_node("Relu", ["h1"], ["r1"]),
         helper.make_node("MatMul", ["r1", "w2"], ["h2"], name="fc2"), helper.make_node("Relu", ["h2"], ["r2"]),
         helper.make_node("Gemm", ["r2", "w3", "b3"], ["logits"], name="fc3", transB=1)],
        "low_rank_mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", IN])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", CLASSES])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("report")


@pytest.fixture(scope="module")
def model_and_data(work: Path) -> tuple[Path, str]:
    path = work / "mlp.onnx"
    onnx.save(low_rank_mlp(), str(path))
    x = np.random.default_rng(1).standard_normal((SAMPLES, IN)).astype(np.float32)
    logits = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.savez(work / "data.npz", x=x, labels=logits.argmax(axis=1).astype(np.int64))
    return path, f"npz:{work / 'data.npz'}"


@pytest.fixture(scope="module")
def compact(work: Path, model_and_data: tuple[Path, str]) -> tuple[CompressResult, str]:
    """One joint compact run (the slow part, ~5 s), with its progress log."""
    model, data = model_and_data
    stream = io.StringIO()
    result = compress(str(model), work / "compact.onnx", PlanOptions("compact"), data, SplitOptions(calib=100, val=100),
                      provider="cpu", progress=Progress(stream))
    return result, stream.getvalue()


@pytest.fixture(scope="module")
def uniform(work: Path, model_and_data: tuple[Path, str]) -> CompressResult:
    """Every layer factorized at a known rank (rank fraction 1/4: 8, 16 and 3)."""
    model, data = model_and_data
    return compress(str(model), work / "uniform.onnx", PlanOptions("uniform", rank_fraction=0.25), data, provider="cpu")


class _Checker(HTMLParser):
    """Checks tag balance and collects what the assertions need."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.resources: list[str] = []  # src/href attribute values
        self.tags: dict[str, int] = {}
        self.cells: list[str] = []
        self.pre: list[str] = []
        self._text: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list) -> None:
        self.tags[tag] = self.tags.get(tag, 0) + 1
        self.resources += [value for name, value in attrs if name in ("src", "href") and value]
        if tag not in VOID:
            self.stack.append(tag)
        if tag in ("td", "pre"):
            self._text = []

    def handle_startendtag(self, tag: str, attrs: list) -> None:
        self.tags[tag] = self.tags.get(tag, 0) + 1
        self.resources += [value for name, value in attrs if name in ("src", "href") and value]
        if tag not in VOID and tag not in SVG_LEAVES:
            self.errors.append(f"self-closed <{tag}/>")

    def handle_endtag(self, tag: str) -> None:
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes <{self.stack[-1] if self.stack else None}>")
            return
        self.stack.pop()
        if tag in ("td", "pre") and self._text is not None:
            (self.cells if tag == "td" else self.pre).append("".join(self._text))
            self._text = None

    def handle_data(self, data: str) -> None:
        if self._text is not None:
            self._text.append(data)


def parse_html(text: str) -> _Checker:
    checker = _Checker()
    checker.feed(text)
    checker.close()
    assert not checker.errors, checker.errors[:5]
    assert checker.stack == [], checker.stack
    return checker


def check_rows(result: CompressResult, checker: _Checker) -> None:
    """One table row per layer of the plan, with its rank (or why it stayed dense), parameters and FLOPs."""
    rows = layer_rows(result)
    assert [row.node for row in rows] == [entry.node for entry in result.plan.layers] == ["fc1", "fc2", "fc3"]
    for row, (m, n) in zip(rows, [(HIDDEN, IN), (HIDDEN, HIDDEN), (CLASSES, HIDDEN)]):
        assert row.node in checker.cells
        assert row.params_dense == m * n and row.flops_dense == 2 * m * n  # batch 1
        if row.changed:
            # At rank r an m x n weight becomes r*(m+n) weights and, at batch 1, 2*r*(m+n) FLOPs.
            assert (row.params_planned, row.flops_planned) == (row.view.kept * (m + n), 2 * row.view.kept * (m + n))
            assert f"{row.params_dense:,} -> {row.params_planned:,}" in checker.cells
        else:
            assert row.reason and row.reason in checker.cells
            assert (row.params_planned, row.flops_planned) == (row.params_dense, row.flops_dense)
        assert all({"rank", "predicted", "measured", "agree"} <= c.keys() for c in row.checks)
        if row.changed and row.view.kept in [c["rank"] for c in row.checks]:
            assert row.measured_dloss is not None


def test_report_contents(work: Path, compact: tuple[CompressResult, str], uniform: CompressResult) -> None:
    result, _ = compact
    md_path, html_path = write_report(result, work / "api-report", "onnxlrf compress mlp.onnx --mode compact",
                                      baselines=BASELINES)
    assert sorted(p.name for p in (work / "api-report").iterdir()) == sorted(REPORT_FILES)
    page = html_path.read_text()
    checker = parse_html(page)
    # Self-contained: no external resources of any kind.
    assert not [r for r in checker.resources if re.match(r"(https?:)?//", r)], checker.resources
    assert "<script" not in page and "<link" not in page and "@import" not in page
    assert checker.tags["svg"] == 3

    check_rows(result, checker)
    rows = layer_rows(result)
    assert all(row.checks for row in rows)  # the joint analysis measured single-layer truncations of each layer

    # Splits, providers, versions, the command, and the plan (exactly, in the collapsed block).
    for text in ("calibration", "validation", "held-out test", "CPUExecutionProvider", "onnxruntime", "torch",
                 "numpy", "python"):
        assert text in checker.cells, text
    assert "onnxlrf compress mlp.onnx --mode compact" in checker.pre
    test = result.extra["test"]
    low, high = test["change_interval"]
    assert low <= test["value"] - test["reference_value"] <= high
    assert f"{test['value'] - test['reference_value']:+.4f} [{low:+.4f}, {high:+.4f}]" in checker.cells
    assert json.loads(checker.pre[-1]) == result.plan.to_dict()
    assert checker.tags["details"] == 1

    # Plots: well-formed SVG; one dot per single-layer check; the baselines are in the legend.
    for name in PLOTS.values():
        ET.fromstring((work / "api-report" / name).read_text())
    loss = (work / "api-report" / PLOTS["loss"]).read_text()
    dots = [g for g in ET.fromstring(loss).iter(SVG + "g") if g.get("id", "").startswith("loss-")]
    assert len(dots) == sum(len(row.checks) for row in rows)
    assert all(len(dot.findall(f".//{SVG}use")) == 1 and dot.find(SVG + "title") is not None for dot in dots)
    assert all(f">{label}<" in loss for label in ("agree", "disagree", "rank kept"))  # the legend
    curve = (work / "api-report" / PLOTS["curve"]).read_text()
    assert ">uniform<" in curve and ">energy<" in curve and "back-off attempt" in curve
    evaluated = [b for b in result.plan.options["backoff"] if "val" in b and "same_as_kappa" not in b]
    assert curve.count("<title>kappa") == len(evaluated)

    markdown = md_path.read_text()
    for name in ("fc1", "fc2", "fc3"):
        assert re.search(rf"^\| {name} \| (MatMul|Gemm) \|", markdown, re.M), name
    for name in (*PLOTS.values(), "plan.json"):
        assert f"({name})" in markdown

    # A data-free plan with every layer factorized: exact ranks, no single-layer checks, no back-off.
    _, html_path = write_report(uniform, work / "uniform-report")
    checker = parse_html(html_path.read_text())
    check_rows(uniform, checker)
    assert [row.view.kept for row in layer_rows(uniform)] == [8, 16, 3]
    assert "validation (onnxruntime)" in checker.cells and "calibration" not in checker.cells


def test_plots_are_reproducible_and_the_page_fetches_nothing(work: Path, compact: tuple[CompressResult, str]) -> None:
    """The same run gives the same plot bytes, whatever the user's matplotlib settings, which stay as they were;
    the page runs no script and names nothing outside itself."""
    result, _ = compact
    first, second = work / "same-1", work / "same-2"
    write_report(result, first, baselines=BASELINES)
    with matplotlib.rc_context({"svg.hashsalt": None, "svg.fonttype": "path", "font.size": 20, "lines.linewidth": 5}):
        keys = [*report_module.PLOT_STYLE, "svg.hashsalt", "lines.linewidth"]
        settings = {key: matplotlib.rcParams[key] for key in keys}
        write_report(result, second, baselines=BASELINES)
        assert {key: matplotlib.rcParams[key] for key in keys} == settings
    for name in PLOTS.values():
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
    page = (first / "report.html").read_text()
    assert "<script" not in page.lower() and "<?xml" not in page and "<!DOCTYPE svg" not in page
    # The only web addresses are the SVG namespaces; links (xlink:href, url(...)) point inside the page.
    namespaces = re.findall(r' xmlns(?::xlink)?="(https?://[^"]*)"', page)
    assert set(namespaces) == {"http://www.w3.org/2000/svg", "http://www.w3.org/1999/xlink"}
    assert page.count("http") == len(namespaces)
    links = re.findall(r'href="([^"]*)"', page) + re.findall(r"url\(([^)]*)\)", page)
    assert links and all(link.startswith("#") for link in links), links


def test_back_off_table_says_what_became_of_each_attempt(work: Path, compact: tuple[CompressResult, str]) -> None:
    result = copy.deepcopy(compact[0])
    backoff = result.plan.options["backoff"]
    first = backoff[0]
    # A latency plan rejected before validation, and a later kappa that repeated the first plan.
    backoff += [{"kappa": 512.0, "achieved_reduction": 0.3, "predicted_dloss": 0.01, "speedup": 0.93},
                {**first, "kappa": 1024.0, "same_as_kappa": first["kappa"], "chosen": False},
                {"kappa": 2048.0, "restored": 2, "achieved_reduction": 0.25, "predicted_dloss": 0.02, "val": 0.5,
                 "loss_change": -0.0123, "loss_se": 0.0045},
                {"kappa": 1.0, "target_reduction": 0.04, "achieved_reduction": 0.041, "predicted_dloss": 0.003,
                 "val": 0.25}]
    md_path, html_path = write_report(result, work / "backoff-report")
    markdown = md_path.read_text()
    assert "| 512 | 30.0% | +0.01 | - | - | rejected: 0.93x the original's speed |" in markdown
    assert f"| 1024 | {first['achieved_reduction']:.1%} |" in markdown
    assert f"the plan of kappa {first['kappa']:.4g} |" in markdown
    assert "| 2048 | 25.0% | +0.02 | 0.5000 | -0.0123 (0.0045) | 2 layers restored (worst measured first) |" in markdown
    assert "| 1 | 4.1% | +0.003 | 0.2500 | - | size search: lossless at 0.04 |" in markdown
    assert "Lossless chose" not in markdown  # compact: no selection among plans
    curve = (work / "backoff-report" / PLOTS["curve"]).read_text()
    # Neither the plan rejected before validation nor a repeat of an earlier plan has a point.
    assert curve.count("<title>kappa") == sum("val" in b and "same_as_kappa" not in b for b in backoff)
    assert "\u03ba2.05e+03+r" in curve
    assert not parse_html(html_path.read_text()).errors


def test_progress_log_says_what_was_decided(compact: tuple[CompressResult, str]) -> None:
    result, log = compact
    assert "splits (seed 0): 100 calibration, 100 validation, 100 held-out test samples" in log
    assert "analysis: gradients and K-FAC factors: 2/2 batch" in log
    assert "perturbation ranges: 3/3 layer" in log
    for entry in result.plan.layers:  # a layer whose mildest truncation disagreed is untrusted, and says so
        untrusted = not entry.notes["range_checks"][0]["agree"]
        assert (f"{entry.node} stays dense: at its mildest tested truncation" in log) == untrusted, entry.node
    z = DEFAULT_ACCEPTANCE.loss_z
    held = [b for b in result.plan.options["backoff"] if b["val"] >= result.plan.options["reference_val"]
            and b["loss_change"] + z * b["loss_se"] <= 0]
    assert sum(b.get("chosen", False) for b in result.plan.options["backoff"]) == (1 if held else 0)
    if held:
        assert f"back-off chose kappa {result.plan.options['kappa']:.3g}" in log
    else:
        assert "back-off: no plan held on validation; the model stays dense" in log
    attempt = (r"  kappa 1: ([\d.]+% fewer parameters, predicted dloss \S+, val [\d.]+, loss change \S+ "
               r"\(s\.e\. [\d.]+\): (holds|rejected) \(metric >= original's and paired loss change|no plan)")
    assert re.search(attempt, log), log
    assert f"rewrite: {len(result.rewrite.rewritten)} layers factorized" in log


def test_report_overwrite_and_failures(work: Path, compact: tuple[CompressResult, str],
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    result, _ = compact
    directory = work / "again"
    write_report(result, directory)
    before = {p.name: p.read_bytes() for p in directory.iterdir()}
    with pytest.raises(OnnxlrfError, match=r"report exists: .*\(pass --overwrite"):
        write_report(result, directory)
    assert {p.name: p.read_bytes() for p in directory.iterdir()} == before
    md, page = write_report(result, directory, "second", overwrite=True)
    assert "second" in page.read_text() and "(not recorded: Python API)" in before["report.html"].decode()

    (work / "a-file").write_text("x")
    with pytest.raises(OnnxlrfError, match="report directory is a file"):
        write_report(result, work / "a-file")
    with pytest.raises(OnnxlrfError, match="baseline 0 is missing key 'value'"):
        write_report(result, work / "bad-baselines", baselines=[{"method": "m", "reduction": 0.1}])

    def broken(*args: object) -> str:
        raise RuntimeError("renderer failed")

    monkeypatch.setattr(report_module, "render_html", broken)
    with pytest.raises(RuntimeError):
        write_report(result, work / "never")
    assert not (work / "never").exists()  # nothing half-written, not even the directory
    with pytest.raises(RuntimeError):
        write_report(result, directory, overwrite=True)
    assert {p.name: p.read_bytes() for p in directory.iterdir()}["report.md"] == md.read_bytes()


def invoke(*args: object):
    return CliRunner().invoke(cli, [str(a) for a in args])


def test_cli_report_json_quiet(work: Path, model_and_data: tuple[Path, str]) -> None:
    model, data = model_and_data
    out, report_dir = work / "cli.onnx", work / "cli-report"
    argv = ["compress", model, "-o", out, "--mode", "uniform", "--rank-fraction", "0.25", "--data", data,
            "--report", report_dir, "--json", "-q"]
    result = invoke(*argv)
    assert result.exit_code == 0, result.stderr
    assert result.stderr == ""  # --quiet: no bars, no log
    payload = json.loads(result.stdout)  # stdout is exactly one JSON object
    assert payload["report"] == str(report_dir / "report.html") and payload["mode"] == "uniform"
    page = (report_dir / "report.html").read_text()
    parse_html(page)
    assert html.escape(" ".join(["onnxlrf", *map(str, argv)])) in page  # the exact command
    assert "only the joint modes measure them" in page  # no single-layer checks in a data-free mode

    # Without --quiet the steps go to stderr, and stdout is still one JSON object.
    argv[argv.index(out)] = work / "cli2.onnx"
    result = invoke(*argv[:-1], "--overwrite")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["params"] == payload["params"]
    assert "rewrite: 3/3 layer" in result.stderr and "validate on 300 samples" in result.stderr

    # An existing report is refused before any work: the ONNX output is not written either.
    result = invoke("compress", model, "-o", work / "cli3.onnx", "--mode", "uniform", "--rank-fraction", "0.25",
                    "--report", report_dir)
    assert result.exit_code == 1 and not (work / "cli3.onnx").exists()
    assert result.stderr.strip().splitlines() == [f"Error: report exists: {report_dir / 'report.md'} "
                                                  "(pass --overwrite to replace it)"]


def test_cli_quiet_on_every_command(work: Path, model_and_data: tuple[Path, str]) -> None:
    model, data = model_and_data
    plan = work / "q.plan.json"
    runs = [
        ("compress", model, "-o", work / "q.onnx", "--mode", "energy", "--target-reduction", "0.2",
         "--plan-out", plan),
        ("rewrite", model, "--plan", plan, "-o", work / "q2.onnx"),
        ("validate", work / "q.onnx", "--reference", model, "--data", data),
        ("bench", work / "q.onnx", "--reference", model, "--runs", "2", "--warmup", "1"),
    ]
    for argv in runs:
        loud = invoke(*argv, "--overwrite" if argv[0] in ("compress", "rewrite") else "--json")
        assert loud.exit_code == 0, loud.stderr
        assert loud.stderr, argv[0]  # progress shown by default
        quiet = invoke(*argv, "--overwrite" if argv[0] in ("compress", "rewrite") else "--json", "--quiet")
        assert quiet.exit_code == 0 and quiet.stderr == "", (argv[0], quiet.stderr)
    assert invoke("inspect", model, "-q").exit_code == 0  # accepted everywhere, though inspect shows no progress
