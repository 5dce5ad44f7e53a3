"""Sampling grids: AffineGrid and GridSample, in 2-D and 3-D (GridSample any rank).

GridSample follows ONNX (and PyTorch's ``grid_sample``): grid coordinates
are normalized to [-1, 1], the last grid axis lists them innermost spatial
axis first (x, y, z), ``align_corners`` maps -1 and 1 to the centres (1) or
the outer edges (0) of the corner pixels, and ``padding_mode`` decides what
lies outside: zeros, the border pixel, or the image reflected at its edges.
Interpolation is nearest (round half to even), linear or cubic (Keys,
a = -0.75).  The kernel is vectorized: one gather per corner of the
interpolation stencil.  Forward only: X, grid and theta are declared
differentiable without a rule.
"""

from __future__ import annotations

import itertools

from onnxgrad.errors import ModelError
from onnxgrad.ops.registry import op


def _denormalize(n, size: int, align_corners: int):
    if align_corners:
        return (n + 1) / 2.0 * (size - 1)
    return ((n + 1) * size - 1) / 2.0


def _reflect(xp, x, low: float, high: float):
    """Reflect ``x`` at ``low`` and ``high`` until it lies between them."""
    span = high - low
    if span <= 0:
        return xp.full_like(x, low)
    below, above = x < low, x > high
    d = xp.where(below, low - x, x - high)
    n = xp.trunc(d / span)
    r = d - n * span
    even = (n % 2) == 0
    folded_below = xp.where(even, low + r, high - r)
    folded_above = xp.where(even, high - r, low + r)
    return xp.where(below, folded_below, xp.where(above, folded_above, x))


def _cubic(xp, t):
    """Keys' cubic convolution weights of the 4 taps around a point at ``t`` in [0, 1)."""
    a = -0.75

    def near(s):  # |s| <= 1
        return ((a + 2) * s - (a + 3)) * s * s + 1

    def far(s):  # 1 < |s| < 2
        return ((a * s - 5 * a) * s + 8 * a) * s - 4 * a

    return [far(t + 1), near(t), near(1 - t), far(2 - t)]


@op("GridSample", since=16, differentiable=("X", "grid"))
def GridSample(xp, X, grid, *, align_corners=0, mode="linear", padding_mode="zeros"):
    mode = {"bilinear": "linear", "bicubic": "cubic"}.get(mode, mode)
    if mode not in ("nearest", "linear", "cubic"):
        raise ModelError(f"GridSample: unknown mode {mode!r}")
    if padding_mode not in ("zeros", "border", "reflection"):
        raise ModelError(f"GridSample: unknown padding_mode {padding_mode!r}")
    dims = X.shape[2:]
    nd = len(dims)
    if grid.shape[-1] != nd or grid.ndim != nd + 2:
        raise ModelError(f"GridSample: a grid of shape {list(grid.shape)} does not fit an input "
                         f"of shape {list(X.shape)}")
    n, c = X.shape[:2]
    out = grid.shape[1:-1]
    if n == 0 or c == 0 or any(o == 0 for o in out):
        return (xp.zeros((n, c) + tuple(out), dtype=X.dtype),)
    data = xp.moveaxis(X, 1, -1)  # (N, *dims, C): a gather gives (N, *out, C)
    batch = xp.arange(n).reshape((n,) + (1,) * len(out))
    # Per spatial axis (in X's order): the taps (integer index, weight).
    taps_per_axis = []
    for i, size in enumerate(dims):
        x = _denormalize(grid[..., nd - 1 - i], size, align_corners)
        low, high = (0.0, size - 1.0) if align_corners else (-0.5, size - 0.5)
        if mode == "nearest":
            x = xp.rint(x)
        if padding_mode == "border":  # (only outside [low, high]: cubic taps see the difference)
            x = xp.where((x < low) | (x > high), xp.clip(x, 0, size - 1), x)
        elif padding_mode == "reflection":
            x = _reflect(xp, x, low, high)
        if mode == "nearest":
            taps = [(xp.trunc(x).astype(xp.int64), None)]
        else:
            base = xp.floor(x)
            t = x - base
            base = base.astype(xp.int64)
            if mode == "linear":
                taps = [(base, 1 - t), (base + 1, t)]
            else:
                taps = [(base + k - 1, w) for k, w in enumerate(_cubic(xp, t))]
        taps_per_axis.append([(_fix_index(xp, idx, size, low, high, padding_mode), w)
                              for idx, w in taps])
    total = None
    for combo in itertools.product(*taps_per_axis):
        index, weight, inside = [batch], None, None
        for (idx, valid), w in combo:
            index.append(idx)
            if w is not None:
                weight = w if weight is None else weight * w
            if valid is not None:
                inside = valid if inside is None else inside & valid
        value = data[tuple(index)].astype(xp.float64)
        if inside is not None:
            value = value * inside[..., None]
        if weight is not None:
            value = value * weight[..., None].astype(xp.float64)
        total = value if total is None else total + value
    return (xp.moveaxis(total, -1, 1).astype(X.dtype),)


def _fix_index(xp, idx, size, low, high, padding_mode):
    """A tap's index made safe to gather with, and (zeros mode) the mask of real pixels."""
    if padding_mode == "zeros":
        valid = (idx >= 0) & (idx < size)
        return xp.clip(idx, 0, size - 1), valid
    if padding_mode == "border":
        return xp.clip(idx, 0, size - 1), None
    folded = _reflect(xp, idx.astype(xp.float64), low, high)
    return xp.clip(xp.trunc(folded).astype(xp.int64), 0, size - 1), None


@op("AffineGrid", since=20, differentiable=("theta",), host_inputs=("size",))
def AffineGrid(xp, theta, size, *, align_corners=0):
    size = [int(s) for s in size]
    spatial = size[2:]
    nd = len(spatial)
    if nd not in (2, 3) or tuple(theta.shape[1:]) != (nd, nd + 1):
        raise ModelError(f"AffineGrid: theta of shape {list(theta.shape)} does not fit size {size}")
    axes = []
    for s in spatial:
        if align_corners:
            a = xp.linspace(-1.0, 1.0, s) if s > 1 else xp.zeros(1)
        else:
            a = (2 * xp.arange(s, dtype=xp.float64) + 1) / s - 1
        axes.append(a)
    mesh = xp.meshgrid(*axes, indexing="ij")  # D, H, W order
    # Homogeneous coordinates, innermost axis first: (x, y[, z], 1).
    base = xp.stack(list(mesh[::-1]) + [xp.ones_like(mesh[0])], axis=-1)
    flat = base.reshape(-1, nd + 1)
    grid = xp.einsum("pk,njk->npj", flat, theta.astype(xp.float64))
    return (grid.reshape([size[0]] + spatial + [nd]).astype(theta.dtype),)
