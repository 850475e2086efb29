"""Run an ONNX graph in torch, with its weights as differentiable tensors.

The joint analysis needs gradients of the task loss with respect to the very
weights the rewrite factorizes. Evaluating the ONNX graph itself in torch
gives them exactly, for a model exported by either exporter (BatchNorm folded
or not, initializers renamed or not) and for an ONNX file that comes with no
torch model. The ops follow the ONNX specification per opset, measured by
ONNX's own node conformance cases (``scripts/onnx_conformance.py``; the op
types declared in ``tests/test_onnx_conformance.py`` pass them). Control flow
(If, Loop, Scan), sequences, optionals, strings and sub-byte dtypes are not
covered in torch. A node torch lacks that no gradient from the analysed weights
passes through (shapes, position ids, masks, index arithmetic) runs in onnx's
reference evaluator, without gradient; one on the weights' path raises
:class:`UnsupportedError` naming it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import math
from contextlib import contextmanager
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import numpy_helper
from onnx.reference import ReferenceEvaluator

from ..errors import OnnxlrfError, first_line
from ..onnx_io import default_opset


class UnsupportedError(OnnxlrfError):
    """An op, dtype or attribute value the torch evaluator does not cover."""


# Called after a hooked node runs; a returned tensor replaces the node's first output.
NodeHook = Callable[[onnx.NodeProto, list, torch.Tensor], "torch.Tensor | None"]

_DTYPES = {
    onnx.TensorProto.FLOAT: torch.float32,
    onnx.TensorProto.DOUBLE: torch.float64,
    onnx.TensorProto.FLOAT16: torch.float16,
    onnx.TensorProto.BFLOAT16: torch.bfloat16,
    onnx.TensorProto.INT64: torch.int64,
    onnx.TensorProto.INT32: torch.int32,
    onnx.TensorProto.INT16: torch.int16,
    onnx.TensorProto.INT8: torch.int8,
    onnx.TensorProto.UINT64: torch.uint64,
    onnx.TensorProto.UINT32: torch.uint32,
    onnx.TensorProto.UINT16: torch.uint16,
    onnx.TensorProto.UINT8: torch.uint8,
    onnx.TensorProto.BOOL: torch.bool,
    onnx.TensorProto.COMPLEX64: torch.complex64,
    onnx.TensorProto.COMPLEX128: torch.complex128,
    onnx.TensorProto.FLOAT8E4M3FN: torch.float8_e4m3fn,
    onnx.TensorProto.FLOAT8E4M3FNUZ: torch.float8_e4m3fnuz,
    onnx.TensorProto.FLOAT8E5M2: torch.float8_e5m2,
    onnx.TensorProto.FLOAT8E5M2FNUZ: torch.float8_e5m2fnuz,
    onnx.TensorProto.FLOAT8E8M0: torch.float8_e8m0fnu,
}


def node_attributes(node: onnx.NodeProto) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _ints(t: torch.Tensor | None) -> list[int] | None:
    return None if t is None else [int(v) for v in t.reshape(-1).tolist()]


def conv_pads(pads: Sequence[int], spatial: int) -> list[int]:
    """ONNX [b1, b2, ..., e1, e2, ...] -> F.pad's [e_last-dim first ...]."""
    out: list[int] = []
    for i in reversed(range(spatial)):
        out += [pads[i], pads[i + spatial]]
    return out


def auto_pad(x: torch.Tensor, a: dict, kernel: Sequence[int], strides: Sequence[int], dil: Sequence[int]) -> list[int]:
    mode = a.get("auto_pad", b"NOTSET")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    spatial = len(kernel)
    if mode in ("NOTSET", ""):
        return list(a.get("pads", [0] * 2 * spatial))
    if mode == "VALID":
        return [0] * 2 * spatial
    begins, ends = [], []
    for i in range(spatial):
        size = x.shape[2 + i]
        out = math.ceil(size / strides[i])
        total = max((out - 1) * strides[i] + (kernel[i] - 1) * dil[i] + 1 - size, 0)
        small, big = total // 2, total - total // 2
        begins.append(small if mode == "SAME_UPPER" else big)
        ends.append(big if mode == "SAME_UPPER" else small)
    return begins + ends


def _conv(x, w, b=None, a=None):
    spatial = w.dim() - 2
    kernel = list(w.shape[2:])
    strides = a.get("strides", [1] * spatial)
    dil = a.get("dilations", [1] * spatial)
    pads = auto_pad(x, a, kernel, strides, dil)
    padding = pads[:spatial]
    if pads[:spatial] != pads[spatial:]:
        # Only asymmetric pads need a padded copy of the input; conv pads symmetric ones itself.
        x = F.pad(x, conv_pads(pads, spatial))
        padding = [0] * spatial
    fn = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[spatial]
    return fn(x, w, b, stride=strides, padding=padding, dilation=dil, groups=a.get("group", 1))


def _gemm(A, B, C=None, a=None):
    if a.get("transA", 0):
        A = A.t()
    if a.get("transB", 0):
        B = B.t()
    y = a.get("alpha", 1.0) * (A @ B)
    if C is not None:
        y = y + a.get("beta", 1.0) * C
    return y


def _reduce(fn):
    def op(x, axes=None, a=None):
        axes = _ints(axes) if axes is not None else a.get("axes")
        keep = bool(a.get("keepdims", 1))
        if axes is None or len(axes) == 0:
            if a.get("noop_with_empty_axes", 0):
                return x
            axes = list(range(x.dim()))
        return fn(x, dim=[ax % x.dim() for ax in axes], keepdim=keep)

    return op


def _slice(x, starts=None, ends=None, axes=None, steps=None, a=None):
    if starts is None:  # Slice-1: attributes
        starts, ends, axes = a["starts"], a["ends"], a.get("axes")
    else:
        starts, ends, axes = _ints(starts), _ints(ends), _ints(axes)
    axes = axes if axes is not None else list(range(len(starts)))
    steps = _ints(steps) if steps is not None else [1] * len(starts)
    index = [slice(None)] * x.dim()
    for s, e, ax, st in zip(starts, ends, axes, steps):
        ax = ax % x.dim()
        n = x.shape[ax]
        s, e = (s + n if s < 0 else s), (e + n if e < 0 else e)
        if st > 0:
            index[ax] = slice(max(0, min(n, s)), max(0, min(n, e)), st)
        elif st < 0:
            # torch slicing has no negative steps: gather the indices instead.
            s, e = max(-1, min(n - 1, s)), max(-1, min(n - 1, e))
            x = torch.index_select(x, ax, torch.arange(s, e, st, dtype=torch.int64))
        else:
            raise OnnxlrfError("Slice with step 0 is invalid")
    return x[tuple(index)]


def _reshape(x, shape, a=None):
    shape = _ints(shape)
    if not a.get("allowzero", 0):
        shape = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]
    return x.reshape(shape)


def _pad(x, pads=None, value=None, axes=None, a=None):
    pads = _ints(pads) if pads is not None else a["pads"]
    mode = a.get("mode", b"constant")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    n = len(pads) // 2
    axes = _ints(axes) if axes is not None else list(range(x.dim() - n, x.dim())) if n < x.dim() else list(range(n))
    full = [0] * (2 * x.dim())
    for i, ax in enumerate(axes):
        full[ax % x.dim()] = pads[i]
        full[x.dim() + ax % x.dim()] = pads[n + i]
    torch_pads = conv_pads(full, x.dim())
    fill = 0.0 if value is None or value.numel() == 0 else float(value.reshape(-1)[0])
    if mode == "constant":
        return F.pad(x, torch_pads, value=fill)
    # reflect/edge pad only spatial dims in torch: drop leading zero pairs.
    while torch_pads and torch_pads[-2:] == [0, 0]:
        torch_pads = torch_pads[:-2]
    return F.pad(x, torch_pads, mode={"reflect": "reflect", "edge": "replicate", "wrap": "circular"}[mode])


def _squeeze(x, axes=None, a=None):
    axes = _ints(axes) if axes is not None else a.get("axes")
    if axes is None:
        return x.squeeze()
    for ax in sorted((ax % x.dim() for ax in axes), reverse=True):
        x = x.squeeze(ax)
    return x


def _unsqueeze(x, axes=None, a=None):
    axes = _ints(axes) if axes is not None else a["axes"]
    rank = x.dim() + len(axes)
    for ax in sorted(ax % rank for ax in axes):
        x = x.unsqueeze(ax)
    return x


def _split(x, split=None, a=None, n_out=1):
    axis = a.get("axis", 0)
    sizes = _ints(split) if split is not None else a.get("split")
    if sizes is None:
        n = x.shape[axis]
        chunk = math.ceil(n / n_out)
        sizes = [min(chunk, n - i * chunk) for i in range(n_out)]
    return list(torch.split(x, sizes, dim=axis))


def _constant(a=None):
    if "value" in a:
        return torch.from_numpy(numpy_helper.to_array(a["value"]).copy())
    for key in ("value_float", "value_int"):
        if key in a:
            return torch.tensor(a[key])
    for key in ("value_floats", "value_ints"):
        if key in a:
            return torch.tensor(list(a[key]))
    raise OnnxlrfError("Constant without a supported value attribute")


def _constant_of_shape(shape, a=None):
    value = a.get("value")
    fill = torch.from_numpy(numpy_helper.to_array(value).copy()) if value is not None else torch.zeros(1)
    return fill.reshape(-1)[0].expand(_ints(shape)).clone()


def _gelu(x, a=None):
    approx = a.get("approximate", b"none")
    approx = approx.decode() if isinstance(approx, bytes) else approx
    return F.gelu(x, approximate=approx)


def _clip(x, lo=None, hi=None, a=None):
    lo = lo if lo is not None else a.get("min")
    hi = hi if hi is not None else a.get("max")
    if lo is None and hi is None:
        return x
    return torch.clamp(x, min=lo, max=hi)


def _flatten(x, a=None):
    axis = a.get("axis", 1)
    axis = axis + x.dim() if axis < 0 else axis
    return x.reshape(int(np.prod(x.shape[:axis])), int(np.prod(x.shape[axis:])))


def _gather(x, idx, a=None):
    axis = a.get("axis", 0) % x.dim()
    idx = torch.where(idx < 0, idx + x.shape[axis], idx)
    out = torch.index_select(x, axis, idx.reshape(-1).long())
    return out.reshape(list(x.shape[:axis]) + list(idx.shape) + list(x.shape[axis + 1:]))


def _gather_nd(x, idx, a=None):
    batch = a.get("batch_dims", 0)
    if batch:
        return torch.stack([_gather_nd(xi, ii, {"batch_dims": batch - 1}) for xi, ii in zip(x, idx)])
    k = idx.shape[-1]
    idx = idx.long()
    idx = torch.where(idx < 0, idx + torch.tensor(x.shape[:k]), idx)
    return x[tuple(idx[..., i] for i in range(k))]


def _range(start, limit, delta, a=None):
    return torch.arange(start.item(), limit.item(), delta.item(), dtype=start.dtype)


def _expand(x, shape, a=None):
    shape = _ints(shape)
    target = torch.broadcast_shapes(tuple(x.shape), tuple(shape))
    return x.expand(target)


def _transpose(x, a=None):
    perm = a.get("perm", list(reversed(range(x.dim()))))
    return x.permute(*perm)


def _concat(*xs, a=None):
    return torch.cat([x for x in xs], dim=a["axis"])


def _global_avg_pool(x, a=None):
    return x.mean(dim=list(range(2, x.dim())), keepdim=True)


def _hard_sigmoid(x, a=None):
    return torch.clamp(a.get("alpha", 0.2) * x + a.get("beta", 0.5), 0, 1)


