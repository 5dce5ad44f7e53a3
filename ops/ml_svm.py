"""Support vector machines of the ``ai.onnx.ml`` domain, with gradients for ``X``.

The decision values are linear in the kernel values ``K(X, support_vectors)``:
``S = K @ A.T + rho``, where ``A`` holds one row of dual coefficients per
target or class pair.  The gradient rules (private ``onnxgrad::SVMRegressorGrad``
and ``SVMClassifierGrad``, made by :func:`onnxgrad.ops.ml_linear._gradient_op`) run
that back through the kernel.  Behaviour follows onnxruntime; SVMClassifier's
Platt probabilities (``prob_a``, ``prob_b``) are not supported.
"""

from __future__ import annotations

import numpy as np  # host constants of standard forms

from onnxgrad.errors import ModelError
from onnxgrad.ops import standard as std
from onnxgrad.ops.ml_linear import (_POST, ML, _array, _as_input, _cast, _class_labels,
                                    _gradient_op, _matrix, _matrix_in_standard_ops, _post,
                                    _post_in_standard_ops, _post_vjp, _post_vjp_in_standard_ops,
                                    _score_type)
from onnxgrad.ops.registry import op


class _Kernel:
    """The kernel ``kernel_type`` with ``kernel_params`` (gamma, coef0, degree)."""

    def __init__(self, xp, kernel_type, kernel_params):
        self.xp = xp
        self.kind = kernel_type.upper()
        if self.kind not in ("LINEAR", "POLY", "RBF", "SIGMOID"):
            raise ModelError(f"SVM: unknown kernel_type {kernel_type!r}")
        gamma, coef0, degree = (list(kernel_params or []) + [0.0, 0.0, 0.0])[:3]
        self.gamma, self.coef0, self.degree = gamma, coef0, int(degree)

    def __call__(self, X, SV):
        xp = self.xp
        if self.kind == "LINEAR":
            return X @ SV.T
        if self.kind == "RBF":
            d = (X * X).sum(axis=1)[:, None] + (SV * SV).sum(axis=1)[None, :] - 2 * X @ SV.T
            return xp.exp(-self.gamma * xp.maximum(d, 0))
        t = self.gamma * (X @ SV.T) + self.coef0
        return t ** self.degree if self.kind == "POLY" else xp.tanh(t)

    def vjp(self, X, SV, dK):
        """The gradient of ``X`` from that of the kernel values ``dK``."""
        if self.kind == "LINEAR":
            return dK @ SV
        if self.kind == "RBF":
            w = dK * self(X, SV)
            return -2 * self.gamma * (w.sum(axis=1, keepdims=True) * X - w @ SV)
        t = self.gamma * (X @ SV.T) + self.coef0
        if self.kind == "POLY":
            slope = self.degree * t ** (self.degree - 1)
        else:
            slope = 1 - self.xp.tanh(t) ** 2
        return (dK * slope * self.gamma) @ SV


# -- regressor ----------------------------------------------------------------------------------
def _regressor_parts(xp, X, coefficients, kernel_params, kernel_type, n_supports, rho,
                     support_vectors):
    """X as a matrix, the kernel, support vectors (X's columns for a linear SVM), coefficients."""
    X = _matrix(xp, X)
    if n_supports > 0:
        kernel = _Kernel(xp, kernel_type, kernel_params)
        SV = _array(xp, support_vectors, X.dtype, (n_supports, -1))
    else:  # liblinear: the coefficients are the weights of X's columns
        kernel = _Kernel(xp, "LINEAR", None)
        SV = xp.eye(X.shape[1], dtype=X.dtype)
    coef = _array(xp, coefficients, X.dtype)
    return X, kernel, SV, coef, _array(xp, rho or [0.0], X.dtype)[0]


@op("SVMRegressor", since=1, domain=ML, differentiable=("X",))
def SVMRegressor(xp, X, *, coefficients=None, kernel_params=None, kernel_type="LINEAR",
                 n_supports=0, one_class=0, post_transform="NONE", rho=None,
                 support_vectors=None):
    """``K(X, SV) @ coefficients + rho`` (``X @ coefficients + rho`` without support
    vectors); ``one_class`` gives its sign as ±1."""
    X, kernel, SV, coef, bias = _regressor_parts(xp, X, coefficients, kernel_params,
                                                 kernel_type, n_supports, rho, support_vectors)
    S = kernel(X, SV) @ coef[:, None] + bias
    if one_class:
        return (xp.where(S > 0, 1, -1).astype(S.dtype),)
    return (_post(xp, S, post_transform),)


