"""Shape and layout ops: Identity, Flatten, Reshape, Transpose, Squeeze,
Unsqueeze, DepthToSpace, SpaceToDepth, Cast, Constant and Shape.

DepthToSpace and SpaceToDepth move blocks of pixels between the channel and
the spatial axes (a reshape and a transpose); each one's gradient is the
other in the same layout (a permutation's adjoint is its inverse), through the
private ``SpaceToDepthMode`` for DepthToSpace's ``CRD`` mode.

Shape values (``Shape``'s output, ``Reshape``'s ``shape``, ``axes`` inputs)
live on the host: they are small int64 vectors that the planner folds where it
can.  This is the one op module that imports NumPy, and only for them:
``Shape`` returns a host ``np.int64`` array whatever ``xp`` is.  Every tensor
operation still goes through ``xp``.
"""

from __future__ import annotations

import math

import numpy as np  # host-side shape values only (see the module docstring)

from onnxgrad.errors import ModelError
from onnxgrad.ops import standard as std
from onnxgrad.ops.castlike import cast_array
from onnxgrad.ops.registry import op

#: ONNX TensorProto element types onnxgrad computes with, by dtype name.
ONNX_TYPES = {
    1: "float32", 2: "uint8", 3: "int8", 4: "uint16", 5: "int16", 6: "int32", 7: "int64",
    9: "bool", 10: "float16", 11: "float64", 12: "uint32", 13: "uint64",
}
#: Element types that exist on the host only (strings, and the types ml_dtypes adds to
#: NumPy); Cast converts to them through :func:`onnxgrad.ops.castlike.cast_array`.
HOST_TYPES = {
    8: "object", 16: "bfloat16", 17: "float8_e4m3fn", 18: "float8_e4m3fnuz", 19: "float8_e5m2",
    20: "float8_e5m2fnuz", 21: "uint4", 22: "int4", 23: "float4_e2m1fn", 24: "float8_e8m0fnu",
    25: "uint2", 26: "int2",
}
_TYPE_OF_NAME = {name: code for code, name in {**ONNX_TYPES, **HOST_TYPES}.items()}
#: The floating-point types among HOST_TYPES (their NumPy dtype kind is "V", not "f").
_HOST_FLOATS = frozenset(n for n in HOST_TYPES.values() if n.startswith(("bfloat", "float")))


def is_float(dtype) -> bool:
    """Whether ``dtype`` is a floating-point type, bfloat16 and float8/float4 included."""
    return dtype is not None and (dtype.kind == "f" or dtype.name in _HOST_FLOATS)


def element_dtype(code: int):
    """The NumPy dtype of ONNX element type ``code`` (ml_dtypes' for the narrow types)."""
    code = int(code)
    if code in ONNX_TYPES:
        return np.dtype(ONNX_TYPES[code])
    if code in HOST_TYPES:
        from onnx.helper import tensor_dtype_to_np_dtype  # noqa: PLC0415 - ml_dtypes' dtypes

        return np.dtype(tensor_dtype_to_np_dtype(code))
    raise ModelError(f"ONNX element type {code} is not supported")


def onnx_type(dtype) -> int:
    """The ONNX element type (TensorProto enum) of a dtype."""
    name = getattr(dtype, "name", str(dtype))
    try:
        return _TYPE_OF_NAME[name]
    except KeyError:
        raise ModelError(f"element type {name} has no ONNX equivalent in onnxgrad") from None


def _dims(values) -> list[int]:
    """A list attribute or a host int tensor (a 0-d one counts as one element) as ints."""
    return [int(v) for v in np.asarray(values).reshape(-1)]


def _same_shape_as(g, dY, X):
    """``dY`` reshaped to ``X``'s (runtime) shape: the gradient of any pure reshape."""
    return g.Reshape(dY, g.shape_of(X), allowzero=1)


# -- copies and views -----------------------------------------------------------------

@op("Identity", since=1, differentiable=("input",))
def Identity(xp, input):
    return (input,)


@Identity.gradient
def _(g, node, dY):
    return (dY,)


@op("Flatten", since=1, differentiable=("input",))
def Flatten(xp, input, *, axis=1):
    shape = tuple(input.shape)
    axis = axis + len(shape) if axis < 0 else axis
    if not 0 <= axis <= len(shape):
        raise ValueError(f"Flatten axis {axis} out of range for rank {len(shape)}")
    return (input.reshape(math.prod(shape[:axis]), math.prod(shape[axis:])),)


@Flatten.gradient
def _(g, node, dY):
    return (_same_shape_as(g, dY, node.inputs[0]),)


@op("Reshape", since=5, differentiable=("data",), host_inputs=("shape",))
def Reshape(xp, data, shape, *, allowzero=0):
    dims = _dims(shape)
    if not allowzero:  # a 0 copies the input's dimension
        for i, d in enumerate(dims):
            if d == 0:
                if i >= data.ndim:
                    raise ValueError(f"Reshape: 0 at position {i} but input has rank {data.ndim}")
                dims[i] = data.shape[i]
    return (data.reshape(tuple(dims)),)


