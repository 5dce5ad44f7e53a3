"""Activations: Relu, LeakyRelu, Sigmoid, Tanh, Softmax, LogSoftmax.

Their gradients are fused private ops of the ``onnxgrad`` domain (``ReluGrad``,
``SoftmaxGrad``…): one pass over the data instead of three or four standard
nodes.  The fused ops read the forward output where that is cheaper (Sigmoid,
Tanh, Softmax, LogSoftmax) so the input can be freed after the forward pass.
"""

from __future__ import annotations

import math

import numpy as np  # the compiled kernels' arrays (CPU only)

from onnxgrad.ops import compiled, fused
from onnxgrad.ops.elementwise import BOUND_ROW, clamp
from onnxgrad.ops import standard as std
from onnxgrad.ops.registry import op, reusable
from onnxgrad.threads import by_rows

# Kernels wrap results in xp.asarray: NumPy ufuncs turn 0-d inputs into scalars.


@op("Relu", since=6, differentiable=("X",), reuse=("X",))
def Relu(xp, X, *, out=None):
    out = reusable(out, X.shape, X.dtype)
    if compiled.available(xp, X) and X.flags.c_contiguous and (out is None or out.flags.c_contiguous):
        if out is not None and compiled.same_memory(out, X):
            return (compiled.elementwise(_relu_in_place_kernel, out),)
        return (compiled.elementwise(_relu_kernel, out if out is not None else xp.empty_like(X), X),)
    if (X.size <= BOUND_ROW or not X.flags.c_contiguous
            or (out is not None and not out.flags.c_contiguous)):
        return (xp.asarray(xp.maximum(X, 0, out=out)),)
    return (clamp(xp, X, lo=0, out=out),)            # against rows of zeros: faster


@compiled.kernel
def _relu_kernel(x, out):
    """``out = max(x, 0)`` in one pass; NaN stays NaN."""
    for i in range(out.size):
        v = x[i]
        out[i] = 0.0 if v < 0 else v


@compiled.kernel
def _relu_in_place_kernel(x):
    """:func:`_relu_kernel` on ``x`` itself (one array: vectorised, where an output
    that may be the input keeps the loop scalar)."""
    for i in range(x.size):
        v = x[i]
        x[i] = 0.0 if v < 0 else v


@Relu.gradient
def _(g, node, dY):
    # Y > 0 exactly where X > 0: reading the output lets the input be freed after
    # the forward pass (the output is usually kept anyway, for the next layer's
    # weight gradient).
    return (g.private("ReluGrad", dY, node.outputs[0]),)


@op("ReluGrad", domain="onnxgrad", reuse=("dY",))
def ReluGrad(xp, dY, Y, *, out=None):
    """dY where Relu's output ``Y`` is positive, else 0."""
    out = reusable(out, dY.shape, dY.dtype)
    if fused.on_device(xp) and dY.shape == Y.shape:
        return (fused.relu_grad(xp, dY, Y, out),)
    if not (dY.flags.c_contiguous and Y.flags.c_contiguous and dY.shape == Y.shape
            and (out is None or out.flags.c_contiguous)):
        mask = xp.asarray(Y > 0).astype(dY.dtype)
        return (xp.asarray(xp.multiply(dY, mask, out=out if out is not None else mask)),)
    dX = out if out is not None else xp.empty_like(dY)
    if compiled.available(xp, dY, Y, dX):
        if compiled.same_memory(dX, dY):
            return (compiled.elementwise(_relu_grad_in_place_kernel, dX, Y),)
        return (compiled.elementwise(_relu_grad_kernel, dX, dY, Y),)
    d1, y1, x1 = dY.reshape(-1), Y.reshape(-1), dX.reshape(-1)

    def work(part):
        mask = (y1[part] > 0).astype(dY.dtype)
        xp.multiply(d1[part], mask, out=x1[part])

    by_rows(xp, d1.size, d1.size, work)
    return (dX,)