def _svm_regressor_vjp(xp, dY, X, *, coefficients=None, kernel_params=None,
                       kernel_type="LINEAR", n_supports=0, one_class=0, post_transform="NONE",
                       rho=None, support_vectors=None):
    X, kernel, SV, coef, bias = _regressor_parts(xp, X, coefficients, kernel_params,
                                                 kernel_type, n_supports, rho, support_vectors)
    if one_class:  # piecewise constant
        return xp.zeros_like(X)
    S = kernel(X, SV) @ coef[:, None] + bias
    dS = _post_vjp(xp, _post(xp, S, post_transform), dY.reshape(S.shape).astype(S.dtype),
                   post_transform)
    return kernel.vjp(X, SV, dS @ coef[None, :])


# -- classifier ---------------------------------------------------------------------------------
class _Classifier:
    """An SVMClassifier's decision values ``S = K(X, SV) @ A.T + rho``: one per class
    for a linear SVM (all offset by ``rho[0]``), one per class pair (i < j, positive
    for i) for libsvm's SVC."""

    def __init__(self, xp, X, *, classlabels_ints, classlabels_strings, coefficients,
                 kernel_params, kernel_type, rho, support_vectors, vectors_per_class):
        self.xp = xp
        self.X = X = _matrix(xp, X)
        self.classes = max(len(classlabels_ints or classlabels_strings or []), 1)
        counts = [int(c) for c in (vectors_per_class or [])]
        coef = _array(xp, coefficients, X.dtype)
        self.svc = sum(counts) > 0
        if self.svc:
            self.kernel = _Kernel(xp, kernel_type, kernel_params)
            self.SV = _array(xp, support_vectors, X.dtype, (sum(counts), -1))
            self.A = self._pairwise(coef.reshape(-1, sum(counts)), counts)
        else:
            self.kernel = _Kernel(xp, "LINEAR", None)
            self.SV = xp.eye(X.shape[1], dtype=X.dtype)
            self.A = coef.reshape(-1, X.shape[1])
        self.rho = _array(xp, rho or [0.0], X.dtype)
        if not self.svc:  # onnxruntime adds rho[0] to every class
            self.rho = self.rho[:1]

    def _pairwise(self, coef, counts):
        return _pairwise(self.xp, coef, counts)

    def decisions(self):
        return self.kernel(self.X, self.SV) @ self.A.T + self.rho

    def votes(self, S):
        """Class indices of the pairwise vote (ties to the lower class)."""
        xp, k = self.xp, self.classes
        votes = xp.zeros((S.shape[0], k), dtype=xp.int64)
        pair = 0
        for i in range(k):
            for j in range(i + 1, k):
                votes[:, i] += S[:, pair] > 0
                votes[:, j] += S[:, pair] <= 0
                pair += 1
        return xp.argmax(votes, axis=1)


def _pairwise(xp, coef, counts):
    """Row ``(i, j)`` of ``A``: libsvm's coefficients of classes i and j's vectors."""
    starts = [sum(counts[:k]) for k in range(len(counts))]
    rows = []
    for i in range(len(counts)):
        for j in range(i + 1, len(counts)):
            row = xp.zeros(coef.shape[1], dtype=coef.dtype)
            row[starts[i]:starts[i] + counts[i]] = coef[j - 1, starts[i]:starts[i] + counts[i]]
            row[starts[j]:starts[j] + counts[j]] = coef[i, starts[j]:starts[j] + counts[j]]
            rows.append(row)
    return xp.stack(rows)


def _classifier(xp, X, attrs):
    if attrs.get("prob_a"):
        raise ModelError("SVMClassifier: Platt probabilities (prob_a, prob_b) are not supported")
    return _Classifier(xp, X, **{k: attrs[k] for k in (
        "classlabels_ints", "classlabels_strings", "coefficients", "kernel_params",
        "kernel_type", "rho", "support_vectors", "vectors_per_class")})


