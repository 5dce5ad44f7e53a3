"""Reductions: ReduceSum, ReduceMean, ReduceMax, ReduceMin, ReduceL1, ReduceL2,
ReduceLogSumExp, ReduceSumSquare, ReduceProd, ReduceLogSum and ArgMax.

ReduceSum and ReduceMean: ``axes`` is an attribute up to ReduceSum-11 /
ReduceMean-13 and an optional host input from ReduceSum-13 / ReduceMean-18 on,
where ``noop_with_empty_axes`` decides whether an empty ``axes`` reduces
everything or nothing.  Their gradients put the reduced axes back
(``Unsqueeze`` when ``keepdims=0``) and broadcast to the input's shape with the
private ``onnxgrad::BroadcastTo`` (or ``onnxgrad::ReduceMeanGrad``, which also
divides by the number of elements averaged, known only at run time when shapes
are dynamic).

The other reductions: ``axes`` is an attribute before opset 18 and an optional
host input from 18 on, where ``noop_with_empty_axes=1`` with empty axes reduces
nothing (the op then applies only its elementwise part, as the ONNX reference
does: ReduceL1 gives ``|x|``).  An empty reduction gives the reduction's
identity (``-inf`` for ReduceMax and ReduceLogSumExp, ``1`` for ReduceProd…).
Every gradient is the private ``onnxgrad::ReduceExtGrad``: ``dY`` (its reduced
axes put back) times the op's local derivative, in one pass.  Where several
elements tie for a maximum or minimum, they share the gradient equally, as
``torch.amax`` does.  Its standard-op form (for step models and higher order)
needs the axes as constants; ReduceProd's also the sizes of the reduced axes, as
it multiplies running products of the elements before and after each one
(:func:`running_product`, no division, so zeros are exact).
"""

from __future__ import annotations

import numpy as np  # host constants of standard forms

from onnxgrad.ops import standard as std
from onnxgrad.ops.registry import op
from onnxgrad.ops.tensor import ints, on


def constant_value(g, value: str | None) -> np.ndarray | None:
    """The contents of ``value`` where the graph fixes them (an initializer, or the
    output of a Constant node), else None: the host inputs that standard forms need
    as constants (pads, axes, scales)."""
    if not value:
        return None
    if value in g.graph.initializers:
        return np.asarray(g.graph.initializers[value])
    for node in g.graph.nodes:
        if value in node.outputs and node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            attrs = node.attrs
            for key, dtype in (("value", None), ("value_float", np.float32),
                               ("value_floats", np.float32), ("value_int", np.int64),
                               ("value_ints", np.int64)):
                if attrs.get(key) is not None:
                    return np.asarray(attrs[key], dtype=dtype)
            return None
    return None


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


# -- ReduceMax, ReduceMin, ReduceL1, ReduceL2, ReduceLogSumExp, ReduceSumSquare, ReduceProd,
#    ReduceLogSum ------------------------------------------------------------------------------

def _reduced_axes(ndim: int, axes, noop_with_empty_axes: int):
    """As :func:`_axes` for the reductions below: the axes to reduce as a sorted tuple
    (read with :func:`ints`); None means all, () none."""
    axes = None if axes is None else ints(axes)
    if not axes:
        return () if noop_with_empty_axes else None
    out = tuple(sorted(a + ndim if a < 0 else a for a in axes))
    if any(not 0 <= a < ndim for a in out) or len(set(out)) != len(out):
        raise ValueError(f"bad reduction axes {axes} for rank {ndim}")
    return out


