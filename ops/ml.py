"""Forward-only ops of the ``ai.onnx.ml`` domain (scikit-learn exports):
ArrayFeatureExtractor, LabelEncoder, Binarizer, OneHotEncoder and FeatureVectorizer.

ArrayFeatureExtractor's and FeatureVectorizer's ``X`` are declared differentiable but
no rule is registered, so asking for their gradient raises ``UnsupportedOpError``
rather than giving zero.  LabelEncoder (a table lookup), Binarizer (a threshold) and
OneHotEncoder (categories) declare no differentiable input.  Tree ensembles live in
``ops/ml_tree.py``, linear models, scalers and SVMs (with gradients) in
``ops/ml_linear.py`` and ``ops/ml_svm.py``.
"""

from __future__ import annotations

from onnxgrad.errors import DataError, ModelError, ShapeError
from onnxgrad.ops.registry import op

ML = "ai.onnx.ml"


@op("ArrayFeatureExtractor", since=1, domain="ai.onnx.ml", differentiable=("X",))
def ArrayFeatureExtractor(xp, X, Y):
    """Select entries ``Y`` (flattened) along the last axis of ``X``.

    As in onnxruntime: the output has shape ``X.shape[:-1] + (Y.size,)``, and a
    1-D ``X`` gives a ``(1, Y.size)`` matrix.
    """
    index = Y.reshape(-1).astype("int64")
    n = X.shape[-1]
    if int(index.size) and (bool((index < 0).any()) or bool((index >= n).any())):
        raise IndexError(f"ArrayFeatureExtractor: indices must lie in [0, {n})")
    out = X[..., index]
    if X.ndim == 1:
        out = out.reshape(1, -1)
    return (out,)


# -- LabelEncoder and Binarizer -------------------------------------------------------------

def _plain(values) -> list:
    """Attribute values as Python scalars (tensor attributes' strings arrive as bytes)."""
    if values is None:
        return None
    items = values.reshape(-1).tolist() if hasattr(values, "reshape") else list(values)
    return [v.decode("utf-8") if isinstance(v, bytes) else v for v in items]


@op("LabelEncoder", since=2, domain=ML)
def LabelEncoder(xp, X, *, default_float=-0.0, default_int64=-1, default_string="_Unused",
                 default_tensor=None, keys_floats=None, keys_int64s=None, keys_strings=None,
                 keys_tensor=None, values_floats=None, values_int64s=None, values_strings=None,
                 values_tensor=None):
    keys = next((k for k in (keys_tensor, keys_floats, keys_int64s, keys_strings)
                 if k is not None), None)
    if keys is None:
        raise ModelError("LabelEncoder has no keys_* attribute")
    if values_tensor is not None:
        values, dtype = _plain(values_tensor), values_tensor.dtype
        if default_tensor is not None:
            default = _plain(default_tensor)[0]
        else:
            default = "_Unused" if dtype.kind in "OSU" else (-0.0 if dtype.kind == "f" else -1)
    elif values_floats is not None:
        values, dtype, default = list(values_floats), xp.float32, default_float
    elif values_int64s is not None:
        values, dtype, default = list(values_int64s), xp.int64, default_int64
    elif values_strings is not None:
        values, dtype, default = list(values_strings), object, default_string
    else:
        raise ModelError("LabelEncoder has no values_* attribute")
    keys = _plain(keys)
    if len(keys) != len(values):
        raise ModelError(f"LabelEncoder: {len(keys)} keys for {len(values)} values")
    table: dict = {}
    for k, v in zip(keys, values):
        table.setdefault(k, v)
    found = [table.get(x, default) for x in _plain(X)]
    out = xp.empty(len(found), dtype=dtype)
    out[:] = found
    return (out.reshape(X.shape),)


@op("Binarizer", since=1, domain=ML)
def Binarizer(xp, X, *, threshold=0.0):
    return ((X > threshold).astype(X.dtype),)


# -- OneHotEncoder and FeatureVectorizer ---------------------------------------------------
def _node(ctx, name: str) -> str:
    return f"node {ctx.node.name!r} ({name})" if ctx is not None else name


