"""Signal processing: DFT, STFT, the Hann/Hamming/Blackman windows and MelWeightMatrix.

Complex tensors are real tensors with a last axis of 2 (real, imaginary); a
last axis of 1 holds a real signal.  Transforms use ``xp.fft`` in the input's
precision (float32 stays single) and return the input's type.  Forward only
(DFT's and STFT's inputs are declared differentiable without a rule).
"""

from __future__ import annotations

import math

from onnxgrad.errors import ModelError
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


def _scalar_int(value) -> int:
    return int(value.reshape(-1)[0]) if hasattr(value, "reshape") else int(value)


def _dft(xp, input, dft_length, axis, inverse, onesided):
    axis = axis % input.ndim
    if axis == input.ndim - 1:
        raise ModelError("DFT: axis must not be the last (real/imaginary) axis")
    z = _complex(xp, input)
    if dft_length is None:
        n = 2 * (input.shape[axis] - 1) if inverse and onesided else input.shape[axis]
    else:
        n = _scalar_int(dft_length)
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


@op("STFT", since=17, differentiable=("signal", "window"),
    host_inputs=("frame_step", "frame_length"))
def STFT(xp, signal, frame_step, window=None, frame_length=None, *, onesided=1):
    step = _scalar_int(frame_step)
    if frame_length is not None:
        length = _scalar_int(frame_length)
    elif window is not None:
        length = int(window.shape[0])
    else:
        raise ModelError("STFT needs a window or a frame_length")
    z = _complex(xp, signal)  # [batch, samples]
    frames = 1 + (z.shape[1] - length) // step
    if frames < 1:
        raise ModelError(f"STFT: a signal of {z.shape[1]} samples holds no frame of {length}")
    starts = xp.arange(frames) * step
    index = starts[:, None] + xp.arange(length)[None, :]
    framed = z[:, index]  # [batch, frames, length]
    if window is not None:
        framed = framed * window.astype(framed.real.dtype)
    out = xp.fft.fft(framed, n=length, axis=-1)
    if onesided:
        out = out[..., :length // 2 + 1]
    return (_pair(xp, out, signal.dtype),)


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
