"""Sampling grids: AffineGrid and GridSample, in 2-D and 3-D (GridSample any rank),
with their gradients.

GridSample follows ONNX (and PyTorch's ``grid_sample``): grid coordinates
are normalized to [-1, 1], the last grid axis lists them innermost spatial
axis first (x, y, z), ``align_corners`` maps -1 and 1 to the centres (1) or
the outer edges (0) of the corner pixels, and ``padding_mode`` decides what
lies outside: zeros, the border pixel, or the image reflected at its edges.
Interpolation is nearest (round half to even), linear or cubic (Keys,
a = -0.75).  The kernel is vectorized: one gather per corner of the
interpolation stencil.

The private ``GridSampleGrad`` walks the same stencil: it adds ``dY`` times
each tap's weight into ``dX`` and, for ``grid``, differentiates the tap
weights (zero for nearest, and where border padding clamps a coordinate).
``AffineGridGrad`` contracts the grid's gradient with the base grid; its
standard form does so with a MatMul against the base grid as a constant, where
the grid's spatial shape is static.
"""

from __future__ import annotations

import itertools

import numpy as np  # host constants for attributes

from onnxgrad.errors import ModelError
from onnxgrad.ops import standard as std
from onnxgrad.ops.indexing import _scatter_add
from onnxgrad.ops.registry import op

_A = -0.75  # Keys' cubic convolution parameter


def _denormalize(n, size: int, align_corners: int):
    if align_corners:
        return (n + 1) / 2.0 * (size - 1)
    return ((n + 1) * size - 1) / 2.0


def _reflect(xp, x, low: float, high: float, slope: bool = False):
    """Reflect ``x`` at ``low`` and ``high`` until it lies between them; with
    ``slope``, also d(result)/dx (±1)."""
    span = high - low
    if span <= 0:
        folded = xp.full_like(x, low)
        return (folded, xp.zeros_like(x)) if slope else folded
    below, above = x < low, x > high
    d = xp.where(below, low - x, x - high)
    n = xp.trunc(d / span)
    r = d - n * span
    even = (n % 2) == 0
    folded_below = xp.where(even, low + r, high - r)
    folded_above = xp.where(even, high - r, low + r)
    folded = xp.where(below, folded_below, xp.where(above, folded_above, x))
    if not slope:
        return folded
    return folded, xp.where((below | above) & even, -1.0, 1.0)


def _cubic(xp, t):
    """Keys' cubic convolution weights of the 4 taps around a point at ``t`` in [0, 1)."""
    def near(s):  # |s| <= 1
        return ((_A + 2) * s - (_A + 3)) * s * s + 1

    def far(s):  # 1 < |s| < 2
        return ((_A * s - 5 * _A) * s + 8 * _A) * s - 4 * _A

    return [far(t + 1), near(t), near(1 - t), far(2 - t)]


def _cubic_slopes(xp, t):
    """d/dt of :func:`_cubic`'s four weights."""
    def near(s):
        return (3 * (_A + 2) * s - 2 * (_A + 3)) * s

    def far(s):
        return (3 * _A * s - 10 * _A) * s + 8 * _A

    return [far(t + 1), near(t), -near(1 - t), -far(2 - t)]


def _check(X, grid, mode, padding_mode):
    mode = {"bilinear": "linear", "bicubic": "cubic"}.get(mode, mode)
    if mode not in ("nearest", "linear", "cubic"):
        raise ModelError(f"GridSample: unknown mode {mode!r}")
    if padding_mode not in ("zeros", "border", "reflection"):
        raise ModelError(f"GridSample: unknown padding_mode {padding_mode!r}")
    nd = X.ndim - 2
    if grid.shape[-1] != nd or grid.ndim != nd + 2:
        raise ModelError(f"GridSample: a grid of shape {list(grid.shape)} does not fit an input "
                         f"of shape {list(X.shape)}")
    return mode


