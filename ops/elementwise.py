"""Elementwise arithmetic: Add, Sub, Mul, Div, Pow, Sum and the unary maths ops.

Binary ops broadcast like NumPy (ONNX multidirectional broadcasting, opset 7
on); their gradients undo the broadcasting with ``g.unbroadcast``, which emits
the private ``onnxgrad::SumToShape`` declared here.
"""

from __future__ import annotations

import numpy as np  # host-side shape arithmetic only

from onnxgrad.ops import standard as std
from onnxgrad.ops.registry import op, reusable
from onnxgrad.ops.shape import onnx_type
from onnxgrad.threads import by_rows


def _arr(xp, value):
    """An array, never a NumPy scalar (0-d operands give scalars in NumPy)."""
    return xp.asarray(value)


#: Elements in a row of bounds that :func:`clamp` compares against.
BOUND_ROW = 1024


def clamp(xp, X, lo=None, hi=None, out=None):
    """``minimum(maximum(X, lo), hi)`` of a C-contiguous ``X`` (a bound that is None
    is left out), into ``out`` when given (C-contiguous too), else into a fresh
    array; the bounds are taken in ``X``'s element type.

    NumPy's maximum and minimum run their vector loops only when both operands
    advance: against rows of the bounds they run 2-3x faster than against a
    scalar, with the same results (NaN and signed zeros included).  The rows are
    taken in parts on the thread pool."""
    X1 = X.reshape(-1)
    Y1 = (out if out is not None else xp.empty_like(X)).reshape(-1)
    row = min(X1.size, BOUND_ROW)
    bounds = [(ufunc, xp.full(row, bound, dtype=X.dtype))
              for ufunc, bound in ((xp.maximum, lo), (xp.minimum, hi)) if bound is not None]

    def work(part):
        x, y = X1[part], Y1[part]
        whole = x.size - x.size % row
        for ufunc, rows in bounds:
            if whole:
                ufunc(x[:whole].reshape(-1, row), rows, out=y[:whole].reshape(-1, row))
            if whole < x.size:
                ufunc(x[whole:], rows[:x.size - whole], out=y[whole:])
            x = y                                  # the second bound reads the first's result

    by_rows(xp, X1.size, X1.size, work)
    return Y1.reshape(X.shape)


def _into(out, *operands):
    """``out`` (a donated operand) when it can hold the elementwise result of
    ``operands`` of one type, else None."""
    if out is None or any(x.dtype != operands[0].dtype for x in operands[1:]):
        return None
    shapes = {tuple(x.shape) for x in operands}
    shape = shapes.pop() if len(shapes) == 1 else np.broadcast_shapes(*shapes)
    return reusable(out, shape, operands[0].dtype)


# -- binary arithmetic -------------------------------------------------------------

@op("Add", since=7, differentiable=("A", "B"), reuse=("A", "B"))
def Add(xp, A, B, *, out=None):
    return (_arr(xp, xp.add(A, B, out=_into(out, A, B))),)


@Add.gradient
def _(g, node, dY):
    A, B = node.inputs
    return (g.unbroadcast(dY, like=A), g.unbroadcast(dY, like=B))


@op("Sub", since=7, differentiable=("A", "B"), reuse=("A", "B"))
def Sub(xp, A, B, *, out=None):
    return (_arr(xp, xp.subtract(A, B, out=_into(out, A, B))),)


@Sub.gradient
def _(g, node, dY):
    A, B = node.inputs
    return (g.unbroadcast(dY, like=A), g.unbroadcast(g.Neg(dY), like=B))


@op("Mul", since=7, differentiable=("A", "B"), reuse=("A", "B"))
def Mul(xp, A, B, *, out=None):
    return (_arr(xp, xp.multiply(A, B, out=_into(out, A, B))),)


@Mul.gradient
def _(g, node, dY):
    A, B = node.inputs
    return (g.unbroadcast(g.Mul(dY, B), like=A),
            g.unbroadcast(g.Mul(dY, A), like=B))


@op("Div", since=7, differentiable=("A", "B"), reuse=("A", "B"))
def Div(xp, A, B, *, out=None):
    if A.dtype.kind in "iu":
        # Integer division truncates toward zero, as in C (not floor as in NumPy).
        q = xp.floor_divide(A, B)
        r = xp.remainder(A, B)
        adjust = (r != 0) & ((A < 0) ^ (B < 0))
        return (_arr(xp, q + adjust.astype(q.dtype)),)
    return (_arr(xp, xp.true_divide(A, B, out=_into(out, A, B))),)


@Div.gradient
def _(g, node, dY):
    A, B = node.inputs
    (C,) = node.outputs
    # d(A/B)/dB = -A/B^2 = -C/B
    return (g.unbroadcast(g.Div(dY, B), like=A),
            g.unbroadcast(g.Neg(g.Div(g.Mul(dY, C), B)), like=B))


@op("Pow", since=7, differentiable=("X", "Y"))
def Pow(xp, X, Y):
    Z = xp.power(X, Y)
    if Z.dtype != X.dtype:  # the output has the base's type (e.g. float base, int exponent)
        Z = Z.astype(X.dtype)
    return (_arr(xp, Z),)


