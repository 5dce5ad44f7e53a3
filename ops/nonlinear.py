"""More activations: Clip, PRelu, HardSigmoid, HardSwish, Elu, Selu, Celu,
Softplus, Softsign, Mish, Gelu, Erf, Hardmax, Shrink and ThresholdedRelu.

Each gradient is one fused private op of the ``onnxgrad`` domain
(``EluGrad``…) that reads the forward input.  Where the derivative has a kink,
the choice follows PyTorch (Clip passes the gradient at its bounds, HardSwish
uses ``x/3 + 1/2`` on ``[-3, 3]``).  Hardmax is piecewise constant: it has no
gradient anywhere it exists.

NumPy has no ``erf``; :func:`erf` evaluates it with array operations only: a
positive-term series below 2.5 and a continued fraction for ``erfc`` above,
accurate to about 1 ulp in float64 and float32.
"""

from __future__ import annotations

import math

import numpy as np  # the host array module, for blockwise evaluation on the CPU

from onnxgrad.ops import compiled, fused
from onnxgrad.ops.elementwise import Add, Div, Mul, Sum, SumToShape, clamp
from onnxgrad.ops import standard as std
from onnxgrad.ops.registry import op
from onnxgrad.threads import by_rows

_SQRT_PI = math.sqrt(math.pi)


def _a(xp, value, like):
    """``value`` as an array of ``like``'s element type (NumPy promotes some narrow
    types, e.g. bfloat16, to float32 in ufuncs)."""
    return xp.asarray(value).astype(like.dtype, copy=False)


def _rule(private, *attrs):
    """A rule that emits ``private(dY, X, **attrs)`` for the node's first input."""
    def rule(g, node, dY):
        kw = {k: node.attrs[k] for k in attrs}
        return (g.private(private, dY, node.inputs[0], **kw),)
    return rule


# -- Erf -----------------------------------------------------------------------------------


# Eigen's single-precision erf: an odd/even rational approximation on [-4, 4]
# (outside, erf is ±1 in float32), accurate to a few ulp.
_ERF_P = (-2.72614225801306e-10, 2.77068142495902e-08, -2.10102402082508e-06,
          -5.69250639462346e-05, -7.34990630326855e-04, -2.95459980854025e-03,
          -1.60960333262415e-02)
_ERF_Q = (-1.45660718464996e-05, -2.13374055278905e-04, -1.68282697438203e-03,
          -7.37332916720468e-03, -1.42647390514189e-02)


def _horner(z2, coefficients):
    """sum(c * z2**k), highest power first, evaluated in place."""
    out = z2 * coefficients[0]
    out += coefficients[1]
    for c in coefficients[2:]:
        out *= z2
        out += c
    return out


def _erf_float32(xp, x):
    """erf for float32 (and narrower) inputs, computed in float32 in place."""
    z = xp.clip(x.astype(xp.float32, copy=False), -4.0, 4.0)
    z2 = z * z
    p, q = _horner(z2, _ERF_P), _horner(z2, _ERF_Q)
    p *= z
    p /= q
    return p.astype(x.dtype, copy=False)


#: Elements per block when NumPy evaluates erf: the polynomial's temporaries
#: (a few arrays of the block's size) stay in cache and in memory the allocator
#: already holds, instead of being fresh pages for every call on a large array.
ERF_BLOCK = 1 << 15


def _blockwise(xp, fn, x):
    """``fn`` applied to ``x`` in blocks of :data:`ERF_BLOCK` elements (NumPy), or
    at once (CuPy, where each block would be another kernel launch)."""
    if xp is not np or x.size <= ERF_BLOCK:
        return fn(xp, x)
    flat = np.ascontiguousarray(x).reshape(-1)
    out = np.empty(flat.shape, dtype=x.dtype)
    for start in range(0, flat.size, ERF_BLOCK):
        out[start:start + ERF_BLOCK] = fn(xp, flat[start:start + ERF_BLOCK])
    return out.reshape(x.shape)