def _binary_scores(xp, S, kind):
    """One decision value ``s`` for two classes, written as onnxruntime does: ``[-s, s]``
    (NONE), ``[1 - p, p]`` with ``p`` its logistic (LOGISTIC), else ``[1 - s, s]``."""
    p = _post(xp, S, "LOGISTIC") if kind == "LOGISTIC" else S
    return xp.concatenate([(0 if kind == "NONE" else 1) - p, p], axis=1)


@op("SVMClassifier", since=1, domain=ML, differentiable=("X",))
def SVMClassifier(xp, X, *, classlabels_ints=None, classlabels_strings=None, coefficients=None,
                  kernel_params=None, kernel_type="LINEAR", post_transform="NONE", prob_a=None,
                  prob_b=None, rho=None, support_vectors=None, vectors_per_class=None):
    """Labels (pairwise votes for an SVC, the largest decision value for a linear SVM) and
    the post-transformed decision values."""
    model = _classifier(xp, X, dict(locals()))
    S = model.decisions()
    if S.shape[1] == 1:
        index = (S[:, 0] <= 0).astype(xp.int64)
        scores = _binary_scores(xp, S, post_transform)
    else:
        index = model.votes(S) if model.svc else xp.argmax(S, axis=1)
        scores = _post(xp, S, post_transform)
    return _class_labels(xp, index, classlabels_ints, classlabels_strings) + (scores,)


def _svm_classifier_vjp(xp, dZ, X, **attrs):
    model = _classifier(xp, X, attrs)
    S = model.decisions()
    kind = attrs["post_transform"]
    dZ = dZ.astype(S.dtype)
    if S.shape[1] == 1:  # the score columns are c - p and p
        kind = "LOGISTIC" if kind == "LOGISTIC" else "NONE"
        dZ = dZ[:, 1:] - dZ[:, :1]
    dS = _post_vjp(xp, _post(xp, S, kind), dZ, kind)
    return model.kernel.vjp(model.X, model.SV, dS @ model.A)


SVMRegressorGrad = _gradient_op(SVMRegressor, _svm_regressor_vjp)
SVMClassifierGrad = _gradient_op(SVMClassifier, _svm_classifier_vjp)


# -- the gradients in standard ops ------------------------------------------------------------
class _KernelInStandardOps:
    """:class:`_Kernel` on ``X`` (N, C) and constant support vectors ``SV`` (a host
    array; None for the identity of a linear SVM without support vectors)."""

    def __init__(self, g, kernel_type, kernel_params, X, SV):
        self.g, self.X = g, X
        self.kind = kernel_type.upper()
        gamma, coef0, degree = (list(kernel_params or []) + [0.0, 0.0, 0.0])[:3]
        self.gamma, self.coef0, self.degree = gamma, coef0, int(degree)
        self.SV = None if SV is None else g.const(SV, dtype=g.dtype(X))

    def _c(self, value):
        return std.like(self.g, value, self.X)

    def _dot(self):  # X @ SV.T
        return self.g.MatMul(self.X, self.g.Transpose(self.SV, perm=[1, 0]))

    def __call__(self):
        g = self.g
        if self.SV is None:
            return self.X
        if self.kind == "LINEAR":
            return self._dot()
        if self.kind == "RBF":
            rows = g.ints([1])
            xx = g.ReduceSum(g.Mul(self.X, self.X), rows, keepdims=1)
            ss = g.Transpose(g.ReduceSum(g.Mul(self.SV, self.SV), rows, keepdims=1),
                             perm=[1, 0])
            d = g.Sub(g.Add(xx, ss), g.Mul(self._c(2), self._dot()))
            return g.Exp(g.Mul(self._c(-self.gamma), g.Max(d, self._c(0))))
        t = self._t()
        return g.Pow(t, self._c(self.degree)) if self.kind == "POLY" else g.Tanh(t)

    def _t(self):
        return self.g.Add(self.g.Mul(self._c(self.gamma), self._dot()), self._c(self.coef0))

    def vjp(self, dK):
        g = self.g
        if self.SV is None:
            return dK
        if self.kind == "LINEAR":
            return g.MatMul(dK, self.SV)
        if self.kind == "RBF":
            w = g.Mul(dK, self())
            rowsum = g.ReduceSum(w, g.ints([1]), keepdims=1)
            return g.Mul(self._c(-2 * self.gamma),
                         g.Sub(g.Mul(rowsum, self.X), g.MatMul(w, self.SV)))
        t = self._t()
        if self.kind == "POLY":
            slope = g.Mul(self._c(self.degree), g.Pow(t, self._c(self.degree - 1)))
        else:
            th = g.Tanh(t)
            slope = g.Sub(self._c(1), g.Mul(th, th))
        return g.MatMul(g.Mul(g.Mul(dK, slope), self._c(self.gamma)), self.SV)