@compiled.kernel
def _relu_grad_kernel(d, y, out):
    """``out = d`` where ``y > 0``, else 0, in one pass."""
    for i in range(out.size):
        out[i] = d[i] if y[i] > 0 else 0.0


@compiled.kernel
def _relu_grad_in_place_kernel(y, d):
    """:func:`_relu_grad_kernel` with ``d`` as its output."""
    for i in range(d.size):
        d[i] = d[i] if y[i] > 0 else 0.0


@ReluGrad.in_standard_ops
def _(g, node):
    dY, Y = node.inputs
    return (g.Mul(dY, std.cast_like(g, g.Greater(Y, std.like(g, 0, Y), dtype="bool"), dY)),)


@op("LeakyRelu", since=6, differentiable=("X",))
def LeakyRelu(xp, X, *, alpha=0.01):
    return (xp.asarray(xp.where(X > 0, X, X * alpha)),)


@LeakyRelu.gradient
def _(g, node, dY):
    return (g.private("LeakyReluGrad", dY, node.inputs[0], alpha=node.attrs["alpha"]),)


@op("LeakyReluGrad", domain="onnxgrad")
def LeakyReluGrad(xp, dY, X, *, alpha=0.01):
    return (xp.asarray(xp.where(X > 0, dY, dY * alpha)),)


@LeakyReluGrad.in_standard_ops
def _(g, node):
    dY, X = node.inputs
    alpha = std.like(g, node.attrs.get("alpha", 0.01), dY)
    return (g.Where(g.Greater(X, std.like(g, 0, X), dtype="bool"), dY, g.Mul(dY, alpha)),)


@op("Sigmoid", since=6, differentiable=("X",))
def Sigmoid(xp, X):
    # exp of a non-positive number only: no overflow for large |X|.
    e = xp.exp(-xp.abs(X))
    return (xp.asarray(xp.where(X >= 0, 1 / (1 + e), e / (1 + e))),)


@Sigmoid.gradient
def _(g, node, dY):
    return (g.private("SigmoidGrad", dY, node.outputs[0]),)


@op("SigmoidGrad", domain="onnxgrad")
def SigmoidGrad(xp, dY, Y):
    return (xp.asarray(dY * Y * (1 - Y)),)


@SigmoidGrad.in_standard_ops
def _(g, node):
    dY, Y = node.inputs
    return (g.Mul(g.Mul(dY, Y), g.Sub(std.like(g, 1, Y), Y)),)


@op("Tanh", since=6, differentiable=("input",))
def Tanh(xp, input):
    return (xp.asarray(xp.tanh(input)),)


@Tanh.gradient
def _(g, node, dY):
    return (g.private("TanhGrad", dY, node.outputs[0]),)


@op("TanhGrad", domain="onnxgrad")
def TanhGrad(xp, dY, Y):
    return (xp.asarray(dY * (1 - Y * Y)),)


@TanhGrad.in_standard_ops
def _(g, node):
    dY, Y = node.inputs
    return (g.Mul(dY, g.Sub(std.like(g, 1, Y), g.Mul(Y, Y))),)


# -- Softmax and LogSoftmax ------------------------------------------------------------
# Opsets 1-12 coerce the input to 2-D at ``axis`` (default 1): the normalisation
# runs over all axes from ``axis`` on.  Opset 13 normalises along ``axis`` alone
# (default -1).  The private gradient ops take the same (axis, coerce) pair.

def _axes(ndim: int, axis: int, coerce: int) -> tuple[int, ...]:
    a = axis + ndim if axis < 0 else axis
    if not 0 <= a < max(ndim, 1):
        raise ValueError(f"axis {axis} out of range for rank {ndim}")
    return tuple(range(a, ndim)) if coerce else (a,)


#: The softmax kernels' passes take about a quarter of the time per element of the
#: passes :data:`onnxgrad.ops.compiled.PART` was measured on: their parts are this
#: many times larger (measured: a 262,144-element softmax is slower in two parts
#: on two threads than in one).
SOFTMAX_PART_SCALE = 4


