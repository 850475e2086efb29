"""progress: bars and decision logs on a stream, silence by default, the older callback style."""

from __future__ import annotations

import io
import logging
from pathlib import Path

import numpy as np
import pytest
from test_pipeline import IN, model_path, run  # noqa: F401 (model_path is a fixture)

from onnxlrf.onnx_io import load_onnx
from onnxlrf.pipeline import compress, rewrite_file
from onnxlrf.planning.joint import PlanOptions
from onnxlrf.progress import SILENT, Progress, as_progress
from onnxlrf.runtime.evaluate import benchmark
from onnxlrf.techniques.lowrank.planners import plan_uniform


@pytest.fixture()
def data(tmp_path: Path, model_path: Path) -> str:
    x = np.random.default_rng(1).standard_normal((300, IN)).astype(np.float32)
    path = tmp_path / "data.npz"
    np.savez(path, x=x, labels=run(model_path, x).argmax(axis=1).astype(np.int64))
    return f"npz:{path}"


def test_lines_without_a_terminal() -> None:
    """Off a terminal: one line per finished top-level task, none for nested ones, logs in order."""
    stream = io.StringIO()
    progress = Progress(stream)
    with progress.task("outer", total=2, unit="step") as outer:
        for _ in progress.track(range(5), "inner", unit="batch"):
            pass
        outer.update()
        progress.log("decided: because")
        outer.update()
    lines = stream.getvalue().splitlines()
    assert lines[0] == "decided: because"
    assert lines[1].startswith("outer: 2/2 step, ") and lines[1].endswith(" s")
    assert len(lines) == 2  # the nested task printed nothing


def test_bars_on_a_terminal() -> None:
    stream = io.StringIO()
    progress = Progress(stream, bars=True)
    for _ in progress.track([1, 2, 3], "layers", unit="layer"):
        progress.log("note")
    text = stream.getvalue()
    assert "layers" in text and "3/3" in text and "note" in text


def test_failed_task_prints_no_completion_and_recovers() -> None:
    stream = io.StringIO()
    progress = Progress(stream)
    with pytest.raises(ValueError):
        with progress.task("doomed", total=3):
            raise ValueError("boom")
    assert stream.getvalue() == ""
    with progress.task("next", total=1) as task:
        task.update()
    assert stream.getvalue().startswith("next: 1/1")  # top level again: the failed task's depth was undone


def test_silent_by_default_but_decisions_reach_the_logger(caplog: pytest.LogCaptureFixture,
                                                          capsys: pytest.CaptureFixture) -> None:
    progress = as_progress(None)
    assert progress is SILENT
    with caplog.at_level(logging.INFO, logger="onnxlrf"):
        for _ in progress.track(range(3), "work"):
            pass
        progress.log("kept dense because reasons")
    assert capsys.readouterr().err == ""
    assert [r.getMessage() for r in caplog.records] == ["kept dense because reasons"]


def test_callback_style_still_works() -> None:
    messages: list[str] = []
    progress = as_progress(messages.append)
    with progress.task("quiet bar", total=2) as task:
        task.update(2)
    progress.log("a decision")
    assert messages == ["a decision"]
    with pytest.raises(TypeError):
        as_progress(42)


def test_pipeline_reports_its_steps(tmp_path: Path, model_path: Path, data: str,
                                    capsys: pytest.CaptureFixture) -> None:
    """compress/rewrite/benchmark show their steps on a Progress and nothing without one."""
    stream = io.StringIO()
    compress(str(model_path), tmp_path / "a.onnx", PlanOptions("energy", target_reduction=0.3), data,
             plan_out=tmp_path / "a.json", provider="cpu", progress=Progress(stream))
    text = stream.getvalue()
    for step in ("energy plan: singular values: 2/2 weight", "rewrite: 2/2 layer", "validate on 300 samples: 3/3",
                 "validate the reference on 300 samples: 3/3", "rewrite: 2 layers factorized, 0 kept dense"):
        assert step in text, (step, text)

    stream = io.StringIO()
    rewrite_file(model_path, tmp_path / "a.json", tmp_path / "b.onnx", progress=Progress(stream))
    assert "rewrite: 2/2 layer" in stream.getvalue()

    stream = io.StringIO()
    reference = load_onnx(model_path)
    benchmark(load_onnx(tmp_path / "b.onnx"), reference, runs=4, warmup=2, provider="cpu", progress=Progress(stream))
    assert "benchmark: warm-up: 2/2 round" in stream.getvalue()
    assert "benchmark: interleaved runs: 4/4 round" in stream.getvalue()

    capsys.readouterr()
    compress(str(model_path), tmp_path / "c.onnx", PlanOptions("uniform", rank_fraction=0.5), data, provider="cpu")
    plan_uniform(reference, rank_fraction=0.5)
    assert capsys.readouterr().err == ""
