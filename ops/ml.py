"""Forward-only ops of the ``ai.onnx.ml`` domain (scikit-learn exports):
ArrayFeatureExtractor, LabelEncoder and Binarizer.

ArrayFeatureExtractor's ``X`` is declared differentiable but no rule is
registered, so asking for its gradient raises ``UnsupportedOpError`` rather
than giving zero.  LabelEncoder (a table lookup) and Binarizer (a threshold)
declare no differentiable input.  Tree ensembles live in ``ops/ml_tree.py``,
linear models, scalers and SVMs (with gradients) in ``ops/ml_linear.py`` and
``ops/ml_svm.py``.
"""

from __future__ import annotations

from onnxgrad.errors import ModelError
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