def erf(xp, x):
    """The error function of a floating-point array: one compiled pass where compiled
    kernels run (float32: the rational approximation below, in the same float32
    operations as the array form; float64: the C library's erf), else array
    operations only."""
    if compiled.available(xp, x):
        out = np.empty(x.shape, dtype=x.dtype)
        kernel = _erf32_kernel if x.dtype == np.float32 else _erf64_kernel
        return compiled.elementwise(kernel, out, np.ascontiguousarray(x))
    if x.dtype.itemsize <= 4:
        return _blockwise(xp, _erf_float32, x)
    return _blockwise(xp, _erf_series, x)


_ERF_P32 = tuple(np.float32(c) for c in _ERF_P)
_ERF_Q32 = tuple(np.float32(c) for c in _ERF_Q)


@compiled.helper
def _erf32(v):
    """:func:`_erf_float32` of one float32 value."""
    P, Q = _ERF_P32, _ERF_Q32
    z = min(max(v, np.float32(-4.0)), np.float32(4.0))
    z2 = z * z
    p = z2 * P[0] + P[1]
    p = p * z2 + P[2]
    p = p * z2 + P[3]
    p = p * z2 + P[4]
    p = p * z2 + P[5]
    p = p * z2 + P[6]
    q = z2 * Q[0] + Q[1]
    q = q * z2 + Q[2]
    q = q * z2 + Q[3]
    q = q * z2 + Q[4]
    return p * z / q


@compiled.kernel
def _erf32_kernel(x, out):
    """:func:`_erf_float32` of a float32 array, one element at a time."""
    for i in range(x.size):
        out[i] = _erf32(x[i])


@compiled.kernel
def _erf64_kernel(x, out):
    """erf of a float64 array by the C library."""
    for i in range(x.size):
        out[i] = math.erf(x[i])


def _erf_series(xp, x):
    """erf for float64 and wider: a series below 2.5, a continued fraction above."""
    wide = x.dtype.itemsize >= 8
    terms, depth, cut = (60, 70, 2.5) if wide else (28, 30, 2.5)
    a = xp.abs(x)
    small = xp.minimum(a, cut)
    # erf(z) = 2/sqrt(pi) exp(-z^2) sum_n (2z^2)^n z / (1*3*...*(2n+1))
    z2 = 2 * small * small
    term = small
    total = small
    for n in range(1, terms):
        term = term * z2 / (2 * n + 1)
        total = total + term
    below = total * xp.exp(-small * small) * (2 / _SQRT_PI)
    # erfc(z) = exp(-z^2)/sqrt(pi) / (z + (1/2)/(z + 1/(z + (3/2)/(z + ...))))
    big = xp.maximum(a, cut)
    f = big
    for k in range(depth, 0, -1):
        f = big + (k / 2) / f
    above = 1 - xp.exp(-big * big) / (_SQRT_PI * f)
    value = xp.where(a < cut, below, above)
    return _a(xp, xp.where(x < 0, -value, value), x)


@op("Erf", since=9, differentiable=("input",))
def Erf(xp, input):
    return (erf(xp, input),)


Erf.gradient(_rule("ErfGrad"))


@op("ErfGrad", domain="onnxgrad")
def ErfGrad(xp, dY, X):
    if X.dtype == dY.dtype and X.dtype in (np.float32, np.float64) and X.shape == dY.shape:
        bell = xp.multiply(X, X)          # the same operations in place: no temporaries
        xp.negative(bell, out=bell)
        xp.exp(bell, out=bell)
        bell *= X.dtype.type(2 / _SQRT_PI)
        bell *= dY
        return (bell,)
    return (_a(xp, dY * (xp.exp(-X * X) * (2 / _SQRT_PI)), dY),)


@ErfGrad.in_standard_ops
def _(g, node):
    dY, X = node.inputs
    bell = g.Exp(g.Neg(g.Mul(X, X)))
    return (g.Mul(dY, g.Mul(bell, std.like(g, 2 / _SQRT_PI, X))),)


