"""Optimizers that match ``torch.optim`` numerically, each written once.

An optimizer's arithmetic is written once, in two methods over an *algebra*
(an object with ``add``, ``sub``, ``mul``, ``div``, ``sqrt``, ``select`` and
constants):

* :meth:`Optimizer.step_scalars`: the numbers a step derives from the
  learning rate and the step count (bias corrections, the first-step flag), in
  double precision;
* :meth:`Optimizer.rule`: the update of one parameter and its state, element
  by element, in the parameter's own precision.

Three algebras run them:

* :class:`_Arrays` on NumPy or CuPy arrays, in place (an operation given
  ``out`` writes there), with the scalars computed on the host
  (:class:`_HostDoubles`): :meth:`Optimizer.update`;
* :class:`_CUDA` writes the rule as the body of one CUDA kernel per parameter,
  which reads the step's scalars from a small device array, so that a step
  recorded as a CUDA graph replays with each later step's learning rate and
  bias corrections (:class:`DeviceUpdate`);
* :class:`_Nodes` and :class:`_NodeDoubles` append the update and its scalars
  as standard ONNX nodes, the scalars computed from the model's ``lr`` and
  ``step`` inputs (:meth:`Optimizer.update_nodes`, for :mod:`onnxgrad.convert`).

Each algebra performs the operations in the order the rule states them, each
rounded to the parameter's type (the CUDA kernel is compiled without fused
multiply-adds), so the forms agree bit for bit given the same scalars.  The
order follows PyTorch's single-tensor implementations, so that results agree
with ``torch.optim`` to the last few bits.
"""

from __future__ import annotations

import math
from typing import Any, Iterable

import numpy as np

from onnxgrad.errors import OnnxgradError


class Optimizer:
    """Base class: holds hyper-parameters and per-parameter state by name.

    A subclass defines :meth:`step_scalars`, :meth:`rule` and the names of its
    state arrays (:attr:`STATE`); everything else derives from them."""

    #: The per-parameter state arrays, as :attr:`state` names them.
    STATE: tuple[str, ...] = ()

    def __init__(self, lr: float):
        if not lr >= 0.0:
            raise OnnxgradError(f"invalid learning rate {lr!r}; expected lr >= 0")
        self.lr = float(lr)
        self.state: dict[str, dict[str, Any]] = {}

    # -- written by each optimizer ---------------------------------------------------------
    def step_scalars(self, d) -> dict[str, Any]:  # pragma: no cover - abstract
        """The scalars of one step, by name, in the double-precision algebra ``d``,
        whose ``d.lr`` is the learning rate, ``d.step`` the number of steps taken
        before this one and ``d.first`` whether there were none (a flag for
        ``select``).  The names are the same at every step."""
        raise NotImplementedError

    def rule(self, t, p, g, s: dict, k: dict) -> tuple[Any, dict]:  # pragma: no cover
        """The update of parameter ``p`` given its gradient ``g``, its state ``s`` (by
        the names of :attr:`STATE`) and the step's scalars ``k``, in the algebra
        ``t``: ``t.const(v)`` is a hyper-parameter and ``t.scalar(k[name])`` a step
        scalar, both in the parameter's type; an operation given ``out=`` (the
        parameter or a state value) may write its result there.  Returns the new
        parameter and the new state."""
        raise NotImplementedError

    def _steps_taken(self, state: dict) -> int:
        """The steps this parameter took before (from its host state)."""
        return int(state.get("step", 0))

    # -- on arrays ------------------------------------------------------------------------
    def update(self, xp: Any, params: dict[str, Any], grads: dict[str, Any]) -> None:
        """Apply one step to every parameter of ``params`` that has a gradient, in place."""
        for name, grad in grads.items():
            param = params[name]
            state = self.state.setdefault(name, {})
            k = self.host_scalars(xp, param, state)
            new_param, new_state = self.rule(_Arrays(xp, param.dtype), param, grad,
                                             {key: state[key] for key in self.STATE}, k)
            _assign(param, new_param)
            for key in self.STATE:
                _assign(state[key], new_state[key])

    def host_scalars(self, xp: Any, param: Any, state: dict) -> dict[str, Any]:
        """The host's part of one step of ``param``: its missing state arrays created
        (zeros, on ``xp``), its step count advanced, and the step's scalars."""
        taken = self._steps_taken(state)
        for key in self.STATE:
            if key not in state:
                state[key] = xp.zeros_like(param)
        if "step" in state or self.counts_steps:
            state["step"] = taken + 1
        return self.step_scalars(_HostDoubles(self.lr, taken))

    #: Whether the host state keeps a step count (``state["step"]``).
    counts_steps = False

    def reset(self) -> None:
        """Forget all per-parameter state (momentum buffers, moments, step counts)."""
        self.state.clear()

    # -- as ONNX nodes (see onnxgrad.convert) ----------------------------------------------
    def uses_step(self) -> bool:
        """Whether the update reads the step count (a state shared by all parameters)."""
        return False

    def state_arrays(self, param: np.ndarray) -> dict[str, np.ndarray]:
        """The initial state of one parameter, by the names :attr:`state` uses."""
        return {key: np.zeros_like(param) for key in self.STATE}

    def update_nodes(self, g, param: str, grad: str, state: dict[str, str], lr: str,
                     step: str | None) -> tuple[str, dict[str, str]]:
        """Append the update of ``param`` as standard ONNX nodes through the builder ``g``:
        ``state`` maps state names to values, ``lr`` is the learning rate (a float
        scalar), ``step`` the number of steps taken before this one (int64).  Returns
        the new parameter and the new state values."""
        k = self.step_scalars(_NodeDoubles(g, lr, step))
        return self.rule(_Nodes(g, param), param, grad, dict(state), k)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if k != "state")
        return f"{type(self).__name__}({args})"