@op("OneHotEncoder", since=1, domain=ML)
def OneHotEncoder(xp, X, *, cats_int64s=None, cats_strings=None, zeros=1, ctx=None):
    """``Y[..., j] = 1`` where ``X`` holds category ``j``: shape ``X.shape + (categories,)``,
    float32.

    Strings are looked up in ``cats_strings``; numbers, cast to int64 (truncated, as
    onnxruntime casts them), in ``cats_int64s``.  A value outside the categories gives
    zeros, or a DataError when ``zeros`` is 0; a category listed twice keeps its last
    column.
    """
    where = _node(ctx, "OneHotEncoder")
    if cats_int64s and cats_strings:
        raise ModelError(f"{where}: give cats_int64s or cats_strings, not both")
    strings = X.dtype.kind in "OSU"
    cats = list(cats_strings or []) if strings else list(cats_int64s or [])
    if not cats:
        raise ModelError(f"{where}: {'string' if strings else 'numeric'} input X needs "
                         f"{'cats_strings' if strings else 'cats_int64s'}")
    column = {c: j for j, c in enumerate(cats)}
    keys = sorted(column)
    index = xp.asarray([column[k] for k in keys], dtype=xp.int64)
    if strings:
        sample = X.reshape(-1)[0] if X.size else None
        if X.dtype.kind == "S" or isinstance(sample, bytes):
            keys = [k.encode("utf-8") for k in keys]
        table = xp.asarray(keys, dtype=object if X.dtype.kind == "O" else None)
        values, valid = X, True
    else:
        table = xp.asarray(keys, dtype=xp.int64)
        if X.dtype.kind == "f":
            valid = xp.isfinite(X) & (xp.abs(X) < 2.0 ** 63)
            values = xp.where(valid, X, 0).astype(xp.int64)
        else:
            values, valid = X.astype(xp.int64), True
    pos = xp.minimum(xp.searchsorted(table, values), len(keys) - 1)
    found = (table[pos] == values) & valid
    if not int(zeros) and not bool(found.all()):
        first = X.reshape(-1)[int(xp.argmin(found.reshape(-1)))]
        first = first.item() if hasattr(first, "item") else first
        raise DataError(f"{where}: X holds {first!r}, which is not among its {len(cats)} "
                        "categories, and zeros is 0")
    hot = (index[pos][..., None] == xp.arange(len(cats))) & found[..., None]
    return (hot.astype(xp.float32),)


@op("FeatureVectorizer", since=1, domain=ML, differentiable=("X",))
def FeatureVectorizer(xp, *X, inputdimensions=None, ctx=None):
    """The inputs side by side as float32 columns (N, sum(inputdimensions)): input ``i``,
    flattened per row (a vector is one row), gives its first ``inputdimensions[i]``
    values, padded with zeros."""
    where = _node(ctx, "FeatureVectorizer")
    dims = [int(d) for d in (inputdimensions or [])]
    if len(dims) != len(X) or any(d < 0 for d in dims):
        raise ModelError(f"{where}: inputdimensions must give one size (0 or more) per input, "
                         f"got {dims} for {len(X)} inputs")
    rows = [x.reshape(1, -1) if x.ndim <= 1 else x.reshape(x.shape[0], -1) for x in X]
    for i, (x, r) in enumerate(zip(X, rows)):
        if x.dtype.kind not in "biuf":
            raise ShapeError(f"{where}: input {i} must hold numbers, got {x.dtype}")
        if r.shape[0] != rows[0].shape[0]:
            raise ShapeError(f"{where}: input {i} has {r.shape[0]} rows, input 0 has "
                             f"{rows[0].shape[0]}")
    Y = xp.zeros((rows[0].shape[0] if rows else 0, sum(dims)), dtype=xp.float32)
    start = 0
    for r, d in zip(rows, dims):
        k = min(d, r.shape[1])
        Y[:, start:start + k] = r[:, :k]
        start += d
    return (Y,)
