"""Normalization: BatchNormalization, InstanceNormalization, GroupNormalization,
LayerNormalization, RMSNormalization, LpNormalization, LRN (local response
normalization across channels) and MeanVarianceNormalization; and the private
SyncBatchNormalization, whose statistics span every rank of data-parallel training.

BatchNormalization follows PyTorch in a training run (``ctx.training``): it
normalises with the batch's mean and biased variance and records new running
statistics ``momentum * running + (1 - momentum) * batch`` (the unbiased
variance for the running variance, as ``torch.nn.BatchNorm`` does) in
``ctx.state.updates``, keyed by the names of its ``mean``/``var`` inputs; the
Trainer writes them into the weights after a step.  That holds for nodes
exported in eval mode too.  Outside training runs it uses the running
statistics, unless the node says ``training_mode=1`` (opset 14+), whose
outputs then follow the ONNX spec.  ``is_test`` (opset 6) is ignored.

``stash_type`` asks for float32 statistics; inputs narrower than float32 are
computed in float32, wider ones (float64) in their own precision.  The mean
and variance are exact to that precision even where values sit far from zero
and close together: the mean's rounding is measured on the centred values and
taken out (the shifted-data algorithm, :func:`_shifted_moments`), in the
forward pass and where a gradient reads a saved mean.  (PyTorch accumulates in
double on the CPU for the same reason.)

Gradients are private fused ops of the ``onnxgrad`` domain that recompute the
statistics from ``X``.  BatchNormalization's running ``mean`` and ``var`` are
state that training steps overwrite, not weights: they are not among its
declared differentiable inputs, so the Trainer never trains them, but a
gradient asked for by name (the ``Gradient`` operator's ``xs``, or
:func:`onnxgrad.autodiff.build_gradients`) flows into them (see
:data:`onnxgrad.autodiff.RUNNING_STATISTICS` and
:func:`BatchNormalizationStatisticsGrad`).
"""

from __future__ import annotations

import math

import numpy as np

from onnxgrad.errors import OnnxgradError, UnsupportedOpError
from onnxgrad.ops import compiled, fused
from onnxgrad.ops.elementwise import SumToShape
from onnxgrad.ops import standard as std
from onnxgrad.ops.registry import op
from onnxgrad.threads import by_rows, each, matmul, sum_in_order


def _compute_dtype(X):
    return "float32" if X.dtype.itemsize < 4 else X.dtype


def _standardize(xp, X, axes, epsilon, gain=None):
    """(X - mean) * invstd over ``axes`` (times ``gain``, which broadcasts like the
    statistics, when given), with mean, biased variance and invstd (keepdims).

    Works in place on one temporary: large fresh arrays cost page faults as
    well as passes over memory.
    """
    Xc = X.astype(_compute_dtype(X), copy=False)
    mean = Xc.mean(axis=axes, keepdims=True)
    d = Xc - mean
    shift = d.mean(axis=axes, keepdims=True)  # the rounding of mean: see _shifted_moments
    square = d * d
    var = xp.maximum(square.mean(axis=axes, keepdims=True) - shift * shift, 0)
    del square
    mean += shift
    inv = 1 / xp.sqrt(var + epsilon)
    _unshift(xp, d, shift, inv)
    d *= inv if gain is None else inv * gain
    return d, mean, var, inv


def _unshift(xp, d, shift, inv=1):
    """``d -= shift``, skipped on the CPU where no shift reaches a quarter unit in the
    last place of standardized values of order one (``shift · inv``): the usual
    case, in which the statistics' rounding is that small."""
    if xp.__name__ == "numpy":
        quarter = xp.finfo(d.dtype).eps / 4
        if not (abs(shift * inv) > quarter).any():
            return
    d -= shift


def _standardize_grad(xp, dxhat, xhat, inv, axes):
    """The gradient of X given the gradient of ``xhat = standardize(X)``."""
    m1 = dxhat.mean(axis=axes, keepdims=True)
    m2 = (dxhat * xhat).mean(axis=axes, keepdims=True)
    return inv * (dxhat - m1 - xhat * m2)


def _a(xp, value, dtype=None):
    value = xp.asarray(value)
    return value if dtype is None else value.astype(dtype, copy=False)


def _no_grad_for_extra_outputs(node, extra):
    if any(d is not None for d in extra):
        raise UnsupportedOpError(node.op_type, node.domain, node.opset, node.name,
                                 what="gradient through its statistics outputs")


# -- BatchNormalization --------------------------------------------------------------------


def _bn_layout(X, spatial):
    """Reduction axes and the shape per-channel parameters broadcast to."""
    if spatial:
        return (0,) + tuple(range(2, X.ndim)), (1, X.shape[1]) + (1,) * (X.ndim - 2)
    return (0,), (1,) + tuple(X.shape[1:])


def _channel_sum(xp, A3):
    """Sums over axes 0 and 2 of ``A3`` (N, C, P), kept as (1, C, 1): products with
    a vector of ones, several times faster than a strided reduction."""
    ones = xp.ones((A3.shape[2], 1), dtype=A3.dtype)
    return matmul(xp, A3, ones).sum(axis=0, keepdims=True)


#: Batch items per part of a per-channel dot product, at most: the parts (from
#: the shape alone) run on the thread pool and are summed in batch order.
DOT_PART_ITEMS = 4


def _channel_dot(xp, A3, B3):
    """Sums of ``A3 * B3`` over axes 0 and 2, kept as (1, C, 1), with no temporary."""
    N = A3.shape[0]
    if xp.__name__ != "numpy" or N <= DOT_PART_ITEMS:
        return xp.einsum("ncp,ncp->c", A3, B3).reshape(1, -1, 1)
    parts = [slice(i, min(i + DOT_PART_ITEMS, N)) for i in range(0, N, DOT_PART_ITEMS)]
    return sum_in_order(each(xp, parts, lambda p: xp.einsum("ncp,ncp->c", A3[p], B3[p]))
                        ).reshape(1, -1, 1)


def _shifted_moments(xp, D3, n):
    """The mean and biased variance, per channel, of ``D3`` (N, C, P): values
    less a first estimate of their mean.

    A float32 sum rounds the mean by about 1e-7 of its size, which is no small
    part of the spread where a channel's values sit far from zero and close
    together (a few values per channel, as in the last blocks of a CNN on small
    images).  The centred values are exact differences, so their own mean (the
    estimate's error) and second moment give the statistics to the precision of
    the spread: the shifted-data algorithm, at the cost of one product with ones.
    """
    shift = _channel_sum(xp, D3) / n
    var = xp.maximum(_channel_dot(xp, D3, D3) / n - shift * shift, 0)
    return shift, var


def _bn_standardize(xp, X, gain, B, epsilon, activation=None):
    """Batch-statistics BatchNormalization over every axis but 1: Y, mean, biased
    variance (the statistics as (1, C, 1)), on one fresh array; each pass in
    parts of the batch on the thread pool.  The compiled kernel applies an
    ``activation`` (:class:`Activation`) in its pass where Y is of X's type."""
    X3 = X.astype(_compute_dtype(X), copy=False).reshape(X.shape[0], X.shape[1], -1)
    if _compiled_bn(xp, X3):
        Y, mean, var = _bn_compiled(X3, gain, B, epsilon,
                                    activation=activation if X3.dtype == X.dtype else None)
        return Y.reshape(X.shape), mean.reshape(1, -1, 1), var.reshape(1, -1, 1)
    if fused.on_device(xp):  # two reductions and one pass
        mean, var = fused.bn_statistics(xp, X3)
        gain3 = gain.astype(X3.dtype, copy=False).reshape(1, -1, 1)
        Y = fused.bn_normalize(xp, X3, mean, gain3 / xp.sqrt(var + epsilon),
                               B.astype(X3.dtype, copy=False).reshape(1, -1, 1))
        return Y.reshape(X.shape), mean, var
    n = max(X3.shape[0] * X3.shape[2], 1)
    guess = _channel_sum(xp, X3) / n
    Y = xp.empty(X3.shape, dtype=X3.dtype)
    by_rows(xp, X3.shape[0], X3.size, lambda p: xp.subtract(X3[p], guess, out=Y[p]))
    shift, var = _shifted_moments(xp, Y, n)
    a = gain.reshape(1, -1, 1) / xp.sqrt(var + epsilon)
    b = B.reshape(1, -1, 1) - shift * a  # Y = (X - guess - shift)·a + B

    def finish(p):
        Y[p] *= a
        Y[p] += b

    by_rows(xp, X3.shape[0], X3.size, finish)
    return Y.reshape(X.shape), guess + shift, var


def _doubles(a, n: int):
    """``a`` (n values: per channel or position) as a contiguous float64 vector for a
    compiled kernel; zeros where ``a`` is None."""
    return np.zeros(n) if a is None else np.ascontiguousarray(a, dtype=np.float64).reshape(n)


def _compiled_bn(xp, X3) -> bool:
    """Whether BatchNormalization of ``X3`` (N, C, P) runs its compiled kernels."""
    return X3.size > 0 and compiled.available(xp)


