"""Quantization: QuantizeLinear, DequantizeLinear, DynamicQuantizeLinear and the
integer products QLinearMatMul, MatMulInteger, ConvInteger and QLinearConv.

Scales and zero points are per tensor (scalars), per axis (1-D along
``axis``) or, from opset 21, per block (``block_size`` elements along
``axis``).  Integer targets round half to even and saturate; float8 targets
saturate unless ``saturate=0``.

Gradients: DequantizeLinear's ``x_scale`` has one (``y = (x - zero_point) ·
scale`` is linear in the scale).  QuantizeLinear's gradient is that of the
standard ops it is made of, with the conventions those ops already have:

* to an integer type it is ``Cast(Clip(Round(x / y_scale) + zero_point))``: Round is
  piecewise constant and declared non-differentiable (as Floor, Ceil and Sign), and
  integer values carry no gradient (as a Cast to an integer type), so no gradient
  flows back through an integer output (the true derivative is zero almost
  everywhere).  No straight-through estimator is applied: a weight whose only path
  to the loss is a QuantizeLinear (a QuantizeLinear/DequantizeLinear pair, say) has
  no gradient path, and the Trainer says so rather than train it with zeros; one
  that also reaches the loss another way gets that way's gradient alone.
* to a float8/float4 type it is ``Cast(x / y_scale (+ zero_point), to)``, and a Cast
  between float types passes the gradient straight through its rounding (and its
  saturation), so ``dx = dy / y_scale`` and ``dy_scale = -Σ dy·x / y_scale²``
  (:func:`QuantizeLinearGrad`): the same gradient as the Div and Cast it stands for.

DynamicQuantizeLinear's ``x`` is declared differentiable without a rule (its
float ``y_scale`` output depends on ``x``), so asking raises UnsupportedOpError.
"""

from __future__ import annotations

import math

import numpy as np  # host constants of standard forms

from onnxgrad.errors import ModelError
from onnxgrad.ir import ValueInfo
from onnxgrad.ops import standard as std
from onnxgrad.ops.castlike import cast_array
from onnxgrad.ops.registry import op
from onnxgrad.ops.shape import element_dtype, is_float

#: ONNX element types a quantized tensor may have, by numpy/ml_dtypes name.
_INT_RANGES = {
    "uint8": (0, 255), "int8": (-128, 127), "uint16": (0, 65535), "int16": (-32768, 32767),
    "uint4": (0, 15), "int4": (-8, 7), "uint2": (0, 3), "int2": (-2, 1),
}


def _np_dtype(onnx_type: int):
    from onnx.helper import tensor_dtype_to_np_dtype  # noqa: PLC0415 - type codes only

    return tensor_dtype_to_np_dtype(int(onnx_type))


def _broadcastable(xp, value, shape, axis: int, block_size: int):
    """A scale or zero point reshaped (or repeated, per block) to broadcast against ``shape``."""
    if value.ndim == 0:
        return value
    if value.size == 1 and not block_size:
        return value.reshape(())
    axis = axis % len(shape)
    if not block_size:
        if value.ndim != 1 or value.shape[0] != shape[axis]:
            raise ModelError(f"a per-axis scale/zero point of shape {list(value.shape)} does not "
                             f"fit axis {axis} of an input of shape {list(shape)}")
        dims = [1] * len(shape)
        dims[axis] = value.size
        return value.reshape(dims)
    value = xp.repeat(value, block_size, axis=axis)
    if value.shape[axis] != shape[axis]:
        value = xp.take(value, xp.arange(shape[axis]), axis=axis)
    if tuple(value.shape) != tuple(shape):
        raise ModelError(f"a blocked scale/zero point of shape {list(value.shape)} (after "
                         f"repeating {block_size} times) does not fit an input of shape "
                         f"{list(shape)}")
    return value


