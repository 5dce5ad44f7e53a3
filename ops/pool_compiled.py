"""2-D pooling's compiled kernels: MaxPool (with and without Indices), AveragePool,
AveragePoolGrad and MaxPoolIndicesGrad over two spatial axes, for the ops of
``ops/pool.py``.

Where compiled kernels are available (``ops/compiled.py``), 2-D pooling of float32 and
float64 tensors (any kernel, strides and dilations, non-negative pads, ceil_mode) runs
as loops over the (N·C) planes that read each array once, take each window's values
in the kernel order of the NumPy forms (``ops/pool.py``) and do their arithmetic, so
that the results are the same bits:

* MaxPool keeps ``best`` where ``v < best`` or ``best`` is NaN, else takes ``v``
  (``xp.maximum``: NaN propagates, the first NaN stays, a tie takes ``v``), and moves
  the index where ``v > best``.  A padding position holds -inf, which changes neither
  unless it is the window's first, where both start: -inf, and the index of the
  window's first position.
* AveragePool adds a window's values (padding as zeros) in kernel order to -0.0 (the
  identity of addition: the sum starts as the first value) and divides the sum by the
  divisor in the input's type.  The caller passes the divisor in as ``_divisor`` of
  ``ops/pool.py`` gives it: an int, or a host array of the output's spatial shape.
* AveragePoolGrad divides dY by the divisor, and assigns each share to its window's
  elements where windows do not overlap; else it adds, kernel offset after kernel
  offset, the shares to zeros, as ``_scatter`` of ``ops/pool.py`` does.
* MaxPoolIndicesGrad assigns dY at the indices where windows do not overlap; else it
  adds dY in float64 in the order of its elements and rounds the sums to dY's type, as
  ``bincount`` does.  Indices outside their own (n, c) plane leave it to the NumPy form.

Each op's kernels take the windows that lie in the input in one of three loops: at
column stride 1, tap after tap along rows of outputs (vector loops); else one loop
over the windows' positions (scalar: rows of pooled planes are a few positions
long), 2×2 windows unrolled.  Windows that reach into the padding run in a kernel of
their own, over their taps in the input only.  Outside the rows kernel, MaxPool
carries the offset of its maximum as a float32 (see :data:`MAX_OFFSET`), which the
compiler keeps in vector registers (as an integer it becomes a branch per tap).
Indices computed from offsets go through :func:`_at`.  The kernels take a range of
planes, which :func:`onnxgrad.ops.compiled.by_parts` splits over the thread pool; each
part writes its own planes, so results do not depend on the number of threads.

A window geometry ``geo`` is the tuple that ``_geometry`` of ``ops/pool.py`` gives.
:func:`runs` and :func:`runs_max_pool` say whether an op of that geometry runs here;
:func:`max_pool`, :func:`average_pool`, :func:`average_pool_grad` and
:func:`indices_grad` compute its outputs.
"""

from __future__ import annotations

import functools
import math

import numpy as np  # host-side window tables and the compiled kernels

from onnxgrad.ops import compiled


#: The flat offset in a plane of a window's last tap from its first, up to which MaxPool
#: runs its compiled kernels: they carry the offset of the maximum as a float32, exact
#: up to 2^24.
MAX_OFFSET = 1 << 24

#: Taps of a window up to which MaxPool with Indices runs its compiled kernels at column
#: strides above 1 (measured at batch 16, 64 channels, 1 thread: 3×3 windows 1.7×
#: faster, 3×4 and 5×5 at stride 3 as fast, 4×4 and 5×5 windows at stride 2 up to 1.1×
#: slower than the NumPy form; without Indices all of them 1.2-2.5× faster).
INDEXED_MAX_TAPS = 9


def runs(xp, geo, *arrays) -> bool:
    """Whether pooling of geometry ``geo`` runs its compiled kernels: two spatial axes,
    no negative pads, non-empty float32 or float64 ``arrays``, compiled kernels available."""
    sp, kernel, strides, dilations, begin, end, need, out = geo
    return (len(sp) == 2 and min(begin) >= 0 and min(end) >= 0 and min(need) >= 0
            and all(a.size for a in arrays) and compiled.available(xp, *arrays))