@compiled.kernel(reassociate=True)
def _bn_kernel(X3, gain, bias, epsilon, Y, mean, var, clip, low, high, mask, start, stop):
    """For the channels ``c`` in ``[start, stop)`` of ``X3`` (N, C, P): the batch mean
    and biased variance (float64 sums over the channel, the second of its values
    less the mean, while the channel is in cache) into ``mean[c]`` and ``var[c]``;
    where ``Y`` is not empty, ``Y = (X - mean)·gain/sqrt(var + epsilon) + bias``.

    With ``clip``, ``Y`` is then clipped to ``[low, high]`` (scalars of Y's type) in
    the same pass, as :func:`~onnxgrad.ops.nonlinear.Clip` clips (NaN stays NaN), and
    where ``mask`` is not empty, ``mask`` is 1 where ``low <= Y <= high`` before the
    clip, else 0: Clip's gradient, without keeping Y."""
    N, _, P = X3.shape
    n = N * P
    for c in range(start, stop):
        total = 0.0
        for i in range(N):
            for p in range(P):
                total += X3[i, c, p]
        m = total / n
        squares = 0.0
        for i in range(N):
            for p in range(P):
                d = X3[i, c, p] - m
                squares += d * d
        v = squares / n
        mean[c] = m
        var[c] = v
        if Y.size:
            a, b = _bn_affine(m, v, gain[c], bias[c], epsilon)
            for i in range(N):
                for p in range(P):
                    Y[i, c, p] = X3[i, c, p] * a + b
                    if clip:
                        y = Y[i, c, p]  # rounded to Y's type, as Clip reads it
                        if mask.size:
                            mask[i, c, p] = 1 if y >= low and y <= high else 0
                        y = low if y < low else y
                        Y[i, c, p] = high if y > high else y


@compiled.kernel(reassociate=True)
def _bn_grad_kernel(dY, X3, mean, var, gain, epsilon, dX, dscale, dB, gate, kind, start, stop):
    """BatchNormalizationGrad for the channels in ``[start, stop)`` of ``X3`` (N, C, P)
    given the batch ``mean`` and ``var`` (float64 sums).  A saved mean is rounded to
    X's type: the sum of ``X - mean`` measures that rounding, and it is taken out.

    ``kind`` 1 or 2: ``dY`` is the gradient of an activation of the normalised values,
    taken back through it here in the same passes: ``dY`` where ``gate`` (the same
    shape) is non-zero (kind 1: Clip's mask from :func:`_bn_kernel`) or positive
    (kind 2: Relu's output), else 0, as ClipGrad and ReluGrad do."""
    N, _, P = X3.shape
    n = N * P
    for c in range(start, stop):
        m = mean[c]
        sum_d = 0.0
        sum_dx = 0.0
        sum_x = 0.0
        for i in range(N):
            for p in range(P):
                d = _gated(dY[i, c, p], gate[i, c, p], kind)
                x = X3[i, c, p] - m
                sum_d += d
                sum_dx += d * x
                sum_x += x
        dscale[c], dB[c], k, centre, b1, b0 = _bn_grad_terms(
            m, var[c], gain[c], epsilon, sum_d, sum_dx, sum_x, n)
        for i in range(N):
            for p in range(P):
                d = _gated(dY[i, c, p], gate[i, c, p], kind)
                dX[i, c, p] = k * d - b1 * (X3[i, c, p] - centre) - b0


@compiled.helper
def _bn_affine(m, v, gain, bias, epsilon):
    """``a, b`` of a channel's normalised values ``X·a + b``, from its batch mean ``m``
    and biased variance ``v``."""
    a = gain / math.sqrt(v + epsilon)
    return a, bias - m * a


@compiled.helper
def _bn_grad_terms(m, v, gain, epsilon, sum_d, sum_dx, sum_x, n):
    """A channel's dscale and dB, and the terms of its ``dX = k·d - b1·(X - centre) - b0``,
    from the sums over its ``n`` values of ``d`` (the gradient), ``d·(X - m)`` and
    ``X - m``: dX = k·(d - dB/n - xhat·dscale/n), xhat = (X - m - shift)·inv, k = gain·inv."""
    inv = 1.0 / math.sqrt(v + epsilon)
    shift = sum_x / n
    ds = (sum_dx - shift * sum_d) * inv
    k = gain * inv
    return ds, sum_d, k, m + shift, k * inv * ds / n, k * sum_d / n


#: Channels with fewer positions than this (per batch item) are normalised by the
#: row kernel, and their gradients by the row gradient kernel below
#: :data:`GRAD_ROWS_BELOW`: it streams whole rows of channels where the
#: per-channel kernels' inner loops would be a few elements long, each ending in
#: a sum across a vector (measured on AVX-512: the forward 1.3× faster at 64
#: positions and 3× at 16, the gradient 1.4× at 16, even at 32, slower at 64).
ROWS_BELOW = 128
GRAD_ROWS_BELOW = 64

#: Elements that the row kernels take at once, at most (as many whole channels as
#: fit, one at least): their passes then find them in cache.
ROWS_BLOCK = 1 << 15


@compiled.helper
def _channel_block(c0, stop, step, P):
    """The row kernels' block of channels from ``c0``: its end, its first column and
    its width in the (N, C·P) rows."""
    c1 = min(c0 + step, stop)
    return c1, c0 * P, (c1 - c0) * P