def _reduce(xp, kind, data, axes, keepdims):
    """Reduce ``data`` over ``axes`` (None: all; (): none) with reduction ``kind``."""
    keep = bool(keepdims)
    x = data
    if axes == ():
        axes_t = ()
    else:
        axes_t = tuple(range(x.ndim)) if axes is None else axes
    if kind in ("max", "min"):
        if axes_t == ():
            return x
        if x.size == 0:
            return _empty(xp, x, axes_t, keep, _lowest(xp, x) if kind == "max" else _highest(xp, x))
        fn = xp.max if kind == "max" else xp.min
        return xp.asarray(fn(x, axis=axes_t, keepdims=keep))
    if kind == "prod":
        return xp.asarray(xp.prod(x, axis=axes_t, keepdims=keep, dtype=x.dtype)) if axes_t else x
    if kind == "logsumexp":
        if x.size == 0:
            return _empty(xp, x, axes_t, keep, float("-inf"))
        if axes_t == ():
            return x
        m = xp.max(x, axis=axes_t, keepdims=True)
        m = xp.where(xp.isfinite(m), m, 0)
        s = xp.sum(xp.exp(x - m), axis=axes_t, keepdims=True)
        out = xp.log(s) + m
        if not keep:
            out = out.reshape(tuple(d for i, d in enumerate(x.shape) if i not in axes_t))
        return xp.asarray(out, dtype=x.dtype)
    pre = {"l1": xp.abs, "l2": lambda v: v * v, "sumsquare": lambda v: v * v,
           "logsum": lambda v: v}[kind](x)
    s = xp.sum(pre, axis=axes_t, keepdims=keep, dtype=x.dtype) if axes_t else pre
    if kind == "l2":
        s = xp.sqrt(s)
    elif kind == "logsum":
        s = xp.log(s)
    return xp.asarray(s).astype(x.dtype, copy=False)


def _lowest(xp, x):
    if x.dtype.kind == "b":
        return False
    return float("-inf") if x.dtype.kind == "f" else xp.iinfo(x.dtype).min


def _highest(xp, x):
    if x.dtype.kind == "b":
        return True
    return float("inf") if x.dtype.kind == "f" else xp.iinfo(x.dtype).max


def _empty(xp, x, axes_t, keep, value):
    shape = tuple(1 if i in axes_t else d for i, d in enumerate(x.shape) if keep or i not in axes_t)
    return xp.full(shape, value, dtype=x.dtype)


def _declare(name, kind, input_from):
    def attr_kernel(xp, data, *, axes=None, keepdims=1):
        mod, (data,) = on(xp, data)
        return (_reduce(mod, kind, data, _reduced_axes(data.ndim, axes, 0), keepdims),)

    def input_kernel(xp, data, axes=None, *, keepdims=1, noop_with_empty_axes=0):
        mod, (data,) = on(xp, data)
        return (_reduce(mod, kind, data, _reduced_axes(data.ndim, axes, noop_with_empty_axes),
                        keepdims),)

    attr_kernel.__name__ = input_kernel.__name__ = name
    old = op(name, since=1, differentiable=("data",))(attr_kernel)
    new = op(name, since=input_from, differentiable=("data",), host_inputs=("axes",))(input_kernel)

    @old.gradient
    def _(g, node, dY):
        X, Y = node.inputs[0], node.outputs[0]
        attr = node.attrs["axes"]
        axes = [g.ints(attr)] if attr else []
        return (g.private("ReduceExtGrad", dY, X, Y, *axes, kind=kind,
                          keepdims=node.attrs["keepdims"]),)

    @new.gradient
    def _(g, node, dY):
        X, Y = node.inputs[0], node.outputs[0]
        axes = [node.inputs[1]] if len(node.inputs) > 1 and node.inputs[1] else []
        return (g.private("ReduceExtGrad", dY, X, Y, *axes, kind=kind,
                          keepdims=node.attrs["keepdims"],
                          noop_with_empty_axes=node.attrs["noop_with_empty_axes"]),) + \
            (None,) * (len(node.inputs) - 1)
    return old, new


ReduceMax1, ReduceMax = _declare("ReduceMax", "max", 18)
ReduceMin1, ReduceMin = _declare("ReduceMin", "min", 18)
ReduceL11, ReduceL1 = _declare("ReduceL1", "l1", 18)
ReduceL21, ReduceL2 = _declare("ReduceL2", "l2", 18)
ReduceLogSumExp1, ReduceLogSumExp = _declare("ReduceLogSumExp", "logsumexp", 18)
ReduceSumSquare1, ReduceSumSquare = _declare("ReduceSumSquare", "sumsquare", 18)
ReduceProd1, ReduceProd = _declare("ReduceProd", "prod", 18)
ReduceLogSum1, ReduceLogSum = _declare("ReduceLogSum", "logsum", 18)


