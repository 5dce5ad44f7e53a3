"""DeformConv (opset 19): 2-D convolution whose kernel taps sample the input at learned
offsets, bilinearly, optionally scaled by a mask (deformable convolution v1/v2).

For output position ``(i, j)`` and kernel tap ``(u, v)`` of offset group ``o``
the tap reads channel ``c`` (of group ``o``) at

    (i·stride_h - pad_top + u·dilation_h + Δh,  j·stride_w - pad_left + v·dilation_w + Δw)

bilinearly, with zeros outside the image (GridSample with align_corners=1),
times ``mask[o, u, v, i, j]``; the sampled columns then meet the weights as
in a grouped convolution.  Forward only: its inputs are declared
differentiable without a rule, so a gradient through it raises
UnsupportedOpError.
"""

from __future__ import annotations

from onnxgrad.ops.conv import _ints
from onnxgrad.ops.registry import op


def _sample(xp, X, py, px):
    """Bilinear samples of ``X`` (N, O, Cg, H, W) at ``py``/``px`` (N, O, T): (N, O, Cg, T)."""
    N, O, Cg, H, W = X.shape
    flat = X.reshape(N, O, Cg, H * W)
    y0, x0 = xp.floor(py), xp.floor(px)
    out = None
    for dy in (0, 1):
        for dx in (0, 1):
            y, x = y0 + dy, x0 + dx
            weight = (1 - xp.abs(py - y)) * (1 - xp.abs(px - x))
            inside = (y >= 0) & (y <= H - 1) & (x >= 0) & (x <= W - 1)
            index = (xp.clip(y, 0, H - 1) * W + xp.clip(x, 0, W - 1)).astype("int64")
            values = xp.take_along_axis(flat, index[:, :, None, :], axis=3)
            term = values * xp.where(inside, weight, 0).astype(X.dtype)[:, :, None, :]
            out = term if out is None else out + term
    return out


@op("DeformConv", since=19, differentiable=("X", "W", "offset", "B", "mask"))
def DeformConv(xp, X, W, offset, B=None, mask=None, *, dilations=None, group=1,
               kernel_shape=None, offset_group=1, pads=None, strides=None):
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