def _elementwise(fn):
    return lambda *xs, a=None: fn(*xs)


def _sum(*xs, a=None):
    out = xs[0]
    for x in xs[1:]:
        out = out + x
    return out


def _shape(x, a=None):
    shape = torch.tensor(list(x.shape), dtype=torch.int64)
    start, end = a.get("start", 0), a.get("end", None)
    return shape[start:end]


def _div(x, y):
    if not x.is_floating_point() and not y.is_floating_point():
        return torch.div(x, y, rounding_mode="trunc")
    return x / y


def _unsupported(what: str) -> UnsupportedError:
    return UnsupportedError(f"{what} is not supported by the torch analysis")


def _str(a: dict, key: str, default: str) -> str:
    value = a.get(key, default)
    return value.decode() if isinstance(value, bytes) else value


def _axis(a: dict, rank: int, default: int = 0) -> int:
    return a.get("axis", default) % rank if rank else 0


# torch has no arithmetic or comparison kernels for these: they run in int64 and cast back.
_WIDENED = (torch.uint16, torch.uint32, torch.uint64)


def _widening(fn: Callable) -> Callable:
    """``fn`` on tensors, with a retry in int64 where torch lacks the unsigned kernel.

    The retry costs nothing on the normal path (a try block), so hot ops like Add keep their speed.
    uint64 values of 2**63 or more wrap in int64: comparisons and division of such values are wrong.
    """
    def op(*xs, a=None):
        try:
            return fn(*xs)
        except (NotImplementedError, RuntimeError):
            unsigned = [x.dtype for x in xs if torch.is_tensor(x) and x.dtype in _WIDENED]
            if not unsigned:
                raise
        out = fn(*(x.to(torch.int64) if torch.is_tensor(x) and x.dtype in _WIDENED else x for x in xs))
        return out if out.dtype == torch.bool else out.to(unsigned[0])

    return op


def _variadic(fn: Callable) -> Callable:
    """A pairwise broadcasting op folded over any number of inputs (Min, Max, Sum)."""
    pairwise = _widening(fn)

    def op(*xs, a=None):
        return functools.reduce(lambda x, y: pairwise(x, y), xs)

    return op


def _mean(*xs, a=None):
    return _sum(*xs) / len(xs)


def _pow(x, y, a=None):
    # ONNX's Pow keeps the base's type (int ** float gives int).
    return torch.pow(x, y).to(x.dtype)


def _mod(x, y, a=None):
    fn = torch.fmod if a.get("fmod", 0) else torch.remainder
    return _widening(fn)(x, y)


def _bit_shift(x, y, a=None):
    fn = torch.bitwise_left_shift if _str(a, "direction", "LEFT") == "LEFT" else torch.bitwise_right_shift
    return _widening(fn)(x, y)


def _is_inf(x, a=None):
    positive, negative = a.get("detect_positive", 1), a.get("detect_negative", 1)
    return ((x == math.inf) & bool(positive)) | ((x == -math.inf) & bool(negative))


def _selu(x, a=None):
    alpha, gamma = a.get("alpha", 1.67326319217681884765625), a.get("gamma", 1.05070102214813232421875)
    return gamma * torch.where(x > 0, x, alpha * torch.expm1(x))


def _shrink(x, a=None):
    bias, lambd = a.get("bias", 0.0), a.get("lambd", 0.5)
    return torch.where(x < -lambd, x + bias, torch.where(x > lambd, x - bias, torch.zeros_like(x)))


def _softmax_family(fn: Callable) -> Callable:
    """Softmax, LogSoftmax, Hardmax: before opset 13 the input is flattened to 2-D at ``axis`` (default 1)."""
    def op(x, a=None):
        if a.get("opset", 13) >= 13:
            return fn(x, a.get("axis", -1))
        axis = a.get("axis", 1) % x.dim() if x.dim() else 0
        flat = x.reshape(int(np.prod(x.shape[:axis])), -1)
        return fn(flat, 1).reshape(x.shape)

    return op


def _hardmax(x, dim):
    return F.one_hot(torch.argmax(x, dim=dim), x.shape[dim]).movedim(-1, dim).to(x.dtype)


def _arg_extreme(fn: Callable) -> Callable:
    def op(x, a=None):
        axis = _axis(a, x.dim())
        keep = bool(a.get("keepdims", 1))
        if a.get("select_last_index", 0):
            return x.shape[axis] - 1 - fn(x.flip(axis), dim=axis, keepdim=keep)
        return fn(x, dim=axis, keepdim=keep)

    return op


def _reduce_extreme(fn: Callable, empty: Callable) -> Callable:
    """ReduceMax / ReduceMin: an empty reduction gives the identity (``empty(dtype)``), which torch refuses."""
    def reduce(x, dim, keepdim):
        if x.numel() == 0:
            shape = [1 if i in dim else n for i, n in enumerate(x.shape)] if keepdim else \
                [n for i, n in enumerate(x.shape) if i not in dim]
            return torch.full(shape, empty(x.dtype), dtype=x.dtype)
        if x.dtype == torch.bool:
            return fn(x.to(torch.uint8), dim=dim, keepdim=keepdim).to(torch.bool)
        return fn(x, dim=dim, keepdim=keepdim)

    return _reduce(reduce)


def _lowest(dtype: torch.dtype):
    if dtype == torch.bool:
        return False
    return -math.inf if dtype.is_floating_point else torch.iinfo(dtype).min


def _highest(dtype: torch.dtype):
    if dtype == torch.bool:
        return True
    return math.inf if dtype.is_floating_point else torch.iinfo(dtype).max


def _prod(x, dim, keepdim):
    for d in sorted(dim, reverse=True):
        x = torch.prod(x, dim=d, keepdim=keepdim)
    return x


def _cumulative(fn: Callable) -> Callable:
    """CumSum / CumProd with ONNX's ``exclusive`` and ``reverse``."""
    def op(x, axis, a=None):
        dim = int(axis.reshape(-1)[0]) % x.dim()
        if a.get("reverse", 0):
            x = x.flip(dim)
        y = _widening(lambda v: fn(v, dim, dtype=v.dtype))(x)
        if a.get("exclusive", 0):
            first = torch.full_like(x.narrow(dim, 0, 1), 0 if fn is torch.cumsum else 1)
            y = torch.cat([first, y.narrow(dim, 0, x.shape[dim] - 1)], dim)
        return y.flip(dim) if a.get("reverse", 0) else y

    return op


def _top_k(x, k=None, a=None):
    k = int(k.reshape(-1)[0]) if k is not None else a["k"]
    axis = _axis(a, x.dim(), -1)
    # A stable sort puts equal values in index order, as ONNX wants.
    values, indices = torch.sort(x, dim=axis, descending=bool(a.get("largest", 1)), stable=True)
    return [values.narrow(axis, 0, k), indices.narrow(axis, 0, k)]


def _trilu(x, k=None, a=None):
    k = int(k.reshape(-1)[0]) if k is not None else 0
    return torch.triu(x, k) if a.get("upper", 1) else torch.tril(x, k)


def _one_hot(indices, depth, values, a=None):
    depth = int(depth.reshape(-1)[0])
    indices = indices.to(torch.int64)
    indices = torch.where(indices < 0, indices + depth, indices)
    hot = indices.unsqueeze(-1) == torch.arange(depth)
    axis = a.get("axis", -1)
    hot = hot.movedim(-1, axis if axis >= 0 else axis + indices.dim() + 1)
    return torch.where(hot, values[1], values[0])


def _wrapped(indices: torch.Tensor, size: int | torch.Tensor) -> torch.Tensor:
    indices = indices.to(torch.int64)
    return torch.where(indices < 0, indices + size, indices)


def _gather_elements(x, indices, a=None):
    axis = _axis(a, x.dim())
    return torch.gather(x, axis, _wrapped(indices, x.shape[axis]))


_SCATTER_REDUCE = {"add": "sum", "mul": "prod", "max": "amax", "min": "amin"}


def _scatter_elements(x, indices, updates, a=None):
    axis = _axis(a, x.dim())
    indices = _wrapped(indices, x.shape[axis])
    reduction = _str(a, "reduction", "none")
    if reduction == "none":
        return torch.scatter(x, axis, indices, updates)
    return torch.scatter_reduce(x, axis, indices, updates, _SCATTER_REDUCE[reduction], include_self=True)


def _scatter_nd(x, indices, updates, a=None):
    k = indices.shape[-1]
    indices = _wrapped(indices, torch.tensor(x.shape[:k])).reshape(-1, k)
    updates = updates.reshape(-1, *x.shape[k:])
    reduction = _str(a, "reduction", "none")
    if reduction == "none":
        return x.index_put(tuple(indices.t()), updates)
    if reduction == "add":
        return x.index_put(tuple(indices.t()), updates, accumulate=True)
    combine = {"mul": torch.mul, "max": torch.maximum, "min": torch.minimum}[reduction]
    out = x.clone()
    for index, update in zip(indices.tolist(), updates):
        out[tuple(index)] = combine(out[tuple(index)], update)
    return out


def _non_zero(x, a=None):
    return torch.nonzero(x.reshape(1) if x.dim() == 0 else x).t().contiguous()


def _compress(x, condition, a=None):
    if "axis" not in a:
        x, axis = x.reshape(-1), 0
    else:
        axis = a["axis"] % x.dim()
    keep = torch.nonzero(condition.reshape(-1)[: x.shape[axis]]).reshape(-1)
    return torch.index_select(x, axis, keep)


def _reverse_sequence(x, lengths, a=None):
    batch_axis, time_axis = a.get("batch_axis", 1), a.get("time_axis", 0)
    rows = []
    for b, n in enumerate(lengths.tolist()):
        row = x.select(batch_axis, b)
        t = time_axis if time_axis < batch_axis else time_axis - 1
        rows.append(torch.cat([row.narrow(t, 0, n).flip(t), row.narrow(t, n, row.shape[t] - n)], t))
    return torch.stack(rows, batch_axis)


def _eye_like(x, a=None):
    dtype = _dtype(a["dtype"]) if "dtype" in a else x.dtype
    rows, cols = x.shape
    diagonal = torch.arange(cols)[None, :] - torch.arange(rows)[:, None] == a.get("k", 0)
    return diagonal.to(dtype)


