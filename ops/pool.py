"""Pooling: MaxPool (with Indices), AveragePool, GlobalAveragePool, GlobalMaxPool,
LpPool, GlobalLpPool and MaxUnpool.

Windows are strided slices of the padded input, one per kernel offset (see
``ops/conv.py``): a loop over ``prod(kernel)`` offsets of whole-array
operations.  MaxPool keeps the first maximum of each window (in row-major
kernel order, as PyTorch does); its gradient routes ``dY`` to it.  Gradient
kernels are private ops of the ``onnxgrad`` domain that take the forward
node's attributes and recompute the geometry from the input's shape.  On the
CPU, MaxPool, AveragePool and their gradients over two spatial axes run
compiled loops where compiled kernels are available (``ops/pool_compiled.py``),
with the NumPy forms' results to the bit.  What their calls need besides the arrays
(the window geometry, the compiled kernels' plan) depends on the shapes, dtypes,
attributes, thread count and settings alone, and is made once per such key and
remembered (:func:`_max_pool_plan` and its like), so that a call spends little time
in Python before its kernel runs.

LpPool is ``(Σ_window |x|^p)^(1/p)`` over zero-padded windows, with the window
geometry of AveragePool and MaxPool (auto_pad, pads, strides, dilations,
ceil_mode).  Its gradient is a private op that routes
``dY · Y^(1-p) · |x|^(p-1) · sign(x)`` back through every window (zero where
``Y`` is zero).  GlobalLpPool is the same over the whole spatial extent, with
the same gradient.

MaxUnpool writes each input element at its flat index ``I`` (as MaxPool's
Indices output gives it) in a zero tensor; its gradient gathers ``dY`` at
``I``.

In standard ops (step models, higher order), MaxPool's argmax comes from a MaxPool
node's own Indices, and window sums spread back (AveragePool, LpPool) are a
ConvTranspose with a kernel of ones, which needs static spatial sizes.
"""

from __future__ import annotations

import functools
import itertools
import math

import numpy as np  # host-side window geometry, divisor and index tables

from onnxgrad.ir import ValueInfo
from onnxgrad.ops.conv import _ints, _key, _shape, conv_pads, offset_slices, pad_spatial
from onnxgrad.ops import compiled, pool_compiled
from onnxgrad.ops import standard as std
from onnxgrad.ops.registry import op