@Pow.gradient
def _(g, node, dZ):
    X, Y = node.inputs
    (Z,) = node.outputs
    Yx = Y
    if g.dtype(Y) != g.dtype(X):  # exponent of another type: compute in the base's type
        Yx = g.op("Cast", Y, to=onnx_type(g.dtype(X)), dtype=g.dtype(X))
    # dZ/dX = Y * X^(Y-1)  (exact at X == 0, unlike Y * Z / X)
    dX = g.Mul(dZ, g.Mul(Yx, g.Pow(X, g.Sub(Yx, g.scalar(1, like=X)))))
    # dZ/dY = Z * log(X) where X > 0; at X == 0 it is 0 for Y >= 0 (Z is 0 or 1 and
    # does not move), as PyTorch has it, where Z * log(X) would give NaN
    zero = g.scalar(0, like=X)
    flat = g.And(g.Equal(X, zero, dtype="bool"), g.GreaterOrEqual(Yx, zero, dtype="bool"),
                 dtype="bool")
    dY = g.Mul(dZ, g.Where(flat, zero, g.Mul(Z, g.Log(X))))
    return (g.unbroadcast(dX, like=X), g.unbroadcast(dY, like=Y))


@op("Sum", since=8, differentiable=("data_0",), reuse=("data_0",))
def Sum(xp, *data_0, out=None):
    total = _into(out, *data_0) if len(data_0) > 1 else None
    if total is not None:  # a donated operand: add the others into it
        for x in data_0:
            if x is not total:
                total += x
        return (total,)
    total = data_0[0]
    for i, x in enumerate(data_0[1:]):
        # The first addition makes a fresh array; later ones add in place where they can.
        if i > 0 and total.shape == x.shape and total.dtype == x.dtype:
            total += x
        else:
            total = total + x
    return (_arr(xp, total),)


@Sum.gradient
def _(g, node, dY):
    return tuple(g.unbroadcast(dY, like=x) if x else None for x in node.inputs)


# -- unary maths -----------------------------------------------------------------------

@op("Neg", since=6, differentiable=("X",), reuse=("X",))
def Neg(xp, X, *, out=None):
    return (_arr(xp, xp.negative(X, out=reusable(out, X.shape, X.dtype))),)


@Neg.gradient
def _(g, node, dY):
    return (g.Neg(dY),)


@op("Abs", since=6, differentiable=("X",))
def Abs(xp, X):
    return (_arr(xp, xp.abs(X)),)


@Abs.gradient
def _(g, node, dY):
    (X,) = node.inputs
    return (g.Mul(dY, g.Sign(X)),)   # 0 at X == 0, as in PyTorch


@op("Sign", since=9)  # piecewise constant: its derivative is zero wherever it exists
def Sign(xp, input):
    return (_arr(xp, xp.sign(input)),)


@op("Exp", since=6, differentiable=("input",))
def Exp(xp, input):
    return (_arr(xp, xp.exp(input)),)


@Exp.gradient
def _(g, node, dY):
    (Y,) = node.outputs
    return (g.Mul(dY, Y),)


@op("Log", since=6, differentiable=("input",))
def Log(xp, input):
    return (_arr(xp, xp.log(input)),)


@Log.gradient
def _(g, node, dY):
    (X,) = node.inputs
    return (g.Div(dY, X),)


@op("Sqrt", since=6, differentiable=("X",))
def Sqrt(xp, X):
    return (_arr(xp, xp.sqrt(X)),)


@Sqrt.gradient
def _(g, node, dY):
    (Y,) = node.outputs
    return (g.Div(g.Mul(dY, g.scalar(0.5, like=Y)), Y),)


@op("Reciprocal", since=6, differentiable=("X",))
def Reciprocal(xp, X):
    return (_arr(xp, 1 / X),)


@Reciprocal.gradient
def _(g, node, dY):
    (Y,) = node.outputs
    return (g.Neg(g.Mul(dY, g.Mul(Y, Y))),)


# -- private: undo broadcasting ---------------------------------------------------------

@op("SumToShape", domain="onnxgrad", host_inputs=("shape",))
def SumToShape(xp, X, shape):
    """Sum ``X`` down to ``shape``: the adjoint of broadcasting ``shape`` to ``X.shape``."""
    target = tuple(int(d) for d in shape)
    if tuple(X.shape) == target:
        return (X,)
    lead = X.ndim - len(target)
    if lead < 0:
        raise ValueError(f"cannot sum shape {tuple(X.shape)} down to {target}")
    if lead:
        X = X.sum(axis=tuple(range(lead)))
    ones = tuple(i for i, d in enumerate(target) if d == 1 and X.shape[i] != 1)
    if ones:
        X = X.sum(axis=ones, keepdims=True)
    if tuple(X.shape) != target:
        raise ValueError(f"cannot sum shape {tuple(X.shape)} down to {target}")
    return (_arr(xp, X),)


@SumToShape.in_standard_ops
def _(g, node):
    # Sum the leading axes away, then every axis where the target is 1 and X is not
    # (found at run time, so that dynamic dimensions work).
    X, shape = node.inputs
    lead = g.Sub(std.rank(g, X), g.Size(shape, dtype="int64"), dtype="int64")
    X = g.ReduceSum(X, g.Range(std.i64(g, 0), lead, std.i64(g, 1), dtype="int64"),
                    keepdims=0, noop_with_empty_axes=1)
    one = g.ints([1])
    ones = g.And(g.Equal(shape, one, dtype="bool"),
                 g.Not(g.Equal(g.Shape(X, dtype="int64"), one, dtype="bool")), dtype="bool")
    axes = g.Reshape(g.NonZero(ones, dtype="int64"), g.ints([-1]))
    return (g.ReduceSum(X, axes, keepdims=1, noop_with_empty_axes=1),)
