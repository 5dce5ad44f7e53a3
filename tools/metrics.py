"""Loss and accuracy of a model on a data set, computed with NumPy.

The losses are the ones ``onnxgrad.Trainer`` trains with, averaged over every
element the way PyTorch's ``reduction="mean"`` does; evaluation runs
``Model.run`` (inference mode) batch by batch and accumulates sums, so memory
stays bounded by one batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from onnxgrad.errors import DataError

from onnxgrad.losses import Loss

from .data import Dataset

#: The losses the CLI offers, with one line of help each.
LOSSES = {
    "cross_entropy": "softmax cross-entropy of logits [N, C, ...] against integer labels [N, ...]",
    "nll": "negative log-likelihood of log-probabilities [N, C, ...] against integer labels",
    "mse": "mean squared error against targets of the output's shape",
    "l1": "mean absolute error against targets of the output's shape",
    "bce_with_logits": "binary cross-entropy of logits against targets in [0, 1]",
}


def _gather_class(x: np.ndarray, t: np.ndarray) -> np.ndarray:
    """``x[n, t[n, ...], ...]`` for scores ``x`` [N, C, ...] and labels ``t`` [N, ...]."""
    return np.take_along_axis(x, np.expand_dims(t, 1), axis=1).squeeze(1)


def loss_sum(loss: Loss, y: np.ndarray, t: np.ndarray) -> tuple[float, int]:
    """Sum of the per-element losses and the number of elements averaged over.

    For class losses ``y`` has its classes on axis 1; targets equal to the
    loss's ``ignore_index`` count for nothing.
    """
    y = y.astype(np.float64)
    keep = None
    if loss.target == "class" and loss.ignore_index is not None:
        keep = t != loss.ignore_index
        t = np.where(keep, t, 0)
    if loss.name == "cross_entropy":
        m = y.max(axis=1, keepdims=True)
        lse = np.log(np.exp(y - m).sum(axis=1)) + m.squeeze(1)
        per = lse - _gather_class(y, t)
    elif loss.name == "nll":
        per = -_gather_class(y, t)
    elif loss.name == "mse":
        per = (y - t) ** 2
    elif loss.name == "l1":
        per = np.abs(y - t)
    elif loss.name == "bce_with_logits":
        per = np.maximum(y, 0) - y * t + np.log1p(np.exp(-np.abs(y)))
    else:  # pragma: no cover - the CLI checks names first
        raise DataError(f"unknown loss {loss.name!r}; choose one of {', '.join(LOSSES)}")
    if keep is not None:
        per = per[keep]
    return float(per.sum()), int(per.size)


@dataclass
class Metrics:
    loss: float
    accuracy: float | None = None
    correct: int = 0
    count: int = 0
    #: exp(loss), shown for per-position class targets (language models, segmentation)
    perplexity: float | None = None

    def format(self, prefix: str = "") -> str:
        text = f"{prefix}loss {self.loss:.4f}"
        if self.perplexity is not None:
            text += f"  {prefix}ppl {self.perplexity:.3f}"
        if self.accuracy is not None:
            text += f"  {prefix}acc {self.accuracy:.4f}"
        return text


def batches(n: int, batch_size: int, order: np.ndarray | None = None):
    idx = np.arange(n) if order is None else order
    for start in range(0, n, batch_size):
        yield idx[start:start + batch_size]


def evaluate(run: Callable[[dict], np.ndarray], ds: Dataset, loss: Loss, batch_size: int,
             check_first: Callable[[np.ndarray], None] | None = None,
             fixed_batch: bool = False) -> Metrics:
    """Loss (and accuracy for classifiers) of ``run(feeds) -> output`` on ``ds``.

    ``check_first`` sees the output of the first batch before any loss is
    computed (the CLI checks the targets against the output's shape there).
    With ``fixed_batch`` (a model whose batch dimension is fixed to
    ``batch_size``) a short last batch is padded by repeating its first row,
    and the padding rows' outputs are dropped.
    """
    total, count, correct, labels = 0.0, 0, 0, 0
    classify = loss.target == "class"
    for i, index in enumerate(batches(len(ds), batch_size)):
        n = len(index)
        run_index = index
        if fixed_batch and n < batch_size:
            run_index = np.concatenate([index, np.repeat(index[:1], batch_size - n)])
        feeds = {k: v[run_index] if len(run_index) < len(v) or fixed_batch else v
                 for k, v in ds.feeds.items()}
        y = np.asarray(run(feeds))[:n]
        if classify and loss.class_axis_of(y.ndim) != 1:  # classes on axis 1 from here on
            y = np.moveaxis(y, loss.class_axis_of(y.ndim), 1)
        if i == 0 and check_first is not None:
            check_first(y)
        t = ds.target[index]
        s, c = loss_sum(loss, y, t)
        total += s
        count += c
        if classify:
            hit = y.argmax(axis=1) == t
            if loss.ignore_index is not None:
                counted = t != loss.ignore_index
                hit &= counted
                labels += int(counted.sum())
            else:
                labels += t.size
            correct += int(hit.sum())
    mean = total / max(count, 1)
    if classify:
        per_position = ds.target is not None and ds.target.ndim >= 2
        return Metrics(mean, correct / max(labels, 1), correct, labels,
                       perplexity=float(np.exp(min(mean, 700.0))) if per_position else None)
    return Metrics(mean)
