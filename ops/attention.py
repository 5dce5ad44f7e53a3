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

Its standard form (``onnxgrad convert``, second derivatives) writes the same
recomputation and backward pass in standard ops (MatMul, the guarded softmax
and its gradient, Where for the masks, Expand and ReduceSum for shared heads);
it needs the head counts statically (3-D inputs give them as attributes) and,
without a ``scale``, the head size.
"""

from __future__ import annotations

import math

import numpy as np  # host constants for attributes

from onnxgrad.ops import standard as std
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


def _std_heads(g, X, n):
    """(B, S, n·d) -> (B, n, S, d) in standard ops."""
    return g.Transpose(g.Reshape(X, g.ints([0, 0, n, -1])), perm=[0, 2, 1, 3])


def _std_unheads(g, X):
    """(B, n, S, d) -> (B, S, n·d) in standard ops."""
    return g.Reshape(g.Transpose(X, perm=[0, 2, 1, 3]), g.ints([0, 0, -1]))


def _std_dim(g, value, axis):
    """Dimension ``axis`` of ``value`` as a 1-element int64 value."""
    if axis == -1:
        return g.Shape(value, start=-1, dtype="int64")
    return g.Shape(value, start=axis, end=axis + 1, dtype="int64")


@AttentionGrad.in_standard_ops
def _(g, node):
    # The kernel's recomputation and backward pass, step by step: heads, cache, shared
    # heads (Expand), the additive bias and boolean frontiers, the guarded softmax
    # (rows that attend nothing give zeros), then the MatMul and softmax-gradient products.
    ins = list(node.inputs) + [""] * (11 - len(node.inputs))
    dY, dPK, dPV, dQK, Q, K, V, mask, pk, pv, nonpad = ins
    a = node.attrs
    if bool(pk) != bool(pv):
        return None
    rank = g.rank(Q)
    dtype = g.dtype(Q)
    three_d = rank == 3
    if rank not in (3, 4):
        return None
    if three_d:
        hq, hk = a.get("q_num_heads"), a.get("kv_num_heads")
        if hq is None or hk is None:
            return None
        hq, hk = int(hq), int(hk)
        Q4, K4, V4 = _std_heads(g, Q, hq), _std_heads(g, K, hk), _std_heads(g, V, hk)
        width = (g.shape(Q) or (None,) * 3)[2]
        head = width // hq if isinstance(width, int) else None
    else:
        Q4, K4, V4 = Q, K, V
        qs, ks = g.shape(Q) or (None,) * 4, g.shape(pk or K) or (None,) * 4
        hq, hk, head = qs[1], ks[1], qs[3]
    if not (isinstance(hq, int) and isinstance(hk, int)) or hq % hk:
        return None
    scale = a.get("scale")
    if scale is None:
        if not isinstance(head, int):
            return None
        scale = 1.0 / math.sqrt(head)
    scale = float(scale)
    Kp = g.Concat(pk, K4, axis=2) if pk else K4
    Vp = g.Concat(pv, V4, axis=2) if pv else V4
    reps = hq // hk

    Kr, Vr = std.repeat_heads(g, Kp, hk, reps), std.repeat_heads(g, Vp, hk, reps)
    Lq = g.Shape(Q4, start=2, end=3, dtype="int64")
    Lk = g.Shape(Kp, start=2, end=3, dtype="int64")

    allowed, bias = None, None
    mask_float = False
    if mask:
        mdtype = g.dtype(mask)
        mask_float = mdtype.kind == "f"
        mshape = std.tensor_shape(g, mask)
        width = mshape[-1] if mshape else None
        kshape, pshape = g.shape(K), (g.shape(pk) if pk else (0,) * 4)
        keys = kshape[1 if three_d else 2] if kshape else None
        if isinstance(keys, int) and pshape and isinstance(pshape[2], int):
            keys += pshape[2]
        pad_static = keys - width if isinstance(keys, int) and isinstance(width, int) else None
        boolean = mdtype == np.dtype(bool)
        m = mask
        if not boolean and mdtype != dtype:  # an additive bias in the inputs' type
            m = g.Cast(m, to=std.tensor_type(dtype), dtype=dtype)
        if pad_static is None or pad_static > 0:  # keys past the mask's width: masked
            fill = np.array([False]) if boolean else np.array([-np.inf], dtype=dtype)
            pad = g.Sub(Lk, _std_dim(g, mask, -1), dtype="int64")
            lead = g.Shape(mask, end=-1, dtype="int64")
            block = g.ConstantOfShape(g.Concat(lead, pad, axis=0, dtype="int64"), value=fill,
                                      dtype=fill.dtype)
            m = g.Concat(m, block, axis=-1, dtype=fill.dtype)
        if boolean:
            allowed = m
        else:
            bias = m
    zero64, one64 = std.i64(g, 0), std.i64(g, 1)
    i = g.Unsqueeze(g.Range(zero64, g.Squeeze(Lq, g.ints([0])), one64, dtype="int64"),
                    g.ints([1]))
    j = g.Unsqueeze(g.Range(zero64, g.Squeeze(Lk, g.ints([0])), one64, dtype="int64"),
                    g.ints([0]))
    if nonpad:
        lengths = g.Reshape(g.Cast(nonpad, to=std.tensor_type(np.int64), dtype="int64"),
                            g.ints([-1, 1, 1, 1]))
        offset = g.Sub(lengths, Lq, dtype="int64")
    else:
        offset = g.Shape(pk, start=2, end=3, dtype="int64") if pk else g.ints([0])
    frontier = []
    io = g.Add(i, offset, dtype="int64")
    if a.get("is_causal", 0):
        frontier.append(g.LessOrEqual(j, io, dtype="bool"))
    left, right = a.get("left_window_size", -1), a.get("right_window_size", -1)
    if left is not None and left >= 0:
        frontier.append(g.LessOrEqual(g.Sub(io, j, dtype="int64"), std.i64(g, int(left)),
                                      dtype="bool"))
    if right is not None and right >= 0:
        frontier.append(g.LessOrEqual(g.Sub(j, io, dtype="int64"), std.i64(g, int(right)),
                                      dtype="bool"))
    if nonpad:
        frontier.append(g.Less(j, lengths, dtype="bool"))
    for f in frontier:
        allowed = f if allowed is None else g.And(allowed, f, dtype="bool")

    def const(value, of=dtype):
        return g.const(value, dtype=of)

    root = const(dtype.type(math.sqrt(scale)))
    Qs, Ks = g.Mul(Q4, root), g.Mul(Kr, root)
    S0 = g.MatMul(Qs, g.Transpose(Ks, perm=[0, 1, 3, 2]))
    softcap = float(a.get("softcap") or 0.0)
    if softcap > 0:
        cap = const(softcap)
        S1 = g.Mul(cap, g.Tanh(g.Div(S0, cap)))
    else:
        S1 = S0
    S = S1 if bias is None else g.Add(S1, bias)
    if allowed is not None:
        S = g.Where(allowed, S, const(-np.inf), dtype=dtype)
    precision = a.get("softmax_precision")
    work = S
    wtype = dtype
    if precision is not None:
        wtype = np.dtype(ONNX_TYPES[int(precision)])
        work = g.Cast(S, to=int(precision), dtype=wtype)
    last = g.ints([-1])
    top = g.ReduceMax(work, last, keepdims=1)
    dead = g.Equal(top, const(-np.inf, wtype), dtype="bool")
    e = g.Exp(g.Sub(work, g.Where(dead, const(0, wtype), top, dtype=wtype)))
    total = g.ReduceSum(e, last, keepdims=1)
    P = g.Div(e, g.Where(g.Equal(total, const(0, wtype), dtype="bool"), const(1, wtype),
                         total, dtype=wtype))
    if wtype != dtype:
        P = g.Cast(P, to=std.tensor_type(dtype), dtype=dtype)
    P = g.Where(dead, const(0), P, dtype=dtype)

    dY4 = _std_heads(g, dY, hq) if three_d else dY
    dP = g.MatMul(dY4, g.Transpose(Vr, perm=[0, 1, 3, 2]))
    dVr = g.MatMul(g.Transpose(P, perm=[0, 1, 3, 2]), dY4)
    mode = int(a.get("qk_matmul_output_mode", 0))
    if dQK and g.dtype(dQK) != dtype:
        dQK = g.Cast(dQK, to=std.tensor_type(dtype), dtype=dtype)
    if dQK and mode == 3:
        dP = g.Add(dP, dQK)
    dS = g.Mul(P, g.Sub(dP, g.ReduceSum(g.Mul(dP, P), last, keepdims=1)))
    if dQK and mode == 2:
        keep = allowed
        if bias is not None:
            finite = g.Not(g.Or(g.IsInf(bias, dtype="bool"), g.IsNaN(bias, dtype="bool"),
                                dtype="bool"), dtype="bool")
            keep = finite if keep is None else g.And(keep, finite, dtype="bool")
        add = dQK if keep is None else g.Where(keep, dQK, const(0), dtype=dtype)
        dS = g.Add(dS, add)
    dS1 = g.Add(dS, dQK) if dQK and mode in (0, 1) else dS
    dS0 = dS1
    if softcap > 0:
        t = g.Div(S1, const(softcap))
        dS0 = g.Mul(dS1, g.Sub(const(1), g.Mul(t, t)))
    dQ4 = g.Mul(g.MatMul(dS0, Ks), root)
    dKr = g.Mul(g.MatMul(g.Transpose(dS0, perm=[0, 1, 3, 2]), Qs), root)

    # shared heads sum the gradients of their query heads
    dKp, dVp = std.collect_heads(g, dKr, hk, reps), std.collect_heads(g, dVr, hk, reps)
    if dPK:
        dKp = g.Add(dKp, dPK)
    if dPV:
        dVp = g.Add(dVp, dPV)
    two = g.ints([2])
    if pk:
        past = g.Shape(pk, start=2, end=3, dtype="int64")
        dK4 = g.Slice(dKp, past, g.ints([std.END]), two)
        dV4 = g.Slice(dVp, past, g.ints([std.END]), two)
        dPastK = g.Slice(dKp, g.ints([0]), past, two)
        dPastV = g.Slice(dVp, g.ints([0]), past, two)
    else:
        dK4, dV4, dPastK, dPastV = dKp, dVp, None, None
    if three_d:
        dQ, dK, dV = _std_unheads(g, dQ4), _std_unheads(g, dK4), _std_unheads(g, dV4)
    else:
        dQ, dK, dV = dQ4, dK4, dV4
    dMask = None
    if mask_float:
        dB = g.Slice(dS, g.ints([0]), _std_dim(g, mask, -1), g.ints([-1]))
        dB = g.private("SumToShape", dB, g.Shape(mask, dtype="int64"), dtype=dtype)
        if g.dtype(mask) != dtype:
            dB = g.Cast(dB, to=std.tensor_type(g.dtype(mask)), dtype=g.dtype(mask))
        dMask = dB
    return (dQ, dK, dV, dMask, dPastK, dPastV)