# -- Gelu as exporters write it -------------------------------------------------------------
#
# torch.onnx (before opset 20) writes GELU as Mul(Mul(x, Add(Erf(Div(x, √2)), 1)), 0.5), and
# its gradient is then nine nodes.  CPU plans run the chain as one step and its gradient as
# another where nothing else reads its values (onnxgrad.fusion): the same operations in the
# same order, in one pass over memory (the gradient: NumPy's exp, then one pass), so that
# the results are those of the nodes one by one, bit for bit.


def _gelu_compiled(xp, x) -> bool:
    """Whether the merged chain and its gradient run their compiled kernels on ``x``
    (else each node's own kernel runs, one after another)."""
    return compiled.available(xp, x)


def gelu_erf_forward(keep: bool):
    """The kernel of the merged chain: inputs x and the constants ``c1`` (Div's), ``c2``
    (Add's) and ``c3`` (the last Mul's); outputs the chain's, and before it, where
    ``keep``, what its gradient reads: ``q``, ``-(d·d)`` of Div's output d (ErfGrad's
    first operations; d itself where the nodes' own kernels run) and Add's output."""

    def kernel(xp, x, c1, c2, c3):
        if not _gelu_compiled(xp, x):
            d = Div(xp, x, c1)[0]
            a = Add(xp, Erf(xp, d)[0], c2)[0]
            y = Mul(xp, Mul(xp, x, a)[0], c3)[0]
            return ((d, a) if keep else ()) + (y,)
        t = x.dtype.type
        x = np.ascontiguousarray(x)
        q, a = (np.empty(x.shape if keep else (0,), dtype=x.dtype) for _ in range(2))
        y = np.empty(x.shape, dtype=x.dtype)
        chain = _gelu_erf32_kernel if x.dtype == np.float32 else _gelu_erf64_kernel
        compiled.elementwise(chain, y, x, t(c1), t(c2), t(c3), q.reshape(-1), a.reshape(-1))
        return ((q, a) if keep else ()) + (y,)

    return kernel


@compiled.kernel
def _gelu_erf32_kernel(x, c1, c2, c3, q, a, out):
    """The chain on float32 values (Erf as :func:`_erf32_kernel`); where ``q`` and ``a``
    are not empty, ``-(d·d)`` of Div's output d into ``q`` and Add's output into ``a``."""
    for i in range(out.size):
        v = x[i]
        u = v / c1
        if q.size:
            q[i] = -(u * u)
        w = _erf32(u) + c2
        if a.size:
            a[i] = w
        out[i] = (v * w) * c3


@compiled.kernel
def _gelu_erf64_kernel(x, c1, c2, c3, q, a, out):
    """The chain on float64 values (Erf by the C library)."""
    for i in range(out.size):
        v = x[i]
        u = v / c1
        if q.size:
            q[i] = -(u * u)
        w = math.erf(u) + c2
        if a.size:
            a[i] = w
        out[i] = (v * w) * c3


def gelu_erf_grad(xp, g, x, q, a, c1, c3):
    """The merged gradient of the chain (see :func:`gelu_erf_forward`): ``g`` the
    chain's output gradient, ``x`` its input, ``q`` and ``a`` what the forward step
    kept.  The nodes' gradients are ``g1 = g·c3``, ``g1·a`` and ``g1·x`` (the Mul's),
    ``ErfGrad`` (``exp(-(d·d))·(2/√π)·(g1·x)``), its quotient by ``c1`` (the Div's)
    and the sum of the two contributions to x."""
    if not _gelu_compiled(xp, x):  # q is Div's output d (see gelu_erf_forward)
        g1 = Mul(xp, g, c3)[0]
        dd = ErfGrad(xp, Mul(xp, g1, x)[0], q)[0]
        return Sum(xp, Mul(xp, g1, a)[0], Div(xp, dd, c1)[0])
    t = x.dtype.type
    out = np.empty(x.shape, dtype=x.dtype)
    flat, source = out.reshape(-1), np.ascontiguousarray(q).reshape(-1)
    # NumPy's exp, as ErfGrad's, in parts on the pool, into the gradient's storage
    by_rows(np, flat.size, flat.size, lambda part: np.exp(source[part], out=flat[part]))
    compiled.elementwise(_gelu_erf_grad_kernel, out, np.ascontiguousarray(g),
                         np.ascontiguousarray(x), np.ascontiguousarray(a), t(c1), t(c3),
                         t(2 / _SQRT_PI))
    return (out,)


