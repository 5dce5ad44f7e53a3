"""Object-detection ops: NonMaxSuppression, RoiAlign and MaxRoiPool.

NonMaxSuppression computes each class's IoU matrix at once and keeps the
greedy selection (highest score first, ties to the lower box index) on the
host.  RoiAlign samples each region's bins on a regular grid with bilinear
weights, one ROI at a time, as onnxruntime does (including its ``max`` mode,
which takes the largest weighted corner of each sample).  MaxRoiPool takes the
maximum over each bin of a region whose corners are rounded to whole pixels,
as Caffe and onnxruntime do.

Gradients: RoiAlign's for X adds each sample's bilinear weights times ``dY``
back into the image (in ``max`` mode, only the winning corner's).  Its rois'
gradient moves the samples: a sample's position is ``start + size · c`` along
each axis (``c`` fixed by its bin and grid place), and its bilinear value
changes with the position by the difference of the neighbouring pixels; a
sample clamped to the image's first or last row/column, or outside it, does not
move, nor does a region's size where ``output_half_pixel`` raises it to 1.  The
number of samples (``sampling_ratio=0``) changes in jumps with the region's size,
and the bilinear weights have kinks at whole pixels: the gradient is exact away
from those.  MaxRoiPool routes ``dY`` to the first maximum of each
bin; its output is piecewise constant in the rounded rois, which carry none.
"""

from __future__ import annotations

import math

import numpy as np  # host constants for attributes

from onnxgrad.errors import ModelError
from onnxgrad.ops import standard as std
from onnxgrad.ops.indexing import _scatter_add
from onnxgrad.ops.registry import op


def _first(value, default):
    if value is None or value.size == 0:
        return default
    return value.reshape(-1)[0].item()


def _corners(xp, boxes, center_point_box):
    """(x_min, y_min, x_max, y_max) of boxes [..., 4] in either ONNX layout."""
    if center_point_box:
        x, y, w, h = (boxes[..., i] for i in range(4))
        return x - w / 2, y - h / 2, x + w / 2, y + h / 2
    y1, x1, y2, x2 = (boxes[..., i] for i in range(4))
    return xp.minimum(x1, x2), xp.minimum(y1, y2), xp.maximum(x1, x2), xp.maximum(y1, y2)


def _iou_over(xp, boxes, center_point_box, threshold):
    """Boolean matrix: box i suppresses box j (IoU above ``threshold``)."""
    x0, y0, x1, y1 = _corners(xp, boxes.astype(xp.float64), center_point_box)
    iw = xp.minimum(x1[:, None], x1[None, :]) - xp.maximum(x0[:, None], x0[None, :])
    ih = xp.minimum(y1[:, None], y1[None, :]) - xp.maximum(y0[:, None], y0[None, :])
    inter = xp.where((iw > 0) & (ih > 0), iw * ih, 0.0)
    area = (x1 - x0) * (y1 - y0)
    union = area[:, None] + area[None, :] - inter
    valid = (inter > 0) & (area[:, None] > 0) & (area[None, :] > 0) & (union > 0)
    iou = xp.where(valid, inter / xp.where(union > 0, union, 1.0), 0.0)
    return valid & (iou > threshold)


@op("NonMaxSuppression", since=10)
def NonMaxSuppression(xp, boxes, scores, max_output_boxes_per_class=None, iou_threshold=None,
                      score_threshold=None, *, center_point_box=0):
    limit = max(int(_first(max_output_boxes_per_class, 0)), 0)
    iou_limit = float(_first(iou_threshold, 0.0))
    score_limit = _first(score_threshold, None)
    if boxes.ndim != 3 or boxes.shape[2] != 4 or scores.ndim != 3 \
            or scores.shape[0] != boxes.shape[0] or scores.shape[2] != boxes.shape[1]:
        raise ModelError(f"NonMaxSuppression: boxes {list(boxes.shape)} and scores "
                         f"{list(scores.shape)} do not fit [batch, boxes, 4] and "
                         "[batch, classes, boxes]")
    selected = []
    for b in range(boxes.shape[0] if limit else 0):
        suppress = _iou_over(xp, boxes[b], center_point_box, iou_limit).tolist()
        for c in range(scores.shape[1]):
            s = scores[b, c].tolist()
            order = sorted(range(len(s)), key=lambda i: (-s[i], i))
            if score_limit is not None:
                order = [i for i in order if s[i] > score_limit]
            kept: list[int] = []
            for i in order:
                if len(kept) >= limit:
                    break
                if not any(suppress[i][k] for k in kept):
                    kept.append(i)
                    selected.append((b, c, i))
    return (xp.asarray(selected, dtype=xp.int64).reshape(-1, 3),)


