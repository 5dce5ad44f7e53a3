"""Loss ops: ONNX's SoftmaxCrossEntropyLoss and NegativeLogLikelihoodLoss, and
onnxgrad's fused binary cross-entropy on logits, with their gradient kernels."""

from __future__ import annotations

from onnxgrad.ops import standard as std
from onnxgrad.ops.registry import op

_PRIVATE = "onnxgrad"


def _class_weights(xp, labels, weights, ignore_index, dtype):
    """Per-element weights (None when all are 1) and labels safe to index with."""
    mask = None if ignore_index is None else labels != ignore_index
    safe = labels if mask is None else xp.where(mask, labels, 0)
    w = None if weights is None else xp.take(weights, safe).astype(dtype, copy=False)
    if mask is not None:
        m = mask.astype(dtype)
        w = m if w is None else w * m
    return safe, w


def _pick(xp, values, labels):
    """values[n, labels[n, d…], d…] for inputs N×C×d… and labels N×d…."""
    return xp.take_along_axis(values, xp.expand_dims(labels, 1), axis=1).squeeze(1)


def _reduce(xp, per_element, w, reduction):
    if reduction == "none":
        return per_element
    total = xp.sum(per_element)
    if reduction == "sum":
        return xp.asarray(total)
    denom = per_element.size if w is None else xp.sum(w)
    return xp.asarray(total / denom)


def _nll(xp, log_prob, labels, weights, ignore_index, reduction):
    safe, w = _class_weights(xp, labels, weights, ignore_index, log_prob.dtype)
    picked = -_pick(xp, log_prob, safe)
    if w is not None:
        picked = picked * w
    return _reduce(xp, picked, w, reduction)


def _log_softmax(xp, x, axis):
    shifted = x - xp.max(x, axis=axis, keepdims=True)
    return shifted - xp.log(xp.sum(xp.exp(shifted), axis=axis, keepdims=True))


def _plain_rows(scores, weights, ignore_index, reduction):
    """Whether a loss over ``scores`` takes the short path for the common case: one
    row of class scores per item (N×C), no class weights, nothing ignored, mean."""
    return scores.ndim == 2 and weights is None and ignore_index is None and reduction == "mean"


def _rows_and_labels(xp, log_prob, labels):
    """Flat indices of ``log_prob[n, labels[n]]`` in an N×C array."""
    n, c = log_prob.shape
    return xp.arange(0, n * c, c) + labels


@op("SoftmaxCrossEntropyLoss", since=12, differentiable=("scores",))
def SoftmaxCrossEntropyLoss(xp, scores, labels, weights=None, *, ignore_index=None,
                            reduction="mean"):
    if _plain_rows(scores, weights, ignore_index, reduction):
        # The same arithmetic as the general path in fewer array operations: in a
        # training step this kernel runs between large products, where every
        # call into the array library is slow.
        log_prob = scores - scores.max(axis=1, keepdims=True)
        log_prob -= xp.log(xp.exp(log_prob).sum(axis=1, keepdims=True))
        picked = log_prob.reshape(-1)[_rows_and_labels(xp, log_prob, labels)]
        return xp.asarray(-picked.mean()), log_prob
    log_prob = _log_softmax(xp, scores, axis=1)
    return _nll(xp, log_prob, labels, weights, ignore_index, reduction), log_prob


@op("NegativeLogLikelihoodLoss", since=12, differentiable=("input",))
def NegativeLogLikelihoodLoss(xp, input, target, weight=None, *, ignore_index=None,
                              reduction="mean"):
    return (_nll(xp, input, target, weight, ignore_index, reduction),)


def _coefficient(xp, dY, labels, weights, ignore_index, reduction, dtype):
    """d loss / d (picked log-probability), per element, with its sign flipped."""
    safe, w = _class_weights(xp, labels, weights, ignore_index, dtype)
    if reduction == "mean":
        denom = labels.size if w is None else xp.sum(w)
        coef = dY / denom
    else:  # "sum": dY is a scalar; "none": dY has the labels' shape
        coef = dY
    coef = xp.broadcast_to(xp.asarray(coef, dtype=dtype), labels.shape)
    if w is not None:
        coef = coef * w
    return safe, coef