@compiled.kernel
def _gelu_erf_grad_kernel(g, x, a, c1, c3, k, out):
    """The chain's gradient, ``out`` holding ``exp(-(d·d))`` on entry (see
    :func:`gelu_erf_grad`)."""
    for i in range(out.size):
        g1 = g[i] * c3
        out[i] = g1 * a[i] + ((out[i] * k) * (g1 * x[i])) / c1


# -- Gelu ----------------------------------------------------------------------------------

_TANH_C = math.sqrt(2 / math.pi)


@op("Gelu", since=20, differentiable=("X",))
def Gelu(xp, X, *, approximate="none"):
    if approximate == "tanh":
        return (_a(xp, 0.5 * X * (1 + xp.tanh(_TANH_C * (X + 0.044715 * X * X * X))), X),)
    if approximate != "none":
        raise ValueError(f"Gelu: unknown approximate={approximate!r}")
    return (_a(xp, 0.5 * X * (1 + erf(xp, X * (1 / math.sqrt(2)))), X),)


Gelu.gradient(_rule("GeluGrad", "approximate"))


@op("GeluGrad", domain="onnxgrad")
def GeluGrad(xp, dY, X, *, approximate="none"):
    if approximate == "tanh":
        t = xp.tanh(_TANH_C * (X + 0.044715 * X * X * X))
        d = 0.5 * (1 + t) + 0.5 * X * (1 - t * t) * _TANH_C * (1 + 3 * 0.044715 * X * X)
    else:
        d = 0.5 * (1 + erf(xp, X * (1 / math.sqrt(2)))) \
            + X * xp.exp(-0.5 * X * X) * (1 / math.sqrt(2 * math.pi))
    return (_a(xp, dY * d, dY),)


@GeluGrad.in_standard_ops
def _(g, node):
    dY, X = node.inputs

    def c(value):
        return std.like(g, value, X)

    if node.attrs.get("approximate", "none") == "tanh":
        cube = g.Mul(g.Mul(X, X), X)
        t = g.Tanh(g.Mul(c(_TANH_C), g.Add(X, g.Mul(c(0.044715), cube))))
        slope = g.Mul(g.Mul(g.Mul(g.Mul(c(0.5), X), g.Sub(c(1), g.Mul(t, t))), c(_TANH_C)),
                      g.Add(c(1), g.Mul(g.Mul(c(3 * 0.044715), X), X)))
        d = g.Add(g.Mul(c(0.5), g.Add(c(1), t)), slope)
    else:
        d = g.Add(g.Mul(c(0.5), g.Add(c(1), g.Erf(g.Mul(X, c(1 / math.sqrt(2)))))),
                  g.Mul(g.Mul(X, g.Exp(g.Mul(g.Mul(c(-0.5), X), X))),
                        c(1 / math.sqrt(2 * math.pi))))
    return (g.Mul(dY, d),)


# -- Clip ----------------------------------------------------------------------------------


def _clip(xp, X, lo, hi):
    if compiled.available(xp, X) and X.ndim and X.flags.c_contiguous:
        return compiled.elementwise(_clip_kernel, xp.empty_like(X), X, *_bounds(X.dtype, lo, hi))
    if X.ndim == 0 or not X.flags.c_contiguous or lo is None or hi is None or X.dtype.kind != "f":
        Y = X
        if lo is not None:
            Y = xp.maximum(Y, lo)
        if hi is not None:
            Y = xp.minimum(Y, hi)
        return _a(xp, Y.astype(X.dtype, copy=False), X)
    return clamp(xp, X, lo, hi)                     # against rows of the bounds: faster


@op("Clip", since=6, differentiable=("input",))
def Clip6(xp, input, *, max=3.4028234663852886e38, min=-3.4028234663852886e38):
    return (_clip(xp, input, min, max),)


