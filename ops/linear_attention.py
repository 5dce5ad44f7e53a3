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
with an optional fused SiLU.

Each op's gradient is one private op: ``onnxgrad::LinearAttentionGrad``
recomputes the states step by step and walks them backwards (backpropagation
through time) to the gradients of every float input; ``CausalConvWithStateGrad``
those of the convolution.
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


class _Recurrence:
    """A LinearAttention node's inputs in the work precision, split into heads.

    ``q`` is ``(B, H_kv, group, T, d_k)``; ``k`` and ``v`` ``(B, H_kv, T, d)``; ``gate`` is
    ``exp(decay)`` as ``(B, H_kv, T, d_k or 1, 1)`` and ``rate`` is beta as
    ``(B, H_kv or 1, T, 1)``, or None under rules without them; ``state`` is the
    initial state ``(B, H_kv, d_k, d_v)``.
    """

    def __init__(self, xp, query, key, value, past_state, decay, beta, kv_num_heads,
                 q_num_heads, scale, update_rule):
        if update_rule not in ("linear", "gated", "delta", "gated_delta"):
            raise ValueError(f"LinearAttention: unknown update_rule {update_rule!r}")
        hq, hkv = int(q_num_heads), int(kv_num_heads)
        if hq <= 0 or hkv <= 0 or hq % hkv:
            raise ValueError(f"LinearAttention: q_num_heads {hq} must be a positive multiple "
                             f"of kv_num_heads {hkv}")
        gating = update_rule in ("gated", "gated_delta")
        delta = update_rule in ("delta", "gated_delta")
        if gating != (decay is not None) or delta != (beta is not None):
            raise ValueError(f"LinearAttention: update_rule {update_rule!r} "
                             f"{'needs' if gating else 'forbids'} decay and "
                             f"{'needs' if delta else 'forbids'} beta")
        self.xp, self.work = xp, _work_dtype(query.dtype)
        b, t, _ = query.shape
        k = _heads(key, hkv, "key").astype(self.work)
        self.k, self.v = k, _heads(value, hkv, "value").astype(self.work)
        q = _heads(query, hq, "query").astype(self.work)
        d_k, d_v = q.shape[-1], self.v.shape[-1]
        self.q = q.reshape(b, hkv, hq // hkv, t, d_k)
        self.gate = self.rate = None
        if decay is not None:
            if decay.shape[-1] == hkv:            # one decay per head: (B, H_kv, T, 1)
                g = decay.reshape(b, t, hkv, 1).transpose(0, 2, 1, 3)
            elif decay.shape[-1] == hkv * d_k:    # one per key feature: (B, H_kv, T, d_k)
                g = _heads(decay, hkv, "decay")
            else:
                raise ValueError(f"LinearAttention: decay has {decay.shape[-1]} features, "
                                 f"expected {hkv} or {hkv * d_k}")
            self.gate = xp.exp(g.astype(self.work))[..., None]
        if beta is not None:
            if beta.shape[-1] not in (hkv, 1):
                raise ValueError(f"LinearAttention: beta has {beta.shape[-1]} features, "
                                 f"expected {hkv} or 1")
            self.rate = beta.reshape(b, t, beta.shape[-1], 1).transpose(0, 2, 1, 3
                                                                        ).astype(self.work)
        if past_state is not None:
            if tuple(past_state.shape) != (b, hkv, d_k, d_v):
                raise ValueError(f"LinearAttention: past_state has shape "
                                 f"{tuple(past_state.shape)}, expected {(b, hkv, d_k, d_v)}")
            self.state = past_state.astype(self.work)   # a copy (or a fresh array)
        else:
            self.state = xp.zeros((b, hkv, d_k, d_v), dtype=self.work)
        self.scale = float(scale) if scale else 1.0 / math.sqrt(d_k)

    def step(self, state, i):
        """``(gated state, retrieved value or None, update u)`` of step ``i``:
        the new state is ``gated + k_i ⊗ u``."""
        if self.gate is not None:
            state = state * self.gate[:, :, i]
        if self.rate is None:
            return state, None, self.v[:, :, i]
        retrieved = self.xp.einsum("bhdm,bhd->bhm", state, self.k[:, :, i])
        return state, retrieved, self.rate[:, :, i] * (self.v[:, :, i] - retrieved)

    def states(self):
        """The state after each step (the first: the initial state)."""
        out = [self.state]
        for i in range(self.k.shape[2]):
            gated, _, u = self.step(out[-1], i)
            out.append(gated + self.k[:, :, i][..., :, None] * u[..., None, :])
        return out


def _merge_heads(x):
    """(B, H, T, D) -> (B, T, H·D)."""
    b, h, t, d = x.shape
    return x.transpose(0, 2, 1, 3).reshape(b, t, h * d)


@op("LinearAttention", since=27,
    differentiable=("query", "key", "value", "past_state", "decay", "beta"))
def LinearAttention(xp, query, key, value, past_state=None, decay=None, beta=None, *,
                    chunk_size=64, kv_num_heads, q_num_heads, scale=0.0,
                    update_rule="gated_delta"):
    r = _Recurrence(xp, query, key, value, past_state, decay, beta, kv_num_heads,
                    q_num_heads, scale, update_rule)
    b, hkv, group, t, _ = r.q.shape
    state = r.state
    out = xp.empty((b, hkv, group, t, r.v.shape[-1]), dtype=r.work)
    for i in range(t):
        gated, _, u = r.step(state, i)
        state = gated + r.k[:, :, i][..., :, None] * u[..., None, :]
        out[:, :, :, i] = xp.einsum("bhgd,bhdm->bhgm", r.q[:, :, :, i], state) * r.scale
    output = _merge_heads(out.reshape(b, hkv * group, t, -1))
    state_dtype = query.dtype if past_state is None else past_state.dtype
    return (xp.ascontiguousarray(output.astype(query.dtype)), state.astype(state_dtype))


@LinearAttention.gradient
def _(g, node, dY=None, dState=None):
    inputs = [n or None for n in list(node.inputs) + [""] * (6 - len(node.inputs))]
    grads = g.private("LinearAttentionGrad", dY, dState, *inputs, num_outputs=6,
                      **{k: node.attrs[k] for k in ("kv_num_heads", "q_num_heads", "scale",
                                                    "update_rule")})
    return tuple(grads[:len(node.inputs)])


@op("LinearAttentionGrad", domain="onnxgrad")
def LinearAttentionGrad(xp, dY, dState, query, key, value, past_state=None, decay=None,
                        beta=None, *, kv_num_heads, q_num_heads, scale=0.0,
                        update_rule="gated_delta"):
    """Gradients of (query, key, value, past_state, decay, beta) from those of (Y,
    present_state), by backpropagation through time over the recomputed states (an
    empty array for an absent decay or beta)."""
    r = _Recurrence(xp, query, key, value, past_state, decay, beta, kv_num_heads,
                    q_num_heads, scale, update_rule)
    b, hkv, group, t, d_k = r.q.shape
    states = r.states()
    d_state = xp.zeros_like(r.state) if dState is None else dState.astype(r.work)
    if dY is None:
        d_out = xp.zeros((b, hkv, group, t, r.v.shape[-1]), dtype=r.work)
    else:
        d_out = _heads(dY, hkv * group, "dY").astype(r.work).reshape(b, hkv, group, t, -1)
        d_out = d_out * r.scale
    dq, dk, dv = xp.zeros_like(r.q), xp.zeros_like(r.k), xp.zeros_like(r.v)
    d_gate = None if r.gate is None else xp.zeros(r.gate.shape[:-1], dtype=r.work)
    d_rate = None if r.rate is None else xp.zeros_like(r.rate)
    for i in reversed(range(t)):
        dq[:, :, :, i] = xp.einsum("bhdm,bhgm->bhgd", states[i + 1], d_out[:, :, :, i])
        d_state = d_state + xp.einsum("bhgd,bhgm->bhdm", r.q[:, :, :, i], d_out[:, :, :, i])
        gated, retrieved, u = r.step(states[i], i)
        k_i = r.k[:, :, i]
        dk[:, :, i] = xp.einsum("bhdm,bhm->bhd", d_state, u)
        du = xp.einsum("bhdm,bhd->bhm", d_state, k_i)
        if r.rate is None:
            dv[:, :, i] = du
        else:  # u = rate · (v - gatedᵀ k)
            rate = r.rate[:, :, i]
            dv[:, :, i] = rate * du
            d_r = (du * (r.v[:, :, i] - retrieved)).sum(axis=-1, keepdims=True)
            d_rate[:, :, i] = d_r.sum(axis=1, keepdims=True) if rate.shape[1] == 1 else d_r
            d_state = d_state - k_i[..., :, None] * dv[:, :, i][..., None, :]
            dk[:, :, i] -= xp.einsum("bhdm,bhm->bhd", gated, dv[:, :, i])
        if r.gate is not None:  # gated = exp(decay) · state
            gate = r.gate[:, :, i]
            d_log = (d_state * states[i]).sum(axis=-1) * gate[..., 0]
            d_gate[:, :, i] = d_log.sum(axis=-1, keepdims=True) if gate.shape[-2] == 1 else d_log
            d_state = d_state * gate
    empty = xp.zeros((0,), dtype=query.dtype)
    return (_merge_heads(dq.reshape(b, hkv * group, t, d_k)).astype(query.dtype),
            _merge_heads(dk).astype(key.dtype), _merge_heads(dv).astype(value.dtype),
            d_state.astype(query.dtype if past_state is None else past_state.dtype),
            empty if decay is None else _merge_heads(d_gate).reshape(decay.shape).astype(decay.dtype),
            empty if beta is None else _merge_heads(d_rate).reshape(beta.shape).astype(beta.dtype))


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
