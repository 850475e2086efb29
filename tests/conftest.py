"""Shared fixtures: where the real models and data live.

The shared folder (``../shared`` beside the checkout) holds real pretrained
weights and real labelled data; ``ONNXLRF_SHARED`` points elsewhere.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))

SHARED = Path(os.environ.get("ONNXLRF_SHARED", Path(__file__).resolve().parents[1].parent / "shared"))
DATA = SHARED / "data"
CIFAR_NPZ = DATA / "cifar10" / "cifar10_test_jpeg.npz"
RESNET20_TH = DATA / "cifar10" / "resnet20-12fca82f.th"
RESNET56_TH = DATA / "cifar10" / "resnet56-4bfd9763.th"
STSB_CSV = DATA / "stsb" / "sts-test.csv"
SHUFFLENET_INT8 = DATA / "onnx_zoo" / "shufflenet-v2-12-int8" / "shufflenet-v2-12-int8.onnx"


def _require(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"shared data missing: {path} (set ONNXLRF_SHARED)")
    return path


@pytest.fixture(scope="session")
def cifar_npz() -> Path:
    return _require(CIFAR_NPZ)


@pytest.fixture(scope="session")
def resnet20_weights() -> Path:
    return _require(RESNET20_TH)


@pytest.fixture(scope="session")
def resnet56_weights() -> Path:
    return _require(RESNET56_TH)


@pytest.fixture(scope="session")
def stsb_csv() -> Path:
    return _require(STSB_CSV)


@pytest.fixture(scope="session")
def shufflenet_int8() -> Path:
    return _require(SHUFFLENET_INT8)