def _stencil(xp, dims, grid, align_corners, mode, padding_mode):
    """Per spatial axis (in X's order), the taps ``(index, inside, weight, slope)``:
    an index safe to gather with, the mask of real pixels (zeros padding, else None),
    the interpolation weight (None for nearest) and d(weight)/d(grid coordinate)."""
    nd = len(dims)
    taps_per_axis = []
    for i, size in enumerate(dims):
        x = _denormalize(grid[..., nd - 1 - i], size, align_corners)
        dx = (size - 1) / 2.0 if align_corners else size / 2.0  # dx/dgrid, then through padding
        low, high = (0.0, size - 1.0) if align_corners else (-0.5, size - 0.5)
        if mode == "nearest":
            x = xp.rint(x)
        if padding_mode == "border":  # (only outside [low, high]: cubic taps see the difference)
            outside = (x < low) | (x > high)
            x = xp.where(outside, xp.clip(x, 0, size - 1), x)
            dx = xp.where(outside, 0.0, dx)
        elif padding_mode == "reflection":
            x, fold = _reflect(xp, x, low, high, slope=True)
            dx = dx * fold
        if mode == "nearest":
            taps = [(xp.trunc(x).astype(xp.int64), None, None)]
        else:
            base = xp.floor(x)
            t = x - base
            base = base.astype(xp.int64)
            if mode == "linear":
                taps = [(base, 1 - t, -dx), (base + 1, t, dx)]
            else:
                taps = [(base + k - 1, w, s * dx)
                        for k, (w, s) in enumerate(zip(_cubic(xp, t), _cubic_slopes(xp, t)))]
        taps_per_axis.append([_fix_index(xp, idx, size, low, high, padding_mode) + (w, s)
                              for idx, w, s in taps])
    return taps_per_axis


def _fix_index(xp, idx, size, low, high, padding_mode):
    """A tap's index made safe to gather with, and (zeros mode) the mask of real pixels."""
    if padding_mode == "zeros":
        valid = (idx >= 0) & (idx < size)
        return xp.clip(idx, 0, size - 1), valid
    if padding_mode == "border":
        return xp.clip(idx, 0, size - 1), None
    folded = _reflect(xp, idx.astype(xp.float64), low, high)
    return xp.clip(xp.trunc(folded).astype(xp.int64), 0, size - 1), None


def _corners(xp, X, grid, align_corners, mode, padding_mode):
    """Each corner of the stencil: (gather index into X with channels last, mask, weight,
    the weight's slope per axis)."""
    n = X.shape[0]
    batch = xp.arange(n).reshape((n,) + (1,) * (grid.ndim - 2))
    for combo in itertools.product(*_stencil(xp, X.shape[2:], grid, align_corners, mode,
                                             padding_mode)):
        index, weight, inside = [batch], None, None
        for idx, valid, w, _ in combo:
            index.append(idx)
            if w is not None:
                weight = w if weight is None else weight * w
            if valid is not None:
                inside = valid if inside is None else inside & valid
        yield tuple(index), inside, weight, combo


@op("GridSample", since=16, differentiable=("X", "grid"))
def GridSample(xp, X, grid, *, align_corners=0, mode="linear", padding_mode="zeros"):
    mode = _check(X, grid, mode, padding_mode)
    n, c = X.shape[:2]
    out = grid.shape[1:-1]
    if n == 0 or c == 0 or any(o == 0 for o in out):
        return (xp.zeros((n, c) + tuple(out), dtype=X.dtype),)
    data = xp.moveaxis(X, 1, -1)  # (N, *dims, C): a gather gives (N, *out, C)
    total = None
    for index, inside, weight, _ in _corners(xp, X, grid, align_corners, mode, padding_mode):
        value = data[index].astype(xp.float64)
        if inside is not None:
            value = value * inside[..., None]
        if weight is not None:
            value = value * weight[..., None].astype(xp.float64)
        total = value if total is None else total + value
    return (xp.moveaxis(total, -1, 1).astype(X.dtype),)


@GridSample.gradient
def _(g, node, dY):
    X, grid = node.inputs
    return tuple(g.private("GridSampleGrad", dY, X, grid, num_outputs=2, **node.attrs))


@op("GridSampleGrad", domain="onnxgrad")
def GridSampleGrad(xp, dY, X, grid, *, align_corners=0, mode="linear", padding_mode="zeros"):
    """Gradients of GridSample for X and grid."""
    mode = _check(X, grid, mode, padding_mode)
    n, c = X.shape[:2]
    dims = X.shape[2:]
    nd = len(dims)
    data = xp.moveaxis(X, 1, -1)
    dy = xp.moveaxis(dY, 1, -1).astype(xp.float64)           # (N, *out, C)
    strides = [1] * (nd + 1)                                  # of (N, *dims) in elements
    for k in range(nd - 1, -1, -1):
        strides[k] = strides[k + 1] * dims[k]
    dX = xp.zeros(X.size, dtype=xp.float64)
    dgrid = xp.zeros(grid.shape, dtype=xp.float64)
    channels = xp.arange(c)
    for index, inside, weight, combo in _corners(xp, X, grid, align_corners, mode, padding_mode):
        share = 1.0 if weight is None else weight
        if inside is not None:
            share = share * inside
        position = sum(i * s for i, s in zip(index, strides))  # flat (N, *dims) position
        dX += _scatter_add(xp, X.size, position[..., None] * c + channels,
                           dy * xp.asarray(share, dtype=xp.float64)[..., None], xp.float64)
        if mode == "nearest":
            continue
        value = xp.sum(dy * data[index], axis=-1)                # (N, *out)
        if inside is not None:
            value = value * inside
        for i, (_, _, _, slope) in enumerate(combo):
            others = value * slope
            for j, (_, _, w, _) in enumerate(combo):
                if j != i:
                    others = others * w
            dgrid[..., nd - 1 - i] += others
    dX = xp.moveaxis(dX.reshape((n,) + tuple(dims) + (c,)), -1, 1)
    return xp.ascontiguousarray(dX).astype(X.dtype), dgrid.astype(grid.dtype)