@Clip6.gradient
def _(g, node, dY):
    X = node.inputs[0]
    return (g.private("ClipGrad", dY, X, g.scalar(node.attrs["min"], like=X),
                      g.scalar(node.attrs["max"], like=X)),)


@op("Clip", since=11, differentiable=("input",))
def Clip(xp, input, min=None, max=None):
    # min and max are not differentiable: exporters store ReLU6's bounds as float
    # initializers, which must not be trained as weights.
    return (_clip(xp, input, min, max),)


@Clip.gradient
def _(g, node, dY):
    ins = list(node.inputs) + ["", ""]
    grad = g.private("ClipGrad", dY, ins[0], ins[1] or None, ins[2] or None)
    return (grad,) + (None,) * (len(node.inputs) - 1)


@op("ClipGrad", domain="onnxgrad")
def ClipGrad(xp, dY, X, min=None, max=None):
    """dY where ``min <= X <= max``, else 0: a product with the mask, which runs
    several times faster than a select on an irregular mask (as ReluGrad), in
    parts on the thread pool."""
    if min is None and max is None:
        return (_a(xp, xp.array(dY, copy=True), dY),)
    if dY.shape != X.shape:
        X = xp.broadcast_to(X, dY.shape)
    if fused.on_device(xp):
        return (_a(xp, fused.clip_grad(xp, dY, X, min, max), dY),)
    if compiled.available(xp, dY, X):
        low, high = _bounds(X.dtype, min, max)
        dX = compiled.elementwise(_clip_grad_kernel, xp.empty(dY.shape, dtype=dY.dtype),
                                  xp.ascontiguousarray(dY), xp.ascontiguousarray(X), low, high)
        return (dX,)
    d1 = xp.ascontiguousarray(dY).reshape(-1)
    x1 = xp.ascontiguousarray(X).reshape(-1)
    dX = xp.empty(d1.shape, dtype=dY.dtype)

    def work(part):
        x = x1[part]
        inside = x >= min if min is not None else None
        if max is not None:
            inside = x <= max if inside is None else xp.logical_and(inside, x <= max, out=inside)
        xp.multiply(d1[part], inside.astype(dY.dtype), out=dX[part])

    by_rows(xp, d1.size, d1.size, work)
    return (_a(xp, dX.reshape(dY.shape), dY),)


def _bounds(dtype, low, high):
    """Clip's bounds as scalars of ``dtype``, infinite where not given."""
    return (dtype.type(-math.inf if low is None else low),
            dtype.type(math.inf if high is None else high))


@compiled.kernel
def _clip_kernel(x, low, high, out):
    """``out = min(max(x, low), high)`` in one pass (all ``high`` where ``low > high``,
    as the ONNX spec says); NaN stays NaN."""
    for i in range(out.size):
        v = x[i]
        v = low if v < low else v
        out[i] = high if v > high else v


@compiled.kernel
def _clip_grad_kernel(d, x, low, high, out):
    """``out = d`` where ``low <= x <= high``, else 0, in one pass."""
    for i in range(out.size):
        v = x[i]
        out[i] = d[i] if v >= low and v <= high else 0.0


@ClipGrad.in_standard_ops
def _(g, node):
    dY, X, *bounds = node.inputs
    low = bounds[0] if bounds and bounds[0] else None
    high = bounds[1] if len(bounds) > 1 and bounds[1] else None
    inside = None
    if low is not None:
        inside = g.GreaterOrEqual(X, low, dtype="bool")
    if high is not None:
        below = g.LessOrEqual(X, high, dtype="bool")
        inside = below if inside is None else g.And(inside, below, dtype="bool")
    if inside is None:
        return (g.Identity(dY),)
    return (g.Mul(dY, std.cast_like(g, inside, dY)),)


# -- PRelu ---------------------------------------------------------------------------------


@op("PRelu", since=6, differentiable=("X", "slope"))
def PRelu(xp, X, slope):
    return (_a(xp, xp.where(X > 0, X, X * slope), X),)


@PRelu.gradient
def _(g, node, dY):
    X, slope = node.inputs
    dX, dslope = g.private("PReluGrad", dY, X, slope, num_outputs=2)
    return (dX, dslope)