@Reshape.gradient
def _(g, node, dY):
    return (_same_shape_as(g, dY, node.inputs[0]), None)


@op("Transpose", since=1, differentiable=("data",))
def Transpose(xp, data, *, perm=None):
    perm = None if perm is None else tuple(int(p) for p in perm)
    return (xp.transpose(data, perm),)


@Transpose.gradient
def _(g, node, dY):
    perm = node.attrs["perm"]
    if perm is None:  # reversed axes are their own inverse
        return (g.Transpose(dY),)
    inverse = [0] * len(perm)
    for i, p in enumerate(perm):
        inverse[int(p)] = i
    return (g.Transpose(dY, perm=inverse),)


def _unsqueezed_shape(shape: tuple, axes: list[int]) -> tuple:
    rank = len(shape) + len(axes)
    axes = sorted(a + rank if a < 0 else a for a in axes)
    if len(set(axes)) != len(axes) or any(not 0 <= a < rank for a in axes):
        raise ValueError(f"Unsqueeze: bad axes {axes} for output rank {rank}")
    out, rest = [], iter(shape)
    for i in range(rank):
        out.append(1 if i in axes else next(rest))
    return tuple(out)


@op("Unsqueeze", since=1, differentiable=("data",))
def Unsqueeze(xp, data, *, axes):
    return (data.reshape(_unsqueezed_shape(tuple(data.shape), _dims(axes))),)


@op("Unsqueeze", since=13, differentiable=("data",), host_inputs=("axes",))
def Unsqueeze13(xp, data, axes):
    return (data.reshape(_unsqueezed_shape(tuple(data.shape), _dims(axes))),)


def _squeeze(data, axes):
    if axes is None:  # an empty axes list squeezes nothing, as in the reference
        axes = [i for i, d in enumerate(data.shape) if d == 1]
    axes = {a + data.ndim if a < 0 else a for a in _dims(axes)}
    for a in axes:
        if not 0 <= a < data.ndim or data.shape[a] != 1:
            raise ValueError(f"Squeeze: axis {a} of shape {tuple(data.shape)} is not 1")
    return data.reshape(tuple(d for i, d in enumerate(data.shape) if i not in axes))


@op("Squeeze", since=1, differentiable=("data",))
def Squeeze(xp, data, *, axes=None):
    return (_squeeze(data, axes),)


@op("Squeeze", since=13, differentiable=("data",), host_inputs=("axes",))
def Squeeze13(xp, data, axes=None):
    return (_squeeze(data, axes),)


for _definition in (Unsqueeze, Unsqueeze13, Squeeze, Squeeze13):
    @_definition.gradient
    def _(g, node, dY):
        return (_same_shape_as(g, dY, node.inputs[0]),) + (None,) * (len(node.inputs) - 1)


# -- types and constants -------------------------------------------------------------------

# -- DepthToSpace and SpaceToDepth ----------------------------------------------------------

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


@op("SpaceToDepthMode", domain="onnxgrad")
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


# -- Cast, Constant, Shape ------------------------------------------------------------------

@op("Cast", since=6, differentiable=("input",))
def Cast(xp, input, *, to, saturate=1, round_mode="up"):
    # saturate applies to float8 targets, round_mode to float8e8m0; strings and the
    # narrow types (bfloat16, float8, float4, 4- and 2-bit integers) live on the host.
    try:
        dtype = element_dtype(to)
    except ModelError:
        raise ModelError(f"Cast to ONNX element type {to} is not supported") from None
    try:
        return (cast_array(xp, input, dtype, saturate=saturate, round_mode=round_mode),)
    except TypeError as exc:
        raise ModelError(f"Cast from {input.dtype} to {dtype}: {exc}") from exc


@Cast.gradient
def _(g, node, dY):
    (X,) = node.inputs
    src = g.dtype(X)
    if not is_float(src) or not is_float(element_dtype(node.attrs["to"])):
        return (None,)  # integer, boolean or string values carry no gradient
    return (g.op("Cast", dY, to=onnx_type(src), dtype=src),)


@op("Constant", since=1)
def Constant(xp, *, value=None, value_float=None, value_floats=None, value_int=None,
             value_ints=None, value_string=None, value_strings=None, sparse_value=None):
    if value is not None:
        return (xp.asarray(value),)
    if value_float is not None:
        return (xp.asarray(value_float, dtype="float32"),)
    if value_floats is not None:
        return (xp.asarray(value_floats, dtype="float32"),)
    if value_int is not None:
        return (xp.asarray(value_int, dtype="int64"),)
    if value_ints is not None:
        return (xp.asarray(value_ints, dtype="int64"),)
    if value_string is not None or value_strings is not None:
        raise ModelError("Constant: string tensors are not supported by onnxgrad")
    if sparse_value is not None:
        raise ModelError("Constant: sparse_value is not supported by onnxgrad")
    raise ModelError("Constant node has no value attribute")


@op("Shape", since=1)
def Shape(xp, data, *, start=0, end=None):
    # Always a host array: shape subgraphs are evaluated on the CPU.
    shape = tuple(data.shape)
    return (np.array(shape[int(start):None if end is None else int(end)], dtype=np.int64),)