@op("RoiAlign", since=16, differentiable=("X", "rois"))
def RoiAlign(xp, X, rois, batch_indices, *, coordinate_transformation_mode="half_pixel",
             mode="avg", output_height=1, output_width=1, sampling_ratio=0, spatial_scale=1.0):
    return (_roi_align(xp, X, rois, batch_indices, coordinate_transformation_mode == "half_pixel",
                       mode, output_height, output_width, sampling_ratio, spatial_scale),)


@op("RoiAlign", since=10, differentiable=("X", "rois"))
def RoiAlign10(xp, X, rois, batch_indices, *, mode="avg", output_height=1, output_width=1,
               sampling_ratio=0, spatial_scale=1.0):
    return (_roi_align(xp, X, rois, batch_indices, False, mode, output_height, output_width,
                       sampling_ratio, spatial_scale),)


def _roi_align_rule(g, node, dY):
    X, rois, batch_indices = node.inputs
    half_pixel = node.attrs.get("coordinate_transformation_mode", "output_half_pixel") \
        == "half_pixel"
    attrs = {k: v for k, v in node.attrs.items() if k != "coordinate_transformation_mode"}
    return (g.private("RoiAlignGrad", dY, X, rois, batch_indices, half_pixel=int(half_pixel),
                      **attrs),
            g.private("RoiAlignRoisGrad", dY, X, rois, batch_indices,
                      half_pixel=int(half_pixel), **attrs),
            None)


for _definition in (RoiAlign, RoiAlign10):
    _definition.gradient(_roi_align_rule)


@op("RoiAlignGrad", domain="onnxgrad")
def RoiAlignGrad(xp, dY, X, rois, batch_indices, *, half_pixel=1, mode="avg", output_height=1,
                 output_width=1, sampling_ratio=0, spatial_scale=1.0):
    """Gradient of RoiAlign for X: each bilinear sample's weights times ``dY`` (averaged
    over the bin's samples; in ``max`` mode only the winning sample's winning corner)."""
    return (_roi_align(xp, X, rois, batch_indices, bool(half_pixel), mode, output_height,
                       output_width, sampling_ratio, spatial_scale, dY=dY),)


@op("RoiAlignRoisGrad", domain="onnxgrad")
def RoiAlignRoisGrad(xp, dY, X, rois, batch_indices, *, half_pixel=1, mode="avg",
                     output_height=1, output_width=1, sampling_ratio=0, spatial_scale=1.0):
    """Gradient of RoiAlign for rois: ``dY`` times each sample's bilinear value's
    derivative along its position, times the position's derivative with respect to the
    region's corners (see the module docstring).

    Its standard form (as RoiAlignGrad's) needs ``sampling_ratio > 0`` and static shapes
    of X and rois: with ``sampling_ratio=0`` the sample grids' sizes depend on the rois'
    values, which a static graph of standard ops cannot follow."""
    return (_roi_align(xp, X, rois, batch_indices, bool(half_pixel), mode, output_height,
                       output_width, sampling_ratio, spatial_scale, dY=dY, wrt="rois"),)