def _rows(xp, axes, *arrays):
    """Where compiled kernels run a softmax pass: ``arrays`` as 2-D row views
    ``(rows, row)`` when ``axes`` are the trailing axes and the arrays are
    C-contiguous float32 or float64; else None."""
    A = arrays[0]
    if (A.ndim == 0 or axes != tuple(range(axes[0], A.ndim)) or A.size == 0
            or not compiled.available(xp, *arrays)
            or not all(a.flags.c_contiguous for a in arrays)):
        return None
    row = math.prod(A.shape[axes[0]:])
    return [a.reshape(-1, row) for a in arrays]


def _softmax(xp, X, axes):
    rows = _rows(xp, axes, X)
    if rows is not None:  # shift by the row's maximum, NumPy's exp, then scale
        e = np.empty(X.shape, dtype=X.dtype)
        (x,), out = rows, e.reshape(rows[0].shape)
        compiled.by_parts(x.shape[0], x.size, lambda start, stop: _shift_kernel(x, out, start, stop),
                          SOFTMAX_PART_SCALE)
        np.exp(e, out=e)
        compiled.by_parts(x.shape[0], x.size, lambda start, stop: _scale_kernel(out, start, stop),
                          SOFTMAX_PART_SCALE)
        return e
    e = xp.exp(X - X.max(axis=axes, keepdims=True))
    e /= e.sum(axis=axes, keepdims=True)
    return e


@compiled.kernel
def _shift_kernel(x, out, start, stop):
    """Rows ``[start, stop)`` of ``x`` less their maximum (all NaN where a NaN is in
    the row, as NumPy's maximum propagates it)."""
    for r in range(start, stop):
        m = x[r, 0]
        nan = m != m
        for i in range(1, x.shape[1]):
            v = x[r, i]
            m = v if v > m else m
            nan = nan | (v != v)
        for i in range(x.shape[1]):
            out[r, i] = np.nan if nan else x[r, i] - m


@compiled.kernel(reassociate=True)
def _scale_kernel(e, start, stop):
    """Rows ``[start, stop)`` of ``e`` divided by their sum (summed in float64)."""
    for r in range(start, stop):
        total = 0.0
        for i in range(e.shape[1]):
            total += e[r, i]
        for i in range(e.shape[1]):
            e[r, i] = e[r, i] / total


def _log_softmax(xp, X, axes):
    s = X - X.max(axis=axes, keepdims=True)
    s -= xp.log(xp.exp(s).sum(axis=axes, keepdims=True))
    return s


@op("Softmax", since=1, differentiable=("input",))
def Softmax(xp, input, *, axis=1):
    return (xp.asarray(_softmax(xp, input, _axes(input.ndim, axis, 1))),)


@op("Softmax", since=13, differentiable=("input",))
def Softmax13(xp, input, *, axis=-1):
    return (xp.asarray(_softmax(xp, input, _axes(input.ndim, axis, 0))),)


@op("LogSoftmax", since=1, differentiable=("input",))
def LogSoftmax(xp, input, *, axis=1):
    return (xp.asarray(_log_softmax(xp, input, _axes(input.ndim, axis, 1))),)


@op("LogSoftmax", since=13, differentiable=("input",))
def LogSoftmax13(xp, input, *, axis=-1):
    return (xp.asarray(_log_softmax(xp, input, _axes(input.ndim, axis, 0))),)


def _softmax_rule(private: str, coerce: int):
    def rule(g, node, dY):
        return (g.private(private, dY, node.outputs[0], axis=node.attrs["axis"], coerce=coerce),)
    return rule


Softmax.gradient(_softmax_rule("SoftmaxGrad", 1))
Softmax13.gradient(_softmax_rule("SoftmaxGrad", 0))
LogSoftmax.gradient(_softmax_rule("LogSoftmaxGrad", 1))
LogSoftmax13.gradient(_softmax_rule("LogSoftmaxGrad", 0))


