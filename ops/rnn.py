"""Recurrent layers: RNN, GRU and LSTM (forward, reverse, bidirectional; ``layout`` 0
and 1; ``sequence_lens``; ``clip``; custom activations; LSTM peepholes and
``input_forget``), and their gradients.

One driver runs a cell over time for each direction; the input projection of
every step is one matmul up front.  Steps past a sequence's length leave its
state unchanged and write zeros to ``Y``.

The gradient is backpropagation through time, vectorised over the batch: the
private ``onnxgrad::RNNGrad``, ``GRUGrad`` and ``LSTMGrad`` run the forward
pass again, keeping each step's gate values, then walk the steps backwards and
return the gradients of X, W, R, B, the initial states and the peepholes.  A
cell's forward and backward are written side by side (``_rnn_cell``,
``_gru_cell``, ``_lstm_cell``), on the activations' derivatives in
:func:`_activation`; ``clip`` passes the gradient where it did not clip.

Their standard forms (for ``onnxgrad convert`` and second-order gradients) are the
same walk unrolled into standard ops, one set of nodes per time step: they need the
number of steps static and return None without it (or for an unknown activation).
"""

from __future__ import annotations

import numpy as np  # host constants for the standard forms

from onnxgrad.errors import ModelError
from onnxgrad.ops import standard as std
from onnxgrad.ops.registry import op


# -- activations (ONNX's names; alpha/beta consumed in order by those that take them) ---------
#: Each activation's parameters: how many of alpha and beta it takes, and their defaults.
_PARAMETERS = {"relu": (0, 0.0, 0.0), "tanh": (0, 0.0, 0.0), "sigmoid": (0, 0.0, 0.0),
               "affine": (2, 1.0, 0.0), "leakyrelu": (1, 0.01, 0.0),
               "thresholdedrelu": (1, 1.0, 0.0), "scaledtanh": (2, 1.0, 1.0),
               "hardsigmoid": (2, 0.2, 0.5), "elu": (1, 1.0, 0.0), "softsign": (0, 0.0, 0.0),
               "softplus": (0, 0.0, 0.0)}


def _parameters(name: str, alpha: list, beta: list) -> tuple[float, float] | None:
    """Activation ``name``'s (alpha, beta), taking the next of ``alpha`` and ``beta`` (in
    place) where it takes them; None for an unknown name."""
    if name not in _PARAMETERS:
        return None
    count, a, b = _PARAMETERS[name]
    if count >= 1 and alpha:
        a = alpha.pop(0)
    if count >= 2 and beta:
        b = beta.pop(0)
    return a, b


def _activation(xp, name: str, alpha, beta):
    """``(f, df)``: the activation and its derivative, ``df(x, y)`` with ``y = f(x)``."""
    name = name.lower()

    def sigmoid(x):
        return 1 / (1 + xp.exp(-x))

    table = {
        "relu": (lambda x, a, b: xp.maximum(x, 0), lambda x, y, a, b: (x > 0).astype(x.dtype)),
        "tanh": (lambda x, a, b: xp.tanh(x), lambda x, y, a, b: 1 - y * y),
        "sigmoid": (lambda x, a, b: sigmoid(x), lambda x, y, a, b: y * (1 - y)),
        "affine": (lambda x, a, b: a * x + b, lambda x, y, a, b: xp.full_like(x, a)),
        "leakyrelu": (lambda x, a, b: xp.where(x >= 0, x, a * x),
                      lambda x, y, a, b: xp.where(x >= 0, 1, a).astype(x.dtype)),
        "thresholdedrelu": (lambda x, a, b: xp.where(x > a, x, 0),
                            lambda x, y, a, b: (x > a).astype(x.dtype)),
        "scaledtanh": (lambda x, a, b: a * xp.tanh(b * x),
                       lambda x, y, a, b: a * b * (1 - xp.tanh(b * x) ** 2)),
        "hardsigmoid": (lambda x, a, b: xp.clip(a * x + b, 0, 1),
                        lambda x, y, a, b: xp.where((a * x + b > 0) & (a * x + b < 1), a, 0
                                                    ).astype(x.dtype)),
        "elu": (lambda x, a, b: xp.where(x >= 0, x, a * (xp.exp(x) - 1)),
                lambda x, y, a, b: xp.where(x >= 0, 1, y + a).astype(x.dtype)),
        "softsign": (lambda x, a, b: x / (1 + xp.abs(x)),
                     lambda x, y, a, b: 1 / (1 + xp.abs(x)) ** 2),
        "softplus": (lambda x, a, b: xp.log1p(xp.exp(x)), lambda x, y, a, b: sigmoid(x)),
    }
    if name not in table:
        raise ModelError(f"recurrent layer: unknown activation {name!r}")
    fn, dfn = table[name]
    a, b = _parameters(name, alpha, beta)
    return (lambda x: fn(x, a, b)), (lambda x, y: dfn(x, y, a, b))


def _activations(xp, names, defaults, n_dir, alpha, beta):
    """Per direction, the ``(f, df)`` pairs of the cell's activations."""
    names = list(names) if names else list(defaults) * n_dir
    if len(names) == len(defaults) and n_dir == 2:
        names = names * 2
    if len(names) != len(defaults) * n_dir:
        raise ModelError(f"recurrent layer: expected {len(defaults) * n_dir} activations, got "
                         f"{len(names)}")
    alpha, beta = list(alpha or []), list(beta or [])
    fns = [_activation(xp, n, alpha, beta) for n in names]
    k = len(defaults)
    return [fns[d * k:(d + 1) * k] for d in range(n_dir)]


