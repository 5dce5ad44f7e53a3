"""Smaller ops that real models carry: Hardmax, Shrink, ThresholdedRelu, LRN,
MeanVarianceNormalization, Det, EyeLike, DepthToSpace, SpaceToDepth,
ReverseSequence, Compress, Unique, CenterCropPad, Col2Im and BitCast.

Every differentiable input has a gradient rule: rearrangements of the same
data (DepthToSpace, SpaceToDepth, ReverseSequence, CenterCropPad) and masks
(Shrink, ThresholdedRelu) in standard ops or small private kernels; LRN,
MeanVarianceNormalization, Det, Compress and Col2Im through private
``…Grad`` kernels.
"""

from __future__ import annotations

import math

from onnxgrad.errors import ModelError
from onnxgrad.ops import standard as std
from onnxgrad.ops.registry import op

_PRIVATE = "onnxgrad"


# -- activations --------------------------------------------------------------------------
@op("Hardmax", since=13)  # piecewise constant: no gradient anywhere it exists
def Hardmax(xp, input, *, axis=-1):
    if input.size == 0:
        return (input,)
    axis = axis % input.ndim
    hot = xp.expand_dims(xp.argmax(input, axis=axis), axis)
    positions = xp.arange(input.shape[axis]).reshape(
        (-1,) + (1,) * (input.ndim - 1 - axis))
    return ((positions == hot).astype(input.dtype),)


@op("Hardmax", since=1)
def Hardmax1(xp, input, *, axis=1):
    """Before opset 13 the input is seen as a 2-D matrix [prod(:axis), prod(axis:)]."""
    shape = input.shape
    axis = axis % max(input.ndim, 1)
    rows = math.prod(shape[:axis])
    (y,) = Hardmax(xp, input.reshape(rows, -1), axis=1)
    return (y.reshape(shape),)


@op("Shrink", since=9, differentiable=("input",))
def Shrink(xp, input, *, bias=0.0, lambd=0.5):
    x = input
    out = xp.where(x < -lambd, x + bias, xp.where(x > lambd, x - bias, 0))
    return (out.astype(x.dtype),)


@op("ShrinkGrad", domain=_PRIVATE)
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


@op("ThresholdedReluGrad", domain=_PRIVATE)
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


# -- normalizations -------------------------------------------------------------------------
def _channel_window_sum(xp, V, before, after):
    """Σ over channels c - before … c + after of ``V`` (zero outside), for each channel c."""
    c = V.shape[1]
    pad = [(0, 0)] * V.ndim
    pad[1] = (before, after)
    padded = xp.pad(V, pad)
    return sum(padded[:, k:k + c] for k in range(before + after + 1))


def _lrn_window(size):
    return (size - 1) // 2, -(-(size - 1) // 2)


@op("LRN", since=1, differentiable=("X",))
def LRN(xp, X, *, size, alpha=0.0001, beta=0.75, bias=1.0):
    """Across channels (axis 1): X / (bias + alpha/size * sum of squares) ** beta."""
    total = _channel_window_sum(xp, X * X, *_lrn_window(size))
    return ((X / (bias + (alpha / size) * total) ** beta).astype(X.dtype),)


@LRN.gradient
def _(g, node, dY):
    return (g.private("LRNGrad", dY, node.inputs[0], **node.attrs),)


@op("LRNGrad", domain=_PRIVATE)
def LRNGrad(xp, dY, X, *, size, alpha=0.0001, beta=0.75, bias=1.0):
    """dX = dY·D^-β - (2αβ/size)·X·Σ_window'(dY·X·D^(-β-1)), D = bias + α/size·Σ_window X²;
    the adjoint window Σ_window' runs over the channels whose window holds c."""
    before, after = _lrn_window(size)
    x, dy = X.astype(xp.float64), dY.astype(xp.float64)
    D = bias + (alpha / size) * _channel_window_sum(xp, x * x, before, after)
    back = _channel_window_sum(xp, dy * x * D ** (-beta - 1), after, before)
    return ((dy * D ** -beta - (2 * alpha * beta / size) * x * back).astype(dY.dtype),)


