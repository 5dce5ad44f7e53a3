"""FlexAttention (ai.onnx.preview, opset 1): scaled dot-product attention with optional
``score_mod`` and ``prob_mod`` subgraphs, as PyTorch's flex_attention::

    S = (Q·√scale) @ (K·√scale)ᵀ;  S = score_mod(S);  P = softmax(S);  P = prob_mod(P);
    Y = P @ V

Query head ``h`` reads K/V head ``h // (H_q / H_kv)``.  The scores are computed
in ``softmax_precision`` (default float32, float64 for float64 inputs); the
subgraphs run through :mod:`onnxgrad.ops.control`'s bodies, with the
outer-scope values they read passed after Q, K and V.  Forward only: Q, K and
V are declared differentiable without a rule.
"""

from __future__ import annotations

import math

from onnxgrad.ops.control import body_of, scope
from onnxgrad.ops.registry import op
from onnxgrad.ops.shape import element_dtype


def _modify(xp, ctx, attr, graph, outer, x):
    if graph is None:
        return x
    if len(graph.input) != 1 or len(graph.output) != 1:
        raise ValueError(f"FlexAttention: {attr} must take and give one tensor")
    (y,) = body_of(xp, ctx, attr, graph, list(outer)).run([x], outer)
    if tuple(y.shape) != tuple(x.shape):
        raise ValueError(f"FlexAttention: {attr} changed the shape {tuple(x.shape)} to "
                         f"{tuple(y.shape)}")
    return y.astype(x.dtype, copy=False)


@op("FlexAttention", since=1, domain="ai.onnx.preview", differentiable=("Q", "K", "V"))
def FlexAttention(xp, Q, K, V, *captured, ctx, prob_mod=None, scale=None, score_mod=None,
                  softmax_precision=None):
    outer = scope(ctx, (Q, K, V) + captured)
    if Q.ndim != 4 or K.ndim != 4 or V.ndim != 4:
        raise ValueError(f"FlexAttention: Q {tuple(Q.shape)}, K {tuple(K.shape)} and V "
                         f"{tuple(V.shape)} must be rank 4")
    hq, hkv = Q.shape[1], K.shape[1]
    if V.shape[1] != hkv or V.shape[2] != K.shape[2] or K.shape[3] != Q.shape[3]:
        raise ValueError(f"FlexAttention: Q {tuple(Q.shape)}, K {tuple(K.shape)} and V "
                         f"{tuple(V.shape)} do not fit together")
    if hq != hkv:
        if hq % hkv:
            raise ValueError(f"FlexAttention: {hq} query heads are not a multiple of {hkv}")
        K, V = xp.repeat(K, hq // hkv, axis=1), xp.repeat(V, hq // hkv, axis=1)
    if softmax_precision is not None:
        work = element_dtype(softmax_precision)
    else:
        work = Q.dtype if Q.dtype.name == "float64" else xp.dtype("float32")
    s = 1.0 / math.sqrt(Q.shape[3]) if scale is None else float(scale)
    root = xp.asarray(math.sqrt(s), dtype="float32").astype(Q.dtype)  # as the reference rounds
    S = xp.matmul(Q * root, xp.swapaxes(K * root, -1, -2)).astype(work)
    S = _modify(xp, ctx, "score_mod", score_mod, outer, S)
    S = S - S.max(axis=-1, keepdims=True)
    P = xp.exp(S)
    P = P / P.sum(axis=-1, keepdims=True)
    P = _modify(xp, ctx, "prob_mod", prob_mod, outer, P)
    return (xp.ascontiguousarray(xp.matmul(P, V.astype(work)).astype(V.dtype)),)
