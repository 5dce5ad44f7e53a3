"""Indexing: Gather, GatherElements, GatherND, ScatterElements, ScatterND,
Scatter, TensorScatter, Where, OneHot, TopK, NonZero, Compress, Unique, Trilu,
CumSum, CumProd and ArgMin.

Gradients of the gathers scatter and *add* into the positions read, so an
index that repeats (a token that occurs twice in a batch) collects every
contribution.  The private ``onnxgrad::*Grad`` kernels here do that with
``xp.bincount`` over flat positions (``add.at`` on CuPy, whose bincount reads the host).
ScatterElements and ScatterND have gradients for every reduction (none, add,
mul, max, min; see :func:`_reduction_gradients`), written in standard ops;
Scatter (opset 9) is the deprecated name of ScatterElements.

TensorScatter (opset 24) writes ``update`` into a copy of ``past_cache`` (a KV
cache) along ``axis``, starting at ``write_indices[b]`` for batch ``b``
(wrapping around the axis in ``circular`` mode).  Its gradient is one private
op: for ``update``, ``dY`` gathered at the written positions; for
``past_cache``, ``dY`` with those positions zeroed.  Compress's gradient puts
``dY`` back where Compress took it from (private ``CompressGrad``).

CumSum's gradient is the running sum in the other direction; CumProd's
(opset 26, private ``CumProdGrad``) needs no division, so inputs may be zero.
Its standard-op form runs the products and the recurrence in doubling steps
along the axis, whose length must then be static.

Index inputs may be negative (counted from the end, opset 11 on); the kernels
normalise them.  Shape-arithmetic operands that live on the host stay there
(see :func:`onnxgrad.ops.tensor.on`).
"""

from __future__ import annotations

import math

import numpy as np  # the host fallback of scatter reductions CuPy lacks (see _apply_at)

from onnxgrad.ops.reduce import (arg_extreme, constant_value, linear_recurrence, running_product,
                                 shifted)
from onnxgrad.ops import standard as std
from onnxgrad.ops.registry import op
from onnxgrad.ops.tensor import to_host, ints, norm_axis, on, zeros_like_value


def _wrap(mod, indices, dim):
    """``indices`` as int64 with negative entries counted from the end of ``dim``."""
    idx = indices.astype("int64", copy=False)
    return mod.where(idx < 0, idx + dim, idx)


def _scatter_add(xp, size: int, positions, values, dtype):
    """A flat array of ``size`` zeros plus ``values`` added at ``positions`` (repeats add up)."""
    if xp.__name__ != "numpy":  # CuPy's bincount reads the largest position on the host
        flat = xp.zeros(size, dtype=dtype)
        xp.add.at(flat, positions.reshape(-1), values.reshape(-1).astype(dtype, copy=False))
        return flat
    flat = xp.bincount(positions.reshape(-1), weights=values.reshape(-1), minlength=size)
    return flat.astype(dtype, copy=False)


def _grids(xp, shape, axis=None, replace=None):
    """Open index grids over ``shape`` (one per axis), optionally replacing that of ``axis``."""
    rank = len(shape)
    grids = []
    for d, n in enumerate(shape):
        if d == axis:
            grids.append(replace)
        else:
            grids.append(xp.arange(n, dtype="int64").reshape([n if i == d else 1 for i in range(rank)]))
    return grids


def _flat_position(grids, shape):
    """Row-major flat position of the multi-index ``grids`` into an array of ``shape``."""
    position, stride = 0, 1
    for g, n in zip(reversed(grids), reversed(shape)):
        position = position + g * stride
        stride *= n
    return position


# -- Gather -------------------------------------------------------------------------

@op("Gather", since=1, differentiable=("data",))
def Gather(xp, data, indices, *, axis=0):
    mod, (data, indices) = on(xp, data, indices)
    axis = norm_axis(axis, data.ndim)
    idx = _wrap(mod, indices, data.shape[axis])
    return (mod.asarray(mod.take(data, idx, axis=axis)),)


@Gather.gradient
def _(g, node, dY):
    data, indices = node.inputs
    return (g.private("GatherGrad", dY, indices, g.shape_of(data), axis=node.attrs["axis"]), None)


@op("GatherGrad", domain="onnxgrad", host_inputs=("shape",))
def GatherGrad(xp, dY, indices, shape, *, axis=0):
    """The gradient of Gather: ``dY`` added into zeros of ``shape`` at ``indices`` on ``axis``."""
    shape = tuple(ints(shape))
    axis = norm_axis(axis, len(shape))
    idx = _wrap(xp, xp.asarray(indices), shape[axis]).reshape(1, -1, 1)
    outer = 1
    for d in shape[:axis]:
        outer *= d
    inner = 1
    for d in shape[axis + 1:]:
        inner *= d
    n = shape[axis]
    positions = (xp.arange(outer, dtype="int64").reshape(-1, 1, 1) * n + idx) * inner \
        + xp.arange(inner, dtype="int64").reshape(1, 1, -1)
    size = outer * n * inner
    return (_scatter_add(xp, size, positions, dY, dY.dtype).reshape(shape),)