@compiled.kernel(reassociate=True)
def _bn_rows_kernel(X2, P, block, gain, bias, epsilon, Y2, mean, var, clip, low, high, mask2,
                    start, stop):
    """:func:`_bn_kernel` for channels of few positions: ``X2`` is X as (N, C·P), and
    blocks of whole channels are summed row by row into a sum per (channel,
    position), then per channel, ``block`` elements (:data:`ROWS_BLOCK`) at a time.
    ``Y2`` and ``mask2`` are (N, C·P), or (N, 0) where not made."""
    N = X2.shape[0]
    n = N * P
    step = max(1, block // n)
    for c0 in range(start, stop, step):
        c1, j0, L = _channel_block(c0, stop, step, P)
        acc = np.zeros(L)
        for i in range(N):
            x = X2[i, j0:j0 + L]
            for j in range(L):
                acc[j] += x[j]
        shift = np.empty(L)
        for c in range(c1 - c0):
            total = 0.0
            for p in range(P):
                total += acc[c * P + p]
            mean[c0 + c] = total / n
            for p in range(P):
                shift[c * P + p] = total / n
        acc[:] = 0.0
        for i in range(N):
            x = X2[i, j0:j0 + L]
            for j in range(L):
                d = x[j] - shift[j]
                acc[j] += d * d
        for c in range(c1 - c0):
            squares = 0.0
            for p in range(P):
                squares += acc[c * P + p]
            var[c0 + c] = squares / n
            if Y2.size:
                a, b = _bn_affine(mean[c0 + c], squares / n, gain[c0 + c], bias[c0 + c], epsilon)
                for p in range(P):
                    acc[c * P + p] = a
                    shift[c * P + p] = b
        if Y2.size:
            for i in range(N):
                x = X2[i, j0:j0 + L]
                y = Y2[i, j0:j0 + L]
                keep = mask2[i, j0:j0 + L]
                for j in range(L):
                    y[j] = x[j] * acc[j] + shift[j]
                    if clip:
                        v = y[j]  # rounded to Y's type, as Clip reads it
                        if keep.size:
                            keep[j] = 1 if v >= low and v <= high else 0
                        v = low if v < low else v
                        y[j] = high if v > high else v


@compiled.kernel(reassociate=True)
def _bn_grad_rows_kernel(dY2, X2, P, block, mean, var, gain, epsilon, dX2, dscale, dB, gate2,
                         kind, start, stop):
    """:func:`_bn_grad_kernel` for channels of few positions, row by row as
    :func:`_bn_rows_kernel` (every array (N, C·P))."""
    N = X2.shape[0]
    n = N * P
    step = max(1, block // n)
    for c0 in range(start, stop, step):
        c1, j0, L = _channel_block(c0, stop, step, P)
        centre = np.empty(L)
        for c in range(c1 - c0):
            for p in range(P):
                centre[c * P + p] = mean[c0 + c]
        sum_d = np.zeros(L)
        sum_dx = np.zeros(L)
        sum_x = np.zeros(L)
        for i in range(N):
            dy = dY2[i, j0:j0 + L]
            g = gate2[i, j0:j0 + L]
            x = X2[i, j0:j0 + L]
            for j in range(L):
                d = _gated(dy[j], g[j], kind)
                xc = x[j] - centre[j]
                sum_d[j] += d
                sum_dx[j] += d * xc
                sum_x[j] += xc
        for c in range(c1 - c0):
            t_d, t_dx, t_x = 0.0, 0.0, 0.0
            for p in range(P):
                t_d += sum_d[c * P + p]
                t_dx += sum_dx[c * P + p]
                t_x += sum_x[c * P + p]
            dscale[c0 + c], dB[c0 + c], k, at, b1, b0 = _bn_grad_terms(
                mean[c0 + c], var[c0 + c], gain[c0 + c], epsilon, t_d, t_dx, t_x, n)
            for p in range(P):
                sum_d[c * P + p] = k
                sum_dx[c * P + p] = b1
                sum_x[c * P + p] = b0
                centre[c * P + p] = at
        for i in range(N):
            dy = dY2[i, j0:j0 + L]
            g = gate2[i, j0:j0 + L]
            x = X2[i, j0:j0 + L]
            out = dX2[i, j0:j0 + L]
            for j in range(L):
                d = _gated(dy[j], g[j], kind)
                out[j] = sum_d[j] * d - sum_dx[j] * (x[j] - centre[j]) - sum_x[j]


@compiled.helper
def _gated(d, g, kind):
    """``d`` where the gate ``g`` lets it through (see :func:`_bn_grad_kernel`), else 0."""
    if kind == 1:
        return d if g != 0 else 0.0
    if kind == 2:
        return d if g > 0 else 0.0
    return d


def _bn_compiled(X3, gain, bias, epsilon, normalize=True, activation=None):
    """Y (or None), batch mean and biased variance (float64, per channel) of
    ``X3`` (N, C, P) through :func:`_bn_kernel`, channels split over the pool;
    Y clipped as ``activation`` says (an :class:`Activation`), which receives its mask."""
    X3 = np.ascontiguousarray(X3)
    C = X3.shape[1]
    Y = np.empty(X3.shape if normalize else (0, 0, 0), dtype=X3.dtype)
    mean, var = np.empty(C), np.empty(C)
    gain, bias = (_doubles(a, C) for a in (gain, bias))
    clip = activation is not None and normalize
    low, high = (activation.bounds(X3.dtype) if clip else (X3.dtype.type(0),) * 2)
    mask = np.empty(X3.shape if clip and activation.keep_mask else (0, 0, 0), dtype=np.uint8)
    N, P = X3.shape[0], X3.shape[2]
    if P < ROWS_BELOW:
        rows = [a.reshape(N, -1) for a in (X3, Y, mask)]
        compiled.by_parts(C, X3.size, lambda start, stop: _bn_rows_kernel(
            rows[0], P, ROWS_BLOCK, gain, bias, float(epsilon), rows[1], mean, var, clip, low, high,
            rows[2], start, stop))
    else:
        compiled.by_parts(C, X3.size, lambda start, stop: _bn_kernel(
            X3, gain, bias, float(epsilon), Y, mean, var, clip, low, high, mask, start, stop))
    if clip:
        activation.done(mask if activation.keep_mask else None)
    return (Y if normalize else None), mean, var


def _bn_grad_compiled(d, X3, mean, var, scale, epsilon, gate=None):
    """dX, dscale, dB (float64) of batch-statistics BatchNormalization through
    :func:`_bn_grad_kernel`, channels split over the pool; with a ``gate`` (a
    :class:`Gate`), ``d`` is the gradient of the activation that followed."""
    X3, d = np.ascontiguousarray(X3), np.ascontiguousarray(d, dtype=X3.dtype)
    C = X3.shape[1]
    dX = np.empty(X3.shape, dtype=X3.dtype)
    dscale, dB = np.empty(C), np.empty(C)
    mean, var, gain = (_doubles(a, C) for a in (mean, var, scale))
    kind, g = (0, d) if gate is None else (gate.kind, np.ascontiguousarray(gate.values).reshape(X3.shape))
    N, P = X3.shape[0], X3.shape[2]
    if P < GRAD_ROWS_BELOW:
        d2, X2, dX2, g2 = (a.reshape(N, -1) for a in (d, X3, dX, g))
        compiled.by_parts(C, X3.size, lambda start, stop: _bn_grad_rows_kernel(
            d2, X2, P, ROWS_BLOCK, mean, var, gain, float(epsilon), dX2, dscale, dB, g2, kind, start, stop))
    else:
        compiled.by_parts(C, X3.size, lambda start, stop: _bn_grad_kernel(
            d, X3, mean, var, gain, float(epsilon), dX, dscale, dB, g, kind, start, stop))
    return dX, dscale, dB


class Activation:
    """A Clip or Relu that BatchNormalization applies to its output itself (the
    planner fuses the two steps where nothing else reads the normalised values:
    :mod:`onnxgrad.fusion`): in its compiled kernel's pass, or after it where
    another path runs, as the op would.  For Clip, with ``keep_mask``, the mask
    of its gradient (where ``low <= Y <= high``, one byte per value) is kept in
    place of Y for the backward pass (:class:`Gate`)."""

    def __init__(self, op_type: str, low, high, keep_mask: bool):
        self.op_type, self.low, self.high, self.keep_mask = op_type, low, high, keep_mask
        self.applied = False
        self.mask = None

    def bounds(self, dtype):
        """The bounds as scalars of ``dtype``, infinite where not given."""
        from onnxgrad.ops.nonlinear import _bounds  # noqa: PLC0415 - a sibling family

        return _bounds(np.dtype(dtype), self.low, self.high)

    def done(self, mask) -> None:
        """Called by the compiled kernel once it has applied the activation."""
        self.applied, self.mask = True, mask

    def apply(self, xp, Y):
        """The op on ``Y``, the mask first (as ClipGrad reads Y)."""
        from onnxgrad.ops.activation import Relu  # noqa: PLC0415
        from onnxgrad.ops.nonlinear import _clip  # noqa: PLC0415

        if self.op_type == "Relu":
            return Relu(xp, Y)[0]
        if self.keep_mask:
            inside = xp.ones(Y.shape, dtype=bool)
            if self.low is not None:
                inside &= Y >= self.low
            if self.high is not None:
                inside &= Y <= self.high
            self.mask = inside.view(np.uint8) if xp is np else inside.astype(np.uint8)
        return _clip(xp, Y, self.low, self.high)


class Gate:
    """What lets the gradient of a fused :class:`Activation` through: ``kind`` 1,
    Clip's mask (non-zero where it passes); ``kind`` 2, Relu's output (positive
    where it passes)."""

    def __init__(self, kind: int, values):
        self.kind, self.values = kind, values

    def apply(self, xp, dY):
        """The activation's gradient op on ``dY``, as ReluGrad and ClipGrad compute it
        (a mask of ones and zeros lets through where it is positive, as Relu's output)."""
        from onnxgrad.ops.activation import ReluGrad, _relu_grad_kernel  # noqa: PLC0415

        if self.kind == 1 and compiled.available(xp, dY) and dY.flags.c_contiguous:
            # ClipGrad's compiled kernel selects, as Relu's does (ReluGrad itself takes
            # this kernel for a floating-point Y only)
            return compiled.elementwise(_relu_grad_kernel, xp.empty_like(dY), dY,
                                        xp.ascontiguousarray(self.values))
        return ReluGrad(xp, dY, self.values)[0]


def _batch_norm(xp, X, scale, B, mean, var, epsilon, momentum, spatial, batch, ctx,
                activation=None):
    """Y, and (new running mean, new running var, batch mean, batch var) in batch mode;
    Y through ``activation`` (an :class:`Activation`) where one is given."""
    axes, shape = _bn_layout(X, spatial)
    if not batch:
        inv = 1 / xp.sqrt(var + epsilon)
        Y = (X - mean.reshape(shape)) * (scale * inv).reshape(shape) + B.reshape(shape)
        Y = _a(xp, Y, X.dtype)
        return (Y if activation is None else activation.apply(xp, Y)), None
    if spatial or X.ndim == 2:
        Y, bmean, bvar = _bn_standardize(xp, X, scale, B, epsilon, activation)
    else:
        Y, bmean, bvar, _ = _standardize(xp, X, axes, epsilon, gain=scale.reshape(shape))
        Y += B.reshape(shape)  # in place: Y is the scaled standardized input, a fresh array
    Y = _a(xp, Y, X.dtype)
    if activation is not None and not activation.applied:
        Y = activation.apply(xp, Y)
    bmean = bmean.reshape(mean.shape).astype(mean.dtype, copy=False)
    bvar = bvar.reshape(var.shape).astype(var.dtype, copy=False)
    new_mean = mean * momentum + bmean * (1 - momentum)
    if ctx.training:
        count = X.size // max(bmean.size, 1)
        unbiased = bvar * (count / (count - 1)) if count > 1 else bvar
        names = ctx.node.inputs
        if len(names) > 4 and names[3] and names[4]:
            ctx.state.updates[names[3]] = new_mean
            ctx.state.updates[names[4]] = var * momentum + unbiased * (1 - momentum)
    return Y, (new_mean, var * momentum + bvar * (1 - momentum), bmean, bvar)


# Training graphs give every BatchNormalization five outputs (train_outputs=5):
# the last two are the batch mean and variance, which the gradient reads instead
# of computing them again.  Opsets 1-9 define them (saved_mean, saved_var); for
# opset 14 on they are onnxgrad's own, present in training graphs only.
@op("BatchNormalization", since=1, differentiable=("X", "scale", "B"), train_outputs=5)
def BatchNormalization(xp, X, scale, B, mean, var, *, consumed_inputs=None, epsilon=1e-5,
                       is_test=0, momentum=0.9, spatial=1, ctx):
    # Opsets 1-9: outputs Y, mean, var, saved_mean, saved_var (the last four in training).
    return _bn_outputs(xp, X, scale, B, mean, var, ctx, epsilon=epsilon, momentum=momentum,
                       spatial=spatial)


@op("BatchNormalization", since=14, differentiable=("X", "scale", "B"), train_outputs=5)
def BatchNormalization14(xp, X, scale, B, input_mean, input_var, *, epsilon=1e-5,
                         momentum=0.9, training_mode=0, ctx):
    return _bn_outputs(xp, X, scale, B, input_mean, input_var, ctx, epsilon=epsilon,
                       momentum=momentum, training_mode=training_mode, opset14=True)


def _bn_outputs(xp, X, scale, B, mean, var, ctx, *, epsilon, momentum, spatial=1,
                training_mode=0, opset14=False, activation=None):
    """The outputs of a BatchNormalization node of either form (``opset14``: 14 on)."""
    batch = (bool(training_mode) or ctx.training) if opset14 else ctx.training
    Y, stats = _batch_norm(xp, X, scale, B, mean, var, epsilon, momentum,
                           1 if opset14 else spatial, batch, ctx, activation)
    if stats is None:
        stats = (mean, var, mean, var)
    return ((Y,) + stats)[:max(ctx.num_outputs, 1)] if opset14 else (Y,) + stats


def fused_forward(op_type: str, keep_mask: bool, opset14: bool):
    """The kernel of a BatchNormalization step that applies the Clip or Relu
    (``op_type``) that followed it (see :class:`Activation`): its inputs are the
    node's, then the activation's bounds (None where absent); its outputs the
    node's, the activation's in place of Y, and Clip's mask after them where
    ``keep_mask``."""

    def kernel(xp, X, scale, B, mean, var, low=None, high=None, *, ctx, consumed_inputs=None,
               is_test=0, **attrs):
        activation = Activation(op_type, low, high, keep_mask)
        outs = _bn_outputs(xp, X, scale, B, mean, var, ctx, opset14=opset14,
                           activation=activation, **attrs)[:max(ctx.num_outputs, 1)]
        return outs + ((activation.mask,) if keep_mask else ())

    return kernel


def fused_grad(kind: int):
    """The kernel of a BatchNormalizationGrad step that takes the gradient back
    through the fused activation first (see :class:`Gate`): its inputs are the
    activation's output gradient and the gate, then BatchNormalizationGrad's but
    the first."""

    def kernel(xp, dY, gate, X, scale, batch_mean=None, batch_var=None, mean=None, var=None, *,
               epsilon=1e-5, spatial=1, forward_node="", training_mode=0, ctx):
        return _bn_grad(xp, dY, X, scale, batch_mean, batch_var, mean, var, epsilon, spatial,
                        forward_node, training_mode, ctx.state, Gate(kind, gate))

    return kernel


def _bn_rule(g, node, dY, *extra):
    _no_grad_for_extra_outputs(node, extra)
    X, scale = node.inputs[:2]
    saved = node.outputs[3:5]
    saved = list(saved) if len(saved) == 2 and all(saved) else ["", ""]
    running = (list(node.inputs[3:5]) + ["", ""])[:2]
    dX, dscale, dB = g.private("BatchNormalizationGrad", dY, X, scale,
                               *(saved + running if all(running) else saved),
                               num_outputs=3, epsilon=node.attrs["epsilon"],
                               spatial=node.attrs.get("spatial", 1), forward_node=node.name,
                               training_mode=node.attrs.get("training_mode", 0))
    return (dX, dscale, dB) + _running_statistics_rule(g, node, dY)


def _running_statistics_rule(g, node, dY):
    """The gradients of the running ``mean`` and ``var`` (inputs 3 and 4).

    Where the node normalises with them, ``Y = (X - mean)·scale·inv + B`` with
    ``inv = 1/sqrt(var + epsilon)``.  Where it normalises with batch statistics, ``Y``
    does not read them: their gradient is zero, exactly, for the only output a
    gradient may flow back from (the spec declares ``running_mean``/``running_var``
    and the saved statistics non-differentiable, and :func:`_no_grad_for_extra_outputs`
    refuses a gradient through them).  ``training_mode=1`` (opset 14 on) always
    normalises with batch statistics; otherwise which statistics a run uses is known
    at run time only (a training step or not, ``frozen_batchnorm``), so the private
    kernel decides as the forward kernel does."""
    from onnxgrad.ops.tensor import zeros_like_value  # noqa: PLC0415

    mean, var = (node.inputs[3:5] + ["", ""])[:2]
    if not mean or not var:
        return (None, None)
    if node.attrs.get("training_mode", 0):
        return (zeros_like_value(g, mean), zeros_like_value(g, var))
    X, scale = node.inputs[:2]
    dmean, dvar = g.private("BatchNormalizationStatisticsGrad", dY, X, scale, mean, var,
                            num_outputs=2, dtype=g.graph.dtype(mean),
                            epsilon=node.attrs["epsilon"], spatial=node.attrs.get("spatial", 1),
                            forward_node=node.name)
    return (dmean, dvar)


BatchNormalization.gradient(_bn_rule)
BatchNormalization14.gradient(_bn_rule)


@op("BatchNormalizationGrad", domain="onnxgrad")
def BatchNormalizationGrad(xp, dY, X, scale, batch_mean=None, batch_var=None, mean=None,
                           var=None, *, epsilon=1e-5, spatial=1, forward_node="",
                           training_mode=0, ctx):
    """dX, dscale, dB of BatchNormalization node ``forward_node``: of a batch-statistics
    one, from the forward pass's batch mean and variance when given (else computed
    again); where the node normalised with its running statistics ``mean`` and ``var``
    in this run (outside training runs, or as one of the run's ``inference_nodes``,
    and without ``training_mode``), with those held constant (:func:`_bn_grad_fixed`)."""
    return _bn_grad(xp, dY, X, scale, batch_mean, batch_var, mean, var, epsilon, spatial,
                    forward_node, training_mode, ctx.state)


def _bn_grad(xp, dY, X, scale, batch_mean, batch_var, mean, var, epsilon, spatial,
             forward_node, training_mode, state, gate=None):
    """:func:`BatchNormalizationGrad`; with a ``gate`` (:class:`Gate`), ``dY`` is the
    gradient of the Clip or Relu that followed the node, taken back through it in
    the compiled kernel's passes, or first where another path runs."""
    axes, shape = _bn_layout(X, spatial)
    fixed = (not training_mode and mean is not None and var is not None
             and not (state.training and forward_node not in state.inference_nodes))
    in_kernel = (not fixed and (spatial or X.ndim <= 2) and _compute_dtype(X) == X.dtype
                 and _compiled_bn(xp, X))
    if gate is not None and not in_kernel:
        dY, gate = gate.apply(xp, dY), None
    if fixed:
        return _bn_grad_fixed(xp, dY, X, scale, mean, var, epsilon, axes, shape)
    if not spatial and X.ndim > 2:  # per-element statistics (opsets before 9)
        return _bn_grad_elementwise(xp, dY, X, scale, batch_mean, batch_var, epsilon, axes, shape)
    dtype = _compute_dtype(X)
    X3 = X.astype(dtype, copy=False).reshape(X.shape[0], X.shape[1], -1)
    if _compiled_bn(xp, X3):
        if batch_mean is None or batch_var is None:
            _, batch_mean, batch_var = _bn_compiled(X3, None, None, epsilon, normalize=False)
        dX, dscale, dB = _bn_grad_compiled(dY.astype(dtype, copy=False).reshape(X3.shape), X3,
                                           batch_mean, batch_var, scale, epsilon, gate)
        return (_a(xp, dX.reshape(X.shape), X.dtype), _a(xp, dscale.reshape(scale.shape), scale.dtype),
                _a(xp, dB.reshape(scale.shape), scale.dtype))
    if fused.on_device(xp) and batch_mean is not None and batch_var is not None:
        mean = batch_mean.astype(dtype, copy=False).reshape(1, -1, 1)
        inv = 1 / xp.sqrt(batch_var.astype(dtype, copy=False).reshape(1, -1, 1) + epsilon)
        dX, dscale, dB = fused.bn_grad(xp, dY.astype(dtype, copy=False).reshape(X3.shape), X3,
                                       mean, inv, scale.astype(dtype, copy=False))
        return (_a(xp, dX.reshape(X.shape), X.dtype),
                _a(xp, dscale.reshape(scale.shape), scale.dtype),
                _a(xp, dB.reshape(scale.shape), scale.dtype))
    if batch_mean is None or batch_var is None:
        xhat, _, var = _bn_standardize(xp, X, xp.ones(X.shape[1], dtype=dtype),
                                       xp.zeros(X.shape[1], dtype=dtype), epsilon)
        xhat = xhat.reshape(X3.shape)
        inv = 1 / xp.sqrt(var + epsilon)
    else:
        inv = 1 / xp.sqrt(batch_var.astype(dtype, copy=False).reshape(1, -1, 1) + epsilon)
        mean = batch_mean.astype(dtype, copy=False).reshape(1, -1, 1)
        xhat = xp.empty(X3.shape, dtype=dtype)

        def standardize(p):
            xp.subtract(X3[p], mean, out=xhat[p])
            xhat[p] *= inv

        by_rows(xp, X3.shape[0], X3.size, standardize)
    d = dY.astype(dtype, copy=False).reshape(X3.shape)
    dB = _channel_sum(xp, d)
    n = X.size // max(dB.size, 1)
    # The saved mean is rounded to X's type: xhat above is off by the same small
    # amount in every value of a channel, measured here (see _shifted_moments).
    shift = 0 if batch_mean is None or batch_var is None else _channel_sum(xp, xhat) / n
    dscale = _channel_dot(xp, d, xhat) - shift * dB
    # dX = scale·inv · (dY - dB/n - (xhat - shift)·dscale/n), on xhat's storage
    dX = xhat
    a, b, k = -(dscale / n), (dB - shift * dscale) / n, scale.reshape(1, -1, 1) * inv

    def combine(p):
        dX[p] *= a
        dX[p] += d[p]
        dX[p] -= b
        dX[p] *= k

    by_rows(xp, X3.shape[0], X3.size, combine)
    return (_a(xp, dX.reshape(X.shape), X.dtype), _a(xp, dscale.reshape(scale.shape), scale.dtype),
            _a(xp, dB.reshape(scale.shape), scale.dtype))


@BatchNormalizationGrad.in_standard_ops
def _(g, node):
    # With batch statistics: they are computed again from X (two reductions), as the
    # kernel does when the forward pass's are not given.  Where the node may normalise
    # with its running statistics (given as inputs 5 and 6), the form the kernel takes
    # then too, chosen at run time unless the builder knows the kind of run.
    dY, X, scale = node.inputs[:3]
    if not node.attrs.get("spatial", 1):
        return None
    axes = std.axes_from(g, X, 2, skip_channel=True)
    mean = g.ReduceMean(X, axes, keepdims=1)
    centred = g.Sub(X, mean)
    variance = g.ReduceMean(g.Mul(centred, centred), axes, keepdims=1)
    batch = _standard_bn_grad(g, node, dY, centred, variance, axes, batch=True)
    running = (list(node.inputs[5:7]) + ["", ""])[:2]
    if node.attrs.get("training_mode", 0) or not all(running) or g.training_run:
        return batch
    shape = g.Shape(variance, dtype="int64")  # (1, C, 1, …)
    fixed = _standard_bn_grad(g, node, dY, g.Sub(X, g.Reshape(running[0], shape)),
                              g.Reshape(running[1], shape), axes, batch=False)
    if g.training_run is False:
        return fixed
    uses_batch = g.private("BatchStatisticsRun", forward_node=node.attrs.get("forward_node", ""),
                           dtype="bool")
    return tuple(g.Where(uses_batch, b, f) for b, f in zip(batch, fixed))


def _standard_bn_grad(g, node, dY, centred, variance, axes, batch):
    """dX, dscale, dB in standard ops from X less the mean and the variance (each kept
    as (1, C, 1…)); ``batch``: the statistics are the batch's, so that dX carries their
    dependence on X."""
    X, scale = node.inputs[1:3]
    inv = g.Reciprocal(g.Sqrt(g.Add(variance, std.like(g, node.attrs.get("epsilon", 1e-5), X))))
    xhat = g.Mul(centred, inv)
    dB = g.ReduceSum(dY, axes, keepdims=1)
    dscale = g.ReduceSum(g.Mul(dY, xhat), axes, keepdims=1)
    k = g.Mul(g.Reshape(scale, g.Shape(dB, dtype="int64")), inv)
    if batch:
        n = std.cast_like(g, g.Div(g.Size(X, dtype="int64"), g.Size(dB, dtype="int64"),
                                   dtype="int64"), X)
        dX = g.Mul(g.Sub(g.Sub(dY, g.Div(dB, n)), g.Div(g.Mul(xhat, dscale), n)), k)
    else:
        dX = g.Mul(dY, k)
    flat = g.Shape(scale, dtype="int64")
    return (dX, g.Reshape(dscale, flat), g.Reshape(dB, flat))


@op("BatchStatisticsRun", domain="onnxgrad")
def BatchStatisticsRun(xp, *, forward_node="", ctx):
    """Whether BatchNormalization node ``forward_node`` normalises with batch
    statistics in this run (a training run, the node not among its
    ``inference_nodes``), as a bool scalar; what BatchNormalizationGrad's standard
    form chooses its formula by where the graph may run either way (second-order
    gradients).  No standard form: the kind of run is not in the graph."""
    state = ctx.state
    return (xp.asarray(bool(state.training and forward_node not in state.inference_nodes)),)


@op("BatchNormalizationStatisticsGrad", domain="onnxgrad")
def BatchNormalizationStatisticsGrad(xp, dY, X, scale, mean, var, *, epsilon=1e-5, spatial=1,
                                     forward_node="", ctx):
    """dmean and dvar of BatchNormalization node ``forward_node`` for its running
    statistics: where the node normalised with them in this run (outside training
    runs, or as one of the run's ``inference_nodes``: ``frozen_batchnorm="eval"``),

        dmean = -Σ dY·scale·inv,   dvar = -½ Σ dY·(X - mean)·scale·inv³,

    summed over every axis but the statistics' own (inv = 1/sqrt(var + epsilon)),
    accumulated in float64; where it normalised with batch statistics (a training run),
    zeros, as ``Y`` does not read them.

    No standard form: which statistics the node used is a fact of the run (training
    step or inference, frozen nodes), which a standard ONNX graph does not carry; so
    differentiating this op again raises UnsupportedOpError, and a step model that
    would hold it cannot be written.
    """
    state = ctx.state
    if state.training and forward_node not in state.inference_nodes:
        return xp.zeros(mean.shape, dtype=mean.dtype), xp.zeros(var.shape, dtype=var.dtype)
    axes, shape = _bn_layout(X, spatial)
    f64 = xp.float64
    inv = 1 / xp.sqrt(var.astype(f64).reshape(shape) + epsilon)
    k = dY.astype(f64) * (scale.astype(f64).reshape(shape) * inv)  # dY·scale·inv
    dmean = -k.sum(axis=axes, keepdims=True)
    k *= X.astype(f64) - mean.astype(f64).reshape(shape)
    dvar = -0.5 * (inv * inv) * k.sum(axis=axes, keepdims=True)
    return (_a(xp, dmean.reshape(mean.shape), mean.dtype),
            _a(xp, dvar.reshape(var.shape), var.dtype))


def _bn_grad_fixed(xp, dY, X, scale, mean, var, epsilon, axes, shape):
    """dX, dscale, dB of ``Y = (X - mean)·scale·inv + B`` with constant statistics
    (``inv = 1/sqrt(var + epsilon)``): ``dX = dY·scale·inv``, ``dscale = Σ dY·(X - mean)·inv``,
    ``dB = Σ dY``, the sums over ``axes``."""
    dtype = _compute_dtype(X)
    inv = 1 / xp.sqrt(var.astype(dtype, copy=False).reshape(shape) + epsilon)
    d = dY.astype(dtype, copy=False)
    xhat = (X.astype(dtype, copy=False) - mean.astype(dtype, copy=False).reshape(shape)) * inv
    dscale = (d * xhat).sum(axis=axes)
    dB = d.sum(axis=axes)
    dX = d * (scale.astype(dtype, copy=False).reshape(shape) * inv)
    return (_a(xp, dX, X.dtype), _a(xp, dscale.reshape(scale.shape), scale.dtype),
            _a(xp, dB.reshape(scale.shape), scale.dtype))


def _bn_grad_elementwise(xp, dY, X, scale, batch_mean, batch_var, epsilon, axes, shape):
    """BatchNormalizationGrad with statistics per element of ``X.shape[1:]``."""
    if batch_mean is None or batch_var is None:
        xhat, _, _, inv = _standardize(xp, X, axes, epsilon)
    else:
        dtype = _compute_dtype(X)
        inv = 1 / xp.sqrt(batch_var.astype(dtype, copy=False).reshape(shape) + epsilon)
        xhat = X.astype(dtype, copy=False) - batch_mean.astype(dtype, copy=False).reshape(shape)
        xhat *= inv
        _unshift(xp, xhat, xhat.mean(axis=axes, keepdims=True))  # the saved mean's rounding
    d = dY.astype(xhat.dtype, copy=False)
    dB = d.sum(axis=axes, keepdims=True)
    dscale = (d * xhat).sum(axis=axes, keepdims=True)
    n = X.size // dB.size
    # dX = scale·inv · (dY - dB/n - xhat·dscale/n), on xhat's storage
    dX = xhat
    dX *= -(dscale / n)
    dX += d
    dX -= dB / n
    dX *= scale.reshape(shape) * inv
    return (_a(xp, dX, X.dtype), _a(xp, dscale.reshape(scale.shape), scale.dtype),
            _a(xp, dB.reshape(scale.shape), scale.dtype))


# -- Instance and group normalization ------------------------------------------------------


@op("InstanceNormalization", since=1, differentiable=("input", "scale", "B"))
def InstanceNormalization(xp, input, scale, B, *, consumed_inputs=None, epsilon=1e-5):
    shape = (1, -1) + (1,) * (input.ndim - 2)
    xhat, _, _, _ = _standardize(xp, input, tuple(range(2, input.ndim)), epsilon)
    return (_a(xp, xhat * scale.reshape(shape) + B.reshape(shape), input.dtype),)


@InstanceNormalization.gradient
def _(g, node, dY):
    X, scale = node.inputs[:2]
    # Instance normalization is group normalization with one channel per group.
    dX, dscale, dB = g.private("GroupNormalizationGrad", dY, X, scale, num_outputs=3,
                               epsilon=node.attrs["epsilon"], num_groups=0, per_group=0)
    return (dX, dscale, dB)


def _grouped(X, num_groups):
    N, C = X.shape[:2]
    G = C if num_groups == 0 else num_groups  # 0: one group per channel
    if C % G:
        raise ValueError(f"GroupNormalization: {C} channels do not split into {G} groups")
    return X.reshape(N, G, -1), G


def _channel_params(xp, p, C, G, per_group, ndim):
    """Per-channel parameters shaped (1, C, 1…): group parameters repeated per channel."""
    if per_group:
        p = xp.repeat(p, C // G)
    return p.reshape((1, C) + (1,) * (ndim - 2))


def _group_norm(xp, X, scale, bias, epsilon, num_groups, per_group):
    Xg, G = _grouped(X, num_groups)
    xhat, _, _, _ = _standardize(xp, Xg, (2,), epsilon)
    xhat = xhat.reshape(X.shape)
    C = X.shape[1]
    Y = xhat * _channel_params(xp, scale, C, G, per_group, X.ndim) \
        + _channel_params(xp, bias, C, G, per_group, X.ndim)
    return _a(xp, Y, X.dtype)


@op("GroupNormalization", since=18, differentiable=("X", "scale", "bias"))
def GroupNormalization18(xp, X, scale, bias, *, epsilon=1e-5, num_groups):
    # Opset 18: scale and bias hold one value per group.
    return (_group_norm(xp, X, scale, bias, epsilon, num_groups, per_group=1),)


@op("GroupNormalization", since=21, differentiable=("X", "scale", "bias"))
def GroupNormalization(xp, X, scale, bias, *, epsilon=1e-5, num_groups, stash_type=1):
    # Opset 21: scale and bias hold one value per channel.
    return (_group_norm(xp, X, scale, bias, epsilon, num_groups, per_group=0),)


def _group_rule(per_group):
    def rule(g, node, dY):
        X, scale = node.inputs[:2]
        dX, dscale, dB = g.private("GroupNormalizationGrad", dY, X, scale, num_outputs=3,
                                   epsilon=node.attrs["epsilon"],
                                   num_groups=node.attrs["num_groups"], per_group=per_group)
        return (dX, dscale, dB)
    return rule


GroupNormalization18.gradient(_group_rule(1))
GroupNormalization.gradient(_group_rule(0))


@op("GroupNormalizationGrad", domain="onnxgrad")
def GroupNormalizationGrad(xp, dY, X, scale, *, epsilon=1e-5, num_groups=0, per_group=0):
    """dX, dscale, dbias of group normalization (``num_groups=0``: instance normalization)."""
    Xg, G = _grouped(X, num_groups)
    N, C = X.shape[:2]
    xhat, _, _, inv = _standardize(xp, Xg, (2,), epsilon)
    d = dY.astype(xhat.dtype, copy=False)
    axes = (0,) + tuple(range(2, X.ndim))
    dbias = d.sum(axis=axes)
    dscale = (d * xhat.reshape(X.shape)).sum(axis=axes)
    if per_group:
        dbias = dbias.reshape(G, -1).sum(axis=1)
        dscale = dscale.reshape(G, -1).sum(axis=1)
    dxhat = (d * _channel_params(xp, scale, C, G, per_group, X.ndim)).reshape(Xg.shape)
    dX = _standardize_grad(xp, dxhat, xhat, inv, (2,)).reshape(X.shape)
    return (_a(xp, dX, X.dtype), _a(xp, dscale, scale.dtype), _a(xp, dbias, scale.dtype))


@GroupNormalizationGrad.in_standard_ops
def _(g, node):
    # Statistics per (item, group) over the group's channels and positions: X viewed
    # as (N, G, -1); the parameters per channel (or per group, per_group=1).
    dY, X, scale = node.inputs
    groups, per_group = node.attrs.get("num_groups", 0), node.attrs.get("per_group", 0)
    shape = std.tensor_shape(g, X)
    if shape is None or not isinstance(shape[1], int) or len(shape) < 3:
        return None
    C = shape[1]
    G = C if groups == 0 else groups
    nd = len(shape)
    x_shape = g.Shape(X, dtype="int64")
    grouped = g.ints([0, G, -1])
    Xg = g.Reshape(X, grouped)
    axes = g.ints([2])
    mean = g.ReduceMean(Xg, axes, keepdims=1)
    centred = g.Sub(Xg, mean)
    variance = g.ReduceMean(g.Mul(centred, centred), axes, keepdims=1)
    inv = g.Reciprocal(g.Sqrt(g.Add(variance, std.like(g, node.attrs.get("epsilon", 1e-5), X))))
    xhat = g.Reshape(g.Mul(centred, inv), x_shape)
    channel_shape = g.ints([1, C] + [1] * (nd - 2))
    gain = scale
    if per_group:
        gain = g.Reshape(g.Expand(g.Reshape(scale, g.ints([G, 1])), g.ints([G, C // G])),
                         g.ints([C]))
    dxhat = g.Reshape(g.Mul(dY, g.Reshape(gain, channel_shape)), grouped)
    xhat_g = g.Reshape(xhat, grouped)
    m1 = g.ReduceMean(dxhat, axes, keepdims=1)
    m2 = g.ReduceMean(g.Mul(dxhat, xhat_g), axes, keepdims=1)
    dX = g.Reshape(g.Mul(g.Sub(g.Sub(dxhat, m1), g.Mul(xhat_g, m2)), inv), x_shape)
    axes_c = g.ints([0] + list(range(2, nd)))
    dbias = g.ReduceSum(dY, axes_c, keepdims=0)
    dscale = g.ReduceSum(g.Mul(dY, xhat), axes_c, keepdims=0)
    if per_group:
        to_groups = g.ints([G, C // G])
        dbias = g.ReduceSum(g.Reshape(dbias, to_groups), g.ints([1]), keepdims=0)
        dscale = g.ReduceSum(g.Reshape(dscale, to_groups), g.ints([1]), keepdims=0)
    return (dX, dscale, dbias)


# -- Layer and RMS normalization -----------------------------------------------------------


def _trailing(X, axis):
    axis = axis + X.ndim if axis < 0 else axis
    if not 0 <= axis < X.ndim:
        raise ValueError(f"normalization axis {axis} out of range for rank {X.ndim}")
    return tuple(range(axis, X.ndim))


def _compiled_ln(xp, X, axes, *per_position) -> bool:
    """Whether LayerNormalization of ``X`` over ``axes`` runs its compiled kernels:
    ``per_position`` (Scale, B) each None or of the normalised axes' shape."""
    return (X.size > 0 and compiled.available(xp)
            and all(p is None or p.shape == X.shape[axes[0]:] for p in per_position))


def _rows(X, axes):
    """``X`` as (rows, normalised values) in its compute type."""
    return np.ascontiguousarray(X, dtype=_compute_dtype(X)).reshape(
        -1, int(np.prod(X.shape[axes[0]:], dtype=np.int64)))


@compiled.kernel(reassociate=True)
def _ln_kernel(X2, scale, bias, epsilon, Y, mean, inv, start, stop):
    """For the rows ``r`` in ``[start, stop)`` of ``X2``: mean and 1/sqrt(biased
    variance + epsilon) (float64 sums, the second of the values less the mean) into
    ``mean[r]`` and ``inv[r]``; where ``Y`` is not empty, ``Y = (X - mean)·inv·scale
    + bias``."""
    W = X2.shape[1]
    for r in range(start, stop):
        total = 0.0
        for j in range(W):
            total += X2[r, j]
        m = total / W
        squares = 0.0
        for j in range(W):
            d = X2[r, j] - m
            squares += d * d
        k = 1.0 / math.sqrt(squares / W + epsilon)
        mean[r] = m
        inv[r] = k
        if Y.size:
            for j in range(W):
                Y[r, j] = (X2[r, j] - m) * k * scale[j] + bias[j]


@compiled.kernel(reassociate=True)
def _ln_grad_kernel(dY2, X2, scale, mean, inv, dX, dscale, start, stop):
    """LayerNormalizationGrad for the rows in ``[start, stop)`` of ``X2``, given each
    row's ``mean`` and ``inv``; adds the rows' ``dY·xhat`` to ``dscale``.  A saved
    mean is rounded to X's type: the sum of ``X - mean`` measures that rounding,
    and it is taken out."""
    W = X2.shape[1]
    for r in range(start, stop):
        m = mean[r]
        k = inv[r]
        shift = 0.0
        for j in range(W):
            shift += X2[r, j] - m
        centre = m + shift / W
        sum_g = 0.0
        sum_gx = 0.0
        for j in range(W):
            g = dY2[r, j] * scale[j]
            xhat = (X2[r, j] - centre) * k
            sum_g += g
            sum_gx += g * xhat
            dscale[j] += dY2[r, j] * xhat
        m1 = sum_g / W
        m2 = sum_gx / W
        # dX = inv · (dxhat - mean(dxhat) - xhat · mean(dxhat · xhat)), dxhat = dY·scale
        for j in range(W):
            dX[r, j] = k * (dY2[r, j] * scale[j] - m1 - (X2[r, j] - centre) * k * m2)


def _ln_compiled(X, axes, Scale, B, epsilon, normalize=True):
    """Y (or None), mean and inv of LayerNormalization through :func:`_ln_kernel`,
    rows split over the pool; the statistics shaped as the ONNX outputs (kept
    axes), in X's compute type."""
    X2 = _rows(X, axes)
    R, W = X2.shape
    Y = np.empty(X2.shape if normalize else (0, 0), dtype=X2.dtype)
    mean, inv = np.empty(R), np.empty(R)
    scale, bias = (_doubles(a, W) for a in (Scale, B))
    compiled.by_parts(R, X2.size, lambda start, stop: _ln_kernel(
        X2, scale, bias, float(epsilon), Y, mean, inv, start, stop))
    stats = X.shape[:axes[0]] + (1,) * len(axes)
    return ((Y.reshape(X.shape) if normalize else None),
            mean.astype(X2.dtype).reshape(stats), inv.astype(X2.dtype).reshape(stats))


def _ln_grad_compiled(dY, X, axes, Scale, mean, inv):
    """dX and dScale of LayerNormalization through :func:`_ln_grad_kernel`, rows
    split over the pool; each part's dScale sums are added in part order."""
    X2 = _rows(X, axes)
    d = np.ascontiguousarray(dY, dtype=X2.dtype).reshape(X2.shape)
    dX = np.empty(X2.shape, dtype=X2.dtype)
    scale = _doubles(Scale, X2.shape[1])
    mean, inv = (_doubles(a, X2.shape[0]) for a in (mean, inv))

    def part(start, stop):
        dscale = np.zeros(X2.shape[1])
        _ln_grad_kernel(d, X2, scale, mean, inv, dX, dscale, start, stop)
        return dscale

    dscale = sum_in_order(compiled.by_parts(X2.shape[0], X2.size, part))
    return dX.reshape(X.shape), dscale.reshape(Scale.shape)


# Training graphs carry Mean and InvStdDev (train_outputs=3): the gradient reads
# them instead of computing the statistics again.
@op("LayerNormalization", since=17, differentiable=("X", "Scale", "B"), train_outputs=3)
def LayerNormalization(xp, X, Scale, B=None, *, axis=-1, epsilon=1e-5, stash_type=1):
    axes = _trailing(X, axis)
    if _compiled_ln(xp, X, axes, Scale, B):
        Y, mean, inv = _ln_compiled(X, axes, Scale, B, epsilon)
        return _a(xp, Y, X.dtype), mean, inv
    Y, mean, _, inv = _standardize(xp, X, axes, epsilon)
    Y *= Scale  # in place: Y is the standardized input, a fresh array
    if B is not None:
        Y += B
    return _a(xp, Y, X.dtype), mean, inv


@LayerNormalization.gradient
def _(g, node, dY, *extra):
    _no_grad_for_extra_outputs(node, extra)
    X, Scale = node.inputs[:2]
    stats = [o for o in node.outputs[1:3] if o]
    dX, dScale = g.private("LayerNormalizationGrad", dY, X, Scale,
                           *(stats if len(stats) == 2 else ()), num_outputs=2,
                           axis=node.attrs["axis"], epsilon=node.attrs["epsilon"])
    if len(node.inputs) > 2 and node.inputs[2]:
        return (dX, dScale, g.private("SumToShape", dY, g.shape_of(node.inputs[2])))
    return (dX, dScale) + (None,) * (len(node.inputs) - 2)


@op("LayerNormalizationGrad", domain="onnxgrad")
def LayerNormalizationGrad(xp, dY, X, Scale, mean=None, inv_std=None, *, axis=-1,
                           epsilon=1e-5):
    """dX and dScale of LayerNormalization, from the forward pass's statistics when
    given (else computed again), in place on two temporaries."""
    axes = _trailing(X, axis)
    if _compiled_ln(xp, X, axes, Scale) and dY.shape == X.shape:
        if mean is None or inv_std is None:
            _, mean, inv_std = _ln_compiled(X, axes, None, None, epsilon, normalize=False)
        dX, dScale = _ln_grad_compiled(dY, X, axes, Scale, mean, inv_std)
        return _a(xp, dX, X.dtype), _a(xp, dScale, Scale.dtype)
    if mean is None or inv_std is None:
        xhat, _, _, inv_std = _standardize(xp, X, axes, epsilon)
    else:
        xhat = X.astype(inv_std.dtype, copy=False) - mean
        xhat *= inv_std
        _unshift(xp, xhat, xhat.mean(axis=axes, keepdims=True))  # the saved mean's rounding
    d = dY.astype(xhat.dtype, copy=False)
    dxhat = d * Scale
    m1 = dxhat.mean(axis=axes, keepdims=True)
    t = d * xhat
    (dScale,) = SumToShape(xp, t, Scale.shape)
    if dScale is t:  # nothing to sum: t itself, which is reused below
        dScale = t.copy()
    t *= Scale                                   # dxhat * xhat
    m2 = t.mean(axis=axes, keepdims=True)
    del t
    # dX = inv_std · (dxhat - mean(dxhat) - xhat · mean(dxhat · xhat))
    xhat *= m2
    dxhat -= xhat
    dxhat -= m1
    dxhat *= inv_std
    return _a(xp, dxhat, X.dtype), _a(xp, dScale, Scale.dtype)


@LayerNormalizationGrad.in_standard_ops
def _(g, node):
    dY, X, Scale, *stats = node.inputs
    axes = std.trailing_axes(g, X, node.attrs.get("axis", -1))
    if len(stats) == 2 and all(stats):
        mean, inv = stats
    else:
        mean = g.ReduceMean(X, axes, keepdims=1)
        centred = g.Sub(X, mean)
        variance = g.ReduceMean(g.Mul(centred, centred), axes, keepdims=1)
        inv = g.Reciprocal(g.Sqrt(g.Add(variance, std.like(g, node.attrs.get("epsilon", 1e-5), X))))
    xhat = g.Mul(g.Sub(X, mean), inv)
    dxhat = g.Mul(dY, Scale)
    m1 = g.ReduceMean(dxhat, axes, keepdims=1)
    m2 = g.ReduceMean(g.Mul(dxhat, xhat), axes, keepdims=1)
    dX = g.Mul(g.Sub(g.Sub(dxhat, g.Mul(xhat, m2)), m1), inv)
    dScale = g.private("SumToShape", g.Mul(dY, xhat), g.Shape(Scale, dtype="int64"))
    return (dX, dScale)


def _rms(xp, X, axes, epsilon):
    Xc = X.astype(_compute_dtype(X), copy=False)
    inv = 1 / xp.sqrt((Xc * Xc).mean(axis=axes, keepdims=True) + epsilon)
    return Xc * inv, inv


@op("RMSNormalization", since=23, differentiable=("X", "scale"))
def RMSNormalization(xp, X, scale, *, axis=-1, epsilon=1e-5, stash_type=1):
    xhat, _ = _rms(xp, X, _trailing(X, axis), epsilon)
    return (_a(xp, xhat * scale, X.dtype),)


@RMSNormalization.gradient
def _(g, node, dY):
    X, scale = node.inputs
    dX, dscale = g.private("RMSNormalizationGrad", dY, X, scale, num_outputs=2,
                           axis=node.attrs["axis"], epsilon=node.attrs["epsilon"])
    return (dX, dscale)


@op("RMSNormalizationGrad", domain="onnxgrad")
def RMSNormalizationGrad(xp, dY, X, scale, *, axis=-1, epsilon=1e-5):
    axes = _trailing(X, axis)
    xhat, inv = _rms(xp, X, axes, epsilon)
    d = dY.astype(xhat.dtype, copy=False)
    dxhat = d * scale
    dX = inv * (dxhat - xhat * (dxhat * xhat).mean(axis=axes, keepdims=True))
    (dscale,) = SumToShape(xp, d * xhat, scale.shape)
    return _a(xp, dX, X.dtype), _a(xp, dscale, scale.dtype)


@RMSNormalizationGrad.in_standard_ops
def _(g, node):
    dY, X, scale = node.inputs
    axes = std.trailing_axes(g, X, node.attrs.get("axis", -1))
    mean_square = g.ReduceMean(g.Mul(X, X), axes, keepdims=1)
    inv = g.Reciprocal(g.Sqrt(g.Add(mean_square, std.like(g, node.attrs.get("epsilon", 1e-5),
                                                                 X))))
    xhat = g.Mul(X, inv)
    dxhat = g.Mul(dY, scale)
    dX = g.Mul(inv, g.Sub(dxhat, g.Mul(xhat, g.ReduceMean(g.Mul(dxhat, xhat), axes,
                                                                keepdims=1))))
    dscale = g.private("SumToShape", g.Mul(dY, xhat), g.Shape(scale, dtype="int64"))
    return (dX, dscale)


# -- LpNormalization -----------------------------------------------------------------------


def _lp_norm(xp, X, axis, p):
    if p == 1:
        return xp.abs(X).sum(axis=axis, keepdims=True)
    if p == 2:
        return xp.sqrt((X * X).sum(axis=axis, keepdims=True))
    raise ValueError(f"LpNormalization: p must be 1 or 2, got {p}")


@op("LpNormalization", since=1, differentiable=("input",))
def LpNormalization(xp, input, *, axis=-1, p=2):
    norm = _lp_norm(xp, input, axis, p)
    safe = xp.where(norm == 0, 1, norm).astype(input.dtype, copy=False)
    return (_a(xp, input / safe),)


@LpNormalization.gradient
def _(g, node, dY):
    return (g.private("LpNormalizationGrad", dY, node.inputs[0], axis=node.attrs["axis"],
                      p=node.attrs["p"]),)


@op("LpNormalizationGrad", domain="onnxgrad")
def LpNormalizationGrad(xp, dY, X, *, axis=-1, p=2):
    norm = _lp_norm(xp, X, axis, p)
    safe = xp.where(norm == 0, 1, norm).astype(X.dtype, copy=False)
    Y = X / safe
    s = (dY * Y).sum(axis=axis, keepdims=True)
    direction = Y if p == 2 else xp.sign(X)
    return (_a(xp, (dY - direction * s) / safe),)


@LpNormalizationGrad.in_standard_ops
def _(g, node):
    dY, X = node.inputs
    p = node.attrs.get("p", 2)
    if p not in (1, 2):
        return None
    axes = g.ints([node.attrs.get("axis", -1)])
    if p == 1:
        norm = g.ReduceSum(g.Abs(X), axes, keepdims=1)
    else:
        norm = g.Sqrt(g.ReduceSum(g.Mul(X, X), axes, keepdims=1))
    zero, one = std.like(g, 0, X), std.like(g, 1, X)
    safe = g.Where(g.Equal(norm, zero), one, norm)
    Y = g.Div(X, safe)
    s = g.ReduceSum(g.Mul(dY, Y), axes, keepdims=1)
    direction = Y if p == 2 else g.Sign(X)
    return (g.Div(g.Sub(dY, g.Mul(direction, s)), safe),)


# -- LRN and MeanVarianceNormalization ------------------------------------------------------

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


@op("LRNGrad", domain="onnxgrad")
def LRNGrad(xp, dY, X, *, size, alpha=0.0001, beta=0.75, bias=1.0):
    """dX = dY·D^-β - (2αβ/size)·X·Σ_window'(dY·X·D^(-β-1)), D = bias + α/size·Σ_window X²;
    the adjoint window Σ_window' runs over the channels whose window holds c."""
    before, after = _lrn_window(size)
    x, dy = X.astype(xp.float64), dY.astype(xp.float64)
    D = bias + (alpha / size) * _channel_window_sum(xp, x * x, before, after)
    back = _channel_window_sum(xp, dy * x * D ** (-beta - 1), after, before)
    return ((dy * D ** -beta - (2 * alpha * beta / size) * x * back).astype(dY.dtype),)


def _in_float64(g, value):
    """``value`` cast to float64 (where the kernels compute), unless it is already."""
    if g.dtype(value) == np.float64:
        return value
    return g.Cast(value, to=std.tensor_type(np.float64), dtype=np.float64)


def _back_to(g, value, of):
    """A float64 ``value`` cast back to the element type of ``of``."""
    return value if g.dtype(of) == np.float64 else std.cast_like(g, value, of)


def _channel_window_sum_in_standard_ops(g, V, before, after):
    """:func:`_channel_window_sum` as standard nodes: a Pad of axis 1 and its slices."""
    padded = g.Pad(V, g.ints([before, after]), None, g.ints([1]), mode="constant")
    width = before + after
    terms = [g.Slice(padded, g.ints([k]), g.ints([k - width if k < width else std.END]),
                     g.ints([1])) for k in range(width + 1)]
    return terms[0] if len(terms) == 1 else g.Sum(*terms)


@LRNGrad.in_standard_ops
def _(g, node):
    dY, X = node.inputs
    size = int(node.attrs["size"])
    alpha = float(node.attrs.get("alpha", 0.0001))
    beta = float(node.attrs.get("beta", 0.75))
    bias = float(node.attrs.get("bias", 1.0))
    before, after = _lrn_window(size)
    x, dy = _in_float64(g, X), _in_float64(g, dY)
    total = _channel_window_sum_in_standard_ops(g, g.Mul(x, x), before, after)
    D = g.Add(std.like(g, bias, x), g.Mul(std.like(g, alpha / size, x), total))
    weighted = g.Mul(g.Mul(dy, x), g.Pow(D, std.like(g, -beta - 1, x)))
    back = _channel_window_sum_in_standard_ops(g, weighted, after, before)
    dX = g.Sub(g.Mul(dy, g.Pow(D, std.like(g, -beta, x))),
               g.Mul(g.Mul(std.like(g, 2 * alpha * beta / size, x), x), back))
    return (_back_to(g, dX, dY),)


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


@op("MeanVarianceNormalizationGrad", domain="onnxgrad")
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


@MeanVarianceNormalizationGrad.in_standard_ops
def _(g, node):
    dY, X = node.inputs
    axes = g.ints([int(a) for a in node.attrs.get("axes", (0, 2, 3))])
    x, dy = _in_float64(g, X), _in_float64(g, dY)
    zero, one = std.like(g, 0.0, x), std.like(g, 1.0, x)
    centred = g.Sub(x, g.ReduceMean(x, axes, keepdims=1))
    sigma = g.Sqrt(g.Max(g.ReduceMean(g.Mul(centred, centred), axes, keepdims=1), zero))
    d = g.Add(sigma, std.like(g, _MVN_EPSILON, x))
    scaled = g.Div(dy, d)
    spread = g.Div(g.ReduceMean(g.Mul(dy, centred), axes, keepdims=1),
                   g.Mul(g.Mul(d, d), g.Where(g.Greater(sigma, zero), sigma, one)))
    dX = g.Sub(g.Sub(scaled, g.ReduceMean(scaled, axes, keepdims=1)), g.Mul(centred, spread))
    return (_back_to(g, dX, dY),)


# -- BatchNormalization synchronised between the ranks of data-parallel training ----------
#
# onnxgrad.distributed.use_sync_batchnorm turns a training graph's BatchNormalization nodes
# and their gradients into these two ops, which reduce through the run's communicator
# (``ctx.state.comm``).  Tested under mpiexec in tests/test_distributed.py.


def _as_channels(X):
    """X as (N, C, P), in the type its statistics are computed in (float32 at least)."""
    dtype = np.float32 if X.dtype.itemsize < 4 else X.dtype
    return X.astype(dtype, copy=False).reshape(X.shape[0], X.shape[1], -1)


def _per_channel(values, like):
    """Per-channel ``values`` (C,) as ``like``'s type, shaped (1, C, 1) to broadcast."""
    return values.astype(like.dtype).reshape(1, -1, 1)


def _summed(ctx, values):
    """``values`` (float64, on the device) summed over the ranks, in place."""
    comm = ctx.state.comm
    if comm is None:
        raise OnnxgradError(f"node {ctx.node.name!r} ({ctx.node.op_type}) runs in a trainer "
                            "without a communicator (comm=...)")
    comm.allreduce(values)
    return values


@op("SyncBatchNormalization", domain="onnxgrad")
def SyncBatchNormalization(xp, X, scale, B, input_mean, input_var, *, epsilon=1e-5,
                           momentum=0.9, spatial=1, training_mode=0, ctx):
    """BatchNormalization (outputs: Y, running mean, running var, batch mean, batch var)
    whose batch statistics in a training step are those of every rank's batch together:
    per-channel sums and counts, then sums of deviations and of their squares (the
    shifted-data algorithm), each all-reduced in float64.  Outside training steps it
    is BatchNormalization with the running statistics (or, with ``training_mode``,
    this rank's batch statistics)."""
    node = ctx.node
    if not spatial and X.ndim > 2:
        raise UnsupportedOpError("BatchNormalization", "", node.opset, node.name,
                                 what="sync_batchnorm with spatial=0 (per-element statistics)")
    if not ctx.training and not training_mode:
        shape = (1, -1) + (1,) * (X.ndim - 2)
        inv = 1 / xp.sqrt(input_var + epsilon)
        Y = (X - input_mean.reshape(shape)) * (scale * inv).reshape(shape) + B.reshape(shape)
        outs = (Y.astype(X.dtype, copy=False), input_mean, input_var, input_mean, input_var)
        return outs[:max(ctx.num_outputs, 1)]
    X3 = _as_channels(X)
    C = X3.shape[1]
    first = xp.empty(C + 1, dtype=np.float64)  # sums and the count
    first[:C] = X3.sum(axis=(0, 2), dtype=np.float64)
    first[C] = X3.shape[0] * X3.shape[2]
    if ctx.training:
        _summed(ctx, first)
    count = first[C]
    guess = first[:C] / count
    D = X3 - _per_channel(guess, X3)
    second = xp.empty(2 * C, dtype=np.float64)  # sums of the deviations, and of their squares
    second[:C] = D.sum(axis=(0, 2), dtype=np.float64)
    second[C:] = (D * D).sum(axis=(0, 2), dtype=np.float64)
    if ctx.training:
        _summed(ctx, second)
    shift = second[:C] / count  # the rounding of the guess, taken out
    var = xp.maximum(second[C:] / count - shift * shift, 0)
    a = scale.astype(np.float64) / xp.sqrt(var + epsilon)
    D *= _per_channel(a, X3)
    D += _per_channel(B.astype(np.float64) - shift * a, X3)
    Y = D.reshape(X.shape).astype(X.dtype, copy=False)
    bmean = (guess.astype(X3.dtype).astype(np.float64) + shift).astype(input_mean.dtype)
    bvar = var.astype(input_var.dtype)
    new_mean = input_mean * momentum + bmean * (1 - momentum)
    if ctx.training:
        unbiased = (var * (count / xp.maximum(count - 1, 1))).astype(input_var.dtype)
        names = node.inputs
        if len(names) > 4 and names[3] and names[4]:
            ctx.state.updates[names[3]] = new_mean
            ctx.state.updates[names[4]] = input_var * momentum + unbiased * (1 - momentum)
    outs = (Y, new_mean, input_var * momentum + bvar * (1 - momentum), bmean, bvar)
    return outs[:max(ctx.num_outputs, 1)]


@op("SyncBatchNormalizationGrad", domain="onnxgrad")
def SyncBatchNormalizationGrad(xp, dY, X, scale, batch_mean, batch_var, *, epsilon=1e-5,
                               ctx):
    """dX, dscale, dB of SyncBatchNormalization.  dX needs the sums of dY and dY·x̂ over
    every rank's batch (all-reduced with the count); dscale and dB are this rank's
    sums, which the gradient averaging then combines like any other weight's."""
    X3 = _as_channels(X)
    C = X3.shape[1]
    d = dY.astype(X3.dtype, copy=False).reshape(X3.shape)
    inv = 1 / xp.sqrt(batch_var.astype(np.float64) + epsilon)
    xhat = (X3 - _per_channel(batch_mean, X3)) * _per_channel(inv, X3)
    local = xp.empty(2 * C + 1, dtype=np.float64)
    local[:C] = d.sum(axis=(0, 2), dtype=np.float64)
    local[C:2 * C] = (d * xhat).sum(axis=(0, 2), dtype=np.float64)
    local[2 * C] = X3.shape[0] * X3.shape[2]
    total = _summed(ctx, local.copy())
    count = total[2 * C]
    # dX = scale·inv · (dY - mean(dY) - x̂·mean(dY·x̂)), the means over every rank's batch
    xhat *= _per_channel(total[C:2 * C] / count, X3)
    dX = (d - _per_channel(total[:C] / count, X3) - xhat) * _per_channel(scale * inv, X3)
    return (dX.reshape(X.shape).astype(X.dtype, copy=False),
            local[C:2 * C].astype(scale.dtype), local[:C].astype(scale.dtype))
