"""ONNX's node conformance cases run through the torch evaluator (:class:`onnxlrf.measure.torch_graph.TorchGraph`).

    python scripts/onnx_conformance.py [--json] [--ops Relu,Cast] [--failures]

The cases are those the installed ``onnx`` package generates offline
(``onnx.backend.test.case.node.collect_testcases``). Each case's inputs are fed
to the evaluator and every output is compared with the expected one: same
dtype, same shape, values within rtol 1e-3 and atol 1e-4 (or the case's own
tolerance where it is looser; for bfloat16 and float8 outputs, two steps of
their precision), NaN where NaN is expected; 4-bit and 2-bit outputs exactly, by their
values. A case is
*unsupported* when the evaluator refuses it (an op, dtype or attribute it
does not cover, or an input that is no tensor: sequences, optionals, strings),
*failed* when it runs and disagrees or raises anything else.

A case counts under the op it tests: its node's op type, and for an
``_expanded`` case (the op's function body inlined) that of the case it
expands. ``--json`` prints ``{"cases", "passed", "unsupported", "failed",
"by_op": {op: {...}}}``; otherwise a table.
"""

from __future__ import annotations

import argparse
import functools
import json
import re
import sys
import warnings
from dataclasses import dataclass
from typing import Callable

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from onnxlrf.measure.torch_graph import SubByteTensor, TorchGraph, UnsupportedError, value_from_numpy, value_to_numpy

RTOL, ATOL = 1e-3, 1e-4
STATUSES = ("passed", "unsupported", "failed")


# An evaluator under test: a case's model and its feeds (by input name; a 4-bit or 2-bit one as a SubByteTensor)
# -> the graph's outputs, in order. It raises UnsupportedError for what it does not cover; anything else it
# raises is a failure.
Evaluate = Callable[[onnx.ModelProto, dict[str, torch.Tensor]], list]


def evaluate_torch_graph(model: onnx.ModelProto, feeds: dict[str, torch.Tensor]) -> list:
    """The outputs of :class:`TorchGraph` on ``feeds``: the torch path alone, no reference fallback."""
    return TorchGraph(model, reference_fallback=False)(feeds)


@dataclass(frozen=True)
class CaseResult:
    """One case's outcome: its name, the op it tests, its status and why (empty when it passed)."""

    name: str
    op: str
    status: str
    reason: str = ""


@functools.cache
def node_cases() -> tuple:
    """Every node conformance case of the installed onnx package (generated once per process)."""
    from onnx.backend.test.case.node import collect_testcases

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the generators' own overflow warnings
        return tuple(collect_testcases())


@functools.cache
def case_ops() -> dict[str, str]:
    """Case name -> the op type it tests."""
    single = {c.name: c.model.graph.node[0].op_type for c in node_cases() if "_expanded" not in c.name}
    return {c.name: single.get(c.name) or single[re.sub(r"_expanded(_ver\d+)?$", "", c.name)] for c in node_cases()}


class _NotTensor(Exception):
    """A case value the evaluator cannot take or give: no tensor, or a dtype torch lacks."""


def _array(value) -> np.ndarray:
    if isinstance(value, onnx.TensorProto):
        value = numpy_helper.to_array(value)
    if value is None or isinstance(value, (list, dict)):
        raise _NotTensor(f"{type(value).__name__} value")
    return np.asarray(value)


def _to_torch(value) -> torch.Tensor | SubByteTensor:
    try:
        return value_from_numpy(np.array(_array(value), copy=True))  # a writable copy: torch warns on read-only arrays
    except UnsupportedError as error:
        raise _NotTensor(str(error)) from error


def _compare(got, expected, rtol: float, atol: float) -> str:
    """Why ``got`` differs from ``expected``; empty when it matches."""
    expected = _array(expected)
    if isinstance(got, SubByteTensor):
        got_dtype = value_to_numpy(got).dtype
        if got_dtype != expected.dtype:
            return f"dtype {got_dtype}, expected {expected.dtype}"
        # Compared in the wider dtype the values are held in: numpy computes little in ml_dtypes' 4-bit types.
        got, expected = got.values, expected.astype(got.values.numpy().dtype)
    elif not torch.is_tensor(got):
        return f"got {type(got).__name__}, expected a tensor"
    else:
        got_dtype, want_dtype = str(got.dtype).removeprefix("torch."), str(expected.dtype)
        if got_dtype != want_dtype:
            return f"dtype {got_dtype}, expected {want_dtype}"
    if tuple(got.shape) != expected.shape:
        return f"shape {tuple(got.shape)}, expected {expected.shape}"
    got = got.detach()
    if got.dtype.is_complex:
        got_values, want_values = got.to(torch.complex128).numpy(), expected.astype(np.complex128)
    elif got.dtype.is_floating_point:
        got_values, want_values = got.to(torch.float64).numpy(), expected.astype(np.float64)
        rtol = max(rtol, 2 * torch.finfo(got.dtype).eps)  # bfloat16, float8: rounding differs by a step or two
    else:
        got_values, want_values = got.numpy(), expected
        if not np.array_equal(got_values, want_values):
            return f"{int((got_values != want_values).sum())} of {got_values.size} values differ"
        return ""
    close = np.isclose(got_values, want_values, rtol=rtol, atol=atol, equal_nan=True)
    if not close.all():
        return f"{int((~close).sum())} of {close.size} values differ"
    return ""


