"""Interleaved timing of several runners (so machine load hits all alike) and the device's name."""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path
from typing import Callable


def device_name(providers: list[str]) -> str:
    """The device the provider runs on, for cache keys and reports."""
    if providers[0] in ("CUDAExecutionProvider", "TensorrtExecutionProvider"):
        try:
            import torch

            if torch.cuda.is_available():
                return torch.cuda.get_device_name(0)
        except Exception:  # a CPU-only torch build or a broken driver: fall back to a generic name
            pass
        return "cuda:0"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores)"


def time_interleaved(runners: list[Callable[[], None]], warmup: int = 2, budget_s: float = 1.0,
                     min_rounds: int = 5, max_rounds: int = 200) -> list[list[float]]:
    """Run times (s) of each runner: warm-up, then rounds running every runner once (order rotating
    every round), until ``budget_s`` has passed and at least ``min_rounds`` rounds ran."""
    for run in runners:
        for _ in range(warmup):
            run()
    times: list[list[float]] = [[] for _ in runners]
    start = time.perf_counter()
    for round_number in range(max_rounds):
        shift = round_number % len(runners)
        for index in list(range(shift, len(runners))) + list(range(shift)):
            begin = time.perf_counter()
            runners[index]()
            times[index].append(time.perf_counter() - begin)
        if round_number + 1 >= min_rounds and time.perf_counter() - start >= budget_s:
            break
    return times
