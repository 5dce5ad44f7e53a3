"""LpPool, GlobalLpPool and MaxUnpool.

LpPool is ``(Σ_window |x|^p)^(1/p)`` over zero-padded windows, with the window
geometry of AveragePool and MaxPool (``ops/pool.py``: auto_pad, pads,
strides, dilations, ceil_mode).  Its gradient is a private op that routes
``dY · Y^(1-p) · |x|^(p-1) · sign(x)`` back through every window (zero where
``Y`` is zero).  GlobalLpPool is the same over the whole spatial extent, with
the same gradient.

MaxUnpool writes each input element at its flat index ``I`` (as MaxPool's
Indices output gives it) in a zero tensor; its gradient gathers ``dY`` at
``I``.
"""

from __future__ import annotations

from onnxgrad.ops.conv import _ints, offset_slices, pad_spatial
from onnxgrad.ops.pool import _geometry, _offsets, _pool_attrs, _scatter
from onnxgrad.ops.registry import op

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
