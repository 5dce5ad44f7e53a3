"""Convolutions: Conv and ConvTranspose, 1-D to 3-D, with their gradient kernels,
and Col2Im.

Both are written with three array helpers shared with pooling (``ops/pool.py``):

* :func:`pad_spatial` pads (or crops, for negative amounts) the spatial axes;
* :func:`windows` is a strided view ``(N, C, *out, *kernel)`` of a padded input
  (``xp.lib.stride_tricks.as_strided``, in NumPy and CuPy alike): im2col without
  index arrays;
* :func:`col2im` scatters columns ``(*lead, *kernel, *out, *trail)`` back onto an
  image ``(*lead, *full, *trail)``, one strided slice per kernel offset (a loop
  over ``prod(kernel)`` offsets, never over pixels or batch items).

Products are BLAS matmuls over groups, in one of two column layouts chosen per
layer (batch-major per item, or batch-inner over the whole batch; see
:func:`_batch_major`).  A stride-1 input gradient with enough channels is a
Conv with the flipped kernel (:func:`flipped_input_grad`), which copies columns
instead of scattering them.  ConvTranspose's forward pass is
Conv's input gradient, and its gradients are a Conv and a Conv weight gradient,
so the same three products serve all six computations.  Gradient kernels are
private ops of the ``onnxgrad`` domain (``ConvGradX``, ``ConvGradW``,
``ConvTransposeGradX``, ``ConvTransposeGradW``, ``BiasGrad``), one per input so
that the planner prunes the ones a training step does not need (e.g. the input
gradient of the first layer).  They take the forward node's attributes and
recompute padding from the input's shape, so every ``auto_pad`` mode works.

Col2Im (opset 18) adds blocks given as columns back onto an image of any
spatial rank, one strided slice per block offset; its gradient, the private
``Col2ImGrad``, is im2col: it gathers each block's columns back.
"""

from __future__ import annotations

import functools
import itertools
import math

import numpy as np

from onnxgrad.errors import ModelError
from onnxgrad.ops import compiled, depthwise, winograd
from onnxgrad.ops import standard as std
from onnxgrad.ops.registry import op
from onnxgrad.threads import each, in_task, matmul, product_parts, split, sum_in_order

# -- geometry (host-side integers) ---------------------------------------------------------


def _ints(values, n, default):
    return [int(v) for v in values] if values else [default] * n