@op("PReluGrad", domain="onnxgrad")
def PReluGrad(xp, dY, X, slope):
    zero = xp.zeros((), dtype=dY.dtype)
    pos = X > 0
    dX = xp.where(pos, dY, dY * slope)
    (dslope,) = SumToShape(xp, xp.where(pos, zero, dY * X), slope.shape)
    return _a(xp, dX, dY), dslope


@PReluGrad.in_standard_ops
def _(g, node):
    dY, X, slope = node.inputs
    positive = g.Greater(X, std.like(g, 0, X), dtype="bool")
    dX = g.Where(positive, dY, g.Mul(dY, slope))
    dslope = g.private("SumToShape", g.Where(positive, std.like(g, 0, dY), g.Mul(dY, X)),
                       g.Shape(slope, dtype="int64"))
    return (dX, dslope)


# -- piecewise activations -----------------------------------------------------------------


@op("HardSigmoid", since=6, differentiable=("X",))
def HardSigmoid(xp, X, *, alpha=0.2, beta=0.5):
    return (_a(xp, xp.clip(X * alpha + beta, 0, 1).astype(X.dtype, copy=False), X),)


HardSigmoid.gradient(_rule("HardSigmoidGrad", "alpha", "beta"))


@op("HardSigmoidGrad", domain="onnxgrad")
def HardSigmoidGrad(xp, dY, X, *, alpha=0.2, beta=0.5):
    z = X * alpha + beta
    return (_a(xp, xp.where((z > 0) & (z < 1), dY * alpha, xp.zeros((), dtype=dY.dtype)), dY),)


@HardSigmoidGrad.in_standard_ops
def _(g, node):
    dY, X = node.inputs
    alpha = std.like(g, node.attrs.get("alpha", 0.2), X)
    z = g.Add(g.Mul(X, alpha), std.like(g, node.attrs.get("beta", 0.5), X))
    inside = g.And(g.Greater(z, std.like(g, 0, X), dtype="bool"),
                   g.Less(z, std.like(g, 1, X), dtype="bool"), dtype="bool")
    return (g.Where(inside, g.Mul(dY, alpha), std.like(g, 0, dY)),)


@op("HardSwish", since=14, differentiable=("X",))
def HardSwish(xp, X):
    return (_a(xp, X * xp.clip(X * (1 / 6) + 0.5, 0, 1).astype(X.dtype, copy=False), X),)


HardSwish.gradient(_rule("HardSwishGrad"))


@op("HardSwishGrad", domain="onnxgrad")
def HardSwishGrad(xp, dY, X):
    d = xp.where(X < -3, 0.0, xp.where(X <= 3, X * (1 / 3) + 0.5, 1.0)).astype(dY.dtype)
    return (_a(xp, dY * d, dY),)


@HardSwishGrad.in_standard_ops
def _(g, node):
    dY, X = node.inputs

    def c(value):
        return std.like(g, value, X)

    middle = g.Add(g.Mul(X, c(1 / 3)), c(0.5))
    d = g.Where(g.Less(X, c(-3), dtype="bool"), c(0.0),
                g.Where(g.LessOrEqual(X, c(3), dtype="bool"), middle, c(1.0)))
    return (g.Mul(dY, d),)


@op("Elu", since=6, differentiable=("X",))
def Elu(xp, X, *, alpha=1.0):
    return (_a(xp, xp.where(X > 0, X, alpha * xp.expm1(xp.minimum(X, 0))), X),)


Elu.gradient(_rule("EluGrad", "alpha"))


@op("EluGrad", domain="onnxgrad")
def EluGrad(xp, dY, X, *, alpha=1.0):
    return (_a(xp, xp.where(X > 0, dY, dY * (alpha * xp.exp(xp.minimum(X, 0)))), dY),)


@EluGrad.in_standard_ops
def _(g, node):
    dY, X = node.inputs
    zero = std.like(g, 0, X)
    slope = g.Mul(std.like(g, node.attrs.get("alpha", 1.0), X), g.Exp(g.Min(X, zero)))
    return (g.Where(g.Greater(X, zero, dtype="bool"), dY, g.Mul(dY, slope)),)


