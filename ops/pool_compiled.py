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
Indices computed from offsets go through :func:`_at`.

The kernels take a range of (N·C) planes.  Each plane's outputs are computed by the
same loop whichever call holds the plane, and no sum crosses planes, so the results
are the same bits however the planes are cut: an op runs in one call, or, with
:data:`onnxgrad.ops.compiled.PART` elements per call or more, in one call per thread
(:data:`onnxgrad.ops.compiled.MAX_PARTS` at most) over near-equal ranges of the
planes, as tasks of :func:`onnxgrad.threads.parallel`.

What a call needs besides its arrays (the kernels to run and their tables, the output
shapes, the divisors, the calls' ranges) depends on the shapes, dtype, attributes,
thread count and settings alone: a :class:`Plan`, which :func:`max_pool_plan`,
:func:`average_pool_plan`, :func:`average_pool_grad_plan` and
:func:`indices_grad_plan` make (None where the op does not run here) and ``ops/pool.py``
remembers per shape and attributes; :func:`max_pool`, :func:`average_pool`,
:func:`average_pool_grad` and :func:`indices_grad` then run it.  A window geometry
``geo`` is the tuple that ``_geometry`` of ``ops/pool.py`` gives.
"""

from __future__ import annotations

import functools
import math

import numpy as np  # host-side window tables and the compiled kernels

from onnxgrad.ops import compiled
from onnxgrad.threads import get_num_threads, parallel, split


#: The flat offset in a plane of a window's last tap from its first, up to which MaxPool
#: runs its compiled kernels: they carry the offset of the maximum as a float32, exact
#: up to 2^24.
MAX_OFFSET = 1 << 24

#: Taps of a window up to which MaxPool with Indices runs its compiled kernels at column
#: strides above 1 (measured at batch 16, 64 channels, 1 thread: 3×3 windows 1.7×
#: faster, 3×4 and 5×5 at stride 3 as fast, 4×4 and 5×5 windows at stride 2 up to 1.1×
#: slower than the NumPy form; without Indices all of them 1.2-2.5× faster).
INDEXED_MAX_TAPS = 9


_FLOATS = (np.dtype(np.float32), np.dtype(np.float64))


def settings() -> tuple:
    """What plans depend on besides shapes, dtypes and attributes: the thread count,
    :data:`onnxgrad.ops.compiled.PART`, :data:`onnxgrad.ops.compiled.MAX_PARTS`,
    :data:`MAX_OFFSET` and :data:`INDEXED_MAX_TAPS`.  Part of the key under which
    ``ops/pool.py`` remembers a plan, so that a change of any of them takes effect."""
    return get_num_threads(), compiled.PART, compiled.MAX_PARTS, MAX_OFFSET, INDEXED_MAX_TAPS


def runs(geo, shape, dtype) -> bool:
    """Whether pooling of geometry ``geo`` runs its compiled kernels on arrays of
    ``shape`` and ``dtype``: two spatial axes, no negative pads, not empty, float32 or
    float64 (whether compiled kernels are available here is asked on each call:
    :func:`onnxgrad.ops.compiled.available`)."""
    sp, kernel, strides, dilations, begin, end, need, out = geo
    return (len(sp) == 2 and min(begin) >= 0 and min(end) >= 0 and min(need) >= 0
            and math.prod(shape) > 0 and np.dtype(dtype) in _FLOATS)


def runs_max_pool(geo, shape, dtype, indices, max_offset=None, indexed_max_taps=None) -> bool:
    """Whether MaxPool of an input of ``shape`` and ``dtype`` (with Indices where
    ``indices``) runs its compiled kernels (:func:`runs`, :data:`MAX_OFFSET`,
    :data:`INDEXED_MAX_TAPS`, or the limits given)."""
    if not runs(geo, shape, dtype):
        return False
    max_offset = MAX_OFFSET if max_offset is None else max_offset
    taps = INDEXED_MAX_TAPS if indexed_max_taps is None else indexed_max_taps
    sp, kernel, strides, dilations = geo[:4]
    last = (kernel[0] - 1) * dilations[0] * sp[1] + (kernel[1] - 1) * dilations[1]
    return last <= max_offset and (not indices or strides[1] == 1
                                   or math.prod(kernel) <= taps)


class Plan:
    """How a pooling op runs its compiled kernels for one input shape, dtype, window
    geometry, thread count and settings: ``inner(*arrays, *inner_tail, start, stop)``
    and, where ``edges`` is not None, ``edges(*arrays, *edges_tail, start, stop)`` over
    the ranges ``calls`` of the planes (one call, or one per thread: see the module's
    notes), the kernels named (looked up in this module on each call); the shapes of
    the arrays as the kernels take them and as the op returns them; the divisors and
    the first value of a window's sum or maximum.  Made once per key (``ops/pool.py``
    remembers them) and read only: numbers, tuples, names and read-only tables, which
    the kernels only read (outputs are new arrays on each call).  Hashed by identity,
    it names its calls to :func:`onnxgrad.threads.parallel` (which times where they
    run best)."""

    __slots__ = ("inner", "inner_tail", "edges", "edges_tail", "calls", "planes", "source",
                 "target", "shape", "dtype", "indices", "add", "zeros", "table", "origin")

    def __init__(self, inner, inner_tail, edges, edges_tail, calls, **fields):
        self.inner, self.inner_tail, self.calls = inner, inner_tail, calls
        self.edges, self.edges_tail = edges, edges_tail
        self.planes = calls[-1][1]
        for name in ("source", "target", "shape", "dtype", "indices", "add", "zeros", "table",
                     "origin"):
            setattr(self, name, fields.pop(name, None))
        if fields:
            raise TypeError(f"Plan: unknown fields {sorted(fields)}")


def _calls(planes, size, settings):
    """Ranges ``(start, stop)`` of ``planes`` planes (``size`` elements in all): one over
    all of them, or one per thread, near-equal, where every range holds ``PART``
    elements or more (``MAX_PARTS`` ranges at most; ``settings`` as :func:`settings`
    gives them)."""
    threads, part, most = settings[:3]
    tasks = max(1, min(threads, most, size // part, planes))
    return tuple((r.start, r.stop) for r in split(planes, tasks))


def _read_only(array):
    array.flags.writeable = False
    return array


def _run(plan, arrays) -> list:
    """The plan's kernels over its calls' ranges of planes, on the thread pool where
    there is more than one; the inner kernel's results, in order."""
    if len(plan.calls) > 1:
        return parallel([functools.partial(_part, plan, arrays, *r) for r in plan.calls],
                        (plan.inner, plan))
    return [_part(plan, arrays, 0, plan.planes)]


