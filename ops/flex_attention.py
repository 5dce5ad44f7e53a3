"""FlexAttention (ai.onnx.preview, opset 1): scaled dot-product attention with optional
``score_mod`` and ``prob_mod`` subgraphs, as PyTorch's flex_attention::

    S = (Q·√scale) @ (K·√scale)ᵀ;  S = score_mod(S);  P = softmax(S);  P = prob_mod(P);
    Y = P @ V

Query head ``h`` reads K/V head ``h // (H_q / H_kv)``.  The scores are computed
in ``softmax_precision`` (default float32, float64 for float64 inputs); the
subgraphs run through :mod:`onnxgrad.ops.control`'s bodies, with the
outer-scope values they read passed after Q, K and V.

The gradients of Q, K and V come from the private ``onnxgrad::FlexAttentionGrad``,
which recomputes the probabilities and backpropagates through the softmax and
through each subgraph: a subgraph's vector-Jacobian product is its own graph
differentiated by onnxgrad's rules (:func:`onnxgrad.autodiff.build_gradients`)
and planned once per node.  The outer-scope values the subgraphs read have no
gradient rule: asking for one raises UnsupportedOpError.
"""

from __future__ import annotations

import math

from collections import OrderedDict

import numpy as np  # host constants for attributes
import onnx

from onnxgrad.ops import standard as std
from onnxgrad.ops.control import body_of, free_names, scope
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


class _Attention:
    """The recomputable quantities of one FlexAttention node: scaled Q and K (K and V
    repeated over the query heads that share them), the scores before and after
    ``score_mod`` and the probabilities before and after ``prob_mod``."""

    def __init__(self, xp, ctx, outer, Q, K, V, prob_mod, scale, score_mod, softmax_precision):
        if Q.ndim != 4 or K.ndim != 4 or V.ndim != 4:
            raise ValueError(f"FlexAttention: Q {tuple(Q.shape)}, K {tuple(K.shape)} and V "
                             f"{tuple(V.shape)} must be rank 4")
        hq, hkv = Q.shape[1], K.shape[1]
        if V.shape[1] != hkv or V.shape[2] != K.shape[2] or K.shape[3] != Q.shape[3]:
            raise ValueError(f"FlexAttention: Q {tuple(Q.shape)}, K {tuple(K.shape)} and V "
                             f"{tuple(V.shape)} do not fit together")
        if hq % hkv:
            raise ValueError(f"FlexAttention: {hq} query heads are not a multiple of {hkv}")
        self.group = hq // hkv
        if self.group > 1:
            K, V = xp.repeat(K, self.group, axis=1), xp.repeat(V, self.group, axis=1)
        if softmax_precision is not None:
            self.work = element_dtype(softmax_precision)
        else:
            self.work = Q.dtype if Q.dtype.name == "float64" else xp.dtype("float32")
        s = 1.0 / math.sqrt(Q.shape[3]) if scale is None else float(scale)
        # the square root of the scale multiplies Q and K, rounded as the reference does
        self.root = xp.asarray(math.sqrt(s), dtype="float32").astype(Q.dtype)
        self.Qs, self.Ks, self.V = Q * self.root, K * self.root, V
        self.raw = xp.matmul(self.Qs, xp.swapaxes(self.Ks, -1, -2)).astype(self.work)
        self.scores = _modify(xp, ctx, "score_mod", score_mod, outer, self.raw)
        S = self.scores - self.scores.max(axis=-1, keepdims=True)
        P = xp.exp(S)
        self.softmax = P / P.sum(axis=-1, keepdims=True)
        self.probs = _modify(xp, ctx, "prob_mod", prob_mod, outer, self.softmax)


@op("FlexAttention", since=1, domain="ai.onnx.preview", differentiable=("Q", "K", "V", "captured"))
def FlexAttention(xp, Q, K, V, *captured, ctx, prob_mod=None, scale=None, score_mod=None,
                  softmax_precision=None):
    outer = scope(ctx, (Q, K, V) + captured)
    a = _Attention(xp, ctx, outer, Q, K, V, prob_mod, scale, score_mod, softmax_precision)
    return (xp.ascontiguousarray(xp.matmul(a.probs, a.V.astype(a.work)).astype(V.dtype)),)