def runs_max_pool(xp, geo, X, indices) -> bool:
    """Whether MaxPool of ``X`` (with Indices where ``indices``) runs its compiled kernels
    (:func:`runs`, :data:`MAX_OFFSET`, :data:`INDEXED_MAX_TAPS`)."""
    if not runs(xp, geo, X):
        return False
    sp, kernel, strides, dilations = geo[:4]
    last = (kernel[0] - 1) * dilations[0] * sp[1] + (kernel[1] - 1) * dilations[1]
    return last <= MAX_OFFSET and (not indices or strides[1] == 1
                                   or math.prod(kernel) <= INDEXED_MAX_TAPS)


def _in_input(positions, size):
    """Per row of ``positions`` (ascending along rows), the range ``[lo, hi)`` of its
    columns whose position lies in ``[0, size)``, as int64 ``(rows, 2)``."""
    inside = (positions >= 0) & (positions < size)
    lo = np.where(inside.any(axis=1), inside.argmax(axis=1), 0)
    return np.stack([lo, lo + inside.sum(axis=1)], axis=1).astype(np.int64)


@functools.lru_cache(maxsize=256)
def _layout(sp, kernel, strides, dilations, begin, out):
    """The tables of the 2-D kernels for one window geometry: the window geometry as
    they take it; the flat offset in a plane of each tap from the window's first, in
    kernel order; per output row and column, the range of taps in the input; per tap
    row and column, the range of outputs whose tap lies in the input; and the outputs
    ``(oy0, oy1, ox0, ox1)`` whose windows lie in the input."""
    window = tuple(sp) + tuple(kernel) + tuple(strides) + tuple(dilations) + tuple(begin)
    offsets = np.array([ky * dilations[0] * sp[1] + kx * dilations[1]
                        for ky in range(kernel[0]) for kx in range(kernel[1])],
                       dtype=np.int64)
    taps, outputs, whole = [], [], []
    for i in range(2):
        positions = (np.arange(out[i])[:, None] * strides[i] - begin[i]
                     + np.arange(kernel[i])[None, :] * dilations[i])
        taps.append(_in_input(positions, sp[i]))
        outputs.append(_in_input(positions.T, sp[i]))
        full = np.flatnonzero((taps[i][:, 0] == 0) & (taps[i][:, 1] == kernel[i]))
        whole += [int(full[0]), int(full[-1]) + 1] if full.size else [0, 0]
    return window, offsets, taps[0], taps[1], outputs[0], outputs[1], tuple(whole)


def _geometry_key(geo):
    sp, kernel, strides, dilations, begin, end, need, out = geo
    return tuple(sp), tuple(kernel), tuple(strides), tuple(dilations), tuple(begin), tuple(out)


def _windows_2d(geo, planes, size, kernels, args, key):
    """A pooling op's kernels ``(pair, rows, general, edges)`` over ranges of ``planes``
    (``size`` elements in all) on the thread pool: over the outputs whose windows lie in
    the input, ``rows(*args, offsets, …)`` where the column stride is 1 and ``rows``
    is given, else ``pair(*args, …)`` for 2×2 windows, else ``general(*args, offsets,
    …)``; then ``edges(*args, offsets, …)`` over the others where there are any."""
    pair, rows_kernel, general, edges = kernels
    window, offsets, rows, cols, _, _, whole = _layout(*_geometry_key(geo))
    out = geo[-1]
    inner = (rows_kernel if rows_kernel is not None and geo[2][1] == 1
             else pair if geo[1] == (2, 2) else general)
    some_edges = whole != (0, out[0], 0, out[1])

    def work(start, stop):
        if inner is pair:
            pair(*args, *window, *whole, start, stop)
        else:
            inner(*args, offsets, *window, *whole, start, stop)
        if some_edges:
            edges(*args, offsets, rows, cols, *window, *whole, start, stop)

    compiled.by_parts(planes, size, work, key=(inner.__name__,) + key)