_SELU_ALPHA = 1.67326319217681884765625
_SELU_GAMMA = 1.05070102214813232421875


@op("Selu", since=6, differentiable=("X",))
def Selu(xp, X, *, alpha=_SELU_ALPHA, gamma=_SELU_GAMMA):
    return (_a(xp, gamma * xp.where(X > 0, X, alpha * xp.expm1(xp.minimum(X, 0))), X),)


Selu.gradient(_rule("SeluGrad", "alpha", "gamma"))


@op("SeluGrad", domain="onnxgrad")
def SeluGrad(xp, dY, X, *, alpha=_SELU_ALPHA, gamma=_SELU_GAMMA):
    d = xp.where(X > 0, gamma, (gamma * alpha) * xp.exp(xp.minimum(X, 0)))
    return (_a(xp, dY * d.astype(dY.dtype, copy=False), dY),)


@SeluGrad.in_standard_ops
def _(g, node):
    dY, X = node.inputs
    alpha, gamma = node.attrs.get("alpha", _SELU_ALPHA), node.attrs.get("gamma", _SELU_GAMMA)
    zero = std.like(g, 0, X)
    negative = g.Mul(std.like(g, gamma * alpha, X), g.Exp(g.Min(X, zero)))
    d = g.Where(g.Greater(X, zero, dtype="bool"), std.like(g, gamma, X), negative)
    return (g.Mul(dY, d),)


@op("Celu", since=12, differentiable=("X",))
def Celu(xp, X, *, alpha=1.0):
    return (_a(xp, xp.maximum(X, 0) + xp.minimum(0, alpha * xp.expm1(xp.minimum(X, 0) / alpha)), X),)


Celu.gradient(_rule("CeluGrad", "alpha"))


@op("CeluGrad", domain="onnxgrad")
def CeluGrad(xp, dY, X, *, alpha=1.0):
    return (_a(xp, xp.where(X > 0, dY, dY * xp.exp(xp.minimum(X, 0) / alpha)), dY),)


@CeluGrad.in_standard_ops
def _(g, node):
    dY, X = node.inputs
    zero = std.like(g, 0, X)
    alpha = std.like(g, node.attrs.get("alpha", 1.0), X)
    slope = g.Exp(g.Div(g.Min(X, zero), alpha))
    return (g.Where(g.Greater(X, zero, dtype="bool"), dY, g.Mul(dY, slope)),)


# -- smooth activations --------------------------------------------------------------------


def _softplus(xp, X):
    return xp.maximum(X, 0) + xp.log1p(xp.exp(-xp.abs(X)))


def _sigmoid(xp, X):
    e = xp.exp(-xp.abs(X))
    return xp.where(X >= 0, 1 / (1 + e), e / (1 + e))


@op("Softplus", since=1, differentiable=("X",))
def Softplus(xp, X):
    return (_a(xp, _softplus(xp, X), X),)


Softplus.gradient(_rule("SoftplusGrad"))


@op("SoftplusGrad", domain="onnxgrad")
def SoftplusGrad(xp, dY, X):
    return (_a(xp, dY * _sigmoid(xp, X), dY),)


@SoftplusGrad.in_standard_ops
def _(g, node):
    dY, X = node.inputs
    return (g.Mul(dY, g.Sigmoid(X)),)


@op("Softsign", since=1, differentiable=("input",))
def Softsign(xp, input):
    return (_a(xp, input / (1 + xp.abs(input)), input),)


Softsign.gradient(_rule("SoftsignGrad"))


@op("SoftsignGrad", domain="onnxgrad")
def SoftsignGrad(xp, dY, X):
    d = 1 + xp.abs(X)
    return (_a(xp, dY / (d * d), dY),)


@SoftsignGrad.in_standard_ops
def _(g, node):
    dY, X = node.inputs
    d = g.Add(std.like(g, 1, X), g.Abs(X))
    return (g.Div(dY, g.Mul(d, d)),)


