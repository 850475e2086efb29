"""Full-rank rewrite of real models is exact (scripts/check_full_rank.py's ResNet-56 and MiniLM checks). Slow."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[3] / "scripts" / "check_full_rank.py"


def load_script():
    spec = importlib.util.spec_from_file_location("check_full_rank", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
@pytest.mark.parametrize("name, reference", [("resnet56", 0.8320), ("minilm", 0.8205)])
def test_full_rank_rewrite_is_exact(name: str, reference: float, tmp_path: Path, resnet56_weights: Path,
                                    stsb_csv: Path, cifar_npz: Path) -> None:
    check = load_script()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        row = check.CHECKS[name](resnet56_weights.parents[2], tmp_path)  # <shared>/data/cifar10/<file>
    finally:
        torch.set_num_threads(threads)
    assert row.rewritten == row.layers > 0 and row.params_after > row.params_before
    assert row.relative_diff <= check.RELATIVE_TOLERANCE
    assert row.value == pytest.approx(row.reference_value, abs=check.METRIC_TOLERANCE)
    assert row.reference_value == pytest.approx(reference, abs=5e-5)  # the shared README's figures
    assert row.passed