class _Gate:
    """One activation behind ``clip``: ``y = f(clip(v))``, and the gradient of v."""

    def __init__(self, xp, act, clip):
        self.xp, (self.f, self.df), self.clip = xp, act, clip

    def __call__(self, v):
        u = v if self.clip is None else self.xp.clip(v, -self.clip, self.clip)
        return self.f(u), (v, u)

    def unclipped(self):
        return _Gate(self.xp, (self.f, self.df), None)

    def grad(self, dy, y, saved):
        v, u = saved
        dv = dy * self.df(u, y)
        if self.clip is not None:
            dv = dv * (abs(v) <= self.clip)
        return dv


# -- cells: forward (new state, what the backward needs) and backward ---------------------------
# ``forward(x_t, state, R, rb)``: x_t is the step's input projection (with W's bias);
# ``backward(saved, dstate, R, rb, acc)``: from the gradients of the new state,
# the gradients of x_t and of the old state; R, rb and peephole gradients are
# accumulated into ``acc``.

def _rnn_cell(xp, gates, P=None, **_):
    (act,) = gates

    def forward(x_t, state, R, rb):
        (h,) = state
        y, s = act(x_t + h @ R.T + rb)
        return [y], (h, y, s)

    def backward(saved, dstate, R, rb, acc):
        h, y, s = saved
        dv = act.grad(dstate[0], y, s)
        acc["R"] += dv.T @ h
        acc["rb"] += dv.sum(axis=0)
        return dv, [dv @ R]

    return forward, backward


def _gru_cell(xp, gates, linear_before_reset=0, **_):
    f, g = gates

    def forward(x_t, state, R, rb):
        (h,) = state
        n = h.shape[1]
        z, sz = f(x_t[:, :n] + h @ R[:n].T + rb[:n])
        r, sr = f(x_t[:, n:2 * n] + h @ R[n:2 * n].T + rb[n:2 * n])
        if linear_before_reset:
            q = h @ R[2 * n:].T + rb[2 * n:]
            cand, sc = g(x_t[:, 2 * n:] + r * q)
        else:
            q = r * h
            cand, sc = g(x_t[:, 2 * n:] + q @ R[2 * n:].T + rb[2 * n:])
        return [(1 - z) * cand + z * h], (h, z, sz, r, sr, q, cand, sc)

    def backward(saved, dstate, R, rb, acc):
        h, z, sz, r, sr, q, cand, sc = saved
        n = h.shape[1]
        (dnew,) = dstate
        dvc = g.grad(dnew * (1 - z), cand, sc)
        dh = dnew * z
        if linear_before_reset:
            dr = dvc * q
            dq = dvc * r                     # q = h Rhᵀ + rbh
            acc["R"][2 * n:] += dq.T @ h
            acc["rb"][2 * n:] += dq.sum(axis=0)
            dh = dh + dq @ R[2 * n:]
        else:
            drh = dvc @ R[2 * n:]            # q = r · h
            acc["R"][2 * n:] += dvc.T @ q
            acc["rb"][2 * n:] += dvc.sum(axis=0)
            dr = drh * h
            dh = dh + drh * r
        dvz = f.grad(dnew * (h - cand), z, sz)
        dvr = f.grad(dr, r, sr)
        dzr = xp.concatenate([dvz, dvr], axis=1)
        acc["R"][:2 * n] += dzr.T @ h
        acc["rb"][:2 * n] += dzr.sum(axis=0)
        dh = dh + dzr @ R[:2 * n]
        return xp.concatenate([dzr, dvc], axis=1), [dh]

    return forward, backward


def _lstm_cell(xp, gates, input_forget=0, P=None, **_):
    f, g, hf = gates
    hf = hf.unclipped()  # clip bounds the gates' inputs, not the cell state (as onnxruntime)
    peep = P is not None

    def forward(x_t, state, R, rb):
        h, c = state
        n = h.shape[1]
        pre = x_t + h @ R.T + rb  # gates i, o, f, c
        pi, po, pf = (P[:n], P[n:2 * n], P[2 * n:]) if peep else (0, 0, 0)
        i, si = f(pre[:, :n] + pi * c)
        if input_forget:
            fg, sf = 1 - i, None
        else:
            fg, sf = f(pre[:, 2 * n:3 * n] + pf * c)
        cand, sc = g(pre[:, 3 * n:])
        new_c = fg * c + i * cand
        o, so = f(pre[:, n:2 * n] + po * new_c)
        hc, shc = hf(new_c)
        return [o * hc, new_c], (h, c, i, si, fg, sf, cand, sc, new_c, o, so, hc, shc)

    def backward(saved, dstate, R, rb, acc):
        h, c, i, si, fg, sf, cand, sc, new_c, o, so, hc, shc = saved
        n = h.shape[1]
        dh_new, dc_new = dstate
        dvo = f.grad(dh_new * hc, o, so)
        dc = dc_new + hf.grad(dh_new * o, hc, shc)
        if peep:
            dc = dc + dvo * P[n:2 * n]
            acc["P"][n:2 * n] += (dvo * new_c).sum(axis=0)
        dc_old = dc * fg
        di = dc * cand
        dvc = g.grad(dc * i, cand, sc)
        if input_forget:
            di = di - dc * c
            dvf = xp.zeros_like(dvo)
        else:
            dvf = f.grad(dc * c, fg, sf)
        dvi = f.grad(di, i, si)
        if peep:
            dc_old = dc_old + dvi * P[:n] + dvf * P[2 * n:]
            acc["P"][:n] += (dvi * c).sum(axis=0)
            acc["P"][2 * n:] += (dvf * c).sum(axis=0)
        dpre = xp.concatenate([dvi, dvo, dvf, dvc], axis=1)
        acc["R"] += dpre.T @ h
        acc["rb"] += dpre.sum(axis=0)
        return dpre, [dpre @ R, dc_old]

    return forward, backward