@GatherGrad.in_standard_ops
def _(g, node):
    # Along axis 0: dY holds one row of X per index; ScatterND adds each into zeros.
    dY, indices, shape = node.inputs
    if node.attrs.get("axis", 0) != 0:
        return None
    index = g.Reshape(g.Cast(indices, to=std.tensor_type("int64"), dtype="int64"),
                      g.ints([-1, 1]))
    rows = g.Slice(shape, g.ints([0]), g.ints([1]))
    index = g.Where(g.Less(index, g.ints([0]), dtype="bool"), g.Add(index, rows), index)
    updates = g.Reshape(dY, g.Concat(g.ints([-1]), g.Slice(shape, g.ints([1]), g.ints([std.END])),
                                     axis=0, dtype="int64"))
    return (g.ScatterND(std.zeros(g, shape, dY), index, updates, reduction="add"),)


# -- GatherElements --------------------------------------------------------------------------

@op("GatherElements", since=11, differentiable=("data",))
def GatherElements(xp, data, indices, *, axis=0):
    mod, (data, indices) = on(xp, data, indices)
    axis = norm_axis(axis, data.ndim)
    idx = _wrap(mod, indices, data.shape[axis])
    return (mod.take_along_axis(data, idx, axis=axis),)


@GatherElements.gradient
def _(g, node, dY):
    data, indices = node.inputs
    return (g.private("GatherElementsGrad", dY, indices, g.shape_of(data),
                      axis=node.attrs["axis"]), None)


def _elements_positions(xp, indices, shape, axis):
    idx = _wrap(xp, xp.asarray(indices), shape[axis])
    return _flat_position(_grids(xp, idx.shape, axis, idx), shape)


@op("GatherElementsGrad", domain="onnxgrad", host_inputs=("shape",))
def GatherElementsGrad(xp, dY, indices, shape, *, axis=0):
    """The gradient of GatherElements (and of TopK's values): a scatter-add along ``axis``."""
    shape = tuple(ints(shape))
    axis = norm_axis(axis, len(shape))
    positions = _elements_positions(xp, indices, shape, axis)
    size = 1
    for d in shape:
        size *= d
    return (_scatter_add(xp, size, positions, dY, dY.dtype).reshape(shape),)


@GatherElementsGrad.in_standard_ops
def _(g, node):
    dY, indices, shape = node.inputs
    static = std.shape_value(g, shape)
    if static is None:
        return None
    axis = node.attrs.get("axis", 0)
    axis = axis + len(static) if axis < 0 else axis
    index = g.Cast(indices, to=std.tensor_type("int64"), dtype="int64")
    size = g.Slice(shape, g.ints([axis]), g.ints([axis + 1]))
    index = g.Where(g.Less(index, g.const(0, dtype="int64"), dtype="bool"), g.Add(index, size),
                    index)
    return (g.ScatterElements(std.zeros(g, shape, dY), index, dY, axis=axis, reduction="add"),)


# -- GatherND ---------------------------------------------------------------------------------

def _nd_rows(mod, data_shape, indices, batch_dims):
    """(batch count, row count, inner size, rows) of a GatherND/ScatterND: ``rows`` are the
    flat positions (per batch) of the slices that ``indices`` address, shaped
    ``indices.shape[:-1]`` flattened to (batch, -1)."""
    b = int(batch_dims)
    k = int(indices.shape[-1])
    if b + k > len(data_shape):
        raise ValueError(f"GatherND/ScatterND: index depth {k} with {b} batch dims exceeds "
                         f"data rank {len(data_shape)}")
    nb = 1
    for d in data_shape[:b]:
        nb *= d
    idx = indices.astype("int64", copy=False).reshape(nb, -1, k)
    rows, stride = 0, 1
    for j in range(k - 1, -1, -1):
        dim = data_shape[b + j]
        rows = rows + _wrap(mod, idx[:, :, j], dim) * stride
        stride *= dim
    if k == 0:
        rows = mod.zeros(idx.shape[:2], dtype="int64")
    inner = 1
    for d in data_shape[b + k:]:
        inner *= d
    return nb, stride, inner, rows


@op("GatherND", since=11, differentiable=("data",))
def GatherND(xp, data, indices, *, batch_dims=0):
    mod, (data, indices) = on(xp, data, indices)
    nb, nrows, inner, rows = _nd_rows(mod, data.shape, indices, batch_dims)
    k = int(indices.shape[-1])
    flat = data.reshape(nb, nrows, inner)
    out = flat[mod.arange(nb).reshape(-1, 1), rows]
    shape = tuple(indices.shape[:-1]) + tuple(data.shape[int(batch_dims) + k:])
    return (out.reshape(shape),)