def _depth_to_space(x, a=None):
    n, c, h, w = x.shape
    b = a["blocksize"]
    if _str(a, "mode", "DCR") == "DCR":
        y = x.reshape(n, b, b, c // (b * b), h, w).permute(0, 3, 4, 1, 5, 2)
    else:
        y = x.reshape(n, c // (b * b), b, b, h, w).permute(0, 1, 4, 2, 5, 3)
    return y.reshape(n, c // (b * b), h * b, w * b)


def _space_to_depth(x, a=None):
    n, c, h, w = x.shape
    b = a["blocksize"]
    order = (0, 3, 5, 1, 2, 4) if _str(a, "mode", "DCR") == "DCR" else (0, 1, 3, 5, 2, 4)
    y = x.reshape(n, c, h // b, b, w // b, b).permute(*order)
    return y.reshape(n, c * b * b, h // b, w // b)


def _global_max_pool(x, a=None):
    return torch.amax(x, dim=list(range(2, x.dim())), keepdim=True)


def _global_lp_pool(x, a=None):
    p = a.get("p", 2)
    return x.abs().pow(p).sum(dim=list(range(2, x.dim())), keepdim=True).pow(1.0 / p)


def _instance_norm(x, scale, bias, a=None):
    return F.instance_norm(x, weight=scale, bias=bias, eps=a.get("epsilon", 1e-5))


def _group_norm(x, scale, bias, a=None):
    groups, channels = a["num_groups"], x.shape[1]
    if scale.numel() != channels:  # opset 18: one scale and bias per group
        scale, bias = scale.repeat_interleave(channels // groups), bias.repeat_interleave(channels // groups)
    stash = a.get("stash_type", 1) == 1 and x.dtype in (torch.float16, torch.bfloat16)
    y = F.group_norm(x.float() if stash else x, groups, None, None, a.get("epsilon", 1e-5)).to(x.dtype)
    shape = [1, channels] + [1] * (x.dim() - 2)
    return y * scale.reshape(shape) + bias.reshape(shape)


def _rms_norm(x, scale, a=None):
    axis = _axis(a, x.dim(), -1)
    stash = a.get("stash_type", 1) == 1 and x.dtype in (torch.float16, torch.bfloat16)
    xs = x.float() if stash else x
    rms = torch.sqrt(xs.square().mean(dim=list(range(axis, x.dim())), keepdim=True) + a.get("epsilon", 1e-5))
    return (xs / rms).to(x.dtype) * scale


def _mean_variance_norm(x, a=None):
    axes = a.get("axes", [0, 2, 3])
    mean = x.mean(dim=axes, keepdim=True)
    variance = (x - mean).square().mean(dim=axes, keepdim=True)
    return (x - mean) / (variance.sqrt() + 1e-9)


def _lp_norm(x, a=None):
    axis = _axis(a, x.dim(), -1)
    norm = x.abs().sum(axis, keepdim=True) if a.get("p", 2) == 1 else x.square().sum(axis, keepdim=True).sqrt()
    return torch.where(norm == 0, torch.zeros_like(x), x / norm)


def _lrn(x, a=None):
    size, alpha, beta, bias = a["size"], a.get("alpha", 1e-4), a.get("beta", 0.75), a.get("bias", 1.0)
    before, after = (size - 1) // 2, size - 1 - (size - 1) // 2
    square = F.pad(x.square().movedim(1, -1), [before, after]).movedim(-1, 1)
    total = sum(square.narrow(1, i, x.shape[1]) for i in range(size))
    return x / (bias + alpha / size * total).pow(beta)


def _det(x, a=None):
    return torch.linalg.det(x)


def _size(x, a=None):
    return torch.tensor(x.numel(), dtype=torch.int64)


def _einsum(*xs, a=None):
    return torch.einsum(_str(a, "equation", ""), *xs)


def _tile(x, repeats, a=None):
    return x.repeat(*_ints(repeats))


def _prelu(x, slope, a=None):
    return torch.where(x < 0, x * slope, x)


def _thresholded_relu(x, a=None):
    return torch.where(x > a.get("alpha", 1.0), x, torch.zeros_like(x))


def _swish(x, a=None):
    return x * torch.sigmoid(a.get("alpha", 1.0) * x)


def _layer_norm(x, scale, bias=None, a=None, n_out=1):
    axis = a.get("axis", -1) % x.dim()
    shape = list(x.shape[axis:])
    stash = a.get("stash_type", 1) == 1 and x.dtype in (torch.float16, torch.bfloat16)
    if n_out == 1 and not stash:
        return F.layer_norm(x, shape, scale.expand(shape) if scale is not None else None,
                            bias.expand(shape) if bias is not None else None, a.get("epsilon", 1e-5))
    # Mean and InvStdDev are asked for (or the input is half precision): compute them in the stash type.
    xs = x.float() if stash else x
    dims = list(range(axis, x.dim()))
    mean = xs.mean(dim=dims, keepdim=True)
    inv_std = torch.rsqrt((xs - mean).square().mean(dim=dims, keepdim=True) + a.get("epsilon", 1e-5))
    y = ((xs - mean) * inv_std).to(x.dtype) * scale
    y = y + bias if bias is not None else y
    return [y, mean, inv_std][:n_out] if n_out > 1 else y


def _batch_norm(x, scale, bias, mean, var, a=None, n_out=1):
    if not a.get("training_mode", 0):
        return F.batch_norm(x, mean, var, scale, bias, False, 0.0, a.get("epsilon", 1e-5))
    dims = [0] + list(range(2, x.dim()))
    batch_mean, batch_var = x.mean(dim=dims), x.var(dim=dims, unbiased=False)
    y = F.batch_norm(x, batch_mean, batch_var, scale, bias, False, 0.0, a.get("epsilon", 1e-5))
    momentum = a.get("momentum", 0.9)
    return [y, mean * momentum + batch_mean * (1 - momentum), var * momentum + batch_var * (1 - momentum)][:n_out]


def _dropout(x, ratio=None, training_mode=None, a=None, n_out=1):
    ratio = float(ratio) if ratio is not None else a.get("ratio", 0.5)
    if training_mode is None or not bool(training_mode) or ratio == 0:
        y, mask = x, torch.ones(x.shape, dtype=torch.bool)
    else:  # training mode: random, as ONNX specifies
        mask = torch.rand(x.shape) >= ratio
        y = x * mask / (1 - ratio)
    return [y, mask] if n_out > 1 else y


def _pool_window(x, a):
    """A pooling node's kernel, number of spatial axes, strides, dilations, begin/end pads and ceil mode."""
    kernel = a["kernel_shape"]
    spatial = len(kernel)
    strides = a.get("strides", [1] * spatial)
    dil = a.get("dilations", [1] * spatial)
    return kernel, spatial, strides, dil, auto_pad(x, a, kernel, strides, dil), bool(a.get("ceil_mode", 0))


def _max_pool(x, a=None, n_out=1):
    kernel, spatial, strides, dil, pads, ceil = _pool_window(x, a)
    dtype = x.dtype
    if not dtype.is_floating_point:  # torch max-pools floats only; integers up to 2**24 are exact in float32
        x = x.to(torch.float32)
    if any(pads):
        x = F.pad(x, conv_pads(pads, spatial), value=-math.inf)
    fn = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}[spatial]
    if n_out == 1:
        return fn(x, kernel, strides, 0, dil, ceil_mode=ceil).to(dtype)
    y, flat = fn(x, kernel, strides, 0, dil, ceil_mode=ceil, return_indices=True)
    # torch indexes the padded spatial plane; ONNX the whole unpadded tensor, in the storage order.
    padded, shape = x.shape[2:], [n - pads[i] - pads[i + spatial] for i, n in enumerate(x.shape[2:])]
    coords = []
    for n in reversed(padded):
        coords.append(flat % n)
        flat = flat // n
    coords = [c - pads[i] for i, c in enumerate(reversed(coords))]
    order = range(spatial) if a.get("storage_order", 0) == 0 else reversed(range(spatial))
    index = torch.zeros_like(coords[0])
    for i in order:
        index = index * shape[i] + coords[i]
    plane = int(np.prod(shape))
    batch = torch.arange(y.shape[0] * y.shape[1]).reshape(y.shape[0], y.shape[1], *[1] * spatial)
    return [y.to(dtype), index + batch * plane]


def _avg_pool(x, a=None):
    kernel, spatial, strides, dil, pads, ceil = _pool_window(x, a)
    count_pad = bool(a.get("count_include_pad", 0))
    begins, ends = pads[:spatial], pads[spatial:]
    if all(d == 1 for d in dil) and begins == ends and all(2 * p <= k for p, k in zip(begins, kernel)):
        fn = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}[spatial]
        return fn(x, kernel, strides, begins, ceil_mode=ceil, count_include_pad=count_pad)
    # Dilations, asymmetric or large pads: a window sum (a depthwise conv of ones) over a window count.
    extra = []
    for i in range(spatial):
        size = x.shape[2 + i] + begins[i] + ends[i]
        span = (kernel[i] - 1) * dil[i] + 1
        if ceil:
            out = -(-(size - span) // strides[i]) + 1
            if (out - 1) * strides[i] >= x.shape[2 + i] + begins[i]:  # a last window starting in the end pad
                out -= 1
        else:
            out = (size - span) // strides[i] + 1
        extra.append(max(0, (out - 1) * strides[i] + span - size))
    full = conv_pads(begins + [e + n for e, n in zip(ends, extra)], spatial)
    counted = torch.ones((1, 1) + tuple(x.shape[2:]), dtype=x.dtype)
    if count_pad:
        counted = F.pad(F.pad(counted, conv_pads(pads, spatial), value=1.0), conv_pads([0] * spatial + extra, spatial))
    else:
        counted = F.pad(counted, full)
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[spatial]
    channels = x.shape[1]
    ones = torch.ones((channels, 1) + tuple(kernel), dtype=x.dtype)
    total = conv(F.pad(x, full), ones, None, strides, 0, dil, channels)
    count = conv(counted, ones[:1], None, strides, 0, dil, 1)
    return total / count


def _conv_transpose(x, w, b=None, a=None):
    spatial = w.dim() - 2
    kernel = a.get("kernel_shape", list(w.shape[2:]))
    strides = a.get("strides", [1] * spatial)
    dil = a.get("dilations", [1] * spatial)
    out_pad = a.get("output_padding", [0] * spatial)
    full = [strides[i] * (x.shape[2 + i] - 1) + (kernel[i] - 1) * dil[i] + 1 + out_pad[i] for i in range(spatial)]
    mode = _str(a, "auto_pad", "NOTSET")
    if "output_shape" in a or mode in ("SAME_UPPER", "SAME_LOWER"):
        wanted = a["output_shape"][-spatial:] if "output_shape" in a else [x.shape[2 + i] * strides[i] for i in range(spatial)]
        total = [f - o for f, o in zip(full, wanted)]
        small = [t // 2 for t in total]
        upper = mode == "SAME_UPPER"
        pads = ([s for s in small] if upper else [t - s for t, s in zip(total, small)]) + \
            ([t - s for t, s in zip(total, small)] if upper else small)
    elif mode == "VALID":
        pads = [0] * 2 * spatial
    else:
        pads = list(a.get("pads", [0] * 2 * spatial))
    fn = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}[spatial]
    y = fn(x, w, None, stride=strides, dilation=dil, groups=a.get("group", 1))
    # The full result, then output_padding's zeros at the end and the pads cropped (negative F.pad crops).
    crop = [-p for p in pads[:spatial]] + [o - p for o, p in zip(out_pad, pads[spatial:])]
    y = F.pad(y, conv_pads(crop, spatial))
    return y if b is None else y + b.reshape([1, -1] + [1] * spatial)


def _resize_matrix(size_in: int, size_out: int, scale: float, coeffs: Callable, transform: str,
                   roi: tuple[float, float] | None, exclude_outside: bool) -> tuple[np.ndarray, np.ndarray]:
    """One axis of a Resize as a (size_out, size_in) matrix, and the rows that extrapolate (tf_crop_and_resize).

    Follows onnx.reference's separable interpolation: each output coordinate maps back to the input,
    its kernel's taps clamp to the edges.
    """
    y = np.arange(size_out, dtype=np.float64)
    width = scale * size_in
    if transform == "align_corners":
        x = np.zeros(size_out) if width == 1 else y * (size_in - 1) / (width - 1)
    elif transform == "asymmetric":
        x = y / scale
    elif transform == "tf_crop_and_resize":
        x = np.full(size_out, (roi[1] - roi[0]) * (size_in - 1) / 2) if width == 1 else \
            y * (roi[1] - roi[0]) * (size_in - 1) / (width - 1)
        x = x + roi[0] * (size_in - 1)
    elif transform == "pytorch_half_pixel":
        x = np.full(size_out, -0.5) if width == 1 else (y + 0.5) / scale - 0.5
    elif transform == "half_pixel":
        x = (y + 0.5) / scale - 0.5
    elif transform == "half_pixel_symmetric":
        x = size_in / 2 * (1 - size_out / width) + (y + 0.5) / scale - 0.5
    else:
        raise _unsupported(f"Resize coordinate_transformation_mode {transform!r}")
    extrapolated = (x < 0) | (x > size_in - 1) if transform == "tf_crop_and_resize" else np.zeros(size_out, bool)
    x_floor = np.floor(x)
    ratios = np.where(x == x_floor, 1.0, x - x_floor)
    weights = np.stack([coeffs(float(r), scale) for r in ratios]).astype(np.float64)
    taps = weights.shape[1]
    half = int(np.ceil(taps / 2))
    padded = x + half
    base = np.floor(padded).astype(np.int64)
    frac = padded - base
    if taps % 2 == 0:
        offset = np.where(frac == 0, -(taps // 2), -(taps // 2) + 1)
    else:
        offset = np.where(frac <= 0.5, -((taps - 1) // 2), -((taps - 1) // 2) + 1)
    neighbours = (base + offset)[:, None] + np.arange(taps)[None, :] - half
    if exclude_outside:
        weights = np.where((neighbours < 0) | (neighbours >= size_in), 0.0, weights)
        sums = weights.sum(axis=1, keepdims=True)
        weights = weights / np.where(sums == 0, 1.0, sums)
    matrix = np.zeros((size_out, size_in))
    np.add.at(matrix, (np.repeat(np.arange(size_out), taps), np.clip(neighbours, 0, size_in - 1).reshape(-1)),
              weights.reshape(-1))
    matrix[extrapolated] = 0.0
    return matrix, extrapolated


def _nearest_coeffs(mode: str) -> Callable:
    def coeffs(ratio: float, scale: float) -> np.ndarray:
        if float(ratio).is_integer():
            return np.array([0.0, 1.0])
        up = {"round_prefer_floor": ratio > 0.5, "round_prefer_ceil": ratio >= 0.5, "floor": False, "ceil": True}[mode]
        return np.array([float(not up), float(up)])

    return coeffs


def _linear_coeffs(antialias: bool) -> Callable:
    def coeffs(ratio: float, scale: float) -> np.ndarray:
        if not antialias:
            return np.array([1 - ratio, ratio])
        scale = min(scale, 1.0)
        start = int(np.floor(-1 / scale) + 1)
        taps = np.clip(1 - np.abs((np.arange(start, 2 - start) - ratio) * scale), 0, 1)
        return taps / taps.sum()

    return coeffs


def _cubic_coeffs(A: float, antialias: bool) -> Callable:
    def kernel(t: np.ndarray) -> np.ndarray:
        t = np.abs(t)
        near = ((A + 2) * t - (A + 3)) * t * t + 1
        far = ((A * t - 5 * A) * t + 8 * A) * t - 4 * A
        return np.where(t <= 1, near, np.where(t < 2, far, 0.0))

    def coeffs(ratio: float, scale: float) -> np.ndarray:
        if not antialias:
            return kernel(np.array([ratio + 1, ratio, 1 - ratio, 2 - ratio]))
        scale = min(scale, 1.0)
        start = int(np.floor(-2 / scale) + 1)
        taps = kernel(scale * (np.arange(start, 2 - start) - ratio))
        return taps / taps.sum()

    return coeffs


def _resize(x, roi=None, scales=None, sizes=None, a=None):
    if a.get("opset", 11) < 11:  # Resize-10: (X, scales), asymmetric coordinates, floor for nearest
        scales, roi = roi, None
        a = {**a, "coordinate_transformation_mode": "asymmetric", "nearest_mode": "floor"}
    rank = x.dim()
    axes = [ax % rank for ax in a.get("axes", range(rank))]
    mode = _str(a, "mode", "nearest")
    antialias = bool(a.get("antialias", 0))
    if mode == "nearest":
        coeffs = _nearest_coeffs(_str(a, "nearest_mode", "round_prefer_floor"))
    elif mode == "linear":
        coeffs = _linear_coeffs(antialias)
    else:
        coeffs = _cubic_coeffs(a.get("cubic_coeff_a", -0.75), antialias)
    scale_of = dict.fromkeys(range(rank), 1.0)
    size_of = {i: x.shape[i] for i in range(rank)}
    if sizes is not None and sizes.numel():
        wanted = dict(zip(axes, _ints(sizes)))
        ratios = {ax: wanted[ax] / x.shape[ax] for ax in axes}
        policy = _str(a, "keep_aspect_ratio_policy", "stretch")
        if policy != "stretch":
            common = min(ratios.values()) if policy == "not_larger" else max(ratios.values())
            ratios = dict.fromkeys(axes, common)
            wanted = {ax: int(common * x.shape[ax] + 0.5) for ax in axes}
        scale_of.update(ratios)
        size_of.update(wanted)
    else:
        values = [float(v) for v in scales.reshape(-1).tolist()]
        scale_of.update(zip(axes, values))
        size_of.update({ax: int(s * x.shape[ax]) for ax, s in zip(axes, values)})
    roi_of = {}
    if roi is not None and roi.numel():
        bounds = [float(v) for v in roi.reshape(-1).tolist()]
        roi_of = {ax: (bounds[i], bounds[i + len(axes)]) for i, ax in enumerate(axes)}
    transform = _str(a, "coordinate_transformation_mode", "half_pixel")
    fill = a.get("extrapolation_value", 0.0)
    dtype = x.dtype
    y = x if dtype.is_floating_point else x.to(torch.float32)
    for ax in axes:
        bounds = roi_of.get(ax, (0.0, 1.0))
        if size_of[ax] == y.shape[ax] and math.isclose(scale_of[ax], 1.0) and bounds == (0.0, 1.0):
            continue
        matrix, extrapolated = _resize_matrix(y.shape[ax], size_of[ax], scale_of[ax], coeffs, transform, bounds,
                                              bool(a.get("exclude_outside", 0)))
        y = torch.tensordot(y, torch.from_numpy(matrix).to(y.dtype), dims=([ax], [1])).movedim(-1, ax)
        if extrapolated.any():
            mask = torch.from_numpy(extrapolated).reshape([-1] + [1] * (rank - ax - 1))
            y = torch.where(mask, torch.tensor(fill, dtype=y.dtype), y)
    if dtype.is_floating_point:
        return y
    info = torch.iinfo(dtype)
    return torch.round(y).clamp(info.min, info.max).to(dtype)


def _upsample(x, scales=None, a=None):
    scales = scales if scales is not None else torch.tensor(a["scales"])
    attrs = {"mode": a.get("mode", b"nearest"), "coordinate_transformation_mode": "asymmetric", "nearest_mode": "floor"}
    return _resize(x, None, scales, None, a=attrs)


def _dtype(onnx_type: int) -> torch.dtype:
    if onnx_type not in _DTYPES:
        raise _unsupported(f"type {onnx.TensorProto.DataType.Name(onnx_type)}")
    return _DTYPES[onnx_type]


# Past these magnitudes a non-saturating cast gives NaN: the largest finite value plus half its step.
_FLOAT8_OVERFLOW = {torch.float8_e4m3fn: 464.0, torch.float8_e4m3fnuz: 248.0, torch.float8_e5m2: 61440.0,
                    torch.float8_e5m2fnuz: 61440.0}


def _cast_to(x: torch.Tensor, dtype: torch.dtype, saturate: bool = True) -> torch.Tensor:
    if dtype in _FLOAT8_OVERFLOW and x.is_floating_point():
        largest = torch.finfo(dtype).max
        if saturate:
            x = x.clamp(-largest, largest)
        elif dtype != torch.float8_e5m2:
            x = torch.where(x.abs() >= _FLOAT8_OVERFLOW[dtype], torch.full_like(x, math.nan), x)
    if dtype == torch.float8_e8m0fnu:
        raise _unsupported("Cast to FLOAT8E8M0")
    return x.to(dtype)


def _cast(x, a=None):
    return _cast_to(x, _dtype(a["to"]), bool(a.get("saturate", 1)))


def _cast_like(x, like, a=None):
    return _cast_to(x, like.dtype, bool(a.get("saturate", 1)))


def _per_axis(param: torch.Tensor, x: torch.Tensor, a: dict) -> torch.Tensor:
    """A quantization scale or zero point broadcast to ``x``: per tensor, per axis or per block."""
    if param.dim() == 0 or (param.numel() == 1 and "block_size" not in a):
        return param.reshape(())
    axis = _axis(a, x.dim(), 1)
    block = a.get("block_size", 0)
    if block:
        return param.repeat_interleave(block, dim=axis).narrow(axis, 0, x.shape[axis])
    return param.reshape([-1 if i == axis else 1 for i in range(x.dim())])


def _quantize(x, scale, zero_point=None, a=None):
    if zero_point is not None:
        dtype = zero_point.dtype
    else:
        dtype = _dtype(a["output_dtype"]) if a.get("output_dtype", 0) else torch.uint8
    scale = _per_axis(scale, x, a)
    scaled = x.to(torch.float32) / scale.to(torch.float32)
    if dtype in _FLOAT8_OVERFLOW:
        return _cast_to(scaled, dtype, bool(a.get("saturate", 1)))
    shift = _per_axis(zero_point, x, a).to(torch.float32) if zero_point is not None else 0.0
    info = torch.iinfo(dtype)
    return (torch.round(scaled) + shift).clamp(info.min, info.max).to(dtype)


def _dequantize(x, scale, zero_point=None, a=None):
    dtype = _dtype(a["output_dtype"]) if a.get("output_dtype", 0) else scale.dtype
    shift = _per_axis(zero_point, x, a).to(torch.float32) if zero_point is not None else 0.0
    return ((x.to(torch.float32) - shift) * _per_axis(scale, x, a).to(torch.float32)).to(dtype)


def _dynamic_quantize(x, a=None):
    low, high = torch.clamp(x.min(), max=0.0), torch.clamp(x.max(), min=0.0)
    scale = (high - low) / 255
    zero_point = torch.round(-low / scale).clamp(0, 255)
    y = (torch.round(x / scale) + zero_point).clamp(0, 255)
    return [y.to(torch.uint8), scale, zero_point.to(torch.uint8)]


def _centered(x: torch.Tensor, zero_point: torch.Tensor | None, rows: bool = False) -> torch.Tensor:
    """``x - zero_point`` in int64 (exact); a per-row zero point (MatMulInteger's A) is a column."""
    x = x.to(torch.int64)
    if zero_point is None:
        return x
    zero_point = zero_point.to(torch.int64)
    if rows and zero_point.dim() == 1 and zero_point.numel() > 1:
        zero_point = zero_point.reshape(-1, 1)
    return x - zero_point


def _matmul_integer(A, B, a_zero=None, b_zero=None, a=None):
    return torch.matmul(_centered(A, a_zero, rows=True), _centered(B, b_zero)).to(torch.int32)


def _conv_integer(x, w, x_zero=None, w_zero=None, a=None):
    if w_zero is not None and w_zero.numel() > 1:
        w_zero = w_zero.reshape([-1] + [1] * (w.dim() - 1))
    # float64 holds every int32 accumulation of 8-bit products exactly.
    return _conv(_centered(x, x_zero).double(), _centered(w, w_zero).double(), None, a).round().to(torch.int32)


def _requantize(acc: torch.Tensor, scale: torch.Tensor, y_scale, y_zero) -> torch.Tensor:
    y = torch.round(acc.double() * scale.double() / y_scale.double()) + y_zero.double()
    info = torch.iinfo(y_zero.dtype)
    return y.clamp(info.min, info.max).to(y_zero.dtype)


def _qlinear_matmul(A, a_scale, a_zero, B, b_scale, b_zero, y_scale, y_zero, a=None):
    acc = torch.matmul(_centered(A, a_zero, rows=True), _centered(B, b_zero))
    return _requantize(acc, a_scale * b_scale, y_scale, y_zero)


def _qlinear_conv(x, x_scale, x_zero, w, w_scale, w_zero, y_scale, y_zero, b=None, a=None):
    acc = _conv_integer(x, w, x_zero, w_zero, a).to(torch.int64)
    if b is not None:
        acc = acc + b.to(torch.int64).reshape([1, -1] + [1] * (x.dim() - 2))
    scale = x_scale * w_scale.reshape([1, -1] + [1] * (x.dim() - 2)) if w_scale.numel() > 1 else x_scale * w_scale
    return _requantize(acc, scale, y_scale, y_zero)


def _nll_loss(x, target, weight=None, a=None):
    reduction = _str(a, "reduction", "mean")
    ignore = a.get("ignore_index", -100)
    return F.nll_loss(x, target.to(torch.int64), weight, ignore_index=ignore, reduction=reduction)


def _softmax_cross_entropy(scores, labels, weight=None, a=None, n_out=1):
    log_prob = torch.log_softmax(scores, dim=1)
    loss = _nll_loss(log_prob, labels, weight, a=a)
    return [loss, log_prob] if n_out > 1 else loss

def _attention(q, k, v, mask=None, past_key=None, past_value=None, nonpad_kv_seqlen=None, a=None, n_out=1):
    """ONNX Attention (opset 23+), as onnx.reference computes it: the scale split over Q and K, masks as biases."""
    three_d = q.dim() == 3
    if three_d:  # (batch, sequence, heads * head_size) -> (batch, heads, sequence, head_size)
        q = q.reshape(q.shape[0], q.shape[1], a["q_num_heads"], -1).transpose(1, 2)
        k = k.reshape(k.shape[0], k.shape[1], a["kv_num_heads"], -1).transpose(1, 2)
        v = v.reshape(v.shape[0], v.shape[1], a["kv_num_heads"], -1).transpose(1, 2)
    root_scale = math.sqrt(a.get("scale", 1 / math.sqrt(q.shape[3])))
    present_key = torch.cat([past_key, k], 2) if past_key is not None else k
    present_value = torch.cat([past_value, v], 2) if past_value is not None else v
    q_len, kv_len = q.shape[2], present_key.shape[2]
    bias = torch.zeros((q_len, kv_len), dtype=q.dtype)
    if mask is not None:
        fill = False if mask.dtype == torch.bool else -math.inf
        mask = F.pad(mask, [0, kv_len - mask.shape[-1]], value=fill)
        if mask.dtype == torch.bool:
            mask = torch.where(mask, 0.0, -math.inf).to(q.dtype)
        bias = bias + mask
    rows, cols = torch.arange(q_len).reshape(-1, 1), torch.arange(kv_len).reshape(1, -1)
    if a.get("is_causal", 0):
        if past_key is None and nonpad_kv_seqlen is not None:
            offset = (nonpad_kv_seqlen.reshape(-1) - q_len).reshape(-1, 1, 1, 1)
        else:
            offset = past_key.shape[2] if past_key is not None else 0
        bias = bias + torch.where(cols <= rows + offset, 0.0, -math.inf).to(q.dtype)
    left, right = a.get("left_window_size", -1), a.get("right_window_size", -1)
    if left >= 0 or right >= 0:  # sliding window around each query's absolute position
        if past_key is None and nonpad_kv_seqlen is not None:
            offset = (nonpad_kv_seqlen.reshape(-1) - q_len).reshape(-1, 1, 1, 1)
        else:
            offset = past_key.shape[2] if past_key is not None else 0
        distance = rows + offset - cols
        allowed = torch.ones_like(distance, dtype=torch.bool)
        if left >= 0:
            allowed = allowed & (distance <= left)
        if right >= 0:
            allowed = allowed & (-distance <= right)
        bias = bias + torch.where(allowed, 0.0, -math.inf).to(q.dtype)
    if nonpad_kv_seqlen is not None:
        padding = torch.arange(kv_len) < nonpad_kv_seqlen.reshape(-1, 1)
        bias = bias + torch.where(padding, 0.0, -math.inf).to(q.dtype).reshape(-1, 1, 1, kv_len)
    key, value = present_key, present_value
    if q.shape[1] != key.shape[1]:  # grouped-query attention: each K/V head serves several Q heads
        key = key.repeat_interleave(q.shape[1] // key.shape[1], dim=1)
        value = value.repeat_interleave(q.shape[1] // value.shape[1], dim=1)
    scores = (q * root_scale) @ (key.transpose(2, 3) * root_scale)
    softcap = a.get("softcap", 0.0)
    if softcap > 0:
        scores = softcap * torch.tanh(scores / softcap)
    biased = scores + bias
    mode = a.get("qk_matmul_output_mode", 0)
    qk_output = biased if mode == 2 else scores
    if "softmax_precision" in a:
        biased = biased.to(_dtype(a["softmax_precision"]))
    masked_rows = torch.isneginf(torch.amax(bias, dim=-1, keepdim=True))
    weights = torch.softmax(biased, dim=-1)
    weights = torch.where(masked_rows, torch.zeros((), dtype=weights.dtype), weights)
    if mode == 3:
        qk_output = weights
    y = weights.to(q.dtype) @ value
    if three_d:
        y = y.transpose(1, 2).reshape(y.shape[0], y.shape[2], -1)
    return [y, present_key, present_value, qk_output.to(q.dtype)][:n_out] if n_out > 1 else y

def _lp_pool(x, a=None):
    p = a.get("p", 2)
    # The window count times the average of |x|**p with pads counted: the sum over the window, to the 1/p.
    average = _avg_pool(x.abs().pow(p), {**a, "count_include_pad": 1})
    return (int(np.prod(a["kernel_shape"])) * average).pow(1.0 / p)


def _max_unpool(x, indices, output_shape=None, a=None):
    kernel = a["kernel_shape"]
    spatial = len(kernel)
    strides = a.get("strides", [1] * spatial)
    pads = a.get("pads", [0] * 2 * spatial)
    inferred = [(x.shape[2 + i] - 1) * strides[i] - pads[i] - pads[i + spatial] + kernel[i] for i in range(spatial)]
    plane = torch.zeros(x.shape[0] * x.shape[1] * int(np.prod(inferred)), dtype=x.dtype)
    y = plane.scatter(0, indices.reshape(-1).to(torch.int64), x.reshape(-1)).reshape(*x.shape[:2], *inferred)
    if output_shape is None:
        return y
    wanted = _ints(output_shape)[2:]
    return F.pad(y, conv_pads([0] * spatial + [w - n for w, n in zip(wanted, inferred)], spatial))


def _rotary_embedding(x, cos_cache, sin_cache, position_ids=None, a=None):
    shape = x.shape
    if x.dim() == 4:  # (batch, heads, sequence, head_size) -> (batch, sequence, heads, head_size)
        x = x.transpose(1, 2)
    else:
        x = x.reshape(shape[0], shape[1], a["num_heads"], -1)
    rotated = a.get("rotary_embedding_dim", 0) or x.shape[3]
    if position_ids is not None:
        cos_cache, sin_cache = cos_cache[position_ids.to(torch.int64)], sin_cache[position_ids.to(torch.int64)]
    cos_cache, sin_cache = cos_cache.unsqueeze(2), sin_cache.unsqueeze(2)
    part, rest = x[..., :rotated], x[..., rotated:]
    interleaved = a.get("interleaved", 0)
    first, second = (part[..., 0::2], part[..., 1::2]) if interleaved else part.chunk(2, dim=-1)
    real, imag = cos_cache * first - sin_cache * second, sin_cache * first + cos_cache * second
    part = torch.stack([real, imag], -1).reshape(part.shape) if interleaved else torch.cat([real, imag], -1)
    y = torch.cat([part, rest], -1)
    return y.transpose(1, 2) if len(shape) == 4 else y.reshape(shape)


def _swiglu(x, gate, a=None):
    return x * torch.sigmoid(a.get("alpha", 1.0) * x) * gate


def _bit_cast(x, a=None):
    return x.view(_dtype(a["to"]))


def _window(kind: str) -> Callable:
    """HannWindow, HammingWindow, BlackmanWindow as onnx.reference computes them."""
    def op(size, a=None):
        n = int(size.reshape(-1)[0])
        span = n if a.get("periodic", 1) else n - 1
        phase = torch.arange(n, dtype=torch.float64) * (2 * math.pi / span)
        if kind == "hann":
            w = torch.sin(phase / 2).square()
        elif kind == "hamming":
            w = 25 / 46 - (1 - 25 / 46) * torch.cos(phase)
        else:
            w = 0.42 - 0.5 * torch.cos(phase) + 0.08 * torch.cos(2 * phase)
        return w.to(_dtype(a.get("output_datatype", onnx.TensorProto.FLOAT)))

    return op


def _center_crop_pad(x, shape, a=None):
    rank = x.dim()
    axes = [ax % rank for ax in a.get("axes", range(rank))]
    full = [0] * 2 * rank
    for ax, size in zip(axes, _ints(shape)):
        change = size - x.shape[ax]  # negative: crop (F.pad crops with negative pads); the odd one goes at the end
        before = change // 2 if change >= 0 else -((-change) // 2)
        full[ax], full[ax + rank] = before, change - before
    return F.pad(x, conv_pads(full, rank))


def _tensor_scatter(cache, update, write_indices=None, a=None):
    axis = a.get("axis", -2) % cache.dim()
    length, size = update.shape[axis], cache.shape[axis]
    starts = write_indices.tolist() if write_indices is not None else [0] * cache.shape[0]
    rows = []
    for b, start in enumerate(starts):
        positions = torch.arange(start, start + length)
        if _str(a, "mode", "linear") == "circular":
            positions = positions % size
        rows.append(cache[b].index_copy(axis - 1, positions, update[b]))
    return torch.stack(rows)


def _grid_sample(x, grid, a=None):
    mode = _str(a, "mode", "linear" if a.get("opset", 20) >= 20 else "bilinear")
    mode = {"linear": "bilinear", "cubic": "bicubic"}.get(mode, mode)
    return F.grid_sample(x, grid, mode=mode, padding_mode=_str(a, "padding_mode", "zeros"),
                         align_corners=bool(a.get("align_corners", 0)))


def _affine_grid(theta, size, a=None):
    return F.affine_grid(theta, _ints(size), align_corners=bool(a.get("align_corners", 0)))


def _unique(x, a=None, n_out=1):
    """Unique values, first indices, inverse indices and counts; sorted or in order of first occurrence."""
    axis = a.get("axis")
    values, inverse, counts = torch.unique(x if axis is not None else x.reshape(-1), sorted=True, return_inverse=True,
                                           return_counts=True, dim=axis)
    dim = 0 if axis is None else axis % x.dim()
    positions = torch.arange(inverse.numel())
    first = torch.full((values.shape[dim],), inverse.numel(), dtype=torch.int64).scatter_reduce(
        0, inverse, positions, "amin")
    if not a.get("sorted", 1):  # reorder by first occurrence
        order = torch.argsort(first)
        rank = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel()))
        values, first, counts, inverse = values.index_select(dim, order), first[order], counts[order], rank[inverse]
    return [values, first, inverse, counts][:n_out] if n_out > 1 else values


def _box_corners(boxes: torch.Tensor, center: bool) -> torch.Tensor:
    if center:  # (x_center, y_center, width, height)
        x, y, w, h = boxes.unbind(-1)
        return torch.stack([y - h / 2, x - w / 2, y + h / 2, x + w / 2], -1)
    y1, x1, y2, x2 = boxes.unbind(-1)
    return torch.stack([torch.minimum(y1, y2), torch.minimum(x1, x2), torch.maximum(y1, y2), torch.maximum(x1, x2)], -1)


def _non_max_suppression(boxes, scores, max_boxes=None, iou_threshold=None, score_threshold=None, a=None):
    limit = int(max_boxes.reshape(-1)[0]) if max_boxes is not None and max_boxes.numel() else 0
    iou_limit = float(iou_threshold.reshape(-1)[0]) if iou_threshold is not None and iou_threshold.numel() else 0.0
    floor = float(score_threshold.reshape(-1)[0]) if score_threshold is not None and score_threshold.numel() else None
    corners = _box_corners(boxes.to(torch.float64), bool(a.get("center_point_box", 0)))
    area = (corners[..., 2] - corners[..., 0]) * (corners[..., 3] - corners[..., 1])
    selected = []
    for b in range(scores.shape[0]):
        for c in range(scores.shape[1]):
            kept: list[int] = []
            for i in torch.argsort(scores[b, c], descending=True, stable=True).tolist():
                if len(kept) >= limit or floor is not None and float(scores[b, c, i]) <= floor:
                    break
                box = corners[b, i]
                ok = True
                for j in kept:
                    other = corners[b, j]
                    h = (torch.minimum(box[2], other[2]) - torch.maximum(box[0], other[0])).clamp(min=0)
                    w = (torch.minimum(box[3], other[3]) - torch.maximum(box[1], other[1])).clamp(min=0)
                    union = area[b, i] + area[b, j] - h * w
                    if union > 0 and float(h * w / union) > iou_limit:
                        ok = False
                        break
                if ok:
                    kept.append(i)
            selected += [[b, c, i] for i in kept]
    return torch.tensor(selected, dtype=torch.int64).reshape(-1, 3)


def _col2im(x, image_shape, block_shape, a=None):
    spatial = len(_ints(block_shape))
    if spatial != 2:
        raise _unsupported(f"Col2Im over {spatial} dimensions")
    pads = a.get("pads", [0] * 4)
    if pads[:2] != pads[2:]:
        raise _unsupported("Col2Im with asymmetric pads")
    return F.fold(x, _ints(image_shape), _ints(block_shape), dilation=a.get("dilations", [1, 1]), padding=pads[:2],
                  stride=a.get("strides", [1, 1]))

_RNN_ACTIVATIONS: dict[str, Callable] = {
    "Relu": lambda x, alpha, beta: torch.relu(x), "Tanh": lambda x, alpha, beta: torch.tanh(x),
    "Sigmoid": lambda x, alpha, beta: torch.sigmoid(x), "Affine": lambda x, alpha, beta: alpha * x + beta,
    "LeakyRelu": lambda x, alpha, beta: F.leaky_relu(x, alpha),
    "ThresholdedRelu": lambda x, alpha, beta: torch.where(x > alpha, x, torch.zeros_like(x)),
    "ScaledTanh": lambda x, alpha, beta: alpha * torch.tanh(beta * x),
    "HardSigmoid": lambda x, alpha, beta: torch.clamp(alpha * x + beta, 0, 1),
    "Elu": lambda x, alpha, beta: F.elu(x, alpha), "Softsign": lambda x, alpha, beta: F.softsign(x),
    "Softplus": lambda x, alpha, beta: F.softplus(x),
}
# Activations taking alpha (and beta): they consume activation_alpha/activation_beta in order.
_RNN_DEFAULT_PARAMS = {"Affine": (1.0, 0.0), "LeakyRelu": (0.01, 0.0), "ThresholdedRelu": (1.0, 0.0),
                       "ScaledTanh": (1.0, 1.0), "HardSigmoid": (0.2, 0.5), "Elu": (1.0, 0.0)}


def _rnn_activations(a: dict, defaults: list[str], directions: int) -> list[list[Callable]]:
    """Per direction, the activation functions with their alpha and beta bound."""
    names = [n.decode() if isinstance(n, bytes) else n for n in a.get("activations", defaults * directions)]
    alphas, betas = list(a.get("activation_alpha", [])), list(a.get("activation_beta", []))
    bound = []
    for name in names:
        fn = _RNN_ACTIVATIONS[name]
        alpha, beta = _RNN_DEFAULT_PARAMS.get(name, (0.0, 0.0))
        if name in _RNN_DEFAULT_PARAMS:
            alpha = alphas.pop(0) if alphas else alpha
            beta = betas.pop(0) if betas else beta
        bound.append(functools.partial(fn, alpha=alpha, beta=beta))
    per = len(defaults)
    return [bound[d * per:(d + 1) * per] for d in range(directions)]


def _recurrent(kind: str) -> Callable:
    """RNN, GRU and LSTM: every direction, sequence_lens, initial states, clip, peepholes, layout."""
    gates, defaults = {"RNN": (1, ["Tanh"]), "GRU": (3, ["Sigmoid", "Tanh"]),
                       "LSTM": (4, ["Sigmoid", "Tanh", "Tanh"])}[kind]

    def op(x, w, r, b=None, lengths=None, h0=None, c0=None, peepholes=None, a=None, n_out=1):
        batch_first = a.get("layout", 0) == 1
        if batch_first:
            x = x.transpose(0, 1)
            h0 = h0.transpose(0, 1) if h0 is not None else None
            c0 = c0.transpose(0, 1) if c0 is not None else None
        steps, batch = x.shape[0], x.shape[1]
        hidden = a.get("hidden_size", r.shape[-1])
        direction = _str(a, "direction", "forward")
        directions = 2 if direction == "bidirectional" else 1
        activations = _rnn_activations(a, defaults, directions)
        clip = a.get("clip")
        lengths = lengths.to(torch.int64) if lengths is not None else torch.full((batch,), steps)
        ys, hs, cs = [], [], []
        for d in range(directions):
            reverse = direction == "reverse" or d == 1
            wd, rd = w[d], r[d]
            bias = b[d] if b is not None else torch.zeros(2 * gates * hidden, dtype=x.dtype)
            wb, rb = bias[: gates * hidden], bias[gates * hidden:]
            h = h0[d] if h0 is not None else torch.zeros(batch, hidden, dtype=x.dtype)
            c = c0[d] if c0 is not None else torch.zeros(batch, hidden, dtype=x.dtype)
            p = peepholes[d] if peepholes is not None else torch.zeros(3 * hidden, dtype=x.dtype)
            f, g, last = (activations[d] + [None, None])[:3]
            outputs = [None] * steps
            for t in (reversed(range(steps)) if reverse else range(steps)):
                valid = (t < lengths).reshape(-1, 1)
                xw = x[t] @ wd.t() + wb
                if kind == "GRU":
                    hr = h @ rd.t() + rb
                    xz, xr, xh = xw.chunk(3, -1)
                    hz, hr_, hh = hr.chunk(3, -1)
                    pre_z, pre_r = xz + hz, xr + hr_
                    if clip is not None:
                        pre_z, pre_r = pre_z.clamp(-clip, clip), pre_r.clamp(-clip, clip)
                    z, reset = f(pre_z), f(pre_r)
                    if a.get("linear_before_reset", 0):
                        pre_h = xh + reset * hh
                    else:
                        rh = rd[2 * hidden:]
                        pre_h = xh + (reset * h) @ rh.t() + rb[2 * hidden:]
                    candidate = g(pre_h.clamp(-clip, clip) if clip is not None else pre_h)
                    new_h = (1 - z) * candidate + z * h
                else:
                    pre = xw + h @ rd.t() + rb
                    if kind == "RNN":
                        new_h = f(pre.clamp(-clip, clip) if clip is not None else pre)
                    else:
                        i, o, fg, cand = pre.chunk(4, -1)
                        pi, po, pf = p.chunk(3)
                        i, fg = i + pi * c, fg + pf * c
                        if clip is not None:
                            i, fg, cand = i.clamp(-clip, clip), fg.clamp(-clip, clip), cand.clamp(-clip, clip)
                        i = f(i)
                        fg = 1 - i if a.get("input_forget", 0) else f(fg)
                        new_c = fg * c + i * g(cand)
                        o = o + po * new_c
                        o = f(o.clamp(-clip, clip) if clip is not None else o)
                        new_h = o * last(new_c)
                        c = torch.where(valid, new_c, c)
                h = torch.where(valid, new_h, h)
                outputs[t] = torch.where(valid, new_h, torch.zeros_like(new_h))
            ys.append(torch.stack(outputs))
            hs.append(h)
            cs.append(c)
        y, y_h, y_c = torch.stack(ys, 1), torch.stack(hs), torch.stack(cs)
        if batch_first:  # Y (batch, seq, dirs, hidden); states (batch, dirs, hidden)
            y, y_h, y_c = y.permute(2, 0, 1, 3), y_h.transpose(0, 1), y_c.transpose(0, 1)
        results = [y, y_h, y_c] if kind == "LSTM" else [y, y_h]
        return results[:n_out] if n_out > 1 else y

    return op

def _complex_signal(x: torch.Tensor) -> torch.Tensor:
    """ONNX's signal layout (a trailing dimension of 1: real, 2: real and imaginary) as a complex tensor."""
    if x.shape[-1] == 2:
        return torch.view_as_complex(x.to(torch.float64 if x.dtype == torch.float64 else torch.float32).contiguous())
    return x[..., 0].to(torch.complex128 if x.dtype == torch.float64 else torch.complex64)


def _dft(x, length=None, axis=None, a=None):
    if axis is not None:
        dim = int(axis.reshape(-1)[0])
    else:  # DFT-17 has an axis attribute (default 1), DFT-20 an input (default -2)
        dim = a.get("axis", 1 if a.get("opset", 20) < 20 else -2)
    dim = dim % x.dim()
    signal = _complex_signal(x)
    given = int(length.reshape(-1)[0]) if length is not None and length.numel() else None
    if a.get("inverse", 0) and a.get("onesided", 0):  # a one-sided spectrum back to a real signal
        n = given or 2 * (signal.shape[dim] - 1)
        return torch.fft.irfft(signal, n, dim=dim).unsqueeze(-1).to(x.dtype)
    n = given or signal.shape[dim]
    y = torch.fft.ifft(signal, n, dim=dim) if a.get("inverse", 0) else torch.fft.fft(signal, n, dim=dim)
    if a.get("onesided", 0):
        y = y.narrow(dim, 0, n // 2 + 1)
    return torch.view_as_real(y).to(x.dtype)


def _stft(x, step, window=None, frame_length=None, a=None):
    length = int(frame_length.reshape(-1)[0]) if frame_length is not None else window.shape[0]
    frames = _complex_signal(x).unfold(1, length, int(step.reshape(-1)[0]))  # (batch, frames, length)
    if window is not None:
        frames = frames * window
    y = torch.fft.fft(frames, dim=-1)
    if a.get("onesided", 1):
        y = y[..., : length // 2 + 1]
    return torch.view_as_real(y).to(x.dtype)


OPS: dict[str, Callable] = {
    "Conv": _conv, "Gemm": _gemm, "MatMul": _elementwise(torch.matmul),
    "Add": _widening(torch.add), "Sub": _widening(torch.sub), "Mul": _widening(torch.mul),
    "Div": _widening(_div), "Pow": _pow, "Mod": _mod, "Sqrt": _elementwise(torch.sqrt),
    "Neg": _elementwise(torch.neg), "Exp": _elementwise(torch.exp), "Log": _elementwise(torch.log),
    "Abs": _widening(torch.abs), "Reciprocal": _elementwise(torch.reciprocal), "Sign": _elementwise(torch.sign),
    "Floor": _elementwise(torch.floor), "Ceil": _elementwise(torch.ceil), "Round": _elementwise(torch.round),
    "Sin": _elementwise(torch.sin), "Cos": _elementwise(torch.cos), "Tan": _elementwise(torch.tan),
    "Asin": _elementwise(torch.asin), "Acos": _elementwise(torch.acos), "Atan": _elementwise(torch.atan),
    "Sinh": _elementwise(torch.sinh), "Cosh": _elementwise(torch.cosh), "Asinh": _elementwise(torch.asinh),
    "Acosh": _elementwise(torch.acosh), "Atanh": _elementwise(torch.atanh),
    "Relu": _elementwise(F.relu), "Sigmoid": _elementwise(torch.sigmoid), "Tanh": _elementwise(torch.tanh),
    "Erf": _elementwise(torch.erf), "Gelu": _gelu, "Clip": _clip,
    "HardSigmoid": _hard_sigmoid, "HardSwish": _elementwise(F.hardswish), "Mish": _elementwise(F.mish),
    "Softplus": _elementwise(F.softplus), "Softsign": _elementwise(F.softsign),
    "LeakyRelu": lambda x, a=None: F.leaky_relu(x, a.get("alpha", 0.01)), "PRelu": _prelu,
    "Elu": lambda x, a=None: F.elu(x, a.get("alpha", 1.0)), "Celu": lambda x, a=None: F.celu(x, a.get("alpha", 1.0)),
    "Selu": _selu, "ThresholdedRelu": _thresholded_relu, "Shrink": _shrink, "Swish": _swish,
    "Softmax": _softmax_family(lambda x, dim: torch.softmax(x, dim=dim)),
    "LogSoftmax": _softmax_family(lambda x, dim: torch.log_softmax(x, dim=dim)), "Hardmax": _softmax_family(_hardmax),
    "Sum": _variadic(torch.add), "Mean": _mean, "Min": _variadic(torch.minimum), "Max": _variadic(torch.maximum),
    "LayerNormalization": _layer_norm, "BatchNormalization": _batch_norm, "RMSNormalization": _rms_norm,
    "InstanceNormalization": _instance_norm, "GroupNormalization": _group_norm, "LRN": _lrn,
    "MeanVarianceNormalization": _mean_variance_norm, "LpNormalization": _lp_norm,
    "GlobalAveragePool": _global_avg_pool, "GlobalMaxPool": _global_max_pool, "GlobalLpPool": _global_lp_pool,
    "AveragePool": _avg_pool, "MaxPool": _max_pool, "ConvTranspose": _conv_transpose,
    "Resize": _resize, "Upsample": _upsample, "DepthToSpace": _depth_to_space, "SpaceToDepth": _space_to_depth,
    "Flatten": _flatten, "Reshape": _reshape, "Transpose": _transpose, "Concat": _concat, "Slice": _slice,
    "Gather": _gather, "Squeeze": _squeeze, "Unsqueeze": _unsqueeze, "Split": _split, "Pad": _pad,
    "Shape": _shape, "Size": _size, "Cast": _cast, "CastLike": _cast_like, "Constant": _constant,
    "ConstantOfShape": _constant_of_shape, "EyeLike": _eye_like,
    "Expand": _expand, "Tile": _tile, "Where": _elementwise(torch.where), "Equal": _widening(torch.eq),
    "Less": _widening(torch.lt), "Greater": _widening(torch.gt),
    "LessOrEqual": _widening(torch.le), "GreaterOrEqual": _widening(torch.ge),
    "IsNaN": _elementwise(torch.isnan), "IsInf": _is_inf,
    "Not": _elementwise(torch.logical_not), "And": _elementwise(torch.logical_and),
    "Or": _elementwise(torch.logical_or), "Xor": _elementwise(torch.logical_xor),
    "BitwiseNot": _widening(torch.bitwise_not), "BitwiseAnd": _widening(torch.bitwise_and),
    "BitwiseOr": _widening(torch.bitwise_or), "BitwiseXor": _widening(torch.bitwise_xor), "BitShift": _bit_shift,
    "GatherND": _gather_nd, "GatherElements": _gather_elements, "ScatterElements": _scatter_elements,
    "Scatter": _scatter_elements, "ScatterND": _scatter_nd, "NonZero": _non_zero, "Compress": _compress,
    "ReverseSequence": _reverse_sequence, "OneHot": _one_hot, "Trilu": _trilu, "TopK": _top_k,
    "ArgMax": _arg_extreme(torch.argmax), "ArgMin": _arg_extreme(torch.argmin),
    "CumSum": _cumulative(torch.cumsum), "CumProd": _cumulative(torch.cumprod), "Einsum": _einsum, "Det": _det,
    "Identity": _elementwise(lambda x: x), "Dropout": _dropout, "Range": _range,
    "ReduceMean": _reduce(torch.mean), "ReduceSum": _reduce(torch.sum),
    "ReduceMax": _reduce_extreme(torch.amax, _lowest), "ReduceMin": _reduce_extreme(torch.amin, _highest),
    "ReduceProd": _reduce(_prod),
    "ReduceL1": _reduce(lambda x, dim, keepdim: x.abs().sum(dim=dim, keepdim=keepdim)),
    "ReduceL2": _reduce(lambda x, dim, keepdim: torch.sqrt((x * x).sum(dim=dim, keepdim=keepdim))),
    "ReduceSumSquare": _reduce(lambda x, dim, keepdim: (x * x).sum(dim=dim, keepdim=keepdim)),
    "ReduceLogSum": _reduce(lambda x, dim, keepdim: torch.log(x.sum(dim=dim, keepdim=keepdim))),
    "ReduceLogSumExp": _reduce(lambda x, dim, keepdim: torch.logsumexp(x, dim=dim, keepdim=keepdim)),
    "QuantizeLinear": _quantize, "DequantizeLinear": _dequantize, "DynamicQuantizeLinear": _dynamic_quantize,
    "MatMulInteger": _matmul_integer, "ConvInteger": _conv_integer, "QLinearMatMul": _qlinear_matmul,
    "QLinearConv": _qlinear_conv, "NegativeLogLikelihoodLoss": _nll_loss,
    "SoftmaxCrossEntropyLoss": _softmax_cross_entropy, "Attention": _attention,
    "LpPool": _lp_pool, "MaxUnpool": _max_unpool, "RotaryEmbedding": _rotary_embedding, "SwiGLU": _swiglu,
    "BitCast": _bit_cast, "HannWindow": _window("hann"), "HammingWindow": _window("hamming"),
    "BlackmanWindow": _window("blackman"), "CenterCropPad": _center_crop_pad, "TensorScatter": _tensor_scatter,
    "GridSample": _grid_sample, "AffineGrid": _affine_grid, "Unique": _unique,
    "NonMaxSuppression": _non_max_suppression, "Col2Im": _col2im,
    "RNN": _recurrent("RNN"), "GRU": _recurrent("GRU"), "LSTM": _recurrent("LSTM"), "DFT": _dft, "STFT": _stft,
}

# Ops told how many outputs the node has: their optional outputs cost work only when asked for.
_COUNTS_OUTPUTS = {"Split", "LayerNormalization", "BatchNormalization", "Dropout", "MaxPool",
                   "SoftmaxCrossEntropyLoss", "Attention", "Unique",
                   "RNN", "GRU", "LSTM"}
# Ops whose meaning changed across opsets without a change of inputs: they read the model's a["opset"].
_OPSET_DEPENDENT = {"Softmax", "LogSoftmax", "Hardmax", "Resize", "GridSample", "DFT"}

# Ops whose outputs carry no gradient (shapes, indices, booleans, values set by a shape alone):
# what they compute from the weights' path is off it.
_NO_GRADIENT_OUTPUTS = {"Shape", "Size", "NonZero", "ArgMax", "ArgMin", "Equal", "Less", "Greater",
                        "LessOrEqual", "GreaterOrEqual", "IsNaN", "IsInf", "Not", "And", "Or", "Xor",
                        "EyeLike", "ConstantOfShape"}
_FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16,
                onnx.TensorProto.BFLOAT16}


def torch_supported(node: onnx.NodeProto) -> bool:
    """Whether the torch evaluator has ``node``'s op (default domain only)."""
    return node.op_type in OPS and node.domain in ("", "ai.onnx")


def _node_reads(node: onnx.NodeProto) -> list[str]:
    """``node``'s inputs, then the values of the enclosing graph that its subgraphs (If, Loop, Scan) read."""
    made, read = set(), []

    def visit(graph: onnx.GraphProto) -> None:
        made.update(v.name for v in graph.input)
        made.update(t.name for t in graph.initializer)
        for inner in graph.node:
            read.extend(inner.input)
            for attribute in inner.attribute:
                for subgraph in [attribute.g] if attribute.type == onnx.AttributeProto.GRAPH else attribute.graphs:
                    visit(subgraph)
            made.update(inner.output)

    for attribute in node.attribute:
        for subgraph in [attribute.g] if attribute.type == onnx.AttributeProto.GRAPH else attribute.graphs:
            visit(subgraph)
    # Names are unique across scopes (SSA), so a name no subgraph makes comes from outside.
    outer = [name for name in dict.fromkeys(read) if name and name not in made and name not in node.input]
    return list(node.input) + outer


def _gradient_path(nodes: list[onnx.NodeProto], weights: set[str], reads: list[list[str]]) -> list[int]:
    """Indices of the nodes that read a value computed from ``weights``: a gradient passes through them."""
    carrying, path = set(weights), []
    for index, (node, names) in enumerate(zip(nodes, reads)):
        if not carrying.intersection(names):
            continue
        path.append(index)
        casts_to_float = node.op_type != "Cast" or node_attributes(node).get("to") in _FLOAT_TYPES
        if node.op_type not in _NO_GRADIENT_OUTPUTS and casts_to_float:
            carrying.update(node.output)
    return path


def lacking_nodes(model: onnx.ModelProto, weights: Iterable[str]) -> tuple[list[onnx.NodeProto], list[onnx.NodeProto]]:
    """The nodes whose op the torch evaluator lacks: those a gradient from ``weights`` would pass
    through (they block the joint analysis), and the others (run by onnx's reference evaluator)."""
    nodes = list(model.graph.node)
    lacking = [index for index, node in enumerate(nodes) if not torch_supported(node)]
    if not lacking:
        return [], []
    path = set(_gradient_path(nodes, set(weights), [_node_reads(node) for node in nodes]))
    return [nodes[i] for i in lacking if i in path], [nodes[i] for i in lacking if i not in path]


def _op_label(node: onnx.NodeProto) -> str:
    return node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}"


def _node_label(node: onnx.NodeProto) -> str:
    return f"node {node.name!r}" if node.name else f"the node computing {node.output[0]!r}"


class _ReferenceNode:
    """A node the torch evaluator lacks, run by onnx's reference evaluator on its inputs as numpy arrays.

    Only for nodes off the weights' path: the outputs are new tensors without gradient.
    """

    def __init__(self, model: onnx.ModelProto, node: onnx.NodeProto, reads: list[str]):
        untyped = onnx.TypeProto()  # the reference evaluator takes the types from the values fed
        graph = onnx.helper.make_graph(
            [node], node.name or "node", [onnx.helper.make_value_info(name, untyped) for name in dict.fromkeys(reads) if name],
            [onnx.helper.make_value_info(name, untyped) for name in node.output if name])
        single = onnx.helper.make_model(graph, opset_imports=model.opset_import, ir_version=model.ir_version,
                                        functions=model.functions)
        try:
            self.evaluator = ReferenceEvaluator(single)
        except Exception as error:  # the reference evaluator raises several types for an op it lacks
            raise UnsupportedError(
                f"{_node_label(node)} ({_op_label(node)}) lies off the weights' path, but neither the torch analysis "
                f"nor onnx's reference evaluator runs it ({first_line(error)}): "
                "use --mode uniform or energy") from error
        self.reads, self.outputs = reads, list(node.output)

    def __call__(self, *args, a: dict | None = None, n_out: int = 1) -> list:
        feeds = {name: value.numpy() if torch.is_tensor(value) else value
                 for name, value in zip(self.reads, args) if name}
        results = iter(self.evaluator.run(None, feeds))
        # Aligned with the node's outputs, an omitted optional output as None.
        return [_from_reference(next(results)) if name else None for name in self.outputs]


def _from_reference(value):
    """A reference evaluator's array as a tensor; sequences and other values as they are."""
    if isinstance(value, (np.ndarray, np.generic)):
        return torch.from_numpy(np.array(value))
    return value


def _blocking_message(node: onnx.NodeProto) -> str:
    op = _op_label(node)
    return (f"{_node_label(node)} ({op}) lies on the path from the analysed weights to the loss, and the torch "
            f"analysis has no {op}: use --mode uniform or energy (no gradients), or export the model without {op}")


def channels_last(value: torch.Tensor) -> torch.Tensor:
    """4-D float tensors in channels-last order: torch's CPU convs run about 1.3x faster on it."""
    if value.dim() == 4 and value.is_floating_point():
        return value.contiguous(memory_format=torch.channels_last)
    return value


# glibc's mallopt parameters and the defaults restored after heap_reuse().
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_DEFAULT_TRIM_THRESHOLD, _DEFAULT_MMAP_MAX = 128 * 1024, 65536
_heap_reuse_depth = 0


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    """The C library, where it has glibc's mallopt and malloc_trim (loaded once)."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    if libc is None or not hasattr(libc, "mallopt") or not hasattr(libc, "malloc_trim"):
        return None
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    libc.malloc_trim.argtypes = [ctypes.c_size_t]
    return libc


@contextmanager
def heap_reuse() -> Iterator[None]:
    """Within: freed memory stays in the process heap for the next tensor (glibc; elsewhere a no-op).

    glibc serves every block over 32 MiB (an activation of a few 224x224 images) with a
    fresh mmap and unmaps it when freed, so each such tensor pays its page faults anew:
    a forward of ResNeXt-50 on 32 images took 2.6 s that way and 1.6 s with the heap
    kept. On exit the defaults come back and the heap is trimmed, so the memory is
    returned to the system.
    """
    global _heap_reuse_depth
    libc = _glibc()
    if libc is None:
        yield
        return
    if _heap_reuse_depth == 0:
        libc.mallopt(_M_MMAP_MAX, 0)
        libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)  # mallopt takes an int: 2 GiB
    _heap_reuse_depth += 1
    try:
        yield
    finally:
        _heap_reuse_depth -= 1
        if _heap_reuse_depth == 0:
            libc.mallopt(_M_MMAP_MAX, _DEFAULT_MMAP_MAX)
            libc.mallopt(_M_TRIM_THRESHOLD, _DEFAULT_TRIM_THRESHOLD)
            libc.malloc_trim(0)


class TorchGraph:
    """An ONNX graph evaluated in torch.

    ``weights`` names the initializers to expose as leaf tensors with
    ``requires_grad``; ``parameters[name]`` then holds them (replaceable, e.g.
    by a low-rank reconstruction, to measure a loss change).

    Nodes whose op torch lacks run in onnx's reference evaluator where no gradient from
    ``weights`` passes through them (:func:`lacking_nodes`); one on that path raises
    :class:`UnsupportedError`. ``reference_fallback=False``: any op torch lacks raises
    (the conformance measurement of the torch path).
    """

    def __init__(self, model: onnx.ModelProto, weights: Iterable[str] = (), dtype: torch.dtype = torch.float32,
                 reference_fallback: bool = True):
        self.model = model
        self.nodes = list(model.graph.node)
        weights = set(weights)
        lacking = {index for index, node in enumerate(self.nodes) if not torch_supported(node)}
        if lacking and not reference_fallback:
            unsupported = sorted({self.nodes[index].op_type for index in lacking})
            raise UnsupportedError(f"ops not supported by the torch analysis: {', '.join(unsupported)}")
        # Inputs, and for a node with subgraphs (If, Loop, Scan) the outer values they read.
        self._reads = [_node_reads(node) for node in self.nodes]
        blocking = lacking_nodes(model, weights)[0] if lacking else []
        if blocking:
            raise UnsupportedError(_blocking_message(blocking[0]))
        self.ops: list[Callable] = [_ReferenceNode(model, node, self._reads[index]) if index in lacking
                                    else OPS[node.op_type] for index, node in enumerate(self.nodes)]
        opset = default_opset(model)
        self.attrs = [{**node_attributes(n), "opset": opset} if n.op_type in _OPSET_DEPENDENT else node_attributes(n)
                      for n in self.nodes]
        conv_weights = {n.input[1] for n in self.nodes if n.op_type == "Conv"}
        self.constants: dict[str, torch.Tensor] = {}
        self.parameters: dict[str, torch.Tensor] = {}
        for init in model.graph.initializer:
            value = torch.from_numpy(numpy_helper.to_array(init).copy())
            if init.name in conv_weights:
                value = channels_last(value)
            if init.name in weights:
                self.parameters[init.name] = value.to(dtype).requires_grad_(True)
            else:
                self.constants[init.name] = value
        missing = weights - set(self.parameters)
        if missing:
            raise OnnxlrfError(f"weights are not initializers: {', '.join(sorted(missing))}")
        init_names = {i.name for i in model.graph.initializer}
        self.input_names = [i.name for i in model.graph.input if i.name not in init_names]
        self.output_names = [o.name for o in model.graph.output]
        last_reader: dict[str, int] = {}
        for index, reads in enumerate(self._reads):
            for name in reads:
                if name and name not in init_names:
                    last_reader[name] = index
        self._freed_after: list[list[str]] = [[] for _ in self.nodes]
        for name, index in last_reader.items():
            self._freed_after[index].append(name)

    def __call__(self, feeds: dict[str, torch.Tensor | np.ndarray], hook: NodeHook | None = None,
                 hook_nodes: set[str] | None = None) -> list[torch.Tensor]:
        env = self._feed(feeds)
        return self.outputs(self._run(env, 0, hook, hook_nodes, keep=set(self.output_names)))

    def largest_value_bytes(self, feeds: dict[str, torch.Tensor | np.ndarray]) -> int:
        """Bytes of the largest value a run on ``feeds`` computes."""
        largest = 0

        def note(node: onnx.NodeProto, inputs: list, output: torch.Tensor) -> None:
            nonlocal largest
            largest = max(largest, output.nbytes if torch.is_tensor(output) else 0)

        with torch.no_grad():
            self(feeds, hook=note, hook_nodes={n.name for n in self.nodes})
        return largest

    def total_value_bytes(self, feeds: dict[str, torch.Tensor | np.ndarray]) -> int:
        """Bytes of all the values a run on ``feeds`` computes (what a backward pass may keep)."""
        total = 0

        def note(node: onnx.NodeProto, inputs: list, output: torch.Tensor) -> None:
            nonlocal total
            total += output.nbytes if torch.is_tensor(output) else 0

        with torch.no_grad():
            self(feeds, hook=note, hook_nodes={n.name for n in self.nodes})
        return total

    def trace(self, feeds: dict[str, torch.Tensor | np.ndarray], resume_from: Iterable[int]) -> dict[str, torch.Tensor]:
        """Run the graph; return the outputs and the values a :meth:`resume` at any of ``resume_from`` needs."""
        live: set[str] = set(self.output_names)
        for start in resume_from:
            live |= self._live_at(start)
        return self._run(self._feed(feeds), 0, None, None, keep=live)

    def resume(self, traced: dict[str, torch.Tensor], start: int) -> list[torch.Tensor]:
        """Outputs of a run that reuses ``traced`` values computed before node index ``start``.

        Correct when nothing before ``start`` changed: a weight read first at
        ``start`` or later may have been replaced since the trace.
        """
        missing = self._live_at(start) - set(traced)
        if missing:
            raise OnnxlrfError(f"the trace lacks {', '.join(sorted(missing))} to resume at node {start}")
        env = {**traced, **self.constants, **self.parameters}
        return self.outputs(self._run(env, start, None, None, keep=set(self.output_names)))

    def feed(self, feeds: dict[str, torch.Tensor | np.ndarray]) -> dict[str, torch.Tensor]:
        """The values at node 0 of a run on ``feeds``, to step through with :meth:`advance`."""
        return self._feed(feeds)

    def advance(self, env: dict[str, torch.Tensor], start: int, stop: int, hook: NodeHook | None = None,
                hook_nodes: set[str] | None = None) -> dict[str, torch.Tensor]:
        """Run nodes ``start`` to ``stop - 1`` on ``env`` (the values at ``start``); return the values at ``stop``.

        Weights are read from ``env``: replace one there to change it for the rest of the run.
        """
        keep = self._live_at(stop) | set(self.output_names)
        return self._run(env, start, hook, hook_nodes, keep=keep, stop=stop)

    def outputs(self, env: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """The graph outputs among the values of a run (see :meth:`trace`)."""
        return [env[name] for name in self.output_names]

    def _feed(self, feeds: dict[str, torch.Tensor | np.ndarray]) -> dict[str, torch.Tensor]:
        env: dict[str, torch.Tensor] = {**self.constants, **self.parameters}
        for name in self.input_names:
            if name not in feeds:
                raise OnnxlrfError(f"missing input {name!r}")
            env[name] = channels_last(torch.as_tensor(feeds[name]))
        return env

    def _live_at(self, start: int) -> set[str]:
        """Computed values (inputs included) made before node ``start`` and read at or after it."""
        made_before = set(self.input_names).union(*(n.output for n in self.nodes[:start]))
        read_after = {name for reads in self._reads[start:] for name in reads}
        return made_before & (read_after | set(self.output_names))

    def _run(self, env: dict[str, torch.Tensor], start: int, hook: NodeHook | None,
             hook_nodes: set[str] | None, keep: set[str], stop: int | None = None) -> dict[str, torch.Tensor]:
        # Free each computed value after its last reader unless kept: the fresh
        # allocations of a run that holds every activation cost more than the ops.
        for index, (node, a, op) in enumerate(zip(self.nodes[start:stop], self.attrs[start:stop],
                                                  self.ops[start:stop]), start):
            args = [env[name] if name else None for name in self._reads[index]]
            if node.op_type in _COUNTS_OUTPUTS:
                out = op(*args, a=a, n_out=len(node.output))
                outs = out if isinstance(out, list) else [out]
            else:
                out = op(*args, a=a)
                outs = out if isinstance(out, (list, tuple)) and node.op_type != "Constant" else [out]
            for name, value in zip(node.output, outs):
                if name:
                    env[name] = value
            if hook is not None and hook_nodes is not None and node.name in hook_nodes:
                replaced = hook(node, args, outs[0])
                if replaced is not None:  # the hook may substitute the node's (first) output
                    env[node.output[0]] = replaced
            for name in self._freed_after[index]:
                if name not in keep:
                    env.pop(name, None)
        return env

    def first_reader(self, name: str) -> int:
        """Index of the first node that reads value ``name``."""
        for index, reads in enumerate(self._reads):
            if name in reads:
                return index
        raise OnnxlrfError(f"no node reads {name!r}")
