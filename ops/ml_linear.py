"""Linear models, Scaler, Normalizer and Imputer of the ``ai.onnx.ml`` domain, with
gradients for ``X``.

Each gradient rule emits a private ``onnxgrad::<Op>Grad`` that recomputes the
forward pass and returns ``dX``.  Coefficients are attributes, so there are no
weights to train; a gradient reaches the inputs (e.g. an upstream model).
Scores are float32 as the spec says, float64 for a float64 ``X`` (as onnx's
reference evaluator computes them).  Where onnxruntime and the reference
disagree (Normalizer's MAX norm, a binary classifier's score columns)
onnxruntime is followed.  PROBIT post-transforms are refused.
"""

from __future__ import annotations

import inspect

import numpy as np  # host constants of standard forms

from onnxgrad.errors import ModelError
from onnxgrad.ops import standard as std
from onnxgrad.ops.registry import op

ML = "ai.onnx.ml"


# -- shared helpers ----------------------------------------------------------------------------
def _score_dtype(xp, X):
    return xp.float64 if X.dtype == xp.float64 else xp.float32


def _matrix(xp, X):
    """``X`` as an (N, C) matrix in its score type (a 1-D ``X`` is one row)."""
    X = X.astype(_score_dtype(xp, X))
    return X.reshape(1, -1) if X.ndim == 1 else X.reshape(X.shape[0], -1)


def _array(xp, values, dtype, shape=(-1,)):
    return xp.asarray(list(values), dtype=dtype).reshape(shape)


def _post(xp, S, kind: str):
    """The post-transform ``kind`` of scores ``S`` (N, K)."""
    if kind == "NONE":
        return S
    if kind == "LOGISTIC":
        return 1 / (1 + xp.exp(-S))
    if kind in ("SOFTMAX", "SOFTMAX_ZERO"):
        e = xp.exp(S - S.max(axis=1, keepdims=True))
        if kind == "SOFTMAX_ZERO":
            e = xp.where(S == 0, 0, e)
        return e / xp.maximum(e.sum(axis=1, keepdims=True), 1e-300)
    raise ModelError(f"ai.onnx.ml post_transform {kind!r} is not supported")


def _post_vjp(xp, P, dP, kind: str):
    """The gradient of the scores from that of their post-transform ``P``."""
    if kind == "NONE":
        return dP
    if kind == "LOGISTIC":
        return dP * P * (1 - P)
    return P * (dP - (dP * P).sum(axis=1, keepdims=True))  # SOFTMAX, SOFTMAX_ZERO


def _gradient_op(forward, vjp):
    """Register ``onnxgrad::<forward>Grad(dY, X)`` with the forward op's attributes:
    ``vjp(xp, dY, X, **attrs)`` is ``dX``; and the forward op's rule that emits it for
    the gradient of output ``Y`` (a classifier's scores ``Z``)."""
    def kernel(xp, dY, X, **attrs):
        return (vjp(xp, dY, X, **attrs).reshape(X.shape).astype(X.dtype),)

    P = inspect.Parameter
    attrs = [P(k, P.KEYWORD_ONLY, default=v) for k, v in forward.attrs.items()]
    kernel.__signature__ = inspect.Signature(
        [P(n, P.POSITIONAL_OR_KEYWORD) for n in ("xp", "dY", "X")] + attrs)
    kernel.__doc__ = f"The gradient of {forward.name} for X."
    definition = op(f"{forward.name}Grad", domain="onnxgrad")(kernel)

    @forward.gradient
    def _(g, node, *douts):
        dY = douts[-1]  # Y of a regressor or a transform, Z (scores) of a classifier
        if dY is None:
            return (None,)
        X = node.inputs[0]
        attrs = {k: v for k, v in node.attrs.items() if v is not None}
        return (g.private(f"{forward.name}Grad", dY, X, dtype=g.dtype(X), **attrs),)

    return definition