@GatherND.gradient
def _(g, node, dY):
    data, indices = node.inputs
    return (g.private("GatherNDGrad", dY, indices, g.shape_of(data),
                      batch_dims=node.attrs["batch_dims"]), None)


def _nd_positions(xp, shape, indices, batch_dims):
    nb, nrows, inner, rows = _nd_rows(xp, shape, xp.asarray(indices), batch_dims)
    base = (xp.arange(nb, dtype="int64").reshape(-1, 1) * nrows + rows)[..., None]
    return base * inner + xp.arange(inner, dtype="int64"), nb * nrows * inner


@op("GatherNDGrad", domain="onnxgrad", host_inputs=("shape",))
def GatherNDGrad(xp, dY, indices, shape, *, batch_dims=0):
    """The gradient of GatherND: ``dY`` added into zeros of ``shape`` at the addressed slices."""
    shape = tuple(ints(shape))
    positions, size = _nd_positions(xp, shape, indices, batch_dims)
    return (_scatter_add(xp, size, positions, dY, dY.dtype).reshape(shape),)


@GatherNDGrad.in_standard_ops
def _(g, node):
    # ScatterND adds dY into zeros at the addressed slices; batch_dims > 0: the batch
    # axes flattened into one, whose index leads each index tuple.
    dY, indices, shape = node.inputs
    b = int(node.attrs.get("batch_dims", 0))
    end = g.ints([std.END])
    index = g.Cast(indices, to=std.tensor_type("int64"), dtype="int64")
    depth = g.Slice(g.Shape(index, dtype="int64"), g.ints([-1]), end)          # [k]
    dims = g.Slice(shape, g.ints([b]), g.Add(g.ints([b]), depth, dtype="int64"))
    index = g.Where(g.Less(index, g.const(0, dtype="int64")), g.Add(index, dims), index)
    if b == 0:
        return (g.ScatterND(std.zeros(g, shape, dY), index, dY, reduction="add"),)
    batch = g.ReduceProd(g.Slice(shape, g.ints([0]), g.ints([b])), keepdims=1)  # [nb]
    inner = g.Slice(shape, g.ints([b]), end)
    index = g.Reshape(index, g.Concat(batch, g.ints([-1]), depth, axis=0, dtype="int64"))
    rows = g.Range(std.i64(g, 0), g.Reshape(batch, g.ints([])), std.i64(g, 1), dtype="int64")
    rows = g.Expand(g.Reshape(rows, g.ints([-1, 1, 1])),
                    g.Concat(g.Slice(g.Shape(index, dtype="int64"), g.ints([0]), g.ints([2])),
                             g.ints([1]), axis=0, dtype="int64"))
    index = g.Concat(rows, index, axis=-1, dtype="int64")                      # (nb, M, 1 + k)
    tail = g.Slice(shape, g.Add(g.ints([b]), depth, dtype="int64"), end)
    updates = g.Reshape(dY, g.Concat(batch, g.ints([-1]), tail, axis=0, dtype="int64"))
    flat = std.zeros(g, g.Concat(batch, inner, axis=0, dtype="int64"), dY)
    return (g.Reshape(g.ScatterND(flat, index, updates, reduction="add"), shape),)


# -- ScatterElements and ScatterND --------------------------------------------------------------

def _apply_at(mod, flat, positions, updates, reduction):
    positions = positions.reshape(-1)
    updates = updates.reshape(-1)
    if reduction == "none":
        flat[positions] = updates
    elif reduction == "add":
        flat += _scatter_add(mod, flat.size, positions, updates, flat.dtype)
    else:
        ufunc = {"mul": mod.multiply, "max": mod.maximum, "min": mod.minimum}.get(reduction)
        if ufunc is None:
            raise ValueError(f"unknown reduction {reduction!r}")
        try:
            ufunc.at(flat, positions, updates)
        except (AttributeError, NotImplementedError):
            # CuPy has no multiply.at: this rare reduction runs on the host.
            host = to_host(flat)
            host_ufunc = {"mul": np.multiply, "max": np.maximum, "min": np.minimum}[reduction]
            host_ufunc.at(host, to_host(positions), to_host(updates))
            flat[...] = mod.asarray(host)
    return flat


@op("ScatterElements", since=11, differentiable=("data", "updates"))
def ScatterElements(xp, data, indices, updates, *, axis=0, reduction="none"):
    mod, (data, indices, updates) = on(xp, data, indices, updates)
    axis = norm_axis(axis, data.ndim)
    positions = _elements_positions(mod, indices, data.shape, axis)
    positions = mod.broadcast_to(positions, indices.shape)
    flat = data.reshape(-1).copy()
    return (_apply_at(mod, flat, positions, updates, reduction).reshape(data.shape),)