def _base_grid(xp, spatial, align_corners):
    """The homogeneous coordinates (x, y[, z], 1) of every output point, [points, nd + 1]."""
    axes = []
    for s in spatial:
        if align_corners:
            a = xp.linspace(-1.0, 1.0, s) if s > 1 else xp.zeros(1)
        else:
            a = (2 * xp.arange(s, dtype=xp.float64) + 1) / s - 1
        axes.append(a)
    mesh = xp.meshgrid(*axes, indexing="ij")  # D, H, W order
    base = xp.stack(list(mesh[::-1]) + [xp.ones_like(mesh[0])], axis=-1)
    return base.reshape(-1, len(spatial) + 1)


@op("AffineGrid", since=20, differentiable=("theta",), host_inputs=("size",))
def AffineGrid(xp, theta, size, *, align_corners=0):
    size = [int(s) for s in size]
    spatial = size[2:]
    nd = len(spatial)
    if nd not in (2, 3) or tuple(theta.shape[1:]) != (nd, nd + 1):
        raise ModelError(f"AffineGrid: theta of shape {list(theta.shape)} does not fit size {size}")
    flat = _base_grid(xp, spatial, align_corners)
    grid = xp.einsum("pk,njk->npj", flat, theta.astype(xp.float64))
    return (grid.reshape([size[0]] + spatial + [nd]).astype(theta.dtype),)


@AffineGrid.gradient
def _(g, node, dgrid):
    return (g.private("AffineGridGrad", dgrid, align_corners=node.attrs["align_corners"]), None)


@op("AffineGridGrad", domain="onnxgrad")
def AffineGridGrad(xp, dgrid, *, align_corners=0):
    """Gradient of AffineGrid for theta: Σ_points dgrid[n, p, j] · base[p, k]."""
    nd = dgrid.shape[-1]
    flat = _base_grid(xp, dgrid.shape[1:-1], align_corners)
    dtheta = xp.einsum("npj,pk->njk", dgrid.reshape(dgrid.shape[0], -1, nd).astype(xp.float64),
                       flat)
    return (dtheta.astype(dgrid.dtype),)


@AffineGridGrad.in_standard_ops
def _(g, node):
    # The base grid is a float64 constant where the grid's spatial shape is static
    # (None where it is not): dtheta = dgrid (N, P, nd)ᵀ · base (P, nd + 1), in float64.
    (dgrid,) = node.inputs
    shape = g.shape(dgrid)
    if shape is None or len(shape) not in (4, 5) or not all(
            isinstance(d, int) for d in shape[1:]):
        return None
    nd = shape[-1]
    base = g.const(_base_grid(np, shape[1:-1], node.attrs.get("align_corners", 0)),
                   dtype=np.float64)
    flat = g.Reshape(g.Cast(dgrid, to=std.tensor_type(np.float64), dtype=np.float64),
                     g.ints([0, -1, nd]))
    dtheta = g.MatMul(g.Transpose(flat, perm=[0, 2, 1]), base)
    return (g.Cast(dtheta, to=std.tensor_type(g.dtype(dgrid)), dtype=g.dtype(dgrid)),)


# -- GridSampleGrad in standard ops ---------------------------------------------------------------
# The kernel's stencil written as graph nodes, in float64 (as the kernel computes): per spatial
# axis the taps' indices (as float64 integers), masks, weights and slopes; per corner of the
# stencil one Gather of X (channels last, flattened to (N·pixels, C)) for dgrid and one
# ScatterND-add into dX.  The shapes of X and grid must be static.

