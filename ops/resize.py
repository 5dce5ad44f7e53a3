"""Resizing, padding and cropping: Resize, Upsample, Pad and CenterCropPad, with
their gradients.

Resize is separable: each resized axis is a linear map given by an
``(out, in)`` interpolation matrix, built on the host from the ONNX
coefficient rules (nearest with every ``nearest_mode``, linear, cubic,
antialias, ``exclude_outside``, every ``coordinate_transformation_mode``
including ``tf_crop_and_resize``).  The forward pass applies the matrices
axis by axis (a gather for nearest, a BLAS ``tensordot`` otherwise); the
gradient applies their transposes in reverse order.

Pad crops negative pads, then pads each axis: ``constant`` by placing the data
in a filled array, ``reflect``/``edge``/``wrap`` by gathering with a host index
map (NumPy's ``pad`` of ``arange``).  Its gradient sums through the same map.

CenterCropPad crops or zero-pads each axis about its centre; cropping and
padding are each other's adjoints, so its gradient is a CenterCropPad back to
the input's shape.

In standard ops (step models, higher order) a Resize gradient is one MatMul per
resized axis with the transposed host matrix, for every mode, where roi, scales
and sizes are constants and the resized axes' sizes static; a Pad gradient is a
Slice (``constant``) or, for the other modes, the index map as a 0/1 matrix, which
needs the padded axes' sizes.
"""

from __future__ import annotations

import math

import numpy as np  # host-side index maps and interpolation matrices only

from onnxgrad.errors import ModelError
from onnxgrad.ops import standard as std
from onnxgrad.ops.reduce import constant_value
from onnxgrad.ops.registry import op

# -- Pad -----------------------------------------------------------------------------------

_NP_MODES = {"reflect": "reflect", "edge": "edge", "wrap": "wrap"}


def _pad_amounts(ndim, pads, axes):
    pads = [int(p) for p in pads]
    axes = range(ndim) if axes is None or len(axes) == 0 else [int(a) + ndim if int(a) < 0
                                                                else int(a) for a in axes]
    axes = list(axes)
    if len(pads) != 2 * len(axes):
        raise ValueError(f"Pad: {len(pads)} pads for {len(axes)} axes")
    begin, end = [0] * ndim, [0] * ndim
    for i, a in enumerate(axes):
        begin[a], end[a] = pads[i], pads[len(axes) + i]
    return begin, end


def _crop(shape, begin, end):
    return tuple(slice(max(-b, 0), n - max(-e, 0)) for n, b, e in zip(shape, begin, end))


def _index_map(n, b, e, mode):
    """Where each output position along an axis reads from (host int64 array)."""
    if mode not in _NP_MODES:
        raise ValueError(f"Pad: unknown mode {mode!r}")
    if n == 0:
        raise ValueError(f"Pad: mode {mode!r} cannot pad an empty axis")
    return np.pad(np.arange(n, dtype=np.int64), (b, e), mode=_NP_MODES[mode])


def _pad(xp, data, begin, end, mode, value):
    X = data[_crop(data.shape, begin, end)]
    b = [max(v, 0) for v in begin]
    e = [max(v, 0) for v in end]
    if not any(b) and not any(e):
        return xp.ascontiguousarray(X)
    if mode == "constant":
        shape = tuple(n + i + j for n, i, j in zip(X.shape, b, e))
        out = xp.full(shape, value, dtype=X.dtype)
        out[tuple(slice(i, i + n) for i, n in zip(b, X.shape))] = X
        return out
    for axis, (i, j) in enumerate(zip(b, e)):
        if i or j:
            X = xp.take(X, xp.asarray(_index_map(X.shape[axis], i, j, mode)), axis=axis)
    return X


def _value(constant_value, dtype):
    if constant_value is None or np.size(constant_value) == 0:
        return 0
    return np.asarray(constant_value).reshape(-1)[0].astype(dtype)


@op("Pad", since=2, differentiable=("data",))
def Pad2(xp, data, *, mode="constant", pads=None, value=0.0):
    begin, end = _pad_amounts(data.ndim, pads or [], None)
    return (_pad(xp, data, begin, end, mode, np.asarray(value).astype(data.dtype)),)


@op("Pad", since=11, differentiable=("data",), host_inputs=("pads", "constant_value"))
def Pad11(xp, data, pads, constant_value=None, *, mode="constant"):
    begin, end = _pad_amounts(data.ndim, pads, None)
    return (_pad(xp, data, begin, end, mode, _value(constant_value, data.dtype)),)