_CELLS = {"RNN": (_rnn_cell, 1, ("Tanh",)), "GRU": (_gru_cell, 3, ("Sigmoid", "Tanh")),
          "LSTM": (_lstm_cell, 4, ("Sigmoid", "Tanh", "Tanh"))}


# -- the driver ---------------------------------------------------------------------------------
class _Layer:
    """One recurrent node's inputs, in time-major layout, and its cells per direction."""

    def __init__(self, xp, kind, X, W, R, B, sequence_lens, states, P, attrs):
        make, self.gates, default_acts = _CELLS[kind]
        self.xp, self.layout = xp, int(attrs.get("layout") or 0)
        direction = attrs.get("direction") or "forward"
        if isinstance(direction, bytes):
            direction = direction.decode()
        self.n_dir = 2 if direction == "bidirectional" else 1
        if W.shape[0] != self.n_dir:
            raise ModelError(f"recurrent layer: W has {W.shape[0]} directions, direction is "
                             f"{direction!r}")
        self.reverse = [direction == "reverse" or d == 1 for d in range(self.n_dir)]
        if self.layout:
            X = xp.swapaxes(X, 0, 1)
            states = [None if s is None else xp.swapaxes(s, 0, 1) for s in states]
        self.X, self.W, self.R, self.B, self.P = X, W, R, B, P
        self.steps, self.batch, _ = X.shape
        self.hidden = attrs.get("hidden_size") or R.shape[-1]
        self.lens = None if sequence_lens is None else \
            [int(v) for v in sequence_lens.reshape(-1).tolist()]
        dtype = X.dtype
        self.states = [[xp.zeros((self.batch, self.hidden), dtype=dtype) if s is None else s[d]
                        for s in states] for d in range(self.n_dir)]
        acts = _activations(xp, attrs.get("activations"), default_acts, self.n_dir,
                            attrs.get("activation_alpha"), attrs.get("activation_beta"))
        clip = attrs.get("clip")
        options = {k: attrs.get(k) or 0 for k in ("linear_before_reset", "input_forget")}
        self.cells = [make(xp, [_Gate(xp, a, clip) for a in acts[d]],
                           P=None if P is None else P[d], **options) for d in range(self.n_dir)]

    def bias(self, d):
        size = self.gates * self.hidden
        if self.B is None:
            return self.xp.zeros(2 * size, dtype=self.X.dtype)
        return self.B[d]

    def order(self, d):
        """Per step: (the time index of each batch item, or one index for all; the
        alive mask (batch, 1), or None)."""
        xp, steps, batch = self.xp, self.steps, self.batch
        for t in range(steps):
            if self.lens is None:
                yield (steps - 1 - t if self.reverse[d] else t), None
            else:  # per batch item: reverse within its own length
                index = [(n - 1 - t if self.reverse[d] else t) if t < n else 0 for n in self.lens]
                alive = xp.asarray([t < n for n in self.lens]).reshape(batch, 1)
                yield (xp.asarray(index), xp.arange(batch)), alive

    def run(self, keep=False):
        """Y (steps, dirs, batch, hidden), the final states (dirs, batch, hidden), and
        with ``keep`` each direction's saved steps."""
        xp = self.xp
        ys, finals, tapes = [], [[] for _ in self.states[0]], []
        for d in range(self.n_dir):
            forward, _ = self.cells[d]
            bias = self.bias(d)
            size = self.gates * self.hidden
            xw = self.X @ self.W[d].T + bias[:size]
            rb = bias[size:]
            state = self.states[d]
            y = xp.zeros((self.steps, self.batch, self.hidden), dtype=self.X.dtype)
            tape = []
            for index, alive in self.order(d):
                new, saved = forward(xw[index], state, self.R[d], rb)
                if keep:
                    tape.append((index, alive, saved))
                if alive is not None:
                    new = [xp.where(alive, n_, s_) for n_, s_ in zip(new, state)]
                    y[index] = xp.where(alive, new[0], y[index])  # finished items write nothing
                else:
                    y[index] = new[0]
                state = new
            ys.append(y)
            tapes.append(tape)
            for k, s in enumerate(state):
                finals[k].append(s)
        return xp.stack(ys, axis=1), [xp.stack(f) for f in finals], tapes

    def outputs(self, Y, finals):
        xp = self.xp
        if self.layout:
            return (xp.transpose(Y, (2, 0, 1, 3)),) + tuple(xp.swapaxes(f, 0, 1) for f in finals)
        return (Y,) + tuple(finals)

    def gradients(self, dY, dfinals):
        """Backpropagation through time: dX, dW, dR, dB, the initial states' and dP."""
        xp = self.xp
        if self.layout:
            dY = None if dY is None else xp.transpose(dY, (1, 2, 0, 3))
            dfinals = [None if g is None else xp.swapaxes(g, 0, 1) for g in dfinals]
        _, _, tapes = self.run(keep=True)
        dtype, size = self.X.dtype, self.gates * self.hidden
        dX = xp.zeros_like(self.X)
        dW, dR = xp.zeros_like(self.W), xp.zeros_like(self.R)
        dB = xp.zeros((self.n_dir, 2 * size), dtype=dtype)
        dP = None if self.P is None else xp.zeros_like(self.P)
        dstates = []
        for d in range(self.n_dir):
            _, backward = self.cells[d]
            R, rb = self.R[d], self.bias(d)[size:]
            dxw = xp.zeros((self.steps, self.batch, size), dtype=dtype)
            acc = {"R": dR[d], "rb": dB[d, size:], "P": None if dP is None else dP[d]}
            dstate = [xp.zeros((self.batch, self.hidden), dtype=dtype) if g is None else
                      g[d].copy() for g in dfinals]
            for index, alive, saved in reversed(tapes[d]):
                dnew = list(dstate)
                if dY is not None:
                    dy = dY[index, d] if alive is None else \
                        xp.where(alive, dY[index[0], d, index[1]], 0)
                    dnew[0] = dnew[0] + dy
                if alive is not None:  # finished items: their state passes through
                    dnew = [xp.where(alive, g, 0) for g in dnew]
                dx, dold = backward(saved, dnew, R, rb, acc)
                if alive is not None:
                    dold = [xp.where(alive, g_old, g) for g_old, g in zip(dold, dstate)]
                    dxw[index] += xp.where(alive, dx, 0)
                else:
                    dxw[index] += dx
                dstate = dold
            dX += dxw @ self.W[d]
            dW[d] = xp.einsum("tbg,tbi->gi", dxw, self.X)
            dB[d, :size] = dxw.sum(axis=(0, 1))
            dstates.append(dstate)
        dinit = [xp.stack([dstates[d][k] for d in range(self.n_dir)])
                 for k in range(len(dstates[0]))]
        if self.layout:
            dX = xp.swapaxes(dX, 0, 1)
            dinit = [xp.swapaxes(g, 0, 1) for g in dinit]
        return dX, dW, dR, dB, dinit, dP


