"""Direct kernels for depthwise and small-group convolutions, of any spatial rank.

A convolution whose groups hold few channels (depthwise: one input channel per group,
and ``m = M / group`` outputs) gives the column products of ``ops/conv.py`` too little
work per product, while its columns copy the input once per kernel tap.  Two methods
replace them, chosen per layer by size (:func:`applies`, :func:`_dense`):

* **Taps** (planes of many positions).  The padded input is split by stride phase into
  *phase planes*, channel-major ``(phase, channel, N·prod(Q))``, ``Q = ceil(padded /
  stride)`` per axis: every kernel tap reads one phase plane at one flat offset for all
  output positions of all batch items.  The output is laid out the same way (an
  *extended* output, whose positions past the output size on some axis are computed
  and never read), so that it is the sum over taps of shifted flat views of the planes
  times per-channel weights: no columns, one strided view per tap.  The shifts along
  the last axis are also materialised as a few shifted copies of each channel's planes,
  next to each other, so that per group and per tap of the other axes one BLAS product
  ``(m × c·copies) @ (c·copies × positions)`` sums the last axis's taps over the whole
  plane (faster than ``einsum`` or a multiply-add per tap, measured); the products of
  the other axes' taps are added up.  The input gradient is the adjoint: the output
  gradient laid out as planes behind a margin of zeros, with copies shifted the other
  way, read at negative offsets into each phase plane of the input gradient, which is
  then put back in place phase by phase.  The weight gradient is, per tap, one BLAS
  product per group of the output gradient's planes with the tap's view of the phase
  planes (a dot product per channel pair over all positions).
* **Dense** (planes of few positions, e.g. 4×4 or 8×8).  Per group the convolution is a
  matrix ``T`` (``c·positions_in × m·positions_out``) made from the weights and a 0/1
  map ``S`` of the input position each tap reads for each output position
  (``T = W @ S``), and the computations are BLAS products: ``Y = X @ T``,
  ``dX = dY @ Tᵀ``, ``dW = (Xᵀ @ dY) @ Sᵀ`` (the last product as a gather of the
  entries each tap reads).  ``T`` holds about ``positions_in / taps`` products per
  useful one, which BLAS repays on small planes only.

Layers of one or two spatial axes and up to :data:`COMPILED_MAX_CHANNELS_PER_GROUP`
input channels per group (depthwise and small-group layers) run the taps method as
compiled loops where compiled kernels are available (``ops/compiled.py``; see "taps
method: compiled kernels" below), and take planes of :data:`COMPILED_MIN_OUTPUTS`
output positions or more from the dense method.

Work runs in tiles of groups sized to stay in cache.  Tiles share their buffers: a
buffer's padding positions are zeroed once and stay zero, since every tile writes the
same positions.  With NumPy and enough work, tiles run as tasks on the thread pool
(:func:`onnxgrad.threads.parallel`); tiles depend on the shapes only and no sum
crosses a tile, so results do not depend on the number of threads.  The compiled
kernels run in one call per thread instead, over near-equal ranges of the batch or of
the channels: they compute each output element by the same loop whichever call holds
it, so their results are the same bits on any number of threads.  What a layer's
calls need besides its arrays (tables of taps and rows, the calls' ranges) is made
once per shape and thread count and remembered (:func:`_compiled_plan`).
"""

from __future__ import annotations

import functools
import itertools
import math
import threading

import numpy as np

from onnxgrad.ops import compiled
from onnxgrad.threads import get_num_threads, parallel, split

#: Channels per group, input and output (the channel multiplier), up to which Conv and
#: its gradients run here (measured at batch 32 on 4×4 to 32×32 planes: up to 4 and 4
#: gain, 8 breaks even on large planes; a multiplier of 4 on one input channel loses
#: 20% on 32×32 planes and gains 2× on 8×8 ones).
DIRECT_MAX_CHANNELS_PER_GROUP = 4
DIRECT_MAX_OUTPUTS_PER_GROUP = 4
#: Outputs per group up to which a Conv with one input channel per group runs here
#: where the compiled kernels run it (measured at batch 32-64, 1 thread: with 6 or 8
#: outputs per group forward and gradients 1.3-2.8× faster than column products, even
#: with 16, slower from 32).
COMPILED_MAX_OUTPUTS_PER_GROUP = 8
#: Input channels per group up to which the compiled kernels run a layer that comes
#: here (they sum over a group's channels; measured at batch 32, 1 thread, against the
#: NumPy taps method on 2 and 4 channels and outputs per group: forward 2.5×, input
#: gradient 1.4-1.9×, weight gradient 3.5-4.5× faster).
COMPILED_MAX_CHANNELS_PER_GROUP = 16
#: (Layers of several input channels per group and many outputs stay with the column
#: products: measured at batch 32-64 on 1 and 2 threads (6 → 16 channels 5×5 on 14×14
#: and on 28×28, 3 → 64 and 3 → 16 at stride 2 on 32×32 and 64×64, 8 → 16 and 16 → 16
#: 3×3 on 32×32), the compiled kernels' forward pass and input gradient run 0.3-1.0×
#: as fast, and the weight gradient 0.5-1.05×.)
#: A layer runs by the dense method when the matrix of a group has at most this many
#: (input channel and position, output channel and position) pairs and the planes at
#: most :data:`DENSE_MAX_OUTPUTS_PER_TAP` output positions per kernel tap (the matrix
#: holds about ``positions_in / taps`` products per useful one), by the taps method
#: otherwise.
DENSE_MAX_PAIRS = 1 << 14
DENSE_MAX_OUTPUTS_PER_TAP = 10
#: Buffer elements per tile of the taps method and of the dense method's matrices.
TAPS_TILE = 1 << 20
DENSE_TILE = 1 << 16
#: Elements of row-phase planes per pass of the compiled kernels (the planes of a
#: group's input channels, or of its output channels for the input gradient) for
#: several batch items, so that each tap's run is long, while a pass's buffers stay
#: in the first-level cache.
COMPILED_PASS = 1 << 12
#: Output positions per plane from which the compiled taps method runs a layer that the
#: dense method would take (measured at batch 32: 2.5× faster on 16×16 planes at stride
#: 2, 1.2× on 8×8; slower on 4×4).
COMPILED_MIN_OUTPUTS = 64
#: Multiply-adds (outputs × taps) from which a layer's kernels run in parallel (about
#: a quarter of a millisecond compiled: MobileNetV2's 8×8 stride-2 layers are past it,
#: and its training step at 2 threads 3 % faster than from 4 Mi): the compiled kernels
#: in one call per thread, the NumPy forms in tasks of whole tiles, in
#: :data:`MAX_TASKS` tasks at most.  The NumPy forms' tasks group the same tiles
#: however many there are, so one thread does the same work either way.
PARALLEL_MIN_WORK = 1 << 20
MAX_TASKS = 16
#: Multiply-adds per call of a compiled kernel run in parallel, at least (some 20-50
#: microseconds: a call costs, and on the pool a hand-over, a few microseconds).
COMPILED_PART = 1 << 20


