"""Helpers for writing ops in standard ONNX ops (see ``OpDef.in_standard_ops``).

An op's standard form appends nodes through the gradient builder ``g`` and
returns its output names.  The nodes are of the default domain at opset 18 or
later (reductions take their axes as an input); they may include private
nodes that have a standard form of their own, which are expanded in turn.
Ranks come from the graph's static shapes where known, else from ``Shape``
nodes at run time.
"""

from __future__ import annotations

from typing import Any

import numpy as np  # host constants for attributes
from onnx import helper

#: The largest int64, the end of an open slice.
END = (1 << 63) - 1


def tensor_type(dtype: Any) -> int:
    """ONNX's element type code for a NumPy dtype (Cast's ``to``)."""
    return helper.np_dtype_to_tensor_dtype(np.dtype(dtype))


def i64(g, value: int) -> str:
    """A 0-d int64 constant."""
    return g.const(value, dtype="int64")


def rank(g, value: str) -> str:
    """The rank of ``value`` as a 0-d int64 value (a constant where known)."""
    r = g.rank(value)
    if r is not None:
        return i64(g, r)
    return g.Size(g.Shape(value, dtype="int64"), dtype="int64")


def axes_from(g, value: str, start: int, skip_channel: bool = False) -> str:
    """Axes ``start``… to the last of ``value`` (axis 0 and 2… with ``skip_channel``)
    as a 1-D int64 value."""
    r = g.rank(value)
    if r is not None:
        axes = ([0] if skip_channel else []) + list(range(start, r))
        return g.ints(axes)
    tail = g.Range(i64(g, start), rank(g, value), i64(g, 1), dtype="int64")
    return g.Concat(g.ints([0]), tail, axis=0, dtype="int64") if skip_channel else tail


def trailing_axes(g, value: str, axis: int) -> str:
    """The axes from ``axis`` (negative: counted from the end) to the last."""
    if axis >= 0:
        return axes_from(g, value, axis)
    r = g.rank(value)
    if r is not None:
        return g.ints(range(r + axis, r))
    start = g.Add(rank(g, value), i64(g, axis), dtype="int64")
    return g.Range(start, rank(g, value), i64(g, 1), dtype="int64")


def like(g, value: float, of: str) -> str:
    """A 0-d constant with the element type of ``of``."""
    return g.scalar(value, like=of)


def cast_like(g, value: str, of: str) -> str:
    """``value`` cast to the element type of ``of``."""
    return g.Cast(value, to=tensor_type(g.dtype(of)), dtype=g.dtype(of))


def zeros(g, shape: str, of: str) -> str:
    """Zeros of the int64 shape value ``shape``, of the element type of ``of``."""
    return g.ConstantOfShape(shape, value=np.zeros(1, dtype=g.dtype(of)), dtype=g.dtype(of))


def as_shape_of(g, value: str, shape_of: str) -> str:
    """``value`` reshaped to the shape of ``shape_of``."""
    return g.Reshape(value, g.Shape(shape_of, dtype="int64"))


def tensor_shape(g, value: str) -> tuple | None:
    """The static shape of a tensor value (an initializer's exactly), or None."""
    if value in g.graph.initializers:
        return tuple(g.graph.initializers[value].shape)
    return g.shape(value)


def shape_value(g, value: str) -> tuple | None:
    """The contents of an int64 shape value where they are static: a constant, or the
    output of a Shape node whose input's shape is known (dims may be symbolic)."""
    if value in g.graph.initializers:
        return tuple(int(d) for d in g.graph.initializers[value].reshape(-1))
    for node in g.graph.nodes:
        if value in node.outputs and node.op_type == "Shape" and node.domain == "":
            if node.attrs.get("start") is None and node.attrs.get("end") is None:
                return tensor_shape(g, node.inputs[0])
    return None


def repeat_heads(g, value: str, heads: int, reps: int) -> str:
    """``value`` (batch, ``heads``, …) with each head repeated ``reps`` times in a row, as
    ``xp.repeat(value, reps, axis=1)``: grouped-query attention's shared key and value
    heads, one per query head."""
    if reps == 1:
        return value
    big = g.Expand(g.Unsqueeze(value, g.ints([2])), g.ints([1, 1, reps, 1, 1]))
    target = g.Concat(g.Shape(value, start=0, end=1, dtype="int64"), g.ints([heads * reps]),
                      g.Shape(value, start=2, dtype="int64"), axis=0, dtype="int64")
    return g.Reshape(big, target)


def collect_heads(g, value: str, heads: int, reps: int) -> str:
    """The adjoint of :func:`repeat_heads`: ``value`` (batch, heads·reps, …) summed over
    each run of ``reps`` heads, down to ``heads`` heads."""
    if reps == 1:
        return value
    target = g.Concat(g.Shape(value, start=0, end=1, dtype="int64"), g.ints([heads, reps]),
                      g.Shape(value, start=2, dtype="int64"), axis=0, dtype="int64")
    return g.ReduceSum(g.Reshape(value, target), g.ints([2]), keepdims=0)