@op("ReduceExtGrad", domain="onnxgrad", host_inputs=("axes",))
def ReduceExtGrad(xp, dY, X, Y, axes=None, *, kind, keepdims=1, noop_with_empty_axes=0):
    """The gradient of the reduction ``kind`` of ``X`` (output ``Y``) over ``axes``."""
    reduced = _reduced_axes(X.ndim, axes, noop_with_empty_axes)
    reduced = tuple(range(X.ndim)) if reduced is None else reduced
    if not keepdims and reduced:  # put the reduced axes back
        shape = tuple(1 if i in reduced else d for i, d in enumerate(X.shape))
        dY, Y = dY.reshape(shape), Y.reshape(shape)
    if kind in ("max", "min"):
        hit = (X == Y).astype(dY.dtype)
        count = hit.sum(axis=reduced, keepdims=True) if reduced else hit
        grad = dY * hit / xp.maximum(count, 1)
    elif kind == "l1":
        grad = dY * xp.sign(X)
    elif kind == "l2":
        safe = xp.where(Y == 0, 1, Y)
        grad = xp.where(Y == 0, 0, dY * X / safe)
    elif kind == "logsumexp":
        grad = dY * xp.exp(X - Y)
    elif kind == "sumsquare":
        grad = dY * 2 * X
    elif kind == "logsum":
        grad = dY / xp.exp(Y)
    elif kind == "prod":
        grad = dY * _others_product(xp, X, reduced)
    else:
        raise ValueError(f"ReduceExtGrad: unknown kind {kind!r}")
    out = xp.empty(X.shape, dtype=X.dtype)
    out[...] = grad
    return (out,)


def _others_product(xp, X, reduced):
    """For each element, the product of the other elements of its reduction group
    (exact where some are zero: products of the elements before and after it)."""
    if not reduced:
        return xp.ones_like(X)
    if X.size == 0:  # an empty group: no element, no gradient
        return xp.zeros_like(X)
    rest = tuple(i for i in range(X.ndim) if i not in reduced)
    perm = rest + tuple(reduced)
    moved = xp.transpose(X, perm)
    lead = moved.shape[:len(rest)]
    flat = moved.reshape(lead + (-1,))
    ones = xp.ones(lead + (1,), dtype=X.dtype)
    before = xp.cumprod(xp.concatenate([ones, flat[..., :-1]], axis=-1), axis=-1)
    after = xp.flip(xp.cumprod(xp.flip(xp.concatenate([flat[..., 1:], ones], axis=-1), -1),
                               axis=-1), -1)
    others = (before * after).reshape(moved.shape)
    inverse = [0] * X.ndim
    for i, p in enumerate(perm):
        inverse[p] = i
    return xp.transpose(others, inverse)


# -- running products in standard ops (ReduceProd's and CumProd's gradients) -------------

def shifted(g, x, steps: int, axis: int, n: int, fill: float, forward: bool = True) -> str:
    """``x`` (of static length ``n`` along ``axis``) moved ``steps`` places towards the
    end (``forward``) or the start, ``fill`` in the places left empty."""
    if forward:
        part = g.Slice(x, g.ints([0]), g.ints([n - steps]), g.ints([axis]))
        pads = [steps, 0]
    else:
        part = g.Slice(x, g.ints([steps]), g.ints([n]), g.ints([axis]))
        pads = [0, steps]
    return g.Pad(part, g.ints(pads), std.like(g, fill, x), g.ints([axis]), mode="constant")


def running_product(g, x, axis: int, n: int, forward: bool = True) -> str:
    """The exclusive running product along ``axis`` (static length ``n``): the product
    of the elements before each one (after it, with ``forward`` False), with no
    division, in ⌈log₂ n⌉ doubling steps."""
    y = shifted(g, x, 1, axis, n, 1.0, forward)
    step = 1
    while step < n:
        y = g.Mul(y, shifted(g, y, step, axis, n, 1.0, forward))
        step *= 2
    return y