@compiled.helper
def _at(i):
    """``i`` (not negative) as an unsigned index: numba then leaves out the wrap-around
    of negative indices, and loops over such indices vectorise (AveragePoolGrad of
    overlapping windows measured 3× faster)."""
    return np.uint64(i)


@compiled.helper
def _next(oy, ox, place, ox0, ox1, step):
    """The position after ``(oy, ox)`` in the rectangle of columns ``[ox0, ox1)``, and the
    flat ``place`` of its row's first window, which moves by ``step`` a row."""
    ox += 1
    wrap = ox == ox1
    return (oy + 1 if wrap else oy), (ox0 if wrap else ox), (place + step if wrap else place)


@compiled.helper
def _max_step(v, at_v, best, at):
    """``best`` and ``at`` (the offset of the first maximum, a float) after the value
    ``v`` at offset ``at_v``."""
    return (best if (v < best) | (best != best) else v), (at_v if v > best else at)


@compiled.kernel
def _max_pool_pair_kernel(X, Y, I, lowest, H, W, kh, kw, sh, sw, dh, dw, bh, bw,
                          oy0, oy1, ox0, ox1, start, stop):
    """MaxPool of 2×2 windows in the planes ``[start, stop)`` of ``X`` (planes, H·W): the
    outputs ``[oy0, oy1) × [ox0, ox1)`` of ``Y`` (planes, OH, OW), whose windows lie in
    the input, and where ``I`` is not empty, their flat indices in X."""
    S = X.shape[1]
    indices = I.shape[0] > 0
    for p in range(start, stop):
        oy, ox, place = oy0, ox0, (oy0 * sh - bh) * W - bw
        for _ in range((oy1 - oy0) * (ox1 - ox0)):
            a = place + ox * sw
            best, at = lowest, np.float32(0)
            for ky in range(2):
                for kx in range(2):
                    o = ky * dh * W + kx * dw
                    best, at = _max_step(X[p, _at(a + o)], np.float32(o), best, at)
            Y[p, _at(oy), _at(ox)] = best
            if indices:
                I[p, _at(oy), _at(ox)] = p * S + a + int(at)
            oy, ox, place = _next(oy, ox, place, ox0, ox1, sh * W)


@compiled.kernel
def _max_pool_kernel(X, Y, I, lowest, offsets, H, W, kh, kw, sh, sw, dh, dw, bh, bw,
                     oy0, oy1, ox0, ox1, start, stop):
    """:func:`_max_pool_pair_kernel` for any window, its taps at ``offsets``."""
    S = X.shape[1]
    indices = I.shape[0] > 0
    for p in range(start, stop):
        oy, ox, place = oy0, ox0, (oy0 * sh - bh) * W - bw
        for _ in range((oy1 - oy0) * (ox1 - ox0)):
            a = place + ox * sw
            best, at = X[p, _at(a)], np.float32(0)
            for k in range(1, offsets.shape[0]):
                o = offsets[k]
                best, at = _max_step(X[p, _at(a + o)], np.float32(o), best, at)
            Y[p, _at(oy), _at(ox)] = best
            if indices:
                I[p, _at(oy), _at(ox)] = p * S + a + int(at)
            oy, ox, place = _next(oy, ox, place, ox0, ox1, sh * W)


