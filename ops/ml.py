"""Ops of the ``ai.onnx.ml`` domain (scikit-learn exports).

Forward only: ``X`` is declared differentiable but no rule is registered, so
asking for its gradient raises ``UnsupportedOpError`` rather than giving zero.
"""

from __future__ import annotations

from onnxgrad.ops.registry import op


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