def applies(w_shape, group, begin, end, xp=None, dtype=None):
    """Whether a Conv of weight shape ``w_shape`` with these pads runs here: few
    channels per group, or where the compiled kernels run it, one input channel per
    group and up to :data:`COMPILED_MAX_OUTPUTS_PER_GROUP` outputs (as in a network's
    first layer on one-channel images); and non-negative pads."""
    if min(begin) < 0 or min(end) < 0:
        return False
    outputs = w_shape[0] // group
    if w_shape[1] <= DIRECT_MAX_CHANNELS_PER_GROUP and outputs <= DIRECT_MAX_OUTPUTS_PER_GROUP:
        return True
    return (w_shape[1] == 1 and outputs <= COMPILED_MAX_OUTPUTS_PER_GROUP
            and xp is not None and _compiled(xp, w_shape, dtype))


def _dense(xp, sp, out, w_shape, group, dtype):
    """Whether the dense method runs a layer (see :data:`DENSE_MAX_PAIRS`); not where
    the taps method runs compiled on planes of :data:`COMPILED_MIN_OUTPUTS` output
    positions or more."""
    per_group = w_shape[0] // group * w_shape[1]
    if _compiled(xp, w_shape, dtype) and math.prod(out) >= COMPILED_MIN_OUTPUTS:
        return False
    return (per_group * math.prod(sp) * math.prod(out) <= DENSE_MAX_PAIRS
            and math.prod(out) <= DENSE_MAX_OUTPUTS_PER_TAP * math.prod(w_shape[2:]))


def _run(xp, groups, tile, work, buffers, task):
    """``task(groups_slice, bufs)`` for each tile of ``tile`` groups, ``buffers(tile)``
    making the buffers of a tile.  NumPy with enough ``work`` runs the tiles as up to
    :data:`MAX_TASKS` parallel tasks of whole tiles; tasks that run one after another
    take over each other's buffers (padding positions stay zero: every tile writes the
    same positions)."""
    if xp.__name__ != "numpy":
        task(slice(0, groups), buffers(groups))
        return
    tiles = [slice(i, min(i + tile, groups)) for i in range(0, groups, tile)]
    parts = min(len(tiles), MAX_TASKS) if work >= PARALLEL_MIN_WORK else 1
    free, lock = [], threading.Lock()

    def run(part):
        with lock:
            bufs = free.pop() if free else None
        bufs = buffers(tile) if bufs is None else bufs
        for gs in tiles[part]:
            task(gs, bufs)
        with lock:
            free.append(bufs)

    parallel([functools.partial(run, part) for part in split(len(tiles), parts)],
             (task.__code__, groups, tile, work))


def _matmul(xp, a, b, out):
    """``a @ b`` into ``out`` (NumPy writes in place; CuPy's product is copied in)."""
    if xp.__name__ == "numpy":
        xp.matmul(a, b, out=out)
    else:
        out[...] = xp.matmul(a, b)


def _einsum(xp, subscripts, a, b, out):
    """``einsum(subscripts, a, b)`` into ``out``, as :func:`_matmul`."""
    if xp.__name__ == "numpy":
        xp.einsum(subscripts, a, b, out=out)
    else:
        out[...] = xp.einsum(subscripts, a, b)


# -- taps method: phase planes ---------------------------------------------------------------


def _axis_taps(k, stride, dilation, phase):
    """The taps of one axis that read ``phase``: (first tap, tap step, count, first
    offset in the phase plane, offset step)."""
    first = next((t for t in range(k) if t * dilation % stride == phase), None)
    if first is None:
        return 0, 1, 0, 0, 0
    g = math.gcd(stride, dilation)
    step = stride // g
    return first, step, len(range(first, k, step)), first * dilation // stride, dilation // g