def _axis_samples(xp, start, size, bins, grid, limit):
    """Sample positions along one axis: low/high indices and weights, shape [bins * grid]."""
    step = size / bins
    k = xp.arange(bins * grid)
    pos = start + (k // grid) * step + ((k % grid) + 0.5) * step / grid
    outside = (pos < -1.0) | (pos > limit)
    pos = xp.maximum(pos, 0.0)
    low = xp.floor(pos).astype(xp.int64)
    at_edge = low >= limit - 1
    low = xp.where(at_edge, limit - 1, low)
    high = xp.where(at_edge, limit - 1, low + 1)
    pos = xp.where(at_edge, low.astype(pos.dtype), pos)
    frac = pos - low
    return low, high, 1.0 - frac, frac, outside


def _axis_motion(xp, start, size, bins, grid, limit):
    """Where each sample sits in its region (``c``: position = start + size · c) and
    whether its bilinear weights move with it (not clamped to the first or last
    pixel), shape [bins * grid]."""
    k = xp.arange(bins * grid)
    c = ((k // grid) + ((k % grid) + 0.5) / grid) / bins
    pos = start + size * c
    return c, ((pos >= 0.0) & (pos < limit - 1)).astype(xp.float64)


def _roi_align(xp, X, rois, batch_indices, half_pixel, mode, oh, ow, sampling_ratio, scale,
               dY=None, wrt="X"):
    """RoiAlign's output; with ``dY``, the gradient for X (or ``wrt="rois"``, for rois)
    instead."""
    if X.ndim != 4 or rois.ndim != 2 or rois.shape[1] != 4:
        raise ModelError(f"RoiAlign: X {list(X.shape)} and rois {list(rois.shape)} do not fit "
                         "[N, C, H, W] and [rois, 4]")
    if mode not in ("avg", "max"):
        raise ModelError(f"RoiAlign: mode must be 'avg' or 'max', got {mode!r}")
    n_rois, channels = rois.shape[0], X.shape[1]
    height, width = X.shape[2], X.shape[3]
    out = xp.zeros((n_rois, channels, oh, ow), dtype=xp.float64)
    dX = xp.zeros(X.shape, dtype=xp.float64) if dY is not None else None
    drois = xp.zeros(rois.shape, dtype=xp.float64)
    offset = 0.5 if half_pixel else 0.0
    boxes = rois.astype(xp.float64).tolist()
    batches = batch_indices.reshape(-1).tolist()
    for r in range(n_rois):
        x0, y0, x1, y1 = (v * scale - offset for v in boxes[r])
        roi_w, roi_h = x1 - x0, y1 - y0
        # 1 where the size follows the corners (not raised to 1): for the rois' gradient
        follows_w, follows_h = float(half_pixel or roi_w >= 1.0), float(half_pixel or roi_h >= 1.0)
        if not half_pixel:
            roi_w, roi_h = max(roi_w, 1.0), max(roi_h, 1.0)
        gh = int(sampling_ratio) if sampling_ratio > 0 else int(math.ceil(roi_h / oh))
        gw = int(sampling_ratio) if sampling_ratio > 0 else int(math.ceil(roi_w / ow))
        if gh <= 0 or gw <= 0:
            continue
        ylo, yhi, wy_lo, wy_hi, y_out = _axis_samples(xp, y0, roi_h, oh, gh, height)
        xlo, xhi, wx_lo, wx_hi, x_out = _axis_samples(xp, x0, roi_w, ow, gw, width)
        b = int(batches[r])
        image = X[b].astype(xp.float64)  # C, H, W
        keep = ~(y_out[:, None] | x_out[None, :])  # [oh*gh, ow*gw]
        corners = [(ylo, xlo, wy_lo[:, None] * wx_lo[None, :] * keep),
                   (ylo, xhi, wy_lo[:, None] * wx_hi[None, :] * keep),
                   (yhi, xlo, wy_hi[:, None] * wx_lo[None, :] * keep),
                   (yhi, xhi, wy_hi[:, None] * wx_hi[None, :] * keep)]
        values = [image[:, yi[:, None], xi[None, :]] * w for yi, xi, w in corners]
        if dY is None:
            if mode == "avg":
                samples = sum(values).reshape(channels, oh, gh, ow, gw)
                out[r] = samples.sum(axis=(2, 4)) / max(gh * gw, 1)
            else:
                best = values[0]
                for v in values[1:]:
                    best = xp.maximum(best, v)
                out[r] = best.reshape(channels, oh, gh, ow, gw).max(axis=(2, 4))
            continue
        # dY of each bin, at each of its samples: [C, oh*gh, ow*gw]
        spread = xp.repeat(xp.repeat(dY[r].astype(xp.float64), gh, axis=1), gw, axis=2)
        if mode == "avg":
            picks = [spread / max(gh * gw, 1)] * 4
        else:
            stacked = xp.stack(values)                       # [4, C, oh*gh, ow*gw]
            corner = xp.argmax(stacked, axis=0)
            best = xp.max(stacked, axis=0).reshape(channels, oh, gh, ow, gw)
            best = best.transpose(0, 1, 3, 2, 4).reshape(channels, oh, ow, gh * gw)
            won = xp.arange(gh * gw) == xp.argmax(best, axis=3)[..., None]
            won = won.reshape(channels, oh, ow, gh, gw).transpose(0, 1, 3, 2, 4)
            won = won.reshape(corner.shape)
            picks = [spread * (won & (corner == k)) for k in range(4)]
        if wrt == "rois":
            # d(corner weight)/d(position): -/+ the other axis' weight, where samples move
            cy, my = _axis_motion(xp, y0, roi_h, oh, gh, height)
            cx, mx = _axis_motion(xp, x0, roi_w, ow, gw, width)
            wy, wx = (wy_lo, wy_lo, wy_hi, wy_hi), (wx_lo, wx_hi, wx_lo, wx_hi)
            sy, sx = (-1.0, -1.0, 1.0, 1.0), (-1.0, 1.0, -1.0, 1.0)
            gy = gx = 0.0
            for k, (yi, xi, _) in enumerate(corners):
                at = picks[k] * image[:, yi[:, None], xi[None, :]] * keep  # [C, Ky, Kx]
                gy = gy + sy[k] * (at * wx[k][None, None, :]).sum(axis=(0, 2))
                gx = gx + sx[k] * (at * wy[k][None, :, None]).sum(axis=(0, 1))
            gy, gx = gy * my * scale, gx * mx * scale  # per sample, per unit of rois
            # position = start + size·c, size = end - start where it follows the corners
            drois[r, 0] = (gx * (1.0 - cx * follows_w)).sum()
            drois[r, 2] = (gx * cx * follows_w).sum()
            drois[r, 1] = (gy * (1.0 - cy * follows_h)).sum()
            drois[r, 3] = (gy * cy * follows_h).sum()
            continue
        shares = [pick * w for pick, (_, _, w) in zip(picks, corners)]
        for (yi, xi, _), share in zip(corners, shares):
            position = xp.arange(channels)[:, None, None] * (height * width) + \
                (yi[:, None] * width + xi[None, :])[None]
            dX[b] += _scatter_add(xp, channels * height * width, position, share,
                                  xp.float64).reshape(channels, height, width)
    if dY is None:
        return out.astype(X.dtype)
    return drois.astype(rois.dtype) if wrt == "rois" else dX.astype(X.dtype)


# -- RoiAlignGrad and RoiAlignRoisGrad in standard ops -------------------------------------------
# The kernel's samples as graph nodes, in float64 (as the kernel computes), all regions at once:
# per axis the samples' positions [R, bins, grid], their low/high pixels and weights; per corner
# one Gather of X (channels last, flattened to (N·H·W, C)), and for dX one ScatterND-add.  The
# shapes of X and rois must be static, and sampling_ratio > 0: with sampling_ratio=0 each
# region's number of samples is ceil(size / bins), which depends on the rois' values at run time
# (a loop, or a shape no static graph has), so there is no form.

def _g_roi_axis(g, start, size, bins, grid, limit):
    """:func:`_axis_samples` and :func:`_axis_motion` in graph nodes for ``start`` and
    ``size`` of shape (R, 1, 1): (low, high, low weight, high weight, outside, c, moves),
    each (R or 1, bins, grid)."""
    f64 = np.float64

    def k(v):
        return g.const(float(v), f64)

    step = g.Div(size, k(bins))
    at = g.const(np.arange(bins, dtype=f64).reshape(1, bins, 1), f64)
    half = g.const((np.arange(grid, dtype=f64) + 0.5).reshape(1, 1, grid), f64)
    pos = g.Add(g.Add(start, g.Mul(at, step)), g.Div(g.Mul(half, step), k(grid)))
    outside = g.Or(g.Less(pos, k(-1.0)), g.Greater(pos, k(limit)))
    pos = g.Max(pos, k(0.0))
    low = g.Floor(pos)
    at_edge = g.GreaterOrEqual(low, k(limit - 1))
    low = g.Where(at_edge, k(limit - 1), low)
    high = g.Where(at_edge, k(limit - 1), g.Add(low, k(1.0)))
    frac = g.Sub(g.Where(at_edge, low, pos), low)
    ks = np.arange(bins * grid)
    c = ((ks // grid) + ((ks % grid) + 0.5) / grid) / bins
    c = g.const(c.reshape(1, bins, grid), f64)
    moved = g.Add(start, g.Mul(size, c))
    moves = g.Cast(g.And(g.GreaterOrEqual(moved, k(0.0)), g.Less(moved, k(limit - 1))),
                   to=std.tensor_type(f64), dtype=f64)
    return low, high, g.Sub(k(1.0), frac), frac, outside, c, moves


def _g_roi_align(g, node, wrt):
    dY, X, rois, batch_indices = node.inputs
    attrs = node.attrs
    mode = attrs.get("mode", "avg")
    grid = int(attrs.get("sampling_ratio", 0))
    xs, rs = std.tensor_shape(g, X), std.tensor_shape(g, rois)
    if (grid <= 0 or mode not in ("avg", "max") or xs is None or len(xs) != 4
            or not all(isinstance(d, int) and d > 0 for d in xs) or rs is None
            or len(rs) != 2 or not all(isinstance(d, int) and d > 0 for d in rs) or rs[1] != 4):
        return None
    n, c, height, width = xs
    n_rois = rs[0]
    oh, ow = int(attrs.get("output_height", 1)), int(attrs.get("output_width", 1))
    half_pixel = bool(attrs.get("half_pixel", 1))
    scale = float(attrs.get("spatial_scale", 1.0))
    f64, i64 = np.float64, np.int64
    to64 = std.tensor_type(f64)

    def k(v):
        return g.const(float(v), f64)

    r64 = g.Cast(rois, to=to64, dtype=f64)
    x0, y0, x1, y1 = (g.Reshape(g.Sub(g.Mul(g.Gather(r64, g.const(j, i64), axis=1), k(scale)),
                                      k(0.5 if half_pixel else 0.0)), g.ints([n_rois, 1, 1]))
                      for j in range(4))
    roi_w, roi_h = g.Sub(x1, x0), g.Sub(y1, y0)
    if half_pixel:
        follows_w = follows_h = k(1.0)
    else:
        follows_w = g.Cast(g.GreaterOrEqual(roi_w, k(1.0)), to=to64, dtype=f64)
        follows_h = g.Cast(g.GreaterOrEqual(roi_h, k(1.0)), to=to64, dtype=f64)
        roi_w, roi_h = g.Max(roi_w, k(1.0)), g.Max(roi_h, k(1.0))
    ylo, yhi, wylo, wyhi, yout, cy, my = (
        g.Unsqueeze(v, g.ints([3, 4]))
        for v in _g_roi_axis(g, y0, roi_h, oh, grid, height))          # (R|1, oh, G, 1, 1)
    xlo, xhi, wxlo, wxhi, xout, cx, mx = (
        g.Unsqueeze(v, g.ints([1, 2]))
        for v in _g_roi_axis(g, x0, roi_w, ow, grid, width))           # (R|1, 1, 1, ow, G)
    keep = g.Cast(g.Not(g.Or(yout, xout)), to=to64, dtype=f64)       # (R, oh, G, ow, G)
    batch = g.Cast(g.Reshape(batch_indices, g.ints([n_rois, 1, 1, 1, 1])), to=to64, dtype=f64)
    base = g.Mul(batch, k(height * width))
    corners = [(ylo, xlo, wylo, wxlo), (ylo, xhi, wylo, wxhi),
               (yhi, xlo, wyhi, wxlo), (yhi, xhi, wyhi, wxhi)]
    positions, weights = [], []
    for yi, xi, wy, wx in corners:
        at = g.Add(base, g.Add(g.Mul(yi, k(width)), xi))
        positions.append(g.Cast(at, to=std.tensor_type(i64), dtype=i64))
        weights.append(g.Mul(g.Mul(wy, wx), keep))
    data = g.Reshape(g.Cast(g.Transpose(X, perm=[0, 2, 3, 1]), to=to64, dtype=f64),
                     g.ints([n * height * width, c]))
    values = [g.Gather(data, p, axis=0) for p in positions]            # (R, oh, G, ow, G, C)
    dy = g.Cast(g.Transpose(dY, perm=[0, 2, 3, 1]), to=to64, dtype=f64)
    dy = g.Unsqueeze(dy, g.ints([2, 4]))                               # (R, oh, 1, ow, 1, C)
    if mode == "avg":
        picks = [g.Div(dy, k(grid * grid))] * 4
    else:
        weighted = [g.Mul(v, g.Unsqueeze(w, g.ints([-1]))) for v, w in zip(values, weights)]
        stacked = g.Concat(*(g.Unsqueeze(v, g.ints([0])) for v in weighted), axis=0)
        corner = g.ArgMax(stacked, axis=0, keepdims=0)
        best = g.ReduceMax(stacked, g.ints([0]), keepdims=0)
        best = g.Reshape(g.Transpose(best, perm=[0, 1, 3, 5, 2, 4]),
                         g.ints([n_rois, oh, ow, c, grid * grid]))
        first = g.ArgMax(best, axis=-1, keepdims=1)
        won = g.Equal(g.const(np.arange(grid * grid, dtype=i64), i64), first)
        won = g.Transpose(g.Reshape(won, g.ints([n_rois, oh, ow, c, grid, grid])),
                          perm=[0, 1, 4, 2, 5, 3])                     # (R, oh, G, ow, G, C)
        picks = [g.Mul(dy, g.Cast(g.And(won, g.Equal(corner, g.const(j, i64))), to=to64,
                                  dtype=f64)) for j in range(4)]
    if wrt == "X":
        dX = std.zeros(g, g.ints([n * height * width, c]), data)
        for p, pick, w in zip(positions, picks, weights):
            share = g.Mul(pick, g.Unsqueeze(w, g.ints([-1])))
            dX = g.ScatterND(dX, g.Unsqueeze(p, g.ints([-1])), share, reduction="add")
        dX = g.Transpose(g.Reshape(dX, g.ints([n, height, width, c])), perm=[0, 3, 1, 2])
        return (g.Cast(dX, to=std.tensor_type(g.dtype(X)), dtype=g.dtype(X)),)
    # d(corner weight)/d(position): -/+ the other axis' weight, where samples move
    gy = gx = None
    for j, (v, pick, (_, _, wy, wx)) in enumerate(zip(values, picks, corners)):
        at = g.ReduceSum(g.Mul(pick, v), g.ints([-1]), keepdims=0)   # (R, oh, G, ow, G)
        at = g.Mul(at, keep)
        ty, tx = g.Mul(at, wx), g.Mul(at, wy)
        if j < 2:
            ty = g.Neg(ty)
        if j % 2 == 0:
            tx = g.Neg(tx)
        gy = ty if gy is None else g.Add(gy, ty)
        gx = tx if gx is None else g.Add(gx, tx)
    gy, gx = g.Mul(g.Mul(gy, my), k(scale)), g.Mul(g.Mul(gx, mx), k(scale))
    fw = g.Unsqueeze(follows_w, g.ints([3, 4])) if not half_pixel else follows_w
    fh = g.Unsqueeze(follows_h, g.ints([3, 4])) if not half_pixel else follows_h
    ends_x, ends_y = g.Mul(cx, fw), g.Mul(cy, fh)
    axes = g.ints([1, 2, 3, 4])

    def total(v, coeff):
        return g.ReduceSum(g.Mul(v, coeff), axes, keepdims=0)         # (R,)

    columns = [total(gx, g.Sub(k(1.0), ends_x)), total(gy, g.Sub(k(1.0), ends_y)),
               total(gx, ends_x), total(gy, ends_y)]
    drois = g.Concat(*(g.Unsqueeze(col, g.ints([1])) for col in columns), axis=1)
    return (g.Cast(drois, to=std.tensor_type(g.dtype(rois)), dtype=g.dtype(rois)),)


@RoiAlignGrad.in_standard_ops
def _(g, node):
    return _g_roi_align(g, node, "X")


@RoiAlignRoisGrad.in_standard_ops
def _(g, node):
    return _g_roi_align(g, node, "rois")


# -- MaxRoiPool ---------------------------------------------------------------------------------

def _round_half_away(v: float) -> int:
    return int(math.copysign(math.floor(abs(v) + 0.5), v))


def _roi_pool_bins(rois, pooled_shape, spatial_scale, height, width):
    """Each non-empty bin of each region: (roi, batch, row, col, row slice, col slice)."""
    ph, pw = (int(v) for v in pooled_shape)
    for r, (batch, *corners) in enumerate(rois.astype("float64").tolist()):
        x0, y0, x1, y1 = (_round_half_away(v * spatial_scale) for v in corners)
        bin_h, bin_w = max(y1 - y0 + 1, 1) / ph, max(x1 - x0 + 1, 1) / pw
        for i in range(ph):
            hs = min(max(math.floor(i * bin_h) + y0, 0), height)
            he = min(max(math.ceil((i + 1) * bin_h) + y0, 0), height)
            for j in range(pw):
                ws = min(max(math.floor(j * bin_w) + x0, 0), width)
                we = min(max(math.ceil((j + 1) * bin_w) + x0, 0), width)
                if he > hs and we > ws:
                    yield r, int(batch), i, j, slice(hs, he), slice(ws, we)


def _check_roi_pool(X, rois, pooled_shape):
    if X.ndim != 4 or rois.ndim != 2 or rois.shape[1] != 5 or len(pooled_shape or ()) != 2:
        raise ModelError(f"MaxRoiPool: X {list(X.shape)}, rois {list(rois.shape)} and "
                         f"pooled_shape {pooled_shape} do not fit [N, C, H, W], [rois, 5] and "
                         "[height, width]")


@op("MaxRoiPool", since=1, differentiable=("X",))
def MaxRoiPool(xp, X, rois, *, pooled_shape, spatial_scale=1.0):
    _check_roi_pool(X, rois, pooled_shape)
    out = xp.zeros((rois.shape[0], X.shape[1]) + tuple(int(v) for v in pooled_shape), X.dtype)
    for r, b, i, j, rows, cols in _roi_pool_bins(rois, pooled_shape, spatial_scale,
                                                 *X.shape[2:]):
        out[r, :, i, j] = X[b, :, rows, cols].max(axis=(1, 2))
    return (out,)


@MaxRoiPool.gradient
def _(g, node, dY):
    X, rois = node.inputs
    return (g.private("MaxRoiPoolGrad", dY, X, rois, **node.attrs), None)


@op("MaxRoiPoolGrad", domain="onnxgrad")
def MaxRoiPoolGrad(xp, dY, X, rois, *, pooled_shape, spatial_scale=1.0):
    """``dY`` of each bin added at the bin's first maximum, channel by channel."""
    dX = xp.zeros(X.shape, dtype=dY.dtype)
    channels = xp.arange(X.shape[1])
    for r, b, i, j, rows, cols in _roi_pool_bins(rois, pooled_shape, spatial_scale,
                                                 *X.shape[2:]):
        window = X[b, :, rows, cols]
        first = xp.argmax(window.reshape(X.shape[1], -1), axis=1)
        width = cols.stop - cols.start
        dX[b, channels, rows.start + first // width, cols.start + first % width] += dY[r, :, i, j]
    return (dX,)


@MaxRoiPoolGrad.in_standard_ops
def _(g, node):
    # Every bin's window as a mask over the whole image (bins in float64, as the kernel
    # rounds them), its first maximum (row-major) as the ArgMax of "in the window and equal
    # to its max", and dY added there with ScatterElements.  X's shape must be static.
    dY, X, rois = node.inputs
    xs = std.tensor_shape(g, X)
    pooled = node.attrs.get("pooled_shape")
    if (xs is None or len(xs) != 4 or not all(isinstance(d, int) and d > 0 for d in xs)
            or pooled is None or len(pooled) != 2):
        return None
    n, c, height, width = xs
    ph, pw = (int(v) for v in pooled)
    scale = float(node.attrs.get("spatial_scale", 1.0))
    f64, i64 = np.float64, np.int64

    def k(v):
        return g.const(float(v), f64)

    r64 = g.Cast(rois, to=std.tensor_type(f64), dtype=f64)
    column = [g.Gather(r64, g.const(j, i64), axis=1) for j in range(5)]       # (R,)
    x0, y0, x1, y1 = (g.Mul(g.Sign(v), g.Floor(g.Add(g.Abs(v), k(0.5))))
                      for v in (g.Mul(col, k(scale)) for col in column[1:]))
    bin_h = g.Div(g.Max(g.Add(g.Sub(y1, y0), k(1)), k(1)), k(ph))
    bin_w = g.Div(g.Max(g.Add(g.Sub(x1, x0), k(1)), k(1)), k(pw))

    def edges(bins, size, start, limit, shape):
        at = g.const(np.arange(size, dtype=f64).reshape(shape), f64)      # bin numbers
        b = g.Unsqueeze(bins, g.ints([1, 2]))
        s = g.Unsqueeze(start, g.ints([1, 2]))
        lo = g.Clip(g.Add(g.Floor(g.Mul(at, b)), s), k(0), k(limit))
        hi = g.Clip(g.Add(g.Ceil(g.Mul(g.Add(at, k(1)), b)), s), k(0), k(limit))
        return lo, hi                                                        # (R, ph|1, pw|1)

    hs, he = edges(bin_h, ph, y0, height, (1, ph, 1))
    ws, we = edges(bin_w, pw, x0, width, (1, 1, pw))
    rows = g.const(np.arange(height, dtype=f64).reshape(1, 1, 1, height, 1), f64)
    cols = g.const(np.arange(width, dtype=f64).reshape(1, 1, 1, 1, width), f64)

    def inside(lo, hi, at):
        lo, hi = g.Unsqueeze(lo, g.ints([3, 4])), g.Unsqueeze(hi, g.ints([3, 4]))
        return g.And(g.GreaterOrEqual(at, lo), g.Less(at, hi))

    window = g.And(inside(hs, he, rows), inside(ws, we, cols))           # (R, ph, pw, H, W)
    window = g.Unsqueeze(window, g.ints([1]))                             # (R, 1, ph, pw, H, W)
    batch = g.Cast(column[0], to=std.tensor_type(i64), dtype=i64)        # (R,)
    image = g.Unsqueeze(g.Gather(X, batch, axis=0), g.ints([2, 3]))       # (R, C, 1, 1, H, W)
    low = g.const(-np.inf, g.dtype(X))
    peak = g.ReduceMax(g.Where(window, image, low), g.ints([4, 5]), keepdims=1)
    first = g.And(window, g.Equal(image, peak))
    flat = g.Cast(first, to=std.tensor_type(f64), dtype=f64)
    flat = g.Reshape(flat, g.ints([0, 0, 0, 0, height * width]))
    arg = g.ArgMax(flat, axis=-1, keepdims=0)                             # (R, C, ph, pw)
    nonempty = g.And(g.Greater(he, hs), g.Greater(we, ws))               # (R, ph, pw)
    updates = g.Mul(dY, g.Unsqueeze(g.Cast(nonempty, to=std.tensor_type(g.dtype(dY)),
                                           dtype=g.dtype(dY)), g.ints([1])))
    plane = g.Add(g.Mul(g.Unsqueeze(batch, g.ints([1])), g.const(c, i64)),
                  g.const(np.arange(c, dtype=i64).reshape(1, c), i64))   # (R, C)
    index = g.Add(g.Mul(g.Unsqueeze(plane, g.ints([2, 3])), g.const(height * width, i64)), arg)
    dX = std.zeros(g, g.ints([n * c * height * width]), dY)
    dX = g.ScatterElements(dX, g.Reshape(index, g.ints([-1])), g.Reshape(updates, g.ints([-1])),
                           axis=0, reduction="add")
    return (g.Reshape(dX, g.ints([n, c, height, width])),)