@ScatterElements.gradient
def _(g, node, dY):
    data, indices, updates = node.inputs
    reduction, axis = node.attrs["reduction"], node.attrs["axis"]
    if reduction in ("mul", "max", "min"):
        return _reduction_gradients(
            g, node, dY, lambda x: g.GatherElements(x, indices, axis=axis),
            lambda base, values, how: g.ScatterElements(base, indices, values, axis=axis,
                                                        reduction=how))
    dupdates = g.GatherElements(dY, indices, axis=axis)
    ddata = dY if reduction == "add" else g.ScatterElements(
        dY, indices, zeros_like_value(g, updates), axis=axis)
    return (ddata, None, dupdates)


@op("ScatterND", since=11, differentiable=("data", "updates"))
def ScatterND(xp, data, indices, updates, *, reduction="none"):
    mod, (data, indices, updates) = on(xp, data, indices, updates)
    positions, _ = _nd_positions(mod, data.shape, indices, 0)
    flat = data.reshape(-1).copy()
    return (_apply_at(mod, flat, positions, updates, reduction).reshape(data.shape),)


@ScatterND.gradient
def _(g, node, dY):
    data, indices, updates = node.inputs
    reduction = node.attrs["reduction"]
    if reduction in ("mul", "max", "min"):
        return _reduction_gradients(
            g, node, dY, lambda x: g.GatherND(x, indices),
            lambda base, values, how: g.ScatterND(base, indices, values, reduction=how))
    dupdates = g.GatherND(dY, indices)
    ddata = dY if reduction == "add" else g.ScatterND(dY, indices, zeros_like_value(g, updates))
    return (ddata, None, dupdates)


def _reduction_gradients(g, node, dY, gather, scatter):
    """Gradients of ``data`` and ``updates`` for a scatter that reduces with mul, max or min.

    ``gather(x)`` reads ``x`` at the position each update goes to; ``scatter(base,
    values, reduction)`` is the node's scatter with another reduction.  For mul, each
    factor's gradient is ``dY`` times the other factors at its position, computed
    without dividing by zero: the product of the nonzero factors, divided by the
    factor's own value when nonzero, and zero when another factor is zero (PyTorch's
    ``scatter_reduce(..., "prod")`` does the same).  For max and min, the elements
    equal to the result share ``dY`` equally, as with PyTorch's ``scatter_reduce``
    (``"amax"``, ``"amin"``) and onnxgrad's ReduceMax.
    """
    data, _, updates = node.inputs
    zero, one = g.scalar(0, like=updates), g.scalar(1, like=updates)

    def indicator(condition):
        return g.Where(condition, one, zero)

    if node.attrs["reduction"] == "mul":
        ones = g.private("OnesLike", data)
        ddata = g.Mul(dY, scatter(ones, updates, "mul"))
        is_zero = g.Equal(updates, zero, dtype="bool")
        nonzero = g.Where(is_zero, one, updates)
        zero_count = scatter(zeros_like_value(g, data), indicator(is_zero), "add")
        other_zeros = g.Sub(gather(zero_count), indicator(is_zero))
        others = g.Where(g.Equal(other_zeros, zero, dtype="bool"),
                         g.Div(gather(scatter(ones, nonzero, "mul")), nonzero), zero)
        return (ddata, None, g.Mul(gather(g.Mul(dY, data)), others))
    result = node.outputs[0]
    data_won = indicator(g.Equal(data, result, dtype="bool"))
    update_won = indicator(g.Equal(updates, gather(result), dtype="bool"))
    share = g.Div(dY, scatter(data_won, update_won, "add"))
    return (g.Mul(data_won, share), None, g.Mul(update_won, gather(share)))


# -- Scatter (opset 9) ----------------------------------------------------------------------

@op("Scatter", since=9, differentiable=("data", "updates"))
def Scatter(xp, data, indices, updates, *, axis=0):
    return ScatterElements.kernel(xp, data, indices, updates, axis=axis)


@Scatter.gradient
def _(g, node, dY):
    data, indices, updates = node.inputs
    axis = node.attrs["axis"]
    return (g.ScatterElements(dY, indices, zeros_like_value(g, updates), axis=axis), None,
            g.GatherElements(dY, indices, axis=axis))


# -- TensorScatter --------------------------------------------------------------------------

