"""Disjoint calibration / validation / held-out test splits of a dataset, fixed by a seed."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import OnnxlrfError


@dataclass(frozen=True)
class SplitOptions:
    """How many samples calibrate (``calib``) and validate (``val``); the rest is held out. ``seed`` draws them."""

    calib: int = 1000
    val: int = 1000
    seed: int = 0

    def __post_init__(self) -> None:
        for flag, value, low in (("--calib", self.calib, 1), ("--val", self.val, 1), ("--seed", self.seed, 0)):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise OnnxlrfError(f"{flag} must be an integer >= {low}, got {value!r}")


@dataclass
class Splits:
    """Disjoint calibration / validation / held-out test splits, fixed by the seed."""

    calib: Any
    val: Any
    test: Any
    seed: int


def split_dataset(dataset: Any, calib: int, val: int, seed: int = 0) -> Splits:
    """``calib`` and ``val`` samples drawn without overlap by ``seed``; the rest is the held-out test split."""
    if calib < 1 or val < 1:
        raise OnnxlrfError("--calib and --val must be at least 1")
    if calib + val >= len(dataset):
        raise OnnxlrfError(f"--calib {calib} + --val {val} leave no held-out test data of {len(dataset)} samples")
    order = np.random.default_rng(seed).permutation(len(dataset))
    return Splits(dataset.subset(order[:calib]), dataset.subset(order[calib:calib + val]),
                  dataset.subset(order[calib + val:]), seed)
