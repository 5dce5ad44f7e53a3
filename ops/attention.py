"""Attention (opset 23, with 24's ``nonpad_kv_seqlen`` and 25's sliding windows).

``Y = softmax(softcap(scale · Q Kᵀ) + bias) V`` per head, where ``bias`` joins
``attn_mask`` (boolean: True attends; or additive floats), the causal mask
(aligned to the end of a past cache) and padding; 3-D inputs (batch, seq,
heads·head_size) are split into ``q_num_heads``/``kv_num_heads`` heads, and
fewer key/value heads than query heads are shared (grouped-query attention).
A query row that attends nothing gives zeros, as the spec says.

The gradient is the private ``onnxgrad::AttentionGrad``: it recomputes the
probabilities and returns the gradients of Q, K, V, a floating-point mask
(an additive bias, e.g. a learned relative-position bias) and the past
key/value cache in one pass, with a gradient flowing back from the
``qk_matmul_output`` output too, for each ``qk_matmul_output_mode``: modes 0 and 1
(the scaled, soft-capped product, as the ONNX reference gives for both) join
before the softcap's derivative; mode 2 (with the mask's bias) joins the
softmax's input, for the products and a floating-point mask, except where that
input is -inf (masked: constant there); mode 3 (the probabilities) joins the
softmax's output.
"""

from __future__ import annotations

import math

from onnxgrad.ops.registry import op
from onnxgrad.ops.shape import ONNX_TYPES
from onnxgrad.threads import matmul


