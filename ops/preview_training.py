"""ONNX's own optimizer ops (domain ``ai.onnx.preview.training``): Momentum,
Adagrad and Adam, with the spec's semantics.

Each takes the learning rate ``R`` and the update count ``T`` (scalars), then
``n`` tensors to optimize, their ``n`` gradients and their optimizer states,
and returns the ``n`` new tensors followed by the new states.  The rules are
the spec's (and ``onnx.reference``'s), which differ from ``torch.optim``'s:
Momentum scales the first gradient by 1 instead of ``beta``; Adam's ``epsilon``
is added after the square root and its bias correction goes into the learning
rate; Adagrad decays its learning rate as ``R / (1 + T * decay_factor)``.

Their outputs are plain differentiable formulas of ``R`` and the tensors,
gradients and states (``T``, an integer count, has none): the private
``onnxgrad::MomentumGrad``, ``AdagradGrad`` and ``AdamGrad`` recompute an
update and return the gradients of ``R`` and of every tensor input, from the
gradients of the new tensors and states.  (The ``Gradient`` op of the same
domain lives with the gradient builder.)
"""

from __future__ import annotations

import numpy as np  # host constants of standard forms

from onnxgrad.errors import ModelError
from onnxgrad.ops import standard as std
from onnxgrad.ops.registry import op

DOMAIN = "ai.onnx.preview.training"
_PRIVATE = "onnxgrad"


def _groups(name: str, inputs: tuple, per_tensor: int) -> list[tuple]:
    """Split ``X1..Xn, G1..Gn, S1..Sn, …`` into one tuple (X, G, S…) per tensor."""
    if len(inputs) % per_tensor:
        raise ModelError(f"{name}: expected {per_tensor} groups of inputs after R and T "
                         f"(tensors, gradients, states), got {len(inputs)} inputs")
    n = len(inputs) // per_tensor
    return [tuple(inputs[k * n + i] for k in range(per_tensor)) for i in range(n)]


def _scalar(x) -> float:
    return float(x.reshape(()) if hasattr(x, "reshape") else x)


@op("Momentum", since=1, domain=DOMAIN, differentiable=("R", "inputs"))
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


@op("Adagrad", since=1, domain=DOMAIN, differentiable=("R", "inputs"))
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


@op("Adam", since=1, domain=DOMAIN, differentiable=("R", "inputs"))
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


# -- gradients ------------------------------------------------------------------------------
#: Per optimized tensor: the op's inputs (X, G, states…) and outputs (X_new, states…).
_ARITY = {"Momentum": (3, 2), "Adagrad": (3, 2), "Adam": (4, 3)}


def _rule(g, node, *douts):
    R, T, *tensors = node.inputs
    ins, outs = _ARITY[node.op_type]
    n = len(tensors) // ins
    douts = list(douts) + [None] * (outs * n - len(douts))
    grads = g.private(f"{node.op_type}Grad", R, T, *tensors, *douts, num_outputs=1 + len(tensors),
                      dtype=g.dtype(tensors[0]), **node.attrs)
    return (grads[0], None, *grads[1:])


for _definition in (Momentum, Adagrad, Adam):
    _definition.gradient(_rule)


def _split(name: str, inputs: tuple, xp) -> tuple[list[tuple], list[tuple]]:
    """A gradient kernel's inputs as one (X, G, states…) tuple per tensor and one tuple of
    the gradients of its outputs (missing ones as zeros)."""
    ins, outs = _ARITY[name]
    n = len(inputs) // (ins + outs)
    groups = _groups(name, inputs[:ins * n], ins)
    douts = _groups(name, inputs[ins * n:], outs)
    douts = [tuple(xp.zeros_like(group[0]) if d is None else d for d in ds)
             for group, ds in zip(groups, douts)]
    return groups, douts