# -- the ops ------------------------------------------------------------------------------------
_STATES = {"RNN": 1, "GRU": 1, "LSTM": 2}


def _forward(xp, kind, X, W, R, B, sequence_lens, states, P, attrs):
    layer = _Layer(xp, kind, X, W, R, B, sequence_lens, states, P, attrs)
    Y, finals, _ = layer.run()
    return layer.outputs(Y, finals)


@op("RNN", since=7, differentiable=("X", "W", "R", "B", "initial_h"))
def RNN(xp, X, W, R, B=None, sequence_lens=None, initial_h=None, *, activation_alpha=None,
        activation_beta=None, activations=None, clip=None, direction="forward",
        hidden_size=None, layout=0):
    return _forward(xp, "RNN", X, W, R, B, sequence_lens, [initial_h], None, dict(
        activation_alpha=activation_alpha, activation_beta=activation_beta,
        activations=activations, clip=clip, direction=direction, hidden_size=hidden_size,
        layout=layout))


@op("GRU", since=7, differentiable=("X", "W", "R", "B", "initial_h"))
def GRU(xp, X, W, R, B=None, sequence_lens=None, initial_h=None, *, activation_alpha=None,
        activation_beta=None, activations=None, clip=None, direction="forward",
        hidden_size=None, layout=0, linear_before_reset=0):
    return _forward(xp, "GRU", X, W, R, B, sequence_lens, [initial_h], None, dict(
        activation_alpha=activation_alpha, activation_beta=activation_beta,
        activations=activations, clip=clip, direction=direction, hidden_size=hidden_size,
        layout=layout, linear_before_reset=linear_before_reset))


@op("LSTM", since=7, differentiable=("X", "W", "R", "B", "initial_h", "initial_c", "P"))
def LSTM(xp, X, W, R, B=None, sequence_lens=None, initial_h=None, initial_c=None, P=None, *,
         activation_alpha=None, activation_beta=None, activations=None, clip=None,
         direction="forward", hidden_size=None, input_forget=0, layout=0):
    return _forward(xp, "LSTM", X, W, R, B, sequence_lens, [initial_h, initial_c], P, dict(
        activation_alpha=activation_alpha, activation_beta=activation_beta,
        activations=activations, clip=clip, direction=direction, hidden_size=hidden_size,
        layout=layout, input_forget=input_forget))


def _rule(g, node, dY=None, dY_h=None, dY_c=None):
    kind = node.op_type
    ins = list(node.inputs) + [""] * (8 - len(node.inputs))  # X W R B lens h0 [c0 P]
    attrs = {k: v for k, v in node.attrs.items() if v is not None}
    n_out = 5 + 2 * (kind == "LSTM")
    grads = g.private(f"{kind}Grad", dY, dY_h, dY_c if kind == "LSTM" else None,
                      *ins[:6 + 2 * (kind == "LSTM")], num_outputs=n_out,
                      dtype=g.dtype(node.inputs[0]), **attrs)
    # Inputs X W R B sequence_lens initial_h [initial_c P]; sequence_lens has none.
    out = [grads[0], grads[1], grads[2], grads[3], None, grads[4]] + list(grads[5:])
    return tuple(out[:len(node.inputs)])


for _definition in (RNN, GRU, LSTM):
    _definition.gradient(_rule)


