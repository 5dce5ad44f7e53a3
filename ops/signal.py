"""Signal processing: DFT, STFT, the Hann/Hamming/Blackman windows and MelWeightMatrix.

Complex tensors are real tensors with a last axis of 2 (real, imaginary); a
last axis of 1 holds a real signal.  Transforms use ``xp.fft`` in the input's
precision (float32 stays single) and return the input's type.

Both transforms are linear, so their gradients are adjoints, computed by the
private ``onnxgrad::DFTGrad`` and ``onnxgrad::STFTGrad``: ``A^H dY`` for a
complex-linear map ``A`` (an inverse transform for a forward one, with the
padding or truncation to ``dft_length`` undone), and for a one-sided inverse
(``irfft``, whose input's bins other than the first and the Nyquist ones count
twice through their Hermitian mirror images) the weighted one-sided transform.
A real input's gradient is the real part.  Their standard forms (for ``onnxgrad convert``
and second-order gradients) are the same adjoints in ONNX's own DFT, with the frames of
STFT gathered and overlap-added by ScatterND; they need the lengths static.
"""

from __future__ import annotations

import math

import numpy as np  # host constants of the standard forms only (weights, frame indices)

from onnxgrad.errors import ModelError
from onnxgrad.ops import standard as std
from onnxgrad.ops.reduce import constant_value
from onnxgrad.ops.registry import op


def _np_dtype(onnx_type: int):
    from onnx.helper import tensor_dtype_to_np_dtype  # noqa: PLC0415 - type codes only

    return tensor_dtype_to_np_dtype(int(onnx_type))


def _complex(xp, x):
    # float32 signals are transformed in single precision, as NumPy >= 2 does (and as the
    # ONNX suite's expected values are made); anything else in double precision.
    real = xp.float32 if x.dtype == xp.float32 else xp.float64
    if x.shape[-1] == 1:
        return x[..., 0].astype(real)
    if x.shape[-1] == 2:
        return x[..., 0].astype(real) + 1j * x[..., 1].astype(real)
    raise ModelError(f"a signal's last axis must be 1 (real) or 2 (complex), got {x.shape[-1]}")


def _pair(xp, z, dtype):
    return xp.stack([z.real, z.imag], axis=-1).astype(dtype)


def _gradient_of(xp, z, like_last: int, dtype):
    """The gradient of a signal (last axis ``like_last``) from its complex gradient ``z``."""
    return z.real[..., None].astype(dtype) if like_last == 1 else _pair(xp, z, dtype)


def _fit(xp, z, length: int, axis: int):
    """``z`` truncated or zero-padded to ``length`` along ``axis``."""
    if z.shape[axis] >= length:
        return xp.take(z, xp.arange(length), axis=axis)
    pad = [(0, 0)] * z.ndim
    pad[axis] = (0, length - z.shape[axis])
    return xp.pad(z, pad)


def _scalar_int(value) -> int:
    return int(value.reshape(-1)[0]) if hasattr(value, "reshape") else int(value)


def _dft_geometry(shape, dft_length, axis, inverse, onesided):
    """``(axis, n)``: the transformed axis (non-negative) and the transform's length."""
    axis = axis % len(shape)
    if axis == len(shape) - 1:
        raise ModelError("DFT: axis must not be the last (real/imaginary) axis")
    if dft_length is not None:
        return axis, _scalar_int(dft_length)
    return axis, 2 * (shape[axis] - 1) if inverse and onesided else shape[axis]