def _g_reflect(g, x, low: float, high: float, slope: bool = False):
    """:func:`_reflect` in graph nodes (float64 ``x``)."""
    f64 = np.float64
    span = high - low
    if span <= 0:
        folded = g.Add(g.Mul(x, g.const(0.0, f64)), g.const(low, f64))
        return (folded, g.Mul(x, g.const(0.0, f64))) if slope else folded
    below, above = g.Less(x, g.const(low, f64)), g.Greater(x, g.const(high, f64))
    d = g.Where(below, g.Sub(g.const(low, f64), x), g.Sub(x, g.const(high, f64)))
    n = g.Floor(g.Div(d, g.const(span, f64)))  # d >= 0 wherever the result reads it
    r = g.Sub(d, g.Mul(n, g.const(span, f64)))
    even = g.Equal(g.Mod(n, g.const(2.0, f64), fmod=1), g.const(0.0, f64))
    up, down = g.Add(g.const(low, f64), r), g.Sub(g.const(high, f64), r)
    folded = g.Where(below, g.Where(even, up, down), g.Where(above, g.Where(even, down, up), x))
    if not slope:
        return folded
    flip = g.And(g.Or(below, above), even)
    return folded, g.Where(flip, g.const(-1.0, f64), g.const(1.0, f64))


def _g_poly(g, t, coeffs):
    """Σ coeffs[k] · t^k by Horner (highest first), float64."""
    acc = g.const(float(coeffs[0]), np.float64)
    for c in coeffs[1:]:
        acc = g.Add(g.Mul(acc, t), g.const(float(c), np.float64))
    return acc


def _g_cubic(g, t):
    """:func:`_cubic` and :func:`_cubic_slopes` in graph nodes: (weights, slopes)."""
    one = g.const(1.0, np.float64)
    near = [_A + 2, -(_A + 3), 0.0, 1.0]            # in s, |s| <= 1
    far = [_A, -5 * _A, 8 * _A, -4 * _A]            # in s, 1 < |s| < 2
    dnear = [3 * (_A + 2), -2 * (_A + 3), 0.0]
    dfar = [3 * _A, -10 * _A, 8 * _A]
    s = [g.Add(t, one), t, g.Sub(one, t), g.Sub(g.const(2.0, np.float64), t)]
    weights = [_g_poly(g, s[0], far), _g_poly(g, s[1], near), _g_poly(g, s[2], near),
               _g_poly(g, s[3], far)]
    slopes = [_g_poly(g, s[0], dfar), _g_poly(g, s[1], dnear),
              g.Neg(_g_poly(g, s[2], dnear)), g.Neg(_g_poly(g, s[3], dfar))]
    return weights, slopes


def _g_fix_index(g, idx, size, low, high, padding_mode):
    """:func:`_fix_index` on float64 integer indices: (index, mask or None)."""
    f64 = np.float64
    zero, top = g.const(0.0, f64), g.const(float(size - 1), f64)
    if padding_mode == "zeros":
        valid = g.And(g.GreaterOrEqual(idx, zero), g.Less(idx, g.const(float(size), f64)))
        return g.Clip(idx, zero, top), valid
    if padding_mode == "border":
        return g.Clip(idx, zero, top), None
    # trunc then clip at 0 equals floor then clip at 0
    return g.Clip(g.Floor(_g_reflect(g, idx, low, high)), zero, top), None


def _g_stencil(g, grid64, dims, align_corners, mode, padding_mode):
    """:func:`_stencil` in graph nodes: per axis, taps (index, mask, weight, slope)."""
    f64 = np.float64
    nd = len(dims)
    taps_per_axis = []
    for i, size in enumerate(dims):
        n = g.Gather(grid64, g.const(nd - 1 - i, np.int64), axis=-1)
        one = g.const(1.0, f64)
        if align_corners:
            x = g.Mul(g.Div(g.Add(n, one), g.const(2.0, f64)), g.const(float(size - 1), f64))
        else:
            x = g.Div(g.Sub(g.Mul(g.Add(n, one), g.const(float(size), f64)), one),
                      g.const(2.0, f64))
        dx = g.const((size - 1) / 2.0 if align_corners else size / 2.0, f64)
        low, high = (0.0, size - 1.0) if align_corners else (-0.5, size - 0.5)
        if mode == "nearest":
            x = g.Round(x)
        if padding_mode == "border":
            outside = g.Or(g.Less(x, g.const(low, f64)), g.Greater(x, g.const(high, f64)))
            x = g.Where(outside, g.Clip(x, g.const(0.0, f64), g.const(float(size - 1), f64)), x)
            dx = g.Where(outside, g.const(0.0, f64), dx)
        elif padding_mode == "reflection":
            x, fold = _g_reflect(g, x, low, high, slope=True)
            dx = g.Mul(dx, fold)
        if mode == "nearest":  # x is whole here (border clips to whole bounds)
            taps = [(x, None, None)]
        else:
            base = g.Floor(x)
            t = g.Sub(x, base)
            if mode == "linear":
                taps = [(base, g.Sub(one, t), g.Neg(dx)), (g.Add(base, one), t, dx)]
            else:
                weights, slopes = _g_cubic(g, t)
                taps = [(g.Add(base, g.const(float(k - 1), f64)), w, g.Mul(s, dx))
                        for k, (w, s) in enumerate(zip(weights, slopes))]
        taps_per_axis.append([_g_fix_index(g, idx, size, low, high, padding_mode) + (w, s)
                              for idx, w, s in taps])
    return taps_per_axis


