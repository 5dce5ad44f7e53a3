"""RotaryEmbedding (opset 23): rotary position embeddings on (B, H, S, D) or (B, S, H·D).

Each pair of rotated features ``(x1, x2)`` (the two halves of the first
``rotary_embedding_dim`` features, or even/odd features when ``interleaved``)
turns by the angle whose cosine and sine the caches hold for its position::

    (x1, x2) -> (cos·x1 - sin·x2, sin·x1 + cos·x2)

A rotation's adjoint is the rotation by the opposite angle, so the gradient
for ``X`` is the same kernel with ``-sin``.  The caches' gradients sum, over
the heads, ``dY1·x1 + dY2·x2`` (cos) and ``dY2·x1 - dY1·x2`` (sin) per
position; with ``position_ids`` they are added into the cache rows read.
"""

from __future__ import annotations

from onnxgrad.ops.indexing import GatherGrad
from onnxgrad.ops.registry import op


def _pairs(X, num_heads, interleaved, rotary_embedding_dim):
    """``X`` as (B, S, H, D), the slices of the two halves of each rotated pair and the
    number of rotated features."""
    if X.ndim == 4:
        x = X.transpose(0, 2, 1, 3)                               # (B, S, H, D)
    elif X.ndim == 3:
        if not num_heads:
            raise ValueError("RotaryEmbedding: a 3-D input needs the num_heads attribute")
        B, S, hidden = X.shape
        x = X.reshape(B, S, int(num_heads), hidden // int(num_heads))
    else:
        raise ValueError(f"RotaryEmbedding: input must be 3-D or 4-D, got shape {tuple(X.shape)}")
    rd = int(rotary_embedding_dim) or x.shape[3]
    if interleaved:
        return x, slice(0, rd, 2), slice(1, rd, 2), rd
    return x, slice(0, rd // 2), slice(rd // 2, rd), rd


def _angles(cache, position_ids, half, dtype):
    """A cache's rows for each (batch, position), as (B, S, 1, rd/2) in ``dtype``."""
    if position_ids is not None:
        cache = cache[position_ids]
    if cache.shape[-1] != half:
        raise ValueError(f"RotaryEmbedding: a cache has {cache.shape[-1]} columns, expected "
                         f"rotary_embedding_dim/2 = {half}")
    return cache[:, :, None, :].astype(dtype, copy=False)


def rotate(xp, X, cos_cache, sin_cache, position_ids, *, interleaved, num_heads,
           rotary_embedding_dim, sign=1):
    """RotaryEmbedding's output; ``sign=-1`` rotates the other way (the adjoint)."""
    x, first, second, rd = _pairs(X, num_heads, interleaved, rotary_embedding_dim)
    cos = _angles(cos_cache, position_ids, rd // 2, X.dtype)
    sin = _angles(sin_cache, position_ids, rd // 2, X.dtype)
    if sign < 0:
        sin = -sin
    x1, x2 = x[..., first], x[..., second]
    out = xp.empty(x.shape, dtype=X.dtype)
    out[..., first] = cos * x1 - sin * x2
    out[..., second] = sin * x1 + cos * x2
    out[..., rd:] = x[..., rd:]
    if X.ndim == 4:
        return xp.ascontiguousarray(out.transpose(0, 2, 1, 3))
    return out.reshape(X.shape)


@op("RotaryEmbedding", since=23, differentiable=("X", "cos_cache", "sin_cache"))
def RotaryEmbedding(xp, X, cos_cache, sin_cache, position_ids=None, *, interleaved=0,
                    num_heads=0, rotary_embedding_dim=0):
    return (rotate(xp, X, cos_cache, sin_cache, position_ids, interleaved=interleaved,
                   num_heads=num_heads, rotary_embedding_dim=rotary_embedding_dim),)


@RotaryEmbedding.gradient
def _(g, node, dY):
    X, cos, sin, *rest = node.inputs
    pos = rest[0] if rest and rest[0] else None
    dX = g.private("RotaryEmbeddingGrad", dY, cos, sin, pos, **node.attrs)
    dcos, dsin = g.private("RotaryEmbeddingCacheGrad", dY, X, cos, sin, pos, num_outputs=2,
                           dtype=g.dtype(cos), **node.attrs)
    return (dX, dcos, dsin) + (None,) * len(rest)


@op("RotaryEmbeddingGrad", domain="onnxgrad")
def RotaryEmbeddingGrad(xp, dY, cos_cache, sin_cache, position_ids=None, *, interleaved=0,
                        num_heads=0, rotary_embedding_dim=0):
    """The gradient for X: ``dY`` rotated back (the sines negated)."""
    return (rotate(xp, dY, cos_cache, sin_cache, position_ids, interleaved=interleaved,
                   num_heads=num_heads, rotary_embedding_dim=rotary_embedding_dim, sign=-1),)


@op("RotaryEmbeddingCacheGrad", domain="onnxgrad")
def RotaryEmbeddingCacheGrad(xp, dY, X, cos_cache, sin_cache, position_ids=None, *,
                             interleaved=0, num_heads=0, rotary_embedding_dim=0):
    """The gradients for cos_cache and sin_cache, in their shapes and types."""
    layout = dict(num_heads=num_heads, interleaved=interleaved,
                  rotary_embedding_dim=rotary_embedding_dim)
    x, first, second, _ = _pairs(X, **layout)
    dy = _pairs(dY, **layout)[0]
    x1, x2, dy1, dy2 = x[..., first], x[..., second], dy[..., first], dy[..., second]
    dcos = (dy1 * x1 + dy2 * x2).sum(axis=2)                      # (B, S, rd/2)
    dsin = (dy2 * x1 - dy1 * x2).sum(axis=2)
    grads = []
    for d, cache in ((dcos, cos_cache), (dsin, sin_cache)):
        if position_ids is not None:  # the cache rows were gathered: add into them
            (d,) = GatherGrad.kernel(xp, d, position_ids, cache.shape, axis=0)
        else:  # undo the broadcast of a cache with a dimension of 1 (one row for all batches)
            d = d.sum(axis=tuple(i for i, n in enumerate(cache.shape) if n != d.shape[i]),
                      keepdims=True)
        grads.append(d.astype(cache.dtype, copy=False))
    return tuple(grads)
