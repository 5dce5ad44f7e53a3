"""Tensor assembly: Concat, Split, Slice, Expand, Tile, ReverseSequence, Range,
ConstantOfShape, EyeLike, Size and Einsum's forward kernel (its gradient lives in
``ops/math.py``).

Exporters wrap transformers in shape arithmetic (Shape -> Gather -> Unsqueeze
-> Concat -> Reshape) on small int64 tensors.  Those tensors stay on the host:
:func:`on` picks NumPy for a kernel whose operands are host arrays and
integers only, whatever the run's device, and the run's ``xp`` otherwise
(moving any host operand to the device).  This module imports NumPy for that
host-side shape arithmetic only; tensor maths goes through the module
:func:`on` returns.
"""

from __future__ import annotations

import math

import numpy as np  # host-side shape values only (see the module docstring)

from onnxgrad.errors import ModelError
from onnxgrad.ops import standard as std
from onnxgrad.ops.registry import op

#: Integer tensors at most this large that already live on the host stay there.
HOST_LIMIT = 4096


def _is_host(a) -> bool:
    return isinstance(a, (np.ndarray, np.generic))


def to_host(a):
    if hasattr(a, "get") and not isinstance(a, (np.ndarray, np.generic, dict)):
        return a.get()  # a device (CuPy) array
    return np.asarray(a)


def on(xp, *arrays):
    """The array module to compute with, and ``arrays`` moved to it (None stays None).

    NumPy when ``xp`` is NumPy, or when some operand already lives on the host and
    every operand is a small integer or boolean tensor (shape arithmetic); ``xp``
    otherwise.
    """
    present = [a for a in arrays if a is not None]
    if xp is np:
        return np, [None if a is None else np.asarray(a) for a in arrays]
    host = any(_is_host(a) for a in present) and all(
        a.dtype.kind in "biu" and a.size <= HOST_LIMIT for a in present)
    if host:
        return np, [None if a is None else to_host(a) for a in arrays]
    return xp, [None if a is None else xp.asarray(a) for a in arrays]


def ints(values) -> list[int]:
    """A host integer vector (or scalar) as a list of Python ints."""
    return [int(v) for v in np.asarray(to_host(values)).reshape(-1)]


def norm_axis(axis: int, rank: int, what: str = "axis") -> int:
    axis = int(axis)
    if not -rank <= axis < max(rank, 1):
        raise ValueError(f"{what} {axis} is out of range for rank {rank}")
    return axis + rank if axis < 0 else axis


def zeros_like_value(g, value: str) -> str:
    """A value of zeros with the (runtime) shape and the element type of ``value``."""
    dtype = g.dtype(value)
    return g.op("ConstantOfShape", g.shape_of(value), value=np.zeros(1, dtype=dtype), dtype=dtype)


# -- Concat -------------------------------------------------------------------------

def _concat(xp, inputs, axis):
    mod, arrays = on(xp, *inputs)
    rank = arrays[0].ndim
    return (mod.concatenate(arrays, axis=norm_axis(axis, rank)),)


@op("Concat", since=1, differentiable=("inputs",))
def Concat1(xp, *inputs, axis=1):
    return _concat(xp, inputs, axis)


@op("Concat", since=4, differentiable=("inputs",))
def Concat(xp, *inputs, axis):
    return _concat(xp, inputs, axis)


def _dim_value(g, value: str, axis: int) -> str:
    """``value.shape[axis]`` as a 1-element int64 value (a constant when static)."""
    shape = g.shape(value)
    if shape is not None and isinstance(shape[axis], int):
        return g.ints([shape[axis]])
    return g.Gather(g.shape_of(value), g.ints([axis]), axis=0, dtype=np.int64)


@Concat1.gradient
@Concat.gradient
def _(g, node, dY):
    axis = int(node.attrs["axis"])  # may be negative: Gather and Split take that too
    sizes = g.Concat(*[_dim_value(g, x, axis) for x in node.inputs], axis=0, dtype=np.int64)
    n = len(node.inputs)
    parts = g.op("Split", dY, sizes, axis=axis, num_outputs=n)
    return (parts,) if n == 1 else tuple(parts)


# -- Split ----------------------------------------------------------------------------