def _part(plan, arrays, start, stop):
    kernels = globals()  # looked up on each call: tests count the kernels' calls
    result = kernels[plan.inner](*arrays, *plan.inner_tail, start, stop)
    if plan.edges is not None:
        kernels[plan.edges](*arrays, *plan.edges_tail, start, stop)
    return result


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
    ``(oy0, oy1, ox0, ox1)`` whose windows lie in the input.  The tables are read-only
    (plans keep them, and the kernels only read them)."""
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
    tables = (offsets, taps[0], taps[1], outputs[0], outputs[1])
    offsets, rows, cols, ys, xs = (_read_only(t) for t in tables)
    return window, offsets, rows, cols, ys, xs, tuple(whole)


def _geometry_key(geo):
    sp, kernel, strides, dilations, begin, end, need, out = geo
    return tuple(sp), tuple(kernel), tuple(strides), tuple(dilations), tuple(begin), tuple(out)


def _windows_plan(geo, planes, size, kernels, settings, **fields):
    """The :class:`Plan` of a pooling op's kernels ``(pair, rows, general, edges)`` (their
    names) over ``planes`` planes (``size`` elements in all): over the outputs whose
    windows lie in the input, ``rows(*arrays, offsets, …)`` where the column stride is
    1 and ``rows`` is given, else ``pair(*arrays, …)`` for 2×2 windows, else
    ``general(*arrays, offsets, …)``; then ``edges(*arrays, offsets, rows, cols, …)``
    over the others where there are any."""
    pair, rows_kernel, general, edges = kernels
    window, offsets, rows, cols, _, _, whole = _layout(*_geometry_key(geo))
    out = geo[-1]
    if rows_kernel is not None and geo[2][1] == 1:
        inner, inner_tail = rows_kernel, (offsets,) + window + whole
    elif geo[1] == (2, 2):
        inner, inner_tail = pair, window + whole
    else:
        inner, inner_tail = general, (offsets,) + window + whole
    some_edges = whole != (0, out[0], 0, out[1])
    return Plan(inner, inner_tail, edges if some_edges else None,
                (offsets, rows, cols) + window + whole, _calls(planes, size, settings), **fields)


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


def max_pool_plan(geo, x_shape, dtype, indices, settings):
    """The :class:`Plan` of MaxPool of an input of ``x_shape`` and ``dtype`` (with
    Indices where ``indices``), or None where it does not run here
    (:func:`runs_max_pool`)."""
    if not runs_max_pool(geo, x_shape, dtype, indices, *settings[3:5]):
        return None
    out = geo[-1]
    planes = x_shape[0] * x_shape[1]
    dtype = np.dtype(dtype)
    return _windows_plan(geo, planes, math.prod(x_shape),
                         ("_max_pool_pair_kernel", "_max_pool_rows_kernel", "_max_pool_kernel",
                          "_max_pool_edge_kernel"), settings,
                         source=(planes, -1), target=(planes,) + out,
                         shape=tuple(x_shape[:2]) + out, dtype=dtype, indices=bool(indices),
                         origin=dtype.type(-np.inf))


def max_pool(X, plan):
    """MaxPool's Y and (where the ``plan`` has Indices; else None) its row-major
    Indices."""
    Y = np.empty(plan.target, dtype=plan.dtype)
    I = np.empty(plan.target if plan.indices else (0,) + plan.target[1:], dtype=np.int64)
    _run(plan, (np.ascontiguousarray(X).reshape(plan.source), Y, I, plan.origin))
    return Y.reshape(plan.shape), (I.reshape(plan.shape) if plan.indices else None)


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


def _divisor_table(geo, divisor, dtype):
    """``divisor`` (an int, or a host array of the output's spatial shape) as a
    read-only array of ``dtype`` of the output's spatial shape."""
    if isinstance(divisor, int):
        return _read_only(np.full(geo[-1], divisor, dtype=dtype))
    return _read_only(np.ascontiguousarray(divisor.astype(dtype)))


def average_pool_plan(geo, x_shape, dtype, divisor, settings):
    """The :class:`Plan` of AveragePool of an input of ``x_shape`` and ``dtype``, each
    window's sum divided by ``divisor`` (an int, or a host array of the output's
    spatial shape), or None where it does not run here (:func:`runs`)."""
    if not runs(geo, x_shape, dtype):
        return None
    out = geo[-1]
    planes = x_shape[0] * x_shape[1]
    dtype = np.dtype(dtype)
    return _windows_plan(geo, planes, math.prod(x_shape),
                         ("_average_pool_pair_kernel", "_average_pool_rows_kernel",
                          "_average_pool_kernel", "_average_pool_edge_kernel"), settings,
                         source=(planes, -1), target=(planes,) + out,
                         shape=tuple(x_shape[:2]) + out, dtype=dtype,
                         table=_divisor_table(geo, divisor, dtype), origin=dtype.type(-0.0))


def average_pool(X, plan):
    """AveragePool's Y as its ``plan`` says."""
    Y = np.empty(plan.target, dtype=plan.dtype)
    _run(plan, (np.ascontiguousarray(X).reshape(plan.source), Y, plan.table, plan.origin))
    return Y.reshape(plan.shape)


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


def average_pool_grad_plan(geo, dy_shape, x_shape, dtype, divisor, settings):
    """The :class:`Plan` of AveragePoolGrad of a ``dY`` of ``dy_shape`` and ``dtype``
    into a dX of ``x_shape``, the shares ``dY / divisor`` (an int, or a host array of
    the output's spatial shape), or None where it does not run here (:func:`runs`, and
    dY of the pooled shape)."""
    sp, kernel, strides, dilations, begin, end, need, out = geo
    if tuple(dy_shape) != tuple(x_shape[:2]) + out or not runs(geo, dy_shape, dtype):
        return None
    window, _, _, _, ys, xs, _ = _layout(*_geometry_key(geo))
    spans = [(kernel[i] - 1) * dilations[i] + 1 for i in range(2)]
    disjoint = all(strides[i] >= spans[i] for i in range(2))
    tiled = disjoint and all(dilations[i] == 1 and strides[i] == kernel[i]
                             and out[i] * strides[i] == sp[i] + begin[i] + need[i]
                             for i in range(2))
    planes = x_shape[0] * x_shape[1]
    size = math.prod(x_shape)
    dtype = np.dtype(dtype)
    # zeros where some elements lie in no window (and where windows overlap: the kernel
    # adds to them)
    fields = dict(source=(planes,) + out, target=(planes, -1), shape=tuple(x_shape),
                  dtype=dtype, zeros=not tiled, table=_divisor_table(geo, divisor, dtype))
    if not disjoint:
        return Plan("_average_pool_grad_overlapping_kernel", (ys, xs) + window, None, (),
                    _calls(planes, size, settings), **fields)
    return _windows_plan(geo, planes, size,
                         ("_average_pool_grad_pair_kernel", None, "_average_pool_grad_kernel",
                          "_average_pool_grad_edge_kernel"), settings, **fields)


def average_pool_grad(dY, plan):
    """AveragePoolGrad's dX as its ``plan`` says: the shares ``dY / divisor`` given to
    their windows' elements."""
    dX = (np.zeros if plan.zeros else np.empty)(plan.shape, dtype=plan.dtype)
    _run(plan, (np.ascontiguousarray(dY).reshape(plan.source), plan.table,
                dX.reshape(plan.target)))
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


def indices_grad_plan(dy_shape, dtype, indices_shape, indices_dtype, x_shape, overlapping,
                      settings):
    """The :class:`Plan` of MaxPoolIndicesGrad of a ``dY`` of ``dy_shape`` and ``dtype``
    and Indices of ``indices_shape`` and ``indices_dtype`` into a dX of ``x_shape``
    (windows ``overlapping`` or not), or None where it does not run here: 4-D, Indices
    of int64 and of dY's shape, dY of X's leading axes, float32 or float64, not
    empty."""
    if not (len(x_shape) == 4 and len(dy_shape) == 4 and tuple(indices_shape) == tuple(dy_shape)
            and tuple(dy_shape[:2]) == tuple(x_shape[:2])
            and np.dtype(indices_dtype) == np.int64 and math.prod(dy_shape) > 0
            and np.dtype(dtype) in _FLOATS):
        return None
    planes = x_shape[0] * x_shape[1]
    return Plan("_indices_grad_kernel", (), None, (),
                _calls(planes, math.prod(x_shape), settings),
                source=(planes, -1), target=(planes, -1), shape=tuple(x_shape),
                dtype=np.dtype(dtype), add=bool(overlapping), zeros=not overlapping)


def indices_grad(dY, indices, plan):
    """MaxPoolIndicesGrad's dX as its ``plan`` says, or None where an index lies outside
    its plane."""
    dX = (np.zeros if plan.zeros else np.empty)(plan.shape, dtype=plan.dtype)
    done = _run(plan, (np.ascontiguousarray(dY).reshape(plan.source),
                       np.ascontiguousarray(indices).reshape(plan.source),
                       dX.reshape(plan.target), plan.add))
    return dX if all(done) else None
