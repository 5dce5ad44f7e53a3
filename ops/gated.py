"""Swish (opset 24) and SwiGLU (opset 28): x·σ(αx) and its gated form.

``Swish(X) = X · σ(αX)``; ``SwiGLU(A, B) = Swish(A) · B`` (same shapes, no
broadcasting).  Each gradient is one fused private op, from::

    d Swish/dX = σ(αX) · (1 + αX · (1 - σ(αX)))
"""

from __future__ import annotations

from onnxgrad.ops import standard as std
from onnxgrad.ops.registry import op


def _sigmoid(xp, z):
    e = xp.exp(-xp.abs(z))  # exp of a non-positive number only: no overflow
    return xp.where(z >= 0, 1 / (1 + e), e / (1 + e))


def _swish(xp, X, alpha):
    return X * _sigmoid(xp, X * X.dtype.type(alpha)).astype(X.dtype)


def _swish_slope(xp, X, alpha):
    s = _sigmoid(xp, X * X.dtype.type(alpha))
    return (s * (1 + X * X.dtype.type(alpha) * (1 - s))).astype(X.dtype)


@op("Swish", since=24, differentiable=("X",))
def Swish(xp, X, *, alpha=1.0):
    return (xp.asarray(_swish(xp, X, alpha)),)


@Swish.gradient
def _(g, node, dY):
    return (g.private("SwishGrad", dY, node.inputs[0], alpha=node.attrs["alpha"]),)


@op("SwishGrad", domain="onnxgrad")
def SwishGrad(xp, dY, X, *, alpha=1.0):
    return (xp.asarray(dY * _swish_slope(xp, X, alpha)),)


@SwishGrad.in_standard_ops
def _(g, node):
    dY, X = node.inputs
    alpha = std.like(g, node.attrs.get("alpha", 1.0), X)
    s = g.Sigmoid(g.Mul(X, alpha))
    slope = g.Mul(s, g.Add(std.like(g, 1, X), g.Mul(g.Mul(X, alpha), g.Sub(std.like(g, 1, X), s))))
    return (g.Mul(dY, slope),)


@op("SwiGLU", since=28, differentiable=("A", "B"))
def SwiGLU(xp, A, B, *, alpha=1.0):
    if A.shape != B.shape:
        raise ValueError(f"SwiGLU: A {tuple(A.shape)} and B {tuple(B.shape)} must have the same "
                         "shape (no broadcasting)")
    return (xp.asarray(_swish(xp, A, alpha) * B),)


@SwiGLU.gradient
def _(g, node, dY):
    A, B = node.inputs
    dA, dB = g.private("SwiGLUGrad", dY, A, B, alpha=node.attrs["alpha"], num_outputs=2)
    return (dA, dB)


@op("SwiGLUGrad", domain="onnxgrad")
def SwiGLUGrad(xp, dY, A, B, *, alpha=1.0):
    """(dA, dB) = (dY · B · Swish'(A), dY · Swish(A))."""
    return (xp.asarray(dY * B * _swish_slope(xp, A, alpha)),
            xp.asarray(dY * _swish(xp, A, alpha)))


@SwiGLUGrad.in_standard_ops
def _(g, node):
    dY, A, B = node.inputs
    alpha = std.like(g, node.attrs.get("alpha", 1.0), A)
    one = std.like(g, 1, A)
    scaled = g.Mul(A, alpha)
    s = g.Sigmoid(scaled)
    slope = g.Mul(s, g.Add(one, g.Mul(scaled, g.Sub(one, s))))      # Swish'(A)
    return (g.Mul(g.Mul(dY, B), slope), g.Mul(dY, g.Mul(A, s)))
