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

import numpy as np  # host constants for attributes

from onnxgrad.ops import standard as std
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


@LinearAttentionGrad.in_standard_ops
def _(g, node):
    # The kernel unrolled over the T steps (the query's static length): the states recomputed
    # step by step, then walked backwards, in the work type.  None where T, or a width that
    # picks a case (decay per head or per key feature, beta per head or shared; d_k for the
    # default scale), is not static.
    ins = [n or None for n in list(node.inputs) + [""] * (8 - len(node.inputs))]
    dY, dState, query, key, value, past, decay, beta = ins
    a = node.attrs
    rule = a.get("update_rule", "gated_delta")
    hq, hkv = int(a["q_num_heads"]), int(a["kv_num_heads"])
    gating, delta = rule in ("gated", "gated_delta"), rule in ("delta", "gated_delta")
    if rule not in ("linear", "gated", "delta", "gated_delta") or hq <= 0 or hkv <= 0 \
            or hq % hkv or gating != (decay is not None) or delta != (beta is not None):
        return None
    qshape, kshape = std.tensor_shape(g, query), std.tensor_shape(g, key)
    t = qshape[1] if qshape is not None and len(qshape) == 3 else None
    if not isinstance(t, int) or t < 1:
        return None
    width = qshape[2]
    scale = float(a.get("scale", 0.0) or 0.0)
    if not scale:
        if not isinstance(width, int) or width % hq:
            return None
        scale = 1.0 / math.sqrt(width // hq)

    def last_dim(value):
        shape = std.tensor_shape(g, value)
        return shape[-1] if shape else None

    decay_width, beta_width = (last_dim(decay) if decay else 0), (last_dim(beta) if beta else 1)
    key_width = kshape[-1] if kshape else None
    if not isinstance(decay_width, int) or beta_width not in (hkv, 1) or (
            decay and decay_width != hkv and decay_width != key_width):
        return None
    dtype = g.dtype(query)
    work = dtype if dtype.name in ("float32", "float64") else np.dtype("float32")

    def cast(value):
        return value if g.dtype(value) == work else \
            g.Cast(value, to=std.tensor_type(work), dtype=work)

    def heads(value, n):  # (B, T, n·D) -> (B, n, T, D)
        return g.Transpose(g.Reshape(cast(value), g.ints([0, 0, n, -1])), perm=[0, 2, 1, 3])

    def merge(x, dt):  # (B, H, T, D) -> (B, T, H·D), in type dt
        y = g.Reshape(g.Transpose(x, perm=[0, 2, 1, 3]), g.ints([0, 0, -1]))
        return y if dt == work else g.Cast(y, to=std.tensor_type(dt), dtype=dt)

    def step_of(x, i, axis):
        return g.Gather(x, std.i64(g, i), axis=axis)

    def stack(parts, axis):
        return g.Concat(*[g.Unsqueeze(p, g.ints([axis])) for p in parts], axis=axis)

    group = hq // hkv
    k4, v4 = heads(key, hkv), heads(value, hkv)
    q5 = g.Reshape(heads(query, hq), g.ints([0, hkv, group, t, -1]))
    gate = rate = None
    if decay:
        if decay_width == hkv:  # one decay per head: (B, H_kv, T, 1)
            gate = g.Exp(g.Transpose(g.Reshape(cast(decay), g.ints([0, 0, hkv, 1])),
                                     perm=[0, 2, 1, 3]))
        else:
            gate = g.Exp(heads(decay, hkv))
    if beta:
        rate = g.Transpose(g.Reshape(cast(beta), g.ints([0, 0, beta_width, 1])),
                           perm=[0, 2, 1, 3])
    ks = [step_of(k4, i, 2) for i in range(t)]
    vs = [step_of(v4, i, 2) for i in range(t)]
    gates = [g.Unsqueeze(step_of(gate, i, 2), g.ints([-1])) for i in range(t)] if gate else None
    rates = [step_of(rate, i, 2) for i in range(t)] if rate else None
    if past:
        state = cast(past)
    else:
        shape = g.Concat(g.Shape(k4, start=0, end=2, dtype="int64"),
                         g.Shape(k4, start=3, dtype="int64"),
                         g.Shape(v4, start=3, dtype="int64"), axis=0, dtype="int64")
        state = g.ConstantOfShape(shape, value=np.zeros(1, dtype=work), dtype=work)

    def outer(x, y):  # x[..., :, None] * y[..., None, :]
        return g.Mul(g.Unsqueeze(x, g.ints([-1])), g.Unsqueeze(y, g.ints([-2])))

    states, steps = [state], []
    for i in range(t):  # _Recurrence.step and .states
        gated = g.Mul(states[-1], gates[i]) if gates else states[-1]
        if rates is None:
            retrieved, u = None, vs[i]
        else:
            retrieved = g.Einsum(gated, ks[i], equation="bhdm,bhd->bhm")
            u = g.Mul(rates[i], g.Sub(vs[i], retrieved))
        steps.append((gated, retrieved, u))
        states.append(g.Add(gated, outer(ks[i], u)))

    d_state = cast(dState) if dState else g.ConstantOfShape(
        g.Shape(state, dtype="int64"), value=np.zeros(1, dtype=work), dtype=work)
    d_out = None
    if dY:
        d_out = g.Mul(g.Reshape(heads(dY, hq), g.ints([0, hkv, group, t, -1])),
                      g.const(scale, dtype=work))
    dq, dk, dv = [None] * t, [None] * t, [None] * t
    d_gate, d_rate = [None] * t, [None] * t
    for i in reversed(range(t)):
        if d_out is not None:
            d_out_i, q_i = step_of(d_out, i, 3), step_of(q5, i, 3)
            dq[i] = g.Einsum(states[i + 1], d_out_i, equation="bhdm,bhgm->bhgd")
            d_state = g.Add(d_state, g.Einsum(q_i, d_out_i, equation="bhgd,bhgm->bhdm"))
        gated, retrieved, u = steps[i]
        dk[i] = g.Einsum(d_state, u, equation="bhdm,bhm->bhd")
        du = g.Einsum(d_state, ks[i], equation="bhdm,bhd->bhm")
        if rates is None:
            dv[i] = du
        else:  # u = rate · (v - gatedᵀ k)
            dv[i] = g.Mul(rates[i], du)
            d_r = g.ReduceSum(g.Mul(du, g.Sub(vs[i], retrieved)), g.ints([-1]), keepdims=1)
            d_rate[i] = g.ReduceSum(d_r, g.ints([1]), keepdims=1) if beta_width == 1 else d_r
            d_state = g.Sub(d_state, outer(ks[i], dv[i]))
            dk[i] = g.Sub(dk[i], g.Einsum(gated, dv[i], equation="bhdm,bhm->bhd"))
        if gates:  # gated = exp(decay) · state
            gate_i = gates[i]  # (B, H_kv, d_k or 1, 1)
            d_log = g.Mul(g.ReduceSum(g.Mul(d_state, states[i]), g.ints([-1]), keepdims=0),
                          g.Squeeze(gate_i, g.ints([-1])))
            d_gate[i] = d_log if decay_width != hkv else \
                g.ReduceSum(d_log, g.ints([-1]), keepdims=1)
            d_state = g.Mul(d_state, gate_i)
    if d_out is not None:
        dQ = merge(g.Reshape(stack(dq, 3), g.ints([0, hq, t, -1])), dtype)
    else:
        dQ = std.zeros(g, g.Shape(query, dtype="int64"), query)
    state_dtype = dtype if past is None else g.dtype(past)
    dS = d_state if state_dtype == work else \
        g.Cast(d_state, to=std.tensor_type(state_dtype), dtype=state_dtype)
    empty = g.const(np.zeros((0,), dtype=dtype))
    dDecay = empty if decay is None else std.as_shape_of(
        g, merge(stack(d_gate, 2), g.dtype(decay)), decay)
    dBeta = empty if beta is None else std.as_shape_of(
        g, merge(stack(d_rate, 2), g.dtype(beta)), beta)
    return (dQ, merge(stack(dk, 2), g.dtype(key)), merge(stack(dv, 2), g.dtype(value)), dS,
            dDecay, dBeta)


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


@CausalConvWithStateGrad.in_standard_ops
def _(g, node):
    # The kernel in the input's type, unrolled over the k taps (the weight's static width;
    # None where it is unknown): tap j reads padded[:, :, j:j + L], and its gradient is
    # padded back into place (Pad), so that the length L may be known at run time only.
    ins = list(node.inputs) + [""] * (6 - len(node.inputs))
    dY, dState, x, w, bias, past = (n or None for n in ins)
    activation = node.attrs.get("activation", "none")
    wshape = std.tensor_shape(g, w)
    k = wshape[2] if wshape is not None and len(wshape) == 3 else None
    if activation not in _ACTIVATIONS or not isinstance(k, int) or k < 1:
        return None
    if k == 1:
        padded = x
    else:
        if past is None:
            shape = g.Concat(g.Shape(x, start=0, end=2, dtype="int64"), g.ints([k - 1]), axis=0,
                             dtype="int64")
            past = std.zeros(g, shape, x)
        elif g.dtype(past) != g.dtype(x):
            past = std.cast_like(g, past, x)
        padded = g.Concat(past, x, axis=2)
    axis2 = g.ints([2])
    windows = [g.Slice(padded, g.ints([j]), g.ints([j - (k - 1) if j < k - 1 else std.END]),
                       axis2) for j in range(k)]
    taps = [g.Reshape(g.Slice(w, g.ints([j]), g.ints([j + 1]), axis2), g.ints([1, -1, 1]))
            for j in range(k)]
    dP = std.zeros(g, g.Shape(padded, dtype="int64"), x)
    if dY is not None:
        dz = dY
        if activation != "none":  # the SiLU's slope at z, recomputed without rounding
            z = None
            for window, tap in zip(windows, taps):
                term = g.Mul(window, tap)
                z = term if z is None else g.Add(z, term)
            if bias is not None:
                z = g.Add(z, g.Reshape(bias, g.ints([1, -1, 1])))
            sig = g.Sigmoid(z)
            one = std.like(g, 1, x)
            dz = g.Mul(dY, g.Mul(sig, g.Add(one, g.Mul(z, g.Sub(one, sig)))))
        batch_and_time = g.ints([0, 2])
        for j, (window, tap) in enumerate(zip(windows, taps)):
            dP = g.Add(dP, g.Pad(g.Mul(dz, tap), g.ints([0, 0, j, 0, 0, k - 1 - j])))
        dW = g.Concat(*[g.Unsqueeze(g.ReduceSum(g.Mul(dz, window), batch_and_time, keepdims=0),
                                    g.ints([1])) for window in windows], axis=1)
        dW = g.Unsqueeze(dW, g.ints([1]))
        dB = g.ReduceSum(dz, batch_and_time, keepdims=0)
    else:
        dW = std.zeros(g, g.Shape(w, dtype="int64"), w)
        dB = std.zeros(g, g.Shape(x, start=1, end=2, dtype="int64"), x)
    if dState is not None and k > 1:
        pads = g.Concat(g.ints([0, 0]), g.Shape(x, start=2, end=3, dtype="int64"),
                        g.ints([0, 0, 0]), axis=0, dtype="int64")
        dP = g.Add(dP, g.Pad(dState, pads))
    return (g.Slice(dP, g.ints([k - 1]), g.ints([std.END]), axis2), dW, dB,
            g.Slice(dP, g.ints([0]), g.ints([k - 1]), axis2))