def _heads(xp, X, n):
    """(B, S, n·d) -> (B, n, S, d)."""
    B, S, H = X.shape
    return xp.transpose(X.reshape(B, S, n, H // n), (0, 2, 1, 3))


def _unheads(xp, X):
    """(B, n, S, d) -> (B, S, n·d)."""
    B, n, S, d = X.shape
    return xp.transpose(X, (0, 2, 1, 3)).reshape(B, S, n * d)


def _forward(xp, Q, K, V, attn_mask, past_key, past_value, nonpad_kv_seqlen, a):
    """Everything the forward pass and the gradient need, as a dict."""
    if (past_key is None) != (past_value is None):
        raise ValueError("Attention: past_key and past_value go together")
    three_d = Q.ndim == 3
    if three_d:
        if a["q_num_heads"] is None or a["kv_num_heads"] is None:
            raise ValueError("Attention: 3-D inputs need q_num_heads and kv_num_heads")
        Q4 = _heads(xp, Q, int(a["q_num_heads"]))
        K4 = _heads(xp, K, int(a["kv_num_heads"]))
        V4 = _heads(xp, V, int(a["kv_num_heads"]))
    else:
        Q4, K4, V4 = Q, K, V
    dtype = Q.dtype
    scale = a["scale"]
    scale = 1.0 / math.sqrt(Q4.shape[3]) if scale is None else float(scale)
    past = 0 if past_key is None else past_key.shape[2]
    Kp = K4 if past_key is None else xp.concatenate([past_key, K4], axis=2)
    Vp = V4 if past_value is None else xp.concatenate([past_value, V4], axis=2)
    Hq, Lq = Q4.shape[1], Q4.shape[2]
    Hk, Lk = Kp.shape[1], Kp.shape[2]
    if Hq % Hk or Vp.shape[1] != Hk:
        raise ValueError(f"Attention: {Hq} query heads cannot share {Hk} key/value heads")
    reps = Hq // Hk
    Kr = xp.repeat(Kp, reps, axis=1) if reps > 1 else Kp
    Vr = xp.repeat(Vp, reps, axis=1) if reps > 1 else Vp

    # The additive bias: mask, causal frontier, sliding window, padding.
    allowed = None                    # boolean, broadcastable to (B, H, Lq, Lk)
    bias = None                       # float additive, same
    mask_width = None
    if attn_mask is not None:
        mask_width = attn_mask.shape[-1]
        pad = Lk - mask_width
        if pad < 0:
            raise ValueError(f"Attention: mask of width {mask_width} for {Lk} keys")
        if attn_mask.dtype == bool:
            m = attn_mask
            if pad:
                m = xp.concatenate([m, xp.zeros(m.shape[:-1] + (pad,), dtype=bool)], axis=-1)
            allowed = m
        else:
            m = attn_mask.astype(dtype, copy=False)
            if pad:
                m = xp.concatenate([m, xp.full(m.shape[:-1] + (pad,), -xp.inf, dtype=dtype)], axis=-1)
            bias = m
    i = xp.arange(Lq).reshape(Lq, 1)
    j = xp.arange(Lk).reshape(1, Lk)
    if nonpad_kv_seqlen is not None:
        offset = (nonpad_kv_seqlen.astype("int64").reshape(-1) - Lq).reshape(-1, 1, 1, 1)
    else:
        offset = past
    frontier = []
    if a["is_causal"]:
        frontier.append(j <= i + offset)
    left, right = a.get("left_window_size", -1), a.get("right_window_size", -1)
    if left is not None and left >= 0:
        frontier.append(i + offset - j <= left)
    if right is not None and right >= 0:
        frontier.append(j - (i + offset) <= right)
    if nonpad_kv_seqlen is not None:
        frontier.append(j < nonpad_kv_seqlen.astype("int64").reshape(-1, 1, 1, 1))
    for f in frontier:
        allowed = f if allowed is None else allowed & f

    root = dtype.type(math.sqrt(scale))  # on both operands, in the inputs' type, as the reference
    S0 = matmul(xp, Q4 * root, xp.swapaxes(Kr * root, -1, -2)).astype(dtype, copy=False)
    softcap = float(a["softcap"] or 0.0)
    S1 = softcap * xp.tanh(S0 / softcap) if softcap > 0 else S0
    S = S1 if bias is None else S1 + bias
    if allowed is not None:
        S = xp.where(allowed, S, S.dtype.type(-xp.inf))  # typed: bfloat16 stays bfloat16
    precision = a["softmax_precision"]
    work = S if precision is None else S.astype(ONNX_TYPES[int(precision)])
    top = work.max(axis=-1, keepdims=True)
    dead = top == -xp.inf                            # rows that attend nothing
    zero, one = work.dtype.type(0), work.dtype.type(1)  # typed: bfloat16 stays bfloat16
    e = xp.exp(work - xp.where(dead, zero, top))
    total = e.sum(axis=-1, keepdims=True)
    P = (e / xp.where(total == 0, one, total)).astype(dtype, copy=False)
    P = xp.where(dead, dtype.type(0), P)
    Y4 = matmul(xp, P, Vr).astype(dtype, copy=False)
    # As the ONNX reference: modes 0 and 1 give the (soft-capped) product, 2 adds the
    # bias, 3 gives the probabilities.
    qk = {0: S1, 1: S1, 2: S, 3: P}[int(a["qk_matmul_output_mode"])]
    return {"Y": _unheads(xp, Y4) if three_d else Y4, "present_key": Kp, "present_value": Vp,
            "qk": qk.astype(dtype, copy=False), "Q4": Q4, "Kr": Kr, "Vr": Vr, "P": P, "S1": S1,
            "scale": scale, "softcap": softcap, "reps": reps, "past": past, "three_d": three_d,
            "mask_width": mask_width, "bias": bias, "allowed": allowed}


def _outputs(r, ctx):
    return (r["Y"], r["present_key"], r["present_value"], r["qk"])[:max(ctx.num_outputs, 1)]


def _attrs(**kw):
    return kw


@op("Attention", since=23, differentiable=("Q", "K", "V", "attn_mask", "past_key", "past_value"))
def Attention23(xp, Q, K, V, attn_mask=None, past_key=None, past_value=None, *, is_causal=0,
                kv_num_heads=None, q_num_heads=None, qk_matmul_output_mode=0, scale=None,
                softcap=0.0, softmax_precision=None, ctx):
    a = _attrs(is_causal=is_causal, kv_num_heads=kv_num_heads, q_num_heads=q_num_heads,
               qk_matmul_output_mode=qk_matmul_output_mode, scale=scale, softcap=softcap,
               softmax_precision=softmax_precision)
    return _outputs(_forward(xp, Q, K, V, attn_mask, past_key, past_value, None, a), ctx)


@op("Attention", since=24, differentiable=("Q", "K", "V", "attn_mask", "past_key", "past_value"))
def Attention24(xp, Q, K, V, attn_mask=None, past_key=None, past_value=None, nonpad_kv_seqlen=None,
                *, is_causal=0, kv_num_heads=None, q_num_heads=None, qk_matmul_output_mode=0,
                scale=None, softcap=0.0, softmax_precision=None, ctx):
    a = _attrs(is_causal=is_causal, kv_num_heads=kv_num_heads, q_num_heads=q_num_heads,
               qk_matmul_output_mode=qk_matmul_output_mode, scale=scale, softcap=softcap,
               softmax_precision=softmax_precision)
    return _outputs(_forward(xp, Q, K, V, attn_mask, past_key, past_value, nonpad_kv_seqlen, a), ctx)


@op("Attention", since=25, differentiable=("Q", "K", "V", "attn_mask", "past_key", "past_value"))
def Attention25(xp, Q, K, V, attn_mask=None, past_key=None, past_value=None, nonpad_kv_seqlen=None,
                *, is_causal=0, kv_num_heads=None, q_num_heads=None, qk_matmul_output_mode=0,
                scale=None, softcap=0.0, softmax_precision=None, left_window_size=-1,
                right_window_size=-1, ctx):
    if Q.ndim == 4 and (q_num_heads is not None or kv_num_heads is not None):
        raise ValueError("Attention: q_num_heads and kv_num_heads are for 3-D inputs only")
    a = _attrs(is_causal=is_causal, kv_num_heads=kv_num_heads, q_num_heads=q_num_heads,
               qk_matmul_output_mode=qk_matmul_output_mode, scale=scale, softcap=softcap,
               softmax_precision=softmax_precision, left_window_size=left_window_size,
               right_window_size=right_window_size)
    return _outputs(_forward(xp, Q, K, V, attn_mask, past_key, past_value, nonpad_kv_seqlen, a), ctx)


def _rule(g, node, dY=None, dPresentKey=None, dPresentValue=None, dQK=None, *_):
    ins = list(node.inputs) + [""] * (7 - len(node.inputs))
    attrs = {k: v for k, v in node.attrs.items() if v is not None}
    zero = None
    if dY is None:  # only the cache outputs or qk_matmul_output carry a gradient
        from onnxgrad.ops.tensor import zeros_like_value  # noqa: PLC0415
        zero = zeros_like_value(g, node.outputs[0])
    grads = g.private("AttentionGrad", dY if dY is not None else zero, dPresentKey, dPresentValue,
                      dQK, *ins[:7], num_outputs=6, dtype=g.dtype(node.inputs[0]), **attrs)
    mask = ins[3]
    if mask and g.dtype(mask).kind != "f":
        grads[3] = None  # a boolean mask selects; it has no gradient
    return tuple(grads[:len(node.inputs)]) + (None,) * max(0, len(node.inputs) - 6)


for _definition in (Attention23, Attention24, Attention25):
    _definition.gradient(_rule)


@op("AttentionGrad", domain="onnxgrad")
def AttentionGrad(xp, dY, dPresentKey, dPresentValue, dQK, Q, K, V, attn_mask=None,
                  past_key=None, past_value=None, nonpad_kv_seqlen=None, *, is_causal=0,
                  kv_num_heads=None, q_num_heads=None, qk_matmul_output_mode=0, scale=None,
                  softcap=0.0, softmax_precision=None, left_window_size=-1,
                  right_window_size=-1):
    """Gradients of Attention for (Q, K, V, attn_mask, past_key, past_value), from those
    of its outputs (Y, present_key, present_value, qk_matmul_output; all but Y may be
    absent)."""
    a = _attrs(is_causal=is_causal, kv_num_heads=kv_num_heads, q_num_heads=q_num_heads,
               qk_matmul_output_mode=0, scale=scale, softcap=softcap,
               softmax_precision=softmax_precision, left_window_size=left_window_size,
               right_window_size=right_window_size)
    r = _forward(xp, Q, K, V, attn_mask, past_key, past_value, nonpad_kv_seqlen, a)
    P, Q4, Kr, Vr = r["P"], r["Q4"], r["Kr"], r["Vr"]
    dY4 = _heads(xp, dY, P.shape[1]) if r["three_d"] else dY
    dP = matmul(xp, dY4, xp.swapaxes(Vr, -1, -2))
    dVr = matmul(xp, xp.swapaxes(P, -1, -2), dY4)
    mode = int(qk_matmul_output_mode)
    if dQK is not None:
        dQK = dQK.astype(dP.dtype, copy=False)
    if dQK is not None and mode == 3:  # the probabilities
        dP = dP + dQK
    dS = P * (dP - (dP * P).sum(axis=-1, keepdims=True))  # of the softmax's input S
    if dQK is not None and mode == 2:  # S itself, constant where it is -inf (masked)
        dS = dS + xp.where(_finite_logits(xp, r, dS.shape), dQK, dS.dtype.type(0))
    dS1 = dS  # of the soft-capped product; S = S1 + bias where allowed
    if dQK is not None and mode in (0, 1):
        dS1 = dS + dQK
    dS0 = dS1
    if r["softcap"] > 0:
        t = r["S1"] / r["softcap"]
        dS0 = dS1 * (1 - t * t)
    root = Q.dtype.type(math.sqrt(r["scale"]))
    dQ4 = matmul(xp, dS0, Kr * root) * root
    dKr = matmul(xp, xp.swapaxes(dS0, -1, -2), Q4 * root) * root
    reps = r["reps"]
    if reps > 1:  # shared key/value heads collect the gradients of their query heads
        B, H, L, D = dKr.shape
        dKp = dKr.reshape(B, H // reps, reps, L, D).sum(axis=2)
        dVp = dVr.reshape(B, H // reps, reps, L, dVr.shape[-1]).sum(axis=2)
    else:
        dKp, dVp = dKr, dVr
    if dPresentKey is not None:
        dKp = dKp + dPresentKey
    if dPresentValue is not None:
        dVp = dVp + dPresentValue
    past = r["past"]
    dK4, dV4 = dKp[:, :, past:], dVp[:, :, past:]
    dPastK = dKp[:, :, :past] if past_key is not None else None
    dPastV = dVp[:, :, :past] if past_value is not None else None
    if r["three_d"]:
        dQ, dK, dV = _unheads(xp, dQ4), _unheads(xp, dK4), _unheads(xp, dV4)
    else:
        dQ, dK, dV = dQ4, dK4, dV4
    dMask = None
    if attn_mask is not None and attn_mask.dtype.kind == "f":
        dB = dS[..., :r["mask_width"]]
        lead = dB.ndim - attn_mask.ndim
        if lead:
            dB = dB.sum(axis=tuple(range(lead)))
        ones = tuple(k for k, n in enumerate(attn_mask.shape) if n == 1 and dB.shape[k] != 1)
        if ones:
            dB = dB.sum(axis=ones, keepdims=True)
        dMask = dB.astype(attn_mask.dtype, copy=False)
    return tuple(xp.ascontiguousarray(x) if x is not None else None
                 for x in (dQ, dK, dV, dMask, dPastK, dPastV))


def _finite_logits(xp, r, shape):
    """Where the softmax's input is finite: allowed by the masks, with a finite bias."""
    keep = xp.ones(shape, dtype=bool)
    if r["allowed"] is not None:
        keep = keep & r["allowed"]
    if r["bias"] is not None:
        keep = keep & xp.isfinite(r["bias"])
    return keep