class _Planes:
    """The phase planes of one convolution: extents ``q``, flat strides, and per phase
    the taps that read it.  Made once per layer shape (:func:`_planes`) and read only:
    every attribute is a number or a tuple."""

    def __init__(self, batch, sp, kernel, strides, dilations, begin, end, out):
        nd = len(sp)
        self.sp, self.strides, self.dilations = sp, strides, dilations
        self.begin, self.out = begin, out
        self.q = tuple(-(-(sp[i] + begin[i] + end[i]) // strides[i]) for i in range(nd))
        self.flat = tuple(math.prod(self.q[i + 1:]) for i in range(nd))
        self.size = batch * math.prod(self.q)                       # P: one channel's planes
        self.length = self.size - math.prod(self.q) + 1 + sum(     # L: extended output
            (out[i] - 1) * self.flat[i] for i in range(nd))
        self.phases = tuple(itertools.product(*(range(s) for s in strides)))
        self.taps = tuple(tuple(_axis_taps(kernel[i], strides[i], dilations[i], p[i])
                                for i in range(nd)) for p in self.phases)
        # Shifted copies of the planes for the last axis's taps (their count and shift),
        # and the largest flat offset of a tap.
        self.shifts = max(1, max(t[-1][2] for t in self.taps))
        self.shift_step = max(t[-1][4] for t in self.taps)
        self.margin = sum((kernel[i] - 1) * dilations[i] // strides[i] * self.flat[i]
                          for i in range(nd))

    def base(self, taps):
        """The flat offset of a phase's first tap."""
        return sum(t[3] * f for t, f in zip(taps, self.flat))

    def tap_strides(self, taps, item, sign=1):
        """Byte strides of a phase's tap axes but the last (negated for the adjoint)."""
        return tuple(sign * t[4] * f * item for t, f in zip(taps[:-1], self.flat[:-1]))

    def regions(self):
        """(phase index, input slices, plane slices): where each phase of the input lies."""
        for index, phase in enumerate(self.phases):
            xs, qs = [], []
            for i, p in enumerate(phase):
                s, b = self.strides[i], self.begin[i]
                lo = max(0, -(-(b - p) // s))
                hi = min(self.q[i], (self.sp[i] - 1 + b - p) // s + 1)
                if hi <= lo:
                    break
                x = s * lo + p - b
                xs.append(slice(x, x + s * (hi - lo - 1) + 1, s))
                qs.append(slice(lo, hi))
            else:
                yield index, tuple(xs), tuple(qs)

    def view(self, rows, n, batch):
        """Rows ``(n, P)`` of a buffer as ``(n, N, *q)``."""
        return rows[:n].reshape((n, batch) + self.q)

    def valid(self):
        """The positions of the extended output that are output positions."""
        return (slice(None), slice(None)) + tuple(slice(0, o) for o in self.out)


@functools.lru_cache(maxsize=128)
def _planes(batch, sp, kernel, strides, dilations, begin, end, out):
    """The :class:`_Planes` of a convolution, made once per shape and attributes (all
    tuples of ints), the same object while it is remembered (of the last 128: a
    network's layers, forward and backward, several input shapes over)."""
    return _Planes(batch, sp, kernel, strides, dilations, begin, end, out)


def _weight_taps(W5, taps):
    """The weights ``(g, m, c, *kernel)`` of one phase's taps."""
    return W5[(Ellipsis,) + tuple(slice(t[0], t[0] + t[1] * (t[2] - 1) + 1, t[1]) for t in taps)]


def _phase_matrices(xp, W5, pl, transposed):
    """Per phase with taps: (phase index, taps, weights ``(g, *lead, m, c·shifts)``, or
    ``(g, *lead, c, m·shifts)`` when ``transposed``), where ``lead`` are the tap counts
    of every axis but the last; a shifted copy that no tap of the phase reads gets
    weight 0."""
    out = []
    for index, taps in enumerate(pl.taps):
        if not all(t[2] for t in taps):
            continue
        w = _weight_taps(W5, taps)                                  # (g, m, c, *lead, last)
        if w.shape[-1] < pl.shifts:
            w = xp.concatenate([w, xp.zeros(w.shape[:-1] + (pl.shifts - w.shape[-1],),
                                            dtype=w.dtype)], axis=-1)
        lead = tuple(range(3, w.ndim - 1))
        w = w.transpose((0,) + lead + ((2, 1) if transposed else (1, 2)) + (w.ndim - 1,))
        out.append((index, taps, xp.ascontiguousarray(w).reshape(w.shape[:-2] + (-1,))))
    return out


def _lead(taps):
    """A phase's tap counts on every axis but the last."""
    return tuple(t[2] for t in taps[:-1])


def _product(xp, w, view, out, parts, first):
    """``w @ view`` over the lead tap axes, summed into ``out`` ``(g, rows, L)`` (set
    when ``first``, else added), through ``parts`` when there are lead taps."""
    g = out.shape[0]
    lead = view.shape[1:-2]
    count = math.prod(lead)
    if count == 1 and first:
        _matmul(xp, w.reshape(out.shape[:2] + w.shape[-1:]),
                view.reshape((g,) + view.shape[-2:]), out)
        return
    p = parts[:g, :count]
    _matmul(xp, w, view, p.reshape((g,) + lead + out.shape[1:]))
    rest = range(count)
    if first:
        xp.add(p[:, 0], p[:, 1], out=out)
        rest = range(2, count)
    for i in rest:
        xp.add(out, p[:, i], out=out)


def _gather(xp, X, chans, pl, buf):
    """The phase planes of input channels ``chans`` into ``buf`` ``(S, n, P)``."""
    n, N = chans.stop - chans.start, X.shape[0]
    for index, xs, qs in pl.regions():
        pl.view(buf[index], n, N)[(slice(None), slice(None)) + qs] = \
            xp.swapaxes(X[(slice(None), chans) + xs], 0, 1)


def _place(xp, dY, chans, pl, rows):
    """Output gradients of channels ``chans`` laid out as planes into ``rows`` ``(n, P)``."""
    n = chans.stop - chans.start
    pl.view(rows, n, dY.shape[0])[pl.valid()] = xp.swapaxes(dY[:, chans], 0, 1)


def _taps_forward(xp, X, W, group, pl, Y, B=None):
    """Conv into ``Y``; whether it added the bias ``B`` too (the compiled kernels do)."""
    if _compiled(xp, W.shape, W.dtype) and (B is None or B.dtype == Y.dtype):
        _compiled_forward(xp, X, W, group, pl, Y, B)
        return B is not None
    N, (M, cg) = X.shape[0], W.shape[:2]
    mg = M // group
    phases = _phase_matrices(xp, W.reshape((group, mg, cg) + tuple(W.shape[2:])), pl, False)
    lead = max([math.prod(_lead(taps)) for _, taps, _ in phases] + [1])
    L, P, item, shifts = pl.length, pl.size, X.itemsize, pl.shifts

    def buffers(tile):
        return (xp.zeros((len(pl.phases), tile * cg, shifts, P), dtype=X.dtype),
                xp.empty((tile * mg, P), dtype=X.dtype),
                xp.empty((tile, lead, mg, L), dtype=X.dtype))

    def task(gs, bufs):
        xs, yext, parts = bufs
        gb = gs.stop - gs.start
        n = gb * cg
        _gather(xp, X, slice(gs.start * cg, gs.stop * cg), pl, xs[:, :, 0])
        for v in range(1, shifts):
            shift = v * pl.shift_step
            xs[:, :n, v, :P - shift] = xs[:, :n, 0, shift:]
        out = yext[:gb * mg, :L].reshape(gb, mg, L)
        for i, (index, taps, w) in enumerate(phases):
            shape = (gb,) + _lead(taps) + (cg * shifts, L)
            steps = (cg * xs.strides[1],) + pl.tap_strides(taps, item) + (xs.strides[2], item)
            view = xp.lib.stride_tricks.as_strided(xs[index, 0, 0, pl.base(taps):], shape=shape,
                                                   strides=steps)
            _product(xp, w[gs], view, out, parts, i == 0)
        if not phases:                                         # no tap reads the input
            out[...] = 0
        Y[:, gs.start * mg:gs.stop * mg] = xp.swapaxes(
            pl.view(yext, gb * mg, N)[pl.valid()], 0, 1)

    per_group = (len(pl.phases) * cg * shifts + mg + lead * mg) * P
    _run(xp, group, max(1, TAPS_TILE // per_group), Y.size * math.prod(W.shape[2:]) * cg,
         buffers, task)
    return False


def _taps_input_grad(xp, dY, W, group, pl, dX):
    if _compiled(xp, W.shape, W.dtype):
        _compiled_input_grad(xp, dY, W, group, pl, dX)
        return
    N, (M, cg) = dY.shape[0], W.shape[:2]
    mg = M // group
    phases = _phase_matrices(xp, W.reshape((group, mg, cg) + tuple(W.shape[2:])), pl, True)
    lead = max([math.prod(_lead(taps)) for _, taps, _ in phases] + [1])
    P, item, margin, shifts = pl.size, dY.itemsize, pl.margin, pl.shifts

    def buffers(tile):
        return (xp.zeros((tile * mg, shifts, margin + P), dtype=dY.dtype),
                xp.zeros((len(pl.phases), tile * cg, P), dtype=dY.dtype),
                xp.empty((tile, lead, cg, P), dtype=dY.dtype))

    def task(gs, bufs):
        dys, dxp, parts = bufs
        gb = gs.stop - gs.start
        n = gb * mg
        _place(xp, dY, slice(gs.start * mg, gs.stop * mg), pl, dys[:, 0, margin:])
        for v in range(1, shifts):
            shift = v * pl.shift_step
            dys[:n, v, shift:] = dys[:n, 0, :margin + P - shift]
        for index, taps, w in phases:                          # phases no tap reads stay 0
            shape = (gb,) + _lead(taps) + (mg * shifts, P)
            steps = (mg * dys.strides[0],) + pl.tap_strides(taps, item, -1) + (dys.strides[1],
                                                                               item)
            view = xp.lib.stride_tricks.as_strided(dys[0, 0, margin - pl.base(taps):],
                                                   shape=shape, strides=steps)
            _product(xp, w[gs], view, dxp[index, :gb * cg].reshape(gb, cg, P), parts, True)
        chans = slice(gs.start * cg, gs.stop * cg)
        for index, xs, qs in pl.regions():
            dX[(slice(None), chans) + xs] = xp.swapaxes(
                pl.view(dxp[index], gb * cg, N)[(slice(None), slice(None)) + qs], 0, 1)

    per_group = (mg * shifts + len(pl.phases) * cg + lead * cg) * (margin + P)
    _run(xp, group, max(1, TAPS_TILE // per_group), dY.size * math.prod(W.shape[2:]) * cg,
         buffers, task)


def _taps_weight_grad(xp, dY, X, group, pl, dW):
    if _compiled(xp, dW.shape, dW.dtype):
        _compiled_weight_grad(xp, dY, X, group, pl, dW)
        return
    cg, mg = X.shape[1] // group, dY.shape[1] // group
    kernel = tuple(dW.shape[2:])
    dW4 = dW.reshape(group, mg, cg, math.prod(kernel))
    L, P = pl.length, pl.size
    reads = []                                 # per tap: phase index and flat offset
    for tap in itertools.product(*(range(k) for k in kernel)):
        reach = [tap[i] * d for i, d in enumerate(pl.dilations)]
        phase = tuple(r % s for r, s in zip(reach, pl.strides))
        reads.append((pl.phases.index(phase),
                      sum(r // s * f for r, s, f in zip(reach, pl.strides, pl.flat))))

    def buffers(tile):
        return (xp.zeros((len(pl.phases), tile * cg, P), dtype=X.dtype),
                xp.zeros((tile * mg, P), dtype=X.dtype))

    def task(gs, bufs):
        xph, dye = bufs
        gb = gs.stop - gs.start
        _gather(xp, X, slice(gs.start * cg, gs.stop * cg), pl, xph)
        _place(xp, dY, slice(gs.start * mg, gs.stop * mg), pl, dye)
        d = dye[:gb * mg, :L].reshape(gb, mg, L)
        for t, (index, offset) in enumerate(reads):
            view = xph[index, :gb * cg, offset:offset + L].reshape(gb, cg, L)
            _matmul(xp, d, xp.swapaxes(view, -1, -2), dW4[gs, :, :, t])

    _run(xp, group, max(1, TAPS_TILE // ((len(pl.phases) * cg + mg) * P)),
         dY.size * math.prod(kernel) * cg, buffers, task)


# -- taps method: compiled kernels ------------------------------------------------------------
#
# Layers of few input channels per group (up to :data:`COMPILED_MAX_CHANNELS_PER_GROUP`:
# depthwise and small-group layers) run, where compiled kernels are
# available, as loops over each channel's planes, a few batch items at a time.  Their
# input rows are copied behind their padding into row-phase planes (row ``iy`` to phase
# ``(iy + ph) % sh``, row ``(iy + ph) // sh``; columns keep their padded place), one
# buffer per kernel call whose padding positions stay zero.  A *tap* is an input
# channel of the group and a kernel position: it reads one flat run of a phase plane
# for the extended output planes (output column ``ox`` at place ``ox·sw``, the places
# between computed and not read: along columns the kernels compute ``sw`` times the
# outputs, which lets every run read consecutive positions).  The runs span the planes
# of several items, so that the loops are long and vectorised.
#
# The forward pass sums the weighted runs of a group's taps into each output channel,
# four taps and two output channels per loop, so that a loop loads and stores its
# outputs once per four taps and loads each run once for two outputs; the input
# gradient is the adjoint, each tap of each of the group's output channels adding its
# weight times the output-gradient planes into the run it read; the weight gradient
# is, per tap, the dot product of an output channel's gradient planes with the run the
# tap read, four taps per loop.  Every sum runs in a fixed order: taps in the order of
# the weight's axes, output channels in order, passes in batch order.  The kernels
# take a range of output channels (forward pass, weight gradient) or of input channels
# (input gradient), and the forward pass and input gradient a range of batch items (the
# weight gradient sums over the whole batch); one range per thread runs on the thread
# pool (:func:`_run_compiled`), no call writes another's outputs and no sum crosses
# calls, so results do not depend on the number of threads.


def _compiled(xp, w_shape, dtype):
    """Whether the taps method runs a layer as compiled loops: up to
    :data:`COMPILED_MAX_CHANNELS_PER_GROUP` input channels per group (any number of
    outputs), 1-D or 2-D, float32 or float64, with compiled kernels available."""
    return (w_shape[1] <= COMPILED_MAX_CHANNELS_PER_GROUP and len(w_shape) in (3, 4)
            and compiled.available(xp) and np.dtype(dtype) in (np.float32, np.float64))


def _row_table(H, sh, ph, qh, wp, pw):
    """Where input row ``iy`` lies in the row-phase planes (``qh`` rows of ``wp``
    padded columns, ``ph`` and ``pw`` padding before): (its phase, the flat place of
    its first column)."""
    rows = np.empty((H, 2), dtype=np.int64)
    for iy in range(H):
        rows[iy, 0] = (iy + ph) % sh
        rows[iy, 1] = (iy + ph) // sh * wp + pw
    return rows


@compiled.helper
def _load_rows(X, n0, nb, channel, rows, plane, xph, phase0):
    """The rows of input ``channel`` of the items ``[n0, n0 + nb)`` of ``X`` into the
    row-phase planes ``xph`` (rows ``phase0 + phase``), behind their padding: item
    ``b``'s plane starts at ``b·plane`` (:func:`_row_table` places each row)."""
    Wd = X.shape[3]
    for b in range(nb):
        for iy in range(X.shape[2]):
            x = X[n0 + b, channel, iy]
            first = b * plane + rows[iy, 1]
            dst = xph[phase0 + rows[iy, 0], first:first + Wd]
            for i in range(Wd):
                dst[i] = x[i]


@compiled.helper
def _lay_rows(dY, n0, nb, channel, plane, wp, sw, out):
    """The output-gradient rows of ``channel`` of the items ``[n0, n0 + nb)`` of ``dY``
    into the extended planes ``out`` (1-D): output column ``ox`` of row ``oy`` of item
    ``b`` at ``b·plane + oy·wp + ox·sw``; the places between are left as they are
    (zero)."""
    OH, OW = dY.shape[2], dY.shape[3]
    for b in range(nb):
        for oy in range(OH):
            d = dY[n0 + b, channel, oy]
            row = out[b * plane + oy * wp:]
            if sw == 1:
                for ox in range(OW):
                    row[ox] = d[ox]
            else:
                for ox in range(OW):
                    row[ox * sw] = d[ox]


@compiled.helper
def _group_ranges(start, stop, per):
    """The channels ``[start, stop)`` cut at group bounds (``per`` channels a group):
    rows ``(group, first, past the last)``."""
    groups = np.empty(((stop - 1) // per - start // per + 1 if stop > start else 0, 3),
                      dtype=np.int64)
    lo = start
    for r in range(groups.shape[0]):
        g = lo // per
        hi = min(stop, (g + 1) * per)
        groups[r, 0], groups[r, 1], groups[r, 2] = g, lo, hi
        lo = hi
    return groups


@compiled.helper
def _run_length(nb, plane, OH, OW, wp, sw):
    """The positions a tap's run spans over the extended planes of ``nb`` items: up to
    the place of the last item's last output."""
    return (nb - 1) * plane + (OH - 1) * wp + (OW - 1) * sw + 1


@compiled.helper
def _tap_sources(taps, T, sh):
    """Per column ``t`` of a group's weights (input channel ``t // K``, kernel position
    ``t % K``): the row of the row-phase planes it reads and its offset there."""
    K = taps.shape[0]
    src = np.empty((T, 2), dtype=np.int64)
    for t in range(T):
        src[t, 0] = t // K * sh + taps[t % K, 0]
        src[t, 1] = taps[t % K, 1]
    return src


@compiled.kernel
def _direct_forward_kernel(X, W, bias, Y, taps, sh, sw, rows, qh, wp, items, start, stop,
                           n_start, n_stop):
    """Conv of the output channels in ``[start, stop)`` for the batch items in
    ``[n_start, n_stop)``: ``X`` ``(N, C, H, W)``, ``W`` ``(M, c·K)`` (``c`` input
    channels per group, ``K`` kernel positions), plus ``bias`` ``(M,)`` unless it is
    empty (added to each sum, as an addition after the Conv would), ``Y``
    ``(N, M, OH, OW)``; per kernel
    position its phase and its flat offset in the phase plane (``taps`` ``(K, 2)``),
    strides ``sh, sw``; row-phase planes of ``qh × wp`` positions (``rows`` from
    :func:`_row_table`), ``items`` batch items per pass."""
    C = X.shape[1]
    M, T = W.shape
    OH, OW = Y.shape[2], Y.shape[3]
    K = taps.shape[0]
    c = T // K
    m = M // (C // c)
    plane = qh * wp
    biased = bias.shape[0] > 0
    xph = np.zeros((c * sh, items * plane), dtype=X.dtype)
    yext = np.empty((2, items * plane), dtype=Y.dtype)
    src = _tap_sources(taps, T, sh)                     # per column: its row of xph, offset
    fours = T - T % 4
    groups = _group_ranges(start, stop, m)
    for r in range(groups.shape[0]):
        g, oc0, oc1 = groups[r, 0], groups[r, 1], groups[r, 2]
        for n0 in range(n_start, n_stop, items):
            nb = min(items, n_stop - n0)
            length = _run_length(nb, plane, OH, OW, wp, sw)
            for ci in range(c):
                _load_rows(X, n0, nb, g * c + ci, rows, plane, xph, ci * sh)
            for oc in range(oc0, oc1, 2):
                w = W[oc]
                if oc + 1 < oc1:                        # two output channels
                    v = W[oc + 1]
                    for t in range(0, fours, 4):
                        s0 = xph[src[t, 0], src[t, 1]:src[t, 1] + length]
                        s1 = xph[src[t + 1, 0], src[t + 1, 1]:src[t + 1, 1] + length]
                        s2 = xph[src[t + 2, 0], src[t + 2, 1]:src[t + 2, 1] + length]
                        s3 = xph[src[t + 3, 0], src[t + 3, 1]:src[t + 3, 1] + length]
                        w0, w1, w2, w3 = w[t], w[t + 1], w[t + 2], w[t + 3]
                        v0, v1, v2, v3 = v[t], v[t + 1], v[t + 2], v[t + 3]
                        if t == 0:
                            for i in range(length):
                                a0, a1, a2, a3 = s0[i], s1[i], s2[i], s3[i]
                                yext[0, i] = w0 * a0 + w1 * a1 + w2 * a2 + w3 * a3
                                yext[1, i] = v0 * a0 + v1 * a1 + v2 * a2 + v3 * a3
                        else:
                            for i in range(length):
                                a0, a1, a2, a3 = s0[i], s1[i], s2[i], s3[i]
                                yext[0, i] = yext[0, i] + w0 * a0 + w1 * a1 + w2 * a2 + w3 * a3
                                yext[1, i] = yext[1, i] + v0 * a0 + v1 * a1 + v2 * a2 + v3 * a3
                    for t in range(fours, T):
                        s0 = xph[src[t, 0], src[t, 1]:src[t, 1] + length]
                        w0, v0 = w[t], v[t]
                        if t == 0:
                            for i in range(length):
                                yext[0, i] = w0 * s0[i]
                                yext[1, i] = v0 * s0[i]
                        else:
                            for i in range(length):
                                yext[0, i] += w0 * s0[i]
                                yext[1, i] += v0 * s0[i]
                else:
                    y0 = yext[0]
                    for t in range(0, fours, 4):
                        s0 = xph[src[t, 0], src[t, 1]:src[t, 1] + length]
                        s1 = xph[src[t + 1, 0], src[t + 1, 1]:src[t + 1, 1] + length]
                        s2 = xph[src[t + 2, 0], src[t + 2, 1]:src[t + 2, 1] + length]
                        s3 = xph[src[t + 3, 0], src[t + 3, 1]:src[t + 3, 1] + length]
                        w0, w1, w2, w3 = w[t], w[t + 1], w[t + 2], w[t + 3]
                        if t == 0:
                            for i in range(length):
                                y0[i] = w0 * s0[i] + w1 * s1[i] + w2 * s2[i] + w3 * s3[i]
                        else:
                            for i in range(length):
                                y0[i] = y0[i] + w0 * s0[i] + w1 * s1[i] + w2 * s2[i] + w3 * s3[i]
                    for t in range(fours, T):
                        s0 = xph[src[t, 0], src[t, 1]:src[t, 1] + length]
                        w0 = w[t]
                        if t == 0:
                            for i in range(length):
                                y0[i] = w0 * s0[i]
                        else:
                            for i in range(length):
                                y0[i] += w0 * s0[i]
                for o in range(oc, min(oc + 2, oc1)):
                    for b in range(nb):
                        for oy in range(OH):
                            y = Y[n0 + b, o, oy]
                            out = yext[o - oc, b * plane + oy * wp:]
                            if biased:
                                bo = bias[o]
                                if sw == 1:
                                    for ox in range(OW):
                                        y[ox] = out[ox] + bo
                                else:
                                    for ox in range(OW):
                                        y[ox] = out[ox * sw] + bo
                            elif sw == 1:
                                for ox in range(OW):
                                    y[ox] = out[ox]
                            else:
                                for ox in range(OW):
                                    y[ox] = out[ox * sw]


@compiled.kernel
def _direct_input_grad_kernel(dY, W, dX, taps, sh, sw, rows, qh, wp, items, start, stop,
                              n_start, n_stop):
    """The input gradient ``dX`` ``(N, C, H, W)`` of :func:`_direct_forward_kernel` for
    the input channels in ``[start, stop)`` and the batch items in ``[n_start, n_stop)``,
    given ``dY``: the adjoint, each tap of each of the group's output channels adding
    its weight times the extended output-gradient planes (zero at the places of no
    output) into the run of the row-phase planes it read, whose rows then go back in
    place."""
    N, M, OH, OW = dY.shape
    C, H, Wd = dX.shape[1], dX.shape[2], dX.shape[3]
    K = taps.shape[0]
    c = W.shape[1] // K
    m = M // (C // c)
    plane = qh * wp
    dyext = np.zeros((m, items * plane), dtype=dY.dtype)
    dxph = np.empty((sh, items * plane), dtype=dX.dtype)
    groups = _group_ranges(start, stop, c)
    for r in range(groups.shape[0]):
        g, ci0, ci1 = groups[r, 0], groups[r, 1], groups[r, 2]
        for n0 in range(n_start, n_stop, items):
            nb = min(items, n_stop - n0)
            length = _run_length(nb, plane, OH, OW, wp, sw)
            for j in range(m):
                _lay_rows(dY, n0, nb, g * m + j, plane, wp, sw, dyext[j])
            for ci in range(ci0, ci1):
                column = (ci - g * c) * K
                dxph[:, :nb * plane] = 0
                for j in range(m):
                    w = W[g * m + j]
                    src = dyext[j]
                    for k in range(K):
                        offset = taps[k, 1]
                        dst = dxph[taps[k, 0], offset:offset + length]
                        wk = w[column + k]
                        for i in range(length):
                            dst[i] += wk * src[i]
                for b in range(nb):
                    for iy in range(H):
                        x = dX[n0 + b, ci, iy]
                        first = b * plane + rows[iy, 1]
                        ph = dxph[rows[iy, 0], first:first + Wd]
                        for i in range(Wd):
                            x[i] = ph[i]


@compiled.kernel(reassociate=True)
def _direct_weight_grad_kernel(dY, X, dW, zero, taps, sh, sw, rows, qh, wp, items, start,
                               stop):
    """The weight gradient ``dW`` ``(M, c·K)`` of :func:`_direct_forward_kernel` for the
    output channels in ``[start, stop)``: per tap and pass, the dot product of the
    extended output-gradient planes (zero at the places of no output) with the run of
    the row-phase planes the tap read, four taps per loop, summed in ``X``'s type
    (``zero``, vectorised); the passes' sums in float64 in batch order."""
    N, M, OH, OW = dY.shape
    C = X.shape[1]
    T = dW.shape[1]
    K = taps.shape[0]
    c = T // K
    m = M // (C // c)
    plane = qh * wp
    xph = np.zeros((c * sh, items * plane), dtype=X.dtype)
    dyext = np.zeros(items * plane, dtype=dY.dtype)
    src = _tap_sources(taps, T, sh)                     # per column: its row of xph, offset
    fours = T - T % 4
    groups = _group_ranges(start, stop, m)
    for r in range(groups.shape[0]):
        g, oc0, oc1 = groups[r, 0], groups[r, 1], groups[r, 2]
        acc = np.zeros((oc1 - oc0, T))
        for n0 in range(0, N, items):
            nb = min(items, N - n0)
            length = _run_length(nb, plane, OH, OW, wp, sw)
            for ci in range(c):
                _load_rows(X, n0, nb, g * c + ci, rows, plane, xph, ci * sh)
            for oc in range(oc0, oc1):
                _lay_rows(dY, n0, nb, oc, plane, wp, sw, dyext)
                a = acc[oc - oc0]
                for t in range(0, fours, 4):
                    s0 = xph[src[t, 0], src[t, 1]:src[t, 1] + length]
                    s1 = xph[src[t + 1, 0], src[t + 1, 1]:src[t + 1, 1] + length]
                    s2 = xph[src[t + 2, 0], src[t + 2, 1]:src[t + 2, 1] + length]
                    s3 = xph[src[t + 3, 0], src[t + 3, 1]:src[t + 3, 1] + length]
                    r0 = r1 = r2 = r3 = zero
                    for i in range(length):
                        d = dyext[i]
                        r0 += d * s0[i]
                        r1 += d * s1[i]
                        r2 += d * s2[i]
                        r3 += d * s3[i]
                    a[t] += r0
                    a[t + 1] += r1
                    a[t + 2] += r2
                    a[t + 3] += r3
                for t in range(fours, T):
                    s0 = xph[src[t, 0], src[t, 1]:src[t, 1] + length]
                    r0 = zero
                    for i in range(length):
                        r0 += dyext[i] * s0[i]
                    a[t] += r0
        for oc in range(oc0, oc1):
            for t in range(T):
                dW[oc, t] = acc[oc - oc0, t]


def _planes_2d(A):
    """``A`` ``(N, C, *sp)`` as a contiguous ``(N, C, H, W)`` array (1-D: rows of one);
    a view of ``A`` where it is contiguous, so that kernels write into it."""
    A = np.ascontiguousarray(A)
    return A if A.ndim == 4 else A.reshape(A.shape[:2] + (1,) + A.shape[2:])


def _weights_2d(W):
    """``W`` ``(M, c, *kernel)`` as a contiguous ``(M, c·K)`` array, a view of ``W``
    where it is contiguous."""
    return np.ascontiguousarray(W).reshape(W.shape[0], -1)


def _geometry_2d(pl, kernel, planes, pass_size):
    """The kernels' arguments after the arrays: per kernel position its phase and flat
    offset in the phase plane (a ``(K, 2)`` table), strides along rows and columns, the
    table of :func:`_row_table`, the extent of the row-phase planes (``qh`` rows of
    ``wp`` padded columns, and more) and the batch items per pass, whose ``planes``
    channel planes (of every phase) hold about ``pass_size`` elements
    (:data:`COMPILED_PASS`); a 1-D layout has rows of one.  The two tables are
    read-only: plans keep them for every later call (:func:`_compiled_plan`), and the
    kernels only read them."""
    s, d, b, q = pl.strides, pl.dilations, pl.begin, pl.q
    H = pl.sp[0] if len(s) == 2 else 1
    if len(s) == 1:
        s, d, b, q, kernel = (1,) + s, (1,) + d, (0,) + b, (1,) + q, (1,) + kernel
    wp = q[1] * s[1]
    taps = np.array([((ky * d[0]) % s[0], (ky * d[0]) // s[0] * wp + kx * d[1])
                     for ky in range(kernel[0]) for kx in range(kernel[1])],
                    dtype=np.int64).reshape(-1, 2)
    rows = _row_table(H, s[0], b[0], q[0], wp, b[1])
    taps.flags.writeable = rows.flags.writeable = False
    batch = pl.size // math.prod(pl.q)
    items = max(1, min(batch, pass_size // (planes * s[0] * q[0] * wp)))
    return taps, s[0], s[1], rows, q[0], wp, items


def _calls(channels, batch, tasks):
    """Ranges ``(start, stop[, n_start, n_stop])`` of ``channels`` and, where ``batch``
    is not None, of its items, ``tasks`` of them at most, that cover every (channel,
    item) pair once in near-equal parts: ranges of the items (all channels each) where
    the batch has ``tasks`` items or more; ranges of the channels where there is no
    batch; else the grid of item and channel ranges whose largest range holds the
    fewest pairs (among equals, the one of most item ranges)."""
    if batch is None:
        return tuple((c.start, c.stop) for c in split(channels, tasks))
    if batch >= tasks:
        return tuple((0, channels, n.start, n.stop) for n in split(batch, tasks))

    def largest(p):                            # pairs of a grid's largest range
        return -(-batch // p) * -(-channels // min(channels, tasks // p))

    p = min(range(1, batch + 1), key=lambda p: (largest(p), -p))
    return tuple((c.start, c.stop, n.start, n.stop) for n in split(batch, p)
                 for c in split(channels, min(channels, tasks // p)))


class _Plan:
    """How a compiled kernel runs a layer: its arguments after the arrays
    (:func:`_geometry_2d`) and the ranges of its calls, one call per task
    (:func:`_calls`).  Made once per layer shape, settings and thread count
    (:func:`_compiled_plan`); hashed by identity, it names its calls to
    :func:`onnxgrad.threads.parallel` (which times where they run best)."""

    __slots__ = ("geometry", "calls")

    def __init__(self, geometry, calls):
        self.geometry, self.calls = geometry, calls


@functools.lru_cache(maxsize=256)
def _compiled_plan(pl, kernel, planes, channels, batch, work, threads, settings):
    """The :class:`_Plan` of a compiled kernel over ``channels`` and, where ``batch`` is
    not None, its items: for phase planes ``pl`` (from :func:`_planes`: one object per
    layer shape while remembered), a kernel of extent ``kernel``, ``planes`` channel
    planes per pass and ``work`` multiply-adds, on ``threads`` threads, with the
    module's ``settings`` (:data:`COMPILED_PASS`, :data:`PARALLEL_MIN_WORK`,
    :data:`COMPILED_PART`, :data:`MAX_TASKS`, in the key so that a change of them
    takes effect).  One call over everything, or with ``PARALLEL_MIN_WORK``
    multiply-adds or more one call per thread, of ``COMPILED_PART`` at least and
    ``MAX_TASKS`` calls at most.  Of the last 256 plans (a network's layers, forward
    and backward, at a few input shapes and thread counts)."""
    pass_size, min_work, part, most = settings
    tasks = max(1, min(threads, most, work // part)) if work >= min_work else 1
    calls = (_calls(channels, batch, tasks) if tasks > 1 else
             ((0, channels) + (() if batch is None else (0, batch)),))
    return _Plan(_geometry_2d(pl, kernel, planes, pass_size), calls)


def _run_compiled(kernel, arrays, pl, kernel_shape, planes, channels, batch, work):
    """``kernel(*arrays, *geometry, start, stop[, n_start, n_stop])`` over ``channels``
    and, where ``batch`` is not None, its items, as their plan says
    (:func:`_compiled_plan`): in one call, or with :data:`PARALLEL_MIN_WORK`
    multiply-adds of ``work`` or more, in one call per thread, each a near-equal range
    of the batch's items (every channel), or of the channels where there is no batch to
    split or fewer items than threads (:func:`_calls`), run as parallel tasks.  The
    kernels compute each output element by the same loop whichever call holds it, and
    no sum crosses calls, so the results are the same bits however the ranges are cut;
    they may therefore follow the thread count, unlike the NumPy forms' tiles: no
    thread waits on another's extra part, and every task is one call (each call costs
    the interpreter lock, which the pool's threads share)."""
    plan = _compiled_plan(pl, kernel_shape, planes, channels, batch, work, get_num_threads(),
                          (COMPILED_PASS, PARALLEL_MIN_WORK, COMPILED_PART, MAX_TASKS))
    args = arrays + plan.geometry
    if len(plan.calls) == 1:
        kernel(*args, *plan.calls[0])
    else:
        parallel([functools.partial(kernel, *args, *r) for r in plan.calls], (kernel, plan))


def _compiled_forward(xp, X, W, group, pl, Y, B=None):
    M, c = W.shape[:2]
    bias = np.ascontiguousarray(B) if B is not None else np.empty(0, dtype=Y.dtype)
    _run_compiled(_direct_forward_kernel, (_planes_2d(X), _weights_2d(W), bias, _planes_2d(Y)),
                  pl, W.shape[2:], c, M, X.shape[0], Y.size * math.prod(W.shape[1:]))


def _compiled_input_grad(xp, dY, W, group, pl, dX):
    M, c = W.shape[:2]
    _run_compiled(_direct_input_grad_kernel, (_planes_2d(dY), _weights_2d(W), _planes_2d(dX)),
                  pl, W.shape[2:], M // group, dX.shape[1], dY.shape[0],
                  dY.size * math.prod(W.shape[1:]))


def _compiled_weight_grad(xp, dY, X, group, pl, dW):
    # the output channels' ranges only: each sums over the whole batch, in passes from
    # its first item whatever the range
    _run_compiled(_direct_weight_grad_kernel,
                  (_planes_2d(dY), _planes_2d(X), _weights_2d(dW), X.dtype.type(0)),
                  pl, dW.shape[2:], dW.shape[1], dW.shape[0], None,
                  dY.size * math.prod(dW.shape[1:]))


# -- dense method ----------------------------------------------------------------------------


@functools.lru_cache(maxsize=64)
def _tap_reads(xp, sp, kernel, strides, dilations, begin, out):
    """Per kernel tap and output position, the input position read (flat, 0 where the
    tap reads padding) and whether it lies in the input: two ``(taps, Pout)`` arrays."""
    grids = xp.meshgrid(*(xp.arange(n) for n in out), indexing="ij")
    reads, inside = [], []
    for tap in itertools.product(*(range(k) for k in kernel)):
        flat, ok = 0, True
        for i, grid in enumerate(grids):
            x = grid * strides[i] + tap[i] * dilations[i] - begin[i]
            flat = flat * sp[i] + x
            ok = ok & (x >= 0) & (x < sp[i])
        reads.append(xp.where(ok, flat, 0).reshape(-1))
        inside.append(ok.reshape(-1))
    return xp.stack(reads), xp.stack(inside)


@functools.lru_cache(maxsize=64)
def _tap_map(xp, dtype, sp, kernel, strides, dilations, begin, out, transposed):
    """``S`` ``(taps, Pin·Pout)``: 1 where an output position reads an input position
    through a tap (input-major, or output-major when ``transposed``)."""
    reads, inside = _tap_reads(xp, sp, kernel, strides, dilations, begin, out)
    taps, p_out = reads.shape
    S = xp.zeros((taps, p_out, math.prod(sp)) if transposed else
                 (taps, math.prod(sp), p_out), dtype=dtype)
    t, o = xp.nonzero(inside)
    if transposed:
        S[t, o, reads[t, o]] = 1
    else:
        S[t, reads[t, o], o] = 1
    return S.reshape(taps, -1)


def _dense_setup(xp, W, group, sp, out, geometry, transposed):
    M, cg = W.shape[:2]
    S = _tap_map(xp, W.dtype, tuple(sp), tuple(W.shape[2:]), *geometry, tuple(out), transposed)
    tile = max(1, DENSE_TILE // (M // group * cg * math.prod(sp) * math.prod(out)))
    return M // group, cg, W.reshape(group, -1, S.shape[0]), S, tile


def _matrices(xp, W3, gs, S, buf):
    """``W @ S`` for the groups ``gs``, as one product into ``buf``: ``(g·m·c, Pin·Pout)``."""
    rows = (gs.stop - gs.start) * W3.shape[1]
    _matmul(xp, W3[gs].reshape(rows, -1), S, buf[:rows])
    return buf[:rows]


def _dense_forward(xp, X, W, group, geometry, Y):
    N, sp, out = X.shape[0], X.shape[2:], Y.shape[2:]
    mg, cg, W3, S, tile = _dense_setup(xp, W, group, sp, out, geometry, False)
    p_in, p_out = math.prod(sp), math.prod(out)
    Xv = X.reshape(N, group, 1, cg * p_in)
    Yv = Y.reshape(N, group, mg, p_out)

    def buffers(tile):
        return xp.empty((tile * mg * cg, p_in * p_out), dtype=X.dtype)

    def task(gs, buf):
        T = _matrices(xp, W3, gs, S, buf).reshape(-1, mg, cg * p_in, p_out)
        _matmul(xp, Xv[:, gs].transpose(1, 2, 0, 3), T, Yv[:, gs].transpose(1, 2, 0, 3))

    _run(xp, group, tile, Y.size * W3.shape[2] * cg, buffers, task)


def _dense_input_grad(xp, dY, W, group, geometry, dX):
    N, sp, out = dY.shape[0], dX.shape[2:], dY.shape[2:]
    mg, cg, W3, S, tile = _dense_setup(xp, W, group, sp, out, geometry, True)
    p_in, p_out = math.prod(sp), math.prod(out)
    dYv = dY.reshape(N, group, mg * p_out)
    dXv = dX.reshape(N, group, cg * p_in)

    def buffers(tile):
        return xp.empty((tile * mg * cg, p_in * p_out), dtype=dY.dtype)

    def task(gs, buf):
        T = _matrices(xp, W3, gs, S, buf).reshape(-1, mg, cg, p_out, p_in)
        if cg > 1:                             # rows (m, Pout), columns (c, Pin)
            T = xp.ascontiguousarray(xp.swapaxes(T, 2, 3))
        T = T.reshape(-1, mg * p_out, cg * p_in)
        _matmul(xp, dYv[:, gs].transpose(1, 0, 2), T, dXv[:, gs].transpose(1, 0, 2))

    _run(xp, group, tile, dY.size * W3.shape[2] * cg, buffers, task)


def _dense_weight_grad(xp, dY, X, group, geometry, dW):
    N, sp, out = X.shape[0], X.shape[2:], dY.shape[2:]
    mg, cg = dY.shape[1] // group, X.shape[1] // group
    p_in, p_out = math.prod(sp), math.prod(out)
    reads, inside = _tap_reads(xp, tuple(sp), tuple(dW.shape[2:]), *geometry, tuple(out))
    cols = reads * p_out + xp.arange(p_out)                  # entries of (Pin, Pout) per tap
    inside = inside.astype(dW.dtype)
    Xv = X.reshape(N, group, 1, cg * p_in)
    dYv = dY.reshape(N, group, mg, p_out)
    dW2 = dW.reshape(group * mg * cg, reads.shape[0])

    def buffers(tile):
        return xp.empty((tile, mg, cg * p_in, p_out), dtype=dY.dtype)

    def task(gs, buf):
        # dT = Xᵀ @ dY per group, then per tap the sum of its entries: (dT @ Sᵀ) as a
        # gather, which runs no BLAS product too small to thread well.
        D = buf[:gs.stop - gs.start]
        _matmul(xp, Xv[:, gs].transpose(1, 2, 3, 0), dYv[:, gs].transpose(1, 2, 0, 3), D)
        entries = xp.take(D.reshape(-1, p_in * p_out), cols, axis=1)    # (g·m·c, taps, Pout)
        _einsum(xp, "rtp,tp->rt", entries, inside, dW2[gs.start * mg * cg:gs.stop * mg * cg])

    tile = max(1, DENSE_TILE // (mg * cg * p_in * p_out))
    _run(xp, group, tile, dY.size * reads.shape[0] * cg, buffers, task)


# -- entry points ----------------------------------------------------------------------------


def conv(xp, X, W, group, strides, dilations, begin, end, out, B=None):
    """Conv of ``X`` ``(N, C, *sp)`` with ``W`` ``(M, C/group, *kernel)``, plus the bias
    ``B`` ``(M,)`` where given: ``(N, M, *out)``."""
    Y = xp.empty((X.shape[0], W.shape[0]) + tuple(out), dtype=X.dtype)
    if Y.size == 0:
        return Y
    if _dense(xp, X.shape[2:], out, W.shape, group, X.dtype):
        _dense_forward(xp, X, W, group, (tuple(strides), tuple(dilations), tuple(begin)), Y)
    else:
        pl = _planes(X.shape[0], X.shape[2:], W.shape[2:], tuple(strides), tuple(dilations),
                     tuple(begin), tuple(end), tuple(out))
        if _taps_forward(xp, X, W, group, pl, Y, B):
            return Y
    if B is not None:
        Y += B.reshape((1, -1) + (1,) * (Y.ndim - 2))
    return Y


def input_grad(xp, dY, W, group, sp, strides, dilations, begin, end):
    """The gradient ``(N, C, *sp)`` of Conv's input given its output gradient ``dY``."""
    dX = xp.empty((dY.shape[0], W.shape[1] * group) + tuple(sp), dtype=dY.dtype)
    if dX.size == 0:
        return dX
    if _dense(xp, sp, dY.shape[2:], W.shape, group, dY.dtype):
        _dense_input_grad(xp, dY, W, group, (tuple(strides), tuple(dilations), tuple(begin)), dX)
    else:
        pl = _planes(dY.shape[0], tuple(sp), W.shape[2:], tuple(strides), tuple(dilations),
                     tuple(begin), tuple(end), dY.shape[2:])
        _taps_input_grad(xp, dY, W, group, pl, dX)
    return dX


def weight_grad(xp, dY, X, group, kernel, strides, dilations, begin, end):
    """The gradient ``(M, C/group, *kernel)`` of Conv's weight given ``dY``."""
    dW = xp.empty((dY.shape[1], X.shape[1] // group) + tuple(kernel), dtype=dY.dtype)
    if dY.size == 0:
        dW[...] = 0
        return dW
    if _dense(xp, X.shape[2:], dY.shape[2:], dW.shape, group, X.dtype):
        _dense_weight_grad(xp, dY, X, group, (tuple(strides), tuple(dilations), tuple(begin)), dW)
    else:
        pl = _planes(X.shape[0], X.shape[2:], tuple(kernel), tuple(strides), tuple(dilations),
                     tuple(begin), tuple(end), dY.shape[2:])
        _taps_weight_grad(xp, dY, X, group, pl, dW)
    return dW