# -- Scaler, Normalizer, Imputer ------------------------------------------------------------
@op("Scaler", since=1, domain=ML, differentiable=("X",))
def Scaler(xp, X, *, offset=None, scale=None):
    """``(X - offset) * scale``, per column or by one value."""
    dt = _score_dtype(xp, X)
    offset = _array(xp, offset or [0.0], dt)
    scale = _array(xp, scale or [1.0], dt)
    return (((X.astype(dt) - offset) * scale),)


def _scaler_vjp(xp, dY, X, *, offset=None, scale=None):
    return dY * _array(xp, scale or [1.0], dY.dtype)


_NORMS = ("MAX", "L1", "L2")


def _norm(xp, X, norm):
    """Each row's norm and its gradient with respect to the row."""
    if norm == "MAX":  # the row's largest value, as the spec and onnxruntime have it
        first = xp.argmax(X, axis=1)
        dn = xp.zeros_like(X)
        dn[xp.arange(X.shape[0]), first] = 1
        return X.max(axis=1, keepdims=True), dn
    if norm == "L1":
        return xp.abs(X).sum(axis=1, keepdims=True), xp.sign(X)
    if norm == "L2":
        n = xp.sqrt((X * X).sum(axis=1, keepdims=True))
        return n, X / xp.where(n == 0, 1, n)
    raise ModelError(f"Normalizer: norm must be one of {_NORMS}, got {norm!r}")


@op("Normalizer", since=1, domain=ML, differentiable=("X",))
def Normalizer(xp, X, *, norm="MAX"):
    """Each row divided by its max, L1 or L2 norm; a row whose norm is zero is kept."""
    X = _matrix(xp, X)
    n, _ = _norm(xp, X, norm)
    return (X / xp.where(n == 0, 1, n),)


def _normalizer_vjp(xp, dY, X, *, norm="MAX"):
    X = _matrix(xp, X).astype(dY.dtype)
    dY = dY.reshape(X.shape)
    n, dn = _norm(xp, X, norm)
    kept = n == 0
    n = xp.where(kept, 1, n)
    # y = x / n(x): dx = dy / n - <dy, x> / n^2 * dn/dx
    dX = dY / n - dn * (dY * X).sum(axis=1, keepdims=True) / (n * n)
    return xp.where(kept, dY, dX)


@op("Imputer", since=1, domain=ML, differentiable=("X",))
def Imputer(xp, X, *, imputed_value_floats=None, imputed_value_int64s=None,
            replaced_value_float=0.0, replaced_value_int64=0):
    """Entries equal to the replaced value (NaN matches NaN) take the column's imputed value."""
    missing, values = _imputed(xp, X, imputed_value_floats, imputed_value_int64s,
                               replaced_value_float, replaced_value_int64)
    return (xp.where(missing, values.astype(X.dtype), X),)


def _imputed(xp, X, floats, ints, replaced_float, replaced_int):
    """Where ``X`` is missing, and the imputed value of each column."""
    if floats:
        values, replaced = _array(xp, floats, xp.float64), replaced_float
    elif ints:
        values, replaced = _array(xp, ints, xp.int64), replaced_int
    else:
        raise ModelError("Imputer has neither imputed_value_floats nor imputed_value_int64s")
    if values.size not in (1, X.shape[-1]):
        raise ModelError(f"Imputer: {values.size} imputed values for {X.shape[-1]} columns")
    missing = xp.isnan(X) if replaced != replaced and X.dtype.kind == "f" else X == replaced
    return missing, values


def _imputer_vjp(xp, dY, X, *, imputed_value_floats=None, imputed_value_int64s=None,
                 replaced_value_float=0.0, replaced_value_int64=0):
    missing, _ = _imputed(xp, X, imputed_value_floats, imputed_value_int64s,
                          replaced_value_float, replaced_value_int64)
    return xp.where(missing, 0, dY)