def _index(xp, past_shape, update_shape, write_indices, axis, mode):
    """Advanced indices into the cache viewed as (batch, rest, axis) for the positions
    written, one per element of the update viewed as (batch, rest, length)."""
    if mode not in ("linear", "circular"):
        raise ValueError(f"TensorScatter: unknown mode {mode!r}")
    for i, (p, u) in enumerate(zip(past_shape, update_shape)):
        if i != axis and p != u or i == axis and u > p:
            raise ValueError(f"TensorScatter: update {tuple(update_shape)} does not fit the cache "
                             f"{tuple(past_shape)} along axis {axis}")
    batch, length, size = past_shape[0], update_shape[axis], past_shape[axis]
    rest = 1
    for i in range(1, len(past_shape)):
        if i != axis:
            rest *= past_shape[i]
    start = xp.zeros(batch, dtype="int64") if write_indices is None else \
        xp.asarray(write_indices).reshape(-1).astype("int64", copy=False)
    pos = start[:, None] + xp.arange(length, dtype="int64")[None, :]      # (batch, length)
    if mode == "circular":
        pos = pos % size
    elif length and bool((pos[:, -1] >= size).any()):
        raise ValueError(f"TensorScatter: writing {length} positions from {start.tolist()} "
                         f"overflows the cache axis of length {size} (linear mode)")
    return (xp.arange(batch)[:, None, None], xp.arange(rest)[None, :, None], pos[:, None, :])


def _rows(xp, a, axis):
    """``a`` as (batch, rest, axis): the batch axis first, ``axis`` last."""
    return xp.moveaxis(a, axis, -1).reshape(a.shape[0], -1, a.shape[axis])


def _unrows(xp, rows, shape, axis):
    moved = tuple(d for i, d in enumerate(shape) if i != axis) + (shape[axis],)
    return xp.ascontiguousarray(xp.moveaxis(rows.reshape(moved), -1, axis))


@op("TensorScatter", since=24, differentiable=("past_cache", "update"))
def TensorScatter(xp, past_cache, update, write_indices=None, *, axis=-2, mode="linear"):
    axis = norm_axis(axis, past_cache.ndim)
    if axis == 0:
        raise ValueError("TensorScatter: axis 0 is the batch axis")
    index = _index(xp, past_cache.shape, update.shape, write_indices, axis, mode)
    out = _rows(xp, past_cache, axis).copy()
    out[index] = _rows(xp, update, axis)
    return (_unrows(xp, out, past_cache.shape, axis),)


@TensorScatter.gradient
def _(g, node, dY):
    past, update, *rest = node.inputs
    indices = rest[0] if rest and rest[0] else None
    attrs = dict(axis=node.attrs["axis"], mode=node.attrs["mode"])
    d_past = g.private("TensorScatterGrad", dY, g.shape_of(update), indices, wrt=0, **attrs)
    d_update = g.private("TensorScatterGrad", dY, g.shape_of(update), indices, wrt=1, **attrs)
    return (d_past, d_update) + (None,) * len(rest)


@op("TensorScatterGrad", domain="onnxgrad", host_inputs=("update_shape",))
def TensorScatterGrad(xp, dY, update_shape, write_indices=None, *, axis=-2, mode="linear",
                      wrt=0):
    """wrt=0: ``dY`` with the written positions zeroed; wrt=1: ``dY`` at those positions."""
    axis = norm_axis(axis, dY.ndim)
    shape = tuple(int(d) for d in update_shape)
    index = _index(xp, dY.shape, shape, write_indices, axis, mode)
    rows = _rows(xp, dY, axis)
    if wrt == 1:
        return (_unrows(xp, rows[index], shape, axis),)
    rows = rows.copy()
    rows[index] = 0
    return (_unrows(xp, rows, dY.shape, axis),)


@TensorScatterGrad.in_standard_ops
def _(g, node):
    # The written positions as an update-shaped index along the axis: dY gathered there
    # (GatherElements) for the update, zeros written there (ScatterElements) for the cache.
    dY, update_shape, *rest = node.inputs
    indices = rest[0] if rest and rest[0] else None
    static = std.shape_value(g, update_shape)
    rank = g.rank(dY) if static is None else len(static)
    if rank is None:
        return None
    axis = node.attrs.get("axis", -2)
    axis = axis + rank if axis < 0 else axis
    at = (g.ints([axis]), g.ints([axis + 1]))
    length = g.Reshape(g.Slice(update_shape, *at), g.ints([]))
    pos = g.Range(std.i64(g, 0), length, std.i64(g, 1), dtype="int64")            # (L,)
    if indices is None:
        pos = g.Unsqueeze(pos, g.ints([0]))                                         # (1, L)
    else:
        start = g.Reshape(g.Cast(indices, to=std.tensor_type("int64"), dtype="int64"),
                          g.ints([-1, 1]))
        pos = g.Add(start, pos, dtype="int64")                                      # (B, L)
    if node.attrs.get("mode", "linear") == "circular":
        pos = g.Mod(pos, g.Slice(g.Shape(dY, dtype="int64"), *at), dtype="int64")
    spread = [i for i in range(1, rank) if i != axis]
    if spread:
        pos = g.Unsqueeze(pos, g.ints(spread))
    index = g.Expand(pos, update_shape, dtype="int64")
    if node.attrs.get("wrt", 0) == 1:
        return (g.GatherElements(dY, index, axis=axis),)
    return (g.ScatterElements(dY, index, std.zeros(g, update_shape, dY), axis=axis),)