def _backward(xp, kind, dY, dfinals, X, W, R, B, sequence_lens, states, P, attrs):
    layer = _Layer(xp, kind, X, W, R, B, sequence_lens, states, P, attrs)
    dX, dW, dR, dB, dinit, dP = layer.gradients(dY, dfinals)
    return (dX, dW, dR, None if B is None else dB) + tuple(dinit) + ((dP,) if kind == "LSTM" else ())


@op("RNNGrad", domain="onnxgrad")
def RNNGrad(xp, dY, dY_h, dY_c, X, W, R, B=None, sequence_lens=None, initial_h=None, *,
            activation_alpha=None, activation_beta=None, activations=None, clip=None,
            direction="forward", hidden_size=None, layout=0):
    """Gradients of RNN for X, W, R, B and initial_h."""
    return _backward(xp, "RNN", dY, [dY_h], X, W, R, B, sequence_lens, [initial_h], None, dict(
        activation_alpha=activation_alpha, activation_beta=activation_beta,
        activations=activations, clip=clip, direction=direction, hidden_size=hidden_size,
        layout=layout))


@op("GRUGrad", domain="onnxgrad")
def GRUGrad(xp, dY, dY_h, dY_c, X, W, R, B=None, sequence_lens=None, initial_h=None, *,
            activation_alpha=None, activation_beta=None, activations=None, clip=None,
            direction="forward", hidden_size=None, layout=0, linear_before_reset=0):
    """Gradients of GRU for X, W, R, B and initial_h."""
    return _backward(xp, "GRU", dY, [dY_h], X, W, R, B, sequence_lens, [initial_h], None, dict(
        activation_alpha=activation_alpha, activation_beta=activation_beta,
        activations=activations, clip=clip, direction=direction, hidden_size=hidden_size,
        layout=layout, linear_before_reset=linear_before_reset))


@op("LSTMGrad", domain="onnxgrad")
def LSTMGrad(xp, dY, dY_h, dY_c, X, W, R, B=None, sequence_lens=None, initial_h=None,
             initial_c=None, P=None, *, activation_alpha=None, activation_beta=None,
             activations=None, clip=None, direction="forward", hidden_size=None, input_forget=0,
             layout=0):
    """Gradients of LSTM for X, W, R, B, initial_h, initial_c and P."""
    return _backward(xp, "LSTM", dY, [dY_h, dY_c], X, W, R, B, sequence_lens,
                     [initial_h, initial_c], P, dict(
                         activation_alpha=activation_alpha, activation_beta=activation_beta,
                         activations=activations, clip=clip, direction=direction,
                         hidden_size=hidden_size, layout=layout, input_forget=input_forget))


# -- standard forms: backpropagation through time unrolled into standard ops ---------------------
# The kernel's arithmetic step by step, one set of nodes per time step (the number of steps
# must be static): the forward recurrence again, keeping each step's gate values, then the
# backward walk.  ``sequence_lens`` is a per-item permutation of the steps (reversed within
# each length, an involution) applied with GatherElements, and the alive masks with Where.

def _std_activation(g, name, alpha, beta, like):
    """``(f, df)`` in standard ops, as :func:`_activation`; None for an unknown name."""
    name = name.lower()
    parameters = _parameters(name, alpha, beta)
    if parameters is None:
        return None
    a, b = map(float, parameters)

    def c(v):
        return g.scalar(v, like=like)

    def mask(cond):
        return g.Cast(cond, to=std.tensor_type(g.dtype(like)), dtype=g.dtype(like))

    fns = {
        "relu": (lambda x: g.Relu(x), lambda x, y: mask(g.Greater(x, c(0.0)))),
        "tanh": (lambda x: g.Tanh(x), lambda x, y: g.Sub(c(1.0), g.Mul(y, y))),
        "sigmoid": (lambda x: g.Sigmoid(x), lambda x, y: g.Mul(y, g.Sub(c(1.0), y))),
        "affine": (lambda x: g.Add(g.Mul(c(a), x), c(b)), lambda x, y: c(a)),
        "leakyrelu": (lambda x: g.Where(g.GreaterOrEqual(x, c(0.0)), x, g.Mul(c(a), x)),
                      lambda x, y: g.Where(g.GreaterOrEqual(x, c(0.0)), c(1.0), c(a))),
        "thresholdedrelu": (lambda x: g.Where(g.Greater(x, c(a)), x, c(0.0)),
                            lambda x, y: mask(g.Greater(x, c(a)))),
        "scaledtanh": (lambda x: g.Mul(c(a), g.Tanh(g.Mul(c(b), x))),
                       lambda x, y: g.Mul(c(a * b), g.Sub(c(1.0), g.Mul(
                           *(2 * [g.Tanh(g.Mul(c(b), x))]))))),
        "hardsigmoid": (lambda x: g.Clip(g.Add(g.Mul(c(a), x), c(b)), c(0.0), c(1.0)),
                        lambda x, y: _std_hardsigmoid_df(g, x, c(a), c(b), c)),
        "elu": (lambda x: g.Where(g.GreaterOrEqual(x, c(0.0)), x,
                                  g.Mul(c(a), g.Sub(g.Exp(x), c(1.0)))),
                lambda x, y: g.Where(g.GreaterOrEqual(x, c(0.0)), c(1.0), g.Add(y, c(a)))),
        "softsign": (lambda x: g.Div(x, g.Add(c(1.0), g.Abs(x))),
                     lambda x, y: g.Div(c(1.0), g.Mul(*(2 * [g.Add(c(1.0), g.Abs(x))])))),
        "softplus": (lambda x: g.Log(g.Add(g.Exp(x), c(1.0))), lambda x, y: g.Sigmoid(x)),
    }
    return fns[name]