def _dft(xp, input, dft_length, axis, inverse, onesided):
    axis, n = _dft_geometry(input.shape, dft_length, axis, inverse, onesided)
    z = _complex(xp, input)
    if inverse:
        if onesided:  # one-sided spectrum in, real signal out
            return (xp.fft.irfft(z, n=n, axis=axis)[..., None].astype(input.dtype),)
        return (_pair(xp, xp.fft.ifft(z, n=n, axis=axis), input.dtype),)
    out = xp.fft.fft(z, n=n, axis=axis)
    if onesided:
        out = xp.take(out, xp.arange(n // 2 + 1), axis=axis)
    return (_pair(xp, out, input.dtype),)


@op("DFT", since=20, differentiable=("input",), host_inputs=("dft_length", "axis"))
def DFT(xp, input, dft_length=None, axis=None, *, inverse=0, onesided=0):
    a = -2 if axis is None else _scalar_int(axis)
    return _dft(xp, input, dft_length, a, inverse, onesided)


@op("DFT", since=17, differentiable=("input",), host_inputs=("dft_length",))
def DFT17(xp, input, dft_length=None, *, axis=1, inverse=0, onesided=0):
    return _dft(xp, input, dft_length, axis, inverse, onesided)


@DFT.gradient
@DFT17.gradient
def _(g, node, dY):
    input, dft_length, axis = (list(node.inputs) + ["", ""])[:3]
    if "axis" in node.attrs:  # opset 17: an attribute
        axis = g.ints([node.attrs["axis"]])
    grad = g.private("DFTGrad", dY, g.shape_of(input), dft_length or None, axis or None,
                     inverse=node.attrs["inverse"], onesided=node.attrs["onesided"])
    return (grad,) + (None,) * (len(node.inputs) - 1)


@op("DFTGrad", domain="onnxgrad", host_inputs=("input_shape", "dft_length", "axis"))
def DFTGrad(xp, dY, input_shape, dft_length=None, axis=None, *, inverse=0, onesided=0):
    """The gradient of DFT's input (of shape ``input_shape``) from its output's, ``dY``."""
    shape = tuple(int(d) for d in input_shape)
    axis, n = _dft_geometry(shape, dft_length, -2 if axis is None else _scalar_int(axis),
                            inverse, onesided)
    dz = _complex(xp, dY)
    if inverse and onesided:  # y = irfft(x): bins with a mirror image count twice
        weight = xp.full(n // 2 + 1, 2.0 / n)
        weight[0] = 1.0 / n
        if n % 2 == 0:
            weight[-1] = 1.0 / n
        view = [1] * dz.ndim
        view[axis] = n // 2 + 1
        grad = xp.fft.rfft(dz.real, n=n, axis=axis) * weight.reshape(view).astype(dz.real.dtype)
    elif inverse:  # y = conj(F) x / n
        grad = xp.fft.fft(dz, n=n, axis=axis) / n
    else:  # y = F x (its first n // 2 + 1 bins if one-sided): the rest of dY is zero
        grad = xp.fft.ifft(dz, n=n, axis=axis) * n
    return (_gradient_of(xp, _fit(xp, grad, shape[axis], axis), shape[-1], dY.dtype),)


def _work_type(g, value: str):
    """The precision the kernels transform ``value`` in: float32 stays single, anything
    else runs in double (as ``_complex``); None where the element type is unknown."""
    dtype = g.graph.dtype(value)
    if dtype is None:
        return None
    return np.dtype(np.float32) if dtype == np.float32 else np.dtype(np.float64)


def _to(g, value: str, dtype) -> str:
    """``value`` cast to ``dtype`` (itself where it already is)."""
    if g.dtype(value) == np.dtype(dtype):
        return value
    return g.Cast(value, to=std.tensor_type(dtype), dtype=dtype)


def _standard_dft(g, x: str, n: int, axis: int, inverse: int = 0, onesided: int = 0) -> str:
    """ONNX DFT of ``x`` along ``axis`` in the graph's own opset: from opset 20 the axis
    is an input, before it an attribute (step models keep the graph's opset, 18 at least)."""
    if max(g.graph.opsets.get("", 0), g.graph.opsets.get("ai.onnx", 0)) >= 20:
        return g.DFT(x, std.i64(g, n), std.i64(g, axis), inverse=inverse, onesided=onesided)
    out = g.DFT(x, std.i64(g, n), axis=axis, inverse=inverse, onesided=onesided)
    g.graph.nodes[-1].opset = 17  # the node just appended: run by DFT-17's definition
    return out


@DFTGrad.in_standard_ops
def _(g, node):
    """The kernel's adjoint as one standard DFT of the other direction, scaled (weighted
    for a one-sided inverse), fitted to the input's length along the axis and reduced to
    its real part for a real input.  Needs the input's rank, its length along the axis
    and its last axis static, and ``dft_length`` and ``axis`` constant."""
    dY, input_shape, dft_length, axis = (list(node.inputs) + ["", ""])[:4]
    shape = std.shape_value(g, input_shape)
    length = constant_value(g, dft_length) if dft_length else None
    a = constant_value(g, axis) if axis else np.array(-2)
    if shape is None or a is None or (dft_length and length is None):
        return None
    inverse, onesided = node.attrs.get("inverse", 0), node.attrs.get("onesided", 0)
    axis, n = _dft_geometry(shape, length, _scalar_int(a), inverse, onesided)
    if not isinstance(shape[axis], int) or shape[-1] not in (1, 2) or n < 1:
        return None
    work = _work_type(g, dY)
    if work is None:
        return None
    dz = _to(g, dY, work)
    if inverse and onesided:  # y = irfft(x): the weighted one-sided transform of dY
        weight = np.full(n // 2 + 1, 2.0 / n)
        weight[0] = 1.0 / n
        if n % 2 == 0:
            weight[-1] = 1.0 / n
        weight = weight.astype(work).reshape([n // 2 + 1] + [1] * (len(shape) - 1 - axis))
        grad = g.Mul(_standard_dft(g, dz, n, axis, onesided=1), g.const(weight, dtype=work))
        got = n // 2 + 1
    elif inverse:  # y = conj(F) x / n
        grad = g.Div(_standard_dft(g, dz, n, axis), g.const(n, dtype=work))
        got = n
    else:  # y = F x: dY (zero-padded past a one-sided spectrum) transformed back
        grad = g.Mul(_standard_dft(g, dz, n, axis, inverse=1), g.const(n, dtype=work))
        got = n
    want = shape[axis]
    if got > want:
        grad = g.Slice(grad, g.ints([0]), g.ints([want]), g.ints([axis]))
    elif got < want:
        grad = g.Pad(grad, g.ints([0, want - got]), None, g.ints([axis]), mode="constant")
    if shape[-1] == 1:
        grad = g.Slice(grad, g.ints([0]), g.ints([1]), g.ints([-1]))
    return (_to(g, grad, g.dtype(dY)),)


def _stft_frames(signal_length: int, step: int, length: int):
    """The start of each frame."""
    frames = 1 + (signal_length - length) // step
    if frames < 1:
        raise ModelError(f"STFT: a signal of {signal_length} samples holds no frame of {length}")
    return [i * step for i in range(frames)]


def _stft_length(frame_length, window) -> int:
    if frame_length is not None:
        return _scalar_int(frame_length)
    if window is not None:
        return int(window.shape[0])
    raise ModelError("STFT needs a window or a frame_length")


@op("STFT", since=17, differentiable=("signal", "window"),
    host_inputs=("frame_step", "frame_length"))
def STFT(xp, signal, frame_step, window=None, frame_length=None, *, onesided=1):
    length = _stft_length(frame_length, window)
    z = _complex(xp, signal)  # [batch, samples]
    starts = xp.asarray(_stft_frames(z.shape[1], _scalar_int(frame_step), length))
    index = starts[:, None] + xp.arange(length)[None, :]
    framed = z[:, index]  # [batch, frames, length]
    if window is not None:
        framed = framed * window.astype(framed.real.dtype)
    out = xp.fft.fft(framed, n=length, axis=-1)
    if onesided:
        out = out[..., :length // 2 + 1]
    return (_pair(xp, out, signal.dtype),)


@STFT.gradient
def _(g, node, dY):
    signal, frame_step, window, frame_length = (list(node.inputs) + ["", ""])[:4]
    grads = g.private("STFTGrad", dY, signal, frame_step, window or None, frame_length or None,
                      onesided=node.attrs["onesided"], num_outputs=2)
    return (grads[0], None, grads[1] if window else None, None)[:len(node.inputs)]


@op("STFTGrad", domain="onnxgrad", host_inputs=("frame_step", "frame_length"))
def STFTGrad(xp, dY, signal, frame_step, window=None, frame_length=None, *, onesided=1):
    """Gradients of STFT's signal and window (an empty array without a window) from dY."""
    length = _stft_length(frame_length, window)
    z = _complex(xp, signal)
    starts = _stft_frames(z.shape[1], _scalar_int(frame_step), length)
    # the gradient of each windowed frame: the adjoint of its (one-sided) transform
    dframe = xp.fft.ifft(_complex(xp, dY), n=length, axis=-1) * length  # [batch, frames, length]
    dwindow = xp.zeros((0,), dtype=signal.dtype)
    if window is not None:
        index = xp.asarray(starts)[:, None] + xp.arange(length)[None, :]
        dwindow = (dframe.conj() * z[:, index]).real.sum(axis=(0, 1)).astype(window.dtype)
        dframe = dframe * window.astype(dframe.real.dtype)
    dz = xp.zeros(z.shape, dtype=dframe.dtype)
    for f, start in enumerate(starts):  # overlapping frames add up
        dz[:, start:start + length] += dframe[:, f]
    return (_gradient_of(xp, dz, signal.shape[-1], signal.dtype), dwindow)


@STFTGrad.in_standard_ops
def _(g, node):
    """Each frame's gradient by one standard inverse DFT (scaled), the window's gradient
    as a sum over frames gathered from the signal, and the overlap-add as one ScatterND
    that adds the frames' samples into zeros.  Needs the signal's length and last axis
    static and ``frame_step`` and the frame length constant."""
    dY, signal, frame_step, window, frame_length = (list(node.inputs) + ["", ""])[:5]
    shape = std.tensor_shape(g, signal)
    step = constant_value(g, frame_step)
    if frame_length:
        length = constant_value(g, frame_length)
        length = None if length is None else _scalar_int(length)
    else:
        length = (std.tensor_shape(g, window) or (None,))[0] if window else None
    if shape is None or len(shape) != 3 or step is None or not isinstance(length, int):
        return None
    samples, last = shape[1], shape[2]
    step = _scalar_int(step)
    if not isinstance(samples, int) or last not in (1, 2) or step < 1 or length < 1:
        return None
    frames = 1 + (samples - length) // step
    if frames < 1:
        return None
    work = _work_type(g, signal)
    if work is None or g.graph.dtype(dY) is None or (window and g.graph.dtype(window) is None):
        return None
    # [batch, frames, length, 2]: the adjoint of each frame's (one-sided) transform
    dframe = g.Mul(_standard_dft(g, _to(g, dY, work), length, 2, inverse=1),
                   g.const(length, dtype=work))
    starts = np.arange(frames, dtype=np.int64) * step
    index = starts[:, None] + np.arange(length, dtype=np.int64)[None, :]  # [frames, length]
    if window:
        framed = g.Gather(_to(g, signal, work), g.const(index, dtype=np.int64), axis=1)
        part = dframe if last == 2 else g.Slice(dframe, g.ints([0]), g.ints([1]), g.ints([3]))
        dwindow = g.ReduceSum(g.Mul(part, framed), g.ints([0, 1, 3]), keepdims=0)
        dwindow = _to(g, dwindow, g.dtype(window))
        dframe = g.Mul(dframe, g.Unsqueeze(_to(g, window, work), g.ints([1])))
    else:
        dwindow = g.const(np.zeros((0,), dtype=g.dtype(signal)), dtype=g.dtype(signal))
    # overlap-add: [frames * length, batch, 2] added into zeros of [samples, batch, 2]
    updates = g.Transpose(g.Reshape(dframe, g.ints([0, frames * length, 2])), perm=[1, 0, 2])
    batch = g.Shape(signal, start=0, end=1, dtype="int64")
    zeros = std.zeros(g, g.Concat(g.ints([samples]), batch, g.ints([2]), axis=0,
                                  dtype="int64"), updates)
    added = g.ScatterND(zeros, g.const(index.reshape(-1, 1), dtype=np.int64), updates,
                        reduction="add")
    dz = g.Transpose(added, perm=[1, 0, 2])
    if last == 1:
        dz = g.Slice(dz, g.ints([0]), g.ints([1]), g.ints([2]))
    return (_to(g, dz, g.dtype(signal)), dwindow)


# -- windows --------------------------------------------------------------------------------
def _window(xp, size, periodic, output_datatype, coefficients):
    n = _scalar_int(size)
    if n <= 0:
        return (xp.zeros((0,), dtype=_np_dtype(output_datatype)),)
    denominator = n if periodic else max(n - 1, 1)
    k = 2 * math.pi * xp.arange(n, dtype=xp.float64) / denominator
    y = sum(a * xp.cos(i * k) for i, a in enumerate(coefficients))
    return (y.astype(_np_dtype(output_datatype)),)


@op("HannWindow", since=17, host_inputs=("size",))
def HannWindow(xp, size, *, output_datatype=1, periodic=1):
    return _window(xp, size, periodic, output_datatype, (0.5, -0.5))


@op("HammingWindow", since=17, host_inputs=("size",))
def HammingWindow(xp, size, *, output_datatype=1, periodic=1):
    return _window(xp, size, periodic, output_datatype, (25 / 46, -21 / 46))


@op("BlackmanWindow", since=17, host_inputs=("size",))
def BlackmanWindow(xp, size, *, output_datatype=1, periodic=1):
    return _window(xp, size, periodic, output_datatype, (0.42, -0.5, 0.08))


@op("MelWeightMatrix", since=17,
    host_inputs=("num_mel_bins", "dft_length", "sample_rate", "lower_edge_hertz",
                 "upper_edge_hertz"))
def MelWeightMatrix(xp, num_mel_bins, dft_length, sample_rate, lower_edge_hertz,
                    upper_edge_hertz, *, output_datatype=1):
    """Triangular filters evenly spaced on the mel scale (as ONNX's reference builds them)."""
    bins = _scalar_int(num_mel_bins)
    n_fft = _scalar_int(dft_length)
    rate = _scalar_int(sample_rate)
    low = float(lower_edge_hertz.reshape(-1)[0])
    high = float(upper_edge_hertz.reshape(-1)[0])
    spectrogram_bins = n_fft // 2 + 1
    low_mel = 2595 * math.log1p(low / 700) / math.log(10)
    high_mel = 2595 * math.log1p(high / 700) / math.log(10)
    step = (high_mel - low_mel) / (bins + 2)
    edges = []
    for i in range(bins + 2):
        hz = 700 * math.expm1((i * step + low_mel) / 2595 * math.log(10))
        edges.append(int(((n_fft + 1) * hz) // rate))
    out = [[0.0] * bins for _ in range(spectrogram_bins)]
    for i in range(bins):
        left, centre, right = edges[i], edges[i + 1], edges[i + 2]
        if centre == left:
            out[centre][i] = 1.0
        else:
            for j in range(left, centre + 1):
                out[j][i] = (j - left) / (centre - left)
        if right > centre:
            for j in range(centre, right):
                out[j][i] = (right - j) / (right - centre)
    return (xp.asarray(out, dtype=xp.float64).astype(_np_dtype(output_datatype)),)