def linear_recurrence(g, a, b, axis: int, n: int) -> str:
    """``S`` with ``S_k = b_k + a_k · S_{k+1}`` along ``axis`` (static length ``n``,
    ``S_n = 0``), in ⌈log₂ n⌉ doubling steps: each step composes every affine map
    with the one ``step`` places later."""
    step = 1
    while step < n:
        b = g.Add(b, g.Mul(a, shifted(g, b, step, axis, n, 0.0, forward=False)))
        if step * 2 < n:
            a = g.Mul(a, shifted(g, a, step, axis, n, 0.0, forward=False))
        step *= 2
    return b


def _others_product_standard(g, X, reduced, shape):
    """:func:`_others_product` in standard ops, for static sizes of the reduced axes."""
    rank = len(shape)
    if not reduced:
        return None
    n = 1
    for a in reduced:
        if not isinstance(shape[a], int):
            return None
        n *= shape[a]
    if n == 0:
        return X
    if len(reduced) == 1:
        axis = reduced[0]
        return g.Mul(running_product(g, X, axis, n), running_product(g, X, axis, n, False))
    rest = [i for i in range(rank) if i not in reduced]
    perm = rest + list(reduced)
    moved = g.Transpose(X, perm=perm)
    flat = g.Reshape(moved, g.ints([0] * len(rest) + [n]))
    axis = len(rest)
    others = g.Mul(running_product(g, flat, axis, n), running_product(g, flat, axis, n, False))
    others = g.Reshape(others, g.Shape(moved, dtype="int64"))
    return g.Transpose(others, perm=[perm.index(i) for i in range(rank)])


@ReduceExtGrad.in_standard_ops
def _(g, node):
    dY, X, Y, *rest = node.inputs
    attrs = ReduceExtGrad.resolve_attrs(node.attrs, node.name)
    kind = attrs["kind"]
    rank = g.rank(X)
    axes = constant_value(g, rest[0]) if rest and rest[0] else None
    if rank is None or (rest and rest[0] and axes is None):
        return None
    try:
        reduced = _reduced_axes(rank, axes, attrs["noop_with_empty_axes"])
    except ValueError:
        return None
    reduced = tuple(range(rank)) if reduced is None else reduced
    if not attrs["keepdims"] and reduced:  # put the reduced axes back
        dY, Y = g.Unsqueeze(dY, g.ints(reduced)), g.Unsqueeze(Y, g.ints(reduced))
    zero, one = std.like(g, 0, dY), std.like(g, 1, dY)
    if kind in ("max", "min"):
        hit = std.cast_like(g, g.Equal(X, Y), dY)
        count = g.ReduceSum(hit, g.ints(reduced), keepdims=1) if reduced else hit
        grad = g.Div(g.Mul(dY, hit), g.Max(count, one))
    elif kind == "l1":
        grad = g.Mul(dY, g.Sign(X))
    elif kind == "l2":
        empty = g.Equal(Y, zero)
        grad = g.Where(empty, zero, g.Div(g.Mul(dY, X), g.Where(empty, one, Y)))
    elif kind == "logsumexp":
        grad = g.Mul(dY, g.Exp(g.Sub(X, Y)))
    elif kind == "sumsquare":
        grad = g.Mul(g.Mul(dY, std.like(g, 2, dY)), X)
    elif kind == "logsum":
        grad = g.Div(dY, g.Exp(Y))
    elif kind == "prod":
        shape = std.tensor_shape(g, X)
        others = None if shape is None else _others_product_standard(g, X, reduced, shape)
        if others is None:
            if reduced:
                return None
            others = g.Expand(one, g.Shape(X, dtype="int64"))
        grad = g.Mul(dY, others)
    else:
        return None
    if kind == "logsum":  # the only one whose terms leave out X
        grad = g.Expand(grad, g.Shape(X, dtype="int64"))
    return (grad,)


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