def _std_hardsigmoid_df(g, x, a, b, c):
    w = g.Add(g.Mul(a, x), b)
    return g.Where(g.And(g.Greater(w, c(0.0)), g.Less(w, c(1.0))), a, c(0.0))


class _StdGate:
    """:class:`_Gate` in standard ops."""

    def __init__(self, g, act, clip, like):
        self.g, (self.f, self.df), self.clip, self.like = g, act, clip, like

    def __call__(self, v):
        g = self.g
        u = v if self.clip is None else g.Clip(v, g.scalar(-self.clip, like=self.like),
                                               g.scalar(self.clip, like=self.like))
        return self.f(u), (v, u)

    def unclipped(self):
        return _StdGate(self.g, (self.f, self.df), None, self.like)

    def grad(self, dy, y, saved):
        g = self.g
        v, u = saved
        dv = g.Mul(dy, self.df(u, y))
        if self.clip is not None:
            keep = g.LessOrEqual(g.Abs(v), g.scalar(self.clip, like=self.like))
            dv = g.Mul(dv, std.cast_like(g, keep, self.like))
        return dv


class _StdOps:
    """Static slices, sums and products of one direction's weights."""

    def __init__(self, g):
        self.g = g

    def cols(self, x, start, end):
        return self.g.Slice(x, self.g.ints([start]), self.g.ints([end]), self.g.ints([1]))

    def rows(self, x, start, end):
        return self.g.Slice(x, self.g.ints([start]), self.g.ints([end]), self.g.ints([0]))

    def colsum(self, x):  # x.sum(axis=0)
        return self.g.ReduceSum(x, self.g.ints([0]), keepdims=0)

    def outer(self, dv, h):  # dv.T @ h
        return self.g.MatMul(self.g.Transpose(dv, perm=[1, 0]), h)

    def mmT(self, h, R):  # h @ R.T
        return self.g.MatMul(h, self.g.Transpose(R, perm=[1, 0]))


def _std_rnn_cell(g, s, gates, n, R, rb, P=None, **_):
    (act,) = gates

    def forward(x_t, state):
        (h,) = state
        y, sv = act(_add_bias(g, g.Add(x_t, s.mmT(h, R)), rb))
        return [y], (h, y, sv)

    def backward(saved, dstate, acc):
        h, y, sv = saved
        dv = act.grad(dstate[0], y, sv)
        acc["R"].append(s.outer(dv, h))
        acc["rb"].append(s.colsum(dv))
        return dv, [g.MatMul(dv, R)]

    return forward, backward


def _std_gru_cell(g, s, gates, n, R, rb, P=None, linear_before_reset=0, **_):
    f, gg = gates
    Rz, Rr, Rh, Rzr = s.rows(R, 0, n), s.rows(R, n, 2 * n), s.rows(R, 2 * n, 3 * n), \
        s.rows(R, 0, 2 * n)
    rbz, rbr, rbh = [None if rb is None else s.rows(rb, k * n, (k + 1) * n) for k in range(3)]

    def forward(x_t, state):
        (h,) = state
        z, sz = f(_add_bias(g, g.Add(s.cols(x_t, 0, n), s.mmT(h, Rz)), rbz))
        r, sr = f(_add_bias(g, g.Add(s.cols(x_t, n, 2 * n), s.mmT(h, Rr)), rbr))
        if linear_before_reset:
            q = _add_bias(g, s.mmT(h, Rh), rbh)
            cand, sc = gg(g.Add(s.cols(x_t, 2 * n, 3 * n), g.Mul(r, q)))
        else:
            q = g.Mul(r, h)
            cand, sc = gg(_add_bias(g, g.Add(s.cols(x_t, 2 * n, 3 * n), s.mmT(q, Rh)), rbh))
        one = g.scalar(1.0, like=h)
        new = g.Add(g.Mul(g.Sub(one, z), cand), g.Mul(z, h))
        return [new], (h, z, sz, r, sr, q, cand, sc)

    def backward(saved, dstate, acc):
        h, z, sz, r, sr, q, cand, sc = saved
        (dnew,) = dstate
        one = g.scalar(1.0, like=h)
        dvc = gg.grad(g.Mul(dnew, g.Sub(one, z)), cand, sc)
        dh = g.Mul(dnew, z)
        if linear_before_reset:
            dr = g.Mul(dvc, q)
            dq = g.Mul(dvc, r)
            acc["Rh"].append(s.outer(dq, h))
            acc["rbh"].append(s.colsum(dq))
            dh = g.Add(dh, g.MatMul(dq, Rh))
        else:
            drh = g.MatMul(dvc, Rh)
            acc["Rh"].append(s.outer(dvc, q))
            acc["rbh"].append(s.colsum(dvc))
            dr = g.Mul(drh, h)
            dh = g.Add(dh, g.Mul(drh, r))
        dvz = f.grad(g.Mul(dnew, g.Sub(h, cand)), z, sz)
        dvr = f.grad(dr, r, sr)
        dzr = g.Concat(dvz, dvr, axis=1)
        acc["Rzr"].append(s.outer(dzr, h))
        acc["rbzr"].append(s.colsum(dzr))
        dh = g.Add(dh, g.MatMul(dzr, Rzr))
        return g.Concat(dzr, dvc, axis=1), [dh]

    return forward, backward