# -- Where --------------------------------------------------------------------------------------

@op("Where", since=9, differentiable=("X", "Y"))
def Where(xp, condition, X, Y):
    mod, (condition, X, Y) = on(xp, condition, X, Y)
    return (mod.asarray(mod.where(condition, X, Y)),)


@Where.gradient
def _(g, node, dY):
    condition, X, Y = node.inputs
    zero = g.scalar(0, like=dY)
    dtype = g.dtype(dY)
    dX = g.private("SumToShape", g.Where(condition, dY, zero, dtype=dtype), g.shape_of(X))
    dY_ = g.private("SumToShape", g.Where(condition, zero, dY, dtype=dtype), g.shape_of(Y))
    return (None, dX, dY_)


# -- OneHot, TopK, NonZero ------------------------------------------------------------------------

@op("OneHot", since=9, host_inputs=("depth",))
def OneHot(xp, indices, depth, values, *, axis=-1):
    mod, (indices, values) = on(xp, indices, values)
    depth = ints(depth)[0]
    rank = indices.ndim + 1
    axis = norm_axis(axis, rank)
    idx = indices.astype("int64")
    idx = mod.where(idx < 0, idx + depth, idx)
    shape = [1] * rank
    shape[axis] = depth
    classes = mod.arange(depth, dtype="int64").reshape(shape)
    hot = mod.expand_dims(idx, axis) == classes
    return (mod.where(hot, values[1], values[0]).astype(values.dtype),)


def _topk(xp, X, k, axis, largest, sorted_):
    axis = norm_axis(axis, X.ndim)
    k = int(k)
    if not 0 <= k <= X.shape[axis]:
        raise ValueError(f"TopK: k={k} for a dimension of {X.shape[axis]}")
    key = X.astype("int64") if X.dtype.kind == "u" else X
    # A stable sort of -X keeps equal values in index order (lower index first).
    order = xp.argsort(-key if largest else key, axis=axis, kind="stable")
    index = [slice(None)] * X.ndim
    index[axis] = slice(0, k)
    Indices = order[tuple(index)].astype("int64")
    return (xp.take_along_axis(X, Indices, axis=axis), Indices)


@op("TopK", since=1, differentiable=("X",))
def TopK1(xp, X, *, k, axis=-1):
    return _topk(xp, X, k, axis, 1, 1)


@op("TopK", since=10, differentiable=("X",), host_inputs=("K",))
def TopK10(xp, X, K, *, axis=-1):
    return _topk(xp, X, ints(K)[0], axis, 1, 1)


@op("TopK", since=11, differentiable=("X",), host_inputs=("K",))
def TopK(xp, X, K, *, axis=-1, largest=1, sorted=1):
    return _topk(xp, X, ints(K)[0], axis, largest, sorted)


@TopK1.gradient
@TopK10.gradient
@TopK.gradient
def _(g, node, dValues, dIndices=None):
    X = node.inputs[0]
    dX = g.private("GatherElementsGrad", dValues, node.outputs[1], g.shape_of(X),
                   axis=node.attrs["axis"])
    return (dX,) + (None,) * (len(node.inputs) - 1)


@op("NonZero", since=9)
def NonZero(xp, X):
    mod, (X,) = on(xp, X)
    if X.ndim == 0:
        return (mod.zeros((0, int(bool(X))), dtype="int64"),)
    return (mod.stack(mod.nonzero(X)).astype("int64").reshape(X.ndim, -1),)


# -- Compress and Unique --------------------------------------------------------------------

@op("Compress", since=9, differentiable=("input",))
def Compress(xp, input, condition, *, axis=None):
    cond = condition.astype(bool).reshape(-1)
    if axis is None:
        flat = input.reshape(-1)
        return (flat[:cond.size][cond[:flat.size]],)
    axis = axis % input.ndim
    n = input.shape[axis]
    index = xp.nonzero(cond[:n])[0]
    return (xp.take(input, index, axis=axis),)


@Compress.gradient
def _(g, node, dY):
    input, condition = node.inputs
    axis = node.attrs["axis"]
    kw = {} if axis is None else {"axis": axis}
    return (g.private("CompressGrad", dY, g.shape_of(input), condition, **kw), None)