def _assign(target: Any, value: Any) -> None:
    if value is not target:
        target[...] = value


def _check(name: str, value: float, low: float = 0.0, high: float | None = None) -> float:
    value = float(value)
    if not (value >= low and (high is None or value < high)) or math.isnan(value):
        bound = f"[{low}, {high})" if high is not None else f">= {low}"
        raise OnnxgradError(f"invalid {name} {value!r}; expected a value in {bound}")
    return value


class SGD(Optimizer):
    """Stochastic gradient descent with momentum, as ``torch.optim.SGD``."""

    def __init__(self, lr: float, momentum: float = 0.0, dampening: float = 0.0,
                 nesterov: bool = False, weight_decay: float = 0.0):
        super().__init__(lr)
        self.momentum = _check("momentum", momentum)
        self.dampening = float(dampening)
        self.nesterov = bool(nesterov)
        self.weight_decay = _check("weight_decay", weight_decay)
        if nesterov and (momentum <= 0 or dampening != 0):
            raise OnnxgradError("nesterov momentum requires a momentum > 0 and zero dampening")

    @property
    def STATE(self) -> tuple[str, ...]:  # type: ignore[override]
        return ("momentum_buffer",) if self.momentum else ()

    def _steps_taken(self, state):
        return 0 if "momentum_buffer" not in state else 1  # only the first step differs

    def uses_step(self) -> bool:
        return bool(self.momentum and self.dampening)  # the first step takes the gradient as is

    def step_scalars(self, d):
        k = {"lr": d.lr}
        if self.uses_step():
            k["first"] = d.first
        return k

    def rule(self, t, p, g, s, k):
        d = g
        if self.weight_decay:
            d = t.add(d, t.mul(t.const(self.weight_decay), p))
        new = {}
        if self.momentum:
            # A new buffer holds zeros: momentum·0 + d is torch's first buffer, d itself.
            buf = t.mul(s["momentum_buffer"], t.const(self.momentum), out=s["momentum_buffer"])
            buf = t.add(buf, t.mul(t.const(1 - self.dampening), d) if self.dampening else d,
                        out=buf)
            if self.dampening:  # torch's first step takes the gradient undamped
                buf = t.select(k["first"], d, buf, out=buf)
            new["momentum_buffer"] = buf
            d = t.add(d, t.mul(t.const(self.momentum), buf)) if self.nesterov else buf
        return t.sub(p, t.mul(d, t.scalar(k["lr"])), out=p), new