def _gathered(R, dR, groups, per_tensor):
    """The kernel's outputs: dR in R's shape and type, then the tensor inputs' gradients in
    the op's order (all X, then all G, then each state)."""
    dR = dR.reshape(R.shape).astype(R.dtype, copy=False)
    cast = [tuple(d.astype(x.dtype, copy=False) for d, x in zip(ds, group))
            for ds, group in zip(per_tensor, groups)]
    return (dR,) + tuple(ds[k] for k in range(len(groups[0])) for ds in cast)


@op("MomentumGrad", domain=_PRIVATE)
def MomentumGrad(xp, R, T, *inputs, alpha, beta, mode, norm_coefficient):
    """Gradients of Momentum for R, each X, G and V, from those of X_new and V_new."""
    r, t = _scalar(R), _scalar(T)
    b = beta if t > 0 else 1.0
    groups, douts = _split("Momentum", inputs, xp)
    dR, per_tensor = xp.zeros(()), []
    for (X, G, V), (dx, dv) in zip(groups, douts):
        g = norm_coefficient * X + G
        v = alpha * V + b * g
        if mode == "standard":           # x = X - r v
            dR = dR - xp.sum(dx * v)
            dv, dg = dv - r * dx, 0
        else:                             # x = X - r (g + alpha v)
            dR = dR - xp.sum(dx * (g + alpha * v))
            dv, dg = dv - r * alpha * dx, -r * dx
        dg = dg + b * dv
        per_tensor.append((dx + norm_coefficient * dg, dg, alpha * dv))
    return _gathered(R, dR, groups, per_tensor)


@op("AdagradGrad", domain=_PRIVATE)
def AdagradGrad(xp, R, T, *inputs, decay_factor=0.0, epsilon=1e-6, norm_coefficient=0.0):
    """Gradients of Adagrad for R, each X, G and H, from those of X_new and H_new."""
    decay = 1 + _scalar(T) * decay_factor
    r = _scalar(R) / decay
    groups, douts = _split("Adagrad", inputs, xp)
    dR, per_tensor = xp.zeros(()), []
    for (X, G, H), (dx, dh) in zip(groups, douts):
        g = norm_coefficient * X + G
        root = xp.sqrt(H + g * g)
        denominator = root + epsilon
        dR = dR - xp.sum(dx * g / denominator) / decay      # x = X - r g / (sqrt(h) + eps)
        dq = -r * dx
        dh = dh - dq * g / denominator ** 2 / (2 * root)
        dg = dq / denominator + 2 * g * dh
        per_tensor.append((dx + norm_coefficient * dg, dg, dh))
    return _gathered(R, dR, groups, per_tensor)


@op("AdamGrad", domain=_PRIVATE)
def AdamGrad(xp, R, T, *inputs, alpha=0.9, beta=0.999, epsilon=1e-6, norm_coefficient=0.0,
             norm_coefficient_post=0.0):
    """Gradients of Adam for R, each X, G, V and H, from those of X_new, V_new and H_new."""
    r, t = _scalar(R), _scalar(T)
    correction = (1 - beta ** t) ** 0.5 / (1 - alpha ** t) if t > 0 else 1.0
    r = r * correction
    groups, douts = _split("Adam", inputs, xp)
    dR, per_tensor = xp.zeros(()), []
    for (X, G, V, H), (dx, dv, dh) in zip(groups, douts):
        g = norm_coefficient * X + G
        v = alpha * V + (1 - alpha) * g
        root = xp.sqrt(beta * H + (1 - beta) * (g * g))
        denominator = root + epsilon
        dinner = (1 - norm_coefficient_post) * dx          # x = (1 - post) (X - r v / s)
        dR = dR - correction * xp.sum(dinner * v / denominator)
        dstep = -r * dinner
        dv = dv + dstep / denominator
        dh = dh - dstep * v / denominator ** 2 / (2 * root)
        dg = (1 - alpha) * dv + 2 * (1 - beta) * g * dh
        per_tensor.append((dinner + norm_coefficient * dg, dg, alpha * dv, beta * dh))
    return _gathered(R, dR, groups, per_tensor)