@op("QuantizeLinear", since=10, differentiable=("x", "y_scale"))
def QuantizeLinear(xp, x, y_scale, y_zero_point=None, *, axis=1, saturate=1, block_size=0,
                   output_dtype=0, precision=0):
    if y_zero_point is not None:
        dtype = y_zero_point.dtype
    elif output_dtype:
        dtype = _np_dtype(output_dtype)
    else:
        dtype = xp.dtype("uint8")
    scale = _broadcastable(xp, y_scale, x.shape, axis, block_size)
    if precision:
        p = _np_dtype(precision)
        q = x.astype(p) / scale.astype(p)
    else:
        q = x / scale
    name = getattr(dtype, "name", str(dtype))
    if name in _INT_RANGES:
        qi = xp.rint(q).astype(xp.int32)
        if y_zero_point is not None:
            qi = qi + _broadcastable(xp, y_zero_point, x.shape, axis, block_size).astype(xp.int32)
        low, high = _INT_RANGES[name]
        return (xp.clip(qi, low, high).astype(dtype),)
    if name.startswith("float4") or name.startswith("float6"):
        if y_zero_point is not None:
            q = q + _broadcastable(xp, y_zero_point, x.shape, axis, block_size).astype(xp.float32)
        return (q.astype(xp.float32).astype(dtype),)
    if name.startswith("float8"):
        return (cast_array(xp, q, dtype, saturate=saturate),)
    raise ModelError(f"QuantizeLinear: {name} is not a quantized type")


@QuantizeLinear.gradient
def _(g, node, dY):
    x, y_scale, *zero_point = node.inputs
    none = (None,) * len(zero_point)
    if not is_float(_quantized_type(g, node)):
        # Unreachable from a loss: an integer output carries no gradient (see the module
        # docstring), so asking raises UnsupportedOpError, never a zero.
        return (None, None) + none
    dx, dscale = g.private("QuantizeLinearGrad", dY, x, y_scale, num_outputs=2,
                           dtype=g.graph.dtype(x), axis=node.attrs["axis"],
                           block_size=node.attrs["block_size"])
    g.graph.info[dscale] = ValueInfo(g.graph.dtype(y_scale), None)
    return (dx, dscale) + none


def _quantized_type(g, node):
    """The element type of a QuantizeLinear node's output: the graph's, else as the
    kernel chooses it (the zero point's, ``output_dtype``, or uint8)."""
    known = g.graph.dtype(node.outputs[0])
    if known is not None:
        return known
    zero_point = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2] else None
    if zero_point is not None and g.graph.dtype(zero_point) is not None:
        return g.graph.dtype(zero_point)
    return element_dtype(node.attrs.get("output_dtype") or 2)  # 2: ONNX's uint8


def _work_type(xp, *arrays):
    """float64 where an input is float64 (float64 gradient checks), else float32."""
    return xp.float64 if any(a.dtype == xp.float64 for a in arrays) else xp.float32


@op("QuantizeLinearGrad", domain="onnxgrad")
def QuantizeLinearGrad(xp, dY, x, y_scale, *, axis=1, block_size=0):
    """dx and dy_scale of a QuantizeLinear to a float type, ``y = cast(x / y_scale)``
    with the cast's rounding passed straight through: ``dx = dY / y_scale`` and
    ``dy_scale = -Σ dY · x / y_scale²`` over the elements that share each scale."""
    work = _work_type(xp, x, y_scale)
    scale = _broadcastable(xp, y_scale.astype(work), x.shape, axis, block_size)
    grad = dY.astype(work) / scale
    dscale = _per_scale_sum(xp, grad * x.astype(work) / scale, x.shape, y_scale.shape, axis,
                            block_size)
    return grad.astype(x.dtype), (-dscale).astype(y_scale.dtype)