# -- linear models -------------------------------------------------------------------------
def _linear(xp, X, coefficients, intercepts, rows=None):
    """``X @ W.T + b`` with ``W`` of ``rows`` rows (default: as many as ``X`` has
    columns make up); also ``W``."""
    X = _matrix(xp, X)
    W = _array(xp, coefficients, X.dtype, (-1, X.shape[1]) if rows is None else (rows, -1))
    b = _array(xp, intercepts or [0.0], X.dtype)
    return X @ W.T + b, W


@op("LinearRegressor", since=1, domain=ML, differentiable=("X",))
def LinearRegressor(xp, X, *, coefficients=None, intercepts=None, post_transform="NONE",
                    targets=1):
    """``post_transform(X @ W.T + b)`` with ``W`` of ``targets`` rows."""
    S, _ = _linear(xp, X, coefficients, intercepts, targets)
    return (_post(xp, S, post_transform),)


def _linear_regressor_vjp(xp, dY, X, *, coefficients=None, intercepts=None,
                          post_transform="NONE", targets=1):
    S, W = _linear(xp, X, coefficients, intercepts, targets)
    dY = dY.reshape(S.shape).astype(S.dtype)
    return _post_vjp(xp, _post(xp, S, post_transform), dY, post_transform) @ W


def _class_labels(xp, index, classlabels_ints, classlabels_strings):
    """Class labels for class indices: int64, strings, or the indices themselves."""
    if classlabels_strings:
        return (xp.asarray(classlabels_strings, dtype=object)[index],)
    if classlabels_ints:
        return (xp.asarray(classlabels_ints, dtype=xp.int64)[index],)
    return (index.astype(xp.int64),)


def _linear_scores(xp, X, coefficients, intercepts, classes, post_transform):
    """Raw scores, coefficient matrix and whether it is onnxruntime's binary layout:
    one score column for two classes, written out as ``[1 - p, p]``."""
    S, W = _linear(xp, X, coefficients, intercepts)
    return S, W, W.shape[0] == 1 and classes == 2


def _binary(xp, p):
    return xp.concatenate([1 - p, p], axis=1)


@op("LinearClassifier", since=1, domain=ML, differentiable=("X",))
def LinearClassifier(xp, X, *, coefficients, classlabels_ints=None, classlabels_strings=None,
                     intercepts=None, multi_class=0, post_transform="NONE"):
    """Labels and scores ``post_transform(X @ W.T + b)``; one coefficient row for two
    classes gives the scores ``[1 - p, p]`` (``p`` the logistic of the score with
    ``LOGISTIC``, else the score) and the second label where the score is positive."""
    classes = len(classlabels_ints or classlabels_strings or [])
    S, _, binary = _linear_scores(xp, X, coefficients, intercepts, classes, post_transform)
    if binary:
        p = _post(xp, S, "LOGISTIC") if post_transform == "LOGISTIC" else S
        return _class_labels(xp, (S[:, 0] > 0).astype(xp.int64), classlabels_ints,
                             classlabels_strings) + (_binary(xp, p),)
    index = xp.argmax(S, axis=1)
    return _class_labels(xp, index, classlabels_ints, classlabels_strings) + \
        (_post(xp, S, post_transform),)


def _linear_classifier_vjp(xp, dZ, X, *, coefficients, classlabels_ints=None,
                           classlabels_strings=None, intercepts=None, multi_class=0,
                           post_transform="NONE"):
    classes = len(classlabels_ints or classlabels_strings or [])
    S, W, binary = _linear_scores(xp, X, coefficients, intercepts, classes, post_transform)
    dZ = dZ.astype(S.dtype)
    if binary:
        dp = dZ[:, 1:] - dZ[:, :1]
        kind = "LOGISTIC" if post_transform == "LOGISTIC" else "NONE"
        return _post_vjp(xp, _post(xp, S, kind), dp, kind) @ W
    return _post_vjp(xp, _post(xp, S, post_transform), dZ, post_transform) @ W


