"""RotaryEmbedding (opset 23): rotary position embeddings on (B, H, S, D) or (B, S, H·D).

Each pair of rotated features ``(x1, x2)`` (the two halves of the first
``rotary_embedding_dim`` features, or even/odd features when ``interleaved``)
turns by the angle whose cosine and sine the caches hold for its position::

    (x1, x2) -> (cos·x1 - sin·x2, sin·x1 + cos·x2)

A rotation's adjoint is the rotation by the opposite angle, so the gradient
for ``X`` is the same kernel with ``-sin``.  The caches are declared
differentiable without a rule: a gradient through them raises
UnsupportedOpError.
"""

from __future__ import annotations

from onnxgrad.ops.registry import op


def rotate(xp, X, cos_cache, sin_cache, position_ids, *, interleaved, num_heads,
           rotary_embedding_dim, sign=1):
    """RotaryEmbedding's output; ``sign=-1`` rotates the other way (the adjoint)."""
    if X.ndim == 4:
        x = X.transpose(0, 2, 1, 3)                               # (B, S, H, D)
    elif X.ndim == 3:
        if not num_heads:
            raise ValueError("RotaryEmbedding: a 3-D input needs the num_heads attribute")
        B, S, hidden = X.shape
        x = X.reshape(B, S, int(num_heads), hidden // int(num_heads))
    else:
        raise ValueError(f"RotaryEmbedding: input must be 3-D or 4-D, got shape {tuple(X.shape)}")
    D = x.shape[3]
    rd = int(rotary_embedding_dim) or D
    half = rd // 2
    if position_ids is not None:
        cos_cache, sin_cache = cos_cache[position_ids], sin_cache[position_ids]
    if cos_cache.shape[-1] != half or sin_cache.shape[-1] != half:
        raise ValueError(f"RotaryEmbedding: caches have {cos_cache.shape[-1]} and "
                         f"{sin_cache.shape[-1]} columns, expected rotary_embedding_dim/2 = {half}")
    cos = cos_cache[:, :, None, :].astype(X.dtype, copy=False)    # (B, S, 1, rd/2)
    sin = sin_cache[:, :, None, :].astype(X.dtype, copy=False)
    if sign < 0:
        sin = -sin
    if interleaved:
        first, second = slice(0, rd, 2), slice(1, rd, 2)
    else:
        first, second = slice(0, half), slice(half, rd)
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
    return (dX, None, None) + (None,) * len(rest)  # the caches: no rule (UnsupportedOpError)


@op("RotaryEmbeddingGrad", domain="onnxgrad")
def RotaryEmbeddingGrad(xp, dY, cos_cache, sin_cache, position_ids=None, *, interleaved=0,
                        num_heads=0, rotary_embedding_dim=0):
    """The gradient for X: ``dY`` rotated back (the sines negated)."""
    return (rotate(xp, dY, cos_cache, sin_cache, position_ids, interleaved=interleaved,
                   num_heads=num_heads, rotary_embedding_dim=rotary_embedding_dim, sign=-1),)