@compiled.kernel
def _max_pool_rows_kernel(X, Y, I, lowest, offsets, H, W, kh, kw, sh, sw, dh, dw, bh, bw,
                          oy0, oy1, ox0, ox1, start, stop):
    """:func:`_max_pool_kernel` for windows at column stride 1: tap after tap, along rows
    of outputs, which vectorise."""
    S = X.shape[1]
    indices = I.shape[0] > 0
    for p in range(start, stop):
        for oy in range(oy0, oy1):
            place = (oy * sh - bh) * W - bw
            for ox in range(ox0, ox1):
                Y[p, _at(oy), _at(ox)] = lowest
                if indices:
                    I[p, _at(oy), _at(ox)] = p * S + place + ox
            for k in range(offsets.shape[0]):
                a = place + offsets[k]
                if indices:
                    for ox in range(ox0, ox1):
                        v, best = X[p, _at(a + ox)], Y[p, _at(oy), _at(ox)]
                        Y[p, _at(oy), _at(ox)] = best if (v < best) | (best != best) else v
                        I[p, _at(oy), _at(ox)] = (p * S + a + ox if v > best
                                                  else I[p, _at(oy), _at(ox)])
                else:
                    for ox in range(ox0, ox1):
                        v, best = X[p, _at(a + ox)], Y[p, _at(oy), _at(ox)]
                        Y[p, _at(oy), _at(ox)] = best if (v < best) | (best != best) else v


@compiled.kernel
def _max_pool_edge_kernel(X, Y, I, lowest, offsets, rows, cols, H, W, kh, kw, sh, sw, dh,
                          dw, bh, bw, oy0, oy1, ox0, ox1, start, stop):
    """:func:`_max_pool_kernel` for the outputs outside ``[oy0, oy1) × [ox0, ox1)``, whose
    windows reach into the padding: only the taps ``rows[oy]`` × ``cols[ox]`` lie in
    the input; the maximum starts at -inf at the window's first position."""
    S = X.shape[1]
    _, OH, OW = Y.shape
    indices = I.shape[0] > 0
    for p in range(start, stop):
        for oy in range(OH):
            y0 = oy * sh - bh
            c0, c1 = (ox0, ox1) if oy0 <= oy < oy1 else (OW, OW)
            for side in range(2):
                for ox in range(c1 if side else 0, OW if side else c0):
                    a = y0 * W + ox * sw - bw
                    best, at = lowest, np.float32(0)
                    for ky in range(rows[oy, 0], rows[oy, 1]):
                        for kx in range(cols[ox, 0], cols[ox, 1]):
                            o = offsets[ky * kw + kx]
                            best, at = _max_step(X[p, _at(a + o)], np.float32(o), best, at)
                    Y[p, oy, ox] = best
                    if indices:
                        I[p, oy, ox] = p * S + a + int(at)


def max_pool(xp, X, geo, indices):
    """MaxPool's Y and (where ``indices``; else None) its row-major Indices."""
    out = geo[-1]
    N, C = X.shape[:2]
    Y = xp.empty((N, C) + out, dtype=X.dtype)
    I = xp.empty((N, C) + out if indices else (0, 0) + out, dtype=xp.int64)
    args = (xp.ascontiguousarray(X).reshape(N * C, -1), Y.reshape((-1,) + out),
            I.reshape((-1,) + out), X.dtype.type(-np.inf))
    _windows_2d(geo, N * C, X.size, (_max_pool_pair_kernel, _max_pool_rows_kernel,
                                     _max_pool_kernel, _max_pool_edge_kernel),
                args, (X.shape, out, indices))
    return Y, (I if indices else None)


@compiled.kernel
def _average_pool_pair_kernel(X, Y, D, origin, H, W, kh, kw, sh, sw, dh, dw, bh, bw,
                              oy0, oy1, ox0, ox1, start, stop):
    """AveragePool of 2×2 windows in the planes ``[start, stop)`` of ``X`` (planes, H·W):
    the outputs ``[oy0, oy1) × [ox0, ox1)`` of ``Y`` (planes, OH, OW), whose windows lie
    in the input, their sums from ``origin`` (-0.0) divided by the divisors ``D``
    (OH, OW)."""
    for p in range(start, stop):
        oy, ox, place = oy0, ox0, (oy0 * sh - bh) * W - bw
        for _ in range((oy1 - oy0) * (ox1 - ox0)):
            a = place + ox * sw
            total = origin + X[p, _at(a)] + X[p, _at(a + dw)]
            total = total + X[p, _at(a + dh * W)] + X[p, _at(a + dh * W + dw)]
            Y[p, _at(oy), _at(ox)] = total / D[_at(oy), _at(ox)]
            oy, ox, place = _next(oy, ox, place, ox0, ox1, sh * W)