class Adam(Optimizer):
    """Adam, as ``torch.optim.Adam`` (L2 weight decay added to the gradient)."""

    decoupled = False
    STATE = ("exp_avg", "exp_avg_sq")
    counts_steps = True

    def __init__(self, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0):
        super().__init__(lr)
        b1, b2 = betas
        self.betas = (_check("beta1", b1, 0.0, 1.0), _check("beta2", b2, 0.0, 1.0))
        self.eps = _check("eps", eps)
        self.weight_decay = _check("weight_decay", weight_decay)

    def uses_step(self) -> bool:
        return True

    def step_scalars(self, d):
        beta1, beta2 = self.betas
        count = d.add(d.step, d.const(1.0))
        k = {"neg_step_size": d.neg(d.div(d.lr, d.sub(d.const(1.0),
                                                      d.pow(d.const(beta1), count)))),
             "bias2_sqrt": d.sqrt(d.sub(d.const(1.0), d.pow(d.const(beta2), count)))}
        if self.weight_decay and self.decoupled:
            k["kept"] = d.sub(d.const(1.0), d.mul(d.lr, d.const(self.weight_decay)))
        return k

    def rule(self, t, p, g, s, k):
        beta1, beta2 = self.betas
        m, v = s["exp_avg"], s["exp_avg_sq"]
        if self.weight_decay and self.decoupled:
            p = t.mul(p, t.scalar(k["kept"]), out=p)
        elif self.weight_decay:
            g = t.add(g, t.mul(t.const(self.weight_decay), p))
        # torch: exp_avg.lerp_(grad, 1 - beta1), whose formula depends on the weight
        weight = 1 - beta1
        if weight < 0.5:
            m = t.add(m, t.mul(t.const(weight), t.sub(g, m)), out=m)
        else:
            m = t.sub(g, t.mul(t.sub(g, m), t.const(1 - weight)), out=m)
        v = t.mul(v, t.const(beta2), out=v)
        v = t.add(v, t.mul(t.mul(t.const(1 - beta2), g), g), out=v)
        denom = t.add(t.div(t.sqrt(v), t.scalar(k["bias2_sqrt"])), t.const(self.eps))
        p = t.add(p, t.div(t.mul(t.scalar(k["neg_step_size"]), m), denom), out=p)
        return p, {"exp_avg": m, "exp_avg_sq": v}


class AdamW(Adam):
    """AdamW, as ``torch.optim.AdamW`` (decoupled weight decay)."""

    decoupled = True

    def __init__(self, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.01):
        super().__init__(lr, betas, eps, weight_decay)


# -- the algebras ---------------------------------------------------------------------------


class _HostDoubles:
    """Step scalars on the host: Python floats (double precision)."""

    def __init__(self, lr: float, step: int):
        self.lr, self.step, self.first = float(lr), float(step), step == 0

    const = staticmethod(float)

    @staticmethod
    def add(a, b):
        return a + b

    @staticmethod
    def sub(a, b):
        return a - b

    @staticmethod
    def mul(a, b):
        return a * b

    @staticmethod
    def div(a, b):
        return a / b

    @staticmethod
    def pow(a, b):
        return a ** b

    @staticmethod
    def neg(a):
        return -a

    sqrt = staticmethod(math.sqrt)