@QuantizeLinearGrad.in_standard_ops
def _(g, node):
    # Per tensor and per axis; a blocked scale (repeated block_size times along the
    # axis, the last block cut short) has no standard form here.
    dY, x, y_scale = node.inputs
    shape, scale_shape = std.tensor_shape(g, x), std.tensor_shape(g, y_scale)
    if node.attrs.get("block_size", 0) or shape is None or scale_shape is None:
        return None
    x_type, s_type = g.dtype(x), g.dtype(y_scale)
    work = x_type if is_float(x_type) and x_type.kind == "f" else s_type
    to = std.tensor_type(work)
    per_axis = len(scale_shape) == 1 and scale_shape[0] != 1
    scale = g.Cast(y_scale, to=to, dtype=work)
    axis = node.attrs.get("axis", 1) % max(len(shape), 1)
    if per_axis:
        scale = g.Reshape(scale, g.ints([-1 if i == axis else 1 for i in range(len(shape))]))
    else:
        scale = g.Reshape(scale, g.ints([]))
    grad = g.Div(g.Cast(dY, to=to, dtype=work), scale)
    terms = g.Div(g.Mul(grad, g.Cast(x, to=to, dtype=work)), scale)
    if per_axis:
        total = g.ReduceSum(terms, g.ints([i for i in range(len(shape)) if i != axis]),
                            keepdims=0)
    else:
        total = g.Reshape(g.ReduceSum(terms, keepdims=0), g.ints(scale_shape))
    dscale = g.Cast(g.Neg(total), to=std.tensor_type(s_type), dtype=s_type)
    return (g.Cast(grad, to=std.tensor_type(x_type), dtype=x_type), dscale)


def _centred(xp, x, x_scale, x_zero_point, axis, block_size):
    """``x - x_zero_point`` as floats: float32, or float64 for a float64 scale (which
    onnxgrad accepts beyond the spec, for float64 gradient checks)."""
    work = x_scale.dtype if x_scale.dtype == xp.float64 else xp.float32
    dx = x.astype(work)
    if x_zero_point is not None and not x.dtype.name.startswith(("float8", "float4")):
        dx = dx - _broadcastable(xp, x_zero_point, x.shape, axis, block_size).astype(work)
    return dx


@op("DequantizeLinear", since=10, differentiable=("x_scale",))
def DequantizeLinear(xp, x, x_scale, x_zero_point=None, *, axis=1, block_size=0, output_dtype=0):
    dx = _centred(xp, x, x_scale, x_zero_point, axis, block_size)
    y = dx * _broadcastable(xp, x_scale, x.shape, axis, block_size).astype(dx.dtype)
    return (y.astype(_np_dtype(output_dtype) if output_dtype else x_scale.dtype),)


@DequantizeLinear.gradient
def _(g, node, dY):
    x, x_scale, *zero_point = node.inputs
    attrs = {k: node.attrs[k] for k in ("axis", "block_size")}
    dscale = g.private("DequantizeLinearGrad", dY, x, x_scale, *zero_point,
                       dtype=g.dtype(x_scale), **attrs)
    return (None, dscale) + (None,) * len(zero_point)


@op("DequantizeLinearGrad", domain="onnxgrad")
def DequantizeLinearGrad(xp, dY, x, x_scale, x_zero_point=None, *, axis=1, block_size=0):
    """The gradient for x_scale: ``dY * (x - x_zero_point)`` summed over the elements
    that share each scale (all of them, a slice along ``axis``, or a block of it)."""
    dx = _centred(xp, x, x_scale, x_zero_point, axis, block_size)
    terms = dY.astype(dx.dtype, copy=False) * dx
    return (_per_scale_sum(xp, terms, x.shape, x_scale.shape, axis, block_size)
            .astype(x_scale.dtype),)