def _std_lstm_cell(g, s, gates, n, R, rb, P=None, input_forget=0, **_):
    f, gg, hf = gates
    hf = hf.unclipped()
    peep = P is not None
    if peep:
        pi, po, pf = s.rows(P, 0, n), s.rows(P, n, 2 * n), s.rows(P, 2 * n, 3 * n)

    def forward(x_t, state):
        h, c = state
        pre = _add_bias(g, g.Add(x_t, s.mmT(h, R)), rb)
        gi, go, gf, gc = [s.cols(pre, k * n, (k + 1) * n) for k in range(4)]
        i, si = f(g.Add(gi, g.Mul(pi, c)) if peep else gi)
        if input_forget:
            fg, sf = g.Sub(g.scalar(1.0, like=h), i), None
        else:
            fg, sf = f(g.Add(gf, g.Mul(pf, c)) if peep else gf)
        cand, sc = gg(gc)
        new_c = g.Add(g.Mul(fg, c), g.Mul(i, cand))
        o, so = f(g.Add(go, g.Mul(po, new_c)) if peep else go)
        hc, shc = hf(new_c)
        return [g.Mul(o, hc), new_c], (h, c, i, si, fg, sf, cand, sc, new_c, o, so, hc, shc)

    def backward(saved, dstate, acc):
        h, c, i, si, fg, sf, cand, sc, new_c, o, so, hc, shc = saved
        dh_new, dc_new = dstate
        dvo = f.grad(g.Mul(dh_new, hc), o, so)
        dc = g.Add(dc_new, hf.grad(g.Mul(dh_new, o), hc, shc))
        if peep:
            dc = g.Add(dc, g.Mul(dvo, po))
            acc["Po"].append(s.colsum(g.Mul(dvo, new_c)))
        dc_old = g.Mul(dc, fg)
        di = g.Mul(dc, cand)
        dvc = gg.grad(g.Mul(dc, i), cand, sc)
        if input_forget:
            di = g.Sub(di, g.Mul(dc, c))
            dvf = g.Mul(dvo, g.scalar(0.0, like=h))
        else:
            dvf = f.grad(g.Mul(dc, c), fg, sf)
        dvi = f.grad(di, i, si)
        if peep:
            dc_old = g.Add(g.Add(dc_old, g.Mul(dvi, pi)), g.Mul(dvf, pf))
            acc["Pi"].append(s.colsum(g.Mul(dvi, c)))
            acc["Pf"].append(s.colsum(g.Mul(dvf, c)))
        dpre = g.Concat(dvi, dvo, dvf, dvc, axis=1)
        acc["R"].append(s.outer(dpre, h))
        acc["rb"].append(s.colsum(dpre))
        return dpre, [g.MatMul(dpre, R), dc_old]

    return forward, backward


def _add_bias(g, x, b):
    return x if b is None else g.Add(x, b)


_STD_CELLS = {"RNN": _std_rnn_cell, "GRU": _std_gru_cell, "LSTM": _std_lstm_cell}


def _sum_chain(g, parts):
    """``0 + parts[0] + parts[1] + …`` in that order (the kernel's ``+=``)."""
    total = parts[0]
    for p in parts[1:]:
        total = g.Add(total, p)
    return total