def _split(input, split, axis, n_outputs, num_outputs=None):
    axis = norm_axis(axis, input.ndim)
    dim = input.shape[axis]
    if split is None or len(ints(split)) == 0:
        n = int(num_outputs) if num_outputs else n_outputs
        if num_outputs and n_outputs != n:
            raise ValueError(f"Split: num_outputs={n} but the node has {n_outputs} outputs")
        size = -(-dim // n)  # ceil: the last chunk is smaller (opset 18 num_outputs)
        if not num_outputs and dim % n:
            raise ValueError(f"Split: dimension {dim} does not split into {n} equal parts")
        sizes = [size] * (n - 1) + [dim - size * (n - 1)]
    else:
        sizes = ints(split)
        if sum(sizes) != dim or any(s < 0 for s in sizes):
            raise ValueError(f"Split: sizes {sizes} do not add up to dimension {dim}")
        if len(sizes) != n_outputs:
            raise ValueError(f"Split: {len(sizes)} sizes for {n_outputs} outputs")
    index = [slice(None)] * input.ndim
    out, start = [], 0
    for s in sizes:
        index[axis] = slice(start, start + s)
        out.append(input[tuple(index)])
        start += s
    return tuple(out)


@op("Split", since=2, differentiable=("input",))
def Split2(xp, input, *, axis=0, split=None, ctx):
    return _split(input, split, axis, ctx.num_outputs)


@op("Split", since=13, differentiable=("input",), host_inputs=("split",))
def Split13(xp, input, split=None, *, axis=0, ctx):
    return _split(input, split, axis, ctx.num_outputs)


@op("Split", since=18, differentiable=("input",), host_inputs=("split",))
def Split(xp, input, split=None, *, axis=0, num_outputs=None, ctx):
    return _split(input, split, axis, ctx.num_outputs, num_outputs)


@Split2.gradient
@Split13.gradient
@Split.gradient
def _(g, node, *douts):
    parts = [d if d is not None else zeros_like_value(g, y) for d, y in zip(douts, node.outputs)]
    dX = parts[0] if len(parts) == 1 else g.Concat(*parts, axis=int(node.attrs["axis"]))
    return (dX,) + (None,) * (len(node.inputs) - 1)


# -- Slice ----------------------------------------------------------------------------

def slice_index(shape, starts, ends, axes=None, steps=None) -> tuple:
    """The Python index of an ONNX Slice over an array of ``shape``."""
    starts, ends = ints(starts), ints(ends)
    rank = len(shape)
    axes = list(range(len(starts))) if axes is None else ints(axes)
    steps = [1] * len(starts) if steps is None else ints(steps)
    if not len(starts) == len(ends) == len(axes) == len(steps):
        raise ValueError("Slice: starts, ends, axes and steps differ in length")
    index = [slice(None)] * rank
    for s, e, a, st in zip(starts, ends, axes, steps):
        a = norm_axis(a, rank, "Slice axis")
        dim = shape[a]
        if st == 0:
            raise ValueError("Slice: a step of 0")
        s = s + dim if s < 0 else s
        e = e + dim if e < 0 else e
        if st > 0:
            s, e = min(max(s, 0), dim), min(max(e, 0), dim)
        else:
            s, e = min(max(s, 0), dim - 1), min(max(e, -1), dim - 1)
        index[a] = slice(s, None if e < 0 else e, st)
    return tuple(index)


@op("Slice", since=1, differentiable=("data",))
def Slice1(xp, data, *, starts, ends, axes=None):
    return (data[slice_index(data.shape, starts, ends, axes)],)


@op("Slice", since=10, differentiable=("data",),
    host_inputs=("starts", "ends", "axes", "steps"))
def Slice(xp, data, starts, ends, axes=None, steps=None):
    return (data[slice_index(data.shape, starts, ends, axes, steps)],)


@Slice1.gradient
def _(g, node, dY):
    a = node.attrs
    axes = a["axes"] if a["axes"] is not None else list(range(len(a["starts"])))
    X = node.inputs[0]
    return (g.private("SliceGrad", dY, g.shape_of(X), g.ints(a["starts"]), g.ints(a["ends"]),
                      g.ints(axes)),)


@Slice.gradient
def _(g, node, dY):
    X, *rest = node.inputs
    return (g.private("SliceGrad", dY, g.shape_of(X), *rest),) + (None,) * len(rest)


@op("SliceGrad", domain="onnxgrad", host_inputs=("shape", "starts", "ends", "axes", "steps"))
def SliceGrad(xp, dY, shape, starts, ends, axes=None, steps=None):
    """The gradient of Slice: ``dY`` placed into zeros of the input's ``shape``."""
    shape = tuple(ints(shape))
    out = xp.zeros(shape, dtype=dY.dtype)
    out[slice_index(shape, starts, ends, axes, steps)] = dY
    return (out,)


@SliceGrad.in_standard_ops
def _(g, node):
    dY, shape, starts, ends, *rest = node.inputs + [""] * 2
    axes, steps = rest[0] or None, rest[1] or None
    static = std.shape_value(g, shape)
    values = [g.graph.initializers.get(v) if v else None for v in (starts, ends, axes, steps)]
    if static is None or not all(isinstance(d, int) for d in static) or \
            any(v is None for v in values[:2]) or (axes and values[2] is None) or \
            (steps and values[3] is None):
        return None
    if steps and any(int(v) != 1 for v in values[3].reshape(-1)):
        return None
    index = slice_index(static, values[0], values[1], values[2], None)
    spans = [part.indices(dim)[:2] for part, dim in zip(index, static)]
    begin = [start for start, _ in spans]
    after = [dim - max(stop, start) for (start, stop), dim in zip(spans, static)]
    return (g.Pad(dY, g.ints(begin + after)),)


# -- Expand and Tile ----------------------------------------------------------------------

@op("Expand", since=8, differentiable=("input",), host_inputs=("shape",))
def Expand(xp, input, shape):
    target = np.broadcast_shapes(tuple(input.shape), tuple(ints(shape)))
    mod, (x,) = on(xp, input)
    out = mod.empty(target, dtype=x.dtype)
    out[...] = x
    return (out,)


@Expand.gradient
def _(g, node, dY):
    X = node.inputs[0]
    return (g.private("SumToShape", dY, g.shape_of(X)), None)


@op("Tile", since=6, differentiable=("input",), host_inputs=("repeats",))
def Tile(xp, input, repeats):
    reps = ints(repeats)
    if len(reps) != input.ndim:
        raise ValueError(f"Tile: {len(reps)} repeats for an input of rank {input.ndim}")
    mod, (x,) = on(xp, input)
    return (mod.tile(x, tuple(reps)) if reps else mod.array(x, copy=True),)


@Tile.gradient
def _(g, node, dY):
    X = node.inputs[0]
    return (g.private("TileGrad", dY, g.shape_of(X)), None)


@op("TileGrad", domain="onnxgrad", host_inputs=("shape",))
def TileGrad(xp, dY, shape):
    """The gradient of Tile: the sum of ``dY``'s tiles, each of ``shape``."""
    shape = tuple(ints(shape))
    if tuple(dY.shape) == shape:
        return (dY,)
    if 0 in shape:
        return (xp.zeros(shape, dtype=dY.dtype),)
    split = []
    for d, n in zip(dY.shape, shape):
        split += [d // n, n]
    summed = dY.reshape(tuple(split)).sum(axis=tuple(range(0, 2 * len(shape), 2)))
    return (xp.asarray(summed, dtype=dY.dtype),)


@TileGrad.in_standard_ops
def _(g, node):
    dY, shape = node.inputs
    static = std.shape_value(g, shape)
    if static is None:
        return None
    rank = len(static)
    repeats = g.Div(g.Shape(dY, dtype="int64"), shape, dtype="int64")
    split = g.Reshape(g.Concat(g.Unsqueeze(repeats, g.ints([1])), g.Unsqueeze(shape, g.ints([1])),
                               axis=1, dtype="int64"), g.ints([-1]))
    summed = g.ReduceSum(g.Reshape(dY, split), g.ints(range(0, 2 * rank, 2)), keepdims=0)
    return (summed,)


# -- ReverseSequence ------------------------------------------------------------------------

@op("ReverseSequence", since=10, differentiable=("input",))
def ReverseSequence(xp, input, sequence_lens, *, batch_axis=1, time_axis=0):
    y = input.copy()
    steps = input.shape[time_axis]
    for b, n in enumerate(int(v) for v in sequence_lens.tolist()):
        n = max(0, min(n, steps))
        src = [slice(None)] * input.ndim
        src[batch_axis] = b
        src[time_axis] = slice(n - 1, None, -1) if n else slice(0, 0)
        dst = list(src)
        dst[time_axis] = slice(0, n)
        y[tuple(dst)] = input[tuple(src)]
    return (y,)


@ReverseSequence.gradient
def _(g, node, dY):
    # Reversing the first n steps is its own inverse (and adjoint).
    return (g.op("ReverseSequence", dY, node.inputs[1], batch_axis=node.attrs["batch_axis"],
                 time_axis=node.attrs["time_axis"]), None)


# -- constants and sizes ----------------------------------------------------------------------

def _scalar(value, name: str):
    """A one-element host tensor as a 0-d array of its own element type."""
    a = np.asarray(to_host(value))
    if a.size != 1:
        raise ValueError(f"Range: {name} must be a scalar, got shape {list(a.shape)}")
    return a.reshape(())


@op("Range", since=11, differentiable=("start", "delta"),
    host_inputs=("start", "limit", "delta"))
def Range(xp, start, limit, delta):
    # Scalars by the spec; exporters also feed one-element 1-D tensors (which int()
    # rejects from NumPy 2.4 on), so read the single element explicitly.
    start, limit, delta = (_scalar(v, name) for v, name in
                           ((start, "start"), (limit, "limit"), (delta, "delta")))
    dtype = start.dtype
    if dtype.kind in "iu":
        out = np.arange(int(start), int(limit), int(delta), dtype=dtype)
        return (out,)  # an index or shape vector: stays on the host
    count = max(int(math.ceil((float(limit) - float(start)) / float(delta))), 0)
    out = (start + delta * np.arange(count, dtype=dtype)).astype(dtype)
    return (xp.asarray(out),)


@Range.gradient
def _(g, node, dY):
    # Y[i] = start + i * delta; limit only sets the count (a step function: no gradient).
    start, limit, delta = node.inputs
    count = std.cast_like(g, g.Size(node.outputs[0], dtype="int64"), start)
    steps = g.Range(std.like(g, 0, start), count, std.like(g, 1, start))
    dstart = g.ReduceSum(dY, keepdims=0)
    ddelta = g.ReduceSum(g.Mul(dY, steps), keepdims=0)
    return (g.Reshape(dstart, g.shape_of(start)), None, g.Reshape(ddelta, g.shape_of(delta)))


@op("ConstantOfShape", since=9, host_inputs=("input",))
def ConstantOfShape(xp, input, *, value=None):
    shape = tuple(ints(input))
    fill = np.zeros(1, dtype=np.float32) if value is None else np.asarray(value).reshape(-1)
    if fill.dtype.kind in "biu" and math.prod(shape) <= HOST_LIMIT:
        return (np.full(shape, fill[0], dtype=fill.dtype),)  # shape arithmetic: host
    return (xp.full(shape, fill[0].item(), dtype=fill.dtype),)


@op("EyeLike", since=9)
def EyeLike(xp, input, *, dtype=None, k=0):
    from onnx.helper import tensor_dtype_to_np_dtype  # noqa: PLC0415 - type codes only

    if input.ndim != 2:
        raise ModelError(f"EyeLike needs a 2-D input, got shape {list(input.shape)}")
    out_dtype = input.dtype if dtype is None else tensor_dtype_to_np_dtype(int(dtype))
    return (xp.eye(input.shape[0], input.shape[1], k=k).astype(out_dtype),)


@op("Size", since=1)
def Size(xp, data):
    return (np.array(math.prod(data.shape), dtype=np.int64),)


# -- Einsum (the gradient rule is in ops/math.py) ------------------------------------------------

@op("Einsum", since=12, differentiable=("Inputs",))
def Einsum(xp, *Inputs, equation):
    mod, arrays = on(xp, *Inputs)
    dtype = arrays[0].dtype
    if dtype.kind not in "biufc":  # e.g. bfloat16, which einsum does not take
        arrays = [a.astype("float32") for a in arrays]
    out = mod.einsum(equation.replace(" ", ""), *arrays)
    return (mod.asarray(out).astype(dtype, copy=False),)
