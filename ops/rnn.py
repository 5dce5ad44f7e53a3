"""Recurrent layers: RNN, GRU and LSTM (forward, reverse, bidirectional; ``layout`` 0
and 1; ``sequence_lens``; ``clip``; custom activations; LSTM peepholes and
``input_forget``).

One driver runs a cell over time for each direction; the input projection of
every step is one matmul up front.  Steps past a sequence's length leave its
state unchanged and write zeros to ``Y``.  Forward kernels only: asking for a
gradient through these ops raises UnsupportedOpError.
"""

from __future__ import annotations

from onnxgrad.errors import ModelError
from onnxgrad.ops.registry import op


# -- activations (ONNX's names; alpha/beta consumed in order by those that take them) ---------
def _activation(xp, name: str, alpha, beta):
    name = name.lower()
    table = {
        "relu": (0, lambda x, a, b: xp.maximum(x, 0)),
        "tanh": (0, lambda x, a, b: xp.tanh(x)),
        "sigmoid": (0, lambda x, a, b: 1 / (1 + xp.exp(-x))),
        "affine": (2, lambda x, a, b: a * x + b),
        "leakyrelu": (1, lambda x, a, b: xp.where(x >= 0, x, a * x)),
        "thresholdedrelu": (1, lambda x, a, b: xp.where(x > a, x, 0)),
        "scaledtanh": (2, lambda x, a, b: a * xp.tanh(b * x)),
        "hardsigmoid": (2, lambda x, a, b: xp.clip(a * x + b, 0, 1)),
        "elu": (1, lambda x, a, b: xp.where(x >= 0, x, a * (xp.exp(x) - 1))),
        "softsign": (0, lambda x, a, b: x / (1 + xp.abs(x))),
        "softplus": (0, lambda x, a, b: xp.log1p(xp.exp(x))),
    }
    if name not in table:
        raise ModelError(f"recurrent layer: unknown activation {name!r}")
    n_params, fn = table[name]
    defaults = {"leakyrelu": (0.01, 0.0), "thresholdedrelu": (1.0, 0.0), "elu": (1.0, 0.0),
                "hardsigmoid": (0.2, 0.5), "affine": (1.0, 0.0), "scaledtanh": (1.0, 1.0)}
    a, b = defaults.get(name, (0.0, 0.0))
    if n_params >= 1 and alpha:
        a = alpha.pop(0)
    if n_params >= 2 and beta:
        b = beta.pop(0)
    return lambda x: fn(x, a, b)


def _activations(xp, names, defaults, n_dir, alpha, beta):
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


# -- the driver ---------------------------------------------------------------------------------
def _run(xp, cell, X, W, R, B, sequence_lens, states, *, direction, hidden_size, layout, gates,
         extra=None):
    """Run ``cell`` over time in each direction; returns Y and the final states."""
    if layout:
        X = xp.swapaxes(X, 0, 1)
        states = [None if s is None else xp.swapaxes(s, 0, 1) for s in states]
    steps, batch, _ = X.shape
    n_dir = 2 if direction == "bidirectional" else 1
    if W.shape[0] != n_dir:
        raise ModelError(f"recurrent layer: W has {W.shape[0]} directions, direction is "
                         f"{direction!r}")
    hidden = hidden_size or R.shape[-1]
    lens = None if sequence_lens is None else [int(v) for v in sequence_lens.reshape(-1).tolist()]
    dtype = X.dtype
    ys, finals = [], [[] for _ in states]
    for d in range(n_dir):
        reverse = direction == "reverse" or d == 1
        bias = xp.zeros(2 * gates * hidden, dtype=dtype) if B is None else B[d]
        xw = xp.matmul(X, W[d].T) + bias[:gates * hidden]
        rb = bias[gates * hidden:]
        state = [xp.zeros((batch, hidden), dtype=dtype) if s is None else s[d] for s in states]
        y = xp.zeros((steps, batch, hidden), dtype=dtype)
        for t in range(steps):
            if lens is None:
                index = steps - 1 - t if reverse else t
                x_t = xw[index]
            else:  # per batch item: reverse within its own length
                index = [(n - 1 - t if reverse else t) if t < n else 0 for n in lens]
                x_t = xw[xp.asarray(index), xp.arange(batch)]
            new = cell(x_t, state, R[d], rb, d, extra)
            if lens is not None:
                alive = xp.asarray([t < n for n in lens]).reshape(batch, 1)
                new = [xp.where(alive, n_, s_) for n_, s_ in zip(new, state)]
                out = xp.where(alive, new[0], 0)
                for b, i in enumerate(index):
                    if t < lens[b]:
                        y[i, b] = out[b]
            else:
                y[index] = new[0]
            state = new
        ys.append(y)
        for k, s in enumerate(state):
            finals[k].append(s)
    Y = xp.stack(ys, axis=1)  # [steps, dirs, batch, hidden]
    finals = [xp.stack(f) for f in finals]  # [dirs, batch, hidden]
    if layout:
        Y = xp.transpose(Y, (2, 0, 1, 3))
        finals = [xp.swapaxes(f, 0, 1) for f in finals]
    return (Y,) + tuple(finals)


