"""ONNX's own optimizer ops (domain ``ai.onnx.preview.training``): Momentum,
Adagrad and Adam, with the spec's semantics.

Each takes the learning rate ``R`` and the update count ``T`` (scalars), then
``n`` tensors to optimize, their ``n`` gradients and their optimizer states,
and returns the ``n`` new tensors followed by the new states.  The rules are
the spec's (and ``onnx.reference``'s), which differ from ``torch.optim``'s:
Momentum scales the first gradient by 1 instead of ``beta``; Adam's ``epsilon``
is added after the square root and its bias correction goes into the learning
rate; Adagrad decays its learning rate as ``R / (1 + T * decay_factor)``.

These ops update weights; a gradient through them raises UnsupportedOpError
(the ``Gradient`` op of the same domain lives with the gradient builder).
"""

from __future__ import annotations

from onnxgrad.errors import ModelError
from onnxgrad.ops.registry import op

DOMAIN = "ai.onnx.preview.training"


def _groups(name: str, inputs: tuple, per_tensor: int) -> list[tuple]:
    """Split ``X1..Xn, G1..Gn, S1..Sn, …`` into one tuple (X, G, S…) per tensor."""
    if len(inputs) % per_tensor:
        raise ModelError(f"{name}: expected {per_tensor} groups of inputs after R and T "
                         f"(tensors, gradients, states), got {len(inputs)} inputs")
    n = len(inputs) // per_tensor
    return [tuple(inputs[k * n + i] for k in range(per_tensor)) for i in range(n)]


def _scalar(x) -> float:
    return float(x.reshape(()) if hasattr(x, "reshape") else x)


@op("Momentum", since=1, domain=DOMAIN, differentiable=("inputs",))
def Momentum(xp, R, T, *inputs, alpha, beta, mode, norm_coefficient):
    if mode not in ("standard", "nesterov"):
        raise ModelError(f"Momentum: mode must be 'standard' or 'nesterov', got {mode!r}")
    r, t = _scalar(R), _scalar(T)
    # The first update (T == 0) takes the gradient with coefficient 1.
    b = beta if t > 0 else 1.0
    xs, vs = [], []
    for X, G, V in _groups("Momentum", inputs, 3):
        g = norm_coefficient * X + G
        v = alpha * V + b * g
        x = X - r * v if mode == "standard" else X - r * (g + alpha * v)
        xs.append(x.astype(X.dtype, copy=False))
        vs.append(v.astype(V.dtype, copy=False))
    return tuple(xs + vs)


@op("Adagrad", since=1, domain=DOMAIN, differentiable=("inputs",))
def Adagrad(xp, R, T, *inputs, decay_factor=0.0, epsilon=1e-6, norm_coefficient=0.0):
    r = _scalar(R) / (1 + _scalar(T) * decay_factor)
    xs, hs = [], []
    for X, G, H in _groups("Adagrad", inputs, 3):
        g = norm_coefficient * X + G
        h = H + g * g
        x = X - r * g / (xp.sqrt(h) + epsilon)
        xs.append(x.astype(X.dtype, copy=False))
        hs.append(h.astype(H.dtype, copy=False))
    return tuple(xs + hs)


@op("Adam", since=1, domain=DOMAIN, differentiable=("inputs",))
def Adam(xp, R, T, *inputs, alpha=0.9, beta=0.999, epsilon=1e-6, norm_coefficient=0.0,
         norm_coefficient_post=0.0):
    r, t = _scalar(R), _scalar(T)
    if t > 0:  # bias correction of both moments, folded into the learning rate
        r = r * (1 - beta ** t) ** 0.5 / (1 - alpha ** t)
    xs, vs, hs = [], [], []
    for X, G, V, H in _groups("Adam", inputs, 4):
        g = norm_coefficient * X + G
        v = alpha * V + (1 - alpha) * g
        h = beta * H + (1 - beta) * (g * g)
        x = (1 - norm_coefficient_post) * (X - r * (v / (xp.sqrt(h) + epsilon)))
        xs.append(x.astype(X.dtype, copy=False))
        vs.append(v.astype(V.dtype, copy=False))
        hs.append(h.astype(H.dtype, copy=False))
    return tuple(xs + vs + hs)
