"""Smaller ops that real models carry: Hardmax, Shrink, ThresholdedRelu, LRN,
MeanVarianceNormalization, Det, EyeLike, DepthToSpace, SpaceToDepth,
ReverseSequence, Compress, Unique, CenterCropPad, Col2Im and BitCast.

Gradient rules are given where they are rearrangements of the same data
(DepthToSpace, SpaceToDepth, ReverseSequence, CenterCropPad) or masks
(Shrink, ThresholdedRelu); the other differentiable inputs are declared
without a rule, so asking for their gradient raises UnsupportedOpError.
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
@op("LRN", since=1, differentiable=("X",))
def LRN(xp, X, *, size, alpha=0.0001, beta=0.75, bias=1.0):
    """Across channels (axis 1): X / (bias + alpha/size * sum of squares) ** beta."""
    c = X.shape[1]
    before, after = (size - 1) // 2, -(-(size - 1) // 2)
    sq = X * X
    pad = [(0, 0)] * X.ndim
    pad[1] = (before, after)
    sq = xp.pad(sq, pad)
    total = sum(sq[:, k:k + c] for k in range(size))
    return ((X / (bias + (alpha / size) * total) ** beta).astype(X.dtype),)


@op("MeanVarianceNormalization", since=9, differentiable=("X",))
def MeanVarianceNormalization(xp, X, *, axes=(0, 2, 3)):
    axes = tuple(int(a) for a in axes)
    mean = xp.mean(X, axis=axes, keepdims=True)
    var = xp.mean(X * X, axis=axes, keepdims=True) - mean * mean
    return (((X - mean) / (xp.sqrt(var) + 1e-9)).astype(X.dtype),)


@op("Det", since=11, differentiable=("X",))
def Det(xp, X):
    if X.dtype.kind != "f" or X.dtype.itemsize < 4:  # float16, bfloat16: through float32
        return (xp.linalg.det(X.astype(xp.float32)).astype(X.dtype),)
    return (xp.asarray(xp.linalg.det(X)),)


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
    c = ck // k
    counts = [(image[i] + pad[i] + pad[i + nd] - dil[i] * (block[i] - 1) - 1) // stride[i] + 1
              for i in range(nd)]
    if math.prod(counts) != length:
        raise ModelError(f"Col2Im: {length} columns do not fit {counts} blocks")
    cols = input.reshape([n, c] + block + counts)
    padded = [image[i] + pad[i] + pad[i + nd] for i in range(nd)]
    out = xp.zeros([n, c] + padded, dtype=input.dtype)
    for offset in _product(block):
        index = [slice(None), slice(None)] + [
            slice(offset[i] * dil[i], offset[i] * dil[i] + (counts[i] - 1) * stride[i] + 1,
                  stride[i]) for i in range(nd)]
        out[tuple(index)] += cols[(slice(None), slice(None)) + tuple(offset)]
    crop = [slice(None), slice(None)] + [slice(pad[i], pad[i] + image[i]) for i in range(nd)]
    return (out[tuple(crop)],)


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
