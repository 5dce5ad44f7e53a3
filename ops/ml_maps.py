"""The map ops of the ``ai.onnx.ml`` domain: ZipMap, DictVectorizer and CastMap.

A map is a Python dict at run time (int or str keys), a ``seq(map)`` a list of them, as
onnxruntime returns them.  Inside a run a map's values are NumPy scalars, so that their
element type (float32, float64, int64) survives; :func:`onnxgrad.model.host_value`
hands them to the caller as Python scalars.

None of the three has a gradient: their tensor input or output is declared
differentiable but no rule is registered, so asking for a gradient through one raises
``UnsupportedOpError`` naming the node, rather than giving zero.  Train a classifier
that ends in ZipMap on the tensor that feeds the ZipMap (``Trainer(output=...)``).

Where the spec is silent or onnxruntime departs from it, onnxruntime is followed:
DictVectorizer and CastMap give a ``(1, n)`` row, DictVectorizer ignores keys that are
not in its vocabulary, CastMap's SPARSE form drops keys past ``max_map - 1`` and pads
a string output with ``"0.f"``; an empty map gives zeros (onnxruntime refuses it).
"""

from __future__ import annotations

from onnxgrad.errors import DataError, ModelError, ShapeError
from onnxgrad.ops.registry import op

ML = "ai.onnx.ml"


def _where(ctx, name: str) -> str:
    return f"node {ctx.node.name!r} ({name})" if ctx is not None else name


def _one_of(where: str, ints, strings, names: tuple[str, str]) -> list:
    """The keys given by exactly one of an int64 and a string attribute (``names``)."""
    if (ints is None) == (strings is None):
        raise ModelError(f"{where}: give exactly one of {names[0]} and {names[1]}")
    return [int(k) for k in ints] if ints is not None else [str(k) for k in strings]


@op("ZipMap", since=1, domain=ML, differentiable=("X",))
def ZipMap(xp, X, *, classlabels_int64s=None, classlabels_strings=None, ctx=None):
    """One dict per row of ``X`` (N, C): ``{label j: X[i, j]}``; a 1-D ``X`` is one row.
    As in onnxruntime, the keys are in ascending order and a repeated label keeps its
    last column."""
    where = _where(ctx, "ZipMap")
    labels = _one_of(where, classlabels_int64s, classlabels_strings,
                     ("classlabels_int64s", "classlabels_strings"))
    if X.ndim not in (1, 2):
        raise ShapeError(f"{where}: X must be 1-D or 2-D, got shape {list(X.shape)}")
    rows = X.reshape(1, -1) if X.ndim == 1 else X
    if rows.shape[1] != len(labels):
        raise ShapeError(f"{where}: X has {rows.shape[1]} columns for {len(labels)} class labels")
    last = {k: j for j, k in enumerate(labels)}  # a label given twice keeps its last column
    keys = sorted(last)  # onnxruntime's maps are ordered by key
    columns = [last[k] for k in keys]
    scalar = xp.dtype(X.dtype).type
    return ([dict(zip(keys, (scalar(row[c]) for c in columns))) for row in rows.tolist()],)


def _value_dtype(xp, values: list, where: str):
    """The element type of a map's values: strings, else the NumPy type of its numbers
    (float32 for Python floats or an empty map, int64 for Python ints)."""
    if any(isinstance(v, (str, bytes)) for v in values):
        if not all(isinstance(v, (str, bytes)) for v in values):
            raise DataError(f"{where}: a map mixes string and numeric values")
        return object
    typed = [xp.dtype(type(v)) for v in values if hasattr(v, "dtype")]
    if typed:
        return xp.result_type(*typed)
    if any(isinstance(v, float) for v in values) or not values:
        return xp.float32
    return xp.int64


def _text(v) -> str:
    return v.decode("utf-8") if isinstance(v, bytes) else str(v)


def _check_keys(keys, strings: bool, where: str) -> None:
    for k in keys:
        if strings != isinstance(k, str) or isinstance(k, bool):
            raise DataError(f"{where}: the vocabulary holds {'strings' if strings else 'int64s'}, "
                            f"the map has key {k!r}")