_KERNELS = ("LINEAR", "POLY", "RBF", "SIGMOID")


@SVMRegressorGrad.in_standard_ops
def _(g, node):
    dY, X = node.inputs
    attrs = node.attrs
    kind = attrs.get("post_transform") or "NONE"
    kernel_type = (attrs.get("kernel_type") or "LINEAR").upper()
    n_supports = int(attrs.get("n_supports") or 0)
    work = _score_type(g, X)
    Xm = _matrix_in_standard_ops(g, X, work)
    if Xm is None or kind not in _POST or (n_supports > 0 and kernel_type not in _KERNELS):
        return None
    if attrs.get("one_class"):  # piecewise constant
        return (std.zeros(g, g.Shape(X, dtype="int64"), X),)
    SV = None
    if n_supports > 0:
        SV = np.asarray(list(attrs["support_vectors"]), dtype=work).reshape(n_supports, -1)
    kernel = _KernelInStandardOps(g, kernel_type, attrs.get("kernel_params"), Xm, SV)
    coef = g.const(np.asarray(list(attrs["coefficients"]), dtype=work).reshape(-1, 1))
    bias = g.const(list(attrs.get("rho") or [0.0])[0], dtype=work)
    S = g.Add(g.MatMul(kernel(), coef), bias)
    dS = _cast(g, g.Reshape(dY, g.Shape(S, dtype="int64")), work)
    dS = _post_vjp_in_standard_ops(g, _post_in_standard_ops(g, S, kind), dS, kind)
    return (_as_input(g, kernel.vjp(g.MatMul(dS, g.Transpose(coef, perm=[1, 0]))), X),)


@SVMClassifierGrad.in_standard_ops
def _(g, node):
    dZ, X = node.inputs
    attrs = node.attrs
    if attrs.get("prob_a"):
        return None  # the kernel refuses Platt probabilities
    kind = attrs.get("post_transform") or "NONE"
    kernel_type = (attrs.get("kernel_type") or "LINEAR").upper()
    counts = [int(c) for c in (attrs.get("vectors_per_class") or [])]
    work = _score_type(g, X)
    Xm = _matrix_in_standard_ops(g, X, work)
    if Xm is None or kind not in _POST:
        return None
    coef = np.asarray(list(attrs["coefficients"]), dtype=work)
    rho = np.asarray(list(attrs.get("rho") or [0.0]), dtype=work)
    if sum(counts) > 0:
        if kernel_type not in _KERNELS:
            return None
        SV = np.asarray(list(attrs["support_vectors"]), dtype=work).reshape(sum(counts), -1)
        A = _pairwise(np, coef.reshape(-1, sum(counts)), counts)
    else:  # a linear SVM: one coefficient row per class over X's columns, rho[0] for all
        shape = std.tensor_shape(g, X)
        if shape is None or not all(isinstance(d, int) for d in shape):
            return None
        columns = shape[0] if len(shape) == 1 else int(np.prod(shape[1:]))
        kernel_type, SV, A, rho = "LINEAR", None, coef.reshape(-1, columns), rho[:1]
    kernel = _KernelInStandardOps(g, kernel_type, attrs.get("kernel_params"), Xm, SV)
    A = g.const(A)
    S = g.Add(g.MatMul(kernel(), g.Transpose(A, perm=[1, 0])), g.const(rho))
    dZ = _cast(g, dZ, work)
    if g.graph.initializers[A].shape[0] == 1:  # the score columns are c - p and p
        kind = "LOGISTIC" if kind == "LOGISTIC" else "NONE"
        dZ = g.Sub(g.Slice(dZ, g.ints([1]), g.ints([std.END]), g.ints([1])),
                   g.Slice(dZ, g.ints([0]), g.ints([1]), g.ints([1])))
    dS = _post_vjp_in_standard_ops(g, _post_in_standard_ops(g, S, kind), dZ, kind)
    return (_as_input(g, kernel.vjp(g.MatMul(dS, A)), X),)