# -- the gradients in standard ops ------------------------------------------------------------
class _Std:
    """A gradient kernel's inputs in a standard form: per tensor (X, G, states…) and the
    gradients of its outputs (absent ones as zeros), ``R`` and ``T`` as float64 scalars,
    and ``dR`` summed in float64 as the kernels do."""

    def __init__(self, g, name, inputs):
        self.g = g
        ins, outs = _ARITY[name]
        self.R, T, *rest = inputs
        self.ok = len(rest) % (ins + outs) == 0 and bool(rest)
        if not self.ok:
            return
        n = len(rest) // (ins + outs)
        self.groups = _groups(name, tuple(rest[:ins * n]), ins)
        douts = _groups(name, tuple(rest[ins * n:]), outs)
        self.douts = [tuple(d if d else std.zeros(g, g.Shape(group[0], dtype="int64"), group[0])
                            for d in ds) for group, ds in zip(self.groups, douts)]
        self.r64 = self.f64(self.R)
        self.t64 = self.f64(T)
        self.positive = g.Greater(self.t64, g.const(0.0, dtype=np.float64))
        self.dR = g.const(0.0, dtype=np.float64)

    def f64(self, value):
        g = self.g
        value = g.Reshape(value, g.ints([]))
        return value if g.dtype(value) == np.float64 else \
            g.Cast(value, to=std.tensor_type(np.float64), dtype=np.float64)

    def like(self, value, of):
        """A host float, or a float64 value, in the element type of ``of``."""
        g = self.g
        if not isinstance(value, str):
            return std.like(g, value, of)
        return value if g.dtype(value) == g.dtype(of) else std.cast_like(g, value, of)

    def subtract_from_dR(self, total, factor=None):
        """``dR -= factor * sum(total)`` (factor a float64 value)."""
        g = self.g
        term = self.f64(g.ReduceSum(total, keepdims=0))
        if factor is not None:
            term = g.Mul(factor, term)
        self.dR = g.Sub(self.dR, term)

    def outputs(self, per_tensor):
        g = self.g
        dR = g.Reshape(self.dR, g.Shape(self.R, dtype="int64"))
        dR = dR if g.dtype(self.R) == np.float64 else std.cast_like(g, dR, self.R)
        cast = [tuple(d if g.dtype(d) == g.dtype(x) else std.cast_like(g, d, x)
                      for d, x in zip(ds, group))
                for ds, group in zip(per_tensor, self.groups)]
        return (dR,) + tuple(ds[k] for k in range(len(self.groups[0])) for ds in cast)


@MomentumGrad.in_standard_ops
def _(g, node):
    a = node.attrs
    alpha, beta, mode, nc = a["alpha"], a["beta"], a["mode"], a["norm_coefficient"]
    s = _Std(g, "Momentum", node.inputs)
    if not s.ok or mode not in ("standard", "nesterov"):
        return None
    b64 = g.Where(s.positive, g.const(beta, dtype=np.float64), g.const(1.0, dtype=np.float64))
    per_tensor = []
    for (X, G, V), (dx, dv) in zip(s.groups, s.douts):
        b, r = s.like(b64, X), s.like(s.r64, X)
        gg = g.Add(g.Mul(s.like(nc, X), X), G)
        v = g.Add(g.Mul(s.like(alpha, X), V), g.Mul(b, gg))
        if mode == "standard":           # x = X - r v
            s.subtract_from_dR(g.Mul(dx, v))
            dv = g.Sub(dv, g.Mul(r, dx))
            dg = g.Mul(b, dv)
        else:                             # x = X - r (g + alpha v)
            s.subtract_from_dR(g.Mul(dx, g.Add(gg, g.Mul(s.like(alpha, X), v))))
            r_alpha = s.like(g.Mul(s.r64, g.const(alpha, dtype=np.float64)), X)
            dv = g.Sub(dv, g.Mul(r_alpha, dx))
            dg = g.Add(g.Mul(g.Neg(r), dx), g.Mul(b, dv))
        per_tensor.append((g.Add(dx, g.Mul(s.like(nc, X), dg)), dg,
                           g.Mul(s.like(alpha, X), dv)))
    return s.outputs(per_tensor)