def _one_hot(xp, labels, num_classes, ndim):
    classes = xp.arange(num_classes).reshape((1, num_classes) + (1,) * (ndim - 2))
    return classes == xp.expand_dims(labels, 1)


@op("SoftmaxCrossEntropyLossGrad", domain=_PRIVATE)
def SoftmaxCrossEntropyLossGrad(xp, dY, log_prob, labels, weights=None, *, ignore_index=None,
                                reduction="mean"):
    if _plain_rows(log_prob, weights, ignore_index, reduction):
        d = xp.exp(log_prob)
        d.reshape(-1)[_rows_and_labels(xp, log_prob, labels)] -= 1
        d *= (dY / labels.size).astype(d.dtype, copy=False)
        return (d,)
    safe, coef = _coefficient(xp, dY, labels, weights, ignore_index, reduction, log_prob.dtype)
    hot = _one_hot(xp, safe, log_prob.shape[1], log_prob.ndim)
    return ((xp.exp(log_prob) - hot) * xp.expand_dims(coef, 1),)


def _standard_picks(g, node, dY, scores, labels, weights):
    """The one-hot of the (safe) labels and the coefficient of each picked score, as
    :func:`_coefficient` computes them, in standard ops."""
    ignore_index = node.attrs.get("ignore_index")
    reduction = node.attrs.get("reduction", "mean")
    safe, w = labels, None
    if ignore_index is not None:
        ignored = g.Equal(labels, g.const(ignore_index, dtype=g.dtype(labels)), dtype="bool")
        safe = g.Where(ignored, g.const(0, dtype=g.dtype(labels)), labels)
        w = std.cast_like(g, g.Not(ignored, dtype="bool"), scores)
    if weights is not None:
        picked = g.Gather(weights, safe, axis=0)
        w = picked if w is None else g.Mul(picked, w)
    if reduction == "mean":
        denom = (std.cast_like(g, g.Size(labels, dtype="int64"), scores) if w is None
                 else g.ReduceSum(w, keepdims=0))
        coef = g.Div(dY, denom)
    else:  # "sum": dY is a scalar; "none": dY has the labels' shape
        coef = dY
    if w is not None:
        coef = g.Mul(coef, w)
    if w is not None or reduction == "none":
        coef = g.Unsqueeze(coef, g.ints([1]))
    classes = g.Slice(g.Shape(scores, dtype="int64"), g.ints([1]), g.ints([2]))
    hot = g.OneHot(safe, classes, g.const([0, 1], dtype=g.dtype(scores)), axis=1,
                   dtype=g.dtype(scores))
    return hot, coef


@SoftmaxCrossEntropyLossGrad.in_standard_ops
def _(g, node):
    dY, log_prob, labels, *rest = node.inputs
    weights = rest[0] if rest and rest[0] else None
    hot, coef = _standard_picks(g, node, dY, log_prob, labels, weights)
    return (g.Mul(g.Sub(g.Exp(log_prob), hot), coef),)


@op("NegativeLogLikelihoodLossGrad", domain=_PRIVATE)
def NegativeLogLikelihoodLossGrad(xp, dY, input, target, weight=None, *, ignore_index=None,
                                  reduction="mean"):
    safe, coef = _coefficient(xp, dY, target, weight, ignore_index, reduction, input.dtype)
    hot = _one_hot(xp, safe, input.shape[1], input.ndim)
    return (-(hot * xp.expand_dims(coef, 1)),)


@NegativeLogLikelihoodLossGrad.in_standard_ops
def _(g, node):
    dY, scores, target, *rest = node.inputs
    weights = rest[0] if rest and rest[0] else None
    hot, coef = _standard_picks(g, node, dY, scores, target, weights)
    return (g.Neg(g.Mul(hot, coef)),)


