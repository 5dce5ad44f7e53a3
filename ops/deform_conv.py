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
back into the image, and the offsets' from the slopes of those weights.
"""

from __future__ import annotations

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