class _Arrays:
    """The rule on NumPy or CuPy arrays in the parameter's type ``dtype``; step scalars
    are host numbers (flags: booleans)."""

    def __init__(self, xp: Any, dtype: Any):
        self.xp = xp
        self.type = np.dtype(dtype).type

    def const(self, value):
        return self.type(value)

    scalar = const

    def add(self, a, b, out=None):
        return self.xp.add(a, b, out=out)

    def sub(self, a, b, out=None):
        return self.xp.subtract(a, b, out=out)

    def mul(self, a, b, out=None):
        return self.xp.multiply(a, b, out=out)

    def div(self, a, b, out=None):
        return self.xp.divide(a, b, out=out)

    def sqrt(self, a):
        return self.xp.sqrt(a)

    @staticmethod
    def select(flag, a, b, out=None):
        value = a if flag else b
        if out is None:
            return value
        _assign(out, value)
        return out


class _Nodes:
    """The rule as standard ONNX nodes appended through the gradient builder ``g``, in
    the type of the parameter ``like``; step scalars are double tensors."""

    def __init__(self, g, like: str):
        self.g, self.like, self.dtype = g, like, g.dtype(like)

    def const(self, value):
        return self.g.scalar(value, like=self.like)

    def scalar(self, value):
        return self.g.Cast(value, to=_tensor_type(self.dtype), dtype=self.dtype)

    def add(self, a, b, out=None):
        return self.g.Add(a, b)

    def sub(self, a, b, out=None):
        return self.g.Sub(a, b)

    def mul(self, a, b, out=None):
        return self.g.Mul(a, b)

    def div(self, a, b, out=None):
        return self.g.Div(a, b)

    def sqrt(self, a):
        return self.g.Sqrt(a)

    def select(self, flag, a, b, out=None):
        return self.g.Where(flag, a, b, dtype=self.dtype)


class _NodeDoubles:
    """Step scalars as double-precision ONNX nodes, from the model's ``lr`` input (a
    float scalar) and ``step`` input (int64, the steps taken before this one)."""

    _DOUBLE = np.dtype(np.float64)

    def __init__(self, g, lr: str, step: str | None):
        self.g, self._lr, self._step = g, lr, step

    def _double(self, name):
        return self.g.Cast(name, to=_tensor_type(self._DOUBLE), dtype=self._DOUBLE)

    @property
    def lr(self):
        return self._double(self._lr)

    @property
    def step(self):
        return self._double(self._stepped())

    @property
    def first(self):
        return self.g.Equal(self._stepped(), self.g.const(0, dtype="int64"), dtype="bool")

    def _stepped(self):
        if self._step is None:
            raise OnnxgradError("this optimizer reads the step count but uses_step() is False")
        return self._step

    def const(self, value):
        return self.g.const(value, dtype=self._DOUBLE)

    def add(self, a, b):
        return self.g.Add(a, b)

    def sub(self, a, b):
        return self.g.Sub(a, b)

    def mul(self, a, b):
        return self.g.Mul(a, b)

    def div(self, a, b):
        return self.g.Div(a, b)

    def pow(self, a, b):
        return self.g.Pow(a, b)

    def neg(self, a):
        return self.g.Neg(a)

    def sqrt(self, a):
        return self.g.Sqrt(a)


class _CUDA:
    """The rule as CUDA C statements for ``cupy.ElementwiseKernel``, in the type
    placeholder ``T``: each operation one statement (a temporary, or an assignment
    to its ``out``); step scalars are read from the double row ``r``."""

    def __init__(self):
        self.lines: list[str] = []

    def _emit(self, expr: str, out: str | None) -> str:
        if out is None:
            out = f"t{len(self.lines)}"
            self.lines.append(f"T {out} = {expr};")
        else:
            self.lines.append(f"{out} = {expr};")
        return out

    @staticmethod
    def const(value):
        return f"(T){float(value)!r}"

    @staticmethod
    def scalar(value):
        return f"(T){value}"

    def add(self, a, b, out=None):
        return self._emit(f"{a} + {b}", out)

    def sub(self, a, b, out=None):
        return self._emit(f"{a} - {b}", out)

    def mul(self, a, b, out=None):
        return self._emit(f"{a} * {b}", out)

    def div(self, a, b, out=None):
        return self._emit(f"{a} / {b}", out)

    def sqrt(self, a):
        return self._emit(f"sqrt({a})", None)

    def select(self, flag, a, b, out=None):
        return self._emit(f"{flag} != 0.0 ? {a} : {b}", out)


