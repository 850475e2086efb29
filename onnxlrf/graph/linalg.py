"""Thin SVDs of stacks of weight matrices, in float64, robust to LAPACK's convergence failures."""

from __future__ import annotations

import contextlib
from typing import Iterator

import numpy as np
import torch


def svd(matrices: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Thin SVD of a stack of matrices, in float64 via torch: ``U (g,m,k)``, ``S (g,k)``, ``Vh (g,k,n)``."""
    with single_thread():
        u, s, vh = thin_svd(torch.from_numpy(np.asarray(matrices, dtype=np.float64)))
    return u.numpy(), s.numpy(), vh.numpy()


def thin_svd(matrices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``torch.linalg.svd(matrices, full_matrices=False)``, retried on the transposes where it fails.

    LAPACK's divide-and-conquer SVD fails to converge on some rank-deficient matrices (a
    refit's 1536 x 384 MiniLM matrix, singular values down to 1e-16, failed in numpy's);
    the transposed problem goes another way through it.
    """
    try:
        return torch.linalg.svd(matrices, full_matrices=False)
    except torch.linalg.LinAlgError:
        v, s, uh = torch.linalg.svd(matrices.transpose(-1, -2), full_matrices=False)
        return uh.transpose(-1, -2), s, v.transpose(-1, -2)


def singular_values(matrices: np.ndarray) -> np.ndarray:
    """Singular values ``(g, k)`` of a stack of matrices, descending, float64 (cheaper than :func:`svd`)."""
    matrices = torch.from_numpy(np.asarray(matrices, dtype=np.float64))
    with single_thread():
        try:
            return torch.linalg.svdvals(matrices).numpy()
        except torch.linalg.LinAlgError:  # as in thin_svd
            return torch.linalg.svdvals(matrices.transpose(-1, -2)).numpy()


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """torch on one thread: multi-threaded LAPACK SVD of these small matrices is up to 100x
    slower when the cores are busy (threads wait at barriers for descheduled peers)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
