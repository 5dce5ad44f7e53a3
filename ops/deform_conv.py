"""DeformConv (opset 19): 2-D convolution whose kernel taps sample the input at learned
offsets, bilinearly, optionally scaled by a mask (deformable convolution v1/v2).

For output position ``(i, j)`` and kernel tap ``(u, v)`` of offset group ``o``
the tap reads channel ``c`` (of group ``o``) at

    (i·stride_h - pad_top + u·dilation_h + Δh,  j·stride_w - pad_left + v·dilation_w + Δw)

bilinearly, with zeros outside the image (GridSample with align_corners=1),
times ``mask[o, u, v, i, j]``; the sampled columns then meet the weights as
in a grouped convolution.

The private ``DeformConvGrad`` recomputes the sampled columns and returns the
gradients of X, W, offset, B and mask: the weights' and the mask's from the
columns, X's by adding each tap's bilinear weights times its column gradient
back into the image, and the offsets' from the slopes of those weights.  Its standard
form (for convert and second order) needs the static shapes of X, W and offset.
"""

from __future__ import annotations

import numpy as np  # host constants for attributes

from onnxgrad.ops import standard as std
from onnxgrad.ops.conv import _ints
from onnxgrad.ops.indexing import _scatter_add
from onnxgrad.ops.registry import op


def _corners(xp, H, W, py, px):
    """The 4 bilinear corners of points ``py``/``px``: (flat index, weight with zeros
    outside the image, d(weight)/dpy, d(weight)/dpx)."""
    y0, x0 = xp.floor(py), xp.floor(px)
    for dy in (0, 1):
        for dx in (0, 1):
            y, x = y0 + dy, x0 + dx
            wy, wx = 1 - xp.abs(py - y), 1 - xp.abs(px - x)
            inside = (y >= 0) & (y <= H - 1) & (x >= 0) & (x <= W - 1)
            index = (xp.clip(y, 0, H - 1) * W + xp.clip(x, 0, W - 1)).astype("int64")
            sy, sx = (2 * dy - 1), (2 * dx - 1)   # slopes of wy, wx (corner above/left: -1)
            yield (index, xp.where(inside, wy * wx, 0), xp.where(inside, sy * wx, 0),
                   xp.where(inside, wy * sx, 0))


def _sample(xp, X, py, px):
    """Bilinear samples of ``X`` (N, O, Cg, H, W) at ``py``/``px`` (N, O, T): (N, O, Cg, T)."""
    N, O, Cg, H, W = X.shape
    flat = X.reshape(N, O, Cg, H * W)
    out = None
    for index, weight, _, _ in _corners(xp, H, W, py, px):
        values = xp.take_along_axis(flat, index[:, :, None, :], axis=3)
        term = values * weight.astype(X.dtype)[:, :, None, :]
        out = term if out is None else out + term
    return out


def _sample_backward(xp, X, py, px, dS):
    """The gradients of :func:`_sample` for X, py and px, given that of its output."""
    N, O, Cg, H, W = X.shape
    flat = X.reshape(N, O, Cg, H * W)
    planes = (xp.arange(N * O * Cg) * (H * W)).reshape(N, O, Cg, 1)
    dX = xp.zeros(X.size, dtype=dS.dtype)
    dpy = xp.zeros(py.shape, dtype=dS.dtype)
    dpx = xp.zeros(px.shape, dtype=dS.dtype)
    for index, weight, slope_y, slope_x in _corners(xp, H, W, py, px):
        dX += _scatter_add(xp, X.size, planes + index[:, :, None, :],
                           dS * weight[:, :, None, :], dS.dtype)
        reach = xp.sum(dS * xp.take_along_axis(flat, index[:, :, None, :], axis=3), axis=2)
        dpy += reach * slope_y
        dpx += reach * slope_x
    return dX.reshape(X.shape), dpy, dpx