@op("DictVectorizer", since=1, domain=ML, differentiable=("X",))
def DictVectorizer(xp, X, *, int64_vocabulary=None, string_vocabulary=None, ctx=None):
    """A map as a ``(1, V)`` row: ``Y[0, j] = X[vocabulary[j]]``, 0 where the key is
    missing (a list of maps gives one row each).  The row has the map's value type."""
    where = _where(ctx, "DictVectorizer")
    vocabulary = _one_of(where, int64_vocabulary, string_vocabulary,
                         ("int64_vocabulary", "string_vocabulary"))
    maps = X if isinstance(X, (list, tuple)) else [X]
    if not all(isinstance(m, dict) for m in maps):
        raise DataError(f"{where}: X must be a map (a dict), got {type(X).__name__}")
    column = {k: j for j, k in enumerate(vocabulary)}
    strings = string_vocabulary is not None
    values = [v for m in maps for v in m.values()]
    dtype = _value_dtype(xp, values, where)
    Y = xp.zeros((len(maps), len(vocabulary)), dtype=dtype)
    if dtype is object:
        Y[...] = ""
    for i, m in enumerate(maps):
        keys = [_text(k) if isinstance(k, bytes) else k for k in m]
        _check_keys(keys, strings, where)
        for k, v in zip(keys, m.values()):
            j = column.get(k)
            if j is not None:  # keys outside the vocabulary are ignored, as in onnxruntime
                Y[i, j] = _text(v) if dtype is object else v
    return (Y,)


_CASTS = {"TO_FLOAT": "float32", "TO_INT64": "int64", "TO_STRING": object}


def _cast(v, cast_to: str):
    if cast_to == "TO_STRING":
        return _text(v) if isinstance(v, (str, bytes)) else f"{float(v):f}"
    if isinstance(v, (str, bytes)):
        v = float(_text(v)) if cast_to == "TO_FLOAT" else int(float(_text(v)))
    return float(v) if cast_to == "TO_FLOAT" else int(v)  # int() truncates, as C++ casts


@op("CastMap", since=1, domain=ML, differentiable=("X",))
def CastMap(xp, X, *, cast_to="TO_FLOAT", map_form="DENSE", max_map=1, ctx=None):
    """A map with int64 keys as a ``(1, n)`` row in ascending key order, cast to float32,
    int64 or strings: DENSE gives its values (n = len(X)); SPARSE puts value ``X[k]`` at
    column ``k`` of ``max_map`` columns, padded with zeros."""
    where = _where(ctx, "CastMap")
    if cast_to not in _CASTS:
        raise ModelError(f"{where}: cast_to must be one of {', '.join(_CASTS)}, got {cast_to!r}")
    if map_form not in ("DENSE", "SPARSE"):
        raise ModelError(f"{where}: map_form must be DENSE or SPARSE, got {map_form!r}")
    if map_form == "SPARSE" and int(max_map) < 1:
        raise ModelError(f"{where}: max_map must be positive for the SPARSE form, got {max_map}")
    if not isinstance(X, dict):
        raise DataError(f"{where}: X must be a map (a dict), got {type(X).__name__}")
    _check_keys(X, False, where)
    keys = sorted(X)
    dtype = _CASTS[cast_to]
    try:
        if map_form == "DENSE":
            Y = xp.empty((1, len(keys)), dtype=dtype)
            Y[0, :] = [_cast(X[k], cast_to) for k in keys]
            return (Y,)
        if keys and int(keys[0]) < 0:
            raise DataError(f"{where}: the SPARSE form takes keys from 0 on, the map has key "
                            f"{keys[0]}")
        Y = xp.zeros((1, int(max_map)), dtype=dtype)
        if dtype is object:
            Y[...] = "0.f"  # onnxruntime's pad value
        for k in keys:
            if k < int(max_map):  # keys past max_map - 1 are dropped, as in onnxruntime
                Y[0, k] = _cast(X[k], cast_to)
    except ValueError as exc:
        raise DataError(f"{where}: cannot cast the map's values {cast_to}: {exc}") from None
    return (Y,)