@op("Pad", since=18, differentiable=("data",),
    host_inputs=("pads", "constant_value", "axes"))
def Pad18(xp, data, pads, constant_value=None, axes=None, *, mode="constant"):
    begin, end = _pad_amounts(data.ndim, pads, axes)
    return (_pad(xp, data, begin, end, mode, _value(constant_value, data.dtype)),)


@Pad2.gradient
def _(g, node, dY):
    X = node.inputs[0]
    return (g.private("PadGrad", dY, g.shape_of(X), g.ints(node.attrs["pads"] or []),
                      mode=node.attrs["mode"]),)


def _pad_rule(g, node, dY):
    X = node.inputs[0]
    axes = node.inputs[3] if len(node.inputs) > 3 and node.inputs[3] else None
    grad = g.private("PadGrad", dY, g.shape_of(X), node.inputs[1], axes, mode=node.attrs["mode"])
    return (grad,) + (None,) * (len(node.inputs) - 1)


Pad11.gradient(_pad_rule)
Pad18.gradient(_pad_rule)


@op("PadGrad", domain="onnxgrad", host_inputs=("x_shape", "pads", "axes"))
def PadGrad(xp, dY, x_shape, pads, axes=None, *, mode="constant"):
    shape = tuple(int(d) for d in x_shape)
    begin, end = _pad_amounts(len(shape), pads, axes)
    crop = _crop(shape, begin, end)
    kept = tuple(s.stop - s.start for s in crop)
    G = dY
    b = [max(v, 0) for v in begin]
    e = [max(v, 0) for v in end]
    if mode == "constant":
        G = G[tuple(slice(i, i + n) for i, n in zip(b, kept))]
    else:
        for axis, (i, j) in enumerate(zip(b, e)):
            if i or j:
                index = _index_map(kept[axis], i, j, mode)
                P = (index[:, None] == np.arange(kept[axis])[None, :]).astype(dY.dtype)
                G = xp.moveaxis(xp.tensordot(G, xp.asarray(P), axes=([axis], [0])), -1, axis)
    if kept == shape:
        return (xp.ascontiguousarray(G),)
    dX = xp.zeros(shape, dtype=dY.dtype)
    dX[crop] = G
    return (dX,)


def along_axis(g, G, M, axis, rank):
    """``Y[..., i, ...] = Σ_o G[..., o, ...] · M[o, i]`` along ``axis`` of ``G`` (rank
    ``rank``) for a host matrix ``M``, in standard ops: one MatMul, with transposes
    where the axis is not one of the last two."""
    if axis == rank - 1:
        return g.MatMul(G, g.const(M, dtype=g.dtype(G)))
    if axis == rank - 2:
        return g.MatMul(g.const(M.T, dtype=g.dtype(G)), G)
    perm = [i for i in range(rank) if i != axis] + [axis]
    moved = g.MatMul(g.Transpose(G, perm=perm), g.const(M, dtype=g.dtype(G)))
    return g.Transpose(moved, perm=[perm.index(i) for i in range(rank)])


@PadGrad.in_standard_ops
def _(g, node):
    # constant: dY's inner block (Slice), zero-padded where the forward cropped;
    # reflect/edge/wrap: per axis, the sum through the index map (a 0/1 matrix) first.
    dY, x_shape, pads_value, *rest = list(node.inputs) + [""]
    mode = node.attrs.get("mode", "constant")
    pads = constant_value(g, pads_value)
    axes = constant_value(g, rest[0]) if rest[0] else None
    shape = std.shape_value(g, x_shape)
    rank = len(shape) if shape is not None else g.rank(dY)
    if (rest[0] and axes is None) or rank is None:
        return None
    if pads is None:  # pads known at run time only
        return (_constant_pad_grad(g, dY, pads_value, axes, rank),) if mode == "constant" \
            else None
    begin, end = _pad_amounts(rank, pads.reshape(-1).tolist(),
                              None if axes is None else axes.reshape(-1).tolist())
    G = dY
    if mode == "constant":
        cut = [i for i in range(rank) if begin[i] > 0 or end[i] > 0]
        if cut:
            G = g.Slice(G, g.ints([max(begin[i], 0) for i in cut]),
                        g.ints([-end[i] if end[i] > 0 else std.END for i in cut]), g.ints(cut))
    else:
        if mode not in _NP_MODES:
            return None
        for axis in range(rank):
            b, e = max(begin[axis], 0), max(end[axis], 0)
            if not b and not e:
                continue
            n = shape[axis] if shape is not None else None
            if not isinstance(n, int):
                return None
            kept = n - max(-begin[axis], 0) - max(-end[axis], 0)
            index = _index_map(kept, b, e, mode)
            G = along_axis(g, G, (index[:, None] == np.arange(kept)[None, :]).astype(np.float64),
                           axis, rank)
    crop = [max(-v, 0) for v in begin] + [max(-v, 0) for v in end]
    if any(crop):
        G = g.Pad(G, g.ints(crop), mode="constant")
    return (G,)