@op("CompressGrad", domain="onnxgrad", host_inputs=("input_shape",))
def CompressGrad(xp, dY, input_shape, condition, *, axis=None):
    """``dY`` put back where Compress took it from, zeros elsewhere."""
    shape = tuple(int(d) for d in input_shape)
    cond = condition.astype(bool).reshape(-1)
    if axis is None:
        size = math.prod(shape)
        flat = xp.zeros(size, dtype=dY.dtype)
        flat[xp.nonzero(cond[:size])[0]] = dY.reshape(-1)
        return (flat.reshape(shape),)
    axis = axis % len(shape)
    dX = xp.zeros(shape, dtype=dY.dtype)
    index = [slice(None)] * len(shape)
    index[axis] = xp.nonzero(cond[:shape[axis]])[0]
    dX[tuple(index)] = dY
    return (dX,)


@CompressGrad.in_standard_ops
def _(g, node):
    """``dY`` scattered into zeros at the positions that ``condition`` (cut to the
    length it covers) selects: ScatterElements along ``axis``, or of the flat input."""
    dY, input_shape, condition = node.inputs
    axis = node.attrs.get("axis")
    cond = g.Reshape(condition, g.ints([-1]))
    if g.dtype(condition) != np.bool_:
        cond = g.Cast(cond, to=std.tensor_type(np.bool_), dtype=np.bool_)
    dX = std.zeros(g, input_shape, dY)
    if axis is None:
        covered = g.ReduceProd(input_shape, keepdims=1)
        index = g.NonZero(g.Slice(cond, g.ints([0]), covered))          # (1, k)
        flat = g.ScatterElements(g.Reshape(dX, g.ints([-1])), g.Reshape(index, g.ints([-1])),
                                 g.Reshape(dY, g.ints([-1])), axis=0)
        return (g.Reshape(flat, input_shape),)
    axis = int(axis)
    end = g.ints([axis + 1 if axis != -1 else std.END])
    covered = g.Slice(input_shape, g.ints([axis]), end)
    index = g.Reshape(g.NonZero(g.Slice(cond, g.ints([0]), covered)), g.ints([-1]))  # (k,)
    # the positions laid along ``axis`` and broadcast over the other axes of dY
    r = std.rank(g, dY)
    at = std.i64(g, axis) if axis >= 0 else g.Add(r, std.i64(g, axis), dtype="int64")
    along = g.Equal(g.Range(std.i64(g, 0), r, std.i64(g, 1), dtype="int64"), at)
    index = g.Reshape(index, g.Where(along, g.ints([-1]), g.ints([1]), dtype="int64"))
    index = g.Expand(index, g.Shape(dY, dtype="int64"))
    return (g.ScatterElements(dX, index, dY, axis=axis),)


@op("Unique", since=11)
def Unique(xp, X, *, axis=None, sorted=1):
    data = X.reshape(-1) if axis is None else X
    a = 0 if axis is None else axis % X.ndim
    y, first, inverse, counts = xp.unique(data, return_index=True, return_inverse=True,
                                          return_counts=True, axis=None if axis is None else a)
    inverse = inverse.reshape(-1)
    if not sorted:  # in order of first occurrence
        order = xp.argsort(first, kind="stable")
        rank = xp.empty_like(order)
        rank[order] = xp.arange(order.size)
        first, counts, inverse = first[order], counts[order], rank[inverse]
        y = xp.take(data, first, axis=a)
    i64 = xp.int64
    return y, first.astype(i64), inverse.astype(i64), counts.astype(i64)


# -- Trilu, CumSum, CumProd, ArgMin ---------------------------------------------------------------

@op("Trilu", since=14, differentiable=("input",), host_inputs=("k",))
def Trilu(xp, input, k=None, *, upper=1):
    k = 0 if k is None else ints(k)[0]
    mod, (x,) = on(xp, input)
    return (mod.triu(x, k) if upper else mod.tril(x, k),)


@Trilu.gradient
def _(g, node, dY):
    extra = node.inputs[1:]
    return (g.Trilu(dY, *extra, upper=node.attrs["upper"]),) + (None,) * len(extra)


@op("CumSum", since=11, differentiable=("x",), host_inputs=("axis",))
def CumSum(xp, x, axis, *, exclusive=0, reverse=0):
    return (running_scan(xp, "cumsum", 0, x, axis, exclusive, reverse),)


def running_scan(xp, scan, identity, x, axis, exclusive, reverse):
    """CumSum/CumProd: ``mod.<scan>`` along ``axis``; ``exclusive`` shifts the result one
    step (``identity`` first), ``reverse`` runs from the end."""
    mod, (x,) = on(xp, x)
    axis = norm_axis(ints(axis)[0], x.ndim)
    y = mod.flip(x, axis) if reverse else x
    y = getattr(mod, scan)(y, axis=axis, dtype=x.dtype)
    if exclusive and x.shape[axis]:
        y = shift_along(mod, y, axis, identity)
    if reverse:
        y = mod.flip(y, axis)
    return mod.ascontiguousarray(y)


