"""Reductions: ReduceSum, ReduceMean, ArgMax.

``axes`` is an attribute up to ReduceSum-11 / ReduceMean-13 and an optional
host input from ReduceSum-13 / ReduceMean-18 on, where ``noop_with_empty_axes``
decides whether an empty ``axes`` reduces everything or nothing.

Gradients put the reduced axes back (``Unsqueeze`` when ``keepdims=0``) and
broadcast to the input's shape with the private ``onnxgrad::BroadcastTo`` (or
``onnxgrad::ReduceMeanGrad``, which also divides by the number of elements
averaged, known only at run time when shapes are dynamic).
"""

from __future__ import annotations

from onnxgrad.ops import standard as std
from onnxgrad.ops.registry import op


def _axes(ndim: int, axes, noop_with_empty_axes: int):
    """The axes to reduce as a tuple; None means all; () means none."""
    if axes is None or len(axes) == 0:
        return () if noop_with_empty_axes else None
    out = tuple(sorted(int(a) + ndim if int(a) < 0 else int(a) for a in axes))
    if any(not 0 <= a < ndim for a in out) or len(set(out)) != len(out):
        raise ValueError(f"bad reduction axes {list(axes)} for rank {ndim}")
    return out


def _sum(xp, data, axes, keepdims):
    if axes == ():
        return data
    return xp.asarray(xp.sum(data, axis=axes, keepdims=bool(keepdims), dtype=data.dtype))


def _mean(xp, data, axes, keepdims):
    if axes == ():
        return data
    return xp.asarray(xp.mean(data, axis=axes, keepdims=bool(keepdims), dtype=data.dtype))


@op("ReduceSum", since=1, differentiable=("data",))
def ReduceSum(xp, data, *, axes=None, keepdims=1):
    return (_sum(xp, data, _axes(data.ndim, axes, 0), keepdims),)


@op("ReduceSum", since=13, differentiable=("data",), host_inputs=("axes",))
def ReduceSum13(xp, data, axes=None, *, keepdims=1, noop_with_empty_axes=0):
    return (_sum(xp, data, _axes(data.ndim, axes, noop_with_empty_axes), keepdims),)


@op("ReduceMean", since=1, differentiable=("data",))
def ReduceMean(xp, data, *, axes=None, keepdims=1):
    return (_mean(xp, data, _axes(data.ndim, axes, 0), keepdims),)


@op("ReduceMean", since=18, differentiable=("data",), host_inputs=("axes",))
def ReduceMean18(xp, data, axes=None, *, keepdims=1, noop_with_empty_axes=0):
    return (_mean(xp, data, _axes(data.ndim, axes, noop_with_empty_axes), keepdims),)


def _reduce_rule(private: str, axes_input: bool):
    def rule(g, node, dY):
        X = node.inputs[0]
        if axes_input:                                 # axes as an input (or omitted)
            axes = node.inputs[1] if len(node.inputs) > 1 and node.inputs[1] else None
        else:                                          # axes as an attribute
            attr = node.attrs["axes"]
            axes = g.ints(attr) if attr else None
        if axes is not None and not node.attrs["keepdims"]:
            # Put the reduced axes back. With empty axes (all reduced, or none
            # with noop_with_empty_axes) Unsqueeze changes nothing, as needed.
            dY = g.Unsqueeze(dY, axes)
        dX = g.private(private, dY, g.shape_of(X))
        return (dX,) + (None,) * (len(node.inputs) - 1)
    return rule


ReduceSum.gradient(_reduce_rule("BroadcastTo", axes_input=False))
ReduceSum13.gradient(_reduce_rule("BroadcastTo", axes_input=True))
ReduceMean.gradient(_reduce_rule("ReduceMeanGrad", axes_input=False))
ReduceMean18.gradient(_reduce_rule("ReduceMeanGrad", axes_input=True))


@op("BroadcastTo", domain="onnxgrad", host_inputs=("shape",))
def BroadcastTo(xp, X, shape):
    """``X`` broadcast to ``shape``, as a new (writable, contiguous) array."""
    target = tuple(int(d) for d in shape)
    if tuple(X.shape) == target:
        return (X,)
    out = xp.empty(target, dtype=X.dtype)
    out[...] = X
    return (out,)


@BroadcastTo.in_standard_ops
def _(g, node):
    X, shape = node.inputs
    return (g.Expand(X, shape),)


@op("ReduceMeanGrad", domain="onnxgrad", host_inputs=("shape",))
def ReduceMeanGrad(xp, dY, shape):
    """The gradient of a mean: ``dY`` broadcast to ``shape``, divided by the count averaged."""
    target = tuple(int(d) for d in shape)
    size = 1
    for d in target:
        size *= d
    count = size // max(int(dY.size), 1)
    out = xp.empty(target, dtype=dY.dtype)
    out[...] = dY
    if count != 1:
        out /= count
    return (out,)


@ReduceMeanGrad.in_standard_ops
def _(g, node):
    dY, shape = node.inputs
    count = g.Div(g.ReduceProd(shape, keepdims=0), g.Size(dY, dtype="int64"), dtype="int64")
    return (g.Div(g.Expand(dY, shape), std.cast_like(g, count, dY)),)


# -- ArgMax -------------------------------------------------------------------------------

def arg_extreme(xp, pick, data, axis, keepdims, select_last_index):
    """ArgMax/ArgMin's int64 index of ``pick`` (xp.argmax or xp.argmin) along ``axis``;
    the last occurrence with ``select_last_index``."""
    axis = axis + data.ndim if axis < 0 else axis
    if select_last_index:
        index = data.shape[axis] - 1 - pick(xp.flip(data, axis=axis), axis=axis)
    else:
        index = pick(data, axis=axis)
    index = xp.asarray(index).astype("int64")
    if keepdims:
        index = xp.expand_dims(index, axis)
    return index


@op("ArgMax", since=1)  # integer output: nothing to differentiate
def ArgMax(xp, data, *, axis=0, keepdims=1, select_last_index=0):
    return (arg_extreme(xp, xp.argmax, data, axis, keepdims, select_last_index),)
