"""Run an ONNX graph in torch, with its weights as differentiable tensors.

The joint analysis needs gradients of the task loss with respect to the very
weights the rewrite factorizes. Evaluating the ONNX graph itself in torch
gives them exactly, for a model exported by either exporter (BatchNorm folded
or not, initializers renamed or not) and for an ONNX file that comes with no
torch model. Only inference ops are covered: the ones that image classifiers
and transformer encoders are exported with.
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

from .errors import OnnxlrfError

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
    onnx.TensorProto.INT8: torch.int8,
    onnx.TensorProto.UINT8: torch.uint8,
    onnx.TensorProto.BOOL: torch.bool,
}


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _ints(t: torch.Tensor | None) -> list[int] | None:
    return None if t is None else [int(v) for v in t.reshape(-1).tolist()]


def _pads(pads: Sequence[int], spatial: int) -> list[int]:
    """ONNX [b1, b2, ..., e1, e2, ...] -> F.pad's [e_last-dim first ...]."""
    out: list[int] = []
    for i in reversed(range(spatial)):
        out += [pads[i], pads[i + spatial]]
    return out


def _auto_pad(x: torch.Tensor, a: dict, kernel: Sequence[int], strides: Sequence[int], dil: Sequence[int]) -> list[int]:
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
    pads = _auto_pad(x, a, kernel, strides, dil)
    padding = pads[:spatial]
    if pads[:spatial] != pads[spatial:]:
        # Only asymmetric pads need a padded copy of the input; conv pads symmetric ones itself.
        x = F.pad(x, _pads(pads, spatial))
        padding = [0] * spatial
    fn = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[spatial]
    return fn(x, w, b, stride=strides, padding=padding, dilation=dil, groups=a.get("group", 1))


def _pool(x, a, kind):
    kernel = a["kernel_shape"]
    spatial = len(kernel)
    strides = a.get("strides", [1] * spatial)
    dil = a.get("dilations", [1] * spatial)
    pads = _auto_pad(x, a, kernel, strides, dil)
    ceil = bool(a.get("ceil_mode", 0))
    if kind == "max":
        if any(pads):
            x = F.pad(x, _pads(pads, spatial), value=-math.inf)
        fn = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}[spatial]
        return fn(x, kernel, strides, 0, dil, ceil_mode=ceil)
    count_pad = bool(a.get("count_include_pad", 0))
    if any(pads) and count_pad:
        x = F.pad(x, _pads(pads, spatial))
        pads = [0] * 2 * spatial
    if any(pads) and pads[:spatial] != pads[spatial:]:
        raise OnnxlrfError("AveragePool with asymmetric pads is not supported by the torch analysis")
    fn = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}[spatial]
    return fn(x, kernel, strides, pads[:spatial], ceil_mode=ceil, count_include_pad=False)


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


def _slice(x, starts, ends, axes=None, steps=None, a=None):
    starts, ends = _ints(starts), _ints(ends)
    axes = _ints(axes) if axes is not None else list(range(len(starts)))
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
    torch_pads = _pads(full, x.dim())
    fill = 0.0 if value is None or value.numel() == 0 else float(value.reshape(-1)[0])
    if mode == "constant":
        return F.pad(x, torch_pads, value=fill)
    # reflect/edge pad only spatial dims in torch: drop leading zero pairs.
    while torch_pads and torch_pads[-2:] == [0, 0]:
        torch_pads = torch_pads[:-2]
    return F.pad(x, torch_pads, mode={"reflect": "reflect", "edge": "replicate"}[mode])


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


def _layer_norm(x, scale, bias=None, a=None):
    axis = a.get("axis", -1) % x.dim()
    shape = list(x.shape[axis:])
    return F.layer_norm(x, shape, scale.expand(shape) if scale is not None else None,
                        bias.expand(shape) if bias is not None else None, a.get("epsilon", 1e-5))


def _batch_norm(x, scale, bias, mean, var, a=None):
    return F.batch_norm(x, mean, var, scale, bias, False, 0.0, a.get("epsilon", 1e-5))


def _cast(x, a=None):
    return x.to(_DTYPES[a["to"]])


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


def _softmax(x, a=None):
    return torch.softmax(x, dim=a.get("axis", -1))


def _gelu(x, a=None):
    approx = a.get("approximate", b"none")
    approx = approx.decode() if isinstance(approx, bytes) else approx
    return F.gelu(x, approximate=approx)


def _clip(x, lo=None, hi=None, a=None):
    lo = lo if lo is not None else a.get("min")
    hi = hi if hi is not None else a.get("max")
    return torch.clamp(x, min=lo, max=hi)


def _flatten(x, a=None):
    axis = a.get("axis", 1) % (x.dim() + 1) if x.dim() else 0
    return x.reshape(int(np.prod(x.shape[:axis])), -1)


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