@op("Mish", since=18, differentiable=("X",))
def Mish(xp, X):
    return (_a(xp, X * xp.tanh(_softplus(xp, X)), X),)


Mish.gradient(_rule("MishGrad"))


@op("MishGrad", domain="onnxgrad")
def MishGrad(xp, dY, X):
    t = xp.tanh(_softplus(xp, X))
    return (_a(xp, dY * (t + X * (1 - t * t) * _sigmoid(xp, X)), dY),)


@MishGrad.in_standard_ops
def _(g, node):
    dY, X = node.inputs
    t = g.Tanh(g.Softplus(X))
    slope = g.Add(t, g.Mul(g.Mul(X, g.Sub(std.like(g, 1, X), g.Mul(t, t))), g.Sigmoid(X)))
    return (g.Mul(dY, slope),)


# -- Hardmax, Shrink, ThresholdedRelu -------------------------------------------------------

@op("Hardmax", since=13, differentiable=("input",))
def Hardmax(xp, input, *, axis=-1):
    if input.size == 0:
        return (input,)
    axis = axis % input.ndim
    hot = xp.expand_dims(xp.argmax(input, axis=axis), axis)
    positions = xp.arange(input.shape[axis]).reshape(
        (-1,) + (1,) * (input.ndim - 1 - axis))
    return ((positions == hot).astype(input.dtype),)


@op("Hardmax", since=1, differentiable=("input",))
def Hardmax1(xp, input, *, axis=1):
    """Before opset 13 the input is seen as a 2-D matrix [prod(:axis), prod(axis:)]."""
    shape = input.shape
    axis = axis % max(input.ndim, 1)
    rows = math.prod(shape[:axis])
    (y,) = Hardmax(xp, input.reshape(rows, -1), axis=1)
    return (y.reshape(shape),)


def _hardmax_rule(g, node, dY):
    # Piecewise constant: its derivative is zero wherever it exists (everywhere but
    # at ties), exactly, as argmax's is.
    from onnxgrad.ops.tensor import zeros_like_value  # noqa: PLC0415

    return (zeros_like_value(g, node.inputs[0]),)


Hardmax.gradient(_hardmax_rule)
Hardmax1.gradient(_hardmax_rule)


@op("Shrink", since=9, differentiable=("input",))
def Shrink(xp, input, *, bias=0.0, lambd=0.5):
    x = input
    out = xp.where(x < -lambd, x + bias, xp.where(x > lambd, x - bias, 0))
    return (out.astype(x.dtype),)


@op("ShrinkGrad", domain="onnxgrad")
def ShrinkGrad(xp, dY, input, *, lambd=0.5):
    return (xp.where(xp.abs(input) > lambd, dY, 0).astype(dY.dtype),)


@ShrinkGrad.in_standard_ops
def _(g, node):
    dY, X = node.inputs
    outside = g.Greater(g.Abs(X), std.like(g, node.attrs.get("lambd", 0.5), X), dtype="bool")
    return (g.Where(outside, dY, std.like(g, 0, dY)),)


@Shrink.gradient
def _(g, node, dY):
    return (g.private("ShrinkGrad", dY, node.inputs[0], lambd=node.attrs["lambd"]),)


@op("ThresholdedRelu", since=10, differentiable=("X",))
def ThresholdedRelu(xp, X, *, alpha=1.0):
    return (xp.where(X > alpha, X, 0).astype(X.dtype),)


@op("ThresholdedReluGrad", domain="onnxgrad")
def ThresholdedReluGrad(xp, dY, X, *, alpha=1.0):
    return (xp.where(X > alpha, dY, 0).astype(dY.dtype),)


@ThresholdedReluGrad.in_standard_ops
def _(g, node):
    dY, X = node.inputs
    above = g.Greater(X, std.like(g, node.attrs.get("alpha", 1.0), X), dtype="bool")
    return (g.Where(above, dY, std.like(g, 0, dY)),)


@ThresholdedRelu.gradient
def _(g, node, dY):
    return (g.private("ThresholdedReluGrad", dY, node.inputs[0], alpha=node.attrs["alpha"]),)