_MVN_EPSILON = 1e-9


@op("MeanVarianceNormalization", since=9, differentiable=("X",))
def MeanVarianceNormalization(xp, X, *, axes=(0, 2, 3)):
    axes = tuple(int(a) for a in axes)
    mean = xp.mean(X, axis=axes, keepdims=True)
    var = xp.mean(X * X, axis=axes, keepdims=True) - mean * mean
    return (((X - mean) / (xp.sqrt(var) + _MVN_EPSILON)).astype(X.dtype),)


@MeanVarianceNormalization.gradient
def _(g, node, dY):
    return (g.private("MeanVarianceNormalizationGrad", dY, node.inputs[0],
                      axes=list(node.attrs["axes"])),)


@op("MeanVarianceNormalizationGrad", domain=_PRIVATE)
def MeanVarianceNormalizationGrad(xp, dY, X, *, axes=(0, 2, 3)):
    """With Y = Xc / d, Xc = X - mean, d = σ + ε, σ² = mean(X²) - mean²:
    dX = dY/d - mean(dY/d) - Xc · mean(dY·Xc) / (d²·σ)."""
    axes = tuple(int(a) for a in axes)
    x, dy = X.astype(xp.float64), dY.astype(xp.float64)
    centred = x - xp.mean(x, axis=axes, keepdims=True)
    sigma = xp.sqrt(xp.maximum(xp.mean(centred * centred, axis=axes, keepdims=True), 0.0))
    d = sigma + _MVN_EPSILON
    scaled = dy / d
    spread = xp.mean(dy * centred, axis=axes, keepdims=True) / (d * d * xp.where(
        sigma > 0, sigma, 1.0))
    dX = scaled - xp.mean(scaled, axis=axes, keepdims=True) - centred * spread
    return (dX.astype(dY.dtype),)


@op("Det", since=11, differentiable=("X",))
def Det(xp, X):
    if X.dtype.kind != "f" or X.dtype.itemsize < 4:  # float16, bfloat16: through float32
        return (xp.linalg.det(X.astype(xp.float32)).astype(X.dtype),)
    return (xp.asarray(xp.linalg.det(X)),)


@Det.gradient
def _(g, node, dY):
    return (g.private("DetGrad", dY, node.inputs[0]),)


@op("DetGrad", domain=_PRIVATE)
def DetGrad(xp, dY, X):
    """dY times the cofactor matrix of X (the gradient of det), from the SVD X = U·S·Vᵀ:
    cof(X) = det(U)·det(Vᵀ) · U·diag(Π_{j≠i} s_j)·Vᵀ, exact for singular X too."""
    work = X.astype(xp.float64)
    U, s, Vt = xp.linalg.svd(work)
    ones = xp.ones(s.shape[:-1] + (1,), dtype=s.dtype)
    before = xp.cumprod(xp.concatenate([ones, s[..., :-1]], axis=-1), axis=-1)
    after = xp.flip(xp.cumprod(xp.concatenate([ones, xp.flip(s, -1)[..., :-1]], axis=-1),
                               axis=-1), -1)
    sign = xp.linalg.det(U) * xp.linalg.det(Vt)
    cofactor = (U * (before * after)[..., None, :]) @ Vt
    dX = (dY.astype(xp.float64) * sign)[..., None, None] * cofactor
    return (dX.astype(dY.dtype),)


# -- creation -------------------------------------------------------------------------------
@op("EyeLike", since=9)
def EyeLike(xp, input, *, dtype=None, k=0):
    from onnx.helper import tensor_dtype_to_np_dtype  # noqa: PLC0415 - type codes only

    if input.ndim != 2:
        raise ModelError(f"EyeLike needs a 2-D input, got shape {list(input.shape)}")
    out_dtype = input.dtype if dtype is None else tensor_dtype_to_np_dtype(int(dtype))
    return (xp.eye(input.shape[0], input.shape[1], k=k).astype(out_dtype),)