@FlexAttention.gradient
def _(g, node, dY):
    Q, K, V, *captured = node.inputs
    grads = g.private("FlexAttentionGrad", dY, Q, K, V, *captured, num_outputs=3,
                      **{k: v for k, v in node.attrs.items() if v is not None})
    return tuple(grads) + (None,) * len(captured)  # captured values: UnsupportedOpError


@op("FlexAttentionGrad", domain="onnxgrad")
def FlexAttentionGrad(xp, dY, Q, K, V, *captured, ctx, prob_mod=None, scale=None,
                      score_mod=None, softmax_precision=None):
    """Gradients of (Q, K, V) from that of FlexAttention's output."""
    outer = scope(ctx, (dY, Q, K, V) + captured)
    a = _Attention(xp, ctx, outer, Q, K, V, prob_mod, scale, score_mod, softmax_precision)
    dY = dY.astype(a.work)
    dV = xp.matmul(xp.swapaxes(a.probs, -1, -2), dY)
    dP = xp.matmul(dY, xp.swapaxes(a.V.astype(a.work), -1, -2))
    dP = _pullback(xp, ctx, "prob_mod", prob_mod, outer, a.softmax, dP)
    dS = a.softmax * (dP - (dP * a.softmax).sum(axis=-1, keepdims=True))
    dS = _pullback(xp, ctx, "score_mod", score_mod, outer, a.raw, dS)
    dQ = xp.matmul(dS, a.Ks.astype(a.work)) * a.root
    dK = xp.matmul(xp.swapaxes(dS, -1, -2), a.Qs.astype(a.work)) * a.root
    if a.group > 1:  # shared key/value heads collect the gradients of their query heads
        b, h, n, _ = dK.shape
        dK = dK.reshape(b, h // a.group, a.group, n, -1).sum(axis=2)
        dV = dV.reshape(b, h // a.group, a.group, n, -1).sum(axis=2)
    return (dQ.astype(Q.dtype), dK.astype(K.dtype), dV.astype(V.dtype))


@FlexAttentionGrad.in_standard_ops
def _(g, node):
    # The kernel's recomputation and backward pass, without subgraphs: None where score_mod or
    # prob_mod is set (their bodies and pullbacks would have to be inlined), or where the head
    # counts (or, for the default scale, the head size) are not static.
    a = node.attrs
    if a.get("score_mod") is not None or a.get("prob_mod") is not None:
        return None
    dY, Q, K, V = node.inputs[:4]
    qs, ks = std.tensor_shape(g, Q), std.tensor_shape(g, K)
    if qs is None or ks is None or len(qs) != 4 or len(ks) != 4:
        return None
    hq, hkv = qs[1], ks[1]
    if not isinstance(hq, int) or not isinstance(hkv, int) or hkv <= 0 or hq % hkv:
        return None
    group = hq // hkv
    scale = a.get("scale")
    if scale is None:
        if not isinstance(qs[3], int):
            return None
        scale = 1.0 / math.sqrt(qs[3])
    qdt = g.dtype(Q)
    precision = a.get("softmax_precision")
    work = np.dtype(element_dtype(precision)) if precision is not None else \
        (qdt if qdt.name == "float64" else np.dtype("float32"))
    root = np.asarray(math.sqrt(float(scale)), dtype="float32").astype(qdt)

    def cast(x, dt):
        dt = np.dtype(dt)
        return x if g.dtype(x) == dt else g.Cast(x, to=std.tensor_type(dt), dtype=dt)

    def swap(x):
        return g.Transpose(x, perm=[0, 1, 3, 2])

    root_q = g.const(root, dtype=qdt)
    Ks = g.Mul(std.repeat_heads(g, K, hkv, group), root_q)
    Qs, Vr = g.Mul(Q, root_q), std.repeat_heads(g, V, hkv, group)
    raw = cast(g.MatMul(Qs, swap(Ks)), work)
    last = g.ints([-1])
    P = g.Exp(g.Sub(raw, g.ReduceMax(raw, last, keepdims=1)))
    softmax = g.Div(P, g.ReduceSum(P, last, keepdims=1))
    dYw = cast(dY, work)
    dV = g.MatMul(swap(softmax), dYw)
    dP = g.MatMul(dYw, swap(cast(Vr, work)))
    dS = g.Mul(softmax, g.Sub(dP, g.ReduceSum(g.Mul(dP, softmax), last, keepdims=1)))
    wide = np.promote_types(work, qdt)  # a work-type product times the root, in NumPy's type
    root_w = g.const(root.astype(wide), dtype=wide)
    dQ = g.Mul(cast(g.MatMul(dS, cast(Ks, work)), wide), root_w)
    dK = g.Mul(cast(g.MatMul(swap(dS), cast(Qs, work)), wide), root_w)
    # shared key/value heads collect the gradients of their query heads
    dK, dV = std.collect_heads(g, dK, hkv, group), std.collect_heads(g, dV, hkv, group)
    return (cast(dQ, qdt), cast(dK, g.dtype(K)), cast(dV, g.dtype(V)))


class _Pullback:
    """A subgraph's vector-Jacobian product: the body's graph with its backward pass
    (seeded by the output's gradient), planned to give the input's gradient."""

    def __init__(self, xp, ctx, attr, proto, captured):
        from onnxgrad.autodiff import build_gradients, prune  # noqa: PLC0415 - runtime imports ops
        from onnxgrad.backend import get_backend  # noqa: PLC0415
        from onnxgrad.executor import Plan  # noqa: PLC0415
        from onnxgrad.ir import ValueInfo  # noqa: PLC0415
        from onnxgrad.loader import build_graph  # noqa: PLC0415

        model = onnx.ModelProto()
        model.graph.CopyFrom(proto)
        model.opset_import.add(domain="", version=onnx.defs.onnx_opset_version())
        graph = build_graph(model, f"node {ctx.node.name!r} attribute {attr!r}")
        free = free_names(proto)
        self.captured = [n for n in captured if n in free]
        (self.input,), (output,) = [vi.name for vi in proto.input], [vi.name for vi in proto.output]
        self.seed = graph.unique_name(f"{output}_seed", graph.all_names())
        graph.inputs = [self.input, self.seed] + self.captured
        graph.info[self.seed] = ValueInfo(graph.dtype(output), graph.shape(output))
        self.grad = build_gradients(graph, output, [self.input], seed=self.seed).get(self.input)
        self.plan = None
        if self.grad is not None:  # else the output does not depend on the input
            prune(graph, [self.grad])
            backend = get_backend("cpu" if xp.__name__ == "numpy" else "cuda")
            self.plan = Plan(graph, backend, constants=dict(graph.initializers),
                             fetch=[self.grad], state=ctx.state)

    def run(self, xp, x, dy, outer):
        if self.plan is None:
            return xp.zeros_like(x)
        env = {n: outer[n] for n in self.captured}
        env.update({self.input: x, self.seed: dy.astype(x.dtype, copy=False)})
        return self.plan.run(env)[self.grad]


_PULLBACKS: OrderedDict[tuple, tuple] = OrderedDict()
_PULLBACK_LIMIT = 128


def _pullback(xp, ctx, attr, proto, outer, x, dy):
    """The gradient of subgraph ``attr``'s input ``x`` from that of its output (``dy``)."""
    if proto is None:
        return dy
    key = (id(ctx.node), id(proto), id(ctx.state), attr)
    entry = _PULLBACKS.get(key)
    if entry is None or entry[0] is not ctx.node or entry[1] is not proto \
            or entry[2] is not ctx.state:
        entry = (ctx.node, proto, ctx.state, _Pullback(xp, ctx, attr, proto, list(outer)))
        _PULLBACKS[key] = entry
        if len(_PULLBACKS) > _PULLBACK_LIMIT:
            _PULLBACKS.popitem(last=False)
    _PULLBACKS.move_to_end(key)
    return entry[3].run(xp, x, dy, outer).astype(x.dtype, copy=False)