def _geometry(x_shape, kernel_shape, auto_pad, ceil_mode, dilations, pads, strides):
    """Spatial input, kernel, strides, dilations, begin pads, explicit end pads, the end
    pads the windows need (more than the explicit ones in ceil mode) and the output size,
    each a tuple of ints."""
    sp = tuple(int(d) for d in x_shape[2:])
    n = len(sp)
    if not kernel_shape or len(kernel_shape) != n:
        raise ValueError(f"pooling needs kernel_shape of length {n}, got {kernel_shape}")
    kernel = tuple(int(k) for k in kernel_shape)
    strides = _ints(strides, n, 1)
    dilations = _ints(dilations, n, 1)
    begin, end = conv_pads(auto_pad, pads, sp, kernel, strides, dilations)
    out, need = [], []
    for i in range(n):
        span = (kernel[i] - 1) * dilations[i] + 1
        room = sp[i] + begin[i] + end[i] - span
        if ceil_mode and auto_pad in ("NOTSET", "", None):
            o = -(-room // strides[i]) + 1
            if (o - 1) * strides[i] >= sp[i] + begin[i]:  # the last window starts in the padding
                o -= 1
        else:
            o = room // strides[i] + 1
        if o <= 0:
            raise ValueError(f"pooling output would be empty: input {sp}, kernel {kernel}")
        out.append(o)
        need.append(max(end[i], (o - 1) * strides[i] + span - sp[i] - begin[i]))
    return (sp, kernel, tuple(strides), tuple(dilations), tuple(begin), tuple(end), tuple(need),
            tuple(out))


#: Plans (window geometry and compiled plan) remembered per op, at most: of the last
#: so many keys (a network's pooling layers, forward and backward, at a few input
#: shapes, dtypes and thread counts).
PLANS_KEPT = 256


@functools.lru_cache(maxsize=PLANS_KEPT)
def _max_pool_plan(x_shape, dtype, kernel_shape, auto_pad, ceil_mode, dilations, pads, strides,
                   indices, storage_order, settings):
    """MaxPool's window geometry for an input of ``x_shape`` and ``dtype`` and the
    attributes (tuples of ints, as :func:`_key` gives them), with Indices where
    ``indices``, and its compiled plan (``pool_compiled.max_pool_plan``; None where the
    NumPy form runs), for ``settings`` (``pool_compiled.settings()``): made once per
    key, the same objects while remembered (:data:`PLANS_KEPT`)."""
    geo = _geometry(x_shape, kernel_shape, auto_pad, ceil_mode, dilations, pads, strides)
    if indices and storage_order:  # column-major Indices: the NumPy form
        return geo, None
    return geo, pool_compiled.max_pool_plan(geo, x_shape, dtype, indices, settings)


@functools.lru_cache(maxsize=PLANS_KEPT)
def _average_pool_plan(x_shape, dtype, kernel_shape, auto_pad, ceil_mode, count_include_pad,
                       dilations, pads, strides, settings):
    """:func:`_max_pool_plan` for AveragePool (``pool_compiled.average_pool_plan``)."""
    geo = _geometry(x_shape, kernel_shape, auto_pad, ceil_mode, dilations, pads, strides)
    if not pool_compiled.runs(geo, x_shape, dtype):
        return geo, None
    return geo, pool_compiled.average_pool_plan(geo, x_shape, dtype,
                                                _divisor(geo, count_include_pad), settings)


@functools.lru_cache(maxsize=PLANS_KEPT)
def _average_pool_grad_plan(dy_shape, dtype, x_shape, kernel_shape, auto_pad, ceil_mode,
                            count_include_pad, dilations, pads, strides, settings):
    """:func:`_max_pool_plan` for AveragePoolGrad of a dY of ``dy_shape`` and ``dtype``
    into X's ``x_shape`` (``pool_compiled.average_pool_grad_plan``)."""
    geo = _geometry(x_shape, kernel_shape, auto_pad, ceil_mode, dilations, pads, strides)
    if dy_shape != x_shape[:2] + geo[-1] or not pool_compiled.runs(geo, dy_shape, dtype):
        return geo, None
    return geo, pool_compiled.average_pool_grad_plan(
        geo, dy_shape, x_shape, dtype, _divisor(geo, count_include_pad), settings)


@functools.lru_cache(maxsize=PLANS_KEPT)
def _indices_grad_plan(dy_shape, dtype, indices_shape, indices_dtype, x_shape, overlapping,
                       settings):
    """MaxPoolIndicesGrad's compiled plan (``pool_compiled.indices_grad_plan``; None where
    the NumPy form runs), made once per key and remembered as :func:`_max_pool_plan`."""
    return pool_compiled.indices_grad_plan(dy_shape, dtype, indices_shape, indices_dtype,
                                           x_shape, overlapping, settings)


def _offsets(kernel):
    return itertools.product(*(range(k) for k in kernel))


def _lowest(xp, dtype):
    return -float("inf") if dtype.kind == "f" else int(np.iinfo(dtype).min)


def _argmax_windows(xp, X, geo):
    """The maximum of each window and the index (row-major in the kernel) of its first
    occurrence."""
    sp, kernel, strides, dilations, begin, end, need, out = geo
    Xp = pad_spatial(xp, X, begin, need, _lowest(xp, X.dtype))
    index_type = np.int8 if math.prod(kernel) <= 127 else np.int32
    best = arg = None
    for k, offset in enumerate(_offsets(kernel)):
        v = Xp[(slice(None), slice(None)) + offset_slices(offset, strides, dilations, out)]
        if best is None:
            best = xp.array(v, copy=True)
            arg = xp.zeros(best.shape, dtype=index_type)
        else:  # in place; a strict > keeps the first maximum's offset
            if v.strides[-1] != v.itemsize:  # strided: one copy, then two contiguous reads
                v = xp.ascontiguousarray(v)
            better = v > best
            xp.maximum(best, v, out=best)
            # arg < k until now, so this sets arg = k where better: arithmetic, not a
            # masked store (a data-dependent branch per element on the CPU)
            xp.maximum(arg, xp.multiply(better, index_type(k)), out=arg)
    return best, arg


def _pool_attrs(node, *names):
    return {k: node.attrs[k] for k in names if node.attrs.get(k) is not None}


# -- MaxPool -------------------------------------------------------------------------------


@op("MaxPool", since=1, differentiable=("X",), train_outputs=2)
def MaxPool(xp, X, *, auto_pad="NOTSET", ceil_mode=0, dilations=None, kernel_shape=None,
            pads=None, storage_order=0, strides=None, ctx):
    indices = ctx.num_outputs >= 2
    geo, plan = _max_pool_plan(X.shape, X.dtype, _key(kernel_shape), auto_pad, ceil_mode,
                               _key(dilations), _key(pads), _key(strides), indices,
                               storage_order, pool_compiled.settings())
    if plan is not None and compiled.available(xp):
        Y, index = pool_compiled.max_pool(X, plan)
        return (Y, index) if indices else (Y,)
    Y, arg = _argmax_windows(xp, X, geo)
    if not indices:
        return (Y,)
    sp, kernel, strides, dilations, begin, end, need, out = geo
    # Flat index of each maximum in X (padding not counted), row-major over N, C and
    # the spatial axes; storage_order=1 orders the spatial axes column-major.  The
    # index is a sum of small host tables: one entry per kernel offset (looked up
    # through the argmax), one per output position, one per (n, c).
    nd = len(sp)
    scales, step = [0] * nd, 1
    for i in (range(nd) if storage_order else reversed(range(nd))):
        scales[i], step = step, step * sp[i]
    per_offset = np.array([sum(o * dilations[i] * scales[i] for i, o in enumerate(offset))
                           for offset in _offsets(kernel)], dtype=np.int64)
    per_position = sum(((np.arange(out[i]) * strides[i] - begin[i]) * scales[i]).reshape(
        (out[i],) + (1,) * (nd - 1 - i)) for i in range(nd))
    N, C = X.shape[:2]
    per_plane = np.arange(N * C, dtype=np.int64).reshape((N, C) + (1,) * nd) * math.prod(sp)
    index = xp.take(xp.asarray(per_offset), arg)  # take: twice as fast as indexing
    index += xp.asarray(per_position)
    index += xp.asarray(per_plane)
    return Y, index


_MAXPOOL_ATTRS = ("auto_pad", "ceil_mode", "dilations", "kernel_shape", "pads", "strides")


@MaxPool.gradient
def _(g, node, dY, dIndices=None):
    X = node.inputs[0]
    attrs = _pool_attrs(node, *_MAXPOOL_ATTRS)
    if node.attrs.get("storage_order") or len(node.outputs) < 2:
        return (g.private("MaxPoolGrad", dY, X, **attrs),)        # recompute the argmax
    # Training graphs carry Indices (train_outputs=2): scatter dY to them.
    overlap = any(s < (k - 1) * d + 1 for s, k, d in _strides_and_spans(node))
    return (g.private("MaxPoolIndicesGrad", dY, node.outputs[1], g.shape_of(X),
                      overlapping=int(overlap)),)


def _strides_and_spans(node):
    kernel = node.attrs["kernel_shape"] or []
    n = len(kernel)
    strides = _ints(node.attrs.get("strides"), n, 1)
    dilations = _ints(node.attrs.get("dilations"), n, 1)
    return zip(strides, kernel, dilations)


@op("MaxPoolIndicesGrad", domain="onnxgrad", host_inputs=("x_shape",))
def MaxPoolIndicesGrad(xp, dY, indices, x_shape, *, overlapping=1):
    """``dY`` summed into X at MaxPool's (row-major) Indices."""
    shape = _shape(x_shape)
    plan = _indices_grad_plan(dY.shape, dY.dtype, indices.shape, indices.dtype, shape,
                              overlapping, pool_compiled.settings())
    if plan is not None and compiled.available(xp):
        dX = pool_compiled.indices_grad(dY, indices, plan)
        if dX is not None:
            return (dX,)
    size = math.prod(shape)
    if overlapping and xp.__name__ != "numpy":  # CuPy's bincount reads the host
        dX = xp.zeros(size, dtype=dY.dtype)
        xp.add.at(dX, indices.reshape(-1), dY.reshape(-1))
        return (dX.reshape(shape),)

    if overlapping:       # an element may be the maximum of several windows
        dX = xp.bincount(indices.reshape(-1), weights=dY.reshape(-1), minlength=size)
        return (dX.astype(dY.dtype, copy=False).reshape(shape),)
    dX = xp.zeros(size, dtype=dY.dtype)
    dX[indices.reshape(-1)] = dY.reshape(-1)
    return (dX.reshape(shape),)


@MaxPoolIndicesGrad.in_standard_ops
def _(g, node):
    # MaxPool's Indices are flat row-major positions in X: scatter-add dY there.
    dY, indices, x_shape = node.inputs
    flat = std.zeros(g, g.ReduceProd(x_shape, keepdims=1), dY)
    flat = g.ScatterElements(flat, g.Reshape(indices, g.ints([-1])),
                             g.Reshape(dY, g.ints([-1])), axis=0, reduction="add")
    return (g.Reshape(flat, x_shape),)


def _scatter(xp, parts, x_shape, geo, dtype):
    """Sum per-offset window gradients back onto X: ``parts(k)`` is offset k's share.

    Windows that do not overlap (stride at least the window's span) receive their
    shares by assignment; windows that also tile the padded input leave no element
    to zero first."""
    sp, kernel, strides, dilations, begin, end, need, out = geo
    nd = len(sp)
    full = tuple(sp[i] + begin[i] + need[i] for i in range(nd))
    spans = [(kernel[i] - 1) * dilations[i] + 1 for i in range(nd)]
    disjoint = all(strides[i] >= spans[i] for i in range(nd))
    tiled = disjoint and all(dilations[i] == 1 and strides[i] == kernel[i]
                             and out[i] * strides[i] == full[i] for i in range(nd))
    dXp = (xp.empty if tiled else xp.zeros)(tuple(x_shape[:2]) + full, dtype=dtype)
    for k, offset in enumerate(_offsets(kernel)):
        where = (slice(None), slice(None)) + offset_slices(offset, strides, dilations, out)
        if disjoint:
            dXp[where] = parts(k)
        else:
            dXp[where] += parts(k)
    return xp.ascontiguousarray(pad_spatial(xp, dXp, [-b for b in begin], [-e for e in need]))


@op("MaxPoolGrad", domain="onnxgrad")
def MaxPoolGrad(xp, dY, X, *, auto_pad="NOTSET", ceil_mode=0, dilations=None,
                kernel_shape=None, pads=None, strides=None):
    geo = _geometry(X.shape, kernel_shape, auto_pad, ceil_mode, dilations, pads, strides)
    _, arg = _argmax_windows(xp, X, geo)
    zero = xp.zeros((), dtype=dY.dtype)
    return (_scatter(xp, lambda k: xp.where(arg == k, dY, zero), X.shape, geo, dY.dtype),)


@MaxPoolGrad.in_standard_ops
def _(g, node):
    # MaxPool's own Indices (row-major, storage_order 0; the first maximum of each
    # window) recompute the argmax; dY is added into X's shape there.
    dY, X = node.inputs
    attrs = _pool_attrs(node, *_MAXPOOL_ATTRS)
    _, indices = g.op("MaxPool", X, num_outputs=2, **attrs)
    g.graph.info[indices] = ValueInfo(np.dtype(np.int64), None)
    shape = g.Shape(X, dtype="int64")
    flat = std.zeros(g, g.ReduceProd(shape, keepdims=1), dY)
    flat = g.ScatterElements(flat, g.Reshape(indices, g.ints([-1])), g.Reshape(dY, g.ints([-1])),
                             axis=0, reduction="add")
    return (g.Reshape(flat, shape),)


# -- AveragePool ---------------------------------------------------------------------------


def _divisor(geo, count_include_pad):
    """How many elements each window averages: an int when every window counts all of
    its ``prod(kernel)`` elements, else a host array of the output's spatial shape."""
    sp, kernel, strides, dilations, begin, end, need, out = geo
    if (not any(begin) and not any(need)) or (count_include_pad and list(need) == list(end)):
        return math.prod(kernel)  # no window reaches into padding that is not counted
    counts = []
    for i in range(len(sp)):
        lo, hi = (-begin[i], sp[i] + end[i]) if count_include_pad else (0, sp[i])
        start = np.arange(out[i]) * strides[i] - begin[i]
        pos = start[:, None] + np.arange(kernel[i])[None, :] * dilations[i]
        counts.append(((pos >= lo) & (pos < hi)).sum(axis=1))
    total = counts[0]
    for c in counts[1:]:
        total = np.multiply.outer(total, c)
    return np.maximum(total, 1)


def _device_divisor(xp, geo, count_include_pad, dtype):
    """:func:`_divisor` as an int, or as an array of ``dtype`` on the device: dividing
    by the int rounds as dividing by an array of it does."""
    divisor = _divisor(geo, count_include_pad)
    return divisor if isinstance(divisor, int) else xp.asarray(divisor.astype(dtype))


@op("AveragePool", since=1, differentiable=("X",))
def AveragePool(xp, X, *, auto_pad="NOTSET", ceil_mode=0, count_include_pad=0, dilations=None,
                kernel_shape=None, pads=None, strides=None):
    geo, plan = _average_pool_plan(X.shape, X.dtype, _key(kernel_shape), auto_pad, ceil_mode,
                                   count_include_pad, _key(dilations), _key(pads),
                                   _key(strides), pool_compiled.settings())
    if plan is not None and compiled.available(xp):
        return (pool_compiled.average_pool(X, plan),)
    sp, kernel, strides, dilations, begin, end, need, out = geo
    Xp = pad_spatial(xp, X, begin, need)
    views = [Xp[(slice(None), slice(None)) + offset_slices(offset, strides, dilations, out)]
             for offset in _offsets(kernel)]
    Y = xp.add(views[0], views[1]) if len(views) > 1 else xp.array(views[0], copy=True)
    for v in views[2:]:
        Y += v
    Y /= _device_divisor(xp, geo, count_include_pad, X.dtype)
    return (Y,)


_AVGPOOL_ATTRS = _MAXPOOL_ATTRS + ("count_include_pad",)


@AveragePool.gradient
def _(g, node, dY):
    X = node.inputs[0]
    return (g.private("AveragePoolGrad", dY, g.shape_of(X), **_pool_attrs(node, *_AVGPOOL_ATTRS)),)


@op("AveragePoolGrad", domain="onnxgrad", host_inputs=("x_shape",))
def AveragePoolGrad(xp, dY, x_shape, *, auto_pad="NOTSET", ceil_mode=0, count_include_pad=0,
                    dilations=None, kernel_shape=None, pads=None, strides=None):
    x_shape = _shape(x_shape)
    geo, plan = _average_pool_grad_plan(dY.shape, dY.dtype, x_shape, _key(kernel_shape),
                                        auto_pad, ceil_mode, count_include_pad, _key(dilations),
                                        _key(pads), _key(strides), pool_compiled.settings())
    if plan is not None and compiled.available(xp):
        return (pool_compiled.average_pool_grad(dY, plan),)
    share = dY / _device_divisor(xp, geo, count_include_pad, dY.dtype)
    return (_scatter(xp, lambda k: share, x_shape, geo, dY.dtype),)


def _static_geometry(g, node, shape):
    """The window geometry of a pooling node for an input of static spatial ``shape``
    (dims may be symbolic only in N and C), or None."""
    if shape is None or not all(isinstance(d, int) for d in shape[2:]):
        return None
    a = node.attrs
    return _geometry(shape, a.get("kernel_shape"), a.get("auto_pad", "NOTSET"),
                     a.get("ceil_mode", 0), a.get("dilations"), a.get("pads"), a.get("strides"))


@AveragePoolGrad.in_standard_ops
def _(g, node):
    # Each window's share of dY spread over the window: a ConvTranspose of the shares
    # with a kernel of ones, per (item, channel) plane.
    dY, x_shape = node.inputs
    geo = _static_geometry(g, node, std.shape_value(g, x_shape))
    if geo is None:
        return None
    divisor = _divisor(geo, node.attrs.get("count_include_pad", 0))
    share = g.Div(dY, g.const(divisor, dtype=g.dtype(dY)))
    return (_spread(g, share, geo, x_shape),)


def _spread(g, share, geo, x_shape):
    """Each window's ``share`` added over the window's elements of X (of shape value
    ``x_shape``), padding dropped: a ConvTranspose with a kernel of ones per plane."""
    sp, kernel, strides, dilations, begin, end, need, out = geo
    planes = g.Reshape(share, g.ints([-1, 1] + list(out)))
    n = len(sp)
    full = [(out[i] - 1) * strides[i] + dilations[i] * (kernel[i] - 1) + 1 for i in range(n)]
    after = [max(0, full[i] - begin[i] - sp[i]) for i in range(n)]
    extra = [sp[i] - (full[i] - begin[i] - after[i]) for i in range(n)]
    ones = g.const(np.ones((1, 1) + tuple(kernel)), dtype=g.dtype(share))
    dX = g.ConvTranspose(planes, ones, strides=list(strides), dilations=list(dilations),
                         pads=list(begin) + after, output_padding=extra)
    return g.Reshape(dX, x_shape)


# -- global pooling ------------------------------------------------------------------------


def _spatial_axes(X):
    return tuple(range(2, X.ndim))


@op("GlobalAveragePool", since=1, differentiable=("X",))
def GlobalAveragePool(xp, X):
    return (xp.asarray(X.mean(axis=_spatial_axes(X), keepdims=True, dtype=X.dtype)),)


@GlobalAveragePool.gradient
def _(g, node, dY):
    return (g.private("GlobalAveragePoolGrad", dY, g.shape_of(node.inputs[0])),)


@op("GlobalAveragePoolGrad", domain="onnxgrad", host_inputs=("x_shape",))
def GlobalAveragePoolGrad(xp, dY, x_shape):
    shape = tuple(int(d) for d in x_shape)
    out = xp.empty(shape, dtype=dY.dtype)
    out[...] = dY / math.prod(shape[2:])
    return (out,)


@GlobalAveragePoolGrad.in_standard_ops
def _(g, node):
    dY, x_shape = node.inputs
    count = g.ReduceProd(g.Slice(x_shape, g.ints([2]), g.ints([std.END])), keepdims=0)
    return (g.Expand(g.Div(dY, std.cast_like(g, count, dY)), x_shape),)


@op("GlobalMaxPool", since=1, differentiable=("X",))
def GlobalMaxPool(xp, X):
    return (xp.asarray(X.max(axis=_spatial_axes(X), keepdims=True)),)


@GlobalMaxPool.gradient
def _(g, node, dY):
    return (g.private("GlobalMaxPoolGrad", dY, node.inputs[0]),)


@op("GlobalMaxPoolGrad", domain="onnxgrad")
def GlobalMaxPoolGrad(xp, dY, X):
    """``dY`` routed to the first maximum of each (n, c) plane."""
    N, C = X.shape[:2]
    flat = X.reshape(N, C, -1)
    first = xp.argmax(flat, axis=2)[..., None]
    hit = xp.arange(flat.shape[2])[None, None, :] == first
    dX = xp.where(hit, dY.reshape(N, C, 1), xp.zeros((), dtype=dY.dtype))
    return (xp.ascontiguousarray(dX.reshape(X.shape)),)


@GlobalMaxPoolGrad.in_standard_ops
def _(g, node):
    dY, X = node.inputs
    flat = g.Flatten(X, axis=2)   # (N·C, P): one plane a row
    first = g.ArgMax(flat, axis=1, keepdims=1, select_last_index=0, dtype="int64")
    hit = g.OneHot(first, g.Slice(g.Shape(flat, dtype="int64"), g.ints([1]), g.ints([2])),
                   g.const([0, 1], dtype=g.dtype(dY)), axis=-1, dtype=g.dtype(dY))
    planes = g.Reshape(hit, g.Shape(flat, dtype="int64"))
    routed = g.Mul(planes, g.Reshape(dY, g.ints([-1, 1])))
    return (g.Reshape(routed, g.Shape(X, dtype="int64")),)


# -- LpPool ---------------------------------------------------------------------------------

_LP_ATTRS = ("auto_pad", "ceil_mode", "dilations", "kernel_shape", "pads", "strides", "p")


def _power(xp, v, p):
    a = xp.abs(v)
    return a * a if p == 2 else a ** p


def _lp_pool(xp, X, p, geo):
    sp, kernel, strides, dilations, begin, end, need, out = geo
    Xp = pad_spatial(xp, X, begin, need)
    total = None
    for offset in _offsets(kernel):
        v = _power(xp, Xp[(slice(None), slice(None)) + offset_slices(offset, strides, dilations,
                                                                        out)], p)
        total = v if total is None else total + v
    return xp.asarray(xp.sqrt(total) if p == 2 else total ** (1.0 / p)).astype(X.dtype)


def _check_p(p):
    p = int(p)
    if p <= 0:
        raise ValueError(f"LpPool: p must be positive, got {p}")
    return p


@op("LpPool", since=2, differentiable=("X",))
def LpPool2(xp, X, *, auto_pad="NOTSET", kernel_shape=None, p=2, pads=None, strides=None):
    geo = _geometry(X.shape, kernel_shape, auto_pad, 0, None, pads, strides)
    return (_lp_pool(xp, X, _check_p(p), geo),)


@op("LpPool", since=18, differentiable=("X",))
def LpPool(xp, X, *, auto_pad="NOTSET", ceil_mode=0, dilations=None, kernel_shape=None, p=2,
           pads=None, strides=None):
    geo = _geometry(X.shape, kernel_shape, auto_pad, ceil_mode, dilations, pads, strides)
    return (_lp_pool(xp, X, _check_p(p), geo),)


for _definition in (LpPool2, LpPool):
    @_definition.gradient
    def _(g, node, dY):
        return (g.private("LpPoolGrad", dY, node.inputs[0], node.outputs[0],
                          **_pool_attrs(node, *_LP_ATTRS)),)


@op("LpPoolGrad", domain="onnxgrad")
def LpPoolGrad(xp, dY, X, Y, *, auto_pad="NOTSET", ceil_mode=0, dilations=None,
               kernel_shape=None, p=2, pads=None, strides=None):
    p = _check_p(p)
    geo = _geometry(X.shape, kernel_shape, auto_pad, ceil_mode, dilations, pads, strides)
    sp, kernel, strides, dilations, begin, end, need, out = geo
    Xp = pad_spatial(xp, X, begin, need)
    zero = xp.zeros((), dtype=dY.dtype)
    safe = xp.where(Y == 0, xp.ones((), dtype=Y.dtype), Y)
    share = xp.where(Y == 0, zero, dY * safe ** (1 - p))          # dY · Y^(1-p)
    offsets = list(_offsets(kernel))

    def part(k):
        v = Xp[(slice(None), slice(None)) + offset_slices(offsets[k], strides, dilations, out)]
        slope = v if p == 2 else xp.sign(v) * xp.abs(v) ** (p - 1)
        return share * slope

    return (_scatter(xp, part, X.shape, geo, dY.dtype),)


@LpPoolGrad.in_standard_ops
def _(g, node):
    # The slope |x|^(p-1)·sign(x) belongs to the input element, not to the window, so
    # the gradient is the slope times the window shares spread back (as AveragePool's).
    dY, X, Y = node.inputs
    geo = _static_geometry(g, node, std.tensor_shape(g, X))
    if geo is None:
        return None
    p = _check_p(node.attrs.get("p", 2))
    zero, one = std.like(g, 0, dY), std.like(g, 1, dY)
    empty = g.Equal(Y, zero)
    share = g.Where(empty, zero, g.Mul(dY, g.Pow(g.Where(empty, one, Y), std.like(g, 1 - p, Y))))
    if p == 2:
        slope = X
    else:
        slope = g.Mul(g.Sign(X), g.Pow(g.Abs(X), std.like(g, p - 1, X)))
    return (g.Mul(_spread(g, share, geo, g.Shape(X, dtype="int64")), slope),)


# -- GlobalLpPool ---------------------------------------------------------------------------

def _global_lp_pool(xp, X, p):
    axes = tuple(range(2, X.ndim))
    total = xp.sum(_power(xp, X.astype(xp.float64), p), axis=axes, keepdims=True)
    return (xp.asarray(xp.sqrt(total) if p == 2 else total ** (1.0 / p)).astype(X.dtype),)


@op("GlobalLpPool", since=1, differentiable=("X",))
def GlobalLpPool1(xp, X, *, p=2.0):
    """Opset 1: ``p`` is a float."""
    if p <= 0:
        raise ValueError(f"GlobalLpPool: p must be positive, got {p}")
    return _global_lp_pool(xp, X, float(p))


@op("GlobalLpPool", since=2, differentiable=("X",))
def GlobalLpPool(xp, X, *, p=2):
    return _global_lp_pool(xp, X, _check_p(p))


for _definition in (GlobalLpPool1, GlobalLpPool):
    @_definition.gradient
    def _(g, node, dY):
        return (g.private("GlobalLpPoolGrad", dY, node.inputs[0], node.outputs[0],
                          p=float(node.attrs["p"])),)


@op("GlobalLpPoolGrad", domain="onnxgrad")
def GlobalLpPoolGrad(xp, dY, X, Y, *, p=2.0):
    """``dY · Y^(1-p) · |x|^(p-1) · sign(x)`` (zero where ``Y`` is zero)."""
    x = X.astype(xp.float64)
    y = Y.astype(xp.float64)
    safe = xp.where(y == 0, 1.0, y)
    share = xp.where(y == 0, 0.0, dY.astype(xp.float64) * safe ** (1 - p))
    slope = x if p == 2 else xp.sign(x) * xp.abs(x) ** (p - 1)
    return ((share * slope).astype(dY.dtype),)


@GlobalLpPoolGrad.in_standard_ops
def _(g, node):
    dY, X, Y = node.inputs
    p = float(node.attrs.get("p", 2.0))
    f64 = std.tensor_type(np.float64)
    x, y, dy = (v if g.dtype(v) == np.float64 else g.Cast(v, to=f64, dtype=np.float64)
                for v in (X, Y, dY))
    zero, one = std.like(g, 0.0, x), std.like(g, 1.0, x)
    empty = g.Equal(y, zero)
    share = g.Where(empty, zero, g.Mul(dy, g.Pow(g.Where(empty, one, y),
                                                 std.like(g, 1 - p, x))))
    slope = x if p == 2 else g.Mul(g.Sign(x), g.Pow(g.Abs(x), std.like(g, p - 1, x)))
    dX = g.Mul(share, slope)
    return (dX if g.dtype(dY) == np.float64 else std.cast_like(g, dX, dY),)


# -- MaxUnpool ------------------------------------------------------------------------------

@op("MaxUnpool", since=9, differentiable=("X",), host_inputs=("output_shape",))
def MaxUnpool(xp, X, I, output_shape=None, *, kernel_shape=None, pads=None, strides=None):
    n = X.ndim - 2
    if not kernel_shape or len(kernel_shape) != n:
        raise ValueError(f"MaxUnpool needs kernel_shape of length {n}, got {kernel_shape}")
    kernel = [int(k) for k in kernel_shape]
    strides = _ints(strides, n, 1)
    pads = _ints(pads, 2 * n, 0)
    inferred = tuple(X.shape[:2]) + tuple(
        (X.shape[2 + i] - 1) * strides[i] - pads[i] - pads[n + i] + kernel[i] for i in range(n))
    shape = inferred if output_shape is None else tuple(int(d) for d in output_shape)
    if len(shape) != X.ndim:
        raise ValueError(f"MaxUnpool: output_shape {list(shape)} must have rank {X.ndim}")
    size = 1
    for d in inferred:
        size *= d
    # Indices index the inferred shape; a larger output_shape only pads it with zeros.
    flat = xp.zeros(size, dtype=X.dtype)
    flat[I.reshape(-1).astype("int64", copy=False)] = X.reshape(-1)
    Y = flat.reshape(inferred)
    if shape != inferred:
        full = xp.zeros(shape, dtype=X.dtype)
        full[tuple(slice(0, d) for d in inferred)] = Y
        Y = full
    return (Y,)


@MaxUnpool.gradient
def _(g, node, dY):
    X, I, *rest = node.inputs
    return (g.private("MaxUnpoolGrad", dY, I, **_pool_attrs(node, "kernel_shape", "pads",
                                                            "strides")),
            None) + (None,) * len(rest)


@op("MaxUnpoolGrad", domain="onnxgrad")
def MaxUnpoolGrad(xp, dY, I, *, kernel_shape=None, pads=None, strides=None):
    """``dY`` (cropped to the shape the indices refer to) gathered at ``I``."""
    n = I.ndim - 2
    kernel = [int(k) for k in kernel_shape]
    strides = _ints(strides, n, 1)
    pads = _ints(pads, 2 * n, 0)
    inferred = tuple(I.shape[:2]) + tuple(
        (I.shape[2 + i] - 1) * strides[i] - pads[i] - pads[n + i] + kernel[i] for i in range(n))
    d = xp.ascontiguousarray(dY[tuple(slice(0, s) for s in inferred)])
    return (d.reshape(-1)[I.astype("int64", copy=False)],)


@MaxUnpoolGrad.in_standard_ops
def _(g, node):
    # dY cropped to the shape the indices refer to (its spatial sizes computed from I's
    # at run time), flattened, gathered at I.
    dY, I = node.inputs
    n = g.rank(I)
    if n is None:
        return None
    n -= 2
    a = node.attrs
    kernel = [int(k) for k in a["kernel_shape"]]
    strides = _ints(a.get("strides"), n, 1)
    pads = _ints(a.get("pads"), 2 * n, 0)
    spatial = g.Slice(g.Shape(I, dtype="int64"), g.ints([2]), g.ints([std.END]))
    inferred = g.Add(g.Mul(g.Sub(spatial, g.ints([1] * n), dtype="int64"), g.ints(strides),
                           dtype="int64"),
                     g.ints([kernel[i] - pads[i] - pads[n + i] for i in range(n)]), dtype="int64")
    d = g.Slice(dY, g.ints([0] * n), inferred, g.ints(list(range(2, 2 + n))))
    return (g.Gather(g.Reshape(d, g.ints([-1])), g.Cast(I, to=std.tensor_type("int64"),
                                                          dtype="int64"), axis=0),)