@GridSampleGrad.in_standard_ops
def _(g, node):
    dY, X, grid = node.inputs
    attrs = node.attrs
    mode = {"bilinear": "linear", "bicubic": "cubic"}.get(attrs.get("mode", "linear"),
                                                          attrs.get("mode", "linear"))
    padding_mode = attrs.get("padding_mode", "zeros")
    align_corners = attrs.get("align_corners", 0)
    xs, gs = std.tensor_shape(g, X), std.tensor_shape(g, grid)
    if (mode not in ("nearest", "linear", "cubic")
            or padding_mode not in ("zeros", "border", "reflection")
            or xs is None or gs is None or len(xs) < 3 or len(gs) != len(xs)
            or not all(isinstance(d, int) and d > 0 for d in xs + gs)
            or gs[-1] != len(xs) - 2 or gs[0] != xs[0]):
        return None
    f64 = np.float64
    n, c, dims = xs[0], xs[1], list(xs[2:])
    nd = len(dims)
    pixels = int(np.prod(dims))
    to64 = std.tensor_type(f64)
    grid64 = g.Cast(grid, to=to64, dtype=f64)
    perm = [0] + list(range(2, nd + 2)) + [1]                       # channels last
    data = g.Reshape(g.Cast(g.Transpose(X, perm=perm), to=to64, dtype=f64),
                     g.ints([n * pixels, c]))
    dy = g.Cast(g.Transpose(dY, perm=perm), to=to64, dtype=f64)     # (N, *out, C)
    strides = [int(np.prod(dims[k + 1:])) for k in range(nd)]
    batch = g.const((np.arange(n) * pixels).reshape((n,) + (1,) * nd).astype(f64), f64)
    dX = std.zeros(g, g.ints([n * pixels, c]), data)
    totals = [None] * nd                                              # per X axis
    stencil = _g_stencil(g, grid64, dims, align_corners, mode, padding_mode)
    for combo in itertools.product(*stencil):
        position, weight, inside = batch, None, None
        for (idx, valid, w, _), stride in zip(combo, strides):
            position = g.Add(position, g.Mul(idx, g.const(float(stride), f64)))
            if w is not None:
                weight = w if weight is None else g.Mul(weight, w)
            if valid is not None:
                inside = valid if inside is None else g.And(inside, valid)
        position = g.Cast(position, to=std.tensor_type(np.int64), dtype=np.int64)
        mask = None if inside is None else g.Cast(inside, to=to64, dtype=f64)
        share = weight
        if mask is not None:
            share = mask if share is None else g.Mul(share, mask)
        updates = dy if share is None else g.Mul(dy, g.Unsqueeze(share, g.ints([-1])))
        dX = g.ScatterND(dX, g.Unsqueeze(position, g.ints([-1])), updates, reduction="add")
        if mode == "nearest":
            continue
        value = g.ReduceSum(g.Mul(dy, g.Gather(data, position, axis=0)), g.ints([-1]),
                            keepdims=0)                               # (N, *out)
        if mask is not None:
            value = g.Mul(value, mask)
        for i, (_, _, _, slope) in enumerate(combo):
            others = g.Mul(value, slope)
            for j, (_, _, w, _) in enumerate(combo):
                if j != i:
                    others = g.Mul(others, w)
            totals[i] = others if totals[i] is None else g.Add(totals[i], others)
    dX = g.Reshape(dX, g.ints([n] + dims + [c]))
    dX = g.Transpose(dX, perm=[0, nd + 1] + list(range(1, nd + 1)))
    dX = g.Cast(dX, to=std.tensor_type(g.dtype(X)), dtype=g.dtype(X))
    if mode == "nearest":
        dgrid = std.zeros(g, g.ints(gs), grid)
    else:
        columns = [g.Unsqueeze(totals[nd - 1 - k], g.ints([-1])) for k in range(nd)]
        dgrid = columns[0] if nd == 1 else g.Concat(*columns, axis=-1)
        dgrid = g.Cast(dgrid, to=std.tensor_type(g.dtype(grid)), dtype=g.dtype(grid))
    return dX, dgrid
