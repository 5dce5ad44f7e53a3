"""CastLike and BitCast, and the element-type conversion CastLike shares with the other
casting paths.

:func:`cast_array` converts between every element type NumPy can hold,
including those ``ml_dtypes`` adds (bfloat16, the float8 family, 4- and 2-bit
integers, float4), with ONNX's ``saturate`` rule for float8 targets and its
``round_mode`` for float8e8m0.  Types outside NumPy's own (strings, ml_dtypes)
exist only on the host.

BitCast (opset 26) reinterprets each element's bytes as another type of the
same size; it has no gradient.
"""

from __future__ import annotations

from onnxgrad.errors import ModelError
from onnxgrad.ops.registry import op

#: ml_dtypes names of the float8 types that ``saturate`` applies to.
_SATURATING = frozenset({"float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2", "float8_e5m2fnuz"})


def cast_array(xp, x, dtype, *, saturate=1, round_mode="up"):
    """``x`` converted to ``dtype`` as ONNX's Cast does."""
    name = getattr(dtype, "name", str(dtype))
    if x.dtype == dtype:
        return x
    if getattr(dtype, "kind", "") in "OUS" and name != "bool":  # to strings
        return _to_strings(x)
    if x.dtype.kind in "OUS":  # from strings: parse as float64 first ("1e3", "inf", "NaN")
        x = x.astype(xp.float64)
    if name == "float8_e8m0fnu":
        from onnx.numpy_helper import to_float8e8m0  # noqa: PLC0415 - host only

        return to_float8e8m0(x, bool(saturate), round_mode).astype(dtype)
    if name in _SATURATING and saturate:
        import ml_dtypes  # noqa: PLC0415 - host only, where these types live

        big = float(ml_dtypes.finfo(dtype).max)
        x = xp.clip(x.astype(xp.float32), -big, big)  # NaN stays NaN, ±inf become ±max
    if x.dtype.name not in ("float32", "float64") and _is_ml_dtype(dtype) \
            and x.dtype.kind not in "iub":
        x = x.astype(xp.float32)  # ml_dtypes converts reliably through float32
    return x.astype(dtype)


def _is_ml_dtype(dtype) -> bool:
    return type(dtype).__module__.startswith("ml_dtypes") or getattr(dtype, "kind", "") == "V"


def _to_strings(x):
    """ONNX's string form of numbers: as NumPy prints them, float32 at float32 precision."""
    if x.dtype.kind == "f" and x.dtype.itemsize >= 4 or x.dtype.kind in "iub":
        out = x.astype(str)
    else:  # float16, bfloat16, float8…: through float32
        out = x.astype("float32").astype(str)
    return out.astype(object)


@op("CastLike", since=15, differentiable=("input",))
def CastLike(xp, input, target_type, *, saturate=1, round_mode="up"):
    try:
        return (cast_array(xp, input, target_type.dtype, saturate=saturate,
                           round_mode=round_mode),)
    except (TypeError, ValueError) as exc:
        raise ModelError(f"CastLike from {input.dtype} to {target_type.dtype}: {exc}") from exc


@CastLike.gradient
def _(g, node, dY):
    from onnxgrad.ops.shape import is_float, onnx_type  # noqa: PLC0415 - shape imports this module

    X = node.inputs[0]
    src = g.dtype(X)
    if not is_float(src):
        return (None, None)  # an integer input has no gradient
    return (g.op("Cast", dY, to=onnx_type(src), dtype=src), None)


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
