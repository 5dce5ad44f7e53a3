"""Object-detection ops: NonMaxSuppression and RoiAlign.  Forward only (RoiAlign's
X and rois are declared differentiable without a rule).

NonMaxSuppression computes each class's IoU matrix at once and keeps the
greedy selection (highest score first, ties to the lower box index) on the
host.  RoiAlign samples each region's bins on a regular grid with bilinear
weights, one ROI at a time, as onnxruntime does (including its ``max`` mode,
which takes the largest weighted corner of each sample).
"""

from __future__ import annotations

import math

from onnxgrad.errors import ModelError
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
    return _roi_align(xp, X, rois, batch_indices, coordinate_transformation_mode == "half_pixel",
                      mode, output_height, output_width, sampling_ratio, spatial_scale)


@op("RoiAlign", since=10, differentiable=("X", "rois"))
def RoiAlign10(xp, X, rois, batch_indices, *, mode="avg", output_height=1, output_width=1,
               sampling_ratio=0, spatial_scale=1.0):
    return _roi_align(xp, X, rois, batch_indices, False, mode, output_height, output_width,
                      sampling_ratio, spatial_scale)


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


def _roi_align(xp, X, rois, batch_indices, half_pixel, mode, oh, ow, sampling_ratio, scale):
    if X.ndim != 4 or rois.ndim != 2 or rois.shape[1] != 4:
        raise ModelError(f"RoiAlign: X {list(X.shape)} and rois {list(rois.shape)} do not fit "
                         "[N, C, H, W] and [rois, 4]")
    n_rois, channels = rois.shape[0], X.shape[1]
    height, width = X.shape[2], X.shape[3]
    out = xp.zeros((n_rois, channels, oh, ow), dtype=xp.float64)
    offset = 0.5 if half_pixel else 0.0
    boxes = rois.astype(xp.float64).tolist()
    batches = batch_indices.reshape(-1).tolist()
    for r in range(n_rois):
        x0, y0, x1, y1 = (v * scale - offset for v in boxes[r])
        roi_w, roi_h = x1 - x0, y1 - y0
        if not half_pixel:
            roi_w, roi_h = max(roi_w, 1.0), max(roi_h, 1.0)
        gh = int(sampling_ratio) if sampling_ratio > 0 else int(math.ceil(roi_h / oh))
        gw = int(sampling_ratio) if sampling_ratio > 0 else int(math.ceil(roi_w / ow))
        if gh <= 0 or gw <= 0:
            continue
        ylo, yhi, wy_lo, wy_hi, y_out = _axis_samples(xp, y0, roi_h, oh, gh, height)
        xlo, xhi, wx_lo, wx_hi, x_out = _axis_samples(xp, x0, roi_w, ow, gw, width)
        image = X[int(batches[r])].astype(xp.float64)  # C, H, W
        keep = ~(y_out[:, None] | x_out[None, :])  # [oh*gh, ow*gw]
        corners = [(ylo, xlo, wy_lo[:, None] * wx_lo[None, :]),
                   (ylo, xhi, wy_lo[:, None] * wx_hi[None, :]),
                   (yhi, xlo, wy_hi[:, None] * wx_lo[None, :]),
                   (yhi, xhi, wy_hi[:, None] * wx_hi[None, :])]
        values = [image[:, yi[:, None], xi[None, :]] * (w * keep) for yi, xi, w in corners]
        if mode == "avg":
            samples = sum(values).reshape(channels, oh, gh, ow, gw)
            out[r] = samples.sum(axis=(2, 4)) / max(gh * gw, 1)
        elif mode == "max":
            best = values[0]
            for v in values[1:]:
                best = xp.maximum(best, v)
            out[r] = best.reshape(channels, oh, gh, ow, gw).max(axis=(2, 4))
        else:
            raise ModelError(f"RoiAlign: mode must be 'avg' or 'max', got {mode!r}")
    return (out.astype(X.dtype),)