@op("SoftmaxGrad", domain="onnxgrad")
def SoftmaxGrad(xp, dY, Y, *, axis=-1, coerce=0):
    """``Y · (dY - Σ dY·Y)``, and zero in rows that nothing reads (see below)."""
    axes = _axes(Y.ndim, axis, coerce)
    rows = _rows(xp, axes, dY, Y)
    if rows is not None and dY.dtype == Y.dtype:
        dX = np.empty(Y.shape, dtype=Y.dtype)
        d, y = rows
        out = dX.reshape(y.shape)
        compiled.by_parts(y.shape[0], y.size,
                          lambda start, stop: _softmax_grad_kernel(d, y, out, start, stop),
                          SOFTMAX_PART_SCALE)
        return (dX,)
    s = (dY * Y).sum(axis=axes, keepdims=True)
    dX = Y * (dY - s)
    # A row whose every input is -inf (a fully masked attention row) has a NaN
    # softmax; a model that replaces the row (the ONNX Attention function does, with
    # Where) sends it a zero gradient, and its true gradient is zero, not NaN · 0.
    # Rows where dY is not zero keep their NaN: the loss itself read one.
    unread = xp.isnan(s)
    if xp.__name__ == "numpy" and not unread.any():  # on the device: no host sync
        return (xp.asarray(dX),)
    unread &= (dY == 0).all(axis=axes, keepdims=True)
    return (xp.asarray(xp.where(unread, Y.dtype.type(0), dX)),)


@compiled.kernel(reassociate=True)
def _softmax_grad_kernel(dY, Y, dX, start, stop):
    """:func:`SoftmaxGrad` of rows ``[start, stop)``, ``Σ dY·Y`` summed in float64."""
    for r in range(start, stop):
        total = 0.0
        for i in range(Y.shape[1]):
            total += dY[r, i] * Y[r, i]
        unread = False
        if total != total:  # a NaN row: zero where its dY is all zero, as the NumPy form
            unread = True
            for i in range(Y.shape[1]):
                if dY[r, i] != 0:
                    unread = False
        for i in range(Y.shape[1]):
            dX[r, i] = 0.0 if unread else Y[r, i] * (dY[r, i] - total)


def _standard_axes(g, node):
    """The reduction axes of a softmax gradient, or None for the 2-D coercion of opsets
    before 13, which has no standard form here."""
    return None if node.attrs.get("coerce", 0) else g.ints([node.attrs.get("axis", -1)])


@SoftmaxGrad.in_standard_ops
def _(g, node):
    dY, Y = node.inputs
    axes = _standard_axes(g, node)
    if axes is None:
        return None
    s = g.ReduceSum(g.Mul(dY, Y), axes, keepdims=1)
    dX = g.Mul(Y, g.Sub(dY, s))
    # Zero in rows that nothing reads, as the kernel: NaN softmax, zero dY.
    unread = g.And(g.IsNaN(s, dtype="bool"),
                   g.Equal(g.ReduceSum(g.Abs(dY), axes, keepdims=1), std.like(g, 0.0, dY),
                           dtype="bool"), dtype="bool")
    return (g.Where(unread, std.like(g, 0.0, dY), dX),)


@op("LogSoftmaxGrad", domain="onnxgrad")
def LogSoftmaxGrad(xp, dY, Y, *, axis=-1, coerce=0):
    axes = _axes(Y.ndim, axis, coerce)
    return (xp.asarray(dY - xp.exp(Y) * dY.sum(axis=axes, keepdims=True)),)


@LogSoftmaxGrad.in_standard_ops
def _(g, node):
    dY, Y = node.inputs
    axes = _standard_axes(g, node)
    if axes is None:
        return None
    return (g.Sub(dY, g.Mul(g.Exp(Y), g.ReduceSum(dY, axes, keepdims=1))),)