def _geometry(xp, X, W, offset, dilations, group, kernel_shape, offset_group, pads, strides):
    """Shapes and the sampling points: (N, C, H, Wd, M, K, oh, ow, group, og, py, px)."""
    if X.ndim != 4:
        raise ValueError(f"DeformConv: onnxgrad implements the 2-D case; X has shape "
                         f"{tuple(X.shape)}")
    N, C, H, Wd = X.shape
    M = W.shape[0]
    kh, kw = (int(k) for k in (kernel_shape or W.shape[2:]))
    sh, sw = _ints(strides, 2, 1)
    dh, dw = _ints(dilations, 2, 1)
    top, left, bottom, right = _ints(pads, 4, 0)
    group, og = int(group), int(offset_group)
    oh = (H + top + bottom - (kh - 1) * dh - 1) // sh + 1
    ow = (Wd + left + right - (kw - 1) * dw - 1) // sw + 1
    K = kh * kw
    if C != W.shape[1] * group or M % group or C % og:
        raise ValueError(f"DeformConv: X {tuple(X.shape)}, W {tuple(W.shape)}, group {group} "
                         f"and offset_group {og} do not fit")
    if tuple(offset.shape) != (N, og * K * 2, oh, ow):
        raise ValueError(f"DeformConv: offset has shape {tuple(offset.shape)}, expected "
                         f"{(N, og * K * 2, oh, ow)}")
    off = offset.reshape(N, og, kh, kw, 2, oh, ow)
    rows = (xp.arange(oh) * sh - top)[None, None, None, None, :, None] + \
        (xp.arange(kh) * dh)[None, None, :, None, None, None]
    cols = (xp.arange(ow) * sw - left)[None, None, None, None, None, :] + \
        (xp.arange(kw) * dw)[None, None, None, :, None, None]
    py = (rows + off[:, :, :, :, 0]).reshape(N, og, -1)            # (N, og, K·oh·ow)
    px = (cols + off[:, :, :, :, 1]).reshape(N, og, -1)
    return N, C, H, Wd, M, K, oh, ow, group, og, py, px