@compiled.kernel
def _average_pool_kernel(X, Y, D, origin, offsets, H, W, kh, kw, sh, sw, dh, dw, bh, bw,
                         oy0, oy1, ox0, ox1, start, stop):
    """:func:`_average_pool_pair_kernel` for any window, its taps at ``offsets``."""
    for p in range(start, stop):
        oy, ox, place = oy0, ox0, (oy0 * sh - bh) * W - bw
        for _ in range((oy1 - oy0) * (ox1 - ox0)):
            a = place + ox * sw
            total = origin
            for k in range(offsets.shape[0]):
                total += X[p, _at(a + offsets[k])]
            Y[p, _at(oy), _at(ox)] = total / D[_at(oy), _at(ox)]
            oy, ox, place = _next(oy, ox, place, ox0, ox1, sh * W)


@compiled.kernel
def _average_pool_rows_kernel(X, Y, D, origin, offsets, H, W, kh, kw, sh, sw, dh, dw, bh, bw,
                              oy0, oy1, ox0, ox1, start, stop):
    """:func:`_average_pool_kernel` for windows at column stride 1: tap after tap, along
    rows of outputs (the sums in Y's type, as the window's values), which vectorise."""
    for p in range(start, stop):
        for oy in range(oy0, oy1):
            place = (oy * sh - bh) * W - bw
            for ox in range(ox0, ox1):
                Y[p, _at(oy), _at(ox)] = origin
            for k in range(offsets.shape[0]):
                a = place + offsets[k]
                for ox in range(ox0, ox1):
                    Y[p, _at(oy), _at(ox)] += X[p, _at(a + ox)]
            for ox in range(ox0, ox1):
                Y[p, _at(oy), _at(ox)] /= D[_at(oy), _at(ox)]


@compiled.kernel
def _average_pool_edge_kernel(X, Y, D, origin, offsets, rows, cols, H, W, kh, kw, sh, sw,
                              dh, dw, bh, bw, oy0, oy1, ox0, ox1, start, stop):
    """:func:`_average_pool_kernel` for the outputs outside ``[oy0, oy1) × [ox0, ox1)``,
    whose windows reach into the padding: only the taps ``rows[oy]`` × ``cols[ox]`` lie
    in the input.  The padding's zeros, added in their places, would change the sum
    only where it is -0.0 (to +0.0, for good: a sum of values not all -0.0 is never
    -0.0), so that one zero added last does the same."""
    _, OH, OW = Y.shape
    zero = origin - origin
    for p in range(start, stop):
        for oy in range(OH):
            y0 = oy * sh - bh
            c0, c1 = (ox0, ox1) if oy0 <= oy < oy1 else (OW, OW)
            for side in range(2):
                for ox in range(c1 if side else 0, OW if side else c0):
                    a = y0 * W + ox * sw - bw
                    total = origin
                    for ky in range(rows[oy, 0], rows[oy, 1]):
                        for kx in range(cols[ox, 0], cols[ox, 1]):
                            total += X[p, _at(a + offsets[ky * kw + kx])]
                    Y[p, oy, ox] = (total + zero) / D[oy, ox]


def _divisor_table(xp, geo, divisor, dtype):
    """``divisor`` (an int, or a host array of the output's spatial shape) as an array
    of ``dtype`` of the output's spatial shape."""
    if isinstance(divisor, int):
        return xp.full(geo[-1], divisor, dtype=dtype)
    return xp.ascontiguousarray(divisor.astype(dtype))


def average_pool(xp, X, geo, divisor):
    """AveragePool's Y: each window's sum divided by ``divisor`` (an int, or a host
    array of the output's spatial shape)."""
    out = geo[-1]
    N, C = X.shape[:2]
    Y = xp.empty((N, C) + out, dtype=X.dtype)
    args = (xp.ascontiguousarray(X).reshape(N * C, -1), Y.reshape((-1,) + out),
            _divisor_table(xp, geo, divisor, X.dtype), X.dtype.type(-0.0))
    _windows_2d(geo, N * C, X.size, (_average_pool_pair_kernel, _average_pool_rows_kernel,
                                     _average_pool_kernel, _average_pool_edge_kernel),
                args, (X.shape, out))
    return Y