def _clipper(xp, clip):
    if clip is None:
        return lambda v: v
    return lambda v: xp.clip(v, -clip, clip)


# -- RNN ----------------------------------------------------------------------------------------
@op("RNN", since=7, differentiable=("X", "W", "R", "B", "initial_h"))
def RNN(xp, X, W, R, B=None, sequence_lens=None, initial_h=None, *, activation_alpha=None,
        activation_beta=None, activations=None, clip=None, direction="forward",
        hidden_size=None, layout=0):
    n_dir = 2 if direction == "bidirectional" else 1
    acts = _activations(xp, activations, ("Tanh",), n_dir, activation_alpha, activation_beta)
    c = _clipper(xp, clip)

    def cell(x_t, state, R_d, rb, d, extra):
        (h,) = state
        return [acts[d][0](c(x_t + xp.matmul(h, R_d.T) + rb))]

    return _run(xp, cell, X, W, R, B, sequence_lens, [initial_h], direction=direction,
                hidden_size=hidden_size, layout=layout, gates=1)


# -- GRU ----------------------------------------------------------------------------------------
@op("GRU", since=7, differentiable=("X", "W", "R", "B", "initial_h"))
def GRU(xp, X, W, R, B=None, sequence_lens=None, initial_h=None, *, activation_alpha=None,
        activation_beta=None, activations=None, clip=None, direction="forward",
        hidden_size=None, layout=0, linear_before_reset=0):
    n_dir = 2 if direction == "bidirectional" else 1
    acts = _activations(xp, activations, ("Sigmoid", "Tanh"), n_dir, activation_alpha,
                        activation_beta)
    c = _clipper(xp, clip)

    def cell(x_t, state, R_d, rb, d, extra):
        (h,) = state
        f, g = acts[d]
        n = h.shape[1]
        xz, xr, xh = x_t[:, :n], x_t[:, n:2 * n], x_t[:, 2 * n:]
        Rz, Rr, Rh = R_d[:n], R_d[n:2 * n], R_d[2 * n:]
        z = f(c(xz + xp.matmul(h, Rz.T) + rb[:n]))
        r = f(c(xr + xp.matmul(h, Rr.T) + rb[n:2 * n]))
        if linear_before_reset:
            cand = g(c(xh + r * (xp.matmul(h, Rh.T) + rb[2 * n:])))
        else:
            cand = g(c(xh + xp.matmul(r * h, Rh.T) + rb[2 * n:]))
        return [(1 - z) * cand + z * h]

    return _run(xp, cell, X, W, R, B, sequence_lens, [initial_h], direction=direction,
                hidden_size=hidden_size, layout=layout, gates=3)


# -- LSTM ---------------------------------------------------------------------------------------
@op("LSTM", since=7, differentiable=("X", "W", "R", "B", "initial_h", "initial_c", "P"))
def LSTM(xp, X, W, R, B=None, sequence_lens=None, initial_h=None, initial_c=None, P=None, *,
         activation_alpha=None, activation_beta=None, activations=None, clip=None,
         direction="forward", hidden_size=None, input_forget=0, layout=0):
    n_dir = 2 if direction == "bidirectional" else 1
    acts = _activations(xp, activations, ("Sigmoid", "Tanh", "Tanh"), n_dir, activation_alpha,
                        activation_beta)
    c = _clipper(xp, clip)

    def cell(x_t, state, R_d, rb, d, peep):
        h, cst = state
        f, g, hf = acts[d]
        n = h.shape[1]
        pre = x_t + xp.matmul(h, R_d.T) + rb  # gates i, o, f, c
        pi, po, pf = (None, None, None) if peep is None else (peep[d][:n], peep[d][n:2 * n],
                                                              peep[d][2 * n:])
        gi, go, gf, gc = pre[:, :n], pre[:, n:2 * n], pre[:, 2 * n:3 * n], pre[:, 3 * n:]
        i = f(c(gi if pi is None else gi + pi * cst))
        fg = 1 - i if input_forget else f(c(gf if pf is None else gf + pf * cst))
        cand = g(c(gc))
        new_c = fg * cst + i * cand
        o = f(c(go if po is None else go + po * new_c))
        return [o * hf(new_c), new_c]

    return _run(xp, cell, X, W, R, B, sequence_lens, [initial_h, initial_c], direction=direction,
                hidden_size=hidden_size, layout=layout, gates=4, extra=P)