@AdagradGrad.in_standard_ops
def _(g, node):
    a = node.attrs
    decay_factor = a.get("decay_factor", 0.0)
    epsilon, nc = a.get("epsilon", 1e-6), a.get("norm_coefficient", 0.0)
    s = _Std(g, "Adagrad", node.inputs)
    if not s.ok:
        return None
    decay64 = g.Add(g.const(1.0, dtype=np.float64),
                    g.Mul(s.t64, g.const(decay_factor, dtype=np.float64)))
    r64 = g.Div(s.r64, decay64)
    inverse_decay = g.Div(g.const(1.0, dtype=np.float64), decay64)
    per_tensor = []
    for (X, G, H), (dx, dh) in zip(s.groups, s.douts):
        gg = g.Add(g.Mul(s.like(nc, X), X), G)
        root = g.Sqrt(g.Add(H, g.Mul(gg, gg)))
        den = g.Add(root, s.like(epsilon, X))
        s.subtract_from_dR(g.Div(g.Mul(dx, gg), den), inverse_decay)
        dq = g.Mul(s.like(g.Neg(r64), X), dx)
        dh = g.Sub(dh, g.Div(g.Div(g.Mul(dq, gg), g.Mul(den, den)),
                             g.Mul(s.like(2.0, X), root)))
        dg = g.Add(g.Div(dq, den), g.Mul(g.Mul(s.like(2.0, X), gg), dh))
        per_tensor.append((g.Add(dx, g.Mul(s.like(nc, X), dg)), dg, dh))
    return s.outputs(per_tensor)


@AdamGrad.in_standard_ops
def _(g, node):
    a = node.attrs
    alpha, beta = a.get("alpha", 0.9), a.get("beta", 0.999)
    epsilon, nc = a.get("epsilon", 1e-6), a.get("norm_coefficient", 0.0)
    post = a.get("norm_coefficient_post", 0.0)
    s = _Std(g, "Adam", node.inputs)
    if not s.ok:
        return None
    one = g.const(1.0, dtype=np.float64)
    powered = [g.Sub(one, g.Pow(g.const(c, dtype=np.float64), s.t64)) for c in (beta, alpha)]
    powered = [g.Where(s.positive, p, one) for p in powered]  # no 0/0 where unused
    correction = g.Where(s.positive, g.Div(g.Sqrt(powered[0]), powered[1]), one)
    r64 = g.Mul(s.r64, correction)
    per_tensor = []
    for (X, G, V, H), (dx, dv, dh) in zip(s.groups, s.douts):
        gg = g.Add(g.Mul(s.like(nc, X), X), G)
        v = g.Add(g.Mul(s.like(alpha, X), V), g.Mul(s.like(1 - alpha, X), gg))
        root = g.Sqrt(g.Add(g.Mul(s.like(beta, X), H), g.Mul(s.like(1 - beta, X),
                                                              g.Mul(gg, gg))))
        den = g.Add(root, s.like(epsilon, X))
        dinner = g.Mul(s.like(1 - post, X), dx)      # x = (1 - post) (X - r v / s)
        s.subtract_from_dR(g.Div(g.Mul(dinner, v), den), correction)
        dstep = g.Mul(s.like(g.Neg(r64), X), dinner)
        dv = g.Add(dv, g.Div(dstep, den))
        dh = g.Sub(dh, g.Div(g.Div(g.Mul(dstep, v), g.Mul(den, den)),
                             g.Mul(s.like(2.0, X), root)))
        dg = g.Add(g.Mul(s.like(1 - alpha, X), dv),
                   g.Mul(g.Mul(s.like(2 * (1 - beta), X), gg), dh))
        per_tensor.append((g.Add(dinner, g.Mul(s.like(nc, X), dg)), dg,
                           g.Mul(s.like(alpha, X), dv), g.Mul(s.like(beta, X), dh)))
    return s.outputs(per_tensor)