@compiled.kernel
def _average_pool_grad_pair_kernel(dY, D, dX, H, W, kh, kw, sh, sw, dh, dw, bh, bw,
                                   oy0, oy1, ox0, ox1, start, stop):
    """AveragePoolGrad of 2×2 windows that do not overlap, in the planes ``[start,
    stop)`` of ``dY`` (planes, OH, OW): the shares ``dY / D`` of the outputs ``[oy0,
    oy1) × [ox0, ox1)``, whose windows lie in the input, assigned to their elements in
    ``dX`` (planes, H·W)."""
    for p in range(start, stop):
        oy, ox, place = oy0, ox0, (oy0 * sh - bh) * W - bw
        for _ in range((oy1 - oy0) * (ox1 - ox0)):
            a = place + ox * sw
            share = dY[p, _at(oy), _at(ox)] / D[_at(oy), _at(ox)]
            for ky in range(2):
                for kx in range(2):
                    dX[p, _at(a + ky * dh * W + kx * dw)] = share
            oy, ox, place = _next(oy, ox, place, ox0, ox1, sh * W)


@compiled.kernel
def _average_pool_grad_kernel(dY, D, dX, offsets, H, W, kh, kw, sh, sw, dh, dw, bh, bw,
                              oy0, oy1, ox0, ox1, start, stop):
    """:func:`_average_pool_grad_pair_kernel` for any window, its taps at ``offsets``."""
    for p in range(start, stop):
        oy, ox, place = oy0, ox0, (oy0 * sh - bh) * W - bw
        for _ in range((oy1 - oy0) * (ox1 - ox0)):
            a = place + ox * sw
            share = dY[p, _at(oy), _at(ox)] / D[_at(oy), _at(ox)]
            for k in range(offsets.shape[0]):
                dX[p, _at(a + offsets[k])] = share
            oy, ox, place = _next(oy, ox, place, ox0, ox1, sh * W)


@compiled.kernel
def _average_pool_grad_edge_kernel(dY, D, dX, offsets, rows, cols, H, W, kh, kw, sh, sw, dh,
                                   dw, bh, bw, oy0, oy1, ox0, ox1, start, stop):
    """:func:`_average_pool_grad_kernel` for the outputs outside ``[oy0, oy1) × [ox0,
    ox1)``, whose windows reach into the padding: only the taps ``rows[oy]`` ×
    ``cols[ox]`` lie in the input."""
    _, OH, OW = dY.shape
    for p in range(start, stop):
        for oy in range(OH):
            y0 = oy * sh - bh
            c0, c1 = (ox0, ox1) if oy0 <= oy < oy1 else (OW, OW)
            for side in range(2):
                for ox in range(c1 if side else 0, OW if side else c0):
                    a = y0 * W + ox * sw - bw
                    share = dY[p, oy, ox] / D[oy, ox]
                    for ky in range(rows[oy, 0], rows[oy, 1]):
                        for kx in range(cols[ox, 0], cols[ox, 1]):
                            dX[p, _at(a + offsets[ky * kw + kx])] = share


@compiled.kernel
def _average_pool_grad_overlapping_kernel(dY, D, dX, ys, xs, H, W, kh, kw, sh, sw, dh, dw,
                                          bh, bw, start, stop):
    """AveragePoolGrad of overlapping windows in the planes ``[start, stop)`` of ``dY``
    (planes, OH, OW): the shares ``dY / D`` of the windows added, kernel offset after
    kernel offset, to ``dX`` (planes, H·W, zeros) at their elements (the outputs
    ``ys[ky]`` × ``xs[kx]`` have their tap ``(ky, kx)`` in the input)."""
    _, OH, OW = dY.shape
    share = np.empty_like(dY[0])
    for p in range(start, stop):
        for oy in range(OH):
            for ox in range(OW):
                share[_at(oy), _at(ox)] = dY[p, _at(oy), _at(ox)] / D[_at(oy), _at(ox)]
        for ky in range(kh):
            for kx in range(kw):
                for oy in range(ys[ky, 0], ys[ky, 1]):
                    place = (oy * sh + ky * dh - bh) * W + kx * dw - bw
                    for ox in range(xs[kx, 0], xs[kx, 1]):
                        dX[p, _at(place + ox * sw)] += share[_at(oy), _at(ox)]