@DequantizeLinearGrad.in_standard_ops
def _(g, node):
    """``x - x_zero_point`` from a standard DequantizeLinear with unit scales (the same
    per-tensor, per-axis or per-block zero points), times ``dY``, summed per scale.
    Needs the scale's shape, and for blocks the input's, static."""
    dY, x, x_scale, *zero_point = node.inputs
    zero_point = [z for z in zero_point if z]
    scale_shape, shape = std.tensor_shape(g, x_scale), std.tensor_shape(g, x)
    axis, block_size = node.attrs.get("axis", 1), node.attrs.get("block_size", 0) or 0
    s_type, x_type = g.dtype(x_scale), g.dtype(x)
    if scale_shape is None or shape is None:
        return None
    if s_type == np.float64 and x_type.itemsize >= 4 and x_type.kind in "iu":
        return None  # the kernel centres in float64 then, wider than float32's 24 bits
    whole = len(scale_shape) == 0 or math.prod(scale_shape) == 1 and not block_size
    if block_size and not all(isinstance(d, int) for d in shape):
        return None
    ndim = len(shape)
    if whole:
        ones = g.const(1.0, dtype=np.float32)
        zero_point = [g.Reshape(z, g.ints([])) for z in zero_point]
        centred = g.DequantizeLinear(x, ones, *zero_point, dtype=np.float32)
    else:
        ones = g.Expand(g.const(1.0, dtype=np.float32), g.Shape(x_scale, dtype="int64"))
        attrs = {"axis": axis} if not block_size else {"axis": axis, "block_size": block_size}
        centred = g.DequantizeLinear(x, ones, *zero_point, dtype=np.float32, **attrs)
    work = np.dtype(np.float64) if s_type == np.float64 else np.dtype(np.float32)
    if work != np.float32:
        centred = g.Cast(centred, to=std.tensor_type(work), dtype=work)
    d = dY if g.dtype(dY) == work else g.Cast(dY, to=std.tensor_type(work), dtype=work)
    terms = g.Mul(d, centred)
    if whole:
        total = g.Reshape(g.ReduceSum(terms, keepdims=0), g.Shape(x_scale, dtype="int64"))
    elif not block_size:
        a = axis % ndim
        total = g.ReduceSum(terms, g.ints([i for i in range(ndim) if i != a]), keepdims=0)
    else:
        a = axis % ndim
        blocks = int(scale_shape[a])
        cut = blocks * block_size - shape[a]  # a last block cut short
        if cut:
            terms = g.Pad(terms, g.ints([0, cut]), None, g.ints([a]), mode="constant")
        split = list(shape[:a]) + [blocks, block_size] + list(shape[a + 1:])
        total = g.ReduceSum(g.Reshape(terms, g.ints(split)), g.ints([a + 1]), keepdims=0)
    return (total if work == s_type else g.Cast(total, to=std.tensor_type(s_type), dtype=s_type),)


def _per_scale_sum(xp, terms, shape, scale_shape, axis, block_size):
    """``terms`` (of an input's ``shape``) summed over the elements that share each
    scale of ``scale_shape``: all of them, a slice along ``axis``, or a block of it."""
    ndim = len(shape)
    if len(scale_shape) == 0 or math.prod(scale_shape) == 1 and not block_size:
        return terms.sum().reshape(scale_shape)
    axis = axis % ndim
    if not block_size:
        return terms.sum(axis=tuple(i for i in range(ndim) if i != axis))
    blocks = scale_shape[axis]
    pad = [(0, 0)] * ndim
    pad[axis] = (0, blocks * block_size - shape[axis])  # a last block cut short
    terms = xp.pad(terms, pad)
    return terms.reshape(terms.shape[:axis] + (blocks, block_size)
                         + terms.shape[axis + 1:]).sum(axis=axis + 1)


@op("DynamicQuantizeLinear", since=11, differentiable=("x",))
def DynamicQuantizeLinear(xp, x):
    high = max(0.0, float(xp.max(x))) if x.size else 0.0
    low = min(0.0, float(xp.min(x))) if x.size else 0.0
    span = xp.float32(high) - xp.float32(low)
    scale = xp.float32(1.0) if high == low else xp.float32(span / xp.float32(255))
    zero = xp.rint(xp.clip(xp.float32(0) - xp.float32(low) / scale, 0, 255))
    y = xp.clip(xp.rint(x / scale) + zero, 0, 255).astype(xp.uint8)
    return y, xp.asarray(scale, dtype=x.dtype), xp.asarray(zero).astype(xp.uint8)


# -- integer products -----------------------------------------------------------------------
def _minus_zero(xp, x, zero, row_axis=None):
    """``x`` as int32 minus its zero point (a per-row zero point of a matrix along rows)."""
    out = x.astype(xp.int32)
    if zero is None:
        return out
    zero = zero.astype(xp.int32)
    if row_axis is not None and zero.ndim == 1 and zero.size > 1 and x.ndim >= 2 \
            and zero.size == x.shape[row_axis]:
        zero = zero.reshape(-1, 1)
    return out - zero