OPS: dict[str, Callable] = {
    "Conv": _conv, "Gemm": _gemm, "MatMul": _elementwise(torch.matmul),
    "Add": _elementwise(torch.add), "Sub": _elementwise(torch.sub), "Mul": _elementwise(torch.mul),
    "Div": _elementwise(_div), "Pow": _elementwise(torch.pow), "Sqrt": _elementwise(torch.sqrt),
    "Neg": _elementwise(torch.neg), "Exp": _elementwise(torch.exp), "Log": _elementwise(torch.log),
    "Abs": _elementwise(torch.abs), "Reciprocal": _elementwise(torch.reciprocal),
    "Relu": _elementwise(F.relu), "Sigmoid": _elementwise(torch.sigmoid), "Tanh": _elementwise(torch.tanh),
    "Erf": _elementwise(torch.erf), "Gelu": _gelu, "Softmax": _softmax, "Clip": _clip,
    "HardSigmoid": _hard_sigmoid, "HardSwish": _elementwise(F.hardswish), "Sum": _sum,
    "Min": _elementwise(torch.minimum), "Max": _elementwise(torch.maximum),
    "LayerNormalization": _layer_norm, "BatchNormalization": _batch_norm,
    "GlobalAveragePool": _global_avg_pool, "AveragePool": lambda x, a=None: _pool(x, a, "avg"),
    "MaxPool": lambda x, a=None: _pool(x, a, "max"),
    "Flatten": _flatten, "Reshape": _reshape, "Transpose": _transpose, "Concat": _concat, "Slice": _slice,
    "Gather": _gather, "Squeeze": _squeeze, "Unsqueeze": _unsqueeze, "Split": _split, "Pad": _pad,
    "Shape": _shape, "Cast": _cast, "Constant": _constant, "ConstantOfShape": _constant_of_shape,
    "Expand": _expand, "Where": _elementwise(torch.where), "Equal": _elementwise(torch.eq),
    "Less": _elementwise(torch.lt), "Greater": _elementwise(torch.gt),
    "LessOrEqual": _elementwise(torch.le), "GreaterOrEqual": _elementwise(torch.ge),
    "IsNaN": _elementwise(torch.isnan), "IsInf": _elementwise(torch.isinf),
    "GatherND": _gather_nd, "Floor": _elementwise(torch.floor), "Ceil": _elementwise(torch.ceil),
    "GatherElements": lambda x, idx, a=None: torch.gather(x, a.get("axis", 0), torch.where(idx < 0, idx + x.shape[a.get("axis", 0)], idx).long()), "Not": _elementwise(torch.logical_not),
    "And": _elementwise(torch.logical_and), "Or": _elementwise(torch.logical_or),
    "Identity": _elementwise(lambda x: x), "Dropout": lambda x, *rest, a=None: x, "Range": _range,
    "ReduceMean": _reduce(torch.mean), "ReduceSum": _reduce(torch.sum),
    "ReduceMax": _reduce(lambda x, dim, keepdim: torch.amax(x, dim=dim, keepdim=keepdim)),
    "ReduceL2": _reduce(lambda x, dim, keepdim: torch.sqrt((x * x).sum(dim=dim, keepdim=keepdim))),
}


def _channels_last(value: torch.Tensor) -> torch.Tensor:
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
    """

    def __init__(self, model: onnx.ModelProto, weights: Iterable[str] = (), dtype: torch.dtype = torch.float32):
        unsupported = sorted({n.op_type for n in model.graph.node if n.op_type not in OPS or n.domain not in ("", "ai.onnx")})
        if unsupported:
            raise UnsupportedError(f"ops not supported by the torch analysis: {', '.join(unsupported)}")
        self.model = model
        self.nodes = list(model.graph.node)
        self.attrs = [_attrs(n) for n in self.nodes]
        weights = set(weights)
        conv_weights = {n.input[1] for n in self.nodes if n.op_type == "Conv"}
        self.constants: dict[str, torch.Tensor] = {}
        self.parameters: dict[str, torch.Tensor] = {}
        for init in model.graph.initializer:
            value = torch.from_numpy(numpy_helper.to_array(init).copy())
            if init.name in conv_weights:
                value = _channels_last(value)
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
        for index, node in enumerate(self.nodes):
            for name in node.input:
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
            env[name] = _channels_last(torch.as_tensor(feeds[name]))
        return env

    def _live_at(self, start: int) -> set[str]:
        """Computed values (inputs included) made before node ``start`` and read at or after it."""
        made_before = set(self.input_names).union(*(n.output for n in self.nodes[:start]))
        read_after = {name for n in self.nodes[start:] for name in n.input}
        return made_before & (read_after | set(self.output_names))

    def _run(self, env: dict[str, torch.Tensor], start: int, hook: NodeHook | None,
             hook_nodes: set[str] | None, keep: set[str], stop: int | None = None) -> dict[str, torch.Tensor]:
        # Free each computed value after its last reader unless kept: the fresh
        # allocations of a run that holds every activation cost more than the ops.
        for index, (node, a) in enumerate(zip(self.nodes[start:stop], self.attrs[start:stop]), start):
            args = [env[name] if name else None for name in node.input]
            if node.op_type == "Split":
                outs = _split(*args, a=a, n_out=len(node.output))
            else:
                out = OPS[node.op_type](*args, a=a)
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
        for index, node in enumerate(self.nodes):
            if name in node.input:
                return index
        raise OnnxlrfError(f"no node reads {name!r}")
