"""Scatter (opset 9, the deprecated name of ScatterElements) and TensorScatter (opset 24).

TensorScatter writes ``update`` into a copy of ``past_cache`` (a KV cache)
along ``axis``, starting at ``write_indices[b]`` for batch ``b`` (wrapping
around the axis in ``circular`` mode).  Its gradient is one private op: for
``update``, ``dY`` gathered at the written positions; for ``past_cache``,
``dY`` with those positions zeroed.
"""

from __future__ import annotations

from onnxgrad.ops.indexing import ScatterElements
from onnxgrad.ops.registry import op
from onnxgrad.ops.tensor import norm_axis, zeros_like_value


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
