"""LinearAttention and CausalConvWithState (opset 27): the recurrent building blocks of
linear-attention / state-space language models (Gated DeltaNet, Mamba).

LinearAttention runs, token by token, over packed ``(B, T, H·D)`` inputs::

    S_t = exp(g_t)·S_{t-1} + β_t · k_t ⊗ (v_t - exp(g_t)·S_{t-1}ᵀ k_t)   (gated_delta)
    o_t = scale · q_tᵀ S_t

with the ``linear`` (no decay, no correction), ``gated`` (decay only) and
``delta`` (correction only) rules as special cases; the state is
``(B, H_kv, d_k, d_v)``, and query head ``h`` reads the state of KV head
``h // (H_q / H_kv)``.  Float16/bfloat16 inputs accumulate in float32, as the
reference does; float32 and float64 in their own type.

CausalConvWithState is a depthwise causal 1-D convolution whose left padding
is the carried state (the last ``k - 1`` positions of the previous call),
with an optional fused SiLU.  Its gradient is one private op; LinearAttention
is forward only (its inputs are declared differentiable without a rule, so a
gradient through it raises UnsupportedOpError).
"""

from __future__ import annotations

import math

from onnxgrad.ops.registry import op


def _heads(x, n: int, what: str):
    """(B, T, H·D) -> (B, H, T, D)."""
    b, t, hd = x.shape
    if hd % n:
        raise ValueError(f"LinearAttention: {what} has {hd} features, not a multiple of {n} heads")
    return x.reshape(b, t, n, hd // n).transpose(0, 2, 1, 3)


def _work_dtype(dtype):
    return dtype if dtype.name in ("float32", "float64") else "float32"


@op("LinearAttention", since=27,
    differentiable=("query", "key", "value", "past_state", "decay", "beta"))
def LinearAttention(xp, query, key, value, past_state=None, decay=None, beta=None, *,
                    chunk_size=64, kv_num_heads, q_num_heads, scale=0.0,
                    update_rule="gated_delta"):
    if update_rule not in ("linear", "gated", "delta", "gated_delta"):
        raise ValueError(f"LinearAttention: unknown update_rule {update_rule!r}")
    hq, hkv = int(q_num_heads), int(kv_num_heads)
    if hq <= 0 or hkv <= 0 or hq % hkv:
        raise ValueError(f"LinearAttention: q_num_heads {hq} must be a positive multiple of "
                         f"kv_num_heads {hkv}")
    gating = update_rule in ("gated", "gated_delta")
    delta = update_rule in ("delta", "gated_delta")
    if gating != (decay is not None) or delta != (beta is not None):
        raise ValueError(f"LinearAttention: update_rule {update_rule!r} "
                         f"{'needs' if gating else 'forbids'} decay and "
                         f"{'needs' if delta else 'forbids'} beta")
    work = _work_dtype(query.dtype)
    b, t, _ = query.shape
    q = _heads(query, hq, "query").astype(work)
    k = _heads(key, hkv, "key").astype(work)
    v = _heads(value, hkv, "value").astype(work)
    d_k, d_v, group = q.shape[-1], v.shape[-1], hq // hkv
    if decay is not None:
        if decay.shape[-1] == hkv:            # one decay per head: (B, H_kv, T, 1)
            g = decay.reshape(b, t, hkv, 1).transpose(0, 2, 1, 3)
        elif decay.shape[-1] == hkv * d_k:    # one per key feature: (B, H_kv, T, d_k)
            g = _heads(decay, hkv, "decay")
        else:
            raise ValueError(f"LinearAttention: decay has {decay.shape[-1]} features, expected "
                             f"{hkv} or {hkv * d_k}")
        gate = xp.exp(g.astype(work))[..., None]                  # (B, H_kv, T, ·, 1)
    if beta is not None:
        if beta.shape[-1] not in (hkv, 1):
            raise ValueError(f"LinearAttention: beta has {beta.shape[-1]} features, expected "
                             f"{hkv} or 1")
        rate = beta.reshape(b, t, beta.shape[-1], 1).transpose(0, 2, 1, 3).astype(work)
    if past_state is not None:
        if tuple(past_state.shape) != (b, hkv, d_k, d_v):
            raise ValueError(f"LinearAttention: past_state has shape {tuple(past_state.shape)}, "
                             f"expected {(b, hkv, d_k, d_v)}")
        state = past_state.astype(work)   # a copy (or a fresh array): updated below
        state_dtype = past_state.dtype
    else:
        state = xp.zeros((b, hkv, d_k, d_v), dtype=work)
        state_dtype = query.dtype
    s = float(scale) if scale else 1.0 / math.sqrt(d_k)
    out = xp.empty((b, hkv, group, t, d_v), dtype=work)
    qg = q.reshape(b, hkv, group, t, d_k)
    for i in range(t):
        k_t, v_t = k[:, :, i], v[:, :, i]                         # (B, H_kv, d)
        if gating:
            state = state * gate[:, :, i]
        if delta:
            retrieved = xp.einsum("bhdm,bhd->bhm", state, k_t)
            v_t = rate[:, :, i] * (v_t - retrieved)
        state = state + k_t[..., :, None] * v_t[..., None, :]
        out[:, :, :, i] = xp.einsum("bhgd,bhdm->bhgm", qg[:, :, :, i], state) * s
    output = out.reshape(b, hq, t, d_v).transpose(0, 2, 1, 3).reshape(b, t, hq * d_v)
    return (xp.ascontiguousarray(output.astype(query.dtype)), state.astype(state_dtype))


# -- CausalConvWithState ----------------------------------------------------------------------

_ACTIVATIONS = ("none", "silu", "swish")


def _sigmoid(xp, z):
    e = xp.exp(-xp.abs(z))
    return xp.where(z >= 0, 1 / (1 + e), e / (1 + e))


def _padded(xp, input, weight, past_state):
    if input.ndim != 3 or weight.ndim != 3 or weight.shape[1] != 1 \
            or weight.shape[0] != input.shape[1]:
        raise ValueError(f"CausalConvWithState: input {tuple(input.shape)} must be (B, C, L) and "
                         f"weight {tuple(weight.shape)} (C, 1, k)")
    b, c, _ = input.shape
    k = weight.shape[2]
    if past_state is None:
        past_state = xp.zeros((b, c, k - 1), dtype=input.dtype)
    elif tuple(past_state.shape) != (b, c, k - 1):
        raise ValueError(f"CausalConvWithState: past_state has shape {tuple(past_state.shape)}, "
                         f"expected {(b, c, k - 1)}")
    return xp.concatenate([past_state.astype(input.dtype, copy=False), input], axis=2)


def _conv(xp, padded, weight, bias, length):
    k = weight.shape[2]
    z = None
    for j in range(k):
        term = padded[:, :, j:j + length] * weight[:, 0, j][None, :, None]
        z = term if z is None else z + term
    if bias is not None:
        z = z + bias[None, :, None]
    return z


@op("CausalConvWithState", since=27, differentiable=("input", "weight", "bias", "past_state"))
def CausalConvWithState(xp, input, weight, bias=None, past_state=None, *, activation="none"):
    if activation not in _ACTIVATIONS:
        raise ValueError(f"CausalConvWithState: unknown activation {activation!r}")
    padded = _padded(xp, input, weight, past_state)
    length, k = input.shape[2], weight.shape[2]
    work = _work_dtype(input.dtype)  # float16 accumulates in float32, rounded once after
    z = _conv(xp, padded.astype(work, copy=False), weight.astype(work, copy=False),
              None if bias is None else bias.astype(work, copy=False), length)
    if activation != "none":
        z = z.astype(input.dtype).astype(work)  # the reference rounds before the SiLU
        z = z * _sigmoid(xp, z)
    state = padded[:, :, padded.shape[2] - (k - 1):]
    return (xp.ascontiguousarray(z.astype(input.dtype)), xp.ascontiguousarray(state))


@CausalConvWithState.gradient
def _(g, node, dY, dState=None):
    ins = list(node.inputs) + [""] * (4 - len(node.inputs))
    x, w, bias, past = (n or None for n in ins)
    grads = g.private("CausalConvWithStateGrad", dY, dState, x, w, bias, past,
                      activation=node.attrs["activation"], num_outputs=4)
    return tuple(grads[:len(node.inputs)])


@op("CausalConvWithStateGrad", domain="onnxgrad")
def CausalConvWithStateGrad(xp, dY=None, dState=None, input=None, weight=None, bias=None,
                            past_state=None, *, activation="none"):
    """Gradients for (input, weight, bias, past_state) from those of (output, present_state)."""
    padded = _padded(xp, input, weight, past_state)
    length, k = input.shape[2], weight.shape[2]
    dP = xp.zeros(padded.shape, dtype=input.dtype)
    if dY is not None:
        dz = dY
        if activation != "none":
            z = _conv(xp, padded, weight, bias, length)
            sig = _sigmoid(xp, z)
            dz = dY * (sig * (1 + z * (1 - sig)))
        dW = xp.empty(weight.shape, dtype=weight.dtype)
        for j in range(k):
            dP[:, :, j:j + length] += dz * weight[:, 0, j][None, :, None]
            dW[:, 0, j] = (dz * padded[:, :, j:j + length]).sum(axis=(0, 2))
        dB = dz.sum(axis=(0, 2))
    else:
        dW, dB = xp.zeros_like(weight), xp.zeros(input.shape[1], dtype=input.dtype)
    if dState is not None and k > 1:
        dP[:, :, padded.shape[2] - (k - 1):] += dState
    return (xp.ascontiguousarray(dP[:, :, k - 1:]), dW, dB,
            xp.ascontiguousarray(dP[:, :, :k - 1]))