def kernel_source(optimizer: Optimizer) -> tuple[str, str, str, tuple[str, ...]]:
    """The fused update of one parameter as a ``cupy.ElementwiseKernel``: its input
    and output parameters and its body, which reads row ``row`` of the step scalars
    ``h``; and the state arrays it updates, in the order of its outputs after the
    parameter.  The body is C that a host compiler runs as well (see the tests)."""
    keys = list(optimizer.step_scalars(_HostDoubles(optimizer.lr, 0)))
    names = tuple(optimizer.STATE)
    code = _CUDA()
    state = {name: f"s{i}" for i, name in enumerate(names)}
    p, new = optimizer.rule(code, "p", "g", dict(state),
                            {key: f"r[{i}]" for i, key in enumerate(keys)})
    if p != "p":
        code.lines.append(f"p = {p};")
    for name in names:
        if new[name] != state[name]:
            code.lines.append(f"{state[name]} = {new[name]};")
    body = "\n".join([f"const double* r = &h[row * {len(keys)}];"] + code.lines)
    outputs = ", ".join(["T p"] + [f"T {state[name]}" for name in names])
    return "T g, raw float64 h, int64 row", outputs, body, names


_KERNELS: dict[str, Any] = {}  # body -> compiled kernel (compiled on first use)


def _tensor_type(dtype: Any) -> int:
    from onnx import helper  # noqa: PLC0415 - only the node form needs onnx

    return helper.np_dtype_to_tensor_dtype(np.dtype(dtype))


class DeviceUpdate:
    """An optimizer's steps on a GPU: one fused kernel launch per parameter.

    :meth:`begin_step` is the host's part of a step (new state arrays, step
    counts, this step's scalars written to a device array); calling the object
    with a parameter's gradient launches that parameter's kernel, which reads its
    scalars from the device array.  A step recorded as a CUDA graph thus replays
    with the learning rate and bias corrections of each later step, as long as
    :meth:`begin_step` runs before each replay.
    """

    def __init__(self, optimizer: Optimizer, xp: Any, params: dict[str, Any]):
        self.optimizer = optimizer
        self.xp = xp
        self.params = params
        self.rows = {name: i for i, name in enumerate(params)}
        self.source = kernel_source(optimizer)
        count = len(optimizer.step_scalars(_HostDoubles(optimizer.lr, 0)))
        self.host = np.zeros((len(params), count))
        self.device = xp.zeros(self.host.shape)

    def begin_step(self, names: Iterable[str] | None = None) -> None:
        opt = self.optimizer
        for name in self.params if names is None else names:
            state = opt.state.setdefault(name, {})
            scalars = opt.host_scalars(self.xp, self.params[name], state)
            self.host[self.rows[name]] = [float(v) for v in scalars.values()]
        if isinstance(self.device, np.ndarray):
            self.device[...] = self.host
        else:
            self.device.set(self.host)  # a host-to-device copy in stream order

    def arrays(self) -> list[Any]:
        """Every device array a step reads or writes besides the gradients: the
        parameters, the optimizer's state arrays and the scalars."""
        found = [self.device, *self.params.values()]
        for name in self.params:
            found += [v for v in self.optimizer.state.get(name, {}).values() if hasattr(v, "shape")]
        return found

    def __call__(self, name: str, grad: Any) -> None:
        opt, xp = self.optimizer, self.xp
        state = opt.state[name]
        in_params, out_params, body, names = self.source
        kernel = _KERNELS.get(body)
        if kernel is None:
            kernel = _KERNELS[body] = xp.ElementwiseKernel(
                in_params, out_params, body, f"onnxgrad_{type(opt).__name__.lower()}_update",
                options=("--fmad=false",))
        kernel(grad, self.device, self.rows[name], self.params[name],
               *(state[n] for n in names))