@op("DeformConv", since=19, differentiable=("X", "W", "offset", "B", "mask"))
def DeformConv(xp, X, W, offset, B=None, mask=None, *, dilations=None, group=1,
               kernel_shape=None, offset_group=1, pads=None, strides=None):
    N, C, H, Wd, M, K, oh, ow, group, og, py, px = _geometry(
        xp, X, W, offset, dilations, group, kernel_shape, offset_group, pads, strides)
    sampled = _sample(xp, X.reshape(N, og, C // og, H, Wd), py, px)  # (N, og, C/og, K·P)
    if mask is not None:
        sampled = sampled * mask.reshape(N, og, 1, -1).astype(X.dtype, copy=False)
    # Channel c belongs to offset group c // (C/og): (N, C, K, P) in channel order.
    columns = sampled.reshape(N, group, (C // group) * K, oh * ow)
    weights = W.reshape(group, M // group, (C // group) * K)
    Y = xp.einsum("gmk,ngkp->ngmp", weights, columns).reshape(N, M, oh, ow)
    if B is not None:
        Y = Y + B.reshape(1, -1, 1, 1)
    return (xp.ascontiguousarray(Y.astype(X.dtype, copy=False)),)


@DeformConv.gradient
def _(g, node, dY):
    ins = list(node.inputs) + [""] * (5 - len(node.inputs))
    attrs = {k: v for k, v in node.attrs.items() if v is not None}
    grads = g.private("DeformConvGrad", dY, *ins, num_outputs=5, **attrs)
    return tuple(grad if name else None for grad, name in zip(grads, ins))[:len(node.inputs)]


@op("DeformConvGrad", domain="onnxgrad")
def DeformConvGrad(xp, dY, X, W, offset, B=None, mask=None, *, dilations=None, group=1,
                   kernel_shape=None, offset_group=1, pads=None, strides=None):
    """Gradients of DeformConv for X, W, offset, B and mask (None for an omitted input)."""
    N, C, H, Wd, M, K, oh, ow, group, og, py, px = _geometry(
        xp, X, W, offset, dilations, group, kernel_shape, offset_group, pads, strides)
    work = xp.float64
    image = X.reshape(N, og, C // og, H, Wd).astype(work)
    sampled = _sample(xp, image, py, px)                               # (N, og, C/og, K·P)
    scale = 1.0 if mask is None else mask.reshape(N, og, 1, -1).astype(work)
    columns = (sampled * scale).reshape(N, group, (C // group) * K, oh * ow)
    weights = W.reshape(group, M // group, (C // group) * K).astype(work)
    dy = dY.reshape(N, group, M // group, oh * ow).astype(work)
    dW = xp.einsum("ngmp,ngkp->gmk", dy, columns).reshape(W.shape)
    dcolumns = xp.einsum("gmk,ngmp->ngkp", weights, dy).reshape(sampled.shape)
    dmask = None if mask is None else xp.sum(dcolumns * sampled, axis=2).reshape(mask.shape)
    dX, dpy, dpx = _sample_backward(xp, image, py, px, dcolumns * scale)
    doffset = xp.stack([dpy.reshape(N, og, -1, oh, ow), dpx.reshape(N, og, -1, oh, ow)],
                       axis=3).reshape(offset.shape)
    dB = None if B is None else dY.astype(work).sum(axis=(0, 2, 3))
    return tuple(None if grad is None else grad.astype(like.dtype) for grad, like in
                 ((dX.reshape(X.shape), X), (dW, W), (doffset, offset), (dB, B), (dmask, mask)))


@DeformConvGrad.in_standard_ops
def _(g, node):
    # The kernel's steps as graph nodes, in float64: the sampling points as constant grids
    # plus the offsets, per bilinear corner one GatherElements of the image (planes of
    # offset group, flattened) and one ScatterElements-add into dX, the weights' and
    # columns' gradients as batched MatMuls.  The shapes of X, W and offset must be static.
    dY, X, W, offset, B, mask = (list(node.inputs) + [""] * 6)[:6]
    a = node.attrs
    xs, ws, offs = (std.tensor_shape(g, v) for v in (X, W, offset))
    if (xs is None or ws is None or offs is None or len(xs) != 4 or len(ws) != 4
            or not all(isinstance(d, int) and d > 0 for d in xs + ws + offs)):
        return None
    N, C, H, Wd = xs
    M = ws[0]
    kh, kw = (int(k) for k in (a.get("kernel_shape") or ws[2:]))
    sh, sw = _ints(a.get("strides"), 2, 1)
    dh, dw = _ints(a.get("dilations"), 2, 1)
    top, left, bottom, right = _ints(a.get("pads"), 4, 0)
    group, og = int(a.get("group", 1)), int(a.get("offset_group", 1))
    oh = (H + top + bottom - (kh - 1) * dh - 1) // sh + 1
    ow = (Wd + left + right - (kw - 1) * dw - 1) // sw + 1
    K, P = kh * kw, oh * ow
    T = K * P
    if (C != ws[1] * group or M % group or C % og or (kh, kw) != tuple(ws[2:])
            or tuple(offs) != (N, og * K * 2, oh, ow)):
        return None
    f64, i64 = np.float64, np.int64
    to64 = std.tensor_type(f64)
    Cg = C // og

    def k(v):
        return g.const(float(v), f64)

    def cast64(v):
        return g.Cast(v, to=to64, dtype=f64)

    def back(v, like):
        return g.Cast(v, to=std.tensor_type(g.dtype(like)), dtype=g.dtype(like))

    off = g.Reshape(cast64(offset), g.ints([N, og, kh, kw, 2, oh, ow]))
    rows = (np.arange(oh) * sh - top)[None, None, None, None, :, None] + \
        (np.arange(kh) * dh)[None, None, :, None, None, None]
    cols = (np.arange(ow) * sw - left)[None, None, None, None, None, :] + \
        (np.arange(kw) * dw)[None, None, None, :, None, None]
    py = g.Reshape(g.Add(g.const(rows.astype(f64), f64), g.Gather(off, g.const(0, i64), axis=4)),
                   g.ints([N, og, T]))
    px = g.Reshape(g.Add(g.const(cols.astype(f64), f64), g.Gather(off, g.const(1, i64), axis=4)),
                   g.ints([N, og, T]))
    y0, x0 = g.Floor(py), g.Floor(px)
    image = g.Reshape(cast64(X), g.ints([N, og, Cg, H * Wd]))
    corners = []
    for ddy in (0, 1):
        for ddx in (0, 1):
            y, x = g.Add(y0, k(ddy)), g.Add(x0, k(ddx))
            wy, wx = g.Sub(k(1), g.Abs(g.Sub(py, y))), g.Sub(k(1), g.Abs(g.Sub(px, x)))
            inside = g.And(g.And(g.GreaterOrEqual(y, k(0)), g.LessOrEqual(y, k(H - 1))),
                           g.And(g.GreaterOrEqual(x, k(0)), g.LessOrEqual(x, k(Wd - 1))))
            at = g.Add(g.Mul(g.Clip(y, k(0), k(H - 1)), k(Wd)), g.Clip(x, k(0), k(Wd - 1)))
            at = g.Expand(g.Unsqueeze(g.Cast(at, to=std.tensor_type(i64), dtype=i64),
                                      g.ints([2])), g.ints([N, og, Cg, T]))
            zero = k(0)
            corners.append((at, g.Where(inside, g.Mul(wy, wx), zero),
                            g.Where(inside, g.Mul(k(2 * ddy - 1), wx), zero),
                            g.Where(inside, g.Mul(wy, k(2 * ddx - 1)), zero)))
    values = [g.GatherElements(image, at, axis=3) for at, _, _, _ in corners]  # (N,og,Cg,T)
    sampled = None
    for v, (_, w, _, _) in zip(values, corners):
        term = g.Mul(v, g.Unsqueeze(w, g.ints([2])))
        sampled = term if sampled is None else g.Add(sampled, term)
    scale = g.Reshape(cast64(mask), g.ints([N, og, 1, T])) if mask else None
    scaled = g.Mul(sampled, scale) if scale else sampled
    columns = g.Reshape(scaled, g.ints([N, group, (C // group) * K, P]))
    weights = g.Reshape(cast64(W), g.ints([group, M // group, (C // group) * K]))
    dy = g.Reshape(cast64(dY), g.ints([N, group, M // group, P]))
    dW = g.ReduceSum(g.MatMul(dy, g.Transpose(columns, perm=[0, 1, 3, 2])), g.ints([0]),
                     keepdims=0)
    dW = back(g.Reshape(dW, g.ints(ws)), W)
    dcolumns = g.Reshape(g.MatMul(g.Transpose(weights, perm=[0, 2, 1]), dy),
                         g.ints([N, og, Cg, T]))
    dmask = None
    if mask:
        dmask = g.ReduceSum(g.Mul(dcolumns, sampled), g.ints([2]), keepdims=0)
        dmask = back(std.as_shape_of(g, dmask, mask), mask)
    dS = g.Mul(dcolumns, scale) if scale else dcolumns
    dX = std.zeros(g, g.ints([N, og, Cg, H * Wd]), image)
    dpy = dpx = None
    for v, (at, w, slope_y, slope_x) in zip(values, corners):
        dX = g.ScatterElements(dX, at, g.Mul(dS, g.Unsqueeze(w, g.ints([2]))), axis=3,
                               reduction="add")
        reach = g.ReduceSum(g.Mul(dS, v), g.ints([2]), keepdims=0)      # (N, og, T)
        ty, tx = g.Mul(reach, slope_y), g.Mul(reach, slope_x)
        dpy = ty if dpy is None else g.Add(dpy, ty)
        dpx = tx if dpx is None else g.Add(dpx, tx)
    dX = back(g.Reshape(dX, g.ints(xs)), X)
    doffset = g.Concat(g.Reshape(dpy, g.ints([N, og, K, 1, oh, ow])),
                       g.Reshape(dpx, g.ints([N, og, K, 1, oh, ow])), axis=3)
    doffset = back(g.Reshape(doffset, g.ints(offs)), offset)
    dB = back(g.ReduceSum(cast64(dY), g.ints([0, 2, 3]), keepdims=0), B) if B else None
    return (dX, dW, doffset, dB, dmask)