ScalerGrad = _gradient_op(Scaler, _scaler_vjp)
NormalizerGrad = _gradient_op(Normalizer, _normalizer_vjp)
ImputerGrad = _gradient_op(Imputer, _imputer_vjp)
LinearRegressorGrad = _gradient_op(LinearRegressor, _linear_regressor_vjp)
LinearClassifierGrad = _gradient_op(LinearClassifier, _linear_classifier_vjp)


# -- the gradients in standard ops ------------------------------------------------------------
def _cast(g, value, dtype):
    dtype = np.dtype(dtype)
    return value if g.dtype(value) == dtype else g.Cast(value, to=std.tensor_type(dtype),
                                                         dtype=dtype)


def _as_input(g, dX, X):
    """``dX`` shaped and typed as ``X`` (as the kernels return it)."""
    return _cast(g, g.Reshape(dX, g.Shape(X, dtype="int64")), g.dtype(X))


def _score_type(g, X):
    return np.dtype(np.float64) if g.dtype(X) == np.float64 else np.dtype(np.float32)


def _matrix_in_standard_ops(g, X, dtype):
    """:func:`_matrix`: ``X`` as (N, C) of ``dtype``; None where its rank is unknown."""
    r = g.rank(X)
    if r is None:
        return None
    return _cast(g, g.Flatten(X, axis=0 if r == 1 else 1), dtype)


@ScalerGrad.in_standard_ops
def _(g, node):
    dY, X = node.inputs
    scale = g.const(list(node.attrs.get("scale") or [1.0]), dtype=g.dtype(dY))
    return (_as_input(g, g.Mul(dY, scale), X),)


@ImputerGrad.in_standard_ops
def _(g, node):
    dY, X = node.inputs
    floats = node.attrs.get("imputed_value_floats")
    if not floats and not node.attrs.get("imputed_value_int64s"):
        return None  # the kernel refuses it
    replaced = node.attrs.get("replaced_value_float", 0.0) if floats else \
        node.attrs.get("replaced_value_int64", 0)
    if replaced != replaced and g.dtype(X).kind == "f":
        missing = g.IsNaN(X)
    else:
        missing = g.Equal(X, g.const(replaced, dtype=g.dtype(X)))
    return (_as_input(g, g.Where(missing, std.like(g, 0, dY), dY), X),)


@NormalizerGrad.in_standard_ops
def _(g, node):
    dY, X = node.inputs
    norm = node.attrs.get("norm", "MAX")
    work = g.dtype(dY)
    Xm = _matrix_in_standard_ops(g, X, work)
    if Xm is None or norm not in _NORMS:
        return None
    dY = g.Reshape(dY, g.Shape(Xm, dtype="int64"))
    rows = g.ints([1])
    zero, one = std.like(g, 0, Xm), std.like(g, 1, Xm)
    if norm == "MAX":   # the first largest value of each row
        n = g.ReduceMax(Xm, rows, keepdims=1)
        first = g.ArgMax(Xm, axis=1, keepdims=0, select_last_index=0, dtype="int64")
        depth = g.Slice(g.Shape(Xm, dtype="int64"), g.ints([1]), g.ints([2]))
        dn = g.OneHot(first, depth, g.const([0, 1], dtype=work), axis=-1, dtype=work)
    elif norm == "L1":
        n = g.ReduceSum(g.Abs(Xm), rows, keepdims=1)
        dn = g.Sign(Xm)
    else:
        n = g.Sqrt(g.ReduceSum(g.Mul(Xm, Xm), rows, keepdims=1))
    kept = g.Equal(n, zero)
    n = g.Where(kept, one, n)
    if norm == "L2":
        dn = g.Div(Xm, n)
    dX = g.Sub(g.Div(dY, n), g.Div(g.Mul(dn, g.ReduceSum(g.Mul(dY, Xm), rows, keepdims=1)),
                                   g.Mul(n, n)))
    return (_as_input(g, g.Where(kept, dY, dX), X),)