def _constant_pad_grad(g, dY, pads, axes, rank):
    """PadGrad's constant mode for pads fed at run time: the same Slice and Pad, their
    amounts computed from the pads value."""
    axes = list(range(rank)) if axes is None else [int(a) % rank for a in axes.reshape(-1)]
    m, zero = len(axes), g.ints([0])
    pads = g.Cast(pads, to=std.tensor_type("int64"), dtype="int64")
    begin, end = g.Slice(pads, zero, g.ints([m])), g.Slice(pads, g.ints([m]), g.ints([2 * m]))
    sizes = g.Gather(g.Shape(dY, dtype="int64"), g.ints(axes), axis=0)
    inner = g.Slice(dY, g.Max(begin, zero), g.Sub(sizes, g.Max(end, zero)), g.ints(axes))
    crop = g.Concat(g.Max(g.Neg(begin), zero), g.Max(g.Neg(end), zero), axis=0, dtype="int64")
    return g.Pad(inner, crop, None, g.ints(axes), mode="constant")


# -- CenterCropPad --------------------------------------------------------------------------

@op("CenterCropPad", since=18, differentiable=("input_data",), host_inputs=("shape",))
def CenterCropPad(xp, input_data, shape, *, axes=None):
    rank = input_data.ndim
    axes = list(range(rank)) if axes is None else [a % rank for a in axes]
    shape = [int(s) for s in shape]
    if len(shape) != len(axes):
        raise ModelError(f"CenterCropPad: shape {shape} has {len(shape)} entries for "
                         f"{len(axes)} axes")
    out_shape = list(input_data.shape)
    src = [slice(None)] * rank
    dst = [slice(None)] * rank
    for a, want in zip(axes, shape):
        have = input_data.shape[a]
        out_shape[a] = want
        if want < have:  # crop: the extra element goes to the end
            start = (have - want) // 2
            src[a] = slice(start, start + want)
        elif want > have:  # pad: likewise
            start = (want - have) // 2
            dst[a] = slice(start, start + have)
    out = xp.zeros(out_shape, dtype=input_data.dtype)
    out[tuple(dst)] = input_data[tuple(src)]
    return (out,)


@CenterCropPad.gradient
def _(g, node, dY):
    X = node.inputs[0]
    axes = node.attrs.get("axes")
    kw = {} if axes is None else {"axes": axes}
    full = g.shape_of(X)
    if axes is not None:
        full = g.Gather(full, g.ints(axes), axis=0)
    # Cropping and zero-padding about the centre are each other's adjoints.
    return (g.op("CenterCropPad", dY, full, **kw), None)


# -- interpolation matrices (host) ---------------------------------------------------------


def _source_coords(mode, y, scale, n_in, n_out, roi):
    """Source coordinate of each output index; and which fall outside (crop and resize)."""
    width = scale * n_in
    if mode == "align_corners":
        return (np.zeros(n_out) if width == 1 else y * (n_in - 1) / (width - 1)), None
    if mode == "asymmetric":
        return y / scale, None
    if mode == "tf_crop_and_resize":
        x = (np.full(n_out, (roi[1] - roi[0]) * (n_in - 1) / 2) if width == 1
             else y * (roi[1] - roi[0]) * (n_in - 1) / (width - 1))
        x = x + roi[0] * (n_in - 1)
        return x, (x < 0) | (x > n_in - 1)
    if mode == "pytorch_half_pixel":
        return (np.full(n_out, -0.5) if width == 1 else (y + 0.5) / scale - 0.5), None
    if mode == "half_pixel":
        return (y + 0.5) / scale - 0.5, None
    if mode == "half_pixel_symmetric":
        offset = n_in / 2 * (1 - n_out / width)
        return offset + (y + 0.5) / scale - 0.5, None
    raise ValueError(f"Resize: unknown coordinate_transformation_mode {mode!r}")


