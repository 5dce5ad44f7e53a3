"""Comparisons, logic, rounding and bit ops: forward only.

Their outputs are booleans or integers, or piecewise constant (Floor, Ceil,
Round), so no input is differentiable: a gradient never flows through them,
as in PyTorch.  (Sign is declared with the unary maths in ``elementwise``.)

Binary ops broadcast like NumPy (opset 7 on).  Operands that are host shape
values stay on the host (see :func:`onnxgrad.ops.tensor.on`).
"""

from __future__ import annotations

from onnxgrad.ops.registry import op
from onnxgrad.ops.tensor import on


def _binary(fn):
    def kernel(xp, A, B):
        mod, (a, b) = on(xp, A, B)
        return (mod.asarray(fn(mod, a, b)),)
    return kernel


def _unary(fn):
    def kernel(xp, X):
        mod, (x,) = on(xp, X)
        return (mod.asarray(fn(mod, x)),)
    return kernel


def _declare_binary(name, since, fn):
    kernel = _binary(fn)
    kernel.__name__ = name
    op(name, since=since)(kernel)


def _declare_unary(name, since, fn):
    kernel = _unary(fn)
    kernel.__name__ = name
    op(name, since=since)(kernel)


# -- comparisons (bool outputs) -------------------------------------------------------

_declare_binary("Equal", 7, lambda m, a, b: a == b)
_declare_binary("Less", 7, lambda m, a, b: a < b)
_declare_binary("Greater", 7, lambda m, a, b: a > b)
_declare_binary("LessOrEqual", 12, lambda m, a, b: a <= b)
_declare_binary("GreaterOrEqual", 12, lambda m, a, b: a >= b)

# -- logic --------------------------------------------------------------------------------

_declare_binary("And", 7, lambda m, a, b: m.logical_and(a, b))
_declare_binary("Or", 7, lambda m, a, b: m.logical_or(a, b))
_declare_binary("Xor", 7, lambda m, a, b: m.logical_xor(a, b))
_declare_unary("Not", 1, lambda m, x: m.logical_not(x))

# -- bit ops --------------------------------------------------------------------------------

_declare_binary("BitwiseAnd", 18, lambda m, a, b: m.bitwise_and(a, b))
_declare_binary("BitwiseOr", 18, lambda m, a, b: m.bitwise_or(a, b))
_declare_binary("BitwiseXor", 18, lambda m, a, b: m.bitwise_xor(a, b))
_declare_unary("BitwiseNot", 18, lambda m, x: m.invert(x))


@op("BitShift", since=11)
def BitShift(xp, X, Y, *, direction):
    mod, (x, y) = on(xp, X, Y)
    if direction not in ("LEFT", "RIGHT"):
        raise ValueError(f"BitShift: direction must be 'LEFT' or 'RIGHT', got {direction!r}")
    shift = mod.left_shift if direction == "LEFT" else mod.right_shift
    return (mod.asarray(shift(x, y.astype(x.dtype))),)


# -- Mod ----------------------------------------------------------------------------------------

@op("Mod", since=10, differentiable=("A", "B"))
def Mod(xp, A, B, *, fmod=0):
    mod, (a, b) = on(xp, A, B)
    # fmod=0: the remainder takes the divisor's sign (NumPy's mod); fmod=1: the dividend's.
    return (mod.asarray(mod.fmod(a, b) if fmod else mod.mod(a, b)),)


@Mod.gradient
def _(g, node, dY):
    # C = A - B·q with q = trunc(A/B) (fmod=1) or floor(A/B) (fmod=0), piecewise
    # constant: dA = dY and dB = -q·dY wherever q does not jump (as torch.fmod's and
    # torch.remainder's gradients).  Integer inputs get no gradient.
    A, B = node.inputs
    ratio = g.Div(A, B)
    if node.attrs.get("fmod", 0):
        q = g.Mul(g.Sign(ratio), g.Floor(g.Abs(ratio)))
    else:
        q = g.Floor(ratio)
    return (g.unbroadcast(dY, like=A), g.unbroadcast(g.Neg(g.Mul(dY, q)), like=B))


# -- rounding (piecewise constant: zero gradient almost everywhere) ---------------------------------

_declare_unary("Floor", 6, lambda m, x: m.floor(x))
_declare_unary("Ceil", 6, lambda m, x: m.ceil(x))
_declare_unary("Round", 11, lambda m, x: m.round(x))  # halves to even, as ONNX specifies

# -- classification of floats -------------------------------------------------------------------------

_declare_unary("IsNaN", 9, lambda m, x: m.isnan(x))


@op("IsInf", since=10)
def IsInf(xp, X, *, detect_negative=1, detect_positive=1):
    mod, (x,) = on(xp, X)
    out = mod.isinf(x)
    if not detect_negative:
        out = out & (x > 0)
    if not detect_positive:
        out = out & (x < 0)
    return (mod.asarray(out),)