def _post_in_standard_ops(g, S, kind):
    """:func:`_post` of scores ``S`` (N, K)."""
    if kind == "NONE":
        return S
    if kind == "LOGISTIC":
        one = std.like(g, 1, S)
        return g.Div(one, g.Add(one, g.Exp(g.Neg(S))))
    e = g.Exp(g.Sub(S, g.ReduceMax(S, g.ints([1]), keepdims=1)))
    if kind == "SOFTMAX_ZERO":
        e = g.Where(g.Equal(S, std.like(g, 0, S)), std.like(g, 0, S), e)
    return g.Div(e, g.Max(g.ReduceSum(e, g.ints([1]), keepdims=1), std.like(g, 1e-300, S)))


def _post_vjp_in_standard_ops(g, P, dP, kind):
    """:func:`_post_vjp`."""
    if kind == "NONE":
        return dP
    if kind == "LOGISTIC":
        return g.Mul(g.Mul(dP, P), g.Sub(std.like(g, 1, P), P))
    return g.Mul(P, g.Sub(dP, g.ReduceSum(g.Mul(dP, P), g.ints([1]), keepdims=1)))


_POST = ("NONE", "LOGISTIC", "SOFTMAX", "SOFTMAX_ZERO")


def _linear_in_standard_ops(g, X, coefficients, intercepts, rows=None):
    """:func:`_linear`: the scores (N, K) and ``W`` (K, C); None where X's rank is unknown."""
    work = _score_type(g, X)
    Xm = _matrix_in_standard_ops(g, X, work)
    if Xm is None:
        return None
    coef = g.const(list(coefficients), dtype=work)
    if rows is None:
        columns = g.Slice(g.Shape(Xm, dtype="int64"), g.ints([1]), g.ints([2]))
        W = g.Reshape(coef, g.Concat(g.ints([-1]), columns, axis=0, dtype="int64"))
    else:
        W = g.Reshape(coef, g.ints([rows, -1]))
    b = g.const(list(intercepts or [0.0]), dtype=work)
    return g.Add(g.MatMul(Xm, g.Transpose(W, perm=[1, 0])), b), W


@LinearRegressorGrad.in_standard_ops
def _(g, node):
    dY, X = node.inputs
    kind = node.attrs.get("post_transform", "NONE")
    scores = _linear_in_standard_ops(g, X, node.attrs["coefficients"],
                                     node.attrs.get("intercepts"), node.attrs.get("targets", 1))
    if scores is None or kind not in _POST:
        return None
    S, W = scores
    dS = _cast(g, g.Reshape(dY, g.Shape(S, dtype="int64")), g.dtype(S))
    dS = _post_vjp_in_standard_ops(g, _post_in_standard_ops(g, S, kind), dS, kind)
    return (_as_input(g, g.MatMul(dS, W), X),)


@LinearClassifierGrad.in_standard_ops
def _(g, node):
    dZ, X = node.inputs
    attrs = node.attrs
    kind = attrs.get("post_transform", "NONE")
    coefficients = list(attrs["coefficients"])
    classes = len(attrs.get("classlabels_ints") or attrs.get("classlabels_strings") or [])
    binary = False
    if classes == 2:  # binary: one coefficient row, which needs the number of columns
        shape = std.tensor_shape(g, X)
        if shape is None or not all(isinstance(d, int) for d in shape):
            return None
        columns = shape[0] if len(shape) == 1 else int(np.prod(shape[1:]))
        binary = len(coefficients) == columns
    scores = _linear_in_standard_ops(g, X, coefficients, attrs.get("intercepts"))
    if scores is None or kind not in _POST:
        return None
    S, W = scores
    dZ = _cast(g, dZ, g.dtype(S))
    if binary:
        dZ = g.Sub(g.Slice(dZ, g.ints([1]), g.ints([std.END]), g.ints([1])),
                   g.Slice(dZ, g.ints([0]), g.ints([1]), g.ints([1])))
        kind = "LOGISTIC" if kind == "LOGISTIC" else "NONE"
    dS = _post_vjp_in_standard_ops(g, _post_in_standard_ops(g, S, kind), dZ, kind)
    return (_as_input(g, g.MatMul(dS, W), X),)