def _coefficients(mode, ratio, scale, nearest_mode, a, antialias):
    """Interpolation weights ``(out, n)`` for fractional offsets ``ratio`` in (0, 1]."""
    r = ratio[:, None]
    if mode == "nearest":
        if antialias:
            raise ValueError("Resize: antialias does not apply to mode 'nearest'")
        whole = r == 1
        if nearest_mode == "round_prefer_floor":
            right = r > 0.5
        elif nearest_mode == "round_prefer_ceil":
            right = r >= 0.5
        elif nearest_mode == "floor":
            right = whole
        elif nearest_mode == "ceil":
            right = np.ones_like(whole)
        elif nearest_mode == "simple":   # Resize-10 and Upsample: floor up, ceil down
            right = whole | (scale < 1)
        else:
            raise ValueError(f"Resize: unknown nearest_mode {nearest_mode!r}")
        right = right | whole
        return np.concatenate([~right, right], axis=1).astype(np.float64)
    if mode == "linear":
        if antialias:
            s = min(scale, 1.0)
            start = math.floor(-1 / s) + 1
            args = (np.arange(start, 2 - start)[None, :] - r) * s
            w = np.clip(1 - np.abs(args), 0, 1)
            return w / w.sum(axis=1, keepdims=True)
        return np.concatenate([1 - r, r], axis=1)
    if mode == "cubic":
        def kernel(x):
            x = np.abs(x)
            return np.where(x <= 1, ((a + 2) * x - (a + 3)) * x * x + 1,
                            np.where(x < 2, ((a * x - 5 * a) * x + 8 * a) * x - 4 * a, 0.0))
        if antialias:
            s = min(scale, 1.0)
            start = math.floor(-2 / s) + 1
            w = kernel((np.arange(start, 2 - start)[None, :] - r) * s)
            return w / w.sum(axis=1, keepdims=True)
        return kernel(np.concatenate([r + 1, r, 1 - r, 2 - r], axis=1))
    raise ValueError(f"Resize: unknown mode {mode!r}")