def average_pool_grad(xp, dY, x_shape, geo, divisor):
    """AveragePoolGrad's dX (of shape ``x_shape``): the shares ``dY / divisor`` given to
    their windows' elements."""
    sp, kernel, strides, dilations, begin, end, need, out = geo
    window, _, _, _, ys, xs, _ = _layout(*_geometry_key(geo))
    spans = [(kernel[i] - 1) * dilations[i] + 1 for i in range(2)]
    disjoint = all(strides[i] >= spans[i] for i in range(2))
    tiled = disjoint and all(dilations[i] == 1 and strides[i] == kernel[i]
                             and out[i] * strides[i] == sp[i] + begin[i] + need[i]
                             for i in range(2))
    # zeros where some elements lie in no window (and where windows overlap: the kernel
    # adds to them)
    dX = (xp.empty if tiled else xp.zeros)(x_shape, dtype=dY.dtype)
    dY3 = xp.ascontiguousarray(dY).reshape((-1,) + out)
    dX2 = dX.reshape(dY3.shape[0], -1)
    args = (dY3, _divisor_table(xp, geo, divisor, dY.dtype), dX2)
    key = (dY.shape, x_shape)
    if not disjoint:
        compiled.by_parts(dY3.shape[0], dX.size, lambda start, stop:
                          _average_pool_grad_overlapping_kernel(*args, ys, xs, *window, start,
                                                                stop),
                          key=("_average_pool_grad_overlapping_kernel",) + key)
        return dX
    _windows_2d(geo, dY3.shape[0], dX.size, (_average_pool_grad_pair_kernel, None,
                                             _average_pool_grad_kernel,
                                             _average_pool_grad_edge_kernel), args, key)
    return dX


@compiled.kernel
def _indices_grad_kernel(dY, I, dX, add, start, stop):
    """MaxPoolIndicesGrad of the planes ``[start, stop)`` of ``dY`` and ``I`` (planes,
    outputs) into ``dX`` (planes, positions): dY assigned at the indices (into zeros),
    or where ``add``, added in float64 in dY's order and rounded.  False, with planes
    left unfinished, where an index lies outside its plane."""
    _, R = dY.shape
    _, S = dX.shape
    sums = np.zeros(S if add else 0)
    for p in range(start, stop):
        base = p * S
        if add:
            for e in range(S):
                sums[e] = 0.0
            for j in range(R):
                at = I[p, j] - base
                if at < 0 or at >= S:
                    return False
                sums[at] += dY[p, j]
            for e in range(S):
                dX[p, e] = sums[e]
        else:
            for j in range(R):
                at = I[p, j] - base
                if at < 0 or at >= S:
                    return False
                dX[p, at] = dY[p, j]
    return True


def indices_grad(xp, dY, indices, shape, overlapping):
    """MaxPoolIndicesGrad's dX, or None where an index lies outside its plane."""
    planes = dY.shape[0] * dY.shape[1]
    dX = (xp.empty if overlapping else xp.zeros)(shape, dtype=dY.dtype)
    dY2, I2 = (xp.ascontiguousarray(a).reshape(planes, -1) for a in (dY, indices))
    done = compiled.by_parts(planes, dX.size, lambda start, stop: _indices_grad_kernel(
        dY2, I2, dX.reshape(planes, -1), bool(overlapping), start, stop),
        key=("_indices_grad_kernel", dY.shape, shape))
    return dX if all(done) else None
