"""The README's Python API example runs as written (slow: it compresses the real ResNet-20)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import DATA

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_python_blocks() -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", README.read_text(), re.S | re.M)


def test_readme_has_one_python_example_covering_every_command() -> None:
    (example,) = readme_python_blocks()
    for call in ("export_model(", "inspect_model(", "compress(", "write_report(", "rewrite_file(", "validate(",
                 "benchmark("):
        assert call in example, call


@pytest.mark.slow
def test_readme_python_example_runs(tmp_path: Path, resnet20_weights: Path, cifar_npz: Path) -> None:
    (example,) = readme_python_blocks()
    # As written, except that ../shared is wherever the shared data lives here.
    script = tmp_path / "example.py"
    script.write_text(example.replace("../shared/data", str(DATA)))
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stderr[-3000:]
    for name in ("resnet20.onnx", "resnet20-lrf.onnx", "resnet20-lrf.plan.json", "resnet20-edited.onnx",
                 "resnet20-uniform.onnx", "resnet20-w8a8.onnx", "resnet20-report/report.html",
                 "resnet20-report/report.md"):
        assert (tmp_path / name).is_file(), name
    assert "back-off chose" in done.stderr