def run_case(case, evaluate: Evaluate = evaluate_torch_graph) -> CaseResult:
    """Run one conformance case through ``evaluate`` (by default :class:`TorchGraph`)."""
    op = case_ops()[case.name]
    graph = case.model.graph
    values = [v for v in list(graph.input) + list(graph.output) if v.type.WhichOneof("value") != "tensor_type"]
    if values:
        return CaseResult(case.name, op, "unsupported", f"{values[0].type.WhichOneof('value')} value {values[0].name!r}")
    inputs, expected = case.data_sets[0]
    try:
        feeds = {info.name: _to_torch(value) for info, value in zip(graph.input, inputs)}
    except _NotTensor as error:
        return CaseResult(case.name, op, "unsupported", str(error))
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            outputs = evaluate(case.model, feeds)
    except UnsupportedError as error:
        return CaseResult(case.name, op, "unsupported", str(error))
    except Exception as error:  # any other exception is a failure of the evaluator, reported by the case
        return CaseResult(case.name, op, "failed", f"{type(error).__name__}: {error}".splitlines()[0])
    rtol, atol = max(RTOL, case.rtol), max(ATOL, case.atol)
    for info, got, want in zip(graph.output, outputs, expected):
        try:
            reason = _compare(got, want, rtol, atol)
        except _NotTensor as error:
            return CaseResult(case.name, op, "unsupported", str(error))
        if reason:
            return CaseResult(case.name, op, "failed", f"output {info.name!r}: {reason}")
    return CaseResult(case.name, op, "passed")


def run_cases(ops: set[str] | None = None, evaluate: Evaluate = evaluate_torch_graph) -> list[CaseResult]:
    """The results of every case (or of those testing ``ops``) through ``evaluate``, in the cases' order."""
    return [run_case(c, evaluate) for c in node_cases() if ops is None or case_ops()[c.name] in ops]


def summary(results: list[CaseResult]) -> dict:
    """Totals and per-op counts of ``results``: ``{"cases", "passed", "unsupported", "failed", "by_op"}``."""
    def counts(subset: list[CaseResult]) -> dict:
        return {"cases": len(subset), **{s: sum(r.status == s for r in subset) for s in STATUSES}}

    by_op = {op: counts([r for r in results if r.op == op]) for op in sorted({r.op for r in results})}
    return {**counts(results), "by_op": by_op}


def table(report: dict) -> str:
    """``report`` (see :func:`summary`) as a table: a row per op and the totals."""
    rows = [f"{'op':<32}{'cases':>7}{'passed':>8}{'unsup':>7}{'failed':>8}"]
    for op, c in report["by_op"].items():
        rows.append(f"{op:<32}{c['cases']:>7}{c['passed']:>8}{c['unsupported']:>7}{c['failed']:>8}")
    rows.append(f"{'total':<32}{report['cases']:>7}{report['passed']:>8}{report['unsupported']:>7}{report['failed']:>8}")
    return "\n".join(rows)


def main(argv: list[str] | None = None, evaluate: Evaluate = evaluate_torch_graph,
         description: str = __doc__.splitlines()[0]) -> int:
    """Command line: run the cases through ``evaluate``, print the summary (``--json``) or a table."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    parser.add_argument("--ops", help="comma-separated op types to run (default: all)")
    parser.add_argument("--failures", action="store_true", help="also list each failed case and why")
    args = parser.parse_args(argv)
    ops = set(args.ops.split(",")) if args.ops else None
    results = run_cases(ops, evaluate)
    report = summary(results)
    print(json.dumps(report, indent=1) if args.json else table(report))
    if args.failures:
        for r in results:
            if r.status == "failed":
                print(f"FAILED {r.name} [{r.op}]: {r.reason}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