# -- rearrangements -------------------------------------------------------------------------
def _depth_to_space(xp, x, b, mode):
    n, c, h, w = x.shape
    if mode == "DCR":
        y = x.reshape(n, b, b, c // (b * b), h, w).transpose(0, 3, 4, 1, 5, 2)
    else:  # CRD
        y = x.reshape(n, c // (b * b), b, b, h, w).transpose(0, 1, 4, 2, 5, 3)
    return y.reshape(n, c // (b * b), h * b, w * b)


def _space_to_depth(xp, x, b, mode):
    n, c, h, w = x.shape
    y = x.reshape(n, c, h // b, b, w // b, b)
    if mode == "DCR":
        y = y.transpose(0, 3, 5, 1, 2, 4)
    else:  # CRD: the inverse of DepthToSpace's CRD layout
        y = y.transpose(0, 1, 3, 5, 2, 4)
    return y.reshape(n, c * b * b, h // b, w // b)


@op("DepthToSpace", since=1, differentiable=("input",))
def DepthToSpace(xp, input, *, blocksize, mode="DCR"):
    if input.ndim != 4 or input.shape[1] % (blocksize * blocksize):
        raise ModelError(f"DepthToSpace: input of shape {list(input.shape)} has no channel count "
                         f"divisible by blocksize² = {blocksize * blocksize}")
    return (_depth_to_space(xp, input, blocksize, mode),)


@op("SpaceToDepth", since=1, differentiable=("input",))
def SpaceToDepth(xp, input, *, blocksize, mode="DCR"):
    if input.ndim != 4 or input.shape[2] % blocksize or input.shape[3] % blocksize:
        raise ModelError(f"SpaceToDepth: spatial dims of shape {list(input.shape)} are not "
                         f"divisible by blocksize {blocksize}")
    return (_space_to_depth(xp, input, blocksize, mode),)


@op("SpaceToDepthMode", domain=_PRIVATE)
def SpaceToDepthMode(xp, input, *, blocksize, mode="DCR"):
    """SpaceToDepth with DepthToSpace's ``mode``: the exact inverse of DepthToSpace."""
    return (_space_to_depth(xp, input, blocksize, mode),)


@SpaceToDepthMode.in_standard_ops
def _(g, node):
    (X,) = node.inputs
    b, mode = node.attrs["blocksize"], node.attrs.get("mode", "DCR")
    if mode == "DCR":
        return (g.SpaceToDepth(X, blocksize=b),)
    shape = std.tensor_shape(g, X)
    if shape is None or not all(isinstance(d, int) for d in shape[1:]):
        return None
    _, c, h, w = shape
    blocks = g.Reshape(X, g.ints([-1, c, h // b, b, w // b, b]))
    moved = g.Transpose(blocks, perm=[0, 1, 3, 5, 2, 4])
    return (g.Reshape(moved, g.ints([-1, c * b * b, h // b, w // b])),)


@DepthToSpace.gradient
def _(g, node, dY):
    return (g.private("SpaceToDepthMode", dY, blocksize=node.attrs["blocksize"],
                      mode=node.attrs["mode"]),)


@SpaceToDepth.gradient
def _(g, node, dY):
    # A permutation: its adjoint is its inverse, DepthToSpace in the same layout.
    return (g.op("DepthToSpace", dY, blocksize=node.attrs["blocksize"],
                 mode=node.attrs.get("mode", "DCR")),)


@SpaceToDepthMode.gradient
def _(g, node, dY):
    return (g.op("DepthToSpace", dY, blocksize=node.attrs["blocksize"],
                 mode=node.attrs.get("mode", "DCR")),)


@op("ReverseSequence", since=10, differentiable=("input",))
def ReverseSequence(xp, input, sequence_lens, *, batch_axis=1, time_axis=0):
    y = input.copy()
    steps = input.shape[time_axis]
    for b, n in enumerate(int(v) for v in sequence_lens.tolist()):
        n = max(0, min(n, steps))
        src = [slice(None)] * input.ndim
        src[batch_axis] = b
        src[time_axis] = slice(n - 1, None, -1) if n else slice(0, 0)
        dst = list(src)
        dst[time_axis] = slice(0, n)
        y[tuple(dst)] = input[tuple(src)]
    return (y,)


@ReverseSequence.gradient
def _(g, node, dY):
    # Reversing the first n steps is its own inverse (and adjoint).
    return (g.op("ReverseSequence", dY, node.inputs[1], batch_axis=node.attrs["batch_axis"],
                 time_axis=node.attrs["time_axis"]), None)


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


# -- selections -----------------------------------------------------------------------------
@op("Compress", since=9, differentiable=("input",))
def Compress(xp, input, condition, *, axis=None):
    cond = condition.astype(bool).reshape(-1)
    if axis is None:
        flat = input.reshape(-1)
        return (flat[:cond.size][cond[:flat.size]],)
    axis = axis % input.ndim
    n = input.shape[axis]
    index = xp.nonzero(cond[:n])[0]
    return (xp.take(input, index, axis=axis),)


@Compress.gradient
def _(g, node, dY):
    input, condition = node.inputs
    axis = node.attrs["axis"]
    kw = {} if axis is None else {"axis": axis}
    return (g.private("CompressGrad", dY, g.shape_of(input), condition, **kw), None)


@op("CompressGrad", domain=_PRIVATE, host_inputs=("input_shape",))
def CompressGrad(xp, dY, input_shape, condition, *, axis=None):
    """``dY`` put back where Compress took it from, zeros elsewhere."""
    shape = tuple(int(d) for d in input_shape)
    cond = condition.astype(bool).reshape(-1)
    if axis is None:
        size = math.prod(shape)
        flat = xp.zeros(size, dtype=dY.dtype)
        flat[xp.nonzero(cond[:size])[0]] = dY.reshape(-1)
        return (flat.reshape(shape),)
    axis = axis % len(shape)
    dX = xp.zeros(shape, dtype=dY.dtype)
    index = [slice(None)] * len(shape)
    index[axis] = xp.nonzero(cond[:shape[axis]])[0]
    dX[tuple(index)] = dY
    return (dX,)


@op("Unique", since=11)
def Unique(xp, X, *, axis=None, sorted=1):
    data = X.reshape(-1) if axis is None else X
    a = 0 if axis is None else axis % X.ndim
    y, first, inverse, counts = xp.unique(data, return_index=True, return_inverse=True,
                                          return_counts=True, axis=None if axis is None else a)
    inverse = inverse.reshape(-1)
    if not sorted:  # in order of first occurrence
        order = xp.argsort(first, kind="stable")
        rank = xp.empty_like(order)
        rank[order] = xp.arange(order.size)
        first, counts, inverse = first[order], counts[order], rank[inverse]
        y = xp.take(data, first, axis=a)
    i64 = xp.int64
    return y, first.astype(i64), inverse.astype(i64), counts.astype(i64)


# -- Col2Im ---------------------------------------------------------------------------------
@op("Col2Im", since=18, differentiable=("input",), host_inputs=("image_shape", "block_shape"))
def Col2Im(xp, input, image_shape, block_shape, *, dilations=None, pads=None, strides=None):
    image = [int(v) for v in image_shape]
    block = [int(v) for v in block_shape]
    nd = len(image)
    dil = [int(v) for v in dilations] if dilations else [1] * nd
    pad = [int(v) for v in pads] if pads else [0] * (2 * nd)
    stride = [int(v) for v in strides] if strides else [1] * nd
    n, ck, length = input.shape
    k = math.prod(block)
    if ck % k:
        raise ModelError(f"Col2Im: input dimension 1 ({ck}) is not divisible by the block "
                         f"size {k}")
    counts = [(image[i] + pad[i] + pad[i + nd] - dil[i] * (block[i] - 1) - 1) // stride[i] + 1
              for i in range(nd)]
    if math.prod(counts) != length:
        raise ModelError(f"Col2Im: {length} columns do not fit {counts} blocks")
    cols = input.reshape([n, ck // k] + block + counts)
    padded = [image[i] + pad[i] + pad[i + nd] for i in range(nd)]
    out = xp.zeros([n, ck // k] + padded, dtype=input.dtype)
    for offset, window in _col2im_windows(block, counts, dil, stride):
        out[window] += cols[(slice(None), slice(None)) + offset]
    crop = [slice(None), slice(None)] + [slice(pad[i], pad[i] + image[i]) for i in range(nd)]
    return (out[tuple(crop)],)


def _col2im_windows(block, counts, dil, stride):
    """For each block offset, the (strided) slice of the padded image its columns cover."""
    for offset in _product(block):
        yield tuple(offset), (slice(None), slice(None)) + tuple(
            slice(offset[i] * dil[i], offset[i] * dil[i] + (counts[i] - 1) * stride[i] + 1,
                  stride[i]) for i in range(len(block)))


@Col2Im.gradient
def _(g, node, dY):
    input, image_shape, block_shape = node.inputs
    attrs = {k: v for k, v in node.attrs.items() if v is not None}
    return (g.private("Col2ImGrad", dY, image_shape, block_shape, **attrs), None, None)


@op("Col2ImGrad", domain=_PRIVATE, host_inputs=("image_shape", "block_shape"))
def Col2ImGrad(xp, dY, image_shape, block_shape, *, dilations=None, pads=None, strides=None):
    """Im2Col of ``dY``: the adjoint of Col2Im gathers each block's columns back."""
    image = [int(v) for v in image_shape]
    block = [int(v) for v in block_shape]
    nd = len(image)
    dil = [int(v) for v in dilations] if dilations else [1] * nd
    pad = [int(v) for v in pads] if pads else [0] * (2 * nd)
    stride = [int(v) for v in strides] if strides else [1] * nd
    n, c = dY.shape[:2]
    counts = [(image[i] + pad[i] + pad[i + nd] - dil[i] * (block[i] - 1) - 1) // stride[i] + 1
              for i in range(nd)]
    padded = xp.pad(dY, [(0, 0), (0, 0)] + [(pad[i], pad[i + nd]) for i in range(nd)])
    cols = xp.empty([n, c] + block + counts, dtype=dY.dtype)
    for offset, window in _col2im_windows(block, counts, dil, stride):
        cols[(slice(None), slice(None)) + offset] = padded[window]
    return (cols.reshape(n, c * math.prod(block), math.prod(counts)),)


def _product(dims):
    if not dims:
        yield ()
        return
    for i in range(dims[0]):
        for rest in _product(dims[1:]):
            yield (i,) + rest


# -- BitCast --------------------------------------------------------------------------------
@op("BitCast", since=26)
def BitCast(xp, input, *, to):
    from onnx.helper import tensor_dtype_to_np_dtype  # noqa: PLC0415 - type codes only

    if int(to) == 8 or input.dtype.kind in "OUS":
        raise ModelError("BitCast to or from strings is not defined")
    dtype = tensor_dtype_to_np_dtype(int(to))
    if xp.dtype(dtype).itemsize != input.dtype.itemsize:
        raise ModelError(f"BitCast from {input.dtype} to {xp.dtype(dtype)}: the element sizes "
                         "differ")
    x = input if input.flags.c_contiguous else input.copy()  # (ascontiguousarray makes 0-d 1-d)
    return (x.view(dtype),)