def _std_backward(kind, g, node):
    n_states = _STATES[kind]
    ins = list(node.inputs) + [""] * (11 - len(node.inputs))
    dY, dfinals, (X, W, R, B, lens) = ins[0], ins[1:1 + n_states], ins[3:8]
    states = ins[8:8 + n_states]
    P = ins[10] if kind == "LSTM" else ""
    a = {k: v for k, v in node.attrs.items() if v is not None}
    layout = int(a.get("layout") or 0)
    direction = a.get("direction") or "forward"
    if isinstance(direction, bytes):
        direction = direction.decode()
    n_dir = 2 if direction == "bidirectional" else 1
    xshape = std.tensor_shape(g, X)
    rshape = std.tensor_shape(g, R)
    if xshape is None or len(xshape) != 3 or rshape is None or len(rshape) != 3:
        return None
    steps = xshape[1 if layout else 0]
    hidden = a.get("hidden_size") or rshape[-1]
    if not isinstance(steps, int) or not isinstance(hidden, int) or rshape[0] != n_dir:
        return None
    n_gates = _CELLS[kind][1]
    size = n_gates * hidden
    names = a.get("activations")
    names = [v.decode() if isinstance(v, bytes) else v for v in names] if names else \
        list(_CELLS[kind][2]) * n_dir
    k = len(_CELLS[kind][2])
    if len(names) == k and n_dir == 2:
        names = names * 2
    if len(names) != k * n_dir:
        return None
    alpha, beta = list(a.get("activation_alpha") or []), list(a.get("activation_beta") or [])
    acts = [_std_activation(g, name, alpha, beta, X) for name in names]
    if any(x is None for x in acts):
        return None
    clip = a.get("clip")
    clip = None if clip is None else float(clip)
    options = {k_: int(a.get(k_) or 0) for k_ in ("linear_before_reset", "input_forget")}
    s = _StdOps(g)

    def swap(v):
        return v if not v or not layout else g.Transpose(v, perm=[1, 0, 2])

    Xt = swap(X)
    states = [swap(v) for v in states]
    dfinals = [swap(v) for v in dfinals]
    if dY and layout:
        dY = g.Transpose(dY, perm=[1, 2, 0, 3])
    zero_state = std.zeros(g, g.Concat(g.Slice(g.Shape(Xt, dtype="int64"), g.ints([1]),
                                                   g.ints([2]), g.ints([0])),
                                           g.ints([hidden]), axis=0, dtype="int64"), X)
    zero = g.scalar(0.0, like=X)
    if lens:
        lens64 = g.Cast(lens, to=std.tensor_type(np.int64), dtype="int64")
        lens_row = g.Unsqueeze(lens64, g.ints([0]))  # (1, batch)
        t_col = g.const(np.arange(steps, dtype=np.int64).reshape(steps, 1))
        inside = g.Less(t_col, lens_row)  # (steps, batch)
        forwards = g.Add(t_col, g.Mul(lens_row, g.ints([0])))  # t, (steps, batch)
        # reversed within each item's length; past it t, a step whose values are masked
        backwards = g.Where(inside, g.Sub(g.Sub(lens_row, g.ints([1])), t_col), forwards)

    def permute(v, index):
        """v (steps, batch, width) with v[index[t, b], b] at [t, b]."""
        where = g.Expand(g.Unsqueeze(index, g.ints([2])), g.Shape(v, dtype="int64"))
        return g.GatherElements(v, where, axis=0)

    def step(v, t):
        return g.Gather(v, std.i64(g, t), axis=0)

    dX, dWs, dRs, dBs, dPs, dinits = None, [], [], [], [], []
    for d in range(n_dir):
        reverse = direction == "reverse" or d == 1
        Wd, Rd = step(W, d), step(R, d)
        Bd = step(B, d) if B else None
        Pd = step(P, d) if P else None
        bias_w = None if Bd is None else s.rows(Bd, 0, size)
        rb = None if Bd is None else s.rows(Bd, size, 2 * size)
        gates = [_StdGate(g, act, clip, X) for act in acts[d * k:(d + 1) * k]]
        forward, backward = _STD_CELLS[kind](g, s, gates, hidden, Rd, rb, P=Pd, **options)
        xw = _add_bias(g, s.mmT(Xt, Wd), bias_w)
        dy_d = g.Gather(dY, std.i64(g, d), axis=1) if dY else None  # (steps, batch, hidden)
        index = None
        if lens:
            index = backwards if reverse else forwards
            xw = permute(xw, index)
            if dy_d:
                dy_d = permute(dy_d, index)
        order = [steps - 1 - t if reverse and not lens else t for t in range(steps)]
        state = [step(v, d) if v else zero_state for v in states]
        tape = []
        for t in range(steps):
            x_t = step(xw, order[t])
            new, saved = forward(x_t, state)
            alive = g.Unsqueeze(g.Less(std.i64(g, t), lens64), g.ints([1])) if lens else None
            if alive is not None:
                new = [g.Where(alive, n_, s_) for n_, s_ in zip(new, state)]
            tape.append((t, alive, saved))
            state = new
        acc = {key: [] for key in ("R", "rb", "Rh", "rbh", "Rzr", "rbzr", "Pi", "Po", "Pf")}
        dstate = [step(v, d) if v else zero_state for v in dfinals]
        dxs = [None] * steps
        for t, alive, saved in reversed(tape):
            dnew = list(dstate)
            if dy_d:
                dy = step(dy_d, order[t])
                if alive is not None:
                    dy = g.Where(alive, dy, zero)
                dnew[0] = g.Add(dnew[0], dy)
            if alive is not None:
                dnew = [g.Where(alive, v, zero) for v in dnew]
            dx, dold = backward(saved, dnew, acc)
            if alive is not None:
                dold = [g.Where(alive, v_old, v) for v_old, v in zip(dold, dstate)]
                dx = g.Where(alive, dx, zero)
            dxs[order[t]] = g.Unsqueeze(dx, g.ints([0]))
            dstate = dold
        dxw = g.Concat(*dxs, axis=0) if steps > 1 else dxs[0]
        if lens:
            dxw = permute(dxw, index)
        part = g.MatMul(dxw, Wd)
        dX = part if dX is None else g.Add(dX, part)
        dWs.append(g.Einsum(dxw, Xt, equation="tbg,tbi->gi"))
        if kind == "GRU":
            dR = g.Concat(_sum_chain(g, acc["Rzr"]), _sum_chain(g, acc["Rh"]), axis=0)
            drb = g.Concat(_sum_chain(g, acc["rbzr"]), _sum_chain(g, acc["rbh"]), axis=0)
        else:
            dR, drb = _sum_chain(g, acc["R"]), _sum_chain(g, acc["rb"])
        dRs.append(dR)
        dBs.append(g.Concat(g.ReduceSum(dxw, g.ints([0, 1]), keepdims=0), drb, axis=0))
        if P:
            dPs.append(g.Concat(*(_sum_chain(g, acc[key]) for key in ("Pi", "Po", "Pf")), axis=0))
        dinits.append(dstate)

    def stack(values):
        return g.Concat(*(g.Unsqueeze(v, g.ints([0])) for v in values), axis=0)

    dX = swap(dX)
    dinit = [swap(stack([dinits[d][j] for d in range(n_dir)])) for j in range(n_states)]
    out = [dX, stack(dWs), stack(dRs), stack(dBs) if B else None] + dinit
    if kind == "LSTM":
        out.append(stack(dPs) if P else None)
    return out


@RNNGrad.in_standard_ops
def _(g, node):
    return _std_backward("RNN", g, node)


@GRUGrad.in_standard_ops
def _(g, node):
    return _std_backward("GRU", g, node)


@LSTMGrad.in_standard_ops
def _(g, node):
    return _std_backward("LSTM", g, node)