def shift_along(mod, y, axis, fill):
    """``y`` moved one step forward along ``axis``, ``fill`` at the start (exclusive scans)."""
    out = mod.empty_like(y)
    head = [slice(None)] * y.ndim
    src, dst = list(head), list(head)
    head[axis] = slice(0, 1)
    src[axis], dst[axis] = slice(0, -1), slice(1, None)
    out[tuple(head)] = fill
    out[tuple(dst)] = y[tuple(src)]
    return out


@CumSum.gradient
def _(g, node, dY):
    x, axis = node.inputs
    a = node.attrs
    # The adjoint of a running sum is the running sum in the other direction.
    return (g.CumSum(dY, axis, exclusive=a["exclusive"], reverse=1 - int(a["reverse"])), None)


@op("CumProd", since=26, differentiable=("x",), host_inputs=("axis",))
def CumProd(xp, x, axis, *, exclusive=0, reverse=0):
    return (running_scan(xp, "cumprod", 1, x, axis, exclusive, reverse),)


@CumProd.gradient
def _(g, node, dY):
    x, axis = node.inputs
    a = node.attrs
    return (g.private("CumProdGrad", dY, x, axis, exclusive=a["exclusive"],
                      reverse=a["reverse"]), None)


@op("CumProdGrad", domain="onnxgrad", host_inputs=("axis",))
def CumProdGrad(xp, dY, x, axis, *, exclusive=0, reverse=0):
    """The gradient of CumProd with respect to ``x``, with no division (inputs may be zero).

    For the inclusive forward running product ``y_i = x_0 ⋯ x_i``,

        dx_k = Σ_{i≥k} dy_i ∂y_i/∂x_k = E_k · S_k,   E_k = x_0 ⋯ x_{k-1},
        S_k = dy_k + x_{k+1} · S_{k+1}               (S_{n-1} = dy_{n-1}),

    a running product and one reverse recurrence along the axis.  ``reverse``
    flips the axis around that; ``exclusive`` shifts ``dy`` by one position
    (``y^excl_i = y^incl_{i-1}``).
    """
    axis = norm_axis(ints(axis)[0], x.ndim)
    x = xp.moveaxis(x, axis, 0)
    d = xp.moveaxis(dY, axis, 0)
    if reverse:
        x, d = x[::-1], d[::-1]
    n = x.shape[0]
    if n == 0:
        return (xp.zeros_like(dY),)
    if exclusive:  # y_i depends on x_0..x_{i-1}: the inclusive case with dy moved back by one
        d = xp.concatenate([d[1:], xp.zeros_like(d[:1])])
    before = shift_along(xp, xp.cumprod(x, axis=0, dtype=x.dtype), 0, 1)  # E_k
    S = xp.empty_like(d)
    S[n - 1] = d[n - 1]
    for k in range(n - 2, -1, -1):
        S[k] = d[k] + x[k + 1] * S[k + 1]
    dx = before * S
    if reverse:
        dx = dx[::-1]
    return (xp.ascontiguousarray(xp.moveaxis(dx, 0, axis)),)


@CumProdGrad.in_standard_ops
def _(g, node):
    # The kernel's E_k · S_k with running products and the recurrence for S in doubling
    # steps along the axis (no division); needs the axis and its length as constants.
    dY, x, axis = node.inputs
    axis = constant_value(g, axis)
    shape = std.tensor_shape(g, x)
    if axis is None or shape is None:
        return None
    try:
        axis = norm_axis(ints(axis)[0], len(shape))
    except ValueError:
        return None
    n = shape[axis]
    if not isinstance(n, int):
        return None
    if n == 0:
        return (dY,)
    reverse = node.attrs.get("reverse", 0)

    def flip(v):
        return g.Slice(v, g.ints([-1]), g.ints([-(1 << 63)]), g.ints([axis]), g.ints([-1]))

    d = dY
    if reverse:
        x, d = flip(x), flip(d)
    if node.attrs.get("exclusive", 0):  # dy moved back by one
        d = shifted(g, d, 1, axis, n, 0.0, forward=False)
    before = running_product(g, x, axis, n)                                        # E_k
    S = linear_recurrence(g, shifted(g, x, 1, axis, n, 0.0, forward=False), d, axis, n)
    dx = g.Mul(before, S)
    return (flip(dx) if reverse else dx,)


@op("ArgMin", since=1)  # integer output: nothing to differentiate
def ArgMin(xp, data, *, axis=0, keepdims=1, select_last_index=0):
    mod, (data,) = on(xp, data)
    norm_axis(axis, data.ndim)  # a clear error for an axis out of range
    return (arg_extreme(mod, mod.argmin, data, axis, keepdims, select_last_index),)