def conv_pads(auto_pad, pads, in_shape, kernel, strides, dilations):
    """Begin and end pads of a convolution or pooling window (lists of ints)."""
    n = len(in_shape)
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        begin, end = [], []
        for i in range(n):
            out = -(-in_shape[i] // strides[i])
            need = max(0, (out - 1) * strides[i] + (kernel[i] - 1) * dilations[i] + 1 - in_shape[i])
            head = need // 2 if auto_pad == "SAME_UPPER" else need - need // 2
            begin.append(head)
            end.append(need - head)
        return begin, end
    if auto_pad == "VALID":
        return [0] * n, [0] * n
    if auto_pad not in ("NOTSET", "", None):
        raise ValueError(f"unknown auto_pad {auto_pad!r}")
    p = _ints(pads, 2 * n, 0)
    return p[:n], p[n:]


def out_size(size, begin, end, k, stride, dilation):
    return (size + begin + end - (k - 1) * dilation - 1) // stride + 1


# -- array helpers -------------------------------------------------------------------------


def pad_spatial(xp, X, begin, end, value=0):
    """``X`` with its spatial axes (2…) padded by ``begin``/``end`` (negative: cropped)."""
    if not any(begin) and not any(end):
        return X
    crop = tuple(slice(max(-b, 0), X.shape[2 + i] - max(-e, 0))
                 for i, (b, e) in enumerate(zip(begin, end)))
    X = X[(slice(None), slice(None)) + crop]
    if all(b <= 0 for b in begin) and all(e <= 0 for e in end):
        return X
    shape = tuple(X.shape[:2]) + tuple(X.shape[2 + i] + max(b, 0) + max(e, 0)
                                       for i, (b, e) in enumerate(zip(begin, end)))
    out = xp.full(shape, value, dtype=X.dtype)
    place = tuple(slice(max(b, 0), max(b, 0) + X.shape[2 + i]) for i, b in enumerate(begin))
    out[(slice(None), slice(None)) + place] = X
    return out


def windows(xp, Xp, kernel, strides, dilations, out):
    """A read-only view ``(N, C, *out, *kernel)`` of the windows of ``Xp``."""
    s = Xp.strides
    nd = len(kernel)
    shape = tuple(Xp.shape[:2]) + tuple(out) + tuple(kernel)
    steps = (s[:2] + tuple(s[2 + i] * strides[i] for i in range(nd))
             + tuple(s[2 + i] * dilations[i] for i in range(nd)))
    return xp.lib.stride_tricks.as_strided(Xp, shape=shape, strides=steps)


def offset_slices(offset, strides, dilations, out):
    """The spatial slices that kernel ``offset`` reads for every output position."""
    return tuple(slice(o * d, o * d + s * (n - 1) + 1, s)
                 for o, s, d, n in zip(offset, strides, dilations, out))


def col2im(xp, cols, full, strides, dilations, img=None, lead=2):
    """Sum columns ``(*lead, *kernel, *out, *trail)`` onto an image
    ``(*lead, *full, *trail)`` (``img``, zeros when not given); ``lead`` counts the
    leading axes (batch and channel in either order, or channel alone)."""
    nd = len(full)
    kernel = cols.shape[lead:lead + nd]
    out = cols.shape[lead + nd:lead + 2 * nd]
    head = (slice(None),) * lead
    tail = (slice(None),) * (cols.ndim - lead - 2 * nd)
    if img is None:
        img = xp.zeros(tuple(cols.shape[:lead]) + tuple(full) + tuple(cols.shape[lead + 2 * nd:]),
                       dtype=cols.dtype)
    for offset in itertools.product(*(range(k) for k in kernel)):
        img[head + offset_slices(offset, strides, dilations, out) + tail] += cols[head + offset]
    return img


# -- column layouts ------------------------------------------------------------------------
#
# A product runs in one of two layouts, chosen per layer by :func:`_batch_major`:
#
# * batch-major: per batch item, columns ``(g, C/g·K, P)`` and one product per item
#   and group, the batch taken in chunks of :data:`COLUMN_BUDGET` elements.  Early
#   layers: many positions per item, and results that need no transposing.
# * batch-inner: the input moved to ``(C, *spatial, N)`` and one product over every
#   position of every item, columns ``(g, C/g·K, P·N)``.  Deep and small layers:
#   per-item products would be skinny, and with the batch innermost, the copies
#   that make and scatter columns move runs of ``N`` (or ``out·N``) elements.


#: Output positions per item from which a layer runs batch-major (see below).
BATCH_MAJOR_MIN_POSITIONS = 256


def _batch_major(positions, channels, kernel):
    """Whether a product with ``positions`` output positions per item, ``channels``
    output channels per group and a ``kernel`` of that shape runs batch-major: when
    per-item products are wide enough to run at BLAS speed (measured on OpenBLAS:
    :data:`BATCH_MAJOR_MIN_POSITIONS`, and no fewer than the channels), or when the
    kernel is a single point, whose columns are the input itself and so need no
    copies to speed up."""
    return positions >= max(channels, BATCH_MAJOR_MIN_POSITIONS) or math.prod(kernel) == 1


#: Batch-major columns are made for this many elements at most at a time
#: (4 MiB of float32): the batch is taken in chunks, which bounds the memory a
#: convolution adds on top of its input and output and keeps each chunk's
#: columns in cache between the copy that makes them and the product that
#: reads them.
COLUMN_BUDGET = 1 << 20


#: Batch-major layers are taken in this many chunks at least (as the batch
#: allows), so that the chunks keep every thread of the pool busy.
MIN_CHUNKS = 8

#: Elements from which a copy or scatter over channels is split into parts on
#: the pool (a part of a smaller one costs more to hand over than to run).
PARALLEL_COPY = 1 << 18


#: On a GPU: elements of columns made at once, at most (a bound on their memory:
#: there a chunk exists only to bound it, and one product over the whole batch
#: keeps the device busiest).
DEVICE_COLUMN_BUDGET = 1 << 27


def _chunks(xp, batch, per_item):
    """Slices of the batch whose columns fit :data:`COLUMN_BUDGET`, at least
    :data:`MIN_CHUNKS` of them when the batch has that many items and the
    columns are large enough to split (see :data:`PARALLEL_COPY`); on a GPU,
    slices whose columns fit :data:`DEVICE_COLUMN_BUDGET`."""
    if xp.__name__ != "numpy":
        step = max(1, DEVICE_COLUMN_BUDGET // max(per_item, 1))
        return [slice(i, min(i + step, batch)) for i in range(0, batch, step)]
    step = max(1, COLUMN_BUDGET // max(per_item, 1))
    if batch * per_item >= PARALLEL_COPY:
        step = max(1, min(step, batch // MIN_CHUNKS))
    return [slice(i, min(i + step, batch)) for i in range(0, batch, step)]


#: Batch items per part, at least, of a batch-inner layer run in parts along the
#: batch (:func:`_batch_parts`): the copies of a part move runs of this many
#: elements or more.
BATCH_PART_MIN_ITEMS = 16


def _batch_parts(xp, batch, macs):
    """Slices of the batch for a batch-inner layer of ``macs`` multiply-adds, or None
    to run it over the whole batch at once.  Where its product would be split on
    the thread pool (:func:`onnxgrad.threads.product_parts`) into parts of
    :data:`BATCH_PART_MIN_ITEMS` items or more, each part of the batch runs on its
    own from input to output: the copies around the product (moving the batch
    axis, making columns, scattering them), single passes over memory otherwise,
    then split with it (LeNet-5's second layer at batch 64: 381 → 263
    microseconds on two threads, 500 → 462 on one).  NumPy arrays only; the parts
    depend on the shapes alone."""
    if xp.__name__ != "numpy":
        return None
    parts = product_parts(macs)
    if parts < 2 or batch < parts * BATCH_PART_MIN_ITEMS:
        return None
    return split(batch, parts)


def _batch_first_into(xp, A, out, B=None):
    """``A`` ``(C, *spatial, n)`` moved to ``out`` ``(n, C, *spatial)``, plus the
    per-channel ``B`` where given, in the same pass (the sums of an addition after)."""
    A = xp.moveaxis(A, -1, 0)
    if B is None:
        out[...] = A
    else:
        xp.add(A, B.reshape(_bias_shape(B, A.ndim)), out=out)
    return out


def _by_batch_parts(xp, parts, inner, shape, dtype, key, B=None):
    """A batch-inner computation's result ``shape`` ``(N, …)`` made in ``parts`` of the
    batch on the thread pool: ``inner(items)``, the result of a part with the batch
    last ``(…, n)``, is moved into place (plus the per-channel ``B`` where given)."""
    result = xp.empty(shape, dtype=dtype)
    each(xp, parts, lambda items: _batch_first_into(xp, inner(items), result[items], B),
         ("in batch parts",) + key)
    return result


def _channel_parts(xp, C, size):
    """Slices of ``C`` channels for a copy of ``size`` elements: one when small, or
    when the caller is itself a task on the pool (a part of the batch)."""
    if size < PARALLEL_COPY or xp.__name__ != "numpy" or in_task():
        return [slice(None)]
    return split(C, min(C, 8))


def _im2col(xp, Xp, kernel, strides, dilations, out, group):
    """Batch-major columns ``(N, g, C/g·K, P)`` of a padded input."""
    N, C = Xp.shape[:2]
    nd = len(kernel)
    win = windows(xp, Xp, kernel, strides, dilations, out)        # (N, C, *out, *kernel)
    kernel_axes = tuple(range(2 + nd, 2 + 2 * nd))
    out_axes = tuple(range(2, 2 + nd))
    cols = xp.ascontiguousarray(win.transpose((0, 1) + kernel_axes + out_axes))
    return cols.reshape(N, group, (C // group) * math.prod(kernel), math.prod(out))


def _batch_last(xp, A):
    """``(N, C, *spatial)`` as a contiguous ``(C, *spatial, N)``."""
    return xp.ascontiguousarray(xp.moveaxis(A, 0, -1))


def _batch_first(xp, A):
    """``(C, *spatial, N)`` as a contiguous ``(N, C, *spatial)``."""
    return xp.ascontiguousarray(xp.moveaxis(A, -1, 0))


def _im2col_inner(xp, Xt, kernel, strides, dilations, out, group):
    """Batch-inner columns ``(g, C/g·K, P·N)`` of a padded input ``(C, *full, N)``."""
    C, N = Xt.shape[0], Xt.shape[-1]
    nd = len(kernel)
    s = Xt.strides
    shape = (C,) + tuple(kernel) + tuple(out) + (N,)
    steps = ((s[0],) + tuple(s[1 + i] * dilations[i] for i in range(nd))
             + tuple(s[1 + i] * strides[i] for i in range(nd)) + (s[-1],))
    view = xp.lib.stride_tricks.as_strided(Xt, shape=shape, strides=steps)
    cols = xp.empty(shape, dtype=Xt.dtype)

    def copy(part):
        cols[part] = view[part]

    each(xp, _channel_parts(xp, C, cols.size), copy, ("im2col", Xt.shape, shape))
    return cols.reshape(group, (C // group) * math.prod(kernel), -1)


#: Batch items from which batch-inner columns over two spatial axes are made by the
#: compiled kernel (:func:`_im2col_inner_kernel`) where it runs: its innermost loop
#: runs over the items, and with fewer the NumPy copies are faster (measured on
#: LeNet-5's second layer: 13 against 21 microseconds for one item, 46 against 42
#: for 32, 89 against 72 for 64).
COMPILED_COLUMNS_MIN_ITEMS = 32


def _columns_inner(xp, Xp, items, kernel, strides, dilations, out, group):
    """Batch-inner columns ``(g, C/g·K, P·n)`` of the ``items`` (a slice) of a padded
    input ``(N, C, *full)``: for two spatial axes and :data:`COMPILED_COLUMNS_MIN_ITEMS`
    items or more where the compiled kernels run, in one pass
    (:func:`_im2col_inner_kernel`, the same values), else by :func:`_im2col_inner` of
    the items moved to ``(C, *full, n)``."""
    X = Xp[items]
    if (len(kernel) != 2 or X.shape[0] < COMPILED_COLUMNS_MIN_ITEMS
            or not compiled.available(xp, X)):
        return _im2col_inner(xp, _batch_last(xp, X), kernel, strides, dilations, out, group)
    X = xp.ascontiguousarray(X)
    C = X.shape[1]
    cols = xp.empty((C,) + tuple(kernel) + tuple(out) + (X.shape[0],), dtype=X.dtype)
    _im2col_inner_kernel(X, cols, *strides, *dilations)
    return cols.reshape(group, (C // group) * math.prod(kernel), -1)


def _rows_inner(xp, dY, group):
    """Output gradients ``(N, M, *out)`` as batch-inner rows ``(g, M/g, P·N)``."""
    return _batch_last(xp, dY).reshape(group, dY.shape[1] // group, -1)


def conv_forward(xp, Xp, W, strides, dilations, group, out, B=None):
    """Conv of an already padded input, plus the bias ``B`` ``(M,)`` where given (the
    sums of an addition after): ``(N, M, *out)``."""
    if winograd.applies(Xp, W.shape, strides, dilations, group, out):
        Y = winograd.conv3x3(xp, Xp, W, out)
        if B is not None:
            Y += B.reshape(_bias_shape(B, Y.ndim))
        return Y
    N = Xp.shape[0]
    M = W.shape[0]
    W3 = W.reshape(group, M // group, -1)
    if _batch_major(math.prod(out), M // group, W.shape[2:]):
        Y = xp.empty((N, group, M // group, math.prod(out)), dtype=Xp.dtype)
        bias = None if B is None else B.reshape(group, M // group, 1)

        def chunk(part):
            cols = _im2col(xp, Xp[part], W.shape[2:], strides, dilations, out, group)
            xp.matmul(W3, cols, out=Y[part])                       # (n, g, M/g, P)
            if bias is not None:
                Y[part] += bias

        each(xp, _chunks(xp, N, W3.shape[2] * group * math.prod(out)), chunk,
             ("conv", Xp.shape, W.shape, tuple(strides), tuple(dilations), group))
        return Y.reshape((N, M) + tuple(out))

    def inner(items, product):                                    # (M, *out, n)
        cols = _columns_inner(xp, Xp, items, W.shape[2:], strides, dilations, out, group)
        return product(W3, cols).reshape((M,) + tuple(out) + (-1,))  # (g, M/g, P·n)

    parts = _batch_parts(xp, N, N * M * W3.shape[2] * math.prod(out))
    if parts is None:
        return _batch_first_into(xp, inner(slice(None), functools.partial(matmul, xp)),
                                 xp.empty((N, M) + tuple(out), dtype=Xp.dtype), B)
    return _by_batch_parts(xp, parts, lambda items: inner(items, xp.matmul),
                           (N, M) + tuple(out), Xp.dtype,
                           ("conv", Xp.shape, W.shape, tuple(strides), tuple(dilations), group), B)


#: Output channels per group below which a weight gradient is computed
#: transposed, as columns @ dY^T.
GRADW_TRANSPOSED_BELOW = 256


def conv_weight_grad(xp, dY, Xp, kernel, strides, dilations, group):
    """dW ``(M, C/group, *kernel)`` of Conv(Xp) given its output gradient ``dY``."""
    N, M = dY.shape[:2]
    out = dY.shape[2:]
    if (winograd.applies(Xp, (M, Xp.shape[1]) + tuple(kernel), strides, dilations, group, out)
            and math.prod(out) <= winograd.WEIGHT_GRAD_MAX_POSITIONS):
        return winograd.weight_grad3x3(xp, dY, Xp)
    # With few output channels, columns @ dY^T (dW transposed) runs faster in
    # BLAS than dY @ columns^T (measured on OpenBLAS).
    transposed = M // group < GRADW_TRANSPOSED_BELOW

    def product(d, cols, mm=functools.partial(matmul, xp)):        # (…, g, M/g or C/g·K, …)
        if transposed:
            return mm(cols, xp.swapaxes(d, -1, -2))
        return mm(d, xp.swapaxes(cols, -1, -2))

    if _batch_major(math.prod(out), M // group, kernel):
        d = dY.reshape(N, group, M // group, -1)                   # (N, g, M/g, P)

        def chunk(part):
            cols = _im2col(xp, Xp[part], kernel, strides, dilations, out, group)
            return product(d[part], cols).sum(axis=0)

        per_item = Xp.shape[1] * math.prod(kernel) * math.prod(out)
        dW = sum_in_order(each(xp, _chunks(xp, N, per_item), chunk,
                               ("conv weight grad", dY.shape, Xp.shape, tuple(kernel),
                                tuple(strides), tuple(dilations), group)))
    else:
        def partial(items, mm=xp.matmul):
            cols = _columns_inner(xp, Xp, items, kernel, strides, dilations, out, group)
            return product(_rows_inner(xp, dY[items], group), cols, mm)

        parts = _batch_parts(xp, N, N * M * (Xp.shape[1] // group) * math.prod(kernel)
                             * math.prod(out))
        if parts is None:
            dW = partial(slice(None), functools.partial(matmul, xp))
        else:
            dW = sum_in_order(each(xp, parts, partial,
                                   ("conv weight grad in batch parts", dY.shape, Xp.shape,
                                    tuple(kernel), tuple(strides), tuple(dilations), group)))
    if transposed:
        dW = xp.ascontiguousarray(xp.swapaxes(dW, -1, -2))        # (g, M/g, C/g·K)
    return dW.reshape((M, Xp.shape[1] // group) + tuple(kernel))


def conv_input_grad(xp, dY, W, full, strides, dilations, group):
    """The gradient of Conv's padded input ``(N, C, *full)`` given ``dY``."""
    N, M = dY.shape[:2]
    out = tuple(dY.shape[2:])
    kernel = tuple(W.shape[2:])
    C = W.shape[1] * group
    Wt = xp.swapaxes(W.reshape(group, M // group, -1), -1, -2)     # (g, C/g·K, M/g)
    if _batch_major(math.prod(out), M // group, kernel):
        d = dY.reshape(N, group, M // group, -1)                   # (N, g, M/g, P)
        img = xp.zeros((N, C) + tuple(full), dtype=dY.dtype)

        def chunk(part):
            cols = xp.matmul(Wt, d[part])                          # (n, g, C/g·K, P)
            cols = cols.reshape((cols.shape[0], C) + kernel + out)
            col2im(xp, cols, full, strides, dilations, img[part])

        each(xp, _chunks(xp, N, Wt.shape[1] * group * math.prod(out)), chunk,
             ("conv input grad", dY.shape, W.shape, tuple(full), tuple(strides), tuple(dilations),
              group))
        return img

    def inner(d, product):                                         # (C, *full, n)
        n = d.shape[0]
        cols = product(Wt, _rows_inner(xp, d, group))              # (g, C/g·K, P·n)
        cols = cols.reshape((C,) + kernel + out + (n,))
        img = xp.zeros((C,) + tuple(full) + (n,), dtype=dY.dtype)
        fused = len(kernel) == 2 and compiled.available(xp, cols, img) and cols.dtype == img.dtype

        def scatter(part):
            if fused:
                _col2im_inner_kernel(cols, img, *strides, *dilations, *part.indices(C)[:2])
            else:
                col2im(xp, cols[part], full, strides, dilations, img[part], lead=1)

        each(xp, _channel_parts(xp, C, img.size), scatter, ("col2im", cols.shape, img.shape))
        return img

    parts = _batch_parts(xp, N, N * M * Wt.shape[1] * math.prod(out))
    if parts is None:
        return _batch_first(xp, inner(dY, functools.partial(matmul, xp)))
    return _by_batch_parts(xp, parts, lambda items: inner(dY[items], xp.matmul),
                           (N, C) + tuple(full), dY.dtype,
                           ("conv input grad", dY.shape, W.shape, tuple(full), tuple(strides),
                            tuple(dilations), group))


@compiled.kernel
def _im2col_inner_kernel(X, cols, sh, sw, dh, dw):
    """Batch-inner columns ``(C, KH, KW, OH, OW, N)`` of an input ``(N, C, H, W)``: each
    channel's planes moved to ``(H, W, N)`` in a buffer that stays in cache, then read
    there once per kernel offset."""
    N, C, H, W = X.shape
    KH, KW, OH, OW = cols.shape[1:5]
    plane = np.empty((H, W, N), dtype=X.dtype)
    for c in range(C):
        for n in range(N):
            for y in range(H):
                for x in range(W):
                    plane[y, x, n] = X[n, c, y, x]
        for ky in range(KH):
            for kx in range(KW):
                for oy in range(OH):
                    y = oy * sh + ky * dh
                    for ox in range(OW):
                        src = plane[y, ox * sw + kx * dw]
                        dst = cols[c, ky, kx, oy, ox]
                        for n in range(N):
                            dst[n] = src[n]


@compiled.kernel
def _col2im_inner_kernel(cols, img, sh, sw, dh, dw, start, stop):
    """:func:`col2im` of batch-inner columns ``(C, KH, KW, OH, OW, N)`` onto zeros
    ``(C, H, W, N)`` for the channels in ``[start, stop)``: kernel offsets in the same
    order as the NumPy form, so every sum runs in the same order (the same bits), in one
    pass per channel whose image stays in cache."""
    KH, KW, OH, OW, N = cols.shape[1:]
    for c in range(start, stop):
        for ky in range(KH):
            for kx in range(KW):
                for oy in range(OH):
                    for ox in range(OW):
                        src = cols[c, ky, kx, oy, ox]
                        dst = img[c, oy * sh + ky * dh, ox * sw + kx * dw]
                        for n in range(N):
                            dst[n] += src[n]


def _bias_shape(B, ndim):
    return (1, -1) + (1,) * (ndim - 2)


# -- Conv ----------------------------------------------------------------------------------


def _shape(shape):
    """A shape (a tuple, or a host array of ints, as shape inputs arrive) as a tuple of
    ints."""
    return tuple(shape.tolist()) if hasattr(shape, "tolist") else tuple(int(d) for d in shape)


def _key(values):
    """A list-of-ints attribute as part of a remembered geometry's key: a tuple (None
    as None)."""
    return None if values is None else tuple(values)


def _conv_geometry(x_shape, w_shape, auto_pad, dilations, pads, strides):
    """Spatial input, kernel, strides, dilations, begin and end pads and output size of
    a convolution, each a tuple of ints (made once per shapes and attributes and
    remembered: a training step asks for each layer's three times)."""
    return _geometry(_shape(x_shape[2:]), _shape(w_shape[2:]), auto_pad, _key(dilations),
                     _key(pads), _key(strides))


@functools.lru_cache(maxsize=1024)
def _geometry(sp, kernel, auto_pad, dilations, pads, strides):
    n = len(sp)
    strides = tuple(_ints(strides, n, 1))
    dilations = tuple(_ints(dilations, n, 1))
    begin, end = conv_pads(auto_pad, pads, sp, kernel, strides, dilations)
    begin, end = tuple(begin), tuple(end)
    out = tuple(out_size(sp[i], begin[i], end[i], kernel[i], strides[i], dilations[i])
                for i in range(n))
    if any(o <= 0 for o in out):
        raise ValueError(f"Conv output would be empty: input {sp}, kernel {kernel}, "
                         f"pads {list(begin + end)}, strides {list(strides)}, "
                         f"dilations {list(dilations)}")
    return sp, kernel, strides, dilations, begin, end, out


def _on_cudnn(xp, kind, a, b, shape, dtype, begin, end, strides, dilations):
    """The result (of ``shape``) of a convolution's forward pass or gradient (``kind``:
    forward, input_grad or weight_grad) run by cuDNN on the CUDA backend; None where
    cuDNN does not run it (no cuDNN, or it declined the layer): nothing is allocated
    then."""
    engine = getattr(xp, "cudnn_convolutions", None)
    if engine is None:
        return None
    plan = engine.plan(kind, a.shape, b.shape, shape, dtype, begin, end, strides, dilations)
    if plan is None:
        return None
    result = xp.empty(shape, dtype=dtype)
    engine.execute(plan, xp.ascontiguousarray(a), xp.ascontiguousarray(b), result)
    return result


@op("Conv", since=1, differentiable=("X", "W", "B"))
def Conv(xp, X, W, B=None, *, auto_pad="NOTSET", dilations=None, group=1, kernel_shape=None,
         pads=None, strides=None):
    if X.shape[1] != W.shape[1] * group or W.shape[0] % group:
        raise ValueError(f"Conv: input channels {X.shape[1]} and weight {tuple(W.shape)} "
                         f"do not fit group={group}")
    sp, kernel, strides, dilations, begin, end, out = _conv_geometry(
        X.shape, W.shape, auto_pad, dilations, pads, strides)
    Y = _on_cudnn(xp, "forward", X, W, (X.shape[0], W.shape[0]) + out, X.dtype, begin, end,
                  strides, dilations)
    if Y is None and depthwise.applies(W.shape, group, begin, end, xp, X.dtype):
        return (depthwise.conv(xp, X, W, group, strides, dilations, begin, end, out, B),)
    if Y is None:
        return (conv_forward(xp, pad_spatial(xp, X, begin, end), W, strides, dilations, group, out,
                             B),)
    if B is not None:
        Y += B.reshape(_bias_shape(B, Y.ndim))
    return (Y,)


def _attrs(node, *names):
    return {k: node.attrs[k] for k in names if node.attrs.get(k) is not None}


_CONV_ATTRS = ("auto_pad", "dilations", "group", "pads", "strides")


def _conv_rule(grad_x, grad_w, attr_names):
    """The gradient rule of a convolution-like op: one private op per input."""

    def rule(g, node, dY):
        X, W = node.inputs[:2]
        attrs = _attrs(node, *attr_names)
        grads = [g.private(grad_x, dY, W, g.shape_of(X), **attrs),
                 g.private(grad_w, dY, X, g.shape_of(W), **attrs)]
        if len(node.inputs) > 2 and node.inputs[2]:
            grads.append(g.private("BiasGrad", dY))
        return tuple(grads) + (None,) * (len(node.inputs) - len(grads))

    return rule


Conv.gradient(_conv_rule("ConvGradX", "ConvGradW", _CONV_ATTRS))


#: Input channels per group from which a stride-1 input gradient is computed as
#: a convolution with the flipped kernel (:func:`flipped_input_grad`); with
#: fewer, that convolution's product has too few rows to run at BLAS speed and
#: the scatter of :func:`conv_input_grad` is cheaper.
FLIPPED_MIN_CHANNELS = 32


def flipped_input_grad(xp, dY, W, sp, begin, end, dilations, group):
    """The input gradient ``(N, C, *sp)`` of a stride-1 Conv, as a Conv of ``dY``
    (padded by the kernel's extent less the forward pads) with ``W`` flipped in
    space and with its channel axes swapped within each group: one im2col copy
    in place of the column scatter of :func:`conv_input_grad`.  Where that Conv runs
    as Winograd, its weight transform reads ``W`` as it lies (no flipped copy)."""
    nd = len(sp)
    kernel = tuple(W.shape[2:])
    M, cg = W.shape[:2]
    reach = [(kernel[i] - 1) * dilations[i] for i in range(nd)]
    dYp = pad_spatial(xp, dY, [reach[i] - begin[i] for i in range(nd)],
                      [reach[i] - end[i] for i in range(nd)])
    if winograd.applies(dYp, (cg * group, M // group) + kernel, [1] * nd, dilations, group, sp):
        return winograd.conv3x3(xp, dYp, W, sp, adjoint=True)
    Wf = xp.swapaxes(W.reshape((group, M // group, cg) + kernel), 1, 2)
    Wf = Wf[(slice(None),) * 3 + (slice(None, None, -1),) * nd]
    Wf = xp.ascontiguousarray(Wf).reshape((cg * group, M // group) + kernel)
    return conv_forward(xp, dYp, Wf, [1] * nd, dilations, group, sp)


@op("ConvGradX", domain="onnxgrad", host_inputs=("x_shape",))
def ConvGradX(xp, dY, W, x_shape, *, auto_pad="NOTSET", dilations=None, group=1, pads=None,
              strides=None):
    x_shape = _shape(x_shape)
    sp, kernel, strides, dilations, begin, end, out = _conv_geometry(
        x_shape, W.shape, auto_pad, dilations, pads, strides)
    dX = _on_cudnn(xp, "input_grad", dY, W, x_shape, dY.dtype, begin, end, strides, dilations)
    if dX is not None:
        return (dX,)
    if depthwise.applies(W.shape, group, begin, end, xp, dY.dtype):
        return (depthwise.input_grad(xp, dY, W, group, sp, strides, dilations, begin, end),)
    if all(s == 1 for s in strides) and W.shape[1] >= FLIPPED_MIN_CHANNELS:
        return (flipped_input_grad(xp, dY, W, sp, begin, end, dilations, group),)
    full = tuple(sp[i] + begin[i] + end[i] for i in range(len(sp)))
    dXp = conv_input_grad(xp, dY, W, full, strides, dilations, group)
    return (xp.ascontiguousarray(pad_spatial(xp, dXp, [-b for b in begin], [-e for e in end])),)


@op("ConvGradW", domain="onnxgrad", host_inputs=("w_shape",))
def ConvGradW(xp, dY, X, w_shape, *, auto_pad="NOTSET", dilations=None, group=1, pads=None,
              strides=None):
    w_shape = _shape(w_shape)
    sp, kernel, strides, dilations, begin, end, out = _conv_geometry(
        X.shape, w_shape, auto_pad, dilations, pads, strides)
    dW = _on_cudnn(xp, "weight_grad", X, dY, w_shape, X.dtype, begin, end, strides, dilations)
    if dW is not None:
        return (dW,)
    if depthwise.applies(w_shape, group, begin, end, xp, X.dtype):
        return (depthwise.weight_grad(xp, dY, X, group, kernel, strides, dilations, begin, end),)
    Xp = pad_spatial(xp, X, begin, end)
    return (conv_weight_grad(xp, dY, Xp, kernel, strides, dilations, group),)


@op("BiasGrad", domain="onnxgrad")
def BiasGrad(xp, dY):
    """The gradient of a per-channel bias: ``dY`` summed over every axis but 1."""
    if dY.ndim >= 2 and dY.size and compiled.available(xp, dY):
        rows = xp.ascontiguousarray(dY).reshape(dY.shape[0], dY.shape[1], -1)
        dB = xp.empty(dY.shape[1], dtype=dY.dtype)
        compiled.by_parts(dY.shape[1], dY.size,
                          lambda start, stop: _bias_grad_kernel(rows, dB, start, stop))
        return (dB,)
    axes = (0,) + tuple(range(2, dY.ndim))
    if dY.dtype.itemsize < 4:  # float16, bfloat16: summed in float32, as PyTorch does
        return (xp.asarray(dY.sum(axis=axes, dtype="float32").astype(dY.dtype)),)
    return (xp.asarray(dY.sum(axis=axes, dtype=dY.dtype)),)


@compiled.kernel(reassociate=True)
def _bias_grad_kernel(rows, dB, start, stop):
    """:func:`BiasGrad` of ``rows`` ``(N, C, P)`` for the channels in ``[start, stop)``:
    each item's row summed in vector lanes, the rows' sums added in float64, in
    item order."""
    N, C, P = rows.shape
    for c in range(start, stop):
        total = 0.0
        for n in range(N):
            row = rows[n, c]
            s = row.dtype.type(0)
            for i in range(P):
                s += row[i]
            total += s
        dB[c] = total


@BiasGrad.in_standard_ops
def _(g, node):
    dY = node.inputs[0]
    return (g.ReduceSum(dY, std.axes_from(g, dY, 2, skip_channel=True), keepdims=0),)


def _static_geometry(g, node, x_shape, w_shape):
    """Conv geometry for static spatial sizes of X and a static weight shape, or None."""
    if x_shape is None or w_shape is None or not all(isinstance(d, int) for d in x_shape[2:]):
        return None
    a = node.attrs
    return _conv_geometry(x_shape, w_shape, a.get("auto_pad", "NOTSET"), a.get("dilations"),
                          a.get("pads"), a.get("strides"))


@ConvGradX.in_standard_ops
def _(g, node):
    # The input gradient of a Conv is a ConvTranspose of dY with the same weight, its
    # output padded to X's spatial size.
    dY, W, x_shape = node.inputs
    geometry = _static_geometry(g, node, std.shape_value(g, x_shape), std.tensor_shape(g, W))
    if geometry is None:
        return None
    sp, kernel, strides, dilations, begin, end, out = geometry
    extra = [sp[i] - ((out[i] - 1) * strides[i] - begin[i] - end[i] + dilations[i] * (kernel[i] - 1)
                      + 1) for i in range(len(sp))]
    return (g.ConvTranspose(dY, W, strides=list(strides), dilations=list(dilations),
                            pads=list(begin) + list(end), group=node.attrs.get("group", 1),
                            output_padding=extra),)


def _standard_weight_grad(g, X, dY, kernel, strides, dilations, pads, channels):
    """dW of a Conv from ``X`` to ``dY``'s channels in standard ops: dW[m, c] =
    Σ_n dY[n, m] ⋆ X[n, c], a Conv of X with channels and batch swapped and dY as its
    kernel, strides and dilations exchanged, cropped to the kernel size; with groups,
    each group's channels give that group's rows (``channels``: the channel ranges of X
    and of dY, one per group; see :func:`_groups`)."""
    X_channels, dY_channels = channels
    count = len(X_channels)
    nd = len(kernel)
    swap = [1, 0] + list(range(2, 2 + nd))
    parts = []
    for (x0, x1), (d0, d1) in zip(X_channels, dY_channels):
        x, d = X, dY
        if count > 1:
            x = g.Slice(X, g.ints([x0]), g.ints([x1]), g.ints([1]))
            d = g.Slice(dY, g.ints([d0]), g.ints([d1]), g.ints([1]))
        grad = g.Conv(g.Transpose(x, perm=swap), g.Transpose(d, perm=swap),
                      strides=list(dilations), dilations=list(strides), pads=list(pads))
        grad = g.Slice(grad, g.ints([0] * nd), g.ints(kernel), g.ints(range(2, 2 + nd)))
        parts.append(g.Transpose(grad, perm=swap))
    return parts[0] if count == 1 else g.Concat(*parts, axis=0)


def _groups(count: int, per_a: int, per_b: int) -> tuple[list, list]:
    """The channel ranges of ``count`` groups of ``per_a`` and of ``per_b`` channels."""
    return ([(i * per_a, (i + 1) * per_a) for i in range(count)],
            [(i * per_b, (i + 1) * per_b) for i in range(count)])


@ConvGradW.in_standard_ops
def _(g, node):
    dY, X, w_shape = node.inputs
    w_static = std.shape_value(g, w_shape)
    geometry = _static_geometry(g, node, std.tensor_shape(g, X), w_static)
    if geometry is None:
        return None
    sp, kernel, strides, dilations, begin, end, out = geometry
    group = node.attrs.get("group", 1)
    return (_standard_weight_grad(g, X, dY, kernel, strides, dilations, list(begin) + list(end),
                                  _groups(group, w_static[1], w_static[0] // group)),)


# -- ConvTranspose -------------------------------------------------------------------------


def _convt_geometry(x_shape, w_shape, auto_pad, dilations, output_padding, output_shape, pads,
                    strides):
    """Spatial input, kernel, strides, dilations, the full (uncropped) output size, the
    begin offset of the output within it, and the output size."""
    sp = tuple(int(d) for d in x_shape[2:])
    n = len(sp)
    kernel = tuple(int(d) for d in w_shape[2:])
    strides = _ints(strides, n, 1)
    dilations = _ints(dilations, n, 1)
    opad = _ints(output_padding, n, 0)[:n]
    full = [strides[i] * (sp[i] - 1) + (kernel[i] - 1) * dilations[i] + 1 for i in range(n)]
    if output_shape:
        out = [int(v) for v in output_shape][-n:]
    elif auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        out = [sp[i] * strides[i] for i in range(n)]
    else:
        out = None
    if out is not None and (auto_pad in ("SAME_UPPER", "SAME_LOWER") or not pads):
        # The spec: total = full + output_padding - out, split as auto_pad says
        # (the begin pad takes the smaller half for SAME_UPPER, the larger otherwise).
        begin = []
        for i in range(n):
            total = full[i] + opad[i] - out[i]
            begin.append(total // 2 if auto_pad == "SAME_UPPER" else total - total // 2)
    else:
        if auto_pad == "VALID" or not pads:
            p = [0] * (2 * n)
        else:
            p = [int(v) for v in pads]
        begin = p[:n]
        if out is None:
            out = [full[i] + opad[i] - p[i] - p[n + i] for i in range(n)]
    if any(o <= 0 for o in out):
        raise ValueError(f"ConvTranspose output would be empty: {out}")
    return sp, kernel, strides, dilations, full, begin, out


_CONVT_ATTRS = ("auto_pad", "dilations", "group", "output_padding", "output_shape", "pads",
                "strides")


@op("ConvTranspose", since=1, differentiable=("X", "W", "B"))
def ConvTranspose(xp, X, W, B=None, *, auto_pad="NOTSET", dilations=None, group=1,
                  kernel_shape=None, output_padding=None, output_shape=None, pads=None,
                  strides=None):
    if X.shape[1] != W.shape[0] or W.shape[0] % group:
        raise ValueError(f"ConvTranspose: input channels {X.shape[1]} and weight "
                         f"{tuple(W.shape)} do not fit group={group}")
    sp, kernel, strides, dilations, full, begin, out = _convt_geometry(
        X.shape, W.shape, auto_pad, dilations, output_padding, output_shape, pads, strides)
    # The forward pass of ConvTranspose is the input gradient of a Conv from M to C
    # channels whose weight is W: scatter X through W onto the full output.
    img = conv_input_grad(xp, X, W, full, strides, dilations, group)   # (N, M, *full)
    end = [out[i] - full[i] + begin[i] for i in range(len(sp))]
    Y = xp.ascontiguousarray(pad_spatial(xp, img, [-b for b in begin], end))
    if B is not None:
        Y += B.reshape(_bias_shape(B, Y.ndim))
    return (Y,)


ConvTranspose.gradient(_conv_rule("ConvTransposeGradX", "ConvTransposeGradW", _CONVT_ATTRS))


def _full_grad(xp, dY, full, begin, out):
    """dY placed back on ConvTranspose's full output (the adjoint of its crop)."""
    return pad_spatial(xp, dY, begin, [full[i] - begin[i] - out[i] for i in range(len(full))])


@op("ConvTransposeGradX", domain="onnxgrad", host_inputs=("x_shape",))
def ConvTransposeGradX(xp, dY, W, x_shape, *, auto_pad="NOTSET", dilations=None, group=1,
                       output_padding=None, output_shape=None, pads=None, strides=None):
    sp, kernel, strides, dilations, full, begin, out = _convt_geometry(
        x_shape, W.shape, auto_pad, dilations, output_padding, output_shape, pads, strides)
    dfull = _full_grad(xp, dY, full, begin, out)
    return (conv_forward(xp, dfull, W, strides, dilations, group, sp),)


def _convt_static(g, node, x_shape, w_shape):
    """ConvTranspose geometry for static shapes, or None; with dY's zero padding back to
    the full output, which must not be negative here."""
    if x_shape is None or w_shape is None or not all(isinstance(d, int) for d in x_shape[2:]):
        return None
    a = node.attrs
    sp, kernel, strides, dilations, full, begin, out = _convt_geometry(
        x_shape, w_shape, a.get("auto_pad", "NOTSET"), a.get("dilations"),
        a.get("output_padding"), a.get("output_shape"), a.get("pads"), a.get("strides"))
    after = [full[i] - begin[i] - out[i] for i in range(len(sp))]
    return sp, kernel, strides, dilations, list(begin), after


def _on_full(g, dY, begin, after):
    """dY as the full ConvTranspose output sees it: the part inside the full output, and
    the zero padding (begin, after) that places it there."""
    n = len(begin)
    if any(v < 0 for v in begin + after):  # an output larger than the full one: crop dY
        starts = [max(0, -b) for b in begin]
        ends = [-max(0, -a) or std.END for a in after]
        dY = g.Slice(dY, g.ints(starts), g.ints(ends), g.ints(range(2, 2 + n)))
    return dY, [max(0, b) for b in begin], [max(0, a) for a in after]


@ConvTransposeGradX.in_standard_ops
def _(g, node):
    # dY back on the full output (zeros around it), then the Conv with the same weight.
    dY, W, x_shape = node.inputs
    geometry = _convt_static(g, node, std.shape_value(g, x_shape), std.tensor_shape(g, W))
    if geometry is None:
        return None
    sp, kernel, strides, dilations, begin, after = geometry
    dY, begin, after = _on_full(g, dY, begin, after)
    return (g.Conv(dY, W, strides=list(strides), dilations=list(dilations), pads=begin + after,
                   group=node.attrs.get("group", 1)),)



@op("ConvTransposeGradW", domain="onnxgrad", host_inputs=("w_shape",))
def ConvTransposeGradW(xp, dY, X, w_shape, *, auto_pad="NOTSET", dilations=None, group=1,
                       output_padding=None, output_shape=None, pads=None, strides=None):
    sp, kernel, strides, dilations, full, begin, out = _convt_geometry(
        X.shape, w_shape, auto_pad, dilations, output_padding, output_shape, pads, strides)
    dfull = _full_grad(xp, dY, full, begin, out)
    # W (C, M/g, *k) plays the weight of a Conv from dfull (M channels) to X (C channels).
    return (conv_weight_grad(xp, X, dfull, kernel, strides, dilations, group),)


@ConvTransposeGradW.in_standard_ops
def _(g, node):
    # W (C, M/g, *k) is the weight of a Conv from dfull (M channels) to X (C channels):
    # dW[c, m] = Σ_n dfull[n, m] ⋆ X[n, c].
    dY, X, w_shape = node.inputs
    w_static = std.shape_value(g, w_shape)
    geometry = _convt_static(g, node, std.tensor_shape(g, X), w_static)
    if geometry is None:
        return None
    sp, kernel, strides, dilations, begin, after = geometry
    dY, begin, after = _on_full(g, dY, begin, after)
    dfull = g.Pad(dY, g.ints([0, 0] + begin + [0, 0] + after))
    group = node.attrs.get("group", 1)
    return (_standard_weight_grad(g, dfull, X, kernel, strides, dilations, [0] * 2 * len(sp),
                                  _groups(group, w_static[1], w_static[0] // group)),)


# -- Col2Im ---------------------------------------------------------------------------------

@op("Col2Im", since=18, differentiable=("input",), host_inputs=("image_shape", "block_shape"))
def Col2Im(xp, input, image_shape, block_shape, *, dilations=None, pads=None, strides=None):
    image, block, dil, pad, stride, counts = _col2im_geometry(image_shape, block_shape,
                                                              dilations, pads, strides)
    nd = len(image)
    n, ck, length = input.shape
    k = math.prod(block)
    if ck % k:
        raise ModelError(f"Col2Im: input dimension 1 ({ck}) is not divisible by the block "
                         f"size {k}")
    if math.prod(counts) != length:
        raise ModelError(f"Col2Im: {length} columns do not fit {counts} blocks")
    cols = input.reshape([n, ck // k] + block + counts)
    padded = [image[i] + pad[i] + pad[i + nd] for i in range(nd)]
    out = xp.zeros([n, ck // k] + padded, dtype=input.dtype)
    for offset, window in _col2im_windows(block, counts, dil, stride):
        out[window] += cols[(slice(None), slice(None)) + offset]
    crop = [slice(None), slice(None)] + [slice(pad[i], pad[i] + image[i]) for i in range(nd)]
    return (out[tuple(crop)],)


def _col2im_geometry(image_shape, block_shape, dilations, pads, strides):
    """Image and block sizes, dilations, pads, strides (defaults filled in) and the
    number of blocks along each spatial axis."""
    image = [int(v) for v in image_shape]
    block = [int(v) for v in block_shape]
    nd = len(image)
    dil = [int(v) for v in dilations] if dilations else [1] * nd
    pad = [int(v) for v in pads] if pads else [0] * (2 * nd)
    stride = [int(v) for v in strides] if strides else [1] * nd
    counts = [(image[i] + pad[i] + pad[i + nd] - dil[i] * (block[i] - 1) - 1) // stride[i] + 1
              for i in range(nd)]
    return image, block, dil, pad, stride, counts


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


@op("Col2ImGrad", domain="onnxgrad", host_inputs=("image_shape", "block_shape"))
def Col2ImGrad(xp, dY, image_shape, block_shape, *, dilations=None, pads=None, strides=None):
    """Im2Col of ``dY``: the adjoint of Col2Im gathers each block's columns back."""
    image, block, dil, pad, stride, counts = _col2im_geometry(image_shape, block_shape,
                                                              dilations, pads, strides)
    nd = len(image)
    n, c = dY.shape[:2]
    padded = xp.pad(dY, [(0, 0), (0, 0)] + [(pad[i], pad[i + nd]) for i in range(nd)])
    cols = xp.empty([n, c] + block + counts, dtype=dY.dtype)
    for offset, window in _col2im_windows(block, counts, dil, stride):
        cols[(slice(None), slice(None)) + offset] = padded[window]
    return (cols.reshape(n, c * math.prod(block), math.prod(counts)),)


@Col2ImGrad.in_standard_ops
def _(g, node):
    """Im2Col in standard ops: one strided Slice of the padded ``dY`` per block offset,
    the offsets stacked in order.  Needs ``image_shape`` and ``block_shape`` static."""
    dY, image_shape, block_shape = node.inputs
    image, block = std.shape_value(g, image_shape), std.shape_value(g, block_shape)
    if image is None or block is None or not all(isinstance(v, int) for v in image + block):
        return None
    image, block, dil, pad, stride, counts = _col2im_geometry(
        image, block, node.attrs.get("dilations"), node.attrs.get("pads"),
        node.attrs.get("strides"))
    nd = len(image)
    spatial = g.ints(range(2, 2 + nd))
    padded = g.Pad(dY, g.ints(pad), None, spatial, mode="constant") if any(pad) else dY
    length = math.prod(counts)
    columns = []
    for offset, _ in _col2im_windows(block, counts, dil, stride):
        starts = [offset[i] * dil[i] for i in range(nd)]
        ends = [starts[i] + (counts[i] - 1) * stride[i] + 1 for i in range(nd)]
        window = g.Slice(padded, g.ints(starts), g.ints(ends), spatial, g.ints(stride))
        columns.append(g.Reshape(window, g.ints([0, 0, 1, length])))   # (n, c, 1, L)
    stacked = columns[0] if len(columns) == 1 else g.Concat(*columns, axis=2)
    return (g.Reshape(stacked, g.ints([0, -1, length])),)


def _product(dims):
    if not dims:
        yield ()
        return
    for i in range(dims[0]):
        for rest in _product(dims[1:]):
            yield (i,) + rest