@SoftmaxCrossEntropyLoss.gradient
def _(g, node, dLoss, dLogProb=None):
    scores, labels, *rest = node.inputs
    weights = rest[0] if rest else None
    attrs = dict(ignore_index=node.attrs["ignore_index"], reduction=node.attrs["reduction"])
    log_prob = node.outputs[1] if len(node.outputs) > 1 and node.outputs[1] else \
        g.LogSoftmax(scores, axis=1)
    parts = []
    if dLoss is not None:
        parts.append(g.private("SoftmaxCrossEntropyLossGrad", dLoss, log_prob, labels, weights,
                               **attrs))
    if dLogProb is not None:
        parts.append(g.private("LogSoftmaxGrad", dLogProb, log_prob, axis=1))
    dScores = parts[0] if len(parts) == 1 else g.Add(*parts)
    return (dScores,) + (None,) * (len(node.inputs) - 1)


@NegativeLogLikelihoodLoss.gradient
def _(g, node, dLoss):
    input, target, *rest = node.inputs
    weight = rest[0] if rest else None
    d = g.private("NegativeLogLikelihoodLossGrad", dLoss, input, target, weight,
                  ignore_index=node.attrs["ignore_index"], reduction=node.attrs["reduction"])
    return (d,) + (None,) * (len(node.inputs) - 1)


@op("BinaryCrossEntropyWithLogits", domain=_PRIVATE, differentiable=("X",))
def BinaryCrossEntropyWithLogits(xp, X, T):
    """mean(max(x, 0) - x·t + log(1 + exp(-|x|))): stable for any logit."""
    per_element = xp.maximum(X, 0) - X * T + xp.log1p(xp.exp(-xp.abs(X)))
    return (xp.asarray(xp.mean(per_element)),)


@BinaryCrossEntropyWithLogits.in_standard_ops
def _(g, node):
    X, T = node.inputs
    zero = std.like(g, 0, X)
    softplus = g.Log(g.Add(std.like(g, 1, X), g.Exp(g.Neg(g.Abs(X)))))
    per_element = g.Add(g.Sub(g.Max(X, zero), g.Mul(X, T)), softplus)
    return (g.ReduceMean(per_element, keepdims=0),)


@op("BinaryCrossEntropyWithLogitsGrad", domain=_PRIVATE)
def BinaryCrossEntropyWithLogitsGrad(xp, dY, X, T):
    sigmoid = 0.5 * (1 + xp.tanh(0.5 * X))  # overflow-free logistic
    return ((sigmoid - T) * (dY / X.size),)


@BinaryCrossEntropyWithLogitsGrad.in_standard_ops
def _(g, node):
    dY, X, T = node.inputs
    count = std.cast_like(g, g.Size(X, dtype="int64"), X)
    return (g.Mul(g.Sub(g.Sigmoid(X), T), g.Div(dY, count)),)


@BinaryCrossEntropyWithLogits.gradient
def _(g, node, dY):
    X, T = node.inputs
    return g.private("BinaryCrossEntropyWithLogitsGrad", dY, X, T), None


@op("OnesLike", domain=_PRIVATE, differentiable=())  # constant in X's values
def OnesLike(xp, X):
    """Ones of X's shape and type: the seed of a non-scalar gradient."""
    return (xp.ones_like(X),)


@OnesLike.in_standard_ops
def _(g, node):
    X = node.inputs[0]
    return (g.Add(std.zeros(g, g.Shape(X, dtype="int64"), X), std.like(g, 1, X)),)


@op("ZerosLike", domain=_PRIVATE, differentiable=())  # constant in X's values
def ZerosLike(xp, X):
    """Zeros of X's shape and type: the gradient of a value that does not depend on X."""
    return (xp.zeros_like(X),)


@ZerosLike.in_standard_ops
def _(g, node):
    X = node.inputs[0]
    return (std.zeros(g, g.Shape(X, dtype="int64"), X),)
