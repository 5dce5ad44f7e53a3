"""CumProd (opset 26): running products along an axis, and their gradient.

The gradient needs no division (inputs may be zero).  For the inclusive
forward running product ``y_i = x_0 ⋯ x_i``,

    dx_k = Σ_{i≥k} dy_i ∂y_i/∂x_k = E_k · S_k,   E_k = x_0 ⋯ x_{k-1},
    S_k = dy_k + x_{k+1} · S_{k+1}               (S_{n-1} = dy_{n-1}),

a running product and one reverse recurrence along the axis.  ``reverse``
flips the axis around that; ``exclusive`` shifts ``dy`` by one position
(``y^excl_i = y^incl_{i-1}``).
"""

from __future__ import annotations

from onnxgrad.ops.registry import op
from onnxgrad.ops.indexing import running_scan, shift_along
from onnxgrad.ops.tensor import ints, norm_axis


@op("CumProd", since=26, differentiable=("x",), host_inputs=("axis",))
def CumProd(xp, x, axis, *, exclusive=0, reverse=0):
    return (running_scan(xp, "cumprod", 1, x, axis, exclusive, reverse),)


@CumProd.gradient
def _(g, node, dY):
    x, axis = node.inputs
    a = node.attrs
    return (g.private("CumProdGrad", dY, x, axis, exclusive=a["exclusive"],
                      reverse=a["reverse"]), None)


@op("CumProdGrad", domain="onnxgrad", host_inputs=("axis",))
def CumProdGrad(xp, dY, x, axis, *, exclusive=0, reverse=0):
    """The gradient of CumProd with respect to ``x`` (see the module docstring)."""
    axis = norm_axis(ints(axis)[0], x.ndim)
    x = xp.moveaxis(x, axis, 0)
    d = xp.moveaxis(dY, axis, 0)
    if reverse:
        x, d = x[::-1], d[::-1]
    n = x.shape[0]
    if n == 0:
        return (xp.zeros_like(dY),)
    if exclusive:  # y_i depends on x_0..x_{i-1}: the inclusive case with dy moved back by one
        d = xp.concatenate([d[1:], xp.zeros_like(d[:1])])
    before = shift_along(xp, xp.cumprod(x, axis=0, dtype=x.dtype), 0, 1)  # E_k
    S = xp.empty_like(d)
    S[n - 1] = d[n - 1]
    for k in range(n - 2, -1, -1):
        S[k] = d[k] + x[k + 1] * S[k + 1]
    dx = before * S
    if reverse:
        dx = dx[::-1]
    return (xp.ascontiguousarray(xp.moveaxis(dx, 0, axis)),)