@op("MatMulInteger", since=10)
def MatMulInteger(xp, A, B, a_zero_point=None, b_zero_point=None):
    a = _minus_zero(xp, A, a_zero_point, row_axis=-2)
    b = _minus_zero(xp, B, b_zero_point)
    return (xp.matmul(a.astype(xp.int64), b.astype(xp.int64)).astype(xp.int32),)


def _requantize(xp, real, y_zero_point, dtype):
    if y_zero_point is not None:
        real = real + y_zero_point.astype(xp.float64)
    low, high = _INT_RANGES[dtype.name]
    return xp.clip(xp.rint(real), low, high).astype(dtype)


def _row_scale(scale, rows_axis_len):
    if scale.ndim == 1 and scale.size > 1 and scale.size == rows_axis_len:
        return scale.reshape(-1, 1)
    return scale


@op("QLinearMatMul", since=10)
def QLinearMatMul(xp, a, a_scale, a_zero_point, b, b_scale, b_zero_point, y_scale, y_zero_point):
    acc = xp.matmul(_minus_zero(xp, a, a_zero_point, row_axis=-2).astype(xp.int64),
                    _minus_zero(xp, b, b_zero_point).astype(xp.int64))
    scale = (_row_scale(a_scale, a.shape[-2] if a.ndim >= 2 else -1).astype(xp.float64)
             * b_scale.astype(xp.float64) / y_scale.astype(xp.float64))
    dtype = y_zero_point.dtype if y_zero_point is not None else a.dtype
    return (_requantize(xp, acc.astype(xp.float64) * scale, y_zero_point, dtype),)


def _conv_float(xp, x, w, attrs):
    from onnxgrad.ops.conv import Conv  # noqa: PLC0415 - the convolution kernel

    (y,) = Conv(xp, x.astype(xp.float64), w.astype(xp.float64), None, **attrs)
    return y


def _w_zero(xp, w, zero):
    if zero is None:
        return w.astype(xp.int32)
    zero = zero.astype(xp.int32)
    if zero.ndim == 1 and zero.size > 1:  # per output channel
        zero = zero.reshape((-1,) + (1,) * (w.ndim - 1))
    return w.astype(xp.int32) - zero


@op("ConvInteger", since=10)
def ConvInteger(xp, x, w, x_zero_point=None, w_zero_point=None, *, auto_pad="NOTSET",
                dilations=None, group=1, kernel_shape=None, pads=None, strides=None):
    attrs = dict(auto_pad=auto_pad, dilations=dilations, group=group, kernel_shape=kernel_shape,
                 pads=pads, strides=strides)
    xi = _minus_zero(xp, x, x_zero_point)
    y = _conv_float(xp, xi, _w_zero(xp, w, w_zero_point), attrs)
    return (xp.rint(y).astype(xp.int32),)


@op("QLinearConv", since=10)
def QLinearConv(xp, x, x_scale, x_zero_point, w, w_scale, w_zero_point, y_scale, y_zero_point,
                B=None, *, auto_pad="NOTSET", dilations=None, group=1, kernel_shape=None, pads=None,
                strides=None):
    attrs = dict(auto_pad=auto_pad, dilations=dilations, group=group, kernel_shape=kernel_shape,
                 pads=pads, strides=strides)
    acc = xp.rint(_conv_float(xp, _minus_zero(xp, x, x_zero_point), _w_zero(xp, w, w_zero_point),
                              attrs))
    if B is not None:
        acc = acc + B.astype(xp.float64).reshape((1, -1) + (1,) * (acc.ndim - 2))
    ws = w_scale.astype(xp.float64)
    if ws.ndim == 1 and ws.size > 1:
        ws = ws.reshape((1, -1) + (1,) * (acc.ndim - 2))
    real = acc * (x_scale.astype(xp.float64) * ws / y_scale.astype(xp.float64))
    dtype = y_zero_point.dtype if y_zero_point is not None else x.dtype
    return (_requantize(xp, real, y_zero_point, dtype),)