def _axis_matrix(n_in, n_out, scale, roi, attrs):
    """The ``(n_out, n_in)`` interpolation matrix of one axis, and its extrapolated rows."""
    y = np.arange(n_out, dtype=np.float64)
    x, outside = _source_coords(attrs["coordinate_transformation_mode"], y, scale, n_in, n_out,
                                roi)
    base = np.floor(x)
    ratio = np.where(x == base, 1.0, x - base)
    w = _coefficients(attrs["mode"], ratio, scale, attrs["nearest_mode"],
                      attrs["cubic_coeff_a"], attrs["antialias"])
    n = w.shape[1]
    pad = math.ceil(n / 2)
    xp_ = x + pad
    p = np.floor(xp_).astype(np.int64)
    frac = xp_ - p
    if n % 2 == 0:
        offset = np.where(frac == 0, -(n // 2), -(n // 2) + 1)
    else:
        offset = np.where(frac <= 0.5, -((n - 1) // 2), -((n - 1) // 2) + 1)
    neighbours = (p + offset)[:, None] + np.arange(n)[None, :] - pad
    if attrs["exclude_outside"]:
        w = np.where((neighbours < 0) | (neighbours >= n_in), 0.0, w)
        total = w.sum(axis=1, keepdims=True)
        w = w / np.where(total == 0, 1.0, total)
    M = np.zeros((n_out, n_in))
    rows = np.repeat(np.arange(n_out), n)
    np.add.at(M, (rows, np.clip(neighbours, 0, n_in - 1).reshape(-1)), w.reshape(-1))
    if outside is not None:
        M[outside] = 0
        if not outside.any():
            outside = None
    return M, outside


def _empty(v):
    return v is None or np.size(v) == 0


def resize_plan(x_shape, roi, scales, sizes, attrs):
    """Output shape, ``[(axis, matrix, extrapolated rows or None)]`` for a Resize."""
    r = len(x_shape)
    axes = attrs.get("axes")
    axes = list(range(r)) if not axes else [int(a) + r if int(a) < 0 else int(a) for a in axes]
    crop = attrs["coordinate_transformation_mode"] == "tf_crop_and_resize"
    box = [0.0] * r + [1.0] * r
    if crop:
        if _empty(roi):
            raise ValueError("Resize: tf_crop_and_resize needs roi")
        roi = [float(v) for v in np.asarray(roi).reshape(-1)]
        for i, a in enumerate(axes):
            box[a], box[r + a] = roi[i], roi[len(axes) + i]
    if not _empty(sizes):
        out = list(x_shape)
        for i, a in enumerate(axes):
            out[a] = int(np.asarray(sizes).reshape(-1)[i])
        scale = [out[i] / x_shape[i] if x_shape[i] else 1.0 for i in range(r)]
        policy = attrs.get("keep_aspect_ratio_policy") or "stretch"
        if policy != "stretch":
            pick = min if policy == "not_larger" else max
            if policy not in ("not_larger", "not_smaller"):
                raise ValueError(f"Resize: unknown keep_aspect_ratio_policy {policy!r}")
            s = pick(scale[a] for a in axes)
            for a in axes:
                scale[a] = s
                out[a] = int(s * x_shape[a] + 0.5)
    elif not _empty(scales):
        scale = [1.0] * r
        for i, a in enumerate(axes):
            scale[a] = float(np.asarray(scales).reshape(-1)[i])
        # floor(in * scale), as onnxruntime and the reference evaluator do (the spec's
        # text also multiplies by the roi's extent for tf_crop_and_resize)
        out = [int(math.floor(x_shape[i] * scale[i])) for i in range(r)]
    else:
        raise ValueError("Resize needs scales or sizes")
    steps = []
    for a in axes:
        if (math.isclose(scale[a], 1.0) and out[a] == x_shape[a]
                and (not crop or (box[a] == 0 and box[r + a] == 1))):
            continue
        M, outside = _axis_matrix(int(x_shape[a]), out[a], scale[a], (box[a], box[r + a]), attrs)
        steps.append((a, M, outside))
    return tuple(out), steps


def _outside_mask(xp, shape, steps):
    mask = None
    for a, _, outside in steps:
        if outside is not None:
            m = xp.asarray(outside.reshape((-1,) + (1,) * (len(shape) - 1 - a)))
            mask = m if mask is None else mask | m
    return mask


def _apply(xp, X, M, axis, transpose=False):
    if not transpose and ((M == 0) | (M == 1)).all() and (M.sum(axis=1) == 1).all():
        return xp.take(X, xp.asarray(M.argmax(axis=1)), axis=axis)     # nearest: a gather
    Md = xp.asarray(M.astype(X.dtype))
    Y = xp.tensordot(X, Md, axes=([axis], [0 if transpose else 1]))
    return xp.moveaxis(Y, -1, axis)


def resize(xp, X, roi, scales, sizes, attrs):
    out, steps = resize_plan(tuple(X.shape), roi, scales, sizes, attrs)
    integer = X.dtype.kind in "iu"
    Y = X.astype("float64") if integer else X
    for a, M, _ in steps:
        Y = _apply(xp, Y, M, a)
    mask = _outside_mask(xp, out, steps)
    if mask is not None:
        Y = xp.where(mask, xp.asarray(attrs["extrapolation_value"], dtype=Y.dtype), Y)
    if integer:
        info = np.iinfo(X.dtype)
        Y = xp.clip(xp.rint(Y), info.min, info.max).astype(X.dtype)
    return xp.ascontiguousarray(Y)


def resize_grad(xp, dY, x_shape, roi, scales, sizes, attrs):
    x_shape = tuple(int(d) for d in x_shape)
    out, steps = resize_plan(x_shape, roi, scales, sizes, attrs)
    mask = _outside_mask(xp, out, steps)
    G = dY if mask is None else xp.where(mask, xp.zeros((), dtype=dY.dtype), dY)
    for a, M, _ in reversed(steps):
        G = _apply(xp, G, M, a, transpose=True)
    return xp.ascontiguousarray(G)


# -- Resize and Upsample -------------------------------------------------------------------

_RESIZE_ATTRS = ("antialias", "axes", "coordinate_transformation_mode", "cubic_coeff_a",
                 "exclude_outside", "extrapolation_value", "keep_aspect_ratio_policy", "mode",
                 "nearest_mode")


def _resize_options(kernel_locals):
    """The attributes of Resize (and ResizeGrad) from a kernel's keyword parameters."""
    return {k: kernel_locals[k] for k in _RESIZE_ATTRS}


def _legacy(mode):
    """Resize-10 and Upsample: asymmetric coordinates, floor-style nearest."""
    return {"mode": "linear" if mode in ("linear", "bilinear") else mode, "antialias": 0,
            "axes": None, "coordinate_transformation_mode": "asymmetric",
            "cubic_coeff_a": -0.75, "exclude_outside": 0, "extrapolation_value": 0.0,
            "keep_aspect_ratio_policy": "stretch", "nearest_mode": "simple"}


@op("Resize", since=11, differentiable=("X",), host_inputs=("roi", "scales", "sizes"))
def Resize(xp, X, roi=None, scales=None, sizes=None, *, antialias=0, axes=None,
           coordinate_transformation_mode="half_pixel", cubic_coeff_a=-0.75, exclude_outside=0,
           extrapolation_value=0.0, keep_aspect_ratio_policy="stretch", mode="nearest",
           nearest_mode="round_prefer_floor"):
    attrs = _resize_options(locals())
    return (resize(xp, X, roi, scales, sizes, attrs),)


@Resize.gradient
def _(g, node, dY):
    ins = list(node.inputs) + [""] * 3
    attrs = {k: node.attrs[k] for k in _RESIZE_ATTRS if node.attrs.get(k) is not None}
    grad = g.private("ResizeGrad", dY, g.shape_of(ins[0]), ins[1] or None, ins[2] or None,
                     ins[3] or None, **attrs)
    return (grad,) + (None,) * (len(node.inputs) - 1)


@op("ResizeGrad", domain="onnxgrad", host_inputs=("x_shape", "roi", "scales", "sizes"))
def ResizeGrad(xp, dY, x_shape, roi=None, scales=None, sizes=None, *, antialias=0, axes=None,
               coordinate_transformation_mode="half_pixel", cubic_coeff_a=-0.75,
               exclude_outside=0, extrapolation_value=0.0, keep_aspect_ratio_policy="stretch",
               mode="nearest", nearest_mode="round_prefer_floor"):
    attrs = _resize_options(locals())
    return (resize_grad(xp, dY, x_shape, roi, scales, sizes, attrs),)


@ResizeGrad.in_standard_ops
def _(g, node):
    # The transposed interpolation matrices, built on the host as the kernel builds them,
    # applied axis by axis in reverse order (one MatMul each); every mode and coordinate
    # transformation is such a product.  Needs the resized axes' sizes and the roi,
    # scales and sizes as constants.
    dY, x_shape, *rest = list(node.inputs) + ["", "", ""]
    attrs = ResizeGrad.resolve_attrs(node.attrs, node.name)
    shape = std.shape_value(g, x_shape)
    if shape is None:
        return None
    host = []
    for value in rest[:3]:
        host.append(constant_value(g, value) if value else None)
        if value and host[-1] is None:
            return None
    roi, scales, sizes = host
    rank = len(shape)
    axes = list(range(rank)) if not attrs.get("axes") else [int(a) % rank for a in attrs["axes"]]
    crop = attrs["coordinate_transformation_mode"] == "tf_crop_and_resize"
    concrete = []
    for i, d in enumerate(shape):
        if not isinstance(d, int):  # a dynamic axis: only one the node leaves alone
            if i in axes and (crop or _empty(scales) or
                              float(scales.reshape(-1)[axes.index(i)]) != 1.0):
                return None
            d = 1
        concrete.append(d)
    try:
        out, steps = resize_plan(tuple(concrete), roi, scales, sizes, attrs)
    except ValueError:
        return None
    G = dY
    mask = _outside_mask(np, out, steps)
    if mask is not None:
        G = g.Where(g.const(mask, dtype=bool), std.like(g, 0, dY), G)
    for a, M, _ in reversed(steps):
        G = along_axis(g, G, M, a, rank)
    return (G,)


def _legacy_rule(g, node, dY):
    X = node.inputs[0]
    if len(node.inputs) > 1:
        scales = node.inputs[1]
    else:
        scales = g.const(np.asarray(node.attrs["scales"], dtype=np.float32), name="scales")
    grad = g.private("ResizeGrad", dY, g.shape_of(X), None, scales, None,
                     **_legacy(node.attrs["mode"]))
    return (grad,) + (None,) * (len(node.inputs) - 1)


@op("Resize", since=10, differentiable=("X",), host_inputs=("scales",))
def Resize10(xp, X, scales, *, mode="nearest"):
    return (resize(xp, X, None, scales, None, _legacy(mode)),)


@op("Upsample", since=7, differentiable=("X",))
def Upsample7(xp, X, *, mode="nearest", scales):
    return (resize(xp, X, None, scales, None, _legacy(mode)),)


@op("Upsample", since=9, differentiable=("X",), host_inputs=("scales",))
def Upsample9(xp, X, scales, *, mode="nearest"):
    return (resize(xp, X, None, scales, None, _legacy(mode)),)


Resize10.gradient(_legacy_rule)
Upsample7.gradient(_legacy_rule)
Upsample9.gradient(_legacy_rule)
