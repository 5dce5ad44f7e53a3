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

from onnxgrad.ops import standard as std
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


def _standard_layout(g, node, value, shape):
    """``value`` (X or dY, of static ``shape``) as (B, S, H, D) in standard ops, the
    number of rotated features and the head width (None where not static); None where
    the form cannot be written (the rank unknown, a dynamic head width without
    rotary_embedding_dim)."""
    a = node.attrs
    heads = int(a.get("num_heads", 0))
    if shape is None or len(shape) not in (3, 4) or (len(shape) == 3 and not heads):
        return None
    if len(shape) == 4:
        x = g.Transpose(value, perm=[0, 2, 1, 3])
        width = shape[3]
    else:
        x = g.Reshape(value, g.ints([0, 0, heads, -1]))
        width = shape[2] // heads if isinstance(shape[2], int) else None
    width = width if isinstance(width, int) else None
    rd = int(a.get("rotary_embedding_dim", 0)) or width
    if rd is None:
        return None
    return x, rd, width


def _halves(g, node, x, rd):
    """The two halves of each rotated pair of ``x`` (B, S, H, D) on its last axis."""
    def part(start, stop, step=1):
        return g.Slice(x, g.ints([start]), g.ints([stop]), g.ints([3]), g.ints([step]))
    if node.attrs.get("interleaved", 0):
        return part(0, rd, 2), part(1, rd, 2)
    return part(0, rd // 2), part(rd // 2, rd)


@RotaryEmbeddingGrad.in_standard_ops
def _(g, node):
    # dY rotated back in basic ops (any opset): as (B, S, H, D), each pair turned by the
    # opposite angle, (x1, x2) -> (cos·x1 + sin·x2, cos·x2 - sin·x1).
    dY, cos, sin, *rest = node.inputs
    position_ids = rest[0] if rest and rest[0] else None
    shape = g.shape(dY)
    layout = _standard_layout(g, node, dY, shape)
    if layout is None:
        return None
    x, rd, width = layout

    def angles(cache):  # (B, S, 1, rd/2) in dY's type
        if position_ids is not None:
            cache = g.Gather(cache, position_ids, axis=0)
        cache = g.Unsqueeze(cache, g.ints([2]))
        return cache if g.dtype(cache) == g.dtype(dY) else std.cast_like(g, cache, dY)

    c, s = angles(cos), angles(sin)
    x1, x2 = _halves(g, node, x, rd)
    y1 = g.Add(g.Mul(c, x1), g.Mul(s, x2))
    y2 = g.Sub(g.Mul(c, x2), g.Mul(s, x1))
    if node.attrs.get("interleaved", 0):
        pairs = g.Concat(g.Unsqueeze(y1, g.ints([4])), g.Unsqueeze(y2, g.ints([4])), axis=4)
        parts = [g.Reshape(pairs, g.ints([0, 0, 0, -1]))]
    else:
        parts = [y1, y2]
    if width is None or rd < width:  # the features that are not rotated
        parts.append(g.Slice(x, g.ints([rd]), g.ints([std.END]), g.ints([3])))
    out = g.Concat(*parts, axis=3) if len(parts) > 1 else parts[0]
    if len(shape) == 4:
        return (g.Transpose(out, perm=[0, 2, 1, 3]),)
    return (g.Reshape(out, g.Shape(dY, dtype="int64")),)


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


@RotaryEmbeddingCacheGrad.in_standard_ops
def _(g, node):
    # Per (batch, position): the sums over the heads, then added into the cache rows read
    # (GatherGrad) or summed over the axes a cache broadcast (SumToShape).
    dY, X, cos, sin, *rest = node.inputs
    position_ids = rest[0] if rest and rest[0] else None
    layouts = [_standard_layout(g, node, v, g.shape(X)) for v in (X, dY)]  # dY: X's shape
    if None in layouts:
        return None
    (x, rd, _), (dy, _, _) = layouts
    x1, x2 = _halves(g, node, x, rd)
    dy1, dy2 = _halves(g, node, dy, rd)
    heads = g.ints([2])
    dcos = g.ReduceSum(g.Add(g.Mul(dy1, x1), g.Mul(dy2, x2)), heads, keepdims=0)
    dsin = g.ReduceSum(g.Sub(g.Mul(dy2, x1), g.Mul(dy1, x2)), heads, keepdims=0)
    grads = []
    for d, cache in ((dcos, cos), (dsin, sin)):
        shape = g.Shape(cache, dtype="int64")
        if position_ids is not None:
            d = g.private("GatherGrad", d, position_ids, shape, axis=0)
        else:
            d = g.private("SumToShape", d, shape)
        grads.append(d if g.dtype(d) == g.dtype(cache) else std.cast_like(g, d, cache))
    return tuple(grads)
